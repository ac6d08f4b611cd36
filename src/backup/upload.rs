//! A snapshot's data into a repository: an image volume's filesystem image, cut into fixed
//! chunks by [`super::image`] (holes are never read; with a parent, the chunks changed block
//! tracking calls unchanged are taken from it unread), or a tree with owners, modes, times,
//! xattrs and links, as rustic's archiver reads them.
//!
//! An upload is idempotent by its key: a retry after a crash finds the finished snapshot, or
//! starts over (packs a killed upload left are not in any index; a prune removes them). The
//! previous backup of the same volume is the parent, so a tree's unchanged files are not read
//! again; every chunk is deduplicated against the whole repository.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustic_core::repofile::{Node, NodeType, SnapshotFile, SnapshotSummary, StringList};
use rustic_core::{BackupOptions, LocalSourceSaveOptions, ParentOptions, PathList, SnapshotOptions, TimeOption};

use super::{
    any_info_of, image, info_of, is_pending, BackupInfo, BackupMeta, Backups, RusticFailure, TAG_KEY, TAG_NAME,
    TAG_PENDING, TAG_VOLUME,
};
use crate::crash;
use crate::storage::id::BackupId;
use crate::storage::record::Layout;
use crate::storage::StorageError;

/// An image backup's parent as the node knows it: the backup whose local copy is still on the
/// node, and the byte ranges that changed block tracking says may differ between that copy and
/// the snapshot being uploaded.
pub struct Base {
    pub backup: BackupId,
    pub changed: Vec<(u64, u64)>,
}

/// An upload's off switch: once pulled, every later write of the upload to its repository is
/// refused, so that an upload whose backup is being deleted ends within one pack instead of
/// running to its end (and holding the delete up until then). What it wrote before is in no
/// index or listed snapshot: a prune removes it.
///
/// It also counts the repository backends opened for the upload ([`Stop::writer`]). rustic's
/// packer writes its last pack from a thread of its own that a failed backup does not wait for;
/// [`upload`] ends the switch (every later write refused) and returns only once no such backend
/// is held, so that nothing is written for an upload after it answered.
#[derive(Clone, Default)]
pub struct Stop(Arc<StopState>);

#[derive(Default)]
struct StopState {
    /// Why it was pulled (0: it was not).
    why: AtomicU8,
    /// The upload has answered: nothing more may be written for it.
    ended: AtomicBool,
    /// Backends opened for the upload and not yet dropped.
    writers: AtomicUsize,
}

/// Why a [`Stop`] was pulled (0: it was not).
const BY_DELETE: u8 = 1;
const BY_MARK: u8 = 2;

/// How long an answered upload waits for rustic's threads to let go of its backends. Their
/// writes are refused by then, so only a write already under way (one pack) can hold them.
const WRITERS_WAIT: Duration = Duration::from_secs(60);

impl Stop {
    /// Calls the upload off for its backup's delete.
    pub fn pull(&self) {
        let _ = self
            .0
            .why
            .compare_exchange(0, BY_DELETE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Calls the upload off for a deletion mark of its backup, found by the upload itself.
    pub fn pull_for_mark(&self) {
        let _ = self
            .0
            .why
            .compare_exchange(0, BY_MARK, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn pulled(&self) -> bool {
        self.0.why.load(Ordering::SeqCst) != 0
    }

    /// Whether it was pulled for a deletion mark (and not first by a delete).
    pub fn pulled_for_mark(&self) -> bool {
        self.0.why.load(Ordering::SeqCst) == BY_MARK
    }

    /// Whether a write for the upload must be refused: it was called off, or it has answered.
    pub fn refuses_writes(&self) -> bool {
        self.pulled() || self.0.ended.load(Ordering::SeqCst)
    }

    /// Whether `other` is this switch (not merely one in the same position).
    pub fn same(&self, other: &Stop) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Counts a backend opened for the upload until the returned guard is dropped.
    pub fn writer(&self) -> StopWriter {
        self.0.writers.fetch_add(1, Ordering::SeqCst);
        StopWriter(self.clone())
    }

    /// Backends opened for the upload and still held.
    pub fn writers(&self) -> usize {
        self.0.writers.load(Ordering::SeqCst)
    }

    /// Refuses every later write, then waits up to `limit` for the backends opened for the
    /// upload to be dropped; whether they were.
    pub fn end(&self, limit: Duration) -> bool {
        self.0.ended.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        while self.writers() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// A backend opened for an upload: the switch it obeys, counted while it is held.
pub struct StopWriter(Stop);

impl StopWriter {
    pub fn stop(&self) -> &Stop {
        &self.0
    }
}

impl Drop for StopWriter {
    fn drop(&mut self) {
        self.0 .0.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The holes a tree backup may read as zeros, for a volume of `capacity` bytes: 16 times its
/// capacity, at least 16 GiB. The backup format has no holes (restic stores a file as the chunks
/// of all its bytes), so a sparse file is read and chunked whole: a tenant's `truncate -s 8E f`
/// would keep its volume's uploads reading for ever. Image backups skip holes and have no bound.
pub fn max_hole_bytes(capacity: u64) -> u64 {
    capacity.saturating_mul(16).max(16 << 30)
}

/// Refuses a tree at `root` that a tree backup cannot hold whole ([`crate::sys::tree::count_tree`]):
/// holes more than a backup of a volume of `capacity` bytes reads ([`max_hole_bytes`]), or a path
/// longer than the backup tool can open (it reads by path, and skips with only a warning what lies
/// past PATH_MAX: such a backup would never check complete, and its upload was retried for ever).
pub fn refuse_unbackupable(
    count: &crate::sys::tree::TreeCount,
    root: &Path,
    capacity: u64,
    what: &str,
) -> Result<(), StorageError> {
    let longest = root.as_os_str().len() + 1 + count.longest_path;
    if longest >= libc::PATH_MAX as usize {
        return Err(StorageError::ContentRefused(format!(
            "{what} holds a path {} bytes long below its root, too deep for a tree backup, which \
             reads files by path (at most {} bytes below {}): make the tree shallower, or keep it \
             in an image volume, whose backups read the image file",
            count.longest_path,
            (libc::PATH_MAX as usize).saturating_sub(root.as_os_str().len() + 2),
            root.display()
        )));
    }
    let max = max_hole_bytes(capacity);
    if count.hole_bytes <= max {
        return Ok(());
    }
    Err(StorageError::ContentRefused(format!(
        "{what} holds sparse files whose holes total {} bytes, more than the {max} a backup of a \
         {capacity}-byte volume reads (16 times its capacity, at least 16 GiB): a tree backup reads \
         holes as zeros. Make those files dense, or keep them in an image volume, whose backups \
         skip holes",
        count.hole_bytes
    )))
}

/// Uploads `data` (the snapshot's image file or tree root) as backup `id`, then checks that the
/// repository holds every blob it references. Returns the backup as the repository lists it.
/// An upload called off by `stop` answers [`StorageError::Aborted`].
pub fn upload(
    backups: &Backups,
    id: &BackupId,
    meta: &BackupMeta,
    data: &Path,
    base: Option<Base>,
    stop: &Stop,
) -> Result<BackupInfo, StorageError> {
    let started = Instant::now();
    let repo_name = id.repository().as_str().to_string();
    let result = upload_inner(backups, id, meta, data, base, stop).map_err(|e| {
        if stop.pulled() {
            StorageError::Aborted(format!(
                "the upload of backup {id} was called off (its backup is being deleted): {e}"
            ))
        } else {
            e
        }
    });
    // rustic's packer thread may still be writing the failed upload's last pack: nothing is
    // written for an upload once it answered, and it answers once nothing can be.
    if !stop.end(WRITERS_WAIT) {
        tracing::warn!(backup = %id, waited_s = WRITERS_WAIT.as_secs(), writers = stop.writers(), "a write of the upload is still under way after it ended; it is refused when it ends");
    }
    crate::metrics::record_backup_end(&repo_name, "upload", result.is_ok(), started.elapsed());
    match &result {
        Ok(b) => {
            tracing::info!(backup = %id, snapshot = b.snapshot, bytes = b.bytes, took_ms = started.elapsed().as_millis() as u64, "backup uploaded and checked")
        }
        Err(e) => tracing::warn!(backup = %id, error = %e, "backup upload failed"),
    }
    result
}

fn upload_inner(
    backups: &Backups,
    id: &BackupId,
    meta: &BackupMeta,
    data: &Path,
    base: Option<Base>,
    stop: &Stop,
) -> Result<BackupInfo, StorageError> {
    let cfg = backups.config(id.repository())?;
    // What a tree's backup must hold: rustic reads the tree by path and leaves out, with only a
    // warning, an entry it cannot reach (one deeper than PATH_MAX), and the backup was still
    // listed ready, short of those entries.
    let entries = match meta.layout {
        Layout::Image => None,
        _ => {
            let count = crate::sys::tree::count_tree(data)?;
            refuse_unbackupable(
                &count,
                data,
                meta.capacity_bytes,
                &format!("the snapshot of backup {id}"),
            )?;
            Some(count.entries)
        }
    };
    let mut opened = backups.open_stoppable(id.repository(), stop)?;
    let mut snaps = backups.snapshots(id.repository(), &opened).map_err(|e| cfg.error(e))?;
    // A snapshot saved before a crash (or a failed check) counts only once it checks complete:
    // a prune running meanwhile may have marked a pack it reuses. Otherwise it is forgotten and
    // the upload made again (rustic then writes the blobs the index no longer has). A checked
    // one is taken before one still pending.
    if let Some(saved) = snaps
        .iter()
        .filter(|s| any_info_of(id.repository(), s).is_some_and(|b| b.id == *id))
        .min_by_key(|s| is_pending(s))
        .cloned()
    {
        match check_complete(backups, opened, id, meta, &saved, entries) {
            Ok(()) => return ready(backups, id, &saved, &snaps, stop),
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                tracing::warn!(backup = %id, error = %e, "a saved backup is not complete in the index; uploading it again");
                backups.forget(id)?;
                opened = backups.open_stoppable(id.repository(), stop)?;
                snaps = backups.snapshots(id.repository(), &opened).map_err(|e| cfg.error(e))?;
            }
        }
    }
    let description = serde_json::to_string(meta).map_err(|e| StorageError::Unsupported(e.to_string()))?;
    // Saved pending: nothing lists or restores it before `finish` has checked it.
    let tags = format!(
        "{TAG_PENDING},{TAG_KEY}{},{TAG_NAME}{},{TAG_VOLUME}{}",
        id.key(),
        meta.name.replace(',', "_"),
        meta.source_volume_id
    );
    let snap = SnapshotOptions::default()
        .label("cellar".to_string())
        .host(meta.node.clone())
        .add_tags(&tags)
        .and_then(|o| o.description(description).to_snapshot())
        .map_err(|e| cfg.error(e))?;
    if meta.layout == Layout::Image {
        return upload_image(backups, opened, snaps, id, meta, data, base, snap, stop);
    }
    let parent = snaps
        .into_iter()
        .filter(|s| {
            !is_pending(s)
                && s.tags
                    .iter()
                    .any(|t| *t == format!("{TAG_VOLUME}{}", meta.source_volume_id))
        })
        .max_by_key(|s| s.time.timestamp());
    let repo = opened.to_indexed_ids().map_err(|e| cfg.error(e))?;
    // rustic reads the parent's trees without checking them against their ids: trees swapped in
    // their packs (no key needed) would make a file whose name, size and modification time match
    // reuse another file's chunks. A parent whose trees do not check is not used: the upload then
    // reads every file.
    let parent = match parent {
        Some(p) => match super::trees_check(&repo, cfg, p.tree) {
            Ok(_) => Some(p),
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                tracing::warn!(backup = %id, parent = %p.id, error = %e, "the parent backup's trees do not check; uploading without it");
                None
            }
        },
        None => None,
    };
    let mut parents = ParentOptions::default();
    match &parent {
        Some(p) => parents.parents = vec![p.id.to_string()],
        None => parents.force = true,
    }
    // A `dir` snapshot is a copy: every file has a new inode and ctime, so against its parent
    // only size and mtime tell an unchanged file (as `restic --ignore-inode --ignore-ctime`).
    // btrfs snapshots keep both. rustic_core 0.13 compares inodes
    // only when `ignore_inode` is *set* (its test is inverted, archiver/parent.rs), so leaving it
    // unset is what ignores them here; were that fixed, setting it would be needed, and leaving
    // it unset would only cost speed (files re-read), never a wrong backup.
    if meta.layout == Layout::Dir {
        parents.ignore_ctime = true;
        parents.ignore_inode = false;
    }
    // Access times too: a restored tree is the snapshot's, times and all.
    let save = LocalSourceSaveOptions::default().set_atime(Some(TimeOption::Yes));
    // A tree is saved as /volume.
    let opts = BackupOptions::default()
        .parent_opts(parents)
        .ignore_save_opts(save)
        .as_path(std::path::PathBuf::from(super::TREE_PATH));
    let source: PathList = [data.to_path_buf()].into_iter().collect();
    crash::point("backup:before-upload");
    let saved = repo.backup(&opts, &source, snap).map_err(|e| cfg.error(e))?;
    crash::point("backup:after-upload");
    let read = saved.summary.as_ref().map_or(0, |s| s.total_bytes_processed);
    crate::metrics::record_backup_bytes(id.repository().as_str(), "read", read);
    finish(backups, repo.drop_index(), id, meta, &saved, entries, stop)
}

/// An image's upload: its chunks through [`image::write`], with the parent's unchanged chunks
/// taken unread when `base` names a backup the repository holds that was cut the same way.
#[allow(clippy::too_many_arguments)]
fn upload_image(
    backups: &Backups,
    opened: super::Open,
    snaps: Vec<SnapshotFile>,
    id: &BackupId,
    meta: &BackupMeta,
    data: &Path,
    base: Option<Base>,
    mut snap: SnapshotFile,
    stop: &Stop,
) -> Result<BackupInfo, StorageError> {
    let cfg = backups.config(id.repository())?;
    let key = opened.key();
    let repo = opened.to_indexed().map_err(|e| cfg.error(e))?;
    // The parent's trees are read within bounds, as a restore reads them (`BlobReader`).
    let raw = super::BlobReader::new(backups.write_backend(id.repository(), None)?, &key, cfg)?;
    let parent = base.and_then(|b| {
        let (psnap, pinfo) = snaps
            .iter()
            .find_map(|s| info_of(id.repository(), s).filter(|i| i.id == b.backup).map(|i| (s, i)))?;
        if pinfo.meta.chunk_bytes != Some(image::CHUNK) || pinfo.meta.source_volume_id != meta.source_volume_id {
            return None;
        }
        let blobs = super::data_node(&repo, cfg, psnap.tree, &pinfo.meta, &raw)
            .ok()??
            .content?;
        (blobs.len() == image::chunks_of(pinfo.meta.length)).then(|| {
            (
                psnap.id,
                image::Parent {
                    blobs,
                    length: pinfo.meta.length,
                    changed: image::Parent::changed_chunks(meta.length, b.changed),
                },
            )
        })
    });
    let be = backups.write_backend(id.repository(), Some(stop))?;
    let name = meta.path.trim_start_matches('/');
    crash::point("backup:before-upload");
    let written = image::write(
        &repo,
        be.clone(),
        &key,
        data,
        name,
        parent.as_ref().map(|(_, p)| p),
        stop,
    )
    .map_err(|e| cfg.error(e))?;
    snap.tree = written.tree;
    snap.paths = StringList::default();
    snap.paths.add(meta.path.clone());
    snap.parent = parent.as_ref().map(|(p, _)| *p);
    let mut summary = SnapshotSummary::default();
    summary.total_files_processed = 1;
    summary.total_bytes_processed = meta.length;
    summary.data_blobs = written.chunks;
    summary.data_added = written.added;
    summary.command = "cellar".to_string();
    snap.summary = Some(summary);
    image::write_snapshot(&*be, &key, &mut snap).map_err(|e| cfg.error(e))?;
    crash::point("backup:after-upload");
    crate::metrics::record_backup_bytes(id.repository().as_str(), "read", written.read);
    tracing::info!(backup = %id, chunks = written.chunks, from_parent = written.reused, read_bytes = written.read, new_bytes = written.added, "image chunks written");
    finish(backups, repo.drop_index(), id, meta, &snap, None, stop)
}

/// The end of an upload: ready only when [`check_complete`] finds every blob in the index (and,
/// for a tree, the `entries` its source held).
#[allow(clippy::too_many_arguments)]
fn finish(
    backups: &Backups,
    opened: super::Open,
    id: &BackupId,
    meta: &BackupMeta,
    saved: &SnapshotFile,
    entries: Option<u64>,
    stop: &Stop,
) -> Result<BackupInfo, StorageError> {
    if let Err(e) = check_complete(backups, opened, id, meta, saved, entries) {
        // Not ready: forgotten, so that the retry uploads again instead of finding it.
        if !e.is_unavailable() {
            tracing::warn!(backup = %id, error = %e, "a saved backup is not complete in the index (a prune ran meanwhile?); forgetting it to upload again");
            backups.forget(id)?;
        }
        return Err(e);
    }
    ready(backups, id, saved, std::slice::from_ref(saved), stop)
}

/// A backup checked complete becomes one: a pending `saved` is written again without its
/// [`TAG_PENDING`] (the same tree, so the same data), and then every pending snapshot of the
/// backup among `seen` is removed. A crash between the two leaves both; the checked copy is the
/// one listed, and the retry removes the pending one.
fn ready(
    backups: &Backups,
    id: &BackupId,
    saved: &SnapshotFile,
    seen: &[SnapshotFile],
    stop: &Stop,
) -> Result<BackupInfo, StorageError> {
    let cfg = backups.config(id.repository())?;
    let opened = backups.open_stoppable(id.repository(), stop)?;
    let mut done = saved.clone();
    if is_pending(saved) {
        done.tags.remove_all(&[TAG_PENDING
            .parse()
            .map_err(|e| cfg.error(RusticFailure::io(format!("{e}"))))?]);
        let be = backups.write_backend(id.repository(), Some(stop))?;
        image::write_snapshot(&*be, &opened.key(), &mut done).map_err(|e| cfg.error(e))?;
        crash::point("backup:checked-copy-written");
    }
    let pending: Vec<_> = seen
        .iter()
        .filter(|s| is_pending(s) && any_info_of(id.repository(), s).is_some_and(|b| b.id == *id))
        .map(|s| s.id)
        .collect();
    if !pending.is_empty() {
        // The backup is ready either way; a pending copy left (an append-only repository) is
        // never listed, and a later forget of the backup removes it with the rest.
        if let Err(e) = opened.delete_snapshots(&pending) {
            tracing::warn!(backup = %id, error = %cfg.error(e), "the pending copy of a checked backup was not removed");
        }
    }
    info_of(id.repository(), &done)
        .ok_or_else(|| StorageError::DataLoss(format!("backup {id} was saved without the tags that name it")))
}

/// Every blob the saved snapshot references is in the repository's index, its data has the
/// length the source had, and a tree holds as many entries as its source (`entries`): the backup
/// is complete.
fn check_complete(
    backups: &Backups,
    opened: super::Open,
    id: &BackupId,
    meta: &BackupMeta,
    saved: &SnapshotFile,
    entries: Option<u64>,
) -> Result<(), StorageError> {
    let cfg = backups.config(id.repository())?;
    let raw = super::BlobReader::new(backups.write_backend(id.repository(), None)?, &opened.key(), cfg)?;
    // The index is read again: it now holds the packs this upload wrote.
    let repo = opened.to_indexed().map_err(|e| cfg.error(e))?;
    repo.get_index_entry(&saved.tree).map_err(|e| cfg.error(e))?;
    let short = |held: u64| match entries {
        Some(want) if want != held => Err(StorageError::Transfer(format!(
            "backup {id} holds {held} entries but its source has {want}: the backup tool could not \
             read some (a path longer than PATH_MAX, 4096 bytes?); it is not kept"
        ))),
        _ => Ok(()),
    };
    let Some(root) = super::data_node(&repo, cfg, saved.tree, meta, &raw)? else {
        // An empty tree: the root tree (checked above) is all there is.
        return short(0);
    };
    let mut pending: Vec<Node> = vec![root];
    let (mut files, mut blobs) = (0u64, 0u64);
    // Every node but the root (the source directory itself) is an entry below it.
    let mut held = 0u64;
    while let Some(node) = pending.pop() {
        match node.node_type {
            NodeType::Dir => {
                let Some(sub) = node.subtree else {
                    return Err(cfg.error(RusticFailure::data_loss(format!("directory {} has no tree", node.name))));
                };
                repo.get_index_entry(&sub).map_err(|e| cfg.error(e))?;
                let tree = super::checked_tree(&repo, cfg, sub, &raw)?;
                held += tree.nodes.len() as u64;
                pending.extend(tree.nodes);
            }
            NodeType::File => {
                files += 1;
                for blob in node.content.iter().flatten() {
                    repo.get_index_entry(blob).map_err(|e| cfg.error(e))?;
                    blobs += 1;
                }
                if meta.layout == Layout::Image && node.meta.size != meta.length {
                    return Err(cfg.error(RusticFailure::data_loss(format!(
                        "the image was {} bytes long but the backup holds {}",
                        meta.length, node.meta.size
                    ))));
                }
            }
            _ => {}
        }
    }
    short(held)?;
    tracing::debug!(backup = %id, files, blobs, entries = held, "backup complete in the index");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::backup::testing::{self, dir_meta as meta};
    use crate::crash::in_thread;
    use crate::storage::id::PoolName;

    /// An initialised repository under a new directory, and a tree there holding one file of
    /// `bytes` to back up.
    fn setup(bytes: &[u8]) -> (tempfile::TempDir, Arc<Backups>, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = testing::backups(dir.path());
        b.open_or_init(&name, true).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("f"), bytes).unwrap();
        (dir, Arc::new(b), data)
    }

    /// The restic snapshots of the repository carrying backup `id`, and how many are pending.
    fn copies(b: &Backups, id: &BackupId) -> (usize, usize) {
        let snaps = b.snapshots(id.repository(), &b.open(id.repository()).unwrap()).unwrap();
        let mine: Vec<_> = snaps
            .iter()
            .filter(|s| any_info_of(id.repository(), s).is_some_and(|i| i.id == *id))
            .collect();
        (mine.len(), mine.iter().filter(|s| is_pending(s)).count())
    }

    /// rustic walks the tree by path and leaves out, with a warning only, what lies deeper than
    /// PATH_MAX: such a backup was listed ready and restored without those entries. Its entries
    /// are counted against the source's, so a backup short of some is refused and never listed; a
    /// tree of every kind of entry (hard links, a symlink, a FIFO, an empty directory) counts the
    /// same as its backup. A tree that deep is now refused before its upload (which was retried
    /// for ever, each time short), saying why.
    #[test]
    fn a_backup_missing_entries_its_source_holds_is_never_ready() {
        let (_dir, b, data) = setup(b"a file");
        std::fs::create_dir(data.join("empty")).unwrap();
        std::os::unix::fs::symlink("f", data.join("link")).unwrap();
        std::fs::hard_link(data.join("f"), data.join("second-name")).unwrap();
        nix::unistd::mkfifo(&data.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let whole = BackupId::new(PoolName::parse("offsite").unwrap(), "5678-abcd").unwrap();
        upload(&b, &whole, &meta("snap-whole"), &data, None, &Default::default()).expect("every kind counts alike");
        assert_eq!(crate::sys::tree::count_tree(&data).unwrap().entries, 5);
        // The same backup held against a source of one entry more is short.
        let opened = b.open(whole.repository()).unwrap();
        let saved = b
            .snapshots(whole.repository(), &opened)
            .unwrap()
            .into_iter()
            .find(|s| any_info_of(whole.repository(), s).is_some_and(|i| i.id == whole))
            .expect("the backup");
        let e = check_complete(&b, opened, &whole, &meta("snap-whole"), &saved, Some(6)).expect_err("short");
        assert!(e.to_string().contains("holds 5 entries but its source has 6"), "{e}");

        let deepest = crate::sys::tree::testing::deep_dirs(&data, 20);
        crate::sys::tree::testing::file_at(&deepest, "deep-file", b"at the bottom");
        let short = BackupId::new(PoolName::parse("offsite").unwrap(), "5679-abcd").unwrap();
        let e = upload(&b, &short, &meta("snap-short"), &data, None, &Default::default())
            .expect_err("a tree too deep for the backup tool");
        assert!(matches!(e, StorageError::ContentRefused(_)), "{e:?}");
        assert!(e.to_string().contains("too deep for a tree backup"), "{e}");
        assert_eq!(copies(&b, &short), (0, 0), "nothing of it is kept");
        assert!(b.list(short.repository()).unwrap().iter().all(|i| i.id != short));
    }

    /// The trees rustic writes check against their ids as `trees_check` reads them (else every
    /// upload would go without its parent, reading every file again).
    #[test]
    fn the_trees_of_an_honest_backup_check() {
        let (_dir, b, data) = setup(b"a file");
        std::fs::create_dir_all(data.join("sub/deeper")).unwrap();
        std::fs::write(data.join("sub/deeper/g"), b"another").unwrap();
        std::os::unix::fs::symlink("f", data.join("sub/link")).unwrap();
        let id = BackupId::new(PoolName::parse("offsite").unwrap(), "5680-abcd").unwrap();
        upload(&b, &id, &meta("snap-honest"), &data, None, &Default::default()).expect("upload");
        let opened = b.open(id.repository()).unwrap();
        let snap = b
            .snapshots(id.repository(), &opened)
            .unwrap()
            .into_iter()
            .find(|s| any_info_of(id.repository(), s).is_some_and(|i| i.id == id))
            .expect("the backup");
        let repo = opened.to_indexed_ids().unwrap();
        let trees = super::super::trees_check(&repo, b.config(id.repository()).unwrap(), snap.tree).expect("checks");
        assert!(trees >= 4, "the root, /volume, sub and sub/deeper: {trees}");
    }

    /// Every bucket of a path repository replaced by a symlink to a directory outside (anyone who
    /// can write the share): the upload wrote its packs there, as root. Now nothing is written
    /// outside; and a pack replaced by a symlink (to an honest copy, even) is DATA_LOSS at the
    /// restore, not UNAVAILABLE retried for ever.
    #[test]
    fn a_path_repository_is_written_and_read_only_inside_itself() {
        let (dir, b, data) = setup(&[3u8; 200_000]);
        let id = |n: u32| BackupId::new(PoolName::parse("offsite").unwrap(), &format!("{n:04}-abcd")).unwrap();
        let kept = id(1);
        upload(&b, &kept, &meta("kept"), &data, None, &Default::default()).expect("upload");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let copies = dir.path().join("copies");
        std::fs::create_dir(&copies).unwrap();
        for bucket in std::fs::read_dir(dir.path().join("repo/data")).unwrap().flatten() {
            for pack in std::fs::read_dir(bucket.path()).unwrap().flatten() {
                let copy = copies.join(pack.file_name());
                std::fs::copy(pack.path(), &copy).unwrap();
                std::fs::remove_file(pack.path()).unwrap();
                std::os::unix::fs::symlink(&copy, pack.path()).unwrap();
            }
        }
        let (fresh, _) = testing::backups(dir.path());
        match crate::backup::restore::frames(&fresh, &kept, Layout::Dir).and_then(|f| f.collect::<Result<Vec<_>, _>>())
        {
            Err(StorageError::DataLoss(m)) => assert!(m.contains("not a regular file"), "{m}"),
            other => panic!(
                "a pack that is a symlink: want DATA_LOSS, got {:?}",
                other.map(|f| f.len())
            ),
        }
        for bucket in std::fs::read_dir(dir.path().join("repo/data")).unwrap().flatten() {
            std::fs::remove_dir_all(bucket.path()).unwrap();
            std::os::unix::fs::symlink(&outside, bucket.path()).unwrap();
        }
        std::fs::write(data.join("g"), vec![4u8; 150_000]).unwrap();
        let stop = Stop::default();
        let refused = upload(&b, &id(2), &meta("other"), &data, None, &stop);
        assert!(refused.is_err(), "no bucket to write into");
        assert_eq!(
            stop.writers(),
            0,
            "the failed upload answered only once rustic's threads let go of its backends"
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
    }

    /// A backend opened for an upload is counted until dropped, wherever it is held (rustic's
    /// packer keeps one in a thread of its own); ending the upload refuses its later writes at
    /// once and waits for every such backend to be let go.
    #[test]
    fn an_ended_upload_refuses_writes_and_waits_for_its_backends() {
        let (_dir, b, _data) = setup(b"x");
        let name = PoolName::parse("offsite").unwrap();
        let stop = Stop::default();
        let be = b.write_backend(&name, Some(&stop)).unwrap();
        assert_eq!(stop.writers(), 1, "one backend opened for the upload");
        let file = rustic_core::Id::default();
        be.write_bytes(rustic_core::FileType::Pack, &file, false, vec![1u8; 10].into())
            .expect("a write before the end");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            rx.recv().unwrap();
            let refused = be.write_bytes(rustic_core::FileType::Pack, &file, false, vec![2u8; 10].into());
            drop(be);
            refused
        });
        let ending = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.end(Duration::from_secs(600)))
        };
        while !stop.refuses_writes() {
            std::thread::yield_now();
        }
        assert!(!ending.is_finished(), "the end waits while a backend is held");
        tx.send(()).unwrap();
        let refused = holder.join().unwrap().expect_err("a write after the end");
        assert!(refused.to_string().contains("already answered"), "{refused}");
        assert!(ending.join().unwrap(), "the end saw the backend let go");
        assert_eq!(stop.writers(), 0);
        assert!(!stop.pulled(), "an ended upload was not called off");
    }

    /// Between the snapshot file's write and the completeness check, the backup is neither
    /// listed, found by name, nor restorable; once checked it is, as one restic snapshot.
    #[test]
    fn a_backup_is_listed_only_once_checked_complete() {
        let (_dir, b, data) = setup(&[7u8; 100_000]);
        let id = BackupId::new(PoolName::parse("offsite").unwrap(), "0123-abcd").unwrap();
        let pause = Arc::new(in_thread::Pause::default());
        let uploading = {
            let (b, id, data, pause) = (b.clone(), id.clone(), data.clone(), pause.clone());
            std::thread::spawn(move || {
                in_thread::pause_at(Some(("backup:after-upload", pause)));
                upload(&b, &id, &meta("snap-a"), &data, None, &Default::default())
            })
        };
        assert!(pause.reached(Duration::from_secs(60)), "the upload came to its check");
        assert_eq!(copies(&b, &id), (1, 1), "saved, pending its check");
        assert_eq!(
            b.list(id.repository()).unwrap(),
            Vec::new(),
            "not listed before its check"
        );
        assert_eq!(b.find_named(id.repository(), "snap-a").unwrap(), None);
        assert_eq!(b.find(&id).unwrap(), None);
        assert!(
            b.find_even_pending(&id).unwrap().is_some(),
            "who holds the id is known before its check"
        );
        let all = b.list_all(id.repository()).unwrap();
        assert_eq!(
            all.iter()
                .map(|(i, pending)| (i.id.clone(), *pending))
                .collect::<Vec<_>>(),
            vec![(id.clone(), true)],
            "`cellar backup list` shows it pending"
        );
        assert!(
            crate::backup::restore::frames(&b, &id, Layout::Dir).is_err(),
            "an unchecked backup is not restored"
        );
        pause.release();
        let info = uploading.join().unwrap().expect("upload");
        assert_eq!(b.list(id.repository()).unwrap(), vec![info.clone()]);
        assert_eq!(b.list_all(id.repository()).unwrap(), vec![(info.clone(), false)]);
        assert_eq!(copies(&b, &id), (1, 0), "one checked snapshot, the pending one gone");
        assert!(crate::backup::restore::frames(&b, &id, Layout::Dir).is_ok());
    }

    /// A crash after the checked copy is written, before the pending one goes: the checked one
    /// is listed, and the retry answers it and removes the pending one.
    #[test]
    fn a_crash_between_the_checked_copy_and_the_pending_ones_removal_converges() {
        let (_dir, b, data) = setup(b"some bytes");
        let id = BackupId::new(PoolName::parse("offsite").unwrap(), "4567-abcd").unwrap();
        let crashed = {
            let (b, id, data) = (b.clone(), id.clone(), data.clone());
            std::thread::spawn(move || {
                in_thread::crash_at(Some("backup:checked-copy-written"));
                upload(&b, &id, &meta("snap-b"), &data, None, &Default::default())
            })
            .join()
        };
        assert!(crashed.is_err(), "the upload crashed at the point");
        assert_eq!(copies(&b, &id), (2, 1));
        let listed = b.list(id.repository()).unwrap();
        assert_eq!(listed.len(), 1, "the checked copy only: {listed:?}");
        assert_eq!(
            b.list_all(id.repository()).unwrap(),
            vec![(listed[0].clone(), false)],
            "held checked and pending: shown once, ready"
        );
        let again = upload(&b, &id, &meta("snap-b"), &data, None, &Default::default()).expect("retry");
        assert_eq!(again, listed[0], "the retry answers the checked copy");
        assert_eq!(copies(&b, &id), (1, 0));
    }
}
