//! Group snapshots: snapshots of several volumes of this node cut at one point in time.
//!
//! Order of a cut, each step converging after a crash:
//! 1. lock the group's name, every member volume and every member snapshot's name;
//! 2. remove what a failed attempt of this very group left (member snapshots whose record names
//!    this group while the group has no record): removed, never adopted (invariant 2);
//! 3. freeze every mounted filesystem of the members ([`Barrier`]), cut every member, thaw; a cut
//!    that fails or outlives the freeze deadline drops every member it made;
//! 4. write each member's snapshot record (naming the group), then the group's record. The group
//!    exists once its record does; a crash before leaves members the retry removes in step 2.
//!
//! Delete removes the members first, then the group's record: a crash in between leaves a group
//! whose retried delete finishes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{lock, now, LocalEngine, Source};
use crate::crash;
use crate::storage::freeze::Barrier;
use crate::storage::id::{GroupId, Key, ObjectId, SnapshotId, VolumeId};
use crate::storage::layout;
use crate::storage::pool::{Kind, Pool};
use crate::storage::record::{GroupMember, GroupRecord, SnapshotRecord, RECORD_VERSION};
use crate::storage::StorageError;
use crate::sys::files;
use crate::sys::filesystems::FreezePoint;

/// The start of the name of a freeze mark in a pool's `groups/` (never a record: keys never
/// start with '.').
const FROZEN_MARK: &str = ".frozen-";

/// A CreateVolumeGroupSnapshot request, parsed and validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroup {
    pub name: String,
    /// Distinct, in id order.
    pub members: Vec<VolumeId>,
    /// The class's parameters, kept in the record (a repeat must name the same).
    pub parameters: BTreeMap<String, String>,
    /// The caller accepts members that are each consistent on their own (dir, btrfs, raw block).
    pub per_volume: bool,
    /// How long the members' filesystems may stay frozen.
    pub freeze_timeout: Duration,
}

fn list<'a>(ids: impl IntoIterator<Item = &'a VolumeId>) -> String {
    ids.into_iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Whether a repeated request names the group that exists (OK) or another one (ALREADY_EXISTS).
fn same_group(existing: &GroupRecord, req: &NewGroup) -> Result<(), StorageError> {
    let members: Vec<&VolumeId> = existing.members.iter().map(|m| &m.volume_id).collect();
    if !same_volumes(existing, &req.members) {
        return Err(StorageError::Conflict(format!(
            "group snapshot '{}' already exists with the volumes {}, not {}",
            req.name,
            list(members),
            list(req.members.iter())
        )));
    }
    if existing.parameters != req.parameters {
        return Err(StorageError::Conflict(format!(
            "group snapshot '{}' already exists with other parameters",
            req.name
        )));
    }
    Ok(())
}

/// Whether a group's members are the volumes `asked`, in whatever order either lists them (a
/// record of a group spanning nodes written by an earlier release lists them in the order of
/// their ids' text).
pub fn same_volumes(existing: &GroupRecord, asked: &[VolumeId]) -> bool {
    let had: std::collections::BTreeSet<&VolumeId> = existing.members.iter().map(|m| &m.volume_id).collect();
    had.len() == existing.members.len() && had == asked.iter().collect()
}

/// One member of a group being cut: its volume and snapshot locked, its source read.
struct Member<'a> {
    volume: &'a VolumeId,
    pool: &'a Pool,
    snapshot: SnapshotId,
    from: super::SourceData,
    _held: crate::storage::locks::Held,
    /// The room its copy takes, for an image (invariant 3), until its record is written.
    _promised: Option<super::capacity::Promise<'a>>,
}

/// The CSI name of a member snapshot: the group's name and the volume's key.
fn member_name(group: &str, volume: &VolumeId) -> String {
    format!("{group}-{}", volume.0.key.as_str())
}

/// The id of the member snapshot of `volume` in the group named `group`: beside its volume, named
/// by [`member_name`]. Whoever undoes a failed cut can name every member a part may have made,
/// also one whose answer never came back.
pub fn member_snapshot_id(group: &str, volume: &VolumeId) -> SnapshotId {
    SnapshotId(ObjectId {
        location: volume.0.location.clone(),
        pool: volume.0.pool.clone(),
        key: Key::from_name(&member_name(group, volume)),
    })
}

/// Mount points a freeze of this process holds, or is about to take, registered for as long as
/// it lives ([`LocalEngine::mark_frozen`]).
pub(super) struct LiveFreeze<'a> {
    live: &'a std::sync::Mutex<Vec<PathBuf>>,
    points: Vec<PathBuf>,
}

impl<'a> LiveFreeze<'a> {
    fn hold(live: &'a std::sync::Mutex<Vec<PathBuf>>, points: Vec<PathBuf>) -> LiveFreeze<'a> {
        lock(live).extend(points.iter().cloned());
        LiveFreeze { live, points }
    }
}

impl Drop for LiveFreeze<'_> {
    fn drop(&mut self) {
        let mut live = lock(self.live);
        for p in &self.points {
            if let Some(i) = live.iter().position(|l| l == p) {
                live.swap_remove(i);
            }
        }
    }
}

impl LocalEngine {
    fn group_id(&self, pool: &Pool, key: &Key) -> GroupId {
        GroupId(ObjectId {
            location: self.location_of(&pool.config.name),
            pool: pool.config.name.clone(),
            key: key.clone(),
        })
    }

    /// Cuts a group snapshot of volumes of this node, or returns the one made under that name.
    pub fn create_group(&self, req: &NewGroup) -> Result<GroupRecord, StorageError> {
        let home = req
            .members
            .first()
            .ok_or_else(|| StorageError::Unsupported("a group snapshot needs at least one volume".into()))?;
        let pool = self
            .locate_for_call(&home.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(home.to_string()))?;
        let key = Key::from_name(&req.name);
        let id = self.group_id(pool, &key);
        let shown = id.to_string();
        let _group_held = self.take(Kind::Snapshot, &pool.config.name, &Key::from_name(&shown), &shown)?;
        if let Some(existing) = self.group_named(&req.name)? {
            same_group(&existing, req)?;
            return Ok(existing);
        }
        let cuts = req
            .members
            .iter()
            .map(|v| self.prepare_member(req, &shown, v))
            .collect::<Result<Vec<_>, _>>()?;
        let at = self.cut_frozen(pool, &cuts, req.freeze_timeout, || Ok(()))?;

        crash::point("group:before-records");
        let members = self
            .record_members(&req.name, &id, &cuts, at)?
            .into_iter()
            .map(|s| GroupMember {
                volume_id: s.source_volume_id,
                snapshot_id: s.id,
                size_bytes: s.size_bytes,
            })
            .collect();
        crash::point("group:before-group-record");
        let rec = GroupRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            id,
            members,
            parameters: req.parameters.clone(),
            created_unix_secs: at.0,
            created_nanos: at.1,
        };
        if let Err(e) = self.store.put_group(pool, &key, &rec) {
            // The record may be there though its write failed (its directory's fsync, or a share
            // whose rename answer was lost): it goes first, so that no record ever names a
            // removed member. If it cannot, everything stays: a whole group, or members without
            // a record that the retry removes.
            if let Err(left) = self.store.remove_group(pool, &key) {
                tracing::warn!(group = %rec.id, error = %left, "could not make sure a failed group snapshot left no record; its members stay for the retry");
                return Err(e);
            }
            self.undo_members(&cuts);
            return Err(e);
        }
        Ok(rec)
    }

    /// Cuts this node's members of a group whose members live on several nodes (`req.members` are
    /// this node's): locks and prepares them, freezes them, then asks `together` whether every
    /// other node has frozen its members too, and only then cuts them and thaws. A `together` that
    /// says no (another part failed, or the controller went away) cuts nothing and answers ABORTED.
    /// Writes the members' snapshot records, naming the group `id`; the group's own record is
    /// written by the controller on the group's home node once every part is cut
    /// ([`LocalEngine::put_group`]).
    pub fn cut_group_part(
        &self,
        id: &GroupId,
        req: &NewGroup,
        together: impl FnOnce() -> bool,
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        let first = req
            .members
            .first()
            .ok_or_else(|| StorageError::Unsupported("a part of a group snapshot needs a volume".into()))?;
        let pool = self
            .locate_for_call(&first.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(first.to_string()))?;
        let shown = id.to_string();
        let cuts = req
            .members
            .iter()
            .map(|v| self.prepare_member(req, &shown, v))
            .collect::<Result<Vec<_>, _>>()?;
        let at = self.cut_frozen(pool, &cuts, req.freeze_timeout, || match together() {
            true => Ok(()),
            false => Err(StorageError::Aborted(format!(
                "group snapshot {shown}: another node's members did not freeze in time (or its cut \
                 failed); nothing was cut here"
            ))),
        })?;
        crash::point("group-part:before-records");
        self.record_members(&req.name, id, &cuts, at)
    }

    /// Writes the snapshot record of every member cut `at`, each naming the group `id`.
    fn record_members(
        &self,
        group: &str,
        id: &GroupId,
        cuts: &[Member<'_>],
        at: (i64, i32),
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        let mut records = Vec::with_capacity(cuts.len());
        for c in cuts {
            let name = member_name(group, c.volume);
            let rec = c
                .from
                .snapshot_record(&name, &c.snapshot, c.volume, at, Some(id.clone()));
            if let Err(e) = self.store.put_snapshot(c.pool, &c.snapshot.0.key, &rec) {
                self.undo_members(cuts);
                return Err(e);
            }
            records.push(rec);
        }
        Ok(records)
    }

    /// Removes every member a failed cut made, records and data, so that a group snapshot is made
    /// whole or not at all (a caller that gives up never retries). What cannot be removed now is
    /// the retry's: it replaces a member it finds.
    fn undo_members(&self, cuts: &[Member<'_>]) {
        for c in cuts {
            let shown = c.snapshot.to_string();
            if let Err(e) = self.remove_object(c.pool, Kind::Snapshot, &c.snapshot.0.key, &shown) {
                tracing::warn!(snapshot = %shown, error = %e, "could not drop a member of a failed group snapshot; its retry will");
            }
        }
    }

    /// Writes the record of a group whose members (on several nodes) are all cut, in this node's
    /// pool that its id names; the same record again is OK.
    pub fn put_group(&self, rec: &GroupRecord) -> Result<(), StorageError> {
        let pool = self
            .locate_for_call(&rec.id.0)?
            .ok_or_else(|| StorageError::WrongNode {
                pool: rec.id.0.pool.as_str().to_string(),
                owner: rec.id.0.node().map(|n| n.as_str().to_string()).unwrap_or_default(),
            })?;
        let shown = rec.id.to_string();
        let _held = self.take(Kind::Snapshot, &rec.id.0.pool, &Key::from_name(&shown), &shown)?;
        if let Some(existing) = self.store.group(pool, &rec.id.0.key)? {
            if existing != *rec {
                return Err(StorageError::Conflict(format!(
                    "group snapshot {shown} already exists with other members"
                )));
            }
            return Ok(());
        }
        // Until the record is written, a member here has no group to keep it (it counts as
        // one a group's delete left) and may be deleted alone while the other nodes still cut:
        // each is locked and must still be the group's, so that no record names a removed one.
        let mut held = Vec::new();
        for m in &rec.members {
            let sid = &m.snapshot_id;
            if self.locate(&sid.0).is_none() {
                continue; // another node's: checked there before it answered its part
            }
            held.push(self.take(Kind::Snapshot, &sid.0.pool, &sid.0.key, &sid.to_string())?);
            if self.snapshot(sid).is_none_or(|s| s.group.as_ref() != Some(&rec.id)) {
                return Err(StorageError::Aborted(format!(
                    "member {sid} of group snapshot {shown} was deleted while the group was cut; \
                     nothing of the group is kept, and its retry cuts it again"
                )));
            }
        }
        self.store.put_group(pool, &rec.id.0.key, rec)
    }

    /// Deletes this node's members of a group (part of deleting a group that spans nodes, or of
    /// undoing a cut that failed elsewhere): each named snapshot that says it belongs to `id`.
    pub fn delete_group_part(&self, id: &GroupId, members: &[SnapshotId]) -> Result<(), StorageError> {
        for sid in members {
            let Some(pool) = self.locate_for_call(&sid.0)? else {
                continue;
            };
            let shown = sid.to_string();
            let _held = self.take(Kind::Snapshot, &sid.0.pool, &sid.0.key, &shown)?;
            match self.snapshot(sid) {
                Some(rec) if rec.group.as_ref() == Some(id) => {
                    self.remove_object(pool, Kind::Snapshot, &sid.0.key, &shown)?;
                }
                Some(_) => {}
                // Gone, or unreadable: then refused, as `delete_group` refuses (the group's record
                // must not go while a member it names may still hold data).
                None => layout::refuse_unread_record(pool, Kind::Snapshot, &sid.0.key, Some(&shown))?,
            }
        }
        Ok(())
    }

    /// Locks one member (its volume and its snapshot's name), removes what a failed attempt of this
    /// group left under that name, and checks that the member can be cut as the request asks.
    fn prepare_member<'a>(&'a self, req: &NewGroup, group: &str, v: &'a VolumeId) -> Result<Member<'a>, StorageError> {
        let pool = self
            .locate_for_call(&v.0)?
            .ok_or_else(|| StorageError::VolumeNotFound(v.to_string()))?;
        let snapshot = member_snapshot_id(&req.name, v);
        let held = self.take(Kind::Snapshot, &snapshot.0.pool, &snapshot.0.key, &snapshot.to_string())?;
        if let Some(old) = self.snapshot(&snapshot) {
            if old.group.as_ref().map(ToString::to_string).as_deref() != Some(group) {
                return Err(StorageError::Conflict(format!(
                    "snapshot name '{}' (member of group snapshot '{}') is taken by snapshot {}",
                    member_name(&req.name, v),
                    req.name,
                    old.id
                )));
            }
            // A member a failed attempt of this group left: never adopted.
            self.remove_object(pool, Kind::Snapshot, &snapshot.0.key, &snapshot.to_string())?;
            tracing::info!(snapshot = %snapshot, group, "removed a member a failed group snapshot left");
        }
        let from = self.source_data(&Source::Volume(v.clone()))?;
        let promised = self.promise_copy(pool, &from, v)?;
        let together = layout::of(from.layout).cuts_together(from.mode);
        if !req.per_volume && !together {
            return Err(StorageError::NotTogether(format!(
                "volume {v} ({} {:?}) cannot be snapshotted at one point in time with other volumes; \
                 set parameter 'consistency: per-volume' in the VolumeGroupSnapshotClass to accept \
                 snapshots that are each consistent on their own",
                from.layout.as_str(),
                from.mode
            )));
        }
        if together {
            self.refuse_held_elsewhere(
                pool,
                v,
                "a group snapshot",
                "hold this volume at one point in time with the others",
            )?;
        }
        Ok(Member {
            volume: v,
            pool,
            snapshot,
            from,
            _held: held,
            _promised: promised,
        })
    }

    /// Freezes every member's mounted filesystem, copies every member, thaws; returns the time of
    /// the cut. A copy that fails, or a cut that outlives `within`, drops every member it made.
    /// `go` runs once everything is frozen and before anything is cut: a part of a group spanning
    /// several nodes waits there for every other node to have frozen its members.
    fn cut_frozen(
        &self,
        pool: &Pool,
        cuts: &[Member<'_>],
        within: Duration,
        go: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(i64, i32), StorageError> {
        let mut points = Vec::new();
        for c in cuts {
            points.extend(layout::of(c.from.layout).freeze_points(&pool.sys, &c.from.path)?);
        }
        let (marker, _live) = self.mark_frozen(pool, &points)?;
        let barrier = match Barrier::freeze(&pool.sys.filesystems, points, within) {
            Ok(b) => b,
            Err(failed) => {
                // Nothing stayed frozen: the mark goes (else every retry left one, and the next
                // start would thaw what another froze since, on purpose).
                if let Some(m) = marker.as_ref().filter(|_| !failed.stuck) {
                    if let Err(e) = pool.sys.files.remove_file_if_exists(m) {
                        tracing::warn!(error = %e, "could not remove a freeze mark; the next start removes it");
                    }
                }
                return Err(failed.error);
            }
        };
        let at = now();
        crash::point("group:frozen");
        let mut made = Vec::new();
        let mut cut = go();
        for c in cuts {
            // Past the deadline the members are not one point in time: none is cut in vain.
            if cut.is_err() || barrier.expired() {
                break;
            }
            let key = &c.snapshot.0.key;
            cut = layout::create_copy(c.pool, Kind::Snapshot, key, c.from.layout, &c.from.path, false, false);
            if cut.is_ok() {
                made.push((c.pool, key));
            }
        }
        let released = barrier.release();
        // A filesystem that stayed frozen keeps its mark: the next start tries its thaw again.
        let stuck = matches!(&released, Err(StorageError::Sys(_)));
        if let Some(Err(e)) = marker
            .as_ref()
            .filter(|_| !stuck)
            .map(|m| pool.sys.files.remove_file_if_exists(m))
        {
            tracing::warn!(error = %e, "could not remove a freeze mark; the next start removes it");
        }
        if let Err(e) = cut.and(released) {
            for (p, k) in made {
                if let Err(left) = layout::clear_leftover(p, Kind::Snapshot, k) {
                    tracing::warn!(error = %left, "could not drop a member of a failed group snapshot; its retry will");
                }
            }
            return Err(e);
        }
        Ok(at)
    }

    /// Writes down the filesystems a cut is about to freeze (`<pool>/groups/.frozen-<node>-<uuid>`):
    /// the barrier thaws them whatever the cut does, but not when this process is killed mid-cut
    /// (SIGKILL, OOM); then its next start thaws them ([`LocalEngine::thaw_left_frozen`]). The
    /// points count as held by this process for as long as the answered [`LiveFreeze`] lives: a
    /// pool opening late does not thaw them for its own marks.
    pub(super) fn mark_frozen(
        &self,
        pool: &Pool,
        points: &[FreezePoint],
    ) -> Result<(Option<PathBuf>, LiveFreeze<'_>), StorageError> {
        let live = LiveFreeze::hold(
            &self.live_freezes,
            points.iter().map(|p| p.mountpoint.clone()).collect(),
        );
        if points.is_empty() {
            return Ok((None, live));
        }
        let marker = pool.groups_dir().join(format!(
            "{FROZEN_MARK}{}-{}",
            self.node.as_str(),
            uuid::Uuid::new_v4().simple()
        ));
        let text: Vec<String> = points.iter().map(|p| p.mountpoint.display().to_string()).collect();
        // A reboot thaws everything: the mark need only outlive the process.
        pool.sys
            .files
            .write_atomic(&marker, text.join("\n").as_bytes(), files::Durability::ProcessCrash)?;
        Ok((Some(marker), live))
    }

    /// Thaws the filesystems a cut of this node (a group's, or a consistent snapshot's) froze when
    /// the process was killed before it could thaw them, and drops their marks. Run at start,
    /// before any call is served, and for a pool that opens later, when a cut of this process may
    /// be running: a mount point it holds frozen is left to it.
    pub(super) fn thaw_left_frozen(&self) {
        for pool in self.pools.values() {
            self.thaw_left_frozen_in(pool);
        }
    }

    /// [`LocalEngine::thaw_left_frozen`] for one pool (one that opens after the start, before any
    /// call can see it).
    pub(super) fn thaw_left_frozen_in(&self, pool: &Pool) {
        // `<mark><node>-<32 hex>`: the name of a node that begins with this node's name and a
        // dash (node-1 and node-1-b) is not this node's.
        let prefix = format!("{FROZEN_MARK}{}-", self.node.as_str());
        let mine = |name: &str| {
            name.strip_prefix(&prefix)
                .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        let dir = pool.groups_dir();
        let Ok(entries) = pool.sys.files.list_dir(&dir) else {
            return;
        };
        // Held while thawing: a cut registers its points here before it freezes them.
        let live = lock(&self.live_freezes);
        for path in entries {
            if !path.file_name().is_some_and(|n| mine(&n.to_string_lossy())) {
                continue;
            }
            let listed = pool
                .sys
                .files
                .read_optional(&path)
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            for m in listed.lines().filter(|l| !l.is_empty()) {
                if live.iter().any(|p| p == Path::new(m)) {
                    tracing::info!(
                        mountpoint = m,
                        "a freeze mark names a filesystem a cut running now holds: left to it"
                    );
                    continue;
                }
                match crate::sys::filesystems::thaw_path_persistently(pool.sys.filesystems.as_ref(), Path::new(m)) {
                    Ok(()) => tracing::warn!(
                        mountpoint = m,
                        "thawed a filesystem a killed group snapshot left frozen"
                    ),
                    Err(err) => {
                        tracing::error!(mountpoint = m, error = %err, "could not thaw a filesystem a killed group snapshot left frozen")
                    }
                }
            }
            if let Err(err) = pool.sys.files.remove_file_if_exists(&path) {
                tracing::warn!(path = %path.display(), error = %err, "could not remove a freeze mark");
            }
        }
    }

    /// A volume of a shared pool is frozen only where it is mounted: one staged on another node
    /// (which holds its lease) cannot be frozen from here, for `what` (a group snapshot, a
    /// consistent snapshot), which then could not `achieve`.
    pub(super) fn refuse_held_elsewhere(
        &self,
        pool: &Pool,
        v: &VolumeId,
        what: &str,
        achieve: &str,
    ) -> Result<(), StorageError> {
        if !pool.shared() {
            return Ok(());
        }
        let Some(bytes) = pool.sys.files.read_optional(&pool.lease_path(&v.0.key))? else {
            return Ok(());
        };
        let holder = serde_json::from_slice::<crate::storage::lease::LeaseFile>(&bytes)
            .map(|l| l.node)
            .unwrap_or_else(|_| "<unreadable lease>".into());
        if holder == self.node.as_str() {
            return Ok(());
        }
        Err(StorageError::NotTogether(format!(
            "volume {v} is staged on node {holder}; {what} freezes filesystems on the node that cuts it \
             ({}), so it cannot {achieve}",
            self.node.as_str()
        )))
    }

    /// Deletes a group snapshot with its members; a group already gone is OK.
    pub fn delete_group(&self, id: &GroupId) -> Result<(), StorageError> {
        let Some(pool) = self.locate_for_call(&id.0)? else {
            return Ok(());
        };
        let shown = id.to_string();
        let _held = self.take(Kind::Snapshot, &id.0.pool, &Key::from_name(&shown), &shown)?;
        let Some(rec) = self.store.group(pool, &id.0.key)?.filter(|r| r.id == *id) else {
            return Ok(());
        };
        // Every member of this node locked and checked before any is removed: one that is busy (a
        // restore's source) or whose record cannot be read refuses the delete with nothing
        // removed, rather than leave a group that answers as ready with members gone.
        let mut held = Vec::new();
        for m in &rec.members {
            let sid = &m.snapshot_id;
            let Some(mpool) = self.locate_for_call(&sid.0)? else {
                continue;
            };
            let shown = sid.to_string();
            let lock = self.take(Kind::Snapshot, &sid.0.pool, &sid.0.key, &shown)?;
            match self.snapshot(sid) {
                // After a delete that stopped half way, a member's id may since name a snapshot cut
                // on its own under the member's name: not the group's to remove.
                Some(r) if r.group.as_ref() != Some(id) => {
                    tracing::warn!(group = %id, snapshot = shown.as_str(), name = r.name.as_str(), "a member's id names a snapshot outside the group; left");
                    continue;
                }
                Some(_) => {}
                // Gone (what is left of it, in the trash, goes below) or unreadable (refused).
                None => layout::refuse_unread_record(mpool, Kind::Snapshot, &sid.0.key, Some(&shown))?,
            }
            held.push((mpool, sid, shown, lock));
        }
        for (mpool, sid, shown, _lock) in &held {
            self.remove_object(mpool, Kind::Snapshot, &sid.0.key, shown)?;
        }
        crash::point("delete-group:before-record");
        self.store.remove_group(pool, &id.0.key)
    }

    /// A group snapshot's record.
    pub fn group(&self, id: &GroupId) -> Result<Option<GroupRecord>, StorageError> {
        let Some(pool) = self.locate_for_call(&id.0)? else {
            return Ok(None);
        };
        Ok(self.store.group(pool, &id.0.key)?.filter(|r| r.id == *id))
    }

    /// The group snapshot made under a CSI name, in any pool here.
    pub fn group_named(&self, name: &str) -> Result<Option<GroupRecord>, StorageError> {
        let key = Key::from_name(name);
        for pool in self.pools.values() {
            if let Some(r) = self.store.group(pool, &key)?.filter(|r| r.name == name) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Why a snapshot cannot be deleted alone: it is a member of a group that still exists.
    pub(super) fn refuse_group_member(&self, rec: &SnapshotRecord) -> Result<(), StorageError> {
        let Some(group) = &rec.group else {
            return Ok(());
        };
        // A group recorded on another node (cut across nodes) cannot be checked here: refused.
        if self.locate(&group.0).is_some() && self.group(group)?.is_none() {
            return Ok(()); // a member its group's delete left behind
        }
        Err(StorageError::Unsupported(format!(
            "snapshot {} is a member of group snapshot {group} and cannot be deleted alone; \
             delete the group (DeleteVolumeGroupSnapshot)",
            rec.id
        )))
    }
}
