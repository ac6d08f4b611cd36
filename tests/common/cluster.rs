//! The one multi-node launcher on loopback: a real `cellar controller` and one real `cellar node`
//! per entry of [`Spec::pools`], each with its own data directory, socket, agent port and log, over
//! mutual TLS with the chart's certificates ([`super::certs`]) or `--insecure`. (The namespaced
//! environment of tests/e2e builds on the same certificate helper.)
//!
//! On drop every process is killed, loop devices over files below the test's directory are
//! detached and every mount below it is removed; a mount other than a node's share that the test
//! left behind fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::node_client::NodeClient;
use cellar::csi::v1::{CreateVolumeRequest, GetCapacityRequest, Topology, TopologyRequirement};
use tonic::transport::Channel;

use super::{bin, connect_socket, kill_child, mounts_under, require_root};

/// What to start.
#[derive(Default, Clone)]
pub struct Spec {
    /// One entry per node (node-1, node-2, ...): the path of its default pool (None: below its data dir).
    pub pools: Vec<Option<PathBuf>>,
    /// The layouts every node's default pool allows (None: the default, dir).
    pub layouts: Option<&'static str>,
    /// A pools.yaml given to every process (the controller too), e.g. with a shared pool; it takes
    /// the place of the per-node default pool above.
    pub config: Option<String>,
    /// Flags the controller gets besides the usual ones.
    pub controller_args: Vec<String>,
    /// Flags every node gets besides the usual ones.
    pub node_args: Vec<String>,
    /// Run without TLS (`--insecure`) instead of with the chart's certificates.
    pub insecure: bool,
    /// A `repositories:` section (YAML, from that key on) added to every node's pools.yaml and
    /// given to the controller in a config of its own (with the per-node pools, not with `config`).
    pub repositories: Option<String>,
    /// A command every node runs under (its program and arguments, before the `cellar` binary),
    /// e.g. `unshare --pid --fork --kill-child`: the node then is process 1 of its own process
    /// namespace, as in a container, and every process it started dies when it exits.
    pub node_wrapper: Vec<String>,
}

impl Spec {
    /// A controller and one node per entry; an entry names the node's pool path (None: the default).
    pub fn nodes(pools: Vec<Option<PathBuf>>) -> Spec {
        Spec {
            pools,
            ..Spec::default()
        }
    }
}

pub use super::ports::free_port;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub spec: Spec,
    pub registry: u16,
    pub metrics: u16,
    pub controller: Option<Child>,
    /// Each node's name, process and agent port.
    pub nodes: Vec<(String, Option<Child>, u16)>,
    /// Each node's metrics port.
    pub node_metrics: Vec<u16>,
}

impl Cluster {
    /// Starts the controller and the nodes, and waits until every node has registered.
    pub async fn start(spec: Spec) -> Cluster {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-")
            .tempdir()
            .expect("tempdir");
        if !spec.insecure {
            super::certs::Authority::new("cellar test CA").write(
                dir.path(),
                &[("controller", &["localhost"]), ("node", &["cellar-agent"])],
            );
        }
        if let Some(yaml) = &spec.config {
            std::fs::write(dir.path().join("pools.yaml"), yaml).expect("config");
        }
        let n = spec.pools.len();
        let mut c = Cluster {
            dir,
            spec,
            registry: free_port(),
            metrics: free_port(),
            controller: None,
            nodes: Vec::new(),
            node_metrics: Vec::new(),
        };
        c.start_controller();
        for i in 0..n {
            c.nodes.push((format!("node-{}", i + 1), None, free_port()));
            c.node_metrics.push(free_port());
            c.start_node(i);
        }
        c.wait_registered().await;
        c
    }

    /// The TLS flags of a `role` ("controller" or "node"), or `--insecure`.
    fn tls_args(&self, role: &str) -> Vec<String> {
        if self.spec.insecure {
            return vec!["--insecure".into()];
        }
        let d = self.dir.path();
        vec![
            "--tls-ca".into(),
            d.join("ca.pem").display().to_string(),
            "--tls-cert".into(),
            d.join(format!("{role}.pem")).display().to_string(),
            "--tls-key".into(),
            d.join(format!("{role}.key")).display().to_string(),
        ]
    }

    fn spawn(&self, name: &str, args: Vec<String>, envs: &[(&str, &str)]) -> Child {
        spawn_logged(&self.dir.path().join(format!("{name}.log")), args, envs)
    }

    /// The `--config` flag of every process, when the spec gives one config to all.
    fn shared_config(&self) -> Vec<String> {
        match self.spec.config {
            Some(_) => vec![
                "--config".into(),
                self.dir.path().join("pools.yaml").display().to_string(),
            ],
            None => vec![],
        }
    }

    /// The controller's `--config`: the shared config, or one holding the repositories (its pool
    /// is the default one, local, which a controller does not open).
    fn controller_config(&self) -> Vec<String> {
        match (&self.spec.config, &self.spec.repositories) {
            (Some(_), Some(_)) => panic!("Spec: put the repositories in the shared config"),
            (None, Some(repos)) => {
                let cfg = self.dir.path().join("controller-pools.yaml");
                std::fs::write(&cfg, format!("pools:\n  - name: default\n{repos}")).expect("config");
                vec!["--config".into(), cfg.display().to_string()]
            }
            _ => self.shared_config(),
        }
    }

    pub fn start_controller(&mut self) {
        self.start_controller_with(&[]);
    }

    /// Starts the controller with extra environment, such as a crash point.
    pub fn start_controller_with(&mut self, envs: &[(&str, &str)]) {
        let d = self.dir.path();
        let mut args = vec![
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", d.join("controller.sock").display()),
            "--agent-listen".into(),
            format!("127.0.0.1:{}", self.registry),
            "--data-dir".into(),
            d.join("controller").display().to_string(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", self.metrics),
        ];
        args.extend(self.controller_config());
        args.extend(self.tls_args("controller"));
        args.extend(self.spec.controller_args.iter().cloned());
        self.controller = Some(self.spawn("controller", args, envs));
    }

    pub fn start_node(&mut self, i: usize) {
        self.start_node_with(i, &[]);
    }

    /// Starts node `i` with extra environment, such as a crash point.
    pub fn start_node_with(&mut self, i: usize, envs: &[(&str, &str)]) {
        let d = self.dir.path().to_path_buf();
        let (name, port) = (self.nodes[i].0.clone(), self.nodes[i].2);
        let data = d.join(&name);
        let mut args = vec![
            "node".into(),
            "--endpoint".into(),
            format!("unix://{}", d.join(format!("{name}.sock")).display()),
            "--node-id".into(),
            name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--controller".into(),
            format!("localhost:{}", self.registry),
            "--agent-listen".into(),
            format!("127.0.0.1:{port}"),
            "--agent-advertise".into(),
            format!("127.0.0.1:{port}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", self.node_metrics[i]),
        ];
        if self.spec.config.is_some() {
            args.extend(self.shared_config());
        } else if self.spec.pools[i].is_some() || self.spec.layouts.is_some() || self.spec.repositories.is_some() {
            let mut yaml = "pools:\n  - name: default\n".to_string();
            if let Some(pool) = &self.spec.pools[i] {
                yaml += &format!("    path: {}\n", pool.display());
            }
            if let Some(layouts) = self.spec.layouts {
                yaml += &format!("    layouts: [{layouts}]\n");
            }
            if let Some(repos) = &self.spec.repositories {
                yaml += repos;
            }
            let cfg = d.join(format!("{name}-pools.yaml"));
            std::fs::write(&cfg, yaml).expect("config");
            args.extend(["--config".into(), cfg.display().to_string()]);
        }
        args.extend(self.tls_args("node"));
        args.extend(self.spec.node_args.iter().cloned());
        let child = match self.spec.node_wrapper.split_first() {
            None => self.spawn(&name, args, envs),
            Some((program, wrapper)) => {
                let mut all = wrapper.to_vec();
                all.push(super::bin().display().to_string());
                all.extend(args);
                let mut envs = envs.to_vec();
                envs.insert(0, ("CELLAR_LOG", "info"));
                let log = self.dir.path().join(format!("{name}.log"));
                spawn_program_logged(Path::new(program), &log, all, &envs)
            }
        };
        self.nodes[i].1 = Some(child);
    }

    /// SIGKILL a node process: its mounts and loop devices stay, as they would on a machine whose
    /// driver died.
    pub fn kill_node(&mut self, i: usize) {
        kill_child(&mut self.nodes[i].1);
    }

    pub fn kill_controller(&mut self) {
        kill_child(&mut self.controller);
    }

    pub async fn channel(&self, sock: &str) -> Channel {
        connect_socket(&self.dir.path().join(sock)).await
    }

    pub async fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel("controller.sock").await)
    }

    pub async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(self.channel(&format!("{}.sock", self.nodes[i].0)).await)
    }

    /// Waits until the controller reports capacity for every node (each has heartbeated).
    pub async fn wait_registered(&self) {
        for i in 0..self.nodes.len() {
            self.wait_node_registered(i).await;
        }
    }

    /// Waits until the controller reports capacity for node `i`: it has heartbeated, and its agent
    /// answered the controller (GetCapacity about one node asks it live).
    pub async fn wait_node_registered(&self, i: usize) {
        let name = &self.nodes[i].0;
        let mut ctl = self.ctl().await;
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let r = ctl
                .get_capacity(capacity_on(name))
                .await
                .map(|r| r.into_inner().available_capacity);
            if matches!(r, Ok(n) if n > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not register: {r:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where node `i` keeps its default pool's volumes.
    pub fn pool_dir(&self, i: usize) -> PathBuf {
        self.spec.pools[i]
            .clone()
            .unwrap_or_else(|| self.dir.path().join(&self.nodes[i].0).join("pools/default"))
    }

    /// The shared pool `pool` as node `i` mounted it.
    pub fn share_of(&self, i: usize, pool: &str) -> PathBuf {
        self.dir.path().join(&self.nodes[i].0).join("shares").join(pool)
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].0))).unwrap_or_default()
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                s += &format!(
                    "--- {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        s
    }
}

/// Starts the `cellar` binary with `args` and extra environment, its output appended to `log`.
pub fn spawn_logged(log: &Path, args: Vec<String>, envs: &[(&str, &str)]) -> Child {
    let mut envs = envs.to_vec();
    envs.insert(0, ("CELLAR_LOG", "info"));
    spawn_program_logged(&bin(), log, args, &envs)
}

/// Starts `program` (a helper server such as [`super::s3`]'s) with `args` and extra environment,
/// its output appended to `log`.
pub fn spawn_program_logged(program: &Path, log: &Path, args: Vec<String>, envs: &[(&str, &str)]) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()))
}

pub fn node_topology(node: &str) -> Topology {
    Topology {
        segments: [("topology.cellar.csi.dev/node".to_string(), node.to_string())].into(),
    }
}

/// A CreateVolume as external-provisioner sends it under WaitForFirstConsumer: the selected node
/// preferred, every node requisite.
pub fn wffc(name: &str, bytes: i64, selected: &str, all: &[&str]) -> CreateVolumeRequest {
    let mut r = super::create_req(name, bytes);
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: all.iter().map(|n| node_topology(n)).collect(),
        preferred: vec![node_topology(selected)],
    });
    r
}

pub fn capacity_on(node: &str) -> GetCapacityRequest {
    GetCapacityRequest {
        accessible_topology: Some(node_topology(node)),
        ..Default::default()
    }
}

/// Whether `m` is a node's mount of a shared pool (which stays after a SIGKILL, by design).
fn is_share(dir: &Path, m: &Path) -> bool {
    m.strip_prefix(dir)
        .ok()
        .and_then(|rel| rel.components().nth(1))
        .is_some_and(|c| c.as_os_str() == "shares")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_controller();
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        let dir = self.dir.path().to_path_buf();
        let left = mounts_under(&dir);
        let (_, stray): (Vec<&PathBuf>, Vec<&PathBuf>) = left.iter().partition(|m| is_share(&dir, m));
        let stray: Vec<PathBuf> = stray.into_iter().cloned().collect();
        // Mounts of what lives on a share first (they hold loop devices over its files), the shares last.
        for m in stray.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "losetup -l -n -O NAME,BACK-FILE | awk -v p='{}/' 'index($2, p) == 1 {{print $1}}' | xargs -r -n1 losetup -d",
                dir.display()
            ))
            .status();
        for m in mounts_under(&dir).iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        if !stray.is_empty() && !std::thread::panicking() {
            panic!("the test left mounts behind: {stray:?}");
        }
    }
}
