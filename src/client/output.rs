//! How `cellar csi` shows answers: aligned tables and fields for people, JSON for scripts.
//!
//! The JSON follows the CSI messages' field names (snake_case, sizes in bytes), so a script reads
//! what the spec documents; the tables show sizes in KiB/MiB/GiB and only what an operator reads.

use serde_json::{json, Map, Value};

use crate::csi::v1::*;

/// `-o table` (default) or `-o json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `64 MiB`, `1.5 GiB`, `512 B`: powers of 1024, one decimal only when the size is not whole.
pub fn size(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes.unsigned_abs();
    while unit + 1 < UNITS.len() && whole >= 1024 {
        whole /= 1024;
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    let exact = bytes.unsigned_abs() % scale == 0;
    let sign = if bytes < 0 { "-" } else { "" };
    if exact {
        format!("{sign}{whole} {}", UNITS[unit])
    } else {
        let value = format!("{:.1}", bytes.unsigned_abs() as f64 / scale as f64);
        // "252.0" would read as exact: a size that only rounds to a whole number drops the ".0".
        format!("{sign}{} {}", value.trim_end_matches(".0"), UNITS[unit])
    }
}

/// A table with a header row; columns are padded to their widest cell, the last one is not.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let mut widths = vec![0; self.header.len()];
        for line in &lines {
            for (w, cell) in widths.iter_mut().zip(line.iter()) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i + 1 < line.len() {
                    text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                } else {
                    text.push_str(cell);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Name/value lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

pub fn topology(t: &[Topology]) -> Value {
    Value::Array(t.iter().map(|t| json!({ "segments": t.segments })).collect())
}

/// `key=value` segments, one topology after another; `-` when there is none.
pub fn topology_text(t: &[Topology]) -> String {
    let parts: Vec<String> = t
        .iter()
        .map(|t| {
            let mut segs: Vec<String> = t.segments.iter().map(|(k, v)| format!("{k}={v}")).collect();
            segs.sort();
            segs.join(",")
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub fn condition(c: Option<&VolumeCondition>) -> Value {
    match c {
        Some(c) => json!({ "abnormal": c.abnormal, "message": c.message }),
        None => Value::Null,
    }
}

/// `ok`, or `ABNORMAL: why`; `-` when the driver reports no condition.
pub fn condition_text(c: Option<&VolumeCondition>) -> String {
    match c {
        Some(c) if c.abnormal => format!("ABNORMAL: {}", c.message),
        Some(_) => "ok".into(),
        None => "-".into(),
    }
}

fn content_source(s: Option<&VolumeContentSource>) -> Value {
    use volume_content_source::Type;
    match s.and_then(|s| s.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => json!({ "snapshot": { "snapshot_id": s.snapshot_id } }),
        Some(Type::Volume(v)) => json!({ "volume": { "volume_id": v.volume_id } }),
        None => Value::Null,
    }
}

pub fn volume(v: &Volume) -> Value {
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "content_source": content_source(v.content_source.as_ref()),
        "accessible_topology": topology(&v.accessible_topology),
    })
}

/// Seconds since the epoch as an RFC 3339 UTC time (`2026-12-02T09:40:07Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn snapshot(s: &Snapshot) -> Value {
    let mut m = Map::new();
    m.insert("snapshot_id".into(), json!(s.snapshot_id));
    m.insert("source_volume_id".into(), json!(s.source_volume_id));
    m.insert("size_bytes".into(), json!(s.size_bytes));
    m.insert("ready_to_use".into(), json!(s.ready_to_use));
    m.insert(
        "creation_time".into(),
        s.creation_time
            .as_ref()
            .map(|t| json!(rfc3339(t.seconds)))
            .unwrap_or(Value::Null),
    );
    if !s.group_snapshot_id.is_empty() {
        m.insert("group_snapshot_id".into(), json!(s.group_snapshot_id));
    }
    Value::Object(m)
}

pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut t = Table::new(&["SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "READY", "CREATED"]);
    for s in snaps {
        t.row(vec![
            s.snapshot_id.clone(),
            s.source_volume_id.clone(),
            size(s.size_bytes),
            if s.ready_to_use { "yes" } else { "no" }.into(),
            s.creation_time
                .as_ref()
                .map(|t| rfc3339(t.seconds))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

pub fn usage(u: &VolumeUsage) -> Value {
    let unit = volume_usage::Unit::try_from(u.unit)
        .map(|u| u.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({ "unit": unit, "total": u.total, "used": u.used, "available": u.available })
}

/// Prints JSON (pretty, one document) or the human text; see [`print`] for its errors.
pub fn emit(format: Format, json: Value, human: impl FnOnce() -> String) -> Result<(), String> {
    match format {
        Format::Json => print(&(serde_json::to_string_pretty(&json).unwrap_or_default() + "\n")),
        Format::Table => print(&human()),
    }
}

/// Writes a command's answer to stdout, once what it asked for is done.
///
/// `print!` panics when the write fails, and a release build aborts on a panic: a script reading
/// `cellar csi create | head -c0` or writing to a full disk saw a crash (exit 101, or SIGABRT) for a
/// volume that was in fact created. A reader that closed the pipe wanted no more, so that is not an
/// error (Rust ignores SIGPIPE, so it is EPIPE here); any other failure is returned, to be printed
/// on stderr with a non-zero exit, and says the command was done so that it is not blindly retried.
pub fn print(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!(
            "the command ran to completion, but its output could not be written to stdout: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_in_powers_of_1024_with_a_decimal_only_when_needed() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
        assert_eq!(size(1 << 40), "1 TiB");
        assert_eq!(size(1500), "1.5 KiB");
        assert_eq!(size((252 << 30) + 4096), "252 GiB");
    }

    #[test]
    fn tables_align_columns_under_their_header() {
        let mut t = Table::new(&["ID", "SIZE"]);
        t.row(vec!["a-long-id".into(), "1 GiB".into()]);
        t.row(vec!["b".into(), "2 MiB".into()]);
        assert_eq!(t.render(), "ID         SIZE\na-long-id  1 GiB\nb          2 MiB\n");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_204_407), "2026-12-02T09:40:07Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
