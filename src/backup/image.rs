//! An image volume's backup, written by cellar itself in the restic repository format (version 2),
//! so that a second backup reads only what changed since the first.
//!
//! rustic's archiver reads and chunks a whole file whenever its metadata changed, and an image
//! snapshot is a new file each time: a 1 GiB volume with 1% changed was read and chunked whole
//! again. Here the image is cut into fixed chunks of [`CHUNK`] bytes at fixed offsets, so chunk
//! `i` of the new backup can take blob `i` of its parent's list unread whenever changed block
//! tracking (`storage::cbt`, from the snapshots' extents) says nothing in it changed since the
//! parent's snapshot. Chunks that lie wholly in a hole are never read: they are the zero blob.
//! Everything else is read, hashed (SHA-256, the blob's id), and written only when the repository
//! does not hold that blob yet.
//!
//! The files written are restic's own (its `doc/design.rst`): blobs are zstd-compressed when that
//! makes them smaller, then encrypted with the repository's master key (AES-256-CTR with a random
//! IV, then Poly1305-AES over the ciphertext); a pack is its encrypted blobs, its encrypted header
//! (per blob: type, encrypted length, plaintext length when compressed, id) and the header's
//! length; an index file lists the packs' blobs; the snapshot file is written through rustic. The
//! packs and the index are written before the snapshot, so a snapshot never names a blob the
//! repository lacks; a crash before it leaves packs no index or snapshot names, which a prune
//! removes. `restic check --read-data` and `restic restore` read these backups like their own.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use aes256ctr_poly1305aes::aead::AeadInPlace;
use aes256ctr_poly1305aes::Aes256CtrPoly1305Aes;
use rustic_core::repofile::{MasterKey, Metadata, Node, NodeType, Tree};
use rustic_core::{DataId, FileType, Id, IndexedFullStatus, Repository, TreeId, WriteBackend};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::RusticFailure;

/// The size of every chunk but the last (which is what is left of the image).
pub const CHUNK: u64 = 512 * 1024;

/// A pack is closed once its blobs reach this size (restic's default minimum).
const PACK_BYTES: usize = 16 << 20;

/// zstd's level for blobs (rustic's default); a blob it does not shrink is stored as it is.
const ZSTD_LEVEL: i32 = 3;

/// The chunks the reader may have handed on before the writer takes them (bounded memory).
const QUEUE: usize = 8;

type Indexed = Repository<IndexedFullStatus>;

/// What the new backup may take from its parent unread.
pub struct Parent {
    /// The parent's blobs, chunk by chunk (its image was cut at [`CHUNK`]).
    pub blobs: Vec<DataId>,
    /// The parent image's length.
    pub length: u64,
    /// For each chunk of the new image: whether anything in it may differ from the parent's.
    pub changed: Vec<bool>,
}

impl Parent {
    /// Marks the chunks `ranges` (byte `(offset, length)` pairs) touch as changed, out of an image
    /// of `length` bytes; every chunk starts unchanged.
    pub fn changed_chunks(length: u64, ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<bool> {
        let mut changed = vec![false; chunks_of(length)];
        for (off, len) in ranges {
            if len == 0 || off >= length {
                continue;
            }
            let first = (off / CHUNK) as usize;
            let last = ((off.saturating_add(len).min(length) - 1) / CHUNK) as usize;
            for c in &mut changed[first..=last] {
                *c = true;
            }
        }
        changed
    }

    /// The parent's blob for chunk `i` of a new image `length` bytes long, when it may be taken:
    /// unchanged, and the same span in both images.
    fn blob(&self, i: usize, length: u64) -> Option<&DataId> {
        let (start, end) = span(i, length);
        let same_span = end <= self.length && (end - start == CHUNK || end == self.length);
        if self.changed.get(i).copied().unwrap_or(true) || !same_span {
            return None;
        }
        self.blobs.get(i)
    }
}

/// How many chunks an image of `length` bytes has.
pub fn chunks_of(length: u64) -> usize {
    length.div_ceil(CHUNK) as usize
}

fn span(i: usize, length: u64) -> (u64, u64) {
    let start = i as u64 * CHUNK;
    (start, (start + CHUNK).min(length))
}

/// What one image backup wrote.
pub struct Written {
    pub tree: TreeId,
    /// Bytes of the image read from disk (holes and chunks taken from the parent are not).
    pub read: u64,
    /// Bytes of blobs the repository did not hold (before compression).
    pub added: u64,
    pub chunks: u64,
    pub reused: u64,
}

/// Writes the image at `data` as the single file `name` of a new tree into the repository and
/// returns that tree. `repo` is the repository's index as it was before (what it holds is not
/// written again); `be` and `key` write and seal the new files. Once `stop` is pulled it stops
/// at the next chunk, also through chunks the repository holds (which write nothing, so the
/// backend's refusal alone would not end it).
pub fn write(
    repo: &Indexed,
    be: Arc<dyn WriteBackend>,
    key: &MasterKey,
    data: &Path,
    name: &str,
    parent: Option<&Parent>,
    stop: &super::upload::Stop,
) -> Result<Written, RusticFailure> {
    let io = |what: &str, e: std::io::Error| RusticFailure::io(format!("{what} {}: {e}", data.display()));
    let file = File::open(data).map_err(|e| io("open", e))?;
    let md = file.metadata().map_err(|e| io("stat", e))?;
    let length = md.len();
    let sealer = Sealer::new(key)?;
    let held = |id: &[u8; 32]| repo.get_index_entry(&DataId::from(Id::new(*id))).is_ok();

    let (tx, rx) = mpsc::sync_channel::<([u8; 32], Vec<u8>)>(QUEUE);
    let writer_be = be.clone();
    let writer_sealer = sealer.clone();
    let writer = std::thread::Builder::new()
        .name("cellar-pack".into())
        .spawn(move || -> Result<Packs, RusticFailure> {
            let mut packs = Packs::new(writer_be, writer_sealer, false);
            for (id, blob) in rx {
                packs.add(id, &blob)?;
            }
            packs.flush()?;
            Ok(packs)
        })
        .map_err(|e| RusticFailure::io(format!("start the pack writer: {e}")))?;

    let mut content = Vec::with_capacity(chunks_of(length));
    let (mut read, mut added, mut reused) = (0u64, 0u64, 0u64);
    let mut sent = std::collections::HashSet::new();
    let mut zero: Option<[u8; 32]> = None;
    let mut buf = vec![0u8; CHUNK as usize];
    let fed = (|| -> Result<(), RusticFailure> {
        for i in 0..chunks_of(length) {
            if stop.pulled() {
                return Err(RusticFailure::io("the upload was called off".to_string()));
            }
            if let Some(b) = parent.and_then(|p| p.blob(i, length)) {
                if repo.get_index_entry(b).is_ok() {
                    content.push(*b);
                    reused += 1;
                    continue;
                }
            }
            let (start, end) = span(i, length);
            let len = (end - start) as usize;
            let chunk = &mut buf[..len];
            let id = if is_hole(&file, start, end) && len == CHUNK as usize {
                chunk.fill(0);
                *zero.get_or_insert_with(|| Sha256::digest(&*chunk).into())
            } else {
                file.read_exact_at(chunk, start).map_err(|e| io("read", e))?;
                read += len as u64;
                Sha256::digest(&*chunk).into()
            };
            if !held(&id) && sent.insert(id) {
                added += len as u64;
                if tx.send((id, chunk.to_vec())).is_err() {
                    break; // the writer failed: its error is the one to report
                }
            }
            content.push(DataId::from(Id::new(id)));
        }
        Ok(())
    })();
    drop(tx);
    let packs = writer
        .join()
        .map_err(|_| RusticFailure::io("the pack writer panicked".to_string()))?;
    fed?;
    let mut packs = packs?;
    if content.len() != chunks_of(length) {
        return Err(RusticFailure::io("the pack writer stopped early".to_string()));
    }

    let mut meta = Metadata {
        mode: Some(md.mode() & 0o777),
        uid: Some(md.uid()),
        gid: Some(md.gid()),
        size: length,
        links: 1,
        ..Metadata::default()
    };
    meta.mtime = rustic_core::jiff::Timestamp::new(md.mtime(), md.mtime_nsec() as i32).ok();
    let mut node = Node::new_node(std::ffi::OsStr::new(name), NodeType::File, meta);
    node.content = Some(content);
    let (bytes, _) = Tree { nodes: vec![node] }
        .serialize()
        .map_err(|e| RusticFailure::io(format!("serialise the tree: {e}")))?;
    let tree_id: [u8; 32] = Sha256::digest(&bytes).into();
    let mut trees = Packs::new(be.clone(), sealer.clone(), true);
    if repo.get_index_entry(&TreeId::from(Id::new(tree_id))).is_err() {
        trees.add(tree_id, &bytes)?;
        trees.flush()?;
    }
    let mut listed = std::mem::take(&mut packs.written);
    listed.append(&mut trees.written);
    if !listed.is_empty() {
        write_index(&*be, &sealer, listed)?;
    }
    let chunks = chunks_of(length) as u64;
    Ok(Written {
        tree: TreeId::from(Id::new(tree_id)),
        read,
        added,
        chunks,
        reused,
    })
}

/// Whether `[start, end)` of the file holds no data (a hole, or past the data's end).
fn is_hole(file: &File, start: u64, end: u64) -> bool {
    // lseek moves only the file offset, which the reads (pread) do not use.
    match nix::unistd::lseek(file, start as libc::off_t, nix::unistd::Whence::SeekData) {
        Ok(next) => next as u64 >= end,
        // ENXIO: no data at or after `start`. Anything else: read it.
        Err(e) => e == nix::errno::Errno::ENXIO,
    }
}

/// Seals files and blobs with the repository's master key (and opens them).
#[derive(Clone)]
pub(crate) struct Sealer(Arc<Aes256CtrPoly1305Aes>);

impl Sealer {
    pub(crate) fn new(key: &MasterKey) -> Result<Sealer, RusticFailure> {
        if key.encrypt.len() != 32 || key.mac.k.len() != 16 || key.mac.r.len() != 16 {
            return Err(RusticFailure::io(
                "the repository's master key has an unexpected shape".to_string(),
            ));
        }
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&key.encrypt);
        raw[32..48].copy_from_slice(&key.mac.k);
        raw[48..].copy_from_slice(&key.mac.r);
        let cipher = Aes256CtrPoly1305Aes::new(aes256ctr_poly1305aes::Key::from_slice(&raw));
        Ok(Sealer(Arc::new(cipher)))
    }

    /// IV, ciphertext, MAC.
    pub(crate) fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, RusticFailure> {
        let mut out = Vec::with_capacity(plain.len() + 32);
        let mut iv = [0u8; 16];
        getrandom::fill(&mut iv).map_err(|e| RusticFailure::io(format!("random IV: {e}")))?;
        out.extend_from_slice(&iv);
        out.extend_from_slice(plain);
        let tag = self
            .0
            .encrypt_in_place_detached((&iv).into(), &[], &mut out[16..])
            .map_err(|_| RusticFailure::io("encryption failed".to_string()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// What `sealed` (IV, ciphertext, MAC) holds, if its MAC checks under this key.
    pub(crate) fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 32 {
            return None;
        }
        let (iv, rest) = sealed.split_at(16);
        let (ciphertext, tag) = rest.split_at(rest.len() - 16);
        let mut plain = ciphertext.to_vec();
        self.0
            .decrypt_in_place_detached(iv.into(), &[], &mut plain, tag.into())
            .ok()?;
        Some(plain)
    }
}

/// Writes `snap` as a snapshot file (JSON, compressed, sealed) and sets its id, the SHA-256 of
/// what is stored. Its tree and every blob below must be in the repository's index already.
pub fn write_snapshot(
    be: &dyn WriteBackend,
    key: &MasterKey,
    snap: &mut rustic_core::repofile::SnapshotFile,
) -> Result<(), RusticFailure> {
    snap.id = Default::default();
    let json = serde_json::to_vec(&*snap).map_err(|e| RusticFailure::io(format!("snapshot: {e}")))?;
    let id = write_file(be, &Sealer::new(key)?, FileType::Snapshot, &json)?;
    snap.id = id.into();
    Ok(())
}

/// One blob of a pack as the index lists it.
#[derive(Serialize)]
struct IndexBlob {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    offset: u32,
    length: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    uncompressed_length: Option<u32>,
}

#[derive(Serialize)]
struct IndexPack {
    id: String,
    blobs: Vec<IndexBlob>,
    /// When the pack was written (RFC 3339), as rustic's packer records it: a prune keeps a
    /// pack younger than its `keep_pack`, and one with no time is never young.
    time: String,
}

#[derive(Serialize)]
struct IndexFile {
    packs: Vec<IndexPack>,
}

/// Packs of one blob type, filled and written in turn.
struct Packs {
    be: Arc<dyn WriteBackend>,
    sealer: Sealer,
    tree: bool,
    body: Vec<u8>,
    header: Vec<u8>,
    blobs: Vec<IndexBlob>,
    written: Vec<IndexPack>,
}

impl Packs {
    fn new(be: Arc<dyn WriteBackend>, sealer: Sealer, tree: bool) -> Packs {
        Packs {
            be,
            sealer,
            tree,
            body: Vec::new(),
            header: Vec::new(),
            blobs: Vec::new(),
            written: Vec::new(),
        }
    }

    fn add(&mut self, id: [u8; 32], plain: &[u8]) -> Result<(), RusticFailure> {
        let too_big = || RusticFailure::io("a blob larger than 4 GiB".to_string());
        let plain_len = u32::try_from(plain.len()).map_err(|_| too_big())?;
        let compressed =
            zstd::bulk::compress(plain, ZSTD_LEVEL).map_err(|e| RusticFailure::io(format!("zstd: {e}")))?;
        if compressed.len() < plain.len() {
            self.add_stored(id, &compressed, Some(plain_len))
        } else {
            self.add_stored(id, plain, None)
        }
    }

    /// Adds a blob as it is stored: zstd-compressed when `uncompressed` gives its plain length.
    fn add_stored(&mut self, id: [u8; 32], stored: &[u8], uncompressed: Option<u32>) -> Result<(), RusticFailure> {
        let too_big = || RusticFailure::io("a blob larger than 4 GiB".to_string());
        let sealed = self.sealer.seal(stored)?;
        let length = u32::try_from(sealed.len()).map_err(|_| too_big())?;
        // Types: 0 data, 1 tree, 2 compressed data, 3 compressed tree.
        self.header
            .push(u8::from(self.tree) + if uncompressed.is_some() { 2 } else { 0 });
        self.header.extend_from_slice(&length.to_le_bytes());
        if let Some(n) = uncompressed {
            self.header.extend_from_slice(&n.to_le_bytes());
        }
        self.header.extend_from_slice(&id);
        self.blobs.push(IndexBlob {
            id: hex::encode(id),
            kind: if self.tree { "tree" } else { "data" },
            offset: u32::try_from(self.body.len()).map_err(|_| too_big())?,
            length,
            uncompressed_length: uncompressed,
        });
        self.body.extend_from_slice(&sealed);
        if self.body.len() >= PACK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the pack being filled (if it holds anything) under the SHA-256 of its bytes.
    fn flush(&mut self) -> Result<(), RusticFailure> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let header = self.sealer.seal(&std::mem::take(&mut self.header))?;
        let mut pack = std::mem::take(&mut self.body);
        pack.extend_from_slice(&header);
        pack.extend_from_slice(&(header.len() as u32).to_le_bytes());
        let id: [u8; 32] = Sha256::digest(&pack).into();
        self.be
            .write_bytes(FileType::Pack, &Id::new(id), self.tree, pack.into())
            .map_err(RusticFailure::from)?;
        self.written.push(IndexPack {
            id: hex::encode(id),
            blobs: std::mem::take(&mut self.blobs),
            time: rustic_core::jiff::Timestamp::now().to_string(),
        });
        Ok(())
    }
}

/// Stores data blobs and trees (the trees in order, so that a later one may name an earlier one's
/// id) with an index, sealed with `key`: the empty tree of a deletion mark, and for tests a
/// repository holding what no backup cellar makes would hold.
pub(crate) fn store(
    be: Arc<dyn WriteBackend>,
    key: &MasterKey,
    data: &[Vec<u8>],
    trees: &[Tree],
) -> Result<Vec<TreeId>, RusticFailure> {
    let sealer = Sealer::new(key)?;
    let mut blobs = Packs::new(be.clone(), sealer.clone(), false);
    for d in data {
        blobs.add(Sha256::digest(d).into(), d)?;
    }
    blobs.flush()?;
    let mut packs = Packs::new(be.clone(), sealer.clone(), true);
    let mut ids = Vec::new();
    for t in trees {
        let (bytes, _) = t
            .serialize()
            .map_err(|e| RusticFailure::io(format!("serialise the tree: {e}")))?;
        let id: [u8; 32] = Sha256::digest(&bytes).into();
        packs.add(id, &bytes)?;
        ids.push(TreeId::from(Id::new(id)));
    }
    packs.flush()?;
    let mut listed = std::mem::take(&mut blobs.written);
    listed.append(&mut packs.written);
    write_index(&*be, &sealer, listed)?;
    Ok(ids)
}

/// For tests: stores one blob `id` (a tree blob if `tree`, else data) whose index entry (and
/// pack header) says it decompresses to `claimed` bytes, and whose stored zstd stream holds
/// `expands_to` zero bytes: what no writer makes, but anyone holding the key can.
#[cfg(test)]
pub(crate) fn store_bomb(
    be: Arc<dyn WriteBackend>,
    key: &MasterKey,
    id: [u8; 32],
    claimed: u32,
    expands_to: u64,
    tree: bool,
) -> Result<(), RusticFailure> {
    use std::io::Read;
    let failed = |e: std::io::Error| RusticFailure::io(format!("zstd: {e}"));
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(failed)?;
    std::io::copy(&mut std::io::repeat(0).take(expands_to), &mut enc).map_err(failed)?;
    let compressed = enc.finish().map_err(failed)?;
    let sealer = Sealer::new(key)?;
    let mut packs = Packs::new(be.clone(), sealer.clone(), tree);
    packs.add_stored(id, &compressed, Some(claimed))?;
    packs.flush()?;
    write_index(&*be, &sealer, std::mem::take(&mut packs.written))
}

/// The most blobs one index file lists, as rustic and restic split theirs: an image backup of
/// 1 TiB has two million chunks, and one file of them all expanded to some 300 MiB, past what a
/// reader takes of one file (`guard`).
const INDEX_BLOBS: usize = 50_000;

/// Writes the packs' index, in files of at most [`INDEX_BLOBS`] blobs. A crash between two files
/// leaves packs no file lists: the snapshot is written after the index, so the upload is made again.
fn write_index(be: &dyn WriteBackend, sealer: &Sealer, packs: Vec<IndexPack>) -> Result<(), RusticFailure> {
    let mut batch: Vec<IndexPack> = Vec::new();
    let mut blobs = 0;
    for pack in packs {
        if !batch.is_empty() && blobs + pack.blobs.len() > INDEX_BLOBS {
            write_index_file(be, sealer, std::mem::take(&mut batch))?;
            blobs = 0;
        }
        blobs += pack.blobs.len();
        batch.push(pack);
    }
    if !batch.is_empty() {
        write_index_file(be, sealer, batch)?;
    }
    Ok(())
}

fn write_index_file(be: &dyn WriteBackend, sealer: &Sealer, packs: Vec<IndexPack>) -> Result<(), RusticFailure> {
    let json = serde_json::to_vec(&IndexFile { packs }).map_err(|e| RusticFailure::io(format!("index: {e}")))?;
    write_file(be, sealer, FileType::Index, &json).map(drop)
}

/// Writes a JSON file of the repository (index, snapshot): zstd-compressed behind the version
/// byte 2, sealed, stored under the SHA-256 of what is stored, which is its id.
fn write_file(be: &dyn WriteBackend, sealer: &Sealer, tpe: FileType, json: &[u8]) -> Result<Id, RusticFailure> {
    let mut plain = vec![2u8];
    plain.extend(zstd::bulk::compress(json, ZSTD_LEVEL).map_err(|e| RusticFailure::io(format!("zstd: {e}")))?);
    let sealed = sealer.seal(&plain)?;
    let id = Id::new(Sha256::digest(&sealed).into());
    be.write_bytes(tpe, &id, true, sealed.into())
        .map_err(RusticFailure::from)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image backup's index is written in files of at most 50,000 blobs, as rustic's and
    /// restic's are: one file of all of a 1 TiB backup's two million chunks expanded past what a
    /// reader takes of one index file, which made the whole repository unreadable.
    #[test]
    fn an_index_is_written_in_files_of_at_most_50000_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = crate::backup::testing::backups(dir.path());
        let key = b.open_or_init(&name, true).unwrap().key();
        let be = b.write_backend(&name, None).unwrap();
        let before = be.list(FileType::Index).unwrap().len();
        let blob = |i: usize| IndexBlob {
            id: format!("{i:064x}"),
            kind: "data",
            offset: 0,
            length: 1,
            uncompressed_length: None,
        };
        // 3,200 packs of 32 blobs: 102,400 blobs, three files.
        let packs: Vec<IndexPack> = (0..3200)
            .map(|p| IndexPack {
                id: format!("{p:064x}"),
                blobs: (0..32).map(|i| blob(p * 32 + i)).collect(),
                time: String::new(),
            })
            .collect();
        let sealer = Sealer::new(&key).ok().expect("sealer");
        write_index(&*be, &sealer, packs).ok().expect("written");
        let files = be.list(FileType::Index).unwrap();
        assert_eq!(files.len() - before, 3, "102,400 blobs in files of at most 50,000");
        let mut listed = 0;
        for id in files {
            let sealed = be.read_full(FileType::Index, &id).unwrap();
            let plain = sealer.open(&sealed).expect("sealed with the key");
            let json = zstd::decode_all(&plain[1..]).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let n: usize = v["packs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["blobs"].as_array().unwrap().len())
                .sum();
            assert!(n <= INDEX_BLOBS, "{n} blobs in one file");
            listed += n;
        }
        assert_eq!(listed, 102_400, "every blob listed once");
    }

    #[test]
    fn changed_ranges_mark_every_chunk_they_touch_and_no_other() {
        let len = 4 * CHUNK + 100;
        assert_eq!(chunks_of(len), 5);
        let c = Parent::changed_chunks(len, [(CHUNK - 1, 2), (4 * CHUNK + 99, 1000)]);
        assert_eq!(c, vec![true, true, false, false, true]);
        assert_eq!(Parent::changed_chunks(len, [(0, 0), (len, 5)]), vec![false; 5]);
        assert_eq!(
            Parent::changed_chunks(len, [(2 * CHUNK, CHUNK)]),
            vec![false, false, true, false, false]
        );
    }

    /// An upload called off stops at its next chunk, also where it would write nothing (here a
    /// backend that refuses nothing: only the chunk loop's own look stops it).
    #[test]
    fn a_called_off_image_write_stops_at_its_next_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (b, name) = crate::backup::testing::backups(dir.path());
        let opened = b.open_or_init(&name, true).unwrap();
        let key = opened.key();
        let repo = opened.to_indexed().unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, vec![5u8; 4 * CHUNK as usize]).unwrap();
        let be = b.write_backend(&name, None).unwrap();
        let going = crate::backup::upload::Stop::default();
        let whole = write(&repo, be.clone(), &key, &image, "image", None, &going);
        assert!(whole.is_ok_and(|w| w.chunks == 4), "a write runs whole");
        let stop = crate::backup::upload::Stop::default();
        stop.pull();
        let e = write(&repo, be, &key, &image, "image", None, &stop)
            .err()
            .expect("a called-off write stops");
        assert!(e.text.contains("called off"), "{}", e.text);
    }

    #[test]
    fn a_parent_blob_is_taken_only_for_an_unchanged_chunk_of_the_same_span() {
        let blob = |n: u8| DataId::from(Id::new([n; 32]));
        let parent = Parent {
            blobs: vec![blob(0), blob(1), blob(2)],
            length: 2 * CHUNK + 10,
            changed: vec![false, true, false, false],
        };
        let grown = 3 * CHUNK + 5;
        assert_eq!(parent.blob(0, grown), Some(&blob(0)));
        assert_eq!(parent.blob(1, grown), None, "changed");
        assert_eq!(parent.blob(2, grown), None, "the parent's last chunk was shorter");
        assert_eq!(parent.blob(3, grown), None, "past the parent's end");
        assert_eq!(parent.blob(2, 2 * CHUNK + 10), Some(&blob(2)), "same short last chunk");
    }
}
