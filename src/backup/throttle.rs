//! A node's backup bandwidth (`--backup-bandwidth`): every byte written to or read from a
//! repository's backend passes one token bucket per process, so uploads and restores together
//! never take more than the configured rate from the workloads' disks and network. The same
//! wrapper counts the bytes for the metrics, and refuses the writes of an upload that was called
//! off ([`super::upload::Stop`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, ReadBackend, RepositoryBackends, RusticError, RusticResult, WriteBackend,
};

use super::upload::{Stop, StopWriter};

/// How often a write waiting for its turn looks whether its upload was called off.
const STOP_LOOK: Duration = Duration::from_millis(50);

/// The per-process limit; 0 bytes per second is no limit.
pub struct Throttle {
    bytes_per_sec: AtomicU64,
    /// When the bytes taken so far have been paid for.
    paid_until: Mutex<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Arc<Throttle> {
        Arc::new(Throttle {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            paid_until: Mutex::new(Instant::now()),
        })
    }

    pub fn unlimited() -> Arc<Throttle> {
        Self::new(0)
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// Sets the node's limit (`--backup-bandwidth`); 0 removes it.
    pub fn set_bytes_per_sec(&self, rate: u64) {
        self.bytes_per_sec.store(rate, Ordering::Relaxed);
    }

    /// Waits until `bytes` fit in the rate. A burst of up to one second's worth passes at once.
    pub fn take(&self, bytes: u64) {
        let (wait, _) = self.claim(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Gives back what a transfer called off with `left` of its wait to go had paid and will
    /// not use: its own cost at most (the rest of its wait is the turns of transfers queued
    /// before it, still to come), never reaching before now.
    fn refund(&self, left: Duration, cost: Duration) {
        let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        *paid = paid.checked_sub(left.min(cost)).map_or(now, |p| p.max(now));
    }

    /// Pays for `bytes` now: how long the caller must wait before it moves them, and what they
    /// cost.
    fn claim(&self, bytes: u64) -> (Duration, Duration) {
        let rate = self.bytes_per_sec();
        if rate == 0 || bytes == 0 {
            return (Duration::ZERO, Duration::ZERO);
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
        let (until, wait) = reserve(*paid, Instant::now(), cost);
        *paid = until;
        (wait, cost)
    }

    /// The repository's backends, with every transfer paced and counted under `repository`, and
    /// every write refused once `stop` (the upload these backends serve) is pulled.
    pub fn wrap(self: &Arc<Self>, be: RepositoryBackends, repository: &str, stop: Option<&Stop>) -> RepositoryBackends {
        let paced = |inner: Arc<dyn WriteBackend>| -> Arc<dyn WriteBackend> {
            Arc::new(Paced {
                inner,
                throttle: self.clone(),
                repository: repository.to_string(),
                stop: stop.map(Stop::writer),
            })
        };
        RepositoryBackends::new(paced(be.repository()), be.repo_hot().map(paced))
    }
}

/// The token bucket's arithmetic: bytes costing `cost` are paid from when the earlier ones are
/// (or from one second ago, the most an idle bucket saves up); the caller waits until they are.
fn reserve(paid: Instant, now: Instant, cost: Duration) -> (Instant, Duration) {
    let saved_from = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let until = paid.max(saved_from) + cost;
    (until, until.saturating_duration_since(now))
}

struct Paced {
    inner: Arc<dyn WriteBackend>,
    throttle: Arc<Throttle>,
    repository: String,
    /// The upload these backends serve, which counts them while they are held.
    stop: Option<StopWriter>,
}

impl Paced {
    /// Fails once the upload is called off: checked before the write and through its pacing
    /// wait, so that a stop pulled while a write waits for its turn ends it at once.
    fn going(&self) -> RusticResult<()> {
        match &self.stop {
            Some(w) if w.stop().pulled() => Err(RusticError::new(
                ErrorKind::Backend,
                "the upload was called off: its backup is being deleted",
            )),
            Some(w) if w.stop().refuses_writes() => Err(RusticError::new(
                ErrorKind::Backend,
                "the upload has already answered: nothing more is written for it",
            )),
            _ => Ok(()),
        }
    }

    fn read(&self, tpe: FileType, b: RusticResult<Bytes>) -> RusticResult<Bytes> {
        if let Ok(b) = &b {
            let (wait, _) = self.throttle.claim(b.len() as u64);
            if bulk(tpe) {
                std::thread::sleep(wait);
            }
            crate::metrics::record_backup_bytes(&self.repository, "downloaded", b.len() as u64);
        }
        b
    }
}

/// Whether files of this type wait for their turn. Packs and indexes are the bulk of every
/// transfer; the small files that say what is there (config, keys, snapshots: a look for a
/// deletion mark, a listing) are paid for but never wait behind a long upload's turn.
fn bulk(tpe: FileType) -> bool {
    matches!(tpe, FileType::Pack | FileType::Index)
}

impl ReadBackend for Paced {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.inner.list_with_size(tpe)
    }

    fn list(&self, tpe: FileType) -> RusticResult<Vec<Id>> {
        self.inner.list(tpe)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.read(tpe, self.inner.read_full(tpe, id))
    }

    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.read(tpe, self.inner.read_partial(tpe, id, cacheable, offset, length))
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }

    fn needs_warm_up(&self) -> bool {
        self.inner.needs_warm_up()
    }

    fn warm_up(&self, tpe: FileType, id: &Id) -> RusticResult<()> {
        self.inner.warm_up(tpe, id)
    }
}

impl WriteBackend for Paced {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, content: BytesList) -> RusticResult<()> {
        let n = content.size() as u64;
        self.going()?;
        let (mut wait, cost) = self.throttle.claim(n);
        if !bulk(tpe) {
            wait = Duration::ZERO;
        }
        while !wait.is_zero() {
            let slice = wait.min(STOP_LOOK);
            std::thread::sleep(slice);
            wait -= slice;
            if let Err(e) = self.going() {
                self.throttle.refund(wait, cost);
                return Err(e);
            }
        }
        self.inner.write_bytes(tpe, id, cacheable, content)?;
        crate::metrics::record_backup_bytes(&self.repository, "uploaded", n);
        Ok(())
    }

    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.inner.remove(tpe, id, cacheable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_bucket_lets_one_second_through_then_paces() {
        let now = Instant::now() + Duration::from_secs(10);
        let idle = now - Duration::from_secs(60);
        let half = Duration::from_millis(500);
        let (paid, wait) = reserve(idle, now, half);
        assert_eq!(wait, Duration::ZERO, "half a second's worth fits in the saved second");
        let (paid, wait) = reserve(paid, now, half);
        assert_eq!(wait, Duration::ZERO, "so does the other half");
        let (paid, wait) = reserve(paid, now, Duration::from_secs(2));
        assert_eq!(
            wait,
            Duration::from_secs(2),
            "beyond the saved second every byte waits its cost"
        );
        let (_, wait) = reserve(paid, now + Duration::from_secs(1), half);
        assert_eq!(wait, Duration::from_millis(1500), "debts add up");
    }

    fn paid(t: &Throttle) -> Instant {
        *t.paid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn a_refund_gives_back_only_the_called_off_transfers_own_cost() {
        let t = Throttle::new(1024);
        let (first, cost) = t.claim(1024 * 100);
        assert_eq!(cost, Duration::from_secs(100));
        assert!(first > Duration::from_secs(98), "a hundred seconds' worth waits");
        // A second transfer queues behind the first, then is called off at once: only its own
        // hundred seconds come back, not the first's turn, which is still to come.
        let (second, cost) = t.claim(1024 * 100);
        assert!(second > Duration::from_secs(198));
        t.refund(second, cost);
        let owed = paid(&t).saturating_duration_since(Instant::now());
        assert!(
            owed > Duration::from_secs(97) && owed < Duration::from_secs(101),
            "the first transfer's turn stays paid: {owed:?}"
        );
        // The first called off with 90 s of its wait left: 90 s come back, never past now.
        t.refund(Duration::from_secs(90), Duration::from_secs(100));
        let owed = paid(&t).saturating_duration_since(Instant::now());
        assert!(owed < Duration::from_secs(11), "90 s given back: {owed:?}");
        t.refund(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(paid(&t) <= Instant::now(), "nothing is owed");
        assert!(
            paid(&t) + Duration::from_secs(1) >= Instant::now(),
            "nor saved up past now"
        );
    }

    #[test]
    fn no_limit_never_waits() {
        let t = Throttle::unlimited();
        let before = *t.paid_until.lock().unwrap_or_else(|p| p.into_inner());
        t.take(u64::MAX / 2);
        assert_eq!(
            *t.paid_until.lock().unwrap_or_else(|p| p.into_inner()),
            before,
            "nothing owed"
        );
    }
}
