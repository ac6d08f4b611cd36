//! The only place that makes syscalls or runs tools. Everything above it goes through these
//! functions and the [`mount::Mounter`] trait, so storage and node logic can be tested without root.

pub mod btrfs;
pub mod copy;
pub mod devices;
pub mod extents;
pub mod files;
pub mod fstools;
pub mod loopdev;
pub mod memory;
pub mod mount;
pub mod mountinfo;
pub mod share;
pub mod statfs;
pub mod tree;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

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
            SysError::Tool { .. } => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// A vanished network share or device, or one that does not answer: it may come back, so the
    /// caller is told to retry rather than that something is wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOTCONN) | Some(libc::ESTALE) | Some(libc::EIO) | Some(libc::EHOSTDOWN) | Some(libc::ETIMEDOUT)
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
