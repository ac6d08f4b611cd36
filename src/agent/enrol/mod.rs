//! Node enrolment: a node obtains a certificate naming it (`<node>.cellar-agent`) from the
//! controller, with no certificate made by hand.
//!
//! The protocol (proto/enrol.proto; the threat model is docs/security.md, "Enrolment"):
//! 1. The node makes a new key and a CSR, and calls `Enrol` on the controller's enrolment port
//!    over TLS that authenticates the controller (the node checks the controller's name against
//!    the install CA, `--tls-ca`); the node has no client certificate yet.
//! 2. The request carries the node's pod's projected service-account token, issued by Kubernetes
//!    for the audience the controller expects (`cellar`) and short-lived. The controller has the
//!    API server review it (TokenReview) and admits it only if the API server authenticated it for
//!    that audience, it belongs to the nodes' service account, and Kubernetes' own record of the
//!    node its pod is bound to (the `authentication.kubernetes.io/node-name` extra of bound
//!    tokens) is the node the request names.
//! 3. The controller signs the CSR's public key, and nothing else of it, as a short-lived
//!    certificate for `<node>.cellar-agent` with its enrolment CA ([`ca`]), and answers with the
//!    certificate and the CA. The node renews it the same way after two thirds of its life.
//!
//! From then on the node registers, heartbeats and is dialled as that node only (the registry's
//! rules for a node's own certificate, `registry::NodeIdentity::Own`).

pub mod ca;
pub mod claims;
pub mod kube;
pub mod node;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use self::ca::{Ca, CaError};
use self::claims::Claims;
use self::kube::{Kube, KubeError, Review};
use crate::server::Peers;
use crate::storage::id::NodeId;

pub mod v1 {
    tonic::include_proto!("cellar.enrol.v1");
}

/// The key of the node name in the user info of a bound service-account token (Kubernetes 1.30+,
/// feature ServiceAccountTokenPodNodeInfo; on by default from 1.30, GA in 1.32).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The largest token and CSR taken (a bound token is about 1 KiB, a CSR a few hundred bytes).
const MAX_TOKEN_BYTES: usize = 16 << 10;
const MAX_CSR_BYTES: usize = 16 << 10;
/// Token reviews in flight at once: anyone who reaches the port can ask for one.
const MAX_REVIEWS: usize = 16;
/// Token reviews in flight at once for one peer address: one pod cannot take every place.
pub const MAX_REVIEWS_PER_PEER: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("enrolment refused: {0}")]
    Invalid(String),
    #[error("enrolment refused: the token is not accepted: {0}")]
    Unauthenticated(String),
    #[error("enrolment refused: {0}")]
    Denied(String),
    #[error("enrolment failed: cannot review the token: {0}")]
    Api(#[from] KubeError),
    #[error("enrolment failed: {0}")]
    Ca(#[from] CaError),
    #[error("enrolment busy: {0} token reviews are in flight; retry shortly")]
    Busy(usize),
    #[error("enrolment busy: {1} token reviews from {0} are in flight; retry shortly")]
    PeerBusy(std::net::IpAddr, usize),
}

impl EnrolError {
    /// The same refusal, saying it was made from the token's own claims, with no review.
    fn by_claims(self) -> EnrolError {
        const BY_CLAIMS: &str = " (by the token's own claims; it was not sent for review)";
        match self {
            EnrolError::Unauthenticated(why) => EnrolError::Unauthenticated(why + BY_CLAIMS),
            EnrolError::Denied(why) => EnrolError::Denied(why + BY_CLAIMS),
            other => other,
        }
    }
}

/// The service account whose tokens may enrol: `system:serviceaccount:<namespace>:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// `NAMESPACE/NAME`.
    pub fn parse(s: &str) -> Result<ServiceAccount, String> {
        let r = ca::ObjectRef::parse(s)?;
        Ok(ServiceAccount {
            namespace: r.namespace,
            name: r.name,
        })
    }

    /// The user name the API server gives its tokens.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// Who may enrol, and what they get.
#[derive(Debug, Clone)]
pub struct EnrolPolicy {
    /// The audience the nodes' tokens must be issued for (the chart's projected volume names it).
    pub audience: String,
    pub service_account: ServiceAccount,
    /// How long an issued certificate is valid.
    pub validity: Duration,
    /// The name all nodes' certificates end in: a node's is `<node>.<agent_server_name>`.
    pub agent_server_name: String,
}

impl EnrolPolicy {
    /// Whether a reviewed token may enrol `node`: authenticated for our audience, of the nodes'
    /// service account, from a pod bound to `node`.
    pub fn admit(&self, review: &Review, node: &NodeId) -> Result<(), EnrolError> {
        if !review.authenticated {
            let why = if review.error.is_empty() {
                "the API server did not authenticate it (expired, revoked, or not a token of this cluster)"
            } else {
                review.error.as_str()
            };
            return Err(EnrolError::Unauthenticated(bounded(why)));
        }
        // The API server checks the audience when asked for one; an answer that does not name it
        // (an authenticator that ignores audiences) is not taken as a yes.
        if !review.audiences.iter().any(|a| a == &self.audience) {
            return Err(EnrolError::Unauthenticated(format!(
                "it is not valid for the audience '{}' (valid for: {})",
                self.audience,
                bounded(&format!("{:?}", review.audiences))
            )));
        }
        let want = self.service_account.username();
        if review.user.username != want {
            return Err(EnrolError::Denied(format!(
                "the token belongs to '{}', not to the nodes' service account '{want}'",
                bounded(&review.user.username)
            )));
        }
        match review.user.extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
            None | Some([]) => Err(EnrolError::Denied(format!(
                "the token names no node ({NODE_NAME_EXTRA}): it must be a projected token of a pod bound to a node (Kubernetes 1.30 or later)"
            ))),
            Some([one]) if one == node.as_str() => Ok(()),
            Some([one]) => Err(EnrolError::Denied(format!(
                "the token is of a pod on node '{}', not on node '{}'",
                bounded(one),
                node.as_str()
            ))),
            Some(many) => Err(EnrolError::Denied(format!(
                "the token names {} nodes; exactly one is expected",
                many.len()
            ))),
        }
    }
}

/// At most 256 characters of text that came from elsewhere.
fn bounded(s: &str) -> String {
    let mut out: String = s.chars().take(256).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Serves enrolment on `listener` until `shutdown`: TLS with the controller's certificate, no
/// client certificate asked for (the caller has none yet).
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: crate::server::SocketLimits,
    tls: crate::agent::tls::Tls,
    service: EnrolService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::agent::server::ServeError> {
    let incoming = crate::server::incoming_tcp(listener, limits, "the enrolment port");
    let mut builder = tonic::transport::Server::builder();
    if let Some(config) = tls.server_only_config() {
        builder = builder.tls_config(config)?;
    }
    builder
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The controller's side: reviews tokens and signs node certificates.
pub struct EnrolService {
    kube: Arc<Kube>,
    ca: Arc<Ca>,
    policy: EnrolPolicy,
    reviews: Arc<Semaphore>,
    reviews_by_peer: Peers,
}

impl EnrolService {
    pub fn new(kube: Arc<Kube>, ca: Arc<Ca>, policy: EnrolPolicy) -> EnrolService {
        EnrolService {
            kube,
            ca,
            policy,
            reviews: Arc::new(Semaphore::new(MAX_REVIEWS)),
            reviews_by_peer: Peers::default(),
        }
    }

    /// The gRPC service, taking messages no larger than a token and a CSR need.
    pub fn into_server(self) -> v1::enrolment_server::EnrolmentServer<EnrolService> {
        v1::enrolment_server::EnrolmentServer::new(self)
            .max_decoding_message_size(MAX_TOKEN_BYTES + MAX_CSR_BYTES + 1024)
    }

    /// Checks a request from `peer` and issues its certificate: the node and its certificate
    /// (PEM).
    ///
    /// What costs nothing is checked first: the request's shape, the token's own claims (read,
    /// not trusted: a token that says it is for another audience, account or node, or expired,
    /// is refused without asking the API server) and the CSR's signature. Only then is the token
    /// reviewed, at most [`MAX_REVIEWS`] at once and [`MAX_REVIEWS_PER_PEER`] per peer address;
    /// the review's answer alone admits.
    pub async fn issue(
        &self,
        req: v1::EnrolRequest,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(NodeId, String), EnrolError> {
        let node = NodeId::parse(&req.node_id).map_err(|e| EnrolError::Invalid(format!("node_id: {}", e.0)))?;
        if req.token.is_empty() {
            return Err(EnrolError::Unauthenticated("the request carries no token".into()));
        }
        if req.token.len() > MAX_TOKEN_BYTES {
            return Err(EnrolError::Invalid(format!(
                "the token is {} bytes; at most {MAX_TOKEN_BYTES}",
                req.token.len()
            )));
        }
        if req.csr.is_empty() || req.csr.len() > MAX_CSR_BYTES {
            return Err(EnrolError::Invalid(format!(
                "the CSR is {} bytes; a DER request of 1 to {MAX_CSR_BYTES} bytes is expected",
                req.csr.len()
            )));
        }
        let name = format!("{}.{}", node.as_str(), self.policy.agent_server_name);
        let claims = Claims::read(&req.token)?;
        claims
            .check_expiry(SystemTime::now())
            .and_then(|()| self.policy.admit(&claims.as_review(), &node))
            .map_err(EnrolError::by_claims)?;
        // The request's own signature is checked before anyone is asked about the token.
        ca::check_request(&req.csr)?;
        let review = {
            let _place = match peer {
                Some(ip) => Some(
                    self.reviews_by_peer
                        .take(ip, MAX_REVIEWS_PER_PEER)
                        .ok_or(EnrolError::PeerBusy(ip, MAX_REVIEWS_PER_PEER))?,
                ),
                None => None,
            };
            let _permit = self.reviews.try_acquire().map_err(|_| EnrolError::Busy(MAX_REVIEWS))?;
            self.kube.token_review(&req.token, &self.policy.audience).await?
        };
        self.policy.admit(&review, &node)?;
        let cert = self
            .ca
            .sign(&node, &name, &req.csr, self.policy.validity, SystemTime::now())?;
        Ok((node, cert))
    }
}

#[tonic::async_trait]
impl v1::enrolment_server::Enrolment for EnrolService {
    async fn enrol(&self, req: Request<v1::EnrolRequest>) -> Result<Response<v1::EnrolResponse>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let claimed = crate::csi::status::bounded(&req.node_id).into_owned();
        match self.issue(req, peer.map(|a| a.ip())).await {
            Ok((node, certificate)) => {
                tracing::info!(
                    node = node.as_str(),
                    valid_secs = self.policy.validity.as_secs(),
                    "node enrolled: issued its certificate"
                );
                Ok(Response::new(v1::EnrolResponse {
                    certificate,
                    ca: self.ca.certificate_pem().to_string(),
                }))
            }
            Err(e) => {
                tracing::warn!(node = claimed, peer = ?peer, error = %e, "enrolment refused");
                Err(Status::from(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::kube::ReviewedUser;
    use super::*;

    fn policy() -> EnrolPolicy {
        EnrolPolicy {
            audience: "cellar".into(),
            service_account: ServiceAccount::parse("cellar-system/cellar-node").unwrap(),
            validity: Duration::from_secs(3600),
            agent_server_name: "cellar-agent".into(),
        }
    }

    fn review(user: &str, nodes: &[&str]) -> Review {
        let mut extra = BTreeMap::new();
        if !nodes.is_empty() {
            extra.insert(
                NODE_NAME_EXTRA.to_string(),
                nodes.iter().map(|n| n.to_string()).collect(),
            );
        }
        Review {
            authenticated: true,
            error: String::new(),
            user: ReviewedUser {
                username: user.into(),
                extra,
            },
            audiences: vec!["cellar".into()],
        }
    }

    const NODE_SA: &str = "system:serviceaccount:cellar-system:cellar-node";

    #[test]
    fn a_token_of_the_node_service_account_bound_to_the_node_is_admitted() {
        let node = NodeId::parse("node-1").unwrap();
        policy().admit(&review(NODE_SA, &["node-1"]), &node).unwrap();
    }

    #[test]
    fn every_other_token_is_refused_saying_why() {
        let node = NodeId::parse("node-2").unwrap();
        let p = policy();
        let cases: Vec<(Review, &str)> = vec![
            (review(NODE_SA, &["node-1"]), "on node 'node-1', not on node 'node-2'"),
            (review(NODE_SA, &[]), "names no node"),
            (review(NODE_SA, &["node-2", "node-1"]), "exactly one"),
            (
                review("system:serviceaccount:default:default", &["node-2"]),
                "not to the nodes' service account",
            ),
            (
                Review {
                    audiences: vec!["https://kubernetes.default.svc".into()],
                    ..review(NODE_SA, &["node-2"])
                },
                "audience 'cellar'",
            ),
            (
                Review {
                    authenticated: false,
                    error: "token has expired".into(),
                    ..Review::default()
                },
                "token has expired",
            ),
        ];
        for (r, want) in cases {
            let e = p.admit(&r, &node).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
        }
    }
}
