//! The pool store: the only code that reads and writes volume and snapshot records.
//!
//! A local pool has one writer (its node), so its records are read once at start into an ordered
//! index and every change goes to disk first (temp file, fsync, rename, fsync of the directory),
//! then to the index. A shared pool is written by any number of controller replicas and nodes, so
//! its records are read from the share on every lookup (the index follows what was read) and
//! listings read the whole share again, bounded in time. A share that cannot be read answers from
//! what was last read: its volumes are never reported deleted because the share is down.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Serialize};

use super::id::{Key, ObjectId, PoolName};
use super::pool::{Kind, Pool};
use super::record::{self, GroupRecord, SnapshotRecord, VolumeRecord};
use super::roster::{Change, Roster, RosterGuard};
use super::StorageError;
use crate::sys::files::{Entry, Files};
use crate::sys::SysError;

#[derive(Default)]
pub struct PoolStore {
    /// Volume records by id, ordered (a pool's volumes share an id prefix).
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    /// CSI name → volume id (names whose key is not derived from the name alone: templates).
    names: Mutex<HashMap<String, String>>,
    snapshots: Mutex<BTreeMap<String, SnapshotRecord>>,
    /// Each local pool's roster, once the process keeps them ([`PoolStore::keep_rosters`]).
    roster: OnceLock<Roster>,
    /// The volumes of local pools that are not open, as their rosters last recorded them, by id:
    /// listed (abnormal), never called on. A pool's leave when it opens.
    shut: Mutex<BTreeMap<String, VolumeRecord>>,
    /// The snapshots of local pools that are not open, as `shut` holds their volumes.
    shut_snapshots: Mutex<BTreeMap<String, SnapshotRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn after_in<R: Clone>(index: &BTreeMap<String, R>, after: &str, n: usize) -> Vec<R> {
    use std::ops::Bound::{Excluded, Unbounded};
    index
        .range::<str, _>((Excluded(after), Unbounded))
        .take(n)
        .map(|(_, r)| r.clone())
        .collect()
}

/// What the store needs of a record: its own id, as the text the index is ordered by.
pub trait Record: Clone + Serialize + for<'de> Deserialize<'de> + Send + 'static {
    fn id(&self) -> String;
}

impl Record for VolumeRecord {
    fn id(&self) -> String {
        self.id.to_string()
    }
}

impl Record for SnapshotRecord {
    fn id(&self) -> String {
        self.id.to_string()
    }
}

impl PoolStore {
    /// Reads every record of `pools`. A record that does not parse (another version's, or one
    /// edited by hand) is left out, logged, rather than stopping every process that opens the pool:
    /// its object is not listed, and calls on its name or id refuse to touch its data
    /// ([`crate::storage::layout::refuse_unread_record`]) until it is repaired.
    pub fn load<'a>(pools: impl Iterator<Item = &'a Pool>) -> Result<PoolStore, StorageError> {
        let store = PoolStore::default();
        for pool in pools {
            store.add(pool)?;
        }
        Ok(store)
    }

    /// Reads every record of `pool`, one that opened after the others, as [`PoolStore::load`]
    /// does. Nothing is taken into the index unless all of its records could be listed.
    pub fn add(&self, pool: &Pool) -> Result<(), StorageError> {
        let (volume_keys, snapshot_keys) = (pool.record_keys(Kind::Volume)?, pool.record_keys(Kind::Snapshot)?);
        let mut volumes = Vec::new();
        for key in volume_keys {
            volumes.extend(readable::<VolumeRecord>(pool, &pool.record_path(Kind::Volume, &key))?);
        }
        let mut snapshots = Vec::new();
        for key in snapshot_keys {
            snapshots.extend(readable::<SnapshotRecord>(
                pool,
                &pool.record_path(Kind::Snapshot, &key),
            )?);
        }
        for r in volumes {
            // A name already indexed was made here while this pool was shut (the volume the CO
            // was given): an older record of that name in a pool opening late does not take it.
            lock(&self.names)
                .entry(r.name.clone())
                .or_insert_with(|| r.id.to_string());
            lock(&self.volumes).insert(r.id.to_string(), r);
        }
        for r in snapshots {
            lock(&self.snapshots).insert(r.id.to_string(), r);
        }
        if !pool.shared() {
            if let Some(roster) = self.roster.get() {
                self.rewrite_roster(roster, &pool.config.name);
            }
        }
        Ok(())
    }

    /// Forgets the roster's volumes of pool `name`, which now answers for them: only once calls
    /// reach it (a name dropped while its records are read, before then, was found nowhere).
    pub fn opened(&self, name: &PoolName) {
        lock(&self.shut).retain(|_, r| r.id.0.pool != *name);
        lock(&self.shut_snapshots).retain(|_, r| r.id.0.pool != *name);
    }

    /// Keeps a roster of each local pool in `roster`'s directory from now on
    /// (`storage/roster.rs`): those of the `open` pools are written whole from their records, those
    /// of the `shut` ones are read into the listing.
    pub fn keep_rosters<'a>(&self, roster: Roster, open: impl Iterator<Item = &'a Pool>, shut: &[PoolName]) {
        let roster = self.roster.get_or_init(|| roster);
        for pool in open.filter(|p| !p.shared()) {
            self.rewrite_roster(roster, &pool.config.name);
        }
        let (mut volumes, mut snapshots) = (lock(&self.shut), lock(&self.shut_snapshots));
        for name in shut {
            let listed = roster.read(name);
            volumes.extend(listed.volumes);
            snapshots.extend(listed.snapshots);
        }
    }

    /// The node's rosters, when it keeps them.
    pub fn roster(&self) -> Option<&Roster> {
        self.roster.get()
    }

    /// Whether a roster misses a change ([`Roster::behind`]).
    pub fn roster_behind(&self) -> bool {
        self.roster.get().is_some_and(Roster::behind)
    }

    /// Writes pool `name`'s roster whole from the index.
    fn rewrite_roster(&self, roster: &Roster, name: &PoolName) {
        self.rewrite_held(&mut roster.hold(), name);
    }

    /// Writes pool `name`'s roster whole from the index, its files held (the index is read under
    /// that hold, and let go before the file is written).
    fn rewrite_held(&self, held: &mut RosterGuard<'_>, name: &PoolName) {
        let volumes: Vec<VolumeRecord> = lock(&self.volumes)
            .values()
            .filter(|r| r.id.0.pool == *name)
            .cloned()
            .collect();
        let snapshots: Vec<SnapshotRecord> = lock(&self.snapshots)
            .values()
            .filter(|r| r.id.0.pool == *name)
            .cloned()
            .collect();
        let records = volumes
            .iter()
            .map(Change::Put)
            .chain(snapshots.iter().map(Change::Snap));
        held.rewrite(name, records);
    }

    /// Adds a change of a local pool's volume or snapshot to its roster. Returns how many times
    /// the roster had been written whole when the change was added (`None` for a pool without
    /// one): a rewrite after that, this call's own included, may have dropped its line.
    fn note(&self, pool: &Pool, change: Change<'_>) -> Option<u64> {
        let roster = self.roster.get().filter(|_| !pool.shared())?;
        let mut held = roster.hold();
        let due = held.append(&pool.config.name, change);
        let at = held.rewrites(&pool.config.name);
        if due {
            self.rewrite_held(&mut held, &pool.config.name);
        }
        Some(at)
    }

    /// A volume's record (`shown` is its id as text).
    pub fn volume(&self, pool: &Pool, id: &ObjectId, shown: &str) -> Option<VolumeRecord> {
        let (old, new) = Self::read_through(&self.volumes, pool, Kind::Volume, &id.key, shown)?;
        let mut names = lock(&self.names);
        if let Some(gone) = old {
            names.remove(&gone.name);
        }
        if let Some(r) = &new {
            names.insert(r.name.clone(), r.id.to_string());
        }
        new
    }

    pub fn snapshot(&self, pool: &Pool, id: &ObjectId, shown: &str) -> Option<SnapshotRecord> {
        Self::read_through(&self.snapshots, pool, Kind::Snapshot, &id.key, shown).and_then(|(_, new)| new)
    }

    /// One record from the index, or (shared pools) from the share, the index following what was
    /// read: `(what the index held, the record)` when the share was read, else the index's answer.
    #[allow(clippy::type_complexity)]
    fn read_through<T: Record>(
        cache: &Mutex<BTreeMap<String, T>>,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        shown: &str,
    ) -> Option<(Option<T>, Option<T>)> {
        if !pool.shared() {
            return Some((None, lock(cache).get(shown).cloned()));
        }
        let read = match record::load::<T>(&*pool.sys.files, &pool.record_path(kind, key)) {
            // No record, and not even the collection: the share is not mounted (a remount that
            // failed leaves a bare directory), which says nothing about the object.
            Ok(None) if !pool.collection_dir(kind).is_dir() => return Some((None, lock(cache).get(shown).cloned())),
            Ok(r) => r.filter(|r| r.id() == shown),
            Err(_) => return Some((None, lock(cache).get(shown).cloned())),
        };
        let mut c = lock(cache);
        let old = match &read {
            Some(r) => c.insert(shown.to_string(), r.clone()),
            None => c.remove(shown),
        };
        Some((old, read))
    }

    /// Writes a volume's record durably, then indexes it.
    pub fn put_volume(&self, pool: &Pool, key: &Key, rec: &VolumeRecord) -> Result<(), StorageError> {
        // Its roster line before the record too: a restart between the two would leave the volume
        // out of its pool's listing while the pool is shut, its name free for a create elsewhere.
        // A line without a record only lists it (its name waiting for the pool) until the pool opens.
        self.put_noted(pool, Kind::Volume, key, rec, Change::Put(rec), || {
            crate::crash::point("volume-record:stored");
            lock(&self.names).insert(rec.name.clone(), rec.id.to_string());
            lock(&self.volumes).insert(rec.id.to_string(), rec.clone());
        })
    }

    /// Writes a snapshot's record durably, then indexes it (its roster line as a volume's).
    pub fn put_snapshot(&self, pool: &Pool, key: &Key, rec: &SnapshotRecord) -> Result<(), StorageError> {
        self.put_noted(pool, Kind::Snapshot, key, rec, Change::Snap(rec), || {
            crate::crash::point("snapshot-record:stored");
            lock(&self.snapshots).insert(rec.id.to_string(), rec.clone());
        })
    }

    /// Writes record `rec` durably between its roster lines (`change`), and has `index` take it.
    fn put_noted<T: Record>(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        rec: &T,
        change: Change<'_>,
        index: impl FnOnce(),
    ) -> Result<(), StorageError> {
        let noted = self.note(pool, change);
        if let Err(e) = record::store(&*pool.sys.files, &pool.record_path(kind, key), rec) {
            // Back to what the index holds: the line names a change that may not have been made.
            if let Some(roster) = self.roster.get().filter(|_| !pool.shared()) {
                self.rewrite_roster(roster, &pool.config.name);
            }
            return Err(e);
        }
        index();
        // Again once indexed, if the roster was written whole since its line (from an index
        // without it). Checked after the index holds it: a rewrite from now on has it.
        let rewritten = |roster: &Roster| roster.hold().rewrites(&pool.config.name);
        if noted.is_some() && noted != self.roster.get().map(rewritten) {
            self.note(pool, change);
        }
        Ok(())
    }

    /// Removes an object's record durably (its data has left its place first), then forgets it.
    pub fn remove(&self, pool: &Pool, kind: Kind, key: &Key, shown: &str) -> Result<(), StorageError> {
        pool.sys.files.remove_file_if_exists(&pool.record_path(kind, key))?;
        // Gone from the directory is gone from the index, even if the flush below fails.
        let synced = pool.sys.files.sync_dir(&pool.collection_dir(kind));
        match kind {
            Kind::Volume => {
                if let Some(r) = lock(&self.volumes).remove(shown) {
                    lock(&self.names).remove(&r.name);
                }
            }
            Kind::Snapshot => {
                lock(&self.snapshots).remove(shown);
            }
        }
        self.note(pool, Change::Gone(shown));
        Ok(synced?)
    }

    /// A group snapshot's record, read from the pool every time (groups are few and read rarely:
    /// no index to keep in step across controller replicas).
    pub fn group(&self, pool: &Pool, key: &Key) -> Result<Option<GroupRecord>, StorageError> {
        record::load::<GroupRecord>(&*pool.sys.files, &pool.group_record_path(key))
    }

    /// Writes a group snapshot's record durably (after every member's own record).
    pub fn put_group(&self, pool: &Pool, key: &Key, rec: &GroupRecord) -> Result<(), StorageError> {
        record::store(&*pool.sys.files, &pool.group_record_path(key), rec)
    }

    /// Removes a group snapshot's record durably (after its members are gone).
    pub fn remove_group(&self, pool: &Pool, key: &Key) -> Result<(), StorageError> {
        pool.sys.files.remove_file_if_exists(&pool.group_record_path(key))?;
        pool.sys.files.sync_dir(&pool.groups_dir())?;
        Ok(())
    }

    /// A copy of a record kept beside data moved out of the pool (`retain`, `archive`).
    pub fn keep_copy(&self, pool: &Pool, path: &Path, rec: &VolumeRecord) -> Result<(), StorageError> {
        record::store(&*pool.sys.files, path, rec)
    }

    /// The id of the volume last seen under a CSI name.
    pub fn id_named(&self, name: &str) -> Option<String> {
        lock(&self.names).get(name).cloned()
    }

    pub fn volumes(&self) -> Vec<VolumeRecord> {
        lock(&self.volumes).values().cloned().collect()
    }

    /// The volumes of local pools that are not open, as last recorded (see [`PoolStore::keep_rosters`]).
    pub fn shut_volumes(&self) -> Vec<VolumeRecord> {
        lock(&self.shut).values().cloned().collect()
    }

    /// At most `n` volumes of shut pools whose ids come after `after`, in id order.
    pub fn shut_volumes_after(&self, after: &str, n: usize) -> Vec<VolumeRecord> {
        after_in(&lock(&self.shut), after, n)
    }

    /// A volume of a shut pool as last recorded, by its id.
    pub fn shut_volume(&self, id: &str) -> Option<VolumeRecord> {
        lock(&self.shut).get(id).cloned()
    }

    /// The volume of a shut pool last recorded under a CSI name.
    pub fn shut_named(&self, name: &str) -> Option<VolumeRecord> {
        lock(&self.shut).values().find(|r| r.name == name).cloned()
    }

    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        lock(&self.snapshots).values().cloned().collect()
    }

    /// The snapshots of local pools that are not open, as last recorded.
    pub fn shut_snapshots(&self) -> Vec<SnapshotRecord> {
        lock(&self.shut_snapshots).values().cloned().collect()
    }

    /// At most `n` snapshots of shut pools whose ids come after `after`, in id order.
    pub fn shut_snapshots_after(&self, after: &str, n: usize) -> Vec<SnapshotRecord> {
        after_in(&lock(&self.shut_snapshots), after, n)
    }

    /// The snapshot of a shut pool last recorded under a CSI name.
    pub fn shut_snapshot_named(&self, name: &str) -> Option<SnapshotRecord> {
        lock(&self.shut_snapshots).values().find(|r| r.name == name).cloned()
    }

    /// At most `n` volumes whose ids come after `after`, in id order: a page of a listing, read
    /// from the index without copying the rest.
    pub fn volumes_after(&self, after: &str, n: usize) -> Vec<VolumeRecord> {
        after_in(&lock(&self.volumes), after, n)
    }

    /// At most `n` snapshots whose ids come after `after`, in id order.
    pub fn snapshots_after(&self, after: &str, n: usize) -> Vec<SnapshotRecord> {
        after_in(&lock(&self.snapshots), after, n)
    }

    /// How many snapshots the index holds, and what `size` says they weigh.
    /// (Those of shut pools included, as the listing has them.)
    pub fn snapshots_weigh(&self, size: impl Fn(&SnapshotRecord) -> usize) -> (usize, usize) {
        weigh(&lock(&self.snapshots), &lock(&self.shut_snapshots), size)
    }

    /// How many volumes the index holds, and what `size` says they weigh (those of shut pools
    /// included, as the listing has them).
    pub fn volumes_weigh(&self, size: impl Fn(&VolumeRecord) -> usize) -> (usize, usize) {
        weigh(&lock(&self.volumes), &lock(&self.shut), size)
    }

    /// Folds `f` over the volumes whose id starts with `prefix` (one pool's), in id order.
    pub fn fold_prefix<A>(&self, prefix: &str, init: A, mut f: impl FnMut(A, &str, &VolumeRecord) -> A) -> A {
        let vols = lock(&self.volumes);
        let mut acc = init;
        for (id, r) in vols
            .range(prefix.to_string()..)
            .take_while(|(id, _)| id.starts_with(prefix))
        {
            acc = f(acc, id, r);
        }
        acc
    }

    /// Reads a shared pool's records afresh (ids starting with `prefix`), bounded in time: a share
    /// whose server is gone keeps what was last read.
    pub fn refresh(&self, pool: &Pool, prefix: &str) {
        let (vdir, sdir) = (pool.collection_dir(Kind::Volume), pool.collection_dir(Kind::Snapshot));
        let files = pool.sys.files.clone();
        let read = crate::sys::share::within(
            crate::sys::share::SHARE_TIMEOUT,
            "read records",
            pool.root(),
            move || {
                Ok((
                    read_records::<VolumeRecord>(&*files, &vdir)?,
                    read_records::<SnapshotRecord>(&*files, &sdir)?,
                ))
            },
        );
        let Ok((vols, snaps)) = read else {
            return;
        };
        let mut cache = lock(&self.volumes);
        let mut names = lock(&self.names);
        let stale: Vec<String> = cache
            .range(prefix.to_string()..)
            .take_while(|(id, _)| id.starts_with(prefix))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(r) = cache.remove(&id) {
                names.remove(&r.name);
            }
        }
        for r in vols {
            names.insert(r.name.clone(), r.id.to_string());
            cache.insert(r.id.to_string(), r);
        }
        drop((cache, names));
        // A snapshot's id is its pool's prefix behind `snap:`: a snapshot deleted through another
        // replica must leave this cache too.
        let snap_prefix = format!("snap:{prefix}");
        let mut cache = lock(&self.snapshots);
        cache.retain(|id, _| !id.starts_with(&snap_prefix));
        cache.extend(snaps.into_iter().map(|r| (r.id.to_string(), r)));
    }
}

/// How many records `index` and `shut` hold, and what `size` says they weigh: a pool that opens
/// has its records read before its roster's leave, so an id in both counts once.
fn weigh<T>(index: &BTreeMap<String, T>, shut: &BTreeMap<String, T>, size: impl Fn(&T) -> usize) -> (usize, usize) {
    let unread: Vec<&T> = shut
        .iter()
        .filter(|(id, _)| !index.contains_key(*id))
        .map(|(_, r)| r)
        .collect();
    (index.len() + unread.len(), index.values().chain(unread).map(size).sum())
}

/// Every record in a pool's collection directory (records that do not parse are skipped; the
/// report names them).
/// A record at load: `None` for one that does not parse (logged), an error for one unreadable.
fn readable<T: Record>(pool: &Pool, path: &Path) -> Result<Option<T>, StorageError> {
    match record::load::<T>(&*pool.sys.files, path) {
        Err(StorageError::Corrupt { path, reason }) => {
            tracing::error!(record = %path.display(), reason,
                "a record that does not parse is left out; its object's data is left alone until it is repaired");
            Ok(None)
        }
        other => other,
    }
}

fn read_records<T: Record>(files: &dyn Files, dir: &Path) -> Result<Vec<T>, SysError> {
    let mut out = Vec::new();
    for path in files.list_dir(dir)? {
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        if Key::parse(stem).is_err() || files.entry(&path)? != Entry::File {
            continue;
        }
        if let Ok(Some(r)) = record::load::<T>(files, &path) {
            out.push(r);
        }
    }
    Ok(out)
}
