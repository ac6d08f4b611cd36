//! The node's agent service: the `cellar.agent.v1.Agent` RPCs over the node's own engine.
//!
//! Requests are decoded at the edge (a bad one is INVALID_ARGUMENT naming the field), the work
//! runs through [`LocalAgent`] on the blocking pool, and a failure answers with the same code and
//! message as everywhere else in cellar plus the failure itself in the status details, for the
//! controller to rebuild. A call that gives up (timeout, cancelled) does not stop the disk work it
//! started: the engine finishes it, and the controller's retry finds it done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::service::{Interceptor, Routes};
use tonic::{Request, Response, Status, Streaming};

use super::grant::Gatekeeper;
use super::remote::{HostPort, RemoteAgent, Timeouts, MAX_MESSAGE_BYTES, NODE_HEADER};
use super::tls::{self, Callers, Refused, Tls, TlsError};
use super::wire::{self, v1, WireError};
use super::{Agent, LocalAgent};
use crate::server::SocketLimits;
use crate::storage::cbt::{MetadataError, Query, Range, MAX_BATCH};
use crate::storage::engine::{BackupRequest, LocalEngine, NewGroup, NewVolume, Source};
use crate::storage::id::{NodeId, PoolName, SnapshotId};
use crate::storage::transfer::Frame;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The source of an export: required.
fn required_source(m: Option<v1::ContentSource>) -> Result<Source, Status> {
    let m = m.ok_or_else(|| invalid(WireError("source: is required".into())))?;
    wire::source(m).map_err(invalid)
}

/// A request that does not decode is the caller's mistake.
fn invalid(e: WireError) -> Status {
    wire::status(StorageError::Unsupported(e.to_string()))
}

pub struct AgentService {
    agent: Arc<dyn Agent>,
    /// How this node dials another node's agent to pull a copy (its own TLS identity); `None`:
    /// PullVolume is refused.
    peers: Option<(Tls, Timeouts)>,
}

impl AgentService {
    pub fn new(engine: Arc<LocalEngine>) -> AgentService {
        AgentService::over(Arc::new(LocalAgent::listed_by_controller(engine)))
    }

    /// Serves any agent (tests, or a wrapper around the local one).
    pub fn over(agent: Arc<dyn Agent>) -> AgentService {
        AgentService { agent, peers: None }
    }

    /// Lets this node pull copies from other nodes (PullVolume), dialling them with `tls`.
    pub fn pulling_with(self, tls: Tls, timeouts: Timeouts) -> AgentService {
        AgentService {
            peers: Some((tls, timeouts)),
            ..self
        }
    }

    /// The service ready to add to a server: serves only `controller` (the callers whose
    /// certificate names the controller), refuses calls addressed to another node, and takes
    /// messages as large as the controller may send.
    pub fn into_server(
        self,
        controller: Callers,
    ) -> InterceptedService<v1::agent_server::AgentServer<AgentService>, Gate> {
        let node = self.agent.node().clone();
        let server = v1::agent_server::AgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, Gate { node, controller })
    }
}

/// What every call to an agent passes before it runs:
/// - the caller holds the controller's identity, else PERMISSION_DENIED: a node's certificate
///   (which every node holds) must never read, change or delete another node's volumes;
/// - its `cellar-node` header names this node. Missing is INVALID_ARGUMENT (the controller always
///   sends it); another node is UNAVAILABLE: the controller holds a stale address (the node moved,
///   another took its IP) and retries after the right node's next heartbeat.
#[derive(Clone)]
pub struct Gate {
    node: NodeId,
    controller: Callers,
}

impl Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.controller.admit(&req, "the controller")?;
        Ok(addressed_to(&self.node, req)?)
    }
}

/// The call, when its `cellar-node` header names `node`.
fn addressed_to(node: &NodeId, req: Request<()>) -> Result<Request<()>, Refused> {
    match req.metadata().get(NODE_HEADER).map(|v| v.to_str()) {
        None => Err(Refused::NoNode {
            node: node.as_str().to_string(),
        }),
        Some(Ok(n)) if n == node.as_str() => Ok(req),
        Some(n) => Err(Refused::OtherNode {
            serves: node.as_str().to_string(),
            asked: crate::csi::status::bounded(n.unwrap_or("(unreadable)")).into_owned(),
        }),
    }
}

/// The frames of an export as the wire carries them.
async fn export_stream(agent: &dyn Agent, source: Source) -> Reply<FrameStream> {
    let frames = agent.export_data(source).await.map_err(wire::status)?;
    Ok(Response::new(Box::pin(
        frames.map(|r| r.map(v1::DataFrame::from).map_err(wire::status)),
    )))
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<v1::DataFrame, Status>> + Send>>;

/// The one service another node may call on this node: a read of one snapshot or volume, with a
/// grant the controller signed for it (`agent::grant`). It shares the agent's port; the Agent
/// service itself stays the controller's alone.
pub struct TransferService {
    agent: Arc<dyn Agent>,
    gatekeeper: Arc<Gatekeeper>,
}

impl TransferService {
    pub fn new(agent: Arc<dyn Agent>, gatekeeper: Gatekeeper) -> TransferService {
        TransferService {
            agent,
            gatekeeper: Arc::new(gatekeeper),
        }
    }

    /// The service ready to add to a server: refuses calls addressed to another node; the grant
    /// decides the rest.
    pub fn into_server(
        self,
    ) -> InterceptedService<v1::transfer_server::TransferServer<TransferService>, impl Interceptor + Clone> {
        let node = self.agent.node().clone();
        let server = v1::transfer_server::TransferServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, move |req: Request<()>| Ok(addressed_to(&node, req)?))
    }
}

#[tonic::async_trait]
impl v1::transfer_server::Transfer for TransferService {
    type PullStream = FrameStream;

    async fn pull(&self, req: Request<v1::PullRequest>) -> Reply<Self::PullStream> {
        let caller = tls::peer_certificate(&req);
        let r = req.into_inner();
        let asked = required_source(r.source)?;
        let claims = self
            .gatekeeper
            .admit(caller.as_ref(), r.grant, &asked)
            .inspect_err(|e| tracing::warn!(object = %asked, error = %e, "a transfer to another node refused"))?;
        tracing::info!(object = %asked, reader = claims.reader_node.as_str(), "export to another node granted");
        export_stream(self.agent.as_ref(), asked).await
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// A snapshot metadata refusal: a storage error packed as every call packs it, the others (not
/// tracked, other volumes, past the end) by their code alone (`RemoteAgent` reads them back so).
fn metadata_status(e: MetadataError) -> Status {
    match e {
        MetadataError::Storage(s) => wire::status(s),
        other => Status::from(other),
    }
}

#[tonic::async_trait]
impl v1::agent_server::Agent for AgentService {
    type ExportDataStream = FrameStream;
    type BlockRangesStream = Pin<Box<dyn Stream<Item = Result<v1::BlockRangesResponse, Status>> + Send>>;

    async fn block_ranges(&self, req: Request<v1::BlockRangesRequest>) -> Reply<Self::BlockRangesStream> {
        let r = req.into_inner();
        let snapshot = |raw: &str| {
            SnapshotId::parse(raw).map_err(|_| wire::status(StorageError::SnapshotNotFound(raw.to_string())))
        };
        let base = match r.base_snapshot_id.as_str() {
            "" => None,
            b => Some(snapshot(b)?),
        };
        let q = Query {
            base,
            target: snapshot(&r.target_snapshot_id)?,
            starting_offset: r.starting_offset,
        };
        let max = (r.max_results as usize).clamp(1, MAX_BATCH);
        let (capacity, batches) = self.agent.block_ranges(q, max).await.map_err(metadata_status)?;
        let message = move |ranges: Vec<Range>| v1::BlockRangesResponse {
            capacity_bytes: capacity,
            ranges: ranges
                .into_iter()
                .map(|(offset, length)| v1::BlockRange { offset, length })
                .collect(),
        };
        // The first message carries the capacity, whether or not any range follows.
        let rest = batches.map(move |b| b.map(message).map_err(metadata_status));
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(message(Vec::new()))).chain(rest),
        )))
    }

    async fn export_data(&self, req: Request<v1::ExportDataRequest>) -> Reply<Self::ExportDataStream> {
        let source = required_source(req.into_inner().source)?;
        export_stream(self.agent.as_ref(), source).await
    }

    async fn pull_volume(&self, req: Request<v1::PullVolumeRequest>) -> Reply<v1::CreateVolumeResponse> {
        let r = req.into_inner();
        let spec = NewVolume::try_from(
            r.volume
                .ok_or_else(|| invalid(WireError("volume: is required".into())))?,
        )
        .map_err(invalid)?;
        let source = spec
            .source
            .clone()
            .ok_or_else(|| invalid(WireError("volume.source: is required".into())))?;
        let source_node = source
            .node()
            .cloned()
            .ok_or_else(|| invalid(WireError("volume.source: names no node".into())))?;
        let address =
            HostPort::parse(&r.source_address).map_err(|e| invalid(WireError(format!("source_address: {e}"))))?;
        let grant = r.grant.ok_or_else(|| invalid(WireError("grant: is required".into())))?;
        let Some((tls, timeouts)) = &self.peers else {
            return Err(wire::status(StorageError::Unsupported(
                "this agent does not pull copies from other nodes".into(),
            )));
        };
        // A volume made already answers at once (the import checks it matches): no grant spent.
        let frames: super::Frames = if self
            .agent
            .volume_named(spec.name.clone())
            .await
            .map_err(wire::status)?
            .is_some()
        {
            Box::pin(tokio_stream::empty())
        } else {
            let peer = RemoteAgent::new(source_node, address, tls, &r.source_server_name, *timeouts)
                .map_err(|e| invalid(WireError(format!("source_server_name: {e}"))))?;
            tracing::info!(
                volume = spec.name,
                from = peer.node().as_str(),
                "pulling a copy from another node"
            );
            peer.pull(&source, grant).await.map_err(wire::status)?
        };
        let rec = self.agent.import_volume(spec, frames).await.map_err(wire::status)?;
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some((&rec).into()),
        }))
    }

    async fn import_volume(&self, req: Request<Streaming<v1::ImportVolumeRequest>>) -> Reply<v1::CreateVolumeResponse> {
        use v1::import_volume_request::Kind;
        let mut stream = req.into_inner();
        let spec = match stream.message().await? {
            Some(v1::ImportVolumeRequest {
                kind: Some(Kind::Volume(v)),
            }) => NewVolume::try_from(v).map_err(invalid)?,
            _ => return Err(invalid(WireError("the first message must be the volume".into()))),
        };
        let frames = stream.map(|m| match m {
            Ok(v1::ImportVolumeRequest {
                kind: Some(Kind::Frame(f)),
            }) => Frame::try_from(f).map_err(|e| StorageError::Transfer(format!("a frame that does not decode: {e}"))),
            Ok(_) => Err(StorageError::Transfer(
                "a message after the first that is not a frame".into(),
            )),
            Err(s) => Err(StorageError::Transfer(format!("the stream broke: {}", s.message()))),
        });
        let rec = self
            .agent
            .import_volume(spec, Box::pin(frames))
            .await
            .map_err(wire::status)?;
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some((&rec).into()),
        }))
    }

    async fn create_volume(&self, req: Request<v1::CreateVolumeRequest>) -> Reply<v1::CreateVolumeResponse> {
        let spec = NewVolume::try_from(req.into_inner()).map_err(invalid)?;
        let rec = self.agent.create_volume(spec).await.map_err(wire::status)?;
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some((&rec).into()),
        }))
    }

    async fn delete_volume(&self, req: Request<v1::DeleteVolumeRequest>) -> Reply<v1::DeleteVolumeResponse> {
        let id = wire::volume_id("volume_id", &req.into_inner().volume_id).map_err(invalid)?;
        self.agent.delete_volume(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn expand_volume(&self, req: Request<v1::ExpandVolumeRequest>) -> Reply<v1::ExpandVolumeResponse> {
        let r = req.into_inner();
        let id = wire::volume_id("volume_id", &r.volume_id).map_err(invalid)?;
        let (rec, node_expansion_required) = self
            .agent
            .expand_volume(id, wire::capacity(r.capacity))
            .await
            .map_err(wire::status)?;
        Ok(Response::new(v1::ExpandVolumeResponse {
            volume: Some((&rec).into()),
            node_expansion_required,
        }))
    }

    async fn modify_volume(&self, req: Request<v1::ModifyVolumeRequest>) -> Reply<v1::ModifyVolumeResponse> {
        let r = req.into_inner();
        let id = wire::volume_id("volume_id", &r.volume_id).map_err(invalid)?;
        let m = wire::mutable(r.mutable_parameters).map_err(invalid)?;
        let rec = self.agent.modify_volume(id, m).await.map_err(wire::status)?;
        Ok(Response::new(v1::ModifyVolumeResponse {
            volume: Some((&rec).into()),
        }))
    }

    async fn get_volume(&self, req: Request<v1::GetVolumeRequest>) -> Reply<v1::GetVolumeResponse> {
        let id = wire::volume_id("volume_id", &req.into_inner().volume_id).map_err(invalid)?;
        let found = self.agent.volume(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::GetVolumeResponse {
            volume: found.map(|(r, c)| wire::volume_with_condition(&r, &c)),
        }))
    }

    async fn list_volumes(&self, req: Request<v1::ListVolumesRequest>) -> Reply<v1::ListVolumesResponse> {
        let r = req.into_inner();
        let (page, more) = self
            .agent
            .volumes_page(r.after_id, r.max_bytes)
            .await
            .map_err(wire::status)?;
        let volumes = page.iter().map(|(v, c)| wire::volume_with_condition(v, c)).collect();
        Ok(Response::new(v1::ListVolumesResponse { volumes, more }))
    }

    async fn volume_named(&self, req: Request<v1::VolumeNamedRequest>) -> Reply<v1::VolumeNamedResponse> {
        let name = wire::name("name", req.into_inner().name).map_err(invalid)?;
        let found = self.agent.volume_named(name).await.map_err(wire::status)?;
        Ok(Response::new(v1::VolumeNamedResponse {
            volume: found.as_ref().map(Into::into),
        }))
    }

    async fn snapshot_named(&self, req: Request<v1::SnapshotNamedRequest>) -> Reply<v1::SnapshotNamedResponse> {
        let name = wire::name("name", req.into_inner().name).map_err(invalid)?;
        let found = self.agent.snapshot_named(name).await.map_err(wire::status)?;
        Ok(Response::new(v1::SnapshotNamedResponse {
            snapshot: found.as_ref().map(Into::into),
        }))
    }

    async fn create_snapshot(&self, req: Request<v1::CreateSnapshotRequest>) -> Reply<v1::CreateSnapshotResponse> {
        let r = req.into_inner();
        let name = wire::name("name", r.name).map_err(invalid)?;
        let source = wire::volume_id("source_volume_id", &r.source_volume_id).map_err(invalid)?;
        let backup = match r.backup_repository {
            Some(repo) => Some(BackupRequest {
                repository: PoolName::parse(&repo)
                    .map_err(|e| invalid(wire::WireError(format!("backup_repository: {}", e.0))))?,
                keep_local: r.backup_keep_local,
            }),
            None => None,
        };
        let snap = self
            .agent
            .create_snapshot(name, source, r.freeze, backup)
            .await
            .map_err(wire::status)?;
        Ok(Response::new(v1::CreateSnapshotResponse {
            snapshot: Some((&snap).into()),
        }))
    }

    async fn delete_snapshot(&self, req: Request<v1::DeleteSnapshotRequest>) -> Reply<v1::DeleteSnapshotResponse> {
        let raw = req.into_inner().snapshot_id;
        if raw.starts_with("backup:") {
            let id = wire::backup_id("snapshot_id", &raw).map_err(invalid)?;
            let held = self.agent.forget_backup(id).await.map_err(wire::status)?;
            return Ok(Response::new(v1::DeleteSnapshotResponse { held }));
        }
        let id = wire::snapshot_id("snapshot_id", &raw).map_err(invalid)?;
        self.agent.delete_snapshot(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::DeleteSnapshotResponse { held: false }))
    }

    async fn list_snapshots(&self, req: Request<v1::ListSnapshotsRequest>) -> Reply<v1::ListSnapshotsResponse> {
        let r = req.into_inner();
        let (page, more) = self
            .agent
            .snapshots_page(r.after_id, r.max_bytes)
            .await
            .map_err(wire::status)?;
        let snapshots = page.iter().map(Into::into).collect();
        Ok(Response::new(v1::ListSnapshotsResponse { snapshots, more }))
    }

    async fn pools(&self, _: Request<v1::PoolsRequest>) -> Reply<v1::PoolsResponse> {
        let pools = self.agent.pools().await.map_err(wire::status)?;
        Ok(Response::new(v1::PoolsResponse {
            pools: pools.iter().map(Into::into).collect(),
        }))
    }

    async fn static_exists(&self, req: Request<v1::StaticExistsRequest>) -> Reply<v1::StaticExistsResponse> {
        let id = wire::static_id("static_id", &req.into_inner().static_id).map_err(invalid)?;
        let exists = self.agent.static_exists(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::StaticExistsResponse { exists }))
    }

    async fn create_group(&self, req: Request<v1::CreateGroupRequest>) -> Reply<v1::CreateGroupResponse> {
        let group = NewGroup::try_from(req.into_inner()).map_err(invalid)?;
        let made = self.agent.create_group(group).await.map_err(wire::status)?;
        Ok(Response::new(v1::CreateGroupResponse {
            group: Some((&made).into()),
        }))
    }

    async fn delete_group(&self, req: Request<v1::DeleteGroupRequest>) -> Reply<v1::DeleteGroupResponse> {
        let id = wire::group_id("group_id", &req.into_inner().group_id).map_err(invalid)?;
        self.agent.delete_group(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::DeleteGroupResponse {}))
    }

    async fn get_group(&self, req: Request<v1::GetGroupRequest>) -> Reply<v1::GetGroupResponse> {
        let id = wire::group_id("group_id", &req.into_inner().group_id).map_err(invalid)?;
        let found = self.agent.group(id).await.map_err(wire::status)?;
        Ok(Response::new(v1::GetGroupResponse {
            group: found.as_ref().map(Into::into),
        }))
    }

    async fn group_named(&self, req: Request<v1::GroupNamedRequest>) -> Reply<v1::GetGroupResponse> {
        let name = wire::name("name", req.into_inner().name).map_err(invalid)?;
        let found = self.agent.group_named(name).await.map_err(wire::status)?;
        Ok(Response::new(v1::GetGroupResponse {
            group: found.as_ref().map(Into::into),
        }))
    }

    type CutGroupPartStream = Pin<Box<dyn Stream<Item = Result<v1::CutGroupPartReply, Status>> + Send>>;

    /// The node's side of a cut spanning nodes: a rendezvous of two, this node's frozen members and
    /// the controller's `go`, which comes only once every node has frozen.
    async fn cut_group_part(
        &self,
        req: Request<Streaming<v1::CutGroupPartRequest>>,
    ) -> Reply<Self::CutGroupPartStream> {
        use v1::cut_group_part_reply::Step as Answer;
        use v1::cut_group_part_request::Step as Ask;
        let mut asks = req.into_inner();
        let (id, part) = match asks.message().await? {
            Some(v1::CutGroupPartRequest {
                step: Some(Ask::Part(p)),
                group_id,
            }) => (
                wire::group_id("group_id", &group_id).map_err(invalid)?,
                NewGroup::try_from(p).map_err(invalid)?,
            ),
            _ => return Err(invalid(WireError("the first message must be the part".into()))),
        };
        let meet = super::Rendezvous::new(2, part.freeze_timeout);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let talk = {
            let (meet, tx) = (meet.clone(), tx.clone());
            tokio::spawn(async move {
                meet.until_arrived(1).await;
                let frozen = v1::CutGroupPartReply {
                    step: Some(Answer::Frozen(true)),
                };
                if tx.send(Ok(frozen)).await.is_err() {
                    meet.fail();
                    return;
                }
                match asks.message().await {
                    Ok(Some(v1::CutGroupPartRequest {
                        step: Some(Ask::Go(true)),
                        ..
                    })) => {
                        meet.arrive().await;
                    }
                    _ => meet.fail(),
                }
            })
        };
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let cut = agent.cut_group_part(id, part, meet).await;
            talk.abort();
            let answer = cut
                .map(|records| v1::CutGroupPartReply {
                    step: Some(Answer::Done(v1::SnapshotRecords {
                        snapshots: records.iter().map(Into::into).collect(),
                    })),
                })
                .map_err(wire::status);
            let _ = tx.send(answer).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn put_group(&self, req: Request<v1::PutGroupRequest>) -> Reply<v1::PutGroupResponse> {
        let group = req
            .into_inner()
            .group
            .ok_or_else(|| invalid(WireError("group is required".into())))?;
        let rec = crate::storage::record::GroupRecord::try_from(group).map_err(invalid)?;
        self.agent.put_group(rec).await.map_err(wire::status)?;
        Ok(Response::new(v1::PutGroupResponse {}))
    }

    async fn delete_group_part(&self, req: Request<v1::DeleteGroupPartRequest>) -> Reply<v1::DeleteGroupPartResponse> {
        let m = req.into_inner();
        let id = wire::group_id("group_id", &m.group_id).map_err(invalid)?;
        let members = m
            .snapshot_ids
            .iter()
            .map(|s| wire::snapshot_id("snapshot_ids", s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        self.agent.delete_group_part(id, members).await.map_err(wire::status)?;
        Ok(Response::new(v1::DeleteGroupPartResponse {}))
    }
}

/// The connection limits of the agent's and the registry's ports unless told otherwise: callers
/// that say nothing (not even the TLS handshake) are dropped after two minutes; live peers answer
/// the server's pings (every 30 s) and stay; one peer address holds at most a quarter of them (a
/// node pulling many copies from this one opens a connection per copy). The registry's own limit
/// per address is `--max-connections-per-peer`.
pub const TCP_LIMITS: SocketLimits = SocketLimits {
    idle_timeout: Duration::from_secs(120),
    max_connections: 1024,
    max_per_peer: 256,
};

/// Serves gRPC services on a TCP listener with our TLS (mutual, or plaintext when insecure) until
/// `shutdown` resolves, then waits for calls in flight. Used for the node's agent and for the
/// controller's registry, within [`TCP_LIMITS`].
pub async fn serve(
    listener: TcpListener,
    tls: Tls,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_within(listener, TCP_LIMITS, tls, routes, shutdown).await
}

/// [`serve`] within `limits` (at most that many connections, silent ones dropped).
pub async fn serve_within(
    listener: TcpListener,
    limits: SocketLimits,
    tls: Tls,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let incoming = crate::server::incoming_tcp(listener, limits, "the agent or registry port");
    tls.server_builder()?
        .max_concurrent_streams(crate::server::MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::agent::LIST_READ;

    /// The agent's own listing, page after page as the controller asks it, names every volume and
    /// snapshot of the node once, in id order, across reads of its index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_lists_its_objects_in_pages_each_once_in_order() {
        use super::wire::v1::agent_server::Agent as _;
        use super::{v1, AgentService};
        use crate::storage::config::Config;
        use crate::storage::engine::{LocalEngine, NewVolume};
        use crate::storage::id::NodeId;
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Arc::new(
            LocalEngine::open(NodeId::parse("n1").expect("node"), &Config::default_for(dir.path())).expect("engine"),
        );
        let count = 2 * LIST_READ + 40;
        for i in 0..count {
            let v = engine
                .create_volume(NewVolume::plain(&format!("pvc-{i}"), None, 1 << 20))
                .expect("create");
            if i % 50 == 0 {
                engine
                    .create_snapshot(&format!("snap-{i}"), &v.id, false)
                    .expect("snapshot");
            }
        }
        let service = AgentService::new(engine.clone());
        let (mut ids, mut after, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let r = v1::ListVolumesRequest {
                max_bytes: 4096,
                after_id: after.clone(),
            };
            let answer = service
                .list_volumes(tonic::Request::new(r))
                .await
                .expect("list")
                .into_inner();
            pages += 1;
            assert!(
                !answer.volumes.is_empty() || !answer.more,
                "a page holds at least one volume"
            );
            ids.extend(
                answer
                    .volumes
                    .iter()
                    .map(|v| v.volume.as_ref().expect("record").id.clone()),
            );
            after = ids.last().cloned().unwrap_or_default();
            if !answer.more {
                break;
            }
        }
        let mut expected: Vec<String> = engine.volumes().iter().map(|v| v.id.to_string()).collect();
        expected.sort();
        assert_eq!(ids.len(), count);
        assert_eq!(ids, expected, "each volume once, in id order");
        assert!(pages > 2, "pages of 4 KiB: {pages}");
        let (mut snaps, mut after) = (Vec::new(), String::new());
        loop {
            let r = v1::ListSnapshotsRequest {
                max_bytes: 1,
                after_id: after.clone(),
            };
            let answer = service
                .list_snapshots(tonic::Request::new(r))
                .await
                .expect("list")
                .into_inner();
            snaps.extend(answer.snapshots.iter().map(|s| s.id.clone()));
            after = snaps.last().cloned().unwrap_or_default();
            if !answer.more {
                break;
            }
        }
        let mut expected: Vec<String> = engine.snapshots().iter().map(|s| s.id.to_string()).collect();
        expected.sort();
        assert_eq!(snaps.len(), count.div_ceil(50));
        assert_eq!(snaps, expected, "each snapshot once, in id order, one per page");
    }
}
