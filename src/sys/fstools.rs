//! Filesystems inside image files: make, grow, recognise, freeze.
//!
//! mkfs, e2fsck, resize2fs and xfs_growfs have no syscall equivalent and run through
//! [`super::run_tool`]; recognising a filesystem and freezing one are done here directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use super::{cvt, run_tool, Step, SysError};

// linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), #define FITHAW _IOWR('X', 120, int)
const FIFREEZE: libc::Ioctl = libc::_IOWR::<libc::c_int>(b'X' as u32, 119);
const FITHAW: libc::Ioctl = libc::_IOWR::<libc::c_int>(b'X' as u32, 120);

/// Where a new filesystem will be mounted from: one node's pool, or a share every node can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    OneNode,
    /// An image on a shared pool: any node may attach it, so ext4 gets multi-mount protection
    /// (the kernel refuses a second mount while the first is alive, and a first mount that finds
    /// another one made behind its back turns read-only).
    Shared,
}

/// A filesystem cellar makes inside `image` volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// The smallest filesystem mkfs makes (mkfs.xfs refuses anything under 300 MiB).
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 1 << 20,
            FsType::Xfs => 300 << 20,
        }
    }

    /// Options every mount of this filesystem gets: xfs copies (snapshots, clones, restores) keep
    /// their source's UUID, and xfs refuses a second filesystem with a UUID already mounted.
    pub fn mount_data(self) -> Option<&'static str> {
        match self {
            FsType::Ext4 => None,
            FsType::Xfs => Some("nouuid"),
        }
    }

    /// The name mount(2) and mkfs know it by.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Makes a filesystem on a file or block device, quickly: nothing is discarded (a new sparse image
/// has nothing to discard) and ext4 initialises inode tables and journal lazily after mount.
///
/// ext4 gets `-m 0`: the 5% reserved for root exists to keep a system disk usable, but in a volume
/// it would make `df` show less than the requested capacity to the (usually non-root) workload,
/// and a pod with CAP_SYS_RESOURCE could use it while others could not.
/// xfs: xfsprogs ≥ 5.1 makes reflink=1 by default, so no option is needed.
pub fn mkfs(fs: FsType, target: &Path, reach: Reach) -> Result<(), SysError> {
    let t = target.to_string_lossy();
    match fs {
        FsType::Ext4 => {
            let mut args = vec![
                "-F",
                "-q",
                // 4 KiB blocks: a loop device with direct I/O takes the 4 KiB logical block size of
                // the disk under the pool, and a 1 KiB-block ext4 (mke2fs's choice for small
                // filesystems) then refuses to mount ("bad block size").
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ];
            if reach == Reach::Shared {
                // Multi-mount protection: the mounting kernel keeps a sequence number in the
                // image up to date every few seconds; another node's mount that sees it move is
                // refused (EBUSY). A mount that finds its number changed by someone else raises a
                // filesystem error, which `-e remount-ro` turns into a read-only filesystem.
                args.extend(["-O", "mmp", "-e", "remount-ro"]);
            }
            args.push(&t);
            run_tool("mkfs.ext4", &args)
        }
        FsType::Xfs => run_tool("mkfs.xfs", &["-f", "-q", "-K", "-s", "size=4096", &t]),
    }
    .map(|_| ())
}

/// Gives the ext4 filesystem on the unmounted file or device `target` multi-mount protection, as
/// [`mkfs`] gives one made for a share (`tune2fs -O mmp -e remount-ro`, which replays a journal
/// left dirty by a copy of a mounted filesystem first). `true` when it changed anything: nothing
/// is done to one that has it already or is not ext4.
pub fn guard_shared(target: &Path) -> Result<bool, SysError> {
    let f = open_read(target)?;
    if probe_file(&f, target)? != Some(FsType::Ext4) || mmp_superblock(&f, target)?.is_some() {
        return Ok(false);
    }
    run_tool("tune2fs", &["-O", "mmp", "-e", "remount-ro", &target.to_string_lossy()])?;
    Ok(true)
}

/// Grows a mounted filesystem to the size of its device (after the image grew and the loop device
/// took the new size). xfs grows through its mountpoint, ext4 through its device.
///
/// Online ext4 growth needs CAP_SYS_RESOURCE (the kernel's EXT4_IOC_RESIZE_FS checks it): a
/// privileged pod has it, a sandbox without it gets resize2fs's "Operation not permitted".
pub fn grow_online(fs: FsType, device: &Path, mountpoint: &Path) -> Result<(), SysError> {
    match fs {
        FsType::Xfs => run_tool("xfs_growfs", &["-d", &mountpoint.to_string_lossy()]),
        FsType::Ext4 => run_tool("resize2fs", &[&device.to_string_lossy()]),
    }
    .map(|_| ())
}

/// Grows an unmounted filesystem on `device` (a loop device or the image file itself) to its
/// size. ext4: a forced check first, because resize2fs refuses a filesystem not checked since its
/// last mount. xfs can only grow while mounted: that is an error here.
///
/// The check runs with `-p` (preen): it repairs what is safe to repair unattended and fails on
/// anything worse, rather than `-y`, which answers yes to every repair and can throw data away.
pub fn grow_offline(fs: FsType, device: &Path) -> Result<(), SysError> {
    match fs {
        FsType::Xfs => Err(SysError::io(
            "grow xfs (xfs grows only while mounted: use grow_online)",
            device,
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        )),
        FsType::Ext4 => {
            let d = device.to_string_lossy();
            e2fsck_preen(&d)?;
            run_tool("resize2fs", &[&d]).map(|_| ())
        }
    }
}

/// `e2fsck -f -p`: exit status 0 is clean and 1 is "errors corrected"; both are fine. Anything
/// else (4: left uncorrected, 8: operational error ...) fails with e2fsck's output.
fn e2fsck_preen(device: &str) -> Result<(), SysError> {
    // e2fsck -p explains itself on stdout as much as on stderr: `tool_output` keeps both.
    tool_output("e2fsck", &["-f", "-p", device], &[0, 1]).map(drop)
}

/// What a check of an unmounted filesystem found ([`check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Consistent, its journal or log replayed or clean.
    Clean,
    /// Its journal (ext4) or log (xfs) holds changes not yet written in place, which the check
    /// could not replay: what it would say of the rest is not to be trusted (the changes it
    /// ignores look like inconsistencies). A crash-consistent copy of a mounted filesystem is
    /// like this. Only the kernel replays an xfs log: mount the filesystem (a read-only mount of
    /// a writable device replays it), unmount it and check again.
    LogDirty,
}

/// Checks the unmounted filesystem on `device` without repairing it, for a filesystem that came
/// from elsewhere (another node, a backup) before the kernel mounts it. `replay`: the device is
/// writable and an ext4 journal may be replayed first (`e2fsck -E journal_only`, what the
/// kernel's mount would do to it anyway); nothing else is ever written.
///
/// ext4: `e2fsck -f -n` (a journal left to replay is [`Checked::LogDirty`], found in the
/// superblock before e2fsck runs). xfs: `xfs_repair -n`, which goes on past a dirty log, warning
/// that it ignores it: that warning is [`Checked::LogDirty`], whatever it found after. Anything
/// found inconsistent otherwise is an error carrying the tool's output.
pub fn check(fs: FsType, device: &Path, replay: bool) -> Result<Checked, SysError> {
    let d = device.to_string_lossy();
    match fs {
        FsType::Ext4 => {
            if replay && ext4_needs_recovery(device)? {
                tool_output("e2fsck", &["-E", "journal_only", "-p", &d], &[0, 1])?;
            }
            if ext4_needs_recovery(device)? {
                return Ok(Checked::LogDirty);
            }
            tool_output("e2fsck", &["-f", "-n", &d], &[0])?;
            Ok(Checked::Clean)
        }
        FsType::Xfs => {
            let (code, text) = tool_run("xfs_repair", &["-n", &d])?;
            // xfsprogs' phase 2, since 2011: "ALERT: The filesystem has valuable metadata changes
            // in a log which is being ignored because the -n option was used."
            if text.contains("metadata changes in a log") {
                return Ok(Checked::LogDirty);
            }
            match code {
                Some(0) => Ok(Checked::Clean),
                _ => Err(tool_error("xfs_repair -n", code, &text)),
            }
        }
    }
}

/// Whether the ext4 on `device` has a journal to replay (EXT4_FEATURE_INCOMPAT_RECOVER, set while
/// it is mounted and left set in any copy taken then).
fn ext4_needs_recovery(device: &Path) -> Result<bool, SysError> {
    const EXT4_INCOMPAT_RECOVER: u32 = 0x4;
    let f = open_read(device)?;
    let Some(sb) = read_at(&f, device, 1024, 1024)? else {
        return Ok(false);
    };
    Ok(sb[0x38..0x3a] == [0x53, 0xEF] && le32(&sb, 0x60) & EXT4_INCOMPAT_RECOVER != 0)
}

/// Runs `tool`: its exit code and its output, stderr then stdout (fsck tools explain themselves
/// on either).
fn tool_run(tool: &str, args: &[&str]) -> Result<(Option<i32>, String), SysError> {
    let out = Command::new(tool).args(args).output().map_err(|e| SysError::Tool {
        tool: tool.into(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    Ok((out.status.code(), text))
}

/// Runs `tool`, failing with its output unless it exits with one of `ok`.
fn tool_output(tool: &str, args: &[&str], ok: &[i32]) -> Result<String, SysError> {
    let (code, text) = tool_run(tool, args)?;
    match code {
        Some(c) if ok.contains(&c) => Ok(text),
        _ => Err(tool_error(&format!("{tool} {}", args.join(" ")), code, &text)),
    }
}

fn tool_error(tool: &str, code: Option<i32>, text: &str) -> SysError {
    SysError::Tool {
        tool: tool.into(),
        status: code.map_or_else(|| "killed by a signal".into(), |c| format!("exit status: {c}")),
        stderr: text.into(),
    }
}

/// Which filesystem an unmounted file or device holds, read from the superblock magic itself:
/// xfs has "XFSB" at offset 0, ext2/3/4 have 0xEF53 (little endian) at 1080. ext2 and ext3 count
/// as ext4, which mounts them.
///
/// `None` only when neither is there and nothing else is recognised either. A known signature of
/// something else (btrfs, LUKS, swap, a partition table), or both xfs and ext magics at once, is an
/// error: the caller must never take such a device for empty and format it.
pub fn probe(target: &Path) -> Result<Option<FsType>, SysError> {
    probe_file(&open_read(target)?, target)
}

/// [`probe`] of a file already open.
fn probe_file(f: &File, target: &Path) -> Result<Option<FsType>, SysError> {
    let xfs = read_at(f, target, 0, 4)?.is_some_and(|m| m == b"XFSB");
    let ext = read_at(f, target, 1080, 2)?.is_some_and(|m| m == [0x53, 0xEF]);
    match (xfs, ext) {
        (true, true) => Err(SysError::io(
            "probe (both xfs and ext4 superblocks found; refusing to guess)",
            target,
            io::Error::from_raw_os_error(libc::EUCLEAN),
        )),
        (true, false) => Ok(Some(FsType::Xfs)),
        (false, true) => Ok(Some(FsType::Ext4)),
        (false, false) => match foreign_signature(f, target)? {
            Some(step) => Err(SysError::io(
                step,
                target,
                io::Error::from_raw_os_error(libc::EMEDIUMTYPE),
            )),
            None => Ok(None),
        },
    }
}

/// What ext4's multi-mount protection block of an unmounted image says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mmp {
    /// Unmounted cleanly: any node may mount it.
    Clean,
    /// e2fsck runs on it, or ran and was killed: every mount is refused until the mark is cleared
    /// (`tune2fs -f -E clear_mmp`) or an e2fsck completes.
    Fsck,
    /// Mounted (or last mounted and never cleanly unmounted) by the node the block names.
    InUse { node: String },
}

const EXT4_INCOMPAT_MMP: u32 = 0x100;
const MMP_MAGIC: u32 = 0x004D_4D50;
const MMP_SEQ_CLEAN: u32 = 0xFF4D_4D50;
const MMP_SEQ_FSCK: u32 = 0xE24D_4D50;

/// The state of ext4's multi-mount protection on `target` (an image file or its device), `None`
/// when it holds no ext4 with MMP enabled. Read from the superblock (incompatible features at
/// 0x60, block size at 0x18, the MMP block's number at 0x168) and the MMP block itself (magic,
/// sequence, then the mounting node's name in 64 bytes at 16).
pub fn mmp(target: &Path) -> Result<Option<Mmp>, SysError> {
    let f = open_read(target)?;
    let Some(sb) = mmp_superblock(&f, target)? else {
        return Ok(None);
    };
    let log_block = le32(&sb, 0x18);
    let block = le32(&sb, 0x168) as u64 | (le32(&sb, 0x16c) as u64) << 32;
    let Some(at) = (log_block < 7)
        .then(|| block.checked_mul(1024 << log_block))
        .flatten()
        .filter(|at| *at <= i64::MAX as u64)
    else {
        return Ok(None);
    };
    let Some(b) = read_at(&f, target, at, 80)? else {
        return Ok(None);
    };
    if le32(&b, 0) != MMP_MAGIC {
        return Ok(None);
    }
    Ok(Some(match le32(&b, 4) {
        MMP_SEQ_CLEAN => Mmp::Clean,
        MMP_SEQ_FSCK => Mmp::Fsck,
        _ => {
            // Whoever could write the image wrote these bytes: only what a host name holds.
            let name = &b[16..80];
            let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
            let plain = |c: &u8| c.is_ascii_alphanumeric() || b"-._".contains(c);
            Mmp::InUse {
                node: name[..end]
                    .iter()
                    .map(|c| if plain(c) { *c as char } else { '?' })
                    .collect(),
            }
        }
    }))
}

/// `target` opened for reading its superblocks.
fn open_read(target: &Path) -> Result<File, SysError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(target)
        .step("open", target)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The ext4 superblock of `f`, when it is one with the MMP feature on.
fn mmp_superblock(f: &File, target: &Path) -> Result<Option<Vec<u8>>, SysError> {
    let Some(sb) = read_at(f, target, 1024, 1024)? else {
        return Ok(None);
    };
    let on = sb[0x38..0x3a] == [0x53, 0xEF] && le32(&sb, 0x60) & EXT4_INCOMPAT_MMP != 0;
    Ok(on.then_some(sb))
}

/// Signatures of content that is neither ext4 nor xfs but must not be formatted over.
fn foreign_signature(f: &File, target: &Path) -> Result<Option<&'static str>, SysError> {
    const CHECKS: &[(u64, &[u8], &str)] = &[
        (
            0x10040,
            b"_BHRfS_M",
            "probe (found a btrfs filesystem, neither ext4 nor xfs)",
        ),
        (0, b"LUKS\xba\xbe", "probe (found a LUKS header, neither ext4 nor xfs)"),
        (
            4096 - 10,
            b"SWAPSPACE2",
            "probe (found swap space, neither ext4 nor xfs)",
        ),
        (
            512,
            b"EFI PART",
            "probe (found a GPT partition table, neither ext4 nor xfs)",
        ),
        (
            510,
            &[0x55, 0xAA],
            "probe (found an MBR boot sector, neither ext4 nor xfs)",
        ),
    ];
    for (offset, magic, step) in CHECKS {
        if read_at(f, target, *offset, magic.len())?.is_some_and(|m| m == *magic) {
            return Ok(Some(step));
        }
    }
    Ok(None)
}

/// `len` bytes at `offset`, `None` when the file is shorter.
fn read_at(f: &File, target: &Path, offset: u64, len: usize) -> Result<Option<Vec<u8>>, SysError> {
    let mut buf = vec![0u8; len];
    match f.read_exact_at(&mut buf, offset) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(SysError::io("read superblock", target, e)),
    }
}

/// Freezes the filesystem mounted at `mountpoint` from the block device `device` (FIFREEZE): writes
/// block until [`thaw_frozen`], and the filesystem on disk is consistent, so a copy of the image
/// taken now is too. Answers the descriptor it was frozen through, which the thaw must use.
///
/// The mountpoint is opened without following a symlink and must be on `device` (its `st_dev` is
/// the device's `st_rdev`): a volume unmounted since its mountpoint was looked up leaves a plain
/// directory there, and freezing through it would freeze whatever filesystem holds that directory
/// (the host's). Freezing a filesystem that is already frozen fails with EBUSY: someone else holds
/// that freeze.
pub fn freeze_on(mountpoint: &Path, device: &Path) -> Result<OwnedFd, SysError> {
    let d = open_dir(mountpoint)?;
    let at = nix::sys::stat::fstat(&d).step("stat", mountpoint)?;
    let dev = nix::sys::stat::stat(device).step("stat", device)?;
    if dev.st_mode & libc::S_IFMT != libc::S_IFBLK || at.st_dev != dev.st_rdev {
        return Err(SysError::io(
            "freeze (the mountpoint is no longer on the volume's device; it was unmounted)",
            mountpoint,
            io::Error::from_raw_os_error(libc::EXDEV),
        ));
    }
    // SAFETY: FIFREEZE ignores its argument; `d` is an open fd.
    cvt(unsafe { libc::ioctl(d.as_raw_fd(), FIFREEZE, 0) }).step("freeze (FIFREEZE)", mountpoint)?;
    Ok(d.into())
}

/// Thaws the filesystem `frozen` (the descriptor [`freeze_on`] answered) was frozen through
/// (FITHAW): the same superblock, wherever it is mounted now or if it is not mounted any more.
/// One that is not frozen (thawed already) is fine.
pub fn thaw_frozen(frozen: &OwnedFd, mountpoint: &Path) -> Result<(), SysError> {
    // SAFETY: FITHAW ignores its argument; `frozen` is an open fd.
    match cvt(unsafe { libc::ioctl(frozen.as_raw_fd(), FITHAW, 0) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(SysError::io("thaw (FITHAW)", mountpoint, e)),
    }
}

/// Thaws the filesystem mounted at `mountpoint` now (FITHAW), for a freeze whose descriptor is gone
/// with the process that made it (a freeze mark read at start). One that is not frozen is fine.
pub fn thaw(mountpoint: &Path) -> Result<(), SysError> {
    thaw_frozen(&open_dir(mountpoint)?.into(), mountpoint)
}

fn open_dir(path: &Path) -> Result<File, SysError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .step("open", path)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::sys::loopdev::{self, fixture::Image};
    use crate::sys::statfs;

    const MIB: u64 = 1 << 20;

    #[test]
    fn fs_type_names_round_trip() {
        for fs in [FsType::Ext4, FsType::Xfs] {
            assert_eq!(FsType::parse(fs.as_str()), Some(fs));
        }
        assert_eq!(FsType::parse("btrfs"), None);
        assert_eq!(FsType::parse("EXT4"), None);
    }

    #[test]
    // libc::Ioctl is c_ulong on glibc and c_int on musl: the cast is a no-op only on some targets.
    #[allow(clippy::unnecessary_cast)]
    fn freeze_ioctl_numbers_match_linux_fs_h() {
        assert_eq!(FIFREEZE as u64, 0xc004_5877);
        assert_eq!(FITHAW as u64, 0xc004_5878);
    }

    #[test]
    fn probe_of_a_zeroed_or_short_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"XFS").unwrap();
        assert_eq!(probe(&short).unwrap(), None);
        let zero = dir.path().join("zero");
        std::fs::File::create(&zero).unwrap().set_len(MIB).unwrap();
        assert_eq!(probe(&zero).unwrap(), None);
    }

    #[test]
    fn probe_refuses_other_signatures_and_both_magics() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(MIB).unwrap();
        file.write_all_at(b"SWAPSPACE2", 4086).unwrap();
        assert_eq!(probe(&f).unwrap_err().errno(), Some(libc::EMEDIUMTYPE));
        file.write_all_at(b"XFSB", 0).unwrap();
        assert_eq!(probe(&f).unwrap(), Some(FsType::Xfs));
        file.write_all_at(&[0x53, 0xEF], 1080).unwrap();
        assert_eq!(probe(&f).unwrap_err().errno(), Some(libc::EUCLEAN));
    }

    #[test]
    fn mkfs_failure_carries_the_tools_message() {
        let dir = tempfile::tempdir().unwrap();
        let err = mkfs(FsType::Xfs, &dir.path().join("missing/image"), Reach::OneNode).unwrap_err();
        assert!(
            matches!(err, SysError::Tool { ref stderr, .. } if !stderr.is_empty()),
            "{err}"
        );
    }

    #[test]
    fn ext4_on_a_file_probes_mounts_and_has_no_reserved_blocks() {
        let mut img = Image::new(256 * MIB);
        assert_eq!(probe(&img.file).unwrap(), None);
        mkfs(FsType::Ext4, &img.file, Reach::OneNode).unwrap();
        assert_eq!(mmp(&img.file).unwrap(), None, "a local image has no MMP");
        assert_eq!(probe(&img.file).unwrap(), Some(FsType::Ext4));
        // s_r_blocks_count_lo, 8 bytes into the superblock at 1024: -m 0 reserves nothing for root.
        let mut reserved = [0u8; 4];
        std::fs::File::open(&img.file)
            .unwrap()
            .read_exact_at(&mut reserved, 1032)
            .unwrap();
        assert_eq!(u32::from_le_bytes(reserved), 0);
        img.attach();
        assert_eq!(probe(&img.dev_path()).unwrap(), Some(FsType::Ext4));
        img.mount("ext4");
        std::fs::write(img.mnt.join("hello"), b"world").unwrap();
        let total = statfs::usage(&img.mnt).unwrap().total_bytes;
        assert!(total > 200 * MIB && total <= 256 * MIB, "{total}");
        img.finish();
    }

    #[test]
    fn xfs_on_a_device_probes_and_mounts() {
        let mut img = Image::new(512 * MIB);
        img.attach();
        mkfs(FsType::Xfs, &img.dev_path(), Reach::OneNode).unwrap();
        assert_eq!(probe(&img.dev_path()).unwrap(), Some(FsType::Xfs));
        assert_eq!(probe(&img.file).unwrap(), Some(FsType::Xfs));
        img.mount("xfs");
        std::fs::write(img.mnt.join("hello"), b"world").unwrap();
        assert_eq!(std::fs::read(img.mnt.join("hello")).unwrap(), b"world");
        img.finish();
    }

    #[test]
    fn xfs_grows_online_after_the_image_grew() {
        let mut img = Image::new(512 * MIB);
        let dev = img.attach();
        mkfs(FsType::Xfs, &dev.path, Reach::OneNode).unwrap();
        img.mount("xfs");
        let before = statfs::usage(&img.mnt).unwrap().total_bytes;
        img.grow_file(1024 * MIB);
        loopdev::refresh_capacity(&dev).unwrap();
        grow_online(FsType::Xfs, &dev.path, &img.mnt).unwrap();
        let after = statfs::usage(&img.mnt).unwrap().total_bytes;
        assert!(after > before + 400 * MIB, "before {before} after {after}");
        img.finish();
    }

    /// The kernel lets only CAP_SYS_RESOURCE resize a mounted ext4; without it the tool's message
    /// must come through.
    #[test]
    fn ext4_grows_online_when_cap_sys_resource_is_held() {
        let mut img = Image::new(256 * MIB);
        let dev = img.attach();
        mkfs(FsType::Ext4, &dev.path, Reach::OneNode).unwrap();
        img.mount("ext4");
        let before = statfs::usage(&img.mnt).unwrap().total_bytes;
        img.grow_file(512 * MIB);
        loopdev::refresh_capacity(&dev).unwrap();
        let result = grow_online(FsType::Ext4, &dev.path, &img.mnt);
        let after = statfs::usage(&img.mnt).unwrap().total_bytes;
        if has_cap_sys_resource() {
            result.unwrap();
            assert!(after > before + 200 * MIB, "before {before} after {after}");
        } else {
            let err = result.unwrap_err();
            assert!(matches!(err, SysError::Tool { .. }), "{err}");
            assert_eq!(after, before);
            eprintln!("online ext4 grow without CAP_SYS_RESOURCE: {err}");
        }
        img.finish();
    }

    fn has_cap_sys_resource() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        eff & (1 << 24) != 0
    }

    #[test]
    fn ext4_grows_offline_on_its_device() {
        let mut img = Image::new(256 * MIB);
        let dev = img.attach();
        mkfs(FsType::Ext4, &dev.path, Reach::OneNode).unwrap();
        img.mount("ext4");
        std::fs::write(img.mnt.join("keep"), b"data").unwrap();
        let before = statfs::usage(&img.mnt).unwrap().total_bytes;
        img.unmount();
        img.grow_file(512 * MIB);
        loopdev::refresh_capacity(&dev).unwrap();
        grow_offline(FsType::Ext4, &dev.path).unwrap();
        img.mount("ext4");
        let after = statfs::usage(&img.mnt).unwrap().total_bytes;
        assert!(after > before + 200 * MIB, "before {before} after {after}");
        assert_eq!(std::fs::read(img.mnt.join("keep")).unwrap(), b"data");
        img.finish();
    }

    /// Root only. An ext4 made for a share, mounted through one loop device, is refused a second
    /// mount through another device over the same file (another node's, in a cluster): the two
    /// kernels would otherwise each write the filesystem as if it were theirs alone.
    #[test]
    fn an_ext4_made_for_a_share_refuses_a_second_mount_while_mounted() {
        let mut img = Image::new(64 * MIB);
        mkfs(FsType::Ext4, &img.file, Reach::Shared).unwrap();
        assert_eq!(mmp(&img.file).unwrap(), Some(Mmp::Clean));
        img.attach();
        img.mount("ext4");
        std::fs::write(img.mnt.join("first"), b"mine").unwrap();
        // The mounting kernel names itself in the MMP block, which is what a refused stage reports.
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert_eq!(mmp(&img.file).unwrap(), Some(Mmp::InUse { node: host }));
        let (other, _) = loopdev::attach(&img.file, false, false).unwrap();
        let elsewhere = img.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let second = nix::mount::mount(
            Some(&other.path),
            &elsewhere,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if second.is_ok() {
            let _ = nix::mount::umount(&elsewhere);
        }
        let _ = loopdev::detach(&other);
        assert_eq!(
            second,
            Err(nix::errno::Errno::EBUSY),
            "a second mount of a mounted shared ext4"
        );
        assert_eq!(std::fs::read(img.mnt.join("first")).unwrap(), b"mine");
        img.finish();
    }

    /// The MMP block is the image's, which whoever could write the image wrote: a name is only what
    /// a host name holds, and a block number past any file is no block (never an error or panic).
    #[test]
    fn an_mmp_block_is_read_as_hostile_input() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let write = |block: u64, name: &[u8]| {
            let mut b = vec![0u8; 3 * 4096];
            let sb = 1024;
            b[sb + 0x38..sb + 0x3a].copy_from_slice(&[0x53, 0xEF]);
            b[sb + 0x18..sb + 0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
            b[sb + 0x60..sb + 0x64].copy_from_slice(&EXT4_INCOMPAT_MMP.to_le_bytes());
            b[sb + 0x168..sb + 0x170].copy_from_slice(&block.to_le_bytes());
            b[4096..4100].copy_from_slice(&MMP_MAGIC.to_le_bytes());
            b[4100..4104].copy_from_slice(&7u32.to_le_bytes());
            b[4096 + 16..4096 + 16 + name.len()].copy_from_slice(name);
            std::fs::write(&img, b).unwrap();
        };
        write(1, b"node\x1b[31m-2\n");
        assert_eq!(
            mmp(&img).unwrap(),
            Some(Mmp::InUse {
                node: "node??31m-2?".into()
            })
        );
        for block in [2, u64::MAX, u64::MAX / 4096, (i64::MAX as u64) / 4096 + 1] {
            write(block, b"x");
            assert_eq!(mmp(&img).unwrap(), None, "block {block}");
        }
        // It has the feature, if not a valid block: nothing for tune2fs to add.
        assert!(!guard_shared(&img).unwrap());
    }

    /// Root only. A copy of a mounted filesystem (crash-consistent, as a copy to another node is)
    /// has a journal or log to replay: a check that cannot replay it says so instead of judging
    /// the rest; replayed (ext4 by e2fsck, xfs by the kernel's mount), it checks clean. A
    /// filesystem found inconsistent fails with the tool's output.
    #[test]
    fn a_filesystem_from_elsewhere_is_checked_and_a_dirty_log_is_told_apart() {
        for fs in [FsType::Ext4, FsType::Xfs] {
            let mut img = Image::new(320 * MIB);
            let dev = img.attach();
            mkfs(fs, &dev.path, Reach::OneNode).unwrap();
            assert_eq!(check(fs, &dev.path, false).unwrap(), Checked::Clean, "{fs} fresh");
            img.mount(fs.as_str());
            for i in 0..100 {
                std::fs::write(img.mnt.join(format!("f{i}")), b"data").unwrap();
            }
            nix::unistd::sync();
            std::fs::create_dir(img.mnt.join("late")).unwrap();
            // Another image of the test's own, so that one image holds the loop device lock.
            let mut copy = Image::new(0);
            let out = Command::new("cp")
                .arg("--sparse=always")
                .arg(&img.file)
                .arg(&copy.file)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            img.unmount();
            assert_eq!(check(fs, &copy.file, false).unwrap(), Checked::LogDirty, "{fs} copy");
            match fs {
                FsType::Ext4 => {
                    assert_eq!(check(fs, &copy.file, true).unwrap(), Checked::Clean, "replayed");
                    assert!(!ext4_needs_recovery(&copy.file).unwrap());
                }
                FsType::Xfs => {
                    copy.attach();
                    copy.mount_with("xfs", Some("nouuid"));
                    copy.unmount();
                    assert_eq!(check(fs, &copy.dev_path(), true).unwrap(), Checked::Clean, "replayed");
                }
            }
            copy.finish();
            // The root directory made a plain file: inconsistent, and said so.
            let spoil = match fs {
                FsType::Ext4 => Command::new("debugfs")
                    .args(["-w", "-R", "clri <2>"])
                    .arg(&dev.path)
                    .output(),
                FsType::Xfs => Command::new("xfs_db")
                    .args(["-x", "-c", "inode 128", "-c", "write core.mode 0100644"])
                    .arg(&dev.path)
                    .output(),
            }
            .unwrap();
            assert!(spoil.status.success(), "{spoil:?}");
            let e = check(fs, &dev.path, true).unwrap_err();
            assert!(
                matches!(e, SysError::Tool { ref stderr, .. } if !stderr.is_empty()),
                "{e}"
            );
            img.finish();
        }
    }

    #[test]
    fn xfs_cannot_grow_offline() {
        let err = grow_offline(FsType::Xfs, Path::new("/dev/null")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EOPNOTSUPP));
        assert!(err.to_string().contains("only while mounted"), "{err}");
    }

    /// A volume unmounted while a cut had it frozen (an unstage racing a group snapshot) leaves
    /// a plain directory at its mountpoint: a freeze through it is refused (it froze the
    /// filesystem holding that directory, the host's), and the thaw of the freeze made before
    /// reaches the volume's filesystem through its descriptor (by path it thawed nothing, and the
    /// volume stayed frozen with no mount for good).
    #[test]
    fn a_freeze_reaches_only_the_volumes_filesystem_and_its_thaw_follows_it() {
        let mut img = Image::new(256 * MIB);
        img.attach();
        mkfs(FsType::Ext4, &img.dev_path(), Reach::OneNode).unwrap();
        img.mount("ext4");
        let frozen = freeze_on(&img.mnt, &img.dev_path()).unwrap();
        nix::mount::umount2(&img.mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let e = freeze_on(&img.mnt, &img.dev_path()).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EXDEV), "{e}");
        thaw_frozen(&frozen, &img.mnt).unwrap();
        drop(frozen);
        // Mounted again: the superblock is the one thawed, so a write goes through.
        img.mount("ext4");
        let (tx, rx) = mpsc::channel();
        let file = img.mnt.join("written-after-thaw");
        std::thread::spawn(move || {
            let _ = tx.send(std::fs::write(&file, b"x").and_then(|()| std::fs::File::open(&file)?.sync_all()));
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the filesystem stayed frozen")
            .expect("write");
        img.finish();
    }

    #[test]
    fn freeze_blocks_writes_until_thaw() {
        let mut img = Image::new(256 * MIB);
        img.attach();
        mkfs(FsType::Ext4, &img.dev_path(), Reach::OneNode).unwrap();
        img.mount("ext4");
        let frozen = freeze_on(&img.mnt, &img.dev_path()).unwrap();
        assert_eq!(
            freeze_on(&img.mnt, &img.dev_path()).unwrap_err().errno(),
            Some(libc::EBUSY)
        );
        let (tx, rx) = mpsc::channel();
        let file = img.mnt.join("written-while-frozen");
        let writer = std::thread::spawn(move || {
            let r = std::fs::write(&file, b"late");
            let _ = tx.send(r.map(|_| Instant::now()));
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a write went through a frozen filesystem"
        );
        let thawed = Instant::now();
        thaw_frozen(&frozen, &img.mnt).unwrap();
        drop(frozen);
        let done = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("write still blocked after thaw");
        assert!(done.unwrap() >= thawed);
        writer.join().unwrap();
        thaw(&img.mnt).unwrap(); // not frozen: fine
        img.finish();
    }
}
