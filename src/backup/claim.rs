//! Claims that keep two processes from doing one job on a repository at once: initialising it
//! (two controller replicas' first backups) and pruning it (two replicas' background pruners, or
//! one and `cellar backup prune`, on any machines that share the repository).
//!
//! - **path**: an exclusive flock on a file beside the repository (`.<name>.cellar-init`,
//!   `.<name>.cellar-prune`), removed when done. flock holds between machines on the shared
//!   filesystems a repository lives on (NFS, CephFS, GlusterFS). A process killed while it holds
//!   one leaves the file but not its lock: the next claimant takes it over.
//! - **S3** has no lock: a claimant writes an object `<job>/<ms since the epoch>-<random>` below
//!   the repository's prefix, then lists `<job>/`, and goes on only when no other claim younger
//!   than [`STALE`] is there; else it takes its own back and answers ABORTED. With S3's
//!   read-after-write listing two claimants never both go on: whichever lists second sees the
//!   first's claim (both may back off; the caller retries). While held, the claim is written anew
//!   every [`REFRESH`], so that one held longer than [`STALE`] (a long prune) still counts; one
//!   left by a killed process is removed by the next claimant once it is stale.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::{s3_operator, Location, RepositoryConfig};
use crate::storage::StorageError;

/// What a claim is for: its name beside or in the repository, and the words for the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Job {
    Init,
    Prune,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Init => "cellar-init",
            Job::Prune => "cellar-prune",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Job::Init => "initialising",
            Job::Prune => "pruning",
        }
    }
}

/// How old (by its name) another process's S3 claim must be before it no longer counts: far more
/// than an initialisation takes, and than the time between two writes of a held claim.
const STALE: Duration = Duration::from_secs(600);

/// How often a held S3 claim is written anew.
const REFRESH: Duration = Duration::from_secs(120);

/// A claim on `job` for repository `cfg`, held until dropped; ABORTED while another process
/// holds one.
pub(super) enum Claim {
    Path(#[allow(dead_code)] crate::sys::files::HeldLockFile),
    S3(#[allow(dead_code)] S3Claim),
}

impl Claim {
    pub(super) fn take(cfg: &RepositoryConfig, job: Job) -> Result<Claim, StorageError> {
        match &cfg.location {
            Location::Path(p) => Ok(Claim::Path(path_claim(cfg, p, job)?)),
            Location::S3(s3) => Ok(Claim::S3(S3Claim::take(cfg, s3_operator(cfg, s3)?, job)?)),
        }
    }
}

/// Why a claimant backs off: another process holds the claim at `at`.
fn held_elsewhere(cfg: &RepositoryConfig, job: Job, at: &str) -> StorageError {
    StorageError::Busy(format!(
        "backup repository '{}' (another process is {} it; {at} is its claim)",
        cfg.name.as_str(),
        job.doing()
    ))
}

fn path_claim(cfg: &RepositoryConfig, repo: &Path, job: Job) -> Result<crate::sys::files::HeldLockFile, StorageError> {
    use crate::sys::files::Files;
    let name = repo
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let path = repo.with_file_name(format!(".{name}.{}", job.name()));
    match crate::sys::files::LinuxFiles.lock_while_held(&path) {
        Ok(Some(held)) => Ok(held),
        Ok(None) => Err(held_elsewhere(cfg, job, &path.display().to_string())),
        Err(e) => Err(StorageError::Unavailable(format!(
            "backup repository '{}': {e}",
            cfg.name.as_str(),
        ))),
    }
}

/// A held S3 claim: the object that is the claim now, and the thread that writes it anew.
pub(super) struct S3Claim {
    op: opendal::blocking::Operator,
    path: Arc<Mutex<String>>,
    /// Dropped to stop the refresher.
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A new claim object's path for `job`, named for now.
fn claim_path(job: Job) -> String {
    format!(
        "{}/{:020}-{}",
        job.name(),
        since_epoch().as_millis(),
        uuid::Uuid::new_v4().simple()
    )
}

impl S3Claim {
    fn take(cfg: &RepositoryConfig, op: opendal::blocking::Operator, job: Job) -> Result<S3Claim, StorageError> {
        let unreachable = |what: &str, e: opendal::Error| {
            StorageError::Unavailable(format!(
                "backup repository '{}' ({}): {what} its {} claim: {e}",
                cfg.name.as_str(),
                cfg.describe(),
                job.name()
            ))
        };
        let path = claim_path(job);
        op.write(&path, format!("a cellar process {} this repository\n", job.doing()))
            .map_err(|e| unreachable("writing", e))?;
        let mut claim = S3Claim {
            op,
            path: Arc::new(Mutex::new(path.clone())),
            stop: None,
            refresher: None,
        };
        let dir = format!("{}/", job.name());
        let listed = claim.op.list(&dir).map_err(|e| unreachable("listing", e))?;
        let now = since_epoch();
        for entry in listed {
            if entry.path() == path || !entry.metadata().is_file() {
                continue;
            }
            // Only cellar's claims count: anything else put there is no one's claim.
            let Some(written) = entry
                .name()
                .split_once('-')
                .and_then(|(ms, _)| ms.parse::<u64>().ok())
                .map(Duration::from_millis)
            else {
                continue;
            };
            // A claim dated further ahead than a stale one is old (clocks differ by less): one
            // named for the year 5000 (anyone who can write the bucket, no key) would hold every
            // claimant off for good.
            if now.abs_diff(written) > STALE {
                tracing::warn!(
                    repository = cfg.name.as_str(),
                    claim = entry.path(),
                    "removing a stale {} claim",
                    job.name()
                );
                let _ = claim.op.delete(entry.path());
                continue;
            }
            // Dropping ours takes it back.
            return Err(held_elsewhere(cfg, job, entry.path()));
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let (op, held, repository) = (claim.op.clone(), claim.path.clone(), cfg.name.as_str().to_string());
        claim.stop = Some(stop);
        claim.refresher = std::thread::Builder::new()
            .name("cellar-claim".into())
            .spawn(move || refresh(&op, &held, job, &repository, &stopped))
            .ok();
        Ok(claim)
    }
}

/// Writes the claim `held` anew every [`REFRESH`] until `stopped` (its sender dropped). A write
/// that fails is logged and tried at the next turn: the claim held meanwhile ages.
fn refresh(
    op: &opendal::blocking::Operator,
    held: &Mutex<String>,
    job: Job,
    repository: &str,
    stopped: &mpsc::Receiver<()>,
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
        let next = claim_path(job);
        match op.write(&next, format!("a cellar process {} this repository\n", job.doing())) {
            Ok(_) => {
                let old = std::mem::replace(&mut *held.lock().unwrap_or_else(|p| p.into_inner()), next);
                let _ = op.delete(&old);
            }
            Err(e) => {
                tracing::warn!(repository, error = %e, "could not write the {} claim anew; it ages", job.name())
            }
        }
    }
}

impl Drop for S3Claim {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(r) = self.refresher.take() {
            let _ = r.join();
        }
        let path = self.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(e) = self.op.delete(&path) {
            tracing::warn!(claim = path, error = %e, "could not remove a claim; the next claimant removes it once it is stale");
        }
    }
}
