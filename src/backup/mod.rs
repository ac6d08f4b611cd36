//! Backups that outlive their node (docs/backups.md): a snapshot's data uploaded into a restic
//! repository (format version 2: compressed, encrypted, deduplicated) on a directory every node
//! mounts or on S3, and restored from there on any node.
//!
//! The repository is written and read through rustic_core, so `restic` and `rustic` list, check
//! and restore every backup without cellar. cellar finds its own backups by their tags:
//! `cellar-backup=<key>` (the key in the snapshot id `backup:<repository>:<key>`), plus the CSI
//! name and the source volume; the snapshot's description holds what a restore needs to make the
//! volume again ([`BackupMeta`]).
//!
//! - [`upload`]: a snapshot's image file or tree into the repository;
//! - [`restore`]: a backup as the transfer stream (`storage::transfer`) that a node imports, so a
//!   restore is checked and placed exactly like a copy from another node;
//! - [`throttle`]: a per-node bandwidth limit and the byte counters, around the repository's
//!   backend.

mod claim;
pub mod cli;
pub mod guard;
pub mod image;
pub mod restore;
pub mod throttle;
pub mod upload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustic_backend::BackendOptions;
use rustic_core::repofile::SnapshotFile;
use rustic_core::{
    ConfigOptions, Credentials, ErrorKind, KeyOptions, OpenStatus, Repository, RepositoryBackends, RepositoryOptions,
    RusticError, SnapshotOptions,
};
use serde::{Deserialize, Serialize};

use crate::storage::id::{BackupId, NodeId, PoolName, VolumeId};
use crate::storage::record::{Layout, VolumeMode};
use crate::storage::StorageError;

pub use throttle::Throttle;

/// An open repository, as rustic_core has it.
pub type Open = Repository<OpenStatus>;

/// Every restic snapshot in a repository, reading only the snapshot files not in `known` (a
/// snapshot file never changes: its name is the hash of its content); those of `known` no longer
/// listed are dropped. rustic lists the snapshot files, then reads each: one removed in between
/// (an upload dropping its pending copy once checked, a forget) fails the read with "not found".
/// Then the whole listing is read again, a bounded number of times; any other failure, or a file
/// still missing after the last try, is the answer.
fn snapshots_after(repo: &Open, known: Vec<SnapshotFile>) -> rustic_core::RusticResult<Vec<SnapshotFile>> {
    const TRIES: usize = 10;
    let mut tries = 1;
    loop {
        match repo.update_all_snapshots(known.clone()) {
            Err(e) if tries < TRIES && is_not_found(&e) => {
                tracing::debug!(error = %e, "a snapshot file went away while the repository was listed; listing again");
                tries += 1;
            }
            // One file that fails its MAC: rustic fails the whole listing for
            // it, and then every listing, lookup and delete of every backup of the repository
            // failed while it was there (anyone who can write the storage can put it there, no
            // key needed). The files are read one by one and such a file is left out (logged).
            Err(e) if matches!(kind_of(&e), Kind::DataLoss) => {
                return snapshots_one_by_one(repo, known);
            }
            done => return done,
        }
    }
}

/// [`snapshots_after`], one snapshot file at a time, leaving out those that fail their MAC; any
/// other failure (a repository that cannot be reached) is still the answer.
fn snapshots_one_by_one(repo: &Open, known: Vec<SnapshotFile>) -> rustic_core::RusticResult<Vec<SnapshotFile>> {
    use rustic_core::repofile::SnapshotId;
    let ids: std::collections::HashSet<SnapshotId> = repo.list::<SnapshotId>()?.collect();
    let mut out: Vec<SnapshotFile> = known.into_iter().filter(|s| ids.contains(&s.id)).collect();
    let have: std::collections::HashSet<SnapshotId> = out.iter().map(|s| s.id).collect();
    for id in ids.into_iter().filter(|id| !have.contains(id)) {
        match repo.get_file::<SnapshotFile>(&id) {
            Ok(mut snap) => {
                snap.id = id;
                out.push(snap);
            }
            Err(e) if is_not_found(&e) => {} // removed since the listing
            Err(e) if matches!(kind_of(&e), Kind::DataLoss) => {
                tracing::warn!(snapshot_file = %id, error = %one_line(&e.display_log()), "a snapshot file of the backup repository is left out: it fails its check");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes the snapshot files `ids`. One another process removed meanwhile (two forgets of one
/// backup, a mark cleared by the node that consumed it and by the replica that wrote it) is
/// gone as asked, not a failure.
fn remove_snapshot_files(repo: &Open, ids: &[rustic_core::repofile::SnapshotId]) -> rustic_core::RusticResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match repo.delete_snapshots(ids) {
        Err(e) if is_not_found(&e) => {
            for id in ids {
                match repo.delete_snapshots(std::slice::from_ref(id)) {
                    Err(e) if !is_not_found(&e) => return Err(e),
                    _ => {}
                }
            }
            // Gone as asked only if the listing agrees (a share unmounted meanwhile finds every
            // file missing while they stay on the share).
            let left: Vec<rustic_core::repofile::SnapshotId> = repo.list()?.collect();
            match ids.iter().any(|id| left.contains(id)) {
                true => Err(e),
                false => Ok(()),
            }
        }
        done => done,
    }
}

/// Whether a failure's cause is a file that is not there (local directory or S3).
fn is_not_found(e: &RusticError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            || c.downcast_ref::<opendal::Error>()
                .is_some_and(|o| o.kind() == opendal::ErrorKind::NotFound)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Where a repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a filesystem every node mounts (a shared pool's share, NFS, CephFS, GlusterFS).
    Path(PathBuf),
    S3(S3),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct S3 {
    /// `http(s)://host:port`; path-style requests.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...` lines (a Secret mounted as a file).
    pub credentials_file: PathBuf,
    /// A prefix inside the bucket (default: the bucket's root).
    #[serde(default)]
    pub prefix: Option<String>,
    /// How long one request to the store may go unanswered, or one pack take to send, before
    /// it is given up (and tried again, twice): default [`S3_TIMEOUT_SECONDS`].
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// How long one S3 request may take by default: a 16 MiB pack at 60 kB/s.
pub const S3_TIMEOUT_SECONDS: u64 = 300;

fn default_region() -> String {
    "us-east-1".into()
}

/// A backup repository from the pool configuration's `repositories:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryConfig {
    pub name: PoolName,
    pub location: Location,
    /// The repository key (its password), read when the repository is opened.
    pub password_file: PathBuf,
}

/// `repositories:` entries as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileRepository {
    name: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    s3: Option<S3>,
    password_file: PathBuf,
}

impl RepositoryConfig {
    pub fn from_file(list: Vec<FileRepository>) -> Result<Vec<RepositoryConfig>, String> {
        let mut out: Vec<RepositoryConfig> = Vec::new();
        for r in list {
            let name = PoolName::parse(&r.name).map_err(|e| format!("repository: {}", e.0))?;
            if out.iter().any(|o| o.name == name) {
                return Err(format!("repository '{}' is listed twice", r.name));
            }
            let location = match (r.path, r.s3) {
                (Some(p), None) if crate::storage::config::plain_absolute(&p) => Location::Path(p),
                (Some(p), None) => {
                    return Err(format!(
                        "repository '{}': path '{}' must be absolute, without '..'",
                        r.name,
                        p.display()
                    ))
                }
                (None, Some(s3)) => {
                    if !(s3.endpoint.starts_with("http://") || s3.endpoint.starts_with("https://")) {
                        return Err(format!(
                            "repository '{}': s3.endpoint '{}' must start with http:// or https://",
                            r.name, s3.endpoint
                        ));
                    }
                    if s3.bucket.is_empty() {
                        return Err(format!("repository '{}': s3.bucket is empty", r.name));
                    }
                    Location::S3(s3)
                }
                _ => {
                    return Err(format!(
                        "repository '{}': give exactly one of path (a directory every node mounts) and s3",
                        r.name
                    ))
                }
            };
            if !r.password_file.is_absolute() {
                return Err(format!(
                    "repository '{}': passwordFile must be an absolute path",
                    r.name
                ));
            }
            out.push(RepositoryConfig {
                name,
                location,
                password_file: r.password_file,
            });
        }
        Ok(out)
    }

    /// Where it is, for messages and metrics (no credentials).
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Path(p) => p.display().to_string(),
            Location::S3(s) => format!("s3 {}/{}", s.endpoint, s.bucket),
        }
    }

    fn backend_options(&self) -> Result<BackendOptions, StorageError> {
        Ok(match &self.location {
            Location::Path(p) => BackendOptions::default().repository(p.display().to_string()),
            Location::S3(s) => BackendOptions::default()
                .repository("opendal:s3")
                .options(self.s3_options(s)?),
        })
    }

    /// What opendal's S3 service is given: rustic's backend and the init claim use the same.
    fn s3_options(&self, s: &S3) -> Result<BTreeMap<String, String>, StorageError> {
        let (key, secret) = read_s3_credentials(&s.credentials_file).map_err(|e| self.refused(e))?;
        let mut o = BTreeMap::new();
        o.insert("bucket".to_string(), s.bucket.clone());
        o.insert("endpoint".to_string(), s.endpoint.clone());
        o.insert("region".to_string(), s.region.clone());
        o.insert("access_key_id".to_string(), key);
        o.insert("secret_access_key".to_string(), secret);
        o.insert("root".to_string(), format!("/{}", s.prefix.clone().unwrap_or_default()));
        // Only what the configuration says: no credentials from the environment, the
        // instance metadata service or ~/.aws.
        o.insert("disable_config_load".to_string(), "true".to_string());
        o.insert("disable_ec2_metadata".to_string(), "true".to_string());
        o.insert("enable_virtual_host_style".to_string(), "false".to_string());
        // A few quick retries: an endpoint that is down answers UNAVAILABLE in seconds
        // (the CO retries the call), not after rustic's default minute of backoff.
        o.insert("retry".to_string(), "2".to_string());
        Ok(o)
    }

    /// A repository that cannot be used as configured: FAILED_PRECONDITION naming it.
    fn refused(&self, why: impl std::fmt::Display) -> StorageError {
        StorageError::PoolUnusable(format!("backup repository '{}': {why}", self.name.as_str()))
    }

    /// A rustic error, classified: a wrong key or unusable configuration is the repository's
    /// precondition; a backend that cannot be reached is UNAVAILABLE (retried).
    pub fn error(&self, e: impl Into<RusticFailure>) -> StorageError {
        let e = e.into();
        let text = e.text;
        match e.kind {
            Kind::Key => self.refused(format!("the key does not open it ({text})")),
            Kind::Unreachable => StorageError::Unavailable(format!(
                "backup repository '{}' ({}) cannot be reached: {text}",
                self.name.as_str(),
                self.describe()
            )),
            Kind::Refused => self.refused(text),
            Kind::DataLoss => StorageError::DataLoss(format!("backup repository '{}': {text}", self.name.as_str())),
        }
    }
}

impl RepositoryConfig {
    /// A failure reading a backup's trees or data: a backend that cannot be reached is retried;
    /// anything else (a pack the index names that is not there, a MAC or hash that does not
    /// match, a blob the index lost) is data loss.
    pub fn read_error(&self, e: Box<RusticError>) -> StorageError {
        if is_not_found(&e) {
            // A share unmounted under a running restore leaves its mount point: that is a
            // repository gone from view, not one that lost a pack.
            if let Location::Path(root) = &self.location {
                if !root.join("config").exists() {
                    return StorageError::Unavailable(format!(
                        "backup repository '{}' ({}) cannot be reached: its config is not there any more",
                        self.name.as_str(),
                        self.describe()
                    ));
                }
            }
            return StorageError::DataLoss(format!(
                "backup repository '{}': a pack its index names is not there ({})",
                self.name.as_str(),
                one_line(&e.display_log())
            ));
        }
        match self.error(e) {
            StorageError::Unavailable(m) => StorageError::Unavailable(m),
            other => StorageError::DataLoss(other.to_string()),
        }
    }
}

/// What went wrong in rustic, in the terms cellar answers with.
pub struct RusticFailure {
    kind: Kind,
    text: String,
}

enum Kind {
    Key,
    Unreachable,
    Refused,
    DataLoss,
}

/// What kind of failure rustic reports, in cellar's terms.
fn kind_of(e: &RusticError) -> Kind {
    let full = e.to_string();
    // rustic keeps the kind private; its message names it ("related to `the backend`").
    let is = |k: ErrorKind| full.contains(&format!("related to `{k}`"));
    if e.is_incorrect_password() || is(ErrorKind::Credentials) || is(ErrorKind::Key) {
        Kind::Key
    } else if is(ErrorKind::Backend) || is(ErrorKind::InputOutput) {
        Kind::Unreachable
    } else if is(ErrorKind::Cryptography) || is(ErrorKind::Verification) {
        Kind::DataLoss
    } else {
        Kind::Refused
    }
}

impl From<Box<RusticError>> for RusticFailure {
    fn from(e: Box<RusticError>) -> Self {
        RusticFailure {
            kind: kind_of(&e),
            // display_log: the message without the backtrace and bug-report text Display adds.
            text: one_line(&e.display_log()),
        }
    }
}

impl RusticFailure {
    pub fn data_loss(text: impl Into<String>) -> Self {
        RusticFailure {
            kind: Kind::DataLoss,
            text: text.into(),
        }
    }

    /// A failure reading the source or writing the repository's files: retried, like an
    /// unreachable repository.
    pub fn io(text: impl Into<String>) -> Self {
        RusticFailure {
            kind: Kind::Unreachable,
            text: text.into(),
        }
    }
}

/// rustic's messages run over many lines of guidance; a status message is one line, bounded.
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = joined.len().min(600);
    while !joined.is_char_boundary(end) {
        end -= 1;
    }
    joined[..end].to_string()
}

fn read_s3_credentials(path: &Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("credentialsFile {}: {e}", path.display()))?;
    let (mut key, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some(("AWS_ACCESS_KEY_ID", v)) => key = Some(v.trim().to_string()),
            Some(("AWS_SECRET_ACCESS_KEY", v)) => secret = Some(v.trim().to_string()),
            _ => {}
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Ok((k, s)),
        _ => Err(format!(
            "credentialsFile {} needs AWS_ACCESS_KEY_ID= and AWS_SECRET_ACCESS_KEY= lines",
            path.display()
        )),
    }
}

/// What a restore needs to make the volume again, kept in the restic snapshot's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    /// The CSI snapshot name (the idempotency key of CreateSnapshot).
    pub name: String,
    pub source_volume_id: String,
    pub layout: Layout,
    pub mode: VolumeMode,
    pub capacity_bytes: u64,
    /// image: the filesystem's size and the image file's length; 0 for trees.
    pub fs_bytes: u64,
    pub length: u64,
    /// The node that cut and uploaded it.
    pub node: String,
    /// Where the data is inside the restic snapshot (`/volume` for a tree, `/<file>` for an
    /// image: `restic restore <id> --target T` writes `T<path>`).
    pub path: String,
    /// A tree's root directory: owner, mode, times and xattrs (restic keeps them for the entries
    /// below it; the root is cellar's to put back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<StoredMeta>,
    /// image: the fixed chunk size its data was cut at (`image::CHUNK`), which lets the next
    /// backup of the volume take its unchanged chunks unread; absent for trees (and for images
    /// that rustic's archiver chunked, before cellar wrote images itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_bytes: Option<u64>,
}

/// Whether a backup's delete writes a deletion mark before it forgets the backup (docs/backups.md,
/// "A node that cannot be told"), given what the repository holds of it (`stored`), whether a
/// node asked could not be reached (`unreached`), which nodes answered the forget (`told`), and
/// whether one of them answered that it held a part (`held`). A mark is needed when a node could
/// not be reached; when the node that cut the stored backup was not asked (it may keep a copy, or
/// hold the record of an upload that a crash stopped after the repository held it, which it would
/// resume: even a backup not kept needs the mark); or when the repository does not hold the
/// backup (yet) and no node answered that it held a part, as a node nobody asked may hold its
/// unfinished upload.
pub fn delete_needs_mark(
    stored: Option<&BackupInfo>,
    unreached: bool,
    told: impl Fn(&NodeId) -> bool,
    held: bool,
) -> bool {
    // A shared pool's volume names no node: whoever serves the shared pools holds its copies.
    let cutter_untold = stored
        .and_then(source_of)
        .is_some_and(|v| v.0.node().is_some_and(|n| !told(n)));
    unreached || cutter_untold || (stored.is_none() && !held)
}

/// A directory's metadata in the snapshot's description (names and values of xattrs in hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMeta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    #[serde(default)]
    pub xattrs: Vec<(String, String)>,
}

impl StoredMeta {
    pub fn of(m: &crate::sys::tree::Meta) -> StoredMeta {
        StoredMeta {
            uid: m.uid,
            gid: m.gid,
            mode: m.mode,
            atime: m.atime,
            mtime: m.mtime,
            xattrs: m.xattrs.iter().map(|(k, v)| (hex::encode(k), hex::encode(v))).collect(),
        }
    }

    pub fn meta(&self) -> Option<crate::sys::tree::Meta> {
        let xattrs = self
            .xattrs
            .iter()
            .map(|(k, v)| Some((hex::decode(k).ok()?, hex::decode(v).ok()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(crate::sys::tree::Meta {
            uid: self.uid,
            gid: self.gid,
            mode: self.mode,
            atime: self.atime,
            mtime: self.mtime,
            xattrs,
        })
    }
}

/// One of cellar's backups as the repository holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub id: BackupId,
    pub meta: BackupMeta,
    /// The restic snapshot's id (for `restic restore <id>`).
    pub snapshot: String,
    pub created_unix_secs: i64,
    /// Bytes the snapshot's data covers (rustic's summary).
    pub bytes: u64,
}

pub(crate) const TAG_KEY: &str = "cellar-backup=";
const TAG_NAME: &str = "cellar-name=";
const TAG_VOLUME: &str = "cellar-volume=";
/// An upload's snapshot before its completeness check: not a backup yet (never listed, never
/// restored). Once checked, an untagged copy is written and this one removed.
const TAG_PENDING: &str = "cellar-pending";
/// A deletion mark: backup `<key>` was deleted while a node that may hold a part of it (an
/// upload not finished, a kept local copy) could not be told. That node drops its part when it
/// sees the mark, instead of finishing the upload. Not a backup: it carries no [`TAG_KEY`].
const TAG_DELETED: &str = "cellar-deleted=";
/// How long a deletion mark no node consumed is kept: a node away longer than this that still
/// holds an unfinished upload of a deleted backup uploads it again (docs/backups.md).
pub const DELETED_MARK_DAYS: i64 = 90;

/// The node of a backup's data in its snapshot's tree; `None` for an empty tree (rustic saves no
/// node for a source directory with no entries). Every tree on the way is checked against its id.
pub(crate) fn data_node<S: rustic_core::IndexedFull>(
    repo: &Repository<S>,
    cfg: &RepositoryConfig,
    tree: rustic_core::TreeId,
    meta: &BackupMeta,
    raw: &BlobReader,
) -> Result<Option<rustic_core::repofile::Node>, StorageError> {
    let names: Vec<&std::ffi::OsStr> = Path::new(&meta.path)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut current = checked_tree(repo, cfg, tree, raw)?;
    if current.nodes.is_empty() && meta.layout != Layout::Image {
        return Ok(None);
    }
    let mut found = None;
    for (i, name) in names.iter().enumerate() {
        let node = current.nodes.into_iter().find(|n| n.name() == *name).ok_or_else(|| {
            cfg.error(RusticFailure::data_loss(format!(
                "the backup's tree has no {}",
                meta.path
            )))
        })?;
        if i + 1 < names.len() {
            let sub = node
                .subtree
                .ok_or_else(|| cfg.error(RusticFailure::data_loss(format!("{} is not a directory", node.name))))?;
            current = checked_tree(repo, cfg, sub, raw)?;
            found = None;
        } else {
            current = rustic_core::repofile::Tree::default();
            found = Some(node);
        }
    }
    found.map(Some).ok_or_else(|| {
        cfg.error(RusticFailure::data_loss(format!(
            "the backup's tree has no {}",
            meta.path
        )))
    })
}

/// The most a data blob may decompress to: restic's and rustic's chunks are at most 8 MiB,
/// cellar's image chunks 512 KiB.
pub const MAX_DATA_BLOB_BYTES: u32 = 16 << 20;
/// The most a tree blob may decompress to, whatever its stored size: a directory's JSON is about
/// 300 bytes an entry, so this holds some 1.8 million entries in one directory. No ratio to its
/// stored size bounds an honest tree: the entries of a directory of empty files differ in a few
/// bytes each, and zstd stores 300,000 of them (82 MiB) in 4 MiB, 20 times less
/// (`a_large_honest_tree_restores`).
pub const MAX_TREE_BLOB_BYTES: u32 = 512 << 20;

/// Reads blobs from their packs itself, for a restore. rustic decompresses a compressed blob whole
/// (`zstd::decode_all`) before it compares the length with the one the index gives, so one
/// sealed with the repository's key (every node holds it) of a few KiB could expand to any
/// number of GiB in the restoring node's memory. Here a blob is decompressed into a buffer of the
/// length its index entry claims, no further, and that claim is bounded by the blob's kind.
pub(crate) struct BlobReader {
    be: Arc<dyn rustic_core::WriteBackend>,
    sealer: image::Sealer,
}

impl BlobReader {
    pub(crate) fn new(
        be: Arc<dyn rustic_core::WriteBackend>,
        key: &rustic_core::repofile::MasterKey,
        cfg: &RepositoryConfig,
    ) -> Result<BlobReader, StorageError> {
        let sealer = image::Sealer::new(key).map_err(|e| cfg.error(e))?;
        Ok(BlobReader { be, sealer })
    }

    /// The plaintext of blob `id`, its MAC checked and decompressed within its bound.
    fn read<S: rustic_core::IndexedFull>(
        &self,
        repo: &Repository<S>,
        cfg: &RepositoryConfig,
        id: rustic_core::BlobId,
        tpe: rustic_core::repofile::BlobType,
    ) -> Result<bytes::Bytes, StorageError> {
        use rustic_core::repofile::BlobType;
        use rustic_core::ReadBackend;
        let entry = match tpe {
            BlobType::Data => repo.get_index_entry(&rustic_core::DataId::from(id)),
            BlobType::Tree => repo.get_index_entry(&rustic_core::TreeId::from(id)),
        }
        .map_err(|e| cfg.read_error(e))?;
        let loc = entry.location;
        let sealed = self
            .be
            .read_partial(
                rustic_core::FileType::Pack,
                &entry.pack,
                // Not `cacheable`: the guard counts the expansion of the tree blobs rustic reads
                // (which it marks so); this reader bounds its own.
                false,
                loc.offset,
                loc.length,
            )
            .map_err(|e| cfg.read_error(e))?;
        let lost = |why: String| {
            StorageError::DataLoss(format!(
                "backup repository '{}': blob {} {why}",
                cfg.name.as_str(),
                id.to_hex().as_str()
            ))
        };
        // The backends answer what was asked or fail (a pack really shorter than its index
        // says is DATA_LOSS there): another length is the way to the store, not its content.
        if sealed.len() != loc.length as usize {
            return Err(StorageError::Unavailable(format!(
                "backup repository '{}': reading blob {} answered {} bytes, not its {}",
                cfg.name.as_str(),
                id.to_hex().as_str(),
                sealed.len(),
                loc.length
            )));
        }
        let plain = self
            .sealer
            .open(&sealed)
            .ok_or_else(|| lost("fails its MAC".to_string()))?;
        let Some(claimed) = loc.uncompressed_length else {
            return Ok(plain.into());
        };
        let bound = match tpe {
            BlobType::Data => u64::from(MAX_DATA_BLOB_BYTES),
            BlobType::Tree => u64::from(MAX_TREE_BLOB_BYTES),
        };
        if u64::from(claimed.get()) > bound {
            return Err(lost(format!(
                "decompresses to {} bytes, its index says: more than the {bound} restic, rustic or cellar \
                 ever write (whoever holds the repository's key made it)",
                claimed.get()
            )));
        }
        let data = zstd::bulk::decompress(&plain, claimed.get() as usize).map_err(|e| {
            lost(format!(
                "does not decompress to the {} bytes its index says: {e}",
                claimed.get()
            ))
        })?;
        if data.len() != claimed.get() as usize {
            return Err(lost(format!(
                "decompresses to {} bytes, its index says {}",
                data.len(),
                claimed.get()
            )));
        }
        Ok(data.into())
    }
}

/// A blob of the repository (data or tree), read and checked against its id: the SHA-256 of its
/// plaintext. The MAC rustic checks proves only that the repository's key sealed it. The blob is
/// read by [`BlobReader`], its decompression bounded (rustic's own read is not).
pub(crate) fn checked_blob<S: rustic_core::IndexedFull>(
    repo: &Repository<S>,
    cfg: &RepositoryConfig,
    id: rustic_core::BlobId,
    tpe: rustic_core::repofile::BlobType,
    raw: &BlobReader,
) -> Result<bytes::Bytes, StorageError> {
    use sha2::Digest;
    let data = raw.read(repo, cfg, id, tpe)?;
    let sum: [u8; 32] = sha2::Sha256::digest(&data).into();
    if hex::encode(sum) != id.to_hex().as_str() {
        let what = if tpe == rustic_core::repofile::BlobType::Tree {
            "tree"
        } else {
            "blob"
        };
        return Err(StorageError::DataLoss(format!(
            "backup repository '{}': {what} {} does not match its id",
            cfg.name.as_str(),
            id.to_hex().as_str()
        )));
    }
    Ok(data)
}

/// A tree of the repository, read and checked against its id: a tree's MAC only proves the
/// repository's key sealed it, so without this check a writer of the repository's storage (no key
/// needed) could swap two sealed trees of equal length and a restore would write one directory's
/// entries, or another backup's, under another's name. rustic's own `get_tree` does not check.
pub(crate) fn checked_tree<S: rustic_core::IndexedFull>(
    repo: &Repository<S>,
    cfg: &RepositoryConfig,
    id: rustic_core::TreeId,
    raw: &BlobReader,
) -> Result<rustic_core::repofile::Tree, StorageError> {
    let data = checked_blob(
        repo,
        cfg,
        rustic_core::BlobId::from(id),
        rustic_core::repofile::BlobType::Tree,
        raw,
    )?;
    serde_json::from_slice(&data).map_err(|e| {
        cfg.error(RusticFailure::data_loss(format!(
            "tree {} cannot be read: {e}",
            id.to_hex().as_str()
        )))
    })
}

/// Checks every tree below `root` (and `root`) against its id, reading them as rustic does
/// (`get_tree`, which needs only the trees' index) and hashing each one's serialization, which is
/// the bytes rustic wrote for it. Answers how many trees were read. For a parent backup, whose
/// trees rustic reads unchecked during an upload: trees swapped in their packs (no key needed)
/// would make a file whose name, size and modification time match reuse another file's chunks.
pub(crate) fn trees_check<S: rustic_core::IndexedTree>(
    repo: &Repository<S>,
    cfg: &RepositoryConfig,
    root: rustic_core::TreeId,
) -> Result<u64, StorageError> {
    let mut pending = vec![root];
    let mut read = 0u64;
    while let Some(id) = pending.pop() {
        let tree = repo.get_tree(&id).map_err(|e| cfg.read_error(e))?;
        let (_, actual) = tree.serialize().map_err(|e| {
            cfg.error(RusticFailure::data_loss(format!(
                "tree {} cannot be written back: {e}",
                id.to_hex().as_str()
            )))
        })?;
        if actual != id {
            return Err(StorageError::DataLoss(format!(
                "backup repository '{}': tree {} does not match its id",
                cfg.name.as_str(),
                id.to_hex().as_str()
            )));
        }
        read += 1;
        pending.extend(tree.nodes.iter().filter_map(|n| n.subtree));
    }
    Ok(read)
}

/// The path a tree's data has inside its restic snapshot: `restic restore <id> --target T`
/// writes `T/volume`. (An image keeps its file's name: rustic names a single file by it.)
pub const TREE_PATH: &str = "/volume";

/// A backup of the repository as CSI sees it: checked complete (not [`TAG_PENDING`]).
fn info_of(repo: &PoolName, s: &SnapshotFile) -> Option<BackupInfo> {
    if is_pending(s) {
        return None;
    }
    any_info_of(repo, s)
}

fn is_pending(s: &SnapshotFile) -> bool {
    s.tags.iter().any(|t| t == TAG_PENDING)
}

/// The backup a restic snapshot carries, whether checked or still pending.
fn any_info_of(repo: &PoolName, s: &SnapshotFile) -> Option<BackupInfo> {
    let key = s.tags.iter().find_map(|t| t.strip_prefix(TAG_KEY))?;
    let id = BackupId::new(repo.clone(), key).ok()?;
    let meta: BackupMeta = serde_json::from_str(s.description.as_deref()?).ok()?;
    Some(BackupInfo {
        id,
        meta,
        snapshot: s.id.to_string(),
        created_unix_secs: s.time.timestamp().as_second(),
        bytes: s.summary.as_ref().map_or(0, |x| x.total_bytes_processed),
    })
}

/// The repositories a process knows, opened on demand. Opening reads the keys and the config;
/// the first open of a repository that has none initialises it (only the controller does, so
/// that two nodes never initialise one repository twice).
pub struct Backups {
    repos: Vec<RepositoryConfig>,
    throttle: Arc<Throttle>,
    /// Serialises initialisation in this process.
    init: Mutex<()>,
    /// Each repository's master key once its password opened it: deriving it from the password
    /// (scrypt) costs a third of a CPU-second, every open after the first skips that.
    keys: Mutex<std::collections::HashMap<PoolName, rustic_core::repofile::MasterKey>>,
    /// Each repository's snapshot files as last listed: a listing then reads only the new ones
    /// (one request each on S3) instead of every one.
    listed: Mutex<std::collections::HashMap<PoolName, Vec<SnapshotFile>>>,
    /// Which deletion marks this process writes and honours ([`MarkTrust`]).
    marks: std::sync::RwLock<MarkTrust>,
}

/// Who vouches for deletion marks: a mark is a restic snapshot anyone holding the repository's
/// key can write, so in split mode over TLS the controller seals each mark it writes (signs the
/// backup id with its TLS key) and nodes honour only marks whose seal checks
/// (`agent::seal`, docs/security.md).
pub trait MarkAuthority: Send + Sync {
    /// The seal to write into a mark of backup `id`.
    fn seal(&self, id: &BackupId) -> Result<String, String>;
    /// Ok when `seal`, found on a mark of backup `id`, is the controller's; else why not.
    fn check(&self, id: &BackupId, seal: Option<&str>) -> Result<(), String>;
}

/// Which deletion marks count.
#[derive(Clone)]
pub enum MarkTrust {
    /// Marks are written unsealed and every mark counts: all-in-one, and split mode over
    /// plaintext (`--insecure`), where no party proves who it is.
    Unsealed,
    /// Not known yet (a node whose certificate is still to be enrolled): whether a mark counts
    /// cannot be told, and a look for one fails (UNAVAILABLE) until it is.
    NotYet,
    /// Only marks whose seal this authority accepts count; marks written carry its seal.
    Sealed(Arc<dyn MarkAuthority>),
}

/// The line of a mark's description that holds its seal.
const SEAL_LINE: &str = "cellar-seal: ";

impl Backups {
    pub fn new(repos: Vec<RepositoryConfig>, throttle: Arc<Throttle>) -> Backups {
        Backups {
            repos,
            throttle,
            init: Mutex::new(()),
            keys: Mutex::new(std::collections::HashMap::new()),
            listed: Mutex::new(std::collections::HashMap::new()),
            marks: std::sync::RwLock::new(MarkTrust::Unsealed),
        }
    }

    /// Sets which deletion marks this process writes and honours (unsealed until set).
    pub fn trust_marks(&self, trust: MarkTrust) {
        *self.marks.write().unwrap_or_else(|p| p.into_inner()) = trust;
    }

    fn mark_trust(&self) -> MarkTrust {
        self.marks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `snaps` hold a deletion mark of backup `id` that counts.
    fn honoured_mark(&self, trust: &MarkTrust, id: &BackupId, snaps: &[SnapshotFile]) -> Result<bool, StorageError> {
        let tag = format!("{TAG_DELETED}{}", id.key());
        for s in snaps.iter().filter(|s| s.tags.iter().any(|t| *t == tag)) {
            if self.honours(trust, id, s)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `mark`, a snapshot tagged as backup `id`'s deletion mark, counts; a mark whose
    /// seal does not check is logged and passed over.
    fn honours(&self, trust: &MarkTrust, id: &BackupId, mark: &SnapshotFile) -> Result<bool, StorageError> {
        let authority = match trust {
            MarkTrust::Unsealed => return Ok(true),
            MarkTrust::NotYet => {
                return Err(StorageError::Unavailable(format!(
                    "cannot tell whether backup {id} was deleted yet: the controller's deletion marks are checked with this node's certificate, which is not enrolled yet"
                )))
            }
            MarkTrust::Sealed(a) => a,
        };
        let seal = mark
            .description
            .as_deref()
            .and_then(|d| d.lines().find_map(|l| l.strip_prefix(SEAL_LINE)));
        match authority.check(id, seal) {
            Ok(()) => Ok(true),
            Err(why) => {
                tracing::warn!(backup = %id, mark = %mark.id, reason = %why, "a deletion mark not sealed by the controller passed over");
                Ok(false)
            }
        }
    }

    /// Every restic snapshot of repository `name`, opened as `repo`, reading only the files not
    /// read by an earlier listing of this process ([`snapshots_after`]).
    pub fn snapshots(&self, name: &PoolName, repo: &Open) -> rustic_core::RusticResult<Vec<SnapshotFile>> {
        let known = self
            .listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default();
        let snaps = snapshots_after(repo, known)?;
        self.listed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), snaps.clone());
        Ok(snaps)
    }

    pub fn names(&self) -> Vec<&PoolName> {
        self.repos.iter().map(|r| &r.name).collect()
    }

    pub fn config(&self, name: &PoolName) -> Result<&RepositoryConfig, StorageError> {
        self.repos.iter().find(|r| r.name == *name).ok_or_else(|| {
            let known: Vec<&str> = self.repos.iter().map(|r| r.name.as_str()).collect();
            StorageError::Unsupported(format!(
                "unknown backup repository '{}' (configured: {})",
                name.as_str(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// The repository's backends: paced, counted, bounded, and (given an upload's `stop`)
    /// refusing writes once the upload is called off.
    fn backends(
        &self,
        cfg: &RepositoryConfig,
        stop: Option<&upload::Stop>,
    ) -> Result<RepositoryBackends, StorageError> {
        Ok(self.keyed_backends(cfg, stop)?.0)
    }

    /// [`Self::backends`], and the slot their guard reads the master key from: filled with the
    /// key a password already gave, else by the caller once its open has found it.
    fn keyed_backends(
        &self,
        cfg: &RepositoryConfig,
        stop: Option<&upload::Stop>,
    ) -> Result<(RepositoryBackends, guard::KeySlot), StorageError> {
        if let Location::Path(p) = &cfg.location {
            // The directory may be made, never its parent: a share that is not mounted must
            // not turn into a backup on the node's own disk.
            let parent = p.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(StorageError::Unavailable(format!(
                    "backup repository '{}': {} does not exist (is the share mounted?)",
                    cfg.name.as_str(),
                    parent.display()
                )));
            }
        }
        let mut be = cfg.backend_options()?.to_backends().map_err(|e| cfg.error(e))?;
        match &cfg.location {
            Location::Path(p) => be = guard::local_reads(be, p),
            Location::S3(s3) => be = guard::s3_backends(be, s3_operator(cfg, s3)?),
        }
        // Paced inside, so that the guard's own reads of key files are paced and counted too.
        let be = self.throttle.wrap(be, cfg.name.as_str(), stop);
        let slot = guard::KeySlot::default();
        if let Some(key) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(&cfg.name) {
            let _ = slot.set(key.clone());
        }
        Ok((guard::wrap(be, cfg.name.as_str(), &slot), slot))
    }

    /// The repository's files, for writing them directly (`image`); paced like rustic's writes,
    /// and refused once `stop` is pulled.
    pub(crate) fn write_backend(
        &self,
        name: &PoolName,
        stop: Option<&upload::Stop>,
    ) -> Result<Arc<dyn rustic_core::WriteBackend>, StorageError> {
        Ok(self.backends(self.config(name)?, stop)?.repository())
    }

    fn options() -> RepositoryOptions {
        // No cache: several nodes write one repository, and a restore must read what is there.
        RepositoryOptions::default().no_cache(true)
    }

    /// Opens a repository that exists (nodes, listings): one that has no config yet is
    /// FAILED_PRECONDITION (the controller initialises it on the first backup).
    pub fn open(&self, name: &PoolName) -> Result<Open, StorageError> {
        self.open_or_init(name, false)
    }

    /// [`Self::open`] for an upload: every write through what it opens is refused once `stop`
    /// is pulled.
    pub fn open_stoppable(&self, name: &PoolName, stop: &upload::Stop) -> Result<Open, StorageError> {
        self.open_with(name, false, Some(stop))
    }

    /// Opens a repository, initialising it when it has no config yet.
    pub fn open_or_init(&self, name: &PoolName, init: bool) -> Result<Open, StorageError> {
        self.open_with(name, init, None)
    }

    fn open_with(&self, name: &PoolName, init: bool, stop: Option<&upload::Stop>) -> Result<Open, StorageError> {
        let opened = self.open_or_init_with_password(name, init, stop)?;
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), opened.key());
        Ok(opened)
    }

    /// Opens with the master key a password already gave, when there is one; a key that no
    /// longer opens the repository (it was made anew) is dropped and the password asked again.
    fn open_with_known_key(&self, name: &PoolName, stop: Option<&upload::Stop>) -> Option<Open> {
        let cfg = self.config(name).ok()?;
        let key = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()?;
        let opened = Repository::new(&Self::options(), &self.backends(cfg, stop).ok()?)
            .and_then(|r| r.open(&Credentials::Masterkey(key)));
        match opened {
            Ok(o) => Some(o),
            Err(_) => {
                self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                None
            }
        }
    }

    fn open_or_init_with_password(
        &self,
        name: &PoolName,
        init: bool,
        stop: Option<&upload::Stop>,
    ) -> Result<Open, StorageError> {
        if let Some(o) = self.open_with_known_key(name, stop) {
            return Ok(o);
        }
        let cfg = self.config(name)?;
        let password = std::fs::read_to_string(&cfg.password_file)
            .map_err(|e| cfg.refused(format!("passwordFile {}: {e}", cfg.password_file.display())))?;
        let password = password.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err(cfg.refused(format!("passwordFile {} is empty", cfg.password_file.display())));
        }
        let credentials = Credentials::password(&password);
        let (be, slot) = self.keyed_backends(cfg, stop)?;
        let keyed = |o: Open| {
            let _ = slot.set(o.key());
            o
        };
        let repo = Repository::new(&Self::options(), &be).map_err(|e| cfg.error(e))?;
        if repo.config_id().map_err(|e| cfg.error(e))?.is_some() {
            return repo.open(&credentials).map(keyed).map_err(|e| cfg.error(e));
        }
        if !init {
            return Err(cfg.refused("it has not been initialised yet (the first backup into it does that)"));
        }
        let _one = self.init.lock().unwrap_or_else(|p| p.into_inner());
        let repo = Repository::new(&Self::options(), &be).map_err(|e| cfg.error(e))?;
        if repo.config_id().map_err(|e| cfg.error(e))?.is_some() {
            return repo.open(&credentials).map(keyed).map_err(|e| cfg.error(e));
        }
        let _claim = claim::Claim::take(cfg, claim::Job::Init)?;
        // Another process may have finished between the look above and the claim.
        if repo.config_id().map_err(|e| cfg.error(e))?.is_some() {
            return repo.open(&credentials).map(keyed).map_err(|e| cfg.error(e));
        }
        tracing::info!(repository = cfg.name.as_str(), at = %cfg.describe(), "initialising the backup repository");
        let config = ConfigOptions::default().set_version(2u32);
        repo.init(&credentials, &KeyOptions::default(), &config)
            .map(keyed)
            .map_err(|e| cfg.error(e))
    }

    /// cellar's backups in a repository (other snapshots there are left alone).
    pub fn list(&self, name: &PoolName) -> Result<Vec<BackupInfo>, StorageError> {
        self.listing(name).map(|(listed, _)| listed)
    }

    /// [`Self::list`], and the backups marked deleted (by marks that count), from one read of
    /// the repository. A backup marked deleted is deleted: its uploader, not told, may still run
    /// and write its checked copy after the controller's forget, until it sees the mark and
    /// forgets it itself; neither it nor what it writes is listed.
    pub fn listing(
        &self,
        name: &PoolName,
    ) -> Result<(Vec<BackupInfo>, std::collections::HashSet<BackupId>), StorageError> {
        let cfg = self.config(name)?;
        let repo = self.open(name)?;
        let snaps = self.snapshots(name, &repo).map_err(|e| cfg.error(e))?;
        let deleted = self.marked(name, &snaps);
        let mut out: Vec<BackupInfo> = snaps
            .iter()
            .filter_map(|s| info_of(name, s))
            .filter(|b| !deleted.contains(&b.id))
            .collect();
        out.sort_by_key(|b| b.id.to_string());
        out.dedup_by(|a, b| a.id == b.id);
        Ok((out, deleted))
    }

    fn marked(&self, name: &PoolName, snaps: &[SnapshotFile]) -> std::collections::HashSet<BackupId> {
        let trust = self.mark_trust();
        snaps
            .iter()
            .filter_map(|s| {
                let key = s.tags.iter().find_map(|t| t.strip_prefix(TAG_DELETED))?;
                let id = BackupId::new(name.clone(), key).ok()?;
                self.honours(&trust, &id, s).unwrap_or(false).then_some(id)
            })
            .collect()
    }

    /// Every backup of a repository with whether it is still pending its completeness check (an
    /// upload under way, or one a crash or a failed check left for its retry): what `cellar
    /// backup list` shows. A backup held both checked and pending counts as checked.
    pub fn list_all(&self, name: &PoolName) -> Result<Vec<(BackupInfo, bool)>, StorageError> {
        let Some((_, snaps)) = self.any_snapshots(name)? else {
            return Ok(Vec::new());
        };
        let mut out: BTreeMap<String, (BackupInfo, bool)> = BTreeMap::new();
        for s in &snaps {
            let Some(info) = any_info_of(name, s) else { continue };
            let pending = is_pending(s);
            match out.get_mut(&info.id.to_string()) {
                Some(held) if held.1 && !pending => *held = (info, false),
                Some(_) => {}
                None => {
                    out.insert(info.id.to_string(), (info, pending));
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// A backup by its id; `None` when the repository has none with that key. A repository
    /// that was never initialised holds none.
    pub fn find(&self, id: &BackupId) -> Result<Option<BackupInfo>, StorageError> {
        match self.list(id.repository()) {
            Ok(all) => Ok(all.into_iter().find(|b| b.id == *id)),
            Err(StorageError::PoolUnusable(m)) if m.contains("not been initialised") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A backup by its id, also one still pending its completeness check (upload.rs): who holds
    /// an id, whether or not it is ready.
    pub fn find_even_pending(&self, id: &BackupId) -> Result<Option<BackupInfo>, StorageError> {
        Ok(self.any_snapshots(id.repository())?.and_then(|(_, snaps)| {
            snaps
                .iter()
                .filter_map(|s| any_info_of(id.repository(), s))
                .find(|b| b.id == *id)
        }))
    }

    /// Every restic snapshot of a repository, with the repository opened; `None` when it was
    /// never initialised (it holds none).
    fn any_snapshots(&self, name: &PoolName) -> Result<Option<(Open, Vec<SnapshotFile>)>, StorageError> {
        let cfg = self.config(name)?;
        let repo = match self.open(name) {
            Ok(r) => r,
            Err(StorageError::PoolUnusable(m)) if m.contains("not been initialised") => return Ok(None),
            Err(e) => return Err(e),
        };
        let snaps = self.snapshots(name, &repo).map_err(|e| cfg.error(e))?;
        Ok(Some((repo, snaps)))
    }

    /// The backup cut under a CSI snapshot name, if any.
    pub fn find_named(&self, repo: &PoolName, name: &str) -> Result<Option<BackupInfo>, StorageError> {
        match self.list(repo) {
            Ok(all) => Ok(all.into_iter().find(|b| b.meta.name == name)),
            Err(StorageError::PoolUnusable(m)) if m.contains("not been initialised") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Marks backup `id` deleted in its repository (see [`TAG_DELETED`]), unless a mark is
    /// there already. A repository not initialised holds no backup: nothing to mark.
    pub fn mark_deleted(&self, id: &BackupId) -> Result<(), StorageError> {
        let cfg = self.config(id.repository())?;
        let Some((repo, snaps)) = self.any_snapshots(id.repository())? else {
            return Ok(());
        };
        let tag = format!("{TAG_DELETED}{}", id.key());
        let trust = self.mark_trust();
        // A mark someone else wrote, which nodes would pass over, is no reason not to write one.
        if self.honoured_mark(&trust, id, &snaps)? {
            return Ok(());
        }
        let mut description =
            format!("cellar: backup {id} was deleted while a node that may hold part of it could not be told");
        match &trust {
            MarkTrust::Unsealed => {}
            MarkTrust::NotYet => {
                return Err(StorageError::Unavailable(format!(
                    "cannot mark backup {id} deleted yet: this process's certificate is not loaded"
                )))
            }
            MarkTrust::Sealed(a) => {
                let seal = a.seal(id).map_err(|e| {
                    StorageError::Unavailable(format!("cannot seal the deletion mark of backup {id}: {e}"))
                })?;
                description.push_str(&format!("\n{SEAL_LINE}{seal}"));
            }
        }
        // A snapshot needs a tree every tool can read: the empty one.
        let be = self.write_backend(id.repository(), None)?;
        let trees = image::store(be.clone(), &repo.key(), &[], &[rustic_core::repofile::Tree::default()])
            .map_err(|e| cfg.error(e))?;
        let mut mark = SnapshotOptions::default()
            .label("cellar".to_string())
            .add_tags(&tag)
            .and_then(|o| o.description(description).to_snapshot())
            .map_err(|e| cfg.error(e))?;
        mark.tree = trees[0];
        image::write_snapshot(&*be, &repo.key(), &mut mark).map_err(|e| cfg.error(e))?;
        tracing::info!(backup = %id, "deletion mark written for a node that could not be told");
        Ok(())
    }

    /// Whether backup `id` carries a deletion mark that counts ([`MarkTrust`]). A node asks
    /// about a backup it holds, so its repository was initialised: one that looks uninitialised
    /// (a share not mounted yet) cannot tell, and is an error.
    pub fn is_marked_deleted(&self, id: &BackupId) -> Result<bool, StorageError> {
        let cfg = self.config(id.repository())?;
        let repo = self.open(id.repository())?;
        let snaps = self.snapshots(id.repository(), &repo).map_err(|e| cfg.error(e))?;
        self.honoured_mark(&self.mark_trust(), id, &snaps)
    }

    /// Removes backup `id`'s deletion marks (the node that held its part has dropped it), and
    /// any mark older than [`DELETED_MARK_DAYS`].
    pub fn clear_deleted_marks(&self, id: Option<&BackupId>, repository: &PoolName) -> Result<(), StorageError> {
        let cfg = self.config(repository)?;
        let Some((repo, snaps)) = self.any_snapshots(repository)? else {
            return Ok(());
        };
        let now = rustic_core::jiff::Timestamp::now().as_second();
        let tag = id.map(|i| format!("{TAG_DELETED}{}", i.key()));
        let ids: Vec<_> = snaps
            .iter()
            .filter(|s| {
                s.tags.iter().any(|t| {
                    t.starts_with(TAG_DELETED)
                        && (tag.as_deref() == Some(t.as_str())
                            || now - s.time.timestamp().as_second() > DELETED_MARK_DAYS * 86_400)
                })
            })
            .map(|s| s.id)
            .collect();
        remove_snapshot_files(&repo, &ids).map_err(|e| cfg.error(e))
    }

    /// Forgets a backup: removes every restic snapshot carrying its key. Its data stays until a
    /// prune finds it unreferenced. Forgetting what is not there succeeds.
    pub fn forget(&self, id: &BackupId) -> Result<(), StorageError> {
        let cfg = self.config(id.repository())?;
        let Some((repo, snaps)) = self.any_snapshots(id.repository())? else {
            return Ok(());
        };
        let tag = format!("{TAG_KEY}{}", id.key());
        let ids: Vec<_> = snaps
            .iter()
            .filter(|s| s.tags.iter().any(|t| *t == tag))
            .map(|s| s.id)
            .collect();
        if !ids.is_empty() {
            remove_snapshot_files(&repo, &ids).map_err(|e| cfg.error(e))?;
            tracing::info!(backup = %id, snapshots = ids.len(), "backup forgotten; its data goes at the next prune");
        }
        Ok(())
    }
}

/// What `cellar backup verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// What a prune did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Packs found unused now, and so marked (removed by a later prune, once `keep_delete` has
    /// passed) unless written less than `keep_delete` ago (an upload under way may use them).
    pub packs_marked: u64,
    /// Packs removed now.
    pub packs_removed: u64,
    /// Packs repacked (partly used).
    pub packs_repacked: u64,
    /// Marked packs brought back: a backup uses them again.
    pub packs_recovered: u64,
}

impl Backups {
    /// Checks the repository's structure and, with `read_data`, reads and checks every pack:
    /// what `restic check --read-data` does.
    pub fn verify(&self, name: &PoolName, read_data: bool) -> Result<Verified, StorageError> {
        let cfg = self.config(name)?;
        let repo = self.open(name)?;
        let results = repo
            .check(rustic_core::CheckOptions::default().read_data(read_data))
            .map_err(|e| cfg.error(e))?;
        let mut out = Verified {
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        // rustic does not export the level's type; its name tells errors from warnings.
        for (level, e) in results.0 {
            if format!("{level:?}") == "Error" {
                out.errors.push(one_line(&e.to_string()));
            } else {
                out.warnings.push(one_line(&e.to_string()));
            }
        }
        Ok(out)
    }

    /// Removes data no backup references, in two phases so that an upload running meanwhile on
    /// another node never loses a blob it reuses: unused packs are first marked, and removed
    /// only by a prune at least `keep_delete` later (a backup that references a marked pack
    /// before then brings it back). `keep_delete` must be longer than the longest upload.
    ///
    /// A prune plans from the snapshots it lists, then writes its index: an upload that reused
    /// blobs of a pack and was checked complete between the two holds data only a marked pack
    /// has, which restores cannot read. So a prune that marked or repacked anything plans once
    /// more, with every unmarked pack kept: that pass only brings back marked packs a backup
    /// listed by now uses (an upload checked after the first pass's index finds its blobs
    /// missing and uploads them again).
    ///
    /// One prune at a time per repository, in any process on any machine ([`claim`]): one
    /// beside another worked from an index the other had rewritten, failed UNAVAILABLE removing
    /// files the other had removed, and left entries of packs already gone that failed the next
    /// prune too. Another prune of the repository under way is ABORTED; nothing is changed.
    pub fn prune(&self, name: &PoolName, keep_delete: std::time::Duration) -> Result<Pruned, StorageError> {
        let cfg = self.config(name)?;
        // Opened first: a repository not initialised yet is refused as before, with no claim
        // written into it.
        self.open(name)?;
        let _claim = claim::Claim::take(cfg, claim::Job::Prune)?;
        let span = rustic_core::jiff::Span::new().seconds(keep_delete.as_secs() as i64);
        // Packs younger than `keep_delete` are not marked either: an upload running meanwhile on
        // another node has indexed packs its snapshot does not name yet, and a marked blob is in
        // no index its check reads (it would start over, and one longer than the prune interval
        // would never end).
        let opts = rustic_core::PruneOptions::default().keep_delete(span).keep_pack(span);
        if let Err(e) = self.clear_deleted_marks(None, name) {
            tracing::warn!(repository = name.as_str(), error = %e, "old deletion marks not removed; the next prune tries again");
        }
        // A snapshot file going away while the plan reads them (an upload's pending copy, replaced
        // by its checked one): plan again, as the recover passes below do.
        let mut tries = 1;
        let (repo, plan) = loop {
            let repo = self.open(name)?;
            match repo.prune_plan(&opts) {
                Ok(plan) => break (repo, plan),
                Err(e) if tries < 10 && is_not_found(&e) => tries += 1,
                Err(e) => return Err(cfg.error(e)),
            }
        };
        let stats = &plan.stats;
        let mut done = Pruned {
            packs_marked: stats.packs.unused,
            packs_removed: stats.packs_to_delete.remove,
            packs_repacked: plan.repack_packs().len() as u64,
            packs_recovered: stats.packs_to_delete.recover,
        };
        crate::crash::point("backup:prune-planned");
        repo.prune(&opts, plan).map_err(|e| cfg.error(e))?;
        // Recover passes: every pack with a time is young enough to be kept and nothing is
        // repacked, so they only bring back marked packs a backup listed by now uses, and mark
        // packs no time protects (written by a tool that records none) that nothing uses. A pass
        // that marked such packs has the first pass's window, so another pass follows it.
        let recover = recover_options(span).map_err(|e| cfg.error(e))?;
        let mut marked = done.packs_marked + done.packs_repacked > 0;
        tries = 1;
        while marked {
            let repo = self.open(name)?;
            let planned = repo.prune_plan(&recover).and_then(|plan| {
                let stats = &plan.stats;
                let pass = (
                    stats.blobs_sum().remove > 0,
                    stats.packs_to_delete.recover,
                    stats.packs_to_delete.remove,
                );
                repo.prune(&recover, plan).map(|()| pass)
            });
            match planned {
                Ok((again, recovered, removed)) => {
                    done.packs_recovered += recovered;
                    done.packs_removed += removed;
                    marked = again && tries < 10;
                }
                // A snapshot file going away while the prune reads them (an upload's
                // pending copy): plan again.
                Err(e) if tries < 10 && is_not_found(&e) => {}
                Err(e) => return Err(cfg.error(e)),
            }
            tries += 1;
        }
        match &cfg.location {
            Location::Path(root) => {
                remove_stale_temps(root, keep_delete);
                remove_orphan_packs(root, keep_delete);
            }
            Location::S3(s3) => remove_orphan_s3_packs(cfg, s3, keep_delete),
        }
        tracing::info!(
            repository = name.as_str(),
            marked = done.packs_marked,
            removed = done.packs_removed,
            repacked = done.packs_repacked,
            recovered = done.packs_recovered,
            "backup repository pruned"
        );
        Ok(done)
    }
}

/// The options of a prune's recover passes: every pack with a time is young, nothing is repacked.
fn recover_options(keep_delete: rustic_core::jiff::Span) -> rustic_core::RusticResult<rustic_core::PruneOptions> {
    Ok(rustic_core::PruneOptions::default()
        .keep_delete(keep_delete)
        .keep_pack(rustic_core::jiff::Span::new().hours(100 * 365 * 24))
        .max_repack("0".parse::<rustic_core::LimitOption>()?))
}

impl Backups {
    /// Prunes every repository in the background, on `schedule`, for as long as `self` lives.
    pub fn start_pruner(self: &Arc<Self>, schedule: cli::PruneSchedule) {
        if schedule.backup_prune_every == 0 || self.repos.is_empty() {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = std::time::Duration::from_secs(schedule.backup_prune_every);
        let keep = std::time::Duration::from_secs(schedule.backup_keep_delete);
        let _ = std::thread::Builder::new()
            .name("cellar-prune".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(backups) = weak.upgrade() else { return };
                for r in &backups.repos {
                    match backups.prune(&r.name, keep) {
                        Ok(_) => {}
                        Err(StorageError::PoolUnusable(m)) if m.contains("not been initialised") => {}
                        // Another replica's pruner, or `cellar backup prune`, is at it.
                        Err(StorageError::Busy(m)) => {
                            tracing::info!(repository = r.name.as_str(), reason = %m, "background prune left to the other prune")
                        }
                        Err(e) => {
                            tracing::warn!(repository = r.name.as_str(), error = %e, "background prune failed; next time")
                        }
                    }
                }
            });
    }
}

/// Whether something written at `written` is at least `age` old (an unknown time is not).
fn aged(written: Option<std::time::SystemTime>, age: std::time::Duration) -> bool {
    written.and_then(|t| t.elapsed().ok()).is_some_and(|a| a >= age)
}

/// rustic's prune stops early ("nothing to do") in a repository without an index file, before it
/// marks the packs no index names: the packs of uploads killed or called off before any upload
/// into it wrote its index would stay for good. With no index (and no snapshot file, so that a
/// repository that lost its index files keeps its data for a repair) nothing can use them, so
/// those older than `keep_delete` (an upload under way writes its index within that time, as the
/// two-phase prune already asks) go here. A `path` repository by its file times; S3 in
/// [`remove_orphan_s3_packs`].
fn remove_orphan_packs(root: &Path, keep_delete: std::time::Duration) {
    // Nor a snapshot file: a repository whose index files went (restic's `repair index` can
    // rebuild them) keeps every pack.
    let holds = |dir: &str| std::fs::read_dir(root.join(dir)).is_ok_and(|mut d| d.next().is_some());
    if holds("index") || holds("snapshots") {
        return;
    }
    // Whoever can write the share can put a symlink in a bucket's or a pack's place: each
    // directory is opened without following one (and read through that descriptor), and only
    // regular files named as packs are removed, so nothing outside the repository is.
    use crate::sys::files::PinnedDir;
    let Ok(data) = PinnedDir::open_beneath(root, Path::new("data")) else {
        return;
    };
    let Ok(buckets) = std::fs::read_dir(data.proc_path()) else {
        return;
    };
    for bucket in buckets.flatten() {
        let Ok(pinned) = PinnedDir::open_beneath(root, &Path::new("data").join(bucket.file_name())) else {
            continue;
        };
        let Ok(packs) = std::fs::read_dir(pinned.proc_path()) else {
            continue;
        };
        for e in packs.flatten() {
            let pack_name = e
                .file_name()
                .to_str()
                .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
            if !pack_name || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if !aged(e.metadata().ok().and_then(|m| m.modified().ok()), keep_delete) {
                continue;
            }
            match std::fs::remove_file(pinned.proc_path().join(e.file_name())) {
                Ok(()) => {
                    tracing::info!(pack = %root.join("data").join(bucket.file_name()).join(e.file_name()).display(), "removed a pack no index names, in a repository without one")
                }
                Err(err) => {
                    tracing::warn!(pack = %root.join("data").join(bucket.file_name()).join(e.file_name()).display(), error = %err, "cannot remove an orphan pack")
                }
            }
        }
    }
}

/// [`remove_orphan_packs`] of an S3 repository, by the times its listing carries (an object
/// listed without one is asked for it). What cannot be listed or removed is logged and left to
/// the next prune.
fn remove_orphan_s3_packs(cfg: &RepositoryConfig, s3: &S3, keep_delete: std::time::Duration) {
    let name = cfg.name.as_str();
    let op = match s3_operator(cfg, s3) {
        Ok(op) => op,
        Err(e) => return tracing::warn!(repository = name, error = %e, "cannot look for orphan packs"),
    };
    let files = |dir: &str| {
        let all = opendal::options::ListOptions {
            recursive: true,
            ..Default::default()
        };
        op.list_options(dir, all)
            .map(|l| l.into_iter().filter(|e| e.metadata().is_file()).collect::<Vec<_>>())
    };
    for dir in ["index/", "snapshots/"] {
        match files(dir) {
            Ok(found) if found.is_empty() => {}
            Ok(_) => return,
            Err(e) => return tracing::warn!(repository = name, error = %e, "cannot look for orphan packs"),
        }
    }
    let packs = match files("data/") {
        Ok(p) => p,
        Err(e) => return tracing::warn!(repository = name, error = %e, "cannot look for orphan packs"),
    };
    for e in packs {
        let written = e
            .metadata()
            .last_modified()
            .or_else(|| op.stat(e.path()).ok().and_then(|m| m.last_modified()));
        if !aged(written.map(std::time::SystemTime::from), keep_delete) {
            continue;
        }
        match op.delete(e.path()) {
            Ok(()) => {
                tracing::info!(
                    repository = name,
                    pack = e.path(),
                    "removed a pack no index names, in a repository without one"
                )
            }
            Err(err) => {
                tracing::warn!(repository = name, pack = e.path(), error = %err, "cannot remove an orphan pack")
            }
        }
    }
}

/// Files a killed write left in a path repository: the local backend writes `<name>-tmp-` and
/// renames it. One older than `keep_delete` belongs to no running upload (uploads finish within
/// it, as for marked packs) and goes.
fn remove_stale_temps(root: &Path, keep_delete: std::time::Duration) {
    // Directories are opened without following a symlink, at every step from the root: one
    // swapped for a symlink mid-walk is not entered (as in `remove_orphan_packs`).
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let Ok(pinned) = crate::sys::files::PinnedDir::open_beneath(root, &rel) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(pinned.proc_path()) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let name = e.file_name();
            if meta.is_dir() {
                dirs.push(rel.join(&name));
            } else if meta.is_file()
                && name.to_string_lossy().ends_with("-tmp-")
                && aged(meta.modified().ok(), keep_delete)
            {
                match std::fs::remove_file(pinned.proc_path().join(&name)) {
                    Ok(()) => {
                        tracing::info!(file = %root.join(&rel).join(&name).display(), "removed a write a killed upload left")
                    }
                    Err(err) => {
                        tracing::warn!(file = %root.join(&rel).join(&name).display(), error = %err, "cannot remove a stale temporary file")
                    }
                }
            }
        }
    }
}

/// The runtime opendal's blocking operators of cellar's own S3 reads run on (as rustic's own backend does).
fn s3_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cellar-s3")
            .enable_all()
            .build()
            .expect("a runtime for cellar's S3 reads")
    })
}

/// An S3 repository's objects, as cellar reads them itself (its init claim, orphan packs),
/// below the repository's prefix.
fn s3_operator(cfg: &RepositoryConfig, s3: &S3) -> Result<opendal::blocking::Operator, StorageError> {
    let options = cfg.s3_options(s3)?;
    let _in = s3_runtime().enter();
    opendal::Operator::via_iter("s3", options)
        .and_then(|op| {
            // No request waits for ever on a store that took it and never answers; one that
            // did not answer in time is tried again like a store's passing failure (500, 503),
            // as rustic's backend does those.
            let bound = std::time::Duration::from_secs(s3.timeout_seconds.unwrap_or(S3_TIMEOUT_SECONDS).max(1));
            let op = op
                .layer(
                    opendal::layers::TimeoutLayer::new()
                        .with_timeout(bound)
                        .with_io_timeout(bound),
                )
                .layer(opendal::layers::RetryLayer::new().with_max_times(2).with_jitter());
            opendal::blocking::Operator::new(op)
        })
        .map_err(|e| {
            StorageError::Unavailable(format!(
                "backup repository '{}' ({}) cannot be reached: {e}",
                cfg.name.as_str(),
                cfg.describe()
            ))
        })
}

/// The id a snapshot gets when it is also a backup.
pub fn snapshot_id_of(repo: &PoolName, key: &str) -> Result<BackupId, StorageError> {
    BackupId::new(repo.clone(), key).map_err(|e| StorageError::Unsupported(e.0))
}

/// A volume id as a backup names its source (for ListSnapshots' source filter).
pub fn source_of(info: &BackupInfo) -> Option<VolumeId> {
    VolumeId::parse(&info.meta.source_volume_id).ok()
}

/// What the module's unit tests share: a repository in a directory, and a `dir` backup's meta.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Backups of one repository `offsite` under `dir` (not initialised).
    pub fn backups(dir: &Path) -> (Backups, PoolName) {
        let cfg = repository(dir);
        let name = cfg.name.clone();
        (Backups::new(vec![cfg], Throttle::unlimited()), name)
    }

    /// The repository `offsite` under `dir`, with its password file.
    pub fn repository(dir: &Path) -> RepositoryConfig {
        let password = dir.join("password");
        std::fs::write(&password, "a key that is long enough\n").unwrap();
        RepositoryConfig {
            name: PoolName::parse("offsite").unwrap(),
            location: Location::Path(dir.join("repo")),
            password_file: password,
        }
    }

    /// A directory `data` under `dir` holding one file `f` of `bytes`: a volume's data to back up.
    pub fn data_dir(dir: &Path, bytes: &[u8]) -> PathBuf {
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("f"), bytes).unwrap();
        data
    }

    /// Uploads `data` into repository `name` as backup `key` of a `dir` volume's snapshot named
    /// `csi_name`.
    pub fn upload_dir(b: &Backups, name: &PoolName, key: &str, csi_name: &str, data: &Path) -> BackupId {
        let id = BackupId::new(name.clone(), key).unwrap();
        upload::upload(b, &id, &dir_meta(csi_name), data, None, &Default::default()).unwrap();
        id
    }

    /// The meta of a `dir` volume's backup named `name`.
    pub fn dir_meta(name: &str) -> BackupMeta {
        BackupMeta {
            name: name.into(),
            source_volume_id: "local:node-1:default:pvc-1".into(),
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 1 << 20,
            fs_bytes: 0,
            length: 0,
            node: "node-1".into(),
            path: TREE_PATH.into(),
            root: None,
            chunk_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustic_core::repofile::SnapshotId;

    use super::*;

    /// One junk file in `snapshots/` (anyone who can write the storage, no key) fails its MAC:
    /// rustic failed the whole listing for it, and every lookup of every backup with it. It is
    /// left out now, by a process that knew the repository's snapshots before and by a fresh one.
    #[test]
    fn a_junk_snapshot_file_is_left_out_not_fatal_to_every_listing() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let data = testing::data_dir(dir.path(), b"kept");
        let id = testing::upload_dir(&b, &name, "aaaa-0001", "snap-1", &data);
        let junk = dir.path().join("repo/snapshots").join(format!("{:064x}", 1));
        std::fs::write(&junk, b"written by someone without the key").unwrap();
        let (fresh, _) = testing::backups(dir.path());
        assert!(
            matches!(fresh.find(&id), Ok(Some(_))),
            "a fresh process finds the backup"
        );
        assert!(matches!(b.find(&id), Ok(Some(_))), "one that listed before finds it");
        assert_eq!(fresh.list(&name).unwrap().len(), 1);
        // Once removed, the listing is rustic's own again.
        std::fs::remove_file(&junk).unwrap();
        assert_eq!(fresh.list(&name).unwrap().len(), 1);
    }

    /// A delete marks for a node not reached, for the unasked node that cut a stored backup
    /// (never for a shared volume's, which names no node), and for a backup nothing stores or
    /// holds; not when every node that may hold a part was told.
    #[test]
    fn a_delete_marks_exactly_when_a_node_that_may_hold_a_part_was_not_told() {
        let info = |source: &str| BackupInfo {
            id: BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").unwrap(),
            meta: BackupMeta {
                source_volume_id: source.into(),
                ..testing::dir_meta("snap")
            },
            snapshot: "0".into(),
            created_unix_secs: 0,
            bytes: 0,
        };
        let local = info("local:node-1:default:pvc-1");
        let shared = info("shared:share:pvc-1");
        let node_1 = |n: &NodeId| n.as_str() == "node-1";
        let nobody = |_: &NodeId| false;
        assert!(!delete_needs_mark(Some(&local), false, node_1, false));
        assert!(
            delete_needs_mark(Some(&local), true, node_1, false),
            "a node not reached"
        );
        assert!(
            delete_needs_mark(Some(&local), false, nobody, true),
            "its cutter not asked"
        );
        assert!(
            !delete_needs_mark(Some(&shared), false, nobody, false),
            "a shared volume's"
        );
        assert!(
            delete_needs_mark(None, false, node_1, false),
            "nothing stored, nothing held"
        );
        assert!(!delete_needs_mark(None, false, nobody, true), "nothing stored, held");
    }

    /// Saves `rounds` snapshots like `like` one after the other, each removed right after it is
    /// saved (as an upload replaces its pending copy), then sets `done`.
    fn churn(b: &Backups, name: &PoolName, rounds: usize, like: &SnapshotFile, done: &AtomicBool) {
        let repo = b.open(name).unwrap();
        for i in 0..rounds {
            let before: Vec<SnapshotId> = repo.list().unwrap().collect();
            let churn = SnapshotFile {
                description: Some(format!("churn {i}")),
                ..like.clone()
            };
            repo.save_snapshots(vec![churn]).unwrap();
            let new: Vec<SnapshotId> = repo.list().unwrap().filter(|id| !before.contains(id)).collect();
            repo.delete_snapshots(&new).unwrap();
        }
        done.store(true, Ordering::SeqCst);
    }

    /// An upload removes its pending snapshot when it is checked, and a forget removes snapshots,
    /// while other calls list the repository: a snapshot file removed between the listing and its
    /// read is skipped, not an error (GetSnapshot answered UNAVAILABLE before).
    #[test]
    fn a_snapshot_removed_while_listing_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let keep = SnapshotFile {
            description: Some("kept".into()),
            ..Default::default()
        };
        b.open(&name).unwrap().save_snapshots(vec![keep]).unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| churn(&b, &name, 150, &SnapshotFile::default(), &done));
            let repo = b.open(&name).unwrap();
            let mut reads = 0;
            while !done.load(Ordering::SeqCst) {
                let snaps = b
                    .snapshots(&name, &repo)
                    .expect("a listing while snapshots come and go");
                assert!(snaps.iter().any(|s| s.description.as_deref() == Some("kept")));
                reads += 1;
            }
            assert!(reads > 0);
        });
    }

    /// The same while a prune plans: it lists the snapshot files, then reads each, and an
    /// upload's pending copy replaced by its checked one meanwhile failed the whole prune
    /// UNAVAILABLE (found by the randomized tester's racing backup run, seed 38).
    /// A pack an upload killed (or called off) before any upload wrote an index left: rustic's
    /// prune does nothing in a repository without an index, so it stayed for good (the
    /// through-driver tester's seed 108 found one at teardown). A young one stays.
    #[test]
    fn a_pack_left_in_a_repository_without_an_index_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = dir.path().join("repo");
        let bucket = repo.join("data").join("ab");
        std::fs::create_dir_all(&bucket).unwrap();
        let pack = bucket.join(format!("ab{}", "0".repeat(62)));
        std::fs::write(&pack, vec![1u8; 4096]).unwrap();
        b.prune(&name, std::time::Duration::from_secs(3600)).expect("prune");
        assert!(pack.exists(), "a young pack stays (an upload may be writing its index)");
        b.prune(&name, std::time::Duration::ZERO).expect("prune");
        assert!(!pack.exists(), "a pack no index names goes");
    }

    /// Whoever can write the share (no key needed) puts symlinks in a bucket's, a pack's or a
    /// directory's place: the prune's sweeps remove nothing they lead to (the bucket link used to
    /// be followed and every file behind it removed, as root), and no FIFO or foreign name.
    #[test]
    fn the_prunes_sweeps_never_follow_a_symlink_out_of_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = dir.path().join("repo");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let precious = outside.join(format!("cd{}", "1".repeat(62)));
        let precious_temp = outside.join("notes-tmp-");
        std::fs::write(&precious, b"not the repository's").unwrap();
        std::fs::write(&precious_temp, b"not the repository's").unwrap();
        std::fs::create_dir_all(repo.join("data").join("ab")).unwrap();
        // (The repository's init made every bucket.)
        std::fs::remove_dir(repo.join("data").join("cd")).unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("data").join("cd")).unwrap();
        std::os::unix::fs::symlink(
            &precious,
            repo.join("data").join("ab").join(format!("ab{}", "2".repeat(62))),
        )
        .unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("index-link")).unwrap();
        let fifo = repo.join("data").join("ab").join(format!("ab{}", "3".repeat(62)));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let honest = repo.join("data").join("ab").join(format!("ab{}", "4".repeat(62)));
        std::fs::write(&honest, vec![1u8; 4096]).unwrap();
        b.prune(&name, std::time::Duration::ZERO).expect("prune");
        assert!(precious.exists(), "a file behind a bucket's or a pack's symlink stays");
        assert!(
            precious_temp.exists(),
            "a temporary name behind a directory's symlink stays"
        );
        assert!(fifo.exists(), "only regular files are packs");
        assert!(!honest.exists(), "the orphan pack itself goes");
    }

    /// A repository that holds snapshot files but lost its index files keeps every pack: a
    /// `restic repair index` can rebuild the index from them. rustic's prune refuses it (a tree
    /// in no index), and the orphan rule above also stands aside whenever a snapshot file exists
    /// (a review asked for both: with the rule alone it would take every backup's data).
    #[test]
    fn a_repository_with_snapshots_but_no_index_keeps_its_packs() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let data = testing::data_dir(dir.path(), b"a live backup");
        testing::upload_dir(&b, &name, "3333-cccc", "live", &data);
        let repo = dir.path().join("repo");
        for index in std::fs::read_dir(repo.join("index")).unwrap() {
            std::fs::remove_file(index.unwrap().path()).unwrap();
        }
        let packs = |root: &Path| -> usize {
            std::fs::read_dir(root.join("data"))
                .unwrap()
                .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
                .sum()
        };
        let before = packs(&repo);
        assert!(before > 0, "the backup wrote packs");
        let refused = b.prune(&name, std::time::Duration::ZERO);
        assert!(refused.is_err(), "the prune says the index is missing: {refused:?}");
        assert_eq!(packs(&repo), before, "no pack goes while snapshot files name the data");
    }

    #[test]
    fn a_snapshot_removed_while_a_prune_plans_does_not_fail_it() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let data = testing::data_dir(dir.path(), b"kept");
        testing::upload_dir(&b, &name, "1111-aaaa", "kept", &data);
        let stored = b.snapshots(&name, &b.open(&name).unwrap()).unwrap()[0].clone();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| churn(&b, &name, 600, &stored, &done));
            let mut prunes = 0;
            while !done.load(Ordering::SeqCst) {
                b.prune(&name, std::time::Duration::from_secs(3600))
                    .expect("a prune while snapshots come and go");
                prunes += 1;
            }
            assert!(prunes > 0);
        });
    }

    /// A backup whose deletion mark is written is no longer listed nor found, though the
    /// uploader that could not be told may still write its checked copy after the controller's
    /// forget, until it sees the mark and forgets it itself (ListSnapshots listed a deleted backup
    /// for that moment).
    #[test]
    fn a_backup_marked_deleted_is_neither_listed_nor_found() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let data = testing::data_dir(dir.path(), b"deleted while it uploads");
        let gone = testing::upload_dir(&b, &name, "1111-aaaa", "gone", &data);
        let kept = testing::upload_dir(&b, &name, "2222-bbbb", "kept", &data);
        b.mark_deleted(&gone).unwrap();
        let listed: Vec<BackupId> = b.list(&name).unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(
            listed,
            std::slice::from_ref(&kept),
            "only the backup not marked is listed"
        );
        assert!(b.find(&gone).unwrap().is_none(), "a marked backup is not found");
        assert!(b.find(&kept).unwrap().is_some());
        // Its uploader forgets it and removes the mark: nothing of it is left to list.
        b.forget(&gone).unwrap();
        b.clear_deleted_marks(Some(&gone), &name).unwrap();
        assert!(b.find(&gone).unwrap().is_none());
        assert_eq!(b.list(&name).unwrap().len(), 1);
    }

    /// Two processes removing one snapshot file (a mark cleared by the uploader that consumed it
    /// and by the controller replica that wrote it, found by the racing backup run): the one
    /// that comes second finds it gone as asked, and still removes the others it names.
    #[test]
    fn a_snapshot_file_another_process_removed_is_gone_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = b.open(&name).unwrap();
        let file = |d: &str| SnapshotFile {
            description: Some(d.into()),
            ..Default::default()
        };
        repo.save_snapshots(vec![file("first"), file("second")]).unwrap();
        let ids: Vec<SnapshotId> = repo.list().unwrap().collect();
        assert_eq!(ids.len(), 2);
        repo.delete_snapshots(&ids[..1]).unwrap();
        remove_snapshot_files(&repo, &ids).expect("one already gone is no failure");
        assert_eq!(
            repo.list::<SnapshotId>().unwrap().count(),
            0,
            "the other is removed too"
        );
        remove_snapshot_files(&repo, &ids).expect("all gone already");
    }

    /// A listing reads only the snapshot files an earlier one did not (they never change), and
    /// drops the ones no longer there.
    #[test]
    fn a_listing_reads_only_new_snapshot_files() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let repo = b.open(&name).unwrap();
        let one = |d: &str| SnapshotFile {
            description: Some(d.into()),
            ..Default::default()
        };
        repo.save_snapshots(vec![one("first")]).unwrap();
        assert_eq!(b.snapshots(&name, &repo).unwrap().len(), 1);
        // The file read already is made unreadable: a listing that read it again would fail.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("repo/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for f in &files {
            std::fs::write(f, b"not a snapshot any more").unwrap();
        }
        repo.save_snapshots(vec![one("second")]).unwrap();
        let mut got: Vec<String> = b
            .snapshots(&name, &repo)
            .unwrap()
            .into_iter()
            .filter_map(|s| s.description)
            .collect();
        got.sort();
        assert_eq!(got, ["first", "second"]);
        let (fresh, _) = testing::backups(dir.path());
        let theirs: Vec<String> = fresh
            .snapshots(&name, &repo)
            .expect("a file failing its check is left out")
            .into_iter()
            .filter_map(|s| s.description)
            .collect();
        assert_eq!(theirs, ["second"], "a listing of its own reads every file");
        for f in &files {
            std::fs::remove_file(f).unwrap();
        }
        let left: Vec<_> = b
            .snapshots(&name, &repo)
            .unwrap()
            .into_iter()
            .filter_map(|s| s.description)
            .collect();
        assert_eq!(left, ["second"], "a removed file is no longer listed");
    }

    /// A prune plans from the backups it lists, then rewrites the index: an upload that ends
    /// between the two can reuse blobs of packs the prune then marks unused. The backup must
    /// restore all the same, at once and after later prunes (it answered DATA_LOSS until the next
    /// scheduled prune before).
    #[test]
    fn a_backup_made_while_a_prune_marks_its_blobs_stays_restorable() {
        use crate::crash::in_thread;
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        let b = std::sync::Arc::new(b);
        b.open_or_init(&name, true).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let bytes: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(data.join("f"), &bytes).unwrap();
        let old = BackupId::new(name.clone(), "1111-aaaa").unwrap();
        upload::upload(&b, &old, &testing::dir_meta("old"), &data, None, &Default::default()).unwrap();
        b.forget(&old).unwrap();
        // The prune lists no backup, so every pack is unused; it waits before it writes. It marks
        // only packs older than its keep-delete (younger ones may be an upload's under way): the
        // old backup's are made older than that first.
        std::thread::sleep(std::time::Duration::from_secs(3));
        let pause = std::sync::Arc::new(in_thread::Pause::default());
        let pruning = {
            let (b, name, pause) = (b.clone(), name.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("backup:prune-planned", pause)));
                b.prune(&name, std::time::Duration::from_secs(2))
            })
        };
        assert!(pause.reached(std::time::Duration::from_secs(60)), "the prune planned");
        let new = BackupId::new(name.clone(), "2222-bbbb").unwrap();
        upload::upload(&b, &new, &testing::dir_meta("new"), &data, None, &Default::default())
            .expect("upload beside the prune");
        pause.release();
        let pruned = pruning.join().unwrap().expect("prune");
        assert!(
            pruned.packs_marked > 0,
            "the prune marked the old backup's packs: {pruned:?}"
        );
        let restored = |when: &str| {
            let frames: Vec<crate::storage::transfer::Frame> = restore::frames(&b, &new, Layout::Dir)
                .and_then(|f| f.collect())
                .unwrap_or_else(|e| panic!("restore {when}: {e}"));
            let got: Vec<u8> = frames
                .iter()
                .filter_map(|f| match f {
                    crate::storage::transfer::Frame::Chunk { data, .. } => Some(data.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert!(
                got == bytes,
                "restore {when}: {} bytes, want {}",
                got.len(),
                bytes.len()
            );
        };
        assert!(
            pruned.packs_recovered > 0,
            "the prune marked a pack the new backup uses, then brought it back: {pruned:?}"
        );
        restored("right after the prune");
        // Later prunes, even with nothing kept marked, leave it whole.
        b.prune(&name, std::time::Duration::ZERO).unwrap();
        b.prune(&name, std::time::Duration::ZERO).unwrap();
        restored("after two more prunes");
    }

    /// Two prunes of one repository at once (two controller replicas' pruners, or one and
    /// `cellar backup prune`): the second worked from an index the first had rewritten, failed
    /// UNAVAILABLE ("cannot be reached") removing what the first had removed, and left entries
    /// of packs already gone that failed the next prune too. Now the one that comes second while
    /// the other holds the repository is ABORTED and changes nothing.
    #[test]
    fn a_prune_while_another_prunes_is_aborted_and_changes_nothing() {
        use crate::crash::in_thread;
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        let b = Arc::new(b);
        b.open_or_init(&name, true).unwrap();
        let data = testing::data_dir(dir.path(), b"forgotten data");
        let old = testing::upload_dir(&b, &name, "1111-aaaa", "old", &data);
        b.forget(&old).unwrap();
        let pause = Arc::new(in_thread::Pause::default());
        let first = {
            let (b, name, pause) = (b.clone(), name.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("backup:prune-planned", pause)));
                b.prune(&name, std::time::Duration::ZERO)
            })
        };
        assert!(
            pause.reached(std::time::Duration::from_secs(60)),
            "the first prune planned"
        );
        let files = || {
            let mut all = Vec::new();
            let mut dirs = vec![dir.path().join("repo")];
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    match e.file_type().unwrap().is_dir() {
                        true => dirs.push(e.path()),
                        false => all.push(e.path()),
                    }
                }
            }
            all.sort();
            all
        };
        let before = files();
        // Another process's view of the repository.
        let (other, _) = testing::backups(dir.path());
        match other.prune(&name, std::time::Duration::ZERO) {
            Err(StorageError::Busy(m)) => assert!(m.contains("another process is pruning it"), "{m}"),
            done => panic!("a prune while another prunes: want ABORTED, got {done:?}"),
        }
        assert_eq!(files(), before, "the refused prune changed nothing");
        pause.release();
        let pruned = first.join().unwrap().expect("the first prune");
        assert!(pruned.packs_marked > 0, "the first prune did its work: {pruned:?}");
        other.prune(&name, std::time::Duration::ZERO).expect("the next prune");
        assert!(
            other.verify(&name, true).unwrap().errors.is_empty(),
            "the repository checks clean"
        );
    }

    /// A process killed while initialising a path repository leaves its claim file: the next
    /// first backup takes it over instead of answering ABORTED for ever. A claim that is held is
    /// still respected.
    #[test]
    fn a_claim_left_by_a_killed_init_is_taken_over() {
        use crate::sys::files::Files;
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        let claim = dir.path().join(".repo.cellar-init");
        let held = crate::sys::files::LinuxFiles.lock_while_held(&claim).unwrap().unwrap();
        match b.open_or_init(&name, true) {
            Err(StorageError::Busy(m)) => assert!(m.contains("initialising"), "{m}"),
            other => panic!("a held claim: want ABORTED, got {:?}", other.map(|_| ())),
        }
        drop(held);
        // What a killed process leaves: the file, without a lock.
        std::fs::write(&claim, b"").unwrap();
        b.open_or_init(&name, true).expect("a stale claim is taken over");
        assert!(dir.path().join("repo/config").exists());
        assert!(!claim.exists(), "the claim goes once the repository is made");
    }

    /// A recover pass must not mark what an upload running meanwhile wrote: packs cellar indexes
    /// itself (image chunks, marks' trees) carry their time, so they are young to it, and nothing
    /// is repacked. (cellar's index wrote no time before: such packs were never young, and the
    /// recover pass marked an upload's packs whose snapshot it had not seen yet.)
    #[test]
    fn a_recover_pass_marks_nothing_an_upload_in_flight_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        let repo = b.open_or_init(&name, true).unwrap();
        let be = b.write_backend(&name, None).unwrap();
        // Chunks and a tree indexed, the snapshot naming them not written yet.
        let data = vec![vec![1u8; 70_000], vec![2u8; 90_000]];
        image::store(be, &repo.key(), &data, &[rustic_core::repofile::Tree::default()])
            .unwrap_or_else(|e| panic!("store: {}", e.text));
        let span = rustic_core::jiff::Span::new().seconds(3600);
        let plan = b
            .open(&name)
            .unwrap()
            .prune_plan(&recover_options(span).unwrap())
            .unwrap();
        assert_eq!(plan.stats.blobs_sum().remove, 0, "nothing an upload wrote is marked");
        assert!(plan.repack_packs().is_empty(), "nothing is repacked");
    }

    /// A prune while an upload runs on another node must not mark what that upload has written
    /// so far (its packs are indexed, its snapshot not written yet): a marked blob is in no index
    /// the upload's check reads, so the upload is forgotten and made again, and one that takes
    /// longer than the prune interval never becomes ready (each prune marks what it wrote).
    #[test]
    fn a_prune_marks_nothing_an_upload_in_flight_wrote() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        let repo = b.open_or_init(&name, true).unwrap();
        // A backup forgotten: the prune has work to do.
        let data_dir = testing::data_dir(dir.path(), b"old data");
        let old = testing::upload_dir(&b, &name, "1111-aaaa", "old", &data_dir);
        b.forget(&old).unwrap();
        // An upload in flight: chunks and a tree indexed, the snapshot naming them not written yet.
        let be = b.write_backend(&name, None).unwrap();
        let chunk = vec![7u8; 70_000];
        image::store(
            be,
            &repo.key(),
            std::slice::from_ref(&chunk),
            &[rustic_core::repofile::Tree::default()],
        )
        .unwrap_or_else(|e| panic!("store: {}", e.text));
        let pruned = b.prune(&name, std::time::Duration::from_secs(3600)).unwrap();
        assert!(pruned.packs_marked > 0, "the prune found unused packs: {pruned:?}");
        let blob = rustic_core::DataId::from(rustic_core::Id::new(sha2::Sha256::digest(&chunk).into()));
        let indexed = b.open(&name).unwrap().to_indexed().unwrap();
        assert!(
            indexed.get_index_entry(&blob).is_ok(),
            "the in-flight upload's chunk was marked by the prune: its check fails and it starts over"
        );
    }

    /// The S3 backend's "not found" is recognised as the local one is; other failures are not
    /// retried.
    #[test]
    fn not_found_is_told_apart_on_both_backends() {
        let s3 = opendal::Error::new(opendal::ErrorKind::NotFound, "no such key");
        assert!(is_not_found(&RusticError::with_source(
            ErrorKind::Backend,
            "reading",
            s3
        )));
        let local = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(is_not_found(&RusticError::with_source(
            ErrorKind::Backend,
            "reading",
            local
        )));
        let denied = opendal::Error::new(opendal::ErrorKind::PermissionDenied, "denied");
        assert!(!is_not_found(&RusticError::with_source(
            ErrorKind::Backend,
            "reading",
            denied
        )));
        assert!(!is_not_found(&RusticError::new(ErrorKind::Backend, "reading")));
    }

    /// Seals the way the tests' controller does: a seal names the backup it was made for.
    struct TestSeal;

    impl MarkAuthority for TestSeal {
        fn seal(&self, id: &BackupId) -> Result<String, String> {
            Ok(format!("sealed for {id}"))
        }
        fn check(&self, id: &BackupId, seal: Option<&str>) -> Result<(), String> {
            match seal {
                Some(s) if s == format!("sealed for {id}") => Ok(()),
                Some(s) => Err(format!("'{s}' is not the controller's seal of {id}")),
                None => Err("no seal".into()),
            }
        }
    }

    /// Seals every mark with the seal of another backup: a node copying a genuine seal.
    struct CopiedSeal(BackupId);

    impl MarkAuthority for CopiedSeal {
        fn seal(&self, _: &BackupId) -> Result<String, String> {
            TestSeal.seal(&self.0)
        }
        fn check(&self, _: &BackupId, _: Option<&str>) -> Result<(), String> {
            Err("writes a mark whatever is there".into())
        }
    }

    /// Where marks are sealed, a mark someone else wrote with the repository's key (no seal, or a
    /// seal made for another backup) does not count, and does not keep the controller from
    /// writing its own; a process that cannot check seals yet cannot tell.
    #[test]
    fn only_marks_sealed_for_their_backup_count_where_marks_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (forger, name) = testing::backups(dir.path());
        forger.open_or_init(&name, true).unwrap();
        let trusting = |trust: MarkTrust| {
            let (b, _) = testing::backups(dir.path());
            b.trust_marks(trust);
            b
        };
        let controller = trusting(MarkTrust::Sealed(Arc::new(TestSeal)));
        let node = trusting(MarkTrust::Sealed(Arc::new(TestSeal)));
        let id = BackupId::new(name.clone(), "1234-abcd").unwrap();
        let other = BackupId::new(name.clone(), "5678-ef01").unwrap();
        let marks = || {
            let (_, snaps) = forger.any_snapshots(&name).unwrap().unwrap();
            snaps
                .iter()
                .filter(|s| s.tags.iter().any(|t| t.starts_with(TAG_DELETED)))
                .count()
        };

        forger.mark_deleted(&id).unwrap();
        assert!(forger.is_marked_deleted(&id).unwrap(), "unsealed, every mark counts");
        assert!(!node.is_marked_deleted(&id).unwrap(), "an unsealed mark is passed over");
        trusting(MarkTrust::Sealed(Arc::new(CopiedSeal(other.clone()))))
            .mark_deleted(&id)
            .unwrap();
        assert_eq!(marks(), 2);
        assert!(
            !node.is_marked_deleted(&id).unwrap(),
            "a seal made for another backup is passed over"
        );

        controller.mark_deleted(&id).unwrap();
        assert_eq!(marks(), 3, "the controller writes its own mark beside the others");
        assert!(node.is_marked_deleted(&id).unwrap());
        assert!(!node.is_marked_deleted(&other).unwrap());
        controller.mark_deleted(&id).unwrap();
        assert_eq!(marks(), 3, "and only one");

        let pending = trusting(MarkTrust::NotYet);
        assert!(matches!(
            pending.is_marked_deleted(&id),
            Err(StorageError::Unavailable(_))
        ));
        assert!(matches!(
            pending.mark_deleted(&other),
            Err(StorageError::Unavailable(_))
        ));

        node.clear_deleted_marks(Some(&id), &name).unwrap();
        assert_eq!(marks(), 0, "a node that dropped its part removes every mark of it");
    }
}
