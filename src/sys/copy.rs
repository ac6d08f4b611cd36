//! Copies a volume's data on one node (for snapshots, restores and clones), keeping everything a
//! workload can see: ownership, modes, timestamps, xattrs, symlinks, hard links, special files and
//! holes. A tree is walked and rebuilt by [`super::tree`]; an image is one sparse file. The data
//! helpers here also serve copies to another node (`storage::transfer`), which read and write the
//! same extents through a stream.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, AT_FDCWD};
use nix::sys::stat::Mode;
use nix::unistd::Whence;

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
    let s = open_path(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, Mode::empty())
        .map_err(|e| SysError::io("open copy source", path, e))?;
    let st = fstatat(&s, c"", AtFlags::AT_EMPTY_PATH).map_err(|e| SysError::io("stat", path, e))?;
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
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        Mode::S_IRUSR | Mode::S_IWUSR,
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
    if nix::sys::stat::fstat(f)?.st_size as u64 == size {
        return Ok(());
    }
    Ok(nix::unistd::ftruncate(f, size as libc::off_t)?)
}

pub fn fsync(f: &OwnedFd, path: &Path) -> Result<(), SysError> {
    nix::unistd::fsync(f).map_err(|e| SysError::io("fsync", path, e.into()))
}

/// Flushes the whole filesystem holding `path`: a tree written file by file is durable in one call.
pub fn sync_filesystem(path: &Path) -> Result<(), SysError> {
    let d = tree::open_dir_at(AT_FDCWD, path).map_err(|e| SysError::io("open", path, e))?;
    nix::unistd::syncfs(&d).map_err(|e| SysError::io("syncfs", path, e.into()))
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
    let mut off = start as i64;
    while (off as u64) < size {
        let data = match nix::unistd::lseek(f, off, Whence::SeekData) {
            Ok(data) => data,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return each(off as u64, size),
            Err(e) => return Err(e.into()),
        };
        if data as u64 >= size {
            break;
        }
        let end = match nix::unistd::lseek(f, data, Whence::SeekHole) {
            Ok(hole) => hole.min(size as i64),
            Err(_) => size as i64,
        };
        each(data as u64, end as u64)?;
        off = end;
    }
    Ok(())
}

/// Reads from `off` until `buf` is full or the file ends; the bytes read.
pub fn read_at(f: &OwnedFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = match nix::sys::uio::pread(f, &mut buf[got..], (off + got as u64) as libc::off_t) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Writes all of `data` at `off`.
pub fn write_at(f: &OwnedFd, data: &[u8], off: u64) -> io::Result<()> {
    pwrite_all(f.as_fd(), data, off as i64)
}

/// Whether the filesystem holding `dir` can share extents between files (btrfs, xfs with reflink).
pub fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}-copy", std::process::id()));
    let result = (|| -> io::Result<()> {
        std::fs::write(&a, b"probe")?;
        let s = open_path(&a, OFlag::O_RDONLY, Mode::empty())?;
        let d = open_path(
            &b,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )?;
        reflink(&s, &d)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result.is_ok()
}

fn open_path(p: &Path, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str())?;
    openat(AT_FDCWD, &c, flags, mode)
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
    let (s, d) = (src.as_fd(), dst.as_fd());
    data_extents(src, size, |start, end| {
        copy_range(s, d, start as i64, (end - start) as i64)
    })?;
    // Sets the length so a trailing hole is kept.
    Ok(nix::unistd::ftruncate(d, size as libc::off_t)?)
}

fn copy_range(s: BorrowedFd<'_>, d: BorrowedFd<'_>, start: i64, len: i64) -> io::Result<()> {
    let (mut so, mut doff) = (start, start);
    let end = start + len;
    while so < end {
        let want = (end - so).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(s, Some(&mut so), d, Some(&mut doff), want) {
            Ok(0) => break, // the file shrank under us
            Ok(_) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return copy_range_rw(s, d, so, end - so);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_rw(s: BorrowedFd<'_>, d: BorrowedFd<'_>, start: i64, len: i64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = start;
    let end = start + len;
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = nix::sys::uio::pread(s, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        pwrite_all(d, &buf[..n], off)?;
        off += n as i64;
    }
    Ok(())
}

fn pwrite_all(d: BorrowedFd<'_>, data: &[u8], off: i64) -> io::Result<()> {
    let mut w = 0;
    while w < data.len() {
        match nix::sys::uio::pwrite(d, &data[w..], off + w as i64) {
            Ok(m) => w += m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;
    use crate::crash::in_thread::{pause_at, Pause};

    /// A file with two names deeper than PATH_MAX (a workload's own tree): the second name was
    /// linked by its full path, and every snapshot or clone of the volume failed ENAMETOOLONG.
    #[test]
    fn hard_links_deeper_than_path_max_are_copied_as_links() {
        use nix::fcntl::{openat, OFlag};
        use nix::sys::stat::{fstatat, Mode};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let name = "d".repeat(250);
        let open = |at: &OwnedFd, n: &str| openat(at, n, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty()).unwrap();
        let fd = crate::sys::tree::testing::deep_dirs(&src, 20);
        crate::sys::tree::testing::file_at(&fd, "first", b"one file, two names");
        nix::unistd::linkat(&fd, "first", &fd, "second", nix::fcntl::AtFlags::empty()).unwrap();
        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).expect("a deep tree with hard links copies");
        let mut fd = openat(
            nix::fcntl::AT_FDCWD,
            &dst,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..20 {
            fd = open(&fd, &name);
        }
        let flags = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
        let (a, b) = (
            fstatat(&fd, "first", flags).unwrap(),
            fstatat(&fd, "second", flags).unwrap(),
        );
        assert_eq!((a.st_ino, a.st_nlink), (b.st_ino, 2), "one file with two names");
        assert_eq!(a.st_size, 19);
    }

    /// A tree as deep as a copy takes ([`tree::MAX_DEPTH`]) copies on a thread with the stack a
    /// Tokio thread has (2 MiB): the walk recurses once per level; one level deeper is refused.
    #[test]
    fn the_deepest_tree_a_copy_takes_copies_on_a_tokio_threads_stack_and_deeper_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (depth, copies) in [(tree::MAX_DEPTH, true), (tree::MAX_DEPTH + 1, false)] {
            let src = dir.path().join(format!("src-{depth}"));
            std::fs::create_dir(&src).unwrap();
            drop(crate::sys::tree::testing::deep_dirs(&src, depth));
            let dst = dir.path().join(format!("dst-{depth}"));
            let copier = std::thread::Builder::new().stack_size(2 << 20);
            let r = copier
                .spawn(move || copy_tree(&src, &dst))
                .unwrap()
                .join()
                .expect("no overflow");
            assert_eq!(r.is_ok(), copies, "{depth} levels: {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, SysError::TooLarge(tree::TooLarge::Depth { .. })), "{e:?}");
            }
        }
    }

    /// Copies a tree of one file, `data`, that `swap` replaces once the copy has seen a regular file
    /// there and before it opens it. `None`: no answer within a minute (`unstick` then lets the
    /// copy end, so that the test does too).
    fn copy_swapped(swap: impl FnOnce(&Path), unstick: impl FnOnce(&Path)) -> Option<Result<(), SysError>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir(&src).expect("source");
        std::fs::write(src.join("data"), b"contents").expect("file");
        let pause = Arc::new(Pause::default());
        let (tx, rx) = mpsc::channel();
        let copier = {
            let (src, pause) = (src.clone(), pause.clone());
            std::thread::spawn(move || {
                pause_at(Some(("tree:before-open", pause)));
                let _ = tx.send(copy_tree(&src, &dst));
            })
        };
        assert!(
            pause.reached(Duration::from_secs(60)),
            "the copy stats the file, then stops before opening it"
        );
        std::fs::remove_file(src.join("data")).expect("remove");
        swap(&src.join("data"));
        pause.release();
        let answer = rx.recv_timeout(Duration::from_secs(60)).ok();
        if answer.is_none() {
            unstick(&src.join("data"));
        }
        copier.join().expect("copier");
        answer
    }

    #[test]
    fn a_fifo_swapped_in_for_a_file_mid_copy_fails_the_copy_instead_of_hanging_it() {
        // The workload's move: the file becomes a FIFO nobody writes to.
        let answer = copy_swapped(
            |p| nix::unistd::mkfifo(p, Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo"),
            // Lets the stuck open through.
            |p| drop(std::fs::OpenOptions::new().write(true).open(p)),
        )
        .expect("the copy waits for a writer on the FIFO, holding its call for ever");
        let e = answer.expect_err("a file that changed kind mid-copy fails the copy");
        assert!(e.to_string().contains("stopped being a regular file"), "{e}");
    }

    /// Opening a device node acts on the device (a tape rewinds, a modem line hangs up): one swapped
    /// in for a file is never opened. Here a device with no driver, whose every open fails: the
    /// copy must answer as for any file that changed kind, not with the open's error.
    #[test]
    fn a_device_swapped_in_for_a_file_mid_copy_is_never_opened() {
        crate::sys::loopdev::fixture::require_root();
        let answer = copy_swapped(
            |p| {
                // Major 0 is never a character device's driver.
                let dev = nix::sys::stat::makedev(0, 0);
                nix::sys::stat::mknod(p, nix::sys::stat::SFlag::S_IFCHR, Mode::S_IRUSR, dev).expect("mknod")
            },
            |_| {},
        )
        .expect("the copy answers");
        let e = answer.expect_err("a file that changed kind mid-copy fails the copy");
        assert!(e.to_string().contains("stopped being a regular file"), "{e}");
    }

    /// `fcntl(2)` on a raw descriptor, for the lease test below.
    fn fcntl(fd: &impl AsRawFd, cmd: libc::c_int, arg: libc::c_int) -> libc::c_int {
        // SAFETY: F_SETLEASE, F_GETLEASE and F_SETOWN take an int and touch no memory of ours.
        unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) }
    }

    /// A source tree with one file under a write lease held by the returned file (as root), and
    /// where its copy goes.
    fn leased_file() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, std::fs::File) {
        crate::sys::loopdev::fixture::require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir(&src).expect("source");
        std::fs::write(src.join("data"), b"contents").expect("file");
        let holder = std::fs::File::open(src.join("data")).expect("open");
        assert_eq!(
            fcntl(&holder, libc::F_SETLEASE, libc::F_WRLCK),
            0,
            "{}",
            io::Error::last_os_error()
        );
        // Taking a lease makes this process its owner, whom the break would signal (SIGIO), which
        // would end it: no owner.
        assert_eq!(fcntl(&holder, libc::F_SETOWN, 0), 0, "{}", io::Error::last_os_error());
        (dir, src, dst, holder)
    }

    /// A file under a lease held elsewhere on the node (a file server exporting the volume, say) is
    /// read once the lease is given back, as any reader's open waits: the copy must not fail with
    /// EAGAIN, which a non-blocking open gets instead of breaking the lease.
    #[test]
    fn a_file_under_a_lease_held_elsewhere_is_copied_once_the_lease_is_given_back() {
        let (dir, src, dst, holder) = leased_file();
        let copier = std::thread::spawn(move || copy_tree(&src, &dst));
        // The holder gives the lease back once the copy's open has started to break it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while fcntl(&holder, libc::F_GETLEASE, 0) == libc::F_WRLCK && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            fcntl(&holder, libc::F_SETLEASE, libc::F_UNLCK),
            0,
            "{}",
            io::Error::last_os_error()
        );
        copier
            .join()
            .expect("copier")
            .expect("the copy waits for the lease, then reads the file");
        assert_eq!(std::fs::read(dir.path().join("dst/data")).expect("copied"), b"contents");
    }

    /// A lease never given back holds the copy no longer than the walk's budget: the workload owns
    /// its files and may lease them all, and the kernel would make each open wait its break time.
    #[test]
    fn a_lease_never_given_back_fails_the_copy_within_its_budget() {
        let (_dir, src, dst, holder) = leased_file();
        let copier = std::thread::spawn(move || {
            crate::sys::tree::LEASE_WAIT_IN_TEST.with(|c| c.set(Some(Duration::from_millis(300))));
            copy_tree(&src, &dst)
        });
        let e = copier
            .join()
            .expect("copier")
            .expect_err("the lease is never given back");
        assert!(e.to_string().contains("leases"), "{e}");
        drop(holder);
    }
}
