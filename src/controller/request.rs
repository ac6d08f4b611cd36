//! Parsing of Controller requests into typed values: parameters, capacity, topology, sources.

use crate::controller::error::ControllerError;
use std::collections::{BTreeMap, HashMap};

use crate::csi::v1::{self, Topology, TopologyRequirement};
use crate::csi::TOPOLOGY_NODE_KEY;
use crate::storage::config::DeletePolicy;
use crate::storage::engine::{CapacityRange, Mutable, Ownership, Source};
use crate::storage::id::{BackupId, NodeId, PoolName, SnapshotId, VolumeId};
use crate::storage::record::Layout;

/// StorageClass parameters we understand.
pub const PARAM_POOL: &str = "pool";
pub const PARAM_LAYOUT: &str = "layout";
pub const PARAM_DELETE_POLICY: &str = "deletePolicy";
/// Owner and mode of a new directory volume.
pub const PARAM_UID: &str = "uid";
pub const PARAM_GID: &str = "gid";
pub const PARAM_MODE: &str = "mode";
/// The filesystem type; the sidecar normally moves it into the capability, but it may arrive here.
pub const PARAM_FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// Mutable parameters (VolumeAttributesClass).
pub const MUTABLE_COMPRESSION: &str = "compression";
/// Keys the Kubernetes sidecars add (PVC/PV names with --extra-create-metadata); kept, not interpreted.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, Default)]
pub struct VolumeParams {
    pub pool: Option<PoolName>,
    pub layout: Option<Layout>,
    pub delete_policy: Option<DeletePolicy>,
    pub fs_type: Option<String>,
    pub owner: Ownership,
    /// Every parameter as given, so a repeated request can be compared with the first.
    pub all: BTreeMap<String, String>,
}

/// A key the sidecars add to the parameters (kept, not interpreted).
pub fn is_sidecar_key(k: &str) -> bool {
    k.starts_with(SIDECAR_PREFIX)
}

pub fn volume_params(p: &HashMap<String, String>) -> Result<VolumeParams, ControllerError> {
    let mut out = VolumeParams {
        all: p.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ..Default::default()
    };
    for (k, v) in p {
        match k.as_str() {
            PARAM_POOL => out.pool = Some(PoolName::parse(v).map_err(|e| ControllerError::invalid(format!("parameter pool: {e}")))?),
            PARAM_LAYOUT => {
                out.layout = Some(
                    Layout::parse(v)
                        .ok_or_else(|| ControllerError::invalid(format!("parameter layout '{v}' is unknown (known: dir, btrfs, image)")))?,
                )
            }
            PARAM_DELETE_POLICY => out.delete_policy = Some(delete_policy(v)?),
            PARAM_FS_TYPE => out.fs_type = Some(v.clone()),
            PARAM_UID => out.owner.uid = Some(v.parse().map_err(|_| ControllerError::invalid(format!("uid '{v}' is not a number")))?),
            PARAM_GID => out.owner.gid = Some(v.parse().map_err(|_| ControllerError::invalid(format!("gid '{v}' is not a number")))?),
            PARAM_MODE => {
                let m = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| ControllerError::invalid(format!("mode '{v}' is not an octal mode such as 0775")))?;
                out.owner.mode = Some(m);
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            other => {
                return Err(ControllerError::invalid(format!(
                    "unknown parameter '{other}' (known: {PARAM_POOL}, {PARAM_LAYOUT}, {PARAM_DELETE_POLICY}, {PARAM_FS_TYPE}, {PARAM_UID}, {PARAM_GID}, {PARAM_MODE}, and the {SIDECAR_PREFIX}* keys of the sidecars)"
                )))
            }
        }
    }
    Ok(out)
}

fn delete_policy(v: &str) -> Result<DeletePolicy, ControllerError> {
    DeletePolicy::parse(v).ok_or_else(|| {
        ControllerError::invalid(format!(
            "deletePolicy '{v}' is unknown (known: delete, retain, archive)"
        ))
    })
}

/// Mutable parameters: `compression` (btrfs: zstd, lzo, zlib or none) and `deletePolicy`.
pub fn mutable_params(p: &HashMap<String, String>) -> Result<Mutable, ControllerError> {
    let mut m = Mutable::default();
    for (k, v) in p {
        match k.as_str() {
            MUTABLE_COMPRESSION => {
                if !matches!(v.as_str(), "zstd" | "lzo" | "zlib" | "none") {
                    return Err(ControllerError::invalid(format!(
                        "compression '{v}' is unknown (known: zstd, lzo, zlib, none)"
                    )));
                }
                m.compression = Some(v.clone());
            }
            PARAM_DELETE_POLICY => m.delete_policy = Some(delete_policy(v)?),
            other => {
                return Err(ControllerError::invalid(format!(
                "mutable parameter '{other}' is not supported (mutable: {MUTABLE_COMPRESSION}, {PARAM_DELETE_POLICY})"
            )))
            }
        }
    }
    Ok(m)
}

/// VolumeSnapshotClass parameter: freeze a mounted image's filesystem around the copy.
pub const SNAPSHOT_FREEZE: &str = "freeze";

/// Snapshot parameters: `freeze` ("true" or "false") and the sidecars' metadata keys. Returns freeze.
pub fn snapshot_params(p: &HashMap<String, String>) -> Result<bool, ControllerError> {
    let mut freeze = false;
    for (k, v) in p {
        match k.as_str() {
            SNAPSHOT_FREEZE => {
                freeze = match v.as_str() {
                    "true" => true,
                    "false" => false,
                    other => return Err(ControllerError::invalid(format!("snapshot parameter freeze must be true or false, not '{other}'"))),
                }
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            // Checked by backup::backup_request.
            super::backup::BACKUP_REPOSITORY | super::backup::KEEP_LOCAL => {}
            other => {
                return Err(ControllerError::invalid(format!(
                    "unknown snapshot parameter '{other}' (known: {SNAPSHOT_FREEZE}, {}, {}, and the {SIDECAR_PREFIX}* keys of the sidecars)",
                    super::backup::BACKUP_REPOSITORY,
                    super::backup::KEEP_LOCAL
                )))
            }
        }
    }
    Ok(freeze)
}

pub fn capacity(r: Option<&v1::CapacityRange>) -> Result<CapacityRange, ControllerError> {
    let Some(r) = r else {
        return Ok(CapacityRange::default());
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(ControllerError::OutOfRange(format!(
            "capacity must not be negative (required {}, limit {})",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(CapacityRange {
        required: r.required_bytes as u64,
        limit: r.limit_bytes as u64,
    })
}

/// A content source; an ID that is not ours cannot exist here, so it is NOT_FOUND.
pub fn source(s: Option<&v1::VolumeContentSource>) -> Result<Option<Source>, ControllerError> {
    use v1::volume_content_source::Type;
    match s.and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) if s.snapshot_id.starts_with("backup:") => BackupId::parse(&s.snapshot_id)
            .map(|id| Some(Source::Backup(id)))
            .map_err(|_| ControllerError::not_found(format!("source snapshot {} not found", s.snapshot_id))),
        Some(Type::Snapshot(s)) => SnapshotId::parse(&s.snapshot_id)
            .map(|id| Some(Source::Snapshot(id)))
            .map_err(|_| ControllerError::not_found(format!("source snapshot {} not found", s.snapshot_id))),
        Some(Type::Volume(v)) => VolumeId::parse(&v.volume_id)
            .map(|id| Some(Source::Volume(id)))
            .map_err(|_| ControllerError::not_found(format!("source volume {} not found", v.volume_id))),
    }
}

/// The node a topology segment set pins, if it names one.
pub fn topology_node(t: &Topology) -> Option<&str> {
    t.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str)
}

pub fn node_topology(node: &NodeId) -> Topology {
    Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_string(), node.as_str().to_string())].into(),
    }
}

/// Orders the candidate nodes by the request's topology: preferred first (in order), then the rest
/// of the requisite set. With no requirement every node is a candidate.
pub fn rank_nodes(req: Option<&TopologyRequirement>, nodes: &[NodeId]) -> Vec<NodeId> {
    let Some(req) = req.filter(|r| !r.requisite.is_empty() || !r.preferred.is_empty()) else {
        return nodes.to_vec();
    };
    let admits = |t: &Topology, n: &NodeId| topology_node(t).is_none_or(|x| x == n.as_str());
    let allowed: Vec<&NodeId> = if req.requisite.is_empty() {
        nodes.iter().collect()
    } else {
        nodes
            .iter()
            .filter(|n| req.requisite.iter().any(|t| admits(t, n)))
            .collect()
    };
    let mut out: Vec<NodeId> = Vec::new();
    for t in &req.preferred {
        for n in allowed.iter().filter(|n| admits(t, n)) {
            if !out.contains(n) {
                out.push((*n).clone());
            }
        }
    }
    for n in allowed {
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

/// Whether the request's requisite topology admits a node (any node when it names none).
pub fn admits(req: Option<&TopologyRequirement>, node: &NodeId) -> bool {
    !rank_nodes(req, std::slice::from_ref(node)).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
    }

    #[test]
    fn requisite_limits_and_preferred_orders() {
        let nodes = [n("a"), n("b"), n("c")];
        let req = TopologyRequirement {
            requisite: vec![node_topology(&n("b")), node_topology(&n("c"))],
            preferred: vec![node_topology(&n("c"))],
        };
        assert_eq!(rank_nodes(Some(&req), &nodes), vec![n("c"), n("b")]);
        let other = TopologyRequirement {
            requisite: vec![node_topology(&n("z"))],
            preferred: vec![],
        };
        assert!(rank_nodes(Some(&other), &nodes).is_empty());
        assert_eq!(rank_nodes(None, &nodes).len(), 3);
        assert!(admits(Some(&req), &n("b")) && !admits(Some(&req), &n("a")));
        assert!(admits(None, &n("a")));
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let p: HashMap<String, String> = [("colour".to_string(), "blue".to_string())].into();
        assert_eq!(volume_params(&p).unwrap_err().code(), tonic::Code::InvalidArgument);
        let ok: HashMap<String, String> = [("csi.storage.k8s.io/pvc/name".to_string(), "data".to_string())].into();
        assert!(volume_params(&ok).is_ok());
    }
}
