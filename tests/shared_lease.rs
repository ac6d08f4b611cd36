//! An `image` volume on a shared pool is staged on one node at a time, in split mode: a controller
//! and two node processes, each mounting the same GlusterFS share itself, as they would on three
//! machines. The volume's lease keeps the second node out while the first holds it, gives the volume
//! over on unstage, and is taken over when its node dies.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cellar::csi::v1::*;
use common::cluster::{Cluster, Spec};
use common::gluster::Gluster;
use common::*;
use tonic::Code;

/// Lease time in the test pool: short, so that a take-over is seen in seconds.
const LEASE_SECONDS: u64 = 3;

const NODES: [&str; 2] = ["node-1", "node-2"];

/// A controller and two nodes, every one mounting the GlusterFS share as pool `share`.
async fn cluster(g: &Gluster) -> Cluster {
    Cluster::start(Spec {
        config: Some(format!(
            "pools:\n  - name: default\n  - name: share\n    backend: shared\n    source: \"{}\"\n    fsType: {}\n    mountOptions: [\"{}\"]\n    layouts: [dir, image]\n    leaseSeconds: {LEASE_SECONDS}\n",
            g.source(),
            g.fs_type(),
            g.options()
        )),
        insecure: true,
        ..Spec::nodes(vec![None, None])
    })
    .await
}

/// A staging path for node `i` (the cluster unmounts it, if need be, when it is dropped).
fn staging(c: &Cluster, i: usize, name: &str) -> PathBuf {
    let p = c.dir.path().join(format!("{}-{name}-st", NODES[i]));
    std::fs::create_dir_all(&p).expect("staging dir");
    p
}

fn lease_holder(c: &Cluster, key: &str) -> Option<String> {
    let bytes = std::fs::read(c.share_of(1, "share").join(format!(".leases/{key}"))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("lease JSON");
    Some(v["node"].as_str().expect("node").to_string())
}

/// A 64 MiB image volume on the share; its id.
async fn create_image(c: &Cluster, name: &str) -> String {
    let mut r = create_req(name, 64 * MIB);
    r.volume_capabilities = vec![rwo()];
    r.parameters.insert("pool".into(), "share".into());
    r.parameters.insert("layout".into(), "image".into());
    let v = c.ctl().await.create_volume(r).await.expect("create").into_inner();
    v.volume.expect("volume").volume_id
}

async fn delete(c: &Cluster, id: &str) -> Result<(), tonic::Status> {
    let r = DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    c.ctl().await.delete_volume(r).await.map(|_| ())
}

async fn stage(c: &Cluster, i: usize, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    stage_rwo(&mut c.node(i).await, id, staging).await
}

async fn unstage(c: &Cluster, i: usize, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    unstage_from(&mut c.node(i).await, id, staging).await
}

/// The key of a shared volume: the last part of `shared:<pool>:<key>`.
fn key_of(id: &str) -> &str {
    id.rsplit(':').next().expect("key")
}

#[tokio::test]
async fn an_image_volume_on_a_share_is_staged_on_one_node_at_a_time() {
    let g = Gluster::start();
    let c = cluster(&g).await;
    let id = create_image(&c, "pvc-lease-1").await;
    let st1 = staging(&c, 0, "v1");
    let st2 = staging(&c, 1, "v1");
    stage(&c, 0, &id, &st1).await.expect("stage on node-1");
    std::fs::write(st1.join("written-on-node-1"), b"one").expect("write");
    assert_eq!(lease_holder(&c, key_of(&id)).as_deref(), Some("node-1"));

    let e = stage(&c, 1, &id, &st2)
        .await
        .expect_err("a second node must not stage it");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("node-1"), "the refusal names the holder: {e}");
    assert!(mounts_under(&st2).is_empty(), "nothing mounted on the refused node");

    // node-1 keeps renewing: two whole lease times later node-2 is still refused.
    tokio::time::sleep(Duration::from_secs(2 * LEASE_SECONDS + 1)).await;
    let e = stage(&c, 1, &id, &st2)
        .await
        .expect_err("a renewed lease is never taken over");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // Deleting a volume another node has staged is refused too.
    let e = delete(&c, &id).await.expect_err("delete while staged");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("node-1"), "{e}");

    // Unstage gives the lease back at once; the volume moves to node-2 with its data.
    unstage(&c, 0, &id, &st1).await.expect("unstage on node-1");
    assert_eq!(lease_holder(&c, key_of(&id)), None, "unstage gives the lease back");
    stage(&c, 1, &id, &st2)
        .await
        .expect("stage on node-2 after node-1 let go");
    assert_eq!(
        std::fs::read(st2.join("written-on-node-1")).expect("data moved"),
        b"one"
    );
    assert_eq!(lease_holder(&c, key_of(&id)).as_deref(), Some("node-2"));
    unstage(&c, 1, &id, &st2).await.expect("unstage on node-2");
    delete(&c, &id).await.expect("delete once unstaged");
    let left: Vec<_> = ["volumes", ".leases"]
        .iter()
        .flat_map(|d| std::fs::read_dir(c.share_of(1, "share").join(d)).expect("pool dir"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(key_of(&id)) || n.contains(".lease"))
        .collect();
    assert!(left.is_empty(), "nothing of the volume or its lease is left: {left:?}");
}

#[tokio::test]
async fn the_lease_of_a_dead_node_is_taken_over_and_the_old_node_reports_it() {
    let g = Gluster::start();
    let mut c = cluster(&g).await;
    let id = create_image(&c, "pvc-lease-2").await;
    let st1 = staging(&c, 0, "v2");
    let st2 = staging(&c, 1, "v2");
    stage(&c, 0, &id, &st1).await.expect("stage on node-1");
    std::fs::write(st1.join("before-the-crash"), b"kept").expect("write");
    nix::unistd::sync();

    // node-1's machine dies: its driver is gone, and with the machine its mount and loop device.
    c.kill_node(0);
    nix::mount::umount2(&st1, nix::mount::MntFlags::empty()).expect("unmount node-1's staging");
    let backing = c.share_of(0, "share").join("volumes").join(key_of(&id));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "losetup -j '{}' -n -O NAME | xargs -r -n1 losetup -d",
            backing.display()
        ))
        .status()
        .expect("losetup");
    assert!(status.success());

    // node-2 is refused while the lease may still be alive, then takes it over.
    let first = stage(&c, 1, &id, &st2).await.expect_err("the lease is not yet stale");
    assert_eq!(first.code(), Code::FailedPrecondition, "{first}");
    let deadline = Instant::now() + Duration::from_secs(10 * LEASE_SECONDS);
    loop {
        match stage(&c, 1, &id, &st2).await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
                assert!(Instant::now() < deadline, "the lease was never taken over: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(lease_holder(&c, key_of(&id)).as_deref(), Some("node-2"));
    assert_eq!(std::fs::read(st2.join("before-the-crash")).expect("data"), b"kept");

    // node-1 comes back believing it has the volume staged: it finds the lease lost and says so.
    c.start_node(0);
    let mut n1 = c.node(0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let condition = loop {
        let req = NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: st1.display().to_string(),
            ..Default::default()
        };
        let stats = n1
            .node_get_volume_stats(req)
            .await
            .expect("stats on node-1")
            .into_inner();
        let cond = stats.volume_condition.expect("condition");
        if cond.message.contains("lease") || Instant::now() > deadline {
            break cond;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(condition.abnormal, "{condition:?}");
    assert!(
        condition.message.contains("node-2"),
        "names the new holder: {condition:?}"
    );
    // Kubelet's teardown on node-1 leaves node-2's lease alone.
    unstage(&c, 0, &id, &st1).await.expect("unstage on node-1");
    assert_eq!(lease_holder(&c, key_of(&id)).as_deref(), Some("node-2"));
    let e = stage(&c, 0, &id, &st1).await.expect_err("node-1 cannot take it back");
    assert!(e.message().contains("node-2"), "{e}");

    unstage(&c, 1, &id, &st2).await.expect("unstage on node-2");
    delete(&c, &id).await.expect("delete");
}
