//! Per-object in-flight locks. A second call on a busy volume is refused at once (ABORTED, which the
//! CO retries) instead of queueing behind it; calls on different volumes never wait for each other.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases its key when dropped, also on error or panic.
pub struct Held {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
    /// What else the operation holds for as long (a shared pool's lock file), released before the
    /// key: the next call of this process that takes the key then finds the lock file free too
    /// (released after it, the lock file was still held for a moment, and that call answered
    /// ABORTED "by another controller replica" with no other replica there).
    also: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Held {
    /// Holds `guard` too, until this is dropped.
    pub fn also(mut self, guard: impl Send + Sync + 'static) -> Held {
        self.also = Some(Box::new(guard));
        self
    }
}

impl InFlight {
    /// Whether an operation of this process holds `key` now.
    pub fn holds(&self, key: &str) -> bool {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    /// Takes `key`, or `None` when another operation holds it.
    pub fn try_take(&self, key: String) -> Option<Held> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.clone()) {
            return None;
        }
        Some(Held {
            keys: self.keys.clone(),
            key,
            also: None,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.also.take());
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a key holds as well is let go before the key: once the key can be taken again, so
    /// can the shared pool's lock file it held.
    #[test]
    fn what_a_key_also_holds_is_released_before_the_key() {
        struct Watch(InFlight, Arc<Mutex<Option<bool>>>);
        impl Drop for Watch {
            fn drop(&mut self) {
                *self.1.lock().unwrap() = Some(self.0.holds("v1"));
            }
        }
        let f = InFlight::default();
        let seen = Arc::new(Mutex::new(None));
        let held = f.try_take("v1".into()).unwrap().also(Watch(f.clone(), seen.clone()));
        drop(held);
        assert_eq!(
            *seen.lock().unwrap(),
            Some(true),
            "released while the key was still held"
        );
        assert!(!f.holds("v1"));
    }

    #[test]
    fn second_taker_is_refused_until_release() {
        let f = InFlight::default();
        let a = f.try_take("v1".into()).unwrap();
        assert!(f.try_take("v1".into()).is_none());
        assert!(f.try_take("v2".into()).is_some());
        drop(a);
        assert!(f.try_take("v1".into()).is_some());
    }
}
