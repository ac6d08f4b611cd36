//! A backup as a transfer stream (`storage::transfer`): the node that restores imports it exactly
//! as it imports a copy from another node, in `.work`, checked whole before it is moved into
//! place, and removed when anything fails.
//!
//! Every data blob is checked against its id (the SHA-256 of its plaintext, after rustic has
//! checked its MAC) before any of it becomes a frame: a corrupted pack is DATA_LOSS. Runs of
//! zeros are not sent, so holes in an image (and in sparse files) stay holes.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use rustic_core::repofile::{BlobType, Node, NodeType};
use rustic_core::{BlobId, IndexedFullStatus, Repository};

use super::{info_of, Backups, BlobReader, RepositoryConfig, RusticFailure};
use crate::storage::id::BackupId;
use crate::storage::record::Layout;
use crate::storage::transfer::{chunk_checksum, Frame, Header, Tally, CHUNK_BYTES};
use crate::storage::StorageError;
use crate::sys::tree::Meta;

type Indexed = Repository<IndexedFullStatus>;

/// The frames of backup `id`, read lazily: the first is the header. A tree (from a `dir` or
/// `btrfs` volume) is restored into either tree layout: `target` names the one being made.
/// NOT_FOUND when the repository holds no such backup.
pub fn frames(backups: &Backups, id: &BackupId, target: Layout) -> Result<Frames, StorageError> {
    let cfg = backups.config(id.repository())?.clone();
    let repo = backups.open(id.repository())?;
    let snaps = backups.snapshots(id.repository(), &repo).map_err(|e| cfg.error(e))?;
    let Some((snap, info)) = snaps
        .into_iter()
        .find_map(|s| info_of(id.repository(), &s).filter(|b| b.id == *id).map(|b| (s, b)))
    else {
        return Err(StorageError::SnapshotNotFound(format!("{id} (not in its repository)")));
    };
    let info = &info;
    let repo = repo.to_indexed().map_err(|e| cfg.error(e))?;
    // Blobs are read and decompressed here, within bounds, not by rustic (`BlobReader`).
    let raw = BlobReader::new(backups.write_backend(id.repository(), None)?, &repo.key(), &cfg)?;
    let root = super::data_node(&repo, &cfg, snap.tree, &info.meta, &raw)?;
    let tree = |l: Layout| l != Layout::Image;
    let header = Header {
        layout: if tree(info.meta.layout) && tree(target) {
            target
        } else {
            info.meta.layout
        },
        mode: info.meta.mode,
        capacity_bytes: info.meta.capacity_bytes,
        fs_bytes: info.meta.fs_bytes,
        length: info.meta.length,
    };
    let image = matches!(root.as_ref().map(|r| &r.node_type), Some(NodeType::File));
    if image != (info.meta.layout == Layout::Image) {
        return Err(StorageError::DataLoss(format!(
            "backup {} says it holds a {} volume but its data is a {}",
            info.id,
            info.meta.layout.as_str(),
            if image { "file" } else { "tree" }
        )));
    }
    let mut f = Frames {
        repo,
        raw,
        cfg,
        repository: info.id.repository().as_str().to_string(),
        backup: info.id.clone(),
        tally: Tally::default(),
        queue: std::collections::VecDeque::new(),
        stack: Vec::new(),
        links: HashMap::new(),
        started: Instant::now(),
        state: State::Running,
    };
    f.push(Frame::Header(header));
    match root {
        Some(root) if image => f.stack.push(Step::File {
            blobs: root.content.clone().unwrap_or_default(),
            next: 0,
            offset: 0,
            size: info.meta.length,
            name: info.meta.path.clone(),
        }),
        Some(root) => f.open_dir(&root, None)?,
        // An empty tree: only its root.
        None => f.stack.push(Step::Dir {
            nodes: Vec::new().into_iter(),
            meta: Meta::default(),
            names: HashSet::new(),
        }),
    }
    // A tree's root keeps its own metadata, as the source had it.
    if let (Some(Step::Dir { meta, .. }), Some(m)) =
        (f.stack.last_mut(), info.meta.root.as_ref().and_then(|r| r.meta()))
    {
        *meta = m;
    }
    Ok(f)
}

enum Step {
    /// A directory's entries still to send, then its `Leave`; the names sent so far.
    Dir {
        nodes: std::vec::IntoIter<Node>,
        meta: Meta,
        names: HashSet<Vec<u8>>,
    },
    /// A file's blobs still to send: together they must hold exactly its `size` bytes.
    File {
        blobs: Vec<rustic_core::DataId>,
        next: usize,
        offset: u64,
        size: u64,
        name: String,
    },
}

#[derive(PartialEq)]
enum State {
    Running,
    Ended,
    Failed,
}

/// The stream: an iterator of frames, ending with `End` (or with the first error).
pub struct Frames {
    repo: Indexed,
    raw: BlobReader,
    cfg: RepositoryConfig,
    repository: String,
    backup: BackupId,
    tally: Tally,
    queue: std::collections::VecDeque<Frame>,
    stack: Vec<Step>,
    /// Files with several names: (device, inode) to the link number of their first name.
    links: HashMap<(u64, u64), u64>,
    started: Instant,
    state: State,
}

impl Frames {
    fn push(&mut self, f: Frame) {
        self.tally.add(&f);
        self.queue.push_back(f);
    }

    /// Queues a directory's frames to come: `Dir` (not for the root), its entries, `Leave`.
    fn open_dir(&mut self, node: &Node, name: Option<&[u8]>) -> Result<(), StorageError> {
        let sub = node.subtree.ok_or_else(|| {
            self.cfg
                .error(RusticFailure::data_loss(format!("directory {} has no tree", node.name)))
        })?;
        let tree = super::checked_tree(&self.repo, &self.cfg, sub, &self.raw)?;
        if let Some(n) = name {
            self.push(Frame::Dir { name: n.to_vec() });
        }
        self.stack.push(Step::Dir {
            nodes: tree.nodes.into_iter(),
            meta: meta_of(node),
            names: HashSet::new(),
        });
        Ok(())
    }

    /// A backup whose tree restic and cellar would never write: DATA_LOSS, before its entry is
    /// sent (the repository is corrupt, or written by someone else than cellar and restic).
    fn corrupt(&self, why: String) -> StorageError {
        StorageError::DataLoss(format!("backup {}: {why}", self.backup))
    }

    /// One entry of the directory on top of the stack.
    fn entry(&mut self, node: Node) -> Result<(), StorageError> {
        let name = node.name().as_encoded_bytes().to_vec();
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
            return Err(self.corrupt(format!(
                "an entry is named {:?}, which is not one path component",
                String::from_utf8_lossy(&name)
            )));
        }
        if let Some(Step::Dir { names, .. }) = self.stack.last_mut() {
            if !names.insert(name.clone()) {
                return Err(self.corrupt(format!(
                    "a directory holds two entries named {:?}",
                    String::from_utf8_lossy(&name)
                )));
            }
        }
        let meta = meta_of(&node);
        match &node.node_type {
            NodeType::Dir => self.open_dir(&node, Some(&name))?,
            NodeType::File => {
                let shown = String::from_utf8_lossy(&name).into_owned();
                let link = if node.meta.links > 1 {
                    let key = (node.meta.device_id, node.meta.inode);
                    if let Some(&n) = self.links.get(&key) {
                        self.push(Frame::HardLink { name, link: n });
                        return Ok(());
                    }
                    let n = self.links.len() as u64;
                    self.links.insert(key, n);
                    Some(n)
                } else {
                    None
                };
                self.push(Frame::File {
                    name,
                    meta,
                    size: node.meta.size,
                    link,
                });
                self.stack.push(Step::File {
                    blobs: node.content.clone().unwrap_or_default(),
                    next: 0,
                    offset: 0,
                    size: node.meta.size,
                    name: shown,
                });
            }
            NodeType::Symlink { .. } => {
                let target = node.node_type.to_link().as_os_str().as_encoded_bytes().to_vec();
                if target.is_empty() || target.contains(&0) {
                    return Err(self.corrupt(format!(
                        "symlink {:?} has an empty target or one with a NUL byte",
                        String::from_utf8_lossy(&name)
                    )));
                }
                self.push(Frame::Symlink { name, target, meta });
            }
            NodeType::Dev { device } => self.special(name, libc::S_IFBLK, *device, meta),
            NodeType::Chardev { device } => self.special(name, libc::S_IFCHR, *device, meta),
            NodeType::Fifo => self.special(name, libc::S_IFIFO, 0, meta),
            NodeType::Socket => self.special(name, libc::S_IFSOCK, 0, meta),
        }
        Ok(())
    }

    fn special(&mut self, name: Vec<u8>, kind: u32, rdev: u64, meta: Meta) {
        let mode = kind | (meta.mode & 0o7777);
        self.push(Frame::Special { name, mode, rdev, meta });
    }

    /// The next blob of the file on top of the stack (`name`, `size` bytes), checked, as chunks
    /// (zeros left out).
    fn blob(&mut self, id: rustic_core::DataId, offset: u64, size: u64, name: &str) -> Result<u64, StorageError> {
        let data = super::checked_blob(&self.repo, &self.cfg, BlobId::from(id), BlobType::Data, &self.raw)?;
        if data.len() as u64 > size.saturating_sub(offset) {
            return Err(self.corrupt(format!("file {name:?} is {size} bytes but its blobs hold more")));
        }
        crate::metrics::record_backup_bytes(&self.repository, "restored", data.len() as u64);
        for (start, end) in data_runs(&data) {
            let (at, piece) = (offset + start as u64, &data[start..end]);
            self.push(Frame::Chunk {
                offset: at,
                data: piece.to_vec(),
                checksum: chunk_checksum(at, piece),
            });
        }
        Ok(data.len() as u64)
    }

    /// Queues at least one more frame, or ends the stream.
    fn advance(&mut self) -> Result<(), StorageError> {
        while self.queue.is_empty() {
            let Some(top) = self.stack.last_mut() else {
                let end = std::mem::take(&mut self.tally).end();
                self.queue.push_back(end);
                self.state = State::Ended;
                crate::metrics::record_backup_end(&self.repository, "restore", true, self.started.elapsed());
                return Ok(());
            };
            match top {
                Step::File {
                    blobs,
                    next,
                    offset,
                    size,
                    name,
                } => {
                    if *next == blobs.len() {
                        if *offset != *size {
                            let why = format!("file {name:?} is {size} bytes but its blobs hold {offset}");
                            return Err(self.corrupt(why));
                        }
                        self.stack.pop();
                        continue;
                    }
                    let (id, at, size, name) = (blobs[*next], *offset, *size, name.clone());
                    *next += 1;
                    let len = self.blob(id, at, size, &name)?;
                    if let Some(Step::File { offset, .. }) = self.stack.last_mut() {
                        *offset += len;
                    }
                }
                Step::Dir { nodes, meta, .. } => match nodes.next() {
                    Some(node) => self.entry(node)?,
                    None => {
                        let meta = std::mem::take(meta);
                        self.stack.pop();
                        self.push(Frame::Leave { meta });
                    }
                },
            }
        }
        Ok(())
    }
}

impl Iterator for Frames {
    type Item = Result<Frame, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(f) = self.queue.pop_front() {
            return Some(Ok(f));
        }
        if self.state != State::Running {
            return None;
        }
        match self.advance() {
            Ok(()) => self.queue.pop_front().map(Ok),
            Err(e) => {
                self.state = State::Failed;
                crate::metrics::record_backup_end(&self.repository, "restore", false, self.started.elapsed());
                Some(Err(e))
            }
        }
    }
}

/// How many frames [`read_ahead`] keeps ready: at most this many chunks of [`CHUNK_BYTES`] wait.
const READ_AHEAD_FRAMES: usize = 16;

/// The same frames, read, decrypted and checked on a thread of their own, so that the repository's
/// reads and hashes overlap with the import that writes them (restic restores with parallel
/// workers too). Dropping the iterator early (an import that fails) ends the thread at its next
/// frame; the stream ends after its first error, as [`Frames`] does.
pub fn read_ahead(frames: Frames) -> Result<ReadAhead, StorageError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD_FRAMES);
    std::thread::Builder::new()
        .name("backup-restore".into())
        .spawn(move || {
            for f in frames {
                if tx.send(f).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| StorageError::Unavailable(format!("cannot start the restore's reader thread: {e}")))?;
    Ok(ReadAhead { rx })
}

/// The receiving end of [`read_ahead`].
pub struct ReadAhead {
    rx: std::sync::mpsc::Receiver<Result<Frame, StorageError>>,
}

impl Iterator for ReadAhead {
    type Item = Result<Frame, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// The block size below which zeros are written rather than left as a hole.
const HOLE_BLOCK: usize = 4096;

/// The runs of `data` that hold something other than zeros, in blocks of [`HOLE_BLOCK`] and
/// pieces of at most [`CHUNK_BYTES`]: what is sent; the zeros between stay holes.
fn data_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in data.chunks(HOLE_BLOCK).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * HOLE_BLOCK, i * HOLE_BLOCK + block.len());
        match runs.last_mut() {
            Some(r) if r.1 == start && end - r.0 <= CHUNK_BYTES => r.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// restic keeps Go's file mode (type bits high, set-id and sticky apart); cellar's trees keep
/// the permission bits with set-id and sticky as `st_mode & 0o7777` has them.
fn unix_mode(go: u32) -> u32 {
    const GO_SETUID: u32 = 1 << 23;
    const GO_SETGID: u32 = 1 << 22;
    const GO_STICKY: u32 = 1 << 20;
    let mut m = go & 0o777;
    if go & GO_SETUID != 0 {
        m |= libc::S_ISUID;
    }
    if go & GO_SETGID != 0 {
        m |= libc::S_ISGID;
    }
    if go & GO_STICKY != 0 {
        m |= libc::S_ISVTX;
    }
    m
}

fn meta_of(node: &Node) -> Meta {
    let m = &node.meta;
    let time = |t: Option<rustic_core::jiff::Timestamp>| {
        t.map_or((0, 0), |t| (t.as_second(), i64::from(t.subsec_nanosecond())))
    };
    Meta {
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
        mode: m.mode.map_or(0o644, unix_mode),
        atime: time(m.atime.or(m.mtime)),
        mtime: time(m.mtime),
        xattrs: m
            .extended_attributes
            .iter()
            .map(|x| (x.name.as_bytes().to_vec(), x.value.clone().unwrap_or_default()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn zeros_stay_holes_and_data_is_cut_into_bounded_runs() {
        let mut d = vec![0u8; 3 * CHUNK_BYTES];
        d[5000] = 1; // block 1
        d[9000] = 2; // block 2, adjacent: one run
        d[CHUNK_BYTES + 10] = 3;
        assert_eq!(data_runs(&d), vec![(4096, 12288), (CHUNK_BYTES, CHUNK_BYTES + 4096)]);
        let full = vec![7u8; 2 * CHUNK_BYTES + 100];
        let runs = data_runs(&full);
        assert_eq!(
            runs,
            vec![
                (0, CHUNK_BYTES),
                (CHUNK_BYTES, 2 * CHUNK_BYTES),
                (2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 100)
            ]
        );
        assert!(data_runs(&[0u8; 10000]).is_empty());
    }

    use crate::backup::{image, TAG_KEY};
    use crate::storage::id::PoolName;
    use rustic_core::repofile::{Metadata, Tree};
    use rustic_core::SnapshotOptions;

    /// A repository (with its key) holding, as backup `key`, a `dir` tree whose `/volume` has
    /// `nodes`, and `data` as blobs.
    fn hostile_backup(backups: &Backups, key: &str, data: &[Vec<u8>], nodes: Vec<Node>) -> BackupId {
        let name = PoolName::parse("offsite").unwrap();
        let opened = backups.open_or_init(&name, true).unwrap();
        let master = opened.key();
        let be = backups.write_backend(&name, None).unwrap();
        let inner = Tree { nodes };
        let (_, inner_id) = inner.serialize().unwrap();
        let mut volume = Node::new_node(std::ffi::OsStr::new("volume"), NodeType::Dir, Metadata::default());
        volume.subtree = Some(inner_id);
        let root = Tree { nodes: vec![volume] };
        let ids =
            image::store(be.clone(), &master, data, &[inner, root]).unwrap_or_else(|e| panic!("store: {}", e.text));
        let meta = crate::backup::testing::dir_meta(&format!("snap-{key}"));
        let mut snap = SnapshotOptions::default()
            .add_tags(&format!("{TAG_KEY}{key}"))
            .and_then(|o| o.description(serde_json::to_string(&meta).unwrap()).to_snapshot())
            .unwrap();
        snap.tree = ids[1];
        image::write_snapshot(&*be, &master, &mut snap).unwrap_or_else(|e| panic!("snapshot: {}", e.text));
        BackupId::new(name, key).unwrap()
    }

    fn file(name: &str, size: u64, content: &[Vec<u8>]) -> Node {
        let meta = Metadata {
            size,
            links: 1,
            ..Metadata::default()
        };
        let mut n = Node::new_node(std::ffi::OsStr::new(name), NodeType::File, meta);
        n.content = Some(
            content
                .iter()
                .map(|d| rustic_core::DataId::from(rustic_core::Id::new(Sha256::digest(d).into())))
                .collect(),
        );
        n
    }

    /// A tree's MAC proves only that the repository's key sealed it. Whoever can write the storage
    /// (no key) swaps two sealed trees of one length in their packs: without a check of each tree
    /// against its id the restore answered OK with `a/` and `b/` exchanged (or, the same way,
    /// another backup's directory under this one's name).
    #[test]
    fn a_tree_swapped_in_its_pack_is_data_loss() {
        let found = (0..200u32).find_map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let (backups, _) = crate::backup::testing::backups(dir.path());
            let (one, other) = (b"1111".to_vec(), format!("{i:04}").into_bytes());
            let sub = |content: &Vec<u8>| Tree {
                nodes: vec![file("x", 4, std::slice::from_ref(content))],
            };
            let (ta, tb) = (sub(&one), sub(&other));
            let (_, a_id) = ta.serialize().unwrap();
            let (_, b_id) = tb.serialize().unwrap();
            let named_dir = |name: &str, id| {
                let mut d = Node::new_node(std::ffi::OsStr::new(name), NodeType::Dir, Metadata::default());
                d.subtree = Some(id);
                d
            };
            let id = hostile_backup(
                &backups,
                "dddd-0004",
                &[one.clone(), other.clone()],
                vec![named_dir("a", a_id), named_dir("b", b_id)],
            );
            // The subtrees are stored as extra trees of the backup.
            let name = PoolName::parse("offsite").unwrap();
            let opened = backups.open(&name).unwrap();
            let master = opened.key();
            let be = backups.write_backend(&name, None).unwrap();
            image::store(be, &master, &[], &[ta, tb]).unwrap_or_else(|e| panic!("store: {}", e.text));
            let repo = backups.open(&name).unwrap().to_indexed().unwrap();
            let (ea, eb) = (
                repo.get_index_entry(&a_id).unwrap(),
                repo.get_index_entry(&b_id).unwrap(),
            );
            (ea.location.length == eb.location.length).then_some((dir, id, ea, eb))
        });
        let (dir, id, ea, eb) = found.expect("two sealed trees of one length");
        // The edit needs no key: bytes moved within the packs.
        let pack = |hex: &str| dir.path().join("repo/data").join(&hex[..2]).join(hex);
        let (pa, pb) = (pack(ea.pack.to_hex().as_str()), pack(eb.pack.to_hex().as_str()));
        let len = ea.location.length as usize;
        let (oa, ob) = (ea.location.offset as usize, eb.location.offset as usize);
        let mut a = std::fs::read(&pa).unwrap();
        let xa = a[oa..oa + len].to_vec();
        if pa == pb {
            let xb = a[ob..ob + len].to_vec();
            a[oa..oa + len].copy_from_slice(&xb);
            a[ob..ob + len].copy_from_slice(&xa);
            std::fs::write(&pa, &a).unwrap();
        } else {
            let mut b = std::fs::read(&pb).unwrap();
            let xb = b[ob..ob + len].to_vec();
            a[oa..oa + len].copy_from_slice(&xb);
            b[ob..ob + len].copy_from_slice(&xa);
            std::fs::write(&pa, &a).unwrap();
            std::fs::write(&pb, &b).unwrap();
        }
        let (fresh, _) = crate::backup::testing::backups(dir.path());
        // An upload taking this backup as its parent checks its trees first, as rustic does not.
        let name = PoolName::parse("offsite").unwrap();
        let opened = fresh.open(&name).unwrap();
        let snap = fresh
            .snapshots(&name, &opened)
            .unwrap()
            .into_iter()
            .find(|s| s.tags.iter().any(|t| t == &format!("{TAG_KEY}{}", id.key())))
            .expect("the backup");
        let repo = opened.to_indexed_ids().unwrap();
        match crate::backup::trees_check(&repo, fresh.config(&name).unwrap(), snap.tree) {
            Err(StorageError::DataLoss(m)) => assert!(m.contains("does not match its id"), "{m}"),
            other => panic!("a parent with swapped trees would be used: {other:?}"),
        }
        match frames(&fresh, &id, Layout::Dir).and_then(|f| f.collect::<Result<Vec<Frame>, _>>()) {
            Err(StorageError::DataLoss(m)) => assert!(m.contains("does not match its id"), "{m}"),
            Err(e) => panic!("want DATA_LOSS, got {e:?}"),
            Ok(frames) => panic!("swapped trees were restored: {} frames", frames.len()),
        }
    }

    #[test]
    fn a_backup_whose_tree_restic_would_not_write_is_data_loss_before_any_entry_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _) = crate::backup::testing::backups(dir.path());
        let blob = b"four".to_vec();
        let data = vec![blob.clone()];
        let named = |n: &str| {
            let mut f = file("x", 4, std::slice::from_ref(&blob));
            f.name = n.to_string();
            f
        };
        let cases: Vec<(&str, Vec<Node>)> = vec![
            // Names that are not one path component: the writer refuses them too, but as an
            // internal error (retried), not as the repository's corruption.
            ("a1", vec![named("../../etc/cron.d/x")]),
            ("a2", vec![named("..")]),
            ("a3", vec![named("with\0nul")]),
            ("a4", vec![named("")]),
            // A file whose blobs hold fewer bytes than its size: it would be restored padded with
            // zeros, and the restore answer OK.
            ("b1", vec![file("short", 10, std::slice::from_ref(&blob))]),
            // More bytes than its size.
            ("b2", vec![file("long", 2, std::slice::from_ref(&blob))]),
            // Two entries of one name.
            ("c1", vec![named("same"), named("same")]),
        ];
        for (key, nodes) in cases {
            let id = hostile_backup(&backups, key, &data, nodes);
            let got: Result<Vec<Frame>, StorageError> = frames(&backups, &id, Layout::Dir).and_then(|f| f.collect());
            match got {
                Err(StorageError::DataLoss(m)) => assert!(m.contains(&id.to_string()), "{key}: {m}"),
                other => panic!("{key}: want DATA_LOSS, got {:?}", other.map(|f| f.len())),
            }
        }
        // The same tree with a sound file restores.
        let id = hostile_backup(&backups, "d1", &data, vec![file("ok", 4, std::slice::from_ref(&blob))]);
        let all: Vec<Frame> = frames(&backups, &id, Layout::Dir)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(all
            .iter()
            .any(|f| matches!(f, Frame::File { name, size: 4, .. } if name == b"ok")));
    }

    /// A data blob that decompresses past what any writer's chunk holds (restic's and rustic's
    /// are at most 8 MiB, cellar's 512 KiB) is DATA_LOSS, before it is decompressed: one blob
    /// of a few KiB sealed with the key could otherwise expand to GiBs in the node's memory.
    #[test]
    fn a_data_blob_larger_than_any_chunk_is_data_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _) = crate::backup::testing::backups(dir.path());
        let big = vec![vec![0u8; 32 << 20]];
        let id = hostile_backup(&backups, "b0b0-0001", &big, vec![file("big", 32 << 20, &big)]);
        match frames(&backups, &id, Layout::Dir).and_then(|f| f.collect::<Result<Vec<Frame>, _>>()) {
            Err(StorageError::DataLoss(m)) => assert!(m.contains("decompresses to"), "{m}"),
            other => panic!("want DATA_LOSS, got {:?}", other.map(|f| f.len())),
        }
    }

    /// A blob whose index entry says 4 KiB but whose stored stream expands to 2 GiB is refused
    /// once it passes 4 KiB: rustic decompressed it whole (into memory) before it compared the
    /// lengths.
    #[test]
    fn a_blob_expanding_past_its_indexed_length_is_refused_within_that_length() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _) = crate::backup::testing::backups(dir.path());
        let name = PoolName::parse("offsite").unwrap();
        let key = backups.open_or_init(&name, true).unwrap().key();
        let be = backups.write_backend(&name, None).unwrap();
        let small = vec![0u8; 4096];
        let blob: [u8; 32] = Sha256::digest(&small).into();
        image::store_bomb(be, &key, blob, 4096, 2 << 30, false).unwrap_or_else(|e| panic!("store: {}", e.text));
        let mut node = file("bomb", 4096, &[]);
        node.content = Some(vec![rustic_core::DataId::from(rustic_core::Id::new(blob))]);
        let id = hostile_backup(&backups, "b0b0-0002", &[], vec![node]);
        // The refusal is the bounded decompression's (rustic's own read would have decompressed
        // the 2 GiB whole and only then compared the lengths, answering something else): the
        // blob is read no further than the 4 KiB its index entry claims.
        match frames(&backups, &id, Layout::Dir).and_then(|f| f.collect::<Result<Vec<Frame>, _>>()) {
            Err(StorageError::DataLoss(m)) => {
                assert!(
                    m.contains("does not decompress to the 4096 bytes its index says"),
                    "{m}"
                )
            }
            other => panic!("want DATA_LOSS, got {:?}", other.map(|f| f.len())),
        }
    }

    /// A tree blob that expands past what any tree holds, read by rustic itself (`get_tree`: an
    /// upload's parent, and cellar's check of that parent's trees), is refused once its
    /// decompression passes the bound, counted before rustic decompresses it whole into memory
    /// (rustic would hold all 600 MiB, then find the length wrong).
    #[test]
    fn a_tree_blob_rustic_reads_is_refused_once_it_expands_past_any_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _) = crate::backup::testing::backups(dir.path());
        let name = PoolName::parse("offsite").unwrap();
        let opened = backups.open_or_init(&name, true).unwrap();
        let be = backups.write_backend(&name, None).unwrap();
        let tree: [u8; 32] = Sha256::digest(b"a tree that is not there").into();
        let past = u64::from(crate::backup::MAX_TREE_BLOB_BYTES) + (64 << 20);
        image::store_bomb(be, &opened.key(), tree, 4096, past, true).unwrap_or_else(|e| panic!("store: {}", e.text));
        let opened = backups.open(&name).unwrap();
        let repo = opened.to_indexed_ids().unwrap();
        let root = rustic_core::TreeId::from(rustic_core::Id::new(tree));
        match crate::backup::trees_check(&repo, backups.config(&name).unwrap(), root) {
            Err(e) => assert!(e.to_string().contains("expands to more than"), "{e}"),
            Ok(n) => panic!("a tree of {past} bytes read ({n} trees)"),
        }
    }

    /// A pack the index names that is gone from the repository is lost data, not a backend to
    /// wait for: DATA_LOSS, whether it held the data or the tree (UNAVAILABLE and
    /// FAILED_PRECONDITION before, retried for ever).
    #[test]
    fn a_missing_pack_is_data_loss() {
        for lost in ["data", "tree"] {
            let dir = tempfile::tempdir().unwrap();
            let (backups, name) = crate::backup::testing::backups(dir.path());
            backups.open_or_init(&name, true).unwrap();
            let data = dir.path().join("data");
            std::fs::create_dir(&data).unwrap();
            let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(data.join("f"), &content).unwrap();
            let id = BackupId::new(name.clone(), "5555-eeee").unwrap();
            let meta = crate::backup::testing::dir_meta("lost");
            let info = crate::backup::upload::upload(&backups, &id, &meta, &data, None, &Default::default()).unwrap();
            let repo = backups.open(&name).unwrap().to_indexed().unwrap();
            let pack = if lost == "data" {
                let blob = rustic_core::DataId::from(rustic_core::Id::new(Sha256::digest(&content).into()));
                repo.get_index_entry(&blob).unwrap().pack
            } else {
                let snap = backups
                    .snapshots(&name, &backups.open(&name).unwrap())
                    .unwrap()
                    .into_iter()
                    .find(|s| s.id.to_string() == info.snapshot)
                    .unwrap();
                repo.get_index_entry(&snap.tree).unwrap().pack
            };
            let hex = pack.to_hex();
            std::fs::remove_file(dir.path().join("repo/data").join(&hex[..2]).join(hex.as_str())).unwrap();
            let got: Result<Vec<Frame>, StorageError> = frames(&backups, &id, Layout::Dir).and_then(|f| f.collect());
            match got {
                Err(StorageError::DataLoss(_)) => {}
                other => panic!("{lost} pack gone: want DATA_LOSS, got {:?}", other.map(|f| f.len())),
            }
            // The whole repository gone from view mid-restore (a share unmounted under it): the
            // repository cannot be reached, nothing is known lost.
            if lost == "data" {
                let f = frames(&backups, &id, Layout::Dir).unwrap();
                std::fs::rename(dir.path().join("repo"), dir.path().join("away")).unwrap();
                match f.collect::<Result<Vec<Frame>, StorageError>>() {
                    Err(StorageError::Unavailable(_)) => {}
                    other => panic!("repository gone: want UNAVAILABLE, got {:?}", other.map(|f| f.len())),
                }
            }
        }
    }

    #[test]
    fn go_modes_map_to_unix_permission_bits() {
        assert_eq!(unix_mode(0o755), 0o755);
        assert_eq!(
            unix_mode((1 << 31) | 0o700),
            0o700,
            "the directory bit is not a permission"
        );
        assert_eq!(unix_mode((1 << 23) | 0o4755 & 0o777), libc::S_ISUID | 0o755);
        assert_eq!(
            unix_mode((1 << 22) | (1 << 20) | 0o775),
            libc::S_ISGID | libc::S_ISVTX | 0o775
        );
    }

    /// A directory of many empty files, as rustic writes its tree: one blob of some 80 MiB of
    /// JSON that zstd stores in a few MiB, 20 times less. The restore must read it back: an honest
    /// writer makes such trees, and no ratio to the stored size bounds them (a bound of 16 times
    /// refused this one as DATA_LOSS after its backup had been checked complete).
    #[test]
    fn a_large_honest_tree_restores() {
        let dir = tempfile::tempdir().unwrap();
        let (backups, _) = crate::backup::testing::backups(dir.path());
        let count = 300_000;
        // Each entry with the metadata an upload records of a file, as rustic writes it.
        let at = rustic_core::jiff::Timestamp::new(1_796_000_000, 0).unwrap();
        let nodes: Vec<Node> = (0..count)
            .map(|i| {
                let mut n = file(&format!("img_{i:07}.jpg"), 0, &[]);
                n.meta.mode = Some(0o100644);
                (n.meta.mtime, n.meta.atime, n.meta.ctime) = (Some(at), Some(at), Some(at));
                (n.meta.uid, n.meta.gid) = (Some(1000), Some(1000));
                (n.meta.user, n.meta.group) = (Some("app".into()), Some("app".into()));
                (n.meta.inode, n.meta.device_id) = (1_000_000 + i as u64, 2049);
                n
            })
            .collect();
        let (json, _) = Tree { nodes: nodes.clone() }.serialize().unwrap();
        let stored = zstd::bulk::compress(&json, 3).unwrap().len();
        assert!(
            json.len() > 64 << 20 && json.len() > 16 * stored,
            "{} bytes stored in {stored}",
            json.len()
        );
        let id = hostile_backup(&backups, "aaaa-0001", &[], nodes);
        let files = frames(&backups, &id, Layout::Dir)
            .and_then(|f| f.collect::<Result<Vec<Frame>, _>>())
            .unwrap_or_else(|e| panic!("the restore of an honest backup fails: {e}"))
            .into_iter()
            .filter(|f| matches!(f, Frame::File { .. }))
            .count();
        assert_eq!(files, count);
    }
}
