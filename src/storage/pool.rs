//! A pool: a named directory where volumes live, and its fixed inner layout:
//!
//! ```text
//! <pool>/volumes/<key>/        a volume's data (dir layout)
//! <pool>/volumes/<key>.json    its record
//! <pool>/snapshots/<key>/      a snapshot's data
//! <pool>/snapshots/<key>.json  its record
//! <pool>/groups/<key>.json     a group snapshot's record (its members are snapshots)
//! <pool>/.work/                copies being built (renamed into place when whole)
//! <pool>/.trash/               data being deleted (renamed out of place first)
//! <pool>/.staged/<key>/<node>  shared pools: a node has this directory volume staged
//! <pool>/.leases/<key>         shared pools: the node that holds this image volume staged
//! <pool>/.locks/<kind>-<key>   shared pools: the controller replica working on that object now
//! <pool>/.retired/<key>        shared pools: the CSI name of the last volume deleted under a
//!                              templated key (no other volume takes that id again)
//! <pool>/retained/<key>[.json] volumes deleted under the `retain` policy
//! <pool>/archive/<key>-<time>  volumes deleted under the `archive` policy
//! <pool>/.cellar-pool          which pool the directory holds (its name and backend)
//! ```
//!
//! For the `image` layout the data is a file, `<pool>/volumes/<key>`; for `btrfs` a subvolume.

use std::path::{Path, PathBuf};

use crate::sys::{files, StorageSys};

use super::config::{Backend, PoolConfig};

/// The directories of a pool that cellar manages (its volumes' data and records, and the files
/// that guard them). Nothing else may name them: a static volume handle below one of them would
/// hand a pod another volume's data, a snapshot, or the stage marks and leases that keep a
/// mounted volume from being deleted.
const MANAGED: [&str; 9] = [
    "volumes",
    "snapshots",
    "groups",
    ".work",
    ".trash",
    ".staged",
    ".leases",
    ".locks",
    ".retired",
];

/// Whether a path relative to a pool's root reaches into what cellar manages there: one of
/// [`MANAGED`] in any case (a share may fold case, as SMB does), or any name starting with `.`
/// (room for what later versions add).
pub fn is_managed(rel: &Path) -> bool {
    match rel.components().next() {
        Some(std::path::Component::Normal(first)) => {
            // Folded as a share might: `VOLUMES`, `Volumes`, `volumeſ` (long s) are all `volumes`.
            let first = first.to_string_lossy().to_uppercase().to_lowercase();
            first.starts_with('.') || MANAGED.contains(&first.as_str())
        }
        _ => true,
    }
}

/// A name as a share that folds case may see it: `VOLUMES`, `Volumes` and `volumeſ` are one.
fn folded(name: &std::ffi::OsStr) -> String {
    name.to_string_lossy().to_uppercase().to_lowercase()
}

/// Whether `path` reaches into what cellar manages in the pool at `root` ([`is_managed`]), or
/// holds the pool: a mount there would hide the pool, or show a volume's data inside another's.
/// Names are compared folded, root included, as a share that folds case (SMB) would resolve them:
/// `/mnt/Share/volumes` is `/mnt/share/volumes` there. On a filesystem that keeps case apart this
/// refuses a few paths that would have been harmless, never one that is not.
pub fn reaches_into(root: &Path, path: &Path) -> bool {
    let (mut root, mut path) = (root.components(), path.components());
    loop {
        match (root.next(), path.next()) {
            // The pool's root itself, or a path above it.
            (_, None) => return true,
            (None, Some(first)) => return is_managed(Path::new(first.as_os_str())),
            (Some(r), Some(p)) if folded(r.as_os_str()) != folded(p.as_os_str()) => return false,
            (Some(_), Some(_)) => {}
        }
    }
}

/// The file at a pool's root naming the pool that holds the directory ([`Pool::claim`]).
pub const MARK: &str = ".cellar-pool";

/// The places a pool's start clears, which every release made at a pool's first open: a
/// directory holding them all and no mark is an earlier release's pool.
const CLEARED: [&str; 4] = ["volumes", "snapshots", ".work", ".trash"];

/// What a pool's mark says: the pool its volumes' ids name, whether they are local or shared, and
/// a random id told apart from any other directory's: a node remembers a local pool's, and opens
/// the pool only where it finds it (`storage/roster.rs`: a disk not mounted leaves an empty
/// directory, another disk another id).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub pool: String,
    pub backend: Backend,
    /// A local pool's node: its volumes' ids name it, and a local pool is that node's alone (two
    /// nodes given one share as `backend: local` would clear each other's copies in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Mark {
    /// A new mark of the pool of `config` opened by `node`, with an id of its own.
    fn of(config: &PoolConfig, node: &super::id::NodeId) -> Mark {
        Mark {
            pool: config.name.as_str().to_string(),
            backend: config.backend.clone(),
            node: (!config.is_shared()).then(|| node.as_str().to_string()),
            id: Some(uuid::Uuid::new_v4().simple().to_string()),
        }
    }

    /// Whether it names the same pool as `other` (whatever their ids; one that names no node, as
    /// one repaired by hand, names any).
    fn names(&self, other: &Mark) -> bool {
        self.pool == other.pool && self.backend == other.backend && (self.node.is_none() || self.node == other.node)
    }

    /// The mark at a pool's root `root`: `None` when there is none, `Some(None)` for one that
    /// does not parse.
    pub fn read(files: &dyn files::Files, root: &Path) -> Result<Option<Option<Mark>>, crate::sys::SysError> {
        Ok(files.read_optional(&root.join(MARK))?.map(|bytes| {
            serde_json::from_slice::<Mark>(&bytes)
                .ok()
                .filter(|m| super::id::PoolName::parse(&m.pool).is_ok())
        }))
    }

    /// The pool as an operator names it: `the local pool 'fast'`.
    fn described(&self) -> String {
        let backend = match self.backend {
            Backend::Local => "local",
            Backend::Shared => "shared",
        };
        match &self.node {
            Some(node) => format!("the {backend} pool '{}' of node {node}", self.pool),
            None => format!("the {backend} pool '{}'", self.pool),
        }
    }
}

/// How long opening a shared pool (mounting it included) may take before it counts as unreachable.
const SHARE_OPEN: std::time::Duration = std::time::Duration::from_secs(60);
use super::id::Key;
use super::layout::PoolFeatures;
use super::StorageError;

#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    pub features: PoolFeatures,
    /// Opened as its owner (see [`Pool::open_as`]): this process finishes what its crashes left,
    /// backup uploads included.
    pub owner: bool,
    /// The filesystem and btrfs calls its layouts make, real or recorded.
    pub sys: StorageSys,
    /// Its root with symbolic links resolved, as when it opened.
    real_root: PathBuf,
}

/// Whether this process's mount table lists `path` as a mount point.
fn listed_as_mount_point(path: &Path) -> bool {
    crate::sys::mountinfo::lists_mount_point(Path::new(crate::sys::mountinfo::SELF), path).unwrap_or(false)
}

/// Which of the pool's two collections an object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        }
    }
}

impl Pool {
    /// Opens (creating if needed) the pool's directories. The `owner` of a pool clears what a crash
    /// left in its `.work` (and, for local pools, `.trash`): half-built copies and half-deleted data,
    /// neither of which any record points at. Every local pool is its node's owner; a shared pool is
    /// the controller's, and a node that opens it to publish its volumes must not touch a copy the
    /// controller is making.
    pub fn open_as(
        config: PoolConfig,
        node: &super::id::NodeId,
        owner: bool,
        sys: StorageSys,
    ) -> Result<Pool, StorageError> {
        let node = node.clone();
        if config.is_shared() {
            // Every step on a share may hang when its server is gone: bound the whole opening.
            let path = config.path.clone();
            return crate::sys::share::within(SHARE_OPEN, "open shared pool", &path, move || {
                Ok(
                    Self::open_here(config, &node, owner, sys).map_err(|e| crate::sys::SysError::Tool {
                        tool: "open shared pool".into(),
                        status: "failed".into(),
                        stderr: e.to_string(),
                    }),
                )
            })?
            .map_err(|e| StorageError::PoolUnusable(e.to_string()));
        }
        Self::open_here(config, &node, owner, sys)
    }

    fn open_here(
        config: PoolConfig,
        node: &super::id::NodeId,
        owner: bool,
        sys: StorageSys,
    ) -> Result<Pool, StorageError> {
        if let Some(share) = &config.share {
            let mounted = match crate::sys::mount::statx_mount_root(&config.path) {
                Ok(root) => root.unwrap_or(false),
                // A mount whose client is gone (ENOTCONN: the FUSE daemon of the share died with the
                // plugin's container, or was killed): left there, it made the mkdir below fail
                // with EEXIST and the pool unusable until someone unmounted it by hand. Detached
                // and mounted afresh; the publishes of the dead mount stay dead until their pods
                // restart (docs/shared.md).
                // Any other failure to look at a path the mount table lists as a mount point
                // (a FUSE daemon dying as the process starts again) is treated the same way.
                Err(e) if crate::sys::share::is_stale(&e) || listed_as_mount_point(&config.path) => {
                    tracing::warn!(
                        pool = config.name.as_str(),
                        path = %config.path.display(),
                        error = %e,
                        "the share's mount is dead (its client went away): detaching it and mounting the share again"
                    );
                    crate::sys::share::detach(&config.path)?;
                    false
                }
                Err(_) => false,
            };
            if !mounted {
                crate::sys::share::mount(&share.source, &share.fs_type, &share.options, &config.path)?;
            }
        }
        sys.files.mkdir_all(&config.path)?;
        sys.files.require_real_dir(&config.path)?;
        let features = super::layout::check_pool(&config, &sys)?;
        let real_root = sys.files.resolve(&config.path)?;
        let pool = Pool {
            config,
            features,
            owner,
            sys,
            real_root,
        };
        pool.claim(node)?;
        for d in MANAGED {
            pool.sys.files.ensure_dir(&pool.config.path.join(d), 0o700)?;
        }
        if owner {
            pool.purge_work()?;
            pool.remove_stale_temps()?;
        }
        // Shared pools purge their trash in the background (it may hold huge trees).
        if owner && !pool.shared() {
            pool.reopen_trash()?;
            pool.clear_unrecorded()?;
        }
        Ok(pool)
    }

    /// Makes sure the directory holds this pool and no other before its start clears anything
    /// there (the configuration compares paths as written; this sees through symbolic links and
    /// bind mounts). Its mark names the pool and backend that first opened it, which its volumes'
    /// ids name too: another pool at the same directory, the pool renamed or its backend changed
    /// would list those volumes as another pool's and answer their deletes without deleting, or
    /// clear a share's copies in progress as a node's leftovers. With no mark, a directory holding
    /// none of the places a start clears is new; one holding them all is an earlier release's pool,
    /// whose records are checked; one holding some holds what cellar did not make (a user's
    /// `volumes`), which the start would remove. A pool inside what another manages is refused too
    /// (in its root beside those it is kept apart: see `reaches_into`).
    fn claim(&self, node: &super::id::NodeId) -> Result<(), StorageError> {
        let files = &self.sys.files;
        let ours = Mark::of(&self.config, node);
        let refuse = |why: String| {
            Err(StorageError::PoolUnusable(format!(
                "pool '{}' cannot use the directory '{}': {why}",
                ours.pool,
                self.config.path.display()
            )))
        };
        for above in self.real_root.ancestors().skip(1) {
            if reaches_into(above, &self.real_root) && files.entry(&above.join(MARK))? != files::Entry::Missing {
                return refuse(format!(
                    "it lies in what the pool at '{}' manages (its volumes, snapshots or dot-directories), whose start removes what it did not record; give each pool a directory of its own",
                    above.display()
                ));
            }
        }
        let mark = self.config.path.join(MARK);
        let bytes = serde_json::to_vec(&ours).map_err(|e| StorageError::PoolUnusable(e.to_string()))?;
        // Twice at most: the processes sharing a pool (controller replicas, the nodes) open it at
        // once, and one may mark it, or make its directories, between another's look and write.
        for _ in 0..2 {
            if let Some(found) = Mark::read(&**files, &self.config.path)? {
                return match found {
                    Some(m) if m.names(&ours) && m.id.is_some() && m.node == ours.node => Ok(()),
                    // A mark without an id or node (written by hand) gets them.
                    Some(m) if m.names(&ours) => {
                        let whole = Mark {
                            id: m.id.or(ours.id),
                            node: ours.node,
                            ..m
                        };
                        let bytes = serde_json::to_vec(&whole).unwrap_or_default();
                        Ok(files.write_atomic(&mark, &bytes, files::Durability::PowerLoss)?)
                    }
                    Some(m) if m.pool == ours.pool && m.backend == ours.backend => refuse(format!(
                        "it holds {}, whose volumes' ids name that node: a local pool is one node's (a share that several nodes mount needs backend: shared, and a renamed node cannot take over its pools); give this node's pool a directory of its own",
                        m.described()
                    )),
                    Some(m) => refuse(format!(
                        "it holds {}, whose volumes' ids name that pool, not {}; give the pool its name and backend back (a pool cannot be renamed or change backend), or give this one an empty directory",
                        m.described(),
                        ours.described()
                    )),
                    None => refuse(format!(
                        "its mark {MARK}, which names the pool the directory holds, cannot be read; repair it (such as {})",
                        serde_json::to_string(&Mark {
                            id: None,
                            pool: ours.pool.clone(),
                            backend: ours.backend.clone(),
                            node: ours.node.clone(),
                        })
                        .unwrap_or_default()
                    )),
                };
            }
            if let Err(why) = self.unmarked_is_new(&ours) {
                match files.entry(&mark)? {
                    files::Entry::Missing => return refuse(why),
                    _ => continue,
                }
            }
            if files.create_exclusive(&mark, &bytes)? {
                return Ok(());
            }
        }
        refuse(format!("its mark {MARK} changed while it was read; try again"))
    }

    /// Whether a directory without a mark may be marked as `ours`: it holds none of the places a
    /// start clears (new), or all of them with no record of another pool (an earlier release's);
    /// else why not.
    fn unmarked_is_new(&self, ours: &Mark) -> Result<(), String> {
        let files = &self.sys.files;
        let mut present = Vec::new();
        for d in CLEARED {
            if files.entry(&self.config.path.join(d)).map_err(|e| e.to_string())? != files::Entry::Missing {
                present.push(d);
            }
        }
        if !present.is_empty() {
            let (own, another) = self.recorded_pools().map_err(|e| e.to_string())?;
            if let Some(other) = another {
                return Err(format!(
                    "it holds another pool's objects ({other}), not {}'s; give the pool its name and backend back (a pool cannot be renamed or change backend)",
                    ours.described()
                ));
            }
            if !own && present.len() < CLEARED.len() {
                return Err(format!(
                    "it holds {} that no cellar pool made (no {MARK} mark, no record of this pool), and a pool's start removes what no record names there; give the pool an empty directory, or move them away",
                    present.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Ok(())
    }

    /// What the readable records here name: whether one names this pool (and backend), and the
    /// id of the first that names another. A record that cannot be read is dealt with when the
    /// records are loaded.
    fn recorded_pools(&self) -> Result<(bool, Option<String>), StorageError> {
        use super::record::{SnapshotRecord, VolumeRecord};
        let (own, another) = self.named_by::<VolumeRecord>(Kind::Volume, |r| &r.id.0)?;
        if another.is_some() {
            return Ok((own, another));
        }
        let (own_snapshot, another) = self.named_by::<SnapshotRecord>(Kind::Snapshot, |r| &r.id.0)?;
        Ok((own || own_snapshot, another))
    }

    /// [`Pool::recorded_pools`] for the records of `kind`.
    fn named_by<T: serde::de::DeserializeOwned>(
        &self,
        kind: Kind,
        id: impl Fn(&T) -> &super::id::ObjectId,
    ) -> Result<(bool, Option<String>), StorageError> {
        let mut own = false;
        if self.sys.files.entry(&self.collection_dir(kind))? == files::Entry::Missing {
            return Ok((own, None));
        }
        for key in self.record_keys(kind)? {
            let Ok(Some(r)) = super::record::load::<T>(&*self.sys.files, &self.record_path(kind, &key)) else {
                continue;
            };
            let id = id(&r);
            let shared = matches!(id.location, super::id::Location::Shared);
            if id.pool == self.config.name && shared == self.shared() {
                own = true;
                continue;
            }
            let what = match kind {
                Kind::Volume => "volume",
                Kind::Snapshot => "snapshot",
            };
            return Ok((own, Some(format!("{what} {id}"))));
        }
        Ok((own, None))
    }

    /// Data at an object's place that no record names (invariant 2): what a create left whose
    /// undo failed, or that crashed before its record, when its caller gave up (a provisioner
    /// whose PVC was deleted never retries). A node pool's start removes it, as the name's next
    /// call would; a record file there, even one it cannot read, keeps it. Not on a shared pool,
    /// where another replica's create may be between its data and its record. A removal that
    /// fails is logged and left for the name's next call or the next start: it does not keep the
    /// pool (and every volume in it) from opening.
    fn clear_unrecorded(&self) -> Result<(), StorageError> {
        for kind in [Kind::Volume, Kind::Snapshot] {
            for p in self.sys.files.list_dir(&self.collection_dir(kind))? {
                // Record files and their temporaries are not keys.
                let Some(key) = p.file_name().and_then(|n| n.to_str()).and_then(|n| Key::parse(n).ok()) else {
                    continue;
                };
                if self.data_path(kind, &key) == p
                    && self.sys.files.entry(&self.record_path(kind, &key))? == files::Entry::Missing
                {
                    tracing::warn!(data = %p.display(), "data no record names, left by a failed or crashed call; removing it");
                    if let Err(e) = super::layout::clear_leftover(self, kind, &key) {
                        tracing::error!(data = %p.display(), error = %e, "could not remove data no record names; the name's next call or the next start tries again");
                    }
                }
            }
        }
        Ok(())
    }

    pub fn shared(&self) -> bool {
        self.config.is_shared()
    }

    /// What the trash holds, each entry with its file name.
    fn trash_entries(&self) -> Result<Vec<(PathBuf, String)>, StorageError> {
        Ok(self
            .sys
            .files
            .list_dir(&self.trash_dir())?
            .into_iter()
            .map(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (p, name)
            })
            .collect())
    }

    /// Removes what is in the trash (deleted volumes and snapshots); a purge cut short by a restart
    /// resumes. An entry whose object still has a record (or whose record cannot be read) is kept:
    /// its delete failed or is still running, and may put it back (on a shared pool, another
    /// process's delete). Every entry is tried: one that cannot be removed (files a squashed
    /// root may not unlink) does not keep the others; the first failure is returned.
    pub fn purge_trash(&self) -> Result<(), StorageError> {
        let mut first = None;
        for (p, name) in self.trash_entries()? {
            if !self.recorded(&name) {
                if let Err(e) = super::layout::purge(&self.sys, &p) {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// A local pool's trash at its open (no call runs yet): an entry whose object is still
    /// recorded (its delete crashed before removing the record, or the removal failed and so did
    /// the put-back) goes back where the record names its data, when nothing is there, so that
    /// the record names its data again; the delete's retry moves it once more. Every other entry
    /// (and one whose place is taken) is purged unless recorded, as [`Pool::purge_trash`] does.
    fn reopen_trash(&self) -> Result<(), StorageError> {
        for (p, name) in self.trash_entries()? {
            if let Some((kind, key)) = trashed(&name) {
                let data = self.data_path(kind, &key);
                let recorded = self.sys.files.entry(&self.record_path(kind, &key))? != files::Entry::Missing;
                // An earlier release's `<key>-<uuid>` of a key `volumes-a` reads as volume `a`'s:
                // when an object of the whole stem is recorded too, whose data it is is not known,
                // and it is only kept, never put in another object's place.
                let ambiguous = name
                    .rsplit_once('-')
                    .is_some_and(|(stem, _)| self.legacy_recorded(stem));
                if recorded && !ambiguous && self.sys.files.entry(&data)? == files::Entry::Missing {
                    tracing::warn!(entry = %p.display(), data = %data.display(), "a deleted object's data is still recorded; put back");
                    self.sys.files.rename(&p, &data)?;
                    self.sys.files.sync_dir(&self.collection_dir(kind))?;
                    continue;
                }
            }
            if !self.recorded(&name) {
                super::layout::purge(&self.sys, &p)?;
            }
        }
        Ok(())
    }

    /// Where a delete moves an object's data: `<kind>-<key>-<uuid>` in the trash.
    pub fn trash_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.trash_dir().join(format!(
            "{}-{}-{}",
            kind.dir(),
            key.as_str(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Whether the object a trash entry came from may still have its record: for
    /// `<kind>-<key>-<uuid>` that kind's record (only: a volume keyed `snapshots-x` does not keep
    /// snapshot `x`'s entry), for an entry of an earlier release (`<key>-<uuid>`) either kind's. An
    /// earlier release's entry whose key itself starts with `volumes-` or `snapshots-` reads as
    /// this release's: it stays while that other object is recorded, and goes after (as that
    /// release purged it). A leftover (`leftover-…`, data no record named) or a name of neither
    /// shape has none.
    fn recorded(&self, name: &str) -> bool {
        let Some(stem) = name
            .rsplit_once('-')
            .and_then(|(stem, tag)| is_tag(tag).then_some(stem))
        else {
            return false;
        };
        if stem.starts_with("leftover-") {
            return false;
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            if let Some(key) = stem.strip_prefix(kind.dir()).and_then(|r| r.strip_prefix('-')) {
                return self.present(kind, key);
            }
        }
        self.legacy_recorded(stem)
    }

    /// Whether an object keyed `stem` (of either kind) may have its record, as an earlier
    /// release's trash entry `<stem>-<uuid>` is read.
    fn legacy_recorded(&self, stem: &str) -> bool {
        self.present(Kind::Volume, stem) || self.present(Kind::Snapshot, stem)
    }

    /// Whether `key` (when it is a key) may have a record of `kind`: present, or not readable.
    fn present(&self, kind: Kind, key: &str) -> bool {
        Key::parse(key)
            .is_ok_and(|k| self.sys.files.entry(&self.record_path(kind, &k)).ok() != Some(files::Entry::Missing))
    }

    /// How old a temporary file of a record, lease or stage mark must be before a sweep removes it:
    /// on a shared pool a younger one may be another replica's or node's write in progress.
    fn stale_temp_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(if self.shared() { 600 } else { 0 })
    }

    /// Removes the temporary files a crash, a full disk or a failed unlink left beside records,
    /// leases and stage marks, once they are [`Pool::stale_temp_age`] old, and the lock files no
    /// call holds (a process killed mid-call leaves its lock file, not its lock). Run when the pool opens
    /// and, for shared pools, by the background purge.
    pub fn remove_stale_temps(&self) -> Result<usize, StorageError> {
        self.remove_temps_older_than(self.stale_temp_age())
    }

    /// As [`Pool::remove_stale_temps`], for temporary files at least `age` old.
    pub fn remove_temps_older_than(&self, age: std::time::Duration) -> Result<usize, StorageError> {
        let mut dirs = vec![
            self.collection_dir(Kind::Volume),
            self.collection_dir(Kind::Snapshot),
            self.groups_dir(),
            self.config.path.join(".leases"),
            self.config.path.join(".retired"),
        ];
        // Made at a pool's first note only.
        for notes in [self.forgotten_dir(), self.marked_off_dir()] {
            if self.sys.files.entry(&notes)? == files::Entry::Dir {
                dirs.push(notes);
            }
        }
        dirs.extend(
            self.sys
                .files
                .list_dir(&self.config.path.join(".staged"))?
                .into_iter()
                .filter(|d| self.sys.files.entry(d).ok() == Some(files::Entry::Dir)),
        );
        let mut removed = 0;
        for d in dirs {
            removed += self.sys.files.remove_stale_temps(&d, age)?;
        }
        // A lock file no one holds was left by a process killed mid-call: taking it removes it.
        for lock in self.sys.files.list_dir(&self.config.path.join(".locks"))? {
            if self.sys.files.lock_while_held(&lock)?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The keys of objects of `kind` whose data waits in the trash with no record left: what a
    /// delete moved there and then failed to purge.
    pub fn trashed_unrecorded(&self, kind: Kind) -> Result<Vec<Key>, StorageError> {
        let mut keys = Vec::new();
        for (_, name) in self.trash_entries()? {
            if let Some((k, key)) = trashed(&name) {
                if k == kind && !self.present(kind, key.as_str()) && !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        Ok(keys)
    }

    /// Removes what deletes of this object moved into the trash (`<kind>-<key>-<32 hex digits>`),
    /// and nothing of another object's, whose delete may be purging it now or may put it back. An
    /// earlier release's `<key>-<uuid>` is not matched (key `volumes-a` would take volume `a`'s
    /// entry): the purge at the pool's next open, or a shared pool's background purge, takes it.
    pub fn purge_trash_of(&self, kind: Kind, key: &Key) -> Result<(), StorageError> {
        for p in self.trash_of(kind, key)? {
            super::layout::purge(&self.sys, &p)?;
        }
        Ok(())
    }

    /// What deletes of this object moved into the trash (`<kind>-<key>-<32 hex digits>`).
    pub fn trash_of(&self, kind: Kind, key: &Key) -> Result<Vec<PathBuf>, StorageError> {
        let stem = format!("{}-{}", kind.dir(), key.as_str());
        let ours = |name: &str| {
            name.strip_prefix(stem.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(is_tag)
        };
        Ok(self
            .trash_entries()?
            .into_iter()
            .filter(|(_, name)| ours(name))
            .map(|(p, _)| p)
            .collect())
    }

    /// Removes the half-built copies in `.work` a crash left. In a shared pool another controller
    /// replica may be building one right now: an entry goes only when its object's lock file (same
    /// name in `.locks`) can be taken, and it is removed while that lock is held.
    fn purge_work(&self) -> Result<(), StorageError> {
        if !self.shared() {
            return self.purge(&self.work_dir());
        }
        let locks = self.config.path.join(".locks");
        for p in self.sys.files.list_dir(&self.work_dir())? {
            let Some(name) = p.file_name() else { continue };
            if let Some(_held) = self.sys.files.lock_while_held(&locks.join(name))? {
                super::layout::purge(&self.sys, &p)?;
            }
        }
        Ok(())
    }

    fn purge(&self, dir: &Path) -> Result<(), StorageError> {
        for p in self.sys.files.list_dir(dir)? {
            super::layout::purge(&self.sys, &p)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.config.path
    }

    /// The pool's root with its symbolic links resolved, when it opened.
    pub fn real_root(&self) -> &Path {
        &self.real_root
    }

    /// Whether `real` (a path with its symbolic links resolved: `Files::resolve`) reaches into
    /// this pool ([`reaches_into`]), its root resolved when it opened.
    pub fn manages(&self, real: &Path) -> bool {
        reaches_into(&self.real_root, real)
    }

    pub fn data_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.config.path.join(kind.dir()).join(key.as_str())
    }

    pub fn record_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.config.path.join(kind.dir()).join(format!("{}.json", key.as_str()))
    }

    /// Where a group snapshot's record lives (groups have no data of their own).
    pub fn group_record_path(&self, key: &Key) -> PathBuf {
        self.groups_dir().join(format!("{}.json", key.as_str()))
    }

    pub fn groups_dir(&self) -> PathBuf {
        self.config.path.join("groups")
    }

    pub fn collection_dir(&self, kind: Kind) -> PathBuf {
        self.config.path.join(kind.dir())
    }

    pub fn work_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.work_dir().join(format!("{}-{}", kind.dir(), key.as_str()))
    }

    pub fn work_dir(&self) -> PathBuf {
        self.config.path.join(".work")
    }

    pub fn trash_dir(&self) -> PathBuf {
        self.config.path.join(".trash")
    }

    /// Where nodes mark a directory volume of a shared pool as staged: one empty file per node.
    pub fn staged_dir(&self, key: &Key) -> PathBuf {
        self.config.path.join(".staged").join(key.as_str())
    }

    /// The note a shared pool keeps of the last volume deleted under a key its CSI name did not
    /// give (a `nameTemplate`'s, or a disambiguated one): that CSI name. A new volume of another
    /// name never takes such a key again, so a DeleteVolume retried for the deleted volume's id
    /// (its answer lost) finds nothing there instead of the new volume.
    pub fn retired_path(&self, key: &Key) -> PathBuf {
        self.config.path.join(".retired").join(key.as_str())
    }

    /// Where the owner of the pool notes the backups whose copy here it dropped for their deletes
    /// (made at the first; one small file each, named by when and by the backup's key, holding
    /// the backup's id): the retry of a delete that failed after the copy's record went still
    /// hears, across a restart, that this pool held the backup's part.
    pub fn forgotten_dir(&self) -> PathBuf {
        self.config.path.join(".forgotten")
    }

    /// Where the lease of an image volume of a shared pool lives: apart from the volumes, so no
    /// volume's name can ever be another volume's lease.
    pub fn lease_path(&self, key: &Key) -> PathBuf {
        self.leases_dir().join(key.as_str())
    }

    /// Where a controller replica notes the backups it marked deleted to call off an upload the
    /// other replica runs on a snapshot of this shared pool (made at the first; one small file
    /// each, named by when and by the backup's key, holding the backup's id and the snapshot's):
    /// the delete's retry, from either replica and after a restart, removes the mark once the
    /// snapshot is gone.
    pub fn marked_off_dir(&self) -> PathBuf {
        self.config.path.join(".marked-off")
    }

    /// Where a shared pool's leases live (see `storage::lease`).
    pub fn leases_dir(&self) -> PathBuf {
        self.config.path.join(".leases")
    }

    /// The lock file a call on an object of a shared pool holds while it runs, so that controller
    /// replicas (and tools) never work on the same volume or snapshot at once. It exists only
    /// while held ([`files::lock_while_held`]).
    pub fn lock_path(&self, kind: Kind, key: &Key) -> PathBuf {
        self.config
            .path
            .join(".locks")
            .join(format!("{}-{}", kind.dir(), key.as_str()))
    }

    /// Where DeleteVolume moves a volume kept by the `retain` policy.
    pub fn retained_dir(&self) -> PathBuf {
        self.config.path.join("retained")
    }

    /// Where DeleteVolume moves a volume kept by the `archive` policy.
    pub fn archive_dir(&self) -> PathBuf {
        self.config.path.join("archive")
    }

    /// Keys of every record of a kind, read from disk (startup and reports only).
    pub fn record_keys(&self, kind: Kind) -> Result<Vec<Key>, StorageError> {
        let dir = self.collection_dir(kind);
        let mut keys = Vec::new();
        for p in self.sys.files.list_dir(&dir)? {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is_file = self.sys.files.entry(&p)? == files::Entry::File;
            if let (true, Some(stem)) = (is_file, name.strip_suffix(".json")) {
                if let Ok(k) = Key::parse(stem) {
                    keys.push(k);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// The uuid a trash entry's name ends with.
/// The object a trash entry of this release's shape (`<kind>-<key>-<uuid>`) came from.
fn trashed(name: &str) -> Option<(Kind, Key)> {
    let (stem, tag) = name.rsplit_once('-')?;
    if !is_tag(tag) {
        return None;
    }
    [Kind::Volume, Kind::Snapshot].into_iter().find_map(|kind| {
        let key = stem.strip_prefix(kind.dir())?.strip_prefix('-')?;
        Key::parse(key).ok().map(|k| (kind, k))
    })
}

fn is_tag(tag: &str) -> bool {
    tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::Config;
    use crate::storage::engine::{LocalEngine, NewVolume};
    use crate::storage::id::{NodeId, PoolName};

    /// A local `dir` pool named `name` at `path`.
    fn local(name: &str, path: &Path) -> PoolConfig {
        let mut c = Config::default_for(Path::new("/unused")).pools.remove(0);
        c.name = PoolName::parse(name).expect("pool name");
        c.path = path.to_path_buf();
        c
    }

    fn shared(name: &str, path: &Path) -> PoolConfig {
        PoolConfig {
            backend: Backend::Shared,
            ..local(name, path)
        }
    }

    fn open(config: PoolConfig) -> Result<Pool, StorageError> {
        Pool::open_as(config, &NodeId::parse("n1").expect("node"), true, StorageSys::linux())
    }

    /// Why `config` does not open.
    fn refused(config: PoolConfig) -> String {
        match open(config) {
            Err(StorageError::PoolUnusable(why)) => why,
            r => panic!("the pool must not open: {r:?}"),
        }
    }

    /// A volume of pool `name` at `path`, made by an engine holding that pool alone.
    fn volume_in(name: &str, path: &Path) -> PathBuf {
        let config = Config {
            default_pool: PoolName::parse(name).expect("pool name"),
            pools: vec![local(name, path)],
            repositories: Vec::new(),
        };
        let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
        let rec = e
            .create_volume(NewVolume::plain("pvc-1", None, 1 << 20))
            .expect("create");
        let data = path.join("volumes").join(rec.id.0.key.as_str());
        std::fs::write(data.join("precious"), b"data").expect("write");
        data.join("precious")
    }

    #[test]
    fn a_directory_holding_another_pool_is_refused_and_left_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("a");
        let precious = volume_in("a", &root);
        // Another pool at the same directory, and the same pool renamed or turned shared.
        let why = refused(local("b", &root));
        assert!(
            why.contains("pool 'b' cannot use the directory") && why.contains("it holds the local pool 'a'"),
            "{why}"
        );
        let why = refused(shared("a", &root));
        assert!(
            why.contains("the local pool 'a'") && why.contains("not the shared pool 'a'"),
            "{why}"
        );
        // The same directory through a symbolic link above it.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("alias")).expect("symlink");
        let why = refused(local("b", &dir.path().join("alias").join("a")));
        assert!(why.contains("it holds the local pool 'a'"), "{why}");
        assert!(precious.exists(), "the pool's volume is untouched");
        open(local("a", &root)).expect("the pool itself still opens");
        assert!(precious.exists());
    }

    #[test]
    fn a_pool_inside_what_another_pool_manages_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outer = dir.path().join("outer");
        let precious = volume_in("outer", &outer);
        // `volumes` of the outer pool, reached through a link so the paths as written differ.
        std::os::unix::fs::symlink(outer.join("volumes"), dir.path().join("link")).expect("symlink");
        let why = refused(local("inner", &dir.path().join("link").join("inner")));
        assert!(
            why.contains("lies in what the pool at") && why.contains("outer"),
            "{why}"
        );
        assert!(!outer.join("volumes").join("inner").join(MARK).exists());
        assert!(precious.exists());
        // In the outer pool's root beside what it manages, the inner pool is its own.
        open(local("beside", &outer.join("beside"))).expect("opens");
    }

    #[test]
    fn a_directory_of_files_cellar_did_not_make_is_refused_and_left_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        for f in ["volumes/alice/thesis", ".trash/old/photo", "docs/letter"] {
            let f = home.join(f);
            std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            std::fs::write(&f, b"theirs").expect("write");
        }
        let why = refused(local("h", &home));
        assert!(
            why.contains(
                "holds 'volumes', '.trash' that no cellar pool made (no .cellar-pool mark, no record of this pool)"
            ),
            "{why}"
        );
        assert!(home.join("volumes/alice/thesis").exists() && home.join(".trash/old/photo").exists());
        assert!(!home.join(MARK).exists(), "nothing is claimed");
        // Unrelated files alone are no place a start clears: the pool opens beside them.
        std::fs::remove_dir_all(home.join("volumes")).expect("rm");
        std::fs::remove_dir_all(home.join(".trash")).expect("rm");
        open(local("h", &home)).expect("opens");
        assert!(home.join("docs/letter").exists());
    }

    #[test]
    fn an_earlier_releases_pool_is_marked_unless_its_records_name_another_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("p");
        let precious = volume_in("old", &root);
        // As an earlier release left it, no mark (and no trash: an operator emptied it by hand).
        std::fs::remove_file(root.join(MARK)).expect("unmark");
        std::fs::remove_dir(root.join(".trash")).expect("no trash");
        let why = refused(local("new", &root));
        assert!(
            why.contains("another pool's objects (volume local:n1:old:pvc-1)")
                && why.contains("a pool cannot be renamed"),
            "{why}"
        );
        let why = refused(shared("old", &root));
        assert!(why.contains("not the shared pool 'old''s"), "{why}");
        assert!(!root.join(MARK).exists());
        open(local("old", &root)).expect("its own name opens it");
        assert!(root.join(MARK).exists(), "and marks it");
        assert!(precious.exists());
        // An earlier release's pool that holds nothing yet: every place a start clears, no record.
        let empty = dir.path().join("empty");
        for d in CLEARED {
            std::fs::create_dir_all(empty.join(d)).expect("mkdir");
        }
        open(local("any", &empty)).expect("opens");
        assert!(empty.join(MARK).exists());
    }

    #[test]
    fn processes_opening_one_shared_pool_at_once_all_open_it() {
        // The controller replicas and every node open a shared pool at their start: on a new
        // share they all find no mark, and each wrote its own (one temporary name, renamed away
        // under the others: ENOENT, the pool not open on that node).
        for round in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("s");
            let opened: Vec<Result<Pool, StorageError>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let config = shared("s", &root);
                        s.spawn(move || {
                            let node = NodeId::parse(&format!("n{i}")).expect("node");
                            Pool::open_as(config, &node, i == 0, StorageSys::linux())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("thread")).collect()
            });
            for r in opened {
                if let Err(e) = r {
                    panic!("round {round}: {e}");
                }
            }
        }
    }

    #[test]
    fn an_unreadable_mark_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("p");
        open(local("p", &root)).expect("opens");
        std::fs::write(root.join(MARK), b"{ torn").expect("spoil");
        let why = refused(local("p", &root));
        assert!(
            why.contains("cannot be read") && why.contains(r#"{"pool":"p","backend":"local","node":"n1"}"#),
            "{why}"
        );
    }
}
