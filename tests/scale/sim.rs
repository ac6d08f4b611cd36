//! Simulated nodes for scale runs: many lightweight agents in one process, each an in-memory
//! volume table served through the real agent gRPC service (`AgentService`, its `Gate`) over real
//! mutual TLS with a certificate of its own (`<node>.cellar-agent`), and heartbeating into a real
//! `cellar controller` with the real heartbeat code. Only the storage is fake: no disk, no mounts,
//! so a thousand of them fit in one process (docs/benchmarks.md, "Scale").
//!
//! Used by tests/scale.rs and by examples/scale.rs (bench/scale.sh); never by the `cellar` binary.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellar::agent::heartbeat::{Heartbeat, HeartbeatConfig, Resolve};
use cellar::agent::remote::HostPort;
use cellar::agent::server::{serve, AgentService};
use cellar::agent::tls::Tls;
use cellar::agent::{Agent, Frames};
use cellar::storage::engine::{CapacityRange, Condition, Mutable, NewGroup, NewVolume, PoolStatus, Source};
use cellar::storage::id::{GroupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
use cellar::storage::record::{GroupRecord, Layout, SnapshotRecord, VolumeMode, VolumeRecord, RECORD_VERSION};
use cellar::storage::StorageError;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The one pool every simulated node has.
pub const POOL: &str = "default";

/// One simulated node's storage: its volumes in memory, by id, and by name.
pub struct SimNode {
    node: NodeId,
    total_bytes: u64,
    volumes: Mutex<Volumes>,
    /// While set, every call through the agent service waits forever (the controller's deadline
    /// gives up on it); the heartbeat goes on, as from a node whose process lives but whose
    /// agent hangs.
    hung: AtomicBool,
    /// Calls the agent service received, for tests that check who was asked.
    pub calls: AtomicU64,
}

#[derive(Default)]
struct Volumes {
    by_id: BTreeMap<String, VolumeRecord>,
    by_name: HashMap<String, String>,
    provisioned: u64,
}

impl SimNode {
    pub fn new(node: &str, total_bytes: u64) -> Arc<SimNode> {
        Arc::new(SimNode {
            node: NodeId::parse(node).expect("simulated node name"),
            total_bytes,
            volumes: Mutex::default(),
            hung: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        })
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The volume id this node gives a volume named `name`.
    pub fn volume_id(&self, name: &str) -> String {
        format!("local:{}:{POOL}:{name}", self.node.as_str())
    }

    /// Makes a volume without going through the controller (the volumes a node already holds
    /// when a run starts).
    pub fn preload(&self, name: &str, bytes: u64) {
        self.make(name, bytes, BTreeMap::new()).expect("preload");
    }

    pub fn set_hung(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }

    pub fn volume_ids(&self) -> Vec<String> {
        self.table().by_id.keys().cloned().collect()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Volumes> {
        self.volumes.lock().expect("volumes lock")
    }

    fn make(&self, name: &str, bytes: u64, parameters: BTreeMap<String, String>) -> Result<VolumeRecord, StorageError> {
        let mut t = self.table();
        if let Some(id) = t.by_name.get(name) {
            let existing = &t.by_id[id];
            return if existing.capacity_bytes == bytes {
                Ok(existing.clone())
            } else {
                Err(StorageError::Conflict(format!(
                    "volume '{name}' exists with {} bytes, not {bytes}",
                    existing.capacity_bytes
                )))
            };
        }
        if self.total_bytes - t.provisioned < bytes {
            return Err(StorageError::Exhausted(format!(
                "node {} has {} bytes free, not {bytes}",
                self.node.as_str(),
                self.total_bytes - t.provisioned
            )));
        }
        let id = self.volume_id(name);
        let id = VolumeId::parse(&id).map_err(|e| StorageError::Unsupported(e.to_string()))?;
        let rec = VolumeRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            id: id.clone(),
            layout: Layout::Dir,
            capacity_bytes: bytes,
            mode: VolumeMode::Filesystem,
            access_modes: vec![],
            fs_type: String::new(),
            parameters,
            source: None,
            created_unix_secs: 0,
            delete_policy: None,
            compression: None,
            fs_bytes: 0,
        };
        t.provisioned += bytes;
        t.by_name.insert(name.to_string(), id.to_string());
        t.by_id.insert(id.to_string(), rec.clone());
        Ok(rec)
    }

    fn pool(&self) -> PoolStatus {
        let provisioned = self.table().provisioned;
        let free = self.total_bytes - provisioned;
        PoolStatus {
            name: PoolName::parse(POOL).expect("pool name"),
            is_default: true,
            default_layout: Layout::Dir,
            layouts: vec![Layout::Dir],
            total_bytes: self.total_bytes,
            available_bytes: free,
            image_allocatable_bytes: free,
            provisioned_bytes: provisioned,
            shared: false,
        }
    }
}

/// A simulated node as an [`Agent`]: `served` is the face the agent service calls (it hangs with
/// the node), the other the one its heartbeat reads its pools from.
pub struct SimAgent {
    sim: Arc<SimNode>,
    served: bool,
}

impl SimAgent {
    async fn enter(&self) {
        if self.served {
            self.sim.calls.fetch_add(1, Ordering::Relaxed);
            if self.sim.hung.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn healthy() -> Condition {
    Condition {
        abnormal: false,
        message: String::new(),
    }
}

fn not_simulated(what: &str) -> StorageError {
    StorageError::Unsupported(format!("{what} is not simulated"))
}

#[tonic::async_trait]
impl Agent for SimAgent {
    fn node(&self) -> &NodeId {
        &self.sim.node
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        self.enter().await;
        if req.pool.as_ref().is_some_and(|p| p.as_str() != POOL) || req.source.is_some() {
            return Err(not_simulated("a pool other than 'default', or a content source,"));
        }
        self.sim.make(&req.name, req.capacity.choose()?, req.parameters)
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
        self.enter().await;
        let mut t = self.sim.table();
        if let Some(rec) = t.by_id.remove(&id.to_string()) {
            t.by_name.remove(&rec.name);
            t.provisioned -= rec.capacity_bytes;
        }
        Ok(())
    }

    async fn expand_volume(&self, _: VolumeId, _: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        self.enter().await;
        Err(not_simulated("expansion"))
    }

    async fn modify_volume(&self, _: VolumeId, _: Mutable) -> Result<VolumeRecord, StorageError> {
        self.enter().await;
        Err(not_simulated("modification"))
    }

    async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
        self.enter().await;
        Ok(self
            .sim
            .table()
            .by_id
            .get(&id.to_string())
            .map(|r| (r.clone(), healthy())))
    }

    async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
        self.enter().await;
        Ok(self
            .sim
            .table()
            .by_id
            .values()
            .map(|r| (r.clone(), healthy()))
            .collect())
    }

    async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
        self.enter().await;
        let t = self.sim.table();
        Ok(t.by_name.get(&name).map(|id| t.by_id[id].clone()))
    }

    async fn snapshot_named(&self, _: String) -> Result<Option<SnapshotRecord>, StorageError> {
        self.enter().await;
        Ok(None)
    }

    async fn create_snapshot(
        &self,
        _: String,
        _: VolumeId,
        _: bool,
        _: Option<cellar::storage::engine::BackupRequest>,
    ) -> Result<SnapshotRecord, StorageError> {
        self.enter().await;
        Err(not_simulated("snapshots"))
    }

    async fn delete_snapshot(&self, _: SnapshotId) -> Result<(), StorageError> {
        self.enter().await;
        Ok(())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
        self.enter().await;
        Ok(vec![])
    }

    async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.enter().await;
        Ok(vec![self.sim.pool()])
    }

    async fn static_exists(&self, _: StaticId) -> Result<bool, StorageError> {
        self.enter().await;
        Ok(false)
    }

    async fn export_data(&self, _: Source) -> Result<Frames, StorageError> {
        self.enter().await;
        Err(not_simulated("export"))
    }

    async fn import_volume(&self, _: NewVolume, _: Frames) -> Result<VolumeRecord, StorageError> {
        self.enter().await;
        Err(not_simulated("import"))
    }

    async fn create_group(&self, _: NewGroup) -> Result<GroupRecord, StorageError> {
        self.enter().await;
        Err(not_simulated("group snapshots"))
    }

    async fn delete_group(&self, _: GroupId) -> Result<(), StorageError> {
        self.enter().await;
        Ok(())
    }

    async fn group(&self, _: GroupId) -> Result<Option<GroupRecord>, StorageError> {
        self.enter().await;
        Ok(None)
    }

    async fn group_named(&self, _: String) -> Result<Option<GroupRecord>, StorageError> {
        self.enter().await;
        Ok(None)
    }

    async fn block_ranges(
        &self,
        _: cellar::storage::cbt::Query,
        _: usize,
    ) -> Result<(u64, cellar::agent::RangeBatches), cellar::storage::cbt::MetadataError> {
        self.enter().await;
        Err(not_simulated("changed block tracking").into())
    }

    async fn cut_group_part(
        &self,
        _: GroupId,
        _: NewGroup,
        meet: Arc<cellar::agent::Rendezvous>,
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        self.enter().await;
        meet.fail();
        Err(not_simulated("group snapshots"))
    }

    async fn put_group(&self, _: GroupRecord) -> Result<(), StorageError> {
        self.enter().await;
        Err(not_simulated("group snapshots"))
    }

    async fn delete_group_part(&self, _: GroupId, _: Vec<SnapshotId>) -> Result<(), StorageError> {
        self.enter().await;
        Ok(())
    }
}

/// The controller's registry is always at this one address (no DNS).
struct Fixed(SocketAddr);

#[tonic::async_trait]
impl Resolve for Fixed {
    async fn resolve(&self, _: &HostPort) -> io::Result<Vec<SocketAddr>> {
        Ok(vec![self.0])
    }
}

/// TLS material of one simulated node: the CA, its own certificate and key (PEM).
pub struct NodeTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Where and how the simulated nodes reach the controller.
#[derive(Clone)]
pub struct Controller {
    /// The registry's address.
    pub registry: SocketAddr,
    /// The name on the controller's certificate (the host nodes are told to dial).
    pub name: String,
}

/// A running simulated node: its agent server and its heartbeat, stopped on drop.
pub struct Running {
    pub sim: Arc<SimNode>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Serves `sim`'s agent on a fresh 127.0.0.1 port with its own certificate, and heartbeats it into
/// `controller` every `interval` (until the controller's acknowledgement names another).
pub async fn start(sim: Arc<SimNode>, tls: &NodeTls, controller: &Controller, interval: Duration) -> Running {
    let tls = Tls::from_pem(tls.ca.as_bytes(), tls.cert.as_bytes(), tls.key.as_bytes()).expect("node TLS");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("agent port");
    let agent_address = listener.local_addr().expect("agent address");
    let served: Arc<dyn Agent> = Arc::new(SimAgent {
        sim: sim.clone(),
        served: true,
    });
    let routes = tonic::service::Routes::new(AgentService::over(served).into_server(tls.callers(&controller.name)));
    let server = {
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(listener, tls, routes, std::future::pending()).await {
                eprintln!("simulated agent stopped: {e}");
            }
        })
    };
    let registry = HostPort::parse(&format!("{}:{}", controller.name, controller.registry.port())).expect("registry");
    let advertise = HostPort::parse(&agent_address.to_string()).expect("agent address");
    let topology = [(
        cellar::csi::TOPOLOGY_NODE_KEY.to_string(),
        sim.node().as_str().to_string(),
    )]
    .into();
    let mut config = HeartbeatConfig::new(registry, sim.node().clone(), topology, advertise);
    config.interval = interval;
    let own: Arc<dyn Agent> = Arc::new(SimAgent {
        sim: sim.clone(),
        served: false,
    });
    let beat = Heartbeat::with_resolver(config, tls, own, Arc::new(Fixed(controller.registry)));
    let heartbeat = tokio::spawn(beat.run());
    Running {
        sim,
        tasks: vec![server, heartbeat],
    }
}
