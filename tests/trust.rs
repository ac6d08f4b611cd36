//! The storage core's invariants, each attacked the way a racing reclaim, a stale PV, a second
//! controller replica or a hostile request would (docs/design.md, "Invariants"):
//! 1. data that is staged or published is never deleted;
//! 2. a record names exactly the data it was made for: a leftover of a failed call is never adopted;
//! 3. every size change is checked against the pool and the room left in it;
//!
//! and the records of a shared pool are one truth for every process that serves it.

mod common;

use std::path::{Path, PathBuf};

use cellar::csi::v1::*;
use common::fs::TestFs;
use common::*;
use tonic::Code;

/// Writes a config with the given pool entries (YAML list items) and starts an all-in-one driver.
async fn driver_with(pools_yaml: &str, node: Option<&str>) -> (Driver, tempfile::TempDir) {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(&cfg, format!("pools:\n{pools_yaml}")).expect("config");
    let mut args = vec!["--config", cfg.to_str().expect("utf-8")];
    if let Some(n) = node {
        args.extend(["--node-id", n]);
    }
    let d = Driver::start_with(&args, &[]).await;
    (d, cfgdir)
}

/// A driver with the default pool and a shared pool on a fresh directory.
async fn shared_driver() -> (tempfile::TempDir, Driver, tempfile::TempDir) {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    let (d, cfg) = driver_with(&shared_pool(share.path(), ""), None).await;
    (share, d, cfg)
}

/// The default local pool and a shared pool `share` on `dir`, with extra YAML lines for it.
fn shared_pool(dir: &Path, extra: &str) -> String {
    format!(
        "  - name: default\n  - name: share\n    backend: shared\n    path: {}\n{extra}",
        dir.display()
    )
}

fn in_pool(name: &str, bytes: i64, pool: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes);
    r.parameters.insert("pool".into(), pool.into());
    r
}

async fn create(d: &mut Driver, r: CreateVolumeRequest) -> Volume {
    d.ctl
        .create_volume(r)
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume")
}

async fn expand(d: &mut Driver, id: &str, required: i64, limit: i64) -> Result<i64, tonic::Status> {
    d.ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

/// Stages and publishes `id`, writes a file through the pod's view, and tries to delete it: the
/// delete must answer FAILED_PRECONDITION naming the mount, and the file must survive it.
async fn delete_while_published_is_refused(d: &mut Driver, id: &str) {
    let (staging, target) = d.mount_rw(id, "pod").await;
    std::fs::write(target.join("precious"), b"rows").expect("write through the pod's mount");
    let err = d.delete(id).await.expect_err("deleting a published volume must fail");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&staging.display().to_string()) || err.message().contains(&target.display().to_string()),
        "the refusal names where the volume is mounted: {}",
        err.message()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(std::fs::read(target.join("precious")).expect("data kept"), b"rows");

    // Unpublished but still staged: still refused.
    d.unpublish(id, &target).await.expect("unpublish");
    let err = d.delete(id).await.expect_err("deleting a staged volume must fail");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    d.unstage(id, &staging).await.expect("unstage");
    d.delete(id).await.expect("delete once unstaged");
}

#[tokio::test]
async fn deleting_a_published_dir_volume_is_refused_and_its_data_kept() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-busy-dir").await;
    delete_while_published_is_refused(&mut d, &v.volume_id).await;
}

#[tokio::test]
async fn deleting_a_published_btrfs_volume_is_refused_and_its_data_kept() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    let v = create(&mut d, in_pool("pvc-busy-btrfs", 32 * MIB, "b")).await;
    delete_while_published_is_refused(&mut d, &v.volume_id).await;
}

#[tokio::test]
async fn deleting_a_published_shared_dir_volume_is_refused_and_its_data_kept() {
    let (share, mut d, _cfg) = shared_driver().await;
    let v = create(&mut d, in_pool("pvc-busy-shared", 32 * MIB, "share")).await;
    delete_while_published_is_refused(&mut d, &v.volume_id).await;
    assert!(
        std::fs::read_dir(share.path().join(".staged"))
            .expect("marks")
            .next()
            .is_none(),
        "unstage clears the node's mark on the share"
    );
}

#[tokio::test]
async fn a_stage_mark_on_the_share_keeps_any_replica_from_deleting_the_volume() {
    // What a controller replica on another machine sees: no mount of its own, only the node's mark.
    let (share, mut d, _cfg) = shared_driver().await;
    let v = create(&mut d, in_pool("pvc-marked", 32 * MIB, "share")).await;
    let key = v.volume_id.rsplit(':').next().expect("key").to_string();
    let marks = share.path().join(".staged").join(&key);
    std::fs::create_dir_all(&marks).expect("mark dir");
    std::fs::write(marks.join("node-7"), b"").expect("mark");
    let err = d.delete(&v.volume_id).await.expect_err("a marked volume is in use");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("node-7"), "names the node: {}", err.message());
    std::fs::remove_file(marks.join("node-7")).expect("unmark");
    d.delete(&v.volume_id).await.expect("delete once no node marks it");
}

/// Reads `file` from the volume `id` by staging and publishing it on this node.
async fn read_back(d: &mut Driver, id: &str, file: &str) -> Option<Vec<u8>> {
    let (staging, target) = d.mount_rw(id, &format!("read-{}", id.len())).await;
    let got = std::fs::read(target.join(file)).ok();
    d.unmount_all(id, &staging, &target).await;
    got
}

async fn write_file(d: &mut Driver, id: &str, file: &str, bytes: &[u8]) {
    let (staging, target) = d.mount_rw(id, "writer").await;
    std::fs::write(target.join(file), bytes).expect("write");
    d.unmount_all(id, &staging, &target).await;
}

async fn snapshot_name_is_never_adopted_with_another_volumes_data(d: &mut Driver, pool: &str) {
    let a = create(d, in_pool("pvc-src-a", 32 * MIB, pool)).await;
    let b = create(d, in_pool("pvc-src-b", 32 * MIB, pool)).await;
    write_file(d, &a.volume_id, "who", b"a").await;
    write_file(d, &b.volume_id, "who", b"b").await;

    // The snapshot of A is cut, and the process dies before its record.
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "create-snapshot:before-record")]).await;
    let _ = d.snapshot("snap-x", &a.volume_id).await;
    d.wait_exit();
    d.spawn(&[]).await;

    // The same name for B's data: the answer and the data must both be B's.
    let s = d.snapshot("snap-x", &b.volume_id).await.expect("snapshot of b");
    assert_eq!(s.source_volume_id, b.volume_id);
    let mut r = in_pool("pvc-restored", 32 * MIB, pool);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(&s.snapshot_id)),
    });
    let restored = create(d, r).await;
    assert_eq!(
        read_back(d, &restored.volume_id, "who").await.as_deref(),
        Some(&b"b"[..]),
        "the snapshot named for B holds B's data, not the leftover of A's"
    );
}

#[tokio::test]
async fn a_dir_snapshot_left_by_a_crash_is_not_adopted_by_another_source() {
    let mut d = Driver::start().await;
    snapshot_name_is_never_adopted_with_another_volumes_data(&mut d, "default").await;
}

#[tokio::test]
async fn a_btrfs_snapshot_left_by_a_crash_is_not_adopted_by_another_source() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    snapshot_name_is_never_adopted_with_another_volumes_data(&mut d, "b").await;
}

#[tokio::test]
async fn a_volume_left_by_a_crash_is_not_adopted_by_a_create_from_another_source() {
    let mut d = Driver::start().await;
    let a = d.create("pvc-from-a").await;
    write_file(&mut d, &a.volume_id, "who", b"a").await;
    // A clone of A reaches its place, and the process dies before its record.
    let mut clone = create_req("pvc-clone", 64 * MIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_volume(&a.volume_id)),
    });
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "create-volume:before-record")]).await;
    let _ = d.ctl.create_volume(clone).await;
    d.wait_exit();
    d.spawn(&[]).await;
    // The same name asked for as an empty volume gets an empty volume.
    let v = create(&mut d, create_req("pvc-clone", 64 * MIB)).await;
    assert_eq!(
        read_back(&mut d, &v.volume_id, "who").await,
        None,
        "no byte of A in the new volume"
    );
}

#[tokio::test]
async fn half_written_records_are_gone_after_a_restart() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-tmp").await;
    let vols = d.pool_dir().join("volumes");
    std::fs::write(vols.join(".pvc-left.json.tmp"), b"").expect("zero-byte temp record");
    std::fs::write(d.pool_dir().join("snapshots/.snap-left.json.tmp"), b"{").expect("temp record");
    d.kill();
    d.spawn(&[]).await;
    let left: Vec<_> = [vols.clone(), d.pool_dir().join("snapshots")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("dir"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temp records left: {left:?}");
    d.delete(&v.volume_id).await.expect("delete");
}

#[tokio::test]
async fn expanding_btrfs_past_the_pool_is_out_of_range_and_past_free_room_is_exhausted() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    let v = create(&mut d, in_pool("pvc-grow", 32 * MIB, "b")).await;
    let err = expand(&mut d, &v.volume_id, i64::MAX, 0)
        .await
        .expect_err("2^63-1 bytes");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let total = cellar::sys::statfs::usage(&fs.mnt).expect("statfs").total_bytes as i64;
    let err = expand(&mut d, &v.volume_id, total - MIB, 0)
        .await
        .expect_err("more than is free");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The quota did not move: writes still stop at 32 MiB.
    let (staging, target) = d.mount_rw(&v.volume_id, "pod").await;
    let big = vec![7u8; 48 << 20];
    let wrote =
        std::fs::write(target.join("big"), &big).and_then(|_| std::fs::File::open(target.join("big"))?.sync_all());
    assert!(wrote.is_err(), "the 32 MiB limit still holds");
    d.unmount_all(&v.volume_id, &staging, &target).await;
    assert_eq!(
        expand(&mut d, &v.volume_id, 64 * MIB, 0).await.expect("a real grow"),
        64 * MIB
    );
}

#[tokio::test]
async fn expanding_with_an_empty_range_is_invalid_argument_and_changes_nothing() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-empty-range").await;
    let err = expand(&mut d, &v.volume_id, 0, 0).await.expect_err("empty range");
    assert_eq!(err.code(), Code::InvalidArgument);
    let got = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.volume.expect("volume").capacity_bytes, v.capacity_bytes);
    // A limit alone that the volume already meets changes nothing either.
    assert_eq!(
        expand(&mut d, &v.volume_id, 0, v.capacity_bytes * 2)
            .await
            .expect("limit only"),
        v.capacity_bytes
    );
}

fn record_capacity(pool: &Path, key: &str) -> u64 {
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.join("volumes").join(format!("{key}.json"))).expect("record"))
            .expect("json");
    rec["capacity_bytes"].as_u64().expect("capacity")
}

#[tokio::test]
async fn two_controller_replicas_on_one_shared_pool_see_one_truth() {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    let pools = shared_pool(share.path(), "    layouts: [dir, image]\n");
    let (mut a, _ca) = driver_with(&pools, Some("node-a")).await;
    let (mut b, _cb) = driver_with(&pools, Some("node-b")).await;

    let v = create(&mut a, in_pool("pvc-two", 128 * MIB, "share")).await;
    let key = v.volume_id.rsplit(':').next().expect("key").to_string();
    // The other replica finds it by id and in its listing.
    let got = b
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect("the other replica knows the volume")
        .into_inner();
    assert_eq!(got.volume.expect("volume").capacity_bytes, 128 * MIB);
    let listed = b
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed
        .entries
        .iter()
        .any(|e| e.volume.as_ref().is_some_and(|v2| v2.volume_id == v.volume_id)));

    // The provisioner's retry lands on the other replica with a smaller request: it gets the
    // volume as made, and the record on the share keeps its size.
    let again = create(&mut b, in_pool("pvc-two", 64 * MIB, "share")).await;
    assert_eq!(again.volume_id, v.volume_id);
    assert_eq!(again.capacity_bytes, 128 * MIB);
    assert_eq!(record_capacity(share.path(), &key), 128 << 20);

    // Deleted through one, gone for the other.
    b.delete(&v.volume_id).await.expect("delete through b");
    let err = a
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    // And the name is free again on either.
    let re = create(&mut a, in_pool("pvc-two", 64 * MIB, "share")).await;
    assert_eq!(re.capacity_bytes, 64 * MIB);
    a.delete(&re.volume_id).await.expect("delete");
}

#[tokio::test]
async fn a_volume_named_like_a_lease_does_not_block_the_image_volume() {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    let (mut d, _cfg) = driver_with(
        &shared_pool(share.path(), "    layouts: [image, dir]\n    fsType: ext4\n"),
        None,
    )
    .await;
    let mut lease_like = in_pool("db.lease", 32 * MIB, "share");
    lease_like.parameters.insert("layout".into(), "dir".into());
    let l = create(&mut d, lease_like).await;
    let db = create(&mut d, in_pool("db", 64 * MIB, "share")).await;
    let staging: PathBuf = d.path("stage-db");
    stage_rwo(&mut d.node, &db.volume_id, &staging)
        .await
        .expect("the image volume stages beside a volume named like its lease");
    unstage_from(&mut d.node, &db.volume_id, &staging)
        .await
        .expect("unstage");
    d.delete(&db.volume_id).await.expect("delete db");
    d.delete(&l.volume_id).await.expect("delete db.lease");
}

#[tokio::test]
async fn a_volume_whose_subpath_a_pod_uses_is_not_deleted() {
    // kubelet binds a pod's subPath from below the publish path; the publish stays while it does.
    let mut d = Driver::start().await;
    let v = d.create("pvc-subpath").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "pod").await;
    std::fs::create_dir(target.join("sub")).expect("subdir");
    std::fs::write(target.join("sub/rows"), b"rows").expect("write");
    let sub_target = d.path("subpath-mount");
    std::fs::create_dir_all(&sub_target).expect("target");
    let ok = std::process::Command::new("mount")
        .args([
            "--bind",
            target.join("sub").to_str().expect("utf-8"),
            sub_target.to_str().expect("utf-8"),
        ])
        .status()
        .expect("mount");
    assert!(ok.success());
    let err = d.delete(&v.volume_id).await.expect_err("the volume is in use");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(std::fs::read(sub_target.join("rows")).expect("still there"), b"rows");
    let ok = std::process::Command::new("umount")
        .arg(&sub_target)
        .status()
        .expect("umount");
    assert!(ok.success());
    d.unmount_all(&v.volume_id, &staging, &target).await;
    d.delete(&v.volume_id).await.expect("delete");
}

fn with_fs(mut r: CreateVolumeRequest, fs: &str) -> CreateVolumeRequest {
    for c in &mut r.volume_capabilities {
        if let Some(volume_capability::AccessType::Mount(m)) = &mut c.access_type {
            m.fs_type = fs.to_string();
        }
    }
    r
}

fn restore_of(name: &str, snapshot: &str, bytes: i64, pool: &str) -> CreateVolumeRequest {
    let mut r = in_pool(name, bytes, pool);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_snapshot(snapshot)),
    });
    r
}

async fn xfs_image_pool() -> (TestFs, Driver, tempfile::TempDir) {
    let fs = TestFs::new("xfs", 3072);
    let (d, cfg) = driver_with(
        &format!(
            "  - name: img\n    path: {}\n    layout: image\n    fsType: xfs\n",
            fs.mnt.display()
        ),
        None,
    )
    .await;
    (fs, d, cfg)
}

#[tokio::test]
async fn a_small_xfs_volume_is_rounded_up_to_its_minimum_or_out_of_range_past_the_limit() {
    let (fs, mut d, _cfg) = xfs_image_pool().await;
    let v = create(&mut d, in_pool("pvc-small-xfs", 64 * MIB, "img")).await;
    assert_eq!(v.capacity_bytes, 300 * MIB, "rounded up to what mkfs.xfs can make");
    let mut capped = in_pool("pvc-capped-xfs", 64 * MIB, "img");
    capped.capacity_range = Some(CapacityRange {
        required_bytes: 64 * MIB,
        limit_bytes: 100 * MIB,
    });
    let err = d
        .ctl
        .create_volume(capped)
        .await
        .expect_err("cannot fit under the limit");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("300 MiB") && err.message().len() < 400,
        "{}",
        err.message()
    );
    let work: Vec<_> = std::fs::read_dir(fs.mnt.join(".work"))
        .expect("work")
        .flatten()
        .collect();
    assert!(work.is_empty(), "nothing left in .work: {work:?}");
    d.delete(&v.volume_id).await.expect("delete");
}

#[tokio::test]
async fn xfs_copies_stage_beside_their_source_on_one_node() {
    let (_fs, mut d, _cfg) = xfs_image_pool().await;
    let v = create(&mut d, in_pool("pvc-xfs-src", 300 * MIB, "img")).await;
    let (st, tg) = d.mount_rw(&v.volume_id, "src").await;
    std::fs::write(tg.join("who"), b"source").expect("write");
    std::fs::File::open(tg.join("who"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    let s = d
        .snapshot("snap-xfs", &v.volume_id)
        .await
        .expect("snapshot while staged");
    let restored = create(&mut d, restore_of("pvc-xfs-restored", &s.snapshot_id, 300 * MIB, "img")).await;
    let mut clone = in_pool("pvc-xfs-clone", 300 * MIB, "img");
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(from_volume(&v.volume_id)),
    });
    let clone = create(&mut d, clone).await;
    // Both copies carry the source's filesystem UUID; they stage while the source is staged.
    for (i, c) in [&restored, &clone].into_iter().enumerate() {
        let (cst, ctg) = d.mount_rw(&c.volume_id, &format!("copy{i}")).await;
        assert_eq!(std::fs::read(ctg.join("who")).expect("copied file"), b"source");
        d.unmount_all(&c.volume_id, &cst, &ctg).await;
        d.delete(&c.volume_id).await.expect("delete copy");
    }
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn a_restore_keeps_its_sources_filesystem_and_refuses_another() {
    let (_fs, mut d, _cfg) = xfs_image_pool().await;
    let v = create(&mut d, with_fs(in_pool("pvc-ext4-src", 64 * MIB, "img"), "ext4")).await;
    write_file(&mut d, &v.volume_id, "who", b"ext4").await;
    let s = d.snapshot("snap-ext4", &v.volume_id).await.expect("snapshot");
    // Asked for xfs explicitly: refused, nothing made.
    let err = d
        .ctl
        .create_volume(with_fs(
            restore_of("pvc-as-xfs", &s.snapshot_id, 64 * MIB, "img"),
            "xfs",
        ))
        .await
        .expect_err("another filesystem");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("ext4"), "{}", err.message());
    // No filesystem named: the pool's default is xfs, the restore is ext4 and stages as ext4.
    let r = create(&mut d, restore_of("pvc-as-source", &s.snapshot_id, 64 * MIB, "img")).await;
    assert_eq!(
        read_back(&mut d, &r.volume_id, "who").await.as_deref(),
        Some(&b"ext4"[..])
    );
    // Its retry is the same volume.
    let again = create(&mut d, restore_of("pvc-as-source", &s.snapshot_id, 64 * MIB, "img")).await;
    assert_eq!(again.volume_id, r.volume_id);
}

#[tokio::test]
async fn node_expand_and_stats_answer_only_for_the_volumes_own_paths() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-paths").await;
    let (st, tg) = d.mount_rw(&v.volume_id, "pod").await;
    for path in ["/", "/etc", "/var/lib"] {
        let err = d
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                volume_path: path.into(),
                ..Default::default()
            })
            .await
            .expect_err("not the volume's path");
        assert_eq!(err.code(), Code::NotFound, "{path}: {err:?}");
        // Stats of a path that is not the volume's: NOT_FOUND (the spec's "volume does not exist
        // on specified volume_path"), no figures of that filesystem.
        let err = d
            .stats(&v.volume_id, Path::new(path))
            .await
            .expect_err("not the volume's path");
        assert_eq!(err.code(), Code::NotFound, "{path}: {err:?}");
    }
    d.stats(&v.volume_id, &tg).await.expect("the publish path");
    d.stats(&v.volume_id, &st).await.expect("the staging path");
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn nul_and_overlong_paths_and_ids_are_bounded_client_errors() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-nul").await;
    let long = format!("/{}", "a".repeat(65536));
    for bad in ["/tmp/with\0nul".to_string(), long.clone()] {
        let err = d
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: bad.clone(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await
            .expect_err("bad path");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().len() <= 1100, "bounded: {} bytes", err.message().len());
        let err = d.stats(&v.volume_id, Path::new(&bad)).await.expect_err("bad path");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let err = d.delete(&format!("local:node-1:default:{}", "x".repeat(65536))).await;
    if let Err(e) = err {
        assert!(e.message().len() <= 1100, "bounded: {} bytes", e.message().len());
    }
    let err = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "y".repeat(65536),
        })
        .await
        .expect_err("not an id");
    assert!(err.message().len() <= 1100, "bounded: {} bytes", err.message().len());
}

#[tokio::test]
async fn a_dir_volume_over_its_capacity_reports_an_abnormal_condition() {
    let mut d = Driver::start().await;
    let v = create(&mut d, create_req("pvc-over", 4 * MIB)).await;
    let (st, tg) = d.mount_rw(&v.volume_id, "pod").await;
    let stats = d.stats(&v.volume_id, &tg).await.expect("stats");
    assert!(!stats.volume_condition.expect("condition").abnormal);
    let mut f = std::fs::File::create(tg.join("big")).expect("create");
    std::io::Write::write_all(&mut f, &vec![1u8; 6 << 20]).expect("write");
    f.sync_all().expect("sync");
    drop(f);
    // A fresh driver counts afresh (the count is cached for a minute).
    d.kill();
    d.spawn(&[]).await;
    let c = d
        .stats(&v.volume_id, &tg)
        .await
        .expect("stats")
        .volume_condition
        .expect("condition");
    assert!(c.abnormal, "{c:?}");
    assert!(c.message.contains("do not enforce capacity"), "{}", c.message);
    let got = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(got.status.and_then(|s| s.volume_condition).is_some_and(|c| c.abnormal));
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn a_static_handle_naming_a_symlink_is_a_client_error() {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    std::fs::create_dir(share.path().join("real")).expect("dir");
    std::os::unix::fs::symlink("/etc", share.path().join("link")).expect("symlink");
    let (mut d, _cfg) = driver_with(&shared_pool(share.path(), ""), None).await;
    let staging = d.path("static-stage");
    let err = stage_rwo(&mut d.node, "static:share:link", &staging)
        .await
        .expect_err("symlink");
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::NotFound),
        "a client error, not {err:?}"
    );
    assert!(mounts_under(d.dir.path()).is_empty(), "nothing mounted");
}

/// Restarts the driver with failure points armed (`CELLAR_FAIL_AT`, the `crash-points` feature).
async fn failing(d: &mut Driver, spec: &str) {
    d.kill();
    d.spawn(&[("CELLAR_FAIL_AT", spec)]).await;
}

fn entries_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_btrfs_snapshot_that_fails_on_a_full_pool_leaves_nothing_and_frees_its_name() {
    // The attack as found: the subvolume snapshot is cut, its record cannot be written (ENOSPC).
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    let a = create(&mut d, in_pool("pvc-full-a", 32 * MIB, "b")).await;
    let b = create(&mut d, in_pool("pvc-full-b", 32 * MIB, "b")).await;
    write_file(&mut d, &a.volume_id, "who", b"a").await;
    write_file(&mut d, &b.volume_id, "who", b"b").await;
    failing(&mut d, "record:write=ENOSPC").await;
    let err = d
        .snapshot("snap-full", &a.volume_id)
        .await
        .expect_err("the pool is full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        entries_of(&fs.mnt.join("snapshots")).is_empty(),
        "no subvolume and no temp record left: {:?}",
        entries_of(&fs.mnt.join("snapshots"))
    );
    d.kill();
    d.spawn(&[]).await;
    let s = d.snapshot("snap-full", &b.volume_id).await.expect("snapshot of b");
    assert_eq!(s.source_volume_id, b.volume_id);
    let r = create(&mut d, restore_of("pvc-full-r", &s.snapshot_id, 32 * MIB, "b")).await;
    assert_eq!(read_back(&mut d, &r.volume_id, "who").await.as_deref(), Some(&b"b"[..]));
}

#[tokio::test]
async fn failed_creates_and_copies_leave_no_data_behind() {
    let mut d = Driver::start().await;
    let a = d.create("pvc-fail-src").await;
    write_file(&mut d, &a.volume_id, "who", b"a").await;
    let vols = d.pool_dir().join("volumes");
    let before = entries_of(&vols);
    // The record of a new volume cannot be written; then its copy fails midway.
    for (spec, name) in [("record:write=ENOSPC", "pvc-fail-1"), ("copy:data=EIO", "pvc-fail-2")] {
        failing(&mut d, spec).await;
        let mut r = create_req(name, 64 * MIB);
        if name.ends_with('2') {
            r.volume_content_source = Some(VolumeContentSource {
                r#type: Some(from_volume(&a.volume_id)),
            });
        }
        let err = d.ctl.create_volume(r).await.expect_err("fails");
        assert!(
            matches!(err.code(), Code::ResourceExhausted | Code::Internal | Code::Unavailable),
            "{spec}: {err:?}"
        );
        assert_eq!(entries_of(&vols), before, "{spec}: nothing of {name} is left");
        assert!(
            entries_of(&d.pool_dir().join(".work")).is_empty(),
            "{spec}: .work is empty"
        );
    }
    d.kill();
    d.spawn(&[]).await;
    // The names are free and work once the disk does.
    d.create("pvc-fail-1").await;
}

#[tokio::test]
async fn image_volumes_unstaged_at_once_each_detach_cleanly() {
    // Every unstage looks its own loop device up while the other's is being detached.
    let fs = TestFs::new("ext4", 1024);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let a = create(&mut d, in_pool("pvc-unstage-a", 16 * MIB, "img")).await;
    let b = create(&mut d, in_pool("pvc-unstage-b", 16 * MIB, "img")).await;
    let (sa, sb) = (d.path("stage-a"), d.path("stage-b"));
    for round in 0..15 {
        stage_rwo(&mut d.node, &a.volume_id, &sa).await.expect("stage a");
        stage_rwo(&mut d.node, &b.volume_id, &sb).await.expect("stage b");
        let (mut na, mut nb) = (d.node.clone(), d.node.clone());
        let (ra, rb) = tokio::join!(
            unstage_from(&mut na, &a.volume_id, &sa),
            unstage_from(&mut nb, &b.volume_id, &sb)
        );
        ra.unwrap_or_else(|e| panic!("round {round}: unstage a: {e:?}"));
        rb.unwrap_or_else(|e| panic!("round {round}: unstage b: {e:?}"));
    }
    assert!(common::fs::loops_under(&fs.mnt).is_empty(), "no loop device left");
}

/// A static handle is for directories of the user's own on a share: one below what cellar manages
/// there (another volume's data, a snapshot, the stage marks and leases that guard deletes) would
/// let a pod use a volume that a DeleteVolume then removes under it, or switch that guard off.
#[tokio::test]
async fn a_static_handle_cannot_name_what_cellar_manages_on_the_share() {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    let (mut d, _cfg) = driver_with(&shared_pool(share.path(), ""), None).await;
    let v = create(&mut d, in_pool("pvc-managed", 8 * MIB, "share")).await;
    let key = v.volume_id.rsplit(':').next().expect("key").to_string();
    std::fs::create_dir_all(share.path().join("datasets/train")).expect("own dir");
    let staging = d.path("static-managed");
    for (handle, subdir) in [
        (format!("static:share:volumes/{key}"), ""),
        ("static:share:volumes".to_string(), key.as_str()),
        ("static:share:snapshots".to_string(), ""),
        // A share that folds case (SMB) would open these as the same directories.
        (format!("static:share:Volumes/{key}"), ""),
        ("static:share:SNAPSHOTS".to_string(), ""),
        ("static:share:snapshotſ".to_string(), ""),
        ("static:share:groups".to_string(), ""),
        ("static:share:.staged".to_string(), ""),
        ("static:share:.leases".to_string(), ""),
        ("static:share:.trash".to_string(), ""),
    ] {
        std::fs::create_dir_all(&staging).expect("staging");
        let mut ctx = std::collections::HashMap::new();
        if !subdir.is_empty() {
            ctx.insert("subdir".to_string(), subdir.to_string());
        }
        let err = d
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: handle.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(rwo()),
                volume_context: ctx,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{handle} (subdir {subdir:?}): {err:?}"
        );
        assert!(err.message().contains("manages"), "{}", err.message());
        assert!(mounts_under(d.dir.path()).is_empty(), "nothing mounted for {handle}");
    }
    // A directory of the user's own still stages, and the volume's delete finds nothing in use.
    stage_rwo(&mut d.node, "static:share:datasets", &staging)
        .await
        .expect("a static handle of the user's own");
    unstage_from(&mut d.node, "static:share:datasets", &staging)
        .await
        .expect("unstage");
    d.ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
}

/// Concurrent CreateVolume calls of one name: a second pool (or the shared pool) named by the
/// other call must not give the name a second volume. Sequentially the second call is
/// ALREADY_EXISTS ("already exists in pool"); at once, both answers must name one volume (or
/// one of them is refused), and exactly one volume of the name is left.
async fn same_name_in_two_pools_at_once(d: &mut Driver, pools: [(&str, &Path); 2], rounds: usize) {
    for round in 0..rounds {
        let name = format!("pvc-twin-{round}");
        let (mut ca, mut cb) = (d.ctl.clone(), d.ctl.clone());
        let (ra, rb) = tokio::join!(
            ca.create_volume(in_pool(&name, 8 * MIB, pools[0].0)),
            cb.create_volume(in_pool(&name, 8 * MIB, pools[1].0))
        );
        let ids: Vec<String> = [&ra, &rb]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.get_ref().volume.as_ref().expect("volume").volume_id.clone())
            .collect();
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(
                    matches!(e.code(), Code::AlreadyExists | Code::Aborted),
                    "round {round}: {e:?}"
                );
            }
        }
        let recorded: Vec<&Path> = pools
            .iter()
            .map(|(_, dir)| *dir)
            .filter(|dir| dir.join(format!("volumes/{name}.json")).exists())
            .collect();
        assert!(
            recorded.len() <= 1,
            "round {round}: name {name} has a volume in each pool: {ra:?} / {rb:?}"
        );
        if ids.len() == 2 {
            assert_eq!(ids[0], ids[1], "round {round}: one name, two volumes");
        }
    }
}

#[tokio::test]
async fn one_name_created_in_two_local_pools_at_once_makes_one_volume() {
    let other = tempfile::Builder::new().prefix("cellar-test-").tempdir().expect("pool");
    let (mut d, _cfg) = driver_with(
        &format!(
            "  - name: default\n  - name: other\n    path: {}\n",
            other.path().display()
        ),
        None,
    )
    .await;
    let default = d.pool_dir();
    same_name_in_two_pools_at_once(&mut d, [("default", &default), ("other", other.path())], 30).await;
}

#[tokio::test]
async fn one_name_created_in_a_local_and_a_shared_pool_at_once_makes_one_volume() {
    let (share, mut d, _cfg) = shared_driver().await;
    let default = d.pool_dir();
    same_name_in_two_pools_at_once(&mut d, [("default", &default), ("share", share.path())], 30).await;
}

/// Concurrent CreateSnapshot calls of one name from volumes of two pools: sequentially the second
/// is ALREADY_EXISTS; at once, exactly one snapshot of the name may be left.
#[tokio::test]
async fn one_snapshot_name_cut_from_volumes_of_two_pools_at_once_makes_one_snapshot() {
    let other = tempfile::Builder::new().prefix("cellar-test-").tempdir().expect("pool");
    let (mut d, _cfg) = driver_with(
        &format!(
            "  - name: default\n  - name: other\n    path: {}\n",
            other.path().display()
        ),
        None,
    )
    .await;
    let a = create(&mut d, in_pool("pvc-snap-twin-a", 8 * MIB, "default")).await;
    let b = create(&mut d, in_pool("pvc-snap-twin-b", 8 * MIB, "other")).await;
    let default = d.pool_dir();
    for round in 0..30 {
        let name = format!("snap-twin-{round}");
        let (mut ca, mut cb) = (d.ctl.clone(), d.ctl.clone());
        let req = |src: &str| CreateSnapshotRequest {
            name: name.clone(),
            source_volume_id: src.to_string(),
            ..Default::default()
        };
        let (ra, rb) = tokio::join!(
            ca.create_snapshot(req(&a.volume_id)),
            cb.create_snapshot(req(&b.volume_id))
        );
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(
                    matches!(e.code(), Code::AlreadyExists | Code::Aborted),
                    "round {round}: {e:?}"
                );
            }
        }
        let recorded = [default.as_path(), other.path()]
            .iter()
            .filter(|dir| dir.join(format!("snapshots/{name}.json")).exists())
            .count();
        assert!(
            recorded <= 1,
            "round {round}: snapshot {name} was cut from both volumes: {ra:?} / {rb:?}"
        );
    }
}

/// DeleteVolume sent at the same moment as NodeStageVolume (and, every other round,
/// NodePublishVolume) of the same volume, `rounds` times: a stage or publish that answered OK
/// keeps the volume whole (its file reads back through a fresh mount once it is unmounted, and
/// its delete is refused until then); a delete that answered OK leaves nothing mounted, attached
/// or in the pool. Whatever both answered, the calls converge on retry and nothing leaks.
async fn delete_races_stage_and_publish(
    d: &mut Driver,
    req: impl Fn(&str) -> CreateVolumeRequest,
    pool_dir: &Path,
    shared: bool,
    rounds: usize,
) {
    for round in 0..rounds {
        let name = format!("pvc-race-{round}");
        let v = create(d, req(&name)).await;
        let id = v.volume_id.clone();
        write_file(d, &id, "who", name.as_bytes()).await;
        let staging = d.path(&format!("race-{round}-staging"));
        let target = d.path(&format!("race-{round}-target"));
        std::fs::create_dir_all(&staging).expect("staging");
        let publish = round % 2 == 1;
        let (mut node, mut ctl) = (d.node.clone(), d.ctl.clone());
        let mount = async {
            stage_rwo(&mut node, &id, &staging).await?;
            if publish {
                node.node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await?;
            }
            Ok::<(), tonic::Status>(())
        };
        let delete = ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        });
        let (mounted, deleted) = tokio::join!(mount, delete);
        let deleted = deleted.map(|_| ());
        let ctx = format!("round {round} (publish {publish}): mount {mounted:?}, delete {deleted:?}");
        assert!(!(mounted.is_ok() && deleted.is_ok()), "{ctx}: both answered OK");
        if deleted.is_ok() {
            assert!(mounts_under(d.dir.path()).is_empty(), "{ctx}: mounts left");
            assert!(common::fs::loops_under(pool_dir).is_empty(), "{ctx}: loop devices left");
            assert!(
                !pool_dir.join(format!("volumes/{name}")).exists()
                    && !pool_dir.join(format!("volumes/{name}.json")).exists(),
                "{ctx}: the volume is left in the pool"
            );
        }
        if mounted.is_ok() {
            let seen = if publish { &target } else { &staging };
            assert_eq!(
                std::fs::read(seen.join("who")).ok().as_deref(),
                Some(name.as_bytes()),
                "{ctx}: data through the mount"
            );
            let err = d.delete(&id).await.expect_err("a mounted volume is not deleted");
            assert!(
                matches!(err.code(), Code::FailedPrecondition | Code::Aborted),
                "{ctx}: {err:?}"
            );
        }
        // Converge: whatever was mounted is unmounted, and the delete finishes.
        if publish {
            d.unpublish(&id, &target)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: unpublish: {e:?}"));
        }
        d.unstage(&id, &staging)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: unstage: {e:?}"));
        if mounted.is_ok() {
            assert_eq!(
                read_back(d, &id, "who").await.as_deref(),
                Some(name.as_bytes()),
                "{ctx}: the data of a volume that was mounted is whole"
            );
        }
        d.delete(&id)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: delete once unmounted: {e:?}"));
        assert!(mounts_under(d.dir.path()).is_empty(), "{ctx}: mounts left");
        assert!(common::fs::loops_under(pool_dir).is_empty(), "{ctx}: loop devices left");
        assert!(
            entries(&pool_dir.join("volumes")).is_empty(),
            "{ctx}: volumes left in the pool: {:?}",
            entries(&pool_dir.join("volumes"))
        );
        assert!(entries(&pool_dir.join(".work")).is_empty(), "{ctx}: .work not empty");
        if !shared {
            assert!(entries(&pool_dir.join(".trash")).is_empty(), "{ctx}: .trash not empty");
        }
    }
}

#[tokio::test]
async fn delete_racing_stage_and_publish_of_a_dir_volume() {
    let mut d = Driver::start().await;
    let pool = d.pool_dir();
    delete_races_stage_and_publish(&mut d, |n| create_req(n, 8 * MIB), &pool, false, 60).await;
}

#[tokio::test]
async fn delete_racing_stage_and_publish_of_a_btrfs_volume() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    delete_races_stage_and_publish(&mut d, |n| in_pool(n, 16 * MIB, "b"), &fs.mnt, false, 60).await;
}

#[tokio::test]
async fn delete_racing_stage_and_publish_of_an_image_volume() {
    let fs = TestFs::new("ext4", 512);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    delete_races_stage_and_publish(&mut d, |n| in_pool(n, 16 * MIB, "img"), &fs.mnt, false, 60).await;
}

#[tokio::test]
async fn delete_racing_stage_and_publish_of_a_shared_dir_volume() {
    let (share, mut d, _cfg) = shared_driver().await;
    let dir = share.path().to_path_buf();
    delete_races_stage_and_publish(&mut d, |n| in_pool(n, 8 * MIB, "share"), &dir, true, 60).await;
}

#[tokio::test]
async fn delete_racing_stage_and_publish_of_a_shared_image_volume() {
    let fs = TestFs::new("ext4", 512);
    let (mut d, _cfg) = driver_with(&shared_pool(&fs.mnt, "    layouts: [dir, image]\n"), None).await;
    let req = |n: &str| {
        let mut r = in_pool(n, 16 * MIB, "share");
        r.parameters.insert("layout".into(), "image".into());
        r
    };
    delete_races_stage_and_publish(&mut d, req, &fs.mnt, true, 60).await;
}

/// The answers of calls spawned at once, in order.
async fn all_of<T>(calls: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.expect("call task"));
    }
    out
}

/// The driver with one pool, `img`, of image volumes (ext4 inside) on `fs`.
async fn image_pool_driver(fs: &TestFs) -> (Driver, tempfile::TempDir) {
    let pool = format!(
        "  - name: img\n    path: {}\n    layout: image\n    fsType: ext4\n",
        fs.mnt.display()
    );
    driver_with(&pool, None).await
}

/// What GetCapacity says `pool` can still give to `layout` volumes.
async fn capacity_of(d: &mut Driver, pool: &str, layout: &str) -> i64 {
    d.ctl
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![rwo()],
            parameters: [
                ("pool".to_string(), pool.to_string()),
                ("layout".to_string(), layout.to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .expect("capacity")
        .into_inner()
        .available_capacity
}

/// Creates and expands sent at once never take more room than a pool of image volumes has:
/// of eight volumes (or growths) of a quarter of its room and a bit, at most three are made.
#[tokio::test]
async fn image_creates_and_expands_at_once_never_overcommit_the_pool() {
    let fs = TestFs::new("ext4", 512);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let room = capacity_of(&mut d, "img", "image").await;
    let size = room / 4 + MIB;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut c = d.ctl.clone();
            tokio::spawn(async move { c.create_volume(in_pool(&format!("pvc-room-{i}"), size, "img")).await })
        })
        .collect();
    let made: Vec<String> = all_of(calls)
        .await
        .into_iter()
        .filter_map(|r| match r {
            Ok(r) => Some(r.into_inner().volume.expect("volume").volume_id),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                None
            }
        })
        .collect();
    assert!(
        made.len() <= 3,
        "{} volumes of {size} bytes in a room of {room}",
        made.len()
    );
    for id in &made {
        d.delete(id).await.expect("delete");
    }

    let small: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..8 {
            v.push(
                create(&mut d, in_pool(&format!("pvc-grow-{i}"), 8 * MIB, "img"))
                    .await
                    .volume_id,
            );
        }
        v
    };
    let room = capacity_of(&mut d, "img", "image").await;
    let more = room / 4 + MIB;
    let calls: Vec<_> = small
        .iter()
        .map(|id| {
            let mut c = d.ctl.clone();
            let id = id.clone();
            tokio::spawn(async move {
                c.controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id,
                    capacity_range: Some(CapacityRange {
                        required_bytes: 8 * MIB + more,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    let grown = all_of(calls)
        .await
        .into_iter()
        .filter(|r| match r {
            Ok(_) => true,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                false
            }
        })
        .count();
    assert!(grown <= 3, "{grown} volumes grown by {more} bytes in a room of {room}");
}

/// A copy sent at the same moment as the delete of its source, `rounds` times for each of:
/// CreateSnapshot against DeleteVolume of its volume, CreateVolume from a snapshot against
/// DeleteSnapshot of it, and a clone against DeleteVolume of its source. A copy that answered OK
/// holds the source's data, whatever the delete answered; nothing is left once everything is
/// deleted.
async fn copies_race_deletes_of_their_source(
    d: &mut Driver,
    req: impl Fn(&str) -> CreateVolumeRequest,
    pool_dir: &Path,
    rounds: usize,
) {
    let delete_snapshot = |ctl: &mut cellar::csi::v1::controller_client::ControllerClient<_>, id: String| {
        let mut ctl = ctl.clone();
        async move {
            ctl.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ())
        }
    };
    for round in 0..rounds {
        let name = format!("pvc-src-{round}");
        let v = create(d, req(&name)).await.volume_id;
        write_file(d, &v, "who", name.as_bytes()).await;
        let snap = d
            .snapshot(&format!("snap-src-{round}"), &v)
            .await
            .expect("snapshot")
            .snapshot_id;
        let mut made: Vec<String> = Vec::new(); // volumes made from the source, to read back
        let mut snaps: Vec<String> = vec![snap.clone()];

        // 1. CreateSnapshot against DeleteVolume of its source.
        let (mut a, mut b) = (d.ctl.clone(), d.ctl.clone());
        let (cut, deleted) = tokio::join!(
            a.create_snapshot(CreateSnapshotRequest {
                name: format!("snap-race-{round}"),
                source_volume_id: v.clone(),
                ..Default::default()
            }),
            b.delete_volume(DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
        );
        let ctx = format!("round {round}: snapshot {cut:?}, delete {deleted:?}");
        if let Ok(s) = &cut {
            let s = s.get_ref().snapshot.clone().expect("snapshot");
            assert_eq!(s.source_volume_id, v, "{ctx}");
            snaps.push(s.snapshot_id.clone());
            let mut r = req(&format!("pvc-from-cut-{round}"));
            r.volume_content_source = Some(VolumeContentSource {
                r#type: Some(from_snapshot(&s.snapshot_id)),
            });
            made.push(create(d, r).await.volume_id);
        }
        let source_gone = deleted.is_ok();

        // 2. CreateVolume from a snapshot against DeleteSnapshot of it.
        let mut r = req(&format!("pvc-restore-race-{round}"));
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(from_snapshot(&snap)),
        });
        let mut a = d.ctl.clone();
        let (restored, snap_deleted) = tokio::join!(a.create_volume(r), delete_snapshot(&mut d.ctl, snap.clone()));
        let ctx2 = format!("round {round}: restore {restored:?}, delete snapshot {snap_deleted:?}");
        if let Ok(r) = &restored {
            made.push(r.get_ref().volume.clone().expect("volume").volume_id);
        }
        for r in [restored.as_ref().err(), snap_deleted.as_ref().err()]
            .into_iter()
            .flatten()
        {
            assert!(matches!(r.code(), Code::Aborted | Code::NotFound), "{ctx2}");
        }

        // 3. A clone against DeleteVolume of its source (when the source is still there).
        if !source_gone {
            let mut r = req(&format!("pvc-clone-race-{round}"));
            r.volume_content_source = Some(VolumeContentSource {
                r#type: Some(from_volume(&v)),
            });
            let (mut a, mut b) = (d.ctl.clone(), d.ctl.clone());
            let (cloned, deleted) = tokio::join!(
                a.create_volume(r),
                b.delete_volume(DeleteVolumeRequest {
                    volume_id: v.clone(),
                    ..Default::default()
                })
            );
            let ctx3 = format!("round {round}: clone {cloned:?}, delete {deleted:?}");
            if let Ok(r) = &cloned {
                made.push(r.get_ref().volume.clone().expect("volume").volume_id);
            }
            for r in [cloned.as_ref().err(), deleted.as_ref().err()].into_iter().flatten() {
                assert!(matches!(r.code(), Code::Aborted | Code::NotFound), "{ctx3}");
            }
        }
        for id in &made {
            assert_eq!(
                read_back(d, id, "who").await.as_deref(),
                Some(name.as_bytes()),
                "{ctx}: copy {id} holds its source's data"
            );
            d.delete(id).await.expect("delete copy");
        }
        for s in &snaps {
            delete_snapshot(&mut d.ctl, s.clone()).await.expect("delete snapshot");
        }
        d.delete(&v).await.expect("delete source");
        assert!(mounts_under(d.dir.path()).is_empty(), "{ctx}: mounts left");
        assert!(common::fs::loops_under(pool_dir).is_empty(), "{ctx}: loop devices left");
        for sub in ["volumes", "snapshots", ".work", ".trash"] {
            assert!(
                entries(&pool_dir.join(sub)).is_empty(),
                "{ctx}: {sub} not empty: {:?}",
                entries(&pool_dir.join(sub))
            );
        }
    }
}

#[tokio::test]
async fn copies_racing_deletes_of_their_dir_source() {
    let mut d = Driver::start().await;
    let pool = d.pool_dir();
    copies_race_deletes_of_their_source(&mut d, |n| create_req(n, 8 * MIB), &pool, 25).await;
}

#[tokio::test]
async fn copies_racing_deletes_of_their_btrfs_source() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _cfg) = driver_with(
        &format!("  - name: b\n    path: {}\n    layout: btrfs\n", fs.mnt.display()),
        None,
    )
    .await;
    copies_race_deletes_of_their_source(&mut d, |n| in_pool(n, 16 * MIB, "b"), &fs.mnt, 25).await;
}

#[tokio::test]
async fn copies_racing_deletes_of_their_image_source() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    copies_race_deletes_of_their_source(&mut d, |n| in_pool(n, 16 * MIB, "img"), &fs.mnt, 25).await;
}

/// Two volumes staged at once, one at a path inside the other's staging path: sequentially the
/// inner one is refused once the outer one is staged (INVALID_ARGUMENT, nothing made inside its
/// data). At once, the inner stage must not make its directory inside the other volume's data,
/// nor mount there.
#[tokio::test]
async fn a_stage_inside_another_volumes_stage_made_at_the_same_time_is_refused() {
    // Each stage waits a moment between its path check and its mounts: the outer stage, sent
    // first, mounts while the inner one, sent a little later, waits past its check.
    let mut d = Driver::start_with(&[], &[("CELLAR_DELAY_AT", "stage:after-path-check=100")]).await;
    let a = d.create("pvc-outer").await.volume_id;
    let b = d.create("pvc-inner").await.volume_id;
    let data_a = d.pool_dir().join("volumes/pvc-outer");
    for round in 0..5 {
        let outer = d.path(&format!("nest-{round}"));
        let inner = outer.join("sub");
        std::fs::create_dir_all(&outer).expect("outer");
        let (mut na, mut nb) = (d.node.clone(), d.node.clone());
        let (ra, rb) = tokio::join!(
            async {
                na.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: a.clone(),
                    staging_target_path: outer.display().to_string(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await
            },
            async {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                nb.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: b.clone(),
                    staging_target_path: inner.display().to_string(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await
            }
        );
        let ctx = format!(
            "round {round}: outer {:?}, inner {:?}",
            ra.as_ref().map(|_| ()),
            rb.as_ref().map(|_| ())
        );
        assert!(
            entries(&data_a).is_empty(),
            "{ctx}: the inner stage made {:?} inside the outer volume's data",
            entries(&data_a)
        );
        // Whatever both answered, both converge.
        d.unstage(&a, &outer)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: unstage outer: {e:?}"));
        d.unstage(&b, &inner)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: unstage inner: {e:?}"));
        assert!(mounts_under(d.dir.path()).is_empty(), "{ctx}: mounts left");
    }
}

/// A filesystem-consistent snapshot (freeze) of a staged image volume sent at the same moment as
/// its NodeUnstageVolume, `rounds` times: the snapshot's freeze and the unstage's unmount meet on
/// one filesystem. Whatever both answer, the unstage converges on retry, nothing stays frozen,
/// mounted or attached, and a snapshot that answered OK restores the volume's data.
#[tokio::test]
async fn a_frozen_snapshot_racing_the_unstage_of_its_volume_converges() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let v = create(&mut d, in_pool("pvc-freeze-race", 16 * MIB, "img"))
        .await
        .volume_id;
    write_file(&mut d, &v, "who", b"frozen").await;
    let staging = d.path("freeze-staging");
    for round in 0..20 {
        stage_rwo(&mut d.node, &v, &staging).await.expect("stage");
        let (mut ctl, mut node) = (d.ctl.clone(), d.node.clone());
        let (cut, unstaged) = tokio::join!(
            ctl.create_snapshot(CreateSnapshotRequest {
                name: format!("snap-freeze-{round}"),
                source_volume_id: v.clone(),
                parameters: [("freeze".to_string(), "true".to_string())].into(),
                ..Default::default()
            }),
            async {
                // A little later each round, to meet the snapshot at another step.
                tokio::time::sleep(std::time::Duration::from_micros(round * 500)).await;
                unstage_from(&mut node, &v, &staging).await
            }
        );
        let ctx = format!("round {round}: snapshot {cut:?}, unstage {unstaged:?}");
        let mut tries = 0;
        while let Err(e) = d.unstage(&v, &staging).await {
            tries += 1;
            assert!(tries < 50, "{ctx}: unstage does not converge: {e:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(mounts_under(d.dir.path()).is_empty(), "{ctx}: mounts left");
        assert!(common::fs::loops_under(&fs.mnt).is_empty(), "{ctx}: loop devices left");
        if let Ok(s) = cut {
            let s = s.into_inner().snapshot.expect("snapshot").snapshot_id;
            let r = create(&mut d, restore_of(&format!("pvc-thawed-{round}"), &s, 16 * MIB, "img")).await;
            assert_eq!(
                read_back(&mut d, &r.volume_id, "who").await.as_deref(),
                Some(&b"frozen"[..]),
                "{ctx}"
            );
            d.delete(&r.volume_id).await.expect("delete restore");
            d.ctl
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: s,
                    ..Default::default()
                })
                .await
                .expect("delete snapshot");
        }
    }
    // The volume's filesystem is not left frozen: it stages and takes a write.
    write_file(&mut d, &v, "after", b"thawed").await;
    d.delete(&v).await.expect("delete");
}

/// A snapshot of an image volume copies what the image holds; that room must not be taken from
/// what existing images hold back to grow into within their capacity (their writes would fail
/// with ENOSPC on the pool): once the room is gone, snapshots are RESOURCE_EXHAUSTED and
/// GetCapacity never has to go below what the pool's free space leaves.
#[tokio::test]
async fn image_snapshots_never_take_the_room_images_hold_back() {
    let fs = TestFs::new("ext4", 512);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let room = capacity_of(&mut d, "img", "image").await;
    let size = room * 6 / 10;
    let v = create(&mut d, in_pool("pvc-holds-back", size, "img")).await.volume_id;
    write_file(&mut d, &v, "data", &noise(100 << 20)).await;
    for i in 0..6 {
        match d.snapshot(&format!("snap-eat-{i}"), &v).await {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "snapshot {i}: {e:?}"),
        }
    }
    assert_image_may_still_grow(&fs, "pvc-holds-back", size);
}

/// On a pool that shares blocks between files (xfs with reflink, btrfs) a snapshot of an image
/// takes no room at once: it shares the image's blocks, which the image writes anew when it
/// overwrites them. That room is held back as well, so GetCapacity never offers what the image may
/// need to rewrite its data and fill its capacity (it used to, and a volume made in that room
/// could then make the image's writes fail with ENOSPC).
#[tokio::test]
async fn on_a_reflink_pool_images_keep_the_room_to_rewrite_what_their_snapshots_share() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let size = capacity_of(&mut d, "img", "image").await / 2;
    let v = create(&mut d, in_pool("pvc-shared-blocks", size, "img"))
        .await
        .volume_id;
    write_file(&mut d, &v, "data", &noise(100 << 20)).await;
    let before = capacity_of(&mut d, "img", "image").await;
    d.snapshot("snap-shares-blocks", &v).await.expect("snapshot");
    let after = capacity_of(&mut d, "img", "image").await;
    let st = nix::sys::statvfs::statvfs(&fs.mnt).expect("statvfs");
    let free = st.blocks_available() as i64 * st.fragment_size() as i64;
    // (Within a MiB: the few blocks of the image that no snapshot shares are its own already.)
    assert!(
        after + size <= free + MIB,
        "GetCapacity offers {after} bytes beside a {size}-byte image whose data a snapshot shares, with {free} free"
    );
    assert!(
        before - after >= 90 * MIB,
        "the blocks the snapshot shares are held back: {before} before, {after} after"
    );
}

/// The image volume `name` of `size` bytes can still grow into all of its capacity (the pool's
/// free space covers it), and refused copies left nothing in `.work`.
fn assert_image_may_still_grow(fs: &TestFs, name: &str, size: i64) {
    let image = fs.mnt.join("volumes").join(name);
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&image).expect("image").blocks() * 512
    };
    let st = nix::sys::statvfs::statvfs(&fs.mnt).expect("statvfs");
    let free = st.blocks_available() as i64 * st.fragment_size() as i64;
    assert!(
        free >= size - allocated as i64,
        "the image may still grow by {} bytes but the pool has {free} free",
        size - allocated as i64
    );
    assert!(
        entries(&fs.mnt.join(".work")).is_empty(),
        "a refused copy leaves nothing"
    );
}

/// The image members of a group snapshot are held to the same room as single snapshots: a group
/// of an image volume used to copy it whatever room the image held back to grow into, and its
/// writes within its capacity could then fail with ENOSPC on the pool.
#[tokio::test]
async fn group_snapshots_of_images_never_take_the_room_images_hold_back() {
    use cellar::csi::v1::group_controller_client::GroupControllerClient;
    let fs = TestFs::new("ext4", 512);
    let (mut d, _cfg) = image_pool_driver(&fs).await;
    let room = capacity_of(&mut d, "img", "image").await;
    let size = room * 6 / 10;
    let v = create(&mut d, in_pool("pvc-group-holds-back", size, "img"))
        .await
        .volume_id;
    write_file(&mut d, &v, "data", &noise(100 << 20)).await;
    let mut groups = GroupControllerClient::new(cellar::client::connect(&d.endpoint()).await.expect("connect"));
    let mut refused = 0;
    for i in 0..6 {
        let cut = groups
            .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                name: format!("grp-eat-{i}"),
                source_volume_ids: vec![v.clone()],
                ..Default::default()
            })
            .await;
        if let Err(e) = cut {
            assert_eq!(e.code(), Code::ResourceExhausted, "group {i}: {e:?}");
            assert!(e.message().contains("a snapshot of"), "{e:?}");
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "six copies of 100 MiB cannot fit beside a {size}-byte image in {room}"
    );
    assert_image_may_still_grow(&fs, "pvc-group-holds-back", size);
}
