//! Snapshots that are also backups, and volumes restored from backups (docs/backups.md).
//!
//! CreateSnapshot with a repository cuts the local snapshot as any other (CoW, `freeze`
//! honoured) and writes its record with a [`BackupMark`]; then a background thread uploads it,
//! marks the record uploaded and, unless the class keeps it, removes the local snapshot: from then
//! on the repository is the truth. One local copy stays without `keepLocal`: an image volume's
//! newest uploaded backup, the *base* its next backup is compared with (changed block tracking
//! from the two snapshots' extents), so that only the chunks that changed are read again. It goes
//! when a newer backup of the volume has uploaded, when its backup is deleted, or when the volume
//! is. A restart resumes what a crash cut short (an upload starts over; a local copy whose backup
//! is uploaded goes, unless it is a base). A restore is an import of the backup's stream
//! (`backup::restore`), or a local copy when this node kept the snapshot.

use std::sync::Arc;
use std::time::Duration;

use super::create::Planned;
use super::*;
use crate::backup::{self, BackupMeta, Backups};
use crate::storage::record::BackupMark;

/// What CreateSnapshot asks of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRequest {
    pub repository: PoolName,
    pub keep_local: bool,
}

/// How many backups a node remembers having dropped for their deletes (ids of ~100 bytes).
const FORGOTTEN_KEPT: usize = 1024;

/// Notes durably in `pool` that its copy of backup `id` is being dropped for the backup's
/// delete: a note in [`Pool::forgotten_dir`] ([`write_note`]). A note that cannot be written
/// fails the forget before anything is removed (the pool's next write, the record's removal,
/// would most likely fail the same way, after the record went), except on a full pool: the note
/// only spares a deletion mark nobody would clear, and a full pool must still free the room its
/// copy takes.
fn note_forgotten(pool: &Pool, id: &BackupId) -> Result<(), StorageError> {
    match write_note(pool, &pool.forgotten_dir(), id, "") {
        Err(e) if matches!(e.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
            tracing::warn!(pool = pool.config.name.as_str(), backup = %id, error = %e, "no room to note the backup whose copy is dropped; a retry of its delete after a restart may have the controller write a deletion mark that expires");
            Ok(())
        }
        done => Ok(done?),
    }
}

/// Writes durably in `dir` (made at the first) a note of backup `id`: a file named by the time
/// and the backup's key, holding the id on its first line and `more` on the next; once per
/// backup and `more`, and only the newest [`FORGOTTEN_KEPT`] stay.
fn write_note(pool: &Pool, dir: &std::path::Path, id: &BackupId, more: &str) -> Result<(), crate::sys::SysError> {
    pool.sys.files.ensure_dir(dir, 0o700)?;
    if notes_of(&*pool.sys.files, dir, id)?.iter().any(|(_, m)| m == more) {
        return Ok(());
    }
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let note = dir.join(format!("{since:020}-{}", id.key()));
    let body = if more.is_empty() {
        id.to_string()
    } else {
        format!("{id}\n{more}")
    };
    pool.sys
        .files
        .write_atomic(&note, body.as_bytes(), files::Durability::PowerLoss)?;
    let mut notes = note_names(&*pool.sys.files, dir)?;
    notes.sort();
    let extra = notes.len().saturating_sub(FORGOTTEN_KEPT);
    for old in &notes[..extra] {
        pool.sys.files.remove_file_if_exists(&dir.join(old))?;
    }
    Ok(())
}

/// Whether `pool` noted backup `id` as dropped ([`note_forgotten`]); on a share, bounded in time.
fn noted_in(pool: &Pool, id: &BackupId) -> Result<bool, crate::sys::SysError> {
    Ok(!read_notes(pool, &pool.forgotten_dir(), id)?.is_empty())
}

/// The notes of backup `id` in `dir` of `pool`, each with what it holds after the id
/// ([`write_note`]); on a share, bounded in time.
fn read_notes(
    pool: &Pool,
    dir: &std::path::Path,
    id: &BackupId,
) -> Result<Vec<(std::path::PathBuf, String)>, crate::sys::SysError> {
    let (files, dir, id) = (pool.sys.files.clone(), dir.to_path_buf(), id.clone());
    let find = move || notes_of(&*files, &dir, &id);
    if pool.shared() {
        crate::sys::share::within(
            crate::sys::share::SHARE_TIMEOUT,
            "read notes of backups",
            pool.root(),
            find,
        )
    } else {
        find()
    }
}

/// The notes in `dir` of backup `id` (a name ending in its key, its id on the first line), each
/// with what follows that line.
fn notes_of(
    files: &dyn crate::sys::files::Files,
    dir: &std::path::Path,
    id: &BackupId,
) -> Result<Vec<(std::path::PathBuf, String)>, crate::sys::SysError> {
    let (tail, whole) = (format!("-{}", id.key()), id.to_string());
    let mut found = Vec::new();
    for name in note_names(files, dir)?.into_iter().filter(|n| n.ends_with(&tail)) {
        let note = dir.join(name);
        // A note is a hint: one cellar did not write (put on the share by a node) is passed over.
        let body = match files.read_optional(&note) {
            Ok(Some(body)) => body,
            Ok(None) => continue,
            Err(e) if e.is_not_ours() => {
                tracing::warn!(note = %note.display(), error = %e, "a note that is not cellar's is passed over");
                continue;
            }
            Err(e) => return Err(e),
        };
        let body = String::from_utf8_lossy(&body);
        let (first, more) = body.split_once('\n').unwrap_or((&body, ""));
        if first == whole {
            found.push((note, more.to_string()));
        }
    }
    Ok(found)
}

/// The names of the notes in `dir` (none before the first; temporary files left out).
fn note_names(
    files: &dyn crate::sys::files::Files,
    dir: &std::path::Path,
) -> Result<Vec<String>, crate::sys::SysError> {
    if files.entry(dir)? == files::Entry::Missing {
        return Ok(Vec::new());
    }
    Ok(files
        .list_dir(dir)?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect())
}

/// How long a backup's delete waits for the upload it called off to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How long a forget waits for the holder of a snapshot that has no off switch (yet) before it
/// answers that the snapshot is busy ([`LocalEngine::forget_local_backup`]).
const SWITCH_GRACE: Duration = Duration::from_millis(500);

/// An upload's off switch registered under its snapshot's id, unregistered when dropped.
struct StopRegistered<'a> {
    stops: &'a Mutex<std::collections::HashMap<String, backup::upload::Stop>>,
    key: String,
    stop: backup::upload::Stop,
}

impl Drop for StopRegistered<'_> {
    fn drop(&mut self) {
        let mut stops = lock(self.stops);
        if stops.get(&self.key).is_some_and(|s| s.same(&self.stop)) {
            stops.remove(&self.key);
        }
    }
}

/// When a snapshot was cut, for ordering.
fn created(r: &SnapshotRecord) -> (i64, i32) {
    (r.created_unix_secs, r.created_nanos)
}

/// Adds the range `off`+`len` to `ranges` (ascending, as a walk gives them), widened to whole
/// image chunks and merged with the last range when they touch.
fn add_chunked(ranges: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    let chunk = backup::image::CHUNK;
    let start = off / chunk * chunk;
    let end = off.saturating_add(len).div_ceil(chunk).saturating_mul(chunk);
    match ranges.last_mut() {
        Some((s, l)) if start <= *s + *l => *l = end.max(*s + *l) - *s,
        _ => ranges.push((start, end - start)),
    }
}

/// The longest wait between two tries of a failing upload.
const RETRY_CAP: Duration = Duration::from_secs(300);

/// Remembers `item` among the last [`FORGOTTEN_KEPT`] of `list` (once), newest last.
fn keep_last<T: PartialEq>(list: &mut std::collections::VecDeque<T>, item: T) {
    if list.contains(&item) {
        return;
    }
    if list.len() >= FORGOTTEN_KEPT {
        list.pop_front();
    }
    list.push_back(item);
}

/// How often a running upload looks whether its backup was marked deleted (by a controller
/// that could not tell this node), to call itself off.
const MARK_LOOK: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(30)
};

/// How often a node looks again whether the backups of its uploaded local copies (kept, or its
/// volumes' bases) were deleted.
const COPIES_RECHECK: Duration = Duration::from_secs(3600);

impl LocalEngine {
    pub fn backups(&self) -> &Arc<Backups> {
        &self.backups
    }

    /// Snapshots a volume and uploads the snapshot into `req.repository` in the background. The
    /// repository is opened first, so a wrong key is FAILED_PRECONDITION and an unreachable one
    /// UNAVAILABLE before anything is cut. A retry with the same name answers the same snapshot,
    /// with `uploaded` once it is.
    pub fn create_backup(
        &self,
        name: &str,
        source: &VolumeId,
        freeze: bool,
        req: &BackupRequest,
    ) -> Result<SnapshotRecord, StorageError> {
        let want = |rec: &SnapshotRecord| -> Result<(), StorageError> {
            match &rec.backup {
                Some(m) if *m.id.repository() == req.repository && m.keep_local == req.keep_local => Ok(()),
                _ => Err(StorageError::Conflict(format!(
                    "snapshot '{name}' already exists, not as a backup into '{}'{}",
                    req.repository.as_str(),
                    if req.keep_local { " kept locally" } else { "" }
                ))),
            }
        };
        // A retry while the upload runs must not wait for the upload's lock. One a shut pool's
        // roster lists is answered when it is uploaded (the repository holds it; the controller
        // checks that), and waits for the pool otherwise (`cut_snapshot` says so).
        if let Some(existing) = self.snapshot_named(name).filter(|r| r.source_volume_id == *source) {
            let open = self.locate(&existing.id.0).is_some();
            if open || existing.backup.as_ref().is_some_and(|m| m.uploaded) {
                want(&existing)?;
                if open {
                    self.spawn_upload(&existing);
                }
                return Ok(existing);
            }
        }
        drop(self.backups.open(&req.repository)?);
        // No record here, but the backup may have finished uploading since the controller saw
        // it running (the local copy goes only once the repository holds it): never a second
        // backup under its name.
        if let Some(done) = self.backups.find_named(&req.repository, name)? {
            return Err(StorageError::Aborted(format!(
                "snapshot '{name}' finished uploading as backup {} meanwhile; retry to get it",
                done.id
            )));
        }
        let rec = self.cut_snapshot(
            name,
            source,
            freeze,
            Some(BackupMark {
                id: BackupId::fresh(req.repository.clone()),
                keep_local: req.keep_local,
                uploaded: false,
            }),
        )?;
        want(&rec)?;
        self.spawn_upload(&rec);
        Ok(rec)
    }

    /// Makes the background uploads possible, resumes every upload (and every removal of an
    /// uploaded local copy) that a restart cut short, and drops the kept copies of backups deleted
    /// while this node was away.
    pub fn start_uploads(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
        self.resume_uploads();
        self.watch_uploaded_copies();
    }

    /// Starts the uploads left to do of the snapshots in the pools this process owns (those
    /// running already go on).
    pub(super) fn resume_uploads(&self) {
        for rec in self.owned_snapshots() {
            if let Some(m) = &rec.backup {
                if !m.uploaded || !m.keep_local {
                    self.spawn_upload(&rec);
                }
            }
        }
    }

    /// The snapshots of the pools this process owns: a node also opens the shared pools, whose
    /// snapshots the controller cut and uploads.
    fn owned_snapshots(&self) -> Vec<SnapshotRecord> {
        self.snapshots()
            .into_iter()
            .filter(|r| self.locate(&r.id.0).is_some_and(|p| p.owner))
            .collect()
    }

    /// Starts the upload of a snapshot's backup in the background, unless it runs already or
    /// there is nothing left to do.
    fn spawn_upload(&self, rec: &SnapshotRecord) {
        let Some(m) = &rec.backup else { return };
        if m.uploaded && m.keep_local {
            return;
        }
        let Some(me) = self.me.get().and_then(|w| w.upgrade()) else {
            tracing::warn!(snapshot = %rec.id, "backups are not started in this process; the upload waits for a restart");
            return;
        };
        let id = rec.id.clone();
        if !lock(&self.uploading).insert(id.to_string()) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("cellar-upload".into())
            .spawn(move || {
                let mut wait = Duration::from_secs(2);
                loop {
                    match me.upload_step(&id) {
                        Ok(()) => break,
                        // Called off by the backup's delete, which removes the snapshot (or
                        // its retry does); a restart resumes it if neither ever comes.
                        Err(e @ StorageError::Aborted(_)) => {
                            tracing::info!(snapshot = %id, error = %e, "backup upload called off");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(snapshot = %id, error = %e, retry_in_s = wait.as_secs(), "backup upload failed; retrying");
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(RETRY_CAP);
                        }
                    }
                }
                lock(&me.uploading).remove(&id.to_string());
            });
        if let Err(e) = spawned {
            tracing::error!(snapshot = %rec.id, error = %e, "cannot start the upload thread");
            lock(&self.uploading).remove(&rec.id.to_string());
        }
    }

    /// Whether an upload thread of this process runs (the randomized tester waits for them).
    #[cfg(test)]
    pub(crate) fn uploads_running(&self) -> bool {
        !lock(&self.uploading).is_empty()
    }

    /// Whether the upload of `snap` under way has been called off (tests wait for it).
    #[cfg(test)]
    pub(crate) fn upload_called_off(&self, snap: &SnapshotId) -> bool {
        lock(&self.stops).get(&snap.to_string()).is_some_and(|s| s.pulled())
    }

    /// Uploads a snapshot (if it is not yet), marks it uploaded, and removes the local copy unless
    /// it is kept. Ok when there is nothing (left) to do: the snapshot was deleted meanwhile.
    /// An upload the backup's delete calls off answers Aborted.
    pub(crate) fn upload_step(&self, id: &SnapshotId) -> Result<(), StorageError> {
        let Some(pool) = self.locate(&id.0) else { return Ok(()) };
        let key = &id.0.key;
        let stop;
        // Dropped after `held`: a delete that finds the snapshot taken finds its off switch.
        let registered;
        let held = self.take(Kind::Snapshot, &id.0.pool, key, &id.to_string())?;
        (stop, registered) = self.register_stop(id);
        let Some(mut rec) = self.snapshot(id) else {
            // Its copy removed after the upload, or deleted: what a failed purge of it left in
            // a node pool's trash goes now (a shared pool's trash has its purge thread).
            if !pool.shared() {
                pool.purge_trash_of(Kind::Snapshot, key)?;
            }
            return Ok(());
        };
        let Some(mark) = rec.backup.clone() else { return Ok(()) };
        // Deleted while this node could not be told: an upload not finished is not resumed, and
        // an uploaded copy kept as its volume's base goes.
        if self.backups.is_marked_deleted(&mark.id)? {
            return self.drop_deleted(pool, &rec, &mark.id);
        }
        if !mark.uploaded {
            let data = pool.data_path(Kind::Snapshot, key);
            // A delete moved the data into the trash and has not removed the record yet (it
            // died or failed between; its retry removes both): nothing is left to upload, and
            // the thread ends as when called off, rather than failing on the missing copy until
            // the retry. Only then: data missing for any other reason is an error, retried.
            if matches!(pool.sys.files.entry(&data)?, crate::sys::files::Entry::Missing)
                && !pool.trash_of(Kind::Snapshot, key)?.is_empty()
            {
                return Err(StorageError::Aborted(format!(
                    "snapshot {id} is being deleted: its data has left its place"
                )));
            }
            let (path, root) = match rec.layout {
                Layout::Image => (format!("/{}", key.as_str()), None),
                _ => (
                    backup::TREE_PATH.to_string(),
                    Some(backup::StoredMeta::of(
                        &crate::sys::tree::SourceTree::open(&data)?.root_meta()?,
                    )),
                ),
            };
            let meta = BackupMeta {
                path,
                root,
                name: rec.name.clone(),
                source_volume_id: rec.source_volume_id.to_string(),
                layout: rec.layout,
                mode: rec.mode,
                capacity_bytes: rec.size_bytes,
                fs_bytes: rec.fs_bytes,
                length: match rec.layout {
                    Layout::Image => pool.sys.files.len(&pool.data_path(Kind::Snapshot, key))?,
                    _ => 0,
                },
                node: self.node.as_str().to_string(),
                chunk_bytes: (rec.layout == Layout::Image).then_some(backup::image::CHUNK),
            };
            let base = match rec.layout {
                Layout::Image => self.backup_base(&rec, meta.length),
                _ => None,
            };
            match self.upload_watching_marks(&mark.id, &meta, &data, base, &stop) {
                // Called off by the mark: what it wrote goes as for an upload that finished.
                Err(StorageError::Aborted(_)) if stop.pulled_for_mark() => {
                    return self.drop_deleted(pool, &rec, &mark.id)
                }
                // Called off by a delete, which waits for the lock: let it go at once.
                other => drop(other?),
            }
            // Deleted meanwhile by a controller that could not tell this node: it wrote its mark
            // before it forgot the backup, so either it forgot this upload or the mark is seen.
            if self.backups.is_marked_deleted(&mark.id)? {
                self.backups.forget(&mark.id)?;
                return self.drop_deleted(pool, &rec, &mark.id);
            }
            crash::point("backup:before-mark");
            rec.backup = Some(BackupMark {
                uploaded: true,
                ..mark.clone()
            });
            self.store.put_snapshot(pool, key, &rec)?;
        }
        if mark.keep_local {
            return Ok(());
        }
        if rec.layout == Layout::Image {
            // It may stay as the volume's base. Decided with its lock released: a newer backup's
            // upload, or the volume's delete, that could not take it meanwhile finds it free, or
            // is seen by the check below.
            drop(held);
            drop(registered);
            let dropped = self.drop_bases(&rec.source_volume_id, Some(&rec));
            if !self.is_base(&rec) {
                match self.forget_local(&mark.id, false) {
                    Err(e @ StorageError::Busy(_)) => {
                        tracing::info!(snapshot = %id, error = %e, "local copy of an uploaded backup left to whoever holds it")
                    }
                    other => drop(other?),
                }
            }
            // An older base not removed: this step's retry (its upload thread's) removes it.
            return dropped;
        }
        // The repository holds it now: the local copy and its record go (a restart that finds
        // an uploaded record finishes this).
        self.remove_object(pool, Kind::Snapshot, key, &id.to_string())?;
        tracing::info!(snapshot = %id, backup = %mark.id, "local copy of an uploaded backup removed");
        drop(held);
        Ok(())
    }

    /// Uploads backup `id`, calling the upload off if a deletion mark of it appears meanwhile
    /// (looked for every [`MARK_LOOK`]): a node the controller could not tell stops its upload
    /// soon after the delete instead of at its end.
    fn upload_watching_marks(
        &self,
        id: &BackupId,
        meta: &BackupMeta,
        data: &std::path::Path,
        base: Option<backup::upload::Base>,
        stop: &backup::upload::Stop,
    ) -> Result<backup::BackupInfo, StorageError> {
        let (ended, end) = std::sync::mpsc::channel::<()>();
        let every = lock(&self.mark_look).unwrap_or(MARK_LOOK);
        std::thread::scope(|s| {
            let watcher = std::thread::Builder::new()
                .name("cellar-upload-marks".into())
                .spawn_scoped(s, move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = end.recv_timeout(every) {
                        match self.backups.is_marked_deleted(id) {
                            Ok(true) => {
                                tracing::info!(backup = %id, "backup marked deleted while it uploads; calling the upload off");
                                stop.pull_for_mark();
                                return;
                            }
                            Ok(false) => {}
                            Err(e) => tracing::debug!(backup = %id, error = %e, "cannot look for a deletion mark now"),
                        }
                    }
                });
            if let Err(e) = watcher {
                tracing::warn!(backup = %id, error = %e, "cannot start the look for deletion marks; the upload looks once it ends");
            }
            let done = backup::upload::upload(&self.backups, id, meta, data, base, stop);
            drop(ended);
            done
        })
    }

    /// Forgets backup `backup` (deleted while this node could not be told) in its repository,
    /// removes its local snapshot, then its deletion mark (a crash between leaves the mark for the next look, or its expiry).
    fn drop_deleted(&self, pool: &Pool, rec: &SnapshotRecord, backup: &BackupId) -> Result<(), StorageError> {
        // A copy this node wrote after the controller's forget (and then crashed before its own
        // look for the mark) goes too.
        self.backups.forget(backup)?;
        // A delete's retry asking this process hears that it held the part (the mark it
        // consumes is there already).
        self.remember_forgotten(backup, None)?;
        self.remove_object(pool, Kind::Snapshot, &rec.id.0.key, &rec.id.to_string())?;
        tracing::info!(snapshot = %rec.id, backup = %backup, "backup deleted while this node was away: local snapshot removed");
        self.backups.clear_deleted_marks(Some(backup), backup.repository())
    }

    /// The uploaded local copies (kept, or an image volume's base) of backups marked deleted go:
    /// looked at from start, one after the
    /// other in one background thread, and again every [`COPIES_RECHECK`] (a node cut off from the
    /// controller and never restarted learns of a delete too); when the repository cannot tell
    /// (slow, not mounted yet, unreachable) the next look comes sooner, backing off as uploads do.
    /// The thread ends with the engine.
    fn watch_uploaded_copies(self: &Arc<Self>) {
        if self.backups.names().is_empty() {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("cellar-backup-marks".into())
            .spawn(move || {
                let mut wait = Duration::from_secs(2);
                loop {
                    let Some(engine) = me.upgrade() else { return };
                    let answered = engine.drop_copies_marked_deleted();
                    drop(engine);
                    if answered {
                        wait = Duration::from_secs(2);
                        std::thread::sleep(COPIES_RECHECK);
                    } else {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(RETRY_CAP);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the deletion-mark check of uploaded backup copies");
        }
    }

    /// One look at every uploaded copy, kept or a volume's base: those whose backup is marked
    /// deleted go (a base stayed, as large as its volume, until the volume's next backup or
    /// delete). Whether every one could be told.
    pub(crate) fn drop_copies_marked_deleted(&self) -> bool {
        let mut answered = true;
        for rec in self.owned_snapshots() {
            if !rec.backup.as_ref().is_some_and(|m| m.uploaded) {
                continue;
            }
            if let Err(e) = self.drop_copy_if_marked(&rec) {
                tracing::warn!(snapshot = %rec.id, error = %e, "cannot tell whether an uploaded backup copy was deleted; looking again");
                answered = false;
            }
        }
        // A copy an earlier look dropped but failed to purge has no record left to find.
        if let Err(e) = self.purge_unrecorded_copies() {
            tracing::warn!(error = %e, "dropped backup copies left in the trash; looking again");
            answered = false;
        }
        answered
    }

    /// Drops uploaded copy `rec` if its backup is marked deleted.
    fn drop_copy_if_marked(&self, rec: &SnapshotRecord) -> Result<(), StorageError> {
        let Some(backup) = rec.backup.as_ref().map(|m| m.id.clone()) else {
            return Ok(());
        };
        if !self.backups.is_marked_deleted(&backup)? {
            return Ok(());
        }
        let id = &rec.id;
        let Some(pool) = self.locate(&id.0) else { return Ok(()) };
        let _held = self.take(Kind::Snapshot, &id.0.pool, &id.0.key, &id.to_string())?;
        match self.snapshot(id) {
            Some(rec) => self.drop_deleted(pool, &rec, &backup),
            None => Ok(()),
        }
    }

    /// Whether an uploaded backup's local copy stays as its volume's base: an image whose volume
    /// is still here, and no newer backup of it has uploaded.
    fn is_base(&self, rec: &SnapshotRecord) -> bool {
        rec.layout == Layout::Image
            && self.volume(&rec.source_volume_id).is_some()
            && !self
                .bases_of(&rec.source_volume_id)
                .iter()
                .any(|o| o.id != rec.id && created(o) > created(rec))
    }

    /// The local copies of a volume's uploaded backups that are not kept by `keepLocal`.
    fn bases_of(&self, volume: &VolumeId) -> Vec<SnapshotRecord> {
        self.snapshots()
            .into_iter()
            .filter(|r| r.source_volume_id == *volume && r.backup.as_ref().is_some_and(|m| m.uploaded && !m.keep_local))
            .collect()
    }

    /// Removes the bases of `volume` older than `newest` (all of them without one). One that is
    /// busy (its own upload thread, a restore reading it) is left to its thread or to a restart;
    /// one whose removal failed is the caller's error, so that its retry removes it (else the
    /// copy, as large as the volume, would stay until the volume's next backup or a restart).
    pub(super) fn drop_bases(&self, volume: &VolumeId, newest: Option<&SnapshotRecord>) -> Result<(), StorageError> {
        let mut first = None;
        for old in self.bases_of(volume) {
            if newest.is_some_and(|n| n.id == old.id || created(&old) > created(n)) {
                continue;
            }
            let Some(pool) = self.locate(&old.id.0) else { continue };
            let shown = old.id.to_string();
            let removed = self
                .take(Kind::Snapshot, &old.id.0.pool, &old.id.0.key, &shown)
                .and_then(|_held| self.remove_object(pool, Kind::Snapshot, &old.id.0.key, &shown));
            match removed {
                Ok(()) => {
                    tracing::info!(snapshot = %old.id, "local copy of an earlier backup removed (a newer one is the base)")
                }
                Err(e @ StorageError::Busy(_)) => {
                    tracing::info!(snapshot = %old.id, error = %e, "local copy of an earlier backup left to whoever holds it")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %old.id, error = %e, "local copy of an earlier backup not removed");
                    first.get_or_insert(e);
                }
            }
        }
        // And what an earlier removal left in the trash (its retry finds no record to name it).
        self.sweep_unrecorded_copies();
        first.map_or(Ok(()), Err)
    }

    /// The base an image snapshot's upload compares with: the newest uploaded local copy of the
    /// same volume in the same pool, and the ranges that may differ between the two. `None` (a
    /// full read) when there is none or the extents cannot be compared.
    fn backup_base(&self, rec: &SnapshotRecord, length: u64) -> Option<backup::upload::Base> {
        let base = self
            .snapshots()
            .into_iter()
            .filter(|r| {
                r.id != rec.id
                    && r.id.0.pool == rec.id.0.pool
                    && r.source_volume_id == rec.source_volume_id
                    && r.backup.as_ref().is_some_and(|m| m.uploaded)
            })
            .max_by_key(created)?;
        let query = crate::storage::cbt::Query {
            base: Some(base.id.clone()),
            target: rec.id.clone(),
            starting_offset: 0,
        };
        let walked = (|| {
            let mut walk = self.block_ranges(&query)?;
            // Merged at chunk grain as they come (the upload compares whole chunks): a volume
            // whose every other block changed is one range per chunk, not one per block.
            let mut changed: Vec<(u64, u64)> = Vec::new();
            while let Some(batch) = walk.next_batch(crate::storage::cbt::MAX_BATCH)? {
                for (off, len) in batch {
                    add_chunked(&mut changed, off, len);
                }
            }
            // Past the end the walk knows nothing: changed.
            if walk.capacity() < length {
                changed.push((walk.capacity(), length - walk.capacity()));
            }
            Ok::<_, crate::storage::cbt::MetadataError>(changed)
        })();
        match walked {
            Ok(changed) => {
                let bytes: u64 = changed.iter().map(|r| r.1).sum();
                tracing::info!(snapshot = %rec.id, base = %base.id, changed_bytes = bytes, "backup compared with its base");
                Some(backup::upload::Base {
                    backup: base.backup?.id,
                    changed,
                })
            }
            Err(e) => {
                tracing::info!(snapshot = %rec.id, base = %base.id, error = %e, "the base cannot be compared; the image is read whole");
                None
            }
        }
    }

    /// The local snapshot (on this node) that a backup was cut from, while it is kept.
    pub fn local_of_backup(&self, id: &BackupId) -> Option<SnapshotRecord> {
        self.snapshots()
            .into_iter()
            .find(|r| r.backup.as_ref().is_some_and(|m| m.id == *id))
    }

    /// Makes `id`'s upload stoppable: its off switch, and what unregisters it when dropped.
    fn register_stop(&self, id: &SnapshotId) -> (backup::upload::Stop, StopRegistered<'_>) {
        let stop = backup::upload::Stop::default();
        lock(&self.stops).insert(id.to_string(), stop.clone());
        let registered = StopRegistered {
            stops: &self.stops,
            key: id.to_string(),
            stop: stop.clone(),
        };
        (stop, registered)
    }

    /// Forgets this node's part of a backup (the backup's DeleteSnapshot): its local snapshot,
    /// if one is kept or still uploading. An upload under way in this process is called off and
    /// waited for (it ends within one pack); one that does not end within [`STOP_WAIT`], or
    /// another operation on the snapshot, answers Busy (the CO retries the delete). Whether this
    /// node held a part of the backup (the controller then needs no deletion mark for it).
    pub fn forget_local_backup(&self, id: &BackupId) -> Result<bool, StorageError> {
        self.forget_local(id, true)
    }

    /// [`Self::forget_local_backup`]; `stop_upload` false only takes the snapshot if it is free.
    fn forget_local(&self, id: &BackupId, stop_upload: bool) -> Result<bool, StorageError> {
        // Only the owner of the pool holds a part: a node that opens a shared pool finds the
        // records of the controller's snapshots there, but neither uploads nor removes them.
        let look = || {
            self.local_of_backup(id)
                .filter(|r| self.locate(&r.id.0).is_some_and(|p| p.owner))
        };
        // A pool opening during the look may have had its records read but not be open yet: the
        // look is made again once it is, not answered "held nothing".
        let shut_before = self.owned_pools_shut();
        let mut local = look();
        if local.is_none() && self.owned_pools_shut() != shut_before {
            local = look();
        }
        if local.is_none() && self.owned_pool_broken() {
            // "Held nothing" from a node whose pool did not open would spare the deletion mark
            // its copy there needs once the pool is back. A copy is beside its source volume:
            // only that pool counts when the repository names it (an unrelated pool that did not
            // open holds no delete up); any pool when it does not.
            let pool = self
                .backups
                .find_even_pending(id)
                .ok()
                .flatten()
                .and_then(|b| backup::source_of(&b))
                .map(|v| v.0.pool);
            self.owned_pools_open(pool.as_ref(), &format!("part of backup {id}"))?;
        }
        if let Some(rec) = local {
            let pool = self
                .locate(&rec.id.0)
                .ok_or_else(|| StorageError::SnapshotNotFound(rec.id.to_string()))?;
            let take = || self.take(Kind::Snapshot, &rec.id.0.pool, &rec.id.0.key, &rec.id.to_string());
            let deadline = std::time::Instant::now() + STOP_WAIT;
            // A holder without an off switch may be an upload between taking the snapshot and
            // registering its switch, or one that has just ended (its switch gone, its hold
            // about to go): it is given a moment before the answer is "busy", or a mark for
            // another replica is written.
            let unswitched = std::time::Instant::now() + SWITCH_GRACE;
            let _held = loop {
                match take() {
                    Err(busy @ StorageError::Busy(_)) => {
                        let stop = lock(&self.stops).get(&rec.id.to_string()).cloned();
                        match stop {
                            Some(s) if stop_upload && std::time::Instant::now() < deadline => {
                                s.pull();
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            // Another controller replica holds it (a shared volume's upload it
                            // resumed, or cut before this one took over): told by a deletion
                            // mark, which its upload looks for while it runs.
                            None if stop_upload && std::time::Instant::now() < unswitched => {
                                crash::point("forget:unswitched");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            None if stop_upload
                                && pool.shared()
                                && !self.taken_here(Kind::Snapshot, &rec.id.0.pool, &rec.id.0.key) =>
                            {
                                self.mark_for_other_replica(pool, id, &rec.id);
                                return Err(busy);
                            }
                            _ => return Err(busy),
                        }
                    }
                    other => break other?,
                }
            };
            // Noted before the removal: one that fails after the record went (a failed sync of
            // the directory) leaves the retry no record to find, and the retry (after a restart
            // too) must still hear that this node held the part, or the controller writes a mark
            // nobody clears. Durably for a delete only: an upload removing its own copy deletes
            // no backup, and the repository holds it then.
            self.remember_forgotten(id, stop_upload.then_some(pool))?;
            // The upload may have ended meanwhile and removed its copy itself.
            if self.snapshot(&rec.id).is_some() {
                self.remove_object(pool, Kind::Snapshot, &rec.id.0.key, &rec.id.to_string())?;
            } else {
                self.sweep_unrecorded_copies();
            }
            self.clear_mark_for_other_replica(id);
            return Ok(true);
        }
        if let Some(snap) = self.marked_snapshot(id) {
            // The retry of a delete that marked another replica's upload off: done once the
            // snapshot is gone, seen under its lock (the other replica may still hold it, and a
            // record a glitch of the share left out of the listing is not gone).
            match self.locate(&snap.0) {
                Some(pool) => {
                    let _held = self.take(Kind::Snapshot, &snap.0.pool, &snap.0.key, &snap.to_string())?;
                    // Noted before the removal, as above.
                    self.remember_forgotten(id, Some(pool))?;
                    // Only the copy of this backup: the note is on the share, where anyone with
                    // the share could have written another snapshot's id.
                    let this_backup = |r: SnapshotRecord| r.backup.is_some_and(|m| m.id == *id);
                    if self.snapshot(&snap).is_some_and(this_backup) {
                        self.remove_object(pool, Kind::Snapshot, &snap.0.key, &snap.to_string())?;
                    }
                }
                None => self.remember_forgotten(id, None)?,
            }
            self.clear_mark_for_other_replica(id);
            return Ok(true);
        }
        // The retry of a forget whose purge failed finds no record (only the backup id, not the
        // copy's key, names what it forgets).
        self.sweep_unrecorded_copies();
        // The retry of a delete that another node refused, or whose repository part failed:
        // this node still held the part the first try removed.
        Ok(lock(&self.forgotten).iter().any(|f| f == id) || self.noted_forgotten(id))
    }

    /// Marks backup `id` deleted (once) so that the other controller replica holding its
    /// snapshot `snap` in the shared `pool` calls its upload off within [`MARK_LOOK`], as a node
    /// the controller could not tell does; the delete answers Busy until that replica has let
    /// the snapshot go. The mark is noted in the pool first ([`Pool::marked_off_dir`]), so that
    /// the delete's retry removes it once the snapshot is gone, after a restart of this process
    /// too, and from either replica. A note or a mark that cannot be written is logged: the
    /// delete answers Busy all the same, and its retry tries again (never UNAVAILABLE, which the
    /// controller would read as a node not told).
    fn mark_for_other_replica(&self, pool: &Pool, id: &BackupId, snap: &SnapshotId) {
        // Noted at every try (once), and the mark written at every try until it is there: a
        // try that noted it and then could not write the mark (or died) must not stop the next.
        if let Err(e) = write_note(pool, &pool.marked_off_dir(), id, &snap.to_string()) {
            tracing::warn!(backup = %id, error = %e, "cannot note the deletion mark that would call another controller replica's upload off, so none is written; the delete's retry tries again");
            return;
        }
        crash::point("backup:mark-noted");
        if self.backups.is_marked_deleted(id).unwrap_or(false) {
            return;
        }
        // Only a mark that is there counts (a repository not initialised writes none).
        match self
            .backups
            .mark_deleted(id)
            .and_then(|()| self.backups.is_marked_deleted(id))
        {
            Ok(true) => {
                tracing::info!(backup = %id, snapshot = %snap, "its snapshot is held by another controller replica; deletion mark written to call its upload off")
            }
            Ok(false) => {
                tracing::warn!(backup = %id, "no deletion mark could be written to call another controller replica's upload off; the delete's retry tries again")
            }
            Err(e) => {
                tracing::warn!(backup = %id, error = %e, "cannot write the deletion mark that calls another controller replica's upload off; the delete's retry tries again")
            }
        }
    }

    /// The notes of [`Self::mark_for_other_replica`] of backup `id`, in the shared pools this
    /// process owns, each with the snapshot its mark calls off when it names one of its pool
    /// (the share is every node's: a note is a hint). Notes that cannot be read (bounded in
    /// time) count as none: the worst is a mark that expires.
    fn mark_notes(&self, id: &BackupId) -> Vec<(&Pool, std::path::PathBuf, Option<SnapshotId>)> {
        let mut found = Vec::new();
        for pool in self.pools.values().filter(|p| p.owner && p.shared()) {
            match read_notes(pool, &pool.marked_off_dir(), id) {
                Ok(notes) => found.extend(notes.into_iter().map(|(note, snap)| {
                    let snap = SnapshotId::parse(&snap)
                        .ok()
                        .filter(|s| s.0.pool == pool.config.name);
                    if snap.is_none() {
                        tracing::warn!(pool = pool.config.name.as_str(), backup = %id, note = %note.display(), "a note of a deletion mark names no snapshot of its pool; not followed");
                    }
                    (pool, note, snap)
                })),
                Err(e) => {
                    tracing::warn!(pool = pool.config.name.as_str(), backup = %id, error = %e, "cannot read the notes of deletion marks written for another controller replica; a mark this pool noted may expire instead")
                }
            }
        }
        found
    }

    /// The snapshot of backup `id` whose holder [`Self::mark_for_other_replica`] marked off.
    fn marked_snapshot(&self, id: &BackupId) -> Option<SnapshotId> {
        self.mark_notes(id).into_iter().find_map(|(_, _, snap)| snap)
    }

    /// Removes the deletion mark [`Self::mark_for_other_replica`] wrote, now that the snapshot
    /// has gone (the other replica removes it too when its upload was called off by it; an
    /// upload that ended first never saw it), then every note of it. Tidying only: a failure is
    /// logged, the notes stay and the delete's next retry (if any) tries again; a mark left
    /// expires.
    fn clear_mark_for_other_replica(&self, id: &BackupId) {
        let notes = self.mark_notes(id);
        if notes.iter().all(|(_, _, snap)| snap.is_none()) {
            return;
        }
        if let Err(e) = self.backups.clear_deleted_marks(Some(id), id.repository()) {
            tracing::warn!(backup = %id, error = %e, "cannot remove the deletion mark written for another controller replica; it expires");
            return;
        }
        for (pool, note, _) in notes {
            if let Err(e) = pool.sys.files.remove_file_if_exists(&note) {
                tracing::warn!(backup = %id, error = %e, "cannot remove the note of a deletion mark already removed");
            }
        }
    }

    /// Remembers that this node held backup `id` and is dropping it, for the delete's retries:
    /// in this process (the last [`FORGOTTEN_KEPT`]) and, when `pool` (the copy's) is given, in
    /// a note there ([`note_forgotten`]), so that a restart between the attempts does not make
    /// the retry answer that it held nothing.
    fn remember_forgotten(&self, id: &BackupId, pool: Option<&Pool>) -> Result<(), StorageError> {
        if let Some(pool) = pool {
            note_forgotten(pool, id)?;
        }
        keep_last(&mut lock(&self.forgotten), id.clone());
        Ok(())
    }

    /// Whether a pool this process owns noted backup `id` as dropped ([`note_forgotten`]). Notes
    /// that cannot be read count as none: the controller then writes a mark that expires, where
    /// failing the answer would hold every backup's delete up on one pool's error.
    fn noted_forgotten(&self, id: &BackupId) -> bool {
        self.pools.values().filter(|p| p.owner).any(|pool| {
            noted_in(pool, id).unwrap_or_else(|e| {
                tracing::warn!(pool = pool.config.name.as_str(), backup = %id, error = %e, "cannot read the notes of dropped backups; answering that this pool held nothing of it");
                false
            })
        })
    }

    /// [`Self::purge_unrecorded_copies`] where it only tidies up: what it cannot remove (maybe
    /// another copy's, stuck) is logged and fails no call; the next sweep tries again.
    fn sweep_unrecorded_copies(&self) {
        if let Err(e) = self.purge_unrecorded_copies() {
            tracing::warn!(error = %e, "backup copies left in the trash by a failed removal are not removed yet; the next sweep tries again");
        }
    }

    /// The snapshots left unrecorded in the trash of this node's pools (a removal of a backup's
    /// copy that failed to purge, whose retry cannot name it) go now rather than at the next
    /// start, each under its lock (one a delete is purging is that delete's). A shared pool's
    /// trash has its purge thread.
    fn purge_unrecorded_copies(&self) -> Result<(), StorageError> {
        for (name, pool) in self.pools.iter().filter(|(_, p)| p.owner && !p.shared()) {
            for key in pool.trashed_unrecorded(Kind::Snapshot)? {
                let shown = format!("snapshot {} in the trash", key.as_str());
                if let Ok(_held) = self.take(Kind::Snapshot, name, &key, &shown) {
                    pool.purge_trash_of(Kind::Snapshot, &key)?;
                }
            }
        }
        Ok(())
    }

    /// Restores a planned volume from a backup: from the local snapshot when this node kept it,
    /// else streamed from the repository (every blob checked).
    pub(super) fn restore_planned(
        &self,
        p: Planned<'_>,
        req: &NewVolume,
        id: &BackupId,
    ) -> Result<VolumeRecord, StorageError> {
        // Only a kept copy whose backup is complete: a copy being removed is not waited for.
        // And only one of the new volume's layout: a tree backup restores into either tree
        // layout from the repository, where a copy of a `dir` snapshot cannot be a subvolume.
        let kept = self
            .local_of_backup(id)
            .filter(|r| r.backup.as_ref().is_some_and(|m| m.keep_local && m.uploaded))
            .filter(|r| r.layout == p.layout);
        if let Some(local) = kept {
            let mut copy = req.clone();
            copy.source = Some(Source::Snapshot(local.id.clone()));
            return self.make_volume(p, &copy);
        }
        let frames = backup::restore::frames(&self.backups, id, p.layout)?;
        let mut frames = backup::restore::read_ahead(frames)?;
        tracing::info!(backup = %id, volume = %p.id, "restore from the backup repository started");
        self.import_planned(p, req, &mut frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::image::{Parent, CHUNK};

    /// An engine with one `dir` pool and the repository `offsite` (initialised) under a new
    /// directory, and a backup of a new volume cut there. Uploads are not started in this
    /// engine: the record waits, as after a restart, until a test calls `upload_step`.
    fn cut_backup(keep_local: bool) -> (tempfile::TempDir, Arc<LocalEngine>, SnapshotRecord, BackupId) {
        cut_backup_of(keep_local, &[])
    }

    /// An engine with one `dir` pool and the repository `offsite` (initialised) under a new
    /// directory, and a new 4 MiB `dir` volume in it.
    fn engine_with_volume() -> (tempfile::TempDir, Arc<LocalEngine>, PoolName, VolumeRecord) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::storage::config::Config::default_for(&dir.path().join("node"));
        config.repositories = vec![crate::backup::testing::repository(dir.path())];
        let engine = Arc::new(LocalEngine::open(NodeId::parse("n1").unwrap(), &config).expect("engine"));
        let repository = PoolName::parse("offsite").unwrap();
        engine.backups().open_or_init(&repository, true).unwrap();
        let vol = engine
            .create_volume(NewVolume::plain("pvc-1", Some(Layout::Dir), 4 << 20))
            .expect("volume");
        (dir, engine, repository, vol)
    }

    /// A note of a dropped backup that cellar did not write (a FIFO, a symbolic link: on a share,
    /// put there by a node) is passed over: the note is written all the same (the backup's
    /// delete failed on every retry).
    #[test]
    fn a_planted_note_of_a_dropped_backup_is_passed_over() {
        let (_dir, engine, _, vol) = engine_with_volume();
        let pool = engine.pool(&vol.id.0.pool).unwrap();
        let id = BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").unwrap();
        let dir = pool.forgotten_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
        nix::unistd::mkfifo(&dir.join(format!("{:020}-{}", 1, id.key())), mode).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join(format!("{:020}-{}", 2, id.key()))).unwrap();
        note_forgotten(pool, &id).expect("noted");
        assert_eq!(notes_of(&*pool.sys.files, &dir, &id).unwrap().len(), 1, "its own note");
    }

    /// [`cut_backup`] of a volume holding `bytes` in one file.
    fn cut_backup_of(
        keep_local: bool,
        bytes: &[u8],
    ) -> (tempfile::TempDir, Arc<LocalEngine>, SnapshotRecord, BackupId) {
        let (dir, engine, repository, vol) = engine_with_volume();
        if !bytes.is_empty() {
            let pool = engine.pool(&vol.id.0.pool).unwrap();
            std::fs::write(pool.data_path(Kind::Volume, &vol.id.0.key).join("file"), bytes).unwrap();
        }
        let req = BackupRequest { repository, keep_local };
        let rec = engine.create_backup("snap-1", &vol.id, false, &req).expect("cut");
        let backup = rec.backup.clone().unwrap().id;
        (dir, engine, rec, backup)
    }

    /// A tenant's `truncate -s 1T` in a tree volume used to keep its backup's upload reading
    /// zeros (for ever, at 8 EiB). The cut refuses it (FAILED_PRECONDITION, saying why) and keeps
    /// nothing of it; the upload refuses such a tree too. Holes within the bound back up.
    #[test]
    fn a_tree_whose_holes_a_backup_would_read_for_ever_is_refused_at_the_cut() {
        let (_dir, engine, repository, vol) = engine_with_volume();
        let pool = engine.pool(&vol.id.0.pool).unwrap();
        let data = pool.data_path(Kind::Volume, &vol.id.0.key);
        std::fs::File::create(data.join("huge"))
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let req = BackupRequest {
            repository,
            keep_local: false,
        };
        let e = engine
            .create_backup("snap-1", &vol.id, false, &req)
            .expect_err("refused");
        assert!(matches!(e, StorageError::ContentRefused(_)), "{e:?}");
        assert!(e.to_string().contains("holes total 1099511627776 bytes"), "{e}");
        assert!(engine.snapshot_named("snap-1").is_none(), "no record");
        let snaps = pool.data_path(Kind::Snapshot, &crate::storage::id::Key::from_name("snap-1"));
        assert!(!snaps.exists(), "no data of it is kept");
        // The upload refuses the same tree (one cut before this release, say).
        let meta = BackupMeta {
            capacity_bytes: 4 << 20,
            ..crate::backup::testing::dir_meta("0b8c3a2e-51c4-4a4e-9d0e-6f1f0c2f8a11")
        };
        let id = BackupId::new(req.repository.clone(), "0b8c3a2e-51c4-4a4e-9d0e-6f1f0c2f8a11").unwrap();
        let e = backup::upload::upload(engine.backups(), &id, &meta, &data, None, &Default::default())
            .expect_err("refused");
        assert!(e.to_string().contains("reads holes as zeros"), "{e}");
        // Holes within the bound: the volume backs up.
        std::fs::File::create(data.join("huge"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let rec = engine.create_backup("snap-1", &vol.id, false, &req).expect("cut");
        engine.upload_step(&rec.id).expect("uploaded");
    }

    /// A node with a pool of its own that did not open cannot say it holds nothing of a backup
    /// whose copy may be there: its forget answers UNAVAILABLE (so the delete is retried rather
    /// than answered OK without the deletion mark that copy needs). A backup the repository
    /// names with its source in another pool is not held up; with every pool open, a backup it
    /// never had is nothing held.
    #[test]
    fn a_node_whose_pool_did_not_open_cannot_say_it_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::storage::config::Config::default_for(&dir.path().join("node"));
        config.repositories = vec![crate::backup::testing::repository(dir.path())];
        let repository = PoolName::parse("offsite").unwrap();
        let unknown = BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").unwrap();
        let open = LocalEngine::open(NodeId::parse("n1").unwrap(), &config).expect("engine");
        open.backups().open_or_init(&repository, true).unwrap();
        assert!(!open.forget_local_backup(&unknown).expect("every pool open"));
        // Backups the repository holds, one of a volume in each pool.
        let stored = |pool: &str, key: &str| {
            let id = BackupId::new(repository.clone(), key).unwrap();
            let meta = BackupMeta {
                source_volume_id: format!("local:n1:{pool}:pvc-1"),
                ..crate::backup::testing::dir_meta(key)
            };
            let data = dir.path().join(key);
            std::fs::create_dir(&data).unwrap();
            backup::upload::upload(open.backups(), &id, &meta, &data, None, &Default::default()).unwrap();
            id
        };
        let beside_default = stored("default", "0b8c3a2e-51c4-4a4e-9d0e-6f1f0c2f8a11");
        let beside_gone = stored("gone", "5d2e8f7a-0c1b-4b7e-8a9d-3e4f5a6b7c8d");
        let mut gone = config.pools[0].clone();
        gone.name = PoolName::parse("gone").unwrap();
        std::fs::write(dir.path().join("a-file"), b"").unwrap();
        gone.path = dir.path().join("a-file").join("pool");
        config.pools.push(gone);
        let engine = LocalEngine::open(NodeId::parse("n1").unwrap(), &config).expect("engine");
        assert!(!engine.ready());
        for id in [&unknown, &beside_gone] {
            match engine.forget_local_backup(id) {
                Err(StorageError::Unavailable(m)) => assert!(m.contains("pool gone"), "{m}"),
                other => panic!("a forget of {id} with its pool not open: {other:?}"),
            }
        }
        assert!(!engine.forget_local_backup(&beside_default).expect("its pool is open"));
    }

    /// How many notes of dropped backups the pool of `rec` holds.
    fn notes(engine: &LocalEngine, rec: &SnapshotRecord) -> usize {
        let pool = engine.pool(&rec.id.0.pool).unwrap();
        std::fs::read_dir(pool.forgotten_dir()).map_or(0, |d| d.count())
    }

    /// A note that cannot be written for want of room (a full pool) does not keep the forget
    /// from removing the copy and freeing that room, and the same process still remembers it
    /// held it. (Any other failure fails the forget before the removal: seed 333.)
    #[test]
    fn a_note_that_cannot_be_written_does_not_stop_the_forget() {
        let (_dir, engine, rec, backup) = cut_backup(true);
        engine.upload_step(&rec.id).expect("upload");
        crate::crash::in_thread::fail_once_at("file:create", libc::ENOSPC);
        let forgot = engine.forget_local_backup(&backup);
        crate::crash::in_thread::fail_at(None);
        assert!(forgot.expect("the forget with a full pool"), "held");
        assert_eq!(notes(&engine, &rec), 0, "the note's write was the one that failed");
        assert!(engine.snapshot(&rec.id).is_none(), "the copy went");
        assert!(engine.forget_local_backup(&backup).expect("retry"), "held");
    }

    /// Notes that cannot be read (here `.forgotten` is a file) count as none: a forget of a
    /// backup this node never held answers "held nothing" rather than fail, so one pool's error
    /// does not hold every backup's delete up.
    #[test]
    fn notes_that_cannot_be_read_count_as_none() {
        let (_dir, engine, rec, _backup) = cut_backup(true);
        let pool = engine.pool(&rec.id.0.pool).unwrap();
        std::fs::write(pool.forgotten_dir(), b"not a directory").unwrap();
        let never = BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").unwrap();
        assert!(!engine.forget_local_backup(&never).expect("never held"), "nothing held");
    }

    /// A forget whose removal fails after the copy's record went (its directory's sync, EIO)
    /// answers the error; its retry finds no record, and must still answer that this node held
    /// the part, or the controller writes a deletion mark nobody would ever clear: in the same
    /// process, and after a restart between the attempts (the note in the pool). A backup this
    /// node never held is still nothing held.
    #[test]
    fn a_forget_retried_after_its_record_went_still_held_the_part() {
        let (dir, engine, rec, backup) = cut_backup(true);
        engine.upload_step(&rec.id).expect("upload");
        assert_eq!(notes(&engine, &rec), 0, "no note before the forget");
        // The note's own write syncs twice (file, directory); the removal's record sync is next.
        crate::crash::in_thread::fail_once_at_nth("file:fsync", 3, libc::EIO);
        let first = engine.forget_local_backup(&backup);
        crate::crash::in_thread::fail_at(None);
        assert!(first.is_err(), "the failed sync is the answer: {first:?}");
        assert!(engine.snapshot(&rec.id).is_none(), "the record went before the sync");
        assert_eq!(notes(&engine, &rec), 1, "the note was written before the removal");
        assert!(engine.forget_local_backup(&backup).expect("retry"), "held");
        drop(engine);
        let mut config = crate::storage::config::Config::default_for(&dir.path().join("node"));
        config.repositories = vec![crate::backup::testing::repository(dir.path())];
        let restarted = LocalEngine::open(NodeId::parse("n1").unwrap(), &config).expect("engine");
        assert!(
            restarted.forget_local_backup(&backup).expect("retry after a restart"),
            "held"
        );
        let never = BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").unwrap();
        assert!(
            !restarted.forget_local_backup(&never).expect("never held"),
            "nothing held"
        );
    }

    /// A kept copy of a backup deleted while its node was away goes once the node can read the
    /// repository: at start it may not (a share mounted later), and it is looked at again.
    #[test]
    fn a_kept_copy_of_a_deleted_backup_goes_once_the_repository_is_back() {
        let (dir, engine, rec, backup) = cut_backup(true);
        engine.upload_step(&rec.id).expect("upload");
        assert!(engine
            .snapshot(&rec.id)
            .is_some_and(|r| r.backup.is_some_and(|m| m.uploaded)));
        // Deleted while the node was away; the node starts with the repository out of view.
        engine.backups().mark_deleted(&backup).unwrap();
        engine.backups().forget(&backup).unwrap();
        let (repo, away) = (dir.path().join("repo"), dir.path().join("away"));
        std::fs::rename(&repo, &away).unwrap();
        engine.start_uploads();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            engine.snapshot(&rec.id).is_some(),
            "not dropped without reading the mark"
        );
        std::fs::rename(&away, &repo).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while engine.snapshot(&rec.id).is_some() {
            assert!(std::time::Instant::now() < deadline, "the kept copy stayed");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The background look removes the copy first, then the mark: it may still be at it.
        while engine.backups().is_marked_deleted(&backup).unwrap() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !engine.backups().is_marked_deleted(&backup).unwrap(),
            "the mark is consumed"
        );
    }

    /// A delete that died after it moved the snapshot's data out, before its record went (a
    /// controller replica killed mid-delete, found by the racing backup run): the upload thread
    /// ends at once instead of failing INTERNAL on the missing copy until the delete's retry, and
    /// that retry removes the snapshot.
    #[test]
    fn an_upload_of_a_snapshot_whose_delete_died_midway_ends() {
        use crate::crash::in_thread;
        let (_dir, engine, rec, backup) = cut_backup(false);
        in_thread::crash_at(Some("delete:after-trash"));
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.forget_local_backup(&backup)));
        in_thread::crash_at(None);
        assert!(died.is_err(), "the delete died after the data left its place");
        assert!(engine.snapshot(&rec.id).is_some(), "its record is still there");
        let ended = engine.upload_step(&rec.id);
        assert!(
            matches!(ended, Err(StorageError::Aborted(ref m)) if m.contains("being deleted")),
            "{ended:?}"
        );
        assert!(engine.forget_local_backup(&backup).expect("the delete's retry"));
        assert!(engine.snapshot(&rec.id).is_none(), "the retry removes it");
        engine.upload_step(&rec.id).expect("nothing is left to upload");
        assert!(
            engine.backups().find(&backup).unwrap().is_none(),
            "nothing was uploaded"
        );
    }

    /// A node that runs on (cut off from the controller, never restarted) drops a kept copy of a
    /// backup deleted meanwhile at its next look, and keeps the copies of live backups.
    #[test]
    fn a_later_look_drops_a_kept_copy_deleted_meanwhile() {
        let (_dir, engine, rec, backup) = cut_backup(true);
        engine.upload_step(&rec.id).expect("upload");
        assert!(engine.drop_copies_marked_deleted(), "the repository answers");
        assert!(engine.snapshot(&rec.id).is_some(), "a live backup's copy stays");
        engine.backups().mark_deleted(&backup).unwrap();
        engine.backups().forget(&backup).unwrap();
        assert!(engine.drop_copies_marked_deleted());
        assert!(engine.snapshot(&rec.id).is_none(), "the deleted backup's copy goes");
        assert!(
            !engine.backups().is_marked_deleted(&backup).unwrap(),
            "the mark is consumed"
        );
    }

    /// A node cut off from the controller uploads on: the controller marks the backup deleted
    /// and forgets it before the node writes its checked copy, and the node dies before it looks
    /// for the mark. When it resumes, it must forget that copy, not only drop its local snapshot
    /// (the copy stayed, a ready backup nothing would delete).
    #[test]
    fn a_copy_written_after_the_delete_goes_when_the_node_resumes() {
        use crate::crash::in_thread;
        let (_dir, engine, rec, backup) = cut_backup(false);
        // The upload does not look for the mark while it is paused (it would call itself off if
        // it did, the other way this ends: seen under load when the mark took over 100 ms).
        *lock(&engine.mark_look) = Some(Duration::from_secs(3600));
        let pause = Arc::new(in_thread::Pause::default());
        let uploading = {
            let (engine, id, pause) = (engine.clone(), rec.id.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("backup:after-upload", pause)));
                in_thread::crash_at(Some("backup:checked-copy-written"));
                engine.upload_step(&id)
            })
        };
        assert!(
            pause.reached(Duration::from_secs(60)),
            "the upload saved its pending copy"
        );
        // The controller, which could not tell the node: mark, then forget.
        engine.backups().mark_deleted(&backup).unwrap();
        engine.backups().forget(&backup).unwrap();
        pause.release();
        let ended = uploading.join();
        assert!(ended.is_err(), "the node died after its checked copy: {:?}", ended.ok());
        assert!(
            engine.backups().find_even_pending(&backup).unwrap().is_some(),
            "the checked copy was written after the forget"
        );
        // The resumed upload finds the mark.
        engine.upload_step(&rec.id).expect("resume");
        assert_eq!(
            engine.backups().find_even_pending(&backup).unwrap(),
            None,
            "no backup comes back"
        );
        assert!(engine.snapshot(&rec.id).is_none(), "the local snapshot is gone");
        assert!(
            !engine.backups().is_marked_deleted(&backup).unwrap(),
            "the mark is consumed"
        );
    }

    /// Nothing of a backup whose delete called its upload off is left: not its local snapshot,
    /// not a snapshot file in the repository (pending or checked), not a stoppable upload.
    fn nothing_left_of(engine: &LocalEngine, rec: &SnapshotRecord, backup: &BackupId) {
        assert!(engine.snapshot(&rec.id).is_none(), "the local snapshot is gone");
        let pool = engine.pool(&rec.id.0.pool).unwrap();
        assert!(
            !pool.data_path(Kind::Snapshot, &rec.id.0.key).exists(),
            "its data is gone"
        );
        assert_eq!(
            engine.backups().find_even_pending(backup).unwrap(),
            None,
            "the repository holds no copy of it"
        );
        assert!(lock(&engine.stops).is_empty(), "no off switch is left registered");
    }

    /// The backup's delete while its upload runs calls the upload off and answers OK once it has
    /// ended (it answered Busy until the whole upload had run, holding the delete up).
    #[test]
    fn a_delete_calls_off_the_upload_of_its_backup() {
        use crate::crash::in_thread;
        let (_dir, engine, rec, backup) = cut_backup(false);
        let pause = Arc::new(in_thread::Pause::default());
        let uploading = {
            let (engine, id, pause) = (engine.clone(), rec.id.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("backup:before-upload", pause)));
                engine.upload_step(&id)
            })
        };
        assert!(pause.reached(Duration::from_secs(60)), "the upload started");
        let forgetting = {
            let (engine, backup) = (engine.clone(), backup.clone());
            std::thread::spawn(move || engine.forget_local_backup(&backup))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !engine.upload_called_off(&rec.id) {
            assert!(
                std::time::Instant::now() < deadline,
                "the delete never called the upload off"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        pause.release();
        let ended = uploading.join().unwrap();
        assert!(
            matches!(ended, Err(StorageError::Aborted(_))),
            "the upload ends called off: {ended:?}"
        );
        assert!(
            forgetting.join().unwrap().expect("the delete answers OK"),
            "the node says it held the backup"
        );
        nothing_left_of(&engine, &rec, &backup);
        // The delete's retry (another node refused the first) still hears that this node held
        // it, so the controller writes no mark that nothing would consume; another backup was
        // never held here.
        assert!(engine.forget_local_backup(&backup).expect("retry"), "held, said again");
        let other = BackupId::fresh(backup.repository().clone());
        assert!(!engine.forget_local_backup(&other).expect("forget"), "never held");
        // What the upload thread does next: nothing left to upload.
        engine.upload_step(&rec.id).expect("nothing to do");
        assert_eq!(engine.backups().find_even_pending(&backup).unwrap(), None);
    }

    /// A forget that finds the snapshot held by a holder without an off switch (an upload that
    /// has just ended: its switch gone, its hold about to go) waits for it a moment rather than
    /// answer "busy" at once (seen once in CI as a flaky `a_delete_calls_off_the_upload_of_its_backup`).
    #[test]
    fn a_forget_waits_a_moment_for_a_holder_without_an_off_switch() {
        use crate::crash::in_thread;
        let (_dir, engine, rec, backup) = cut_backup(false);
        let held = engine
            .take(Kind::Snapshot, &rec.id.0.pool, &rec.id.0.key, &rec.id.to_string())
            .expect("held, no switch registered");
        let pause = Arc::new(in_thread::Pause::default());
        let forgetting = {
            let (engine, backup, pause) = (engine.clone(), backup.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("forget:unswitched", pause)));
                engine.forget_local_backup(&backup)
            })
        };
        assert!(
            pause.reached(Duration::from_secs(60)),
            "the forget waits for the holder"
        );
        drop(held);
        pause.release();
        assert!(forgetting.join().unwrap().expect("the forget answers OK"), "held here");
        nothing_left_of(&engine, &rec, &backup);
    }

    /// A backup of 1 MiB that does not compress, its upload started in the background at 1 KiB/s
    /// (its first pack waits hours for its turn).
    fn slow_upload_started() -> (tempfile::TempDir, Arc<LocalEngine>, SnapshotRecord, BackupId) {
        let bytes: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (dir, engine, rec, backup) = cut_backup_of(false, &bytes);
        engine.backups().throttle().set_bytes_per_sec(1024);
        engine.start_uploads();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !lock(&engine.stops).contains_key(&rec.id.to_string()) {
            assert!(std::time::Instant::now() < deadline, "the upload never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        (dir, engine, rec, backup)
    }

    /// An upload waiting for its turn under the node's bandwidth limit (here a 1 MiB file at 1
    /// KiB/s: hours) is called off without writing on, and its upload thread ends.
    #[test]
    fn a_delete_calls_off_an_upload_paced_by_the_bandwidth_limit() {
        let (_dir, engine, rec, backup) = slow_upload_started();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        engine.forget_local_backup(&backup).expect("the delete answers OK");
        while engine.uploads_running() {
            assert!(std::time::Instant::now() < deadline, "the upload thread runs on");
            std::thread::sleep(Duration::from_millis(10));
        }
        nothing_left_of(&engine, &rec, &backup);
    }

    /// A node the controller could not tell uploads on: the deletion mark the controller writes
    /// calls the upload off at the node's next look (it ran to its end, which at the bandwidth
    /// limit here is hours), and the node drops its part and consumes the mark.
    #[test]
    fn a_deletion_mark_calls_off_a_running_upload() {
        let (dir, engine, rec, backup) = slow_upload_started();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        // The controller (its own process and bandwidth), which could not tell the node: mark,
        // then forget.
        let controller = crate::backup::Backups::new(
            vec![crate::backup::testing::repository(dir.path())],
            crate::backup::Throttle::unlimited(),
        );
        controller.mark_deleted(&backup).unwrap();
        controller.forget(&backup).unwrap();
        while engine.uploads_running() {
            assert!(std::time::Instant::now() < deadline, "the upload runs on past the mark");
            std::thread::sleep(Duration::from_millis(10));
        }
        nothing_left_of(&engine, &rec, &backup);
        assert!(
            !engine.backups().is_marked_deleted(&backup).unwrap(),
            "the mark is consumed"
        );
    }

    /// Every other 4 KiB block of 64 chunks changed: 64 ranges kept, not 8,192, and the same
    /// chunks marked changed as the ranges one by one would mark.
    #[test]
    fn changed_ranges_are_kept_at_chunk_grain() {
        let length = 64 * CHUNK;
        let blocks: Vec<(u64, u64)> = (0..length / 4096).step_by(2).map(|b| (b * 4096, 4096)).collect();
        let mut merged = Vec::new();
        for &(off, len) in &blocks {
            add_chunked(&mut merged, off, len);
        }
        assert_eq!(merged, vec![(0, length)], "touching chunks merge into one range");
        let mut sparse = Vec::new();
        for c in (0..64).step_by(3) {
            add_chunked(&mut sparse, c * CHUNK + 100, 10);
        }
        assert_eq!(sparse.len(), 22);
        assert_eq!(
            Parent::changed_chunks(length, sparse.iter().copied()),
            Parent::changed_chunks(length, (0..64).step_by(3).map(|c| (c * CHUNK + 100, 10)))
        );
    }
}
