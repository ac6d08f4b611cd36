//! Parsing of /proc/<pid>/mountinfo. Read at startup and by the report, never on a per-call path.

use std::path::{Path, PathBuf};

use super::{Step, SysError};

pub const SELF: &str = "/proc/self/mountinfo";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    /// The filesystem's device as `major:minor`: bind mounts of one filesystem share it.
    pub dev: String,
    /// The directory of the source filesystem that is mounted (differs from "/" for bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

pub fn read(path: &Path) -> Result<Vec<MountEntry>, SysError> {
    let text = std::fs::read_to_string(path).step("read", path)?;
    Ok(parse(&text))
}

/// Whether the mount table at `table` lists `path` as a mount point.
pub fn lists_mount_point(table: &Path, path: &Path) -> Result<bool, SysError> {
    Ok(read(table)?.iter().any(|m| m.mount_point == path))
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let mount_id = l.next()?.parse().ok()?;
    let _parent = l.next()?;
    let dev = l.next()?.to_string();
    let root = unescape(l.next()?);
    let mount_point = unescape(l.next()?);
    let options = l.next()?.to_string();
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_string();
    let source = unescape(r.next().unwrap_or("")).to_string_lossy().into_owned();
    Some(MountEntry {
        mount_id,
        dev,
        root: root.into(),
        mount_point: mount_point.into(),
        options,
        fs_type,
        source,
    })
}

/// Mount points (other than the ones that reach `path` through its own filesystem) that show
/// `path` or a directory below it: the bind mounts a stage or publish made of a directory volume.
/// `path` must be absolute and free of symlinks (a pool's data path is).
pub fn mounts_of(table: &[MountEntry], path: &Path) -> Vec<PathBuf> {
    // The mount that reaches `path` is the last (topmost) one with the longest mount point above it.
    let Some(host) = table
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.as_os_str().len(), *i))
        .map(|(_, m)| m)
    else {
        return Vec::new();
    };
    let Ok(rest) = path.strip_prefix(&host.mount_point) else {
        return Vec::new();
    };
    let inside = host.root.join(rest);
    table
        .iter()
        .filter(|m| m.dev == host.dev && m.mount_id != host.mount_id && m.root.starts_with(&inside))
        .map(|m| m.mount_point.clone())
        .collect()
}

/// The kernel writes space, tab, newline and backslash as three-digit octal escapes.
fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bind_mount_with_escaped_space() {
        let t = "36 35 98:0 /pools/a\\040b /var/lib/kubelet/x rw,noatime master:1 - ext4 /dev/vda rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].root, PathBuf::from("/pools/a b"));
        assert_eq!(m[0].mount_point, PathBuf::from("/var/lib/kubelet/x"));
        assert_eq!(m[0].fs_type, "ext4");
        assert!(!m[0].read_only());
    }

    #[test]
    fn finds_bind_mounts_of_a_directory_and_below_it() {
        let t = "\
20 1 8:1 / / rw - ext4 /dev/sda1 rw
30 20 8:2 / /pools rw - xfs /dev/sdb rw
41 20 8:2 /p/volumes/a /stage/a rw - xfs /dev/sdb rw
42 20 8:2 /p/volumes/a/sub /pod/a rw - xfs /dev/sdb rw
43 20 8:2 /p/volumes/ab /stage/ab rw - xfs /dev/sdb rw
44 20 8:1 /pools/p/volumes/a /elsewhere rw - ext4 /dev/sda1 rw
";
        let m = parse(t);
        let found = mounts_of(&m, Path::new("/pools/p/volumes/a"));
        assert_eq!(found, vec![PathBuf::from("/stage/a"), PathBuf::from("/pod/a")]);
        assert!(mounts_of(&m, Path::new("/pools/p/volumes/b")).is_empty());
    }

    #[test]
    fn skips_garbage_lines() {
        assert!(parse("not a mountinfo line\n").is_empty());
    }
}
