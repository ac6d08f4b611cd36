//! The GlusterFS fixture itself (tests/common/gluster.rs): a real network filesystem with two
//! clients standing for two nodes, a server that can die and come back, and a clean-up that leaves
//! nothing behind. Fails (never skips) when GlusterFS is not installed.

mod common;

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::gluster::Gluster;

/// Runs `f` on its own thread and fails the test if it takes longer than `limit` (an I/O on a dead
/// share must fail, not hang). Returns the result and how long it took.
fn bounded<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, start.elapsed()),
        Err(_) => panic!("{what} hung for more than {limit:?}"),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn write(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

fn gone(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == ErrorKind::NotFound)
}

/// Processes whose command line mentions `needle` (the fixture's directory is unique to it).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{pid}: {cmd}"));
        }
    }
    found
}

/// TCP listeners on `addr:port` from /proc/net/tcp (IPv4, x86 byte order).
fn listening(addr: [u8; 4], port: u16) -> bool {
    let want = format!(
        "{:02X}{:02X}{:02X}{:02X}:{port:04X}",
        addr[3], addr[2], addr[1], addr[0]
    );
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
}

fn assert_clean(dir: &Path) {
    let procs = processes_mentioning(&dir.display().to_string());
    assert!(procs.is_empty(), "fixture processes left running: {procs:#?}");
    let mounts = common::mounts_under(dir);
    assert!(mounts.is_empty(), "fixture mounts left: {mounts:?}");
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let needle = dir.display().to_string();
    assert!(!table.contains(&needle), "mountinfo still mentions {needle}");
    assert!(!dir.exists(), "fixture directory left: {}", dir.display());
}

#[test]
fn two_clients_see_each_others_changes_at_once() {
    let t = Instant::now();
    let g = Gluster::start();
    eprintln!("gluster bring-up: {:?}", t.elapsed());

    // Its own loopback address, not localhost/127.0.0.1, and nothing on the wildcard address.
    let addr: std::net::Ipv4Addr = g.addr().parse().unwrap();
    assert!(addr.is_loopback() && addr != std::net::Ipv4Addr::LOCALHOST, "{addr}");
    assert_eq!(g.source(), format!("{addr}:/cellar"));
    assert_eq!(g.fs_type(), "glusterfs");
    assert_eq!(g.options(), "entry-timeout=0,attribute-timeout=0,negative-timeout=0");
    assert!(listening(addr.octets(), 24007), "glusterd not on {addr}:24007");
    assert!(!listening([0, 0, 0, 0], 24007), "glusterd on 0.0.0.0");

    let t = Instant::now();
    let a = g.mount(None);
    eprintln!("gluster client mount: {:?}", t.elapsed());
    let b = g.mount(None);
    assert_ne!(a, b);

    for i in 0..20 {
        // Create: b looked the name up first (a negative entry), then a creates it.
        let x = format!("x{i}");
        assert!(gone(&b.join(&x)));
        write(&a.join(&x), "one");
        assert_eq!(read(&b.join(&x)), "one", "b does not see a's new file");
        assert!(std::fs::read_dir(&b)
            .unwrap()
            .any(|e| e.unwrap().file_name() == x.as_str()));

        // Rename on a: b had the old name cached.
        let y = format!("y{i}");
        std::fs::rename(a.join(&x), a.join(&y)).unwrap();
        assert!(gone(&b.join(&x)), "b still sees the old name after a rename");
        assert_eq!(read(&b.join(&y)), "one", "b does not see the new name");

        // Rewrite with another size on b, read on a.
        write(&b.join(&y), "a longer text");
        assert_eq!(read(&a.join(&y)), "a longer text");

        // Delete on b.
        std::fs::remove_file(b.join(&y)).unwrap();
        assert!(gone(&a.join(&y)), "a still sees a deleted file");

        // Directory rename and removal.
        let d = format!("d{i}");
        let e = format!("e{i}");
        std::fs::create_dir(a.join(&d)).unwrap();
        write(&a.join(&d).join("f"), "in dir");
        assert_eq!(read(&b.join(&d).join("f")), "in dir");
        std::fs::rename(a.join(&d), a.join(&e)).unwrap();
        assert!(gone(&b.join(&d)), "b still sees a renamed directory");
        assert_eq!(read(&b.join(&e).join("f")), "in dir");
        std::fs::remove_dir_all(b.join(&e)).unwrap();
        assert!(gone(&a.join(&e)));
    }

    // A sub-directory mount, created on demand, is the same data.
    let s = g.mount(Some("pools/shared"));
    write(&s.join("v"), "via sub");
    assert_eq!(read(&a.join("pools/shared/v")), "via sub");
    let s2 = g.mount(Some("pools/shared"));
    assert_eq!(read(&s2.join("v")), "via sub");
    assert!(gone(&s2.join("pools")), "the sub mount shows the volume root");

    // Each mount is its own client process (the temporary mounts that created the sub-directory
    // are gone).
    let clients = format!("{}/mnt/", g.dir().display());
    let t = Instant::now();
    while processes_mentioning(&clients).len() != 4 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "expected 4 client processes: {:#?}",
            processes_mentioning(&clients)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Same-size rewrite: a client with direct-io-mode reads it at once; a plain client may keep
    // serving its page cache (reported, not asserted).
    let c = g.mount_with(None, "direct-io-mode=enable");
    let mut stale = 0;
    for i in 0..10 {
        let f = format!("same{i}");
        write(&a.join(&f), "aaaa");
        assert_eq!(read(&b.join(&f)), "aaaa");
        assert_eq!(read(&c.join(&f)), "aaaa");
        write(&a.join(&f), "bbbb");
        assert_eq!(read(&c.join(&f)), "bbbb", "direct-io client read stale data");
        if read(&b.join(&f)) != "bbbb" {
            stale += 1;
        }
    }
    eprintln!("same-size rewrite: plain client read stale data {stale}/10 times");

    let dir = g.dir().to_path_buf();
    let t = Instant::now();
    drop(g);
    eprintln!("gluster teardown (4 client mounts): {:?}", t.elapsed());
    assert_clean(&dir);
}

#[test]
fn stopped_server_fails_fast_and_restart_recovers() {
    let g = Gluster::start();
    let a = g.mount(None);
    write(&a.join("f"), "data");
    std::fs::create_dir(a.join("dir")).unwrap();
    let mut held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(a.join("held"))
        .unwrap();
    held.write_all(b"before").unwrap();

    let t = Instant::now();
    // stop_server is bounded itself (SIGKILL, then at most 10 s of waiting, else it panics).
    g.stop_server();
    let stop = t.elapsed();
    eprintln!("stop_server: {stop:?}");
    assert!(stop < Duration::from_secs(10), "stop_server took {stop:?}");

    // Every kind of I/O on the client fails, and quickly.
    type Op = fn(&Path) -> std::io::Result<()>;
    let ops: [(&str, Op); 6] = [
        ("stat", |m| std::fs::metadata(m.join("f")).map(|_| ())),
        ("read", |m| std::fs::read(m.join("f")).map(|_| ())),
        ("readdir", |m| std::fs::read_dir(m).map(|_| ())),
        ("create", |m| std::fs::write(m.join("new"), "x")),
        ("mkdir", |m| std::fs::create_dir(m.join("newdir"))),
        ("rename", |m| std::fs::rename(m.join("dir"), m.join("dir2"))),
    ];
    for (name, op) in ops {
        let mnt = a.clone();
        let (res, took) = bounded(name, Duration::from_secs(15), move || op(&mnt));
        let err = res.expect_err(name);
        eprintln!(
            "server down: {name} -> {err} (errno {:?}) after {took:?}",
            err.raw_os_error()
        );
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ENOTCONN) | Some(libc::EIO) | Some(libc::ESTALE)
            ),
            "{name}: unexpected error {err}"
        );
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
    }
    // statfs too (what a driver's capacity or health check calls).
    let mnt = a.clone();
    let (res, took) = bounded("statfs", Duration::from_secs(15), move || {
        nix::sys::statvfs::statvfs(&mnt)
    });
    eprintln!("server down: statvfs -> {res:?} after {took:?}");
    assert_eq!(res.unwrap_err(), nix::errno::Errno::ENOTCONN);

    // A new mount while the server is down fails instead of hanging.
    let down = g.dir().join("down-mnt");
    std::fs::create_dir(&down).unwrap();
    let (src, target) = (g.source(), down.clone());
    let (status, took) = bounded("mount while down", Duration::from_secs(30), move || {
        Command::new("mount")
            .args(["-t", "glusterfs", "-o"])
            .arg(format!("log-file={}.log", target.display()))
            .arg(&src)
            .arg(&target)
            .output()
            .unwrap()
    });
    eprintln!("server down: new mount -> {} after {took:?}", status.status);
    assert!(!status.status.success(), "mounting a stopped server succeeded");

    let t = Instant::now();
    g.restart_server();
    eprintln!("restart_server (until a new client can mount): {:?}", t.elapsed());

    let b = g.mount(None);
    assert_eq!(read(&b.join("f")), "data", "data lost over the restart");

    // The old client reconnects by itself.
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(a.join("f")).ok().as_deref() == Some("data") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the old client did not recover within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("old client mount usable again {:?} after restart", t.elapsed());
    write(&a.join("after"), "ok");
    assert_eq!(read(&b.join("after")), "ok");

    // A file held open across the outage (observed, not asserted).
    let w = held.write_all(b"after").and_then(|_| held.sync_all());
    eprintln!(
        "file held open across the outage: write+fsync -> {w:?}; content now {:?}",
        std::fs::read_to_string(b.join("held"))
    );

    // Stop twice, restart twice: idempotent and still fine.
    g.stop_server();
    g.stop_server();
    g.restart_server();
    g.restart_server();
    let c = g.mount(None);
    assert_eq!(read(&c.join("f")), "data");
    let dir = g.dir().to_path_buf();
    drop(g);
    assert_clean(&dir);
}

#[test]
fn drop_leaves_nothing_behind() {
    // Running, with mounts of the root and of a sub-directory.
    let g = Gluster::start();
    let _a = g.mount(None);
    let s = g.mount(Some("sub"));
    write(&s.join("f"), "x");
    let dir = g.dir().to_path_buf();
    let t = Instant::now();
    drop(g);
    eprintln!("gluster teardown (2 client mounts): {:?}", t.elapsed());
    assert_clean(&dir);

    // The server stopped: the mounts are dead (ENOTCONN) when it is dropped.
    let g = Gluster::start();
    let a = g.mount(None);
    g.stop_server();
    assert!(std::fs::metadata(&a).is_err());
    let dir = g.dir().to_path_buf();
    let (_, took) = bounded("drop with the server stopped", Duration::from_secs(30), move || drop(g));
    eprintln!("gluster teardown with the server stopped: {took:?}");
    assert_clean(&dir);

    // The test panics while a file on a mount is open (declared first, so closed only after the
    // fixture's drop: the mount is busy then).
    let (tx, rx) = mpsc::channel::<PathBuf>();
    let joined = std::thread::spawn(move || {
        let open = std::cell::OnceCell::new();
        let g = Gluster::start();
        let a = g.mount(None);
        open.set(std::fs::File::create(a.join("open")).unwrap()).unwrap();
        tx.send(g.dir().to_path_buf()).unwrap();
        panic!("deliberate panic with the fixture alive");
    })
    .join();
    assert!(joined.is_err());
    let dir = rx.recv().unwrap();
    assert_clean(&dir);
}

#[test]
fn fixtures_in_parallel_are_separate() {
    let g1 = Gluster::start();
    let g2 = Gluster::start();
    assert_ne!(g1.addr(), g2.addr());
    let a = g1.mount(None);
    let b = g2.mount(None);
    write(&a.join("only-in-1"), "1");
    assert!(gone(&b.join("only-in-1")));
    drop(g1);
    // g2 unaffected by g1's clean-up.
    assert!(gone(&b.join("only-in-1")));
    write(&b.join("still"), "2");
    assert_eq!(read(&b.join("still")), "2");
}

/// An ext4 image on a loop device, mounted. Detaches only a device still backed by its own
/// image (a freed loop number may already belong to another test).
struct LoopMount {
    tmp: tempfile::TempDir,
    dev: String,
    mnt: PathBuf,
}

impl LoopMount {
    fn new() -> LoopMount {
        let tmp = tempfile::Builder::new()
            .prefix("cellar-fs-")
            .tempdir()
            .expect("tempdir");
        let img = tmp.path().join("disk.img");
        std::fs::File::create(&img)
            .expect("image")
            .set_len(64 << 20)
            .expect("size");
        let ok = Command::new("mkfs.ext4")
            .arg("-qF")
            .arg(&img)
            .status()
            .expect("mkfs.ext4");
        assert!(ok.success(), "mkfs.ext4");
        let out = Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg(&img)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let lm = LoopMount { tmp, dev, mnt };
        let ok = Command::new("mount").arg(&lm.dev).arg(&lm.mnt).status().expect("mount");
        assert!(ok.success(), "mount {}", lm.dev);
        lm
    }

    fn backing(&self) -> PathBuf {
        PathBuf::from(format!(
            "/sys/block/{}/loop/backing_file",
            self.dev.trim_start_matches("/dev/")
        ))
    }

    /// Still attached to this image.
    fn attached(&self) -> bool {
        std::fs::read_to_string(self.backing())
            .map(|b| Path::new(b.trim().trim_end_matches(" (deleted)")).starts_with(self.tmp.path()))
            .unwrap_or(false)
    }

    fn unmount_and_detach(&self) {
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        if self.attached() {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        self.unmount_and_detach();
    }
}

/// glusterd runs in a mount namespace of its own; it must not keep other tests' filesystems
/// alive: a copied loop mount would keep the loop device attached after its owner unmounted and
/// detached it (until the owner also removed the mount point directory).
#[test]
fn fixture_does_not_pin_other_mounts() {
    let lm = LoopMount::new();
    let g = Gluster::start();
    g.restart_server(); // a second namespace, made while the loop mount exists
    lm.unmount_and_detach();
    let t = Instant::now();
    while lm.attached() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} stays attached while the gluster fixture runs (mount point still exists)",
            lm.dev
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lm.mnt.exists());
    let m = g.mount(None);
    write(&m.join("f"), "ok");
}
