//! Copies a volume's tree (for snapshots, restores and clones) keeping everything a workload can see:
//! ownership, modes, timestamps, xattrs, symlinks, hard links, special files and holes.
//!
//! The source is a tree that a workload controls, so it is walked through directory file
//! descriptors with O_NOFOLLOW at every step: a symlink swapped in mid-copy is copied as a symlink
//! and never followed out of the tree.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::cvt;
use super::SysError;

/// Deeper trees are refused rather than risk running out of file descriptors.
const MAX_DEPTH: usize = 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    /// Bytes of file data copied or shared.
    pub bytes: u64,
    /// Files shared by reflink instead of copied.
    pub reflinked: u64,
}

/// Copies the tree at `src` to `dst`, which must not exist yet.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyStats, SysError> {
    let src_fd = open_dir_at(libc::AT_FDCWD, src).map_err(|e| SysError::io("open copy source", src, e))?;
    let st = fstatat(src_fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", src, e))?;
    let dst_c = cstr(dst.as_os_str()).map_err(|e| SysError::io("mkdir", dst, e))?;
    // SAFETY: dst_c is a valid NUL-terminated path.
    cvt(unsafe { libc::mkdir(dst_c.as_ptr(), 0o700) }).map_err(|e| SysError::io("mkdir", dst, e))?;
    let dst_fd = open_dir_at(libc::AT_FDCWD, dst).map_err(|e| SysError::io("open copy target", dst, e))?;
    let mut c = Copier {
        dst_root: dst.to_path_buf(),
        links: HashMap::new(),
        stats: CopyStats::default(),
    };
    c.dir(&src_fd, &dst_fd, Path::new(""), 0)?;
    c.meta_fd(&src_fd, &dst_fd, &st, Path::new(""))?;
    Ok(c.stats)
}

/// Copies one regular file (an image volume) to `dst`, which must not exist: shared extents where
/// the filesystem can (reflink), otherwise only the data extents, so holes stay holes.
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyStats, SysError> {
    let s =
        open_path(src, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map_err(|e| SysError::io("open copy source", src, e))?;
    let st = fstatat(s.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", src, e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(SysError::io(
            "copy (not a regular file)",
            src,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let d = open_path(
        dst,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )
    .map_err(|e| SysError::io("create", dst, e))?;
    let size = st.st_size as u64;
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
    // SAFETY: d is a valid fd.
    cvt(unsafe { libc::fsync(d.as_raw_fd()) }).map_err(|e| SysError::io("fsync", dst, e))?;
    Ok(stats)
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

struct Copier {
    dst_root: PathBuf,
    /// (dev, ino) of a multiply-linked source file → where its first copy went.
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

impl Copier {
    fn err(&self, step: &'static str, rel: &Path, e: io::Error) -> SysError {
        SysError::io(step, self.dst_root.join(rel), e)
    }

    fn dir(&mut self, src: &OwnedFd, dst: &OwnedFd, rel: &Path, depth: usize) -> Result<(), SysError> {
        if depth > MAX_DEPTH {
            return Err(self.err(
                "copy (tree deeper than 1000 levels)",
                rel,
                io::Error::from_raw_os_error(libc::ELOOP),
            ));
        }
        // The fd pins the directory; /proc/self/fd names that very directory, not a path to re-resolve.
        let list = std::fs::read_dir(format!("/proc/self/fd/{}", src.as_raw_fd()))
            .map_err(|e| self.err("read directory", rel, e))?;
        for entry in list {
            let entry = entry.map_err(|e| self.err("read directory", rel, e))?;
            let name = entry.file_name();
            let child = rel.join(&name);
            let cname = cstr(&name).map_err(|e| self.err("name", &child, e))?;
            let st =
                fstatat(src.as_raw_fd(), &cname, libc::AT_SYMLINK_NOFOLLOW).map_err(|e| self.err("stat", &child, e))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    // SAFETY: valid fd and NUL-terminated name.
                    cvt(unsafe { libc::mkdirat(dst.as_raw_fd(), cname.as_ptr(), 0o700) })
                        .map_err(|e| self.err("mkdir", &child, e))?;
                    let s = open_dir_at(src.as_raw_fd(), Path::new(&name)).map_err(|e| self.err("open", &child, e))?;
                    let d = open_dir_at(dst.as_raw_fd(), Path::new(&name)).map_err(|e| self.err("open", &child, e))?;
                    self.dir(&s, &d, &child, depth + 1)?;
                    self.meta_fd(&s, &d, &st, &child)?;
                }
                libc::S_IFREG => self.file(src, dst, &cname, &st, &child)?,
                libc::S_IFLNK => self.symlink(src, dst, &cname, &st, &child)?,
                _ => self.special(src, dst, &cname, &st, &child)?,
            }
        }
        Ok(())
    }

    fn file(&mut self, src: &OwnedFd, dst: &OwnedFd, name: &CStr, st: &libc::stat, rel: &Path) -> Result<(), SysError> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&key) {
                let first_c = cstr(first.as_os_str()).map_err(|e| self.err("link", rel, e))?;
                // SAFETY: both names are NUL-terminated and the fds are valid.
                cvt(unsafe { libc::linkat(libc::AT_FDCWD, first_c.as_ptr(), dst.as_raw_fd(), name.as_ptr(), 0) })
                    .map_err(|e| self.err("link", rel, e))?;
                return Ok(());
            }
        }
        let s = openat(src.as_raw_fd(), name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .map_err(|e| self.err("open", rel, e))?;
        let d = openat(
            dst.as_raw_fd(),
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| self.err("create", rel, e))?;
        let size = st.st_size as u64;
        if reflink(&s, &d).is_ok() {
            self.stats.reflinked += 1;
        } else {
            copy_data(&s, &d, size).map_err(|e| self.err("copy data", rel, e))?;
        }
        self.stats.files += 1;
        self.stats.bytes += size;
        self.meta_fd(&s, &d, st, rel)?;
        if st.st_nlink > 1 {
            self.links.insert(key, self.dst_root.join(rel));
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
        rel: &Path,
    ) -> Result<(), SysError> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: buf has buf.len() writable bytes; name is NUL-terminated.
        let n = unsafe { libc::readlinkat(src.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(self.err("readlink", rel, io::Error::last_os_error()));
        }
        buf.truncate(n as usize);
        let target =
            CString::new(buf).map_err(|e| self.err("readlink", rel, io::Error::new(io::ErrorKind::InvalidData, e)))?;
        // SAFETY: both strings are NUL-terminated; dst is a valid directory fd.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), dst.as_raw_fd(), name.as_ptr()) })
            .map_err(|e| self.err("symlink", rel, e))?;
        self.meta_at(src, dst, name, st, rel, false)
    }

    fn special(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
        rel: &Path,
    ) -> Result<(), SysError> {
        // SAFETY: name is NUL-terminated; dst is a valid directory fd.
        cvt(unsafe { libc::mknodat(dst.as_raw_fd(), name.as_ptr(), st.st_mode, st.st_rdev) })
            .map_err(|e| self.err("mknod", rel, e))?;
        self.meta_at(src, dst, name, st, rel, true)
    }

    /// Owner, mode, xattrs and times of an open file or directory; owner first because chown clears
    /// set-id bits, times last because every other change touches them.
    fn meta_fd(&self, src: &OwnedFd, dst: &OwnedFd, st: &libc::stat, rel: &Path) -> Result<(), SysError> {
        let d = dst.as_raw_fd();
        // SAFETY: d is a valid open fd for all four calls below.
        cvt(unsafe { libc::fchown(d, st.st_uid, st.st_gid) }).map_err(|e| self.err("chown", rel, e))?;
        cvt(unsafe { libc::fchmod(d, st.st_mode & 0o7777) }).map_err(|e| self.err("chmod", rel, e))?;
        copy_xattrs(src.as_raw_fd(), d).map_err(|e| self.err("copy xattrs", rel, e))?;
        let times = times_of(st);
        cvt(unsafe { libc::futimens(d, times.as_ptr()) }).map_err(|e| self.err("set times", rel, e))?;
        Ok(())
    }

    /// The same for entries that cannot be opened (symlinks, devices, fifos, sockets).
    fn meta_at(
        &self,
        src_dir: &OwnedFd,
        dir: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
        rel: &Path,
        chmod: bool,
    ) -> Result<(), SysError> {
        let fd = dir.as_raw_fd();
        let nofollow = libc::AT_SYMLINK_NOFOLLOW;
        // SAFETY: fd is a valid directory fd and name is NUL-terminated for all calls below.
        cvt(unsafe { libc::fchownat(fd, name.as_ptr(), st.st_uid, st.st_gid, nofollow) })
            .map_err(|e| self.err("chown", rel, e))?;
        if chmod {
            cvt(unsafe { libc::fchmodat(fd, name.as_ptr(), st.st_mode & 0o7777, 0) })
                .map_err(|e| self.err("chmod", rel, e))?;
        }
        // The directory fds pin both parents, so these names resolve inside them and nowhere else.
        let at = |d: &OwnedFd| {
            let mut p = format!("/proc/self/fd/{}/", d.as_raw_fd()).into_bytes();
            p.extend_from_slice(name.to_bytes());
            CString::new(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        };
        let (sp, dp) = (at(src_dir), at(dir));
        sp.and_then(|sp| dp.and_then(|dp| copy_xattrs_path(&sp, &dp)))
            .map_err(|e| self.err("copy xattrs", rel, e))?;
        let times = times_of(st);
        cvt(unsafe { libc::utimensat(fd, name.as_ptr(), times.as_ptr(), nofollow) })
            .map_err(|e| self.err("set times", rel, e))?;
        Ok(())
    }
}

fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// Shares the extents of `src` with `dst` (btrfs, xfs with reflink): instant, no extra space.
fn reflink(src: &OwnedFd, dst: &OwnedFd) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are valid.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(|_| ())
}

/// Copies only the data extents of `src` (SEEK_DATA/SEEK_HOLE), so holes stay holes.
fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut off: i64 = 0;
    while (off as u64) < size {
        // SAFETY: s is a valid fd; lseek has no memory arguments.
        let data = unsafe { libc::lseek(s, off, libc::SEEK_DATA) };
        if data < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    copy_range(s, d, off, size as i64 - off)?;
                    break;
                }
                _ => return Err(io::Error::last_os_error()),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size as i64 } else { hole };
        copy_range(s, d, data, end - data)?;
        off = end;
    }
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
        let mut w = 0;
        while w < n as usize {
            // SAFETY: the slice buf[w..n] is initialised and in bounds.
            let m = unsafe { libc::pwrite(d, buf[w..].as_ptr().cast(), n as usize - w, off + w as i64) };
            if m < 0 {
                return Err(io::Error::last_os_error());
            }
            w += m as usize;
        }
        off += n as i64;
    }
    Ok(())
}

fn copy_xattrs(src: RawFd, dst: RawFd) -> io::Result<()> {
    // SAFETY: a null buffer with size 0 asks for the needed size.
    let size = unsafe { libc::flistxattr(src, std::ptr::null_mut(), 0) };
    if size < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOTSUP) => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
    }
    if size == 0 {
        return Ok(());
    }
    let mut names = vec![0u8; size as usize];
    // SAFETY: names has `size` writable bytes.
    let size = unsafe { libc::flistxattr(src, names.as_mut_ptr().cast(), names.len()) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(size as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // SAFETY: size query with a null buffer.
        let len = unsafe { libc::fgetxattr(src, cname.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; len as usize];
        // SAFETY: value has `len` writable bytes.
        let len = unsafe { libc::fgetxattr(src, cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: value[..len] is initialised; cname is NUL-terminated.
        let rc = unsafe { libc::fsetxattr(dst, cname.as_ptr(), value.as_ptr().cast(), len as usize, 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOTSUP) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn copy_xattrs_path(src: &CStr, dst: &CStr) -> io::Result<()> {
    // SAFETY: a null buffer with size 0 asks for the needed size; src is NUL-terminated.
    let size = unsafe { libc::llistxattr(src.as_ptr(), std::ptr::null_mut(), 0) };
    if size <= 0 {
        return match io::Error::last_os_error().raw_os_error() {
            _ if size == 0 => Ok(()),
            Some(libc::ENOTSUP) => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
    }
    let mut names = vec![0u8; size as usize];
    // SAFETY: names has `size` writable bytes.
    let size = unsafe { libc::llistxattr(src.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(size as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        // SAFETY: size query with a null buffer; both strings are NUL-terminated.
        let len = unsafe { libc::lgetxattr(src.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; len as usize];
        // SAFETY: value has `len` writable bytes.
        let len = unsafe { libc::lgetxattr(src.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: value[..len] is initialised; the strings are NUL-terminated.
        let rc = unsafe { libc::lsetxattr(dst.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), len as usize, 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOTSUP) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn open_dir_at(dir: RawFd, path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    openat(dir, &c, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
}

fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: name is NUL-terminated; dir is a valid fd or AT_FDCWD.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstatat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st is writable memory of the size fstatat fills; name is NUL-terminated.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so st is initialised.
    Ok(unsafe { st.assume_init() })
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
