//! Leases that keep an `image` volume of a shared pool on one node at a time.
//!
//! The image file lives on a share that every node mounts, and nothing in the kernels stops two
//! nodes from attaching it and mounting its filesystem at once, which would corrupt it. So a node
//! that stages such a volume first takes the volume's lease: a small file beside its record,
//! `volumes/<key>.lease`, naming the node. The holder renews it (a counter in the file goes up)
//! every third of the pool's `leaseSeconds`, and unstage gives it back.
//!
//! Another node that finds the lease taken is refused, naming the holder, until it has itself
//! watched the lease go unrenewed for a whole `leaseSeconds`: then the holder is taken to be dead
//! and the lease is taken over. Staleness is measured on the watcher's own monotonic clock, never by
//! comparing timestamps written by other machines, so clocks that disagree do not matter. Taking
//! over moves the old lease aside with one rename (only one taker can win it) and creates the new
//! one with link(2), which never replaces an existing file.
//!
//! A lease is cooperative: it keeps cellar nodes from attaching the same image twice; it does not
//! fence a node that keeps writing after it lost the share for longer than `leaseSeconds` (that node
//! then sees its lease lost and reports the volume abnormal).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys::files::{self, Durability};
use crate::sys::SysError;

/// What the lease file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    pub node: String,
    pub volume: String,
    /// Goes up at every renewal: a lease whose bytes do not change is not being renewed.
    pub renewals: u64,
}

/// The answer to a node asking for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds the lease now.
    Held,
    /// Another node holds it and has renewed it within the lease time (as far as this node has
    /// watched): it may be taken over after `wait` more without a renewal.
    HeldBy { node: String, wait: Duration },
}

/// The outcome of a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// Another node holds the lease now: it took it over while this node did not renew.
    Lost(String),
    /// There is no lease to renew: given back by unstage, or removed from the share.
    Gone,
}

/// One process's view of the leases it holds and the foreign leases it waits on.
pub struct Leases {
    node: String,
    /// Foreign leases seen: their bytes, and since when (this process's clock) they are unchanged.
    watched: Mutex<HashMap<PathBuf, (Vec<u8>, Instant)>>,
    /// Leases this node held that another node took over, by volume id, with the new holder.
    lost: Mutex<HashMap<String, String>>,
    /// When each lease held here was last renewed.
    renewed: Mutex<HashMap<PathBuf, Instant>>,
    /// Serializes taking, renewing and giving back leases in this process, and remembers the
    /// leases given back, so that a renewal that raced an unstage never brings a lease back.
    released: Mutex<HashSet<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode(f: &LeaseFile) -> Vec<u8> {
    serde_json::to_vec(f).expect("a lease always encodes")
}

/// The holder named by a lease's bytes; a lease that cannot be read names no one we know.
fn holder_of(bytes: &[u8]) -> String {
    serde_json::from_slice::<LeaseFile>(bytes)
        .map(|f| f.node)
        .unwrap_or_else(|_| "<unreadable lease>".to_string())
}

impl Leases {
    pub fn new(node: &str) -> Leases {
        Leases {
            node: node.to_string(),
            watched: Mutex::default(),
            lost: Mutex::default(),
            renewed: Mutex::default(),
            released: Mutex::default(),
        }
    }

    /// Takes the lease at `path` for `volume`, renews it when it is already ours, or says who holds it.
    pub fn acquire(&self, path: &Path, volume: &str, ttl: Duration) -> Result<Claim, SysError> {
        let mut released = lock(&self.released);
        released.remove(path);
        // A few rounds at most: each one loses only to another node acting at the same moment.
        for _ in 0..4 {
            let Some(bytes) = files::read_optional(path)? else {
                let mine = LeaseFile {
                    node: self.node.clone(),
                    volume: volume.to_string(),
                    renewals: 0,
                };
                if files::create_exclusive(path, &encode(&mine))? {
                    self.hold(path, volume);
                    return Ok(Claim::Held);
                }
                continue;
            };
            let holder = holder_of(&bytes);
            if holder == self.node {
                self.renew_held(path, volume)?;
                return Ok(Claim::Held);
            }
            let quiet = self.unrenewed_for(path, &bytes);
            if quiet < ttl {
                return Ok(Claim::HeldBy {
                    node: holder,
                    wait: ttl - quiet,
                });
            }
            if let Some(renewed) = self.take_over(path, &bytes)? {
                return Ok(Claim::HeldBy {
                    node: holder_of(&renewed),
                    wait: ttl,
                });
            }
        }
        Ok(Claim::HeldBy {
            node: files::read_optional(path)?
                .map(|b| holder_of(&b))
                .unwrap_or_else(|| "another node".into()),
            wait: ttl,
        })
    }

    /// How long the lease at `path` has shown these same bytes to this process.
    fn unrenewed_for(&self, path: &Path, bytes: &[u8]) -> Duration {
        let mut watched = lock(&self.watched);
        let now = Instant::now();
        let seen = watched.entry(path.to_path_buf()).or_insert((bytes.to_vec(), now));
        if seen.0 != bytes {
            *seen = (bytes.to_vec(), now);
        }
        now - seen.1
    }

    /// Moves a stale lease out of the way so that a new one can be created. If the holder renewed
    /// it in the very moment before, the lease is put back and its new bytes returned.
    fn take_over(&self, path: &Path, stale: &[u8]) -> Result<Option<Vec<u8>>, SysError> {
        lock(&self.watched).remove(path);
        let aside = path.with_extension(format!("lease.stale-{}", uuid::Uuid::new_v4().simple()));
        if !files::rename_if_exists(path, &aside)? {
            return Ok(None); // another node moved it first; the next round sees what is there now
        }
        let moved = files::read_optional(&aside)?.unwrap_or_default();
        if moved != stale {
            files::create_exclusive(path, &moved)?;
            files::remove_file_if_exists(&aside)?;
            return Ok(Some(moved));
        }
        tracing::warn!(lease = %path.display(), holder = holder_of(stale), "lease not renewed in time; taking it over");
        files::remove_file_if_exists(&aside)?;
        Ok(None)
    }

    fn hold(&self, path: &Path, volume: &str) {
        lock(&self.renewed).insert(path.to_path_buf(), Instant::now());
        lock(&self.lost).remove(volume);
    }

    /// Renews a lease this node holds; one another node holds now is reported lost.
    pub fn renew(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        let released = lock(&self.released);
        if released.contains(path) {
            return Ok(Renewal::Gone);
        }
        self.renew_held(path, volume)
    }

    fn renew_held(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        let current = match files::read_optional(path)? {
            Some(bytes) => serde_json::from_slice::<LeaseFile>(&bytes).ok(),
            None => return Ok(Renewal::Gone),
        };
        match current {
            Some(f) if f.node == self.node => {
                let next = LeaseFile {
                    renewals: f.renewals.wrapping_add(1),
                    volume: volume.to_string(),
                    ..f
                };
                files::write_atomic(path, &encode(&next), Durability::ProcessCrash)?;
                self.hold(path, volume);
                Ok(Renewal::Renewed)
            }
            other => {
                let node = other.map(|f| f.node).unwrap_or_else(|| "<unreadable lease>".into());
                Ok(self.lose(path, volume, node))
            }
        }
    }

    fn lose(&self, path: &Path, volume: &str, holder: String) -> Renewal {
        lock(&self.renewed).remove(path);
        let first = lock(&self.lost).insert(volume.to_string(), holder.clone()).is_none();
        if first {
            tracing::error!(
                volume,
                holder,
                "lease of a staged volume was taken over by another node"
            );
        }
        Renewal::Lost(holder)
    }

    /// Whether a lease held here is due for renewal (a third of its time has passed).
    pub fn due(&self, path: &Path, ttl: Duration) -> bool {
        lock(&self.renewed).get(path).is_none_or(|at| at.elapsed() >= ttl / 3)
    }

    /// Gives a lease back: removed only when this node holds it.
    pub fn release(&self, path: &Path, volume: &str) -> Result<(), SysError> {
        let mut released = lock(&self.released);
        released.insert(path.to_path_buf());
        lock(&self.renewed).remove(path);
        lock(&self.lost).remove(volume);
        if let Some(bytes) = files::read_optional(path)? {
            if holder_of(&bytes) == self.node {
                files::remove_file_if_exists(path)?;
            }
        }
        Ok(())
    }

    /// The node that took over a lease this node held, if that happened.
    pub fn lost(&self, volume: &str) -> Option<String> {
        lock(&self.lost).get(volume).cloned()
    }

    /// Clears a lease that no node has renewed for `ttl` (as this process has watched it), for
    /// deleting its volume; `Err(holder)` while its holder is alive, or may be.
    pub fn clear_if_stale(&self, path: &Path, ttl: Duration) -> Result<Result<(), String>, SysError> {
        let Some(bytes) = files::read_optional(path)? else {
            return Ok(Ok(()));
        };
        let holder = holder_of(&bytes);
        if holder != self.node && self.unrenewed_for(path, &bytes) < ttl {
            return Ok(Err(holder));
        }
        lock(&self.watched).remove(path);
        files::remove_file_if_exists(path)?;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(300);

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.lease");
        (d, p)
    }

    #[test]
    fn one_holder_at_a_time_and_release_frees_it() {
        let (_d, p) = setup();
        let (a, b) = (Leases::new("a"), Leases::new("b"));
        assert_eq!(a.acquire(&p, "v", TTL).unwrap(), Claim::Held);
        assert_eq!(
            a.acquire(&p, "v", TTL).unwrap(),
            Claim::Held,
            "the holder may ask again"
        );
        match b.acquire(&p, "v", TTL).unwrap() {
            Claim::HeldBy { node, wait } => {
                assert_eq!(node, "a");
                assert!(wait <= TTL);
            }
            other => panic!("b got {other:?}"),
        }
        b.release(&p, "v").unwrap();
        assert!(p.exists(), "a node that does not hold a lease never removes it");
        a.release(&p, "v").unwrap();
        assert!(!p.exists());
        assert_eq!(b.acquire(&p, "v", TTL).unwrap(), Claim::Held);
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(f.node, "b");
    }

    #[test]
    fn a_renewed_lease_is_never_taken_over() {
        let (d, p) = setup();
        let (a, b) = (Leases::new("a"), Leases::new("b"));
        a.acquire(&p, "v", TTL).unwrap();
        for _ in 0..6 {
            assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
            std::thread::sleep(TTL / 3);
            assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Renewed);
        }
        assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("v.lease")],
            "no temp or aside file left"
        );
    }

    #[test]
    fn a_lease_left_unrenewed_is_taken_over_and_the_old_holder_learns_it() {
        let (d, p) = setup();
        let (a, b) = (Leases::new("a"), Leases::new("b"));
        a.acquire(&p, "v", TTL).unwrap();
        assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        std::thread::sleep(TTL + Duration::from_millis(50));
        assert_eq!(b.acquire(&p, "v", TTL).unwrap(), Claim::Held);
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Lost("b".into()));
        assert_eq!(a.lost("v").as_deref(), Some("b"));
        a.release(&p, "v").unwrap();
        assert!(p.exists(), "the old holder's unstage leaves the new lease alone");
        assert_eq!(b.renew(&p, "v").unwrap(), Renewal::Renewed);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_released_lease_is_never_renewed_back_into_existence() {
        let (_d, p) = setup();
        let a = Leases::new("a");
        a.acquire(&p, "v", TTL).unwrap();
        a.release(&p, "v").unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Gone);
        assert!(!p.exists());
        // Another node's lease at that path is not ours to renew either, even after a restage here.
        let b = Leases::new("b");
        b.acquire(&p, "v", TTL).unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Gone);
        assert!(matches!(a.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Lost("b".into()));
    }

    #[test]
    fn delete_waits_for_a_live_lease_and_clears_a_dead_one() {
        let (_d, p) = setup();
        let (a, ctl) = (Leases::new("a"), Leases::new("controller"));
        assert_eq!(
            ctl.clear_if_stale(&p, TTL).unwrap(),
            Ok(()),
            "no lease: nothing to wait for"
        );
        a.acquire(&p, "v", TTL).unwrap();
        assert_eq!(ctl.clear_if_stale(&p, TTL).unwrap(), Err("a".into()));
        std::thread::sleep(TTL + Duration::from_millis(50));
        assert_eq!(ctl.clear_if_stale(&p, TTL).unwrap(), Ok(()));
        assert!(!p.exists());
    }

    #[test]
    fn a_renewal_racing_a_take_over_wins() {
        let (_d, p) = setup();
        let (a, b) = (Leases::new("a"), Leases::new("b"));
        a.acquire(&p, "v", TTL).unwrap();
        let stale = std::fs::read(&p).unwrap();
        a.renew(&p, "v").unwrap();
        // b decided on the bytes it saw before the renewal: the rename catches the new bytes.
        let back = b.take_over(&p, &stale).unwrap();
        assert!(back.is_some());
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!((f.node.as_str(), f.renewals), ("a", 1));
    }
}
