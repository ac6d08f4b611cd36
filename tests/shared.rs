//! Shared pools: volumes every node can use at once, named from the PVC, deleted safely, and static
//! volumes for directories that already exist. Each test runs on a real network filesystem: its own
//! GlusterFS server on loopback, mounted by the test (a `path` the operator mounted on every node);
//! the test looks at the share through that same mount. tests/shared_gluster.rs covers pools whose
//! share cellar mounts itself, a second node's view and outages.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use common::gluster::Gluster;
use common::*;
use tonic::Code;

/// A GlusterFS volume mounted at a directory of its own: the share every node has mounted.
struct Share {
    mnt: PathBuf,
    _g: Gluster,
}

impl Share {
    fn new() -> Share {
        let g = Gluster::start();
        Share {
            mnt: g.mount(None),
            _g: g,
        }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

const TEMPLATE: &str = "${pvc.namespace}-${pvc.name}";

/// A driver with a shared pool `share` on `dir` (plus the default local pool).
async fn driver(dir: &Path, extra: &str) -> (Driver, tempfile::TempDir) {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let cfg = cfgdir.path().join("pools.yaml");
    let mut yaml = format!(
        "pools:\n  - name: default\n  - name: share\n    backend: shared\n    path: {}\n    nameTemplate: \"{TEMPLATE}\"\n",
        dir.display()
    );
    for l in extra.lines().filter(|l| !l.is_empty()) {
        yaml += &format!("    {l}\n");
    }
    std::fs::write(&cfg, yaml).expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (d, cfgdir)
}

fn pvc(name: &str, ns: &str, pvc_name: &str, mode: Mode) -> CreateVolumeRequest {
    let mut r = create_req(name, 64 * MIB);
    r.volume_capabilities = vec![mount_cap(mode)];
    r.parameters.insert("pool".into(), "share".into());
    r.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), ns.into());
    r.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), pvc_name.into());
    r.parameters.insert("csi.storage.k8s.io/pv/name".into(), name.into());
    r
}

async fn create(d: &mut Driver, r: CreateVolumeRequest) -> Volume {
    d.ctl
        .create_volume(r)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn stage_publish(d: &mut Driver, id: &str, name: &str, mode: Mode, readonly: bool) -> (PathBuf, PathBuf) {
    let st = d.path(&format!("{name}-st"));
    let tg = d.path(&format!("{name}-tg"));
    std::fs::create_dir_all(&st).expect("staging dir");
    d.stage_as(id, &st, mount_cap(mode)).await.expect("stage");
    d.publish(id, &st, &tg, mount_cap(mode), readonly)
        .await
        .expect("publish");
    (st, tg)
}

#[tokio::test]
async fn shared_volume_is_named_from_the_pvc_and_pinned_to_no_node() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let v = create(&mut d, pvc("pvc-1", "team-a", "data", Mode::MultiNodeMultiWriter)).await;
    assert_eq!(v.volume_id, "shared:share:team-a-data");
    assert!(
        v.accessible_topology.is_empty(),
        "a shared volume is reachable from every node"
    );
    assert!(share.path().join("volumes/team-a-data").is_dir());
    let again = create(&mut d, pvc("pvc-1", "team-a", "data", Mode::MultiNodeMultiWriter)).await;
    assert_eq!(again.volume_id, v.volume_id, "a retried create gets the same volume");
}

#[tokio::test]
async fn hostile_and_colliding_pvc_names_stay_inside_the_pool_and_apart() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let hostile = [
        "../x",
        "a/b",
        "..",
        "/etc/passwd",
        &"n".repeat(300),
        "ünïcødé",
        "x.json",
    ];
    let mut ids = Vec::new();
    for (i, name) in hostile.iter().enumerate() {
        let v = create(
            &mut d,
            pvc(&format!("pvc-h{i}"), "ns", name, Mode::MultiNodeMultiWriter),
        )
        .await;
        ids.push(v.volume_id);
    }
    // Two PVCs whose template renders the same string get different directories.
    let a = create(&mut d, pvc("pvc-c1", "a-b", "c", Mode::MultiNodeMultiWriter)).await;
    let b = create(&mut d, pvc("pvc-c2", "a", "b-c", Mode::MultiNodeMultiWriter)).await;
    assert_ne!(a.volume_id, b.volume_id);
    ids.extend([a.volume_id, b.volume_id]);
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "every volume has its own directory: {ids:?}");
    for e in entries(&share.path().join("volumes")) {
        assert!(!e.contains('/') && !e.starts_with('.') && e.len() <= 133, "{e}");
    }
    assert_eq!(
        entries(share.path()),
        vec![
            ".cellar-pool",
            ".leases",
            ".locks",
            ".retired",
            ".staged",
            ".trash",
            ".work",
            "groups",
            "snapshots",
            "volumes"
        ],
        "nothing outside volumes/"
    );
    for id in ids {
        d.delete(&id).await.unwrap();
    }
}

#[tokio::test]
async fn rwx_volume_is_written_through_two_publishes_at_once() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let v = create(&mut d, pvc("pvc-rwx", "ns", "shared", Mode::MultiNodeMultiWriter)).await;
    let (st, t1) = stage_publish(&mut d, &v.volume_id, "rwx", Mode::MultiNodeMultiWriter, false).await;
    let t2 = d.path("rwx-tg2");
    d.publish(&v.volume_id, &st, &t2, mount_cap(Mode::MultiNodeMultiWriter), false)
        .await
        .unwrap();
    std::fs::write(t1.join("from-1"), b"one").unwrap();
    std::fs::write(t2.join("from-2"), b"two").unwrap();
    assert_eq!(std::fs::read(t2.join("from-1")).unwrap(), b"one");
    std::fs::rename(t1.join("from-2"), t1.join("renamed")).unwrap();
    assert!(t2.join("renamed").exists());
    d.unpublish(&v.volume_id, &t2).await.unwrap();
    d.unmount_all(&v.volume_id, &st, &t1).await;
}

#[tokio::test]
async fn rox_volume_is_read_only_on_every_publish() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let v = create(&mut d, pvc("pvc-rox", "ns", "ro", Mode::MultiNodeReaderOnly)).await;
    std::fs::write(share.path().join("volumes/ns-ro/dataset"), b"shared data").unwrap();
    let (st, tg) = stage_publish(&mut d, &v.volume_id, "rox", Mode::MultiNodeReaderOnly, false).await;
    assert_eq!(std::fs::read(tg.join("dataset")).unwrap(), b"shared data");
    assert_eq!(
        std::fs::write(tg.join("x"), b"").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
}

#[tokio::test]
async fn uid_gid_and_mode_parameters_set_the_directory_owner() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let mut r = pvc("pvc-own", "ns", "owned", Mode::MultiNodeMultiWriter);
    r.parameters.insert("uid".into(), "1001".into());
    r.parameters.insert("gid".into(), "2002".into());
    r.parameters.insert("mode".into(), "0750".into());
    create(&mut d, r).await;
    let md = std::fs::metadata(share.path().join("volumes/ns-owned")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.permissions().mode() & 0o7777),
        (1001, 2002, 0o750)
    );
    let mut bad = pvc("pvc-own2", "ns", "bad", Mode::MultiNodeMultiWriter);
    bad.parameters.insert("mode".into(), "rwx".into());
    assert_eq!(code(d.ctl.create_volume(bad).await), Code::InvalidArgument);
}

#[tokio::test]
async fn delete_moves_to_trash_returns_at_once_and_purges_in_the_background() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let v = create(&mut d, pvc("pvc-del", "ns", "big", Mode::MultiNodeMultiWriter)).await;
    let data = share.path().join("volumes/ns-big");
    for i in 0..200 {
        let sub = data.join(format!("d{i}"));
        std::fs::create_dir(&sub).unwrap();
        for j in 0..20 {
            std::fs::write(sub.join(format!("f{j}")), b"x").unwrap();
        }
    }
    std::fs::write(share.path().join("neighbour"), b"not a volume").unwrap();
    d.delete(&v.volume_id).await.unwrap();
    assert!(
        !data.exists(),
        "the volume is gone from its place when DeleteVolume returns"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !entries(&share.path().join(".trash")).is_empty() {
        assert!(Instant::now() < deadline, "the trash was not purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read(share.path().join("neighbour")).unwrap(),
        b"not a volume",
        "nothing else touched"
    );
}

#[tokio::test]
async fn a_purge_cut_short_by_a_restart_resumes() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    // A volume moved into the trash whose purge never ran: what a crash right after the move leaves.
    let left = share.path().join(".trash/ns-old-0123");
    std::fs::create_dir_all(left.join("deep/tree")).unwrap();
    std::fs::write(left.join("deep/tree/f"), b"x").unwrap();
    d.kill();
    d.spawn(&[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while left.exists() {
        assert!(Instant::now() < deadline, "the interrupted purge did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn retain_and_archive_policies_keep_shared_data() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "deletePolicy: retain").await;
    let v = create(&mut d, pvc("pvc-r", "ns", "keep", Mode::MultiNodeMultiWriter)).await;
    std::fs::write(share.path().join("volumes/ns-keep/f"), b"kept").unwrap();
    d.delete(&v.volume_id).await.unwrap();
    assert_eq!(std::fs::read(share.path().join("retained/ns-keep/f")).unwrap(), b"kept");
    let mut a = pvc("pvc-a", "ns", "arch", Mode::MultiNodeMultiWriter);
    a.parameters.insert("deletePolicy".into(), "archive".into());
    let a = create(&mut d, a).await;
    d.delete(&a.volume_id).await.unwrap();
    assert!(entries(&share.path().join("archive"))
        .iter()
        .any(|e| e.starts_with("ns-arch-") && !e.ends_with(".json")));
}

#[tokio::test]
async fn shared_snapshots_restore_and_clone_with_equal_content() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let v = create(&mut d, pvc("pvc-s", "ns", "src", Mode::MultiNodeMultiWriter)).await;
    std::fs::write(share.path().join("volumes/ns-src/f"), b"v1").unwrap();
    let snap = d.snapshot("snap-s", &v.volume_id).await.unwrap();
    assert!(snap.snapshot_id.starts_with("snap:shared:share:"));
    std::fs::write(share.path().join("volumes/ns-src/f"), b"v2").unwrap();
    let mut r = pvc("pvc-sr", "ns", "restored", Mode::MultiNodeMultiWriter);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    create(&mut d, r).await;
    let mut c = pvc("pvc-sc", "ns", "clone", Mode::MultiNodeMultiWriter);
    c.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            },
        )),
    });
    create(&mut d, c).await;
    assert_eq!(
        std::fs::read(share.path().join("volumes/ns-restored/f")).unwrap(),
        b"v1"
    );
    assert_eq!(std::fs::read(share.path().join("volumes/ns-clone/f")).unwrap(), b"v2");
}

#[tokio::test]
async fn static_volume_publishes_an_existing_directory_and_delete_keeps_it() {
    let share = Share::new();
    std::fs::create_dir_all(share.path().join("datasets/imagenet/train")).unwrap();
    std::fs::write(share.path().join("datasets/imagenet/train/1.jpg"), b"jpeg").unwrap();
    let (mut d, _c) = driver(share.path(), "").await;
    let id = "static:share:datasets/imagenet";
    let st = d.path("static-st");
    std::fs::create_dir_all(&st).unwrap();
    let cap = mount_cap(Mode::MultiNodeReaderOnly);
    d.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: st.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: [
                ("subdir".to_string(), "train".to_string()),
                ("readOnly".to_string(), "true".to_string()),
                ("mountOptions".to_string(), "noexec".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let tg = d.path("static-tg");
    d.publish(id, &st, &tg, cap.clone(), false).await.unwrap();
    assert_eq!(
        std::fs::read(tg.join("1.jpg")).unwrap(),
        b"jpeg",
        "the subdir is what is published"
    );
    assert_eq!(
        std::fs::write(tg.join("x"), b"").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    let got = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id.into() })
        .await
        .unwrap();
    assert!(!got.into_inner().status.unwrap().volume_condition.unwrap().abnormal);
    d.unmount_all(id, &st, &tg).await;
    d.delete(id).await.unwrap();
    assert!(
        share.path().join("datasets/imagenet/train/1.jpg").exists(),
        "a static volume's data is never deleted"
    );
}

/// ModifyVolume of a static volume answered NOT_FOUND although GetVolume found it. A static
/// volume is a directory cellar mounts but does not manage: a modify with parameters is
/// INVALID_ARGUMENT saying so, an empty one checks the directory is there.
#[tokio::test]
async fn a_static_volume_has_no_mutable_parameters_but_is_found() {
    let share = Share::new();
    std::fs::create_dir_all(share.path().join("datasets/x")).unwrap();
    let (mut d, _c) = driver(share.path(), "").await;
    let modify = |id: &str, params: &[(&str, &str)]| ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let id = "static:share:datasets/x";
    let refused = d
        .ctl
        .controller_modify_volume(modify(id, &[("deletePolicy", "retain")]))
        .await
        .expect_err("a static volume has no record to modify");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("no mutable parameters"),
        "{}",
        refused.message()
    );
    d.ctl
        .controller_modify_volume(modify(id, &[]))
        .await
        .expect("an empty modify of a static volume that is there");
    let missing = d
        .ctl
        .controller_modify_volume(modify("static:share:datasets/gone", &[]))
        .await
        .expect_err("no such directory");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(share.path().join("datasets/x").is_dir(), "nothing changed");
}

/// ValidateVolumeCapabilities of a static volume confirms only what such a volume has: no
/// parameters, and a context of the attributes a static PV may set. Any parameter or context was
/// echoed back as validated (`pool=other` too).
#[tokio::test]
async fn validate_of_a_static_volume_confirms_only_its_attributes() {
    let share = Share::new();
    std::fs::create_dir_all(share.path().join("datasets/v")).unwrap();
    let (mut d, _c) = driver(share.path(), "").await;
    let validate = |params: &[(&str, &str)], context: &[(&str, &str)]| ValidateVolumeCapabilitiesRequest {
        volume_id: "static:share:datasets/v".into(),
        volume_capabilities: vec![rwo()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        volume_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    for (params, context, confirmed) in [
        (&[][..], &[("subdir", "train"), ("readOnly", "true")][..], true),
        (&[("csi.storage.k8s.io/pvc/name", "p")][..], &[][..], true),
        (&[("pool", "other")][..], &[][..], false),
        (&[][..], &[("layout", "image")][..], false),
    ] {
        let r = d
            .ctl
            .validate_volume_capabilities(validate(params, context))
            .await
            .expect("validate answers")
            .into_inner();
        assert_eq!(r.confirmed.is_some(), confirmed, "{params:?} {context:?}: {r:?}");
    }
}

/// Two PVs of one static handle naming other subdirs, with real bind mounts: kubelet gives them
/// one staging path and stages the handle once, so the second PV's stage is ALREADY_EXISTS and
/// its publish FAILED_PRECONDITION; its pod never sees the first team's files.
#[tokio::test]
async fn two_pvs_of_one_static_handle_with_other_subdirs_never_share_a_stage() {
    let share = Share::new();
    for team in ["team-a", "team-b"] {
        std::fs::create_dir_all(share.path().join("tenants").join(team)).unwrap();
        std::fs::write(share.path().join("tenants").join(team).join("owner"), team).unwrap();
    }
    let (mut d, _c) = driver(share.path(), "").await;
    let id = "static:share:tenants";
    let st = d.path("tenants-st");
    std::fs::create_dir_all(&st).unwrap();
    let cap = mount_cap(Mode::MultiNodeMultiWriter);
    let subdir =
        |team: &str| -> std::collections::HashMap<String, String> { [("subdir".to_string(), team.to_string())].into() };
    let stage = |team: &str| NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: st.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: subdir(team),
        ..Default::default()
    };
    d.node.node_stage_volume(stage("team-a")).await.unwrap();
    assert_eq!(
        code(d.node.node_stage_volume(stage("team-b")).await),
        Code::AlreadyExists
    );
    let publish = |team: &str, tg: &std::path::Path| NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: st.display().to_string(),
        target_path: tg.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: subdir(team),
        ..Default::default()
    };
    let (tg_a, tg_b) = (d.path("pod-a"), d.path("pod-b"));
    let refused = d.node.node_publish_volume(publish("team-b", &tg_b)).await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    assert!(!tg_b.join("owner").exists(), "team-b's pod sees nothing of team-a");
    d.node.node_publish_volume(publish("team-a", &tg_a)).await.unwrap();
    assert_eq!(std::fs::read(tg_a.join("owner")).unwrap(), b"team-a");
    d.unmount_all(id, &st, &tg_a).await;
    assert!(mounts_under(d.dir.path()).is_empty(), "nothing left mounted");
}

#[tokio::test]
async fn static_handles_that_leave_the_pool_or_follow_symlinks_are_refused() {
    let share = Share::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"no").unwrap();
    std::os::unix::fs::symlink(outside.path(), share.path().join("link")).unwrap();
    let (mut d, _c) = driver(share.path(), "").await;
    let st = d.path("bad-st");
    std::fs::create_dir_all(&st).unwrap();
    for (id, want) in [
        ("static:share:../etc", Code::NotFound),
        ("static:share:/etc", Code::NotFound),
        ("static:share:link", Code::Internal),
        ("static:share:missing/dir", Code::NotFound),
        ("static:default:anything", Code::NotFound),
        ("static:nopool:anything", Code::NotFound),
    ] {
        let r = d.stage_as(id, &st, mount_cap(Mode::MultiNodeReaderOnly)).await;
        let got = code(r.map(tonic::Response::new));
        assert!(
            got == want || (want == Code::Internal && got != Code::Ok),
            "{id}: {got:?}"
        );
    }
    assert!(mounts_under(d.dir.path()).is_empty(), "nothing was mounted");
    // A well-formed handle of a pool that is not configured names nothing here (docs/volume-ids.md).
    let got = d
        .ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "static:nopool:anything".into(),
        })
        .await;
    assert_eq!(code(got), Code::NotFound);
    let sub = d.node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: "static:share:link".into(),
        staging_target_path: st.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeReaderOnly)),
        volume_context: [("subdir".to_string(), "../../x".to_string())].into(),
        ..Default::default()
    });
    assert_eq!(code(sub.await), Code::InvalidArgument);
}

#[tokio::test]
async fn image_volume_on_a_shared_pool_is_single_node() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "layouts: [dir, image]").await;
    let mut r = pvc("pvc-img", "ns", "img", Mode::SingleNodeWriter);
    r.parameters.insert("layout".into(), "image".into());
    let v = create(&mut d, r).await;
    let (st, tg) = stage_publish(&mut d, &v.volume_id, "img", Mode::SingleNodeWriter, false).await;
    std::fs::write(tg.join("f"), b"inside the image").unwrap();
    d.unmount_all(&v.volume_id, &st, &tg).await;
    let mut rwx = pvc("pvc-img2", "ns", "img2", Mode::MultiNodeMultiWriter);
    rwx.parameters.insert("layout".into(), "image".into());
    assert_eq!(code(d.ctl.create_volume(rwx).await), Code::InvalidArgument);
}

#[tokio::test]
async fn capacity_of_a_shared_pool_is_the_shares_and_serves_rwx() {
    let share = Share::new();
    let (mut d, _c) = driver(share.path(), "").await;
    let req = |pool: &str, mode: Mode| GetCapacityRequest {
        parameters: [("pool".to_string(), pool.to_string())].into(),
        volume_capabilities: vec![mount_cap(mode)],
        ..Default::default()
    };
    let s = d
        .ctl
        .get_capacity(req("share", Mode::MultiNodeMultiWriter))
        .await
        .unwrap()
        .into_inner();
    assert!(s.available_capacity > 0);
    let l = d
        .ctl
        .get_capacity(req("default", Mode::MultiNodeMultiWriter))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.available_capacity, 0, "a local pool cannot serve RWX");
    let v = create(&mut d, pvc("pvc-st", "ns", "stats", Mode::MultiNodeMultiWriter)).await;
    let (st, tg) = stage_publish(&mut d, &v.volume_id, "stats", Mode::MultiNodeMultiWriter, false).await;
    let stats = d.stats(&v.volume_id, &tg).await.unwrap();
    assert!(stats.usage[0].total > 0);
    let cond = stats.volume_condition.expect("condition");
    assert!(!cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("the whole share's"),
        "GlusterFS has no directory quota here: the figures are labelled as the share's: {cond:?}"
    );
    d.unmount_all(&v.volume_id, &st, &tg).await;
}
