//! Crash recovery: the driver dies (abort, as SIGKILL would stop it) at a named point inside a call,
//! is restarted, and the retried call converges with nothing left over: no mount, no half-made
//! directory, no orphan record.

mod common;

use std::path::Path;

use cellar::csi::v1::*;
use common::*;

/// Restarts the driver so that it dies when it reaches `point`.
async fn arm(d: &mut Driver, point: &str) {
    if !cfg!(feature = "crash-points") {
        panic!("crash tests need the crash points: run the suite with `cargo test --features crash-points` (the README's test command)");
    }
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", point)]).await;
}

/// Waits for the crash, checks it was the crash point, and starts a clean driver.
async fn recover(d: &mut Driver, point: &str) {
    let st = d.wait_exit();
    assert!(!st.success(), "the driver should have died at {point}");
    assert!(d.log().contains(&format!("crash point {point} reached")), "{}", d.log());
    d.spawn(&[]).await;
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_no_leftovers(d: &Driver) {
    assert!(
        entries(&d.pool_dir().join(".work")).is_empty(),
        "half-built copies left"
    );
    assert!(
        entries(&d.pool_dir().join(".trash")).is_empty(),
        "half-deleted data left"
    );
}

#[tokio::test]
async fn crash_during_create_then_retry_creates_exactly_one_volume() {
    let mut d = Driver::start().await;
    arm(&mut d, "create-volume:before-record").await;
    assert!(d.ctl.create_volume(create_req("pvc-c1", 64 * MIB)).await.is_err());
    recover(&mut d, "create-volume:before-record").await;
    let v = d.create("pvc-c1").await;
    assert_eq!(v.volume_id, "local:node-1:default:pvc-c1");
    assert_eq!(entries(&d.pool_dir().join("volumes")), vec!["pvc-c1", "pvc-c1.json"]);
    assert_no_leftovers(&d);
}

#[tokio::test]
async fn crash_mid_restore_leaves_no_partial_copy_and_retry_restores() {
    let mut d = Driver::start().await;
    let src = d.create("pvc-src").await;
    std::fs::write(d.pool_dir().join("volumes/pvc-src/data"), b"payload").unwrap();
    let snap = d.snapshot("snap-1", &src.volume_id).await.unwrap();
    arm(&mut d, "copy:before-rename").await;
    let mut req = create_req("pvc-restored", 64 * MIB);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    assert!(d.ctl.create_volume(req.clone()).await.is_err());
    recover(&mut d, "copy:before-rename").await;
    assert_no_leftovers(&d);
    assert!(!d.pool_dir().join("volumes/pvc-restored").exists());
    d.ctl.create_volume(req).await.unwrap();
    assert_eq!(
        std::fs::read(d.pool_dir().join("volumes/pvc-restored/data")).unwrap(),
        b"payload"
    );
}

#[tokio::test]
async fn crash_during_snapshot_then_retry_gives_a_whole_snapshot() {
    let mut d = Driver::start().await;
    let src = d.create("pvc-s").await;
    std::fs::write(d.pool_dir().join("volumes/pvc-s/data"), b"payload").unwrap();
    arm(&mut d, "create-snapshot:before-record").await;
    assert!(d.snapshot("snap-c", &src.volume_id).await.is_err());
    recover(&mut d, "create-snapshot:before-record").await;
    let s = d.snapshot("snap-c", &src.volume_id).await.unwrap();
    assert!(s.ready_to_use);
    assert_eq!(
        std::fs::read(d.pool_dir().join("snapshots/snap-c/data")).unwrap(),
        b"payload"
    );
    assert_eq!(entries(&d.pool_dir().join("snapshots")), vec!["snap-c", "snap-c.json"]);
    assert_no_leftovers(&d);
}

#[tokio::test]
async fn crash_during_delete_then_retry_removes_everything() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-d").await;
    arm(&mut d, "delete:after-trash").await;
    assert!(d.delete(&v.volume_id).await.is_err());
    recover(&mut d, "delete:after-trash").await;
    assert_no_leftovers(&d);
    d.delete(&v.volume_id).await.unwrap();
    assert!(entries(&d.pool_dir().join("volumes")).is_empty());
    let l = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(l.entries.is_empty());
}

#[tokio::test]
async fn crash_during_stage_then_retry_stages_once() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-st").await;
    let staging = d.path("st-staging");
    std::fs::create_dir_all(&staging).unwrap();
    arm(&mut d, "stage:before-mount").await;
    assert!(d.stage(&v.volume_id, &staging).await.is_err());
    recover(&mut d, "stage:before-mount").await;
    assert!(mounts_under(d.dir.path()).is_empty());
    d.stage(&v.volume_id, &staging).await.unwrap();
    assert_eq!(mounts_under(d.dir.path()), vec![staging.clone()]);
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
}

#[tokio::test]
async fn crash_during_stage_then_unstage_leaves_nothing() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-st2").await;
    let staging = d.path("st2-staging");
    std::fs::create_dir_all(&staging).unwrap();
    arm(&mut d, "stage:before-mount").await;
    assert!(d.stage(&v.volume_id, &staging).await.is_err());
    recover(&mut d, "stage:before-mount").await;
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
    // (`boot` is the node's record of the boot it last started in, no volume's state.)
    let left: Vec<String> = entries(&d.data_dir().join("node"))
        .into_iter()
        .filter(|e| e != "boot")
        .collect();
    assert!(left.is_empty(), "no node state left for the volume: {left:?}");
}

#[tokio::test]
async fn crash_during_publish_then_retry_publishes_once() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-p").await;
    let staging = d.path("p-staging");
    let target = d.path("p-target");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    arm(&mut d, "publish:before-mount").await;
    assert!(d.publish(&v.volume_id, &staging, &target, rwo(), false).await.is_err());
    recover(&mut d, "publish:before-mount").await;
    d.publish(&v.volume_id, &staging, &target, rwo(), false).await.unwrap();
    assert_eq!(mounts_under(d.dir.path()).len(), 2);
    d.unmount_all(&v.volume_id, &staging, &target).await;
    assert!(!target.exists(), "the target made before the crash is removed too");
}

#[tokio::test]
async fn crash_during_publish_then_unpublish_removes_the_target_made() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-p2").await;
    let staging = d.path("p2-staging");
    let target = d.path("p2-target");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(&v.volume_id, &staging).await.unwrap();
    arm(&mut d, "publish:before-mount").await;
    assert!(d.publish(&v.volume_id, &staging, &target, rwo(), false).await.is_err());
    recover(&mut d, "publish:before-mount").await;
    assert!(target.is_dir(), "the crash left the target directory");
    d.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists());
    d.unstage(&v.volume_id, &staging).await.unwrap();
}

#[tokio::test]
async fn crash_during_unpublish_then_retry_finishes() {
    let mut d = Driver::start().await;
    let v = d.create("pvc-u").await;
    let (staging, target) = d.mount_rw(&v.volume_id, "u").await;
    arm(&mut d, "unpublish:after-unmount").await;
    assert!(d.unpublish(&v.volume_id, &target).await.is_err());
    recover(&mut d, "unpublish:after-unmount").await;
    d.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists());
    d.unstage(&v.volume_id, &staging).await.unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
}
