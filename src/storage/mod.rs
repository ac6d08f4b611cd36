//! Pools, layouts and volume records: everything about where a volume's bytes live.

pub mod cbt;
pub mod config;
pub mod engine;
pub mod freeze;
pub mod id;
pub mod layout;
pub mod lease;
pub mod locks;
pub mod naming;
pub mod pool;
pub mod record;
pub mod roster;
pub mod store;
pub mod transfer;

use std::path::PathBuf;

use crate::sys::SysError;

/// What can go wrong in the storage layer. Mapped to a gRPC code in one place (`csi::status`).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unknown pool '{name}' (pools here: {known})")]
    UnknownPool { name: String, known: String },
    #[error("layout '{layout}' is not available in pool '{pool}' (allowed: {allowed})")]
    LayoutNotAllowed {
        layout: String,
        pool: String,
        allowed: String,
    },
    #[error("volume {0} not found")]
    VolumeNotFound(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("an operation on {0} is already in progress; retry later")]
    Busy(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("pool '{pool}' is not on this node (it lives on {owner})")]
    WrongNode { pool: String, owner: String },
    #[error("{0}")]
    PoolUnusable(String),
    #[error("pool '{pool}' is not open: {reason}")]
    PoolBroken { pool: String, reason: String },
    #[error("{0}")]
    InUse(String),
    /// A copy streamed from another node broke off or failed its checks; it is redone from the start.
    #[error("transfer broken: {0}")]
    Transfer(String),
    /// Volumes that cannot be snapshotted together as asked (a group snapshot's precondition).
    #[error("{0}")]
    NotTogether(String),
    /// A call given up part-way, leaving nothing behind; its retry may succeed (a group snapshot
    /// whose filesystems stayed frozen past their deadline).
    #[error("{0}")]
    Aborted(String),
    /// A node or share that cannot be reached now (the CO retries).
    #[error("{0}")]
    Unavailable(String),
    /// Data that fails its checks where it is kept (a backup's corrupted pack): a restore from
    /// it cannot succeed.
    #[error("{0}")]
    DataLoss(String),
    #[error("corrupt record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A volume's content that the call cannot take (a tree too deep to copy, an entry with more
    /// xattrs than a copy carries): the workload made it, and only a change to it lets a retry
    /// through.
    #[error("{0}")]
    ContentRefused(String),
    #[error(transparent)]
    Sys(SysError),
}

impl From<SysError> for StorageError {
    fn from(e: SysError) -> StorageError {
        match e {
            SysError::TooLarge(t) => StorageError::ContentRefused(t.to_string()),
            other => StorageError::Sys(other),
        }
    }
}

impl StorageError {
    /// A pool of `node` that is not open, as the controller words it: the node named, since the
    /// operator reads it far from the node.
    pub fn pool_shut_on(pool: String, reason: &str, node: &id::NodeId) -> StorageError {
        StorageError::PoolBroken {
            pool,
            reason: format!("{reason} (node {})", node.as_str()),
        }
    }

    /// A node or share that cannot be reached now, rather than an answer about the request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StorageError::Unavailable(_) => true,
            StorageError::Sys(s) => s.is_unavailable(),
            _ => false,
        }
    }
}
