//! One real `cellar controller` process and many simulated nodes (`sim.rs`) in this process, for
//! scale runs: the controller is reached only as the sidecars reach it, through its CSI socket,
//! and its peak RSS is read from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use cellar::csi::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::ports::free_port;

use super::certs::Authority;
use super::sim::{self, NodeTls, Running, SimNode};
use cellar::agent::tls::AGENT_SERVER_NAME as AGENT_NAME;

pub const GIB: u64 = 1 << 30;

/// What to run.
#[derive(Clone)]
pub struct Options {
    /// The `cellar` binary to run as the controller.
    pub bin: PathBuf,
    pub nodes: usize,
    pub volumes_per_node: usize,
    /// The size of every preloaded volume.
    pub volume_bytes: u64,
    /// `--heartbeat-interval` of the controller (the nodes adopt it).
    pub heartbeat_interval: Duration,
    /// More flags for the controller.
    pub controller_args: Vec<String>,
}

impl Options {
    pub fn new(bin: impl Into<PathBuf>, nodes: usize, volumes_per_node: usize) -> Options {
        Options {
            bin: bin.into(),
            nodes,
            volumes_per_node,
            volume_bytes: GIB,
            heartbeat_interval: Duration::from_secs(5),
            controller_args: vec![],
        }
    }
}

/// The name of the `i`th simulated node.
pub fn node_name(i: usize) -> String {
    format!("sim-{i:04}")
}

/// A node's pool size: the `i`th node has `i` GiB more than the one before it, so that "the node
/// with the most room" is always one node.
pub fn node_bytes(i: usize) -> u64 {
    (1 << 40) + i as u64 * GIB
}

/// The name of the `j`th volume a node holds at the start.
pub fn preloaded_name(node: usize, j: usize) -> String {
    format!("pvc-pre-{node:04}-{j:04}")
}

pub struct ScaleCluster {
    pub dir: tempfile::TempDir,
    controller: Child,
    pub socket: PathBuf,
    pub registry: std::net::SocketAddr,
    metrics: u16,
    ca: Authority,
    target: sim::Controller,
    pub nodes: Vec<Running>,
    options: Options,
}

/// Raises this process's open-file limit to its hard limit: a thousand agents and their
/// heartbeats hold three descriptors each, and the controller (a child) inherits the limit.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit RLIMIT_NOFILE");
    hard
}

impl ScaleCluster {
    /// Starts the controller, then every simulated node with its preloaded volumes, and waits
    /// until the controller counts them all available.
    pub async fn start(options: Options) -> ScaleCluster {
        let needed = 4 * options.nodes as u64 + 256;
        let limit = raise_open_files();
        assert!(
            limit >= needed,
            "the open-file limit ({limit}) is below the {needed} descriptors {} nodes need: raise the hard limit (ulimit -Hn)",
            options.nodes
        );
        let dir = tempfile::Builder::new()
            .prefix("cellar-scale-")
            .tempdir()
            .expect("tempdir");
        let ca = Authority::new("cellar scale CA");
        let controller_pair = ca.issue(&["localhost"]);
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir(&tls_dir).expect("tls dir");
        std::fs::write(tls_dir.join("ca.pem"), ca.pem()).expect("ca");
        std::fs::write(tls_dir.join("controller.pem"), &controller_pair.cert).expect("cert");
        std::fs::write(tls_dir.join("controller.key"), &controller_pair.key).expect("key");
        let registry: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let metrics = free_port();
        let socket = dir.path().join("csi.sock");
        let log = std::fs::File::create(dir.path().join("controller.log")).expect("log");
        let mut args: Vec<String> = vec![
            "controller".into(),
            format!("--endpoint=unix://{}", socket.display()),
            format!("--agent-listen={registry}"),
            format!("--data-dir={}", dir.path().join("data").display()),
            format!("--metrics-listen=127.0.0.1:{metrics}"),
            format!("--tls-ca={}", tls_dir.join("ca.pem").display()),
            format!("--tls-cert={}", tls_dir.join("controller.pem").display()),
            format!("--tls-key={}", tls_dir.join("controller.key").display()),
            "--require-node-certificates".into(),
            format!("--heartbeat-interval={}ms", options.heartbeat_interval.as_millis()),
            // Every simulated node connects from 127.0.0.1.
            "--max-connections-per-peer=0".into(),
        ];
        args.extend(options.controller_args.iter().cloned());
        let controller = Command::new(&options.bin)
            .args(&args)
            .env(
                "CELLAR_LOG",
                std::env::var("CELLAR_SCALE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", options.bin.display()));
        let mut c = ScaleCluster {
            dir,
            controller,
            socket,
            registry,
            metrics,
            ca,
            target: sim::Controller {
                registry,
                name: "localhost".into(),
            },
            nodes: Vec::new(),
            options: options.clone(),
        };
        c.wait_for_socket().await;
        for i in 0..options.nodes {
            let sim = SimNode::new(&node_name(i), node_bytes(i));
            for j in 0..options.volumes_per_node {
                sim.preload(&preloaded_name(i, j), options.volume_bytes);
            }
            c.add(sim).await;
        }
        c.wait_available(options.nodes).await;
        c
    }

    /// Starts one more simulated node (with a certificate of its own) and returns its index.
    pub async fn add(&mut self, sim: Arc<SimNode>) -> usize {
        let pair = self.ca.issue(&[&format!("{}.{AGENT_NAME}", sim.node().as_str())]);
        let tls = NodeTls {
            ca: self.ca.pem(),
            cert: pair.cert,
            key: pair.key,
        };
        let running = sim::start(sim, &tls, &self.target, self.options.heartbeat_interval).await;
        self.nodes.push(running);
        self.nodes.len() - 1
    }

    pub fn sim(&self, i: usize) -> &Arc<SimNode> {
        &self.nodes[i].sim
    }

    async fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(st) = self.controller.try_wait().expect("wait") {
                panic!("the controller exited during start-up: {st}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not open its socket\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most two minutes) until the controller's registry counts `n` available nodes.
    pub async fn wait_available(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (available, _) = self.registry_nodes().await;
            if available == n as u64 {
                return;
            }
            if let Some(st) = self.controller.try_wait().expect("wait") {
                panic!("the controller exited: {st}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{available} of {n} nodes registered\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The registry's node counts from the controller's /metrics: (available, unavailable).
    pub async fn registry_nodes(&self) -> (u64, u64) {
        let text = self.metrics_text().await;
        let count = |available: &str| {
            let prefix = format!("cellar_agent_registry_nodes{{available=\"{available}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (count("true"), count("false"))
    }

    async fn metrics_text(&self) -> String {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics)).await else {
            return String::new();
        };
        let req = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
        if s.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        body
    }

    pub async fn csi(&self) -> ControllerClient<Channel> {
        let ch = cellar::client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .expect("connect to the controller's socket");
        ControllerClient::new(ch).max_decoding_message_size(64 << 20)
    }

    pub fn controller_pid(&self) -> u32 {
        self.controller.id()
    }

    /// The controller's peak resident set (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.controller.id(), "VmHWM:")
    }

    /// The controller's resident set now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.controller.id(), "VmRSS:")
    }

    /// CPU time the controller has used so far (user and system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.controller.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
        // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
        let rest = &stat[stat.rfind(')').expect("(comm)") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100);
        ticks as f64 / per_second as f64
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

impl Drop for ScaleCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = self.controller.kill();
        let _ = self.controller.wait();
    }
}

/// A CreateVolume as external-provisioner sends it; `on` names the node the scheduler chose
/// (WaitForFirstConsumer), `None` leaves the choice to the controller.
pub fn create_request(name: &str, bytes: u64, on: Option<&str>) -> CreateVolumeRequest {
    let topology = |n: &str| Topology {
        segments: [(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), n.to_string())].into(),
    };
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        accessibility_requirements: on.map(|n| TopologyRequirement {
            requisite: vec![topology(n)],
            preferred: vec![topology(n)],
        }),
        ..Default::default()
    }
}

/// CreateVolume of `bytes` under `name` (`on`: the scheduler's node): the new volume's id.
pub async fn create(csi: &mut ControllerClient<Channel>, name: &str, bytes: u64, on: Option<&str>) -> String {
    let v = csi
        .create_volume(create_request(name, bytes, on))
        .await
        .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
        .into_inner()
        .volume
        .expect("a volume in the answer");
    v.volume_id
}

/// Every volume through ListVolumes, page by page (`page` entries each): (id, abnormal).
pub async fn list_all(csi: &mut ControllerClient<Channel>, page: i32) -> Result<Vec<(String, bool)>, tonic::Status> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let r = csi
            .list_volumes(ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await?
            .into_inner();
        for e in r.entries {
            let abnormal = e.status.and_then(|s| s.volume_condition).is_some_and(|c| c.abnormal);
            all.push((e.volume.map(|v| v.volume_id).unwrap_or_default(), abnormal));
        }
        if r.next_token.is_empty() {
            return Ok(all);
        }
        token = r.next_token;
    }
}

/// GetCapacity of the default pool over every node.
pub async fn capacity(csi: &mut ControllerClient<Channel>) -> Result<i64, tonic::Status> {
    let r = csi
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![],
            parameters: Default::default(),
            accessible_topology: None,
        })
        .await?;
    Ok(r.into_inner().available_capacity)
}
