//! A volume's or snapshot's data as a stream of frames, for a restore or clone on another node.
//!
//! The source node turns its data into frames ([`export`]); the target node checks every frame
//! ([`Verifier`]) and builds the new volume from them in its pool's `.work` ([`Import`]). The
//! stream is, in order:
//!
//! - one [`Header`]: the source's layout, mode, capacity, filesystem size and (image) file length;
//! - `image`: [`Frame::Chunk`]s of the image file's data extents, at their offsets (holes are not
//!   sent, and stay holes);
//! - `dir`, `btrfs`: the tree's entries as [`crate::sys::tree::walk`] reports them — `Dir`
//!   (entered), `Leave` (with the directory's metadata), `File` followed by its data extents as
//!   `Chunk`s at offsets within the file, `HardLink`, `Symlink`, `Special`;
//! - one [`Frame::End`] with the number of frames, the number of data bytes and the digest.
//!
//! Every chunk carries a SHA-256 of its offset and bytes. The digest is a SHA-256 over the
//! fingerprint of every frame before `End` (a chunk's fingerprint is its checksum; any other
//! frame's is a SHA-256 of its fields), so a frame lost, repeated, reordered or altered anywhere
//! fails the check. The target writes nothing outside `.work` until the whole stream has checked.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::crash;
use crate::sys::copy;
use crate::sys::tree::{self, Meta, TreeVisitor, TreeWriter};
use crate::sys::SysError;

use super::record::{Layout, VolumeMode};
use super::StorageError;

/// Data bytes per chunk: large enough to keep the stream busy, far below the message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// What the source is, sent first so that the target can refuse a mismatch before any data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub layout: Layout,
    pub mode: VolumeMode,
    /// The source's capacity; the new volume must be at least this large.
    pub capacity_bytes: u64,
    /// image layout: the size of the filesystem inside.
    pub fs_bytes: u64,
    /// image layout: the length of the image file; 0 for trees.
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Header(Header),
    Dir {
        name: Vec<u8>,
    },
    Leave {
        meta: Meta,
    },
    File {
        name: Vec<u8>,
        meta: Meta,
        size: u64,
        link: Option<u64>,
    },
    HardLink {
        name: Vec<u8>,
        link: u64,
    },
    Symlink {
        name: Vec<u8>,
        target: Vec<u8>,
        meta: Meta,
    },
    Special {
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        meta: Meta,
    },
    Chunk {
        offset: u64,
        data: Vec<u8>,
        /// SHA-256 of the offset (8 bytes, little-endian) and the data.
        checksum: [u8; 32],
    },
    End {
        /// Frames before this one, the header included.
        frames: u64,
        /// Data bytes in all chunks.
        bytes: u64,
        digest: [u8; 32],
    },
}

/// SHA-256 of a chunk's offset and bytes.
pub fn chunk_checksum(offset: u64, data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(offset.to_le_bytes());
    h.update(data);
    h.finalize().into()
}

/// Feeds a field into a hash with its length first, so that fields cannot run into each other.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn meta_fields(h: &mut Sha256, m: &Meta) {
    for n in [m.uid as u64, m.gid as u64, m.mode as u64] {
        field(h, &n.to_le_bytes());
    }
    for t in [m.atime.0, m.atime.1, m.mtime.0, m.mtime.1] {
        field(h, &t.to_le_bytes());
    }
    field(h, &(m.xattrs.len() as u64).to_le_bytes());
    for (k, v) in &m.xattrs {
        field(h, k);
        field(h, v);
    }
}

impl Frame {
    /// What the digest covers of this frame.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let u = |h: &mut Sha256, n: u64| field(h, &n.to_le_bytes());
        match self {
            Frame::Chunk { checksum, .. } => return *checksum,
            Frame::Header(x) => {
                h.update(b"H");
                field(&mut h, x.layout.as_str().as_bytes());
                u(&mut h, x.mode as u64);
                u(&mut h, x.capacity_bytes);
                u(&mut h, x.fs_bytes);
                u(&mut h, x.length);
            }
            Frame::Dir { name } => {
                h.update(b"D");
                field(&mut h, name);
            }
            Frame::Leave { meta } => {
                h.update(b"L");
                meta_fields(&mut h, meta);
            }
            Frame::File { name, meta, size, link } => {
                h.update(b"F");
                field(&mut h, name);
                meta_fields(&mut h, meta);
                u(&mut h, *size);
                u(&mut h, link.map_or(u64::MAX, |l| l));
            }
            Frame::HardLink { name, link } => {
                h.update(b"K");
                field(&mut h, name);
                u(&mut h, *link);
            }
            Frame::Symlink { name, target, meta } => {
                h.update(b"S");
                field(&mut h, name);
                field(&mut h, target);
                meta_fields(&mut h, meta);
            }
            Frame::Special { name, mode, rdev, meta } => {
                h.update(b"P");
                field(&mut h, name);
                u(&mut h, *mode as u64);
                u(&mut h, *rdev);
                meta_fields(&mut h, meta);
            }
            Frame::End { .. } => h.update(b"E"),
        }
        h.finalize().into()
    }
}

/// The running totals both ends keep: frames, data bytes and the digest. A stream made elsewhere
/// (a restore from a backup) keeps one too, so the same checks and import serve it.
#[derive(Default)]
pub struct Tally {
    frames: u64,
    bytes: u64,
    digest: Sha256,
}

impl Tally {
    pub fn add(&mut self, f: &Frame) {
        self.frames += 1;
        if let Frame::Chunk { data, .. } = f {
            self.bytes += data.len() as u64;
        }
        self.digest.update(f.fingerprint());
    }

    pub fn end(self) -> Frame {
        Frame::End {
            frames: self.frames,
            bytes: self.bytes,
            digest: self.digest.finalize().into(),
        }
    }
}

fn broken(why: impl std::fmt::Display) -> StorageError {
    StorageError::Transfer(why.to_string())
}

/// Takes each frame of an export; an error (the receiver went away) stops the export.
pub type SendFrame<'a> = dyn FnMut(Frame) -> Result<(), StorageError> + 'a;

/// Sends frames, keeping the tally; the crash point fires once a few chunks are out, so a test can
/// break a transfer midway.
struct Sender<'a, 'b> {
    send: &'a mut SendFrame<'b>,
    tally: Tally,
    chunks: u64,
}

impl Sender<'_, '_> {
    fn frame(&mut self, f: Frame) -> Result<(), StorageError> {
        self.tally.add(&f);
        if matches!(f, Frame::Chunk { .. }) {
            self.chunks += 1;
            if self.chunks == 8 {
                crash::point("export:mid-stream");
            }
        }
        (self.send)(f)
    }

    /// The data extents of the first `size` bytes of `f`, chunk by chunk.
    fn extents(&mut self, f: &OwnedFd, size: u64, path: &Path) -> Result<(), StorageError> {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut failed = None;
        copy::data_extents(f, size, |start, end| {
            let mut off = start;
            while off < end {
                let want = ((end - off) as usize).min(CHUNK_BYTES);
                let n = copy::read_at(f, &mut buf[..want], off)?;
                if n == 0 {
                    break; // the file shrank while it was read (a live volume)
                }
                let data = buf[..n].to_vec();
                let checksum = chunk_checksum(off, &data);
                if let Err(e) = self.frame(Frame::Chunk {
                    offset: off,
                    data,
                    checksum,
                }) {
                    failed = Some(e);
                    return Err(std::io::Error::other("stopped"));
                }
                off += n as u64;
            }
            Ok(())
        })
        .map_err(|e| {
            failed
                .take()
                .unwrap_or_else(|| SysError::io("read data", path, e).into())
        })
    }

    fn finish(self) -> Result<(), StorageError> {
        let end = self.tally.end();
        (self.send)(end)
    }
}

/// Sends the data at `path` (a volume's or snapshot's, already pinned against deletion) in frames.
/// A tree is read from `path` as it is: the caller hands a read-only snapshot where it needs one.
pub fn export(header: Header, path: &Path, send: &mut SendFrame<'_>) -> Result<(), StorageError> {
    let mut s = Sender {
        send,
        tally: Tally::default(),
        chunks: 0,
    };
    let layout = header.layout;
    match layout {
        Layout::Image => {
            let (f, length) = copy::open_image(path)?;
            s.frame(Frame::Header(Header { length, ..header }))?;
            s.extents(&f, length, path)?;
        }
        Layout::Dir | Layout::Btrfs => {
            s.frame(Frame::Header(Header { length: 0, ..header }))?;
            let mut v = TreeSender {
                s: &mut s,
                stopped: None,
            };
            let walked = tree::walk(path, &mut v);
            if let Some(e) = v.stopped.take() {
                return Err(e);
            }
            walked?;
        }
    }
    s.finish()
}

/// Turns a walk into frames. A failed send stops the walk; its error is kept to report instead of
/// the walk's.
struct TreeSender<'s, 'a, 'b> {
    s: &'s mut Sender<'a, 'b>,
    stopped: Option<StorageError>,
}

impl TreeSender<'_, '_, '_> {
    fn send(&mut self, f: Frame) -> Result<(), SysError> {
        self.s.frame(f).map_err(|e| self.stop(e))
    }

    fn stop(&mut self, e: StorageError) -> SysError {
        self.stopped = Some(e);
        SysError::io("send", "", std::io::Error::other("transfer stopped"))
    }
}

impl TreeVisitor for TreeSender<'_, '_, '_> {
    fn dir(&mut self, name: &std::ffi::CStr) -> Result<(), SysError> {
        self.send(Frame::Dir {
            name: name.to_bytes().to_vec(),
        })
    }

    fn leave(&mut self, meta: Meta) -> Result<(), SysError> {
        self.send(Frame::Leave { meta })
    }

    fn file(
        &mut self,
        name: &std::ffi::CStr,
        meta: Meta,
        data: &OwnedFd,
        size: u64,
        link: Option<u64>,
    ) -> Result<(), SysError> {
        self.send(Frame::File {
            name: name.to_bytes().to_vec(),
            meta,
            size,
            link,
        })?;
        self.s
            .extents(
                data,
                size,
                Path::new(&String::from_utf8_lossy(name.to_bytes()).into_owned()),
            )
            .map_err(|e| self.stop(e))
    }

    fn hard_link(&mut self, name: &std::ffi::CStr, link: u64) -> Result<(), SysError> {
        self.send(Frame::HardLink {
            name: name.to_bytes().to_vec(),
            link,
        })
    }

    fn symlink(&mut self, name: &std::ffi::CStr, target: &std::ffi::CStr, meta: Meta) -> Result<(), SysError> {
        self.send(Frame::Symlink {
            name: name.to_bytes().to_vec(),
            target: target.to_bytes().to_vec(),
            meta,
        })
    }

    fn special(&mut self, name: &std::ffi::CStr, mode: u32, rdev: u64, meta: Meta) -> Result<(), SysError> {
        self.send(Frame::Special {
            name: name.to_bytes().to_vec(),
            mode,
            rdev,
            meta,
        })
    }
}

/// Checks a stream frame by frame: the header first, chunks with their checksum and in order, a
/// tree's chunks inside a file, and at the end the counts and the digest.
#[derive(Default)]
pub struct Verifier {
    header: Option<Header>,
    tally: Tally,
    /// Where the next chunk may start, and where the current file (or the image) ends.
    next: u64,
    limit: Option<u64>,
    ended: bool,
    /// Bytes of file data a tree stream may bring in all, and what it brought so far: a source
    /// that sends more is refused before it fills the target's pool.
    budget: Option<u64>,
    sent: u64,
    /// What the tree's entries (not their data) take, counted against the same budget apart
    /// from the data: see [`entry_cost`].
    entries: u64,
}

/// What one entry of a tree is counted as taking in the target's pool: an inode and a directory
/// entry (about [`ENTRY_BYTES`]) plus its name, symlink target and xattrs. A stream of nothing but
/// empty files and directories (a backup repeating one subtree many times costs a few bytes in the
/// repository for millions of entries) is refused like one bringing too much data.
fn entry_cost(f: &Frame) -> u64 {
    let xattrs = |m: &Meta| m.xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
    let entry = |name: &[u8]| ENTRY_BYTES + name.len() as u64;
    match f {
        Frame::Dir { name } => entry(name),
        Frame::Leave { meta } => xattrs(meta),
        Frame::File { name, meta, .. } => entry(name) + xattrs(meta),
        Frame::HardLink { name, .. } => entry(name),
        Frame::Symlink { name, target, meta } => entry(name) + target.len() as u64 + xattrs(meta),
        Frame::Special { name, meta, .. } => entry(name) + xattrs(meta),
        Frame::Header(_) | Frame::Chunk { .. } | Frame::End { .. } => 0,
    }
}

/// An inode and a directory entry, as XFS and ext4 take them at most by default.
pub const ENTRY_BYTES: u64 = 512;

impl Verifier {
    /// A verifier for a stream whose file data may take at most `budget` bytes.
    pub fn within(budget: u64) -> Verifier {
        Verifier {
            budget: Some(budget),
            ..Verifier::default()
        }
    }

    /// Checks one frame before it is used.
    pub fn check(&mut self, f: &Frame) -> Result<(), StorageError> {
        if self.ended {
            return Err(broken("a frame after the end of the stream"));
        }
        match (f, &self.header) {
            (Frame::Header(h), None) => {
                if h.layout == Layout::Image {
                    self.limit = Some(h.length);
                }
                self.header = Some(h.clone());
            }
            (Frame::Header(_), Some(_)) => return Err(broken("a second header")),
            (_, None) => return Err(broken("the stream does not start with a header")),
            (Frame::End { frames, bytes, digest }, Some(_)) => {
                let tally = std::mem::take(&mut self.tally);
                let (want_frames, want_bytes) = (tally.frames, tally.bytes);
                let got: [u8; 32] = tally.digest.finalize().into();
                if *frames != want_frames || *bytes != want_bytes {
                    return Err(broken(format!(
                        "the source sent {frames} frames and {bytes} bytes, {want_frames} frames and {want_bytes} bytes arrived"
                    )));
                }
                if got != *digest {
                    return Err(broken("the digest of the whole stream does not match"));
                }
                self.ended = true;
                return Ok(());
            }
            (Frame::Chunk { offset, data, checksum }, Some(_)) => {
                if chunk_checksum(*offset, data) != *checksum {
                    return Err(broken(format!("the chunk at offset {offset} has a bad checksum")));
                }
                let Some(limit) = self.limit else {
                    return Err(broken("a chunk outside any file"));
                };
                let end = offset.checked_add(data.len() as u64);
                if *offset < self.next || end.is_none_or(|e| e > limit) {
                    return Err(broken(format!(
                        "the chunk at offset {offset} ({} bytes) is out of order or past the end ({limit})",
                        data.len()
                    )));
                }
                self.next = end.unwrap_or(limit);
                if let (Some(budget), Some(h)) = (self.budget, &self.header) {
                    // An image is bounded by its length, checked against the capacity by the caller.
                    if h.layout != Layout::Image {
                        self.sent = self.sent.saturating_add(data.len() as u64);
                        if self.sent > budget {
                            return Err(StorageError::Exhausted(format!(
                                "the source sent more than {budget} bytes of file data, all this copy may take \
                                 (its capacity, or half the pool's free room when that is more)"
                            )));
                        }
                    }
                }
            }
            (Frame::File { size, .. }, Some(h)) if h.layout != Layout::Image => {
                self.limit = Some(*size);
                self.next = 0;
                self.count_entry(f)?;
            }
            (_, Some(h)) if h.layout == Layout::Image => return Err(broken("a tree entry in an image stream")),
            (_, Some(_)) => {
                self.limit = None;
                self.count_entry(f)?;
            }
        }
        self.tally.add(f);
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.ended
    }

    /// Counts a tree entry against the budget (apart from the file data).
    fn count_entry(&mut self, f: &Frame) -> Result<(), StorageError> {
        let Some(budget) = self.budget else { return Ok(()) };
        self.entries = self.entries.saturating_add(entry_cost(f));
        if self.entries > budget {
            return Err(StorageError::Exhausted(format!(
                "the source sent more entries than this copy may take ({budget} bytes counting {ENTRY_BYTES} \
                 for each entry with its name, symlink target and xattrs: its capacity, or half the pool's \
                 free room when that is more)"
            )));
        }
        Ok(())
    }
}

/// The new volume being built in `.work` from a stream, for the engine to move into place once
/// [`Import::finish`] has checked it whole. Dropped before that, it removes what it built.
pub struct Import {
    work: std::path::PathBuf,
    target: Target,
    verifier: Verifier,
    chunks: u64,
    done: bool,
    /// The pool's btrfs calls, to remove a half-built subvolume.
    sys: crate::sys::StorageSys,
}

enum Target {
    Image(OwnedFd),
    Tree {
        writer: Box<TreeWriter>,
        /// The file being filled: its descriptor, path, size and metadata (applied once full).
        open: Option<(OwnedFd, std::path::PathBuf, u64, Meta)>,
    },
}

impl Import {
    /// Starts a volume of `header`'s layout at `work` (which must not exist), whose file data (of
    /// a tree) may take at most `budget` bytes.
    pub fn start(
        header: &Header,
        budget: u64,
        work: &Path,
        sys: &crate::sys::StorageSys,
    ) -> Result<Import, StorageError> {
        let target = match header.layout {
            Layout::Image => Target::Image(copy::create_image(work)?),
            Layout::Dir => Target::Tree {
                writer: Box::new(TreeWriter::create(work)?),
                open: None,
            },
            Layout::Btrfs => {
                sys.subvolumes.create(work)?;
                match TreeWriter::into_existing(work) {
                    Ok(writer) => Target::Tree {
                        writer: Box::new(writer),
                        open: None,
                    },
                    Err(e) => {
                        let _ = super::layout::purge(sys, work);
                        return Err(e.into());
                    }
                }
            }
        };
        let mut import = Import {
            work: work.to_path_buf(),
            target,
            verifier: Verifier::within(budget),
            chunks: 0,
            done: false,
            sys: sys.clone(),
        };
        import.verifier.check(&Frame::Header(header.clone()))?;
        Ok(import)
    }

    /// Checks and applies one frame.
    pub fn frame(&mut self, f: Frame) -> Result<(), StorageError> {
        self.verifier.check(&f)?;
        let work = &self.work;
        let (writer, open) = match &mut self.target {
            Target::Image(img) => {
                if let Frame::Chunk { offset, data, .. } = &f {
                    copy::write_at(img, data, *offset).map_err(|e| SysError::io("write", work, e))?;
                    chunk_written(&mut self.chunks);
                }
                return Ok(());
            }
            Target::Tree { writer, open } => (writer, open),
        };
        if let Frame::Chunk { offset, data, .. } = &f {
            let Some((fd, rel, _, _)) = open.as_ref() else {
                return Err(broken("a chunk outside any file"));
            };
            copy::write_at(fd, data, *offset).map_err(|e| SysError::io("write", work.join(rel), e))?;
            chunk_written(&mut self.chunks);
            return Ok(());
        }
        // Any other frame ends the file being filled.
        if let Some((fd, rel, size, meta)) = open.take() {
            writer.finish_file(&fd, &rel, size, &meta)?;
        }
        let name = |n: &[u8]| CString::new(n).map_err(|_| broken("an entry name with a NUL byte"));
        match f {
            Frame::Dir { name: n } => writer.dir(&name(&n)?)?,
            Frame::Leave { meta } => writer.leave(meta)?,
            Frame::File {
                name: n,
                meta,
                size,
                link,
            } => {
                let (fd, rel) = writer.file(&name(&n)?, link)?;
                *open = Some((fd, rel, size, meta));
            }
            Frame::HardLink { name: n, link } => writer.hard_link(&name(&n)?, link)?,
            Frame::Symlink { name: n, target, meta } => writer.symlink(&name(&n)?, &name(&target)?, meta)?,
            Frame::Special {
                name: n,
                mode,
                rdev,
                meta,
            } => writer.special(&name(&n)?, mode, rdev, meta)?,
            Frame::Header(_) | Frame::Chunk { .. } | Frame::End { .. } => {}
        }
        Ok(())
    }

    /// After the end frame: checks the stream was whole, and makes the data durable. The caller
    /// then moves `work` into place.
    pub fn finish(mut self, length: u64) -> Result<(), StorageError> {
        if !self.verifier.is_complete() {
            return Err(broken("the stream ended before its end frame"));
        }
        match &self.target {
            Target::Image(img) => {
                copy::set_len(img, length, &self.work)?;
                copy::fsync(img, &self.work)?;
            }
            Target::Tree { writer, open } => {
                if open.is_some() || !writer.is_complete() {
                    return Err(broken("the tree ended inside a directory or file"));
                }
                copy::sync_filesystem(&self.work)?;
            }
        }
        self.done = true;
        Ok(())
    }
}

/// Counts a chunk written on the target; the crash point lets a test kill the target midway.
fn chunk_written(chunks: &mut u64) {
    *chunks += 1;
    if *chunks == 4 {
        crash::point("import:mid-stream");
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = super::layout::purge(&self.sys, &self.work) {
            tracing::error!(path = %self.work.display(), error = %e, "could not remove a broken import; the next start clears it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            layout: Layout::Image,
            mode: VolumeMode::Block,
            capacity_bytes: 1 << 20,
            fs_bytes: 0,
            length: 1 << 20,
        }
    }

    fn chunk(offset: u64, data: &[u8]) -> Frame {
        Frame::Chunk {
            offset,
            data: data.to_vec(),
            checksum: chunk_checksum(offset, data),
        }
    }

    /// A whole image stream, as the source sends it.
    fn stream() -> Vec<Frame> {
        let mut t = Tally::default();
        let frames = vec![Frame::Header(header()), chunk(0, b"first"), chunk(4096, b"second")];
        for f in &frames {
            t.add(f);
        }
        let mut all = frames;
        all.push(t.end());
        all
    }

    fn check_all(frames: &[Frame]) -> Result<(), StorageError> {
        let mut v = Verifier::default();
        for f in frames {
            v.check(f)?;
        }
        if v.is_complete() {
            Ok(())
        } else {
            Err(broken("incomplete"))
        }
    }

    #[test]
    fn a_tree_stream_may_not_bring_more_file_data_than_the_new_volumes_capacity() {
        // A source (another node) that lies about nothing but sends files past the capacity of
        // the volume being built: refused as it crosses it, before it fills the target's pool.
        let tree = Header {
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 4096,
            fs_bytes: 0,
            length: 0,
        };
        let file = |name: &str| Frame::File {
            name: name.as_bytes().to_vec(),
            meta: crate::sys::tree::Meta::default(),
            size: 4096,
            link: None,
        };
        let data = vec![7u8; 4096];
        let mut v = Verifier::within(6000);
        v.check(&Frame::Header(tree.clone())).unwrap();
        v.check(&file("a")).unwrap();
        v.check(&chunk(0, &data)).unwrap();
        v.check(&file("b")).unwrap();
        let e = v.check(&chunk(0, &data)).unwrap_err();
        assert!(matches!(e, StorageError::Exhausted(_)), "{e}");
        // Within its capacity the same stream goes through.
        let mut v = Verifier::within(8192);
        for f in [
            Frame::Header(tree),
            file("a"),
            chunk(0, &data),
            file("b"),
            chunk(0, &data),
        ] {
            v.check(&f).unwrap();
        }
    }

    #[test]
    fn a_tree_stream_may_not_bring_more_entries_than_the_budget_holds() {
        // Empty directories cost the source nothing to send (a backup repeats one subtree) but
        // each takes an inode and a directory entry in the target's pool.
        let tree = Header {
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 1 << 20,
            fs_bytes: 0,
            length: 0,
        };
        let mut v = Verifier::within(1 << 20);
        v.check(&Frame::Header(tree)).unwrap();
        let mut refused = None;
        for i in 0..10_000u32 {
            let dir = Frame::Dir {
                name: format!("d{i}").into_bytes(),
            };
            let leave = Frame::Leave {
                meta: crate::sys::tree::Meta::default(),
            };
            if let Err(e) = v.check(&dir).and_then(|_| v.check(&leave)) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.expect("refused before 10,000 entries");
        assert!(matches!(e, StorageError::Exhausted(_)), "{e}");
        assert!((1900..2100).contains(&i), "refused at about 1 MiB / 512 bytes: {i}");
    }

    #[test]
    fn a_whole_stream_checks() {
        check_all(&stream()).unwrap();
    }

    #[test]
    fn a_chunk_with_altered_bytes_fails_its_checksum() {
        let mut s = stream();
        if let Frame::Chunk { data, .. } = &mut s[1] {
            data[0] ^= 1;
        }
        let e = check_all(&s).unwrap_err().to_string();
        assert!(e.contains("bad checksum"), "{e}");
    }

    #[test]
    fn a_chunk_recomputed_after_alteration_fails_the_digest() {
        let mut s = stream();
        s[2] = chunk(4096, b"SECOND");
        let e = check_all(&s).unwrap_err().to_string();
        assert!(e.contains("digest"), "{e}");
    }

    #[test]
    fn a_lost_or_repeated_chunk_fails() {
        let mut lost = stream();
        lost.remove(2);
        assert!(check_all(&lost).is_err());
        let mut repeated = stream();
        repeated.insert(2, repeated[1].clone());
        assert!(check_all(&repeated).is_err());
    }

    #[test]
    fn a_stream_without_its_end_is_incomplete() {
        let mut s = stream();
        s.pop();
        assert!(check_all(&s).is_err());
    }

    #[test]
    fn chunks_past_the_end_or_before_the_header_are_refused() {
        let mut s = stream();
        s[2] = chunk(1 << 20, b"x");
        assert!(check_all(&s).unwrap_err().to_string().contains("past the end"));
        assert!(check_all(&stream()[1..]).is_err());
    }

    #[test]
    fn a_tree_chunk_outside_a_file_is_refused() {
        let mut v = Verifier::default();
        v.check(&Frame::Header(Header {
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            length: 0,
            ..header()
        }))
        .unwrap();
        assert!(v.check(&chunk(0, b"x")).is_err());
    }
}
