//! A tree with every property a copy must keep (owners, modes with set-id and sticky bits,
//! nanosecond times, xattrs, symlinks, hard links, holes, fifos and device nodes), and the means to
//! observe a tree and compare it with its copy. Used by the copy tests on one node
//! (copy_fidelity.rs) and between nodes (split.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Whence;

pub const UID: u32 = 1234;
pub const GID: u32 = 5678;
pub const SPARSE_LEN: u64 = 1 << 30;
pub const SPARSE_DATA_AT: u64 = 512 << 20;
pub const SPARSE_DATA_LEN: usize = 4096;
/// Files up to this size have their bytes compared; the 1 GiB sparse file is checked by its extent.
pub const COMPARE_BYTES_UP_TO: u64 = 1 << 20;
/// How far (in 512-byte blocks) a copy's allocation may differ from its source's: filesystems round
/// allocations and may add an extent block, but a filled hole would be 2 million blocks.
pub const BLOCK_SLACK: u64 = 64;
/// Old enough that, under relatime, any read of the file or listing of the directory moves it.
pub const LONG_AGO: (i64, i64) = (978_307_200, 123_456_789);

// ---------------------------------------------------------------------------------------------
// Building a tree

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &TimeSpec::new(atime.0, atime.1),
        &TimeSpec::new(mtime.0, mtime.1),
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// Distinct (atime, mtime) with nanoseconds for the n-th entry, so a copy that mixes entries up or
/// drops the nanoseconds is caught.
pub fn stamp(n: i64) -> ((i64, i64), (i64, i64)) {
    (
        (1_000_000_000 + n * 86_400, 100_000_001 + n * 1_000_003),
        (900_000_000 + n * 86_400, 200_000_003 + n * 7_000_001),
    )
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (path, name_c) = (cpath(p), CString::new(name).expect("xattr name"));
    // SAFETY: both strings are NUL-terminated and `value` is valid for `value.len()` bytes.
    let rc = unsafe { libc::lsetxattr(path.as_ptr(), name_c.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

pub fn chown(p: &Path, owner: (u32, u32)) {
    std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// chmod comes after chown because chown clears the set-id bits.
pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn write_file(p: &Path, data: &[u8], mode: u32, owner: (u32, u32)) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    chown(p, owner);
    chmod(p, mode);
}

pub fn make_dir(p: &Path, mode: u32, owner: (u32, u32)) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    chown(p, owner);
    chmod(p, mode);
}

/// A character device like /dev/null (1:3).
pub fn make_null_device(p: &Path) {
    nix::sys::stat::mknod(
        p,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
}

pub fn symlink(target: impl AsRef<Path>, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

/// Writes, under `root` (a published volume), a tree with every property a copy must keep.
pub fn build_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    write_file(&p("plain"), b"plain text\n", 0o644, (0, 0));
    write_file(&p("empty"), b"", 0o600, (0, 0));
    write_file(&p("owned"), b"owned by 1234:5678\n", 0o640, (UID, GID));
    write_file(&p("setuid"), b"#!/bin/sh\necho setuid\n", 0o4755, (UID, GID));
    write_file(&p("setgid"), b"setgid\n", 0o2711, (0, GID));
    write_file(&p("xattrs"), b"has xattrs\n", 0o644, (0, 0));
    set_xattr(&p("xattrs"), "user.color", b"blue");
    set_xattr(&p("xattrs"), "user.empty", b"");
    set_xattr(&p("xattrs"), "user.binary", &[0, 1, 2, 0xff, 0]);
    set_xattr(&p("xattrs"), "trusted.cellar", b"trusted value");
    write_file(
        &root.join(OsStr::from_bytes(b"name-\xff-not-utf8")),
        b"odd name\n",
        0o644,
        (0, 0),
    );

    make_dir(&p("nested"), 0o755, (0, 0));
    set_xattr(&p("nested"), "user.dir", b"yes");
    set_xattr(&p("nested"), "trusted.dir", b"kept");
    make_dir(&p("nested/deeper"), 0o700, (UID, GID));
    make_dir(&p("nested/deeper/deepest"), 0o2770, (UID, GID));
    write_file(&p("nested/deeper/deepest/leaf"), b"leaf\n", 0o444, (UID, GID));
    make_dir(&p("sticky"), 0o1777, (UID, GID));
    write_file(&p("sticky/inside"), b"in a sticky dir\n", 0o600, (UID, GID));

    write_file(&p("hard-a"), b"one inode, two names\n", 0o664, (UID, GID));
    set_xattr(&p("hard-a"), "user.linked", b"both names");
    fs::hard_link(p("hard-a"), p("nested/hard-b")).expect("hard link");

    symlink("/etc/passwd", &p("abs-link"));
    chown(&p("abs-link"), (UID, GID));
    symlink("plain", &p("rel-link"));
    symlink("nested/deeper", &p("dir-link"));
    symlink("no/such/file", &p("dangling"));

    let sparse = File::create(p("sparse")).expect("create sparse");
    sparse.set_len(SPARSE_LEN).expect("set_len");
    sparse
        .write_all_at(&sparse_data(), SPARSE_DATA_AT)
        .expect("write the middle");
    drop(sparse);

    nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o620)).expect("mkfifo");
    chown(&p("fifo"), (UID, GID));
    chmod(&p("fifo"), 0o620);
    make_null_device(&p("null"));
    chmod(&p("null"), 0o666);

    // Times last, leaves first, then directories bottom-up, so nothing moves them afterwards.
    let leaves = [
        "plain",
        "empty",
        "owned",
        "setuid",
        "setgid",
        "xattrs",
        "nested/deeper/deepest/leaf",
        "sticky/inside",
        "hard-a",
        "abs-link",
        "rel-link",
        "dir-link",
        "dangling",
        "sparse",
        "fifo",
        "null",
    ];
    for (n, rel) in leaves.iter().enumerate() {
        let (a, m) = stamp(n as i64);
        set_times(&p(rel), a, m);
    }
    let (a, m) = stamp(50);
    set_times(&root.join(OsStr::from_bytes(b"name-\xff-not-utf8")), a, m);
    for (n, rel) in ["nested/deeper/deepest", "nested/deeper", "nested", "sticky"]
        .iter()
        .enumerate()
    {
        let (a, m) = stamp(60 + n as i64);
        set_times(&p(rel), a, m);
    }
    // The volume root as a pod with an fsGroup leaves it.
    chown(root, (0, GID));
    chmod(root, 0o2775);
    let (a, m) = stamp(70);
    set_times(root, a, m);
}

pub fn sparse_data() -> Vec<u8> {
    (0..SPARSE_DATA_LEN).map(|i| (i % 251) as u8 + 1).collect()
}

// ---------------------------------------------------------------------------------------------
// Reading a tree back

/// What lstat and the xattr calls say about one entry.
///
/// Directories are compared on mtime only: walking a tree (the copy does, and so does `scan`) reads
/// every directory, and under relatime a read moves a directory's atime, so the source's directory
/// atimes are no stable value. Every other entry is compared on atime too, because nothing reads
/// it between its lstat here and the copy's own stat (see `link_targets` and `contents`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
    /// None for directories, whose size depends on their history, not their content.
    pub size: Option<u64>,
    pub mtime: (i64, i64),
    pub atime: Option<(i64, i64)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Tree {
    /// Every entry by its path relative to the root ("" is the root itself).
    pub meta: BTreeMap<PathBuf, Meta>,
    /// 512-byte blocks allocated to each regular file.
    pub blocks: BTreeMap<PathBuf, u64>,
    /// The names of each inode that has more than one, sorted.
    pub hard_links: BTreeSet<Vec<PathBuf>>,
}

pub fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let path = cpath(p);
    // SAFETY: a null buffer of size 0 asks for the size of the list.
    let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(size >= 0, "listxattr {}: {}", p.display(), io::Error::last_os_error());
    let mut names = vec![0u8; size as usize];
    // SAFETY: `names` has `names.len()` writable bytes.
    let size = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(size >= 0, "listxattr {}: {}", p.display(), io::Error::last_os_error());
    names.truncate(size as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name_c = CString::new(name).expect("xattr name");
        // SAFETY: a null buffer of size 0 asks for the size of the value.
        let len = unsafe { libc::lgetxattr(path.as_ptr(), name_c.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "getxattr {}: {}", p.display(), io::Error::last_os_error());
        let mut value = vec![0u8; len as usize];
        // SAFETY: `value` has `value.len()` writable bytes.
        let len = unsafe { libc::lgetxattr(path.as_ptr(), name_c.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(len >= 0, "getxattr {}: {}", p.display(), io::Error::last_os_error());
        value.truncate(len as usize);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Metadata of every entry under `root`, never following a symlink and never reading a file or a
/// link (each entry's lstat comes before anything reads it).
pub fn scan(root: &Path) -> Tree {
    let mut tree = Tree::default();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let kind = md.mode() & libc::S_IFMT;
        let is_dir = kind == libc::S_IFDIR;
        tree.meta.insert(
            rel.clone(),
            Meta {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                nlink: md.nlink(),
                rdev: md.rdev(),
                size: (!is_dir).then_some(md.size()),
                mtime: (md.mtime(), md.mtime_nsec()),
                atime: (!is_dir).then_some((md.atime(), md.atime_nsec())),
                xattrs: xattrs(&path),
            },
        );
        if kind == libc::S_IFREG {
            tree.blocks.insert(rel.clone(), md.blocks());
            if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.clone());
            }
        }
        if is_dir {
            for e in fs::read_dir(&path).unwrap_or_else(|e| panic!("readdir {}: {e}", path.display())) {
                stack.push(rel.join(e.expect("readdir").file_name()));
            }
        }
    }
    tree.hard_links = inodes
        .into_values()
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    tree
}

/// Everything compared between a tree and its copy.
#[derive(Debug)]
pub struct Observed {
    pub tree: Tree,
    /// Where each symlink points.
    pub links: BTreeMap<PathBuf, PathBuf>,
    /// The bytes of each regular file up to COMPARE_BYTES_UP_TO.
    pub contents: BTreeMap<PathBuf, Vec<u8>>,
    /// Where the sparse file's first data starts (SEEK_DATA from 0) and the bytes there.
    pub sparse_extent: (i64, Vec<u8>),
}

/// Reads what `scan` leaves out: link targets and file bytes. readlink and read move atimes, so on
/// a source tree this runs only after the copy has taken its own stat of every entry.
pub fn finish(root: &Path, tree: Tree) -> Observed {
    let mut links = BTreeMap::new();
    let mut contents = BTreeMap::new();
    for (rel, m) in &tree.meta {
        let path = root.join(rel);
        match m.kind {
            libc::S_IFLNK => {
                links.insert(rel.clone(), fs::read_link(&path).expect("readlink"));
            }
            libc::S_IFREG if m.size.unwrap_or(0) <= COMPARE_BYTES_UP_TO => {
                contents.insert(rel.clone(), fs::read(&path).expect("read"));
            }
            _ => {}
        }
    }
    let sparse = File::open(root.join("sparse")).expect("open sparse");
    let first_data = nix::unistd::lseek(sparse.as_fd(), 0, Whence::SeekData).expect("SEEK_DATA");
    let mut data = vec![0u8; SPARSE_DATA_LEN];
    sparse
        .read_exact_at(&mut data, SPARSE_DATA_AT)
        .expect("read the middle");
    Observed {
        tree,
        links,
        contents,
        sparse_extent: (first_data, data),
    }
}

pub fn observe(root: &Path) -> Observed {
    finish(root, scan(root))
}

/// Guards against a vacuous comparison: the tree holds what `build_tree` meant to write.
pub fn assert_is_the_built_tree(o: &Observed) {
    let m = |rel: &str| {
        o.tree
            .meta
            .get(Path::new(rel))
            .unwrap_or_else(|| panic!("{rel} missing"))
    };
    assert_eq!((m("setuid").mode, m("setuid").uid, m("setuid").gid), (0o4755, UID, GID));
    assert_eq!(m("sticky").mode, 0o1777);
    assert_eq!((m("").mode, m("").gid), (0o2775, GID));
    assert_eq!(m("fifo").kind, libc::S_IFIFO);
    assert_eq!(
        (m("null").kind, m("null").rdev),
        (libc::S_IFCHR, nix::sys::stat::makedev(1, 3))
    );
    assert_eq!(m("abs-link").kind, libc::S_IFLNK);
    assert_eq!(m("abs-link").uid, UID);
    assert_eq!(m("plain").mtime, stamp(0).1);
    assert_eq!(m("abs-link").atime, Some(stamp(9).0));
    assert!(m("xattrs").xattrs.contains_key(b"trusted.cellar".as_slice()));
    assert!(o
        .tree
        .hard_links
        .contains(&vec![PathBuf::from("hard-a"), PathBuf::from("nested/hard-b")]));
    assert_eq!(m("sparse").size, Some(SPARSE_LEN));
    assert!(
        o.tree.blocks[Path::new("sparse")] <= BLOCK_SLACK,
        "the source's sparse file is not sparse: this filesystem cannot show whether holes survive"
    );
    assert_eq!(o.sparse_extent, (SPARSE_DATA_AT as i64, sparse_data()));
    assert_eq!(o.links[Path::new("abs-link")], Path::new("/etc/passwd"));
}

pub fn assert_same_tree(expected: &Observed, copy: &Observed) {
    let want: Vec<_> = expected.tree.meta.keys().collect();
    let got: Vec<_> = copy.tree.meta.keys().collect();
    assert_eq!(want, got, "the copy holds other entries than the source");
    for (rel, m) in &expected.tree.meta {
        assert_eq!(Some(m), copy.tree.meta.get(rel), "metadata of {rel:?}");
    }
    assert_eq!(expected.tree.hard_links, copy.tree.hard_links, "hard links");
    assert_eq!(expected.links, copy.links, "symlink targets");
    for (rel, bytes) in &expected.contents {
        assert!(copy.contents.get(rel) == Some(bytes), "contents of {rel:?} differ");
    }
    assert_eq!(
        expected.sparse_extent, copy.sparse_extent,
        "the sparse file's data extent"
    );
    for (rel, &src) in &expected.tree.blocks {
        let dst = copy.tree.blocks[rel];
        assert!(
            dst <= src + BLOCK_SLACK && src <= dst + BLOCK_SLACK,
            "{rel:?} has {dst} blocks in the copy, {src} in the source"
        );
    }
}
