//! The storage calls the controller makes on a node, as one trait. All-in-one holds the in-process
//! implementation ([`LocalAgent`]); split mode holds a remote client. The controller never knows which.

pub mod enrol;
pub mod grant;
pub mod heartbeat;
pub mod registry;
pub mod remote;
pub mod seal;
pub mod server;
pub mod tls;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};

use crate::storage::cbt::{MetadataError, Query, Range};
use crate::storage::engine::{
    BackupRequest, CapacityRange, Condition, LocalEngine, Mutable, NewGroup, NewVolume, PoolStatus, Source,
};
use crate::storage::id::{BackupId, GroupId, NodeId, PoolName, SnapshotId, StaticId, VolumeId};
use crate::storage::record::{GroupRecord, SnapshotRecord, VolumeRecord};
use crate::storage::transfer::Frame;
use crate::storage::StorageError;
use remote::NodeListing;

/// The frames of a copy between nodes (`storage::transfer`), as they arrive. An error ends it.
pub type Frames = Pin<Box<dyn Stream<Item = Result<Frame, StorageError>> + Send>>;

/// Frames waiting between the disk and the network, per transfer: enough to keep both busy.
pub(crate) const FRAMES_IN_FLIGHT: usize = 4;

/// How long an export waits for its reader to take the next frame before it stops: a reader that
/// holds the stream open without reading (it answers the pings) would otherwise keep the source's
/// lock (no delete, no expand of it) and a blocking thread for good.
#[cfg(not(test))]
const EXPORT_STALL: std::time::Duration = std::time::Duration::from_secs(120);
#[cfg(test)]
const EXPORT_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a snapshot metadata answer waits for its client to take the next batch before it lets
/// go of what it holds and ends with ABORTED: a client that holds the answer open without reading
/// (through the sidecar, a backup tool that stopped) would otherwise keep, for good, the snapshots'
/// files open (a deleted snapshot's space taken) on a node, and in split mode the controller's call
/// to the node (one of the few its connection to the node carries at once).
/// `CELLAR_METADATA_STALL_SECONDS` sets it (tests), else two minutes.
pub fn metadata_stall() -> std::time::Duration {
    #[cfg(not(test))]
    const METADATA_STALL: std::time::Duration = std::time::Duration::from_secs(120);
    #[cfg(test)]
    const METADATA_STALL: std::time::Duration = std::time::Duration::from_secs(1);
    seconds_from_env("CELLAR_METADATA_STALL_SECONDS").unwrap_or(METADATA_STALL)
}

/// A positive number of seconds an environment variable sets (tests shorten waits so), if any.
pub(crate) fn seconds_from_env(var: &str) -> Option<std::time::Duration> {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(std::time::Duration::from_secs)
}

#[tonic::async_trait]
pub trait Agent: Send + Sync {
    fn node(&self) -> &NodeId;
    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError>;
    async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError>;
    /// Grows a volume; the flag says whether the node must grow a filesystem too.
    async fn expand_volume(&self, id: VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError>;
    async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError>;
    async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError>;
    /// Every volume with its condition, in volume-id order.
    async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError>;
    /// A page of [`Agent::volumes`] as the agent's listing answers it ([`fill_page`]): the volumes
    /// whose ids come after `after` (as text; empty: from the first), in id order, up to
    /// `max_bytes` on the wire. By default cut from the whole listing; the local agent reads only
    /// the page from its index (and works out only its volumes' conditions).
    async fn volumes_page(
        &self,
        after: String,
        max_bytes: u32,
    ) -> Result<(Vec<(VolumeRecord, Condition)>, bool), StorageError> {
        let all = in_order(self.volumes().await?, volume_id);
        fill_page(
            |a, n| Ok(after_in(&all, a, n)),
            volume_id,
            volume_size,
            after,
            max_bytes,
        )
    }
    /// The volume created under a CSI name, in any pool of the node.
    async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError>;
    /// The snapshot created under a CSI name, in any pool of the node.
    async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError>;
    /// Cuts a snapshot; with `backup`, it is also uploaded into that repository in the
    /// background (docs/backups.md).
    async fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
        freeze: bool,
        backup: Option<BackupRequest>,
    ) -> Result<SnapshotRecord, StorageError>;
    async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError>;
    /// Forgets this node's part of a backup (its local snapshot, kept or still uploading: an
    /// upload is called off); the controller forgets it in the repository. Whether this node
    /// held a part. Nothing here is OK.
    async fn forget_backup(&self, _id: BackupId) -> Result<bool, StorageError> {
        Ok(false)
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError>;
    /// A page of [`Agent::snapshots`], as [`Agent::volumes_page`].
    async fn snapshots_page(&self, after: String, max_bytes: u32) -> Result<(Vec<SnapshotRecord>, bool), StorageError> {
        let all = in_order(self.snapshots().await?, snapshot_id);
        fill_page(
            |a, n| Ok(after_in(&all, a, n)),
            snapshot_id,
            snapshot_size,
            after,
            max_bytes,
        )
    }
    async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError>;
    /// Whether pool `pool` (the default pool, without one) is a shared pool this agent serves,
    /// told from its configuration alone (no share is touched); `None` when this agent cannot
    /// tell that way (then [`Agent::pools`] does).
    fn pool_is_shared(&self, _pool: Option<&PoolName>) -> Option<bool> {
        None
    }
    /// This node's own pools that are not open (they failed to open and are tried again), each
    /// with why: their volumes are missing from [`Agent::volumes`] until they open.
    fn shut_pools(&self) -> Vec<(PoolName, String)> {
        Vec::new()
    }
    /// Whether a static volume's directory exists (and is reachable without symlinks).
    async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError>;
    /// Streams a volume's or snapshot's data of this node, for a copy on another node. Dropping
    /// the stream stops the export.
    async fn export_data(&self, source: Source) -> Result<Frames, StorageError>;
    /// Creates a volume from another node's data (`export_data` of that node). An error in
    /// `frames` is the call's error: the volume is not made, and nothing of it is left.
    async fn import_volume(&self, req: NewVolume, frames: Frames) -> Result<VolumeRecord, StorageError>;
    /// Cuts a group snapshot of volumes of this node at one point in time, or returns the one
    /// made under the same name for the same volumes.
    async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError>;
    /// Deletes a group snapshot and its members; one already gone is OK.
    async fn delete_group(&self, id: GroupId) -> Result<(), StorageError>;
    async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError>;
    /// The group snapshot created under a CSI name, in any pool of the node.
    async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError>;
    /// The allocated or changed ranges of snapshots of this node (`storage::cbt`), in batches of
    /// at most `max`, after the volume's capacity.
    async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError>;
    /// This node's part of a group snapshot spanning nodes (`req.members` are this node's): its
    /// members are frozen, then cut only once every part has met at `meet`
    /// ([`LocalEngine::cut_group_part`]). Returns the members' snapshot records.
    async fn cut_group_part(
        &self,
        id: GroupId,
        req: NewGroup,
        meet: Arc<Rendezvous>,
    ) -> Result<Vec<SnapshotRecord>, StorageError>;
    /// Writes the record of a group whose parts are all cut, on its home node.
    async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError>;
    /// Deletes this node's members of a group spanning nodes.
    async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError>;
    /// Creates a volume on this node from `req.source`, which `source` (another node) holds. By
    /// default the caller relays the data ([`relay`]); a registered node pulls it from the source
    /// node itself with a grant, so the data does not pass through the controller.
    async fn copy_from(&self, req: NewVolume, source: &dyn Agent) -> Result<VolumeRecord, StorageError> {
        relay(self, req, source).await
    }
}

/// Where the parts of a group snapshot that spans nodes wait for each other once their node has
/// frozen its members: all of them go on to cut, or none does (one failed, or the wait outlived its
/// bound, which is below the nodes' own freeze deadline).
pub struct Rendezvous {
    parties: usize,
    within: std::time::Duration,
    state: tokio::sync::watch::Sender<(usize, Option<bool>)>,
}

impl Rendezvous {
    pub fn new(parties: usize, within: std::time::Duration) -> Arc<Rendezvous> {
        Arc::new(Rendezvous {
            parties,
            within,
            state: tokio::sync::watch::channel((0, None)).0,
        })
    }

    /// This part is frozen: `true` once every part is, `false` if one failed or time ran out.
    pub async fn arrive(&self) -> bool {
        self.state.send_modify(|(arrived, decided)| {
            *arrived += 1;
            if *arrived >= self.parties && decided.is_none() {
                *decided = Some(true);
            }
        });
        let mut rx = self.state.subscribe();
        let decided = tokio::time::timeout(self.within, rx.wait_for(|(_, d)| d.is_some())).await;
        if decided.is_err() {
            self.fail();
        }
        self.state.borrow().1 == Some(true)
    }

    /// Waits until `n` parts have arrived.
    pub async fn until_arrived(&self, n: usize) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|(arrived, _)| *arrived >= n).await;
    }

    /// A part failed before it froze: no part cuts (unless every part already met).
    pub fn fail(&self) {
        self.state.send_modify(|(_, decided)| {
            decided.get_or_insert(false);
        });
    }
}

/// A walk whose blocking task died (a panic): the answer ends with INTERNAL.
fn walk_failed(e: tokio::task::JoinError) -> MetadataError {
    let e = crate::sys::SysError::io("snapshot metadata walk", "", std::io::Error::other(e.to_string()));
    MetadataError::Storage(StorageError::Sys(e))
}

/// Batches of ranges of a snapshot metadata answer, as the walk finds them. An error ends it.
pub type RangeBatches = Pin<Box<dyn Stream<Item = Result<Vec<Range>, MetadataError>> + Send>>;

/// Batches waiting between the walk and the client.
const BATCHES_IN_FLIGHT: usize = 2;

/// An answer's batches taken from `source` only as its client takes them, at most `in_flight`
/// ahead. A client that goes away ends it; one that stays but takes nothing for
/// [`metadata_stall`] ends it too: `source` is dropped at once (the walk's files closed, the call
/// to a node reset) and, after the batches already waiting, the answer ends with ABORTED, never
/// as a clean end of a partial answer.
pub(crate) fn cut_off_when_unread(mut source: RangeBatches, in_flight: usize) -> RangeBatches {
    let stall = metadata_stall();
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight);
    // The ABORTED goes apart from the batches: queued behind them, it would wait (and the task
    // with it) for a client that may never read again. It comes after them all.
    let (abort_tx, mut abort_rx) = tokio::sync::oneshot::channel::<MetadataError>();
    tokio::spawn(async move {
        loop {
            // A place for the next batch first: waiting for the client holds no batch here.
            let place = match tokio::time::timeout(stall, tx.reserve()).await {
                Ok(Ok(place)) => place,
                Ok(Err(_)) => break,
                Err(_) => {
                    drop(source);
                    let why = StorageError::Aborted(format!(
                        "the client of this snapshot metadata answer took nothing for {} s; the answer \
                         stops here: ask again from the end of the last range received (starting_offset)",
                        stall.as_secs()
                    ));
                    let _ = abort_tx.send(why.into());
                    break;
                }
            };
            let batch = tokio::select! {
                b = source.next() => b,
                _ = tx.closed() => None,
            };
            let Some(batch) = batch else { break };
            let failed = batch.is_err();
            place.send(batch);
            if failed {
                break;
            }
        }
    });
    // Asked only once the batches are all taken and the task has ended (its end closes them).
    let aborted = tokio_stream::iter(std::iter::from_fn(move || abort_rx.try_recv().ok().map(Err)));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).chain(aborted))
}

/// A copy between nodes through the caller: the source's export piped into the target's import.
pub async fn relay<A: Agent + ?Sized>(
    target: &A,
    req: NewVolume,
    source: &dyn Agent,
) -> Result<VolumeRecord, StorageError> {
    let frames = source.export_data(copied(&req)?).await?;
    target.import_volume(req, frames).await
}

/// What a copy between nodes copies: the request's content source.
pub(crate) fn copied(req: &NewVolume) -> Result<Source, StorageError> {
    req.source
        .clone()
        .ok_or_else(|| StorageError::Unsupported("a copy between nodes needs a content source".into()))
}

/// How many records a listing's page reads from the node's index at a time: the conditions of at
/// most this many more than the page holds are worked out for nothing.
pub const LIST_READ: usize = 128;

/// One page of a listing: the records whose ids come after `after`, in id order, up to
/// `max_bytes` as `size` weighs them on the wire (at least one; 0: all), and whether any remain.
/// The records are read with `read(after, n)` (at most `n` whose ids come after `after`, in id
/// order), [`LIST_READ`] at a time, so a page costs what it holds, not the whole listing.
pub fn fill_page<R>(
    mut read: impl FnMut(&str, usize) -> Result<Vec<R>, StorageError>,
    id: impl Fn(&R) -> String,
    size: impl Fn(&R) -> usize,
    mut after: String,
    max_bytes: u32,
) -> Result<(Vec<R>, bool), StorageError> {
    let (mut taken, mut bytes) = (Vec::new(), 0usize);
    loop {
        let records = read(&after, LIST_READ)?;
        let last = records.len() < LIST_READ;
        after = records.last().map(&id).unwrap_or_default();
        for r in records {
            let len = size(&r) + 8; // with its field's tag and length
            if max_bytes != 0 && !taken.is_empty() && bytes + len > max_bytes as usize {
                return Ok((taken, true));
            }
            bytes += len;
            taken.push(r);
        }
        if last {
            return Ok((taken, false));
        }
    }
}

fn volume_id((v, _): &(VolumeRecord, Condition)) -> String {
    v.id.to_string()
}

fn volume_size((v, c): &(VolumeRecord, Condition)) -> usize {
    use prost::Message;
    wire::volume_with_condition(v, c).encoded_len()
}

fn snapshot_id(s: &SnapshotRecord) -> String {
    s.id.to_string()
}

fn snapshot_size(s: &SnapshotRecord) -> usize {
    use prost::Message;
    wire::v1::SnapshotRecord::from(s).encoded_len()
}

/// `records` with their ids, in id order.
fn in_order<R>(records: Vec<R>, id: impl Fn(&R) -> String) -> Vec<(String, R)> {
    let mut all: Vec<(String, R)> = records.into_iter().map(|r| (id(&r), r)).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// At most `n` of `sorted` (in id order) whose ids come after `after`.
fn after_in<R: Clone>(sorted: &[(String, R)], after: &str, n: usize) -> Vec<R> {
    let from = sorted.partition_point(|(i, _)| i.as_str() <= after);
    sorted[from..].iter().take(n).map(|(_, r)| r.clone()).collect()
}

/// Refuses `adding` more volumes past `bound`, if any.
fn room_for_volumes(bound: Option<NodeListing>, e: &LocalEngine, adding: usize) -> Result<(), StorageError> {
    match bound {
        Some(b) => b.admits("volumes", e.volumes_weigh(remote::volume_listed), adding),
        None => Ok(()),
    }
}

/// Refuses `adding` more snapshots past `bound`, if any.
fn room_for_snapshots(bound: Option<NodeListing>, e: &LocalEngine, adding: usize) -> Result<(), StorageError> {
    match bound {
        Some(b) => b.admits("snapshots", e.snapshots_weigh(remote::snapshot_held), adding),
        None => Ok(()),
    }
}

/// The node's own engine, called in-process. Disk work runs on the blocking pool so slow copies
/// never stall other calls.
pub struct LocalAgent {
    engine: Arc<LocalEngine>,
    /// When a controller lists this node over the network: what its listings may hold (a new
    /// object past it is refused).
    bound: Option<NodeListing>,
}

impl LocalAgent {
    pub fn new(engine: Arc<LocalEngine>) -> Self {
        LocalAgent { engine, bound: None }
    }

    /// The agent of a node in split mode, which the controller lists page by page: its listings
    /// are kept within [`NodeListing::DEFAULT`] (RESOURCE_EXHAUSTED past it; a repeated create
    /// still answers).
    pub fn listed_by_controller(engine: Arc<LocalEngine>) -> Self {
        LocalAgent::listed_within(engine, NodeListing::DEFAULT)
    }

    /// As [`LocalAgent::listed_by_controller`], within `bound`.
    pub fn listed_within(engine: Arc<LocalEngine>, bound: NodeListing) -> Self {
        LocalAgent {
            engine,
            bound: Some(bound),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalEngine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || f(&engine)).await {
            Ok(r) => r,
            Err(e) => Err(StorageError::Sys(crate::sys::SysError::io(
                "storage task",
                "",
                std::io::Error::other(e.to_string()),
            ))),
        }
    }
}

#[tonic::async_trait]
impl Agent for LocalAgent {
    fn node(&self) -> &NodeId {
        self.engine.node()
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        let bound = self.bound;
        self.blocking(move |e| {
            if bound.is_some() && e.volume_named(&req.name).is_none() {
                room_for_volumes(bound, e, 1)?;
            }
            e.create_volume(req)
        })
        .await
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
        self.blocking(move |e| e.delete_volume(&id)).await
    }

    async fn expand_volume(&self, id: VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        self.blocking(move |e| e.expand_volume(&id, range)).await
    }

    async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError> {
        self.blocking(move |e| e.modify_volume(&id, &m)).await
    }

    async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
        self.blocking(move |e| e.volume_with_condition(&id)).await
    }

    async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
        self.blocking(|e| Ok(e.volumes_with_condition())).await
    }

    async fn volumes_page(
        &self,
        after: String,
        max_bytes: u32,
    ) -> Result<(Vec<(VolumeRecord, Condition)>, bool), StorageError> {
        self.blocking(move |e| {
            fill_page(
                |a, n| Ok(e.volumes_after(a, n)),
                volume_id,
                volume_size,
                after,
                max_bytes,
            )
        })
        .await
    }

    // Lookups may read a shared pool's records: off the async runtime, as every call that may
    // touch a disk is (a hung share would otherwise stop the runtime's threads).
    async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
        self.blocking(move |e| Ok(e.volume_named(&name))).await
    }

    async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError> {
        self.blocking(move |e| Ok(e.snapshot_named(&name))).await
    }

    async fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
        freeze: bool,
        backup: Option<BackupRequest>,
    ) -> Result<SnapshotRecord, StorageError> {
        let bound = self.bound;
        self.blocking(move |e| {
            if bound.is_some() && e.snapshot_named(&name).is_none() {
                room_for_snapshots(bound, e, 1)?;
            }
            match &backup {
                Some(b) => e.create_backup(&name, &source, freeze, b),
                None => e.create_snapshot(&name, &source, freeze),
            }
        })
        .await
    }

    async fn forget_backup(&self, id: BackupId) -> Result<bool, StorageError> {
        self.blocking(move |e| e.forget_local_backup(&id)).await
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError> {
        self.blocking(move |e| e.delete_snapshot(&id)).await
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
        self.blocking(|e| Ok(e.listed_snapshots())).await
    }

    async fn snapshots_page(&self, after: String, max_bytes: u32) -> Result<(Vec<SnapshotRecord>, bool), StorageError> {
        self.blocking(move |e| {
            fill_page(
                |a, n| Ok(e.listed_snapshots_after(a, n)),
                snapshot_id,
                snapshot_size,
                after,
                max_bytes,
            )
        })
        .await
    }

    async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
        self.blocking(|e| e.pool_status()).await
    }

    fn pool_is_shared(&self, pool: Option<&PoolName>) -> Option<bool> {
        Some(self.engine.pool_is_shared(pool))
    }

    fn shut_pools(&self) -> Vec<(PoolName, String)> {
        self.engine.shut_local_pools()
    }

    async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError> {
        self.blocking(move |e| match e.static_dir(&id.pool, &id.path) {
            Ok(_) => Ok(true),
            // A well-formed handle of a pool not configured here names nothing (docs/volume-ids.md).
            Err(StorageError::VolumeNotFound(_) | StorageError::UnknownPool { .. }) => Ok(false),
            Err(other) => Err(other),
        })
        .await
    }

    async fn export_data(&self, source: Source) -> Result<Frames, StorageError> {
        let (tx, rx) = tokio::sync::mpsc::channel(FRAMES_IN_FLIGHT);
        let engine = self.engine.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut send = |f: Frame| {
                if let Frame::Chunk { data, .. } = &f {
                    crate::metrics::record_transfer_bytes("export", data.len() as u64);
                }
                match runtime.block_on(tokio::time::timeout(EXPORT_STALL, tx.send(Ok(f)))) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(StorageError::Transfer("the receiver of the export went away".into())),
                    Err(_) => Err(StorageError::Transfer(format!(
                        "the receiver of the export took nothing for {EXPORT_STALL:?}; the export stops"
                    ))),
                }
            };
            let sent = engine.export(&source, &mut send);
            crate::metrics::record_transfer_end("export", sent.is_ok());
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn import_volume(&self, req: NewVolume, mut frames: Frames) -> Result<VolumeRecord, StorageError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(FRAMES_IN_FLIGHT);
        // The frames come from the network; the disk work runs on the blocking pool and reads
        // them through the channel. When it stops early the channel closes and the pump ends.
        let pump = tokio::spawn(async move {
            while let Some(item) = frames.next().await {
                if let Ok(Frame::Chunk { data, .. }) = &item {
                    crate::metrics::record_transfer_bytes("import", data.len() as u64);
                }
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let bound = self.bound;
        let made = self
            .blocking(move |e| {
                if bound.is_some() && e.volume_named(&req.name).is_none() {
                    room_for_volumes(bound, e, 1)?;
                }
                e.import_volume(req, &mut std::iter::from_fn(|| rx.blocking_recv()))
            })
            .await;
        pump.abort();
        crate::metrics::record_transfer_end("import", made.is_ok());
        made
    }

    async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError> {
        let bound = self.bound;
        self.blocking(move |e| {
            if bound.is_some() && e.group_named(&req.name)?.is_none() {
                room_for_snapshots(bound, e, req.members.len())?;
            }
            e.create_group(&req)
        })
        .await
    }

    async fn delete_group(&self, id: GroupId) -> Result<(), StorageError> {
        self.blocking(move |e| e.delete_group(&id)).await
    }

    async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError> {
        self.blocking(move |e| e.group(&id)).await
    }

    async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError> {
        self.blocking(move |e| e.group_named(&name)).await
    }

    async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError> {
        let engine = self.engine.clone();
        let walk = tokio::task::spawn_blocking(move || engine.block_ranges(&q))
            .await
            .map_err(|e| StorageError::Unavailable(format!("snapshot metadata task: {e}")))??;
        let capacity = walk.capacity();
        // Each batch is read on the blocking pool, and only that: waiting for a slow client holds
        // no blocking thread.
        let walk = Arc::new(std::sync::Mutex::new(walk));
        let steps = tokio_stream::iter(std::iter::repeat(()))
            .then(move |()| {
                let walk = walk.clone();
                async move {
                    let step = tokio::task::spawn_blocking(move || match walk.lock() {
                        Ok(mut w) => w.next_batch(max),
                        Err(poisoned) => poisoned.into_inner().next_batch(max),
                    });
                    step.await.map_err(walk_failed).and_then(|next| next)
                }
            })
            .map_while(|next| next.transpose());
        Ok((capacity, cut_off_when_unread(Box::pin(steps), BATCHES_IN_FLIGHT)))
    }

    async fn cut_group_part(
        &self,
        id: GroupId,
        req: NewGroup,
        meet: Arc<Rendezvous>,
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        let runtime = tokio::runtime::Handle::current();
        let waiting = meet.clone();
        let cut = self
            .blocking(move |e| e.cut_group_part(&id, &req, || runtime.block_on(waiting.arrive())))
            .await;
        if cut.is_err() {
            meet.fail();
        }
        cut
    }

    async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError> {
        self.blocking(move |e| e.put_group(&rec)).await
    }

    async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError> {
        self.blocking(move |e| e.delete_group_part(&id, &members)).await
    }
}

/// The nodes the controller can reach, by node id, and the agent of the shared pools.
pub trait Directory: Send + Sync {
    fn agent(&self, node: &NodeId) -> Option<Arc<dyn Agent>>;
    /// The agent that answers for an object on `node`, named by a request: [`Directory::agent`],
    /// else, where nodes come and go (split mode), one whose every call answers UNAVAILABLE
    /// naming the node. A node this process has not heard from (it restarted while the node was
    /// down, or forgot its id) may still hold the object: a DeleteVolume answered OK for it, or a
    /// ModifyVolume answered NOT_FOUND, would leave its data behind for good.
    fn owner(&self, node: &NodeId) -> Option<Arc<dyn Agent>> {
        self.agent(node)
    }
    /// The nodes, for local volumes.
    fn agents(&self) -> Vec<Arc<dyn Agent>>;
    /// Who serves the shared pools (the controller itself in split mode).
    fn shared(&self) -> Option<Arc<dyn Agent>>;
    /// Every distinct agent, local and shared, for listings.
    fn all(&self) -> Vec<Arc<dyn Agent>>;
    /// Every agent whose volumes exist, reachable or not: what ListVolumes must account for.
    fn listed(&self) -> Vec<Arc<dyn Agent>> {
        self.all()
    }
    /// A node's pools as it last reported them by itself (its heartbeat), so that placement and
    /// capacity need no call to it; `None`: ask the agent.
    fn reported_pools(&self, _node: &NodeId) -> Option<Vec<PoolStatus>> {
        None
    }
    /// A node's own pools that its last heartbeat reports not open, with why.
    fn shut_pools(&self, _node: &NodeId) -> Vec<(PoolName, String)> {
        Vec::new()
    }
    /// Whether the node's agent answered the last call made to it (placement passes over one
    /// that did not, when it may choose).
    fn answers(&self, _node: &NodeId) -> bool {
        true
    }
    /// True right after the controller started, while a node that is up may simply not have
    /// called in yet: a node missing from [`Directory::all`] then says nothing about the node.
    fn settling(&self) -> bool {
        false
    }
}

/// All-in-one: exactly one node, in-process.
pub struct SingleNode(pub Arc<dyn Agent>);

impl Directory for SingleNode {
    fn agent(&self, node: &NodeId) -> Option<Arc<dyn Agent>> {
        (self.0.node() == node).then(|| self.0.clone())
    }
    fn agents(&self) -> Vec<Arc<dyn Agent>> {
        vec![self.0.clone()]
    }
    fn shared(&self) -> Option<Arc<dyn Agent>> {
        Some(self.0.clone())
    }
    fn all(&self) -> Vec<Arc<dyn Agent>> {
        vec![self.0.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::Rendezvous;
    use super::{fill_page, LIST_READ};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A reader that keeps an export's stream open but takes nothing from it: the export stops
    /// after [`super::EXPORT_STALL`] and lets go of its source, which can then be deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_whose_reader_stops_reading_lets_go_of_its_source() {
        use super::{Agent, LocalAgent};
        use crate::storage::config::Config;
        use crate::storage::engine::{LocalEngine, NewVolume, Source};
        use crate::storage::id::NodeId;
        use std::sync::Arc;
        use tokio_stream::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(
            LocalEngine::open(NodeId::parse("n1").expect("node"), &Config::default_for(dir.path())).expect("engine"),
        );
        let v = engine
            .create_volume(NewVolume::plain("pvc-stall", None, 1 << 20))
            .expect("create");
        let (_, data) = engine.volume_data(&v.id).expect("data");
        for i in 0..16 {
            std::fs::write(data.join(format!("f{i}")), vec![1u8; 64 << 10]).expect("fill");
        }
        let agent = LocalAgent::new(engine.clone());
        let mut frames = agent.export_data(Source::Volume(v.id.clone())).await.expect("export");
        // Its first frame comes once the export holds its source (a probe that took the lock
        // itself could make the export lose it); then held open, never read again: while the
        // export waits, its source is locked, as an expand to its own size (which takes the lock
        // and changes nothing) sees.
        let first = tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .expect("the export answers");
        assert!(matches!(first, Some(Ok(_))), "the export took its source: {first:?}");
        let same = crate::storage::engine::CapacityRange {
            required: v.capacity_bytes,
            limit: 0,
        };
        assert!(matches!(
            engine.expand_volume(&v.id, same),
            Err(crate::storage::StorageError::Busy(_))
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match engine.delete_volume(&v.id) {
                Ok(()) => break,
                Err(crate::storage::StorageError::Busy(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("the stalled export still holds its source: {other:?}"),
            }
        }
        drop(frames);
    }

    /// The descriptors of this process open on a file whose path contains `name`.
    fn open_on(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p.to_string_lossy().contains(name))
            .count()
    }

    /// A changed block tracking answer over a snapshot named `name` (its files' paths say so), one
    /// range a batch: far more batches than wait between the walk and the client.
    async fn cbt_answer(name: &str) -> (tempfile::TempDir, super::LocalAgent, super::RangeBatches) {
        use super::{Agent, LocalAgent};
        use crate::storage::cbt::Query;
        use crate::storage::config::Config;
        use crate::storage::engine::{LocalEngine, NewVolume};
        use crate::storage::id::NodeId;
        use crate::storage::record::{Layout, VolumeMode};
        use std::os::unix::fs::FileExt;
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default_for(dir.path());
        config.pools[0].layouts.push(Layout::Image);
        let engine = Arc::new(LocalEngine::open(NodeId::parse("n1").expect("node"), &config).expect("engine"));
        let v = engine
            .create_volume(NewVolume {
                mode: VolumeMode::Block,
                ..NewVolume::plain(&format!("pvc-{name}"), Some(Layout::Image), 64 << 20)
            })
            .expect("create");
        let (_, data) = engine.volume_data(&v.id).expect("data");
        let f = std::fs::OpenOptions::new().write(true).open(&data).expect("open image");
        for i in 0..16u64 {
            f.write_all_at(&[7u8; 4096], i << 20).expect("write");
        }
        f.sync_all().expect("fsync");
        drop(f);
        let snap = engine.create_snapshot(name, &v.id, false).expect("snapshot");
        let agent = LocalAgent::new(engine);
        let q = Query {
            base: None,
            target: snap.id.clone(),
            starting_offset: 0,
        };
        let (_, batches) = agent.block_ranges(q, 1).await.expect("answer");
        (dir, agent, batches)
    }

    /// Reads an answer to its end: the ranges it gave, and the error it ended with.
    async fn read_to_end(batches: &mut super::RangeBatches) -> (usize, Option<super::MetadataError>) {
        use tokio_stream::StreamExt;
        let mut ranges = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), batches.next()).await {
                Ok(Some(Ok(b))) => ranges += b.len(),
                Ok(Some(Err(e))) => return (ranges, Some(e)),
                Ok(None) => return (ranges, None),
                Err(_) => panic!("the answer neither goes on nor ends"),
            }
        }
    }

    /// A client of changed block tracking that keeps its answer open but takes nothing from it
    /// (through the sidecar: a backup tool that stopped reading): the walk lets go of the snapshot's
    /// file after [`super::metadata_stall`] (a deleted snapshot's space comes back), and the
    /// answer ends with ABORTED, never as if it were complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_metadata_answer_whose_reader_stops_reading_lets_go_of_its_snapshot() {
        let (_dir, _agent, mut batches) = cbt_answer("snap-cbt-stall").await;
        assert!(open_on("snap-cbt-stall") > 0, "the walk holds the snapshot's file open");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while open_on("snap-cbt-stall") > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "an answer nobody reads holds its snapshot's file open for good"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (ranges, end) = read_to_end(&mut batches).await;
        assert!(ranges < 16, "the walk stopped before its end: {ranges} ranges");
        let e = end.expect("an answer cut short must not end as if it were complete");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
    }

    /// The stalled answer's task must end even while its client still holds the answer without
    /// reading (its ABORTED could not be queued behind the batches it left): a task parked for good
    /// on every answer so left adds up. The ABORTED still comes once the client reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_metadata_answer_nobody_reads_ends_its_task_and_still_ends_aborted() {
        let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let before = tasks();
        let (_dir, _agent, mut batches) = cbt_answer("snap-cbt-parked").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tasks() > before {
            assert!(
                std::time::Instant::now() < deadline,
                "the answer's task waits for ever to queue its ABORTED for a client that does not read"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (ranges, end) = read_to_end(&mut batches).await;
        assert!(ranges < 16, "the walk stopped before its end: {ranges} ranges");
        let e = end.expect("an answer cut short must not end as if it were complete");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
    }

    #[tokio::test]
    async fn every_part_goes_on_only_once_all_have_arrived() {
        let meet = Rendezvous::new(3, Duration::from_secs(10));
        let early = tokio::spawn({
            let m = meet.clone();
            async move { m.arrive().await }
        });
        let second = tokio::spawn({
            let m = meet.clone();
            async move { m.arrive().await }
        });
        meet.until_arrived(2).await;
        assert!(!early.is_finished(), "nobody goes on before the last part arrives");
        assert!(meet.arrive().await);
        assert!(early.await.unwrap() && second.await.unwrap());
    }

    #[tokio::test]
    async fn a_failed_part_or_a_late_one_stops_every_part() {
        let meet = Rendezvous::new(2, Duration::from_secs(10));
        let waiting = tokio::spawn({
            let m = meet.clone();
            async move { m.arrive().await }
        });
        meet.until_arrived(1).await;
        meet.fail();
        assert!(
            !waiting.await.unwrap(),
            "a failure before the meeting stops the waiting part"
        );
        assert!(!meet.arrive().await, "and any part that arrives after it");

        let alone = Rendezvous::new(2, Duration::from_millis(50));
        assert!(!alone.arrive().await, "nobody else in time: no go");
        assert!(!alone.arrive().await, "the decision holds for a late part");

        let met = Rendezvous::new(1, Duration::from_secs(10));
        assert!(met.arrive().await);
        met.fail();
        assert!(met.arrive().await, "a failure after the meeting changes nothing");
    }

    /// A node the controller lists keeps each listing within its bound: past it a new volume,
    /// snapshot or group is RESOURCE_EXHAUSTED saying why, while a repeated create still answers
    /// and a delete makes room again. Without the bound (all-in-one) nothing is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_listed_by_the_controller_keeps_its_listings_within_their_bound() {
        use super::remote::{volume_listed, NodeListing};
        use super::{Agent, LocalAgent};
        use crate::storage::config::Config;
        use crate::storage::engine::{LocalEngine, NewGroup, NewVolume};
        use crate::storage::id::NodeId;
        use crate::storage::StorageError;
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(
            LocalEngine::open(NodeId::parse("n1").expect("node"), &Config::default_for(dir.path())).expect("engine"),
        );
        let bound = NodeListing {
            records: 3,
            bytes: usize::MAX,
        };
        let agent = LocalAgent::listed_within(engine.clone(), bound);
        let plain = |n: &str| NewVolume::plain(n, None, 1 << 20);
        let mut made = Vec::new();
        for i in 0..3 {
            made.push(
                agent
                    .create_volume(plain(&format!("pvc-{i}")))
                    .await
                    .expect("within the bound"),
            );
        }
        let refused = agent.create_volume(plain("pvc-3")).await;
        let Err(StorageError::Exhausted(why)) = &refused else {
            panic!("the fourth volume is refused: {refused:?}");
        };
        assert!(
            why.contains("holds 3 volumes") && why.contains("at most 3 volumes"),
            "{why}"
        );
        assert!(engine.volume_named("pvc-3").is_none(), "nothing of it is made");
        let again = agent
            .create_volume(plain("pvc-1"))
            .await
            .expect("a repeat still answers");
        assert_eq!(again.id, made[1].id);
        // Snapshots are counted on their own: three fit, the fourth does not, nor a group.
        for i in 0..3 {
            agent
                .create_snapshot(format!("snap-{i}"), made[0].id.clone(), false, None)
                .await
                .expect("snapshot within the bound");
        }
        let refused = agent
            .create_snapshot("snap-3".into(), made[0].id.clone(), false, None)
            .await;
        assert!(matches!(refused, Err(StorageError::Exhausted(_))), "{refused:?}");
        let group = NewGroup {
            name: "group-1".into(),
            members: vec![made[1].id.clone()],
            parameters: Default::default(),
            per_volume: true,
            freeze_timeout: std::time::Duration::from_secs(10),
        };
        let refused = agent.create_group(group).await;
        assert!(matches!(refused, Err(StorageError::Exhausted(_))), "{refused:?}");
        assert!(engine.group_named("group-1").expect("lookup").is_none());
        agent.delete_volume(made[2].id.clone()).await.expect("delete");
        agent
            .create_volume(plain("pvc-3"))
            .await
            .expect("room again after a delete");
        // The bytes are bounded too: two volumes' weight admits two, not a third.
        let each = volume_listed(&made[0]);
        let dir2 = tempfile::tempdir().expect("tempdir");
        let engine2 = Arc::new(
            LocalEngine::open(NodeId::parse("n2").expect("node"), &Config::default_for(dir2.path())).expect("engine"),
        );
        let by_bytes = LocalAgent::listed_within(
            engine2.clone(),
            NodeListing {
                records: 1000,
                bytes: 2 * each + each / 2,
            },
        );
        by_bytes.create_volume(plain("pvc-a")).await.expect("first");
        by_bytes.create_volume(plain("pvc-b")).await.expect("second");
        let refused = by_bytes.create_volume(plain("pvc-c")).await;
        assert!(matches!(refused, Err(StorageError::Exhausted(_))), "{refused:?}");
        // All-in-one counts nothing.
        let unbounded = LocalAgent::new(engine);
        unbounded
            .create_volume(plain("pvc-4"))
            .await
            .expect("no bound without a controller listing");
    }

    /// A record of the wire whose encoded size is its text's.
    fn rec(id: &str, pad: usize) -> (String, String) {
        (id.to_string(), "x".repeat(pad))
    }

    /// One page of `all` as the agent's listing answers it, counting the records read.
    fn page_of(all: &[(String, String)], after: &str, max_bytes: u32, read: &AtomicUsize) -> (Vec<String>, bool) {
        use prost::Message;
        let index = |after: &str, n: usize| {
            let mut rest: Vec<(String, String)> = all.iter().filter(|r| r.0.as_str() > after).cloned().collect();
            rest.sort();
            rest.truncate(n);
            read.fetch_add(rest.len(), Ordering::Relaxed);
            Ok(rest)
        };
        let size = |r: &(String, String)| format!("{}{}", r.0, r.1).encoded_len();
        let (page, more) = fill_page(index, |r| r.0.clone(), size, after.to_string(), max_bytes).expect("page");
        (page.into_iter().map(|(id, pad)| format!("{id}{pad}")).collect(), more)
    }

    #[test]
    fn a_listing_comes_in_id_order_in_pages_of_bounded_size_with_at_least_one_record() {
        let all = vec![rec("c", 100), rec("a", 100), rec("b", 100), rec("d", 5000)];
        let read = AtomicUsize::new(0);
        // 250 bytes hold two records of ~110 encoded bytes, not three.
        let (p1, more) = page_of(&all, "", 250, &read);
        assert_eq!(p1.iter().map(|s| &s[..1]).collect::<Vec<_>>(), ["a", "b"]);
        assert!(more);
        let (p2, more) = page_of(&all, "b", 250, &read);
        assert_eq!(p2.iter().map(|s| &s[..1]).collect::<Vec<_>>(), ["c"]);
        assert!(more);
        // A record larger than a page still goes, alone.
        let (p3, more) = page_of(&all, "c", 250, &read);
        assert_eq!(p3.iter().map(|s| &s[..1]).collect::<Vec<_>>(), ["d"]);
        assert!(!more);
        let (none, more) = page_of(&all, "d", 250, &read);
        assert!(none.is_empty() && !more);
        // 0: everything at once, as a controller before paging asks.
        let (whole, more) = page_of(&all, "", 0, &read);
        assert_eq!(whole.len(), 4);
        assert!(!more);
    }

    /// A page reads the node's index from where the last one ended, a few records past what it
    /// holds: a whole listing in pages reads each record about once, not once per page (which
    /// had made a node of 16,000 volumes take seconds per listing, growing quadratically).
    #[test]
    fn a_listing_in_pages_reads_each_record_about_once() {
        let all: Vec<_> = (0..5000).map(|i| rec(&format!("v{i:05}"), 100)).collect();
        let read = AtomicUsize::new(0);
        let (mut seen, mut after, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (p, more) = page_of(&all, &after, 4096, &read);
            pages += 1;
            after = p.last().map(|s| s[..6].to_string()).unwrap_or_default();
            seen.extend(p.into_iter().map(|s| s[..6].to_string()));
            if !more {
                break;
            }
        }
        let expected: Vec<String> = (0..5000).map(|i| format!("v{i:05}")).collect();
        assert_eq!(seen, expected, "every record once, in order");
        assert!(pages > 100, "pages of 4 KiB: {pages}");
        let read = read.load(Ordering::Relaxed);
        assert!(
            read <= all.len() + pages * LIST_READ,
            "read {read} records for {} in {pages} pages",
            all.len()
        );
        // A page as large as several reads takes them all, in order.
        let (whole, more) = page_of(&all, "", 0, &AtomicUsize::new(0));
        assert_eq!(whole.len(), 5000);
        assert!(!more);
    }
}
