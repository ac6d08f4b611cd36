//! DeleteVolume and what guards it: a volume staged or published anywhere is never deleted.

use super::*;

impl LocalEngine {
    pub fn delete_volume(&self, id: &VolumeId) -> Result<(), StorageError> {
        let Some(pool) = self.locate_for_call(&id.0)? else {
            return Ok(()); // not ours and not a pool here: nothing to delete
        };
        let shown = id.to_string();
        let _held = self.take(Kind::Volume, &id.0.pool, &id.0.key, &shown)?;
        let data = pool.data_path(Kind::Volume, &id.0.key);
        let _claimed = self.refuse_in_use(pool, id, &data)?;
        // Read now, not from a cache: another replica may have changed the policy.
        let rec = layout::volume_record_now(pool, &id.0.key, &shown)?;
        let policy = rec
            .as_ref()
            .and_then(|r| r.delete_policy)
            .unwrap_or(pool.config.delete_policy);
        // A node of a shared pool may stage the volume between the checks above and the data's
        // move: once moved, the marks and the lease are read again, and a stage that landed puts
        // the data back and refuses the delete (the node, which checks the data after writing its
        // mark, refuses its stage when the move was first).
        let guard = || match pool.shared() {
            true => self.refuse_shared_in_use(pool, id),
            false => Ok(()),
        };
        // A key the CSI name did not give is retired before the data goes, so that no other
        // volume takes this id while a retry of this delete may still come.
        if let Some(r) = rec
            .as_ref()
            .filter(|r| pool.shared() && Key::from_name(&r.name) != id.0.key)
        {
            let note = pool.retired_path(&id.0.key);
            pool.sys.files.ensure_dir(note.parent().unwrap_or(pool.root()), 0o700)?;
            pool.sys
                .files
                .write_atomic(&note, r.name.as_bytes(), files::Durability::PowerLoss)?;
        }
        match (policy, rec) {
            (DeletePolicy::Retain, Some(rec)) => {
                self.keep(pool, &id.0.key, &rec, &pool.retained_dir(), false, &guard)?
            }
            (DeletePolicy::Archive, Some(rec)) => {
                self.keep(pool, &id.0.key, &rec, &pool.archive_dir(), true, &guard)?
            }
            _ => self.remove_object_guarded(pool, Kind::Volume, &id.0.key, &shown, &guard)?,
        }
        // Its backups' base goes with it: nothing is compared with it any more (a failed
        // removal fails the delete, whose retry, finding no volume, removes it).
        self.drop_bases(id, None)
    }

    /// Moves the data into the trash, removes the record durably, then purges the trash. A crash
    /// before the record is gone leaves a record whose data is missing; the retried delete finishes.
    pub(super) fn remove_object(&self, pool: &Pool, kind: Kind, key: &Key, shown: &str) -> Result<(), StorageError> {
        self.remove_object_guarded(pool, kind, key, shown, &|| Ok(()))
    }

    /// As [`LocalEngine::remove_object`], asking `guard` once the data is out of place: an error
    /// puts it back and is the answer.
    fn remove_object_guarded(
        &self,
        pool: &Pool,
        kind: Kind,
        key: &Key,
        shown: &str,
        guard: &dyn Fn() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let data = pool.data_path(kind, key);
        let trashed = pool.trash_path(kind, key);
        // Should the move back fail, the data waits in the trash, which no purge empties while its
        // record exists.
        let put_back = || {
            if let Err(back) = pool.sys.files.rename(&trashed, &data) {
                tracing::error!(object = shown, error = %back, trash = %trashed.display(),
                    "a delete could not put the data back; it stays in the trash, kept while its record exists");
            }
        };
        let moved = match pool.sys.files.entry(&data)? {
            files::Entry::Missing => false,
            _ => match pool.sys.files.rename(&data, &trashed) {
                Ok(()) => {
                    if let Err(e) = guard() {
                        put_back(); // in use after all
                        return Err(e);
                    }
                    true
                }
                // A read-only subvolume (a btrfs snapshot) cannot move (EROFS): btrfs drops it
                // atomically in place instead, so its record may outlive it until the retry.
                // Writable subvolumes move into the trash like any other data.
                Err(e)
                    if e.errno() == Some(libc::EROFS) && pool.sys.subvolumes.is_subvolume(&data).unwrap_or(false) =>
                {
                    pool.sys.subvolumes.delete(&data)?;
                    false
                }
                Err(e) => return Err(e.into()),
            },
        };
        crash::point("delete:after-trash");
        let removed = self.store.remove(pool, kind, key, shown);
        // A record whose removal failed (not a crash) gets its data back, unless the record is
        // known to be gone: the volume stays whole until the retry. Nothing is purged then.
        if removed.is_err() && pool.sys.files.entry(&pool.record_path(kind, key)).ok() != Some(files::Entry::Missing) {
            if moved {
                put_back();
            }
            return removed;
        }
        if pool.shared() {
            // A shared volume may be a huge tree on a slow share: the purge runs in the background.
            if moved {
                if let Some(tx) = lock(&self.purge_wake).as_ref() {
                    let _ = tx.send(());
                }
            }
        } else {
            // This call's data, and what an earlier attempt moved there but failed to purge (the
            // retry finds nothing left to move): else it would stay until the next start.
            pool.purge_trash_of(kind, key)?;
        }
        removed
    }

    /// A shared volume staged on some node, as the share tells any replica: a stage mark of a
    /// directory volume, or a live lease of an image volume held by another node. Asked before a
    /// delete moves the data and again after.
    fn refuse_shared_in_use(&self, pool: &Pool, id: &VolumeId) -> Result<(), StorageError> {
        let nodes = staged_marks(pool, &id.0.key)?;
        if !nodes.is_empty() {
            return Err(StorageError::InUse(format!(
                "volume {id} is staged on node {}; unstage it there before deleting (a node that is gone \
                 for good leaves {} behind: remove it by hand once no pod uses the volume)",
                nodes.join(", "),
                pool.staged_dir(&id.0.key).display()
            )));
        }
        let (lease, ttl) = Self::lease_at(pool, id);
        // This node's own lease with no device or mount found above is a leftover, but only where
        // this process serves the node's mounts: a controller may bear a node's name.
        let mine_checked = self.mounted_here.get().is_some();
        if let Err(holder) = self.leases.clear_if_stale(&lease, ttl, mine_checked)? {
            return Err(StorageError::InUse(format!(
                "volume {id} is staged on node {holder}, which holds its lease; unstage it there first \
                 (a lease its node stops renewing expires after {} s)",
                ttl.as_secs()
            )));
        }
        Ok(())
    }

    /// Where the lease of a volume of a shared pool lives, and how long it lasts unrenewed.
    pub(super) fn lease_at(pool: &Pool, id: &VolumeId) -> (PathBuf, std::time::Duration) {
        (
            pool.lease_path(&id.0.key),
            std::time::Duration::from_secs(pool.config.lease_seconds),
        )
    }

    /// Where the lease of a volume of a shared pool lives (only `image` volumes take one), and how
    /// long it lasts; `None` for volumes of local pools.
    pub fn shared_lease(&self, id: &VolumeId) -> Option<(PathBuf, std::time::Duration)> {
        let pool = self.locate(&id.0)?;
        pool.shared().then(|| Self::lease_at(pool, id))
    }

    /// Invariant 1: data that is staged or published is never deleted. A loop device attached to an
    /// image; the node's mount state (its lock is held until the delete is done, so no stage races
    /// it), or where no Node service runs here, the kernel's mount table; and for shared pools the
    /// marks every node leaves on the share while it has the volume staged.
    pub(super) fn refuse_in_use(
        &self,
        pool: &Pool,
        id: &VolumeId,
        data: &std::path::Path,
    ) -> Result<Option<Held>, StorageError> {
        let node = self.node.as_str();
        if let Some(dev) = Self::attached(pool, data)?.first() {
            return Err(StorageError::InUse(format!(
                "volume {id} is still attached as {} on node {node}; unpublish and unstage it before deleting",
                dev.path.display()
            )));
        }
        // Where this process serves the Node service, its mount state answers at once; elsewhere
        // (unit tests, tools) the kernel's mount table does, at the cost of reading all of it.
        let (at, claimed) = match self.mounted_here.get().map(|m| m.claim(&id.to_string())) {
            Some(NodeUse::Free(held)) => (Vec::new(), Some(held)),
            Some(NodeUse::Busy) => return Err(StorageError::Busy(id.to_string())),
            Some(NodeUse::MountedAt(at)) => (at, None),
            Some(NodeUse::Unknown(why)) => return Err(StorageError::InUse(why)),
            None if pool.sys.files.entry(data)? == files::Entry::Dir => {
                let table = mountinfo::read(std::path::Path::new(mountinfo::SELF))?;
                (mountinfo::mounts_of(&table, data), None)
            }
            None => (Vec::new(), None),
        };
        if !at.is_empty() {
            let shown: Vec<String> = at.iter().take(3).map(|p| p.display().to_string()).collect();
            return Err(StorageError::InUse(format!(
                "volume {id} is mounted at {} on node {node}; unpublish and unstage it before deleting",
                shown.join(", ")
            )));
        }
        if pool.shared() {
            self.refuse_shared_in_use(pool, id)?;
        }
        Ok(claimed)
    }

    /// Registers this node's mount state, asked before every delete (once, at start).
    pub fn set_mounted_here(&self, m: std::sync::Arc<dyn MountedHere>) {
        let _ = self.mounted_here.set(m);
    }

    /// Marks a directory volume of a shared pool as staged on this node (before its mount), or
    /// clears the mark (after its unmount): what DeleteVolume on any controller replica consults.
    pub fn mark_staged(&self, id: &VolumeId, staged: bool) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0).filter(|p| p.shared()) else {
            return Ok(());
        };
        let dir = pool.staged_dir(&id.0.key);
        let mark = dir.join(self.node.as_str());
        if staged {
            // Another node's unstage removes the directory when it takes the last mark out of it,
            // maybe between our mkdir and our write: then the write finds no directory and is made
            // again (a few rounds at most: each is lost only to an unstage at that very moment).
            let mut tries = 0;
            loop {
                pool.sys.files.ensure_dir(&dir, 0o700)?;
                match pool.sys.files.write_atomic(&mark, b"", files::Durability::PowerLoss) {
                    Err(e) if e.is_not_found() && tries < 4 => tries += 1,
                    r => break r?,
                }
            }
        } else {
            pool.sys.files.remove_file_if_exists(&mark)?;
            // The directory goes when the last node's mark does; another node's new mark keeps it.
            pool.sys.files.remove_dir_if_empty(&dir);
        }
        Ok(())
    }

    /// Loop devices attached to an image's file (none for other layouts).
    pub(super) fn attached(pool: &Pool, data: &std::path::Path) -> Result<Vec<loopdev::LoopDevice>, StorageError> {
        if pool.sys.files.entry(data)? != files::Entry::File {
            return Ok(Vec::new());
        }
        Ok(pool.sys.devices.find_by_backing(data)?)
    }

    /// Moves a volume's data and a copy of its record out of the live namespace, for `retain` (same
    /// name, a suffix only if that name is taken) and `archive` (always a UTC time suffix).
    pub(super) fn keep(
        &self,
        pool: &Pool,
        key: &Key,
        rec: &VolumeRecord,
        dir: &std::path::Path,
        stamp: bool,
        guard: &dyn Fn() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        pool.sys.files.ensure_dir(dir, 0o700)?;
        let (secs, _) = now();
        let mut name = if stamp {
            format!("{}-{}", key.as_str(), secs)
        } else {
            key.as_str().to_string()
        };
        if pool.sys.files.entry(&dir.join(&name))? != files::Entry::Missing {
            name = format!("{}-{}-{}", key.as_str(), secs, uuid::Uuid::new_v4().simple());
        }
        let data = pool.data_path(Kind::Volume, key);
        let dest = dir.join(&name);
        self.store.keep_copy(pool, &dir.join(format!("{name}.json")), rec)?;
        if pool.sys.files.entry(&data)? != files::Entry::Missing {
            pool.sys.files.rename(&data, &dest)?;
            if let Err(e) = guard() {
                pool.sys.files.rename(&dest, &data)?;
                pool.sys
                    .files
                    .remove_file_if_exists(&dir.join(format!("{name}.json")))?;
                return Err(e);
            }
        }
        self.store.remove(pool, Kind::Volume, key, &rec.id.to_string())?;
        pool.sys.files.sync_dir(dir)?;
        tracing::info!(volume = %rec.id, kept_at = %dest.display(), "volume data kept by delete policy");
        Ok(())
    }
}

/// What this process has mounted of each volume: the node's mount state, written before every mount
/// and after every unmount, so it is never behind the kernel for cellar's own mounts.
pub trait MountedHere: Send + Sync {
    /// Claims the volume for a delete: the node's own per-volume lock (so no stage or publish can
    /// start until the delete is done), unless the volume is mounted here or a node call on it runs.
    fn claim(&self, volume_id: &str) -> NodeUse;
}

/// What the node says of a volume a delete wants.
pub enum NodeUse {
    /// Not mounted here; no node call can start on it while this is held.
    Free(Held),
    /// A node call (stage, publish ...) on it is running: retry.
    Busy,
    /// Staged or published at these paths.
    MountedAt(Vec<PathBuf>),
    /// The node's record of where it is mounted cannot be read (why, and what to do): it may be
    /// mounted anywhere, so it counts as in use.
    Unknown(String),
}

/// The nodes that hold a directory volume of a shared pool staged, from their marks on the share.
pub(super) fn staged_marks(pool: &Pool, key: &Key) -> Result<Vec<String>, StorageError> {
    let dir = pool.staged_dir(key);
    if pool.sys.files.entry(&dir)? == files::Entry::Missing {
        return Ok(Vec::new());
    }
    // The last node's unstage may remove the directory between the look and the listing.
    let listed = match pool.sys.files.list_dir(&dir) {
        Err(e) if e.is_not_found() => Vec::new(),
        r => r?,
    };
    let mut nodes: Vec<String> = listed
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    nodes.sort();
    Ok(nodes)
}
