//! Shared pools on a real network filesystem (GlusterFS on loopback): cellar mounts the share itself,
//! a second client mount stands for another node, and a share that goes away gives errors in
//! bounded time, not hangs, and is mounted again when it comes back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use common::gluster::Gluster;
use common::*;
use tonic::Code;

async fn driver(g: &Gluster) -> (Driver, tempfile::TempDir) {
    let cfgdir = tempfile::tempdir().expect("tempdir");
    let cfg = cfgdir.path().join("pools.yaml");
    std::fs::write(
        &cfg,
        format!(
            "pools:\n  - name: default\n  - name: share\n    backend: shared\n    source: \"{}\"\n    fsType: {}\n    mountOptions: [\"{}\"]\n    nameTemplate: \"${{pvc.namespace}}-${{pvc.name}}\"\n",
            g.source(),
            g.fs_type(),
            g.options()
        ),
    )
    .expect("config");
    let d = Driver::start_with(&["--config", cfg.to_str().expect("utf-8")], &[]).await;
    (d, cfgdir)
}

fn rwx(name: &str, pvc: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, 64 * MIB);
    r.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    r.parameters.insert("pool".into(), "share".into());
    r.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), "ns".into());
    r.parameters.insert("csi.storage.k8s.io/pvc/name".into(), pvc.into());
    r
}

async fn publish(d: &mut Driver, id: &str, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let st = d.path(&format!("{name}-st"));
    let tg = d.path(&format!("{name}-tg"));
    std::fs::create_dir_all(&st).expect("staging");
    let cap = mount_cap(Mode::MultiNodeMultiWriter);
    d.stage_as(id, &st, cap.clone()).await.expect("stage");
    d.publish(id, &st, &tg, cap, false).await.expect("publish");
    (st, tg)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn rwx_writes_renames_and_deletes_are_seen_by_another_node() {
    let g = Gluster::start();
    let (mut d, _c) = driver(&g).await;
    let v = d
        .ctl
        .create_volume(rwx("pvc-g1", "shared"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "shared:share:ns-shared");
    let (st, tg) = publish(&mut d, &v.volume_id, "g1").await;
    // Another node: its own client mount of the same share.
    let other = g.mount(None);
    let there = other.join("volumes/ns-shared");
    std::fs::write(tg.join("from-node-a"), b"hello").unwrap();
    wait_for("a write on one node is seen on the other", || {
        std::fs::read(there.join("from-node-a")).is_ok_and(|b| b == b"hello")
    });
    std::fs::write(there.join("from-node-b"), b"back").unwrap();
    wait_for("and the other way", || tg.join("from-node-b").exists());
    std::fs::rename(tg.join("from-node-a"), tg.join("renamed")).unwrap();
    wait_for("a rename is seen", || {
        there.join("renamed").exists() && !there.join("from-node-a").exists()
    });
    std::fs::remove_file(there.join("from-node-b")).unwrap();
    wait_for("a delete is seen", || !tg.join("from-node-b").exists());
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.delete(&v.volume_id).await.unwrap();
    wait_for("the volume's directory leaves the share", || !there.exists());
    g.unmount(&other);
    d.kill();
    unmount_share(&d);
}

#[tokio::test]
async fn a_share_that_goes_away_gives_errors_in_bounded_time_and_comes_back() {
    let g = Gluster::start();
    let (mut d, _c) = driver(&g).await;
    let v = d
        .ctl
        .create_volume(rwx("pvc-g2", "outage"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (st, tg) = publish(&mut d, &v.volume_id, "g2").await;
    g.stop_server();
    let start = Instant::now();
    let stats = d.stats(&v.volume_id, &tg).await;
    // Stats answer, with the volume abnormal and the share named: kubelet shows it on the pod.
    let cond = stats
        .expect("stats on a dead share answer")
        .volume_condition
        .expect("condition");
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains(&g.source()), "names the share: {cond:?}");
    let r = d.ctl.create_volume(rwx("pvc-g3", "during")).await;
    assert_eq!(code(r), Code::Unavailable, "a create on a dead share");
    let cap = d
        .ctl
        .get_capacity(GetCapacityRequest {
            parameters: [("pool".to_string(), "share".to_string())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(cap), Code::Unavailable);
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "errors, not hangs: {:?}",
        start.elapsed()
    );
    // kubelet retries a publish while the share is gone: the outage is logged once, not per call.
    let tg3 = d.path("g2-tg3");
    for _ in 0..3 {
        let r = d
            .publish(&v.volume_id, &st, &tg3, mount_cap(Mode::MultiNodeMultiWriter), false)
            .await;
        assert!(r.is_err(), "a publish on a dead share fails");
    }
    // Once per outage: a second line only after the share was seen usable again in between (the
    // GlusterFS mount helper has been seen to succeed once just after its server was killed).
    let log = d.log();
    assert_eq!(
        log.matches("share unusable").count(),
        1 + log.matches("share usable again").count(),
        "once per cause:\n{log}"
    );
    g.restart_server();
    // Publishing again after the outage works: a stale share or staging is mounted again, not stacked.
    let tg2 = d.path("g2-tg2");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match d
            .publish(&v.volume_id, &st, &tg2, mount_cap(Mode::MultiNodeMultiWriter), false)
            .await
        {
            Ok(()) => break,
            Err(s) => assert!(Instant::now() < deadline, "publish after the share came back: {s}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(tg2.join("after"), b"the share is back").unwrap();
    assert!(
        d.log().contains("share usable again"),
        "its end is logged:\n{}",
        d.log()
    );
    // The old publish still sits on the dead mount: abnormal, and saying so, until it is republished.
    let cond = d
        .stats(&v.volume_id, &tg)
        .await
        .expect("stats")
        .volume_condition
        .expect("condition");
    assert!(cond.abnormal && cond.message.contains("stale"), "{cond:?}");
    d.unpublish(&v.volume_id, &tg2).await.unwrap();
    d.unmount_all(&v.volume_id, &st, &tg).await;
    d.kill();
    unmount_share(&d);
}

/// A share whose server is down when the driver starts leaves its pool shut, not the driver: the
/// pool is tried again in the background and, once the server is back, opens by itself (no
/// restart) and serves the volumes made before.
#[tokio::test]
async fn a_share_down_at_the_start_opens_once_its_server_is_back() {
    let g = Gluster::start();
    let (mut first, cfg) = driver(&g).await;
    let early = first
        .ctl
        .create_volume(rwx("pvc-early", "early"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    first.kill();
    unmount_share(&first);
    g.stop_server();
    let config = cfg.path().join("pools.yaml");
    let mut d = Driver::start_with(&["--config", config.to_str().expect("utf-8")], &[]).await;
    let probe = d.id.probe(ProbeRequest {}).await.expect("probe").into_inner();
    assert_eq!(
        probe.ready,
        Some(false),
        "not ready while the share is shut:\n{}",
        d.log()
    );
    let st = d.path("early-st");
    std::fs::create_dir_all(&st).expect("staging");
    let cap = mount_cap(Mode::MultiNodeMultiWriter);
    let refused = d
        .stage_as(&early, &st, cap.clone())
        .await
        .expect_err("its pool is shut");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("share"), "names the pool: {refused:?}");

    g.restart_server();
    // A guard, not a timing: the pool is tried every 10 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    while d.id.probe(ProbeRequest {}).await.expect("probe").into_inner().ready != Some(true) {
        assert!(Instant::now() < deadline, "the share never opened:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let listed = d
        .ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == early)),
        "the volume made before is listed again"
    );
    let tg = d.path("early-tg");
    d.stage_as(&early, &st, cap.clone())
        .await
        .expect("stage once the share is open");
    d.publish(&early, &st, &tg, cap, false).await.expect("publish");
    std::fs::write(tg.join("after"), b"the share opened late").expect("write through the publish");
    d.ctl
        .create_volume(rwx("pvc-late", "late"))
        .await
        .expect("a new volume on the share");
    assert!(d.log().contains("pool opened"), "{}", d.log());
    d.unmount_all(&early, &st, &tg).await;
    d.kill();
    unmount_share(&d);
}

/// The share cellar mounted for its pool lives under the driver's data dir; it goes before the fixture.
fn unmount_share(d: &Driver) {
    let share = d.data_dir().join("shares/share");
    if mounts_under(&share).iter().any(|m| m == Path::new(&share)) {
        let _ = nix::mount::umount2(&share, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Nodes that open one shared pool at the same moment all create its directories. A client whose
/// mkdir loses that race can be told EEXIST while its own lookup still answers ENOENT, until the
/// winner's mkdir has completed; making sure of the directory must wait that out, not fail.
#[test]
fn two_clients_making_one_directory_at_once_both_see_it() {
    use std::sync::{Arc, Barrier};
    let g = Gluster::start();
    let (a, b) = (g.mount(None), g.mount(None));
    for i in 0..300 {
        let name = format!("race-{i}");
        let (here, there) = (a.join(&name), b.join(&name));
        // Each client has looked the name up before (a pool is checked before it is made).
        assert!(!here.exists() && !there.exists());
        let start = Arc::new(Barrier::new(2));
        let other = {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                cellar::sys::files::Files::ensure_dir(&cellar::sys::files::LinuxFiles, &there, 0o700)
            })
        };
        start.wait();
        let mine = cellar::sys::files::Files::ensure_dir(&cellar::sys::files::LinuxFiles, &here, 0o700);
        let theirs = other.join().expect("thread");
        assert!(mine.is_ok() && theirs.is_ok(), "round {i}: {mine:?} / {theirs:?}");
    }
}

/// A node plugin that restarts for rotated certificates (cert-manager renewing them; with
/// enrolment, every renewal) starts again in place: run as process 1 of its own process namespace,
/// as in a container, the FUSE daemon of the share it mounted (glusterfs) carries on, and a pod's
/// volume on that share stays readable and writable through the restart. A node that exited for
/// kubelet to start it again took the daemon with it, and every such volume failed with ENOTCONN
/// ("Transport endpoint is not connected") until its pod restarted.
#[tokio::test]
async fn a_share_on_a_fuse_client_outlives_a_node_restarting_for_rotated_certificates() {
    use common::cluster::{Cluster, Spec};
    let g = Gluster::start();
    let config = format!(
        "pools:\n  - name: default\n  - name: share\n    backend: shared\n    source: \"{}\"\n    fsType: {}\n    mountOptions: [\"{}\"]\n",
        g.source(),
        g.fs_type(),
        g.options()
    );
    let mut c = Cluster::start(Spec {
        config: Some(config),
        node_wrapper: ["unshare", "--pid", "--fork", "--kill-child"]
            .map(String::from)
            .to_vec(),
        ..Spec::nodes(vec![None])
    })
    .await;
    c.kill_node(0);
    c.start_node_with(0, &[("CELLAR_TLS_CHECK_SECONDS", "1")]);
    c.wait_node_registered(0).await;
    let mut ctl = c.ctl().await;
    let id = ctl
        .create_volume(rwx("pvc-fuse", "fuse"))
        .await
        .unwrap_or_else(|s| panic!("create: {s:?}\n{}", c.logs()))
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let (st, tg) = (c.dir.path().join("fuse-st"), c.dir.path().join("fuse-tg"));
    std::fs::create_dir_all(&st).expect("staging");
    let cap = mount_cap(Mode::MultiNodeMultiWriter);
    let mut node = c.node(0).await;
    // Until the node has opened the share its volumes are not found there, or (a share it could
    // not open at its start, such as one whose FUSE daemon was still dying: it is tried again
    // every 10 s) not usable; kubelet retries.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let staged = node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: st.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await;
        match staged {
            Ok(_) => break,
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("stage: {s:?}\n{}", c.logs()),
        }
    }
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: st.display().to_string(),
        target_path: tg.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("publish: {s:?}\n{}", c.logs()));
    std::fs::write(tg.join("before"), "written before the restart").expect("write through the publish");

    // The node's certificate file rewritten (the same certificate, new bytes: a renewal).
    let cert = c.dir.path().join("node.pem");
    let mut pem = std::fs::read(&cert).expect("node.pem");
    pem.extend_from_slice(b"\n");
    std::fs::write(&cert, pem).expect("rotate");
    // Restarted in place, or (were it to exit) started again as kubelet restarts a container.
    let mut exited = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while exited.is_none() && !c.log_of(0).contains("restarting in place") {
        assert!(Instant::now() < deadline, "the node did not restart\n{}", c.log_of(0));
        exited = c.nodes[0].1.as_mut().expect("node").try_wait().expect("wait");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    exited = exited.or(c.nodes[0].1.as_mut().expect("node").try_wait().expect("wait"));
    if exited.is_some() {
        c.start_node_with(0, &[("CELLAR_TLS_CHECK_SECONDS", "1")]);
    }
    c.wait_node_registered(0).await;
    assert_eq!(
        std::fs::read_to_string(tg.join("before"))
            .unwrap_or_else(|e| panic!("read through the publish after the restart: {e}\n{}", c.log_of(0))),
        "written before the restart"
    );
    std::fs::write(tg.join("after"), "written after it").expect("write through the publish after the restart");
    assert_eq!(exited, None, "the node's process, its namespace's first, lives on");

    let mut node = c.node(0).await;
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: tg.display().to_string(),
    })
    .await
    .expect("unpublish");
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: st.display().to_string(),
    })
    .await
    .expect("unstage");
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .expect("delete");
}
