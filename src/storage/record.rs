//! The per-volume and per-snapshot records kept next to their data, written atomically and durably.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::DeletePolicy;
use super::id::{BackupId, GroupId, SnapshotId, VolumeId};
use crate::sys::files::{Durability, Files};

use super::StorageError;

pub const RECORD_VERSION: u32 = 1;

/// How a volume may be used, in our own terms (the CSI enum is translated at the edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    pub fn read_only(self) -> bool {
        matches!(self, AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly)
    }
    /// Modes a pool on one node's disk can serve.
    pub fn served_by_local_pool(self) -> bool {
        !matches!(
            self,
            AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeMode {
    Filesystem,
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Dir,
    Btrfs,
    Image,
}

impl Layout {
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "dir" => Some(Layout::Dir),
            "btrfs" => Some(Layout::Btrfs),
            "image" => Some(Layout::Image),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Dir => "dir",
            Layout::Btrfs => "btrfs",
            Layout::Image => "image",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
    /// Restored from a backup (docs/backups.md).
    Backup(BackupId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub version: u32,
    /// The CSI name the volume was created with (its idempotency key).
    pub name: String,
    pub id: VolumeId,
    pub layout: Layout,
    pub capacity_bytes: u64,
    pub mode: VolumeMode,
    pub access_modes: Vec<AccessMode>,
    #[serde(default)]
    pub fs_type: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub source: Option<ContentSource>,
    pub created_unix_secs: i64,
    /// The data's fate on DeleteVolume when it differs from the pool's (StorageClass or modify).
    #[serde(default)]
    pub delete_policy: Option<DeletePolicy>,
    /// btrfs compression applied to new writes (mutable).
    #[serde(default)]
    pub compression: Option<String>,
    /// image layout: the size the filesystem inside was last grown to (0 when unknown or raw).
    #[serde(default)]
    pub fs_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub version: u32,
    pub name: String,
    pub id: SnapshotId,
    pub source_volume_id: VolumeId,
    /// The capacity of the source volume: the smallest volume this snapshot can be restored into.
    pub size_bytes: u64,
    pub created_unix_secs: i64,
    pub created_nanos: i32,
    /// The layout of the source volume, which a restore must match.
    #[serde(default = "dir_layout")]
    pub layout: Layout,
    #[serde(default = "filesystem_mode")]
    pub mode: VolumeMode,
    /// image layout: the size of the filesystem inside the snapshot.
    #[serde(default)]
    pub fs_bytes: u64,
    /// The group snapshot this one was cut with: it is deleted with its group, never alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupId>,
    /// A snapshot that is also a backup: uploaded into a repository in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupMark>,
}

/// What a snapshot's record says of its backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMark {
    /// The id the CO knows the snapshot by.
    pub id: BackupId,
    /// Keep the local snapshot once the backup is uploaded (same-node restores stay fast).
    pub keep_local: bool,
    /// The backup is in the repository, complete and checked.
    pub uploaded: bool,
}

/// A group snapshot: snapshots of several volumes cut together, kept in the pool of its first
/// member (`<pool>/groups/<key>.json`), written after every member's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub version: u32,
    /// The CSI name (its idempotency key).
    pub name: String,
    pub id: GroupId,
    /// In volume-id order.
    pub members: Vec<GroupMember>,
    /// The VolumeGroupSnapshotClass parameters it was made with (a repeat must name the same).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    pub created_unix_secs: i64,
    pub created_nanos: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub volume_id: VolumeId,
    pub snapshot_id: SnapshotId,
    /// The source's capacity (the member snapshot's size).
    pub size_bytes: u64,
}

fn filesystem_mode() -> VolumeMode {
    VolumeMode::Filesystem
}

fn dir_layout() -> Layout {
    Layout::Dir
}

/// A record, if one is at `path`. What is there that cellar does not write (a FIFO, a device, a
/// file past `READ_LIMIT`: on a share, put there by another node) is a record that does not
/// parse ([`StorageError::Corrupt`]), never a read that waits or fills the memory.
pub fn load<T: for<'de> Deserialize<'de>>(files: &dyn Files, path: &Path) -> Result<Option<T>, StorageError> {
    let read = match files.read_optional(path) {
        Err(e) if e.is_not_ours() => {
            return Err(StorageError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
        other => other?,
    };
    match read {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
    }
}

pub fn store<T: Serialize>(files: &dyn Files, path: &Path, record: &T) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    files.write_atomic(path, &bytes, Durability::PowerLoss)?;
    Ok(())
}
