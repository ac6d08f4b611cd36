//! The `cellar` command: parses flags and starts a role.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cellar::server::Stopped;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cellar",
    version,
    about = "A Kubernetes CSI driver for node-local disks and shared filesystems"
)]
struct Cli {
    /// Log format: `text` (human-readable) or `json` (one object per line). The level comes from
    /// CELLAR_LOG (default `info`; e.g. `debug`, `cellar=debug,h2=info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CELLAR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Identity, Controller and Node on one socket, for one machine (development, edge, csi-sanity).
    AllInOne {
        /// The CSI socket to serve (unix:///path or a plain path).
        #[arg(long, default_value = "unix:///run/cellar/csi.sock")]
        endpoint: String,
        /// This node's name (Kubernetes node name). Defaults to the host name.
        #[arg(long, env = "NODE_NAME")]
        node_id: Option<String>,
        /// Where node state and pools without a path live (<data-dir>/pools/<name>).
        #[arg(long, default_value = "/var/lib/cellar")]
        data_dir: PathBuf,
        /// Pool configuration (YAML); without it one local `dir` pool `default` under the data dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The name the driver registers under (CSIDriver, StorageClass provisioner).
        #[arg(long, default_value = "cellar.csi.dev")]
        driver_name: String,
        /// Reported to the scheduler in NodeGetInfo; 0 means no limit.
        #[arg(long, default_value_t = 0)]
        max_volumes_per_node: i64,
        /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on ADDR:PORT, e.g. 0.0.0.0:9811.
        /// Off when absent.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<SocketAddr>,
        /// Name the CSI 1.13 health RPCs in GetCapabilities. They are served either way; off by
        /// default because csi-sanity (v5.5 vendors CSI 1.12) and sidecars built before CSI 1.13 refuse
        /// capability values they do not know (docs/health.md).
        #[arg(long)]
        advertise_volume_health: bool,
        /// Backup uploads and restores of this node share this bandwidth, in bytes per second
        /// (e.g. 50M); 0 is no limit (docs/backups.md).
        #[arg(long, value_name = "BYTES", default_value = "0", value_parser = backup_rate)]
        backup_bandwidth: u64,
        #[command(flatten)]
        prune: cellar::backup::cli::PruneSchedule,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// The controller of split mode: Identity + Controller for the sidecars, the registry nodes
    /// report to over mutual TLS, and the shared pools.
    Controller {
        /// The CSI socket to serve (unix:///path or a plain path).
        #[arg(long, default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// Where nodes register and heartbeat (mutual TLS).
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9820")]
        agent_listen: SocketAddr,
        /// Where node state and pools without a path live (<data-dir>/pools/<name>).
        #[arg(long, default_value = "/var/lib/cellar")]
        data_dir: PathBuf,
        /// Pool configuration (YAML, docs/pools.md); without it one local `dir` pool `default` under the data dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The name the driver registers under (CSIDriver, StorageClass provisioner).
        #[arg(long, default_value = "cellar.csi.dev")]
        driver_name: String,
        /// The controller's name in records of shared pools (its pod name).
        #[arg(long, env = "POD_NAME", default_value = "controller")]
        name: String,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        enrol: Box<EnrolArgs>,
        /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on ADDR:PORT, e.g. 0.0.0.0:9811.
        /// Off when absent.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<SocketAddr>,
        /// Name the CSI 1.13 health RPCs in GetCapabilities. They are served either way; off by
        /// default because csi-sanity (v5.5 vendors CSI 1.12) and sidecars built before CSI 1.13 refuse
        /// capability values they do not know (docs/health.md).
        #[arg(long)]
        advertise_volume_health: bool,
        #[command(flatten)]
        prune: cellar::backup::cli::PruneSchedule,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// A node of split mode: Identity + Node for kubelet, and the agent the controller calls.
    Node {
        /// The CSI socket to serve (unix:///path or a plain path).
        #[arg(long, default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// This node's name (Kubernetes node name). Defaults to the host name.
        #[arg(long, env = "NODE_NAME")]
        node_id: Option<String>,
        /// Where node state and pools without a path live (<data-dir>/pools/<name>).
        #[arg(long, default_value = "/var/lib/cellar")]
        data_dir: PathBuf,
        /// Pool configuration (YAML, docs/pools.md); without it one local `dir` pool `default` under the data dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The name the driver registers under (CSIDriver, StorageClass provisioner).
        #[arg(long, default_value = "cellar.csi.dev")]
        driver_name: String,
        /// The controller's registry, HOST:PORT; every address the host resolves to gets heartbeats.
        #[arg(long)]
        controller: String,
        /// Where the agent the controller calls listens (mutual TLS).
        #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9821")]
        agent_listen: SocketAddr,
        /// The address the controller should call this node's agent at (e.g. $(POD_IP):9821).
        #[arg(long)]
        agent_advertise: String,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        enrol: NodeEnrolArgs,
        /// Reported to the scheduler in NodeGetInfo; 0 means no limit.
        #[arg(long, default_value_t = 0)]
        max_volumes_per_node: i64,
        /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on ADDR:PORT, e.g. 0.0.0.0:9811.
        /// Off when absent.
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_listen: Option<SocketAddr>,
        /// Name the CSI 1.13 health RPCs in GetCapabilities. They are served either way; off by
        /// default because csi-sanity (v5.5 vendors CSI 1.12) and sidecars built before CSI 1.13 refuse
        /// capability values they do not know (docs/health.md).
        #[arg(long)]
        advertise_volume_health: bool,
        /// Backup uploads and restores of this node share this bandwidth, in bytes per second
        /// (e.g. 50M); 0 is no limit (docs/backups.md).
        #[arg(long, value_name = "BYTES", default_value = "0", value_parser = backup_rate)]
        backup_bandwidth: u64,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// A CSI client for any driver: operate and benchmark it from a shell.
    Csi(cellar::client::CsiArgs),
    /// This node's pools, volumes and snapshots, and what no record or node state explains: orphan
    /// entries, leftovers, stray loop devices and mounts. Read-only unless --fix. Exit code 0: nothing
    /// found (or all fixed); 2: findings remain; 1: the report failed.
    Report(cellar::report::ReportArgs),
    /// The backups in a repository of the configuration: list, show, verify, prune
    /// (docs/backups.md).
    Backup(cellar::backup::cli::BackupArgs),
}

/// Limits on the CSI socket's connections (`server::SocketLimits`).
#[derive(clap::Args)]
struct SocketArgs {
    /// Close a CSI connection from which nothing was read for this long (live gRPC clients answer
    /// the server's pings, sent every quarter of it, so they are never idle).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    csi_idle_timeout: Duration,
    /// At most this many CSI connections at once; more wait until one closes.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    csi_max_connections: u32,
}

impl SocketArgs {
    fn limits(self) -> Result<cellar::server::SocketLimits, String> {
        if self.csi_idle_timeout < Duration::from_secs(1) {
            return Err("--csi-idle-timeout must be at least 1s".into());
        }
        Ok(cellar::server::SocketLimits {
            idle_timeout: self.csi_idle_timeout,
            max_connections: self.csi_max_connections as usize,
            max_per_peer: 0,
        })
    }
}

/// The controller's registry of nodes (docs/split-mode.md, "Heartbeats and the registry").
#[derive(clap::Args)]
struct RegistryArgs {
    /// Refuse the nodes' shared certificate (cellar-agent): every node must register with a
    /// certificate naming it (<node>.cellar-agent). See docs/security.md.
    #[arg(long)]
    require_node_certificates: bool,
    /// How a restore or clone onto another node moves its data: `direct` (the target node pulls
    /// it from the source node with a grant this controller signs) or `via-controller` (this
    /// controller relays it; for nodes of an earlier version during a rolling upgrade).
    #[arg(long, value_name = "PATH", default_value = "direct", value_parser = ["direct", "via-controller"])]
    node_transfers: String,
    /// How often nodes are told to heartbeat; a node silent for three intervals is unavailable.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// At most this many nodes: a new one takes the place of the longest-silent unavailable one,
    /// or is refused (RESOURCE_EXHAUSTED) when all are available.
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    max_nodes: u32,
    /// At most this many connections to the registry from one address at once (0: no limit). A
    /// node keeps one or two; what one host holds past it is closed at once, so a compromised
    /// node cannot take every place from the others.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_connections_per_peer: u32,
    /// The largest heartbeat accepted (a node's pools and topology), in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..))]
    max_heartbeat_bytes: u32,
    /// A node silent this long is forgotten: dropped from the registry, its volumes listed as
    /// abnormal from their last listing. Longer than three heartbeat intervals.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    forget_nodes_after: Duration,
    /// The deadline of a call that reads from a node's agent (get, list, look up by name, pools):
    /// a node that has not answered by then is unavailable for that call, and is not waited for
    /// again until it answers.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    agent_call_timeout: Duration,
    /// The deadline of a node's whole listing (ListVolumes, ListSnapshots: every page of it): a
    /// node that has not ended its listing by then is unavailable for that listing. Default: 4 x
    /// --agent-call-timeout.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    agent_list_timeout: Option<Duration>,
    /// Refuse (PERMISSION_DENIED) a heartbeat whose agent address is not the IP address it came
    /// from, so a node cannot have the controller dial a host of its choosing. Only where nodes
    /// reach the registry with their own address (no NAT, no proxy sidecar between).
    #[arg(long)]
    agent_address_is_peer: bool,
}

impl RegistryArgs {
    fn config(self) -> Result<cellar::agent::registry::RegistryConfig, String> {
        let defaults = cellar::agent::registry::RegistryConfig::default();
        let config = cellar::agent::registry::RegistryConfig {
            require_node_certificates: self.require_node_certificates,
            agent_address_is_peer: self.agent_address_is_peer,
            transfers: match self.node_transfers.as_str() {
                "via-controller" => cellar::agent::registry::TransferPath::ViaController,
                _ => cellar::agent::registry::TransferPath::Direct,
            },
            heartbeat_interval: self.heartbeat_interval,
            settle: 2 * self.heartbeat_interval,
            max_nodes: self.max_nodes as usize,
            max_heartbeat_bytes: self.max_heartbeat_bytes as usize,
            forget_after: self.forget_nodes_after,
            agent_timeouts: cellar::agent::remote::Timeouts {
                call: self.agent_call_timeout,
                listing: self
                    .agent_list_timeout
                    .unwrap_or(cellar::agent::remote::Timeouts::LISTING_CALLS * self.agent_call_timeout),
                ..defaults.agent_timeouts
            },
            ..defaults
        };
        if config.agent_timeouts.call < Duration::from_millis(100) {
            return Err("--agent-call-timeout must be at least 100ms".into());
        }
        if config.agent_timeouts.listing < config.agent_timeouts.call {
            return Err("--agent-list-timeout must be at least --agent-call-timeout (one page)".into());
        }
        if config.forget_after <= config.expiry() {
            return Err(format!(
                "--forget-nodes-after {:?} must be longer than the {:?} after which a node is unavailable (3 x --heartbeat-interval)",
                config.forget_after,
                config.expiry()
            ));
        }
        if config.heartbeat_interval < Duration::from_millis(50) {
            return Err("--heartbeat-interval must be at least 50ms".into());
        }
        Ok(config)
    }
}

/// Node enrolment, on the controller: issue node certificates (docs/security.md, "Enrolment").
#[derive(clap::Args)]
struct EnrolArgs {
    /// Issue node certificates: nodes enrol on ADDR:PORT (TLS with the controller's certificate),
    /// presenting their pod's service-account token. Off when absent.
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["enrol_service_account", "enrol_ca_secret"])]
    enrol_listen: Option<SocketAddr>,
    /// The service account whose tokens may enrol, NAMESPACE/NAME (the node DaemonSet's).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    enrol_service_account: Option<String>,
    /// The audience the nodes' projected tokens must be issued for.
    #[arg(long, value_name = "AUDIENCE", default_value = "cellar")]
    enrol_audience: String,
    /// The Secret holding the CA that signs node certificates, NAMESPACE/NAME; made on the first
    /// start when there is none.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    enrol_ca_secret: Option<String>,
    /// How long an issued node certificate is valid; nodes renew after two thirds of it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    enrol_certificate_validity: Duration,
    /// The Kubernetes API server, https://HOST[:PORT]; default: the pod's
    /// (KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT).
    #[arg(long, value_name = "URL")]
    kube_api: Option<String>,
    /// The controller's service-account token, for the API server.
    #[arg(long, value_name = "FILE", default_value = cellar::agent::enrol::kube::IN_CLUSTER_TOKEN)]
    kube_token_file: PathBuf,
    /// The CA of the API server's certificate.
    #[arg(long, value_name = "FILE", default_value = cellar::agent::enrol::kube::IN_CLUSTER_CA)]
    kube_ca_file: PathBuf,
    /// The controller's own certificate from a cluster CA it keeps in this Secret, NAMESPACE/NAME
    /// (made on the first start when there is none), instead of --tls-ca, --tls-cert and --tls-key
    /// (docs/security.md, "The cluster CA").
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        requires_all = ["enrol_listen", "cluster_ca_publish", "controller_name"],
        conflicts_with_all = ["tls_ca", "tls_cert", "tls_key", "insecure"]
    )]
    cluster_ca_secret: Option<String>,
    /// The ConfigMap the cluster CA's certificate is published in (key ca.crt), NAMESPACE/NAME:
    /// the nodes mount it to check the controller's certificate.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "cluster_ca_secret")]
    cluster_ca_publish: Option<String>,
    /// A name of the controller's own certificate (repeat it): every name nodes dial it by.
    #[arg(long, value_name = "DNS-NAME", requires = "cluster_ca_secret")]
    controller_name: Vec<String>,
    /// How long the controller's own certificate is valid; it restarts gracefully to issue itself
    /// a new one after two thirds of it.
    #[arg(long, value_name = "DURATION", default_value = "168h", value_parser = parse_duration)]
    controller_certificate_validity: Duration,
}

impl EnrolArgs {
    fn config(self) -> Result<Option<cellar::roles::ControllerEnrolment>, String> {
        let Some(listen) = self.enrol_listen else {
            return Ok(None);
        };
        let account = self.enrol_service_account.unwrap_or_default();
        let service_account = cellar::agent::enrol::ServiceAccount::parse(&account)
            .map_err(|e| format!("--enrol-service-account: {e}"))?;
        let secret = self.enrol_ca_secret.unwrap_or_default();
        let ca_secret =
            cellar::agent::enrol::ca::ObjectRef::parse(&secret).map_err(|e| format!("--enrol-ca-secret: {e}"))?;
        let validity = self.enrol_certificate_validity;
        if validity < Duration::from_secs(10) || validity > Duration::from_secs(366 * 24 * 3600) {
            return Err("--enrol-certificate-validity must be between 10s and 366 days".into());
        }
        if self.enrol_audience.is_empty() || self.enrol_audience.len() > 253 {
            return Err("--enrol-audience must be 1 to 253 characters".into());
        }
        let cluster_ca = match self.cluster_ca_secret {
            None => None,
            Some(secret) => Some(cluster_ca(
                &secret,
                &self.cluster_ca_publish.unwrap_or_default(),
                self.controller_name,
                self.controller_certificate_validity,
            )?),
        };
        Ok(Some(cellar::roles::ControllerEnrolment {
            listen,
            kube: cellar::agent::enrol::kube::KubeConfig {
                server: self.kube_api,
                token_file: self.kube_token_file,
                ca_file: self.kube_ca_file,
            },
            ca_secret,
            policy: cellar::agent::enrol::EnrolPolicy {
                audience: self.enrol_audience,
                service_account,
                validity,
                agent_server_name: cellar::agent::tls::AGENT_SERVER_NAME.to_string(),
            },
            cluster_ca,
        }))
    }
}

/// The cluster CA's flags, checked.
fn cluster_ca(
    secret: &str,
    publish: &str,
    names: Vec<String>,
    validity: Duration,
) -> Result<cellar::roles::ClusterCa, String> {
    use cellar::agent::enrol::ca::{is_dns_name, ObjectRef};
    let secret = ObjectRef::parse(secret).map_err(|e| format!("--cluster-ca-secret: {e}"))?;
    let publish = ObjectRef::parse(publish).map_err(|e| format!("--cluster-ca-publish: {e}"))?;
    if let Some(bad) = names.iter().find(|n| !is_dns_name(n)) {
        return Err(format!(
            "--controller-name '{bad}' is not a DNS name (lower-case letters, digits, '-' and '.')"
        ));
    }
    if validity < Duration::from_secs(10) || validity > Duration::from_secs(366 * 24 * 3600) {
        return Err("--controller-certificate-validity must be between 10s and 366 days".into());
    }
    Ok(cellar::roles::ClusterCa {
        secret,
        publish,
        names,
        validity,
    })
}

/// Node enrolment, on a node: obtain this node's certificate from the controller.
#[derive(clap::Args)]
struct NodeEnrolArgs {
    /// Obtain this node's certificate from the controller, proving the node with this projected
    /// service-account token (docs/security.md, "Enrolment"). Replaces --tls-cert and --tls-key;
    /// --tls-ca is the CA of the controller's certificate.
    #[arg(long, value_name = "FILE")]
    enrol_token: Option<PathBuf>,
    /// The controller's enrolment port, on the host of --controller.
    #[arg(long, value_name = "PORT", default_value_t = 9822)]
    enrol_port: u16,
    /// Where the enrolled key and certificate are kept (memory-backed in the chart).
    #[arg(long, value_name = "DIR", default_value = "/run/cellar/identity")]
    enrol_dir: PathBuf,
}

impl NodeEnrolArgs {
    fn flags(self) -> Option<cellar::roles::NodeEnrolmentFlags> {
        Some(cellar::roles::NodeEnrolmentFlags {
            token_file: self.enrol_token?,
            port: self.enrol_port,
            dir: self.enrol_dir,
        })
    }
}

/// A duration such as `500ms`, `5s`, `30m`, `1h` (a bare number is seconds).
///
/// Minutes and hours are multiplied checked: unchecked, a number near 2^64 / 60 panicked in a debug
/// build and wrapped in a release one, a year asked for becoming seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(at);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 500ms, 5s, 30m or 1h"))?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("'{s}' is too long a duration (at most {} s)", u64::MAX))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("'{s}': unit must be ms, s, m or h")),
    }
}

/// Mutual TLS between the controller and the nodes.
#[derive(clap::Args)]
struct TlsArgs {
    /// The CA that signs every controller and node certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by --tls-ca.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Plaintext between controller and nodes: for development only.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    fn flags(self) -> cellar::roles::TlsFlags {
        cellar::roles::TlsFlags {
            ca: self.tls_ca,
            cert: self.tls_cert,
            key: self.tls_key,
            insecure: self.insecure,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CELLAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; never escape codes in a pod's log or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn main() -> ExitCode {
    cellar::sys::memory::limit_malloc_arenas();
    if let Err(e) = cellar::sys::memory::raise_open_file_limit() {
        eprintln!("cellar: cannot raise the open file limit (deep trees may fail with EMFILE): {e}");
    }
    cellar::agent::tls::use_ring();
    let cli = Cli::parse();
    // The report reads the disk and the kernel's tables; it needs no async runtime.
    let command = match cli.command {
        Command::Report(args) => {
            return match cellar::report::run(args) {
                Ok(cellar::report::Outcome::Clean) => ExitCode::SUCCESS,
                Ok(cellar::report::Outcome::FindingsRemain) => ExitCode::from(2),
                Err(e) => {
                    eprintln!("cellar report: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Backup(args) => {
            return match cellar::backup::cli::run(args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(2),
                Err(e) => {
                    eprintln!("cellar backup: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cellar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Stopped, String> = match command {
        Command::AllInOne {
            endpoint,
            node_id,
            data_dir,
            config,
            driver_name,
            max_volumes_per_node,
            metrics_listen,
            socket,
            advertise_volume_health,
            backup_bandwidth,
            prune,
        } => {
            init_logging(cli.log_format);
            socket.limits().and_then(|socket| {
                let opts = cellar::roles::AllInOne {
                    backup_bandwidth,
                    prune,
                    endpoint,
                    node_id: node_id.unwrap_or_else(hostname),
                    data_dir,
                    config,
                    driver_name,
                    max_volumes_per_node,
                    metrics_listen,
                    socket,
                    advertise_volume_health,
                };
                runtime
                    .block_on(cellar::roles::all_in_one(opts))
                    .map(|()| Stopped::Signalled)
                    .map_err(|e| e.to_string())
            })
        }
        Command::Controller {
            endpoint,
            agent_listen,
            data_dir,
            config,
            driver_name,
            name,
            tls,
            registry,
            enrol,
            metrics_listen,
            socket,
            advertise_volume_health,
            prune,
        } => {
            init_logging(cli.log_format);
            let registry_peer_limit = registry.max_connections_per_peer as usize;
            let limits = registry
                .config()
                .and_then(|r| Ok((r, socket.limits()?, enrol.config()?)));
            limits.and_then(|(registry, socket, enrolment)| {
                let opts = cellar::roles::ControllerRole {
                    registry,
                    registry_peer_limit,
                    socket,
                    endpoint,
                    agent_listen,
                    data_dir,
                    config,
                    driver_name,
                    tls: tls.flags(),
                    metrics_listen,
                    name,
                    advertise_volume_health,
                    enrolment,
                    prune,
                };
                runtime
                    .block_on(cellar::roles::controller(opts))
                    .map_err(|e| e.to_string())
            })
        }
        Command::Node {
            endpoint,
            node_id,
            data_dir,
            config,
            driver_name,
            controller,
            agent_listen,
            agent_advertise,
            tls,
            enrol,
            max_volumes_per_node,
            metrics_listen,
            socket,
            advertise_volume_health,
            backup_bandwidth,
        } => {
            init_logging(cli.log_format);
            socket.limits().and_then(|socket| {
                let opts = cellar::roles::NodeRole {
                    backup_bandwidth,
                    endpoint,
                    node_id: node_id.unwrap_or_else(hostname),
                    data_dir,
                    config,
                    driver_name,
                    controller,
                    agent_listen,
                    agent_advertise,
                    tls: tls.flags(),
                    max_volumes_per_node,
                    metrics_listen,
                    socket,
                    advertise_volume_health,
                    enrolment: enrol.flags(),
                };
                runtime.block_on(cellar::roles::node(opts)).map_err(|e| e.to_string())
            })
        }
        Command::Csi(args) => runtime.block_on(cellar::client::run(args)).map(|()| Stopped::Signalled),
        Command::Report(_) | Command::Backup(_) => Ok(Stopped::Signalled), // answered above
    };
    // Blocking storage work still running after the grace period is abandoned, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(Stopped::Signalled) => ExitCode::SUCCESS,
        Ok(Stopped::Restart) => restart_in_place(),
        Err(e) => {
            eprintln!("cellar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts this program again in this process (`exec`, the same process id and arguments) for
/// rotated or renewed certificates. Exiting instead would end the container: kubelet starts it
/// again only after its restart back-off, and every process it started goes with it, among them
/// the FUSE daemon serving a share this node mounted, whose staged and published volumes would
/// then fail with ENOTCONN until their pods restart (docs/shared.md). Every descriptor the process
/// keeps is close-on-exec (Rust's and tokio's default): the socket, the listeners and the data
/// directory's lock go with the old image.
fn restart_in_place() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "cellar".into());
    tracing::info!("restarting in place (the same process) for the rotated or renewed certificates");
    // /proc/self/exe is this program's file even when its path was replaced or removed since.
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    eprintln!("cellar: cannot start again in place ({e}); exiting for the container to be restarted");
    ExitCode::SUCCESS
}

/// `--backup-bandwidth`: a size per second (`50M`, `1G`, `1048576`).
fn backup_rate(s: &str) -> Result<u64, String> {
    cellar::client::parse_size(s).and_then(|n| u64::try_from(n).map_err(|_| format!("'{s}' is negative")))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every flag and argument of every command says what it is for in --help.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "cellar", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn durations_take_a_unit_or_mean_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").unwrap_err().contains("unit must be"));
        assert!(parse_duration("s").unwrap_err().contains("not a duration"));
    }

    #[test]
    fn durations_too_long_for_a_u64_of_seconds_are_refused_not_wrapped() {
        // 307445734561825861 minutes is 2^64 + 44 seconds: unchecked, it wrapped to 44 s.
        let err = parse_duration("307445734561825861m").unwrap_err();
        assert!(err.contains("'307445734561825861m' is too long a duration"), "{err}");
        assert!(parse_duration("5124095576030432h").unwrap_err().contains("too long"));
        assert!(parse_duration("99999999999999999999")
            .unwrap_err()
            .contains("not a duration"));
        // The largest that fit are still taken.
        assert_eq!(
            parse_duration("307445734561825860m"),
            Ok(Duration::from_secs(307445734561825860 * 60))
        );
        assert_eq!(
            parse_duration("5124095576030431h"),
            Ok(Duration::from_secs(5124095576030431 * 3600))
        );
        // And reach the flags: the controller refuses to start rather than forget nodes at once.
        let err = Cli::try_parse_from([
            "cellar",
            "controller",
            "--insecure",
            "--forget-nodes-after",
            "307445734561825861m",
        ])
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains("too long a duration"), "{err}");
    }

    fn controller_args(extra: &[&str]) -> Result<cellar::agent::registry::RegistryConfig, String> {
        let mut argv = vec!["cellar", "controller", "--insecure"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Command::Controller { registry, .. } => registry.config(),
            _ => unreachable!("parsed as the controller"),
        }
    }

    #[test]
    fn registry_flags_have_sane_defaults_and_forgetting_comes_after_unavailability() {
        let c = controller_args(&[]).expect("defaults");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.max_nodes, 5000);
        assert_eq!(c.max_heartbeat_bytes, 64 << 10);
        assert_eq!(c.forget_after, Duration::from_secs(3600));
        assert!(!c.require_node_certificates);
        assert!(!c.agent_address_is_peer);
        assert!(
            controller_args(&["--agent-address-is-peer"])
                .expect("flag")
                .agent_address_is_peer
        );
        let e = controller_args(&["--heartbeat-interval", "10s", "--forget-nodes-after", "30s"]).unwrap_err();
        assert!(e.contains("must be longer than"), "{e}");
        let e = controller_args(&["--max-nodes", "0"]).unwrap_err();
        assert!(e.contains("--max-nodes"), "{e}");
    }

    #[test]
    fn node_transfers_are_direct_unless_relayed_for_an_upgrade() {
        use cellar::agent::registry::TransferPath;
        assert_eq!(controller_args(&[]).expect("defaults").transfers, TransferPath::Direct);
        let relayed = controller_args(&["--node-transfers", "via-controller"]).expect("relay");
        assert_eq!(relayed.transfers, TransferPath::ViaController);
        let e = controller_args(&["--node-transfers", "sideways"]).unwrap_err();
        assert!(e.contains("direct") && e.contains("via-controller"), "{e}");
    }
}
