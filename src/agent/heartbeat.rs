//! The node's heartbeat: every interval, tell every controller replica that this node is alive,
//! where its agent listens, and how full its pools are.
//!
//! The controller's name is resolved again each round (a headless Service has one A/AAAA record per
//! replica), and each address gets its own heartbeat, so every replica keeps a full registry. A
//! replica that is down or slow costs one bounded call and never stops the others; the node keeps
//! beating for as long as it runs.
//!
//! Each beat opens its own connection and closes it when answered: a controller serving a thousand
//! nodes would otherwise hold a thousand idle TLS and HTTP/2 connections (about 30 KiB each in
//! buffers) for calls made once per interval. The price is a handshake per node per interval
//! (docs/benchmarks.md has both figures).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Request;

use super::registry::NodeReport;
use super::remote::HostPort;
use super::tls::{Tls, TlsError};
use super::wire::v1::{self, registry_client::RegistryClient};
use super::Agent;
use crate::storage::engine::PoolStatus;
use crate::storage::id::NodeId;

/// Bounds on the interval a controller may ask for.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// How the node finds the controller replicas.
#[tonic::async_trait]
pub trait Resolve: Send + Sync {
    async fn resolve(&self, target: &HostPort) -> io::Result<Vec<SocketAddr>>;
}

/// The system resolver: every A and AAAA record of the name (or the address itself).
pub struct Dns;

#[tonic::async_trait]
impl Resolve for Dns {
    async fn resolve(&self, target: &HostPort) -> io::Result<Vec<SocketAddr>> {
        let addrs = tokio::net::lookup_host((target.bare_host(), target.port())).await?;
        Ok(addrs.collect())
    }
}

#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// `--controller HOST:PORT`: the controller's (headless) Service name and registry port.
    pub controller: HostPort,
    /// The SAN expected on the controller's certificate: by default the host of `controller`.
    pub server_name: String,
    pub node: NodeId,
    pub topology: BTreeMap<String, String>,
    /// `--agent-advertise`: where the controller reaches this node's agent.
    pub agent_address: HostPort,
    pub version: String,
    /// The interval until a controller's acknowledgement names another.
    pub interval: Duration,
    /// Bound on one DNS lookup and on one heartbeat call.
    pub timeout: Duration,
}

impl HeartbeatConfig {
    pub fn new(
        controller: HostPort,
        node: NodeId,
        topology: BTreeMap<String, String>,
        agent_address: HostPort,
    ) -> HeartbeatConfig {
        HeartbeatConfig {
            server_name: controller.bare_host().to_string(),
            controller,
            node,
            topology,
            agent_address,
            version: env!("CARGO_PKG_VERSION").to_string(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }
}

/// One controller replica as this node sees it.
#[derive(Default)]
struct Replica {
    /// Whether its last call succeeded: then the next one is a Heartbeat, else a Register.
    registered: bool,
}

/// What one round achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub acked: Vec<SocketAddr>,
    pub failed: Vec<SocketAddr>,
    /// Why each failed replica failed, for the caller to report once per change.
    pub errors: BTreeMap<SocketAddr, String>,
}

pub struct Heartbeat {
    config: HeartbeatConfig,
    tls: Tls,
    agent: Arc<dyn Agent>,
    resolver: Arc<dyn Resolve>,
    replicas: BTreeMap<SocketAddr, Replica>,
    interval: Duration,
    last_pools: Vec<PoolStatus>,
    /// Why the controller's name did not resolve last time (logged once per change), and why a
    /// registry client could not be made per address (the same).
    resolve_error: Option<String>,
    client_errors: BTreeMap<SocketAddr, String>,
}

impl Heartbeat {
    /// `agent` is the node's own (in-process) agent: its pools go into every heartbeat.
    pub fn new(config: HeartbeatConfig, tls: Tls, agent: Arc<dyn Agent>) -> Heartbeat {
        Heartbeat::with_resolver(config, tls, agent, Arc::new(Dns))
    }

    pub fn with_resolver(
        config: HeartbeatConfig,
        tls: Tls,
        agent: Arc<dyn Agent>,
        resolver: Arc<dyn Resolve>,
    ) -> Heartbeat {
        Heartbeat {
            interval: config.interval,
            config,
            tls,
            agent,
            resolver,
            replicas: BTreeMap::new(),
            last_pools: Vec::new(),
            resolve_error: None,
            client_errors: BTreeMap::new(),
        }
    }

    /// The interval in force (the last controller's word, or the configured one).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Beats forever: spawn it, and abort the task at shutdown.
    pub async fn run(mut self) {
        loop {
            let started = tokio::time::Instant::now();
            self.beat().await;
            tokio::time::sleep_until(started + self.interval).await;
        }
    }

    /// One round: resolve the controller, send every replica a heartbeat, wait for all (bounded).
    pub async fn beat(&mut self) -> Round {
        let addrs = self.resolve().await;
        self.replicas.retain(|a, _| addrs.contains(a));
        let status = self.status().await;
        let mut calls = JoinSet::new();
        for addr in &addrs {
            let mut client = match self.connect(*addr) {
                Ok(client) => client,
                Err(e) => {
                    let why = e.to_string();
                    if self.client_errors.get(addr) != Some(&why) {
                        tracing::error!(controller = %addr, error = why, "cannot make a registry client");
                        self.client_errors.insert(*addr, why);
                    }
                    continue;
                }
            };
            let register = !self.replicas.entry(*addr).or_default().registered;
            let mut req = Request::new(status.clone());
            req.set_timeout(self.config.timeout);
            let (addr, timeout) = (*addr, self.config.timeout);
            calls.spawn(async move {
                let call = async {
                    if register {
                        client.register(req).await
                    } else {
                        client.heartbeat(req).await
                    }
                };
                let result = match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(ack)) => Ok(ack.into_inner()),
                    Ok(Err(s)) => Err(s.message().to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (addr, result)
            });
        }
        let mut round = Round::default();
        while let Some(joined) = calls.join_next().await {
            let Ok((addr, result)) = joined else { continue };
            self.record(addr, result, &mut round);
        }
        round.acked.sort();
        round.failed.sort();
        round
    }

    fn record(&mut self, addr: SocketAddr, result: Result<v1::RegistryAck, String>, round: &mut Round) {
        let Some(replica) = self.replicas.get_mut(&addr) else {
            return;
        };
        match result {
            Ok(ack) => {
                if !replica.registered {
                    tracing::info!(controller = %addr, version = ack.version, "registered with controller");
                }
                replica.registered = true;
                if ack.heartbeat_interval_millis > 0 {
                    self.interval =
                        Duration::from_millis(ack.heartbeat_interval_millis).clamp(MIN_INTERVAL, MAX_INTERVAL);
                }
                round.acked.push(addr);
            }
            Err(why) => {
                if replica.registered {
                    tracing::warn!(controller = %addr, error = why, "heartbeat failed; will keep trying");
                } else {
                    tracing::debug!(controller = %addr, error = why, "controller not reachable yet");
                }
                replica.registered = false;
                round.failed.push(addr);
                round.errors.insert(addr, why);
            }
        }
    }

    /// The controller's addresses now; on a failed lookup, the ones known from the last round.
    async fn resolve(&mut self) -> BTreeSet<SocketAddr> {
        let target = self.config.controller.clone();
        match tokio::time::timeout(self.config.timeout, self.resolver.resolve(&target)).await {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                if self.resolve_error.take().is_some() {
                    tracing::info!(controller = %self.config.controller, "the controller's name resolves again");
                }
                addrs.into_iter().collect()
            }
            Ok(Ok(_)) => self.known("the name has no addresses"),
            Ok(Err(e)) => self.known(&e.to_string()),
            Err(_) => self.known("the lookup timed out"),
        }
    }

    /// The addresses known from earlier rounds, after a failed lookup (logged once per cause).
    fn known(&mut self, why: &str) -> BTreeSet<SocketAddr> {
        if self.resolve_error.as_deref() != Some(why) {
            tracing::warn!(
                controller = %self.config.controller,
                error = why,
                known = self.replicas.len(),
                "cannot resolve the controller; beating to the addresses known"
            );
            self.resolve_error = Some(why.to_string());
        }
        self.replicas.keys().copied().collect()
    }

    /// A client for one beat: its connection is made by the call and closed when the client is
    /// dropped after it.
    fn connect(&self, addr: SocketAddr) -> Result<RegistryClient<Channel>, TlsError> {
        let channel = self
            .tls
            .lazy_channel(&addr.to_string(), &self.config.server_name, self.config.timeout, |e| e)?;
        Ok(RegistryClient::new(channel))
    }

    async fn status(&mut self) -> v1::NodeStatus {
        match self.agent.pools().await {
            Ok(p) => self.last_pools = p,
            Err(e) => tracing::warn!(error = %e, "cannot read the pools; sending the last known"),
        }
        let report = NodeReport {
            node: self.config.node.clone(),
            topology: self.config.topology.clone(),
            agent_address: self.config.agent_address.clone(),
            pools: self.last_pools.clone(),
            version: self.config.version.clone(),
            shut_pools: self.agent.shut_pools(),
        };
        v1::NodeStatus::from(&report)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Instant;

    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tonic::service::Routes;

    use super::*;
    use crate::agent::registry::{Registry, RegistryConfig};
    use crate::agent::server::serve;
    use crate::agent::LocalAgent;
    use crate::storage::config::Config;
    use crate::storage::engine::LocalEngine;

    /// The controller's name resolves to these (127.0.0.0/8 only).
    struct Fixed(Vec<SocketAddr>);

    #[tonic::async_trait]
    impl Resolve for Fixed {
        async fn resolve(&self, _: &HostPort) -> io::Result<Vec<SocketAddr>> {
            Ok(self.0.clone())
        }
    }

    const INTERVAL: Duration = Duration::from_millis(200);

    fn loopback(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), port)
    }

    /// A registry replica served on `addr`, stopped when the sender is dropped.
    async fn replica(addr: SocketAddr) -> (Registry, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let config = RegistryConfig {
            heartbeat_interval: INTERVAL,
            ..Default::default()
        };
        let registry = Registry::new(config, Tls::Insecure, None);
        let listener = TcpListener::bind(addr).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let routes = Routes::new(registry.service());
        let task = tokio::spawn(async move {
            let _ = serve(listener, Tls::Insecure, routes, async {
                let _ = stopped.await;
            })
            .await;
        });
        (registry, stop, task)
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn node_agent(dir: &std::path::Path) -> Arc<dyn Agent> {
        let node = NodeId::parse("node-1").unwrap();
        let engine = LocalEngine::open(node, &Config::default_for(dir)).unwrap();
        Arc::new(LocalAgent::new(Arc::new(engine)))
    }

    fn heartbeat(dir: &std::path::Path, controllers: Vec<SocketAddr>) -> Heartbeat {
        let config = HeartbeatConfig {
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
            ..HeartbeatConfig::new(
                HostPort::parse("cellar-controller:7070").unwrap(),
                NodeId::parse("node-1").unwrap(),
                BTreeMap::from([("topology.cellar.csi.dev/node".into(), "node-1".into())]),
                HostPort::parse("127.0.0.1:7071").unwrap(),
            )
        };
        Heartbeat::with_resolver(config, Tls::Insecure, node_agent(dir), Arc::new(Fixed(controllers)))
    }

    async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < limit, "{what} not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    /// A resolver that fails with `why` while `failing` is set, else answers `addrs`.
    struct Flaky {
        failing: std::sync::atomic::AtomicBool,
        addrs: Vec<SocketAddr>,
    }

    #[tonic::async_trait]
    impl Resolve for Flaky {
        async fn resolve(&self, _: &HostPort) -> io::Result<Vec<SocketAddr>> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::other("no such host"));
            }
            Ok(self.addrs.clone())
        }
    }

    /// Log lines written while `f` runs, at the default level.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_controller_name_that_does_not_resolve_is_logged_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (_a, _stop_a, _) = replica(loopback(1, port)).await;
        let flaky = Arc::new(Flaky {
            failing: std::sync::atomic::AtomicBool::new(true),
            addrs: vec![loopback(1, port)],
        });
        let mut hb = heartbeat(dir.path(), vec![]);
        hb.resolver = flaky.clone();
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        for _ in 0..3 {
            hb.beat().await;
        }
        flaky.failing.store(false, std::sync::atomic::Ordering::SeqCst);
        hb.beat().await;
        hb.beat().await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("cannot resolve the controller").count(), 1, "{text}");
        assert_eq!(text.matches("resolves again").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn every_replica_gets_the_heartbeat_and_the_node_adopts_its_interval() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (a, _stop_a, _) = replica(loopback(1, port)).await;
        let (b, _stop_b, _) = replica(loopback(2, port)).await;
        let mut hb = heartbeat(dir.path(), vec![loopback(1, port), loopback(2, port)]);
        let round = hb.beat().await;
        assert_eq!(round.acked, [loopback(1, port), loopback(2, port)]);
        assert_eq!(hb.interval(), INTERVAL);
        let node = NodeId::parse("node-1").unwrap();
        for r in [&a, &b] {
            let info = r.node(&node).expect("registered");
            assert!(info.available);
            assert_eq!(info.report.agent_address.to_string(), "127.0.0.1:7071");
            assert_eq!(info.report.pools.len(), 1, "the node's pools travel in the heartbeat");
            assert_eq!(info.report.topology["topology.cellar.csi.dev/node"], "node-1");
        }
    }

    /// Established TCP connections whose far end is `port` (the client ends, read from the kernel).
    fn connections_to(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let remote = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[2].ends_with(&remote) && f[3] == "01"
            })
            .count()
    }

    #[tokio::test]
    async fn a_beat_does_not_hold_its_connection_open_between_beats() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (a, _stop_a, _) = replica(loopback(1, port)).await;
        let mut hb = heartbeat(dir.path(), vec![loopback(1, port)]);
        for _ in 0..3 {
            let round = hb.beat().await;
            assert_eq!(round.acked, [loopback(1, port)]);
            until("the beat's connection closed", Duration::from_secs(10), || {
                connections_to(port) == 0
            })
            .await;
        }
        assert!(a.is_available(&NodeId::parse("node-1").unwrap()));
    }

    #[tokio::test]
    async fn a_replica_that_is_down_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (a, _stop_a, _) = replica(loopback(1, port)).await;
        let mut hb = heartbeat(dir.path(), vec![loopback(1, port), loopback(3, port)]);
        let round = hb.beat().await;
        assert_eq!(round.acked, [loopback(1, port)]);
        assert_eq!(round.failed, [loopback(3, port)]);
        assert!(a.is_available(&NodeId::parse("node-1").unwrap()));

        let (c, _stop_c, _) = replica(loopback(3, port)).await;
        let round = hb.beat().await;
        assert_eq!(round.acked, [loopback(1, port), loopback(3, port)]);
        assert!(c.is_available(&NodeId::parse("node-1").unwrap()));
    }

    #[tokio::test]
    async fn a_restarted_registry_refills_within_one_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = loopback(1, port);
        let (first, stop, task) = replica(addr).await;
        let hb = heartbeat(dir.path(), vec![addr]);
        let beating = tokio::spawn(hb.run());
        let node = NodeId::parse("node-1").unwrap();
        until("first registration", Duration::from_secs(5), || {
            first.is_available(&node)
        })
        .await;

        drop(stop);
        task.await.unwrap();
        let (second, _stop, _) = replica(addr).await;
        let took = until(
            "registration after the restart",
            2 * INTERVAL + Duration::from_secs(1),
            || second.is_available(&node),
        )
        .await;
        assert!(took <= INTERVAL + Duration::from_millis(800), "took {took:?}");
        beating.abort();
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_beating_to_the_known_replicas() {
        struct Flaky(std::sync::Mutex<Option<Vec<SocketAddr>>>);
        #[tonic::async_trait]
        impl Resolve for Flaky {
            async fn resolve(&self, _: &HostPort) -> io::Result<Vec<SocketAddr>> {
                self.0
                    .lock()
                    .unwrap()
                    .take()
                    .ok_or_else(|| io::Error::other("SERVFAIL"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (a, _stop, _) = replica(loopback(1, port)).await;
        let mut hb = heartbeat(dir.path(), vec![]);
        hb.resolver = Arc::new(Flaky(std::sync::Mutex::new(Some(vec![loopback(1, port)]))));
        assert_eq!(hb.beat().await.acked, [loopback(1, port)]);
        assert_eq!(hb.beat().await.acked, [loopback(1, port)]);
        assert!(a.is_available(&NodeId::parse("node-1").unwrap()));
    }
}
