//! Transfer grants: the controller's leave for one node to read one snapshot or volume of another
//! node, once, soon — so that a restore or clone onto another node flows node to node and never
//! through the controller (docs/security.md, "Transfer grants").
//!
//! The controller signs [`Claims`] with its own TLS key ([`sign`]) and hands the grant to the
//! target node, which presents it with its own certificate to the source node's `Transfer`
//! service. The source's [`Gatekeeper`] admits the read only when, in this order:
//!
//! 1. a grant is there and decodes — else UNAUTHENTICATED;
//! 2. its signer's certificate comes from the CA and names the controller, and the signature
//!    covers the claims — else UNAUTHENTICATED;
//! 3. it names this node as the source and the object asked for — else PERMISSION_DENIED;
//! 4. the caller's certificate carries the name the grant gives the reader — else PERMISSION_DENIED;
//! 5. it has not expired (UNAUTHENTICATED) and is valid for at most [`MAX_LIFETIME`]
//!    (PERMISSION_DENIED);
//! 6. its id was never used here — else PERMISSION_DENIED; the id is then remembered until the
//!    grant expires, at most [`MAX_REMEMBERED`] at once (RESOURCE_EXHAUSTED beyond).
//!
//! Over plaintext (`--insecure`, development) nothing is signed and nobody has a certificate: only
//! 3, 5 and 6 hold.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::tls::{self, Signing, Tls};
use super::wire::{self, v1};
use crate::storage::engine::Source;
use crate::storage::id::NodeId;
use crate::sys::files::{Durability, Files};
use crate::sys::SysError;

/// How long a grant the controller signs stays usable: the target dials the source at once.
pub const LIFETIME: Duration = Duration::from_secs(60);

/// A grant valid for longer than this is refused, so that used ids need be remembered only this long.
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);

/// Grant ids a source remembers at once (each until its grant expires).
pub const MAX_REMEMBERED: usize = 4096;

/// Signer certificates a grant may carry (the controller's and its intermediates).
const MAX_SIGNER_CHAIN: usize = 4;

/// What is signed: this, then the encoded claims. No TLS signature starts with it.
const CONTEXT: &[u8] = b"cellar transfer grant v1\0";

/// The schemes the controller signs with, by its key's type.
const SCHEMES: [SignatureScheme; 5] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// One read of one object of one node, by one node, before a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub id: [u8; 16],
    pub source_node: NodeId,
    pub object: Source,
    pub reader_node: NodeId,
    /// The name the reader's client certificate must carry.
    pub reader_name: String,
    /// The last moment the read may start.
    pub not_after: SystemTime,
}

impl Claims {
    /// A grant for `reader_node` (whose certificate names `reader_name`) to read `object`, a local
    /// object, within [`LIFETIME`].
    pub fn new(object: Source, reader_node: NodeId, reader_name: String) -> Result<Claims, GrantError> {
        let source_node = object
            .node()
            .cloned()
            .ok_or_else(|| GrantError::Malformed(format!("{object} is in a shared pool, on no one node")))?;
        Ok(Claims {
            id: uuid::Uuid::new_v4().into_bytes(),
            source_node,
            object,
            reader_node,
            reader_name,
            not_after: SystemTime::now() + LIFETIME,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("no transfer grant: another node's data is read only with a grant from the controller")]
    Missing,
    #[error("the transfer grant does not decode: {0}")]
    Malformed(String),
    #[error("the transfer grant is not the controller's: {0}")]
    NotSigned(String),
    #[error("the transfer grant is for node {granted}'s data; this is node {here}")]
    OtherSource { granted: String, here: String },
    #[error("the transfer grant is for {granted}, not {asked}")]
    OtherObject { granted: String, asked: String },
    #[error("the transfer grant lets node {reader} read: the caller's certificate does not name '{name}'")]
    OtherReader { reader: String, name: String },
    #[error("the transfer grant expired {0} s ago; the controller signs a new one on the next try")]
    Expired(u64),
    #[error("the transfer grant is valid for {0} s, longer than the {max} s a grant may be", max = MAX_LIFETIME.as_secs())]
    TooLong(u64),
    #[error("the transfer grant was used already: each grant allows one read")]
    Reused,
    #[error("too many transfer grants in use on this node (at most {MAX_REMEMBERED} per {} s); retry", MAX_LIFETIME.as_secs())]
    Full,
    #[error("cannot sign a transfer grant: {0}")]
    Sign(String),
    #[error("cannot remember the transfer grant as used ({0}); retry")]
    Ledger(String),
}

fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_millis().min(i64::MAX as u128) as i64),
    }
}

fn from_unix_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

impl From<&Claims> for v1::GrantClaims {
    fn from(c: &Claims) -> Self {
        v1::GrantClaims {
            id: c.id.to_vec(),
            source_node: c.source_node.as_str().to_string(),
            object: Some((&c.object).into()),
            reader_node: c.reader_node.as_str().to_string(),
            reader_certificate_name: c.reader_name.clone(),
            not_after_unix_millis: unix_millis(c.not_after),
        }
    }
}

impl TryFrom<v1::GrantClaims> for Claims {
    type Error = wire::WireError;
    fn try_from(m: v1::GrantClaims) -> Result<Self, Self::Error> {
        let id =
            m.id.as_slice()
                .try_into()
                .map_err(|_| wire::WireError(format!("id: {} bytes, not 16", m.id.len())))?;
        let object = m.object.ok_or_else(|| wire::WireError("object: is required".into()))?;
        Ok(Claims {
            id,
            source_node: wire::node_id("source_node", &m.source_node)?,
            object: wire::source(object)?,
            reader_node: wire::node_id("reader_node", &m.reader_node)?,
            reader_name: m.reader_certificate_name,
            not_after: from_unix_millis(m.not_after_unix_millis),
        })
    }
}

/// A signature by a process's TLS key over a context string and a message, with the signer's
/// certificate chain: what grants and sealed deletion marks (`seal`) carry.
pub(crate) struct Signature {
    pub scheme: u32,
    pub signature: Vec<u8>,
    pub signer: Vec<Vec<u8>>,
}

/// Signs `context` then `message` with this process's key. Each use has its own context, so
/// that no signature made for one is accepted as another (nor is any TLS signature).
pub(crate) fn sign_bytes(signing: &Signing, context: &[u8], message: &[u8]) -> Result<Signature, GrantError> {
    let signer = signing
        .key
        .choose_scheme(&SCHEMES)
        .ok_or_else(|| GrantError::Sign(format!("a {:?} key signs none of {SCHEMES:?}", signing.key.algorithm())))?;
    let signature = signer
        .sign(&[context, message].concat())
        .map_err(|e| GrantError::Sign(e.to_string()))?;
    Ok(Signature {
        scheme: u16::from(signer.scheme()) as u32,
        signature,
        signer: signing.chain.iter().map(|c| c.to_vec()).collect(),
    })
}

/// Ok when `sig` signs `context` then `message` with the key of a certificate that names one of
/// `names` (the controller's) and that comes from the CA, valid at `at`; else
/// [`GrantError::NotSigned`] saying why.
pub(crate) fn check_bytes(
    signing: &Signing,
    names: &[String],
    context: &[u8],
    message: &[u8],
    sig: &Signature,
    at: UnixTime,
) -> Result<(), GrantError> {
    let not_signed = |why: String| GrantError::NotSigned(why);
    let (end, intermediates) = sig
        .signer
        .split_first()
        .ok_or_else(|| not_signed("it carries no signer certificate".into()))?;
    if intermediates.len() >= MAX_SIGNER_CHAIN {
        return Err(not_signed(format!(
            "its signer chain has {} certificates, more than {MAX_SIGNER_CHAIN}",
            sig.signer.len()
        )));
    }
    let end = CertificateDer::from(end.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    signing
        .verifier
        .verify_client_cert(&end, &intermediates, at)
        .map_err(|e| not_signed(format!("its signer's certificate is not from the CA ({e})")))?;
    if !names.iter().any(|n| tls::certificate_names(&end, n)) {
        return Err(not_signed(format!(
            "its signer's certificate does not name the controller '{}'",
            names.join("' or '")
        )));
    }
    let scheme = u16::try_from(sig.scheme)
        .map(SignatureScheme::from)
        .map_err(|_| not_signed(format!("{} is no signature scheme", sig.scheme)))?;
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or_else(|| not_signed(format!("{scheme:?} is not a scheme this node checks")))?;
    let cert = webpki::EndEntityCert::try_from(&end)
        .map_err(|e| not_signed(format!("its signer's certificate does not parse ({e})")))?;
    let signed = [context, message].concat();
    if algorithms
        .iter()
        .any(|alg| cert.verify_signature(*alg, &signed, &sig.signature).is_ok())
    {
        Ok(())
    } else {
        Err(not_signed("the signature does not match its claims".into()))
    }
}

/// The grant for `claims`, signed with this process's TLS key (the controller's); unsigned over
/// plaintext.
pub fn sign(tls: &Tls, claims: &Claims) -> Result<v1::TransferGrant, GrantError> {
    let bytes = v1::GrantClaims::from(claims).encode_to_vec();
    let Some(signing) = tls.signing() else {
        return Ok(v1::TransferGrant {
            claims: bytes,
            ..Default::default()
        });
    };
    let sig = sign_bytes(signing, CONTEXT, &bytes)?;
    Ok(v1::TransferGrant {
        claims: bytes,
        scheme: sig.scheme,
        signature: sig.signature,
        signer: sig.signer,
    })
}

/// The source node's side: checks grants and remembers the ids it admitted.
pub struct Gatekeeper {
    node: NodeId,
    tls: Tls,
    /// The name the signer's certificate must carry: the controller's, as this node knows it.
    controller: String,
    /// Admitted grant ids, each until its grant expires.
    used: Mutex<HashMap<[u8; 16], SystemTime>>,
    /// Where the admitted ids are kept across restarts, when anywhere.
    ledger: Option<Ledger>,
}

/// The file of admitted grant ids: one line `<id in hex> <not_after, unix ms>` each, rewritten
/// whole (durably) before a read is admitted, so that a restarted node still refuses a grant it
/// admitted before (a reader could otherwise read the same object again within the grant's life).
pub struct Ledger {
    files: Arc<dyn Files>,
    path: PathBuf,
    /// The ids of grants not yet expired, as read at [`Ledger::open`].
    read: HashMap<[u8; 16], SystemTime>,
}

impl Ledger {
    /// The ledger in the file `path` (none yet: empty), with the ids of grants not yet expired.
    pub fn open(files: Arc<dyn Files>, path: PathBuf) -> Result<Ledger, SysError> {
        let mut ledger = Ledger {
            files,
            path,
            read: HashMap::new(),
        };
        ledger.read = ledger.load(SystemTime::now())?;
        Ok(ledger)
    }

    fn load(&self, now: SystemTime) -> Result<HashMap<[u8; 16], SystemTime>, SysError> {
        let Some(bytes) = self.files.read_optional(&self.path)? else {
            return Ok(HashMap::new());
        };
        let mut used = HashMap::new();
        for line in String::from_utf8_lossy(&bytes).lines() {
            let parsed = line.split_once(' ').and_then(|(id, ms)| {
                let id = u128::from_str_radix(id, 16).ok()?.to_be_bytes();
                Some((id, from_unix_millis(ms.parse().ok()?)))
            });
            match parsed {
                Some((id, until)) if until >= now => {
                    used.insert(id, until);
                }
                Some(_) => {}
                None => {
                    tracing::warn!(ledger = %self.path.display(), "an unreadable line in the grant ledger; skipped")
                }
            }
        }
        Ok(used)
    }

    fn save(&self, used: &HashMap<[u8; 16], SystemTime>) -> Result<(), SysError> {
        let mut text = String::new();
        for (id, until) in used {
            text.push_str(&format!("{:032x} {}\n", u128::from_be_bytes(*id), unix_millis(*until)));
        }
        self.files
            .write_atomic(&self.path, text.as_bytes(), Durability::PowerLoss)
    }
}

impl Gatekeeper {
    pub fn new(node: NodeId, tls: Tls, controller: &str) -> Gatekeeper {
        Gatekeeper {
            node,
            tls,
            controller: controller.to_string(),
            used: Mutex::new(HashMap::new()),
            ledger: None,
        }
    }

    /// As [`Gatekeeper::new`], keeping the admitted ids in `ledger` across restarts (starting
    /// from those it holds).
    pub fn remembering(mut self, mut ledger: Ledger) -> Gatekeeper {
        self.used = Mutex::new(std::mem::take(&mut ledger.read));
        self.ledger = Some(ledger);
        self
    }

    /// Admits one read of `asked` by the caller whose client certificate is `caller`, with `grant`
    /// (see the module's list of checks); the grant is spent once this answers Ok.
    pub fn admit(
        &self,
        caller: Option<&CertificateDer<'_>>,
        grant: Option<v1::TransferGrant>,
        asked: &Source,
    ) -> Result<Claims, GrantError> {
        let grant = grant.ok_or(GrantError::Missing)?;
        if grant.claims.is_empty() {
            return Err(GrantError::Missing);
        }
        self.check_signature(&grant)?;
        let claims = v1::GrantClaims::decode(grant.claims.as_slice())
            .map_err(|e| GrantError::Malformed(e.to_string()))
            .and_then(|m| Claims::try_from(m).map_err(|e| GrantError::Malformed(e.to_string())))?;
        if claims.source_node != self.node {
            return Err(GrantError::OtherSource {
                granted: claims.source_node.as_str().to_string(),
                here: self.node.as_str().to_string(),
            });
        }
        if claims.object != *asked {
            return Err(GrantError::OtherObject {
                granted: claims.object.to_string(),
                asked: asked.to_string(),
            });
        }
        if let Tls::Mutual(_) = self.tls {
            if !caller.is_some_and(|c| tls::certificate_names(c, &claims.reader_name)) {
                return Err(GrantError::OtherReader {
                    reader: claims.reader_node.as_str().to_string(),
                    name: crate::csi::status::bounded(&claims.reader_name).into_owned(),
                });
            }
        }
        let now = SystemTime::now();
        if let Ok(ago) = now.duration_since(claims.not_after) {
            return Err(GrantError::Expired(ago.as_secs()));
        }
        let ahead = claims.not_after.duration_since(now).unwrap_or_default();
        if ahead > MAX_LIFETIME {
            return Err(GrantError::TooLong(ahead.as_secs()));
        }
        self.spend(&claims, now)?;
        Ok(claims)
    }

    fn check_signature(&self, grant: &v1::TransferGrant) -> Result<(), GrantError> {
        let Some(signing) = self.tls.signing() else {
            return Ok(());
        };
        let sig = Signature {
            scheme: grant.scheme,
            signature: grant.signature.clone(),
            signer: grant.signer.clone(),
        };
        check_bytes(
            signing,
            std::slice::from_ref(&self.controller),
            CONTEXT,
            &grant.claims,
            &sig,
            UnixTime::now(),
        )
    }

    /// Remembers the grant's id until it expires; an id seen before is refused.
    fn spend(&self, claims: &Claims, now: SystemTime) -> Result<(), GrantError> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.contains_key(&claims.id) {
            return Err(GrantError::Reused);
        }
        if used.len() >= MAX_REMEMBERED {
            used.retain(|_, until| *until >= now);
        }
        if used.len() >= MAX_REMEMBERED {
            return Err(GrantError::Full);
        }
        used.insert(claims.id, claims.not_after);
        if let Some(ledger) = &self.ledger {
            used.retain(|_, until| *until >= now);
            if let Err(e) = ledger.save(&used) {
                // Not remembered across a restart: not admitted.
                used.remove(&claims.id);
                return Err(GrantError::Ledger(e.to_string()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::id::{SnapshotId, VolumeId};

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn snap() -> Source {
        Source::Snapshot(SnapshotId::parse("snap:local:node-1:default:s").unwrap())
    }

    fn claims() -> Claims {
        Claims::new(snap(), node("node-2"), "node-2.cellar-agent".into()).unwrap()
    }

    #[test]
    fn claims_round_trip_through_bytes() {
        let c = claims();
        let bytes = v1::GrantClaims::from(&c).encode_to_vec();
        let back = Claims::try_from(v1::GrantClaims::decode(bytes.as_slice()).unwrap()).unwrap();
        // Milliseconds on the wire.
        assert_eq!(unix_millis(back.not_after), unix_millis(c.not_after));
        assert_eq!(
            Claims {
                not_after: c.not_after,
                ..back
            },
            c
        );
    }

    #[test]
    fn a_shared_object_has_no_source_node() {
        let shared = Source::Volume(VolumeId::parse("shared:default:v").unwrap());
        assert!(matches!(
            Claims::new(shared, node("node-2"), "x".into()),
            Err(GrantError::Malformed(_))
        ));
    }

    #[test]
    fn over_plaintext_a_grant_is_used_once_for_its_object_on_its_node() {
        let gate = Gatekeeper::new(node("node-1"), Tls::Insecure, "cellar-controller");
        let grant = sign(&Tls::Insecure, &claims()).unwrap();
        assert_eq!(gate.admit(None, None, &snap()), Err(GrantError::Missing));
        let other = Source::Volume(VolumeId::parse("local:node-1:default:v").unwrap());
        assert!(matches!(
            gate.admit(None, Some(grant.clone()), &other),
            Err(GrantError::OtherObject { .. })
        ));
        gate.admit(None, Some(grant.clone()), &snap()).unwrap();
        assert_eq!(gate.admit(None, Some(grant), &snap()), Err(GrantError::Reused));
        let elsewhere = Gatekeeper::new(node("node-3"), Tls::Insecure, "cellar-controller");
        let fresh = sign(&Tls::Insecure, &claims()).unwrap();
        assert!(matches!(
            elsewhere.admit(None, Some(fresh), &snap()),
            Err(GrantError::OtherSource { .. })
        ));
    }

    /// A restarted source still refuses a grant it admitted (the ledger on disk), forgets expired
    /// ones, and admits nothing it could not write down.
    #[test]
    fn a_grant_admitted_before_a_restart_is_refused_after_it() {
        use crate::sys::files::RecordingFiles;
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(RecordingFiles::default());
        let path = dir.path().join("grants-used");
        let gate = |files: &Arc<RecordingFiles>| {
            let ledger = Ledger::open(files.clone(), path.clone()).unwrap();
            Gatekeeper::new(node("node-1"), Tls::Insecure, "c").remembering(ledger)
        };
        let grant = sign(&Tls::Insecure, &claims()).unwrap();
        gate(&files).admit(None, Some(grant.clone()), &snap()).unwrap();
        // An expired entry, as an older run left it, is dropped when read.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "{:032x} {}\nnot a line\n",
            7u128,
            unix_millis(SystemTime::now()) - 1000
        ));
        std::fs::write(&path, text).unwrap();
        let restarted = gate(&files);
        assert_eq!(restarted.admit(None, Some(grant), &snap()), Err(GrantError::Reused));
        assert_eq!(restarted.used.lock().unwrap().len(), 1, "the expired id is forgotten");

        let fresh = sign(&Tls::Insecure, &claims()).unwrap();
        files.fail_next("write_atomic", libc::ENOSPC);
        let err = restarted.admit(None, Some(fresh.clone()), &snap()).unwrap_err();
        assert!(matches!(err, GrantError::Ledger(_)), "{err:?}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        restarted
            .admit(None, Some(fresh), &snap())
            .expect("not spent: admitted once the ledger is written");
    }

    #[test]
    fn expired_or_too_long_grants_are_refused() {
        let gate = Gatekeeper::new(node("node-1"), Tls::Insecure, "c");
        let old = Claims {
            not_after: SystemTime::now() - Duration::from_secs(5),
            ..claims()
        };
        assert!(matches!(
            gate.admit(None, Some(sign(&Tls::Insecure, &old).unwrap()), &snap()),
            Err(GrantError::Expired(_))
        ));
        let long = Claims {
            not_after: SystemTime::now() + MAX_LIFETIME + Duration::from_secs(60),
            ..claims()
        };
        assert!(matches!(
            gate.admit(None, Some(sign(&Tls::Insecure, &long).unwrap()), &snap()),
            Err(GrantError::TooLong(_))
        ));
    }

    #[test]
    fn remembered_ids_are_bounded_and_expired_ones_make_room() {
        let gate = Gatekeeper::new(node("node-1"), Tls::Insecure, "c");
        let now = SystemTime::now();
        {
            let mut used = gate.used.lock().unwrap();
            for i in 0..MAX_REMEMBERED as u32 {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_le_bytes());
                used.insert(id, now + LIFETIME);
            }
        }
        assert_eq!(gate.spend(&claims(), now), Err(GrantError::Full));
        gate.used
            .lock()
            .unwrap()
            .values_mut()
            .take(1)
            .for_each(|t| *t = now - LIFETIME);
        gate.spend(&claims(), now).unwrap();
        assert_eq!(gate.used.lock().unwrap().len(), MAX_REMEMBERED);
    }
}
