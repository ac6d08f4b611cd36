//! Bounds on what a repository's storage can make cellar do before the key has checked anything.
//!
//! Whoever can write the storage can add files to it without knowing the key: another cluster
//! sharing the bucket, a stolen bucket credential, anyone who can write the share. Encryption and
//! MACs keep such files from being taken as data, but two kinds of file are used before any MAC
//! is checked:
//!
//! - **key files**: opening with the password tries every key file in turn, deriving a key with
//!   the scrypt parameters the file itself names. One file asking for N = 2^30 made the process
//!   allocate terabytes (it aborts); one asking for p = 2^26 kept a CPU busy for days; one that
//!   does not parse failed the open for everyone when rustic came to it before the real key.
//! - **config, snapshot and index files**: rustic reads each one whole into memory and only then
//!   checks its MAC. A sparse file of many GiB on a shared directory costs its writer nothing and
//!   costs the reader that much memory.
//!
//! So every listing cellar's repositories answer passes through [`Guarded`]: a key file is offered
//! to rustic only when it is small and its scrypt parameters stay within what restic and rustic
//! make (memory and work bounded per file, and in all), cheapest first, and exactly the bytes that
//! were checked are what rustic then reads; config, snapshot and index files larger than any
//! restic or rustic writes are left out of listings (a config file that is, is FAILED_PRECONDITION).
//! Once the key is known, a snapshot or index file, and a tree blob rustic reads from its pack, is
//! refused if it decompresses past its bound (counted before rustic decompresses it whole).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustic_core::repofile::{KeyFile, MasterKey};
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, ReadBackend, RepositoryBackends, RusticError, RusticResult, WriteBackend,
};

/// A key file is a few hundred bytes of JSON.
pub const MAX_KEY_FILE_BYTES: u32 = 64 << 10;
/// scrypt takes 128·N·r bytes of memory: rustic makes keys with 128 MiB, restic with at most 60.
pub const MAX_KDF_MEMORY: u64 = 256 << 20;
/// scrypt's work grows with N·r·p: rustic's keys take 2^20 (a third of a CPU-second), restic's
/// at most about that.
pub const MAX_KDF_WORK: u64 = 1 << 23;
/// The work of all key files tried at one open: 64 of rustic's, about 20 CPU-seconds.
pub const MAX_KDF_WORK_TOTAL: u64 = 1 << 26;

/// The largest file of each kind that is read whole; `None` for packs (read in pieces the
/// authenticated index names).
fn max_bytes(tpe: FileType) -> Option<u32> {
    match tpe {
        FileType::Config => Some(1 << 20),
        FileType::Key => Some(MAX_KEY_FILE_BYTES),
        // restic and rustic write snapshots of a few KiB and index files of at most 50,000 blobs
        // (a few MiB); these bounds are far above either.
        FileType::Snapshot => Some(64 << 20),
        FileType::Index => Some(256 << 20),
        FileType::Pack => None,
    }
}

/// The repository's master key once an open has found it: snapshot and index files are then
/// checked for what they expand to before rustic reads them.
pub type KeySlot = Arc<std::sync::OnceLock<MasterKey>>;

/// The repository's backends, with listings and key files bounded as above.
pub fn wrap(be: RepositoryBackends, repository: &str, key: &KeySlot) -> RepositoryBackends {
    let guarded = |inner: Arc<dyn WriteBackend>| -> Arc<dyn WriteBackend> {
        Arc::new(Guarded {
            inner,
            key: key.clone(),
            repository: repository.to_string(),
            keys: Mutex::new(HashMap::new()),
            listed: Mutex::new(HashMap::new()),
        })
    };
    RepositoryBackends::new(guarded(be.repository()), be.repo_hot().map(guarded))
}

struct Guarded {
    inner: Arc<dyn WriteBackend>,
    key: KeySlot,
    repository: String,
    /// Key files as they were when checked: rustic reads these bytes, not the file again (which
    /// its writer may have changed since).
    keys: Mutex<HashMap<Id, Bytes>>,
    /// The length each file read whole had when a listing let it through (by kind): it is read
    /// up to that length and no further, however large it has grown since.
    listed: Mutex<HashMap<(u8, Id), u32>>,
}

/// How many times its stored size a snapshot or index file may expand to, past its kind's bound.
pub const EXPANSION_RATIO: u64 = 8;

/// How far a sealed snapshot or index file decompresses, if past `limit` (counted, never held).
/// rustic decompresses the whole file into memory after its MAC checks, so a file the key sealed
/// (any node holds the key) of a few KiB could expand to gigabytes there. A file whose MAC does
/// not check under `key`, or that is not compressed, is left to rustic, which refuses or reads it
/// as it always did.
pub fn expands_past(key: &MasterKey, sealed: &[u8], limit: u64) -> Option<u64> {
    let plain = super::image::Sealer::new(key).ok()?.open(sealed)?;
    // restic's format: 2 then zstd for a compressed file; `{` or `[` for plain JSON.
    zstd_past(plain.strip_prefix(&[2u8])?, limit)
}

/// How far a sealed tree blob, read from its pack, decompresses, if past `limit` (counted, never
/// held). rustic's `get_tree` (the parent backup's trees an upload reads, and cellar's check of
/// them) decompresses a blob whole into memory before it compares the length with its index
/// entry's. A compressed blob is a bare zstd stream (its index entry says so, not a prefix).
pub fn blob_expands_past(key: &MasterKey, sealed: &[u8], limit: u64) -> Option<u64> {
    let plain = super::image::Sealer::new(key).ok()?.open(sealed)?;
    zstd_past(&plain, limit)
}

/// How many bytes the zstd stream `compressed` holds, if more than `limit` (counted up to one
/// past it). Not zstd, or broken: None (the reader refuses it as it would have).
fn zstd_past(compressed: &[u8], limit: u64) -> Option<u64> {
    use std::io::Read;
    if !compressed.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return None;
    }
    let decoder = zstd::stream::read::Decoder::new(compressed).ok()?;
    let n = std::io::copy(&mut decoder.take(limit + 1), &mut std::io::sink()).unwrap_or(0);
    (n > limit).then_some(n)
}

/// Why a key file is not tried, or the work deriving its key takes.
pub fn kdf_work(data: &[u8]) -> Result<u64, String> {
    if data.len() > MAX_KEY_FILE_BYTES as usize {
        return Err(format!("it is {} bytes long", data.len()));
    }
    let k: KeyFile = serde_json::from_slice(data).map_err(|e| format!("it is not a key file ({e})"))?;
    if k.kdf != "scrypt" {
        return Err(format!("its key derivation is '{}', not scrypt", k.kdf));
    }
    if k.n < 2 || !k.n.is_power_of_two() || k.r == 0 || k.p == 0 {
        return Err(format!(
            "its scrypt parameters N={} r={} p={} are invalid",
            k.n, k.r, k.p
        ));
    }
    let (n, r, p) = (u64::from(k.n), u64::from(k.r), u64::from(k.p));
    let memory = 128 * n * r;
    let work = n * r * p;
    if memory > MAX_KDF_MEMORY || work > MAX_KDF_WORK {
        return Err(format!(
            "its scrypt parameters N={n} r={r} p={p} would take {} MiB and {work} units of work \
             (at most {} MiB and {MAX_KDF_WORK})",
            memory >> 20,
            MAX_KDF_MEMORY >> 20
        ));
    }
    // An IV and a MAC at least: anything shorter fails rustic's decryption in a way that ends the
    // search for the key instead of going on to the next file.
    if k.data.len() < 32 {
        return Err("its key data is too short".into());
    }
    Ok(work)
}

impl Guarded {
    /// The key files worth trying, cheapest first, within the total work.
    fn keys(&self) -> RusticResult<Vec<(Id, u32)>> {
        let mut usable = Vec::new();
        let mut checked = HashMap::new();
        for (id, size) in self.inner.list_with_size(FileType::Key)? {
            if size == 0 || size > MAX_KEY_FILE_BYTES {
                self.skip_key(&id, &format!("it is {size} bytes long"));
                continue;
            }
            // Up to its listed length: an object grown since is not read whole.
            let data = self.inner.read_partial(FileType::Key, &id, false, 0, size)?;
            match kdf_work(&data) {
                Ok(work) => {
                    usable.push((work, id, size));
                    checked.insert(id, data);
                }
                Err(why) => self.skip_key(&id, &why),
            }
        }
        usable.sort();
        let mut total = 0u64;
        let mut out = Vec::new();
        for (work, id, size) in usable {
            total += work;
            if total > MAX_KDF_WORK_TOTAL {
                self.skip_key(&id, "the key files before it took all the work one open may take");
                continue;
            }
            out.push((id, size));
        }
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.clear();
        keys.extend(checked.into_iter().filter(|(id, _)| out.iter().any(|(o, _)| o == id)));
        Ok(out)
    }

    fn skip_key(&self, id: &Id, why: &str) {
        tracing::warn!(
            repository = self.repository.as_str(),
            key_file = %id,
            "a key file of the backup repository is not tried: {why} (restic and rustic never make such a file; \
             whoever can write the repository's storage can)"
        );
    }

    /// Files of a kind read whole, without those too large to be read.
    fn bounded(&self, tpe: FileType, max: u32) -> RusticResult<Vec<(Id, u32)>> {
        let all = self.inner.list_with_size(tpe)?;
        if tpe == FileType::Config {
            // Listed with its size, or 0 when the size does not fit (4 GiB or more).
            if let Some((_, size)) = all.iter().find(|(_, s)| *s == 0 || *s > max) {
                return Err(RusticError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "the repository's config file is unusable: it is {} (at most {max} bytes are read)",
                        if *size == 0 {
                            "empty or larger than 4 GiB".to_string()
                        } else {
                            format!("{size} bytes long")
                        }
                    ),
                ));
            }
            self.remember(tpe, &all);
            return Ok(all);
        }
        let kept: Vec<(Id, u32)> = all
            .into_iter()
            .filter(|(id, size)| {
                let ok = *size <= max;
                if !ok {
                    tracing::warn!(
                        repository = self.repository.as_str(),
                        file = %id,
                        kind = %tpe,
                        bytes = size,
                        "a file of the backup repository is left out: larger than restic or rustic make one \
                         (at most {max} bytes are read)"
                    );
                }
                ok
            })
            .collect();
        self.remember(tpe, &kept);
        Ok(kept)
    }

    fn remember(&self, tpe: FileType, files: &[(Id, u32)]) {
        let mut listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        listed.retain(|(t, _), _| *t != tpe as u8);
        listed.extend(files.iter().map(|(id, size)| ((tpe as u8, *id), *size)));
    }

    /// A file of a kind read whole, read up to the length its listing gave (listed again when
    /// it was not). An object store answers a plain read with the whole object as it is now: a
    /// snapshot file listed small and grown meanwhile by whoever can write the bucket was read
    /// whole into memory before its MAC was checked.
    fn read_listed(&self, tpe: FileType, max: u32, id: &Id) -> RusticResult<Bytes> {
        let known = |s: &Self| {
            s.listed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(tpe as u8, *id))
                .copied()
        };
        let size = match known(self) {
            Some(size) => size,
            None => {
                self.bounded(tpe, max)?;
                known(self).ok_or_else(|| {
                    RusticError::new(
                        ErrorKind::Backend,
                        format!(
                            "{tpe} file {id} of the repository is not listed (or is larger than the {max} bytes read)"
                        ),
                    )
                })?
            }
        };
        if size == 0 {
            return Ok(Bytes::new());
        }
        let data = self.inner.read_partial(tpe, id, false, 0, size)?;
        if data.len() > size as usize {
            return Err(RusticError::new(
                ErrorKind::InvalidInput,
                format!(
                    "{tpe} file {id} of the repository answered {} bytes for {size}",
                    data.len()
                ),
            ));
        }
        if matches!(tpe, FileType::Snapshot | FileType::Index) {
            if let Some(key) = self.key.get() {
                // Honest JSON compresses some 3 times: past the kind's bound and 8 times its
                // stored size, a file is no index or snapshot anyone wrote to be read. (cellar's
                // image backups wrote one index file per backup, unsplit, before 2026-12-07: one
                // of about 1 TiB of new data expands past 256 MiB.)
                let bound = u64::from(max).max(EXPANSION_RATIO * data.len() as u64);
                if let Some(n) = expands_past(key, &data, bound) {
                    return Err(RusticError::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "{tpe} file {id} of the repository expands to more than {bound} bytes ({n} read) from {} stored: \
                             restic, rustic and cellar never make one; whoever holds the repository's key did",
                            data.len()
                        ),
                    ));
                }
            }
        }
        Ok(data)
    }
}

impl ReadBackend for Guarded {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        match (tpe, max_bytes(tpe)) {
            (FileType::Key, _) => self.keys(),
            (_, Some(max)) => self.bounded(tpe, max),
            (_, None) => self.inner.list_with_size(tpe),
        }
    }

    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        if max_bytes(tpe).is_none() {
            return self.inner.list(tpe);
        }
        Ok(self.list_with_size(tpe)?.into_iter().map(|(id, _)| id).collect())
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        match (tpe, max_bytes(tpe)) {
            (FileType::Key, _) => {}
            (_, Some(max)) => return self.read_listed(tpe, max, id),
            (_, None) => return self.inner.read_full(tpe, id),
        }
        if let Some(data) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(data.clone());
        }
        // A key file read without being listed first is listed and checked the same way.
        self.keys()?;
        let data = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        data.ok_or_else(|| {
            RusticError::new(
                ErrorKind::InvalidInput,
                format!(
                    "key file {id} of the repository is not tried: it is not listed, or not usable (the log says why)"
                ),
            )
        })
    }

    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        let data = self.inner.read_partial(tpe, id, cacheable, offset, length)?;
        // rustic reads a tree blob as `cacheable` (and data blobs not): its expansion is counted
        // first, as a snapshot's or index file's is, and refused past what any tree may hold.
        if tpe == FileType::Pack && cacheable {
            if let Some(key) = self.key.get() {
                let bound = u64::from(super::MAX_TREE_BLOB_BYTES);
                if let Some(n) = blob_expands_past(key, &data, bound) {
                    return Err(RusticError::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the tree blob at {offset} in pack {id} of the repository expands to more than {bound} bytes \
                             ({n} read) from {length} stored: restic, rustic and cellar never make one; whoever holds \
                             the repository's key did"
                        ),
                    ));
                }
            }
        }
        Ok(data)
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }

    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }

    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for Guarded {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, content: BytesList) -> RusticResult<()> {
        self.inner.write_bytes(tpe, id, cacheable, content)
    }

    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.inner.remove(tpe, id, cacheable)
    }
}

/// A path repository's files as cellar reads them: each one opened without following a symlink,
/// and read only when it is a regular file. rustic's local backend opens by path: a FIFO in a
/// pack's place (anyone who can write the share, no key needed) held a restore in open(2) for
/// ever, with its volume's lock, and a symlink there made a privileged node open whatever it
/// names (a device, say). A file read whole is read up to its kind's bound, however large it has
/// grown since the listing that let it through.
pub fn local_reads(be: RepositoryBackends, root: &std::path::Path) -> RepositoryBackends {
    let wrapped = |inner: Arc<dyn WriteBackend>| -> Arc<dyn WriteBackend> {
        Arc::new(LocalReads {
            inner,
            root: root.to_path_buf(),
        })
    };
    RepositoryBackends::new(wrapped(be.repository()), be.repo_hot().map(wrapped))
}

struct LocalReads {
    inner: Arc<dyn WriteBackend>,
    root: std::path::PathBuf,
}

impl LocalReads {
    /// Where rustic's local backend keeps a file (its layout, which restic's is too).
    fn path(&self, tpe: FileType, id: &Id) -> std::path::PathBuf {
        let (dir, name) = Self::place(tpe, id);
        self.root.join(dir).join(name)
    }

    /// A file's directory below the root, and its name.
    fn place(tpe: FileType, id: &Id) -> (std::path::PathBuf, String) {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => (std::path::PathBuf::new(), "config".into()),
            FileType::Pack => (std::path::Path::new("data").join(&hex[0..2]), hex.to_string()),
            _ => (std::path::PathBuf::from(tpe.dirname()), hex.to_string()),
        }
    }

    /// The directory a file of `tpe` goes in, made when missing, reached from the root one
    /// component at a time without following a symlink: a bucket a writer of the share replaced
    /// with a symlink used to take the packs written into it out of the repository.
    fn directory(&self, dir: &std::path::Path) -> std::io::Result<crate::sys::files::PinnedDir> {
        use crate::sys::files::PinnedDir;
        let mut reached = std::path::PathBuf::new();
        for part in dir.components() {
            let next = reached.join(part);
            match PinnedDir::open_beneath(&self.root, &next) {
                Ok(_) => {}
                Err(e) if e.errno() == Some(libc::ENOENT) => {
                    let parent = PinnedDir::open_beneath(&self.root, &reached).map_err(std::io::Error::other)?;
                    match std::fs::create_dir(parent.proc_path().join(part)) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                        _ => {}
                    }
                }
                Err(e) => return Err(std::io::Error::other(e)),
            }
            reached = next;
        }
        PinnedDir::open_beneath(&self.root, &reached).map_err(std::io::Error::other)
    }

    /// rustic's local write (a temporary file, synced, renamed into place), in a directory
    /// reached without following a symlink and never through a symlink at the file's name.
    fn write(&self, tpe: FileType, id: &Id, content: BytesList) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (dir, name) = Self::place(tpe, id);
        let pinned = self.directory(&dir)?;
        let (tmp, target) = (
            pinned.proc_path().join(format!("{name}-tmp-")),
            pinned.proc_path().join(&name),
        );
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            for piece in content.slice() {
                f.write_all(piece)?;
            }
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &target)
    }

    /// The file, opened for reading when it is a regular file (an `O_PATH` descriptor looks
    /// first, so nothing else is ever opened), and its length.
    fn open(&self, tpe: FileType, id: &Id) -> RusticResult<(std::fs::File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(tpe, id);
        let failed = |what: &str, e: std::io::Error| {
            RusticError::with_source(ErrorKind::Backend, format!("cannot {what} `{{path}}`"), e)
                .attach_context("path", path.to_string_lossy())
        };
        let pinned = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| failed("open", e))?;
        let meta = pinned.metadata().map_err(|e| failed("stat", e))?;
        if !meta.file_type().is_file() {
            // Not the repository's file: its data is lost (DATA_LOSS), not out of reach (which
            // would be retried for ever).
            return Err(RusticError::with_source(
                ErrorKind::Verification,
                "cannot read `{path}`",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a regular file (a symlink, FIFO, device or directory in a repository file's place)",
                ),
            )
            .attach_context("path", path.to_string_lossy()));
        }
        let file = std::fs::File::open(crate::sys::files::reopen_path(&pinned)).map_err(|e| failed("open", e))?;
        Ok((file, meta.len()))
    }
}

impl ReadBackend for LocalReads {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.inner.list_with_size(tpe)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        use std::io::Read;
        let (file, len) = self.open(tpe, id)?;
        let max = u64::from(max_bytes(tpe).unwrap_or(u32::MAX));
        let too_long = |n: u64| {
            RusticError::new(
                ErrorKind::InvalidInput,
                format!("{tpe} file {id} of the repository is {n} bytes long: at most {max} are read"),
            )
        };
        if len > max {
            return Err(too_long(len));
        }
        let mut data = Vec::with_capacity(len as usize);
        file.take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| RusticError::with_source(ErrorKind::Backend, format!("cannot read {tpe} file {id}"), e))?;
        if data.len() as u64 > max {
            return Err(too_long(data.len() as u64));
        }
        Ok(Bytes::from(data))
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        use std::os::unix::fs::FileExt;
        let (file, held) = self.open(tpe, id)?;
        if held < u64::from(offset) + u64::from(length) {
            return Err(shorter_than_indexed(tpe, id, held, offset, length));
        }
        let mut data = vec![0u8; length as usize];
        file.read_exact_at(&mut data, u64::from(offset)).map_err(|e| {
            RusticError::with_source(
                ErrorKind::Backend,
                format!("cannot read {length} bytes at {offset} of {tpe} file {id}"),
                e,
            )
        })?;
        Ok(Bytes::from(data))
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }

    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }

    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for LocalReads {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, content: BytesList) -> RusticResult<()> {
        self.write(tpe, id, content).map_err(|e| {
            RusticError::with_source(ErrorKind::InputOutput, "cannot write `{path}`", e)
                .attach_context("path", self.path(tpe, id).to_string_lossy())
        })
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let (dir, name) = Self::place(tpe, id);
        crate::sys::files::PinnedDir::open_beneath(&self.root, &dir)
            .map_err(std::io::Error::other)
            .and_then(|pinned| std::fs::remove_file(pinned.proc_path().join(name)))
            .map_err(|e| {
                RusticError::with_source(ErrorKind::Backend, "cannot remove `{path}`", e)
                    .attach_context("path", self.path(tpe, id).to_string_lossy())
            })
    }
}

/// An S3 repository's files, read and written through cellar's own client: `op` (its retries
/// and its time bound on each request, [`super::s3_operator`]). rustic's S3 backend keeps only
/// the repository's creation and its name here.
///
/// - Listings keep their failures: rustic's backend drops an error met while it lists (a page
///   the store answered 500 or 503 to after its retries, a connection cut mid-listing) and
///   answers what it had listed so far, often nothing, as the whole listing. A prune then
///   planned as if the backups it had not listed were gone and marked every pack only they use
///   (restores of them were DATA_LOSS until the next prune with a whole listing), and removed
///   those packs for good when the listing failed again `keep-delete` later; a delete found
///   nothing to forget and answered OK, leaving the backup listed again once the store answered.
/// - No request waits for ever: rustic's client has no time bound, so a store that took a
///   request and never answered held an upload, a restore (with its volume's lock), a listing
///   or the background prune (and so every repository's prune) for good.
pub fn s3_backends(be: RepositoryBackends, op: opendal::blocking::Operator) -> RepositoryBackends {
    let wrapped =
        |inner: Arc<dyn WriteBackend>| -> Arc<dyn WriteBackend> { Arc::new(S3Files { inner, op: op.clone() }) };
    RepositoryBackends::new(wrapped(be.repository()), be.repo_hot().map(wrapped))
}

struct S3Files {
    inner: Arc<dyn WriteBackend>,
    op: opendal::blocking::Operator,
}

impl S3Files {
    /// Where a file is below the repository's prefix (restic's layout, as rustic writes it).
    fn path(tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => "config".to_string(),
            FileType::Pack => format!("data/{}/{}", &hex[0..2], &hex[..]),
            _ => format!("{}/{}", tpe.dirname(), &hex[..]),
        }
    }

    fn failed(what: &str, path: &str, e: opendal::Error) -> Box<RusticError> {
        RusticError::with_source(
            ErrorKind::Backend,
            format!("{what} `{{path}}` of the repository failed"),
            e,
        )
        .attach_context("path", path.to_string())
    }
}

/// How many times a ranged read that came back short (a connection cut mid-body, a proxy that
/// truncates; opendal tells "got too little data") is made before the object's length is asked.
const SHORT_READ_TRIES: usize = 3;

/// Whether a read failed for an answer shorter than asked: opendal's own check of an answer's
/// length (it has no kind of its own: "got too little data", after its retries), or a range
/// past the object's end. Other failures (a timeout, a 500 after the retries) are not read
/// again: the store's time bound already counts its tries.
fn cut_short(e: &opendal::Error) -> bool {
    e.kind() == opendal::ErrorKind::RangeNotSatisfied
        || (e.kind() == opendal::ErrorKind::Unexpected && e.to_string().contains("too little data"))
}

/// A file really shorter than a read its index asks for: its content is wrong (DATA_LOSS), not
/// the way to it.
fn shorter_than_indexed(tpe: FileType, id: &Id, held: u64, offset: u32, length: u32) -> Box<RusticError> {
    RusticError::with_source(
        ErrorKind::Verification,
        format!(
            "{tpe} file {id} of the repository is {held} bytes long: its index says {length} bytes lie at {offset}"
        ),
        std::io::Error::new(std::io::ErrorKind::InvalidData, "a pack shorter than its index says"),
    )
}

impl S3Files {
    /// Bytes `offset..offset + length` of the object at `path`. An answer shorter than asked is
    /// the network's or a proxy's doing until the object itself is shorter: it is read again,
    /// and when it stays short the object's length decides between a retryable failure
    /// (UNAVAILABLE) and a pack that is not what its index says (DATA_LOSS). One short answer
    /// failed the read at once before, and a pack really short was UNAVAILABLE, retried for ever.
    fn read_range(&self, tpe: FileType, id: &Id, offset: u32, length: u32) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        let range = u64::from(offset)..u64::from(offset) + u64::from(length);
        let mut short = String::new();
        for _ in 0..SHORT_READ_TRIES {
            let read = opendal::options::ReadOptions {
                range: range.clone().into(),
                ..Default::default()
            };
            match self.op.read_options(&path, read) {
                Ok(b) if b.len() == length as usize => return Ok(b.to_bytes()),
                Ok(b) => short = format!("{} bytes", b.len()),
                Err(e) if cut_short(&e) => short = e.to_string(),
                Err(e) => return Err(Self::failed("reading", &path, e)),
            }
        }
        let held = self
            .op
            .stat(&path)
            .map_err(|e| Self::failed("looking at", &path, e))?
            .content_length();
        if held < range.end {
            return Err(shorter_than_indexed(tpe, id, held, offset, length));
        }
        Err(RusticError::new(
            ErrorKind::Backend,
            format!(
                "reading {length} bytes at {offset} of `{path}` of the repository failed {SHORT_READ_TRIES} times \
                 though it holds {held} bytes (an answer cut short on the way?): {{short}}"
            ),
        )
        .attach_context("short", short))
    }
}

impl ReadBackend for S3Files {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        if tpe == FileType::Config {
            return match self.op.stat("config") {
                Ok(m) => Ok(vec![(Id::default(), u32::try_from(m.content_length()).unwrap_or(0))]),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(Self::failed("looking for", "config", e)),
            };
        }
        let all = opendal::options::ListOptions {
            recursive: true,
            ..Default::default()
        };
        let dir = format!("{}/", tpe.dirname());
        let entries = self
            .op
            .list_options(&dir, all)
            .map_err(|e| Self::failed("listing", &dir, e))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries.into_iter().filter(|e| e.metadata().is_file()) {
            // As rustic lists: a name that is no id is not the repository's file.
            let Ok(id) = e.name().parse::<Id>() else { continue };
            match u32::try_from(e.metadata().content_length()) {
                Ok(size) => out.push((id, size)),
                Err(_) => tracing::warn!(
                    file = e.path(),
                    bytes = e.metadata().content_length(),
                    "a file of the backup repository is left out: 4 GiB or larger"
                ),
            }
        }
        Ok(out)
    }

    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        Ok(self.list_with_size(tpe)?.into_iter().map(|(id, _)| id).collect())
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        self.op
            .read(&path)
            .map(|b| b.to_bytes())
            .map_err(|e| Self::failed("reading", &path, e))
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.read_range(tpe, id, offset, length)
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }

    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }

    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for S3Files {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, content: BytesList) -> RusticResult<()> {
        let path = Self::path(tpe, id);
        self.op
            .write(&path, content.into_vec())
            .map(drop)
            .map_err(|e| Self::failed("writing", &path, e))
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let path = Self::path(tpe, id);
        self.op.delete(&path).map_err(|e| Self::failed("removing", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::testing::backups;
    use crate::storage::StorageError;
    use std::path::Path;
    use std::time::Duration;

    /// A snapshot file listed small and grown before its read (anyone who can write the share)
    /// is not read past its listed length, nor (read unlisted) past its kind's bound: the
    /// listing's check alone let 100 MiB through.
    #[test]
    fn a_file_grown_after_its_listing_is_not_read_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let be = b.write_backend(&name, None).unwrap();
        let id = Id::new([7u8; 32]);
        let path = dir.path().join("repo/snapshots").join(id.to_hex().as_str());
        std::fs::write(&path, b"small").unwrap();
        let listed = be.list_with_size(FileType::Snapshot).unwrap();
        assert!(listed.contains(&(id, 5)), "{listed:?}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        let read = be
            .read_full(FileType::Snapshot, &id)
            .expect("read to its listed length");
        assert_eq!(&read[..], b"small", "read to its listed length, not whole");
        // Read without the listing, the path repository's own bound refuses it.
        let e = LocalReads {
            inner: be.clone(),
            root: dir.path().join("repo"),
        }
        .read_full(FileType::Snapshot, &id)
        .expect_err("read whole past its bound");
        assert!(e.to_string().contains("at most"), "{e}");
    }

    /// An object store's files as lengths: a read answers what the object holds now (zeros), and
    /// every byte a read hands out is counted.
    #[derive(Default)]
    struct Bucket {
        files: Mutex<HashMap<(u8, Id), u64>>,
        handed_out: std::sync::atomic::AtomicU64,
    }

    impl Bucket {
        fn put(&self, tpe: FileType, id: Id, len: u64) {
            self.files.lock().unwrap().insert((tpe as u8, id), len);
        }

        fn hand_out(&self, n: u64) -> RusticResult<Bytes> {
            self.handed_out.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            Ok(Bytes::from(vec![0u8; n as usize]))
        }

        fn len(&self, tpe: FileType, id: &Id) -> RusticResult<u64> {
            self.files
                .lock()
                .unwrap()
                .get(&(tpe as u8, *id))
                .copied()
                .ok_or_else(|| RusticError::new(ErrorKind::Backend, "no such object"))
        }
    }

    impl ReadBackend for Bucket {
        fn location(&self) -> String {
            "bucket".into()
        }
        fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
            let files = self.files.lock().unwrap();
            Ok(files
                .iter()
                .filter(|((t, _), _)| *t == tpe as u8)
                .map(|((_, id), len)| (*id, u32::try_from(*len).unwrap_or(0)))
                .collect())
        }
        fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
            self.hand_out(self.len(tpe, id)?)
        }
        fn read_partial(&self, tpe: FileType, id: &Id, _: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
            let len = self.len(tpe, id)?;
            self.hand_out(len.saturating_sub(u64::from(offset)).min(u64::from(length)))
        }
        fn warmup_path(&self, _: FileType, _: &Id) -> String {
            String::new()
        }
    }

    impl WriteBackend for Bucket {
        fn create(&self) -> RusticResult<()> {
            Ok(())
        }
        fn write_bytes(&self, _: FileType, _: &Id, _: bool, _: BytesList) -> RusticResult<()> {
            Ok(())
        }
        fn remove(&self, _: FileType, _: &Id, _: bool) -> RusticResult<()> {
            Ok(())
        }
    }

    /// The same on an object store, where a plain read answers the whole object as it is now:
    /// a snapshot, index, config or key file is read only up to the length the listing that let
    /// it through gave (listed first when it was not), so one grown to 3 GiB in between costs
    /// nothing; one listed past its bound is never read.
    #[test]
    fn an_object_grown_after_its_listing_is_read_only_to_its_listed_length() {
        let bucket = Arc::new(Bucket::default());
        let be = wrap(
            RepositoryBackends::new(bucket.clone(), None),
            "offsite",
            &KeySlot::default(),
        )
        .repository();
        let (snap, index, unlisted, huge) = (Id::new([1; 32]), Id::new([2; 32]), Id::new([3; 32]), Id::new([4; 32]));
        bucket.put(FileType::Snapshot, snap, 300);
        bucket.put(FileType::Index, index, 4000);
        bucket.put(FileType::Snapshot, huge, 65 << 20);
        bucket.put(FileType::Config, Id::default(), 200);
        let listed = be.list_with_size(FileType::Snapshot).unwrap();
        assert_eq!(listed, vec![(snap, 300)], "the one past its bound is left out");
        be.list_with_size(FileType::Index).unwrap();
        be.list_with_size(FileType::Config).unwrap();
        for (tpe, id) in [
            (FileType::Snapshot, snap),
            (FileType::Index, index),
            (FileType::Config, Id::default()),
        ] {
            bucket.put(tpe, id, 3 << 30);
        }
        bucket.put(FileType::Snapshot, unlisted, 500);
        assert_eq!(be.read_full(FileType::Snapshot, &snap).unwrap().len(), 300);
        assert_eq!(be.read_full(FileType::Index, &index).unwrap().len(), 4000);
        assert_eq!(be.read_full(FileType::Config, &Id::default()).unwrap().len(), 200);
        assert_eq!(
            be.read_full(FileType::Snapshot, &unlisted).unwrap().len(),
            500,
            "a file read before any listing is listed first"
        );
        let e = be.read_full(FileType::Snapshot, &huge).expect_err("past its bound");
        assert!(e.to_string().contains("not listed"), "{e}");
        let e = be.read_full(FileType::Key, &Id::new([5; 32])).expect_err("no such key");
        assert!(e.to_string().contains("not tried"), "{e}");
        assert_eq!(
            bucket.handed_out.load(std::sync::atomic::Ordering::SeqCst),
            300 + 4000 + 200 + 500,
            "no byte past a listed length was read"
        );
    }

    /// A snapshot or index file sealed with the repository's key (any node holds it) that
    /// expands to gigabytes: a few KiB stored, within every stored bound, but rustic decompresses
    /// it whole into memory once its MAC checks. Its expansion is counted first (never held) and
    /// the read refused past the kind's bound; an honest file, and one sealed under another key
    /// (left to rustic, which refuses it as before), are read as they are.
    #[test]
    fn a_sealed_file_that_expands_past_its_bound_is_refused_before_rustic_reads_it() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = backups(dir.path());
        let key = b.open_or_init(&name, true).unwrap().key();
        let sealer = crate::backup::image::Sealer::new(&key).ok().expect("sealer");
        let compressed = |bytes: u64| {
            use std::io::Read;
            let mut plain = vec![2u8];
            plain.extend(zstd::encode_all(std::io::repeat(b' ').take(bytes), 3).unwrap());
            plain
        };
        let put = |sealed: &[u8]| {
            let id = Id::new(sha2::Sha256::digest(sealed).into());
            std::fs::write(dir.path().join("repo/snapshots").join(id.to_hex().as_str()), sealed).unwrap();
            id
        };
        let bomb = put(&sealer.seal(&compressed((64 << 20) + 1)).ok().expect("sealed"));
        let honest = put(&sealer.seal(&compressed(4096)).ok().expect("sealed"));
        let other_key = {
            // Another MAC key: the MAC fails (a changed encryption key alone still checks).
            let mut k = key.clone();
            k.mac.k[0] ^= 1;
            let other = crate::backup::image::Sealer::new(&k).ok().expect("sealer");
            put(&other.seal(&compressed(1 << 30)).ok().expect("sealed"))
        };
        let stored = std::fs::metadata(dir.path().join("repo/snapshots").join(bomb.to_hex().as_str()))
            .unwrap()
            .len();
        assert!(stored < 64 << 10, "a few KiB stored: {stored}");
        let be = b.write_backend(&name, None).unwrap();
        let listed = be.list_with_size(FileType::Snapshot).unwrap();
        assert!(
            listed.iter().any(|(id, _)| *id == bomb),
            "within the stored bound, listed"
        );
        let e = be
            .read_full(FileType::Snapshot, &bomb)
            .expect_err("expands past 64 MiB");
        assert!(e.to_string().contains("expands to more than"), "{e}");
        assert!(
            be.read_full(FileType::Snapshot, &honest).is_ok(),
            "an honest file reads"
        );
        assert!(
            be.read_full(FileType::Snapshot, &other_key).is_ok(),
            "another key's file is left to rustic, which refuses it as before"
        );
        let file = std::fs::read(dir.path().join("repo/snapshots").join(other_key.to_hex().as_str())).unwrap();
        assert!(sealer.open(&file).is_none(), "its MAC does not check under the key");
        // A large honest index (cellar's image backups write one per backup, unsplit) expands
        // past the kind's bound but by what JSON compresses: read.
        let mut json = Vec::with_capacity(300 << 20);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..3_000_000u32 {
            // Blob ids are SHA-256 hashes: random hex, as JSON compresses it.
            let mut id = String::with_capacity(64);
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                id.push_str(&format!("{x:016x}"));
            }
            json.extend_from_slice(format!("{{\"id\":\"{id}\",\"offset\":{i}}},").as_bytes());
        }
        let mut plain = vec![2u8];
        plain.extend(zstd::encode_all(&json[..], 3).unwrap());
        let sealed = sealer.seal(&plain).ok().expect("sealed");
        let index = Id::new(sha2::Sha256::digest(&sealed).into());
        std::fs::write(dir.path().join("repo/index").join(index.to_hex().as_str()), &sealed).unwrap();
        assert!(json.len() > 256 << 20 && (json.len() as u64) < EXPANSION_RATIO * sealed.len() as u64);
        be.list_with_size(FileType::Index).unwrap();
        assert!(
            be.read_full(FileType::Index, &index).is_ok(),
            "an honest large index reads"
        );
        assert_eq!(
            expands_past(&key, &sealer.seal(&compressed(100)).ok().expect("sealed"), 1000),
            None
        );
        assert_eq!(
            expands_past(&key, &sealer.seal(b"{}").ok().expect("sealed"), 1),
            None,
            "not compressed"
        );
    }

    /// A FIFO, a symlink or a directory in a repository file's place is an error at once, never
    /// a read that waits for a writer (a restore held its volume's lock for ever) nor a read of
    /// what a symlink names.
    #[test]
    fn only_regular_files_of_a_path_repository_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let be = b.write_backend(&name, None).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"a file outside the repository").unwrap();
        let pack = |n: u8| {
            let id = Id::new([n; 32]);
            let hex = id.to_hex();
            (id, dir.path().join("repo/data").join(&hex[..2]).join(hex.as_str()))
        };
        let (fifo, fifo_path) = pack(0x11);
        nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (link, link_path) = pack(0x22);
        std::os::unix::fs::symlink(&secret, &link_path).unwrap();
        let (sub, sub_path) = pack(0x33);
        std::fs::create_dir(&sub_path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = be.clone();
        std::thread::spawn(move || {
            let answers: Vec<bool> = [fifo, link, sub]
                .iter()
                .map(|id| reader.read_partial(FileType::Pack, id, false, 0, 4).is_err())
                .collect();
            let _ = tx.send(answers);
        });
        let got = rx.recv_timeout(Duration::from_secs(60));
        if got.is_err() {
            // Let a reader stuck in open(2) go: a writer opens the FIFO.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo_path));
        }
        assert_eq!(got.expect("the reads answered"), vec![true, true, true]);
        let e = be
            .read_full(FileType::Snapshot, &link)
            .expect_err("no snapshot file there");
        assert!(!e.to_string().contains("outside"), "{e}");
    }

    /// Opens the repository in a fresh process's state (no key remembered), giving up after
    /// `secs`: `None` when it did not finish.
    fn open_within(dir: &Path, secs: u64) -> Option<Result<(), StorageError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            let (b, name) = backups(&dir);
            let _ = tx.send(b.open(&name).map(|_| ()));
        });
        rx.recv_timeout(Duration::from_secs(secs)).ok()
    }

    fn the_key_file(repo: &Path) -> serde_json::Value {
        let keys: Vec<_> = std::fs::read_dir(repo.join("keys"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(keys.len(), 1, "a new repository has one key");
        serde_json::from_slice(&std::fs::read(&keys[0]).unwrap()).unwrap()
    }

    #[test]
    fn key_files_added_without_the_key_neither_exhaust_nor_stop_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = dir.path().join("repo");
        let real = the_key_file(&repo);
        // What someone who can write the storage but has no key can add: key files whose scrypt
        // parameters take days of CPU or terabytes of memory, and files that are no key at all.
        for i in 0..6u8 {
            let mut k = real.clone();
            match i % 3 {
                0 => k["p"] = serde_json::json!(1u32 << 26),
                1 => k["N"] = serde_json::json!(1u32 << 31),
                _ => k["r"] = serde_json::json!(1u32 << 20),
            }
            std::fs::write(repo.join("keys").join(format!("{:064x}", i)), k.to_string()).unwrap();
        }
        std::fs::write(repo.join("keys").join(format!("{:064x}", 100)), "not a key file").unwrap();
        let mut odd = real.clone();
        odd["N"] = serde_json::json!(1000);
        std::fs::write(repo.join("keys").join(format!("{:064x}", 101)), odd.to_string()).unwrap();
        let opened = open_within(dir.path(), 60).expect("the open finished");
        opened.expect("the real key still opens the repository");
    }

    #[test]
    fn files_too_large_to_be_read_whole_are_left_out_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = dir.path().join("repo");
        // A sparse snapshot file of 300 MiB (it could be 8 GiB): free to make on a share, as much
        // memory to read whole.
        let f = std::fs::File::create(repo.join("snapshots").join(format!("{:064x}", 7))).unwrap();
        f.set_len(300 << 20).unwrap();
        assert_eq!(b.list(&name).unwrap(), Vec::new(), "the oversized snapshot is left out");
        // The same for the config: the repository is refused, not read.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(repo.join("config"))
            .unwrap();
        f.set_len(300 << 20).unwrap();
        let (b, name) = backups(dir.path());
        let e = b.open(&name).map(|_| ()).expect_err("refused");
        assert!(matches!(e, StorageError::PoolUnusable(_)), "{e}");
        assert!(e.to_string().contains("config file is unusable"), "{e}");
    }

    #[test]
    fn kdf_bounds_accept_what_restic_and_rustic_make() {
        let key = |n: u32, r: u32, p: u32| {
            serde_json::json!({"kdf": "scrypt", "N": n, "r": r, "p": p, "data": "A".repeat(64), "salt": "AAAA"})
                .to_string()
        };
        assert!(kdf_work(key(1 << 15, 8, 1).as_bytes()).is_ok(), "restic's default");
        assert!(kdf_work(key(1 << 17, 8, 1).as_bytes()).is_ok(), "rustic's default");
        assert!(kdf_work(key(1 << 20, 8, 1).as_bytes()).is_err(), "1 GiB of memory");
        assert!(
            kdf_work(key(1 << 15, 8, 1 << 10).as_bytes()).is_err(),
            "a thousand rounds"
        );
        assert!(kdf_work(key(1000, 8, 1).as_bytes()).is_err(), "N not a power of two");
    }
}
