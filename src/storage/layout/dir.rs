//! `dir`: a volume is a plain directory of its pool. Its capacity is recorded, not enforced; copies
//! are tree copies (reflinked file by file where the pool's filesystem can).

use std::path::Path;

use crate::sys::copy;

use super::{copy_via_work, open_to_all, LayoutOps, Made};
use crate::storage::id::Key;
use crate::storage::pool::{Kind, Pool};
use crate::storage::record::{Layout, VolumeMode};
use crate::storage::StorageError;
use crate::sys::fstools::FsType;

pub struct Dir;

impl LayoutOps for Dir {
    fn layout(&self) -> Layout {
        Layout::Dir
    }

    fn enforces_capacity(&self) -> bool {
        false
    }

    fn make_empty(&self, pool: &Pool, key: &Key, _: u64, _: VolumeMode, _: FsType) -> Result<Made, StorageError> {
        let data = pool.data_path(Kind::Volume, key);
        pool.sys.files.ensure_dir(&data, 0o777)?;
        open_to_all(pool, &data)?;
        Ok(Made { fs_bytes: 0 })
    }

    fn make_copy(&self, pool: &Pool, kind: Kind, key: &Key, src: &Path, _: bool, _: bool) -> Result<(), StorageError> {
        copy_via_work(pool, kind, key, |work| {
            copy::copy_tree(src, work)?;
            // The record written after this claims the copy: it must be on disk before the rename.
            copy::sync_filesystem(&pool.work_dir())?;
            Ok(())
        })
    }
}
