//! Every error becomes a gRPC status here, and only here.

use tonic::{Code, Status};

use crate::storage::StorageError;
use crate::sys::SysError;

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Status {
        let code = match &e {
            StorageError::UnknownPool { .. } | StorageError::LayoutNotAllowed { .. } | StorageError::Unsupported(_) => {
                Code::InvalidArgument
            }
            StorageError::VolumeNotFound(_) | StorageError::SnapshotNotFound(_) => Code::NotFound,
            StorageError::Conflict(_) => Code::AlreadyExists,
            StorageError::OutOfRange(_) => Code::OutOfRange,
            StorageError::Exhausted(_) => Code::ResourceExhausted,
            StorageError::Busy(_) | StorageError::Transfer(_) => Code::Aborted,
            StorageError::WrongNode { .. } => Code::NotFound,
            StorageError::Corrupt { .. } => Code::Internal,
            StorageError::PoolUnusable(_) | StorageError::PoolBroken { .. } => Code::FailedPrecondition,
            StorageError::InUse(_) => Code::FailedPrecondition,
            StorageError::Sys(s) => return sys_status(s),
        };
        Status::new(code, e.to_string())
    }
}

/// A failed syscall: a vanished network share or device is UNAVAILABLE (the CO retries), the rest
/// is INTERNAL with the step and path in the message.
pub fn sys_status(e: &SysError) -> Status {
    let code = match e.errno() {
        Some(libc::ENOTCONN) | Some(libc::ESTALE) | Some(libc::EIO) | Some(libc::EHOSTDOWN) | Some(libc::ETIMEDOUT) => {
            Code::Unavailable
        }
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

impl From<SysError> for Status {
    fn from(e: SysError) -> Status {
        sys_status(&e)
    }
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}
