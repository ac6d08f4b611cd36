//! Changed block tracking: which byte ranges of an image snapshot hold data (allocated), and which
//! differ between two snapshots of one volume (delta), told from the snapshots' extents alone,
//! never from their data.
//!
//! An image snapshot is a reflinked copy of its volume's file (xfs, btrfs): it shares every
//! physical block with the volume until the volume writes there, when the filesystem gives the
//! volume a new block (copy on write). So at any offset, two snapshots of one volume whose extents
//! point at the same physical byte hold the same data; where they point at different places, or
//! one has data and the other a hole, the range is reported as changed. The answer is never
//! smaller than the truth (every changed byte is inside a reported range) and, for reflinked
//! snapshots, as fine as the filesystem's block size. Where placement cannot be compared (a pool
//! without reflink holds sparse copies, a filesystem without FIEMAP, compressed extents written
//! apart), the range counts as changed: more to read for a backup, never a byte missed.
//!
//! The walk goes window by window ([`WINDOW`] bytes of the volume at a time), so memory stays
//! bounded whatever the size or fragmentation of the files, and a stream can stop at any point.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use super::id::SnapshotId;
use super::StorageError;
use crate::sys::extents::{self, Extent};
use crate::sys::SysError;

/// What can go wrong answering for snapshot metadata, on top of the storage errors.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The snapshots cannot be tracked (their layout, or where they live): the caller backs up in full.
    #[error("{0}")]
    NotTracked(String),
    /// A delta between snapshots of two different volumes.
    #[error("{0}")]
    DifferentVolumes(String),
    /// A starting offset at or past the end of the volume.
    #[error("{0}")]
    PastEnd(String),
}

impl From<SysError> for MetadataError {
    fn from(e: SysError) -> Self {
        MetadataError::Storage(StorageError::Sys(e))
    }
}

/// A request for allocated ranges (no base) or changed ranges (base → target), parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub base: Option<SnapshotId>,
    pub target: SnapshotId,
    /// The first byte of the volume to report from; ranges that begin before it are cut there.
    pub starting_offset: u64,
}

/// One range of bytes: `(offset, length)`.
pub type Range = (u64, u64);

/// The most ranges one batch (one message of an answer) carries, whatever is asked.
pub const MAX_BATCH: usize = 4096;

/// How much of the volume is compared at once.
pub const WINDOW: u64 = 64 << 20;

/// The most windows one batch compares (16 GiB). A long stretch without a difference (two nearly
/// identical snapshots of a large volume) then yields empty batches on the way: each is a message
/// that keeps the answer alive (the controller waits 120 s at most between a node's
/// messages), and each lets a client that went away end the walk. Empty batches after the first
/// reach no client.
pub const WINDOWS_PER_BATCH: u32 = 256;

/// A snapshot's file, open for its extents.
pub struct Mapped {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

impl Mapped {
    fn extents(&self, from: u64, to: u64) -> Result<Vec<Extent>, MetadataError> {
        extents::extents_in(&self.fd, from, to).map_err(|e| SysError::io("read extents of", &self.path, e).into())
    }
}

/// The walk over one answer: ranges come out in order, merged where they touch.
pub struct RangeWalk {
    capacity: u64,
    base: Option<Mapped>,
    target: Mapped,
    /// The next byte not yet compared.
    pos: u64,
    /// The last range found, still growing while the next one touches it.
    pending: Option<Range>,
    ready: VecDeque<Range>,
}

impl RangeWalk {
    pub fn new(capacity: u64, base: Option<Mapped>, target: Mapped, starting_offset: u64) -> RangeWalk {
        RangeWalk {
            capacity,
            base,
            target,
            pos: starting_offset.min(capacity),
            pending: None,
            ready: VecDeque::new(),
        }
    }

    /// The size of the volume the ranges are in (the target snapshot's).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The next ranges, at most `max` (at least 1), from at most [`WINDOWS_PER_BATCH`] windows
    /// (so possibly none); `None` once every range has been given.
    pub fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Range>>, MetadataError> {
        let max = max.max(1);
        let mut windows = 0;
        while self.ready.len() < max && self.pos < self.capacity {
            if windows == WINDOWS_PER_BATCH {
                return Ok(Some(Vec::new()));
            }
            windows += 1;
            let to = self.pos.saturating_add(WINDOW).min(self.capacity);
            let target = self.target.extents(self.pos, to)?;
            let base = match &self.base {
                Some(b) => b.extents(self.pos, to)?,
                None => Vec::new(),
            };
            let mut found = Vec::new();
            differing(&base, &target, self.pos, to, |r| found.push(r));
            for r in found {
                self.push(r);
            }
            self.pos = to;
        }
        if self.pos >= self.capacity {
            self.ready.extend(self.pending.take());
        }
        if self.ready.is_empty() {
            return Ok(None);
        }
        let n = self.ready.len().min(max);
        Ok(Some(self.ready.drain(..n).collect()))
    }

    fn push(&mut self, (start, len): Range) {
        match self.pending {
            Some((s, l)) if s + l == start => self.pending = Some((s, l + len)),
            _ => {
                self.ready.extend(self.pending.take());
                self.pending = Some((start, len));
            }
        }
    }
}

/// What a byte of a file reads as, from its extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A hole or an unwritten extent: zeros.
    Zero,
    /// Data at `physical − logical` from its offset: equal in two files means the same block.
    Shifted(i128),
    /// Data in an encoded (compressed) extent, comparable only as that whole extent.
    Encoded { logical: u64, physical: u64, length: u64 },
    /// Data whose place is not known: never the same as anything.
    Unknown,
}

/// The most data one compressed (encoded) extent holds: btrfs compresses in pieces of at most
/// 128 KiB (`BTRFS_MAX_UNCOMPRESSED`).
const MAX_ENCODED_EXTENT: u64 = 128 << 10;

fn place(e: &Extent) -> Place {
    use extents::*;
    if e.flags & FLAG_UNWRITTEN != 0 {
        Place::Zero
    } else if e.flags & (FLAG_UNKNOWN | FLAG_DELALLOC | FLAG_INLINE | FLAG_TAIL | FLAG_NOT_ALIGNED) != 0
        || e.physical == 0
    {
        Place::Unknown
    } else if e.flags & FLAG_ENCODED != 0 && e.length > MAX_ENCODED_EXTENT {
        // Longer than one compressed extent can be: FIEMAP merged several that looked
        // contiguous, and two different sets could look alike merged (review). Never the same.
        Place::Unknown
    } else if e.flags & FLAG_ENCODED != 0 {
        Place::Encoded {
            logical: e.logical,
            physical: e.physical,
            length: e.length,
        }
    } else {
        Place::Shifted(e.physical as i128 - e.logical as i128)
    }
}

fn same(a: Place, b: Place) -> bool {
    a != Place::Unknown && a == b
}

/// Walks one file's extents (sorted by offset) from low offsets to high.
struct Cursor<'a> {
    extents: &'a [Extent],
    i: usize,
}

impl Cursor<'_> {
    /// What the byte at `p` reads as, and where that stops (at most `to`).
    fn at(&mut self, p: u64, to: u64) -> (Place, u64) {
        while self.i < self.extents.len() && self.extents[self.i].end() <= p {
            self.i += 1;
        }
        match self.extents.get(self.i) {
            Some(e) if e.logical <= p => (place(e), e.end().min(to)),
            Some(e) => (Place::Zero, e.logical.min(to)),
            None => (Place::Zero, to),
        }
    }
}

/// Calls `each` with every range of `[from, to)` where `target` may read differently from `base`
/// (an empty `base`: every range where `target` holds data). Extents must be sorted by offset.
fn differing(base: &[Extent], target: &[Extent], from: u64, to: u64, mut each: impl FnMut(Range)) {
    let (mut a, mut b) = (Cursor { extents: base, i: 0 }, Cursor { extents: target, i: 0 });
    let mut p = from;
    while p < to {
        let (pa, ea) = a.at(p, to);
        let (pb, eb) = b.at(p, to);
        let q = ea.min(eb);
        if !same(pa, pb) {
            each((p, q - p));
        }
        p = q;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::extents::{FLAG_ENCODED, FLAG_SHARED, FLAG_UNKNOWN, FLAG_UNWRITTEN};

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    fn all(base: &[Extent], target: &[Extent], from: u64, to: u64) -> Vec<Range> {
        let mut out = Vec::new();
        differing(base, target, from, to, |r| out.push(r));
        out
    }

    const K: u64 = 4096;

    #[test]
    fn shared_blocks_are_unchanged_and_rewritten_blocks_changed() {
        // The base: one extent. The target: the same blocks, but block 3 written anew elsewhere.
        let base = [ext(0, 1000 * K, 8 * K, FLAG_SHARED)];
        let target = [
            ext(0, 1000 * K, 3 * K, FLAG_SHARED),
            ext(3 * K, 5000 * K, K, 0),
            ext(4 * K, 1004 * K, 4 * K, FLAG_SHARED),
        ];
        assert_eq!(all(&base, &target, 0, 8 * K), [(3 * K, K)]);
    }

    #[test]
    fn extents_split_or_merged_differently_compare_by_their_blocks() {
        let base = [ext(0, 1000 * K, 2 * K, 0), ext(2 * K, 1002 * K, 6 * K, 0)];
        let target = [ext(0, 1000 * K, 8 * K, 0)];
        assert!(all(&base, &target, 0, 8 * K).is_empty());
    }

    #[test]
    fn data_against_a_hole_is_changed_and_zeros_against_a_hole_are_not() {
        let base = [ext(0, 1000 * K, K, 0)];
        let target = [
            ext(0, 1000 * K, K, 0),
            ext(2 * K, 7000 * K, K, 0),
            ext(4 * K, 9000 * K, K, FLAG_UNWRITTEN),
        ];
        assert_eq!(all(&base, &target, 0, 8 * K), [(2 * K, K)]);
        // Data removed (a hole punched by a discard) is a change too.
        assert_eq!(all(&target, &base, 0, 8 * K), [(2 * K, K)]);
    }

    #[test]
    fn without_a_base_every_data_range_is_reported_from_the_start_offset() {
        let target = [ext(0, 1000 * K, 4 * K, 0), ext(8 * K, 3000 * K, 2 * K, 0)];
        assert_eq!(all(&[], &target, 2 * K, 16 * K), [(2 * K, 2 * K), (8 * K, 2 * K)]);
    }

    #[test]
    fn unknown_places_and_encoded_extents_apart_are_changed() {
        let unknown = [ext(0, 0, 4 * K, FLAG_UNKNOWN)];
        assert_eq!(all(&unknown, &unknown, 0, 4 * K), [(0, 4 * K)]);
        let a = [ext(0, 1000 * K, 4 * K, FLAG_ENCODED)];
        let b = [ext(0, 1000 * K, 4 * K, FLAG_ENCODED)];
        assert!(all(&a, &b, 0, 4 * K).is_empty(), "one compressed extent shared by both");
        // Longer than one compressed extent can be: several merged by FIEMAP, never the same.
        let merged = [ext(0, 1000 * K, 64 * K, FLAG_ENCODED)];
        assert_eq!(all(&merged, &merged, 0, 64 * K), [(0, 64 * K)]);
        let whole = [ext(0, 1000 * K, 32 * K, FLAG_ENCODED)];
        assert!(
            all(&whole, &whole, 0, 32 * K).is_empty(),
            "128 KiB is one extent's most"
        );
        let c = [
            ext(0, 1000 * K, 2 * K, FLAG_ENCODED),
            ext(2 * K, 1000 * K, 2 * K, FLAG_ENCODED),
        ];
        assert_eq!(all(&a, &c, 0, 4 * K), [(0, 2 * K), (2 * K, 2 * K)]);
    }

    #[test]
    fn extents_reaching_outside_the_window_are_cut_to_it() {
        let base = [ext(0, 1000 * K, 64 * K, 0)];
        let target = [ext(0, 5000 * K, 64 * K, 0)];
        assert_eq!(all(&base, &target, 16 * K, 32 * K), [(16 * K, 16 * K)]);
    }

    fn walk_of(len: u64, write: &[(u64, u64)]) -> (tempfile::TempDir, RangeWalk) {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(len).expect("size");
        for &(at, n) in write {
            f.write_all_at(&vec![0xa5; n as usize], at).expect("write");
        }
        f.sync_all().expect("fsync");
        let target = Mapped {
            fd: OwnedFd::from(f),
            path: p,
        };
        (dir, RangeWalk::new(len, None, target, 0))
    }

    #[test]
    fn a_long_stretch_without_data_yields_empty_batches_on_the_way() {
        // One block at the very end of a sparse volume of 2.5 batches' worth of windows: the
        // walk answers in bounded steps, not one scan of the whole volume.
        let len = (5 * WINDOWS_PER_BATCH as u64 / 2) * WINDOW;
        let (_d, mut walk) = walk_of(len, &[(len - 8 * K, 8 * K)]);
        assert_eq!(walk.next_batch(10).expect("walk"), Some(Vec::new()));
        assert_eq!(walk.next_batch(10).expect("walk"), Some(Vec::new()));
        let last = walk.next_batch(10).expect("walk").expect("the range");
        assert_eq!(last.len(), 1);
        assert!(last[0].0 <= len - 8 * K && last[0].0 + last[0].1 == len, "{last:?}");
        assert!(walk.next_batch(10).expect("walk").is_none());
    }

    #[test]
    fn a_walk_merges_across_windows_and_pages_by_max() {
        // Data straddling the first window's end comes out as one range; three ranges, two a page.
        let w = WINDOW;
        let (_d, mut walk) = walk_of(3 * w, &[(w - 8 * K, 16 * K), (2 * w, 8 * K), (2 * w + w / 2, 8 * K)]);
        let first = walk.next_batch(2).expect("walk").expect("ranges");
        let second = walk.next_batch(2).expect("walk").expect("ranges");
        assert!(walk.next_batch(2).expect("walk").is_none());
        let ranges: Vec<Range> = first.iter().chain(&second).copied().collect();
        assert_eq!(first.len(), 2);
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        // Whatever the host filesystem's block size, each range covers what was written.
        assert!(
            ranges[0].0 <= w - 8 * K && ranges[0].0 + ranges[0].1 >= w + 8 * K,
            "{ranges:?}"
        );
        assert!(ranges[1].0 <= 2 * w && ranges[1].0 + ranges[1].1 >= 2 * w + 8 * K);
    }
}
