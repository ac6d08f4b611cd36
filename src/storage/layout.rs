//! How each layout carves a volume out of its pool:
//!
//! | layout  | a volume is                    | capacity           | snapshot / clone                  |
//! |---------|--------------------------------|--------------------|-----------------------------------|
//! | `dir`   | a directory                    | recorded           | tree copy                         |
//! | `btrfs` | a subvolume                    | qgroup limit       | subvolume snapshot (instant)      |
//! | `image` | a sparse file, ext4/xfs or raw | the file's size    | reflink copy, else sparse copy    |
//!
//! Every function leaves either nothing or a whole object at the data path: copies are built in
//! `.work` and renamed into place; btrfs snapshots are atomic.

use std::path::Path;

use crate::crash;
use crate::sys::fstools::{self, FsType};
use crate::sys::{btrfs, copy, files, loopdev, mountinfo, SysError};

use super::config::PoolConfig;
use super::id::Key;
use super::pool::{Kind, Pool};
use super::record::{Layout, VolumeMode};
use super::StorageError;

/// What a pool's filesystem can do, found when the pool opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFeatures {
    pub reflink: bool,
    pub btrfs: bool,
}

/// Checks that the pool's filesystem can serve every layout the pool allows, and prepares it
/// (btrfs quotas). A pool that cannot is refused with a message saying why.
pub fn check_pool(config: &PoolConfig) -> Result<PoolFeatures, StorageError> {
    let is_btrfs = btrfs::is_btrfs(&config.path)?;
    if config.layouts.contains(&Layout::Btrfs) {
        if !is_btrfs {
            return Err(StorageError::PoolUnusable(format!(
                "pool '{}': layout btrfs needs a btrfs filesystem at {}, which is not btrfs",
                config.name.as_str(),
                config.path.display()
            )));
        }
        btrfs::enable_quota(&config.path)?;
    }
    Ok(PoolFeatures {
        reflink: copy::supports_reflink(&config.path),
        btrfs: is_btrfs,
    })
}

/// Makes an empty volume at its data path; returns the size of the filesystem made inside (image).
pub fn create_empty(
    pool: &Pool,
    key: &Key,
    layout: Layout,
    capacity: u64,
    mode: VolumeMode,
    fs: FsType,
) -> Result<u64, StorageError> {
    let data = pool.data_path(Kind::Volume, key);
    clear_leftover(pool, Kind::Volume, key)?;
    match layout {
        Layout::Dir => {
            files::ensure_dir(&data, 0o777)?;
            open_to_all(&data)?;
            Ok(0)
        }
        Layout::Btrfs => {
            btrfs::create_subvolume(&data)?;
            open_to_all(&data)?;
            btrfs::set_limit(&data, capacity)?;
            // A new subvolume is on disk only after the next transaction commit; the record that
            // follows must not promise a volume a power loss could take back.
            btrfs::commit(&data)?;
            Ok(0)
        }
        Layout::Image => {
            let work = pool.work_path(Kind::Volume, key);
            files::remove_tree(&work)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&work)
                .map_err(|e| SysError::io("create image", &work, e))?;
            f.set_len(capacity).map_err(|e| SysError::io("size image", &work, e))?;
            drop(f);
            if mode == VolumeMode::Filesystem {
                if let Err(e) = fstools::mkfs(fs, &work) {
                    let _ = files::remove_tree(&work); // nothing is left in `.work` for the retry to trip on
                    return Err(e.into());
                }
            }
            crash::point("image:before-rename");
            std::fs::rename(&work, &data).map_err(|e| SysError::io("rename", &data, e))?;
            Ok(if mode == VolumeMode::Filesystem { capacity } else { 0 })
        }
    }
}

/// Makes a new volume (or, with `Kind::Snapshot`, a snapshot) from `src`, the data of a volume or
/// snapshot of the same layout. The copy of an image in use is crash-consistent (what a power cut
/// would leave, which the filesystem's journal recovers); `freeze` makes it filesystem-consistent by
/// freezing the mounted filesystem around the copy, at the cost of flushing it.
pub fn create_copy(
    pool: &Pool,
    kind: Kind,
    key: &Key,
    layout: Layout,
    src: &Path,
    writable: bool,
    freeze: bool,
) -> Result<(), StorageError> {
    let data = pool.data_path(kind, key);
    clear_leftover(pool, kind, key)?;
    match layout {
        Layout::Btrfs => {
            btrfs::snapshot(src, &data, !writable)?;
            Ok(())
        }
        Layout::Dir | Layout::Image => {
            let work = pool.work_path(kind, key);
            files::remove_tree(&work)?;
            // The record written after this claims the copy: it must be on disk before the rename.
            if layout == Layout::Dir {
                copy::copy_tree(src, &work)?;
                copy::sync_filesystem(&pool.work_dir())?;
            } else {
                let _frozen = if freeze { Some(Frozen::image(src)?) } else { None };
                copy::copy_file(src, &work)?; // fsyncs the copy itself
            }
            crash::point("copy:before-rename");
            std::fs::rename(&work, &data).map_err(|e| SysError::io("rename", &data, e))?;
            Ok(())
        }
    }
}

/// Invariant 2: a record names exactly the data it was made for. Data at an object's place with no
/// record is what a failed or crashed call left; nothing proves which request made it (a retry of
/// the same name may name another source), so it is removed and the object made anew, never adopted.
/// Callers hold the object's lock and have checked that it has no record.
pub fn clear_leftover(pool: &Pool, kind: Kind, key: &Key) -> Result<(), StorageError> {
    let data = pool.data_path(kind, key);
    match files::entry(&data)? {
        files::Entry::Missing => return Ok(()),
        files::Entry::Dir if btrfs::is_subvolume(&data).unwrap_or(false) => btrfs::delete_subvolume(&data)?,
        _ => {
            let trashed = pool
                .trash_dir()
                .join(format!("leftover-{}-{}", key.as_str(), uuid::Uuid::new_v4().simple()));
            std::fs::rename(&data, &trashed).map_err(|e| SysError::io("rename", &data, e))?;
            purge(&trashed)?;
        }
    }
    tracing::info!(path = %data.display(), "removed data a failed call left without a record");
    Ok(())
}

/// Gives a new volume its capacity after a copy: the image grows (its filesystem grows at the next
/// stage), a btrfs subvolume gets its limit.
pub fn set_capacity(layout: Layout, data: &Path, capacity: u64) -> Result<(), StorageError> {
    match layout {
        Layout::Dir => {}
        Layout::Btrfs => {
            btrfs::set_limit(data, capacity)?;
            btrfs::commit(data)?;
        }
        Layout::Image => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(data)
                .map_err(|e| SysError::io("open image", data, e))?;
            let now = f.metadata().map_err(|e| SysError::io("stat image", data, e))?.len();
            if capacity > now {
                f.set_len(capacity).map_err(|e| SysError::io("grow image", data, e))?;
                f.sync_all().map_err(|e| SysError::io("fsync image", data, e))?;
            }
        }
    }
    Ok(())
}

/// Removes data that has been moved out of its place (into the trash): subvolumes through btrfs.
pub fn purge(path: &Path) -> Result<(), StorageError> {
    if btrfs::is_subvolume(path).unwrap_or(false) {
        // A read-only snapshot cannot be emptied file by file; btrfs drops a subvolume in one step.
        btrfs::delete_subvolume(path)?;
        return Ok(());
    }
    files::remove_tree(path)?;
    Ok(())
}

/// Why a volume's data is not as its record says, if it is not.
pub fn fault(layout: Layout, data: &Path) -> Option<String> {
    let entry = match files::entry(data) {
        Ok(e) => e,
        Err(e) => return Some(format!("volume data {} cannot be read: {e}", data.display())),
    };
    let want = match layout {
        Layout::Dir | Layout::Btrfs => files::Entry::Dir,
        Layout::Image => files::Entry::File,
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
    if layout == Layout::Btrfs && !btrfs::is_subvolume(data).unwrap_or(false) {
        return Some(format!("volume data {} is not a btrfs subvolume", data.display()));
    }
    None
}

/// Allocated bytes of an image file: what it already uses of its capacity.
pub fn allocated(data: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(data).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Allocated bytes of everything at `path`: a file, or a tree (symlinks are not followed). What
/// removing or reusing it gives back to the pool.
pub fn allocated_tree(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = allocated(path);
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path).into_iter().flatten().flatten();
    own + children.map(|e| allocated_tree(&e.path())).sum::<u64>()
}

/// Allocated bytes of the tree at `path`, counted until they reach `stop` (a walk can be long; the
/// caller only needs to know whether a bound is passed). Symlinks are not followed; subvolumes and
/// mounts below are counted as files of the tree.
pub fn allocated_tree_upto(path: &Path, stop: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total = total.saturating_add(allocated(&p));
        if total >= stop {
            return total;
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    total
}

/// Every filesystem mounted from a loop device of `image`, frozen for as long as this lives, so a
/// copy of a volume in use is consistent. Thawed on drop, also on error.
struct Frozen {
    mountpoints: Vec<std::path::PathBuf>,
}

impl Frozen {
    fn image(image: &Path) -> Result<Frozen, StorageError> {
        let devices = loopdev::find_by_backing(image)?;
        let mut frozen = Frozen {
            mountpoints: Vec::new(),
        };
        if devices.is_empty() {
            return Ok(frozen);
        }
        let mounts = mountinfo::read(Path::new(mountinfo::SELF))?;
        for d in &devices {
            let source = d.path.to_string_lossy();
            // One mount per device is enough: a freeze holds the whole filesystem.
            if let Some(m) = mounts.iter().find(|m| m.source == source && m.root == Path::new("/")) {
                fstools::freeze(&m.mount_point)?;
                frozen.mountpoints.push(m.mount_point.clone());
            }
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for m in &self.mountpoints {
            if let Err(e) = fstools::thaw(m) {
                tracing::error!(mountpoint = %m.display(), error = %e, "could not thaw after a snapshot");
            }
        }
    }
}

/// Volumes are opened to every user like a fresh emptyDir; fsGroup narrows them in Kubernetes.
fn open_to_all(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(|e| SysError::io("chmod", dir, e))?;
    Ok(())
}
