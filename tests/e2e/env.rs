//! The multi-node environment of tests/e2e.rs (docs/e2e.md): a controller and N nodes, each a
//! separate `cellar` process in a network namespace of its own on a private bridge, each node with
//! its own data dir and its own kubelet mount namespace.
//!
//! Everything lives under one temporary directory `cellar-test-e2e-*`:
//!
//! ```text
//! ns/                 a private bind mount holding the namespace files:
//!   net-bridge          the bridge `br0`
//!   net-controller      eth0 10.213.0.2/24
//!   net-node-N          eth0 10.213.0.(10+N)/24
//!   mnt-node-N          node N's kubelet mount namespace
//! node-N/kubelet/     bind-mounted (rshared) on /var/lib/kubelet in node N's kubelet namespace;
//!                     the node's CSI socket is kubelet/plugins/cellar.csi.dev/csi.sock
//! node-N/data/        the node's --data-dir
//! controller/         the controller's data dir and CSI socket
//! hosts               bind-mounted on /etc/hosts in the kubelet namespaces: the controller's name
//! *.log               one log per process
//! ```
//!
//! The test process never dials the network: it reaches the drivers over their Unix sockets (files)
//! and runs anything that must use the network inside a namespace. Drop tears everything down, also
//! after a panic: processes by PID, every mount in every namespace, the namespace files, loop
//! devices, the blackhole route and the directory.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::node_client::NodeClient;
use cellar::csi::v1::{GetCapacityRequest, Topology};
use tonic::transport::Channel;

use crate::common::fs::{loops_under, TestFs};
use crate::common::{bin, kill_child, mounts_under, require_root};

/// The test network; its addresses exist only inside the environment's namespaces.
pub const SUBNET: &str = "10.213.0.0/24";
pub const CONTROLLER_ADDR: &str = "10.213.0.2";
/// The controller's name as nodes dial it (resolved through the namespaces' /etc/hosts); its
/// certificate carries it, as the chart's does for its Service.
pub const CONTROLLER_HOST: &str = "cellar-controller.cellar.svc";
pub const REGISTRY_PORT: u16 = 9820;
pub const AGENT_PORT: u16 = 9821;
pub const DRIVER: &str = "cellar.csi.dev";
pub const KUBELET: &str = "/var/lib/kubelet";
pub const TOPOLOGY_KEY: &str = "topology.cellar.csi.dev/node";
const TOOLS: &[&str] = &["ip", "unshare", "nsenter", "mount", "umount", "losetup", "sh"];
const START_LIMIT: Duration = Duration::from_secs(40);

pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

pub fn node_addr(i: usize) -> String {
    format!("10.213.0.{}", 11 + i)
}

pub fn topology(node: &str) -> Topology {
    Topology {
        segments: [(TOPOLOGY_KEY.to_string(), node.to_string())].into(),
    }
}

/// Where a node's pool lives.
#[derive(Clone, Copy)]
pub enum Pool {
    /// The default `dir` pool under the node's data dir.
    Default,
    /// A small loop-backed filesystem of its own (MiB): a node that fills up quickly.
    Small(u64),
    /// The default pool with the `image` layout: volumes are loop-attached ext4 files (or raw
    /// block devices), attached and mounted by the plugin inside its mount namespace.
    Image,
}

/// Fails loudly when this machine cannot build the environment.
fn require_tools() {
    require_root();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "the e2e environment needs {missing:?} on PATH (iproute2, util-linux, mount); .ci/run installs them"
    );
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not run: {e}"))
}

/// `nsenter` into a network and/or mount namespace, then `args`.
pub fn nsenter(net: Option<&Path>, mnt: Option<&Path>, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    if let Some(n) = net {
        c.arg(format!("--net={}", n.display()));
    }
    if let Some(m) = mnt {
        c.arg(format!("--mount={}", m.display()));
    }
    c.arg("--").args(args);
    c
}

/// What the host namespace holds while any environment of this process is up: the blackhole route
/// for the test range and, where the machine has none, an empty /var/lib/kubelet to mount over in
/// the kubelet namespaces. Counted, so the last environment down removes them.
struct HostState {
    users: usize,
    made_kubelet_dir: bool,
    /// Whether the machine had /var/lib/kubelet before the first environment (None: none yet).
    kubelet_dir_was_there: Option<bool>,
}

static HOST: Mutex<HostState> = Mutex::new(HostState {
    users: 0,
    made_kubelet_dir: false,
    kubelet_dir_was_there: None,
});

/// Held while making mounts or copying the mount table into a new namespace: a namespace made while
/// another environment mounts could keep a copy of that mount (and its filesystem) alive.
static MOUNTS: Mutex<()> = Mutex::new(());

/// Held shared by every environment for its life; taken exclusively, it waits until no environment
/// of this process is up and keeps new ones from starting (to look at what teardown left).
static UP: RwLock<()> = RwLock::new(());

pub fn none_up() -> RwLockWriteGuard<'static, ()> {
    UP.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn blackhole_present() -> bool {
    run(Command::new("ip").args(["route", "show", "type", "blackhole", SUBNET])).contains("10.213.0.0")
}

/// The number of environments up in this process and whether /var/lib/kubelet was there before
/// the first.
pub fn host_state() -> (usize, Option<bool>) {
    let h = lock(&HOST);
    (h.users, h.kubelet_dir_was_there)
}

fn host_acquire() {
    let mut h = lock(&HOST);
    if h.users == 0 {
        if !blackhole_present() {
            run(Command::new("ip").args(["route", "add", "blackhole", SUBNET]));
        }
        let there = Path::new(KUBELET).exists();
        h.kubelet_dir_was_there.get_or_insert(there);
        if !there {
            std::fs::create_dir_all(KUBELET).expect("mkdir /var/lib/kubelet");
            h.made_kubelet_dir = true;
        }
    }
    h.users += 1;
}

fn host_release(problems: &mut Vec<String>) {
    let mut h = lock(&HOST);
    h.users -= 1;
    if h.users > 0 {
        return;
    }
    let out = output(Command::new("ip").args(["route", "del", "blackhole", SUBNET]));
    if !out.status.success() {
        problems.push(format!("blackhole route: {}", String::from_utf8_lossy(&out.stderr)));
    }
    if std::mem::take(&mut h.made_kubelet_dir) {
        if let Err(e) = std::fs::remove_dir(KUBELET) {
            problems.push(format!("rmdir {KUBELET}: {e}"));
        }
    }
}

pub struct Node {
    pub name: String,
    pub addr: String,
    /// node-N/ under the environment's directory.
    pub root: PathBuf,
    pub net: PathBuf,
    /// The kubelet mount namespace.
    pub mnt: PathBuf,
    fs: Option<TestFs>,
    image: bool,
    /// The kubelet namespace exists (its file is bound).
    kubelet_ns: bool,
    child: Option<Child>,
}

impl Node {
    /// The private directory that is /var/lib/kubelet inside the node's kubelet namespace.
    pub fn kubelet_dir(&self) -> PathBuf {
        self.root.join("kubelet")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Where the node plugin sees its socket (as kubelet's plugin registration would).
    pub fn socket_in_ns(&self) -> String {
        format!("{KUBELET}/plugins/{DRIVER}/csi.sock")
    }

    /// The same socket through the host's view of the private directory.
    pub fn socket(&self) -> PathBuf {
        self.kubelet_dir().join(format!("plugins/{DRIVER}/csi.sock"))
    }

    /// A volume's directory on this node's disk (`dir` layout).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        match &self.fs {
            Some(fs) => fs.path(&format!("pool/volumes/{name}")),
            None => self.data_dir().join(format!("pools/default/volumes/{name}")),
        }
    }

    /// The node's pool configuration, where it is not the default.
    fn pool_config(&self) -> Option<String> {
        let pool = "pools:\n  - name: default\n";
        match (&self.fs, self.image) {
            (Some(fs), _) => Some(format!("{pool}    path: {}\n", fs.path("pool").display())),
            (None, true) => Some(format!("{pool}    layout: image\n")),
            (None, false) => None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    host: bool,
    ns_dir_bound: bool,
    /// Network namespace files, the bridge's first.
    nets: Vec<PathBuf>,
    controller: Option<Child>,
    pub nodes: Vec<Node>,
    /// Released after teardown (a field drops after `Drop::drop`).
    _up: RwLockReadGuard<'static, ()>,
}

impl Env {
    /// A controller and one node per entry of `pools`, registered and ready.
    pub async fn start(pools: &[Pool]) -> Env {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-e2e-")
            .tempdir()
            .expect("tempdir");
        // From here on, Drop undoes whatever was built, also when a step below panics.
        let mut env = Env {
            dir,
            host: false,
            ns_dir_bound: false,
            nets: Vec::new(),
            controller: None,
            nodes: Vec::new(),
            _up: UP.read().unwrap_or_else(|p| p.into_inner()),
        };
        host_acquire();
        env.host = true;
        crate::certs::write(env.dir.path(), &[CONTROLLER_HOST], &[crate::certs::AGENT_NAME]);
        std::fs::write(
            env.path("hosts"),
            format!("127.0.0.1 localhost\n{CONTROLLER_ADDR} {CONTROLLER_HOST}\n"),
        )
        .expect("hosts");
        env.network(pools.len());
        for (i, pool) in pools.iter().enumerate() {
            env.add_node(i, *pool);
        }
        env.start_controller();
        // The registry listens before the CSI socket opens: nodes started now register at their
        // first heartbeat instead of the next one, 5 s later.
        drop(channel(&env.controller_socket()).await);
        for i in 0..env.nodes.len() {
            env.start_node(i);
        }
        env.wait_registered().await;
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn ns_file(&self, name: &str) -> PathBuf {
        self.path(&format!("ns/{name}"))
    }

    /// The bridge and one namespace per host, joined by veth pairs; no default route anywhere.
    fn network(&mut self, nodes: usize) {
        {
            let _m = lock(&MOUNTS);
            std::fs::create_dir(self.path("ns")).expect("ns dir");
            let ns = self.path("ns");
            // A mount namespace can only be bound to a file on a private mount.
            run(Command::new("mount").arg("--bind").arg(&ns).arg(&ns));
            self.ns_dir_bound = true;
            run(Command::new("mount").arg("--make-private").arg(&ns));
            let hosts = ["bridge".to_string(), "controller".into()]
                .into_iter()
                .chain((0..nodes).map(node_name));
            for name in hosts {
                let f = self.ns_file(&format!("net-{name}"));
                File::create(&f).expect("ns file");
                self.nets.push(f.clone());
                run(Command::new("unshare")
                    .arg(format!("--net={}", f.display()))
                    .arg("true"));
            }
        }
        let bridge = self.nets[0].clone();
        let mut script = String::from("link set lo up\nlink add br0 type bridge\nlink set br0 up\n");
        for (i, net) in self.nets.iter().enumerate().skip(1) {
            let veth = format!("veth{i}");
            script += &format!(
                "link add {veth} type veth peer name eth0 netns {}\nlink set {veth} master br0 up\n",
                net.display()
            );
        }
        ip_batch(&bridge, &script);
        let addrs: Vec<String> = std::iter::once(CONTROLLER_ADDR.to_string())
            .chain((0..nodes).map(node_addr))
            .collect();
        for (net, addr) in self.nets[1..].iter().zip(addrs) {
            ip_batch(
                net,
                &format!("link set lo up\naddr add {addr}/24 dev eth0\nlink set eth0 up\n"),
            );
        }
    }

    /// Node `i`'s directories, its pool and its kubelet mount namespace: a private directory
    /// bind-mounted on /var/lib/kubelet and made rshared, the cluster's names in /etc/hosts, and
    /// none of the other tests' mounts (a copy would pin their filesystems).
    fn add_node(&mut self, i: usize, pool: Pool) {
        let name = node_name(i);
        let root = self.path(&name);
        std::fs::create_dir_all(root.join("kubelet")).expect("kubelet dir");
        let _m = lock(&MOUNTS);
        let fs = match pool {
            Pool::Default | Pool::Image => None,
            Pool::Small(mib) => Some(TestFs::new("ext4", mib)),
        };
        let mnt = self.ns_file(&format!("mnt-{name}"));
        File::create(&mnt).expect("ns file");
        let node = Node {
            name: name.clone(),
            addr: node_addr(i),
            root: root.clone(),
            net: self.nets[i + 2].clone(),
            mnt: mnt.clone(),
            fs,
            image: matches!(pool, Pool::Image),
            kubelet_ns: false,
            child: None,
        };
        let keep = node.fs.as_ref().map(|f| f.mnt.clone());
        self.nodes.push(node);
        let foreign: Vec<PathBuf> = test_mounts()
            .into_iter()
            .filter(|m| keep.as_ref().is_none_or(|k| !k.starts_with(m) && !m.starts_with(k)))
            .rev()
            .collect();
        let script = r#"set -e
k=$1 hosts=$2
shift 2
mount --bind "$k" /var/lib/kubelet
mount --make-private /var/lib/kubelet
mount --make-rshared /var/lib/kubelet
mount --bind "$hosts" /etc/hosts
for m in "$@"; do umount -l "$m" 2>/dev/null || :; done
"#;
        let out = output(
            Command::new("unshare")
                .arg(format!("--mount={}", mnt.display()))
                .args(["--propagation", "slave", "--", "sh", "-c", script, "sh"])
                .arg(root.join("kubelet"))
                .arg(self.path("hosts"))
                .args(&foreign),
        );
        let me = self.dir.path().display().to_string();
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let nested = std::fs::read_link("/proc/self/ns/mnt").ok() != std::fs::read_link("/proc/1/ns/mnt").ok();
        assert!(
            out.status.success(),
            "the kubelet namespace of {name}: {}{}\nmounts:\n{}",
            String::from_utf8_lossy(&out.stderr),
            if nested {
                "\n(this test runs in a nested mount namespace, where binding a new mount namespace's file \
                 is refused now and then with EINVAL: run it from the initial one, see docs/e2e.md)"
            } else {
                ""
            },
            table.lines().filter(|l| l.contains(&me)).collect::<Vec<_>>().join("\n")
        );
        self.nodes[i].kubelet_ns = true;
    }

    fn log(&self, name: &str) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))
            .expect("log")
    }

    fn tls_args(&self, role: crate::certs::Role) -> Vec<String> {
        crate::certs::args(self.dir.path(), role)
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Child {
        let log = self.log(name);
        writeln!(&log, "=== {cmd:?}").expect("log");
        cmd.env("CELLAR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn")
    }

    pub fn controller_socket(&self) -> PathBuf {
        self.path("controller/csi.sock")
    }

    /// `cellar controller` in the controller's network namespace (nsenter execs it: the child's PID
    /// is the driver's).
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "the controller runs already");
        let mut cmd = nsenter(Some(&self.nets[1]), None, &[]);
        cmd.arg(bin())
            .arg("controller")
            .arg(format!("--endpoint=unix://{}", self.controller_socket().display()))
            .arg(format!("--agent-listen={CONTROLLER_ADDR}:{REGISTRY_PORT}"))
            .arg(format!("--data-dir={}", self.path("controller/data").display()))
            .args(self.tls_args(crate::certs::Role::Controller));
        self.controller = Some(self.spawn("controller", cmd));
    }

    /// SIGKILL, as an evicted or crashed pod.
    pub fn kill_controller(&mut self) {
        kill_child(&mut self.controller);
    }

    /// `cellar node` in the node's network namespace and in a mount namespace cloned from its
    /// kubelet namespace with propagation unchanged (Bidirectional): its mounts appear there.
    pub fn start_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        assert!(n.child.is_none(), "{} runs already", n.name);
        std::fs::create_dir_all(n.socket().parent().expect("socket dir")).expect("plugin dir");
        let mut cmd = nsenter(
            Some(&n.net),
            Some(&n.mnt),
            &["unshare", "--mount", "--propagation", "unchanged", "--"],
        );
        cmd.arg(bin())
            .arg("node")
            .arg(format!("--endpoint=unix://{}", n.socket_in_ns()))
            .arg(format!("--node-id={}", n.name))
            .arg(format!("--data-dir={}", n.data_dir().display()))
            .arg(format!("--controller={CONTROLLER_HOST}:{REGISTRY_PORT}"))
            .arg(format!("--agent-listen={}:{AGENT_PORT}", n.addr))
            .arg(format!("--agent-advertise={}:{AGENT_PORT}", n.addr))
            .args(self.tls_args(crate::certs::Role::Node));
        if let Some(config) = n.pool_config() {
            let file = n.root.join("pools.yaml");
            std::fs::write(&file, config).expect("pool config");
            cmd.arg(format!("--config={}", file.display()));
        }
        let child = self.spawn(&n.name.clone(), cmd);
        self.nodes[i].child = Some(child);
    }

    /// SIGKILL the node plugin; the kubelet namespace and its mounts stay, as on a real node.
    pub fn kill_node(&mut self, i: usize) {
        kill_child(&mut self.nodes[i].child);
    }

    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    pub async fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(channel(&self.controller_socket()).await)
    }

    pub async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(channel(&self.nodes[i].socket()).await)
    }

    /// Waits until the controller reports capacity on every node: each has heartbeated.
    pub async fn wait_registered(&self) {
        let mut ctl = self.ctl().await;
        let deadline = Instant::now() + START_LIMIT;
        for n in &self.nodes {
            loop {
                let got = capacity_on(&mut ctl, &n.name).await;
                if matches!(got, Ok(b) if b > 0) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} never registered ({got:?})\n{}",
                    n.name,
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// A command run in node `i`'s kubelet mount namespace (as kubelet itself).
    pub fn in_kubelet(&self, i: usize, args: &[&str]) -> Command {
        nsenter(None, Some(&self.nodes[i].mnt), args)
    }

    /// Mount points in node `i`'s kubelet namespace below /var/lib/kubelet (not that mount itself).
    pub fn kubelet_mounts(&self, i: usize) -> Vec<PathBuf> {
        let table = run(&mut self.in_kubelet(i, &["cat", "/proc/self/mountinfo"]));
        cellar::sys::mountinfo::parse(&table)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(KUBELET) && p != Path::new(KUBELET))
            .collect()
    }

    /// A pod on node `i`: a shell in a mount namespace cloned from the kubelet's with propagation
    /// slave (HostToContainer), running `script` with `args` as $1, $2... Its output; panics if
    /// it fails.
    pub fn workload(&self, i: usize, script: &str, args: &[&str]) -> String {
        let mut argv = vec![
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            "sh",
            "-ec",
            script,
            "pod",
        ];
        argv.extend(args);
        run(&mut self.in_kubelet(i, &argv))
    }

    /// A thread whose network namespace is host `net`'s (e.g. `&env.nodes[2].net`), running `f` on
    /// a runtime of its own: a client on the cluster network, while the test process stays off it.
    pub fn on_host<T: Send + 'static>(
        net: &Path,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        let ns = File::open(net).expect("netns file");
        let t = std::thread::spawn(move || {
            // SAFETY: setns on a valid descriptor changes only this thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        });
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Everything the environment holds that teardown must remove, for tests of teardown itself.
    pub fn footprint(&self) -> Footprint {
        let mut namespaces = BTreeSet::new();
        for f in self.nets.iter().chain(self.nodes.iter().map(|n| &n.mnt)) {
            namespaces.insert(std::os::unix::fs::MetadataExt::ino(
                &std::fs::metadata(f).expect("ns file"),
            ));
        }
        Footprint {
            dirs: std::iter::once(self.dir.path().to_path_buf())
                .chain(
                    self.nodes
                        .iter()
                        .filter_map(|n| n.fs.as_ref().map(|f| f.dir.path().to_path_buf())),
                )
                .collect(),
            pids: self
                .nodes
                .iter()
                .filter_map(Node::pid)
                .chain(self.controller_pid())
                .collect(),
            namespaces,
        }
    }
}

/// What an environment held; `Footprint::leftovers` says what of it still exists.
#[derive(Debug, Clone)]
pub struct Footprint {
    /// The environment's directory and its pools' filesystems' directories.
    pub dirs: Vec<PathBuf>,
    pub pids: Vec<u32>,
    /// Inode numbers of its namespaces (as /proc/PID/ns/* links show them).
    pub namespaces: BTreeSet<u64>,
}

impl Footprint {
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for d in self.dirs.iter().filter(|d| d.exists()) {
            left.push(format!("directory {}", d.display()));
        }
        for pid in &self.pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                left.push(format!("process {pid}"));
            }
        }
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let p = e.path();
            if !p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            for kind in ["net", "mnt"] {
                if let Ok(link) = std::fs::read_link(p.join(format!("ns/{kind}"))) {
                    let ino = link
                        .to_string_lossy()
                        .trim_start_matches(&format!("{kind}:["))
                        .trim_end_matches(']')
                        .parse::<u64>();
                    if ino.is_ok_and(|i| self.namespaces.contains(&i)) {
                        left.push(format!("{} is in {kind} namespace {link:?}", p.display()));
                    }
                }
            }
            if let Ok(table) = std::fs::read_to_string(p.join("mountinfo")) {
                for line in table.lines().filter(|l| dirs.iter().any(|d| l.contains(d.as_str()))) {
                    left.push(format!("a mount seen by {}: {line}", p.display()));
                }
            }
        }
        for d in &self.dirs {
            left.extend(loops_under(d));
        }
        left
    }
}

/// Mount points of test fixtures (`<tmp>/cellar-*`) in this namespace, outermost first.
fn test_mounts() -> Vec<PathBuf> {
    let tmp = std::env::temp_dir();
    let mut v: Vec<PathBuf> = mounts_under(&tmp)
        .into_iter()
        .filter(|m| {
            m.strip_prefix(&tmp)
                .ok()
                .and_then(|r| r.components().next())
                .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with("cellar-"))
        })
        .collect();
    v.sort();
    v
}

/// Runs `script` (one `ip` command a line) in network namespace `net`.
fn ip_batch(net: &Path, script: &str) {
    let file = net.with_extension("ip");
    std::fs::write(&file, script).expect("ip script");
    run(nsenter(Some(net), None, &["ip", "-batch"]).arg(file));
}

/// GetCapacity for the default pool on node `node`, as external-provisioner asks per topology.
pub async fn capacity_on(ctl: &mut ControllerClient<Channel>, node: &str) -> Result<i64, tonic::Status> {
    ctl.get_capacity(GetCapacityRequest {
        accessible_topology: Some(topology(node)),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().available_capacity)
}

async fn channel(socket: &Path) -> Channel {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if socket.exists() {
            if let Ok(ch) = cellar::client::connect(&format!("unix://{}", socket.display())).await {
                return ch;
            }
        }
        assert!(Instant::now() < deadline, "nothing serves {}", socket.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Env {
    /// Tears down in order, collecting what could not be undone instead of stopping at it.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        self.kill_controller();
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        for n in self.nodes.iter().filter(|n| n.kubelet_ns) {
            // kubelet's mounts (what the plugin staged and published), then the namespace's own.
            let _ = output(&mut nsenter(
                None,
                Some(&n.mnt),
                &["sh", "-c", "umount -R /var/lib/kubelet; umount /etc/hosts"],
            ));
            let table = output(&mut nsenter(None, Some(&n.mnt), &["cat", "/proc/self/mountinfo"]));
            let left: Vec<PathBuf> = cellar::sys::mountinfo::parse(&String::from_utf8_lossy(&table.stdout))
                .into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.starts_with(KUBELET) || p == Path::new("/etc/hosts"))
                .collect();
            if !left.is_empty() {
                problems.push(format!("{}'s kubelet namespace keeps {left:?}", n.name));
            }
        }
        let _m = lock(&MOUNTS);
        for f in self.nets.iter().chain(self.nodes.iter().map(|n| &n.mnt)) {
            let _ = nix::mount::umount2(f, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(f);
        }
        if std::mem::take(&mut self.ns_dir_bound) {
            if let Err(e) = nix::mount::umount2(&self.path("ns"), nix::mount::MntFlags::MNT_DETACH) {
                problems.push(format!("umount ns dir: {e}"));
            }
        }
        // Image volumes left attached by a plugin killed mid-test.
        for l in loops_under(self.dir.path()) {
            let dev = l.split(' ').next().unwrap_or_default().to_string();
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        let left = mounts_under(self.dir.path());
        for m in left.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        if !left.is_empty() {
            problems.push(format!("mounts left in the host namespace: {left:?}"));
        }
        drop(_m);
        // The pools' filesystems, now that no namespace holds them.
        for n in &mut self.nodes {
            n.fs = None;
        }
        if std::mem::take(&mut self.host) {
            host_release(&mut problems);
        }
        problems
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "e2e environment {} at the failure:\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
        let problems = self.teardown();
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("e2e teardown left things behind: {problems:#?}");
        }
    }
}
