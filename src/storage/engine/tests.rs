//! The engine's create plan, its size checks and its rules for leftovers, on pools in a temporary
//! directory: `dir` volumes and ext4 `image` files need no root and no device.

use super::*;
use crate::storage::config::Config;
use crate::sys::fstools::FsType;

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
