//! The engine's create plan, its size checks and its rules for leftovers, on pools in a temporary
//! directory: `dir` volumes and ext4 `image` files need no root and no device; `btrfs` volumes and
//! failing filesystem tools are played by the recording fakes of `sys` ([`faked`]).

use std::sync::Arc;

use super::*;
use crate::storage::config::Config;
use crate::sys::files::{Files, LinuxFiles, RecordingFiles};
use crate::sys::filesystems::RecordingFilesystems;
use crate::sys::fstools::FsType;
use crate::sys::subvolumes::RecordingSubvolumes;

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    engine: LocalEngine,
}

/// An engine over one pool (`default`) allowing dir and image volumes, whose image filesystem
/// when a request names none is `fs`.
fn engine(fs: FsType) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].layouts.push(Layout::Image);
    config.pools[0].fs_type = fs;
    let engine = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    Fixture { _dir: dir, engine }
}

/// A per-volume group snapshot request of `members`, frozen at most 5 s.
fn per_volume_group(name: &str, members: Vec<VolumeId>) -> NewGroup {
    NewGroup {
        name: name.into(),
        members,
        parameters: BTreeMap::new(),
        per_volume: true,
        freeze_timeout: std::time::Duration::from_secs(5),
    }
}

fn default_pool(e: &LocalEngine) -> &Pool {
    e.pool(&PoolName::parse("default").expect("pool"))
        .expect("the default pool")
}

fn id(rec: &VolumeRecord) -> VolumeId {
    rec.id.clone()
}

#[test]
fn a_create_repeated_returns_the_same_volume_and_another_request_under_its_name_is_refused() {
    let f = engine(FsType::Ext4);
    let first = f
        .engine
        .create_volume(NewVolume::plain("pvc-a", None, MIB))
        .expect("create");
    let again = f
        .engine
        .create_volume(NewVolume::plain("pvc-a", None, MIB))
        .expect("repeat");
    assert_eq!(first, again, "the same request gets the same record");
    for other in [
        NewVolume::plain("pvc-a", None, 2 * MIB),
        NewVolume::plain("pvc-a", Some(Layout::Image), MIB),
    ] {
        match f.engine.create_volume(other) {
            Err(StorageError::Conflict(m)) => assert!(m.contains("pvc-a"), "{m}"),
            r => panic!("a different request under a taken name must be a conflict: {r:?}"),
        }
    }
}

#[test]
fn a_leftover_under_a_new_name_is_removed_and_never_adopted() {
    let f = engine(FsType::Ext4);
    let pool = default_pool(&f.engine);
    let key = Key::from_name("pvc-left");
    // A crash of an earlier create left its data, and its half-written record, but no record.
    let data = pool.data_path(Kind::Volume, &key);
    std::fs::create_dir_all(&data).expect("leftover dir");
    std::fs::write(data.join("someone-elses-data"), b"old").expect("leftover file");
    let rec = f
        .engine
        .create_volume(NewVolume::plain("pvc-left", None, MIB))
        .expect("create");
    assert!(
        !data.join("someone-elses-data").exists(),
        "the new volume starts empty, not with a leftover's data"
    );
    assert_eq!(f.engine.volume(&id(&rec)), Some(rec), "and its record names it");
}

#[test]
fn every_size_change_is_checked_against_the_request_the_pool_and_its_room() {
    let f = engine(FsType::Ext4);
    let rec = f
        .engine
        .create_volume(NewVolume::plain("pvc-size", None, MIB))
        .expect("create");
    let v = id(&rec);
    let total = crate::sys::statfs::usage(default_pool(&f.engine).root())
        .expect("usage")
        .total_bytes;
    let range = |required, limit| CapacityRange { required, limit };
    assert!(matches!(
        f.engine.expand_volume(&v, range(i64::MAX as u64, 0)),
        Err(StorageError::OutOfRange(m)) if m.contains("holds")
    ));
    assert!(matches!(
        f.engine.expand_volume(&v, range(total, 0)),
        Err(StorageError::Exhausted(m)) if m.contains("more bytes")
    ));
    assert!(matches!(
        f.engine.expand_volume(&v, range(0, MIB / 2)),
        Err(StorageError::OutOfRange(m)) if m.contains("cannot shrink")
    ));
    assert!(matches!(
        f.engine.create_volume(NewVolume {
            capacity: range(4 * MIB, 2 * MIB),
            ..NewVolume::plain("pvc-bad-range", None, 0)
        }),
        Err(StorageError::OutOfRange(_))
    ));
    assert_eq!(
        f.engine.volume(&v).expect("still there").capacity_bytes,
        MIB,
        "nothing changed"
    );
    let (grown, _) = f.engine.expand_volume(&v, range(2 * MIB, 0)).expect("grow within room");
    assert_eq!(grown.capacity_bytes, 2 * MIB);
}

#[test]
fn a_restore_keeps_its_sources_filesystem_and_refuses_another() {
    // The pool's default is xfs; the source was made as ext4 on purpose.
    let f = engine(FsType::Xfs);
    let src = f
        .engine
        .create_volume(NewVolume {
            fs_type: "ext4".into(),
            ..NewVolume::plain("pvc-src", Some(Layout::Image), 32 * MIB)
        })
        .expect("source");
    let snap = f
        .engine
        .create_snapshot("snap-src", &id(&src), false)
        .expect("snapshot");
    let from_snap = || Some(Source::Snapshot(snap.id.clone()));
    let restored = f
        .engine
        .create_volume(NewVolume {
            source: from_snap(),
            ..NewVolume::plain("pvc-restored", Some(Layout::Image), 32 * MIB)
        })
        .expect("restore");
    assert_eq!(restored.fs_type, "ext4", "a restore keeps the source's filesystem");
    match f.engine.create_volume(NewVolume {
        source: from_snap(),
        fs_type: "xfs".into(),
        ..NewVolume::plain("pvc-other-fs", Some(Layout::Image), 32 * MIB)
    }) {
        Err(StorageError::Unsupported(m)) => assert!(m.contains("ext4"), "{m}"),
        r => panic!("a restore naming another filesystem must be refused: {r:?}"),
    }
    let pool = default_pool(&f.engine);
    assert!(
        !pool.data_path(Kind::Volume, &Key::from_name("pvc-other-fs")).exists(),
        "a refused restore makes nothing"
    );
}

#[test]
fn a_delete_removes_the_data_and_the_record_and_is_repeatable() {
    let f = engine(FsType::Ext4);
    let rec = f
        .engine
        .create_volume(NewVolume::plain("pvc-del", None, MIB))
        .expect("create");
    let v = id(&rec);
    let pool = default_pool(&f.engine);
    let key = Key::from_name("pvc-del");
    f.engine.delete_volume(&v).expect("delete");
    assert_eq!(f.engine.volume(&v), None);
    assert!(!pool.data_path(Kind::Volume, &key).exists(), "data gone");
    assert!(!pool.record_path(Kind::Volume, &key).exists(), "record gone");
    f.engine
        .delete_volume(&v)
        .expect("a delete of a volume already gone is OK");
}

/// A dir volume `name` whose tree goes one level deeper than a copy takes: `MAX_DEPTH` levels of
/// long names, then `too-deep/file`. Its id, and the deepest level a copy takes (to flatten it).
fn too_deep_volume(f: &Faked, name: &str) -> (VolumeId, std::os::fd::OwnedFd) {
    let v = f
        .engine
        .create_volume(NewVolume::plain(name, Some(Layout::Dir), 32 * MIB))
        .expect("create")
        .id;
    let data = f.pool().data_path(Kind::Volume, &Key::from_name(name));
    let deepest = crate::sys::tree::testing::deep_dirs(&data, crate::sys::tree::MAX_DEPTH);
    nix::sys::stat::mkdirat(&deepest, "too-deep", nix::sys::stat::Mode::from_bits_truncate(0o755)).expect("mkdir");
    let below = nix::fcntl::openat(
        &deepest,
        "too-deep",
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open");
    crate::sys::tree::testing::file_at(&below, "file", b"deep");
    (v, deepest)
}

/// Moves the level below the deepest a copy takes up into it, as a workload flattens its tree.
fn flatten(deepest: &std::os::fd::OwnedFd) {
    nix::fcntl::renameat(deepest, "too-deep/file", deepest, "file").expect("move the file up");
    nix::unistd::unlinkat(deepest, "too-deep", nix::unistd::UnlinkatFlags::RemoveDir).expect("rmdir");
}

/// A call refused for the volume's content: FAILED_PRECONDITION (not INTERNAL, which says "driver
/// bug" and is retried for ever) in `words` that say what is wrong and what would fix it, and
/// nothing of the `kind` object `name` made or left (no data, no record, nothing in `.work`).
fn assert_refused_for_content(
    f: &Faked,
    r: Result<impl std::fmt::Debug, StorageError>,
    kind: Kind,
    name: &str,
    words: &[&str],
) {
    let s = tonic::Status::from(r.expect_err(name));
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{name}: {}", s.message());
    for w in words {
        assert!(s.message().contains(w), "{name}: {}", s.message());
    }
    assert_eq!(
        f.leftovers(),
        Vec::<String>::new(),
        "{name}: nothing in .work, no half record"
    );
    let key = Key::from_name(name);
    assert!(!f.pool().record_path(kind, &key).exists(), "{name}: no record");
    assert!(!f.pool().data_path(kind, &key).exists(), "{name}: no data");
}

const TOO_DEEP: &[&str] = &["deeper than 1000 levels", "flatten it", "image volume"];

/// A snapshot or clone of a dir volume whose tree is deeper than a copy takes is refused as the
/// volume's content, leaving nothing (no copy in `.work`, no data, no record); once the workload
/// flattens the tree the same calls succeed.
#[test]
fn a_copy_of_a_tree_too_deep_is_failed_precondition_leaves_nothing_and_succeeds_once_flattened() {
    let f = faked(FsType::Ext4);
    let (v, deepest) = too_deep_volume(&f, "pvc-deep");
    let snapshot = || f.engine.create_snapshot("snap", &v, false);
    let clone = || {
        f.engine.create_volume(NewVolume {
            source: Some(Source::Volume(v.clone())),
            ..NewVolume::plain("pvc-clone", Some(Layout::Dir), 32 * MIB)
        })
    };
    assert_refused_for_content(&f, snapshot(), Kind::Snapshot, "snap", TOO_DEEP);
    assert_refused_for_content(&f, clone(), Kind::Volume, "pvc-clone", TOO_DEEP);
    assert_eq!(f.engine.snapshot_named("snap"), None);
    assert_eq!(f.engine.volume_named("pvc-clone"), None);

    flatten(&deepest);
    let snap = snapshot().expect("the snapshot once the tree is flattened");
    clone().expect("the clone once the tree is flattened");
    made_or_nothing(&f, Kind::Snapshot, "snap", "CreateSnapshot", &Ok(()));
    made_or_nothing(&f, Kind::Volume, "pvc-clone", "the clone", &Ok(()));
    assert_eq!(snap.source_volume_id, v);
}

/// The condition of a dir volume whose tree is too deep to copy says so, with what it costs (its
/// snapshots refused, its use counted down to that depth only), and the count stops there: the
/// bottom of a workload's tree 5,000 levels deep is not reached.
#[test]
fn the_condition_of_a_dir_volume_too_deep_to_copy_says_so_and_its_count_stops_at_the_limit() {
    let f = faked(FsType::Ext4);
    let (v, deepest) = too_deep_volume(&f, "pvc-deep");
    let at = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&deepest));
    let bottom = crate::sys::tree::testing::deep_dirs(std::path::Path::new(&at), 4000);
    crate::sys::tree::testing::file_at(&bottom, "bottom", &vec![7u8; 8 << 20]);
    drop(bottom);
    let c = f.engine.condition(&v);
    assert!(c.abnormal, "{c:?}");
    assert!(c.message.contains(TOO_DEEP_TO_COPY), "{}", c.message);
    assert!(c.message.contains("1000 levels at most"), "{}", c.message);
    assert!(c.message.contains("flattened"), "{}", c.message);
    assert_eq!(
        crate::csi::health::engine_fault(&c),
        Some(crate::csi::health::TREE_TOO_DEEP)
    );
    let data = f.pool().data_path(Kind::Volume, &Key::from_name("pvc-deep"));
    let counted = crate::sys::tree::allocated_bytes(&data, u64::MAX, true).expect("count");
    assert!(counted.too_deep, "{counted:?}");
    assert!(counted.bytes < 8 << 20, "the walk went below the limit: {counted:?}");
    // std's removal of the test's directory recurses once per level.
    crate::sys::tree::remove_tree(&data).expect("remove");
}

/// A snapshot of a dir volume holding a file with more xattrs than a copy carries is refused as
/// the volume's content, leaving nothing; once the workload removes some, it is made. On xfs,
/// which holds values of 64 KiB (tmpfs and ext4 hold far less than 16 MiB on one file).
#[test]
fn a_snapshot_of_a_file_with_more_xattrs_than_a_copy_carries_is_failed_precondition_and_leaves_nothing() {
    let mut img = crate::sys::loopdev::fixture::Image::new(512 << 20);
    img.attach();
    crate::sys::fstools::mkfs(FsType::Xfs, &img.dev_path(), crate::sys::fstools::Reach::OneNode).expect("mkfs");
    img.mount("xfs");
    let pool = img.mnt.join("pool");
    let f = faked_with(FsType::Ext4, |config, _| {
        config.pools[0].path = pool.clone();
        config.pools[0].layouts = vec![Layout::Dir];
    });
    let v = f
        .engine
        .create_volume(NewVolume::plain("pvc-x", Some(Layout::Dir), 32 * MIB))
        .expect("create")
        .id;
    let file = f
        .pool()
        .data_path(Kind::Volume, &Key::from_name("pvc-x"))
        .join("labelled");
    std::fs::write(&file, b"f").expect("write");
    let names = crate::sys::tree::testing::too_many_xattrs(&file);
    assert_refused_for_content(
        &f,
        f.engine.create_snapshot("snap", &v, false),
        Kind::Snapshot,
        "snap",
        &["16 MiB of extended attributes", "labelled", "image volume"],
    );

    // With their names, 256 values of 64 KiB are still more than 16 MiB.
    for name in &names[..2] {
        crate::sys::tree::testing::remove_xattr(&file, name);
    }
    f.engine
        .create_snapshot("snap", &v, false)
        .expect("made once within the bound");
    made_or_nothing(&f, Kind::Snapshot, "snap", "CreateSnapshot", &Ok(()));
    drop(f);
    img.finish();
}

/// An engine over one pool (`default`) allowing dir, image and btrfs volumes, whose filesystem and
/// btrfs calls are recorded fakes: the pool's directory counts as btrfs, and nothing needs root.
struct Faked {
    dir: tempfile::TempDir,
    engine: LocalEngine,
    files: Arc<RecordingFiles>,
    filesystems: Arc<RecordingFilesystems>,
    subvolumes: Arc<RecordingSubvolumes>,
    devices: Arc<crate::sys::devices::RecordingDevices>,
    mounter: Arc<crate::sys::mount::RecordingMounter>,
    sys: StorageSys,
    config: Config,
}

fn faked(fs: FsType) -> Faked {
    faked_with(fs, |_, _| {})
}

/// [`faked`], its configuration changed by `tweak` (given the test's directory) before it opens.
fn faked_with(fs: FsType, tweak: impl FnOnce(&mut Config, &std::path::Path)) -> Faked {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].layouts.extend([Layout::Image, Layout::Btrfs]);
    config.pools[0].fs_type = fs;
    tweak(&mut config, dir.path());
    let files = Arc::new(RecordingFiles::default());
    let filesystems = Arc::new(RecordingFilesystems::default());
    let subvolumes = Arc::new(RecordingSubvolumes::over(dir.path()));
    let devices = Arc::new(crate::sys::devices::RecordingDevices::default());
    let mounter = Arc::new(crate::sys::mount::RecordingMounter::default());
    let sys = StorageSys::fakes(
        files.clone(),
        filesystems.clone(),
        subvolumes.clone(),
        devices.clone(),
        mounter.clone(),
    );
    let engine = LocalEngine::open_with(sys.clone(), NodeId::parse("n1").expect("node"), &config, |_| Some(true))
        .expect("engine");
    Faked {
        dir,
        engine,
        files,
        filesystems,
        subvolumes,
        devices,
        mounter,
        sys,
        config,
    }
}

impl Faked {
    fn pool(&self) -> &Pool {
        default_pool(&self.engine)
    }

    /// A 32 MiB image volume staged on this node: attached, its filesystem mounted at `staging`
    /// (what a consistent snapshot or a group freezes). Its id and the mount point.
    fn staged_image(&self, name: &str) -> (VolumeId, std::path::PathBuf) {
        use crate::sys::devices::Devices;
        use crate::sys::mount::{BindFlags, Mounter};
        let vol = self
            .engine
            .create_volume(NewVolume::plain(name, Some(Layout::Image), 32 * MIB))
            .expect("create");
        let (_, image) = self.engine.volume_data(&vol.id).expect("data");
        let (dev, _) = self.devices.attach(&image, false).expect("attach");
        let at = self.dir.path().join("staging");
        self.mounter
            .mount_fs(&dev.path, &at, "ext4", BindFlags::default())
            .expect("mount");
        (vol.id, at)
    }

    /// What a failed call may have left: anything in `.work`, half-written records, subvolumes.
    fn leftovers(&self) -> Vec<String> {
        let pool = self.pool();
        let mut left: Vec<String> = LinuxFiles
            .list_dir(&pool.work_dir())
            .expect("work")
            .into_iter()
            .map(|p| p.display().to_string())
            .collect();
        for kind in [Kind::Volume, Kind::Snapshot] {
            left.extend(
                LinuxFiles
                    .list_dir(&pool.collection_dir(kind))
                    .expect("collection")
                    .into_iter()
                    .map(|p| p.display().to_string())
                    .filter(|p| p.ends_with(files::TMP_SUFFIX)),
            );
        }
        left
    }

    /// The subvolumes of the pool, by path relative to the pool, with their limits.
    fn subvolumes(&self) -> Vec<(String, u64)> {
        let root = self.pool().root().to_path_buf();
        self.subvolumes
            .below(self.dir.path())
            .into_iter()
            .map(|(p, v)| (p.strip_prefix(&root).unwrap_or(&p).display().to_string(), v.limit))
            .collect()
    }
}

fn failed_with(r: Result<impl std::fmt::Debug, StorageError>, errno: i32) -> bool {
    matches!(r, Err(StorageError::Sys(ref e)) if e.errno() == Some(errno))
}

#[test]
fn an_image_create_whose_mkfs_fails_leaves_nothing_and_its_retry_succeeds() {
    let f = faked(FsType::Ext4);
    let key = Key::from_name("pvc-img");
    let req = || NewVolume::plain("pvc-img", Some(Layout::Image), 32 * MIB);
    for errno in [libc::ENOSPC, libc::EIO] {
        f.filesystems.fail_next("mkfs", errno);
        assert!(
            failed_with(f.engine.create_volume(req()), errno),
            "mkfs failing with {errno}"
        );
        assert_eq!(f.leftovers(), Vec::<String>::new(), "nothing in .work, no half record");
        assert!(!f.pool().data_path(Kind::Volume, &key).exists(), "no image");
        assert!(!f.pool().record_path(Kind::Volume, &key).exists(), "no record");
        assert_eq!(f.engine.volume_named("pvc-img"), None);
    }
    let rec = f.engine.create_volume(req()).expect("the retry");
    assert_eq!(rec.fs_type, "ext4");
    let data = f.pool().data_path(Kind::Volume, &key);
    assert_eq!(crate::sys::fstools::probe(&data).expect("probe"), Some(FsType::Ext4));
    let mkfs = f
        .filesystems
        .calls()
        .iter()
        .filter(|c| c.starts_with("mkfs ext4"))
        .count();
    assert_eq!(mkfs, 3, "two failed, one made");
}

#[test]
fn a_btrfs_create_whose_subvolume_limit_or_commit_fails_leaves_no_subvolume_and_no_record() {
    let f = faked(FsType::Ext4);
    let key = Key::from_name("pvc-b");
    let req = || NewVolume::plain("pvc-b", Some(Layout::Btrfs), 32 * MIB);
    for (op, errno) in [("create", libc::EINTR), ("limit", libc::ENOSPC), ("commit", libc::EIO)] {
        f.subvolumes.fail_next(op, errno);
        assert!(
            failed_with(f.engine.create_volume(req()), errno),
            "{op} failing with {errno}"
        );
        assert_eq!(f.subvolumes(), vec![], "{op}: no subvolume left");
        assert_eq!(f.leftovers(), Vec::<String>::new(), "{op}: no half record");
        assert!(!f.pool().record_path(Kind::Volume, &key).exists(), "{op}: no record");
    }
    f.engine.create_volume(req()).expect("the retry");
    assert_eq!(f.subvolumes(), vec![("volumes/pvc-b".to_string(), 32 * MIB)]);
}

/// A clone whose source is its own future id answers NOT_FOUND and leaves nothing (it took the
/// volume's lock twice and answered ABORTED, which a provisioner retries forever).
#[test]
fn a_volume_cloned_from_its_own_id_is_not_found() {
    let f = faked(FsType::Ext4);
    let made = f
        .engine
        .create_volume(NewVolume::plain("pvc-probe", None, MIB))
        .expect("probe");
    let own = VolumeId(ObjectId {
        key: Key::from_name("pvc-self"),
        ..made.id.0.clone()
    });
    let req = NewVolume {
        source: Some(Source::Volume(own.clone())),
        ..NewVolume::plain("pvc-self", None, MIB)
    };
    match f.engine.create_volume(req) {
        Err(e @ StorageError::VolumeNotFound(_)) => {
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
            assert!(status.message().contains(&own.to_string()), "{status:?}");
        }
        r => panic!("a volume made from itself: {r:?}"),
    }
    assert!(f.engine.volume(&own).is_none());
    assert_eq!(f.leftovers(), Vec::<String>::new());
}

#[test]
fn a_btrfs_clone_whose_limit_fails_leaves_no_snapshot_and_its_retry_is_limited() {
    let f = faked(FsType::Ext4);
    let src = f
        .engine
        .create_volume(NewVolume::plain("pvc-src", Some(Layout::Btrfs), 32 * MIB))
        .expect("source");
    let clone = || NewVolume {
        source: Some(Source::Volume(id(&src))),
        ..NewVolume::plain("pvc-clone", Some(Layout::Btrfs), 64 * MIB)
    };
    f.subvolumes.fail_next("limit", libc::ENOSPC);
    assert!(failed_with(f.engine.create_volume(clone()), libc::ENOSPC));
    assert_eq!(f.subvolumes(), vec![("volumes/pvc-src".to_string(), 32 * MIB)]);
    assert_eq!(f.leftovers(), Vec::<String>::new());
    f.engine.create_volume(clone()).expect("the retry");
    assert_eq!(
        f.subvolumes(),
        vec![
            ("volumes/pvc-clone".to_string(), 64 * MIB),
            ("volumes/pvc-src".to_string(), 32 * MIB)
        ]
    );
}

#[test]
fn a_btrfs_snapshot_that_fails_leaves_nothing_and_its_name_is_not_adopted_from_another_source() {
    let f = faked(FsType::Ext4);
    let mut sources = Vec::new();
    for name in ["pvc-a", "pvc-b"] {
        let rec = f
            .engine
            .create_volume(NewVolume::plain(name, Some(Layout::Btrfs), 32 * MIB))
            .expect("source");
        let data = f.pool().data_path(Kind::Volume, &Key::from_name(name));
        std::fs::write(data.join("owner"), name).expect("write");
        sources.push(id(&rec));
    }
    let snaps = f.pool().collection_dir(Kind::Snapshot);
    // The snapshot itself fails (a full pool), or it is made and its record cannot be written: a
    // link where the record's temp file goes makes that write fail as a full disk would.
    f.subvolumes.fail_next("snapshot", libc::ENOSPC);
    assert!(failed_with(
        f.engine.create_snapshot("snap", &sources[0], false),
        libc::ENOSPC
    ));
    let tmp = snaps.join(format!(".snap.json{}", files::TMP_SUFFIX));
    std::os::unix::fs::symlink("/nonexistent", &tmp).expect("link");
    assert!(failed_with(
        f.engine.create_snapshot("snap", &sources[0], false),
        libc::ELOOP
    ));
    assert!(
        f.subvolumes
            .calls()
            .iter()
            .any(|c| c.starts_with("snapshot ") && c.contains("snap")),
        "the snapshot was made before its record failed"
    );
    assert_eq!(f.subvolumes.below(&snaps), vec![], "no snapshot subvolume left");
    assert_eq!(f.leftovers(), Vec::<String>::new(), "no .tmp record left");
    assert_eq!(f.engine.snapshot_named("snap"), None);

    let other = f
        .engine
        .create_snapshot("snap", &sources[1], false)
        .expect("from the other source");
    assert_eq!(other.source_volume_id, sources[1], "names its own source");
    let data = f.pool().data_path(Kind::Snapshot, &Key::from_name("snap"));
    assert_eq!(
        std::fs::read(data.join("owner")).expect("read"),
        b"pvc-b",
        "and holds its data"
    );
}

#[test]
fn a_btrfs_expand_checks_the_room_before_it_sets_a_limit() {
    let f = faked(FsType::Ext4);
    let rec = f
        .engine
        .create_volume(NewVolume::plain("pvc-grow", Some(Layout::Btrfs), 32 * MIB))
        .expect("create");
    let v = id(&rec);
    let limits = || {
        f.subvolumes
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("limit "))
            .count()
    };
    let before = limits();
    let total = crate::sys::statfs::usage(f.pool().root()).expect("usage").total_bytes;
    let range = |required| CapacityRange { required, limit: 0 };
    assert!(matches!(
        f.engine.expand_volume(&v, range(i64::MAX as u64)),
        Err(StorageError::OutOfRange(_))
    ));
    assert!(matches!(
        f.engine.expand_volume(&v, range(total)),
        Err(StorageError::Exhausted(_))
    ));
    assert_eq!(limits(), before, "no limit was set for a size the pool cannot give");
    assert_eq!(f.subvolumes(), vec![("volumes/pvc-grow".to_string(), 32 * MIB)]);
    f.engine.expand_volume(&v, range(64 * MIB)).expect("grow within room");
    assert_eq!(f.subvolumes(), vec![("volumes/pvc-grow".to_string(), 64 * MIB)]);
    assert!(
        f.subvolumes.calls().last().is_some_and(|c| c.starts_with("commit ")),
        "and committed"
    );
}

#[test]
fn a_restore_of_an_xfs_snapshot_into_an_ext4_pool_probes_and_keeps_xfs() {
    let f = faked(FsType::Ext4);
    let size = FsType::Xfs.min_bytes();
    let src = f
        .engine
        .create_volume(NewVolume {
            fs_type: "xfs".into(),
            ..NewVolume::plain("pvc-xfs", Some(Layout::Image), size)
        })
        .expect("source");
    let snap = f
        .engine
        .create_snapshot("snap-xfs", &id(&src), false)
        .expect("snapshot");
    let restored = f
        .engine
        .create_volume(NewVolume {
            source: Some(Source::Snapshot(snap.id.clone())),
            ..NewVolume::plain("pvc-back", Some(Layout::Image), size)
        })
        .expect("restore");
    assert_eq!(restored.fs_type, "xfs", "the source's filesystem, not the pool's ext4");
    let snap_data = f.pool().data_path(Kind::Snapshot, &Key::from_name("snap-xfs"));
    let calls = f.filesystems.calls();
    assert!(calls.contains(&format!("probe {}", snap_data.display())), "{calls:?}");
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("mkfs")).count(),
        1,
        "a restore copies; it makes no filesystem"
    );
}

#[test]
fn a_delete_whose_disk_fails_once_leaves_no_trash_once_retried() {
    let f = engine(FsType::Ext4);
    let trash = default_pool(&f.engine).trash_dir();
    // The record's removal failing (its directory's fsync), then the purge of the data failing.
    for point in ["file:fsync", "file:remove"] {
        let rec = f
            .engine
            .create_volume(NewVolume::plain("pvc-t", None, MIB))
            .expect("create");
        let (_, data) = f.engine.volume_data(&rec.id).expect("data");
        std::fs::write(data.join("file"), b"bytes").expect("write");
        crate::crash::in_thread::fail_once_at(point, libc::EIO);
        let first = f.engine.delete_volume(&rec.id);
        crate::crash::in_thread::fail_at(None);
        assert!(first.is_err(), "{point} failing fails the delete: {first:?}");
        f.engine.delete_volume(&rec.id).expect("the retried delete");
        assert_eq!(f.engine.volume(&rec.id), None);
        assert_eq!(
            LinuxFiles.list_dir(&trash).expect("trash"),
            Vec::<std::path::PathBuf>::new(),
            "after {point} failed once, the retried delete purges what the first one moved"
        );
    }
}

/// Two controller replicas (`ctl-a`, `ctl-b`) owning one shared pool `share`, in `dir`.
fn replicas(dir: &std::path::Path) -> (LocalEngine, LocalEngine) {
    (replica(dir, "ctl-a", false), replica(dir, "ctl-b", false))
}

/// The controller replica `name` of [`replicas`], with the repository `offsite` (in `dir`,
/// not initialised) when `repository`.
fn replica(dir: &std::path::Path, name: &str, repository: bool) -> LocalEngine {
    let share = dir.join("share");
    let open = |name: &str| {
        let mut config = Config::default_for(&dir.join(name));
        if repository {
            config.repositories = vec![crate::backup::testing::repository(dir)];
        }
        let mut shared = config.pools[0].clone();
        shared.name = PoolName::parse("share").expect("pool");
        shared.path = share.clone();
        shared.backend = crate::storage::config::Backend::Shared;
        config.pools.push(shared);
        LocalEngine::open_pools(NodeId::parse(name).expect("node"), &config, |pc| {
            pc.is_shared().then_some(true)
        })
        .expect("engine")
    };
    open(name)
}

#[test]
fn replicas_never_work_on_one_shared_volume_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = replicas(dir.path());
    let share = PoolName::parse("share").expect("pool");
    let req = || {
        let mut r = NewVolume::plain("pvc-l", None, MIB);
        r.pool = Some(share.clone());
        r
    };
    // Replica a is in the middle of a call on the volume (a create it has not finished).
    let held = a
        .take(Kind::Volume, &share, &Key::from_name("pvc-l"), "pvc-l")
        .expect("a takes the volume");
    match b.create_volume(req()) {
        Err(StorageError::Busy(m)) => assert!(m.contains("another controller replica"), "{m}"),
        r => panic!("b must not build the same volume in the same place at once: {r:?}"),
    }
    let locks = dir.path().join("share/.locks");
    assert_eq!(LinuxFiles.list_dir(&locks).expect("locks").len(), 1);
    drop(held);
    let rec = b.create_volume(req()).expect("once a is done, b makes it");
    assert_eq!(a.create_volume(req()).expect("and a finds it"), rec);
    assert!(
        LinuxFiles.list_dir(&locks).expect("locks").is_empty(),
        "lock files exist only while held"
    );
}

/// Two replicas with the repository `offsite` ([`replica`]) and a backup, kept locally, of a
/// volume of the share, cut and uploaded by `ctl-a`.
fn kept_backup_on_the_share(
    dir: &std::path::Path,
) -> (LocalEngine, LocalEngine, SnapshotRecord, crate::storage::id::BackupId) {
    let (a, b) = (replica(dir, "ctl-a", true), replica(dir, "ctl-b", true));
    let offsite = PoolName::parse("offsite").expect("repository");
    a.backups().open_or_init(&offsite, true).expect("init");
    let mut req = NewVolume::plain("pvc-m", None, MIB);
    req.pool = Some(PoolName::parse("share").expect("pool"));
    let vol = a.create_volume(req).expect("volume");
    let backup = crate::storage::engine::backup::BackupRequest {
        repository: offsite,
        keep_local: true,
    };
    let snap = a.create_backup("snap-m", &vol.id, false, &backup).expect("cut");
    let id = snap.backup.clone().expect("a backup").id;
    a.upload_step(&snap.id).expect("upload");
    (a, b, snap, id)
}

/// `a`'s upload, past its last look for marks, still holds `snap` when the backup's delete comes
/// to `b`: `b` can only mark it off (Busy), and the upload ends without seeing the mark.
fn marked_off_by_the_other(a: &LocalEngine, b: &LocalEngine, snap: &SnapshotRecord, id: &crate::storage::id::BackupId) {
    let uploading = a
        .take(Kind::Snapshot, &snap.id.0.pool, &snap.id.0.key, "snap-m")
        .expect("a holds it");
    match b.forget_local_backup(id) {
        Err(StorageError::Busy(_)) => {}
        other => panic!("b's forget while a uploads: {other:?}"),
    }
    assert!(b.backups().is_marked_deleted(id).expect("repository"), "marked");
    drop(uploading);
}

/// After the delete's retry on `b`: the snapshot is gone, no deletion mark stays for nobody to
/// consume, and no note of it is left on the share (in `dir`).
fn gone_with_its_mark_and_notes(
    b: &LocalEngine,
    snap: &SnapshotRecord,
    id: &crate::storage::id::BackupId,
    dir: &std::path::Path,
) {
    assert!(b.snapshot(&snap.id).is_none(), "the snapshot is gone");
    assert!(
        !b.backups().is_marked_deleted(id).expect("repository"),
        "no mark stays once the snapshot is gone"
    );
    let notes = dir.join("share/.marked-off");
    assert_eq!(
        LinuxFiles.list_dir(&notes).expect("notes"),
        Vec::<std::path::PathBuf>::new()
    );
}

/// A backup's delete through the replica that does not upload it writes a deletion mark to call
/// the other's upload off. When that upload ended without seeing it and the deleting replica
/// died midway through its removal of the snapshot, the delete's retry after the restart still
/// removes the mark (found by racing backup seed 368: the mark was remembered in memory only).
#[test]
fn a_mark_for_the_other_replica_goes_with_a_retry_after_a_restart() {
    use crate::crash::in_thread;
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, snap, id) = kept_backup_on_the_share(dir.path());
    marked_off_by_the_other(&a, &b, &snap, &id);
    in_thread::crash_at(Some("delete:after-trash"));
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.forget_local_backup(&id)));
    in_thread::crash_at(None);
    assert!(died.is_err(), "b died while it removed the snapshot");
    drop(b);
    let b = replica(dir.path(), "ctl-b", true);
    assert!(b.forget_local_backup(&id).expect("the retry after the restart"), "held");
    gone_with_its_mark_and_notes(&b, &snap, &id, dir.path());
}

/// A try that noted its deletion mark and died (or failed) before it wrote the mark does not stop
/// the next try from writing it; nor does a note of the backup naming another pool's snapshot
/// stop the replica from noting its own: the retry once the snapshot is free clears the mark
/// and every note of it.
#[test]
fn a_mark_note_left_without_its_mark_does_not_stop_the_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, snap, id) = kept_backup_on_the_share(dir.path());
    let notes = dir.path().join("share/.marked-off");
    std::fs::create_dir_all(&notes).expect("notes");
    for (n, named) in [
        (1, snap.id.to_string()),
        (2, "snap:local:n1:default:snap-x".to_string()),
    ] {
        std::fs::write(notes.join(format!("{n:020}-{}", id.key())), format!("{id}\n{named}")).expect("note");
    }
    marked_off_by_the_other(&a, &b, &snap, &id);
    assert!(b.forget_local_backup(&id).expect("the retry"), "held");
    gone_with_its_mark_and_notes(&b, &snap, &id, dir.path());
}

/// The notes of deletion marks lie on the share, which every node mounts: a note someone planted
/// there, naming a live snapshot under a backup being deleted, does not make that backup's
/// delete remove the snapshot; a FIFO or a symbolic link planted as a note is passed over (the
/// delete failed on every retry).
#[test]
fn a_planted_mark_note_removes_no_other_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = replica(dir.path(), "ctl-b", true);
    let offsite = PoolName::parse("offsite").expect("repository");
    b.backups().open_or_init(&offsite, true).expect("init");
    let mut req = NewVolume::plain("pvc-p", None, MIB);
    req.pool = Some(PoolName::parse("share").expect("pool"));
    let vol = b.create_volume(req).expect("volume");
    let live = b.create_snapshot("snap-live", &vol.id, false).expect("snapshot");
    let deleted = BackupId::parse("backup:offsite:191afa53-364c-48b7-9db1-c979c83f3c1c").expect("id");
    let notes = dir.path().join("share/.marked-off");
    std::fs::create_dir_all(&notes).expect("notes");
    std::fs::write(
        notes.join(format!("{:020}-{}", 1, deleted.key())),
        format!("{deleted}\n{}", live.id),
    )
    .expect("plant");
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    nix::unistd::mkfifo(&notes.join(format!("{:020}-{}", 2, deleted.key())), mode).expect("fifo");
    std::os::unix::fs::symlink("/etc/hostname", notes.join(format!("{:020}-{}", 3, deleted.key()))).expect("link");
    b.forget_local_backup(&deleted).expect("the delete");
    assert_eq!(b.snapshot(&live.id).as_ref(), Some(&live), "the live snapshot stays");
}

/// A create whose caller gave up (its PVC deleted) after a crash or a failed undo left data no
/// record names: a node pool's start removes it; a record file there that cannot be read keeps
/// its data, and a shared pool's start leaves data alone (another replica may be creating it).
#[test]
fn a_start_removes_data_no_record_names_in_a_node_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].layouts.push(Layout::Image);
    let open = || LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let e = open();
    let pool = default_pool(&e);
    let kept = e
        .create_volume(NewVolume::plain("pvc-kept", None, MIB))
        .expect("create");
    let orphan = pool.data_path(Kind::Volume, &Key::from_name("pvc-orphan"));
    std::fs::create_dir_all(orphan.join("sub")).expect("orphan tree");
    let image = pool.data_path(Kind::Snapshot, &Key::from_name("snap-orphan"));
    std::fs::write(&image, b"an image no record names").expect("orphan image");
    let unread = Key::from_name("pvc-unread");
    std::fs::create_dir_all(pool.data_path(Kind::Volume, &unread)).expect("data");
    std::fs::write(pool.record_path(Kind::Volume, &unread), b"{ a later version").expect("record");
    let (kept_data, kept_record) = (
        pool.data_path(Kind::Volume, &kept.id.0.key),
        pool.record_path(Kind::Volume, &kept.id.0.key),
    );
    drop(e);
    let e = open();
    assert!(!orphan.exists() && !image.exists(), "data no record names is gone");
    assert!(kept_data.exists() && kept_record.exists(), "a recorded volume stays");
    assert!(
        default_pool(&e).data_path(Kind::Volume, &unread).exists(),
        "data under a record it cannot read stays"
    );
    assert!(e.volume(&kept.id).is_some());
    // A removal that fails does not keep the pool from opening; the next start removes it.
    drop(e);
    std::fs::create_dir_all(&orphan).expect("another orphan");
    crate::crash::in_thread::fail_once_at("file:rename", libc::EIO);
    let e = open();
    crate::crash::in_thread::fail_at(None);
    assert!(orphan.exists(), "its removal failed");
    assert!(e.volume(&kept.id).is_some(), "the pool opened all the same");
    drop(e);
    let _e = open();
    assert!(!orphan.exists(), "removed at the next start");

    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = replicas(dir.path());
    let share = a.pool(&PoolName::parse("share").expect("pool")).expect("pool");
    let making = share.data_path(Kind::Volume, &Key::from_name("pvc-making"));
    std::fs::create_dir_all(&making).expect("a replica's create between data and record");
    drop(b);
    let (_a2, _b) = replicas(dir.path());
    assert!(
        making.exists(),
        "a shared pool's start leaves it to the name's next call"
    );
    drop(a);
}

#[test]
fn a_replica_that_starts_leaves_the_other_replicas_copy_in_progress_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = replicas(dir.path());
    let share = PoolName::parse("share").expect("pool");
    let pool = a.pool(&share).expect("pool");
    let (key, crashed) = (Key::from_name("pvc-w"), Key::from_name("pvc-x"));
    // a is building pvc-w's copy; a killed call left pvc-x's behind, its lock file unheld.
    let held = a.take(Kind::Volume, &share, &key, "pvc-w").expect("a takes the volume");
    for k in [&key, &crashed] {
        std::fs::write(pool.work_path(Kind::Volume, k), b"half a copy").expect("work");
    }
    std::fs::write(pool.lock_path(Kind::Volume, &crashed), b"").expect("left lock file");
    drop(b);
    let (_a2, _b) = replicas(dir.path()); // b (and a second a) start again
    assert!(
        pool.work_path(Kind::Volume, &key).exists(),
        "the copy a is building survives b's start"
    );
    assert!(
        !pool.work_path(Kind::Volume, &crashed).exists(),
        "the dead call's copy goes"
    );
    drop(held);
}

#[test]
fn replicas_on_one_shared_pool_agree_on_its_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = replicas(dir.path());
    let mut req = NewVolume::plain("pvc-s", None, MIB);
    req.pool = Some(PoolName::parse("share").expect("pool"));
    let vol = a.create_volume(req).expect("create through a");
    let snap = b.create_snapshot("snap-s", &vol.id, false).expect("snapshot through b");
    let listed = |e: &LocalEngine| e.snapshots().into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(listed(&a), vec![snap.id.clone()], "a lists the snapshot b cut");
    b.delete_snapshot(&snap.id).expect("delete through b");
    assert_eq!(
        listed(&a),
        Vec::<SnapshotId>::new(),
        "nor does a list it once b deleted it"
    );
    assert_eq!(a.snapshot(&snap.id), None);
    a.delete_volume(&vol.id).expect("delete through a");
    assert!(b.volumes().is_empty(), "b no longer lists the volume a deleted");
}

#[test]
fn temporary_files_left_beside_leases_and_stage_marks_are_swept_once_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let pool = default_pool(&e);
    let root = pool.root().to_path_buf();
    let lease = root.join(".leases/pvc-a");
    let temps = [
        root.join(".leases/.pvc-a.0123abcd.tmp"),
        root.join(".staged/pvc-b/.n1.tmp"),
        root.join("volumes/.pvc-c.json.tmp"),
    ];
    std::fs::create_dir_all(root.join(".staged/pvc-b")).expect("stage dir");
    std::fs::write(&lease, b"held").expect("lease");
    for t in &temps {
        std::fs::write(t, b"").expect("temp");
    }
    // On a share a young one may be another node's write in progress: left alone.
    assert_eq!(pool.remove_stale_temps().expect("sweep"), 0);
    assert!(temps.iter().all(|t| t.exists()));
    // Once old enough (here: any age), every one goes, and nothing else does.
    assert_eq!(
        pool.remove_temps_older_than(std::time::Duration::ZERO).expect("sweep"),
        3
    );
    assert!(temps.iter().all(|t| !t.exists()), "{temps:?}");
    assert!(lease.exists(), "the lease itself stays");
    // A lock file left by a process killed mid-call goes at the next sweep; a held one stays.
    let left = root.join(".locks/volumes-pvc-d");
    std::fs::write(&left, b"").expect("lock file");
    let held = LinuxFiles
        .lock_while_held(&root.join(".locks/volumes-pvc-e"))
        .expect("lock")
        .expect("free");
    assert_eq!(pool.remove_stale_temps().expect("sweep"), 1);
    assert!(!left.exists());
    assert!(root.join(".locks/volumes-pvc-e").exists(), "a held lock file stays");
    drop(held);
    assert!(!root.join(".locks/volumes-pvc-e").exists(), "released, it is gone");
}

/// A 1 MiB `dir` volume of each name.
fn dir_volumes(engine: &LocalEngine, names: &[&str]) -> Vec<VolumeId> {
    let make = |n: &&str| engine.create_volume(NewVolume::plain(n, None, MIB)).expect("create").id;
    names.iter().map(make).collect()
}

/// The freeze marks in a pool's `groups/`.
fn freeze_marks(pool: &Pool) -> Vec<std::path::PathBuf> {
    let listed = LinuxFiles.list_dir(&pool.groups_dir()).expect("groups");
    let mark = |p: &std::path::PathBuf| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".frozen-"))
    };
    listed.into_iter().filter(mark).collect()
}

#[test]
fn a_group_snapshot_whose_records_fail_leaves_no_member_behind() {
    let f = engine(FsType::Ext4);
    let vols = dir_volumes(&f.engine, &["pvc-g1", "pvc-g2"]);
    let req = per_volume_group("group-a", vols.clone());
    crate::crash::in_thread::fail_at(Some(("record:write", libc::ENOSPC)));
    let failed = f.engine.create_group(&req);
    crate::crash::in_thread::fail_at(None);
    assert!(failed.is_err(), "{failed:?}");
    let snaps = default_pool(&f.engine).collection_dir(Kind::Snapshot);
    assert_eq!(
        LinuxFiles.list_dir(&snaps).expect("snapshots"),
        Vec::<std::path::PathBuf>::new(),
        "no member's data or record is left by a group snapshot that failed"
    );
    assert!(f.engine.snapshots().is_empty());
    let rec = f.engine.create_group(&req).expect("the retry");
    assert_eq!(rec.members.len(), 2);
}

#[test]
fn a_group_whose_record_write_failed_after_the_rename_names_no_removed_member() {
    // The write of the group's record failed once its file was in place (the directory's fsync,
    // or a share's lost answer): the members go, so the record must go first, or the retry finds
    // it and answers a ready group whose members are gone.
    let f = faked(FsType::Ext4);
    let vols = dir_volumes(&f.engine, &["pvc-r1", "pvc-r2"]);
    let req = per_volume_group("group-r", vols);
    let record = f.pool().group_record_path(&Key::from_name("group-r"));
    f.files.fail_next_at("write_atomic:after", &record, libc::EIO);
    let failed = f.engine.create_group(&req);
    assert!(failed.is_err(), "{failed:?}");
    assert!(!record.exists(), "the record written before the failure is gone");
    assert!(f.engine.snapshots().is_empty(), "and so are the members");
    let rec = f.engine.create_group(&req).expect("the retry");
    for m in &rec.members {
        assert!(
            f.engine.snapshot(&m.snapshot_id).is_some(),
            "member {} is there",
            m.snapshot_id
        );
    }
}

#[test]
fn a_group_whose_freeze_fails_leaves_no_freeze_mark() {
    // A freeze refused (EBUSY: another froze it on purpose) thaws what it froze and keeps no
    // mark: else every retry left one, and the next start would thaw the other's freeze.
    let f = faked(FsType::Ext4);
    let (vol, _) = f.staged_image("pvc-busy");
    let req = NewGroup {
        per_volume: false,
        ..per_volume_group("group-busy", vec![vol])
    };
    for _ in 0..3 {
        f.filesystems.fail_next("freeze", libc::EBUSY);
        let failed = f.engine.create_group(&req);
        assert!(failed.is_err(), "{failed:?}");
    }
    let marks = freeze_marks(f.pool());
    let tries = f.filesystems.calls().iter().filter(|c| c.starts_with("freeze")).count();
    assert_eq!(tries, 3, "each try froze (and was refused)");
    assert!(marks.is_empty(), "failed freezes left marks: {marks:?}");
    assert!(f.filesystems.frozen().is_empty(), "nothing stays frozen");
    f.engine.create_group(&req).expect("the retry once it can freeze");
}

/// A shared pool's `groups/` holds every node's freeze marks. node `n1` took `.frozen-n1-b-<id>`
/// (node n1-b's) for its own: it thawed what n1-b froze and removed the mark n1-b's restart needed.
#[test]
fn a_start_thaws_only_the_freeze_marks_of_its_own_node() {
    use crate::sys::filesystems::{Filesystems, FreezePoint};
    let f = faked(FsType::Ext4);
    let theirs = f
        .pool()
        .groups_dir()
        .join(format!(".frozen-n1-b-{}", uuid::Uuid::new_v4().simple()));
    LinuxFiles
        .write_atomic(&theirs, b"/mnt/of-n1-b", files::Durability::ProcessCrash)
        .unwrap();
    f.filesystems
        .freeze(&FreezePoint {
            mountpoint: PathBuf::from("/mnt/of-n1-b"),
            device: PathBuf::from("/dev/loop-any"),
        })
        .unwrap();
    LocalEngine::open_with(f.sys.clone(), NodeId::parse("n1").expect("node"), &f.config, |_| {
        Some(true)
    })
    .expect("engine");
    assert_eq!(freeze_marks(f.pool()), vec![theirs], "n1-b's mark stays");
    assert_eq!(
        f.filesystems.frozen(),
        vec![PathBuf::from("/mnt/of-n1-b")],
        "and what it froze"
    );
}

#[test]
fn a_consistent_snapshot_that_fails_mid_copy_leaves_a_mark_the_next_start_thaws() {
    use crate::sys::filesystems::Filesystems;
    let f = faked(FsType::Ext4);
    // Staged on this node: attached and its filesystem mounted.
    let (vol, at) = f.staged_image("pvc-f");
    // The copy fails while the filesystem is frozen, and its thaw fails too, every try.
    crate::crash::in_thread::fail_at(Some(("copy:data", libc::EIO)));
    for _ in 0..5 {
        f.filesystems.fail_next("thaw", libc::EIO);
    }
    let failed = f.engine.create_snapshot("snap-f", &vol, true);
    crate::crash::in_thread::fail_at(None);
    assert!(failed.is_err(), "{failed:?}");
    // (The fake arms one failure per operation: the second thaw try succeeds. What matters here:
    // the mark outlives the failed call, and a start thaws what it names.)
    let marks = || freeze_marks(f.pool()).len();
    assert_eq!(marks(), 1, "a failed consistent copy keeps its freeze mark");
    f.filesystems
        .freeze(&crate::sys::filesystems::FreezePoint {
            mountpoint: at.clone(),
            device: PathBuf::from("/dev/loop-any"),
        })
        .expect("frozen again, as a killed process would leave it");
    let restarted = LocalEngine::open_with(f.sys.clone(), NodeId::parse("n1").expect("node"), &f.config, |_| {
        Some(true)
    })
    .expect("engine");
    assert!(f.filesystems.frozen().is_empty(), "the start thawed it");
    assert_eq!(marks(), 0, "and dropped the mark");
    // A consistent snapshot that succeeds thaws and leaves no mark.
    restarted.create_snapshot("snap-g", &vol, true).expect("snapshot");
    assert!(f.filesystems.frozen().is_empty());
    assert_eq!(marks(), 0);
    assert!(
        f.filesystems.calls().iter().filter(|c| c.starts_with("freeze")).count() >= 2,
        "{:?}",
        f.filesystems.calls()
    );
}

#[test]
fn a_record_found_under_a_key_is_never_answered_for_another_name() {
    // Two names whose key came out the same (a shared pool's name template): the second create,
    // which computed its key before the first made its record, finds that record when it gets the
    // key's lock. The same parameters must not make it answer with the first volume.
    let f = engine(FsType::Ext4);
    let a = f
        .engine
        .create_volume(NewVolume::plain("pvc-a", None, MIB))
        .expect("create");
    let b = NewVolume::plain("pvc-b", Some(a.layout), a.capacity_bytes);
    match create::same_volume(&a, &b, a.layout, &a.fs_type, &None) {
        Err(StorageError::Aborted(m)) => assert!(m.contains("pvc-a") && m.contains("pvc-b"), "{m}"),
        r => panic!("pvc-b answered with pvc-a's record: {r:?}"),
    }
    create::same_volume(
        &a,
        &NewVolume::plain("pvc-a", Some(a.layout), a.capacity_bytes),
        a.layout,
        &a.fs_type,
        &None,
    )
    .expect("the same name and request is the volume made");
}

#[test]
fn a_snapshot_named_as_a_group_member_is_refused_not_adopted() {
    let f = engine(FsType::Ext4);
    let vol = f
        .engine
        .create_volume(NewVolume::plain("pvc-m", None, MIB))
        .expect("create")
        .id;
    let req = per_volume_group("group-m", vec![vol.clone()]);
    let group = f.engine.create_group(&req).expect("group");
    let member = f
        .engine
        .snapshot(&group.members[0].snapshot_id)
        .expect("the member's record");
    // CreateSnapshot under the member's own CSI name, of the member's own source.
    match f.engine.create_snapshot(&member.name, &vol, false) {
        Err(StorageError::Conflict(m)) => assert!(m.contains("member of group snapshot"), "{m}"),
        r => panic!("a group member was answered as a snapshot of its own: {r:?}"),
    }
    assert_eq!(f.engine.snapshots().len(), 1, "nothing made");
}

#[test]
fn a_failed_create_removes_what_it_made_while_it_still_holds_the_name() {
    // Else a second call of the name (a retry, another replica) could take the lock and make its
    // data between the failure and the undo, which would then remove that data.
    use crate::crash::in_thread;
    let f = engine(FsType::Ext4);
    let pause = Arc::new(in_thread::Pause::default());
    std::thread::scope(|s| {
        let (held, engine) = (pause.clone(), &f.engine);
        let first = s.spawn(move || {
            in_thread::fail_at(Some(("record:write", libc::ENOSPC)));
            in_thread::pause_at(Some(("undo:before-clear", held.clone())));
            let r = engine.create_volume(NewVolume::plain("pvc-u", None, MIB));
            in_thread::fail_at(None);
            in_thread::pause_at(None);
            held.release();
            r
        });
        assert!(
            pause.reached(std::time::Duration::from_secs(30)),
            "the failed create comes to its undo"
        );
        let second = f.engine.create_volume(NewVolume::plain("pvc-u", None, MIB));
        pause.release();
        assert!(
            matches!(second, Err(StorageError::Busy(_))),
            "the name is still held while the failed create undoes: {second:?}"
        );
        assert!(first.join().expect("no panic").is_err());
    });
    let rec = f
        .engine
        .create_volume(NewVolume::plain("pvc-u", None, MIB))
        .expect("the retry");
    let (_, data) = f.engine.volume_data(&rec.id).expect("data");
    assert!(data.is_dir(), "its data is in place");
}

#[test]
fn block_ranges_never_walk_a_snapshot_cut_again_under_the_name_they_checked() {
    // A delta is checked on the records (one volume), then walks the files: a snapshot deleted
    // between the two and its name cut again from another volume must not be walked.
    use crate::crash::in_thread;
    use crate::storage::cbt::{MetadataError, Query};
    let f = engine(FsType::Ext4);
    let image = |name: &str| {
        f.engine
            .create_volume(NewVolume::plain(name, Some(Layout::Image), 32 * MIB))
            .expect("volume")
            .id
    };
    let (a, b) = (image("pvc-a"), image("pvc-b"));
    let base = f.engine.create_snapshot("snap-a1", &a, false).expect("base").id;
    let target = f.engine.create_snapshot("snap-a2", &a, false).expect("target").id;
    let pause = Arc::new(in_thread::Pause::default());
    std::thread::scope(|s| {
        let (held, engine) = (pause.clone(), &f.engine);
        let q = Query {
            base: Some(base.clone()),
            target: target.clone(),
            starting_offset: 0,
        };
        let walk = s.spawn(move || {
            in_thread::pause_at(Some(("metadata:opened", held.clone())));
            let r = engine.block_ranges(&q).map(|_| ());
            in_thread::pause_at(None);
            r
        });
        assert!(
            pause.reached(std::time::Duration::from_secs(30)),
            "the query opens its files"
        );
        f.engine.delete_snapshot(&target).expect("delete");
        let again = f
            .engine
            .create_snapshot("snap-a2", &b, false)
            .expect("the name cut from pvc-b");
        assert_eq!(again.id, target, "the same id, of another volume");
        pause.release();
        match walk.join().expect("no panic") {
            Err(MetadataError::Storage(StorageError::SnapshotNotFound(id))) => assert_eq!(id, target.to_string()),
            r => panic!("a walk of a snapshot that changed under it: {r:?}"),
        }
    });
}

#[test]
fn two_creates_at_once_never_both_take_the_same_free_space() {
    // The first create has passed its room check and made its image, not its record yet (stopped
    // there): the room it was promised is not the second's to take, nor an expand's.
    use crate::crash::in_thread;
    let f = faked(FsType::Ext4);
    let room = f.engine.room(f.pool(), Layout::Image).expect("room");
    let small = f
        .engine
        .create_volume(NewVolume::plain("pvc-small", Some(Layout::Image), 32 * MIB))
        .expect("a small volume");
    let room = room - 32 * MIB;
    let most = (room / 3 * 2) & !(MIB - 1);
    let pause = Arc::new(in_thread::Pause::default());
    std::thread::scope(|s| {
        let (held, engine) = (pause.clone(), &f.engine);
        let first = s.spawn(move || {
            in_thread::pause_at(Some(("image:before-rename", held.clone())));
            let r = engine.create_volume(NewVolume::plain("pvc-one", Some(Layout::Image), most));
            in_thread::pause_at(None);
            held.release();
            r
        });
        assert!(
            pause.reached(std::time::Duration::from_secs(30)),
            "the first create stops"
        );
        let second = f
            .engine
            .create_volume(NewVolume::plain("pvc-two", Some(Layout::Image), most));
        let grow = f.engine.expand_volume(
            &small.id,
            CapacityRange {
                required: most,
                limit: 0,
            },
        );
        pause.release();
        assert!(
            matches!(second, Err(StorageError::Exhausted(_))),
            "two thirds of the room twice: {second:?}"
        );
        assert!(
            matches!(grow, Err(StorageError::Exhausted(_))),
            "an expand into the promised room: {grow:?}"
        );
        first.join().expect("no panic").expect("the first create");
    });
    // Once recorded, the first volume holds its room back as every image does; the promise is gone.
    let after = f.engine.room(f.pool(), Layout::Image).expect("room");
    assert!(
        after + MIB >= room - most && after <= room - most + MIB,
        "{after} vs {}",
        room - most
    );
    assert!(lock(&f.engine.promised).values().all(|b| *lock(b) == 0));
}

#[test]
fn a_consistent_snapshot_of_a_shared_image_staged_on_another_node_is_refused() {
    // The replica that cuts it has no mount of it to freeze: cut "consistent" it would not be.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    config.pools[0].layouts.push(Layout::Image);
    let sys = faked(FsType::Ext4).sys;
    let e =
        LocalEngine::open_with(sys, NodeId::parse("ctl-0").expect("node"), &config, |_| Some(true)).expect("engine");
    let vol = e
        .create_volume(NewVolume::plain("pvc-held", Some(Layout::Image), 32 * MIB))
        .expect("create");
    let mut lease = crate::storage::lease::LeaseFile::new("node-2", &vol.id.to_string());
    lease.renewals = 1;
    let pool = default_pool(&e);
    std::fs::write(
        pool.lease_path(&vol.id.0.key),
        serde_json::to_vec(&lease).expect("json"),
    )
    .expect("lease");
    match e.create_snapshot("snap-held", &vol.id, true) {
        Err(StorageError::NotTogether(m)) => assert!(m.contains("node-2") && m.contains("freeze"), "{m}"),
        r => panic!("a consistent snapshot that froze nothing: {r:?}"),
    }
    assert!(e.snapshots().is_empty(), "nothing made");
    e.create_snapshot("snap-held", &vol.id, false)
        .expect("a crash-consistent one is cut");
}

/// Volume `volumes-a`'s delete purges its own trash entries only, not volume `a`'s (named
/// `volumes-a-<uuid>`, which an earlier release's name for `volumes-a` would match) while `a`'s
/// record still names it; and at the pool's next open `a`'s data goes back where its record says
/// (a local pool's open purged the whole trash, leaving a record without its data).
#[test]
fn a_trash_entry_still_recorded_is_neither_taken_by_a_like_named_delete_nor_purged_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::default_for(dir.path());
    let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let a = e.create_volume(NewVolume::plain("a", None, MIB)).expect("create a");
    let other = e
        .create_volume(NewVolume::plain("volumes-a", None, MIB))
        .expect("create volumes-a");
    let pool = default_pool(&e);
    let data = pool.data_path(Kind::Volume, &a.id.0.key);
    std::fs::write(data.join("file"), b"a's data").expect("write");
    // a's delete moved its data and could neither remove its record nor put the data back.
    let entry = pool.trash_path(Kind::Volume, &a.id.0.key);
    std::fs::rename(&data, &entry).expect("to the trash");
    e.delete_volume(&other.id).expect("delete volumes-a");
    assert!(
        entry.join("file").exists(),
        "a's data stays in the trash while a is recorded"
    );
    drop(e);
    let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("reopen");
    let pool = default_pool(&e);
    assert_eq!(std::fs::read(data.join("file")).expect("put back at open"), b"a's data");
    assert_eq!(
        LinuxFiles.list_dir(&pool.trash_dir()).expect("trash"),
        Vec::<PathBuf>::new()
    );
    e.delete_volume(&a.id).expect("delete a");
    assert!(!data.exists() && e.volume(&a.id).is_none());
    assert_eq!(
        LinuxFiles.list_dir(&pool.trash_dir()).expect("trash"),
        Vec::<PathBuf>::new()
    );
    // An earlier release's entry of `volumes-b` (`volumes-b-<uuid>`) reads like volume `b`'s: with
    // both recorded and `b`'s data missing, it is kept, never put in `b`'s place.
    let b = e.create_volume(NewVolume::plain("b", None, MIB)).expect("create b");
    let vb = e
        .create_volume(NewVolume::plain("volumes-b", None, MIB))
        .expect("create volumes-b");
    let b_data = pool.data_path(Kind::Volume, &b.id.0.key);
    std::fs::remove_dir(&b_data).expect("b's data lost (a crashed delete)");
    let old_entry = pool
        .trash_dir()
        .join(format!("volumes-b-{}", uuid::Uuid::new_v4().simple()));
    std::fs::rename(pool.data_path(Kind::Volume, &vb.id.0.key), &old_entry).expect("to the trash");
    drop(e);
    let _e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("reopen");
    assert!(!b_data.exists(), "volumes-b's data is not put in b's place");
    assert!(old_entry.exists(), "kept while an object it may belong to is recorded");
}

/// A record this process cannot read (another version's, one edited by hand) neither stops the
/// pool from opening (every process that opened it failed to start) nor lets a delete of its id
/// or a create of its name remove the data it names (a shared pool read it as "no record": the
/// delete applied the pool's policy, the create cleared the data as a leftover; or as the
/// readable record its replica had cached, whose policy the later version may have changed).
#[test]
fn an_unreadable_record_keeps_its_data_and_does_not_stop_the_pool() {
    for shared in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default_for(dir.path());
        if shared {
            config.pools[0].backend = crate::storage::config::Backend::Shared;
        }
        let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
        let vol = e
            .create_volume(NewVolume::plain("pvc-newer", None, MIB))
            .expect("create");
        let snap = e.create_snapshot("snap-newer", &vol.id, false).expect("snapshot");
        let pool = default_pool(&e);
        let data = pool.data_path(Kind::Volume, &vol.id.0.key);
        std::fs::write(data.join("file"), b"kept").expect("write");
        let later = br#"{"id": "a record of a later version", "layout": "zfs"}"#;
        std::fs::write(pool.record_path(Kind::Volume, &vol.id.0.key), later).expect("record");
        std::fs::write(pool.record_path(Kind::Snapshot, &snap.id.0.key), later).expect("record");
        let e = if shared {
            e
        } else {
            drop(e);
            LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("the pool opens")
        };
        // First while a shared pool's replica still holds the readable record it read before.
        match e.delete_volume(&vol.id) {
            Err(StorageError::Corrupt { reason, .. }) => assert!(reason.contains("left alone"), "{reason}"),
            r => panic!("{shared}: a delete with an unreadable record: {r:?}"),
        }
        // A replica that still has the record read before answers with it; none clears the data.
        match e.create_volume(NewVolume::plain("pvc-newer", None, MIB)) {
            Ok(r) => assert!(shared && r.id == vol.id, "{r:?}"),
            Err(StorageError::Corrupt { .. }) => {}
            r => panic!("{shared}: a create over an unreadable record: {r:?}"),
        }
        assert!(matches!(e.delete_snapshot(&snap.id), Err(StorageError::Corrupt { .. })));
        assert!(e.volumes().iter().all(|v| v.id != vol.id), "{shared}: not listed");
        assert!(matches!(e.delete_volume(&vol.id), Err(StorageError::Corrupt { .. })));
        assert!(matches!(
            e.create_volume(NewVolume::plain("pvc-newer", None, MIB)),
            Err(StorageError::Corrupt { .. })
        ));
        let pool = default_pool(&e);
        assert_eq!(
            std::fs::read(data.join("file")).expect("data kept"),
            b"kept",
            "{shared}"
        );
        assert!(
            pool.data_path(Kind::Snapshot, &snap.id.0.key).exists(),
            "{shared}: snapshot kept"
        );
        assert_eq!(
            std::fs::read(pool.record_path(Kind::Volume, &vol.id.0.key)).expect("record kept"),
            later
        );
    }
}

/// A FIFO or a huge sparse file put in a record's place on a share (any node that mounts it can):
/// the open of the FIFO waited for a writer for ever (a replica's start, or a create of its
/// name, hung), and a huge file was read whole into memory. Both now read as a record that does
/// not parse: the pool opens, the name is refused, nothing there is removed.
#[test]
fn a_fifo_or_huge_file_in_a_records_place_reads_as_an_unreadable_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let node = NodeId::parse("n1").expect("node");
    let e = LocalEngine::open(node.clone(), &config).expect("engine");
    let vol = e
        .create_volume(NewVolume::plain("pvc-real", None, MIB))
        .expect("create");
    let (fifo, huge) = (Key::from_name("pvc-fifo"), Key::from_name("pvc-huge"));
    let record = |kind: Kind, k: &Key| default_pool(&e).record_path(kind, k);
    let (fifo_at, huge_at) = (record(Kind::Volume, &fifo), record(Kind::Volume, &huge));
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    nix::unistd::mkfifo(&fifo_at, mode).expect("mkfifo");
    nix::unistd::mkfifo(&record(Kind::Snapshot, &fifo), mode).expect("mkfifo");
    std::fs::File::create(&huge_at)
        .and_then(|f| f.set_len(crate::sys::files::READ_LIMIT + 1))
        .expect("sparse");
    drop(e);
    // In a thread: a hang is reported as one, not as a test that never ends.
    let (done, end) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let e = LocalEngine::open(node, &config).expect("another replica opens the pool");
        let mut answers = Vec::new();
        for name in ["pvc-fifo", "pvc-huge"] {
            answers.push(e.create_volume(NewVolume::plain(name, None, MIB)).map(|r| r.id));
        }
        let listed: Vec<String> = e.volumes().iter().map(|r| r.name.clone()).collect();
        let snapped = e.create_snapshot("pvc-fifo", &vol.id, false).map(|r| r.id);
        let _ = done.send((answers, listed, snapped));
    });
    let (answers, listed, snapped) = end
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the replica's start and calls end (a FIFO's open waits for ever)");
    for a in answers {
        assert!(matches!(a, Err(StorageError::Corrupt { .. })), "{a:?}");
    }
    assert_eq!(listed, ["pvc-real"]);
    assert!(matches!(snapped, Err(StorageError::Corrupt { .. })), "{snapped:?}");
    let kind = |at: &std::path::Path| std::fs::symlink_metadata(at).expect("kept").file_type();
    use std::os::unix::fs::FileTypeExt;
    assert!(kind(&fifo_at).is_fifo(), "left where it is");
    assert!(kind(&huge_at).is_file());
}

/// A FIFO put where a deleted volume's key is retired (`.retired/<key>` on a share) takes the key,
/// as a retirement note does: the create of that name gets another key (it failed on every retry).
#[test]
fn a_fifo_in_a_retired_keys_place_takes_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let key = Key::from_name("pvc-next");
    let retired = default_pool(&e).retired_path(&key);
    std::fs::create_dir_all(retired.parent().expect("dir")).expect("dir");
    nix::unistd::mkfifo(&retired, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let v = e
        .create_volume(NewVolume::plain("pvc-next", None, MIB))
        .expect("made under another key");
    assert_ne!(v.id.0.key, key);
}

/// A controller replica whose name a node also bears (both "controller"): the node's live lease
/// on a staged shared image is that node's, not a leftover of the replica's own, and the delete
/// is refused (it answered OK and the image went to the trash under the running pod).
#[test]
fn a_shared_image_leased_by_a_node_named_like_the_controller_is_not_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    config.pools[0].layouts.push(Layout::Image);
    let sys = faked(FsType::Ext4).sys;
    let e = LocalEngine::open_with(sys, NodeId::parse("controller").expect("node"), &config, |_| Some(true))
        .expect("engine");
    let vol = e
        .create_volume(NewVolume::plain("pvc-held", Some(Layout::Image), 32 * MIB))
        .expect("create");
    let pool = default_pool(&e);
    let node = crate::storage::lease::Leases::new("controller", Arc::new(LinuxFiles));
    let (lease, ttl) = e.shared_lease(&vol.id).expect("leased");
    node.acquire(&lease, &vol.id.to_string(), ttl)
        .expect("the node stages it");
    match e.delete_volume(&vol.id) {
        Err(StorageError::InUse(m)) => assert!(m.contains("controller") && m.contains("lease"), "{m}"),
        r => panic!("a leased image must not be deleted: {r:?}"),
    }
    assert!(lease.exists(), "the lease stays");
    assert!(pool.data_path(Kind::Volume, &vol.id.0.key).exists(), "the data stays");
    assert!(e.volume(&vol.id).is_some(), "the record stays");
}

/// Two nodes stage and unstage one RWX volume at the same moment (a rollout across nodes): the
/// unstage that takes the last mark out removes the marks' directory, maybe between the stage's
/// mkdir and its write, and a delete may list that directory just as it goes. Neither is an error
/// (it was INTERNAL): the stage writes its mark again, the delete sees no marks.
#[test]
fn a_stage_mark_meeting_another_nodes_unstage_is_written_and_read_without_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let e = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let vol = e.create_volume(NewVolume::plain("pvc-rwx", None, MIB)).expect("create");
    let pool = default_pool(&e);
    // The directory is gone when the mark's temp file is made: what the kernel answers then.
    crate::crash::in_thread::fail_once_at("file:create", libc::ENOENT);
    e.mark_staged(&vol.id, true).expect("the mark is written");
    crate::crash::in_thread::fail_at(None);
    assert!(pool.staged_dir(&vol.id.0.key).join("n1").exists());
    match e.delete_volume(&vol.id) {
        Err(StorageError::InUse(m)) => assert!(m.contains("n1"), "{m}"),
        r => panic!("a marked volume must not be deleted: {r:?}"),
    }
    e.mark_staged(&vol.id, false).expect("unmark");
    // The last mark's directory goes between the look and the listing.
    std::fs::create_dir_all(pool.staged_dir(&vol.id.0.key)).expect("mkdir");
    crate::crash::in_thread::fail_once_at("file:list", libc::ENOENT);
    assert_eq!(
        delete::staged_marks(pool, &vol.id.0.key).expect("no marks"),
        Vec::<String>::new()
    );
    crate::crash::in_thread::fail_at(None);
    e.delete_volume(&vol.id).expect("delete");
}

#[test]
fn every_shared_pool_renews_leases_even_once_its_config_no_longer_offers_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeId::parse("n1").expect("node");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    config.pools[0].layouts = vec![Layout::Dir, Layout::Image];
    let e = LocalEngine::open(node.clone(), &config).expect("engine");
    let vol = e
        .create_volume(NewVolume::plain("pvc-img", Some(Layout::Image), 16 << 20))
        .expect("create");
    assert!(
        e.shared_lease(&id(&vol)).is_some(),
        "an image on a share is leased at stage"
    );
    drop(e);
    // The pool stops offering images: the image volumes it holds still stage (and lease), so
    // their leases must still be renewed, or another node takes them over under a live mount.
    config.pools[0].layouts = vec![Layout::Dir];
    let e = LocalEngine::open(node, &config).expect("engine");
    assert!(e.shared_lease(&id(&vol)).is_some());
    assert_eq!(e.leasing_pools(), vec![config.pools[0].name.clone()]);
}

/// Runs `call` once to learn which file operations it makes, then, for each of them, on a fresh
/// engine made ready by `setup`, fails its first call with EIO, hands the outcome to `check`, and
/// lets `retry` repeat the call with nothing failing. Returns the operations tried.
fn each_file_operation_failing<T>(
    layout: Layout,
    setup: impl Fn(&Faked) -> T,
    call: impl Fn(&Faked, &T) -> Result<(), StorageError>,
    check: impl Fn(&Faked, &T, &str, &Result<(), StorageError>),
) -> Vec<&'static str> {
    let f = faked(FsType::Ext4);
    let t = setup(&f);
    let before = f.files.calls().len();
    call(&f, &t).unwrap_or_else(|e| panic!("{layout:?}: the call succeeds with nothing failing: {e}"));
    let ops = f.files.ops_since(before);
    for op in &ops {
        let f = faked(FsType::Ext4);
        let t = setup(&f);
        f.files.fail_next(op, libc::EIO);
        let r = call(&f, &t);
        f.files.disarm();
        check(&f, &t, op, &r);
        assert_eq!(
            f.leftovers(),
            Vec::<String>::new(),
            "{layout:?}, {op} failing: nothing in .work, no half record"
        );
        call(&f, &t).unwrap_or_else(|e| panic!("{layout:?}, {op} failing: the retry succeeds: {e}"));
        check(&f, &t, op, &Ok(()));
    }
    ops
}

/// After a make (create, clone, snapshot) that failed or succeeded: made with its data and record,
/// or neither (no data without a record).
fn made_or_nothing(f: &Faked, kind: Kind, name: &str, what: &str, r: &Result<(), StorageError>) {
    let key = Key::from_name(name);
    let (data, record) = (f.pool().data_path(kind, &key), f.pool().record_path(kind, &key));
    match r {
        Ok(()) => assert!(record.exists() && data.exists(), "{what}: made, with its data"),
        Err(e) => {
            assert!(!record.exists(), "{what} failing ({e}): no record");
            assert!(!data.exists(), "{what} failing ({e}): no data without a record");
        }
    }
}

#[test]
fn any_file_operation_of_a_create_failing_leaves_no_data_without_its_record() {
    for layout in [Layout::Dir, Layout::Btrfs, Layout::Image] {
        let ops = each_file_operation_failing(
            layout,
            |_| (),
            |f, _| {
                f.engine
                    .create_volume(NewVolume::plain("pvc-f", Some(layout), 32 * MIB))
                    .map(drop)
            },
            |f, _, op, r| {
                made_or_nothing(f, Kind::Volume, "pvc-f", &format!("{layout:?}, {op}"), r);
                let listed = f.engine.volume_named("pvc-f").is_some();
                assert_eq!(listed, r.is_ok(), "{layout:?}, {op}: listed when made");
                if r.is_err() {
                    assert!(f.subvolumes().is_empty(), "{layout:?}, {op} failing: no subvolume left");
                }
            },
        );
        assert!(
            ops.contains(&"write_atomic"),
            "{layout:?}: a create writes its record: {ops:?}"
        );
    }
}

#[test]
fn any_file_operation_of_a_delete_failing_leaves_the_volume_whole_or_gone() {
    for layout in [Layout::Dir, Layout::Btrfs, Layout::Image] {
        let key = Key::from_name("pvc-d");
        let ops = each_file_operation_failing(
            layout,
            |f| {
                f.engine
                    .create_volume(NewVolume::plain("pvc-d", Some(layout), 32 * MIB))
                    .expect("the volume")
                    .id
            },
            |f, v| f.engine.delete_volume(v),
            |f, v, op, r| {
                let (data, record) = (
                    f.pool().data_path(Kind::Volume, &key),
                    f.pool().record_path(Kind::Volume, &key),
                );
                let listed = f.engine.volume(v).is_some();
                assert_eq!(record.exists(), listed, "{layout:?}, {op}: listed as on disk");
                if r.is_ok() {
                    assert!(
                        !record.exists() && !data.exists(),
                        "{layout:?}, {op}: deleted, data and record"
                    );
                }
                // Failed: whole, or gone (the record was unlinked, its flush failed).
                assert!(
                    !data.exists() || record.exists(),
                    "{layout:?}, {op}: no data without a record"
                );
                assert!(
                    data.exists() || !record.exists(),
                    "{layout:?}, {op}: a record names its data"
                );
            },
        );
        assert!(
            ops.contains(&"remove_file_if_exists"),
            "{layout:?}: a delete removes its record: {ops:?}"
        );
    }
}

#[test]
fn any_file_operation_of_a_snapshot_failing_leaves_no_snapshot_data_without_its_record() {
    for layout in [Layout::Dir, Layout::Btrfs, Layout::Image] {
        let ops = each_file_operation_failing(
            layout,
            |f| {
                f.engine
                    .create_volume(NewVolume::plain("pvc-s", Some(layout), 32 * MIB))
                    .expect("the source")
                    .id
            },
            |f, v| f.engine.create_snapshot("snap-f", v, false).map(drop),
            |f, v, op, r| {
                made_or_nothing(f, Kind::Snapshot, "snap-f", &format!("{layout:?}, {op}"), r);
                let listed = f.engine.snapshots().into_iter().find(|s| s.name == "snap-f");
                let want = r.as_ref().ok().map(|()| v.clone());
                assert_eq!(
                    listed.map(|s| s.source_volume_id),
                    want,
                    "{layout:?}, {op}: listed when made"
                );
                assert!(f.engine.volume(v).is_some(), "{layout:?}, {op}: the source stays");
            },
        );
        assert!(
            ops.contains(&"write_atomic"),
            "{layout:?}: a snapshot writes its record: {ops:?}"
        );
    }
}

#[test]
fn any_file_operation_of_a_clone_failing_leaves_no_data_without_its_record() {
    for layout in [Layout::Dir, Layout::Btrfs, Layout::Image] {
        each_file_operation_failing(
            layout,
            |f| {
                f.engine
                    .create_volume(NewVolume::plain("pvc-src", Some(layout), 32 * MIB))
                    .expect("the source")
                    .id
            },
            |f, src| {
                f.engine
                    .create_volume(NewVolume {
                        source: Some(Source::Volume(src.clone())),
                        ..NewVolume::plain("pvc-c", Some(layout), 32 * MIB)
                    })
                    .map(drop)
            },
            |f, src, op, r| {
                made_or_nothing(f, Kind::Volume, "pvc-c", &format!("{layout:?}, {op}"), r);
                assert!(f.engine.volume(src).is_some(), "{layout:?}, {op}: the source stays");
            },
        );
    }
}

/// Any process may purge a shared pool's trash while another's delete still holds data there that
/// it may put back (its record's removal failed, or the volume turned out staged): an entry whose
/// object still has a record is never purged; one whose record is gone, an earlier release's
/// name, and a leftover no record named are.
#[test]
fn a_shared_trash_entry_is_purged_only_once_its_record_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let e = LocalEngine::open(NodeId::parse("ctl-0").expect("node"), &config).expect("engine");
    let kept = e
        .create_volume(NewVolume::plain("pvc-kept", None, MIB))
        .expect("create");
    let pool = default_pool(&e);
    let key = |n: &str| Key::from_name(n);
    let data = pool.data_path(Kind::Volume, &key("pvc-kept"));
    std::fs::write(data.join("file"), b"still recorded").expect("write");
    // Its delete moved it and has not removed its record yet (or failed to).
    let recorded = pool.trash_path(Kind::Volume, &key("pvc-kept"));
    std::fs::rename(&data, &recorded).expect("to the trash");
    let tag = || uuid::Uuid::new_v4().simple().to_string();
    let old_recorded = pool.trash_dir().join(format!("pvc-kept-{}", tag()));
    let gone = pool.trash_path(Kind::Volume, &key("pvc-gone"));
    let old_gone = pool.trash_dir().join(format!("pvc-old-{}", tag()));
    let leftover = pool.trash_dir().join(format!("leftover-pvc-kept-{}", tag()));
    // Snapshot `x`'s entry, with no snapshot `x` recorded: a volume keyed `snapshots-x` (whose own
    // entries are named `volumes-snapshots-x-…`) does not keep it.
    e.create_volume(NewVolume::plain("snapshots-x", None, MIB))
        .expect("create");
    let other_kind = pool.trash_path(Kind::Snapshot, &key("x"));
    for d in [&old_recorded, &gone, &old_gone, &leftover, &other_kind] {
        std::fs::create_dir(d).expect("trash entry");
    }
    pool.purge_trash().expect("purge");
    let mut left: Vec<PathBuf> = LinuxFiles.list_dir(&pool.trash_dir()).expect("trash");
    left.sort();
    let mut want = vec![recorded.clone(), old_recorded.clone()];
    want.sort();
    assert_eq!(left, want, "only the entries whose object is still recorded stay");
    // The delete's retry finds the data gone, removes the record; then the purge takes the rest.
    e.delete_volume(&kept.id).expect("the retry");
    pool.purge_trash().expect("purge");
    assert_eq!(
        LinuxFiles.list_dir(&pool.trash_dir()).expect("trash"),
        Vec::<PathBuf>::new()
    );
}

/// A group's delete removes only snapshots whose records name the group: a delete that stopped
/// after its members went (the record still there) and a snapshot cut since under a member's
/// name (so at a member's id) lost that snapshot to the retried delete.
#[test]
fn a_retried_group_delete_leaves_a_snapshot_cut_since_at_a_members_id() {
    use crate::crash::in_thread;
    in_thread::quiet_crashes();
    let f = engine(FsType::Ext4);
    let vol = f
        .engine
        .create_volume(NewVolume::plain("pvc-d", None, MIB))
        .expect("create")
        .id;
    let req = per_volume_group("group-d", vec![vol.clone()]);
    let group = f.engine.create_group(&req).expect("group");
    in_thread::crash_at(Some("delete-group:before-record"));
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.engine.delete_group(&group.id)));
    in_thread::crash_at(None);
    assert!(crashed.is_err(), "the delete stopped before the group's record");
    assert!(f.engine.snapshots().is_empty(), "its members are gone");
    let own = f
        .engine
        .create_snapshot(&format!("group-d-{}", vol.0.key.as_str()), &vol, false)
        .expect("a snapshot of its own under a member's name");
    assert_eq!(own.id, group.members[0].snapshot_id, "at the member's id");
    f.engine.delete_group(&group.id).expect("the retried delete");
    assert!(
        f.engine.snapshot(&own.id).is_some(),
        "the retried group delete removed a snapshot that is not the group's"
    );
    assert!(
        f.engine.group(&group.id).expect("lookup").is_none(),
        "the group is gone"
    );
}

/// The purge tries every trash entry: one it cannot remove (a squashed root on a share may not
/// unlink a pod's files) kept every entry after it in the trash, round after round.
#[test]
fn a_trash_entry_that_cannot_be_purged_does_not_keep_the_others() {
    let f = engine(FsType::Ext4);
    let pool = default_pool(&f.engine);
    let entries: Vec<PathBuf> = ["pvc-a", "pvc-b", "pvc-c"]
        .iter()
        .map(|n| pool.trash_path(Kind::Volume, &Key::from_name(n)))
        .collect();
    for e in &entries {
        std::fs::create_dir(e).expect("trash entry");
        std::fs::write(e.join("file"), b"deleted").expect("file");
    }
    crate::crash::in_thread::fail_once_at("file:remove", libc::EACCES);
    let failed = pool.purge_trash();
    crate::crash::in_thread::fail_at(None);
    assert!(failed.is_err(), "the failure is reported");
    assert_eq!(
        LinuxFiles.list_dir(&pool.trash_dir()).expect("trash").len(),
        1,
        "only the entry that failed is left"
    );
    pool.purge_trash().expect("purge");
    assert!(LinuxFiles.list_dir(&pool.trash_dir()).expect("trash").is_empty());
}

/// A replica's delete acts on the delete policy the share's record says now: when the record's
/// read failed (a share's passing ESTALE or EIO), it applied its cached copy, from before another
/// replica set `retain`, and purged what the user asked to keep.
#[test]
fn a_delete_whose_record_read_fails_never_applies_a_cached_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    let a = LocalEngine::open(NodeId::parse("ctl-0").expect("node"), &config).expect("replica a");
    let files = Arc::new(RecordingFiles::default());
    let sys = StorageSys::fakes(
        files.clone(),
        Arc::new(RecordingFilesystems::default()),
        Arc::new(RecordingSubvolumes::over(dir.path())),
        Arc::new(crate::sys::devices::RecordingDevices::default()),
        Arc::new(crate::sys::mount::RecordingMounter::default()),
    );
    let b =
        LocalEngine::open_with(sys, NodeId::parse("ctl-1").expect("node"), &config, |_| Some(true)).expect("replica b");
    let vol = a
        .create_volume(NewVolume::plain("pvc-keep", None, MIB))
        .expect("create");
    assert!(b.volume(&vol.id).is_some(), "b has it cached");
    let keep = Mutable {
        delete_policy: Some(DeletePolicy::Retain),
        ..Default::default()
    };
    a.modify_volume(&vol.id, &keep).expect("retain, through a");
    let pool = default_pool(&b);
    // A change through b whose read fails does not write b's cached copy back over a's change.
    files.fail_next_at(
        "read_optional",
        &pool.record_path(Kind::Volume, &vol.id.0.key),
        libc::EIO,
    );
    let grown = b.expand_volume(
        &vol.id,
        CapacityRange {
            required: 2 * MIB,
            limit: 0,
        },
    );
    files.disarm();
    assert!(grown.is_err(), "{grown:?}");
    assert_eq!(
        a.volume(&vol.id).expect("the volume").delete_policy,
        Some(DeletePolicy::Retain),
        "a's change stands"
    );
    std::fs::write(pool.data_path(Kind::Volume, &vol.id.0.key).join("f"), b"keep me").expect("write");
    files.fail_next_at(
        "read_optional",
        &pool.record_path(Kind::Volume, &vol.id.0.key),
        libc::EIO,
    );
    let first = b.delete_volume(&vol.id);
    files.disarm();
    if first.is_err() {
        b.delete_volume(&vol.id).expect("the retry");
    }
    let kept = LinuxFiles.list_dir(&pool.retained_dir()).unwrap_or_default();
    assert!(
        kept.iter()
            .any(|p| std::fs::read(p.join("f")).is_ok_and(|d| d == b"keep me")),
        "the volume's data is kept under retain: {kept:?} (first answer {first:?})"
    );
}

/// A DeleteVolume retried after its first answer was lost, when a PVC of the same name was made
/// again meanwhile (a `nameTemplate` renders the same key): the new volume never gets the deleted
/// one's id, so the retry deletes nothing (it deleted the new volume).
#[test]
fn a_templated_key_is_never_reused_by_another_volume_after_a_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    config.pools[0].name_template = Some("${pvc.namespace}-${pvc.name}".into());
    let e = LocalEngine::open(NodeId::parse("ctl-0").expect("node"), &config).expect("engine");
    let pvc = |name: &str| {
        let mut req = NewVolume::plain(name, None, MIB);
        req.parameters = [
            ("csi.storage.k8s.io/pvc/namespace".to_string(), "ns".to_string()),
            ("csi.storage.k8s.io/pvc/name".to_string(), "data".to_string()),
        ]
        .into();
        req
    };
    let first = e.create_volume(pvc("pvc-1")).expect("create");
    assert_eq!(first.id.0.key.as_str(), "ns-data");
    e.delete_volume(&first.id).expect("delete (its answer is lost)");
    let again = e.create_volume(pvc("pvc-2")).expect("the PVC made again");
    assert_ne!(again.id, first.id, "a new volume never takes a deleted one's id");
    e.delete_volume(&first.id).expect("the provisioner's retry");
    assert!(e.volume(&again.id).is_some(), "the retry left the new volume alone");
    let same = e.create_volume(pvc("pvc-2")).expect("a retried create");
    assert_eq!(same.id, again.id);
}

/// A group's part on a node (a group spanning nodes) is not deleted while a member's record there
/// cannot be read: it was skipped, the group's record went, and the member's data was left with
/// nothing able to delete it.
#[test]
fn a_group_part_with_an_unreadable_member_record_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::default_for(dir.path());
    let open = || LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let e = open();
    let vol = e
        .create_volume(NewVolume::plain("pvc-part", None, MIB))
        .expect("create")
        .id;
    let group = e
        .create_group(&per_volume_group("group-part", vec![vol]))
        .expect("group");
    let member = group.members[0].snapshot_id.clone();
    let (record, data) = {
        let pool = default_pool(&e);
        (
            pool.record_path(Kind::Snapshot, &member.0.key),
            pool.data_path(Kind::Snapshot, &member.0.key),
        )
    };
    drop(e);
    std::fs::write(&record, b"{ written by a later version").expect("record");
    // The node restarts and cannot read it.
    let e = open();
    let refused = e.delete_group_part(&group.id, std::slice::from_ref(&member));
    assert!(matches!(refused, Err(StorageError::Corrupt { .. })), "{refused:?}");
    assert!(data.exists(), "the member's data stays");
}

/// A delete on another replica landing between a create's two reads of a templated key (the
/// record, then the retired note) never lets the create take the deleted volume's id: read the
/// other way round, the note was read before the delete wrote it and the record after the delete
/// removed it.
#[test]
fn a_delete_between_a_creates_key_reads_never_hands_it_the_deleted_id() {
    use crate::crash::in_thread;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    config.pools[0].backend = crate::storage::config::Backend::Shared;
    config.pools[0].name_template = Some("${pvc.namespace}-${pvc.name}".into());
    let open = |n: &str| LocalEngine::open(NodeId::parse(n).expect("node"), &config).expect("engine");
    let (a, b) = (open("ctl-0"), open("ctl-1"));
    let pvc = |name: &str| {
        let mut req = NewVolume::plain(name, None, MIB);
        req.parameters = [
            ("csi.storage.k8s.io/pvc/namespace".to_string(), "ns".to_string()),
            ("csi.storage.k8s.io/pvc/name".to_string(), "data".to_string()),
        ]
        .into();
        req
    };
    let first = b.create_volume(pvc("pvc-1")).expect("create");
    let pause = Arc::new(in_thread::Pause::default());
    std::thread::scope(|s| {
        let (held, a) = (pause.clone(), &a);
        let creating = s.spawn(move || {
            in_thread::pause_at(Some(("create:between-key-reads", held.clone())));
            let r = a.create_volume(pvc("pvc-2"));
            in_thread::pause_at(None);
            held.release();
            r
        });
        let paused = pause.reached(std::time::Duration::from_secs(5));
        b.delete_volume(&first.id).expect("delete on the other replica");
        pause.release();
        let made = creating.join().expect("no panic").expect("the new PVC's volume");
        assert_ne!(
            made.id, first.id,
            "the create took the deleted volume's id (paused between its reads: {paused})"
        );
    });
}

/// An uploaded image backup's local copy stays as its volume's base (the next backup reads only
/// what changed since). A backup deleted while its node was cut off is marked deleted, and the
/// node's look for marks (at start, then hourly) now drops such a base copy as it drops a kept
/// one: it stayed, as large as the volume, until the volume's next backup or delete.
#[test]
fn a_base_copy_of_a_backup_deleted_meanwhile_goes_at_the_next_look() {
    let f = faked_with(FsType::Ext4, |c, dir| {
        std::fs::create_dir(dir.join("offsite")).expect("dir");
        c.repositories = vec![crate::backup::testing::repository(&dir.join("offsite"))];
    });
    let repository = PoolName::parse("offsite").expect("name");
    f.engine.backups().open_or_init(&repository, true).expect("init");
    let vol = f
        .engine
        .create_volume(NewVolume::plain("pvc-base", Some(Layout::Image), 32 << 20))
        .expect("volume");
    let req = crate::storage::engine::BackupRequest {
        repository,
        keep_local: false,
    };
    let rec = f.engine.create_backup("snap-base", &vol.id, false, &req).expect("cut");
    let backup = rec.backup.clone().expect("a backup").id;
    f.engine.upload_step(&rec.id).expect("upload");
    let base = || f.engine.snapshot(&rec.id);
    assert!(
        base().is_some_and(|r| r.backup.is_some_and(|m| m.uploaded && !m.keep_local)),
        "the uploaded copy stays as the volume's base"
    );
    assert!(f.engine.drop_copies_marked_deleted(), "the repository answers");
    assert!(base().is_some(), "a live backup's base stays");
    f.engine.backups().mark_deleted(&backup).expect("mark");
    f.engine.backups().forget(&backup).expect("forget");
    assert!(f.engine.drop_copies_marked_deleted(), "the repository answers");
    assert!(base().is_none(), "the base copy of a deleted backup stayed");
    assert!(
        !f.engine.backups().is_marked_deleted(&backup).expect("answers"),
        "the mark is consumed"
    );
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}

/// The default configuration in `dir` and a second pool `name` at `dir/<name>` allowing `layouts`.
fn with_second_pool(
    dir: &std::path::Path,
    name: &str,
    layouts: Vec<Layout>,
) -> (Config, crate::storage::config::PoolConfig) {
    let mut config = Config::default_for(dir);
    let mut pool = config.pools[0].clone();
    pool.name = PoolName::parse(name).expect("pool name");
    pool.path = dir.join(name);
    pool.layouts = layouts;
    config.pools.push(pool.clone());
    (config, pool)
}

#[test]
fn deletes_in_a_pool_that_failed_to_open_are_failed_precondition_not_ok() {
    // An OK would have Kubernetes forget the object while its data stays, found again (and
    // leaked) once the pool opens.
    let dir = tempfile::tempdir().expect("tempdir");
    // Not btrfs here: the pool does not open.
    let (config, _) = with_second_pool(dir.path(), "fast", vec![Layout::Btrfs]);
    let engine = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    assert!(!engine.ready(), "the btrfs-only pool is broken here");
    let broken = |r: Result<(), StorageError>, what: &str| match r {
        Err(e @ StorageError::PoolBroken { .. }) => {
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::FailedPrecondition, "{what}")
        }
        r => panic!("{what} in the broken pool answered {r:?}"),
    };
    let volume = VolumeId::parse("local:n1:fast:pvc-x").expect("id");
    let snapshot = SnapshotId::parse("snap:local:n1:fast:snap-x").expect("id");
    let group = GroupId::parse("group:local:n1:fast:g-x").expect("id");
    broken(engine.delete_volume(&volume), "DeleteVolume");
    broken(engine.delete_snapshot(&snapshot), "DeleteSnapshot");
    broken(engine.delete_group(&group), "DeleteVolumeGroupSnapshot");
    broken(engine.group(&group).map(|_| ()), "GetVolumeGroupSnapshot");
    broken(
        engine.delete_group_part(&group, std::slice::from_ref(&snapshot)),
        "the delete of a group's part",
    );
    // Another node's ids, and the open pool's, are as before: nothing here to delete.
    engine
        .delete_volume(&VolumeId::parse("local:n2:fast:pvc-x").expect("id"))
        .expect("another node's volume");
    engine
        .delete_volume(&VolumeId::parse("local:n1:default:pvc-gone").expect("id"))
        .expect("a volume that is not there");
}

/// A pool that could not be opened at start (its disk not mounted yet, its share's server down)
/// opens once it can, without a restart: with its records, so that its volumes are found again,
/// and cleared as its start would have (a half-made copy in `.work` is gone).
#[test]
fn a_pool_that_failed_to_open_opens_later_with_its_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let in_late = |name: &str| NewVolume {
        pool: Some(late.name.clone()),
        ..NewVolume::plain(name, Some(Layout::Dir), MIB)
    };
    let (volume, snapshot) = {
        let first = LocalEngine::open(node.clone(), &config).expect("engine");
        let v = first.create_volume(in_late("pvc-late")).expect("create");
        let s = first.create_snapshot("snap-late", &v.id, false).expect("snapshot");
        (v, s)
    };
    // The pool's disk is away: a file stands where its root should be.
    let away = dir.path().join("late.away");
    std::fs::rename(&late.path, &away).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = LocalEngine::open(node, &config).expect("engine");
    assert!(!engine.ready());
    assert!(engine.broken_pools().iter().any(|(p, _)| *p == late.name));
    assert!(matches!(
        engine.create_volume(in_late("pvc-new")),
        Err(StorageError::PoolBroken { .. })
    ));
    assert!(matches!(
        engine.delete_volume(&volume.id),
        Err(StorageError::PoolBroken { .. })
    ));
    assert!(engine.reopen_broken().is_empty(), "the root is still a file");
    assert!(!engine.ready());

    // The disk is back, with a copy a crash left half made.
    std::fs::remove_file(&late.path).expect("remove the file");
    std::fs::rename(&away, &late.path).expect("the pool is back");
    let half_made = late.path.join(".work").join("copy-left-by-a-crash");
    std::fs::create_dir_all(&half_made).expect("half-made copy");
    assert_eq!(engine.reopen_broken(), vec![late.name.clone()]);
    assert!(engine.ready(), "{:?}", engine.broken_pools());
    assert!(engine.broken_pools().is_empty());
    assert!(
        !half_made.exists(),
        "the pool's opening clears its .work as a start does"
    );
    assert_eq!(
        engine.volume(&volume.id),
        Some(volume.clone()),
        "its volume is found again"
    );
    assert!(engine.volumes().contains(&volume), "and listed");
    assert_eq!(
        engine.volume_named("pvc-late"),
        Some(volume.clone()),
        "and found by name"
    );
    assert_eq!(engine.snapshot(&snapshot.id), Some(snapshot.clone()));
    let again = engine.create_volume(in_late("pvc-late")).expect("a create retried");
    assert_eq!(again, volume, "a retried create finds the record, not a new volume");
    engine.create_volume(in_late("pvc-new")).expect("a new volume");
    assert!(engine.reopen_broken().is_empty(), "nothing left to open");
    engine.delete_snapshot(&snapshot.id).expect("delete the snapshot");
    engine.delete_volume(&volume.id).expect("delete the volume");
}

/// Every call on one object of a pool here that is not open (its disk not mounted) says so,
/// FAILED_PRECONDITION with the reason: the object is out of reach, not gone. A snapshot, expand,
/// look-up, copy or changed-block query used to answer NOT_FOUND, as for an object that never was.
#[test]
fn calls_on_objects_of_a_pool_that_is_not_open_are_refused_never_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let (volume, snapshot) = {
        let first = LocalEngine::open(node.clone(), &config).expect("engine");
        let v = first
            .create_volume(NewVolume {
                pool: Some(late.name.clone()),
                ..NewVolume::plain("pvc-late", Some(Layout::Dir), MIB)
            })
            .expect("create");
        let s = first.create_snapshot("snap-late", &v.id, false).expect("snapshot");
        (v, s)
    };
    std::fs::rename(&late.path, dir.path().join("late.away")).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = LocalEngine::open(node, &config).expect("engine");
    let broken = |what: &str, r: Result<(), StorageError>| match r {
        Err(e @ StorageError::PoolBroken { .. }) => {
            let shown = e.to_string();
            assert!(shown.contains("pool 'late' is not open"), "{what}: {shown}");
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{what}: {status:?}");
        }
        other => panic!("{what}: want the pool's refusal, got {other:?}"),
    };
    broken("look-up", engine.volume_for_call(&volume.id).map(|_| ()));
    broken(
        "snapshot",
        engine.create_snapshot("snap-new", &volume.id, false).map(|_| ()),
    );
    broken(
        "expand",
        engine
            .expand_volume(
                &volume.id,
                CapacityRange {
                    required: 2 * MIB,
                    limit: 0,
                },
            )
            .map(|_| ()),
    );
    for (what, source) in [
        ("restore", Source::Snapshot(snapshot.id.clone())),
        ("clone", Source::Volume(volume.id.clone())),
    ] {
        let into_default = NewVolume {
            source: Some(source),
            ..NewVolume::plain(&format!("pvc-{what}"), Some(Layout::Dir), MIB)
        };
        broken(what, engine.create_volume(into_default).map(|_| ()));
    }
    match engine.block_ranges(&crate::storage::cbt::Query {
        base: None,
        target: snapshot.id.clone(),
        starting_offset: 0,
    }) {
        Err(crate::storage::cbt::MetadataError::Storage(e)) => broken("changed blocks", Err(e)),
        Err(other) => panic!("changed blocks: want the pool's refusal, got {other:?}"),
        Ok(_) => panic!("changed blocks: want the pool's refusal, got ranges"),
    }
    broken("delete snapshot", engine.delete_snapshot(&snapshot.id).map(|_| ()));
    let cond = engine.condition(&volume.id);
    assert!(
        cond.abnormal && cond.message.contains("pool 'late' is not open"),
        "{cond:?}"
    );
    assert!(
        matches!(
            engine.volume_for_call(&VolumeId::parse("local:n1:default:pvc-none").expect("id")),
            Ok(None)
        ),
        "an open pool's answer is as before"
    );
}

/// A ControllerModifyVolume whose record write fails (ENOSPC, EIO) leaves the volume as it was.
/// The compression property was set on the subvolume first and never put back, so the record
/// and the data disagreed from then on.
#[test]
fn a_modify_whose_record_write_fails_leaves_the_compression_as_it_was() {
    let f = faked(FsType::Ext4);
    let vol = f
        .engine
        .create_volume(NewVolume::plain("pvc-mod", Some(Layout::Btrfs), 32 * MIB))
        .expect("create");
    let before = f.engine.volume(&vol.id).expect("record");
    assert_eq!(before.compression, None);
    f.files.fail_next("write_atomic", libc::ENOSPC);
    let r = f.engine.modify_volume(
        &vol.id,
        &Mutable {
            compression: Some("zstd".into()),
            delete_policy: Some(DeletePolicy::Retain),
        },
    );
    f.files.disarm();
    assert!(failed_with(r, libc::ENOSPC), "the modify fails");
    // The record, in memory and on disk, is as before ...
    let reopened = LocalEngine::open_with(f.sys.clone(), NodeId::parse("n1").expect("node"), &f.config, |_| {
        Some(true)
    })
    .expect("reopen");
    assert_eq!(reopened.volume(&vol.id).expect("record"), before, "record unchanged");
    // ... and so is the data's compression.
    let subvol = f
        .subvolumes
        .below(f.dir.path())
        .into_iter()
        .find(|(p, _)| p.ends_with("volumes/pvc-mod"))
        .expect("the subvolume")
        .1;
    assert_eq!(
        subvol.compression, None,
        "a failed modify changed the volume's compression while its record says none"
    );
}

/// Review of the background reopen: a late pool's freeze marks are thawed while calls are served.
/// A cut running now (here a group snapshot of a volume of the open pool, paused while its
/// filesystem is frozen) must keep its freeze: the late open thawed it, so the members are no
/// longer one point in time, and the cut's own thaw then finds nothing frozen.
#[test]
fn a_late_pools_freeze_mark_does_not_thaw_a_cut_running_now() {
    use crate::crash::in_thread;
    let f = faked_with(FsType::Ext4, |config, dir| {
        let mut late = config.pools[0].clone();
        late.name = PoolName::parse("late").expect("pool name");
        late.path = dir.join("late");
        late.layouts = vec![Layout::Dir];
        late.default_layout = Layout::Dir;
        config.pools.push(late);
        std::fs::write(dir.join("late"), b"not a directory").expect("file");
    });
    assert!(!f.engine.ready(), "the late pool did not open");
    let (vol, at) = f.staged_image("pvc-frozen-now");
    // What an earlier process of this node, killed mid-cut, left in the late pool: a mark naming
    // the same mount point (the group's home was the late pool).
    let late = f.dir.path().join("late");
    std::fs::remove_file(&late).expect("the disk is back");
    std::fs::create_dir_all(late.join("groups")).expect("groups");
    std::fs::write(
        late.join("groups")
            .join(format!(".frozen-n1-{}", uuid::Uuid::new_v4().simple())),
        at.display().to_string(),
    )
    .expect("mark");
    let pause = Arc::new(in_thread::Pause::default());
    let req = NewGroup {
        per_volume: false,
        ..per_volume_group("group-now", vec![vol])
    };
    std::thread::scope(|s| {
        let cut = s.spawn(|| {
            in_thread::pause_at(Some(("group:frozen", pause.clone())));
            let r = f.engine.create_group(&req);
            in_thread::pause_at(None);
            r
        });
        assert!(pause.reached(std::time::Duration::from_secs(20)), "the cut froze");
        assert_eq!(f.filesystems.frozen(), vec![at.clone()]);
        assert_eq!(f.engine.reopen_broken().len(), 1, "the late pool opens");
        let still = f.filesystems.frozen();
        pause.release();
        let _ = cut.join().expect("cut thread");
        assert_eq!(
            still,
            vec![at.clone()],
            "the late open thawed a filesystem a cut running now holds frozen"
        );
    });
}

/// Review of the background reopen, split mode: the controller asks its shared-pools agent
/// whether a pool is shared from the configuration (`pool_is_shared`); a shared pool that has
/// not opened yet answered `false`, so a CreateVolume for it went to node placement (where nodes
/// report the share open, as non-owners) instead of answering FAILED_PRECONDITION here.
#[test]
fn a_shared_pool_not_open_yet_is_still_told_shared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, mut share) = with_second_pool(dir.path(), "share", vec![Layout::Dir]);
    share.backend = crate::storage::config::Backend::Shared;
    config.pools[1] = share.clone();
    std::fs::write(&share.path, b"not a directory").expect("file");
    let engine = LocalEngine::open_pools(NodeId::parse("ctl").expect("node"), &config, |pc| {
        pc.is_shared().then_some(true)
    })
    .expect("engine");
    assert!(!engine.ready());
    assert!(
        engine.pool_is_shared(Some(&share.name)),
        "a configured shared pool is shared whether or not it is open yet"
    );
}

/// Review of the background reopen: a name created in an open pool while a late pool was shut
/// (the late pool holding an older volume of that name) kept answering for the volume the CO was
/// given; once the late pool opens, its record took the name index over, and the retry of the
/// create the CO knows answers ALREADY_EXISTS.
#[test]
fn a_late_pool_does_not_take_over_a_name_made_while_it_was_shut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let in_late = NewVolume {
        pool: Some(late.name.clone()),
        ..NewVolume::plain("pvc-x", Some(Layout::Dir), MIB)
    };
    {
        let first = LocalEngine::open(node.clone(), &config).expect("engine");
        first.create_volume(in_late).expect("create in late");
    }
    let away = dir.path().join("late.away");
    std::fs::rename(&late.path, &away).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = LocalEngine::open(node, &config).expect("engine");
    let in_default = NewVolume::plain("pvc-x", Some(Layout::Dir), MIB);
    let made = engine
        .create_volume(in_default.clone())
        .expect("made in the default pool");
    std::fs::remove_file(&late.path).expect("remove the file");
    std::fs::rename(&away, &late.path).expect("the pool is back");
    assert_eq!(engine.reopen_broken(), vec![late.name.clone()]);
    assert_eq!(engine.volume_named("pvc-x").map(|r| r.id), Some(made.id.clone()));
    assert_eq!(
        engine
            .create_volume(in_default)
            .expect("the retry of the create the CO knows"),
        made
    );
}

/// A group snapshot whose first (home) volume is in a pool that is not open is refused with the
/// pool's reason, as every call on one object is (it answered NOT_FOUND).
#[test]
fn a_group_of_a_volume_in_a_pool_that_is_not_open_is_refused_never_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let volume = {
        let first = LocalEngine::open(node.clone(), &config).expect("engine");
        first
            .create_volume(NewVolume {
                pool: Some(late.name.clone()),
                ..NewVolume::plain("pvc-late-group", Some(Layout::Dir), MIB)
            })
            .expect("create")
    };
    std::fs::rename(&late.path, dir.path().join("late.away")).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = LocalEngine::open(node, &config).expect("engine");
    match engine.create_group(&per_volume_group("group-late", vec![volume.id.clone()])) {
        Err(StorageError::PoolBroken { .. }) => {}
        other => panic!("want the pool's refusal, got {other:?}"),
    }
}

/// An engine of every pool of `config`, keeping rosters in `rosters`, as a node's start opens it.
fn keeping(node: &NodeId, config: &Config, rosters: &std::path::Path) -> LocalEngine {
    LocalEngine::open_keeping(StorageSys::linux(), node.clone(), config, |_| Some(true), Some(rosters)).expect("engine")
}

#[test]
fn a_shut_pools_volumes_stay_listed_from_its_roster_and_keep_their_names() {
    // A pool whose disk is not mounted at start: its volumes used to be left out of every listing
    // (as if deleted), and their names were free for a create in another pool.
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let in_late = |name: &str| NewVolume {
        pool: Some(late.name.clone()),
        ..NewVolume::plain(name, Some(Layout::Dir), MIB)
    };
    let (kept, expanded) = {
        let first = keeping(&node, &config, &rosters);
        let kept = first.create_volume(in_late("pvc-kept")).expect("create");
        let gone = first.create_volume(in_late("pvc-gone")).expect("create");
        let grown = first.create_volume(in_late("pvc-grown")).expect("create");
        first
            .create_volume(NewVolume::plain("pvc-default", Some(Layout::Dir), MIB))
            .expect("create");
        first.delete_volume(&gone.id).expect("delete");
        let range = CapacityRange {
            required: 3 * MIB,
            limit: 0,
        };
        let (expanded, _) = first.expand_volume(&grown.id, range).expect("expand");
        (kept, expanded)
    };
    std::fs::rename(&late.path, dir.path().join("late.away")).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");

    let engine = keeping(&node, &config, &rosters);
    assert!(!engine.ready(), "pool 'late' is shut");
    let listed = engine.volumes_with_condition();
    let names: Vec<&str> = listed.iter().map(|(r, _)| r.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for want in ["pvc-kept", "pvc-grown", "pvc-default"] {
        assert!(names.contains(&want), "{want} is listed: {names:?}");
    }
    for (r, c) in &listed {
        if r.id.0.pool == late.name {
            assert!(c.abnormal, "{}: {c:?}", r.name);
            assert!(
                c.message.contains("pool 'late' of node n1 is not open"),
                "{}",
                c.message
            );
            assert!(c.message.contains("shown as last known"), "{}", c.message);
        } else {
            assert!(!c.abnormal, "{}: {c:?}", r.name);
        }
    }
    let grown = listed.iter().find(|(r, _)| r.id == expanded.id).expect("listed");
    assert_eq!(
        grown.0.capacity_bytes, expanded.capacity_bytes,
        "the roster has the expand"
    );
    // Pages cut from the roster and the records together: every volume once, in id order.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = engine.volumes_after(&after, 1);
        let Some((r, _)) = page.last() else { break };
        after = r.id.to_string();
        paged.push(after.clone());
    }
    let whole: Vec<String> = listed.iter().map(|(r, _)| r.id.to_string()).collect();
    assert_eq!(paged, whole);

    // The name is taken: found, a create of it in its pool waits for the pool (UNAVAILABLE, which
    // the provisioner retries and keeps tracking), and one in another pool is refused.
    assert_eq!(engine.volume_named("pvc-kept").map(|r| r.id), Some(kept.id.clone()));
    match engine.create_volume(in_late("pvc-kept")) {
        Err(e @ StorageError::Unavailable(_)) => {
            assert!(
                e.to_string().contains("pool 'late' of node n1, which is not open"),
                "{e}"
            );
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        }
        other => panic!("want the create to wait for the pool, got {other:?}"),
    }
    match engine.create_volume(NewVolume::plain("pvc-kept", Some(Layout::Dir), MIB)) {
        Err(e @ StorageError::Conflict(_)) => assert!(e.to_string().contains("pool 'late'"), "{e}"),
        other => panic!("want the name refused, got {other:?}"),
    }
    // Calls on it are refused as before, never answered from the roster; a look-up answers it as
    // listed.
    assert!(matches!(
        engine.volume_for_call(&kept.id),
        Err(StorageError::PoolBroken { .. })
    ));
    let (r, c) = engine
        .volume_with_condition(&kept.id)
        .expect("look-up")
        .expect("as last known");
    assert!(
        r == kept && c.abnormal && c.message.contains("shown as last known"),
        "{c:?}"
    );
    let unknown = VolumeId::parse("local:n1:late:pvc-unknown").expect("id");
    assert!(matches!(
        engine.volume_with_condition(&unknown),
        Err(StorageError::PoolBroken { .. })
    ));

    // The pool opens: its records take over, nothing twice.
    std::fs::remove_file(&late.path).expect("remove the file");
    std::fs::rename(dir.path().join("late.away"), &late.path).expect("move the pool back");
    assert_eq!(engine.reopen_broken(), vec![late.name.clone()]);
    let listed = engine.volumes_with_condition();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|(_, c)| !c.abnormal), "{listed:?}");
    assert!(engine.store.shut_volumes().is_empty());
}

/// A node with pool `late` shut at start. Its roster lists the snapshot `snap-kept` and the
/// backup `bk-late` (keepLocal, `uploaded` or not yet) of volume `pvc-late`, not `snap-gone`
/// (deleted); the open default pool holds `snap-default`.
struct ShutPool {
    engine: LocalEngine,
    late: crate::storage::config::PoolConfig,
    source: VolumeRecord,
    kept: crate::storage::record::SnapshotRecord,
    bk: crate::storage::record::SnapshotRecord,
    req: crate::storage::engine::BackupRequest,
}

fn shut_pool_with_snapshots(dir: &std::path::Path, uploaded: bool) -> ShutPool {
    let rosters = dir.join("rosters");
    let (mut config, late) = with_second_pool(dir, "late", vec![Layout::Dir]);
    config.repositories = vec![crate::backup::testing::repository(dir)];
    let req = crate::storage::engine::BackupRequest {
        repository: PoolName::parse("offsite").expect("name"),
        keep_local: true,
    };
    let node = NodeId::parse("n1").expect("node");
    let (source, kept, bk) = {
        let first = keeping(&node, &config, &rosters);
        first.backups().open_or_init(&req.repository, true).expect("init");
        let source = first
            .create_volume(NewVolume {
                pool: Some(late.name.clone()),
                ..NewVolume::plain("pvc-late", Some(Layout::Dir), MIB)
            })
            .expect("create");
        let other = first
            .create_volume(NewVolume::plain("pvc-default", Some(Layout::Dir), MIB))
            .expect("create");
        let kept = first.create_snapshot("snap-kept", &source.id, false).expect("snapshot");
        let gone = first.create_snapshot("snap-gone", &source.id, false).expect("snapshot");
        first
            .create_snapshot("snap-default", &other.id, false)
            .expect("snapshot");
        let bk = first.create_backup("bk-late", &source.id, false, &req).expect("backup");
        if uploaded {
            first.upload_step(&bk.id).expect("uploaded");
        }
        let bk = first.snapshot(&bk.id).expect("kept locally");
        assert_eq!(bk.backup.as_ref().map(|m| m.uploaded), Some(uploaded), "{bk:?}");
        first.delete_snapshot(&gone.id).expect("delete");
        (source, kept, bk)
    };
    std::fs::rename(&late.path, dir.join("late.away")).expect("move the pool away");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = keeping(&node, &config, &rosters);
    assert!(!engine.ready(), "pool 'late' is shut");
    ShutPool {
        engine,
        late,
        source,
        kept,
        bk,
        req,
    }
}

#[test]
fn a_shut_pools_snapshots_stay_listed_from_its_roster_and_keep_their_names() {
    // A pool whose disk is not mounted at start: its snapshots were left out of ListSnapshots (as
    // if deleted), and their names were free for a snapshot of another volume.
    let dir = tempfile::tempdir().expect("tempdir");
    let ShutPool {
        engine,
        late,
        source,
        kept,
        req,
        ..
    } = shut_pool_with_snapshots(dir.path(), false);
    let names =
        |all: Vec<crate::storage::record::SnapshotRecord>| -> Vec<String> { all.into_iter().map(|r| r.name).collect() };
    assert_eq!(
        names(engine.snapshots()),
        ["snap-default"],
        "open pools only, for calls"
    );
    let listed = engine.listed_snapshots();
    assert!(listed.contains(&kept), "listed as recorded: {listed:?}");
    let mut listed = names(listed);
    listed.sort();
    assert_eq!(listed, ["bk-late", "snap-default", "snap-kept"]);
    // Pages of the records and the roster together: every snapshot once, in id order.
    let (mut paged, mut after) = (Vec::new(), String::new());
    while let Some(r) = engine.listed_snapshots_after(&after, 1).pop() {
        after = r.id.to_string();
        paged.push(after.clone());
    }
    let whole: Vec<String> = engine.listed_snapshots().iter().map(|r| r.id.to_string()).collect();
    assert_eq!(paged, whole);

    // The name is taken: found (the controller refuses it for another source), a retry of it
    // waits for the pool (UNAVAILABLE, which the snapshotter retries), its delete is refused.
    assert_eq!(engine.snapshot_named("snap-kept").map(|r| r.id), Some(kept.id.clone()));
    match engine.create_snapshot("snap-kept", &source.id, false) {
        Err(e @ StorageError::Unavailable(_)) => {
            assert!(
                e.to_string().contains("pool 'late' of node n1, which is not open"),
                "{e}"
            );
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        }
        other => panic!("want the retry to wait for the pool, got {other:?}"),
    }
    // A backup's retry too (it answered the recorded backup, whose upload cannot run).
    match engine.create_backup("bk-late", &source.id, false, &req) {
        Err(e @ StorageError::Unavailable(_)) => assert!(e.to_string().contains("not open"), "{e}"),
        other => panic!("want the backup's retry to wait for the pool, got {other:?}"),
    }
    assert!(matches!(
        engine.delete_snapshot(&kept.id),
        Err(StorageError::PoolBroken { .. })
    ));
    assert!(
        engine.snapshot_named("snap-gone").is_none(),
        "a deleted snapshot stays deleted"
    );

    // The pool opens: its records take over, nothing twice; the snapshot takes calls again.
    std::fs::remove_file(&late.path).expect("remove the file");
    std::fs::rename(dir.path().join("late.away"), &late.path).expect("move the pool back");
    assert_eq!(engine.reopen_broken(), vec![late.name.clone()]);
    assert_eq!(engine.listed_snapshots(), engine.snapshots());
    assert_eq!(engine.snapshots().len(), 3);
    assert_eq!(
        engine
            .create_snapshot("snap-kept", &source.id, false)
            .expect("retry")
            .id,
        kept.id
    );
    engine.delete_snapshot(&kept.id).expect("delete");
}

#[test]
fn a_pool_left_out_of_the_configuration_keeps_its_volumes_listed_and_their_deletes_refused() {
    // A pool taken out of the node's configuration (by mistake, or before its disk is moved):
    // DeleteVolume of its volumes answered OK, and Kubernetes forgot volumes whose data stayed on
    // the disk; they were also left out of every listing, as if deleted.
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, old) = with_second_pool(dir.path(), "old", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let (kept, snap) = {
        let first = keeping(&node, &config, &rosters);
        let in_old = NewVolume {
            pool: Some(old.name.clone()),
            ..NewVolume::plain("pvc-old", Some(Layout::Dir), MIB)
        };
        let v = first.create_volume(in_old).expect("create");
        let s = first.create_snapshot("snap-old", &v.id, false).expect("snapshot");
        (v, s)
    };
    let data = old.path.join("volumes").join(kept.id.0.key.as_str());
    assert!(data.is_dir(), "{}", data.display());
    let without = Config::default_for(dir.path());

    let engine = keeping(&node, &without, &rosters);
    assert!(
        engine.ready(),
        "a pool that is not configured does not hold the node back"
    );
    let listed = engine.volumes_with_condition();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (r, c) = &listed[0];
    assert_eq!(r, &kept);
    assert!(c.abnormal, "{c:?}");
    assert!(
        c.message.contains("no longer in the configuration of node n1"),
        "{}",
        c.message
    );
    let forget = format!("remove {}", rosters.join("old.volumes").display());
    assert!(c.message.contains(&forget), "{}", c.message);
    let refused = |r: Result<(), StorageError>, what: &str| match r {
        Err(e @ StorageError::PoolBroken { .. }) => {
            assert!(e.to_string().contains("no longer in the configuration"), "{what}: {e}");
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::FailedPrecondition, "{what}");
        }
        other => panic!("{what} of an object of the pool left out answered {other:?}"),
    };
    refused(engine.delete_volume(&kept.id), "DeleteVolume");
    refused(engine.delete_snapshot(&snap.id), "DeleteSnapshot");
    let unlisted = VolumeId::parse("local:n1:old:pvc-unlisted").expect("id");
    refused(
        engine.delete_volume(&unlisted),
        "DeleteVolume of an id the roster does not list",
    );
    assert!(data.is_dir(), "the data stays");
    let (r, c) = engine
        .volume_with_condition(&kept.id)
        .expect("look-up")
        .expect("as last known");
    assert!(r == kept && c.abnormal, "{c:?}");
    // Its name stays taken: in another pool refused, in its own waiting for the pool, saying why.
    match engine.create_volume(NewVolume::plain("pvc-old", Some(Layout::Dir), MIB)) {
        Err(e @ StorageError::Conflict(_)) => assert!(e.to_string().contains("pool 'old'"), "{e}"),
        other => panic!("want the name refused, got {other:?}"),
    }
    let again = NewVolume {
        pool: Some(old.name.clone()),
        ..NewVolume::plain("pvc-old", Some(Layout::Dir), MIB)
    };
    match engine.create_volume(again.clone()) {
        Err(e @ StorageError::Unavailable(_)) => {
            assert!(e.to_string().contains("no longer in the configuration"), "{e}")
        }
        other => panic!("want the retried create to wait for the pool, got {other:?}"),
    }
    // Reported as not open (the heartbeat's shut pools, the node's storage health), and a
    // backup's delete that finds no copy of its own cannot tell whether the pool holds one.
    assert!(
        engine
            .broken_pools()
            .iter()
            .any(|(p, why)| *p == old.name && why.contains("no longer")),
        "{:?}",
        engine.broken_pools()
    );
    assert!(matches!(
        engine.owned_pools_open(Some(&old.name), "part of a backup"),
        Err(StorageError::Unavailable(_))
    ));
    engine
        .owned_pools_open(Some(&config.pools[0].name), "part of a backup")
        .expect("another pool");
    // Another node's ids, and pools this node never had, are as before: nothing here to delete.
    engine
        .delete_volume(&VolumeId::parse("local:n2:old:pvc-old").expect("id"))
        .expect("another node's volume");
    engine
        .delete_volume(&VolumeId::parse("local:n1:never:pvc-x").expect("id"))
        .expect("a pool this node never had");
    drop(engine);

    // The name given to a shared pool instead: the local pool's ids are still refused.
    let mut shared = without.clone();
    let mut share = old.clone();
    share.path = dir.path().join("old-share");
    share.backend = crate::storage::config::Backend::Shared;
    shared.pools.push(share);
    let engine = keeping(&node, &shared, &rosters);
    refused(
        engine.delete_volume(&kept.id),
        "DeleteVolume with the name a shared pool's",
    );
    match engine.create_volume(again) {
        Err(StorageError::Conflict(_)) => {}
        other => panic!("the name is the local pool's, not the shared one's: got {other:?}"),
    }
    let listed = engine.volumes_with_condition();
    assert!(listed.iter().any(|(r, c)| r.id == kept.id && c.abnormal), "{listed:?}");
    assert!(data.is_dir(), "the data stays");
    drop(engine);

    // Told to forget the pool, the node answers as for a pool it never had.
    std::fs::remove_file(rosters.join("old.volumes")).expect("forget the roster");
    std::fs::remove_file(rosters.join("old.id")).expect("forget the mark");
    let engine = keeping(&node, &without, &rosters);
    assert!(engine.volumes_with_condition().is_empty());
    engine.delete_volume(&kept.id).expect("nothing here to delete");
    assert!(data.is_dir(), "a forgotten pool's data is left alone");
    drop(engine);

    // Added back, the pool opens with its volume, as it was.
    let engine = keeping(&node, &config, &rosters);
    let listed = engine.volumes_with_condition();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(!listed[0].1.abnormal, "{listed:?}");
    engine.delete_snapshot(&snap.id).expect("delete the snapshot");
    engine.delete_volume(&kept.id).expect("delete the volume");
    assert!(!data.exists(), "deleted once its pool is back");
}

#[test]
fn a_roster_is_written_whole_again_before_it_grows_past_twice_its_volumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let config = Config::default_for(dir.path());
    let engine = keeping(&NodeId::parse("n1").expect("node"), &config, &rosters);
    let file = rosters.join("default.volumes");
    let lines = || std::fs::read_to_string(&file).expect("roster").lines().count();
    let v = engine
        .create_volume(NewVolume::plain("pvc-churn", Some(Layout::Dir), MIB))
        .expect("create");
    for _ in 0..crate::storage::roster::REWRITE_AFTER {
        engine.delete_volume(&v.id).expect("delete");
        engine
            .create_volume(NewVolume::plain("pvc-churn", Some(Layout::Dir), MIB))
            .expect("create");
    }
    assert!(
        lines() <= crate::storage::roster::REWRITE_AFTER + 1,
        "{} lines for one volume",
        lines()
    );
    let read = crate::storage::roster::Roster::new(&rosters, engine.files()).read(&config.pools[0].name);
    assert_eq!(read.volumes.keys().collect::<Vec<_>>(), vec![&v.id.to_string()]);
}

#[test]
fn a_roster_written_whole_at_a_creates_first_line_gets_the_line_again() {
    // A create's roster line goes before its record; a rewrite due at that line reads the index,
    // which does not hold the volume yet, and drops it: the create adds it again once indexed.
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let config = Config::default_for(dir.path());
    let engine = keeping(&NodeId::parse("n1").expect("node"), &config, &rosters);
    let file = rosters.join("default.volumes");
    let churn = || NewVolume::plain("pvc-churn", Some(Layout::Dir), MIB);
    // One line per create and per delete: 1 + 2 * 511 = 1,023 since the pool opened.
    let mut v = engine.create_volume(churn()).expect("create");
    for _ in 0..511 {
        engine.delete_volume(&v.id).expect("delete");
        v = engine.create_volume(churn()).expect("create");
    }
    let last = engine
        .create_volume(NewVolume::plain("pvc-last", Some(Layout::Dir), MIB))
        .expect("create");
    let lines = std::fs::read_to_string(&file).expect("roster").lines().count();
    assert_eq!(
        lines, 2,
        "written whole at the last create's first line, then its line again"
    );
    let read = crate::storage::roster::Roster::new(&rosters, engine.files()).read(&config.pools[0].name);
    let mut want = vec![v.id.to_string(), last.id.to_string()];
    want.sort();
    assert_eq!(read.volumes.keys().cloned().collect::<Vec<_>>(), want);
}

#[test]
fn a_pool_whose_mark_cannot_be_remembered_opens_all_the_same() {
    // A full data-dir disk at the first start under a release with marks: the node could not
    // write `<pool>.id`, and the pool, whose volumes are all there, did not open.
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let config = Config::default_for(dir.path());
    let node = NodeId::parse("n1").expect("node");
    // Where the id goes, a directory that no rename can replace.
    let known = rosters.join("default.id");
    std::fs::create_dir_all(known.join("x")).expect("a directory in the id's place");
    let engine = keeping(&node, &config, &rosters);
    assert!(engine.ready(), "{:?}", engine.broken_pools());
    let v = engine
        .create_volume(NewVolume::plain("pvc-open", Some(Layout::Dir), MIB))
        .expect("create");
    drop(engine);
    // Remembered at the next opening that can.
    std::fs::remove_dir_all(&known).expect("room again");
    let engine = keeping(&node, &config, &rosters);
    assert!(engine.ready());
    assert!(known.is_file(), "remembered now");
    assert!(engine.volume_for_call(&v.id).expect("look-up").is_some());
}

#[test]
fn a_pool_directory_without_its_mark_does_not_open_until_its_disk_is_back() {
    // A pool's disk not mounted at start leaves an empty directory in its place. Opened there, its
    // volumes looked deleted and new ones were made on the root disk, hidden once the disk came.
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let made = {
        let first = keeping(&node, &config, &rosters);
        assert!(
            late.path.join(crate::storage::pool::MARK).is_file(),
            "marked at its first opening"
        );
        assert!(rosters.join("late.id").is_file(), "and remembered");
        first
            .create_volume(NewVolume {
                pool: Some(late.name.clone()),
                ..NewVolume::plain("pvc-on-disk", Some(Layout::Dir), MIB)
            })
            .expect("create")
    };
    let disk = dir.path().join("late.disk");
    std::fs::rename(&late.path, &disk).expect("unmount the disk");
    std::fs::create_dir(&late.path).expect("the empty mount point");

    let engine = keeping(&node, &config, &rosters);
    assert!(!engine.ready());
    let why = engine.broken_pools();
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].1.contains("lacks the mark"), "{}", why[0].1);
    assert!(why[0].1.contains("late.id"), "names the way out: {}", why[0].1);
    let listed = engine.volumes_with_condition();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].1.abnormal && listed[0].0.id == made.id, "{listed:?}");
    match engine.create_volume(NewVolume {
        pool: Some(late.name.clone()),
        ..NewVolume::plain("pvc-new", Some(Layout::Dir), MIB)
    }) {
        Err(e @ StorageError::PoolBroken { .. }) => {
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::FailedPrecondition)
        }
        other => panic!("want the pool's refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(&late.path).expect("mount point").count(),
        0,
        "nothing is written on the root disk"
    );
    assert!(engine.reopen_broken().is_empty(), "still not its disk");

    std::fs::remove_dir(&late.path).expect("remove the mount point");
    std::fs::rename(&disk, &late.path).expect("mount the disk");
    assert_eq!(engine.reopen_broken(), vec![late.name.clone()]);
    let listed = engine.volumes_with_condition();
    assert!(listed.iter().all(|(_, c)| !c.abnormal), "{listed:?}");
}

#[test]
fn another_pools_disk_in_a_pools_place_does_not_open_and_forgetting_the_mark_lets_an_emptied_pool_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    drop(keeping(&node, &config, &rosters));
    let default = &config.pools[0];
    // The disks of the two pools swapped.
    let swap = dir.path().join("swap");
    std::fs::rename(&late.path, &swap).expect("move");
    std::fs::rename(&default.path, &late.path).expect("move");
    std::fs::rename(&swap, &default.path).expect("move");
    let engine = keeping(&node, &config, &rosters);
    let why = engine.broken_pools();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(
        why.iter().all(|(_, w)| w.contains("another disk is mounted there")),
        "{why:?}"
    );
    assert!(why[0].1.contains("is marked as pool 'late'"), "{why:?}");
    drop(engine);

    // An emptied pool, on purpose: the operator forgets the node's memory of it.
    std::fs::remove_dir_all(&late.path).expect("empty the pool");
    std::fs::create_dir(&late.path).expect("an empty directory");
    let engine = keeping(&node, &config, &rosters);
    assert!(engine
        .broken_pools()
        .iter()
        .any(|(p, w)| *p == late.name && w.contains("lacks the mark")));
    drop(engine);
    std::fs::remove_file(rosters.join("late.id")).expect("forget");
    std::fs::remove_dir_all(&default.path).expect("empty the other");
    std::fs::remove_file(rosters.join("default.id")).expect("forget");
    let engine = keeping(&node, &config, &rosters);
    assert!(engine.ready(), "{:?}", engine.broken_pools());
}

#[test]
fn a_mark_repaired_by_hand_as_its_refusal_says_opens_and_stays_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let config = Config::default_for(dir.path());
    let node = NodeId::parse("n1").expect("node");
    drop(keeping(&node, &config, &rosters));
    let mark = config.pools[0].path.join(crate::storage::pool::MARK);
    std::fs::write(&mark, b"{ torn").expect("spoil");
    let engine = keeping(&node, &config, &rosters);
    let why = engine.broken_pools();
    assert!(why.len() == 1 && why[0].1.contains("cannot be read"), "{why:?}");
    drop(engine);
    std::fs::write(&mark, br#"{"pool":"default","backend":"local","node":"n1"}"#).expect("repair");
    for start in ["after the repair", "and at the next start"] {
        let engine = keeping(&node, &config, &rosters);
        assert!(engine.ready(), "{start}: {:?}", engine.broken_pools());
    }
}

#[test]
fn a_local_pool_on_a_directory_another_node_uses_does_not_open() {
    // Two nodes given one share as `backend: local`: the second node's start cleared the first
    // one's copies in progress and listed its volumes as its own.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::default_for(dir.path());
    let n1 = LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine");
    let v = n1.create_volume(NewVolume::plain("pvc-n1", None, MIB)).expect("create");
    let copy_in_progress = config.pools[0].path.join("volumes").join("pvc-copying");
    std::fs::create_dir(&copy_in_progress).expect("n1's copy in progress");
    let n2 = LocalEngine::open(NodeId::parse("n2").expect("node"), &config).expect("engine");
    let why = n2.broken_pools();
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(
        why[0].1.contains("the local pool 'default' of node n1") && why[0].1.contains("backend: shared"),
        "{why:?}"
    );
    assert!(n2.volumes_with_condition().is_empty());
    assert!(copy_in_progress.is_dir(), "n2 cleared nothing of n1's");
    assert!(n1.volume(&v.id).is_some());
}

#[test]
fn a_shut_pools_names_stay_taken_while_it_opens() {
    // The roster's entries of a pool opening late were dropped once its records were read, before
    // the pool could be called on: a look-up of a name in between answered "no such volume" (the
    // controller then made it on another node) and a create of it FAILED_PRECONDITION, a final
    // error the provisioner forgets its volume on.
    use crate::crash::in_thread;
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let in_late = NewVolume {
        pool: Some(late.name.clone()),
        ..NewVolume::plain("pvc-kept", Some(Layout::Dir), MIB)
    };
    let kept = keeping(&node, &config, &rosters)
        .create_volume(in_late.clone())
        .expect("create");
    let away = dir.path().join("late.away");
    std::fs::rename(&late.path, &away).expect("unmount the disk");
    std::fs::write(&late.path, b"not a directory").expect("file");
    let engine = keeping(&node, &config, &rosters);
    assert!(!engine.ready());
    std::fs::remove_file(&late.path).expect("remove the file");
    std::fs::rename(&away, &late.path).expect("mount the disk");

    let pause = Arc::new(in_thread::Pause::default());
    std::thread::scope(|s| {
        let (held, engine) = (pause.clone(), &engine);
        let opening = s.spawn(move || {
            in_thread::pause_at(Some(("reopen:before-open", held.clone())));
            let opened = engine.reopen_broken();
            in_thread::pause_at(None);
            held.release();
            opened
        });
        assert!(
            pause.reached(std::time::Duration::from_secs(30)),
            "the pool's records are read"
        );
        let named = engine.volume_named("pvc-kept").map(|r| r.id);
        let created = engine.create_volume(in_late.clone());
        let weighed = engine.volumes_weigh(|_| 1);
        pause.release();
        assert_eq!(weighed, (1, 1), "counted once for the node's listing bound");
        assert_eq!(named, Some(kept.id.clone()), "the name is still found");
        assert!(
            matches!(created, Err(StorageError::Unavailable(_))),
            "the create still waits for the pool: {created:?}"
        );
        assert_eq!(opening.join().expect("no panic"), vec![late.name.clone()]);
    });
    assert_eq!(engine.create_volume(in_late).expect("answered").id, kept.id);
    assert!(engine.store.shut_volumes().is_empty());
}

#[test]
fn a_volume_recorded_just_before_a_restart_is_on_its_pools_roster() {
    // Its roster line came after its record: a restart between the two, then a start with the
    // pool's disk not mounted, left the volume out and its name free for a create elsewhere.
    use crate::crash::in_thread;
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, late) = with_second_pool(dir.path(), "late", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let first = keeping(&node, &config, &rosters);
    in_thread::crash_at(Some("volume-record:stored"));
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        first.create_volume(NewVolume {
            pool: Some(late.name.clone()),
            ..NewVolume::plain("pvc-cut", Some(Layout::Dir), MIB)
        })
    }));
    in_thread::crash_at(None);
    assert!(died.is_err(), "the driver died once the record was written");
    drop(first);
    std::fs::rename(&late.path, dir.path().join("late.away")).expect("unmount the disk");
    std::fs::write(&late.path, b"not a directory").expect("file");

    let engine = keeping(&node, &config, &rosters);
    assert!(!engine.ready());
    let id = VolumeId::parse("local:n1:late:pvc-cut").expect("id");
    assert_eq!(engine.volume_named("pvc-cut").map(|r| r.id), Some(id));
    match engine.create_volume(NewVolume::plain("pvc-cut", Some(Layout::Dir), MIB)) {
        Err(e @ StorageError::Conflict(_)) => assert!(e.to_string().contains("pool 'late'"), "{e}"),
        other => panic!("want the name refused in another pool, got {other:?}"),
    }
}

#[test]
fn a_create_whose_record_fails_leaves_its_pools_roster_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let config = Config::default_for(dir.path());
    let engine = keeping(&NodeId::parse("n1").expect("node"), &config, &rosters);
    // Once: the roster's rewrite after it writes through the same step.
    crate::crash::in_thread::fail_once_at("record:write", libc::ENOSPC);
    let made = engine.create_volume(NewVolume::plain("pvc-full", Some(Layout::Dir), MIB));
    crate::crash::in_thread::fail_at(None);
    assert!(made.is_err(), "{made:?}");
    let roster = crate::storage::roster::Roster::new(&rosters, engine.files());
    assert!(
        roster.read(&config.pools[0].name).volumes.is_empty(),
        "a volume without a record is not on the roster"
    );
}

#[test]
fn a_shut_pools_snapshots_count_toward_the_nodes_listing_bound() {
    // The node's listing bound (room_for_snapshots, split mode) keeps a node's ListSnapshots
    // within what the controller accepts; the listing now has the shut pools' snapshots too.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = shut_pool_with_snapshots(dir.path(), true).engine;
    let listed = engine.listed_snapshots().len();
    let (counted, _) = engine.snapshots_weigh(|_| 1);
    assert_eq!(
        counted, listed,
        "snapshots_weigh counts {counted} while ListSnapshots lists {listed} (volumes_weigh counts shut volumes)"
    );
}

#[test]
fn an_uploaded_backups_retry_answers_while_its_pool_is_shut() {
    // The controller answers a backup's retry from the repository only when the node's
    // snapshot_named finds nothing; it now finds the roster's record.
    let dir = tempfile::tempdir().expect("tempdir");
    let ShutPool {
        engine,
        source,
        bk,
        req,
        ..
    } = shut_pool_with_snapshots(dir.path(), true);
    assert!(
        engine
            .backups()
            .find_named(&req.repository, "bk-late")
            .expect("repo")
            .is_some(),
        "the repository holds it"
    );
    let retry = engine.create_backup("bk-late", &source.id, false, &req);
    // (It was ABORTED, "retry to get it", until the pool opened: for ever for one left out.)
    match retry {
        Ok(r) => assert_eq!(r, bk, "the backup as recorded, uploaded"),
        other => panic!(
            "the retry of backup {} (uploaded, in the repository) answered {other:?}",
            bk.id
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_snapshot_of_a_left_out_pool_whose_name_is_now_shared_is_refused() {
    use crate::csi::v1::controller_server::Controller;
    let dir = tempfile::tempdir().expect("tempdir");
    let rosters = dir.path().join("rosters");
    let (config, old) = with_second_pool(dir.path(), "old", vec![Layout::Dir]);
    let node = NodeId::parse("n1").expect("node");
    let snap = {
        let first = keeping(&node, &config, &rosters);
        let v = first
            .create_volume(NewVolume {
                pool: Some(old.name.clone()),
                ..NewVolume::plain("pvc-old", Some(Layout::Dir), MIB)
            })
            .expect("create");
        first.create_snapshot("snap-old", &v.id, false).expect("snapshot")
    };
    // The name given to a shared pool instead.
    let mut shared = Config::default_for(dir.path());
    let mut share = old.clone();
    share.path = dir.path().join("old-share");
    share.backend = crate::storage::config::Backend::Shared;
    shared.pools.push(share);
    let engine = Arc::new(keeping(&node, &shared, &rosters));
    assert!(engine.delete_snapshot(&snap.id).is_err(), "out of reach");
    let agent: Arc<dyn crate::agent::Agent> = Arc::new(crate::agent::LocalAgent::new(engine.clone()));
    assert!(
        agent.shut_pools().iter().any(|(p, _)| *p == old.name),
        "reported shut (the heartbeat's list): {:?}",
        agent.shut_pools()
    );
    let ctl = crate::controller::ControllerService::new(Arc::new(crate::agent::SingleNode(agent)));
    let got = ctl
        .get_snapshot(tonic::Request::new(crate::csi::v1::GetSnapshotRequest {
            snapshot_id: snap.id.to_string(),
            ..Default::default()
        }))
        .await;
    match got {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
        other => panic!("GetSnapshot of an out-of-reach snapshot answered {other:?}"),
    }
}
