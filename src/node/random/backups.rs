//! Backups in the in-process randomized tester (invariant 7 of docs/design.md): snapshots cut as
//! backups into one path repository that every process of the cluster reads, uploaded by a call
//! of the upload step itself (no background thread runs here: a crash unwinds the call, as in
//! every other step), restored into new volumes of any pool, forgotten as the controller forgets
//! them, and pruned. Each call may crash at the backup crash points or meet a failing record write
//! or file operation, and is retried. After every step [`check_copies`] holds the local copies to
//! what the model expects; after each upload, restore, forget and prune the repository itself is
//! asked: a backup uploaded restores its source's data at its cut (checked by restoring it into a
//! scratch volume after a prune), a forgotten one is NOT_FOUND, and at the end of the seed, once
//! every backup is forgotten and the repository pruned, it lists nothing.

use std::time::Duration;

use super::*;

pub(super) mod racing;
use crate::storage::engine::BackupRequest;
use crate::storage::id::BackupId;
use crate::storage::StorageError;

/// The repository every process has configured (`backup::testing::repository`).
const REPOSITORY: &str = "offsite";

/// What the tester believes of one backup.
#[derive(Debug, Clone)]
pub(super) struct Bk {
    /// The backup's id (what the CO holds), and its local snapshot's.
    id: String,
    snap: String,
    source: String,
    home: Home,
    layout: Layout,
    bytes: u64,
    /// What its source held when it was cut.
    marker: String,
    block: bool,
    keep_local: bool,
    uploaded: bool,
}

fn repository() -> PoolName {
    PoolName::parse(REPOSITORY).expect("repository name")
}

fn backup_id(b: &Bk) -> BackupId {
    BackupId::parse(&b.id).expect("a backup id the engine gave")
}

/// The process that owns a backup's local copy: its node, or a controller replica for a shared
/// volume's (either owns the shared pool).
fn owner(home: Home, rng: &mut Rng) -> usize {
    match home {
        Home::Node(n) => n,
        Home::Shared => NODES + rng.below(REPLICAS),
    }
}

/// One backup step: cut, upload, restore, forget or prune.
pub(super) fn step(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    let names = |f: fn(&Bk) -> bool| -> Vec<String> {
        m.backups.iter().filter(|(_, b)| f(b)).map(|(k, _)| k.clone()).collect()
    };
    if m.backup_races && rng.chance(50) {
        return racing::race(c, m, rng, log);
    }
    let pending = names(|b| !b.uploaded);
    let uploaded = names(|b| b.uploaded);
    let all = names(|_| true);
    match rng.below(7) {
        0 | 1 if !m.vols.is_empty() => {
            let vols: Vec<String> = m.vols.keys().cloned().collect();
            let v = rng.pick(&vols).clone();
            cut(c, m, rng, &v, faulted, log)
        }
        2 | 3 if !pending.is_empty() => {
            let b = rng.pick(&pending).clone();
            upload(c, m, rng, &b, faulted, log)
        }
        4 if !uploaded.is_empty() && m.vols.len() < MAX_VOLUMES => {
            let b = rng.pick(&uploaded).clone();
            restore(c, m, rng, &b, faulted, log)
        }
        5 if !all.is_empty() => {
            let b = rng.pick(&all).clone();
            forget(c, m, rng, &b, faulted, log)
        }
        6 => prune(c, m, rng, faulted, log),
        _ if !m.doomed.is_empty() => {
            let copies: Vec<String> = m.doomed.keys().cloned().collect();
            let copy = rng.pick(&copies).clone();
            back(c, m, rng, &copy, faulted, log)
        }
        _ => {}
    }
}

/// A node that was away when a backup was forgotten is back: its upload of the backup resumes, or
/// (a kept copy already uploaded) its look for deletion marks runs, as at its start; an uploaded
/// image's base copy is dropped by either (every other time by the look, drawn without the seed's
/// generator so that the seeds keep their sequences). Either must drop the copy and leave the
/// backup forgotten, whatever crashes on the way.
fn back(c: &mut Cluster, m: &mut Model, rng: &mut Rng, copy: &str, faulted: bool, log: &mut Vec<String>) {
    let (n, backup) = m.doomed[copy].clone();
    let snap = SnapshotId::parse(copy).expect("snapshot id");
    let Some(rec) = c.procs[n].engine.snapshot(&snap) else {
        // Dropped meanwhile as a base its volume no longer needs.
        m.doomed.remove(copy);
        return;
    };
    let look = rec
        .backup
        .as_ref()
        .is_some_and(|b| b.uploaded && (b.keep_local || m.next % 2 == 0));
    let fault = draw_fault(rng, faulted, |e| {
        [
            Fault::Crash("backup:before-upload"),
            Fault::Crash("backup:after-upload"),
            Fault::Crash("delete:after-trash"),
            Fault::Point("record:write", e),
            Fault::Subvolumes("delete", libc::EIO),
        ]
    });
    log.push(format!(
        "n{n} is back: {} of {copy}",
        if look {
            "its look for deletion marks"
        } else {
            "its upload"
        }
    ));
    c.converge(
        log,
        m,
        n,
        None,
        fault,
        |p| match look {
            true => match p.engine.drop_copies_marked_deleted() {
                true => Ok(()),
                false => Err(tonic::Status::unavailable("the repository could not tell")),
            },
            false => p.engine.upload_step(&snap).map_err(tonic::Status::from),
        },
        ok,
    )
    .expect("converged");
    assert!(
        c.procs[n].engine.snapshot(&snap).is_none(),
        "n{n} keeps {copy}, the copy of forgotten {backup}"
    );
    let id = BackupId::parse(&backup).expect("backup id");
    assert!(
        c.procs[NODES]
            .engine
            .backups()
            .find(&id)
            .expect("the repository answers")
            .is_none(),
        "{backup}, forgotten while n{n} was away, is back in the repository"
    );
    m.doomed.remove(copy);
}

fn cut(c: &mut Cluster, m: &mut Model, rng: &mut Rng, vol: &str, faulted: bool, log: &mut Vec<String>) {
    let v = m.vols[vol].clone();
    let at = c.controller(v.home, rng);
    if !m.repository_made {
        // The controller initialises the repository at the first backup.
        c.procs[NODES]
            .engine
            .backups()
            .open_or_init(&repository(), true)
            .expect("the repository is initialised");
        m.repository_made = true;
    }
    let name = format!("backup-{}", m.next);
    m.next += 1;
    let keep_local = rng.chance(40);
    let fault = draw_fault(rng, faulted, |e| {
        [
            Fault::Crash("create-snapshot:before-record"),
            Fault::Point("record:write", e),
            Fault::Point("copy:data", e),
        ]
    });
    log.push(format!(
        "back up {vol} as {name}{} through {}",
        if keep_local { ", kept locally" } else { "" },
        c.procs[at].label
    ));
    let req = BackupRequest {
        repository: repository(),
        keep_local,
    };
    let id = vid(&v.id);
    let rec = c
        .converge(
            log,
            m,
            at,
            Some(vol),
            fault,
            |p| {
                p.engine
                    .create_backup(&name, &id, false, &req)
                    .map_err(tonic::Status::from)
            },
            ok,
        )
        .expect("converged");
    assert_eq!(rec.source_volume_id.to_string(), v.id, "{name} names its source");
    let mark = rec.backup.clone().expect("a backup's snapshot is marked as one");
    assert!(!mark.uploaded, "{name}: nothing uploads in this process but the tester");
    m.backups.insert(
        name,
        Bk {
            id: mark.id.to_string(),
            snap: rec.id.to_string(),
            source: v.id.clone(),
            home: v.home,
            layout: v.layout,
            bytes: rec.size_bytes.max(v.bytes),
            marker: v.marker.clone(),
            block: v.block,
            keep_local,
            uploaded: false,
        },
    );
}

fn upload(c: &mut Cluster, m: &mut Model, rng: &mut Rng, name: &str, faulted: bool, log: &mut Vec<String>) {
    let b = m.backups[name].clone();
    let at = owner(b.home, rng);
    let fault = draw_fault(rng, faulted, |e| {
        [
            Fault::Crash("backup:before-upload"),
            Fault::Crash("backup:after-upload"),
            Fault::Crash("backup:checked-copy-written"),
            Fault::Crash("backup:before-mark"),
            Fault::Point("record:write", e),
        ]
    });
    log.push(format!("upload {name} on {}", c.procs[at].label));
    let snap = SnapshotId::parse(&b.snap).expect("snapshot id");
    c.converge(
        log,
        m,
        at,
        None,
        fault,
        |p| p.engine.upload_step(&snap).map_err(tonic::Status::from),
        ok,
    )
    .expect("converged");
    m.backups.get_mut(name).expect("backup").uploaded = true;
    // The repository holds it, naming its source; a replica (another process) sees it.
    let replica = NODES + rng.below(REPLICAS);
    let found = c.procs[replica]
        .engine
        .backups()
        .find(&backup_id(&b))
        .expect("the repository answers")
        .unwrap_or_else(|| panic!("{name} is not in the repository once uploaded"));
    assert_eq!(found.meta.source_volume_id, b.source, "{name} names its source");
    assert_eq!(found.meta.name, name, "{name} is stored under its CSI name");
}

/// The layout a restore of `b` into `home` makes: an image stays an image, a tree becomes either
/// tree layout the pool has.
fn restore_layout(b: &Bk, home: Home, rng: &mut Rng) -> Layout {
    match (b.layout, home) {
        (Layout::Image, _) => Layout::Image,
        (_, Home::Shared) => Layout::Dir,
        (_, Home::Node(_)) => *rng.pick(&[Layout::Dir, Layout::Btrfs]),
    }
}

fn restore_request(name: &str, b: &Bk, layout: Layout, home: Home, bytes: u64) -> NewVolume {
    let mut r = NewVolume::plain(name, Some(layout), bytes);
    r.source = Some(Source::Backup(backup_id(b)));
    if b.block {
        r.mode = crate::storage::record::VolumeMode::Block;
    }
    if home == Home::Shared {
        r.pool = Some(PoolName::parse(SHARE).expect("pool"));
    }
    r
}

fn restore(c: &mut Cluster, m: &mut Model, rng: &mut Rng, backup: &str, faulted: bool, log: &mut Vec<String>) {
    let b = m.backups[backup].clone();
    let home = match rng.below(3) {
        0 => Home::Shared,
        _ => Home::Node(rng.below(NODES)),
    };
    let layout = restore_layout(&b, home, rng);
    let name = format!("pvc-{}", m.next);
    m.next += 1;
    let bytes = b.bytes + MIB * rng.below(2) as u64;
    let at = c.controller(home, rng);
    log.push(format!(
        "restore {backup} as {name} {layout:?} {bytes} in {home:?} through {}",
        c.procs[at].label
    ));
    let fault = faulted.then(|| create_faults(rng, layout, true));
    let rec = c
        .converge(
            log,
            m,
            at,
            None,
            fault,
            |p| {
                p.engine
                    .create_volume(restore_request(&name, &b, layout, home, bytes))
                    .map_err(tonic::Status::from)
            },
            ok,
        )
        .expect("converged");
    assert_eq!(rec.name, name);
    let what = format!("restore of backup {}", b.id);
    let made = NewVol {
        layout,
        home,
        policy: DeletePolicy::Delete,
        holds: &b.marker,
        what: &what,
    };
    made.take(&c.procs[at], m, &rec);
}

/// DeleteSnapshot of a backup, as the controller does it: every process forgets its local copy
/// (one of them with the fault), then a replica writes the deletion mark when the repository does
/// not hold the backup yet, and forgets it there.
fn forget(c: &mut Cluster, m: &mut Model, rng: &mut Rng, name: &str, faulted: bool, log: &mut Vec<String>) {
    let b = m.backups[name].clone();
    let id = backup_id(&b);
    let faulted_at = rng.below(c.procs.len());
    let mut fault = faulted.then(|| rng.pick(&DELETE_FAULTS).clone());
    // Sometimes the node holding the copy cannot be told (it is down): the controller goes on
    // without it and writes a deletion mark, which the node must honour once it is back.
    let away = match b.home {
        Home::Node(n) if rng.chance(30) => Some(n),
        _ => None,
    };
    // Counted, not drawn, so that every seed draws what it drew before.
    m.aways += usize::from(away.is_some());
    let unreached = away.is_some() && m.aways % 2 == 1;
    log.push(format!(
        "forget {name} ({}){}",
        b.id,
        away.map(|n| format!(
            " while n{n} is away ({})",
            if unreached { "unreachable" } else { "not asked" }
        ))
        .unwrap_or_default()
    ));
    let mut held = false;
    let mut told = Vec::new();
    for at in 0..c.procs.len() {
        if Some(at) == away {
            continue;
        }
        told.push(c.procs[at].engine.node().clone());
        let f = if at == faulted_at { fault.take() } else { None };
        held |= c
            .converge(
                log,
                m,
                at,
                None,
                f,
                |p| p.engine.forget_local_backup(&id).map_err(tonic::Status::from),
                ok,
            )
            .expect("converged");
    }
    // The repository's part has no fault of its own: rustic writes it, not `sys`.
    let replica = NODES + rng.below(REPLICAS);
    c.converge(
        log,
        m,
        replica,
        None,
        None,
        |p| forget_stored(p, &id, unreached, &told, held).map_err(tonic::Status::from),
        ok,
    )
    .expect("converged");
    m.backups.remove(name);
    if let Some(n) = away {
        m.doomed.insert(b.snap.clone(), (n, b.id.clone()));
    }
    assert!(
        c.procs[rng.below(c.procs.len())]
            .engine
            .backups()
            .find(&id)
            .expect("the repository answers")
            .is_none(),
        "{name} is still in the repository once forgotten"
    );
    // A restore of it is NOT_FOUND and makes nothing. (Not asked of the node that was away: it
    // still holds its copy until it is back, and the controller's check of the repository, not
    // the engine, refuses a restore of a backup the repository does not hold.)
    let home = Home::Node(match away {
        Some(n) => (n + 1) % NODES,
        None => rng.below(NODES),
    });
    let layout = restore_layout(&b, home, rng);
    let r = c.procs[c.controller(home, rng)]
        .engine
        .create_volume(restore_request("pvc-forgotten", &b, layout, home, b.bytes))
        .map_err(tonic::Status::from);
    assert_eq!(
        r.as_ref().err().map(|s| s.code()),
        Some(Code::NotFound),
        "a restore of forgotten {name}: {}",
        brief(&r)
    );
}

/// The repository's part of a forget, as the controller does it: a deletion mark first when
/// [`crate::backup::delete_needs_mark`] says so (a node could not be reached, `unreached`; the
/// node that cut the stored backup is not among those `told`; or the repository does not hold
/// the backup yet and no node answered that it `held` a part), then the forget.
fn forget_stored(p: &Proc, id: &BackupId, unreached: bool, told: &[NodeId], held: bool) -> Result<(), StorageError> {
    let backups = p.engine.backups();
    let stored = backups.find(id)?;
    if crate::backup::delete_needs_mark(stored.as_ref(), unreached, |n| told.contains(n), held) {
        backups.mark_deleted(id)?;
    }
    backups.forget(id)
}

/// A prune through a replica, then every backup the model holds uploaded restores its data (into
/// a scratch volume, deleted at once): a prune never takes what a live backup needs.
fn prune(c: &mut Cluster, m: &mut Model, rng: &mut Rng, faulted: bool, log: &mut Vec<String>) {
    if !m.repository_made {
        return;
    }
    let at = NODES + rng.below(REPLICAS);
    log.push(format!("prune through {}", c.procs[at].label));
    let fault = faulted.then_some(Fault::Crash("backup:prune-planned"));
    c.converge(
        log,
        m,
        at,
        None,
        fault,
        |p| {
            p.engine
                .backups()
                .prune(&repository(), Duration::ZERO)
                .map(drop)
                .map_err(tonic::Status::from)
        },
        ok,
    )
    .expect("converged");
    let live: Vec<Bk> = m.backups.values().filter(|b| b.uploaded).cloned().collect();
    for b in live {
        // From a node that holds no local copy of it: the repository's data, not the copy.
        let home = Home::Node(match b.home {
            Home::Node(n) => (n + 1) % NODES,
            Home::Shared => rng.below(NODES),
        });
        let layout = restore_layout(&b, home, rng);
        let p = &c.procs[c.controller(home, rng)];
        let rec = p
            .engine
            .create_volume(restore_request("pvc-after-prune", &b, layout, home, b.bytes))
            .unwrap_or_else(|e| panic!("{} does not restore after a prune: {e}", b.id));
        let (_, data) = p.engine.volume_data(&rec.id).expect("data");
        assert_eq!(
            read_marker(layout, &data),
            b.marker,
            "{} restores its data after a prune",
            b.id
        );
        p.engine.delete_volume(&rec.id).expect("the scratch volume goes");
    }
}

/// The local copies every process must hold, and those it may: a backup not yet uploaded, or kept
/// locally, has its snapshot (record and data); an uploaded image backup's copy may stay as its
/// source volume's base (at most one per volume, none once the volume is deleted); no other.
pub(super) fn check_copies(p: &Proc, m: &Model, sees: impl Fn(Home) -> bool, plain: &BTreeSet<String>) {
    let copies: BTreeMap<String, crate::storage::record::SnapshotRecord> = p
        .engine
        .snapshots()
        .into_iter()
        .filter(|r| !plain.contains(&r.id.to_string()))
        .map(|r| (r.id.to_string(), r))
        .collect();
    let mut bases: BTreeMap<String, usize> = BTreeMap::new();
    for (name, b) in m.backups.iter().filter(|(_, b)| sees(b.home)) {
        let held = copies.get(&b.snap);
        if !b.uploaded || b.keep_local {
            let rec = held.unwrap_or_else(|| panic!("{}: {name}'s local copy is gone", p.label));
            assert_eq!(
                rec.source_volume_id.to_string(),
                b.source,
                "{name}'s copy names its source"
            );
            let mark = rec.backup.as_ref().expect("a backup's copy is marked");
            assert_eq!(mark.id.to_string(), b.id, "{name}'s copy names its backup");
        } else if held.is_some() {
            assert_eq!(b.layout, Layout::Image, "{}: {name}, uploaded, keeps its copy", p.label);
            assert!(
                m.vols.values().any(|v| v.id == b.source),
                "{}: {name}'s copy stays as the base of a deleted volume",
                p.label
            );
            *bases.entry(b.source.clone()).or_default() += 1;
        }
    }
    for (volume, n) in bases {
        assert!(n <= 1, "{}: {n} base copies of {volume}", p.label);
    }
    for (id, rec) in &copies {
        assert!(
            m.backups.values().any(|b| b.snap == *id) || m.doomed.contains_key(id),
            "{}: snapshot {id} of {} is no one's",
            p.label,
            rec.source_volume_id
        );
    }
}

/// The btrfs subvolumes a process's backup copies hold (those of forgotten backups waiting for
/// their node included).
pub(super) fn btrfs_copies(p: &Proc, m: &Model) -> usize {
    let copies = copy_ids(m);
    p.engine
        .snapshots()
        .iter()
        .filter(|r| r.layout == Layout::Btrfs && copies.contains(&r.id.to_string()))
        .count()
}

/// The snapshot ids of every local copy of a backup the model knows: of live backups, and of
/// forgotten ones whose node was away.
pub(super) fn copy_ids(m: &Model) -> BTreeSet<String> {
    m.backups
        .values()
        .map(|b| b.snap.clone())
        .chain(m.doomed.keys().cloned())
        .collect()
}

/// The end of a backup seed: every backup forgotten, the repository pruned, and nothing left in
/// it (no backup, no upload pending its check).
pub(super) fn forget_all(c: &mut Cluster, m: &mut Model, rng: &mut Rng, log: &mut Vec<String>) {
    let names: Vec<String> = m.backups.keys().cloned().collect();
    for name in names {
        forget(c, m, rng, &name, false, log);
        check(c, m);
    }
    let copies: Vec<String> = m.doomed.keys().cloned().collect();
    for copy in copies {
        back(c, m, rng, &copy, false, log);
        check(c, m);
    }
    if !m.repository_made {
        return;
    }
    let backups = c.procs[NODES].engine.backups().clone();
    match backups.list_all(&repository()) {
        Ok(left) => assert!(left.is_empty(), "the repository still lists {left:?}"),
        Err(e) => panic!("the repository cannot be listed at the end: {e}"),
    }
    backups.prune(&repository(), Duration::ZERO).expect("prune");
}
