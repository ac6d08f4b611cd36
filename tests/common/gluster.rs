//! A real network filesystem for a test: a private GlusterFS server (glusterd and one brick
//! process) on a loopback address of its own, one volume with one brick, and any number of FUSE
//! client mounts standing for nodes. Everything lives in one temporary directory; drop unmounts
//! every client, kills every process of the fixture by PID and removes the directory, also when the
//! test panicked.
//!
//! Concurrent fixtures (tests run in parallel, other test processes on the machine) each take a
//! slot: an abstract unix socket name held for the fixture's life. Slot `n` listens on
//! `127.0.0.{n + 2}` (the first is `127.0.0.2`) with brick ports in a range of its own. Nothing
//! listens on or dials anything but 127.0.0.0/8.
//!
//! Start-up speed: on every start glusterd configures geo-replication by running its Python helper
//! `gsyncd` again and again, ~1.2 s here. The fixture starts glusterd in a private mount namespace in
//! which a stub that answers at once is bind-mounted over `gsyncd` (the host keeps the real one).
//! That namespace is a copy of the test's mounts, so before glusterd starts the fixture detaches
//! in it every mount glusterd does not need: a copy would keep other tests' filesystems (loop
//! devices, FUSE connections) alive after they unmount them. Where `unshare` is not permitted,
//! glusterd runs in the test's namespace and start-up is ~1.2 s slower.
//!
//! The volume is created with `performance.stat-prefetch off` (and `quick-read`, `open-behind`
//! off): with the default metadata cache another client sees a renamed or deleted name for up to
//! a second even with the kernel timeouts at zero.

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The volume's name; the mount source is `<address>:/cellar`.
pub const VOLUME: &str = "cellar";
const OPTIONS: &str = "entry-timeout=0,attribute-timeout=0,negative-timeout=0";
const GLUSTERD_PORT: u16 = 24007;
const SLOTS: u16 = 64;
const PORTS_PER_SLOT: u16 = 100;
const FIRST_BRICK_PORT: u16 = 49152;
/// Client-side caches that serve another client's stale names or data; off on the test volume.
const VOLUME_SETTINGS: &[(&str, &str)] = &[
    ("performance.stat-prefetch", "off"),
    ("performance.quick-read", "off"),
    ("performance.open-behind", "off"),
];
const CLI_LIMIT: Duration = Duration::from_secs(60);
const MOUNT_LIMIT: Duration = Duration::from_secs(30);
const USABLE_LIMIT: Duration = Duration::from_secs(30);
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// Runs in the private namespace: stub over gsyncd, detach the mounts glusterd does not need,
/// then become glusterd (same PID). `$KEEP` lists mount points to keep, one a line.
const NS_SCRIPT: &str = r#"stub=$1 gsyncd=$2
shift 2
[ -e "$gsyncd" ] && mount --bind "$stub" "$gsyncd" 2>/dev/null
nl='
'
awk '{print $5}' /proc/self/mountinfo | sort -r | while IFS= read -r m; do
  case $m in *\\*) m=$(printf '%b' "$(printf '%s' "$m" | sed 's/\\\([0-7][0-7][0-7]\)/\\0\1/g')") ;; esac
  case $m in /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  [ "$m" = "$gsyncd" ] && continue
  case "$nl$KEEP$nl" in *"$nl$m$nl"*) continue ;; esac
  umount -l -- "$m" 2>/dev/null || :
done
exec "$@"
"#;

const GSYNCD_STUB: &str = "#!/bin/sh\n\
# The cellar test fixture does not use geo-replication: answer glusterd's set-up calls at once.\n\
[ \"$1\" = --version ] && echo \"gsyncd.py (cellar test stub)\"\n\
exit 0\n";

pub struct Gluster {
    tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    addr: String,
    slot: u16,
    state: Mutex<State>,
    seq: AtomicUsize,
    /// Held for the fixture's life: the slot (address and ports) is ours while it is bound.
    _slot_lock: UnixListener,
}

struct State {
    glusterd: Option<Child>,
    running: bool,
    /// The brick's socket for glusterd, which glusterd always puts in /var/run/gluster.
    brick_socket: Option<PathBuf>,
    mounts: Vec<PathBuf>,
}

struct Tools {
    glusterd: PathBuf,
    gluster: PathBuf,
    mount: PathBuf,
    unshare: PathBuf,
    /// glusterd's libexec directory, where it looks for gsyncd.
    libexec: PathBuf,
    /// `unshare --mount` works here (the fast start-up).
    private_ns: bool,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let glusterd = find_tool("glusterd", "glusterfs-server");
        find_tool("glusterfsd", "glusterfs-server (glusterfs-common)");
        let gluster = find_tool("gluster", "glusterfs-server (glusterfs-cli)");
        find_tool("glusterfs", "glusterfs-client");
        find_tool("mount.glusterfs", "glusterfs-client");
        let mount = find_tool("mount", "mount (util-linux)");
        let unshare = find_tool("unshare", "util-linux");
        let out = Command::new(&glusterd)
            .arg("--print-libexecdir")
            .output()
            .unwrap_or_else(|e| panic!("{} does not run ({e}): reinstall glusterfs-server", glusterd.display()));
        let libexec = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let private_ns = Command::new(&unshare)
            .args(["--mount", "--propagation", "private", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        Tools {
            glusterd,
            gluster,
            mount,
            unshare,
            libexec,
            private_ns,
        }
    })
}

/// An executable on PATH or in the sbin directories (tests may run with a user's PATH).
fn find_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return p;
            }
        }
    }
    panic!(
        "`{name}` is missing: the GlusterFS tests need the Debian package {package} \
         (CI installs glusterfs-server and glusterfs-client in .ci/run; locally: \
         apt-get install -y glusterfs-server glusterfs-client)"
    );
}

/// Takes the first free slot: its abstract-socket lock, and an address whose glusterd port is free
/// (a fixture leaked by a killed test process keeps its address).
fn take_slot() -> (u16, UnixListener) {
    for slot in 0..SLOTS {
        let name = format!("cellar-test-gluster-slot-{slot}");
        let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
            continue;
        };
        let Ok(lock) = UnixListener::bind_addr(&addr) else {
            continue;
        };
        if std::net::TcpListener::bind((slot_addr(slot).as_str(), GLUSTERD_PORT)).is_ok() {
            return (slot, lock);
        }
    }
    panic!("no free GlusterFS test slot among {SLOTS} (127.0.0.2..): leaked glusterd processes?");
}

fn slot_addr(slot: u16) -> String {
    format!("127.0.0.{}", slot + 2)
}

impl Gluster {
    /// Starts glusterd (own working directory, volfile, pid and log files, socket, listen
    /// address) and a volume `cellar` with one brick in a private temporary directory, and waits
    /// until a client can mount it. Panics naming the package when GlusterFS is not installed.
    pub fn start() -> Gluster {
        super::require_root();
        let tools = tools();
        let tmp = tempfile::Builder::new()
            .prefix("cellar-fs-gluster-")
            .tempdir()
            .expect("fixture tempdir");
        let dir = tmp.path().to_path_buf();
        for sub in ["wd", "run", "log", "brick", "mnt"] {
            std::fs::create_dir_all(dir.join(sub)).expect("fixture directory");
        }
        let (slot, lock) = take_slot();
        let g = Gluster {
            tmp: Some(tmp),
            dir,
            addr: slot_addr(slot),
            slot,
            state: Mutex::new(State {
                glusterd: None,
                running: false,
                brick_socket: None,
                mounts: Vec::new(),
            }),
            seq: AtomicUsize::new(0),
            _slot_lock: lock,
        };
        // From here on a panic drops `g`, which cleans up whatever was started.
        g.write_config(tools);
        g.spawn_glusterd(tools);
        let brick = format!("{}:{}", g.addr, g.dir.join("brick").display());
        g.cli(&["volume", "create", VOLUME, &brick, "force"]);
        let mut set = vec!["volume", "set", VOLUME];
        for (k, v) in VOLUME_SETTINGS {
            set.extend([*k, *v]);
        }
        g.cli(&set);
        g.cli(&["volume", "start", VOLUME]);
        g.wait_usable();
        g
    }

    /// The mount source, e.g. `127.0.0.2:/cellar`; the filesystem type is `glusterfs`.
    pub fn source(&self) -> String {
        format!("{}:/{VOLUME}", self.addr)
    }

    /// The filesystem type for `mount -t`.
    pub fn fs_type(&self) -> &'static str {
        "glusterfs"
    }

    /// Mount options so that names (create, rename, delete) are seen at once by other clients:
    /// the kernel's entry, attribute and negative-entry caches off. Data rewritten in place with
    /// the same size can still be read stale from another client's page cache; add
    /// `direct-io-mode=enable` where a test needs that too (see `mount_with`).
    pub fn options(&self) -> &'static str {
        OPTIONS
    }

    /// The fixture's private directory (brick, state, logs and client mount points live in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loopback address glusterd and the brick listen on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Mounts the volume, or `sub` (relative, created if missing), at a new directory under the
    /// fixture's directory with `options()`. Every call is its own client (a node).
    pub fn mount(&self, sub: Option<&str>) -> PathBuf {
        self.mount_with(sub, "")
    }

    /// As `mount`, with extra mount options appended (e.g. `direct-io-mode=enable`).
    pub fn mount_with(&self, sub: Option<&str>, extra: &str) -> PathBuf {
        assert!(
            self.state().running,
            "Gluster::mount while the server is stopped (restart_server first)"
        );
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let at = self.dir.join("mnt").join(n.to_string());
        std::fs::create_dir_all(&at).expect("mount point");
        let mut spec = self.source();
        if let Some(sub) = sub {
            let rel = Path::new(sub);
            assert!(
                !sub.is_empty() && rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "Gluster::mount: sub-directory must be relative without `..`: {sub:?}"
            );
            // Create it through a client, never in the brick behind gluster's back.
            self.mount_at(&self.source(), &at, "", &format!("client-{n}-mkdir"))
                .unwrap_or_else(|e| panic!("mounting {} to create {sub}: {e}", self.source()));
            let made = std::fs::create_dir_all(at.join(rel));
            unmount(&at);
            made.unwrap_or_else(|e| panic!("creating {sub} on the volume: {e}"));
            spec = format!("{spec}/{}", sub.trim_end_matches('/'));
        }
        self.mount_at(&spec, &at, extra, &format!("client-{n}"))
            .unwrap_or_else(|e| panic!("mounting {spec} at {}: {e}", at.display()));
        self.state().mounts.push(at.clone());
        at
    }

    /// Unmounts one of this fixture's client mounts (a node going away).
    pub fn unmount(&self, mnt: &Path) {
        unmount(mnt);
        self.state().mounts.retain(|m| m != mnt);
    }

    /// Kills glusterd and the brick process (SIGKILL, as a crashed or powered-off server) and waits
    /// until they are gone. Client mounts stay: their I/O then fails with ENOTCONN at once.
    pub fn stop_server(&self) {
        let mut st = self.state();
        self.kill_server(&mut st);
    }

    /// Starts the server again on the same volume and brick (stopping it first if it runs) and waits
    /// until a new client can mount it. Existing client mounts reconnect by themselves, ~2.5 s
    /// later (their reconnect timer is 3 s). Data a client wrote but had not yet flushed
    /// (write-behind) when the server died can be lost although the write returned success.
    pub fn restart_server(&self) {
        let mut st = self.state();
        self.kill_server(&mut st);
        drop(st);
        let _ = std::fs::remove_file(self.dir.join("run/glusterd.pid"));
        for pidfile in self.brick_pidfiles() {
            let _ = std::fs::remove_file(pidfile);
        }
        self.spawn_glusterd(tools());
        self.wait_usable();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_config(&self, tools: &Tools) {
        let d = &self.dir;
        let base = FIRST_BRICK_PORT + self.slot * PORTS_PER_SLOT;
        let vol = format!(
            "volume management\n\
             \x20   type mgmt/glusterd\n\
             \x20   option working-directory {wd}\n\
             \x20   option run-directory {run}\n\
             \x20   option logging-directory {log}\n\
             \x20   option glusterd-sockfile {sock}\n\
             \x20   option transport-type socket\n\
             \x20   option transport.socket.bind-address {addr}\n\
             \x20   option transport.socket.listen-port {GLUSTERD_PORT}\n\
             \x20   option ping-timeout 0\n\
             \x20   option event-threads 1\n\
             \x20   option base-port {base}\n\
             \x20   option max-port {max}\n\
             end-volume\n",
            wd = d.join("wd").display(),
            run = d.join("run").display(),
            log = d.join("log").display(),
            sock = self.socket().display(),
            addr = self.addr,
            max = base + PORTS_PER_SLOT - 1,
        );
        std::fs::write(d.join("glusterd.vol"), vol).expect("glusterd volfile");
        let stub = d.join("gsyncd-stub");
        std::fs::write(&stub, GSYNCD_STUB).expect("gsyncd stub");
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Mount points glusterd and the brick need in their namespace: the ancestors of the paths
        // they use. Everything else is detached there.
        let needed: Vec<PathBuf> = [
            d.clone(),
            tools.libexec.clone(),
            tools.glusterd.clone(),
            PathBuf::from("/usr/lib"),
            PathBuf::from("/etc"),
            PathBuf::from("/var/run/gluster"),
            PathBuf::from("/var/lib/glusterd"),
            PathBuf::from("/var/log/glusterfs"),
        ]
        .into_iter()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect();
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mut keep: Vec<String> = cellar::sys::mountinfo::parse(&table)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|mp| needed.iter().any(|p| p.starts_with(mp)))
            .map(|mp| mp.display().to_string())
            .collect();
        keep.sort();
        keep.dedup();
        std::fs::write(d.join("ns-keep"), keep.join("\n")).expect("keep list");
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/glusterd.sock")
    }

    fn spawn_glusterd(&self, tools: &Tools) {
        let d = &self.dir;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("log/glusterd.out"))
            .expect("glusterd output file");
        let glusterd_args = [
            tools.glusterd.display().to_string(),
            "-N".into(),
            "-f".into(),
            d.join("glusterd.vol").display().to_string(),
            "-p".into(),
            d.join("run/glusterd.pid").display().to_string(),
            "-l".into(),
            d.join("log/glusterd.log").display().to_string(),
        ];
        let mut cmd;
        if tools.private_ns {
            let keep = std::fs::read_to_string(d.join("ns-keep")).expect("keep list");
            cmd = Command::new(&tools.unshare);
            cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", NS_SCRIPT, "sh"])
                .arg(d.join("gsyncd-stub"))
                .arg(tools.libexec.join("gsyncd"))
                .args(&glusterd_args)
                .env("KEEP", keep);
        } else {
            cmd = Command::new(&glusterd_args[0]);
            cmd.args(&glusterd_args[1..]);
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .current_dir(d);
        let child = cmd.spawn().expect("start glusterd");
        {
            let mut st = self.state();
            st.glusterd = Some(child);
            st.running = true;
        }
        // Ready when its CLI socket accepts; requests made before init ends wait in the backlog.
        let deadline = Instant::now() + USABLE_LIMIT;
        loop {
            if UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            let exited = self.state().glusterd.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                panic!("glusterd exited during start-up ({st}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "glusterd did not open {}:\n{}",
                self.socket().display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs the gluster CLI against this fixture's glusterd; panics with the output on failure.
    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&tools().gluster);
        cmd.arg(format!("--glusterd-sock={}", self.socket().display()))
            .arg("--mode=script")
            .arg(format!("--log-file={}", self.dir.join("log/cli.log").display()))
            .args(args);
        let (ok, out) = self.run_bounded(cmd, CLI_LIMIT, "cli");
        assert!(ok, "gluster {}: {out}\n{}", args.join(" "), self.logs());
        out
    }

    /// Runs a command with a time limit (killed and reported when over); output goes to a file in
    /// the fixture's log directory, so a daemon it leaves behind cannot hold a pipe open.
    fn run_bounded(&self, mut cmd: Command, limit: Duration, tag: &str) -> (bool, String) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("log/{tag}-{n}.out"));
        let out = std::fs::File::create(&path).expect("command output file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        match status {
            Some(st) => (st.success(), text),
            None => (false, format!("{cmd:?} did not finish within {limit:?}: {text}")),
        }
    }

    fn mount_at(&self, spec: &str, at: &Path, extra: &str, log: &str) -> Result<(), String> {
        let mut opts = format!(
            "{OPTIONS},log-file={}",
            self.dir.join(format!("log/{log}.log")).display()
        );
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        let mut cmd = Command::new(&tools().mount);
        cmd.args(["-t", "glusterfs", "-o", &opts, spec]).arg(at);
        let (ok, out) = self.run_bounded(cmd, MOUNT_LIMIT, "mount");
        if ok {
            Ok(())
        } else {
            Err(out)
        }
    }

    /// Usable = a new client can mount the volume and stat its root.
    fn wait_usable(&self) {
        let probe = self.dir.join("probe");
        std::fs::create_dir_all(&probe).expect("probe mount point");
        let deadline = Instant::now() + USABLE_LIMIT;
        loop {
            let tried = self.mount_at(&self.source(), &probe, "", "probe");
            if tried.is_ok() {
                let stat = std::fs::metadata(&probe);
                unmount(&probe);
                if stat.is_ok() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                panic!("the GlusterFS volume did not become usable: {tried:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let sock = self.brick_pids().into_iter().find_map(|pid| {
            let args = cmdline(pid)?;
            let i = args.iter().position(|a| a == "-S")?;
            args.get(i + 1).map(PathBuf::from)
        });
        let mut st = self.state();
        if sock.is_some() {
            st.brick_socket = sock;
        }
    }

    fn brick_pidfiles(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.join("run/vols").join(VOLUME))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pid"))
            .collect()
    }

    fn brick_pids(&self) -> Vec<i32> {
        self.processes()
            .into_iter()
            .filter(|(_, args)| args.iter().any(|a| a == "--brick-name"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Live processes whose command line names this fixture's directory (glusterd, the brick,
    /// the fixture's own clients) or its address as volfile server (clients mounted by the code
    /// under test).
    fn processes(&self) -> Vec<(i32, Vec<String>)> {
        let dir = format!("{}/", self.dir.display());
        let server_arg = format!("--volfile-server={}", self.addr);
        let me = std::process::id() as i32;
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Some(args) = cmdline(pid) else { continue };
            let ours = args.iter().any(|a| a.contains(dir.as_str()) || *a == server_arg)
                || args.windows(2).any(|w| w[0] == "--volfile-server" && w[1] == self.addr)
                || args.windows(2).any(|w| w[0] == "-s" && w[1] == self.addr);
            if ours {
                found.push((pid, args));
            }
        }
        found
    }

    fn kill_server(&self, st: &mut State) {
        if !st.running {
            return;
        }
        let servers: Vec<i32> = self
            .processes()
            .into_iter()
            .filter(|(_, args)| !is_client(args))
            .map(|(pid, _)| pid)
            .collect();
        for &pid in &servers {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut c) = st.glusterd.take() {
            let _ = c.kill();
            let deadline = Instant::now() + EXIT_LIMIT;
            while c.try_wait().ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "glusterd did not die on SIGKILL");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let left = wait_gone(&servers, EXIT_LIMIT);
        assert!(left.is_empty(), "GlusterFS server processes survived SIGKILL: {left:?}");
        st.running = false;
    }

    /// The tails of glusterd's and the brick's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut files = vec![self.dir.join("log/glusterd.out"), self.dir.join("log/glusterd.log")];
        if let Ok(rd) = std::fs::read_dir(self.dir.join("log/bricks")) {
            files.extend(rd.flatten().map(|e| e.path()));
        }
        files.push(self.dir.join("log/probe.log"));
        for f in files {
            let mut text = String::new();
            if let Ok(mut h) = std::fs::File::open(&f) {
                let _ = h.read_to_string(&mut text);
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            s += &format!("--- {} (last lines)\n{tail}\n", f.display());
        }
        s
    }
}

impl Drop for Gluster {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let recorded = std::mem::take(&mut st.mounts);
        let glusterd = st.glusterd.take();
        let brick_socket = st.brick_socket.take();
        // 1. Every client mount: ours, anything under our directory, and mounts of our source made
        //    by the code under test (those are leaks of the test, reported below).
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let ours = format!("{}:/{VOLUME}", self.addr);
        let mut targets: Vec<PathBuf> = recorded;
        let mut foreign = Vec::new();
        for m in cellar::sys::mountinfo::parse(&table) {
            if m.mount_point.starts_with(&self.dir) {
                targets.push(m.mount_point);
            } else if m.fs_type.starts_with("fuse.glusterfs")
                && (m.source == ours || m.source.starts_with(&format!("{ours}/")))
            {
                foreign.push(m.mount_point.clone());
                targets.push(m.mount_point);
            }
        }
        targets.sort();
        targets.dedup();
        for m in targets.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        // 2. Every process: clients (their mounts are detached now), brick, glusterd.
        let procs = self.processes();
        for (pid, _) in &procs {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if let Some(mut c) = glusterd {
            let _ = c.kill();
            let deadline = Instant::now() + EXIT_LIMIT;
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let pids: Vec<i32> = procs.iter().map(|(p, _)| *p).collect();
        let left = wait_gone(&pids, EXIT_LIMIT);
        if !left.is_empty() {
            problems.push(format!("processes survived SIGKILL: {left:?}"));
        }
        let still: Vec<PathBuf> = super::mounts_under(&self.dir);
        if !still.is_empty() {
            problems.push(format!("still mounted: {still:?}"));
        }
        // 3. Files outside the directory, then the directory.
        if let Some(sock) = brick_socket {
            if sock.starts_with("/var/run/gluster") || sock.starts_with("/run/gluster") {
                let _ = std::fs::remove_file(sock);
            }
        }
        if still.is_empty() {
            if let Some(tmp) = self.tmp.take() {
                if let Err(e) = tmp.close() {
                    problems.push(format!("removing {}: {e}", self.dir.display()));
                }
            }
        } else if let Some(tmp) = self.tmp.take() {
            // Never recurse into a live mount; leave the directory for the leak check to find.
            let _ = tmp.keep();
        }
        if !foreign.is_empty() {
            problems.push(format!(
                "the test left mounts of {} behind (unmounted lazily now): {foreign:?}",
                self.source()
            ));
        }
        if !problems.is_empty() {
            if std::thread::panicking() {
                eprintln!("Gluster fixture clean-up: {}", problems.join("; "));
            } else {
                panic!("Gluster fixture clean-up: {}", problems.join("; "));
            }
        }
    }
}

fn is_client(args: &[String]) -> bool {
    args.windows(2).any(|w| w[0] == "--process-name" && w[1] == "fuse")
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None; // a kernel thread or a zombie
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// A process is gone when /proc no longer has it or it is a zombie (its parent, often init,
/// reaps it later).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

fn wait_gone(pids: &[i32], limit: Duration) -> Vec<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Unmounts a FUSE client mount: normally, lazily when busy. Never blocks on a dead server.
fn unmount(mnt: &Path) {
    if umount2(mnt, MntFlags::empty()).is_err() {
        let _ = umount2(mnt, MntFlags::MNT_DETACH);
    }
}
