//! Why a process is not ready: one set of reasons that the CSI Probe, `/readyz` and the log read.
//!
//! Each part of a role that can keep it from serving (start-up, a pool, the registration with the
//! controller) holds one keyed reason. The process is ready when no reason is left. A reason is
//! logged when it appears or changes (warn) and when it clears (info), never once per retry, so
//! an operator sees each state to act on once, at the default level, with its cause.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The key of the reason every role starts with and clears once its pools are open.
pub const STARTING: &str = "starting";

#[derive(Debug)]
pub struct Readiness {
    /// Mirrors `reasons.is_empty()`, for Identity's Probe, which reads it on every call.
    ready: Arc<AtomicBool>,
    /// Key → (reason, whether it was logged).
    reasons: Mutex<BTreeMap<String, (String, bool)>>,
}

impl Readiness {
    /// Not ready until [`STARTING`] is cleared.
    pub fn starting() -> Arc<Readiness> {
        let r = Readiness {
            ready: Arc::new(AtomicBool::new(false)),
            reasons: Mutex::new(BTreeMap::from([(
                STARTING.to_string(),
                ("the pools are not open yet".to_string(), false),
            )])),
        };
        Arc::new(r)
    }

    /// The flag Identity's Probe answers from.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Sets (`Some`) or clears (`None`) the reason under `key`, logging only a change: a new or
    /// changed reason at warn, the clearing of a logged one at info.
    pub fn set(&self, key: &str, reason: Option<String>) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(why) => {
                if reasons.get(key).map(|(r, _)| r) != Some(&why) {
                    tracing::warn!(check = key, reason = %why, "not ready");
                    reasons.insert(key.to_string(), (why, true));
                }
            }
            None => {
                if let Some((_, true)) = reasons.remove(key) {
                    tracing::info!(check = key, "recovered");
                }
            }
        }
        self.ready.store(reasons.is_empty(), Ordering::Release);
    }

    /// A reason every start goes through (e.g. not registered yet): kept quietly, so a normal
    /// start logs no warning; a later [`Readiness::set`] with another reason is logged.
    pub fn expect(&self, key: &str, reason: String) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons.insert(key.to_string(), (reason, false));
        self.ready.store(false, Ordering::Release);
    }

    /// Every reason in force, one line each (`key: reason`), in key order; empty when ready.
    pub fn reasons(&self) -> Vec<String> {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons.iter().map(|(k, (v, _))| format!("{k}: {v}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_reason_is_cleared() {
        let r = Readiness::starting();
        assert!(!r.is_ready() && !r.flag().load(Ordering::Acquire));
        assert_eq!(r.reasons(), ["starting: the pools are not open yet"]);
        r.set("pool/fast", Some("not btrfs".into()));
        r.set(STARTING, None);
        assert!(!r.is_ready());
        assert_eq!(r.reasons(), ["pool/fast: not btrfs"]);
        r.set("pool/fast", None);
        assert!(r.is_ready() && r.flag().load(Ordering::Acquire));
        assert!(r.reasons().is_empty());
    }

    #[test]
    fn an_expected_start_up_reason_clears_quietly_and_still_blocks_readiness() {
        let r = Readiness::starting();
        r.expect("controller", "not registered yet".into());
        r.set(STARTING, None);
        assert!(!r.is_ready());
        assert_eq!(r.reasons(), ["controller: not registered yet"]);
        r.set("controller", None);
        assert!(r.is_ready());
    }

    #[test]
    fn the_same_reason_twice_is_one_entry() {
        let r = Readiness::starting();
        r.set("controller", Some("refused".into()));
        r.set("controller", Some("refused".into()));
        r.set(STARTING, None);
        assert_eq!(r.reasons(), ["controller: refused"]);
    }
}
