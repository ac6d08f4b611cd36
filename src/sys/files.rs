//! Small file operations with the durability and containment rules the storage layer relies on.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tree::Allocated;
use super::{Recorded, Step, SysError};

/// How much a write must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: survives power loss (volume and snapshot records).
    PowerLoss,
    /// rename only: survives a crash of the process but not of the machine. Right for state that a
    /// reboot makes void anyway, such as which mounts exist.
    ProcessCrash,
}

/// A named failure point before each file operation (`file:create`, `file:fsync`, `file:rename`,
/// `file:unlink`, `file:mkdir`, `file:list`, `file:remove`, `file:grow`): with the `crash-points`
/// feature, or armed for one thread in the unit tests, the operation fails with the errno armed for
/// it, so a test can play a full or failing disk at any single file operation. Otherwise nothing.
fn fault(point: &'static str, path: &Path) -> Result<(), SysError> {
    crate::crash::fail(point).step(point, path)
}

/// The suffix of the temporary file `write_atomic` renames into place.
pub const TMP_SUFFIX: &str = ".tmp";

/// Plain file work at the grain of single operations, with the durability and containment rules
/// the storage layer relies on: every record, rename, listing, sized file and lock of the storage
/// and node code goes through it. [`LinuxFiles`] does it (each operation behind its named failure
/// point); [`RecordingFiles`] records every call and can fail the next call of an operation with an
/// errno, for the unit tests of the logic above `sys`.
pub trait Files: Send + Sync {
    /// Removes the temporary files of `write_atomic` in `dir` that a crash left (older than `age`,
    /// so another process's write in progress on a shared directory is left alone).
    fn remove_stale_temps(&self, dir: &Path, age: Duration) -> Result<usize, SysError>;
    /// Replaces `path` with `bytes` atomically: temp file, (fsync), rename, (fsync of the directory).
    fn write_atomic(&self, path: &Path, bytes: &[u8], durability: Durability) -> Result<(), SysError>;
    /// Adds `bytes` at the end of `path` (made, mode 0600, when missing) in one write, unsynced:
    /// survives a crash of the process, not of the machine.
    fn append(&self, path: &Path, bytes: &[u8]) -> Result<(), SysError>;
    /// fsyncs a directory so that entries created, renamed or removed in it are durable.
    fn sync_dir(&self, dir: &Path) -> Result<(), SysError>;
    /// Reads a file whole, `None` when it does not exist; what cellar never writes there (not a
    /// regular file, a symbolic link, past [`READ_LIMIT`]) is an `InvalidData` error
    /// ([`SysError::is_not_ours`]).
    fn read_optional(&self, path: &Path) -> Result<Option<Vec<u8>>, SysError> {
        self.read_optional_upto(path, READ_LIMIT)
    }
    /// [`Files::read_optional`] of a file that may hold up to `limit` bytes.
    fn read_optional_upto(&self, path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SysError>;
    /// Creates `path` holding `bytes` only if nothing is there yet, atomically even on a network
    /// filesystem; `true` when this call created it.
    fn create_exclusive(&self, path: &Path, bytes: &[u8]) -> Result<bool, SysError>;
    /// Renames `from` to `to`; `false` when `from` was already gone.
    fn rename_if_exists(&self, from: &Path, to: &Path) -> Result<bool, SysError>;
    /// Removes a file; a file that is already gone is fine.
    fn remove_file_if_exists(&self, path: &Path) -> Result<(), SysError>;
    /// Creates a directory; one that exists is fine, a symlink or file in its place is an error.
    fn ensure_dir(&self, path: &Path, mode: u32) -> Result<(), SysError>;
    /// Fails unless `path` is a directory itself, not a symlink to one.
    fn require_real_dir(&self, path: &Path) -> Result<(), SysError>;
    /// What is at a path, without following a symlink there.
    fn entry(&self, path: &Path) -> Result<Entry, SysError>;
    /// `path` with the symbolic links of its existing part resolved, and the part that does not
    /// exist yet as given: where a directory made and mounted there would land.
    fn resolve(&self, path: &Path) -> Result<PathBuf, SysError>;
    /// Removes a whole tree without following symlinks; a tree already gone is fine.
    fn remove_tree(&self, path: &Path) -> Result<(), SysError>;
    /// Bytes the files of a tree occupy on disk (allocated blocks, so holes do not count).
    fn allocated_bytes(&self, path: &Path) -> Result<u64, SysError>;
    /// Allocated bytes of the tree at `path`, counted until they reach `stop`; what cannot be read,
    /// or lies deeper than a walk goes, counts nothing (and the answer says a tree went that deep).
    fn allocated_upto(&self, path: &Path, stop: u64) -> Allocated;
    /// Allocated bytes of the file at `path` that no other file shares (a reflinked copy shares
    /// its source's blocks until either writes them): what it holds that a rewrite of its data
    /// would not need anew. What cannot be read counts nothing.
    fn unshared_bytes(&self, path: &Path) -> u64;
    /// Renames `from` to `to` (atomically, on one filesystem).
    fn rename(&self, from: &Path, to: &Path) -> Result<(), SysError>;
    /// Makes a directory and its missing parents.
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError>;
    /// The paths of a directory's entries, in no particular order.
    fn list_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError>;
    /// Sets a path's permission bits.
    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), SysError>;
    /// Sets a path's owner and group (`None` leaves that one as it is).
    fn set_owner(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), SysError>;
    /// A file's length in bytes.
    fn len(&self, path: &Path) -> Result<u64, SysError>;
    /// Creates a new sparse file of `len` bytes; an existing file is an error.
    fn create_sized(&self, path: &Path, len: u64) -> Result<(), SysError>;
    /// Grows a file to `len` bytes durably; a file already that long is left as it is.
    fn grow_to(&self, path: &Path, len: u64) -> Result<(), SysError>;
    /// Removes a file, or a directory only if it is empty; one already gone is fine.
    fn remove_entry(&self, path: &Path) -> Result<(), SysError>;
    /// Removes a directory that must be empty (ENOTEMPTY otherwise); one already gone is fine.
    fn remove_dir(&self, path: &Path) -> Result<(), SysError>;
    /// Removes an empty directory; one that is gone or not empty is left as it is.
    fn remove_dir_if_empty(&self, path: &Path);
    /// Takes an exclusive flock on a lock file that exists only while it is held, without waiting;
    /// `None` when another holds it.
    fn lock_while_held(&self, path: &Path) -> Result<Option<HeldLockFile>, SysError>;
    /// Takes an exclusive flock on `path` without waiting; `create` makes the file when missing.
    fn try_lock(&self, path: &Path, create: bool) -> Result<FileLock, SysError>;
}

/// The real file operations.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxFiles;

impl Files for LinuxFiles {
    fn remove_stale_temps(&self, dir: &Path, age: Duration) -> Result<usize, SysError> {
        remove_stale_temps(dir, age)
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8], durability: Durability) -> Result<(), SysError> {
        write_atomic(path, bytes, durability)
    }
    fn append(&self, path: &Path, bytes: &[u8]) -> Result<(), SysError> {
        append(path, bytes)
    }
    fn sync_dir(&self, dir: &Path) -> Result<(), SysError> {
        sync_dir(dir)
    }
    fn read_optional_upto(&self, path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SysError> {
        read_optional(path, limit)
    }
    fn create_exclusive(&self, path: &Path, bytes: &[u8]) -> Result<bool, SysError> {
        create_exclusive(path, bytes)
    }
    fn rename_if_exists(&self, from: &Path, to: &Path) -> Result<bool, SysError> {
        rename_if_exists(from, to)
    }
    fn remove_file_if_exists(&self, path: &Path) -> Result<(), SysError> {
        remove_file_if_exists(path)
    }
    fn ensure_dir(&self, path: &Path, mode: u32) -> Result<(), SysError> {
        ensure_dir(path, mode)
    }
    fn require_real_dir(&self, path: &Path) -> Result<(), SysError> {
        require_real_dir(path)
    }
    fn entry(&self, path: &Path) -> Result<Entry, SysError> {
        entry(path)
    }
    fn resolve(&self, path: &Path) -> Result<PathBuf, SysError> {
        resolve(path)
    }
    fn remove_tree(&self, path: &Path) -> Result<(), SysError> {
        remove_tree(path)
    }
    fn allocated_bytes(&self, path: &Path) -> Result<u64, SysError> {
        allocated_bytes(path)
    }
    fn allocated_upto(&self, path: &Path, stop: u64) -> Allocated {
        allocated_upto(path, stop)
    }
    fn unshared_bytes(&self, path: &Path) -> u64 {
        unshared_bytes(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<(), SysError> {
        rename(from, to)
    }
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
        mkdir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError> {
        list_dir(dir)
    }
    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), SysError> {
        set_mode(path, mode)
    }
    fn set_owner(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), SysError> {
        set_owner(path, uid, gid)
    }
    fn len(&self, path: &Path) -> Result<u64, SysError> {
        len(path)
    }
    fn create_sized(&self, path: &Path, len: u64) -> Result<(), SysError> {
        create_sized(path, len)
    }
    fn grow_to(&self, path: &Path, len: u64) -> Result<(), SysError> {
        grow_to(path, len)
    }
    fn remove_entry(&self, path: &Path) -> Result<(), SysError> {
        remove_entry(path)
    }
    fn remove_dir(&self, path: &Path) -> Result<(), SysError> {
        remove_dir(path)
    }
    fn remove_dir_if_empty(&self, path: &Path) {
        remove_dir_if_empty(path)
    }
    fn lock_while_held(&self, path: &Path) -> Result<Option<HeldLockFile>, SysError> {
        lock_while_held(path)
    }
    fn try_lock(&self, path: &Path, create: bool) -> Result<FileLock, SysError> {
        try_lock(path, create)
    }
}

/// The operations of [`Files`] that can fail (`allocated_upto` and `remove_dir_if_empty` answer no
/// error): what [`RecordingFiles::fail_next`] takes.
pub const FALLIBLE_OPS: [&str; 25] = [
    "remove_stale_temps",
    "write_atomic",
    "append",
    "sync_dir",
    "read_optional",
    "create_exclusive",
    "rename_if_exists",
    "remove_file_if_exists",
    "ensure_dir",
    "require_real_dir",
    "entry",
    "remove_tree",
    "allocated_bytes",
    "rename",
    "mkdir_all",
    "list_dir",
    "set_mode",
    "set_owner",
    "len",
    "create_sized",
    "grow_to",
    "remove_entry",
    "remove_dir",
    "lock_while_held",
    "try_lock",
];

/// File operations done for real on the paths given (the tests' temporary directories: none of
/// them needs root), each recorded first; the next call of an operation can be made to fail with
/// an errno before it touches anything. For unit tests of the logic above `sys`.
#[derive(Debug, Default)]
pub struct RecordingFiles {
    state: Recorded<()>,
}

impl RecordingFiles {
    /// Every call so far, in order: the operation's name and its path(s).
    pub fn calls(&self) -> Vec<String> {
        self.state.calls()
    }

    /// The next call of `op` (a method name of [`Files`], such as "write_atomic", "rename",
    /// "list_dir") fails with `errno`, doing nothing.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.state.fail_next(op, errno);
    }

    /// The next call of `op` on `path`, and on no other path, fails with `errno`.
    pub fn fail_next_at(&self, op: &'static str, path: &Path, errno: i32) {
        self.state.fail_next_at(op, path, errno);
    }

    /// Forgets every failure armed with `fail_next` and not yet reached. (`write_atomic:after`
    /// armed with [`Self::fail_next_at`] fails a write after it is done.)
    pub fn disarm(&self) {
        self.state.disarm();
    }

    /// The operations called since the `from`th call, each once, in the order of their first
    /// call: what a test fails in turn. Only those that can fail ([`FALLIBLE_OPS`]).
    pub fn ops_since(&self, from: usize) -> Vec<&'static str> {
        let mut seen = Vec::new();
        for c in self.calls().iter().skip(from) {
            let name = c.split(' ').next().unwrap_or_default();
            if let Some(op) = FALLIBLE_OPS.iter().find(|o| **o == name) {
                if !seen.contains(op) {
                    seen.push(*op);
                }
            }
        }
        seen
    }

    /// Records the call and answers an armed failure; the lock is not held while the call runs.
    fn enter(&self, op: &'static str, path: &Path, other: Option<&Path>) -> Result<(), SysError> {
        let call = match other {
            Some(o) => format!("{op} {} {}", path.display(), o.display()),
            None => format!("{op} {}", path.display()),
        };
        self.state.enter(op, call, path).map(drop)
    }
}

impl Files for RecordingFiles {
    fn remove_stale_temps(&self, dir: &Path, age: Duration) -> Result<usize, SysError> {
        self.enter("remove_stale_temps", dir, None)?;
        remove_stale_temps(dir, age)
    }
    fn write_atomic(&self, path: &Path, bytes: &[u8], durability: Durability) -> Result<(), SysError> {
        self.enter("write_atomic", path, None)?;
        write_atomic(path, bytes, durability)?;
        // Armed as "write_atomic:after": the file is in place, yet the call fails (its
        // directory's fsync failed, or a share's answer to the rename was lost).
        self.state.armed("write_atomic:after", path)
    }
    fn append(&self, path: &Path, bytes: &[u8]) -> Result<(), SysError> {
        self.enter("append", path, None)?;
        append(path, bytes)
    }
    fn sync_dir(&self, dir: &Path) -> Result<(), SysError> {
        self.enter("sync_dir", dir, None)?;
        sync_dir(dir)
    }
    fn read_optional_upto(&self, path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SysError> {
        self.enter("read_optional", path, None)?;
        read_optional(path, limit)
    }
    fn create_exclusive(&self, path: &Path, bytes: &[u8]) -> Result<bool, SysError> {
        self.enter("create_exclusive", path, None)?;
        create_exclusive(path, bytes)
    }
    fn rename_if_exists(&self, from: &Path, to: &Path) -> Result<bool, SysError> {
        self.enter("rename_if_exists", from, Some(to))?;
        rename_if_exists(from, to)
    }
    fn remove_file_if_exists(&self, path: &Path) -> Result<(), SysError> {
        self.enter("remove_file_if_exists", path, None)?;
        remove_file_if_exists(path)
    }
    fn ensure_dir(&self, path: &Path, mode: u32) -> Result<(), SysError> {
        self.enter("ensure_dir", path, None)?;
        ensure_dir(path, mode)
    }
    fn require_real_dir(&self, path: &Path) -> Result<(), SysError> {
        self.enter("require_real_dir", path, None)?;
        require_real_dir(path)
    }
    fn entry(&self, path: &Path) -> Result<Entry, SysError> {
        self.enter("entry", path, None)?;
        entry(path)
    }
    fn resolve(&self, path: &Path) -> Result<PathBuf, SysError> {
        self.enter("resolve", path, None)?;
        resolve(path)
    }
    fn remove_tree(&self, path: &Path) -> Result<(), SysError> {
        self.enter("remove_tree", path, None)?;
        remove_tree(path)
    }
    fn allocated_bytes(&self, path: &Path) -> Result<u64, SysError> {
        self.enter("allocated_bytes", path, None)?;
        allocated_bytes(path)
    }
    fn allocated_upto(&self, path: &Path, stop: u64) -> Allocated {
        // Infallible by contract: an armed failure reads as nothing counted.
        match self.enter("allocated_upto", path, None) {
            Ok(()) => allocated_upto(path, stop),
            Err(_) => Allocated::default(),
        }
    }
    fn unshared_bytes(&self, path: &Path) -> u64 {
        match self.enter("unshared_bytes", path, None) {
            Ok(()) => unshared_bytes(path),
            Err(_) => 0,
        }
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<(), SysError> {
        self.enter("rename", from, Some(to))?;
        rename(from, to)
    }
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
        self.enter("mkdir_all", path, None)?;
        mkdir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, SysError> {
        self.enter("list_dir", dir, None)?;
        list_dir(dir)
    }
    fn set_mode(&self, path: &Path, mode: u32) -> Result<(), SysError> {
        self.enter("set_mode", path, None)?;
        set_mode(path, mode)
    }
    fn set_owner(&self, path: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), SysError> {
        self.enter("set_owner", path, None)?;
        set_owner(path, uid, gid)
    }
    fn len(&self, path: &Path) -> Result<u64, SysError> {
        self.enter("len", path, None)?;
        len(path)
    }
    fn create_sized(&self, path: &Path, len: u64) -> Result<(), SysError> {
        self.enter("create_sized", path, None)?;
        create_sized(path, len)
    }
    fn grow_to(&self, path: &Path, len: u64) -> Result<(), SysError> {
        self.enter("grow_to", path, None)?;
        grow_to(path, len)
    }
    fn remove_entry(&self, path: &Path) -> Result<(), SysError> {
        self.enter("remove_entry", path, None)?;
        remove_entry(path)
    }
    fn remove_dir(&self, path: &Path) -> Result<(), SysError> {
        self.enter("remove_dir", path, None)?;
        remove_dir(path)
    }
    fn remove_dir_if_empty(&self, path: &Path) {
        if self.enter("remove_dir_if_empty", path, None).is_ok() {
            remove_dir_if_empty(path)
        }
    }
    fn lock_while_held(&self, path: &Path) -> Result<Option<HeldLockFile>, SysError> {
        self.enter("lock_while_held", path, None)?;
        lock_while_held(path)
    }
    fn try_lock(&self, path: &Path, create: bool) -> Result<FileLock, SysError> {
        self.enter("try_lock", path, None)?;
        try_lock(path, create)
    }
}

/// Removes the temporary files of `write_atomic` in `dir` that a crash left (older than `age`, so
/// another process's write in progress on a shared directory is left alone).
fn remove_stale_temps(dir: &Path, age: Duration) -> Result<usize, SysError> {
    let mut removed = 0;
    for e in fs::read_dir(dir).step("read directory", dir)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(TMP_SUFFIX)) {
            continue;
        }
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a >= age);
        if old && e.file_type().is_ok_and(|t| t.is_file()) {
            remove_file_if_exists(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Replaces `path` with `bytes` atomically: temp file, (fsync), rename, (fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), SysError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}{TMP_SUFFIX}"));
    let written = (|| {
        fault("file:create", &tmp)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .step("create", &tmp)?;
        crate::crash::fail("record:write").step("write", &tmp)?;
        f.write_all(bytes).step("write", &tmp)?;
        if durability == Durability::PowerLoss {
            fault("file:fsync", &tmp)?;
            f.sync_all().step("fsync", &tmp)?;
        }
        fault("file:rename", path)?;
        fs::rename(&tmp, path).step("rename", path)
    })();
    if written.is_err() {
        // A write that failed (ENOSPC, EIO) leaves no half-written temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if durability == Durability::PowerLoss {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Adds `bytes` at the end of a file in one `write` (O_APPEND: concurrent appends do not mix).
fn append(path: &Path, bytes: &[u8]) -> Result<(), SysError> {
    fault("file:append", path)?;
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .step("open", path)?;
    f.write_all(bytes).step("write", path)
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), SysError> {
    fault("file:fsync", dir)?;
    File::open(dir).and_then(|d| d.sync_all()).step("fsync", dir)
}

/// Reads a file, `None` when it does not exist.
/// The most a file read whole ([`Files::read_optional`]: records, marks, leases, notes, node
/// state) may hold: each is a few KiB at most, and a file past this was not written by cellar
/// (the rosters, larger, are read up to [`ROSTER_LIMIT`]). Bounded so that a file another node
/// puts on a share cannot fill the reader's memory.
pub const READ_LIMIT: u64 = 16 << 20;

/// The most a roster may hold when it is read (a root-only file of the node's own): a node at its
/// listing bound (150,000 volumes and as many snapshots, about 1 KiB a line with long names) has
/// one of about 300 MiB, twice that just before it is written whole again.
pub const ROSTER_LIMIT: u64 = 4 << 30;

/// A file read whole that is not one cellar writes there: not a regular file (a FIFO, a device,
/// a directory, a symbolic link), or larger than [`READ_LIMIT`]. `InvalidData`, which a record's reader takes as
/// a record that does not parse.
fn not_ours(what: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, what)
}

fn read_optional(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SysError> {
    use std::io::Read;
    // Where a test holds a read, as a share whose server is gone holds it in the kernel.
    crate::crash::reading(path);
    // O_NONBLOCK: the open of a FIFO put in the file's place (on a share, by another node) does
    // not wait for a writer for ever; no effect on a regular file. O_NOFOLLOW: cellar writes
    // these files itself, never as symbolic links; one there (planted on a share) could name any
    // file the process can read (a share's listing skips them too).
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SysError::io("read", path, not_ours("a symbolic link".into())))
        }
        Err(e) => return Err(SysError::io("read", path, e)),
    };
    let meta = f.metadata().map_err(|e| SysError::io("read", path, e))?;
    if !meta.file_type().is_file() {
        return Err(SysError::io("read", path, not_ours("not a regular file".into())));
    }
    let too_large = || {
        SysError::io(
            "read",
            path,
            not_ours(format!("larger than the {limit} bytes such a file may hold")),
        )
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded too while it is read (it may grow meanwhile).
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| SysError::io("read", path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

/// Creates `path` holding `bytes` only if nothing is there yet, atomically even on a network
/// filesystem: the bytes go to a private temp file (fsynced), which is then hard-linked to `path`
/// (link(2) fails with EEXIST rather than replace). `true` when we created it.
fn create_exclusive(path: &Path, bytes: &[u8]) -> Result<bool, SysError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        fault("file:create", &tmp)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .step("create", &tmp)?;
        f.write_all(bytes).step("write", &tmp)?;
        f.sync_all().step("fsync", &tmp)
    })();
    let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(SysError::io("link", path, e)),
    });
    let removed = remove_file_if_exists(&tmp);
    let created = linked?;
    removed?;
    if created {
        sync_dir(dir)?;
    }
    Ok(created)
}

/// Renames `from` to `to`; `false` when `from` was already gone (someone else moved it first).
fn rename_if_exists(from: &Path, to: &Path) -> Result<bool, SysError> {
    fault("file:rename", from)?;
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SysError::io("rename", from, e)),
    }
}

/// Removes a file; a file that is already gone is fine.
fn remove_file_if_exists(path: &Path) -> Result<(), SysError> {
    fault("file:unlink", path)?;
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::io("unlink", path, e)),
    }
}

/// Creates a directory; one that already exists is fine, but a symlink or a file in its place is
/// an error, so nothing is ever created through a planted link.
fn ensure_dir(path: &Path, mode: u32) -> Result<(), SysError> {
    use std::os::unix::fs::DirBuilderExt;
    // On a shared filesystem another node may be making this very directory at the same moment
    // (nodes opening one shared pool together): until its mkdir has completed, ours can answer
    // EEXIST while a lookup still answers ENOENT (seen on GlusterFS). Wait that out, bounded.
    fault("file:mkdir", path)?;
    let mut tries = 0;
    loop {
        let found = match fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => require_real_dir(path),
            Err(e) => return Err(SysError::io("mkdir", path, e)),
        };
        match found {
            Err(e) if e.errno() == Some(libc::ENOENT) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Fails unless `path` is a directory itself, not a symlink to one.
fn require_real_dir(path: &Path) -> Result<(), SysError> {
    let md = fs::symlink_metadata(path).step("lstat", path)?;
    if md.file_type().is_dir() {
        Ok(())
    } else {
        Err(SysError::io(
            "expect a directory (not a symlink or file) at",
            path,
            std::io::Error::from_raw_os_error(libc::ENOTDIR),
        ))
    }
}

/// What is at a path, without following a symlink there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Missing,
    Dir,
    File,
    Symlink,
    Other,
}

fn resolve(path: &Path) -> Result<PathBuf, SysError> {
    let (mut existing, mut rest) = (path.to_path_buf(), Vec::new());
    loop {
        match fs::canonicalize(&existing) {
            Ok(mut real) => {
                real.extend(rest.iter().rev());
                return Ok(real);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => return Ok(path.to_path_buf()),
            },
            Err(e) => return Err(SysError::io("resolve", path, e)),
        }
    }
}

fn entry(path: &Path) -> Result<Entry, SysError> {
    match fs::symlink_metadata(path) {
        Ok(md) => {
            let ft = md.file_type();
            Ok(if ft.is_dir() {
                Entry::Dir
            } else if ft.is_file() {
                Entry::File
            } else if ft.is_symlink() {
                Entry::Symlink
            } else {
                Entry::Other
            })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Entry::Missing),
        Err(e) => Err(SysError::io("lstat", path, e)),
    }
}

/// Removes a whole tree without following symlinks, at any depth, clearing the immutable and
/// append-only flags its workload may have set (`tree::remove_tree`). A tree that is already gone
/// is fine.
fn remove_tree(path: &Path) -> Result<(), SysError> {
    fault("file:remove", path)?;
    let remove = |path: &Path| match super::tree::remove_tree(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    };
    match entry(path)? {
        Entry::Missing => Ok(()),
        Entry::Dir => match remove(path) {
            Ok(()) => Ok(()),
            // On btrfs a tenant may make subvolumes inside a `dir` volume, read-only snapshots
            // among them, whose files no unlink removes (EROFS): the delete failed on every retry
            // and the data stayed in the trash for good. They go as subvolumes, then the rest.
            Err(_) if remove_nested_subvolumes(path)? => {
                remove(path).map_err(|e| SysError::io("remove tree (after its nested subvolumes)", path, e))
            }
            Err(e) => Err(SysError::io("remove tree", path, e)),
        },
        _ => remove_file_if_exists(path),
    }
}

/// Deletes every btrfs subvolume below `path` (each with what it nests); whether there was any.
/// Each directory is reached from `path` one component at a time without following a symlink
/// (`PinnedDir::open_beneath`), and a subvolume is checked and deleted by its name in that pinned
/// directory: a directory swapped for a symlink meanwhile leads nowhere else. A tree on another
/// filesystem has none.
fn remove_nested_subvolumes(path: &Path) -> Result<bool, SysError> {
    if !super::btrfs::is_btrfs(path)? {
        return Ok(false);
    }
    let mut found = false;
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let pinned = match PinnedDir::open_beneath(path, &rel) {
            Ok(p) => p,
            Err(e) if e.errno() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let entries = fs::read_dir(pinned.proc_path()).step("list", &path.join(&rel))?;
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let here = pinned.proc_path().join(e.file_name());
            if super::btrfs::is_subvolume(&here)? {
                super::btrfs::delete_subvolume(&here)?;
                found = true;
            } else {
                dirs.push(rel.join(e.file_name()));
            }
        }
    }
    Ok(found)
}

/// Bytes the files of a tree occupy on disk (allocated blocks, so holes do not count).
fn allocated_bytes(path: &Path) -> Result<u64, SysError> {
    let md = fs::symlink_metadata(path).step("lstat", path)?;
    if md.is_dir() {
        return Ok(super::tree::allocated_bytes(path, u64::MAX, false)?.bytes);
    }
    Ok(md.blocks() * 512)
}

/// Allocated bytes of the tree at `path` (a file, or a directory and all below it), counted until
/// they reach `stop`: a walk can be long and a caller may only need to know whether a bound is
/// passed. Walked by descriptors (`tree::allocated_bytes`): symlinks are not followed, even one a
/// workload swaps in mid-walk; what cannot be read counts nothing.
fn allocated_upto(path: &Path, stop: u64) -> Allocated {
    let bytes = match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => return super::tree::allocated_bytes(path, stop, true).unwrap_or_default(),
        Ok(md) => md.blocks() * 512,
        Err(_) => 0,
    };
    Allocated { bytes, too_deep: false }
}

/// Allocated bytes of the regular file at `path` (not followed if a symlink, never waited on if a
/// FIFO) less those its extents share with other files (FIEMAP's shared flag); nothing when it
/// cannot be read or its filesystem cannot say which blocks are shared.
fn unshared_bytes(path: &Path) -> u64 {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path);
    let Ok(file) = opened else { return 0 };
    let Ok(md) = file.metadata() else { return 0 };
    if !md.is_file() {
        return 0;
    }
    let allocated = md.blocks() * 512;
    match super::extents::shared_bytes(&file.into(), md.len()) {
        Ok(shared) => allocated.saturating_sub(shared),
        Err(_) => 0,
    }
}

/// Renames `from` to `to` (atomically, on one filesystem).
/// A directory or file its workload made immutable or append-only (`chattr +i`, `+a`) cannot be
/// renamed, even by root: its flags are cleared and the rename tried once more, so that a volume
/// can always be moved out of its place (into the trash, or kept) by the driver that owns it.
fn rename(from: &Path, to: &Path) -> Result<(), SysError> {
    fault("file:rename", to)?;
    match fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && unprotect_one(from) => fs::rename(from, to),
        other => other,
    }
    .map_err(|e| SysError::io("rename", to, e))
}

/// Clears the immutable and append-only flags of `path` alone; whether it had any.
fn unprotect_one(path: &Path) -> bool {
    super::tree::cstr(path.as_os_str())
        .is_ok_and(|c| super::tree::unprotect_at(nix::fcntl::AT_FDCWD, &c).unwrap_or(false))
}

/// Makes a directory and its missing parents.
fn mkdir_all(path: &Path) -> Result<(), SysError> {
    fault("file:mkdir", path)?;
    fs::create_dir_all(path).step("mkdir", path)
}

/// The paths of a directory's entries, in no particular order.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, SysError> {
    fault("file:list", dir)?;
    let mut out = Vec::new();
    for e in fs::read_dir(dir).step("read directory", dir)? {
        out.push(e.step("read directory", dir)?.path());
    }
    Ok(out)
}

/// Sets a path's permission bits.
fn set_mode(path: &Path, mode: u32) -> Result<(), SysError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).step("chmod", path)
}

/// Sets a path's owner and group (`None` leaves that one as it is).
fn set_owner(path: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), SysError> {
    std::os::unix::fs::chown(path, uid, gid).step("chown", path)
}

/// A file's length in bytes.
fn len(path: &Path) -> Result<u64, SysError> {
    fs::metadata(path).map(|m| m.len()).step("stat", path)
}

/// Creates a new file of `len` bytes (a sparse one: a hole until written); an existing file is an error.
fn create_sized(path: &Path, len: u64) -> Result<(), SysError> {
    fault("file:create", path)?;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .step("create", path)?;
    f.set_len(len).step("set the size of", path)
}

/// Grows a file to `len` bytes (the new part a hole) and makes that durable; a file already at least
/// that long is left as it is.
fn grow_to(path: &Path, len: u64) -> Result<(), SysError> {
    fault("file:grow", path)?;
    let f = fs::OpenOptions::new().write(true).open(path).step("open", path)?;
    let now = f.metadata().step("stat", path)?.len();
    if len > now {
        f.set_len(len).step("grow", path)?;
        f.sync_all().step("fsync", path)?;
    }
    Ok(())
}

/// Removes a file, or a directory only if it is empty (a directory with anything in it is an error,
/// never emptied); one that is already gone is fine.
fn remove_entry(path: &Path) -> Result<(), SysError> {
    fault("file:unlink", path)?;
    let res = match entry(path)? {
        Entry::Missing => return Ok(()),
        Entry::Dir => fs::remove_dir(path),
        _ => fs::remove_file(path),
    };
    match res {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(SysError::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Removes a directory that must be empty (ENOTEMPTY otherwise); one already gone is fine.
fn remove_dir(path: &Path) -> Result<(), SysError> {
    fault("file:unlink", path)?;
    match fs::remove_dir(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(SysError::io("remove directory", path, e)),
        _ => Ok(()),
    }
}

/// Removes an empty directory; a directory that is gone or not empty is left as it is.
fn remove_dir_if_empty(path: &Path) {
    let _ = fs::remove_dir(path);
}

/// A directory pinned by an `O_PATH` descriptor opened without following a symlink at `path`.
/// `proc_path()` names exactly that directory for calls that take a path (mount(2)).
#[derive(Debug)]
pub struct PinnedDir {
    fd: std::os::fd::OwnedFd,
}

impl PinnedDir {
    pub fn open(path: &Path) -> Result<PinnedDir, SysError> {
        let fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(path)
            .step("open directory (not following symlinks)", path)?;
        Ok(PinnedDir { fd: fd.into() })
    }

    /// Opens `rel` below `root` one component at a time, never following a symlink and never
    /// leaving `root` (no `..`, no absolute part): the way to reach a directory a user named.
    pub fn open_beneath(root: &Path, rel: &Path) -> Result<PinnedDir, SysError> {
        use nix::fcntl::{openat, OFlag};
        use std::path::Component;
        let mut dir = PinnedDir::open(root)?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(SysError::io(
                    "open (only plain names below the pool)",
                    root.join(rel),
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            };
            let fd = openat(
                &dir.fd,
                name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| SysError::io("open directory (not following symlinks)", root.join(rel), e.into()))?;
            dir = PinnedDir { fd };
        }
        Ok(dir)
    }

    /// Whether `path` still names this very directory (not moved away, not replaced).
    pub fn is_at(&self, path: &Path) -> Result<bool, SysError> {
        let mine = nix::sys::stat::fstat(&self.fd).step("stat pinned directory", path)?;
        match fs::symlink_metadata(path) {
            Ok(now) => Ok(now.dev() == mine.st_dev && now.ino() == mine.st_ino),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SysError::io("lstat", path, e)),
        }
    }

    pub fn proc_path(&self) -> std::path::PathBuf {
        reopen_path(&self.fd)
    }
}

/// A path that opens again exactly the file an `O_PATH` descriptor holds (its `/proc/self/fd`
/// entry), for the read or write that `O_PATH` does not allow.
pub fn reopen_path(pinned: &impl std::os::fd::AsRawFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", pinned.as_raw_fd()))
}

/// Whether an exclusive advisory lock (flock) on a file could be taken.
#[derive(Debug)]
pub enum FileLock {
    /// Taken: held until dropped (the kernel also releases it when the process dies).
    Held(nix::fcntl::Flock<File>),
    /// Another process holds it.
    InUse,
    /// There is no such file (and it was not to be created).
    NoLockFile,
}

/// An exclusive flock on a lock file that exists only while it is held: released by unlinking the
/// file, then unlocking it. See [`lock_while_held`].
#[derive(Debug)]
pub struct HeldLockFile {
    path: std::path::PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Drop for HeldLockFile {
    fn drop(&mut self) {
        // Unlinked while still locked: whoever opens the path next makes a new file, and whoever
        // opened the old one finds, once it has the lock, that the path no longer names it.
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes an exclusive flock on `path` (made if missing) without waiting, for as long as the answer
/// lives; `None` when another process (or another open of this one) holds it. The file is removed
/// when the lock is released, so lock files never pile up; a taker that locked a file just removed
/// by its holder sees that the path names another file (or none) and tries again.
fn lock_while_held(path: &Path) -> Result<Option<HeldLockFile>, SysError> {
    use nix::fcntl::{Flock, FlockArg};
    fault("file:create", path)?;
    for _ in 0..8 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .step("open lock file", path)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(SysError::io("flock", path, errno.into())),
        };
        let mine = lock.metadata().step("stat lock file", path)?;
        match fs::symlink_metadata(path) {
            Ok(now) if now.dev() == mine.dev() && now.ino() == mine.ino() => {
                return Ok(Some(HeldLockFile {
                    path: path.to_path_buf(),
                    _lock: lock,
                }))
            }
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(SysError::io("stat lock file", path, e)),
        }
    }
    Ok(None)
}

/// Takes an exclusive flock on `path` without waiting; `create` makes the file when missing.
fn try_lock(path: &Path, create: bool) -> Result<FileLock, SysError> {
    use nix::fcntl::{Flock, FlockArg};
    let file = match OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if !create && e.kind() == ErrorKind::NotFound => return Ok(FileLock::NoLockFile),
        Err(e) => return Err(SysError::io("open lock file", path, e)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(FileLock::Held(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(FileLock::InUse),
        Err((_, errno)) => Err(SysError::io("flock", path, errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file read whole that cellar did not write there is refused at once, as data that is not
    /// its own (`InvalidData`): a FIFO (its open used to wait for a writer for ever), a device, a
    /// directory, a symbolic link (it named any file the process can read), and a file past the
    /// bound (it used to be read whole into memory, however large).
    #[test]
    fn a_file_read_whole_refuses_fifos_devices_and_files_past_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let invalid = |path: &Path| match read_optional(path, READ_LIMIT) {
            Err(SysError::Io { source, .. }) => {
                assert_eq!(source.kind(), ErrorKind::InvalidData, "{}: {source}", path.display())
            }
            other => panic!("{}: {other:?}", path.display()),
        };
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        invalid(&fifo);
        invalid(Path::new("/dev/zero"));
        invalid(dir.path());
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("/etc/hostname", &link).expect("symlink");
        invalid(&link);
        let huge = dir.path().join("huge.json");
        File::create(&huge)
            .expect("create")
            .set_len(READ_LIMIT + 1)
            .expect("sparse");
        invalid(&huge);
        // What cellar writes reads as before.
        let record = dir.path().join("record.json");
        fs::write(&record, b"{}").expect("write");
        assert_eq!(read_optional(&record, READ_LIMIT).expect("read"), Some(b"{}".to_vec()));
        assert_eq!(read_optional(&dir.path().join("none"), READ_LIMIT).expect("read"), None);
    }

    /// What a dir volume holds is counted by descriptors: data a workload puts deeper than
    /// PATH_MAX counts (the path walk skipped it, so an over-full volume read as within its size),
    /// a symlink to a large tree outside counts as the link only, and the count stops at its bound.
    #[test]
    fn allocated_bytes_count_deep_data_and_never_what_a_symlink_names() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("big"), vec![1u8; 8 << 20]).expect("write");
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).expect("symlink");
        let deepest = super::super::tree::testing::deep_dirs(root.path(), 20);
        super::super::tree::testing::file_at(&deepest, "deep", &vec![2u8; 2 << 20]);
        let held = allocated_bytes(root.path()).expect("count");
        assert!(held >= 2 << 20, "the deep file counts: {held}");
        assert!(held < 8 << 20, "what the symlink names does not: {held}");
        assert_eq!(allocated_upto(root.path(), u64::MAX).bytes, held);
        assert!(
            allocated_upto(root.path(), 4096).bytes < 2 << 20,
            "the count stops at its bound"
        );
        assert_eq!(
            allocated_upto(&outside.path().join("big"), u64::MAX).bytes,
            8 << 20,
            "a file is its own blocks"
        );
        assert_eq!(allocated_upto(&root.path().join("nothing"), u64::MAX).bytes, 0);
    }

    /// A directory named below a root is reached one plain component at a time: never through a
    /// symlink (even one pointing inside the root), never by `..` or an absolute part.
    #[test]
    fn open_beneath_reaches_only_real_directories_below_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("a/out")).expect("symlink");
        std::os::unix::fs::symlink("b", root.path().join("a/inside")).expect("symlink");

        let dir = PinnedDir::open_beneath(root.path(), Path::new("a/b")).expect("a/b opens");
        let target = std::fs::read_link(dir.proc_path()).expect("readlink of the pinned descriptor");
        assert_eq!(target, root.path().join("a/b"));

        // O_NOFOLLOW with O_DIRECTORY: the kernel answers a symlink with ENOTDIR.
        for (rel, errno) in [
            ("a/out", libc::ENOTDIR),
            ("a/inside", libc::ENOTDIR),
            ("a/../a", libc::EINVAL),
            ("/a", libc::EINVAL),
            ("a/missing", libc::ENOENT),
        ] {
            let err = PinnedDir::open_beneath(root.path(), Path::new(rel)).expect_err(rel);
            assert_eq!(err.errno(), Some(errno), "{rel}: {err}");
            assert!(
                err.to_string().contains(&*root.path().join(rel).to_string_lossy()),
                "{rel}: {err}"
            );
        }
    }
}

#[cfg(test)]
mod fifo_tests {
    use super::*;

    /// A FIFO left where an image's data should be (a shared pool's files are written by others)
    /// must not block the room count for good: `unshared_bytes` never waits on it.
    #[test]
    fn unshared_bytes_of_a_fifo_answers_without_waiting_on_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("image");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let at = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(LinuxFiles.unshared_bytes(&at));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(3));
        // Unblock the thread's open before failing.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        assert!(got.is_ok(), "unshared_bytes blocked on a FIFO for 3 s");
    }
}
