//! NodeGetVolumeHealth and NodeGetStorageHealth (CSI v1.13), and the one finding about a volume
//! that NodeGetVolumeStats reports as its 1.12 `VolumeCondition` too (docs/health.md).

use std::path::{Path, PathBuf};

use super::{plain_path, NodeError, NodeService};
use crate::csi::health::{self, engine_fault, Fault, Finding};
use crate::csi::v1::node_get_storage_health_response::StorageBackendHealth;
use crate::csi::v1::{
    NodeGetStorageHealthResponse, NodeGetVolumeHealthRequest, NodeGetVolumeHealthResponse, StorageHealthErrorType,
};
use crate::storage::config::Backend;
use crate::storage::id::VolumeId;
use crate::storage::record::VolumeMode;
use crate::sys::files::Entry;
use crate::sys::share;

/// Another node took over the volume's lease while it is staged here.
const LEASE_LOST: Fault = Fault::inaccessible("LeaseLost");
/// The loop device of a staged image volume is gone.
const LOOP_DEVICE_GONE: Fault = Fault::inaccessible("LoopDeviceGone");
/// The staging or publish path is not a mount of the volume (unmounted behind our back).
const NOT_MOUNTED: Fault = Fault::inaccessible("NotMounted");
/// A read-write mount turned read-only: the filesystem hit errors.
const MOUNTED_READ_ONLY: Fault = Fault::degraded("MountedReadOnly");
/// The share under a shared volume, or the volume's mount of it, cannot be reached.
const SHARE_UNREACHABLE: Fault = Fault::inaccessible("ShareUnreachable");
/// The path asked about is not where this node staged or published the volume.
const NOT_STAGED_HERE: Fault = Fault::inaccessible("NotStagedHere");

/// A pool below this share of free space is reported degraded.
const LOW_SPACE_PERCENT: u64 = 5;

impl NodeService {
    /// The volume's health as this node sees it: its data, its lease, its loop device, and whether
    /// the filesystem at `path` is mounted as it was asked to be (not turned read-only by errors).
    pub(super) fn finding(
        &self,
        raw: &str,
        rec: &super::NodeVolume,
        data: &Path,
        path: &Path,
    ) -> Result<Finding, NodeError> {
        if let Some(f) = self.record_finding(raw) {
            return Ok(f);
        }
        let m = self.state.get(raw);
        if !crate::storage::layout::of(rec.layout).is_tree()
            && m.staged.is_some()
            && self.devices.find_by_backing(data)?.is_empty()
        {
            return Ok(Finding::abnormal(
                LOOP_DEVICE_GONE,
                format!("the loop device of {} is gone", data.display()),
            ));
        }
        if rec.mode == VolumeMode::Filesystem {
            if !self.is_mounted(path)? {
                return Ok(Finding::abnormal(
                    NOT_MOUNTED,
                    format!("{} is not a mount of volume {raw}", path.display()),
                ));
            }
            let asked_ro = m
                .published
                .get(path)
                .map(|p| p.flags.read_only)
                .or(m.staged.as_ref().map(|s| s.read_only));
            let table = crate::sys::mountinfo::read(Path::new(crate::sys::mountinfo::SELF))?;
            let now_ro = table
                .iter()
                .rev()
                .find(|e| e.mount_point == path)
                .is_some_and(|e| e.read_only());
            if now_ro && asked_ro == Some(false) {
                return Ok(Finding::abnormal(
                    MOUNTED_READ_ONLY,
                    format!(
                        "{} is mounted read-only although it was published read-write: the filesystem may have hit errors",
                        path.display()
                    ),
                ));
            }
        }
        Ok(Finding::healthy(format!(
            "data at {} is present and mounted",
            data.display()
        )))
    }

    /// What is wrong with the volume wherever it is mounted: its data (engine) and its lease.
    fn record_finding(&self, raw: &str) -> Option<Finding> {
        if let Ok(id) = VolumeId::parse(raw) {
            let cond = self.engine.condition(&id);
            if let Some(fault) = engine_fault(&cond) {
                return Some(Finding::abnormal(fault, cond.message));
            }
        }
        let holder = self.engine.leases.lost(raw)?;
        Some(Finding::abnormal(
            LEASE_LOST,
            format!(
                "node {holder} took over the lease of volume {raw} while it is staged here (this node \
                 could not renew it in time): another node may be using it; unstage it here"
            ),
        ))
    }

    /// NodeGetVolumeHealth: the finding at the path asked about (publish path, else staging path),
    /// else where this node staged or published the volume, else about its data alone.
    pub(super) fn volume_health(
        &self,
        r: NodeGetVolumeHealthRequest,
    ) -> Result<NodeGetVolumeHealthResponse, NodeError> {
        if r.volume_id.is_empty() {
            return Err(NodeError::missing("volume_id"));
        }
        let asked = match (r.volume_publish_path.is_empty(), r.staging_target_path.is_empty()) {
            (false, _) => Some(plain_path("volume_publish_path", &r.volume_publish_path)?),
            (true, false) => Some(plain_path("staging_target_path", &r.staging_target_path)?),
            (true, true) => None,
        };
        let finding = self.finding_at(&r.volume_id, asked)?;
        Ok(NodeGetVolumeHealthResponse {
            volume_health: Some(finding.volume_health(&r.volume_id)),
        })
    }

    fn finding_at(&self, raw: &str, asked: Option<PathBuf>) -> Result<Finding, NodeError> {
        let m = self.state.get(raw);
        let path = asked
            .or_else(|| m.published.keys().next().cloned())
            .or_else(|| m.staged.as_ref().map(|s| s.path.clone()));
        if let Some(path) = &path {
            // As NodeGetVolumeStats: a share that cannot be reached comes before anything else.
            if let Err(message) = self.share_view(raw, path) {
                return Ok(Finding::abnormal(SHARE_UNREACHABLE, message));
            }
        }
        let (rec, data) = self.volume(raw)?;
        let Some(path) = path else {
            return Ok(self.record_finding(raw).unwrap_or_else(|| {
                Finding::healthy(format!(
                    "volume {raw} is not staged or published on this node; its data at {} is present",
                    data.display()
                ))
            }));
        };
        if !path.is_absolute() || self.files.entry(&path)? == Entry::Missing {
            return Ok(Finding::abnormal(
                NOT_MOUNTED,
                format!(
                    "volume path {} does not exist",
                    crate::csi::status::bounded(&path.to_string_lossy())
                ),
            ));
        }
        if let Err(e) = self.require_ours(raw, &path) {
            return Ok(Finding::abnormal(NOT_STAGED_HERE, e.to_string()));
        }
        self.finding(raw, &rec, &data, &path)
    }

    /// NodeGetStorageHealth: pools that could not be opened, shares this node cannot reach, and
    /// pools nearly out of room.
    pub(super) fn storage_health(&self) -> Result<NodeGetStorageHealthResponse, NodeError> {
        let mut backend_health: Vec<StorageBackendHealth> = self
            .engine
            .broken_pools()
            .into_iter()
            .map(|(pool, why)| {
                health::backend(
                    StorageHealthErrorType::StorageUnreachable,
                    "PoolBroken",
                    &format!("pool '{}' cannot be opened: {why}", pool.as_str()),
                )
            })
            .collect();
        let mut unreachable = false;
        for pool in self.engine.pool_names() {
            let Some(cfg) = self.engine.pool_config(&pool) else {
                continue;
            };
            if cfg.backend != Backend::Shared {
                continue;
            }
            if let Err(e) = share::usage(&cfg.path) {
                if share::is_stale(&e) {
                    unreachable = true;
                    backend_health.push(health::backend(
                        StorageHealthErrorType::StorageUnreachable,
                        "ShareUnreachable",
                        &format!(
                            "the share of pool '{}' at {} is not reachable: {e}",
                            pool.as_str(),
                            cfg.path.display()
                        ),
                    ));
                }
            }
        }
        // Free space is measured only when every share answers: a dead one would hang statfs.
        if !unreachable {
            for (name, status) in self.engine.pool_statuses() {
                let p = match status {
                    Ok(p) => p,
                    Err(e) => {
                        backend_health.push(health::backend(
                            StorageHealthErrorType::StorageUnreachable,
                            "PoolUnreadable",
                            &format!("the room of pool '{}' cannot be read: {e}", name.as_str()),
                        ));
                        continue;
                    }
                };
                if p.total_bytes > 0 && p.available_bytes * 100 < p.total_bytes * LOW_SPACE_PERCENT {
                    backend_health.push(health::backend(
                        StorageHealthErrorType::StorageDegraded,
                        "PoolNearlyFull",
                        &format!(
                            "pool '{}' has {} of {} bytes free (less than {LOW_SPACE_PERCENT}%)",
                            p.name.as_str(),
                            p.available_bytes,
                            p.total_bytes
                        ),
                    ));
                }
            }
        }
        Ok(NodeGetStorageHealthResponse { backend_health })
    }
}
