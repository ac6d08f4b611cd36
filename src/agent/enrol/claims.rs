//! The claims a service-account token states about itself, read without checking its signature.
//!
//! A Kubernetes service-account token is a JWT: `header.payload.signature`, each part base64url.
//! Its payload names the audiences it was issued for (`aud`), its expiry (`exp`), its service
//! account (`sub`) and, for a token bound to a pod, the pod's node (`kubernetes.io.node.name`).
//! Nothing here is trusted: anyone can write any claims. They are read only to refuse, without
//! asking the API server, a request whose own token says it could not be admitted (another
//! audience, account or node, or expired). A token whose claims would be admitted still goes to a
//! TokenReview, which alone decides (`super::EnrolService::issue`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Deserialize;

use super::kube::{Review, ReviewedUser};
use super::{EnrolError, NODE_NAME_EXTRA};

/// How far past its `exp` a token's claims are still screened in: the controller's clock and the
/// API server's may differ a little, and the API server decides.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// base64url, with or without padding (JWTs have none; some tools add it).
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The claims of a token, as the token states them.
#[derive(Debug, Default, Deserialize)]
pub struct Claims {
    #[serde(default)]
    aud: Audiences,
    /// A NumericDate: seconds, which JWT libraries also take written as a float (`1.9e9`); what is
    /// not a number is left to the API server.
    #[serde(default)]
    exp: serde_json::Value,
    #[serde(default)]
    sub: String,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Kubernetes,
}

/// `aud` is one string or a list of them (RFC 7519, 4.1.3).
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Audiences {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct Kubernetes {
    #[serde(default)]
    node: Option<NodeRef>,
}

#[derive(Debug, Default, Deserialize)]
struct NodeRef {
    #[serde(default)]
    name: String,
}

impl Claims {
    /// Reads the payload of `token`; a token that is not a JWT with a JSON object as its payload
    /// is refused as not a service-account token.
    pub fn read(token: &str) -> Result<Claims, EnrolError> {
        let not_one = |why: &str| {
            EnrolError::Unauthenticated(format!(
                "it is not a service-account token ({why}; a JWT of three base64url parts is expected)"
            ))
        };
        let parts: Vec<&str> = token.trim().split('.').collect();
        let [header, payload, signature] = parts.as_slice() else {
            return Err(not_one(&format!("{} parts", parts.len())));
        };
        if header.is_empty() || signature.is_empty() {
            return Err(not_one("an empty part"));
        }
        let object = |part: &str, what: &str| -> Result<serde_json::Value, EnrolError> {
            let bytes = BASE64URL
                .decode(part)
                .map_err(|_| not_one(&format!("its {what} is not base64url")))?;
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v @ serde_json::Value::Object(_)) => Ok(v),
                _ => Err(not_one(&format!("its {what} is not a JSON object"))),
            }
        };
        object(header, "header")?;
        let payload = object(payload, "payload")?;
        serde_json::from_value(payload).map_err(|e| not_one(&super::bounded(&format!("its claims do not parse: {e}"))))
    }

    /// Refuses a token whose stated expiry is more than [`CLOCK_SKEW`] before `now`.
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), EnrolError> {
        let Some(exp) = self.exp.as_f64().filter(|e| e.is_finite() && *e >= 0.0) else {
            return Ok(());
        };
        // Whole seconds, rounded up: a token is taken as expired only once it surely is.
        let exp = exp.ceil().min(u64::MAX as f64) as u64;
        let now = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        if exp.saturating_add(CLOCK_SKEW.as_secs()) < now {
            return Err(EnrolError::Unauthenticated(format!(
                "it expired {} s ago (its exp claim is {exp}); the node's kubelet refreshes it, so the node should retry with the new one",
                now - exp
            )));
        }
        Ok(())
    }

    /// The claims in the shape of a review's answer, for [`super::EnrolPolicy::admit`] to screen
    /// as it would judge the API server's.
    pub fn as_review(&self) -> Review {
        let audiences = match &self.aud {
            Audiences::None => Vec::new(),
            Audiences::One(a) => vec![a.clone()],
            Audiences::Many(all) => all.clone(),
        };
        let mut extra = BTreeMap::new();
        if let Some(node) = self.kubernetes.node.as_ref().filter(|n| !n.name.is_empty()) {
            extra.insert(NODE_NAME_EXTRA.to_string(), vec![node.name.clone()]);
        }
        Review {
            authenticated: true,
            error: String::new(),
            user: ReviewedUser {
                username: self.sub.clone(),
                extra,
            },
            audiences,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &serde_json::Value) -> String {
        let enc = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            enc(br#"{"alg":"RS256","kid":"k"}"#),
            enc(payload.to_string().as_bytes()),
            enc(b"not a signature")
        )
    }

    #[test]
    fn the_claims_of_a_bound_token_read_as_a_review_would_answer() {
        let token = jwt(&serde_json::json!({
            "aud": ["cellar"], "exp": 2_000_000_000u64, "iat": 1_999_996_400u64,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:cellar-system:cellar-node",
            "kubernetes.io": {"namespace": "cellar-system", "node": {"name": "node-1", "uid": "u1"},
                "pod": {"name": "cellar-node-x", "uid": "u2"}, "serviceaccount": {"name": "cellar-node", "uid": "u3"}}
        }));
        let claims = Claims::read(&token).unwrap();
        let review = claims.as_review();
        assert_eq!(review.audiences, vec!["cellar".to_string()]);
        assert_eq!(review.user.username, "system:serviceaccount:cellar-system:cellar-node");
        assert_eq!(review.user.extra[NODE_NAME_EXTRA], vec!["node-1".to_string()]);
        // One audience as a plain string, and no node.
        let one = Claims::read(&jwt(&serde_json::json!({"aud": "cellar", "sub": "x"}))).unwrap();
        let review = one.as_review();
        assert_eq!(review.audiences, vec!["cellar".to_string()]);
        assert!(review.user.extra.is_empty());
    }

    #[test]
    fn what_is_not_a_jwt_is_refused_saying_so() {
        let enc = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let cases = [
            ("token-node-1".to_string(), "1 parts"),
            ("a.b.c.d".to_string(), "4 parts"),
            (format!(".{}.sig", enc(b"{}")), "an empty part"),
            (format!("{}.{}.", enc(b"{}"), enc(b"{}")), "an empty part"),
            (format!("{}.%%%.sig", enc(b"{}")), "payload is not base64url"),
            (
                format!("{}.{}.sig", enc(b"{}"), enc(b"[1,2]")),
                "payload is not a JSON object",
            ),
            (
                format!("{}.{}.sig", enc(b"nope"), enc(b"{}")),
                "header is not a JSON object",
            ),
            (
                format!("{}.{}.sig", enc(b"{}"), enc(br#"{"sub":5}"#)),
                "claims do not parse",
            ),
        ];
        for (token, says) in cases {
            let e = Claims::read(&token).unwrap_err();
            assert!(matches!(e, EnrolError::Unauthenticated(_)), "{token}: {e}");
            assert!(e.to_string().contains(says), "{token}: {e} should say {says}");
        }
    }

    #[test]
    fn an_expired_token_is_refused_past_the_clock_skew_only() {
        let claims = Claims::read(&jwt(&serde_json::json!({"exp": 1_000u64}))).unwrap();
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        claims.check_expiry(at(1_000)).unwrap();
        claims.check_expiry(at(1_000 + CLOCK_SKEW.as_secs())).unwrap();
        let e = claims.check_expiry(at(1_001 + CLOCK_SKEW.as_secs())).unwrap_err();
        assert!(e.to_string().contains("expired 61 s ago"), "{e}");
        // Written as a float, as JWT libraries take it too.
        let float = Claims::read(&jwt(&serde_json::json!({"exp": 1.0e3}))).unwrap();
        float.check_expiry(at(1_000 + CLOCK_SKEW.as_secs())).unwrap();
        assert!(float.check_expiry(at(1_001 + CLOCK_SKEW.as_secs())).is_err());
        // Not a number, or none: the API server decides.
        Claims::read(&jwt(&serde_json::json!({"exp": "soon"})))
            .unwrap()
            .check_expiry(at(u64::MAX / 2))
            .unwrap();
        Claims::read(&jwt(&serde_json::json!({})))
            .unwrap()
            .check_expiry(at(u64::MAX / 2))
            .unwrap();
    }
}
