//! The harness every integration test uses: a real `cellar all-in-one` process on a private data
//! directory and socket, the three CSI clients, and a check on drop that it left no mount behind.
#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod fs;
pub mod gluster;
pub mod ports;
pub mod postgres;
pub mod s3;
pub mod sanity;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::identity_client::IdentityClient;
use cellar::csi::v1::node_client::NodeClient;
use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use tonic::transport::Channel;

pub const NODE: &str = "node-1";
pub const MIB: i64 = 1 << 20;

/// Tests mount and unmount for real: they need root, and say so instead of passing vacuously.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests make real mounts and must run as root (CI runs them as root)"
    );
}

pub struct Driver {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub ctl: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub id: IdentityClient<Channel>,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cellar"))
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_with(&[], &[]).await
    }

    pub async fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Driver {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-")
            .tempdir()
            .expect("tempdir");
        let mut d = Driver {
            dir,
            child: None,
            ctl: placeholder_ctl(),
            node: placeholder_node(),
            id: placeholder_id(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        d.spawn(&[]).await;
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.data_dir().join("pools/default")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    /// A path under the test's directory for staging or target use.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts the process (again), with extra environment such as a crash point.
    pub async fn spawn(&mut self, envs: &[(&str, &str)]) {
        if let Err(st) = self.try_spawn(envs).await {
            panic!("cellar exited during start-up: {st}");
        }
    }

    /// As [`Driver::spawn`], but a process that dies during start-up (a crash point reached by work
    /// it resumes at start, such as a backup upload) is reaped and its exit status returned.
    pub async fn try_spawn(&mut self, envs: &[(&str, &str)]) -> Result<(), std::process::ExitStatus> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("all-in-one").arg("--endpoint").arg(self.endpoint());
        if !self.extra_args.iter().any(|a| a == "--node-id") {
            cmd.arg("--node-id").arg(NODE);
        }
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.extra_args)
            .env("CELLAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start cellar"));
        let channel = match connect(&self.socket(), self.child.as_mut().expect("child")).await {
            Ok(c) => c,
            Err(st) => {
                self.child = None;
                return Err(st);
            }
        };
        self.ctl = ControllerClient::new(channel.clone());
        self.node = NodeClient::new(channel.clone());
        self.id = IdentityClient::new(channel);
        Ok(())
    }

    /// Waits for the process to end by itself (a crash point) and returns how it ended.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "driver did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a node crash or OOM kill would stop it.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "driver did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// Mount points at or below `dir`, read from the kernel's table.
/// NodeStageVolume of a Filesystem RWO volume at `staging` (made if missing), on any node's client.
pub async fn stage_rwo(node: &mut NodeClient<Channel>, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    std::fs::create_dir_all(staging).expect("staging");
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwo()),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// NodeUnstageVolume on any node's client.
pub async fn unstage_from(node: &mut NodeClient<Channel>, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .map(|_| ())
}

/// A channel to a driver's Unix socket, once the socket is there and answers (at most 30 s).
pub async fn connect_socket(path: &Path) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if path.exists() {
            if let Ok(ch) = cellar::client::connect(&format!("unix://{}", path.display())).await {
                return ch;
            }
        }
        assert!(Instant::now() < deadline, "{} did not open", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    cellar::sys::mountinfo::parse(&table)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
        let left = mounts_under(self.dir.path());
        for m in left.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("the test left mounts behind: {left:?}");
        }
    }
}

/// Connects to a starting process's socket; its exit status when it dies first.
async fn connect(socket: &Path, child: &mut Child) -> Result<Channel, std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Err(st);
        }
        if socket.exists() {
            if let Ok(ch) = cellar::client::connect(&format!("unix://{}", socket.display())).await {
                return Ok(ch);
            }
        }
        assert!(Instant::now() < deadline, "cellar did not open {}", socket.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lazy_channel() -> Channel {
    tonic::transport::Endpoint::from_static("http://[::]:1").connect_lazy()
}
fn placeholder_ctl() -> ControllerClient<Channel> {
    ControllerClient::new(lazy_channel())
}
fn placeholder_node() -> NodeClient<Channel> {
    NodeClient::new(lazy_channel())
}
fn placeholder_id() -> IdentityClient<Channel> {
    IdentityClient::new(lazy_channel())
}

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    cellar::client::mount_capability(mode, vec![])
}

pub fn rwo() -> VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
    }
}

pub fn from_snapshot(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

pub fn from_volume(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource {
        volume_id: id.to_string(),
    })
}

/// `bytes` of data that does not compress (xorshift, the same every call).
pub fn noise(bytes: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn create_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        ..Default::default()
    }
}

/// The gRPC code of a call's outcome (`Ok` for success).
pub fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

impl Driver {
    pub async fn create(&mut self, name: &str) -> Volume {
        self.create_with(create_req(name, 64 * MIB)).await
    }

    /// A 64 MiB volume in pool `pool`.
    pub async fn create_in(&mut self, name: &str, pool: &str) -> Volume {
        let mut req = create_req(name, 64 * MIB);
        req.parameters.insert("pool".into(), pool.into());
        self.create_with(req).await
    }

    async fn create_with(&mut self, req: CreateVolumeRequest) -> Volume {
        self.ctl
            .create_volume(req)
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume")
    }

    pub async fn stage(&mut self, volume_id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.stage_as(volume_id, staging, rwo()).await
    }

    pub async fn stage_as(
        &mut self,
        volume_id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &mut self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&mut self, volume_id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn stats(&mut self, volume_id: &str, path: &Path) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
        self.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume_id.to_string(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn delete(&mut self, volume_id: &str) -> Result<(), tonic::Status> {
        self.ctl
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn snapshot(&mut self, name: &str, source: &str) -> Result<Snapshot, tonic::Status> {
        self.ctl
            .create_snapshot(CreateSnapshotRequest {
                name: name.to_string(),
                source_volume_id: source.to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.expect("snapshot"))
    }

    /// Stages and publishes read-write at `<dir>/<name>-staging` and `<dir>/<name>-target`.
    pub async fn mount_rw(&mut self, volume_id: &str, name: &str) -> (PathBuf, PathBuf) {
        let staging = self.path(&format!("{name}-staging"));
        let target = self.path(&format!("{name}-target"));
        std::fs::create_dir_all(&staging).expect("staging dir");
        self.stage(volume_id, &staging).await.expect("stage");
        self.publish(volume_id, &staging, &target, rwo(), false)
            .await
            .expect("publish");
        (staging, target)
    }

    pub async fn unmount_all(&mut self, volume_id: &str, staging: &Path, target: &Path) {
        self.unpublish(volume_id, target).await.expect("unpublish");
        self.unstage(volume_id, staging).await.expect("unstage");
    }
}

/// Writes a config with one pool per entry (name, path, layout, extra YAML lines) and starts a driver;
/// the returned directory holds the config and must live as long as the driver.
pub async fn start_with_pools(pools: &[(&str, &Path, &str, &str)]) -> (Driver, tempfile::TempDir) {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let mut yaml = String::from("pools:\n");
    for (name, path, layout, extra) in pools {
        yaml += &format!("  - name: {name}\n    path: {}\n    layout: {layout}\n", path.display());
        for line in extra.lines().filter(|l| !l.is_empty()) {
            yaml += &format!("    {line}\n");
        }
    }
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (d, cfgdir)
}

/// The names in `dir`, sorted (none when it cannot be read).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The seeds of a randomized tester from the environment variable `var`: a comma-separated list
/// of seeds and ranges (`3,17`, `1-20`; one seed reruns as it failed), or `count:N` for the seeds
/// 1 to N; `default` when it is not set.
pub fn seeds_from_env(var: &str, default: &[u64]) -> Vec<u64> {
    let Ok(s) = std::env::var(var) else {
        return default.to_vec();
    };
    let number = |x: &str| -> u64 {
        x.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}: a comma-separated list of u64 seeds or ranges A-B, or count:N"))
    };
    if let Some(n) = s.trim().strip_prefix("count:") {
        return (1..=number(n)).collect();
    }
    s.split(',')
        .flat_map(|x| match x.split_once('-') {
            Some((a, b)) => (number(a)..=number(b)).collect::<Vec<_>>(),
            None => vec![number(x)],
        })
        .collect()
}

/// SIGKILLs the process in `slot`, if there is one, and reaps it; the slot is left empty.
pub fn kill_child(slot: &mut Option<Child>) {
    if let Some(mut c) = slot.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
