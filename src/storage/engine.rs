//! The node's storage engine: creates, deletes, expands and snapshots the volumes of this node's
//! local pools. All calls are blocking (they touch disks); the agent runs them off the async runtime.
//!
//! Records on disk are the truth; the in-memory index is a cache of them that every change updates
//! after the disk, so a crash at any point leaves the disk in a state the next call converges from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::crash;
use crate::sys::{copy, files, statfs};

use super::config::{Backend, Config};
use super::id::{Key, Location, NodeId, ObjectId, PoolName, SnapshotId, VolumeId};
use super::locks::{Held, InFlight};
use super::pool::{Kind, Pool};
use super::record::{
    self, AccessMode, ContentSource, Layout, SnapshotRecord, VolumeMode, VolumeRecord, RECORD_VERSION,
};
use super::StorageError;

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
}

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
    pub layouts: Vec<Layout>,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

pub struct LocalEngine {
    node: NodeId,
    pools: BTreeMap<PoolName, Pool>,
    default_pool: PoolName,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
    snapshots: Mutex<BTreeMap<String, SnapshotRecord>>,
    in_flight: InFlight,
}

fn now() -> (i64, i32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl LocalEngine {
    /// Opens every local pool of the configuration and loads their records.
    pub fn open(node: NodeId, config: &Config) -> Result<LocalEngine, StorageError> {
        let mut pools = BTreeMap::new();
        for pc in config.pools.iter().filter(|p| p.backend == Backend::Local) {
            pools.insert(pc.name.clone(), Pool::open(pc.clone())?);
        }
        let engine = LocalEngine {
            node,
            pools,
            default_pool: config.default_pool.clone(),
            volumes: Mutex::new(BTreeMap::new()),
            snapshots: Mutex::new(BTreeMap::new()),
            in_flight: InFlight::default(),
        };
        engine.load()?;
        Ok(engine)
    }

    fn load(&self) -> Result<(), StorageError> {
        let mut vols = BTreeMap::new();
        let mut snaps = BTreeMap::new();
        for pool in self.pools.values() {
            for key in pool.record_keys(Kind::Volume)? {
                if let Some(r) = record::load::<VolumeRecord>(&pool.record_path(Kind::Volume, &key))? {
                    vols.insert(r.id.clone(), r);
                }
            }
            for key in pool.record_keys(Kind::Snapshot)? {
                if let Some(r) = record::load::<SnapshotRecord>(&pool.record_path(Kind::Snapshot, &key))? {
                    snaps.insert(r.id.clone(), r);
                }
            }
        }
        *lock(&self.volumes) = vols;
        *lock(&self.snapshots) = snaps;
        Ok(())
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn pool_names(&self) -> Vec<PoolName> {
        self.pools.keys().cloned().collect()
    }

    fn known_pools(&self) -> String {
        self.pools.keys().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
    }

    fn pool(&self, name: &PoolName) -> Result<&Pool, StorageError> {
        self.pools.get(name).ok_or_else(|| StorageError::UnknownPool {
            name: name.as_str().to_string(),
            known: self.known_pools(),
        })
    }

    /// The pool of an object ID, if the ID names this node and one of its pools.
    fn locate(&self, id: &ObjectId) -> Option<&Pool> {
        match &id.location {
            Location::Local(n) if *n == self.node => self.pools.get(&id.pool),
            _ => None,
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
            location: Location::Local(self.node.clone()),
            pool: pool.clone(),
            key: key.clone(),
        })
    }

    pub fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        let pool_name = req.pool.clone().unwrap_or_else(|| self.default_pool.clone());
        let pool = self.pool(&pool_name)?;
        let layout = req.layout.unwrap_or(pool.config.default_layout);
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
        if let Some(m) = req.access_modes.iter().find(|m| !m.served_by_local_pool()) {
            return Err(StorageError::Unsupported(format!(
                "access mode {m:?} needs a shared pool; pool '{}' is local (local pools serve single-node modes and MULTI_NODE_READER_ONLY)",
                pool_name.as_str()
            )));
        }
        if req.mode == VolumeMode::Block && layout == Layout::Dir {
            return Err(StorageError::Unsupported(
                "volume mode Block needs layout 'image'; layout 'dir' serves Filesystem volumes only".into(),
            ));
        }
        let capacity = req.capacity.choose()?;
        let key = Key::from_name(&req.name);
        let id = self.volume_id(&pool_name, &key);
        let _held = self.take(Kind::Volume, &pool_name, &key, &id.to_string())?;

        let source = match &req.source {
            None => None,
            Some(Source::Snapshot(s)) => Some(ContentSource::Snapshot(s.to_string())),
            Some(Source::Volume(v)) => Some(ContentSource::Volume(v.to_string())),
        };
        if let Some(existing) = lock(&self.volumes).get(&id.to_string()) {
            return same_volume(existing, &req, layout, &source).map(|()| existing.clone());
        }

        let avail = statfs::usage(pool.root())?.available_bytes;
        if capacity > avail {
            return Err(StorageError::Exhausted(format!(
                "pool '{}' has {avail} bytes free, the volume needs {capacity}",
                pool_name.as_str()
            )));
        }

        let data = pool.data_path(Kind::Volume, &key);
        match &req.source {
            None => {
                files::ensure_dir(&data, 0o777)?;
                // The mode must not be narrowed by the process umask: workloads run as any user.
                std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                    .map_err(|e| crate::sys::SysError::io("chmod", &data, e))?;
            }
            Some(src) => {
                let (src_path, src_size, _src_held) = self.source_data(src)?;
                if src_size > capacity {
                    return Err(StorageError::OutOfRange(format!(
                        "the source holds {src_size} bytes of capacity but the new volume asks for {capacity}"
                    )));
                }
                self.build_copy(pool, Kind::Volume, &key, &src_path)?;
            }
        }
        crash::point("create-volume:before-record");
        let (secs, _) = now();
        let rec = VolumeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            id: id.to_string(),
            layout,
            capacity_bytes: capacity,
            mode: req.mode,
            access_modes: req.access_modes.clone(),
            fs_type: req.fs_type.clone(),
            parameters: req.parameters.clone(),
            source,
            created_unix_secs: secs,
        };
        record::store(&pool.record_path(Kind::Volume, &key), &rec)?;
        lock(&self.volumes).insert(rec.id.clone(), rec.clone());
        Ok(rec)
    }

    /// The data of a content source, its size, and a lock that keeps it from being deleted mid-copy.
    fn source_data(&self, src: &Source) -> Result<(PathBuf, u64, Held), StorageError> {
        match src {
            Source::Snapshot(s) => {
                let shown = s.to_string();
                let pool = self
                    .locate(&s.0)
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                let held = self.take(Kind::Snapshot, &s.0.pool, &s.0.key, &shown)?;
                let rec = lock(&self.snapshots)
                    .get(&shown)
                    .cloned()
                    .ok_or_else(|| StorageError::SnapshotNotFound(shown.clone()))?;
                Ok((pool.data_path(Kind::Snapshot, &s.0.key), rec.size_bytes, held))
            }
            Source::Volume(v) => {
                let shown = v.to_string();
                let pool = self
                    .locate(&v.0)
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                let held = self.take(Kind::Volume, &v.0.pool, &v.0.key, &shown)?;
                let rec = lock(&self.volumes)
                    .get(&shown)
                    .cloned()
                    .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
                Ok((pool.data_path(Kind::Volume, &v.0.key), rec.capacity_bytes, held))
            }
        }
    }

    /// Copies `src` into `.work` and renames it into place, so the data path only ever holds a whole
    /// copy. A copy already in place (a crash after the rename) is kept as it is.
    fn build_copy(&self, pool: &Pool, kind: Kind, key: &Key, src: &std::path::Path) -> Result<(), StorageError> {
        let data = pool.data_path(kind, key);
        if files::entry(&data)? == files::Entry::Dir {
            return Ok(());
        }
        let work = pool.work_path(kind, key);
        files::remove_tree(&work)?;
        copy::copy_tree(src, &work)?;
        crash::point("copy:before-rename");
        std::fs::rename(&work, &data).map_err(|e| crate::sys::SysError::io("rename", &data, e))?;
        Ok(())
    }

    pub fn delete_volume(&self, id: &VolumeId) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0) else {
            return Ok(()); // not ours and not a pool here: nothing to delete
        };
        let _held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &id.to_string())?;
        self.remove_object(pool, Kind::Volume, &id.0.key)?;
        lock(&self.volumes).remove(&id.to_string());
        Ok(())
    }

    /// Moves the data into the trash, removes the record durably, then purges the trash. A crash
    /// before the record is gone leaves a record whose data is missing; the retried delete finishes.
    fn remove_object(&self, pool: &Pool, kind: Kind, key: &Key) -> Result<(), StorageError> {
        let data = pool.data_path(kind, key);
        let trashed = pool
            .trash_dir()
            .join(format!("{}-{}", key.as_str(), uuid::Uuid::new_v4().simple()));
        let moved = match files::entry(&data)? {
            files::Entry::Missing => false,
            _ => {
                std::fs::rename(&data, &trashed).map_err(|e| crate::sys::SysError::io("rename", &data, e))?;
                true
            }
        };
        crash::point("delete:after-trash");
        files::remove_file_if_exists(&pool.record_path(kind, key))?;
        files::sync_dir(&pool.collection_dir(kind))?;
        if moved {
            files::remove_tree(&trashed)?;
        }
        Ok(())
    }

    pub fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<VolumeRecord, StorageError> {
        let shown = id.to_string();
        let pool = self
            .locate(&id.0)
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let _held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &shown)?;
        let mut rec = self
            .volume(id)
            .ok_or_else(|| StorageError::VolumeNotFound(shown.clone()))?;
        let wanted = range.choose()?;
        if wanted < rec.capacity_bytes {
            if range.admits(rec.capacity_bytes) {
                return Ok(rec); // already at least as large and within the limit
            }
            return Err(StorageError::OutOfRange(format!(
                "volume {shown} has {} bytes; volumes cannot shrink (asked for {wanted})",
                rec.capacity_bytes
            )));
        }
        if wanted == rec.capacity_bytes {
            return Ok(rec);
        }
        rec.capacity_bytes = wanted;
        record::store(&pool.record_path(Kind::Volume, &id.0.key), &rec)?;
        lock(&self.volumes).insert(shown, rec.clone());
        Ok(rec)
    }

    pub fn volume(&self, id: &VolumeId) -> Option<VolumeRecord> {
        lock(&self.volumes).get(&id.to_string()).cloned()
    }

    pub fn volumes(&self) -> Vec<VolumeRecord> {
        lock(&self.volumes).values().cloned().collect()
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

    /// Looks a CSI name up in every pool (one map lookup per pool).
    pub fn volume_named(&self, name: &str) -> Option<VolumeRecord> {
        let key = Key::from_name(name);
        let vols = lock(&self.volumes);
        self.pools.keys().find_map(|p| {
            vols.get(&self.volume_id(p, &key).to_string())
                .filter(|r| r.name == name)
                .cloned()
        })
    }

    pub fn snapshot_named(&self, name: &str) -> Option<SnapshotRecord> {
        let key = Key::from_name(name);
        let snaps = lock(&self.snapshots);
        self.pools.keys().find_map(|p| {
            let id = SnapshotId(ObjectId {
                location: Location::Local(self.node.clone()),
                pool: p.clone(),
                key: key.clone(),
            });
            snaps.get(&id.to_string()).filter(|r| r.name == name).cloned()
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
        let Ok((_, data)) = self.volume_data(id) else {
            return Condition {
                abnormal: true,
                message: format!("volume {id} has no record on node {}", self.node.as_str()),
            };
        };
        match files::entry(&data) {
            Ok(files::Entry::Dir) => Condition {
                abnormal: false,
                message: "volume data is present".into(),
            },
            Ok(other) => Condition {
                abnormal: true,
                message: format!("volume data {} is {other:?}, expected a directory", data.display()),
            },
            Err(e) => Condition {
                abnormal: true,
                message: format!("volume data {} cannot be read: {e}", data.display()),
            },
        }
    }

    pub fn create_snapshot(&self, name: &str, source: &VolumeId) -> Result<SnapshotRecord, StorageError> {
        let shown_src = source.to_string();
        let pool = self
            .locate(&source.0)
            .ok_or_else(|| StorageError::VolumeNotFound(shown_src.clone()))?;
        let key = Key::from_name(name);
        let id = SnapshotId(ObjectId {
            location: Location::Local(self.node.clone()),
            pool: source.0.pool.clone(),
            key: key.clone(),
        });
        let _held = self.take(Kind::Snapshot, &source.0.pool, &key, &id.to_string())?;
        if let Some(existing) = lock(&self.snapshots).get(&id.to_string()) {
            if existing.source_volume_id == shown_src {
                return Ok(existing.clone());
            }
            return Err(StorageError::Conflict(format!(
                "snapshot '{name}' already exists for volume {}, not {shown_src}",
                existing.source_volume_id
            )));
        }
        let (src_path, size, _src_held) = self.source_data(&Source::Volume(source.clone()))?;
        self.build_copy(pool, Kind::Snapshot, &key, &src_path)?;
        crash::point("create-snapshot:before-record");
        let (secs, nanos) = now();
        let rec = SnapshotRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            id: id.to_string(),
            source_volume_id: shown_src,
            size_bytes: size,
            created_unix_secs: secs,
            created_nanos: nanos,
        };
        record::store(&pool.record_path(Kind::Snapshot, &key), &rec)?;
        lock(&self.snapshots).insert(rec.id.clone(), rec.clone());
        Ok(rec)
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0) else {
            return Ok(());
        };
        let _held = self.take(Kind::Snapshot, &id.0.pool, &id.0.key, &id.to_string())?;
        self.remove_object(pool, Kind::Snapshot, &id.0.key)?;
        lock(&self.snapshots).remove(&id.to_string());
        Ok(())
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotRecord> {
        lock(&self.snapshots).get(&id.to_string()).cloned()
    }

    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        lock(&self.snapshots).values().cloned().collect()
    }

    pub fn pool_status(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.pools
            .values()
            .map(|p| {
                let u = statfs::usage(p.root())?;
                Ok(PoolStatus {
                    name: p.config.name.clone(),
                    layouts: p.config.layouts.clone(),
                    total_bytes: u.total_bytes,
                    available_bytes: u.available_bytes,
                })
            })
            .collect()
    }

    pub fn default_pool(&self) -> &PoolName {
        &self.default_pool
    }
}

/// Whether a repeated CreateVolume asks for the volume that exists (OK) or another one (ALREADY_EXISTS).
fn same_volume(
    existing: &VolumeRecord,
    req: &NewVolume,
    layout: Layout,
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
    if a != b || existing.mode != req.mode || existing.fs_type != req.fs_type {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
