//! The Node service: stages a volume's data at kubelet's staging path and bind-mounts it into pods.

mod error;
mod health;
pub mod state;

pub use error::NodeError;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::crash;
use crate::csi::caps::{self, Capability};
use crate::csi::v1::node_server::Node;
use crate::csi::v1::node_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::v1::*;
use crate::server::trace::note;
use crate::storage::config::PoolConfig;
use crate::storage::engine::LocalEngine;
use crate::storage::id::{NodeId, PoolName, StaticId, VolumeId};
use crate::storage::lease::Claim;
use crate::storage::locks::{Held, InFlight};
use crate::storage::record::{AccessMode, Layout, VolumeMode, VolumeRecord};
use crate::sys::files::{self, Entry};
use crate::sys::fstools::{self, FsType};
use crate::sys::mount::{BindFlags, Mounter};
use crate::sys::statfs;
use crate::sys::{loopdev, share};
use state::{NodeState, Published, Staged, StagedBind};

/// statfs of a shared volume's share and of its mount, taken once per NodeGetVolumeStats.
struct ShareView {
    root: Option<statfs::FsUsage>,
    here: Option<statfs::FsUsage>,
}

/// How many stacked mounts an unmount loop removes before it gives up.
const MAX_STACKED: usize = 16;

/// What the node needs to know of a volume it mounts: its record's facts, or a static volume's (a
/// directory of a shared pool, which has no record).
pub(crate) struct NodeVolume {
    /// As the CO names it: a volume id, or a static volume's handle.
    pub id: String,
    pub layout: Layout,
    pub mode: VolumeMode,
    pub capacity_bytes: u64,
    /// image layout: the size the filesystem inside was last grown to.
    pub fs_bytes: u64,
    pub fs_type: String,
    /// On a shared pool (static volumes are): every node may mount it.
    pub shared: bool,
}

impl From<&VolumeRecord> for NodeVolume {
    fn from(r: &VolumeRecord) -> NodeVolume {
        NodeVolume {
            id: r.id.to_string(),
            layout: r.layout,
            mode: r.mode,
            capacity_bytes: r.capacity_bytes,
            fs_bytes: r.fs_bytes,
            fs_type: r.fs_type.clone(),
            shared: r.id.is_shared(),
        }
    }
}

pub struct NodeService {
    pub node: NodeId,
    pub engine: Arc<LocalEngine>,
    pub mounter: Arc<dyn Mounter>,
    /// Loop devices and filesystem growth, for image volumes.
    pub devices: Arc<dyn crate::sys::devices::Devices>,
    /// Staging and target paths, made and removed (the engine's file operations).
    pub files: Arc<dyn crate::sys::files::Files>,
    pub state: Arc<NodeState>,
    pub in_flight: InFlight,
    pub max_volumes: i64,
    /// The shared pools whose share is unusable now (and why it first was), so an outage is logged
    /// once, not per call.
    share_down: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// Whether NodeGetCapabilities names the CSI 1.13 health RPCs (served either way).
    pub advertise_health: bool,
    /// The paths that stages and publishes running now are to mount (see [`PathClaims`]).
    claims: PathClaims,
}

/// The staging and target paths (as given and resolved) of the stages and publishes running now.
/// The path guard reads the mount state, which a call writes only once it has made its path: two
/// volumes' calls at once, one at a path inside (or at) the other's, both passed the guard, and
/// the inner one made its directory inside the other volume's data and mounted there (or both
/// mounted at one path). A call claims its paths when the guard passes; another volume's call at
/// a path inside, at or above a claimed one is ABORTED until the first ends, and its retry meets
/// the mount state as a call made after it would.
#[derive(Default)]
struct PathClaims(std::sync::Mutex<Vec<PathBuf>>);

/// Paths claimed in [`PathClaims`], given back on drop.
struct PathClaim<'a>(&'a PathClaims, Vec<PathBuf>);

impl PathClaims {
    fn claim(&self, field: &str, paths: Vec<PathBuf>) -> Result<PathClaim<'_>, NodeError> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = held
            .iter()
            .find(|c| paths.iter().any(|p| p.starts_with(c) || c.starts_with(p)))
        {
            return Err(NodeError::InProgress(format!(
                "{field} {} meets {}, where another stage or publish is mounting now; retry",
                paths[0].display(),
                c.display()
            )));
        }
        held.extend(paths.iter().cloned());
        Ok(PathClaim(self, paths))
    }
}

impl Drop for PathClaim<'_> {
    fn drop(&mut self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        for p in &self.1 {
            if let Some(i) = held.iter().position(|c| c == p) {
                held.swap_remove(i);
            }
        }
    }
}

pub const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::StageUnstageVolume,
    rpc::Type::GetVolumeStats,
    rpc::Type::ExpandVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::SingleNodeMultiWriter,
];

impl NodeService {
    /// The Node service over this node's engine and mount state, mounting with real syscalls.
    pub fn new(node: NodeId, engine: Arc<LocalEngine>, state: Arc<NodeState>, max_volumes: i64) -> NodeService {
        let in_flight = InFlight::default();
        engine.set_mounted_here(Arc::new(NodeMounts {
            state: state.clone(),
            in_flight: in_flight.clone(),
        }));
        NodeService {
            node,
            files: engine.files(),
            engine,
            mounter: Arc::new(crate::sys::mount::LinuxMounter::default()),
            devices: Arc::new(crate::sys::devices::LinuxDevices),
            state,
            in_flight,
            max_volumes,
            share_down: Default::default(),
            advertise_health: false,
            claims: Default::default(),
        }
    }
}

/// What a delete asks of this node: its mount state, under the same per-volume lock stage,
/// publish, unpublish and unstage take.
struct NodeMounts {
    state: Arc<NodeState>,
    in_flight: InFlight,
}

impl crate::storage::engine::MountedHere for NodeMounts {
    fn claim(&self, volume_id: &str) -> crate::storage::engine::NodeUse {
        use crate::storage::engine::NodeUse;
        let Some(held) = self.in_flight.try_take(volume_id.to_string()) else {
            return NodeUse::Busy;
        };
        if let Some(why) = self.state.unreadable(volume_id) {
            return NodeUse::Unknown(why);
        }
        let at = self.state.mounted_at(volume_id);
        if at.is_empty() {
            NodeUse::Free(held)
        } else {
            NodeUse::MountedAt(at)
        }
    }
}

/// The last renewal failure of each leased volume (and search of a pool's leases, by its
/// directory), so a share that stays gone is logged once.
static RENEW_ERRORS: std::sync::Mutex<std::collections::BTreeMap<String, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A lease the renewer keeps: of a volume staged here, or of one whose state file cannot be read.
struct Kept {
    volume_id: String,
    lease: PathBuf,
    ttl: std::time::Duration,
    /// The image file of a stage this node knows of; `None` for a volume whose state cannot be
    /// read (which may be staged and in use here all the same).
    backing: Option<PathBuf>,
}

/// Renews the leases of the image volumes of shared pool `pool` that this node has staged, each
/// once a third of its lease time has passed; and, while a volume's state file cannot be read,
/// the lease this node holds of it: it may still be staged and written here, and a lapsed lease
/// would let another node mount the image at the same time.
pub fn renew_leases(engine: &LocalEngine, state: &NodeState, pool: &PoolName) {
    let lease_of = |volume_id: &str| {
        VolumeId::parse(volume_id)
            .ok()
            .filter(|id| id.0.pool == *pool)
            .and_then(|id| engine.shared_lease(&id))
    };
    let mut kept = Vec::new();
    for m in state.all() {
        let Some(backing) = m.staged.as_ref().and_then(|s| s.backing.clone()) else {
            continue;
        };
        let Some((lease, ttl)) = lease_of(&m.volume_id) else {
            continue;
        };
        kept.push(Kept {
            volume_id: m.volume_id,
            lease,
            ttl,
            backing: Some(backing),
        });
    }
    name_unreadable(engine, state, pool);
    for volume_id in state.unreadable_volumes() {
        let Some((lease, ttl)) = lease_of(&volume_id) else {
            continue;
        };
        // Read again: a file repaired or removed since no longer counts.
        if state.unreadable(&volume_id).is_some() {
            kept.push(Kept {
                volume_id,
                lease,
                ttl,
                backing: None,
            });
        }
    }
    // What this pass does not list it does not renew: releases and errors of others are history.
    if let Ok(p) = engine.pool(pool) {
        let listed = kept.iter().map(|k| k.lease.clone()).collect();
        engine.leases.forget_released(&p.leases_dir(), &listed);
    }
    RENEW_ERRORS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|volume, _| {
            VolumeId::parse(volume).map_or(true, |id| id.0.pool != *pool) || kept.iter().any(|k| k.volume_id == *volume)
        });
    for k in kept {
        if !engine.leases.due(&k.lease, k.ttl) {
            continue;
        }
        let renewed = match &k.backing {
            // A volume deleted under a stage has nothing left to lease.
            Some(backing) if !matches!(engine.files().entry(backing), Ok(Entry::File)) => continue,
            Some(_) => engine.leases.renew(&k.lease, &k.volume_id),
            None => engine.leases.renew_existing(&k.lease, &k.volume_id),
        };
        // A share that is gone fails every renewal: say so when the cause appears or changes.
        note_failure(
            &k.volume_id,
            renewed.err().map(|e| e.to_string()),
            "cannot renew lease; retrying",
            "lease renewed again",
        );
        // A lost lease is logged once by the lease itself and shown as the volume's condition.
    }
}

/// Looks among the leases of `pool` for those this node holds of volumes whose state files cannot
/// be read and name no volume (torn): the file's name, the hash of the volume id, tells them.
/// Once per pool, as no new lease of such a volume is taken; a search that fails is tried again.
fn name_unreadable(engine: &LocalEngine, state: &NodeState, pool: &PoolName) {
    let Ok(p) = engine.pool(pool) else {
        return;
    };
    let dir = p.leases_dir();
    if !state.unnamed_unreadable(&dir) {
        return;
    }
    let found = engine.leases.held_in(&dir);
    if let Ok(held) = &found {
        state.name_unreadable(&dir, held);
    }
    note_failure(
        &dir.display().to_string(),
        found.err().map(|e| e.to_string()),
        "cannot list this node's leases for volumes whose state cannot be read; retrying",
        "listed this node's leases again",
    );
}

/// Logs a renewer's failure (of a volume's lease, or a pool's search) when it appears or its cause
/// changes, and its end, once each.
fn note_failure(subject: &str, cause: Option<String>, failing: &str, recovered: &str) {
    let mut last = RENEW_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    match (&cause, last.get(subject)) {
        (Some(c), Some(before)) if c == before => {}
        (Some(c), _) => {
            tracing::warn!(subject, error = c, "{failing}");
            last.insert(subject.to_string(), c.clone());
        }
        (None, Some(_)) => {
            tracing::info!(subject, "{recovered}");
            last.remove(subject);
        }
        (None, None) => {}
    }
}

/// Starts a lease renewer for each shared pool that can lease, on a thread of its own: every second
/// it renews what is due. A call on a share whose server is gone can block in the kernel for as
/// long as the outage lasts; it then holds up only that share's renewals (whose images cannot be
/// written either), never another share's, whose leases would lapse under volumes still mounted.
pub fn start_lease_renewer(engine: Arc<LocalEngine>, state: Arc<NodeState>) {
    for pool in engine.leasing_pools() {
        let (engine, state) = (engine.clone(), state.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("cellar-leases-{}", pool.as_str()))
            .spawn(move || loop {
                renew_leases(&engine, &state, &pool);
                std::thread::sleep(std::time::Duration::from_secs(1));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease renewer");
        }
    }
}

/// A path from the CO: absolute and without `.`/`..` parts, so it means exactly what it says.
fn co_path(field: &'static str, p: &str) -> Result<PathBuf, NodeError> {
    let path = plain_path(field, p)?;
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(NodeError::invalid(format!(
            "{field} '{p}' must be an absolute path without '.' or '..' parts"
        )));
    }
    Ok(path)
}

/// A path field that is present, NUL-free and at most PATH_MAX long (what any path must be).
fn plain_path(field: &'static str, p: &str) -> Result<PathBuf, NodeError> {
    if p.is_empty() {
        return Err(NodeError::missing(field));
    }
    if p.len() > libc::PATH_MAX as usize || p.contains('\0') {
        return Err(NodeError::invalid(format!(
            "{field} must be a path of at most {} bytes without NUL bytes; got {} bytes starting '{}'",
            libc::PATH_MAX,
            p.len(),
            crate::csi::status::bounded(&p[..p.len().min(64)].replace('\0', "\\0"))
        )));
    }
    Ok(PathBuf::from(p))
}

impl NodeService {
    /// A staging or target path (`field`) that a mount may take: none in what cellar manages in a
    /// pool of this node, nor one holding a pool, symbolic links followed (a mount there would
    /// show one volume's data inside another's, or hide a pool). INVALID_ARGUMENT otherwise.
    ///
    /// The paths are claimed until the returned guard drops ([`PathClaims`]).
    fn outside_pools(&self, field: &'static str, path: &Path) -> Result<PathClaim<'_>, NodeError> {
        let real = self.files.resolve(path).map_err(|e| match e.errno() {
            // A part of the path that is a file, a loop of symbolic links, a name too long: the
            // path is wrong, not the node.
            Some(libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG) => {
                NodeError::invalid(format!("{field} {} cannot be a directory here: {e}", path.display()))
            }
            _ => NodeError::Sys(e),
        })?;
        // Inside a volume staged or published here (a bind of its data), or in or above the
        // node's own mount records, as bad.
        if let Some((volume, at)) = self.state.mounted_above(&[path, &real]) {
            return Err(NodeError::invalid(format!(
                "{field} {} is inside {}, where volume {} is mounted; give a path of its own",
                path.display(),
                at.display(),
                crate::csi::status::bounded(&volume)
            )));
        }
        let records = self.state.real_dir();
        if real.starts_with(records) || records.starts_with(&real) {
            return Err(NodeError::invalid(format!(
                "{field} {} is in or above {}, where this node keeps its mount records; give a path outside it",
                path.display(),
                records.display()
            )));
        }
        match self.engine.pool_managing(path, &real) {
            Some(pool) => Err(NodeError::invalid(format!(
                "{field} {} is {} of pool '{}', which cellar manages; give a path outside it (kubelet's are under /var/lib/kubelet)",
                path.display(),
                if real == path { "in or above the data".to_string() } else { format!("(resolved to {}) in or above the data", real.display()) },
                pool.as_str()
            ))),
            None => self.claims.claim(field, vec![path.to_path_buf(), real.clone()]),
        }
    }

    /// Only a path this node staged or published the volume at: any other path would report (or
    /// grow) whatever filesystem happens to be there, such as the node's own root.
    fn require_ours(&self, volume_id: &str, path: &Path) -> Result<(), NodeError> {
        let m = self.state.get(volume_id);
        let ours = m.staged.as_ref().is_some_and(|s| s.path == path) || m.published.contains_key(path);
        if !ours {
            return Err(NodeError::NotFound(format!(
                "volume {volume_id} is not staged or published at {} on this node",
                path.display()
            )));
        }
        Ok(())
    }

    /// The volume's lock for a node call, which needs to know where the volume is mounted here:
    /// refused while its state file cannot be read (an unpublish or unstage answering OK would
    /// leave its mounts for good, and a stage or publish would write over what it recorded).
    fn hold(&self, volume_id: &str) -> Result<Held, NodeError> {
        let held = self.in_flight.try_take(volume_id.to_string()).ok_or_else(|| {
            NodeError::InProgress(format!(
                "an operation on volume {volume_id} is already in progress; retry later"
            ))
        })?;
        if let Some(why) = self.state.unreadable(volume_id) {
            return Err(NodeError::NotReady(why));
        }
        Ok(held)
    }

    fn volume(&self, raw: &str) -> Result<(NodeVolume, PathBuf), NodeError> {
        if let Ok(sid) = StaticId::parse(raw) {
            return self.static_volume(&sid);
        }
        let id = VolumeId::parse(raw).map_err(|_| NodeError::NotFound(format!("volume {raw} not found")))?;
        let (rec, data) = self.engine.volume_data(&id)?;
        Ok((NodeVolume::from(&rec), data))
    }

    /// A static volume: a Filesystem directory of a shared pool, any mode, with no record.
    fn static_volume(&self, sid: &StaticId) -> Result<(NodeVolume, PathBuf), NodeError> {
        let pool = self.engine.pool_config(&sid.pool).ok_or_else(|| {
            NodeError::NotFound(format!(
                "volume {sid} not found: no shared pool '{}'",
                sid.pool.as_str()
            ))
        })?;
        let vol = NodeVolume {
            id: sid.to_string(),
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 0,
            fs_bytes: 0,
            fs_type: String::new(),
            shared: true,
        };
        Ok((vol, pool.path.join(&sid.path)))
    }

    /// The shared pool a volume lives in (None for local volumes and unknown pools).
    fn shared_pool(&self, volume_id: &str) -> Option<(PoolName, &PoolConfig)> {
        let pool = match (VolumeId::parse(volume_id), StaticId::parse(volume_id)) {
            (Ok(id), _) if id.0.node().is_none() => id.0.pool,
            (_, Ok(sid)) => sid.pool,
            _ => return None,
        };
        let cfg = self.engine.pool_config(&pool)?;
        Some((pool, cfg))
    }

    /// A shared volume's view of its share, each statfs bounded in time: `Ok(None)` for a local
    /// volume; else the share's root and, when it can be measured, the volume's mount at `path`.
    /// `Err` says what is gone when the share, or the mount at `path`, is unreachable or stale.
    fn share_view(&self, volume_id: &str, path: &Path) -> Result<Option<ShareView>, String> {
        let Some((pool, cfg)) = self.shared_pool(volume_id) else {
            return Ok(None);
        };
        let what = match &cfg.share {
            Some(s) => format!("share {} of pool '{}'", s.source, pool.as_str()),
            None => format!("the share of pool '{}' at {}", pool.as_str(), cfg.path.display()),
        };
        let root = match share::usage(&cfg.path) {
            Err(e) if share::is_stale(&e) => return Err(format!("{what} is not reachable: {e}")),
            r => r.ok(),
        };
        let here = match share::usage(path) {
            Err(e) if share::is_stale(&e) => {
                return Err(format!(
                    "the mount of volume {volume_id} at {} is stale ({e}); {what} is reachable again and \
                     is mounted afresh at the next publish",
                    path.display()
                ))
            }
            r => r.ok(),
        };
        Ok(Some(ShareView { root, here }))
    }

    /// Checks the share under a shared pool and, when cellar mounts it and it has gone stale
    /// (server restarted, network cut), mounts it again, so nothing stacks on a dead mount.
    fn ensure_share(&self, volume_id: &str) -> Result<(), NodeError> {
        let Some((pool, _)) = self.shared_pool(volume_id) else {
            return Ok(());
        };
        let checked = self.check_share(volume_id);
        let mut down = self.share_down.lock().unwrap_or_else(|p| p.into_inner());
        match &checked {
            // Once per outage: the words of a failing mount vary from one try to the next.
            Err(e) if !down.contains_key(pool.as_str()) => {
                tracing::warn!(pool = pool.as_str(), error = %e, "share unusable; its volumes cannot be staged or published");
                down.insert(pool.as_str().to_string(), e.to_string());
            }
            Ok(()) if down.remove(pool.as_str()).is_some() => {
                tracing::info!(pool = pool.as_str(), "share usable again");
            }
            _ => {}
        }
        checked
    }

    fn check_share(&self, volume_id: &str) -> Result<(), NodeError> {
        let Some((pool, cfg)) = self.shared_pool(volume_id) else {
            return Ok(());
        };
        if let Some(s) = &cfg.share {
            // A remount that failed during an outage leaves a bare directory: mount it now.
            let mounted = crate::sys::mount::statx_mount_root(&cfg.path)
                .ok()
                .flatten()
                .unwrap_or(true);
            if !mounted {
                share::mount(&s.source, &s.fs_type, &s.options, &cfg.path).map_err(|e| {
                    NodeError::ShareGone(format!(
                        "share {} of pool '{}' is not mounted and cannot be mounted: {e}",
                        s.source,
                        pool.as_str()
                    ))
                })?;
                tracing::info!(pool = pool.as_str(), source = s.source, "share mounted again");
            }
        }
        match share::usage(&cfg.path) {
            Ok(_) => Ok(()),
            Err(e) if share::is_stale(&e) => {
                let Some(s) = &cfg.share else {
                    return Err(NodeError::ShareGone(format!(
                        "the share of pool '{}' at {} is not reachable: {e}",
                        pool.as_str(),
                        cfg.path.display()
                    )));
                };
                tracing::warn!(pool = pool.as_str(), source = s.source, error = %e, "share stale; mounting it again");
                share::detach(&cfg.path)?;
                share::mount(&s.source, &s.fs_type, &s.options, &cfg.path).map_err(|e| {
                    NodeError::ShareGone(format!(
                        "share {} of pool '{}' cannot be mounted again: {e}",
                        s.source,
                        pool.as_str()
                    ))
                })?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the volume can serve the capability a stage or publish asks for. One it cannot is
    /// the spec's "Exceeds capabilities": FAILED_PRECONDITION (the request itself is well formed).
    fn check_mode(rec: &NodeVolume, cap: &Capability) -> Result<(), NodeError> {
        if rec.mode != cap.mode {
            return Err(NodeError::Exceeds(format!(
                "volume {} is a {:?} volume; the capability asks for {:?}",
                rec.id, rec.mode, cap.mode
            )));
        }
        let shared = rec.shared;
        if !shared && !cap.access.served_by_local_pool() {
            return Err(NodeError::Exceeds(format!(
                "access mode {:?} needs a shared pool; volume {} is on a local pool",
                cap.access, rec.id
            )));
        }
        // An image volume holds one filesystem: a capability naming another would be mounted as
        // what the image holds, not as what was asked. (Tree layouts take their pool's
        // filesystem and ignore the name.)
        let own_fs = crate::storage::layout::of(rec.layout).has_filesystem() && rec.mode == VolumeMode::Filesystem;
        if own_fs && !cap.fs_type.is_empty() && !rec.fs_type.is_empty() && cap.fs_type != rec.fs_type {
            return Err(NodeError::Exceeds(format!(
                "volume {} holds a {} filesystem; the capability asks for {}",
                rec.id, rec.fs_type, cap.fs_type
            )));
        }
        Ok(())
    }

    /// Removes every mount stacked at `path`.
    /// Refuses to undo a stage or publish at `path` when it now resolves elsewhere than `real`,
    /// where it resolved when it was made (a directory on the way replaced by a symlink since):
    /// umount2 and rmdir follow such links, and would unmount another mount of the same name
    /// while ours stayed, forgotten. The path's directory is resolved, not the path (a mountpoint,
    /// perhaps of a share that is gone: ENOTCONN). A path whose directory is gone, a record of an
    /// earlier boot (none of its mounts is left) or of an earlier release (no `real`) is not
    /// checked.
    fn still_leads_to(&self, path: &Path, real: Option<&state::Resolved>, volume_id: &str) -> Result<(), NodeError> {
        let Some(real) = real.filter(|r| r.this_boot()) else {
            return Ok(());
        };
        let Some(now) = state::Resolved::of(&*self.files, path)? else {
            return Ok(()); // its directory is gone: nothing can be mounted there
        };
        if now == real.path {
            return Ok(());
        }
        Err(NodeError::NotReady(format!(
            "{} now leads to {}, not to {} where volume {volume_id} was mounted (a directory on the \
             way was replaced); nothing is unmounted",
            path.display(),
            now.display(),
            real.path.display(),
        )))
    }

    fn unmount_all(&self, path: &Path) -> Result<(), NodeError> {
        for _ in 0..MAX_STACKED {
            match self.mounter.is_mountpoint(path) {
                Ok(true) => self.unmount_once(path)?,
                // A mount whose share is gone cannot even be looked at; it is detached as it is.
                Err(e) if share::is_stale(&e) => self.mounter.detach(path)?,
                Ok(false) => return Ok(()),
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(NodeError::Broken(format!(
            "{} still mounted after {MAX_STACKED} unmounts",
            path.display()
        )))
    }

    /// One unmount, retried briefly on EBUSY: a tool spawned at that moment (mkfs, resize2fs) holds
    /// copies of our descriptors until it execs, which can keep a mount busy for a few milliseconds.
    fn unmount_once(&self, path: &Path) -> Result<(), NodeError> {
        let mut tries = 0;
        loop {
            match self.mounter.unmount(path) {
                Err(e) if e.errno() == Some(libc::EBUSY) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return Ok(other?),
            }
        }
    }

    fn is_mounted(&self, path: &Path) -> Result<bool, NodeError> {
        match self.mounter.is_mountpoint(path) {
            Ok(m) => Ok(m),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the directory a mount goes on; `true` when we created it.
    fn mount_dir(&self, field: &str, path: &Path) -> Result<bool, NodeError> {
        match self.files.entry(path)? {
            Entry::Missing => {
                self.files.ensure_dir(path, 0o750)?;
                Ok(true)
            }
            Entry::Dir => Ok(false),
            other => Err(NodeError::invalid(format!(
                "{field} {} is a {other:?}, expected a directory",
                path.display()
            ))),
        }
    }

    fn stage(&self, r: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let staging = co_path("staging_target_path", &r.staging_target_path)?;
        let _claim = self.outside_pools("staging_target_path", &staging)?;
        let cap = caps::capability(
            r.volume_capability
                .as_ref()
                .ok_or_else(|| NodeError::missing("volume_capability"))?,
        )?;
        let _held = self.hold(&r.volume_id)?;
        // Race tests hold a stage here, its paths checked and nothing made yet.
        std::thread::sleep(crash::delay("stage:after-path-check"));
        // The share first: a volume's record lives on it, and a share that is gone is UNAVAILABLE,
        // not a volume that is not found.
        self.ensure_share(&r.volume_id)?;
        let (rec, data) = self.volume(&r.volume_id)?;
        Self::check_mode(&rec, &cap)?;
        let static_id = StaticId::parse(&r.volume_id).ok();
        let attrs = StaticAttrs::parse(static_id.is_some(), &r.volume_context)?;
        // A reader access mode or a static volume's readOnly: the stage is read-only (its device
        // too). An `ro` mount option (a PV's mountOptions) mounts it read-only and grows nothing,
        // on a writable device (a journal may need replaying at mount).
        let read_only = cap.access.read_only() || attrs.read_only;
        let mount_ro = read_only || cap.flags.read_only;
        let mut m = self.state.get(&r.volume_id);
        let block = rec.mode == VolumeMode::Block;
        if let Some(s) = &m.staged {
            let here = if block {
                self.image_devices(&data, &m)?.stage.is_some()
            } else {
                self.mounted_or_clear_stale(&s.path)?
            };
            if s.path != staging && here {
                return Err(NodeError::NotReady(format!(
                    "volume {} is already staged at {}",
                    r.volume_id,
                    s.path.display()
                )));
            }
            if s.path == staging && here {
                // A retry is OK; the same path asked read-only where it is read-write (or the
                // reverse) is another stage, which this one is not.
                if s.read_only != read_only {
                    return Err(NodeError::Conflict(format!(
                        "volume {} is already staged at {} {}; this request asks for it {}",
                        r.volume_id,
                        staging.display(),
                        if s.read_only { "read-only" } else { "read-write" },
                        if read_only { "read-only" } else { "read-write" },
                    )));
                }
                // Nor another `subdir` (two PVs of one static handle: kubelet gives them one
                // staging path), whose publishes would show what this stage bound. Other mount
                // options are fine: each publish binds with its own PV's.
                if let Some(bound) = s.bound.as_ref().filter(|b| b.subdir != attrs.subdir) {
                    return Err(NodeError::Conflict(format!(
                        "volume {} is already staged at {} with subdir '{}'; this request asks for subdir '{}': give each subdir a volume handle of its own (static:<pool>:<path>/<subdir>)",
                        r.volume_id,
                        staging.display(),
                        bound.subdir.display(),
                        attrs.subdir.display(),
                    )));
                }
                return Ok(NodeStageVolumeResponse {});
            }
        }
        if !block {
            self.mount_dir("staging_target_path", &staging)?;
            if self.is_mounted(&staging)? {
                return Err(NodeError::NotReady(format!(
                    "staging path {} already holds another mount",
                    staging.display()
                )));
            }
        }
        if crate::storage::layout::of(rec.layout).is_tree() {
            // Pinning the directory first means a symlink planted in its place is refused, not followed.
            let pinned = match &static_id {
                Some(sid) => self.engine.static_dir(&sid.pool, &sid.path.join(&attrs.subdir))?,
                None => files::PinnedDir::open(&data)?,
            };
            let flags = BindFlags {
                read_only: mount_ro,
                ..attrs.flags
            };
            m.staged = Some(Staged {
                path: staging.clone(),
                read_only,
                backing: None,
                bound: Some(StagedBind {
                    subdir: attrs.subdir.clone(),
                    flags,
                }),
                block: false,
                real: state::Resolved::now(&*self.files, &staging),
            });
            self.state.put(m)?;
            // A shared directory volume is deleted by a controller that cannot see this node's
            // mounts: the mark on the share tells it the volume is in use here.
            let marked = match static_id {
                None => Some(VolumeId::parse(&r.volume_id).map_err(|e| NodeError::invalid(e.0))?),
                Some(_) => None,
            };
            let mark_and_bind = || -> Result<(), NodeError> {
                if let Some(id) = &marked {
                    self.engine.mark_staged(id, true)?;
                    // A replica's DeleteVolume may have checked the marks just before ours landed
                    // and moved the data away since: then this stage loses (the delete, which
                    // checks the marks again after its move, loses when ours was first).
                    if !pinned.is_at(&data)? {
                        return Err(NodeError::InProgress(format!(
                            "volume {} is being deleted; it was not staged",
                            r.volume_id
                        )));
                    }
                }
                crash::point("stage:before-mount");
                Ok(self.mounter.bind(&pinned.proc_path(), &staging, flags)?)
            };
            if let Err(e) = mark_and_bind() {
                // Nothing was mounted: neither the intent nor the mark stays (kubelet never
                // unstages a failed stage, and they keep the volume from being deleted). Unless
                // publishes of it are recorded (its staging mount was lost under live pods). If
                // the mark cannot be removed, the intent stays too, for the retry to finish.
                let mut m = self.state.get(&r.volume_id);
                if m.published.is_empty() {
                    if let Some(id) = &marked {
                        self.engine.mark_staged(id, false)?;
                    }
                    m.staged = None;
                    self.state.put(m)?;
                }
                return Err(e);
            }
            return Ok(NodeStageVolumeResponse {});
        }
        let id = VolumeId::parse(&r.volume_id).map_err(|e| NodeError::invalid(e.0))?;
        // image: the intent names the backing file, so a crash after the attach finds the device again.
        m.staged = Some(Staged {
            path: staging.clone(),
            read_only,
            backing: Some(data.clone()),
            bound: None,
            block,
            real: state::Resolved::now(&*self.files, &staging),
        });
        // The devices as they are, before the lease is taken (nothing to give back if this fails).
        let found = self.image_devices(&data, &m)?;
        if let Some((lease, ttl)) = self.engine.shared_lease(&id) {
            if let Claim::HeldBy { node, wait } = self.engine.leases.acquire(&lease, &r.volume_id, ttl)? {
                return Err(NodeError::NotReady(format!(
                    "volume {} is staged on node {node}, which holds its lease: an image volume is \
                     mounted on one node at a time. Unstage it there; if that node is gone, this node \
                     takes the lease over once it has gone {} s without renewal",
                    r.volume_id,
                    wait.as_secs().max(1)
                )));
            }
        }
        // Devices that publishes recorded and that are no longer theirs (a reboot detached them
        // and the kernel may give their numbers to this stage) are forgotten before any attach.
        for (target, p) in m.published.iter_mut() {
            if !found.own.contains_key(target) {
                p.device = None;
            }
        }
        self.state.put(m)?;
        crash::point("stage:before-attach");
        let device = match self.attach(&data, read_only, found.stage) {
            Ok(d) => d,
            Err(e) => {
                // Nothing attached (the image may be gone: a replica deleted it meanwhile): this
                // node does not hold the volume, so neither its intent nor its lease stays.
                if self.devices.find_by_backing(&data).is_ok_and(|d| d.is_empty()) {
                    let mut m = self.state.get(&r.volume_id);
                    m.staged = None;
                    self.state.put(m)?;
                    if let Some((lease, _)) = self.engine.shared_lease(&id) {
                        self.engine.leases.release(&lease, &r.volume_id)?;
                    }
                }
                // The image deleted between reading its record and attaching it: the volume is
                // gone, which is NOT_FOUND, not a fault of this node. Unless its record is still
                // there: a delete moved the data aside to look for users, saw this stage's lease
                // and puts it back; the stage is then to be tried again, not given up.
                if self.files.entry(&data)? == Entry::Missing {
                    let gone = self
                        .volume(&r.volume_id)
                        .err()
                        .is_some_and(|e| Status::from(e).code() == tonic::Code::NotFound);
                    return Err(match gone {
                        true => {
                            NodeError::NotFound(format!("volume {} was deleted while it was being staged", r.volume_id))
                        }
                        false => NodeError::InProgress(format!(
                            "volume {}'s image was moved aside while it was being staged (a delete \
                             is checking whether it is in use); try again",
                            r.volume_id
                        )),
                    });
                }
                return Err(e);
            }
        };
        crash::point("stage:after-attach");
        if block {
            return Ok(NodeStageVolumeResponse {});
        }
        let fs = FsType::parse(&rec.fs_type).ok_or_else(|| {
            NodeError::Broken(format!(
                "volume {} records an unknown filesystem '{}'",
                rec.id, rec.fs_type
            ))
        })?;
        let grow = rec.capacity_bytes > rec.fs_bytes && !mount_ro;
        // A filesystem that came from another node or a backup is recorded as never grown here:
        // whoever sent it chose it, so it is checked before the kernel mounts it, at every stage
        // until one grows it (an ext4 grown offline is checked by that: `e2fsck -f -p`).
        let check_first = rec.fs_bytes == 0 && !(grow && fs == FsType::Ext4);
        let flags = BindFlags {
            read_only: mount_ro,
            ..cap.flags
        };
        let mounted = (|| {
            if check_first {
                self.check_first(&r.volume_id, fs, &device.path, &staging, read_only)?;
            }
            if grow && fs == FsType::Ext4 {
                // ext4 cannot always grow online (it needs CAP_SYS_RESOURCE); unmounted it always can.
                self.devices.grow_offline(fs, &device.path)?;
                self.engine.set_fs_bytes(&id, rec.capacity_bytes)?;
            }
            self.mounter.mount_fs(&device.path, &staging, fs.as_str(), flags)?;
            Ok::<_, NodeError>(())
        })();
        if let Err(e) = mounted {
            self.undo_failed_stage(&r.volume_id, &id, &data)?;
            return Err(Self::mmp_refusal(&r.volume_id, &data, e));
        }
        if grow && fs == FsType::Xfs {
            let grown = (|| {
                self.devices.grow_online(fs, &device.path, &staging)?;
                self.engine.set_fs_bytes(&id, rec.capacity_bytes)?;
                Ok::<_, NodeError>(())
            })();
            if let Err(e) = grown {
                // As a failed mount: nothing stays mounted, attached or leased (the retry grows it);
                // unless publishes of it are mounted (a restage under live pods): then it stays.
                let m = self.state.get(&r.volume_id);
                for target in m.published.keys() {
                    if self.is_mounted(target)? {
                        return Err(e);
                    }
                }
                self.mounter.unmount(&staging)?;
                self.undo_failed_stage(&r.volume_id, &id, &data)?;
                return Err(e);
            }
        }
        Ok(NodeStageVolumeResponse {})
    }

    /// Checks the unmounted filesystem of a volume that came from another node or a backup before
    /// the kernel mounts it for its stage, without repairing anything (`fstools::check`; ext4
    /// read-write stages are checked by the offline grow instead). A journal or log left to
    /// replay (every crash-consistent copy of a mounted filesystem has one) is replayed first,
    /// as the kernel's mount would: an ext4 journal by e2fsck, an xfs log by the kernel alone,
    /// through a read-only, nosuid, nodev, noexec mount at the staging path (nobody uses it
    /// before the stage answers), unmounted at once; then the filesystem is checked again.
    /// Through the read-only device of a reader-only stage nothing can be replayed (nor can the
    /// kernel mount it): FAILED_PRECONDITION.
    fn check_first(
        &self,
        volume_id: &str,
        fs: FsType,
        device: &Path,
        staging: &Path,
        device_ro: bool,
    ) -> Result<(), NodeError> {
        use fstools::Checked;
        if self.devices.check(fs, device, !device_ro)? == Checked::Clean {
            return Ok(());
        }
        let log = match fs {
            FsType::Ext4 => "journal",
            FsType::Xfs => "log",
        };
        if device_ro {
            return Err(NodeError::NotReady(format!(
                "volume {volume_id} came from another node or a backup, and its {fs} filesystem is \
                 checked before its first mount, but its {log} holds changes to replay, which \
                 neither the check nor the kernel can do through the read-only device of a \
                 reader-only stage: stage it once with a writer access mode (that replays, checks \
                 and grows it)"
            )));
        }
        let replay = BindFlags {
            read_only: true,
            nosuid: true,
            nodev: true,
            noexec: true,
            ..Default::default()
        };
        self.mounter.mount_fs(device, staging, fs.as_str(), replay)?;
        if let Err(e) = self.mounter.unmount(staging) {
            // Nothing may stay mounted of a filesystem that has not passed its check.
            self.mounter.detach(staging)?;
            return Err(e.into());
        }
        match self.devices.check(fs, device, true)? {
            Checked::Clean => Ok(()),
            Checked::LogDirty => Err(NodeError::Broken(format!(
                "volume {volume_id}'s {fs} {log} still holds changes after the kernel replayed it; \
                 its filesystem is not mounted"
            ))),
        }
    }

    /// After a failed mount or offline check at stage, this node does not hold the volume: neither
    /// its device, its intent nor a shared volume's lease stays (kubelet never unstages a stage that
    /// failed, and the node that has it mounted must be able to take its lease again). Unless a
    /// publish of it is still mounted (its staging mount was lost under live pods): then nothing
    /// is undone, as an unstage would refuse. Every step is tried; the first error is returned.
    fn undo_failed_stage(&self, volume_id: &str, id: &VolumeId, data: &Path) -> Result<(), NodeError> {
        let mut m = self.state.get(volume_id);
        for target in m.published.keys() {
            if self.is_mounted(target)? {
                return Ok(());
            }
        }
        let mut first = None;
        let mut keep = |r: Result<(), NodeError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        match self.devices.find_by_backing(data) {
            Ok(found) => found
                .iter()
                .for_each(|d| keep(self.devices.detach(d).map_err(Into::into))),
            Err(e) => keep(Err(e.into())),
        }
        m.staged = None;
        keep(self.state.put(m).map_err(Into::into));
        if let Some((lease, _)) = self.engine.shared_lease(id) {
            keep(self.engine.leases.release(&lease, volume_id).map_err(Into::into));
        }
        first.map_or(Ok(()), Err)
    }

    /// A failed mount or offline check of an image whose ext4 multi-mount protection says
    /// another node has it (or e2fsck does) is that, FAILED_PRECONDITION, whatever the errno: the
    /// kernel answers EBUSY since 6.4 and EINVAL before, and e2fsck exits with its own code.
    fn mmp_refusal(volume_id: &str, data: &Path, e: NodeError) -> NodeError {
        match fstools::mmp(data) {
            Ok(Some(fstools::Mmp::InUse { node })) => NodeError::NotReady(format!(
                "volume {volume_id} is mounted on node '{node}' (its filesystem's multi-mount \
                 protection refused this node: {e}); it stages here once that node has unmounted it"
            )),
            Ok(Some(fstools::Mmp::Fsck)) => NodeError::NotReady(format!(
                "volume {volume_id}'s filesystem is marked as being checked by e2fsck ({e}); if no \
                 e2fsck runs on it (one was killed), clear the mark with `tune2fs -f -E clear_mmp` \
                 on its image (see docs/shared.md)"
            )),
            _ => e,
        }
    }

    /// The loop device of an image, attached now or `found` from an earlier attach (after a
    /// restart), sized to the file as it is now.
    fn attach(
        &self,
        data: &Path,
        read_only: bool,
        found: Option<loopdev::LoopDevice>,
    ) -> Result<loopdev::LoopDevice, NodeError> {
        if let Some(d) = found {
            self.devices.refresh_capacity(&d)?;
            return Ok(d);
        }
        let (d, direct) = self.devices.attach(data, read_only)?;
        tracing::debug!(device = %d.path.display(), direct_io = direct, "attached image");
        Ok(d)
    }

    fn unstage(&self, r: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let staging = co_path("staging_target_path", &r.staging_target_path)?;
        let _held = self.hold(&r.volume_id)?;
        let mut m = self.state.get(&r.volume_id);
        // Only what we staged is ever unmounted; anything else at that path is not ours.
        let Some(staged) = m.staged.clone().filter(|s| s.path == staging) else {
            return Ok(NodeUnstageVolumeResponse {});
        };
        // Never while a publish of it is still mounted: a loop device is never detached under a
        // pod, and a shared directory volume's stage mark (what keeps a controller from deleting
        // it) never goes while a pod still writes to it.
        for (target, _) in m.published.iter() {
            if self.is_mounted(target)? {
                return Err(NodeError::NotReady(format!(
                    "volume {} is still published at {}; unpublish it first",
                    r.volume_id,
                    target.display()
                )));
            }
        }
        if !staged.block {
            // (A block stage mounts nothing at its staging path: nothing there is unmounted.)
            self.still_leads_to(&staging, staged.real.as_ref(), &r.volume_id)?;
        }
        if let Some(backing) = &staged.backing {
            // A state of an earlier release does not say it was a block stage: the record does.
            let block = staged.block
                || self
                    .volume(&r.volume_id)
                    .is_ok_and(|(rec, _)| rec.mode == VolumeMode::Block);
            if !block {
                self.unmount_all(&staging)?;
            }
            crash::point("unstage:before-detach");
            for d in self.devices.find_by_backing(backing)? {
                self.devices.detach(&d)?;
            }
            self.await_detached(backing)?;
            if let Some((lease, _)) = VolumeId::parse(&r.volume_id)
                .ok()
                .and_then(|id| self.engine.shared_lease(&id))
            {
                self.engine.leases.release(&lease, &r.volume_id)?;
            }
        } else {
            self.unmount_all(&staging)?;
            if let Ok(id) = VolumeId::parse(&r.volume_id) {
                self.engine.mark_staged(&id, false)?;
            }
        }
        m.staged = None;
        self.state.put(m)?;
        Ok(NodeUnstageVolumeResponse {})
    }

    fn publish(&self, r: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let target = co_path("target_path", &r.target_path)?;
        let _claim = self.outside_pools("target_path", &target)?;
        let cap = caps::capability(
            r.volume_capability
                .as_ref()
                .ok_or_else(|| NodeError::missing("volume_capability"))?,
        )?;
        let staging = co_path("staging_target_path", &r.staging_target_path)?;
        let _held = self.hold(&r.volume_id)?;
        self.ensure_share(&r.volume_id)?;
        let (rec, data) = self.volume(&r.volume_id)?;
        Self::check_mode(&rec, &cap)?;
        let block = rec.mode == VolumeMode::Block;
        let flags = BindFlags {
            read_only: r.readonly || cap.access.read_only() || cap.flags.read_only,
            ..cap.flags
        };
        let mut m = self.state.get(&r.volume_id);
        // A read-only stage (a static volume's readOnly) makes every publish of it read-only too.
        let flags = BindFlags {
            read_only: flags.read_only || m.staged.as_ref().is_some_and(|s| s.path == staging && s.read_only),
            ..flags
        };
        // A static volume's publish carries its own PV's `readOnly` and `mountOptions` (kubelet
        // stages a handle once per node, so the stage may have been made for another PV of it).
        let attrs = StaticAttrs::parse(StaticId::parse(&r.volume_id).is_ok(), &r.volume_context)?;
        let (before, flags) = (
            flags,
            flags.and(BindFlags {
                read_only: attrs.read_only,
                ..attrs.flags
            }),
        );
        if let Some(p) = m.published.get(&target) {
            // (A publish recorded by an earlier release, which left the PV's options out, is the
            // same publish.)
            if (p.flags != flags && p.flags != before) || p.access != cap.access {
                return Err(NodeError::Conflict(format!(
                    "volume {} is already published at {} with other options (read-only {}, access {:?})",
                    r.volume_id,
                    target.display(),
                    p.flags.read_only,
                    p.access
                )));
            }
            if self.is_mounted(&target)? {
                return Ok(NodePublishVolumeResponse {});
            }
        }
        let single_writer = |a: AccessMode| a == AccessMode::SingleNodeSingleWriter;
        for (other, p) in m.published.iter().filter(|(t, _)| **t != target) {
            if (single_writer(cap.access) || single_writer(p.access)) && self.is_mounted(other)? {
                return Err(NodeError::NotReady(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                    r.volume_id,
                    other.display()
                )));
            }
        }
        let staged_here = m.staged.as_ref().is_some_and(|s| s.path == staging);
        let source = if block {
            match self.image_devices(&data, &m)?.stage {
                Some(d) if staged_here => d.path,
                _ => {
                    return Err(NodeError::NotReady(format!(
                        "block volume {} is not staged at {}; call NodeStageVolume first",
                        r.volume_id,
                        staging.display()
                    )))
                }
            }
        } else {
            Self::publishes_what_was_staged(&r.volume_id, &m, &r.volume_context, &attrs)?;
            if !(staged_here && self.staging_alive(&r.volume_id, &rec, &data, &staging, &r.volume_context)?) {
                return Err(NodeError::NotReady(format!(
                    "volume {} is not staged at {}; call NodeStageVolume first",
                    r.volume_id,
                    staging.display()
                )));
            }
            staging.clone()
        };
        let already_ours = m.published.get(&target).map(|p| p.created);
        let created = if block {
            self.mount_file(&target)?
        } else {
            self.mount_dir("target_path", &target)?
        } || already_ours.unwrap_or(false);
        if already_ours.is_none() && self.is_mounted(&target)? {
            return Err(NodeError::NotReady(format!(
                "target path {} already holds another mount",
                target.display()
            )));
        }
        // A device node on a read-only mount still opens for writing: a read-only publish of a
        // block volume whose stage is read-write gets a read-only loop device of its own.
        let staged_rw = m.staged.as_ref().is_some_and(|s| !s.read_only);
        let own_device = block && flags.read_only && staged_rw;
        let kept = m.published.get(&target).and_then(|p| p.device.clone());
        m.published.insert(
            target.clone(),
            Published {
                access: cap.access,
                flags,
                created,
                device: kept,
                real: state::Resolved::now(&*self.files, &target),
            },
        );
        self.state.put(m.clone())?;
        crash::point("publish:before-mount");
        let mut attached = None;
        let source = match own_device {
            false => Ok(source),
            true => self
                .read_only_device(&data, &mut m, &target)
                .inspect(|d| attached = Some(d.clone())),
        };
        let bound = source.and_then(|source| Ok(self.mounter.bind(&source, &target, flags)?));
        if let Err(e) = bound {
            // Leave nothing behind: forget the intent, the device and the file or directory we made.
            if let Some(d) = attached.as_ref().and_then(|d| loop_device(d)) {
                let _ = self.devices.detach(&d);
            }
            m.published.remove(&target);
            self.state.put(m)?;
            if created {
                // Only what is empty: files found there are not ours to delete.
                let _ = self.files.remove_entry(&target);
            }
            return Err(e);
        }
        Ok(NodePublishVolumeResponse {})
    }

    /// The read-only loop device of the read-only block publish at `target`: the one its state
    /// names when it is still attached to the volume's image, else a new one, recorded before
    /// anything is bound from it.
    fn read_only_device(&self, data: &Path, m: &mut state::VolumeMounts, target: &Path) -> Result<PathBuf, NodeError> {
        if let Some(d) = self.image_devices(data, m)?.own.remove(target) {
            return Ok(d.path);
        }
        // Never one nobody owns: a device that merely looks unclaimed may still be bound (two
        // records naming it, or the stage's own made read-only by a privileged pod).
        let (d, _) = self.devices.attach(data, true)?;
        if let Some(p) = m.published.get_mut(target) {
            p.device = Some(d.path.clone());
        }
        if let Err(e) = self.state.put(m.clone()) {
            let _ = self.devices.detach(&d);
            return Err(e.into());
        }
        Ok(d.path)
    }

    /// Whether a path is mounted; a mount whose share went stale is detached and counts as not
    /// mounted, so the caller mounts afresh instead of stacking on a dead mount.
    fn mounted_or_clear_stale(&self, path: &Path) -> Result<bool, NodeError> {
        match self.mounter.is_mountpoint(path) {
            Ok(m) => Ok(m),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) if share::is_stale(&e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale mount; detaching it");
                self.mounter.detach(path)?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A static volume's publish shows what its stage bound: kubelet stages a handle once per
    /// node, so a second PV of the handle naming another `subdir` comes straight to its publish,
    /// which would show the first PV's directory. An empty volume context (a client run by hand)
    /// says nothing and is taken as the stage's: what it gets is no more than the handle names.
    fn publishes_what_was_staged(
        volume_id: &str,
        m: &state::VolumeMounts,
        context: &std::collections::HashMap<String, String>,
        attrs: &StaticAttrs,
    ) -> Result<(), NodeError> {
        let Some(bound) = m.staged.as_ref().and_then(|s| s.bound.as_ref()) else {
            return Ok(());
        };
        // (Not a static volume: its attributes and its stage's subdir are both empty.)
        if !context.is_empty() && attrs.subdir != bound.subdir {
            return Err(NodeError::NotReady(format!(
                "volume {volume_id} is staged on this node with subdir '{}', and this publish asks for subdir '{}': give each subdir a volume handle of its own (static:<pool>:<path>/<subdir>)",
                bound.subdir.display(),
                attrs.subdir.display()
            )));
        }
        Ok(())
    }

    /// Whether the staging mount is usable; one gone stale (its share was remounted or came back)
    /// is bound again, as the stage bound it, before publishing from it: the same directory (a
    /// static volume's `subdir`, never the handle's whole path) with the same flags. A stage
    /// recorded by an earlier release, which kept neither, takes them from the publish's
    /// `volume_context` (the PV's volumeAttributes, the same the stage had).
    fn staging_alive(
        &self,
        volume_id: &str,
        rec: &NodeVolume,
        data: &Path,
        staging: &Path,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<bool, NodeError> {
        match self.mounter.is_mountpoint(staging) {
            Ok(m) => Ok(m),
            Err(e) if share::is_stale(&e) && crate::storage::layout::of(rec.layout).is_tree() => {
                tracing::warn!(volume = volume_id, error = %e, "staging mount stale; binding it again");
                self.ensure_share(volume_id)?;
                let static_id = StaticId::parse(volume_id).ok();
                let staged = self.state.get(volume_id).staged;
                let bound = match staged.as_ref().and_then(|s| s.bound.clone()) {
                    Some(b) => b,
                    None => {
                        let attrs = StaticAttrs::parse(static_id.is_some(), context)?;
                        let read_only = staged.as_ref().is_some_and(|s| s.read_only) || attrs.read_only;
                        StagedBind {
                            subdir: attrs.subdir,
                            flags: BindFlags {
                                read_only,
                                ..attrs.flags
                            },
                        }
                    }
                };
                let pinned = match &static_id {
                    Some(sid) => self.engine.static_dir(&sid.pool, &sid.path.join(&bound.subdir))?,
                    None => files::PinnedDir::open(data)?,
                };
                self.mounter.detach(staging)?;
                self.mounter.bind(&pinned.proc_path(), staging, bound.flags)?;
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the file a raw block device is bound onto; `true` when we created it.
    fn mount_file(&self, path: &Path) -> Result<bool, NodeError> {
        match self.files.entry(path)? {
            Entry::Missing => {
                self.files.create_sized(path, 0)?;
                Ok(true)
            }
            Entry::File | Entry::Other => Ok(false),
            other => Err(NodeError::invalid(format!(
                "target_path {} is a {other:?}; a block volume is published on a file",
                path.display()
            ))),
        }
    }

    /// A detach completes when the last opener of the device closes it, which a tool spawned at
    /// that moment (holding a copy of our descriptors until it execs) can delay a little. Wait for
    /// it, so that an unstaged volume has no loop device left when the call returns.
    fn await_detached(&self, backing: &Path) -> Result<(), NodeError> {
        for _ in 0..200 {
            if self.devices.find_by_backing(backing)?.is_empty() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(NodeError::Broken(format!(
            "the loop device of {} is still attached 2 s after its detach",
            backing.display()
        )))
    }

    fn unpublish(&self, r: NodeUnpublishVolumeRequest) -> Result<NodeUnpublishVolumeResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let target = co_path("target_path", &r.target_path)?;
        let _held = self.hold(&r.volume_id)?;
        let mut m = self.state.get(&r.volume_id);
        let Some(p) = m.published.get(&target).cloned() else {
            return Ok(NodeUnpublishVolumeResponse {}); // not published there by us: nothing to undo
        };
        self.still_leads_to(&target, p.real.as_ref(), &r.volume_id)?;
        self.unmount_all(&target)?;
        crash::point("unpublish:after-unmount");
        // The read-only device of a read-only block publish goes with it (only while it is still
        // its own: a number the kernel gave to another file, or to the stage, is not).
        if let Some(backing) = m.staged.as_ref().and_then(|s| s.backing.clone()) {
            if let Some(dev) = self.image_devices(&backing, &m)?.own.remove(&target) {
                self.devices.detach(&dev)?;
            }
        }
        match self.files.entry(&target)? {
            // Only an empty directory: files in it were written there while nothing was mounted
            // (the mount lost, a reboot) and are not ours to delete; nor is this call to fail on
            // them forever, its state entry keeping the volume from ever being deleted.
            Entry::Dir => {
                if let Err(e) = self.files.remove_dir(&target) {
                    if e.errno() != Some(libc::ENOTEMPTY) {
                        return Err(e.into());
                    }
                    tracing::warn!(volume = r.volume_id, path = %target.display(), "unpublished; the target directory holds files that are not the volume's and is left in place");
                }
            }
            Entry::File if p.created => self.files.remove_entry(&target)?,
            _ => {}
        }
        m.published.remove(&target);
        self.state.put(m)?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    fn stats(&self, r: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let path = plain_path("volume_path", &r.volume_path)?;
        let shared = match self.share_view(&r.volume_id, &path) {
            Ok(v) => v,
            // Nothing can be measured; kubelet shows the condition on the pod's events.
            Err(message) => {
                return Ok(NodeGetVolumeStatsResponse {
                    usage: vec![],
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message,
                    }),
                })
            }
        };
        let (rec, data) = self.volume(&r.volume_id)?;
        if !path.is_absolute() || self.files.entry(&path)? == Entry::Missing {
            return Err(NodeError::NotFound(format!(
                "volume path {} does not exist",
                crate::csi::status::bounded(&r.volume_path)
            )));
        }
        // Where this node does not know where the volume is (its state file is unreadable), the
        // path may well be its: abnormal with why, never NOT_FOUND, and no figures.
        if let Some(why) = self.state.unreadable(&r.volume_id) {
            return Ok(NodeGetVolumeStatsResponse {
                usage: vec![],
                volume_condition: Some(VolumeCondition {
                    abnormal: true,
                    message: why,
                }),
            });
        }
        // A path this node never staged or published the volume at: the spec's "volume does not
        // exist on the specified volume_path", NOT_FOUND (and no figures of whatever filesystem is
        // there). A path of its own whose mount is gone is measured below: abnormal, no figures.
        self.require_ours(&r.volume_id, &path)?;
        let usage = |unit: volume_usage::Unit, total: u64, avail: u64, used: u64| VolumeUsage {
            available: avail as i64,
            total: total as i64,
            used: used as i64,
            unit: unit as i32,
        };
        let condition = Some(self.node_condition(&r.volume_id, &rec, &data, &path)?);
        if rec.mode == VolumeMode::Block {
            let size = self.devices.size(&path).unwrap_or(rec.capacity_bytes);
            return Ok(NodeGetVolumeStatsResponse {
                usage: vec![usage(volume_usage::Unit::Bytes, size, 0, 0)],
                volume_condition: condition,
            });
        }
        if shared.is_none() && !self.is_mounted(&path)? {
            // The volume's mount is gone (a hand-run umount, a lost mount namespace): what statfs
            // would measure at the bare path is the filesystem under it, not the volume.
            return Ok(NodeGetVolumeStatsResponse {
                usage: vec![],
                volume_condition: condition,
            });
        }
        let u = match shared.as_ref().and_then(|v| v.here) {
            Some(u) => u,
            None => statfs::usage(&path)?,
        };
        let mut condition = condition;
        let root = shared.as_ref().and_then(|v| v.root);
        let unenforced = !crate::storage::layout::of(rec.layout).enforces_capacity();
        if let (Some(c), Some(whole), true) = (&mut condition, root, unenforced) {
            // A share that enforces directory quotas (CephFS, Weka, NFS with project quotas) shows
            // the directory's own size; otherwise statfs gives the whole share: say which it is.
            // (Sizes only: free space moves between the two calls.)
            if !c.abnormal {
                c.message += if whole.total_bytes == u.total_bytes {
                    "; usage figures are the whole share's (no directory quota seen)"
                } else {
                    "; usage figures are the volume directory's own quota"
                };
            }
        }
        let own = self.engine.own_usage(&rec.id, rec.layout, &data, rec.capacity_bytes)?;
        let bytes = if let Some((limit, used)) = own {
            let avail = limit.saturating_sub(used).min(u.available_bytes);
            usage(volume_usage::Unit::Bytes, limit, avail, used)
        } else {
            usage(
                volume_usage::Unit::Bytes,
                u.total_bytes,
                u.available_bytes,
                u.used_bytes,
            )
        };
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![
                bytes,
                usage(volume_usage::Unit::Inodes, u.total_inodes, u.free_inodes, u.used_inodes),
            ],
            volume_condition: condition,
        })
    }

    /// The volume's 1.12 condition: the finding NodeGetVolumeHealth reports too (node/health.rs).
    fn node_condition(
        &self,
        raw: &str,
        rec: &NodeVolume,
        data: &Path,
        path: &Path,
    ) -> Result<VolumeCondition, NodeError> {
        self.finding(raw, rec, data, path).map(VolumeCondition::from)
    }

    fn expand(&self, r: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        if r.volume_path.is_empty() {
            return Err(NodeError::missing("volume_path"));
        }
        let path = plain_path("volume_path", &r.volume_path)?;
        let wanted = r.volume_capability.as_ref().map(caps::capability).transpose()?;
        let (rec, data) = self.volume(&r.volume_id)?;
        if let Some(c) = &wanted {
            // The spec's "Exceeds capabilities" of NodeExpandVolume is INVALID_ARGUMENT (at stage
            // and publish it is FAILED_PRECONDITION).
            Self::check_mode(&rec, c).map_err(|e| NodeError::invalid(e.to_string()))?;
        }
        self.require_ours(&r.volume_id, &path)?;
        if self.files.entry(&path)? == Entry::Missing {
            return Err(NodeError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        if !crate::storage::layout::of(rec.layout).has_filesystem() {
            // Tree layouts (dir, btrfs) have no filesystem of their own to grow.
            return Ok(NodeExpandVolumeResponse {
                capacity_bytes: rec.capacity_bytes as i64,
            });
        }
        let _held = self.hold(&r.volume_id)?;
        let m = self.state.get(&r.volume_id);
        let found = self.image_devices(&data, &m)?;
        let Some(device) = found.stage else {
            return Err(NodeError::NotReady(format!(
                "volume {} is not staged on this node; it grows when it is staged",
                r.volume_id
            )));
        };
        // Every device of the image grows: the stage's and those of read-only block publishes.
        for d in &found.all {
            self.devices.refresh_capacity(d)?;
        }
        if rec.mode == VolumeMode::Block {
            return Ok(NodeExpandVolumeResponse {
                capacity_bytes: self.devices.size(&device.path)? as i64,
            });
        }
        let fs = FsType::parse(&rec.fs_type).unwrap_or(FsType::Ext4);
        let id = VolumeId::parse(&r.volume_id).map_err(|e| NodeError::invalid(e.0))?;
        match self.devices.grow_online(fs, &device.path, &path) {
            Ok(()) => {
                self.engine.set_fs_bytes(&id, rec.capacity_bytes)?;
                Ok(NodeExpandVolumeResponse {
                    capacity_bytes: rec.capacity_bytes as i64,
                })
            }
            Err(e) if fs == FsType::Ext4 && cannot_grow_online(&e) => {
                // It grows offline at the next stage (the record still says it is smaller than
                // its capacity). A read-write stage answers the spec's "Volume in use":
                // FAILED_PRECONDITION, so kubelet does not mark the resize done while the
                // filesystem is its old size; it asks again once the volume is mounted anew (after
                // a restage it has nothing left to grow: OK). A read-only stage grows nothing
                // anyway: the size it has now. Any other failure is the error itself, which kubelet
                // retries.
                let now = statfs::usage(&path)?.total_bytes;
                tracing::warn!(volume = r.volume_id, error = %e, size = now, "ext4 cannot grow online here; it will grow at the next stage");
                if m.staged.as_ref().is_some_and(|s| !s.read_only) {
                    return Err(NodeError::NotReady(format!(
                        "volume {}'s ext4 filesystem cannot grow while it is mounted on this node \
                         ({e}); it has {now} bytes and grows to {} at its next stage: restart the \
                         pods that use it",
                        r.volume_id, rec.capacity_bytes
                    )));
                }
                Ok(NodeExpandVolumeResponse {
                    capacity_bytes: now as i64,
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether an online grow failed because this kernel or process may not grow a mounted filesystem
/// (no CAP_SYS_RESOURCE, no online resize support), not because of a passing fault.
fn cannot_grow_online(e: &crate::sys::SysError) -> bool {
    let said = e.to_string();
    [
        "Permission denied",
        "Operation not permitted",
        "not supported",
        "does not support",
    ]
    .iter()
    .any(|s| said.contains(s))
}

/// The loop devices attached to a volume's image, told apart by what the node recorded and by the
/// kernel's read-only flag, never by number alone: numbers are reused after a reboot or a detach.
struct ImageDevices {
    /// The stage's device: read-only exactly when the stage is.
    stage: Option<loopdev::LoopDevice>,
    /// The read-only device of each read-only block publish of a read-write stage, by target: the
    /// one its state records, while that device is attached to the image, read-only and recorded
    /// by no other publish.
    own: std::collections::BTreeMap<PathBuf, loopdev::LoopDevice>,
    /// Every device attached to the image.
    all: Vec<loopdev::LoopDevice>,
}

impl NodeService {
    fn image_devices(&self, data: &Path, m: &state::VolumeMounts) -> Result<ImageDevices, NodeError> {
        let stage_read_only = m.staged.as_ref().is_some_and(|s| s.read_only);
        let mut attached = Vec::new();
        for d in self.devices.find_by_backing(data)? {
            match self.devices.is_read_only(&d) {
                Ok(ro) => attached.push((d, ro)),
                Err(e) if e.is_not_found() => {} // detached meanwhile
                Err(e) => return Err(e.into()),
            }
        }
        let mut own = std::collections::BTreeMap::new();
        if !stage_read_only {
            for (target, p) in &m.published {
                let Some(recorded) = &p.device else { continue };
                let claims = m.published.values().filter(|o| o.device.as_ref() == Some(recorded));
                let device = attached.iter().find(|(d, ro)| *ro && &d.path == recorded);
                if let (1, Some((d, _))) = (claims.count(), device) {
                    own.insert(target.clone(), d.clone());
                }
            }
        }
        // Any other device (one a publish attached and stopped before recording) is nobody's:
        // never bound from anew, detached at unstage with every device of the image.
        let stage = attached
            .iter()
            .find(|(d, ro)| *ro == stage_read_only && !own.values().any(|o| o.path == d.path))
            .map(|(d, _)| d.clone());
        let all = attached.into_iter().map(|(d, _)| d).collect();
        Ok(ImageDevices { stage, own, all })
    }
}

/// The loop device at `/dev/loopN`.
fn loop_device(path: &Path) -> Option<loopdev::LoopDevice> {
    let n = path.to_str()?.strip_prefix("/dev/loop")?.parse().ok()?;
    Some(loopdev::LoopDevice::new(n))
}

/// Runs blocking node work (mounts, fsyncs) off the async runtime.
async fn blocking<T: Send + 'static>(
    svc: &Arc<NodeService>,
    f: impl FnOnce(&NodeService) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, Status> {
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|e| NodeError::Broken(format!("node task failed: {e}")))?
        .map_err(Status::from)
}

/// The tonic-facing wrapper: one Arc so each call can move onto the blocking pool.
pub struct NodeServer(pub Arc<NodeService>);

#[tonic::async_trait]
impl Node for NodeServer {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.stage(r)).await.map(Response::new)
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.unstage(r)).await.map(Response::new)
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.publish(r)).await.map(Response::new)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.unpublish(r)).await.map(Response::new)
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.stats(r)).await.map(Response::new)
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.expand(r)).await.map(Response::new)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .chain(crate::csi::health::node_capabilities(self.0.advertise_health))
            .map(|t| NodeServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.node.as_str().to_string(),
            max_volumes_per_node: self.0.max_volumes,
            accessible_topology: Some(crate::controller::request::node_topology(&self.0.node)),
        }))
    }

    async fn node_get_volume_health(
        &self,
        req: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        blocking(&self.0, move |s| s.volume_health(r)).await.map(Response::new)
    }

    async fn node_get_storage_health(
        &self,
        _: Request<NodeGetStorageHealthRequest>,
    ) -> Result<Response<NodeGetStorageHealthResponse>, Status> {
        blocking(&self.0, |s| s.storage_health()).await.map(Response::new)
    }
}

/// What a static volume's PV may say in its volumeAttributes.
#[derive(Debug, Default)]
struct StaticAttrs {
    /// A directory below the handle's path to stage instead.
    subdir: PathBuf,
    read_only: bool,
    flags: BindFlags,
}

impl StaticAttrs {
    fn parse(is_static: bool, ctx: &std::collections::HashMap<String, String>) -> Result<StaticAttrs, NodeError> {
        let mut a = StaticAttrs::default();
        if !is_static {
            return Ok(a);
        }
        if let Some(s) = ctx.get("subdir").filter(|s| !s.is_empty()) {
            a.subdir = crate::storage::id::relative_path(s)
                .map_err(|e| NodeError::invalid(format!("volumeAttributes subdir '{s}': {e}")))?;
        }
        if let Some(r) = ctx.get("readOnly") {
            a.read_only = match r.as_str() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(NodeError::invalid(format!(
                        "volumeAttributes readOnly must be true or false, not '{other}'"
                    )))
                }
            };
        }
        if let Some(o) = ctx.get("mountOptions") {
            a.flags = caps::bind_flags(std::slice::from_ref(o))?;
        }
        a.read_only |= a.flags.read_only;
        Ok(a)
    }
}

#[cfg(test)]
mod random;
#[cfg(test)]
mod tests;
