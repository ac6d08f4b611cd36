//! The randomized tester of split mode: seeded, reproducible sequences of controller calls (group
//! snapshots included) and of kubelet's stage and publish, on `dir` and `image` volumes (and
//! `btrfs` ones, for a third of the seeds, whose pools are on a btrfs filesystem), on a
//! real `cellar controller` and two or three real `cellar node` agents over mutual TLS (the one
//! multi-node launcher, `common::cluster`), with node agents killed and started again and the
//! controller restarted (a new process with an empty registry, the same certificates) between
//! the calls, and node agents killed in the middle of one at an armed crash point (then started
//! again and the call retried until it converges), and pools that do not open (a node's disk not
//! mounted when its agent starts; later mounted, the agent restarted or finding it by itself).
//! After every step it checks, against its model and against each node's disk: a call
//! naming an object on a node that is down, or that the restarted controller has not heard of,
//! answers UNAVAILABLE naming that node, and one naming an object of a pool that is not open
//! answers FAILED_PRECONDITION saying so, never OK or NOT_FOUND (docs/design.md, invariant 1);
//! the agent writes nothing where its pool should be;
//! ListVolumes never drops a volume of a node it has listed and never reports one that is
//! gone; a published volume is never deleted (the same invariant); the mounts and loop
//! devices are exactly the published volumes'; every call on objects of live nodes converges; and
//! nothing is left behind. A failure
//! prints `seed N failed at step K` with the step log and a one-line command that reruns it
//! (docs/design.md, "Randomized crash tester", "Split mode").

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cellar::crash::Rng;
use cellar::csi::v1::controller_client::ControllerClient;
use cellar::csi::v1::group_controller_client::GroupControllerClient;
use cellar::csi::v1::*;
use common::cluster::{node_topology, wffc, Cluster, Spec};
use common::fs::TestFs;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

/// The seeds CI runs (2 nodes for even seeds, 3 for odd ones); seed 1 found the refusal that named
/// no node (`a_create_placed_on_a_node_is_refused_naming_it_when_no_node_is_available`); seed 23
/// has an agent open its pool by itself while it runs.
const SEEDS: [u64; 7] = [1, 2, 3, 4, 5, 6, 23];
const STEPS: usize = 40;
/// The heartbeat interval the controller asks for: a node is unavailable after three missed
/// beats, and the registry settles two intervals after a start.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// Attempts of a call on live nodes before it counts as not converging (a guard, not a timing:
/// a beat missed on a loaded machine makes a live node unavailable for a moment).
const ATTEMPTS: usize = 40;
/// Above this many volumes the tester prefers deleting to creating.
const MAX_VOLUMES: usize = 6;
const MARKER: &str = "marker";
const POOL: &str = "default";

struct Vol {
    id: String,
    node: usize,
    bytes: i64,
    /// What the volume's marker file holds ("": none yet, for an image volume).
    marker: String,
    /// An `image` volume (an ext4 filesystem in a file), else `dir` or `btrfs`.
    image: bool,
    /// A `btrfs` volume (a subvolume with a quota).
    btrfs: bool,
    /// Staged and published on its node (at [`Run::staging`] and [`Run::target`]).
    mounted: bool,
    /// Published read-only (a pod's `readOnly: true`), when mounted.
    read_only: bool,
}

struct Snap {
    id: String,
    node: usize,
    bytes: i64,
    marker: String,
    image: bool,
    btrfs: bool,
    source_id: String,
    /// The group snapshot it is a member of.
    group: Option<String>,
}

/// A call to a node's Node service: the volume id and paths.
#[derive(Debug)]
enum NodeOp {
    Stage(String, std::path::PathBuf),
    /// The volume id, staging and target paths, and whether read-only.
    Publish(String, std::path::PathBuf, std::path::PathBuf, bool),
    Unpublish(String, std::path::PathBuf),
    Unstage(String, std::path::PathBuf),
}

/// The crash points an `arm` step may set on a node (every one a call in this tester can reach;
/// the backup and lease points are the other testers').
const CRASH_POINTS: [&str; 22] = [
    "create-volume:before-record",
    "create-volume:after-record",
    "create-snapshot:before-record",
    "delete:after-trash",
    "expand:before-record",
    "copy:before-rename",
    "image:before-rename",
    "import:before-rename",
    "import:mid-stream",
    "export:mid-stream",
    "transfer:mid-pipe",
    "stage:before-attach",
    "stage:after-attach",
    "stage:before-mount",
    "publish:before-mount",
    "unpublish:after-unmount",
    "unstage:before-detach",
    "group:frozen",
    "group:before-records",
    "group:before-group-record",
    "group-part:before-records",
    "delete-group:before-record",
];

struct Group {
    id: String,
    /// The node of its record (its first member's, by volume id).
    home: usize,
    /// Its members' names (snapshots of the model).
    members: Vec<String>,
}

/// A CreateVolume refused while a node it needs was down, which the provisioner retries: the
/// node it was placed on (None: immediate binding, any node) and the snapshot it restores, if
/// any. A node that died in it after the record holds its volume until the retry answers it.
struct Pending {
    req: CreateVolumeRequest,
    node: Option<usize>,
    source: Option<(String, usize)>,
}

#[derive(Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
    snaps: BTreeMap<String, Snap>,
    pending: BTreeMap<String, Pending>,
    groups: BTreeMap<String, Group>,
    /// Group snapshots refused while a node was down or crashed, which the snapshotter retries:
    /// their volumes. Until then, members of such a name may be on disk.
    pending_groups: BTreeMap<String, Vec<String>>,
}

impl Model {
    /// Whether a pending create of `name` may have left its volume on `node`.
    fn pending_on(&self, name: &str, node: usize) -> bool {
        self.pending.get(name).is_some_and(|p| p.node.is_none_or(|n| n == node))
    }
}

#[derive(Debug)]
enum Call {
    Create(Box<CreateVolumeRequest>),
    Snapshot { name: String, source: String },
    DeleteVolume(String),
    DeleteSnapshot(String),
    Expand { id: String, bytes: i64 },
    Get(String),
    Group { name: String, sources: Vec<String> },
    DeleteGroup(String),
}

/// The controller's Controller and GroupController services.
struct Api {
    ctl: ControllerClient<Channel>,
    groups: GroupControllerClient<Channel>,
}

impl Api {
    async fn connect(c: &Cluster) -> Api {
        Api {
            ctl: c.ctl().await,
            groups: GroupControllerClient::new(c.channel("controller.sock").await),
        }
    }
}

enum Answer {
    Volume(Volume),
    Snapshot(Snapshot),
    Expanded(i64),
    Got(Box<ControllerGetVolumeResponse>),
    Group(VolumeGroupSnapshot),
    Done,
}

impl Call {
    async fn send(&self, api: &mut Api) -> Result<Answer, tonic::Status> {
        let ctl = &mut api.ctl;
        Ok(match self {
            Call::Create(r) => Answer::Volume(
                ctl.create_volume(*r.clone())
                    .await?
                    .into_inner()
                    .volume
                    .expect("volume"),
            ),
            Call::Snapshot { name, source } => Answer::Snapshot(
                ctl.create_snapshot(CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: source.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .expect("snapshot"),
            ),
            Call::DeleteVolume(id) => {
                ctl.delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await?;
                Answer::Done
            }
            Call::DeleteSnapshot(id) => {
                ctl.delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    ..Default::default()
                })
                .await?;
                Answer::Done
            }
            Call::Expand { id, bytes } => Answer::Expanded(
                ctl.controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: *bytes,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .capacity_bytes,
            ),
            Call::Get(id) => Answer::Got(Box::new(
                ctl.controller_get_volume(ControllerGetVolumeRequest { volume_id: id.clone() })
                    .await?
                    .into_inner(),
            )),
            Call::Group { name, sources } => Answer::Group(
                api.groups
                    .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                        name: name.clone(),
                        source_volume_ids: sources.clone(),
                        parameters: [("consistency".to_string(), "per-volume".to_string())].into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .group_snapshot
                    .expect("group_snapshot"),
            ),
            Call::DeleteGroup(id) => {
                api.groups
                    .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                        group_snapshot_id: id.clone(),
                        ..Default::default()
                    })
                    .await?;
                Answer::Done
            }
        })
    }
}

type Checked = Result<(), String>;

struct Run {
    rng: Rng,
    c: Cluster,
    api: Api,
    names: Vec<String>,
    up: Vec<bool>,
    /// Nodes whose pool does not open (its disk is not mounted: the pool's directory was moved
    /// aside, a file or an empty directory left in its place), whether their agent runs or not.
    shut: Vec<bool>,
    /// What is in a shut pool's place: an empty directory (the mount point of a disk not mounted,
    /// where the pool must not open: it lacks the pool's mark) or a file.
    shut_as_dir: Vec<bool>,
    /// Whether the running controller has listed the node (ListVolumes while it answered): from
    /// then on its volumes stay listed while it is down.
    listed: Vec<bool>,
    model: Model,
    log: Vec<String>,
    next: u32,
    /// Calls and listings on live nodes that needed more than one attempt.
    retries: usize,
    /// A node started with a crash point armed, and the point: it dies when a call reaches it.
    armed: Option<(usize, &'static str)>,
    /// Crash points reached.
    crashes: usize,
    /// The step running (`steps` during the teardown).
    at_step: usize,
    /// The btrfs filesystem every node's pool is on, for a third of the seeds (they then make
    /// `btrfs` volumes too); dropped after the cluster.
    btrfs: Option<TestFs>,
}

impl Run {
    async fn new(seed: u64) -> Run {
        let nodes = 2 + (seed % 2) as usize;
        let btrfs = (seed % 3 == 2).then(|| TestFs::new("btrfs", 2048));
        let pools = match &btrfs {
            Some(fs) => (0..nodes).map(|i| Some(fs.path(&format!("node-{i}")))).collect(),
            None => vec![None; nodes],
        };
        let c = Cluster::start(Spec {
            controller_args: vec!["--heartbeat-interval".into(), format!("{}ms", HEARTBEAT.as_millis())],
            layouts: Some(if btrfs.is_some() {
                "dir, image, btrfs"
            } else {
                "dir, image"
            }),
            ..Spec::nodes(pools)
        })
        .await;
        let api = Api::connect(&c).await;
        Run {
            rng: Rng(seed),
            names: c.nodes.iter().map(|n| n.0.clone()).collect(),
            c,
            api,
            up: vec![true; nodes],
            shut: vec![false; nodes],
            shut_as_dir: vec![false; nodes],
            listed: vec![false; nodes],
            model: Model::default(),
            log: Vec::new(),
            next: 0,
            retries: 0,
            armed: None,
            crashes: 0,
            at_step: 0,
            btrfs,
        }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{}", self.next)
    }

    /// A node and whether it is up, for the step log.
    fn at(&self, node: usize) -> String {
        format!(
            "{} ({}{})",
            self.names[node],
            if self.up[node] { "up" } else { "down" },
            if self.shut[node] { ", pool shut" } else { "" }
        )
    }

    /// Whether node `i` serves its pool's objects: its agent runs and its pool is open.
    fn serves(&self, i: usize) -> bool {
        self.up[i] && !self.shut[i]
    }

    /// Where node `i`'s pool is now: its directory, or where it was moved while it does not open.
    fn pool_of(&self, i: usize) -> std::path::PathBuf {
        let pool = self.c.pool_dir(i);
        if self.shut[i] {
            aside(&pool)
        } else {
            pool
        }
    }

    /// Whether `s` is how a call that needs the nodes `blocked` (not serving) is refused: UNAVAILABLE
    /// naming one, or, for a create, RESOURCE_EXHAUSTED naming one (the registry does not offer
    /// it); FAILED_PRECONDITION for one that is up with its pool shut, saying the pool is not
    /// open. Never OK, never NOT_FOUND.
    fn refusal_of(&self, s: &tonic::Status, blocked: &[usize], create: bool) -> bool {
        blocked.iter().any(|&i| {
            let named = s.message().contains(self.names[i].as_str());
            match s.code() {
                Code::Unavailable => named,
                Code::ResourceExhausted => create && named,
                Code::FailedPrecondition => self.up[i] && self.shut[i] && s.message().contains("not open"),
                _ => false,
            }
        })
    }

    /// Whether node `i`'s pool may be shut: it is open and nothing of it is published.
    fn may_shut(&self, i: usize) -> bool {
        !self.shut[i] && !self.model.vols.values().any(|v| v.node == i && v.mounted)
    }

    /// Puts node `i`'s shut pool back in its place, and restarts its agent if it runs (`live`: lets
    /// the agent find the pool itself, as it tries again every ten seconds, and waits for that).
    async fn open(&mut self, i: usize, live: bool) -> Checked {
        let pool = self.c.pool_dir(i);
        let log = "pool opened; its volumes are served again";
        let before = self.c.log_of(i).matches(log).count();
        if self.up[i] && !live {
            self.c.kill_node(i);
            if self.armed.is_some_and(|(a, _)| a == i) {
                self.armed = None;
            }
        }
        let cleared = match self.shut_as_dir[i] {
            true => std::fs::remove_dir(&pool),
            false => std::fs::remove_file(&pool),
        };
        cleared.map_err(|e| format!("{}: {e}", pool.display()))?;
        std::fs::rename(aside(&pool), &pool).map_err(|e| format!("move {} back: {e}", pool.display()))?;
        self.shut[i] = false;
        if !self.up[i] {
            return Ok(());
        }
        if !live {
            self.start(i).await;
            return Ok(());
        }
        for _ in 0..160 {
            if self.c.log_of(i).matches(log).count() > before {
                // Its next heartbeat tells the controller.
                tokio::time::sleep(2 * HEARTBEAT).await;
                return Ok(());
            }
            tokio::time::sleep(HEARTBEAT).await;
        }
        Err(format!(
            "{}'s agent did not open its pool again within 40 s",
            self.names[i]
        ))
    }

    /// Starts node `i` (down) and waits until the controller reaches it.
    async fn start(&mut self, i: usize) {
        self.c.start_node(i);
        self.reached(i).await;
    }

    /// Waits until the controller reaches node `i`'s agent: registered with room to offer, or, with
    /// its pool shut, answering for its pool (a call naming it is no longer UNAVAILABLE).
    async fn reached(&mut self, i: usize) {
        if !self.shut[i] {
            return self.c.wait_node_registered(i).await;
        }
        let probe = format!("local:{}:{POOL}:never-made", self.names[i]);
        for _ in 0..160 {
            match Call::Get(probe.clone()).send(&mut self.api).await {
                Err(s) if s.code() == Code::Unavailable => tokio::time::sleep(HEARTBEAT).await,
                _ => return,
            }
        }
        panic!(
            "{} with its pool shut was not reached\n{}",
            self.names[i],
            self.c.logs()
        );
    }

    fn note(&mut self, line: String) {
        self.log.push(line);
    }

    /// Sends `call`, whose nodes are all up, until it answers other than UNAVAILABLE, ABORTED or
    /// RESOURCE_EXHAUSTED (a beat missed under load), and wants it to succeed.
    async fn converge(&mut self, call: &Call) -> Result<Answer, String> {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            match call.send(&mut self.api).await {
                Ok(a) => {
                    if attempt > 0 {
                        self.retries += 1;
                        self.note(format!("   converged after {attempt} retries; the last: {last:?}"));
                    }
                    return Ok(a);
                }
                Err(s) if self.crashed(self.names_armed(&s)).await => {
                    if matches!(call, Call::Create(_)) {
                        self.resent_while_crashed(call).await?;
                    }
                    self.restart_crashed().await;
                    last = Some(s)
                }
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Aborted | Code::ResourceExhausted) => {
                    last = Some(s);
                    tokio::time::sleep(HEARTBEAT).await;
                }
                Err(s) => return Err(format!("{call:?} on live nodes: {:?} {}", s.code(), s.message())),
            }
        }
        Err(format!(
            "{call:?} on live nodes did not converge in {ATTEMPTS} attempts: {last:?}"
        ))
    }

    /// A create whose node died in it, sent again before the node is back (as the provisioner
    /// retries at once; half the time after the scheduler chose another node): the node may
    /// have made the volume, so the create must not be made on another node; UNAVAILABLE naming
    /// the dead node.
    async fn resent_while_crashed(&mut self, call: &Call) -> Checked {
        let (node, _) = self.armed.expect("a crashed node is armed");
        let name = self.names[node].clone();
        let mut call = match call {
            Call::Create(req) => Call::Create(req.clone()),
            _ => unreachable!("only creates are sent again"),
        };
        if let Call::Create(req) = &mut call {
            if let Some(t) = req.accessibility_requirements.as_mut().filter(|_| self.rng.chance(50)) {
                let other = (node + 1 + self.rng.below(self.names.len() - 1)) % self.names.len();
                t.preferred = vec![node_topology(&self.names[other])];
                self.note(format!("   the scheduler chose {} instead", self.names[other]));
            }
        }
        match call.send(&mut self.api).await {
            Err(s) if s.code() == Code::Unavailable && s.message().contains(&name) => {
                self.note(format!(
                    "   sent again while {name} is dead: {}",
                    first_line(s.message())
                ));
                Ok(())
            }
            Err(s) => Err(format!(
                "{call:?} sent again while {name} lay dead in it: want UNAVAILABLE naming it, got {:?} {}",
                s.code(),
                s.message()
            )),
            Ok(a) => {
                let id = match a {
                    Answer::Volume(v) => v.volume_id,
                    _ => String::new(),
                };
                Err(format!(
                    "{call:?} sent again while {name} lay dead in it answered OK with {id}: a second volume, the first left behind"
                ))
            }
        }
    }

    /// Sends `call` once; it must be refused as [`Run::refusal_of`] says, for one of `down` (nodes
    /// it needs that do not serve).
    async fn refused(&mut self, call: &Call, down: &[usize]) -> Checked {
        let names: Vec<String> = down.iter().map(|&i| self.at(i)).collect();
        match call.send(&mut self.api).await {
            Ok(_) => Err(format!("{call:?} answered OK while {names:?} does not serve")),
            Err(s) if self.revive(self.names_armed(&s)).await => {
                // A live node the call reached died at its crash point: any refusal will do.
                self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                Ok(())
            }
            Err(s) => {
                if !self.refusal_of(&s, down, matches!(call, Call::Create(_))) {
                    return Err(format!(
                        "{call:?} with {names:?}: want UNAVAILABLE naming it (FAILED_PRECONDITION with its pool shut), got {:?} {}",
                        s.code(),
                        s.message()
                    ));
                }
                self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                Ok(())
            }
        }
    }

    /// Sends `call` on the nodes `nodes`: converges when all serve, is refused naming one that
    /// does not otherwise (None).
    async fn call_on(&mut self, call: Call, nodes: &[usize]) -> Result<Option<Answer>, String> {
        let down: Vec<usize> = nodes.iter().copied().filter(|&i| !self.serves(i)).collect();
        if down.is_empty() {
            self.converge(&call).await.map(Some)
        } else {
            self.refused(&call, &down).await.map(|_| None)
        }
    }

    async fn step(&mut self, k: usize) -> Checked {
        let n = self.names.len();
        let mut ops: Vec<&str> = Vec::new();
        let vols = self.model.vols.len();
        if vols < MAX_VOLUMES {
            ops.extend(["create"; 4]);
        }
        if vols > 0 {
            ops.extend([
                "snapshot",
                "snapshot",
                "group",
                "delete-volume",
                "expand",
                "write",
                "get",
            ]);
            if vols >= MAX_VOLUMES {
                ops.extend(["delete-volume"; 3]);
            }
        }
        if !self.model.snaps.is_empty() {
            ops.extend(["delete-snapshot", "delete-snapshot"]);
            if vols < MAX_VOLUMES {
                ops.extend(["restore"; 3]);
            }
        }
        if !self.model.pending.is_empty() {
            ops.extend(["retry", "retry"]);
        }
        if !self.model.groups.is_empty() {
            ops.push("delete-group");
        }
        if !self.model.pending_groups.is_empty() {
            ops.push("retry-group");
        }
        if self.armed.is_none() && self.up.iter().any(|u| *u) {
            ops.extend(["arm", "arm"]);
        }
        if self.model.vols.values().any(|v| self.up[v.node] && !v.mounted) {
            ops.extend(["publish", "publish"]);
        }
        if self.model.vols.values().any(|v| self.up[v.node] && v.mounted) {
            ops.push("unpublish");
        }
        if self.up.iter().any(|u| *u) {
            ops.extend(["down", "down"]);
        }
        if self.up.iter().any(|u| !*u) {
            ops.extend(["up"; 3]);
        }
        // A pool whose disk is not mounted when its agent starts; only on a node with nothing
        // published (its pods would not run without the disk either).
        if (0..n).any(|i| self.may_shut(i)) {
            ops.push("shut");
        }
        if self.shut.iter().any(|s| *s) {
            ops.extend(["open", "open"]);
        }
        // A restarted controller has forgotten which node a create without an answer went to: a
        // retry with immediate binding may then be placed on another node (docs/split-mode.md
        // names this limit), so the controller is not restarted while one is pending.
        if self.model.pending.values().all(|p| p.node.is_some()) {
            ops.push("restart-controller");
        }
        let op = *self.rng.pick(&ops);
        match op {
            "create" => {
                let node = self.pick_node();
                let name = self.fresh("vol");
                let bytes = (1 + self.rng.below(4) as i64) * 16 * MIB;
                let image = self.rng.chance(33);
                let btrfs = !image && self.btrfs.is_some() && self.rng.chance(50);
                // A quarter with immediate binding: every node requisite, none preferred, the
                // controller chooses (the one with most room).
                let immediate = self.rng.chance(25);
                let mut req = wffc(&name, bytes, &self.names[node], &self.all());
                if immediate {
                    if let Some(t) = req.accessibility_requirements.as_mut() {
                        t.preferred.clear();
                    }
                }
                req.parameters = layout(image, btrfs);
                self.note(format!(
                    "{k}: create {name} ({} MiB{}) on {}",
                    bytes / MIB,
                    if image {
                        ", image"
                    } else if btrfs {
                        ", btrfs"
                    } else {
                        ""
                    },
                    if immediate {
                        "any node".to_string()
                    } else {
                        self.at(node)
                    }
                ));
                self.create(req, (!immediate).then_some(node), None).await
            }
            "restore" => {
                let snap = self.pick_snap();
                let node = self.pick_node();
                let name = self.fresh("vol");
                let s = &self.model.snaps[&snap];
                let bytes = s.bytes + self.rng.below(2) as i64 * 16 * MIB;
                let mut req = wffc(&name, bytes, &self.names[node], &self.all());
                req.parameters = layout(s.image, s.btrfs);
                req.volume_content_source = Some(VolumeContentSource {
                    r#type: Some(from_snapshot(&s.id)),
                });
                let from = s.node;
                self.note(format!(
                    "{k}: restore {snap} (on {}) as {name} on {}",
                    self.at(from),
                    self.at(node)
                ));
                self.create(req, Some(node), Some((snap, from))).await
            }
            "retry" => {
                let name = self
                    .rng
                    .pick(&self.model.pending.keys().cloned().collect::<Vec<_>>())
                    .clone();
                let p = self.model.pending.remove(&name).expect("pending");
                self.note(format!(
                    "{k}: retry the create of {name} on {}{}",
                    p.node.map_or("any node".to_string(), |n| self.at(n)),
                    match &p.source {
                        Some((s, at)) => format!(" from {s} on {}", self.at(*at)),
                        None => String::new(),
                    }
                ));
                self.create(p.req, p.node, p.source).await
            }
            "snapshot" => {
                let vol = self.pick_vol();
                let name = self.fresh("snap");
                let v = &self.model.vols[&vol];
                let (node, source) = (v.node, v.id.clone());
                self.note(format!("{k}: snapshot {vol} as {name} on {}", self.at(node)));
                let call = Call::Snapshot {
                    name: name.clone(),
                    source: source.clone(),
                };
                if let Some(Answer::Snapshot(s)) = self.call_on(call, &[node]).await? {
                    let v = &self.model.vols[&vol];
                    let want = format!("snap:local:{}:{POOL}:{name}", self.names[node]);
                    if s.snapshot_id != want || s.source_volume_id != source || !s.ready_to_use {
                        return Err(format!("CreateSnapshot answered {s:?}, want {want} of {source}, ready"));
                    }
                    let snap = Snap {
                        id: s.snapshot_id,
                        node,
                        bytes: v.bytes,
                        marker: v.marker.clone(),
                        image: v.image,
                        btrfs: v.btrfs,
                        source_id: source,
                        group: None,
                    };
                    self.model.snaps.insert(name, snap);
                }
                Ok(())
            }
            "group" => {
                let mut names: Vec<String> = self.model.vols.keys().cloned().collect();
                let size = 1 + self.rng.below(names.len().min(3));
                let mut picked = Vec::new();
                for _ in 0..size {
                    let i = self.rng.below(names.len());
                    picked.push(names.remove(i));
                }
                let name = self.fresh("grp");
                self.note(format!(
                    "{k}: group snapshot {name} of {}",
                    picked
                        .iter()
                        .map(|v| format!("{v} on {}", self.at(self.model.vols[v].node)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                self.group(name, picked).await
            }
            "retry-group" => {
                let name = self
                    .rng
                    .pick(&self.model.pending_groups.keys().cloned().collect::<Vec<_>>())
                    .clone();
                self.note(format!("{k}: retry group snapshot {name}"));
                self.retry_group(name).await
            }
            "arm" => {
                let live: Vec<usize> = (0..n).filter(|&i| self.up[i]).collect();
                let node = *self.rng.pick(&live);
                let point = *self.rng.pick(&CRASH_POINTS);
                self.note(format!("{k}: {} started again to crash at {point}", self.names[node]));
                self.c.kill_node(node);
                self.c.start_node_with(node, &[("CELLAR_CRASH_AT", point)]);
                self.reached(node).await;
                self.armed = Some((node, point));
                Ok(())
            }
            "delete-group" => {
                let name = self
                    .rng
                    .pick(&self.model.groups.keys().cloned().collect::<Vec<_>>())
                    .clone();
                self.delete_group(k.to_string(), &name).await
            }
            "delete-volume" | "delete-snapshot" => {
                let volume = op == "delete-volume";
                let name = if volume { self.pick_vol() } else { self.pick_snap() };
                self.delete(k.to_string(), volume, &name).await
            }
            "expand" => {
                let vol = self.pick_vol();
                let v = &self.model.vols[&vol];
                let (id, node) = (v.id.clone(), v.node);
                let bytes = v.bytes + (1 + self.rng.below(2) as i64) * 8 * MIB;
                self.note(format!("{k}: expand {vol} to {} MiB on {}", bytes / MIB, self.at(node)));
                if let Some(Answer::Expanded(got)) = self.call_on(Call::Expand { id, bytes }, &[node]).await? {
                    if got < bytes {
                        return Err(format!("ControllerExpandVolume to {bytes} answered {got}"));
                    }
                    self.model.vols.get_mut(&vol).expect("vol").bytes = got;
                }
                Ok(())
            }
            "publish" | "unpublish" => {
                let publish = op == "publish";
                let names: Vec<(String, usize)> = self
                    .model
                    .vols
                    .iter()
                    .filter(|(_, v)| self.up[v.node] && v.mounted != publish)
                    .map(|(n, v)| (n.clone(), v.node))
                    .collect();
                let vol = self.pick_near_armed(names);
                let read_only = publish && self.rng.chance(25);
                self.note(format!(
                    "{k}: {op} {vol} on {}{}",
                    self.at(self.model.vols[&vol].node),
                    if read_only { " read-only" } else { "" }
                ));
                if publish {
                    self.publish(&vol, read_only).await
                } else {
                    self.unpublish(&vol).await
                }
            }
            "get" => {
                let vol = self.pick_vol();
                self.note(format!("{k}: get {vol}"));
                self.get(&vol).await
            }
            "write" => {
                // The pod writes a new marker (its node's disk is there whether the agent runs
                // or not): snapshots from now on hold it, earlier ones the old one.
                let names: Vec<String> = self
                    .model
                    .vols
                    .iter()
                    .filter(|(_, v)| v.mounted || !v.image)
                    .map(|(n, _)| n.clone())
                    .collect();
                if names.is_empty() {
                    return Ok(());
                }
                let vol = self.rng.pick(&names).clone();
                let marker = format!("{vol} at step {k}");
                let v = &self.model.vols[&vol];
                if v.mounted && v.read_only {
                    // The pod cannot write through a read-only publish; the volume's own data
                    // (not an image's, inside its filesystem) is written beside it.
                    let through = self.target(&vol).join(MARKER);
                    match std::fs::write(&through, "written through a read-only publish") {
                        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
                        r => return Err(format!("a write through {vol}'s read-only publish answered {r:?}")),
                    }
                    if v.image {
                        self.note(format!("{k}: {vol}'s read-only publish refuses a write"));
                        return Ok(());
                    }
                }
                // Through the pod's mount when it is published, so that the mount is its data.
                let path = if v.mounted && !v.read_only {
                    self.target(&vol).join(MARKER)
                } else {
                    self.pool_of(v.node).join("volumes").join(&vol).join(MARKER)
                };
                self.note(format!(
                    "{k}: write {vol}'s marker{}",
                    if v.mounted && !v.read_only {
                        " through its mount"
                    } else {
                        ""
                    }
                ));
                write_synced(&path, &marker)?;
                self.model.vols.get_mut(&vol).expect("vol").marker = marker;
                Ok(())
            }
            "down" => {
                let live: Vec<usize> = (0..n).filter(|&i| self.up[i]).collect();
                let node = *self.rng.pick(&live);
                self.note(format!("{k}: {} down", self.names[node]));
                self.c.kill_node(node);
                self.up[node] = false;
                if self.armed.is_some_and(|(i, _)| i == node) {
                    self.armed = None;
                }
                Ok(())
            }
            "up" => {
                let dead: Vec<usize> = (0..n).filter(|&i| !self.up[i]).collect();
                let node = *self.rng.pick(&dead);
                self.note(format!("{k}: {} up", self.at(node)));
                self.start(node).await;
                self.up[node] = true;
                Ok(())
            }
            "shut" => {
                let open: Vec<usize> = (0..n).filter(|&i| self.may_shut(i)).collect();
                let node = *self.rng.pick(&open);
                self.note(format!(
                    "{k}: {}'s pool does not open (its disk is not mounted){}",
                    self.at(node),
                    if self.up[node] { "; its agent restarts" } else { "" }
                ));
                if self.up[node] {
                    self.c.kill_node(node);
                    if self.armed.is_some_and(|(i, _)| i == node) {
                        self.armed = None;
                    }
                }
                let pool = self.c.pool_dir(node);
                std::fs::rename(&pool, aside(&pool)).map_err(|e| format!("move {} aside: {e}", pool.display()))?;
                // Every other step an empty directory (no draw: the seeds' sequences stay), else a
                // file.
                self.shut_as_dir[node] = k % 2 == 0;
                let placed = match self.shut_as_dir[node] {
                    true => std::fs::create_dir(&pool),
                    false => std::fs::write(&pool, NOT_MOUNTED),
                };
                placed.map_err(|e| format!("{}: {e}", pool.display()))?;
                self.shut[node] = true;
                if self.up[node] {
                    self.start(node).await;
                }
                Ok(())
            }
            "open" => {
                let shut: Vec<usize> = (0..n).filter(|&i| self.shut[i]).collect();
                let node = *self.rng.pick(&shut);
                // Now and then the agent runs on and opens the pool itself (it tries again every
                // ten seconds); else it is restarted, as once the disk is mounted.
                let live = self.up[node] && self.rng.chance(25);
                self.note(format!(
                    "{k}: {}'s pool opens again{}",
                    self.at(node),
                    match (self.up[node], live) {
                        (true, true) => ", its agent running on",
                        (true, false) => "; its agent restarts",
                        _ => "",
                    }
                ));
                self.open(node, live).await
            }
            "restart-controller" => {
                let settle = self.rng.chance(50);
                self.note(format!(
                    "{k}: restart the controller{}",
                    if settle { ", past its settle period" } else { "" }
                ));
                self.restart_controller(settle).await;
                Ok(())
            }
            _ => unreachable!("{op}"),
        }
    }

    /// DeleteVolume (`volume`) or DeleteSnapshot of a modelled object, logged as step `k`: gone
    /// from the model once it answers OK.
    async fn delete(&mut self, k: String, volume: bool, name: &str) -> Checked {
        let (id, node) = if volume {
            (self.model.vols[name].id.clone(), self.model.vols[name].node)
        } else {
            (self.model.snaps[name].id.clone(), self.model.snaps[name].node)
        };
        self.note(format!("{k}: delete {name} on {}", self.at(node)));
        let call = if volume {
            Call::DeleteVolume(id)
        } else {
            Call::DeleteSnapshot(id)
        };
        if volume && self.model.vols[name].mounted && self.serves(node) {
            // Data mounted into a pod is never deleted: its node refuses, naming where.
            return self
                .converge_to(&call, Code::FailedPrecondition, "a published volume")
                .await;
        }
        if !volume && self.model.snaps[name].group.is_some() && self.serves(node) {
            // A group's member goes with its group only.
            return self.converge_to(&call, Code::InvalidArgument, "a group's member").await;
        }
        if self.call_on(call, &[node]).await?.is_some() {
            if volume {
                self.model.vols.remove(name);
            } else {
                self.model.snaps.remove(name);
            }
        }
        Ok(())
    }

    /// Sends `call` on live nodes until it answers other than UNAVAILABLE, ABORTED or
    /// RESOURCE_EXHAUSTED, and wants `want` (a refusal of `what`).
    async fn converge_to(&mut self, call: &Call, want: Code, what: &str) -> Checked {
        for _ in 0..ATTEMPTS {
            match call.send(&mut self.api).await {
                Err(s) if s.code() == want => {
                    self.note(format!("   refused: {}", first_line(s.message())));
                    return Ok(());
                }
                Err(s) if self.revive(self.names_armed(&s)).await => {}
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Aborted | Code::ResourceExhausted) => {
                    tokio::time::sleep(HEARTBEAT).await;
                }
                other => {
                    return Err(format!(
                        "{call:?} of {what}: want {want:?}, got {:?}",
                        other.map(|_| ())
                    ))
                }
            }
        }
        Err(format!("{call:?} of {what} did not converge"))
    }

    /// CreateVolumeGroupSnapshot `name` of the volumes `vols` (per-volume consistency, as `dir`
    /// volumes need): cut when all their nodes are up, each member a snapshot of its volume on
    /// its node, the group recorded on the node of its first member by volume id; refused naming a
    /// node that is down otherwise, leaving nothing (the name is then given up, as if the
    /// VolumeGroupSnapshot were deleted).
    async fn group(&mut self, name: String, vols: Vec<String>) -> Checked {
        let mut by_id: Vec<(String, String)> = vols
            .iter()
            .map(|v| (self.model.vols[v].id.clone(), v.clone()))
            .collect();
        by_id.sort();
        let nodes: Vec<usize> = vols.iter().map(|v| self.model.vols[v].node).collect();
        let call = Call::Group {
            name: name.clone(),
            sources: by_id.iter().map(|(id, _)| id.clone()).collect(),
        };
        let Some(Answer::Group(g)) = self.call_on(call, &nodes).await? else {
            self.model.pending_groups.insert(name, vols);
            return Ok(());
        };
        self.model.pending_groups.remove(&name);
        let home = self.model.vols[&by_id[0].1].node;
        let want = format!("group:local:{}:{POOL}:{name}", self.names[home]);
        if g.group_snapshot_id != want || !g.ready_to_use || g.snapshots.len() != vols.len() {
            return Err(format!(
                "CreateVolumeGroupSnapshot answered {} ready {} with {} members; want {want}, ready, {} members",
                g.group_snapshot_id,
                g.ready_to_use,
                g.snapshots.len(),
                vols.len()
            ));
        }
        let mut members = Vec::new();
        for s in g.snapshots {
            let Some((_, vol)) = by_id.iter().find(|(id, _)| *id == s.source_volume_id) else {
                return Err(format!(
                    "group {name} holds {} of {}, not a member's",
                    s.snapshot_id, s.source_volume_id
                ));
            };
            let v = &self.model.vols[vol];
            let prefix = format!("snap:local:{}:{POOL}:", self.names[v.node]);
            let Some(member) = s.snapshot_id.strip_prefix(&prefix) else {
                return Err(format!(
                    "{vol}'s member {} is not on its node ({prefix}…)",
                    s.snapshot_id
                ));
            };
            if s.group_snapshot_id != want || !s.ready_to_use {
                return Err(format!(
                    "member {} names group {:?}, ready {}",
                    s.snapshot_id, s.group_snapshot_id, s.ready_to_use
                ));
            }
            let snap = Snap {
                id: s.snapshot_id.clone(),
                node: v.node,
                bytes: v.bytes,
                marker: v.marker.clone(),
                image: v.image,
                btrfs: v.btrfs,
                source_id: s.source_volume_id,
                group: Some(name.clone()),
            };
            members.push(member.to_string());
            self.model.snaps.insert(member.to_string(), snap);
        }
        self.model.groups.insert(
            name,
            Group {
                id: want,
                home,
                members,
            },
        );
        Ok(())
    }

    /// DeleteVolumeGroupSnapshot of a modelled group: with every node it spans up, the group and
    /// its members go; otherwise refused naming a node that is down, and only members on other
    /// nodes than the group's record may have gone (docs/group-snapshots.md).
    async fn delete_group(&mut self, k: String, name: &str) -> Checked {
        let g = &self.model.groups[name];
        let (id, home) = (g.id.clone(), g.home);
        let mut nodes = vec![home];
        nodes.extend(g.members.iter().map(|m| self.model.snaps[m].node));
        self.note(format!("{k}: delete group {name} (recorded on {})", self.at(home)));
        let deleted = self.call_on(Call::DeleteGroup(id), &nodes).await?.is_some();
        let g = &self.model.groups[name];
        let mut kept = Vec::new();
        for m in g.members.clone() {
            let s = &self.model.snaps[&m];
            let on_disk = self.pool_of(s.node).join("snapshots").join(&m).exists();
            if deleted || (!on_disk && s.node != home) {
                self.model.snaps.remove(&m);
            } else {
                kept.push(m);
            }
        }
        if deleted {
            self.model.groups.remove(name);
        } else {
            self.note(format!("   members kept: {kept:?}"));
            self.model.groups.get_mut(name).expect("group").members = kept;
        }
        Ok(())
    }

    fn staging(&self, vol: &str) -> std::path::PathBuf {
        self.c.dir.path().join("kubelet").join(vol).join("staging")
    }

    fn target(&self, vol: &str) -> std::path::PathBuf {
        self.c.dir.path().join("kubelet").join(vol).join("target")
    }

    /// NodeStageVolume and NodePublishVolume (`read_only` or not) of `vol` on its (live) node, as
    /// kubelet does for a pod; both must answer OK, and the pod then sees the volume's marker.
    async fn publish(&mut self, vol: &str, read_only: bool) -> Checked {
        let (id, node) = (self.model.vols[vol].id.clone(), self.model.vols[vol].node);
        let (staging, target) = (self.staging(vol), self.target(vol));
        std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        if self.shut[node] {
            // Its pool is not open: kubelet's stage is refused, saying so, and mounts nothing.
            let mut n = self.c.node(node).await;
            return match stage_rwo(&mut n, &id, &staging).await {
                Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::Unavailable) && s.message().contains("not open") => {
                    self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                    Ok(())
                }
                other => Err(format!(
                    "NodeStage of {vol} while its pool is shut: want FAILED_PRECONDITION saying the pool is not open, got {:?}",
                    other.map_err(|s| format!("{:?} {}", s.code(), s.message()))
                )),
            };
        }
        self.node_call(node, NodeOp::Stage(id.clone(), staging.clone())).await?;
        self.node_call(node, NodeOp::Publish(id, staging, target, read_only))
            .await?;
        let v = self.model.vols.get_mut(vol).expect("vol");
        (v.mounted, v.read_only) = (true, read_only);
        Ok(())
    }

    /// NodeUnpublishVolume and NodeUnstageVolume of `vol` on its (live) node: both answer OK.
    async fn unpublish(&mut self, vol: &str) -> Checked {
        let (id, node) = (self.model.vols[vol].id.clone(), self.model.vols[vol].node);
        let (staging, target) = (self.staging(vol), self.target(vol));
        self.node_call(node, NodeOp::Unpublish(id.clone(), target)).await?;
        self.node_call(node, NodeOp::Unstage(id, staging)).await?;
        self.model.vols.get_mut(vol).expect("vol").mounted = false;
        Ok(())
    }

    /// Sends `op` to `node`'s Node service, as kubelet does: it must answer OK, also when its
    /// process died at its armed crash point on the way (started again, kubelet retries).
    async fn node_call(&mut self, node: usize, op: NodeOp) -> Checked {
        loop {
            let mut n = self.c.node(node).await;
            let r = match &op {
                NodeOp::Stage(id, staging) => stage_rwo(&mut n, id, staging).await,
                NodeOp::Publish(id, staging, target, read_only) => n
                    .node_publish_volume(NodePublishVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.display().to_string(),
                        target_path: target.display().to_string(),
                        volume_capability: Some(rwo()),
                        readonly: *read_only,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                NodeOp::Unpublish(id, target) => n
                    .node_unpublish_volume(NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: target.display().to_string(),
                    })
                    .await
                    .map(|_| ()),
                NodeOp::Unstage(id, staging) => unstage_from(&mut n, id, staging).await,
            };
            match r {
                Ok(()) => return Ok(()),
                Err(_) if self.revive(self.armed.is_some_and(|(i, _)| i == node)).await => {}
                Err(s) => {
                    return Err(format!(
                        "{op:?} on {}: {:?} {}",
                        self.names[node],
                        s.code(),
                        s.message()
                    ))
                }
            }
        }
    }

    /// If the armed node died at its crash point, starts it again (disarmed) as its DaemonSet
    /// would, waits until it registered, and answers true. `hint`: an answer named the node, so
    /// it may be on its way out (the connection breaks as the process exits): wait a moment.
    async fn revive(&mut self, hint: bool) -> bool {
        let crashed = self.crashed(hint).await;
        if crashed {
            self.restart_crashed().await;
        }
        crashed
    }

    /// Whether the armed node died at its crash point (`hint` as for [`Run::revive`]).
    async fn crashed(&mut self, hint: bool) -> bool {
        let Some((node, _)) = self.armed else {
            return false;
        };
        let mut exited = false;
        for _ in 0..if hint { 20 } else { 1 } {
            exited = self.c.nodes[node]
                .1
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        exited
    }

    /// Starts the armed node, which died at its crash point, again.
    async fn restart_crashed(&mut self) {
        let (node, point) = self.armed.expect("a crashed node is armed");
        self.note(format!("   {} crashed at {point}; started again", self.names[node]));
        self.armed = None;
        self.crashes += 1;
        self.start(node).await;
    }

    /// Whether `s` names the armed node.
    fn names_armed(&self, s: &tonic::Status) -> bool {
        self.armed
            .is_some_and(|(i, _)| s.message().contains(self.names[i].as_str()))
    }

    /// Retries a group snapshot refused earlier, as the snapshotter does while its
    /// VolumeGroupSnapshot exists; one of whose volumes was deleted since is given up (its
    /// VolumeGroupSnapshot deleted too).
    async fn retry_group(&mut self, name: String) -> Checked {
        let vols = self.model.pending_groups[&name].clone();
        if vols.iter().all(|v| self.model.vols.contains_key(v)) {
            return self.group(name, vols).await;
        }
        self.note("   a volume of it is gone: given up".into());
        self.model.pending_groups.remove(&name);
        Ok(())
    }

    /// The mounts under the cluster's directory are exactly the staging and target mounts of the
    /// published volumes, and each shows its volume's marker (whether its node's agent runs or not).
    fn check_mounts(&self) -> Checked {
        let mut want: Vec<std::path::PathBuf> = Vec::new();
        for (name, v) in self.model.vols.iter().filter(|(_, v)| v.mounted) {
            for at in [self.staging(name), self.target(name)] {
                let got = read_marker(&at)?;
                if got != v.marker {
                    return Err(format!(
                        "{name} mounted at {} shows {got:?}, want {:?}",
                        at.display(),
                        v.marker
                    ));
                }
                want.push(at);
            }
        }
        want.sort();
        let mut got = mounts_under(self.c.dir.path());
        got.sort();
        if got != want {
            return Err(format!("mounted: {got:?}; the published volumes' mounts are {want:?}"));
        }
        let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
        let table = cellar::sys::mountinfo::parse(&table);
        for (name, v) in self.model.vols.iter().filter(|(_, v)| v.mounted) {
            let target = self.target(name);
            let read_only = table
                .iter()
                .rev()
                .find(|m| m.mount_point == target)
                .is_some_and(|m| m.read_only());
            if read_only != v.read_only {
                return Err(format!(
                    "{name}'s publish is {}read-only; the pod asked for {}",
                    if read_only { "" } else { "not " },
                    if v.read_only { "read-only" } else { "read-write" }
                ));
            }
        }
        let mut loops = loop_files_under(self.c.dir.path());
        if let Some(fs) = &self.btrfs {
            loops.extend(loop_files_under(&fs.mnt));
        }
        loops.sort();
        let mut want: Vec<std::path::PathBuf> = self
            .model
            .vols
            .iter()
            .filter(|(_, v)| v.mounted && v.image)
            .map(|(n, v)| self.pool_of(v.node).join("volumes").join(n))
            .collect();
        want.sort();
        if loops != want {
            return Err(format!(
                "loop devices over {loops:?}; the published image volumes are {want:?}"
            ));
        }
        Ok(())
    }

    /// The marker of the image volume `id` on (live) `node`, read through a stage of its own.
    async fn peek(&mut self, id: &str, node: usize, vol: &str) -> Result<String, String> {
        let staging = self.c.dir.path().join("kubelet").join(vol).join("peek");
        self.node_call(node, NodeOp::Stage(id.into(), staging.clone())).await?;
        let got = read_marker(&staging);
        self.node_call(node, NodeOp::Unstage(id.into(), staging)).await?;
        got
    }

    fn all(&self) -> Vec<&str> {
        self.names.iter().map(|s| s.as_str()).collect()
    }

    fn pick_vol(&mut self) -> String {
        let names: Vec<(String, usize)> = self.model.vols.iter().map(|(n, v)| (n.clone(), v.node)).collect();
        self.pick_near_armed(names)
    }

    fn pick_snap(&mut self) -> String {
        let names: Vec<(String, usize)> = self.model.snaps.iter().map(|(n, s)| (n.clone(), s.node)).collect();
        self.pick_near_armed(names)
    }

    /// One of `names` (each with its node), more often one on the armed node, so that its crash
    /// point is reached.
    fn pick_near_armed(&mut self, names: Vec<(String, usize)>) -> String {
        if let Some((node, _)) = self.armed {
            let near: Vec<&(String, usize)> = names.iter().filter(|(_, i)| *i == node).collect();
            if !near.is_empty() && self.rng.chance(60) {
                return self.rng.pick(&near).0.clone();
            }
        }
        self.rng.pick(&names).0.clone()
    }

    /// A node for a create, more often the armed one.
    fn pick_node(&mut self) -> usize {
        match self.armed {
            Some((node, _)) if self.rng.chance(50) => node,
            _ => self.rng.below(self.names.len()),
        }
    }

    /// A new controller process, with an empty registry; it waits for the live nodes to
    /// register, and then (`settle`) for the registry's settle period to be over for sure.
    async fn restart_controller(&mut self, settle: bool) {
        self.c.kill_controller();
        self.c.start_controller();
        self.api = Api::connect(&self.c).await;
        self.listed = vec![false; self.names.len()];
        for i in 0..self.names.len() {
            if self.up[i] {
                self.reached(i).await;
            }
        }
        if settle {
            tokio::time::sleep(3 * HEARTBEAT).await;
        }
    }

    /// CreateVolume `req` placed on `node` (None: immediate binding, the controller chooses),
    /// restoring `source` (a snapshot's name and node): made there when every node it needs is
    /// up, refused naming one that is down (and then pending), NOT_FOUND when the snapshot is
    /// gone and its node answers. With immediate binding and a node down it is made on a live
    /// node, or refused naming a down node (the one an earlier attempt got no answer from).
    async fn create(
        &mut self,
        req: CreateVolumeRequest,
        node: Option<usize>,
        source: Option<(String, usize)>,
    ) -> Checked {
        let name = req.name.clone();
        let mut nodes: Vec<usize> = node.into_iter().collect();
        nodes.extend(source.as_ref().map(|s| s.1));
        if let Some((snap, at)) = &source {
            if !self.model.snaps.contains_key(snap) {
                // The VolumeSnapshot was deleted while the create was pending.
                let r = Call::Create(Box::new(req)).send(&mut self.api).await;
                let down: Vec<usize> = nodes.iter().copied().filter(|&i| !self.serves(i)).collect();
                return match r {
                    Err(s) if s.code() == Code::NotFound && self.serves(*at) => Ok(()),
                    Err(s) if self.refusal_of(&s, &down, true) => Ok(()),
                    Err(s) => Err(format!(
                        "a restore from the deleted {snap} ({:?} not serving): want NOT_FOUND, or UNAVAILABLE naming a node that is down; got {:?} {}",
                        down,
                        s.code(),
                        s.message()
                    )),
                    Ok(_) => Err(format!("a restore from the deleted {snap} answered OK")),
                };
            }
        }
        let call = Call::Create(Box::new(req.clone()));
        let answer = match node {
            None if (0..self.names.len()).any(|i| !self.serves(i)) => self.anywhere_once(&call).await?,
            _ => self.call_on(call, &nodes).await?,
        };
        match answer {
            Some(Answer::Volume(v)) => {
                let node = match node {
                    Some(n) => n,
                    None => {
                        let on = v.volume_id.split(':').nth(1).unwrap_or_default();
                        match self.names.iter().position(|n| n == on) {
                            Some(i) if self.serves(i) => i,
                            _ => {
                                return Err(format!(
                                    "CreateVolume of {name} answered {}: not a live node's",
                                    v.volume_id
                                ))
                            }
                        }
                    }
                };
                let want = format!("local:{}:{POOL}:{name}", self.names[node]);
                let bytes = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes);
                if v.volume_id != want || v.capacity_bytes < bytes {
                    return Err(format!(
                        "CreateVolume answered {} of {} bytes, want {want} of at least {bytes}",
                        v.volume_id, v.capacity_bytes
                    ));
                }
                let data = self.pool_of(node).join("volumes").join(&name);
                let image = req.parameters.get("layout").is_some_and(|l| l == "image");
                let btrfs = req.parameters.get("layout").is_some_and(|l| l == "btrfs");
                let marker = match &source {
                    None if image => String::new(),
                    None => {
                        let marker = format!("{name} as made");
                        std::fs::write(data.join(MARKER), &marker).map_err(|e| format!("write marker: {e}"))?;
                        marker
                    }
                    Some((snap, _)) => {
                        let marker = self.model.snaps[snap].marker.clone();
                        let got = if image {
                            self.peek(&v.volume_id, node, &name).await?
                        } else {
                            read_marker(&data)?
                        };
                        if got != marker {
                            return Err(format!("{name} restored from {snap} holds {got:?}, want {marker:?}"));
                        }
                        marker
                    }
                };
                let vol = Vol {
                    id: v.volume_id,
                    node,
                    bytes: v.capacity_bytes,
                    marker,
                    image,
                    btrfs,
                    mounted: false,
                    read_only: false,
                };
                self.model.vols.insert(name, vol);
            }
            Some(_) => unreachable!("a create answers a volume"),
            None => {
                self.model.pending.insert(name, Pending { req, node, source });
            }
        }
        Ok(())
    }

    /// Sends a create the controller places (immediate binding) once while a node does not serve
    /// (down, or its pool shut): made on a node that serves, or UNAVAILABLE naming one that does
    /// not, or (no node serves) RESOURCE_EXHAUSTED (None: pending).
    async fn anywhere_once(&mut self, call: &Call) -> Result<Option<Answer>, String> {
        let blocked: Vec<usize> = (0..self.names.len()).filter(|&i| !self.serves(i)).collect();
        let down: Vec<String> = blocked.iter().map(|&i| self.at(i)).collect();
        match call.send(&mut self.api).await {
            Ok(a) => Ok(Some(a)),
            Err(s) if self.revive(self.names_armed(&s)).await => {
                self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                Ok(None)
            }
            // Only a node that does not serve may be named (or a node whose pool is shut asked,
            // when none serves: it explains its pool).
            Err(s)
                if s.code() != Code::ResourceExhausted
                    && self.refusal_of(&s, &blocked, true)
                    && (s.code() != Code::FailedPrecondition || blocked.len() == self.names.len()) =>
            {
                self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                Ok(None)
            }
            // No node serves: no node can hold it.
            Err(s) if s.code() == Code::ResourceExhausted && (0..self.names.len()).all(|i| !self.serves(i)) => {
                self.note(format!("   refused: {:?} {}", s.code(), first_line(s.message())));
                Ok(None)
            }
            Err(s) => Err(format!(
                "{call:?} placed by the controller with {down:?}: want OK on a node that serves or UNAVAILABLE naming one that does not, got {:?} {}",
                s.code(),
                s.message()
            )),
        }
    }

    /// ControllerGetVolume of a modelled volume: as it is on a node that serves; on a node that is
    /// down or whose pool is shut, abnormal naming it (from the last listing) or refused naming it,
    /// never NOT_FOUND.
    async fn get(&mut self, vol: &str) -> Checked {
        let v = &self.model.vols[vol];
        let (id, node, bytes) = (v.id.clone(), v.node, v.bytes);
        let name = self.names[node].clone();
        if self.serves(node) {
            let Answer::Got(got) = self.converge(&Call::Get(id.clone())).await? else {
                unreachable!("a get answers a volume")
            };
            let cond = got.status.and_then(|s| s.volume_condition);
            let vol = got.volume.ok_or("ControllerGetVolume answered no volume")?;
            if vol.volume_id != id || vol.capacity_bytes != bytes || cond.as_ref().is_none_or(|c| c.abnormal) {
                return Err(format!(
                    "ControllerGetVolume of {id} on live {name}: {} bytes {} condition {cond:?}, want {bytes} and normal",
                    vol.volume_id, vol.capacity_bytes
                ));
            }
            return Ok(());
        }
        match Call::Get(id.clone()).send(&mut self.api).await {
            Ok(Answer::Got(got)) => {
                let cond = got.status.and_then(|s| s.volume_condition);
                match cond {
                    Some(c) if c.abnormal && (c.message.contains(&name) || c.message.contains("not open")) => Ok(()),
                    other => Err(format!(
                        "ControllerGetVolume of {id} on {}: condition {other:?}",
                        self.at(node)
                    )),
                }
            }
            Ok(_) => unreachable!("a get answers a volume"),
            Err(s) if self.refusal_of(&s, &[node], false) => Ok(()),
            Err(s) => Err(format!(
                "ControllerGetVolume of {id} on {}: want UNAVAILABLE naming it or an abnormal condition, got {:?} {}",
                self.at(node),
                s.code(),
                s.message()
            )),
        }
    }

    /// Every check, after every step.
    async fn check(&mut self) -> Checked {
        self.check_disks()?;
        self.check_mounts()?;
        // A live node's object left out of a listing, or listed abnormal, may be a heartbeat
        // missed under load: listed again (at most ATTEMPTS times, a guard); anything else
        // fails at once.
        for attempt in 1.. {
            let live = match self.list_volumes_once().await? {
                Some(l) => Some(l),
                None => self.list_snapshots_once().await?,
            };
            match live {
                None => break,
                Some(l) if attempt < ATTEMPTS => {
                    self.retries += 1;
                    self.note(format!("   listed again after: {l}"));
                    self.revive(true).await;
                    tokio::time::sleep(HEARTBEAT).await;
                }
                Some(l) => return Err(l),
            }
        }
        Ok(())
    }

    /// Each node's pool holds a record and the data of exactly the model's objects on it (with
    /// their markers and sizes), and nothing in `.work` or `.trash`, whether its agent runs or not;
    /// a pool that does not open is where it was moved, and its agent wrote nothing in its place.
    fn check_disks(&self) -> Checked {
        for i in 0..self.names.len() {
            if self.shut[i] {
                let place = self.c.pool_dir(i);
                // Nothing written there: the directory empty, the file as it was.
                let untouched = match self.shut_as_dir[i] {
                    true => std::fs::read_dir(&place).map(|d| d.count() == 0),
                    false => std::fs::read(&place).map(|b| b == NOT_MOUNTED.as_bytes()),
                };
                match untouched {
                    Ok(true) => {}
                    other => {
                        return Err(format!(
                            "{}'s pool is shut, but its place {} holds {other:?}",
                            self.names[i],
                            place.display()
                        ))
                    }
                }
            }
            let pool = self.pool_of(i);
            for scratch in [".work", ".trash"] {
                let left = entries(&pool.join(scratch));
                if !left.is_empty() {
                    return Err(format!("{}: left in {scratch}: {left:?}", self.names[i]));
                }
            }
            let vols: Vec<&String> = self
                .model
                .vols
                .iter()
                .filter(|(_, v)| v.node == i)
                .map(|(n, _)| n)
                .collect();
            let snaps: Vec<&String> = self
                .model
                .snaps
                .iter()
                .filter(|(_, s)| s.node == i)
                .map(|(n, _)| n)
                .collect();
            for (kind, names) in [("volumes", &vols), ("snapshots", &snaps)] {
                let mut want: Vec<String> = names
                    .iter()
                    .flat_map(|n| [n.to_string(), format!("{n}.json")])
                    .collect();
                want.sort();
                // A group refused while a node crashed may have left members, which its retry
                // takes or removes; a create refused while its node died after the record left
                // its volume, which its retry answers.
                let got: Vec<String> = entries(&pool.join(kind))
                    .into_iter()
                    .filter(|e| match kind {
                        "volumes" => !self.model.pending_on(e.trim_end_matches(".json"), i),
                        _ => !self
                            .model
                            .pending_groups
                            .keys()
                            .any(|g| e.starts_with(&format!("{g}-"))),
                    })
                    .collect();
                if got != want {
                    return Err(format!(
                        "{}'s {kind}/ holds {got:?}; the records and data of the model are {want:?}",
                        self.names[i]
                    ));
                }
            }
            let mut groups: Vec<String> = self
                .model
                .groups
                .iter()
                .filter(|(_, g)| g.home == i)
                .map(|(n, _)| format!("{n}.json"))
                .collect();
            groups.sort();
            let got = entries(&pool.join("groups"));
            if got != groups {
                return Err(format!(
                    "{}'s groups/ holds {got:?}; the model's groups recorded there are {groups:?}",
                    self.names[i]
                ));
            }
            for n in vols {
                let v = &self.model.vols[n];
                // An image volume's files are inside its filesystem: check_mounts reads them.
                let got = if v.image {
                    v.marker.clone()
                } else {
                    read_marker(&pool.join("volumes").join(n))?
                };
                if got != v.marker {
                    return Err(format!("{n} on {} holds {got:?}, want {:?}", self.names[i], v.marker));
                }
                if self.btrfs.is_some() && !v.image {
                    subvolume_as_modelled(&pool.join("volumes").join(n), v.btrfs)?;
                }
                let bytes = recorded_capacity(&pool.join("volumes").join(format!("{n}.json")))?;
                if bytes != v.bytes {
                    return Err(format!(
                        "{n}'s record says {bytes} bytes, the controller answered {}",
                        v.bytes
                    ));
                }
            }
            for n in snaps.into_iter().filter(|n| !self.model.snaps[*n].image) {
                if self.model.snaps[n].btrfs {
                    subvolume_as_modelled(&pool.join("snapshots").join(n), true)?;
                }
                let got = read_marker(&pool.join("snapshots").join(n))?;
                if got != self.model.snaps[n].marker {
                    return Err(format!("{n} holds {got:?}, want {:?}", self.model.snaps[n].marker));
                }
            }
        }
        Ok(())
    }

    /// ListVolumes reports no volume the model does not hold; every volume of a live node as it
    /// is; every volume of a node whose pool is shut, abnormal naming it (the agent lists it from
    /// its roster); every volume of a node that is down, abnormal naming it, once this controller
    /// has listed that node (before, the node is left out: docs/split-mode.md). A running node's
    /// volume left out, or a live one not as it is, comes back as `Some`, to list again.
    async fn list_volumes_once(&mut self) -> Result<Option<String>, String> {
        let mut listed: BTreeMap<String, list_volumes_response::Entry> = BTreeMap::new();
        let mut token = String::new();
        loop {
            let page = self
                .api
                .ctl
                .list_volumes(ListVolumesRequest {
                    max_entries: 4,
                    starting_token: token,
                })
                .await
                .map_err(|s| format!("ListVolumes: {:?} {}", s.code(), s.message()))?
                .into_inner();
            for e in page.entries {
                let id = e.volume.as_ref().map(|v| v.volume_id.clone()).unwrap_or_default();
                if listed.insert(id.clone(), e).is_some() {
                    return Err(format!("ListVolumes lists {id} twice"));
                }
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let mut live = None;
        for (name, v) in &self.model.vols {
            let node = &self.names[v.node];
            let Some(e) = listed.remove(&v.id) else {
                // A running agent lists its shut pool's volumes itself, from its roster, whether
                // this controller listed the node before or not.
                if self.up[v.node] {
                    live.get_or_insert(format!("ListVolumes leaves out {name} of {}", self.at(v.node)));
                } else if self.listed[v.node] {
                    return Err(format!(
                        "ListVolumes leaves out {name} of {} (listed by this controller: {})",
                        self.at(v.node),
                        self.listed[v.node]
                    ));
                }
                continue;
            };
            let cond = e
                .status
                .and_then(|s| s.volume_condition)
                .ok_or(format!("{name}: no condition"))?;
            let capacity = e.volume.map_or(0, |v| v.capacity_bytes);
            if self.serves(v.node) {
                if cond.abnormal || capacity != v.bytes {
                    live.get_or_insert(format!(
                        "ListVolumes: {name} of live {node}: {capacity} bytes, {cond:?}; want {} bytes and normal",
                        v.bytes
                    ));
                }
            } else if !cond.abnormal || !cond.message.contains(node.as_str()) {
                return Err(format!(
                    "ListVolumes: {name} of {}: want abnormal naming it, got {cond:?}",
                    self.at(v.node)
                ));
            }
        }
        // A create refused while its node died after the record left its volume there.
        listed.retain(|id, _| {
            let mut parts = id.split(':').skip(1);
            let (node, name) = (parts.next().unwrap_or_default(), parts.nth(1).unwrap_or_default());
            let node = self.names.iter().position(|n| n == node);
            !node.is_some_and(|i| self.model.pending_on(name, i))
        });
        if let Some(id) = listed.keys().next() {
            return Err(format!(
                "ListVolumes reports {id}, which does not exist (deleted, or never made)"
            ));
        }
        if live.is_none() {
            for i in 0..self.names.len() {
                self.listed[i] |= self.serves(i);
            }
        }
        Ok(live)
    }

    /// ListSnapshots reports no snapshot the model does not hold and every snapshot of a live
    /// node, of its source (a node that is down is left out); a live node's snapshot left out
    /// comes back as `Some`, to list again.
    async fn list_snapshots_once(&mut self) -> Result<Option<String>, String> {
        let entries = self
            .api
            .ctl
            .list_snapshots(ListSnapshotsRequest::default())
            .await
            .map_err(|s| format!("ListSnapshots: {:?} {}", s.code(), s.message()))?
            .into_inner()
            .entries;
        let mut listed: BTreeMap<String, (String, String)> = entries
            .into_iter()
            .filter_map(|e| e.snapshot)
            .map(|s| (s.snapshot_id, (s.source_volume_id, s.group_snapshot_id)))
            .collect();
        let mut live = None;
        for (name, s) in &self.model.snaps {
            let group = s
                .group
                .as_ref()
                .map_or(String::new(), |g| self.model.groups[g].id.clone());
            match listed.remove(&s.id) {
                Some((source, of)) if source != s.source_id || of != group => {
                    return Err(format!(
                        "ListSnapshots: {name} of {source} in group {of:?}, want of {} in {group:?}",
                        s.source_id
                    ))
                }
                None if self.serves(s.node) => {
                    live.get_or_insert(format!(
                        "ListSnapshots leaves out {name} of live {}",
                        self.names[s.node]
                    ));
                }
                _ => {}
            }
        }
        let pending = |id: &str| {
            self.model
                .pending_groups
                .keys()
                .any(|g| id.rsplit(':').next().is_some_and(|n| n.starts_with(&format!("{g}-"))))
        };
        if let Some(id) = listed.keys().find(|id| !pending(id)) {
            return Err(format!("ListSnapshots reports {id}, which does not exist"));
        }
        Ok(live)
    }

    /// Brings every node up (and sometimes restarts the controller), retries the pending creates,
    /// deletes everything and checks that nothing is left anywhere.
    async fn teardown(&mut self) -> Checked {
        self.note("end: every node up, every pool open".into());
        for i in 0..self.names.len() {
            if self.shut[i] {
                self.open(i, false).await?;
            }
            if !self.up[i] {
                self.start(i).await;
                self.up[i] = true;
            }
        }
        self.check().await?;
        let pending: Vec<String> = self.model.pending.keys().cloned().collect();
        for name in pending {
            let p = self.model.pending.remove(&name).expect("pending");
            self.note(format!("end: retry the create of {name}"));
            self.create(p.req, p.node, p.source).await?;
            self.check().await?;
        }
        let mounted: Vec<String> = self
            .model
            .vols
            .iter()
            .filter(|(_, v)| v.mounted)
            .map(|(n, _)| n.clone())
            .collect();
        for name in mounted {
            self.note(format!("end: unpublish {name}"));
            self.unpublish(&name).await?;
            self.check().await?;
        }
        let pending: Vec<String> = self.model.pending_groups.keys().cloned().collect();
        for name in pending {
            self.note(format!("end: retry group snapshot {name}"));
            self.retry_group(name).await?;
            self.check().await?;
        }
        let groups: Vec<String> = self.model.groups.keys().cloned().collect();
        for name in groups {
            self.delete_group("end".into(), &name).await?;
            self.check().await?;
        }
        let snaps: Vec<String> = self.model.snaps.keys().cloned().collect();
        let vols: Vec<String> = self.model.vols.keys().cloned().collect();
        for (volume, names) in [(false, snaps), (true, vols)] {
            for name in names {
                self.delete("end".into(), volume, &name).await?;
                self.check().await?;
            }
        }
        if !self.model.snaps.is_empty() || !self.model.vols.is_empty() || !self.model.groups.is_empty() {
            return Err("a delete with every node up did not delete".into());
        }
        self.note("end: restart the controller".into());
        self.restart_controller(true).await;
        self.check().await?;
        for i in 0..self.names.len() {
            let pool = self.c.pool_dir(i);
            let mut left = Vec::new();
            walk(&pool, &mut left);
            // The pool's mark of which pool it is stays (docs/pools.md).
            left.retain(|p| *p != pool.join(".cellar-pool").display().to_string());
            if !left.is_empty() {
                return Err(format!(
                    "{} keeps files after everything was deleted: {left:?}",
                    self.names[i]
                ));
            }
        }
        Ok(())
    }

    fn fail(&self, seed: u64, steps: usize, what: String) -> String {
        let mut logs = format!("controller log (tail):\n{}", tail(&self.c.controller_log(), 15));
        for i in 0..self.names.len() {
            logs += &format!("\n{} log (tail):\n{}", self.names[i], tail(&self.c.log_of(i), 10));
        }
        format!(
            "seed {seed} failed at step {}: {what}\nreproduce: CELLAR_SPLIT_SEEDS={seed} CELLAR_SPLIT_STEPS={steps} cargo test --features crash-points --test random_split -- --nocapture\nstep log:\n{}\n{logs}",
            self.at_step,
            self.log.join("\n")
        )
    }
}

/// What stands in a shut pool's place: a disk not mounted leaves its mount point's directory
/// empty; a file makes sure that the agent cannot take the place for the pool.
const NOT_MOUNTED: &str = "the disk is not mounted";

/// Where a shut pool's directory is kept meanwhile.
fn aside(pool: &Path) -> std::path::PathBuf {
    let mut p = pool.as_os_str().to_owned();
    p.push(".aside");
    p.into()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Every file (not directory) below `dir`.
fn walk(dir: &Path, files: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            walk(&p, files);
        } else {
            files.push(p.display().to_string());
        }
    }
}

/// The marker in `data` ("" when there is none: an image volume no pod has written).
fn read_marker(data: &Path) -> Result<String, String> {
    match std::fs::read_to_string(data.join(MARKER)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        r => r.map_err(|e| format!("marker of {}: {e}", data.display())),
    }
}

/// Writes `marker` to `path` and syncs it and its directory, as a database commits: a snapshot of
/// an image volume cut after holds it.
fn write_synced(path: &Path, marker: &str) -> Checked {
    let sync = || -> std::io::Result<()> {
        std::fs::write(path, marker)?;
        std::fs::File::open(path)?.sync_all()?;
        std::fs::File::open(path.parent().expect("parent"))?.sync_all()
    };
    sync().map_err(|e| format!("write {}: {e}", path.display()))
}

/// The StorageClass parameters asking for an image or a btrfs volume, or for the pool's default
/// (dir).
fn layout(image: bool, btrfs: bool) -> std::collections::HashMap<String, String> {
    match (image, btrfs) {
        (true, _) => [("layout".to_string(), "image".to_string())].into(),
        (false, true) => [("layout".to_string(), "btrfs".to_string())].into(),
        (false, false) => Default::default(),
    }
}

/// Whether `data` is a btrfs subvolume (the root directory of one has inode 256) exactly when the
/// model says it holds a `btrfs` volume or snapshot: a `dir` volume made, restored or moved as a
/// subvolume, or a `btrfs` one as a plain directory, is the wrong layout.
fn subvolume_as_modelled(data: &Path, btrfs: bool) -> Checked {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(data)
        .map_err(|e| format!("{}: {e}", data.display()))?
        .ino();
    if (ino == 256) != btrfs {
        return Err(format!(
            "{} is {}a subvolume (inode {ino}), but it holds a {} volume",
            data.display(),
            if ino == 256 { "" } else { "not " },
            if btrfs { "btrfs" } else { "dir" }
        ));
    }
    Ok(())
}

/// The backing files under `dir` of the loop devices attached now.
fn loop_files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(f) = std::fs::read_to_string(&backing) {
            let f = std::path::PathBuf::from(f.trim_end());
            if f.starts_with(dir) {
                files.push(f);
            }
        }
    }
    files
}

fn recorded_capacity(record: &Path) -> Result<i64, String> {
    let text = std::fs::read_to_string(record).map_err(|e| format!("{}: {e}", record.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", record.display()))?;
    json["capacity_bytes"]
        .as_i64()
        .ok_or(format!("{}: no capacity_bytes", record.display()))
}

async fn run_seed(seed: u64, steps: usize) -> (usize, usize, usize) {
    let mut r = Run::new(seed).await;
    for k in 0..steps {
        r.at_step = k;
        if let Err(e) = r.step(k).await {
            panic!("{}", r.fail(seed, steps, e));
        }
        // A crash no call waited for: the node starts again.
        r.revive(false).await;
        if let Err(e) = r.check().await {
            panic!("{}", r.fail(seed, steps, e));
        }
    }
    r.at_step = steps;
    if let Err(e) = r.teardown().await {
        panic!("{}", r.fail(seed, steps, format!("at the end: {e}")));
    }
    if std::env::var("CELLAR_SPLIT_LOG").is_ok() {
        eprintln!("seed {seed} step log:\n{}", r.log.join("\n"));
    }
    (r.names.len(), r.retries, r.crashes)
}

#[tokio::test]
async fn random_split_calls_with_nodes_and_controller_down_keep_every_invariant() {
    let steps = std::env::var("CELLAR_SPLIT_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS);
    for seed in seeds_from_env("CELLAR_SPLIT_SEEDS", &SEEDS) {
        let started = std::time::Instant::now();
        let (nodes, retries, crashes) = run_seed(seed, steps).await;
        eprintln!(
            "seed {seed}: {steps} steps on {nodes} nodes in {:?} ({retries} calls or listings on live nodes retried, {crashes} crash points reached)",
            started.elapsed()
        );
    }
}
