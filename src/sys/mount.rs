//! mount(2), umount(2) and the mountpoint check, behind a trait so node logic is testable without root.

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::{Step, SysError};

/// Per-mount flags that a bind mount can carry (set by a remount after the bind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BindFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub nodiratime: bool,
    pub relatime: bool,
    pub strictatime: bool,
}

impl BindFlags {
    /// Every flag either sets.
    pub fn and(self, other: BindFlags) -> BindFlags {
        BindFlags {
            read_only: self.read_only || other.read_only,
            nosuid: self.nosuid || other.nosuid,
            nodev: self.nodev || other.nodev,
            noexec: self.noexec || other.noexec,
            noatime: self.noatime || other.noatime,
            nodiratime: self.nodiratime || other.nodiratime,
            relatime: self.relatime || other.relatime,
            strictatime: self.strictatime || other.strictatime,
        }
    }

    /// True when a remount is needed after the bind to apply these flags.
    pub fn needs_remount(&self) -> bool {
        *self != BindFlags::default()
    }

    fn ms_flags(&self) -> MsFlags {
        let mut f = MsFlags::empty();
        f.set(MsFlags::MS_RDONLY, self.read_only);
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f.set(MsFlags::MS_NOEXEC, self.noexec);
        f.set(MsFlags::MS_NOATIME, self.noatime);
        f.set(MsFlags::MS_NODIRATIME, self.nodiratime);
        f.set(MsFlags::MS_RELATIME, self.relatime);
        f.set(MsFlags::MS_STRICTATIME, self.strictatime);
        f
    }
}

pub trait Mounter: Send + Sync {
    /// Bind-mounts `source` on `target` and applies `flags` (a read-only bind is bind + remount).
    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), SysError>;
    /// Mounts the filesystem on `device` (a loop device) at `target`.
    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str, flags: BindFlags) -> Result<(), SysError>;
    /// Unmounts the topmost mount at `target`.
    fn unmount(&self, target: &Path) -> Result<(), SysError>;
    /// Detaches the mount at `target` at once even if busy or stale (a share whose server is gone).
    fn detach(&self, target: &Path) -> Result<(), SysError>;
    /// Whether `path` is the root of a mount, including a bind mount from the same filesystem.
    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError>;
    /// Where the filesystem on `device` is mounted whole (its root, not a bind of a directory of
    /// it): what a freeze of that filesystem goes through.
    fn mounted_from(&self, device: &Path) -> Result<Vec<PathBuf>, SysError>;
}

/// The real thing: direct syscalls, never mount(8).
#[derive(Debug, Default, Clone)]
pub struct LinuxMounter {
    /// Where to read mounts when the kernel cannot answer with statx (kernels before 5.8).
    pub mountinfo: Option<PathBuf>,
}

impl Mounter for LinuxMounter {
    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), SysError> {
        // The flags go on a detached copy before it is attached: a mount made under a shared mount
        // (kubelet's directory, Bidirectional in the node pod) is copied into every peer (the
        // host, where kubelet hands it to the pod) with the flags it has at that moment, and a
        // remount afterwards changes only this namespace's copy: the host's would stay writable.
        match bind_detached(source, target, flags) {
            // Before Linux 5.12 (or a seccomp profile that refuses them): the bind and remount below,
            // whose flags do not reach copies already propagated to other mount namespaces.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(error = %e, "mount_setattr(2) unavailable: bind mount flags such as read-only are set by a remount, which does not reach the host's copy of a mount made under a shared (Bidirectional) directory");
                });
            }
            other => {
                return other
                    .map_err(|e| SysError::io("bind mount (open_tree, mount_setattr, move_mount) onto", target, e))
            }
        }
        nix::mount::mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .step("bind mount onto", target)?;
        if flags.needs_remount() {
            let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags.ms_flags();
            if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>) {
                // Never leave a read-write bind behind when read-only was asked for.
                let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
                return Err(SysError::io("remount bind with flags", target, e.into()));
            }
        }
        Ok(())
    }

    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str, flags: BindFlags) -> Result<(), SysError> {
        let data = super::fstools::FsType::parse(fs_type).and_then(|f| f.mount_data());
        nix::mount::mount(Some(device), target, Some(fs_type), flags.ms_flags(), data)
            .step("mount filesystem onto", target)
    }

    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        nix::mount::umount2(target, MntFlags::empty()).step("unmount", target)
    }

    fn detach(&self, target: &Path) -> Result<(), SysError> {
        nix::mount::umount2(target, MntFlags::MNT_DETACH).step("detach mount", target)
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError> {
        match statx_mount_root(path)? {
            Some(root) => Ok(root),
            None => {
                let table = self
                    .mountinfo
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(super::mountinfo::SELF));
                super::mountinfo::lists_mount_point(&table, path)
            }
        }
    }

    fn mounted_from(&self, device: &Path) -> Result<Vec<PathBuf>, SysError> {
        let table = self
            .mountinfo
            .clone()
            .unwrap_or_else(|| PathBuf::from(super::mountinfo::SELF));
        let source = device.to_string_lossy();
        Ok(super::mountinfo::read(&table)?
            .into_iter()
            .filter(|m| m.source == source && m.root == Path::new("/"))
            .map(|m| m.mount_point)
            .collect())
    }
}

/// `struct mount_attr` from linux/mount.h (mount_setattr(2), Linux 5.12).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

// linux/mount.h
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
const MOUNT_ATTR_RELATIME: u64 = 0x0;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

impl BindFlags {
    /// The same flags as mount_setattr(2) takes them.
    fn mount_attr(&self) -> MountAttr {
        let mut set = 0;
        for (on, bit) in [
            (self.read_only, MOUNT_ATTR_RDONLY),
            (self.nosuid, MOUNT_ATTR_NOSUID),
            (self.nodev, MOUNT_ATTR_NODEV),
            (self.noexec, MOUNT_ATTR_NOEXEC),
            (self.nodiratime, MOUNT_ATTR_NODIRATIME),
        ] {
            if on {
                set |= bit;
            }
        }
        // One atime mode at most; the source's is kept when none is named.
        let atime = if self.noatime {
            Some(MOUNT_ATTR_NOATIME)
        } else if self.strictatime {
            Some(MOUNT_ATTR_STRICTATIME)
        } else if self.relatime {
            Some(MOUNT_ATTR_RELATIME)
        } else {
            None
        };
        let mut clr = 0;
        if let Some(a) = atime {
            set |= a;
            clr |= MOUNT_ATTR_ATIME_MASK;
        }
        MountAttr {
            attr_set: set,
            attr_clr: clr,
            propagation: 0,
            userns_fd: 0,
        }
    }
}

/// Binds `source` on `target` with `flags` already set when the mount appears: a detached clone of
/// `source`'s mount (open_tree), its flags set (mount_setattr), then attached (move_mount). Every
/// copy propagation makes of it carries the flags. ENOSYS on kernels without these calls.
fn bind_detached(source: &Path, target: &Path, flags: BindFlags) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let src = CString::new(source.as_os_str().as_bytes())?;
    let dst = CString::new(target.as_os_str().as_bytes())?;
    let empty = c"";
    // SAFETY: open_tree(2) takes a dirfd, a NUL-terminated path that outlives the call and flags;
    // it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it. Closing it
    // without attaching frees the detached mount.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    if flags.needs_remount() {
        let attr = flags.mount_attr();
        // SAFETY: mount_setattr(2) reads one `struct mount_attr` of the size passed, which `attr`
        // is (repr(C), linux/mount.h) and which outlives the call; `empty` is NUL-terminated.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: move_mount(2) takes two dirfd/path pairs (ours open, both paths NUL-terminated and
    // alive for the call) and flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks statx whether `path` is a mount root. `None` when the kernel does not report the attribute.
/// This costs one syscall, where a scan of /proc/self/mountinfo grows with every mount on the node.
pub fn statx_mount_root(path: &Path) -> Result<Option<bool>, SysError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError::io("statx", path, std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `stx` is writable memory of
    // exactly the size statx(2) fills.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            libc::STATX_BASIC_STATS,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(SysError::io("statx", path, std::io::Error::last_os_error()));
    }
    // SAFETY: statx returned 0, so the kernel has initialised the struct.
    let stx = unsafe { stx.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & bit == 0 {
        return Ok(None);
    }
    Ok(Some(stx.stx_attributes & bit != 0))
}

/// A mounter that records calls and keeps a set of "mounted" paths, for unit tests of the logic
/// above `sys`; the next call of an operation can be made to fail with an errno.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    state: super::Recorded<Vec<(PathBuf, PathBuf, BindFlags)>>,
}

impl RecordingMounter {
    pub fn calls(&self) -> Vec<String> {
        self.state.calls()
    }

    pub fn mounted(&self) -> Vec<(PathBuf, PathBuf, BindFlags)> {
        self.state.lock().clone()
    }

    /// The next call of `op` ("bind", "mount", "unmount", or the query "is_mountpoint", which is
    /// not recorded as a call) fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached.
    pub fn disarm(&self) {
        self.state.disarm();
    }

    /// Every mount is gone, as after a reboot.
    pub fn reboot(&self) {
        self.state.lock().clear();
    }
}

impl Mounter for RecordingMounter {
    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), SysError> {
        let mut s = self.state.enter(
            "bind",
            format!("bind {} {} {:?}", source.display(), target.display(), flags),
            target,
        )?;
        // A pinned directory is bound through its descriptor: keep the directory it names.
        let source = match source.strip_prefix("/proc/self/fd") {
            Ok(_) => std::fs::read_link(source).unwrap_or_else(|_| source.to_path_buf()),
            Err(_) => source.to_path_buf(),
        };
        s.push((source, target.to_path_buf(), flags));
        Ok(())
    }

    fn mount_fs(&self, device: &Path, target: &Path, fs_type: &str, flags: BindFlags) -> Result<(), SysError> {
        let mut s = self.state.enter(
            "mount",
            format!("mount {} {} {fs_type} {:?}", device.display(), target.display(), flags),
            target,
        )?;
        s.push((device.to_path_buf(), target.to_path_buf(), flags));
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), SysError> {
        let mut s = self
            .state
            .enter("unmount", format!("unmount {}", target.display()), target)?;
        match s.iter().rposition(|m| m.1 == target) {
            Some(i) => {
                s.remove(i);
                Ok(())
            }
            None => Err(SysError::io(
                "unmount",
                target,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    fn detach(&self, target: &Path) -> Result<(), SysError> {
        self.unmount(target)
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool, SysError> {
        self.state.armed("is_mountpoint", path)?;
        Ok(self.state.lock().iter().any(|m| m.1 == path))
    }

    fn mounted_from(&self, device: &Path) -> Result<Vec<PathBuf>, SysError> {
        Ok(self
            .state
            .lock()
            .iter()
            .filter(|m| m.0 == device)
            .map(|m| m.1.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root only (it mounts). A bind made under a shared mount is copied into the mount's peers,
    /// which is how a node pod's mounts under kubelet's directory (Bidirectional) reach the host:
    /// the peer's copy must be as read-only as ours.
    #[test]
    fn a_read_only_bind_is_read_only_in_every_peer_of_a_shared_mount() {
        crate::sys::loopdev::fixture::require_root();
        let dir = tempfile::tempdir().unwrap();
        let (ours, peer, src) = (dir.path().join("ours"), dir.path().join("peer"), dir.path().join("src"));
        for d in [&ours, &peer, &src] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(src.join("f"), b"data").unwrap();
        let m = LinuxMounter::default();
        // `ours` shared, `peer` its peer (as the node pod's kubelet directory and the host's).
        m.bind(&ours, &ours, BindFlags::default()).unwrap();
        nix::mount::mount(None::<&str>, &ours, None::<&str>, MsFlags::MS_SHARED, None::<&str>).unwrap();
        m.bind(&ours, &peer, BindFlags::default()).unwrap();
        std::fs::create_dir(ours.join("t")).unwrap();
        let flags = BindFlags {
            read_only: true,
            nosuid: true,
            noexec: true,
            ..Default::default()
        };
        let made = m.bind(&src, &ours.join("t"), flags);
        let table = super::super::mountinfo::read(Path::new(super::super::mountinfo::SELF)).unwrap();
        let writes: Vec<_> = [ours.join("t/f"), peer.join("t/f")]
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(f)
                    .map(|_| ())
                    .map_err(|e| e.raw_os_error())
            })
            .collect();
        let options: Vec<String> = table
            .iter()
            .filter(|e| e.mount_point == ours.join("t") || e.mount_point == peer.join("t"))
            .map(|e| format!("{} {:?}", e.mount_point.display(), e))
            .collect();
        for p in [ours.join("t"), peer.join("t"), peer.clone(), ours.clone()] {
            let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
        }
        made.unwrap();
        assert_eq!(
            writes,
            vec![Err(Some(libc::EROFS)), Err(Some(libc::EROFS))],
            "{options:#?}"
        );
        assert_eq!(options.len(), 2, "{options:#?}");
    }
}
