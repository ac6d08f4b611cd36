//! A volume's tree as a sequence of entries, read from one place and written to another, keeping
//! everything a workload can see: ownership, modes, timestamps, xattrs, symlinks, hard links,
//! special files and holes.
//!
//! [`walk`] reads a tree and tells a [`TreeVisitor`] each entry in order; [`TreeWriter`] builds a
//! tree from the same entries. A local copy ([`super::copy::copy_tree`]) joins the two directly; a
//! copy to another node sends the entries over the wire in between (`storage::transfer`).
//!
//! The source is a tree that a workload controls, so it is walked through directory file
//! descriptors with O_NOFOLLOW at every step: a symlink swapped in mid-walk is read as a symlink
//! and never followed out of the tree. The writer creates every entry below directory file
//! descriptors it made itself, from single path components, so no entry it is given can land
//! outside the tree.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, AT_FDCWD};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use super::SysError;

/// Deeper trees are refused rather than risk running out of file descriptors.
pub const MAX_DEPTH: usize = 1000;

/// Content of a tree that a copy does not take. The workload made it so and only a change to it
/// lets a copy through: a retry as it is fails the same way.
#[derive(Debug, thiserror::Error)]
pub enum TooLarge {
    /// The directory `entry` lies more than [`MAX_DEPTH`] levels below `root`.
    #[error(
        "the tree at {} is deeper than {MAX_DEPTH} levels, more than a copy takes: flatten it, or keep \
         such data in an image volume, whose copy is a file copy (the first directory too deep: {})",
        root.display(),
        shown(entry)
    )]
    Depth { root: PathBuf, entry: PathBuf },
    /// The entry `entry` below `root` holds more than [`MAX_XATTR_BYTES`] of xattrs.
    #[error(
        "an entry of the tree at {} holds more than {} MiB of extended attributes (names and values), \
         more than a copy carries for one entry: remove some of them, or keep such data in an image \
         volume, whose copy is a file copy (the entry: {})",
        root.display(),
        MAX_XATTR_BYTES >> 20,
        shown(entry)
    )]
    Xattrs { root: PathBuf, entry: PathBuf },
}

/// A path below a tree's root as a message shows it: a deep one (250 KB at 1,000 levels of long
/// names) by its last 200 bytes, so that what to do comes before where a status is cut, and the
/// message fits in the header that carries it between nodes.
fn shown(entry: &Path) -> String {
    const MAX: usize = 200;
    let s = entry.to_string_lossy();
    if s.is_empty() {
        return ".".into();
    }
    if s.len() <= MAX {
        return s.into_owned();
    }
    let mut start = s.len() - MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{} ({} bytes in all)", &s[start..], s.len())
}

fn too_deep(root: &Path, entry: PathBuf) -> SysError {
    TooLarge::Depth {
        root: root.to_path_buf(),
        entry,
    }
    .into()
}

/// What an entry carries besides its data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with set-id and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// (seconds, nanoseconds)
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    /// (name, value) in the order the filesystem lists them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What [`walk`] reports, in order: a directory's entries come between its `dir` and its `leave`;
/// the tree's root has no `dir` but ends with a `leave` of its own.
pub trait TreeVisitor {
    /// A directory named `name` in the current one; it becomes the current directory.
    fn dir(&mut self, name: &CStr) -> Result<(), SysError>;
    /// The current directory is complete: its metadata, then its parent is current again.
    fn leave(&mut self, meta: Meta) -> Result<(), SysError>;
    /// A regular file, open for reading. `link` is set for a file with several names: later names
    /// come as [`TreeVisitor::hard_link`] with the same number.
    fn file(&mut self, name: &CStr, meta: Meta, data: &OwnedFd, size: u64, link: Option<u64>) -> Result<(), SysError>;
    /// Another name of a file already given with `link`.
    fn hard_link(&mut self, name: &CStr, link: u64) -> Result<(), SysError>;
    fn symlink(&mut self, name: &CStr, target: &CStr, meta: Meta) -> Result<(), SysError>;
    /// A fifo, socket or device node; `mode` is the whole `st_mode` (type included).
    fn special(&mut self, name: &CStr, mode: u32, rdev: u64, meta: Meta) -> Result<(), SysError>;
}

/// Reads the tree at `src` into `v`.
pub fn walk(src: &Path, v: &mut impl TreeVisitor) -> Result<(), SysError> {
    SourceTree::open(src)?.walk(v)
}

/// What reading a tree whole costs: its entries below the root, the bytes of the holes in its
/// regular files, which a tool that does not skip holes (a tree backup) reads as zeros, and its
/// longest path, past which a tool that reads by path (a tree backup) cannot reach.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeCount {
    pub entries: u64,
    pub hole_bytes: u64,
    /// The longest path below the root, in bytes (`a/b/c` is 5).
    pub longest_path: usize,
}

/// Counts the tree at `path`: its entries below the root (every directory, file, symlink and
/// special file; each name of a hard-linked file), read by descriptors without following a
/// symlink, so a name deeper than PATH_MAX counts like any other (a tool that walks by path
/// leaves such entries out and still succeeds); and the holes of its regular files: a file that
/// has fewer blocks than its length is opened (without following a symlink, never blocking) and
/// its data ranges asked for (SEEK_DATA/SEEK_HOLE), so compressed data is not taken for a hole.
pub fn count_tree(path: &Path) -> Result<TreeCount, SysError> {
    let mut count = TreeCount::default();
    let mut failed = None;
    visit_entries(SourceTree::open(path)?, false, |st, dir, name, path_len| {
        count.entries += 1;
        count.longest_path = count.longest_path.max(path_len);
        let size = st.st_size.max(0) as u64;
        let sparse = st.st_mode & libc::S_IFMT == libc::S_IFREG && (st.st_blocks.max(0) as u64) * 512 < size;
        if sparse {
            match hole_bytes(dir, name, size) {
                Ok(holes) => count.hole_bytes = count.hole_bytes.saturating_add(holes),
                Err(e) => {
                    failed = Some(SysError::io(
                        "look for holes",
                        path.join(OsStr::from_bytes(name.to_bytes())),
                        e,
                    ));
                    return std::ops::ControlFlow::Break(());
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(count),
    }
}

/// The bytes of the first `size` of file `name` in `dir` that are holes; 0 when it is no longer a
/// regular file (replaced since its listing).
fn hole_bytes(dir: BorrowedFd<'_>, name: &CStr, size: u64) -> io::Result<u64> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let st = nix::sys::stat::fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(0);
    }
    let mut data = 0u64;
    super::copy::data_extents(&fd, size, |start, end| {
        data += end - start;
        Ok(())
    })?;
    Ok(size.saturating_sub(data))
}

/// What a tree occupies, as [`allocated_bytes`] counts it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    pub bytes: u64,
    /// The tree goes deeper than [`MAX_DEPTH`] levels: a lenient count left out what lies below
    /// (a walk there costs a descriptor per level), and no copy of the tree can be made.
    pub too_deep: bool,
}

/// Bytes the tree at `path` occupies (allocated blocks, so holes do not count: the root's and
/// every entry's below it, a file with several names once), counted until they reach `stop`. Read by descriptors without following
/// a symlink, so a workload swapping a directory for a symlink mid-walk cannot make it count
/// another tree, and data deeper than PATH_MAX counts too. `lenient`: a directory that cannot be
/// read, or lies deeper than [`MAX_DEPTH`], counts nothing, instead of failing the count.
pub fn allocated_bytes(path: &Path, stop: u64, lenient: bool) -> Result<Allocated, SysError> {
    let root = SourceTree::open(path)?;
    let st = nix::sys::stat::fstat(&root.fd).map_err(|e| SysError::io("stat", path, e.into()))?;
    let mut total = (st.st_blocks as u64).saturating_mul(512);
    if total >= stop {
        return Ok(Allocated {
            bytes: total,
            too_deep: false,
        });
    }
    let too_deep = visit_entries(root, lenient, |st, _, _, _| {
        let blocks = (st.st_blocks as u64).saturating_mul(512);
        // A file with several names counts its share at each: once in all when every name is in
        // the tree (a workload's names all are), as a copy makes it once. Counted whole at each
        // name, a 1 GiB file with 1,000 names made its volume hold "1 TiB": reported over its
        // capacity, and every snapshot refused for want of room.
        let share = match st.st_nlink {
            n if n > 1 && st.st_mode & libc::S_IFMT != libc::S_IFDIR => blocks / n,
            _ => blocks,
        };
        total = total.saturating_add(share);
        if total >= stop {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })?;
    Ok(Allocated { bytes: total, too_deep })
}

/// The inode flags a workload may set on its own files and directories (`chattr +i`, `+a`, given
/// CAP_LINUX_IMMUTABLE) that make the kernel refuse even root to unlink or rename them, or to
/// remove a directory's entries: FS_IMMUTABLE_FL and FS_APPEND_FL of `linux/fs.h`.
const PROTECTION_FLAGS: libc::c_int = 0x10 | 0x20;

/// Removes the directory `path` and everything below it, at any depth, never following a symlink.
/// The tree is a workload's: std's `remove_dir_all` recursed once per level, holding a descriptor
/// per level, so a tree 100,000 levels deep overflowed the stack of the thread removing it (the
/// whole driver died) or ran out of descriptors. Here the tree is flattened instead: each
/// directory directly below the root is emptied of its files and its subdirectories are moved up
/// into the root (under new names), then it is removed; the root is listed again until no
/// directory is left. Two directories are open at a time, nothing is remembered per level, and
/// every directory is listed once. An entry its workload made immutable or append-only (`chattr
/// +i`, `+a`), or whose directory it made so, which even root cannot unlink or move, has those
/// flags cleared and is tried once more.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let root = open_dir_at(AT_FDCWD, path)?;
    // The root takes every directory moved up: it must accept new entries.
    let _ = unprotect(&root);
    let mut moved = 0u64;
    loop {
        let mut dirs = false;
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", root.as_raw_fd()))? {
            let name = cstr(&entry?.file_name())?;
            if !is_dir_at(&root, &name)? {
                unlink_unprotected(&root, &name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
                continue;
            }
            dirs = true;
            move_up_and_empty(&root, &name, &mut moved)?;
            unlink_unprotected(&root, &name, nix::unistd::UnlinkatFlags::RemoveDir)?;
        }
        if !dirs {
            break;
        }
    }
    drop(root);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = cstr(path.file_name().unwrap_or_default())?;
    let parent = open_dir_at(AT_FDCWD, parent)?;
    unlink_unprotected(&parent, &name, nix::unistd::UnlinkatFlags::RemoveDir)
}

/// Whether `name` in `dir` is a directory (not following a symlink); an entry gone is not.
fn is_dir_at(dir: &OwnedFd, name: &CStr) -> io::Result<bool> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unlinks the files of the directory `name` in `root` and moves its subdirectories into `root`,
/// as `.cellar-removing-<n>`, numbered from `moved` on, never replacing an entry.
fn move_up_and_empty(root: &OwnedFd, name: &CStr, moved: &mut u64) -> io::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    let dir = match openat(root, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let child = cstr(&entry?.file_name())?;
        if !is_dir_at(&dir, &child)? {
            unlink_unprotected(&dir, &child, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
            continue;
        }
        loop {
            let to = CString::new(format!(".cellar-removing-{moved}")).map_err(io::Error::other)?;
            *moved += 1;
            let rename = || match nix::fcntl::renameat2(
                &dir,
                child.as_c_str(),
                root,
                to.as_c_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                // A filesystem without RENAME_NOREPLACE (NFS, most FUSE shares, gluster among
                // them): the name is checked free first. Only a purge of this tree makes such
                // names in it; two purges of it at once (two replicas) can at worst replace an
                // empty directory of it, which goes anyway (a full one fails: the purge retries).
                Err(nix::errno::Errno::EINVAL) => match fstatat(root, &to, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(_) => Err(nix::errno::Errno::EEXIST),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        nix::fcntl::renameat(&dir, child.as_c_str(), root, to.as_c_str())
                    }
                    Err(e) => Err(e
                        .raw_os_error()
                        .map_or(nix::errno::Errno::EIO, nix::errno::Errno::from_raw)),
                },
                other => other,
            };
            let done = match rename() {
                // Moving a directory out of an append-only one, or an immutable one at all.
                Err(nix::errno::Errno::EPERM)
                    if unprotect(&dir).unwrap_or(false) | unprotect_at(&dir, &child).unwrap_or(false) =>
                {
                    rename()
                }
                other => other,
            };
            match done {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => break,
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// `unlinkat(2)`; after EPERM, the immutable and append-only flags of `dir` and of the entry are
/// cleared and it is tried once more. An entry already gone is fine.
fn unlink_unprotected(dir: &OwnedFd, name: &CStr, flags: nix::unistd::UnlinkatFlags) -> io::Result<()> {
    let unlink = || match nix::unistd::unlinkat(dir, name, flags) {
        Err(nix::errno::Errno::ENOENT) => Ok(()),
        other => other,
    };
    match unlink() {
        // Both, whichever holds the flag: `|` does not stop at the first.
        Err(nix::errno::Errno::EPERM) if unprotect(dir).unwrap_or(false) | unprotect_at(dir, name).unwrap_or(false) => {
            Ok(unlink()?)
        }
        other => Ok(other?),
    }
}

/// Clears the protection flags of the directory or regular file `name` in `dir`; whether it had any.
pub(super) fn unprotect_at(dir: impl AsFd, name: &CStr) -> io::Result<bool> {
    // O_PATH opens nothing behind the name (no device's driver, no wait for a FIFO's writer).
    let pinned = openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty())?;
    let kind = nix::sys::stat::fstat(&pinned)?.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Ok(false);
    }
    // Non-blocking: a file under a lease is left as it is rather than waited for.
    unprotect(&reopen(&pinned, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)?)
}

/// Clears the protection flags of an open directory or regular file; whether it had any.
fn unprotect(f: &OwnedFd) -> io::Result<bool> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which points at one.
    super::cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) })?;
    if flags & PROTECTION_FLAGS == 0 {
        return Ok(false);
    }
    flags &= !PROTECTION_FLAGS;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which points at one.
    super::cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) })?;
    Ok(true)
}

/// Calls `each` with the status of every entry below the opened directory `root` (not the root
/// itself), its directory, its name and the length of its path below the root, in no particular
/// order, until it breaks. Directories are opened by descriptor from their
/// parent's, never following a symlink, and read as a stream: only one descriptor per level is
/// open and only directories still to read are remembered. `lenient`: a directory that cannot be
/// opened or read, or lies deeper than [`MAX_DEPTH`], is skipped; then `Ok(true)` when one lay
/// that deep.
fn visit_entries(
    root: SourceTree,
    lenient: bool,
    mut each: impl FnMut(&FileStat, BorrowedFd<'_>, &CStr, usize) -> std::ops::ControlFlow<()>,
) -> Result<bool, SysError> {
    type Pending = Vec<(std::rc::Rc<OwnedFd>, CString, PathBuf, usize)>;
    let path = root.path.as_path();
    let mut pending: Pending = Vec::new();
    // One directory's entries; `Ok(true)` when `each` asked to stop.
    let mut read =
        |fd: std::rc::Rc<OwnedFd>, rel: &Path, depth: usize, pending: &mut Pending| -> Result<bool, SysError> {
            let err = |step: &'static str, e: io::Error| SysError::io(step, path.join(rel), e);
            if depth > MAX_DEPTH {
                return Err(too_deep(path, rel.to_path_buf()));
            }
            let list =
                std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| err("read directory", e))?;
            for entry in list {
                let entry = entry.map_err(|e| err("read directory", e))?;
                let name = entry.file_name();
                let cname = cstr(&name).map_err(|e| err("name", e))?;
                let st = match fstatat(&*fd, &cname, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    // Removed since the listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(err("stat", e)),
                };
                let path_len = match rel.as_os_str().len() {
                    0 => name.len(),
                    n => n + 1 + name.len(),
                };
                if each(&st, fd.as_fd(), &cname, path_len).is_break() {
                    return Ok(true);
                }
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    pending.push((fd.clone(), cname, rel.join(&name), depth + 1));
                }
            }
            Ok(false)
        };
    let mut too_deep = false;
    let mut outcome = |r: Result<bool, SysError>| match r {
        Err(SysError::TooLarge(_)) if lenient => {
            too_deep = true;
            Ok(false)
        }
        Err(_) if lenient => Ok(false),
        other => other,
    };
    if outcome(read(std::rc::Rc::new(root.fd), Path::new(""), 0, &mut pending))? {
        return Ok(too_deep);
    }
    while let Some((parent, name, rel, depth)) = pending.pop() {
        let fd = match open_dir_at(&*parent, Path::new(OsStr::from_bytes(name.as_bytes()))) {
            Ok(fd) => fd,
            Err(_) if lenient => continue,
            Err(e) => return Err(SysError::io("open", path.join(&rel), e)),
        };
        drop(parent);
        if outcome(read(std::rc::Rc::new(fd), &rel, depth, &mut pending))? {
            break;
        }
    }
    Ok(too_deep)
}

/// A tree opened for reading: its root is pinned (and known not to be a symlink) before anything
/// is made from it.
pub struct SourceTree {
    fd: OwnedFd,
    path: PathBuf,
}

impl SourceTree {
    pub fn open(src: &Path) -> Result<SourceTree, SysError> {
        let fd = open_dir_at(AT_FDCWD, src).map_err(|e| SysError::io("open copy source", src, e))?;
        Ok(SourceTree {
            fd,
            path: src.to_path_buf(),
        })
    }

    /// The root directory's own metadata (what its `leave` carries).
    pub fn root_meta(&self) -> Result<Meta, SysError> {
        let st = fstatat(&self.fd, c"", AtFlags::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", &self.path, e))?;
        let w = Walker {
            root: self.path.clone(),
            links: HashMap::new(),
            lease_waited: Duration::ZERO,
        };
        w.meta_of(&st, Xattrs::Fd(self.fd.as_fd()), Path::new(""))
    }

    /// Reports every entry to `v`, the root's `leave` last.
    pub fn walk(self, v: &mut impl TreeVisitor) -> Result<(), SysError> {
        let (fd, src) = (self.fd, self.path);
        let st = fstatat(&fd, c"", AtFlags::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", &src, e))?;
        let mut w = Walker {
            root: src,
            links: HashMap::new(),
            lease_waited: Duration::ZERO,
        };
        w.dir(&fd, v)?;
        let meta = w.meta_of(&st, Xattrs::Fd(fd.as_fd()), Path::new(""))?;
        v.leave(meta)
    }
}

struct Walker {
    root: PathBuf,
    /// (dev, ino) of a file with several names → its link number.
    links: HashMap<(u64, u64), u64>,
    /// How long this walk has waited for leases on its files to break, all files together.
    lease_waited: Duration,
}

/// The longest one walk waits, over all its files, for leases others hold on them to break. The
/// workload owns its files and may lease them: the kernel makes each reader wait up to
/// `/proc/sys/fs/lease-break-time` (45 s by default) per file, so a tree of leased files would hold
/// a copy (and its volume's lock) for that long times their number.
const LEASE_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
thread_local! {
    /// A shorter [`LEASE_WAIT`] for a test's walks on this thread.
    pub(crate) static LEASE_WAIT_IN_TEST: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

fn lease_wait() -> Duration {
    #[cfg(test)]
    if let Some(d) = LEASE_WAIT_IN_TEST.with(|c| c.get()) {
        return d;
    }
    LEASE_WAIT
}

impl Walker {
    fn err(&self, step: &'static str, rel: &Path, e: io::Error) -> SysError {
        SysError::io(step, self.root.join(rel), e)
    }

    /// Reports every entry below the directory `root` to `v`, depth first, and each directory's
    /// `leave` once its entries are done (not the root's). Without recursion: one frame per level
    /// of a workload's tree as deep as [`MAX_DEPTH`] overflowed the 2 MiB stack of a Tokio thread,
    /// which aborts the whole driver. Each level entered keeps its listing, its descriptor, its
    /// path and its status until it is left.
    fn dir(&mut self, root: &OwnedFd, v: &mut impl TreeVisitor) -> Result<(), SysError> {
        struct Level {
            list: std::fs::ReadDir,
            /// None for the root, which the caller holds.
            dir: Option<(OwnedFd, FileStat)>,
            rel: PathBuf,
        }
        // The fd pins the directory; /proc/self/fd names that very directory, not a path to re-resolve.
        let list = |fd: &OwnedFd, rel: &Path, w: &Walker| {
            std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| w.err("read directory", rel, e))
        };
        let mut levels = vec![Level {
            list: list(root, Path::new(""), self)?,
            dir: None,
            rel: PathBuf::new(),
        }];
        while let Some(depth) = levels.len().checked_sub(1) {
            let top = &mut levels[depth];
            let Some(entry) = top.list.next() else {
                let Some(Level { dir, rel, .. }) = levels.pop() else {
                    break;
                };
                if let Some((fd, st)) = dir {
                    let meta = self.meta_of(&st, Xattrs::Fd(fd.as_fd()), &rel)?;
                    v.leave(meta)?;
                }
                continue;
            };
            let entry = entry.map_err(|e| self.err("read directory", &top.rel, e))?;
            let fd = top.dir.as_ref().map_or(root, |(fd, _)| fd);
            if let Some((d, st, child)) = self.entry(fd, &top.rel, &entry.file_name(), depth + 1, v)? {
                levels.push(Level {
                    list: list(&d, &child, self)?,
                    dir: Some((d, st)),
                    rel: child,
                });
            }
        }
        Ok(())
    }

    /// Reports the entry `name` of the directory `fd` (at `rel`, `depth` levels below the root) to
    /// `v`. A directory is opened and entered (`v.dir`) and answered, with its status and path,
    /// for the caller to read; one deeper than [`MAX_DEPTH`] is refused.
    fn entry(
        &mut self,
        fd: &OwnedFd,
        rel: &Path,
        name: &OsStr,
        depth: usize,
        v: &mut impl TreeVisitor,
    ) -> Result<Option<(OwnedFd, FileStat, PathBuf)>, SysError> {
        let child = rel.join(name);
        let cname = cstr(name).map_err(|e| self.err("name", &child, e))?;
        let st = fstatat(fd, &cname, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| self.err("stat", &child, e))?;
        match st.st_mode & libc::S_IFMT {
            // Refused before it is reported: a copy to another node would otherwise send it, and
            // the target's refusal, naming its own `.work`, would answer in place of the source's.
            libc::S_IFDIR if depth > MAX_DEPTH => return Err(too_deep(&self.root, child)),
            libc::S_IFDIR => {
                let d = open_dir_at(fd, Path::new(name)).map_err(|e| self.err("open", &child, e))?;
                v.dir(&cname)?;
                return Ok(Some((d, st, child)));
            }
            libc::S_IFREG => {
                // The workload may put a FIFO or a device in the file's place between the stat
                // and the open. O_PATH opens nothing behind the name (no device's driver, no
                // wait for a FIFO's writer); only a regular file is then opened for reading,
                // waiting for a lease held on it to break within the walk's budget.
                crate::crash::point("tree:before-open");
                let pinned = openat(fd, &cname, OFlag::O_PATH | OFlag::O_NOFOLLOW, Mode::empty())
                    .map_err(|e| self.err("open", &child, e))?;
                let st = nix::sys::stat::fstat(&pinned).map_err(|e| self.err("stat", &child, e.into()))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(self.err(
                        "read",
                        &child,
                        io::Error::other("it stopped being a regular file while the tree was read; try again"),
                    ));
                }
                let f = self.open_leased(&pinned, &child)?;
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(&n) = self.links.get(&key) {
                        v.hard_link(&cname, n)?;
                        return Ok(None);
                    }
                }
                let link = (st.st_nlink > 1).then(|| {
                    let n = self.links.len() as u64;
                    self.links.insert(key, n);
                    n
                });
                let meta = self.meta_of(&st, Xattrs::Fd(f.as_fd()), &child)?;
                v.file(&cname, meta, &f, st.st_size as u64, link)?;
            }
            libc::S_IFLNK => {
                let target = readlinkat(fd, &cname).map_err(|e| self.err("readlink", &child, e))?;
                let path = entry_path(fd, &cname).map_err(|e| self.err("name", &child, e))?;
                let meta = self.meta_of(&st, Xattrs::Path(&path), &child)?;
                v.symlink(&cname, &target, meta)?;
            }
            _ => {
                let path = entry_path(fd, &cname).map_err(|e| self.err("name", &child, e))?;
                let meta = self.meta_of(&st, Xattrs::Path(&path), &child)?;
                v.special(&cname, st.st_mode, st.st_rdev, meta)?;
            }
        }
        Ok(None)
    }

    /// Opens the regular file `pinned` (an O_PATH descriptor) for reading. A lease another holds
    /// on it makes a non-blocking open fail EWOULDBLOCK and starts the lease's break: tried again
    /// until it is broken or given back, as long as the walk's budget lasts.
    fn open_leased(&mut self, pinned: &OwnedFd, rel: &Path) -> Result<OwnedFd, SysError> {
        let step = Duration::from_millis(20);
        loop {
            match reopen(pinned, OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK) {
                Ok(f) => {
                    let flags = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL)
                        .map_err(|e| self.err("open", rel, e.into()))?;
                    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
                    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(flags))
                        .map_err(|e| self.err("open", rel, e.into()))?;
                    return Ok(f);
                }
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) && self.lease_waited < lease_wait() => {
                    std::thread::sleep(step);
                    self.lease_waited += step;
                }
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    return Err(self.err(
                        "open",
                        rel,
                        io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!(
                                "files of the volume are held under leases (fcntl F_SETLEASE) that were not \
                                 given back within {} s; try again",
                                lease_wait().as_secs()
                            ),
                        ),
                    ))
                }
                Err(e) => return Err(self.err("open", rel, e)),
            }
        }
    }

    fn meta_of(&self, st: &FileStat, x: Xattrs, rel: &Path) -> Result<Meta, SysError> {
        Ok(Meta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            xattrs: x
                .read()
                .map_err(|e| self.err("read xattrs", rel, e))?
                .ok_or_else(|| TooLarge::Xattrs {
                    root: self.root.clone(),
                    entry: rel.to_path_buf(),
                })?,
        })
    }
}

/// Builds a tree from the entries of a [`TreeVisitor`] (a walk, or a stream of one), in the same
/// order: a directory's entries between its `dir` and its `leave`, the root's `leave` last.
pub struct TreeWriter {
    root: PathBuf,
    /// Open directories from the root down to the current one, with their paths below the root.
    stack: Vec<(OwnedFd, PathBuf)>,
    /// Link number → the first name made for it, below the root.
    links: HashMap<u64, PathBuf>,
}

impl TreeWriter {
    /// Writes into `root`, which must not exist yet.
    pub fn create(root: &Path) -> Result<TreeWriter, SysError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(root)
            .map_err(|e| SysError::io("mkdir", root, e))?;
        Self::into_existing(root)
    }

    /// Writes into `root`, an empty directory that exists (a new btrfs subvolume).
    pub fn into_existing(root: &Path) -> Result<TreeWriter, SysError> {
        let fd = open_dir_at(AT_FDCWD, root).map_err(|e| SysError::io("open copy target", root, e))?;
        Ok(TreeWriter {
            root: root.to_path_buf(),
            stack: vec![(fd, PathBuf::new())],
            links: HashMap::new(),
        })
    }

    /// Whether the root has been left: the tree is whole.
    pub fn is_complete(&self) -> bool {
        self.stack.is_empty()
    }

    fn err(&self, step: &'static str, rel: &Path, e: io::Error) -> SysError {
        SysError::io(step, self.root.join(rel), e)
    }

    /// The current directory and the path of `name` in it, refusing any name that is not one
    /// plain path component.
    fn at(&self, name: &CStr) -> Result<(BorrowedFd<'_>, PathBuf), SysError> {
        let bytes = name.to_bytes();
        let Some((fd, dir)) = self.stack.last() else {
            return Err(self.err("copy (entry after the end of the tree)", Path::new(""), einval()));
        };
        let rel = dir.join(OsStr::from_bytes(bytes));
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(self.err("copy (bad entry name)", &rel, einval()));
        }
        Ok((fd.as_fd(), rel))
    }

    /// Creates an empty regular file to fill; give it its data, then [`TreeWriter::finish_file`].
    pub fn file(&mut self, name: &CStr, link: Option<u64>) -> Result<(OwnedFd, PathBuf), SysError> {
        let (dir, rel) = self.at(name)?;
        let f = openat(
            dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(|e| self.err("create", &rel, e))?;
        if let Some(n) = link {
            self.links.insert(n, rel.clone());
        }
        Ok((f, rel))
    }

    /// Gives a filled file its length (a trailing hole stays a hole) and its metadata.
    pub fn finish_file(&self, f: &OwnedFd, rel: &Path, size: u64, meta: &Meta) -> Result<(), SysError> {
        super::copy::resize(f, size).map_err(|e| self.err("set length", rel, e))?;
        self.apply(f.as_fd(), rel, meta)
    }

    /// Owner, mode, xattrs and times of an open file or directory; owner first because chown clears
    /// set-id bits, times last because every other change touches them.
    fn apply(&self, fd: BorrowedFd<'_>, rel: &Path, meta: &Meta) -> Result<(), SysError> {
        let (uid, gid) = owner(meta);
        nix::unistd::fchown(fd, uid, gid).map_err(|e| self.err("chown", rel, e.into()))?;
        nix::sys::stat::fchmod(fd, mode_bits(meta.mode)).map_err(|e| self.err("chmod", rel, e.into()))?;
        Xattrs::Fd(fd)
            .write(&meta.xattrs)
            .map_err(|e| self.err("write xattrs", rel, e))?;
        let (atime, mtime) = timespecs(meta);
        nix::sys::stat::futimens(fd, &atime, &mtime).map_err(|e| self.err("set times", rel, e.into()))?;
        Ok(())
    }

    /// The same for entries that cannot be opened (symlinks, devices, fifos, sockets).
    fn apply_at(&self, dir: BorrowedFd<'_>, name: &CStr, rel: &Path, meta: &Meta, chmod: bool) -> Result<(), SysError> {
        let (uid, gid) = owner(meta);
        nix::unistd::fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("chown", rel, e.into()))?;
        if chmod {
            nix::sys::stat::fchmodat(dir, name, mode_bits(meta.mode), FchmodatFlags::FollowSymlink)
                .map_err(|e| self.err("chmod", rel, e.into()))?;
        }
        let path = fd_entry_path(dir, name).map_err(|e| self.err("name", rel, e))?;
        Xattrs::Path(&path)
            .write(&meta.xattrs)
            .map_err(|e| self.err("write xattrs", rel, e))?;
        let (atime, mtime) = timespecs(meta);
        nix::sys::stat::utimensat(dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| self.err("set times", rel, e.into()))?;
        Ok(())
    }
}

impl TreeVisitor for TreeWriter {
    fn dir(&mut self, name: &CStr) -> Result<(), SysError> {
        let (dir, rel) = self.at(name)?;
        if self.stack.len() > MAX_DEPTH {
            return Err(too_deep(&self.root, rel));
        }
        nix::sys::stat::mkdirat(dir, name, Mode::S_IRWXU).map_err(|e| self.err("mkdir", &rel, e.into()))?;
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| self.err("open", &rel, e))?;
        self.stack.push((fd, rel));
        Ok(())
    }

    fn leave(&mut self, meta: Meta) -> Result<(), SysError> {
        let Some((fd, rel)) = self.stack.pop() else {
            return Err(self.err(
                "copy (leaves more directories than it entered)",
                Path::new(""),
                einval(),
            ));
        };
        self.apply(fd.as_fd(), &rel, &meta)
    }

    fn file(&mut self, name: &CStr, meta: Meta, data: &OwnedFd, size: u64, link: Option<u64>) -> Result<(), SysError> {
        let (f, rel) = TreeWriter::file(self, name, link)?;
        super::copy::copy_or_share(data, &f, size).map_err(|e| self.err("copy data", &rel, e))?;
        self.finish_file(&f, &rel, size, &meta)
    }

    fn hard_link(&mut self, name: &CStr, link: u64) -> Result<(), SysError> {
        let (dir, rel) = self.at(name)?;
        let Some(first) = self.links.get(&link) else {
            return Err(self.err("link (to a file not in the tree)", &rel, einval()));
        };
        // The first name's directory is reached from the root's descriptor one component at a
        // time: its full path may be longer than PATH_MAX (a workload's deep tree), which failed
        // every copy of the volume with ENAMETOOLONG.
        let first = first.clone();
        let Some((root, _)) = self.stack.first() else {
            return Err(self.err("copy (entry after the end of the tree)", &rel, einval()));
        };
        let mut parent: Option<OwnedFd> = None;
        for part in first.parent().into_iter().flat_map(Path::components) {
            let from = parent.as_ref().map_or(root.as_fd(), |p| p.as_fd());
            parent = Some(open_dir_at(from, Path::new(part.as_os_str())).map_err(|e| self.err("link", &rel, e))?);
        }
        let base = cstr(first.file_name().unwrap_or_default()).map_err(|e| self.err("link", &rel, e))?;
        let from = parent.as_ref().map_or(root.as_fd(), |p| p.as_fd());
        nix::unistd::linkat(from, base.as_c_str(), dir, name, AtFlags::empty())
            .map_err(|e| self.err("link", &rel, e.into()))?;
        Ok(())
    }

    fn symlink(&mut self, name: &CStr, target: &CStr, meta: Meta) -> Result<(), SysError> {
        let (dir, rel) = self.at(name)?;
        nix::unistd::symlinkat(target, dir, name).map_err(|e| self.err("symlink", &rel, e.into()))?;
        self.apply_at(dir, name, &rel, &meta, false)
    }

    fn special(&mut self, name: &CStr, mode: u32, rdev: u64, meta: Meta) -> Result<(), SysError> {
        let (dir, rel) = self.at(name)?;
        let kind = mode & libc::S_IFMT;
        if !matches!(kind, libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) {
            return Err(self.err("mknod (not a special file)", &rel, einval()));
        }
        nix::sys::stat::mknodat(dir, name, SFlag::from_bits_truncate(kind), mode_bits(meta.mode), rdev)
            .map_err(|e| self.err("mknod", &rel, e.into()))?;
        self.apply_at(dir, name, &rel, &meta, true)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn timespecs(m: &Meta) -> (TimeSpec, TimeSpec) {
    (TimeSpec::new(m.atime.0, m.atime.1), TimeSpec::new(m.mtime.0, m.mtime.1))
}

fn owner(m: &Meta) -> (Option<Uid>, Option<Gid>) {
    (Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid)))
}

/// Permission bits with set-id and sticky.
fn mode_bits(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o7777)
}

/// The most xattr bytes (names and values) a copy reads for one entry. The kernel allows 64 KiB of
/// names with up to 64 KiB per value: a workload's file on xfs could make a copy hold hundreds of
/// MiB at once; real labels, ACLs and capabilities take a few KiB.
pub const MAX_XATTR_BYTES: usize = 16 << 20;

/// (name, value) pairs of an entry's xattrs, as [`Meta::xattrs`] holds them.
type XattrPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Where xattrs are read or written: an open file, or (for entries that cannot be opened) a path
/// that is never followed if it is a symlink.
#[derive(Clone, Copy)]
enum Xattrs<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a CStr),
}

impl Xattrs<'_> {
    /// `flistxattr`/`llistxattr` into `buf` (a size query when empty).
    fn list(self, buf: &mut [u8]) -> isize {
        match self {
            // SAFETY: buf is writable for its length (a null pointer with length 0 asks for the size).
            Xattrs::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) },
            // SAFETY: as above; p is NUL-terminated.
            Xattrs::Path(p) => unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) },
        }
    }

    fn get(self, name: &CStr, buf: &mut [u8]) -> isize {
        match self {
            // SAFETY: buf is writable for its length; name is NUL-terminated.
            Xattrs::Fd(fd) => unsafe {
                libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            },
            // SAFETY: as above; p is NUL-terminated.
            Xattrs::Path(p) => unsafe {
                libc::lgetxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            },
        }
    }

    fn set(self, name: &CStr, value: &[u8]) -> libc::c_int {
        match self {
            // SAFETY: value is readable for its length; name is NUL-terminated.
            Xattrs::Fd(fd) => unsafe {
                libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            },
            // SAFETY: as above; p is NUL-terminated.
            Xattrs::Path(p) => unsafe {
                libc::lsetxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            },
        }
    }

    /// Every xattr; none where the filesystem has no xattrs. At most [`MAX_XATTR_BYTES`] of
    /// names and values: for an entry holding more, `None`, before its values are read.
    fn read(self) -> io::Result<Option<XattrPairs>> {
        let size = self.list(&mut []);
        if size < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Some(Vec::new())),
                _ => Err(io::Error::last_os_error()),
            };
        }
        let mut names = vec![0u8; size as usize];
        let size = self.list(&mut names);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        names.truncate(size as usize);
        let mut out = Vec::new();
        let mut total = 0usize;
        for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let len = self.get(&cname, &mut []);
            if len < 0 {
                return Err(io::Error::last_os_error());
            }
            total += name.len() + len as usize;
            if total > MAX_XATTR_BYTES {
                return Ok(None);
            }
            let mut value = vec![0u8; len as usize];
            let len = self.get(&cname, &mut value);
            if len < 0 {
                return Err(io::Error::last_os_error());
            }
            value.truncate(len as usize);
            out.push((name.to_vec(), value));
        }
        Ok(Some(out))
    }

    /// Sets every xattr; one the target filesystem does not support is skipped.
    fn write(self, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
        for (name, value) in xattrs {
            let cname = CString::new(name.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if self.set(&cname, value) < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOTSUP) {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// `/proc/self/fd/<dir>/<name>`: the entry `name` of the directory `dir` pins, resolved nowhere else.
fn fd_entry_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens again, for I/O, the very inode an O_PATH descriptor pins: `/proc/self/fd/<n>` names it
/// and resolves no path a workload could change.
fn reopen(pinned: &OwnedFd, flags: OFlag) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    openat(AT_FDCWD, &path, flags, Mode::empty())
}

fn entry_path(dir: &OwnedFd, name: &CStr) -> io::Result<CString> {
    fd_entry_path(dir.as_fd(), name)
}

fn readlinkat(dir: impl AsFd, name: &CStr) -> io::Result<CString> {
    let target = nix::fcntl::readlinkat(dir, name)?;
    CString::new(target.into_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(super) fn open_dir_at(dir: impl AsFd, path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    openat(
        dir,
        &c,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

/// `openat(2)`, always close-on-exec.
pub(super) fn openat(dir: impl AsFd, name: &CStr, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(dir, name, flags | OFlag::O_CLOEXEC, mode)?)
}

pub(super) fn fstatat(dir: impl AsFd, name: &CStr, flags: AtFlags) -> io::Result<FileStat> {
    Ok(nix::sys::stat::fstatat(dir, name, flags)?)
}

pub(super) fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Trees for tests that no path can name whole.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::fd::OwnedFd;
    use std::path::Path;

    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};

    /// Makes `depth` nested directories of 250-byte names below `dir` through descriptors (their
    /// paths pass PATH_MAX from depth 17 on), and answers the deepest one's descriptor.
    pub fn deep_dirs(dir: &Path, depth: usize) -> OwnedFd {
        let name = "d".repeat(250);
        let mut fd = openat(
            nix::fcntl::AT_FDCWD,
            dir,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..depth {
            mkdirat(&fd, name.as_str(), Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, name.as_str(), OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty()).unwrap();
        }
        fd
    }

    /// Gives the file at `path` one value of 64 KiB more than [`super::MAX_XATTR_BYTES`] of
    /// xattrs (on a filesystem that holds that much on one file, as xfs does); their names.
    pub fn too_many_xattrs(path: &Path) -> Vec<std::ffi::CString> {
        let path = super::cstr(path.as_os_str()).expect("path");
        let value = vec![7u8; 65536];
        let names: Vec<_> = (0..super::MAX_XATTR_BYTES / value.len() + 1)
            .map(|i| std::ffi::CString::new(format!("user.x{i}")).expect("name"))
            .collect();
        for name in &names {
            let set = super::Xattrs::Path(&path).set(name, &value);
            assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        }
        names
    }

    /// Removes the xattr `name` of the file at `path`.
    pub fn remove_xattr(path: &Path, name: &std::ffi::CStr) {
        let path = super::cstr(path.as_os_str()).expect("path");
        // SAFETY: both strings are NUL-terminated.
        let rc = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    /// A new file `name` in the directory `at`, holding `bytes`.
    pub fn file_at(at: &OwnedFd, name: &str, bytes: &[u8]) {
        let f = openat(
            at,
            name,
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        nix::unistd::write(&f, bytes).unwrap();
        nix::unistd::fsync(&f).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A file with many names occupies its blocks once: counted at every name, a workload's hard
    /// links made its volume look a hundred times fuller than it is.
    #[test]
    fn allocated_bytes_count_a_file_with_many_names_once() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("data"), vec![1u8; 1 << 20]).expect("write");
        for i in 0..99 {
            std::fs::hard_link(root.path().join("data"), root.path().join(format!("name-{i}"))).expect("link");
        }
        let bytes = allocated_bytes(root.path(), u64::MAX, false).expect("count").bytes;
        assert!((1 << 20..2 << 20).contains(&bytes), "{bytes} bytes for one 1 MiB file");
    }

    /// A file whose xattrs pass [`MAX_XATTR_BYTES`] is refused before their values are read (on
    /// xfs, which holds values of 64 KiB): a copy held them all in memory at once.
    #[test]
    fn a_copy_refuses_an_entry_with_more_xattrs_than_it_carries() {
        crate::sys::loopdev::fixture::require_root();
        let mut img = crate::sys::loopdev::fixture::Image::new(512 << 20);
        img.attach();
        crate::sys::fstools::mkfs(
            crate::sys::fstools::FsType::Xfs,
            &img.dev_path(),
            crate::sys::fstools::Reach::OneNode,
        )
        .expect("mkfs");
        img.mount("xfs");
        let src = img.mnt.join("src");
        std::fs::create_dir(&src).expect("mkdir");
        std::fs::write(src.join("f"), b"f").expect("write");
        testing::too_many_xattrs(&src.join("f"));
        let e = crate::sys::copy::copy_tree(&src, &img.mnt.join("dst")).expect_err("refused");
        assert!(matches!(e, SysError::TooLarge(TooLarge::Xattrs { .. })), "{e:?}");
        assert!(e.to_string().contains("extended attributes"), "{e}");
        img.finish();
    }

    /// A removal takes a tree of any depth and width on a small stack, with few descriptors, and
    /// never anything a symlink in it names.
    #[test]
    fn remove_tree_takes_deep_and_wide_trees_and_never_follows_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("wide")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"keep").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("wide/link")).expect("symlink");
        std::os::unix::fs::symlink("../../outside", root.join("relative")).expect("symlink");
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).expect("fifo");
        for i in 0..1000 {
            std::fs::create_dir(root.join(format!("wide/{i}"))).expect("mkdir");
            std::fs::write(root.join(format!("wide/{i}/f")), b"f").expect("write");
        }
        let bottom = testing::deep_dirs(&root, 5000);
        testing::file_at(&bottom, "bottom", b"bottom");
        drop(bottom);
        let remover = std::thread::Builder::new().stack_size(64 << 10);
        let r = remover
            .spawn(move || remove_tree(&root))
            .expect("spawn")
            .join()
            .expect("no overflow");
        r.expect("removed");
        assert!(!dir.path().join("root").exists());
        assert_eq!(std::fs::read(outside.join("keep")).expect("kept"), b"keep");
    }

    /// The holes of a tree's files are counted by their data ranges: a 1 GiB file with one
    /// written block holds 1 GiB less that block of holes, a dense file none, and a FIFO or a
    /// symlink to a sparse file outside count as entries only (never opened, never followed).
    #[test]
    fn count_tree_counts_entries_and_the_holes_of_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let sparse = std::fs::File::create(root.path().join("sparse")).expect("file");
        sparse.write_all_at(&[7u8; 4096], 0).expect("write");
        sparse.set_len(1 << 30).expect("length");
        sparse.sync_all().expect("sync");
        std::fs::write(root.path().join("dense"), vec![1u8; 1 << 20]).expect("write");
        std::fs::create_dir(root.path().join("sub")).expect("mkdir");
        nix::unistd::mkfifo(&root.path().join("sub/fifo"), Mode::from_bits_truncate(0o600)).expect("fifo");
        let far = std::fs::File::create(outside.path().join("far")).expect("file");
        far.set_len(1 << 40).expect("length");
        std::os::unix::fs::symlink(outside.path().join("far"), root.path().join("sub/link")).expect("symlink");
        let count = count_tree(root.path()).expect("count");
        assert_eq!(count.entries, 5);
        assert_eq!(count.longest_path, "sub/fifo".len());
        // One filesystem block of data at least (a filesystem may allocate more around a write).
        assert!(
            count.hole_bytes <= (1 << 30) - 4096 && count.hole_bytes >= (1 << 30) - (1 << 20),
            "{count:?}"
        );
    }
}
