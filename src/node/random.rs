//! The randomized crash tester, in process: seeded sequences of create (empty, clone, restore),
//! snapshot, expand, stage, publish (read-write or read-only), unpublish, unstage, delete, node
//! reboots and lease take-overs from a dead node on every layout (`dir`, `btrfs`, `image`, raw block images), against the engine and the Node service over the recording fakes of `sys` (mounts,
//! loop devices, filesystems, btrfs), so it needs no root and runs hundreds of steps a second.
//!
//! Before some calls it arms a fault for that one call: a crash at one of the named crash points
//! (the call unwinds there; the engine and the Node service are dropped and opened again from disk,
//! as a restarted driver would be, while the fakes keep their mounts and devices, as the kernel
//! would), a failure of a fake (`ENOSPC`, `EIO`, `EINTR`, `ENXIO` from mkfs, attach, bind, a btrfs
//! snapshot ...), a failure point of `sys` (a record write or a copy on a full disk), or a loop
//! device that vanishes behind the node's back. Then it retries the call without faults, as kubelet
//! and the sidecars would, and after every step checks the invariants of docs/design.md against its
//! own model:
//!
//! - data that is staged or published is never deleted (a delete of it is FAILED_PRECONDITION and
//!   its bytes stay);
//! - every record names exactly its own data (each volume holds the marker the model expects: its
//!   own, or its source's after a clone or restore; each snapshot names its source; a name taken by
//!   one source is never answered with another's);
//! - nothing leaks (the mounts, loop devices and btrfs subvolumes are exactly those the model
//!   holds; no `.tmp` record, nothing in `.work` or the trash);
//! - every call converges (the retried call answers what it should within a few attempts);
//! - a read-only publish is read-only (a read-only bind, or a block device the kernel refuses
//!   writes through, never the stage's writable device).
//!
//! Seeds of a run of their own also take backups (cut, upload, restore, forget, prune; see
//! `random/backups.rs`).
//!
//! A failure names its seed and step and prints the step log; rerun one seed with
//! `CELLAR_ENGINE_SEEDS=N cargo test --lib node::random` (`CELLAR_BACKUP_SEEDS=N` for the backup run). The through-the-driver tester with real
//! mounts and kill -9 is `tests/random_crash.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::Code;

use super::state::NodeState;
use super::NodeService;
use crate::crash::{in_thread, Crashed, Rng};
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::*;
use crate::storage::config::{Backend, Config, DeletePolicy};
use crate::storage::engine::{CapacityRange, LocalEngine, NewVolume, Source};
use crate::storage::id::{NodeId, PoolName, SnapshotId, VolumeId};
use crate::storage::pool::Kind;
use crate::storage::record::Layout;
use crate::sys::clock::SteppedClock;
use crate::sys::devices::{Devices, RecordingDevices};
use crate::sys::files::{self, Files, LinuxFiles, RecordingFiles};
use crate::sys::filesystems::RecordingFilesystems;
use crate::sys::mount::RecordingMounter;
use crate::sys::subvolumes::RecordingSubvolumes;
use crate::sys::StorageSys;

mod backups;
mod races;

/// 1-16, and regressions: 131 (a loop number recorded before a reboot, the stage's after it),
/// 355 (a stage that found its image moved aside by a delete that then lost answered NOT_FOUND),
/// 25 (a lease take-over killed after its rename left the stale lease for good), 32 (a failed
/// rename of a take-over made the node watch the lease a whole lease time again).
const SEEDS: [u64; 20] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 25, 32, 131, 355];
/// The seeds of the backup run (`random_sequences_with_backups_keep_every_invariant`): 1-8, and
/// regressions: 18 (a forget whose purge failed left the copy in the trash for its retry, which
/// found no record), 24 (the same of an upload removing its copy), 63 (an older image base whose
/// removal failed stayed beside the new one: the upload answered OK), 32 (the same once the
/// failure is an error: its retry found the old base's record gone and left its data in the trash),
/// 85 (the same of a kept copy that a node back from away dropped for its deletion mark), 124 (a
/// restore whose last rename failed left its whole copy in `.work`).
const BACKUP_SEEDS: [u64; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 18, 24, 32, 63, 85, 124];
/// The seeds of the racing backup run (`random_sequences_with_racing_backups_keep_every_invariant`):
/// 1-6, and the regression 368 (a replica's mark calling off the other's upload stayed after a
/// restart between the delete's tries: it was remembered in memory only).
const BACKUP_RACE_SEEDS: [u64; 7] = [1, 2, 3, 4, 5, 6, 368];
const STEPS: usize = 80;
/// Attempts of one call, after its faulted one, before it counts as not converging.
const ATTEMPTS: usize = 5;
const MAX_VOLUMES: usize = 8;
const MIB: u64 = 1 << 20;
/// Where an image volume's marker lives inside its file (past the fake superblocks).
const IMAGE_MARKER_AT: u64 = MIB;
const MARKER_LEN: usize = 64;

/// Where a volume or snapshot lives: in a node's own pool, or in the shared pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    Node(usize),
    Shared,
}

/// What the tester believes of one volume.
#[derive(Debug, Clone)]
struct Vol {
    id: String,
    layout: Layout,
    home: Home,
    bytes: u64,
    /// What its data must hold ("" for an image never written).
    marker: String,
    /// The node it is staged on, and where.
    staged: Option<(usize, PathBuf)>,
    published: Option<PathBuf>,
    /// Its publish is read-only (a block volume's then has a read-only loop device of its own).
    published_ro: bool,
    /// A raw block volume (an image with no filesystem), staged and published as a device.
    block: bool,
    /// What DeleteVolume does with its data (set at create or by ControllerModifyVolume).
    policy: DeletePolicy,
}

const POLICIES: [DeletePolicy; 3] = [DeletePolicy::Delete, DeletePolicy::Retain, DeletePolicy::Archive];

#[derive(Debug, Clone)]
struct Snap {
    id: String,
    source: String,
    layout: Layout,
    home: Home,
    bytes: u64,
    marker: String,
    /// The group snapshot it is a member of (deleted only with it).
    group: Option<String>,
    /// Cut of a raw block volume: what is restored from it is one too.
    block: bool,
}

impl Snap {
    /// A snapshot `name` just cut of `v`, as the model holds it: what `v` held, under `v`'s id.
    fn of(name: &str, v: &Vol, rec: &crate::storage::record::SnapshotRecord) -> Snap {
        assert_eq!(rec.source_volume_id.to_string(), v.id, "{name} names its source");
        Snap {
            id: rec.id.to_string(),
            source: v.id.clone(),
            layout: v.layout,
            home: v.home,
            bytes: rec.size_bytes.max(v.bytes),
            marker: v.marker.clone(),
            group: None,
            block: v.block,
        }
    }
}

/// A group snapshot: its id, where it lives, and its members' names in `Model::snaps`.
#[derive(Debug, Clone)]
struct Group {
    id: String,
    members: Vec<String>,
}

/// One fault, armed for one call.
#[derive(Debug, Clone)]
enum Fault {
    Crash(&'static str),
    /// A failure point of `sys` (`record:write`, `copy:data`) failing with an errno.
    Point(&'static str, i32),
    /// The next call of an operation of a fake failing with an errno.
    Mounter(&'static str, i32),
    Devices(&'static str, i32),
    Filesystems(&'static str, i32),
    Subvolumes(&'static str, i32),
    /// The loop device of the volume's image disappears before the call.
    Vanish,
    /// The first file operation of a kind (`file:rename`, `file:unlink` ...) fails with an errno;
    /// the ones after it succeed.
    FileOnce(&'static str, i32),
    /// The next call of an operation of the process's `Files` fake (any of them: `entry`,
    /// `read_optional`, `lock_while_held`, `create_exclusive` ... not only those with a failure
    /// point) fails with an errno.
    Files(&'static str, i32),
}

impl Fault {
    /// Whether the fault can fail the undo of a failed call itself (a removal, or the listing or
    /// lookup a removal makes first): then what the call made waits for its retry to remove.
    /// Any other failure is one the call cleans up after before it answers.
    fn fails_cleanup(&self) -> bool {
        match self {
            Fault::Subvolumes(op, _) => *op == "delete",
            Fault::FileOnce(point, _) => matches!(*point, "file:unlink" | "file:remove" | "file:list"),
            Fault::Files(op, _) => matches!(
                *op,
                "remove_stale_temps"
                    | "remove_file_if_exists"
                    | "remove_tree"
                    | "remove_entry"
                    | "remove_dir"
                    | "list_dir"
                    | "entry"
            ),
            _ => false,
        }
    }
}

/// The failure points of `sys::files`, one per kind of file operation.
const FILE_POINTS: [&str; 8] = [
    "file:create",
    "file:fsync",
    "file:rename",
    "file:unlink",
    "file:mkdir",
    "file:list",
    "file:remove",
    "file:grow",
];

const ERRNOS: [i32; 3] = [libc::ENOSPC, libc::EIO, libc::EINTR];

/// When `faulted`, one of the faults `choices` makes with an errno drawn first.
fn draw_fault<const N: usize>(rng: &mut Rng, faulted: bool, choices: impl Fn(i32) -> [Fault; N]) -> Option<Fault> {
    faulted.then(|| {
        let e = *rng.pick(&ERRNOS);
        rng.pick(&choices(e)).clone()
    })
}
/// What may go wrong in a DeleteVolume or DeleteSnapshot.
const DELETE_FAULTS: [Fault; 2] = [
    Fault::Crash("delete:after-trash"),
    Fault::Subvolumes("delete", libc::EIO),
];

/// How many nodes, and how many controller replicas, the cluster has.
const NODES: usize = 2;
const REPLICAS: usize = 2;
/// The pool every process shares (`backend: shared`, a plain directory here).
const SHARE: &str = "share";

/// One process of the cluster, with what outlives its "restart": a node (its own pool `default`
/// allowing every layout, the shared pool's volumes, and the Node service) or a controller replica
/// (the shared pool, as its owner). Each has its own fakes: a machine's mounts and devices.
struct Proc {
    name: NodeId,
    label: String,
    node: bool,
    config: Config,
    sys: StorageSys,
    files: Arc<RecordingFiles>,
    filesystems: Arc<RecordingFilesystems>,
    subvolumes: Arc<RecordingSubvolumes>,
    mounter: Arc<RecordingMounter>,
    devices: Arc<RecordingDevices>,
    /// The machine's monotonic clock, which a step moves on (a lease's time passing).
    clock: Arc<SteppedClock>,
    engine: Arc<LocalEngine>,
    svc: Option<NodeService>,
    dir: PathBuf,
}

impl Proc {
    fn new(root: &Path, share: &Path, name: &str, node: bool) -> Proc {
        let dir = root.join(name);
        let mut config = Config::default_for(&dir);
        config.pools[0].layouts.extend([Layout::Image, Layout::Btrfs]);
        let mut shared = config.pools[0].clone();
        shared.name = PoolName::parse(SHARE).expect("pool name");
        shared.path = share.to_path_buf();
        shared.backend = Backend::Shared;
        shared.layouts = vec![Layout::Dir, Layout::Image];
        config.pools.push(shared);
        // Every process reads the one repository (used only by seeds that take backups).
        config.repositories = vec![crate::backup::testing::repository(root)];
        let filesystems = Arc::new(RecordingFilesystems::default());
        // btrfs is a node's own disk; the share is not btrfs.
        let subvolumes = Arc::new(RecordingSubvolumes::over(&dir));
        // One machine: the engine reads the same devices and mounts its Node service makes.
        let mounter = Arc::new(RecordingMounter::default());
        let devices = Arc::new(RecordingDevices::default());
        let files = Arc::new(RecordingFiles::default());
        let mut sys = StorageSys::fakes(
            files.clone(),
            filesystems.clone(),
            subvolumes.clone(),
            devices.clone(),
            mounter.clone(),
        );
        let clock = Arc::new(SteppedClock::default());
        sys.clock = clock.clone();
        let name = NodeId::parse(name).expect("node id");
        let (engine, svc) = Self::open(&name, node, &config, &sys, &dir, &mounter, &devices);
        Proc {
            label: name.as_str().to_string(),
            name,
            node,
            config,
            sys,
            files,
            filesystems,
            subvolumes,
            mounter,
            devices,
            clock,
            engine,
            svc,
            dir,
        }
    }

    /// Opens the engine (and a node's service) from what is on disk, as the process starts: a
    /// node owns its own pool and uses the shared one, a replica owns the shared pool (roles.rs).
    fn open(
        name: &NodeId,
        node: bool,
        config: &Config,
        sys: &StorageSys,
        dir: &Path,
        mounter: &Arc<RecordingMounter>,
        devices: &Arc<RecordingDevices>,
    ) -> (Arc<LocalEngine>, Option<NodeService>) {
        let pick = move |pc: &crate::storage::config::PoolConfig| match node {
            true => Some(!pc.is_shared()),
            false => pc.is_shared().then_some(true),
        };
        let rosters = dir.join("rosters");
        let rosters = node.then_some(rosters.as_path());
        let engine = Arc::new(
            LocalEngine::open_keeping(sys.clone(), name.clone(), config, pick, rosters).expect("the engine opens"),
        );
        let svc = node.then(|| {
            let state = NodeState::open(&dir.join("node"), engine.files()).expect("node state opens");
            let mut svc = NodeService::new(name.clone(), engine.clone(), Arc::new(state), 0);
            svc.mounter = mounter.clone();
            svc.devices = devices.clone();
            svc
        });
        (engine, svc)
    }

    /// A controller replica's engine opened again from disk, as a new start of the process would
    /// open it (beside the old one, which the caller replaces).
    fn reopen(&self) -> Arc<LocalEngine> {
        assert!(!self.node, "a node restarts with its service: restart()");
        self.open_again().0
    }

    fn open_again(&self) -> (Arc<LocalEngine>, Option<NodeService>) {
        Self::open(
            &self.name,
            self.node,
            &self.config,
            &self.sys,
            &self.dir,
            &self.mounter,
            &self.devices,
        )
    }

    /// What a kill -9 and a new start do: everything in memory goes; the disk and the machine's
    /// mounts and devices (the fakes) stay.
    fn restart(&mut self) {
        let (engine, svc) = self.open_again();
        // The old service goes first: it holds the old engine.
        self.svc = None;
        self.engine = engine;
        self.svc = svc;
    }

    fn svc(&self) -> &NodeService {
        self.svc.as_ref().expect("a node")
    }

    fn pool(&self, name: &str) -> Option<&crate::storage::pool::Pool> {
        self.engine.pool(&PoolName::parse(name).expect("pool")).ok()
    }

    /// Clears every failure armed on this process's fakes, including one the call never reached
    /// (it must not fire on a later, unfaulted call).
    fn disarm(&self) {
        self.mounter.disarm();
        self.devices.disarm();
        self.files.disarm();
        self.filesystems.disarm();
        self.subvolumes.disarm();
    }
}

/// The cluster under test: nodes `n0`, `n1` and controller replicas `ctl-0`, `ctl-1` over one
/// shared pool, all in this process; processes `0..NODES` are the nodes.
struct Cluster {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    restarts: usize,
    /// A file operation's failure armed for the next call that has no fault of its own.
    file_fault: Option<Fault>,
    /// Per crash point: how often it was armed, and how often the call reached it.
    crashes: CrashTally,
}

/// Per crash point: how many calls had it armed, and how many of them reached it.
type CrashTally = BTreeMap<&'static str, (usize, usize)>;

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let share = dir.path().join("share");
        let mut procs = Vec::new();
        for n in 0..NODES {
            procs.push(Proc::new(dir.path(), &share, &format!("n{n}"), true));
        }
        for r in 0..REPLICAS {
            procs.push(Proc::new(dir.path(), &share, &format!("ctl-{r}"), false));
        }
        Cluster {
            dir,
            procs,
            restarts: 0,
            file_fault: None,
            crashes: CrashTally::new(),
        }
    }

    fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    /// The engine that answers controller calls on a volume at home in `home`, as the controller
    /// would route it: a node's own volumes to that node, a shared volume to either replica.
    fn controller(&self, home: Home, rng: &mut Rng) -> usize {
        match home {
            Home::Node(n) => n,
            Home::Shared => NODES + rng.below(REPLICAS),
        }
    }

    fn arm(&self, at: usize, fault: &Fault, model: &Model, vol: Option<&str>) {
        let p = &self.procs[at];
        match fault {
            Fault::Crash(point) => in_thread::crash_at(Some(point)),
            Fault::Point(point, e) => in_thread::fail_at(Some((point, *e))),
            Fault::Mounter(op, e) => p.mounter.fail_next(op, *e),
            Fault::Devices(op, e) => p.devices.fail_next(op, *e),
            Fault::Filesystems(op, e) => p.filesystems.fail_next(op, *e),
            Fault::Subvolumes(op, e) => p.subvolumes.fail_next(op, *e),
            Fault::FileOnce(point, e) => in_thread::fail_once_at(point, *e),
            Fault::Files(op, e) => p.files.fail_next(op, *e),
            Fault::Vanish => {
                if let Some(v) = vol.and_then(|n| model.vols.get(n)) {
                    if let Ok((_, data)) = p.engine.volume_data(&vid(&v.id)) {
                        p.devices.vanish(&data);
                    }
                }
            }
        }
    }

    fn disarm(&self) {
        in_thread::crash_at(None);
        in_thread::fail_at(None);
        for p in &self.procs {
            p.disarm();
        }
    }

    /// Runs `call` on process `at` once with `fault` armed, then again without until it answers
    /// what `done` accepts; a crash restarts that process first. Returns the answer it converged on.
    #[allow(clippy::too_many_arguments)]
    fn converge<T: std::fmt::Debug>(
        &mut self,
        log: &mut Vec<String>,
        model: &Model,
        at: usize,
        vol: Option<&str>,
        fault: Option<Fault>,
        call: impl Fn(&Proc) -> Result<T, tonic::Status>,
        done: impl Fn(&Result<T, tonic::Status>) -> bool,
    ) -> Result<T, tonic::Status> {
        let fault = fault.or_else(|| self.file_fault.take());
        if let Some(f) = &fault {
            self.arm(at, f, model, vol);
            let first = catch_unwind(AssertUnwindSafe(|| call(&self.procs[at])));
            self.disarm();
            if let Fault::Crash(point) = f {
                let tally = self.crashes.entry(point).or_default();
                tally.0 += 1;
                let reached = first.as_ref().err().is_some_and(|p| p.is::<Crashed>());
                tally.1 += usize::from(reached);
                if !reached {
                    // Not a failure (the call may not pass there: a delete of a volume already
                    // gone), but not a tested crash either: the log and the run's tally say so.
                    log.push(format!("    crash point {point} not reached"));
                }
            }
            match first {
                Err(panic) => match panic.downcast::<Crashed>() {
                    Ok(c) => {
                        log.push(format!("    {} crashed at {}; restarting", self.procs[at].label, c.0));
                        self.procs[at].restart();
                        self.restarts += 1;
                        // A start sweeps what a crash leaves mid-write in the pools it owns; data a
                        // crashed create made before its record is the retry's to remove or finish.
                        // A node's own pool is swept whole: also data no record names.
                        let own = self.procs[at].pool("default").map(|p| p.root().to_path_buf());
                        let left = leftovers(self, |p| Some(p.root()) == own.as_deref());
                        assert!(left.is_empty(), "a restart left behind: {left:?}");
                    }
                    Err(other) => std::panic::resume_unwind(other),
                },
                Ok(r) => {
                    log.push(format!("    with {f:?}: {}", brief(&r)));
                    if done(&r) {
                        return r;
                    }
                    // A disk or device failing is the caller's to retry, never a verdict on the
                    // request (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS ... would make the
                    // sidecars give up or kubelet report the wrong cause).
                    if let Err(s) = &r {
                        assert!(
                            matches!(
                                s.code(),
                                Code::Internal | Code::Unavailable | Code::ResourceExhausted | Code::Aborted
                            ),
                            "{f:?} answered {:?}: {}",
                            s.code(),
                            s.message()
                        );
                    }
                    // A call that fails cleans up after itself: nothing half-made waits for a retry
                    // (unless the disk failed the cleanup itself, removing a file or dropping a
                    // subvolume from the trash: then the retry must remove it).
                    let left = leftovers(self, |_| true);
                    assert!(
                        left.is_empty() || f.fails_cleanup(),
                        "a failed call left behind: {left:?}"
                    );
                    // Nor a stage: kubelet never unstages a stage that failed, and what it left
                    // (intent, mount) kept the volume from being deleted.
                    let staged = stages_left(self, model);
                    assert!(
                        staged.is_empty() || f.fails_cleanup(),
                        "a failed call left a stage behind: {staged:?}"
                    );
                }
            }
        }
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let r = call(&self.procs[at]);
            if done(&r) {
                return r;
            }
            log.push(format!("    retry: {}", brief(&r)));
            last = Some(brief(&r));
        }
        panic!("the call did not converge after {ATTEMPTS} retries; last answer: {last:?}");
    }
}

fn brief<T: std::fmt::Debug>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

fn vid(s: &str) -> VolumeId {
    VolumeId::parse(s).expect("a volume id the engine gave")
}

fn ok<T>(r: &Result<T, tonic::Status>) -> bool {
    r.is_ok()
}

#[derive(Debug, Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    snaps: BTreeMap<String, Snap>,
    groups: BTreeMap<String, Group>,
    /// Backups by their CSI name, in seeds that take them ([`backups`]).
    backups: BTreeMap<String, backups::Bk>,
    /// Local copies of backups forgotten while their node was away (its index, the backup's
    /// id), by snapshot id: the node drops each once it is back.
    doomed: BTreeMap<String, (usize, String)>,
    /// Forgets made while a node was away: every other one its agent could not be reached (a
    /// node still counted alive), the others the controller did not ask it (counted down).
    aways: usize,
    with_backups: bool,
    /// Backup seeds that also race backup calls with each other ([`backups::racing`]).
    backup_races: bool,
    /// The backup repository has been initialised (by the first backup).
    repository_made: bool,
    next: usize,
}

fn cap(v: &Vol) -> VolumeCapability {
    match v.block {
        true => crate::client::block_capability(Mode::SingleNodeWriter),
        false => crate::client::mount_capability(Mode::SingleNodeWriter, vec![]),
    }
}

/// Reads the marker a volume's data holds now.
fn read_marker(layout: Layout, data: &Path) -> String {
    let bytes = match layout {
        Layout::Image => {
            let f = std::fs::File::open(data).expect("an image volume's file");
            let mut b = vec![0u8; MARKER_LEN];
            // A file shorter than the marker's place reads as unwritten.
            let n = f.read_at(&mut b, IMAGE_MARKER_AT).unwrap_or(0);
            b.truncate(n);
            b
        }
        _ => std::fs::read(data.join("marker")).unwrap_or_default(),
    };
    String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_string()
}

/// What a pod plants in a tree volume beside its marker: a symlink out of the volume (to the
/// directory holding every volume) and a FIFO nobody writes to. Every copy must carry both as they
/// are: following the one would put other volumes' data in the copy, opening the other would wait
/// for a writer for ever.
fn plant_hostile(data: &Path) {
    let out = data.parent().expect("the volumes' directory");
    match std::os::unix::fs::symlink(out, data.join("escape")) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("plant a symlink: {e}"),
        _ => {}
    }
    let fifo = nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR;
    match nix::unistd::mkfifo(&data.join("pipe"), fifo) {
        Err(e) if e != nix::errno::Errno::EEXIST => panic!("plant a FIFO: {e}"),
        _ => {}
    }
}

/// A tree volume holds its marker and what its pod planted, each still of its own kind.
fn check_planted(name: &str, layout: Layout, data: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if layout == Layout::Image {
        return;
    }
    for e in std::fs::read_dir(data).expect("a tree volume's directory") {
        let e = e.expect("an entry");
        let kind = e.file_type().expect("its type"); // of the entry itself, not what it names
        let ok = match e.file_name().to_str() {
            Some("marker") => kind.is_file(),
            Some("escape") => kind.is_symlink(),
            Some("pipe") => kind.is_fifo(),
            _ => false,
        };
        assert!(
            ok,
            "{name} holds '{}' as {kind:?}: only its marker and its pod's symlink and FIFO, as they were",
            e.file_name().to_string_lossy()
        );
    }
}

/// Writes `marker` into a volume's data, as a pod would.
fn write_marker(layout: Layout, data: &Path, marker: &str) {
    match layout {
        Layout::Image => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(data)
                .expect("an image volume's file");
            let mut b = marker.as_bytes().to_vec();
            b.resize(MARKER_LEN, 0);
            f.write_all_at(&b, IMAGE_MARKER_AT).expect("write the marker");
        }
        _ => std::fs::write(data.join("marker"), marker).expect("write the marker"),
    }
}

fn create_faults(rng: &mut Rng, layout: Layout, copy: bool) -> Fault {
    let e = *rng.pick(&ERRNOS);
    let mut choices = vec![
        Fault::Crash("create-volume:before-record"),
        Fault::Point("record:write", e),
    ];
    if copy {
        choices.push(Fault::Crash("copy:before-rename"));
        choices.push(Fault::Point("copy:data", e));
    }
    match layout {
        Layout::Image => {
            choices.push(Fault::Crash("image:before-rename"));
            choices.push(Fault::Filesystems("mkfs", e));
            choices.push(Fault::Filesystems("probe", libc::EIO));
        }
        Layout::Btrfs => {
            choices.push(Fault::Subvolumes(if copy { "snapshot" } else { "create" }, e));
            choices.push(Fault::Subvolumes("limit", e));
        }
        _ => {}
    }
    rng.pick(&choices).clone()
}

/// Which calls a seed draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Engine,
    Backups,
    BackupRaces,
}

fn run_seed(seed: u64, run: Run, log: &mut Vec<String>) -> CrashTally {
    let mut rng = Rng(seed);
    let mut c = Cluster::new();
    let mut m = Model {
        with_backups: run != Run::Engine,
        backup_races: run == Run::BackupRaces,
        ..Model::default()
    };
    for step in 0..STEPS {
        let mut faulted = rng.chance(45);
        if faulted && rng.chance(35) {
            // This step's fault is a failing file operation, whichever the call makes first: of a
            // kind (a failure point below the fake), or one operation of the fake.
            let e = *rng.pick(&ERRNOS);
            c.file_fault = Some(match rng.chance(50) {
                true => Fault::FileOnce(FILE_POINTS[rng.below(FILE_POINTS.len())], e),
                false => Fault::Files(files::FALLIBLE_OPS[rng.below(files::FALLIBLE_OPS.len())], e),
            });
            faulted = false;
        }
        let before = log.len();
        one_step(&mut c, &mut m, &mut rng, faulted, log);
        if log.len() == before {
            log.push(format!("{step}: nothing to do"));
        } else {
            log[before] = format!("{step}: {}", log[before]);
        }
        c.file_fault = None;
        check(&c, &m);
    }
    // The end of every seed: undo everything, and nothing may remain.
    let names: Vec<String> = m.vols.keys().cloned().collect();
    for name in names {
        if m.vols[&name].published.is_some() {
            kubelet(&mut c, &mut m, &name, Kubelet::Unpublish, None, log);
        }
        if m.vols[&name].staged.is_some() {
            kubelet(&mut c, &mut m, &name, Kubelet::Unstage, None, log);
        }
        delete(&mut c, &mut m, &mut rng, &name, None, log);
        check(&c, &m);
    }
    let groups: Vec<String> = m.groups.keys().cloned().collect();
    for name in groups {
        delete_group(&mut c, &mut m, &name, None, log);
        check(&c, &m);
    }
    let snaps: Vec<String> = m.snaps.keys().cloned().collect();
    for name in snaps {
        delete_snapshot(&mut c, &mut m, &mut rng, &name, None, log);
        check(&c, &m);
    }
    backups::forget_all(&mut c, &mut m, &mut rng, log);
    // The shared pool's trash is purged in the background (its trees may be huge), and so are
    // temporary files a failed unlink left there once ten minutes old: as that purge would, now.
    let share = c.procs[NODES].pool(SHARE).expect("the shared pool");
    share.purge_trash().expect("purge");
    share.remove_temps_older_than(std::time::Duration::ZERO).expect("sweep");
    for (p, what) in [
        (c.share().join(".trash"), "trash"),
        (c.share().join(".staged"), "stage marks"),
        (c.share().join(".leases"), "leases"),
        (c.share().join(".locks"), "lock files"),
    ] {
        let left = LinuxFiles.list_dir(&p).unwrap_or_default();
        assert!(left.is_empty(), "the share's {what} left at the end: {left:?}");
    }
    for p in &c.procs {
        assert!(p.engine.volumes().is_empty() && p.engine.snapshots().is_empty());
        let subvolumes = live_subvolumes(p);
        assert!(subvolumes.is_empty(), "subvolumes left on {}: {subvolumes:?}", p.label);
    }
    let freezes: usize = c
        .procs
        .iter()
        .map(|p| p.filesystems.calls().iter().filter(|x| x.starts_with("freeze")).count())
        .sum();
    let races = log.iter().filter(|l| l.contains("race: ")).count();
    log.push(format!(
        "seed {seed}: {STEPS} steps, {} restarts, {freezes} filesystem freezes, {races} backup races",
        c.restarts
    ));
    std::mem::take(&mut c.crashes)
}

/// A pod writes: the volume's data changes, and what snapshots of it must hold with it.
fn pod_writes(c: &Cluster, m: &mut Model, rng: &mut Rng, n: &str, log: &mut Vec<String>) {
    let at = c.controller(m.vols[n].home, rng);
    let v = m.vols.get_mut(n).expect("volume");
    let (_, data) = c.procs[at].engine.volume_data(&vid(&v.id)).expect("the volume's data");
    v.marker = format!("{n}@{}", m.next);
    m.next += 1;
    write_marker(v.layout, &data, &v.marker);
    if v.layout != Layout::Image {
        plant_hostile(&data);
    }
    log.push(format!("write {n}: {}", v.marker));
}

fn names_where(m: &Model, f: impl Fn(&Vol) -> bool) -> Vec<String> {
    m.vols.iter().filter(|(_, v)| f(v)).map(|(k, _)| k.clone()).collect()
}

fn one_step(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    if m.with_backups && rng.chance(25) {
        return backups::step(c, m, rng, faulted, log);
    }
    let names: Vec<String> = m.vols.keys().cloned().collect();
    let any = |rng: &mut Rng| (!names.is_empty()).then(|| rng.pick(&names).clone());
    match rng.below(22) {
        0 | 1 if m.vols.len() < MAX_VOLUMES => create(c, m, rng, faulted, log),
        2 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            let f = faulted.then(|| {
                let e = *rng.pick(&ERRNOS);
                let layout = m.vols[&n].layout;
                let mut choices = vec![
                    Fault::Crash("create-snapshot:before-record"),
                    Fault::Point("record:write", e),
                    Fault::Point("copy:data", e),
                ];
                match layout {
                    Layout::Btrfs => choices.push(Fault::Subvolumes("snapshot", e)),
                    Layout::Image => choices.extend([
                        Fault::Crash("copy:before-rename"),
                        Fault::Filesystems("freeze", e),
                        Fault::Filesystems("thaw", libc::EIO),
                    ]),
                    _ => choices.push(Fault::Crash("copy:before-rename")),
                }
                rng.pick(&choices).clone()
            });
            snapshot(c, m, rng, &n, f, log)
        }
        3 if m.snaps.values().any(|s| s.group.is_none()) => {
            let s: Vec<String> = m
                .snaps
                .iter()
                .filter(|(_, s)| s.group.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            let s = rng.pick(&s).clone();
            let f = faulted.then(|| rng.pick(&DELETE_FAULTS).clone());
            delete_snapshot(c, m, rng, &s, f, log)
        }
        12 => group(c, m, rng, faulted, log),
        21 => reboot(c, m, rng, log),
        15 => race_create(c, m, rng, log),
        16 => race_delete_and_stage(c, m, rng, log),
        17 => races::race_on_volume(c, m, rng, log, false),
        20 => races::race_on_volume(c, m, rng, log, true),
        18 => races::race_same_name(c, m, rng, log),
        19 => races::race_two_stages(c, m, rng, log),
        14 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            let f = faulted.then(|| Fault::Point("record:write", *rng.pick(&ERRNOS)));
            modify(c, m, rng, &n, f, log)
        }
        13 if !m.groups.is_empty() => {
            let g: Vec<String> = m.groups.keys().cloned().collect();
            let g = rng.pick(&g).clone();
            let f = faulted.then(|| {
                rng.pick(&[
                    Fault::Crash("delete:after-trash"),
                    Fault::Crash("delete-group:before-record"),
                    Fault::Subvolumes("delete", libc::EIO),
                ])
                .clone()
            });
            delete_group(c, m, &g, f, log)
        }
        4 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            let f = draw_fault(rng, faulted, |e| {
                [
                    Fault::Crash("expand:before-record"),
                    Fault::Point("record:write", e),
                    Fault::Subvolumes("limit", e),
                ]
            });
            expand(c, m, rng, &n, f, log)
        }
        5 | 6 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            let v = m.vols[&n].clone();
            let e = *rng.pick(&ERRNOS);
            match (&v.staged, &v.published) {
                (None, _) => {
                    let f = faulted.then(|| {
                        let mut choices = vec![Fault::Crash("stage:before-mount"), Fault::Point("record:write", e)];
                        if v.layout == Layout::Image {
                            choices.extend([
                                Fault::Crash("stage:before-attach"),
                                Fault::Crash("stage:after-attach"),
                                Fault::Devices("attach", *rng.pick(&[libc::ENXIO, libc::EIO, libc::EINTR])),
                                Fault::Devices("find", libc::EIO),
                                Fault::Mounter("mount", e),
                            ]);
                        } else {
                            choices.push(Fault::Mounter("bind", e));
                        }
                        rng.pick(&choices).clone()
                    });
                    stage(c, m, rng, &n, f, log)
                }
                (Some(_), None) => {
                    let f = faulted.then(|| {
                        rng.pick(&[
                            Fault::Crash("publish:before-mount"),
                            Fault::Mounter("bind", e),
                            Fault::Point("record:write", e),
                        ])
                        .clone()
                    });
                    kubelet(c, m, &n, Kubelet::Publish(rng.chance(40)), f, log)
                }
                (Some(_), Some(_)) => {
                    let f = faulted.then(|| {
                        rng.pick(&[
                            Fault::Crash("unpublish:after-unmount"),
                            Fault::Mounter("unmount", libc::EIO),
                            Fault::Point("record:write", e),
                        ])
                        .clone()
                    });
                    kubelet(c, m, &n, Kubelet::Unpublish, f, log)
                }
            }
        }
        7 if m.vols.values().any(|v| v.staged.is_some() && v.published.is_none()) => {
            let ready = names_where(m, |v| v.staged.is_some() && v.published.is_none());
            let name = rng.pick(&ready).clone();
            let image = m.vols[&name].layout == Layout::Image;
            let f = faulted.then(|| {
                let mut choices = vec![
                    Fault::Mounter("unmount", libc::EIO),
                    Fault::Point("record:write", libc::EIO),
                ];
                if image {
                    choices.extend([
                        Fault::Crash("unstage:before-detach"),
                        Fault::Devices("detach", libc::EIO),
                        Fault::Devices("find", libc::EIO),
                        Fault::Vanish,
                    ]);
                }
                rng.pick(&choices).clone()
            });
            kubelet(c, m, &name, Kubelet::Unstage, f, log)
        }
        8 | 9 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            let f = faulted.then(|| rng.pick(&DELETE_FAULTS).clone());
            delete(c, m, rng, &n, f, log)
        }
        10 if !m.vols.is_empty() => {
            let n = any(rng).expect("a volume");
            pod_writes(c, m, rng, &n, log)
        }
        11 if m
            .vols
            .values()
            .any(|v| v.home == Home::Shared && v.layout == Layout::Image && v.staged.is_some()) =>
        {
            // Drawn from a generator of its own, so that every seed's sequence of calls stays as
            // it was unless a take-over comes.
            if Rng(log.len() as u64 ^ (m.next as u64).rotate_left(17)).chance(30) {
                return take_over(c, m, rng, faulted, log);
            }
            // The other node asks for a shared image volume staged on one node: its lease refuses.
            let held = names_where(m, |v| {
                v.home == Home::Shared && v.layout == Layout::Image && v.staged.is_some()
            });
            let name = rng.pick(&held).clone();
            let on = m.vols[&name].staged.as_ref().expect("staged").0;
            refused_elsewhere(c, m, &name, (on + 1) % NODES, log);
        }
        _ if m.vols.len() < MAX_VOLUMES => create(c, m, rng, faulted, log),
        _ => {}
    }
}

/// Node `other` asks to stage shared image volume `name`, which another node holds staged: its
/// lease refuses (FAILED_PRECONDITION naming the holder).
fn refused_elsewhere(c: &mut Cluster, m: &mut Model, name: &str, other: usize, log: &mut Vec<String>) {
    let v = m.vols[name].clone();
    let (on, _) = v.staged.clone().expect("staged");
    let staging = c.procs[other].dir.join(format!("kubelet/staging/{name}"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    log.push(format!("stage {name} on n{other} too, while n{on} holds it"));
    // The holder renews as its renewal thread does (none runs here): the lease time passes in
    // real time, and a slow run would otherwise let `other` take a live holder's lease over.
    let p = &c.procs[on];
    super::renew_leases(&p.engine, &p.svc().state, &PoolName::parse(SHARE).expect("pool"));
    let r = c.converge(
        log,
        m,
        other,
        Some(name),
        None,
        |p| {
            p.svc()
                .stage(NodeStageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(cap(&v)),
                    ..Default::default()
                })
                .map_err(tonic::Status::from)
        },
        |r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition),
    );
    let msg = r.expect_err("refused").message().to_string();
    assert!(msg.contains(&format!("n{on}")), "the refusal names the holder: {msg}");
}

/// A node dies holding a shared image volume staged (its machine is gone: no mounts, no devices,
/// no renewals) and the volume's pod moves to the other node. That node's kubelet is refused while
/// the lease is fresh, then takes it over once its own clock has watched the lease unrenewed for
/// the pool's whole lease time (maybe killed, or failed by the share, on the way). The dead node
/// starts again: its renewal finds the lease lost and must not take it back; kubelet's unpublish
/// and unstage there (the pod is gone) succeed and leave the new holder's lease alone; then its
/// reconciler stages again what else the node had.
fn take_over(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    let held = names_where(m, |v| {
        v.home == Home::Shared && v.layout == Layout::Image && v.staged.is_some()
    });
    let name = rng.pick(&held).clone();
    let v = m.vols[&name].clone();
    let (on, old_staging) = v.staged.clone().expect("staged");
    let other = (on + 1) % NODES;
    log.push(format!("n{on} dies holding {name}; its pod moves to n{other}"));
    c.procs[on].devices.reboot(Some(rng.below(1 << 30) as u64));
    c.procs[on].mounter.reboot();
    refused_elsewhere(c, m, &name, other, log);
    let (lease, ttl) = c.procs[other]
        .engine
        .shared_lease(&vid(&v.id))
        .expect("a shared image volume has a lease");
    c.procs[other].clock.advance(ttl);
    log.push(format!("    n{other} watched the lease for {} s", ttl.as_secs()));
    let fault = draw_fault(rng, faulted, |e| {
        [
            Fault::Crash("lease:moved-aside"),
            Fault::Files("rename_if_exists", e),
            Fault::Files("create_exclusive", e),
        ]
    });
    kubelet(c, m, &name, Kubelet::Stage(other), fault, log);
    let holder = || {
        let bytes = std::fs::read(&lease).expect("the lease");
        serde_json::from_slice::<crate::storage::lease::LeaseFile>(&bytes)
            .expect("a lease")
            .node
    };
    assert_eq!(holder(), format!("n{other}"), "n{other} took the lease over");

    // The dead node starts again, its state still naming the stage and the publish.
    log.push(format!("n{on} starts again"));
    c.procs[on].restart();
    c.restarts += 1;
    let p = &c.procs[on];
    super::renew_leases(&p.engine, &p.svc().state, &PoolName::parse(SHARE).expect("pool"));
    assert_eq!(
        p.engine.leases.lost(&v.id).as_deref(),
        Some(format!("n{other}").as_str()),
        "n{on} learns its lease was taken over"
    );
    assert_eq!(holder(), format!("n{other}"), "n{on}'s renewal does not take it back");
    let (id, staging) = (v.id.clone(), old_staging.display().to_string());
    if let Some(target) = &v.published {
        let target = target.display().to_string();
        log.push(format!("    unpublish {name} on n{on}"));
        until_ok(c, m, on, log, |p| {
            p.svc()
                .unpublish(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.clone(),
                })
                .map(|_| ())
        });
    }
    log.push(format!("    unstage {name} on n{on}"));
    until_ok(c, m, on, log, |p| {
        p.svc()
            .unstage(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .map(|_| ())
    });
    assert_eq!(
        holder(),
        format!("n{other}"),
        "n{on}'s unstage leaves the new lease alone"
    );
    m.vols.get_mut(&name).expect("volume").published = None;
    restage(c, m, rng, on, log);
}

/// Runs a node call on process `at`, with no fault, until it succeeds (as kubelet retries it).
fn until_ok<E: Into<tonic::Status>>(
    c: &mut Cluster,
    m: &Model,
    at: usize,
    log: &mut Vec<String>,
    call: impl Fn(&Proc) -> Result<(), E>,
) {
    c.converge(log, m, at, None, None, |p| call(p).map_err(Into::into), ok)
        .expect("converged");
}

/// Calls `call` until it answers something `again` does not retry, as a sidecar or kubelet would,
/// for at most a minute (a loaded machine may hold the other racer's copy that long).
fn retrying<T>(call: impl Fn() -> Result<T, tonic::Status>, again: impl Fn(Code) -> bool) -> Result<T, tonic::Status> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match call() {
            Err(e) if again(e.code()) && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            done => return done,
        }
    }
}

/// Both controller replicas take the same CreateVolume of the shared pool at the same moment (as
/// while a provisioner's leader changes), from two threads: each retries ABORTED as the
/// provisioner would, both must end with the same volume, made once, holding what it should.
fn race_create(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    if m.vols.len() >= MAX_VOLUMES {
        return;
    }
    let name = format!("pvc-{}", m.next);
    m.next += 1;
    // A clone takes long enough to overlap; an empty image when there is nothing to clone.
    let sources: Vec<Vol> = m.vols.values().filter(|v| v.home == Home::Shared).cloned().collect();
    let (source, layout, bytes, marker, block) = match sources.is_empty() {
        true => (None, Layout::Image, 32 * MIB, String::new(), false),
        false => {
            let v = rng.pick(&sources).clone();
            (Some(Source::Volume(vid(&v.id))), v.layout, v.bytes, v.marker, v.block)
        }
    };
    log.push(format!(
        "create {name} {layout:?} through both replicas at once{}",
        source
            .as_ref()
            .map(|s| format!(" (clone of {s:?})"))
            .unwrap_or_default()
    ));
    let req = || {
        let mut r = NewVolume::plain(&name, Some(layout), bytes);
        r.source = source.clone();
        r.pool = Some(PoolName::parse(SHARE).expect("pool"));
        if block {
            r.mode = crate::storage::record::VolumeMode::Block;
        }
        r
    };
    // Sometimes the first replica dies at a crash point of its create and starts again at once,
    // while the other's copy may still run: its start must not sweep what the other is building.
    let mut points = vec!["create-volume:before-record"];
    points.push(match source {
        Some(_) => "copy:before-rename",
        None => "image:before-rename",
    });
    let crash = rng.chance(40).then(|| *rng.pick(&points));
    type Made = (
        Result<crate::storage::record::VolumeRecord, tonic::Status>,
        Option<(String, Arc<LocalEngine>)>,
    );
    let made: Vec<Made> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..REPLICAS)
            .map(|r| {
                let p = &c.procs[NODES + r];
                let req = &req;
                let crash = crash.filter(|_| r == 0);
                s.spawn(move || {
                    let mut engine = p.engine.clone();
                    let mut restarted = None;
                    if let Some(point) = crash {
                        in_thread::crash_at(Some(point));
                        let first = catch_unwind(AssertUnwindSafe(|| engine.create_volume(req())));
                        in_thread::crash_at(None);
                        if let Err(panic) = first {
                            let at = panic
                                .downcast::<Crashed>()
                                .unwrap_or_else(|o| std::panic::resume_unwind(o));
                            engine = p.reopen();
                            restarted = Some((at.0, engine.clone()));
                        }
                    }
                    let r = retrying(
                        || engine.create_volume(req()).map_err(tonic::Status::from),
                        |c| c == Code::Aborted,
                    );
                    (r, restarted)
                })
            })
            .collect();
        calls.into_iter().map(|h| h.join().expect("no panic")).collect()
    });
    let mut answers = Vec::new();
    for (r, (answer, restarted)) in made.into_iter().enumerate() {
        if let Some((at, engine)) = restarted {
            log.push(format!(
                "    {} crashed at {at} and started again while the other ran",
                c.procs[NODES + r].label
            ));
            c.procs[NODES + r].engine = engine;
            c.restarts += 1;
        }
        answers.push(answer);
    }
    let recs: Vec<_> = answers
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a racing create of {name} failed: {:?}: {}", e.code(), e.message())))
        .collect();
    assert!(
        recs.windows(2).all(|w| w[0] == w[1]),
        "both replicas answer the one volume made: {recs:?}"
    );
    let rec = recs.into_iter().next().expect("a record");
    let made = NewVol {
        layout,
        home: Home::Shared,
        policy: DeletePolicy::Delete,
        holds: &marker,
        what: "made through both replicas at once",
    };
    made.take(&c.procs[NODES], m, &rec);
}

/// What a volume just made must be, for [`NewVol::take`].
struct NewVol<'a> {
    layout: Layout,
    home: Home,
    policy: DeletePolicy,
    /// The marker its data must start with: its source's, or "" when made empty.
    holds: &'a str,
    /// How it was made, for the message.
    what: &'a str,
}

impl NewVol<'_> {
    /// Takes a volume just made (`rec`, read through `p`) into the model: its data must hold what
    /// its source held and nothing else; from now on it holds a marker of its own, so that a
    /// mix-up with its source shows.
    fn take(&self, p: &Proc, m: &mut Model, rec: &crate::storage::record::VolumeRecord) {
        let name = &rec.name;
        let (_, data) = p.engine.volume_data(&rec.id).expect("the new volume's data");
        assert_eq!(
            read_marker(self.layout, &data),
            self.holds,
            "{name} ({}) must start with its source's data, whole, and nothing else",
            self.what
        );
        check_planted(name, self.layout, &data);
        let own = format!("{name}@0");
        write_marker(self.layout, &data, &own);
        m.vols.insert(
            name.clone(),
            Vol {
                id: rec.id.to_string(),
                layout: self.layout,
                home: self.home,
                bytes: rec.capacity_bytes,
                marker: own,
                staged: None,
                published: None,
                published_ro: false,
                block: rec.mode == crate::storage::record::VolumeMode::Block,
                policy: self.policy,
            },
        );
    }
}

/// A volume is deleted while a node stages it, at the same moment (a shared one through either
/// replica, a node's own through that node): one of them must lose. Never both succeed (the pod
/// would run on data being deleted).
fn race_delete_and_stage(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let free = names_where(m, |v| v.staged.is_none() && v.published.is_none());
    if free.is_empty() {
        return;
    }
    let name = rng.pick(&free).clone();
    let v = m.vols[&name].clone();
    let (on, replica) = match v.home {
        Home::Node(n) => (n, n),
        Home::Shared => (rng.below(NODES), NODES + rng.below(REPLICAS)),
    };
    let staging = c.procs[on].dir.join(format!("kubelet/staging/{name}"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    log.push(format!(
        "delete {name} through {} while n{on} stages it",
        c.procs[replica].label
    ));
    // The provisioner retries ABORTED; kubelet retries a stage whatever it answered, until the
    // volume is not found.
    let (deleted, staged) = std::thread::scope(|s| {
        let (node, ctl) = (&c.procs[on], &c.procs[replica]);
        let d = s.spawn(|| {
            retrying(
                || ctl.engine.delete_volume(&vid(&v.id)).map_err(tonic::Status::from),
                |c| c == Code::Aborted,
            )
        });
        let st = s.spawn(|| {
            retrying(
                || {
                    node.svc()
                        .stage(NodeStageVolumeRequest {
                            volume_id: v.id.clone(),
                            staging_target_path: staging.display().to_string(),
                            volume_capability: Some(cap(&v)),
                            ..Default::default()
                        })
                        .map(|_| ())
                        .map_err(tonic::Status::from)
                },
                |c| c != Code::NotFound,
            )
        });
        (d.join().expect("no panic"), st.join().expect("no panic"))
    });
    log.push(format!("    delete: {}, stage: {}", brief(&deleted), brief(&staged)));
    assert!(
        !(deleted.is_ok() && staged.is_ok()),
        "{name} was deleted and staged at once: a pod would run on deleted data"
    );
    if deleted.is_ok() {
        m.vols.remove(&name);
    } else {
        let code = deleted.as_ref().err().map(|e| e.code());
        assert_eq!(
            code,
            Some(Code::FailedPrecondition),
            "the delete lost to the stage: {deleted:?}"
        );
        staged.as_ref().expect("the stage that won");
        m.vols.get_mut(&name).expect("volume").staged = Some((on, staging));
    }
}

fn create(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    let name = format!("pvc-{}", m.next);
    m.next += 1;
    let home = match rng.below(3) {
        0 => Home::Shared,
        _ => Home::Node(rng.below(NODES)),
    };
    // Empty, a clone of a volume, or a restore of a snapshot, from the same pool.
    let vols: Vec<Vol> = m.vols.values().filter(|v| v.home == home).cloned().collect();
    let snaps: Vec<Snap> = m.snaps.values().filter(|s| s.home == home).cloned().collect();
    let (source, layout, min, marker, what, block) = match rng.below(4) {
        1 if !vols.is_empty() => {
            let v = rng.pick(&vols).clone();
            let what = format!("clone of {}", v.id);
            (
                Some(Source::Volume(vid(&v.id))),
                v.layout,
                v.bytes,
                v.marker,
                what,
                v.block,
            )
        }
        2 if !snaps.is_empty() => {
            let s = rng.pick(&snaps).clone();
            let what = format!("restore of {}", s.id);
            let id = SnapshotId::parse(&s.id).expect("snapshot id");
            (Some(Source::Snapshot(id)), s.layout, s.bytes, s.marker, what, s.block)
        }
        _ => {
            let layouts: &[Layout] = match home {
                Home::Shared => &[Layout::Dir, Layout::Image],
                Home::Node(_) => &[Layout::Dir, Layout::Btrfs, Layout::Image],
            };
            let layout = *rng.pick(layouts);
            let min = if layout == Layout::Image { 32 * MIB } else { MIB };
            let block = layout == Layout::Image && rng.chance(30);
            let what = if block { "empty, raw block" } else { "empty" };
            (None, layout, min, String::new(), what.to_string(), block)
        }
    };
    let bytes = min + MIB * rng.below(3) as u64;
    let policy = if rng.chance(80) {
        DeletePolicy::Delete
    } else {
        *rng.pick(&POLICIES)
    };
    let at = c.controller(home, rng);
    log.push(format!(
        "create {name} {layout:?} {bytes} {what} in {home:?} through {}",
        c.procs[at].label
    ));
    let fault = faulted.then(|| create_faults(rng, layout, source.is_some()));
    let req = {
        let name = name.clone();
        move || {
            let mut r = NewVolume::plain(&name, Some(layout), bytes);
            r.source = source.clone();
            r.delete_policy = Some(policy);
            if block {
                r.mode = crate::storage::record::VolumeMode::Block;
            }
            if home == Home::Shared {
                r.pool = Some(PoolName::parse(SHARE).expect("pool"));
            }
            r
        }
    };
    let rec = c
        .converge(
            log,
            m,
            at,
            None,
            fault,
            |p| p.engine.create_volume(req()).map_err(tonic::Status::from),
            ok,
        )
        .expect("converged");
    assert_eq!(rec.name, name);
    assert_eq!(rec.layout, layout);
    let made = NewVol {
        layout,
        home,
        policy,
        holds: &marker,
        what: &what,
    };
    made.take(&c.procs[at], m, &rec);
    // The same name with another size is refused, and changes nothing; for a shared volume the
    // provisioner's retry may land on the other replica.
    if rng.chance(20) {
        let at = c.controller(home, rng);
        let mut other = NewVolume::plain(&rec.name, Some(layout), rec.capacity_bytes + 7 * MIB);
        if home == Home::Shared {
            other.pool = Some(PoolName::parse(SHARE).expect("pool"));
        }
        let r = c.procs[at].engine.create_volume(other).map_err(tonic::Status::from);
        assert_eq!(
            r.as_ref().map_err(|s| s.code()).err(),
            Some(Code::AlreadyExists),
            "a second create of {name} under a taken name with another size through {}: {}",
            c.procs[at].label,
            brief(&r)
        );
    }
}

fn snapshot(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let at = c.controller(v.home, rng);
    // A consistent snapshot of a mounted image freezes its filesystem while it copies.
    let freeze = rng.chance(50);
    let cut = |name: String| {
        let id = vid(&v.id);
        move |p: &Proc| {
            p.engine
                .create_snapshot(&name, &id, freeze)
                .map_err(tonic::Status::from)
        }
    };
    // Sometimes a name a snapshot of another volume of the same pool holds: never adopted.
    let taken: Vec<(String, Snap)> = m
        .snaps
        .iter()
        .filter(|(_, s)| s.source != v.id && s.home == v.home && s.group.is_none())
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    if !taken.is_empty() && rng.chance(25) {
        let (name, s) = rng.pick(&taken).clone();
        log.push(format!("snapshot {vol} under {name}, a name {} holds", s.source));
        let r = c.converge(
            log,
            m,
            at,
            Some(vol),
            fault,
            cut(name),
            |r| matches!(r, Err(s) if s.code() == Code::AlreadyExists),
        );
        assert!(r.is_err());
        return;
    }
    let name = format!("snap-{}", m.next);
    m.next += 1;
    if freeze && v.home == Home::Shared && v.layout == Layout::Image && v.staged.is_some() {
        // Mounted on a node, where a replica cannot freeze it: refused, never cut unfrozen.
        let (on, _) = v.staged.clone().expect("staged");
        log.push(format!(
            "snapshot {vol} as {name} with freeze through {}, staged on n{on}",
            c.procs[at].label
        ));
        let r = c.converge(
            log,
            m,
            at,
            Some(vol),
            fault,
            cut(name),
            |r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition),
        );
        let msg = r.expect_err("refused").message().to_string();
        assert!(msg.contains(&format!("n{on}")), "the refusal names the node: {msg}");
        return;
    }
    log.push(format!("snapshot {vol} as {name} through {}", c.procs[at].label));
    let rec = c
        .converge(log, m, at, Some(vol), fault, cut(name.clone()), ok)
        .expect("converged");
    m.snaps.insert(name.clone(), Snap::of(&name, &v, &rec));
}

/// Cuts a group snapshot of one to three volumes of one node's pool.
fn group(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    let n = rng.below(NODES);
    let mut members = names_where(m, |v| v.home == Home::Node(n));
    if members.is_empty() {
        return;
    }
    let take = 1 + rng.below(members.len().min(3));
    while members.len() > take {
        members.remove(rng.below(members.len()));
    }
    members.sort_by_key(|name| m.vols[name].id.clone());
    let name = format!("group-{}", m.next);
    m.next += 1;
    log.push(format!("group snapshot {name} of {members:?} on n{n}"));
    let req = crate::storage::engine::NewGroup {
        name: name.clone(),
        members: members.iter().map(|v| vid(&m.vols[v].id)).collect(),
        parameters: BTreeMap::new(),
        per_volume: true,
        freeze_timeout: std::time::Duration::from_secs(5),
    };
    let fault = faulted.then(|| {
        let e = *rng.pick(&ERRNOS);
        rng.pick(&[
            Fault::Crash("group:frozen"),
            Fault::Crash("group:before-records"),
            Fault::Crash("group:before-group-record"),
            Fault::Point("record:write", e),
            Fault::Point("copy:data", e),
            Fault::Subvolumes("snapshot", e),
            Fault::Filesystems("freeze", e),
            Fault::Filesystems("thaw", libc::EIO),
        ])
        .clone()
    });
    let rec = c
        .converge(
            log,
            m,
            n,
            None,
            fault,
            |p| p.engine.create_group(&req).map_err(tonic::Status::from),
            ok,
        )
        .expect("converged");
    assert_eq!(rec.members.len(), members.len());
    let mut names = Vec::new();
    for (member, vol) in rec.members.iter().zip(&members) {
        let v = &m.vols[vol];
        assert_eq!(member.volume_id.to_string(), v.id, "{name}'s members in id order");
        let snap = format!("{name}/{vol}");
        m.snaps.insert(
            snap.clone(),
            Snap {
                id: member.snapshot_id.to_string(),
                source: v.id.clone(),
                layout: v.layout,
                home: v.home,
                bytes: member.size_bytes.max(v.bytes),
                marker: v.marker.clone(),
                group: Some(name.clone()),
                block: v.block,
            },
        );
        names.push(snap);
    }
    m.groups.insert(
        name,
        Group {
            id: rec.id.to_string(),
            members: names,
        },
    );
}

fn delete_group(c: &mut Cluster, m: &mut Model, name: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let g = m.groups[name].clone();
    let id = crate::storage::id::GroupId::parse(&g.id).expect("group id");
    let Home::Node(n) = m.snaps[&g.members[0]].home else {
        panic!("groups are cut on a node");
    };
    log.push(format!("delete group snapshot {name}"));
    c.converge(
        log,
        m,
        n,
        None,
        fault,
        |p| p.engine.delete_group(&id).map_err(tonic::Status::from),
        ok,
    )
    .expect("converged");
    for s in &g.members {
        m.snaps.remove(s);
    }
    m.groups.remove(name);
}

fn delete_snapshot(
    c: &mut Cluster,
    m: &mut Model,
    rng: &mut Rng,
    name: &str,
    fault: Option<Fault>,
    log: &mut Vec<String>,
) {
    let s = m.snaps[name].clone();
    let at = c.controller(s.home, rng);
    log.push(format!("delete snapshot {name} through {}", c.procs[at].label));
    let id = SnapshotId::parse(&s.id).expect("snapshot id");
    c.converge(
        log,
        m,
        at,
        None,
        fault,
        |p| p.engine.delete_snapshot(&id).map_err(tonic::Status::from),
        ok,
    )
    .expect("converged");
    m.snaps.remove(name);
}

fn expand(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let at = c.controller(v.home, rng);
    let grow = |to: u64| {
        let id = vid(&v.id);
        move |p: &Proc| {
            p.engine
                .expand_volume(&id, CapacityRange { required: to, limit: 0 })
                .map_err(tonic::Status::from)
        }
    };
    if rng.chance(20) {
        // Far past any room: refused, and the volume keeps its size.
        let huge = u64::MAX >> rng.below(3);
        log.push(format!("expand {vol} to {huge}"));
        let r = c.converge(
            log,
            m,
            at,
            Some(vol),
            fault,
            grow(huge),
            |r| matches!(r, Err(s) if matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)),
        );
        assert!(r.is_err());
        return;
    }
    let to = v.bytes + MIB * (1 + rng.below(4) as u64);
    log.push(format!("expand {vol} to {to} through {}", c.procs[at].label));
    let (rec, _) = c
        .converge(log, m, at, Some(vol), fault, grow(to), ok)
        .expect("converged");
    assert!(rec.capacity_bytes >= to, "{vol} grew to {} < {to}", rec.capacity_bytes);
    m.vols.get_mut(vol).expect("volume").bytes = rec.capacity_bytes;
}

/// The four calls kubelet makes on a node, as the tester plays them.
#[derive(Debug, Clone, Copy)]
enum Kubelet {
    Stage(usize),
    /// A publish at a new pod's directory, read-only or not.
    Publish(bool),
    /// The publish the volume has, made again (after a reboot, as kubelet's reconciler does).
    Republish,
    Unpublish,
    Unstage,
}

/// A node reboots: its mounts and loop devices are gone and its driver starts again; then kubelet
/// stages and publishes again what the node had (its reconciler does, for the pods still bound
/// there). The kernel hands out loop numbers afresh, so a number a publish recorded before may now
/// be another device's, even the stage's own.
fn reboot(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let n = rng.below(NODES);
    log.push(format!("reboot n{n}"));
    // Every other restart (no draw: the seeds' sequences stay), the node first starts with its
    // own pool left out of its configuration, as after an operator's slip.
    if c.restarts % 2 == 0 {
        left_out(c, m, n, log);
    }
    let p = &mut c.procs[n];
    p.devices.reboot(Some(rng.below(1 << 30) as u64));
    p.mounter.reboot();
    p.restart();
    c.restarts += 1;
    restage(c, m, rng, n, log);
}

/// Node `n` started with its own pool left out of its configuration: every volume the model has
/// there is listed, abnormal, saying so, and every delete of its volumes and snapshots is refused
/// (FAILED_PRECONDITION), never answered OK while the data stays. The step's checks then find the
/// data as it was.
fn left_out(c: &Cluster, m: &Model, n: usize, log: &mut Vec<String>) {
    log.push(format!(
        "n{n} starts with its pool left out of its configuration, then as configured"
    ));
    let p = &c.procs[n];
    let mut config = p.config.clone();
    config.pools.retain(|pc| pc.is_shared());
    let pick = |pc: &crate::storage::config::PoolConfig| Some(!pc.is_shared());
    let rosters = p.dir.join("rosters");
    let engine = LocalEngine::open_keeping(p.sys.clone(), p.name.clone(), &config, pick, Some(rosters.as_path()))
        .expect("the engine opens without the pool");
    let listed: BTreeMap<String, crate::storage::engine::Condition> = engine
        .volumes_with_condition()
        .into_iter()
        .map(|(r, c)| (r.id.to_string(), c))
        .collect();
    let refused = |r: Result<(), crate::storage::StorageError>, what: &str| match r {
        Err(e @ crate::storage::StorageError::PoolBroken { .. }) => {
            let s = tonic::Status::from(e);
            assert_eq!(s.code(), Code::FailedPrecondition, "{what}: {s:?}");
            assert!(s.message().contains("no longer in the configuration"), "{what}: {s:?}");
        }
        other => panic!("{what} in the pool left out of the configuration answered {other:?}"),
    };
    for (name, v) in m.vols.iter().filter(|(_, v)| v.home == Home::Node(n)) {
        let c = listed
            .get(&v.id)
            .unwrap_or_else(|| panic!("{name} ({}) is not listed with its pool left out: {listed:?}", v.id));
        assert!(
            c.abnormal && c.message.contains("no longer in the configuration"),
            "{name}: {c:?}"
        );
        refused(engine.delete_volume(&vid(&v.id)), &format!("DeleteVolume of {name}"));
    }
    let snapshots: BTreeMap<String, crate::storage::record::SnapshotRecord> = engine
        .listed_snapshots()
        .into_iter()
        .map(|r| (r.id.to_string(), r))
        .collect();
    for (name, s) in m.snaps.iter().filter(|(_, s)| s.home == Home::Node(n)) {
        // Listed as its roster last recorded it, its name taken.
        let r = snapshots
            .get(&s.id)
            .unwrap_or_else(|| panic!("snapshot {name} ({}) is not listed with its pool left out", s.id));
        assert!(r.source_volume_id.to_string() == s.source, "{name}: {r:?}");
        // (A group's member is recorded under a name of its own.)
        let found = engine.snapshot_named(&r.name).map(|r| r.id.to_string());
        assert_eq!(found, Some(s.id.clone()), "{name}");
        let id = SnapshotId::parse(&s.id).expect("snapshot id");
        refused(engine.delete_snapshot(&id), &format!("DeleteSnapshot of {name}"));
    }
}

/// kubelet's reconciler on node `n` after it started again: it stages and publishes again what the
/// model has there.
fn restage(c: &mut Cluster, m: &mut Model, rng: &mut Rng, n: usize, log: &mut Vec<String>) {
    let mut names = names_where(m, |v| v.staged.as_ref().is_some_and(|(on, _)| *on == n));
    // In whatever order the reconciler finds them.
    for i in (1..names.len()).rev() {
        names.swap(i, rng.below(i + 1));
    }
    for name in names {
        kubelet(c, m, &name, Kubelet::Stage(n), None, log);
        if m.vols[&name].published.is_some() {
            kubelet(c, m, &name, Kubelet::Republish, None, log);
        }
    }
}

/// Stages a volume on its node, or a shared one on either node.
fn stage(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let on = match m.vols[vol].home {
        Home::Node(n) => n,
        Home::Shared => rng.below(NODES),
    };
    kubelet(c, m, vol, Kubelet::Stage(on), fault, log)
}

/// Runs one node call on `vol` until it succeeds, as kubelet retries it, and records its effect.
/// The staging path is one per volume and node; each publish gets a pod directory of its own.
fn kubelet(c: &mut Cluster, m: &mut Model, vol: &str, call: Kubelet, fault: Option<Fault>, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let id = v.id.clone();
    let on = match (call, &v.staged) {
        (Kubelet::Stage(n), _) => n,
        (_, Some((n, _))) => *n,
        (_, None) => panic!("{call:?} of {vol}, which is not staged"),
    };
    let dir = c.procs[on].dir.clone();
    let staging = dir.join(format!("kubelet/staging/{vol}"));
    let target = match call {
        Kubelet::Publish(_) => {
            m.next += 1;
            dir.join(format!("kubelet/pods/{vol}-{}/mount", m.next))
        }
        _ => v.published.clone().unwrap_or_default(),
    };
    let read_only = match call {
        Kubelet::Publish(ro) => ro,
        _ => v.published_ro,
    };
    // kubelet makes the staging directory and the pod's directory; the target itself is ours.
    std::fs::create_dir_all(&staging).expect("staging dir");
    std::fs::create_dir_all(target.parent().unwrap_or(&staging)).expect("pod dir");
    log.push(format!("{call:?} {vol} on {}", c.procs[on].label).to_lowercase());
    let (staging_s, target_s) = (staging.display().to_string(), target.display().to_string());
    // Drawn from a generator of its own, so that every seed's sequence of calls stays as it was.
    let mut side = Rng(log.len() as u64 ^ (m.next as u64).rotate_left(32) ^ 0x9a7e_u64);
    if matches!(call, Kubelet::Stage(_) | Kubelet::Publish(_)) && side.chance(15) {
        hostile_path(c, m, &mut side, on, vol, call, &staging_s, log);
    }
    c.converge(
        log,
        m,
        on,
        Some(vol),
        fault,
        |p| {
            let r = match call {
                Kubelet::Stage(_) => p
                    .svc()
                    .stage(NodeStageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging_s.clone(),
                        volume_capability: Some(cap(&v)),
                        ..Default::default()
                    })
                    .map(|_| ()),
                Kubelet::Publish(_) | Kubelet::Republish => p
                    .svc()
                    .publish(NodePublishVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging_s.clone(),
                        target_path: target_s.clone(),
                        volume_capability: Some(cap(&v)),
                        readonly: read_only,
                        ..Default::default()
                    })
                    .map(|_| ()),
                Kubelet::Unpublish => p
                    .svc()
                    .unpublish(NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: target_s.clone(),
                    })
                    .map(|_| ()),
                Kubelet::Unstage => p
                    .svc()
                    .unstage(NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging_s.clone(),
                    })
                    .map(|_| ()),
            };
            r.map_err(tonic::Status::from)
        },
        ok,
    )
    .expect("converged");
    let v = m.vols.get_mut(vol).expect("volume");
    match call {
        Kubelet::Stage(n) => v.staged = Some((n, staging)),
        Kubelet::Publish(ro) => (v.published, v.published_ro) = (Some(target), ro),
        Kubelet::Republish => {}
        Kubelet::Unpublish => v.published = None,
        Kubelet::Unstage => v.staged = None,
    }
}

/// A stage or publish of `vol` on node `on` at a path a hand-run client could give, before the
/// real one: inside another volume's data, over a pool's stage marks or root (spelled in other
/// case too, as a share that folds case resolves it), or inside another volume staged here. It
/// must be INVALID_ARGUMENT with nothing made there; `check`'s mount comparison then shows that
/// nothing was mounted either.
#[allow(clippy::too_many_arguments)]
fn hostile_path(
    c: &Cluster,
    m: &Model,
    side: &mut Rng,
    on: usize,
    vol: &str,
    call: Kubelet,
    staging: &str,
    log: &mut Vec<String>,
) {
    let p = &c.procs[on];
    let (pool, share) = (p.pool("default").expect("pool"), p.pool(SHARE).expect("share"));
    let other = m.vols.values().nth(side.below(m.vols.len())).expect("a volume");
    let staged_here: Vec<&PathBuf> = m
        .vols
        .values()
        .filter_map(|v| v.staged.as_ref().filter(|s| s.0 == on).map(|s| &s.1))
        .collect();
    let path = match side.below(5) {
        0 => pool.data_path(Kind::Volume, &vid(&other.id).0.key).join("x"),
        1 => pool.root().join(".staged").join(vol),
        2 => share.root().to_path_buf(),
        3 if !staged_here.is_empty() => staged_here[side.below(staged_here.len())].join("x"),
        _ => pool.root().join("Volumes").join(vol),
    };
    let (id, cap) = (m.vols[vol].id.clone(), cap(&m.vols[vol]));
    let r = match call {
        Kubelet::Stage(_) => p
            .svc()
            .stage(NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: path.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .map(|_| ()),
        _ => p
            .svc()
            .publish(NodePublishVolumeRequest {
                volume_id: id,
                staging_target_path: staging.to_string(),
                target_path: path.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .map(|_| ()),
    }
    .map_err(tonic::Status::from);
    log.push(format!("  at {} -> {}", path.display(), brief(&r)));
    assert!(
        matches!(&r, Err(s) if s.code() == Code::InvalidArgument),
        "{call:?} of {vol} at {} answered {r:?}, not INVALID_ARGUMENT",
        path.display()
    );
    assert!(
        path == share.root() || !path.exists(),
        "{call:?} of {vol} at {} made the path",
        path.display()
    );
}

fn delete(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let at = c.controller(v.home, rng);
    let in_use = v.staged.is_some() || v.published.is_some();
    // Drawn from a generator of its own, so that every seed's sequence of calls stays as it was.
    if Rng(log.len() as u64 ^ (m.next as u64).rotate_left(32)).chance(25) {
        unreadable_record(c, &v, at, in_use, log);
    }
    log.push(format!(
        "delete {vol}{} through {}",
        if in_use { " (in use)" } else { "" },
        c.procs[at].label
    ));
    let r = c.converge(
        log,
        m,
        at,
        Some(vol),
        fault,
        |p| p.engine.delete_volume(&vid(&v.id)).map_err(tonic::Status::from),
        |r| match r {
            Ok(()) => !in_use,
            Err(s) => in_use && s.code() == Code::FailedPrecondition,
        },
    );
    if in_use {
        let msg = r.expect_err("refused").message().to_string();
        let (on, staging) = v.staged.clone().expect("in use means staged");
        let here = v.published.as_ref().unwrap_or(&staging).display().to_string();
        assert!(
            msg.contains(&here) || msg.contains(&format!("n{on}")),
            "the refusal says where {vol} is in use (n{on}, {here}): {msg}"
        );
        return;
    }
    if v.policy != DeletePolicy::Delete {
        // Kept by its policy: out of the live namespace, holding what the volume last held.
        let pool = c.procs[at]
            .pool(match v.home {
                Home::Shared => SHARE,
                Home::Node(_) => "default",
            })
            .expect("the pool");
        let kept = match v.policy {
            DeletePolicy::Retain => pool.retained_dir(),
            _ => pool.archive_dir(),
        };
        let holds = LinuxFiles
            .list_dir(&kept)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.extension().is_none_or(|e| e != "json"))
            .any(|p| read_marker(v.layout, &p) == v.marker);
        assert!(
            holds,
            "{vol}, deleted under {:?}, is kept in {}",
            v.policy,
            kept.display()
        );
    }
    m.vols.remove(vol);
}

/// Before a delete, now and then: the volume's record is replaced by one this version cannot read
/// (a later version's), as a rolling upgrade or a hand edit leaves it. The process that owns the
/// pool must still open it (a node pool's index is read at start: it is restarted), the delete
/// must leave the data (INTERNAL naming the record, or FAILED_PRECONDITION while in use), and once
/// the record is repaired (and read again at a restart) everything goes on; `check` after the
/// step finds the data and the record as the model holds them.
fn unreadable_record(c: &mut Cluster, v: &Vol, at: usize, in_use: bool, log: &mut Vec<String>) {
    let pool = match v.home {
        Home::Shared => SHARE,
        Home::Node(_) => "default",
    };
    let record = c.procs[at]
        .pool(pool)
        .expect("the pool")
        .record_path(Kind::Volume, &vid(&v.id).0.key);
    let good = std::fs::read(&record).expect("the record");
    std::fs::write(&record, br#"{"id": "written by a later version", "layout": "zfs"}"#).expect("write");
    let owner = match v.home {
        Home::Node(n) => Some(n),
        Home::Shared => None,
    };
    if let Some(n) = owner {
        c.procs[n].restart(); // must not fail on the record
        c.restarts += 1;
    }
    let r = c.procs[at]
        .engine
        .delete_volume(&vid(&v.id))
        .map_err(tonic::Status::from);
    log.push(format!("  {} with an unreadable record -> {}", v.id, brief(&r)));
    let want = if in_use {
        Code::FailedPrecondition
    } else {
        Code::Internal
    };
    assert!(
        matches!(&r, Err(s) if s.code() == want),
        "a delete of {} with an unreadable record answered {r:?}, not {want:?}",
        v.id
    );
    std::fs::write(&record, good).expect("repair");
    if let Some(n) = owner {
        c.procs[n].restart();
        c.restarts += 1;
    }
}

/// ControllerModifyVolume: a new delete policy, which every process then reads.
fn modify(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, fault: Option<Fault>, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let at = c.controller(v.home, rng);
    let policy = *rng.pick(&POLICIES);
    log.push(format!(
        "modify {vol}: delete policy {policy:?} through {}",
        c.procs[at].label
    ));
    let change = crate::storage::engine::Mutable {
        compression: None,
        delete_policy: Some(policy),
    };
    let rec = c
        .converge(
            log,
            m,
            at,
            Some(vol),
            fault,
            |p| {
                p.engine
                    .modify_volume(&vid(&v.id), &change)
                    .map_err(tonic::Status::from)
            },
            ok,
        )
        .expect("converged");
    assert_eq!(rec.delete_policy, Some(policy));
    m.vols.get_mut(vol).expect("volume").policy = policy;
}

/// The invariants, after every step, on every process.
fn check(c: &Cluster, m: &Model) {
    for (i, p) in c.procs.iter().enumerate() {
        let sees = |home: Home| home == Home::Shared || home == Home::Node(i);
        // Every record names its own data, every process sees the same shared records, and only
        // the model's records exist.
        let ids: BTreeSet<String> = p.engine.volumes().iter().map(|r| r.id.to_string()).collect();
        let want: BTreeSet<String> = m.vols.values().filter(|v| sees(v.home)).map(|v| v.id.clone()).collect();
        assert_eq!(
            ids, want,
            "the volumes {} knows are those made and not deleted",
            p.label
        );
        // A node's rosters name exactly its volumes, at their sizes (what it lists while a pool
        // is shut), unless a write of one failed just now (the next change writes it whole).
        if p.node && !p.engine.roster_behind() {
            let roster = crate::storage::roster::Roster::new(&p.dir.join("rosters"), p.engine.files());
            let read: Vec<crate::storage::roster::Listed> = p
                .config
                .pools
                .iter()
                .filter(|pc| !pc.is_shared())
                .map(|pc| roster.read(&pc.name))
                .collect();
            let listed: BTreeMap<String, u64> = read
                .iter()
                .flat_map(|l| &l.volumes)
                .map(|(id, r)| (id.clone(), r.capacity_bytes))
                .collect();
            let want: BTreeMap<String, u64> = m
                .vols
                .values()
                .filter(|v| v.home == Home::Node(i))
                .map(|v| (v.id.clone(), v.bytes))
                .collect();
            assert_eq!(listed, want, "{}'s rosters name its volumes at their sizes", p.label);
            // And its snapshots (backups' local copies too), as recorded.
            let listed: BTreeMap<String, &crate::storage::record::SnapshotRecord> = read
                .iter()
                .flat_map(|l| &l.snapshots)
                .map(|(id, r)| (id.clone(), r))
                .collect();
            let records = p.engine.snapshots();
            let want: BTreeMap<String, &crate::storage::record::SnapshotRecord> = records
                .iter()
                .filter(|r| matches!(r.id.0.location, crate::storage::id::Location::Local(_)))
                .map(|r| (r.id.to_string(), r))
                .collect();
            assert_eq!(listed, want, "{}'s rosters name its snapshots as recorded", p.label);
        }
        for (name, v) in m.vols.iter().filter(|(_, v)| sees(v.home)) {
            let (rec, data) = p.engine.volume_data(&vid(&v.id)).expect("a recorded volume's data");
            assert_eq!(&rec.name, name);
            assert_eq!(rec.layout, v.layout);
            assert_eq!(
                rec.delete_policy.unwrap_or(DeletePolicy::Delete),
                v.policy,
                "{name}'s delete policy as {} reads it",
                p.label
            );
            assert_eq!(
                rec.capacity_bytes, v.bytes,
                "{name}'s size as {} reads it: every process agrees",
                p.label
            );
            assert_eq!(
                read_marker(v.layout, &data),
                v.marker,
                "{name} ({}) holds its own data{}",
                v.id,
                if v.staged.is_some() { ", and it is staged" } else { "" }
            );
            check_planted(name, v.layout, &data);
            // The size is what the data is held to, not only what the record says: an image
            // file's length, a btrfs subvolume's limit (a `dir` volume has none).
            match v.layout {
                Layout::Image => assert_eq!(
                    std::fs::metadata(&data).expect("image file").len(),
                    rec.capacity_bytes,
                    "{name}'s image file is as long as its size"
                ),
                Layout::Btrfs => {
                    let parent = data.parent().expect("a subvolume's directory");
                    let limit = p.subvolumes.below(parent).into_iter().find(|(at, _)| *at == data);
                    assert_eq!(
                        limit.map(|(_, s)| s.limit),
                        Some(rec.capacity_bytes),
                        "{name}'s subvolume is limited to its size"
                    );
                }
                Layout::Dir => {}
            }
        }
        // Backups' local copies are held to what the model expects of them apart.
        let copies = backups::copy_ids(m);
        let snaps: BTreeMap<String, String> = p
            .engine
            .snapshots()
            .iter()
            .filter(|s| !copies.contains(&s.id.to_string()))
            .map(|s| (s.id.to_string(), s.source_volume_id.to_string()))
            .collect();
        let want: BTreeMap<String, String> = m
            .snaps
            .values()
            .filter(|s| sees(s.home))
            .map(|s| (s.id.clone(), s.source.clone()))
            .collect();
        assert_eq!(snaps, want, "each snapshot {} knows names its own source", p.label);
        backups::check_copies(p, m, sees, &want.keys().cloned().collect());
        for (name, g) in &m.groups {
            let Home::Node(n) = m.snaps[&g.members[0]].home else {
                continue;
            };
            if n != i {
                continue;
            }
            let id = crate::storage::id::GroupId::parse(&g.id).expect("group id");
            let rec = p.engine.group(&id).expect("read").expect("the group's record");
            assert_eq!(&rec.name, name);
            let members: Vec<String> = rec.members.iter().map(|x| x.snapshot_id.to_string()).collect();
            let want: Vec<String> = g.members.iter().map(|s| m.snaps[s].id.clone()).collect();
            assert_eq!(members, want, "{name} names its members");
        }
        assert!(p.filesystems.frozen().is_empty(), "{} left filesystems frozen", p.label);
        // Nothing leaks on this machine: mounts, devices, subvolumes.
        let mut mounted: Vec<PathBuf> = p.mounter.mounted().into_iter().map(|m| m.1).collect();
        mounted.sort();
        let on_here = |v: &&Vol| v.staged.as_ref().is_some_and(|(n, _)| *n == i);
        let mut want: Vec<PathBuf> = m
            .vols
            .values()
            .filter(on_here)
            // A block volume's stage is its device alone; its publish binds the device.
            .flat_map(|v| {
                let staging = v.staged.iter().filter(|_| !v.block).map(|s| s.1.clone());
                staging.chain(v.published.iter().cloned())
            })
            .collect();
        want.sort();
        assert_eq!(
            mounted, want,
            "{}'s mounts are its stages and publishes, once each",
            p.label
        );
        let mut attached = p.devices.attached();
        attached.sort();
        let mut want: Vec<PathBuf> = m
            .vols
            .values()
            .filter(on_here)
            .filter(|v| v.layout == Layout::Image)
            .flat_map(|v| {
                let data = p.engine.volume_data(&vid(&v.id)).expect("data").1;
                // A read-only publish of a block volume has a read-only device of its own.
                let own = v.block && v.published_ro && v.published.is_some();
                std::iter::repeat_n(data, if own { 2 } else { 1 })
            })
            .collect();
        want.sort();
        assert_eq!(
            attached, want,
            "{}: one loop device per staged image and per read-only block publish, none else",
            p.label
        );
        // A read-only publish is read-only: a filesystem's bind has the flag, a block volume's
        // device is one the kernel refuses writes through (never the stage's writable device).
        for (name, v) in m.vols.iter().filter(|(_, v)| on_here(v)) {
            let (Some(target), true) = (&v.published, v.published_ro) else {
                continue;
            };
            let (source, _, flags) = p
                .mounter
                .mounted()
                .into_iter()
                .find(|m| &m.1 == target)
                .expect("the publish is mounted");
            if v.block {
                let n = source
                    .to_str()
                    .and_then(|s| s.strip_prefix("/dev/loop"))
                    .and_then(|n| n.parse().ok());
                let device = crate::sys::loopdev::LoopDevice::new(n.expect("bound from a loop device"));
                assert!(
                    p.devices.is_read_only(&device).expect("attached"),
                    "{name}'s read-only block publish on {} is bound from {}, a writable device",
                    p.label,
                    source.display()
                );
            } else {
                assert!(flags.read_only, "{name}'s read-only publish on {} is writable", p.label);
            }
        }
        let subvols = live_subvolumes(p).len();
        let want = m
            .vols
            .values()
            .filter(|v| v.home == Home::Node(i) && v.layout == Layout::Btrfs)
            .count()
            + m.snaps
                .values()
                .filter(|s| s.home == Home::Node(i) && s.layout == Layout::Btrfs)
                .count()
            + backups::btrfs_copies(p, m);
        assert_eq!(
            subvols, want,
            "{}: one subvolume per btrfs volume and snapshot",
            p.label
        );
    }
    let left = leftovers(c, |_| true);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The btrfs subvolumes of a node, but those its delete policy keeps on purpose (`retained/`,
/// `archive/`: the data of deleted volumes, an administrator's to remove).
fn live_subvolumes(p: &Proc) -> Vec<PathBuf> {
    let kept: Vec<PathBuf> = p
        .pool("default")
        .map(|pool| vec![pool.retained_dir(), pool.archive_dir()])
        .unwrap_or_default();
    p.subvolumes
        .below(&p.dir)
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| !kept.iter().any(|k| path.starts_with(k)))
        .collect()
}

/// What a failed or crashed call may have left in the pools: anything in `.work` or the trash of a
/// node's pool (a shared pool's trash is purged in the background), a half-written record, and
/// data no record names in the pools `orphans` picks.
fn leftovers(c: &Cluster, orphans: impl Fn(&crate::storage::pool::Pool) -> bool) -> Vec<PathBuf> {
    let mut pools: Vec<&crate::storage::pool::Pool> =
        c.procs[..NODES].iter().filter_map(|p| p.pool("default")).collect();
    pools.extend(c.procs[NODES].pool(SHARE));
    let mut left = Vec::new();
    for pool in pools {
        left.extend(LinuxFiles.list_dir(&pool.work_dir()).unwrap_or_default());
        // A shared pool's lock files exist only while a call holds them.
        left.extend(LinuxFiles.list_dir(&pool.root().join(".locks")).unwrap_or_default());
        if !pool.shared() {
            left.extend(LinuxFiles.list_dir(&pool.trash_dir()).unwrap_or_default());
        }
        for kind in [Kind::Volume, Kind::Snapshot] {
            for p in LinuxFiles.list_dir(&pool.collection_dir(kind)).unwrap_or_default() {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let orphan = !name.ends_with(".json") && !p.with_file_name(format!("{name}.json")).exists();
                if name.ends_with(files::TMP_SUFFIX) || (orphans(pool) && orphan) {
                    left.push(p);
                }
            }
        }
    }
    left
}

/// Stages of volumes the model holds unstaged: a node state's intent, or a mount at the staging path.
fn stages_left(c: &Cluster, m: &Model) -> Vec<String> {
    let mut left = Vec::new();
    for (name, v) in m.vols.iter().filter(|(_, v)| v.staged.is_none()) {
        for p in c.procs.iter().filter(|p| p.svc.is_some()) {
            if p.svc().state.get(&v.id).staged.is_some() {
                left.push(format!("{name}: an intent on {}", p.label));
            }
            let staging = p.dir.join(format!("kubelet/staging/{name}"));
            if p.mounter.mounted().iter().any(|(_, at, _)| *at == staging) {
                left.push(format!("{name}: mounted at its staging path on {}", p.label));
            }
        }
    }
    left
}

fn seeds() -> Vec<u64> {
    match std::env::var("CELLAR_ENGINE_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("CELLAR_ENGINE_SEEDS: comma-separated numbers"))
            .collect(),
        Err(_) => SEEDS.to_vec(),
    }
}

#[test]
fn random_sequences_with_crashes_and_failures_keep_every_invariant() {
    run_seeds(seeds(), Run::Engine, "CELLAR_ENGINE_SEEDS");
}

/// The same with backups among the calls (cut, upload, restore, forget, prune). Seeds of their
/// own: the sequences of the seeds above stay as they were.
#[test]
fn random_sequences_with_backups_keep_every_invariant() {
    let seeds = match std::env::var("CELLAR_BACKUP_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("CELLAR_BACKUP_SEEDS: comma-separated numbers"))
            .collect(),
        Err(_) => BACKUP_SEEDS.to_vec(),
    };
    run_seeds(seeds, Run::Backups, "CELLAR_BACKUP_SEEDS");
}

/// The same with racing backup calls among them (an upload or a restore with a prune, two uploads
/// of one volume, an upload or a restore with the backup's forget, a node's start resuming its
/// uploads while a prune runs). Seeds of their own, for the same reason.
#[test]
fn random_sequences_with_racing_backups_keep_every_invariant() {
    let seeds = match std::env::var("CELLAR_BACKUP_RACE_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("CELLAR_BACKUP_RACE_SEEDS: comma-separated numbers")
            })
            .collect(),
        Err(_) => BACKUP_RACE_SEEDS.to_vec(),
    };
    run_seeds(seeds, Run::BackupRaces, "CELLAR_BACKUP_RACE_SEEDS");
}

fn run_seeds(seeds: Vec<u64>, run: Run, knob: &str) {
    in_thread::quiet_crashes();
    let mut crashes = CrashTally::new();
    for seed in seeds {
        let mut log = Vec::new();
        let r = catch_unwind(AssertUnwindSafe(|| run_seed(seed, run, &mut log)));
        match r {
            Err(panic) => {
                eprintln!("seed {seed} failed; its steps:\n{}", log.join("\n"));
                eprintln!("rerun with {knob}={seed} cargo test --lib --features crash-points node::random");
                std::panic::resume_unwind(panic);
            }
            Ok(tally) => {
                for (point, (armed, fired)) in tally {
                    let t = crashes.entry(point).or_default();
                    t.0 += armed;
                    t.1 += fired;
                }
            }
        }
        eprintln!("{}", log.last().expect("a summary"));
    }
    eprintln!("crash points (armed, reached): {crashes:?}");
}
