//! The only place that makes syscalls or runs tools. What needs root goes through traits at the
//! grain of single operations, each with a Linux implementation and a recording fake, so storage
//! and node logic can be tested without root: mounts ([`mount::Mounter`]), loop devices
//! ([`devices::Devices`]), filesystems in images ([`filesystems::Filesystems`]) and btrfs
//! ([`subvolumes::Subvolumes`]), and plain file work ([`files::Files`]: records, renames, listings,
//! sized files, locks), which needs no root but is a seam all the same so a test can fail any one
//! file operation of a call and read what a call did.

pub mod btrfs;
pub mod clock;
pub mod copy;
pub mod devices;
pub mod extents;
pub mod files;
pub mod filesystems;
pub mod fstools;
pub mod loopdev;
pub mod memory;
pub mod mount;
pub mod mountinfo;
pub mod share;
pub mod statfs;
pub mod subvolumes;
pub mod tree;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

/// The seams the storage engine and its layouts work through: one value, made once where the
/// engine opens ([`StorageSys::linux`]) or by a test with recording fakes, and held by every pool.
/// The loop devices and mounts are read only here (which image is attached, where its filesystem
/// is mounted, to refuse a delete and to freeze it); the Node service makes them, through the same
/// traits.
#[derive(Clone)]
pub struct StorageSys {
    pub files: Arc<dyn files::Files>,
    pub filesystems: Arc<dyn filesystems::Filesystems>,
    pub subvolumes: Arc<dyn subvolumes::Subvolumes>,
    pub devices: Arc<dyn devices::Devices>,
    pub mounter: Arc<dyn mount::Mounter>,
    /// The monotonic clock lease times are measured on.
    pub clock: Arc<dyn clock::Clock>,
}

impl StorageSys {
    /// The real thing: mkfs, FIFREEZE, btrfs ioctls, loop devices and the mount table.
    pub fn linux() -> StorageSys {
        StorageSys {
            files: Arc::new(files::LinuxFiles),
            filesystems: Arc::new(filesystems::LinuxFilesystems),
            subvolumes: Arc::new(subvolumes::LinuxSubvolumes),
            devices: Arc::new(devices::LinuxDevices),
            mounter: Arc::new(mount::LinuxMounter::default()),
            clock: Arc::new(clock::MonotonicClock),
        }
    }

    /// Recording fakes for the file, filesystems and btrfs calls, and for devices and mounts (nothing
    /// attached or mounted until a test's Node service does it through the same fakes).
    pub fn fakes(
        files: Arc<files::RecordingFiles>,
        filesystems: Arc<filesystems::RecordingFilesystems>,
        subvolumes: Arc<subvolumes::RecordingSubvolumes>,
        devices: Arc<devices::RecordingDevices>,
        mounter: Arc<mount::RecordingMounter>,
    ) -> StorageSys {
        StorageSys {
            files,
            filesystems,
            subvolumes,
            devices,
            mounter,
            clock: Arc::new(clock::MonotonicClock),
        }
    }
}

impl std::fmt::Debug for StorageSys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSys").finish_non_exhaustive()
    }
}

/// A recording fake's state `S` behind its lock, with what every fake keeps besides: the calls
/// made, in order, and the errno the next call of an operation fails with.
#[derive(Debug, Default)]
pub(crate) struct Recorded<S> {
    inner: Mutex<Calls<S>>,
}

#[derive(Debug, Default)]
pub(crate) struct Calls<S> {
    calls: Vec<String>,
    fail_next: BTreeMap<&'static str, i32>,
    /// A failure armed for one path only: the next call of the operation on it.
    fail_at: BTreeMap<&'static str, (PathBuf, i32)>,
    state: S,
}

impl<S> std::ops::Deref for Calls<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S> std::ops::DerefMut for Calls<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.state
    }
}

impl<S> Calls<S> {
    /// The errno armed for this call of `op` on `path`, disarmed as it is reached.
    fn take_failure(&mut self, op: &'static str, path: &Path) -> Option<i32> {
        if self.fail_at.get(op).is_some_and(|(p, _)| p == path) {
            return self.fail_at.remove(op).map(|(_, e)| e);
        }
        self.fail_next.remove(op)
    }
}

impl<S> Recorded<S> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Calls<S>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    pub(crate) fn fail_next(&self, op: &'static str, errno: i32) {
        self.lock().fail_next.insert(op, errno);
    }

    /// The next call of `op` on `path` (and on no other) fails with `errno`.
    pub(crate) fn fail_next_at(&self, op: &'static str, path: &Path, errno: i32) {
        self.lock().fail_at.insert(op, (path.to_path_buf(), errno));
    }

    /// Fails with the errno armed for `op`, if any, without recording a call (for queries).
    pub(crate) fn armed(&self, op: &'static str, path: &Path) -> Result<(), SysError> {
        match self.lock().take_failure(op, path) {
            Some(errno) => Err(SysError::io(op, path, io::Error::from_raw_os_error(errno))),
            None => Ok(()),
        }
    }

    /// Forgets every failure armed and not yet reached.
    pub(crate) fn disarm(&self) {
        let mut s = self.lock();
        s.fail_next.clear();
        s.fail_at.clear();
    }

    /// Records `call`, then fails it naming `op` and `path` if a failure was armed for `op`, or
    /// hands over the state.
    pub(crate) fn enter(
        &self,
        op: &'static str,
        call: String,
        path: &Path,
    ) -> Result<MutexGuard<'_, Calls<S>>, SysError> {
        let mut s = self.lock();
        s.calls.push(call);
        match s.take_failure(op, path) {
            Some(errno) => Err(SysError::io(op, path, io::Error::from_raw_os_error(errno))),
            None => Ok(s),
        }
    }
}

/// A failed system call or tool, naming the step and the path it was working on.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    /// Content of a workload's tree past what a copy carries: nothing failed, and only a change
    /// to the content lets the copy through.
    #[error(transparent)]
    TooLarge(#[from] tree::TooLarge),
}

impl SysError {
    pub fn io(step: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SysError::Io {
            step,
            path: path.into(),
            source,
        }
    }

    /// The OS error number, when the failure was a syscall.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Io { source, .. } => source.raw_os_error(),
            SysError::Tool { .. } | SysError::TooLarge(_) => None,
        }
    }

    /// A file read whole that cellar never writes where it was read (`read_optional`: a FIFO, a
    /// device, a symbolic link, one past its bound): on a share, another node may have put it.
    pub fn is_not_ours(&self) -> bool {
        matches!(self, SysError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidData)
    }

    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// A vanished network share or device, or one that does not answer, or a call a signal
    /// interrupted: it may come back, so the caller is told to retry rather than that something
    /// is wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOTCONN)
                | Some(libc::ESTALE)
                | Some(libc::EIO)
                | Some(libc::EHOSTDOWN)
                | Some(libc::ETIMEDOUT)
                | Some(libc::EINTR)
        )
    }
}

/// Turns a C return code into an `io::Result`, taking errno on failure.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Adds the step and path to an `io::Result`.
pub trait Step<T> {
    fn step(self, step: &'static str, path: &Path) -> Result<T, SysError>;
}

impl<T> Step<T> for io::Result<T> {
    fn step(self, step: &'static str, path: &Path) -> Result<T, SysError> {
        self.map_err(|e| SysError::io(step, path, e))
    }
}

impl<T> Step<T> for nix::Result<T> {
    fn step(self, step: &'static str, path: &Path) -> Result<T, SysError> {
        self.map_err(|e| SysError::io(step, path, io::Error::from(e)))
    }
}

/// Runs a tool that has no syscall equivalent (mkfs, btrfs, resize2fs ...), capturing stderr into the
/// error so the caller's message says why it failed.
/// This boot of the machine (the kernel's random boot id), or `None` when it cannot be read: what
/// was mounted in another boot is mounted no more.
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

pub fn run_tool(tool: &str, args: &[&str]) -> Result<String, SysError> {
    let out = Command::new(tool).args(args).output().map_err(|e| SysError::Tool {
        tool: tool.to_string(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(SysError::Tool {
            tool: format!("{tool} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
