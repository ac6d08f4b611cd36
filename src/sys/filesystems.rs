//! Filesystems inside image volumes behind one seam, at the grain of single operations: making one,
//! recognising one, freezing and thawing one, so the create plan, copies and group snapshots of
//! `image` volumes can be driven by a recording fake ([`RecordingFilesystems`]) without root.
//! Growing a filesystem belongs with its loop device ([`super::devices::Devices`]).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fstools::{self, FsType, Reach};
use super::{Recorded, Step, SysError};

pub trait Filesystems: Send + Sync {
    /// Makes a filesystem of type `fs` on the file or block device `target`, over what it held,
    /// guarded against two nodes mounting it at once when it is to be `Reach::Shared`.
    fn mkfs(&self, fs: FsType, target: &Path, reach: Reach) -> Result<(), SysError>;
    /// Which filesystem the unmounted file or device `target` holds; `None` when it holds nothing
    /// recognisable, an error when it holds something that is neither ext4 nor xfs.
    fn probe(&self, target: &Path) -> Result<Option<FsType>, SysError>;
    /// Freezes the filesystem mounted at `point.mountpoint`, which must be on `point.device`,
    /// until [`Filesystems::thaw_frozen`]; one already frozen fails with EBUSY.
    fn freeze(&self, point: &FreezePoint) -> Result<FrozenFs, SysError>;
    /// Thaws what [`Filesystems::freeze`] froze, through what it answered; one that is not frozen
    /// any more is fine.
    fn thaw_frozen(&self, frozen: &FrozenFs) -> Result<(), SysError>;
    /// Thaws the filesystem mounted at `mountpoint` now, for a freeze made by a process that is
    /// gone (its freeze mark); one that is not frozen is fine.
    fn thaw(&self, mountpoint: &Path) -> Result<(), SysError>;
    /// Guards the ext4 filesystem on the unmounted `target` against two nodes mounting it, as
    /// `mkfs` with `Reach::Shared` does (for copies that land on a share); `true` when it changed
    /// it, `false` for one already guarded or not ext4.
    fn guard_shared(&self, target: &Path) -> Result<bool, SysError>;
}

/// A filesystem to freeze: where it is mounted, and the block device it is mounted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezePoint {
    pub mountpoint: PathBuf,
    pub device: PathBuf,
}

impl AsRef<Path> for FreezePoint {
    fn as_ref(&self) -> &Path {
        &self.mountpoint
    }
}

/// A filesystem [`Filesystems::freeze`] froze, held by the descriptor it was frozen through, so
/// that its thaw reaches that very filesystem: an unmount meanwhile, or a path that leads
/// elsewhere by then, can neither make the thaw miss it nor thaw another one.
#[derive(Debug)]
pub struct FrozenFs {
    pub mountpoint: PathBuf,
    /// `None` for a fake's freeze.
    fd: Option<std::os::fd::OwnedFd>,
}

impl FrozenFs {
    /// A freeze a fake made: only its mountpoint.
    pub fn recorded(mountpoint: &Path) -> FrozenFs {
        FrozenFs {
            mountpoint: mountpoint.to_path_buf(),
            fd: None,
        }
    }
}

/// Thaws `frozen`, trying again a few times over about a third of a second when the thaw fails
/// (EINTR, a transient EIO): a filesystem left frozen stops every writer of the pod, so one failed
/// FITHAW must not be the last word. The last error when every try failed.
pub fn thaw_persistently(filesystems: &dyn Filesystems, frozen: &FrozenFs) -> Result<(), SysError> {
    persistently(&frozen.mountpoint, || filesystems.thaw_frozen(frozen))
}

/// [`thaw_persistently`] for a freeze known only by its mountpoint (a freeze mark read at start).
pub fn thaw_path_persistently(filesystems: &dyn Filesystems, mountpoint: &Path) -> Result<(), SysError> {
    persistently(mountpoint, || filesystems.thaw(mountpoint))
}

fn persistently(mountpoint: &Path, thaw: impl Fn() -> Result<(), SysError>) -> Result<(), SysError> {
    let mut wait = std::time::Duration::from_millis(20);
    let mut tries = 1;
    loop {
        match thaw() {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 5 => return Err(e),
            Err(e) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "thaw failed; trying again");
                std::thread::sleep(wait);
                wait *= 2;
                tries += 1;
            }
        }
    }
}

/// The real thing: mkfs.ext4/mkfs.xfs, the superblock magics and FIFREEZE/FITHAW.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxFilesystems;

impl Filesystems for LinuxFilesystems {
    fn mkfs(&self, fs: FsType, target: &Path, reach: Reach) -> Result<(), SysError> {
        fstools::mkfs(fs, target, reach)
    }
    fn probe(&self, target: &Path) -> Result<Option<FsType>, SysError> {
        fstools::probe(target)
    }
    fn freeze(&self, point: &FreezePoint) -> Result<FrozenFs, SysError> {
        let fd = fstools::freeze_on(&point.mountpoint, &point.device)?;
        Ok(FrozenFs {
            mountpoint: point.mountpoint.clone(),
            fd: Some(fd),
        })
    }
    fn thaw_frozen(&self, frozen: &FrozenFs) -> Result<(), SysError> {
        match &frozen.fd {
            Some(fd) => fstools::thaw_frozen(fd, &frozen.mountpoint),
            None => fstools::thaw(&frozen.mountpoint),
        }
    }
    fn thaw(&self, mountpoint: &Path) -> Result<(), SysError> {
        fstools::thaw(mountpoint)
    }
    fn guard_shared(&self, target: &Path) -> Result<bool, SysError> {
        fstools::guard_shared(target)
    }
}

/// Filesystems that exist only as their superblock magic: mkfs writes the magic of its type into
/// the file (so a rename or a copy of the file carries it, and probe finds it there, as the real
/// probe would) and refuses what the real tools refuse (a missing file, xfs under its minimum);
/// freezes are remembered per mountpoint. Every call is recorded; the next call of an operation can
/// be made to fail with an errno. For unit tests of the logic above `sys`.
#[derive(Debug, Default)]
pub struct RecordingFilesystems {
    state: Recorded<FsState>,
}

#[derive(Debug, Default)]
struct FsState {
    frozen: BTreeSet<PathBuf>,
}

impl RecordingFilesystems {
    pub fn calls(&self) -> Vec<String> {
        self.state.calls()
    }

    /// The next call of `op` ("mkfs", "probe", "freeze", "thaw", "guard") fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached.
    pub fn disarm(&self) {
        self.state.disarm();
    }

    /// The mountpoints frozen now.
    pub fn frozen(&self) -> Vec<PathBuf> {
        self.state.lock().frozen.iter().cloned().collect()
    }
}

impl Filesystems for RecordingFilesystems {
    fn mkfs(&self, fs: FsType, target: &Path, reach: Reach) -> Result<(), SysError> {
        drop(self.state.enter(
            "mkfs",
            format!("mkfs {} {} {reach:?}", fs.as_str(), target.display()),
            target,
        )?);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .step("open", target)?;
        let len = f.metadata().step("stat", target)?.len();
        if len < fs.min_bytes() {
            return Err(SysError::Tool {
                tool: format!("mkfs.{} {}", fs.as_str(), target.display()),
                status: "exit status: 1".into(),
                stderr: format!("{len} bytes is below the smallest {fs} filesystem"),
            });
        }
        // What the real probe reads: "XFSB" at 0, or 0xEF53 at 1080; the other one is cleared.
        let (magic, at, other, other_at): (&[u8], u64, &[u8], u64) = match fs {
            FsType::Xfs => (b"XFSB", 0, &[0, 0], 1080),
            FsType::Ext4 => (&[0x53, 0xEF], 1080, &[0, 0, 0, 0], 0),
        };
        f.write_all_at(other, other_at).step("write superblock", target)?;
        f.write_all_at(magic, at).step("write superblock", target)?;
        Ok(())
    }
    fn probe(&self, target: &Path) -> Result<Option<FsType>, SysError> {
        drop(
            self.state
                .enter("probe", format!("probe {}", target.display()), target)?,
        );
        // Reading a superblock needs no privilege: the fake reads what its mkfs wrote.
        fstools::probe(target)
    }
    fn freeze(&self, point: &FreezePoint) -> Result<FrozenFs, SysError> {
        let mountpoint = point.mountpoint.as_path();
        let mut s = self
            .state
            .enter("freeze", format!("freeze {}", mountpoint.display()), mountpoint)?;
        if !s.frozen.insert(mountpoint.to_path_buf()) {
            return Err(SysError::io(
                "freeze (FIFREEZE)",
                mountpoint,
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        Ok(FrozenFs::recorded(mountpoint))
    }
    fn thaw_frozen(&self, frozen: &FrozenFs) -> Result<(), SysError> {
        self.thaw(&frozen.mountpoint)
    }
    fn thaw(&self, mountpoint: &Path) -> Result<(), SysError> {
        let mut s = self
            .state
            .enter("thaw", format!("thaw {}", mountpoint.display()), mountpoint)?;
        s.frozen.remove(mountpoint);
        Ok(())
    }
    fn guard_shared(&self, target: &Path) -> Result<bool, SysError> {
        drop(
            self.state
                .enter("guard", format!("guard-shared {}", target.display()), target)?,
        );
        // The fake's filesystems are only a magic: there is no MMP block to add.
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_recorded_mkfs_is_found_by_probe_and_follows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .expect("file")
            .set_len(400 * MIB)
            .expect("size");
        let fs = RecordingFilesystems::default();
        assert_eq!(fs.probe(&img).expect("probe"), None);
        fs.mkfs(FsType::Ext4, &img, Reach::OneNode).expect("mkfs");
        let moved = dir.path().join("moved");
        std::fs::rename(&img, &moved).expect("rename");
        assert_eq!(fs.probe(&moved).expect("probe"), Some(FsType::Ext4));
        fs.mkfs(FsType::Xfs, &moved, Reach::OneNode).expect("mkfs over it");
        assert_eq!(fstools::probe(&moved).expect("real probe"), Some(FsType::Xfs));
        assert_eq!(fs.calls().len(), 4);
    }

    #[test]
    fn a_recorded_mkfs_refuses_what_the_tools_refuse_and_fails_when_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = RecordingFilesystems::default();
        let missing = fs
            .mkfs(FsType::Ext4, &dir.path().join("missing"), Reach::OneNode)
            .unwrap_err();
        assert_eq!(missing.errno(), Some(libc::ENOENT));
        let small = dir.path().join("small");
        std::fs::File::create(&small)
            .expect("file")
            .set_len(32 * MIB)
            .expect("size");
        assert!(matches!(
            fs.mkfs(FsType::Xfs, &small, Reach::OneNode),
            Err(SysError::Tool { .. })
        ));
        fs.fail_next("mkfs", libc::ENOSPC);
        assert_eq!(
            fs.mkfs(FsType::Ext4, &small, Reach::OneNode).unwrap_err().errno(),
            Some(libc::ENOSPC)
        );
        assert_eq!(fs.probe(&small).expect("probe"), None, "a failed mkfs made nothing");
        fs.mkfs(FsType::Ext4, &small, Reach::OneNode)
            .expect("only the next call fails");
    }

    #[test]
    fn a_recorded_freeze_holds_until_thawed() {
        let fs = RecordingFilesystems::default();
        let m = Path::new("/mnt/vol");
        let point = FreezePoint {
            mountpoint: m.to_path_buf(),
            device: PathBuf::from("/dev/loop7"),
        };
        let frozen = fs.freeze(&point).expect("freeze");
        assert_eq!(fs.freeze(&point).unwrap_err().errno(), Some(libc::EBUSY));
        assert_eq!(fs.frozen(), vec![m.to_path_buf()]);
        fs.thaw_frozen(&frozen).expect("thaw");
        fs.thaw(m).expect("thaw again is fine");
        assert!(fs.frozen().is_empty());
    }
}
