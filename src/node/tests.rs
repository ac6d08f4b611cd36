//! The Node service's stage/publish logic over a recording mounter: the exact mounts it asks for,
//! in order, with what it records before each, on a pool in a temporary directory. No root needed:
//! nothing is mounted for real (`sys::mount::RecordingMounter`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::Code;

use super::state::NodeState;
use super::NodeService;
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::*;
use crate::storage::config::Config;
use crate::storage::engine::{LocalEngine, NewVolume};
use crate::storage::id::NodeId;
use crate::storage::record::Layout;
use crate::sys::devices::{Devices, RecordingDevices};
use crate::sys::files::RecordingFiles;
use crate::sys::mount::RecordingMounter;

struct Node {
    dir: tempfile::TempDir,
    svc: NodeService,
    mounter: Arc<RecordingMounter>,
    devices: Arc<RecordingDevices>,
    /// The Node service's own file operations (its mount state, staging and target paths).
    files: Arc<RecordingFiles>,
    config: Config,
}

impl Node {
    fn new() -> Node {
        Node::with(|_, _| {})
    }

    /// A node whose configuration `change` adds to (given the test's directory).
    fn with(change: impl FnOnce(&Path, &mut Config)) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default_for(dir.path());
        config.pools[0].layouts.push(Layout::Image);
        // A shared pool too (a plain directory here), whose directory volumes carry stage marks.
        let mut shared = config.pools[0].clone();
        shared.name = crate::storage::id::PoolName::parse("share").expect("pool name");
        shared.path = dir.path().join("share");
        shared.backend = crate::storage::config::Backend::Shared;
        shared.layouts = vec![Layout::Dir, Layout::Image];
        config.pools.push(shared);
        change(dir.path(), &mut config);
        Node::open(
            dir,
            config,
            Arc::new(RecordingMounter::default()),
            Arc::new(RecordingDevices::default()),
        )
    }

    /// The node's process started again over the same pools and mount state; the machine's
    /// mounts and devices (the fakes) are the same ones.
    fn restart(self) -> Node {
        let config = self.config.clone();
        let (mounter, devices) = (self.mounter.clone(), self.devices.clone());
        drop(self.svc);
        Node::open(self.dir, config, mounter, devices)
    }

    fn open(
        dir: tempfile::TempDir,
        config: Config,
        mounter: Arc<RecordingMounter>,
        devices: Arc<RecordingDevices>,
    ) -> Node {
        let node = NodeId::parse("n1").expect("node id");
        let engine = Arc::new(LocalEngine::open(node.clone(), &config).expect("engine"));
        let files = Arc::new(RecordingFiles::default());
        let state = Arc::new(NodeState::open(&dir.path().join("node"), files.clone()).expect("state"));
        let mut svc = NodeService::new(node, engine, state, 0);
        svc.mounter = mounter.clone();
        svc.devices = devices.clone();
        svc.files = files.clone();
        Node {
            dir,
            svc,
            mounter,
            devices,
            files,
            config,
        }
    }

    fn volume(&self, name: &str) -> String {
        self.create(name, None, 1 << 20)
    }

    /// A 32 MiB ext4 image volume (the file and its filesystem are real; no device is).
    fn image(&self, name: &str) -> String {
        self.create(name, Some(Layout::Image), 32 << 20)
    }

    /// A volume of the shared pool `share`.
    fn shared(&self, name: &str, layout: Layout, bytes: u64) -> String {
        self.shared_like(NewVolume::plain(name, Some(layout), bytes))
    }

    /// The volume `req` asks for, made in the shared pool `share`.
    fn shared_like(&self, mut req: NewVolume) -> String {
        req.pool = Some(crate::storage::id::PoolName::parse("share").expect("pool name"));
        self.svc.engine.create_volume(req).expect("create").id.to_string()
    }

    /// The leases held on the shared pool.
    fn leases(&self) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(self.path("share/.leases"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    }

    fn create(&self, name: &str, layout: Option<Layout>, bytes: u64) -> String {
        self.svc
            .engine
            .create_volume(NewVolume::plain(name, layout, bytes))
            .expect("create")
            .id
            .to_string()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn stage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.svc
            .stage(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap(Mode::SingleNodeWriter)),
                ..Default::default()
            })
            .map(|_| ())
            .map_err(tonic::Status::from)
    }

    fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.svc
            .unstage(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .map(|_| ())
            .map_err(tonic::Status::from)
    }

    fn expand(&self, id: &str, path: &Path) -> Result<NodeExpandVolumeResponse, tonic::Status> {
        self.svc
            .expand(NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .map_err(tonic::Status::from)
    }

    /// The image file behind a staged image volume, as the node's state names it.
    fn backing(&self, id: &str) -> PathBuf {
        self.svc
            .state
            .get(id)
            .staged
            .and_then(|s| s.backing)
            .expect("an image's stage names its file")
    }

    fn count(&self, prefix: &str) -> usize {
        self.devices.calls().iter().filter(|c| c.starts_with(prefix)).count()
    }

    /// NodePublishVolume as kubelet calls it: the target's parent exists, the target need not.
    fn publish(&self, id: &str, staging: &Path, target: &Path, mode: Mode, ro: bool) -> Result<(), tonic::Status> {
        std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
        self.svc
            .publish(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap(mode)),
                readonly: ro,
                ..Default::default()
            })
            .map(|_| ())
            .map_err(tonic::Status::from)
    }
}

fn cap(mode: Mode) -> VolumeCapability {
    crate::client::mount_capability(mode, vec![])
}

#[test]
fn stage_records_its_intent_then_binds_the_volume_once() {
    let n = Node::new();
    let id = n.volume("pvc-a");
    let staging = n.path("stage-a");
    n.stage(&id, &staging).expect("stage");
    let calls = n.mounter.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("bind /proc/self/fd/"),
        "the pinned directory is bound: {calls:?}"
    );
    assert!(calls[0].contains(&format!(" {} ", staging.display())), "{calls:?}");
    assert_eq!(n.svc.state.get(&id).staged.map(|s| s.path), Some(staging.clone()));
    // Kubelet's retry finds it staged: no second mount.
    n.stage(&id, &staging).expect("stage again");
    assert_eq!(n.mounter.calls().len(), 1);
    // Staged elsewhere while staged here: refused, nothing mounted.
    let err = n.stage(&id, &n.path("stage-b")).expect_err("second staging path");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(n.mounter.calls().len(), 1);
}

/// A staging or target path in what cellar manages in a pool (a volume's data, another
/// collection, the stage marks), the pool's root, or a path holding a pool, through a symbolic
/// link too, is INVALID_ARGUMENT: a mount there would show this volume's data inside another's,
/// or hide the pool. Nothing is made or mounted.
#[test]
fn a_stage_or_publish_into_a_pool_is_refused() {
    let n = Node::new();
    let (a, b) = (n.volume("pvc-a"), n.volume("pvc-b"));
    let pool = n.path("pools/default");
    let inside_b = pool.join("volumes/pvc-b/evil");
    std::os::unix::fs::symlink(pool.join("volumes"), n.path("link")).expect("symlink");
    // Spelled in other case, as a share that folds case (SMB) would still resolve it.
    let shouted = PathBuf::from(n.path("share/snapshots/s").to_string_lossy().to_uppercase());
    let bad = [
        inside_b.clone(),
        pool.join(".staged/x"),
        pool.clone(),
        n.path("pools"),
        n.path("share/snapshots/s"),
        n.path("link/pvc-b/evil"),
        shouted,
    ];
    let refused = |path: &Path, answer| refused_path(path, answer, " is ");
    for path in &bad {
        refused(path, n.stage(&a, path));
    }
    let staging = n.path("stage-a");
    n.stage(&a, &staging).expect("stage");
    for path in &bad {
        refused(path, n.publish(&a, &staging, path, Mode::SingleNodeWriter, false));
    }
    // Inside a volume mounted here (its bind shows its data), or over the node's mount records.
    let under_stage = staging.join("evil");
    refused(&under_stage, n.stage(&b, &under_stage));
    for path in [n.path("node"), n.path("node/x")] {
        refused(&path, n.stage(&b, &path));
    }
    assert!(!under_stage.exists(), "nothing made inside the staged volume");
    assert!(!inside_b.exists(), "nothing made inside another volume");
    assert_eq!(n.mounter.calls().len(), 1, "only the good stage mounted");
    // A path beside a pool's collections is not the pool's.
    n.publish(
        &a,
        &staging,
        &pool.join("not-managed/pod"),
        Mode::SingleNodeWriter,
        false,
    )
    .expect("a path in the pool's root that cellar does not manage");
}

/// `answer`, for a stage or publish at `path`, is INVALID_ARGUMENT saying `says`.
fn refused_path(path: &Path, answer: Result<(), tonic::Status>, says: &str) {
    let err = answer.expect_err("a path refused");
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{}: {}",
        path.display(),
        err.message()
    );
    assert!(err.message().contains(says), "{}", err.message());
}

/// A state file this release cannot read as a volume's mounts (a later release's, edited by hand)
/// still names, in JSON, where the volume is staged and published: a stage or publish of another
/// volume inside those paths is refused as inside a readable state's would be. (Of a file that is
/// not JSON nothing is known; docs/design.md says so.)
#[test]
fn a_path_inside_the_mounts_an_unreadable_state_file_still_names_is_refused() {
    let mut n = Node::new();
    let (a, b) = (n.volume("pvc-a"), n.volume("pvc-b"));
    let (staging, target) = (n.path("stage-a"), n.path("pod-a/mount"));
    n.stage(&a, &staging).expect("stage");
    n.publish(&a, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    let (file, _) = the_state_file(&n);
    let later = serde_json::json!({
        "volume_id": a,
        "staged": {"path": staging, "kind": "from-a-later-release"},
        "published": {target.display().to_string(): {"access": "from-a-later-release"}},
    });
    std::fs::write(&file, serde_json::to_vec(&later).expect("encode")).expect("spoil the state");
    n = n.restart();
    let mounts = n.mounter.calls().len();
    let (under_stage, under_target) = (staging.join("evil"), target.join("evil"));
    let refused = |path: &Path, answer| refused_path(path, answer, &format!("where volume {a} is mounted"));
    refused(&under_stage, n.stage(&b, &under_stage));
    refused(&under_target, n.stage(&b, &under_target));
    let staging_b = n.path("stage-b");
    n.stage(&b, &staging_b).expect("a path of its own");
    refused(
        &under_target,
        n.publish(&b, &staging_b, &under_target, Mode::SingleNodeWriter, false),
    );
    assert_eq!(n.mounter.calls().len(), mounts + 1, "only the good stage mounted");
}

#[test]
fn a_path_that_cannot_be_a_directory_is_a_client_error() {
    let n = Node::new();
    let a = n.volume("pvc-a");
    std::fs::write(n.path("file"), b"").expect("file");
    std::os::unix::fs::symlink(n.path("loop"), n.path("loop")).expect("symlink loop");
    let long = n.path(&"x".repeat(300));
    for path in [n.path("file/stage"), n.path("loop/stage"), long.join("stage")] {
        refused_path(&path, n.stage(&a, &path), "cannot be a directory here");
    }
    assert!(n.mounter.calls().is_empty(), "nothing mounted");
}

/// Adds a btrfs-only pool `fast` on `dir/disks/fast`, a directory that is not btrfs: it does not open.
fn add_pool_that_cannot_open(dir: &Path, config: &mut crate::storage::config::Config) {
    let mut fast = config.pools[0].clone();
    fast.name = crate::storage::id::PoolName::parse("fast").expect("pool name");
    fast.path = dir.join("disks/fast");
    fast.layouts = vec![Layout::Btrfs];
    config.pools.push(fast);
    std::fs::create_dir_all(dir.join("disks/fast")).expect("pool dir");
}

#[test]
fn a_pool_that_failed_to_open_is_guarded_too() {
    // A btrfs-only pool on a directory that is not btrfs does not open; it may open after a
    // restart, and must then not find a volume mounted in its managed part.
    let n = Node::with(|dir, config| {
        add_pool_that_cannot_open(dir, config);
        std::os::unix::fs::symlink(dir.join("disks"), dir.join("disks-link")).expect("symlink");
    });
    assert!(
        n.svc.engine.broken_pools().iter().any(|(p, _)| p.as_str() == "fast"),
        "the btrfs-only pool is broken here"
    );
    let a = n.volume("pvc-a");
    for path in [
        n.path("disks/fast/volumes/pvc-x"),
        n.path("disks-link/fast/.staged/x"),
        n.path("disks/FAST/Volumes/pvc-x"),
        n.path("disks"),
    ] {
        refused_path(&path, n.stage(&a, &path), "pool 'fast'");
    }
    assert!(n.mounter.calls().is_empty(), "nothing mounted");
    n.stage(&a, &n.path("disks/fast/not-managed"))
        .expect("a path in the broken pool's root that cellar does not manage");
}

/// A volume of a pool that failed to open here is FAILED_PRECONDITION naming the pool and why
/// (docs/pools.md), not NOT_FOUND: its record is there, on a disk or share this node could not
/// open (a share whose mount failed at the start), and kubelet must not take it for gone.
#[test]
fn a_volume_of_a_pool_that_failed_to_open_is_not_called_missing() {
    let n = Node::with(add_pool_that_cannot_open);
    let id = format!("local:{}:fast:pvc-x", n.svc.engine.node().as_str());
    let err = n.stage(&id, &n.path("stage")).expect_err("its pool is not open");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fast"), "{}", err.message());
    assert!(n.mounter.calls().is_empty(), "nothing mounted");
}

#[test]
fn publish_needs_the_stage_and_binds_from_it_read_only_as_asked() {
    let n = Node::new();
    let id = n.volume("pvc-b");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    let err = n
        .publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect_err("not staged");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(n.mounter.calls().is_empty());
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, true)
        .expect("publish read-only");
    let mounted = n.mounter.mounted();
    let (src, dst, flags) = mounted.last().expect("a publish mount");
    assert_eq!((src, dst), (&staging, &target));
    assert!(flags.read_only, "readonly publish is a read-only bind");
    assert!(target.is_dir(), "the target directory is made");
    // The same publish again is OK; with other options it is ALREADY_EXISTS.
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, true)
        .expect("same publish");
    let err = n
        .publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect_err("other options");
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[test]
fn stats_of_a_publish_whose_mount_is_gone_give_no_figures_of_what_is_under_it() {
    let n = Node::new();
    let id = n.volume("pvc-stats");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    let stats = |n: &Node| {
        n.svc
            .stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .expect("stats")
    };
    assert!(!stats(&n).usage.is_empty(), "a mounted volume is measured");
    // Someone unmounts the pod's mount: the bare directory is on the node's own filesystem.
    use crate::sys::mount::Mounter;
    n.mounter.unmount(&target).expect("lose the mount");
    let lost = stats(&n);
    assert!(
        lost.usage.is_empty(),
        "figures of the filesystem under the target: {lost:?}"
    );
    let condition = lost.volume_condition.expect("a condition");
    assert!(condition.abnormal, "{condition:?}");
}

#[test]
fn a_single_writer_volume_is_published_once() {
    let n = Node::new();
    let id = n.volume("pvc-c");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    n.publish(
        &id,
        &staging,
        &n.path("pod1/mount"),
        Mode::SingleNodeSingleWriter,
        false,
    )
    .expect("first publish");
    let err = n
        .publish(
            &id,
            &staging,
            &n.path("pod2/mount"),
            Mode::SingleNodeSingleWriter,
            false,
        )
        .expect_err("RWOP second publish");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(n.mounter.mounted().len(), 2, "the stage and one publish");
}

#[test]
fn unpublish_and_unstage_undo_only_their_own_mounts() {
    let n = Node::new();
    let id = n.volume("pvc-d");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    // Something else's path: nothing of ours there, nothing unmounted.
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: n.path("elsewhere").display().to_string(),
        })
        .expect("unpublish of a path not ours is OK");
    assert_eq!(n.mounter.mounted().len(), 2);
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .expect("unpublish");
    assert!(!target.exists(), "the target the driver made is removed");
    n.svc
        .unstage(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .expect("unstage");
    assert!(n.mounter.mounted().is_empty());
    assert!(n.svc.state.get(&id).staged.is_none(), "the state forgets the stage");
    let calls = n.mounter.calls();
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("unmount")).count(),
        2,
        "one unmount each: {calls:?}"
    );
}

#[test]
fn expand_and_stats_answer_only_for_the_volumes_own_paths() {
    let n = Node::new();
    let id = n.volume("pvc-e");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    for path in ["/", "/etc", "relative/path"] {
        let err = n
            .svc
            .expand(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: path.into(),
                ..Default::default()
            })
            .expect_err("not the volume's path");
        assert_eq!(tonic::Status::from(err).code(), Code::NotFound, "{path}");
    }
    n.svc
        .expand(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .expect("the staging path");
}

#[test]
fn a_delete_waits_for_no_node_call_and_refuses_what_is_mounted() {
    use crate::storage::id::VolumeId;
    use crate::storage::StorageError;
    let n = Node::new();
    let id = n.volume("pvc-race");
    let vid = VolumeId::parse(&id).expect("id");
    // A stage is running (it holds the volume's node lock): the delete is ABORTED, not run beside it.
    let stage_running = n.svc.in_flight.try_take(id.clone()).expect("lock");
    assert!(matches!(n.svc.engine.delete_volume(&vid), Err(StorageError::Busy(_))));
    drop(stage_running);
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    assert!(matches!(n.svc.engine.delete_volume(&vid), Err(StorageError::InUse(m)) if m.contains("stage")));
    n.svc
        .unstage(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .expect("unstage");
    n.svc.engine.delete_volume(&vid).expect("delete once unstaged");
    assert!(n.svc.engine.volume(&vid).is_none());
}

/// A state file the node cannot read (torn, or JSON it cannot read as a volume's mounts) was
/// skipped at start: the node forgot the volume was staged and published, a DeleteVolume removed
/// the data under the pod, and the unpublish and unstage answered OK unmounting nothing. It is
/// kept, and its volume is refused deletes and node calls (FAILED_PRECONDITION naming the file)
/// until the file is repaired or removed; the next call reads it again, no restart needed.
#[test]
fn a_state_file_that_cannot_be_read_keeps_its_volume_from_deletes_and_node_calls() {
    use crate::storage::id::VolumeId;
    use crate::storage::StorageError;
    let mut n = Node::new();
    let id = n.volume("pvc-kept");
    let vid = VolumeId::parse(&id).expect("id");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    let (file, good) = the_state_file(&n);
    let file = &file;
    let torn = good[..good.len() / 2].to_vec();
    let other_shape = format!(r#"{{"volume_id":"{id}","staged":7,"published":[]}}"#).into_bytes();
    for bad in [torn, other_shape] {
        std::fs::write(file, &bad).expect("spoil the state");
        n = n.restart();
        let mounts = n.mounter.calls().len();
        match n.svc.engine.delete_volume(&vid) {
            Err(StorageError::InUse(m)) => assert!(m.contains(&file.display().to_string()), "{m}"),
            other => panic!("the delete of a volume whose state is unreadable: {other:?}"),
        }
        let (_, data) = n.svc.engine.volume_data(&vid).expect("the volume is kept");
        assert!(data.is_dir(), "and its data");
        let unpublished = n.svc.unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        });
        let unstaged = n.unstage(&id, &staging);
        let staged = n.stage(&id, &staging);
        let published = n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false);
        for r in [
            unpublished.map(|_| ()).map_err(tonic::Status::from),
            unstaged,
            staged,
            published,
        ] {
            let e = r.expect_err("a node call on a volume whose state is unreadable");
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains(&file.display().to_string()), "{e:?}");
        }
        assert_eq!(n.mounter.calls().len(), mounts, "nothing mounted or unmounted");
        assert_eq!(std::fs::read(file).expect("kept"), bad, "the file is kept as it is");
    }
    // Repaired by hand: the next call reads it again and goes on where the node left off.
    std::fs::write(file, &good).expect("repair");
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .expect("unpublish");
    n.unstage(&id, &staging).expect("unstage");
    assert!(n.mounter.mounted().is_empty(), "{:?}", n.mounter.calls());
    n.svc.engine.delete_volume(&vid).expect("delete once unstaged");
    // Removed by hand (after unmounting by hand): the volume is usable again.
    let other = n.volume("pvc-other");
    n.stage(&other, &staging).expect("stage");
    let file = std::fs::read_dir(n.path("node"))
        .expect("state dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a state file");
    std::fs::write(&file, b"{").expect("spoil the state");
    n = n.restart();
    assert!(n
        .svc
        .engine
        .delete_volume(&VolumeId::parse(&other).expect("id"))
        .is_err());
    std::fs::remove_file(&file).expect("remove");
    n.svc
        .engine
        .delete_volume(&VolumeId::parse(&other).expect("id"))
        .expect("delete once the file is gone");
}

#[test]
fn an_image_is_attached_once_mounted_with_its_filesystem_and_detached_on_unstage() {
    let n = Node::new();
    let id = n.image("pvc-img");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    let data = n.backing(&id);
    assert_eq!(n.devices.attached(), vec![data.clone()], "one device over the image");
    let mounts = n.mounter.calls();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(
        mounts[0].starts_with(&format!("mount /dev/loop0 {} ext4", staging.display())),
        "{mounts:?}"
    );
    // Kubelet's retry: the same device, no second attach or mount.
    n.stage(&id, &staging).expect("stage again");
    assert_eq!(n.count("attach"), 1, "{:?}", n.devices.calls());
    assert_eq!(n.mounter.calls().len(), 1);
    n.unstage(&id, &staging).expect("unstage");
    assert!(n.mounter.mounted().is_empty(), "unmounted");
    assert!(n.devices.attached().is_empty(), "detached");
    assert!(n.svc.state.get(&id).staged.is_none());
}

/// A stage or publish naming another filesystem than the image holds would mount it as the image's
/// anyway: the spec's "Exceeds capabilities", FAILED_PRECONDITION, and nothing is attached or
/// mounted. No filesystem named, or the image's own, is served.
#[test]
fn an_image_asked_for_as_another_filesystem_is_failed_precondition() {
    let n = Node::new();
    let id = n.image("pvc-img-fs");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    let as_fs = |fs: &str| VolumeCapability {
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    };
    let stage = |fs: &str| {
        n.svc
            .stage(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(as_fs(fs)),
                ..Default::default()
            })
            .map_err(tonic::Status::from)
    };
    let err = stage("xfs").expect_err("an ext4 image staged as xfs");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ext4"), "{}", err.message());
    assert!(n.devices.attached().is_empty(), "nothing attached");
    assert!(n.mounter.mounted().is_empty(), "nothing mounted");
    assert!(n.svc.state.get(&id).staged.is_none(), "nothing recorded");
    stage("ext4").expect("staged as its own filesystem");
    stage("").expect("staged without a filesystem named");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
    let err = n
        .svc
        .publish(NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(as_fs("xfs")),
            ..Default::default()
        })
        .map_err(tonic::Status::from)
        .expect_err("an ext4 image published as xfs");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(n.svc.state.get(&id).published.is_empty(), "no publish recorded");
    n.unstage(&id, &staging).expect("unstage");
}

#[test]
fn a_stage_after_its_mount_was_lost_reuses_the_device_it_attached() {
    let n = Node::new();
    let id = n.image("pvc-again");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    // The mount is gone (a restart of the machine's mount namespace, a hand-run umount), the
    // device and the node's record of the stage are not.
    use crate::sys::mount::Mounter;
    n.mounter.unmount(&staging).expect("lose the mount");
    n.stage(&id, &staging).expect("stage again");
    assert_eq!(n.count("attach"), 1, "no second device: {:?}", n.devices.calls());
    assert_eq!(n.count("refresh"), 1, "the device found is sized to its file");
    assert_eq!(n.devices.attached().len(), 1);
    assert_eq!(n.mounter.mounted().len(), 1, "mounted again");
    n.unstage(&id, &staging).expect("unstage");
    assert!(n.devices.attached().is_empty());
}

#[test]
fn an_unstage_converges_when_the_loop_device_vanished_behind_its_back() {
    let n = Node::new();
    let id = n.image("pvc-vanish");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    n.devices.vanish(&n.backing(&id));
    let stats = n
        .svc
        .stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .expect("stats");
    let condition = stats.volume_condition.expect("condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains("loop device"), "{condition:?}");
    n.unstage(&id, &staging).expect("unstage without its device");
    assert!(n.mounter.mounted().is_empty());
    assert!(n.svc.state.get(&id).staged.is_none(), "the state forgets the stage");
    // A failing detach is an error the retry gets past, never a device left for good.
    n.stage(&id, &staging).expect("stage");
    n.devices.fail_next("detach", libc::EBUSY);
    let err = n.unstage(&id, &staging).expect_err("detach fails once");
    assert_eq!(err.code(), Code::Internal, "{err}");
    n.unstage(&id, &staging).expect("the retry converges");
    assert!(n.devices.attached().is_empty());
    assert!(n.mounter.mounted().is_empty());
}

#[test]
fn a_failed_attach_mounts_nothing_and_its_retry_converges() {
    let n = Node::new();
    let id = n.image("pvc-attach");
    let staging = n.path("stage");
    // EIO: the device (or the disk under it) is not answering: the CO is told to retry.
    n.devices.fail_next("attach", libc::EIO);
    let err = n.stage(&id, &staging).expect_err("attach fails");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    n.devices.fail_next("attach", libc::EBUSY);
    let err = n.stage(&id, &staging).expect_err("attach fails again");
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(n.mounter.mounted().is_empty(), "nothing mounted");
    assert!(n.devices.attached().is_empty(), "nothing attached");
    n.stage(&id, &staging).expect("the retry stages it");
    assert_eq!(n.devices.attached().len(), 1);
    n.unstage(&id, &staging).expect("unstage");
}

#[test]
fn an_image_deleted_under_a_stage_is_not_found_and_leaves_nothing() {
    use crate::crash::in_thread::{pause_at, Pause};
    let n = Node::new();
    let id = n.shared("pvc-gone", Layout::Image, 32 << 20);
    let staging = n.path("stage");
    let (_, data) = n.svc.volume(&id).expect("the volume");
    let record = data.with_extension("json");
    assert!(record.is_file(), "the record beside the image: {}", record.display());
    // Another replica's DeleteVolume removed the image and its record after this node read it.
    let pause = Arc::new(Pause::default());
    let err = std::thread::scope(|s| {
        let staging = s.spawn(|| {
            pause_at(Some(("stage:before-attach", pause.clone())));
            n.stage(&id, &staging)
        });
        assert!(
            pause.reached(std::time::Duration::from_secs(60)),
            "the stage reaches its attach"
        );
        std::fs::remove_file(&data).expect("remove the image");
        std::fs::remove_file(&record).expect("remove the record");
        pause.release();
        staging.join().expect("no panic")
    })
    .expect_err("nothing to attach");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains("deleted"), "{err}");
    assert!(n.devices.attached().is_empty(), "nothing attached");
    assert!(n.mounter.mounted().is_empty(), "nothing mounted");
    assert!(n.svc.state.get(&id).staged.is_none(), "no intent left");
    let held = n.leases();
    assert!(held.is_empty(), "no lease left: {held:?}");
}

#[test]
fn a_shared_image_another_node_has_mounted_is_refused_and_leaves_nothing() {
    use std::os::unix::fs::FileExt;
    let n = Node::new();
    let id = n.shared("pvc-mmp", Layout::Image, 32 << 20);
    // Made with ext4's multi-mount protection (INCOMPAT_MMP in the superblock's incompatible
    // features, at 1024 + 0x60), so that a second mount is the kernel's to refuse.
    let mmp = |volume: &str| {
        let (_, data) = n.svc.volume(volume).expect("the volume");
        let mut incompat = [0u8; 4];
        std::fs::File::open(&data)
            .expect("image")
            .read_exact_at(&mut incompat, 1024 + 0x60)
            .expect("superblock");
        u32::from_le_bytes(incompat) & 0x100 != 0
    };
    assert!(mmp(&id), "a shared ext4 image has MMP");
    // A local image does not need it.
    assert!(!mmp(&n.image("pvc-local")), "a local image has no MMP");
    let (_, data) = n.svc.volume(&id).expect("the volume");
    assert_eq!(
        crate::sys::fstools::mmp(&data).expect("read"),
        Some(crate::sys::fstools::Mmp::Clean)
    );
    // Another node has the filesystem mounted: its kernel keeps a sequence number and its name
    // in the MMP block, and ours refuses the mount (EBUSY since 6.4, EINVAL before; e2fsck of an
    // offline grow refuses with its own failure).
    let staging = n.path("stage");
    for (seq, op, errno, says) in [
        (7u32, "mount", libc::EBUSY, "node 'node-2'"),
        (7, "mount", libc::EINVAL, "node 'node-2'"),
        (7, "grow-offline", libc::EIO, "node 'node-2'"),
        (0xE24D_4D50, "mount", libc::EBUSY, "clear_mmp"),
    ] {
        set_mmp(&data, seq, b"node-2");
        if op == "grow-offline" {
            n.svc
                .engine
                .set_fs_bytes(&crate::storage::id::VolumeId::parse(&id).expect("id"), 16 << 20)
                .expect("smaller fs");
        }
        n.mounter.fail_next(op, errno);
        n.devices.fail_next(op, errno);
        let err = n.stage(&id, &staging).expect_err("mounted elsewhere");
        n.mounter.disarm();
        n.devices.disarm();
        assert_eq!(err.code(), Code::FailedPrecondition, "{op} {errno}: {err}");
        assert!(err.message().contains(says), "{err}");
        assert!(n.devices.attached().is_empty(), "no device left");
        assert!(n.svc.state.get(&id).staged.is_none(), "no intent left");
        let held = n.leases();
        assert!(held.is_empty(), "the lease is given back: {held:?}");
    }
    // Once the other node lets go, the stage goes through.
    set_mmp(&data, 0xFF4D_4D50, b"");
    n.stage(&id, &staging).expect("stage");
    n.unstage(&id, &staging).expect("unstage");
}

/// Writes the sequence number and node name of the ext4 MMP block of the image `data`, as the
/// kernel of a node mounting it (or e2fsck) would.
fn set_mmp(data: &Path, seq: u32, node: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data)
        .expect("image");
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024).expect("superblock");
    let block_size = 1024u64 << u32::from_le_bytes(sb[0x18..0x1c].try_into().expect("4 bytes"));
    let block = u64::from_le_bytes(sb[0x168..0x170].try_into().expect("8 bytes"));
    let mut name = [0u8; 64];
    name[..node.len()].copy_from_slice(node);
    f.write_all_at(&seq.to_le_bytes(), block * block_size + 4).expect("seq");
    f.write_all_at(&name, block * block_size + 16).expect("name");
}

#[test]
fn a_failed_mount_of_a_local_image_leaves_no_device_or_intent() {
    let n = Node::new();
    let id = n.image("pvc-bad");
    let staging = n.path("stage");
    n.mounter.fail_next("mount", libc::EUCLEAN);
    let err = n.stage(&id, &staging).expect_err("a filesystem the kernel refuses");
    assert_ne!(err.code(), Code::Ok);
    assert!(
        n.devices.attached().is_empty(),
        "kubelet never unstages a failed stage: no device left"
    );
    assert!(n.svc.state.get(&id).staged.is_none(), "no intent left");
    n.stage(&id, &staging).expect("stage");
    n.unstage(&id, &staging).expect("unstage");
}

#[test]
fn expand_grows_a_staged_images_filesystem_through_its_device() {
    let n = Node::new();
    let id = n.image("pvc-grow");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    let grown = n.expand(&id, &staging).expect("expand");
    assert_eq!(grown.capacity_bytes, 32 << 20);
    let calls = n.devices.calls();
    assert!(
        calls.contains(&format!("grow-online ext4 /dev/loop0 {}", staging.display())),
        "{calls:?}"
    );
    // Without its device the volume cannot grow here now: it grows at its next stage.
    n.devices.vanish(&n.backing(&id));
    let err = n.expand(&id, &staging).expect_err("no device");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    n.unstage(&id, &staging).expect("unstage");
}

/// An ext4 filesystem the kernel will not grow while mounted (resize2fs: "Permission denied to
/// resize filesystem") has not grown: NodeExpandVolume is FAILED_PRECONDITION (the spec's "Volume
/// in use"), not OK with a smaller size, which kubelet would take as the resize done. Once it can
/// grow (here: the next call), it is OK with the capacity.
#[test]
fn an_ext4_image_that_cannot_grow_online_is_failed_precondition() {
    let n = Node::new();
    let id = n.image("pvc-grow-later");
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    n.devices.fail_next("grow-online", libc::EPERM);
    let err = n.expand(&id, &staging).expect_err("not grown");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("next stage"), "{err}");
    // A passing fault of the grow is not "in use": its own error, which kubelet retries.
    n.devices.fail_next("grow-online", libc::EIO);
    let err = n.expand(&id, &staging).expect_err("not grown");
    assert_ne!(err.code(), Code::FailedPrecondition, "{err}");
    let grown = n.expand(&id, &staging).expect("grown");
    assert_eq!(grown.capacity_bytes, 32 << 20);
    n.unstage(&id, &staging).expect("unstage");
}

#[test]
fn an_unstage_under_a_live_publish_is_refused_for_every_layout() {
    let n = Node::new();
    let shared = n.shared("pvc-shared", Layout::Dir, 1 << 20);
    for id in [n.volume("pvc-local"), shared.clone()] {
        let (staging, target) = (n.path(&format!("stage-{id}")), n.path(&format!("pod-{id}/mount")));
        n.stage(&id, &staging).expect("stage");
        n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
            .expect("publish");
        // kubelet unstages only after every unpublish; a caller that does not is told so, and the
        // volume stays staged: the shared volume keeps the mark that keeps a controller's delete away.
        let err = n.unstage(&id, &staging).expect_err("a publish is still mounted");
        assert_eq!(err.code(), Code::FailedPrecondition, "{id}: {err:?}");
        assert!(n.svc.state.get(&id).staged.is_some(), "{id}: still staged");
        assert_eq!(n.mounter.mounted().len(), 2, "{id}: nothing unmounted");
        if id == shared {
            let marks = n.path("share/.staged");
            let listed: Vec<_> = std::fs::read_dir(&marks).expect("marks").flatten().collect();
            assert_eq!(listed.len(), 1, "the stage mark stays on the share");
        }
        n.svc
            .unpublish(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
            })
            .expect("unpublish");
        n.unstage(&id, &staging).expect("then the unstage");
        assert!(n.mounter.mounted().is_empty());
    }
    assert!(
        !n.path("share/.staged").read_dir().expect("marks").any(|_| true),
        "the mark goes with the stage"
    );
}

/// A shared volume's stage whose mark on the share cannot be written fails, and leaves no intent:
/// kubelet never unstages a failed stage, and the intent kept every DeleteVolume away.
#[test]
fn a_shared_stage_whose_mark_fails_leaves_no_intent() {
    use crate::crash::in_thread::{fail_at, fail_once_at};
    let n = Node::new();
    let id = n.shared("pvc-marked", Layout::Dir, 1 << 20);
    let staging = n.path("stage-marked");
    std::fs::create_dir_all(&staging).expect("staging path");
    fail_once_at("file:mkdir", libc::EINTR);
    let err = n.stage(&id, &staging).expect_err("the mark's directory cannot be made");
    fail_at(None);
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(n.svc.state.get(&id).staged.is_none(), "no intent left");
    assert!(n.mounter.mounted().is_empty(), "nothing mounted");
    n.stage(&id, &staging).expect("the retry stages");
    assert!(n.svc.state.get(&id).staged.is_some());
    n.unstage(&id, &staging).expect("unstage");
}

/// A raw block image volume of `bytes`, staged read-write at `staging` by `svc`.
fn block_volume(svc: &NodeService, name: &str, staging: &Path) -> String {
    let mut v = NewVolume::plain(name, Some(Layout::Image), 16 << 20);
    v.mode = crate::storage::record::VolumeMode::Block;
    let id = svc.engine.create_volume(v).expect("create").id.to_string();
    stage_block(svc, &id, staging).expect("stage");
    id
}

fn stage_block(svc: &NodeService, id: &str, staging: &Path) -> Result<(), tonic::Status> {
    svc.stage(NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(crate::client::block_capability(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .map(|_| ())
    .map_err(tonic::Status::from)
}

fn block_publish(svc: &NodeService, id: &str, staging: &Path, target: &Path, ro: bool) -> Result<(), tonic::Status> {
    svc.publish(NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(crate::client::block_capability(Mode::SingleNodeWriter)),
        readonly: ro,
        ..Default::default()
    })
    .map(|_| ())
    .map_err(tonic::Status::from)
}

#[test]
fn a_read_only_block_publish_of_a_read_write_stage_gets_a_read_only_device_of_its_own() {
    let n = Node::new();
    let staging = n.path("stage");
    let id = block_volume(&n.svc, "pvc-b", &staging);
    let (rw, ro) = (n.path("pod-rw"), n.path("pod-ro"));
    block_publish(&n.svc, &id, &staging, &rw, false).expect("read-write publish");
    block_publish(&n.svc, &id, &staging, &ro, true).expect("read-only publish");
    block_publish(&n.svc, &id, &staging, &ro, true).expect("its retry");
    let attaches: Vec<_> = n
        .devices
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("attach"))
        .collect();
    assert_eq!(
        attaches.len(),
        2,
        "the stage's device and one read-only device: {attaches:?}"
    );
    assert!(
        attaches[0].ends_with("ro=false") && attaches[1].ends_with("ro=true"),
        "{attaches:?}"
    );
    let mounted = n.mounter.mounted();
    let source = |t: &Path| mounted.iter().find(|m| m.1 == t).map(|m| m.0.clone()).expect("bound");
    assert_ne!(
        source(&rw),
        source(&ro),
        "the read-only publish is not bound from the writable device"
    );
    let recorded = n.svc.state.get(&id).published[&ro].device.clone();
    assert_eq!(recorded, Some(source(&ro)), "its device is recorded");
    // Another read-write publish still binds the stage's device, not the read-only one.
    block_publish(&n.svc, &id, &staging, &n.path("pod-rw2"), false).expect("second read-write publish");
    assert_eq!(source(&rw), n.mounter.mounted().last().expect("bound").0);
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: ro.display().to_string(),
        })
        .expect("unpublish");
    assert_eq!(
        n.devices.attached().len(),
        1,
        "the read-only device goes with its publish"
    );
    for t in [&rw, &n.path("pod-rw2")] {
        n.svc
            .unpublish(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: t.display().to_string(),
            })
            .expect("unpublish");
    }
    n.unstage(&id, &staging).expect("unstage");
    assert!(n.devices.attached().is_empty());
    assert!(n.mounter.mounted().is_empty());
}

/// The source a target is bound from, in the fake mounter.
fn bound_from(n: &Node, target: &Path) -> PathBuf {
    let mounted = n.mounter.mounted();
    mounted
        .iter()
        .find(|m| m.1 == target)
        .map(|m| m.0.clone())
        .expect("bound")
}

fn read_only_device(n: &Node, device: &Path) -> bool {
    let number = device
        .to_str()
        .and_then(|p| p.strip_prefix("/dev/loop"))
        .expect("a loop device");
    let d = crate::sys::loopdev::LoopDevice::new(number.parse().expect("its number"));
    n.devices.is_read_only(&d).expect("attached")
}

#[test]
fn a_read_only_block_publish_never_takes_the_stage_device_whose_number_it_recorded_before_a_reboot() {
    let n = Node::new();
    let (stage_a, stage_b) = (n.path("stage-a"), n.path("stage-b"));
    let a = block_volume(&n.svc, "pvc-a", &stage_a);
    let ro = n.path("pod-ro");
    block_publish(&n.svc, &a, &stage_a, &ro, true).expect("read-only publish");
    let recorded = n.svc.state.get(&a).published[&ro].device.clone().expect("recorded");
    // A reboot: every device and mount gone. Another volume stages first and takes the lowest
    // number, so this volume's stage gets the number its read-only publish recorded.
    n.devices.reboot(None);
    n.mounter.reboot();
    block_volume(&n.svc, "pvc-b", &stage_b);
    stage_block(&n.svc, &a, &stage_a).expect("stage again");
    let (_, data) = n.svc.volume(&a).expect("the volume");
    let stage_device = n.devices.find_by_backing(&data).expect("find")[0].path.clone();
    assert_eq!(
        stage_device, recorded,
        "the kernel reused the number (the case under test)"
    );
    block_publish(&n.svc, &a, &stage_a, &ro, true).expect("kubelet publishes again");
    let source = bound_from(&n, &ro);
    assert_ne!(
        source, stage_device,
        "the read-only publish is not bound from the writable stage device"
    );
    assert!(read_only_device(&n, &source), "it is bound from a read-only device");
    let rw = n.path("pod-rw");
    block_publish(&n.svc, &a, &stage_a, &rw, false).expect("a read-write publish finds the stage device");
    assert_eq!(bound_from(&n, &rw), stage_device);
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: a.clone(),
            target_path: ro.display().to_string(),
        })
        .expect("unpublish");
    let left: Vec<_> = n
        .devices
        .find_by_backing(&data)
        .expect("find")
        .into_iter()
        .map(|d| d.path)
        .collect();
    assert_eq!(
        left,
        vec![stage_device],
        "the unpublish took its own device and not the stage's"
    );
}

#[test]
fn a_read_only_device_left_unrecorded_by_a_crash_is_never_the_stage_device() {
    let n = Node::new();
    let (stage_a, stage_b) = (n.path("stage-a"), n.path("stage-b"));
    let b = block_volume(&n.svc, "pvc-b", &stage_b);
    let a = block_volume(&n.svc, "pvc-a", &stage_a);
    n.unstage(&b, &stage_b).expect("unstage b");
    // A read-only publish attached its device (the lowest number, now free) and was killed
    // before recording it.
    let (_, data) = n.svc.volume(&a).expect("the volume");
    let (stray, _) = n.devices.attach(&data, true).expect("attach");
    let rw = n.path("pod-rw");
    block_publish(&n.svc, &a, &stage_a, &rw, false).expect("read-write publish");
    assert_ne!(
        bound_from(&n, &rw),
        stray.path,
        "a read-write publish is bound from the stage's device"
    );
    assert!(!read_only_device(&n, &bound_from(&n, &rw)));
    // Nor is it taken up by a read-only publish: a device nobody records may still be bound.
    let ro = n.path("pod-ro");
    block_publish(&n.svc, &a, &stage_a, &ro, true).expect("read-only publish");
    assert_ne!(bound_from(&n, &ro), stray.path, "a device of its own");
    assert!(read_only_device(&n, &bound_from(&n, &ro)));
    for t in [&ro, &rw] {
        n.svc
            .unpublish(NodeUnpublishVolumeRequest {
                volume_id: a.clone(),
                target_path: t.display().to_string(),
            })
            .expect("unpublish");
    }
    let left = n.devices.find_by_backing(&data).expect("find");
    assert!(
        left.len() == 2 && left.contains(&stray),
        "the unpublishes took only the read-only publish's own device: {left:?}"
    );
    n.unstage(&a, &stage_a).expect("unstage");
    assert!(n.devices.attached().is_empty(), "the unrecorded device goes at unstage");
}

#[test]
fn a_failed_stage_under_a_live_publish_undoes_nothing() {
    let n = Node::new();
    let id = n.image("pvc-live");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    // The staging mount is lost under the live publish (an admin's umount); the volume was
    // expanded meanwhile, so the stage that follows checks it offline, and that fails.
    crate::sys::mount::Mounter::unmount(n.mounter.as_ref(), &staging).expect("umount");
    n.svc
        .engine
        .set_fs_bytes(&crate::storage::id::VolumeId::parse(&id).expect("id"), 16 << 20)
        .expect("smaller fs");
    n.devices.fail_next("grow-offline", libc::EBUSY);
    n.stage(&id, &staging).expect_err("the check fails");
    assert_eq!(n.devices.attached().len(), 1, "the device under the pod stays attached");
    assert!(n.svc.state.get(&id).staged.is_some(), "and the stage's intent stays");
}

/// A volume that came from another node or a backup (recorded as never grown here, fs_bytes 0)
/// is checked before the kernel first mounts it, xfs and read-only stages too: 17edb70 checked
/// only ext4 on a read-write stage (by its offline grow), and mounted an xfs, or any read-only
/// first stage, as whoever sent it made it.
#[test]
fn a_filesystem_from_elsewhere_is_checked_before_every_first_mount() {
    use crate::storage::id::VolumeId;
    let n = Node::new();
    let stage = |id: &str, mode: Mode, flags: &[&str]| {
        n.svc
            .stage(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: n.path("stage").display().to_string(),
                volume_capability: Some(crate::client::mount_capability(
                    mode,
                    flags.iter().map(|f| f.to_string()).collect(),
                )),
                ..Default::default()
            })
            .map(|_| ())
            .map_err(tonic::Status::from)
    };
    let imported = |name: &str, fs: &str| {
        let mut req = NewVolume::plain(name, Some(Layout::Image), 300 << 20);
        req.fs_type = fs.into();
        let id = n.svc.engine.create_volume(req).expect("create").id;
        n.svc.engine.set_fs_bytes(&id, 0).expect("as an import records it");
        id.to_string()
    };
    let fs_bytes = |id: &str| {
        n.svc
            .engine
            .volume(&VolumeId::parse(id).expect("id"))
            .expect("record")
            .fs_bytes
    };
    // Each case: the device calls from the first check on, and the mounts made.
    let after_check = |devices: &[String]| -> Vec<String> {
        let at = devices
            .iter()
            .position(|c| c.starts_with("check "))
            .unwrap_or(devices.len());
        devices[at..]
            .iter()
            .filter(|c| !c.starts_with("find ") && !c.starts_with("ro "))
            .map(|c| c.split(" /dev/").next().unwrap_or(c).to_string() + c.split_once(" replay").map_or("", |(_, r)| r))
            .collect()
    };
    let staging = n.path("stage");
    let unstage_all = |id: &str| n.unstage(id, &staging).expect("unstage");

    // xfs, read-write, clean: checked, mounted, grown; never again once grown.
    let x = imported("pvc-xfs", "xfs");
    let (d0, m0) = (n.devices.calls().len(), n.mounter.calls().len());
    stage(&x, Mode::SingleNodeWriter, &[]).expect("stage");
    assert_eq!(
        after_check(&n.devices.calls()[d0..]),
        ["check xfs=true", "grow-online xfs"],
        "{:?}",
        n.devices.calls()
    );
    let mounts = &n.mounter.calls()[m0..];
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(fs_bytes(&x), 300 << 20);
    unstage_all(&x);
    let d1 = n.devices.calls().len();
    stage(&x, Mode::SingleNodeWriter, &[]).expect("stage again");
    assert!(
        !n.devices.calls()[d1..].iter().any(|c| c.starts_with("check ")),
        "checked once"
    );
    unstage_all(&x);

    // xfs with a dirty log (a crash-consistent copy): the kernel replays it through a read-only
    // nosuid,nodev,noexec mount, unmounted at once, then it is checked again and mounted.
    let y = imported("pvc-xfs-dirty", "xfs");
    n.devices.dirty_logs(1);
    let (d0, m0) = (n.devices.calls().len(), n.mounter.calls().len());
    stage(&y, Mode::SingleNodeWriter, &[]).expect("stage");
    assert_eq!(
        after_check(&n.devices.calls()[d0..]),
        ["check xfs=true", "check xfs=true", "grow-online xfs"]
    );
    let mounts = n.mounter.calls()[m0..].to_vec();
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    assert!(
        mounts[0].starts_with("mount /dev/loop")
            && mounts[0].contains("read_only: true, nosuid: true, nodev: true, noexec: true"),
        "{mounts:?}"
    );
    assert!(mounts[1].starts_with("unmount "), "{mounts:?}");
    assert!(mounts[2].contains("read_only: false"), "{mounts:?}");
    unstage_all(&y);

    // A log still dirty after the replay, or a check that finds the filesystem inconsistent:
    // the stage fails and leaves nothing mounted, attached or intended.
    let z = imported("pvc-xfs-bad", "xfs");
    for (dirty, fail) in [(2, None), (0, Some(libc::EUCLEAN))] {
        n.devices.dirty_logs(dirty);
        if let Some(errno) = fail {
            n.devices.fail_next("check", errno);
        }
        let e = stage(&z, Mode::SingleNodeWriter, &[]).expect_err("not mounted");
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert!(n.mounter.mounted().is_empty(), "{:?}", n.mounter.calls());
        assert!(n.devices.attached().is_empty());
        assert!(n.svc.state.get(&z).staged.is_none());
        assert_eq!(fs_bytes(&z), 0, "to be checked again");
    }

    // Read-only first stages: under an `ro` mount option (a writable device) checked with the
    // journal replayed, grown never; through a reader-only stage's read-only device checked
    // without replay, and refused when there is a journal to replay.
    let e = imported("pvc-ext4", "ext4");
    let d0 = n.devices.calls().len();
    stage(&e, Mode::SingleNodeWriter, &["ro"]).expect("stage ro");
    assert_eq!(after_check(&n.devices.calls()[d0..]), ["check ext4=true"]);
    assert_eq!(fs_bytes(&e), 0, "not grown: checked again at the next first stage");
    unstage_all(&e);
    let d0 = n.devices.calls().len();
    stage(&e, Mode::SingleNodeReaderOnly, &[]).expect("stage reader-only");
    assert_eq!(after_check(&n.devices.calls()[d0..]), ["check ext4=false"]);
    unstage_all(&e);
    n.devices.dirty_logs(1);
    let m0 = n.mounter.calls().len();
    let err = stage(&e, Mode::SingleNodeReaderOnly, &[]).expect_err("cannot replay");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("writer access mode"), "{err:?}");
    assert_eq!(n.mounter.calls().len(), m0, "nothing mounted");
    assert!(n.devices.attached().is_empty());
    // ext4 read-write: its offline grow checks it (e2fsck -f -p), as before.
    let d0 = n.devices.calls().len();
    stage(&e, Mode::SingleNodeWriter, &[]).expect("stage");
    assert_eq!(after_check(&n.devices.calls()[d0..]), Vec::<String>::new());
    assert!(n.devices.calls()[d0..]
        .iter()
        .any(|c| c.starts_with("grow-offline ext4")));
    assert_eq!(fs_bytes(&e), 300 << 20);
}

#[test]
fn a_stage_that_cannot_read_its_devices_takes_no_lease() {
    let n = Node::new();
    let id = n.shared("pvc-shared-img", Layout::Image, 32 << 20);
    let staging = n.path("stage");
    n.devices.fail_next("find", libc::EIO);
    n.stage(&id, &staging).expect_err("the devices cannot be listed");
    let held = n.leases();
    assert!(
        held.is_empty(),
        "no lease is held for a stage that did not happen: {held:?}"
    );
    n.stage(&id, &staging).expect("stage");
    n.unstage(&id, &staging).expect("unstage");
}

/// Root only: the kernel's answer to a write through a read-only block publish.
#[test]
fn a_read_only_block_publish_refuses_writes_for_real() {
    crate::sys::loopdev::fixture::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeId::parse("n1").expect("node id");
    let mut config = Config::default_for(dir.path());
    config.pools[0].layouts.push(Layout::Image);
    let engine = Arc::new(LocalEngine::open(node.clone(), &config).expect("engine"));
    let state = Arc::new(NodeState::open(&dir.path().join("node"), engine.files()).expect("state"));
    let svc = NodeService::new(node, engine, state, 0);
    let staging = dir.path().join("stage");
    std::fs::create_dir(&staging).expect("staging dir");
    let id = block_volume(&svc, "pvc-rb", &staging);
    let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
    block_publish(&svc, &id, &staging, &rw, false).expect("read-write publish");
    block_publish(&svc, &id, &staging, &ro, true).expect("read-only publish");
    let write = |t: &Path| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .open(t)
            .and_then(|mut f| f.write_all(&[7u8; 4096]).and_then(|_| f.sync_all()))
    };
    let through_ro = write(&ro);
    let through_rw = write(&rw);
    for t in [&ro, &rw] {
        svc.unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.display().to_string(),
        })
        .expect("unpublish");
    }
    svc.unstage(NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .expect("unstage");
    let (_, data) = svc
        .engine
        .volume_data(&crate::storage::id::VolumeId::parse(&id).expect("id"))
        .expect("data");
    let left = crate::sys::loopdev::find_by_backing(&data).expect("devices");
    assert!(
        through_ro.is_err(),
        "a write through the read-only publish reached the volume"
    );
    through_rw.expect("the read-write publish writes");
    assert!(left.is_empty(), "loop devices left: {left:?}");
}

#[test]
fn a_stage_retried_with_another_read_only_mode_is_already_exists() {
    let n = Node::new();
    for id in [n.volume("pvc-s"), n.image("pvc-si")] {
        let staging = n.path(&format!("stage-{id}"));
        n.stage(&id, &staging).expect("stage read-write");
        let err = n
            .svc
            .stage(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap(Mode::SingleNodeReaderOnly)),
                ..Default::default()
            })
            .map_err(tonic::Status::from)
            .expect_err("a read-only stage is not this read-write one");
        assert_eq!(err.code(), Code::AlreadyExists, "{id}: {err:?}");
        n.stage(&id, &staging).expect("the same stage again is OK");
        n.unstage(&id, &staging).expect("unstage");
    }
    assert!(n.mounter.mounted().is_empty());
    assert!(n.devices.attached().is_empty());
}

#[test]
fn an_unpublish_whose_target_holds_files_not_ours_converges_and_keeps_them() {
    let n = Node::new();
    let id = n.volume("pvc-u");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    // The publish mount is lost (a reboot, someone's umount) and something writes in the bare directory.
    use crate::sys::mount::Mounter;
    n.mounter.unmount(&target).expect("lose the mount");
    std::fs::write(target.join("written-meanwhile"), b"x").expect("write");
    n.svc
        .unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .expect("the unpublish converges");
    assert!(
        target.join("written-meanwhile").exists(),
        "what is not the volume's is kept"
    );
    assert!(n.svc.state.get(&id).published.is_empty(), "the publish is forgotten");
    n.unstage(&id, &staging).expect("unstage");
    assert!(n.svc.state.mounted_at(&id).is_empty());
}

/// Two shared pools on two shares; the first share's server is gone and a call on it blocks in the
/// kernel (a held read of its lease plays that: a FIFO no longer waits, files.rs). The second share's leases must still be renewed:
/// a renewal held up past the lease time lets another node stage and mount, a second time, an image
/// this node still has mounted and writes.
#[test]
fn a_share_that_hangs_holds_up_no_other_shares_lease_renewals() {
    use crate::storage::id::{PoolName, VolumeId};
    use crate::storage::lease::{Claim, LeaseFile};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default_for(dir.path());
    let base = config.pools[0].clone();
    config.pools.clear();
    for name in ["hung", "live"] {
        let mut p = base.clone();
        p.name = PoolName::parse(name).expect("pool");
        p.path = dir.path().join(name);
        p.backend = crate::storage::config::Backend::Shared;
        p.layouts = vec![Layout::Dir, Layout::Image];
        p.lease_seconds = 3;
        config.pools.push(p);
    }
    let engine = Arc::new(LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine"));
    let state = Arc::new(NodeState::open(&dir.path().join("node"), engine.files()).expect("state"));
    let mut leases = Vec::new();
    for pool in ["hung", "live"] {
        let id = VolumeId::parse(&format!("shared:{pool}:pvc-{pool}")).expect("id");
        let backing = dir.path().join(pool).join("volumes").join(format!("pvc-{pool}"));
        std::fs::write(&backing, b"").expect("image");
        let (lease, ttl) = engine.shared_lease(&id).expect("leased");
        assert_eq!(
            engine.leases.acquire(&lease, &id.to_string(), ttl).expect("acquire"),
            Claim::Held
        );
        state
            .put(super::state::VolumeMounts {
                volume_id: id.to_string(),
                staged: Some(super::state::Staged {
                    path: dir.path().join(format!("staging-{pool}")),
                    read_only: false,
                    backing: Some(backing),
                    bound: None,
                    block: false,
                    real: None,
                }),
                ..Default::default()
            })
            .expect("state");
        leases.push(lease);
    }
    let hung = Arc::new(crate::crash::in_thread::Pause::default());
    crate::crash::in_thread::hold_reads_of(&leases[0], hung.clone());
    let renewals = || {
        serde_json::from_slice::<LeaseFile>(&std::fs::read(&leases[1]).expect("lease"))
            .expect("json")
            .renewals
    };
    // The renewers as the node starts them: the hung share's one gets stuck at once.
    super::start_lease_renewer(engine.clone(), state.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while renewals() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let renewed = renewals();
    assert!(
        hung.reached(std::time::Duration::from_secs(1)),
        "the hung share's renewer is stuck on its lease"
    );
    // The share comes back: the stuck call goes on.
    hung.release();
    assert!(
        renewed >= 3,
        "the live share's lease was renewed {renewed} times in 8 s with a 3 s lease"
    );
}

#[test]
fn a_copy_of_an_unguarded_ext4_image_into_a_share_gets_multi_mount_protection() {
    let n = Node::new();
    let old = n.shared("pvc-old", Layout::Image, 32 << 20);
    let (_, data) = n.svc.volume(&old).expect("the volume");
    // As an image made before shared images had MMP (or brought from a local pool).
    crate::sys::run_tool("tune2fs", &["-O", "^mmp", &data.to_string_lossy()]).expect("tune2fs");
    assert_eq!(crate::sys::fstools::mmp(&data).expect("read"), None);
    let mut clone = NewVolume::plain("pvc-copy", Some(Layout::Image), 32 << 20);
    clone.source = Some(crate::storage::engine::Source::Volume(
        crate::storage::id::VolumeId::parse(&old).expect("id"),
    ));
    let copy = n.shared_like(clone);
    let (_, copied) = n.svc.volume(&copy).expect("the clone");
    assert_eq!(
        crate::sys::fstools::mmp(&copied).expect("read"),
        Some(crate::sys::fstools::Mmp::Clean),
        "the copy on the share is guarded"
    );
    assert_eq!(
        crate::sys::fstools::mmp(&data).expect("read"),
        None,
        "its source is left as it is"
    );
    // A local copy is not a share's: nothing added.
    let local = n.image("pvc-local");
    let mut clone = NewVolume::plain("pvc-local-copy", Some(Layout::Image), 32 << 20);
    clone.source = Some(crate::storage::engine::Source::Volume(
        crate::storage::id::VolumeId::parse(&local).expect("id"),
    ));
    let copy = n.svc.engine.create_volume(clone).expect("clone").id.to_string();
    assert_eq!(
        crate::sys::fstools::mmp(&n.svc.volume(&copy).expect("clone").1).expect("read"),
        None
    );
}

#[test]
fn a_renewal_pass_forgets_the_leases_given_back_before_it() {
    let n = Node::new();
    let id = n.shared("pvc-churn", Layout::Image, 32 << 20);
    let staging = n.path("stage");
    n.stage(&id, &staging).expect("stage");
    n.unstage(&id, &staging).expect("unstage");
    let vid = crate::storage::id::VolumeId::parse(&id).expect("id");
    let (lease, _) = n.svc.engine.shared_lease(&vid).expect("a shared volume's lease");
    assert!(n.svc.engine.leases.remembers_release(&lease));
    let share = crate::storage::id::PoolName::parse("share").expect("pool name");
    super::renew_leases(&n.svc.engine, &n.svc.state, &share);
    assert!(
        !n.svc.engine.leases.remembers_release(&lease),
        "a node staging and unstaging volume after volume keeps nothing of those given back"
    );
}

/// The one state file of the node's volumes, and its bytes.
fn the_state_file(n: &Node) -> (PathBuf, Vec<u8>) {
    let files: Vec<PathBuf> = std::fs::read_dir(n.path("node"))
        .expect("state dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    let [file] = files.as_slice() else {
        panic!("one state file: {files:?}");
    };
    let bytes = std::fs::read(file).expect("state");
    (file.clone(), bytes)
}

/// A shared image whose state file cannot be read may still be staged and written here: the
/// lease this node holds of it is renewed all the same (it lapsed, and another node could then
/// mount the image at once), whether the file still names the volume or is torn and known by its
/// name alone. A lease that is gone is not made again (nothing says the volume is staged), one of
/// another node is left alone, and a file removed by hand no longer counts.
#[test]
fn the_lease_of_a_volume_whose_state_cannot_be_read_is_still_renewed() {
    use crate::storage::id::{PoolName, VolumeId};
    use crate::storage::lease::LeaseFile;
    let mut n = Node::new();
    let id = n.shared("pvc-leased", Layout::Image, 32 << 20);
    n.stage(&id, &n.path("stage")).expect("stage");
    let (lease, _) = n
        .svc
        .engine
        .shared_lease(&VolumeId::parse(&id).expect("id"))
        .expect("a shared image's lease");
    let held = || -> LeaseFile { serde_json::from_slice(&std::fs::read(&lease).expect("lease")).expect("lease JSON") };
    let share = PoolName::parse("share").expect("pool name");
    let (file, good) = the_state_file(&n);
    let torn = good[..good.len() / 2].to_vec();
    let named = format!(r#"{{"volume_id":"{id}","staged":7,"published":[]}}"#).into_bytes();
    for bad in [&torn, &named] {
        std::fs::write(&file, bad).expect("spoil the state");
        n = n.restart();
        let before = held();
        super::renew_leases(&n.svc.engine, &n.svc.state, &share);
        let after = held();
        assert_eq!(after.node, "n1");
        assert_eq!(
            after.renewals,
            before.renewals + 1,
            "renewed: {}",
            String::from_utf8_lossy(bad)
        );
    }
    // Gone from the share: not made again.
    std::fs::remove_file(&lease).expect("remove the lease");
    n = n.restart();
    super::renew_leases(&n.svc.engine, &n.svc.state, &share);
    assert!(!lease.exists(), "a lease of a volume not known to be staged was made");
    // Another node's: left as it is, whichever way the file names its volume.
    let theirs = serde_json::to_vec(&LeaseFile::new("n2", &id)).expect("encode");
    for bad in [&torn, &named] {
        std::fs::write(&file, bad).expect("spoil the state");
        std::fs::write(&lease, &theirs).expect("another node's lease");
        n = n.restart();
        super::renew_leases(&n.svc.engine, &n.svc.state, &share);
        assert_eq!(std::fs::read(&lease).expect("lease"), theirs);
    }
    // The file removed by hand (after unmounting by hand): its lease is this node's no more.
    std::fs::write(&lease, serde_json::to_vec(&LeaseFile::new("n1", &id)).expect("encode")).expect("lease");
    n = n.restart();
    std::fs::remove_file(&file).expect("remove the state file");
    let before = held();
    super::renew_leases(&n.svc.engine, &n.svc.state, &share);
    assert_eq!(held(), before, "renewed after its state file was removed");
}

#[test]
fn an_image_moved_aside_by_a_delete_that_then_loses_is_staged_on_retry() {
    let n = Node::new();
    let id = n.image("pvc-aside");
    let (_, data) = n.svc.volume(&id).expect("the volume");
    let aside = data.with_extension("aside");
    // A delete moved the data aside to look for users of the volume; its record is still there.
    std::fs::rename(&data, &aside).expect("move aside");
    let staging = n.path("stage");
    let err = n.stage(&id, &staging).expect_err("no image to attach");
    assert_eq!(
        err.code(),
        Code::Aborted,
        "not NOT_FOUND: the volume exists, retry: {err}"
    );
    assert!(n.devices.attached().is_empty() && n.svc.state.get(&id).staged.is_none());
    // The delete saw the volume in use and put it back: the retried stage goes through.
    std::fs::rename(&aside, &data).expect("put back");
    n.stage(&id, &staging).expect("stage");
    n.unstage(&id, &staging).expect("unstage");
}

/// Invariant 1 rests on the node's mount state naming every mount before it is made: then
/// DeleteVolume, which asks that state, can never miss one. Each file operation the Node service
/// makes in a life cycle (stage, publish, unpublish, unstage) is failed in turn, in each call: no
/// mount is left that the state does not name, the failed call's retry succeeds, and the life
/// cycle ends with nothing mounted and nothing recorded.
#[test]
fn any_file_operation_of_the_node_failing_leaves_no_mount_its_state_does_not_name() {
    type Step = fn(&Node, &str, &Path, &Path) -> Result<(), tonic::Status>;
    let steps: [(&str, Step); 4] = [
        ("stage", |n, id, staging, _| n.stage(id, staging)),
        ("publish", |n, id, staging, target| {
            n.publish(id, staging, target, Mode::SingleNodeWriter, false)
        }),
        ("unpublish", |n, id, _, target| {
            n.svc
                .unpublish(NodeUnpublishVolumeRequest {
                    volume_id: id.into(),
                    target_path: target.display().to_string(),
                })
                .map(drop)
                .map_err(tonic::Status::from)
        }),
        ("unstage", |n, id, staging, _| n.unstage(id, staging)),
    ];
    let named = |n: &Node, id: &str| {
        let m = n.svc.state.get(id);
        for (_, target, _) in n.mounter.mounted() {
            let staged = m.staged.as_ref().is_some_and(|s| s.path == target);
            assert!(
                staged || m.published.contains_key(&target),
                "{} is mounted but the node's state does not name it: {m:?}",
                target.display()
            );
        }
    };
    for image in [false, true] {
        let learn = Node::new();
        let id = if image {
            learn.image("pvc-l")
        } else {
            learn.volume("pvc-l")
        };
        let (staging, target) = (learn.path("stage"), learn.path("pod/mount"));
        let before = learn.files.calls().len();
        for (name, step) in steps {
            step(&learn, &id, &staging, &target).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let ops = learn.files.ops_since(before);
        assert!(ops.contains(&"write_atomic"), "the node writes its state: {ops:?}");
        let mut failed = Vec::new();
        for op in ops.iter().copied() {
            for failing in 0..steps.len() {
                let n = Node::new();
                let id = if image { n.image("pvc-l") } else { n.volume("pvc-l") };
                let (staging, target) = (n.path("stage"), n.path("pod/mount"));
                for (i, (name, step)) in steps.iter().enumerate() {
                    if i == failing {
                        n.files.fail_next(op, libc::EIO);
                        let r = step(&n, &id, &staging, &target);
                        n.files.disarm();
                        named(&n, &id);
                        if r.is_err() {
                            failed.push(format!("{name}/{op}"));
                        }
                    }
                    step(&n, &id, &staging, &target)
                        .unwrap_or_else(|e| panic!("image {image}, {name} after {op} failed: {e}"));
                    named(&n, &id);
                }
                assert!(
                    n.mounter.mounted().is_empty(),
                    "image {image}, {op} failing: nothing left mounted"
                );
                let left = n.svc.state.get(&id);
                assert!(
                    left.staged.is_none() && left.published.is_empty(),
                    "image {image}, {op}: nothing recorded: {left:?}"
                );
                assert!(
                    !target.exists(),
                    "image {image}, {op}: the target the driver made is removed"
                );
            }
        }
        // Every operation failed some call (none is tried where nothing reaches it).
        for op in &ops {
            assert!(
                failed.iter().any(|f| f.ends_with(&format!("/{op}"))),
                "image {image}: {op} never failed a call: {failed:?}"
            );
        }
    }
}

/// A static volume's staging mount gone stale (its share was remounted) is bound again as the
/// stage bound it: the PV's `subdir`, never the whole directory the handle names (another team's
/// data), with its `mountOptions`. A stage recorded by an earlier release, which kept neither,
/// takes them from the publish's volume context.
#[test]
fn a_stale_static_staging_is_bound_again_from_its_subdir_with_its_options() {
    let n = Node::new();
    let team_a = n.path("share/tenants/team-a");
    std::fs::create_dir_all(&team_a).expect("subdir");
    std::fs::create_dir_all(n.path("share/tenants/team-b")).expect("another team");
    let id = "static:share:tenants";
    let context: std::collections::HashMap<String, String> = [
        ("subdir".to_string(), "team-a".to_string()),
        ("mountOptions".to_string(), "nosuid,nodev,noexec".to_string()),
    ]
    .into();
    let staging = n.path("staging");
    n.svc
        .stage(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter)),
            volume_context: context.clone(),
            ..Default::default()
        })
        .expect("stage");
    let want = |n: &Node| {
        let (source, _, flags) = n
            .mounter
            .mounted()
            .into_iter()
            .find(|m| m.1 == staging)
            .expect("staging bound");
        assert_eq!(source, team_a, "the staging mount binds the subdir");
        assert!(
            flags.nosuid && flags.nodev && flags.noexec && !flags.read_only,
            "{flags:?}"
        );
    };
    want(&n);
    let publish = |n: &Node, target: &Path, context: &std::collections::HashMap<String, String>| {
        n.svc
            .publish(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap(Mode::SingleNodeWriter)),
                volume_context: context.clone(),
                ..Default::default()
            })
            .expect("publish");
    };
    // The share went stale under the staging mount: the publish binds it again from the state
    // (the stage's options, not the ones this PV's context names).
    let fewer_options: std::collections::HashMap<String, String> = [
        ("subdir".to_string(), "team-a".to_string()),
        ("mountOptions".to_string(), "nosuid".to_string()),
    ]
    .into();
    n.mounter.fail_next("is_mountpoint", libc::ESTALE);
    publish(&n, &n.path("pod-1"), &fewer_options);
    assert!(
        n.mounter
            .calls()
            .iter()
            .any(|c| c.starts_with("unmount") && c.ends_with("staging")),
        "the stale staging mount was detached: {:?}",
        n.mounter.calls()
    );
    want(&n);
    // As recorded by an earlier release: no record of what was bound.
    let mut m = n.svc.state.get(id);
    m.staged.as_mut().expect("staged").bound = None;
    n.svc.state.put(m).expect("state");
    n.mounter.fail_next("is_mountpoint", libc::ESTALE);
    publish(&n, &n.path("pod-2"), &context);
    want(&n);
}

/// Two PVs of one static handle with other `subdir`s (one team's directory each): kubelet gives
/// them one staging path, and stages the handle once. The second PV's stage, and its publish
/// (which kubelet sends without a stage of its own), are refused: they would show the first
/// team's directory in the second team's pod; so is a PV naming the whole directory (with other
/// attributes: an empty volume context says nothing). A PV of the
/// same subdir with other options may stage again (kubelet's retry after its restart, with any
/// pod's PV) and its publish carries its own options.
#[test]
fn one_static_handle_is_staged_with_one_subdir_per_node() {
    let n = Node::new();
    for team in ["team-a", "team-b"] {
        std::fs::create_dir_all(n.path(&format!("share/tenants/{team}"))).expect("subdir");
    }
    let id = "static:share:tenants";
    let context = |subdir: &str, options: &str| -> std::collections::HashMap<String, String> {
        [
            ("subdir".to_string(), subdir.to_string()),
            ("mountOptions".to_string(), options.to_string()),
        ]
        .into()
    };
    let staging = n.path("staging");
    let stage = |ctx| {
        n.svc.stage(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter)),
            volume_context: ctx,
            ..Default::default()
        })
    };
    let publish = |ctx, pod: &str| {
        n.svc.publish(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: n.path(pod).display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter)),
            volume_context: ctx,
            ..Default::default()
        })
    };
    stage(context("team-a", "nodev")).expect("stage");
    stage(context("team-a", "nodev")).expect("the same stage again");
    stage(context("team-a", "noexec")).expect("a PV of the same subdir with other options");
    let err = tonic::Status::from(stage(context("team-b", "nodev")).expect_err("team-b's stage"));
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert!(err.message().contains("volume handle of its own"), "{}", err.message());
    for (other, pod) in [
        (context("team-b", "nodev"), "pod-b"),
        (context("", "nodev"), "pod-whole"),
    ] {
        let err = tonic::Status::from(publish(other, pod).expect_err("another subdir's publish"));
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains("subdir 'team-a'"), "{}", err.message());
        assert!(!n.path(pod).exists(), "nothing made for {pod}");
    }
    publish(context("team-a", "nodev"), "pod-a").expect("team-a's publish");
    let mut read_only = context("team-a", "noexec");
    read_only.insert("readOnly".into(), "true".into());
    publish(read_only, "pod-a-ro").expect("a read-only PV of team-a");
    let binds = n.mounter.mounted();
    let at: Vec<_> = binds.iter().map(|m| m.1.clone()).collect();
    assert_eq!(
        at,
        vec![staging.clone(), n.path("pod-a"), n.path("pod-a-ro")],
        "team-a's stage and publishes only"
    );
    let flags = binds[2].2;
    assert!(
        flags.read_only && flags.noexec,
        "the publish carries its own PV's options: {flags:?}"
    );
}

/// A pool configured inside a shared pool's directory: a static handle of the shared pool must
/// not reach into it (its volumes, its stage marks, or the whole pool), nor name a path part
/// longer than a name can be (INVALID_ARGUMENT, not INTERNAL). Also when the shared pool is
/// configured through a symbolic link above its directory.
#[test]
fn a_static_handle_does_not_reach_into_a_pool_inside_its_pool() {
    static_handles_stay_out_of_an_inner_pool(false);
    static_handles_stay_out_of_an_inner_pool(true);
}

fn static_handles_stay_out_of_an_inner_pool(share_through_a_link: bool) {
    let n = Node::with(|dir, config| {
        let mut team = config.pools[0].clone();
        team.name = crate::storage::id::PoolName::parse("team").expect("pool name");
        team.path = dir.join("share/team");
        config.pools.push(team);
        if share_through_a_link {
            // (A pool's root itself must be a real directory; a link above it is allowed.)
            std::os::unix::fs::symlink(dir, dir.join("mnt")).expect("link");
            let share = config
                .pools
                .iter_mut()
                .find(|p| p.name.as_str() == "share")
                .expect("share");
            share.path = dir.join("mnt/share");
        }
    });
    let mut req = NewVolume::plain("pvc-inner", None, 1 << 20);
    req.pool = Some(crate::storage::id::PoolName::parse("team").expect("pool"));
    let inner = n
        .svc
        .engine
        .create_volume(req)
        .expect("a volume of the inner pool")
        .id
        .to_string();
    assert!(inner.contains(":team:"), "{inner}");
    std::fs::create_dir_all(n.path("share/data")).expect("a directory of the share's own");
    let long = "x".repeat(300);
    for handle in [
        "static:share:team/volumes/pvc-inner".to_string(),
        "static:share:team".to_string(),
        "static:share:TEAM/Volumes".to_string(),
        format!("static:share:{long}"),
    ] {
        let err = n
            .svc
            .stage(NodeStageVolumeRequest {
                volume_id: handle.clone(),
                staging_target_path: n.path("staging").display().to_string(),
                volume_capability: Some(cap(Mode::SingleNodeWriter)),
                ..Default::default()
            })
            .expect_err("a handle into another pool");
        let err = tonic::Status::from(err);
        assert_eq!(err.code(), Code::InvalidArgument, "{handle}: {}", err.message());
    }
    assert!(n.mounter.calls().is_empty(), "nothing mounted");
    n.svc
        .stage(NodeStageVolumeRequest {
            volume_id: "static:share:data".into(),
            staging_target_path: n.path("staging").display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .expect("a directory of the share's own");
}

/// A publish whose bind fails takes back only what it made, and never what it did not write: the
/// files a pod wrote into the bare target while its mount was lost stay (the undo removed the
/// whole target tree when an earlier publish had made the directory).
#[test]
fn a_failed_publish_never_removes_files_it_finds_in_the_target() {
    use crate::sys::mount::Mounter;
    let n = Node::new();
    let id = n.volume("pvc-lost-mount");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    // The target's mount is lost (unmounted by hand); the pod writes into the bare directory.
    n.mounter.unmount(&target).expect("lose the mount");
    std::fs::write(target.join("written-meanwhile"), b"not the volume's").expect("write");
    n.mounter.fail_next("bind", libc::EIO);
    let err = n
        .publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect_err("the bind fails");
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(
        std::fs::read(target.join("written-meanwhile")).expect("the file is still there"),
        b"not the volume's"
    );
    // An empty target it made is taken back.
    let fresh = n.path("pod/fresh");
    n.mounter.fail_next("bind", libc::EIO);
    n.publish(&id, &staging, &fresh, Mode::SingleNodeWriter, false)
        .expect_err("the bind fails");
    assert!(!fresh.exists(), "the target this publish made is removed");
}

/// A stage that fails after its intent (a tree's bind, an xfs image's online grow after its
/// mount) leaves nothing: kubelet never unstages a failed stage, so an intent, a stage mark, a
/// mount, a device or a lease left behind kept the volume from being deleted or staged on another
/// node for good.
#[test]
fn a_stage_failing_after_its_intent_leaves_nothing_behind() {
    let n = Node::new();
    let staging = n.path("stage");
    for id in [n.volume("pvc-tree"), n.shared("pvc-shared-tree", Layout::Dir, 1 << 20)] {
        n.mounter.fail_next("bind", libc::EIO);
        n.stage(&id, &staging).expect_err("the bind fails");
        assert!(n.svc.state.get(&id).staged.is_none(), "no intent left for {id}");
        n.svc
            .engine
            .delete_volume(&crate::storage::id::VolumeId::parse(&id).expect("id"))
            .expect("a volume whose stage failed can be deleted");
    }
    let mut req = NewVolume::plain("pvc-xfs", Some(Layout::Image), 320 << 20);
    req.fs_type = "xfs".into();
    let id = n.shared_like(req);
    let vid = crate::storage::id::VolumeId::parse(&id).expect("id");
    n.svc
        .engine
        .set_fs_bytes(&vid, 300 << 20)
        .expect("a smaller filesystem");
    n.devices.fail_next("grow-online", libc::EIO);
    n.stage(&id, &staging).expect_err("the online grow fails");
    assert!(n.devices.attached().is_empty(), "no device left");
    assert!(
        !n.mounter.mounted().iter().any(|m| m.1 == staging),
        "nothing left mounted at the staging path"
    );
    assert!(n.svc.state.get(&id).staged.is_none(), "no intent left");
    assert!(n.leases().is_empty(), "the lease is given back: {:?}", n.leases());
    n.stage(&id, &staging).expect("the retry stages and grows it");
    n.unstage(&id, &staging).expect("unstage");
}

/// An `ro` mount option (a PV's mountOptions) makes the stage itself read-only, as it does the
/// publish: an image was mounted read-write at staging (its journal replayed, grown) under it.
#[test]
fn an_ro_mount_option_stages_an_image_read_only() {
    let n = Node::new();
    let id = n.image("pvc-ro-option");
    n.svc
        .engine
        .set_fs_bytes(&crate::storage::id::VolumeId::parse(&id).expect("id"), 16 << 20)
        .expect("a smaller filesystem");
    let staging = n.path("stage");
    n.svc
        .stage(NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(crate::client::mount_capability(
                Mode::SingleNodeWriter,
                vec!["ro".into()],
            )),
            ..Default::default()
        })
        .expect("stage");
    let (_, _, flags) = n
        .mounter
        .mounted()
        .into_iter()
        .find(|m| m.1 == staging)
        .expect("staged");
    assert!(flags.read_only, "{flags:?}");
    assert_eq!(n.count("grow"), 0, "nothing grown under ro: {:?}", n.devices.calls());
    // The device stays writable (a journal may need replaying at mount), and the stage is recorded
    // as it was before the option counted, so a stage of an earlier release is met by its retry.
    assert!(!n.svc.state.get(&id).staged.expect("intent").read_only);
    n.svc
        .stage(NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .expect("the same stage asked without the option is the same stage");
}

/// A block volume's stage mounts nothing at its staging path, so its unstage unmounts nothing
/// there: a client naming another volume's staging path (or a pod's mount) as a block volume's
/// staging path had its unstage take down whatever was mounted at that path.
#[test]
fn a_block_unstage_unmounts_nothing_at_its_staging_path() {
    let n = Node::new();
    let other = n.volume("pvc-other");
    let staging = n.path("stage-other");
    n.stage(&other, &staging).expect("stage a directory volume");
    let id = block_volume(&n.svc, "pvc-block", &staging);
    // As an earlier release recorded it: the state does not say the stage is a block stage.
    let mut m = n.svc.state.get(&id);
    m.staged.as_mut().expect("staged").block = false;
    n.svc.state.put(m).expect("state");
    n.unstage(&id, &staging).expect("unstage the block volume");
    assert!(n.devices.attached().is_empty(), "its device is detached");
    assert!(
        n.mounter.mounted().iter().any(|m| m.1 == staging),
        "the directory volume's staging mount is still there: {:?}",
        n.mounter.calls()
    );
    n.unstage(&other, &staging).expect("unstage the directory volume");
}

#[test]
fn a_publish_binds_only_from_the_stage_it_names_and_only_in_the_volumes_own_mode() {
    let n = Node::new();
    let id = n.volume("pvc-modes");
    let (staging, other, target) = (n.path("stage-a"), n.path("stage-b"), n.path("pod/mount"));
    // A block capability for a filesystem volume, at stage and at publish: the spec's "Exceeds
    // capabilities", FAILED_PRECONDITION.
    let err = stage_block(&n.svc, &id, &staging).expect_err("block stage of a filesystem volume");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(n.svc.state.get(&id).staged.is_none(), "a refused stage records nothing");
    n.stage(&id, &staging).expect("stage");
    let err = block_publish(&n.svc, &id, &staging, &target, false).expect_err("block publish");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A multi-node writer mode of a volume on a local pool: FAILED_PRECONDITION too.
    let err = n
        .publish(&id, &staging, &target, Mode::MultiNodeMultiWriter, false)
        .expect_err("RWX of a local volume");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A publish naming another staging path than the one staged: FAILED_PRECONDITION, and its
    // target is not even made.
    let err = n
        .publish(&id, &other, &target, Mode::SingleNodeWriter, false)
        .expect_err("publish from a staging path never staged");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(!target.exists(), "a refused publish makes no target");
    assert_eq!(n.mounter.mounted().len(), 1, "only the stage is mounted");
    // An unstage of the other path is of nothing of ours: OK, and the stage stays.
    n.unstage(&id, &other).expect("unstage of a path never staged");
    assert_eq!(n.mounter.mounted().len(), 1, "the stage stays mounted");
    assert_eq!(n.svc.state.get(&id).staged.map(|s| s.path), Some(staging.clone()));
    // The other way round: a filesystem capability for a block volume.
    let block = block_volume(&n.svc, "pvc-raw", &n.path("stage-raw"));
    let err = n
        .publish(
            &block,
            &n.path("stage-raw"),
            &n.path("pod/raw"),
            Mode::SingleNodeWriter,
            false,
        )
        .expect_err("filesystem publish of a block volume");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = n
        .stage(&block, &n.path("stage-raw"))
        .expect_err("filesystem stage of a block volume");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Nothing either refusal did stays: the block stage is as it was.
    assert!(n.svc.state.get(&block).published.is_empty());
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("the right publish still works");
}

/// A volume whose state file cannot be read (kept, and its volume refused node calls with
/// FAILED_PRECONDITION) is staged and published for all the node knows: NodeGetVolumeStats of its
/// publish path must not answer NOT_FOUND ("not staged or published at ... on this node").
#[test]
fn stats_of_a_volume_whose_state_is_unreadable_are_abnormal_never_not_found() {
    let mut n = Node::new();
    let id = n.volume("pvc-stats-unreadable");
    let (staging, target) = (n.path("stage"), n.path("pod/mount"));
    n.stage(&id, &staging).expect("stage");
    n.publish(&id, &staging, &target, Mode::SingleNodeWriter, false)
        .expect("publish");
    let (file, good) = the_state_file(&n);
    std::fs::write(&file, &good[..good.len() / 2]).expect("spoil the state");
    n = n.restart();
    let r = n
        .svc
        .stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .map_err(tonic::Status::from);
    match r {
        Err(e) => assert_ne!(e.code(), Code::NotFound, "{e:?}"),
        Ok(s) => assert!(s.volume_condition.as_ref().is_some_and(|c| c.abnormal), "{s:?}"),
    }
}
