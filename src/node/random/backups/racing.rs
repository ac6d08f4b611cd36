//! Racing backup calls, in the backup seeds of their own run (`CELLAR_BACKUP_RACE_SEEDS`): two
//! calls on one backup, or on the repository, at the same moment from two threads, as a node's
//! upload thread, the controller's pruner and the CO's DeleteSnapshot or CreateVolume meet in a
//! cluster. No failure is armed; in half the races of an upload with a prune or another upload,
//! the upload's process dies at one of its crash points and starts again, and so does a restore's
//! in half the races of a restore (through a process the other side does not use). The prune
//! racing a call keeps marked packs (`--backup-keep-delete` longer than any upload, as
//! docs/backups.md asks); a prune that removes them at once follows every race an upload was in,
//! and every live backup must then restore its data.
//!
//! The answers must be those of some serial order of the two calls: an upload racing its forget
//! leaves the backup forgotten (never back in the repository, never a local copy but one a node
//! that was not told drops once back), a restore racing its forget restores the whole data or is
//! NOT_FOUND and makes nothing, and a node's start resumes every upload it had.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::super::races::{sidecar, together};
use super::*;

/// The prune racing a call keeps what it marks this long: longer than any upload.
const KEEP: Duration = Duration::from_secs(3600);

pub(super) fn race(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    match rng.below(6) {
        0 => upload_and_prune(c, m, rng, log),
        1 => restore_and_prune(c, m, rng, log),
        2 => two_uploads_of_one_volume(c, m, rng, log),
        3 => upload_and_forget(c, m, rng, log),
        4 => restore_and_forget(c, m, rng, log),
        _ => start_resumes_uploads(c, m, rng, log),
    }
}

/// The crash points of an upload, in its order.
const UPLOAD_STEPS: [&str; 4] = [
    "backup:before-upload",
    "backup:after-upload",
    "backup:checked-copy-written",
    "backup:before-mark",
];

/// The crash points a restore may pass, in its order (from the repository: the stream, its
/// rename, the record; from a kept copy: its copy's rename, the record).
const RESTORE_STEPS: [&str; 5] = [
    "import:mid-stream",
    "import:before-rename",
    "copy:before-rename",
    "image:before-rename",
    "create-volume:before-record",
];

/// Where an upload's process may die mid-race: half the time, one of the upload's crash points.
/// Never chosen (`None`) when the upload runs on a process the other side of the race uses
/// (`others`): a process that died answers nothing more, while this one would go on answering.
fn crash_unless(rng: &mut Rng, at: usize, others: &[usize]) -> Option<&'static str> {
    crash_at_step(rng, &UPLOAD_STEPS, at, others)
}

/// [`crash_unless`] at one of `steps`.
fn crash_at_step(rng: &mut Rng, steps: &[&'static str], at: usize, others: &[usize]) -> Option<&'static str> {
    rng.chance(50)
        .then(|| *rng.pick(steps))
        .filter(|_| !others.contains(&at))
}

/// Runs `call` with this thread's crash point armed at `point`: Err names the point it died at.
fn crashing<T>(point: Option<&'static str>, call: impl FnOnce() -> T) -> Result<T, String> {
    crate::crash::in_thread::crash_at(point);
    let r = catch_unwind(AssertUnwindSafe(call));
    crate::crash::in_thread::crash_at(None);
    match r {
        Ok(t) => Ok(t),
        Err(panic) => match panic.downcast::<Crashed>() {
            Ok(c) => Err(c.0),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

/// After a race: a process that died in it starts again (kill -9: its disk and the fakes'
/// mounts and devices stay) and `resume` runs there, as its start's upload thread would.
fn started_again<T: std::fmt::Debug>(
    c: &mut Cluster,
    log: &mut Vec<String>,
    at: usize,
    crash: Option<&'static str>,
    outcome: Result<Result<T, tonic::Status>, String>,
    resume: impl Fn(&Cluster) -> Result<T, tonic::Status>,
) -> Result<T, tonic::Status> {
    if let Some(point) = crash {
        let tally = c.crashes.entry(point).or_default();
        tally.0 += 1;
        tally.1 += usize::from(outcome.is_err());
    }
    match outcome {
        Ok(r) => r,
        Err(point) => {
            log.push(format!("    {} died at {point}; starting again", c.procs[at].label));
            c.procs[at].restart();
            c.restarts += 1;
            resume(c)
        }
    }
}

/// A backup not uploaded yet, and the process whose upload thread uploads it.
fn draw_upload(m: &Model, rng: &mut Rng) -> Option<(String, Bk, usize)> {
    let names: Vec<String> = m
        .backups
        .iter()
        .filter(|(_, b)| !b.uploaded)
        .map(|(k, _)| k.clone())
        .collect();
    if names.is_empty() {
        return None;
    }
    let name = rng.pick(&names).clone();
    let b = m.backups[&name].clone();
    let at = owner(b.home, rng);
    Some((name, b, at))
}

fn uploaded(m: &Model) -> Vec<String> {
    m.backups
        .iter()
        .filter(|(_, b)| b.uploaded)
        .map(|(k, _)| k.clone())
        .collect()
}

/// Where the second call of a race starts: up to 30 ms after the first.
fn delay(rng: &mut Rng) -> u64 {
    rng.below(30_000) as u64
}

fn snap_of(b: &Bk) -> SnapshotId {
    SnapshotId::parse(&b.snap).expect("snapshot id")
}

/// An upload, as its thread runs it: again after any failure, until it answers OK or is called
/// off by its backup's delete (which then removes its snapshot).
fn upload_until_done(p: &Proc, snap: &SnapshotId) -> Result<(), tonic::Status> {
    let step = || match p.engine.upload_step(snap) {
        Err(StorageError::Aborted(_)) => Ok(()),
        other => other.map_err(tonic::Status::from),
    };
    retrying(step, |_| true)
}

/// The pruner's run, keeping what it marks.
fn prune_keeping(p: &Proc) -> Result<(), tonic::Status> {
    p.engine
        .backups()
        .prune(&repository(), KEEP)
        .map(drop)
        .map_err(tonic::Status::from)
}

/// The controller's DeleteSnapshot of a backup through controller replica `replica`: every node
/// told and that replica (for the shared pool) forget their part (a node uploading it calls the
/// upload off, or answers ABORTED if it does not end in time, and the CO sends the delete again),
/// then the repository's part. The other replica is not asked, as the controller's directory
/// does not hold it: an upload it runs is called off by the deletion mark the replica asked
/// writes.
fn forget_everywhere(c: &Cluster, id: &BackupId, away: Option<usize>, replica: usize) -> Result<(), tonic::Status> {
    forget_dying(c, id, away, replica, None).unwrap_or_else(|point| unreachable!("no crash was armed, yet {point}"))
}

/// [`forget_everywhere`], with the replica's process dying at `crash` (Err names the point; the
/// CO sends the delete again once it is back).
fn forget_dying(
    c: &Cluster,
    id: &BackupId,
    away: Option<usize>,
    replica: usize,
    crash: Option<&'static str>,
) -> Result<Result<(), tonic::Status>, String> {
    let asks = |at: usize| Some(at) != away && (at < NODES || at == replica);
    // All at once, as the controller asks its agents: the one uploading it calls the upload off
    // while another process that finds the snapshot taken retries.
    let told: Vec<Result<Result<bool, tonic::Status>, String>> = std::thread::scope(|s| {
        let asked: Vec<_> = c
            .procs
            .iter()
            .enumerate()
            .filter(|(at, _)| asks(*at))
            .map(|(at, p)| {
                s.spawn(move || {
                    let ask = || sidecar(|| p.engine.forget_local_backup(id).map_err(tonic::Status::from));
                    match at == replica {
                        true => crashing(crash, ask),
                        false => Ok(ask()),
                    }
                })
            })
            .collect();
        asked.into_iter().map(|t| t.join().expect("a forget thread")).collect()
    });
    let mut held = false;
    for answer in told {
        match answer? {
            Ok(had) => held |= had,
            Err(e) => return Ok(Err(e)),
        }
    }
    // A node away here could not be reached (one not asked at all is the in-order run's).
    let answered: Vec<NodeId> = (0..c.procs.len())
        .filter(|at| asks(*at))
        .map(|at| c.procs[at].engine.node().clone())
        .collect();
    let p = &c.procs[replica];
    Ok(retrying(
        || forget_stored(p, id, away.is_some(), &answered, held).map_err(tonic::Status::from),
        |code| code == Code::Unavailable,
    ))
}

/// The repository holds an uploaded backup, naming its source.
fn stored(c: &Cluster, rng: &mut Rng, name: &str, b: &Bk) {
    let replica = NODES + rng.below(REPLICAS);
    let found = c.procs[replica]
        .engine
        .backups()
        .find(&backup_id(b))
        .expect("the repository answers")
        .unwrap_or_else(|| panic!("{name} is not in the repository once uploaded"));
    assert_eq!(found.meta.source_volume_id, b.source, "{name} names its source");
}

/// A forgotten backup is not in the repository, and only a node that was not told may hold its
/// copy (the model then expects that node to drop it once back).
fn gone(c: &Cluster, m: &mut Model, rng: &mut Rng, name: &str, b: &Bk, away: Option<usize>) {
    let id = backup_id(b);
    let at = rng.below(c.procs.len());
    assert!(
        c.procs[at]
            .engine
            .backups()
            .find(&id)
            .expect("the repository answers")
            .is_none(),
        "{name} is in the repository once forgotten"
    );
    if away.is_none() {
        // Every holder was told: no deletion mark stays for nobody to consume.
        assert!(
            !c.procs[at]
                .engine
                .backups()
                .is_marked_deleted(&id)
                .expect("the repository answers"),
            "{name}: a deletion mark stays once forgotten with every node told"
        );
        // Nor a note of one written for the other controller replica.
        let share = c.procs[NODES].pool(SHARE).expect("the shared pool");
        let tail = format!("-{}", id.key());
        let notes: Vec<_> = std::fs::read_dir(share.marked_off_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(&tail))
            .map(|e| e.path())
            .collect();
        assert!(notes.is_empty(), "{name}: notes of its deletion mark stay: {notes:?}");
    }
    m.backups.remove(name);
    let snap = snap_of(b);
    for (i, p) in c.procs.iter().enumerate() {
        if p.engine.snapshot(&snap).is_some() {
            assert_eq!(Some(i), away, "{}: {name}'s copy stays once forgotten", p.label);
            m.doomed.insert(b.snap.clone(), (i, b.id.clone()));
        }
    }
}

/// An upload and the pruner at the same moment; then a prune that removes what is marked, and
/// every live backup (this one too) restores its data.
fn upload_and_prune(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let Some((name, b, at)) = draw_upload(m, rng) else {
        return;
    };
    let replica = NODES + rng.below(REPLICAS);
    let us = delay(rng);
    log.push(format!(
        "race: upload {name} on {} and a prune through {} {us} µs later",
        c.procs[at].label, c.procs[replica].label
    ));
    let snap = snap_of(&b);
    let crash = crash_unless(rng, at, &[replica]);
    let (up, pruned) = together(
        us,
        || crashing(crash, || upload_until_done(&c.procs[at], &snap)),
        || prune_keeping(&c.procs[replica]),
    );
    let up = started_again(c, log, at, crash, up, |c| upload_until_done(&c.procs[at], &snap));
    log.push(format!("    {:?}, {:?}", up.as_ref().err(), pruned.as_ref().err()));
    up.unwrap_or_else(|e| panic!("the upload of {name} racing a prune: {e}"));
    pruned.unwrap_or_else(|e| panic!("a prune racing the upload of {name}: {e}"));
    m.backups.get_mut(&name).expect("backup").uploaded = true;
    stored(c, rng, &name, &b);
    prune(c, m, rng, false, log);
}

/// A restore and the pruner at the same moment: the restore holds its backup's data.
fn restore_and_prune(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let Some(r) = Restore::draw(c, m, rng) else { return };
    let replica = NODES + rng.below(REPLICAS);
    let us = delay(rng);
    log.push(format!(
        "race: {} and a prune through {} {us} µs later",
        r.shown(c),
        c.procs[replica].label
    ));
    // Half the time the restore's process dies at one of its steps; the provisioner's retry
    // after its start must make the whole volume.
    let crash = crash_at_step(rng, &RESTORE_STEPS, r.at, &[replica]);
    let (made, pruned) = together(
        us,
        || crashing(crash, || r.call(c)),
        || prune_keeping(&c.procs[replica]),
    );
    let made = started_again(c, log, r.at, crash, made, |c| r.call(c));
    log.push(format!("    {}, {:?}", brief(&made), pruned.as_ref().err()));
    let rec = made.unwrap_or_else(|e| panic!("a restore of {} racing a prune: {e}", r.name));
    pruned.unwrap_or_else(|e| panic!("a prune racing a restore of {}: {e}", r.name));
    r.take(c, m, &rec, "racing a prune");
}

/// A restore of a live backup into a new volume of any pool, drawn for a race.
struct Restore {
    name: String,
    b: Bk,
    home: Home,
    layout: Layout,
    vol: String,
    at: usize,
}

impl Restore {
    fn draw(c: &Cluster, m: &mut Model, rng: &mut Rng) -> Option<Restore> {
        let names = uploaded(m);
        if names.is_empty() || m.vols.len() >= MAX_VOLUMES {
            return None;
        }
        let name = rng.pick(&names).clone();
        let b = m.backups[&name].clone();
        let home = match rng.below(3) {
            0 => Home::Shared,
            _ => Home::Node(rng.below(NODES)),
        };
        let layout = restore_layout(&b, home, rng);
        let vol = format!("pvc-{}", m.next);
        m.next += 1;
        let at = c.controller(home, rng);
        Some(Restore {
            name,
            b,
            home,
            layout,
            vol,
            at,
        })
    }

    fn shown(&self, c: &Cluster) -> String {
        format!(
            "restore {} as {} {:?} in {:?} through {}",
            self.name, self.vol, self.layout, self.home, c.procs[self.at].label
        )
    }

    /// CreateVolume, sent again by the provisioner while another call holds the object.
    fn call(&self, c: &Cluster) -> Result<crate::storage::record::VolumeRecord, tonic::Status> {
        sidecar(|| {
            c.procs[self.at]
                .engine
                .create_volume(restore_request(
                    &self.vol,
                    &self.b,
                    self.layout,
                    self.home,
                    self.b.bytes,
                ))
                .map_err(tonic::Status::from)
        })
    }

    /// The volume made holds the backup's data at its cut.
    fn take(&self, c: &Cluster, m: &mut Model, rec: &crate::storage::record::VolumeRecord, racing: &str) {
        let what = format!("restore of backup {} {racing}", self.b.id);
        NewVol {
            layout: self.layout,
            home: self.home,
            policy: DeletePolicy::Delete,
            holds: &self.b.marker,
            what: &what,
        }
        .take(&c.procs[self.at], m, rec);
    }
}

/// Two backups of one volume, cut around a pod's write, upload at the same moment (each
/// snapshot has its upload thread): both are stored, each with its own data, and an image
/// volume keeps at most one base copy.
fn two_uploads_of_one_volume(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let vols: Vec<String> = m.vols.keys().cloned().collect();
    if vols.is_empty() {
        return;
    }
    let vol = rng.pick(&vols).clone();
    let before: BTreeSet<String> = m.backups.keys().cloned().collect();
    cut(c, m, rng, &vol, false, log);
    pod_writes(c, m, rng, &vol, log);
    cut(c, m, rng, &vol, false, log);
    let new: Vec<String> = m.backups.keys().filter(|k| !before.contains(*k)).cloned().collect();
    let [first, second] = &new[..] else {
        panic!("two backups cut: {new:?}")
    };
    let (a, b) = (m.backups[first].clone(), m.backups[second].clone());
    let (at_a, at_b) = (owner(a.home, rng), owner(b.home, rng));
    let us = delay(rng);
    log.push(format!(
        "race: upload {first} on {} and {second} on {} {us} µs later",
        c.procs[at_a].label, c.procs[at_b].label
    ));
    let (snap_a, snap_b) = (snap_of(&a), snap_of(&b));
    let crash = crash_unless(rng, at_a, &[at_b]);
    let (up_a, up_b) = together(
        us,
        || crashing(crash, || upload_until_done(&c.procs[at_a], &snap_a)),
        || upload_until_done(&c.procs[at_b], &snap_b),
    );
    let up_a = started_again(c, log, at_a, crash, up_a, |c| {
        upload_until_done(&c.procs[at_a], &snap_a)
    });
    log.push(format!("    {:?}, {:?}", up_a.as_ref().err(), up_b.as_ref().err()));
    up_a.unwrap_or_else(|e| panic!("the upload of {first} racing {second}'s: {e}"));
    up_b.unwrap_or_else(|e| panic!("the upload of {second} racing {first}'s: {e}"));
    for (name, bk) in [(first, &a), (second, &b)] {
        m.backups.get_mut(name).expect("backup").uploaded = true;
        stored(c, rng, name, bk);
    }
    // Each restores its own cut (the prune's check), not the other's.
    prune(c, m, rng, false, log);
}

/// A backup's upload and its DeleteSnapshot at the same moment, the node holding it sometimes
/// cut off from the controller (the controller then writes a deletion mark): the backup ends
/// forgotten, and a copy stays only on a node that was not told, which drops it once back.
fn upload_and_forget(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let Some((name, b, at)) = draw_upload(m, rng) else {
        return;
    };
    let away = match b.home {
        Home::Node(n) if rng.chance(40) => Some(n),
        _ => None,
    };
    let replica = NODES + rng.below(REPLICAS);
    let us = delay(rng);
    let upload_first = rng.chance(50);
    log.push(format!(
        "race: upload {name} on {} and its forget{} through {}, {} {us} µs later",
        c.procs[at].label,
        away.map(|n| format!(" while n{n} is away")).unwrap_or_default(),
        c.procs[replica].label,
        if upload_first { "the forget" } else { "the upload" }
    ));
    let snap = snap_of(&b);
    let id = backup_id(&b);
    // Half the time the upload stands at one of its steps when the forget comes (the small
    // uploads here rarely overlap it by timing alone), and goes on once it is called off.
    let held_at = rng.chance(50).then(|| *rng.pick(&UPLOAD_STEPS));
    if let Some(point) = held_at {
        log.push(format!("    the upload stands at {point} when the forget comes"));
    }
    let pause = Arc::new(crate::crash::in_thread::Pause::default());
    let ended = AtomicBool::new(false);
    let upload = || {
        crate::crash::in_thread::pause_at(held_at.map(|p| (p, pause.clone())));
        let r = upload_until_done(&c.procs[at], &snap);
        crate::crash::in_thread::pause_at(None);
        ended.store(true, Ordering::SeqCst);
        r
    };
    // Half the time the replica the delete goes through dies while it removes a shared
    // snapshot, or between noting and writing the deletion mark that calls the other replica's
    // upload off (unless it is the uploader); the CO sends the delete again once it is back.
    let forget_crash = crash_at_step(rng, &["delete:after-trash", "backup:mark-noted"], replica, &[at]);
    let forget = || match held_at {
        None => forget_dying(c, &id, away, replica, forget_crash),
        Some(_) => {
            // An upload with nothing left to do never comes to the step: then no wait.
            while !pause.reached(Duration::from_millis(10)) && !ended.load(Ordering::SeqCst) {}
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    // Another replica's delete calls the upload off through a deletion mark,
                    // which an upload past its last look (at `backup:before-mark`) never sees.
                    let marked = || {
                        at >= NODES
                            && at != replica
                            && c.procs[at].engine.backups().is_marked_deleted(&id).unwrap_or(false)
                    };
                    while !c.procs[at].engine.upload_called_off(&snap) && !done.load(Ordering::SeqCst) && !marked() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    pause.release();
                });
                let r = forget_dying(c, &id, away, replica, forget_crash);
                done.store(true, Ordering::SeqCst);
                r
            })
        }
    };
    let (up, forgot) = match upload_first || held_at.is_some() {
        true => together(us, upload, forget),
        false => {
            let (f, u) = together(us, forget, upload);
            (u, f)
        }
    };
    let forgot = started_again(c, log, replica, forget_crash, forgot, |c| {
        forget_everywhere(c, &id, away, replica)
    });
    log.push(format!("    {:?}, {:?}", up.as_ref().err(), forgot.as_ref().err()));
    up.unwrap_or_else(|e| panic!("the upload of {name} racing its forget: {e}"));
    forgot.unwrap_or_else(|e| panic!("the forget of {name} racing its upload: {e}"));
    gone(c, m, rng, &name, &b, away);
}

/// A restore from a backup and the backup's DeleteSnapshot at the same moment: the restore has
/// the whole data or is NOT_FOUND and leaves nothing; the backup ends forgotten.
fn restore_and_forget(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let Some(r) = Restore::draw(c, m, rng) else { return };
    let replica = NODES + rng.below(REPLICAS);
    let us = delay(rng);
    log.push(format!(
        "race: {} and its forget through {} {us} µs later",
        r.shown(c),
        c.procs[replica].label
    ));
    let id = backup_id(&r.b);
    // The forget asks every node, so only a restore through the other replica may die.
    let nodes: Vec<usize> = (0..NODES).chain([replica]).collect();
    let crash = crash_at_step(rng, &RESTORE_STEPS, r.at, &nodes);
    let (made, forgot) = together(
        us,
        || crashing(crash, || r.call(c)),
        || forget_everywhere(c, &id, None, replica),
    );
    let made = started_again(c, log, r.at, crash, made, |c| r.call(c));
    log.push(format!("    {}, {:?}", brief(&made), forgot.as_ref().err()));
    forgot.unwrap_or_else(|e| panic!("the forget of {} racing a restore: {e}", r.name));
    match made {
        Ok(rec) => r.take(c, m, &rec, "racing its forget"),
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => panic!(
            "a restore of {} racing its forget: {:?} {}",
            r.name,
            s.code(),
            s.message()
        ),
    }
    gone(c, m, rng, &r.name, &r.b, None);
}

/// A node starts again (kill -9) with backups not uploaded yet: its start resumes each upload in
/// its own thread, while the pruner runs; every one ends stored, its copy kept or removed as asked.
fn start_resumes_uploads(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let waiting = |m: &Model, n: usize| -> Vec<String> {
        m.backups
            .iter()
            .filter(|(_, b)| !b.uploaded && b.home == Home::Node(n))
            .map(|(k, _)| k.clone())
            .collect()
    };
    let nodes: Vec<usize> = (0..NODES).filter(|n| !waiting(m, *n).is_empty()).collect();
    if nodes.is_empty() {
        return;
    }
    let n = *rng.pick(&nodes);
    let names = waiting(m, n);
    let replica = NODES + rng.below(REPLICAS);
    log.push(format!(
        "race: n{n} starts again with {} upload(s) to resume, a prune through {}",
        names.len(),
        c.procs[replica].label
    ));
    c.procs[n].restart();
    c.restarts += 1;
    c.procs[n].engine.start_uploads();
    prune_keeping(&c.procs[replica]).unwrap_or_else(|e| panic!("a prune racing n{n}'s uploads: {e}"));
    let until = std::time::Instant::now() + Duration::from_secs(120);
    // The uploads, and the start's look for deletion marks (a kept copy forgotten while the node
    // was away goes, as a copy not uploaded does), end.
    let doomed_here = |m: &Model| -> Vec<SnapshotId> {
        m.doomed
            .iter()
            .filter(|(_, (at, _))| *at == n)
            .map(|(s, _)| SnapshotId::parse(s).expect("snapshot id"))
            .collect()
    };
    let doomed = doomed_here(m);
    while c.procs[n].engine.uploads_running() || doomed.iter().any(|s| c.procs[n].engine.snapshot(s).is_some()) {
        assert!(std::time::Instant::now() < until, "n{n}'s uploads do not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in doomed {
        m.doomed.remove(&s.to_string());
    }
    // Started again without its background uploads: a backup cut from now on uploads when a step
    // says so, as everywhere else in the tester.
    c.procs[n].restart();
    c.restarts += 1;
    for name in &names {
        let b = m.backups[name].clone();
        m.backups.get_mut(name).expect("backup").uploaded = true;
        stored(c, rng, name, &b);
    }
    prune(c, m, rng, false, log);
}
