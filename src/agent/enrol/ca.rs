//! The enrolment CA: the key the controller signs node certificates with.
//!
//! It is made by the controller itself on its first start and kept in a Secret of its namespace
//! (`kubernetes.io/tls`: `tls.crt`, `tls.key`), so nothing about it is rendered by Helm and a
//! `helm template` stays the same from one run to the next. Replicas starting together race to
//! create it: each makes a CA, one create wins, the others get a conflict and read the winner's,
//! so every replica signs with the same CA.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;

use super::kube::{Created, Kube, KubeError, SecretData};
use crate::storage::id::NodeId;

/// The CA's common name.
pub const CA_NAME: &str = "cellar enrolment CA";
/// How long a CA made by the controller is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(
        "the Secret {secret} holds no usable enrolment CA ({reason}); delete it for the controller to make a new one"
    )]
    Unusable { secret: String, reason: String },
    #[error("the certificate signing request is not usable: {0}")]
    Csr(String),
    #[error("cannot make or sign a certificate: {0}")]
    Sign(String),
    #[error("the Secret {0} was created and deleted again while the controller read it; retry")]
    Vanished(String),
}

/// Which Secret holds the CA: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl SecretRef {
    /// `NAMESPACE/NAME`, each a DNS label or subdomain as Kubernetes names are.
    pub fn parse(s: &str) -> Result<SecretRef, String> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' must be NAMESPACE/NAME"))?;
        for part in [namespace, name] {
            if !is_dns_name(part) {
                return Err(format!(
                    "'{s}': '{part}' is not a Kubernetes name (lower-case letters, digits, '-' and '.', at most 253)"
                ));
            }
        }
        Ok(SecretRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// A DNS subdomain as Kubernetes names objects: lower-case alphanumerics, '-' and '.', at most 253.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

pub struct EnrolmentCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for EnrolmentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("EnrolmentCa")
    }
}

impl EnrolmentCa {
    /// A new CA: its certificate and key, PEM. It can vouch only for names under `nodes_under`
    /// (`cellar-agent`: the nodes' names) and for no IP address (name constraints, which TLS
    /// clients enforce), so even its key cannot make a certificate that passes as the controller.
    pub fn generate(nodes_under: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| CaError::Sign(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName(nodes_under.to_string())],
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<EnrolmentCa, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("tls.key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("tls.crt: {e}"))?;
        Ok(EnrolmentCa {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA's certificate, PEM: what peers must trust to accept enrolled nodes.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs the public key of `csr` (DER, its signature checked) as a certificate for `node`
    /// alone, naming `name` (`<node>.cellar-agent`), valid for `validity` from `now`. Nothing the
    /// request asks for besides its key is used.
    pub fn sign(
        &self,
        node: &NodeId,
        name: &str,
        csr: &[u8],
        validity: Duration,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(|e| CaError::Sign(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, format!("node {}", node.as_str()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        // A little slack for clocks a few seconds apart, never more than a tenth of the life.
        params.not_before = (now - backdate(validity)).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(serial());
        let cert = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(cert.pem())
    }
}

/// Parses a certificate signing request (DER) and checks its signature.
pub fn check_request(csr: &[u8]) -> Result<(), CaError> {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
        .map(|_| ())
        .map_err(|e| CaError::Csr(e.to_string()))
}

fn backdate(validity: Duration) -> Duration {
    (validity / 10).min(Duration::from_secs(60))
}

fn serial() -> SerialNumber {
    let mut bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// The CA in `secret`, made and stored there first if there is none (for names under
/// `nodes_under`). Safe for replicas racing: the create that loses reads the one that won.
pub async fn obtain(kube: &Kube, secret: &SecretRef, nodes_under: &str) -> Result<EnrolmentCa, CaError> {
    if let Some(data) = kube.secret(&secret.namespace, &secret.name).await? {
        return from_secret(secret, &data);
    }
    let (cert, key) = EnrolmentCa::generate(nodes_under)?;
    let data: SecretData = [
        ("tls.crt".to_string(), cert.clone().into_bytes()),
        ("tls.key".to_string(), key.clone().into_bytes()),
    ]
    .into();
    match kube
        .create_secret(&secret.namespace, &secret.name, "kubernetes.io/tls", &data)
        .await?
    {
        Created::Created => {
            tracing::info!(secret = %secret, "made the enrolment CA");
            EnrolmentCa::from_pem(&cert, &key).map_err(|reason| CaError::Unusable {
                secret: secret.to_string(),
                reason,
            })
        }
        Created::AlreadyExists => {
            tracing::info!(secret = %secret, "another replica made the enrolment CA first; using it");
            match kube.secret(&secret.namespace, &secret.name).await? {
                Some(data) => from_secret(secret, &data),
                None => Err(CaError::Vanished(secret.to_string())),
            }
        }
    }
}

fn from_secret(secret: &SecretRef, data: &SecretData) -> Result<EnrolmentCa, CaError> {
    let unusable = |reason: String| CaError::Unusable {
        secret: secret.to_string(),
        reason,
    };
    let text = |key: &str| -> Result<String, CaError> {
        let bytes = data.get(key).ok_or_else(|| unusable(format!("no {key}")))?;
        String::from_utf8(bytes.clone()).map_err(|_| unusable(format!("{key} is not PEM text")))
    };
    EnrolmentCa::from_pem(&text("tls.crt")?, &text("tls.key")?).map_err(unusable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(names: Vec<String>) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let req = CertificateParams::new(names).unwrap().serialize_request(&key).unwrap();
        (req.der().to_vec(), key)
    }

    #[test]
    fn a_signed_certificate_names_only_the_node_whatever_the_request_asks() {
        let (cert, key) = EnrolmentCa::generate("cellar-agent").unwrap();
        let ca = EnrolmentCa::from_pem(&cert, &key).unwrap();
        let node = NodeId::parse("node-1").unwrap();
        let (der, _) = csr(vec![
            "cellar-controller.cellar-system.svc".into(),
            "cellar-agent".into(),
        ]);
        let pem = ca
            .sign(
                &node,
                "node-1.cellar-agent",
                &der,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let leaf = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        use rustls_pki_types::pem::PemObject;
        assert!(crate::agent::tls::certificate_names(&leaf, "node-1.cellar-agent"));
        assert!(!crate::agent::tls::certificate_names(&leaf, "cellar-agent"));
        assert!(!crate::agent::tls::certificate_names(
            &leaf,
            "cellar-controller.cellar-system.svc"
        ));
    }

    #[test]
    fn a_request_with_a_bad_signature_or_no_request_is_refused() {
        let (cert, key) = EnrolmentCa::generate("cellar-agent").unwrap();
        let ca = EnrolmentCa::from_pem(&cert, &key).unwrap();
        let node = NodeId::parse("node-1").unwrap();
        let (mut der, _) = csr(vec!["node-1.cellar-agent".into()]);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let e = ca
            .sign(
                &node,
                "node-1.cellar-agent",
                &der,
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(e, CaError::Csr(_)), "{e}");
        let e = ca
            .sign(
                &node,
                "node-1.cellar-agent",
                b"junk",
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(e, CaError::Csr(_)), "{e}");
    }

    /// Whether a server certificate for `name`, signed with the CA's key, passes a TLS client
    /// that trusts the CA (rustls, as every cellar client).
    fn passes(ca_pem: &str, ca_key: &str, name: &str) -> bool {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::client::danger::ServerCertVerifier;
        let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key).unwrap()).unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .unwrap();
        let server = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(leaf.der(), &[], &server, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn even_the_cas_key_cannot_vouch_for_the_controller_or_an_address() {
        let (cert, key) = EnrolmentCa::generate("cellar-agent").unwrap();
        assert!(passes(&cert, &key, "node-1.cellar-agent"));
        assert!(!passes(&cert, &key, "cellar-controller.cellar-system.svc"));
        assert!(!passes(&cert, &key, "localhost"));
        assert!(!passes(&cert, &key, "10.96.0.10"));
        assert!(!passes(&cert, &key, "fd00::10"));
    }

    #[test]
    fn secret_names_are_namespace_and_name() {
        let s = SecretRef::parse("cellar-system/cellar-enrolment-ca").unwrap();
        assert_eq!(s.to_string(), "cellar-system/cellar-enrolment-ca");
        for bad in ["cellar", "a/B", "/x", "a/", "a/b/c", "a/-b"] {
            assert!(SecretRef::parse(bad).is_err(), "{bad}");
        }
    }
}
