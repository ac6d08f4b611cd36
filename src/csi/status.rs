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
            StorageError::Busy(_) | StorageError::Transfer(_) | StorageError::Aborted(_) => Code::Aborted,
            StorageError::WrongNode { .. } => Code::NotFound,
            StorageError::Corrupt { .. } => Code::Internal,
            StorageError::PoolUnusable(_) | StorageError::PoolBroken { .. } => Code::FailedPrecondition,
            StorageError::InUse(_) | StorageError::NotTogether(_) | StorageError::ContentRefused(_) => {
                Code::FailedPrecondition
            }
            StorageError::Unavailable(_) => Code::Unavailable,
            StorageError::DataLoss(_) => Code::DataLoss,
            StorageError::Sys(s) => return sys_status(s),
        };
        Status::new(code, e.to_string())
    }
}

/// A failed syscall: a vanished network share or device is UNAVAILABLE (the CO retries), the rest
/// is INTERNAL with the step and path in the message. Content a copy does not take is no failure
/// of the driver's: FAILED_PRECONDITION, which the CO does not retry as it is.
pub fn sys_status(e: &SysError) -> Status {
    let code = match e.errno() {
        _ if matches!(e, SysError::TooLarge(_)) => Code::FailedPrecondition,
        _ if e.is_unavailable() => Code::Unavailable,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A transfer grant refused: absent, unreadable, not the controller's or expired is
/// UNAUTHENTICATED (no valid credential); a valid one that does not allow this read is
/// PERMISSION_DENIED.
impl From<crate::agent::grant::GrantError> for Status {
    fn from(e: crate::agent::grant::GrantError) -> Status {
        use crate::agent::grant::GrantError as E;
        let code = match &e {
            E::Missing | E::Malformed(_) | E::NotSigned(_) | E::Expired(_) => Code::Unauthenticated,
            E::OtherSource { .. } | E::OtherObject { .. } | E::OtherReader { .. } | E::TooLong(_) | E::Reused => {
                Code::PermissionDenied
            }
            E::Full => Code::ResourceExhausted,
            E::Ledger(_) => Code::Unavailable,
            E::Sign(_) => Code::Internal,
        };
        Status::new(code, bounded(&e.to_string()).into_owned())
    }
}

/// A call an agent turns away before it runs: a caller without the controller's certificate is
/// PERMISSION_DENIED; a call without the node it is meant for is INVALID_ARGUMENT; one meant for
/// another node is UNAVAILABLE (the address now serves another node: the caller's directory is
/// stale, and asks again).
impl From<crate::agent::tls::Refused> for Status {
    fn from(e: crate::agent::tls::Refused) -> Status {
        use crate::agent::tls::Refused as E;
        let code = match &e {
            E::NotNamed { .. } | E::NoCertificate { .. } | E::Ended { .. } => Code::PermissionDenied,
            E::NoNode { .. } => Code::InvalidArgument,
            E::OtherNode { .. } => Code::Unavailable,
        };
        Status::new(code, bounded(&e.to_string()).into_owned())
    }
}

/// A heartbeat or registration the registry refuses.
impl From<crate::agent::registry::RegistryError> for Status {
    fn from(e: crate::agent::registry::RegistryError) -> Status {
        use crate::agent::registry::RegistryError as E;
        let code = match &e {
            E::Invalid(_) => Code::InvalidArgument,
            E::Denied(_) => Code::PermissionDenied,
            E::Full { .. } => Code::ResourceExhausted,
            E::Client { .. } => Code::Internal,
        };
        Status::new(code, bounded(&e.to_string()).into_owned())
    }
}

impl From<SysError> for Status {
    fn from(e: SysError) -> Status {
        sys_status(&e)
    }
}

impl From<crate::storage::cbt::MetadataError> for Status {
    fn from(e: crate::storage::cbt::MetadataError) -> Status {
        use crate::storage::cbt::MetadataError as E;
        let code = match &e {
            E::Storage(_) => {
                let E::Storage(s) = e else {
                    unreachable!("matched above")
                };
                return Status::from(s);
            }
            E::NotTracked(_) => Code::FailedPrecondition,
            E::DifferentVolumes(_) => Code::InvalidArgument,
            E::PastEnd(_) => Code::OutOfRange,
        };
        Status::new(code, e.to_string())
    }
}

/// A request that is malformed on its face (before anything is looked up): INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

impl RequestError {
    pub fn invalid(msg: impl Into<String>) -> RequestError {
        RequestError::Invalid(msg.into())
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

impl From<crate::node::NodeError> for Status {
    fn from(e: crate::node::NodeError) -> Status {
        use crate::node::NodeError as E;
        let code = match &e {
            E::Request(r) => return Status::invalid_argument(r.to_string()),
            E::Storage(_) | E::Sys(_) => {
                return match e {
                    E::Storage(s) => Status::from(s),
                    E::Sys(s) => sys_status(&s),
                    _ => unreachable!("matched above"),
                }
            }
            E::NotFound(_) => Code::NotFound,
            E::InProgress(_) => Code::Aborted,
            E::Conflict(_) => Code::AlreadyExists,
            E::NotReady(_) | E::Exceeds(_) => Code::FailedPrecondition,
            E::ShareGone(_) => Code::Unavailable,
            E::Broken(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<crate::controller::ControllerError> for Status {
    fn from(e: crate::controller::ControllerError) -> Status {
        use crate::controller::ControllerError as E;
        let code = match &e {
            E::Request(_) | E::Storage(_) | E::Metadata(_) => {
                return match e {
                    E::Request(r) => r.into(),
                    E::Storage(s) => s.into(),
                    E::Metadata(m) => m.into(),
                    _ => unreachable!("matched above"),
                }
            }
            E::NotFound(_) => Code::NotFound,
            E::NameTaken(_) => Code::AlreadyExists,
            E::NotReady(_) => Code::FailedPrecondition,
            E::NoRoom(_) => Code::ResourceExhausted,
            E::OutOfRange(_) => Code::OutOfRange,
            E::NodeUnreachable(_) => Code::Unavailable,
            E::StaleToken(_) => Code::Aborted,
            E::NotOffered(_) => Code::Unimplemented,
        };
        Status::new(code, e.to_string())
    }
}

impl From<crate::agent::enrol::EnrolError> for Status {
    fn from(e: crate::agent::enrol::EnrolError) -> Status {
        use crate::agent::enrol::ca::CaError;
        use crate::agent::enrol::EnrolError as E;
        let code = match &e {
            E::Invalid(_) | E::Ca(CaError::Csr(_)) => Code::InvalidArgument,
            E::Unauthenticated(_) => Code::Unauthenticated,
            E::Denied(_) => Code::PermissionDenied,
            // The API server could not answer (or refused the controller itself): retry later.
            E::Api(_) | E::Busy(_) | E::PeerBusy(..) => Code::Unavailable,
            E::Ca(_) => Code::Internal,
        };
        Status::new(code, bounded(&e.to_string()).into_owned())
    }
}

/// The longest message a status carries: an echoed input (a 64 KiB volume id or path) is cut.
pub const MAX_MESSAGE: usize = 1024;

/// Cuts text from a request (or a message that echoes it) to `MAX_MESSAGE` bytes, saying so.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE {
        return text.into();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len()).into()
}

/// A status whose message is bounded (every RPC's answer passes through here).
pub fn bound(s: Status) -> Status {
    if s.message().len() <= MAX_MESSAGE {
        return s;
    }
    Status::new(s.code(), bounded(s.message()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_with_their_length_and_short_ones_kept() {
        let long = format!("volume {} not found", "x".repeat(65536));
        let s = bound(Status::not_found(long.clone()));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < MAX_MESSAGE + 64, "{}", s.message().len());
        assert!(s.message().ends_with(&format!("({} bytes in all)", long.len())));
        assert_eq!(bound(Status::not_found("short")).message(), "short");
        // Never cuts inside a character.
        let wide = "é".repeat(2000);
        assert!(bounded(&wide).starts_with("é"));
    }

    #[test]
    fn a_call_a_signal_interrupted_is_retried_and_a_broken_one_is_internal() {
        let at = std::path::Path::new("/pool/volumes/v.json.tmp");
        let sys = |errno| SysError::io("fsync", at, std::io::Error::from_raw_os_error(errno));
        assert_eq!(sys_status(&sys(libc::EINTR)).code(), Code::Unavailable);
        assert_eq!(sys_status(&sys(libc::ENOSPC)).code(), Code::ResourceExhausted);
        let broken = sys_status(&sys(libc::EPERM));
        assert_eq!(broken.code(), Code::Internal);
        assert!(broken.message().contains("fsync"), "{}", broken.message());
    }
}
