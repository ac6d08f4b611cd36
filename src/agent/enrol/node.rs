//! The node's side of enrolment: obtain a certificate before anything else starts, keep it in a
//! directory (a memory-backed one in the chart), and renew it after two thirds of its life.
//!
//! The directory holds `ca.crt` (the install CA, which signed the controller's certificate,
//! followed by the enrolment CA) and `tls.pem` (the node's certificate followed by its key, in
//! one file so that a renewal replaces both in one rename). The node's TLS flags point at them,
//! so the usual rotation check (`TlsOptions::rotated`) restarts the process gracefully once a
//! renewal has written a new certificate, as for any certificate rotated in place. A certificate
//! still before its renewal point is used again after a restart of the container; a pod that is
//! replaced enrols afresh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, ClientTlsConfig};

use super::v1::{enrolment_client::EnrolmentClient, EnrolRequest};
use crate::agent::remote::HostPort;
use crate::agent::tls::{certificate_names, HANDSHAKE_TIMEOUT};
use crate::storage::id::NodeId;
use crate::sys::files::{Durability, Files, LinuxFiles};
use crate::sys::SysError;

/// The files enrolment keeps in its directory.
pub const CA_FILE: &str = "ca.crt";
pub const IDENTITY_FILE: &str = "tls.pem";

/// Waits between failed attempts: from the first to the last, doubling.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NodeEnrolError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot keep the node's certificate: {0}")]
    Files(#[from] SysError),
    #[error("cannot make a key or a CSR: {0}")]
    Key(String),
    #[error("cannot resolve the controller {controller}: {reason}")]
    Resolve { controller: String, reason: String },
    #[error("the controller at {addr} refused the enrolment ({code:?}): {message}")]
    Refused {
        addr: SocketAddr,
        code: tonic::Code,
        message: String,
    },
    #[error("the controller at {addr} cannot be reached for enrolment: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the controller at {addr} answered with a certificate that is not usable: {reason}")]
    Answer { addr: SocketAddr, reason: String },
}

/// How this node enrols.
#[derive(Debug, Clone)]
pub struct NodeEnrolment {
    /// `--controller`: the host resolves to every replica; its name is checked on their
    /// certificates.
    pub controller: HostPort,
    /// The controller's enrolment port (`--enrol-port`).
    pub port: u16,
    /// The name the controller's certificate must carry (the host of `--controller`).
    pub server_name: String,
    pub node: NodeId,
    /// The projected service-account token (`--enrol-token`), read again at every attempt.
    pub token_file: PathBuf,
    /// The CA that issued the controller's certificate (`--tls-ca`).
    pub install_ca: PathBuf,
    /// Where the key and certificate are kept (`--enrol-dir`).
    pub dir: PathBuf,
    /// A node's certificate names `<node>.<agent_server_name>`.
    pub agent_server_name: String,
    /// Bound on one attempt (lookup, connection, call).
    pub timeout: Duration,
}

impl NodeEnrolment {
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// The certificate and its key (one file).
    pub fn identity_file(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }

    fn name(&self) -> String {
        format!("{}.{}", self.node.as_str(), self.agent_server_name)
    }

    /// When the certificate already in the directory is due for renewal, if it names this node,
    /// that time has not come yet, and it was enrolled trusting the CA `--tls-ca` holds now;
    /// `None`: enrol now. A directory kept across a container restart after the controller's CA
    /// was replaced (docs/security.md, "Rotating the CAs") would otherwise keep the old CA, and
    /// the node could not reach a controller of the new one until its renewal point.
    pub fn current(&self) -> Option<SystemTime> {
        let pem = std::fs::read(self.identity_file()).ok()?;
        if !self.holds_install_ca() {
            return None;
        }
        let cert = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
        if !certificate_names(&cert, &self.name()) || !String::from_utf8_lossy(&pem).contains("PRIVATE KEY-----") {
            return None;
        }
        let at = renewal_point(&cert)?;
        (SystemTime::now() < at).then_some(at)
    }

    /// The install CA as `keep` puts it at the head of the CA file (ending with a newline);
    /// `None` when it cannot be read or holds no certificate.
    fn install_ca_head(&self) -> Option<Vec<u8>> {
        let mut ca = std::fs::read(&self.install_ca).ok()?;
        CertificateDer::pem_slice_iter(&ca).next()?.ok()?;
        if !ca.ends_with(b"\n") {
            ca.push(b'\n');
        }
        Some(ca)
    }

    /// Whether the CA file this node's TLS uses begins with the install CA as it is now.
    fn holds_install_ca(&self) -> bool {
        match (std::fs::read(self.ca_file()), self.install_ca_head()) {
            (Ok(kept), Some(now)) => kept.starts_with(&now),
            _ => false,
        }
    }

    /// Resolves once `--tls-ca` holds certificates other than those this node enrolled with:
    /// the controller's CA was rotated and published again (the chart's ConfigMap, which kubelet
    /// updates in the pod). The node then restarts, as for a renewal, and enrols anew trusting it
    /// (`current` refuses the kept certificate). An unreadable or empty file is not acted on: the
    /// certificates in use are kept. Checked every `every`.
    pub async fn install_ca_replaced(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.install_ca_head().is_some() && !self.holds_install_ca() {
                tracing::warn!(
                    node = self.node.as_str(),
                    ca = %self.install_ca.display(),
                    "the CA of the controller's certificate changed: restarting to enrol again trusting it"
                );
                return;
            }
        }
    }

    /// One enrolment with the first replica that answers: writes the files, returns when the new
    /// certificate is due for renewal.
    pub async fn enrol_once(&self) -> Result<SystemTime, NodeEnrolError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|source| NodeEnrolError::Read {
            what: "the service-account token",
            path: self.token_file.clone(),
            source,
        })?;
        let install_ca = std::fs::read(&self.install_ca).map_err(|source| NodeEnrolError::Read {
            // In the chart a ConfigMap the controller publishes on its first start: until then
            // the file is absent, and the node waits and retries.
            what: "the CA of the controller's certificate (--tls-ca; not published yet?)",
            path: self.install_ca.clone(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|e| NodeEnrolError::Key(e.to_string()))?;
        let csr = CertificateParams::new(vec![self.name()])
            .and_then(|p| p.serialize_request(&key))
            .map_err(|e| NodeEnrolError::Key(e.to_string()))?;
        let request = EnrolRequest {
            node_id: self.node.as_str().to_string(),
            token: token.trim().to_string(),
            csr: csr.der().to_vec(),
        };
        let addrs = self.resolve().await?;
        let mut last = None;
        for addr in addrs {
            match self.call(addr, &install_ca, request.clone()).await {
                Ok(answer) => return self.keep(addr, &install_ca, answer, &key),
                // A refusal is the controller's word: the other replicas would say the same.
                Err(e @ NodeEnrolError::Refused { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| NodeEnrolError::Resolve {
            controller: self.controller.to_string(),
            reason: "the name has no addresses".into(),
        }))
    }

    /// Enrols, retrying (each failure logged) until it succeeds.
    pub async fn until_enrolled(&self) -> SystemTime {
        let mut wait = FIRST_RETRY;
        loop {
            match self.enrol_once().await {
                Ok(at) => {
                    tracing::info!(
                        node = self.node.as_str(),
                        "enrolled: the controller issued this node's certificate"
                    );
                    return at;
                }
                Err(e) => {
                    tracing::warn!(node = self.node.as_str(), error = %e, retry_secs = wait.as_secs(), "cannot enrol; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(LAST_RETRY);
                }
            }
        }
    }

    /// Renews the certificate at each renewal point, forever (spawn it; abort it at shutdown).
    pub async fn renew_from(self, mut at: SystemTime) {
        loop {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            tracing::info!(node = self.node.as_str(), "renewing this node's certificate");
            at = self.until_enrolled().await;
        }
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, NodeEnrolError> {
        let failed = |reason: String| NodeEnrolError::Resolve {
            controller: self.controller.to_string(),
            reason,
        };
        let lookup = tokio::net::lookup_host((self.controller.bare_host(), self.port));
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(addrs)) => Ok(addrs.collect()),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => Err(failed("the lookup timed out".into())),
        }
    }

    async fn call(
        &self,
        addr: SocketAddr,
        install_ca: &[u8],
        request: EnrolRequest,
    ) -> Result<super::v1::EnrolResponse, NodeEnrolError> {
        let unreachable = |reason: String| NodeEnrolError::Unreachable { addr, reason };
        crate::agent::tls::use_ring();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(install_ca))
            .domain_name(self.server_name.clone())
            .timeout(HANDSHAKE_TIMEOUT);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let call = async {
            let channel = endpoint.connect().await.map_err(|e| unreachable(describe(&e)))?;
            EnrolmentClient::new(channel)
                .enrol(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                        unreachable(format!("{:?}: {}", s.code(), s.message()))
                    }
                    code => NodeEnrolError::Refused {
                        addr,
                        code,
                        message: s.message().to_string(),
                    },
                })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    /// Checks the answer and writes it: the CA file first, then the certificate with its key.
    fn keep(
        &self,
        addr: SocketAddr,
        install_ca: &[u8],
        answer: super::v1::EnrolResponse,
        key: &KeyPair,
    ) -> Result<SystemTime, NodeEnrolError> {
        let bad = |reason: String| NodeEnrolError::Answer { addr, reason };
        let cert = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
            .next()
            .ok_or_else(|| bad("no PEM certificate".into()))?
            .map_err(|e| bad(e.to_string()))?;
        if !certificate_names(&cert, &self.name()) {
            return Err(bad(format!("it does not name {}", self.name())));
        }
        let at = renewal_point(&cert).ok_or_else(|| bad("its validity cannot be read".into()))?;
        if CertificateDer::pem_slice_iter(answer.ca.as_bytes()).next().is_none() {
            return Err(bad("no PEM CA certificate".into()));
        }
        LinuxFiles.ensure_dir(&self.dir, 0o700)?;
        let mut ca = install_ca.to_vec();
        if !ca.ends_with(b"\n") {
            ca.push(b'\n');
        }
        ca.extend_from_slice(answer.ca.as_bytes());
        if std::fs::read(self.ca_file()).ok().as_deref() != Some(ca.as_slice()) {
            LinuxFiles.write_atomic(&self.ca_file(), &ca, Durability::ProcessCrash)?;
        }
        let mut identity = answer.certificate.into_bytes();
        if !identity.ends_with(b"\n") {
            identity.push(b'\n');
        }
        identity.extend_from_slice(key.serialize_pem().as_bytes());
        LinuxFiles.write_atomic(&self.identity_file(), &identity, Durability::ProcessCrash)?;
        Ok(at)
    }
}

/// Two thirds into the certificate's life.
pub fn renewal_point(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let from = parsed.validity().not_before.timestamp();
    let until = parsed.validity().not_after.timestamp();
    let at = until.checked_sub(until.checked_sub(from)? / 3)?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).ok()?))
}

/// A transport error with its causes, which tonic keeps in the chain.
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
