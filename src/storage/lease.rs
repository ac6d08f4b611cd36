//! Leases that keep an `image` volume of a shared pool on one node at a time.
//!
//! The image file lives on a share that every node mounts, and nothing in the kernels stops two
//! nodes from attaching it and mounting its filesystem at once, which would corrupt it. So a node
//! that stages such a volume first takes the volume's lease: a small file apart from the volumes,
//! `.leases/<key>`, naming the node. The holder renews it (a counter in the file goes up) every
//! third of the pool's `leaseSeconds`, each share's leases on a thread of their own, takes it again
//! if it has vanished while the volume is staged, and unstage gives it back.
//!
//! Another node that finds the lease taken is refused, naming the holder, until it has itself
//! watched the lease go unrenewed for a whole `leaseSeconds`: then the holder is taken to be dead
//! and the lease is taken over. Staleness is measured on the watcher's own monotonic clock, never by
//! comparing timestamps written by other machines, so clocks that disagree do not matter. Taking
//! over moves the old lease aside with one rename (only one taker can win it) and creates the new
//! one with link(2), which never replaces an existing file.
//!
//! A lease is cooperative and lives in the driver, not in the mount: it keeps cellar nodes from
//! attaching the same image twice, but nothing fences a holder whose mount outlives its renewals
//! by `leaseSeconds` (driver down or stopped, node cut off from the share); that node later sees
//! its lease lost and reports the volume abnormal. docs/shared.md, "Limits", says when.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys::clock::{Clock, MonotonicClock};
use crate::sys::files::{Durability, Files};
use crate::sys::SysError;

/// What the lease file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    pub node: String,
    pub volume: String,
    /// Goes up at every renewal: a lease whose bytes do not change is not being renewed.
    pub renewals: u64,
    /// Drawn at each acquisition and kept by its renewals: a lease made again by the same node
    /// never has the bytes of one another node watched earlier (which it would take for stale).
    /// Empty in a lease written by an earlier release.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub taken: String,
}

impl LeaseFile {
    /// A new lease of `volume` by `node`.
    pub fn new(node: &str, volume: &str) -> LeaseFile {
        LeaseFile {
            node: node.to_string(),
            volume: volume.to_string(),
            renewals: 0,
            taken: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
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
    /// Where the lease files are read and written (real, or a test's recording fake).
    files: Arc<dyn Files>,
    /// Foreign leases seen: their bytes, and since when (this process's clock) they are unchanged.
    watched: Mutex<HashMap<PathBuf, (Vec<u8>, Instant)>>,
    /// Leases this node held that another node took over, by volume id, with the new holder.
    lost: Mutex<HashMap<String, String>>,
    /// When each lease held here was last renewed.
    renewed: Mutex<HashMap<PathBuf, Instant>>,
    /// The leases given back here, so that a renewal that raced an unstage never brings one back.
    released: Mutex<HashSet<PathBuf>>,
    /// One turn per lease: taking, renewing and giving back a lease are serialized per lease, never
    /// across leases, so a call stuck on one share (a hard NFS mount whose server is gone) holds
    /// up nothing of another share's leases. The maps above are only ever held for a moment.
    turns: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// This process's monotonic clock, on which staleness and renewal times are measured.
    clock: Arc<dyn Clock>,
}

/// A call's turn on one lease. The last call out removes the lease's entry, so the map holds only
/// the leases in use, not every lease this process has ever touched.
struct Turn<'a> {
    leases: &'a Leases,
    path: &'a Path,
    lock: Arc<Mutex<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut turns = lock(&self.leases.turns);
        // Clones are only made under the map's lock: held here, two means the map's and this one.
        if Arc::strong_count(&self.lock) == 2 {
            turns.remove(self.path);
        }
    }
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
    pub fn new(node: &str, files: Arc<dyn Files>) -> Leases {
        Leases {
            node: node.to_string(),
            files,
            watched: Mutex::default(),
            lost: Mutex::default(),
            renewed: Mutex::default(),
            released: Mutex::default(),
            turns: Mutex::default(),
            clock: Arc::new(MonotonicClock),
        }
    }

    /// Measures lease times on `clock` instead of the monotonic clock itself (a test's, moved on).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Leases {
        self.clock = clock;
        self
    }

    /// The lock that serializes the calls on one lease; hold it with `lock(&turn.lock)`.
    fn turn<'a>(&'a self, path: &'a Path) -> Turn<'a> {
        let shared = lock(&self.turns).entry(path.to_path_buf()).or_default().clone();
        Turn {
            leases: self,
            path,
            lock: shared,
        }
    }

    /// The lease file at `path`. One cellar did not write there (a FIFO, a symbolic link, a huge
    /// file: put on the share by a node) reads as empty, a lease that does not parse: held by
    /// `<unreadable lease>`, taken over once it has stood unrenewed for the lease time, as any.
    fn read_lease(&self, path: &Path) -> Result<Option<Vec<u8>>, SysError> {
        match self.files.read_optional(path) {
            Err(e) if e.is_not_ours() => {
                tracing::warn!(lease = %path.display(), error = %e, "a lease that is not cellar's reads as unreadable");
                Ok(Some(Vec::new()))
            }
            read => read,
        }
    }

    /// Takes the lease at `path` for `volume`, renews it when it is already ours, or says who holds it.
    pub fn acquire(&self, path: &Path, volume: &str, ttl: Duration) -> Result<Claim, SysError> {
        let turn = self.turn(path);
        let _turn = lock(&turn.lock);
        lock(&self.released).remove(path);
        // A few rounds at most: each one loses only to another node acting at the same moment.
        for _ in 0..4 {
            let Some(bytes) = self.read_lease(path)? else {
                // Whatever this process watched there is gone: nothing to remember of it.
                lock(&self.watched).remove(path);
                let mine = LeaseFile::new(&self.node, volume);
                if self.files.create_exclusive(path, &encode(&mine))? {
                    self.hold(path, volume);
                    return Ok(Claim::Held);
                }
                continue;
            };
            let holder = holder_of(&bytes);
            if holder == self.node {
                // Ours when read, but another node may have taken it over (it was left unrenewed
                // for a whole lease time: this node was down) between that read and the renewal's.
                crate::crash::point("lease:renew-own");
                match self.renew_held(path, volume)? {
                    Renewal::Renewed => return Ok(Claim::Held),
                    Renewal::Lost(node) => return Ok(Claim::HeldBy { node, wait: ttl }),
                    Renewal::Gone => continue,
                }
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
            node: self
                .files
                .read_optional(path)?
                .map(|b| holder_of(&b))
                .unwrap_or_else(|| "another node".into()),
            wait: ttl,
        })
    }

    /// How long the lease at `path` has shown these same bytes to this process.
    fn unrenewed_for(&self, path: &Path, bytes: &[u8]) -> Duration {
        let mut watched = lock(&self.watched);
        let now = self.clock.now();
        let seen = watched.entry(path.to_path_buf()).or_insert((bytes.to_vec(), now));
        if seen.0 != bytes {
            *seen = (bytes.to_vec(), now);
        }
        now - seen.1
    }

    /// Moves a stale lease out of the way so that a new one can be created. Returns the lease that
    /// stands at `path` afterwards, if any: one made or renewed after the staleness was judged, which
    /// is not to be touched.
    fn take_over(&self, path: &Path, stale: &[u8]) -> Result<Option<Vec<u8>>, SysError> {
        // Named as a temporary file: a process killed before it removes the file below leaves it
        // for the pool's sweep of old temporary files, not for good.
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let aside = path.with_file_name(format!(
            ".{name}.stale-{}{}",
            uuid::Uuid::new_v4().simple(),
            crate::sys::files::TMP_SUFFIX
        ));
        // A rename that failed leaves the watch as it was: the next try goes on from it, instead
        // of watching a whole lease time again.
        let moved = self.files.rename_if_exists(path, &aside)?;
        lock(&self.watched).remove(path);
        if !moved {
            // Another node moved it first, and may have made its own lease since.
            return self.read_lease(path);
        }
        crate::crash::point("lease:moved-aside");
        let moved = self.read_lease(&aside)?.unwrap_or_default();
        if moved != stale {
            // Renewed just before the rename: put back as it was, unless a lease is there again.
            self.files.create_exclusive(path, &moved)?;
        }
        self.files.remove_file_if_exists(&aside)?;
        // A renewal just after the rename finds no lease and makes it again (or replaces it whole):
        // whatever stands there now was not judged stale.
        let now = self.read_lease(path)?;
        if now.is_none() {
            tracing::warn!(lease = %path.display(), holder = holder_of(stale), "lease not renewed in time; taking it over");
        }
        Ok(now)
    }

    fn hold(&self, path: &Path, volume: &str) {
        lock(&self.renewed).insert(path.to_path_buf(), self.clock.now());
        lock(&self.lost).remove(volume);
    }

    /// Renews a lease this node holds; one another node holds now is reported lost.
    /// The volume is staged here: a lease that has vanished from the share (a delete cleared it
    /// while this node could not renew, or it was removed by hand) is taken again at once, unless
    /// another node has taken it meanwhile; else any node could stage the volume with no wait.
    pub fn renew(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        self.renew_as(path, volume, true)
    }

    /// Renews a lease this node holds for a volume it may have staged but has lost its record of
    /// (the node's state file of it cannot be read): unlike [`Leases::renew`], a lease that is
    /// gone is not made again, since nothing says the volume is staged here or still exists.
    pub fn renew_existing(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        self.renew_as(path, volume, false)
    }

    fn renew_as(&self, path: &Path, volume: &str, retake: bool) -> Result<Renewal, SysError> {
        let turn = self.turn(path);
        let _turn = lock(&turn.lock);
        if lock(&self.released).contains(path) {
            return Ok(Renewal::Gone);
        }
        let renewed = match self.renew_held(path, volume)? {
            Renewal::Gone if retake => self.retake(path, volume)?,
            r => r,
        };
        Ok(match renewed {
            Renewal::Lost(holder) => self.lose(path, volume, holder),
            r => r,
        })
    }

    /// Creates again the lease of a volume staged here whose lease file is gone.
    fn retake(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        let mine = LeaseFile::new(&self.node, volume);
        if self.files.create_exclusive(path, &encode(&mine))? {
            tracing::warn!(volume, lease = %path.display(), "lease of a volume staged here was gone; taken again");
            self.hold(path, volume);
            return Ok(Renewal::Renewed);
        }
        Ok(match self.read_lease(path)? {
            Some(bytes) if holder_of(&bytes) == self.node => self.renew_held(path, volume)?,
            Some(bytes) => Renewal::Lost(holder_of(&bytes)),
            None => Renewal::Gone,
        })
    }

    /// Renews the lease at `path` if this node holds it; `Lost` names the node that holds it
    /// instead (recorded as lost by the caller that has the volume staged).
    fn renew_held(&self, path: &Path, volume: &str) -> Result<Renewal, SysError> {
        let current = match self.read_lease(path)? {
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
                self.files
                    .write_atomic(path, &encode(&next), Durability::ProcessCrash)?;
                self.hold(path, volume);
                Ok(Renewal::Renewed)
            }
            other => Ok(Renewal::Lost(
                other.map(|f| f.node).unwrap_or_else(|| "<unreadable lease>".into()),
            )),
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

    /// The volumes whose leases in `dir` (one pool's) name this node, as their files say: what a
    /// node that lost its record of a stage still holds. A file that is no lease of this node
    /// (moved aside by a take-over, unreadable, another node's) is passed over.
    pub fn held_in(&self, dir: &Path) -> Result<Vec<String>, SysError> {
        if self.files.entry(dir)? != crate::sys::files::Entry::Dir {
            return Ok(Vec::new());
        }
        let mut held = Vec::new();
        for p in self.files.list_dir(dir)? {
            if p.file_name().is_none_or(|n| n.as_encoded_bytes().starts_with(b".")) {
                continue;
            }
            let lease = self.read_lease(&p)?;
            if let Some(f) = lease.and_then(|b| serde_json::from_slice::<LeaseFile>(&b).ok()) {
                if f.node == self.node {
                    held.push(f.volume);
                }
            }
        }
        Ok(held)
    }

    /// Whether a lease held here is due for renewal (a third of its time has passed).
    pub fn due(&self, path: &Path, ttl: Duration) -> bool {
        let now = self.clock.now();
        lock(&self.renewed)
            .get(path)
            .is_none_or(|at| now.saturating_duration_since(*at) >= ttl / 3)
    }

    /// Forgets the leases given back in `dir` (one pool's leases) that `staged` does not name: a
    /// renewer whose pass lists the staged volumes anew, and renews only those, never renews a
    /// lease it does not list, so remembering its release serves nothing after such a listing.
    /// Call with the listing a pass is about to renew from.
    pub fn forget_released(&self, dir: &Path, staged: &HashSet<PathBuf>) {
        lock(&self.released).retain(|p| p.parent() != Some(dir) || staged.contains(p));
    }

    /// Whether a release of the lease at `path` is still remembered.
    #[cfg(test)]
    pub fn remembers_release(&self, path: &Path) -> bool {
        lock(&self.released).contains(path)
    }

    /// Gives a lease back: removed only when this node holds it.
    pub fn release(&self, path: &Path, volume: &str) -> Result<(), SysError> {
        let turn = self.turn(path);
        let _turn = lock(&turn.lock);
        lock(&self.released).insert(path.to_path_buf());
        lock(&self.renewed).remove(path);
        lock(&self.lost).remove(volume);
        if let Some(bytes) = self.read_lease(path)? {
            if holder_of(&bytes) == self.node {
                self.files.remove_file_if_exists(path)?;
            }
        }
        Ok(())
    }

    /// The node that took over a lease this node held, if that happened.
    pub fn lost(&self, volume: &str) -> Option<String> {
        lock(&self.lost).get(volume).cloned()
    }

    /// Clears a lease that no node has renewed for `ttl` (as this process has watched it), for
    /// deleting its volume; `Err(holder)` while its holder is alive, or may be. A lease under this
    /// process's own name counts as stale at once only when `mine_checked`: the caller serves this
    /// node's mounts and has found none of the volume. A process that does not (a controller
    /// replica, whose name a node may also bear) treats its own name like any other.
    pub fn clear_if_stale(
        &self,
        path: &Path,
        ttl: Duration,
        mine_checked: bool,
    ) -> Result<Result<(), String>, SysError> {
        let Some(bytes) = self.read_lease(path)? else {
            lock(&self.watched).remove(path);
            return Ok(Ok(()));
        };
        let holder = holder_of(&bytes);
        let mine = mine_checked && holder == self.node;
        if !mine && self.unrenewed_for(path, &bytes) < ttl {
            return Ok(Err(holder));
        }
        // Its holder may renew it in this very moment (late, but alive): moved aside and compared,
        // as a take-over does, a renewed lease is put back and the delete refused.
        crate::crash::point("lease:clear-stale");
        match self.take_over(path, &bytes)? {
            Some(renewed) => Ok(Err(holder_of(&renewed))),
            None => Ok(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::files::LinuxFiles;

    const TTL: Duration = Duration::from_millis(300);

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.lease");
        (d, p)
    }

    /// What a node puts in a lease's place that cellar never writes there (a FIFO, a symbolic
    /// link) reads as an unreadable lease: held by nobody this node knows, taken over once stale as
    /// any, and a node's look for its own leases passes over it (it used to stop there, every
    /// lease of the share then unknown to a node whose state file was torn).
    #[test]
    fn a_fifo_or_link_in_a_leases_place_reads_as_an_unreadable_lease() {
        let (d, p) = setup();
        let a = Leases::new("a", Arc::new(LinuxFiles));
        assert_eq!(a.acquire(&p, "v", TTL).unwrap(), Claim::Held);
        let (fifo, link) = (d.path().join("fifo.lease"), d.path().join("link.lease"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(a.held_in(d.path()).unwrap(), vec!["v".to_string()]);
        for planted in [&fifo, &link] {
            match a.acquire(planted, "w", TTL).unwrap() {
                Claim::HeldBy { node, .. } => assert_eq!(node, "<unreadable lease>", "{}", planted.display()),
                other => panic!("{}: {other:?}", planted.display()),
            }
        }
        // Stale once watched unrenewed for the lease time, as any lease: the delete clears it.
        assert!(
            a.clear_if_stale(&link, TTL, false).unwrap().is_err(),
            "watched from now"
        );
        std::thread::sleep(TTL + Duration::from_millis(50));
        assert_eq!(a.clear_if_stale(&link, TTL, false).unwrap(), Ok(()));
        assert!(std::fs::symlink_metadata(&link).is_err(), "the link is gone");
        assert!(p.is_file(), "what it named is left alone");
    }

    #[test]
    fn one_holder_at_a_time_and_release_frees_it() {
        let (_d, p) = setup();
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
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
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
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

    /// `a` holds the lease at `p`, and `b` has watched it go unrenewed for a whole lease time.
    fn left_unrenewed(p: &Path) -> (Leases, Leases) {
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
        a.acquire(p, "v", TTL).unwrap();
        assert!(matches!(b.acquire(p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        std::thread::sleep(TTL + Duration::from_millis(50));
        (a, b)
    }

    #[test]
    fn a_lease_left_unrenewed_is_taken_over_and_the_old_holder_learns_it() {
        let (d, p) = setup();
        let (a, b) = left_unrenewed(&p);
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

    /// A lease given back and taken again by the same node is a new lease to a node that watched
    /// the first: its staleness clock starts again (the new lease had the first one's bytes, so a
    /// node that had watched those more than a lease time earlier took a live lease over).
    #[test]
    fn a_lease_taken_again_is_watched_afresh() {
        let (_d, p) = setup();
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
        a.acquire(&p, "v", TTL).unwrap();
        assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        a.release(&p, "v").unwrap();
        std::thread::sleep(TTL + Duration::from_millis(50));
        assert_eq!(a.acquire(&p, "v", TTL).unwrap(), Claim::Held);
        assert!(
            matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }),
            "a lease just taken is live"
        );
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Renewed);
    }

    #[test]
    fn a_released_lease_is_never_renewed_back_into_existence() {
        let (_d, p) = setup();
        let a = Leases::new("a", Arc::new(LinuxFiles));
        a.acquire(&p, "v", TTL).unwrap();
        a.release(&p, "v").unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Gone);
        assert!(!p.exists());
        // Another node's lease at that path is not ours to renew either, even after a restage here.
        let b = Leases::new("b", Arc::new(LinuxFiles));
        b.acquire(&p, "v", TTL).unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Gone);
        assert!(matches!(a.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Lost("b".into()));
    }

    #[test]
    fn delete_waits_for_a_live_lease_and_clears_a_dead_one() {
        let (_d, p) = setup();
        let (a, ctl) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("controller", Arc::new(LinuxFiles)),
        );
        assert_eq!(
            ctl.clear_if_stale(&p, TTL, false).unwrap(),
            Ok(()),
            "no lease: nothing to wait for"
        );
        a.acquire(&p, "v", TTL).unwrap();
        assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Err("a".into()));
        std::thread::sleep(TTL + Duration::from_millis(50));
        assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Ok(()));
        assert!(!p.exists());
    }

    /// A controller replica named like a node (both "controller") must not take that node's live
    /// lease for a stale one of its own; the node itself, having found no use of it, may.
    #[test]
    fn a_live_lease_under_the_callers_own_name_is_stale_only_where_its_mounts_were_checked() {
        let (_d, p) = setup();
        let (node, ctl) = (
            Leases::new("controller", Arc::new(LinuxFiles)),
            Leases::new("controller", Arc::new(LinuxFiles)),
        );
        node.acquire(&p, "v", TTL).unwrap();
        assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Err("controller".into()));
        assert!(p.exists(), "the live lease stays");
        assert_eq!(node.clear_if_stale(&p, TTL, true).unwrap(), Ok(()));
        assert!(!p.exists());
    }

    #[test]
    fn a_renewal_racing_a_take_over_wins() {
        let (_d, p) = setup();
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
        a.acquire(&p, "v", TTL).unwrap();
        let stale = std::fs::read(&p).unwrap();
        a.renew(&p, "v").unwrap();
        // b decided on the bytes it saw before the renewal: the rename catches the new bytes.
        let back = b.take_over(&p, &stale).unwrap();
        assert!(back.is_some());
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!((f.node.as_str(), f.renewals), ("a", 1));
    }

    /// A share whose server is gone blocks a call on it in the kernel (a hard NFS mount): here a
    /// read of the lease held at its start (a FIFO in its place no longer waits: files.rs). The
    /// leases of another share must still be taken, renewed and given back meanwhile: a renewal
    /// held up past the lease time lets another node stage a volume this node still has mounted.
    #[test]
    fn a_lease_stuck_on_its_share_holds_up_no_other_lease() {
        use crate::crash::in_thread;
        let (d, p) = setup();
        let hung = d.path().join("hung.lease");
        std::fs::write(&hung, b"").unwrap();
        let a = Arc::new(Leases::new("a", Arc::new(LinuxFiles)));
        a.acquire(&p, "v", TTL).unwrap();
        let pause = Arc::new(in_thread::Pause::default());
        in_thread::hold_reads_of(&hung, pause.clone());
        let stuck = {
            let (a, hung) = (a.clone(), hung.clone());
            std::thread::spawn(move || a.renew(&hung, "w"))
        };
        assert!(pause.reached(Duration::from_secs(60)), "the renewal reads its lease");
        let other = {
            let (a, p) = (a.clone(), p.clone());
            std::thread::spawn(move || {
                let renewed = a.renew(&p, "v");
                let released = a.release(&p, "v");
                let taken = a.acquire(&p, "v", TTL);
                (renewed, released, taken)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !other.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = other.is_finished();
        // Lets the stuck call go (it reads nothing: that lease is lost).
        pause.release();
        assert!(done, "a call on another lease waited for the stuck share");
        let (renewed, released, taken) = other.join().unwrap();
        assert_eq!(renewed.unwrap(), Renewal::Renewed);
        released.unwrap();
        assert_eq!(taken.unwrap(), Claim::Held);
        assert!(matches!(stuck.join().unwrap(), Ok(Renewal::Lost(_))));
    }

    /// The lease of a node that was down is still its own when it asks for the volume again, but
    /// another node that watched it go unrenewed may take it over in that very moment: the old
    /// holder must then be refused, never told it holds the lease both nodes would then mount on.
    #[test]
    fn an_own_lease_taken_over_while_asked_for_again_is_not_held() {
        let (_d, p) = setup();
        let (a, b) = (
            Arc::new(Leases::new("a", Arc::new(LinuxFiles))),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
        a.acquire(&p, "v", TTL).unwrap();
        assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        std::thread::sleep(TTL + Duration::from_millis(50));
        let pause = Arc::new(crate::crash::in_thread::Pause::default());
        let asking = {
            let (a, p, pause) = (a.clone(), p.clone(), pause.clone());
            std::thread::spawn(move || {
                crate::crash::in_thread::pause_at(Some(("lease:renew-own", pause)));
                a.acquire(&p, "v", TTL)
            })
        };
        assert!(pause.reached(Duration::from_secs(5)), "a read its own lease");
        assert_eq!(
            b.acquire(&p, "v", TTL).unwrap(),
            Claim::Held,
            "b takes the stale lease over"
        );
        pause.release();
        match asking.join().unwrap().unwrap() {
            Claim::HeldBy { node, .. } => assert_eq!(node, "b"),
            Claim::Held => panic!("both a and b were told they hold the lease"),
        }
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(f.node, "b");
    }

    /// A lease removed from under a volume staged here (a delete cleared it while this node could
    /// not renew, or a hand removed it) is taken again at the next renewal: else another node could
    /// stage the volume at once, with no lease time to wait.
    #[test]
    fn a_lease_gone_from_under_a_staged_volume_is_taken_again() {
        let (_d, p) = setup();
        let (a, b) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
        );
        a.acquire(&p, "v", TTL).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Renewed);
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(f.node, "a");
        assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
        // Once given back, it stays given back.
        a.release(&p, "v").unwrap();
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Gone);
        assert!(!p.exists());
    }

    /// A delete that has watched `a`'s lease go unrenewed for its whole time clears it, and `a`
    /// (late but alive) renews it while the delete stands at `point`. The renewal must win: the
    /// delete refused, the lease `a`'s, no aside file left. Returns the lease as it is then.
    fn renewal_racing_a_deletes_clear_at(point: &'static str) -> LeaseFile {
        let (d, p) = setup();
        let (a, ctl) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Arc::new(Leases::new("controller", Arc::new(LinuxFiles))),
        );
        a.acquire(&p, "v", TTL).unwrap();
        assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Err("a".into()));
        std::thread::sleep(TTL + Duration::from_millis(50));
        let pause = Arc::new(crate::crash::in_thread::Pause::default());
        let clearing = {
            let (ctl, p, pause) = (ctl.clone(), p.clone(), pause.clone());
            std::thread::spawn(move || {
                crate::crash::in_thread::pause_at(Some((point, pause)));
                ctl.clear_if_stale(&p, TTL, false)
            })
        };
        assert!(pause.reached(Duration::from_secs(5)), "the delete stands at {point}");
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Renewed);
        pause.release();
        assert_eq!(clearing.join().unwrap().unwrap(), Err("a".into()));
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(f.node, "a", "the holder's lease is left alone");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no aside file left");
        f
    }

    /// The renewal lands after the delete judged the lease stale, before it moves the lease aside:
    /// the renewed lease is put back.
    #[test]
    fn a_renewal_racing_a_deletes_clear_wins() {
        let f = renewal_racing_a_deletes_clear_at("lease:clear-stale");
        assert_eq!(f.renewals, 1, "the renewed lease itself");
    }

    /// The renewal lands just after the delete moved the lease aside (it finds no lease and makes
    /// it again): the delete must see the lease standing there again, not go on as if cleared.
    #[test]
    fn a_renewal_landing_after_a_deletes_rename_wins() {
        renewal_racing_a_deletes_clear_at("lease:moved-aside");
    }

    /// A take-over whose rename failed (EIO on the share) goes on at the next try: the lease time
    /// this node watched still counts, instead of a whole lease time more (the pod of a dead node
    /// waited twice as long to start elsewhere). On a clock a test moves on: no wait.
    #[test]
    fn a_take_over_whose_rename_failed_takes_the_lease_at_the_next_try() {
        use crate::sys::clock::SteppedClock;
        use crate::sys::files::RecordingFiles;
        let (_d, p) = setup();
        let ttl = Duration::from_secs(30);
        let files = Arc::new(RecordingFiles::default());
        let clock = Arc::new(SteppedClock::default());
        let a = Leases::new("a", Arc::new(LinuxFiles));
        let b = Leases::new("b", files.clone()).with_clock(clock.clone());
        a.acquire(&p, "v", ttl).unwrap();
        assert!(matches!(b.acquire(&p, "v", ttl).unwrap(), Claim::HeldBy { .. }));
        clock.advance(ttl);
        files.fail_next("rename_if_exists", libc::EIO);
        b.acquire(&p, "v", ttl).expect_err("the rename fails");
        assert_eq!(b.acquire(&p, "v", ttl).unwrap(), Claim::Held);
        assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Lost("b".into()));
    }

    /// A take-over killed just after it moved the stale lease aside: the next try takes the lease,
    /// and the aside file is a temporary file the pool's sweep removes (it stayed for good).
    #[test]
    fn a_take_over_killed_after_its_rename_leaves_only_what_the_sweep_removes() {
        let (d, p) = setup();
        let (_a, b) = left_unrenewed(&p);
        crate::crash::in_thread::crash_at(Some("lease:moved-aside"));
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.acquire(&p, "v", TTL)));
        crate::crash::in_thread::crash_at(None);
        assert!(killed.is_err(), "b was killed at lease:moved-aside");
        assert!(!p.exists(), "the stale lease was moved aside");
        assert_eq!(b.acquire(&p, "v", TTL).unwrap(), Claim::Held, "b's next try takes it");
        let f: LeaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(f.node, "b");
        assert_eq!(LinuxFiles.remove_stale_temps(d.path(), Duration::ZERO).unwrap(), 1);
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, vec![p], "only the lease is left");
    }

    /// Leases watched while others held them are forgotten once they are gone: a controller or a
    /// node that meets lease after lease keeps no trace of those given back.
    #[test]
    fn leases_watched_are_forgotten_once_given_back() {
        let (d, _) = setup();
        let (a, b, ctl) = (
            Leases::new("a", Arc::new(LinuxFiles)),
            Leases::new("b", Arc::new(LinuxFiles)),
            Leases::new("controller", Arc::new(LinuxFiles)),
        );
        for i in 0..50 {
            let p = d.path().join(format!("v{i}.lease"));
            assert_eq!(a.acquire(&p, "v", TTL).unwrap(), Claim::Held);
            assert!(matches!(b.acquire(&p, "v", TTL).unwrap(), Claim::HeldBy { .. }));
            assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Err("a".into()));
            a.release(&p, "v").unwrap();
            assert_eq!(b.acquire(&p, "v", TTL).unwrap(), Claim::Held);
            b.release(&p, "v").unwrap();
            assert_eq!(ctl.clear_if_stale(&p, TTL, false).unwrap(), Ok(()));
        }
        assert_eq!(lock(&b.watched).len(), 0, "b");
        assert_eq!(lock(&ctl.watched).len(), 0, "the controller");
    }

    /// Releases are remembered (a renewal racing one must not make the lease again) only until a
    /// renewer's new listing of what is staged no longer names them.
    #[test]
    fn releases_are_forgotten_once_a_listing_no_longer_names_them() {
        let (d, _) = setup();
        let a = Leases::new("a", Arc::new(LinuxFiles));
        let (gone, kept) = (d.path().join("gone.lease"), d.path().join("kept.lease"));
        let other = d.path().join("other-pool").join("x.lease");
        for p in [&gone, &kept] {
            assert_eq!(a.acquire(p, "v", TTL).unwrap(), Claim::Held);
            a.release(p, "v").unwrap();
        }
        lock(&a.released).insert(other.clone());
        // A listing made while `kept` was being released still names it: remembered.
        a.forget_released(d.path(), &HashSet::from([kept.clone()]));
        assert_eq!(a.renew(&kept, "v").unwrap(), Renewal::Gone, "never renewed back");
        let left = lock(&a.released).clone();
        assert_eq!(
            left,
            HashSet::from([kept, other]),
            "only another pool's and the listed one"
        );
    }

    /// A node that stages and unstages volume after volume keeps no trace of the leases it is done
    /// with: the per-lease turns go with the last call that used them.
    #[test]
    fn the_turns_of_leases_no_longer_in_use_are_let_go() {
        let (d, _) = setup();
        let a = Leases::new("a", Arc::new(LinuxFiles));
        for i in 0..100 {
            let p = d.path().join(format!("v{i}.lease"));
            assert_eq!(a.acquire(&p, "v", TTL).unwrap(), Claim::Held);
            assert_eq!(a.renew(&p, "v").unwrap(), Renewal::Renewed);
            a.release(&p, "v").unwrap();
        }
        assert_eq!(lock(&a.turns).len(), 0);
    }
}
