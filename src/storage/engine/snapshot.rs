//! CreateSnapshot, DeleteSnapshot and the lookup of a snapshot by its CSI name.

use super::*;

impl LocalEngine {
    /// Snapshots a volume; `freeze` makes the snapshot of a mounted image filesystem-consistent.
    pub fn create_snapshot(&self, name: &str, source: &VolumeId, freeze: bool) -> Result<SnapshotRecord, StorageError> {
        // A backup's snapshot under the name (uploading, or kept locally) is another snapshot
        // than the one asked for: its parameters differ. Looked at before the name's lock, which
        // an upload holds.
        let backup_of = |rec: &SnapshotRecord| {
            rec.backup.as_ref().map(|m| {
                StorageError::Conflict(format!(
                    "snapshot '{name}' already exists as a backup into '{}'; a snapshot without backupRepository needs another name",
                    m.id.repository().as_str()
                ))
            })
        };
        if let Some(e) = self.snapshot_named(name).as_ref().and_then(backup_of) {
            return Err(e);
        }
        let rec = self.cut_snapshot(name, source, freeze, None)?;
        match backup_of(&rec) {
            Some(e) => Err(e),
            None => Ok(rec),
        }
    }

    /// Invariant 3 for a snapshot's copy of volume `source` (alone, or a group's member): a copy of
    /// an image takes as much room as the image holds, which must not come out of the room
    /// existing images hold back to grow into (their writes inside their capacity would then fail
    /// with ENOSPC on the pool). Promised until the copy is recorded, as a create's room.
    pub(super) fn promise_copy(
        &self,
        pool: &Pool,
        from: &SourceData,
        source: &VolumeId,
    ) -> Result<Option<super::capacity::Promise<'_>>, StorageError> {
        if !layout::of(from.layout).reserves_capacity() {
            return Ok(None);
        }
        let bytes = pool.sys.files.allocated_upto(&from.path, u64::MAX).bytes;
        self.promise(pool, from.layout, bytes, 0, |room| {
            StorageError::Exhausted(format!(
                "pool '{}' can give {room} more bytes to {} data; a snapshot of {source} copies {bytes}{}",
                source.0.pool.as_str(),
                from.layout.as_str(),
                super::capacity::room_hint(from.layout)
            ))
        })
        .map(Some)
    }

    /// Cuts a snapshot, with `backup` in its record when it is also a backup (backup.rs). A
    /// retry answers the snapshot already cut under the name, whatever its mark (the caller
    /// checks it).
    pub(super) fn cut_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        freeze: bool,
        backup: Option<crate::storage::record::BackupMark>,
    ) -> Result<SnapshotRecord, StorageError> {
        let shown_src = source.to_string();
        // A retry of a snapshot that a shut pool's roster lists (as a create's, create.rs): it
        // answers once the pool opens; until then UNAVAILABLE, which the snapshotter retries.
        if let Some(r) = self
            .store
            .shut_snapshot_named(name)
            .filter(|r| r.source_volume_id == *source)
        {
            let why = self.shut_why(&r.id.0.pool).unwrap_or_default();
            return Err(StorageError::Unavailable(format!(
                "snapshot '{}' ({}) is in pool '{}' of node {}, which is not open ({why}): its create answers once the pool opens",
                crate::csi::status::bounded(name),
                r.id,
                r.id.0.pool.as_str(),
                self.node.as_str()
            )));
        }
        let pool = self
            .locate_for_call(&source.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(shown_src.clone()))?;
        let key = Key::from_name(name);
        let id = SnapshotId(ObjectId {
            location: self.location_of(&source.0.pool),
            pool: source.0.pool.clone(),
            key: key.clone(),
        });
        let _held = self.take(Kind::Snapshot, &source.0.pool, &key, &id.to_string())?;
        if let Some(existing) = self.snapshot(&id) {
            if let Some(group) = &existing.group {
                // A member of a group snapshot lives and dies with its group: answered as a
                // snapshot of its own, its DeleteSnapshot would fail, and the group's delete
                // would take its data from under the VolumeSnapshot.
                return Err(StorageError::Conflict(format!(
                    "snapshot '{name}' is a member of group snapshot {group}; choose another name"
                )));
            }
            if existing.source_volume_id == *source {
                return Ok(existing);
            }
            return Err(StorageError::Conflict(format!(
                "snapshot '{name}' already exists for volume {}, not {shown_src}",
                existing.source_volume_id
            )));
        }
        let from = self.source_data(&Source::Volume(source.clone()))?;
        let _promised = self.promise_copy(pool, &from, source)?;
        if freeze && layout::of(from.layout).has_filesystem() {
            // Frozen only where it is mounted: from here a shared image staged on a node would be
            // cut unfrozen while the request asked for a consistent snapshot.
            self.refuse_held_elsewhere(
                pool,
                source,
                "a consistent snapshot (freeze)",
                "be consistent; without freeze it is crash-consistent",
            )?;
        }
        // What a consistent snapshot freezes is marked first, as a group's cut is: a process
        // killed mid-copy leaves the mark, and its next start thaws what it names. A copy that
        // failed keeps its mark too, since its thaw may be what failed (thawing a filesystem that
        // is not frozen is harmless).
        let points = match freeze {
            true => layout::of(from.layout).freeze_points(&pool.sys, &from.path)?,
            false => Vec::new(),
        };
        let (mark, _live) = self.mark_frozen(pool, &points)?;
        let copied = layout::create_copy(pool, Kind::Snapshot, &key, from.layout, &from.path, false, freeze);
        if let (Ok(()), Some(m)) = (&copied, &mark) {
            if let Err(e) = pool.sys.files.remove_file_if_exists(m) {
                tracing::warn!(error = %e, "could not remove a freeze mark; the next start removes it");
            }
        }
        // The data (a copy of the source), then its record: a backup's mark is in the record
        // from its first write, so a crash never leaves a backup as a plain snapshot.
        let made = copied.and_then(|()| {
            // A tree a backup cannot hold whole (holes it would read for ever, paths it cannot
            // open) is refused here, where it can be said to the caller and nothing is kept,
            // rather than by its upload (which checks too: the snapshot's data cannot change in
            // between).
            if backup.is_some() && layout::of(from.layout).is_tree() {
                let data = pool.data_path(Kind::Snapshot, &key);
                let count = crate::sys::tree::count_tree(&data)?;
                crate::backup::upload::refuse_unbackupable(&count, &data, from.size, &format!("volume {shown_src}"))?;
            }
            crash::point("create-snapshot:before-record");
            let rec = SnapshotRecord {
                backup,
                ..from.snapshot_record(name, &id, source, now(), None)
            };
            self.store.put_snapshot(pool, &key, &rec)?;
            Ok(rec)
        });
        self.undo_unrecorded(pool, Kind::Snapshot, &key, made)
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(pool) = self.locate_for_call(&id.0)? else {
            return Ok(());
        };
        let _held = self.take(Kind::Snapshot, &id.0.pool, &id.0.key, &id.to_string())?;
        if let Some(rec) = self.snapshot(id) {
            self.refuse_group_member(&rec)?;
        }
        layout::refuse_unread_record(pool, Kind::Snapshot, &id.0.key, Some(&id.to_string()))?;
        self.remove_object(pool, Kind::Snapshot, &id.0.key, &id.to_string())?;
        Ok(())
    }

    /// The snapshot of this node under CSI name `name`: one of a local pool that is not open as
    /// its roster last recorded it (its name stays taken while the pool is shut).
    pub fn snapshot_named(&self, name: &str) -> Option<SnapshotRecord> {
        let key = Key::from_name(name);
        self.pools
            .keys()
            .find_map(|p| {
                let id = SnapshotId(ObjectId {
                    location: self.location_of(p),
                    pool: p.clone(),
                    key: key.clone(),
                });
                self.snapshot(&id).filter(|r| r.name == name)
            })
            .or_else(|| self.store.shut_snapshot_named(name))
    }
}
