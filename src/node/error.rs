//! What the Node service answers when a call cannot be done, in the node's own terms; turned into
//! a gRPC status in one place (`csi::status`).

use crate::csi::status::RequestError;
use crate::storage::StorageError;
use crate::sys::SysError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request is malformed on its face.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The volume, or the path named for it, is not here.
    #[error("{0}")]
    NotFound(String),
    /// Another call on the same volume is running; the CO retries.
    #[error("{0}")]
    InProgress(String),
    /// Already published at that path with other options.
    #[error("{0}")]
    Conflict(String),
    /// The capability asks for what the volume cannot serve (another volume mode, filesystem, or an
    /// access mode its pool does not offer): the spec's "Exceeds capabilities" of NodeStageVolume
    /// and NodePublishVolume, FAILED_PRECONDITION.
    #[error("{0}")]
    Exceeds(String),
    /// The volume is not in the state the call needs (not staged, staged elsewhere, published,
    /// held by another node).
    #[error("{0}")]
    NotReady(String),
    /// The share behind the volume cannot be reached now.
    #[error("{0}")]
    ShareGone(String),
    /// Something this node did not expect of itself (a record naming an unknown filesystem, a
    /// mount that will not go away).
    #[error("{0}")]
    Broken(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

impl NodeError {
    pub fn invalid(msg: impl Into<String>) -> NodeError {
        NodeError::Request(RequestError::invalid(msg))
    }

    pub fn missing(field: &'static str) -> NodeError {
        NodeError::Request(RequestError::Missing(field))
    }
}
