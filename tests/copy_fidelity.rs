//! A copy made for a snapshot, a restore or a clone keeps everything a workload can see of its files:
//! owners, modes with set-id and sticky bits, nanosecond times, xattrs, symlinks (never followed),
//! hard links, holes, fifos and device nodes. Each test writes a tree through a published volume,
//! copies it through the CSI API, publishes the copy and compares the two trees entry by entry.

mod common;
use common::tree::*;
use common::*;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use cellar::csi::v1::volume_content_source::Type;
use cellar::csi::v1::{DeleteSnapshotRequest, Volume, VolumeContentSource};
use nix::sys::stat::Mode;

// ---------------------------------------------------------------------------------------------
// CSI steps

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
    make_null_device(&p("null"));
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

/// A tree as deep as a copy takes (1,000 levels) is snapshotted whole: the copy recursed once per
/// level on a thread with a 2 MiB stack, overflowed it and aborted the whole driver.
#[tokio::test]
async fn a_snapshot_of_a_tree_1000_levels_deep_is_whole_and_the_driver_lives() {
    let mut d = Driver::start().await;
    let src = create_mounted(&mut d, "src").await;
    let deep: PathBuf = std::iter::repeat_n("d", 1000).collect();
    fs::create_dir_all(src.target.join(&deep)).expect("mkdir");
    fs::write(src.target.join(&deep).join("bottom"), b"at the bottom\n").expect("write");
    let snap = d.snapshot("snap", &src.id).await.expect("CreateSnapshot");
    let copied = d.pool_dir().join("snapshots/snap").join(&deep).join("bottom");
    assert_eq!(fs::read(&copied).expect("the bottom was copied"), b"at the bottom\n");
    delete_snapshot(&mut d, &snap.snapshot_id).await;
    unmount_and_delete(&mut d, src).await;
}
