//! Prometheus metrics, and the HTTP listener (`--metrics-listen`) that serves them beside the health
//! checks.
//!
//! Two sources feed `/metrics`. Per-RPC counters and latency histograms are recorded as each call
//! ends, in [`crate::server::trace`] (the tower layer on every CSI server). Everything about pools, volumes and mounts is computed when
//! Prometheus scrapes ([`NodeCollector`]), from the engine's in-memory index, the node state and a few
//! syscalls: the call paths pay nothing for it, and a figure can never drift from what the driver
//! would answer, however the process was stopped or restarted.
//!
//! Label sets are bounded by design: RPC series by method × gRPC code, pool series by pool × layout,
//! and per-volume series only for the volumes staged or published on this node.
//!
//! Split mode will register its own collector on the same [`Exporter`]: the controller's agent
//! registry size, heartbeat age per node and agent call errors (see docs/operations.md).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::health::Readiness;
use crate::node::state::NodeState;
use crate::server::SocketLimits;
use crate::storage::engine::{LocalEngine, PoolStatus};
use crate::storage::id::VolumeId;
use crate::storage::record::Layout;
use crate::sys::files::{Files, LinuxFiles};
use crate::sys::mount::{LinuxMounter, Mounter};

/// The content type of the OpenMetrics text format that `prometheus-client` writes; Prometheus
/// negotiates and parses it natively.
pub const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------- per-RPC series

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// Upper bounds of the latency buckets, in seconds: from sub-millisecond record writes up to copies
/// of large volumes that take minutes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0, 600.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

/// One set per process: every service reports through the free function [`crate::server::trace`] (the tower layer on every CSI server),
/// and each [`Exporter`] registers clones that share these very counters.
static RPC: LazyLock<RpcMetrics> = LazyLock::new(|| RpcMetrics {
    requests: Family::default(),
    duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentErrorLabels {
    node: String,
    call: &'static str,
    code: &'static str,
}

/// Failed calls from the controller to node agents (bounded by nodes × calls × codes).
static AGENT_ERRORS: LazyLock<Family<AgentErrorLabels, Counter>> = LazyLock::new(Family::default);

/// The label sets of [`AGENT_ERRORS`] by node, so a node's series can be removed when the
/// registry forgets it (a `Family` cannot list its own): the nodes counted stay those the registry
/// knows, however many come and go.
static AGENT_ERROR_SERIES: LazyLock<Mutex<HashMap<String, Vec<AgentErrorLabels>>>> = LazyLock::new(Mutex::default);

/// Counts one failed agent call (controller side).
pub fn record_agent_error(node: &str, call: &'static str, code: Code) {
    let labels = AgentErrorLabels {
        node: node.to_string(),
        call,
        code: code_name(code),
    };
    // Held while counting: a node forgotten meanwhile loses this series too.
    let mut series = AGENT_ERROR_SERIES.lock().unwrap_or_else(|p| p.into_inner());
    let known = series.entry(labels.node.clone()).or_default();
    if !known.contains(&labels) {
        known.push(labels.clone());
    }
    AGENT_ERRORS.get_or_create(&labels).inc();
}

/// Removes the agent error series of a node the registry has forgotten.
pub fn forget_agent_errors(node: &str) {
    let mut series = AGENT_ERROR_SERIES.lock().unwrap_or_else(|p| p.into_inner());
    for labels in series.remove(node).unwrap_or_default() {
        AGENT_ERRORS.remove(&labels);
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    /// `export` (this node sent), `import` (this node received) or `relay` (the controller passed
    /// it on).
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferEndLabels {
    direction: &'static str,
    /// `complete`, or `broken` (a check failed, the peer went away, or the disk failed).
    result: &'static str,
}

/// Data bytes of copies between nodes (node side).
static TRANSFER_BYTES: LazyLock<Family<TransferLabels, Counter>> = LazyLock::new(Family::default);
/// Copies between nodes that ended (node side).
static TRANSFERS: LazyLock<Family<TransferEndLabels, Counter>> = LazyLock::new(Family::default);

/// Counts data bytes of a copy between nodes as they pass.
pub fn record_transfer_bytes(direction: &'static str, bytes: u64) {
    TRANSFER_BYTES
        .get_or_create(&TransferLabels { direction })
        .inc_by(bytes);
}

/// Counts a copy between nodes that ended, whole or broken.
pub fn record_transfer_end(direction: &'static str, complete: bool) {
    let result = if complete { "complete" } else { "broken" };
    TRANSFERS.get_or_create(&TransferEndLabels { direction, result }).inc();
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupLabels {
    repository: String,
    /// `read` (snapshot bytes read for an upload), `uploaded` (bytes written to the repository,
    /// after deduplication and compression), `downloaded` (bytes read from it), `restored` (data
    /// bytes restored into a volume).
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupEndLabels {
    repository: String,
    /// `upload` or `restore`.
    operation: &'static str,
    /// `complete` or `failed`.
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupOpLabels {
    repository: String,
    operation: &'static str,
}

/// Backup bytes by repository and kind (bounded by repositories × 3).
static BACKUP_BYTES: LazyLock<Family<BackupLabels, Counter>> = LazyLock::new(Family::default);
/// Uploads and restores that ended, by repository, operation and result.
static BACKUPS: LazyLock<Family<BackupEndLabels, Counter>> = LazyLock::new(Family::default);
/// How long uploads and restores took.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
static BACKUP_DURATION: LazyLock<Histograms<BackupOpLabels>> =
    LazyLock::new(|| Family::new_with_constructor(latency_histogram as fn() -> Histogram));

/// Counts backup bytes as they pass (see [`BackupLabels`] for the kinds).
pub fn record_backup_bytes(repository: &str, kind: &'static str, bytes: u64) {
    BACKUP_BYTES
        .get_or_create(&BackupLabels {
            repository: repository.to_string(),
            kind,
        })
        .inc_by(bytes);
}

/// Counts an upload or restore that ended, and its duration.
pub fn record_backup_end(repository: &str, operation: &'static str, complete: bool, took: Duration) {
    let result = if complete { "complete" } else { "failed" };
    BACKUPS
        .get_or_create(&BackupEndLabels {
            repository: repository.to_string(),
            operation,
            result,
        })
        .inc();
    BACKUP_DURATION
        .get_or_create(&BackupOpLabels {
            repository: repository.to_string(),
            operation,
        })
        .observe(took.as_secs_f64());
}

/// The Controller RPCs counted (those that do work; see docs/operations.md).
pub const CONTROLLER_METHODS: [&str; 12] = [
    "CreateVolume",
    "DeleteVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
];

/// The Node RPCs counted.
pub const NODE_METHODS: [&str; 6] = [
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
];

/// Creates, at zero, the series a dashboard or a ratio alert divides by, so they read 0 rather
/// than "no data" before the first call: `OK` and the latency histogram of every method `role`
/// serves, and (node) both transfer directions and results.
fn export_zeros(role: &str) {
    let methods: &[&'static str] = match role {
        "controller" => &CONTROLLER_METHODS,
        "node" => &NODE_METHODS,
        "all-in-one" => &[CONTROLLER_METHODS.as_slice(), NODE_METHODS.as_slice()].concat(),
        _ => &[],
    };
    for &method in methods {
        let _ = RPC.requests.get_or_create(&RpcLabels { method, code: "OK" });
        let _ = RPC.duration.get_or_create(&MethodLabels { method });
    }
    if role == "controller" {
        let _ = TRANSFER_BYTES.get_or_create(&TransferLabels { direction: "relay" });
    }
    if role == "node" {
        for direction in ["export", "import"] {
            let _ = TRANSFER_BYTES.get_or_create(&TransferLabels { direction });
            for result in ["complete", "broken"] {
                let _ = TRANSFERS.get_or_create(&TransferEndLabels { direction, result });
            }
        }
    }
}

/// Counts one finished RPC and its latency.
pub fn record_rpc(method: &'static str, code: Code, elapsed: Duration) {
    RPC.requests
        .get_or_create(&RpcLabels {
            method,
            code: code_name(code),
        })
        .inc();
    RPC.duration
        .get_or_create(&MethodLabels { method })
        .observe(elapsed.as_secs_f64());
}

/// The canonical gRPC code names (as grpc-go and every gRPC dashboard spell them).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

// ---------------------------------------------------------------- the exporter

/// What one process exposes: the RPC series, its build info, and the collectors of its role.
pub struct Exporter {
    registry: Registry,
    /// What keeps the role from serving (the reasons Identity's Probe also answers from).
    readiness: Arc<Readiness>,
    /// The CSI socket, once the role serves it: `/healthz` checks that it still accepts calls.
    socket: OnceLock<PathBuf>,
    /// One scrape is encoded at a time (on a blocking thread, which the CSI calls need too):
    /// scrapes beyond it wait here, holding no thread.
    scrapes: Arc<tokio::sync::Semaphore>,
}

impl Exporter {
    pub fn new(role: &'static str, readiness: Arc<Readiness>) -> Exporter {
        export_zeros(role);
        let mut registry = Registry::default();
        registry.register(
            "cellar_build",
            "Version and role of this cellar process",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("role", role)]),
        );
        registry.register(
            "cellar_csi_requests",
            "CSI calls answered, by method and gRPC code",
            RPC.requests.clone(),
        );
        registry.register_with_unit(
            "cellar_csi_request_duration",
            "Time taken to answer a CSI call, by method",
            Unit::Seconds,
            RPC.duration.clone(),
        );
        if role == "controller" {
            registry.register(
                "cellar_agent_call_errors",
                "Failed calls from the controller to node agents, by node, call and gRPC code",
                AGENT_ERRORS.clone(),
            );
            registry.register(
                "cellar_transfer_bytes",
                "Data bytes of copies between nodes that this controller relayed (relay; 0 while nodes pull from each other)",
                TRANSFER_BYTES.clone(),
            );
        }
        if role == "node" {
            registry.register(
                "cellar_transfer_bytes",
                "Data bytes of restores and clones copied between nodes, by direction (export, import)",
                TRANSFER_BYTES.clone(),
            );
            registry.register(
                "cellar_transfers",
                "Restores and clones copied between nodes that ended, by direction and result",
                TRANSFERS.clone(),
            );
        }
        if role == "node" || role == "all-in-one" {
            registry.register(
                "cellar_backup_bytes",
                "Backup bytes by repository and kind: read (from snapshots), uploaded (after deduplication), downloaded (restores)",
                BACKUP_BYTES.clone(),
            );
            registry.register(
                "cellar_backups",
                "Backup uploads and restores that ended, by repository, operation and result",
                BACKUPS.clone(),
            );
            registry.register_with_unit(
                "cellar_backup_duration",
                "Time taken by backup uploads and restores",
                Unit::Seconds,
                BACKUP_DURATION.clone(),
            );
        }
        Exporter {
            registry,
            readiness,
            socket: OnceLock::new(),
            scrapes: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Called once the CSI socket is bound; from then on `/healthz` connects to it.
    pub fn serving(&self, socket: PathBuf) {
        let _ = self.socket.set(socket);
    }

    /// Adds the scrape-time figures of a role (a node's pools; later the controller's registry).
    pub fn register(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    pub fn ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// The whole exposition. Blocking: collectors read the disk.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

// ---------------------------------------------------------------- the node's figures

/// How long a volume's used-bytes figure is reused. Measuring a `dir` volume costs one lstat per
/// file, so each attached volume is walked at most once a minute, whatever the scrape interval.
pub const USAGE_TTL: Duration = Duration::from_secs(60);

/// What the node collector reads, available once the pools are open.
pub struct NodeSources {
    pub engine: Arc<LocalEngine>,
    pub state: Arc<NodeState>,
}

#[derive(Default)]
struct NodeInner {
    sources: OnceLock<NodeSources>,
    /// Volume id → when it was measured and its used bytes.
    usage: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Pools, volumes and mounts of this node, computed at each scrape. Registered before the pools
/// open (so `/metrics` answers during a long start-up purge) and given its sources afterwards.
#[derive(Clone, Default)]
pub struct NodeCollector(Arc<NodeInner>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCollector")
            .field("attached", &self.0.sources.get().is_some())
            .finish()
    }
}

impl NodeCollector {
    /// Gives the collector what it reads; until then it reports nothing. Only the first call counts.
    pub fn attach(&self, sources: NodeSources) {
        let _ = self.0.sources.set(sources);
    }

    /// The figures of one scrape, or `None` before the pools are open.
    pub fn figures(&self) -> Option<NodeFigures> {
        let src = self.0.sources.get()?;
        Some(NodeFigures::gather(src, &self.0.usage, &LinuxMounter::default()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolFigures {
    pub name: String,
    /// `None` when the pool's filesystem could not be read (statvfs failed).
    pub total_bytes: Option<u64>,
    /// What GetCapacity offers the pool's tightest layout: for a pool that allows `image`, the free
    /// space minus what its image files may still grow into.
    pub free_bytes: Option<u64>,
    /// What GetCapacity offers a new volume of each layout the pool allows.
    pub allocatable_bytes: BTreeMap<String, u64>,
    pub provisioned_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVolume {
    pub volume_id: String,
    pub capacity_bytes: u64,
    /// `None` when the data could not be measured (it is missing, or changed under the walk).
    pub used_bytes: Option<u64>,
}

/// One scrape's worth of node figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFigures {
    pub pools: Vec<PoolFigures>,
    /// (pool, layout) → number of volume records. Every layout a pool allows is present, even at 0.
    pub volumes: BTreeMap<(String, String), u64>,
    /// (pool, layout) → number of snapshot records.
    pub snapshots: BTreeMap<(String, String), u64>,
    /// pool → volumes whose condition is abnormal (their data is missing or not a directory).
    pub abnormal: BTreeMap<String, u64>,
    /// Volumes staged or published on this node, in volume-id order.
    pub attached: Vec<AttachedVolume>,
    /// Staging paths the node state records but the kernel has no mount at.
    pub stale_staged: u64,
    /// Publish targets the node state records but the kernel has no mount at.
    pub stale_published: u64,
}

impl NodeFigures {
    fn gather(src: &NodeSources, usage: &Mutex<HashMap<String, (Instant, u64)>>, mounter: &dyn Mounter) -> Self {
        let mut f = NodeFigures::default();
        let volumes = src.engine.volumes_with_condition();
        let mut provisioned: BTreeMap<String, u64> = BTreeMap::new();
        for (rec, cond) in &volumes {
            let pool = rec.id.0.pool.as_str().to_string();
            *provisioned.entry(pool.clone()).or_default() += rec.capacity_bytes;
            *f.abnormal.entry(pool.clone()).or_default() += u64::from(cond.abnormal);
            *f.volumes.entry((pool, rec.layout.as_str().to_string())).or_default() += 1;
        }
        for snap in src.engine.snapshots() {
            let pool = snap.id.0.pool.as_str().to_string();
            *f.snapshots.entry((pool, snap.layout.as_str().to_string())).or_default() += 1;
        }
        for (name, status) in src.engine.pool_statuses() {
            // A pool whose filesystem cannot be read loses its usage series, and only it.
            let status = status
                .inspect_err(|e| tracing::warn!(pool = name.as_str(), error = %e, "metrics: reading pool usage"))
                .ok();
            let layouts = src
                .engine
                .pool_config(&name)
                .map(|c| c.layouts.clone())
                .unwrap_or_default();
            let name = name.as_str().to_string();
            for layout in &layouts {
                let key = (name.clone(), layout.as_str().to_string());
                f.volumes.entry(key.clone()).or_default();
                f.snapshots.entry(key).or_default();
            }
            f.abnormal.entry(name.clone()).or_default();
            let allocatable: BTreeMap<String, u64> = status
                .as_ref()
                .map(|s| {
                    s.layouts
                        .iter()
                        .map(|l| (l.as_str().to_string(), allocatable(s, *l)))
                        .collect()
                })
                .unwrap_or_default();
            f.pools.push(PoolFigures {
                total_bytes: status.as_ref().map(|s| s.total_bytes),
                free_bytes: status.map(|s| allocatable.values().copied().min().unwrap_or(s.available_bytes)),
                allocatable_bytes: allocatable,
                provisioned_bytes: provisioned.get(&name).copied().unwrap_or(0),
                name,
            });
        }

        let mounted = |p: &std::path::Path| match mounter.is_mountpoint(p) {
            Ok(m) => m,
            Err(e) if e.is_not_found() => false,
            // A broken mount (ENOTCONN, EIO ...) is still a mount; its volume's condition says more.
            Err(_) => true,
        };
        let mut attached: Vec<(String, PathBuf, u64)> = Vec::new();
        for m in src.state.all() {
            if let Some(s) = &m.staged {
                f.stale_staged += u64::from(!mounted(&s.path));
            }
            f.stale_published += m.published.keys().filter(|t| !mounted(t)).count() as u64;
            if m.staged.is_none() && m.published.is_empty() {
                continue;
            }
            let Ok(id) = VolumeId::parse(&m.volume_id) else {
                continue;
            };
            if let Ok((rec, data)) = src.engine.volume_data(&id) {
                attached.push((m.volume_id.clone(), data, rec.capacity_bytes));
            }
        }
        attached.sort();
        f.attached = measure(attached, usage);
        f
    }
}

/// What GetCapacity offers a new volume of `layout` in a pool: an image volume may only take
/// what the pool's existing images will not grow into; the other layouts the free space.
fn allocatable(status: &PoolStatus, layout: Layout) -> u64 {
    if layout == Layout::Image {
        status.image_allocatable_bytes
    } else {
        status.available_bytes
    }
}

/// Used bytes of each attached volume, walking only those not measured within [`USAGE_TTL`].
/// Entries of volumes no longer attached are dropped, so the cache stays as small as the node.
fn measure(
    attached: Vec<(String, PathBuf, u64)>,
    usage: &Mutex<HashMap<String, (Instant, u64)>>,
) -> Vec<AttachedVolume> {
    // Held across the walks: concurrent scrapes wait for one walk instead of repeating it.
    let mut cache = usage.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|id, _| attached.iter().any(|(a, _, _)| a == id));
    attached
        .into_iter()
        .map(|(volume_id, data, capacity_bytes)| {
            let fresh = cache
                .get(&volume_id)
                .filter(|(at, _)| at.elapsed() < USAGE_TTL)
                .map(|(_, used)| *used);
            let used_bytes = fresh.or_else(|| match LinuxFiles.allocated_bytes(&data) {
                Ok(used) => {
                    cache.insert(volume_id.clone(), (Instant::now(), used));
                    Some(used)
                }
                Err(e) => {
                    tracing::debug!(volume = %volume_id, error = %e, "metrics: measuring used bytes");
                    cache.remove(&volume_id);
                    None
                }
            });
            AttachedVolume {
                volume_id,
                capacity_bytes,
                used_bytes,
            }
        })
        .collect()
}

fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let Some(f) = self.figures() else {
            return Ok(());
        };
        let bytes = Some(&Unit::Bytes);
        let pool = |p: &PoolFigures| [("pool", p.name.clone())];
        gauges(
            &mut enc,
            "cellar_pool_total",
            "Size of the filesystem holding the pool.",
            bytes,
            f.pools.iter().filter_map(|p| Some((pool(p), p.total_bytes?))),
        )?;
        gauges(
            &mut enc,
            "cellar_pool_free",
            "What GetCapacity still offers in the pool: its filesystem's free bytes, minus (when it allows image volumes) what its image files may still grow into.",
            bytes,
            f.pools.iter().filter_map(|p| Some((pool(p), p.free_bytes?))),
        )?;
        gauges(
            &mut enc,
            "cellar_pool_allocatable",
            "What GetCapacity offers a new volume of each layout the pool allows.",
            bytes,
            f.pools.iter().flat_map(|p| {
                p.allocatable_bytes
                    .iter()
                    .map(|(l, n)| ([("pool", p.name.clone()), ("layout", l.clone())], *n))
            }),
        )?;
        gauges(
            &mut enc,
            "cellar_pool_provisioned",
            "Sum of the capacities of the pool's volumes.",
            bytes,
            f.pools.iter().map(|p| (pool(p), p.provisioned_bytes)),
        )?;
        let pool_layout = |(p, l): &(String, String), n: &u64| ([("pool", p.clone()), ("layout", l.clone())], *n);
        gauges(
            &mut enc,
            "cellar_volumes",
            "Volume records in the pool, by layout.",
            None,
            f.volumes.iter().map(|(k, n)| pool_layout(k, n)),
        )?;
        gauges(
            &mut enc,
            "cellar_snapshots",
            "Snapshot records in the pool, by layout.",
            None,
            f.snapshots.iter().map(|(k, n)| pool_layout(k, n)),
        )?;
        gauges(
            &mut enc,
            "cellar_volumes_abnormal",
            "Volumes of the pool whose condition is abnormal (data missing or of the wrong type).",
            None,
            f.abnormal.iter().map(|(p, n)| ([("pool", p.clone())], *n)),
        )?;
        let volume = |v: &AttachedVolume| [("volume_id", v.volume_id.clone())];
        gauges(
            &mut enc,
            "cellar_volume_capacity",
            "Capacity of a volume staged or published on this node.",
            bytes,
            f.attached.iter().map(|v| (volume(v), v.capacity_bytes)),
        )?;
        gauges(
            &mut enc,
            "cellar_volume_used",
            "Bytes allocated by the data of a volume staged or published on this node.",
            bytes,
            f.attached.iter().filter_map(|v| Some((volume(v), v.used_bytes?))),
        )?;
        gauges(
            &mut enc,
            "cellar_node_stale_mounts",
            "Mounts the node state records that the kernel does not have, by kind (staged, published).",
            None,
            [
                ([("kind", "staged")], f.stale_staged),
                ([("kind", "published")], f.stale_published),
            ],
        )
    }
}

// ---------------------------------------------------------------- the HTTP listener

/// Binds the metrics address (port 0 picks a free port; the log says which).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "metrics listening: /metrics /healthz /readyz");
    Ok(listener)
}

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection limits of the metrics port, kept by the accept loop of the CSI and agent ports
/// ([`crate::server::incoming_tcp`]). The port is unauthenticated and kubelet's liveness probe
/// needs a place on it: Prometheus needs one or two and each probe one, so one address holds at
/// most a quarter of the places and whoever else is let in (the probe) still finds one; a
/// connection that sends nothing for 30 s (left open, or sending requests and never reading the
/// answers) gives its place back. Connections past the total wait in the listen backlog and are
/// taken in turn as places free. A scrape takes well under the idle timeout.
pub const PORT_LIMITS: SocketLimits = SocketLimits {
    idle_timeout: Duration::from_secs(30),
    max_connections: 32,
    max_per_peer: 8,
};

/// Serves `/metrics`, `/healthz` and `/readyz` over HTTP/1 within [`PORT_LIMITS`] until the task
/// is dropped.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    serve_within(listener, PORT_LIMITS, exporter).await
}

async fn serve_within(listener: TcpListener, limits: SocketLimits, exporter: Arc<Exporter>) {
    let mut incoming = crate::server::incoming_tcp(listener, limits, "the metrics port");
    // The accept loop waits out running out of descriptors itself.
    while let Some(conn) = incoming.next().await {
        let Ok(conn) = conn else { continue };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, exporter.clone()));
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = http.serve_connection(TokioIo::new(conn), service).await {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
        });
    }
}

impl Exporter {
    /// The metrics text, encoded on a blocking thread once the scrape before it has ended. The
    /// turn is held by the blocking task itself, so a scraper that hangs up does not free it early.
    async fn scrape(self: Arc<Self>) -> Result<Result<String, std::fmt::Error>, tokio::task::JoinError> {
        let Ok(turn) = self.scrapes.clone().acquire_owned().await else {
            unreachable!("the scrape semaphore is never closed")
        };
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            self.encode()
        })
        .await
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn respond(req: Request<Incoming>, exporter: Arc<Exporter>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => match exporter.scrape().await {
            Ok(Ok(body)) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS));
                r
            }
            Ok(Err(_)) | Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n"),
        },
        "/healthz" => match exporter.socket.get() {
            Some(socket) => match socket_answers(socket).await {
                Ok(()) => text(StatusCode::OK, "ok\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not serving: {why}\n")),
            },
            // Starting: alive, and the startup probe gives the pools time to open.
            None => text(StatusCode::OK, "ok\n"),
        },
        "/readyz" if exporter.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => {
            let mut body = String::new();
            for reason in exporter.readiness.reasons() {
                body.push_str("not ready: ");
                body.push_str(&reason);
                body.push('\n');
            }
            text(StatusCode::SERVICE_UNAVAILABLE, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served\n",
        ),
    })
}

/// How long `/healthz` waits for the CSI socket to accept a connection.
const SOCKET_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the CSI socket still accepts connections: it fails when the socket file was removed
/// or the server stopped listening, the states in which only a restart brings the driver back.
async fn socket_answers(socket: &std::path::Path) -> Result<(), String> {
    match tokio::time::timeout(SOCKET_CHECK_TIMEOUT, tokio::net::UnixStream::connect(socket)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("the CSI socket {} refuses connections: {e}", socket.display())),
        Err(_) => Err(format!(
            "the CSI socket {} accepted no connection within {SOCKET_CHECK_TIMEOUT:?}",
            socket.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::Config;
    use crate::storage::id::NodeId;
    use crate::sys::mount::RecordingMounter;

    #[test]
    fn code_names_are_the_canonical_grpc_spellings() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::NotFound), "NotFound");
    }

    #[test]
    fn an_rpc_is_counted_by_method_and_code_and_timed_by_method() {
        record_rpc("UnitTestCall", Code::NotFound, Duration::from_millis(3));
        let out = Exporter::new("test", Readiness::starting()).encode().unwrap();
        assert!(
            out.contains("cellar_csi_requests_total{method=\"UnitTestCall\",code=\"NotFound\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("cellar_csi_request_duration_seconds_bucket{le=\"0.005\",method=\"UnitTestCall\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn a_node_exports_its_transfer_series_at_zero_before_any_copy() {
        let out = Exporter::new("node", Readiness::starting()).encode().unwrap();
        for direction in ["export", "import"] {
            assert!(
                out.contains(&format!("cellar_transfer_bytes_total{{direction=\"{direction}\"}} ")),
                "{out}"
            );
            for result in ["complete", "broken"] {
                let series = format!("cellar_transfers_total{{direction=\"{direction}\",result=\"{result}\"}} ");
                assert!(out.contains(&series), "{out}");
            }
        }
        assert!(
            out.contains("cellar_csi_requests_total{method=\"NodePublishVolume\",code=\"OK\"} "),
            "{out}"
        );
    }

    /// GET `path` on one connection; the whole answer.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The unauthenticated port cannot take the threads the CSI calls need: one scrape is encoded
    /// at a time (others wait, holding no blocking thread; 64 scrapes at once took every blocking
    /// thread and stalled NodePublish).
    #[tokio::test]
    async fn scrapes_take_turns() {
        let exporter = Arc::new(Exporter::new("test", Readiness::starting()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(serve(listener, exporter.clone()));
        let turn = exporter.scrapes.clone().acquire_owned().await.unwrap();
        let scrape = tokio::spawn(get(addr, "/metrics"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!scrape.is_finished(), "a scrape waits for the one before it");
        drop(turn);
        let answer = scrape.await.unwrap();
        assert!(answer.contains("cellar_build_info"), "{answer}");
    }

    /// A connection to `addr` from the loopback address `from`.
    async fn connect_from(from: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
        s.connect(addr).await.unwrap()
    }

    /// Sends `GET /metrics` on `c` for as long as the server reads, and never reads an answer.
    fn pipeline_and_never_read(mut c: tokio::net::TcpStream) -> tokio::task::JoinHandle<()> {
        use tokio::io::AsyncWriteExt;
        tokio::spawn(async move {
            let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
            while c.write_all(&req).await.is_ok() {}
        })
    }

    /// GET /healthz as kubelet's probe does, from `from`: the status line, or why there was none
    /// within `limit`.
    async fn probe(from: &str, addr: std::net::SocketAddr, limit: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answer = tokio::time::timeout(limit, async {
            let mut c = connect_from(from, addr).await;
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        })
        .await;
        match answer {
            Ok(Ok(out)) => out.lines().next().unwrap_or("closed without an answer").to_string(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => format!("no answer within {limit:?}"),
        }
    }

    /// The liveness probe is answered however one address attacks the port: connections that
    /// pipeline scrapes and never read the answers, and connections left open saying nothing, take
    /// at most that address's share of the places (and the ones past it are closed at once).
    #[tokio::test]
    async fn healthz_answers_while_one_address_holds_connections_that_never_read_or_idle() {
        let exporter = Arc::new(Exporter::new("test", Readiness::starting()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(serve(listener, exporter));
        let mut attack = Vec::new();
        let mut idle = Vec::new();
        for i in 0..2 * PORT_LIMITS.max_connections {
            let c = connect_from("127.0.0.2", addr).await;
            match i % 2 {
                0 => attack.push(pipeline_and_never_read(c)),
                _ => idle.push(c),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            assert_eq!(
                probe("127.0.0.1", addr, Duration::from_secs(5)).await,
                "HTTP/1.1 200 OK"
            );
        }
        attack.iter().for_each(|a| a.abort());
    }

    /// A client that sends requests and never reads the answers, once the server's side of its
    /// socket is full, gives its place back after the idle timeout, as one that says nothing does:
    /// a probe waiting behind it in the listen backlog is then answered.
    #[tokio::test]
    async fn a_client_that_never_reads_its_answers_gives_its_place_back() {
        let exporter = Arc::new(Exporter::new("test", Readiness::starting()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = SocketLimits {
            idle_timeout: Duration::from_secs(1),
            max_connections: 2,
            max_per_peer: 0,
        };
        let _server = tokio::spawn(serve_within(listener, limits, exporter));
        let mut attack = Vec::new();
        for _ in 0..limits.max_connections {
            attack.push(pipeline_and_never_read(connect_from("127.0.0.2", addr).await));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            probe("127.0.0.2", addr, Duration::from_secs(30)).await,
            "HTTP/1.1 200 OK"
        );
        attack.iter().for_each(|a| a.abort());
    }

    #[test]
    fn a_pool_whose_filesystem_cannot_be_read_loses_only_its_own_usage_figures() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default_for(dir.path());
        let mut other = config.pools[0].clone();
        other.name = crate::storage::id::PoolName::parse("other").unwrap();
        other.path = dir.path().join("pools/other");
        config.pools.push(other);
        let engine = Arc::new(LocalEngine::open(NodeId::parse("n1").unwrap(), &config).unwrap());
        let state = Arc::new(NodeState::open(&dir.path().join("node"), engine.files()).unwrap());
        std::fs::rename(dir.path().join("pools/other"), dir.path().join("moved-away")).unwrap();

        let src = NodeSources { engine, state };
        let f = NodeFigures::gather(&src, &Mutex::default(), &RecordingMounter::default());
        let pool = |name: &str| f.pools.iter().find(|p| p.name == name).unwrap();
        assert!(pool("default").total_bytes.is_some(), "{f:?}");
        assert!(pool("default").free_bytes.is_some(), "{f:?}");
        assert_eq!(pool("default").allocatable_bytes.len(), 1, "{f:?}");
        assert_eq!((pool("other").total_bytes, pool("other").free_bytes), (None, None));
        assert!(pool("other").allocatable_bytes.is_empty(), "{f:?}");
        let key = |p: &str| (p.to_string(), "dir".to_string());
        assert_eq!(
            f.volumes,
            BTreeMap::from([(key("default"), 0), (key("other"), 0)]),
            "both pools keep their record counts"
        );
    }

    /// Writes a record as the driver would have (JSON, so fields added later take their defaults).
    fn record(path: &std::path::Path, json: serde_json::Value) {
        std::fs::write(path, serde_json::to_vec(&json).unwrap()).unwrap();
    }

    #[test]
    fn figures_count_volumes_snapshots_abnormal_and_stale_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pools/default");
        for d in ["volumes/a", "volumes/b", "snapshots/s"] {
            std::fs::create_dir_all(pool.join(d)).unwrap();
        }
        for name in ["a", "b"] {
            let json = serde_json::json!({
                "version": 1, "name": name, "id": format!("local:n1:default:{name}"), "layout": "dir",
                "capacity_bytes": 1 << 20, "mode": "filesystem", "access_modes": ["single-node-writer"],
                "created_unix_secs": 0,
            });
            record(&pool.join(format!("volumes/{name}.json")), json);
        }
        let json = serde_json::json!({
            "version": 1, "name": "s", "id": "snap:local:n1:default:s", "source_volume_id": "local:n1:default:a",
            "size_bytes": 1 << 20, "created_unix_secs": 0, "created_nanos": 0,
        });
        record(&pool.join("snapshots/s.json"), json);
        std::fs::remove_dir(pool.join("volumes/b")).unwrap();
        std::fs::write(pool.join("volumes/a/f"), vec![1u8; 8192]).unwrap();
        let config = Config::default_for(dir.path());
        let engine = Arc::new(LocalEngine::open(NodeId::parse("n1").unwrap(), &config).unwrap());
        let state = Arc::new(NodeState::open(&dir.path().join("node"), engine.files()).unwrap());
        let a = "local:n1:default:a";
        let mut m = state.get(a);
        m.staged = Some(
            serde_json::from_value(serde_json::json!({"path": dir.path().join("never-mounted"), "read_only": false}))
                .unwrap(),
        );
        state.put(m).unwrap();

        let src = NodeSources { engine, state };
        let f = NodeFigures::gather(&src, &Mutex::default(), &RecordingMounter::default());
        let key = |l: &str| ("default".to_string(), l.to_string());
        assert_eq!(f.volumes, BTreeMap::from([(key("dir"), 2)]));
        assert_eq!(f.snapshots, BTreeMap::from([(key("dir"), 1)]));
        assert_eq!(f.abnormal, BTreeMap::from([("default".to_string(), 1)]));
        assert_eq!(f.pools[0].provisioned_bytes, 2 << 20);
        assert_eq!((f.stale_staged, f.stale_published), (1, 0));
        assert_eq!(f.attached.len(), 1);
        assert_eq!(f.attached[0].volume_id, a);
        assert!(f.attached[0].used_bytes.unwrap() >= 8192, "{:?}", f.attached[0]);
    }
}

/// The controller's view of its nodes, computed at scrape time from the registry.
#[derive(Clone)]
pub struct RegistryCollector(pub crate::agent::registry::Registry);

impl fmt::Debug for RegistryCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryCollector")
    }
}

impl Collector for RegistryCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let nodes = self.0.nodes();
        let available = nodes.iter().filter(|n| n.available).count() as u64;
        gauges(
            &mut enc,
            "cellar_agent_registry_nodes",
            "Nodes registered with this controller, by whether their heartbeats are current.",
            None,
            [
                ([("available", "true".to_string())], available),
                ([("available", "false".to_string())], nodes.len() as u64 - available),
            ],
        )?;
        gauges(
            &mut enc,
            "cellar_agent_heartbeat_age_seconds",
            "Whole seconds since each registered node's last heartbeat (one series per node).",
            None,
            nodes.iter().map(|n| {
                (
                    [("node", n.report.node.as_str().to_string())],
                    n.last_heartbeat_age.as_secs(),
                )
            }),
        )
    }
}
