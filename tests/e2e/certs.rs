//! TLS material for the e2e environment: the cluster's CA, the controller's certificate and the
//! one all nodes share, each used both as server and client (docs/split-mode.md, "TLS";
//! docs/security.md), plus a second, unrelated CA for the callers that must be refused.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub use cellar::agent::tls::AGENT_SERVER_NAME as AGENT_NAME;

pub struct Authority(CertifiedIssuer<'static, KeyPair>);

/// PEM text of a certificate and its key.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Authority {
    pub fn new(common_name: &str) -> Authority {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Authority(CertifiedIssuer::self_signed(p, KeyPair::generate().expect("CA key")).expect("self-signed CA"))
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    /// A certificate for serverAuth and clientAuth naming `sans` (DNS names or IP addresses).
    pub fn issue(&self, sans: &[&str]) -> Pair {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, sans[0]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.0).expect("sign leaf");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A process's role, and so its certificate: the controller's names the controller's host, the
/// one all nodes share names `cellar-agent` (docs/security.md).
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Controller,
    Node,
}

impl Role {
    fn stem(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Node => "node",
        }
    }
}

fn files(dir: &Path, role: Role) -> [PathBuf; 3] {
    let stem = role.stem();
    [
        dir.join("ca.pem"),
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    ]
}

/// Writes the cluster's CA and the two certificates, the controller's for `controller_sans` and
/// the nodes' for `node_sans`, into `dir`.
pub fn write(dir: &Path, controller_sans: &[&str], node_sans: &[&str]) {
    let ca = Authority::new("cellar e2e CA");
    for (role, sans) in [(Role::Controller, controller_sans), (Role::Node, node_sans)] {
        let pair = ca.issue(sans);
        let [ca_file, cert_file, key_file] = files(dir, role);
        std::fs::write(ca_file, ca.pem()).expect("write CA");
        std::fs::write(cert_file, pair.cert).expect("write certificate");
        std::fs::write(key_file, pair.key).expect("write key");
    }
}

/// A role's PEM files as read back: CA, certificate, key.
pub fn read(dir: &Path, role: Role) -> [String; 3] {
    files(dir, role).map(|f| std::fs::read_to_string(f).expect("read TLS file"))
}

/// A role's PEM files: certificate, key.
pub fn pair(dir: &Path, role: Role) -> [PathBuf; 2] {
    let [_, cert, key] = files(dir, role);
    [cert, key]
}

/// The `--tls-*` flags of a process of `role`.
pub fn args(dir: &Path, role: Role) -> Vec<String> {
    let [ca, cert, key] = files(dir, role);
    vec![
        format!("--tls-ca={}", ca.display()),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]
}
