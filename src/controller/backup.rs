//! Snapshots that are backups (docs/backups.md), as the Controller service answers for them. A
//! backup's id names its repository, not a node: once uploaded, the repository answers for it
//! (ListSnapshots, GetSnapshot, a restore on any node) whether or not the node that cut it
//! exists. While it uploads, the node's record answers, `ready_to_use: false`.
//!
//! The controller reads and changes only the repository's snapshot list (and initialises a
//! repository on its first backup); the data goes between the nodes and the repository.

use std::sync::Arc;

use prost_types::Timestamp;

use super::{csi_snapshot, ControllerError, ControllerService};
use crate::agent::Agent;
use crate::backup::{BackupInfo, Backups};
use crate::csi::v1::Snapshot;
use crate::storage::engine::BackupRequest;
use crate::storage::id::{BackupId, NodeId, PoolName, VolumeId};
use crate::storage::record::SnapshotRecord;
use crate::storage::StorageError;

/// VolumeSnapshotClass parameters of backups.
pub const BACKUP_REPOSITORY: &str = "backupRepository";
pub const KEEP_LOCAL: &str = "keepLocal";

/// A backup the repository holds, as CSI shows it.
pub fn csi_backup(b: &BackupInfo) -> Snapshot {
    Snapshot {
        size_bytes: b.meta.capacity_bytes as i64,
        snapshot_id: b.id.to_string(),
        source_volume_id: b.meta.source_volume_id.clone(),
        creation_time: Some(Timestamp {
            seconds: b.created_unix_secs,
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// Runs a blocking repository call off the async runtime.
async fn blocking<T: Send + 'static>(
    backups: &Arc<Backups>,
    f: impl FnOnce(&Backups) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, ControllerError> {
    let b = backups.clone();
    tokio::task::spawn_blocking(move || f(&b))
        .await
        .map_err(|e| ControllerError::Storage(StorageError::Unavailable(format!("backup task failed: {e}"))))?
        .map_err(ControllerError::from)
}

impl ControllerService {
    /// CreateSnapshot with `backupRepository`: the same name answers the same backup, from the
    /// node while it uploads and from the repository once it is there.
    pub(super) async fn create_backup(
        &self,
        name: &str,
        source: VolumeId,
        agent: Arc<dyn Agent>,
        freeze: bool,
        req: BackupRequest,
    ) -> Result<Snapshot, ControllerError> {
        let repo = req.repository.clone();
        self.backups.config(&repo)?;
        // The node first: its record goes only after the repository holds the backup.
        if let Some(existing) = agent.snapshot_named(name.to_string()).await? {
            if existing.source_volume_id != source {
                return Err(ControllerError::NameTaken(format!(
                    "snapshot '{name}' already exists for volume {}, not {source}",
                    existing.source_volume_id
                )));
            }
        } else {
            let (r, n) = (repo.clone(), name.to_string());
            if let Some(done) = blocking(&self.backups, move |b| b.find_named(&r, &n)).await? {
                if done.meta.source_volume_id != source.to_string() {
                    return Err(ControllerError::NameTaken(format!(
                        "snapshot '{name}' already exists for volume {}, not {source}",
                        done.meta.source_volume_id
                    )));
                }
                return Ok(csi_backup(&done));
            }
            // The first backup into a repository initialises it (here only: nodes never do, so
            // two nodes cannot initialise one repository twice).
            let r = repo.clone();
            blocking(&self.backups, move |b| b.open_or_init(&r, true).map(drop)).await?;
        }
        let rec = agent
            .create_snapshot(name.to_string(), source.clone(), freeze, Some(req))
            .await?;
        self.check_backup_answer(&rec, agent.as_ref(), name, &source, &repo)
            .await?;
        Ok(csi_snapshot(&rec))
    }

    /// A node's answer to a backup's CreateSnapshot, checked before its id goes to the CO (whose
    /// DeleteSnapshot of that id forgets the backup the id names): a backup into the repository
    /// asked for, and one the repository either does not hold yet (uploading) or holds as this
    /// node's backup of this volume under this name. A node could otherwise hand out another
    /// node's backup id, and its owner's delete would forget that backup. The shared pools' agent
    /// (the controller's own engine, also all-in-one) is not asked to prove anything.
    async fn check_backup_answer(
        &self,
        rec: &SnapshotRecord,
        agent: &dyn Agent,
        name: &str,
        source: &VolumeId,
        repo: &PoolName,
    ) -> Result<(), ControllerError> {
        if self.directory.shared().is_some_and(|s| s.node() == agent.node()) {
            return Ok(());
        }
        let bad = |why: String| {
            ControllerError::Storage(StorageError::Sys(crate::sys::SysError::Tool {
                tool: format!("CreateSnapshot on node {}", agent.node().as_str()),
                status: "bad answer".into(),
                stderr: why,
            }))
        };
        let Some(mark) = &rec.backup else {
            return Err(bad(format!(
                "asked for a backup of '{name}', it answered a snapshot that is none"
            )));
        };
        if mark.id.repository() != repo {
            return Err(bad(format!(
                "asked for a backup into '{}', it answered {}",
                repo.as_str(),
                mark.id
            )));
        }
        let i = mark.id.clone();
        // Pending uploads count: a node that reads the repository could otherwise answer the id
        // of another node's backup in the moment before its check.
        if let Some(held) = blocking(&self.backups, move |b| b.find_even_pending(&i)).await? {
            let m = &held.meta;
            if m.node != agent.node().as_str() || m.source_volume_id != source.to_string() || m.name != name {
                return Err(bad(format!(
                    "it answered backup {} for '{name}' of {source}; the repository holds it as node {}'s backup '{}' of {}",
                    mark.id, m.node, m.name, m.source_volume_id
                )));
            }
        }
        Ok(())
    }

    /// Every backup of every repository, and the ids of those marked deleted (whose uploads
    /// may still run on their nodes: they are not listed either). A repository that cannot be
    /// read now is left out of the listing (and logged).
    pub(super) async fn backup_snapshots(&self) -> (Vec<Snapshot>, std::collections::HashSet<String>) {
        let (mut out, mut deleted) = (Vec::new(), std::collections::HashSet::new());
        let names: Vec<PoolName> = self.backups.names().into_iter().cloned().collect();
        for name in names {
            let n = name.clone();
            let listed = blocking(&self.backups, move |b| b.listing(&n)).await;
            match listed {
                Ok((list, marked)) => {
                    out.extend(list.iter().map(csi_backup));
                    deleted.extend(marked.iter().map(|id| id.to_string()));
                }
                Err(ControllerError::Storage(StorageError::PoolUnusable(m))) if m.contains("not been initialised") => {}
                Err(e) => {
                    tracing::warn!(repository = name.as_str(), error = %e, "backup repository left out of the snapshot listing");
                }
            }
        }
        (out, deleted)
    }

    /// GetSnapshot of a backup: the repository's, else a node's upload in progress. The
    /// repository answers first, so an uploaded backup is found while its node is down; nodes
    /// that do not answer are passed over.
    pub(super) async fn get_backup(&self, id: &BackupId) -> Result<Option<Snapshot>, ControllerError> {
        Ok(self.locate_backup(id).await?.map(|found| match found {
            Located::Stored(b) => csi_backup(&b),
            Located::Uploading(_, s) => csi_snapshot(&s),
        }))
    }

    /// Where a backup is: in its repository, or uploading on a node; looked for in that order, and
    /// in the repository again when neither holds it: an upload may have ended between the two
    /// looks, and its node drops the upload's record only once the repository holds the checked
    /// backup.
    async fn locate_backup(&self, id: &BackupId) -> Result<Option<Located>, ControllerError> {
        let in_repository = || async {
            if self.backups.config(id.repository()).is_err() {
                return Ok(None);
            }
            let i = id.clone();
            blocking(&self.backups, move |b| b.find(&i)).await
        };
        if let Some(b) = in_repository().await? {
            return Ok(Some(Located::Stored(b)));
        }
        tokio::time::sleep(crate::crash::delay("get-backup:between-looks")).await;
        if let Some((node, s)) = self.upload_in_progress(id).await {
            // Deleted while it uploads: its node drops it once the upload ends.
            let i = id.clone();
            if !blocking(&self.backups, move |b| b.is_marked_deleted(&i)).await? {
                return Ok(Some(Located::Uploading(node, s)));
            }
        }
        Ok(in_repository().await?.map(Located::Stored))
    }

    /// A backup's upload in progress, asked of every node at once: the node cutting it and its
    /// snapshot record. Nodes that do not answer are passed over (and logged). A node's copy of
    /// an uploaded backup is not an upload: the repository answers for that backup, and a copy it
    /// no longer holds is being dropped (its deletion mark may already be cleared).
    async fn upload_in_progress(&self, id: &BackupId) -> Option<(NodeId, SnapshotRecord)> {
        let agents = self.directory.all();
        let answers = super::ask_all(&agents, |a| async move { a.snapshots().await }).await;
        for (a, answer) in agents.iter().zip(answers) {
            match answer {
                Ok(snaps) => {
                    if let Some(s) = snaps
                        .into_iter()
                        .find(|s| s.backup.as_ref().is_some_and(|m| m.id == *id && !m.uploaded))
                    {
                        return Some((a.node().clone(), s));
                    }
                }
                Err(e) => {
                    tracing::warn!(node = a.node().as_str(), backup = %id, error = %e, "node passed over looking for an upload in progress")
                }
            }
        }
        None
    }

    /// DeleteSnapshot of a backup: each node forgets its part (a local copy, or an upload in
    /// progress, which it calls off, answering ABORTED if the upload has not ended in time), then
    /// the repository forgets it; its data goes at the next prune. When a node could not be told
    /// (it could not be reached; the node that cut the stored backup was not asked, being down
    /// or forgotten; or the backup is neither in the repository nor held by a node that
    /// answered, so that a node this controller does not know may hold an unfinished upload), a
    /// deletion mark is written first: that node drops its part when it sees the mark instead of
    /// uploading a backup nobody can delete, or keeping a copy nobody lists (docs/backups.md). A
    /// node that answered with an error (an I/O error on its pool) was reached: its error
    /// stands, and the retry asks it again.
    pub(super) async fn delete_backup(&self, id: &BackupId) -> Result<(), ControllerError> {
        let agents = self.directory.all();
        let answers = super::ask_all(&agents, |a| {
            let id = id.clone();
            async move { a.forget_backup(id).await }
        })
        .await;
        let configured = self.backups.config(id.repository()).is_ok();
        let find = || async {
            if configured {
                let i = id.clone();
                blocking(&self.backups, move |b| b.find(&i)).await
            } else {
                Ok(None)
            }
        };
        // Once uploaded, the repository names the node that cut the backup: only that node's
        // refusal stands (another node's cannot hold every backup's delete hostage).
        let mut stored: Option<Option<BackupInfo>> = None;
        let mut untold = false;
        let mut held = false;
        let mut told: std::collections::HashSet<&NodeId> = std::collections::HashSet::new();
        for (a, answer) in agents.iter().zip(answers) {
            let e = match answer {
                Ok(had) => {
                    held |= had;
                    told.insert(a.node());
                    continue;
                }
                Err(e) => e,
            };
            if crate::agent::remote::is_unreachable(a.node(), &e) {
                tracing::warn!(node = a.node().as_str(), backup = %id, error = %e, "node unreachable; a deletion mark tells it once it is back");
                untold = true;
                continue;
            }
            if stored.is_none() {
                stored = Some(find().await?);
            }
            // The shared pools' agent answers for backups of shared volumes, whose uploader is
            // named by a controller pod (another one, after a restart): its refusal stands.
            let shared = self.directory.shared().is_some_and(|s| s.node() == a.node());
            match stored.as_ref().and_then(Option::as_ref).map(|b| &b.meta.node) {
                Some(node) if node != a.node().as_str() && !shared => {
                    tracing::warn!(node = a.node().as_str(), uploader = node.as_str(), backup = %id, error = %e, "refusal of a node that did not cut the backup passed over");
                }
                _ => return Err(e.into()),
            }
        }
        if !configured {
            tracing::warn!(backup = %id, "DeleteSnapshot of a backup in a repository that is not configured: nothing to forget");
            return Ok(());
        }
        let stored = match stored {
            Some(s) => s,
            None => find().await?,
        };
        // A node is asked only while it heartbeats: the one that cut a stored backup may keep a
        // copy of it and not have been asked at all.
        let i = id.clone();
        if crate::backup::delete_needs_mark(stored.as_ref(), untold, |n| told.contains(n), held) {
            // Right after a start the nodes not asked may just not have called in yet: the CO's
            // retry asks them once they have, and a mark goes only to a node still missing then.
            if self.directory.settling() {
                return Err(ControllerError::NodeUnreachable(format!(
                    "backup {id}: the controller has just started and not every node has reported yet; \
                     retry the delete shortly (a node still silent then gets a deletion mark)"
                )));
            }
            // Before the forget: a node that finishes an upload after it looks for the mark.
            blocking(&self.backups, move |b| b.mark_deleted(&i)).await?;
        }
        let i = id.clone();
        blocking(&self.backups, move |b| b.forget(&i)).await
    }

    /// A CreateVolume source that is a backup: it must be in its repository (a backup still
    /// uploading is not a source yet). Returns what the repository holds of it.
    pub(super) async fn restorable(&self, id: &BackupId) -> Result<BackupInfo, ControllerError> {
        let not_found = || ControllerError::not_found(format!("source snapshot {id} not found"));
        if self.backups.config(id.repository()).is_err() {
            return Err(not_found());
        }
        match self.locate_backup(id).await? {
            Some(Located::Stored(b)) => Ok(b),
            Some(Located::Uploading(node, _)) => Err(ControllerError::NotReady(format!(
                "backup {id} is still uploading from node {}; restore from it once it is ready to use",
                node.as_str()
            ))),
            None => Err(not_found()),
        }
    }
}

/// Where [`ControllerService::locate_backup`] found a backup.
enum Located {
    Stored(BackupInfo),
    Uploading(NodeId, SnapshotRecord),
}

/// The backup a VolumeSnapshotClass asks for, from its parameters.
pub fn backup_request(p: &std::collections::HashMap<String, String>) -> Result<Option<BackupRequest>, ControllerError> {
    let Some(repo) = p.get(BACKUP_REPOSITORY) else {
        if p.contains_key(KEEP_LOCAL) {
            return Err(ControllerError::invalid(format!(
                "snapshot parameter {KEEP_LOCAL} applies to backups (with {BACKUP_REPOSITORY})"
            )));
        }
        return Ok(None);
    };
    let repository = PoolName::parse(repo)
        .map_err(|e| ControllerError::invalid(format!("snapshot parameter {BACKUP_REPOSITORY}: {}", e.0)))?;
    let keep_local = match p.get(KEEP_LOCAL).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ControllerError::invalid(format!(
                "snapshot parameter {KEEP_LOCAL} must be true or false, not '{other}'"
            )))
        }
    };
    Ok(Some(BackupRequest { repository, keep_local }))
}
