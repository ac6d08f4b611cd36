//! The controller's client for one node's agent: the [`Agent`] trait over gRPC.
//!
//! Every call is bounded by a timeout, so a hung node costs the controller at most that long. A node
//! that cannot be reached, or does not answer in time, is a `StorageError` that maps to UNAVAILABLE
//! and names the node (Kubernetes retries it); every other failure comes back as the very error the
//! node's engine returned.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::tls::{Tls, TlsError};
use super::wire::{self, v1, v1::agent_client::AgentClient, v1::transfer_client::TransferClient};
use super::{Agent, Frames, RangeBatches, Rendezvous, FRAMES_IN_FLIGHT};
use crate::storage::cbt::{MetadataError, Query, Range, MAX_BATCH};
use crate::storage::engine::{
    BackupRequest, CapacityRange, Condition, Mutable, NewGroup, NewVolume, PoolStatus, Source,
};
use crate::storage::id::{BackupId, GroupId, Location, NodeId, ObjectId, SnapshotId, StaticId, VolumeId};
use crate::storage::record::{GroupRecord, SnapshotRecord, VolumeRecord};
use crate::storage::transfer::Frame;
use crate::storage::StorageError;
use crate::sys::SysError;
use std::sync::Arc;

/// The request header naming the node a call is meant for; an agent serving another node refuses
/// it, so a stale address never sends a call to the wrong node.
pub const NODE_HEADER: &str = "cellar-node";

/// The largest message of a transfer (a frame carries at most 1 MiB of data) or a batch of
/// changed blocks, either way.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// What one page of a node's listing may hold, as asked (the node fills it up to this).
const LIST_PAGE_BYTES: u32 = 256 << 10;
/// The largest answer of a node decoded here, but for transfers and changed blocks: twice a
/// listing's page (a node's own answers never come near it). Small on purpose: protobuf decodes a
/// two-byte empty record into a whole struct, so a lying node's answer of 512 KiB may cost the
/// controller a few dozen MiB for a moment, where one of 64 MiB could cost gigabytes.
const MAX_ANSWER_BYTES: usize = 2 * LIST_PAGE_BYTES as usize;
/// The most records a node's listing may hold (far above what a node holds: 1,000 nodes of 100
/// volumes is the scale cellar is measured at); past it the listing is refused.
pub const MAX_LISTED_PER_NODE: usize = 200_000;
/// What a node's listing may cost the controller until its last page, counted as the records hold
/// it ([`Answered::held`]); past it the listing is refused (a bad answer). Some 70,000 volumes as
/// external-provisioner makes them with its metadata (about 900 bytes each); each record is
/// bounded on its own (`wire::MAX_NAME` and the rest), but 200,000 of them at their bounds would be
/// gigabytes.
pub const MAX_LISTING_BYTES: usize = 64 << 20;

/// What a node in split mode lets each of its listings (volumes, snapshots) grow to. By default
/// three quarters of what the controller takes of a node ([`MAX_LISTED_PER_NODE`],
/// [`MAX_LISTING_BYTES`]), so that conditions longer than foreseen and creates racing the check
/// stay within the controller's bound. Past it a new volume or snapshot is RESOURCE_EXHAUSTED
/// naming the bound (some 40,000 volumes as external-provisioner makes them): a node whose
/// listing the controller refused would leave every volume on it unlisted.
#[derive(Debug, Clone, Copy)]
pub struct NodeListing {
    pub records: usize,
    pub bytes: usize,
}

impl NodeListing {
    pub const DEFAULT: NodeListing = NodeListing {
        records: MAX_LISTED_PER_NODE / 4 * 3,
        bytes: MAX_LISTING_BYTES / 4 * 3,
    };

    /// Whether `adding` more `what` (each weighing about as much as those held) fit beside
    /// `(records, bytes)` held.
    pub fn admits(&self, what: &str, (records, bytes): (usize, usize), adding: usize) -> Result<(), StorageError> {
        let each = bytes.checked_div(records).unwrap_or(0);
        let records_after = records.saturating_add(adding);
        let bytes_after = bytes.saturating_add(each.saturating_mul(adding));
        if records_after <= self.records && bytes_after <= self.bytes {
            return Ok(());
        }
        Err(StorageError::Exhausted(format!(
            "this node holds {records} {what} ({} KiB as the controller lists them); a node in split mode \
             holds at most {} {what} or {} MiB of them, so that the controller can list it whole: delete \
             some, or create on another node",
            bytes >> 10,
            self.records,
            self.bytes >> 20,
        )))
    }
}

/// What a volume weighs in the controller's listing of its node: its record and what its
/// condition may add ([`Answered::held`]).
pub fn volume_listed(r: &VolumeRecord) -> usize {
    r.held() + std::mem::size_of::<Condition>() + CONDITION_ALLOWANCE
}

/// What a snapshot weighs in the controller's listing of its node.
pub fn snapshot_held(r: &SnapshotRecord) -> usize {
    r.held()
}

/// The condition message a volume's listing is counted with ahead of time: the longest the
/// node's own conditions say (a volume over its capacity, a missing image; about 250 bytes), with
/// room to spare.
const CONDITION_ALLOWANCE: usize = 384;

/// `HOST:PORT` where a peer listens: a DNS name, an IPv4 address or a bracketed IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address '{given}' {why}")]
pub struct AddressError {
    given: String,
    why: String,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, AddressError> {
        let err = |why: &str| AddressError {
            given: s.to_string(),
            why: why.to_string(),
        };
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| err("is not HOST:PORT (e.g. 10.0.0.5:7070 or cellar-controller:7070)"))?;
        let port: u16 = port.parse().map_err(|_| err("has no valid port (1-65535)"))?;
        if port == 0 {
            return Err(err("has port 0; give the port peers can reach"));
        }
        let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => Some(IpAddr::V6(v6.parse().map_err(|_| err("has a bad IPv6 address"))?)),
            None => host.parse::<IpAddr>().ok(),
        };
        match ip {
            Some(IpAddr::V6(_)) if !host.starts_with('[') => {
                return Err(err("needs brackets around an IPv6 address ([::1]:7070)"))
            }
            Some(ip) if ip.is_unspecified() => {
                return Err(err("is unspecified; give an address peers can reach"));
            }
            Some(_) => {}
            None => {
                let dns_ok = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
                if !dns_ok {
                    return Err(err("has a host that is neither an IP address nor a DNS name"));
                }
            }
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    /// The host as given (IPv6 keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host without IPv6 brackets, for DNS lookups and TLS names.
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// How long the controller waits for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (the TLS handshake has its own bound).
    pub connect: Duration,
    /// Reads: get, list, look up by name, pools.
    pub call: Duration,
    /// Calls that change storage and may copy data: create, delete, expand, modify, snapshot.
    /// When one runs out the node still finishes the work; the retry finds it done (or ABORTED
    /// while it is still running).
    pub storage: Duration,
    /// A node's whole listing (ListVolumes, ListSnapshots), every page of it: each page has the
    /// `call` deadline, and a node answering each just in time, always saying more remain, would
    /// otherwise hold its listing (and every listing of the cluster waiting for it) for ever.
    pub listing: Duration,
}

impl Timeouts {
    /// How many read calls' time a node's whole listing may take by default.
    pub const LISTING_CALLS: u32 = 4;
}

impl Default for Timeouts {
    fn default() -> Self {
        let call = Duration::from_secs(15);
        Timeouts {
            connect: Duration::from_secs(5),
            call,
            storage: Duration::from_secs(120),
            listing: Timeouts::LISTING_CALLS * call,
        }
    }
}

/// A node is unavailable: UNAVAILABLE, naming the node and why.
pub fn unavailable(node: &NodeId, why: impl fmt::Display) -> StorageError {
    StorageError::Unavailable(format!("node {} is unavailable ({why})", node.as_str()))
}

/// Whether a failure is the transport's or the registry's (the node could not be reached, did
/// not answer in time, or is not heartbeating), as [`unavailable`] words it for this node, rather
/// than the node's own answer (which may be UNAVAILABLE too, for an I/O error on its pool).
pub fn is_unreachable(node: &NodeId, e: &StorageError) -> bool {
    matches!(e, StorageError::Unavailable(m) if m.starts_with(&format!("node {} is unavailable (", node.as_str())))
}

/// The status and the chain of errors under it, in one line.
fn status_text(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = e.source();
    }
    text
}

#[derive(Clone)]
pub struct RemoteAgent {
    node: NodeId,
    address: HostPort,
    /// Answers of at most [`MAX_ANSWER_BYTES`].
    client: AgentClient<Channel>,
    /// The same connection, for the data of transfers and changed blocks ([`MAX_MESSAGE_BYTES`]).
    bulk: AgentClient<Channel>,
    /// The same connection, for a node pulling another node's data with a grant.
    transfer: TransferClient<Channel>,
    /// A connection of its own for changed block answers ([`METADATA_STREAM_WINDOW`]).
    metadata: AgentClient<Channel>,
    timeouts: Timeouts,
}

/// What the controller takes of one changed block answer from its node before its own client
/// reads it. An answer a client holds unread keeps that much in the connection's window; the
/// answers have a connection of their own, so even many held answers (each under this) never
/// hold up the node's other calls, whose answers need room in their connection's window.
const METADATA_STREAM_WINDOW: u32 = 64 << 10;

/// Where a node pulls a copy from, and the grant the controller signed for it.
#[derive(Debug, Clone)]
pub struct PullFrom {
    pub address: HostPort,
    /// The name the source node's certificate must carry.
    pub server_name: String,
    pub grant: v1::TransferGrant,
}

impl RemoteAgent {
    /// A client for `node`'s agent at `address`, expecting `server_name` on its certificate. Does
    /// not connect: the first call does, and every call reconnects if it must. Runs inside a Tokio
    /// runtime (the channel's worker is spawned there).
    pub fn new(
        node: NodeId,
        address: HostPort,
        tls: &Tls,
        server_name: &str,
        timeouts: Timeouts,
    ) -> Result<RemoteAgent, TlsError> {
        let channel = tls.lazy_channel(&address.to_string(), server_name, timeouts.connect, |e| {
            e.http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })?;
        let client = AgentClient::new(channel.clone())
            .max_decoding_message_size(MAX_ANSWER_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let bulk = AgentClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let transfer = TransferClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let metadata = tls.lazy_channel(&address.to_string(), server_name, timeouts.connect, |e| {
            e.http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .initial_stream_window_size(METADATA_STREAM_WINDOW)
                // Room for every stream the node lets it carry: at the default 5 MiB, 80 answers
                // held unread filled the window and every other answer waited for their cut-off.
                .initial_connection_window_size(METADATA_STREAM_WINDOW * crate::server::MAX_STREAMS_PER_CONNECTION)
        })?;
        let metadata = AgentClient::new(metadata)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(RemoteAgent {
            node,
            address,
            client,
            bulk,
            transfer,
            metadata,
            timeouts,
        })
    }

    pub fn address(&self) -> &HostPort {
        &self.address
    }

    /// A request addressed to this node, with a gRPC deadline when given one.
    fn request<Q>(&self, msg: Q, deadline: Option<Duration>) -> Request<Q> {
        let mut req = Request::new(msg);
        if let Some(limit) = deadline {
            req.set_timeout(limit);
        }
        if let Ok(v) = MetadataValue::try_from(self.node.as_str()) {
            req.metadata_mut().insert(NODE_HEADER, v);
        }
        req
    }

    /// One call: bounded, addressed to this node, its failure turned back into a `StorageError`.
    async fn call<Q, A, F, Fut>(&self, rpc: &'static str, limit: Duration, msg: Q, f: F) -> Result<A, StorageError>
    where
        F: FnOnce(AgentClient<Channel>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<Response<A>, Status>>,
    {
        let req = self.request(msg, Some(limit));
        match tokio::time::timeout(limit, f(self.client.clone(), req)).await {
            Ok(r) => r.map(Response::into_inner).map_err(|s| self.failed(rpc, limit, s)),
            Err(_) => Err(self.silent(rpc, limit)),
        }
    }

    /// A failed call, counted.
    fn failed(&self, rpc: &'static str, limit: Duration, s: Status) -> StorageError {
        crate::metrics::record_agent_error(self.node.as_str(), rpc, s.code());
        self.error(rpc, limit, s)
    }

    /// No answer in time, counted.
    fn silent(&self, rpc: &'static str, limit: Duration) -> StorageError {
        crate::metrics::record_agent_error(self.node.as_str(), rpc, Code::Unavailable);
        self.unreachable(rpc, format!("no answer within {limit:?}"))
    }

    fn unreachable(&self, rpc: &str, why: impl fmt::Display) -> StorageError {
        unavailable(&self.node, format!("agent at {}, {rpc}: {why}", self.address))
    }

    /// The error behind a failed call. The agent packs its engine's error into the status; a status
    /// without one came from the transport (or a foreign server) and is mapped by its code.
    fn error(&self, rpc: &str, limit: Duration, s: Status) -> StorageError {
        if let Some(e) = wire::failure(&s).and_then(|f| wire::storage_error(&self.node, f)) {
            return e;
        }
        let text = status_text(&s);
        // A status with a cause attached was made here, from a failed connection (a refused TLS
        // handshake, a reset stream); one the agent sent has none.
        let local = std::error::Error::source(&s).is_some();
        match s.code() {
            Code::DeadlineExceeded => self.unreachable(rpc, format!("no answer within {limit:?}")),
            c if wire::is_unreachable(c) || (c == Code::Unknown && local) => self.unreachable(rpc, text),
            Code::InvalidArgument => StorageError::Unsupported(text),
            Code::AlreadyExists => StorageError::Conflict(text),
            Code::OutOfRange => StorageError::OutOfRange(text),
            Code::ResourceExhausted => StorageError::Exhausted(text),
            Code::FailedPrecondition => StorageError::PoolUnusable(text),
            Code::NotFound => StorageError::VolumeNotFound(text),
            Code::Aborted => StorageError::Busy(text),
            // Internal, Unknown, Unimplemented, Unauthenticated, PermissionDenied, DataLoss: a
            // fault of the deployment, not of the request; INTERNAL with the node's words.
            c => self.malformed(rpc, format!("{c:?}: {text}")),
        }
    }

    /// A stream of frames (ExportData, Pull). A transfer has no deadline as a whole (a large
    /// volume takes long): its start is bounded like a read, and then each frame must come within
    /// the storage timeout.
    async fn frames<F>(&self, rpc: &'static str, start_call: F) -> Result<Frames, StorageError>
    where
        F: Future<Output = Result<Response<tonic::Streaming<v1::DataFrame>>, Status>>,
    {
        let (start, idle) = (self.timeouts.call, self.timeouts.storage);
        let stream = match tokio::time::timeout(start, start_call).await {
            Ok(r) => r.map_err(|s| self.failed(rpc, start, s))?.into_inner(),
            Err(_) => return Err(self.silent(rpc, start)),
        };
        let me = self.clone();
        Ok(Box::pin(stream.timeout(idle).map(move |item| match item {
            Err(_) => Err(me.silent(rpc, idle)),
            Ok(Err(s)) => Err(me.failed(rpc, idle, s)),
            Ok(Ok(m)) => me.decode(rpc, Frame::try_from(m)),
        })))
    }

    /// Another node's side of a copy: reads `source` from this node's Transfer service with the
    /// controller's grant.
    pub async fn pull(&self, source: &Source, grant: v1::TransferGrant) -> Result<Frames, StorageError> {
        let req = self.request(
            v1::PullRequest {
                source: Some(source.into()),
                grant: Some(grant),
            },
            None,
        );
        let mut client = self.transfer.clone();
        self.frames("Pull", client.pull(req)).await
    }

    /// Has this node create `req` by pulling its source from another node (`from`). Like an
    /// import, it has no deadline as a whole and runs in its own task: a CreateVolume that gives
    /// up does not cut the transfer, and the retry finds the volume made.
    pub async fn pull_volume(&self, req: &NewVolume, from: PullFrom) -> Result<VolumeRecord, StorageError> {
        const RPC: &str = "PullVolume";
        let asked = req;
        let msg = v1::PullVolumeRequest {
            volume: Some(req.into()),
            source_address: from.address.to_string(),
            source_server_name: from.server_name,
            grant: Some(from.grant),
        };
        let req = self.request(msg, None);
        let mut client = self.bulk.clone();
        let made = tokio::spawn(async move { client.pull_volume(req).await })
            .await
            .map_err(|e| self.unreachable(RPC, format!("the transfer task failed: {e}")))?;
        let r = made
            .map_err(|s| self.failed(RPC, self.timeouts.storage, s))?
            .into_inner();
        let v = self.present(RPC, "volume", r.volume)?;
        self.made_for(RPC, asked, self.decode(RPC, v.try_into())?)
    }

    /// The agent answered something this controller cannot use: INTERNAL naming the node.
    fn malformed(&self, rpc: &str, why: impl fmt::Display) -> StorageError {
        StorageError::Sys(SysError::Tool {
            tool: format!("{rpc} on node {} (agent at {})", self.node.as_str(), self.address),
            status: "bad answer".into(),
            stderr: why.to_string(),
        })
    }

    fn decode<T, E: fmt::Display>(&self, rpc: &str, r: Result<T, E>) -> Result<T, StorageError> {
        r.map_err(|e| self.malformed(rpc, e))
    }

    fn present<T>(&self, rpc: &str, field: &str, m: Option<T>) -> Result<T, StorageError> {
        m.ok_or_else(|| self.malformed(rpc, format!("the reply has no {field}")))
    }
}

/// A record a node answers about one of its objects: where the object is and the name it was
/// created under, which the controller checks before it believes the answer ([`RemoteAgent`]).
trait Answered {
    const WHAT: &'static str;
    fn object(&self) -> &ObjectId;
    fn shown(&self) -> String;
    fn name(&self) -> &str;
    /// About the bytes the record holds in memory, its strings and maps included.
    fn held(&self) -> usize {
        std::mem::size_of_val(self)
    }
    /// What in the record contradicts where the object is, if anything.
    fn contradiction(&self) -> Option<String> {
        None
    }
}

impl Answered for VolumeRecord {
    const WHAT: &'static str = "volume";
    fn object(&self) -> &ObjectId {
        &self.id.0
    }
    fn shown(&self) -> String {
        self.id.to_string()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn held(&self) -> usize {
        // A map entry: its two strings and a share of the tree's node.
        let entry = 2 * std::mem::size_of::<String>() + 16;
        std::mem::size_of::<Self>()
            + self.name.len()
            + self.fs_type.len()
            + self.access_modes.len()
            + self
                .parameters
                .iter()
                .map(|(k, v)| entry + k.len() + v.len())
                .sum::<usize>()
    }
}

impl Answered for (VolumeRecord, Condition) {
    const WHAT: &'static str = "volume";
    fn object(&self) -> &ObjectId {
        self.0.object()
    }
    fn shown(&self) -> String {
        self.0.shown()
    }
    fn name(&self) -> &str {
        self.0.name()
    }
    fn held(&self) -> usize {
        self.0.held() + std::mem::size_of::<Condition>() + self.1.message.len()
    }
}

impl Answered for SnapshotRecord {
    const WHAT: &'static str = "snapshot";
    fn object(&self) -> &ObjectId {
        &self.id.0
    }
    fn shown(&self) -> String {
        self.id.to_string()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn held(&self) -> usize {
        std::mem::size_of::<Self>() + self.name.len()
    }
    /// A snapshot is cut in its source volume's pool: a record naming a source elsewhere (another
    /// node's volume) would hand the CO a snapshot of a volume that node never held.
    fn contradiction(&self) -> Option<String> {
        let (at, from) = (&self.id.0, &self.source_volume_id.0);
        (at.location != from.location || at.pool != from.pool).then(|| {
            format!(
                "the snapshot {} names the source volume {}, not in its pool",
                self.id, self.source_volume_id
            )
        })
    }
}

impl Answered for GroupRecord {
    const WHAT: &'static str = "group snapshot";
    fn object(&self) -> &ObjectId {
        &self.id.0
    }
    fn shown(&self) -> String {
        self.id.to_string()
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// What a node answers is checked against what that node can hold. Its certificate proves only
/// which node it is; the ids it answers go to Kubernetes, and the deletes, grants and copies the
/// controller later makes act on the objects those ids name. So a record naming another node (or
/// a shared pool, which the controller serves itself), a lookup answering another name than the
/// one asked, or a create answering another pool than the one asked is a bad answer (INTERNAL
/// naming the node), never an id handed on.
impl RemoteAgent {
    /// A record of an object on this node.
    fn own<T: Answered>(&self, rpc: &str, rec: T) -> Result<T, StorageError> {
        match rec.object().node() {
            Some(n) if *n == self.node => match rec.contradiction() {
                Some(why) => Err(self.malformed(rpc, why)),
                None => Ok(rec),
            },
            _ => Err(self.malformed(
                rpc,
                format!("the {} {} is not on node {}", T::WHAT, rec.shown(), self.node.as_str()),
            )),
        }
    }

    /// A record of this node's object made or found under `name`.
    fn own_named<T: Answered>(&self, rpc: &str, name: &str, rec: T) -> Result<T, StorageError> {
        if rec.name() != name {
            return Err(self.malformed(
                rpc,
                format!(
                    "asked for the {} named '{name}', it answered {} named '{}'",
                    T::WHAT,
                    rec.shown(),
                    rec.name()
                ),
            ));
        }
        self.own(rpc, rec)
    }

    /// The record of the very object asked about (get, expand, modify).
    fn same<T: Answered>(&self, rpc: &str, asked: &ObjectId, rec: T) -> Result<T, StorageError> {
        let rec = self.own(rpc, rec)?;
        if rec.object() != asked {
            return Err(self.malformed(
                rpc,
                format!("asked about the {} {asked}, it answered {}", T::WHAT, rec.shown()),
            ));
        }
        Ok(rec)
    }

    /// The answer to a lookup by name. A node opens the shared pools it publishes volumes of, so
    /// an honest node may find a shared pool's object by its name: that is no answer for this
    /// node (the controller looks in the shared pools itself), not a bad one.
    fn found<T: Answered>(&self, rpc: &str, name: &str, rec: Option<T>) -> Result<Option<T>, StorageError> {
        match rec {
            Some(r) if r.object().location == Location::Shared => Ok(None),
            Some(r) => self.own_named(rpc, name, r).map(Some),
            None => Ok(None),
        }
    }

    /// A listing of this node's objects. The shared pools' records an honest node also lists
    /// (it opens those pools to publish their volumes) are dropped: the controller owns the
    /// shared pools and lists them itself. A record of another node fails the whole listing, as
    /// an answer that does not decode does: nothing else in it can be believed either.
    /// Every page of a listing, asked with the last id seen, until the node says no more remain:
    /// each page's ids must come after the last one's, in order (so a node cannot keep a listing
    /// going for ever), and at most [`MAX_LISTED_PER_NODE`] records, holding at most
    /// [`MAX_LISTING_BYTES`], in all (it is kept whole until its last page). The whole listing must
    /// end within [`Timeouts::listing`]: past it the node counts as not answering (UNAVAILABLE
    /// naming it, as for a call that timed out), whatever it answered so far.
    async fn pages<T, F, Fut>(&self, rpc: &'static str, mut ask: F) -> Result<Vec<T>, StorageError>
    where
        T: Answered,
        F: FnMut(String) -> Fut,
        Fut: Future<Output = Result<(Vec<T>, bool), StorageError>>,
    {
        let limit = self.timeouts.listing;
        let mut pages = 0usize;
        let listing = async {
            let mut all: Vec<T> = Vec::new();
            let mut after = String::new();
            let mut held = 0usize;
            loop {
                let (page, more) = ask(after.clone()).await?;
                pages += 1;
                for r in &page {
                    let id = r.shown();
                    if id <= after {
                        return Err(self.malformed(rpc, format!("listed {id} after {after}: out of order")));
                    }
                    after = id;
                }
                if all.len() + page.len() > MAX_LISTED_PER_NODE {
                    return Err(self.malformed(rpc, format!("it lists more than {MAX_LISTED_PER_NODE} records")));
                }
                held += page.iter().map(Answered::held).sum::<usize>();
                if held > MAX_LISTING_BYTES {
                    let why = format!("its listing holds more than {} MiB", MAX_LISTING_BYTES >> 20);
                    return Err(self.malformed(rpc, why));
                }
                let done = !more || page.is_empty();
                all.extend(page);
                if done {
                    return Ok(all);
                }
            }
        };
        match tokio::time::timeout(limit, listing).await {
            Ok(answer) => answer,
            Err(_) => {
                crate::metrics::record_agent_error(self.node.as_str(), rpc, Code::Unavailable);
                Err(self.unreachable(rpc, format!("its listing did not end within {limit:?} ({pages} pages)")))
            }
        }
    }

    fn listed<T: Answered>(&self, rpc: &str, recs: Vec<T>) -> Result<Vec<T>, StorageError> {
        recs.into_iter()
            .filter(|r| r.object().location != Location::Shared)
            .map(|r| self.own(rpc, r))
            .collect()
    }

    /// The volume a create (or a copy) made for `req`: this node's, under the name asked, in the
    /// pool asked when the request named one.
    fn made_for(&self, rpc: &str, req: &NewVolume, rec: VolumeRecord) -> Result<VolumeRecord, StorageError> {
        let rec = self.own_named(rpc, &req.name, rec)?;
        match &req.pool {
            Some(pool) if rec.id.0.pool != *pool => Err(self.malformed(
                rpc,
                format!("asked for a volume in pool '{}', it answered {}", pool.as_str(), rec.id),
            )),
            _ => Ok(rec),
        }
    }

    /// A snapshot cut of `source` (here: a volume of this node), which lives where its source does.
    fn cut_of(&self, rpc: &str, source: &VolumeId, rec: SnapshotRecord) -> Result<SnapshotRecord, StorageError> {
        let rec = self.own(rpc, rec)?;
        let beside = rec.id.0.location == source.0.location && rec.id.0.pool == source.0.pool;
        if rec.source_volume_id != *source || !beside {
            return Err(self.malformed(
                rpc,
                format!(
                    "asked for a snapshot of volume {source}, it answered {} of volume {}",
                    rec.id, rec.source_volume_id
                ),
            ));
        }
        Ok(rec)
    }

    /// A group snapshot's record: the group on this node, each member snapshot where its volume
    /// is (a group cut across nodes has members on other nodes; their own nodes delete only
    /// snapshots marked as this group's).
    fn group_of_mine(&self, rpc: &str, rec: GroupRecord) -> Result<GroupRecord, StorageError> {
        let rec = self.own(rpc, rec)?;
        for m in &rec.members {
            let (s, v) = (&m.snapshot_id.0, &m.volume_id.0);
            if s.location != v.location || s.pool != v.pool {
                return Err(self.malformed(
                    rpc,
                    format!(
                        "group snapshot {} has member {} of volume {}, which is elsewhere",
                        rec.id, m.snapshot_id, m.volume_id
                    ),
                ));
            }
        }
        Ok(rec)
    }

    /// The group a CreateGroup made for `req` (volumes of this node only): its members are the
    /// volumes asked.
    fn group_made_for(&self, rpc: &str, req: &NewGroup, rec: GroupRecord) -> Result<GroupRecord, StorageError> {
        let rec = self.group_of_mine(rpc, self.own_named(rpc, &req.name, rec)?)?;
        let mut had: Vec<&VolumeId> = rec.members.iter().map(|m| &m.volume_id).collect();
        let mut asked: Vec<&VolumeId> = req.members.iter().collect();
        had.sort();
        asked.sort();
        if had != asked {
            return Err(self.malformed(
                rpc,
                format!("group snapshot {} holds other volumes than the ones asked", rec.id),
            ));
        }
        Ok(rec)
    }
}

impl RemoteAgent {
    /// DeleteSnapshot on the node: a snapshot's id, or a backup's for the node's part of it.
    /// The node's DeleteSnapshot; whether it held a part of the backup `snapshot_id` names.
    async fn delete_snapshot_named(&self, snapshot_id: String) -> Result<bool, StorageError> {
        let msg = v1::DeleteSnapshotRequest { snapshot_id };
        let r = self
            .call("DeleteSnapshot", self.timeouts.storage, msg, |mut c, r| async move {
                c.delete_snapshot(r).await
            })
            .await?;
        Ok(r.held)
    }

    /// A failed BlockRanges. The agent sends its metadata refusals by their code alone (a storage
    /// error comes packed as in every call); a node without the call is not tracked either.
    fn metadata_failed(&self, rpc: &'static str, limit: Duration, s: Status) -> MetadataError {
        if wire::failure(&s).is_none() {
            let text = status_text(&s);
            match s.code() {
                Code::FailedPrecondition => return MetadataError::NotTracked(text),
                Code::Unimplemented => {
                    return MetadataError::NotTracked(format!(
                        "node {} runs a cellar without changed block tracking; upgrade it, or back its snapshots up in full",
                        self.node.as_str()
                    ))
                }
                Code::InvalidArgument => return MetadataError::DifferentVolumes(text),
                Code::OutOfRange => return MetadataError::PastEnd(text),
                _ => {}
            }
        }
        MetadataError::Storage(self.failed(rpc, limit, s))
    }
}

/// A node's range batches cut to at most `max` ranges each, in order.
struct Cut {
    batches: RangeBatches,
    max: usize,
    left: std::collections::VecDeque<Range>,
}

impl tokio_stream::Stream for Cut {
    type Item = Result<Vec<Range>, MetadataError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.left.is_empty() {
            match std::task::ready!(this.batches.as_mut().poll_next(cx)) {
                Some(Ok(batch)) if batch.len() > this.max => this.left.extend(batch),
                other => return std::task::Poll::Ready(other),
            }
        }
        let n = this.left.len().min(this.max);
        std::task::Poll::Ready(Some(Ok(this.left.drain(..n).collect())))
    }
}

#[tonic::async_trait]
impl Agent for RemoteAgent {
    async fn block_ranges(&self, q: Query, max: usize) -> Result<(u64, RangeBatches), MetadataError> {
        const RPC: &str = "BlockRanges";
        let (start, idle) = (self.timeouts.call, self.timeouts.storage);
        let msg = v1::BlockRangesRequest {
            base_snapshot_id: q.base.map(|b| b.to_string()).unwrap_or_default(),
            target_snapshot_id: q.target.to_string(),
            starting_offset: q.starting_offset,
            // Whatever the client asked: the node's batches come as large as they may be, and are
            // cut to `max` here. A message per range or few (`max_results` 1, say) held unread
            // (a client reading slowly, or not at all) would be thousands of small HTTP/2 frames
            // waiting here, and this client's HTTP/2 library closes the connection that holds
            // too many of them (ENHANCE_YOUR_CALM): every call in flight to the node with it.
            max_results: MAX_BATCH as u32,
        };
        let max = max.max(1);
        let req = self.request(msg, None);
        let mut stream = match tokio::time::timeout(start, self.metadata.clone().block_ranges(req)).await {
            Ok(r) => r.map_err(|s| self.metadata_failed(RPC, start, s))?.into_inner(),
            Err(_) => return Err(self.silent(RPC, start).into()),
        };
        // The first message carries the capacity.
        let first = match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return Err(self.malformed(RPC, "the answer has no message").into()),
            Ok(Err(s)) => return Err(self.metadata_failed(RPC, idle, s)),
            Err(_) => return Err(self.silent(RPC, idle).into()),
        };
        let capacity = first.capacity_bytes;
        if i64::try_from(capacity).is_err() || q.starting_offset >= capacity {
            let why = format!("a capacity of {capacity} bytes for ranges from {}", q.starting_offset);
            return Err(MetadataError::Storage(self.malformed(RPC, why)));
        }
        // Every range as the spec has them, or the answer is a bad one: the client (a backup
        // tool) must never be handed ranges out of order, overlapping or past the end.
        let mut next = q.starting_offset;
        let me = self.clone();
        let mut ranges = move |m: v1::BlockRangesResponse| -> Result<Vec<Range>, MetadataError> {
            if m.ranges.len() > MAX_BATCH {
                let why = format!("{} ranges in one message, {MAX_BATCH} asked for", m.ranges.len());
                return Err(MetadataError::Storage(me.malformed(RPC, why)));
            }
            let mut batch = Vec::with_capacity(m.ranges.len());
            for r in m.ranges {
                let end = r.offset.checked_add(r.length).filter(|e| *e <= capacity);
                if r.length == 0 || r.offset < next || end.is_none() {
                    let why = format!(
                        "range of {} bytes at {} after the last one ended at {next}, in a snapshot of {capacity} bytes",
                        r.length, r.offset
                    );
                    return Err(MetadataError::Storage(me.malformed(RPC, why)));
                }
                next = end.unwrap_or(capacity);
                batch.push((r.offset, r.length));
            }
            Ok(batch)
        };
        let first = ranges(first)?;
        let me = self.clone();
        let rest = stream.timeout(idle).map(move |item| match item {
            Err(_) => Err(me.silent(RPC, idle).into()),
            Ok(Err(s)) => Err(me.metadata_failed(RPC, idle, s)),
            Ok(Ok(m)) => ranges(m),
        });
        // The node's cut-off frees its files, not this call: a client that holds its answer
        // unread would hold the call, one of the few the connection to the node carries at once
        // (a few hundred so held made every later answer of the node UNAVAILABLE), so it has a
        // cut-off of its own. One batch waits here, beside the one `Cut` is handing out.
        // (Empty messages kept the answer alive through a long stretch without a difference.)
        let batches = Cut {
            batches: super::cut_off_when_unread(Box::pin(tokio_stream::once(Ok(first)).chain(rest)), 1),
            max,
            left: std::collections::VecDeque::new(),
        };
        Ok((
            capacity,
            Box::pin(batches.filter(|b| !matches!(b, Ok(v) if v.is_empty()))),
        ))
    }

    fn node(&self) -> &NodeId {
        &self.node
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord, StorageError> {
        const RPC: &str = "CreateVolume";
        let msg = v1::CreateVolumeRequest::from(&req);
        let r = self
            .call(RPC, self.timeouts.storage, msg, |mut c, r| async move {
                c.create_volume(r).await
            })
            .await?;
        let v = self.present(RPC, "volume", r.volume)?;
        self.made_for(RPC, &req, self.decode(RPC, v.try_into())?)
    }

    async fn delete_volume(&self, id: VolumeId) -> Result<(), StorageError> {
        let msg = v1::DeleteVolumeRequest {
            volume_id: id.to_string(),
        };
        self.call("DeleteVolume", self.timeouts.storage, msg, |mut c, r| async move {
            c.delete_volume(r).await
        })
        .await?;
        Ok(())
    }

    async fn expand_volume(&self, id: VolumeId, range: CapacityRange) -> Result<(VolumeRecord, bool), StorageError> {
        const RPC: &str = "ExpandVolume";
        let msg = v1::ExpandVolumeRequest {
            volume_id: id.to_string(),
            capacity: Some(range.into()),
        };
        let r = self
            .call(RPC, self.timeouts.storage, msg, |mut c, r| async move {
                c.expand_volume(r).await
            })
            .await?;
        let v = self.present(RPC, "volume", r.volume)?;
        let rec = self.same(RPC, &id.0, self.decode(RPC, v.try_into())?)?;
        Ok((rec, r.node_expansion_required))
    }

    async fn modify_volume(&self, id: VolumeId, m: Mutable) -> Result<VolumeRecord, StorageError> {
        const RPC: &str = "ModifyVolume";
        let msg = v1::ModifyVolumeRequest {
            volume_id: id.to_string(),
            mutable_parameters: Some((&m).into()),
        };
        let r = self
            .call(RPC, self.timeouts.storage, msg, |mut c, r| async move {
                c.modify_volume(r).await
            })
            .await?;
        let v = self.present(RPC, "volume", r.volume)?;
        self.same(RPC, &id.0, self.decode(RPC, v.try_into())?)
    }

    async fn volume(&self, id: VolumeId) -> Result<Option<(VolumeRecord, Condition)>, StorageError> {
        const RPC: &str = "GetVolume";
        let msg = v1::GetVolumeRequest {
            volume_id: id.to_string(),
        };
        let r = self
            .call(
                RPC,
                self.timeouts.call,
                msg,
                |mut c, r| async move { c.get_volume(r).await },
            )
            .await?;
        r.volume
            .map(|v| self.same(RPC, &id.0, self.decode(RPC, wire::volume_and_condition(v))?))
            .transpose()
    }

    async fn volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>, StorageError> {
        const RPC: &str = "ListVolumes";
        let all = self
            .pages(RPC, |after| async move {
                let msg = v1::ListVolumesRequest {
                    max_bytes: LIST_PAGE_BYTES,
                    after_id: after,
                };
                let r = self
                    .call(RPC, self.timeouts.call, msg, |mut c, r| async move {
                        c.list_volumes(r).await
                    })
                    .await?;
                let page = r
                    .volumes
                    .into_iter()
                    .map(|v| self.decode(RPC, wire::volume_and_condition(v)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((page, r.more))
            })
            .await?;
        self.listed(RPC, all)
    }

    async fn volume_named(&self, name: String) -> Result<Option<VolumeRecord>, StorageError> {
        const RPC: &str = "VolumeNamed";
        let r = self
            .call(
                RPC,
                self.timeouts.call,
                v1::VolumeNamedRequest { name: name.clone() },
                |mut c, r| async move { c.volume_named(r).await },
            )
            .await?;
        let found = r.volume.map(|v| self.decode(RPC, v.try_into())).transpose()?;
        self.found(RPC, &name, found)
    }

    async fn snapshot_named(&self, name: String) -> Result<Option<SnapshotRecord>, StorageError> {
        const RPC: &str = "SnapshotNamed";
        let r = self
            .call(
                RPC,
                self.timeouts.call,
                v1::SnapshotNamedRequest { name: name.clone() },
                |mut c, r| async move { c.snapshot_named(r).await },
            )
            .await?;
        let found = r.snapshot.map(|s| self.decode(RPC, s.try_into())).transpose()?;
        self.found(RPC, &name, found)
    }

    async fn create_snapshot(
        &self,
        name: String,
        source: VolumeId,
        freeze: bool,
        backup: Option<BackupRequest>,
    ) -> Result<SnapshotRecord, StorageError> {
        const RPC: &str = "CreateSnapshot";
        let msg = v1::CreateSnapshotRequest {
            name: name.clone(),
            source_volume_id: source.to_string(),
            freeze,
            backup_repository: backup.as_ref().map(|b| b.repository.as_str().to_string()),
            backup_keep_local: backup.as_ref().is_some_and(|b| b.keep_local),
        };
        let r = self
            .call(RPC, self.timeouts.storage, msg, |mut c, r| async move {
                c.create_snapshot(r).await
            })
            .await?;
        let s = self.present(RPC, "snapshot", r.snapshot)?;
        let rec = self.own_named(RPC, &name, self.decode(RPC, s.try_into())?)?;
        self.cut_of(RPC, &source, rec)
    }

    async fn delete_snapshot(&self, id: SnapshotId) -> Result<(), StorageError> {
        self.delete_snapshot_named(id.to_string()).await.map(drop)
    }

    async fn forget_backup(&self, id: BackupId) -> Result<bool, StorageError> {
        // The node's DeleteSnapshot takes a backup id for its part of the backup.
        self.delete_snapshot_named(id.to_string()).await
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StorageError> {
        const RPC: &str = "ListSnapshots";
        let all = self
            .pages(RPC, |after| async move {
                let msg = v1::ListSnapshotsRequest {
                    max_bytes: LIST_PAGE_BYTES,
                    after_id: after,
                };
                let r = self
                    .call(RPC, self.timeouts.call, msg, |mut c, r| async move {
                        c.list_snapshots(r).await
                    })
                    .await?;
                let page = r
                    .snapshots
                    .into_iter()
                    .map(|s| self.decode(RPC, s.try_into()))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((page, r.more))
            })
            .await?;
        self.listed(RPC, all)
    }

    async fn pools(&self) -> Result<Vec<PoolStatus>, StorageError> {
        const RPC: &str = "Pools";
        let r = self
            .call(RPC, self.timeouts.call, v1::PoolsRequest {}, |mut c, r| async move {
                c.pools(r).await
            })
            .await?;
        self.decode(RPC, wire::pools(r.pools))
    }

    async fn static_exists(&self, id: StaticId) -> Result<bool, StorageError> {
        let msg = v1::StaticExistsRequest {
            static_id: id.to_string(),
        };
        let r = self
            .call("StaticExists", self.timeouts.call, msg, |mut c, r| async move {
                c.static_exists(r).await
            })
            .await?;
        Ok(r.exists)
    }

    /// A transfer has no deadline as a whole (a large volume takes long): its start is bounded
    /// like a read, and then each frame must come within the storage timeout.
    async fn export_data(&self, source: Source) -> Result<Frames, StorageError> {
        let req = self.request(
            v1::ExportDataRequest {
                source: Some((&source).into()),
            },
            None,
        );
        let mut client = self.bulk.clone();
        self.frames("ExportData", client.export_data(req)).await
    }

    /// When `frames` fails (the source node), the stream to this node ends short, which this node
    /// refuses and cleans up; the source's error is then the answer, not this node's view of it.
    /// The controller relays the data this way (`--node-transfers=via-controller`), counted as
    /// `relay` bytes.
    async fn import_volume(&self, req: NewVolume, frames: Frames) -> Result<VolumeRecord, StorageError> {
        use v1::import_volume_request::Kind;
        const RPC: &str = "ImportVolume";
        let asked = &req;
        let first = v1::ImportVolumeRequest {
            kind: Some(Kind::Volume((&req).into())),
        };
        // The frames reach the stream to this node through a channel, which also keeps the
        // request a plain stream type (tonic's client-streaming future must be provably Send).
        let (tx, rx) = tokio::sync::mpsc::channel(FRAMES_IN_FLIGHT);
        let pump = tokio::spawn(async move {
            let mut frames = frames;
            if tx.send(first).await.is_err() {
                return None;
            }
            let mut chunks = 0;
            while let Some(item) = frames.next().await {
                let m = match item {
                    Ok(f) => {
                        if let Frame::Chunk { data, .. } = &f {
                            crate::metrics::record_transfer_bytes("relay", data.len() as u64);
                            chunks += 1;
                            if chunks == 8 {
                                crate::crash::point("transfer:mid-pipe");
                            }
                        }
                        v1::ImportVolumeRequest {
                            kind: Some(Kind::Frame(f.into())),
                        }
                    }
                    Err(e) => return Some(e),
                };
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            None
        });
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx), None);
        // Its own task: a CreateVolume that gives up does not cut a transfer that is under way; the
        // retry finds the volume made (or ABORTED while the transfer still runs).
        let mut client = self.bulk.clone();
        let made = tokio::spawn(async move { client.import_volume(req).await })
            .await
            .map_err(|e| self.unreachable(RPC, format!("the transfer task failed: {e}")))?;
        if made.is_ok() {
            pump.abort();
        } else if let Ok(Some(e)) = pump.await {
            return Err(e);
        }
        let r = made
            .map_err(|s| self.failed(RPC, self.timeouts.storage, s))?
            .into_inner();
        let v = self.present(RPC, "volume", r.volume)?;
        self.made_for(RPC, asked, self.decode(RPC, v.try_into())?)
    }

    async fn create_group(&self, req: NewGroup) -> Result<GroupRecord, StorageError> {
        const RPC: &str = "CreateGroup";
        let msg = v1::CreateGroupRequest::from(&req);
        let r = self
            .call(RPC, self.timeouts.storage, msg, |mut c, r| async move {
                c.create_group(r).await
            })
            .await?;
        let rec = self.decode(RPC, self.present(RPC, "group", r.group)?.try_into())?;
        self.group_made_for(RPC, &req, rec)
    }

    async fn delete_group(&self, id: GroupId) -> Result<(), StorageError> {
        let msg = v1::DeleteGroupRequest {
            group_id: id.to_string(),
        };
        self.call("DeleteGroup", self.timeouts.storage, msg, |mut c, r| async move {
            c.delete_group(r).await
        })
        .await?;
        Ok(())
    }

    async fn group(&self, id: GroupId) -> Result<Option<GroupRecord>, StorageError> {
        let msg = v1::GetGroupRequest {
            group_id: id.to_string(),
        };
        const RPC: &str = "GetGroup";
        let r = self
            .call(
                RPC,
                self.timeouts.call,
                msg,
                |mut c, r| async move { c.get_group(r).await },
            )
            .await?;
        r.group
            .map(|g| self.group_of_mine(RPC, self.same(RPC, &id.0, self.decode(RPC, g.try_into())?)?))
            .transpose()
    }

    async fn group_named(&self, name: String) -> Result<Option<GroupRecord>, StorageError> {
        let msg = v1::GroupNamedRequest { name: name.clone() };
        const RPC: &str = "GroupNamed";
        let r = self
            .call(RPC, self.timeouts.call, msg, |mut c, r| async move {
                c.group_named(r).await
            })
            .await?;
        let found = r.group.map(|g| self.decode(RPC, g.try_into())).transpose()?;
        self.found(RPC, &name, found)?
            .map(|g| self.group_of_mine(RPC, g))
            .transpose()
    }

    async fn cut_group_part(
        &self,
        id: GroupId,
        req: NewGroup,
        meet: Arc<Rendezvous>,
    ) -> Result<Vec<SnapshotRecord>, StorageError> {
        use v1::cut_group_part_reply::Step as Reply;
        use v1::cut_group_part_request::Step as Ask;
        const RPC: &str = "CutGroupPart";
        let limit = req.freeze_timeout + self.timeouts.storage;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let ask = |step| v1::CutGroupPartRequest {
            step: Some(step),
            group_id: id.to_string(),
        };
        let _ = tx.send(ask(Ask::Part((&req).into()))).await;
        let call = async {
            let mut replies = self
                .client
                .clone()
                .cut_group_part(self.request(tokio_stream::wrappers::ReceiverStream::new(rx), Some(limit)))
                .await?
                .into_inner();
            let mut met = false;
            loop {
                match replies.message().await? {
                    Some(v1::CutGroupPartReply {
                        step: Some(Reply::Frozen(_)),
                    }) if !met => {
                        met = true;
                        let go = meet.arrive().await;
                        // A node that hears nothing more gives up by itself: sending may fail.
                        let _ = tx.send(ask(Ask::Go(go))).await;
                    }
                    Some(v1::CutGroupPartReply {
                        step: Some(Reply::Done(d)),
                    }) => return Ok(Ok(d.snapshots)),
                    other => return Ok(Err(format!("an unexpected reply {other:?}"))),
                }
            }
        };
        let answer: Result<Result<Vec<v1::SnapshotRecord>, String>, Status> =
            match tokio::time::timeout(limit, call).await {
                Ok(a) => a,
                Err(_) => {
                    meet.fail();
                    return Err(self.silent(RPC, limit));
                }
            };
        let records = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                meet.fail();
                return Err(self.malformed(RPC, why));
            }
            Err(s) => {
                meet.fail();
                return Err(self.failed(RPC, limit, s));
            }
        };
        // Each record is a snapshot of one of the members asked, beside it on this node.
        records
            .into_iter()
            .map(|r| {
                let rec = self.decode(RPC, SnapshotRecord::try_from(r))?;
                match req.members.iter().find(|v| **v == rec.source_volume_id) {
                    Some(v) => self.cut_of(RPC, v, rec),
                    None => Err(self.malformed(
                        RPC,
                        format!(
                            "it answered snapshot {} of volume {}, not a member asked",
                            rec.id, rec.source_volume_id
                        ),
                    )),
                }
            })
            .collect()
    }

    async fn put_group(&self, rec: GroupRecord) -> Result<(), StorageError> {
        let msg = v1::PutGroupRequest {
            group: Some((&rec).into()),
        };
        self.call("PutGroup", self.timeouts.storage, msg, |mut c, r| async move {
            c.put_group(r).await
        })
        .await?;
        Ok(())
    }

    async fn delete_group_part(&self, id: GroupId, members: Vec<SnapshotId>) -> Result<(), StorageError> {
        let msg = v1::DeleteGroupPartRequest {
            group_id: id.to_string(),
            snapshot_ids: members.iter().map(ToString::to_string).collect(),
        };
        self.call("DeleteGroupPart", self.timeouts.storage, msg, |mut c, r| async move {
            c.delete_group_part(r).await
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_accepts_names_and_addresses() {
        for ok in [
            "cellar-controller.cellar.svc:7070",
            "10.0.0.5:7070",
            "[fd00::5]:7070",
            "node-1:1",
        ] {
            assert_eq!(HostPort::parse(ok).unwrap().to_string(), ok);
        }
        assert_eq!(HostPort::parse("[::1]:9").unwrap().bare_host(), "::1");
    }

    #[test]
    fn host_port_refuses_what_no_peer_can_dial() {
        for bad in [
            "",
            "host",
            "host:",
            ":7070",
            "host:0",
            "host:70000",
            "0.0.0.0:7070",
            "[::]:7070",
            "::1:7070",
            "[zz]:1",
            "a b:1",
            "http://x:1",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unavailable_names_the_node_and_is_unavailable() {
        let s = Status::from(unavailable(&NodeId::parse("node-7").unwrap(), "gone"));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("node-7 is unavailable (gone)"), "{}", s.message());
    }

    fn agent() -> RemoteAgent {
        RemoteAgent::new(
            NodeId::parse("node-1").unwrap(),
            HostPort::parse("127.0.0.1:9").unwrap(),
            &Tls::Insecure,
            "cellar-agent",
            Timeouts::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn statuses_without_details_keep_their_code() {
        let a = agent();
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::FailedPrecondition,
            Code::Unavailable,
            Code::Internal,
        ] {
            let e = a.error("GetVolume", Duration::from_secs(1), Status::new(code, "why"));
            assert_eq!(Status::from(e).code(), code);
        }
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            let e = a.error("GetVolume", Duration::from_secs(1), Status::new(code, "why"));
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Unavailable);
            assert!(s.message().contains("node-1"), "{}", s.message());
        }
        let e = a.error("GetVolume", Duration::from_secs(1), Status::unimplemented("old agent"));
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(
            s.message().contains("node node-1") && s.message().contains("old agent"),
            "{}",
            s.message()
        );
    }
}
