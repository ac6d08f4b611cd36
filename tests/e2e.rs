//! Multi-node end to end (docs/e2e.md): a `cellar controller` and three `cellar node` processes,
//! each in a network namespace of its own on a private bridge, each node with its own data dir and
//! kubelet mount namespace. The test plays external-provisioner (the controller's socket) and
//! kubelet (each node's socket, kubelet's real paths), and runs pods as shells in the nodes'
//! namespaces. Needs root, iproute2 and util-linux.

#[path = "e2e/certs.rs"]
mod certs;
mod common;
#[path = "e2e/env.rs"]
mod env;
#[path = "e2e/kubelet.rs"]
mod kubelet;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cellar::agent::remote::{HostPort, RemoteAgent, Timeouts};
use cellar::agent::tls::Tls;
use cellar::agent::Agent;
use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::volume_capability::access_mode::Mode;
use cellar::csi::v1::*;
use cellar::storage::id::NodeId;
use certs::AGENT_NAME;
use common::fs::loops_under;
use common::{code, create_req, MIB};
use env::{
    capacity_on, node_name, topology, Env, Pool, AGENT_PORT, CONTROLLER_ADDR, CONTROLLER_HOST, KUBELET, REGISTRY_PORT,
};
use kubelet::{staging_path, Kubelet, Pod};
use tonic::transport::Channel;
use tonic::{Code, Status};

const THREE: [Pool; 3] = [Pool::Default, Pool::Default, Pool::Default];
/// How long a retrying caller (external-provisioner, kubelet) keeps trying in these tests.
const CONVERGE: Duration = Duration::from_secs(45);

/// A CreateVolume as external-provisioner sends it under WaitForFirstConsumer: every node
/// requisite, the scheduler's node preferred.
fn wffc(name: &str, bytes: i64, selected: &str) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes);
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: (0..3).map(|i| topology(&node_name(i))).collect(),
        preferred: vec![topology(selected)],
    });
    r
}

async fn create(ctl: &mut ControllerClient<Channel>, req: CreateVolumeRequest) -> Volume {
    let name = req.name.clone();
    ctl.create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("volume")
}

async fn delete(ctl: &mut ControllerClient<Channel>, id: &str) -> Result<(), Status> {
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// The node a volume was placed on, by its ID (`local:<node>:<pool>:<name>`) and its topology,
/// which must agree.
fn placed_on(v: &Volume) -> String {
    let node = v.volume_id.split(':').nth(1).expect("local volume id").to_string();
    assert_eq!(v.accessible_topology, vec![topology(&node)], "{v:?}");
    node
}

/// Asserts a failure's code and that its message names `node`.
fn assert_names(e: &Status, want: Code, node: &str) {
    assert_eq!(e.code(), want, "{e}");
    assert!(e.message().contains(node), "the message names {node}: {}", e.message());
}

/// Retries `call` as a Kubernetes caller would while it fails with one of `transient`, until it
/// succeeds; any other failure, or no success in time, fails the test.
async fn retry<T, F, Fut>(what: &str, transient: &[Code], mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + CONVERGE;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(s) => assert!(
                transient.contains(&s.code()) && Instant::now() < deadline,
                "{what}: {s}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asserts the pod's mount is in node `i`'s kubelet namespace and nowhere in the host's.
fn assert_mounted_only_in_kubelet_ns(env: &Env, i: usize, pod: &Pod, volume_id: &str) {
    let in_ns = env.kubelet_mounts(i);
    for p in [pod.target(), staging_path(volume_id)] {
        assert!(
            in_ns.contains(&PathBuf::from(&p)),
            "{p} is not mounted in {}'s kubelet namespace: {in_ns:?}",
            env.nodes[i].name
        );
    }
    let host: Vec<PathBuf> = cellar::sys::mountinfo::read(std::path::Path::new("/proc/self/mountinfo"))
        .expect("host mountinfo")
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(KUBELET) || m.starts_with(env.nodes[i].kubelet_dir()))
        .collect();
    assert!(
        host.is_empty(),
        "kubelet's mounts leaked into the host namespace: {host:?}"
    );
}

/// The test network exists only inside the environment: from the host namespace the range is a
/// blackhole; inside, hosts reach each other over the bridge and nothing else (no default route).
#[tokio::test]
async fn the_test_network_exists_only_inside_its_namespaces() {
    let env = Env::start(&[Pool::Default, Pool::Default]).await;
    let route = |net: Option<&std::path::Path>, to: &str| {
        let out = env::output(&mut env::nsenter(net, None, &["ip", "route", "get", to]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = route(None, &env.nodes[0].addr);
    assert!(
        !ok && env::blackhole_present(),
        "the host namespace has a route to the test network: {text}"
    );
    for n in &env.nodes {
        let (ok, text) = route(Some(&n.net), CONTROLLER_ADDR);
        assert!(
            ok && text.contains("dev eth0"),
            "{} reaches the controller over the bridge: {text}",
            n.name
        );
        let (ok, text) = route(Some(&n.net), "192.0.2.1");
        assert!(!ok && text.contains("unreachable"), "{} has a way out: {text}", n.name);
        let default = env::run(&mut env::nsenter(
            Some(&n.net),
            None,
            &["ip", "route", "show", "default"],
        ));
        assert!(default.trim().is_empty(), "{} has a default route: {default}", n.name);
    }
}

#[tokio::test]
async fn wffc_volume_is_made_on_the_selected_node_and_a_pod_there_reads_and_writes_it() {
    let env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    let v = create(&mut ctl, wffc("pvc-wffc", 64 * MIB, "node-2")).await;
    assert_eq!(v.volume_id, "local:node-2:default:pvc-wffc");
    assert_eq!(placed_on(&v), "node-2");
    for (i, n) in env.nodes.iter().enumerate() {
        assert_eq!(
            n.volume_dir("pvc-wffc").is_dir(),
            i == 1,
            "made on node-2's disk only ({})",
            n.name
        );
    }

    let mut kubelet = Kubelet::on(&env, 1).await;
    let pod = Pod::new("pvc-wffc");
    kubelet
        .start_pod(&v.volume_id, &pod)
        .await
        .expect("stage and publish on node-2");
    assert_mounted_only_in_kubelet_ns(&env, 1, &pod, &v.volume_id);
    assert!(
        env.kubelet_mounts(0).is_empty() && env.kubelet_mounts(2).is_empty(),
        "other nodes see nothing"
    );
    pod.write(&env, kubelet.node, "hello", "written by a pod on node-2");
    assert_eq!(
        std::fs::read_to_string(env.nodes[1].volume_dir("pvc-wffc").join("hello")).expect("on node-2's disk"),
        "written by a pod on node-2"
    );
    assert_eq!(
        pod.read(&env, kubelet.node, "hello"),
        "written by a pod on node-2",
        "a second pod reads it"
    );
    // A pod's own mounts stay in the pod (HostToContainer): they do not flow back to the node.
    env.workload(1, r#"mount -t tmpfs pod-private "$1""#, &[&pod.target()]);
    assert_eq!(
        env.kubelet_mounts(1)
            .iter()
            .filter(|m| m.as_path() == std::path::Path::new(&pod.target()))
            .count(),
        1,
        "the pod's mount must not appear in the kubelet namespace"
    );

    kubelet.stop_pod(&v.volume_id, &pod).await;
    assert!(
        env.kubelet_mounts(1).is_empty(),
        "unpublish and unstage leave no mount: {:?}",
        env.kubelet_mounts(1)
    );
    delete(&mut ctl, &v.volume_id).await.expect("DeleteVolume");
    assert!(
        !env.nodes[1].volume_dir("pvc-wffc").exists(),
        "deleted from node-2's disk"
    );
}

/// Data moves between nodes: a snapshot of a volume on node-1 is restored for a pod that the
/// scheduler put on node-3, and the volume itself is cloned for a pod on node-2. The controller
/// streams the data between the agents across the namespaces; pods there read what the first pod
/// wrote, and each new volume lives on its own node's disk only.
#[tokio::test]
async fn a_snapshot_restored_and_a_volume_cloned_on_other_nodes_carry_the_pods_data() {
    let env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    let src = create(&mut ctl, wffc("pvc-origin", 64 * MIB, "node-1")).await;
    let mut k1 = Kubelet::on(&env, 0).await;
    let pod1 = Pod::new("pvc-origin");
    k1.start_pod(&src.volume_id, &pod1).await.expect("pod on node-1");
    pod1.write(&env, 0, "ledger", "written on node-1 before the snapshot");
    let snap = ctl
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: src.volume_id.clone(),
            name: "snap-origin".into(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    pod1.write(&env, 0, "ledger", "changed after the snapshot");

    let from = |source: volume_content_source::Type| Some(VolumeContentSource { r#type: Some(source) });
    let mut restore = wffc("pvc-restored", 64 * MIB, "node-3");
    restore.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topology("node-3")],
        preferred: vec![topology("node-3")],
    });
    restore.volume_content_source = from(volume_content_source::Type::Snapshot(
        volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        },
    ));
    let restored = create(&mut ctl, restore).await;
    assert_eq!(placed_on(&restored), "node-3");
    let mut clone = wffc("pvc-clone", 64 * MIB, "node-2");
    clone.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topology("node-2")],
        preferred: vec![topology("node-2")],
    });
    clone.volume_content_source = from(volume_content_source::Type::Volume(
        volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        },
    ));
    let cloned = create(&mut ctl, clone).await;
    assert_eq!(placed_on(&cloned), "node-2");
    for (i, n) in env.nodes.iter().enumerate() {
        assert_eq!(
            n.volume_dir("pvc-restored").is_dir(),
            i == 2,
            "restored on node-3 only ({})",
            n.name
        );
        assert_eq!(
            n.volume_dir("pvc-clone").is_dir(),
            i == 1,
            "cloned on node-2 only ({})",
            n.name
        );
    }

    let mut k3 = Kubelet::on(&env, 2).await;
    let pod3 = Pod::new("pvc-restored");
    k3.start_pod(&restored.volume_id, &pod3).await.expect("pod on node-3");
    assert_eq!(pod3.read(&env, 2, "ledger"), "written on node-1 before the snapshot");
    let mut k2 = Kubelet::on(&env, 1).await;
    let pod2 = Pod::new("pvc-clone");
    k2.start_pod(&cloned.volume_id, &pod2).await.expect("pod on node-2");
    assert_eq!(pod2.read(&env, 1, "ledger"), "changed after the snapshot");
    // The copies are the new volumes' own: a write there leaves the source alone.
    pod2.write(&env, 1, "ledger", "the clone's own");
    assert_eq!(pod1.read(&env, 0, "ledger"), "changed after the snapshot");

    k3.stop_pod(&restored.volume_id, &pod3).await;
    k2.stop_pod(&cloned.volume_id, &pod2).await;
    k1.stop_pod(&src.volume_id, &pod1).await;
    for id in [&restored.volume_id, &cloned.volume_id] {
        delete(&mut ctl, id).await.expect("DeleteVolume");
    }
    ctl.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .expect("DeleteSnapshot");
    delete(&mut ctl, &src.volume_id).await.expect("DeleteVolume");
}

/// Image volumes: the plugin attaches a loop device and mounts a real filesystem inside its own
/// mount namespace; the mount reaches kubelet and the pod, a raw block device reaches the pod as
/// kubelet's device file, and unstaging detaches the loop devices.
#[tokio::test]
async fn image_and_raw_block_volumes_are_attached_in_the_plugin_and_used_by_pods() {
    let env = Env::start(&[Pool::Image, Pool::Default, Pool::Default]).await;
    let mut ctl = env.ctl().await;
    let fs = create(&mut ctl, wffc("pvc-img", 32 * MIB, "node-1")).await;
    let mut blk_req = wffc("pvc-blk", 16 * MIB, "node-1");
    blk_req.volume_capabilities = vec![common::block_cap(Mode::SingleNodeWriter)];
    let blk = create(&mut ctl, blk_req).await;
    let data = env.nodes[0].data_dir();
    let mut kubelet = Kubelet::on(&env, 0).await;

    let pod = Pod::new("pvc-img");
    kubelet
        .start_pod(&fs.volume_id, &pod)
        .await
        .expect("stage and publish the image volume");
    assert_mounted_only_in_kubelet_ns(&env, 0, &pod, &fs.volume_id);
    let table = run_in(&env, 0, &["cat", "/proc/self/mountinfo"]);
    let mounted = cellar::sys::mountinfo::parse(&table)
        .into_iter()
        .find(|m| m.mount_point.as_path() == std::path::Path::new(&pod.target()))
        .expect("the pod's mount");
    assert!(
        mounted.fs_type == "ext4" && mounted.source.starts_with("/dev/loop"),
        "a loop-attached ext4: {mounted:?}"
    );
    pod.write(&env, 0, "f", "on a real filesystem");

    let dev = Pod::block("pvc-blk");
    kubelet
        .start_pod(&blk.volume_id, &dev)
        .await
        .expect("stage and publish the block volume");
    run_in(&env, 0, &["test", "-b", &dev.target()]);
    dev.write(&env, 0, "", "raw bytes at 1 MiB");
    assert_eq!(
        loops_under(&data).len(),
        2,
        "both volumes attached: {:?}",
        loops_under(&data)
    );

    kubelet.stop_pod(&blk.volume_id, &dev).await;
    kubelet.stop_pod(&fs.volume_id, &pod).await;
    assert!(env.kubelet_mounts(0).is_empty(), "{:?}", env.kubelet_mounts(0));
    assert!(
        loops_under(&data).is_empty(),
        "unstage detaches: {:?}",
        loops_under(&data)
    );
    for v in [&fs, &blk] {
        delete(&mut ctl, &v.volume_id).await.expect("DeleteVolume");
    }
}

/// Runs a command in node `i`'s kubelet namespace; its output.
fn run_in(env: &Env, i: usize, args: &[&str]) -> String {
    env::run(&mut env.in_kubelet(i, args))
}

#[tokio::test]
async fn publishing_on_a_node_that_does_not_hold_the_volume_fails_cleanly() {
    let env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    let v = create(&mut ctl, wffc("pvc-here", 32 * MIB, "node-2")).await;
    let mut owner = Kubelet::on(&env, 1).await;
    let pod = Pod::new("pvc-here");
    owner.start_pod(&v.volume_id, &pod).await.expect("on node-2");
    pod.write(&env, owner.node, "data", "node-2's");

    let mut wrong = Kubelet::on(&env, 0).await;
    let stray = Pod::new("pvc-here");
    let e = wrong
        .stage(&v.volume_id, &stray)
        .await
        .expect_err("node-1 cannot stage node-2's volume");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains(&v.volume_id), "{}", e.message());
    let e = wrong.publish(&v.volume_id, &stray).await.expect_err("nor publish it");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(
        env.kubelet_mounts(0).is_empty(),
        "node-1 mounted something: {:?}",
        env.kubelet_mounts(0)
    );
    // kubelet tears down after failures too: both must succeed with nothing there.
    wrong
        .unpublish(&v.volume_id, &stray)
        .await
        .expect("unpublish of nothing");
    wrong.unstage(&v.volume_id, &stray).await.expect("unstage of nothing");
    assert_eq!(
        pod.read(&env, owner.node, "data"),
        "node-2's",
        "the owner's pod is untouched"
    );
    owner.stop_pod(&v.volume_id, &pod).await;
}

#[tokio::test]
async fn immediate_binding_places_the_volume_and_its_node_serves_it() {
    let env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    // external-provisioner without topology: no requirements at all.
    let free = create(&mut ctl, create_req("pvc-imm", 32 * MIB)).await;
    // With topology and Immediate binding: every node requisite, all preferred in some order.
    let mut req = create_req("pvc-imm-topo", 32 * MIB);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: (0..3).map(|i| topology(&node_name(i))).collect(),
        preferred: [2, 0, 1].iter().map(|i| topology(&node_name(*i))).collect(),
    });
    let ordered = create(&mut ctl, req).await;
    assert_eq!(placed_on(&ordered), "node-3", "the first preferred node with room");
    for (v, name) in [(&free, "pvc-imm"), (&ordered, "pvc-imm-topo")] {
        let node = placed_on(v);
        let i = env.nodes.iter().position(|n| n.name == node).expect("a known node");
        assert!(env.nodes[i].volume_dir(name).is_dir(), "{name} on {node}'s disk");
        let mut kubelet = Kubelet::on(&env, i).await;
        let pod = Pod::new(name);
        kubelet
            .start_pod(&v.volume_id, &pod)
            .await
            .expect("publish where it lives");
        pod.write(&env, kubelet.node, "f", name);
        kubelet.stop_pod(&v.volume_id, &pod).await;
    }
}

#[tokio::test]
async fn a_full_node_is_resource_exhausted_and_the_next_node_takes_the_volume() {
    let env = Env::start(&[Pool::Small(96), Pool::Default, Pool::Default]).await;
    let mut ctl = env.ctl().await;
    let room = capacity_on(&mut ctl, "node-1").await.expect("GetCapacity");
    assert!(room > 0 && room < 96 * MIB, "node-1's small pool: {room}");
    let e = ctl
        .create_volume(wffc("pvc-big", 256 * MIB, "node-1"))
        .await
        .expect_err("node-1 has no room");
    assert_names(&e, Code::ResourceExhausted, "node-1");
    assert!(
        !env.nodes[0].volume_dir("pvc-big").exists(),
        "nothing half-made on node-1"
    );
    // The scheduler picks another node and the provisioner retries there.
    let v = create(&mut ctl, wffc("pvc-big", 256 * MIB, "node-3")).await;
    assert_eq!(placed_on(&v), "node-3");
    let mut kubelet = Kubelet::on(&env, 2).await;
    let pod = Pod::new("pvc-big");
    kubelet.start_pod(&v.volume_id, &pod).await.expect("publish on node-3");
    pod.write(&env, kubelet.node, "f", "fits");
    kubelet.stop_pod(&v.volume_id, &pod).await;
    // A small volume still fits on node-1.
    let small = create(&mut ctl, wffc("pvc-small", 8 * MIB, "node-1")).await;
    assert_eq!(placed_on(&small), "node-1");
}

#[tokio::test]
async fn a_killed_node_is_unavailable_the_others_serve_and_it_converges_when_back() {
    let mut env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    let used = create(&mut ctl, wffc("pvc-used", 32 * MIB, "node-2")).await;
    let spare = create(&mut ctl, wffc("pvc-spare", 32 * MIB, "node-2")).await;
    let pod = Pod::new("pvc-used");
    {
        let mut k2 = Kubelet::on(&env, 1).await;
        k2.start_pod(&used.volume_id, &pod).await.expect("publish on node-2");
        pod.write(&env, k2.node, "f", "before the crash");
    }

    env.kill_node(1);
    let e = delete(&mut ctl, &spare.volume_id).await.expect_err("node-2 is down");
    assert_names(&e, Code::Unavailable, "node-2");
    let e = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: used.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 48 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("node-2 is down");
    assert_names(&e, Code::Unavailable, "node-2");
    let e = ctl
        .create_snapshot(CreateSnapshotRequest {
            name: "snap-used".into(),
            source_volume_id: used.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("node-2 is down");
    assert_names(&e, Code::Unavailable, "node-2");
    // The scheduler chose node-2 before it died: the provisioner is told to retry.
    let e = ctl
        .create_volume(wffc("pvc-late", 16 * MIB, "node-2"))
        .await
        .expect_err("node-2 is down");
    assert_names(&e, Code::Unavailable, "node-2");
    assert!(
        env.nodes[1].volume_dir("pvc-spare").is_dir(),
        "nothing recorded as done"
    );
    // The pod keeps its mount while the plugin is gone.
    assert_eq!(
        pod.read(&env, 1, "f"),
        "before the crash",
        "the pod keeps its mount while the plugin is gone"
    );

    // The other nodes: provisioning and kubelet calls as usual.
    for i in [0, 2] {
        let name = format!("pvc-on-{}", node_name(i));
        let v = create(&mut ctl, wffc(&name, 16 * MIB, &node_name(i))).await;
        assert_eq!(placed_on(&v), node_name(i));
        let mut k = Kubelet::on(&env, i).await;
        let p = Pod::new(&name);
        k.start_pod(&v.volume_id, &p).await.expect("publish on a live node");
        p.write(&env, k.node, "f", "unaffected");
        k.stop_pod(&v.volume_id, &p).await;
    }

    env.start_node(1);
    retry("DeleteVolume after node-2 is back", &[Code::Unavailable], || {
        let (mut ctl, id) = (ctl.clone(), spare.volume_id.clone());
        async move { delete(&mut ctl, &id).await }
    })
    .await;
    assert!(
        !env.nodes[1].volume_dir("pvc-spare").exists(),
        "deleted once node-2 is back"
    );
    let mut k2 = Kubelet::on(&env, 1).await;
    assert_eq!(pod.read(&env, k2.node, "f"), "before the crash");
    k2.stop_pod(&used.volume_id, &pod).await;
    assert!(
        env.kubelet_mounts(1).is_empty(),
        "the restarted plugin unmounted the old mounts"
    );
    delete(&mut ctl, &used.volume_id).await.expect("DeleteVolume");
}

/// external-provisioner's capacity tracking asks GetCapacity per node: one dead node must not take
/// every other node's capacity down with it (the scheduler would stop placing volumes anywhere).
/// (The controller once asked every agent in turn and failed on the first unreachable one.)
#[tokio::test]
async fn capacity_of_live_nodes_is_answered_while_another_node_is_down() {
    let mut env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    env.kill_node(1);
    for node in ["node-1", "node-3"] {
        let cap = capacity_on(&mut ctl, node).await;
        assert!(
            matches!(cap, Ok(b) if b > 0),
            "GetCapacity on {node} with node-2 down: {cap:?}"
        );
    }
    let e = capacity_on(&mut ctl, "node-2").await;
    assert!(
        matches!(e, Ok(0)) || matches!(&e, Err(s) if s.code() == Code::Unavailable),
        "node-2: {e:?}"
    );
}

#[tokio::test]
async fn a_restarted_controller_resumes_provisioning_and_nodes_serve_meanwhile() {
    let mut env = Env::start(&THREE).await;
    let mut ctl = env.ctl().await;
    let before = create(&mut ctl, wffc("pvc-before", 16 * MIB, "node-1")).await;
    env.kill_controller();
    assert_ne!(
        code(ctl.create_volume(wffc("pvc-after", 16 * MIB, "node-3")).await),
        Code::Ok,
        "no controller, no provisioning"
    );
    let socket = format!("unix://{}", env.controller_socket().display());
    assert!(
        cellar::client::connect(&socket).await.is_err(),
        "nothing listens on {socket}"
    );
    // kubelet does not need the controller.
    let pod = Pod::new("pvc-before");
    {
        let mut k1 = Kubelet::on(&env, 0).await;
        k1.start_pod(&before.volume_id, &pod)
            .await
            .expect("publish with the controller down");
        pod.write(&env, k1.node, "f", "no controller needed");
    }

    env.start_controller();
    let mut ctl = env.ctl().await;
    let after = retry(
        "CreateVolume after the controller restart",
        &[Code::Unavailable, Code::ResourceExhausted],
        || {
            let mut ctl = ctl.clone();
            async move { ctl.create_volume(wffc("pvc-after", 16 * MIB, "node-3")).await }
        },
    )
    .await
    .into_inner()
    .volume
    .expect("volume");
    assert_eq!(after.volume_id, "local:node-3:default:pvc-after");
    env.wait_registered().await;
    let listed: Vec<String> = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.volume.map(|v| v.volume_id))
        .collect();
    assert_eq!(
        listed,
        vec![before.volume_id.clone(), after.volume_id],
        "every node's volumes"
    );
    Kubelet::on(&env, 0).await.stop_pod(&before.volume_id, &pod).await;
}

/// Who may talk to the agents and the registry, tried from node-3's network namespace: the TLS
/// handshake as openssl sees it (the server's alert), then a call through the controller's own
/// client holding the controller's certificate (served), another CA's (refused in the handshake)
/// and the nodes' (refused by the agent: only the controller may call it).
#[tokio::test]
async fn callers_without_a_certificate_or_from_another_ca_are_refused() {
    let env = Env::start(&THREE).await;
    let rogue = certs::Authority::new("someone else's CA").issue(&[CONTROLLER_HOST, AGENT_NAME]);
    std::fs::write(env.path("rogue.pem"), &rogue.cert).expect("rogue cert");
    std::fs::write(env.path("rogue.key"), &rogue.key).expect("rogue key");
    let from = env.nodes[2].net.clone();
    let agent = format!("{}:{AGENT_PORT}", env.nodes[0].addr);
    let registry = format!("{CONTROLLER_ADDR}:{REGISTRY_PORT}");
    let ours = certs::pair(env.dir.path(), certs::Role::Controller);
    let theirs = [env.path("rogue.pem"), env.path("rogue.key")];
    for (addr, name) in [(&agent, AGENT_NAME), (&registry, CONTROLLER_HOST)] {
        let ok = handshake(&env, &from, addr, name, Some(&ours));
        assert!(
            ok.contains("Verify return code: 0 (ok)") && !ok.contains("alert"),
            "{addr}, our certificate:\n{ok}"
        );
        let none = handshake(&env, &from, addr, name, None);
        assert!(
            none.contains("alert certificate required"),
            "{addr}, no certificate:\n{none}"
        );
        let other = handshake(&env, &from, addr, name, Some(&theirs));
        assert!(other.contains("alert unknown ca"), "{addr}, another CA:\n{other}");
    }

    let [ca, cert, key] = certs::read(env.dir.path(), certs::Role::Controller);
    let [_, node_cert, node_key] = certs::read(env.dir.path(), certs::Role::Node);
    let (trusted, refused, a_node) = Env::on_host(&from, move || {
        Box::pin(async move {
            let list = |cert: String, key: String| {
                let tls = Tls::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).expect("tls");
                let timeouts = Timeouts {
                    connect: Duration::from_secs(5),
                    call: Duration::from_secs(10),
                    storage: Duration::from_secs(10),
                    listing: Timeouts::LISTING_CALLS * Duration::from_secs(10),
                };
                let node = NodeId::parse("node-1").expect("node id");
                let at = HostPort::parse(&agent).expect("address");
                let remote = RemoteAgent::new(node, at, &tls, AGENT_NAME, timeouts).expect("client");
                async move { remote.volumes().await.map(|v| v.len()).map_err(Status::from) }
            };
            (
                list(cert, key).await,
                list(rogue.cert, rogue.key).await,
                list(node_cert, node_key).await,
            )
        })
    });
    assert_eq!(
        trusted.map_err(|s| s.to_string()),
        Ok(0),
        "the cluster's own certificate is let in"
    );
    let e = refused.expect_err("another CA's certificate is refused");
    assert_names(&e, Code::Unavailable, "node-1");
    // A node's certificate passes the handshake but is not the controller's: the agent answers
    // PERMISSION_DENIED, which the controller's client reports as a fault of the deployment.
    let e = a_node.expect_err("a node's certificate is refused by an agent");
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(
        e.message().contains("PermissionDenied: only the controller may call"),
        "{e}"
    );
    let mut ctl = env.ctl().await;
    let ghost = capacity_on(&mut ctl, "node-rogue").await.expect("GetCapacity");
    assert_eq!(ghost, 0, "no refused caller registered a node");
}

/// An openssl TLS client in network namespace `net` dialing `addr` (verifying `name` against the
/// cluster's CA), presenting `cert` (certificate, key) if given: its whole output. It keeps its
/// side open for a second, long enough to read what the server answers to the handshake.
fn handshake(env: &Env, net: &std::path::Path, addr: &str, name: &str, cert: Option<&[PathBuf; 2]>) -> String {
    let mut script =
        String::from(r#"sleep 1 | openssl s_client -connect "$1" -servername "$2" -verify_return_error -CAfile "$3""#);
    let mut args = vec![
        addr.to_string(),
        name.to_string(),
        env.path("ca.pem").display().to_string(),
    ];
    if let Some([c, k]) = cert {
        script += r#" -cert "$4" -key "$5""#;
        args.extend([c.display().to_string(), k.display().to_string()]);
    }
    let mut cmd = env::nsenter(Some(net), None, &["sh", "-c", &script, "sh"]);
    let out = env::output(cmd.args(&args));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test]
async fn csi_sanity_passes_in_split_mode_across_namespaces() {
    let Some(sanity) = common::sanity::find("the split-mode conformance run across namespaces") else {
        return;
    };
    // csi-sanity creates volumes with no topology and uses them on the node it is given: node-1 is
    // the node with the most room, where the controller puts such volumes; the other two take part
    // in everything else (registry, ListVolumes, GetCapacity).
    let env = Env::start(&[Pool::Default, Pool::Small(32), Pool::Small(32)]).await;
    let sanity = sanity.display().to_string();
    // csi-sanity makes its two directories with mkdir, not mkdir -p.
    run_in(&env, 0, &["mkdir", "-p", &format!("{KUBELET}/sanity")]);
    // csi-sanity plays kubelet on node-1: inside its kubelet namespace, with paths under kubelet's
    // directory, so the plugin's mounts land where kubelet would see them.
    let mount = format!("--csi.mountdir={KUBELET}/sanity/mount");
    let stage = format!("--csi.stagingdir={KUBELET}/sanity/stage");
    let endpoint = format!("--csi.endpoint=unix://{}", env.nodes[0].socket_in_ns());
    let controller = format!("--csi.controllerendpoint=unix://{}", env.controller_socket().display());
    let size = format!("--csi.testvolumesize={}", 64 * MIB);
    let expand = format!("--csi.testvolumeexpandsize={}", 96 * MIB);
    common::sanity::judge("split mode across namespaces", || {
        env::output(&mut env.in_kubelet(
            0,
            &[
                "timeout",
                "600",
                &sanity,
                &endpoint,
                &controller,
                &mount,
                &stage,
                &size,
                &expand,
                "--ginkgo.no-color",
                "--ginkgo.v",
            ],
        ))
    });
}

/// Builds an environment with a published volume on each of its two nodes (a small pool, an image
/// pool) on a thread of its own; `fail` makes it panic
/// there. Returns what the environment held.
fn run_and_drop(fail: bool) -> env::Footprint {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let out = seen.clone();
    let r = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let env = Env::start(&[Pool::Small(64), Pool::Image]).await;
            let mut ctl = env.ctl().await;
            for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
                let pv = format!("pvc-{node}");
                let v = create(&mut ctl, wffc(&pv, 8 * MIB, node)).await;
                let mut k = Kubelet::on(&env, i).await;
                k.start_pod(&v.volume_id, &Pod::new(&pv)).await.expect("publish");
                assert!(!env.kubelet_mounts(i).is_empty());
            }
            assert!(
                !loops_under(env.dir.path()).is_empty(),
                "node-2's image volume is attached"
            );
            *out.lock().expect("lock") = Some(env.footprint());
            assert!(!fail, "a test failing with its volume published");
        })
    })
    .join();
    assert_eq!(r.is_err(), fail, "the environment's thread ended as planned");
    let fp = seen.lock().expect("lock").take();
    fp.expect("the environment came up")
}

#[test]
fn teardown_leaves_nothing_behind_also_after_a_panic() {
    let footprints = [run_and_drop(false), run_and_drop(true)];
    let _alone = env::none_up();
    // Looked at with no other environment up: one could hold the route, or reuse a freed
    // namespace's inode number.
    for (fp, how) in footprints.iter().zip(["passing", "failed"]) {
        assert!(fp.pids.len() == 3 && fp.namespaces.len() == 6, "{fp:?}");
        let left = fp.leftovers();
        assert!(left.is_empty(), "after a {how} test: {left:#?}");
    }
    let (up, kubelet_was_there) = env::host_state();
    assert_eq!(up, 0);
    assert!(
        !env::blackhole_present(),
        "the blackhole route goes with the last environment"
    );
    assert_eq!(
        Some(std::path::Path::new(KUBELET).exists()),
        kubelet_was_there,
        "{KUBELET}, made for the tests, goes with the last environment"
    );
}
