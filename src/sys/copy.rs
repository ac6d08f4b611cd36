//! Copies a volume's data on one node (for snapshots, restores and clones), keeping everything a
//! workload can see: ownership, modes, timestamps, xattrs, symlinks, hard links, special files and
//! holes. A tree is walked and rebuilt by [`super::tree`]; an image is one sparse file. The data
//! helpers here also serve copies to another node (`storage::transfer`), which read and write the
//! same extents through a stream.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::cvt;
use super::tree::{self, cstr, fstatat, openat, SourceTree, TreeWriter};
use super::{Step, SysError};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    /// Bytes of file data copied or shared.
    pub bytes: u64,
    /// Files shared by reflink instead of copied.
    pub reflinked: u64,
}

/// Copies the tree at `src` to `dst`, which must not exist yet.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), SysError> {
    crate::crash::fail("copy:data").step("copy", dst)?;
    // The source first: a source that cannot be read (a planted symlink) leaves no target behind.
    let source = SourceTree::open(src)?;
    let mut w = TreeWriter::create(dst)?;
    source.walk(&mut w)
}

/// Copies one regular file (an image volume) to `dst`, which must not exist: shared extents where
/// the filesystem can (reflink), otherwise only the data extents, so holes stay holes.
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyStats, SysError> {
    crate::crash::fail("copy:data").step("copy", dst)?;
    let (s, size) = open_image(src)?;
    let d = create_image(dst)?;
    let mut stats = CopyStats {
        files: 1,
        bytes: size,
        reflinked: 0,
    };
    if reflink(&s, &d).is_ok() {
        stats.reflinked = 1;
    } else {
        copy_data(&s, &d, size).map_err(|e| SysError::io("copy data", dst, e))?;
    }
    fsync(&d, dst)?;
    Ok(stats)
}

/// Opens an image file for reading, never through a symlink; its size with it.
pub fn open_image(path: &Path) -> Result<(OwnedFd, u64), SysError> {
    let s =
        open_path(path, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map_err(|e| SysError::io("open copy source", path, e))?;
    let st = fstatat(s.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", path, e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(SysError::io(
            "copy (not a regular file)",
            path,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    Ok((s, st.st_size as u64))
}

/// Creates a new, empty image file to fill; it must not exist.
pub fn create_image(path: &Path) -> Result<OwnedFd, SysError> {
    open_path(
        path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )
    .map_err(|e| SysError::io("create", path, e))
}

/// Sets a filled file's length (a trailing hole stays a hole).
pub fn set_len(f: &OwnedFd, size: u64, path: &Path) -> Result<(), SysError> {
    resize(f, size).map_err(|e| SysError::io("set length", path, e))
}

/// [`set_len`] without the path. A file that already has that length (a reflinked copy) is left
/// alone: xfs zeroes the tail of the last block on every truncate, even to the same size, and for
/// a shared extent that means reading the block from disk first (it was most of the time of a
/// tree copy of small files).
pub(super) fn resize(f: &OwnedFd, size: u64) -> io::Result<()> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: f is a valid fd and st is writable memory of the size fstat fills.
    cvt(unsafe { libc::fstat(f.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so st is initialised.
    if unsafe { st.assume_init() }.st_size as u64 == size {
        return Ok(());
    }
    // SAFETY: f is a valid fd.
    cvt(unsafe { libc::ftruncate(f.as_raw_fd(), size as libc::off_t) }).map(|_| ())
}

pub fn fsync(f: &OwnedFd, path: &Path) -> Result<(), SysError> {
    // SAFETY: f is a valid fd.
    cvt(unsafe { libc::fsync(f.as_raw_fd()) })
        .map(|_| ())
        .map_err(|e| SysError::io("fsync", path, e))
}

/// Flushes the whole filesystem holding `path`: a tree written file by file is durable in one call.
pub fn sync_filesystem(path: &Path) -> Result<(), SysError> {
    let d = tree::open_dir_at(libc::AT_FDCWD, path).map_err(|e| SysError::io("open", path, e))?;
    // SAFETY: d is a valid fd.
    cvt(unsafe { libc::syncfs(d.as_raw_fd()) })
        .map(|_| ())
        .map_err(|e| SysError::io("syncfs", path, e))
}

/// Calls `each(start, end)` for every data extent of the first `size` bytes of `f`, in order
/// (SEEK_DATA/SEEK_HOLE); holes are skipped. A filesystem that cannot tell holes gives one extent.
pub fn data_extents(f: &OwnedFd, size: u64, each: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
    data_extents_from(f, 0, size, each)
}

/// As [`data_extents`], from `start` on (an extent that began before it is reported from `start`).
pub fn data_extents_from(
    f: &OwnedFd,
    start: u64,
    size: u64,
    mut each: impl FnMut(u64, u64) -> io::Result<()>,
) -> io::Result<()> {
    let s = f.as_raw_fd();
    let mut off = start as i64;
    while (off as u64) < size {
        // SAFETY: s is a valid fd; lseek has no memory arguments.
        let data = unsafe { libc::lseek(s, off, libc::SEEK_DATA) };
        if data < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return each(off as u64, size),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        if data as u64 >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole.min(size as i64) };
        each(data as u64, end as u64)?;
        off = end;
    }
    Ok(())
}

/// Reads from `off` until `buf` is full or the file ends; the bytes read.
pub fn read_at(f: &OwnedFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: buf[got..] is writable for its length.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
                (off + got as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

/// Writes all of `data` at `off`.
pub fn write_at(f: &OwnedFd, data: &[u8], off: u64) -> io::Result<()> {
    pwrite_all(f.as_raw_fd(), data, off as i64)
}

/// Whether the filesystem holding `dir` can share extents between files (btrfs, xfs with reflink).
pub fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}-copy", std::process::id()));
    let result = (|| -> io::Result<()> {
        std::fs::write(&a, b"probe")?;
        let s = open_path(&a, libc::O_RDONLY, 0)?;
        let d = open_path(&b, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)?;
        reflink(&s, &d)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result.is_ok()
}

fn open_path(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str())?;
    openat(libc::AT_FDCWD, &c, flags, mode)
}

/// A file's data into an empty file: shared extents where the filesystem can, else a sparse copy.
pub(super) fn copy_or_share(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    if reflink(src, dst).is_ok() {
        return Ok(());
    }
    copy_data(src, dst, size)
}

/// Shares the extents of `src` with `dst` (btrfs, xfs with reflink): instant, no extra space.
fn reflink(src: &OwnedFd, dst: &OwnedFd) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are valid.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(|_| ())
}

/// Copies only the data extents of `src`, so holes stay holes.
fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    data_extents(src, size, |start, end| {
        copy_range(s, d, start as i64, (end - start) as i64)
    })?;
    // SAFETY: d is a valid fd; sets the length so a trailing hole is kept.
    cvt(unsafe { libc::ftruncate(d, size as libc::off_t) }).map(|_| ())
}

fn copy_range(s: RawFd, d: RawFd, start: i64, len: i64) -> io::Result<()> {
    let (mut so, mut doff) = (start, start);
    let end = start + len;
    while so < end {
        let want = (end - so).min(1 << 30) as usize;
        // SAFETY: offsets are valid pointers to local i64s; fds are valid.
        let n = unsafe { libc::copy_file_range(s, &mut so, d, &mut doff, want, 0) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                    return copy_range_rw(s, d, so, end - so);
                }
                _ => return Err(io::Error::last_os_error()),
            }
        }
        if n == 0 {
            break; // the file shrank under us
        }
    }
    Ok(())
}

fn copy_range_rw(s: RawFd, d: RawFd, start: i64, len: i64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = start;
    let end = start + len;
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        // SAFETY: buf has `want` writable bytes.
        let n = unsafe { libc::pread(s, buf.as_mut_ptr().cast(), want, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        pwrite_all(d, &buf[..n as usize], off)?;
        off += n as i64;
    }
    Ok(())
}

fn pwrite_all(d: RawFd, data: &[u8], off: i64) -> io::Result<()> {
    let mut w = 0;
    while w < data.len() {
        // SAFETY: the slice data[w..] is initialised and in bounds.
        let m = unsafe { libc::pwrite(d, data[w..].as_ptr().cast(), data.len() - w, off + w as i64) };
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        w += m as usize;
    }
    Ok(())
}
