//! `image`: a volume is a sparse file holding an ext4 or xfs filesystem (or raw, for Block
//! volumes), attached through a loop device on the node. Its capacity is the file's size; copies
//! are reflinks where the pool's filesystem has them, else sparse copies, crash-consistent or,
//! with `freeze`, filesystem-consistent.

use std::path::Path;

use crate::crash;
use crate::sys::filesystems::FreezePoint;
use crate::sys::fstools::{FsType, Reach};
use crate::sys::{copy, StorageSys};

use super::{allocated, copy_via_work, image_mounts, Frozen, LayoutOps, Made};
use crate::storage::id::Key;
use crate::storage::pool::{Kind, Pool};
use crate::storage::record::{Layout, VolumeMode};
use crate::storage::StorageError;

pub struct Image;

impl LayoutOps for Image {
    fn layout(&self) -> Layout {
        Layout::Image
    }

    fn serves_block(&self) -> bool {
        true
    }

    fn has_filesystem(&self) -> bool {
        true
    }

    fn is_tree(&self) -> bool {
        false
    }

    fn single_node(&self) -> bool {
        true
    }

    fn tracks_blocks(&self) -> bool {
        true
    }

    fn reserves_capacity(&self) -> bool {
        true
    }

    /// A filesystem inside the image can be frozen; a raw Block volume cannot (nothing stops the
    /// pod's writes to the device).
    fn cuts_together(&self, mode: VolumeMode) -> bool {
        mode == VolumeMode::Filesystem
    }

    fn freeze_points(&self, sys: &StorageSys, data: &Path) -> Result<Vec<FreezePoint>, StorageError> {
        image_mounts(sys, data)
    }

    fn holds_back(&self, pool: &Pool, capacity: u64, data: &Path) -> u64 {
        // Where the pool shares blocks between files, an image's blocks that a snapshot or clone
        // shares are written anew when the image overwrites them: only its own count as held.
        let held = match pool.features.reflink {
            true => pool.sys.files.unshared_bytes(data),
            false => allocated(pool, data),
        };
        capacity.saturating_sub(held)
    }

    fn make_empty(
        &self,
        pool: &Pool,
        key: &Key,
        capacity: u64,
        mode: VolumeMode,
        fs: FsType,
    ) -> Result<Made, StorageError> {
        let data = pool.data_path(Kind::Volume, key);
        let work = pool.work_path(Kind::Volume, key);
        pool.sys.files.remove_tree(&work)?;
        let made = (|| -> Result<(), StorageError> {
            pool.sys.files.create_sized(&work, capacity)?;
            if mode == VolumeMode::Filesystem {
                let reach = if pool.shared() { Reach::Shared } else { Reach::OneNode };
                pool.sys.filesystems.mkfs(fs, &work, reach)?;
            }
            crash::point("image:before-rename");
            Ok(pool.sys.files.rename(&work, &data)?)
        })();
        if made.is_err() {
            let _ = pool.sys.files.remove_tree(&work); // nothing is left in `.work` for the retry to trip on
        }
        made?;
        Ok(Made {
            fs_bytes: if mode == VolumeMode::Filesystem { capacity } else { 0 },
        })
    }

    fn make_copy(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        src: &Path,
        _: bool,
        freeze: bool,
    ) -> Result<(), StorageError> {
        copy_via_work(pool, kind, key, |work| {
            let frozen = if freeze { Some(Frozen::image(pool, src)?) } else { None };
            copy::copy_file(src, work)?; // fsyncs the copy itself
            frozen.map_or(Ok(()), Frozen::thaw)
        })
    }

    fn set_capacity(&self, pool: &Pool, data: &Path, capacity: u64) -> Result<(), StorageError> {
        Ok(pool.sys.files.grow_to(data, capacity)?)
    }
}
