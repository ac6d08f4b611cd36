//! Deletion marks sealed by the controller (docs/backups.md, "Deletion marks"; docs/security.md).
//!
//! A deletion mark tells a node to drop its part of a backup (an upload not finished, a kept local
//! copy). It is a restic snapshot, which anyone holding the repository's key can write: every node
//! holds it. So that one node cannot make another drop its data, the controller seals each mark it
//! writes: it signs the backup's id with its TLS key, as it signs transfer grants ([`super::grant`]),
//! and puts the signature with its certificate chain into the mark. A node honours a mark only
//! when the signer's certificate comes from the CA and names the controller as this node knows it
//! (`--controller`'s host), and the signature covers that backup's id.
//!
//! Over plaintext (`--insecure`) nobody proves who they are: marks are written unsealed and every
//! mark counts ([`MarkTrust::Unsealed`]), as grants are unsigned there.

use std::sync::Arc;

use base64::Engine as _;
use prost::Message;

use super::grant::{self, Signature};
use super::tls::Tls;
use crate::backup::{MarkAuthority, MarkTrust};
use crate::storage::id::BackupId;

/// What is signed: this, then the backup's id (`backup:<repository>:<key>`). Neither a grant nor
/// a TLS signature starts with it.
const CONTEXT: &[u8] = b"cellar deletion mark v1\0";

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
    /// A node's trust: marks sealed by a certificate naming `controller` (the host this node
    /// dials the controller by); unsealed over plaintext.
    pub fn node(tls: Tls, controller: &str) -> MarkTrust {
        Self::trust(tls, vec![controller.to_string()])
    }

    /// The controller's: it seals the marks it writes, and honours (for the shared pools' backups
    /// it holds) marks sealed by a certificate naming one of the DNS names of its own.
    pub fn controller(tls: Tls) -> MarkTrust {
        let names = tls
            .signing()
            .and_then(|s| s.chain.first())
            .map(|c| dns_names(c))
            .unwrap_or_default();
        Self::trust(tls, names)
    }

    fn trust(tls: Tls, controller: Vec<String>) -> MarkTrust {
        if tls.is_insecure() {
            return MarkTrust::Unsealed;
        }
        MarkTrust::Sealed(Arc::new(MarkSeals { tls, controller }))
    }
}

/// The DNS names a certificate (DER) carries in its subjectAltName.
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
            _ => None,
        })
        .collect()
}

impl MarkAuthority for MarkSeals {
    fn seal(&self, id: &BackupId) -> Result<String, String> {
        let signing = self.tls.signing().ok_or("no key to seal with over plaintext")?;
        let sig = grant::sign_bytes(signing, CONTEXT, id.to_string().as_bytes()).map_err(|e| e.to_string())?;
        let message = SealMessage {
            scheme: sig.scheme,
            signature: sig.signature,
            signer: sig.signer,
        };
        Ok(base64::engine::general_purpose::STANDARD.encode(message.encode_to_vec()))
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
        let sig = Signature {
            scheme: m.scheme,
            signature: m.signature,
            signer: m.signer,
        };
        grant::check_bytes(signing, &self.controller, CONTEXT, id.to_string().as_bytes(), &sig).map_err(|e| match e {
            grant::GrantError::NotSigned(why) => why,
            e => e.to_string(),
        })
    }
}
