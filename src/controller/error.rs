//! What the Controller service answers when a call cannot be done, in the controller's own terms;
//! turned into a gRPC status in one place (`csi::status`).

use crate::csi::status::RequestError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request is malformed on its face.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No such volume, snapshot, group or source, or no node that holds it.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by a different request.
    #[error("{0}")]
    NameTaken(String),
    /// The objects are not in the state the call needs (e.g. members of a group on several nodes).
    #[error("{0}")]
    NotReady(String),
    /// No node or pool has room for what is asked.
    #[error("{0}")]
    NoRoom(String),
    /// A size outside what the request or the layout allows.
    #[error("{0}")]
    OutOfRange(String),
    /// The node that must answer cannot be reached now.
    #[error("{0}")]
    NodeUnreachable(String),
    /// A listing changed under a page token; the CO starts the listing again.
    #[error("{0}")]
    StaleToken(String),
    /// A call cellar does not offer.
    #[error("{0}")]
    NotOffered(&'static str),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A snapshot metadata (changed block tracking) refusal from the node's engine.
    #[error(transparent)]
    Metadata(#[from] crate::storage::cbt::MetadataError),
}

impl ControllerError {
    pub fn invalid(msg: impl Into<String>) -> ControllerError {
        ControllerError::Request(RequestError::invalid(msg))
    }

    pub fn missing(field: &'static str) -> ControllerError {
        ControllerError::Request(RequestError::Missing(field))
    }

    pub fn not_found(msg: impl Into<String>) -> ControllerError {
        ControllerError::NotFound(msg.into())
    }
}

#[cfg(test)]
impl ControllerError {
    /// The gRPC code a client receives for this error.
    pub fn code(self) -> tonic::Code {
        tonic::Status::from(self).code()
    }
}
