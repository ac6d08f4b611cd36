//! Starting a role: open the pools, build the services, serve until a signal.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::Flock;

use crate::agent::{LocalAgent, SingleNode};
use crate::controller::metadata::SnapshotMetadataService;
use crate::controller::ControllerService;
use crate::csi::v1::controller_server::ControllerServer;
use crate::csi::v1::group_controller_server::GroupControllerServer;
use crate::csi::v1::identity_server::IdentityServer;
use crate::csi::v1::node_server::NodeServer as NodeGrpc;
use crate::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use crate::health::{Readiness, STARTING};
use crate::identity::IdentityService;
use crate::metrics::{Exporter, MetricsError, NodeCollector, NodeSources};
use crate::node::state::NodeState;
use crate::node::{NodeServer, NodeService};
use crate::server::{self, ServeError};
use crate::storage::config::{Config, ConfigError};
use crate::storage::engine::LocalEngine;
use crate::storage::id::{NodeId, PoolName};
use crate::storage::StorageError;

#[derive(Debug, Clone)]
pub struct AllInOne {
    pub endpoint: String,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub driver_name: String,
    pub max_volumes_per_node: i64,
    /// Where to serve /metrics, /healthz and /readyz; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    pub socket: server::SocketLimits,
    /// Name the CSI 1.13 health RPCs in GetCapabilities (docs/health.md); they are served either way.
    pub advertise_volume_health: bool,
    /// Bytes per second that backup uploads and restores may take together; 0: no limit.
    pub backup_bandwidth: u64,
    /// The background prune of backup repositories.
    pub prune: crate::backup::cli::PruneSchedule,
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("--node-id: {0}")]
    NodeId(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening pools: {0}")]
    Storage(#[from] StorageError),
    #[error("node state: {0}")]
    State(#[from] crate::sys::SysError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("data dir {0} is in use by another cellar process (it holds {1}); stop it first")]
    DataDirInUse(PathBuf, PathBuf),
    #[error("opening pools: {0}")]
    Task(String),
    #[error("locking the data dir: {0}")]
    Lock(crate::sys::SysError),
    #[error("{0}")]
    Split(String),
}

/// The file under the data dir that a running driver keeps locked (flock) for its whole life, so a
/// second driver cannot start on the same pools and `cellar report` knows whether one is running.
pub const LOCK_FILE: &str = "cellar.lock";

pub use crate::sys::files::FileLock as DataDirLock;

/// Takes the data dir's lock without waiting. `create` makes the lock file (and the data dir) when
/// missing; the report passes `false`, so it never creates anything.
pub fn lock_data_dir(data_dir: &Path, create: bool) -> Result<DataDirLock, crate::sys::SysError> {
    if create {
        std::fs::create_dir_all(data_dir).map_err(|e| crate::sys::SysError::io("mkdir", data_dir, e))?;
    }
    use crate::sys::files::{Files, LinuxFiles};
    LinuxFiles.try_lock(&data_dir.join(LOCK_FILE), create)
}

pub fn load_config(config: Option<&PathBuf>, data_dir: &std::path::Path) -> Result<Config, ConfigError> {
    match config {
        Some(p) => Config::load(p, data_dir),
        None => Ok(Config::default_for(data_dir)),
    }
}

pub async fn all_in_one(o: AllInOne) -> Result<(), RoleError> {
    let node = NodeId::parse(&o.node_id).map_err(|e| RoleError::NodeId(e.0))?;
    let config = load_config(o.config.as_ref(), &o.data_dir)?;
    // Taken before the socket: a second driver must not replace the first one's socket.
    let _lock = hold_data_dir(&o.data_dir).await?;
    let socket = server::socket_path(&o.endpoint)?;
    let readiness = Readiness::starting();

    // Served before the pools open: /healthz answers and /readyz says 503 during a long start-up purge.
    let node_metrics = NodeCollector::default();
    let metrics = serve_metrics(o.metrics_listen, "all-in-one", readiness.clone(), node_metrics.clone()).await?;

    let engine = {
        let node = node.clone();
        let rosters = o.data_dir.join("rosters");
        tokio::task::spawn_blocking(move || {
            LocalEngine::open_keeping(
                crate::sys::StorageSys::linux(),
                node,
                &config,
                |_| Some(true),
                Some(&rosters),
            )
        })
        .await
        .map_err(|e| RoleError::Task(e.to_string()))??
    };
    let engine = Arc::new(engine);
    engine.start_purger();
    engine.backups().throttle().set_bytes_per_sec(o.backup_bandwidth);
    engine.start_uploads();
    engine.backups().start_pruner(o.prune);
    let state = Arc::new(NodeState::open(&o.data_dir.join("node"), engine.files())?);
    node_metrics.attach(NodeSources {
        engine: engine.clone(),
        state: state.clone(),
    });
    // A pool that could not be opened keeps the driver unready (Probe and /readyz) until it is fixed.
    report_pools(&readiness, &engine);
    tracing::info!(
        node = node.as_str(),
        socket = %socket.display(),
        pools = ?engine.pool_names().iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "all-in-one ready"
    );

    let identity = IdentityService::new(&o.driver_name, readiness.flag());
    let directory: Arc<dyn crate::agent::Directory> = Arc::new(SingleNode(Arc::new(LocalAgent::new(engine.clone()))));
    let metadata = SnapshotMetadataService::new(directory.clone());
    let controller = Arc::new(
        ControllerService::new(directory)
            .advertising_health(o.advertise_volume_health)
            .with_backups(engine.backups().clone()),
    );
    crate::node::start_lease_renewer(engine.clone(), state.clone());
    let mut node_svc = NodeService::new(node, engine, state, o.max_volumes_per_node);
    node_svc.advertise_health = o.advertise_volume_health;
    // The socket appears only now: whoever finds it (kubelet's registrar, a test) finds a driver
    // whose pools and node state are open.
    server::listen_for_shutdown();
    let listener = server::bind(&socket)?;
    metrics.serving(&socket);
    let router = o
        .socket
        .server_builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::from_arc(controller.clone()))
        .add_service(GroupControllerServer::from_arc(controller))
        .add_service(SnapshotMetadataServer::new(metadata))
        .add_service(NodeGrpc::new(NodeServer(Arc::new(node_svc))));
    let served = server::serve_until_signal(router, listener, o.socket, &socket, std::future::pending()).await;
    drop(metrics);
    served?;
    Ok(())
}

/// Takes the data dir's lock, retrying briefly: `cellar report` tries it for an instant to learn
/// whether a driver runs, and a driver starting in that instant must not fail for it.
async fn hold_data_dir(data_dir: &Path) -> Result<Flock<File>, RoleError> {
    const TRIES: u32 = 20;
    for _ in 0..TRIES {
        match lock_data_dir(data_dir, true).map_err(RoleError::Lock)? {
            DataDirLock::Held(lock) => return Ok(lock),
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    Err(RoleError::DataDirInUse(
        data_dir.to_path_buf(),
        data_dir.join(LOCK_FILE),
    ))
}

/// Clears the start-up reason and sets one per pool that could not be opened (logged once each),
/// cleared when it opens: the engine tries them again in the background.
fn report_pools(readiness: &Arc<Readiness>, engine: &Arc<LocalEngine>) {
    let reason = |pool: &PoolName| format!("pool/{}", pool.as_str());
    for (pool, why) in engine.broken_pools() {
        readiness.set(
            &reason(&pool),
            Some(format!("pool '{}' cannot be used: {why}", pool.as_str())),
        );
    }
    readiness.set(STARTING, None);
    let readiness = readiness.clone();
    engine.start_reopener(move |pool| readiness.set(&reason(pool), None));
}

/// The node's registration as a reason: `None` once a controller replica acknowledged this node,
/// else what every replica (or the name lookup) answered.
fn registration(controller: &str, round: &crate::agent::heartbeat::Round) -> Option<String> {
    if !round.acked.is_empty() {
        return None;
    }
    if round.errors.is_empty() {
        return Some(format!(
            "not registered: no address for the controller {controller} (the name does not resolve)"
        ));
    }
    let errors: Vec<String> = round.errors.iter().map(|(a, e)| format!("{a}: {e}")).collect();
    Some(format!(
        "cannot register with the controller {controller}: {}",
        errors.join("; ")
    ))
}

/// The HTTP listener of a role (/metrics, /healthz, /readyz), when `--metrics-listen` is given;
/// it ends when dropped.
struct MetricsServer(Option<(Arc<Exporter>, AbortOnDrop)>);

impl MetricsServer {
    /// From now on `/healthz` also checks that the CSI socket accepts connections.
    fn serving(&self, socket: &Path) {
        if let Some((exporter, _)) = &self.0 {
            exporter.serving(socket.to_path_buf());
        }
    }
}

/// Starts /metrics, /healthz and /readyz on `addr` (when given) with a role's collector.
async fn serve_metrics(
    addr: Option<SocketAddr>,
    role: &'static str,
    readiness: Arc<Readiness>,
    collector: impl prometheus_client::collector::Collector,
) -> Result<MetricsServer, RoleError> {
    let Some(addr) = addr else {
        return Ok(MetricsServer(None));
    };
    let mut exporter = Exporter::new(role, readiness);
    exporter.register(collector);
    let exporter = Arc::new(exporter);
    let listener = crate::metrics::bind(addr).await?;
    let task = AbortOnDrop(tokio::spawn(crate::metrics::serve(listener, exporter.clone())));
    Ok(MetricsServer(Some((exporter, task))))
}

/// Resolves once the stop flag is raised (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A background task that ends with its owner (the metrics listener ends with the role).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS material for the controller ↔ node channel.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
}

impl TlsFlags {
    fn options(&self) -> crate::agent::tls::TlsOptions {
        crate::agent::tls::TlsOptions {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            insecure: self.insecure,
        }
    }

    /// Resolves when the TLS files have been rotated (see `TlsOptions::rotated`).
    fn rotated(&self) -> impl std::future::Future<Output = ()> {
        self.options().rotated(crate::agent::tls::rotation_check())
    }

    fn load(&self) -> Result<crate::agent::tls::Tls, RoleError> {
        self.options().load().map_err(|e| RoleError::Split(e.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct ControllerRole {
    pub endpoint: String,
    pub agent_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub driver_name: String,
    pub tls: TlsFlags,
    pub registry: crate::agent::registry::RegistryConfig,
    /// At most this many registry connections from one address (0: no limit).
    pub registry_peer_limit: usize,
    pub socket: server::SocketLimits,
    pub metrics_listen: Option<SocketAddr>,
    /// The name this controller goes by in volume records of shared pools (its pod name).
    pub name: String,
    /// Name the CSI 1.13 health RPCs in GetCapabilities (docs/health.md); they are served either way.
    pub advertise_volume_health: bool,
    /// Issue node certificates (`--enrol-listen`); off when `None`.
    pub enrolment: Option<ControllerEnrolment>,
    /// The background prune of backup repositories.
    pub prune: crate::backup::cli::PruneSchedule,
}

/// How the controller issues node certificates (docs/security.md, "Enrolment").
#[derive(Debug, Clone)]
pub struct ControllerEnrolment {
    /// Where nodes enrol (TLS with the controller's certificate; nodes present a token, not a
    /// certificate).
    pub listen: SocketAddr,
    pub kube: crate::agent::enrol::kube::KubeConfig,
    /// The Secret holding the enrolment CA, made on the first start.
    pub ca_secret: crate::agent::enrol::ca::ObjectRef,
    pub policy: crate::agent::enrol::EnrolPolicy,
    /// The controller's own certificate from the cluster CA it keeps, instead of `--tls-cert` and
    /// `--tls-key`; `None`: from the files.
    pub cluster_ca: Option<ClusterCa>,
}

/// The cluster CA (`--cluster-ca-secret`): made by the controller on its first start like the
/// enrolment CA, published for the nodes, and signing the controller's own short-lived
/// certificate at every start (docs/security.md, "The cluster CA").
#[derive(Debug, Clone)]
pub struct ClusterCa {
    /// The Secret holding it.
    pub secret: crate::agent::enrol::ca::ObjectRef,
    /// The ConfigMap its certificate is published in (`ca.crt`), for the node pods to mount.
    pub publish: crate::agent::enrol::ca::ObjectRef,
    /// The names of the controller's certificate: every name nodes dial it by.
    pub names: Vec<String>,
    /// How long the controller's certificate is valid; the controller restarts gracefully to
    /// issue itself a new one after two thirds of it.
    pub validity: std::time::Duration,
}

/// How a node obtains its certificate from the controller (`--enrol-token`).
#[derive(Debug, Clone)]
pub struct NodeEnrolmentFlags {
    /// The pod's projected service-account token.
    pub token_file: PathBuf,
    /// The controller's enrolment port, on the host of `--controller`.
    pub port: u16,
    /// Where the key and certificate are kept.
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct NodeRole {
    pub endpoint: String,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub driver_name: String,
    pub controller: String,
    pub agent_listen: SocketAddr,
    pub agent_advertise: String,
    pub tls: TlsFlags,
    pub max_volumes_per_node: i64,
    pub metrics_listen: Option<SocketAddr>,
    pub socket: server::SocketLimits,
    /// Name the CSI 1.13 health RPCs in GetCapabilities (docs/health.md); they are served either way.
    pub advertise_volume_health: bool,
    /// Obtain this node's certificate from the controller instead of `--tls-cert`/`--tls-key`.
    pub enrolment: Option<NodeEnrolmentFlags>,
    /// Bytes per second that backup uploads and restores may take together; 0: no limit.
    pub backup_bandwidth: u64,
}

/// The controller's identity at start.
struct ControllerTls {
    tls: crate::agent::tls::Tls,
    /// The enrolment service, when it issues node certificates.
    enrol: Option<crate::agent::enrol::EnrolService>,
    /// When its own certificate (from the cluster CA) is due for renewal; `None`: from files.
    renewal: Option<std::time::SystemTime>,
}

/// The controller's TLS, and the enrolment service when it issues node certificates: the CA it
/// signs with comes from (or is made in) its Secret, and the controller trusts it besides the
/// install CA, so enrolled nodes can register and be dialled. With a cluster CA, the install CA is
/// that one and the controller's certificate is its own, issued now.
async fn controller_tls(o: &ControllerRole) -> Result<ControllerTls, RoleError> {
    use crate::agent::enrol::{ca, kube::Kube, EnrolService};
    let Some(e) = &o.enrolment else {
        return Ok(ControllerTls {
            tls: o.tls.load()?,
            enrol: None,
            renewal: None,
        });
    };
    if o.tls.insecure {
        return Err(RoleError::Split(
            "--enrol-listen issues certificates and needs TLS: it cannot be combined with --insecure".into(),
        ));
    }
    let enrolment = |e: String| RoleError::Split(format!("enrolment: {e}"));
    let kube = Kube::new(&e.kube).map_err(|err| enrolment(err.to_string()))?;
    let enrolment_ca = ca::obtain(&kube, &e.ca_secret, &ca::CaRole::enrolment(&e.policy.agent_server_name))
        .await
        .map_err(|err| enrolment(err.to_string()))?;
    let (tls, renewal) = match &e.cluster_ca {
        None => {
            let tls = o
                .tls
                .options()
                .load_trusting(Some(enrolment_ca.certificate_pem().as_bytes()))
                .map_err(|err| RoleError::Split(err.to_string()))?;
            (tls, None)
        }
        Some(c) => {
            let cluster = |e: String| RoleError::Split(format!("cluster CA: {e}"));
            let ca = ca::obtain(&kube, &c.secret, &ca::CaRole::cluster(&c.names))
                .await
                .map_err(|err| cluster(err.to_string()))?;
            ca::publish(&kube, &c.publish, ca.certificate_pem())
                .await
                .map_err(|err| cluster(err.to_string()))?;
            let own = ca::controller_identity(&ca, &c.secret, &c.names, c.validity)
                .map_err(|err| cluster(err.to_string()))?;
            // The peers are nodes (enrolment CA); the cluster CA, which vouches for no node, is the
            // chain of the controller's own certificate.
            let trust = format!(
                "{}\n{}",
                ca.certificate_pem().trim_end(),
                enrolment_ca.certificate_pem()
            );
            let tls = crate::agent::tls::Tls::from_pem(trust.as_bytes(), own.cert.as_bytes(), own.key.as_bytes())
                .map_err(|err| cluster(err.to_string()))?;
            tracing::info!(
                names = ?c.names,
                valid_secs = c.validity.as_secs(),
                "issued the controller's own certificate from the cluster CA"
            );
            (tls, Some(own.renew_at))
        }
    };
    let service = EnrolService::new(Arc::new(kube), Arc::new(enrolment_ca), e.policy.clone());
    Ok(ControllerTls {
        tls,
        enrol: Some(service),
        renewal,
    })
}

/// Resolves at `at`, when the controller's own certificate is due for renewal: the controller
/// then stops gracefully and issues itself a new one at its next start, as for rotated files.
async fn renewal_due(at: std::time::SystemTime) {
    let wait = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait).await;
    tracing::warn!("the controller's certificate is due for renewal: restarting to issue a new one");
}

/// The node's TLS flags: as given, or the files enrolment keeps, with the enrolment that fills
/// them (`--enrol-token`).
fn node_tls(
    o: &NodeRole,
    node: &NodeId,
    controller: &crate::agent::remote::HostPort,
) -> Result<(TlsFlags, Option<crate::agent::enrol::node::NodeEnrolment>), RoleError> {
    use crate::agent::enrol::node::NodeEnrolment;
    let Some(e) = &o.enrolment else {
        return Ok((o.tls.clone(), None));
    };
    if o.tls.insecure || o.tls.cert.is_some() || o.tls.key.is_some() {
        return Err(RoleError::Split(
            "--enrol-token: the controller issues this node's certificate; give --tls-ca (the CA of the controller's certificate) without --tls-cert, --tls-key or --insecure".into(),
        ));
    }
    let install_ca = o.tls.ca.clone().ok_or_else(|| {
        RoleError::Split("--enrol-token needs --tls-ca: the CA that issued the controller's certificate".into())
    })?;
    let enrolment = NodeEnrolment {
        controller: controller.clone(),
        port: e.port,
        server_name: controller.bare_host().to_string(),
        node: node.clone(),
        token_file: e.token_file.clone(),
        install_ca,
        dir: e.dir.clone(),
        agent_server_name: crate::agent::tls::AGENT_SERVER_NAME.to_string(),
        timeout: std::time::Duration::from_secs(10),
    };
    let flags = TlsFlags {
        ca: Some(enrolment.ca_file()),
        cert: Some(enrolment.identity_file()),
        key: Some(enrolment.identity_file()),
        insecure: false,
    };
    Ok((flags, Some(enrolment)))
}

/// The node's identity at start: its TLS ready to use (with the enrolment that renews it, if
/// any), or an enrolment still to make.
enum NodeIdentity {
    Ready(
        crate::agent::tls::Tls,
        Option<(crate::agent::enrol::node::NodeEnrolment, std::time::SystemTime)>,
    ),
    Pending(crate::agent::enrol::node::NodeEnrolment),
}

/// `cellar controller`: Identity + Controller for the sidecars, the registry the nodes report to,
/// and the shared pools, which it creates and deletes volumes in itself.
pub async fn controller(o: ControllerRole) -> Result<server::Stopped, RoleError> {
    let ControllerTls { tls, enrol, renewal } = controller_tls(&o).await?;
    let name = NodeId::parse(&o.name).map_err(|e| RoleError::NodeId(e.0))?;
    let config = load_config(o.config.as_ref(), &o.data_dir)?;
    let socket = server::socket_path(&o.endpoint)?;
    let readiness = Readiness::starting();
    let engine = {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || LocalEngine::open_pools(name, &cfg, |pc| pc.is_shared().then_some(true)))
            .await
            .map_err(|e| RoleError::Task(e.to_string()))??
    };
    let engine = Arc::new(engine);
    // Deletion marks this controller writes carry its seal; those it finds count only with one.
    engine
        .backups()
        .trust_marks(crate::agent::seal::MarkSeals::for_controller(tls.clone()).trust());
    engine.start_purger();
    engine.start_uploads();
    engine.backups().start_pruner(o.prune);
    let shared: Arc<dyn crate::agent::Agent> = Arc::new(LocalAgent::new(engine.clone()));
    let registry = crate::agent::registry::Registry::new(o.registry.clone(), tls.clone(), Some(shared));
    let sweeper = AbortOnDrop(tokio::spawn(registry.clone().run_sweeper()));
    let metrics = serve_metrics(
        o.metrics_listen,
        "controller",
        readiness.clone(),
        crate::metrics::RegistryCollector(registry.clone()),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(o.agent_listen)
        .await
        .map_err(|e| RoleError::Split(format!("--agent-listen {}: {e}", o.agent_listen)))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let routes = tonic::service::Routes::new(registry.service());
    // Every node keeps one connection to every replica: room for all of them and a margin.
    let limits = server::SocketLimits {
        max_connections: o.registry.max_nodes + 256,
        max_per_peer: o.registry_peer_limit,
        ..crate::agent::server::TCP_LIMITS
    };
    let enrol_server = match enrol {
        Some(service) => {
            let listen = o.enrolment.as_ref().map(|e| e.listen).unwrap_or(o.agent_listen);
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| RoleError::Split(format!("--enrol-listen {listen}: {e}")))?;
            let stop = stop_rx.clone();
            tracing::info!(enrol_listen = %listen, "issuing node certificates");
            Some(tokio::spawn(crate::agent::enrol::serve(
                listener,
                limits,
                tls.clone(),
                service,
                stopped(stop),
            )))
        }
        None => None,
    };
    let registry_server = tokio::spawn(crate::agent::server::serve_within(
        listener,
        limits,
        tls,
        routes,
        stopped(stop_rx),
    ));
    report_pools(&readiness, &engine);
    tracing::info!(agent_listen = %o.agent_listen, socket = %socket.display(), "controller ready");
    let identity = IdentityService::new(&o.driver_name, readiness.flag());
    let directory: Arc<dyn crate::agent::Directory> = Arc::new(registry);
    let metadata = SnapshotMetadataService::new(directory.clone());
    let controller = Arc::new(
        ControllerService::new(directory)
            .advertising_health(o.advertise_volume_health)
            .with_backups(engine.backups().clone()),
    );
    server::listen_for_shutdown();
    let listener = server::bind(&socket)?;
    metrics.serving(&socket);
    let router = o
        .socket
        .server_builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::from_arc(controller.clone()))
        .add_service(GroupControllerServer::from_arc(controller))
        .add_service(SnapshotMetadataServer::new(metadata));
    // Rotated TLS files, or the controller's own certificate due for renewal, restart it.
    let rotated = {
        let files = o.tls.rotated();
        async move {
            match renewal {
                Some(at) => renewal_due(at).await,
                None => files.await,
            }
        }
    };
    let served = server::serve_until_signal(router, listener, o.socket, &socket, rotated).await;
    let _ = stop_tx.send(true);
    let _ = registry_server.await;
    if let Some(s) = enrol_server {
        let _ = s.await;
    }
    drop((metrics, sweeper));
    Ok(served?)
}

/// `cellar node`: Identity + Node for kubelet, the agent the controller calls, and the heartbeat
/// that keeps this node in the controller's registry.
pub async fn node(o: NodeRole) -> Result<server::Stopped, RoleError> {
    use crate::agent::heartbeat::{Heartbeat, HeartbeatConfig};
    use crate::agent::remote::HostPort;
    let node = NodeId::parse(&o.node_id).map_err(|e| RoleError::NodeId(e.0))?;
    let controller = HostPort::parse(&o.controller).map_err(|e| RoleError::Split(format!("--controller: {e}")))?;
    let (tls_flags, enrolment) = node_tls(&o, &node, &controller)?;
    // TLS files as given, or a certificate of an earlier enrolment not yet due for renewal, are
    // loaded now (a bad file stops the start, naming it). A node that must enrol first does so in
    // the background and serves kubelet meanwhile: its volumes need no controller.
    let identity = match enrolment {
        None => NodeIdentity::Ready(tls_flags.load()?, None),
        Some(e) => match e.current() {
            Some(at) => {
                tracing::info!(
                    node = node.as_str(),
                    "using this node's certificate from its earlier enrolment"
                );
                NodeIdentity::Ready(tls_flags.load()?, Some((e, at)))
            }
            None => NodeIdentity::Pending(e),
        },
    };
    let advertise =
        HostPort::parse(&o.agent_advertise).map_err(|e| RoleError::Split(format!("--agent-advertise: {e}")))?;
    let config = load_config(o.config.as_ref(), &o.data_dir)?;
    let _lock = hold_data_dir(&o.data_dir).await?;
    let socket = server::socket_path(&o.endpoint)?;
    let readiness = Readiness::starting();
    let node_metrics = NodeCollector::default();
    let metrics = serve_metrics(o.metrics_listen, "node", readiness.clone(), node_metrics.clone()).await?;
    let engine = {
        let node = node.clone();
        let rosters = o.data_dir.join("rosters");
        tokio::task::spawn_blocking(move || {
            let pick = |pc: &crate::storage::config::PoolConfig| Some(!pc.is_shared());
            LocalEngine::open_keeping(crate::sys::StorageSys::linux(), node, &config, pick, Some(&rosters))
        })
        .await
        .map_err(|e| RoleError::Task(e.to_string()))??
    };
    let engine = Arc::new(engine);
    engine.backups().throttle().set_bytes_per_sec(o.backup_bandwidth);
    // Deletion marks count only with the controller's seal, checked with this node's CA: known
    // now, or once this node has enrolled (until then a look for a mark waits).
    let controller_name = controller.bare_host().to_string();
    engine.backups().trust_marks(match &identity {
        NodeIdentity::Ready(tls, _) => crate::agent::seal::MarkSeals::for_node(tls.clone(), &controller_name).trust(),
        NodeIdentity::Pending(_) => crate::backup::MarkTrust::NotYet,
    });
    engine.start_uploads();
    let state = Arc::new(NodeState::open(&o.data_dir.join("node"), engine.files())?);
    node_metrics.attach(NodeSources {
        engine: engine.clone(),
        state: state.clone(),
    });
    let listener = tokio::net::TcpListener::bind(o.agent_listen)
        .await
        .map_err(|e| RoleError::Split(format!("--agent-listen {}: {e}", o.agent_listen)))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (enrolled_tx, enrolled_rx) =
        tokio::sync::oneshot::channel::<Option<crate::agent::enrol::node::NodeEnrolment>>();
    let topology = [(crate::csi::TOPOLOGY_NODE_KEY.to_string(), node.as_str().to_string())].into();
    let beat_config = HeartbeatConfig::new(controller, node.clone(), topology, advertise);
    // Ready while the pools are open and a controller replica acknowledges this node: a node that
    // loses every replica says so (once) and turns unready, and ready again when one answers.
    readiness.expect(
        "controller",
        format!("not registered with the controller {} yet", o.controller),
    );
    report_pools(&readiness, &engine);
    // The transfer grants this node admitted, kept across its restarts (each read once).
    let ledger = crate::agent::grant::Ledger::open(engine.files(), o.data_dir.join("node").join("grants-used"))
        .map_err(|e| RoleError::Split(format!("the transfer grant ledger: {e}")))?;
    // The agent and the heartbeat, once this node holds its identity; until the stop.
    let split = {
        let (readiness, engine, flags) = (readiness.clone(), engine.clone(), tls_flags.clone());
        let (controller, node) = (o.controller.clone(), node.clone());
        tokio::spawn(async move {
            let (tls, renewal) = match identity {
                NodeIdentity::Ready(tls, renewal) => (tls, renewal),
                NodeIdentity::Pending(e) => {
                    let at = tokio::select! {
                        at = e.until_enrolled() => at,
                        _ = stopped(stop_rx.clone()) => return,
                    };
                    match flags.load() {
                        Ok(tls) => (tls, Some((e, at))),
                        Err(err) => {
                            tracing::error!(error = %err, "the enrolled certificate does not load");
                            return;
                        }
                    }
                }
            };
            engine
                .backups()
                .trust_marks(crate::agent::seal::MarkSeals::for_node(tls.clone(), &beat_config.server_name).trust());
            // With enrolment, the CA of the controller's certificate (--tls-ca) is watched too: a
            // rotated one restarts the node, which then enrols trusting it.
            let _ = enrolled_tx.send(renewal.as_ref().map(|(e, _)| e.clone()));
            let _renewer = renewal.map(|(e, at)| AbortOnDrop(tokio::spawn(e.renew_from(at))));
            // The agent serves only a caller whose certificate names the controller as this node
            // dials it (the name the node checks on the registry's certificate), which no node
            // certificate carries.
            let only_controller = tls.callers(&beat_config.server_name);
            let local: Arc<dyn crate::agent::Agent> = Arc::new(LocalAgent::listed_by_controller(engine.clone()));
            let agent_service = crate::agent::server::AgentService::over(local.clone())
                .pulling_with(tls.clone(), crate::agent::remote::Timeouts::default());
            // Other nodes may read one object each with a grant the controller signed, and call
            // nothing else.
            let gatekeeper = crate::agent::grant::Gatekeeper::new(node.clone(), tls.clone(), &beat_config.server_name)
                .remembering(ledger);
            let routes = tonic::service::Routes::new(agent_service.into_server(only_controller))
                .add_service(crate::agent::server::TransferService::new(local, gatekeeper).into_server());
            let agent_server = tokio::spawn(crate::agent::server::serve(
                listener,
                tls.clone(),
                routes,
                stopped(stop_rx.clone()),
            ));
            let mut beat = Heartbeat::new(beat_config, tls, Arc::new(LocalAgent::new(engine)));
            let beating = async {
                loop {
                    let round = beat.beat().await;
                    readiness.set("controller", registration(&controller, &round));
                    tokio::time::sleep(beat.interval()).await;
                }
            };
            tokio::select! {
                _ = beating => {}
                _ = stopped(stop_rx) => {}
            }
            let _ = agent_server.await;
        })
    };
    tracing::info!(node = node.as_str(), agent_listen = %o.agent_listen, socket = %socket.display(), "node ready");
    let identity = IdentityService::new(&o.driver_name, readiness.flag());
    crate::node::start_lease_renewer(engine.clone(), state.clone());
    let mut node_svc = NodeService::new(node, engine, state, o.max_volumes_per_node);
    node_svc.advertise_health = o.advertise_volume_health;
    server::listen_for_shutdown();
    let listener = server::bind(&socket)?;
    metrics.serving(&socket);
    let router = o
        .socket
        .server_builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeGrpc::new(NodeServer(Arc::new(node_svc))));
    // Rotated TLS files (a renewal included), or a rotated CA of the controller's certificate
    // for an enrolled node, restart the process; watched once there are some.
    let rotated = async move {
        match enrolled_rx.await {
            Ok(None) => tls_flags.rotated().await,
            Ok(Some(enrolment)) => {
                tokio::select! {
                    _ = tls_flags.rotated() => {}
                    _ = enrolment.install_ca_replaced(crate::agent::tls::rotation_check()) => {}
                }
            }
            Err(_) => std::future::pending().await,
        }
    };
    let served = server::serve_until_signal(router, listener, o.socket, &socket, rotated).await;
    let _ = stop_tx.send(true);
    let _ = split.await;
    drop(metrics);
    Ok(served?)
}
