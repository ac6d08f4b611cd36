//! mount(2), umount(2) and the mountpoint check, behind a trait so node logic is testable without root.

use std::ffi::CString;
use std::mem::MaybeUninit;
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
                Ok(super::mountinfo::read(&table)?.iter().any(|m| m.mount_point == path))
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

    /// The next call of `op` ("bind", "mount", "unmount") fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached.
    pub fn disarm(&self) {
        self.state.disarm();
    }
}

impl Mounter for RecordingMounter {
    fn bind(&self, source: &Path, target: &Path, flags: BindFlags) -> Result<(), SysError> {
        let mut s = self.state.enter(
            "bind",
            format!("bind {} {} {:?}", source.display(), target.display(), flags),
            target,
        )?;
        s.push((source.to_path_buf(), target.to_path_buf(), flags));
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
