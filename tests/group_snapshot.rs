//! Group snapshots (the CSI GroupController service) on real loop-backed pools: the codes of the
//! spec for bad input, idempotency, delete with the members, what each layout may promise, and
//! the point in time itself: a writer appends one sequence across two image volumes while the
//! group is cut, and the restored pair must hold a prefix of it.

mod common;

use std::path::Path;
use std::process::{Child, Command};

use cellar::csi::v1::group_controller_client::GroupControllerClient;
use cellar::csi::v1::*;
use common::fs::TestFs;
use common::postgres::{pg, postgres_dir, start_pgbench, Postgres};
use common::*;
use tonic::transport::Channel;
use tonic::Code;

const IMAGE_EXT4: &str = "fsType: ext4";

/// Writes a config with one pool per entry (name, path, layout, extra YAML line) and starts a driver.
async fn driver(pools: &[(&str, &Path, &str, &str)]) -> (Driver, tempfile::TempDir) {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let mut yaml = String::from("pools:\n");
    for (name, path, layout, extra) in pools {
        yaml += &format!("  - name: {name}\n    path: {}\n    layout: {layout}\n", path.display());
        if !extra.is_empty() {
            yaml += &format!("    {extra}\n");
        }
    }
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (d, cfgdir)
}

async fn groups(d: &Driver) -> GroupControllerClient<Channel> {
    GroupControllerClient::new(cellar::client::connect(&d.endpoint()).await.expect("connect"))
}

async fn volume(d: &mut Driver, name: &str, pool: &str) -> String {
    sized_volume(d, name, pool, 64 * MIB).await
}

async fn sized_volume(d: &mut Driver, name: &str, pool: &str, bytes: i64) -> String {
    let mut r = create_req(name, bytes);
    r.parameters.insert("pool".into(), pool.into());
    let v = d.ctl.create_volume(r).await.expect("CreateVolume");
    v.into_inner().volume.expect("volume").volume_id
}

fn group_req(name: &str, volumes: &[&str], params: &[(&str, &str)]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

async fn create(
    g: &mut GroupControllerClient<Channel>,
    name: &str,
    volumes: &[&str],
    params: &[(&str, &str)],
) -> Result<VolumeGroupSnapshot, tonic::Status> {
    g.create_volume_group_snapshot(group_req(name, volumes, params))
        .await
        .map(|r| r.into_inner().group_snapshot.expect("group_snapshot"))
}

async fn get(
    g: &mut GroupControllerClient<Channel>,
    id: &str,
    snaps: &[String],
) -> Result<VolumeGroupSnapshot, tonic::Status> {
    g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snaps.to_vec(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().group_snapshot.expect("group_snapshot"))
}

async fn delete(g: &mut GroupControllerClient<Channel>, id: &str, snaps: &[String]) -> Code {
    code(
        g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: snaps.to_vec(),
            ..Default::default()
        })
        .await,
    )
}

fn snapshot_ids(g: &VolumeGroupSnapshot) -> Vec<String> {
    g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect()
}

/// The member snapshot of `volume` in a group.
fn member(g: &VolumeGroupSnapshot, volume: &str) -> String {
    let m = g.snapshots.iter().find(|s| s.source_volume_id == volume);
    m.expect("member").snapshot_id.clone()
}

async fn restore(d: &mut Driver, name: &str, pool: &str, bytes: i64, snapshot_id: &str) -> String {
    let mut r = create_req(name, bytes);
    r.parameters.insert("pool".into(), pool.into());
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    d.ctl
        .create_volume(r)
        .await
        .expect("restore")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

async fn listed_snapshots(d: &mut Driver) -> Vec<Snapshot> {
    d.ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .collect()
}

// ------------------------------------------------------------------ capabilities and bad input

#[tokio::test]
async fn group_controller_is_advertised_with_create_delete_get() {
    use group_controller_service_capability::{rpc, Type};
    use plugin_capability::service;
    let mut d = Driver::start().await;
    let plugin =
        d.id.get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .unwrap();
    let group_service = Some(plugin_capability::Type::Service(plugin_capability::Service {
        r#type: service::Type::GroupControllerService as i32,
    }));
    assert!(plugin.get_ref().capabilities.iter().any(|c| c.r#type == group_service));
    let mut g = groups(&d).await;
    let caps = g
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
    let rpcs: Vec<Option<Type>> = caps.get_ref().capabilities.iter().map(|c| c.r#type).collect();
    let offered = Type::Rpc(group_controller_service_capability::Rpc {
        r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
    });
    assert_eq!(rpcs, [Some(offered)]);
}

#[tokio::test]
async fn create_group_without_name_is_invalid_argument() {
    let mut d = Driver::start().await;
    let v = volume(&mut d, "pvc-nn", "default").await;
    let mut g = groups(&d).await;
    let r = create(&mut g, "", &[&v], &[("consistency", "per-volume")]).await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn create_group_without_volumes_is_invalid_argument() {
    let d = Driver::start().await;
    let mut g = groups(&d).await;
    assert_eq!(
        create(&mut g, "group-nv", &[], &[]).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn create_group_naming_a_volume_twice_is_invalid_argument() {
    let mut d = Driver::start().await;
    let v = volume(&mut d, "pvc-tw", "default").await;
    let mut g = groups(&d).await;
    let r = create(&mut g, "group-tw", &[&v, &v], &[("consistency", "per-volume")]).await;
    assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn create_group_of_an_unknown_volume_is_not_found() {
    let mut d = Driver::start().await;
    let v = volume(&mut d, "pvc-uk", "default").await;
    let mut g = groups(&d).await;
    let per_volume = [("consistency", "per-volume")];
    for unknown in [
        "local:node-1:default:pvc-nobody",
        "not-a-cellar-id",
        "local:node-9:default:pvc-elsewhere",
    ] {
        let r = create(&mut g, "group-uk", &[&v, unknown], &per_volume).await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound, "{unknown}");
    }
    // Nothing was cut for the refused requests.
    assert!(listed_snapshots(&mut d).await.is_empty());
}

#[tokio::test]
async fn bad_class_parameters_are_invalid_argument() {
    let mut d = Driver::start().await;
    let v = volume(&mut d, "pvc-bp", "default").await;
    let mut g = groups(&d).await;
    for p in [
        ("consistency", "mostly"),
        ("freezeTimeoutSeconds", "0"),
        ("freezeTimeoutSeconds", "forever"),
        ("pool", "default"),
    ] {
        let r = create(&mut g, "group-bp", &[&v], &[p]).await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "{p:?}");
    }
}

#[tokio::test]
async fn get_and_delete_of_unknown_or_missing_ids() {
    let d = Driver::start().await;
    let mut g = groups(&d).await;
    assert_eq!(get(&mut g, "", &[]).await.unwrap_err().code(), Code::InvalidArgument);
    for unknown in [
        "group:local:node-1:default:nothing",
        "not-a-group",
        "group:local:node-9:default:g",
    ] {
        assert_eq!(
            get(&mut g, unknown, &[]).await.unwrap_err().code(),
            Code::NotFound,
            "{unknown}"
        );
        assert_eq!(delete(&mut g, unknown, &[]).await, Code::Ok, "{unknown}");
    }
    assert_eq!(delete(&mut g, "", &[]).await, Code::InvalidArgument);
}

// ------------------------------------------------------------------ what each layout promises

#[tokio::test]
async fn dir_group_is_refused_without_per_volume_consistency_and_cut_with_it() {
    let mut d = Driver::start().await;
    let a = volume(&mut d, "pvc-da", "default").await;
    let b = volume(&mut d, "pvc-db", "default").await;
    let mut g = groups(&d).await;
    for params in [&[][..], &[("consistency", "group")][..]] {
        let r = create(&mut g, "group-dir", &[&a, &b], params).await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{params:?}");
        assert!(e.message().contains("per-volume"), "{}", e.message());
    }
    assert!(
        listed_snapshots(&mut d).await.is_empty(),
        "a refused group cuts nothing"
    );
    let group = create(&mut g, "group-dir", &[&a, &b], &[("consistency", "per-volume")])
        .await
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    assert!(group.ready_to_use);
}

#[tokio::test]
async fn btrfs_group_is_refused_without_per_volume_consistency_and_cut_with_it() {
    let fs = TestFs::new("btrfs", 512);
    let (mut d, _c) = driver(&[("bt", &fs.path("pool"), "btrfs", "")]).await;
    let a = volume(&mut d, "pvc-ba", "bt").await;
    let b = volume(&mut d, "pvc-bb", "bt").await;
    let mut g = groups(&d).await;
    let e = create(&mut g, "group-bt", &[&a, &b], &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let group = create(&mut g, "group-bt", &[&a, &b], &[("consistency", "per-volume")])
        .await
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    let ids = snapshot_ids(&group);
    assert_eq!(delete(&mut g, &group.group_snapshot_id, &ids).await, Code::Ok);
    assert!(listed_snapshots(&mut d).await.is_empty());
}

// ------------------------------------------------------------------ idempotency, get, delete

#[tokio::test]
async fn same_name_and_volumes_is_the_same_group_and_other_volumes_already_exist() {
    let mut d = Driver::start().await;
    let a = volume(&mut d, "pvc-ia", "default").await;
    let b = volume(&mut d, "pvc-ib", "default").await;
    let c = volume(&mut d, "pvc-ic", "default").await;
    let mut g = groups(&d).await;
    let pv = [("consistency", "per-volume")];
    let first = create(&mut g, "group-id", &[&a, &b], &pv).await.unwrap();
    assert!(
        first.group_snapshot_id.starts_with("group:local:node-1:default:"),
        "{}",
        first.group_snapshot_id
    );
    // The same request, its volumes in another order: the same group, cut once.
    let again = create(&mut g, "group-id", &[&b, &a], &pv).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(listed_snapshots(&mut d).await.len(), 2);
    assert_eq!(
        create(&mut g, "group-id", &[&a, &c], &pv).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    assert_eq!(
        create(&mut g, "group-id", &[&a], &pv).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let other = [("consistency", "per-volume"), ("freezeTimeoutSeconds", "5")];
    assert_eq!(
        create(&mut g, "group-id", &[&a, &b], &other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn get_returns_the_members_and_checks_the_snapshot_ids_it_is_given() {
    let mut d = Driver::start().await;
    let a = volume(&mut d, "pvc-ga", "default").await;
    let b = volume(&mut d, "pvc-gb", "default").await;
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-get", &[&a, &b], &[("consistency", "per-volume")])
        .await
        .unwrap();
    let ids = snapshot_ids(&made);
    let got = get(&mut g, &made.group_snapshot_id, &[]).await.unwrap();
    assert_eq!(got, made);
    let sources: Vec<&str> = got.snapshots.iter().map(|s| s.source_volume_id.as_str()).collect();
    assert_eq!(sources, [a.as_str(), b.as_str()]);
    for s in &got.snapshots {
        assert_eq!(s.group_snapshot_id, made.group_snapshot_id);
        assert_eq!(s.creation_time, made.creation_time, "one point in time");
    }
    assert_eq!(get(&mut g, &made.group_snapshot_id, &ids).await.unwrap(), made);
    let wrong = vec![ids[0].clone()];
    assert_eq!(
        get(&mut g, &made.group_snapshot_id, &wrong).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        delete(&mut g, &made.group_snapshot_id, &wrong).await,
        Code::InvalidArgument
    );
    // Members are listed as snapshots of their group.
    let listed = listed_snapshots(&mut d).await;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|s| s.group_snapshot_id == made.group_snapshot_id));
}

#[tokio::test]
async fn a_member_cannot_be_deleted_alone_and_the_group_delete_removes_every_member() {
    let mut d = Driver::start().await;
    let a = volume(&mut d, "pvc-xa", "default").await;
    let b = volume(&mut d, "pvc-xb", "default").await;
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-del", &[&a, &b], &[("consistency", "per-volume")])
        .await
        .unwrap();
    let ids = snapshot_ids(&made);
    // The spec's DeleteSnapshot error table: a member of a group is INVALID_ARGUMENT.
    let r = d
        .ctl
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: ids[0].clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    assert_eq!(listed_snapshots(&mut d).await.len(), 2);

    assert_eq!(delete(&mut g, &made.group_snapshot_id, &ids).await, Code::Ok);
    assert!(listed_snapshots(&mut d).await.is_empty());
    assert_eq!(
        get(&mut g, &made.group_snapshot_id, &[]).await.unwrap_err().code(),
        Code::NotFound
    );
    let pool = d.pool_dir();
    let left: Vec<_> = std::fs::read_dir(pool.join("snapshots"))
        .unwrap()
        .chain(std::fs::read_dir(pool.join("groups")).unwrap())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        delete(&mut g, &made.group_snapshot_id, &ids).await,
        Code::Ok,
        "delete is idempotent"
    );
    // The name is free again, and a new group is cut.
    let again = create(&mut g, "group-del", &[&a, &b], &[("consistency", "per-volume")])
        .await
        .unwrap();
    assert_eq!(again.snapshots.len(), 2);
}

#[tokio::test]
async fn a_crash_before_the_group_record_leaves_members_the_retry_removes() {
    let mut d = Driver::start().await;
    let a = volume(&mut d, "pvc-ca", "default").await;
    let b = volume(&mut d, "pvc-cb", "default").await;
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "group:before-group-record")]).await;
    let mut g = groups(&d).await;
    let pv = [("consistency", "per-volume")];
    assert!(create(&mut g, "group-crash", &[&a, &b], &pv).await.is_err());
    assert!(!d.wait_exit().success());
    d.spawn(&[]).await;
    // The members of the failed cut are there, without their group.
    assert_eq!(listed_snapshots(&mut d).await.len(), 2);
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-crash", &[&a, &b], &pv).await.unwrap();
    assert_eq!(made.snapshots.len(), 2);
    let listed = listed_snapshots(&mut d).await;
    assert_eq!(
        listed.len(),
        2,
        "the leftovers were replaced, not kept beside the new members"
    );
    assert!(listed.iter().all(|s| s.group_snapshot_id == made.group_snapshot_id));
}

#[tokio::test]
async fn a_driver_killed_while_the_group_is_frozen_thaws_on_its_next_start() {
    use cellar::sys::fstools::{freeze_on, thaw};
    let fs = TestFs::new("xfs", 512);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let a = volume(&mut d, "pvc-kf", "img").await;
    let (st, tg) = d.mount_rw(&a, "kf").await;
    d.kill();
    d.spawn(&[("CELLAR_CRASH_AT", "group:frozen")]).await;
    let mut g = groups(&d).await;
    assert!(create(&mut g, "group-kf", &[&a], &[]).await.is_err());
    assert!(!d.wait_exit().success());
    // Should the restart not thaw it, the test must not leave a frozen filesystem behind.
    struct ThawOnDrop(std::path::PathBuf);
    impl Drop for ThawOnDrop {
        fn drop(&mut self) {
            let _ = thaw(&self.0);
        }
    }
    let _thaw = ThawOnDrop(tg.clone());
    let device = cellar::sys::mountinfo::read(Path::new(cellar::sys::mountinfo::SELF))
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point == tg)
        .map(|m| std::path::PathBuf::from(m.source))
        .expect("the target is a mount");
    // Killed between freeze and thaw: nothing in the process is left to thaw it.
    assert_eq!(
        freeze_on(&tg, &device).unwrap_err().errno(),
        Some(libc::EBUSY),
        "still frozen"
    );
    d.spawn(&[]).await;
    drop(freeze_on(&tg, &device).expect("thawed by the restart, so it freezes again"));
    thaw(&tg).unwrap();
    std::fs::write(tg.join("after"), b"written after the restart").unwrap();
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-kf", &[&a], &[]).await.unwrap();
    assert_eq!(made.snapshots.len(), 1);
    d.unmount_all(&a, &st, &tg).await;
}

// ------------------------------------------------------------------ one point in time

/// A shell loop appending 1, 2, 3 ... to `a` and then to `b`, each write fsynced before the next.
fn start_writer(a: &Path, b: &Path) -> Child {
    let script = r#"n=1
while :; do
  echo $n | dd of="$1" oflag=append conv=notrunc,fsync status=none || exit 1
  echo $n | dd of="$2" oflag=append conv=notrunc,fsync status=none || exit 1
  n=$((n+1))
done"#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("writer")
        .arg(a)
        .arg(b)
        .spawn()
        .expect("start the writer")
}

/// The numbers in a sequence file, checked to be 1, 2, 3 ... with nothing torn.
fn sequence(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).expect("read sequence");
    let numbers: Vec<u64> = text
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("torn line {l:?} in {}", path.display()))
        })
        .collect();
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "{} is not a prefix of the sequence", path.display());
    }
    numbers
}

/// The last number of a restored sequence file.
fn last(path: &Path) -> u64 {
    sequence(path).last().copied().unwrap_or(0)
}

/// The last whole number of a sequence file the writer is appending to (a line it is writing
/// right now may be read half-written).
fn last_written(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole.lines().last().and_then(|l| l.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn an_image_group_holds_one_point_in_time_of_a_sequence_written_across_two_volumes() {
    let fs = TestFs::new("xfs", 1024);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    let a = volume(&mut d, "pvc-seq-a", "img").await;
    let b = volume(&mut d, "pvc-seq-b", "img").await;
    let (sa, ta) = d.mount_rw(&a, "seq-a").await;
    let (sb, tb) = d.mount_rw(&b, "seq-b").await;
    let (fa, fb) = (ta.join("seq"), tb.join("seq"));
    let mut writer = start_writer(&fa, &fb);
    // Cut only once the writer is well under way, on both volumes.
    while last_written(&fb) < 50 {
        assert!(writer.try_wait().unwrap().is_none(), "the writer stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-seq", &[&a, &b], &[]).await.unwrap();
    let seen = last_written(&fb);
    // The filesystems were thawed: the writer goes on after the cut.
    while last_written(&fb) <= seen + 10 {
        assert!(writer.try_wait().unwrap().is_none(), "the writer stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    writer.kill().expect("stop the writer");
    writer.wait().expect("reap the writer");
    d.unmount_all(&a, &sa, &ta).await;
    d.unmount_all(&b, &sb, &tb).await;

    let ra = restore(&mut d, "pvc-seq-ra", "img", 64 * MIB, &member(&made, &a)).await;
    let rb = restore(&mut d, "pvc-seq-rb", "img", 64 * MIB, &member(&made, &b)).await;
    let (sra, tra) = d.mount_rw(&ra, "seq-ra").await;
    let (srb, trb) = d.mount_rw(&rb, "seq-rb").await;
    let (na, nb) = (last(&tra.join("seq")), last(&trb.join("seq")));
    d.unmount_all(&ra, &sra, &tra).await;
    d.unmount_all(&rb, &srb, &trb).await;
    assert!(
        nb >= 50,
        "the cut came after the writer had written 50 to both ({na}, {nb})"
    );
    assert!(
        na == nb || na == nb + 1,
        "the restored pair is not one point in time: A ends at {na}, B at {nb}"
    );
    eprintln!("group cut at A={na} B={nb}");
}

/// An image volume made through a split-mode controller on `node` (the scheduler's choice), or
/// restored there from `snapshot`.
async fn image_on(c: &common::cluster::Cluster, name: &str, node: &str, snapshot: Option<&str>) -> String {
    let at = common::cluster::node_topology(node);
    let mut r = create_req(name, 64 * MIB);
    r.parameters.insert("layout".into(), "image".into());
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![at.clone()],
        preferred: vec![at],
    });
    r.volume_content_source = snapshot.map(|s| VolumeContentSource {
        r#type: Some(from_snapshot(s)),
    });
    let v = c.ctl().await.create_volume(r).await.expect("CreateVolume");
    v.into_inner().volume.expect("volume").volume_id
}

#[tokio::test]
async fn an_image_group_across_two_nodes_holds_one_point_in_time_of_a_sequence() {
    use common::cluster::{Cluster, Spec};
    let c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let a = image_on(&c, "pvc-xa", "node-1", None).await;
    let b = image_on(&c, "pvc-xb", "node-2", None).await;
    let (sa, sb) = (c.dir.path().join("stage-xa"), c.dir.path().join("stage-xb"));
    for p in [&sa, &sb] {
        std::fs::create_dir_all(p).expect("staging dir");
    }
    stage_rwo(&mut c.node(0).await, &a, &sa).await.expect("stage on node-1");
    stage_rwo(&mut c.node(1).await, &b, &sb).await.expect("stage on node-2");
    let (fa, fb) = (sa.join("seq"), sb.join("seq"));
    let mut writer = start_writer(&fa, &fb);
    while last_written(&fb) < 50 {
        assert!(writer.try_wait().unwrap().is_none(), "the writer stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut g = GroupControllerClient::new(c.channel("controller.sock").await);
    let made = create(&mut g, "group-across", &[&a, &b], &[]).await.unwrap();
    let seen = last_written(&fb);
    // Both nodes thawed: the writer goes on after the cut.
    while last_written(&fb) <= seen + 10 {
        assert!(writer.try_wait().unwrap().is_none(), "the writer stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    writer.kill().expect("stop the writer");
    writer.wait().expect("reap the writer");
    unstage_from(&mut c.node(0).await, &a, &sa)
        .await
        .expect("unstage on node-1");
    unstage_from(&mut c.node(1).await, &b, &sb)
        .await
        .expect("unstage on node-2");
    assert!(
        made.group_snapshot_id.starts_with("group:local:node-1:"),
        "{}",
        made.group_snapshot_id
    );

    // Each member restores on its own node; together they hold one point in time.
    let ra = image_on(&c, "pvc-xra", "node-1", Some(&member(&made, &a))).await;
    let rb = image_on(&c, "pvc-xrb", "node-2", Some(&member(&made, &b))).await;
    let (sra, srb) = (c.dir.path().join("stage-xra"), c.dir.path().join("stage-xrb"));
    for p in [&sra, &srb] {
        std::fs::create_dir_all(p).expect("staging dir");
    }
    stage_rwo(&mut c.node(0).await, &ra, &sra)
        .await
        .expect("stage the restore on node-1");
    stage_rwo(&mut c.node(1).await, &rb, &srb)
        .await
        .expect("stage the restore on node-2");
    let (na, nb) = (last(&sra.join("seq")), last(&srb.join("seq")));
    unstage_from(&mut c.node(0).await, &ra, &sra).await.expect("unstage");
    unstage_from(&mut c.node(1).await, &rb, &srb).await.expect("unstage");
    assert!(
        nb >= 50,
        "the cut came after the writer had written 50 to both ({na}, {nb})"
    );
    assert!(
        na == nb || na == nb + 1,
        "the restored pair is not one point in time: A (node-1) ends at {na}, B (node-2) at {nb}"
    );
    eprintln!("group cut across nodes at A={na} B={nb}");
    let e = delete(&mut g, &made.group_snapshot_id, &[]).await;
    assert_eq!(e, Code::Ok);
}

// ------------------------------------------------------------------ split mode: through the agents

mod split {
    use std::sync::Arc;
    use std::time::Duration;

    use cellar::agent::remote::{HostPort, RemoteAgent, Timeouts};
    use cellar::agent::server::{serve, AgentService};
    use cellar::agent::tls::{Tls, AGENT_SERVER_NAME};
    use cellar::agent::{Agent, Directory, Frames, RangeBatches, Rendezvous};
    use cellar::backup::{Backups, RepositoryConfig, Throttle};
    use cellar::controller::ControllerService;
    use cellar::csi::v1::controller_server::Controller;
    use cellar::csi::v1::group_controller_server::GroupController;
    use cellar::csi::v1::*;
    use cellar::storage::cbt::{MetadataError, Query};
    use cellar::storage::config::Config;
    use cellar::storage::engine::{
        BackupRequest, CapacityRange, Condition, LocalEngine, Mutable, NewGroup, NewVolume, PoolStatus, Source,
    };
    use cellar::storage::id::{BackupId, GroupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
    use cellar::storage::record::{GroupRecord, SnapshotRecord, VolumeRecord};
    use cellar::storage::StorageError;
    use tonic::{Code, Request};

    /// Two nodes, each an engine with one `dir` pool behind its agent on 127.0.0.1 (plaintext),
    /// held by the controller as remote agents: what `cellar controller` holds.
    struct Nodes {
        agents: Vec<Arc<dyn Agent>>,
        engines: Vec<Arc<LocalEngine>>,
        /// The shared pools' agent (the controller's own engine), when a test has one.
        shared: Option<Arc<dyn Agent>>,
        /// A node the registry does not list now (not seen lately), though it knows its agent.
        unlisted: Arc<std::sync::Mutex<Option<NodeId>>>,
        _dirs: Vec<tempfile::TempDir>,
        _stops: Vec<tokio::sync::oneshot::Sender<()>>,
    }

    impl Directory for Nodes {
        fn agent(&self, node: &NodeId) -> Option<Arc<dyn Agent>> {
            self.agents.iter().find(|a| a.node() == node).cloned()
        }
        fn agents(&self) -> Vec<Arc<dyn Agent>> {
            self.agents.clone()
        }
        fn shared(&self) -> Option<Arc<dyn Agent>> {
            self.shared.clone()
        }
        fn all(&self) -> Vec<Arc<dyn Agent>> {
            let unlisted = self.unlisted.lock().expect("unlisted").clone();
            let listed = self.agents.iter().filter(|a| Some(a.node()) != unlisted.as_ref());
            listed.chain(&self.shared).cloned().collect()
        }
    }

    async fn nodes(names: &[&str]) -> Nodes {
        nodes_with(names, &[]).await
    }

    /// `nodes` whose engines can back up into `repositories`.
    async fn nodes_with(names: &[&str], repositories: &[RepositoryConfig]) -> Nodes {
        let mut n = Nodes {
            agents: Vec::new(),
            engines: Vec::new(),
            shared: None,
            unlisted: Default::default(),
            _dirs: Vec::new(),
            _stops: Vec::new(),
        };
        for name in names {
            let dir = tempfile::Builder::new()
                .prefix("cellar-group-split-")
                .tempdir()
                .expect("tempdir");
            let node = NodeId::parse(name).expect("node");
            let mut config = Config::default_for(dir.path());
            config.repositories = repositories.to_vec();
            let engine = Arc::new(LocalEngine::open(node.clone(), &config).expect("engine"));
            engine.start_uploads();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let routes = tonic::service::Routes::new(
                AgentService::new(engine.clone()).into_server(cellar::agent::tls::Callers::Anyone),
            );
            tokio::spawn(async move {
                let _ = serve(listener, Tls::Insecure, routes, async {
                    let _ = stopped.await;
                })
                .await;
            });
            n.agents.push(Arc::new(remote(node, addr)));
            n.engines.push(engine);
            n._dirs.push(dir);
            n._stops.push(stop);
        }
        n
    }

    fn remote(node: NodeId, addr: std::net::SocketAddr) -> RemoteAgent {
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            call: Duration::from_secs(15),
            storage: Duration::from_secs(60),
            listing: Timeouts::LISTING_CALLS * Duration::from_secs(15),
        };
        let address = HostPort::parse(&addr.to_string()).expect("address");
        RemoteAgent::new(node, address, &Tls::Insecure, AGENT_SERVER_NAME, timeouts).expect("client")
    }

    /// A registered node whose agent does not answer: nothing listens at its address.
    async fn dead_node(n: &mut Nodes, name: &str) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        n.agents
            .push(Arc::new(remote(NodeId::parse(name).expect("node"), addr)));
    }

    /// A volume made through the controller on `node` (the scheduler's choice under
    /// WaitForFirstConsumer).
    async fn volume(ctl: &ControllerService, name: &str, node: &str) -> String {
        let at = Topology {
            segments: [(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into(),
        };
        let mut r = super::create_req(name, super::MIB);
        r.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![at.clone()],
            preferred: vec![at],
        });
        let v = ctl.create_volume(Request::new(r)).await.expect("CreateVolume");
        v.into_inner().volume.expect("volume").volume_id
    }

    fn group_req(name: &str, volumes: &[&str], per_volume: bool) -> Request<CreateVolumeGroupSnapshotRequest> {
        let parameters = if per_volume {
            [("consistency".to_string(), "per-volume".to_string())].into()
        } else {
            Default::default()
        };
        Request::new(CreateVolumeGroupSnapshotRequest {
            name: name.into(),
            source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
            parameters,
            ..Default::default()
        })
    }

    async fn cut(ctl: &ControllerService, req: Request<CreateVolumeGroupSnapshotRequest>) -> VolumeGroupSnapshot {
        let made = ctl
            .create_volume_group_snapshot(req)
            .await
            .expect("CreateVolumeGroupSnapshot");
        made.into_inner().group_snapshot.expect("group_snapshot")
    }

    /// The id of the member of `made` cut from `volume`.
    fn member_of(made: &VolumeGroupSnapshot, volume: &str) -> String {
        made.snapshots
            .iter()
            .find(|s| s.source_volume_id == volume)
            .expect("a member of that volume")
            .snapshot_id
            .clone()
    }

    async fn got(ctl: &ControllerService, id: &str) -> VolumeGroupSnapshot {
        let req = Request::new(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            ..Default::default()
        });
        ctl.get_volume_group_snapshot(req)
            .await
            .expect("GetVolumeGroupSnapshot")
            .into_inner()
            .group_snapshot
            .expect("group_snapshot")
    }

    #[tokio::test]
    async fn a_group_across_two_nodes_is_cut_by_both_and_deleted_from_both() {
        let n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-x1", "node-1").await;
        let b = volume(&ctl, "pvc-x2", "node-2").await;
        let made = cut(&ctl, group_req("group-two-nodes", &[&b, &a], true)).await;
        // Recorded with its first member (by id), each member cut by its own node.
        assert!(
            made.group_snapshot_id.starts_with("group:local:node-1:"),
            "{}",
            made.group_snapshot_id
        );
        let mut sources: Vec<String> = made.snapshots.iter().map(|s| s.source_volume_id.clone()).collect();
        sources.sort();
        assert_eq!(sources, vec![a.clone(), b.clone()]);
        for (engine, volume) in engines.iter().zip([&a, &b]) {
            let snaps = engine.snapshots();
            assert_eq!(snaps.len(), 1, "one member on each node");
            assert_eq!(snaps[0].source_volume_id.to_string(), *volume);
            assert_eq!(
                snaps[0].group.as_ref().map(ToString::to_string),
                Some(made.group_snapshot_id.clone())
            );
        }
        // The same request again is the same group; Get finds it from its record's node.
        let again = cut(&ctl, group_req("group-two-nodes", &[&a, &b], true)).await;
        assert_eq!(again, made);
        let got = got(&ctl, &made.group_snapshot_id).await;
        assert_eq!(got, made);
        // The member on the other node than the group's record cannot be deleted alone either.
        let on_node_2 = member_of(&made, &b);
        let e = ctl
            .delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: on_node_2,
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        ctl.delete_volume_group_snapshot(Request::new(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        for engine in &engines {
            assert!(engine.snapshots().is_empty(), "every member is deleted, on both nodes");
        }
    }

    /// A member on another node than its group's record, whose group was never recorded (the
    /// controller died between the cut and the record, and the VolumeGroupSnapshot was deleted
    /// before any retry): nobody would ever delete it through its group, so DeleteSnapshot
    /// deletes it alone once the group's node answers that it holds no such group. While the
    /// group is recorded, the member is refused alone.
    #[tokio::test]
    async fn a_member_whose_group_was_never_recorded_can_be_deleted_alone() {
        let n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-left-a", "node-1").await;
        let b = volume(&ctl, "pvc-left-b", "node-2").await;
        let made = cut(&ctl, group_req("group-left", &[&a, &b], true)).await;
        let on_node_2 = member_of(&made, &b);
        let delete = |id: String| {
            ctl.delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: id,
                ..Default::default()
            }))
        };
        let e = delete(on_node_2.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert_eq!(engines[1].snapshots().len(), 1, "a member of a recorded group stays");
        // The group's record goes from node-1 (with its member there): node-2's member is left
        // naming a group no node records.
        let group = GroupId::parse(&made.group_snapshot_id).expect("group id");
        assert_eq!(group.0.node().map(|n| n.as_str()), Some("node-1"));
        engines[0].delete_group(&group).expect("remove the record");
        delete(on_node_2.clone())
            .await
            .expect("a member of no group is deleted alone");
        assert!(engines[1].snapshots().is_empty(), "the left member is gone");
        delete(on_node_2).await.expect("and the delete is idempotent");
    }

    #[tokio::test]
    async fn a_part_that_cannot_be_cut_leaves_nothing_on_any_node() {
        let n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-y1", "node-1").await;
        let b = volume(&ctl, "pvc-y2", "node-2").await;
        // node-2's member name is taken by an ordinary snapshot: node-2 refuses its part, after
        // node-1 froze its member and waits for it; node-1 then cuts nothing.
        ctl.create_snapshot(Request::new(CreateSnapshotRequest {
            name: "group-half-pvc-y2".into(),
            source_volume_id: b.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        let e = ctl
            .create_volume_group_snapshot(group_req("group-half", &[&a, &b], true))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "node-2's own refusal: {}", e.message());
        assert!(
            engines[0].snapshots().is_empty(),
            "nothing of the group is left on node-1"
        );
        assert_eq!(engines[1].snapshots().len(), 1, "only the ordinary snapshot on node-2");
        assert!(engines[1].snapshots()[0].group.is_none());
    }

    #[tokio::test]
    async fn a_node_that_cannot_answer_does_not_stop_a_group_on_another_node() {
        let mut n = nodes(&["node-1"]).await;
        dead_node(&mut n, "node-9").await;
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-da", "node-1").await;
        let b = volume(&ctl, "pvc-db", "node-1").await;
        let made = cut(&ctl, group_req("group-dead", &[&a, &b], true)).await;
        assert_eq!(made.snapshots.len(), 2);
        // A member on the dead node is that node's to answer: UNAVAILABLE, not a group without it.
        let e = ctl
            .create_volume_group_snapshot(group_req("group-dead-2", &["local:node-9:default:pvc-x"], true))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    }

    /// CreateSnapshot asks every node whether the name is taken: one that cannot answer is
    /// skipped, not a failure of every snapshot in the cluster; the source's node must answer.
    #[tokio::test]
    async fn a_node_that_cannot_answer_does_not_stop_a_snapshot_on_another_node() {
        let mut n = nodes(&["node-1"]).await;
        dead_node(&mut n, "node-9").await;
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-sdead", "node-1").await;
        let snap = |source: &str| {
            Request::new(CreateSnapshotRequest {
                name: format!("snap-dead-{}", source.len()),
                source_volume_id: source.into(),
                ..Default::default()
            })
        };
        let made = ctl
            .create_snapshot(snap(&a))
            .await
            .expect("CreateSnapshot")
            .into_inner();
        assert_eq!(made.snapshot.expect("snapshot").source_volume_id, a);
        let e = ctl
            .create_snapshot(snap("local:node-9:default:pvc-x"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    }

    /// The same CreateVolumeGroupSnapshot sent twice at once (the snapshotter retrying a slow
    /// call): one attempt must never remove the members the other's group record names.
    #[tokio::test]
    async fn the_same_group_asked_twice_at_once_keeps_every_member_its_record_names() {
        let n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-twice-a", "node-1").await;
        let b = volume(&ctl, "pvc-twice-b", "node-2").await;
        // node-2's member takes a while to copy, node-1's none: the second attempt, sent a little
        // later, finds node-1's part of the first done and node-2's still being cut.
        let id = cellar::storage::id::VolumeId::parse(&b).expect("id");
        let (_, data) = engines[1].volume_data(&id).expect("data");
        for i in 0..3000 {
            std::fs::write(data.join(format!("f{i}")), [7u8; 512]).expect("fill");
        }
        for round in 0..8u64 {
            let name = format!("group-twice-{round}");
            let (x, y) = tokio::join!(
                ctl.create_volume_group_snapshot(group_req(&name, &[&a, &b], true)),
                async {
                    tokio::time::sleep(Duration::from_millis(round * 3)).await;
                    ctl.create_volume_group_snapshot(group_req(&name, &[&a, &b], true))
                        .await
                },
            );
            let made: Vec<VolumeGroupSnapshot> = [x, y]
                .into_iter()
                .filter_map(|r| match r {
                    Ok(g) => g.into_inner().group_snapshot,
                    Err(e) => {
                        // The one that waits for the other is told to retry.
                        assert_eq!(e.code(), Code::Aborted, "{name}: {}", e.message());
                        None
                    }
                })
                .collect();
            let g = match made.first() {
                Some(g) => g.clone(),
                None => cut(&ctl, group_req(&name, &[&a, &b], true)).await,
            };
            assert!(made.iter().all(|m| *m == g), "{name}: both answers are the one group");
            let got = got(&ctl, &g.group_snapshot_id).await;
            for s in &got.snapshots {
                let present = engines
                    .iter()
                    .any(|e| e.snapshots().iter().any(|x| x.id.to_string() == s.snapshot_id));
                assert!(
                    present,
                    "{name}: member {} of the recorded group is gone",
                    s.snapshot_id
                );
            }
            assert_eq!(got.snapshots.len(), 2, "{name}");
        }
    }

    /// A node whose call was carried out but whose answer never reached the controller (the
    /// connection broke after the node had done it): once for `lose`.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Lose {
        Cut,
        PutGroup,
        /// Not a lost answer: every group name lookup answers an error other than UNAVAILABLE
        /// (a broken or lying node).
        NameLookup,
        /// Not a lost answer: the first group name lookup answers, every later one errs (a node
        /// whose disk or connection fails between a group's cut and the snapshotter's retry).
        LaterNameLookup,
        /// Not a lost answer: every forget of a backup answers ABORTED, as the node cutting it
        /// does while it uploads (a broken or lying node, for a backup it did not cut).
        Forget,
        /// Not a lost answer: the node's member is deleted alone (DeleteSnapshot, the id taken
        /// from ListSnapshots) after its part was cut and before the group's record is written.
        MemberDeleted,
        /// Not a lost answer: the agent's pool figures never come (a share whose server is gone).
        Pools,
        /// Not a lost answer: the agent notes (in `lost`) that it was asked for a listing.
        Listed,
    }

    struct LostAnswer {
        inner: Arc<dyn Agent>,
        lose: Lose,
        lost: std::sync::atomic::AtomicBool,
    }

    impl LostAnswer {
        fn lost(&self, what: Lose) -> Result<(), StorageError> {
            use std::sync::atomic::Ordering;
            if what == self.lose && !self.lost.swap(true, Ordering::SeqCst) {
                return Err(StorageError::Unavailable(
                    "the node's answer was lost on the way".into(),
                ));
            }
            Ok(())
        }
    }

    #[tonic::async_trait]
    impl Agent for LostAnswer {
        fn node(&self) -> &NodeId {
            self.inner.node()
        }
        async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
            self.inner.create_volume(req).await
        }
        async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
            self.inner.delete_volume(id).await
        }
        async fn expand_volume(&self, id: VolumeId, r: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
            self.inner.expand_volume(id, r).await
        }
        async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError> {
            self.inner.modify_volume(id, m).await
        }
        async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
            self.inner.volume(id).await
        }
        async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
            self.lost
                .fetch_or(self.lose == Lose::Listed, std::sync::atomic::Ordering::SeqCst);
            self.inner.volumes().await
        }
        async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
            self.inner.volume_named(name).await
        }
        async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError> {
            self.inner.snapshot_named(name).await
        }
        async fn create_snapshot(
            &self,
            name: String,
            source: VolumeId,
            freeze: bool,
            backup: Option<BackupRequest>,
        ) -> Result<SnapshotRecord, StorageError> {
            self.inner.create_snapshot(name, source, freeze, backup).await
        }
        async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError> {
            self.inner.delete_snapshot(id).await
        }
        async fn forget_backup(&self, id: BackupId) -> Result<bool, StorageError> {
            if self.lose == Lose::Forget {
                return Err(StorageError::Busy(format!("{id} is uploading, says a broken node")));
            }
            self.inner.forget_backup(id).await
        }
        async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
            self.lost
                .fetch_or(self.lose == Lose::Listed, std::sync::atomic::Ordering::SeqCst);
            self.inner.snapshots().await
        }
        async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
            if self.lose == Lose::Pools {
                return Err(StorageError::Unavailable("the share does not answer".into()));
            }
            self.inner.pools().await
        }
        fn pool_is_shared(&self, pool: Option<&PoolName>) -> Option<bool> {
            self.inner.pool_is_shared(pool)
        }
        async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError> {
            self.inner.static_exists(id).await
        }
        async fn export_data(&self, source: Source) -> Result<Frames, StorageError> {
            self.inner.export_data(source).await
        }
        async fn import_volume(&self, req: NewVolume, frames: Frames) -> Result<VolumeRecord, StorageError> {
            self.inner.import_volume(req, frames).await
        }
        async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError> {
            self.inner.create_group(req).await
        }
        async fn delete_group(&self, id: GroupId) -> Result<(), StorageError> {
            self.inner.delete_group(id).await
        }
        async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError> {
            self.inner.group(id).await
        }
        async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError> {
            let later = self.lose == Lose::LaterNameLookup && self.lost.swap(true, std::sync::atomic::Ordering::SeqCst);
            if self.lose == Lose::NameLookup || later {
                return Err(StorageError::Busy(format!("{name}, answered by a broken node")));
            }
            self.inner.group_named(name).await
        }
        async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError> {
            self.inner.block_ranges(q, max).await
        }
        async fn cut_group_part(
            &self,
            id: GroupId,
            req: NewGroup,
            meet: Arc<Rendezvous>,
        ) -> Result<Vec<SnapshotRecord>, StorageError> {
            let cut = self.inner.cut_group_part(id, req, meet).await?;
            self.lost(Lose::Cut)?;
            Ok(cut)
        }
        async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError> {
            if self.lose == Lose::MemberDeleted {
                let here = rec
                    .members
                    .iter()
                    .find(|m| m.snapshot_id.0.node() == Some(self.inner.node()));
                let here = here.expect("a member on the group's home").snapshot_id.clone();
                self.inner
                    .delete_snapshot(here)
                    .await
                    .expect("no record yet: deleted alone");
            }
            self.inner.put_group(rec).await?;
            self.lost(Lose::PutGroup)
        }
        async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError> {
            self.inner.delete_group_part(id, members).await
        }
    }

    /// A group across two nodes whose cut failed because one answer was lost, though the node
    /// did its part: nothing of the group is left on any node (no member the CO cannot see or
    /// delete, no record naming members that were removed), and the retry cuts it whole.
    #[tokio::test]
    async fn a_group_whose_answer_was_lost_leaves_nothing_and_its_retry_is_whole() {
        for (lose, on) in [(Lose::Cut, 1), (Lose::PutGroup, 0)] {
            let mut n = nodes(&["node-1", "node-2"]).await;
            let engines = n.engines.clone();
            n.agents[on] = Arc::new(LostAnswer {
                inner: n.agents[on].clone(),
                lose,
                lost: Default::default(),
            });
            let ctl = ControllerService::new(Arc::new(n));
            let a = volume(&ctl, "pvc-lost-a", "node-1").await;
            let b = volume(&ctl, "pvc-lost-b", "node-2").await;
            let e = ctl
                .create_volume_group_snapshot(group_req("group-lost", &[&a, &b], true))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
            for (i, engine) in engines.iter().enumerate() {
                assert!(
                    engine.group_named("group-lost").expect("lookup").is_none(),
                    "no group record is left on node-{} (its members were removed)",
                    i + 1
                );
                assert!(
                    engine.snapshots().is_empty(),
                    "a lost answer left members on node-{}: {:?}",
                    i + 1,
                    engine.snapshots().iter().map(|s| s.id.to_string()).collect::<Vec<_>>()
                );
            }
            let made = cut(&ctl, group_req("group-lost", &[&a, &b], true)).await;
            assert_eq!(made.snapshots.len(), 2);
            for s in &made.snapshots {
                assert!(
                    engines
                        .iter()
                        .any(|e| e.snapshots().iter().any(|x| x.id.to_string() == s.snapshot_id)),
                    "member {} of the group is there",
                    s.snapshot_id
                );
            }
        }
    }

    /// A share that does not answer (the shared pools' agent cannot give its figures) holds up
    /// no create in a node's own pool: whether the pool asked for is shared is told from the
    /// configuration.
    #[tokio::test]
    async fn a_share_that_does_not_answer_holds_up_no_create_in_a_nodes_pool() {
        use cellar::agent::LocalAgent;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default_for(dir.path());
        config.pools[0].backend = cellar::storage::config::Backend::Shared;
        config.pools[0].name = PoolName::parse("share").expect("name");
        config.default_pool = PoolName::parse("share").expect("name");
        let engine = Arc::new(LocalEngine::open(NodeId::parse("ctl").expect("name"), &config).expect("engine"));
        let mut n = nodes(&["node-1"]).await;
        n.shared = Some(Arc::new(LostAnswer {
            inner: Arc::new(LocalAgent::new(engine)),
            lose: Lose::Pools,
            lost: Default::default(),
        }));
        let ctl = ControllerService::new(Arc::new(n));
        let at = Topology {
            segments: [(cellar::csi::TOPOLOGY_NODE_KEY.to_string(), "node-1".to_string())].into(),
        };
        let mut r = super::create_req("pvc-local", super::MIB);
        r.parameters.insert("pool".into(), "default".into());
        r.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![at.clone()],
            preferred: vec![at],
        });
        let made = ctl
            .create_volume(Request::new(r))
            .await
            .expect("a create in node-1's own pool");
        let id = made.into_inner().volume.expect("volume").volume_id;
        assert!(id.starts_with("local:node-1:default:"), "{id}");
    }

    /// Paging arguments are checked before anything is listed: a bad one costs no listing of
    /// every node (nor replaces the listing other pagers page through).
    #[tokio::test]
    async fn bad_paging_arguments_are_refused_before_any_node_is_asked() {
        let mut n = nodes(&["node-1"]).await;
        let asked = Arc::new(LostAnswer {
            inner: n.agents[0].clone(),
            lose: Lose::Listed,
            lost: Default::default(),
        });
        n.agents[0] = asked.clone();
        let ctl = ControllerService::new(Arc::new(n));
        for (token, max, code) in [("", -1, Code::InvalidArgument), ("not a token", 0, Code::Aborted)] {
            let v = ctl
                .list_volumes(Request::new(ListVolumesRequest {
                    max_entries: max,
                    starting_token: token.into(),
                }))
                .await
                .unwrap_err();
            let s = ctl
                .list_snapshots(Request::new(ListSnapshotsRequest {
                    max_entries: max,
                    starting_token: token.into(),
                    ..Default::default()
                }))
                .await
                .unwrap_err();
            for e in [v, s] {
                assert_eq!(e.code(), code, "{e:?}");
            }
        }
        assert!(
            !asked.lost.load(std::sync::atomic::Ordering::SeqCst),
            "a node was asked for a listing"
        );
    }

    /// A member on the group's home deleted alone while the other nodes still cut (no record
    /// keeps it yet): the group's record is not written naming it; the cut fails whole (ABORTED)
    /// and its retry is whole.
    #[tokio::test]
    async fn a_member_deleted_before_its_group_is_recorded_fails_the_cut_whole() {
        let mut n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        n.agents[0] = Arc::new(LostAnswer {
            inner: n.agents[0].clone(),
            lose: Lose::MemberDeleted,
            lost: Default::default(),
        });
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-gone-a", "node-1").await;
        let b = volume(&ctl, "pvc-gone-b", "node-2").await;
        let e = ctl
            .create_volume_group_snapshot(group_req("group-gone", &[&a, &b], true))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
        assert!(
            e.message().contains("was deleted while the group was cut"),
            "{}",
            e.message()
        );
        for (i, engine) in engines.iter().enumerate() {
            assert!(
                engine.group_named("group-gone").expect("lookup").is_none(),
                "no group record names the deleted member on node-{}",
                i + 1
            );
            assert!(
                engine.snapshots().is_empty(),
                "nothing of the group left on node-{}",
                i + 1
            );
        }
    }

    /// A retry of a group spanning nodes whose home node (which holds the group's record) cannot
    /// answer the name lookup is refused: cutting it again made every node remove the existing
    /// group's members first (as what a failed attempt left), leaving a group answered as ready
    /// with its members gone.
    #[tokio::test]
    async fn a_retried_group_whose_home_cannot_look_it_up_keeps_its_members() {
        let mut n = nodes(&["node-1", "node-2"]).await;
        let engines = n.engines.clone();
        n.agents[0] = Arc::new(LostAnswer {
            inner: n.agents[0].clone(),
            lose: Lose::LaterNameLookup,
            lost: Default::default(),
        });
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-home-a", "node-1").await;
        let b = volume(&ctl, "pvc-home-b", "node-2").await;
        let made = cut(&ctl, group_req("group-home", &[&a, &b], true)).await;
        let e = ctl
            .create_volume_group_snapshot(group_req("group-home", &[&a, &b], true))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
        for s in &made.snapshots {
            assert!(
                engines
                    .iter()
                    .any(|e| e.snapshots().iter().any(|x| x.id.to_string() == s.snapshot_id)),
                "member {} of the group is still there",
                s.snapshot_id
            );
        }
    }

    /// A retry of a group spanning nodes while the registry does not list its home node (not
    /// seen lately, or not yet again after the controller started) asks the home all the same,
    /// and answers the group: skipped, the lookup found nothing, and every node removed the
    /// group's members to cut them again.
    #[tokio::test]
    async fn a_retried_group_whose_home_is_not_listed_now_answers_the_group() {
        let n = nodes(&["node-1", "node-2"]).await;
        let (engines, unlisted) = (n.engines.clone(), n.unlisted.clone());
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-listed-a", "node-1").await;
        let b = volume(&ctl, "pvc-listed-b", "node-2").await;
        let made = cut(&ctl, group_req("group-listed", &[&a, &b], true)).await;
        let members = || -> Vec<SnapshotRecord> {
            let mut all: Vec<SnapshotRecord> = engines.iter().flat_map(|e| e.snapshots()).collect();
            all.sort_by_key(|r| r.id.to_string());
            all
        };
        let before = members();
        assert_eq!(before.len(), 2, "one member on each node");
        *unlisted.lock().expect("unlisted") = Some(NodeId::parse("node-1").expect("node"));
        let again = cut(&ctl, group_req("group-listed", &[&a, &b], true)).await;
        assert_eq!(again, made, "the retry answers the group that was cut");
        assert_eq!(
            members(),
            before,
            "the members cut first, neither removed nor cut again"
        );
    }

    /// The retry of a group spanning nodes whose ids sort one way as text and another as ids
    /// (`node-1` and `node-10`) answers the group it made, not ALREADY_EXISTS.
    #[tokio::test]
    async fn a_retried_group_across_node_1_and_node_10_answers_the_same_group() {
        let n = nodes(&["node-1", "node-10"]).await;
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-ten-a", "node-1").await;
        let b = volume(&ctl, "pvc-ten-b", "node-10").await;
        let made = cut(&ctl, group_req("group-ten", &[&a, &b], true)).await;
        let again = cut(&ctl, group_req("group-ten", &[&b, &a], true)).await;
        assert_eq!(again, made);
    }

    /// A backup repository `offsite` in a new directory (kept while the directory is).
    fn offsite() -> (tempfile::TempDir, Vec<RepositoryConfig>) {
        let dir = tempfile::Builder::new()
            .prefix("cellar-group-split-repo-")
            .tempdir()
            .expect("tempdir");
        let password_file = dir.path().join("key");
        std::fs::write(&password_file, "a key for the test\n").expect("key");
        let repositories = vec![RepositoryConfig {
            name: PoolName::parse("offsite").expect("name"),
            location: cellar::backup::Location::Path(dir.path().join("repo")),
            password_file,
        }];
        (dir, repositories)
    }

    /// CreateSnapshot of `source` as a backup into `offsite`.
    async fn backed_up(ctl: &ControllerService, name: &str, source: &str) -> Snapshot {
        let req = Request::new(CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            parameters: [("backupRepository".to_string(), "offsite".to_string())].into(),
            ..Default::default()
        });
        let made = ctl.create_snapshot(req).await.expect("CreateSnapshot with a backup");
        made.into_inner().snapshot.expect("snapshot")
    }

    /// Waits (a minute at most) until ListSnapshots shows the backup `id` ready to use.
    async fn until_uploaded(ctl: &ControllerService, id: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !listed(ctl, id).await.iter().any(|s| s.ready_to_use) {
            assert!(
                std::time::Instant::now() < deadline,
                "the backup was not uploaded in 60 s: {:?}",
                listed(ctl, id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A backup's CreateSnapshot that reaches its node after the upload finished and the local
    /// copy went (the controller saw the upload still running a moment before) is ABORTED, and
    /// its retry answers the uploaded backup: the node cut a second backup under the same name,
    /// answered for a later point in time, and left the first one named by nothing.
    #[tokio::test]
    async fn a_backup_request_arriving_after_its_upload_ended_is_never_a_second_backup() {
        let (_dir, repositories) = offsite();
        let n = nodes_with(&["node-1"], &repositories).await;
        let engine = n.engines[0].clone();
        let ctl = ControllerService::new(Arc::new(n))
            .with_backups(Arc::new(Backups::new(repositories.clone(), Throttle::unlimited())));
        let v = volume(&ctl, "pvc-late", "node-1").await;
        let made = backed_up(&ctl, "backup-late", &v).await;
        until_uploaded(&ctl, &made.snapshot_id).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !engine.snapshots().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the local copy stayed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let late = engine.create_backup(
            "backup-late",
            &VolumeId::parse(&v).expect("id"),
            false,
            &BackupRequest {
                repository: PoolName::parse("offsite").expect("name"),
                keep_local: false,
            },
        );
        assert!(matches!(late, Err(StorageError::Aborted(_))), "{late:?}");
        assert!(engine.snapshots().is_empty(), "nothing cut");
        let again = backed_up(&ctl, "backup-late", &v).await;
        assert_eq!(again.snapshot_id, made.snapshot_id);
    }

    /// A backup of a shared volume is answered for by the shared pools' agent, the controller's own
    /// engine, whose name (its pod's) changes at a restart: the repository names the old pod as the
    /// uploader, and the shared agent's refusal (its kept copy busy) must still stand, or the
    /// repository forgot the backup while its copy on the share stayed for good.
    #[tokio::test]
    async fn the_shared_pools_agent_can_refuse_a_shared_backups_delete_after_a_restart() {
        use cellar::agent::LocalAgent;
        let (dir, repositories) = offsite();
        let mut config = Config::default_for(dir.path());
        config.pools[0].backend = cellar::storage::config::Backend::Shared;
        config.repositories = repositories.clone();
        let open = |name: &str| {
            let e = Arc::new(LocalEngine::open(NodeId::parse(name).expect("name"), &config).expect("engine"));
            e.start_uploads();
            e
        };
        let old = open("ctl-old");
        let vol = old
            .create_volume(NewVolume::plain("pvc-shared-backup", None, 1 << 20))
            .expect("create")
            .id;
        let backups = Arc::new(Backups::new(repositories.clone(), Throttle::unlimited()));
        let repo = PoolName::parse("offsite").expect("name");
        let r = repo.clone();
        tokio::task::spawn_blocking({
            let b = backups.clone();
            move || b.open_or_init(&r, true).map(drop)
        })
        .await
        .expect("task")
        .expect("init");
        let rec = old
            .create_backup(
                "backup-shared",
                &vol,
                false,
                &BackupRequest {
                    repository: repo,
                    keep_local: true,
                },
            )
            .expect("backup");
        let id = rec.backup.expect("a backup").id;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !old
            .snapshots()
            .iter()
            .any(|s| s.backup.as_ref().is_some_and(|m| m.uploaded))
        {
            assert!(std::time::Instant::now() < deadline, "not uploaded in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(old);
        // The controller restarted under another pod name; its kept copy is busy (refused).
        let new = open("ctl-new");
        let n = Nodes {
            agents: Vec::new(),
            engines: Vec::new(),
            shared: Some(Arc::new(LostAnswer {
                inner: Arc::new(LocalAgent::new(new.clone())),
                lose: Lose::Forget,
                lost: Default::default(),
            })),
            unlisted: Default::default(),
            _dirs: Vec::new(),
            _stops: Vec::new(),
        };
        let ctl = ControllerService::new(Arc::new(n)).with_backups(backups);
        let e = ctl
            .delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
                ..Default::default()
            }))
            .await
            .expect_err("the shared agent's refusal stands");
        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
        assert_eq!(listed(&ctl, &id.to_string()).await.len(), 1, "the backup is kept");
    }

    /// ListSnapshots of one id.
    async fn listed(ctl: &ControllerService, id: &str) -> Vec<Snapshot> {
        let req = Request::new(ListSnapshotsRequest {
            snapshot_id: id.into(),
            ..Default::default()
        });
        let all = ctl.list_snapshots(req).await.expect("ListSnapshots").into_inner();
        all.entries.into_iter().filter_map(|e| e.snapshot).collect()
    }

    /// A backup's delete is not held hostage by a node that did not cut it: every node is asked
    /// at once to forget its part, and once the repository names the node that cut the backup,
    /// only that node's refusal stands (one lying node answering ABORTED to every forget stopped
    /// every backup's delete in the cluster).
    #[tokio::test]
    async fn only_the_node_that_cut_a_backup_can_refuse_its_delete() {
        let (_dir, repositories) = offsite();
        for (refusing, stands) in [(1, false), (0, true)] {
            let mut n = nodes_with(&["node-1", "node-2"], &repositories).await;
            n.agents[refusing] = Arc::new(LostAnswer {
                inner: n.agents[refusing].clone(),
                lose: Lose::Forget,
                lost: Default::default(),
            });
            let ctl = ControllerService::new(Arc::new(n))
                .with_backups(Arc::new(Backups::new(repositories.clone(), Throttle::unlimited())));
            let v = volume(&ctl, &format!("pvc-bk-{refusing}"), "node-1").await;
            let made = backed_up(&ctl, &format!("backup-{refusing}"), &v).await;
            until_uploaded(&ctl, &made.snapshot_id).await;
            let deleted = ctl
                .delete_snapshot(Request::new(DeleteSnapshotRequest {
                    snapshot_id: made.snapshot_id.clone(),
                    ..Default::default()
                }))
                .await;
            let left = listed(&ctl, &made.snapshot_id).await;
            if stands {
                let e = deleted.expect_err("the refusal of the node that cut the backup stands");
                assert_eq!(e.code(), Code::Aborted, "{}", e.message());
                assert_eq!(left.len(), 1, "the backup is kept while its node refuses");
            } else {
                deleted.expect("a node that did not cut the backup cannot refuse its delete");
                assert!(left.is_empty(), "the repository forgot the backup: {left:?}");
            }
        }
    }

    /// A node that answers every group name lookup with an error (not UNAVAILABLE) does not stop a
    /// group of another node's volumes (the lookup stopped at any such error, so one broken or
    /// lying node failed every group snapshot in the cluster).
    #[tokio::test]
    async fn a_node_that_fails_the_name_lookup_does_not_stop_a_group_on_another_node() {
        let mut n = nodes(&["node-1", "node-2"]).await;
        n.agents[1] = Arc::new(LostAnswer {
            inner: n.agents[1].clone(),
            lose: Lose::NameLookup,
            lost: Default::default(),
        });
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-look-a", "node-1").await;
        let b = volume(&ctl, "pvc-look-b", "node-1").await;
        let made = cut(&ctl, group_req("group-look", &[&a, &b], true)).await;
        assert_eq!(made.snapshots.len(), 2);
    }

    /// A group whose member is busy (the source of a restore being copied) is not deleted: the
    /// delete answers ABORTED and removes nothing, so the group never holds a member that is gone
    /// while it still answers Get as ready; the retry deletes it whole.
    #[tokio::test]
    async fn a_group_delete_that_finds_a_member_busy_removes_nothing() {
        use cellar::agent::LocalAgent;
        use cellar::storage::engine::Source;
        let n = nodes(&["node-1"]).await;
        let engine = n.engines[0].clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-busy-a", "node-1").await;
        let b = volume(&ctl, "pvc-busy-b", "node-1").await;
        // More than the frames an export queues, so that it waits for its reader.
        let (_, data) = engine
            .volume_data(&cellar::storage::id::VolumeId::parse(&b).expect("id"))
            .expect("data");
        for i in 0..64 {
            std::fs::write(data.join(format!("f{i}")), vec![7u8; 256 << 10]).expect("fill");
        }
        let made = cut(&ctl, group_req("group-busy", &[&a, &b], true)).await;
        // The second member (by volume id) is being read, as a restore's source is.
        let busy = SnapshotId::parse(
            &made
                .snapshots
                .iter()
                .find(|s| s.source_volume_id == b)
                .unwrap()
                .snapshot_id,
        )
        .expect("id");
        let reader = LocalAgent::new(engine.clone());
        let mut frames = reader
            .export_data(Source::Snapshot(busy.clone()))
            .await
            .expect("export");
        // Its first frame comes once the export holds its source (a probe that took the lock
        // itself could make the export lose it), and the frames queued behind keep it held.
        use tokio_stream::StreamExt;
        let first = tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .expect("the export answers");
        assert!(matches!(first, Some(Ok(_))), "the export took its source: {first:?}");
        assert!(matches!(engine.delete_snapshot(&busy), Err(StorageError::Busy(_))));
        let e = ctl
            .delete_volume_group_snapshot(Request::new(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: made.group_snapshot_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
        assert_eq!(
            engine.snapshots().len(),
            2,
            "a delete refused for a busy member removed another member of the group"
        );
        assert_eq!(got(&ctl, &made.group_snapshot_id).await, made);
        drop(frames);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = ctl
                .delete_volume_group_snapshot(Request::new(DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: made.group_snapshot_id.clone(),
                    ..Default::default()
                }))
                .await;
            match r {
                Ok(_) => break,
                Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("the retried delete: {e:?}"),
            }
        }
        assert!(engine.snapshots().is_empty());
    }

    #[tokio::test]
    async fn a_group_on_one_node_is_cut_got_and_deleted_through_its_agent() {
        let n = nodes(&["node-1", "node-2"]).await;
        let engine = n.engines[1].clone();
        let ctl = ControllerService::new(Arc::new(n));
        let a = volume(&ctl, "pvc-ra", "node-2").await;
        let b = volume(&ctl, "pvc-rb", "node-2").await;
        // The node's own refusal comes back with its code: dir volumes need per-volume consistency.
        let e = ctl
            .create_volume_group_snapshot(group_req("group-remote", &[&a, &b], false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        let made = cut(&ctl, group_req("group-remote", &[&a, &b], true)).await;
        assert!(
            made.group_snapshot_id.starts_with("group:local:node-2:"),
            "{}",
            made.group_snapshot_id
        );
        assert_eq!(engine.snapshots().len(), 2);
        let again = cut(&ctl, group_req("group-remote", &[&b, &a], true)).await;
        assert_eq!(again, made);
        let other = ctl
            .create_volume_group_snapshot(group_req("group-remote", &[&a], true))
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::AlreadyExists);
        let got = got(&ctl, &made.group_snapshot_id).await;
        assert_eq!(got, made);
        let member = ctl
            .delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: made.snapshots[0].snapshot_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(member.code(), Code::InvalidArgument);
        ctl.delete_volume_group_snapshot(Request::new(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        assert!(engine.snapshots().is_empty());
        let gone = ctl
            .get_volume_group_snapshot(Request::new(GetVolumeGroupSnapshotRequest {
                group_snapshot_id: made.group_snapshot_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    }
}

// ------------------------------------------------------------------ PostgreSQL: data and WAL

#[tokio::test]
async fn postgresql_with_its_wal_on_a_second_volume_recovers_from_a_group_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let fs = TestFs::new("xfs", 2048);
    let (mut d, _c) = driver(&[("img", &fs.path("pool"), "image", IMAGE_EXT4)]).await;
    // The postgres user walks down to the mounts and its socket.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sockets = d.path("pg-socket");
    postgres_dir(&sockets);
    // Named so that the WAL is cut first: data pages newer than the WAL copy would be the damage.
    let wal = sized_volume(&mut d, "pvc-pg-a-wal", "img", 256 * MIB).await;
    let data = sized_volume(&mut d, "pvc-pg-b-data", "img", 256 * MIB).await;
    let (sd, td) = d.mount_rw(&data, "pgdata").await;
    let (sw, tw) = d.mount_rw(&wal, "pgwal").await;
    let (pgdata, pgwal) = (td.join("pg"), tw.join("wal"));
    postgres_dir(&pgdata);
    postgres_dir(&pgwal);
    pg(
        "initdb",
        &[
            "-D",
            &pgdata.display().to_string(),
            "--waldir",
            &pgwal.display().to_string(),
            "--wal-segsize=1",
            "-A",
            "trust",
            "-U",
            "postgres",
        ],
    );
    let server = Postgres::start(&pgdata, &sockets, &sockets.join("pg.log")).await;
    let socket = sockets.display().to_string();
    pg(
        "pgbench",
        &["-h", &socket, "-p", "5432", "-U", "postgres", "-i", "-q", "postgres"],
    );
    // TPC-B transactions running while the group is cut.
    let mut bench = start_pgbench(&socket, 4);
    while server
        .sql("select count(*) from pgbench_history")
        .parse::<u64>()
        .unwrap()
        < 200
    {
        assert!(bench.try_wait().unwrap().is_none(), "pgbench stopped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut g = groups(&d).await;
    let made = create(&mut g, "group-pg", &[&data, &wal], &[]).await.unwrap();
    bench.kill().expect("stop pgbench");
    bench.wait().expect("reap pgbench");
    server.stop();
    d.unmount_all(&data, &sd, &td).await;
    d.unmount_all(&wal, &sw, &tw).await;

    // The restored pair, mounted where the originals were (the data directory's pg_wal is a link
    // to the WAL volume's path), starts as after a power cut: it replays its WAL.
    let rd = restore(&mut d, "pvc-pg-data-r", "img", 256 * MIB, &member(&made, &data)).await;
    let rw = restore(&mut d, "pvc-pg-wal-r", "img", 256 * MIB, &member(&made, &wal)).await;
    let (sd, td) = d.mount_rw(&rd, "pgdata").await;
    let (sw, tw) = d.mount_rw(&rw, "pgwal").await;
    let server = Postgres::start(&td.join("pg"), &sockets, &sockets.join("pg-restored.log")).await;
    // TPC-B keeps the balances of all accounts (and of all tellers) summing to the deltas of the
    // history: a transaction half in the data and half in the WAL would break that (or the start).
    let accounts = server.sql("select sum(abalance) from pgbench_accounts");
    let history = server.sql("select coalesce(sum(delta), 0) from pgbench_history");
    let tellers = server.sql("select sum(tbalance) from pgbench_tellers");
    let done = server.sql("select count(*) from pgbench_history");
    server.stop();
    d.unmount_all(&rd, &sd, &td).await;
    d.unmount_all(&rw, &sw, &tw).await;
    assert_eq!(accounts, history, "accounts against history");
    assert_eq!(tellers, history, "tellers against history");
    assert!(
        done.parse::<u64>().unwrap() >= 200,
        "the restored database holds the transactions before the cut: {done}"
    );
}
