//! The CAs the controller keeps: the **enrolment CA**, which signs node certificates, and the
//! **cluster CA**, which signs the controller's own certificate (docs/security.md).
//!
//! Each is made by the controller itself on its first start and kept in a Secret of its namespace
//! (`kubernetes.io/tls`: `tls.crt`, `tls.key`), so nothing about it is rendered by Helm and a
//! `helm template` stays the same from one run to the next. Replicas starting together race to
//! create it: each makes a CA, one create wins, the others get a conflict and read the winner's,
//! so every replica signs with the same CA. Each CA is name-constrained to its role's names: the
//! enrolment CA to `*.cellar-agent`, the cluster CA to the controller's Service names, so neither
//! key can make a certificate that passes as the other role.
//!
//! The cluster CA's certificate (never its key) is published in a ConfigMap, which the node pods
//! mount to check the controller's certificate.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CidrSubnet, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;

use super::kube::{ConfigMapData, Created, Kube, KubeError, SecretData};
use crate::storage::id::NodeId;

/// How long a CA made by the controller is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Which CA: its name, and the only DNS names (with their subdomains) it may vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRole {
    /// What it is called in logs and errors, and its certificate's common name
    /// (`cellar <what>`).
    pub what: &'static str,
    pub permitted: Vec<String>,
}

impl CaRole {
    /// The enrolment CA: names under `nodes_under` (`cellar-agent`) only.
    pub fn enrolment(nodes_under: &str) -> CaRole {
        CaRole {
            what: "enrolment CA",
            permitted: vec![nodes_under.to_string()],
        }
    }

    /// The cluster CA: the controller's names only.
    pub fn cluster(controller_names: &[String]) -> CaRole {
        CaRole {
            what: "cluster CA",
            permitted: controller_names.to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the Secret {secret} holds no usable {what} ({reason}); delete it for the controller to make a new one")]
    Unusable {
        what: &'static str,
        secret: String,
        reason: String,
    },
    #[error(
        "the {what} in the Secret {secret} cannot vouch for '{name}' (it was made for other names); delete the Secret for the controller to make a new one (docs/security.md, \"Rotating the CAs\")"
    )]
    OtherNames {
        what: &'static str,
        secret: String,
        name: String,
    },
    #[error("the certificate signing request is not usable: {0}")]
    Csr(String),
    #[error("cannot make or sign a certificate: {0}")]
    Sign(String),
    #[error("the Secret {0} was created and deleted again while the controller read it; retry")]
    Vanished(String),
}

/// A Kubernetes object of the controller's namespace (the Secret holding a CA, the ConfigMap
/// publishing one): `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ObjectRef {
    /// `NAMESPACE/NAME`, each a DNS label or subdomain as Kubernetes names are.
    pub fn parse(s: &str) -> Result<ObjectRef, String> {
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
        Ok(ObjectRef {
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

/// A CA the controller signs with.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("Ca")
    }
}

impl Ca {
    /// A new CA for `role`: its certificate and key, PEM. It can vouch only for the role's names
    /// (and their subdomains) and for no IP address (name constraints, which TLS clients
    /// enforce): even the enrolment CA's key cannot make a certificate that passes as the
    /// controller, nor the cluster CA's one that passes as a node.
    pub fn generate(role: &CaRole) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| CaError::Sign(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cellar {}", role.what));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: role.permitted.iter().cloned().map(GeneralSubtree::DnsName).collect(),
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

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("tls.key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("tls.crt: {e}"))?;
        Ok(Ca {
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
        let unit = format!("node {}", node.as_str());
        self.certify(&[name.to_string()], &unit, &request.public_key, validity, now)
    }

    /// A new key and a certificate for it naming `names` (the controller's own identity), valid
    /// for `validity` from `now`: the certificate and the key, PEM.
    pub fn issue(&self, names: &[String], validity: Duration, now: SystemTime) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let cert = self.certify(names, "controller", &key, validity, now)?;
        Ok((cert, key.serialize_pem()))
    }

    /// A leaf certificate for `public_key` naming `names`, serving and calling (both extended
    /// key usages), in the organizational unit `unit`.
    fn certify(
        &self,
        names: &[String],
        unit: &str,
        public_key: &impl PublicKeyData,
        validity: Duration,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let first = names
            .first()
            .ok_or_else(|| CaError::Sign("no name to certify".into()))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, first.as_str());
        params.distinguished_name.push(DnType::OrganizationalUnitName, unit);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        // A little slack for clocks a few seconds apart, never more than a tenth of the life.
        params.not_before = (now - backdate(validity)).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(serial());
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(cert.pem())
    }
}

/// Whether a TLS client that trusts `ca_pem` (rustls, as every cellar peer) accepts `leaf_pem` as
/// a server's certificate for `name`: the chain, the usages and the CA's name constraints.
pub fn vouches_for(ca_pem: &str, leaf_pem: &str, name: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    let (Ok(ca), Ok(leaf), Ok(server)) = (
        CertificateDer::from_pem_slice(ca_pem.as_bytes()),
        CertificateDer::from_pem_slice(leaf_pem.as_bytes()),
        ServerName::try_from(name.to_string()),
    ) else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca).is_err() {
        return false;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .is_ok_and(|v| v.verify_server_cert(&leaf, &[], &server, &[], UnixTime::now()).is_ok())
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

/// The CA of `role` in `secret`, made and stored there first if there is none. Safe for replicas
/// racing: the create that loses reads the one that won.
pub async fn obtain(kube: &Kube, secret: &ObjectRef, role: &CaRole) -> Result<Ca, CaError> {
    let what = role.what;
    if let Some(data) = kube.secret(&secret.namespace, &secret.name).await? {
        return from_secret(what, secret, &data);
    }
    let (cert, key) = Ca::generate(role)?;
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
            tracing::info!(secret = %secret, "made the {what}");
            Ca::from_pem(&cert, &key).map_err(|reason| CaError::Unusable {
                what,
                secret: secret.to_string(),
                reason,
            })
        }
        Created::AlreadyExists => {
            tracing::info!(secret = %secret, "another replica made the {what} first; using it");
            match kube.secret(&secret.namespace, &secret.name).await? {
                Some(data) => from_secret(what, secret, &data),
                None => Err(CaError::Vanished(secret.to_string())),
            }
        }
    }
}

/// The key of the published CA certificate in its ConfigMap (the file the node pods mount).
pub const PUBLISHED_CA_KEY: &str = "ca.crt";

/// Publishes the CA certificate `ca_pem` (public: never the key) in the ConfigMap `at`, creating
/// it, or replacing what it holds when the CA changed (a CA made anew after its Secret was
/// deleted). Replicas racing write the same text.
pub async fn publish(kube: &Kube, at: &ObjectRef, ca_pem: &str) -> Result<(), CaError> {
    let want: ConfigMapData = [(PUBLISHED_CA_KEY.to_string(), ca_pem.to_string())].into();
    let found = match kube.config_map(&at.namespace, &at.name).await? {
        Some(found) => found,
        None => match kube.create_config_map(&at.namespace, &at.name, &want).await? {
            Created::Created => {
                tracing::info!(config_map = %at, "published the cluster CA's certificate");
                return Ok(());
            }
            Created::AlreadyExists => kube
                .config_map(&at.namespace, &at.name)
                .await?
                .ok_or_else(|| CaError::Vanished(at.to_string()))?,
        },
    };
    if found != want {
        kube.replace_config_map(&at.namespace, &at.name, &want).await?;
        tracing::warn!(config_map = %at, "the published CA certificate was not the cluster CA's: replaced it (node pods trust the new one once they re-enrol)");
    }
    Ok(())
}

/// The controller's own identity: a certificate and its key (PEM), and when it is due for
/// renewal (two thirds into its life).
pub struct OwnIdentity {
    pub cert: String,
    pub key: String,
    pub renew_at: SystemTime,
}

/// The controller's own certificate from the cluster CA `ca` (kept in `secret`), for `names`.
/// Refuses a CA that cannot vouch for every name (made for other Service names), so a mismatch
/// stops the start instead of failing every node's handshake.
pub fn controller_identity(
    ca: &Ca,
    secret: &ObjectRef,
    names: &[String],
    validity: Duration,
) -> Result<OwnIdentity, CaError> {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = ca.issue(names, validity, SystemTime::now())?;
    if let Some(name) = names.iter().find(|n| !vouches_for(ca.certificate_pem(), &cert, n)) {
        return Err(CaError::OtherNames {
            what: "cluster CA",
            secret: secret.to_string(),
            name: name.clone(),
        });
    }
    let renew_at = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
        .ok()
        .and_then(|der| super::node::renewal_point(&der))
        .ok_or_else(|| CaError::Sign("the certificate made has no readable validity".into()))?;
    Ok(OwnIdentity { cert, key, renew_at })
}

fn from_secret(what: &'static str, secret: &ObjectRef, data: &SecretData) -> Result<Ca, CaError> {
    let unusable = |reason: String| CaError::Unusable {
        what,
        secret: secret.to_string(),
        reason,
    };
    let text = |key: &str| -> Result<String, CaError> {
        let bytes = data.get(key).ok_or_else(|| unusable(format!("no {key}")))?;
        String::from_utf8(bytes.clone()).map_err(|_| unusable(format!("{key} is not PEM text")))
    };
    Ca::from_pem(&text("tls.crt")?, &text("tls.key")?).map_err(unusable)
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
        let (cert, key) = Ca::generate(&CaRole::enrolment("cellar-agent")).unwrap();
        let ca = Ca::from_pem(&cert, &key).unwrap();
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
        let (cert, key) = Ca::generate(&CaRole::enrolment("cellar-agent")).unwrap();
        let ca = Ca::from_pem(&cert, &key).unwrap();
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

    /// Whether a server certificate for `name`, signed with the CA's key whatever it may vouch
    /// for, passes a TLS client that trusts the CA.
    fn passes(ca_pem: &str, ca_key: &str, name: &str) -> bool {
        let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key).unwrap()).unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap();
        vouches_for(ca_pem, &leaf.pem(), name)
    }

    #[test]
    fn even_the_cas_key_cannot_vouch_for_the_controller_or_an_address() {
        let (cert, key) = Ca::generate(&CaRole::enrolment("cellar-agent")).unwrap();
        assert!(passes(&cert, &key, "node-1.cellar-agent"));
        assert!(!passes(&cert, &key, "cellar-controller.cellar-system.svc"));
        assert!(!passes(&cert, &key, "localhost"));
        assert!(!passes(&cert, &key, "10.96.0.10"));
        assert!(!passes(&cert, &key, "fd00::10"));
    }

    fn controller_names() -> Vec<String> {
        [
            "cellar-controller",
            "cellar-controller.cellar-system",
            "cellar-controller.cellar-system.svc",
            "cellar-controller.cellar-system.svc.cluster.local",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn the_cluster_cas_key_vouches_for_the_controller_and_for_no_node() {
        let (cert, key) = Ca::generate(&CaRole::cluster(&controller_names())).unwrap();
        for name in controller_names() {
            assert!(passes(&cert, &key, &name), "{name}");
        }
        assert!(!passes(&cert, &key, "node-1.cellar-agent"));
        assert!(!passes(&cert, &key, "cellar-agent"));
        assert!(!passes(&cert, &key, "other-controller.cellar-system.svc"));
        assert!(!passes(&cert, &key, "10.96.0.10"));
    }

    #[test]
    fn the_controller_identity_names_every_service_name_and_is_short_lived() {
        let (cert, key) = Ca::generate(&CaRole::cluster(&controller_names())).unwrap();
        let ca = Ca::from_pem(&cert, &key).unwrap();
        let secret = ObjectRef::parse("cellar-system/cellar-ca").unwrap();
        let day = Duration::from_secs(24 * 3600);
        let own = controller_identity(&ca, &secret, &controller_names(), day).unwrap();
        let leaf = own.cert;
        assert!(own.key.contains("PRIVATE KEY"));
        let left = own.renew_at.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > day / 2 && left < day * 2 / 3 + Duration::from_secs(1),
            "{left:?}"
        );
        for name in controller_names() {
            assert!(vouches_for(&cert, &leaf, &name), "{name}");
        }
        let der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
        use rustls_pki_types::pem::PemObject;
        assert!(!crate::agent::tls::certificate_names(&der, "node-1.cellar-agent"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let life = parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
        assert!(life <= 24 * 3600 + 60, "{life}");
    }

    #[test]
    fn a_cluster_ca_made_for_other_names_is_refused_saying_what_to_do() {
        let (cert, key) = Ca::generate(&CaRole::cluster(&controller_names())).unwrap();
        let ca = Ca::from_pem(&cert, &key).unwrap();
        let secret = ObjectRef::parse("cellar-system/cellar-ca").unwrap();
        let renamed = vec!["cellar2-controller.cellar-system.svc".to_string()];
        let Err(e) = controller_identity(&ca, &secret, &renamed, Duration::from_secs(3600)) else {
            panic!("a CA for other names must be refused");
        };
        let text = e.to_string();
        assert!(
            text.contains("cannot vouch for 'cellar2-controller.cellar-system.svc'")
                && text.contains("delete the Secret"),
            "{text}"
        );
    }

    #[test]
    fn secret_names_are_namespace_and_name() {
        let s = ObjectRef::parse("cellar-system/cellar-enrolment-ca").unwrap();
        assert_eq!(s.to_string(), "cellar-system/cellar-enrolment-ca");
        for bad in ["cellar", "a/B", "/x", "a/", "a/b/c", "a/-b"] {
            assert!(ObjectRef::parse(bad).is_err(), "{bad}");
        }
    }
}
