//! TLS material for the e2e environment: the cluster's CA, and one certificate every process uses
//! both as server and client (docs/split-mode.md, "TLS"), plus a second, unrelated CA for the
//! callers that must be refused.

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

fn files(dir: &Path) -> [PathBuf; 3] {
    ["ca.pem", "tls.pem", "tls.key"].map(|f| dir.join(f))
}

/// Writes the cluster's CA and its one certificate for `sans` into `dir`.
pub fn write(dir: &Path, sans: &[&str]) {
    let ca = Authority::new("cellar e2e CA");
    let pair = ca.issue(sans);
    let [ca_file, cert_file, key_file] = files(dir);
    std::fs::write(ca_file, ca.pem()).expect("write CA");
    std::fs::write(cert_file, pair.cert).expect("write certificate");
    std::fs::write(key_file, pair.key).expect("write key");
}

/// The cluster's PEM files as read back: CA, certificate, key.
pub fn read(dir: &Path) -> [String; 3] {
    files(dir).map(|f| std::fs::read_to_string(f).expect("read TLS file"))
}

/// The `--tls-*` flags of every process.
pub fn args(dir: &Path) -> Vec<String> {
    let [ca, cert, key] = files(dir);
    vec![
        format!("--tls-ca={}", ca.display()),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ]
}
