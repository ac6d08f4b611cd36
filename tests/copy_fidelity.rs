//! A copy made for a snapshot, a restore or a clone keeps everything a workload can see of its files:
//! owners, modes with set-id and sticky bits, nanosecond times, xattrs, symlinks (never followed),
//! hard links, holes, fifos and device nodes. Each test writes a tree through a published volume,
//! copies it through the CSI API, publishes the copy and compares the two trees entry by entry.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cellar::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use cellar::csi::v1::{DeleteSnapshotRequest, Volume, VolumeContentSource};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Whence;

const UID: u32 = 1234;
const GID: u32 = 5678;
const SPARSE_LEN: u64 = 1 << 30;
const SPARSE_DATA_AT: u64 = 512 << 20;
const SPARSE_DATA_LEN: usize = 4096;
/// Files up to this size have their bytes compared; the 1 GiB sparse file is checked by its extent.
const COMPARE_BYTES_UP_TO: u64 = 1 << 20;
/// How far (in 512-byte blocks) a copy's allocation may differ from its source's: filesystems round
/// allocations and may add an extent block, but a filled hole would be 2 million blocks.
const BLOCK_SLACK: u64 = 64;
/// Old enough that, under relatime, any read of the file or listing of the directory moves it.
const LONG_AGO: (i64, i64) = (978_307_200, 123_456_789);

// ---------------------------------------------------------------------------------------------
// Building a tree

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
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
fn stamp(n: i64) -> ((i64, i64), (i64, i64)) {
    (
        (1_000_000_000 + n * 86_400, 100_000_001 + n * 1_000_003),
        (900_000_000 + n * 86_400, 200_000_003 + n * 7_000_001),
    )
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
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

fn chown(p: &Path, owner: (u32, u32)) {
    std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// chmod comes after chown because chown clears the set-id bits.
fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn write_file(p: &Path, data: &[u8], mode: u32, owner: (u32, u32)) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    chown(p, owner);
    chmod(p, mode);
}

fn make_dir(p: &Path, mode: u32, owner: (u32, u32)) {
    fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    chown(p, owner);
    chmod(p, mode);
}

fn symlink(target: impl AsRef<Path>, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

/// Writes, under `root` (a published volume), a tree with every property a copy must keep.
fn build_tree(root: &Path) {
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
    nix::sys::stat::mknod(
        &p("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
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

fn sparse_data() -> Vec<u8> {
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
struct Meta {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    rdev: u64,
    /// None for directories, whose size depends on their history, not their content.
    size: Option<u64>,
    mtime: (i64, i64),
    atime: Option<(i64, i64)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Debug, Default)]
struct Tree {
    /// Every entry by its path relative to the root ("" is the root itself).
    meta: BTreeMap<PathBuf, Meta>,
    /// 512-byte blocks allocated to each regular file.
    blocks: BTreeMap<PathBuf, u64>,
    /// The names of each inode that has more than one, sorted.
    hard_links: BTreeSet<Vec<PathBuf>>,
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
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
fn scan(root: &Path) -> Tree {
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
struct Observed {
    tree: Tree,
    /// Where each symlink points.
    links: BTreeMap<PathBuf, PathBuf>,
    /// The bytes of each regular file up to COMPARE_BYTES_UP_TO.
    contents: BTreeMap<PathBuf, Vec<u8>>,
    /// Where the sparse file's first data starts (SEEK_DATA from 0) and the bytes there.
    sparse_extent: (i64, Vec<u8>),
}

/// Reads what `scan` leaves out: link targets and file bytes. readlink and read move atimes, so on
/// a source tree this runs only after the copy has taken its own stat of every entry.
fn finish(root: &Path, tree: Tree) -> Observed {
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

fn observe(root: &Path) -> Observed {
    finish(root, scan(root))
}

/// Guards against a vacuous comparison: the tree holds what `build_tree` meant to write.
fn assert_is_the_built_tree(o: &Observed) {
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

fn assert_same_tree(expected: &Observed, copy: &Observed) {
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

// ---------------------------------------------------------------------------------------------
// CSI steps

fn from_snapshot(id: &str) -> Type {
    Type::Snapshot(SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

fn from_volume(id: &str) -> Type {
    Type::Volume(VolumeSource {
        volume_id: id.to_string(),
    })
}

async fn create_from(d: &mut Driver, name: &str, source: Type) -> Volume {
    let mut req = create_req(name, 64 * MIB);
    req.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
    d.ctl
        .create_volume(req)
        .await
        .expect("CreateVolume with a content source")
        .into_inner()
        .volume
        .expect("volume")
}

async fn delete_snapshot(d: &mut Driver, id: &str) {
    d.ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
}

/// A volume staged and published read-write.
struct Mounted {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

async fn create_mounted(d: &mut Driver, name: &str) -> Mounted {
    let v = d.create(name).await;
    mount(d, v, name).await
}

async fn mount(d: &mut Driver, v: Volume, name: &str) -> Mounted {
    let (staging, target) = d.mount_rw(&v.volume_id, name).await;
    Mounted {
        id: v.volume_id,
        staging,
        target,
    }
}

async fn unmount_and_delete(d: &mut Driver, m: Mounted) {
    d.unmount_all(&m.id, &m.staging, &m.target).await;
    d.delete(&m.id).await.expect("DeleteVolume");
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn restore_from_snapshot_keeps_every_property() {
    let mut d = Driver::start().await;
    let src = create_mounted(&mut d, "src").await;
    build_tree(&src.target);
    let tree = scan(&src.target);

    let snap = d.snapshot("snap", &src.id).await.expect("CreateSnapshot");
    let expected = finish(&src.target, tree);
    assert_is_the_built_tree(&expected);
    let restored = create_from(&mut d, "restored", from_snapshot(&snap.snapshot_id)).await;
    let restored = mount(&mut d, restored, "restored").await;
    assert_same_tree(&expected, &observe(&restored.target));

    unmount_and_delete(&mut d, restored).await;
    delete_snapshot(&mut d, &snap.snapshot_id).await;
    unmount_and_delete(&mut d, src).await;
}

#[tokio::test]
async fn clone_keeps_every_property() {
    let mut d = Driver::start().await;
    let src = create_mounted(&mut d, "src").await;
    build_tree(&src.target);
    let tree = scan(&src.target);

    let clone = create_from(&mut d, "clone", from_volume(&src.id)).await;
    let expected = finish(&src.target, tree);
    assert_is_the_built_tree(&expected);
    let clone = mount(&mut d, clone, "clone").await;
    assert_same_tree(&expected, &observe(&clone.target));

    unmount_and_delete(&mut d, clone).await;
    unmount_and_delete(&mut d, src).await;
}

#[tokio::test]
async fn restore_shows_the_data_as_it_was_at_snapshot_time() {
    let mut d = Driver::start().await;
    let src = create_mounted(&mut d, "src").await;
    build_tree(&src.target);
    let tree = scan(&src.target);
    let snap = d.snapshot("snap", &src.id).await.expect("CreateSnapshot");
    let expected = finish(&src.target, tree);

    // Change every kind of property in the source after the snapshot.
    let p = |rel: &str| src.target.join(rel);
    fs::write(p("plain"), b"rewritten after the snapshot\n").expect("rewrite");
    fs::write(p("nested/hard-b"), b"changed through the other name\n").expect("rewrite hard link");
    File::options()
        .write(true)
        .open(p("sparse"))
        .expect("open sparse")
        .write_all_at(b"filled", SPARSE_DATA_AT)
        .expect("overwrite the middle");
    set_xattr(&p("xattrs"), "user.color", b"red");
    chmod(&p("owned"), 0o600);
    chown(&p("setuid"), (0, 0));
    fs::remove_file(p("empty")).expect("remove");
    fs::write(p("nested/deeper/added"), b"new\n").expect("add");
    fs::remove_file(p("rel-link")).expect("remove link");
    symlink("owned", &p("rel-link"));
    set_times(&p("nested"), LONG_AGO, LONG_AGO);

    let restored = create_from(&mut d, "restored", from_snapshot(&snap.snapshot_id)).await;
    let restored = mount(&mut d, restored, "restored").await;
    assert_same_tree(&expected, &observe(&restored.target));

    unmount_and_delete(&mut d, restored).await;
    delete_snapshot(&mut d, &snap.snapshot_id).await;
    unmount_and_delete(&mut d, src).await;
}

/// Every entry under `root` with its lstat, never following a link.
fn walk(root: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if md.is_dir() {
            for e in fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("readdir").path());
            }
        }
        out.push((p, md));
    }
    out
}

fn atime(p: &Path) -> (i64, i64) {
    let md = fs::symlink_metadata(p).expect("lstat");
    (md.atime(), md.atime_nsec())
}

#[tokio::test]
async fn symlink_out_of_the_pool_is_copied_as_a_link_and_never_followed() {
    const SECRET: &[u8] = b"outside the pool: must never be copied\n";
    let mut d = Driver::start().await;
    let outside = d.path("outside");
    fs::create_dir(&outside).expect("mkdir outside");
    fs::write(outside.join("secret"), SECRET).expect("write secret");
    let src = create_mounted(&mut d, "src").await;
    let links = [
        ("to-dir", outside.clone()),
        ("to-file", outside.join("secret")),
        // From <pool>/volumes/src (and from <pool>/snapshots/snap): up to the test directory.
        ("to-dir-relative", PathBuf::from("../../../../../outside")),
    ];
    for (name, target) in &links {
        symlink(target, &src.target.join(name));
    }
    let src_data = d.pool_dir().join("volumes/src");
    assert_eq!(
        fs::canonicalize(src_data.join("to-dir-relative")).expect("resolve"),
        fs::canonicalize(&outside).expect("resolve"),
        "the relative link must point out of the pool for this test to mean anything"
    );
    // Under relatime a read of the file or a listing of the directory would move these.
    set_times(&outside.join("secret"), LONG_AGO, LONG_AGO);
    set_times(&outside, LONG_AGO, LONG_AGO);

    let snap = d.snapshot("snap", &src.id).await.expect("CreateSnapshot");

    let snap_data = d.pool_dir().join("snapshots/snap");
    for (name, target) in &links {
        let link = snap_data.join(name);
        let md = fs::symlink_metadata(&link).unwrap_or_else(|e| panic!("{} not in the snapshot: {e}", link.display()));
        assert!(md.file_type().is_symlink(), "{name} was not copied as a symlink");
        assert_eq!(
            &fs::read_link(&link).expect("readlink"),
            target,
            "{name} points elsewhere"
        );
    }
    for (p, md) in walk(&d.pool_dir()) {
        assert_ne!(
            p.file_name(),
            Some(OsStr::new("secret")),
            "{} came from outside",
            p.display()
        );
        if md.is_file() && md.len() == SECRET.len() as u64 {
            assert_ne!(
                fs::read(&p).expect("read"),
                SECRET,
                "{} holds the outside file",
                p.display()
            );
        }
    }
    assert_eq!(
        atime(&outside.join("secret")),
        LONG_AGO,
        "the file outside the pool was read"
    );
    assert_eq!(atime(&outside), LONG_AGO, "the directory outside the pool was listed");

    delete_snapshot(&mut d, &snap.snapshot_id).await;
    unmount_and_delete(&mut d, src).await;
    assert_eq!(fs::read(outside.join("secret")).expect("secret still there"), SECRET);
}

// Symlinks, fifos and device nodes carry xattrs too (trusted.*, security.* labels); a copy keeps them.
#[tokio::test]
async fn xattrs_of_symlinks_fifos_and_device_nodes_survive_a_snapshot() {
    let mut d = Driver::start().await;
    let src = create_mounted(&mut d, "src").await;
    let p = |rel: &str| src.target.join(rel);
    symlink("somewhere", &p("link"));
    nix::unistd::mkfifo(&p("fifo"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
    nix::sys::stat::mknod(
        &p("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
    // user.* is not allowed on these kinds of file; trusted.* (and security.*) is.
    for rel in ["link", "fifo", "null"] {
        set_xattr(&p(rel), "trusted.cellar", rel.as_bytes());
    }

    let snap = d.snapshot("snap", &src.id).await.expect("CreateSnapshot");
    let restored = create_from(&mut d, "restored", from_snapshot(&snap.snapshot_id)).await;
    let restored = mount(&mut d, restored, "restored").await;
    let lost: Vec<&str> = ["link", "fifo", "null"]
        .into_iter()
        .filter(|rel| {
            xattrs(&restored.target.join(rel)).get(b"trusted.cellar".as_slice()) != Some(&rel.as_bytes().to_vec())
        })
        .collect();

    unmount_and_delete(&mut d, restored).await;
    delete_snapshot(&mut d, &snap.snapshot_id).await;
    unmount_and_delete(&mut d, src).await;
    assert!(lost.is_empty(), "trusted.cellar lost on {lost:?}");
}
