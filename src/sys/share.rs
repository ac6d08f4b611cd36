//! Shared filesystems (NFS, CephFS, GlusterFS ...) that cellar mounts itself, and calls on them that
//! must not hang when the share is gone.
//!
//! Network filesystems are mounted through mount(8): their kernel or FUSE drivers need the userspace
//! helper (mount.nfs, mount.glusterfs, mount.ceph) to resolve servers and pass options. That is the
//! one place cellar spawns mount(8); local mounts use mount(2) directly.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::{run_tool, statfs, SysError};

/// How long a call on a share may take before the share counts as unreachable.
pub const SHARE_TIMEOUT: Duration = Duration::from_secs(10);

/// The calls (by step and path) that outlived their timeout and have not returned yet.
static STUCK: std::sync::Mutex<Vec<(&'static str, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn stuck() -> std::sync::MutexGuard<'static, Vec<(&'static str, PathBuf)>> {
    STUCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on its own thread and waits at most `timeout`. A call stuck in the kernel (a hard NFS
/// mount whose server is gone) cannot be cancelled; its thread is left to finish or hang alone, and
/// the caller gets ETIMEDOUT. While it hangs, the same step on the same path answers ETIMEDOUT at
/// once instead of leaving another thread behind (kubelet asks for a volume's stats every minute:
/// a share down for a day left thousands).
pub fn within<T: Send + 'static>(
    timeout: Duration,
    step: &'static str,
    path: &Path,
    f: impl FnOnce() -> Result<T, SysError> + Send + 'static,
) -> Result<T, SysError> {
    let timed_out = || SysError::io(step, path, std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
    if stuck().iter().any(|(s, p)| *s == step && p == path) {
        return Err(timed_out());
    }
    let (tx, rx) = mpsc::channel();
    let key = path.to_path_buf();
    std::thread::Builder::new()
        .name("cellar-share-call".into())
        .spawn(move || {
            let _ = tx.send(f());
            stuck().retain(|(s, p)| !(*s == step && *p == key));
        })
        .map_err(|e| SysError::io(step, path, e))?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            let mut s = stuck();
            // The thread may have returned between the timeout and this lock.
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            if !s.iter().any(|(st, p)| *st == step && p == path) {
                s.push((step, path.to_path_buf()));
            }
            Err(timed_out())
        }
    }
}

/// Forgets the hung calls on paths under `mount`: it was detached (a call stuck on the old mount
/// says nothing about a new one) or mounted afresh.
pub fn forget_stuck(mount: &Path) {
    stuck().retain(|(_, p)| !p.starts_with(mount));
}

/// statfs of a share, bounded in time: the health check of a share.
pub fn usage(path: &Path) -> Result<statfs::FsUsage, SysError> {
    let p = path.to_path_buf();
    within(SHARE_TIMEOUT, "statfs (share)", path, move || statfs::usage(&p))
}

/// Whether an error says the share is gone or stale (and a remount may bring it back).
pub fn is_stale(e: &SysError) -> bool {
    matches!(
        e.errno(),
        Some(libc::ENOTCONN) | Some(libc::ESTALE) | Some(libc::EIO) | Some(libc::ETIMEDOUT) | Some(libc::EHOSTDOWN)
    )
}

/// Mounts `source` of type `fs_type` with `options` at `target` (created if missing).
pub fn mount(source: &str, fs_type: &str, options: &str, target: &Path) -> Result<(), SysError> {
    std::fs::create_dir_all(target).map_err(|e| SysError::io("mkdir", target, e))?;
    let t = target.to_string_lossy().into_owned();
    let mut args = vec!["-t", fs_type];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([source, t.as_str()]);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let target_buf: PathBuf = target.to_path_buf();
    within(SHARE_TIMEOUT * 3, "mount share", target, move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("mount", &a).map(|_| ())
    })
    .inspect(|()| forget_stuck(&target_buf))
    .map_err(|e| match e {
        SysError::Tool { stderr, status, .. } => SysError::Tool {
            tool: format!("mount -t {fs_type} {source} {}", target_buf.display()),
            status,
            stderr,
        },
        other => other,
    })
}

/// Detaches a stale share (or a bind of it) at once, whatever still uses it.
pub fn detach(target: &Path) -> Result<(), SysError> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {
            forget_stuck(target);
            Ok(())
        }
        Err(e) => Err(SysError::io("detach mount", target, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A call that hangs past its timeout leaves one thread behind, not one per retry: the same
    /// step on the same path answers ETIMEDOUT without running until the hung call returns.
    #[test]
    fn a_hung_call_is_not_repeated_until_it_returns() {
        let path = Path::new("/share/that/hangs");
        let (release, hung) = mpsc::channel::<()>();
        let first = within(Duration::from_millis(50), "probe", path, move || {
            let _ = hung.recv();
            Ok(())
        });
        assert_eq!(first.unwrap_err().errno(), Some(libc::ETIMEDOUT));
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let second = within(Duration::from_secs(30), "probe", path, move || {
            r.store(true, Ordering::SeqCst);
            Ok(())
        });
        assert_eq!(second.unwrap_err().errno(), Some(libc::ETIMEDOUT));
        assert!(
            !ran.load(Ordering::SeqCst),
            "no second call was started while the first hangs"
        );
        let other = within(Duration::from_secs(30), "probe", Path::new("/another/path"), || Ok(7));
        assert_eq!(other.expect("another path is not held up"), 7);
        // A share detached and mounted again is tried afresh (the hung call was on the old mount).
        forget_stuck(Path::new("/share/that"));
        let fresh = within(Duration::from_secs(30), "probe", path, || Ok(3));
        assert_eq!(fresh.expect("the new mount is tried"), 3);
        let first_again = within(Duration::from_millis(50), "probe", path, move || {
            std::thread::sleep(Duration::from_millis(200));
            Ok(0)
        });
        assert_eq!(first_again.unwrap_err().errno(), Some(libc::ETIMEDOUT));
        release.send(()).expect("release the hung call");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match within(Duration::from_secs(30), "probe", path, || Ok(1)) {
                Ok(v) => break assert_eq!(v, 1),
                Err(_) => assert!(std::time::Instant::now() < deadline, "the path is never served again"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
