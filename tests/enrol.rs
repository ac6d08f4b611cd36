//! Node enrolment end to end: the real `cellar controller` and `cellar node` binaries, and a fake
//! Kubernetes API server (HTTPS on loopback) that answers TokenReviews for fixed tokens and keeps
//! Secrets in memory. A node with no certificate of its own enrols with a token of its pod, then
//! registers, heartbeats and is dialled as itself; tokens that are not a node pod's own are
//! refused, saying why; two controllers racing to make the CA end with one; a node renews its
//! certificate before it expires. With no certificate files at all, a controller makes the
//! cluster CA, publishes it in a ConfigMap and issues itself its certificate from it; nodes that
//! trust only the published CA enrol and register, and no node's certificate acts as the
//! controller.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cellar::agent::enrol::v1::enrolment_client::EnrolmentClient;
use cellar::agent::enrol::v1::{EnrolRequest, EnrolResponse};
use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::*;
use common::certs::Authority;
use common::cluster::{capacity_on, free_port, node_topology};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic::Code;

const NAMESPACE: &str = "cellar-system";
const NODE_SA: &str = "cellar-node";
const CA_SECRET: &str = "cellar-enrolment-ca";
/// The cluster CA's Secret, and the ConfigMap it is published in.
const CLUSTER_CA: &str = "cellar-cluster-ca";
/// The controller's own service-account token, which the fake API server requires.
const CONTROLLER_TOKEN: &str = "controller-sa-token";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// A token of these tests: its short name, service account, node, audience, exp, and whether the
/// fake API server authenticates it and as which node.
type TokenRow = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    u64,
    Known,
);

const TOKENS: &[TokenRow] = &[
    (
        "token-node-1",
        NODE_SA,
        Some("node-1"),
        "cellar",
        FAR,
        Known::As(Some("node-1")),
    ),
    (
        "token-node-2",
        NODE_SA,
        Some("node-2"),
        "cellar",
        FAR,
        Known::As(Some("node-2")),
    ),
    (
        "token-other-sa",
        "default",
        Some("node-1"),
        "cellar",
        FAR,
        Known::As(Some("node-1")),
    ),
    ("token-no-node", NODE_SA, None, "cellar", FAR, Known::As(None)),
    (
        "token-for-the-api-server",
        NODE_SA,
        Some("node-1"),
        "https://kubernetes.default.svc",
        FAR,
        Known::As(Some("node-1")),
    ),
    (
        "token-expired",
        NODE_SA,
        Some("node-1"),
        "cellar",
        1_600_000_000,
        Known::Not,
    ),
    // Claims a node pod's token would have, and a signature the API server does not accept.
    ("token-forged", NODE_SA, Some("node-1"), "cellar", FAR, Known::Not),
    // Claims that say node-2, on a token the API server knows as node-1's.
    (
        "token-node-1-claiming-node-2",
        NODE_SA,
        Some("node-2"),
        "cellar",
        FAR,
        Known::As(Some("node-1")),
    ),
];

/// An expiry far ahead (2100-01-01).
const FAR: u64 = 4_102_444_800;

/// Whether the fake API server authenticates a token, and the node it names in its answer.
#[derive(Clone, Copy)]
enum Known {
    As(Option<&'static str>),
    Not,
}

/// The text of the token `handle` (one of [`TOKENS`]), shaped as Kubernetes issues them: a JWT
/// whose claims name the audience, expiry, service account and node. Its signature is not one:
/// cellar only reads the claims, to screen, and the (fake) API server alone authenticates. Any
/// other handle is taken as the token's text itself.
fn token(handle: &str) -> String {
    use base64::Engine as _;
    let Some((_, sa, node, aud, exp, _)) = TOKENS.iter().find(|t| t.0 == handle) else {
        return handle.to_string();
    };
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut k8s = json!({"namespace": NAMESPACE, "serviceaccount": {"name": sa, "uid": "sa-uid"}});
    if let Some(n) = node {
        k8s["node"] = json!({"name": n, "uid": "node-uid"});
    }
    let claims = json!({
        "aud": [aud], "exp": exp, "iat": exp - 3600, "nbf": exp - 3600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": user(sa), "kubernetes.io": k8s,
    });
    format!(
        "{}.{}.{}",
        enc(br#"{"alg":"RS256","kid":"fake"}"#),
        enc(claims.to_string().as_bytes()),
        enc(handle.as_bytes())
    )
}

fn names(cert_pem: &str, name: &str) -> bool {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate");
    cellar::agent::tls::certificate_names(&cert, name)
}

/// Whether `cert_pem` was signed by the CA `ca_pem`: its issuer is that CA's subject and the
/// signature checks with the CA's key (openssl does the check).
fn signed_by(cert_pem: &str, ca_pem: &str) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("ca");
    std::fs::write(dir.path().join("leaf.pem"), cert_pem).expect("leaf");
    let out = Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("openssl is needed by this test (apt-get install openssl)");
    out.status.success()
}

fn not_after(cert_pem: &str) -> SystemTime {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate");
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).expect("x509");
    SystemTime::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp() as u64)
}

// ---- the fake Kubernetes API server ----

/// What the API server knows and has seen.
#[derive(Default)]
struct ApiState {
    /// token → (service account user name, node name, audiences it was issued for); a token
    /// absent here is not authenticated.
    tokens: BTreeMap<String, (String, Option<String>, Vec<String>)>,
    /// While set, token reviews wait for a permit of it (or for it to close) before answering.
    review_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Token reviews that have arrived, answered or not.
    reviews_arrived: usize,
    secrets: BTreeMap<String, Value>,
    config_maps: BTreeMap<String, Value>,
    reviews: usize,
    secret_creates: usize,
    secret_conflicts: usize,
    config_map_creates: usize,
    config_map_conflicts: usize,
    config_map_replaces: usize,
    /// A GET of an absent object waits until this many GETs of that name have found it absent
    /// (or 10 s): replicas racing all find it absent before any of them creates it.
    absent_reads_to_hold: usize,
    /// Per object name.
    absent_reads: BTreeMap<String, usize>,
}

impl ApiState {
    /// The objects of a kind by their plural in the API's paths.
    fn objects(&mut self, plural: &str) -> Option<&mut BTreeMap<String, Value>> {
        match plural {
            "secrets" => Some(&mut self.secrets),
            "configmaps" => Some(&mut self.config_maps),
            _ => None,
        }
    }

    fn count_create(&mut self, plural: &str, conflict: bool) {
        let (creates, conflicts) = match plural {
            "secrets" => (&mut self.secret_creates, &mut self.secret_conflicts),
            _ => (&mut self.config_map_creates, &mut self.config_map_conflicts),
        };
        *creates += 1;
        if conflict {
            *conflicts += 1;
        }
    }
}

struct FakeApi {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<Mutex<ApiState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn user(sa: &str) -> String {
    format!("system:serviceaccount:{NAMESPACE}:{sa}")
}

impl FakeApi {
    async fn start(dir: &Path) -> FakeApi {
        let issuer = Authority::new("fake kube-apiserver CA");
        let pair = issuer.issue(&["127.0.0.1"]);
        let ca_file = dir.join("kube-ca.pem");
        std::fs::write(&ca_file, issuer.pem()).expect("kube ca");
        let chain = vec![CertificateDer::from_pem_slice(pair.cert.as_bytes()).expect("cert")];
        let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut state = ApiState::default();
        for (handle, sa, _, aud, _, known) in TOKENS {
            if let Known::As(node) = known {
                state
                    .tokens
                    .insert(token(handle), (user(sa), node.map(Into::into), vec![aud.to_string()]));
            }
        }
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeApi {
            addr,
            ca_file,
            state,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().expect("state")
    }
}

fn reply(code: u16, body: Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn status(code: u16, message: &str) -> hyper::Response<Full<Bytes>> {
    reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}),
    )
}

/// The API server's answer, as Kubernetes gives it for the calls cellar makes.
async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    state: Arc<Mutex<ApiState>>,
) -> hyper::Response<Full<Bytes>> {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if bearer.as_deref() != Some(&format!("Bearer {CONTROLLER_TOKEN}")) {
        return status(401, "Unauthorized");
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method.as_str(), path.as_str()) {
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let token = body["spec"]["token"].as_str().unwrap_or_default().to_string();
            let wanted: Vec<String> = serde_json::from_value(body["spec"]["audiences"].clone()).unwrap_or_default();
            let gate = {
                let mut s = state.lock().expect("state");
                s.reviews_arrived += 1;
                s.review_gate.clone()
            };
            if let Some(gate) = gate {
                let _ = gate.acquire().await;
            }
            let mut s = state.lock().expect("state");
            s.reviews += 1;
            let status = match s.tokens.get(&token) {
                Some((user, node, audiences)) => {
                    let valid: Vec<&String> = wanted.iter().filter(|a| audiences.contains(a)).collect();
                    if valid.is_empty() {
                        json!({"authenticated": false, "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"cellar\"]]"})
                    } else {
                        let mut extra = serde_json::Map::new();
                        extra.insert(
                            "authentication.kubernetes.io/pod-name".into(),
                            json!(["cellar-node-x1"]),
                        );
                        if let Some(n) = node {
                            extra.insert(NODE_NAME_EXTRA.into(), json!([n]));
                        }
                        json!({"authenticated": true, "audiences": valid, "user": {"username": user, "uid": "u", "groups": ["system:serviceaccounts"], "extra": extra}})
                    }
                }
                None => {
                    json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
                }
            };
            reply(
                201,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status}),
            )
        }
        ("GET", p) if object_path(p).is_some_and(|(_, name)| name.is_some()) => {
            let (plural, name) = object_path(p).expect("object path");
            let name = name.expect("name").to_string();
            let hold = {
                let mut s = state.lock().expect("state");
                let Some(objects) = s.objects(plural) else {
                    return status(404, "the server could not find the requested resource");
                };
                if let Some(object) = objects.get(&name) {
                    return reply(200, object.clone());
                }
                *s.absent_reads.entry(format!("{plural}/{name}")).or_default() += 1;
                s.absent_reads_to_hold
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let key = format!("{plural}/{name}");
            let absent = || {
                state
                    .lock()
                    .expect("state")
                    .absent_reads
                    .get(&key)
                    .copied()
                    .unwrap_or(0)
            };
            while absent() < hold && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            status(404, &format!("{plural} \"{name}\" not found"))
        }
        ("POST", p) if object_path(p).is_some_and(|(_, name)| name.is_none()) => {
            let (plural, _) = object_path(p).expect("object path");
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let mut s = state.lock().expect("state");
            let Some(objects) = s.objects(plural) else {
                return status(404, "the server could not find the requested resource");
            };
            let conflict = objects.contains_key(&name);
            if !conflict {
                objects.insert(name.clone(), body.clone());
            }
            s.count_create(plural, conflict);
            if conflict {
                return status(409, &format!("{plural} \"{name}\" already exists"));
            }
            reply(201, body)
        }
        ("PUT", p) if object_path(p).is_some_and(|(plural, name)| plural == "configmaps" && name.is_some()) => {
            let name = object_path(p).and_then(|(_, n)| n).expect("name").to_string();
            let mut s = state.lock().expect("state");
            if !s.config_maps.contains_key(&name) {
                return status(404, &format!("configmaps \"{name}\" not found"));
            }
            s.config_map_replaces += 1;
            s.config_maps.insert(name, body.clone());
            reply(200, body)
        }
        _ => status(404, "the server could not find the requested resource"),
    }
}

/// `/api/v1/namespaces/<ours>/<plural>[/<name>]` → the plural and the name, if there is one.
fn object_path(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix(&format!("/api/v1/namespaces/{NAMESPACE}/"))?;
    match rest.split_once('/') {
        Some((plural, name)) if !name.contains('/') => Some((plural, Some(name))),
        Some(_) => None,
        None => Some((rest, None)),
    }
}

// ---- the processes ----

struct Env {
    dir: tempfile::TempDir,
    api: FakeApi,
    /// The install CA: it signed the controller's certificate.
    install_ca: PathBuf,
    children: Vec<Child>,
}

struct Controller {
    registry: u16,
    enrol: u16,
    socket: PathBuf,
    log: PathBuf,
}

struct Node {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    identity_dir: PathBuf,
    /// Its --tls-ca: the CA it checks the controller's certificate with.
    ca: PathBuf,
    /// Its agent's port.
    agent: u16,
}

impl Env {
    async fn new() -> Env {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-enrol-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let api = FakeApi::start(d).await;
        // The install CA: it signed the controller's certificate (ca.pem, controller.pem/.key).
        Authority::new("cellar install CA").write(d, &[("controller", &["localhost"])]);
        let install_ca = d.join("ca.pem");
        std::fs::write(d.join("sa-token"), format!("{CONTROLLER_TOKEN}\n")).expect("token");
        for (handle, ..) in TOKENS {
            std::fs::write(d.join(handle), token(handle)).expect("token");
        }
        Env {
            dir,
            api,
            install_ca,
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn controller_args(&self, name: &str, registry: u16, enrol: u16, own: bool, extra: &[&str]) -> Vec<String> {
        let d = self.dir.path();
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", d.join(format!("{name}.sock")).display()),
            "--agent-listen".into(),
            format!("127.0.0.1:{registry}"),
            "--data-dir".into(),
            d.join(name).display().to_string(),
        ];
        if own {
            // No certificate files: its own certificate from the cluster CA, for the name nodes
            // dial it by.
            args.extend(
                [
                    "--cluster-ca-secret",
                    &format!("{NAMESPACE}/{CLUSTER_CA}"),
                    "--cluster-ca-publish",
                    &format!("{NAMESPACE}/{CLUSTER_CA}"),
                    "--controller-name",
                    "localhost",
                    "--controller-name",
                    "cellar-controller.cellar-system.svc",
                ]
                .map(String::from),
            );
        } else {
            args.extend([
                "--tls-ca".into(),
                self.install_ca.display().to_string(),
                "--tls-cert".into(),
                d.join("controller.pem").display().to_string(),
                "--tls-key".into(),
                d.join("controller.key").display().to_string(),
            ]);
        }
        let enrolment: Vec<String> = vec![
            "--enrol-listen".into(),
            format!("127.0.0.1:{enrol}"),
            "--enrol-service-account".into(),
            format!("{NAMESPACE}/{NODE_SA}"),
            "--enrol-ca-secret".into(),
            format!("{NAMESPACE}/{CA_SECRET}"),
            "--kube-api".into(),
            self.api.url(),
            "--kube-token-file".into(),
            d.join("sa-token").display().to_string(),
            "--kube-ca-file".into(),
            self.api.ca_file.display().to_string(),
            "--heartbeat-interval".into(),
            "1s".into(),
            // Every node must hold its own certificate: the enrolled one.
            "--require-node-certificates".into(),
        ];
        args.extend(enrolment);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    fn start_controller(&mut self, name: &str, extra: &[&str]) -> Controller {
        self.start_controller_as(name, false, extra)
    }

    /// A controller with no certificate files: it issues its own from the cluster CA.
    fn start_own_controller(&mut self, name: &str, extra: &[&str]) -> Controller {
        self.start_controller_as(name, true, extra)
    }

    fn start_controller_as(&mut self, name: &str, own: bool, extra: &[&str]) -> Controller {
        let (registry, enrol) = (free_port(), free_port());
        let log = self.path(&format!("{name}.log"));
        let args = self.controller_args(name, registry, enrol, own, extra);
        let child = common::cluster::spawn_logged(&log, args, &[]);
        self.children.push(child);
        Controller {
            registry,
            enrol,
            socket: self.path(&format!("{name}.sock")),
            log,
        }
    }

    /// A node of `controller` named `name`, enrolling with the token file `token`.
    fn start_node(&mut self, controller: &Controller, name: &str, token: &str, envs: &[(&str, &str)]) -> Node {
        let ca = self.install_ca.clone();
        self.start_node_trusting(controller, name, token, &ca, envs)
    }

    /// The same, checking the controller's certificate with the CA file `ca`.
    fn start_node_trusting(
        &mut self,
        controller: &Controller,
        name: &str,
        token: &str,
        ca: &Path,
        envs: &[(&str, &str)],
    ) -> Node {
        let mut node = Node {
            name: name.into(),
            child: None,
            log: self.path(&format!("{name}.log")),
            identity_dir: self.path(&format!("{name}-identity")),
            ca: ca.to_path_buf(),
            agent: 0,
        };
        self.restart_node(controller, &mut node, token, envs);
        node
    }

    fn restart_node(&mut self, controller: &Controller, node: &mut Node, token: &str, envs: &[(&str, &str)]) {
        let d = self.dir.path().to_path_buf();
        let port = free_port();
        node.agent = port;
        let args: Vec<String> = vec![
            "node".into(),
            "--endpoint".into(),
            format!("unix://{}", d.join(format!("{}.sock", node.name)).display()),
            "--node-id".into(),
            node.name.clone(),
            "--data-dir".into(),
            d.join(&node.name).display().to_string(),
            "--controller".into(),
            format!("localhost:{}", controller.registry),
            "--agent-listen".into(),
            format!("127.0.0.1:{port}"),
            "--agent-advertise".into(),
            format!("127.0.0.1:{port}"),
            "--tls-ca".into(),
            node.ca.display().to_string(),
            "--enrol-token".into(),
            d.join(token).display().to_string(),
            "--enrol-port".into(),
            controller.enrol.to_string(),
            "--enrol-dir".into(),
            node.identity_dir.display().to_string(),
        ];
        node.child = Some(common::cluster::spawn_logged(&node.log.clone(), args, envs));
    }

    /// Calls Enrol on a controller directly, as a node would.
    async fn enrol(&self, controller: &Controller, node: &str, token: &str) -> Result<EnrolResponse, tonic::Status> {
        self.enrol_with_key(controller, node, token).await.map(|(r, _)| r)
    }

    /// The same, with the key the certificate is for (PEM).
    async fn enrol_with_key(
        &self,
        controller: &Controller,
        node: &str,
        token: &str,
    ) -> Result<(EnrolResponse, String), tonic::Status> {
        enrol_at(&self.install_ca, controller.enrol, node, token).await
    }
}

/// Calls Enrol at `port` as node `node`, with the token `handle` names (see [`token`]).
async fn enrol_at(
    install_ca: &Path,
    port: u16,
    node: &str,
    handle: &str,
) -> Result<(EnrolResponse, String), tonic::Status> {
    let ca = std::fs::read(install_ca).expect("ca");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("the enrolment port accepts a client without a certificate");
    let key = KeyPair::generate().expect("key");
    let csr = CertificateParams::new(vec![format!("{node}.cellar-agent")])
        .expect("params")
        .serialize_request(&key)
        .expect("csr");
    EnrolmentClient::new(channel)
        .enrol(EnrolRequest {
            node_id: node.into(),
            token: token(handle),
            csr: csr.der().to_vec(),
        })
        .await
        .map(|r| (r.into_inner(), key.serialize_pem()))
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

fn log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} not within {limit:?}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The enrolment CA's certificate the controllers made (the Secret's tls.crt).
fn stored_ca(api: &FakeApi) -> String {
    stored(api, CA_SECRET)
}

/// The certificate of the CA in the Secret `name` (its tls.crt).
fn stored(api: &FakeApi, name: &str) -> String {
    let s = api.state();
    let secret = s.secrets.get(name).expect("the CA Secret was made");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let b64 = secret["data"]["tls.crt"].as_str().expect("tls.crt");
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).expect("base64")).expect("pem")
}

/// Whether the controller reports capacity on `node` (it registered and heartbeats).
async fn registered(controller: &Controller, node: &str) -> bool {
    let mut ctl = ControllerClient::new(connect_socket(&controller.socket).await);
    let r = ctl.get_capacity(capacity_on(node)).await;
    matches!(r, Ok(r) if r.get_ref().available_capacity > 0)
}

async fn wait_registered(controller: &Controller, node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !registered(controller, &node.name).await {
        assert!(
            Instant::now() < deadline,
            "{} did not register\n--- controller\n{}\n--- node\n{}",
            node.name,
            log(&controller.log),
            log(&node.log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a volume `name` on `node` through the controller (which dials that node's agent): its id.
async fn create_on(controller: &Controller, node: &str, name: &str) -> String {
    let mut ctl = ControllerClient::new(connect_socket(&controller.socket).await);
    let mut req = create_req(name, MIB);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology(node)],
        preferred: vec![node_topology(node)],
    });
    let v = ctl
        .create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("create on {node}: {e:?}\n{}", log(&controller.log)))
        .into_inner();
    v.volume.expect("volume").volume_id
}

/// Waits, within `limit`, until `child` has stopped and started again in place (to renew its
/// certificate, or for a rotated CA): the same process, which never exits (its container and
/// the processes it started carry on). Its log otherwise.
async fn restart_within(child: &mut Child, limit: Duration, log_file: &Path) {
    let started = Instant::now();
    while !log(log_file).contains("restarting in place") {
        if let Some(s) = child.try_wait().expect("wait") {
            panic!(
                "it exited ({s:?}) instead of starting again in place\n{}",
                log(log_file)
            );
        }
        assert!(
            started.elapsed() < limit,
            "it did not renew its certificate\n{}",
            log(log_file)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.try_wait().expect("wait").is_none(), "{}", log(log_file));
}

/// Two controllers started together (`own`: each issuing its own certificate), each finding every
/// object absent before either creates it.
async fn race(env: &mut Env, own: bool) -> (Controller, Controller) {
    env.api.state().absent_reads_to_hold = 2;
    let a = env.start_controller_as("controller-a", own, &[]);
    let b = env.start_controller_as("controller-b", own, &[]);
    wait_ready(&a).await;
    wait_ready(&b).await;
    (a, b)
}

fn identity(node: &Node) -> String {
    std::fs::read_to_string(node.identity_dir.join("tls.pem")).unwrap_or_default()
}

async fn wait_ready(controller: &Controller) {
    connect_socket(&controller.socket).await;
}

// ---- the tests ----

#[tokio::test]
async fn a_node_with_no_certificate_enrols_registers_and_is_dialled_as_itself() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &[]);
    wait_ready(&controller).await;
    let node = env.start_node(&controller, "node-1", "token-node-1", &[]);
    wait_registered(&controller, &node).await;

    let pem = identity(&node);
    assert!(
        pem.contains("PRIVATE KEY"),
        "the key stays with the node, beside its certificate"
    );
    assert!(names(&pem, "node-1.cellar-agent"), "the certificate names the node");
    assert!(!names(&pem, "cellar-agent"), "and not the nodes' shared identity");
    let ca = stored_ca(&env.api);
    assert!(signed_by(&pem, &ca), "signed by the enrolment CA in the Secret");
    assert!(
        !signed_by(&pem, &std::fs::read_to_string(&env.install_ca).expect("ca")),
        "not by the install CA, which the controller does not hold"
    );
    // The controller dials the node's agent expecting node-1.cellar-agent: a create goes through.
    assert_eq!(
        create_on(&controller, "node-1", "pvc-enrolled").await,
        "local:node-1:default:pvc-enrolled"
    );
    let s = env.api.state();
    assert_eq!(s.reviews, 1, "one token review for one enrolment");
    assert_eq!(s.secret_creates, 1);
}

#[tokio::test]
async fn a_token_of_node_1_cannot_enrol_as_node_2() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &[]);
    wait_ready(&controller).await;
    let e = env.enrol(&controller, "node-2", "token-node-1").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message()
            .contains("the token is of a pod on node 'node-1', not on node 'node-2'"),
        "{}",
        e.message()
    );
    assert_eq!(
        env.api.state().reviews_arrived,
        0,
        "its own claims say node-1: no review"
    );
    // A token whose claims say node-2 is still only what the API server says it is.
    let e = env
        .enrol(&controller, "node-2", "token-node-1-claiming-node-2")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(
        e.message()
            .contains("the token is of a pod on node 'node-1', not on node 'node-2'")
            && !e.message().contains("own claims"),
        "refused by the review: {}",
        e.message()
    );
    assert_eq!(env.api.state().reviews_arrived, 1);

    // The real node binary says the same in its log, and never registers.
    let node = env.start_node(&controller, "node-2", "token-node-1", &[]);
    until(
        "the refusal in node-2's log",
        Duration::from_secs(20),
        || log(&node.log).contains("not on node 'node-2'"),
        || log(&node.log),
    )
    .await;
    assert!(log(&node.log).contains("PermissionDenied"), "{}", log(&node.log));
    assert!(identity(&node).is_empty(), "no certificate was written");
    assert!(!registered(&controller, "node-2").await);
    // Meanwhile it serves kubelet (its volumes need no controller), and says it is not ready.
    let channel = connect_socket(&env.path("node-2.sock")).await;
    let info = cellar::csi::v1::node_client::NodeClient::new(channel.clone())
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo while enrolment is refused")
        .into_inner();
    assert_eq!(info.node_id, "node-2");
    let probe = cellar::csi::v1::identity_client::IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(false), "not ready without a certificate");
    assert!(
        log(&controller.log).contains("enrolment refused"),
        "{}",
        log(&controller.log)
    );
}

#[tokio::test]
async fn tokens_that_are_not_a_node_pods_own_are_refused_saying_why() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &[]);
    wait_ready(&controller).await;
    let cases = [
        ("token-expired", Code::Unauthenticated, "it expired"),
        (
            "not-a-token-at-all",
            Code::Unauthenticated,
            "it is not a service-account token (1 parts; a JWT",
        ),
        ("", Code::Unauthenticated, "the request carries no token"),
        (
            "token-for-the-api-server",
            Code::Unauthenticated,
            "it is not valid for the audience 'cellar' (valid for: [\"https://kubernetes.default.svc\"])",
        ),
        (
            "token-other-sa",
            Code::PermissionDenied,
            "belongs to 'system:serviceaccount:cellar-system:default', not to the nodes' service account 'system:serviceaccount:cellar-system:cellar-node'",
        ),
        (
            "token-no-node",
            Code::PermissionDenied,
            "the token names no node (authentication.kubernetes.io/node-name)",
        ),
    ];
    for (handle, code, says) in cases {
        let e = env.enrol(&controller, "node-1", handle).await.unwrap_err();
        assert_eq!(e.code(), code, "{handle}: {}", e.message());
        assert!(e.message().contains(says), "{handle}: {}", e.message());
    }
    // Each of them says itself that it cannot enrol node-1: none cost a review.
    assert_eq!(
        env.api.state().reviews_arrived,
        0,
        "no review for a token that refuses itself"
    );
    // Claims as a node pod's token has them are not enough: the API server decides.
    let e = env.enrol(&controller, "node-1", "token-forged").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(e.message().contains("invalid bearer token"), "{}", e.message());
    assert_eq!(env.api.state().reviews_arrived, 1, "the forged token was reviewed");
    // A request that is not one is refused before any token is reviewed.
    let reviews = env.api.state().reviews;
    let e = env.enrol(&controller, "Node_1!", "token-node-1").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert_eq!(env.api.state().reviews, reviews, "no review for a bad node id");
    // And the token itself never reaches the log.
    let text = log(&controller.log);
    assert!(text.contains("enrolment refused"), "{text}");
    for handle in ["token-expired", "token-other-sa", "token-forged"] {
        let jwt = token(handle);
        let signature = jwt.rsplit('.').next().expect("three parts");
        assert!(!text.contains(signature), "{handle} is in the log: {text}");
    }
    // The right token still enrols.
    let ok = env
        .enrol(&controller, "node-1", "token-node-1")
        .await
        .expect("node-1 enrols");
    assert!(names(&ok.certificate, "node-1.cellar-agent"));
}

/// One address has at most two token reviews in flight: a third request from it is turned away
/// (UNAVAILABLE, so a real node retries) without a review, until one of them is answered.
#[tokio::test]
async fn one_address_holds_at_most_two_token_reviews_in_flight() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &[]);
    wait_ready(&controller).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    env.api.state().review_gate = Some(gate.clone());
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (ca, port) = (env.install_ca.clone(), controller.enrol);
            tokio::spawn(async move { enrol_at(&ca, port, "node-1", "token-forged").await })
        })
        .collect();
    until(
        "two reviews held at the API server",
        Duration::from_secs(20),
        || env.api.state().reviews_arrived == 2,
        || log(&controller.log),
    )
    .await;
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        env.enrol(&controller, "node-1", "token-node-1"),
    )
    .await
    .expect("answered, not held behind the API server")
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("2 token reviews from 127.0.0.1 are in flight"),
        "{}",
        e.message()
    );
    assert_eq!(env.api.state().reviews_arrived, 2, "the third was not sent for review");
    // A token that refuses itself is still refused at once, saying why.
    let e = env.enrol(&controller, "node-1", "token-other-sa").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());

    gate.close();
    for h in held {
        let e = h.await.expect("task").unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    }
    // Their places are given back: the node's own token enrols.
    let ok = env
        .enrol(&controller, "node-1", "token-node-1")
        .await
        .expect("enrols once the reviews are answered");
    assert!(names(&ok.certificate, "node-1.cellar-agent"));
}

#[tokio::test]
async fn two_controllers_racing_to_make_the_ca_end_with_one() {
    let mut env = Env::new().await;
    let (a, b) = race(&mut env, false).await;
    {
        let s = env.api.state();
        assert_eq!(
            s.absent_reads[&format!("secrets/{CA_SECRET}")],
            2,
            "both looked for the CA first"
        );
        assert_eq!(s.secret_creates, 2, "both tried to create it");
        assert_eq!(s.secret_conflicts, 1, "one lost the race");
        assert_eq!(s.secrets.len(), 1);
    }
    let stored = stored_ca(&env.api);
    let from_a = env.enrol(&a, "node-1", "token-node-1").await.expect("enrol at a");
    let from_b = env.enrol(&b, "node-2", "token-node-2").await.expect("enrol at b");
    assert_eq!(from_a.ca, stored, "a signs with the stored CA");
    assert_eq!(from_b.ca, stored, "b signs with the stored CA");
    assert!(signed_by(&from_a.certificate, &stored) && signed_by(&from_b.certificate, &stored));
    let logs = log(&a.log) + &log(&b.log);
    assert_eq!(logs.matches(": made the enrolment CA").count(), 1, "{logs}");
    assert_eq!(
        logs.matches("another replica made the enrolment CA first").count(),
        1,
        "{logs}"
    );

    // A controller started later reads the same CA and makes none.
    let c = env.start_controller("controller-c", &[]);
    wait_ready(&c).await;
    assert_eq!(env.api.state().secret_creates, 2);
    let from_c = env.enrol(&c, "node-1", "token-node-1").await.expect("enrol at c");
    assert_eq!(from_c.ca, stored);
}

#[tokio::test]
async fn a_node_renews_its_certificate_before_it_expires() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &["--enrol-certificate-validity", "30s"]);
    wait_ready(&controller).await;
    let check = [("CELLAR_TLS_CHECK_SECONDS", "1")];
    let mut node = env.start_node(&controller, "node-1", "token-node-1", &check);
    wait_registered(&controller, &node).await;
    let first = identity(&node);
    let expires = not_after(&first);

    // Two thirds into its life the node enrols again, and starts again in place to use the new one.
    restart_within(
        node.child.as_mut().expect("running"),
        Duration::from_secs(45),
        &node.log,
    )
    .await;
    let restarted = SystemTime::now();
    assert!(restarted < expires, "renewed before the first certificate expired");
    let second = identity(&node);
    assert_ne!(second, first, "a new certificate and key");
    assert!(not_after(&second) > expires, "valid for longer than the first");
    assert!(names(&second, "node-1.cellar-agent"));
    assert_eq!(env.api.state().reviews, 2, "the renewal reviewed a fresh token");
    let text = log(&node.log);
    assert!(text.contains("renewing this node's certificate"), "{text}");
    assert!(text.contains("certificate rotation"), "{text}");

    // Started again (in place: the same process), it uses the renewed certificate.
    wait_registered(&controller, &node).await;
    assert!(
        log(&node.log).contains("using this node's certificate from its earlier enrolment"),
        "{}",
        log(&node.log)
    );
    assert_eq!(env.api.state().reviews, 2, "no enrolment needed after the restart");
}

/// A Register call to the controller's registry with an enrolled certificate, claiming `node`.
async fn register_as(
    env: &Env,
    controller: &Controller,
    answer: &EnrolResponse,
    key: &str,
    node: &str,
) -> Result<(), tonic::Status> {
    use cellar::agent::wire::v1::{registry_client::RegistryClient, NodeStatus};
    let mut ca = std::fs::read(&env.install_ca).expect("ca");
    ca.extend_from_slice(answer.ca.as_bytes());
    let tls = cellar::agent::tls::Tls::from_pem(&ca, answer.certificate.as_bytes(), key.as_bytes()).expect("tls");
    let channel = tls
        .endpoint(&format!("127.0.0.1:{}", controller.registry), "localhost")
        .expect("endpoint")
        .connect()
        .await
        .expect("the registry accepts the enrolled certificate in the handshake");
    let status = NodeStatus {
        node_id: node.into(),
        topology: [("topology.cellar.csi.dev/node".to_string(), node.to_string())].into(),
        agent_address: "127.0.0.1:1".into(),
        pools: vec![],
        version: "test".into(),
        shut_pools: vec![],
    };
    RegistryClient::new(channel).register(status).await.map(|_| ())
}

#[tokio::test]
async fn an_enrolled_certificate_registers_only_its_own_node() {
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &[]);
    wait_ready(&controller).await;
    let (answer, key) = env
        .enrol_with_key(&controller, "node-1", "token-node-1")
        .await
        .expect("node-1 enrols");
    let e = register_as(&env, &controller, &answer, &key, "node-2")
        .await
        .expect_err("node-1's certificate must not register node-2");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("node-2.cellar-agent"), "{}", e.message());
    register_as(&env, &controller, &answer, &key, "node-1")
        .await
        .expect("node-1's certificate registers node-1");
}

/// Revocation is by expiry (docs/security.md): a node certificate past its end speaks for its node
/// no more, not even over a connection its handshake opened while it was valid (a peer that
/// answers the server's pings keeps a connection for as long as it likes).
#[tokio::test]
async fn an_expired_certificate_registers_nothing_even_over_a_connection_opened_before() {
    use cellar::agent::wire::v1::{registry_client::RegistryClient, NodeStatus};
    let mut env = Env::new().await;
    let controller = env.start_controller("controller", &["--enrol-certificate-validity", "10s"]);
    wait_ready(&controller).await;
    let (answer, key) = env
        .enrol_with_key(&controller, "node-1", "token-node-1")
        .await
        .expect("node-1 enrols");
    let expires = not_after(&answer.certificate);
    let mut ca = std::fs::read(&env.install_ca).expect("ca");
    ca.extend_from_slice(answer.ca.as_bytes());
    let tls = cellar::agent::tls::Tls::from_pem(&ca, answer.certificate.as_bytes(), key.as_bytes()).expect("tls");
    let channel = tls
        .endpoint(&format!("127.0.0.1:{}", controller.registry), "localhost")
        .expect("endpoint")
        .connect()
        .await
        .expect("the registry accepts the certificate while it is valid");
    let mut registry = RegistryClient::new(channel);
    let status = NodeStatus {
        node_id: "node-1".into(),
        topology: [("topology.cellar.csi.dev/node".to_string(), "node-1".to_string())].into(),
        agent_address: "127.0.0.1:1".into(),
        pools: vec![],
        version: "test".into(),
        shut_pools: vec![],
    };
    registry.register(status.clone()).await.expect("registers while valid");
    // Heartbeats on the one connection, as a node that never lets it go, until past the end.
    while SystemTime::now() < expires + Duration::from_secs(2) {
        let _ = registry.heartbeat(status.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let late = registry.heartbeat(status).await;
    let e = late.expect_err("an expired certificate must not keep its node registered");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("expired"), "{}", e.message());
}

#[tokio::test]
async fn enrolled_nodes_pull_a_restore_from_each_other() {
    pull_a_restore_between_enrolled_nodes(false).await;
}

/// The same with the controller's own certificate: the source node checks the grant's signer
/// against the published cluster CA.
#[tokio::test]
async fn with_the_controllers_own_certificate_nodes_pull_a_restore_with_its_grant() {
    pull_a_restore_between_enrolled_nodes(true).await;
}

/// node-2 restores a snapshot of node-1 by pulling it from node-1 with the controller's grant
/// (`own`: the controller issues its own certificate, the nodes trust the published CA).
async fn pull_a_restore_between_enrolled_nodes(own: bool) {
    let mut env = Env::new().await;
    let controller = env.start_controller_as("controller", own, &[]);
    wait_ready(&controller).await;
    let ca = if own {
        mount_published(&env)
    } else {
        env.install_ca.clone()
    };
    let one = env.start_node_trusting(&controller, "node-1", "token-node-1", &ca, &[]);
    let two = env.start_node_trusting(&controller, "node-2", "token-node-2", &ca, &[]);
    wait_registered(&controller, &one).await;
    wait_registered(&controller, &two).await;
    let mut ctl = ControllerClient::new(connect_socket(&controller.socket).await);
    let on = |node: &str| TopologyRequirement {
        requisite: vec![node_topology(node)],
        preferred: vec![node_topology(node)],
    };
    let mut req = create_req("pvc-source", MIB);
    req.accessibility_requirements = Some(on("node-1"));
    let source = ctl.create_volume(req).await.expect("create on node-1").into_inner();
    let source = source.volume.expect("volume").volume_id;
    let snap = ctl
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: source,
            name: "snap-source".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot on node-1")
        .into_inner()
        .snapshot
        .expect("snapshot");
    // node-2 pulls the snapshot from node-1: each checks the other's enrolled certificate.
    let mut req = create_req("pvc-restored", MIB);
    req.accessibility_requirements = Some(on("node-2"));
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(&snap.snapshot_id)),
    });
    let restored = ctl
        .create_volume(req)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "restore onto node-2: {e:?}\n--- controller\n{}\n--- node-1\n{}\n--- node-2\n{}",
                log(&controller.log),
                log(&one.log),
                log(&two.log)
            )
        })
        .into_inner();
    assert_eq!(
        restored.volume.expect("volume").volume_id,
        "local:node-2:default:pvc-restored"
    );
    assert!(
        log(&one.log).contains("export to another node granted"),
        "node-1 served node-2 directly, with the controller's grant:\n{}",
        log(&one.log)
    );
}

// ---- the controller's own certificate, from the cluster CA it makes and publishes ----

/// The CA certificate published in the ConfigMap, if it is.
fn published_ca(api: &FakeApi) -> Option<String> {
    let s = api.state();
    s.config_maps
        .get(CLUSTER_CA)
        .and_then(|c| c["data"]["ca.crt"].as_str())
        .map(str::to_owned)
}

/// An environment with one controller that issues its own certificate, ready.
async fn own_controller(extra: &[&str]) -> (Env, Controller) {
    let mut env = Env::new().await;
    let controller = env.start_own_controller("controller", extra);
    wait_ready(&controller).await;
    (env, controller)
}

/// Writes the published CA where a node pod would find it (its ConfigMap volume).
fn mount_published(env: &Env) -> PathBuf {
    let path = env.path("published-ca.crt");
    std::fs::write(&path, published_ca(&env.api).expect("the cluster CA is published")).expect("write");
    path
}

#[tokio::test]
async fn a_controller_with_no_ca_makes_the_cluster_ca_publishes_its_certificate_and_serves_with_its_own() {
    let (mut env, controller) = own_controller(&[]).await;
    let cluster = stored(&env.api, CLUSTER_CA);
    assert_eq!(
        published_ca(&env.api).as_deref(),
        Some(cluster.as_str()),
        "the ConfigMap holds the cluster CA's certificate"
    );
    {
        let s = env.api.state();
        let published = &s.config_maps[CLUSTER_CA];
        assert_eq!(published["data"].as_object().map(|d| d.len()), Some(1), "{published}");
        assert!(
            !published.to_string().contains("PRIVATE KEY"),
            "never the key: {published}"
        );
        assert_eq!(s.secrets[CLUSTER_CA]["type"], "kubernetes.io/tls");
        assert_eq!(s.secrets.len(), 2, "the enrolment CA and the cluster CA");
    }
    assert_ne!(stored_ca(&env.api), cluster, "one CA per role");
    // A client that trusts only the published CA accepts the controller for its name.
    let ca_file = mount_published(&env);
    let (answer, _) = enrol_at(&ca_file, controller.enrol, "node-1", "token-node-1")
        .await
        .expect("the controller's certificate checks against the published CA");
    assert!(names(&answer.certificate, "node-1.cellar-agent"));
    assert!(
        !signed_by(&answer.certificate, &cluster),
        "nodes are the enrolment CA's"
    );
    let text = log(&controller.log);
    for says in [
        ": made the cluster CA",
        "published the cluster CA's certificate",
        "issued the controller's own certificate from the cluster CA",
    ] {
        assert!(text.contains(says), "{says}:\n{text}");
    }

    // The CA's Secret deleted (its rotation): the next controller makes a new one and publishes it
    // in place of the old.
    env.api.state().secrets.remove(CLUSTER_CA);
    let next = env.start_own_controller("controller-next", &[]);
    wait_ready(&next).await;
    let rotated = stored(&env.api, CLUSTER_CA);
    assert_ne!(rotated, cluster, "a new cluster CA");
    assert_eq!(published_ca(&env.api), Some(rotated), "published in place of the old");
    assert_eq!(env.api.state().config_map_replaces, 1);
    let ca_file = mount_published(&env);
    enrol_at(&ca_file, next.enrol, "node-1", "token-node-1")
        .await
        .expect("the new controller's certificate checks against the new CA");
}

#[tokio::test]
async fn two_controllers_racing_end_with_one_cluster_ca_and_each_its_own_certificate() {
    let mut env = Env::new().await;
    let (a, b) = race(&mut env, true).await;
    {
        let s = env.api.state();
        assert_eq!(s.absent_reads[&format!("secrets/{CLUSTER_CA}")], 2, "both looked first");
        assert_eq!(
            s.secret_conflicts, 2,
            "one lost each race: the enrolment CA and the cluster CA"
        );
        assert_eq!(s.secrets.len(), 2);
        assert_eq!(s.config_map_creates, 2, "both tried to publish");
        assert_eq!(s.config_map_conflicts, 1);
        assert_eq!(
            s.config_map_replaces, 0,
            "the loser found the same certificate published"
        );
    }
    let cluster = stored(&env.api, CLUSTER_CA);
    assert_eq!(published_ca(&env.api), Some(cluster));
    let ca_file = mount_published(&env);
    for c in [&a, &b] {
        enrol_at(&ca_file, c.enrol, "node-1", "token-node-1")
            .await
            .unwrap_or_else(|e| panic!("each replica's certificate checks against the one CA: {e:?}"));
    }
    let logs = log(&a.log) + &log(&b.log);
    assert_eq!(logs.matches(": made the cluster CA").count(), 1, "{logs}");
    assert_eq!(
        logs.matches("another replica made the cluster CA first").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("issued the controller's own certificate").count(),
        2,
        "each replica holds its own: {logs}"
    );
}

#[tokio::test]
async fn a_node_trusting_only_the_published_ca_waits_for_it_then_enrols_and_registers() {
    let (mut env, controller) = own_controller(&[]).await;
    // As a node pod whose ConfigMap volume kubelet has not filled yet.
    let ca_file = env.path("not-yet-mounted/ca.crt");
    let node = env.start_node_trusting(&controller, "node-1", "token-node-1", &ca_file, &[]);
    until(
        "the node saying it waits for the CA",
        Duration::from_secs(20),
        || log(&node.log).contains("not published yet"),
        || log(&node.log),
    )
    .await;
    assert!(!registered(&controller, "node-1").await);
    std::fs::create_dir_all(ca_file.parent().expect("dir")).expect("dir");
    std::fs::write(&ca_file, published_ca(&env.api).expect("published")).expect("mount");
    wait_registered(&controller, &node).await;
    // The controller dials the node's agent, which serves it by the published CA.
    assert_eq!(
        create_on(&controller, "node-1", "pvc-published").await,
        "local:node-1:default:pvc-published"
    );
}

#[tokio::test]
async fn a_nodes_certificate_cannot_act_as_the_controller() {
    use cellar::agent::wire::v1::{agent_client::AgentClient, ListVolumesRequest};
    let (mut env, controller) = own_controller(&[]).await;
    let ca_file = mount_published(&env);
    let two = env.start_node_trusting(&controller, "node-2", "token-node-2", &ca_file, &[]);
    wait_registered(&controller, &two).await;
    let published = published_ca(&env.api).expect("published");
    // node-1's own certificate and key, as a compromised node-1 holds them.
    let (answer, key) = enrol_at(&ca_file, controller.enrol, "node-1", "token-node-1")
        .await
        .expect("node-1 enrols");

    // As a client: node-2's agent lets it through the handshake (it is a node's) and serves it
    // nothing.
    let trust = format!("{published}{}", answer.ca);
    let tls = cellar::agent::tls::Tls::from_pem(trust.as_bytes(), answer.certificate.as_bytes(), key.as_bytes())
        .expect("tls");
    let channel = tls
        .endpoint(&format!("127.0.0.1:{}", two.agent), "node-2.cellar-agent")
        .expect("endpoint")
        .connect()
        .await
        .expect("a node's certificate passes the handshake");
    let e = AgentClient::new(channel)
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect_err("a node's certificate must not act as the controller");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("does not name 'localhost'"), "{}", e.message());

    // As a server: neither CA a node trusts vouches for it under the controller's names.
    for name in ["localhost", "cellar-controller.cellar-system.svc"] {
        for ca in [&published, &answer.ca] {
            assert!(
                !cellar::agent::enrol::ca::vouches_for(ca, &answer.certificate, name),
                "{name}"
            );
        }
    }
}

#[tokio::test]
async fn a_controller_renews_its_own_certificate_by_restarting_before_it_expires() {
    let (mut env, controller) = own_controller(&["--controller-certificate-validity", "15s"]).await;
    let started = Instant::now();
    let child = env.children.last_mut().expect("the controller");
    // Two thirds into its life (10 s) it stops gracefully and starts again in place with a new
    // certificate.
    restart_within(child, Duration::from_secs(30), &controller.log).await;
    assert!(started.elapsed() < Duration::from_secs(15), "before it expired");
    assert!(
        log(&controller.log).contains("the controller's certificate is due for renewal"),
        "{}",
        log(&controller.log)
    );
    // Started again, it keeps the CA and issues itself a new certificate from it.
    wait_ready(&controller).await;
    let s = env.api.state();
    assert_eq!((s.secret_creates, s.config_map_creates), (2, 1), "nothing made anew");
}

/// The cluster CA rotated as docs/security.md says (its Secret deleted, the controller restarted):
/// a node enrolled under the old CA notices the published CA change in its ConfigMap volume and
/// restarts in place, and started again with its kept directory it
/// enrols afresh trusting the new CA instead of reusing a certificate and CA file of the old one.
#[tokio::test]
async fn a_node_enrols_again_when_the_published_cluster_ca_is_rotated() {
    let mut env = Env::new().await;
    let (registry, enrol) = (free_port(), free_port());
    let start = |env: &mut Env, name: &str| {
        let log = env.path(&format!("{name}.log"));
        let child = common::cluster::spawn_logged(&log, env.controller_args(name, registry, enrol, true, &[]), &[]);
        env.children.push(child);
        Controller {
            registry,
            enrol,
            socket: env.path(&format!("{name}.sock")),
            log,
        }
    };
    let first = start(&mut env, "controller");
    wait_ready(&first).await;
    let ca_file = mount_published(&env);
    let check = [("CELLAR_TLS_CHECK_SECONDS", "1")];
    let mut node = env.start_node_trusting(&first, "node-1", "token-node-1", &ca_file, &check);
    wait_registered(&first, &node).await;
    let kept = identity(&node);
    let old_ca = published_ca(&env.api).expect("published");

    // Rotation: the Secret deleted, the controller replaced; it makes a new CA and publishes it.
    let mut old = env.children.pop().expect("the controller");
    let _ = old.kill();
    let _ = old.wait();
    env.api.state().secrets.remove(CLUSTER_CA);
    let second = start(&mut env, "controller-2");
    wait_ready(&second).await;
    let new_ca = published_ca(&env.api).expect("published again");
    assert_ne!(new_ca, old_ca, "a new cluster CA");
    // kubelet updates the node pod's ConfigMap volume.
    std::fs::write(&ca_file, &new_ca).expect("mount");
    let child = node.child.as_mut().expect("the node");
    restart_within(child, Duration::from_secs(15), &node.log).await;
    assert!(
        log(&node.log).contains("the CA of the controller's certificate changed"),
        "{}",
        log(&node.log)
    );
    // Started again in place: the kept certificate was enrolled trusting the old CA.
    wait_registered(&second, &node).await;
    assert_ne!(identity(&node), kept, "enrolled afresh");
    let ca = std::fs::read_to_string(node.identity_dir.join("ca.crt")).expect("ca.crt");
    assert!(ca.starts_with(new_ca.trim_end()), "{ca}");
    assert_eq!(
        create_on(&second, "node-1", "pvc-after-rotation").await,
        "local:node-1:default:pvc-after-rotation"
    );
}
