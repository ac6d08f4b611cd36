//! How each layout carves a volume out of its pool:
//!
//! | layout  | a volume is                    | capacity           | snapshot / clone                  |
//! |---------|--------------------------------|--------------------|-----------------------------------|
//! | `dir`   | a directory                    | recorded           | tree copy                         |
//! | `btrfs` | a subvolume                    | qgroup limit       | subvolume snapshot (instant)      |
//! | `image` | a sparse file, ext4/xfs or raw | the file's size    | reflink copy, else sparse copy    |
//!
//! Every layout leaves either nothing or a whole object at the data path: copies are built in
//! `.work` and renamed into place; btrfs snapshots are atomic.
//!
//! A layout is one file behind [`LayoutOps`] (`dir.rs`, `btrfs.rs`, `image.rs`), registered in
//! [`of`]: a new layout (zfs, lvm-thin, xfs project quota) is one new file, one line there, and its
//! name in [`Layout`]. The engine asks the trait, never which layout it holds.

mod btrfs;
mod dir;
mod image;

use std::path::{Path, PathBuf};

use crate::crash;
use crate::sys::filesystems::FreezePoint;
use crate::sys::fstools::FsType;
use crate::sys::{copy, files, StorageSys};

use super::config::PoolConfig;
use super::id::Key;
use super::pool::{Kind, Pool};
use super::record::{self, Layout, SnapshotRecord, VolumeMode, VolumeRecord};
use super::StorageError;

/// What a pool's filesystem can do, found when the pool opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFeatures {
    pub reflink: bool,
    pub btrfs: bool,
}

/// What making a volume produced beyond its data: the size of the filesystem made inside (image).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Made {
    pub fs_bytes: u64,
}

/// Everything the storage engine asks of a layout. Callers hold the object's lock and have checked
/// that it has no record (a leftover was cleared with [`clear_leftover`]).
pub trait LayoutOps: Sync {
    fn layout(&self) -> Layout;

    /// Serves `volumeMode: Block` (a raw device) besides Filesystem.
    fn serves_block(&self) -> bool {
        false
    }
    /// A volume holds a filesystem of its own (ext4/xfs), made by mkfs and grown by the node.
    fn has_filesystem(&self) -> bool {
        false
    }
    /// A volume is a directory tree (owner, mode and a walk apply); otherwise a file.
    fn is_tree(&self) -> bool {
        true
    }
    /// Writes stop at the volume's capacity.
    fn enforces_capacity(&self) -> bool {
        true
    }
    /// Takes a compression setting (ModifyVolume, StorageClass `compression`).
    fn compresses(&self) -> bool {
        false
    }
    /// Can be used by one node at a time only, also on a shared pool.
    fn single_node(&self) -> bool {
        false
    }
    /// A snapshot is one file whose extents say which blocks it shares with another snapshot of
    /// its volume: changed block tracking (storage::cbt) can answer for it.
    fn tracks_blocks(&self) -> bool {
        false
    }
    /// Checks that a pool's filesystem can serve this layout and prepares it.
    fn prepare(&self, _sys: &StorageSys, _config: &PoolConfig, _on_btrfs: bool) -> Result<(), StorageError> {
        Ok(())
    }
    /// A new volume takes its whole capacity from the pool's room at once (image files may grow
    /// into all of it), so room held back by existing volumes is not offered to it.
    fn reserves_capacity(&self) -> bool {
        false
    }
    /// A live volume is read for a copy to another node through a frozen view (a read-only
    /// snapshot made at `at`), which the caller purges after; `None` reads it in place.
    fn frozen_view(&self, _pool: &Pool, _data: &Path, _at: &Path) -> Result<Option<std::path::PathBuf>, StorageError> {
        Ok(None)
    }
    /// A snapshot of a volume in `mode` can be cut at one point in time with other volumes' (a group
    /// snapshot): its writes can be stopped for the cut. Layouts whose volumes share their pool's
    /// filesystem (dir, btrfs) cannot stop one volume's writes alone.
    fn cuts_together(&self, _mode: VolumeMode) -> bool {
        false
    }
    /// The mounted filesystems to freeze for a group snapshot of the volume at `data` (none when
    /// nothing has it mounted: then nothing writes to it).
    fn freeze_points(&self, _sys: &StorageSys, _data: &Path) -> Result<Vec<FreezePoint>, StorageError> {
        Ok(Vec::new())
    }
    /// Bytes of the pool an existing volume of `capacity` may still grow into (room held back from
    /// new volumes).
    fn holds_back(&self, _pool: &Pool, _capacity: u64, _data: &Path) -> u64 {
        0
    }
    /// Makes an empty volume at its data path.
    fn make_empty(
        &self,
        pool: &Pool,
        key: &Key,
        capacity: u64,
        mode: VolumeMode,
        fs: FsType,
    ) -> Result<Made, StorageError>;
    /// Makes a volume (or, with `Kind::Snapshot`, a snapshot) from `src`, the data of a volume or
    /// snapshot of this layout. `freeze` makes the copy of a mounted filesystem consistent.
    fn make_copy(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        src: &Path,
        writable: bool,
        freeze: bool,
    ) -> Result<(), StorageError>;
    /// Gives a volume its capacity (after a copy, or an expand).
    fn set_capacity(&self, _pool: &Pool, _data: &Path, _capacity: u64) -> Result<(), StorageError> {
        Ok(())
    }
    /// The volume's own usage when the filesystem it lives in cannot tell it (statfs of a btrfs
    /// subvolume shows the whole pool): `(limit, used)` bytes.
    fn own_usage(&self, _pool: &Pool, _data: &Path, _capacity: u64) -> Result<Option<(u64, u64)>, StorageError> {
        Ok(None)
    }
    /// Why data of the right kind of entry is still not what this layout makes, if it is not.
    fn fault(&self, _pool: &Pool, _data: &Path) -> Option<String> {
        None
    }
}

/// The layout's implementation: the one place that knows every layout.
pub fn of(layout: Layout) -> &'static dyn LayoutOps {
    match layout {
        Layout::Dir => &dir::Dir,
        Layout::Btrfs => &btrfs::Btrfs,
        Layout::Image => &image::Image,
    }
}

/// Checks that the pool's filesystem can serve every layout the pool allows, and prepares it
/// (btrfs quotas). A pool that cannot is refused with a message saying why.
pub fn check_pool(config: &PoolConfig, sys: &StorageSys) -> Result<PoolFeatures, StorageError> {
    let is_btrfs = sys.subvolumes.is_btrfs(&config.path)?;
    for l in &config.layouts {
        of(*l).prepare(sys, config, is_btrfs)?;
    }
    Ok(PoolFeatures {
        reflink: copy::supports_reflink(&config.path),
        btrfs: is_btrfs,
    })
}

/// Makes an empty volume at its data path, in place of whatever a failed call left there.
pub fn create_empty(
    pool: &Pool,
    key: &Key,
    layout: Layout,
    capacity: u64,
    mode: VolumeMode,
    fs: FsType,
) -> Result<Made, StorageError> {
    clear_leftover(pool, Kind::Volume, key)?;
    of(layout).make_empty(pool, key, capacity, mode, fs)
}

/// Makes a volume or snapshot from `src` (see [`LayoutOps::make_copy`]), in place of whatever a
/// failed call left there.
pub fn create_copy(
    pool: &Pool,
    kind: Kind,
    key: &Key,
    layout: Layout,
    src: &Path,
    writable: bool,
    freeze: bool,
) -> Result<(), StorageError> {
    clear_leftover(pool, kind, key)?;
    of(layout).make_copy(pool, kind, key, src, writable, freeze)
}

/// Builds an object in `.work` with `build`, then renames it into place (the copy is whole there
/// or not at all).
fn copy_via_work(
    pool: &Pool,
    kind: Kind,
    key: &Key,
    build: impl FnOnce(&Path) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let data = pool.data_path(kind, key);
    let work = pool.work_path(kind, key);
    pool.sys.files.remove_tree(&work)?;
    let built = build(&work).and_then(|()| {
        crash::point("copy:before-rename");
        Ok(pool.sys.files.rename(&work, &data)?)
    });
    if built.is_err() {
        // A failed build or rename leaves nothing in `.work` (a subvolume there goes through btrfs).
        let _ = purge(&pool.sys, &work);
    }
    built
}

/// Invariant 2: a record names exactly the data it was made for. Data at an object's place with no
/// record is what a failed or crashed call left; nothing proves which request made it (a retry of
/// the same name may name another source), so it is removed and the object made anew, never adopted.
/// Callers hold the object's lock and have found no record of it; a record file there all the
/// same (one they could not read as this object's) refuses, see [`refuse_unread_record`].
pub fn clear_leftover(pool: &Pool, kind: Kind, key: &Key) -> Result<(), StorageError> {
    refuse_unread_record(pool, kind, key, None)?;
    let data = pool.data_path(kind, key);
    match pool.sys.files.entry(&data)? {
        files::Entry::Missing => return Ok(()),
        files::Entry::Dir if pool.sys.subvolumes.is_subvolume(&data).unwrap_or(false) => {
            pool.sys.subvolumes.delete(&data)?
        }
        _ => {
            let trashed = pool
                .trash_dir()
                .join(format!("leftover-{}-{}", key.as_str(), uuid::Uuid::new_v4().simple()));
            pool.sys.files.rename(&data, &trashed)?;
            purge(&pool.sys, &trashed)?;
        }
    }
    tracing::info!(path = %data.display(), "removed data a failed call left without a record");
    Ok(())
}

/// Before data at an object's place is removed: the record file there must be absent, or (with
/// `ours`, the object's id, for a delete) read now as that object's. One that does not parse (a
/// later version wrote it, a hand edit) or names another object (as after a pool's rename) may
/// name the data, whatever a cache held of it before: nothing is removed, replaced or adopted until
/// it is repaired.
pub fn refuse_unread_record(pool: &Pool, kind: Kind, key: &Key, ours: Option<&str>) -> Result<(), StorageError> {
    let path = pool.record_path(kind, key);
    let read = match (pool.sys.files.entry(&path)?, ours) {
        (files::Entry::Missing, _) => return Ok(()),
        (_, None) => false,
        (_, Some(id)) => {
            // A record that cannot be read at all (EIO, a share gone) answers as that read did.
            let found = match kind {
                Kind::Volume => or_corrupt(record::load::<VolumeRecord>(&*pool.sys.files, &path))?
                    .map(|r| r.map(|r| r.id.to_string())),
                Kind::Snapshot => or_corrupt(record::load::<SnapshotRecord>(&*pool.sys.files, &path))?
                    .map(|r| r.map(|r| r.id.to_string())),
            };
            match found {
                Some(None) => return Ok(()), // removed since it was looked at
                Some(Some(named)) => named == id,
                None => false,
            }
        }
    };
    match read {
        true => Ok(()),
        false => Err(unread(path)),
    }
}

fn unread(path: PathBuf) -> StorageError {
    StorageError::Corrupt {
        path,
        reason: "a record is here that this process cannot read as this object's (it does not parse, \
                 another version wrote it, or it names another object); the data it may name is left \
                 alone: repair or move the record, then retry"
            .into(),
    }
}

/// A volume's record read now, for a delete that acts on what it says (its delete policy): `None`
/// when there is none; refused as [`refuse_unread_record`] refuses when it does not parse or names
/// another volume; the read's own error when it cannot be read (a cache's older copy, say from
/// before another replica changed the policy, never decides).
pub fn volume_record_now(pool: &Pool, key: &Key, id: &str) -> Result<Option<VolumeRecord>, StorageError> {
    let path = pool.record_path(Kind::Volume, key);
    if pool.sys.files.entry(&path)? == files::Entry::Missing {
        return Ok(None);
    }
    match or_corrupt(record::load::<VolumeRecord>(&*pool.sys.files, &path))? {
        Some(None) => Ok(None),
        Some(Some(r)) if r.id.to_string() == id => Ok(Some(r)),
        _ => Err(unread(path)),
    }
}

/// A record read: `None` when it does not parse, the read's own error when it could not be read.
fn or_corrupt<T>(r: Result<Option<T>, StorageError>) -> Result<Option<Option<T>>, StorageError> {
    match r {
        Ok(found) => Ok(Some(found)),
        Err(StorageError::Corrupt { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes data that has been moved out of its place (into the trash): subvolumes through btrfs.
pub fn purge(sys: &StorageSys, path: &Path) -> Result<(), StorageError> {
    if sys.subvolumes.is_subvolume(path).unwrap_or(false) {
        // A read-only snapshot cannot be emptied file by file; btrfs drops a subvolume in one step.
        sys.subvolumes.delete(path)?;
        return Ok(());
    }
    sys.files.remove_tree(path)?;
    Ok(())
}

/// Why a volume's data is not as its record says, if it is not.
pub fn fault(pool: &Pool, layout: Layout, data: &Path) -> Option<String> {
    let entry = match pool.sys.files.entry(data) {
        Ok(e) => e,
        Err(e) => return Some(format!("volume data {} cannot be read: {e}", data.display())),
    };
    let want = if of(layout).is_tree() {
        files::Entry::Dir
    } else {
        files::Entry::File
    };
    if entry == files::Entry::Missing {
        return Some(format!("volume data {} is missing", data.display()));
    }
    if entry != want {
        return Some(format!(
            "volume data {} is a {entry:?}, expected a {want:?}",
            data.display()
        ));
    }
    of(layout).fault(pool, data)
}

/// Allocated bytes of an image file: what it already uses of its capacity.
pub fn allocated(pool: &Pool, data: &Path) -> u64 {
    pool.sys.files.allocated_upto(data, u64::MAX).bytes
}

/// How long a consistent snapshot waits for the FIFREEZE of one filesystem (a workload can keep
/// it waiting: [`crate::storage::freeze::freeze_within`]).
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every filesystem mounted from a loop device of `image`, frozen for as long as this lives, so a
/// copy of a volume in use is consistent. Thawed on drop, also on error.
struct Frozen {
    frozen: Vec<(std::path::PathBuf, crate::storage::freeze::Thawer)>,
}

impl Frozen {
    fn image(pool: &Pool, image: &Path) -> Result<Frozen, StorageError> {
        let freeze = crate::storage::freeze::freezer(&pool.sys.filesystems);
        let flying = crate::storage::freeze::in_flight();
        let mut frozen = Frozen { frozen: Vec::new() };
        for p in image_mounts(&pool.sys, image)? {
            let deadline = std::time::Instant::now() + FREEZE_WAIT;
            let thaw = crate::storage::freeze::freeze_within(&p, deadline, &freeze, &flying)?;
            frozen.frozen.push((p.mountpoint, thaw));
        }
        Ok(frozen)
    }

    /// Thaws now (each filesystem tried a few times): an error when one stayed frozen, which the
    /// snapshot then answers, rather than report success over a pod whose writes are stopped.
    fn thaw(mut self) -> Result<(), StorageError> {
        self.thaw_all()
    }

    fn thaw_all(&mut self) -> Result<(), StorageError> {
        let mut first = Ok(());
        for (m, thaw) in std::mem::take(&mut self.frozen) {
            if let Err(e) = thaw() {
                tracing::error!(mountpoint = %m.display(), error = %e, "could not thaw after a snapshot");
                if first.is_ok() {
                    first = Err(e.into());
                }
            }
        }
        first
    }
}

/// One mountpoint of each filesystem mounted from a loop device of `image` (a freeze holds the
/// whole filesystem, whichever of its mounts it is asked through), with that device.
fn image_mounts(sys: &StorageSys, image: &Path) -> Result<Vec<FreezePoint>, StorageError> {
    let mut points = Vec::new();
    for d in sys.devices.find_by_backing(image)? {
        points.extend(
            sys.mounter
                .mounted_from(&d.path)?
                .into_iter()
                .next()
                .map(|mountpoint| FreezePoint {
                    mountpoint,
                    device: d.path.clone(),
                }),
        );
    }
    Ok(points)
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.thaw_all(); // logged there
    }
}

/// Volumes are opened to every user like a fresh emptyDir; fsGroup narrows them in Kubernetes.
fn open_to_all(pool: &Pool, dir: &Path) -> Result<(), StorageError> {
    Ok(pool.sys.files.set_mode(dir, 0o777)?)
}
