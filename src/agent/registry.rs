//! The controller's registry of nodes, in memory, filled by the nodes' heartbeats.
//!
//! A node is available while its last heartbeat is younger than `missed_heartbeats` intervals;
//! after that it is still listed (with its topology and last pools) but every call to it answers
//! UNAVAILABLE naming it, until a heartbeat revives it. Nothing is persisted: after a controller
//! restart every live node is back within one heartbeat, and until then (the settling window) an
//! unknown node is "not registered yet" (UNAVAILABLE), never "no such node" (NOT_FOUND), so no
//! DeleteVolume succeeds for a volume whose node simply has not called in yet. After it, an
//! unknown node is no candidate and is not listed, but a call naming an object on it still answers
//! UNAVAILABLE ([`Directory::owner`]): it may be down since before the restart.
//!
//! Only a node may register, and a node holding a certificate of its own may speak only for
//! itself ([`NodeIdentity`], docs/security.md).
//!
//! The registry is bounded: at most `max_nodes` nodes (an unavailable one makes room for a new one;
//! live ones never do), heartbeats of at most `max_heartbeat_bytes`, and a node silent for
//! `forget_after` is forgotten: only its id is kept (bounded too), so that calls on its volumes stay
//! UNAVAILABLE rather than "no such node" until it comes back.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tonic::{Request, Response, Status};

use super::grant::{self, Claims};
use super::remote::{is_unreachable, unavailable, HostPort, PullFrom, RemoteAgent, Timeouts};
use super::tls::{self, Tls, AGENT_SERVER_NAME};
use super::wire::{self, v1};
use super::{Agent, Directory, Frames, RangeBatches};
use crate::storage::cbt::{MetadataError, Query};
use crate::storage::engine::{
    BackupRequest, CapacityRange, Condition, Mutable, NewGroup, NewVolume, PoolStatus, Source,
};
use crate::storage::id::{BackupId, GroupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
use crate::storage::record::{GroupRecord, SnapshotRecord, VolumeRecord};
use crate::storage::StorageError;

/// Where time comes from; tests pass a clock they move by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How often nodes are told to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// A node whose last heartbeat is older than this many intervals is unavailable.
    pub missed_heartbeats: u32,
    /// After a start, how long an unknown node counts as "not registered yet" rather than absent.
    pub settle: Duration,
    /// The SAN the controller expects on agents' certificates; a node's own certificate names
    /// `<node>.<agent_server_name>`.
    pub agent_server_name: String,
    /// Refuse the nodes' shared certificate: every node must register with a certificate naming
    /// it (`--require-node-certificates`).
    pub require_node_certificates: bool,
    /// At most this many nodes (`--max-nodes`); a new node beyond it takes the place of the
    /// longest-silent unavailable one, or is refused with RESOURCE_EXHAUSTED.
    pub max_nodes: usize,
    /// The largest heartbeat accepted, in bytes (`--max-heartbeat-bytes`); larger is OUT_OF_RANGE.
    pub max_heartbeat_bytes: usize,
    /// A node silent for this long is forgotten (`--forget-nodes-after`): its entry, client and
    /// pools are dropped, its id is remembered.
    pub forget_after: Duration,
    pub agent_timeouts: Timeouts,
    /// How a restore or clone onto another node moves its data (`--node-transfers`).
    pub transfers: TransferPath,
    /// Refuse a heartbeat whose agent address is not the IP address the heartbeat came from
    /// (`--agent-address-is-peer`): a node cannot have the controller dial a host of its
    /// choosing. Only where nodes reach the controller without NAT or a proxy between.
    pub agent_address_is_peer: bool,
}

/// How a copy between nodes moves its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransferPath {
    /// The target node pulls from the source node with a grant the controller signed.
    #[default]
    Direct,
    /// The controller reads the source and streams it to the target (nodes of an earlier
    /// version, during a rolling upgrade).
    ViaController,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        let heartbeat_interval = Duration::from_secs(5);
        RegistryConfig {
            heartbeat_interval,
            missed_heartbeats: 3,
            settle: 2 * heartbeat_interval,
            agent_server_name: AGENT_SERVER_NAME.to_string(),
            require_node_certificates: false,
            max_nodes: 5000,
            max_heartbeat_bytes: 64 << 10,
            forget_after: Duration::from_secs(3600),
            agent_timeouts: Timeouts::default(),
            transfers: TransferPath::Direct,
            agent_address_is_peer: false,
        }
    }
}

impl RegistryConfig {
    /// The name a certificate issued to `node` alone carries: `<node>.<agent_server_name>`.
    pub fn node_server_name(&self, node: &NodeId) -> String {
        format!("{}.{}", node.as_str(), self.agent_server_name)
    }

    /// How long after its last heartbeat a node stays available.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1)
    }
}

/// What a node says about itself in every heartbeat, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub node: NodeId,
    pub topology: BTreeMap<String, String>,
    pub agent_address: HostPort,
    pub pools: Vec<PoolStatus>,
    pub version: String,
    /// The node's own pools that are not open, each with why.
    pub shut_pools: Vec<(PoolName, String)>,
}

impl TryFrom<v1::NodeStatus> for NodeReport {
    type Error = wire::WireError;
    fn try_from(m: v1::NodeStatus) -> Result<Self, Self::Error> {
        Ok(NodeReport {
            node: wire::node_id("node_id", &m.node_id)?,
            agent_address: HostPort::parse(&m.agent_address)
                .map_err(|e| wire::WireError(format!("agent_address: {e}")))?,
            pools: wire::pools(m.pools)?,
            topology: m.topology,
            version: m.version,
            shut_pools: m
                .shut_pools
                .into_iter()
                .map(|p| Ok((wire::pool_name("shut_pools.name", &p.name)?, p.reason)))
                .collect::<Result<_, wire::WireError>>()?,
        })
    }
}

impl From<&NodeReport> for v1::NodeStatus {
    fn from(r: &NodeReport) -> Self {
        v1::NodeStatus {
            node_id: r.node.as_str().to_string(),
            topology: r.topology.clone(),
            agent_address: r.agent_address.to_string(),
            pools: r.pools.iter().map(Into::into).collect(),
            version: r.version.clone(),
            shut_pools: r
                .shut_pools
                .iter()
                .map(|(name, reason)| v1::ShutPool {
                    name: name.as_str().to_string(),
                    reason: reason.chars().take(256).collect(),
                })
                .collect(),
        }
    }
}

/// How a node proved which node it is when it registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// Plaintext, or the certificate all nodes share (`cellar-agent`): the node id is taken on
    /// trust, and the controller dials the node expecting the shared name.
    Shared,
    /// A certificate naming this node (`<node>.cellar-agent`): it registers only as this node,
    /// and the controller dials it expecting that name, so no other node can answer for it.
    Own(String),
}

impl NodeIdentity {
    /// The name the controller expects on the node's agent certificate.
    fn server_name<'a>(&'a self, config: &'a RegistryConfig) -> &'a str {
        match self {
            NodeIdentity::Shared => &config.agent_server_name,
            NodeIdentity::Own(name) => name,
        }
    }
}

/// A node as the registry sees it now.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub report: NodeReport,
    pub last_heartbeat_age: Duration,
    pub available: bool,
}

/// What a heartbeat changed, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    New,
    Revived { silent_for: Duration },
    Moved { from: HostPort },
    Same,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("heartbeat refused: {0}")]
    Invalid(#[from] wire::WireError),
    #[error("heartbeat refused: {0}")]
    Denied(String),
    #[error("heartbeat refused: the registry holds its maximum of {max} nodes, all of them available (--max-nodes)")]
    Full { max: usize },
    #[error("cannot make a client for node {node}'s agent at {address}: {reason}")]
    Client {
        node: String,
        address: String,
        reason: String,
    },
}

struct Entry {
    report: NodeReport,
    identity: NodeIdentity,
    last_heartbeat: Instant,
    agent: Arc<RemoteAgent>,
    /// Whether the sweeper has already logged this node as unavailable.
    reported_down: bool,
    /// Since when a call to its agent failed to reach it, until one gets through: such a node
    /// heartbeats (its process lives) but its agent does not answer, so placement passes it over
    /// when it may choose, and the sweeper probes it.
    unreachable: Option<Instant>,
}

struct Shared {
    config: RegistryConfig,
    tls: Tls,
    /// The controller's own agent for the shared pools, if it serves any.
    shared_pools: Option<Arc<dyn Agent>>,
    clock: Arc<dyn Clock>,
    started: Instant,
    nodes: RwLock<BTreeMap<NodeId, Entry>>,
    /// Nodes forgotten after `forget_after`, with their last heartbeat; at most `max_nodes`.
    forgotten: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<NodeId, Entry>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<NodeId, Entry>> {
        self.nodes.write().unwrap_or_else(|e| e.into_inner())
    }

    fn forgotten(&self) -> MutexGuard<'_, BTreeMap<NodeId, Instant>> {
        self.forgotten.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves a node from the registry to the forgotten ids, dropping the oldest forgotten id when
    /// there are too many, and its agent error series with it (they would pile up with churn).
    fn forget(&self, nodes: &mut BTreeMap<NodeId, Entry>, node: &NodeId) {
        let Some(e) = nodes.remove(node) else { return };
        crate::metrics::forget_agent_errors(node.as_str());
        let mut forgotten = self.forgotten();
        forgotten.insert(node.clone(), e.last_heartbeat);
        while forgotten.len() > self.config.max_nodes {
            let Some(oldest) = forgotten.iter().min_by_key(|(_, at)| **at).map(|(n, _)| n.clone()) else {
                break;
            };
            forgotten.remove(&oldest);
        }
    }

    fn age(&self, e: &Entry) -> Duration {
        self.clock.now().saturating_duration_since(e.last_heartbeat)
    }

    fn is_fresh(&self, e: &Entry) -> bool {
        self.age(e) <= self.config.expiry()
    }

    fn settled(&self) -> bool {
        self.clock.now().saturating_duration_since(self.started) >= self.config.settle
    }

    /// The node's client, or why it cannot be called now.
    fn reachable(&self, node: &NodeId) -> Result<Arc<RemoteAgent>, StorageError> {
        let nodes = self.read();
        match nodes.get(node) {
            Some(e) if self.is_fresh(e) => Ok(e.agent.clone()),
            Some(e) => Err(unavailable(
                node,
                format!(
                    "no heartbeat for {}s; expected every {}s",
                    self.age(e).as_secs(),
                    self.config.heartbeat_interval.as_secs_f32()
                ),
            )),
            None => match self.forgotten().get(node) {
                Some(last) => Err(unavailable(
                    node,
                    format!(
                        "no heartbeat for {}s; forgotten by the registry after {}s",
                        self.clock.now().saturating_duration_since(*last).as_secs(),
                        self.config.forget_after.as_secs()
                    ),
                )),
                None => Err(unavailable(
                    node,
                    "it has not registered with this controller since it started",
                )),
            },
        }
    }
}

impl Shared {
    /// Where `reader` pulls `object` from, with a grant signed for that one read.
    fn pull_from(&self, reader: &NodeId, object: &Source) -> Result<PullFrom, StorageError> {
        let source = object
            .node()
            .ok_or_else(|| StorageError::Unsupported(format!("{object} is in a shared pool, not on a node")))?;
        self.reachable(source)?;
        let nodes = self.read();
        let (Some(from), Some(to)) = (nodes.get(source), nodes.get(reader)) else {
            return Err(unavailable(source, "it left the registry"));
        };
        let claims = Claims::new(
            object.clone(),
            reader.clone(),
            to.identity.server_name(&self.config).to_string(),
        )
        .and_then(|c| grant::sign(&self.tls, &c));
        let grant = claims.map_err(|e| {
            StorageError::Sys(crate::sys::SysError::io(
                "sign a transfer grant",
                "",
                std::io::Error::other(e.to_string()),
            ))
        })?;
        Ok(PullFrom {
            address: from.report.agent_address.clone(),
            server_name: from.identity.server_name(&self.config).to_string(),
            grant,
        })
    }
}

/// The registry; cheap to clone (all clones share the same nodes).
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

impl Registry {
    /// `shared_pools`: the controller's own agent for the shared pools ([`Directory::shared`]).
    pub fn new(config: RegistryConfig, tls: Tls, shared_pools: Option<Arc<dyn Agent>>) -> Registry {
        Registry::with_clock(config, tls, shared_pools, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: RegistryConfig,
        tls: Tls,
        shared_pools: Option<Arc<dyn Agent>>,
        clock: Arc<dyn Clock>,
    ) -> Registry {
        let started = clock.now();
        Registry {
            shared: Arc::new(Shared {
                config,
                tls,
                shared_pools,
                clock,
                started,
                nodes: RwLock::new(BTreeMap::new()),
                forgotten: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.shared.config
    }

    /// Which node the client certificate of a heartbeat may speak for, given the node it claims
    /// to be. `None`: no certificate (plaintext).
    pub fn identify(&self, cert: Option<&CertificateDer<'_>>, node: &NodeId) -> Result<NodeIdentity, RegistryError> {
        let config = &self.shared.config;
        // A certificate's DNS names match without regard to case, so one naming
        // `node-1.cellar-agent` would pass for `NODE-1`, `Node-1`, ...: as many registry entries as
        // spellings, enough to fill --max-nodes. Kubernetes node names are lower case; so must a
        // node id be here. (`NodeId` itself takes upper case: all-in-one defaults to the host's
        // name, and records on disk name it.)
        if node.as_str().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(RegistryError::Denied(format!(
                "node id '{}' has upper-case letters: Kubernetes node names are lower case, and a node registers under its node name ('{}')",
                node.as_str(),
                node.as_str().to_ascii_lowercase()
            )));
        }
        let Some(cert) = cert else {
            return match self.shared.tls {
                Tls::Insecure => Ok(NodeIdentity::Shared),
                Tls::Mutual(_) => Err(RegistryError::Denied("the caller presented no certificate".into())),
            };
        };
        // Revocation is by expiry: a certificate past its end speaks for no node, even over a
        // connection its handshake opened while it was valid.
        if let Some(why) = tls::certificate_ended(cert, std::time::SystemTime::now()) {
            return Err(RegistryError::Denied(format!(
                "the caller's certificate {why}; a connection opened while it was valid speaks for no node after its end"
            )));
        }
        let own = config.node_server_name(node);
        if tls::certificate_names(cert, &own) {
            return Ok(NodeIdentity::Own(own));
        }
        if !tls::certificate_names(cert, &config.agent_server_name) {
            return Err(RegistryError::Denied(format!(
                "only a node may register, and as itself: the caller's certificate names neither '{own}' nor '{}'",
                config.agent_server_name
            )));
        }
        if config.require_node_certificates {
            return Err(RegistryError::Denied(format!(
                "node {} presented the nodes' shared certificate; this controller requires a certificate naming '{own}' (--require-node-certificates)",
                node.as_str()
            )));
        }
        Ok(NodeIdentity::Shared)
    }

    /// Whether a heartbeat that came from `peer` may give `address` as its agent's: always, unless
    /// [`RegistryConfig::agent_address_is_peer`]; then only an IP address that is the peer's.
    pub fn check_agent_address(&self, address: &HostPort, peer: Option<SocketAddr>) -> Result<(), RegistryError> {
        if !self.shared.config.agent_address_is_peer {
            return Ok(());
        }
        let Some(peer) = peer.map(|p| p.ip().to_canonical()) else {
            return Err(RegistryError::Denied(
                "the address the heartbeat came from is not known, and this controller dials a node only at that address (--agent-address-is-peer)".into(),
            ));
        };
        match address.bare_host().parse::<IpAddr>() {
            Ok(ip) if ip.to_canonical() == peer => Ok(()),
            _ => Err(RegistryError::Denied(format!(
                "agent address {address} is not the address the heartbeat came from ({peer}); this controller dials a node only there (--agent-address-is-peer): advertise {}",
                HostPort::parse(&SocketAddr::new(peer, address.port()).to_string())
                    .map(|h| h.to_string())
                    .unwrap_or_default()
            ))),
        }
    }

    /// Records a heartbeat (or a registration: they are the same upsert) from a node that
    /// presented the shared identity (or none, over plaintext).
    pub fn heartbeat(&self, report: NodeReport) -> Result<Change, RegistryError> {
        self.heartbeat_as(report, NodeIdentity::Shared)
    }

    /// Records a heartbeat from a node that proved `identity` ([`Registry::identify`]). A node that
    /// once registered with its own certificate cannot be spoken for with the shared one until the
    /// controller restarts. Runs inside a Tokio runtime: a new node's client spawns its connection
    /// worker there.
    pub fn heartbeat_as(&self, report: NodeReport, identity: NodeIdentity) -> Result<Change, RegistryError> {
        let s = &self.shared;
        let now = s.clock.now();
        let mut nodes = s.write();
        if let Some(e) = nodes.get(&report.node) {
            if matches!(e.identity, NodeIdentity::Own(_)) && identity == NodeIdentity::Shared {
                return Err(RegistryError::Denied(format!(
                    "node {} registered with a certificate of its own; the nodes' shared certificate cannot speak for it",
                    report.node.as_str()
                )));
            }
        }
        if !nodes.contains_key(&report.node) && nodes.len() >= s.config.max_nodes {
            // Room is made only at the expense of a node that is already unavailable.
            let stalest = nodes
                .iter()
                .filter(|(_, e)| !s.is_fresh(e))
                .min_by_key(|(_, e)| e.last_heartbeat)
                .map(|(n, _)| n.clone());
            match stalest {
                Some(n) => {
                    tracing::warn!(
                        node = n.as_str(),
                        "registry full: forgetting an unavailable node for a new one"
                    );
                    s.forget(&mut nodes, &n);
                }
                None => {
                    return Err(RegistryError::Full {
                        max: s.config.max_nodes,
                    })
                }
            }
        }
        let returning = s.forgotten().remove(&report.node);
        let (change, agent, unreachable) = match nodes.get(&report.node) {
            Some(e) if e.report.agent_address == report.agent_address && e.identity == identity => {
                let change = if s.is_fresh(e) {
                    Change::Same
                } else {
                    Change::Revived { silent_for: s.age(e) }
                };
                (change, e.agent.clone(), e.unreachable)
            }
            old => {
                let agent = RemoteAgent::new(
                    report.node.clone(),
                    report.agent_address.clone(),
                    &s.tls,
                    identity.server_name(&s.config),
                    s.config.agent_timeouts,
                )
                .map_err(|e| RegistryError::Client {
                    node: report.node.as_str().to_string(),
                    address: report.agent_address.to_string(),
                    reason: e.to_string(),
                })?;
                let change = match (old, returning) {
                    (Some(e), _) => Change::Moved {
                        from: e.report.agent_address.clone(),
                    },
                    (None, Some(last)) => Change::Revived {
                        silent_for: now.saturating_duration_since(last),
                    },
                    (None, None) => Change::New,
                };
                (change, Arc::new(agent), None)
            }
        };
        nodes.insert(
            report.node.clone(),
            Entry {
                report,
                identity,
                last_heartbeat: now,
                agent,
                reported_down: false,
                unreachable,
            },
        );
        Ok(change)
    }

    fn info(&self, e: &Entry) -> NodeInfo {
        NodeInfo {
            report: e.report.clone(),
            last_heartbeat_age: self.shared.age(e),
            available: self.shared.is_fresh(e),
        }
    }

    /// Every node that ever registered since the start, available or not, by node id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared.read().values().map(|e| self.info(e)).collect()
    }

    pub fn node(&self, node: &NodeId) -> Option<NodeInfo> {
        self.shared.read().get(node).map(|e| self.info(e))
    }

    pub fn is_available(&self, node: &NodeId) -> bool {
        self.shared.read().get(node).is_some_and(|e| self.shared.is_fresh(e))
    }

    /// The node's topology segments from its last heartbeat.
    pub fn topology(&self, node: &NodeId) -> Option<BTreeMap<String, String>> {
        self.shared.read().get(node).map(|e| e.report.topology.clone())
    }

    /// The node's pools (free and total bytes) from its last heartbeat.
    pub fn pools(&self, node: &NodeId) -> Option<Vec<PoolStatus>> {
        self.shared.read().get(node).map(|e| e.report.pools.clone())
    }

    pub fn last_heartbeat_age(&self, node: &NodeId) -> Option<Duration> {
        self.shared.read().get(node).map(|e| self.shared.age(e))
    }

    /// True once every live node has had time to register since the start; until then an unknown
    /// node may simply not have called in yet. A readiness probe may wait for it.
    pub fn settled(&self) -> bool {
        self.shared.settled()
    }

    /// Logs each node that has just become unavailable, and returns them; forgets the nodes
    /// silent for `forget_after`.
    pub fn sweep(&self) -> Vec<NodeId> {
        let s = &self.shared;
        let mut down = Vec::new();
        let mut nodes = s.write();
        let stale: Vec<NodeId> = nodes
            .iter()
            .filter(|(_, e)| s.age(e) > s.config.forget_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::warn!(
                node = id.as_str(),
                after_secs = s.config.forget_after.as_secs(),
                "node forgotten: no heartbeat for too long; its volumes stay listed as abnormal from their last listing"
            );
            s.forget(&mut nodes, &id);
        }
        for (id, e) in nodes.iter_mut() {
            if !e.reported_down && !s.is_fresh(e) {
                e.reported_down = true;
                tracing::warn!(
                    node = id.as_str(),
                    silent_secs = s.age(e).as_secs(),
                    missed = s.config.missed_heartbeats,
                    "node missed its heartbeats; calls to it answer UNAVAILABLE until it is back"
                );
                down.push(id.clone());
            }
        }
        down
    }

    /// Sweeps once per heartbeat interval, and probes the nodes whose agent could not be reached,
    /// forever (spawn it, abort it at shutdown).
    pub async fn run_sweeper(self) {
        let mut tick = tokio::time::interval(self.shared.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
            self.probe_unreachable().await;
        }
    }

    /// Asks every available node whose agent could not be reached for its pools, all at once,
    /// each bounded by the call timeout; those that answer are candidates again.
    pub async fn probe_unreachable(&self) {
        let s = &self.shared;
        let suspects: Vec<NodeId> = s
            .read()
            .iter()
            .filter(|(_, e)| e.unreachable.is_some() && s.is_fresh(e))
            .map(|(id, _)| id.clone())
            .collect();
        let mut probes = tokio::task::JoinSet::new();
        for node in suspects {
            let agent = self.gated(node);
            probes.spawn(async move { agent.pools().await });
        }
        probes.join_all().await;
    }

    /// Whether a call has failed to reach the node's agent since one last got through.
    pub fn is_unreachable(&self, node: &NodeId) -> bool {
        self.shared.read().get(node).is_some_and(|e| e.unreachable.is_some())
    }

    /// The gRPC Registry service over this registry, ready to add to a server.
    pub fn service(&self) -> v1::registry_server::RegistryServer<RegistryService> {
        v1::registry_server::RegistryServer::new(RegistryService { registry: self.clone() })
            .max_decoding_message_size(self.shared.config.max_heartbeat_bytes)
    }

    /// Whether a node was forgotten after `forget_after` (and has not come back since).
    pub fn is_forgotten(&self, node: &NodeId) -> bool {
        self.shared.forgotten().contains_key(node)
    }

    fn gated(&self, node: NodeId) -> Arc<dyn Agent> {
        Arc::new(RegisteredAgent {
            node,
            shared: self.shared.clone(),
        })
    }
}

impl Directory for Registry {
    /// Any node that registered, or was forgotten (calls to an unavailable one answer UNAVAILABLE
    /// naming it); while the registry settles after a start, also a node that has not registered
    /// yet.
    fn agent(&self, node: &NodeId) -> Option<Arc<dyn Agent>> {
        let known = self.shared.read().contains_key(node) || self.is_forgotten(node);
        (known || !self.settled()).then(|| self.gated(node.clone()))
    }

    /// Any node, known or not: one never heard of answers UNAVAILABLE ("it has not registered
    /// with this controller since it started").
    fn owner(&self, node: &NodeId) -> Option<Arc<dyn Agent>> {
        Some(self.gated(node.clone()))
    }

    /// The available nodes, by node id.
    fn agents(&self) -> Vec<Arc<dyn Agent>> {
        let s = &self.shared;
        let fresh: Vec<NodeId> = s
            .read()
            .iter()
            .filter(|(_, e)| s.is_fresh(e))
            .map(|(id, _)| id.clone())
            .collect();
        fresh.into_iter().map(|n| self.gated(n)).collect()
    }

    fn shared(&self) -> Option<Arc<dyn Agent>> {
        self.shared.shared_pools.clone()
    }

    fn settling(&self) -> bool {
        !self.settled()
    }

    /// An available node's pools from its last heartbeat.
    fn reported_pools(&self, node: &NodeId) -> Option<Vec<PoolStatus>> {
        let s = &self.shared;
        s.read()
            .get(node)
            .filter(|e| s.is_fresh(e))
            .map(|e| e.report.pools.clone())
    }

    fn shut_pools(&self, node: &NodeId) -> Vec<(PoolName, String)> {
        self.shared
            .read()
            .get(node)
            .map(|e| e.report.shut_pools.clone())
            .unwrap_or_default()
    }

    /// The available nodes, then the shared pools' agent.
    fn all(&self) -> Vec<Arc<dyn Agent>> {
        let mut all = self.agents();
        all.extend(self.shared.shared_pools.clone());
        all
    }

    fn answers(&self, node: &NodeId) -> bool {
        !self.is_unreachable(node)
    }

    /// Every registered node, available or not (calls to an unavailable one answer UNAVAILABLE
    /// naming it), then the shared pools' agent.
    fn listed(&self) -> Vec<Arc<dyn Agent>> {
        let nodes: Vec<NodeId> = self.shared.read().keys().cloned().collect();
        let mut all: Vec<Arc<dyn Agent>> = nodes.into_iter().map(|n| self.gated(n)).collect();
        all.extend(self.shared.shared_pools.clone());
        all
    }
}

/// A registered node's agent as the controller holds it: each call first checks the node is
/// available and uses its latest address.
struct RegisteredAgent {
    node: NodeId,
    shared: Arc<Shared>,
}

impl RegisteredAgent {
    fn remote(&self) -> Result<Arc<RemoteAgent>, StorageError> {
        self.shared.reachable(&self.node)
    }

    /// Notes whether a call reached the node's agent: one that could not takes the node out of
    /// placement until a call (or the sweeper's probe) gets through again.
    fn seen<T>(&self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        let failed = matches!(&r, Err(e) if is_unreachable(&self.node, e));
        let marked = self
            .shared
            .read()
            .get(&self.node)
            .is_some_and(|e| e.unreachable.is_some());
        if failed == marked {
            return r;
        }
        let mut nodes = self.shared.write();
        if let Some(e) = nodes.get_mut(&self.node) {
            match (failed, e.unreachable) {
                (true, None) => {
                    tracing::warn!(
                        node = self.node.as_str(),
                        "the node's agent cannot be reached; no new volumes go there until it answers"
                    );
                    e.unreachable = Some(self.shared.clock.now());
                }
                (false, Some(_)) => {
                    tracing::info!(node = self.node.as_str(), "the node's agent answers again");
                    e.unreachable = None;
                }
                _ => {}
            }
        }
        r
    }
}

#[tonic::async_trait]
impl Agent for RegisteredAgent {
    fn node(&self) -> &NodeId {
        &self.node
    }
    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        self.seen(self.remote()?.create_volume(req).await)
    }
    async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
        self.seen(self.remote()?.delete_volume(id).await)
    }
    async fn expand_volume(&self, id: VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        self.seen(self.remote()?.expand_volume(id, range).await)
    }
    async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError> {
        self.seen(self.remote()?.modify_volume(id, m).await)
    }
    async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
        self.seen(self.remote()?.volume(id).await)
    }
    async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
        self.seen(self.remote()?.volumes().await)
    }
    async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
        self.seen(self.remote()?.volume_named(name).await)
    }
    async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError> {
        self.seen(self.remote()?.snapshot_named(name).await)
    }
    async fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
        freeze: bool,
        backup: Option<BackupRequest>,
    ) -> Result<SnapshotRecord, StorageError> {
        self.seen(self.remote()?.create_snapshot(name, source, freeze, backup).await)
    }
    async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError> {
        self.seen(self.remote()?.delete_snapshot(id).await)
    }
    async fn forget_backup(&self, id: BackupId) -> Result<bool, StorageError> {
        self.seen(self.remote()?.forget_backup(id).await)
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
        self.seen(self.remote()?.snapshots().await)
    }
    async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.seen(self.remote()?.pools().await)
    }
    async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError> {
        self.seen(self.remote()?.static_exists(id).await)
    }
    async fn export_data(&self, source: Source) -> Result<Frames, StorageError> {
        self.seen(self.remote()?.export_data(source).await)
    }
    async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError> {
        self.remote()?.block_ranges(q, max).await
    }
    async fn import_volume(&self, req: NewVolume, frames: Frames) -> Result<VolumeRecord, StorageError> {
        self.seen(self.remote()?.import_volume(req, frames).await)
    }
    async fn copy_from(&self, req: NewVolume, source: &dyn Agent) -> Result<VolumeRecord, StorageError> {
        if self.shared.config.transfers == TransferPath::ViaController {
            return super::relay(self, req, source).await;
        }
        let object = super::copied(&req)?;
        let target = self.remote()?;
        let from = self.shared.pull_from(&self.node, &object)?;
        self.seen(target.pull_volume(&req, from).await)
    }
    async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError> {
        self.remote()?.create_group(req).await
    }
    async fn delete_group(&self, id: GroupId) -> Result<(), StorageError> {
        self.remote()?.delete_group(id).await
    }
    async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError> {
        self.remote()?.group(id).await
    }
    async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError> {
        self.remote()?.group_named(name).await
    }
    async fn cut_group_part(
        &self,
        id: GroupId,
        req: NewGroup,
        meet: Arc<crate::agent::Rendezvous>,
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        match self.remote() {
            Ok(r) => self.seen(r.cut_group_part(id, req, meet).await),
            Err(e) => {
                meet.fail();
                Err(e)
            }
        }
    }
    async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError> {
        self.seen(self.remote()?.put_group(rec).await)
    }
    async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError> {
        self.seen(self.remote()?.delete_group_part(id, members).await)
    }
}

/// The gRPC face of the registry.
pub struct RegistryService {
    registry: Registry,
}

impl RegistryService {
    fn record(&self, rpc: &str, req: Request<v1::NodeStatus>) -> Result<Response<v1::RegistryAck>, Status> {
        let (cert, peer) = (tls::peer_certificate(&req), req.remote_addr());
        let report = NodeReport::try_from(req.into_inner()).map_err(RegistryError::from)?;
        let identity = self
            .registry
            .identify(cert.as_ref(), &report.node)
            .and_then(|identity| {
                self.registry
                    .check_agent_address(&report.agent_address, peer)
                    .map(|()| identity)
            })
            .inspect_err(|e| {
                tracing::warn!(node = report.node.as_str(), rpc, error = %e, "heartbeat refused");
            })?;
        let (node, address) = (report.node.clone(), report.agent_address.clone());
        let change = self.registry.heartbeat_as(report, identity)?;
        let (node, address) = (node.as_str(), address.to_string());
        match change {
            Change::New => tracing::info!(node, address, rpc, "node registered"),
            Change::Revived { silent_for } => {
                tracing::info!(node, address, silent_secs = silent_for.as_secs(), "node is back")
            }
            Change::Moved { from } => tracing::info!(node, address, from = %from, "node's agent moved"),
            Change::Same => tracing::debug!(node, "heartbeat"),
        }
        Ok(Response::new(v1::RegistryAck {
            heartbeat_interval_millis: self.registry.config().heartbeat_interval.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

#[tonic::async_trait]
impl v1::registry_server::Registry for RegistryService {
    async fn register(&self, req: Request<v1::NodeStatus>) -> Result<Response<v1::RegistryAck>, Status> {
        self.record("Register", req)
    }

    async fn heartbeat(&self, req: Request<v1::NodeStatus>) -> Result<Response<v1::RegistryAck>, Status> {
        self.record("Heartbeat", req)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("nodes", &self.shared.read().keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic::Code;

    use super::*;
    use crate::storage::record::Layout;

    /// A clock the test moves by hand.
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn new() -> Arc<ManualClock> {
            Arc::new(ManualClock(Mutex::new(Instant::now())))
        }
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    const INTERVAL: Duration = Duration::from_secs(5);

    fn registry(clock: &Arc<ManualClock>) -> Registry {
        let config = RegistryConfig {
            heartbeat_interval: INTERVAL,
            missed_heartbeats: 3,
            settle: 2 * INTERVAL,
            ..Default::default()
        };
        Registry::with_clock(config, Tls::Insecure, None, clock.clone())
    }

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn report(n: &str, port: u16, free: u64) -> NodeReport {
        NodeReport {
            node: node(n),
            topology: BTreeMap::from([("topology.cellar.csi.dev/node".into(), n.into())]),
            // Nothing listens there: every call that gets through the registry fails fast.
            agent_address: HostPort::parse(&format!("127.0.0.1:{port}")).unwrap(),
            pools: vec![PoolStatus {
                name: PoolName::parse("default").unwrap(),
                is_default: true,
                default_layout: Layout::Dir,
                layouts: vec![Layout::Dir],
                total_bytes: 100,
                available_bytes: free,
                image_allocatable_bytes: free,
                provisioned_bytes: 0,
                shared: false,
            }],
            version: "0.1.0".into(),
            shut_pools: Vec::new(),
        }
    }

    fn names(agents: Vec<Arc<dyn Agent>>) -> Vec<String> {
        agents.iter().map(|a| a.node().as_str().to_string()).collect()
    }

    #[tokio::test]
    async fn heartbeat_registers_a_node_with_its_topology_and_pools() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        assert_eq!(r.heartbeat(report("node-1", 9, 40)).unwrap(), Change::New);
        assert!(r.is_available(&node("node-1")));
        assert_eq!(names(r.agents()), ["node-1"]);
        assert_eq!(
            r.topology(&node("node-1")).unwrap()["topology.cellar.csi.dev/node"],
            "node-1"
        );
        assert_eq!(r.pools(&node("node-1")).unwrap()[0].available_bytes, 40);
        clock.advance(Duration::from_secs(2));
        assert_eq!(r.last_heartbeat_age(&node("node-1")), Some(Duration::from_secs(2)));
    }

    #[tokio::test]
    async fn later_heartbeat_replaces_pools() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        r.heartbeat(report("node-1", 9, 40)).unwrap();
        assert_eq!(r.heartbeat(report("node-1", 9, 10)).unwrap(), Change::Same);
        assert_eq!(r.pools(&node("node-1")).unwrap()[0].available_bytes, 10);
    }

    #[tokio::test]
    async fn missed_heartbeats_mark_a_node_unavailable_but_keep_it_listed() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        r.heartbeat(report("node-1", 9, 40)).unwrap();
        r.heartbeat(report("node-2", 9, 40)).unwrap();
        clock.advance(3 * INTERVAL);
        r.heartbeat(report("node-2", 9, 40)).unwrap();
        assert!(
            r.is_available(&node("node-1")),
            "exactly three intervals is not yet a miss"
        );
        clock.advance(Duration::from_millis(1));

        assert!(!r.is_available(&node("node-1")));
        assert_eq!(names(r.agents()), ["node-2"]);
        let listed: Vec<_> = r.nodes().iter().map(|n| (n.report.node.clone(), n.available)).collect();
        assert_eq!(listed, [(node("node-1"), false), (node("node-2"), true)]);
        assert_eq!(r.sweep(), [node("node-1")]);
        assert!(r.sweep().is_empty(), "a node is reported down once");

        let agent = r.agent(&node("node-1")).expect("an unavailable node is still known");
        let s = Status::from(agent.volumes().await.unwrap_err());
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("node-1 is unavailable"), "{}", s.message());
        assert!(s.message().contains("no heartbeat for 15s"), "{}", s.message());
    }

    #[tokio::test]
    async fn a_new_heartbeat_revives_an_unavailable_node() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        r.heartbeat(report("node-1", 9, 40)).unwrap();
        clock.advance(10 * INTERVAL);
        assert!(!r.is_available(&node("node-1")));
        assert_eq!(
            r.heartbeat(report("node-1", 9, 40)).unwrap(),
            Change::Revived {
                silent_for: 10 * INTERVAL
            }
        );
        assert!(r.is_available(&node("node-1")));
        assert_eq!(names(r.agents()), ["node-1"]);
    }

    #[tokio::test]
    async fn a_restarted_registry_refills_from_one_heartbeat_each() {
        let clock = ManualClock::new();
        let before = registry(&clock);
        for n in ["node-1", "node-2", "node-3"] {
            before.heartbeat(report(n, 9, 40)).unwrap();
        }
        drop(before);
        let after = registry(&clock);
        assert!(after.nodes().is_empty());
        for n in ["node-1", "node-2", "node-3"] {
            assert_eq!(after.heartbeat(report(n, 9, 40)).unwrap(), Change::New);
        }
        assert_eq!(names(after.agents()), ["node-1", "node-2", "node-3"]);
    }

    #[tokio::test]
    async fn an_unknown_node_is_unavailable_while_settling_then_absent() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        let early = r.agent(&node("node-9")).expect("may still register");
        let s = Status::from(early.volume_named("pvc-1".into()).await.unwrap_err());
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("node-9"), "{}", s.message());
        assert!(!r.settled());
        clock.advance(2 * INTERVAL);
        assert!(r.settled());
        assert!(r.agent(&node("node-9")).is_none(), "not a candidate, not listed");
        // A request naming an object on it is still answered UNAVAILABLE, never "no such node".
        let owner = r.owner(&node("node-9")).expect("answers for its objects");
        let s = Status::from(
            owner
                .delete_volume(VolumeId::parse("local:node-9:default:pvc-1").unwrap())
                .await
                .unwrap_err(),
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("has not registered"), "{}", s.message());
    }

    #[tokio::test]
    async fn a_moved_agent_gets_a_new_client() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        r.heartbeat(report("node-1", 9, 40)).unwrap();
        assert_eq!(
            r.heartbeat(report("node-1", 10, 40)).unwrap(),
            Change::Moved {
                from: HostPort::parse("127.0.0.1:9").unwrap()
            }
        );
        let remote = r.shared.reachable(&node("node-1")).unwrap();
        assert_eq!(remote.address().to_string(), "127.0.0.1:10");
    }

    /// A port nothing listens on: a call gets through the registry and fails at the node.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn calls_to_an_available_node_go_to_its_agent() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        let port = closed_port();
        r.heartbeat(report("node-1", port, 40)).unwrap();
        let s = Status::from(r.agent(&node("node-1")).unwrap().pools().await.unwrap_err());
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().contains(&format!("agent at 127.0.0.1:{port}, Pools")),
            "{}",
            s.message()
        );
    }

    fn bounded(clock: &Arc<ManualClock>, max_nodes: usize, forget_after: Duration) -> Registry {
        let config = RegistryConfig {
            heartbeat_interval: INTERVAL,
            missed_heartbeats: 3,
            settle: 2 * INTERVAL,
            max_nodes,
            forget_after,
            ..Default::default()
        };
        Registry::with_clock(config, Tls::Insecure, None, clock.clone())
    }

    #[tokio::test]
    async fn a_flood_of_registrations_stays_bounded_and_live_nodes_keep_their_place() {
        let clock = ManualClock::new();
        let r = bounded(&clock, 100, Duration::from_secs(3600));
        let mut refused = 0;
        for i in 0..10_000 {
            match r.heartbeat(report(&format!("fake-{i}"), 9, 40)) {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(Status::from(e).code(), Code::ResourceExhausted);
                    refused += 1;
                }
            }
        }
        assert_eq!(r.nodes().len(), 100);
        assert_eq!(refused, 9_900);
        // A node already known keeps beating at the limit.
        assert_eq!(r.heartbeat(report("fake-0", 9, 40)).unwrap(), Change::Same);

        // Once the flood stops beating, a real node takes the place of an unavailable one.
        clock.advance(4 * INTERVAL);
        assert_eq!(r.heartbeat(report("node-1", 9, 40)).unwrap(), Change::New);
        assert_eq!(r.nodes().len(), 100);
        assert!(r.is_available(&node("node-1")));
    }

    #[tokio::test]
    async fn a_silent_node_is_forgotten_after_the_configured_time_and_its_calls_stay_unavailable() {
        let clock = ManualClock::new();
        let r = bounded(&clock, 100, 20 * INTERVAL);
        r.heartbeat(report("node-1", 9, 40)).unwrap();
        r.heartbeat(report("node-2", 9, 40)).unwrap();
        clock.advance(20 * INTERVAL);
        r.heartbeat(report("node-2", 9, 40)).unwrap();
        r.sweep();
        assert!(
            r.node(&node("node-1")).is_some(),
            "exactly the configured time is not yet too long"
        );

        clock.advance(Duration::from_millis(1));
        r.sweep();
        assert!(r.node(&node("node-1")).is_none(), "forgotten");
        assert!(r.is_forgotten(&node("node-1")));
        assert_eq!(names(r.agents()), ["node-2"]);
        assert_eq!(names(r.listed()), ["node-2"]);
        let agent = r
            .agent(&node("node-1"))
            .expect("a forgotten node is not 'no such node'");
        let s = Status::from(agent.volumes().await.unwrap_err());
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().contains("forgotten by the registry after 100s"),
            "{}",
            s.message()
        );

        assert_eq!(
            r.heartbeat(report("node-1", 9, 40)).unwrap(),
            Change::Revived {
                silent_for: 20 * INTERVAL + Duration::from_millis(1)
            }
        );
        assert!(!r.is_forgotten(&node("node-1")));
        assert!(r.is_available(&node("node-1")));
    }

    /// Nodes that come and go do not grow the controller's metrics for ever: a node's agent call
    /// error series go when the registry forgets it, and only its.
    #[tokio::test]
    async fn a_forgotten_nodes_agent_error_series_are_removed() {
        let clock = ManualClock::new();
        let r = bounded(&clock, 100, 20 * INTERVAL);
        let port = closed_port();
        let (gone, kept) = ("churned-node", "staying-node");
        for n in [gone, kept] {
            r.heartbeat(report(n, port, 40)).unwrap();
            r.agent(&node(n)).unwrap().pools().await.unwrap_err();
        }
        let series = |n: &str| {
            let out = crate::metrics::Exporter::new("controller", crate::health::Readiness::starting())
                .encode()
                .unwrap();
            let label = format!("node=\"{n}\"");
            out.lines()
                .filter(|l| l.starts_with("cellar_agent_call_errors_total{") && l.contains(&label))
                .count()
        };
        assert_eq!((series(gone), series(kept)), (1, 1));

        clock.advance(20 * INTERVAL);
        r.heartbeat(report(kept, port, 40)).unwrap();
        clock.advance(Duration::from_millis(1));
        r.sweep();
        assert!(r.is_forgotten(&node(gone)));
        assert_eq!((series(gone), series(kept)), (0, 1));
    }

    #[tokio::test]
    async fn forgotten_node_ids_are_bounded_too() {
        let clock = ManualClock::new();
        let r = bounded(&clock, 2, 20 * INTERVAL);
        for n in ["node-1", "node-2"] {
            r.heartbeat(report(n, 9, 40)).unwrap();
            clock.advance(INTERVAL);
        }
        clock.advance(21 * INTERVAL);
        r.sweep();
        r.heartbeat(report("node-3", 9, 40)).unwrap();
        clock.advance(21 * INTERVAL);
        r.sweep();
        assert!(r.nodes().is_empty());
        assert!(!r.is_forgotten(&node("node-1")), "the oldest forgotten id is dropped");
        assert!(r.is_forgotten(&node("node-2")));
        assert!(r.is_forgotten(&node("node-3")));
    }

    /// With `--agent-address-is-peer` a node's agent address must be the IP address its
    /// heartbeat came from (an IPv4 peer seen as IPv4-mapped IPv6 too); another address, a DNS
    /// name or an unknown peer is refused, naming the address to advertise. Without it any
    /// address is taken, as before.
    #[test]
    fn an_agent_address_that_is_not_the_peers_is_refused_when_asked() {
        let (peer, mapped): (SocketAddr, SocketAddr) = (
            "10.0.0.5:40000".parse().unwrap(),
            "[::ffff:10.0.0.5]:40000".parse().unwrap(),
        );
        let addr = |a: &str| HostPort::parse(a).unwrap();
        let open = Registry::new(RegistryConfig::default(), Tls::Insecure, None);
        open.check_agent_address(&addr("10.9.9.9:7070"), Some(peer))
            .expect("not asked");
        open.check_agent_address(&addr("agent.example:7070"), None)
            .expect("not asked");
        let config = RegistryConfig {
            agent_address_is_peer: true,
            ..Default::default()
        };
        let strict = Registry::new(config, Tls::Insecure, None);
        for from in [peer, mapped] {
            strict
                .check_agent_address(&addr("10.0.0.5:7070"), Some(from))
                .expect("its own address");
        }
        for (given, from) in [
            ("10.0.0.6:7070", Some(peer)),
            ("agent.example:7070", Some(peer)),
            ("[::1]:7070", Some(peer)),
            ("10.0.0.5:7070", None),
        ] {
            let e = strict.check_agent_address(&addr(given), from).expect_err(given);
            let m = e.to_string();
            assert_eq!(Status::from(e).code(), tonic::Code::PermissionDenied, "{given}");
            assert!(m.contains("--agent-address-is-peer"), "{m}");
            if from.is_some() {
                assert!(m.contains("advertise 10.0.0.5:7070"), "{m}");
            }
        }
    }

    #[tokio::test]
    async fn a_call_that_cannot_reach_a_node_marks_it_until_a_call_gets_through() {
        let clock = ManualClock::new();
        let r = registry(&clock);
        let port = closed_port();
        r.heartbeat(report("node-1", port, 40)).unwrap();
        r.heartbeat(report("node-2", 9, 40)).unwrap();
        assert!(r.agent(&node("node-1")).unwrap().pools().await.is_err());
        assert!(r.is_unreachable(&node("node-1")));
        assert!(!r.answers(&node("node-1")));
        assert!(r.answers(&node("node-2")));
        assert_eq!(names(r.agents()), ["node-1", "node-2"], "still available");
        assert_eq!(r.reported_pools(&node("node-1")).unwrap()[0].available_bytes, 40);
        // A heartbeat says the process lives, not that its agent answers.
        r.heartbeat(report("node-1", port, 40)).unwrap();
        assert!(r.is_unreachable(&node("node-1")));
        r.probe_unreachable().await;
        assert!(
            r.is_unreachable(&node("node-1")),
            "the probe did not get through either"
        );
    }

    #[test]
    fn a_heartbeat_with_a_bad_address_is_invalid_argument() {
        let mut m = v1::NodeStatus::from(&report("node-1", 9, 40));
        m.agent_address = "0.0.0.0:7070".into();
        let e = NodeReport::try_from(m).unwrap_err();
        let s = Status::from(RegistryError::from(e));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("agent_address"), "{}", s.message());
    }

    /// The grant names the reader by the name its certificate carries (its own, or the shared
    /// one), and the target is told the source's address and the name to expect on it.
    #[tokio::test]
    async fn a_pull_names_each_node_by_the_identity_it_registered_with() {
        use prost::Message;
        let clock = ManualClock::new();
        let r = registry(&clock);
        r.heartbeat_as(
            report("node-1", 7001, 40),
            NodeIdentity::Own("node-1.cellar-agent".into()),
        )
        .unwrap();
        r.heartbeat(report("node-2", 7002, 40)).unwrap();
        let snap = Source::Snapshot(SnapshotId::parse("snap:local:node-1:default:s").unwrap());
        let from = r.shared.pull_from(&node("node-2"), &snap).unwrap();
        assert_eq!(from.address.to_string(), "127.0.0.1:7001");
        assert_eq!(from.server_name, "node-1.cellar-agent");
        let claims = Claims::try_from(v1::GrantClaims::decode(from.grant.claims.as_slice()).unwrap()).unwrap();
        assert_eq!(
            (
                claims.source_node,
                claims.object,
                claims.reader_node,
                claims.reader_name.as_str()
            ),
            (node("node-1"), snap.clone(), node("node-2"), "cellar-agent")
        );
        let back = Source::Volume(VolumeId::parse("local:node-2:default:v").unwrap());
        let to_node_1 = r.shared.pull_from(&node("node-1"), &back).unwrap();
        let claims = Claims::try_from(v1::GrantClaims::decode(to_node_1.grant.claims.as_slice()).unwrap()).unwrap();
        assert_eq!(claims.reader_name, "node-1.cellar-agent");
        assert_eq!(to_node_1.server_name, AGENT_SERVER_NAME);
        let gone = Source::Volume(VolumeId::parse("local:node-9:default:v").unwrap());
        let e = Status::from(r.shared.pull_from(&node("node-1"), &gone).unwrap_err());
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    }
}
