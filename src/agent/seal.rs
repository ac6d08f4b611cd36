//! Deletion marks sealed by the controller (docs/backups.md, "Deletion marks"; docs/security.md).
//!
//! A deletion mark tells a node to drop its part of a backup (an upload not finished, a kept local
//! copy). It is a restic snapshot, which anyone holding the repository's key can write: every node
//! holds it. So that one node cannot make another drop its data, the controller seals each mark it
//! writes: it signs the backup's id and the time with its TLS key, as it signs transfer grants
//! ([`super::grant`]), and puts the signature with its certificate chain into the mark. A node
//! honours a mark only when the signature covers that backup's id, and the signer's certificate
//! names the controller as this node knows it (`--controller`'s host) and came from the CA, valid
//! when the mark was sealed: a mark is read up to 90 days later (a node that was down), long after
//! the controller's certificate was renewed (a week by default), so its validity now would refuse
//! every mark older than that, and the backup deleted meanwhile would come back.
//!
//! Over plaintext (`--insecure`) nobody proves who they are: marks are written unsealed and every
//! mark counts ([`MarkTrust::Unsealed`]), as grants are unsigned there.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use prost::Message;
use rustls_pki_types::UnixTime;

use super::grant::{self, Signature};
use super::tls::Tls;
use crate::backup::{MarkAuthority, MarkTrust};
use crate::storage::id::BackupId;

/// What is signed: this, then the backup's id (`backup:<repository>:<key>`), a NUL, and the
/// seal's time (Unix seconds, decimal). Neither a grant nor a TLS signature starts with it.
const CONTEXT: &[u8] = b"cellar deletion mark v1\0";

/// How far ahead of a node's clock a seal's time may be (clocks that disagree a little).
const MAX_AHEAD: Duration = Duration::from_secs(300);

/// The seal as written into a mark (base64 of this message).
#[derive(Clone, PartialEq, prost::Message)]
struct SealMessage {
    #[prost(uint32, tag = "1")]
    scheme: u32,
    #[prost(bytes = "vec", tag = "2")]
    signature: Vec<u8>,
    /// The signer's certificate chain (DER), its own certificate first.
    #[prost(bytes = "vec", repeated, tag = "3")]
    signer: Vec<Vec<u8>>,
    /// When it was sealed (Unix seconds): the signer's certificate must have been valid then.
    #[prost(uint64, tag = "4")]
    sealed_at_unix_secs: u64,
}

fn signed(id: &BackupId, at: u64) -> Vec<u8> {
    format!("{id}\0{at}").into_bytes()
}

/// Longest seal read (base64 characters): a few certificates.
const MAX_SEAL: usize = 64 * 1024;

/// Seals marks with this process's TLS key and checks seals against the CA and the controller's
/// names.
pub struct MarkSeals {
    tls: Tls,
    /// A seal counts when its signer's certificate names one of these.
    controller: Vec<String>,
}

impl MarkSeals {
    /// A node's: marks sealed by a certificate naming `controller` (the host this node dials the
    /// controller by) count.
    pub fn for_node(tls: Tls, controller: &str) -> MarkSeals {
        MarkSeals {
            tls,
            controller: vec![controller.to_string()],
        }
    }

    /// The controller's: it seals the marks it writes, and honours (for the shared pools' backups
    /// it holds) marks sealed by a certificate naming one of the names (DNS or IP) of its own.
    pub fn for_controller(tls: Tls) -> MarkSeals {
        let controller = tls
            .signing()
            .and_then(|s| s.chain.first())
            .map(|c| dns_names(c))
            .unwrap_or_default();
        MarkSeals { tls, controller }
    }

    /// Which marks count with these seals: only sealed ones, unless over plaintext (every one).
    pub fn trust(self) -> MarkTrust {
        if self.tls.is_insecure() {
            return MarkTrust::Unsealed;
        }
        MarkTrust::Sealed(Arc::new(self))
    }

    /// The seal of a mark of backup `id`, as sealed at `at` (now, but for tests).
    pub fn seal_at(&self, id: &BackupId, at: SystemTime) -> Result<String, String> {
        let signing = self.tls.signing().ok_or("no key to seal with over plaintext")?;
        let secs = at.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
        let sig = grant::sign_bytes(signing, CONTEXT, &signed(id, secs)).map_err(|e| e.to_string())?;
        let message = SealMessage {
            scheme: sig.scheme,
            signature: sig.signature,
            signer: sig.signer,
            sealed_at_unix_secs: secs,
        };
        Ok(base64::engine::general_purpose::STANDARD.encode(message.encode_to_vec()))
    }
}

/// The DNS names and IP addresses a certificate (DER) carries in its subjectAltName.
fn dns_names(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl MarkAuthority for MarkSeals {
    fn seal(&self, id: &BackupId) -> Result<String, String> {
        self.seal_at(id, SystemTime::now())
    }

    fn check(&self, id: &BackupId, seal: Option<&str>) -> Result<(), String> {
        let signing = self.tls.signing().ok_or("no CA to check a seal with over plaintext")?;
        let seal = seal.ok_or("it carries no seal")?.trim();
        if seal.len() > MAX_SEAL {
            return Err(format!(
                "its seal is {} characters long, more than {MAX_SEAL}",
                seal.len()
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(seal)
            .map_err(|e| format!("its seal is not base64 ({e})"))?;
        let m = SealMessage::decode(bytes.as_slice()).map_err(|e| format!("its seal does not decode ({e})"))?;
        let at = Duration::from_secs(m.sealed_at_unix_secs);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        if at > now + MAX_AHEAD {
            return Err(format!(
                "it was sealed {} s ahead of this node's clock",
                (at - now).as_secs()
            ));
        }
        let sig = Signature {
            scheme: m.scheme,
            signature: m.signature,
            signer: m.signer,
        };
        let message = signed(id, m.sealed_at_unix_secs);
        grant::check_bytes(
            signing,
            &self.controller,
            CONTEXT,
            &message,
            &sig,
            UnixTime::since_unix_epoch(at),
        )
        .map_err(|e| match e {
            grant::GrantError::NotSigned(why) => why,
            e => e.to_string(),
        })
    }
}
