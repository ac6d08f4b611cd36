//! The Controller service: validates requests, picks the node and pool, and routes each call to the
//! agent of the node that owns the volume.

pub mod backup;
pub mod error;
pub use error::ControllerError;
pub mod group;
mod health;
pub mod listings;
pub mod metadata;
pub mod page;
mod placement;
pub mod request;

use std::sync::Arc;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::agent::{Agent, Directory};
use crate::csi::caps;
use crate::csi::v1::controller_server::Controller;
use crate::csi::v1::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::v1::*;
use crate::server::trace::note;
use crate::storage::engine::{Condition, NewVolume, PoolStatus, Source};
use crate::storage::id::{BackupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
use crate::storage::record::{ContentSource, SnapshotRecord, VolumeRecord};
use crate::storage::StorageError;
use listings::{Listed, Listings, Part, VolumeSummary};

pub struct ControllerService {
    pub directory: Arc<dyn Directory>,
    /// Each agent's last complete volume listing and the index of its names (listings.rs).
    listings: Arc<Listings>,
    /// The last full ListVolumes answer, sorted by id: the pages after the first are cut from it,
    /// so paging through N volumes reads them once, not once per page.
    paged: std::sync::Mutex<Option<PagedListing>>,
    /// Bumped by every create and delete through this controller: a cached listing older than the
    /// last change is not reused.
    changes: std::sync::atomic::AtomicU64,
    /// Whether ControllerGetCapabilities names the CSI 1.13 health RPCs (served either way).
    advertise_health: bool,
    /// The backup repositories (backup.rs): their snapshot lists, never their data.
    backups: Arc<crate::backup::Backups>,
    /// Names of group snapshots being cut through this controller now (group.rs).
    cutting: group::Cutting,
    /// CSI names of volumes and snapshots being created through this controller now. A name is
    /// the cluster's, but each node (and each pool of one) locks only its own key: two calls of
    /// one name in two pools or on two nodes would both find the name free and both make it.
    naming: crate::storage::locks::InFlight,
}

struct PagedListing {
    at: std::time::Instant,
    generation: u64,
    volumes: Arc<Vec<Listed>>,
}

/// How long the pages after the first may be cut from the first page's listing.
const PAGED_LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl ControllerService {
    pub fn new(directory: Arc<dyn Directory>) -> Self {
        ControllerService {
            directory,
            listings: Default::default(),
            paged: Default::default(),
            changes: Default::default(),
            advertise_health: false,
            backups: Arc::new(crate::backup::Backups::new(
                Vec::new(),
                crate::backup::Throttle::unlimited(),
            )),
            cutting: Default::default(),
            naming: Default::default(),
        }
    }

    /// Claims a CSI name (`what`: volume or snapshot) for one create at a time through this
    /// controller: a second call of the name while the first runs is ABORTED, and its retry finds
    /// what the first made.
    fn claim_name(&self, what: &str, name: &str) -> Result<crate::storage::locks::Held, ControllerError> {
        self.naming.try_take(format!("{what}:{name}")).ok_or_else(|| {
            ControllerError::Storage(StorageError::Aborted(format!(
                "{what} '{name}' is being created by another call now; retry"
            )))
        })
    }

    /// The backup repositories of the configuration (the engine's, in every role that has one).
    pub fn with_backups(mut self, backups: Arc<crate::backup::Backups>) -> Self {
        self.backups = backups;
        self
    }
}

/// What this controller offers.
pub const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::CreateDeleteVolume,
    rpc::Type::ListVolumes,
    rpc::Type::GetCapacity,
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::ListSnapshots,
    rpc::Type::CloneVolume,
    rpc::Type::ExpandVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::GetVolume,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::ModifyVolume,
    rpc::Type::GetSnapshot,
];

/// The gRPC answer of a controller call: its error becomes a status in `csi::status`.
pub(crate) async fn answer<T>(
    call: impl std::future::Future<Output = Result<T, ControllerError>>,
) -> Result<Response<T>, Status> {
    call.await.map(Response::new).map_err(Status::from)
}

/// How many agents one fan-out asks at a time. Enough that a few hung nodes (each holding its
/// place until its deadline) do not hold up the rest; few enough that the answers of a thousand
/// nodes are not all decoded in memory at once.
const FAN_OUT: usize = 64;

/// One call to every agent, [`FAN_OUT`] at a time, so that one slow to answer does not delay the
/// others; the answers come back in the agents' order. Each call's deadline starts when it does.
async fn ask_all<A, T, F, Fut>(agents: &[A], call: F) -> Vec<T>
where
    A: Clone,
    T: Send + 'static,
    F: Fn(A) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let places = Arc::new(tokio::sync::Semaphore::new(FAN_OUT));
    let mut asking = tokio::task::JoinSet::new();
    for (i, a) in agents.iter().enumerate() {
        let answer = call(a.clone());
        let places = places.clone();
        asking.spawn(async move {
            let _place = places.acquire_owned().await;
            (i, answer.await)
        });
    }
    let mut answers = asking.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, t)| t).collect()
}

/// An agent's pools: as its node last reported them in a heartbeat when the directory has that
/// (split mode: no call, so a hung node costs nothing here), else asked.
async fn pools_of(directory: &dyn Directory, agent: &Arc<dyn Agent>) -> Result<Vec<PoolStatus>, StorageError> {
    match directory.reported_pools(agent.node()) {
        Some(pools) => Ok(pools),
        None => agent.pools().await,
    }
}

/// How the condition of a volume whose agent cannot be reached begins (csi/health.rs reads it).
pub const UNREACHABLE: &str = "cannot be checked: ";

/// The condition of a volume whose agent cannot be reached, as of its last listing.
fn unreachable(why: &str, listed: std::time::Instant) -> Condition {
    Condition {
        abnormal: true,
        message: format!(
            "{UNREACHABLE}{} (last listed {}s ago)",
            crate::csi::status::bounded(why),
            listed.elapsed().as_secs()
        ),
    }
}

/// A volume as CSI shows it, from its record.
fn csi_record(r: &VolumeRecord, node: &NodeId) -> Volume {
    csi_volume(&VolumeSummary::made(r), node)
}

fn csi_volume(r: &VolumeSummary, node: &NodeId) -> Volume {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let content_source = r.source().map(|s| VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
            ContentSource::Backup(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
        }),
    });
    Volume {
        capacity_bytes: r.capacity_bytes as i64,
        volume_id: r.id().to_string(),
        volume_context: volume_context(r.pool(), r.layout),
        content_source,
        // A shared volume is reachable from every node: no topology pins it.
        accessible_topology: if r.is_shared() {
            vec![]
        } else {
            vec![request::node_topology(node)]
        },
    }
}

/// ` <lead> <fs>` for a message, or nothing when no filesystem is named.
fn fs_named(lead: &str, fs: &str) -> String {
    if fs.is_empty() {
        String::new()
    } else {
        format!("{lead} {fs}")
    }
}

/// The volume_context CreateVolume answers (and ValidateVolumeCapabilities compares).
fn volume_context(pool: &str, layout: crate::storage::record::Layout) -> std::collections::HashMap<String, String> {
    [
        ("pool".to_string(), pool.to_string()),
        ("layout".to_string(), layout.as_str().to_string()),
    ]
    .into()
}

/// Whether a volume (its record; `None` for a static volume) can serve a capability: local pools
/// serve one node, image volumes one node at a time, shared directories every mode; an image
/// volume's filesystem is the one it holds (tree layouts take their pool's and ignore the name).
fn serves(rec: Option<&VolumeRecord>, c: &caps::Capability) -> bool {
    use crate::storage::record::VolumeMode;
    let multi_node =
        !c.access.served_by_local_pool() || c.access == crate::storage::record::AccessMode::MultiNodeReaderOnly;
    let other_fs = |r: &VolumeRecord| {
        crate::storage::layout::of(r.layout).has_filesystem()
            && r.mode == VolumeMode::Filesystem
            && !c.fs_type.is_empty()
            && !r.fs_type.is_empty()
            && c.fs_type != r.fs_type
    };
    match rec {
        None => c.mode == VolumeMode::Filesystem,
        Some(r) if r.mode != c.mode || other_fs(r) => false,
        Some(r) if r.id.is_shared() => !(multi_node && crate::storage::layout::of(r.layout).single_node()),
        Some(_) => c.access.served_by_local_pool(),
    }
}

/// Why the parameters or volume context a ValidateVolumeCapabilities names are not the volume's,
/// if they are not: each given key must hold what the volume was made with (its pool and layout
/// as they came out, even where the create left them to the default) or what CreateVolume
/// answered in its context. The sidecars' metadata keys are not compared.
fn other_parameters(
    rec: &VolumeRecord,
    parameters: &std::collections::HashMap<String, String>,
    context: &std::collections::HashMap<String, String>,
) -> Option<String> {
    let own = |k: &str| match k {
        request::PARAM_POOL => Some(rec.id.0.pool.as_str().to_string()),
        request::PARAM_LAYOUT => Some(rec.layout.as_str().to_string()),
        k => rec.parameters.get(k).cloned(),
    };
    let shown = |k: &str, v: &str| format!("{}={}", crate::csi::status::bounded(k), crate::csi::status::bounded(v));
    if let Some((k, v)) = first_where(parameters, |k, v| {
        !request::is_sidecar_key(k) && own(k).as_deref() != Some(v)
    }) {
        return Some(format!("volume {} was not made with parameter {}", rec.id, shown(k, v)));
    }
    let ctx = volume_context(rec.id.0.pool.as_str(), rec.layout);
    first_where(context, |k, v| ctx.get(k).map(String::as_str) != Some(v))
        .map(|(k, v)| format!("volume {}'s context has no {}", rec.id, shown(k, v)))
}

/// The first entry of `map` in key order for which `f` holds (so that a message names the same
/// one every time).
fn first_where(
    map: &std::collections::HashMap<String, String>,
    f: impl Fn(&str, &str) -> bool,
) -> Option<(&str, &str)> {
    map.iter()
        .filter(|(k, v)| f(k, v))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .min()
}

/// [`other_parameters`] for a static volume (a PV naming a directory, made by no CreateVolume):
/// it has no parameters, and its context holds only the attributes a static PV may set.
fn static_other_parameters(
    volume_id: &str,
    parameters: &std::collections::HashMap<String, String>,
    context: &std::collections::HashMap<String, String>,
) -> Option<String> {
    const ATTRIBUTES: [&str; 3] = ["subdir", "readOnly", "mountOptions"];
    if let Some((k, _)) = first_where(parameters, |k, _| !request::is_sidecar_key(k)) {
        return Some(format!(
            "static volume {} has no parameters (not {})",
            crate::csi::status::bounded(volume_id),
            crate::csi::status::bounded(k)
        ));
    }
    first_where(context, |k, _| !ATTRIBUTES.contains(&k)).map(|(k, _)| {
        format!(
            "static volume {}'s context holds only {}, not {}",
            crate::csi::status::bounded(volume_id),
            ATTRIBUTES.join(", "),
            crate::csi::status::bounded(k)
        )
    })
}

fn csi_snapshot(r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: r.size_bytes as i64,
        // A backup is known by its repository's id; it is ready once uploaded.
        snapshot_id: r.backup.as_ref().map_or_else(|| r.id.to_string(), |b| b.id.to_string()),
        source_volume_id: r.source_volume_id.to_string(),
        creation_time: Some(Timestamp {
            seconds: r.created_unix_secs,
            nanos: r.created_nanos,
        }),
        ready_to_use: r.backup.as_ref().is_none_or(|b| b.uploaded),
        // A member of a group is deleted with its group, never alone (DeleteSnapshot refuses it).
        group_snapshot_id: r.group.as_ref().map(ToString::to_string).unwrap_or_default(),
    }
}

fn csi_condition(c: &Condition) -> VolumeCondition {
    VolumeCondition {
        abnormal: c.abnormal,
        message: c.message.clone(),
    }
}

impl ControllerService {
    fn agent_of(&self, node: Option<&NodeId>) -> Option<Arc<dyn Agent>> {
        match node {
            Some(n) => self.directory.agent(n),
            None => self.directory.shared(),
        }
    }

    /// The agent answering for an object a request names ([`Directory::owner`]): on a node the
    /// registry does not know, UNAVAILABLE, never "no such node".
    pub(crate) fn owner_of(&self, node: Option<&NodeId>) -> Option<Arc<dyn Agent>> {
        match node {
            Some(n) => self.directory.owner(n),
            None => self.directory.shared(),
        }
    }

    /// The agent of the shared pool a request names (or defaults to), if it names a shared pool.
    async fn shared_pool_agent(
        &self,
        pool: Option<&crate::storage::id::PoolName>,
    ) -> Result<Option<Arc<dyn Agent>>, ControllerError> {
        let Some(agent) = self.directory.shared() else {
            return Ok(None);
        };
        // From the configuration when the agent can tell so: a share that does not answer must
        // not hold up creates in other pools (its figures are asked for only where it is used).
        if let Some(shared) = agent.pool_is_shared(pool) {
            return Ok(shared.then_some(agent));
        }
        let pools = agent.pools().await?;
        let target = match pool {
            Some(name) => pools.iter().find(|p| p.name == *name),
            None => pools.iter().find(|p| p.is_default),
        };
        Ok(target.filter(|p| p.shared).map(|_| agent))
    }

    async fn create(&self, r: CreateVolumeRequest) -> Result<CreateVolumeResponse, ControllerError> {
        if r.name.is_empty() {
            return Err(ControllerError::missing("name"));
        }
        let _name = self.claim_name("volume", &r.name)?;
        let capabilities = caps::capabilities(&r.volume_capabilities)?;
        let (mode, access_modes, cap_fs_type) = caps::summarize(&capabilities)?;
        let params = request::volume_params(&r.parameters)?;
        let fs_type = match (cap_fs_type.as_str(), &params.fs_type) {
            ("", Some(p)) => p.clone(),
            (c, Some(p)) if c != p => {
                return Err(ControllerError::invalid(format!(
                    "the capability asks for filesystem '{c}' but the parameters for '{p}'"
                )))
            }
            _ => cap_fs_type,
        };
        let mutable = request::mutable_params(&r.mutable_parameters)?;
        let capacity = request::capacity(r.capacity_range.as_ref())?;
        let source = request::source(r.volume_content_source.as_ref())?;
        let mut layout = params.layout;
        if let Some(Source::Backup(b)) = &source {
            // A backup restores on any node; an image backup makes an image volume.
            let info = self.restorable(b).await?;
            if layout.is_none() && info.meta.layout == crate::storage::record::Layout::Image {
                layout = Some(info.meta.layout);
            }
        }
        let spec = NewVolume {
            name: r.name.clone(),
            pool: params.pool,
            layout,
            capacity,
            mode,
            access_modes,
            fs_type,
            parameters: params.all,
            source: source.clone(),
            delete_policy: params.delete_policy,
            mutable,
            owner: params.owner,
        };

        // A name already taken anywhere answers for itself: the same request gets the same volume.
        if let Some((agent, existing_pool)) = self.volume_named(&r.name, r.accessibility_requirements.as_ref()).await {
            let existing_pool = Some(existing_pool);
            let mut spec = spec;
            match (&spec.pool, existing_pool) {
                (Some(asked), Some(has)) if *asked != has => {
                    return Err(ControllerError::NameTaken(format!(
                        "volume '{}' already exists in pool '{}', not '{}'",
                        r.name,
                        has.as_str(),
                        asked.as_str()
                    )))
                }
                (None, has) => spec.pool = has,
                _ => {}
            }
            let rec = self.make_on(&agent, None, &spec).await?;
            return Ok(CreateVolumeResponse {
                volume: Some(csi_record(&rec, agent.node())),
            });
        }

        if let Some(agent) = self.shared_pool_agent(spec.pool.as_ref()).await? {
            // Shared pools live on every node: no node to choose, no topology to honour.
            let rec = self.create_on(&agent, spec).await?;
            return Ok(CreateVolumeResponse {
                volume: Some(csi_record(&rec, agent.node())),
            });
        }
        let source_agent = match &source {
            Some(Source::Backup(_)) => None,
            Some(s) => match self.owner_of(s.node()) {
                Some(a) => Some(a),
                None => {
                    return Err(ControllerError::not_found(
                        "the content source is not on any known node",
                    ))
                }
            },
            None => None,
        };
        // A create of this name that ended without an answer goes back to the node it was sent
        // to: that node may have made the volume, and one made a second time elsewhere would be
        // left behind, an orphan nobody deletes.
        let topology = r.accessibility_requirements.as_ref();
        if let Some(agent) = self.lost_on(&r.name, topology) {
            if let Some(rec) = self.retry_lost(&agent, source_agent.as_ref(), &spec, topology).await? {
                return Ok(CreateVolumeResponse {
                    volume: Some(csi_record(&rec, agent.node())),
                });
            }
        }
        let nodes: Vec<NodeId> = self.directory.agents().iter().map(|a| a.node().clone()).collect();
        let ranked = request::rank_nodes(r.accessibility_requirements.as_ref(), &nodes);
        // A copy is made where its source lives when that node may take it and has room: there it
        // is a reflink, a btrfs snapshot or a local copy. Otherwise it is streamed to the node the
        // placement chooses.
        if let Some(a) = &source_agent {
            if self
                .source_node_fits(a, &ranked, r.accessibility_requirements.as_ref(), &spec)
                .await
            {
                let rec = self.make_on(a, source_agent.as_ref(), &spec).await?;
                return Ok(CreateVolumeResponse {
                    volume: Some(csi_record(&rec, a.node())),
                });
            }
        }
        // Free to choose (no node preferred by the scheduler), a node that answers it is full (its
        // listing at its bound, or its pool's room gone since its last heartbeat) is passed over
        // for the next candidate; nothing of the volume was made there.
        let free = r
            .accessibility_requirements
            .as_ref()
            .is_none_or(|t| t.preferred.is_empty());
        let mut candidates = ranked;
        loop {
            let node = self
                .place(&candidates, r.accessibility_requirements.as_ref(), &spec)
                .await?;
            let agent = self
                .directory
                .agent(&node)
                .ok_or_else(|| ControllerError::NodeUnreachable(format!("node {} is not reachable", node.as_str())))?;
            match self.make_on(&agent, source_agent.as_ref(), &spec).await {
                Err(ControllerError::Storage(StorageError::Exhausted(why))) if free && candidates.len() > 1 => {
                    tracing::info!(
                        volume = r.name,
                        node = node.as_str(),
                        reason = why,
                        "node full; trying another"
                    );
                    candidates.retain(|n| *n != node);
                }
                made => {
                    return Ok(CreateVolumeResponse {
                        volume: Some(csi_record(&made?, agent.node())),
                    })
                }
            }
        }
    }

    /// The volume created under a CSI name, and its agent. The index of the listings answers for
    /// every node whose listing is whole (listings.rs); the others are asked all at once, each
    /// call within its deadline, so a slow node costs one call's time, not its place in a queue.
    /// A node whose agent did not answer its last call is not asked: it cannot answer now, and
    /// provisioning must not stop for one dead node (a retry for a volume made there goes back
    /// there by its topology).
    /// Answers the agent and the pool the volume is in.
    ///
    /// Only nodes the request's requisite topology admits (and the shared pools) can answer: the
    /// volume a retry finds was placed within that topology, and a node outside it that claims
    /// every name (a compromised node, whose answers are otherwise only checked to be its own)
    /// must not draw a volume the topology keeps away from it.
    async fn volume_named(
        &self,
        name: &str,
        topology: Option<&TopologyRequirement>,
    ) -> Option<(Arc<dyn Agent>, PoolName)> {
        let shared = self.directory.shared();
        let agents: Vec<Arc<dyn Agent>> = self
            .directory
            .all()
            .into_iter()
            .filter(|a| shared.as_ref().is_some_and(|s| Arc::ptr_eq(s, a)) || request::admits(topology, a.node()))
            .collect();
        if let Some((key, listed)) = self.listings.named(name) {
            if let (Some(a), Ok(pool)) = (
                agents.iter().find(|a| self.listing_key(a) == key),
                PoolName::parse(listed.pool()),
            ) {
                return Some((a.clone(), pool));
            }
        }
        let mut ask: Vec<Arc<dyn Agent>> = Vec::new();
        for a in agents {
            // An agent with no heartbeat (the shared pools') is always asked; listing it again
            // would not change that.
            let Some(reported) = self.directory.reported_pools(a.node()) else {
                ask.push(a);
                continue;
            };
            if !self.listings.whole(&self.listing_key(&a), Some(&reported)) && self.directory.answers(a.node()) {
                self.relist(&a);
                ask.push(a);
            }
        }
        let name = name.to_string();
        let answers = ask_all(&ask, |a| {
            let name = name.clone();
            async move { a.volume_named(name).await }
        })
        .await;
        let mut found = None;
        for (agent, answer) in ask.into_iter().zip(answers) {
            match answer {
                Ok(Some(rec)) if found.is_none() => found = Some((agent, rec.id.0.pool)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = agent.node().as_str(), error = %e, "name lookup skipped an unreachable node");
                }
            }
        }
        found
    }

    /// Lists an agent again in the background when its listing is missing, in doubt or stale,
    /// and no one lists it already; the listing makes later name lookups answer without it.
    fn relist(&self, agent: &Arc<dyn Agent>) {
        let key = self.listing_key(agent);
        if !self.listings.start_relisting(&key) {
            return;
        }
        let (listings, agent, directory) = (self.listings.clone(), agent.clone(), self.directory.clone());
        tokio::spawn(async move {
            let (at, edits) = (std::time::Instant::now(), listings.edits(&key));
            if let Ok(volumes) = agent.volumes().await {
                let shut = directory.shut_pools(agent.node());
                listings.replace(&key, at, edits, volumes, &shut);
            }
            listings.relisted(&key);
        });
    }

    /// The agent a create of `name` was last sent to without an answer, while the registry still
    /// knows its node and the request's topology admits it.
    fn lost_on(&self, name: &str, topology: Option<&TopologyRequirement>) -> Option<Arc<dyn Agent>> {
        let key = self.listings.lost_on(name)?;
        let Some(agent) = NodeId::parse(&key).ok().and_then(|n| self.directory.agent(&n)) else {
            // Forgotten by the registry: it will not answer for the name again.
            self.listings.answered(name);
            return None;
        };
        request::admits(topology, agent.node()).then_some(agent)
    }

    /// The retry of a create that got no answer from `agent`'s node. Where the request would still
    /// choose that node (nothing preferred, or that node), it is made there: the node answers the
    /// volume it made, makes it, or refuses as the earlier call is still running (ABORTED). Where
    /// the scheduler has since chosen another node, the node is only asked whether it holds the
    /// volume. While the node cannot tell (it is down, or a pool of it is not open) the retry
    /// waits: UNAVAILABLE. `None`: the node holds no such volume; place the create anew.
    async fn retry_lost(
        &self,
        agent: &Arc<dyn Agent>,
        source: Option<&Arc<dyn Agent>>,
        spec: &NewVolume,
        topology: Option<&TopologyRequirement>,
    ) -> Result<Option<VolumeRecord>, ControllerError> {
        let waits = |why: String| {
            ControllerError::NodeUnreachable(format!(
                "an earlier CreateVolume of '{}' on node {} ended without an answer, and the node cannot tell now \
                 whether it made the volume: {why}; the volume is not made elsewhere meanwhile",
                spec.name,
                agent.node().as_str()
            ))
        };
        if !placement::chosen(topology, agent.node()) {
            let shut = self.directory.shut_pools(agent.node());
            match agent.volume_named(spec.name.clone()).await {
                Ok(Some(_)) => {}
                Ok(None) => match shut.first() {
                    None => {
                        self.listings.answered(&spec.name);
                        return Ok(None);
                    }
                    Some((pool, why)) => return Err(waits(format!("pool '{}' is not open ({why})", pool.as_str()))),
                },
                Err(e) => return Err(waits(e.to_string())),
            }
        }
        match self.make_on(agent, source, spec).await {
            Ok(rec) => Ok(Some(rec)),
            Err(e) if self.listings.lost_on(&spec.name).is_some() => Err(waits(e.to_string())),
            // The node holds no such volume and has no room.
            Err(ControllerError::Storage(StorageError::Exhausted(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes a volume on a node's agent (a copy streamed from `source` when that is another node),
    /// recorded in its listing; a create that ended without an answer is remembered under its
    /// name until a create of that name is answered (see [`Self::lost_on`]).
    async fn make_on(
        &self,
        agent: &Arc<dyn Agent>,
        source: Option<&Arc<dyn Agent>>,
        spec: &NewVolume,
    ) -> Result<VolumeRecord, ControllerError> {
        let made = match (source, &spec.source) {
            (Some(from), Some(_)) if from.node() != agent.node() => {
                tracing::info!(
                    volume = spec.name,
                    from = from.node().as_str(),
                    to = agent.node().as_str(),
                    "copying the content source to another node"
                );
                let made = agent.copy_from(spec.clone(), from.as_ref()).await;
                self.made(agent, made)
            }
            _ => self.create_on(agent, spec.clone()).await,
        };
        match &made {
            Err(
                ControllerError::NodeUnreachable(_)
                | ControllerError::Storage(StorageError::Unavailable(_) | StorageError::Busy(_)),
            ) => self.listings.lost_create(&spec.name, &self.listing_key(agent)),
            // A pool not open cannot say whether it holds the volume: what was known stays.
            Err(ControllerError::Storage(StorageError::PoolBroken { .. } | StorageError::PoolUnusable(_))) => {}
            _ => self.listings.answered(&spec.name),
        }
        made
    }

    /// Creates a volume on an agent and records the outcome in its listing.
    async fn create_on(&self, agent: &Arc<dyn Agent>, spec: NewVolume) -> Result<VolumeRecord, ControllerError> {
        let made = agent.create_volume(spec).await;
        self.made(agent, made)
    }

    /// A create's outcome, recorded: a volume made joins its agent's listing; a call that ended
    /// without an answer (the node may still make the volume) puts the listing in doubt.
    fn made(
        &self,
        agent: &Arc<dyn Agent>,
        made: Result<VolumeRecord, StorageError>,
    ) -> Result<VolumeRecord, ControllerError> {
        let key = self.listing_key(agent);
        match &made {
            Ok(rec) => self.listings.add(&key, rec),
            Err(StorageError::Unavailable(_) | StorageError::Busy(_)) => self.listings.doubt(&key),
            Err(_) => {}
        }
        Ok(made?)
    }

    /// Whether the node holding a content source may take the copy (the topology admits it and,
    /// when the scheduler chose, it is a chosen node) and has room for it.
    async fn source_node_fits(
        &self,
        source: &Arc<dyn Agent>,
        ranked: &[NodeId],
        req: Option<&TopologyRequirement>,
        spec: &NewVolume,
    ) -> bool {
        let node = source.node();
        if !ranked.contains(node) {
            return false;
        }
        if !placement::chosen(req, node) {
            return false;
        }
        let Ok(wanted) = spec.capacity.choose() else {
            return true; // the node explains a bad range
        };
        match self.pools_of(source).await {
            // A pool or layout the node does not have is the node's to explain.
            Ok(pools) => placement::room_for(&pools, spec).is_none_or(|room| room >= wanted),
            Err(_) => false,
        }
    }

    /// Chooses the node for a local volume: the first preferred node with room (WaitForFirstConsumer
    /// puts the scheduler's choice first), else, with no preference, the candidate with the most room
    /// in the pool. No room where it must go is RESOURCE_EXHAUSTED, so the scheduler tries elsewhere.
    async fn place(
        &self,
        ranked: &[NodeId],
        req: Option<&TopologyRequirement>,
        spec: &NewVolume,
    ) -> Result<NodeId, ControllerError> {
        let wanted = spec.capacity.choose()?;
        let mut rooms = Vec::new();
        for n in ranked {
            let room = match self.directory.agent(n) {
                Some(a) => match self.pools_of(&a).await {
                    Ok(pools) => placement::room_for(&pools, spec),
                    Err(_) => None, // unreachable: not a candidate
                },
                None => None,
            };
            rooms.push((n.clone(), room));
        }
        placement::pick(rooms, req, wanted, |n| self.directory.answers(n))
    }

    /// The agent owning a volume id that came from outside, or NOT_FOUND.
    fn volume_owner(&self, raw: &str) -> Result<(VolumeId, Arc<dyn Agent>), ControllerError> {
        let id = VolumeId::parse(raw).map_err(|_| ControllerError::not_found(format!("volume {raw} not found")))?;
        let agent = self
            .owner_of(id.0.node())
            .ok_or_else(|| ControllerError::not_found(format!("volume {raw} not found (no such node)")))?;
        Ok((id, agent))
    }

    /// Something was created or deleted here: a paged listing made before is stale.
    fn changed(&self) {
        self.changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every volume sorted by id: a fresh listing for a first page, the first page's listing for
    /// the pages after it while it is recent and nothing was created or deleted here since.
    async fn listing(&self, continued: bool) -> Result<Arc<Vec<Listed>>, ControllerError> {
        let generation = self.changes.load(std::sync::atomic::Ordering::SeqCst);
        {
            let mut cached = self.paged.lock().expect("paged lock");
            if continued {
                if let Some(p) = cached.as_ref() {
                    if p.generation == generation && p.at.elapsed() < PAGED_LISTING_TTL {
                        return Ok(p.volumes.clone());
                    }
                }
            }
            // The listing made below replaces this one: it need not stay in memory meanwhile.
            *cached = None;
        }
        let volumes = Arc::new(self.all_volumes().await?);
        *self.paged.lock().expect("paged lock") = Some(PagedListing {
            at: std::time::Instant::now(),
            generation,
            volumes: volumes.clone(),
        });
        // The answers it was made from are freed; their pages need not stay resident.
        tokio::task::spawn_blocking(crate::sys::memory::release_free_memory);
        Ok(volumes)
    }

    /// Every volume of every agent the controller knows, asked all at once. An agent that fails to
    /// answer is answered for from its last listing, each volume marked abnormal; one never listed
    /// (the controller started while it was down, or a node that never answers) is left out and
    /// logged, so that it cannot fail the listing of every other node. An agent that did not answer
    /// its last call is not waited for again: its last listing answers at once (the registry probes
    /// it, and it is asked again once it answers). A node the registry forgot is answered for from
    /// its last listing too, until the registry no longer knows its id.
    async fn all_volumes(&self) -> Result<Vec<Listed>, ControllerError> {
        let agents = self.directory.listed();
        let keys: Vec<String> = agents.iter().map(|a| self.listing_key(a)).collect();
        let skipped: Vec<bool> = agents
            .iter()
            .zip(&keys)
            .map(|(a, k)| !self.directory.answers(a.node()) && self.listings.get(k).is_some())
            .collect();
        let asked: Vec<(Arc<dyn Agent>, String)> = agents
            .iter()
            .zip(&keys)
            .zip(&skipped)
            .filter(|(_, skip)| !**skip)
            .map(|((a, k), _)| (a.clone(), k.clone()))
            .collect();
        // Each answer replaces its agent's listing as it comes, so that the old listings and
        // the new are not all held at once.
        let (listings, directory) = (self.listings.clone(), self.directory.clone());
        let mut answers = ask_all(&asked, |(a, key)| {
            let (listings, directory) = (listings.clone(), directory.clone());
            async move {
                let (at, edits) = (std::time::Instant::now(), listings.edits(&key));
                let volumes = a.volumes().await?;
                let shut = directory.shut_pools(a.node());
                Ok::<_, StorageError>(listings.replace(&key, at, edits, volumes, &shut))
            }
        })
        .await
        .into_iter();
        let mut parts = Vec::with_capacity(agents.len());
        for ((agent, key), skip) in agents.iter().zip(&keys).zip(skipped) {
            let answer = if skip {
                Err(StorageError::Unavailable(format!(
                    "node {} did not answer its last call",
                    agent.node().as_str()
                )))
            } else {
                answers.next().expect("an answer per agent asked")
            };
            let part = match answer {
                Ok(listing) => Part {
                    node: agent.node().clone(),
                    volumes: listing.volumes,
                    condition: None,
                },
                Err(e) => {
                    let Some(last) = self.listings.get(key) else {
                        tracing::warn!(
                            node = key,
                            error = %e,
                            "ListVolumes leaves out a node never listed"
                        );
                        continue;
                    };
                    Part {
                        node: agent.node().clone(),
                        volumes: last.volumes,
                        condition: Some(unreachable(&e.to_string(), last.at)),
                    }
                }
            };
            parts.push(part);
        }
        let asked: std::collections::HashSet<String> = keys.into_iter().collect();
        parts.extend(self.forgotten_volumes(&asked));
        Ok(Listed::all(parts))
    }

    /// The last listed volumes of the nodes not asked (the registry forgot them), each abnormal.
    /// A listing whose node the registry no longer knows at all, or that holds nothing, is dropped:
    /// the listings stay as bounded as the registry.
    fn forgotten_volumes(&self, asked: &std::collections::HashSet<String>) -> Vec<Part> {
        let mut found = Vec::new();
        self.listings.retain(|key, last| {
            if asked.contains(key) {
                return true;
            }
            let Ok(node) = NodeId::parse(key) else { return false };
            if last.volumes.is_empty() || self.directory.agent(&node).is_none() {
                return false;
            }
            let why = format!("node {key} is no longer registered (no heartbeat for too long)");
            found.push(Part {
                condition: Some(unreachable(&why, last.at)),
                node,
                volumes: last.volumes.clone(),
            });
            true
        });
        found
    }

    fn listing_key(&self, agent: &Arc<dyn Agent>) -> String {
        if self.directory.shared().is_some_and(|s| Arc::ptr_eq(&s, agent)) {
            "shared pools".into()
        } else {
            agent.node().as_str().to_string()
        }
    }

    async fn pools_of(&self, agent: &Arc<dyn Agent>) -> Result<Vec<PoolStatus>, StorageError> {
        pools_of(self.directory.as_ref(), agent).await
    }

    /// A volume as its agent last listed it, marked abnormal because `why` the agent cannot be reached.
    fn last_listed(&self, id: &str, why: &str) -> Option<VolumeSummary> {
        let (v, at) = self.listings.find(id)?;
        Some(v.with_condition(unreachable(why, at)))
    }

    /// NOT_FOUND unless the static volume's directory is there.
    async fn static_found(&self, sid: StaticId, raw: &str) -> Result<(), ControllerError> {
        let agent = self
            .directory
            .shared()
            .ok_or_else(|| ControllerError::not_found("no shared pools here"))?;
        if !agent.static_exists(sid).await? {
            return Err(ControllerError::not_found(format!("volume {raw} not found")));
        }
        Ok(())
    }

    /// A volume and its condition; ControllerGetVolumeHealth answers from the same condition.
    async fn get_volume(&self, r: &ControllerGetVolumeRequest) -> Result<ControllerGetVolumeResponse, ControllerError> {
        if r.volume_id.is_empty() {
            return Err(ControllerError::missing("volume_id"));
        }
        if let Ok(sid) = StaticId::parse(&r.volume_id) {
            self.static_found(sid, &r.volume_id).await?;
            return Ok(ControllerGetVolumeResponse {
                volume: Some(Volume {
                    volume_id: r.volume_id.clone(),
                    ..Default::default()
                }),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(VolumeCondition {
                        abnormal: false,
                        message: "the static volume's directory is present".into(),
                    }),
                }),
            });
        }
        let (id, agent) = self.volume_owner(&r.volume_id)?;
        let answer = match agent.volume(id).await {
            Err(e) if e.is_unavailable() => Some(self.last_listed(&r.volume_id, &e.to_string()).ok_or(e)?),
            // Its pool is not open: as last listed, abnormal, saying so (the health monitor shows
            // it on the PV); refused when this controller never listed it.
            Err(e @ StorageError::PoolBroken { .. }) => match self.listings.find(&r.volume_id) {
                Some((v, _)) => Some(v.with_condition(Condition {
                    abnormal: true,
                    message: crate::csi::status::bounded(&e.to_string()).into_owned(),
                })),
                None => return Err(e.into()),
            },
            other => other?.map(|(rec, cond)| VolumeSummary::new(&rec, &cond)),
        };
        let Some(v) = answer else {
            return Err(ControllerError::not_found(format!("volume {} not found", r.volume_id)));
        };
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, agent.node())),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(csi_condition(v.condition())),
            }),
        })
    }

    /// Every snapshot as CSI shows it, sorted by id: the nodes' (a backup uploading among them)
    /// and the repositories' backups, each once. Asked for one snapshot id of a node's, only that
    /// node is asked, and its failure is the answer.
    async fn csi_snapshots(&self, one: Option<&SnapshotId>) -> Result<Vec<Snapshot>, ControllerError> {
        if let Some(id) = one {
            let Some(agent) = self.owner_of(id.0.node()) else {
                return Ok(Vec::new());
            };
            return Ok(agent.snapshots().await?.iter().map(csi_snapshot).collect());
        }
        // An uploaded backup is listed from its repository alone. A node's copy of one (kept, or
        // an image's base) that the repository no longer holds is being dropped: the node drops
        // it on seeing the backup's deletion mark, then clears the mark, so the mark read below
        // may be gone already.
        let mut all: Vec<Snapshot> = self
            .all_snapshots()
            .await
            .iter()
            .filter(|r| !r.backup.as_ref().is_some_and(|b| b.uploaded))
            .map(csi_snapshot)
            .collect();
        let (backups, deleted) = self.backup_snapshots().await;
        // The repository's answer wins for a backup both hold (uploaded, local copy kept); a
        // backup marked deleted is listed by neither (its upload may still run).
        let in_repo: std::collections::HashSet<String> = backups.iter().map(|b| b.snapshot_id.clone()).collect();
        all.retain(|s| !in_repo.contains(&s.snapshot_id) && !deleted.contains(&s.snapshot_id));
        all.extend(backups);
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        Ok(all)
    }

    /// Every node's snapshots, asked at once. A node that fails, answers what it may not (another
    /// node's snapshot) or does not end its listing in time is left out, logged, as ListVolumes
    /// leaves out a node it cannot list: one node, hung or compromised, does not fail every node's
    /// listing. A node that did not answer its last call is left out without being asked (as
    /// ListVolumes answers for it from its last listing), until the registry's probe gets through.
    async fn all_snapshots(&self) -> Vec<SnapshotRecord> {
        let (agents, silent): (Vec<_>, Vec<_>) = self
            .directory
            .all()
            .into_iter()
            .partition(|a| self.directory.answers(a.node()));
        for a in &silent {
            tracing::warn!(
                node = a.node().as_str(),
                "snapshot listing without a node that did not answer its last call"
            );
        }
        let answers = ask_all(&agents, |a| async move { a.snapshots().await }).await;
        let mut all = Vec::new();
        for (agent, answer) in agents.iter().zip(answers) {
            match answer {
                Ok(snaps) => all.extend(snaps),
                Err(e) => {
                    tracing::warn!(node = agent.node().as_str(), error = %e, "snapshot listing without a node that did not list")
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        note(&req, &req.get_ref().name);
        let r = req.into_inner();
        let made = self.create(r).await;
        self.changed();
        made.map(Response::new).map_err(Status::from)
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(async {
            if r.volume_id.is_empty() {
                return Err(ControllerError::missing("volume_id"));
            }
            if StaticId::parse(&r.volume_id).is_ok() {
                // A static volume's directory was there before Kubernetes and stays after it.
                tracing::info!(volume = r.volume_id, "static volume released; its data is kept");
                return Ok(DeleteVolumeResponse {});
            }
            // An id that is not ours has nothing here to delete (one naming a node the registry
            // does not know is UNAVAILABLE: Directory::owner).
            if let Ok((id, agent)) = self.volume_owner(&r.volume_id) {
                let deleted = agent.delete_volume(id).await;
                self.changed();
                deleted?;
                self.listings.remove(&r.volume_id);
            }
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(
            ControllerError::NotOffered("cellar volumes need no attach step: ControllerPublishVolume is not offered")
                .into(),
        )
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(
            ControllerError::NotOffered("cellar volumes need no detach step: ControllerUnpublishVolume is not offered")
                .into(),
        )
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(async {
            if r.volume_id.is_empty() {
                return Err(ControllerError::missing("volume_id"));
            }
            if r.volume_capabilities.is_empty() {
                return Err(ControllerError::missing("volume_capabilities"));
            }
            let rec = match StaticId::parse(&r.volume_id) {
                Ok(sid) => {
                    let agent = self.directory.shared().ok_or_else(|| ControllerError::not_found("no shared pools here"))?;
                    if !agent.static_exists(sid).await? {
                        return Err(ControllerError::not_found(format!("volume {} not found", r.volume_id)));
                    }
                    None
                }
                Err(_) => {
                    let (id, agent) = self.volume_owner(&r.volume_id)?;
                    let Some((rec, _)) = agent.volume(id).await? else {
                        return Err(ControllerError::not_found(format!("volume {} not found", r.volume_id)));
                    };
                    Some(rec)
                }
            };
            let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            };
            // A capability cellar cannot parse (a filesystem or mount option it does not offer, an
            // access mode of a later spec) is one it does not support: not confirmed, not an error.
            let wanted = match caps::capabilities(&r.volume_capabilities) {
                Ok(w) => w,
                Err(e) => return Ok(unconfirmed(format!("volume {}: {e}", r.volume_id))),
            };
            let refused = wanted.iter().find(|c| !serves(rec.as_ref(), c));
            if let Some(c) = refused {
                return Ok(unconfirmed(format!(
                    "volume {} cannot serve {:?} with access {:?}{} (local pools serve one node, image volumes one node at a time and hold one filesystem, static volumes Filesystem only)",
                    r.volume_id,
                    c.mode,
                    c.access,
                    fs_named(" and filesystem", &c.fs_type),
                )));
            }
            let other = match rec.as_ref() {
                Some(rec) => other_parameters(rec, &r.parameters, &r.volume_context),
                None => static_other_parameters(&r.volume_id, &r.parameters, &r.volume_context),
            };
            if let Some(why) = other {
                return Ok(unconfirmed(why));
            }
            Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context.clone(),
                    volume_capabilities: r.volume_capabilities.clone(),
                    parameters: r.parameters.clone(),
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            })
        }).await
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        answer(async {
            page::check(&r.starting_token, r.max_entries)?;
            let all = self.listing(!r.starting_token.is_empty()).await?;
            let (items, next_token) =
                page::page_sorted(&all, |l| l.volume().id().to_string(), &r.starting_token, r.max_entries)?;
            let mut entries = items
                .iter()
                .map(|l| list_volumes_response::Entry {
                    volume: Some(csi_volume(l.volume(), l.node())),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: vec![],
                        volume_condition: Some(csi_condition(l.condition())),
                    }),
                })
                .collect();
            let next_token = page::fit(&mut entries, next_token, |e| {
                e.volume.as_ref().map(|v| v.volume_id.clone()).unwrap_or_default()
            });
            Ok(ListVolumesResponse { entries, next_token })
        })
        .await
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        answer(async {
            let params = request::volume_params(&r.parameters)?;
            let wanted = r
                .volume_capabilities
                .iter()
                .map(caps::capability)
                .collect::<Result<Vec<_>, _>>()?;
            let multi_node = wanted.iter().any(|c| !c.access.served_by_local_pool());
            // A Block capability counts only the layouts that make raw devices (image).
            let block = wanted.iter().any(|c| c.mode == crate::storage::record::VolumeMode::Block);
            let mut total: u64 = 0;
            let mut largest: u64 = 0;
            let asked = r.accessible_topology.as_ref().and_then(request::topology_node);
            // The node asked about answers live (a dead node has no capacity, whatever its last
            // heartbeat said); the others' figures come from their heartbeats. Whatever must be
            // asked is asked all at once, so that one slow to answer does not delay the others.
            let agents = self.directory.all();
            let directory = self.directory.clone();
            let live = asked.map(str::to_string);
            let answers = ask_all(&agents, |a| {
                let directory = directory.clone();
                let live = live.as_deref() == Some(a.node().as_str());
                async move {
                    if live {
                        a.pools().await
                    } else {
                        pools_of(directory.as_ref(), &a).await
                    }
                }
            })
            .await;
            for (agent, pools) in agents.iter().zip(answers) {
                let on_node = asked.is_none_or(|n| n == agent.node().as_str());
                let serves_shared = self.directory.shared().is_some_and(|s| Arc::ptr_eq(&s, agent));
                let pools = match pools {
                    Ok(p) => p,
                    // A node that cannot be reached offers nothing now; asked about by name, it
                    // says so. Capacity tracking asks per node: one dead node must not take every
                    // other node's capacity with it. A dead share (the shared pools' agent) is
                    // UNAVAILABLE: its capacity is unknown, not zero.
                    Err(e) if e.is_unavailable() && !(asked.is_some() && on_node) && !serves_shared =>
                    {
                        tracing::debug!(node = agent.node().as_str(), error = %e, "capacity without an unreachable node");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                for p in pools {
                    // Shared pools are everywhere, counted once, from who serves them: the nodes'
                    // heartbeats list the shared pools they open too, and a node's word on a share
                    // is not taken (a compromised one could claim any room). Local pools count only
                    // on their node and for one node.
                    if (p.shared && !serves_shared) || (!p.shared && (!on_node || multi_node)) {
                        continue;
                    }
                    let pool_ok = match &params.pool {
                        Some(name) => *name == p.name,
                        None => p.is_default,
                    };
                    let layout = params.layout.unwrap_or(p.default_layout);
                    let kind = crate::storage::layout::of(layout);
                    let layout_ok = p.layouts.contains(&layout)
                        && !(multi_node && kind.single_node())
                        && (!block || kind.serves_block());
                    let room = if kind.reserves_capacity() {
                        p.image_allocatable_bytes
                    } else {
                        p.available_bytes
                    };
                    if pool_ok && layout_ok {
                        total = total.saturating_add(room);
                        largest = largest.max(room);
                    }
                }
            }
            Ok(GetCapacityResponse {
                available_capacity: total.min(i64::MAX as u64) as i64,
                maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
                minimum_volume_size: None,
            })
        }).await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .chain(crate::csi::health::controller_capabilities(self.advertise_health))
            .map(|t| ControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        note(&req, &req.get_ref().name);
        let r = req.into_inner();
        answer(async {
            if r.name.is_empty() {
                return Err(ControllerError::missing("name"));
            }
            if r.source_volume_id.is_empty() {
                return Err(ControllerError::missing("source_volume_id"));
            }
            let freeze = request::snapshot_params(&r.parameters)?;
            let wants_backup = backup::backup_request(&r.parameters)?;
            let (source, agent) = self.volume_owner(&r.source_volume_id)?;
            let _name = self.claim_name("snapshot", &r.name)?;
            // A name is the cluster's: asked of every node at once, each within its deadline. The
            // source's node must answer (the snapshot is cut there); another node that cannot (or
            // answers nonsense) is skipped, so one broken node never stops every snapshot.
            let all = self.directory.all();
            let name = r.name.clone();
            let answers = ask_all(&all, |a| {
                let name = name.clone();
                async move { a.snapshot_named(name).await }
            })
            .await;
            for (a, answer) in all.iter().zip(answers) {
                match answer {
                    Ok(Some(existing)) if existing.source_volume_id != source => {
                        return Err(ControllerError::NameTaken(format!(
                            "snapshot '{}' already exists for volume {}, not {}",
                            r.name, existing.source_volume_id, r.source_volume_id
                        )));
                    }
                    Ok(_) => {}
                    Err(e) if a.node() == agent.node() => return Err(e.into()),
                    Err(e) => {
                        tracing::warn!(node = a.node().as_str(), error = %e, "snapshot name lookup skipped a node that did not answer");
                    }
                }
            }
            if let Some(req) = wants_backup {
                let snapshot = self.create_backup(&r.name, source, agent, freeze, req).await?;
                return Ok(CreateSnapshotResponse {
                    snapshot: Some(snapshot),
                });
            }
            let rec = agent.create_snapshot(r.name.clone(), source, freeze, None).await?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(csi_snapshot(&rec)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        note(&req, &req.get_ref().snapshot_id);
        let r = req.into_inner();
        answer(async {
            if r.snapshot_id.is_empty() {
                return Err(ControllerError::missing("snapshot_id"));
            }
            if let Ok(id) = BackupId::parse(&r.snapshot_id) {
                self.delete_backup(&id).await?;
            } else if let Ok(id) = SnapshotId::parse(&r.snapshot_id) {
                if let Some(agent) = self.owner_of(id.0.node()) {
                    match agent.delete_snapshot(id.clone()).await {
                        Err(refused @ StorageError::Unsupported(_)) => {
                            self.delete_left_member(agent.as_ref(), &id, refused).await?
                        }
                        done => done?,
                    }
                }
            }
            Ok(DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        note(&req, &req.get_ref().snapshot_id);
        let r = req.into_inner();
        answer(async {
            page::check(&r.starting_token, r.max_entries)?;
            // One backup by its id: its repository answers, whichever node is down.
            let mut all = match BackupId::parse(&r.snapshot_id) {
                Ok(id) => self.get_backup(&id).await?.into_iter().collect(),
                Err(_) => {
                    let one = SnapshotId::parse(&r.snapshot_id).ok();
                    self.csi_snapshots(one.as_ref()).await?
                }
            };
            if !r.snapshot_id.is_empty() {
                all.retain(|s| s.snapshot_id == r.snapshot_id);
            }
            if !r.source_volume_id.is_empty() {
                all.retain(|s| s.source_volume_id == r.source_volume_id);
            }
            let (items, next_token) = page::page(all, |s| s.snapshot_id.clone(), &r.starting_token, r.max_entries)?;
            let mut entries = items
                .into_iter()
                .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
                .collect();
            let next_token = page::fit(&mut entries, next_token, |e| {
                e.snapshot.as_ref().map(|s| s.snapshot_id.clone()).unwrap_or_default()
            });
            Ok(ListSnapshotsResponse { entries, next_token })
        })
        .await
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Result<Response<GetSnapshotResponse>, Status> {
        note(&req, &req.get_ref().snapshot_id);
        let r = req.into_inner();
        answer(async {
            if r.snapshot_id.is_empty() {
                return Err(ControllerError::missing("snapshot_id"));
            }
            let not_found = || ControllerError::not_found(format!("snapshot {} not found", r.snapshot_id));
            if let Ok(id) = BackupId::parse(&r.snapshot_id) {
                return Ok(GetSnapshotResponse {
                    snapshot: Some(self.get_backup(&id).await?.ok_or_else(not_found)?),
                });
            }
            let id = SnapshotId::parse(&r.snapshot_id).map_err(|_| not_found())?;
            let agent = self.owner_of(id.0.node()).ok_or_else(not_found)?;
            let found = agent.snapshots().await?.into_iter().find(|s| s.id == id);
            // A snapshot of a local pool that is not open is out of reach, not gone, and not
            // ready either (its node lists it as its roster last recorded it).
            // (A node's from its heartbeat; this process's own pools from the engine.)
            if matches!(id.0.location, crate::storage::id::Location::Local(_)) {
                let mut shut = self.directory.shut_pools(agent.node());
                shut.extend(agent.shut_pools());
                if let Some((_, why)) = shut.into_iter().find(|(p, _)| *p == id.0.pool) {
                    return Err(StorageError::pool_shut_on(id.0.pool.as_str().to_string(), &why, agent.node()).into());
                }
            }
            let Some(snap) = found else {
                return Err(not_found());
            };
            Ok(GetSnapshotResponse {
                snapshot: Some(csi_snapshot(&snap)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(async {
            if r.volume_id.is_empty() {
                return Err(ControllerError::missing("volume_id"));
            }
            let Some(range) = r.capacity_range.as_ref() else {
                return Err(ControllerError::missing("capacity_range"));
            };
            if range.required_bytes == 0 && range.limit_bytes == 0 {
                return Err(ControllerError::invalid(
                    "capacity_range must set required_bytes (the size to grow to) or limit_bytes",
                ));
            }
            let range = request::capacity(Some(range))?;
            let wanted = r.volume_capability.as_ref().map(caps::capability).transpose()?;
            let (id, agent) = self.volume_owner(&r.volume_id)?;
            if let Some(c) = &wanted {
                // The spec's "Exceeds capabilities": a capability the volume cannot serve is
                // INVALID_ARGUMENT, and nothing grows.
                let Some((rec, _)) = agent.volume(id.clone()).await? else {
                    return Err(ControllerError::not_found(format!("volume {} not found", r.volume_id)));
                };
                if !serves(Some(&rec), c) {
                    return Err(ControllerError::invalid(format!(
                        "volume {} is a {:?} volume{} and cannot serve the capability {:?} with access {:?}{}",
                        r.volume_id,
                        rec.mode,
                        fs_named(" of", &rec.fs_type),
                        c.mode,
                        c.access,
                        fs_named(" and filesystem", &c.fs_type),
                    )));
                }
            }
            let grown = agent.expand_volume(id, range).await;
            self.changed();
            let (rec, node_step) = grown?;
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: rec.capacity_bytes as i64,
                // Only an image volume has a filesystem (or loop device) for the node to grow.
                node_expansion_required: node_step,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(self.get_volume(&r)).await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(async {
            if r.volume_id.is_empty() {
                return Err(ControllerError::missing("volume_id"));
            }
            // Arguments before existence (docs/design.md): bad parameters are INVALID_ARGUMENT
            // whether or not the volume, or its node, is there.
            let m = request::mutable_params(&r.mutable_parameters)?;
            if let Ok(sid) = StaticId::parse(&r.volume_id) {
                // A static volume is a directory cellar only mounts: it has no record to modify.
                if !m.is_empty() {
                    return Err(ControllerError::invalid(format!(
                        "static volume {} has no mutable parameters: cellar mounts its directory but does not manage it",
                        r.volume_id
                    )));
                }
                self.static_found(sid, &r.volume_id).await?;
                return Ok(ControllerModifyVolumeResponse {});
            }
            let (id, agent) = self.volume_owner(&r.volume_id)?;
            if agent.volume(id.clone()).await?.is_none() {
                return Err(ControllerError::not_found(format!("volume {} not found", r.volume_id)));
            }
            if !m.is_empty() {
                agent.modify_volume(id, m).await?;
            }
            Ok(ControllerModifyVolumeResponse {})
        })
        .await
    }

    async fn controller_list_volume_health(
        &self,
        req: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        let r = req.into_inner();
        answer(self.list_volume_health(r)).await
    }

    async fn controller_get_volume_health(
        &self,
        req: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        note(&req, &req.get_ref().volume_id);
        let r = req.into_inner();
        answer(self.volume_health(r)).await
    }
}
