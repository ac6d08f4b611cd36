//! `btrfs`: a volume is a subvolume with a qgroup limit (enforced: writes past it fail with
//! EDQUOT); snapshots and clones are subvolume snapshots, instant and atomic.

use std::path::Path;

use crate::sys::fstools::FsType;
use crate::sys::StorageSys;

use super::{open_to_all, LayoutOps, Made};
use crate::storage::config::PoolConfig;
use crate::storage::id::Key;
use crate::storage::pool::{Kind, Pool};
use crate::storage::record::{Layout, VolumeMode};
use crate::storage::StorageError;

pub struct Btrfs;

impl LayoutOps for Btrfs {
    fn layout(&self) -> Layout {
        Layout::Btrfs
    }

    fn compresses(&self) -> bool {
        true
    }

    fn prepare(&self, sys: &StorageSys, config: &PoolConfig, on_btrfs: bool) -> Result<(), StorageError> {
        if !on_btrfs {
            return Err(StorageError::PoolUnusable(format!(
                "pool '{}': layout btrfs needs a btrfs filesystem at {}, which is not btrfs",
                config.name.as_str(),
                config.path.display()
            )));
        }
        sys.subvolumes.enable_quota(&config.path)?;
        Ok(())
    }

    fn make_empty(
        &self,
        pool: &Pool,
        key: &Key,
        capacity: u64,
        _: VolumeMode,
        _: FsType,
    ) -> Result<Made, StorageError> {
        let data = pool.data_path(Kind::Volume, key);
        let subvolumes = &pool.sys.subvolumes;
        subvolumes.create(&data)?;
        open_to_all(pool, &data)?;
        subvolumes.set_limit(&data, capacity)?;
        // A new subvolume is on disk only after the next transaction commit; the record that
        // follows must not promise a volume a power loss could take back.
        subvolumes.commit(&data)?;
        Ok(Made { fs_bytes: 0 })
    }

    fn make_copy(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        src: &Path,
        writable: bool,
        _: bool,
    ) -> Result<(), StorageError> {
        refuse_nested(pool, src)?;
        let copy = pool.data_path(kind, key);
        pool.sys.subvolumes.snapshot(src, &copy, !writable)?;
        // One made while the snapshot was cut is not in it either.
        if let Err(e) = refuse_nested(pool, src) {
            pool.sys.subvolumes.delete(&copy)?;
            return Err(e);
        }
        Ok(())
    }

    fn set_capacity(&self, pool: &Pool, data: &Path, capacity: u64) -> Result<(), StorageError> {
        pool.sys.subvolumes.set_limit(data, capacity)?;
        pool.sys.subvolumes.commit(data)?;
        Ok(())
    }

    fn frozen_view(&self, pool: &Pool, data: &Path, at: &Path) -> Result<Option<std::path::PathBuf>, StorageError> {
        refuse_nested(pool, data)?;
        pool.sys.subvolumes.snapshot(data, at, true)?;
        if let Err(e) = refuse_nested(pool, data) {
            pool.sys.subvolumes.delete(at)?;
            return Err(e);
        }
        Ok(Some(at.to_path_buf()))
    }

    fn own_usage(&self, pool: &Pool, data: &Path, capacity: u64) -> Result<Option<(u64, u64)>, StorageError> {
        // statfs shows the whole pool; the qgroup holds the volume's own figures.
        let q = pool.sys.subvolumes.usage(data)?;
        Ok(Some((q.max_referenced.unwrap_or(capacity), q.referenced)))
    }

    fn fault(&self, pool: &Pool, data: &Path) -> Option<String> {
        if !pool.sys.subvolumes.is_subvolume(data).unwrap_or(false) {
            return Some(format!("volume data {} is not a btrfs subvolume", data.display()));
        }
        match pool.sys.subvolumes.nested(data) {
            Ok(ids) if !ids.is_empty() => Some(nested_message(data, &ids)),
            _ => None,
        }
    }
}

/// What a volume holding subvolumes of its own is told: a workload in the pod (a container engine
/// on btrfs, say) can make them without privileges, and btrfs counts each in a qgroup of its own.
fn nested_message(data: &Path, ids: &[u64]) -> String {
    format!(
        "volume data {} holds {} nested btrfs subvolume(s) (ids {}): the volume's quota does not \
         limit them and its snapshots would leave them out (`btrfs subvolume list -o` shows them)",
        data.display(),
        ids.len(),
        ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    )
}

/// A btrfs snapshot holds a nested subvolume as an empty directory: a snapshot, clone or backup of
/// a volume holding one would silently lack its data, so it is refused (FAILED_PRECONDITION).
fn refuse_nested(pool: &Pool, src: &Path) -> Result<(), StorageError> {
    let ids = pool.sys.subvolumes.nested(src)?;
    if ids.is_empty() {
        return Ok(());
    }
    Err(StorageError::InUse(format!(
        "cannot copy it: {}",
        nested_message(src, &ids)
    )))
}
