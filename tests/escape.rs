//! Nothing outside the pool is ever touched: not through IDs or names that try to leave it, not
//! through a symlink planted in it, not through CO paths with relative or `..` parts.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use cellar::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use cellar::csi::v1::*;
use tonic::{Code, Status};

const SENTINEL_BYTES: &[u8] = b"host data: never to be touched\n";

/// A directory outside the pool with a file in it, standing in for anything else on the host.
struct Sentinel {
    dir: PathBuf,
    file: PathBuf,
}

/// `<test dir>/outside/keep`: `<pool>/volumes/../../../../outside` names it, too.
fn sentinel(d: &Driver) -> Sentinel {
    let dir = d.path("outside");
    fs::create_dir_all(&dir).expect("mkdir sentinel");
    let file = dir.join("keep");
    fs::write(&file, SENTINEL_BYTES).expect("write sentinel");
    Sentinel { dir, file }
}

impl Sentinel {
    fn assert_intact(&self) {
        let md = fs::symlink_metadata(&self.dir).expect("the sentinel directory is gone");
        assert!(md.is_dir(), "the sentinel directory was replaced");
        let names: Vec<_> = fs::read_dir(&self.dir)
            .expect("readdir")
            .map(|e| e.expect("readdir").file_name())
            .collect();
        assert_eq!(names, ["keep"], "the sentinel directory changed");
        assert_eq!(fs::read(&self.file).expect("the sentinel file is gone"), SENTINEL_BYTES);
    }
}

fn code_of<T>(r: Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// What would show that an entry was created, removed, replaced, written, chmod-ed or renamed.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    mode: u32,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Every entry of the test directory (data dir with the pool, sentinels, mount directories),
/// never following a link. The driver's log is left out: it grows with every call.
fn listing(d: &Driver) -> BTreeMap<PathBuf, Stamp> {
    let log = d.path("driver.log");
    let mut out = BTreeMap::new();
    let mut stack = vec![d.dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        if p == log {
            continue;
        }
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if md.is_dir() {
            for e in fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
                stack.push(e.expect("readdir").path());
            }
        }
        out.insert(
            p,
            Stamp {
                mode: md.mode(),
                ino: md.ino(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
            },
        );
    }
    out
}

fn paths(d: &Driver) -> BTreeSet<PathBuf> {
    listing(d).into_keys().collect()
}

fn assert_unchanged(d: &Driver, before: &BTreeMap<PathBuf, Stamp>, what: &str) {
    let after = listing(d);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "{what} changed {changed:?}");
}

fn assert_no_mounts(d: &Driver) {
    let left = mounts_under(d.dir.path());
    assert!(left.is_empty(), "mounts were made: {left:?}");
}

/// Volume IDs that would leave `<pool>/volumes` if one of their parts were used as a path, and IDs
/// of no volume here at all (another node, another shape, garbage).
fn escaping_volume_ids(s: &Sentinel) -> Vec<String> {
    let abs = s.dir.display().to_string();
    vec![
        "local:node-1:default:..".into(),
        "local:node-1:default:.".into(),
        "local:node-1:default:../../etc".into(),
        "local:node-1:default:../../../../outside".into(),
        "local:node-1:default:pvc-real/../../../../../outside".into(),
        "local:node-1:default:/etc".into(),
        format!("local:node-1:default:{abs}"),
        "local:node-1:..:x".into(),
        "local:node-1:../../../..:outside".into(),
        "local:node-1:/:outside".into(),
        "local:..:default:pvc-real".into(),
        "local:node-1:default:".into(),
        "local:node-1::pvc-real".into(),
        "local::default:pvc-real".into(),
        ":::".into(),
        "local:node-1:default:pvc-real:".into(),
        "local:node-1:default:pvc-real\0".into(),
        "local:node-1:default:pvc-real\n".into(),
        format!("local:node-1:default:{}", "a".repeat(4096)),
        abs,
        "/etc".into(),
        "/".into(),
        "..".into(),
        "local:other:default:pvc-real".into(),
        "local:other:default:../../../../outside".into(),
        "shared:default:pvc-real".into(),
        "snap:local:node-1:default:snap-real".into(),
        "garbage".into(),
    ]
}

/// The same shapes as snapshot IDs, and volume IDs given where a snapshot ID belongs.
fn escaping_snapshot_ids(s: &Sentinel) -> Vec<String> {
    let ids = escaping_volume_ids(s);
    let mut out: Vec<String> = ids.iter().map(|id| format!("snap:{id}")).collect();
    out.extend(ids.into_iter().filter(|id| !id.starts_with("snap:")));
    out.push("local:node-1:default:snap-real".into());
    out
}

/// A driver whose pool holds a volume (`pvc-real`, with a file) and a snapshot of it (`snap-real`),
/// a sentinel outside the pool, and a staging directory made ahead of time.
async fn populated() -> (Driver, Sentinel) {
    let mut d = Driver::start().await;
    let s = sentinel(&d);
    let v = d.create("pvc-real").await;
    fs::write(d.pool_dir().join("volumes/pvc-real/data"), b"volume data\n").expect("write volume data");
    d.snapshot("snap-real", &v.volume_id).await.expect("CreateSnapshot");
    fs::create_dir(d.path("staging")).expect("mkdir staging");
    (d, s)
}

const REAL_VOLUME: &str = "local:node-1:default:pvc-real";

// ---------------------------------------------------------------------------------------------
// (a) IDs that try to leave the pool

#[tokio::test]
async fn delete_volume_with_an_escaping_id_is_ok_and_touches_nothing() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        assert_eq!(code_of(d.delete(&id).await), Code::Ok, "DeleteVolume {id:?}");
        assert_unchanged(&d, &before, &format!("DeleteVolume {id:?}"));
    }
    s.assert_intact();
}

#[tokio::test]
async fn delete_snapshot_with_an_escaping_id_is_ok_and_touches_nothing() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for id in escaping_snapshot_ids(&s) {
        let r = d
            .ctl
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(r), Code::Ok, "DeleteSnapshot {id:?}");
        assert_unchanged(&d, &before, &format!("DeleteSnapshot {id:?}"));
    }
    s.assert_intact();
}

#[tokio::test]
async fn controller_get_volume_with_an_escaping_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        let r = d
            .ctl
            .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
            .await;
        assert_eq!(code_of(r), Code::NotFound, "ControllerGetVolume {id:?}");
    }
    assert_unchanged(&d, &before, "ControllerGetVolume");
}

#[tokio::test]
async fn validate_volume_capabilities_with_an_escaping_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        let r = d
            .ctl
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(r), Code::NotFound, "ValidateVolumeCapabilities {id:?}");
    }
    assert_unchanged(&d, &before, "ValidateVolumeCapabilities");
}

#[tokio::test]
async fn controller_expand_volume_with_an_escaping_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        let r = d
            .ctl
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 128 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(r), Code::NotFound, "ControllerExpandVolume {id:?}");
    }
    assert_unchanged(&d, &before, "ControllerExpandVolume");
}

#[tokio::test]
async fn node_stage_with_an_escaping_id_is_not_found_and_mounts_nothing() {
    let (mut d, s) = populated().await;
    let staging = d.path("staging");
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        assert_eq!(
            code_of(d.stage(&id, &staging).await),
            Code::NotFound,
            "NodeStageVolume {id:?}"
        );
        assert_no_mounts(&d);
    }
    assert_unchanged(&d, &before, "NodeStageVolume");
}

#[tokio::test]
async fn node_publish_with_an_escaping_id_is_not_found_and_mounts_nothing() {
    let (mut d, s) = populated().await;
    let (staging, target) = (d.path("staging"), d.path("target"));
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        let r = d.publish(&id, &staging, &target, rwo(), false).await;
        assert_eq!(code_of(r), Code::NotFound, "NodePublishVolume {id:?}");
        assert_no_mounts(&d);
    }
    assert_unchanged(&d, &before, "NodePublishVolume");
}

#[tokio::test]
async fn node_get_volume_stats_with_an_escaping_id_is_not_found() {
    let (mut d, s) = populated().await;
    let staging = d.path("staging");
    let before = listing(&d);
    for id in escaping_volume_ids(&s) {
        let r = d
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: staging.display().to_string(),
                staging_target_path: String::new(),
            })
            .await;
        assert_eq!(code_of(r), Code::NotFound, "NodeGetVolumeStats {id:?}");
    }
    assert_unchanged(&d, &before, "NodeGetVolumeStats");
}

fn create_from(name: &str, source: Type) -> CreateVolumeRequest {
    let mut req = create_req(name, 64 * MIB);
    req.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
    req
}

fn snapshot_source(id: &str) -> Type {
    Type::Snapshot(SnapshotSource {
        snapshot_id: id.to_string(),
    })
}

fn volume_source(id: &str) -> Type {
    Type::Volume(VolumeSource {
        volume_id: id.to_string(),
    })
}

#[tokio::test]
async fn create_volume_from_an_escaping_snapshot_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for (i, id) in escaping_snapshot_ids(&s).into_iter().enumerate() {
        let r = d
            .ctl
            .create_volume(create_from(&format!("restore-{i}"), snapshot_source(&id)))
            .await;
        assert_eq!(code_of(r), Code::NotFound, "CreateVolume from snapshot {id:?}");
    }
    assert_unchanged(&d, &before, "CreateVolume from a snapshot");
}

#[tokio::test]
async fn create_volume_from_an_escaping_volume_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for (i, id) in escaping_volume_ids(&s).into_iter().enumerate() {
        let r = d
            .ctl
            .create_volume(create_from(&format!("clone-{i}"), volume_source(&id)))
            .await;
        assert_eq!(code_of(r), Code::NotFound, "CreateVolume from volume {id:?}");
    }
    assert_unchanged(&d, &before, "CreateVolume from a volume");
}

#[tokio::test]
async fn create_snapshot_of_an_escaping_volume_id_is_not_found() {
    let (mut d, s) = populated().await;
    let before = listing(&d);
    for (i, id) in escaping_volume_ids(&s).into_iter().enumerate() {
        let r = d.snapshot(&format!("snap-{i}"), &id).await;
        assert_eq!(code_of(r), Code::NotFound, "CreateSnapshot of {id:?}");
    }
    assert_unchanged(&d, &before, "CreateSnapshot");
}

#[tokio::test]
async fn the_real_volume_is_found_where_escaping_ids_are_not() {
    // The control for the tests above: the same calls with the real IDs succeed.
    let (mut d, _s) = populated().await;
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: REAL_VOLUME.into(),
        })
        .await;
    assert_eq!(code_of(r), Code::Ok);
    let r = d
        .ctl
        .create_volume(create_from(
            "restore",
            snapshot_source("snap:local:node-1:default:snap-real"),
        ))
        .await;
    assert_eq!(code_of(r), Code::Ok);
    assert_eq!(
        fs::read(d.pool_dir().join("volumes/restore/data")).expect("restored data"),
        b"volume data\n"
    );
}

// ---------------------------------------------------------------------------------------------
// (b) Names that look like paths

fn path_like_names() -> Vec<String> {
    vec![
        "../x".into(),
        "a/b".into(),
        "/abs".into(),
        "..".into(),
        ".".into(),
        "../../../../outside".into(),
        "/etc/passwd".into(),
        ".hidden".into(),
        "-dash".into(),
        "with space".into(),
        "nul\0byte".into(),
        "n".repeat(300),
        "ünïcødé/卷/💾".into(),
    ]
}

/// The key part of a volume ID of this node's default pool.
fn key_of(volume_id: &str) -> &str {
    volume_id
        .strip_prefix("local:node-1:default:")
        .unwrap_or_else(|| panic!("{volume_id} is not a volume of pool 'default' on node-1"))
}

#[tokio::test]
async fn path_like_names_are_stored_as_one_component_under_volumes() {
    let mut d = Driver::start().await;
    let s = sentinel(&d);
    let volumes = d.pool_dir().join("volumes");
    for name in path_like_names() {
        let before = paths(&d);
        let r = d.ctl.create_volume(create_req(&name, 64 * MIB)).await;
        let v = r
            .unwrap_or_else(|e| panic!("CreateVolume {name:?}: {e}"))
            .into_inner()
            .volume
            .expect("volume");
        let key = key_of(&v.volume_id);
        let parts: Vec<_> = Path::new(key).components().collect();
        assert!(
            matches!(parts.as_slice(), [Component::Normal(k)] if *k == key),
            "{name:?} got key {key:?}, not one plain path component"
        );
        let after = paths(&d);
        assert!(before.is_subset(&after), "CreateVolume {name:?} removed entries");
        let added: BTreeSet<_> = after.difference(&before).cloned().collect();
        let expected: BTreeSet<_> = [volumes.join(key), volumes.join(format!("{key}.json"))].into();
        assert_eq!(added, expected, "CreateVolume {name:?} made other entries");
        let md = fs::symlink_metadata(volumes.join(key)).expect("data directory");
        assert!(md.is_dir(), "{name:?}: the data is not a directory");
    }
    s.assert_intact();
}

#[tokio::test]
async fn deleting_a_path_like_name_removes_exactly_what_it_made() {
    let mut d = Driver::start().await;
    let s = sentinel(&d);
    for name in path_like_names() {
        let before = paths(&d);
        let v = d.create(&name).await;
        assert_eq!(
            code_of(d.delete(&v.volume_id).await),
            Code::Ok,
            "DeleteVolume of {name:?}"
        );
        assert_eq!(
            paths(&d),
            before,
            "CreateVolume + DeleteVolume of {name:?} left a difference"
        );
    }
    s.assert_intact();
}

// A record is `<key>.json` beside its data `<key>`: names ending in ".json" are hashed, so no
// volume name can collide with another volume's record.
#[tokio::test]
async fn a_volume_named_like_a_record_file_survives_a_restart() {
    let mut d = Driver::start().await;
    let v = d.create("x.json").await;
    d.kill();
    d.spawn(&[]).await;
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await;
    assert_eq!(code_of(r), Code::Ok);
    assert_eq!(code_of(d.delete(&v.volume_id).await), Code::Ok);
}

// A record is `<key>.json` beside its data `<key>`: names ending in ".json" are hashed, so no
// volume name can collide with another volume's record.
#[tokio::test]
async fn volumes_named_a_and_a_json_coexist() {
    let mut d = Driver::start().await;
    let a = d.create("a").await;
    let r = d.ctl.create_volume(create_req("a.json", 64 * MIB)).await;
    let a_json = r.as_ref().ok().and_then(|r| r.get_ref().volume.clone());
    assert_eq!(code_of(d.delete(&a.volume_id).await), Code::Ok);
    if let Some(v) = a_json {
        assert_eq!(code_of(d.delete(&v.volume_id).await), Code::Ok);
    }
    assert_eq!(code_of(r), Code::Ok, "CreateVolume a.json beside a");
}

// ---------------------------------------------------------------------------------------------
// (c) A symlink planted in the pool

/// Creates the volume `planted` and replaces its data directory with a symlink to the sentinel.
async fn planted_volume(d: &mut Driver) -> (Volume, Sentinel) {
    let s = sentinel(d);
    let v = d.create("planted").await;
    let data = d.pool_dir().join("volumes/planted");
    fs::remove_dir(&data).expect("remove data directory");
    std::os::unix::fs::symlink(&s.dir, &data).expect("plant symlink");
    (v, s)
}

/// Creates `src`, snapshots it as `planted`, and replaces the snapshot's data with a symlink.
async fn planted_snapshot(d: &mut Driver) -> (Snapshot, Sentinel) {
    let s = sentinel(d);
    let v = d.create("src").await;
    let snap = d.snapshot("planted", &v.volume_id).await.expect("CreateSnapshot");
    let data = d.pool_dir().join("snapshots/planted");
    fs::remove_dir(&data).expect("remove snapshot data");
    std::os::unix::fs::symlink(&s.dir, &data).expect("plant symlink");
    (snap, s)
}

/// Nothing in the pool is, or came from, the sentinel's file.
fn assert_sentinel_not_copied(d: &Driver) {
    let mut stack = vec![d.pool_dir()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).expect("lstat");
        assert_ne!(
            p.file_name().and_then(|n| n.to_str()),
            Some("keep"),
            "{} was copied",
            p.display()
        );
        if md.is_dir() {
            for e in fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("readdir").path());
            }
        }
    }
    for dir in [".work", ".trash"] {
        let left: Vec<_> = fs::read_dir(d.pool_dir().join(dir)).expect("readdir").collect();
        assert!(left.is_empty(), "{dir} holds {left:?}");
    }
}

#[tokio::test]
async fn node_stage_of_a_planted_symlink_fails_and_mounts_nothing() {
    let mut d = Driver::start().await;
    let (v, s) = planted_volume(&mut d).await;
    let staging = d.path("staging");
    fs::create_dir(&staging).expect("mkdir staging");
    assert_ne!(code_of(d.stage(&v.volume_id, &staging).await), Code::Ok);
    assert_no_mounts(&d);
    let table = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let of_sentinel: Vec<_> = cellar::sys::mountinfo::parse(&table)
        .into_iter()
        .filter(|m| m.root.starts_with(&s.dir))
        .collect();
    assert!(of_sentinel.is_empty(), "the sentinel is mounted: {of_sentinel:?}");
    assert_eq!(fs::read_dir(&staging).expect("readdir").count(), 0);
    s.assert_intact();
}

#[tokio::test]
async fn create_snapshot_of_a_planted_symlink_fails_and_copies_nothing() {
    let mut d = Driver::start().await;
    let (v, s) = planted_volume(&mut d).await;
    assert_ne!(code_of(d.snapshot("snap", &v.volume_id).await), Code::Ok);
    let snapshots: Vec<_> = fs::read_dir(d.pool_dir().join("snapshots")).expect("readdir").collect();
    assert!(snapshots.is_empty(), "snapshots holds {snapshots:?}");
    assert_sentinel_not_copied(&d);
    s.assert_intact();
}

#[tokio::test]
async fn clone_of_a_planted_symlink_fails_and_copies_nothing() {
    let mut d = Driver::start().await;
    let (v, s) = planted_volume(&mut d).await;
    let r = d
        .ctl
        .create_volume(create_from("clone", volume_source(&v.volume_id)))
        .await;
    assert_ne!(code_of(r), Code::Ok);
    assert!(!d.pool_dir().join("volumes/clone").exists(), "a clone was made");
    assert_sentinel_not_copied(&d);
    s.assert_intact();
}

#[tokio::test]
async fn controller_get_volume_reports_a_planted_symlink_as_abnormal() {
    let mut d = Driver::start().await;
    let (v, _s) = planted_volume(&mut d).await;
    let r = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect("ControllerGetVolume")
        .into_inner();
    let condition = r.status.and_then(|s| s.volume_condition).expect("volume condition");
    assert!(condition.abnormal, "condition: {condition:?}");
}

#[tokio::test]
async fn delete_volume_of_a_planted_symlink_removes_only_the_link() {
    let mut d = Driver::start().await;
    let (v, s) = planted_volume(&mut d).await;
    assert_eq!(code_of(d.delete(&v.volume_id).await), Code::Ok);
    let volumes: Vec<_> = fs::read_dir(d.pool_dir().join("volumes")).expect("readdir").collect();
    assert!(volumes.is_empty(), "volumes still holds {volumes:?}");
    assert_sentinel_not_copied(&d);
    s.assert_intact();
}

#[tokio::test]
async fn restore_from_a_planted_snapshot_symlink_fails_and_copies_nothing() {
    let mut d = Driver::start().await;
    let (snap, s) = planted_snapshot(&mut d).await;
    let r = d
        .ctl
        .create_volume(create_from("restore", snapshot_source(&snap.snapshot_id)))
        .await;
    assert_ne!(code_of(r), Code::Ok);
    assert!(!d.pool_dir().join("volumes/restore").exists(), "a volume was made");
    assert_sentinel_not_copied(&d);
    s.assert_intact();
}

#[tokio::test]
async fn delete_snapshot_of_a_planted_symlink_removes_only_the_link() {
    let mut d = Driver::start().await;
    let (snap, s) = planted_snapshot(&mut d).await;
    let r = d
        .ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(r), Code::Ok);
    let snapshots: Vec<_> = fs::read_dir(d.pool_dir().join("snapshots")).expect("readdir").collect();
    assert!(snapshots.is_empty(), "snapshots still holds {snapshots:?}");
    assert_sentinel_not_copied(&d);
    s.assert_intact();
}

// ---------------------------------------------------------------------------------------------
// (d) CO paths that are relative, have `..` parts, or are symlinks

/// A relative path no test creates; the driver runs in the test's working directory, so if it
/// were used it would appear there.
const RELATIVE: &str = "cellar-escape-test-relative/dir";

fn assert_relative_path_unused() {
    assert!(
        !Path::new(RELATIVE).exists() && !Path::new("cellar-escape-test-relative").exists(),
        "the relative path was used"
    );
}

/// A volume and an existing staging directory.
async fn volume_and_staging(d: &mut Driver) -> (String, PathBuf) {
    let v = d.create("pvc-1").await;
    let staging = d.path("staging");
    fs::create_dir(&staging).expect("mkdir staging");
    (v.volume_id, staging)
}

#[tokio::test]
async fn node_stage_with_a_relative_staging_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, _) = volume_and_staging(&mut d).await;
    let r = d.stage(&id, Path::new(RELATIVE)).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    assert_relative_path_unused();
    assert_no_mounts(&d);
}

#[tokio::test]
async fn node_stage_with_a_dotdot_staging_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, staging) = volume_and_staging(&mut d).await;
    let before = listing(&d);
    // Both a path that resolves to the real staging directory and one that leads elsewhere.
    for p in [d.path("staging/../staging"), d.path("nowhere/../../escaped")] {
        assert_eq!(
            code_of(d.stage(&id, &p).await),
            Code::InvalidArgument,
            "{}",
            p.display()
        );
    }
    assert_unchanged(&d, &before, "NodeStageVolume");
    assert!(!d.dir.path().parent().expect("parent").join("escaped").exists());
    assert_no_mounts(&d);
    assert_eq!(fs::read_dir(&staging).expect("readdir").count(), 0);
}

/// The staging mount is the only mount the test made: nothing was published.
fn assert_only_staged(d: &Driver, staging: &Path) {
    assert_eq!(mounts_under(d.dir.path()), [staging.to_path_buf()]);
}

/// A volume staged at `<test dir>/staging`.
async fn staged_volume(d: &mut Driver) -> (String, PathBuf) {
    let (id, staging) = volume_and_staging(d).await;
    d.stage(&id, &staging).await.expect("NodeStageVolume");
    (id, staging)
}

#[tokio::test]
async fn node_publish_with_a_relative_target_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let r = d.publish(&id, &staging, Path::new(RELATIVE), rwo(), false).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    assert_relative_path_unused();
    assert_only_staged(&d, &staging);
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

#[tokio::test]
async fn node_publish_with_a_dotdot_target_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let before = listing(&d);
    for t in [d.path("nowhere/../target"), d.path("nowhere/../../escaped")] {
        let r = d.publish(&id, &staging, &t, rwo(), false).await;
        assert_eq!(code_of(r), Code::InvalidArgument, "{}", t.display());
    }
    assert_unchanged(&d, &before, "NodePublishVolume");
    assert_only_staged(&d, &staging);
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

#[tokio::test]
async fn node_publish_with_a_relative_staging_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let target = d.path("target");
    let r = d.publish(&id, Path::new(RELATIVE), &target, rwo(), false).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    assert!(!target.exists(), "the target directory was made");
    assert_relative_path_unused();
    assert_only_staged(&d, &staging);
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

#[tokio::test]
async fn node_publish_with_a_dotdot_staging_path_is_invalid_argument() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let target = d.path("target");
    // It resolves to the real staging directory, and is still refused.
    let dotdot = d.path("nowhere/../staging");
    let r = d.publish(&id, &dotdot, &target, rwo(), false).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    assert!(!target.exists(), "the target directory was made");
    assert_only_staged(&d, &staging);
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

#[tokio::test]
async fn node_stage_onto_a_symlink_is_invalid_argument_and_mounts_nothing() {
    let mut d = Driver::start().await;
    let (id, _) = volume_and_staging(&mut d).await;
    let s = sentinel(&d);
    let link = d.path("staging-link");
    std::os::unix::fs::symlink(&s.dir, &link).expect("symlink");
    assert_eq!(code_of(d.stage(&id, &link).await), Code::InvalidArgument);
    assert_no_mounts(&d);
    s.assert_intact();
}

#[tokio::test]
async fn node_publish_onto_a_symlink_is_invalid_argument_and_mounts_nothing() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let s = sentinel(&d);
    let link = d.path("target-link");
    std::os::unix::fs::symlink(&s.dir, &link).expect("symlink");
    let r = d.publish(&id, &staging, &link, rwo(), false).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
    assert_only_staged(&d, &staging);
    assert!(fs::symlink_metadata(&link).expect("link").file_type().is_symlink());
    s.assert_intact();
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

/// A publish whose target's parent is then moved aside (its mount goes with it) and replaced by
/// a symlink to another directory holding a mount of the same name: the unpublish must not
/// unmount or remove that other mount (umount2 and rmdir follow the symlink on the way).
/// As the publish's case below, for a stage: with a directory above the staging path moved
/// aside and replaced by a symlink, NodeUnstage unmounted another mount of the same name there
/// and forgot its own stage, which stayed mounted.
#[tokio::test]
async fn node_unstage_through_a_parent_swapped_for_a_symlink_unmounts_nothing_else() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-1").await;
    let plugin = d.path("plugin");
    let staging = plugin.join("globalmount");
    fs::create_dir_all(&staging).expect("mkdir staging");
    d.stage(&v.volume_id, &staging).await.expect("NodeStageVolume");
    let s = sentinel(&d);
    let other = d.path("other");
    fs::create_dir_all(other.join("globalmount")).expect("mkdir other");
    let ok = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&s.dir)
        .arg(other.join("globalmount"))
        .status()
        .expect("mount");
    assert!(ok.success(), "mount --bind");
    let moved = d.path("plugin-moved");
    fs::rename(&plugin, &moved).expect("move the staging directory's parent aside");
    std::os::unix::fs::symlink(&other, &plugin).expect("symlink");
    let r = d.unstage(&v.volume_id, &staging).await;
    let mounts = mounts_under(d.dir.path());
    let other_kept = mounts.contains(&other.join("globalmount"));
    if other_kept {
        let _ = std::process::Command::new("umount")
            .arg(other.join("globalmount"))
            .status();
    }
    fs::remove_file(&plugin).expect("remove symlink");
    fs::rename(&moved, &plugin).expect("move back");
    if r.is_ok() {
        // The driver forgot its stage: its mount is left for the test to remove.
        let _ = std::process::Command::new("umount").arg(&staging).status();
    }
    assert!(
        other_kept,
        "the unstage unmounted a mount it did not make ({r:?}); mounts: {mounts:?}"
    );
    assert_eq!(code_of(r), Code::FailedPrecondition);
    s.assert_intact();
    d.unstage(&v.volume_id, &staging)
        .await
        .expect("NodeUnstageVolume once the path is back");
    assert!(!mounts_under(d.dir.path()).contains(&staging), "the stage is undone");
}

#[tokio::test]
async fn node_unpublish_through_a_parent_swapped_for_a_symlink_unmounts_nothing_else() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let pod = d.path("pod");
    fs::create_dir(&pod).expect("mkdir pod");
    let target = pod.join("mount");
    d.publish(&id, &staging, &target, rwo(), false)
        .await
        .expect("NodePublishVolume");
    // Someone else's mount, under the same name in another directory.
    let s = sentinel(&d);
    let other = d.path("other");
    fs::create_dir_all(other.join("mount")).expect("mkdir other");
    let bind = |from: &Path, to: &Path| {
        let ok = std::process::Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(to)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount --bind");
    };
    bind(&s.dir, &other.join("mount"));
    let moved = d.path("pod-moved");
    fs::rename(&pod, &moved).expect("move the pod directory aside");
    std::os::unix::fs::symlink(&other, &pod).expect("symlink");
    let r = d.unpublish(&id, &target).await;
    let mounts = mounts_under(d.dir.path());
    let other_kept = mounts.contains(&other.join("mount"));
    let other_dir_kept = other.join("mount").is_dir();
    // Put things back, whatever happened, so that the driver can be cleaned up.
    if mounts_under(d.dir.path()).contains(&other.join("mount")) {
        let _ = std::process::Command::new("umount").arg(other.join("mount")).status();
    }
    fs::remove_file(&pod).expect("remove symlink");
    fs::rename(&moved, &pod).expect("move back");
    if r.is_ok() {
        // The driver forgot its publish: its mount is left for the test to remove.
        let _ = std::process::Command::new("umount").arg(&target).status();
    }
    assert!(
        other_kept,
        "the unpublish unmounted a mount it did not make ({r:?}); mounts: {mounts:?}"
    );
    assert!(other_dir_kept, "the unpublish removed a directory it did not make");
    assert_eq!(code_of(r), Code::FailedPrecondition);
    s.assert_intact();
    d.unpublish(&id, &target)
        .await
        .expect("NodeUnpublishVolume once the path is back");
    d.unstage(&id, &staging).await.expect("NodeUnstageVolume");
}

/// kubelet's directory moved to another disk and left behind as a symlink, across a reboot (which
/// took every mount with it): the publish recorded before is mounted nowhere any more, and its
/// unpublish must answer, or kubelet retries it for ever and the pod never goes. Where the target
/// led in another boot says nothing now (found by a review: FAILED_PRECONDITION for good).
#[tokio::test]
async fn node_unpublish_after_a_reboot_with_kubelets_directory_moved_behind_a_symlink_answers() {
    let mut d = Driver::start().await;
    let (id, staging) = staged_volume(&mut d).await;
    let kubelet = d.path("kubelet");
    fs::create_dir_all(kubelet.join("pods/p1")).expect("mkdir pod");
    let target = kubelet.join("pods/p1/mount");
    d.publish(&id, &staging, &target, rwo(), false)
        .await
        .expect("NodePublishVolume");
    // The reboot: the driver stops, the mounts go, the driver's state stays on its disk, written
    // in a boot that is over.
    d.kill();
    for m in [&target, &staging] {
        let ok = std::process::Command::new("umount").arg(m).status().expect("umount");
        assert!(ok.success(), "umount {}", m.display());
    }
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let mut rewritten = 0;
    for entry in fs::read_dir(d.data_dir().join("node")).expect("node state") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = fs::read_to_string(&path).expect("state");
            if text.contains(boot.trim()) {
                fs::write(&path, text.replace(boot.trim(), "00000000-0000-0000-0000-000000000000")).expect("write");
                rewritten += 1;
            }
        }
    }
    assert_eq!(
        rewritten, 1,
        "the volume's state names the boot its paths were resolved in"
    );
    // kubelet's directory, now on another disk, its old path a symlink to it.
    let disk2 = d.path("disk2");
    fs::create_dir_all(&disk2).expect("mkdir disk2");
    fs::rename(&kubelet, disk2.join("kubelet")).expect("move kubelet's directory");
    std::os::unix::fs::symlink(disk2.join("kubelet"), &kubelet).expect("symlink");
    d.spawn(&[]).await;
    let r = d.unpublish(&id, &target).await;
    fs::remove_file(&kubelet).expect("remove symlink");
    fs::rename(disk2.join("kubelet"), &kubelet).expect("move back");
    r.expect("NodeUnpublishVolume after the reboot");
    d.unstage(&id, &staging)
        .await
        .expect("NodeUnstageVolume after the reboot");
    assert!(mounts_under(d.dir.path()).is_empty(), "nothing left mounted");
}

// ---------------------------------------------------------------------------------------------
// Content a workload owns: flags that make the kernel refuse root

/// `chattr <flags> <path>`: what a workload with CAP_LINUX_IMMUTABLE does to its own files.
fn chattr(flags: &str, path: &Path) {
    let out = std::process::Command::new("chattr")
        .arg(flags)
        .arg(path)
        .output()
        .expect("run chattr");
    assert!(
        out.status.success(),
        "chattr {flags} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Clears the immutable and append-only flags below a test's directory when the test ends, so that
/// a failed test still leaves nothing behind that no `rm` could remove.
struct ClearFlagsOnDrop(PathBuf);

impl Drop for ClearFlagsOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-f", "-i", "-a"])
            .arg(&self.0)
            .output();
    }
}

/// A volume whose workload made a file immutable, a directory append-only and another immutable;
/// with `root`, the volume's own directory immutable too (the mount's root is the workload's).
async fn protected_volume(d: &mut Driver, root: bool) -> String {
    let v = d.create("protected").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "protected").await;
    fs::create_dir_all(target.join("logs/sealed")).expect("mkdir");
    fs::write(target.join("logs/sealed/kept"), b"never to change\n").expect("write");
    fs::write(target.join("logs/journal"), b"only to grow\n").expect("write");
    chattr("+i", &target.join("logs/sealed/kept"));
    chattr("+i", &target.join("logs/sealed"));
    chattr("+a", &target.join("logs/journal"));
    chattr("+a", &target.join("logs"));
    if root {
        chattr("+i", &target);
    }
    d.unmount_all(&v.volume_id, &staging, &target).await;
    v.volume_id
}

fn assert_deleted_whole(d: &Driver) {
    assert_eq!(
        entries(&d.pool_dir().join("volumes")),
        Vec::<String>::new(),
        "volume data left"
    );
    assert_eq!(
        entries(&d.pool_dir().join(".trash")),
        Vec::<String>::new(),
        "data left in the trash"
    );
}

/// The kernel refuses even root to unlink an immutable file or an append-only directory's
/// entries: the purge failed on every retry and the data stayed in the trash for good.
#[tokio::test]
async fn delete_volume_removes_files_its_workload_made_immutable_or_append_only() {
    let mut d = Driver::start().await;
    let _clear = ClearFlagsOnDrop(d.dir.path().to_path_buf());
    let id = protected_volume(&mut d, false).await;
    assert_eq!(code_of(d.delete(&id).await), Code::Ok);
    assert_deleted_whole(&d);
    assert_eq!(code_of(d.delete(&id).await), Code::Ok, "a retry is still fine");
}

/// An immutable volume directory cannot be renamed: its move into the trash failed every delete.
#[tokio::test]
async fn delete_volume_removes_a_volume_whose_root_its_workload_made_immutable() {
    let mut d = Driver::start().await;
    let _clear = ClearFlagsOnDrop(d.dir.path().to_path_buf());
    let id = protected_volume(&mut d, true).await;
    assert_eq!(code_of(d.delete(&id).await), Code::Ok);
    assert_deleted_whole(&d);
}

/// `depth` nested directories `d` below `dir`, made through descriptors (no path could name the
/// deepest), the deepest holding a file.
fn deep_tree(dir: &Path, depth: usize) {
    use nix::fcntl::{openat, OFlag, AT_FDCWD};
    use nix::sys::stat::{mkdirat, Mode};
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut fd = openat(AT_FDCWD, dir, flags, Mode::empty()).expect("open");
    for _ in 0..depth {
        mkdirat(&fd, "d", Mode::from_bits_truncate(0o755)).expect("mkdir");
        fd = openat(&fd, "d", flags, Mode::empty()).expect("open");
    }
    let f = openat(
        &fd,
        "bottom",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create");
    nix::unistd::write(&f, b"at the bottom\n").expect("write");
}

/// A workload's tree 100,000 levels deep: the removal recursed once per level on a thread with a
/// small stack and held a descriptor per level, so a delete overflowed the stack (the whole driver
/// died) or ran out of descriptors, and failed on every retry.
#[tokio::test]
async fn delete_volume_removes_a_tree_100000_levels_deep_and_the_driver_lives() {
    let mut d = Driver::start().await;
    let v = d.create("deep").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "deep").await;
    deep_tree(&target, 100_000);
    d.unmount_all(&v.volume_id, &staging, &target).await;
    let r = d.delete(&v.volume_id).await;
    if r.is_err() {
        // rm walks iteratively: the test's directory goes whatever the driver did.
        let _ = std::process::Command::new("rm").arg("-rf").arg(d.pool_dir()).output();
    }
    assert_eq!(code_of(r), Code::Ok, "{}", tail(&d.log(), 5));
    assert_deleted_whole(&d);
    d.create("after").await;
}
