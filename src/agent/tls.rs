//! Mutual TLS between the controller and the nodes, in both directions (rustls, through tonic).
//!
//! Every process holds one CA, one certificate and its key. Servers (the node's agent, the
//! controller's registry) require a client certificate issued by the CA; clients verify the
//! server's certificate against the CA and a DNS name (SAN) fixed per direction, not against the
//! address they dial, because the addresses are pod or node IPs that no certificate issued at
//! install time can name:
//!
//! - the controller calls agents expecting the SAN [`AGENT_SERVER_NAME`] on every node's
//!   certificate (one certificate may serve all nodes);
//! - nodes call the registry expecting the host name they were given in `--controller`
//!   (the controller's Service name), which the controller's certificate carries as a SAN.
//!
//! Each certificate is used both as a server and as a client certificate, so it needs the
//! serverAuth and clientAuth extended key usages (or no EKU extension at all).
//! Plaintext is only possible with an explicit `insecure` flag.
//!
//! The same names bind roles on the server side ([`Callers`]): an agent serves only a caller whose
//! certificate carries the controller's name (which no node certificate carries), and the registry
//! takes heartbeats only from a certificate carrying a node's name (docs/security.md).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::Request;

/// Makes ring this process's rustls provider. The S3 client (reqwest, inside the backup
/// backends) brings aws-lc-rs too, and with two providers compiled in rustls no longer picks one by
/// itself: tonic's TLS configurations would fail at their first handshake. Idempotent.
pub fn use_ring() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The SAN the controller expects on agents' certificates unless told otherwise.
pub const AGENT_SERVER_NAME: &str = "cellar-agent";

/// How long a TLS handshake may take before the peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "TLS needs --tls-ca, --tls-cert and --tls-key ({missing} missing); --insecure turns TLS off for development"
    )]
    Missing { missing: String },
    #[error("--insecure cannot be combined with --tls-ca, --tls-cert or --tls-key: choose one")]
    Conflict,
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not usable: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The TLS flags as given: `--tls-ca`, `--tls-cert`, `--tls-key`, `--insecure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Plaintext gRPC, for development only.
    pub insecure: bool,
}

impl TlsOptions {
    /// Reads and checks the PEM files, so a bad file fails at startup naming its path.
    pub fn load(&self) -> Result<Tls, TlsError> {
        self.load_trusting(None)
    }

    /// The same, trusting the certificates of `extra_ca` (PEM) besides the CA file's: the
    /// controller also trusts the CA that signs enrolled nodes' certificates.
    pub fn load_trusting(&self, extra_ca: Option<&[u8]>) -> Result<Tls, TlsError> {
        match (&self.ca, &self.cert, &self.key, self.insecure) {
            (None, None, None, true) => Ok(Tls::Insecure),
            (_, _, _, true) => Err(TlsError::Conflict),
            (Some(ca), Some(cert), Some(key), false) => {
                let mut ca_pem = read("CA file", ca)?;
                if let Some(extra) = extra_ca {
                    if !ca_pem.ends_with(b"\n") {
                        ca_pem.push(b'\n');
                    }
                    ca_pem.extend_from_slice(extra);
                }
                let cert_pem = read("certificate file", cert)?;
                let key_pem = read("key file", key)?;
                check_certs("CA file", ca, &ca_pem)?;
                check_certs("certificate file", cert, &cert_pem)?;
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
                    what: "key file",
                    path: key.clone(),
                    reason: format!("no PEM private key in it ({e})"),
                })?;
                Tls::from_checked_pem(ca_pem, cert_pem, key_pem).map_err(|reason| TlsError::Pem {
                    what: "key file",
                    path: key.clone(),
                    reason,
                })
            }
            (ca, cert, key, false) => {
                let missing = [("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)]
                    .iter()
                    .filter(|(_, p)| p.is_none())
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(TlsError::Missing { missing })
            }
        }
    }
}

/// How often the TLS files are checked for a rotation; `CELLAR_TLS_CHECK_SECONDS` overrides it.
pub const ROTATION_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

impl TlsOptions {
    /// A digest of the three files as they are now; `None` for plaintext or when one cannot be read.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in [&self.ca, &self.cert, &self.key] {
            let bytes = std::fs::read(p.as_ref()?).ok()?;
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        Some(h.finalize().into())
    }

    /// Resolves once the TLS files hold other material than at start and that material loads:
    /// certificates rotated in place (cert-manager renewing them, the chart's Secret updated), which
    /// the process then restarts to use. Material that does not load is logged and not acted on.
    /// Never resolves for plaintext.
    pub async fn rotated(self, every: std::time::Duration) {
        let Some(first) = self.fingerprint() else {
            return std::future::pending().await;
        };
        let mut warned: Option<[u8; 32]> = None;
        loop {
            tokio::time::sleep(every).await;
            let Some(now) = self.fingerprint() else { continue };
            if now == first || warned == Some(now) {
                continue;
            }
            match self.load() {
                Ok(_) => {
                    tracing::warn!("the TLS files changed (certificate rotation): restarting to use them");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the TLS files changed but do not load; the certificates in use are kept");
                    warned = Some(now);
                }
            }
        }
    }
}

/// The interval of the rotation check: `CELLAR_TLS_CHECK_SECONDS`, else [`ROTATION_CHECK`].
pub fn rotation_check() -> std::time::Duration {
    super::seconds_from_env("CELLAR_TLS_CHECK_SECONDS").unwrap_or(ROTATION_CHECK)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn check_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    let bad = |reason: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(())
}

/// The loaded TLS material, or the explicit choice of plaintext.
#[derive(Clone)]
pub enum Tls {
    Insecure,
    Mutual(Arc<Material>),
}

pub struct Material {
    ca: Certificate,
    identity: Identity,
    /// One TLS client configuration (CA roots, our certificate and key, session cache) for every
    /// channel this process dials: tonic's own TLS builds one per endpoint, about 10 KiB each,
    /// 10 MiB in a controller of 1,000 nodes. Each connection checks its own peer's name.
    client: Arc<rustls::ClientConfig>,
    /// The same key and certificates for signing and checking transfer grants (`agent::grant`).
    pub(crate) signing: Signing,
}

/// This process's key as a signer, its certificate chain, and a checker of chains from the CA.
pub(crate) struct Signing {
    pub(crate) key: Arc<dyn rustls::sign::SigningKey>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        match self {
            Tls::Insecure => f.write_str("Tls::Insecure"),
            Tls::Mutual(_) => f.write_str("Tls::Mutual"),
        }
    }
}

impl Tls {
    /// Mutual TLS from PEM text: the CA, this process's certificate (chain) and its private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Tls, TlsError> {
        let here = Path::new("(in memory)");
        check_certs("CA", here, ca)?;
        check_certs("certificate", here, cert)?;
        PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "key",
            path: here.to_path_buf(),
            reason: format!("no PEM private key in it ({e})"),
        })?;
        Tls::from_checked_pem(ca.to_vec(), cert.to_vec(), key.to_vec()).map_err(|reason| TlsError::Pem {
            what: "key",
            path: here.to_path_buf(),
            reason,
        })
    }

    /// PEM text that was checked to hold certificates and a key; what is wrong otherwise.
    fn from_checked_pem(ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> Result<Tls, String> {
        let signing = Signing::from_pem(&ca, &cert, &key)?;
        let client = shared_client_config(&ca, &signing)?;
        Ok(Tls::Mutual(Arc::new(Material {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            client,
            signing,
        })))
    }

    /// The signing half of the material; `None` over plaintext.
    pub(crate) fn signing(&self) -> Option<&Signing> {
        match self {
            Tls::Insecure => None,
            Tls::Mutual(m) => Some(&m.signing),
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Tls::Insecure)
    }

    /// The URI scheme to dial peers with.
    pub fn scheme(&self) -> &'static str {
        match self {
            Tls::Insecure => "http",
            Tls::Mutual(_) => "https",
        }
    }

    /// Server side: present our certificate, require one from the CA.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        use_ring();
        match self {
            Tls::Insecure => None,
            Tls::Mutual(m) => self
                .server_only_config()
                .map(|c| c.client_ca_root(m.ca.clone()).client_auth_optional(false)),
        }
    }

    /// Server side for callers that have no certificate yet (node enrolment): present ours, ask
    /// for none.
    pub fn server_only_config(&self) -> Option<ServerTlsConfig> {
        use_ring();
        match self {
            Tls::Insecure => None,
            Tls::Mutual(m) => Some(
                ServerTlsConfig::new()
                    .identity(m.identity.clone())
                    .timeout(HANDSHAKE_TIMEOUT),
            ),
        }
    }

    /// Client side: present our certificate, accept a server whose certificate the CA issued
    /// for `server_name`.
    pub fn client_config(&self, server_name: &str) -> Option<ClientTlsConfig> {
        use_ring();
        match self {
            Tls::Insecure => None,
            Tls::Mutual(m) => Some(
                ClientTlsConfig::new()
                    .ca_certificate(m.ca.clone())
                    .identity(m.identity.clone())
                    .domain_name(server_name)
                    .timeout(HANDSHAKE_TIMEOUT),
            ),
        }
    }

    /// The callers whose certificate names `name`; anyone over plaintext.
    pub fn callers(&self, name: &str) -> Callers {
        match self {
            Tls::Insecure => Callers::Anyone,
            Tls::Mutual(_) => Callers::Named(name.to_string()),
        }
    }

    /// A tonic server builder with our TLS (or none, when insecure).
    pub fn server_builder(&self) -> Result<tonic::transport::Server, TlsError> {
        let builder = tonic::transport::Server::builder();
        Ok(match self.server_config() {
            Some(c) => builder.tls_config(c)?,
            None => builder,
        })
    }

    /// A channel to `authority` (HOST:PORT or IP:PORT) whose server must hold a certificate for
    /// `server_name`. It connects on its first call (TCP within `connect_timeout`, the handshake
    /// within [`HANDSHAKE_TIMEOUT`]) and again whenever the connection was lost. `tune` sets the
    /// endpoint's HTTP/2 options. All channels share this process's one TLS client configuration.
    pub fn lazy_channel(
        &self,
        authority: &str,
        server_name: &str,
        connect_timeout: Duration,
        tune: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Channel, TlsError> {
        let m = match self {
            Tls::Insecure => {
                let endpoint = self.endpoint(authority, server_name)?.connect_timeout(connect_timeout);
                return Ok(tune(endpoint.tcp_nodelay(true)).connect_lazy());
            }
            Tls::Mutual(m) => m,
        };
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Pem {
            what: "peer name",
            path: PathBuf::from(server_name),
            reason: e.to_string(),
        })?;
        // The scheme says only what tonic itself does: the connector below brings the TLS.
        let endpoint = tune(tonic::transport::Endpoint::from_shared(format!("http://{authority}"))?);
        let connector = tokio_rustls::TlsConnector::from(m.client.clone());
        let authority = authority.to_string();
        let dial = tower::service_fn(move |_: http::Uri| {
            let (connector, name, authority) = (connector.clone(), name.clone(), authority.clone());
            async move {
                let timed_out = |what: &str| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} {authority} timed out"))
                };
                let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(&authority))
                    .await
                    .map_err(|_| timed_out("connecting to"))??;
                tcp.set_nodelay(true)?;
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| timed_out("TLS handshake with"))??;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(dial))
    }

    /// A channel endpoint for `authority` (HOST:PORT or IP:PORT), verifying `server_name`.
    pub fn endpoint(&self, authority: &str, server_name: &str) -> Result<tonic::transport::Endpoint, TlsError> {
        let uri = format!("{}://{authority}", self.scheme());
        let endpoint = tonic::transport::Endpoint::from_shared(uri)?;
        Ok(match self.client_config(server_name) {
            Some(c) => endpoint.tls_config(c)?,
            None => endpoint,
        })
    }
}

/// The rustls client side of mutual TLS: servers the CA issued, our chain and key presented,
/// HTTP/2 offered by ALPN.
fn shared_client_config(ca: &[u8], signing: &Signing) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = ca_roots(ca)?;
    let own = Arc::new(rustls::sign::CertifiedKey::new(
        signing.chain.clone(),
        signing.key.clone(),
    ));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("no TLS version to offer ({e})"))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(OwnCertificate(own)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The CA's certificates (PEM) as the roots a peer's chain must lead to.
fn ca_roots(ca: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        let c = c.map_err(|e| format!("bad PEM CA certificate ({e})"))?;
        roots
            .add(c)
            .map_err(|e| format!("a CA certificate is not usable ({e})"))?;
    }
    Ok(roots)
}

/// Presents this process's certificate to every server that asks for one.
#[derive(Debug)]
struct OwnCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl Signing {
    fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Signing, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("no PEM private key in it ({e})"))?;
        let key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("the key cannot sign ({e})"))?;
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad PEM certificate ({e})"))?;
        let roots = ca_roots(ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("the CA cannot check certificates ({e})"))?;
        Ok(Signing { key, chain, verifier })
    }
}

/// Whether a certificate (DER) is valid for `name`, a DNS name or an IP address, by the rules a
/// TLS client applies to a server's certificate (SANs; a wildcard covers one label).
pub fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Why a certificate (DER) no longer vouches for anyone at `now`: past its end (or before its
/// start, or its validity unreadable); `None` while it is valid. The handshake checked this once,
/// when the connection opened, and a connection lasts as long as its peer answers the pings.
pub fn certificate_ended(cert: &CertificateDer<'_>, now: std::time::SystemTime) -> Option<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Some("has a validity that cannot be read".into());
    };
    let secs = |t: std::time::SystemTime| match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    let (from, until) = (
        parsed.validity().not_before.timestamp(),
        parsed.validity().not_after.timestamp(),
    );
    let now = secs(now);
    if now > until {
        Some(format!("expired {} s ago", now - until))
    } else if now < from {
        Some(format!("is not valid for another {} s", from - now))
    } else {
        None
    }
}

/// The client certificate of a call on a mutual-TLS server (the first of its chain, which the
/// handshake checked against the CA); `None` over plaintext.
pub fn peer_certificate<T>(req: &Request<T>) -> Option<CertificateDer<'static>> {
    req.peer_certs().and_then(|chain| chain.first().cloned())
}

/// Who may call a service: a caller whose client certificate carries one name. The handshake has
/// already proved that the certificate comes from the CA; this says which role it was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callers {
    /// Plaintext (`--insecure`, development): callers cannot be told apart.
    Anyone,
    /// Only a certificate valid for this name.
    Named(String),
}

impl Callers {
    /// Lets the call through, or says which name was wanted.
    pub fn admit<T>(&self, req: &Request<T>, role: &'static str) -> Result<(), Refused> {
        match self {
            Callers::Anyone => Ok(()),
            Callers::Named(name) => match peer_certificate(req) {
                // A certificate past its end vouches for no one, even over a connection its
                // handshake opened while it was valid (revocation is by expiry).
                Some(cert) if certificate_names(&cert, name) => {
                    match certificate_ended(&cert, std::time::SystemTime::now()) {
                        None => Ok(()),
                        Some(why) => Err(Refused::Ended { role, why }),
                    }
                }
                Some(_) => Err(Refused::NotNamed {
                    role,
                    name: name.clone(),
                }),
                None => Err(Refused::NoCertificate { role }),
            },
        }
    }
}

/// A call an agent turns away before it runs: its caller is not the one it serves, or the call
/// is meant for another node. `csi::status` gives each its code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("only {role} may call this service: the caller's certificate does not name '{name}'")]
    NotNamed { role: &'static str, name: String },
    #[error("only {role} may call this service: the caller presented no certificate")]
    NoCertificate { role: &'static str },
    #[error("only {role} may call this service: the caller's certificate {why}")]
    Ended { role: &'static str, why: String },
    #[error("the {header} header is required: it names the node the call is meant for ({node})", header = super::remote::NODE_HEADER)]
    NoNode { node: String },
    #[error("this agent serves node {serves}, not {asked}")]
    OtherNode { serves: String, asked: String },
}

#[cfg(test)]
mod tests {

    /// A certificate vouches for its holder only between its start and its end, checked at each
    /// call (`Callers::admit`, the registry), not only when the connection opened.
    #[test]
    fn a_certificate_is_ended_outside_its_validity_only() {
        use std::time::{Duration, SystemTime};
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["cellar-controller".to_string()]).expect("params");
        let start = SystemTime::now() - Duration::from_secs(3600);
        params.not_before = start.into();
        params.not_after = (start + Duration::from_secs(1800)).into();
        let cert = params.self_signed(&key).expect("cert");
        let der = cert.der().clone();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(super::certificate_ended(&der, at(60)), None, "valid in its window");
        let late = super::certificate_ended(&der, at(1800 + 120)).expect("past its end");
        assert!(late.contains("expired 120 s ago"), "{late}");
        let early = super::certificate_ended(&der, start - Duration::from_secs(30)).expect("before its start");
        assert!(early.contains("not valid for another 30 s"), "{early}");
        assert!(
            super::certificate_ended(&der, SystemTime::now()).is_some(),
            "ended an hour after it began"
        );
        let garbage = rustls_pki_types::CertificateDer::from(vec![1u8, 2, 3]);
        assert!(super::certificate_ended(&garbage, SystemTime::now()).is_some());
    }
    use super::*;

    #[test]
    fn tls_without_files_or_insecure_is_refused() {
        let e = TlsOptions::default().load().unwrap_err();
        assert!(e.to_string().contains("--tls-ca, --tls-cert, --tls-key missing"), "{e}");
        let half = TlsOptions {
            ca: Some("/ca.pem".into()),
            ..Default::default()
        };
        let e = half.load().unwrap_err();
        assert!(e.to_string().contains("(--tls-cert, --tls-key missing)"), "{e}");
    }

    #[test]
    fn insecure_with_files_is_refused() {
        let both = TlsOptions {
            ca: Some("/ca.pem".into()),
            insecure: true,
            ..Default::default()
        };
        assert!(matches!(both.load(), Err(TlsError::Conflict)));
    }

    #[test]
    fn insecure_alone_is_plaintext() {
        let t = TlsOptions {
            insecure: true,
            ..Default::default()
        }
        .load()
        .unwrap();
        assert!(t.is_insecure());
        assert_eq!(t.scheme(), "http");
        assert!(t.server_config().is_none());
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();
        let opts = TlsOptions {
            ca: Some(dir.path().join("absent.pem")),
            cert: Some(junk.clone()),
            key: Some(junk.clone()),
            insecure: false,
        };
        let e = opts.load().unwrap_err();
        assert!(e.to_string().contains("absent.pem"), "{e}");
        let opts = TlsOptions {
            ca: Some(junk.clone()),
            ..opts
        };
        let e = opts.load().unwrap_err();
        assert!(
            e.to_string().contains("junk.pem") && e.to_string().contains("no PEM certificate"),
            "{e}"
        );
    }
}
