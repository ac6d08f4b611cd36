//! The GroupController service: group snapshots, snapshots of several volumes cut at one point
//! in time by the node that holds them (docs/group-snapshots.md).
//!
//! What a group guarantees depends on its members' layouts: image volumes with a filesystem are
//! frozen together, so the group is one point in time; dir and btrfs volumes (and raw block
//! images) cannot be stopped one by one, so a group of them is refused unless the class says
//! `consistency: per-volume`. All members must live on one node (or in the shared pools): the
//! freeze barrier runs on the node that cuts the group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::ControllerService;
use crate::agent::{Agent, Rendezvous};
use crate::controller::answer;
use crate::controller::error::ControllerError;
use crate::csi::v1::group_controller_server::GroupController;
use crate::csi::v1::group_controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::v1::*;
use crate::server::trace::note;
use crate::storage::engine::{member_snapshot_id, same_volumes, NewGroup};
use crate::storage::id::{GroupId, Key, NodeId, ObjectId, SnapshotId, VolumeId};
use crate::storage::record::{GroupMember, GroupRecord};
use crate::storage::StorageError;

/// VolumeGroupSnapshotClass parameters we understand.
pub const PARAM_CONSISTENCY: &str = "consistency";
pub const PARAM_FREEZE_TIMEOUT: &str = "freezeTimeoutSeconds";
/// How long members' filesystems stay frozen at most when the class does not say.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_FREEZE_TIMEOUT_SECS: u64 = 600;
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupParams {
    per_volume: bool,
    freeze_timeout: Duration,
    all: BTreeMap<String, String>,
}

fn group_params(p: &HashMap<String, String>) -> Result<GroupParams, ControllerError> {
    let mut out = GroupParams {
        per_volume: false,
        freeze_timeout: DEFAULT_FREEZE_TIMEOUT,
        all: p.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    for (k, v) in p {
        match k.as_str() {
            PARAM_CONSISTENCY => {
                out.per_volume = match v.as_str() {
                    "group" => false,
                    "per-volume" => true,
                    other => {
                        return Err(ControllerError::invalid(format!(
                            "parameter {PARAM_CONSISTENCY} must be 'group' (one point in time, image volumes) or \
                             'per-volume' (each member consistent on its own), not '{other}'"
                        )))
                    }
                }
            }
            PARAM_FREEZE_TIMEOUT => {
                let secs = v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=MAX_FREEZE_TIMEOUT_SECS).contains(s))
                    .ok_or_else(|| {
                        ControllerError::invalid(format!(
                            "parameter {PARAM_FREEZE_TIMEOUT} must be a number of seconds from 1 to \
                             {MAX_FREEZE_TIMEOUT_SECS}, not '{v}'"
                        ))
                    })?;
                out.freeze_timeout = Duration::from_secs(secs);
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            other => {
                return Err(ControllerError::invalid(format!(
                    "unknown group snapshot parameter '{other}' (known: {PARAM_CONSISTENCY}, {PARAM_FREEZE_TIMEOUT}, \
                     and the {SIDECAR_PREFIX}* keys of the sidecars)"
                )))
            }
        }
    }
    Ok(out)
}

fn csi_group(g: &GroupRecord) -> VolumeGroupSnapshot {
    let at = Timestamp {
        seconds: g.created_unix_secs,
        nanos: g.created_nanos,
    };
    VolumeGroupSnapshot {
        group_snapshot_id: g.id.to_string(),
        snapshots: g
            .members
            .iter()
            .map(|m| Snapshot {
                size_bytes: m.size_bytes as i64,
                snapshot_id: m.snapshot_id.to_string(),
                source_volume_id: m.volume_id.to_string(),
                creation_time: Some(at),
                ready_to_use: true,
                group_snapshot_id: g.id.to_string(),
            })
            .collect(),
        creation_time: Some(at),
        ready_to_use: true,
    }
}

/// The snapshot ids a Get or Delete names must be the group's, when it names any.
fn check_members(g: &GroupRecord, asked: &[String]) -> Result<(), ControllerError> {
    if asked.is_empty() {
        return Ok(());
    }
    let have: BTreeSet<String> = g.members.iter().map(|m| m.snapshot_id.to_string()).collect();
    let named: BTreeSet<String> = asked.iter().cloned().collect();
    if have != named {
        return Err(ControllerError::invalid(format!(
            "snapshot_ids do not match group snapshot {}: it holds {}",
            g.id,
            have.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// The names of the group snapshots being cut through this controller. One name is cut by one
/// call at a time: a second call (the snapshotter retrying a slow one) would find the first's
/// members on one node, take them for a failed attempt's and cut them again, and the first's
/// record would then name members the second removed when its own part on another node failed.
#[derive(Default)]
pub(super) struct Cutting(std::sync::Mutex<BTreeSet<String>>);

/// A name claimed in [`Cutting`], given back on drop.
pub(super) struct CuttingName<'a>(&'a Cutting, String);

impl Cutting {
    fn claim(&self, name: &str) -> Result<CuttingName<'_>, ControllerError> {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !names.insert(name.to_string()) {
            return Err(ControllerError::Storage(StorageError::Aborted(format!(
                "group snapshot '{name}' is being cut by another call now; retry"
            ))));
        }
        Ok(CuttingName(self, name.to_string()))
    }
}

impl Cutting {
    /// Whether a group whose id has this key is being cut through this controller now.
    fn holds_key(&self, key: &Key) -> bool {
        let names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        names.iter().any(|n| Key::from_name(n) == *key)
    }
}

impl Drop for CuttingName<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl ControllerService {
    /// The agent that holds a group snapshot, if the id is cellar's: on a node the registry does
    /// not know, one that answers UNAVAILABLE ([`crate::agent::Directory::owner`]), so that a
    /// delete is retried rather than answered OK with the members left on the node.
    fn group_owner(&self, raw: &str) -> Option<(GroupId, Arc<dyn Agent>)> {
        let id = GroupId::parse(raw).ok()?;
        let agent = self.owner_of(id.0.node())?;
        Some((id, agent))
    }

    async fn create_group(&self, r: CreateVolumeGroupSnapshotRequest) -> Result<VolumeGroupSnapshot, ControllerError> {
        if r.name.is_empty() {
            return Err(ControllerError::missing("name"));
        }
        if r.source_volume_ids.is_empty() {
            return Err(ControllerError::missing("source_volume_ids"));
        }
        let params = group_params(&r.parameters)?;
        let _cutting = self.cutting.claim(&r.name)?;
        let mut members = BTreeSet::new();
        for raw in &r.source_volume_ids {
            if raw.is_empty() {
                return Err(ControllerError::invalid("source_volume_ids holds an empty volume id"));
            }
            // Not in cellar's grammar: it cannot name a volume here.
            let id = VolumeId::parse(raw).map_err(|_| ControllerError::not_found(format!("volume {raw} not found")))?;
            if !members.insert(id) {
                return Err(ControllerError::invalid(format!(
                    "source_volume_ids names volume {raw} twice"
                )));
            }
        }
        let members: Vec<VolumeId> = members.into_iter().collect();

        // Each node freezes and cuts its own members: the parts, in the order of their first member.
        let mut parts: Vec<(Arc<dyn Agent>, Vec<VolumeId>)> = Vec::new();
        for m in &members {
            let a = self
                .owner_of(m.0.node())
                .ok_or_else(|| ControllerError::not_found(format!("volume {m} not found (its node is not known)")))?;
            match parts.iter_mut().find(|(p, _)| p.node() == a.node()) {
                Some((_, vols)) => vols.push(m.clone()),
                None => parts.push((a, vec![m.clone()])),
            }
        }

        // A name already used anywhere answers for itself. Every node is asked at once; one that
        // cannot answer now, or answers what it may not, is skipped, as CreateVolume and
        // CreateSnapshot do (one node must not stop every group snapshot): the node that cuts
        // this group checks the name again.
        let mut all = self.directory.all();
        // The group's home (its first member's node) holds the group's record: it is asked even
        // when the registry does not list it now (not seen lately, or not yet again after this
        // controller started), and must answer (below).
        if !all.iter().any(|a| a.node() == parts[0].0.node()) {
            all.push(parts[0].0.clone());
        }
        let name = r.name.clone();
        let answers = super::ask_all(&all, |a| {
            let name = name.clone();
            async move { a.group_named(name).await }
        })
        .await;
        // Except the group's home (its first member's node), which holds the group's record: a
        // group spanning nodes whose home did not answer could be an existing one, and cutting it
        // again would take its members first (each node removes what a failed attempt left).
        let home = parts[0].0.node().clone();
        for (a, answer) in all.iter().zip(answers) {
            let found = match answer {
                Ok(f) => f,
                Err(e) if *a.node() == home => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(node = a.node().as_str(), error = %e, "group name lookup skipped a node that did not answer it");
                    None
                }
            };
            if let Some(existing) = found {
                let had: Vec<&VolumeId> = existing.members.iter().map(|m| &m.volume_id).collect();
                if !same_volumes(&existing, &members) || existing.parameters != params.all {
                    return Err(ControllerError::NameTaken(format!(
                        "group snapshot '{}' already exists with other volumes or parameters ({})",
                        r.name,
                        had.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    )));
                }
                return Ok(csi_group(&existing));
            }
        }
        for (agent, vols) in &parts {
            for m in vols {
                if agent.volume(m.clone()).await?.is_none() {
                    return Err(ControllerError::not_found(format!("volume {m} not found")));
                }
            }
        }
        let group = |members| NewGroup {
            name: r.name.clone(),
            members,
            parameters: params.all.clone(),
            per_volume: params.per_volume,
            freeze_timeout: params.freeze_timeout,
        };
        if let [(agent, _)] = parts.as_slice() {
            let made = agent.create_group(group(members)).await?;
            return Ok(csi_group(&made));
        }
        let parts = parts.into_iter().map(|(a, vols)| (a, group(vols))).collect();
        let made = self.cut_across_nodes(&r.name, &members[0], parts).await?;
        Ok(csi_group(&made))
    }

    /// A group whose volumes live on several nodes: every node freezes its members, and none cuts
    /// until all have frozen (a rendezvous bounded by the freeze timeout, below each node's own
    /// thaw deadline); then the group's record goes to the node of its first member. A part that
    /// fails takes the others' members with it: nothing of the group is left.
    async fn cut_across_nodes(
        &self,
        name: &str,
        first: &VolumeId,
        parts: Vec<(Arc<dyn Agent>, NewGroup)>,
    ) -> Result<GroupRecord, ControllerError> {
        let id = GroupId(ObjectId {
            location: first.0.location.clone(),
            pool: first.0.pool.clone(),
            key: Key::from_name(name),
        });
        let within = parts[0].1.freeze_timeout;
        let parameters = parts[0].1.parameters.clone();
        let meet = Rendezvous::new(parts.len(), within);
        let mut cutting = tokio::task::JoinSet::new();
        for (i, (agent, part)) in parts.iter().enumerate() {
            let (agent, part, id, meet) = (agent.clone(), part.clone(), id.clone(), meet.clone());
            cutting.spawn(async move { (i, agent.cut_group_part(id, part, meet).await) });
        }
        let mut cut = cutting.join_all().await;
        cut.sort_by_key(|(i, _)| *i);
        let mut records = Vec::new();
        let mut failure: Option<StorageError> = None;
        for (_, r) in cut {
            match r {
                Ok(recs) => records.extend(recs),
                // The first failure that is not only "another part failed" says what went wrong.
                Err(e) if failure.as_ref().is_none_or(|f| matches!(f, StorageError::Aborted(_))) => failure = Some(e),
                Err(_) => {}
            }
        }
        let mut members: Vec<GroupMember> = records
            .iter()
            .map(|s| GroupMember {
                volume_id: s.source_volume_id.clone(),
                snapshot_id: s.id.clone(),
                size_bytes: s.size_bytes,
            })
            .collect();
        members.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        let at = records
            .iter()
            .map(|s| (s.created_unix_secs, s.created_nanos))
            .min()
            .unwrap_or_default();
        let rec = GroupRecord {
            version: crate::storage::record::RECORD_VERSION,
            name: name.to_string(),
            id: id.clone(),
            members,
            parameters,
            created_unix_secs: at.0,
            created_nanos: at.1,
        };
        let e = match failure {
            Some(e) => e,
            None => match parts[0].0.put_group(rec.clone()).await {
                Ok(()) => return Ok(rec),
                // Another record under this id: not ours to remove; only what we cut goes.
                Err(e @ StorageError::Conflict(_)) => {
                    let ours: Vec<SnapshotId> = rec.members.iter().map(|m| m.snapshot_id.clone()).collect();
                    self.drop_group_parts(&id, &ours).await;
                    return Err(e.into());
                }
                // The write may have happened though its answer was lost: the record goes first
                // (with the members on its node), so that no record ever names a removed member.
                // If that cannot be made sure of, everything stays: a whole group, or members
                // without a record that the retry removes.
                Err(e) => match parts[0].0.delete_group(id.clone()).await {
                    Ok(()) => e,
                    Err(left) => {
                        tracing::warn!(group = %id, error = %left, "could not make sure a failed group snapshot left no record; its members stay for the retry");
                        return Err(e.into());
                    }
                },
            },
        };
        // Every member any part may have cut, also those of a part whose answer never came back
        // (the node cut them, the connection broke): the records that came back are not enough.
        let every: Vec<SnapshotId> = parts
            .iter()
            .flat_map(|(_, part)| part.members.iter().map(|v| member_snapshot_id(name, v)))
            .collect();
        self.drop_group_parts(&id, &every).await;
        Err(e.into())
    }

    /// DeleteSnapshot of a group member that its node refused to delete alone because its group's
    /// record lives on another node. When that node answers that no such group is recorded (a cut
    /// whose controller died between the members and the record, and that was never retried) and
    /// no cut of it runs here, the member belongs to no group: its node removes it (only if its
    /// record still names that group). Otherwise the refusal stands.
    pub(super) async fn delete_left_member(
        &self,
        agent: &dyn Agent,
        id: &SnapshotId,
        refused: StorageError,
    ) -> Result<(), StorageError> {
        let group = agent
            .snapshots()
            .await?
            .into_iter()
            .find(|s| s.id == *id)
            .and_then(|s| s.group);
        let Some(group) = group else {
            return Err(refused);
        };
        let Some(home) = self.agent_of(group.0.node()) else {
            return Err(refused);
        };
        // A group's node that cannot answer may hold the record: the refusal stands.
        if self.cutting.holds_key(&group.0.key) || !matches!(home.group(group.clone()).await, Ok(None)) {
            return Err(refused);
        }
        tracing::info!(snapshot = %id, group = %group, "deleting a group member whose group was never recorded");
        agent.delete_group_part(group, vec![id.clone()]).await
    }

    /// Deletes the members of a group spanning nodes from every node that holds some (each node
    /// removes only snapshots whose record names this group); failures are logged (the snapshots
    /// name their group, and the retry of the group removes them).
    async fn drop_group_parts(&self, id: &GroupId, members: &[SnapshotId]) {
        let mut by_node: BTreeMap<Option<NodeId>, Vec<SnapshotId>> = BTreeMap::new();
        for m in members {
            by_node.entry(m.0.node().cloned()).or_default().push(m.clone());
        }
        for (node, sids) in by_node {
            let Some(agent) = self.agent_of(node.as_ref()) else {
                continue;
            };
            if let Err(e) = agent.delete_group_part(id.clone(), sids).await {
                tracing::warn!(group = %id, node = agent.node().as_str(), error = %e, "could not delete members of a group snapshot");
            }
        }
    }
}

/// What this group controller offers.
pub const CAPABILITIES: &[rpc::Type] = &[rpc::Type::CreateDeleteGetVolumeGroupSnapshot];

#[tonic::async_trait]
impl GroupController for ControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| GroupControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(GroupControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        note(&req, &req.get_ref().name);
        let r = req.into_inner();
        answer(async {
            let group = self.create_group(r).await?;
            Ok(CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(group),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        note(&req, &req.get_ref().group_snapshot_id);
        let r = req.into_inner();
        answer(async {
            if r.group_snapshot_id.is_empty() {
                return Err(ControllerError::missing("group_snapshot_id"));
            }
            // An id that is not cellar's, or of a node that is gone, names nothing to delete.
            let Some((id, agent)) = self.group_owner(&r.group_snapshot_id) else {
                return Ok(DeleteVolumeGroupSnapshotResponse {});
            };
            let Some(group) = agent.group(id.clone()).await? else {
                return Ok(DeleteVolumeGroupSnapshotResponse {});
            };
            check_members(&group, &r.snapshot_ids)?;
            // Members on other nodes than the group's record (a group cut across nodes) first.
            let elsewhere: Vec<GroupMember> = group
                .members
                .iter()
                .filter(|m| m.snapshot_id.0.node() != Some(agent.node()))
                .cloned()
                .collect();
            for m in &elsewhere {
                let a = self.owner_of(m.snapshot_id.0.node()).ok_or_else(|| {
                    ControllerError::NodeUnreachable(format!(
                        "member {} of group snapshot {id} is on a node that is not known now; retry",
                        m.snapshot_id
                    ))
                })?;
                a.delete_group_part(id.clone(), vec![m.snapshot_id.clone()]).await?;
            }
            agent.delete_group(id).await?;
            Ok(DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        note(&req, &req.get_ref().group_snapshot_id);
        let r = req.into_inner();
        answer(async {
            if r.group_snapshot_id.is_empty() {
                return Err(ControllerError::missing("group_snapshot_id"));
            }
            let not_found = || ControllerError::not_found(format!("group snapshot {} not found", r.group_snapshot_id));
            let (id, agent) = self.group_owner(&r.group_snapshot_id).ok_or_else(not_found)?;
            let group = agent.group(id).await?.ok_or_else(not_found)?;
            check_members(&group, &r.snapshot_ids)?;
            Ok(GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(csi_group(&group)),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_class_without_parameters_asks_for_one_point_in_time() {
        let p = group_params(&HashMap::new()).unwrap();
        assert!(!p.per_volume);
        assert_eq!(p.freeze_timeout, DEFAULT_FREEZE_TIMEOUT);
    }

    #[test]
    fn per_volume_consistency_and_freeze_timeout_are_read() {
        let p = group_params(&params(&[
            ("consistency", "per-volume"),
            ("freezeTimeoutSeconds", "5"),
            ("csi.storage.k8s.io/volumegroupsnapshot/name", "g"),
        ]))
        .unwrap();
        assert!(p.per_volume);
        assert_eq!(p.freeze_timeout, Duration::from_secs(5));
        assert_eq!(p.all.len(), 3);
    }

    #[test]
    fn bad_group_parameters_are_invalid_argument() {
        for kv in [
            ("consistency", "eventual"),
            ("freezeTimeoutSeconds", "0"),
            ("freezeTimeoutSeconds", "601"),
            ("freezeTimeoutSeconds", "soon"),
            ("pool", "fast"),
        ] {
            let e = group_params(&params(&[kv])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{kv:?}");
        }
    }
}
