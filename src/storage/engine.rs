//! The node's storage engine: creates, deletes, expands and snapshots the volumes of this node's
//! local pools. All calls are blocking (they touch disks); the agent runs them off the async runtime.
//!
//! Records on disk are the truth; the in-memory index is a cache of them that every change updates
//! after the disk, so a crash at any point leaves the disk in a state the next call converges from.

mod group;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crash;
use crate::sys::fstools::FsType;
use crate::sys::{btrfs, files, loopdev, mountinfo, statfs};

use super::config::{Config, DeletePolicy};
use super::id::{Key, Location, NodeId, ObjectId, PoolName, SnapshotId, VolumeId};
use super::layout;
use super::locks::{Held, InFlight};
use super::pool::{Kind, Pool};
use super::record::{AccessMode, ContentSource, Layout, SnapshotRecord, VolumeMode, VolumeRecord, RECORD_VERSION};
use super::store::PoolStore;
use super::transfer::{self, Frame, Header, Import};
use super::StorageError;

pub use group::NewGroup;

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
}

impl Source {
    /// The node holding the source; `None` for a shared pool's.
    pub fn node(&self) -> Option<&NodeId> {
        match self {
            Source::Snapshot(id) => id.0.node(),
            Source::Volume(id) => id.0.node(),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Snapshot(id) => write!(f, "snapshot {id}"),
            Source::Volume(id) => write!(f, "volume {id}"),
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

/// Words in every condition of a volume with no record, and of a dir volume over its capacity:
/// only the message crosses the agent wire, and csi/health.rs tells the faults apart by them.
pub const NO_RECORD: &str = "has no record on node";
pub const UNENFORCED_CAPACITY: &str = "dir volumes do not enforce capacity";

/// Whether a volume's data is where its record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
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
    /// The source's id, as its record gives it.
    id: String,
    path: PathBuf,
    size: u64,
    layout: Layout,
    mode: VolumeMode,
    fs_bytes: u64,
    _held: Held,
}

impl SourceData {
    /// The record of a snapshot of this source, cut `at` (seconds, nanoseconds).
    fn snapshot_record(&self, name: &str, id: &SnapshotId, at: (i64, i32), group: Option<String>) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            id: id.to_string(),
            source_volume_id: self.id.clone(),
            size_bytes: self.size,
            created_unix_secs: at.0,
            created_nanos: at.1,
            layout: self.layout,
            mode: self.mode,
            fs_bytes: self.fs_bytes,
            group,
        }
    }
}

/// A CreateVolume that passed every check and holds its volume's lock, not made yet.
struct Planned<'a> {
    pool: &'a Pool,
    key: Key,
    id: VolumeId,
    layout: Layout,
    capacity: u64,
    fs_type: String,
    source: Option<ContentSource>,
    _held: Held,
}

enum Plan<'a> {
    /// The same request made this volume before.
    Exists(VolumeRecord),
    New(Planned<'a>),
}

/// A copy keeps its source's layout and mode and needs at least its capacity.
fn same_kind(
    layout: Layout,
    mode: VolumeMode,
    capacity: u64,
    from_layout: Layout,
    from_mode: VolumeMode,
    from_size: u64,
) -> Result<(), StorageError> {
    if from_layout != layout || from_mode != mode {
        return Err(StorageError::Unsupported(format!(
            "a {} {mode:?} volume can only be made from a source of the same layout and mode; the source is a {} {from_mode:?} volume",
            layout.as_str(),
            from_layout.as_str(),
        )));
    }
    if from_size > capacity {
        return Err(StorageError::OutOfRange(format!(
            "the source holds {from_size} bytes of capacity but the new volume asks for {capacity}"
        )));
    }
    Ok(())
}

/// Which process an engine serves, and so which pools it opens and owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    All,
    Controller,
    Node,
}

pub struct LocalEngine {
    node: NodeId,
    pools: BTreeMap<PoolName, Pool>,
    /// Pools that could not be opened, with the reason; Probe is not ready while there are any.
    broken: BTreeMap<PoolName, String>,
    default_pool: PoolName,
    /// The records of every pool here: the only reader and writer of them.
    store: PoolStore,
    in_flight: InFlight,
    /// Wakes the background purger of shared pools' trash.
    purge_wake: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Leases of image volumes on shared pools, held or watched by this process.
    pub leases: super::lease::Leases,
    /// This node's record of what it has staged and published (the node's mount state), when this
    /// process serves the Node service: asked before every delete.
    mounted_here: std::sync::OnceLock<std::sync::Arc<dyn MountedHere>>,
    /// What each dir volume held when last counted (for its over-capacity condition).
    dir_usage: Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

/// What this process has mounted of each volume: the node's mount state, written before every mount
/// and after every unmount, so it is never behind the kernel for cellar's own mounts.
pub trait MountedHere: Send + Sync {
    /// Claims the volume for a delete: the node's own per-volume lock (so no stage or publish can
    /// start until the delete is done), unless the volume is mounted here or a node call on it runs.
    fn claim(&self, volume_id: &str) -> NodeUse;
}

/// What the node says of a volume a delete wants.
pub enum NodeUse {
    /// Not mounted here; no node call can start on it while this is held.
    Free(Held),
    /// A node call (stage, publish ...) on it is running: retry.
    Busy,
    /// Staged or published at these paths.
    MountedAt(Vec<PathBuf>),
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
        Self::open_for(node, config, Role::All)
    }

    /// Opens the pools a role serves: the controller the shared pools, a node its local pools and
    /// the shared ones (to publish their volumes), all-in-one everything.
    pub fn open_for(node: NodeId, config: &Config, role: Role) -> Result<LocalEngine, StorageError> {
        let mut pools = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for pc in &config.pools {
            let shared = pc.backend == super::config::Backend::Shared;
            if role == Role::Controller && !shared {
                continue;
            }
            match Pool::open_as(pc.clone(), !(role == Role::Node && shared)) {
                Ok(p) => {
                    pools.insert(pc.name.clone(), p);
                }
                Err(e) => {
                    tracing::error!(pool = pc.name.as_str(), error = %e, "pool cannot be opened; not ready");
                    broken.insert(pc.name.clone(), e.to_string());
                }
            }
        }
        let mut engine = LocalEngine {
            node: node.clone(),
            pools,
            broken,
            default_pool: config.default_pool.clone(),
            store: PoolStore::default(),
            in_flight: InFlight::default(),
            purge_wake: Mutex::new(None),
            leases: super::lease::Leases::new(node.as_str()),
            dir_usage: Mutex::new(std::collections::HashMap::new()),
            mounted_here: std::sync::OnceLock::new(),
        };
        engine.store = PoolStore::load(engine.pools.values())?;
        engine.thaw_left_frozen();
        Ok(engine)
    }

    /// Starts the purge of shared pools' trash in the background: now (resuming one a restart cut
    /// short), after each delete, and every minute. It ends when the engine is dropped.
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
        self.broken.is_empty()
    }

    pub fn broken_pools(&self) -> Vec<(PoolName, String)> {
        self.broken.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn pool_names(&self) -> Vec<PoolName> {
        self.pools.keys().cloned().collect()
    }

    fn known_pools(&self) -> String {
        self.pools.keys().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
    }

    fn pool(&self, name: &PoolName) -> Result<&Pool, StorageError> {
        if let Some(reason) = self.broken.get(name) {
            return Err(StorageError::PoolBroken {
                pool: name.as_str().to_string(),
                reason: reason.clone(),
            });
        }
        self.pools.get(name).ok_or_else(|| StorageError::UnknownPool {
            name: name.as_str().to_string(),
            known: self.known_pools(),
        })
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

    fn location_of(&self, pool: &PoolName) -> Location {
        match self.pools.get(pool) {
            Some(p) if p.shared() => Location::Shared,
            _ => Location::Local(self.node.clone()),
        }
    }

    fn take(&self, kind: Kind, pool: &PoolName, key: &Key, shown: &str) -> Result<Held, StorageError> {
        let k = format!("{:?}/{}/{}", kind, pool.as_str(), key.as_str());
        self.in_flight
            .try_take(k)
            .ok_or_else(|| StorageError::Busy(shown.to_string()))
    }

    fn volume_id(&self, pool: &PoolName, key: &Key) -> VolumeId {
        VolumeId(ObjectId {
            location: self.location_of(pool),
            pool: pool.clone(),
            key: key.clone(),
        })
    }

    pub fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        let p = match self.plan(&req)? {
            Plan::Exists(rec) => return Ok(rec),
            Plan::New(p) => p,
        };
        let (pool, key) = (p.pool, p.key.clone());
        let made = self.make_volume(p, &req);
        self.undo_unrecorded(pool, Kind::Volume, &key, made)
    }

    /// Makes a planned volume's data and its record.
    fn make_volume(&self, mut p: Planned<'_>, req: &NewVolume) -> Result<VolumeRecord, StorageError> {
        let pool = p.pool;
        let data = pool.data_path(Kind::Volume, &p.key);
        let fs_bytes = match &req.source {
            None => {
                let fs = FsType::parse(&p.fs_type).unwrap_or(pool.config.fs_type);
                let made = layout::create_empty(pool, &p.key, p.layout, p.capacity, req.mode, fs)?;
                if layout::of(p.layout).is_tree() {
                    set_owner(&data, req.owner)?;
                }
                made.fs_bytes
            }
            Some(src) => {
                let from = self.source_data(src)?;
                same_kind(p.layout, req.mode, p.capacity, from.layout, from.mode, from.size)?;
                if layout::of(p.layout).has_filesystem() && req.mode == VolumeMode::Filesystem {
                    p.fs_type = copy_fs_type(&from.path, &req.fs_type)?;
                }
                layout::create_copy(pool, Kind::Volume, &p.key, p.layout, &from.path, true, false)?;
                layout::of(p.layout).set_capacity(&data, p.capacity)?;
                from.fs_bytes
            }
        };
        self.record_new(p, req, fs_bytes)
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
        if r.is_err() && files::entry(&pool.record_path(kind, key)).ok() == Some(files::Entry::Missing) {
            if let Err(e) = layout::clear_leftover(pool, kind, key) {
                tracing::warn!(key = key.as_str(), error = %e, "could not remove what a failed call made; the next call of that name removes it");
            }
        }
        r
    }

    /// Everything CreateVolume checks before it makes anything: the pool, layout, modes, size and
    /// room; the volume's key, id and lock; or the volume already made under that name.
    fn plan(&self, req: &NewVolume) -> Result<Plan<'_>, StorageError> {
        let pool_name = req.pool.clone().unwrap_or_else(|| self.default_pool.clone());
        let pool = self.pool(&pool_name)?;
        let layout = req.layout.unwrap_or(pool.config.default_layout);
        let ops = layout::of(layout);
        if !pool.config.layouts.contains(&layout) {
            return Err(StorageError::LayoutNotAllowed {
                layout: layout.as_str().into(),
                pool: pool_name.as_str().into(),
                allowed: pool
                    .config
                    .layouts
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if pool.shared() {
            let multi = |m: &&AccessMode| {
                matches!(
                    m,
                    AccessMode::MultiNodeReaderOnly
                        | AccessMode::MultiNodeSingleWriter
                        | AccessMode::MultiNodeMultiWriter
                )
            };
            if let Some(m) = req.access_modes.iter().find(multi).filter(|_| ops.single_node()) {
                return Err(StorageError::Unsupported(format!(
                    "access mode {m:?} needs layout 'dir': a volume of layout '{}' is used on one node at a time",
                    layout.as_str()
                )));
            }
        } else if let Some(m) = req.access_modes.iter().find(|m| !m.served_by_local_pool()) {
            return Err(StorageError::Unsupported(format!(
                "access mode {m:?} needs a shared pool; pool '{}' is local (local pools serve single-node modes and MULTI_NODE_READER_ONLY)",
                pool_name.as_str()
            )));
        }
        if req.mode == VolumeMode::Block && !ops.serves_block() {
            return Err(StorageError::Unsupported(format!(
                "volume mode Block needs layout 'image'; layout '{}' serves Filesystem volumes only",
                layout.as_str()
            )));
        }
        let fs_type = match (ops.has_filesystem(), req.mode) {
            (true, VolumeMode::Filesystem) => {
                let fs = if req.fs_type.is_empty() {
                    pool.config.fs_type
                } else {
                    FsType::parse(&req.fs_type).ok_or_else(|| {
                        StorageError::Unsupported(format!(
                            "filesystem type '{}' cannot be made inside an image volume (use ext4 or xfs)",
                            req.fs_type
                        ))
                    })?
                };
                fs.as_str().to_string()
            }
            (true, VolumeMode::Block) => String::new(),
            _ => req.fs_type.clone(),
        };
        if req.mutable.compression.is_some() && !ops.compresses() {
            return Err(StorageError::Unsupported(format!(
                "compression applies to btrfs volumes; this volume's layout is '{}'",
                layout.as_str()
            )));
        }
        let mut capacity = req.capacity.choose()?;
        if let Some(fs) = FsType::parse(&fs_type).filter(|_| ops.has_filesystem() && req.source.is_none()) {
            // A filesystem has a smallest size: round up to it within the limit, never past it.
            let min = fs.min_bytes();
            if capacity < min {
                if req.capacity.limit != 0 && req.capacity.limit < min {
                    return Err(StorageError::OutOfRange(format!(
                        "an {fs} filesystem needs at least {min} bytes ({} MiB); limit_bytes is {}: raise it or use another filesystem type",
                        min >> 20,
                        req.capacity.limit
                    )));
                }
                capacity = min;
            }
        }
        let key = self.key_for(pool, req)?;
        let id = self.volume_id(&pool_name, &key);
        let held = self.take(Kind::Volume, &pool_name, &key, &id.to_string())?;

        let source = match &req.source {
            None => None,
            Some(Source::Snapshot(s)) => Some(ContentSource::Snapshot(s.to_string())),
            Some(Source::Volume(v)) => Some(ContentSource::Volume(v.to_string())),
        };
        if let Some(existing) = self.volume(&id) {
            // A copy's filesystem is its source's, whatever the pool's default.
            let fs_type = if req.source.is_some() && req.fs_type.is_empty() {
                existing.fs_type.clone()
            } else {
                fs_type
            };
            return same_volume(&existing, req, layout, &fs_type, &source).map(|()| Plan::Exists(existing));
        }

        // Data of this very volume left by a create that died before its record (whole in place,
        // or half-made in `.work`) is reused or replaced by this one: it does not take room from it.
        let leftover = layout::allocated_tree(&pool.data_path(Kind::Volume, &key))
            + layout::allocated_tree(&pool.work_path(Kind::Volume, &key));
        let room = self.room(pool, layout)?.saturating_add(leftover);
        if capacity > room {
            // Named with its node: in split mode this answer reaches the scheduler through the
            // controller, and says which node is full.
            let place = match self.location_of(&pool_name) {
                Location::Local(n) => format!("pool '{}' on node {}", pool_name.as_str(), n.as_str()),
                Location::Shared => format!("shared pool '{}'", pool_name.as_str()),
            };
            return Err(StorageError::Exhausted(format!(
                "{place} can give {room} more bytes to {} volumes, the volume needs {capacity}{}",
                layout.as_str(),
                room_hint(layout)
            )));
        }

        Ok(Plan::New(Planned {
            pool,
            key,
            id,
            layout,
            capacity,
            fs_type,
            source,
            _held: held,
        }))
    }

    /// Writes the record of a volume whose data is in place, then indexes it.
    fn record_new(&self, p: Planned<'_>, req: &NewVolume, fs_bytes: u64) -> Result<VolumeRecord, StorageError> {
        let data = p.pool.data_path(Kind::Volume, &p.key);
        if let Some(c) = &req.mutable.compression {
            btrfs::set_compression(&data, Some(c.as_str()).filter(|c| *c != "none"))?;
        }
        crash::point("create-volume:before-record");
        let (secs, _) = now();
        let rec = VolumeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            id: p.id.to_string(),
            layout: p.layout,
            capacity_bytes: p.capacity,
            mode: req.mode,
            access_modes: req.access_modes.clone(),
            fs_type: p.fs_type,
            parameters: req.parameters.clone(),
            source: p.source,
            created_unix_secs: secs,
            delete_policy: req.mutable.delete_policy.or(req.delete_policy),
            compression: req.mutable.compression.clone().filter(|c| c != "none"),
            fs_bytes,
        };
        self.store.put_volume(p.pool, &p.key, &rec)?;
        Ok(rec)
    }

    /// Creates a volume from another node's data, streamed in `frames` (see `transfer`): built and
    /// checked whole in `.work`, moved into place, and only then recorded. A stream that breaks off
    /// or fails a check leaves nothing behind; the retry starts over. A name already made answers
    /// with its volume without reading the stream.
    pub fn import_volume(
        &self,
        req: NewVolume,
        frames: &mut dyn Iterator<Item = Result<Frame, StorageError>>,
    ) -> Result<VolumeRecord, StorageError> {
        let p = match self.plan(&req)? {
            Plan::Exists(rec) => return Ok(rec),
            Plan::New(p) => p,
        };
        let (pool, key) = (p.pool, p.key.clone());
        let made = self.import_planned(p, &req, frames);
        self.undo_unrecorded(pool, Kind::Volume, &key, made)
    }

    /// Streams a planned volume's data from another node into place, then records it.
    fn import_planned(
        &self,
        mut p: Planned<'_>,
        req: &NewVolume,
        frames: &mut dyn Iterator<Item = Result<Frame, StorageError>>,
    ) -> Result<VolumeRecord, StorageError> {
        let cut = |what: &str| StorageError::Transfer(format!("the stream ended before its {what}"));
        let header = match frames.next() {
            Some(Ok(Frame::Header(h))) => h,
            Some(Ok(_)) => return Err(StorageError::Transfer("the stream does not start with a header".into())),
            Some(Err(e)) => return Err(e),
            None => return Err(cut("header")),
        };
        same_kind(
            p.layout,
            req.mode,
            p.capacity,
            header.layout,
            header.mode,
            header.capacity_bytes,
        )?;
        if header.length > p.capacity {
            return Err(StorageError::OutOfRange(format!(
                "the source's image is {} bytes long but the new volume asks for {}",
                header.length, p.capacity
            )));
        }
        let data = p.pool.data_path(Kind::Volume, &p.key);
        layout::clear_leftover(p.pool, Kind::Volume, &p.key)?;
        {
            let work = p.pool.work_path(Kind::Volume, &p.key);
            if files::entry(&work)? != files::Entry::Missing {
                layout::purge(&work)?;
            }
            tracing::info!(volume = %p.id, layout = p.layout.as_str(), "import from another node started");
            let mut import = Import::start(&header, &work)?;
            loop {
                let f = frames.next().ok_or_else(|| cut("end"))??;
                let end = matches!(f, Frame::End { .. });
                import.frame(f)?;
                if end {
                    break;
                }
            }
            import.finish(header.length)?;
            crash::point("import:before-rename");
            std::fs::rename(&work, &data).map_err(|e| crate::sys::SysError::io("rename", &data, e))?;
            files::sync_dir(&p.pool.collection_dir(Kind::Volume))?;
            tracing::info!(volume = %p.id, "import from another node checked and in place");
        }
        if layout::of(p.layout).has_filesystem() && req.mode == VolumeMode::Filesystem {
            p.fs_type = copy_fs_type(&data, &req.fs_type)?;
        }
        layout::of(p.layout).set_capacity(&data, p.capacity)?;
        self.record_new(p, req, header.fs_bytes)
    }

    /// Streams a volume's or snapshot's data to `send` (see `transfer`), holding its lock so that
    /// it cannot be deleted meanwhile. A snapshot is read as it is (read-only); a live volume as
    /// the local clone reads it: a directory tree in place, an image crash-consistent, and a btrfs
    /// subvolume through a read-only snapshot taken for the transfer.
    pub fn export(&self, src: &Source, send: &mut transfer::SendFrame<'_>) -> Result<(), StorageError> {
        let from = self.source_data(src)?;
        let header = Header {
            layout: from.layout,
            mode: from.mode,
            capacity_bytes: from.size,
            fs_bytes: from.fs_bytes,
            length: 0,
        };
        let Source::Volume(v) = src else {
            return transfer::export(header, &from.path, send);
        };
        let pool = self
            .locate(&v.0)
            .ok_or_else(|| StorageError::VolumeNotFound(v.to_string()))?;
        let at = pool
            .work_dir()
            .join(format!("export-{}-{}", v.0.key.as_str(), uuid::Uuid::new_v4().simple()));
        let Some(frozen) = layout::of(from.layout).frozen_view(&from.path, &at)? else {
            return transfer::export(header, &from.path, send);
        };
        let sent = transfer::export(header, &frozen, send);
        if let Err(e) = layout::purge(&frozen) {
            tracing::warn!(path = %frozen.display(), error = %e, "could not drop the snapshot taken for an export; the next start clears it");
        }
        sent
    }

    /// The key a new volume is stored under. A name seen before keeps its key; a local volume's key
    /// is its name's; a shared volume's comes from the pool's name template, told apart from any
    /// other volume's that the template would give the same name.
    fn key_for(&self, pool: &Pool, req: &NewVolume) -> Result<Key, StorageError> {
        let known = self.store.id_named(&req.name);
        if let Some(id) = known.filter(|id| !self.is_shared_id(id) || self.volume_named(&req.name).is_some()) {
            let id = VolumeId::parse(&id).map_err(|e| StorageError::Conflict(e.0))?;
            if id.0.pool != pool.config.name {
                return Err(StorageError::Conflict(format!(
                    "volume '{}' already exists in pool '{}'",
                    req.name,
                    id.0.pool.as_str()
                )));
            }
            return Ok(id.0.key);
        }
        if !pool.shared() {
            return Ok(Key::from_name(&req.name));
        }
        let key = super::naming::key_for(&req.name, pool.config.name_template.as_deref(), &req.parameters);
        // Read from the share: another controller replica may have made either volume.
        let taken = |k: &Key| {
            self.volume(&self.volume_id(&pool.config.name, k))
                .is_some_and(|r| r.name != req.name)
        };
        Ok(if taken(&key) {
            super::naming::disambiguate(&key, &req.name)
        } else {
            key
        })
    }

    /// Bytes a new volume of `layout` can still take in `pool`. Image volumes may grow into all of
    /// their capacity, so what existing images have not yet allocated is held back for them.
    fn room(&self, pool: &Pool, layout: Layout) -> Result<u64, StorageError> {
        let avail = usage(pool)?.available_bytes;
        if !layout::of(layout).reserves_capacity() {
            return Ok(avail);
        }
        if pool.shared() {
            self.refresh_shared(); // images another replica made hold room too
        }
        Ok(avail.saturating_sub(self.held_back(pool)))
    }

    /// The common start of the ids of a pool's volumes.
    fn id_prefix(&self, pool: &Pool) -> String {
        match self.location_of(&pool.config.name) {
            Location::Shared => format!("shared:{}:", pool.config.name.as_str()),
            Location::Local(n) => format!("local:{}:{}:", n.as_str(), pool.config.name.as_str()),
        }
    }

    /// What existing volumes of a pool may still grow into, held back from new ones.
    fn held_back(&self, pool: &Pool) -> u64 {
        self.store.fold_prefix(&self.id_prefix(pool), 0u64, |sum, id, r| {
            let ops = layout::of(r.layout);
            let Some(key) = VolumeId::parse(id)
                .ok()
                .filter(|_| ops.reserves_capacity())
                .map(|v| v.0.key)
            else {
                return sum;
            };
            sum + ops.holds_back(r.capacity_bytes, &pool.data_path(Kind::Volume, &key))
        })
    }

    /// The data of a content source, with a lock that keeps it from being deleted mid-copy.
    fn source_data(&self, src: &Source) -> Result<SourceData, StorageError> {
        match src {
            Source::Snapshot(s) => {
                let shown = s.to_string();
                let pool = self
                    .locate(&s.0)
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                let held = self.take(Kind::Snapshot, &s.0.pool, &s.0.key, &shown)?;
                let rec = self
                    .snapshot(s)
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                Ok(SourceData {
                    id: shown,
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
                    .locate(&v.0)
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                let held = self.take(Kind::Volume, &v.0.pool, &v.0.key, &shown)?;
                let rec = self
                    .volume(v)
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                Ok(SourceData {
                    id: shown,
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

    pub fn delete_volume(&self, id: &VolumeId) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0) else {
            return Ok(()); // not ours and not a pool here: nothing to delete
        };
        let shown = id.to_string();
        let _held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &shown)?;
        let data = pool.data_path(Kind::Volume, &id.0.key);
        let _claimed = self.refuse_in_use(pool, id, &data)?;
        if pool.shared() {
            let (lease, ttl) = Self::lease_at(pool, id);
            if let Err(holder) = self.leases.clear_if_stale(&lease, ttl)? {
                return Err(StorageError::InUse(format!(
                    "volume {shown} is staged on node {holder}, which holds its lease; unstage it there first \
                     (a lease its node stops renewing expires after {} s)",
                    ttl.as_secs()
                )));
            }
        }
        let rec = self.volume(id);
        let policy = rec
            .as_ref()
            .and_then(|r| r.delete_policy)
            .unwrap_or(pool.config.delete_policy);
        match (policy, rec) {
            (DeletePolicy::Retain, Some(rec)) => self.keep(pool, &id.0.key, &rec, &pool.retained_dir(), false)?,
            (DeletePolicy::Archive, Some(rec)) => self.keep(pool, &id.0.key, &rec, &pool.archive_dir(), true)?,
            _ => self.remove_object(pool, Kind::Volume, &id.0.key, &shown)?,
        }
        Ok(())
    }

    /// Moves the data into the trash, removes the record durably, then purges the trash. A crash
    /// before the record is gone leaves a record whose data is missing; the retried delete finishes.
    fn remove_object(&self, pool: &Pool, kind: Kind, key: &Key, shown: &str) -> Result<(), StorageError> {
        let data = pool.data_path(kind, key);
        let trashed = pool
            .trash_dir()
            .join(format!("{}-{}", key.as_str(), uuid::Uuid::new_v4().simple()));
        let moved = match files::entry(&data)? {
            files::Entry::Missing => false,
            // A read-only subvolume cannot move (its '..' cannot change); btrfs drops it atomically
            // in place instead.
            files::Entry::Dir if btrfs::is_subvolume(&data).unwrap_or(false) => {
                btrfs::delete_subvolume(&data)?;
                false
            }
            _ => {
                std::fs::rename(&data, &trashed).map_err(|e| crate::sys::SysError::io("rename", &data, e))?;
                true
            }
        };
        crash::point("delete:after-trash");
        self.store.remove(pool, kind, key, shown)?;
        if moved {
            if pool.shared() {
                // A shared volume may be a huge tree on a slow share: the purge runs in the background.
                if let Some(tx) = lock(&self.purge_wake).as_ref() {
                    let _ = tx.send(());
                }
            } else {
                layout::purge(&trashed)?;
            }
        }
        Ok(())
    }

    /// Where the lease of a volume of a shared pool lives, and how long it lasts unrenewed.
    fn lease_at(pool: &Pool, id: &VolumeId) -> (PathBuf, std::time::Duration) {
        (
            pool.lease_path(&id.0.key),
            std::time::Duration::from_secs(pool.config.lease_seconds),
        )
    }

    /// Where the lease of a volume of a shared pool lives (only `image` volumes take one), and how
    /// long it lasts; `None` for volumes of local pools.
    pub fn shared_lease(&self, id: &VolumeId) -> Option<(PathBuf, std::time::Duration)> {
        let pool = self.locate(&id.0)?;
        pool.shared().then(|| Self::lease_at(pool, id))
    }

    /// Invariant 1: data that is staged or published is never deleted. A loop device attached to an
    /// image; the node's mount state (its lock is held until the delete is done, so no stage races
    /// it), or where no Node service runs here, the kernel's mount table; and for shared pools the
    /// marks every node leaves on the share while it has the volume staged.
    fn refuse_in_use(&self, pool: &Pool, id: &VolumeId, data: &std::path::Path) -> Result<Option<Held>, StorageError> {
        let node = self.node.as_str();
        if let Some(dev) = self.attached(data)?.first() {
            return Err(StorageError::InUse(format!(
                "volume {id} is still attached as {} on node {node}; unpublish and unstage it before deleting",
                dev.path.display()
            )));
        }
        // Where this process serves the Node service, its mount state answers at once; elsewhere
        // (unit tests, tools) the kernel's mount table does, at the cost of reading all of it.
        let (at, claimed) = match self.mounted_here.get().map(|m| m.claim(&id.to_string())) {
            Some(NodeUse::Free(held)) => (Vec::new(), Some(held)),
            Some(NodeUse::Busy) => return Err(StorageError::Busy(id.to_string())),
            Some(NodeUse::MountedAt(at)) => (at, None),
            None if files::entry(data)? == files::Entry::Dir => {
                let table = mountinfo::read(std::path::Path::new(mountinfo::SELF))?;
                (mountinfo::mounts_of(&table, data), None)
            }
            None => (Vec::new(), None),
        };
        if !at.is_empty() {
            let shown: Vec<String> = at.iter().take(3).map(|p| p.display().to_string()).collect();
            return Err(StorageError::InUse(format!(
                "volume {id} is mounted at {} on node {node}; unpublish and unstage it before deleting",
                shown.join(", ")
            )));
        }
        if pool.shared() {
            let nodes = staged_marks(pool, &id.0.key)?;
            if !nodes.is_empty() {
                return Err(StorageError::InUse(format!(
                    "volume {id} is staged on node {}; unstage it there before deleting (a node that is gone \
                     for good leaves {} behind: remove it by hand once no pod uses the volume)",
                    nodes.join(", "),
                    pool.staged_dir(&id.0.key).display()
                )));
            }
        }
        Ok(claimed)
    }

    /// Registers this node's mount state, asked before every delete (once, at start).
    pub fn set_mounted_here(&self, m: std::sync::Arc<dyn MountedHere>) {
        let _ = self.mounted_here.set(m);
    }

    /// Marks a directory volume of a shared pool as staged on this node (before its mount), or
    /// clears the mark (after its unmount): what DeleteVolume on any controller replica consults.
    pub fn mark_staged(&self, id: &VolumeId, staged: bool) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0).filter(|p| p.shared()) else {
            return Ok(());
        };
        let dir = pool.staged_dir(&id.0.key);
        let mark = dir.join(self.node.as_str());
        if staged {
            files::ensure_dir(&dir, 0o700)?;
            files::write_atomic(&mark, b"", files::Durability::PowerLoss)?;
        } else {
            files::remove_file_if_exists(&mark)?;
            // The directory goes when the last node's mark does; another node's new mark keeps it.
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Loop devices attached to an image's file (none for other layouts).
    fn attached(&self, data: &std::path::Path) -> Result<Vec<loopdev::LoopDevice>, StorageError> {
        if files::entry(data)? != files::Entry::File {
            return Ok(Vec::new());
        }
        Ok(loopdev::find_by_backing(data)?)
    }

    /// Moves a volume's data and a copy of its record out of the live namespace, for `retain` (same
    /// name, a suffix only if that name is taken) and `archive` (always a UTC time suffix).
    fn keep(
        &self,
        pool: &Pool,
        key: &Key,
        rec: &VolumeRecord,
        dir: &std::path::Path,
        stamp: bool,
    ) -> Result<(), StorageError> {
        files::ensure_dir(dir, 0o700)?;
        let (secs, _) = now();
        let mut name = if stamp {
            format!("{}-{}", key.as_str(), secs)
        } else {
            key.as_str().to_string()
        };
        if files::entry(&dir.join(&name))? != files::Entry::Missing {
            name = format!("{}-{}-{}", key.as_str(), secs, uuid::Uuid::new_v4().simple());
        }
        let data = pool.data_path(Kind::Volume, key);
        let dest = dir.join(&name);
        self.store.keep_copy(&dir.join(format!("{name}.json")), rec)?;
        if files::entry(&data)? != files::Entry::Missing {
            std::fs::rename(&data, &dest).map_err(|e| crate::sys::SysError::io("rename", &data, e))?;
        }
        self.store.remove(pool, Kind::Volume, key, &rec.id)?;
        files::sync_dir(dir)?;
        tracing::info!(volume = %rec.id, kept_at = %dest.display(), "volume data kept by delete policy");
        Ok(())
    }

    /// A volume of this node, locked for a change: its pool, the lock, and its record.
    fn for_change(&self, id: &VolumeId) -> Result<(&Pool, Held, VolumeRecord), StorageError> {
        let shown = id.to_string();
        let pool = self
            .locate(&id.0)
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &shown)?;
        let rec = self.volume(id).ok_or(StorageError::VolumeNotFound(shown))?;
        Ok((pool, held, rec))
    }

    /// Writes a changed volume record durably, then updates the index.
    fn save(&self, pool: &Pool, id: &VolumeId, rec: &VolumeRecord) -> Result<(), StorageError> {
        self.store.put_volume(pool, &id.0.key, rec)
    }

    /// Grows a volume; the flag says whether the node must grow a filesystem too.
    pub fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        let shown = id.to_string();
        let (pool, _held, mut rec) = self.for_change(id)?;
        let node_step = layout::of(rec.layout).has_filesystem();
        if range.required == 0 {
            // Only a limit: the volume already is what it will be, if the limit admits it.
            if range.admits(rec.capacity_bytes) {
                return Ok((rec, node_step));
            }
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} has {} bytes, above the limit of {}; volumes cannot shrink",
                rec.capacity_bytes, range.limit
            )));
        }
        let wanted = range.choose()?;
        if wanted <= rec.capacity_bytes {
            if wanted == rec.capacity_bytes || range.admits(rec.capacity_bytes) {
                return Ok((rec, node_step)); // already at least as large and within the limit
            }
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} has {} bytes; volumes cannot shrink (asked for {wanted})",
                rec.capacity_bytes
            )));
        }
        // Invariant 3: every size change is checked against the pool and the room left in it.
        let u = usage(pool)?;
        if wanted > u.total_bytes {
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} cannot grow to {wanted} bytes: pool '{}' holds {} bytes in all",
                id.0.pool.as_str(),
                u.total_bytes
            )));
        }
        let room = self.room(pool, rec.layout)?;
        let more = wanted - rec.capacity_bytes;
        if more > room {
            return Err(StorageError::Exhausted(format!(
                "pool '{}' can give {room} more bytes to {} volumes; growing {shown} to {wanted} needs {more}{}",
                id.0.pool.as_str(),
                rec.layout.as_str(),
                room_hint(rec.layout)
            )));
        }
        layout::of(rec.layout).set_capacity(&pool.data_path(Kind::Volume, &id.0.key), wanted)?;
        crash::point("expand:before-record");
        rec.capacity_bytes = wanted;
        self.save(pool, id, &rec)?;
        Ok((rec, node_step))
    }

    /// Changes a volume's mutable parameters (ControllerModifyVolume).
    pub fn modify_volume(&self, id: &VolumeId, m: &Mutable) -> Result<VolumeRecord, StorageError> {
        let shown = id.to_string();
        let (pool, _held, mut rec) = self.for_change(id)?;
        if let Some(c) = &m.compression {
            if !layout::of(rec.layout).compresses() {
                return Err(StorageError::Unsupported(format!(
                    "compression applies to btrfs volumes; volume {shown} has layout '{}'",
                    rec.layout.as_str()
                )));
            }
            let data = pool.data_path(Kind::Volume, &id.0.key);
            btrfs::set_compression(&data, Some(c.as_str()).filter(|c| *c != "none"))?;
            rec.compression = Some(c.clone()).filter(|c| c != "none");
        }
        if let Some(p) = m.delete_policy {
            rec.delete_policy = Some(p);
        }
        self.save(pool, id, &rec)?;
        Ok(rec)
    }

    /// Records the size the filesystem inside an image volume now has (the node grew it).
    pub fn set_fs_bytes(&self, id: &VolumeId, bytes: u64) -> Result<(), StorageError> {
        let (pool, _held, mut rec) = self.for_change(id)?;
        if rec.fs_bytes == bytes {
            return Ok(());
        }
        rec.fs_bytes = bytes;
        self.save(pool, id, &rec)
    }

    /// A volume's record. Records of shared pools are read from the share every time (any number of
    /// controller replicas and nodes change them).
    pub fn volume(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.store.volume(self.locate(&id.0)?, &id.0, &id.to_string())
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

    pub fn volumes_with_condition(&self) -> Vec<(VolumeRecord, Condition)> {
        self.volumes()
            .into_iter()
            .map(|r| {
                let c = VolumeId::parse(&r.id)
                    .map(|id| self.condition(&id))
                    .unwrap_or(Condition {
                        abnormal: true,
                        message: format!("record holds an unparsable id '{}'", r.id),
                    });
                (r, c)
            })
            .collect()
    }

    /// The volume created under a CSI name, in any pool.
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
        let id = self.store.id_named(name)?;
        found(&id)
    }

    pub fn snapshot_named(&self, name: &str) -> Option<SnapshotRecord> {
        let key = Key::from_name(name);
        self.pools.keys().find_map(|p| {
            let id = SnapshotId(ObjectId {
                location: self.location_of(p),
                pool: p.clone(),
                key: key.clone(),
            });
            self.snapshot(&id).filter(|r| r.name == name)
        })
    }

    /// The record and data path of a volume of this node, for staging.
    pub fn volume_data(&self, id: &VolumeId) -> Result<(VolumeRecord, PathBuf), StorageError> {
        let shown = id.to_string();
        let pool = self
            .locate(&id.0)
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let rec = self.volume(id).ok_or(StorageError::VolumeNotFound(shown))?;
        Ok((rec, pool.data_path(Kind::Volume, &id.0.key)))
    }

    pub fn condition(&self, id: &VolumeId) -> Condition {
        let Ok((rec, data)) = self.volume_data(id) else {
            return Condition {
                abnormal: true,
                message: format!("volume {id} {NO_RECORD} {}", self.node.as_str()),
            };
        };
        if let Some(message) = layout::fault(rec.layout, &data) {
            return Condition {
                abnormal: true,
                message,
            };
        }
        if !layout::of(rec.layout).enforces_capacity() {
            let held = self.dir_bytes(id, &data, rec.capacity_bytes);
            if held > rec.capacity_bytes {
                return Condition {
                    abnormal: true,
                    message: format!(
                        "volume {id} holds {held} bytes, capacity {}; {UNENFORCED_CAPACITY} \
                         (use layout btrfs or image for a hard limit)",
                        rec.capacity_bytes
                    ),
                };
            }
        }
        Condition {
            abnormal: false,
            message: "volume data is present".into(),
        }
    }

    /// Bytes a dir volume holds, counted at most every `DIR_USAGE_TTL` per volume (a walk of the
    /// whole tree) and only until it passes the capacity.
    fn dir_bytes(&self, id: &VolumeId, data: &std::path::Path, capacity: u64) -> u64 {
        let key = id.to_string();
        if let Some((at, bytes)) = lock(&self.dir_usage).get(&key) {
            if at.elapsed() < DIR_USAGE_TTL {
                return *bytes;
            }
        }
        let bytes = layout::allocated_tree_upto(data, capacity.saturating_add(1));
        let mut cache = lock(&self.dir_usage);
        if cache.len() > 100_000 {
            cache.clear(); // bounded: a cache, not a record
        }
        cache.insert(key, (std::time::Instant::now(), bytes));
        bytes
    }

    /// Snapshots a volume; `freeze` makes the snapshot of a mounted image filesystem-consistent.
    pub fn create_snapshot(&self, name: &str, source: &VolumeId, freeze: bool) -> Result<SnapshotRecord, StorageError> {
        let shown_src = source.to_string();
        let pool = self
            .locate(&source.0)
            .ok_or_else(|| StorageError::VolumeNotFound(shown_src.clone()))?;
        let key = Key::from_name(name);
        let id = SnapshotId(ObjectId {
            location: self.location_of(&source.0.pool),
            pool: source.0.pool.clone(),
            key: key.clone(),
        });
        let _held = self.take(Kind::Snapshot, &source.0.pool, &key, &id.to_string())?;
        if let Some(existing) = self.snapshot(&id) {
            if existing.source_volume_id == shown_src {
                return Ok(existing);
            }
            return Err(StorageError::Conflict(format!(
                "snapshot '{name}' already exists for volume {}, not {shown_src}",
                existing.source_volume_id
            )));
        }
        let from = self.source_data(&Source::Volume(source.clone()))?;
        let made = self.make_snapshot(pool, name, &id, &from, freeze);
        self.undo_unrecorded(pool, Kind::Snapshot, &key, made)
    }

    /// Makes a snapshot's data (a copy of `from`) and its record.
    fn make_snapshot(
        &self,
        pool: &Pool,
        name: &str,
        id: &SnapshotId,
        from: &SourceData,
        freeze: bool,
    ) -> Result<SnapshotRecord, StorageError> {
        let key = &id.0.key;
        layout::create_copy(pool, Kind::Snapshot, key, from.layout, &from.path, false, freeze)?;
        crash::point("create-snapshot:before-record");
        let rec = from.snapshot_record(name, id, now(), None);
        self.store.put_snapshot(pool, key, &rec)?;
        Ok(rec)
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0) else {
            return Ok(());
        };
        let _held = self.take(Kind::Snapshot, &id.0.pool, &id.0.key, &id.to_string())?;
        if let Some(rec) = self.snapshot(id) {
            self.refuse_group_member(&rec)?;
        }
        self.remove_object(pool, Kind::Snapshot, &id.0.key, &id.to_string())?;
        Ok(())
    }

    /// A snapshot's record, read from the share for shared pools (as `volume`).
    pub fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotRecord> {
        self.store.snapshot(self.locate(&id.0)?, &id.0, &id.to_string())
    }

    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.refresh_shared();
        self.store.snapshots()
    }

    pub fn pool_status(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.pools
            .values()
            .map(|p| {
                let u = usage(p)?;
                let prefix = self.id_prefix(p);
                let provisioned = self
                    .store
                    .fold_prefix(&prefix, 0u64, |sum, _, r| sum + r.capacity_bytes);
                Ok(PoolStatus {
                    name: p.config.name.clone(),
                    is_default: p.config.name == self.default_pool,
                    default_layout: p.config.default_layout,
                    layouts: p.config.layouts.clone(),
                    total_bytes: u.total_bytes,
                    available_bytes: u.available_bytes,
                    image_allocatable_bytes: u.available_bytes.saturating_sub(self.held_back(p)),
                    provisioned_bytes: provisioned,
                    shared: p.shared(),
                })
            })
            .collect()
    }

    pub fn default_pool(&self) -> &PoolName {
        &self.default_pool
    }
}

/// What a room refusal adds for layouts that hold room back (so a full-looking pool is explained).
fn room_hint(l: Layout) -> &'static str {
    if layout::of(l).reserves_capacity() {
        " (image volumes reserve their whole capacity, and existing images hold back what they may still \
         grow into; see docs/pools.md)"
    } else {
        ""
    }
}

/// Whether a repeated CreateVolume asks for the volume that exists (OK) or another one (ALREADY_EXISTS).
fn same_volume(
    existing: &VolumeRecord,
    req: &NewVolume,
    layout: Layout,
    fs_type: &str,
    source: &Option<ContentSource>,
) -> Result<(), StorageError> {
    let conflict = |what: &str| {
        Err(StorageError::Conflict(format!(
            "volume '{}' already exists with another {what}",
            req.name
        )))
    };
    if !req.capacity.admits(existing.capacity_bytes) {
        return Err(StorageError::Conflict(format!(
            "volume '{}' already exists with {} bytes, outside the requested range",
            req.name, existing.capacity_bytes
        )));
    }
    let mut a = existing.access_modes.clone();
    let mut b = req.access_modes.clone();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    if a != b || existing.mode != req.mode || existing.fs_type != fs_type {
        return conflict("capability");
    }
    if existing.layout != layout || existing.parameters != req.parameters {
        return conflict("set of parameters");
    }
    if existing.source != *source {
        return conflict("content source");
    }
    Ok(())
}

/// The filesystem a copy of the image at `src` has: its source's. A request that names another one
/// is refused (the copy would never mount as what its record says).
fn copy_fs_type(src: &std::path::Path, asked: &str) -> Result<String, StorageError> {
    let found = crate::sys::fstools::probe(src)?.ok_or_else(|| {
        StorageError::Unsupported(format!(
            "the source image {} holds no ext4 or xfs filesystem to copy",
            src.display()
        ))
    })?;
    if !asked.is_empty() && asked != found.as_str() {
        return Err(StorageError::Unsupported(format!(
            "a copy keeps its source's filesystem: the source is {found}, the request asks for '{asked}' \
             (leave fsType unset, or set it to {found})"
        )));
    }
    Ok(found.as_str().to_string())
}

/// The nodes that hold a directory volume of a shared pool staged, from their marks on the share.
fn staged_marks(pool: &Pool, key: &Key) -> Result<Vec<String>, StorageError> {
    let dir = pool.staged_dir(key);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::sys::SysError::io("read directory", &dir, e).into()),
    };
    let mut nodes: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    nodes.sort();
    Ok(nodes)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives a new directory volume the owner and mode a StorageClass asked for.
fn set_owner(dir: &std::path::Path, o: Ownership) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    if o.uid.is_some() || o.gid.is_some() {
        std::os::unix::fs::chown(dir, o.uid, o.gid).map_err(|e| crate::sys::SysError::io("chown", dir, e))?;
    }
    if let Some(mode) = o.mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| crate::sys::SysError::io("chmod", dir, e))?;
    }
    Ok(())
}

/// statfs of a pool; on a share it is bounded in time, so a server that is gone answers UNAVAILABLE
/// instead of hanging the call.
fn usage(pool: &Pool) -> Result<statfs::FsUsage, StorageError> {
    Ok(if pool.shared() {
        crate::sys::share::usage(pool.root())?
    } else {
        statfs::usage(pool.root())?
    })
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
        let root = p.root().to_path_buf();
        let shown = rel.display().to_string();
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
            } else if matches!(e.errno(), Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EINVAL)) {
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

    /// Whether any volume here can need a lease: a shared pool that allows the image layout.
    pub fn takes_leases(&self) -> bool {
        self.pools
            .values()
            .any(|p| p.shared() && p.config.layouts.iter().any(|l| layout::of(*l).single_node()))
    }
}
