//! The node's storage engine: creates, deletes, expands and snapshots the volumes of this node's
//! local pools. All calls are blocking (they touch disks); the agent runs them off the async runtime.
//!
//! Records on disk are the truth; the in-memory index is a cache of them that every change updates
//! after the disk, so a crash at any point leaves the disk in a state the next call converges from.
//!
//! This file holds the engine itself (its pools, store, locks and lookups) and what every call
//! shares; each call family has a file of its own: `create` (the plan, the making, imports and
//! exports), `delete` (and the guards that keep mounted data), `snapshot`, `capacity` (room,
//! expand, modify, conditions), `group` (group snapshots), `metadata` (changed block tracking)
//! and `backup` (snapshots uploaded into repositories, and restores from them); `pools` holds the
//! engine's pools, open or not yet, and opens late the ones that could not open at start.

mod backup;
mod capacity;
mod create;
mod delete;
mod group;
mod metadata;
mod pools;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crash;
use crate::sys::fstools::FsType;
use crate::sys::{files, loopdev, mountinfo, statfs, StorageSys};

use super::config::{Config, DeletePolicy};
use super::id::{BackupId, GroupId, Key, Location, NodeId, ObjectId, PoolName, SnapshotId, VolumeId};
use super::layout;
use super::locks::{Held, InFlight};
use super::pool::{Kind, Pool};
use super::record::{AccessMode, ContentSource, Layout, SnapshotRecord, VolumeMode, VolumeRecord, RECORD_VERSION};
use super::store::PoolStore;
use super::transfer::{self, Frame, Header, Import};
use super::StorageError;

pub use backup::BackupRequest;
pub use delete::{MountedHere, NodeUse};
pub use group::{member_snapshot_id, same_volumes, NewGroup};

/// Size given to a volume whose request names no capacity.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// 0 when not set.
    pub required: u64,
    /// 0 when not set.
    pub limit: u64,
}

impl CapacityRange {
    /// The size to give a new volume, or why the range cannot be served.
    pub fn choose(&self) -> Result<u64, StorageError> {
        let CapacityRange { required, limit } = *self;
        if limit > 0 && required > limit {
            return Err(StorageError::OutOfRange(format!(
                "capacity limit {limit} is below the required {required} bytes"
            )));
        }
        Ok(match (required, limit) {
            (0, 0) => DEFAULT_CAPACITY,
            (0, l) => l.min(DEFAULT_CAPACITY),
            (r, _) => r,
        })
    }

    pub fn admits(&self, bytes: u64) -> bool {
        bytes >= self.required && (self.limit == 0 || bytes <= self.limit)
    }
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
    /// A backup in a repository, which any node can read.
    Backup(BackupId),
}

impl Source {
    /// The node holding the source; `None` for a shared pool's (and a backup's, which is no
    /// node's: ask [`Source::backup`] first).
    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Source::Snapshot(id) => id.0.node(),
            Source::Volume(id) => id.0.node(),
            Source::Backup(_) => None,
        }
    }

    pub fn backup(&self) -> Option<&BackupId> {
        match self {
            Source::Backup(b) => Some(b),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Snapshot(id) => write!(f, "snapshot {id}"),
            Source::Volume(id) => write!(f, "volume {id}"),
            Source::Backup(id) => write!(f, "backup {id}"),
        }
    }
}

/// The parameters a volume may change after creation (ControllerModifyVolume, VolumeAttributesClass).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mutable {
    /// btrfs compression for new writes: `Some("none")` removes it.
    pub compression: Option<String>,
    pub delete_policy: Option<DeletePolicy>,
}

impl Mutable {
    pub fn is_empty(&self) -> bool {
        self.compression.is_none() && self.delete_policy.is_none()
    }
}

/// A CreateVolume request, already parsed and validated at the edge.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub pool: Option<PoolName>,
    pub layout: Option<Layout>,
    pub capacity: CapacityRange,
    pub mode: VolumeMode,
    pub access_modes: Vec<AccessMode>,
    pub fs_type: String,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<Source>,
    /// Overrides the pool's delete policy (StorageClass parameter `deletePolicy`).
    pub delete_policy: Option<DeletePolicy>,
    pub mutable: Mutable,
    /// Owner and mode of a new directory volume (StorageClass `uid`, `gid`, `mode`): lets pods that
    /// are not root write to shares that squash root, without fsGroup.
    pub owner: Ownership,
}

impl NewVolume {
    /// A single-node-writer filesystem volume of `bytes` in the default pool, as most tests want one.
    pub fn plain(name: &str, layout: Option<Layout>, bytes: u64) -> NewVolume {
        NewVolume {
            name: name.into(),
            pool: None,
            layout,
            capacity: CapacityRange {
                required: bytes,
                limit: 0,
            },
            mode: VolumeMode::Filesystem,
            access_modes: vec![AccessMode::SingleNodeWriter],
            fs_type: String::new(),
            parameters: Default::default(),
            source: None,
            delete_policy: None,
            mutable: Default::default(),
            owner: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

/// Words in every condition of a volume with no record, of a dir volume over its capacity, and of
/// one whose tree is too deep to copy: only the message crosses the agent wire, and csi/health.rs
/// tells the faults apart by them.
pub const NO_RECORD: &str = "has no record on node";
pub const UNENFORCED_CAPACITY: &str = "dir volumes do not enforce capacity";
pub const TOO_DEEP_TO_COPY: &str = "holds a tree too deep to copy";

/// Whether a volume's data is where its record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    /// The condition of a volume of a local pool that is not open, listed as last known (its
    /// node's roster, or the controller's last listing of the node).
    pub fn shown_while_shut(pool: &PoolName, node: &str, why: &str) -> Condition {
        Condition {
            abnormal: true,
            message: format!(
                "pool '{}' of node {node} is not open ({why}); the volume is shown as last known until it opens",
                pool.as_str()
            ),
        }
    }
}

/// What a pool reports for scheduling and for GetCapacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub name: PoolName,
    /// Where a volume goes when its StorageClass names no pool.
    pub is_default: bool,
    pub default_layout: Layout,
    pub layouts: Vec<Layout>,
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// What new image volumes can still take: free space minus what existing images may grow into.
    pub image_allocatable_bytes: u64,
    /// Sum of the capacities of the pool's volumes.
    pub provisioned_bytes: u64,
    /// A shared pool (every node sees it) rather than this node's own.
    pub shared: bool,
}

/// A source's data and what a copy of it must agree with.
struct SourceData {
    path: PathBuf,
    size: u64,
    layout: Layout,
    mode: VolumeMode,
    fs_bytes: u64,
    _held: Held,
}

impl SourceData {
    /// The record of a snapshot of this source, cut `at` (seconds, nanoseconds).
    fn snapshot_record(
        &self,
        name: &str,
        id: &SnapshotId,
        source: &VolumeId,
        at: (i64, i32),
        group: Option<GroupId>,
    ) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            id: id.clone(),
            source_volume_id: source.clone(),
            size_bytes: self.size,
            created_unix_secs: at.0,
            created_nanos: at.1,
            layout: self.layout,
            mode: self.mode,
            fs_bytes: self.fs_bytes,
            group,
            backup: None,
        }
    }
}

pub struct LocalEngine {
    node: NodeId,
    /// The pools of this process, open or not yet: Probe is not ready while one is not open, and
    /// one this process owns holds what is unknown until it opens.
    pools: pools::Pools,
    /// Local pools this node had (it keeps their rosters) that its configuration no longer names,
    /// with the reason calls on their objects are refused: a pool left out of the configuration by
    /// mistake must not have its volumes' deletes answered OK (Kubernetes would forget them while
    /// their data stays on the disk).
    unconfigured: BTreeMap<PoolName, String>,
    /// The calls the pools open with, for those that open later.
    sys: StorageSys,
    /// The mount points freezes of this process hold now ([`LocalEngine::mark_frozen`]).
    live_freezes: Mutex<Vec<PathBuf>>,
    default_pool: PoolName,
    /// The records of every pool here: the only reader and writer of them.
    store: PoolStore,
    in_flight: InFlight,
    /// Wakes the background purger of shared pools' trash.
    purge_wake: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Leases of image volumes on shared pools, held or watched by this process.
    pub leases: super::lease::Leases,
    /// The file operations of every pool here (real, or a test's recording fake): the Node
    /// service of this process works through the same ones.
    files: std::sync::Arc<dyn crate::sys::files::Files>,
    /// This node's record of what it has staged and published (the node's mount state), when this
    /// process serves the Node service: asked before every delete.
    mounted_here: std::sync::OnceLock<std::sync::Arc<dyn MountedHere>>,
    /// What each dir volume held when last counted (for its over-capacity condition).
    dir_usage: Mutex<std::collections::HashMap<String, (std::time::Instant, crate::sys::tree::Allocated)>>,
    /// The backup repositories of the configuration (docs/backups.md).
    backups: std::sync::Arc<crate::backup::Backups>,
    /// This engine, for the background uploads it starts (set by [`LocalEngine::start_uploads`]).
    me: std::sync::OnceLock<std::sync::Weak<LocalEngine>>,
    /// Snapshots whose upload runs now (their ids).
    uploading: Mutex<std::collections::HashSet<String>>,
    /// The off switch of each upload under way, by snapshot id: the backup's delete pulls it.
    stops: Mutex<std::collections::HashMap<String, crate::backup::upload::Stop>>,
    /// How often an upload looks for its backup's deletion mark, where a test set it (else
    /// `backup::MARK_LOOK`).
    mark_look: Mutex<Option<std::time::Duration>>,
    /// Backups whose part this node dropped for their deletes, newest last.
    forgotten: Mutex<std::collections::VecDeque<crate::storage::id::BackupId>>,
    /// Room promised to creates and expands of this process that passed their room check and
    /// have not recorded their new size yet, by pool: taken from the room every later check sees.
    /// One lock per pool, held while its room is read: a hung share stalls only its own pool.
    promised: Mutex<BTreeMap<PoolName, std::sync::Arc<Mutex<u64>>>>,
}

/// How long a dir volume's counted size is reused before its tree is walked again.
const DIR_USAGE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

fn now() -> (i64, i32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl LocalEngine {
    /// Opens every pool of the configuration (all-in-one) and loads their records.
    pub fn open(node: NodeId, config: &Config) -> Result<LocalEngine, StorageError> {
        Self::open_pools(node, config, |_| Some(true))
    }

    /// Opens the pools of `config` that `pick` answers for: `Some(true)` as their owner (which makes
    /// their directories and purges their trash), `Some(false)` only to use their volumes (a node
    /// publishing a shared pool's volumes while the controller owns it), `None` not at all. Which
    /// process opens which pools is the roles' business (`roles.rs`), not the engine's.
    pub fn open_pools(
        node: NodeId,
        config: &Config,
        pick: impl Fn(&super::config::PoolConfig) -> Option<bool>,
    ) -> Result<LocalEngine, StorageError> {
        Self::open_with(StorageSys::linux(), node, config, pick)
    }

    /// The file operations this engine's pools work through.
    pub fn files(&self) -> std::sync::Arc<dyn crate::sys::files::Files> {
        self.files.clone()
    }

    /// As [`LocalEngine::open_pools`], with the filesystem and btrfs calls of `sys` (real, or a
    /// test's recording fakes) in every pool.
    pub fn open_with(
        sys: StorageSys,
        node: NodeId,
        config: &Config,
        pick: impl Fn(&super::config::PoolConfig) -> Option<bool>,
    ) -> Result<LocalEngine, StorageError> {
        Self::open_keeping(sys, node, config, pick, None)
    }

    /// As [`LocalEngine::open_with`], keeping a roster of each local pool in `rosters` (the node's
    /// data directory, `storage/roster.rs`): a pool's directory that is not the pool this node
    /// opened there before does not open, and the volumes of a pool that is not open are listed as
    /// its roster last recorded them.
    pub fn open_keeping(
        sys: StorageSys,
        node: NodeId,
        config: &Config,
        pick: impl Fn(&super::config::PoolConfig) -> Option<bool>,
        rosters: Option<&Path>,
    ) -> Result<LocalEngine, StorageError> {
        let roster = match rosters {
            Some(dir) => {
                if let Some(parent) = dir.parent() {
                    sys.files.mkdir_all(parent)?;
                }
                sys.files.ensure_dir(dir, 0o700)?;
                Some(super::roster::Roster::new(dir, sys.files.clone()))
            }
            None => None,
        };
        let mut pools = pools::Pools::default();
        for pc in &config.pools {
            let Some(owner) = pick(pc) else { continue };
            let slot = match pools::open_pool(pc, &node, owner, &sys, roster.as_ref()) {
                Ok(p) => pools::Slot::opened(pc.clone(), owner, p),
                Err(e) => {
                    tracing::error!(pool = pc.name.as_str(), error = %e, "pool cannot be opened; not ready until it opens");
                    pools::Slot::broken(pc.clone(), owner, e.to_string(), Self::roots_of_broken(&sys, pc))
                }
            };
            pools.0.insert(pc.name.clone(), slot);
        }
        let mut engine = LocalEngine {
            node: node.clone(),
            pools,
            unconfigured: BTreeMap::new(),
            sys: sys.clone(),
            live_freezes: Mutex::new(Vec::new()),
            default_pool: config.default_pool.clone(),
            store: PoolStore::default(),
            in_flight: InFlight::default(),
            purge_wake: Mutex::new(None),
            promised: Mutex::new(BTreeMap::new()),
            leases: super::lease::Leases::new(node.as_str(), sys.files.clone()).with_clock(sys.clock.clone()),
            files: sys.files.clone(),
            dir_usage: Mutex::new(std::collections::HashMap::new()),
            mounted_here: std::sync::OnceLock::new(),
            backups: std::sync::Arc::new(crate::backup::Backups::new(
                config.repositories.clone(),
                crate::backup::Throttle::unlimited(),
            )),
            me: std::sync::OnceLock::new(),
            uploading: Mutex::new(std::collections::HashSet::new()),
            stops: Mutex::new(std::collections::HashMap::new()),
            mark_look: Mutex::new(None),
            forgotten: Mutex::new(std::collections::VecDeque::new()),
        };
        engine.store = PoolStore::load(engine.pools.values())?;
        if let Some(roster) = roster {
            let mut shut: Vec<PoolName> = engine
                .pools
                .broken()
                .filter(|(_, slot, _)| !slot.config.is_shared())
                .map(|(name, _, _)| name.clone())
                .collect();
            for name in roster.pools() {
                // Gone from the configuration, or there now as a shared pool (whose ids differ).
                if config.pools.iter().all(|p| p.name != name || p.is_shared()) {
                    let why = format!(
                        "it is no longer in the configuration of node {} as a local pool; add it back to reach its volumes, or, if it is gone for good, remove {} and restart the node to forget it",
                        node.as_str(),
                        roster.files_of(&name)
                    );
                    tracing::warn!(pool = name.as_str(), "{why}");
                    engine.unconfigured.insert(name.clone(), why);
                    shut.push(name);
                }
            }
            engine.store.keep_rosters(roster, engine.pools.values(), &shut);
        }
        engine.thaw_left_frozen();
        Ok(engine)
    }

    /// Starts the purge of shared pools' trash in the background: now (resuming one a restart cut
    /// short), after each delete, and every minute; each round also sweeps the pools' stale
    /// temporary files. It ends when the engine is dropped.
    pub fn start_purger(self: &std::sync::Arc<Self>) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        *lock(&self.purge_wake) = Some(tx);
        let weak = std::sync::Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("cellar-purge".into())
            .spawn(move || loop {
                let Some(engine) = weak.upgrade() else { return };
                for p in engine.pools.values().filter(|p| p.shared()) {
                    if let Err(e) = p.purge_trash() {
                        tracing::warn!(pool = p.config.name.as_str(), error = %e, "trash purge failed; retrying later");
                    }
                    if let Err(e) = p.remove_stale_temps() {
                        tracing::warn!(pool = p.config.name.as_str(), error = %e, "sweep of stale temporary files failed; retrying later");
                    }
                }
                drop(engine);
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    rx.recv_timeout(std::time::Duration::from_secs(60))
                {
                    return;
                }
            });
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// True when every configured pool is open.
    pub fn ready(&self) -> bool {
        self.pools.broken().next().is_none()
    }

    /// Fails when pool `only` (any pool, without one) is a pool this process owns that could not
    /// be opened: whether it holds `what` there cannot be told until it opens.
    pub(crate) fn owned_pools_open(&self, only: Option<&PoolName>, what: &str) -> Result<(), StorageError> {
        let left_out = self
            .unconfigured
            .iter()
            .find(|(p, _)| only.is_none_or(|o| o == *p))
            .map(|(p, why)| (p, why.clone()));
        match self
            .pools
            .broken()
            .find(|(p, slot, _)| slot.owner && only.is_none_or(|o| o == *p))
            .map(|(p, _, why)| (p, why))
            .or(left_out)
        {
            None => Ok(()),
            Some((p, why)) => Err(StorageError::Unavailable(format!(
                "pool {} could not be opened ({why}); whether it holds {what} cannot be told until it opens",
                p.as_str(),
            ))),
        }
    }

    /// Whether a pool this process owns could not be opened.
    pub(crate) fn owned_pool_broken(&self) -> bool {
        self.owned_pools_shut() > 0
    }

    /// How many pools this process owns are not open (yet): a count that only falls.
    pub(crate) fn owned_pools_shut(&self) -> usize {
        self.pools.broken().filter(|(_, slot, _)| slot.owner).count() + self.unconfigured.len()
    }

    /// The pools that are not open, with why: those that could not be opened, and local pools this
    /// node had that its configuration no longer names (which do not hold its readiness back).
    pub fn broken_pools(&self) -> Vec<(PoolName, String)> {
        self.not_open(true)
    }

    /// The local pools that are not open, with why: [`Self::broken_pools`] but the shared ones (a
    /// left-out local pool whose name a shared pool now has is local, and shut).
    pub fn shut_local_pools(&self) -> Vec<(PoolName, String)> {
        self.not_open(false)
    }

    /// The configured pools that could not be opened (the shared ones only `with_shared`), then
    /// the local pools left out of the configuration.
    fn not_open(&self, with_shared: bool) -> Vec<(PoolName, String)> {
        let mut shut: Vec<(PoolName, String)> = self
            .pools
            .broken()
            .filter(|(_, slot, _)| with_shared || !slot.config.is_shared())
            .map(|(p, _, why)| (p.clone(), why))
            .collect();
        shut.extend(self.unconfigured.iter().map(|(p, why)| (p.clone(), why.clone())));
        shut
    }

    /// Why local pool `pool` is not open, if it is not: left out of the configuration, or not
    /// opened (yet).
    fn shut_why(&self, pool: &PoolName) -> Option<String> {
        match self.unconfigured.get(pool) {
            Some(why) => Some(why.clone()),
            None => self.pools.0.get(pool).and_then(|slot| slot.why()),
        }
    }

    /// The pool whose managed part `path`, or `real` (the same path resolved), reaches into
    /// ([`Pool::manages`]); a pool that could not be opened counts with its root as configured
    /// and as it resolved then.
    pub fn pool_managing(&self, path: &Path, real: &Path) -> Option<&PoolName> {
        let open = self.pools.iter().find(|(_, p)| p.manages(real)).map(|(n, _)| n);
        open.or_else(|| {
            self.pools
                .broken()
                .find(|(_, slot, _)| {
                    slot.roots
                        .iter()
                        .any(|r| [path, real].iter().any(|p| super::pool::reaches_into(r, p)))
                })
                .map(|(n, _, _)| n)
        })
    }

    /// A pool's root as configured and as far as it resolves without touching the root itself
    /// when the pool is shared (its server may be gone: only the local parent is resolved).
    fn roots_of_broken(sys: &StorageSys, pc: &super::config::PoolConfig) -> Vec<PathBuf> {
        let resolved = match (pc.is_shared(), pc.path.parent(), pc.path.file_name()) {
            (true, Some(parent), Some(name)) => sys.files.resolve(parent).map(|p| p.join(name)),
            _ => sys.files.resolve(&pc.path),
        };
        let mut roots = vec![pc.path.clone()];
        roots.extend(resolved.ok().filter(|r| *r != pc.path));
        roots
    }

    /// Whether pool `name` (the default pool, without one) is a shared pool here, open or not yet:
    /// from the configuration, touching no share. One not open yet answers its calls here
    /// (FAILED_PRECONDITION), not on a node that reports the share open.
    pub fn pool_is_shared(&self, name: Option<&PoolName>) -> bool {
        let name = name.unwrap_or(&self.default_pool);
        self.pools.0.get(name).is_some_and(|s| s.config.is_shared())
    }

    pub fn pool_names(&self) -> Vec<PoolName> {
        self.pools.keys().cloned().collect()
    }

    fn known_pools(&self) -> String {
        self.pools.keys().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
    }

    pub(crate) fn pool(&self, name: &PoolName) -> Result<&Pool, StorageError> {
        match self.pools.0.get(name) {
            Some(slot) => slot.pool().ok_or_else(|| StorageError::PoolBroken {
                pool: name.as_str().to_string(),
                reason: slot.why().unwrap_or_default(),
            }),
            None => Err(StorageError::UnknownPool {
                name: name.as_str().to_string(),
                known: self.known_pools(),
            }),
        }
    }

    /// The pool of an object ID, if the ID names one of this engine's pools: a local pool of this
    /// node, or a shared pool.
    fn locate(&self, id: &ObjectId) -> Option<&Pool> {
        let pool = self.pools.get(&id.pool)?;
        match &id.location {
            Location::Local(n) if *n == self.node && !pool.shared() => Some(pool),
            Location::Shared if pool.shared() => Some(pool),
            _ => None,
        }
    }

    /// [`Self::locate`] for a call on one object, which reads, changes or removes it: an object
    /// of a pool here that could not be opened is FAILED_PRECONDITION (with the reason), not
    /// "nothing here". A delete answering OK there would have Kubernetes forget an object whose
    /// data stays, found again once the pool opens; a snapshot, copy or look-up answering
    /// NOT_FOUND would call an object gone that is only out of reach. The same holds for an object
    /// of a local pool this node had and its configuration no longer names (it keeps the pool's
    /// roster): until the operator adds the pool back or has the node forget it.
    fn locate_for_call(&self, id: &ObjectId) -> Result<Option<&Pool>, StorageError> {
        let ours = |shared: bool| match &id.location {
            Location::Local(n) => *n == self.node && !shared,
            Location::Shared => shared,
        };
        match self.pools.0.get(&id.pool) {
            Some(slot) if slot.pool().is_none() && ours(slot.config.is_shared()) => self.pool(&id.pool).map(Some),
            _ if ours(false) && self.unconfigured.contains_key(&id.pool) => Err(StorageError::PoolBroken {
                pool: id.pool.as_str().to_string(),
                reason: self.unconfigured[&id.pool].clone(),
            }),
            _ => Ok(self.locate(id)),
        }
    }

    fn location_of(&self, pool: &PoolName) -> Location {
        match self.pools.get(pool) {
            Some(p) if p.shared() => Location::Shared,
            _ => Location::Local(self.node.clone()),
        }
    }

    /// Takes an object for one call: refused (ABORTED, which the caller retries) while another
    /// call of this process has it, or, in a shared pool, while another process (a second
    /// controller replica) has it, through the object's lock file on the share.
    fn take(&self, kind: Kind, pool: &PoolName, key: &Key, shown: &str) -> Result<Held, StorageError> {
        let held = self
            .in_flight
            .try_take(flight_key(kind, pool, key))
            .ok_or_else(|| StorageError::Busy(shown.to_string()))?;
        match self.pools.get(pool).filter(|p| p.shared()) {
            None => Ok(held),
            Some(p) => match p.sys.files.lock_while_held(&p.lock_path(kind, key))? {
                Some(lock) => Ok(held.also(lock)),
                None => Err(StorageError::Busy(format!("{shown} (by another controller replica)"))),
            },
        }
    }

    /// Whether an operation of this process holds the object (not another process sharing its
    /// pool).
    fn taken_here(&self, kind: Kind, pool: &PoolName, key: &Key) -> bool {
        self.in_flight.holds(&flight_key(kind, pool, key))
    }

    fn volume_id(&self, pool: &PoolName, key: &Key) -> VolumeId {
        VolumeId(ObjectId {
            location: self.location_of(pool),
            pool: pool.clone(),
            key: key.clone(),
        })
    }

    /// Invariant 4 for a call that failed after it made data: nothing is left that no record names
    /// (a caller that gives up, as a provisioner does when its PVC is deleted, never retries). Data
    /// whose record did reach the disk stays: the retry finds it.
    fn undo_unrecorded<T>(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        r: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if r.is_err() && pool.sys.files.entry(&pool.record_path(kind, key)).ok() == Some(files::Entry::Missing) {
            crash::point("undo:before-clear");
            if let Err(e) = layout::clear_leftover(pool, kind, key) {
                tracing::warn!(key = key.as_str(), error = %e, "could not remove what a failed call made; the next call of that name removes it");
            }
        }
        r
    }

    /// The common start of the ids of a pool's volumes.
    fn id_prefix(&self, pool: &Pool) -> String {
        match self.location_of(&pool.config.name) {
            Location::Shared => format!("shared:{}:", pool.config.name.as_str()),
            Location::Local(n) => format!("local:{}:{}:", n.as_str(), pool.config.name.as_str()),
        }
    }

    /// The data of a content source, with a lock that keeps it from being deleted mid-copy.
    fn source_data(&self, src: &Source) -> Result<SourceData, StorageError> {
        match src {
            Source::Backup(b) => Err(StorageError::Unsupported(format!(
                "backup {b} is read from its repository, not copied as a local source"
            ))),
            Source::Snapshot(s) => {
                let shown = s.to_string();
                let pool = self
                    .locate_for_call(&s.0)?
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                let held = self.take(Kind::Snapshot, &s.0.pool, &s.0.key, &shown)?;
                let rec = self
                    .snapshot(s)
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                Ok(SourceData {
                    path: pool.data_path(Kind::Snapshot, &s.0.key),
                    size: rec.size_bytes,
                    layout: rec.layout,
                    mode: rec.mode,
                    fs_bytes: rec.fs_bytes,
                    _held: held,
                })
            }
            Source::Volume(v) => {
                let shown = v.to_string();
                let pool = self
                    .locate_for_call(&v.0)?
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                let held = self.take(Kind::Volume, &v.0.pool, &v.0.key, &shown)?;
                let rec = self
                    .volume(v)
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                Ok(SourceData {
                    path: pool.data_path(Kind::Volume, &v.0.key),
                    size: rec.capacity_bytes,
                    layout: rec.layout,
                    mode: rec.mode,
                    fs_bytes: rec.fs_bytes,
                    _held: held,
                })
            }
        }
    }

    /// A volume's record. Records of shared pools are read from the share every time (any number of
    /// controller replicas and nodes change them).
    pub fn volume(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.store.volume(self.locate(&id.0)?, &id.0, &id.to_string())
    }

    /// [`Self::volume`] for a call that asks for one volume (ControllerGetVolume): one of a pool
    /// here that is not open is FAILED_PRECONDITION, not "no such volume".
    pub fn volume_for_call(&self, id: &VolumeId) -> Result<Option<VolumeRecord>, StorageError> {
        match self.locate_for_call(&id.0)? {
            Some(pool) => Ok(self.store.volume(pool, &id.0, &id.to_string())),
            None => Ok(None),
        }
    }

    fn is_shared_id(&self, id: &str) -> bool {
        VolumeId::parse(id).is_ok_and(|v| v.0.node().is_none())
    }

    /// Reads the records of every shared pool afresh (listings, names not seen here).
    fn refresh_shared(&self) {
        for pool in self.pools.values().filter(|p| p.shared()) {
            self.store.refresh(pool, &self.id_prefix(pool));
        }
    }

    pub fn volumes(&self) -> Vec<VolumeRecord> {
        self.refresh_shared();
        self.store.volumes()
    }

    /// The volume created under a CSI name, in any pool; in a local pool that is not open, as its
    /// roster last recorded it (a create of that name is then refused while the pool is shut, not
    /// made again in another pool or on another node).
    pub fn volume_named(&self, name: &str) -> Option<VolumeRecord> {
        let cached = self.store.id_named(name);
        let found = |id: &str| {
            let id = VolumeId::parse(id).ok()?;
            self.volume(&id).filter(|r| r.name == name)
        };
        if let Some(r) = cached.as_deref().and_then(found) {
            return Some(r);
        }
        // Not known here (or gone): another replica may have made it on a share.
        self.refresh_shared();
        // Indexed but not found: its pool's records are read, yet it takes no calls until it opens.
        self.store
            .id_named(name)
            .as_deref()
            .and_then(found)
            .or_else(|| self.store.shut_named(name))
    }

    /// Whether a roster misses a change (its write failed; the next change writes it whole).
    pub fn roster_behind(&self) -> bool {
        self.store.roster_behind()
    }

    /// The record and data path of a volume of this node, for staging.
    pub fn volume_data(&self, id: &VolumeId) -> Result<(VolumeRecord, PathBuf), StorageError> {
        let shown = id.to_string();
        // A volume of a pool here that could not be opened (a share whose mount failed at the
        // start) is FAILED_PRECONDITION with the reason, as docs/pools.md says, not "not found".
        let pool = self
            .locate_for_call(&id.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let rec = self.volume(id).ok_or(StorageError::VolumeNotFound(shown))?;
        Ok((rec, pool.data_path(Kind::Volume, &id.0.key)))
    }

    /// A volume's own `(limit, used)` bytes where its pool's statfs cannot tell them (a btrfs
    /// subvolume); `None` where statfs can, as for a static volume (a directory of a shared pool).
    pub fn own_usage(
        &self,
        volume_id: &str,
        layout: Layout,
        data: &std::path::Path,
        capacity: u64,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        match VolumeId::parse(volume_id).ok().and_then(|id| self.locate(&id.0)) {
            Some(pool) => layout::of(layout).own_usage(pool, data, capacity),
            None => Ok(None),
        }
    }

    /// A snapshot's record, read from the share for shared pools (as `volume`).
    pub fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotRecord> {
        self.store.snapshot(self.locate(&id.0)?, &id.0, &id.to_string())
    }

    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.refresh_shared();
        self.store.snapshots()
    }

    /// A page of the snapshots' listing, as [`LocalEngine::volumes_after`].
    pub fn snapshots_after(&self, after: &str, n: usize) -> Vec<SnapshotRecord> {
        if after.is_empty() {
            self.refresh_shared();
        }
        self.store.snapshots_after(after, n)
    }

    /// Every snapshot this node lists (ListSnapshots): [`LocalEngine::snapshots`] and those of
    /// local pools that are not open, as their rosters last recorded them (only listed: every
    /// call on them waits for their pool).
    pub fn listed_snapshots(&self) -> Vec<SnapshotRecord> {
        with_shut(self.snapshots(), self.store.shut_snapshots())
    }

    /// A page of [`LocalEngine::listed_snapshots`], as [`LocalEngine::volumes_after`].
    pub fn listed_snapshots_after(&self, after: &str, n: usize) -> Vec<SnapshotRecord> {
        let mut page = with_shut(
            self.snapshots_after(after, n),
            self.store.shut_snapshots_after(after, n),
        );
        page.truncate(n);
        page
    }

    /// How many volumes this node holds records of (shared pools' included, as its listing has
    /// them), and what `size` says they weigh; read from the index, no record is copied.
    pub fn volumes_weigh(&self, size: impl Fn(&VolumeRecord) -> usize) -> (usize, usize) {
        self.store.volumes_weigh(size)
    }

    /// As [`LocalEngine::volumes_weigh`], for snapshots.
    pub fn snapshots_weigh(&self, size: impl Fn(&SnapshotRecord) -> usize) -> (usize, usize) {
        self.store.snapshots_weigh(size)
    }

    pub fn default_pool(&self) -> &PoolName {
        &self.default_pool
    }
}

/// The in-process lock key of an object.
/// The records of open pools and those of shut pools from their rosters, in id order; an id in
/// both (its pool opened while they were read) is its record's.
fn with_shut<T: crate::storage::store::Record>(records: Vec<T>, shut: Vec<T>) -> Vec<T> {
    if shut.is_empty() {
        return records;
    }
    let mut all = records;
    all.extend(shut);
    // Stable: a record stays before the roster's copy of itself, which `dedup` drops.
    all.sort_by_cached_key(|r| r.id());
    all.dedup_by(|later, earlier| later.id() == earlier.id());
    all
}

fn flight_key(kind: Kind, pool: &PoolName, key: &Key) -> String {
    format!("{:?}/{}/{}", kind, pool.as_str(), key.as_str())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalEngine {
    /// A directory of a shared pool named by a static volume handle (`static:<pool>:<path>`),
    /// opened below the pool without following symlinks.
    pub fn static_dir(&self, pool: &PoolName, rel: &std::path::Path) -> Result<files::PinnedDir, StorageError> {
        let p = self.pool(pool)?;
        if !p.shared() {
            return Err(StorageError::VolumeNotFound(format!(
                "static:{}:{} (static volumes name directories of shared pools; pool '{}' is local)",
                pool.as_str(),
                rel.display(),
                pool.as_str()
            )));
        }
        let shown = rel.display().to_string();
        if super::pool::is_managed(rel) {
            return Err(StorageError::Unsupported(format!(
                "static volume path '{}' in pool '{}' is inside what cellar manages there (volumes/, \
                 snapshots/, groups/ or a directory starting with '.'): name a directory of your own \
                 (retained/ and archive/ hold deleted volumes' data and may be named)",
                crate::csi::status::bounded(&shown),
                pool.as_str()
            )));
        }
        // Nor into another pool configured inside this one's directory (its volumes would be
        // reachable through this pool's handles), its root taken as resolved when it opened (a
        // link above the share's mount point spells the pools inside it otherwise). The parts
        // below the root are opened without following links, so they resolve to themselves.
        let (joined, joined_real) = (p.root().join(rel), p.real_root().join(rel));
        if let Some(other) = self.pool_managing(&joined, &joined_real) {
            return Err(StorageError::Unsupported(format!(
                "static volume path '{}' in pool '{}' reaches into pool '{}', which lies inside it: name a directory outside that pool",
                crate::csi::status::bounded(&shown),
                pool.as_str(),
                other.as_str()
            )));
        }
        let root = p.root().to_path_buf();
        let rel = rel.to_path_buf();
        crate::sys::share::within(
            crate::sys::share::SHARE_TIMEOUT,
            "open static volume",
            &root.clone(),
            move || files::PinnedDir::open_beneath(&root, &rel),
        )
        .map_err(|e| {
            if e.is_not_found() {
                StorageError::VolumeNotFound(format!("static:{}:{}", pool.as_str(), e))
            } else if matches!(
                e.errno(),
                Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EINVAL) | Some(libc::ENAMETOOLONG)
            ) {
                StorageError::Unsupported(format!(
                    "static volume path '{}' in pool '{}' must name a directory below the pool; symlinks \
                     are not followed ({e})",
                    crate::csi::status::bounded(&shown),
                    pool.as_str()
                ))
            } else {
                StorageError::Sys(e)
            }
        })
    }

    /// The root of a pool (for node-side share health checks).
    pub fn pool_config(&self, pool: &PoolName) -> Option<&super::config::PoolConfig> {
        self.pools.get(pool).map(|p| &p.config)
    }

    /// The pools whose volumes can need a lease: every shared pool, open or not yet (images staged
    /// before a restart stay mounted while their share is down; their leases are renewed once it
    /// opens). Not only those whose config offers images: one that stopped offering them still
    /// holds (and stages) the images it made.
    pub fn leasing_pools(&self) -> Vec<PoolName> {
        self.pools
            .0
            .iter()
            .filter(|(_, s)| s.config.is_shared())
            .map(|(name, _)| name.clone())
            .collect()
    }
}
