//! Split mode's channel between the controller and a node's agent, over mutual TLS with a CA and
//! certificates made here: who is let in, who is refused, and what an unreachable or hung node
//! costs. Everything listens on 127.0.0.1 only.

mod common;

/// What each thread's allocations hold now, and the most they held since [`counting::start`]: a
/// test's runtime (its controller, and the agents it starts) runs on the test's own thread, so
/// this tells what a call cost there, whatever the other tests do meanwhile.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn count(bytes: isize) {
        let _ = HELD.try_with(|held| {
            let now = held.get() + bytes;
            held.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    /// Starts a measure: what the thread holds now.
    pub fn start() -> isize {
        let now = HELD.with(Cell::get);
        PEAK.with(|peak| peak.set(now));
        now
    }

    /// The most the thread held above `start` since then.
    pub fn peak_since(start: isize) -> usize {
        (PEAK.with(Cell::get) - start).max(0) as usize
    }

    pub struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                count(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            unsafe { System.dealloc(p, layout) };
            count(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, layout, new) };
            if !q.is_null() {
                count(new as isize - layout.size() as isize);
            }
            q
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellar::agent::heartbeat::{Heartbeat, HeartbeatConfig, Resolve};
use cellar::agent::registry::{Registry, RegistryConfig};
use cellar::agent::remote::{HostPort, NodeListing, RemoteAgent, Timeouts};
use cellar::agent::server::{serve, AgentService};
use cellar::agent::tls::{Tls, TlsOptions, AGENT_SERVER_NAME};
use cellar::agent::wire::v1;
use cellar::agent::{Agent, Directory, LocalAgent};
use cellar::storage::config::Config;
use cellar::storage::engine::{CapacityRange, LocalEngine, NewVolume};
use cellar::storage::id::{NodeId, VolumeId};
use cellar::storage::StorageError;
use common::certs::{Authority, Pair};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

const NODE: &str = "node-1";
/// The name on the controller's certificate, which the agents under test serve.
const CONTROLLER: &str = "cellar-controller";

fn node() -> NodeId {
    NodeId::parse(NODE).expect("node id")
}

/// A node's agent on 127.0.0.1 over an engine with one `dir` pool in a temp dir.
struct AgentUnderTest {
    addr: SocketAddr,
    engine: Arc<LocalEngine>,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_agent(tls: Tls) -> AgentUnderTest {
    start_agent_of(NODE, tls).await
}

/// An agent of `node`, serving only callers whose certificate names [`CONTROLLER`].
async fn start_agent_of(node: &str, tls: Tls) -> AgentUnderTest {
    let dir = tempfile::Builder::new()
        .prefix("cellar-agent-tls-")
        .tempdir()
        .expect("tempdir");
    let node = NodeId::parse(node).expect("node id");
    let engine = Arc::new(LocalEngine::open(node, &Config::default_for(dir.path())).expect("engine"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let routes = Routes::new(AgentService::new(engine.clone()).into_server(tls.callers(CONTROLLER)));
    tokio::spawn(async move {
        serve(listener, tls, routes, async {
            let _ = stopped.await;
        })
        .await
        .expect("agent server");
    });
    AgentUnderTest {
        addr,
        engine,
        _stop: stop,
        _dir: dir,
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        call: Duration::from_secs(3),
        storage: Duration::from_secs(10),
        listing: Timeouts::LISTING_CALLS * Duration::from_secs(3),
    }
}

fn remote(node: &str, addr: SocketAddr, tls: &Tls, t: Timeouts) -> RemoteAgent {
    let address = HostPort::parse(&addr.to_string()).expect("address");
    RemoteAgent::new(NodeId::parse(node).expect("node"), address, tls, AGENT_SERVER_NAME, t).expect("client")
}

fn new_volume(name: &str, bytes: u64) -> NewVolume {
    NewVolume::plain(name, None, bytes)
}

fn status(e: StorageError) -> Status {
    Status::from(e)
}

/// A CreateVolume over a TLS handshake that must fail: UNAVAILABLE naming the node, and no volume
/// on the agent (`why` says what that proves).
async fn create_is_refused(controller: &RemoteAgent, agent: &AgentUnderTest, why: &str) {
    let e = status(
        controller
            .create_volume(new_volume("pvc-1", 1 << 20))
            .await
            .expect_err("the TLS handshake must fail"),
    );
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains(NODE), "{}", e.message());
    assert!(agent.engine.volumes().is_empty(), "{why}");
}

#[tokio::test]
async fn a_client_with_a_certificate_from_the_ca_creates_lists_and_deletes() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let controller = remote(NODE, agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());

    let created = controller
        .create_volume(new_volume("pvc-1", 1 << 20))
        .await
        .expect("create");
    assert_eq!(created.id.to_string(), "local:node-1:default:pvc-1");
    assert_eq!(created.capacity_bytes, 1 << 20);
    let again = controller
        .create_volume(new_volume("pvc-1", 1 << 20))
        .await
        .expect("create again");
    assert_eq!(again, created, "create is idempotent by name");

    let listed = controller.volumes().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, created);
    assert!(!listed[0].1.abnormal);
    assert_eq!(
        controller.volume_named("pvc-1".into()).await.expect("named"),
        Some(created.clone())
    );
    assert_eq!(controller.pools().await.expect("pools").len(), 1);

    let id = created.id.clone();
    controller.delete_volume(id.clone()).await.expect("delete");
    controller
        .delete_volume(id.clone())
        .await
        .expect("delete is idempotent");
    assert!(controller.volumes().await.expect("list").is_empty());
    assert_eq!(controller.volume(id).await.expect("get"), None);
    assert!(agent.engine.volumes().is_empty());
}

#[tokio::test]
async fn a_node_error_comes_back_with_its_code_and_message() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let controller = remote(NODE, agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());
    let local = LocalAgent::new(agent.engine.clone());

    controller
        .create_volume(new_volume("pvc-1", 1 << 20))
        .await
        .expect("create");
    let remote_err = status(
        controller
            .create_volume(new_volume("pvc-1", 2 << 20))
            .await
            .unwrap_err(),
    );
    let local_err = status(local.create_volume(new_volume("pvc-1", 2 << 20)).await.unwrap_err());
    assert_eq!(remote_err.code(), Code::AlreadyExists);
    assert_eq!(remote_err.message(), local_err.message());

    let mut elsewhere = new_volume("pvc-2", 1 << 20);
    elsewhere.pool = Some(cellar::storage::id::PoolName::parse("nope").expect("pool"));
    let e = status(controller.create_volume(elsewhere).await.unwrap_err());
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown pool 'nope'"), "{}", e.message());

    let missing = VolumeId::parse("local:node-1:default:pvc-9").expect("id");
    let e = status(
        controller
            .expand_volume(
                missing,
                CapacityRange {
                    required: 1 << 30,
                    limit: 0,
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "volume local:node-1:default:pvc-9 not found");
}

/// A client with the CA and the right server name but no certificate of its own.
async fn anonymous_list(ca: &Authority, addr: SocketAddr) -> Result<(), Status> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name(AGENT_SERVER_NAME);
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = v1::agent_client::AgentClient::new(channel);
    client
        .create_volume(v1::CreateVolumeRequest {
            name: "pvc-anon".into(),
            mode: v1::VolumeMode::Filesystem as i32,
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let refused = anonymous_list(&ca, agent.addr).await.expect_err("must be refused");
    assert_ne!(refused.code(), Code::Ok);
    assert!(agent.engine.volumes().is_empty(), "nothing was created");
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let controller = remote(NODE, agent.addr, &Tls::Insecure, timeouts());
    let e = status(
        controller
            .create_volume(new_volume("pvc-1", 1 << 20))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(agent.engine.volumes().is_empty());
}

#[tokio::test]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let ca = Authority::new("cellar test CA");
    let rogue = Authority::new("someone else's CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    // It trusts the right CA, so it would accept the server; its own certificate is the rogue's.
    let leaf = rogue.issue(&[CONTROLLER]);
    let tls = Tls::from_pem(ca.pem().as_bytes(), leaf.cert.as_bytes(), leaf.key.as_bytes()).expect("tls");
    let controller = remote(NODE, agent.addr, &tls, timeouts());
    create_is_refused(&controller, &agent, "nothing was created").await;
}

#[tokio::test]
async fn a_server_with_a_certificate_from_another_ca_is_refused_by_the_client() {
    let ca = Authority::new("cellar test CA");
    let rogue = Authority::new("someone else's CA");
    // The impostor accepts our clients (it trusts our CA) but presents the rogue's certificate.
    let leaf = rogue.issue(&[AGENT_SERVER_NAME]);
    let server_tls = Tls::from_pem(ca.pem().as_bytes(), leaf.cert.as_bytes(), leaf.key.as_bytes()).expect("tls");
    let agent = start_agent(server_tls).await;
    let controller = remote(NODE, agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());
    create_is_refused(&controller, &agent, "nothing was sent").await;
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_refused_by_the_client() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&["not-the-agent"]))).await;
    let controller = remote(NODE, agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());
    let e = status(controller.volumes().await.unwrap_err());
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
}

#[tokio::test]
async fn a_call_meant_for_another_node_is_refused() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let stale = remote("node-2", agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());
    let e = status(stale.create_volume(new_volume("pvc-1", 1 << 20)).await.unwrap_err());
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains("serves node node-1, not node-2"),
        "{}",
        e.message()
    );
    assert!(agent.engine.volumes().is_empty());
}

#[tokio::test]
async fn an_unreachable_node_is_unavailable_naming_it_within_the_timeout() {
    let ca = Authority::new("cellar test CA");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let t = timeouts();
    let controller = remote(NODE, closed, &ca.tls(&ca.issue(&[CONTROLLER])), t);
    let start = Instant::now();
    let e = status(controller.volumes().await.unwrap_err());
    assert!(start.elapsed() <= t.call, "took {:?}", start.elapsed());
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("node-1 is unavailable"), "{}", e.message());
    assert!(e.message().contains(&closed.to_string()), "{}", e.message());
}

#[tokio::test]
async fn a_hung_node_is_unavailable_within_the_call_timeout() {
    let ca = Authority::new("cellar test CA");
    // Accepts TCP connections (the kernel's backlog) and never says a word.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = hung.local_addr().expect("addr");
    let t = Timeouts {
        connect: Duration::from_secs(1),
        call: Duration::from_secs(1),
        storage: Duration::from_secs(2),
        listing: Timeouts::LISTING_CALLS * Duration::from_secs(1),
    };
    let controller = remote(NODE, addr, &ca.tls(&ca.issue(&[CONTROLLER])), t);

    let start = Instant::now();
    let e = status(controller.volumes().await.unwrap_err());
    let took = start.elapsed();
    assert!(took < t.call + Duration::from_millis(500), "took {took:?}");
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("node-1 is unavailable"), "{}", e.message());

    let start = Instant::now();
    let e = status(
        controller
            .create_volume(new_volume("pvc-1", 1 << 20))
            .await
            .unwrap_err(),
    );
    let took = start.elapsed();
    assert!(took < t.storage + Duration::from_millis(500), "took {took:?}");
    assert_eq!(e.code(), Code::Unavailable);
    drop(hung);
}

/// The controller's name resolves to one loopback address.
struct Fixed(SocketAddr);

#[tonic::async_trait]
impl Resolve for Fixed {
    async fn resolve(&self, _: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
        Ok(vec![self.0])
    }
}

#[tokio::test]
async fn a_node_registers_over_mtls_and_the_controller_reaches_its_disk() {
    let ca = Authority::new("cellar test CA");
    let node_tls = ca.tls(&ca.issue(&[AGENT_SERVER_NAME]));
    let agent = start_agent(node_tls.clone()).await;
    let config = RegistryConfig {
        heartbeat_interval: Duration::from_millis(200),
        agent_timeouts: timeouts(),
        ..Default::default()
    };
    let RegistryUnderTest {
        registry,
        addr: registry_addr,
        _stop,
    } = start_registry(&ca, config).await;

    let config = HeartbeatConfig::new(
        HostPort::parse(&format!("cellar-controller:{}", registry_addr.port())).expect("controller"),
        node(),
        BTreeMap::from([("topology.cellar.csi.dev/node".to_string(), NODE.to_string())]),
        HostPort::parse(&agent.addr.to_string()).expect("agent address"),
    );
    let local: Arc<dyn Agent> = Arc::new(LocalAgent::new(agent.engine.clone()));
    let mut heartbeat =
        Heartbeat::with_resolver(config.clone(), node_tls, local.clone(), Arc::new(Fixed(registry_addr)));
    let round = heartbeat.beat().await;
    assert_eq!(round.acked, [registry_addr], "{round:?}");
    assert_eq!(heartbeat.interval(), Duration::from_millis(200));

    let info = registry.node(&node()).expect("registered");
    assert!(info.available);
    assert_eq!(info.report.pools.len(), 1);
    let node_agent = registry.agent(&node()).expect("known node");
    let rec = node_agent
        .create_volume(new_volume("pvc-7", 1 << 20))
        .await
        .expect("create");
    assert!(agent.engine.volume(&rec.id).is_some());

    // A node whose certificate is not from the CA cannot register.
    let rogue = Authority::new("someone else's CA");
    let rogue_leaf = rogue.issue(&[AGENT_SERVER_NAME]);
    let rogue_tls = Tls::from_pem(
        ca.pem().as_bytes(),
        rogue_leaf.cert.as_bytes(),
        rogue_leaf.key.as_bytes(),
    )
    .expect("tls");
    let mut impostor = HeartbeatConfig {
        node: NodeId::parse("node-evil").expect("node"),
        ..config
    };
    impostor.topology.clear();
    let mut heartbeat = Heartbeat::with_resolver(impostor, rogue_tls, local, Arc::new(Fixed(registry_addr)));
    assert_eq!(heartbeat.beat().await.failed, [registry_addr]);
    assert!(registry.node(&NodeId::parse("node-evil").expect("node")).is_none());
}

#[test]
fn tls_files_load_from_disk() {
    let ca = Authority::new("cellar test CA");
    let leaf = ca.issue(&[AGENT_SERVER_NAME]);
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let opts = TlsOptions {
        ca: Some(write("ca.pem", &ca.pem())),
        cert: Some(write("tls.crt", &leaf.cert)),
        key: Some(write("tls.key", &leaf.key)),
        insecure: false,
    };
    let tls = opts.load().expect("load");
    assert_eq!(tls.scheme(), "https");
    let swapped = TlsOptions {
        key: opts.cert.clone(),
        ..opts
    };
    let e = swapped.load().unwrap_err();
    assert!(e.to_string().contains("tls.crt"), "{e}");
}

/// Rotated certificates (cert-manager renewing them, the chart's Secret updated in place): a
/// controller keeps its certificates while the files hold something that does not load, and once
/// they hold valid new material it stops gracefully and starts again in place (the same process:
/// its container carries on, and kubelet's restart back-off is not paid) with the new
/// certificates.
#[test]
fn a_controller_restarts_when_its_certificates_are_rotated() {
    let dir = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    let ca = Authority::new("rotation CA");
    let first = ca.issue(&["localhost"]);
    std::fs::write(d.join("ca.pem"), ca.pem()).expect("ca");
    std::fs::write(d.join("tls.pem"), &first.cert).expect("cert");
    std::fs::write(d.join("tls.key"), &first.key).expect("key");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let log = d.join("controller.log");
    let out = std::fs::File::create(&log).expect("log");
    let socket = d.join("c.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cellar"))
        .arg("controller")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--agent-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(d.join("data"))
        .arg("--tls-ca")
        .arg(d.join("ca.pem"))
        .arg("--tls-cert")
        .arg(d.join("tls.pem"))
        .arg("--tls-key")
        .arg(d.join("tls.key"))
        .env("CELLAR_TLS_CHECK_SECONDS", "1")
        .env("CELLAR_LOG", "info")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("start cellar controller");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "controller exited:\n{}",
            read_log()
        );
        assert!(Instant::now() < deadline, "no socket:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    }

    std::fs::write(d.join("tls.pem"), "not a certificate").expect("garbage");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "a file that does not load must not stop the controller:\n{}",
        read_log()
    );
    assert!(read_log().contains("do not load"), "{}", read_log());

    let second = ca.issue(&["localhost"]);
    std::fs::write(d.join("tls.key"), &second.key).expect("key");
    std::fs::write(d.join("tls.pem"), &second.cert).expect("cert");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log().contains("restarting in place") {
        if let Some(s) = child.try_wait().expect("wait") {
            panic!(
                "the controller exited ({s:?}) instead of starting again in place:\n{}",
                read_log()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the controller did not restart for the rotated certificates:\n{}",
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read_log().contains("certificate rotation"), "{}", read_log());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the controller exited after its restart:\n{}",
            read_log()
        );
        assert!(
            Instant::now() < deadline,
            "no socket after the restart:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same process serves on, with the new certificate: no rotation seen again.
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().expect("wait").is_none(), "{}", read_log());
    assert_eq!(
        read_log().matches("restarting in place").count(),
        1,
        "one restart for one rotation:\n{}",
        read_log()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A channel holding `leaf`, trusting the CA and expecting `server_name`, as an attacker holding
/// `leaf` would make one.
async fn raw_channel(ca: &Authority, leaf: &Pair, addr: SocketAddr, server_name: &str) -> tonic::transport::Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(tonic::transport::Identity::from_pem(&leaf.cert, &leaf.key))
        .domain_name(server_name);
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("the handshake itself succeeds: the certificate is from the CA")
}

/// A raw agent client holding `leaf`.
async fn raw_agent(
    ca: &Authority,
    leaf: &Pair,
    addr: SocketAddr,
) -> v1::agent_client::AgentClient<tonic::transport::Channel> {
    v1::agent_client::AgentClient::new(raw_channel(ca, leaf, addr, AGENT_SERVER_NAME).await)
}

fn addressed<T>(msg: T, node: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(n) = node {
        req.metadata_mut()
            .insert(cellar::agent::remote::NODE_HEADER, n.parse().expect("header"));
    }
    req
}

/// A node's credentials (the shared node certificate, or one naming another node) on a node's
/// agent: listing, reading a volume's bytes (export) or its snapshots' extents (block ranges) and
/// deleting are all PERMISSION_DENIED, and the volume is untouched.
#[tokio::test]
async fn a_node_certificate_cannot_list_read_or_delete_another_nodes_volumes() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let controller = remote(NODE, agent.addr, &ca.tls(&ca.issue(&[CONTROLLER])), timeouts());
    let canary = controller
        .create_volume(new_volume("pvc-canary", 1 << 20))
        .await
        .expect("the controller creates");
    let canary_id = canary.id.clone();

    for leaf in [ca.issue(&[AGENT_SERVER_NAME]), ca.issue(&["node-2.cellar-agent"])] {
        let mut attacker = raw_agent(&ca, &leaf, agent.addr).await;
        let e = attacker
            .list_volumes(addressed(v1::ListVolumesRequest::default(), Some(NODE)))
            .await
            .expect_err("list");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("only the controller"), "{}", e.message());
        let export = v1::ExportDataRequest {
            source: Some(v1::ContentSource {
                kind: Some(v1::content_source::Kind::VolumeId(canary.id.to_string())),
            }),
        };
        let e = attacker
            .export_data(addressed(export, Some(NODE)))
            .await
            .expect_err("export");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let ranges = v1::BlockRangesRequest {
            target_snapshot_id: "snap:local:node-1:default:any".into(),
            ..Default::default()
        };
        let e = attacker
            .block_ranges(addressed(ranges, Some(NODE)))
            .await
            .expect_err("block ranges");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let delete = v1::DeleteVolumeRequest {
            volume_id: canary.id.to_string(),
        };
        let e = attacker
            .delete_volume(addressed(delete, Some(NODE)))
            .await
            .expect_err("delete");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    assert!(agent.engine.volume(&canary_id).is_some(), "the volume is untouched");
}

#[tokio::test]
async fn a_call_without_the_node_header_is_invalid_argument() {
    let ca = Authority::new("cellar test CA");
    let agent = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let mut client = raw_agent(&ca, &ca.issue(&[CONTROLLER]), agent.addr).await;
    let e = client
        .list_volumes(addressed(v1::ListVolumesRequest::default(), None))
        .await
        .expect_err("no header");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("cellar-node header is required"),
        "{}",
        e.message()
    );
    client
        .list_volumes(addressed(v1::ListVolumesRequest::default(), Some(NODE)))
        .await
        .expect("with the header the controller is served");
}

/// A registry served over mutual TLS with the controller's certificate.
struct RegistryUnderTest {
    registry: Registry,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start_registry(ca: &Authority, config: RegistryConfig) -> RegistryUnderTest {
    let tls = ca.tls(&ca.issue(&[CONTROLLER]));
    let registry = Registry::new(config, tls.clone(), None);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let routes = Routes::new(registry.service());
    tokio::spawn(async move {
        serve(listener, tls, routes, async {
            let _ = stopped.await;
        })
        .await
        .expect("registry server");
    });
    RegistryUnderTest {
        registry,
        addr,
        _stop: stop,
    }
}

/// One Register call holding `leaf`, claiming to be `node` with its agent at `agent`.
async fn register(ca: &Authority, leaf: &Pair, at: SocketAddr, node: &str, agent: SocketAddr) -> Result<(), Status> {
    register_with(ca, leaf, at, node, agent, BTreeMap::new()).await
}

/// Register with these topology segments.
async fn register_with(
    ca: &Authority,
    leaf: &Pair,
    at: SocketAddr,
    node: &str,
    agent: SocketAddr,
    topology: BTreeMap<String, String>,
) -> Result<(), Status> {
    let channel = raw_channel(ca, leaf, at, CONTROLLER).await;
    v1::registry_client::RegistryClient::new(channel)
        .register(v1::NodeStatus {
            node_id: node.into(),
            topology,
            agent_address: agent.to_string(),
            pools: vec![],
            version: "test".into(),
            shut_pools: vec![],
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_heartbeat_larger_than_the_limit_is_out_of_range() {
    let ca = Authority::new("cellar test CA");
    let config = RegistryConfig {
        max_heartbeat_bytes: 4096,
        ..Default::default()
    };
    let r = start_registry(&ca, config).await;
    let somewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let leaf = ca.issue(&[AGENT_SERVER_NAME]);
    let huge = BTreeMap::from([("padding".to_string(), "x".repeat(8192))]);
    let e = register_with(&ca, &leaf, r.addr, NODE, somewhere, huge)
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert!(r.registry.nodes().is_empty());
    register(&ca, &leaf, r.addr, NODE, somewhere)
        .await
        .expect("a heartbeat within the limit");
}

fn node_id(n: &str) -> NodeId {
    NodeId::parse(n).expect("node id")
}

#[tokio::test]
async fn a_node_certificate_registers_only_as_its_own_node() {
    let ca = Authority::new("cellar test CA");
    let r = start_registry(&ca, RegistryConfig::default()).await;
    let node2 = ca.issue(&["node-2.cellar-agent"]);
    let somewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");

    let e = register(&ca, &node2, r.addr, "node-1", somewhere)
        .await
        .expect_err("node-2 claims node-1");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message().contains("only a node may register, and as itself"),
        "{}",
        e.message()
    );
    assert!(r.registry.node(&node_id("node-1")).is_none());

    register(&ca, &node2, r.addr, "node-2", somewhere)
        .await
        .expect("node-2 as itself");
    assert!(r.registry.node(&node_id("node-2")).is_some());

    // A certificate's names match without regard to case: another spelling of its own node id
    // would be another registry entry for the same certificate, as many as there are spellings.
    let node1 = ca.issue(&["node-1.cellar-agent"]);
    register(&ca, &node1, r.addr, "node-1", somewhere)
        .await
        .expect("node-1 as itself");
    let before = r.registry.nodes().len();
    for spelling in ["NODE-1", "Node-1", "nODe-1"] {
        let e = register(&ca, &node1, r.addr, spelling, somewhere)
            .await
            .expect_err("another spelling of node-1");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(
            e.message().contains("Kubernetes node names are lower case"),
            "{}",
            e.message()
        );
        assert!(r.registry.node(&node_id(spelling)).is_none());
    }
    assert_eq!(r.registry.nodes().len(), before, "no entry for another spelling");

    // Once node-2 proved itself, the certificate all nodes share cannot speak for it.
    let e = register(&ca, &ca.issue(&[AGENT_SERVER_NAME]), r.addr, "node-2", somewhere)
        .await
        .expect_err("the shared certificate claims node-2");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
}

#[tokio::test]
async fn the_controller_certificate_cannot_register_a_node() {
    let ca = Authority::new("cellar test CA");
    let r = start_registry(&ca, RegistryConfig::default()).await;
    let somewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let e = register(&ca, &ca.issue(&[CONTROLLER]), r.addr, "node-1", somewhere)
        .await
        .expect_err("not a node");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(r.registry.nodes().is_empty());
}

#[tokio::test]
async fn a_registry_requiring_node_certificates_refuses_the_shared_one() {
    let ca = Authority::new("cellar test CA");
    let config = RegistryConfig {
        require_node_certificates: true,
        ..Default::default()
    };
    let r = start_registry(&ca, config).await;
    let somewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let e = register(&ca, &ca.issue(&[AGENT_SERVER_NAME]), r.addr, "node-1", somewhere)
        .await
        .expect_err("shared certificate");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("--require-node-certificates"), "{}", e.message());
    register(&ca, &ca.issue(&["node-1.cellar-agent"]), r.addr, "node-1", somewhere)
        .await
        .expect("its own certificate");
}

/// With `--agent-address-is-peer` a node cannot have the controller dial a host of its choosing:
/// a heartbeat over real TLS from 127.0.0.1 advertising 127.0.0.2 is refused, and registers
/// nothing; its own address is taken. Without the flag the same heartbeat is taken.
#[tokio::test]
async fn an_agent_address_other_than_the_heartbeats_is_refused_when_asked() {
    let ca = Authority::new("cellar test CA");
    let leaf = ca.issue(&["node-1.cellar-agent"]);
    let elsewhere: SocketAddr = "127.0.0.2:9".parse().expect("addr");
    let config = RegistryConfig {
        agent_address_is_peer: true,
        ..Default::default()
    };
    let r = start_registry(&ca, config).await;
    let e = register(&ca, &leaf, r.addr, "node-1", elsewhere)
        .await
        .expect_err("another host");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("advertise 127.0.0.1:9"), "{}", e.message());
    assert!(r.registry.nodes().is_empty(), "nothing registered");
    register(&ca, &leaf, r.addr, "node-1", "127.0.0.1:9".parse().expect("addr"))
        .await
        .expect("its own address");
    let open = start_registry(&ca, RegistryConfig::default()).await;
    register(&ca, &leaf, open.addr, "node-1", elsewhere)
        .await
        .expect("not asked to check");
}

/// A node that registered with its own certificate is dialled expecting that certificate: another
/// node answering at its address (a reused IP, a forged advertise address) is refused by the
/// controller, and the real node is served.
#[tokio::test]
async fn the_controller_dials_a_node_with_its_own_certificate_by_its_name() {
    let ca = Authority::new("cellar test CA");
    let config = RegistryConfig {
        agent_timeouts: timeouts(),
        ..Default::default()
    };
    let r = start_registry(&ca, config).await;
    let node1 = ca.issue(&["node-1.cellar-agent"]);
    // node-2's agent, holding node-2's own certificate, answers at the address node-1 gives.
    let impostor = start_agent_of(NODE, ca.tls(&ca.issue(&["node-2.cellar-agent"]))).await;
    register(&ca, &node1, r.addr, NODE, impostor.addr)
        .await
        .expect("node-1 registers");
    let via_registry = r.registry.agent(&node()).expect("known");
    let e = status(
        via_registry
            .create_volume(new_volume("pvc-1", 1 << 20))
            .await
            .expect_err("the impostor must not be served"),
    );
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(impostor.engine.volumes().is_empty());

    let real = start_agent_of(NODE, ca.tls(&node1)).await;
    register(&ca, &node1, r.addr, NODE, real.addr)
        .await
        .expect("node-1 moves");
    via_registry
        .create_volume(new_volume("pvc-1", 1 << 20))
        .await
        .expect("the real node-1 is served");
    assert_eq!(real.engine.volumes().len(), 1);
}

/// A controller over a registry holding node-1 (a real agent, little room) and node-2 (heartbeats
/// saying it has the most room, but its agent never answers: it accepts TCP and says nothing).
struct HungNodeCluster {
    controller: cellar::controller::ControllerService,
    registry: Registry,
    node1: AgentUnderTest,
    _hung: std::net::TcpListener,
}

async fn hung_node_cluster() -> HungNodeCluster {
    let ca = Authority::new("cellar test CA");
    let node1 = start_agent(ca.tls(&ca.issue(&[AGENT_SERVER_NAME]))).await;
    let t = Timeouts {
        connect: Duration::from_secs(1),
        call: Duration::from_secs(1),
        storage: Duration::from_secs(2),
        listing: Timeouts::LISTING_CALLS * Duration::from_secs(1),
    };
    let config = RegistryConfig {
        agent_timeouts: t,
        ..Default::default()
    };
    let registry = Registry::new(config, ca.tls(&ca.issue(&[CONTROLLER])), None);
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let pools = node1.engine.pool_status().expect("pools");
    let mut roomy = pools.clone();
    roomy[0].available_bytes = 1 << 40;
    roomy[0].total_bytes = 1 << 40;
    for (node, addr, pools) in [
        ("node-1", node1.addr, pools),
        ("node-2", hung.local_addr().expect("addr"), roomy),
    ] {
        registry
            .heartbeat(cellar::agent::registry::NodeReport {
                node: node_id(node),
                topology: BTreeMap::from([(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), node.to_string())]),
                agent_address: HostPort::parse(&addr.to_string()).expect("address"),
                pools,
                version: "test".into(),
                shut_pools: Vec::new(),
            })
            .expect("heartbeat");
    }
    HungNodeCluster {
        controller: cellar::controller::ControllerService::new(Arc::new(registry.clone())),
        registry,
        node1,
        _hung: hung,
    }
}

fn csi_create(name: &str) -> cellar::csi::v1::CreateVolumeRequest {
    use cellar::csi::v1::{volume_capability, CapacityRange as Range, CreateVolumeRequest, VolumeCapability};
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(Range {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    }
}

/// Capacity comes from the nodes' heartbeats, except for the node asked about, which answers live:
/// a node whose agent hangs counts in the cluster's capacity as its heartbeat says, and does not
/// delay a question about another node.
#[tokio::test]
async fn get_capacity_reads_heartbeats_and_asks_only_the_node_in_question() {
    use cellar::csi::v1::controller_server::Controller;
    use cellar::csi::v1::{GetCapacityRequest, Topology};
    let c = hung_node_cluster().await;
    let on = |node: &str| GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: [(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into(),
        }),
        ..Default::default()
    };
    let all = c
        .controller
        .get_capacity(tonic::Request::new(GetCapacityRequest::default()))
        .await
        .expect("the cluster's capacity")
        .into_inner();
    assert!(all.available_capacity > 1 << 40, "{all:?}");
    // A topology without the node key names no node: it is taken as none, as placement takes it,
    // not as a node that has nothing.
    let zone_only = GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: [("topology.kubernetes.io/zone".to_string(), "a".to_string())].into(),
        }),
        ..Default::default()
    };
    let zone = c
        .controller
        .get_capacity(tonic::Request::new(zone_only))
        .await
        .expect("a zone-only topology's capacity")
        .into_inner();
    // (node-1's figure moves with its heartbeats, node-2's claimed room is what passes 2^40.)
    assert!(zone.available_capacity > 1 << 40, "every node counts: {zone:?}");
    assert!(zone.maximum_volume_size >= Some(1 << 40), "{zone:?}");
    let node1 = c
        .controller
        .get_capacity(tonic::Request::new(on("node-1")))
        .await
        .expect("node-1's capacity")
        .into_inner();
    assert!(
        node1.available_capacity > 0 && node1.available_capacity < 1 << 40,
        "{node1:?}"
    );
    assert!(!c.registry.is_unreachable(&node_id("node-2")), "node-2 was not asked");
    let e = c
        .controller
        .get_capacity(tonic::Request::new(on("node-2")))
        .await
        .expect_err("node-2 itself is asked");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
}

/// Placement reads the heartbeats' figures, in which the hung node has the most room; but the
/// name lookup every CreateVolume makes on every node (in parallel, each call bounded) finds its
/// agent silent, which takes it out of placement until its agent answers again (the registry's
/// sweeper probes it), so the volume is made on node-1. The hung node still heartbeats.
#[tokio::test]
async fn a_node_whose_agent_does_not_answer_is_not_picked_though_its_heartbeat_has_the_most_room() {
    use cellar::csi::v1::controller_server::Controller;
    let c = hung_node_cluster().await;
    for name in ["pvc-1", "pvc-2"] {
        let made = c
            .controller
            .create_volume(tonic::Request::new(csi_create(name)))
            .await
            .expect("made on node-1")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(made.volume_id, format!("local:node-1:default:{name}"));
    }
    assert!(c.registry.is_unreachable(&node_id("node-2")));
    assert!(c.registry.is_available(&node_id("node-2")), "it still heartbeats");
    assert!(!c.registry.is_unreachable(&node_id("node-1")));
    assert_eq!(c.node1.engine.volumes().len(), 2);
}

/// The agent's port drops connections that say nothing (not even the TLS handshake) after its idle
/// timeout and holds at most its cap at once: many such connections do not keep the controller out.
#[tokio::test]
async fn silent_connections_beyond_the_agents_cap_are_dropped_and_the_controller_is_served() {
    use cellar::agent::server::serve_within;
    use cellar::server::SocketLimits;
    use tokio::io::AsyncReadExt;
    let ca = Authority::new("cellar test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(LocalEngine::open(node(), &Config::default_for(dir.path())).expect("engine"));
    let tls = ca.tls(&ca.issue(&[AGENT_SERVER_NAME]));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let routes = Routes::new(AgentService::new(engine).into_server(tls.callers(CONTROLLER)));
    let limits = SocketLimits {
        idle_timeout: Duration::from_secs(1),
        max_connections: 4,
        max_per_peer: 0,
    };
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_within(listener, limits, tls, routes, async {
            let _ = stopped.await;
        })
        .await
        .expect("agent server");
    });
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let controller = remote(
        NODE,
        addr,
        &ca.tls(&ca.issue(&[CONTROLLER])),
        Timeouts {
            connect: Duration::from_secs(30),
            call: Duration::from_secs(30),
            storage: Duration::from_secs(30),
            listing: Timeouts::LISTING_CALLS * Duration::from_secs(30),
        },
    );
    assert!(controller.volumes().await.expect("served").is_empty());
    for (i, conn) in silent.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "silent connection {i} is still open: {read:?}"
        );
    }
}

// ------------------------------------------------------------------ a compromised node's answers

/// A node whose root an attacker holds: it has only its own certificate (`node-1.cellar-agent`),
/// so all it can do is answer the controller's calls as it likes. The controller checks every
/// record it answers against what that node can hold (`RemoteAgent`) and asks only the nodes the
/// request's topology admits whether a name is taken.
mod lying_node {
    use super::*;
    use cellar::agent::registry::{NodeIdentity, NodeReport};
    use cellar::agent::{Frames, RangeBatches, Rendezvous};
    use cellar::controller::ControllerService;
    use cellar::csi::v1::controller_server::Controller;
    use cellar::csi::v1::{
        CreateSnapshotRequest, CreateVolumeRequest, ListVolumesRequest, Topology, TopologyRequirement,
    };
    use cellar::storage::cbt::{MetadataError, Query};
    use cellar::storage::engine::{BackupRequest, Condition, Mutable, NewGroup, PoolStatus, Source};
    use cellar::storage::id::{BackupId, GroupId, Key, Location, ObjectId, PoolName, SnapshotId, StaticId};
    use cellar::storage::record::{
        AccessMode, BackupMark, GroupRecord, Layout, SnapshotRecord, VolumeMode, VolumeRecord, RECORD_VERSION,
    };

    /// node-2's volume and snapshot that node-1 tries to pass off as its own.
    const VICTIM: &str = "local:node-2:default:pvc-victim";
    const VICTIM_SNAPSHOT: &str = "snap:local:node-2:default:snap-victim";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Lie {
        /// Every name lookup finds node-2's victim under the name asked, and every record it
        /// answers otherwise names node-2 (its own volumes and snapshots, moved there).
        OtherNode,
        /// Every name lookup finds a volume of its own under the name asked (which passes every
        /// check on the record): every name is taken, here.
        EveryName,
        /// Lookups answer another name than the one asked; creates answer another name, or
        /// another pool.
        Misnamed,
        /// Listings and lookups also carry a shared pool's records, as an honest node's do (it
        /// opens the shared pools whose volumes it publishes).
        SharedToo,
        /// Its snapshots (and every snapshot name lookup) name node-2's victim as their source
        /// volume, though they are node-1's own.
        OtherSource,
        /// Not a lie: a node with many volumes (6,000 more of its own), more than one page holds.
        Many,
        /// Its backups are cut honestly, but it answers them with the id of node-2's backup
        /// [`VICTIM_BACKUP`].
        ForeignBackup,
        /// Its changed block answers are the `n`th of [`BAD_RANGES`].
        BadRanges(usize),
        /// Honest until [`DRIPPING`] is set; then each page of its volume listing comes just
        /// within the call timeout, and there is always more ([`drip`]).
        Drip,
        /// Each page of its snapshot listing comes just within the call timeout, and there is
        /// always more ([`drip`]).
        DripSnapshots,
        /// Lists page after page of its own volumes, each record at the bounds of its
        /// parameters: more than the controller may hold of one node's listing.
        Fat,
        /// Not a lie: 5,000 volumes of its own, each abnormal with a 2 KiB message.
        Loud,
        /// Not a lie: a node whose listing is at its bound (`NodeListing` of no volume), which
        /// refuses every new volume as full.
        Full,
    }

    /// What a [`Lie::Fat`] node lists: `FAT_PER_CALL` records a call, further on each call, up to
    /// `FAT_RECORDS`.
    const FAT_PER_CALL: usize = 20;
    const FAT_RECORDS: usize = 8000;
    static FAT_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Parameters at their bounds: as many as a record may carry, as long as they may be.
    fn fat_parameters() -> BTreeMap<String, String> {
        let n = cellar::agent::wire::MAX_PARAMETERS;
        let value = cellar::agent::wire::MAX_PARAMETER_BYTES / n - 8;
        (0..n).map(|i| (format!("p{i:02}"), "v".repeat(value))).collect()
    }

    /// Whether the [`Lie::Drip`] node drips now.
    static DRIPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    /// How many volume listing calls a dripping node has answered.
    static DRIPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    /// How many snapshot listing calls a dripping node has answered.
    static SNAPSHOT_DRIPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A listing of a node that never ends: each call comes just within the call timeout
    /// ([`timeouts`]) with records further on than the last call's, more than a page of them, so
    /// that whatever page is asked, more remain (each record's id is its own and in order, as the
    /// controller checks).
    async fn drip<T>(calls: &std::sync::atomic::AtomicUsize, record: impl Fn(usize) -> T) -> Vec<T> {
        const PER_CALL: usize = 6000; // more than a page of 256 KiB holds
        let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(timeouts().call - Duration::from_millis(500)).await;
        (call * PER_CALL..(call + 2) * PER_CALL).map(record).collect()
    }

    /// One message of ranges, (offset, length) each.
    type Batch = &'static [(u64, u64)];

    /// Answers no honest walk gives: a capacity past 2^63, a range of no bytes, one overlapping
    /// the last, one past the capacity, one out of order in a later message, and (the last, made
    /// by the liar: [`TOO_MANY_RANGES`]) a message of more ranges than the controller asks a node
    /// for (it asks for full batches and cuts them to the client's `max_results` itself).
    const BAD_RANGES: [(u64, &[Batch]); 6] = [
        (u64::MAX, &[&[(0, 4096)]]),
        (1 << 20, &[&[(0, 4096), (8192, 0)]]),
        (1 << 20, &[&[(0, 4096), (2048, 4096)]]),
        (1 << 20, &[&[((1 << 20) - 4096, 8192)]]),
        (1 << 20, &[&[(8192, 4096)], &[(0, 4096)]]),
        (1 << 40, &[]),
    ];
    /// The entry of [`BAD_RANGES`] whose one message holds `MAX_BATCH + 1` ranges.
    const TOO_MANY_RANGES: usize = 5;

    /// node-2's backup, which node-1 answers as its own.
    const VICTIM_BACKUP: &str = "backup:offsite:0123-4567";

    struct Liar {
        honest: LocalAgent,
        lie: Lie,
    }

    fn volume_record(name: &str, id: &str) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            name: name.into(),
            id: VolumeId::parse(id).expect("volume id"),
            layout: Layout::Dir,
            capacity_bytes: 1 << 20,
            mode: VolumeMode::Filesystem,
            access_modes: vec![AccessMode::SingleNodeWriter],
            fs_type: String::new(),
            parameters: Default::default(),
            source: None,
            created_unix_secs: 0,
            delete_policy: None,
            compression: None,
            fs_bytes: 0,
        }
    }

    fn snapshot_record(name: &str, id: &str, source: &str) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            name: name.into(),
            id: SnapshotId::parse(id).expect("snapshot id"),
            source_volume_id: VolumeId::parse(source).expect("volume id"),
            size_bytes: 1 << 20,
            created_unix_secs: 0,
            created_nanos: 0,
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            fs_bytes: 0,
            group: None,
            backup: None,
        }
    }

    fn to_node_2(o: &ObjectId) -> ObjectId {
        ObjectId {
            location: Location::Local(node_id("node-2")),
            ..o.clone()
        }
    }

    impl Liar {
        fn volume(&self, mut r: VolumeRecord) -> VolumeRecord {
            if self.lie == Lie::OtherNode {
                r.id = VolumeId(to_node_2(&r.id.0));
            }
            r
        }

        fn snapshot(&self, mut r: SnapshotRecord) -> SnapshotRecord {
            match self.lie {
                Lie::OtherNode => r.id = SnapshotId(to_node_2(&r.id.0)),
                Lie::Misnamed => r.name = "snap-other".into(),
                _ => {}
            }
            r
        }
    }

    #[tonic::async_trait]
    impl Agent for Liar {
        fn node(&self) -> &NodeId {
            self.honest.node()
        }
        async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
            let asked_pool = req.pool.is_some();
            let mut r = self.volume(self.honest.create_volume(req).await?);
            if self.lie == Lie::Misnamed {
                match asked_pool {
                    true => r.id.0.pool = PoolName::parse("elsewhere").expect("pool"),
                    false => r.name = "pvc-other".into(),
                }
            }
            Ok(r)
        }
        async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
            self.honest.delete_volume(id).await
        }
        async fn expand_volume(
            &self,
            id: VolumeId,
            range: CapacityRange,
        ) -> Result<(VolumeRecord, bool), StorageError> {
            let (r, grow) = self.honest.expand_volume(id, range).await?;
            Ok((self.volume(r), grow))
        }
        async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError> {
            Ok(self.volume(self.honest.modify_volume(id, m).await?))
        }
        async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
            let found = self.honest.volume(id).await?;
            Ok(found.map(|(r, c)| (self.volume(r), c)))
        }
        async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
            let healthy = Condition {
                abnormal: false,
                message: String::new(),
            };
            if self.lie == Lie::Fat {
                let call = FAT_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let parameters = fat_parameters();
                return Ok((call * FAT_PER_CALL..((call + 2) * FAT_PER_CALL).min(FAT_RECORDS))
                    .map(|i| {
                        let name = format!("pvc-fat-{i:08}");
                        let mut r = volume_record(&name, &format!("local:node-1:default:{name}"));
                        r.parameters = parameters.clone();
                        (r, healthy.clone())
                    })
                    .collect());
            }
            if self.lie == Lie::Loud {
                let loud = Condition {
                    abnormal: true,
                    message: "y".repeat(2 << 10),
                };
                return Ok((0..5000)
                    .map(|i| {
                        let name = format!("pvc-loud-{i:05}");
                        (
                            volume_record(&name, &format!("local:node-1:default:{name}")),
                            loud.clone(),
                        )
                    })
                    .collect());
            }
            if self.lie == Lie::Drip && DRIPPING.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(drip(&DRIPS, |i| {
                    let name = format!("pvc-drip-{i:08}");
                    (
                        volume_record(&name, &format!("local:node-1:default:{name}")),
                        healthy.clone(),
                    )
                })
                .await);
            }
            let mut all: Vec<_> = self
                .honest
                .volumes()
                .await?
                .into_iter()
                .map(|(r, c)| (self.volume(r), c))
                .collect();
            let healthy = || Condition {
                abnormal: false,
                message: "volume is healthy".into(),
            };
            match self.lie {
                Lie::OtherNode => all.push((volume_record("pvc-victim", VICTIM), healthy())),
                Lie::SharedToo => all.push((volume_record("pvc-shared", "shared:share:pvc-shared"), healthy())),
                Lie::Many => {
                    for i in 0..6000 {
                        let name = format!("pvc-many-{i:05}");
                        all.push((volume_record(&name, &format!("local:node-1:default:{name}")), healthy()));
                    }
                }
                _ => {}
            }
            Ok(all)
        }
        async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
            let key = Key::from_name(&name);
            Ok(match self.lie {
                Lie::OtherNode => Some(volume_record(&name, VICTIM)),
                Lie::EveryName => Some(volume_record(&name, &format!("local:node-1:default:{}", key.as_str()))),
                Lie::Misnamed => Some(volume_record("pvc-other", "local:node-1:default:pvc-other")),
                Lie::SharedToo => Some(volume_record(&name, &format!("shared:share:{}", key.as_str()))),
                Lie::Many
                | Lie::OtherSource
                | Lie::ForeignBackup
                | Lie::BadRanges(_)
                | Lie::Drip
                | Lie::DripSnapshots
                | Lie::Fat
                | Lie::Loud
                | Lie::Full => self.honest.volume_named(name).await?,
            })
        }
        async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError> {
            let key = Key::from_name(&name);
            Ok(match self.lie {
                Lie::OtherNode => Some(snapshot_record(&name, VICTIM_SNAPSHOT, VICTIM)),
                Lie::OtherSource => Some(snapshot_record(
                    &name,
                    &format!("snap:local:node-1:default:{}", key.as_str()),
                    VICTIM,
                )),
                Lie::SharedToo => Some(snapshot_record(
                    &name,
                    "snap:shared:share:snap-shared",
                    "shared:share:pvc-shared",
                )),
                _ => self.honest.snapshot_named(name).await?.map(|s| self.snapshot(s)),
            })
        }
        async fn create_snapshot(
            &self,
            name: String,
            source: VolumeId,
            freeze: bool,
            backup: Option<BackupRequest>,
        ) -> Result<SnapshotRecord, StorageError> {
            if self.lie == Lie::ForeignBackup {
                let mut made = self.honest.create_snapshot(name, source, freeze, None).await?;
                made.backup = backup.map(|_| BackupMark {
                    id: BackupId::parse(VICTIM_BACKUP).expect("backup id"),
                    keep_local: false,
                    uploaded: true,
                });
                return Ok(made);
            }
            let made = self.honest.create_snapshot(name, source, freeze, backup).await?;
            Ok(self.snapshot(made))
        }
        async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError> {
            self.honest.delete_snapshot(id).await
        }
        async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
            if self.lie == Lie::DripSnapshots {
                return Ok(drip(&SNAPSHOT_DRIPS, |i| {
                    let id = format!("snap:local:node-1:default:snap-drip-{i:08}");
                    snapshot_record(&format!("snap-drip-{i:08}"), &id, "local:node-1:default:pvc-src")
                })
                .await);
            }
            let mut all: Vec<_> = self
                .honest
                .snapshots()
                .await?
                .into_iter()
                .map(|s| self.snapshot(s))
                .collect();
            match self.lie {
                Lie::OtherNode => all.push(snapshot_record("snap-victim", VICTIM_SNAPSHOT, VICTIM)),
                Lie::OtherSource => all.push(snapshot_record(
                    "snap-own",
                    "snap:local:node-1:default:snap-own",
                    VICTIM,
                )),
                Lie::SharedToo => all.push(snapshot_record(
                    "snap-shared",
                    "snap:shared:share:snap-shared",
                    "shared:share:pvc-shared",
                )),
                _ => {}
            }
            Ok(all)
        }
        async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
            self.honest.pools().await
        }
        async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError> {
            self.honest.static_exists(id).await
        }
        async fn export_data(&self, source: Source) -> Result<Frames, StorageError> {
            self.honest.export_data(source).await
        }
        async fn import_volume(&self, req: NewVolume, frames: Frames) -> Result<VolumeRecord, StorageError> {
            Ok(self.volume(self.honest.import_volume(req, frames).await?))
        }
        async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError> {
            self.honest.create_group(req).await
        }
        async fn delete_group(&self, id: GroupId) -> Result<(), StorageError> {
            self.honest.delete_group(id).await
        }
        async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError> {
            self.honest.group(id).await
        }
        async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError> {
            self.honest.group_named(name).await
        }
        async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError> {
            let Lie::BadRanges(n) = self.lie else {
                return self.honest.block_ranges(q, max).await;
            };
            let (capacity, batches) = BAD_RANGES[n];
            let mut batches: Vec<Result<Vec<(u64, u64)>, MetadataError>> =
                batches.iter().map(|b| Ok(b.to_vec())).collect();
            if n == TOO_MANY_RANGES {
                let many = (0..=cellar::storage::cbt::MAX_BATCH as u64).map(|i| (i * 8192, 4096));
                batches.push(Ok(many.collect()));
            }
            Ok((capacity, Box::pin(tokio_stream::iter(batches))))
        }
        async fn cut_group_part(
            &self,
            id: GroupId,
            req: NewGroup,
            meet: Arc<Rendezvous>,
        ) -> Result<Vec<SnapshotRecord>, StorageError> {
            self.honest.cut_group_part(id, req, meet).await
        }
        async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError> {
            self.honest.put_group(rec).await
        }
        async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError> {
            self.honest.delete_group_part(id, members).await
        }
    }

    /// node-1's agent telling `lie`, serving the controller with node-1's own certificate.
    async fn start_liar(ca: &Authority, lie: Lie) -> AgentUnderTest {
        let dir = tempfile::Builder::new()
            .prefix("cellar-agent-liar-")
            .tempdir()
            .expect("tempdir");
        let engine = Arc::new(LocalEngine::open(node(), &Config::default_for(dir.path())).expect("engine"));
        let honest = match lie {
            Lie::Full => LocalAgent::listed_within(engine.clone(), NodeListing { records: 0, bytes: 0 }),
            _ => LocalAgent::new(engine.clone()),
        };
        let liar = Liar { honest, lie };
        let tls = ca.tls(&ca.issue(&["node-1.cellar-agent"]));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let routes = Routes::new(AgentService::over(Arc::new(liar)).into_server(tls.callers(CONTROLLER)));
        tokio::spawn(async move {
            serve(listener, tls, routes, async {
                let _ = stopped.await;
            })
            .await
            .expect("agent server");
        });
        AgentUnderTest {
            addr,
            engine,
            _stop: stop,
            _dir: dir,
        }
    }

    /// The controller's client of the lying node-1, expecting node-1's own certificate.
    fn client(ca: &Authority, liar: &AgentUnderTest) -> RemoteAgent {
        let address = HostPort::parse(&liar.addr.to_string()).expect("address");
        let tls = ca.tls(&ca.issue(&[CONTROLLER]));
        RemoteAgent::new(node(), address, &tls, "node-1.cellar-agent", timeouts()).expect("client")
    }

    /// A bad answer from node-1: INTERNAL naming the node and `why`.
    fn refused(e: StorageError, why: &str) {
        let s = status(e);
        assert_eq!(s.code(), Code::Internal, "{}", s.message());
        assert!(s.message().contains("on node node-1"), "{}", s.message());
        assert!(s.message().contains(why), "{}", s.message());
    }

    /// A node's listing comes in pages of at most 256 KiB (the controller decodes no answer of a
    /// listing past 512 KiB, so a lying node cannot make it decode gigabytes of empty records):
    /// 6,000 volumes, some 900 KiB, arrive whole, once each, in id order.
    #[tokio::test]
    async fn a_listing_larger_than_a_page_arrives_whole_in_pages() {
        let ca = Authority::new("cellar test CA");
        let node = start_liar(&ca, Lie::Many).await;
        let c = client(&ca, &node);
        let listed = c.volumes().await.expect("ListVolumes in pages");
        let ids: Vec<String> = listed.iter().map(|(r, _)| r.id.to_string()).collect();
        assert_eq!(ids.len(), 6000);
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(ids, sorted, "in id order, each once");
    }

    #[tokio::test]
    async fn records_a_node_answers_about_another_node_are_refused() {
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, Lie::OtherNode).await;
        let c = client(&ca, &liar);
        let elsewhere = "is not on node node-1";

        refused(c.volume_named("pvc-new".into()).await.unwrap_err(), elsewhere);
        refused(
            c.create_volume(new_volume("pvc-new", 1 << 20)).await.unwrap_err(),
            elsewhere,
        );
        refused(c.volumes().await.unwrap_err(), elsewhere);
        let made = VolumeId::parse("local:node-1:default:pvc-new").expect("id");
        refused(c.volume(made.clone()).await.unwrap_err(), elsewhere);
        let grow = CapacityRange {
            required: 2 << 20,
            limit: 0,
        };
        refused(c.expand_volume(made.clone(), grow).await.unwrap_err(), elsewhere);
        refused(
            c.create_snapshot("snap-new".into(), made, false, None)
                .await
                .unwrap_err(),
            elsewhere,
        );
        refused(c.snapshot_named("snap-new".into()).await.unwrap_err(), elsewhere);
        refused(c.snapshots().await.unwrap_err(), elsewhere);
    }

    /// A snapshot is cut in its source volume's pool: a node's snapshot record naming another
    /// node's volume as its source is a bad answer, never handed to the CO (which would show a
    /// snapshot of node-2's volume that node-2 never cut, and restore it as such).
    /// A node's changed block ranges reach a backup tool only as the spec has them: in order,
    /// none empty or overlapping, within the capacity, no more per message than asked for.
    #[tokio::test]
    async fn changed_block_ranges_a_node_answers_out_of_shape_are_refused() {
        use tokio_stream::StreamExt;
        let ca = Authority::new("cellar test CA");
        for n in 0..BAD_RANGES.len() {
            let liar = start_liar(&ca, Lie::BadRanges(n)).await;
            let c = client(&ca, &liar);
            let q = Query {
                base: None,
                target: SnapshotId::parse("snap:local:node-1:default:any").expect("id"),
                starting_offset: 0,
            };
            let e = match c.block_ranges(q, 2).await {
                Err(e) => e,
                Ok((_, mut batches)) => loop {
                    match batches.next().await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break e,
                        None => panic!("answer {n} of BAD_RANGES passed whole"),
                    }
                },
            };
            let MetadataError::Storage(e) = e else {
                panic!("answer {n}: {e}")
            };
            refused(e, "bad answer");
        }
    }

    #[tokio::test]
    async fn a_snapshot_a_node_says_it_cut_of_another_nodes_volume_is_refused() {
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, Lie::OtherSource).await;
        let c = client(&ca, &liar);
        let why = "names the source volume local:node-2:default:pvc-victim";
        refused(c.snapshot_named("snap-new".into()).await.unwrap_err(), why);
        refused(c.snapshots().await.unwrap_err(), why);
    }

    #[tokio::test]
    async fn a_lookup_or_create_answering_another_name_or_pool_is_refused() {
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, Lie::Misnamed).await;
        let c = client(&ca, &liar);

        refused(c.volume_named("pvc-a".into()).await.unwrap_err(), "named 'pvc-other'");
        refused(
            c.create_volume(new_volume("pvc-a", 1 << 20)).await.unwrap_err(),
            "named 'pvc-other'",
        );
        let mut in_default = new_volume("pvc-b", 1 << 20);
        in_default.pool = Some(PoolName::parse("default").expect("pool"));
        refused(
            c.create_volume(in_default).await.unwrap_err(),
            "asked for a volume in pool 'default'",
        );
        liar.engine
            .create_volume(new_volume("pvc-c", 1 << 20))
            .expect("a volume of node-1");
        let source = VolumeId::parse("local:node-1:default:pvc-c").expect("id");
        refused(
            c.create_snapshot("snap-c".into(), source, false, None)
                .await
                .unwrap_err(),
            "named 'snap-other'",
        );
    }

    /// An honest node lists the records of the shared pools it publishes besides its own: the
    /// controller lists those pools itself, so they are left out of the node's answers, which
    /// stay good.
    #[tokio::test]
    async fn a_shared_pools_records_in_a_nodes_answers_are_left_out() {
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, Lie::SharedToo).await;
        let c = client(&ca, &liar);
        let made = c.create_volume(new_volume("pvc-1", 1 << 20)).await.expect("create");
        let listed: Vec<VolumeRecord> = c.volumes().await.expect("list").into_iter().map(|(r, _)| r).collect();
        assert_eq!(listed, vec![made]);
        assert_eq!(c.volume_named("pvc-shared".into()).await.expect("lookup"), None);
        assert_eq!(c.snapshot_named("snap-shared".into()).await.expect("lookup"), None);
        assert!(c.snapshots().await.expect("list").is_empty());
    }

    /// A controller over a registry holding node-1 (lying as `lie`) and node-2 (honest, holding
    /// `pvc-victim`), each registered with its own certificate.
    struct Cluster {
        controller: ControllerService,
        registry: Arc<Registry>,
        liar: AgentUnderTest,
        node2: AgentUnderTest,
    }

    async fn cluster(lie: Lie) -> Cluster {
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, lie).await;
        let node2 = start_agent_of("node-2", ca.tls(&ca.issue(&["node-2.cellar-agent"]))).await;
        node2
            .engine
            .create_volume(new_volume("pvc-victim", 1 << 20))
            .expect("the victim");
        let config = RegistryConfig {
            agent_timeouts: timeouts(),
            ..Default::default()
        };
        let registry = Arc::new(Registry::new(config, ca.tls(&ca.issue(&[CONTROLLER])), None));
        for (name, agent) in [("node-1", &liar), ("node-2", &node2)] {
            let report = NodeReport {
                node: node_id(name),
                topology: BTreeMap::from([(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), name.to_string())]),
                agent_address: HostPort::parse(&agent.addr.to_string()).expect("address"),
                pools: agent.engine.pool_status().expect("pools"),
                version: "test".into(),
                shut_pools: Vec::new(),
            };
            registry
                .heartbeat_as(report, NodeIdentity::Own(format!("{name}.cellar-agent")))
                .expect("heartbeat");
        }
        Cluster {
            controller: ControllerService::new(registry.clone()),
            registry,
            liar,
            node2,
        }
    }

    /// A node at its listing bound answers a create RESOURCE_EXHAUSTED: free to choose, the
    /// controller passes over it for the next candidate (though node-1 reports the most room);
    /// the scheduler's choice of it is answered RESOURCE_EXHAUSTED, so the scheduler chooses
    /// another node.
    #[tokio::test]
    async fn a_full_node_is_passed_over_when_the_controller_may_choose() {
        let c = cluster(Lie::Full).await;
        let mut pools = c.liar.engine.pool_status().expect("pools");
        for p in &mut pools {
            p.available_bytes = u64::MAX / 4;
            p.image_allocatable_bytes = u64::MAX / 4;
        }
        c.registry
            .heartbeat_as(
                NodeReport {
                    node: node_id("node-1"),
                    topology: BTreeMap::from([(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), "node-1".to_string())]),
                    agent_address: HostPort::parse(&c.liar.addr.to_string()).expect("address"),
                    pools,
                    version: "test".into(),
                    shut_pools: Vec::new(),
                },
                NodeIdentity::Own("node-1.cellar-agent".into()),
            )
            .expect("heartbeat");
        let free = c
            .controller
            .create_volume(tonic::Request::new(csi_create("pvc-free")))
            .await
            .expect("made on the node that is not full")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(free.volume_id, "local:node-2:default:pvc-free");
        assert!(c.liar.engine.volumes().is_empty(), "nothing on the full node");
        let e = c
            .controller
            .create_volume(tonic::Request::new(placed(
                "pvc-pinned",
                "node-1",
                &["node-1", "node-2"],
            )))
            .await
            .expect_err("the scheduler chose the full node");
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("at most 0 volumes"), "{}", e.message());
        assert!(
            c.node2.engine.volume_named("pvc-pinned").is_none(),
            "not made elsewhere"
        );
    }

    /// node-1 answers a backup's CreateSnapshot with node-2's backup id: refused before the id
    /// reaches the CO (whose delete of it would forget node-2's backup), and node-2's backup stays.
    #[tokio::test]
    async fn a_backup_id_a_node_answers_must_be_its_own() {
        let c = cluster(Lie::ForeignBackup).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let password = dir.path().join("password");
        std::fs::write(&password, "a key that is long enough\n").expect("password");
        let repo = PoolName::parse("offsite").expect("name");
        let backups = Arc::new(cellar::backup::Backups::new(
            vec![cellar::backup::RepositoryConfig {
                name: repo.clone(),
                location: cellar::backup::Location::Path(dir.path().join("repo")),
                password_file: password,
            }],
            cellar::backup::Throttle::unlimited(),
        ));
        backups.open_or_init(&repo, true).expect("init");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data");
        std::fs::write(data.join("f"), b"node-2's data").expect("file");
        let victim = BackupId::parse(VICTIM_BACKUP).expect("id");
        let meta = cellar::backup::BackupMeta {
            name: "snap-victim".into(),
            source_volume_id: VICTIM.into(),
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 1 << 20,
            fs_bytes: 0,
            length: 0,
            node: "node-2".into(),
            path: cellar::backup::TREE_PATH.into(),
            root: None,
            chunk_bytes: None,
        };
        cellar::backup::upload::upload(&backups, &victim, &meta, &data, None, &Default::default())
            .expect("node-2's backup");
        let controller = c.controller.with_backups(backups.clone());
        c.liar
            .engine
            .create_volume(new_volume("pvc-own", 1 << 20))
            .expect("a volume of node-1");
        let e = controller
            .create_snapshot(tonic::Request::new(CreateSnapshotRequest {
                name: "snap-mine".into(),
                source_volume_id: "local:node-1:default:pvc-own".into(),
                parameters: [("backupRepository".to_string(), "offsite".to_string())].into(),
                ..Default::default()
            }))
            .await
            .expect_err("node-2's backup id is not node-1's to answer");
        assert_eq!(e.code(), Code::Internal, "{}", e.message());
        assert!(
            e.message().contains("holds it as node node-2's backup"),
            "{}",
            e.message()
        );
        assert!(backups.find(&victim).expect("find").is_some(), "node-2's backup stays");
    }

    fn on(node: &str) -> Topology {
        Topology {
            segments: [(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into(),
        }
    }

    /// A CreateVolume as external-provisioner sends it under WaitForFirstConsumer with `node`
    /// selected, `requisite` the nodes it may go to.
    fn placed(name: &str, node: &str, requisite: &[&str]) -> CreateVolumeRequest {
        CreateVolumeRequest {
            accessibility_requirements: Some(TopologyRequirement {
                requisite: requisite.iter().map(|n| on(n)).collect(),
                preferred: vec![on(node)],
            }),
            ..csi_create(name)
        }
    }

    #[tokio::test]
    async fn the_controller_hands_out_no_id_of_another_node_that_a_node_answers() {
        let c = cluster(Lie::OtherNode).await;

        // node-1 says every name is taken by node-2's victim, and answers its create with it.
        let e = c
            .controller
            .create_volume(tonic::Request::new(placed("pvc-new", "node-1", &["node-1", "node-2"])))
            .await
            .expect_err("node-1's answer names node-2's volume");
        assert_eq!(e.code(), Code::Internal, "{}", e.message());
        assert!(e.message().contains("is not on node node-1"), "{}", e.message());

        // Its listing names node-2's volume as its own: only node-2 lists it, as node-2's.
        let listed = c
            .controller
            .list_volumes(tonic::Request::new(ListVolumesRequest::default()))
            .await
            .expect("ListVolumes")
            .into_inner();
        let mut victims = 0;
        for v in listed.entries.iter().filter_map(|e| e.volume.as_ref()) {
            let id = VolumeId::parse(&v.volume_id).expect("a cellar id");
            let node = id.0.node().expect("a local volume").as_str();
            assert_eq!(
                v.accessible_topology,
                vec![on(node)],
                "{} listed as another node's",
                v.volume_id
            );
            victims += usize::from(v.volume_id == VICTIM);
        }
        assert_eq!(victims, 1, "{listed:?}");

        // A snapshot it cuts is named node-2's.
        c.liar
            .engine
            .create_volume(new_volume("pvc-mine", 1 << 20))
            .expect("a volume of node-1");
        let e = c
            .controller
            .create_snapshot(tonic::Request::new(CreateSnapshotRequest {
                name: "snap-new".into(),
                source_volume_id: "local:node-1:default:pvc-mine".into(),
                ..Default::default()
            }))
            .await
            .expect_err("node-1's snapshot is named node-2's");
        assert_eq!(e.code(), Code::Internal, "{}", e.message());

        let victim = VolumeId::parse(VICTIM).expect("id");
        assert!(c.node2.engine.volume(&victim).is_some(), "node-2's volume is untouched");
    }

    #[tokio::test]
    async fn a_node_outside_the_requisite_topology_cannot_draw_a_volume_by_claiming_its_name() {
        let c = cluster(Lie::EveryName).await;
        let made = c
            .controller
            .create_volume(tonic::Request::new(placed("pvc-w", "node-2", &["node-2"])))
            .await
            .expect("made on node-2")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(made.volume_id, "local:node-2:default:pvc-w");
        assert_eq!(made.accessible_topology, vec![on("node-2")]);
        assert!(c.liar.engine.volumes().is_empty(), "nothing on node-1");
    }

    /// What a CO's ListVolumes answers, asked once with no paging, within a generous bound that
    /// fails the test instead of hanging it.
    async fn listed_volumes(controller: &ControllerService) -> Vec<cellar::csi::v1::list_volumes_response::Entry> {
        tokio::time::timeout(
            Duration::from_secs(120),
            controller.list_volumes(tonic::Request::new(ListVolumesRequest::default())),
        )
        .await
        .expect("ListVolumes answers although node-1's listing never ends")
        .expect("ListVolumes")
        .into_inner()
        .entries
    }

    /// Each page of a node's listing had the call deadline, but the listing as a whole had none:
    /// node-1 answering every page just in time, always with more to come, held ListVolumes for
    /// every node of the cluster (up to MAX_LISTED_PER_NODE pages of 15 s each: weeks). Its whole
    /// listing now has a deadline of its own; past it node-1 counts as not answering, and its
    /// volumes are answered from its last listing, abnormal, as for a node that cannot be
    /// reached.
    #[tokio::test]
    async fn a_node_dripping_its_listing_does_not_hold_up_list_volumes() {
        let c = cluster(Lie::Drip).await;
        c.liar
            .engine
            .create_volume(new_volume("pvc-own", 1 << 20))
            .expect("a volume of node-1");
        let condition_of = |entries: &[cellar::csi::v1::list_volumes_response::Entry], id: &str| {
            let e = entries
                .iter()
                .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
                .unwrap_or_else(|| panic!("{id} listed: {entries:?}"));
            e.status.clone().and_then(|s| s.volume_condition).expect("a condition")
        };
        let honest = listed_volumes(&c.controller).await;
        assert!(!condition_of(&honest, "local:node-1:default:pvc-own").abnormal);

        DRIPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        let dripped = listed_volumes(&c.controller).await;
        assert!(
            DRIPS.load(std::sync::atomic::Ordering::SeqCst) > 1,
            "node-1 dripped pages"
        );
        assert!(!condition_of(&dripped, VICTIM).abnormal, "node-2 answers for itself");
        let own = condition_of(&dripped, "local:node-1:default:pvc-own");
        assert!(own.abnormal, "{own:?}");
        assert!(
            own.message.contains("cannot be checked") && own.message.contains("did not end within"),
            "{}",
            own.message
        );
        assert!(
            dripped
                .iter()
                .all(|e| !e.volume.as_ref().is_some_and(|v| v.volume_id.contains("drip"))),
            "nothing of the listing that never ended is shown"
        );
    }

    /// The same for ListSnapshots, which lists every node again for each page a CO asks: node-1
    /// dripping its snapshots held up every node's. Its listing now ends at the deadline, and node-1
    /// is left out (as a node that cannot be listed is); until it answers again it is not waited
    /// for at all.
    #[tokio::test]
    async fn a_node_dripping_its_snapshots_is_left_out_of_list_snapshots() {
        use cellar::csi::v1::ListSnapshotsRequest;
        let c = cluster(Lie::DripSnapshots).await;
        let victim = VolumeId::parse(VICTIM).expect("id");
        let kept = c
            .node2
            .engine
            .create_snapshot("snap-kept", &victim, false)
            .expect("node-2's snapshot");
        let list = || async {
            tokio::time::timeout(
                Duration::from_secs(120),
                c.controller
                    .list_snapshots(tonic::Request::new(ListSnapshotsRequest::default())),
            )
            .await
            .expect("ListSnapshots answers although node-1's listing never ends")
            .expect("ListSnapshots")
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
            .collect::<Vec<_>>()
        };
        assert_eq!(list().await, vec![kept.id.to_string()]);
        let dripped = SNAPSHOT_DRIPS.load(std::sync::atomic::Ordering::SeqCst);
        assert!(dripped > 1, "node-1 dripped pages");
        assert_eq!(list().await, vec![kept.id.to_string()]);
        assert_eq!(
            SNAPSHOT_DRIPS.load(std::sync::atomic::Ordering::SeqCst),
            dripped,
            "a node whose listing ran out of time is not asked again until it answers"
        );
    }

    /// A node's listing was kept whole, every record as decoded, until its last page, bounded only
    /// by MAX_LISTED_PER_NODE records: 60 pages of 430 KiB made the controller hold 254 MiB. Each
    /// record's fields are bounded now, and a listing that would hold more than
    /// MAX_LISTING_BYTES is refused: here a node listing thousands of records at the bounds of
    /// their parameters (some 120 MiB of them) costs the controller no more than the budget and a
    /// page.
    #[tokio::test]
    async fn a_nodes_listing_past_what_the_controller_keeps_of_one_node_is_refused() {
        use cellar::agent::remote::MAX_LISTING_BYTES;
        let ca = Authority::new("cellar test CA");
        let liar = start_liar(&ca, Lie::Fat).await;
        let c = client(&ca, &liar);
        let start = counting::start();
        let e = match c.volumes().await {
            Ok(all) => panic!("a listing of {} records kept whole", all.len()),
            Err(e) => e,
        };
        let peak = counting::peak_since(start);
        refused(e, &format!("holds more than {} MiB", MAX_LISTING_BYTES >> 20));
        assert!(
            FAT_CALLS.load(std::sync::atomic::Ordering::SeqCst) > 100,
            "pages listed"
        );
        assert!(
            peak <= MAX_LISTING_BYTES + (16 << 20),
            "one node's listing cost the controller {} MiB at its peak",
            peak >> 20
        );
    }

    /// A node's condition messages reached ListVolumes as they came, and an unpaged ListVolumes
    /// as large as the cluster: 12 volumes with 400 KiB messages made it larger than a gRPC client
    /// takes by default (4 MiB: the sidecars, csi-sanity), failing the listing of every node.
    /// Messages are now cut to MAX_MESSAGE as they are decoded, and every answer is cut by bytes
    /// with a token for the rest, asked for pages or not.
    #[tokio::test]
    async fn a_listing_larger_than_a_client_takes_comes_in_pages_even_unasked() {
        use cellar::csi::v1::controller_client::ControllerClient;
        use cellar::csi::v1::controller_server::ControllerServer;
        let c = cluster(Lie::Loud).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ControllerServer::new(c.controller))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut co = ControllerClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let (mut seen, mut token, mut answers) = (Vec::new(), String::new(), 0);
        loop {
            let page = co
                .list_volumes(ListVolumesRequest {
                    starting_token: token,
                    ..Default::default()
                })
                .await
                .expect("each answer within what a default client takes")
                .into_inner();
            answers += 1;
            for e in page.entries {
                let message = e
                    .status
                    .and_then(|s| s.volume_condition)
                    .map(|c| c.message)
                    .unwrap_or_default();
                assert!(
                    message.len() <= cellar::csi::status::MAX_MESSAGE + 64,
                    "{} bytes",
                    message.len()
                );
                seen.push(e.volume.expect("volume").volume_id);
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert!(answers > 1, "cut into pages unasked");
        let mut want: Vec<String> = (0..5000)
            .map(|i| format!("local:node-1:default:pvc-loud-{i:05}"))
            .chain([VICTIM.to_string()])
            .collect();
        want.sort();
        assert_eq!(seen, want, "every volume once, in order");
    }
}
