//! btrfs behind one seam, at the grain of single operations: subvolumes, snapshots, qgroup limits
//! and usage, and the compression property, so the `btrfs` layout and the engine's create, expand,
//! snapshot and delete of btrfs volumes can be driven by a recording fake ([`RecordingSubvolumes`])
//! without root or a btrfs filesystem.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::btrfs::{self, QgroupUsage};
use super::{Recorded, Step, SysError};

pub trait Subvolumes: Send + Sync {
    /// Whether `path` is on a btrfs filesystem.
    fn is_btrfs(&self, path: &Path) -> Result<bool, SysError>;
    /// Whether `path` itself (not a symlink to it) is the root directory of a subvolume.
    fn is_subvolume(&self, path: &Path) -> Result<bool, SysError>;
    /// Turns qgroups on for the filesystem holding `path`; enabling again is a no-op.
    fn enable_quota(&self, path: &Path) -> Result<(), SysError>;
    /// Makes a new, empty subvolume at `path`, which must not exist.
    fn create(&self, path: &Path) -> Result<(), SysError>;
    /// Snapshots the subvolume `src` to `dst` (which must not exist), read-only if asked.
    fn snapshot(&self, src: &Path, dst: &Path, read_only: bool) -> Result<(), SysError>;
    /// Deletes the subvolume at `path` and any made inside it; nothing there is fine, a plain
    /// directory is refused.
    fn delete(&self, path: &Path) -> Result<(), SysError>;
    /// Commits the running transaction of the filesystem holding `path`: what was made is on disk.
    fn commit(&self, path: &Path) -> Result<(), SysError>;
    /// Limits the bytes the subvolume at `path` references; 0 removes the limit.
    fn set_limit(&self, path: &Path, bytes: u64) -> Result<(), SysError>;
    /// Usage and limit of the subvolume at `path`.
    fn usage(&self, path: &Path) -> Result<QgroupUsage, SysError>;
    /// Sets (`Some`) or removes (`None`) the compression property of `path`.
    fn set_compression(&self, path: &Path, algo: Option<&str>) -> Result<(), SysError>;
    /// The subvolumes made directly inside the subvolume at `path` (a workload may make them):
    /// their ids. Its qgroup limit does not cover them, and its snapshots hold them as empty
    /// directories.
    fn nested(&self, path: &Path) -> Result<Vec<u64>, SysError>;
}

/// The real thing: btrfs ioctls, sysfs and the compression xattr.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSubvolumes;

impl Subvolumes for LinuxSubvolumes {
    fn is_btrfs(&self, path: &Path) -> Result<bool, SysError> {
        btrfs::is_btrfs(path)
    }
    fn is_subvolume(&self, path: &Path) -> Result<bool, SysError> {
        btrfs::is_subvolume(path)
    }
    fn enable_quota(&self, path: &Path) -> Result<(), SysError> {
        btrfs::enable_quota(path)
    }
    fn create(&self, path: &Path) -> Result<(), SysError> {
        btrfs::create_subvolume(path)
    }
    fn snapshot(&self, src: &Path, dst: &Path, read_only: bool) -> Result<(), SysError> {
        btrfs::snapshot(src, dst, read_only)
    }
    fn delete(&self, path: &Path) -> Result<(), SysError> {
        btrfs::delete_subvolume(path)
    }
    fn commit(&self, path: &Path) -> Result<(), SysError> {
        btrfs::commit(path)
    }
    fn set_limit(&self, path: &Path, bytes: u64) -> Result<(), SysError> {
        btrfs::set_limit(path, bytes)
    }
    fn usage(&self, path: &Path) -> Result<QgroupUsage, SysError> {
        btrfs::usage(path)
    }
    fn set_compression(&self, path: &Path, algo: Option<&str>) -> Result<(), SysError> {
        btrfs::set_compression(path, algo)
    }
    fn nested(&self, path: &Path) -> Result<Vec<u64>, SysError> {
        btrfs::nested_subvolumes(path)
    }
}

/// A btrfs that exists only in memory, over real directories: everything below the roots it is
/// given counts as btrfs; a subvolume is a real directory the fake made, known by its inode (so it
/// stays one when renamed, as a real one does) until it is deleted; a snapshot is a copy of its
/// source's files; limits and compression are remembered and usage counts the bytes of the files
/// inside. Every call is recorded; the next call of an operation can be made to fail with an errno.
/// For unit tests of the logic above `sys`.
#[derive(Debug, Default)]
pub struct RecordingSubvolumes {
    state: Recorded<SubvolState>,
}

#[derive(Debug, Default)]
struct SubvolState {
    roots: Vec<PathBuf>,
    /// (device, inode) of each subvolume's directory.
    subvolumes: BTreeMap<(u64, u64), Subvolume>,
    quota: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subvolume {
    pub read_only: bool,
    /// 0: no limit.
    pub limit: u64,
    pub compression: Option<String>,
}

impl RecordingSubvolumes {
    /// A fake btrfs holding everything below `root`.
    pub fn over(root: &Path) -> RecordingSubvolumes {
        let fake = RecordingSubvolumes::default();
        fake.state.lock().roots.push(root.to_path_buf());
        fake
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.calls()
    }

    /// The next call of `op` ("create", "snapshot", "delete", "commit", "limit", "usage",
    /// "compression", "quota") fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached.
    pub fn disarm(&self) {
        self.state.disarm();
    }

    /// The subvolumes below `dir` (deepest last), with what is known of each: what a leak check reads.
    pub fn below(&self, dir: &Path) -> Vec<(PathBuf, Subvolume)> {
        let s = self.state.lock();
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if !m.is_dir() {
                    continue;
                }
                if let Some(v) = s.subvolumes.get(&(m.dev(), m.ino())) {
                    found.push((e.path(), v.clone()));
                }
                pending.push(e.path());
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
}

impl SubvolState {
    fn on_btrfs(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    /// The subvolume whose root directory is `path`, if it is one.
    fn key(&self, path: &Path) -> Option<(u64, u64)> {
        let m = std::fs::symlink_metadata(path).ok()?;
        let key = (m.dev(), m.ino());
        (m.is_dir() && self.subvolumes.contains_key(&key)).then_some(key)
    }

    fn require(&self, path: &Path, step: &'static str) -> Result<(u64, u64), SysError> {
        self.key(path).ok_or_else(|| einval(step, path))
    }

    /// Makes the directory of a new subvolume at `path` and knows it as one.
    fn make(&mut self, path: &Path, v: Subvolume) -> Result<(), SysError> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !self.on_btrfs(parent) {
            return Err(SysError::io(
                "create subvolume (the parent directory is not on btrfs) in",
                path,
                io::Error::from_raw_os_error(libc::EXDEV),
            ));
        }
        std::fs::create_dir(path).step("create subvolume", path)?;
        let m = std::fs::symlink_metadata(path).step("stat", path)?;
        self.subvolumes.insert((m.dev(), m.ino()), v);
        Ok(())
    }

    /// Forgets every subvolume at or below `path` (deleted with it).
    fn forget_below(&mut self, path: &Path) {
        let mut pending = vec![path.to_path_buf()];
        while let Some(d) = pending.pop() {
            if let Ok(m) = std::fs::symlink_metadata(&d) {
                self.subvolumes.remove(&(m.dev(), m.ino()));
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(e.path());
                }
            }
        }
    }
}

fn einval(step: &'static str, path: &Path) -> SysError {
    SysError::io(step, path, io::Error::from_raw_os_error(libc::EINVAL))
}

/// Copies the files and directories of `src` into the new directory `dst`.
fn copy_into(src: &Path, dst: &Path) -> Result<(), SysError> {
    for e in std::fs::read_dir(src).step("read directory", src)? {
        let e = e.step("read directory", src)?;
        let to = dst.join(e.file_name());
        // As btrfs, which copies no file: a symlink stays a symlink (never followed), a FIFO a
        // FIFO (never opened).
        let kind = e.file_type().step("stat", &e.path())?;
        if kind.is_dir() {
            std::fs::create_dir(&to).step("mkdir", &to)?;
            copy_into(&e.path(), &to)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(e.path()).step("readlink", &e.path())?;
            std::os::unix::fs::symlink(target, &to).step("symlink", &to)?;
        } else if kind.is_file() {
            std::fs::copy(e.path(), &to).step("copy", &to)?;
        } else {
            let mode = nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR;
            nix::unistd::mkfifo(&to, mode).map_err(|e| SysError::io("mkfifo", &to, e.into()))?;
        }
    }
    Ok(())
}

/// Bytes of the files below `dir`.
fn bytes_below(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_below(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

impl Subvolumes for RecordingSubvolumes {
    fn is_btrfs(&self, path: &Path) -> Result<bool, SysError> {
        let s = self
            .state
            .enter("is-btrfs", format!("is-btrfs {}", path.display()), path)?;
        Ok(s.on_btrfs(path))
    }
    fn is_subvolume(&self, path: &Path) -> Result<bool, SysError> {
        let s = self
            .state
            .enter("is-subvolume", format!("is-subvolume {}", path.display()), path)?;
        Ok(s.key(path).is_some())
    }
    fn enable_quota(&self, path: &Path) -> Result<(), SysError> {
        let mut s = self
            .state
            .enter("quota", format!("enable-quota {}", path.display()), path)?;
        s.quota = true;
        Ok(())
    }
    fn create(&self, path: &Path) -> Result<(), SysError> {
        let mut s = self.state.enter("create", format!("create {}", path.display()), path)?;
        s.make(path, Subvolume::default())
    }
    fn snapshot(&self, src: &Path, dst: &Path, read_only: bool) -> Result<(), SysError> {
        let mut s = self.state.enter(
            "snapshot",
            format!("snapshot {} {} ro={read_only}", src.display(), dst.display()),
            dst,
        )?;
        let from = s.require(src, "snapshot (the source is not a btrfs subvolume)")?;
        let copy = Subvolume {
            read_only,
            ..s.subvolumes[&from].clone()
        };
        s.make(dst, copy)?;
        // As the ioctl: the snapshot is whole or not there.
        copy_into(src, dst).inspect_err(|_| {
            s.forget_below(dst);
            let _ = std::fs::remove_dir_all(dst);
        })
    }
    fn delete(&self, path: &Path) -> Result<(), SysError> {
        let mut s = self.state.enter("delete", format!("delete {}", path.display()), path)?;
        if s.key(path).is_none() {
            return match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                _ => Err(einval(
                    "delete subvolume (not a btrfs subvolume; refusing to delete)",
                    path,
                )),
            };
        }
        s.forget_below(path);
        std::fs::remove_dir_all(path).step("delete subvolume", path)
    }
    fn commit(&self, path: &Path) -> Result<(), SysError> {
        drop(self.state.enter("commit", format!("commit {}", path.display()), path)?);
        Ok(())
    }
    fn set_limit(&self, path: &Path, bytes: u64) -> Result<(), SysError> {
        let mut s = self
            .state
            .enter("limit", format!("limit {} {bytes}", path.display()), path)?;
        let key = s.require(path, "limit qgroup (not a btrfs subvolume)")?;
        if !s.quota {
            return Err(SysError::io(
                "limit qgroup (quotas are not enabled on this btrfs: enable_quota first)",
                path,
                io::Error::from_raw_os_error(libc::ENOTCONN),
            ));
        }
        if let Some(v) = s.subvolumes.get_mut(&key) {
            v.limit = bytes;
        }
        Ok(())
    }
    fn usage(&self, path: &Path) -> Result<QgroupUsage, SysError> {
        let s = self.state.enter("usage", format!("usage {}", path.display()), path)?;
        let key = s.require(path, "read qgroup usage (not a btrfs subvolume)")?;
        let limit = s.subvolumes[&key].limit;
        let used = bytes_below(path);
        Ok(QgroupUsage {
            referenced: used,
            exclusive: used,
            max_referenced: (limit > 0).then_some(limit),
        })
    }
    fn set_compression(&self, path: &Path, algo: Option<&str>) -> Result<(), SysError> {
        let mut s = self.state.enter(
            "compression",
            format!("compression {} {}", path.display(), algo.unwrap_or("none")),
            path,
        )?;
        if let Some(a) = algo.filter(|a| !btrfs::COMPRESSION_ALGORITHMS.contains(a)) {
            return Err(SysError::io(
                "set compression (unknown algorithm; known: zstd, lzo, zlib)",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, format!("'{a}'")),
            ));
        }
        std::fs::symlink_metadata(path).step("set compression property", path)?;
        if let Some(key) = s.key(path) {
            if let Some(v) = s.subvolumes.get_mut(&key) {
                v.compression = algo.map(str::to_string);
            }
        }
        Ok(())
    }
    fn nested(&self, path: &Path) -> Result<Vec<u64>, SysError> {
        let s = self.state.enter("nested", format!("nested {}", path.display()), path)?;
        s.require(path, "list nested subvolumes (not a btrfs subvolume)")?;
        // Those whose nearest enclosing subvolume is `path`: the fake's ids are inode numbers.
        let mut found = Vec::new();
        let mut pending = vec![path.to_path_buf()];
        while let Some(d) = pending.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                match s.key(&e.path()) {
                    Some((_, ino)) => found.push(ino),
                    None => pending.push(e.path()),
                }
            }
        }
        found.sort_unstable();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_subvolume_lives_from_create_to_delete_and_follows_a_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RecordingSubvolumes::over(dir.path());
        let vol = dir.path().join("vol");
        b.create(&vol).expect("create");
        assert_eq!(b.create(&vol).unwrap_err().errno(), Some(libc::EEXIST));
        assert!(b.is_subvolume(&vol).expect("is"));
        let moved = dir.path().join("moved");
        std::fs::rename(&vol, &moved).expect("rename");
        assert!(b.is_subvolume(&moved).expect("is") && !b.is_subvolume(&vol).expect("is"));
        std::fs::create_dir(&vol).expect("plain dir");
        assert_eq!(
            b.delete(&vol).unwrap_err().errno(),
            Some(libc::EINVAL),
            "a plain directory stays"
        );
        b.delete(&moved).expect("delete");
        b.delete(&moved).expect("nothing there is fine");
        assert_eq!(b.below(dir.path()), vec![]);
    }

    #[test]
    fn a_recorded_snapshot_copies_its_source_and_keeps_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RecordingSubvolumes::over(dir.path());
        let vol = dir.path().join("vol");
        b.create(&vol).expect("create");
        assert_eq!(
            b.set_limit(&vol, 8).unwrap_err().errno(),
            Some(libc::ENOTCONN),
            "no quotas yet"
        );
        b.enable_quota(dir.path()).expect("quota");
        b.set_limit(&vol, 1 << 20).expect("limit");
        std::fs::write(vol.join("f"), b"data").expect("write");
        let snap = dir.path().join("snap");
        b.snapshot(&vol, &snap, true).expect("snapshot");
        assert_eq!(std::fs::read(snap.join("f")).expect("read"), b"data");
        let u = b.usage(&snap).expect("usage");
        assert_eq!((u.referenced, u.max_referenced), (4, Some(1 << 20)));
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).expect("dir");
        assert_eq!(
            b.snapshot(&plain, &dir.path().join("x"), false).unwrap_err().errno(),
            Some(libc::EINVAL)
        );
        assert_eq!(b.set_limit(&plain, 1).unwrap_err().errno(), Some(libc::EINVAL));
        let listed: Vec<bool> = b.below(dir.path()).into_iter().map(|(_, v)| v.read_only).collect();
        assert_eq!(listed, vec![true, false], "snap, vol");
    }

    #[test]
    fn a_recorded_call_fails_once_when_told_and_outside_its_roots_nothing_is_btrfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RecordingSubvolumes::over(&dir.path().join("pool"));
        std::fs::create_dir(dir.path().join("pool")).expect("pool");
        assert!(!b.is_btrfs(dir.path()).expect("is"));
        assert_eq!(
            b.create(&dir.path().join("out")).unwrap_err().errno(),
            Some(libc::EXDEV)
        );
        b.fail_next("create", libc::ENOSPC);
        let vol = dir.path().join("pool/vol");
        assert_eq!(b.create(&vol).unwrap_err().errno(), Some(libc::ENOSPC));
        assert!(!vol.exists());
        b.create(&vol).expect("the retry");
        assert_eq!(b.calls().len(), 4);
    }
}
