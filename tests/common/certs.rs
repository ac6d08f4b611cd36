//! The one certificate helper of the tests: a CA made for one test, and certificates it issues for
//! both directions of mutual TLS (docs/security.md says which names each role carries).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

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

    /// A certificate for serverAuth and clientAuth naming `sans` (DNS names or IP addresses); the
    /// first is also its common name.
    pub fn issue(&self, sans: &[&str]) -> Pair {
        self.issue_with(sans, |_| {})
    }

    /// As [`Authority::issue`], valid only from `not_before` to `not_after`.
    #[allow(dead_code)]
    pub fn issue_valid(
        &self,
        sans: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Pair {
        self.issue_with(sans, |p| {
            p.not_before = not_before;
            p.not_after = not_after;
        })
    }

    fn issue_with(&self, sans: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> Pair {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("leaf params");
        adjust(&mut p);
        p.distinguished_name.push(DnType::CommonName, sans[0]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.0).expect("sign leaf");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// TLS material for a process that trusts this CA and presents `pair`.
    pub fn tls(&self, pair: &Pair) -> cellar::agent::tls::Tls {
        cellar::agent::tls::Tls::from_pem(self.pem().as_bytes(), pair.cert.as_bytes(), pair.key.as_bytes())
            .expect("tls")
    }

    /// Writes this CA as `ca.pem` and, for each `(stem, sans)`, a certificate `<stem>.pem` with its
    /// key `<stem>.key` into `dir`: the file names `cellar controller` and `cellar node` are given.
    pub fn write(&self, dir: &Path, roles: &[(&str, &[&str])]) {
        std::fs::write(dir.join("ca.pem"), self.pem()).expect("write CA");
        for (stem, sans) in roles {
            let pair = self.issue(sans);
            std::fs::write(dir.join(format!("{stem}.pem")), pair.cert).expect("write certificate");
            std::fs::write(dir.join(format!("{stem}.key")), pair.key).expect("write key");
        }
    }
}
