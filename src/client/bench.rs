//! `cellar csi bench`: the per-RPC latency and throughput of a driver's volume lifecycle.
//!
//! Optionally publishes `--background` volumes first (not measured) so that the measured calls run
//! on a node that already carries many mounts, as a busy node does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use tonic::transport::Channel;

use crate::csi::v1::controller_client::ControllerClient;
use crate::csi::v1::node_client::NodeClient;
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::*;

use super::{mount_capability, parse_size};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Volumes driven through the measured lifecycle.
    #[arg(long, default_value_t = 200)]
    pub volumes: usize,
    /// Concurrent clients (the volumes are split between them).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Volumes created, staged and published before measuring, and cleaned up after.
    #[arg(long, default_value_t = 0)]
    pub background: usize,
    /// Where staging and target directories are made: a fresh private directory is made under it
    /// for each run. It must belong to root or to the caller, and be writable by others only if
    /// sticky (as /tmp is).
    #[arg(long, default_value = "/tmp")]
    pub work_dir: PathBuf,
    /// Size of each volume, in bytes or with a K/M/G/T suffix.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// A StorageClass parameter for every volume, key=value (repeatable).
    #[arg(long = "param", value_parser = super::key_value)]
    pub params: Vec<(String, String)>,
    /// The driver's pid: its peak RSS (VmHWM) is reported.
    #[arg(long)]
    pub driver_pid: Option<u32>,
    /// Prefix of the volume names (so parallel runs do not collide).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Write this much data into each published volume (e.g. 1G), then time CreateSnapshot and
    /// DeleteSnapshot of it.
    #[arg(long)]
    pub fill: Option<String>,
}

const STEPS: [&str; 8] = [
    "CreateVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    "DeleteVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
];

#[derive(Clone)]
struct Lifecycle {
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    dir: PathBuf,
    size: i64,
    fill: u64,
    params: std::collections::HashMap<String, String>,
}

impl Lifecycle {
    fn paths(&self, name: &str) -> (String, String) {
        let base = self.dir.join(name);
        (
            base.join("staging").display().to_string(),
            base.join("target").display().to_string(),
        )
    }

    fn cap() -> VolumeCapability {
        mount_capability(Mode::SingleNodeWriter, vec![])
    }

    async fn up(&mut self, name: &str, times: &mut [Vec<Duration>; 8]) -> Result<String, String> {
        let (staging, target) = self.paths(name);
        std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let vol = self
            .ctl
            .create_volume(CreateVolumeRequest {
                name: name.to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: self.size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![Self::cap()],
                parameters: self.params.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("CreateVolume {name}: {s}"))?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?;
        times[0].push(t.elapsed());
        let id = vol.volume_id;
        let t = Instant::now();
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(Self::cap()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("NodeStageVolume {id}: {s}"))?;
        times[1].push(t.elapsed());
        let t = Instant::now();
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging,
                target_path: target,
                volume_capability: Some(Self::cap()),
                volume_context: vol.volume_context,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("NodePublishVolume {id}: {s}"))?;
        times[2].push(t.elapsed());
        if self.fill > 0 {
            self.snapshot_round(name, &id, times).await?;
        }
        Ok(id)
    }

    /// Fills the published volume, then times a snapshot of it and its deletion.
    async fn snapshot_round(&mut self, name: &str, id: &str, times: &mut [Vec<Duration>; 8]) -> Result<(), String> {
        let (_, target) = self.paths(name);
        write_fill(&PathBuf::from(&target).join("fill"), self.fill).map_err(|e| format!("fill {target}: {e}"))?;
        let t = Instant::now();
        let snap = self
            .ctl
            .create_snapshot(CreateSnapshotRequest {
                name: format!("{name}-snap"),
                source_volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("CreateSnapshot {id}: {s}"))?
            .into_inner()
            .snapshot
            .ok_or("CreateSnapshot returned no snapshot")?;
        times[6].push(t.elapsed());
        let t = Instant::now();
        self.ctl
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("DeleteSnapshot {}: {s}", snap.snapshot_id))?;
        times[7].push(t.elapsed());
        Ok(())
    }

    async fn down(&mut self, name: &str, id: &str, times: &mut [Vec<Duration>; 8]) -> Result<(), String> {
        let (staging, target) = self.paths(name);
        let t = Instant::now();
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.to_string(),
                target_path: target,
            })
            .await
            .map_err(|s| format!("NodeUnpublishVolume {id}: {s}"))?;
        times[3].push(t.elapsed());
        let t = Instant::now();
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.to_string(),
                staging_target_path: staging.clone(),
            })
            .await
            .map_err(|s| format!("NodeUnstageVolume {id}: {s}"))?;
        times[4].push(t.elapsed());
        let t = Instant::now();
        self.ctl
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("DeleteVolume {id}: {s}"))?;
        times[5].push(t.elapsed());
        let _ = std::fs::remove_dir(&staging);
        let _ = std::fs::remove_dir(self.dir.join(name));
        Ok(())
    }
}

/// Writes `bytes` of non-zero data (so nothing is stored as holes) and syncs it.
fn write_fill(path: &std::path::Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Makes a new directory, mode 0700, under `parent` for this run's staging and target paths.
///
/// The driver mounts volumes wherever these paths lead, as root. A name anyone can predict (the
/// pid) in a shared directory such as /tmp could be made first by another user, with symlinks in
/// it that send the mounts elsewhere; so the name is random and the directory must be new
/// (mkdtemp), and no one else can then write in it. The parent is checked too: whoever owns it,
/// or can write in it without the sticky bit, could rename our directory and put theirs in its
/// place. mkdtemp rather than `tempfile::TempDir`, whose drop removes everything under it,
/// reaching into volumes a failed run may leave mounted there.
fn private_dir(parent: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(parent).map_err(|e| format!("--work-dir {}: {e}", parent.display()))?;
    if !meta.is_dir() {
        return Err(format!("--work-dir {}: not a directory", parent.display()));
    }
    if let Some(why) = unsafe_parent(meta.uid(), meta.mode(), nix::unistd::geteuid().as_raw()) {
        return Err(format!("--work-dir {}: {why}", parent.display()));
    }
    nix::unistd::mkdtemp(&parent.join("cellar-bench-XXXXXX"))
        .map_err(|e| format!("cannot make a directory under --work-dir {}: {e}", parent.display()))
}

/// Why a directory owned by `uid` with `mode` is no safe parent for a process running as `me`:
/// someone other than root and `me` could replace what is made in it.
fn unsafe_parent(uid: u32, mode: u32, me: u32) -> Option<String> {
    const STICKY: u32 = 0o1000;
    if uid != 0 && uid != me {
        return Some(format!("owned by uid {uid}, not by root or by this user"));
    }
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Some(format!(
            "writable by others without the sticky bit (mode {:o})",
            mode & 0o7777
        ));
    }
    None
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Each client gets its own connection, as kubelet and each sidecar have theirs.
pub async fn run(endpoint: &str, a: BenchArgs, out: super::Format) -> Result<(), String> {
    let channel = super::connect(endpoint).await?;
    let dir = private_dir(&a.work_dir)?;
    let base = Lifecycle {
        ctl: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        dir: dir.clone(),
        size: parse_size(&a.size)?,
        fill: match &a.fill {
            Some(f) => parse_size(f)? as u64,
            None => 0,
        },
        params: a.params.iter().cloned().collect(),
    };
    let mut channels = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        channels.push(super::connect(endpoint).await?);
    }
    let result = measure(&base, &a, channels, out).await;
    let _ = std::fs::remove_dir(Path::new(&dir));
    result
}

async fn measure(base: &Lifecycle, a: &BenchArgs, channels: Vec<Channel>, out: super::Format) -> Result<(), String> {
    let mut bg = base.clone();
    bg.fill = 0; // only the measured volumes are filled and snapshotted
    let mut bg_ids = Vec::new();
    let mut scratch: [Vec<Duration>; 8] = Default::default();
    for i in 0..a.background {
        let name = format!("{}-bg-{i}", a.prefix);
        bg_ids.push((name.clone(), bg.up(&name, &mut scratch).await?));
    }
    eprintln!(
        "{} background volumes published; measuring {} volumes with {} clients",
        a.background, a.volumes, a.concurrency
    );

    let clients = a.concurrency.max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, channel) in channels.into_iter().enumerate().take(clients) {
        let mut lc = Lifecycle {
            ctl: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            ..base.clone()
        };
        let names: Vec<String> = (0..a.volumes)
            .filter(|i| i % clients == c)
            .map(|i| format!("{}-{i}", a.prefix))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut times: [Vec<Duration>; 8] = Default::default();
            for name in names {
                let id = lc.up(&name, &mut times).await?;
                lc.down(&name, &id, &mut times).await?;
            }
            Ok::<_, String>(times)
        }));
    }
    let mut all: [Vec<Duration>; 8] = Default::default();
    for t in tasks {
        let times = t.await.map_err(|e| e.to_string())??;
        for (acc, mut v) in all.iter_mut().zip(times) {
            acc.append(&mut v);
        }
    }
    let wall = start.elapsed();

    for (name, id) in &bg_ids {
        bg.down(name, id, &mut scratch).await?;
    }

    let ops: usize = all.iter().map(Vec::len).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    for (step, v) in STEPS.iter().zip(all.iter_mut()).filter(|(_, v)| !v.is_empty()) {
        v.sort();
        rows.push((*step, v.len(), ms(percentile(v, 0.50)), ms(percentile(v, 0.99))));
    }
    let secs = wall.as_secs_f64();
    let rss = a.driver_pid.map(|pid| (pid, peak_rss_kib(pid)));
    let json = serde_json::json!({
        "rpcs": rows.iter().map(|(rpc, n, p50, p99)| serde_json::json!({
            "rpc": rpc, "count": n, "p50_ms": p50, "p99_ms": p99,
        })).collect::<Vec<_>>(),
        "total_rpcs": ops,
        "seconds": secs,
        "rpc_per_second": ops as f64 / secs,
        "lifecycles_per_second": a.volumes as f64 / secs,
        "clients": clients,
        "background_volumes": a.background,
        "driver_peak_rss_kib": rss.and_then(|(_, k)| k),
    });
    super::output::emit(out, json, || {
        let mut text = String::from("rpc                      count    p50_ms    p99_ms\n");
        for (step, n, p50, p99) in &rows {
            text.push_str(&format!("{step:<24} {n:>5} {p50:>9.3} {p99:>9.3}\n"));
        }
        text.push_str(&format!(
            "total: {ops} rpcs in {secs:.3} s = {:.0} rpc/s, {:.1} volume lifecycles/s ({clients} clients, {} background volumes)\n",
            ops as f64 / secs,
            a.volumes as f64 / secs,
            a.background
        ));
        match rss {
            Some((_, Some(k))) => text.push_str(&format!("driver peak RSS (VmHWM): {:.1} MiB\n", k as f64 / 1024.0)),
            Some((pid, None)) => text.push_str(&format!("driver peak RSS: pid {pid} not readable\n")),
            None => {}
        }
        text
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_directory_planted_under_the_old_predictable_name_is_never_used() {
        let parent = tempfile::Builder::new().prefix("cellar-test-").tempdir().unwrap();
        let outside = parent.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // What another user could make in /tmp before the run: the old name, a symlink inside.
        let planted = parent.path().join(format!("cellar-bench-{}", std::process::id()));
        std::fs::create_dir(&planted).unwrap();
        std::os::unix::fs::symlink(&outside, planted.join("bench-0")).unwrap();

        let dir = private_dir(parent.path()).unwrap();
        assert_ne!(dir, planted);
        assert_eq!(dir.parent(), Some(parent.path()));
        assert!(dir.file_name().unwrap().to_str().unwrap().starts_with("cellar-bench-"));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a new, empty directory");
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir(), "a directory, not a link");
        assert_eq!(meta.mode() & 0o7777, 0o700, "private to its owner");
        assert_ne!(private_dir(parent.path()).unwrap(), dir, "each run gets its own");
    }

    #[test]
    fn a_work_dir_others_could_swap_directories_in_is_refused() {
        let parent = tempfile::Builder::new().prefix("cellar-test-").tempdir().unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(parent.path()).unwrap_err();
        assert!(
            err.contains("writable by others without the sticky bit (mode 777)"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(parent.path()).unwrap().count(),
            0,
            "nothing made in it"
        );

        let file = parent.path().join("file");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_dir(&file).unwrap_err().ends_with("not a directory"));

        // Owner and mode alone decide, so every case is checked without root or other users.
        assert_eq!(unsafe_parent(0, 0o41777, 0), None, "/tmp: world-writable but sticky");
        assert_eq!(unsafe_parent(1000, 0o40700, 1000), None, "the caller's own directory");
        assert_eq!(
            unsafe_parent(0, 0o40755, 1000),
            None,
            "root's directory, for any caller"
        );
        assert!(unsafe_parent(1000, 0o40700, 0).unwrap().contains("owned by uid 1000"));
        assert!(unsafe_parent(0, 0o40775, 0).unwrap().contains("mode 775"));
        assert!(unsafe_parent(0, 0o40757, 0).unwrap().contains("mode 757"));
    }
}
