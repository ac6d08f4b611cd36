//! A real filesystem for a test: a sparse file, formatted, attached to a loop device and mounted in
//! a private temporary directory; unmounted and detached on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestFs {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub device: String,
    pub kind: String,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed by this test and could not run ({e}); CI installs it in .ci/run"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl TestFs {
    /// `kind` is btrfs, xfs or ext4.
    pub fn new(kind: &str, size_mib: u64) -> TestFs {
        super::require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-fs-")
            .tempdir()
            .expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .expect("image")
            .set_len(size_mib << 20)
            .expect("size");
        let img_s = img.to_str().expect("utf-8 path");
        match kind {
            "btrfs" => run("mkfs.btrfs", &["-q", "-f", img_s]),
            "xfs" => run("mkfs.xfs", &["-q", "-f", img_s]),
            "ext4" => run("mkfs.ext4", &["-q", "-F", img_s]),
            other => panic!("unknown test filesystem {other}"),
        };
        let device = run("losetup", &["--find", "--show", img_s]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let mounted = Command::new("mount")
            .args(["-t", kind, &device, mnt.to_str().expect("utf-8")])
            .status()
            .expect("mount");
        if !mounted.success() {
            let _ = Command::new("losetup").args(["-d", &device]).status();
            panic!("mounting the test {kind} failed");
        }
        TestFs {
            dir,
            mnt,
            device,
            kind: kind.to_string(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        // A failed test may leave image volumes attached; they would keep the filesystem busy.
        for m in super::mounts_under(&self.mnt)
            .into_iter()
            .filter(|m| m != &self.mnt)
            .rev()
        {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for l in loops_under(&self.mnt) {
            let dev = l.split(' ').next().unwrap_or_default().to_string();
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok || !is_mounted(&self.mnt) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn is_mounted(p: &Path) -> bool {
    super::mounts_under(p).iter().any(|m| m == p)
}

/// Loop devices whose backing file lies under `dir` (leak detection).
pub fn loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let b = b.trim().trim_end_matches(" (deleted)");
            if Path::new(b).starts_with(dir) {
                found.push(format!("/dev/{name} -> {b}"));
            }
        }
    }
    found
}
