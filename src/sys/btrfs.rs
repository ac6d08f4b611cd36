//! btrfs subvolumes, snapshots, qgroup limits and the compression property.
//!
//! Everything on a volume's path (create, snapshot, delete, limit, usage, compression) is a direct
//! ioctl or xattr call: spawning `btrfs` costs 1.5–2.5 ms each time (measured), and CreateVolume on
//! a btrfs pool must stay well under 10 ms; create + limit through ioctls takes ~20 µs. Only
//! `enable_quota`, run once when a pool opens, uses the tool.
//!
//! Usage comes from `/sys/fs/btrfs/<fsid>/qgroups/0_<id>/` after a sync: the accounting is done at
//! transaction commit, and statfs does not show qgroup limits at all.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{cvt, run_tool, Step, SysError};

/// Where the kernel shows each mounted btrfs, by fsid.
pub const SYS_FS_BTRFS: &str = "/sys/fs/btrfs";

/// Compression algorithms the `compression` property takes.
pub const COMPRESSION_ALGORITHMS: &[&str] = &["zstd", "lzo", "zlib"];

const COMPRESSION_XATTR: &std::ffi::CStr = c"btrfs.compression";

// linux/btrfs.h and linux/btrfs_tree.h
const BTRFS_IOCTL_MAGIC: u32 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_INO_LOOKUP_PATH_MAX: usize = 4080;
/// The inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const BTRFS_SUBVOL_SPEC_BY_ID: u64 = 1 << 4;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1 << 0;
const BTRFS_ROOT_TREE_OBJECTID: u64 = 1;
const BTRFS_ROOT_REF_KEY: u32 = 156;
const BTRFS_SEARCH_ARGS_BUFSIZE: usize = 4096 - std::mem::size_of::<SearchKey>();
/// `max_rfer` value that clears a limit (CLEAR_VALUE in fs/btrfs/qgroup.c).
const BTRFS_QGROUP_LIMIT_CLEAR: u64 = u64::MAX;

const BTRFS_IOC_SUBVOL_CREATE: libc::Ioctl = libc::_IOW::<VolArgs>(BTRFS_IOCTL_MAGIC, 14);
const BTRFS_IOC_SNAP_DESTROY: libc::Ioctl = libc::_IOW::<VolArgs>(BTRFS_IOCTL_MAGIC, 15);
const BTRFS_IOC_TREE_SEARCH: libc::Ioctl = libc::_IOWR::<SearchArgs>(BTRFS_IOCTL_MAGIC, 17);
const BTRFS_IOC_INO_LOOKUP: libc::Ioctl = libc::_IOWR::<InoLookupArgs>(BTRFS_IOCTL_MAGIC, 18);
const BTRFS_IOC_SNAP_CREATE_V2: libc::Ioctl = libc::_IOW::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 23);
const BTRFS_IOC_FS_INFO: libc::Ioctl = libc::_IOR::<FsInfoArgs>(BTRFS_IOCTL_MAGIC, 31);
const BTRFS_IOC_QGROUP_LIMIT: libc::Ioctl = libc::_IOR::<QgroupLimitArgs>(BTRFS_IOCTL_MAGIC, 43);
const BTRFS_IOC_QUOTA_RESCAN_WAIT: libc::Ioctl = libc::_IO(BTRFS_IOCTL_MAGIC, 46);
const BTRFS_IOC_SNAP_DESTROY_V2: libc::Ioctl = libc::_IOW::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 63);

/// `struct btrfs_ioctl_vol_args`
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` (the size/qgroup_inherit union is left zero).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_search_key`
#[repr(C)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: u64,
    unused2: u64,
    unused3: u64,
    unused4: u64,
}

/// `struct btrfs_ioctl_search_args`: the key, then items, each a `struct btrfs_ioctl_search_header`
/// (transid, objectid, offset: u64; type, len: u32) followed by `len` bytes of item data.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; BTRFS_SEARCH_ARGS_BUFSIZE],
}

const SEARCH_HEADER_LEN: usize = 32;

/// `struct btrfs_ioctl_ino_lookup_args`
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; BTRFS_INO_LOOKUP_PATH_MAX],
}

/// `struct btrfs_ioctl_fs_info_args`
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

/// `struct btrfs_qgroup_limit`
#[repr(C)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args`
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

/// Kernel argument structs that are valid all-zero.
///
/// # Safety
/// Only for `repr(C)` structs made of integers and integer arrays, where every bit pattern
/// (and so all zeroes) is a valid value.
unsafe trait Plain: Sized {
    fn zeroed() -> Self {
        // SAFETY: the trait's contract: all-zero is a valid value of Self.
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: each is repr(C) and made only of integers and integer arrays.
unsafe impl Plain for VolArgs {}
// SAFETY: as above.
unsafe impl Plain for VolArgsV2 {}
// SAFETY: as above.
unsafe impl Plain for InoLookupArgs {}
// SAFETY: as above.
unsafe impl Plain for FsInfoArgs {}
// SAFETY: as above.
unsafe impl Plain for SearchArgs {}

/// Whether `path` is on a btrfs filesystem (statfs f_type is BTRFS_SUPER_MAGIC).
pub fn is_btrfs(path: &Path) -> Result<bool, SysError> {
    let st = nix::sys::statfs::statfs(path).step("statfs", path)?;
    Ok(st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// Whether `path` itself (not a symlink to it) is the root directory of a btrfs subvolume:
/// a directory with inode number 256 on btrfs. Nothing at `path` is not a subvolume.
pub fn is_subvolume(path: &Path) -> Result<bool, SysError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && m.ino() == BTRFS_FIRST_FREE_OBJECTID => is_btrfs(path),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SysError::io("lstat", path, e)),
    }
}

/// Turns qgroups on for the filesystem holding `path` and waits for the rescan the kernel starts,
/// so the first limits and usage figures are right. Enabling again is a no-op.
/// Uses the tool: this runs once per pool, and the tool's messages are the clearest.
pub fn enable_quota(path: &Path) -> Result<(), SysError> {
    run_tool("btrfs", &["quota", "enable", &path.to_string_lossy()])?;
    let d = open_dir(path, false)?;
    // SAFETY: QUOTA_RESCAN_WAIT takes no argument; `d` is an open fd.
    cvt(unsafe { libc::ioctl(d.as_raw_fd(), BTRFS_IOC_QUOTA_RESCAN_WAIT, 0) })
        .step("wait for the qgroup rescan (BTRFS_IOC_QUOTA_RESCAN_WAIT) on", path)?;
    Ok(())
}

/// Makes a new, empty subvolume at `path` (BTRFS_IOC_SUBVOL_CREATE). `path` must not exist
/// (EEXIST otherwise) and its parent must be a directory on btrfs.
pub fn create_subvolume(path: &Path) -> Result<(), SysError> {
    let (parent, name) = split(path)?;
    let p = open_dir(parent, false)?;
    require_btrfs_fd(&p, parent, "create subvolume (the parent directory is not on btrfs) in")?;
    let mut args = VolArgs::zeroed();
    set_name(&mut args.name, name, path)?;
    // SAFETY: SUBVOL_CREATE reads one `struct btrfs_ioctl_vol_args`, which `args` is; `p` is open.
    cvt(unsafe { libc::ioctl(p.as_raw_fd(), BTRFS_IOC_SUBVOL_CREATE, &args as *const VolArgs) })
        .step("create subvolume (BTRFS_IOC_SUBVOL_CREATE)", path)?;
    Ok(())
}

/// Snapshots the subvolume `src` to `dst` (BTRFS_IOC_SNAP_CREATE_V2), read-only if asked. `dst`
/// must not exist and must be on the same filesystem. `src` must be a subvolume itself: the ioctl
/// would otherwise snapshot the whole subvolume that contains it.
pub fn snapshot(src: &Path, dst: &Path, read_only: bool) -> Result<(), SysError> {
    crate::crash::fail("btrfs:snapshot").step("snapshot subvolume", dst)?;
    let s = open_dir(src, true)?;
    if !fd_is_subvolume(&s, src)? {
        return Err(SysError::io(
            "snapshot (the source is not a btrfs subvolume)",
            src,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let (parent, name) = split(dst)?;
    let p = open_dir(parent, false)?;
    let mut args = VolArgsV2::zeroed();
    args.fd = i64::from(s.as_raw_fd());
    if read_only {
        args.flags = BTRFS_SUBVOL_RDONLY;
    }
    set_name(&mut args.name, name, dst)?;
    // SAFETY: SNAP_CREATE_V2 reads one `struct btrfs_ioctl_vol_args_v2`, which `args` is; both
    // fds are open for the duration of the call.
    cvt(unsafe { libc::ioctl(p.as_raw_fd(), BTRFS_IOC_SNAP_CREATE_V2, &args as *const VolArgsV2) })
        .step("snapshot (BTRFS_IOC_SNAP_CREATE_V2) to", dst)?;
    Ok(())
}

/// Deletes the subvolume at `path` (BTRFS_IOC_SNAP_DESTROY), read-only snapshots included. Nothing
/// at `path` is fine; a plain directory there is refused, never emptied.
///
/// Subvolumes that a workload made inside (anyone with write access can, and container engines on
/// btrfs do, one per image layer) are deleted first, deepest first. They are found in the root
/// tree by id and deleted by id, never through paths inside the volume, which its workload controls.
///
/// The space and the subvolume's level-0 qgroup are freed later by the kernel's cleaner thread,
/// which runs once per commit interval (30 s by default); recent kernels (seen on 6.18) then remove
/// the qgroup themselves, so it is not removed here. Older kernels leave it behind until
/// `btrfs qgroup clear-stale`. A mounted subvolume fails with EBUSY.
pub fn delete_subvolume(path: &Path) -> Result<(), SysError> {
    if !is_subvolume(path)? {
        return match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            _ => Err(SysError::io(
                "delete subvolume (not a btrfs subvolume; refusing to delete)",
                path,
                io::Error::from_raw_os_error(libc::EINVAL),
            )),
        };
    }
    let (parent, name) = split(path)?;
    let p = open_dir(parent, false)?;
    let mut args = VolArgs::zeroed();
    set_name(&mut args.name, name, path)?;
    // A workload may still be adding nested subvolumes while they are deleted; a few rounds, then
    // the error.
    for _ in 0..3 {
        // SAFETY: SNAP_DESTROY reads one `struct btrfs_ioctl_vol_args`, which `args` is; `p` is open.
        match cvt(unsafe { libc::ioctl(p.as_raw_fd(), BTRFS_IOC_SNAP_DESTROY, &args as *const VolArgs) }) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()), // deleted meanwhile
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                let v = open_dir(path, true)?;
                let id = fd_subvolume_id(&v, path)?;
                delete_nested(&v, path, id)?;
            }
            Err(e) => return Err(SysError::io("delete subvolume (BTRFS_IOC_SNAP_DESTROY)", path, e)),
        }
    }
    Err(SysError::io(
        "delete subvolume (nested subvolumes keep appearing)",
        path,
        io::Error::from_raw_os_error(libc::ENOTEMPTY),
    ))
}

/// Deletes every subvolume below subvolume `id`, each after the ones inside it.
fn delete_nested(fd: &File, path: &Path, id: u64) -> Result<(), SysError> {
    let mut order = Vec::new();
    let mut pending = vec![id];
    while let Some(parent) = pending.pop() {
        for child in child_subvolumes(fd, path, parent)? {
            order.push(child);
            pending.push(child);
        }
    }
    // Every id comes after its ancestors in `order`: reversed, children go before their parents.
    for child in order.into_iter().rev() {
        let mut args = VolArgsV2::zeroed();
        args.flags = BTRFS_SUBVOL_SPEC_BY_ID;
        // The name union holds `__u64 subvolid` at its start.
        args.name[..8].copy_from_slice(&child.to_ne_bytes());
        // SAFETY: SNAP_DESTROY_V2 reads one `struct btrfs_ioctl_vol_args_v2`, which `args` is; `fd`
        // is open on the same filesystem.
        match cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_SNAP_DESTROY_V2, &args as *const VolArgsV2) }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(SysError::io(
                    "delete a nested subvolume (BTRFS_IOC_SNAP_DESTROY_V2 by id) inside",
                    path,
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Ids of the subvolumes directly inside subvolume `parent`: the offsets of its ROOT_REF items in
/// the root tree (BTRFS_IOC_TREE_SEARCH, which needs CAP_SYS_ADMIN).
fn child_subvolumes(fd: &File, path: &Path, parent: u64) -> Result<Vec<u64>, SysError> {
    let mut children = Vec::new();
    let mut min_offset = 0u64;
    loop {
        let mut args = SearchArgs::zeroed();
        args.key = SearchKey {
            tree_id: BTRFS_ROOT_TREE_OBJECTID,
            min_objectid: parent,
            max_objectid: parent,
            min_offset,
            max_offset: u64::MAX,
            min_transid: 0,
            max_transid: u64::MAX,
            min_type: BTRFS_ROOT_REF_KEY,
            max_type: BTRFS_ROOT_REF_KEY,
            nr_items: u32::MAX,
            unused: 0,
            unused1: 0,
            unused2: 0,
            unused3: 0,
            unused4: 0,
        };
        // SAFETY: TREE_SEARCH reads and writes one `struct btrfs_ioctl_search_args`, which `args`
        // is; `fd` is open.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_TREE_SEARCH, &mut args as *mut SearchArgs) })
            .step("list nested subvolumes (BTRFS_IOC_TREE_SEARCH) of", path)?;
        let found = args.key.nr_items as usize;
        if found == 0 {
            return Ok(children);
        }
        let mut at = 0;
        for _ in 0..found {
            let Some(h) = args.buf.get(at..at + SEARCH_HEADER_LEN) else {
                break;
            };
            let u64_at = |i: usize| u64::from_ne_bytes(h[i..i + 8].try_into().unwrap_or_default());
            let u32_at = |i: usize| u32::from_ne_bytes(h[i..i + 4].try_into().unwrap_or_default());
            let (objectid, offset, kind) = (u64_at(8), u64_at(16), u32_at(24));
            let len = u32_at(28) as usize;
            if objectid == parent && kind == BTRFS_ROOT_REF_KEY {
                children.push(offset);
            }
            min_offset = offset.saturating_add(1);
            at += SEARCH_HEADER_LEN + len;
        }
        if min_offset == u64::MAX {
            return Ok(children);
        }
    }
}

/// The ids of the subvolumes made directly inside the subvolume at `path`.
pub fn nested_subvolumes(path: &Path) -> Result<Vec<u64>, SysError> {
    let v = open_dir(path, true)?;
    let id = fd_subvolume_id(&v, path)?;
    child_subvolumes(&v, path, id)
}

/// The id of the subvolume that holds `path` (its tree id): 5 for the top level, ≥ 256 for the
/// others. BTRFS_IOC_INO_LOOKUP with objectid 256 answers this without privileges.
pub fn subvolume_id(path: &Path) -> Result<u64, SysError> {
    let f = open_any(path)?;
    fd_subvolume_id(&f, path)
}

fn fd_subvolume_id(f: &File, path: &Path) -> Result<u64, SysError> {
    let mut args = InoLookupArgs::zeroed();
    args.objectid = BTRFS_FIRST_FREE_OBJECTID;
    // SAFETY: INO_LOOKUP reads and writes one `struct btrfs_ioctl_ino_lookup_args`, which `args`
    // is; `f` is open.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), BTRFS_IOC_INO_LOOKUP, &mut args as *mut InoLookupArgs) })
        .step("look up the subvolume id (BTRFS_IOC_INO_LOOKUP) of", path)?;
    Ok(args.treeid)
}

/// Commits the running transaction of the filesystem holding `path` (syncfs). A new subvolume and
/// a limit are in force at once but reach the disk only with the next commit (every 30 s by
/// default): call this before recording them as done where a crash must not lose them. Snapshots
/// need no commit; the snapshot ioctl commits itself.
pub fn commit(path: &Path) -> Result<(), SysError> {
    let f = open_any(path)?;
    nix::unistd::syncfs(&f)
        .map_err(io::Error::from)
        .step("commit (syncfs)", path)?;
    Ok(())
}

/// Limits the bytes the subvolume at `path` references (its level-0 qgroup's max_rfer), as
/// `btrfs qgroup limit <bytes> <path>` does; 0 removes the limit. `path` must be a subvolume: a
/// limit set through a plain directory would land on the subvolume that contains it.
///
/// The limit is in force at once but is written to disk with the next transaction commit.
pub fn set_limit(path: &Path, bytes: u64) -> Result<(), SysError> {
    let f = open_dir(path, true)?;
    if !fd_is_subvolume(&f, path)? {
        return Err(SysError::io(
            "limit qgroup (not a btrfs subvolume; a limit would apply to the subvolume holding it)",
            path,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let args = QgroupLimitArgs {
        qgroupid: 0, // 0: the qgroup of the subvolume `f` is in
        lim: QgroupLimit {
            flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
            max_rfer: if bytes == 0 { BTRFS_QGROUP_LIMIT_CLEAR } else { bytes },
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        },
    };
    // SAFETY: QGROUP_LIMIT reads one `struct btrfs_ioctl_qgroup_limit_args`, which `args` is; `f`
    // is open.
    match cvt(unsafe { libc::ioctl(f.as_raw_fd(), BTRFS_IOC_QGROUP_LIMIT, &args as *const QgroupLimitArgs) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(SysError::io(
            "limit qgroup (quotas are not enabled on this btrfs: enable_quota first)",
            path,
            e,
        )),
        Err(e) => Err(SysError::io("limit qgroup (BTRFS_IOC_QGROUP_LIMIT)", path, e)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QgroupUsage {
    /// Bytes the subvolume references, shared with snapshots or not.
    pub referenced: u64,
    /// Bytes only this subvolume references: what deleting it would free.
    pub exclusive: u64,
    /// The limit on `referenced`, if any.
    pub max_referenced: Option<u64>,
}

/// Usage and limit of the subvolume at `path`, from its level-0 qgroup in sysfs after a syncfs.
///
/// The sync is needed because btrfs accounts qgroups at transaction commit: without it, data
/// written in the last 30 s is missing. syncfs commits and flushes delayed allocation, as
/// `btrfs qgroup show --sync` does; reading sysfs then costs three small reads, where the tool
/// would add a process start and a tree search.
pub fn usage(path: &Path) -> Result<QgroupUsage, SysError> {
    usage_in(Path::new(SYS_FS_BTRFS), path)
}

fn usage_in(sys: &Path, path: &Path) -> Result<QgroupUsage, SysError> {
    let f = open_dir(path, true)?;
    if !fd_is_subvolume(&f, path)? {
        return Err(SysError::io(
            "read qgroup usage (not a btrfs subvolume)",
            path,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    nix::unistd::syncfs(&f).map_err(io::Error::from).step("syncfs", path)?;
    let id = fd_subvolume_id(&f, path)?;
    let qgroups = qgroups_dir(sys, &f, path)?;
    let dir = qgroups.join(format!("0_{id}"));
    let read = |name: &str| -> Result<u64, SysError> {
        let p = dir.join(name);
        let s = fs::read_to_string(&p).step("read", &p)?;
        s.trim()
            .parse::<u64>()
            .map_err(|e| SysError::io("parse", &p, io::Error::new(io::ErrorKind::InvalidData, e)))
    };
    let limited = read("limit_flags")? & BTRFS_QGROUP_LIMIT_MAX_RFER != 0;
    Ok(QgroupUsage {
        referenced: read("referenced")?,
        exclusive: read("exclusive")?,
        max_referenced: if limited { Some(read("max_referenced")?) } else { None },
    })
}

/// Whether the kernel marked the qgroup numbers of the filesystem holding `path` inconsistent
/// (after enabling quotas on a populated filesystem, or deleting a subvolume whose tree is at least
/// `qgroups/drop_subtree_threshold` high): usage is then wrong until a rescan.
pub fn qgroups_inconsistent(path: &Path) -> Result<bool, SysError> {
    let f = open_any(path)?;
    let p = qgroups_dir(Path::new(SYS_FS_BTRFS), &f, path)?.join("inconsistent");
    Ok(fs::read_to_string(&p).step("read", &p)?.trim() != "0")
}

/// `/sys/fs/btrfs/<fsid>/qgroups` of the filesystem `f` is on.
fn qgroups_dir(sys: &Path, f: &File, path: &Path) -> Result<PathBuf, SysError> {
    let mut args = FsInfoArgs::zeroed();
    // SAFETY: FS_INFO writes one `struct btrfs_ioctl_fs_info_args`, which `args` is; `f` is open.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), BTRFS_IOC_FS_INFO, &mut args as *mut FsInfoArgs) })
        .step("read filesystem info (BTRFS_IOC_FS_INFO) of", path)?;
    let dir = sys.join(uuid_string(&args.fsid)).join("qgroups");
    if !dir.exists() {
        return Err(SysError::io(
            "read qgroups (quotas are not enabled on this btrfs)",
            path,
            io::Error::from_raw_os_error(libc::ENOTCONN),
        ));
    }
    Ok(dir)
}

fn uuid_string(b: &[u8; 16]) -> String {
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Sets (`Some`) or removes (`None`) the compression property of a subvolume, directory or file;
/// files made inside afterwards inherit it. This is the `btrfs.compression` xattr that
/// `btrfs property set <path> compression <algo>` writes.
pub fn set_compression(path: &Path, algo: Option<&str>) -> Result<(), SysError> {
    let c = cpath(path)?;
    match algo {
        Some(a) => {
            if !COMPRESSION_ALGORITHMS.contains(&a) {
                return Err(SysError::io(
                    "set compression (unknown algorithm; known: zstd, lzo, zlib)",
                    path,
                    io::Error::new(io::ErrorKind::InvalidInput, format!("'{a}'")),
                ));
            }
            // SAFETY: both strings are NUL-terminated and `a` is valid for a.len() bytes.
            cvt(unsafe { libc::lsetxattr(c.as_ptr(), COMPRESSION_XATTR.as_ptr(), a.as_ptr().cast(), a.len(), 0) })
                .step("set compression property", path)?;
        }
        None => {
            // SAFETY: both strings are NUL-terminated.
            match cvt(unsafe { libc::lremovexattr(c.as_ptr(), COMPRESSION_XATTR.as_ptr()) }) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(SysError::io("remove compression property", path, e)),
            }
        }
    }
    Ok(())
}

/// The compression property of `path`, `None` when none is set.
pub fn compression(path: &Path) -> Result<Option<String>, SysError> {
    let c = cpath(path)?;
    let mut buf = vec![0u8; 64];
    // SAFETY: `buf` has buf.len() writable bytes; both strings are NUL-terminated.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            COMPRESSION_XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(SysError::io("read compression property", path, e)),
        };
    }
    buf.truncate(n as usize);
    let value = String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string();
    Ok(if value.is_empty() { None } else { Some(value) })
}

/// The parent directory and the final name of a path that names something to create or delete.
fn split(path: &Path) -> Result<(&Path, &OsStr), SysError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((
            if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            },
            name,
        )),
        _ => Err(SysError::io(
            "split into directory and name",
            path,
            io::Error::from_raw_os_error(libc::EINVAL),
        )),
    }
}

fn set_name(buf: &mut [u8], name: &OsStr, path: &Path) -> Result<(), SysError> {
    let b = name.as_bytes();
    if b.len() >= buf.len() || b.contains(&0) {
        return Err(SysError::io(
            "subvolume name (too long or contains NUL)",
            path,
            io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        ));
    }
    buf[..b.len()].copy_from_slice(b);
    Ok(())
}

fn open_dir(path: &Path, nofollow: bool) -> Result<File, SysError> {
    let mut flags = libc::O_CLOEXEC | libc::O_DIRECTORY;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .step("open directory", path)
}

fn open_any(path: &Path) -> Result<File, SysError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .step("open", path)
}

fn fd_is_subvolume(f: &File, path: &Path) -> Result<bool, SysError> {
    let md = f.metadata().step("stat", path)?;
    if md.ino() != BTRFS_FIRST_FREE_OBJECTID || !md.is_dir() {
        return Ok(false);
    }
    let st = nix::sys::statfs::fstatfs(f).step("statfs", path)?;
    Ok(st.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

fn require_btrfs_fd(f: &File, path: &Path, step: &'static str) -> Result<(), SysError> {
    let st = nix::sys::statfs::fstatfs(f).step("statfs", path)?;
    if st.filesystem_type() != nix::sys::statfs::BTRFS_SUPER_MAGIC {
        return Err(SysError::io(step, path, io::Error::from_raw_os_error(libc::EXDEV)));
    }
    Ok(())
}

fn cpath(path: &Path) -> Result<CString, SysError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| SysError::io("path", path, io::Error::new(io::ErrorKind::InvalidInput, e)))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::sys::loopdev::fixture::Image;

    const MIB: u64 = 1 << 20;

    /// A btrfs made in a sparse file, attached, mounted, with quotas on.
    fn btrfs(size: u64) -> Image {
        btrfs_with(size, None)
    }

    fn btrfs_with(size: u64, options: Option<&str>) -> Image {
        let mut img = Image::new(size);
        run_tool("mkfs.btrfs", &["-q", "-f", &img.file.to_string_lossy()]).unwrap();
        img.attach();
        img.mount_with("btrfs", options);
        enable_quota(&img.mnt).unwrap();
        img
    }

    /// Writes `total` bytes in 1 MiB chunks until done or an error; returns bytes written and the
    /// error's errno.
    fn fill(path: &Path, total: u64) -> (u64, Option<i32>) {
        let mut f = File::create(path).unwrap();
        let chunk = vec![0xA5u8; MIB as usize];
        let mut written = 0;
        while written < total {
            match f.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) => return (written, e.raw_os_error()),
            }
        }
        match f.sync_all() {
            Ok(()) => (written, None),
            Err(e) => (written, e.raw_os_error()),
        }
    }

    #[test]
    // libc::Ioctl is c_ulong on glibc and c_int on musl: the cast is a no-op only on some targets.
    #[allow(clippy::unnecessary_cast)]
    fn structs_and_ioctl_numbers_match_linux_btrfs_h() {
        // Printed by a C program including <linux/btrfs.h>.
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::offset_of!(VolArgsV2, name), 56);
        assert_eq!(std::mem::size_of::<InoLookupArgs>(), 4096);
        assert_eq!(std::mem::size_of::<FsInfoArgs>(), 1024);
        assert_eq!(std::mem::offset_of!(FsInfoArgs, fsid), 16);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE as u64, 0x5000_940e);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY as u64, 0x5000_940f);
        assert_eq!(BTRFS_IOC_INO_LOOKUP as u64, 0xd000_9412);
        assert_eq!(BTRFS_IOC_SNAP_CREATE_V2 as u64, 0x5000_9417);
        assert_eq!(BTRFS_IOC_FS_INFO as u64, 0x8400_941f);
        assert_eq!(BTRFS_IOC_QGROUP_LIMIT as u64, 0x8030_942b);
        assert_eq!(BTRFS_IOC_QUOTA_RESCAN_WAIT as u64, 0x942e);
        assert_eq!(std::mem::size_of::<SearchKey>(), 104);
        assert_eq!(std::mem::size_of::<SearchArgs>(), 4096);
        assert_eq!(BTRFS_IOC_TREE_SEARCH as u64, 0xd000_9411);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY_V2 as u64, 0x5000_943f);
    }

    #[test]
    fn uuid_is_printed_like_sysfs_names_it() {
        let b = [
            0x2a, 0x1a, 0xa4, 0x2c, 0xb9, 0x5a, 0x43, 0x1e, 0xbe, 0x98, 0xf2, 0xdb, 0x3c, 0xa1, 0xf8, 0x63,
        ];
        assert_eq!(uuid_string(&b), "2a1aa42c-b95a-431e-be98-f2db3ca1f863");
    }

    #[test]
    fn a_plain_filesystem_is_not_btrfs() {
        let dir = tempfile::tempdir().unwrap();
        if is_btrfs(dir.path()).unwrap() {
            return; // the temp dir itself is on btrfs: nothing to check here
        }
        assert!(!is_subvolume(dir.path()).unwrap());
        let err = create_subvolume(&dir.path().join("sub")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EXDEV));
        assert!(!dir.path().join("sub").exists());
    }

    #[test]
    fn subvolumes_are_told_from_directories() {
        let img = btrfs(512 * MIB);
        let m = &img.mnt;
        assert!(is_btrfs(m).unwrap());
        assert!(is_subvolume(m).unwrap(), "the top level is a subvolume");
        assert_eq!(subvolume_id(m).unwrap(), 5);
        let sub = m.join("vol");
        assert!(!is_subvolume(&sub).unwrap(), "nothing there");
        create_subvolume(&sub).unwrap();
        assert!(is_subvolume(&sub).unwrap());
        assert!(subvolume_id(&sub).unwrap() >= 256);
        commit(&sub).unwrap();
        assert_eq!(create_subvolume(&sub).unwrap_err().errno(), Some(libc::EEXIST));
        fs::create_dir(m.join("plain")).unwrap();
        assert!(!is_subvolume(&m.join("plain")).unwrap());
        std::os::unix::fs::symlink(&sub, m.join("link")).unwrap();
        assert!(
            !is_subvolume(&m.join("link")).unwrap(),
            "a symlink to a subvolume is not one"
        );
        img.finish();
    }

    #[test]
    fn limit_stops_writes_with_edquot_and_usage_shows_it() {
        let img = btrfs(512 * MIB);
        let sub = img.mnt.join("vol");
        create_subvolume(&sub).unwrap();
        set_limit(&sub, 8 * MIB).unwrap();
        let (written, errno) = fill(&sub.join("data"), 16 * MIB);
        assert_eq!(errno, Some(libc::EDQUOT), "wrote {written} bytes past an 8 MiB limit");
        assert!(written <= 8 * MIB, "{written}");
        let u = usage(&sub).unwrap();
        assert_eq!(u.max_referenced, Some(8 * MIB));
        assert!(
            u.referenced.abs_diff(written) <= MIB,
            "referenced {} written {written}",
            u.referenced
        );
        assert!(
            u.exclusive.abs_diff(written) <= MIB,
            "exclusive {} written {written}",
            u.exclusive
        );

        set_limit(&sub, 0).unwrap();
        assert_eq!(usage(&sub).unwrap().max_referenced, None);
        let (_, errno) = fill(&sub.join("more"), 16 * MIB);
        assert_eq!(errno, None, "no limit any more");
        assert!(usage(&sub).unwrap().referenced >= 16 * MIB);
        img.finish();
    }

    #[test]
    fn limit_and_usage_refuse_a_plain_directory() {
        let img = btrfs(512 * MIB);
        let plain = img.mnt.join("plain");
        fs::create_dir(&plain).unwrap();
        assert_eq!(set_limit(&plain, MIB).unwrap_err().errno(), Some(libc::EINVAL));
        assert_eq!(usage(&plain).unwrap_err().errno(), Some(libc::EINVAL));
        assert_eq!(usage(&img.mnt).unwrap().max_referenced, None, "top level untouched");
        img.finish();
    }

    #[test]
    fn limit_without_quotas_says_so() {
        let mut img = Image::new(512 * MIB);
        run_tool("mkfs.btrfs", &["-q", "-f", &img.file.to_string_lossy()]).unwrap();
        img.attach();
        img.mount("btrfs");
        let sub = img.mnt.join("vol");
        create_subvolume(&sub).unwrap();
        let err = set_limit(&sub, MIB).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOTCONN));
        assert!(err.to_string().contains("enable_quota"), "{err}");
        assert_eq!(usage(&sub).unwrap_err().errno(), Some(libc::ENOTCONN));
        img.finish();
    }

    #[test]
    fn read_only_snapshot_refuses_writes_and_writable_one_takes_them() {
        let img = btrfs(512 * MIB);
        let vol = img.mnt.join("vol");
        create_subvolume(&vol).unwrap();
        fs::write(vol.join("f"), b"original").unwrap();

        let ro = img.mnt.join("ro");
        snapshot(&vol, &ro, true).unwrap();
        assert!(is_subvolume(&ro).unwrap());
        assert_eq!(fs::read(ro.join("f")).unwrap(), b"original");
        let err = fs::write(ro.join("f"), b"changed").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        let err = fs::write(ro.join("new"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));

        let rw = img.mnt.join("rw");
        snapshot(&ro, &rw, false).unwrap();
        fs::write(rw.join("f"), b"changed").unwrap();
        assert_eq!(fs::read(rw.join("f")).unwrap(), b"changed");
        assert_eq!(fs::read(vol.join("f")).unwrap(), b"original");
        assert_eq!(fs::read(ro.join("f")).unwrap(), b"original");
        assert_eq!(snapshot(&vol, &rw, false).unwrap_err().errno(), Some(libc::EEXIST));
        img.finish();
    }

    #[test]
    fn snapshot_of_a_plain_directory_is_refused() {
        let img = btrfs(512 * MIB);
        let plain = img.mnt.join("plain");
        fs::create_dir(&plain).unwrap();
        let err = snapshot(&plain, &img.mnt.join("snap"), true).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert!(!img.mnt.join("snap").exists());
        img.finish();
    }

    #[test]
    fn delete_removes_subvolumes_and_their_qgroups_and_missing_is_fine() {
        // The cleaner that drops deleted subvolumes wakes once per commit interval (30 s by default).
        let img = btrfs_with(512 * MIB, Some("commit=1"));
        let vol = img.mnt.join("vol");
        create_subvolume(&vol).unwrap();
        set_limit(&vol, 8 * MIB).unwrap();
        fs::write(vol.join("f"), b"data").unwrap();
        let ro = img.mnt.join("ro");
        snapshot(&vol, &ro, true).unwrap();
        let ids = [subvolume_id(&vol).unwrap(), subvolume_id(&ro).unwrap()];

        delete_subvolume(&ro).unwrap();
        delete_subvolume(&vol).unwrap();
        assert!(!vol.exists() && !ro.exists());
        delete_subvolume(&vol).unwrap();

        let f = File::open(&img.mnt).unwrap();
        let qgroups = qgroups_dir(Path::new(SYS_FS_BTRFS), &f, &img.mnt).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ids.iter().any(|id| qgroups.join(format!("0_{id}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for id in ids {
            assert!(!qgroups.join(format!("0_{id}")).exists(), "qgroup 0/{id} left behind");
        }
        drop(f);
        img.finish();
    }

    #[test]
    fn delete_takes_nested_subvolumes_a_workload_made_with_it() {
        let img = btrfs(512 * MIB);
        let vol = img.mnt.join("vol");
        create_subvolume(&vol).unwrap();
        fs::create_dir_all(vol.join("docker/btrfs")).unwrap();
        let layer = vol.join("docker/btrfs/layer");
        create_subvolume(&layer).unwrap();
        create_subvolume(&layer.join("inner")).unwrap();
        fs::write(layer.join("inner/f"), b"x").unwrap();
        snapshot(&layer, &vol.join("docker/btrfs/layer-ro"), true).unwrap();
        // A sibling outside the volume must survive.
        let other = img.mnt.join("other");
        create_subvolume(&other).unwrap();
        create_subvolume(&other.join("nested")).unwrap();

        let f = File::open(&vol).unwrap();
        let id = subvolume_id(&vol).unwrap();
        let mut children = child_subvolumes(&f, &vol, id).unwrap();
        children.sort();
        let mut want = vec![
            subvolume_id(&layer).unwrap(),
            subvolume_id(&vol.join("docker/btrfs/layer-ro")).unwrap(),
        ];
        want.sort();
        assert_eq!(children, want);
        drop(f);

        delete_subvolume(&vol).unwrap();
        assert!(!vol.exists());
        assert!(is_subvolume(&other.join("nested")).unwrap());
        img.finish();
    }

    #[test]
    fn delete_refuses_a_plain_directory() {
        let img = btrfs(512 * MIB);
        let plain = img.mnt.join("plain");
        fs::create_dir(&plain).unwrap();
        fs::write(plain.join("f"), b"keep").unwrap();
        assert_eq!(delete_subvolume(&plain).unwrap_err().errno(), Some(libc::EINVAL));
        assert_eq!(fs::read(plain.join("f")).unwrap(), b"keep");
        img.finish();
    }

    #[test]
    fn compression_property_is_set_read_and_removed() {
        let img = btrfs(512 * MIB);
        let vol = img.mnt.join("vol");
        create_subvolume(&vol).unwrap();
        assert_eq!(compression(&vol).unwrap(), None);
        set_compression(&vol, Some("zstd")).unwrap();
        assert_eq!(compression(&vol).unwrap().as_deref(), Some("zstd"));
        fs::write(vol.join("f"), b"x").unwrap();
        assert_eq!(
            compression(&vol.join("f")).unwrap().as_deref(),
            Some("zstd"),
            "new files inherit it"
        );
        set_compression(&vol, Some("lzo")).unwrap();
        assert_eq!(compression(&vol).unwrap().as_deref(), Some("lzo"));
        set_compression(&vol, None).unwrap();
        assert_eq!(compression(&vol).unwrap(), None);
        set_compression(&vol, None).unwrap();
        for bad in ["gzip", "", "zstd:3", "none", "ZSTD"] {
            let err = set_compression(&vol, Some(bad)).unwrap_err();
            assert_eq!(err.errno(), None, "{bad}: {err}");
            assert!(err.to_string().contains("known: zstd, lzo, zlib"), "{err}");
        }
        assert_eq!(compression(&vol).unwrap(), None);
        img.finish();
    }

    /// A test that fails before `finish` still leaves nothing mounted or attached.
    #[test]
    fn dropping_a_btrfs_fixture_leaves_nothing_behind() {
        let img = btrfs(512 * MIB);
        let dir = img.dir.path().to_path_buf();
        create_subvolume(&img.mnt.join("vol")).unwrap();
        drop(img);
        assert!(!dir.exists());
        crate::sys::loopdev::fixture::assert_no_leaks(&dir);
    }
}
