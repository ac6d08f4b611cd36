//! Snapshot metadata (changed block tracking) of this node's snapshots: checks a query and opens
//! the snapshots' files for a [`RangeWalk`]. No lock is held while the answer streams: the open
//! files keep their extents even if a snapshot is deleted meanwhile.

use super::LocalEngine;
use crate::storage::cbt::{Mapped, MetadataError, Query, RangeWalk};
use crate::storage::id::SnapshotId;
use crate::storage::layout;
use crate::storage::pool::Kind;
use crate::storage::record::SnapshotRecord;
use crate::storage::StorageError;
use crate::sys::copy;

impl LocalEngine {
    /// The walk answering `q`: NOT_FOUND for an unknown snapshot, then a base of another volume,
    /// a layout without block tracking, and a starting offset past the end, in that order.
    pub fn block_ranges(&self, q: &Query) -> Result<RangeWalk, MetadataError> {
        let target = self.snapshot_record(&q.target)?;
        let base = q.base.as_ref().map(|b| self.snapshot_record(b)).transpose()?;
        if let Some(base) = &base {
            if base.source_volume_id != target.source_volume_id {
                return Err(MetadataError::DifferentVolumes(format!(
                    "snapshot {} is of volume {} and snapshot {} of volume {}: a delta is between two snapshots of one volume",
                    base.id, base.source_volume_id, target.id, target.source_volume_id
                )));
            }
        }
        for rec in base.iter().chain([&target]) {
            if !layout::of(rec.layout).tracks_blocks() {
                return Err(MetadataError::NotTracked(format!(
                    "snapshot {} is of a '{}' volume: changed block tracking serves image volumes only (raw block, or a filesystem in an image); back this one up in full",
                    rec.id,
                    rec.layout.as_str()
                )));
            }
        }
        let capacity = target.size_bytes;
        if q.starting_offset >= capacity {
            return Err(MetadataError::PastEnd(format!(
                "starting_offset {} is past the end of snapshot {} ({capacity} bytes)",
                q.starting_offset, target.id
            )));
        }
        let base_file = q.base.as_ref().map(|b| self.open_snapshot(b)).transpose()?;
        let target_file = self.open_snapshot(&q.target)?;
        crate::crash::point("metadata:opened");
        // The files opened are those of the records checked: a snapshot deleted meanwhile and
        // its name cut again (of another volume) has a record of its own, told apart here by its
        // source and the time it was cut (a record rewritten in place, as a backup's upload
        // marks it, is the same snapshot).
        let same = |a: &SnapshotRecord, b: &SnapshotRecord| {
            (&a.source_volume_id, a.created_unix_secs, a.created_nanos)
                == (&b.source_volume_id, b.created_unix_secs, b.created_nanos)
        };
        let unchanged = |id: &SnapshotId, was: &SnapshotRecord| match self.snapshot_record(id) {
            Ok(now) if same(&now, was) => Ok(()),
            _ => Err(StorageError::SnapshotNotFound(id.to_string())),
        };
        unchanged(&q.target, &target)?;
        if let (Some(id), Some(was)) = (&q.base, &base) {
            unchanged(id, was)?;
        }
        Ok(RangeWalk::new(capacity, base_file, target_file, q.starting_offset))
    }

    fn snapshot_record(&self, id: &SnapshotId) -> Result<SnapshotRecord, StorageError> {
        self.locate_for_call(&id.0)?;
        self.snapshot(id)
            .ok_or_else(|| StorageError::SnapshotNotFound(id.to_string()))
    }

    /// A snapshot's file, open for its extents (never through a symlink).
    fn open_snapshot(&self, id: &SnapshotId) -> Result<Mapped, StorageError> {
        let not_found = || StorageError::SnapshotNotFound(id.to_string());
        let pool = self.locate_for_call(&id.0)?.ok_or_else(not_found)?;
        let path = pool.data_path(Kind::Snapshot, &id.0.key);
        match copy::open_image(&path) {
            Ok((fd, _)) => Ok(Mapped { fd, path }),
            // Deleted between the record's look-up and the open.
            Err(e) if e.is_not_found() => Err(not_found()),
            Err(e) => Err(e.into()),
        }
    }
}
