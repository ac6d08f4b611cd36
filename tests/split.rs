//! Split mode end to end: a `cellar controller` and several `cellar node` processes, talking over
//! mutual TLS on loopback addresses, driven as external-provisioner and kubelet drive them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::group_controller_client::GroupControllerClient;
use cellar::csi::v1::node_client::NodeClient;
use cellar::csi::v1::volume_content_source::Type;
use cellar::csi::v1::*;
use common::cluster::{capacity_on, node_topology, wffc, Cluster, Spec};
use common::fs::{loops_under, TestFs};
use common::tree::{assert_is_the_built_tree, assert_same_tree, build_tree, finish, observe, scan};
use common::*;
use tonic::transport::Channel;
use tonic::Code;

async fn stage(node: &mut NodeClient<Channel>, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    stage_rwo(node, id, staging).await
}

async fn unstage(node: &mut NodeClient<Channel>, id: &str, staging: &Path) {
    unstage_from(node, id, staging).await.expect("unstage");
}

#[tokio::test]
async fn wffc_places_the_volume_on_the_selected_node_and_only_that_node_stages_it() {
    let c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let v = ctl
        .create_volume(wffc("pvc-w", 64 * MIB, "node-2", &["node-1", "node-2"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "local:node-2:default:pvc-w");
    assert_eq!(v.accessible_topology, vec![node_topology("node-2")]);
    assert!(
        c.dir.path().join("node-2/pools/default/volumes/pvc-w").is_dir(),
        "made on node-2's disk"
    );
    let st = c.dir.path().join("w-staging");
    let mut wrong = c.node(0).await;
    assert_eq!(
        code(
            wrong
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    staging_target_path: st.display().to_string(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound,
        "node-1 has no such volume"
    );
    let mut right = c.node(1).await;
    stage(&mut right, &v.volume_id, &st).await.unwrap();
    unstage(&mut right, &v.volume_id, &st).await;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!c.dir.path().join("node-2/pools/default/volumes/pvc-w").exists());
}

#[tokio::test]
async fn immediate_binding_picks_the_node_with_most_room_and_a_full_node_is_resource_exhausted() {
    let small = TestFs::new("ext4", 96);
    let c = Cluster::start(Spec::nodes(vec![Some(small.path("pool")), None])).await;
    let mut ctl = c.ctl().await;
    let v = ctl
        .create_volume(create_req("pvc-i", 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "local:node-2:default:pvc-i", "node-2 has more room");
    let full = ctl
        .create_volume(wffc("pvc-big", 512 * MIB, "node-1", &["node-1", "node-2"]))
        .await;
    assert_eq!(code(full), Code::ResourceExhausted, "the selected node lacks space");
    assert!(!small.path("pool/volumes/pvc-big").exists());
    let moved = ctl
        .create_volume(wffc("pvc-big", 512 * MIB, "node-2", &["node-1", "node-2"]))
        .await;
    assert_eq!(code(moved), Code::Ok, "the scheduler's next choice works");
    let caps: Vec<i64> = {
        let mut v = Vec::new();
        for n in ["node-1", "node-2"] {
            v.push(
                ctl.get_capacity(capacity_on(n))
                    .await
                    .unwrap()
                    .into_inner()
                    .available_capacity,
            );
        }
        v
    };
    assert!(
        caps[0] > 0 && caps[0] < 96 * MIB && caps[1] > caps[0],
        "capacity per node: {caps:?}"
    );
}

/// A shared pool's capacity is the share's free room once, as the controller (which serves shared
/// pools) measures it: the nodes' heartbeats also list the shared pools they open, and a node may
/// say anything there (a compromised one "u64::MAX"); every node's report was added to it.
#[tokio::test]
async fn a_shared_pools_capacity_is_counted_once_whatever_the_nodes_report() {
    let share = tempfile::Builder::new()
        .prefix("cellar-test-")
        .tempdir()
        .expect("share");
    let c = Cluster::start(Spec {
        config: Some(format!(
            "pools:\n  - name: default\n  - name: share\n    backend: shared\n    path: {}\n",
            share.path().display()
        )),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let mut ctl = c.ctl().await;
    let free = nix::sys::statvfs::statvfs(share.path()).expect("statvfs");
    let free = free.blocks_available() as i64 * free.fragment_size() as i64;
    for topology in [None, Some(node_topology("node-1"))] {
        let mut r = GetCapacityRequest {
            accessible_topology: topology.clone(),
            ..Default::default()
        };
        r.parameters.insert("pool".into(), "share".into());
        let got = ctl
            .get_capacity(r)
            .await
            .expect("capacity")
            .into_inner()
            .available_capacity;
        assert!(
            got > 0 && got <= free + free / 20,
            "shared capacity {got} for {topology:?}, the share has {free} free"
        );
    }
}

/// ListSnapshots goes on without a node that cannot list (it failed for every node while one was
/// down, hung or answering what it may not); asked for one of that node's snapshots by id, it says
/// the node is unavailable.
#[tokio::test]
async fn list_snapshots_goes_on_without_a_node_that_cannot_list() {
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let on1 = ctl
        .create_volume(wffc("pvc-l1", 16 * MIB, "node-1", &["node-1"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let on2 = ctl
        .create_volume(wffc("pvc-l2", 16 * MIB, "node-2", &["node-2"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let s1 = snapshot(&mut ctl, "snap-l1", &on1.volume_id).await;
    let s2 = snapshot(&mut ctl, "snap-l2", &on2.volume_id).await;
    c.kill_node(1);
    let listed: Vec<String> = ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("listed without node-2")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .map(|s| s.snapshot_id)
        .collect();
    assert_eq!(listed, vec![s1.snapshot_id.clone()]);
    let by_id = ctl
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(by_id), Code::Unavailable, "node-2's own snapshot, asked by id");
    let one = ctl
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .expect("node-1's snapshot by id")
        .into_inner();
    assert_eq!(one.entries.len(), 1);
}

#[tokio::test]
async fn a_dead_node_is_unavailable_the_others_serve_and_it_converges_when_back() {
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let on2 = ctl
        .create_volume(wffc("pvc-2", 16 * MIB, "node-2", &["node-2"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        listed_conditions(&mut ctl).await,
        vec![(on2.volume_id.clone(), false)],
        "listed while node-2 answers"
    );
    c.kill_node(1);
    let e = ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: on2.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("node-2"), "{}", e.message());
    assert!(
        c.dir.path().join("node-2/pools/default/volumes/pvc-2").is_dir(),
        "nothing recorded as done"
    );
    let on1 = ctl.create_volume(wffc("pvc-1", 16 * MIB, "node-1", &["node-1"])).await;
    assert_eq!(code(on1), Code::Ok, "node-1 is unaffected");
    // The dead node's volumes stay listed, abnormal and saying why, both while its connection is
    // refused and once the registry has marked it unavailable for missed heartbeats.
    let on1_id = "local:node-1:default:pvc-1".to_string();
    let deadline = Instant::now() + Duration::from_secs(40);
    for cause in ["Connection refused", "no heartbeat"] {
        loop {
            let got = ctl
                .controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: on2.volume_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(got.volume.unwrap().volume_id, on2.volume_id);
            let cond = got.status.unwrap().volume_condition.unwrap();
            assert!(cond.abnormal, "{cond:?}");
            assert!(
                cond.message.contains("node-2") && cond.message.contains("last listed"),
                "{cond:?}"
            );
            // CSI 1.13 health says the same, with its reason (docs/health.md).
            let health = ctl
                .controller_get_volume_health(ControllerGetVolumeHealthRequest {
                    volume_id: on2.volume_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .volume_health
                .unwrap();
            assert_eq!(health.health_statuses.len(), 1, "{health:?}");
            let entry = &health.health_statuses[0];
            assert_eq!(entry.reason, "NodeUnreachable", "{health:?}");
            assert_eq!(entry.status, VolumeHealthErrorType::Inaccessible as i32);
            assert!(
                entry.message.contains("node-2") && entry.message.contains("last listed"),
                "{health:?}"
            );
            if cond.message.contains(cause) {
                break;
            }
            assert!(Instant::now() < deadline, "never {cause}: {cond:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            listed_conditions(&mut ctl).await,
            vec![(on1_id.clone(), false), (on2.volume_id.clone(), true)],
            "{cause}: node-1's volume as it is, node-2's from its last listing"
        );
        let listed = ctl
            .controller_list_volume_health(ControllerListVolumeHealthRequest::default())
            .await
            .unwrap()
            .into_inner();
        let reasons: Vec<(String, Vec<String>)> = listed
            .entries
            .into_iter()
            .map(|h| (h.volume_id, h.health_statuses.into_iter().map(|e| e.reason).collect()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (on1_id.clone(), vec![]),
                (on2.volume_id.clone(), vec!["NodeUnreachable".to_string()])
            ],
            "{cause}: ControllerListVolumeHealth as ListVolumes"
        );
    }
    c.start_node(1);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match ctl
            .delete_volume(DeleteVolumeRequest {
                volume_id: on2.volume_id.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(s) => assert!(Instant::now() < deadline && s.code() == Code::Unavailable, "{s}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!c.dir.path().join("node-2/pools/default/volumes/pvc-2").exists());
    // A deleted volume is not brought back from the last listing when its node goes away again.
    c.kill_node(1);
    assert_eq!(listed_conditions(&mut ctl).await, vec![(on1_id, false)]);
}

/// A node that fails its listing before it was ever listed (nothing to answer for it with) is left
/// out instead of failing the listing of every node: the others' volumes are listed, and a later
/// outage of those is answered from that listing.
#[tokio::test]
async fn a_node_never_listed_does_not_fail_the_listing_of_the_others() {
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let on2 = made(&mut ctl, wffc("pvc-2", 16 * MIB, "node-2", &["node-2"])).await;
    c.kill_node(0);
    assert_eq!(
        listed_conditions(&mut ctl).await,
        vec![(on2.volume_id.clone(), false)],
        "node-1 is left out, node-2 is listed"
    );
    c.start_node(0);
    c.kill_node(1);
    // node-2's volume comes from the listing above while it is down.
    wait_listed(&mut ctl, vec![(on2.volume_id.clone(), true)]).await;
}

/// A node silent for `--forget-nodes-after` is forgotten by the registry: its volumes stay listed
/// as abnormal from their last listing (never as deleted), calls on them stay UNAVAILABLE naming
/// it, and its next heartbeat brings it back.
#[tokio::test]
async fn a_forgotten_node_keeps_its_volumes_listed_as_abnormal_and_its_calls_unavailable() {
    let mut c = two_nodes(&["--heartbeat-interval", "200ms", "--forget-nodes-after", "2s"]).await;
    let mut ctl = c.ctl().await;
    let on2 = made(&mut ctl, wffc("pvc-2", 16 * MIB, "node-2", &["node-2"])).await;
    assert_eq!(listed_conditions(&mut ctl).await, vec![(on2.volume_id.clone(), false)]);
    c.kill_node(1);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let entries = ctl
            .list_volumes(ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries;
        assert_eq!(entries.len(), 1, "the forgotten node's volume is still listed");
        let cond = entries[0]
            .status
            .clone()
            .and_then(|s| s.volume_condition)
            .expect("condition");
        if cond.message.contains("no longer registered") {
            assert!(cond.abnormal, "{cond:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {cond:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: on2.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("the node is gone, not the volume");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("forgotten by the registry"), "{}", e.message());

    c.start_node(1);
    wait_listed(&mut ctl, vec![(on2.volume_id.clone(), false)]).await;
}

/// Waits (at most 40 s) until ListVolumes gives `want` as (volume id, abnormal) pairs.
async fn wait_listed(ctl: &mut ControllerClient<Channel>, want: Vec<(String, bool)>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = listed_conditions(ctl).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// ListVolumes as (volume id, abnormal) pairs, in the order the controller gives them.
async fn listed_conditions(ctl: &mut ControllerClient<Channel>) -> Vec<(String, bool)> {
    ctl.list_volumes(ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| {
            let abnormal = e.status.and_then(|s| s.volume_condition).expect("a condition").abnormal;
            (e.volume.expect("a volume").volume_id, abnormal)
        })
        .collect()
}

#[tokio::test]
async fn a_restarted_controller_refills_its_registry_and_provisions_again() {
    let mut c = Cluster::start(Spec::nodes(vec![None])).await;
    c.kill_controller();
    c.start_controller();
    let mut ctl = c.ctl().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match ctl.create_volume(wffc("pvc-r", 16 * MIB, "node-1", &["node-1"])).await {
            Ok(r) => {
                assert_eq!(r.into_inner().volume.unwrap().volume_id, "local:node-1:default:pvc-r");
                break;
            }
            Err(s) => assert!(
                Instant::now() < deadline && matches!(s.code(), Code::Unavailable | Code::ResourceExhausted),
                "{s}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let l = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        l.entries.len(),
        1,
        "the node's volumes are listed through the new controller"
    );
}

#[tokio::test]
async fn csi_sanity_passes_in_split_mode() {
    let Some(sanity) = common::sanity::find("split-mode upstream run") else {
        return;
    };
    let c = Cluster::start(Spec::nodes(vec![None])).await;
    let d = c.dir.path();
    common::sanity::judge("split mode", || {
        Command::new("timeout")
            .arg("600")
            .arg(&sanity)
            .arg(format!("--csi.endpoint=unix://{}", d.join("node-1.sock").display()))
            .arg(format!(
                "--csi.controllerendpoint=unix://{}",
                d.join("controller.sock").display()
            ))
            .arg(format!("--csi.mountdir={}", d.join("sanity-mnt").display()))
            .arg(format!("--csi.stagingdir={}", d.join("sanity-stg").display()))
            .arg(format!("--csi.testvolumesize={}", 64 * MIB))
            .arg(format!("--csi.testvolumeexpandsize={}", 96 * MIB))
            .args(["--ginkgo.no-color", "--ginkgo.v"])
            .output()
            .expect("csi-sanity")
    });
}

/// One plain HTTP GET on loopback.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

#[tokio::test]
async fn the_controller_exports_its_registry_size_and_heartbeat_ages() {
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let text = http_get(c.metrics, "/metrics");
    assert!(
        text.contains("cellar_agent_registry_nodes{available=\"true\"} 2"),
        "{text}"
    );
    for node in ["node-1", "node-2"] {
        assert!(
            text.contains(&format!("cellar_agent_heartbeat_age_seconds{{node=\"{node}\"}}")),
            "{text}"
        );
    }
    let mut ctl = c.ctl().await;
    let on2 = ctl
        .create_volume(wffc("pvc-m", 16 * MIB, "node-2", &["node-2"]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.kill_node(1);
    let e = ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: on2.volume_id,
            ..Default::default()
        })
        .await;
    assert_eq!(code(e), Code::Unavailable);
    let text = http_get(c.metrics, "/metrics");
    assert!(
        text.contains("cellar_agent_call_errors_total{node=\"node-2\""),
        "a failed agent call is counted:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = http_get(c.metrics, "/metrics");
        if text.contains("cellar_agent_registry_nodes{available=\"false\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a silent node was never marked unavailable:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Copies between nodes: restore a snapshot, or clone a volume, onto a node other than the source's.

const BOTH: &[&str] = &["node-1", "node-2"];

/// A WaitForFirstConsumer CreateVolume on `selected` with a content source.
fn copy_req(name: &str, bytes: i64, selected: &str, source: Type) -> CreateVolumeRequest {
    let mut r = wffc(name, bytes, selected, BOTH);
    r.volume_content_source = Some(VolumeContentSource { r#type: Some(source) });
    r
}

/// The same request for a raw block volume of the image layout.
fn image(mut r: CreateVolumeRequest) -> CreateVolumeRequest {
    r.volume_capabilities = vec![block_cap(
        cellar::csi::v1::volume_capability::access_mode::Mode::SingleNodeWriter,
    )];
    r.parameters.insert("layout".into(), "image".into());
    r
}

async fn made(ctl: &mut ControllerClient<Channel>, r: CreateVolumeRequest) -> Volume {
    let name = r.name.clone();
    ctl.create_volume(r)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("volume")
}

async fn snapshot(ctl: &mut ControllerClient<Channel>, name: &str, source: &str) -> Snapshot {
    ctl.create_snapshot(CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    })
    .await
    .expect("CreateSnapshot")
    .into_inner()
    .snapshot
    .expect("snapshot")
}

/// The value of one counter in a metrics exposition.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Nothing of volume `name` in a pool: no data, no record, nothing being built, no loop device.
fn assert_nothing_of(pool: &Path, name: &str) {
    for p in [format!("volumes/{name}"), format!("volumes/{name}.json")] {
        assert!(!pool.join(&p).exists(), "{p} was left in {}", pool.display());
    }
    let work: Vec<_> = std::fs::read_dir(pool.join(".work"))
        .expect(".work")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(work.is_empty(), "left in .work: {work:?}");
    assert_eq!(loops_under(pool), Vec::<String>::new(), "loop devices left");
}

/// Bytes that differ from offset to offset, so a chunk written at the wrong place is caught.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed as usize) % 251) as u8 + 1).collect()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image")
        .write_all_at(data, offset)
        .expect("write image");
}

/// Where the first data at or after `offset` starts (SEEK_DATA).
fn next_data(path: &Path, offset: i64) -> i64 {
    use std::os::fd::AsFd;
    let f = std::fs::File::open(path).expect("open");
    nix::unistd::lseek(f.as_fd(), offset, nix::unistd::Whence::SeekData).expect("SEEK_DATA")
}

fn blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks()
}

const IMAGE_BYTES: i64 = 64 * MIB;
/// Image data: 9 MiB at the start (more chunks than the crash point waits for), a hole, 4 KiB at 40 MiB.
const HEAD: usize = 9 << 20;
const TAIL_AT: u64 = 40 << 20;

fn fill_image(path: &Path) {
    write_at(path, 0, &pattern(HEAD, 1));
    write_at(path, TAIL_AT, &pattern(4096, 2));
}

/// A copy of `fill_image`'s image: the same length, the same bytes, and the hole still a hole.
fn assert_same_image(source: &Path, copy: &Path) {
    let (a, b) = (
        std::fs::read(source).expect("source"),
        std::fs::read(copy).expect("copy"),
    );
    assert_eq!(b.len() as i64, IMAGE_BYTES, "the copy's length");
    assert!(a == b, "the copy's bytes differ from the source's");
    assert_eq!(&b[..HEAD], pattern(HEAD, 1).as_slice(), "the source was filled");
    assert_eq!(
        next_data(copy, HEAD as i64),
        TAIL_AT as i64,
        "the hole was filled in the copy"
    );
    let (src, dst) = (blocks(source), blocks(copy));
    assert!(
        dst <= src + 64,
        "the copy has {dst} blocks allocated, its source {src}: holes were not kept"
    );
}

/// Builds the full tree in a new volume on node-1, snapshots it, restores the snapshot onto
/// node-2, and checks the copy entry by entry. Returns the snapshot and the copy's data.
async fn restore_tree_onto_node_2(c: &Cluster, ctl: &mut ControllerClient<Channel>) -> (Snapshot, PathBuf) {
    let src = made(ctl, wffc("src", 64 * MIB, "node-1", BOTH)).await;
    let root = c.pool_dir(0).join("volumes/src");
    build_tree(&root);
    let tree = scan(&root);
    let snap = snapshot(ctl, "snap", &src.volume_id).await;
    let expected = finish(&root, tree);
    assert_is_the_built_tree(&expected);
    let req = copy_req("restored", 64 * MIB, "node-2", from_snapshot(&snap.snapshot_id));
    let restored = made(ctl, req.clone()).await;
    assert_eq!(restored.volume_id, "local:node-2:default:restored");
    assert_eq!(restored.accessible_topology, vec![node_topology("node-2")]);
    let copy = c.pool_dir(1).join("volumes/restored");
    assert_same_tree(&expected, &observe(&copy));
    assert!(
        c.log_of(1).contains("import from another node started"),
        "the copy was streamed to node-2"
    );
    let again = made(ctl, req).await;
    assert_eq!(again.volume_id, restored.volume_id, "a retry returns the same volume");
    let exported = http_get(c.node_metrics[0], "/metrics");
    assert!(
        exported.contains("cellar_transfers_total{direction=\"export\",result=\"complete\"} 1"),
        "{exported}"
    );
    let imported = http_get(c.node_metrics[1], "/metrics");
    assert!(
        imported.contains("cellar_transfers_total{direction=\"import\",result=\"complete\"} 1"),
        "{imported}"
    );
    let sent = counter(&exported, "cellar_transfer_bytes_total{direction=\"export\"}");
    let received = counter(&imported, "cellar_transfer_bytes_total{direction=\"import\"}");
    assert_eq!(sent, received, "bytes sent and received");
    assert!(
        (4096..1 << 20).contains(&received),
        "the data of the files, without the 1 GiB file's hole: {received} bytes"
    );
    (snap, copy)
}

/// Builds the full tree in a new volume on node-1 and clones the live volume (read without
/// unmounting it) onto node-2, checking the copy entry by entry.
async fn clone_tree_onto_node_2(c: &Cluster, ctl: &mut ControllerClient<Channel>) {
    let live = made(ctl, wffc("live", 64 * MIB, "node-1", BOTH)).await;
    let root = c.pool_dir(0).join("volumes/live");
    build_tree(&root);
    let tree = scan(&root);
    let cloned = made(
        ctl,
        copy_req("cloned", 64 * MIB, "node-2", from_volume(&live.volume_id)),
    )
    .await;
    let expected = finish(&root, tree);
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    assert_same_tree(&expected, &observe(&c.pool_dir(1).join("volumes/cloned")));
}

#[tokio::test]
async fn dir_restore_and_clone_onto_another_node_keep_every_property() {
    let c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let (snap, _) = restore_tree_onto_node_2(&c, &mut ctl).await;
    clone_tree_onto_node_2(&c, &mut ctl).await;

    // Where the source's node may take the copy, it stays a local copy.
    let near = made(
        &mut ctl,
        copy_req("near", 64 * MIB, "node-1", from_snapshot(&snap.snapshot_id)),
    )
    .await;
    assert_eq!(near.volume_id, "local:node-1:default:near");
    assert!(
        !c.log_of(0).contains("import from another node started"),
        "node-1 imported nothing"
    );
}

#[tokio::test]
async fn image_restore_and_clone_onto_another_node_keep_bytes_holes_and_length() {
    let c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, image(wffc("src", IMAGE_BYTES, "node-1", BOTH))).await;
    let img = c.pool_dir(0).join("volumes/src");
    fill_image(&img);
    let snap = snapshot(&mut ctl, "snap", &src.volume_id).await;
    let restored = made(
        &mut ctl,
        image(copy_req(
            "restored",
            IMAGE_BYTES,
            "node-2",
            from_snapshot(&snap.snapshot_id),
        )),
    )
    .await;
    assert_eq!(restored.volume_id, "local:node-2:default:restored");
    assert_same_image(&img, &c.pool_dir(1).join("volumes/restored"));

    let cloned = made(
        &mut ctl,
        image(copy_req("cloned", IMAGE_BYTES, "node-2", from_volume(&src.volume_id))),
    )
    .await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    assert_same_image(&img, &c.pool_dir(1).join("volumes/cloned"));

    // A copy larger than its source gets the capacity it asked for.
    let larger = made(
        &mut ctl,
        image(copy_req(
            "larger",
            2 * IMAGE_BYTES,
            "node-2",
            from_volume(&src.volume_id),
        )),
    )
    .await;
    assert_eq!(larger.capacity_bytes, 2 * IMAGE_BYTES);
    let grown = c.pool_dir(1).join("volumes/larger");
    assert_eq!(std::fs::metadata(&grown).expect("stat").len() as i64, 2 * IMAGE_BYTES);
    assert_eq!(
        std::fs::read(&grown).expect("read")[..HEAD],
        pattern(HEAD, 1)[..],
        "the larger copy holds the source's data"
    );
}

#[tokio::test]
async fn an_image_filesystem_cloned_onto_another_node_mounts_there_with_its_files() {
    let c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let mut ctl = c.ctl().await;
    let with_image = |mut r: CreateVolumeRequest| {
        r.parameters.insert("layout".into(), "image".into());
        r
    };
    let src = made(&mut ctl, with_image(wffc("src", 64 * MIB, "node-1", BOTH))).await;
    let (mut n1, mut n2) = (c.node(0).await, c.node(1).await);
    let st1 = c.dir.path().join("staging-1");
    stage(&mut n1, &src.volume_id, &st1).await.expect("stage on node-1");
    std::fs::write(st1.join("greeting"), b"written on node-1\n").expect("write");
    unstage(&mut n1, &src.volume_id, &st1).await;

    let cloned = made(
        &mut ctl,
        with_image(copy_req("cloned", 64 * MIB, "node-2", from_volume(&src.volume_id))),
    )
    .await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    let st2 = c.dir.path().join("staging-2");
    stage(&mut n2, &cloned.volume_id, &st2)
        .await
        .expect("stage the copy on node-2");
    let read = std::fs::read(st2.join("greeting"));
    unstage(&mut n2, &cloned.volume_id, &st2).await;
    assert_eq!(read.expect("the file is in the copy"), b"written on node-1\n");
    assert_eq!(loops_under(c.dir.path()), Vec::<String>::new(), "loop devices left");
}

#[tokio::test]
async fn btrfs_restore_and_clone_onto_another_node_keep_every_property() {
    let (a, b) = (TestFs::new("btrfs", 320), TestFs::new("btrfs", 320));
    let c = Cluster::start(Spec {
        layouts: Some("btrfs"),
        ..Spec::nodes(vec![Some(a.path("pool")), Some(b.path("pool"))])
    })
    .await;
    let mut ctl = c.ctl().await;
    let (_, restored) = restore_tree_onto_node_2(&c, &mut ctl).await;
    assert!(
        cellar::sys::btrfs::is_subvolume(&restored).expect("subvolume check"),
        "the copy is a subvolume"
    );
    clone_tree_onto_node_2(&c, &mut ctl).await;
    let work: Vec<_> = std::fs::read_dir(c.pool_dir(0).join(".work"))
        .expect(".work")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(work.is_empty(), "the export's read-only snapshot was left: {work:?}");
}

/// A cluster of two nodes whose pools allow images, with a filled image volume on node-1 and the
/// request that clones it onto node-2.
async fn image_to_clone() -> (Cluster, PathBuf, CreateVolumeRequest) {
    if !cfg!(feature = "crash-points") {
        panic!("this test needs the crash points: run it with `cargo test --features crash-points`");
    }
    let c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let src = made(&mut c.ctl().await, image(wffc("src", IMAGE_BYTES, "node-1", BOTH))).await;
    let img = c.pool_dir(0).join("volumes/src");
    fill_image(&img);
    let req = image(copy_req("cloned", IMAGE_BYTES, "node-2", from_volume(&src.volume_id)));
    (c, img, req)
}

/// Repeats `req` until node `i` has died at its crash point `point` (while it starts, its agent
/// refuses connections: UNAVAILABLE); the answer of the call it died in.
async fn crashed_by(c: &Cluster, i: usize, point: &str, req: &CreateVolumeRequest) -> tonic::Status {
    let mut ctl = c.ctl().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let e = ctl
            .create_volume(req.clone())
            .await
            .expect_err("a node dies mid-transfer");
        if c.log_of(i).contains(&format!("crash point {point} reached")) {
            return e;
        }
        assert!(Instant::now() < deadline && e.code() == Code::Unavailable, "{e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_transfer_broken_by_the_source_node_dying_leaves_nothing_and_the_retry_starts_over() {
    let (mut c, img, req) = image_to_clone().await;
    c.kill_node(0);
    c.start_node_with(0, &[("CELLAR_CRASH_AT", "export:mid-stream")]);
    let broken = crashed_by(&c, 0, "export:mid-stream", &req).await;
    assert_eq!(broken.code(), Code::Unavailable, "{broken}");
    assert!(broken.message().contains("node-1"), "{}", broken.message());
    assert!(
        c.log_of(1).contains("import from another node started"),
        "node-2 had begun the import:\n{}",
        c.log_of(1)
    );
    assert_nothing_of(&c.pool_dir(1), "cloned");

    c.kill_node(0);
    c.start_node(0);
    let cloned = retried(&c, req.clone()).await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    assert_same_image(&img, &c.pool_dir(1).join("volumes/cloned"));
    assert_eq!(
        made(&mut c.ctl().await, req).await.volume_id,
        cloned.volume_id,
        "a retry returns the same volume"
    );
}

#[tokio::test]
async fn a_copy_to_a_node_without_room_is_resource_exhausted_and_leaves_nothing() {
    let small = TestFs::new("ext4", 96);
    let c = Cluster::start(Spec::nodes(vec![None, Some(small.path("pool"))])).await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, wffc("src", 128 * MIB, "node-1", BOTH)).await;
    std::fs::write(c.pool_dir(0).join("volumes/src/data"), pattern(4096, 3)).expect("write");
    let snap = snapshot(&mut ctl, "snap", &src.volume_id).await;
    let e = ctl
        .create_volume(copy_req("big", 128 * MIB, "node-2", from_snapshot(&snap.snapshot_id)))
        .await
        .expect_err("node-2 has 96 MiB");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert_nothing_of(&c.pool_dir(1), "big");
}

/// What of snapshot `name` a node's pool holds: its data, its record, anything in `.work`.
fn snapshot_leftovers(pool: &Path, name: &str) -> Vec<String> {
    let mut left: Vec<String> = [format!("snapshots/{name}"), format!("snapshots/{name}.json")]
        .into_iter()
        .filter(|p| pool.join(p).exists())
        .collect();
    let work = std::fs::read_dir(pool.join(".work")).expect(".work").flatten();
    left.extend(work.map(|e| format!(".work/{}", e.file_name().to_string_lossy())));
    left
}

/// A volume whose tree is deeper than a copy takes is the caller's to fix, through the controller
/// as on one node: CreateSnapshot (answered by the volume's node over the agent wire) and a clone
/// onto another node (the source node's walk fails mid-stream; its error crosses two agent calls)
/// answer FAILED_PRECONDITION, not INTERNAL, leave nothing on either node, and succeed once the
/// workload flattens the tree.
#[tokio::test]
async fn a_copy_of_a_tree_too_deep_is_failed_precondition_through_the_controller_and_leaves_nothing() {
    let c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, wffc("src", 16 * MIB, "node-1", BOTH)).await;
    let deepest = c
        .pool_dir(0)
        .join("volumes/src")
        .join(std::iter::repeat_n("d", 1000).collect::<PathBuf>());
    std::fs::create_dir_all(deepest.join("too-deep")).expect("mkdir");
    std::fs::write(deepest.join("too-deep/file"), b"deep").expect("write");
    // The source's refusal, naming its volume: not the target's, naming where it built the copy.
    let refused = |e: tonic::Status, what: &str| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e}");
        for words in [
            "deeper than 1000 levels",
            "flatten it",
            "/node-1/pools/default/volumes/src",
        ] {
            assert!(e.message().contains(words), "{what}: {e}");
        }
    };

    let snap = CreateSnapshotRequest {
        name: "snap".into(),
        source_volume_id: src.volume_id.clone(),
        ..Default::default()
    };
    refused(
        ctl.create_snapshot(snap.clone()).await.expect_err("too deep"),
        "CreateSnapshot",
    );
    assert_eq!(snapshot_leftovers(&c.pool_dir(0), "snap"), Vec::<String>::new());
    let clone = copy_req("cloned", 16 * MIB, "node-2", from_volume(&src.volume_id));
    refused(
        ctl.create_volume(clone.clone()).await.expect_err("too deep"),
        "the clone",
    );
    assert_nothing_of(&c.pool_dir(1), "cloned");
    assert_eq!(snapshot_leftovers(&c.pool_dir(0), "cloned"), Vec::<String>::new());

    std::fs::rename(deepest.join("too-deep/file"), deepest.join("file")).expect("flatten");
    std::fs::remove_dir(deepest.join("too-deep")).expect("flatten");
    ctl.create_snapshot(snap).await.expect("CreateSnapshot once flattened");
    made(&mut ctl, clone).await;
    let copied = c
        .pool_dir(1)
        .join("volumes/cloned")
        .join(deepest.strip_prefix(c.pool_dir(0).join("volumes/src")).expect("below"));
    assert_eq!(
        std::fs::read(copied.join("file")).expect("the bottom was copied"),
        b"deep"
    );
}

#[tokio::test]
async fn a_copy_from_an_unreachable_node_is_unavailable_naming_it_and_leaves_nothing() {
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, wffc("src", 16 * MIB, "node-1", BOTH)).await;
    let snap = snapshot(&mut ctl, "snap", &src.volume_id).await;
    c.kill_node(0);
    let e = ctl
        .create_volume(copy_req(
            "restored",
            16 * MIB,
            "node-2",
            from_snapshot(&snap.snapshot_id),
        ))
        .await
        .expect_err("node-1 is down");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("node-1"), "{}", e.message());
    assert_nothing_of(&c.pool_dir(1), "restored");
}

mod import {
    //! The target's side of a transfer, on one engine: every check refuses a stream that is not
    //! the source's whole, and leaves nothing behind.

    use std::path::{Path, PathBuf};

    use cellar::storage::config::Config;
    use cellar::storage::engine::{CapacityRange, LocalEngine, NewVolume, Source};
    use cellar::storage::id::{NodeId, VolumeId};
    use cellar::storage::record::{Layout, VolumeMode};
    use cellar::storage::transfer::{Frame, Header};
    use cellar::storage::StorageError;
    use cellar::sys::tree::Meta;
    use tonic::{Code, Status};

    use super::{assert_nothing_of, pattern, require_root};

    fn request(name: &str, source: Option<Source>) -> NewVolume {
        NewVolume {
            name: name.into(),
            pool: None,
            layout: None,
            capacity: Default::default(),
            mode: VolumeMode::Filesystem,
            access_modes: vec![],
            fs_type: String::new(),
            parameters: Default::default(),
            source,
            delete_policy: None,
            mutable: Default::default(),
            owner: Default::default(),
        }
    }

    fn import(engine: &LocalEngine, name: &str, src: &Source, frames: Vec<Frame>) -> Result<String, StorageError> {
        let mut it = frames.into_iter().map(Ok);
        engine
            .import_volume(request(name, Some(src.clone())), &mut it)
            .map(|r| r.id.to_string())
    }

    /// Refused by the stream's checks (ABORTED) or by the tree writer (INTERNAL, EINVAL: a name
    /// that is not one path component, a link to no file, an entry after the root).
    fn aborted_or_refused(r: Result<String, StorageError>, why: &str) {
        let e = r.expect_err(why);
        let code = Status::from(e).code();
        assert!(matches!(code, Code::Aborted | Code::Internal), "{why}: {code:?}");
    }

    /// An engine with the default pool in a test directory (kept while the directory lives), and
    /// the pool's path.
    fn engine() -> (tempfile::TempDir, LocalEngine, PathBuf) {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-")
            .tempdir()
            .expect("tempdir");
        let engine = LocalEngine::open(NodeId::parse("node-1").expect("node"), &Config::default_for(dir.path()))
            .expect("engine");
        let pool = dir.path().join("pools/default");
        (dir, engine, pool)
    }

    fn aborted(r: Result<String, StorageError>, why: &str) {
        let e = r.expect_err(why);
        assert_eq!(Status::from(e).code(), Code::Aborted, "{why}");
    }

    #[test]
    fn a_stream_naming_anything_outside_the_new_volume_is_refused() {
        let (_dir, engine, pool) = engine();
        let src = Source::Volume(VolumeId::parse("local:node-2:default:elsewhere").expect("id"));
        let header = Frame::Header(Header {
            layout: Layout::Dir,
            mode: VolumeMode::Filesystem,
            capacity_bytes: 1 << 20,
            fs_bytes: 0,
            length: 0,
        });
        let file = |name: &[u8]| Frame::File {
            name: name.to_vec(),
            meta: Meta::default(),
            size: 0,
            link: None,
        };
        for bad in [
            vec![header.clone(), Frame::Dir { name: b"..".to_vec() }],
            vec![header.clone(), file(b"../escaped")],
            vec![header.clone(), file(b"/tmp/escaped")],
            vec![header.clone(), file(b"")],
            vec![
                header.clone(),
                Frame::HardLink {
                    name: b"x".to_vec(),
                    link: 7,
                },
            ],
            vec![
                header.clone(),
                Frame::Leave { meta: Meta::default() },
                file(b"after-the-root"),
            ],
        ] {
            let what = format!("{:?}", &bad[1..]);
            aborted_or_refused(import(&engine, "copy", &src, bad), &what);
            assert_nothing_of(&pool, "copy");
            assert!(!pool.join("volumes/escaped").exists(), "{what}");
        }
    }

    /// An image that comes from another node (or a backup) is recorded as not yet grown, whatever
    /// size its header says its filesystem has: its first read-write stage then checks it
    /// (`e2fsck -f -p`) before the kernel mounts it. A sender claiming the filesystem already
    /// fills the volume made the stage mount it unchecked.
    #[test]
    fn an_imported_image_is_checked_at_its_first_stage_whatever_its_header_claims() {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("cellar-test-")
            .tempdir()
            .expect("tempdir");
        let mut config = Config::default_for(dir.path());
        config.pools[0].layouts = vec![Layout::Dir, Layout::Image];
        let engine = LocalEngine::open(NodeId::parse("node-1").expect("node"), &config).expect("engine");
        let mut spec = request("img", None);
        spec.layout = Some(Layout::Image);
        spec.capacity = CapacityRange {
            required: 64 << 20,
            limit: 0,
        };
        let src = engine.create_volume(spec).expect("an image volume");
        assert_eq!(src.fs_bytes, 64 << 20, "a new image's filesystem fills it");
        let src = Source::Volume(src.id.clone());
        let mut frames = Vec::new();
        engine
            .export(&src, &mut |f| {
                frames.push(f);
                Ok(())
            })
            .expect("export");
        let Some(Frame::Header(h)) = frames.first() else {
            panic!("a header first");
        };
        assert_eq!(h.fs_bytes, 64 << 20);
        let mut copy = request("copy", Some(src.clone()));
        copy.layout = Some(Layout::Image);
        let id = engine
            .import_volume(copy, &mut frames.into_iter().map(Ok))
            .expect("import")
            .id
            .to_string();
        let copy = engine.volume(&VolumeId::parse(&id).expect("id")).expect("the copy");
        assert_eq!(copy.fs_bytes, 0, "checked and grown at its first stage");
        assert_eq!(
            copy.fs_type, "ext4",
            "the source's filesystem, found in the image itself"
        );
    }

    #[test]
    fn a_stream_altered_or_cut_short_is_refused_and_leaves_nothing() {
        let (_dir, engine, pool) = engine();
        let src = engine.create_volume(request("src", None)).expect("source");
        let root = pool.join("volumes/src");
        std::fs::write(root.join("big"), pattern(3 << 20, 4)).expect("write");
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::os::unix::fs::symlink("../big", root.join("sub/link")).expect("symlink");
        let src = Source::Volume(src.id.clone());
        let mut frames = Vec::new();
        engine
            .export(&src, &mut |f| {
                frames.push(f);
                Ok(())
            })
            .expect("export");
        let chunks = frames.iter().filter(|f| matches!(f, Frame::Chunk { .. })).count();
        assert!(chunks >= 3, "3 MiB come in chunks: {chunks}");

        let mut flipped = frames.clone();
        if let Some(Frame::Chunk { data, .. }) = flipped.iter_mut().find(|f| matches!(f, Frame::Chunk { .. })) {
            data[100] ^= 0xff;
        }
        aborted(import(&engine, "copy", &src, flipped), "a flipped byte");
        assert_nothing_of(&pool, "copy");

        let mut dropped = frames.clone();
        let second = dropped
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f, Frame::Chunk { .. }))
            .nth(1)
            .map(|(i, _)| i)
            .expect("a second chunk");
        dropped.remove(second);
        aborted(import(&engine, "copy", &src, dropped), "a lost chunk");
        assert_nothing_of(&pool, "copy");

        for keep in [frames.len() - 1, frames.len() / 2, 1] {
            aborted(
                import(&engine, "copy", &src, frames[..keep].to_vec()),
                "a stream cut short",
            );
            assert_nothing_of(&pool, "copy");
        }

        let id = import(&engine, "copy", &src, frames.clone()).expect("the whole stream");
        let copy = pool.join("volumes/copy");
        assert_eq!(std::fs::read(copy.join("big")).expect("read"), pattern(3 << 20, 4));
        assert_eq!(
            std::fs::read_link(copy.join("sub/link")).expect("readlink"),
            Path::new("../big")
        );
        assert_eq!(
            import(&engine, "copy", &src, Vec::new()).expect("made already"),
            id,
            "a retry returns the volume without reading a stream"
        );
    }
}

/// Waits until a copy made after a crash succeeds; until the restarted process is up, the calls
/// answer UNAVAILABLE (or ABORTED while the broken transfer still unwinds).
async fn retried(c: &Cluster, req: CreateVolumeRequest) -> Volume {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match c.ctl().await.create_volume(req.clone()).await {
            Ok(r) => return r.into_inner().volume.expect("volume"),
            Err(e) => assert!(
                Instant::now() < deadline && matches!(e.code(), Code::Unavailable | Code::Aborted),
                "{e}\n{}",
                c.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `check` holds; a broken connection is noticed by the far end a moment later.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn nothing_of(pool: &Path, name: &str) -> bool {
    !pool.join(format!("volumes/{name}")).exists()
        && !pool.join(format!("volumes/{name}.json")).exists()
        && std::fs::read_dir(pool.join(".work")).is_ok_and(|mut d| d.next().is_none())
}

#[tokio::test]
async fn a_transfer_broken_by_the_controller_dying_leaves_nothing_and_the_retry_starts_over() {
    let (mut c, img, req) = image_to_clone().await;
    c.kill_controller();
    // Only a relaying controller holds the data mid-transfer (nodes pull from each other otherwise).
    c.spec.controller_args.push("--node-transfers=via-controller".into());
    c.start_controller_with(&[("CELLAR_CRASH_AT", "transfer:mid-pipe")]);
    c.wait_registered().await;
    let e = c
        .ctl()
        .await
        .create_volume(req.clone())
        .await
        .expect_err("the controller dies mid-transfer");
    let log = std::fs::read_to_string(c.dir.path().join("controller.log")).unwrap_or_default();
    assert!(log.contains("crash point transfer:mid-pipe reached"), "{e}\n{log}");
    assert!(
        c.log_of(1).contains("import from another node started"),
        "node-2 had begun the import"
    );
    let pool = c.pool_dir(1);
    eventually("node-2 removes the broken import", || nothing_of(&pool, "cloned")).await;
    assert_nothing_of(&pool, "cloned");

    c.kill_controller();
    c.start_controller();
    c.wait_registered().await;
    let cloned = retried(&c, req).await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    assert_same_image(&img, &c.pool_dir(1).join("volumes/cloned"));
}

/// A copy that was whole and in place on its target when the target died, before its record: the
/// retry finishes it even though the pool could not hold a second copy beside it.
#[tokio::test]
async fn an_import_in_place_without_its_record_is_finished_by_the_retry_on_a_nearly_full_node() {
    if !cfg!(feature = "crash-points") {
        panic!("this test needs the crash points: run it with `cargo test --features crash-points`");
    }
    let small = TestFs::new("ext4", 96);
    let mut c = Cluster::start(Spec {
        layouts: Some("dir, image"),
        ..Spec::nodes(vec![None, Some(small.path("pool"))])
    })
    .await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, image(wffc("src", IMAGE_BYTES, "node-1", BOTH))).await;
    let img = c.pool_dir(0).join("volumes/src");
    write_at(&img, 0, &pattern(40 << 20, 4));
    let req = image(copy_req("cloned", IMAGE_BYTES, "node-2", from_volume(&src.volume_id)));
    c.kill_node(1);
    c.start_node_with(1, &[("CELLAR_CRASH_AT", "create-volume:before-record")]);
    let broken = crashed_by(&c, 1, "create-volume:before-record", &req).await;
    assert_eq!(broken.code(), Code::Unavailable, "{broken}");
    let pool = c.pool_dir(1);
    assert!(
        pool.join("volumes/cloned").is_file() && !pool.join("volumes/cloned.json").exists(),
        "the crash left the copy in place without its record"
    );

    c.kill_node(1);
    c.start_node(1);
    let cloned = retried(&c, req).await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    let (a, b) = (
        std::fs::read(&img).expect("source"),
        std::fs::read(pool.join("volumes/cloned")).expect("copy"),
    );
    assert!(a == b, "the finished copy differs from its source");
    assert!(pool.join("volumes/cloned.json").is_file());
}

#[tokio::test]
async fn a_transfer_broken_by_the_target_node_dying_leaves_nothing_once_it_restarts() {
    let (mut c, img, req) = image_to_clone().await;
    c.kill_node(1);
    c.start_node_with(1, &[("CELLAR_CRASH_AT", "import:mid-stream")]);
    let broken = crashed_by(&c, 1, "import:mid-stream", &req).await;
    assert_eq!(broken.code(), Code::Unavailable, "{broken}");
    assert!(broken.message().contains("node-2"), "{}", broken.message());
    assert!(
        !c.pool_dir(1).join("volumes/cloned.json").exists(),
        "no record of a volume that was not made"
    );

    c.kill_node(1);
    c.start_node(1);
    let pool = c.pool_dir(1);
    eventually("node-2 clears the half-made copy at its start", || {
        nothing_of(&pool, "cloned")
    })
    .await;
    assert_nothing_of(&pool, "cloned");
    let cloned = retried(&c, req).await;
    assert_eq!(cloned.volume_id, "local:node-2:default:cloned");
    assert_same_image(&img, &c.pool_dir(1).join("volumes/cloned"));
}

// ---------------------------------------------------------------------------------------------
// Changed block tracking (docs/cbt.md): the controller answers for a node's snapshots through its
// agent (BlockRanges), with the codes the node's engine chose.

/// One SnapshotMetadata answer through the controller: its ranges, or the code it failed with.
async fn block_ranges(
    c: &Cluster,
    base: Option<&str>,
    target: &str,
    starting_offset: i64,
) -> Result<Vec<(u64, u64)>, Code> {
    use cellar::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
    let mut client = SnapshotMetadataClient::new(c.channel("controller.sock").await);
    let mut ranges = Vec::new();
    let mut push = |capacity: i64, blocks: Vec<BlockMetadata>| {
        assert_eq!(capacity, IMAGE_BYTES);
        ranges.extend(blocks.iter().map(|b| (b.byte_offset as u64, b.size_bytes as u64)));
    };
    if let Some(base) = base {
        let req = GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset,
            max_results: 2,
            ..Default::default()
        };
        let mut s = client.get_metadata_delta(req).await.map_err(|s| s.code())?.into_inner();
        while let Some(m) = s.message().await.map_err(|s| s.code())? {
            push(m.volume_capacity_bytes, m.block_metadata);
        }
    } else {
        let req = GetMetadataAllocatedRequest {
            snapshot_id: target.into(),
            starting_offset,
            max_results: 2,
            ..Default::default()
        };
        let mut s = client
            .get_metadata_allocated(req)
            .await
            .map_err(|s| s.code())?
            .into_inner();
        while let Some(m) = s.message().await.map_err(|s| s.code())? {
            push(m.volume_capacity_bytes, m.block_metadata);
        }
    }
    Ok(ranges)
}

#[tokio::test]
async fn a_nodes_snapshots_get_their_changed_blocks_through_the_controller() {
    let fs = TestFs::new("xfs", 512);
    let c = Cluster::start(Spec {
        pools: vec![Some(fs.path("pool")), None],
        layouts: Some("dir, image"),
        ..Spec::default()
    })
    .await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, image(wffc("src", IMAGE_BYTES, "node-1", BOTH))).await;
    let img = c.pool_dir(0).join("volumes/src");
    fill_image(&img);
    let base = snapshot(&mut ctl, "snap-1", &src.volume_id).await.snapshot_id;
    write_at(&img, 1 << 20, &pattern(8192, 3));
    write_at(&img, 20 << 20, &pattern(4096, 4));
    let target = snapshot(&mut ctl, "snap-2", &src.volume_id).await.snapshot_id;

    // The pool is xfs: the reflinked snapshots share all but the blocks written in between.
    let changed = block_ranges(&c, Some(&base), &target, 0)
        .await
        .expect("GetMetadataDelta");
    assert_eq!(changed, [(1 << 20, 8192), (20 << 20, 4096)]);
    let allocated = block_ranges(&c, None, &target, 0).await.expect("GetMetadataAllocated");
    assert_eq!(allocated, [(0, HEAD as u64), (20 << 20, 4096), (TAIL_AT, 4096)]);
    let later = block_ranges(&c, None, &target, (30 << 20) as i64)
        .await
        .expect("resumed");
    assert_eq!(later, [(TAIL_AT, 4096)]);

    // The node's refusals keep their codes across the agent call.
    let other = made(&mut ctl, image(wffc("other", IMAGE_BYTES, "node-1", BOTH))).await;
    let elsewhere = snapshot(&mut ctl, "snap-other", &other.volume_id).await.snapshot_id;
    assert_eq!(
        block_ranges(&c, Some(&elsewhere), &target, 0).await.err(),
        Some(Code::InvalidArgument)
    );
    let unknown = target.replace("snap-2", "snap-nobody");
    assert_eq!(block_ranges(&c, None, &unknown, 0).await.err(), Some(Code::NotFound));
    assert_eq!(
        block_ranges(&c, None, &target, IMAGE_BYTES).await.err(),
        Some(Code::OutOfRange)
    );
    let tree = made(&mut ctl, wffc("tree", IMAGE_BYTES, "node-1", BOTH)).await;
    let tree_snap = snapshot(&mut ctl, "snap-tree", &tree.volume_id).await.snapshot_id;
    assert_eq!(
        block_ranges(&c, None, &tree_snap, 0).await.err(),
        Some(Code::FailedPrecondition)
    );
    // A base on another node cannot be a snapshot of the same volume.
    let far = made(&mut ctl, image(wffc("far", IMAGE_BYTES, "node-2", BOTH))).await;
    let far_snap = snapshot(&mut ctl, "snap-far", &far.volume_id).await.snapshot_id;
    assert_eq!(
        block_ranges(&c, Some(&far_snap), &target, 0).await.err(),
        Some(Code::InvalidArgument)
    );
}

/// A SnapshotMetadata client on the controller's socket whose streams take at most 64 KiB before
/// they are read (grpc-go's window, as the csi-snapshot-metadata sidecar's), and whose connection
/// would hold far more (it is never the one that gives up).
async fn metadata_client(c: &Cluster) -> cellar::csi::v1::snapshot_metadata_client::SnapshotMetadataClient<Channel> {
    let path = c.dir.path().join("controller.sock");
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .initial_stream_window_size(65535)
        .initial_connection_window_size(1 << 30)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    cellar::csi::v1::snapshot_metadata_client::SnapshotMetadataClient::new(channel)
}

/// A GetMetadataAllocated of one range a message (`max_results` 1, as any client may ask).
async fn one_range_a_message(c: &Cluster, snapshot_id: &str) -> tonic::Streaming<GetMetadataAllocatedResponse> {
    let req = GetMetadataAllocatedRequest {
        snapshot_id: snapshot_id.into(),
        max_results: 1,
        ..Default::default()
    };
    metadata_client(c)
        .await
        .get_metadata_allocated(req)
        .await
        .expect("GetMetadataAllocated")
        .into_inner()
}

/// A one-node cluster with an image volume `frag` of `bytes` whose every other 4 KiB block is
/// written: a changed block answer of `bytes / 8192` ranges.
async fn fragmented_image(bytes: i64) -> (Cluster, ControllerClient<Channel>, Volume) {
    let c = Cluster::start(Spec {
        pools: vec![None],
        layouts: Some("dir, image"),
        ..Spec::default()
    })
    .await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, image(wffc("frag", bytes, "node-1", &["node-1"]))).await;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.pool_dir(0).join("volumes/frag"))
        .expect("open image");
    let block = [7u8; 4096];
    for i in 0..(bytes as u64 / 8192) {
        f.write_all_at(&block, i * 8192).expect("write image");
    }
    f.sync_all().expect("fsync");
    (c, ctl, src)
}

/// A backup tool that holds its changed block answer open without reading it (hung, or slow: it
/// reads each range's data before it takes the next message) must cost nobody else anything. The
/// node sent one small message a batch, and the controller's HTTP/2 client, holding thousands
/// of them unread, closed its connection to the node (ENHANCE_YOUR_CALM, "too_many_data_frames"):
/// every call in flight to that node failed with it, here another client's answer read as it
/// should be.
#[tokio::test]
async fn an_unread_metadata_answer_breaks_no_other_call_to_the_node() {
    const BYTES: i64 = 256 * MIB;
    const RANGES: usize = (BYTES / 8192) as usize;
    // Every other 4 KiB block: 32768 ranges.
    let (c, mut ctl, src) = fragmented_image(BYTES).await;
    let snap = snapshot(&mut ctl, "snap-frag", &src.volume_id).await.snapshot_id;

    // A client that reads its answer to the end, steadily, for several seconds.
    let mut good = one_range_a_message(&c, &snap).await;
    let reader = tokio::spawn(async move {
        let mut ranges = 0;
        while let Some(m) = good.message().await? {
            ranges += m.block_metadata.len();
            if ranges % 1000 == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok::<usize, tonic::Status>(ranges)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile another takes its first message and no more.
    let mut held = one_range_a_message(&c, &snap).await;
    held.message().await.expect("first message").expect("a message");
    let read = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the good answer ends")
        .expect("reader");
    assert_eq!(
        read.map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Ok(RANGES),
        "the answer read as it should be, while another stays unread"
    );
    drop(held);
}

/// Answers held unread must not stall the node's other calls either: the controller takes up to
/// a stream's HTTP/2 window (2 MiB) of each answer from the node, and three such answers held
/// filled the window of the one connection every call to the node shares (5 MiB): a CreateVolume's
/// answer could not come back.
#[tokio::test]
async fn unread_metadata_answers_do_not_stall_the_controllers_other_calls_to_the_node() {
    const BYTES: i64 = 2048 * MIB;
    // Every other 4 KiB block: 262144 ranges, about 3 MiB of answer.
    let (c, mut ctl, src) = fragmented_image(BYTES).await;
    let snap = snapshot(&mut ctl, "snap-frag", &src.volume_id).await.snapshot_id;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut a = one_range_a_message(&c, &snap).await;
        a.message().await.expect("first message").expect("a message");
        held.push(a);
    }
    // The node sends what the windows let it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(30),
        ctl.create_volume(wffc("pvc-after", 16 * MIB, "node-1", &["node-1"])),
    )
    .await;
    assert!(
        matches!(other, Ok(Ok(_))),
        "a CreateVolume on the node while {} metadata answers are held: {other:?} after {:?}",
        held.len(),
        started.elapsed()
    );
    drop(held);
}

/// The files of a pool's snapshots, and what is still being made or thrown away (`.work`,
/// `.trash`): all of it, by path, for a pool that should hold none.
fn pool_leftovers(pool: &Path) -> Vec<PathBuf> {
    ["snapshots", "volumes", ".work", ".trash"]
        .iter()
        .flat_map(|d| std::fs::read_dir(pool.join(d)).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect()
}

/// A snapshot deleted while a client reads its changed block answer slowly: nothing locks it
/// (docs/cbt.md), so the delete succeeds at once, and the answer goes on to its very end from the
/// file it opened, the snapshot as it was cut (its blocks stay until the answer ends), never from
/// a snapshot cut again under the same name. Once the answer ends and the rest is deleted, the
/// pool holds nothing.
#[tokio::test]
async fn a_snapshot_deleted_while_its_answer_streams_answers_to_the_end_from_what_was_opened() {
    // Every other 4 KiB block of 512 MiB: 65536 ranges, 16 of the node's full batches, of which
    // only a few are read before the delete (the walk reads ahead of its client by two).
    const BYTES: i64 = 512 * MIB;
    let (c, mut ctl, src) = fragmented_image(BYTES).await;
    let snap = snapshot(&mut ctl, "snap-frag", &src.volume_id).await.snapshot_id;
    let want: Vec<(u64, u64)> = (0..BYTES as u64 / 8192).map(|i| (i * 8192, 4096)).collect();
    let req = GetMetadataAllocatedRequest {
        snapshot_id: snap.clone(),
        max_results: 64,
        ..Default::default()
    };
    let mut answer = metadata_client(&c)
        .await
        .get_metadata_allocated(req)
        .await
        .expect("GetMetadataAllocated")
        .into_inner();
    let first = answer.message().await.expect("first message").expect("a message");
    let mut got: Vec<(u64, u64)> = first
        .block_metadata
        .iter()
        .map(|b| (b.byte_offset as u64, b.size_bytes as u64))
        .collect();

    ctl.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    })
    .await
    .expect("DeleteSnapshot while its answer streams");
    // The name cut again, from a volume with one block written where the first has a hole.
    let other = made(&mut ctl, image(wffc("other", BYTES, "node-1", &["node-1"]))).await;
    write_at(&c.pool_dir(0).join("volumes/other"), 4096, &pattern(4096, 9));
    let again = snapshot(&mut ctl, "snap-frag", &other.volume_id).await.snapshot_id;
    assert_eq!(again, snap, "the same id names the new snapshot");

    let rest = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(m) = answer.message().await? {
            got.extend(
                m.block_metadata
                    .iter()
                    .map(|b| (b.byte_offset as u64, b.size_bytes as u64)),
            );
        }
        Ok::<(), tonic::Status>(())
    })
    .await
    .expect("the answer ends");
    assert_eq!(rest.map_err(|s| format!("{:?}: {}", s.code(), s.message())), Ok(()));
    assert!(
        got == want,
        "{} ranges, not the deleted snapshot's {}",
        got.len(),
        want.len()
    );

    for snapshot_id in [again] {
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id,
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot");
    }
    for volume_id in [src.volume_id, other.volume_id] {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id,
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    }
    let pool = c.pool_dir(0);
    eventually("the pool holds nothing once everything is deleted", || {
        pool_leftovers(&pool).is_empty()
    })
    .await;
}

/// The descriptors process `pid` holds open on a file whose path contains `name`.
fn open_on(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| p.to_string_lossy().contains(name))
                .count()
        })
        .unwrap_or(0)
}

/// Restarts the controller and node-1 with a cut-off of `seconds` for answers nobody reads.
async fn with_metadata_stall(c: &mut Cluster, seconds: &str) -> ControllerClient<Channel> {
    let stall = [("CELLAR_METADATA_STALL_SECONDS", seconds)];
    c.kill_controller();
    c.start_controller_with(&stall);
    c.kill_node(0);
    c.start_node_with(0, &stall);
    c.wait_registered().await;
    c.ctl().await
}

/// `n` answers to `req`, their first message taken and nothing more, over a few connections
/// (each carries at most 256 calls).
async fn held_unread(
    c: &Cluster,
    req: &GetMetadataAllocatedRequest,
    n: usize,
) -> Vec<tonic::Streaming<GetMetadataAllocatedResponse>> {
    let mut held = Vec::new();
    while held.len() < n {
        let client = metadata_client(c).await;
        for _ in 0..(n - held.len()).min(64) {
            let mut a = client
                .clone()
                .get_metadata_allocated(req.clone())
                .await
                .unwrap_or_else(|s| panic!("GetMetadataAllocated with {} held: {s}", held.len()))
                .into_inner();
            a.message().await.expect("first message").expect("a message");
            held.push(a);
        }
    }
    held
}

/// The number of ranges of a whole answer to `req`, read on a connection of its own.
async fn read_whole(c: &Cluster, req: &GetMetadataAllocatedRequest) -> Result<usize, tonic::Status> {
    let mut s = metadata_client(c)
        .await
        .get_metadata_allocated(req.clone())
        .await?
        .into_inner();
    let mut ranges = 0;
    while let Some(m) = s.message().await? {
        ranges += m.block_metadata.len();
    }
    Ok(ranges)
}

/// Answers held unread, before any cut-off, must not stall the node's other answers: each holds
/// its stream's 64 KiB of the controller's connection to the node, whose window was 5 MiB, so
/// 80 of them filled it and every later answer about the node's snapshots waited for the two
/// minutes' cut-off to fail UNAVAILABLE.
#[tokio::test]
async fn unread_metadata_answers_do_not_stall_a_new_answer_about_the_node() {
    const BYTES: i64 = 512 * MIB;
    let (mut c, _, src) = fragmented_image(BYTES).await;
    // No cut-off frees a thing while the test runs.
    let mut ctl = with_metadata_stall(&mut c, "3600").await;
    let snap = snapshot(&mut ctl, "snap-frag", &src.volume_id).await.snapshot_id;
    let req = GetMetadataAllocatedRequest {
        snapshot_id: snap,
        max_results: 1,
        ..Default::default()
    };
    let held = held_unread(&c, &req, 128).await;
    let whole = tokio::time::timeout(Duration::from_secs(100), read_whole(&c, &req))
        .await
        .expect("a new answer while 128 are held unread ends");
    assert_eq!(
        whole.map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Ok((BYTES / 8192) as usize)
    );
    drop(held);
}

/// Answers a client holds open and never reads cost the node nothing past the cut-off
/// (`CELLAR_METADATA_STALL_SECONDS`, 1 s here): the node closes the snapshot's files, and the
/// controller lets go of its call to the node. The controller held each such call for as long as
/// its client held the answer, and its connection to the node carries 256 calls at once: 256
/// answers so held left every later answer about the node's snapshots UNAVAILABLE.
#[tokio::test]
async fn answers_nobody_reads_let_go_of_their_calls_to_the_node_after_the_cut_off() {
    // 65536 ranges: each answer is far more than the 64 KiB the controller takes unread.
    const BYTES: i64 = 512 * MIB;
    const HELD: usize = 256;
    let (mut c, _, src) = fragmented_image(BYTES).await;
    let mut ctl = with_metadata_stall(&mut c, "1").await;
    let snap = snapshot(&mut ctl, "snap-frag", &src.volume_id).await.snapshot_id;
    let req = GetMetadataAllocatedRequest {
        snapshot_id: snap.clone(),
        max_results: 1,
        ..Default::default()
    };
    let mut held = held_unread(&c, &req, HELD).await;
    let node = c.nodes[0].1.as_ref().expect("node-1 runs").id();
    eventually("the node closes the snapshot's files of answers nobody reads", || {
        open_on(node, "snapshots/snap-frag") == 0
    })
    .await;

    // A new answer about the node's snapshots, read to its end, while the others stay held.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match read_whole(&c, &req).await {
            Ok(ranges) => {
                assert_eq!(ranges, (BYTES / 8192) as usize);
                break;
            }
            Err(s) => assert!(
                Instant::now() < deadline,
                "a new answer while {HELD} are held unread past the cut-off: {:?}: {}",
                s.code(),
                s.message()
            ),
        }
    }
    // A held answer, read at last, ends with ABORTED after what was waiting, never as complete.
    let mut ranges = 0;
    let end = loop {
        match held[0].message().await {
            Ok(Some(m)) => ranges += m.block_metadata.len(),
            Ok(None) => break None,
            Err(s) => break Some(s.code()),
        }
    };
    assert!(ranges < (BYTES / 8192) as usize, "{ranges} ranges");
    assert_eq!(end, Some(Code::Aborted));
}

/// A restore onto another node flows node to node: the target pulls the snapshot from the source
/// with the controller's grant, and the controller's relay counter stays at 0. The same counter
/// sees every byte when the controller relays (`--node-transfers=via-controller`), so it would
/// catch data passing through the controller.
#[tokio::test]
async fn a_restore_onto_another_node_never_passes_through_the_controller() {
    const RELAYED: &str = "cellar_transfer_bytes_total{direction=\"relay\"}";
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    let src = made(&mut ctl, wffc("src", 64 * MIB, "node-1", BOTH)).await;
    let data = pattern(9 << 20, 5);
    std::fs::write(c.pool_dir(0).join("volumes/src/data"), &data).expect("write");
    let snap = snapshot(&mut ctl, "snap", &src.volume_id).await;
    made(
        &mut ctl,
        copy_req("restored", 64 * MIB, "node-2", from_snapshot(&snap.snapshot_id)),
    )
    .await;
    let copy = std::fs::read(c.pool_dir(1).join("volumes/restored/data")).expect("copy");
    assert!(copy == data, "the restored bytes are the snapshot's");
    let received = counter(
        &http_get(c.node_metrics[1], "/metrics"),
        "cellar_transfer_bytes_total{direction=\"import\"}",
    );
    assert!(received >= 9 << 20, "node-2 received the data: {received} bytes");
    assert_eq!(
        counter(&http_get(c.metrics, "/metrics"), RELAYED),
        0,
        "nothing passed through the controller"
    );
    assert!(c.log_of(0).contains("export to another node granted"), "{}", c.logs());

    c.kill_controller();
    c.spec.controller_args.push("--node-transfers=via-controller".into());
    c.start_controller();
    c.wait_registered().await;
    let mut ctl = c.ctl().await;
    made(
        &mut ctl,
        copy_req("relayed", 64 * MIB, "node-2", from_volume(&src.volume_id)),
    )
    .await;
    let copy = std::fs::read(c.pool_dir(1).join("volumes/relayed/data")).expect("copy");
    assert!(copy == data, "the relayed bytes are the volume's");
    let relayed = counter(&http_get(c.metrics, "/metrics"), RELAYED);
    assert!(
        relayed >= 9 << 20,
        "the controller counted what it relayed: {relayed} bytes"
    );
}

/// A node down across a controller restart is one the new process has never heard of. Its
/// volumes' DeleteVolume answered OK (the data stayed on the node with no PV naming it) and
/// ModifyVolume and ExpandVolume NOT_FOUND (final for the resizer), as for "no such node"; a
/// DeleteVolumeGroupSnapshot answered OK and left its members on the node. Every call naming an
/// object on it now answers UNAVAILABLE until it comes back; then the deletes go through and
/// remove the data.
#[tokio::test]
async fn a_node_down_across_a_controller_restart_is_unavailable_never_absent() {
    let mut c = two_nodes(&["--heartbeat-interval", "200ms"]).await;
    let mut ctl = c.ctl().await;
    let on2 = made(&mut ctl, wffc("pvc-2", 16 * MIB, "node-2", &["node-2"])).await;
    let snap = snapshot(&mut ctl, "snap-2", &on2.volume_id).await;
    let mut g = GroupControllerClient::new(c.channel("controller.sock").await);
    let group = g
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "group-2".into(),
            source_volume_ids: vec![on2.volume_id.clone()],
            parameters: [("consistency".to_string(), "per-volume".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("group snapshot on node-2")
        .into_inner()
        .group_snapshot
        .expect("group");
    let members: Vec<String> = group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    c.kill_node(1);
    c.kill_controller();
    c.start_controller();
    let mut ctl = c.ctl().await;
    // node-1 back (it heartbeats every 200 ms), and the settle period (two intervals) over.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl
        .create_volume(wffc("pvc-1", 16 * MIB, "node-1", &["node-1"]))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "node-1 never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data = c.dir.path().join("node-2/pools/default/volumes/pvc-2");
    assert!(data.is_dir(), "the data is on node-2");
    let code = |r: Result<(), tonic::Status>| r.map_err(|s| (s.code(), s.message().to_string()));
    let unavailable = |what: &str, r: Result<(), (Code, String)>| match r {
        Err((Code::Unavailable, m)) => assert!(m.contains("node-2"), "{what}: {m}"),
        other => panic!("{what} of an object on the absent node: want UNAVAILABLE, got {other:?}"),
    };
    let modify = ctl
        .controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: on2.volume_id.clone(),
            mutable_parameters: [("deletePolicy".to_string(), "retain".to_string())].into(),
            ..Default::default()
        })
        .await;
    unavailable("ModifyVolume", code(modify.map(|_| ())));
    let expand = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: on2.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    unavailable("ExpandVolume", code(expand.map(|_| ())));
    let delete_volume = || DeleteVolumeRequest {
        volume_id: on2.volume_id.clone(),
        ..Default::default()
    };
    let delete_snapshot = || DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    };
    let deleted = ctl.delete_volume(delete_volume()).await;
    unavailable("DeleteVolume", code(deleted.map(|_| ())));
    let deleted = ctl.delete_snapshot(delete_snapshot()).await;
    unavailable("DeleteSnapshot", code(deleted.map(|_| ())));
    let mut g = GroupControllerClient::new(c.channel("controller.sock").await);
    let get_group = GetVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids: members.clone(),
        ..Default::default()
    };
    let got = g.get_volume_group_snapshot(get_group).await;
    unavailable("GetVolumeGroupSnapshot", code(got.map(|_| ())));
    let delete_group = || DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids: members.clone(),
        ..Default::default()
    };
    let deleted = g.delete_volume_group_snapshot(delete_group()).await;
    unavailable("DeleteVolumeGroupSnapshot", code(deleted.map(|_| ())));
    assert!(data.is_dir(), "nothing was deleted");
    c.start_node(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let group_gone = g.delete_volume_group_snapshot(delete_group()).await.map(|_| ());
        let snap_gone = match group_gone {
            Ok(()) => ctl.delete_snapshot(delete_snapshot()).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let vol_gone = match snap_gone {
            Ok(()) => ctl.delete_volume(delete_volume()).await.map(|_| ()),
            Err(e) => Err(e),
        };
        match vol_gone {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("the delete once node-2 is back: {s:?}"),
        }
    }
    assert!(!data.exists(), "the delete removed the data once its node answered");
    let left = ctl
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: members[0].clone(),
            ..Default::default()
        })
        .await
        .expect("list the member")
        .into_inner();
    assert!(
        left.entries.is_empty(),
        "the group's delete removed its member: {left:?}"
    );
}

/// A CreateVolume the scheduler placed on a node that is not available is RESOURCE_EXHAUSTED
/// naming that node, also when no node at all is available (every agent down, or none registered
/// yet with a controller that just started): that refusal said "no node in the requisite
/// topology can hold this volume" and named none (tests/random_split.rs, seed 1).
#[tokio::test]
async fn a_create_placed_on_a_node_is_refused_naming_it_when_no_node_is_available() {
    let mut c = two_nodes(&["--heartbeat-interval", "200ms"]).await;
    c.kill_node(0);
    c.kill_node(1);
    c.kill_controller();
    c.start_controller();
    let mut ctl = c.ctl().await;
    let e = ctl
        .create_volume(wffc("pvc-1", 16 * MIB, "node-2", BOTH))
        .await
        .expect_err("every node is down");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("node-2"), "{}", e.message());
    assert_nothing_of(&c.pool_dir(1), "pvc-1");
}

/// A controller run with `flags` and two nodes.
async fn two_nodes(flags: &[&str]) -> Cluster {
    Cluster::start(Spec {
        controller_args: flags.iter().map(|f| f.to_string()).collect(),
        ..Spec::nodes(vec![None, None])
    })
    .await
}

/// Retries `req` while the answer is UNAVAILABLE or FAILED_PRECONDITION (a pool not open yet);
/// every refusal is checked by `refused`.
async fn retried_while_refused(c: &Cluster, req: &CreateVolumeRequest, refused: impl Fn(&tonic::Status)) -> Volume {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.ctl().await.create_volume(req.clone()).await {
            Ok(r) => return r.into_inner().volume.expect("volume"),
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}\n{}", c.logs());
                refused(&e);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How often node `i` has registered since its log began.
fn registrations(c: &Cluster, i: usize) -> usize {
    c.log_of(i).matches("registered with controller").count()
}

/// Kills node-1 (if it runs), turns its pool into a file and starts it again: its pool is shut.
async fn restart_node_1_with_its_pool_shut(c: &mut Cluster, pool: &Path, away: &Path) {
    c.kill_node(0);
    pool_unmountable(pool, away, true);
    let before = registrations(c, 0);
    c.start_node(0);
    eventually("node-1 registers again", || registrations(c, 0) > before).await;
}

/// A retried create of a volume node-1 holds in its shut pool: refused, and not made on node-2
/// (whose pool is `p2`).
async fn create_refused_not_made_elsewhere(
    c: &Cluster,
    ctl: &mut ControllerClient<Channel>,
    req: &CreateVolumeRequest,
    p2: &Path,
) {
    let e = ctl
        .create_volume(req.clone())
        .await
        .expect_err("node-1 holds the volume and its pool is not open");
    assert!(
        matches!(e.code(), Code::FailedPrecondition | Code::Unavailable),
        "{e}\n{}",
        c.logs()
    );
    assert!(nothing_of(p2, &req.name), "made again on node-2:\n{}", c.logs());
}

/// Turns a pool directory into a file, as a disk not mounted yet would leave it, or back.
fn pool_unmountable(pool: &Path, away: &Path, unmountable: bool) {
    if unmountable {
        std::fs::rename(pool, away).expect("move the pool away");
        std::fs::write(pool, b"the disk is not mounted").expect("a file in its place");
    } else {
        std::fs::remove_file(pool).expect("remove the file");
        std::fs::rename(away, pool).expect("move the pool back");
    }
}

/// A create whose answer was lost (its node died right after the record) is retried while that
/// node's pool cannot be opened. The retry must not be made on the other node: the first volume
/// would be left behind, an orphan nobody deletes, once the pool opens. It waits (UNAVAILABLE,
/// naming the node), then answers the volume made the first time.
#[tokio::test]
async fn a_create_whose_answer_was_lost_is_not_made_again_elsewhere_while_its_pool_is_shut() {
    if !cfg!(feature = "crash-points") {
        panic!("this test needs the crash points: run it with `cargo test --features crash-points`");
    }
    // Immediate binding: the first create goes to node-1 (more room), a retry could go anywhere.
    let (base, small) = (tempfile::tempdir().expect("tempdir"), TestFs::new("ext4", 96));
    let (p1, p2, away) = (base.path().join("p1"), small.path("pool"), base.path().join("p1.away"));
    let mut c = Cluster::start(Spec::nodes(vec![Some(p1.clone()), Some(p2.clone())])).await;
    let req = create_req("lost", 16 * MIB);
    let before = registrations(&c, 0);
    c.kill_node(0);
    c.start_node_with(0, &[("CELLAR_CRASH_AT", "create-volume:after-record")]);
    eventually("node-1 registers again", || registrations(&c, 0) > before).await;
    let lost = crashed_by(&c, 0, "create-volume:after-record", &req).await;
    assert_eq!(lost.code(), Code::Unavailable, "{lost}");
    assert!(
        p1.join("volumes/lost.json").is_file(),
        "the record was written before the crash"
    );

    restart_node_1_with_its_pool_shut(&mut c, &p1, &away).await;
    for _ in 0..3 {
        let e = c
            .ctl()
            .await
            .create_volume(req.clone())
            .await
            .expect_err("node-1 may hold the volume and cannot tell");
        assert_eq!(e.code(), Code::Unavailable, "{e}\n{}", c.logs());
        assert!(e.message().contains("node-1"), "{}", e.message());
        assert!(nothing_of(&p2, "lost"), "made again on node-2:\n{}", c.logs());
    }

    pool_unmountable(&p1, &away, false);
    let made = retried_while_refused(&c, &req, |e| {
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(nothing_of(&p2, "lost"), "made again on node-2");
    })
    .await;
    assert_eq!(
        made.volume_id, "local:node-1:default:lost",
        "the volume made the first time"
    );
    assert!(nothing_of(&p2, "lost"));
}

/// A node restarted with a pool that cannot be opened (its disk not mounted yet): the volumes the
/// pool holds stay listed, abnormal and naming the pool, rather than vanishing as if deleted; a
/// retried create of one of their names (its first answer lost on the CO's side) is not made on
/// another node, also by a controller that started since; once the pool opens they are healthy
/// again and the retry answers the volume.
#[tokio::test]
async fn the_volumes_of_a_pool_that_is_not_open_stay_listed_and_keep_their_names() {
    let (base, small) = (tempfile::tempdir().expect("tempdir"), TestFs::new("ext4", 96));
    let (p1, p2, away) = (base.path().join("p1"), small.path("pool"), base.path().join("p1.away"));
    let mut c = Cluster::start(Spec::nodes(vec![Some(p1.clone()), Some(p2.clone())])).await;
    let mut ctl = c.ctl().await;
    let req = create_req("known", 16 * MIB);
    let v = made(&mut ctl, req.clone()).await;
    assert_eq!(v.volume_id, "local:node-1:default:known", "node-1 has more room");
    wait_listed(&mut ctl, vec![(v.volume_id.clone(), false)]).await;
    let snap = snapshot(&mut ctl, "known-snap", &v.volume_id).await;

    restart_node_1_with_its_pool_shut(&mut c, &p1, &away).await;
    // A call on one of the pool's objects says the pool is not open, on which node: never
    // NOT_FOUND (the object is out of reach, not gone).
    let refused = |what: &str, e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e}");
        assert!(
            e.message().contains("is not open") && e.message().contains("node-1"),
            "{what}: {e}"
        );
    };
    let get = ctl
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    refused("GetSnapshot", get.expect_err("its pool is not open"));
    // ControllerGetVolume answers as last listed, abnormal, saying so (the health monitor's event).
    let got = ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .expect("as last listed")
        .into_inner();
    let condition = got.status.and_then(|s| s.volume_condition).expect("condition");
    assert!(
        condition.abnormal && condition.message.contains("is not open") && condition.message.contains("node-1"),
        "{condition:?}"
    );
    let cut = ctl
        .create_snapshot(CreateSnapshotRequest {
            name: "known-snap-2".into(),
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    refused("CreateSnapshot", cut.expect_err("its pool is not open"));
    let grow = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    refused("ControllerExpandVolume", grow.expect_err("its pool is not open"));
    // Every ListVolumes asks node-1 (it answers): its answer has the pool's volumes from its
    // roster, abnormal.
    for _ in 0..3 {
        let entries = ctl
            .list_volumes(ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries;
        assert_eq!(entries.len(), 1, "{entries:?}\n{}", c.logs());
        let e = &entries[0];
        assert_eq!(e.volume.as_ref().expect("volume").volume_id, v.volume_id);
        let condition = e
            .status
            .as_ref()
            .and_then(|s| s.volume_condition.as_ref())
            .expect("condition");
        assert!(condition.abnormal, "{condition:?}");
        assert!(
            condition.message.contains("pool 'default' of node node-1 is not open"),
            "{condition:?}"
        );
        create_refused_not_made_elsewhere(&c, &mut ctl, &req, &p2).await;
    }
    // A controller that starts while the pool is shut never listed those volumes: node-1 lists
    // them itself, from its roster, so they stay listed and their names taken.
    c.kill_controller();
    c.start_controller();
    c.wait_node_registered(1).await;
    let mut ctl = c.ctl().await;
    // Until node-1 calls in, its volumes are not listed.
    wait_listed(&mut ctl, vec![(v.volume_id.clone(), true)]).await;
    create_refused_not_made_elsewhere(&c, &mut ctl, &req, &p2).await;
    // Its snapshot too (this controller never saw it): listed from node-1's roster, its name
    // taken for another source, and its retry waiting for the pool (the snapshotter retries).
    let listed = ctl
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries;
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|e| e.snapshot.as_ref())
        .map(|s| s.snapshot_id.as_str())
        .collect();
    assert_eq!(ids, [snap.snapshot_id.as_str()], "{}", c.logs());
    let cut = |source: &str| CreateSnapshotRequest {
        name: "known-snap".into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    let taken = ctl
        .create_snapshot(cut("local:node-2:default:other"))
        .await
        .expect_err("the name is node-1's snapshot's");
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken}");
    let retry = ctl
        .create_snapshot(cut(&v.volume_id))
        .await
        .expect_err("waits for the pool");
    assert_eq!(retry.code(), Code::Unavailable, "{retry}");
    assert!(retry.message().contains("not open"), "{retry}");

    pool_unmountable(&p1, &away, false);
    wait_listed(&mut ctl, vec![(v.volume_id.clone(), false)]).await;
    let again = retried_while_refused(&c, &req, |e| {
        assert!(matches!(e.code(), Code::FailedPrecondition | Code::Unavailable), "{e}");
    })
    .await;
    assert_eq!(again.volume_id, v.volume_id);
    assert!(nothing_of(&p2, "known"));
    let cut_again = ctl.create_snapshot(cut(&v.volume_id)).await.expect("the snapshot");
    let cut_again = cut_again.into_inner().snapshot.expect("snapshot");
    assert_eq!(
        cut_again.snapshot_id, snap.snapshot_id,
        "the snapshot made the first time"
    );
}

/// A create whose node died before its record, retried after the scheduler chose another node:
/// while the first node is dead the retry waits (it may have made the volume); once it is back
/// holding nothing, the volume is made on the node the scheduler chose, not on the first.
#[tokio::test]
async fn a_lost_create_rescheduled_elsewhere_waits_for_its_first_node_then_goes_where_the_scheduler_chose() {
    if !cfg!(feature = "crash-points") {
        panic!("this test needs the crash points: run it with `cargo test --features crash-points`");
    }
    let mut c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let before = registrations(&c, 0);
    c.kill_node(0);
    c.start_node_with(0, &[("CELLAR_CRASH_AT", "create-volume:before-record")]);
    eventually("node-1 registers again", || registrations(&c, 0) > before).await;
    let lost = crashed_by(
        &c,
        0,
        "create-volume:before-record",
        &wffc("moved", 16 * MIB, "node-1", BOTH),
    )
    .await;
    assert_eq!(lost.code(), Code::Unavailable, "{lost}");

    let rescheduled = wffc("moved", 16 * MIB, "node-2", BOTH);
    let e = c
        .ctl()
        .await
        .create_volume(rescheduled.clone())
        .await
        .expect_err("node-1 is dead and may hold the volume");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("node node-1"), "{}", e.message());
    assert!(nothing_of(&c.pool_dir(1), "moved"));

    let before = registrations(&c, 0);
    c.start_node(0);
    eventually("node-1 registers again", || registrations(&c, 0) > before).await;
    let made = retried(&c, rescheduled).await;
    assert_eq!(
        made.volume_id, "local:node-2:default:moved",
        "where the scheduler chose"
    );
    assert!(nothing_of(&c.pool_dir(0), "moved"), "nothing on node-1");
}

/// DeleteVolume through the controller sent at the same moment as NodeStageVolume and
/// NodePublishVolume on the node, for a local volume (the node's agent deletes it) and for
/// shared dir and image volumes (the controller deletes them itself and sees the node's use only
/// through the marks and leases on the share): a mount that answered OK keeps the volume whole, a
/// delete that answered OK leaves nothing, and the calls converge on retry.
#[tokio::test]
async fn delete_racing_stage_and_publish_in_split_mode() {
    let fs = TestFs::new("ext4", 512);
    let c = Cluster::start(Spec {
        config: Some(format!(
            "pools:\n  - name: default\n  - name: share\n    backend: shared\n    path: {}\n    layouts: [dir, image]\n",
            fs.mnt.display()
        )),
        ..Spec::nodes(vec![None])
    })
    .await;
    let mut ctl = c.ctl().await;
    let mut node = c.node(0).await;
    let local = c.dir.path().join("node-1/pools/default");
    for (kind, pool_dir) in [("local", local), ("dir", fs.mnt.clone()), ("image", fs.mnt.clone())] {
        for round in 0..40 {
            let name = format!("pvc-race-{kind}-{round}");
            let mut r = wffc(&name, 16 * MIB, "node-1", &["node-1"]);
            if kind != "local" {
                r.parameters.insert("pool".into(), "share".into());
                r.parameters.insert("layout".into(), kind.into());
            }
            let id = made(&mut ctl, r).await.volume_id;
            let staging = c.dir.path().join(format!("{name}-staging"));
            let target = c.dir.path().join(format!("{name}-target"));
            std::fs::create_dir_all(&staging).expect("staging");
            // Written first, read back through the mount.
            stage(&mut node, &id, &staging).await.expect("first stage");
            std::fs::write(staging.join("who"), name.as_bytes()).expect("write");
            unstage(&mut node, &id, &staging).await;
            let (mut n2, mut c2) = (node.clone(), ctl.clone());
            let mount = async {
                stage_rwo(&mut n2, &id, &staging).await?;
                n2.node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await?;
                Ok::<(), tonic::Status>(())
            };
            // The delete starts a little later each round, to meet the mount at another step.
            let delete = async {
                tokio::time::sleep(Duration::from_millis(round % 10 * 3)).await;
                c2.delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
            };
            let (mounted, deleted) = tokio::join!(mount, delete);
            let deleted = deleted.map(|_| ());
            let ctx = format!("{kind} round {round}: mount {mounted:?}, delete {deleted:?}");
            eprintln!(
                "OUTCOME {kind} {:?} {:?}",
                mounted.as_ref().map_err(|e| e.code()),
                deleted.as_ref().map_err(|e| e.code())
            );
            assert!(!(mounted.is_ok() && deleted.is_ok()), "{ctx}: both answered OK");
            if mounted.is_ok() {
                assert_eq!(
                    std::fs::read(target.join("who")).ok().as_deref(),
                    Some(name.as_bytes()),
                    "{ctx}"
                );
            }
            if deleted.is_ok() {
                assert!(mounts_under(c.dir.path()).is_empty(), "{ctx}: mounts left");
                assert!(loops_under(&fs.mnt).is_empty(), "{ctx}: loop devices left");
            }
            let _ = node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                })
                .await
                .unwrap_or_else(|e| panic!("{ctx}: unpublish: {e:?}"));
            unstage_from(&mut node, &id, &staging)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: unstage: {e:?}"));
            if mounted.is_ok() {
                stage(&mut node, &id, &staging).await.expect("stage again");
                assert_eq!(
                    std::fs::read(staging.join("who")).ok().as_deref(),
                    Some(name.as_bytes()),
                    "{ctx}: the volume that was mounted is whole"
                );
                unstage(&mut node, &id, &staging).await;
            }
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{ctx}: delete once unmounted: {e:?}"));
            assert!(mounts_under(c.dir.path()).is_empty(), "{ctx}: mounts left");
            assert!(loops_under(&fs.mnt).is_empty(), "{ctx}: loop devices left");
            assert!(
                entries(&pool_dir.join("volumes")).is_empty(),
                "{ctx}: left in the pool: {:?}",
                entries(&pool_dir.join("volumes"))
            );
        }
    }
}

/// Two CreateVolume calls of one name at once, the scheduler having picked node-1 for one and
/// node-2 for the other (both admitted by its topology): sequentially the second finds the
/// first's volume and answers it; at once, the name must not get a volume on each node.
#[tokio::test]
async fn one_name_created_on_two_nodes_at_once_makes_one_volume() {
    let c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let ctl = c.ctl().await;
    let pools = [c.pool_dir(0), c.pool_dir(1)];
    for round in 0..20 {
        let name = format!("pvc-twin-{round}");
        let (mut a, mut b) = (ctl.clone(), ctl.clone());
        let (ra, rb) = tokio::join!(
            a.create_volume(wffc(&name, 16 * MIB, "node-1", &["node-1", "node-2"])),
            b.create_volume(wffc(&name, 16 * MIB, "node-2", &["node-1", "node-2"]))
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
        let recorded = pools
            .iter()
            .filter(|p| p.join(format!("volumes/{name}.json")).exists())
            .count();
        assert!(
            recorded <= 1,
            "round {round}: {name} has a volume on each node: {ids:?}"
        );
        if ids.len() == 2 {
            assert_eq!(ids[0], ids[1], "round {round}: one name, two volumes");
        }
    }
}

/// One image volume of a shared pool staged on two nodes at once, `rounds` times: an image is
/// mounted on one node at a time, so at most one stage answers OK, the other leaves nothing
/// mounted or attached, and both converge (the volume is then deleted, nothing left).
#[tokio::test]
async fn a_shared_image_staged_on_two_nodes_at_once_is_mounted_on_one() {
    let fs = TestFs::new("ext4", 512);
    let c = Cluster::start(Spec {
        config: Some(format!(
            "pools:\n  - name: default\n  - name: share\n    backend: shared\n    path: {}\n    layouts: [dir, image]\n",
            fs.mnt.display()
        )),
        ..Spec::nodes(vec![None, None])
    })
    .await;
    let mut ctl = c.ctl().await;
    let (n1, n2) = (c.node(0).await, c.node(1).await);
    for round in 0..20 {
        let name = format!("pvc-two-{round}");
        let mut r = create_req(&name, 16 * MIB);
        r.parameters.insert("pool".into(), "share".into());
        r.parameters.insert("layout".into(), "image".into());
        let id = made(&mut ctl, r).await.volume_id;
        let s1 = c.dir.path().join(format!("{name}-on-1"));
        let s2 = c.dir.path().join(format!("{name}-on-2"));
        let (mut a, mut b) = (n1.clone(), n2.clone());
        let (r1, r2) = tokio::join!(stage(&mut a, &id, &s1), stage(&mut b, &id, &s2));
        let ctx = format!("round {round}: node-1 {r1:?}, node-2 {r2:?}");
        assert!(!(r1.is_ok() && r2.is_ok()), "{ctx}: mounted on both nodes");
        let mounted = mounts_under(c.dir.path());
        assert!(mounted.len() <= 1, "{ctx}: {mounted:?}");
        assert!(loops_under(&fs.mnt).len() <= 1, "{ctx}: {:?}", loops_under(&fs.mnt));
        unstage_from(&mut a, &id, &s1)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: unstage 1: {e:?}"));
        unstage_from(&mut b, &id, &s2)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: unstage 2: {e:?}"));
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{ctx}: delete: {e:?}"));
        assert!(mounts_under(c.dir.path()).is_empty(), "{ctx}: mounts left");
        assert!(loops_under(&fs.mnt).is_empty(), "{ctx}: loop devices left");
    }
}

/// Copies onto another node sent at the same moment as the delete of their source: a clone
/// against DeleteVolume of its source, and a restore against DeleteSnapshot of its snapshot.
/// A copy that answered OK holds the source's data on node-2, whatever the delete answered;
/// a failed one leaves nothing there; everything converges.
#[tokio::test]
async fn copies_onto_another_node_racing_deletes_of_their_source() {
    let c = Cluster::start(Spec::nodes(vec![None, None])).await;
    let mut ctl = c.ctl().await;
    for round in 0..15 {
        let name = format!("src-{round}");
        let v = made(&mut ctl, wffc(&name, 16 * MIB, "node-1", BOTH)).await.volume_id;
        std::fs::write(c.pool_dir(0).join(format!("volumes/{name}/who")), name.as_bytes()).expect("write");
        let s = snapshot(&mut ctl, &format!("snap-{round}"), &v).await.snapshot_id;
        let (mut a, mut b) = (ctl.clone(), ctl.clone());
        let restore = format!("restored-{round}");
        let (restored, snap_deleted) = tokio::join!(
            a.create_volume(copy_req(&restore, 16 * MIB, "node-2", from_snapshot(&s))),
            b.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: s.clone(),
                ..Default::default()
            })
        );
        let clone = format!("cloned-{round}");
        let (cloned, deleted) = tokio::join!(
            a.create_volume(copy_req(&clone, 16 * MIB, "node-2", from_volume(&v))),
            b.delete_volume(DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
        );
        let ctx = format!("round {round}: restore {restored:?}, delete snapshot {snap_deleted:?}, clone {cloned:?}, delete {deleted:?}");
        for (copy, answer) in [(&restore, restored.is_ok()), (&clone, cloned.is_ok())] {
            let data = c.pool_dir(1).join(format!("volumes/{copy}"));
            if answer {
                assert_eq!(
                    std::fs::read(data.join("who")).ok().as_deref(),
                    Some(name.as_bytes()),
                    "{ctx}: {copy}"
                );
                ctl.delete_volume(DeleteVolumeRequest {
                    volume_id: format!("local:node-2:default:{copy}"),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{ctx}: delete {copy}: {e:?}"));
            }
            assert_nothing_of(&c.pool_dir(1), copy);
        }
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{ctx}: delete snapshot: {e:?}"));
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: v.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{ctx}: delete source: {e:?}"));
        for i in 0..2 {
            for sub in ["volumes", "snapshots", ".work"] {
                assert!(
                    entries(&c.pool_dir(i).join(sub)).is_empty(),
                    "{ctx}: node-{} {sub}: {:?}",
                    i + 1,
                    entries(&c.pool_dir(i).join(sub))
                );
            }
        }
    }
}
