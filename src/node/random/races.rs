//! Racing steps of the in-process tester: two calls on the same objects at the same moment, from
//! two threads, as two sidecars, a sidecar and kubelet, or two controller replicas make them. Each
//! side retries what a sidecar retries (ABORTED: another call holds the object), and the pair's
//! answers must be one of the outcomes a serial order of the two calls could give: never a record
//! brought back by a call that lost to a delete, a copy of data half deleted, a name answered with
//! two sources, or a shared image staged on two nodes. The model then follows what the answers say,
//! and the checks of every step (records, markers, leftovers, mounts) run on the result.
//!
//! Which call wins depends on the threads' scheduling, so a racing step's outcome is not always the
//! same for one seed; the checks hold for every outcome.

use std::sync::Barrier;

use super::*;
use crate::storage::record::{SnapshotRecord, VolumeRecord};

/// Runs `a` and `b` from two threads released together; `b` starts `delay_us` later (drawn from
/// the seed, to vary which part of `a` it meets).
pub(super) fn together<A: Send, B: Send>(
    delay_us: u64,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let ta = s.spawn(|| {
            start.wait();
            a()
        });
        let tb = s.spawn(|| {
            start.wait();
            std::thread::sleep(std::time::Duration::from_micros(delay_us));
            b()
        });
        (ta.join().expect("no panic"), tb.join().expect("no panic"))
    })
}

/// As a sidecar retries: while another call holds the object.
pub(super) fn sidecar<T>(call: impl Fn() -> Result<T, tonic::Status>) -> Result<T, tonic::Status> {
    retrying(call, |c| c == Code::Aborted)
}

/// One side of a race on a volume.
#[derive(Debug, Clone)]
enum Op {
    Snapshot(String),
    Clone(String),
    Expand(u64),
    Modify(DeletePolicy),
    Delete,
    /// NodeStageVolume on this node.
    Stage(usize),
    /// The controller replica `NODES + r` starts again (its engine opened anew from disk, as a
    /// restarted process: what its start sweeps must leave the other call's work alone).
    Restart(usize),
}

enum Done {
    Snapshot(SnapshotRecord),
    Volume(VolumeRecord),
    Deleted,
    Staged(usize, PathBuf),
    Restarted(usize, Arc<LocalEngine>),
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Done::Snapshot(r) => write!(f, "snapshot {}", r.id),
            Done::Volume(r) => write!(f, "volume {} of {} bytes", r.id, r.capacity_bytes),
            Done::Deleted => write!(f, "deleted"),
            Done::Staged(n, _) => write!(f, "staged on n{n}"),
            Done::Restarted(r, _) => write!(f, "ctl-{r} restarted"),
        }
    }
}

fn shared_pool(r: &mut NewVolume, home: Home) {
    if home == Home::Shared {
        r.pool = Some(PoolName::parse(SHARE).expect("pool"));
    }
}

impl Op {
    /// The process that takes the call.
    fn at(&self, c: &Cluster, v: &Vol, rng: &mut Rng) -> usize {
        match self {
            Op::Stage(n) => *n,
            Op::Restart(r) => NODES + r,
            _ => c.controller(v.home, rng),
        }
    }

    /// What its caller sends again: kubelet a stage until the volume is gone, a sidecar a
    /// controller call while another call holds the object.
    fn again(&self, code: Code) -> bool {
        match self {
            Op::Stage(_) => code != Code::NotFound,
            _ => code == Code::Aborted,
        }
    }

    /// The crash points where the call can be stopped while the other runs, on volume `v`.
    fn pauses(&self, v: &Vol) -> Vec<&'static str> {
        // Each is on the call's path for that volume: a call that succeeds has passed it (checked).
        match (self, v.layout) {
            // A volume its policy keeps is moved aside, not trashed.
            (Op::Delete, _) if v.policy != DeletePolicy::Delete => Vec::new(),
            (Op::Delete, _) => vec!["delete:after-trash"],
            // A btrfs copy is a subvolume snapshot, made in place, not in `.work`.
            (Op::Snapshot(_), Layout::Btrfs) => vec!["create-snapshot:before-record"],
            (Op::Snapshot(_), _) => vec!["copy:before-rename", "create-snapshot:before-record"],
            (Op::Clone(_), Layout::Btrfs) => vec!["create-volume:before-record"],
            (Op::Clone(_), _) => vec!["copy:before-rename", "create-volume:before-record"],
            (Op::Expand(_), _) => vec!["expand:before-record"],
            (Op::Stage(_), Layout::Image) => vec!["stage:after-attach"],
            (Op::Stage(_), _) => vec!["stage:before-mount"],
            _ => Vec::new(),
        }
    }

    fn run(&self, p: &Proc, name: &str, v: &Vol) -> Result<Done, tonic::Status> {
        let id = vid(&v.id);
        let r = match self {
            Op::Snapshot(snap) => p.engine.create_snapshot(snap, &id, false).map(Done::Snapshot),
            Op::Clone(clone) => {
                let mut r = NewVolume::plain(clone, Some(v.layout), v.bytes);
                r.source = Some(Source::Volume(id));
                if v.block {
                    r.mode = crate::storage::record::VolumeMode::Block;
                }
                shared_pool(&mut r, v.home);
                p.engine.create_volume(r).map(Done::Volume)
            }
            Op::Expand(to) => p
                .engine
                .expand_volume(
                    &id,
                    CapacityRange {
                        required: *to,
                        limit: 0,
                    },
                )
                .map(|(r, _)| Done::Volume(r)),
            Op::Modify(policy) => {
                let change = crate::storage::engine::Mutable {
                    compression: None,
                    delete_policy: Some(*policy),
                };
                p.engine.modify_volume(&id, &change).map(Done::Volume)
            }
            Op::Delete => p.engine.delete_volume(&id).map(|()| Done::Deleted),
            Op::Stage(n) => {
                let staging = p.dir.join(format!("kubelet/staging/{name}"));
                std::fs::create_dir_all(&staging).expect("staging dir");
                let r = p.svc().stage(NodeStageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(cap(v)),
                    ..Default::default()
                });
                return r.map(|_| Done::Staged(*n, staging)).map_err(tonic::Status::from);
            }
            Op::Restart(r) => return Ok(Done::Restarted(*r, p.reopen())),
        };
        r.map_err(tonic::Status::from)
    }

    /// The call, sent again as its caller would until it answers something final.
    fn converge(&self, p: &Proc, name: &str, v: &Vol) -> Result<Done, tonic::Status> {
        retrying(|| self.run(p, name, v), |code| self.again(code))
    }

    /// A first answer, then as [`Op::converge`] if its caller would send it again.
    fn converge_from(
        &self,
        first: Result<Done, tonic::Status>,
        p: &Proc,
        name: &str,
        v: &Vol,
    ) -> Result<Done, tonic::Status> {
        match first {
            Err(s) if self.again(s.code()) => self.converge(p, name, v),
            done => done,
        }
    }
}

/// Two calls on one volume, most often one of them a delete, each through the process that
/// serves it (for a shared volume either replica). Either both start together, or (`paused`) the
/// first is stopped at one of its crash points while the second runs whole, then goes on: the
/// second then meets the first's half-done work every time, not by the luck of the scheduler.
pub(super) fn race_on_volume(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>, paused: bool) {
    let names: Vec<String> = m.vols.keys().cloned().collect();
    if names.is_empty() {
        return;
    }
    let name = rng.pick(&names).clone();
    let v = m.vols[&name].clone();
    let in_use = v.staged.is_some() || v.published.is_some();
    let room = MAX_VOLUMES.saturating_sub(m.vols.len());
    // A stage on a node that may take the volume: its own node, or either for a shared one
    // (a shared image is staged on one node at a time; another stage of it is race_two_stages).
    let node = match v.home {
        Home::Node(n) => n,
        Home::Shared => rng.below(NODES),
    };
    let pick = |rng: &mut Rng, m: &mut Model, stage: bool| {
        let n = m.next;
        m.next += 1;
        match rng.below(7) {
            0 => Op::Snapshot(format!("snap-{n}")),
            1 if room >= 2 => Op::Clone(format!("pvc-{n}")),
            2 => Op::Expand(v.bytes + MIB * (1 + rng.below(3) as u64)),
            3 => Op::Modify(*rng.pick(&POLICIES)),
            4 if stage && v.staged.is_none() => Op::Stage(node),
            5 if v.home == Home::Shared => Op::Restart(rng.below(REPLICAS)),
            _ => Op::Delete,
        }
    };
    let mut first = pick(rng, m, true);
    if paused {
        while first.pauses(&v).is_empty() {
            first = pick(rng, m, true);
        }
    }
    let stage_taken = matches!(first, Op::Stage(_));
    let mut second = match rng.chance(60) {
        true => Op::Delete,
        false => pick(rng, m, !stage_taken),
    };
    let at = [first.at(c, &v, rng), second.at(c, &v, rng)];
    if let Op::Restart(r) = &mut second {
        // Another process than the one the first call runs in.
        if NODES + *r == at[0] {
            *r = (*r + 1) % REPLICAS;
        }
    }
    let at = [at[0], second.at(c, &v, rng)];
    let ops = [first, second];
    let how = match paused {
        true => {
            let points = ops[0].pauses(&v);
            Some(*rng.pick(&points))
        }
        false => None,
    };
    log.push(format!(
        "race on {name}{}: {:?} through {}{} and {:?} through {}",
        if in_use { " (in use)" } else { "" },
        ops[0],
        c.procs[at[0]].label,
        how.map(|p| format!(", stopped at {p},")).unwrap_or_default(),
        ops[1],
        c.procs[at[1]].label
    ));
    let delay = rng.below(600) as u64;
    let answers = {
        let (p0, p1) = (&c.procs[at[0]], &c.procs[at[1]]);
        let (v, ops, name) = (&v, &ops, &name);
        match how {
            None => {
                let (a, b) = together(
                    delay,
                    move || ops[0].converge(p0, name, v),
                    move || ops[1].converge(p1, name, v),
                );
                [a, b]
            }
            Some(point) => {
                let pause = Arc::new(in_thread::Pause::default());
                std::thread::scope(|s| {
                    let held = pause.clone();
                    let a = s.spawn(move || {
                        in_thread::pause_at(Some((point, held.clone())));
                        let first = ops[0].run(p0, name, v);
                        in_thread::pause_at(None);
                        held.release();
                        first
                    });
                    // The second call runs whole while the first stands at its point (if it
                    // comes there: it may have ended before).
                    let stopped = pause.reached(std::time::Duration::from_secs(10));
                    let b_first = ops[1].run(p1, name, v);
                    pause.release();
                    let a_first = a.join().expect("no panic");
                    assert!(
                        stopped || a_first.is_err(),
                        "{:?} succeeded without passing {point}: the point is not on its path",
                        ops[0]
                    );
                    if stopped {
                        log.push(format!("    while stopped: {}", brief(&b_first)));
                    }
                    // Then each is sent again as its caller would.
                    let a = ops[0].converge_from(a_first, p0, name, v);
                    let b = ops[1].converge_from(b_first, p1, name, v);
                    [a, b]
                })
            }
        }
    };
    log.push(format!("    {} / {}", brief(&answers[0]), brief(&answers[1])));
    let deleted = answers.iter().any(|a| matches!(a, Ok(Done::Deleted)));
    let staged = answers.iter().any(|a| matches!(a, Ok(Done::Staged(..))));
    assert!(
        !(deleted && staged),
        "{name} was deleted and staged by {ops:?}: a pod would run on deleted data"
    );
    let grew = ops
        .iter()
        .zip(&answers)
        .any(|(op, a)| matches!(op, Op::Expand(_)) && a.is_ok());
    let mut grown = Vec::new();
    let mut policies = vec![v.policy];
    let mut answers = answers;
    for (i, op) in ops.iter().enumerate() {
        let other = &ops[1 - i];
        let answer = std::mem::replace(&mut answers[i], Ok(Done::Deleted));
        match (op, answer) {
            (Op::Delete, Ok(_)) => assert!(!in_use, "{name} was deleted while in use (racing {other:?})"),
            (Op::Delete, Err(s)) => assert!(
                (in_use || staged) && s.code() == Code::FailedPrecondition,
                "a delete of {name} racing {other:?} answered {:?}: {}",
                s.code(),
                s.message()
            ),
            // The other side deleted the volume first.
            (_, Err(s)) if deleted && s.code() == Code::NotFound => {}
            // The other side grew the source first: a clone asking its old size is too small.
            (Op::Clone(_), Err(s)) if grew && s.code() == Code::OutOfRange => {}
            (Op::Snapshot(snap), Ok(Done::Snapshot(rec))) => {
                m.snaps.insert(snap.clone(), Snap::of(snap, &v, &rec));
            }
            (Op::Clone(clone), Ok(Done::Volume(rec))) => {
                assert_eq!(&rec.name, clone);
                let made = NewVol {
                    layout: v.layout,
                    home: v.home,
                    policy: DeletePolicy::Delete,
                    holds: &v.marker,
                    what: &format!("a clone of {name} made while {other:?} ran"),
                };
                made.take(&c.procs[at[i]], m, &rec);
            }
            (Op::Expand(to), Ok(Done::Volume(rec))) => {
                assert!(
                    rec.capacity_bytes >= *to,
                    "{name} grew to {} < {to}",
                    rec.capacity_bytes
                );
                grown.push((*to, rec.capacity_bytes));
            }
            (Op::Modify(policy), Ok(Done::Volume(rec))) => {
                assert_eq!(rec.delete_policy, Some(*policy));
                policies.push(*policy);
            }
            (Op::Stage(_), Ok(Done::Staged(n, staging))) => {
                m.vols.get_mut(&name).expect("a staged volume").staged = Some((n, staging));
            }
            (Op::Restart(_), Ok(Done::Restarted(r, engine))) => {
                c.procs[NODES + r].engine = engine;
                c.restarts += 1;
            }
            (op, answer) => panic!("{op:?} on {name} racing {other:?} answered {}", brief(&answer)),
        }
    }
    if deleted {
        m.vols.remove(&name);
        return;
    }
    // Both changes landed, in one order or the other: every process reads the one result.
    let rec = c.procs[at[0]]
        .engine
        .volume(&vid(&v.id))
        .expect("the record of a volume not deleted");
    let biggest = grown.iter().map(|g| g.0).max().unwrap_or(0);
    assert!(
        rec.capacity_bytes >= biggest.max(v.bytes)
            && (rec.capacity_bytes == v.bytes || grown.iter().any(|g| g.1 == rec.capacity_bytes)),
        "{name} is {} after growing from {} by {grown:?}",
        rec.capacity_bytes,
        v.bytes
    );
    let policy = rec.delete_policy.unwrap_or(DeletePolicy::Delete);
    assert!(
        policies.contains(&policy),
        "{name}'s policy {policy:?} is one asked for: {policies:?}"
    );
    let mv = m.vols.get_mut(&name).expect("volume");
    mv.bytes = rec.capacity_bytes;
    mv.policy = policy;
}

/// Two requests under one name at once, differing in what they ask (two sources of a snapshot;
/// an empty volume and a clone, or two layouts): exactly one is made, the other is ALREADY_EXISTS,
/// and the one made holds what it was asked for.
pub(super) fn race_same_name(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let home = match rng.below(3) {
        0 => Home::Shared,
        _ => Home::Node(rng.below(NODES)),
    };
    // (Filesystem volumes: the requests here are for Filesystem volumes, and a clone keeps its mode.)
    let here: Vec<Vol> = m
        .vols
        .values()
        .filter(|v| v.home == home && !v.block)
        .cloned()
        .collect();
    let at = [c.controller(home, rng), c.controller(home, rng)];
    let n = m.next;
    m.next += 1;
    if here.len() >= 2 && rng.chance(50) {
        let a = rng.pick(&here).clone();
        let b = here.iter().find(|x| x.id != a.id).expect("two volumes").clone();
        let name = format!("snap-{n}");
        log.push(format!("snapshot {} and {} as {name} at once", a.id, b.id));
        let vs = [a, b];
        let (pa, pb) = (&c.procs[at[0]], &c.procs[at[1]]);
        let cut = |p: &Proc, v: &Vol| Op::Snapshot(name.clone()).converge(p, &name, v);
        let (ra, rb) = together(rng.below(300) as u64, || cut(pa, &vs[0]), || cut(pb, &vs[1]));
        let answers = [ra, rb];
        log.push(format!("    {} / {}", brief(&answers[0]), brief(&answers[1])));
        let won = one_winner(&name, &answers);
        let Ok(Done::Snapshot(rec)) = &answers[won] else {
            panic!("a snapshot answered {}", brief(&answers[won]));
        };
        // The source that won it: the snapshot names it.
        m.snaps.insert(name.clone(), Snap::of(&name, &vs[won], rec));
        return;
    }
    if m.vols.len() >= MAX_VOLUMES {
        return;
    }
    let name = format!("pvc-{n}");
    // An empty volume against a clone of one of this home's volumes, or against another layout.
    let layout = match home {
        Home::Shared => Layout::Dir,
        Home::Node(_) => *rng.pick(&[Layout::Dir, Layout::Btrfs]),
    };
    let empty = (None, layout, 2 * MIB, String::new());
    // (A bigger empty volume of the same layout would be compatible: both would be answered it.)
    let other = match here.is_empty() {
        true => match layout {
            Layout::Dir => (
                None,
                *rng.pick(&[Layout::Image, Layout::Btrfs][..home_layouts(home)]),
                32 * MIB,
                String::new(),
            ),
            _ => (None, Layout::Dir, 2 * MIB, String::new()),
        },
        false => {
            let v = rng.pick(&here).clone();
            (Some(Source::Volume(vid(&v.id))), v.layout, v.bytes, v.marker)
        }
    };
    log.push(format!(
        "create {name} as {empty:?} and as {other:?} at once in {home:?}"
    ));
    let asks = [empty, other];
    let make = |p: &Proc, ask: &(Option<Source>, Layout, u64, String)| {
        sidecar(|| {
            let mut r = NewVolume::plain(&name, Some(ask.1), ask.2);
            r.source = ask.0.clone();
            shared_pool(&mut r, home);
            p.engine.create_volume(r).map_err(tonic::Status::from)
        })
    };
    let (pa, pb) = (&c.procs[at[0]], &c.procs[at[1]]);
    let (ra, rb) = together(rng.below(300) as u64, || make(pa, &asks[0]), || make(pb, &asks[1]));
    let answers = [ra, rb];
    log.push(format!("    {} / {}", brief(&answers[0]), brief(&answers[1])));
    let won = one_winner(&name, &answers);
    let rec = answers[won].as_ref().expect("the winner");
    let ask = &asks[won];
    assert_eq!(
        (rec.layout, rec.capacity_bytes >= ask.2),
        (ask.1, true),
        "{name} is what won it"
    );
    let made = NewVol {
        layout: ask.1,
        home,
        policy: DeletePolicy::Delete,
        holds: &ask.3,
        what: "the request that won the name",
    };
    made.take(&c.procs[at[won]], m, rec);
}

/// How many of `[Image, Btrfs]` a home's pool allows.
fn home_layouts(home: Home) -> usize {
    match home {
        Home::Shared => 1,
        Home::Node(_) => 2,
    }
}

/// Of two answers under one name, exactly one is made and the other is ALREADY_EXISTS: its index.
fn one_winner<T: std::fmt::Debug>(name: &str, answers: &[Result<T, tonic::Status>; 2]) -> usize {
    let lost = |r: &Result<T, tonic::Status>| matches!(r, Err(s) if s.code() == Code::AlreadyExists);
    match (&answers[0], &answers[1]) {
        (Ok(_), b) if lost(b) => 0,
        (a, Ok(_)) if lost(a) => 1,
        _ => panic!(
            "two requests for {name} answered {} and {}: one must be made, the other ALREADY_EXISTS",
            brief(&answers[0]),
            brief(&answers[1])
        ),
    }
}

/// Both nodes stage one shared image at once: its lease lets exactly one of them have it.
pub(super) fn race_two_stages(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let free = names_where(m, |v| {
        v.home == Home::Shared && v.layout == Layout::Image && v.staged.is_none()
    });
    if free.is_empty() {
        return;
    }
    let name = rng.pick(&free).clone();
    let id = m.vols[&name].id.clone();
    let capability = cap(&m.vols[&name]);
    log.push(format!("stage {name} on both nodes at once"));
    let stagings: Vec<PathBuf> = (0..NODES)
        .map(|n| c.procs[n].dir.join(format!("kubelet/staging/{name}")))
        .collect();
    for s in &stagings {
        std::fs::create_dir_all(s).expect("staging dir");
    }
    let stage = |n: usize| {
        let (p, staging, id, capability) = (&c.procs[n], &stagings[n], &id, &capability);
        move || {
            sidecar(|| {
                p.svc()
                    .stage(NodeStageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.display().to_string(),
                        volume_capability: Some(capability.clone()),
                        ..Default::default()
                    })
                    .map(|_| ())
                    .map_err(tonic::Status::from)
            })
        }
    };
    let (a, b) = together(rng.below(300) as u64, stage(0), stage(1));
    log.push(format!("    n0: {} / n1: {}", brief(&a), brief(&b)));
    let refused = |r: &Result<(), tonic::Status>| matches!(r, Err(s) if s.code() == Code::FailedPrecondition);
    let won = match (&a, &b) {
        (Ok(()), b) if refused(b) => 0,
        (a, Ok(())) if refused(a) => 1,
        _ => panic!(
            "{name} staged on both nodes at once answered {} and {}: exactly one may have it",
            brief(&a),
            brief(&b)
        ),
    };
    m.vols.get_mut(&name).expect("volume").staged = Some((won, stagings[won].clone()));
}
