//! Node-to-node transfers (docs/security.md, "Transfer grants"): a node reads another node's
//! snapshot or volume only through that node's Transfer service, only with a grant the controller
//! signed for that one read by that one node, once, before it expires; and a node's certificate
//! reaches nothing else of another node. Each node here holds a certificate of its own
//! (`<node>.cellar-agent`). The real restore in split mode, pulled node to node and never through
//! the controller, is in tests/split.rs (`a_restore_onto_another_node_never_passes_through_the_controller`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cellar::agent::grant::{self, Claims};
use cellar::agent::remote::{HostPort, RemoteAgent, Timeouts, NODE_HEADER};
use cellar::agent::seal::MarkSeals;
use cellar::agent::server::{serve, AgentService, TransferService};
use cellar::agent::tls::Tls;
use cellar::agent::tls::AGENT_SERVER_NAME;
use cellar::agent::wire::v1;
use cellar::agent::LocalAgent;
use cellar::backup::{MarkAuthority, MarkTrust};
use cellar::storage::config::Config;
use cellar::storage::engine::{LocalEngine, NewVolume, Source};
use cellar::storage::id::BackupId;
use cellar::storage::id::{NodeId, SnapshotId};
use cellar::storage::transfer::{Frame, Verifier};
use common::certs::{Authority, Pair};
use tokio_stream::StreamExt;
use tonic::service::Routes;
use tonic::{Code, Status};

/// The controller's name, as the nodes know it (`--controller` host).
const CONTROLLER: &str = "cellar-controller";

fn node(n: &str) -> NodeId {
    NodeId::parse(n).expect("node id")
}

/// A node's own certificate names `<node>.cellar-agent`.
fn own_name(n: &str) -> String {
    format!("{n}.{}", AGENT_SERVER_NAME)
}

fn tls(ca: &Authority, pair: &Pair) -> Tls {
    Tls::from_pem(ca.pem().as_bytes(), pair.cert.as_bytes(), pair.key.as_bytes()).expect("tls")
}

fn new_volume(name: &str) -> NewVolume {
    NewVolume::plain(name, None, 16 << 20)
}

/// What the data looks like: bytes that differ from offset to offset.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed as usize) % 251) as u8 + 1).collect()
}

/// node-1's agent on 127.0.0.1, serving the controller (Agent) and granted nodes (Transfer), with
/// a snapshot of a volume holding a file, and another volume.
struct SourceNode {
    ca: Authority,
    controller: Tls,
    addr: SocketAddr,
    engine: Arc<LocalEngine>,
    snapshot: Source,
    other: Source,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl SourceNode {
    async fn start() -> SourceNode {
        let ca = Authority::new("cellar grants CA");
        let controller = tls(&ca, &ca.issue(&[CONTROLLER]));
        let own = tls(&ca, &ca.issue(&[&own_name("node-1")]));
        let dir = tempfile::Builder::new()
            .prefix("cellar-grants-")
            .tempdir()
            .expect("tempdir");
        let engine = Arc::new(LocalEngine::open(node("node-1"), &Config::default_for(dir.path())).expect("engine"));
        let src = engine.create_volume(new_volume("src")).expect("volume");
        std::fs::write(dir.path().join("pools/default/volumes/src/data"), pattern(3 << 20, 7)).expect("write");
        let snap = engine.create_snapshot("snap", &src.id, false).expect("snapshot");
        let other = engine.create_volume(new_volume("other")).expect("volume");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let local: Arc<dyn cellar::agent::Agent> = Arc::new(LocalAgent::new(engine.clone()));
        let gatekeeper = grant::Gatekeeper::new(node("node-1"), own.clone(), CONTROLLER);
        let routes = Routes::new(AgentService::over(local.clone()).into_server(own.callers(CONTROLLER)))
            .add_service(TransferService::new(local, gatekeeper).into_server());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            serve(listener, own, routes, async {
                let _ = stopped.await;
            })
            .await
            .expect("agent server");
        });
        SourceNode {
            ca,
            controller,
            addr,
            engine,
            snapshot: Source::Snapshot(snap.id.clone()),
            other: Source::Volume(other.id.clone()),
            _stop: stop,
            _dir: dir,
        }
    }

    /// Credentials of a node: its own certificate (or any names given).
    fn node_tls(&self, names: &[&str]) -> Tls {
        tls(&self.ca, &self.ca.issue(names))
    }

    /// The controller's grant for `reader` to read `object` of node-1.
    fn grant(&self, object: &Source, reader: &str) -> v1::TransferGrant {
        grant::sign(&self.controller, &self.claims(object, reader)).expect("sign")
    }

    fn claims(&self, object: &Source, reader: &str) -> Claims {
        Claims::new(object.clone(), node(reader), own_name(reader)).expect("claims")
    }

    /// A raw Transfer client presenting `tls`, expecting node-1's own name on the server.
    async fn transfer(&self, tls: &Tls) -> v1::transfer_client::TransferClient<tonic::transport::Channel> {
        let channel = tls
            .endpoint(&self.addr.to_string(), &own_name("node-1"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        v1::transfer_client::TransferClient::new(channel)
    }

    /// A Pull on node-1 presenting `tls`: Ok once the whole stream has come and checked.
    async fn pull(&self, tls: &Tls, asked: &Source, grant: Option<v1::TransferGrant>) -> Result<u64, Status> {
        let mut client = self.transfer(tls).await;
        let req = addressed(
            v1::PullRequest {
                source: Some(asked.into()),
                grant,
            },
            "node-1",
        );
        let mut stream = client.pull(req).await?.into_inner();
        let (mut verifier, mut bytes) = (Verifier::default(), 0);
        while let Some(m) = stream.next().await {
            let f = Frame::try_from(m?).expect("frame");
            verifier.check(&f).expect("a whole, checked stream");
            if let Frame::Chunk { data, .. } = &f {
                bytes += data.len() as u64;
            }
        }
        assert!(verifier.is_complete(), "the stream ended with its end frame");
        Ok(bytes)
    }
}

fn addressed<T>(msg: T, to: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(NODE_HEADER, to.parse().expect("header"));
    req
}

fn refused(r: Result<u64, Status>, code: Code, says: &str) {
    let e = r.expect_err("the pull must be refused");
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(e.message().contains(says), "'{}' should say '{says}'", e.message());
    assert!(e.message().len() < 1100, "a bounded message");
}

#[tokio::test]
async fn a_node_holding_a_grant_reads_that_object_once() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    let grant = src.grant(&src.snapshot, "node-2");
    let bytes = src
        .pull(&node2, &src.snapshot, Some(grant.clone()))
        .await
        .expect("pull");
    assert_eq!(bytes, 3 << 20, "the file's data came whole");
    refused(
        src.pull(&node2, &src.snapshot, Some(grant)).await,
        Code::PermissionDenied,
        "used already",
    );

    // The node's side as the agent runs it: RemoteAgent::pull, the frames checked on the way.
    let remote = RemoteAgent::new(
        node("node-1"),
        HostPort::parse(&src.addr.to_string()).expect("address"),
        &node2,
        &own_name("node-1"),
        Timeouts::default(),
    )
    .expect("client");
    let frames: Vec<Frame> = remote
        .pull(&src.snapshot, src.grant(&src.snapshot, "node-2"))
        .await
        .expect("pull")
        .collect::<Result<_, _>>()
        .await
        .expect("frames");
    let data: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Chunk { data, .. } => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(data == pattern(3 << 20, 7), "the bytes read are the snapshot's");
}

#[tokio::test]
async fn a_pull_without_a_grant_is_unauthenticated() {
    let src = SourceNode::start().await;
    for who in [src.node_tls(&[&own_name("node-2")]), src.controller.clone()] {
        refused(
            src.pull(&who, &src.snapshot, None).await,
            Code::Unauthenticated,
            "no transfer grant",
        );
    }
}

#[tokio::test]
async fn a_grant_for_another_reader_is_permission_denied() {
    let src = SourceNode::start().await;
    let for_node3 = src.grant(&src.snapshot, "node-3");
    // node-2's own certificate, and the certificate every node shares: neither names node-3.
    for who in [src.node_tls(&[&own_name("node-2")]), src.node_tls(&[AGENT_SERVER_NAME])] {
        refused(
            src.pull(&who, &src.snapshot, Some(for_node3.clone())).await,
            Code::PermissionDenied,
            "lets node node-3 read: the caller's certificate does not name 'node-3.cellar-agent'",
        );
    }
    // Refusals do not spend the grant: node-3 itself still reads with it.
    let node3 = src.node_tls(&[&own_name("node-3")]);
    src.pull(&node3, &src.snapshot, Some(for_node3))
        .await
        .expect("node-3 reads");
}

#[tokio::test]
async fn a_grant_for_another_volume_is_permission_denied() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    let for_other = src.grant(&src.other, "node-2");
    refused(
        src.pull(&node2, &src.snapshot, Some(for_other)).await,
        Code::PermissionDenied,
        "the transfer grant is for volume local:node-1:default:other, not snapshot snap:local:node-1:default:snap",
    );
}

#[tokio::test]
async fn a_grant_for_another_nodes_data_is_permission_denied() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    let elsewhere = Source::Snapshot(SnapshotId::parse("snap:local:node-3:default:snap").expect("id"));
    let grant = src.grant(&elsewhere, "node-2");
    refused(
        src.pull(&node2, &elsewhere, Some(grant)).await,
        Code::PermissionDenied,
        "is for node node-3's data; this is node node-1",
    );
}

#[tokio::test]
async fn an_expired_grant_is_unauthenticated() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    let expired = Claims {
        not_after: SystemTime::now() - Duration::from_secs(2),
        ..src.claims(&src.snapshot, "node-2")
    };
    let grant = grant::sign(&src.controller, &expired).expect("sign");
    refused(
        src.pull(&node2, &src.snapshot, Some(grant)).await,
        Code::Unauthenticated,
        "expired",
    );
    let too_long = Claims {
        not_after: SystemTime::now() + grant::MAX_LIFETIME + Duration::from_secs(60),
        ..src.claims(&src.snapshot, "node-2")
    };
    let grant = grant::sign(&src.controller, &too_long).expect("sign");
    refused(
        src.pull(&node2, &src.snapshot, Some(grant)).await,
        Code::PermissionDenied,
        "longer than",
    );
}

/// A compromised node signs its own grants, alters the controller's, or strips their signature;
/// a stranger's CA issues a certificate naming the controller: none of it is the controller's.
#[tokio::test]
async fn a_grant_not_signed_by_the_controller_is_unauthenticated() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    let claims = src.claims(&src.snapshot, "node-2");

    let forged = grant::sign(&node2, &claims).expect("node-2 signs");
    refused(
        src.pull(&node2, &src.snapshot, Some(forged)).await,
        Code::Unauthenticated,
        "does not name the controller 'cellar-controller'",
    );

    let rogue = Authority::new("someone else's CA");
    let impostor = tls(&rogue, &rogue.issue(&[CONTROLLER]));
    let foreign = grant::sign(&impostor, &claims).expect("the impostor signs");
    refused(
        src.pull(&node2, &src.snapshot, Some(foreign)).await,
        Code::Unauthenticated,
        "is not from the CA",
    );

    // The controller's grant for node-2 to read `other`, its claims changed to the snapshot.
    let mut altered = src.grant(&src.other, "node-2");
    altered.claims = prost::Message::encode_to_vec(&v1::GrantClaims::from(&claims));
    refused(
        src.pull(&node2, &src.snapshot, Some(altered)).await,
        Code::Unauthenticated,
        "the signature does not match its claims",
    );

    let unsigned = v1::TransferGrant {
        signature: Vec::new(),
        signer: Vec::new(),
        ..src.grant(&src.snapshot, "node-2")
    };
    refused(
        src.pull(&node2, &src.snapshot, Some(unsigned)).await,
        Code::Unauthenticated,
        "carries no signer certificate",
    );
}

/// A compromised node holds its certificate and has just used a valid grant: the Agent service
/// (list, read, delete) stays the controller's, and the grant opened nothing but its one read.
#[tokio::test]
async fn a_node_certificate_with_a_grant_still_cannot_call_the_agent_service() {
    let src = SourceNode::start().await;
    let node2 = src.node_tls(&[&own_name("node-2")]);
    src.pull(&node2, &src.other, Some(src.grant(&src.other, "node-2")))
        .await
        .expect("the granted read");
    let channel = node2
        .endpoint(&src.addr.to_string(), &own_name("node-1"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut agent = v1::agent_client::AgentClient::new(channel);
    let Source::Volume(other) = &src.other else {
        unreachable!("other is a volume")
    };
    let denied = |r: Result<(), Status>| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("only the controller"), "{}", e.message());
    };
    denied(
        agent
            .export_data(addressed(
                v1::ExportDataRequest {
                    source: Some((&src.other).into()),
                },
                "node-1",
            ))
            .await
            .map(|_| ()),
    );
    denied(
        agent
            .delete_volume(addressed(
                v1::DeleteVolumeRequest {
                    volume_id: other.to_string(),
                },
                "node-1",
            ))
            .await
            .map(|_| ()),
    );
    denied(
        agent
            .list_volumes(addressed(v1::ListVolumesRequest::default(), "node-1"))
            .await
            .map(|_| ()),
    );
    assert!(src.engine.volume(other).is_some(), "the volume is untouched");
}

#[tokio::test]
async fn a_caller_without_a_certificate_from_the_ca_is_refused_in_the_handshake() {
    let src = SourceNode::start().await;
    let rogue = Authority::new("someone else's CA");
    let pair = rogue.issue(&[&own_name("node-2")]);
    // It trusts the right CA, so it would accept the server; its own certificate is the rogue's.
    let stranger = Tls::from_pem(src.ca.pem().as_bytes(), pair.cert.as_bytes(), pair.key.as_bytes()).expect("tls");
    let connected = async {
        let ch = stranger
            .endpoint(&src.addr.to_string(), &own_name("node-1"))
            .expect("endpoint")
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        v1::transfer_client::TransferClient::new(ch)
            .pull(addressed(
                v1::PullRequest {
                    source: Some((&src.snapshot).into()),
                    grant: Some(src.grant(&src.snapshot, "node-2")),
                },
                "node-1",
            ))
            .await
            .map(|_| ())
    };
    let e = connected.await.expect_err("the handshake fails");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown),
        "{:?}: {}",
        e.code(),
        e.message()
    );
}

/// Deletion marks (docs/backups.md, docs/security.md): a node honours a mark of a backup only with
/// the controller's seal of that backup's id. A seal made with a node's key (every node holds the
/// repository's key, so it can write a mark), by a controller of another CA, for another backup,
/// or none at all does not count.
#[test]
fn only_the_controllers_seal_of_that_backup_makes_a_deletion_mark_count() {
    let ca = Authority::new("cellar marks CA");
    let controller = sealed(MarkSeals::for_controller(tls(&ca, &ca.issue(&[CONTROLLER]))));
    let node_1 = sealed(MarkSeals::for_node(
        tls(&ca, &ca.issue(&[&own_name("node-1")])),
        CONTROLLER,
    ));
    let node_2 = sealed(MarkSeals::for_node(
        tls(&ca, &ca.issue(&[&own_name("node-2")])),
        CONTROLLER,
    ));
    let elsewhere = Authority::new("another CA");
    let foreign = sealed(MarkSeals::for_controller(tls(
        &elsewhere,
        &elsewhere.issue(&[CONTROLLER]),
    )));
    let id = BackupId::parse("backup:offsite:0f3c-11aa").expect("id");
    let other = BackupId::parse("backup:offsite:9d2e-77bb").expect("id");

    let seal = controller.seal(&id).expect("the controller seals");
    node_1
        .check(&id, Some(&seal))
        .expect("a node honours the controller's seal");
    controller
        .check(&id, Some(&seal))
        .expect("the controller honours its own (shared pools' backups)");
    mark_refused(&node_1, Some(&seal), &other, "does not match");
    mark_refused(&node_1, None, &id, "no seal");
    mark_refused(&node_1, Some("!!not base64"), &id, "not base64");
    let by_node = node_2.seal(&id).expect("a node's key signs too");
    mark_refused(&node_1, Some(&by_node), &id, "does not name the controller");
    mark_refused(&controller, Some(&by_node), &id, "does not name the controller");
    mark_refused(&node_1, Some(&foreign.seal(&id).expect("seal")), &id, "not from the CA");
    // A seal with its signature cut short.
    let mut cut = seal.clone();
    cut.truncate(seal.len() / 2);
    assert!(node_1.check(&id, Some(&cut)).is_err());

    // A controller known by an IP address only honours its own seals too.
    let by_ip = MarkSeals::for_controller(tls(&ca, &ca.issue(&["10.96.0.15"])));
    let seal = by_ip.seal(&id).expect("seal");
    sealed(by_ip).check(&id, Some(&seal)).expect("its own seal");
    sealed(MarkSeals::for_node(
        tls(&ca, &ca.issue(&[&own_name("node-1")])),
        "10.96.0.15",
    ))
    .check(&id, Some(&seal))
    .expect("a node dialling it by that address honours it");

    assert!(matches!(
        MarkSeals::for_node(Tls::Insecure, CONTROLLER).trust(),
        MarkTrust::Unsealed
    ));
    assert!(matches!(
        MarkSeals::for_controller(Tls::Insecure).trust(),
        MarkTrust::Unsealed
    ));
}

/// A mark is read up to 90 days after it was sealed (its node was down), long after the
/// controller's certificate that sealed it was renewed (a week by default): it counts when that
/// certificate was valid at the seal's time, which the signature covers. A seal dated when the
/// certificate was not valid, or ahead of the node's clock, does not count.
#[test]
fn a_mark_sealed_while_the_controllers_certificate_was_valid_counts_after_it_expired() {
    use std::time::SystemTime;
    let ca = Authority::new("cellar marks CA");
    let now = time::OffsetDateTime::now_utc();
    let expired = tls(
        &ca,
        &ca.issue_valid(
            &[CONTROLLER],
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        ),
    );
    let old_controller = MarkSeals::for_controller(expired);
    let node = sealed(MarkSeals::for_node(
        tls(&ca, &ca.issue(&[&own_name("node-1")])),
        CONTROLLER,
    ));
    let id = BackupId::parse("backup:offsite:0f3c-11aa").expect("id");
    let day = Duration::from_secs(86_400);

    let then = old_controller.seal_at(&id, SystemTime::now() - 5 * day).expect("seal");
    node.check(&id, Some(&then))
        .expect("sealed while the certificate was valid");
    let late = old_controller.seal_at(&id, SystemTime::now()).expect("seal");
    mark_refused(&node, Some(&late), &id, "not from the CA");
    let early = old_controller.seal_at(&id, SystemTime::now() - 20 * day).expect("seal");
    mark_refused(&node, Some(&early), &id, "not from the CA");
    let current = MarkSeals::for_controller(tls(&ca, &ca.issue(&[CONTROLLER])));
    let ahead = current.seal_at(&id, SystemTime::now() + day).expect("seal");
    mark_refused(&node, Some(&ahead), &id, "ahead of this node's clock");
}

fn sealed(seals: MarkSeals) -> Arc<dyn MarkAuthority> {
    match seals.trust() {
        MarkTrust::Sealed(a) => a,
        _ => panic!("over TLS, marks are sealed"),
    }
}

fn mark_refused(who: &Arc<dyn MarkAuthority>, seal: Option<&str>, id: &BackupId, says: &str) {
    let why = who.check(id, seal).expect_err("refused");
    assert!(why.contains(says), "'{why}' does not say '{says}'");
}
