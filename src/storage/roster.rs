//! The roster: what volumes and snapshots each local pool held, kept outside the pool, in the node's data
//! directory. A pool whose disk is not mounted when the process starts does not open (its records
//! are on that disk); the roster lets the node list its volumes meanwhile, abnormal, as last
//! recorded, rather than leave them out of ListVolumes as if they were deleted, and lets a
//! controller that restarted meanwhile learn their names (a retried create of one of them goes to
//! this node, which refuses it while the pool is shut, instead of making the volume again
//! elsewhere).
//!
//! The roster also remembers **which pool** it lists. A pool's root holds its mark, `.cellar-pool`
//! (its name, backend and a random id, made at its first opening: `storage/pool.rs`), and the node
//! keeps a local pool's id beside the roster (`<pool>.id`). A pool's directory that lacks the mark the node remembers (its disk is not
//! mounted, and the directory below it is empty) or holds another mark (another pool's disk is
//! mounted there) does not open: opened there, its volumes would look deleted and new ones would be
//! made on the wrong disk, hidden once the right one is mounted. It is tried again every 10 s, and
//! opens once its disk is there.
//!
//! The records on the pool's disk stay the truth: the roster is only read for a pool that did not
//! open, and is written again from the records each time a pool opens. Between those, every
//! record written or removed adds a line to the pool's roster file (`<pool>.volumes`, JSON
//! lines: `{"put":<volume record>}`, `{"snap":<snapshot record>}` or `{"gone":"<id>"}`), each an
//! unsynced append: a record written
//! adds its line before the record (a crash between them lists it rather than leaves it out, unless
//! another change's rewrite of the roster came between them, one in about a thousand; a record
//! that fails has the roster written whole again from the others), and again after it only when
//! the roster was written whole from the records in between (which did not hold it yet); a record
//! removed adds its line after it. A crash of the process loses nothing, a crash of the machine may lose
//! the last lines (the volumes they name are then
//! missing from the listing, or shown though deleted, only while their pool stays shut). A
//! roster that grew to more lines than a rewrite would hold (twice its records, and at least
//! [`REWRITE_AFTER`]) is written again whole. A line that does not parse (a torn last append) is
//! skipped. A roster that cannot be written costs the listing of a shut pool, never a call: the
//! failure is logged and the roster is written whole at the next chance.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::id::PoolName;
use super::pool::{Mark, MARK};
use super::record::{SnapshotRecord, VolumeRecord};
use super::StorageError;
use crate::sys::files::{Durability, Files};

/// What a node remembers of a local pool's mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    id: String,
}

/// Appends a roster takes before it is written again whole, at the least.
pub const REWRITE_AFTER: usize = 1024;

/// One line of a roster, as read: a volume's record, a snapshot's, or the id of either removed
/// (a snapshot's id starts with `snap:`, a volume's never does). A release before snapshot lines
/// skips them as lines it cannot parse.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Put(Box<VolumeRecord>),
    Snap(Box<SnapshotRecord>),
    Gone(String),
}

/// A change of a pool's objects, as a roster line is written (borrowing what it names).
#[derive(Serialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum Change<'a> {
    /// A volume's record written.
    Put(&'a VolumeRecord),
    /// A snapshot's record written.
    Snap(&'a SnapshotRecord),
    /// The record of the volume or snapshot with this id removed.
    Gone(&'a str),
}

/// What a pool's roster lists: its volumes and its snapshots, each by id.
#[derive(Default, Debug)]
pub struct Listed {
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub snapshots: BTreeMap<String, SnapshotRecord>,
}

fn line(out: Change<'_>, bytes: &mut Vec<u8>) {
    if serde_json::to_writer(&mut *bytes, &out).is_ok() {
        bytes.push(b'\n');
    }
}

/// Per pool: appends since the roster was last written whole, how many it may take before it is
/// written whole again (as many as it held then, at least [`REWRITE_AFTER`]), and whether it must
/// be written whole at the next chance (an append failed: the file misses a change).
struct Written {
    appends: usize,
    limit: usize,
    stale: bool,
    /// How many times the roster was written whole (or tried): a line added before then may be
    /// gone, if the records it was written from did not hold its change yet.
    rewrites: u64,
}

impl Default for Written {
    fn default() -> Written {
        Written {
            appends: 0,
            limit: REWRITE_AFTER,
            stale: false,
            rewrites: 0,
        }
    }
}

pub struct Roster {
    dir: PathBuf,
    files: Arc<dyn Files>,
    /// Held while a roster file is written (appended to, or written whole): an append never
    /// lands between the records a rewrite read and its rename.
    written: Mutex<HashMap<PoolName, Written>>,
}

impl Roster {
    pub fn new(dir: &Path, files: Arc<dyn Files>) -> Roster {
        Roster {
            dir: dir.to_path_buf(),
            files,
            written: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, pool: &PoolName) -> PathBuf {
        self.dir.join(format!("{}.volumes", pool.as_str()))
    }

    /// Holds the roster files for one write: the guard passes to [`Roster::append`] and
    /// [`Roster::rewrite`].
    pub fn hold(&self) -> RosterGuard<'_> {
        RosterGuard {
            roster: self,
            written: self.written.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The pools this node keeps a roster or a remembered mark of (by the files' names), in name
    /// order: those its configuration no longer names are the pools it had and was told to stop
    /// using. None when the directory cannot be read (logged: pools left out of the configuration
    /// are then not known).
    pub fn pools(&self) -> Vec<PoolName> {
        let paths = match self.files.list_dir(&self.dir) {
            Ok(paths) => paths,
            Err(e) => {
                tracing::warn!(error = %e, "the rosters cannot be listed; volumes of pools left out of the configuration are not known");
                return Vec::new();
            }
        };
        let mut names: Vec<PoolName> = paths
            .iter()
            .filter_map(|p| {
                let file = p.file_name()?.to_str()?;
                let stem = file.strip_suffix(".volumes").or_else(|| file.strip_suffix(".id"))?;
                PoolName::parse(stem).ok()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// What an operator removes to have the node forget pool `pool` (its roster and remembered
    /// mark), for the messages that say so.
    pub fn files_of(&self, pool: &PoolName) -> String {
        format!(
            "{} and {}",
            self.path(pool).display(),
            self.identity_path(pool).display()
        )
    }

    /// Where the node remembers the id of pool `pool`'s mark.
    pub fn identity_path(&self, pool: &PoolName) -> PathBuf {
        self.dir.join(format!("{}.id", pool.as_str()))
    }

    /// The id of pool `pool`'s mark this node remembers (it opened the pool), if it does.
    pub fn remembered(&self, pool: &PoolName) -> Option<String> {
        let bytes = self.files.read_optional(&self.identity_path(pool)).ok()??;
        serde_json::from_slice::<Remembered>(&bytes).ok().map(|r| r.id)
    }

    /// Refuses a local pool's directory that is not the pool this node opened there before: it
    /// lacks the pool's mark, or holds another pool's. Nothing is written; a directory that cannot
    /// be read is left to the pool's opening to refuse.
    pub fn check_identity(&self, pool: &PoolName, root: &Path) -> Result<(), StorageError> {
        let Some(known) = self.remembered(pool) else {
            return Ok(());
        };
        let Ok(marked) = Mark::read(&*self.files, root) else {
            return Ok(());
        };
        let remedy = format!(
            "mount the pool's disk at {} (the pool opens by itself within 10 s); if the pool was emptied or replaced on purpose, remove {}",
            root.display(),
            self.identity_path(pool).display()
        );
        match marked {
            Some(Some(m)) if m.id.as_deref() == Some(known.as_str()) => Ok(()),
            // Repaired by hand as the refusal of an unreadable mark says (its name and backend
            // only): the pool's opening checks those, and gives it an id the node remembers.
            Some(Some(m)) if m.id.is_none() && m.pool == pool.as_str() => Ok(()),
            None => Err(StorageError::PoolUnusable(format!(
                "{} lacks the mark ({MARK}) pool '{}' made there when it first opened (id {}): its disk is not mounted, and opening the empty directory below would show its volumes as deleted; {remedy}",
                root.display(),
                pool.as_str(),
                known
            ))),
            // One that does not parse: the pool's opening refuses it, saying how to repair it.
            Some(None) => Ok(()),
            Some(Some(m)) => Err(StorageError::PoolUnusable(format!(
                "{} is marked as pool '{}' (id {}), not as pool '{}' this node opened there before (id {}): another disk is mounted there; {remedy}",
                root.display(),
                m.pool,
                m.id.unwrap_or_default(),
                pool.as_str(),
                known
            ))),
        }
    }

    /// After pool `pool` opened at `root` (which marked it, if it had no mark, and gave a mark
    /// without an id one): remembers its mark's id when the node does not yet (a pool's first
    /// opening, or its first under a release with marks), or remembers another (one repaired by
    /// hand, which [`Roster::check_identity`] let through). A node that cannot remember it (its
    /// data dir's disk full) opens the pool all the same, as before marks, and logs why: the pool
    /// is checked from its next opening that remembers it.
    pub fn settle_identity(&self, pool: &PoolName, root: &Path) -> Result<(), StorageError> {
        let known = self.identity_path(pool);
        let remembered = self.remembered(pool);
        let Some(Some(Mark { id: Some(id), .. })) = Mark::read(&*self.files, root)? else {
            return Err(StorageError::PoolUnusable(format!(
                "{} has no mark ({MARK}) with an id after the pool opened",
                root.display()
            )));
        };
        if remembered.is_some_and(|r| r == id) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&Remembered { id }).unwrap_or_default();
        if let Err(e) = self.files.write_atomic(&known, &bytes, Durability::PowerLoss) {
            tracing::warn!(pool = pool.as_str(), error = %e, "the pool's mark cannot be remembered; it opens, and is checked from its next opening that remembers it");
        }
        Ok(())
    }

    /// Whether a roster misses a change (its write failed; it is written whole with the next one).
    pub fn behind(&self) -> bool {
        self.hold().written.values().any(|w| w.stale)
    }

    /// The volumes and snapshots pool `pool` held when its roster was last written, by id.
    pub fn read(&self, pool: &PoolName) -> Listed {
        let mut listed = Listed::default();
        let bytes = match self
            .files
            .read_optional_upto(&self.path(pool), crate::sys::files::ROSTER_LIMIT)
        {
            Ok(Some(b)) => b,
            Ok(None) => return listed,
            Err(e) => {
                tracing::warn!(pool = pool.as_str(), error = %e, "the pool's roster cannot be read; its volumes and snapshots are not listed while it is shut");
                return listed;
            }
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Line>(line) {
                // Only the pool's own objects: a roster copied by hand under another pool's name
                // names none of this one's.
                Ok(Line::Put(r)) if r.id.0.pool == *pool => {
                    listed.volumes.insert(r.id.to_string(), *r);
                }
                Ok(Line::Snap(r)) if r.id.0.pool == *pool => {
                    listed.snapshots.insert(r.id.to_string(), *r);
                }
                Ok(Line::Gone(id)) => {
                    listed.volumes.remove(&id);
                    listed.snapshots.remove(&id);
                }
                _ => {}
            }
        }
        listed
    }
}

/// The roster files, held for one write.
pub struct RosterGuard<'a> {
    roster: &'a Roster,
    written: MutexGuard<'a, HashMap<PoolName, Written>>,
}

impl RosterGuard<'_> {
    /// Adds a change of pool `pool` to its roster. Whether the roster is now due to be written
    /// whole ([`RosterGuard::rewrite`] with the pool's records).
    pub fn append(&mut self, pool: &PoolName, change: Change<'_>) -> bool {
        let w = self.written.entry(pool.clone()).or_default();
        if !w.stale {
            let mut bytes = Vec::new();
            line(change, &mut bytes);
            if let Err(e) = self.roster.files.append(&self.roster.path(pool), &bytes) {
                tracing::warn!(pool = pool.as_str(), error = %e, "the pool's roster cannot be written; trying again with the next change");
                w.stale = true;
            }
            w.appends += 1;
        }
        w.stale || w.appends >= w.limit
    }

    /// How many times pool `pool`'s roster was written whole (or tried) by this process.
    pub fn rewrites(&self, pool: &PoolName) -> u64 {
        self.written.get(pool).map_or(0, |w| w.rewrites)
    }

    /// Writes pool `pool`'s roster whole from its `records` (every volume and snapshot it holds),
    /// synced: the file it replaces may be lost whole to a crash of the machine (an empty file
    /// after the rename, on filesystems that do not order it), not only its last lines.
    pub fn rewrite<'r>(&mut self, pool: &PoolName, records: impl Iterator<Item = Change<'r>>) {
        let mut bytes = Vec::new();
        let mut count = 0;
        for r in records {
            line(r, &mut bytes);
            count += 1;
        }
        let w = self.written.entry(pool.clone()).or_default();
        w.rewrites += 1;
        match self
            .roster
            .files
            .write_atomic(&self.roster.path(pool), &bytes, Durability::PowerLoss)
        {
            Ok(()) => {
                *w = Written {
                    appends: 0,
                    limit: count.max(REWRITE_AFTER),
                    stale: false,
                    rewrites: w.rewrites,
                }
            }
            Err(e) => {
                tracing::warn!(pool = pool.as_str(), error = %e, "the pool's roster cannot be written; trying again with the next change");
                w.stale = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::engine::{LocalEngine, NewVolume};
    use crate::storage::id::NodeId;

    #[test]
    fn a_torn_last_line_and_another_pools_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::storage::config::Config::default_for(dir.path());
        let engine = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
        let a = engine
            .create_volume(NewVolume::plain("pvc-a", None, 1 << 20))
            .expect("create");
        let b = engine
            .create_volume(NewVolume::plain("pvc-b", None, 1 << 20))
            .expect("create");
        let roster = Roster::new(dir.path(), engine.files());
        let (default, other) = (config.pools[0].name.clone(), PoolName::parse("other").expect("pool"));
        let mut held = roster.hold();
        held.rewrite(&default, [Change::Put(&a), Change::Put(&b)].into_iter());
        assert!(
            !held.append(&default, Change::Gone(&a.id.to_string())),
            "not due after one line"
        );
        drop(held);
        let path = dir.path().join("default.volumes");
        let mut bytes = std::fs::read(&path).expect("roster");
        // A line naming another pool's volume (a file copied by hand), then a torn append.
        let mut foreign = b.clone();
        foreign.id.0.pool = other.clone();
        line(Change::Put(&foreign), &mut bytes);
        bytes.extend(b"\n{\"put\":{\"name\":\"pvc-c");
        std::fs::write(&path, bytes).expect("write");
        let read = roster.read(&default);
        assert_eq!(read.volumes.keys().collect::<Vec<_>>(), vec![&b.id.to_string()]);
        assert!(roster.read(&other).volumes.is_empty(), "no roster of its own");
    }

    #[test]
    fn a_roster_written_whole_is_synced() {
        // Unsynced, a rewrite (at every opening of the pool) lost to a crash of the machine could
        // leave an empty roster: every volume of the pool unlisted, their names free, if its disk
        // then is not mounted at the boot.
        let dir = tempfile::tempdir().expect("tempdir");
        let roster = Roster::new(dir.path(), Arc::new(crate::sys::files::LinuxFiles));
        let pool = PoolName::parse("default").expect("pool");
        crate::crash::in_thread::fail_at(Some(("file:fsync", libc::EIO)));
        roster.hold().rewrite(&pool, std::iter::empty());
        crate::crash::in_thread::fail_at(None);
        assert!(roster.behind(), "a rewrite whose fsync fails is written again");
        roster.hold().rewrite(&pool, std::iter::empty());
        assert!(!roster.behind());
    }
}
