//! Loop devices through the kernel's loop ioctls, never losetup(8): attach an image file, find and
//! list attachments, detach, and refresh the size after the file grew.
//!
//! Attachments are read from sysfs (`/sys/block/loopN/loop/backing_file`), which exists only while a
//! device is bound, so listing never opens a device and never holds one open.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{cvt, Step, SysError};

/// Where the kernel lists block devices.
pub const SYS_BLOCK: &str = "/sys/block";
const LOOP_CONTROL: &str = "/dev/loop-control";

/// How often `attach` takes another free device after losing one to a concurrent attacher.
const ATTACH_ATTEMPTS: u32 = 32;

// linux/loop.h
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_GET_STATUS64: libc::Ioctl = 0x4C05;
const LOOP_SET_CAPACITY: libc::Ioctl = 0x4C07;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
// linux/fs.h: #define BLKGETSIZE64 _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<libc::size_t>(0x12, 114);

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from linux/loop.h (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

impl LoopInfo64 {
    fn zeroed() -> LoopInfo64 {
        // SAFETY: the struct is plain integers and byte arrays, for which all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`
    pub path: PathBuf,
    pub number: u32,
}

impl LoopDevice {
    pub fn new(number: u32) -> LoopDevice {
        LoopDevice {
            path: PathBuf::from(format!("/dev/loop{number}")),
            number,
        }
    }
}

/// A bound loop device and the file behind it, as sysfs shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub device: LoopDevice,
    /// The backing file's path as the kernel prints it, without the " (deleted)" mark.
    pub backing: PathBuf,
    /// The backing file was unlinked after the attach: the device holds data no path reaches.
    pub backing_deleted: bool,
}

/// Attaches `backing` to a free loop device with LOOP_CONFIGURE. Returns the device and whether
/// direct I/O is on: it is asked for when `direct_io` is set and dropped when the kernel or the
/// backing filesystem refuses it (tmpfs, misaligned block sizes). No AUTOCLEAR: the device stays
/// until [`detach`], so a crash of this process never takes a mounted volume's device away.
///
/// Attaching a file twice makes two devices; call [`find_by_backing`] first to reuse one.
pub fn attach(backing: &Path, read_only: bool, direct_io: bool) -> Result<(LoopDevice, bool), SysError> {
    crate::crash::fail("loop:attach").step("attach loop device to", backing)?;
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .step("open loop backing file", backing)?;
    let control_path = Path::new(LOOP_CONTROL);
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(control_path)
        .step("open", control_path)?;
    let mut want_dio = direct_io;
    for attempt in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open fd.
        let n = cvt(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })
            .step("find a free loop device (LOOP_CTL_GET_FREE) on", control_path)?;
        let dev = LoopDevice::new(n as u32);
        let node = match open_node(&dev, true) {
            Ok(f) => f,
            // Removed (LOOP_CTL_REMOVE) between the two calls: take another.
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ENXIO)) => {
                backoff(attempt);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut result = configure(&node, &file, backing, read_only, want_dio);
        if want_dio && matches!(result, Err(ref e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // Kernels that check direct I/O up front refuse the whole configure; retry without.
            want_dio = false;
            result = configure(&node, &file, backing, read_only, false);
        }
        match result {
            Ok(()) => {}
            // Another attacher configured this device between GET_FREE and CONFIGURE.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                backoff(attempt);
                continue;
            }
            Err(e) => return Err(SysError::io("attach (LOOP_CONFIGURE)", &dev.path, e)),
        }
        // Older kernels drop the flag silently when the backing file cannot do direct I/O.
        return match status(&node) {
            Ok(info) => Ok((dev, info.lo_flags & LO_FLAGS_DIRECT_IO != 0)),
            Err(e) => {
                drop(node);
                let _ = detach(&dev);
                Err(SysError::io("read loop status (LOOP_GET_STATUS64)", &dev.path, e))
            }
        };
    }
    Err(SysError::io(
        "attach (every free loop device was taken by another attacher) for",
        backing,
        io::Error::from_raw_os_error(libc::EBUSY),
    ))
}

fn configure(node: &File, file: &File, backing: &Path, read_only: bool, direct_io: bool) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    if read_only {
        info.lo_flags |= LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    // Only informational (LOOP_GET_STATUS); sysfs shows the full path.
    let name = backing.as_os_str().as_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    let config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        // 0: the kernel's default (512, or the backing device's logical block size with direct I/O).
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (repr(C), same
    // layout as linux/loop.h) and which outlives the call; both fds are open.
    cvt(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) }).map(|_| ())
}

fn status(node: &File) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into `info`, which is exactly that.
    cvt(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) })?;
    Ok(info)
}

fn backoff(attempt: u32) {
    // The racing attacher's configure takes well under a millisecond; GET_FREE may name the same
    // device until it has finished.
    std::thread::sleep(Duration::from_micros(200 * u64::from(attempt + 1)));
}

/// Opens `/dev/loopN`. Where the node is missing although the kernel has the device (a container
/// whose /dev is a tmpfs filled at start, so devices made later never appear), makes the node from
/// the numbers sysfs gives.
fn open_node(dev: &LoopDevice, write: bool) -> Result<File, SysError> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(&dev.path)
    };
    match open() {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let sys = Path::new(SYS_BLOCK).join(format!("loop{}", dev.number)).join("dev");
            let numbers = match fs::read_to_string(&sys) {
                Ok(s) => s,
                // No such device in the kernel either.
                Err(e2) if e2.kind() == io::ErrorKind::NotFound => return Err(SysError::io("open", &dev.path, e)),
                Err(e2) => return Err(SysError::io("read", &sys, e2)),
            };
            let (major, minor) = parse_dev(&numbers).ok_or_else(|| {
                SysError::io(
                    "parse major:minor",
                    &sys,
                    io::Error::new(io::ErrorKind::InvalidData, numbers.trim().to_string()),
                )
            })?;
            let rdev = nix::sys::stat::makedev(major, minor);
            match nix::sys::stat::mknod(
                &dev.path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                rdev,
            ) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(SysError::io("make device node", &dev.path, e.into())),
            }
            open().step("open", &dev.path)
        }
        Err(e) => Err(SysError::io("open", &dev.path, e)),
    }
}

fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Whether the kernel refuses writes through `device` (`/sys/block/loopN/ro`): a device attached
/// read-only, or made so since.
pub fn is_read_only(device: &LoopDevice) -> Result<bool, SysError> {
    let path = Path::new(SYS_BLOCK).join(format!("loop{}", device.number)).join("ro");
    let text = fs::read_to_string(&path).step("read", &path)?;
    Ok(text.trim() == "1")
}

/// Every loop device whose backing file is `backing`. A device matches when the file the kernel
/// names is the same inode (device and inode number) as `backing`: equal canonical paths do, and
/// so does the same file reached through a bind mount or another hard link. Files the kernel marks
/// " (deleted)" never match, so a new file at an old path is not mistaken for the old one.
/// A `backing` that does not exist has no devices.
pub fn find_by_backing(backing: &Path) -> Result<Vec<LoopDevice>, SysError> {
    find_by_backing_in(Path::new(SYS_BLOCK), backing)
}

fn find_by_backing_in(sys_block: &Path, backing: &Path) -> Result<Vec<LoopDevice>, SysError> {
    let want = match fs::metadata(backing) {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SysError::io("stat", backing, e)),
    };
    let canonical = fs::canonicalize(backing).step("resolve", backing)?;
    let mut found = Vec::new();
    for a in attachments_in(sys_block)? {
        if a.backing_deleted {
            continue;
        }
        let same = a.backing == canonical
            || fs::metadata(&a.backing)
                .map(|m| (m.dev(), m.ino()) == want)
                .unwrap_or(false);
        if same {
            found.push(a.device);
        }
    }
    Ok(found)
}

/// Every bound loop device with its backing file as the kernel prints it (a deleted file keeps its
/// " (deleted)" suffix here; [`attachments`] separates the two).
pub fn list() -> Result<Vec<(LoopDevice, PathBuf)>, SysError> {
    Ok(attachments()?
        .into_iter()
        .map(|a| {
            let mut p = a.backing.into_os_string();
            if a.backing_deleted {
                p.push(DELETED);
            }
            (a.device, PathBuf::from(p))
        })
        .collect())
}

/// Every bound loop device, ordered by number.
pub fn attachments() -> Result<Vec<Attachment>, SysError> {
    attachments_in(Path::new(SYS_BLOCK))
}

const DELETED: &str = " (deleted)";

fn attachments_in(sys_block: &Path) -> Result<Vec<Attachment>, SysError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(sys_block).step("read directory", sys_block)? {
        let entry = entry.step("read directory", sys_block)?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let file = entry.path().join("loop").join("backing_file");
        let bytes = match fs::read(&file) {
            Ok(b) => b,
            // Not bound, or detached (or removed) by someone else while we looked.
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound)
                    || matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENODEV)) =>
            {
                continue
            }
            Err(e) => return Err(SysError::io("read", &file, e)),
        };
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        if bytes.is_empty() {
            continue;
        }
        let (path, deleted) = match bytes.strip_suffix(DELETED.as_bytes()) {
            Some(p) => (p, true),
            None => (bytes, false),
        };
        out.push(Attachment {
            device: LoopDevice::new(number),
            backing: PathBuf::from(OsStr::from_bytes(path)),
            backing_deleted: deleted,
        });
    }
    out.sort_by_key(|a| a.device.number);
    Ok(out)
}

/// Detaches a loop device (LOOP_CLR_FD). A device that is already detached or gone is fine.
/// While something else still holds the device open (a mount), the kernel finishes the detach at
/// the last close: unmount first.
pub fn detach(dev: &LoopDevice) -> Result<(), SysError> {
    let node = match open_node(dev, false) {
        Ok(f) => f,
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ENXIO)) => return Ok(()),
        Err(e) => return Err(e),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; `node` is an open fd.
    match cvt(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_CLR_FD, 0) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(SysError::io("detach (LOOP_CLR_FD)", &dev.path, e)),
    }
}

/// Makes the device take the backing file's current size (LOOP_SET_CAPACITY) after it grew.
pub fn refresh_capacity(dev: &LoopDevice) -> Result<(), SysError> {
    let node = open_node(dev, false)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; `node` is an open fd.
    cvt(unsafe { libc::ioctl(node.as_raw_fd(), LOOP_SET_CAPACITY, 0) })
        .step("refresh capacity (LOOP_SET_CAPACITY)", &dev.path)
        .map(|_| ())
}

/// Size in bytes of a block device (BLKGETSIZE64).
pub fn device_size(dev: &Path) -> Result<u64, SysError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)
        .step("open", dev)?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`; `f` is an open fd.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })
        .step("read block device size (BLKGETSIZE64)", dev)?;
    Ok(size)
}

/// Real images, devices and mounts for the tests of `sys`, undone on drop even when a test fails.
#[cfg(test)]
pub(crate) mod fixture {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use nix::mount::{MntFlags, MsFlags};

    use super::LoopDevice;

    pub fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes loop devices, filesystems and mounts: run it as root"
        );
    }

    /// A sparse image file in its own temp dir; optionally attached and mounted.
    pub struct Image {
        pub dir: tempfile::TempDir,
        pub file: PathBuf,
        pub dev: Option<LoopDevice>,
        pub mnt: PathBuf,
        pub mounted: bool,
        /// Tests that own loop devices run one at a time: a device number freed by one test is
        /// handed to the next attacher at once, and a test that detaches "its" number again would
        /// detach another test's device. Held by a test's first image only (a test may make two).
        _serial: Option<std::sync::MutexGuard<'static, ()>>,
    }

    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    thread_local! {
        static IMAGES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    impl Image {
        pub fn new(size: u64) -> Image {
            require_root();
            let first = IMAGES.with(|n| {
                n.set(n.get() + 1);
                n.get() == 1
            });
            let serial = first.then(|| SERIAL.lock().unwrap_or_else(|p| p.into_inner()));
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join("image");
            std::fs::File::create(&file)
                .and_then(|f| f.set_len(size))
                .expect("create image");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).expect("mkdir mnt");
            Image {
                dir,
                file,
                dev: None,
                mnt,
                mounted: false,
                _serial: serial,
            }
        }

        pub fn attach(&mut self) -> LoopDevice {
            let (dev, _) = super::attach(&self.file, false, false).expect("attach");
            self.dev = Some(dev.clone());
            dev
        }

        pub fn dev_path(&self) -> PathBuf {
            self.dev.as_ref().expect("attached").path.clone()
        }

        pub fn grow_file(&self, size: u64) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&self.file)
                .and_then(|f| f.set_len(size))
                .expect("grow image");
        }

        pub fn mount(&mut self, fs_type: &str) {
            self.mount_with(fs_type, None);
        }

        pub fn mount_with(&mut self, fs_type: &str, options: Option<&str>) {
            nix::mount::mount(
                Some(self.dev_path().as_path()),
                &self.mnt,
                Some(fs_type),
                MsFlags::empty(),
                options,
            )
            .expect("mount");
            self.mounted = true;
        }

        pub fn unmount(&mut self) {
            if self.mounted {
                retry_busy(|| nix::mount::umount2(&self.mnt, MntFlags::empty())).expect("unmount");
                self.mounted = false;
            }
        }

        /// Unmounts, detaches and checks that no mount and no loop device refers to the temp dir.
        pub fn finish(mut self) {
            self.unmount();
            if let Some(dev) = self.dev.take() {
                super::detach(&dev).expect("detach");
            }
            assert_no_leaks(self.dir.path());
        }

        fn teardown(&mut self) {
            if self.mounted {
                // A failed test may leave the filesystem frozen; an unmount would then hang.
                let _ = crate::sys::fstools::thaw(&self.mnt);
                if nix::mount::umount2(&self.mnt, MntFlags::empty()).is_err() {
                    let _ = nix::mount::umount2(&self.mnt, MntFlags::MNT_DETACH);
                }
                self.mounted = false;
            }
            if let Some(dev) = self.dev.take() {
                let _ = super::detach(&dev);
            }
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            IMAGES.with(|n| n.set(n.get().saturating_sub(1)));
            self.teardown();
        }
    }

    /// Tests run in parallel threads, and a thread that spawns a tool (mkfs ...) hands copies of
    /// every open descriptor to the child until its exec: an unmount in that instant is EBUSY, and
    /// a detach is finished by the kernel only when the child lets go. Both pass within moments.
    fn retry_busy(mut f: impl FnMut() -> nix::Result<()>) -> nix::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match f() {
                Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }

    /// Fails when a loop device is backed by, or a mount sits on, anything under `dir`.
    pub fn assert_no_leaks(dir: &Path) {
        let ours = || -> Vec<super::Attachment> {
            super::attachments()
                .expect("list loop devices")
                .into_iter()
                .filter(|a| a.backing.starts_with(dir))
                .collect()
        };
        // A detach finishes at the last close, which a concurrently spawning thread may delay.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut devices = ours();
        while !devices.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            devices = ours();
        }
        assert!(devices.is_empty(), "leaked loop devices: {devices:?}");
        let mounts: Vec<_> = crate::sys::mountinfo::read(Path::new(crate::sys::mountinfo::SELF))
            .expect("mountinfo")
            .into_iter()
            .filter(|m| m.mount_point.starts_with(dir))
            .collect();
        assert!(mounts.is_empty(), "leaked mounts: {mounts:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{require_root, Image};
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    // libc::Ioctl is c_ulong on glibc and c_int on musl: the cast is a no-op only on some targets.
    #[allow(clippy::unnecessary_cast)]
    fn structs_and_ioctl_numbers_match_linux_loop_h() {
        // Printed by a C program including <linux/loop.h> and <linux/fs.h>.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(BLKGETSIZE64 as u64, 0x8008_1272);
    }

    #[test]
    fn sysfs_scan_reads_backing_files_and_marks_deleted_ones() {
        let sys = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let live = data.path().join("live.img");
        std::fs::write(&live, b"x").unwrap();
        let canonical = std::fs::canonicalize(&live).unwrap();
        let put = |dev: &str, backing: Option<&[u8]>| {
            let d = sys.path().join(dev);
            std::fs::create_dir_all(d.join("loop")).unwrap();
            if let Some(b) = backing {
                std::fs::write(d.join("loop/backing_file"), b).unwrap();
            }
        };
        let mut line = canonical.as_os_str().as_bytes().to_vec();
        line.push(b'\n');
        put("loop3", Some(&line));
        let mut deleted = canonical.as_os_str().as_bytes().to_vec();
        deleted.extend_from_slice(b" (deleted)\n");
        put("loop1", Some(&deleted));
        put("loop2", None); // not bound
        put("vda", Some(b"/nonsense\n"));

        let all = attachments_in(sys.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].device, LoopDevice::new(1));
        assert!(all[0].backing_deleted);
        assert_eq!(all[0].backing, canonical);
        assert_eq!(all[1].device.path, PathBuf::from("/dev/loop3"));
        assert!(!all[1].backing_deleted);

        let found = find_by_backing_in(sys.path(), &live).unwrap();
        assert_eq!(found, vec![LoopDevice::new(3)]);
        assert!(find_by_backing_in(sys.path(), &data.path().join("missing"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn attach_gives_a_device_of_the_file_size_that_find_by_backing_finds() {
        let mut img = Image::new(64 * MIB);
        let dev = img.attach();
        assert_eq!(device_size(&dev.path).unwrap(), 64 * MIB);
        assert_eq!(find_by_backing(&img.file).unwrap(), vec![dev.clone()]);
        let listed = list().unwrap();
        let canonical = fs::canonicalize(&img.file).unwrap();
        assert!(listed.contains(&(dev.clone(), canonical)), "{listed:?}");
        img.finish();
    }

    #[test]
    fn detach_removes_the_attachment_and_a_second_detach_is_fine() {
        let mut img = Image::new(16 * MIB);
        let dev = img.attach();
        detach(&dev).unwrap();
        super::fixture::assert_no_leaks(img.dir.path());
        assert!(find_by_backing(&img.file).unwrap().is_empty());
        assert!(!Path::new(SYS_BLOCK).join(format!("loop{}/loop", dev.number)).exists());
        detach(&dev).unwrap();
        img.dev = None;
        img.finish();
    }

    #[test]
    fn refresh_capacity_shows_the_grown_file() {
        let mut img = Image::new(16 * MIB);
        let dev = img.attach();
        img.grow_file(48 * MIB);
        assert_eq!(device_size(&dev.path).unwrap(), 16 * MIB);
        refresh_capacity(&dev).unwrap();
        assert_eq!(device_size(&dev.path).unwrap(), 48 * MIB);
        img.finish();
    }

    #[test]
    fn read_only_attach_refuses_writes() {
        let mut img = Image::new(16 * MIB);
        let (dev, _) = attach(&img.file, true, false).unwrap();
        img.dev = Some(dev.clone());
        let ro = fs::read_to_string(Path::new(SYS_BLOCK).join(format!("loop{}/ro", dev.number))).unwrap();
        assert_eq!(ro.trim(), "1");
        let write = OpenOptions::new().write(true).open(&dev.path).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&[1u8; 4096])?;
            f.sync_all()
        });
        assert!(write.is_err(), "a read-only loop device took a write");
        img.finish();
    }

    #[test]
    fn direct_io_attach_reports_what_the_kernel_gave() {
        let mut img = Image::new(16 * MIB);
        let (dev, dio) = attach(&img.file, false, true).unwrap();
        img.dev = Some(dev.clone());
        // The attribute appears with the device's sysfs entry, which can lag the ioctl under load.
        let attr = Path::new(SYS_BLOCK).join(format!("loop{}/loop/dio", dev.number));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let sys = loop {
            match fs::read_to_string(&attr) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{}: {e}", attr.display()),
            }
        };
        assert_eq!(sys.trim() == "1", dio);
        eprintln!("direct I/O on a file in {}: {dio}", img.dir.path().display());
        img.finish();
    }

    #[test]
    fn a_deleted_backing_file_is_not_found_and_listed_as_deleted() {
        let mut img = Image::new(16 * MIB);
        let dev = img.attach();
        let canonical = fs::canonicalize(&img.file).unwrap();
        fs::remove_file(&img.file).unwrap();
        fs::write(&img.file, b"new file at the old path").unwrap();
        assert!(find_by_backing(&img.file).unwrap().is_empty());
        let a = attachments().unwrap().into_iter().find(|a| a.device == dev).unwrap();
        assert!(a.backing_deleted);
        assert_eq!(a.backing, canonical);
        img.finish();
    }

    #[test]
    fn parallel_attaches_get_distinct_devices() {
        require_root();
        let imgs: Vec<_> = (0..6).map(|_| Image::new(4 * MIB)).collect();
        let devs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = imgs
                .iter()
                .map(|i| s.spawn(|| attach(&i.file, false, false).unwrap().0))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut imgs = imgs;
        for (img, dev) in imgs.iter_mut().zip(&devs) {
            img.dev = Some(dev.clone());
            assert_eq!(find_by_backing(&img.file).unwrap(), vec![dev.clone()]);
        }
        let mut numbers: Vec<_> = devs.iter().map(|d| d.number).collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), devs.len());
        for img in imgs {
            img.finish();
        }
    }

    #[test]
    fn finding_a_device_is_not_disturbed_by_other_devices_detaching_meanwhile() {
        // NodeUnstage of one volume looks up its device while other volumes' devices come and go.
        let mut mine = Image::new(16 << 20);
        let dev = mine.attach();
        let other = Image::new(16 << 20);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..150 {
                    let (d, _) = attach(&other.file, false, false).expect("attach other");
                    detach(&d).expect("detach other");
                }
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut looked = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let found = find_by_backing(&mine.file).expect("lookup while another device detaches");
                assert_eq!(found, vec![dev.clone()]);
                looked += 1;
            }
            assert!(looked > 0);
        });
        mine.finish();
        other.finish();
    }
}
