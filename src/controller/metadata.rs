//! The SnapshotMetadata service (CSI changed block tracking): the allocated ranges of a snapshot
//! and the ranges changed between two snapshots of one volume, streamed in bounded messages as
//! the owning node's walk finds them (`storage::cbt`). The external-snapshot-metadata sidecar
//! calls it on the controller's socket; docs/cbt.md says what each layout guarantees.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::ControllerError;
use crate::agent::{Agent, Directory, RangeBatches};
use crate::csi::v1::snapshot_metadata_server::SnapshotMetadata;
use crate::csi::v1::*;
use crate::server::trace::note;
use crate::storage::cbt::{MetadataError, Query, Range, MAX_BATCH};
use crate::storage::id::SnapshotId;

/// Ranges per message when the client leaves `max_results` at 0.
pub const DEFAULT_RESULTS: usize = 256;

pub struct SnapshotMetadataService {
    directory: Arc<dyn Directory>,
}

impl SnapshotMetadataService {
    pub fn new(directory: Arc<dyn Directory>) -> Self {
        SnapshotMetadataService { directory }
    }

    /// The node serving a snapshot id from outside, or NOT_FOUND.
    fn owner(&self, field: &'static str, raw: &str) -> Result<(SnapshotId, Arc<dyn Agent>), ControllerError> {
        if raw.is_empty() {
            return Err(ControllerError::missing(field));
        }
        let not_found = || ControllerError::not_found(format!("snapshot {raw} not found"));
        if crate::storage::id::BackupId::parse(raw).is_ok() {
            // It may well exist: its blocks are in its repository, which this service does not read.
            return Err(MetadataError::NotTracked(format!(
                "{field} {} is a backup: changed block tracking serves the snapshots of image volumes kept on a node; back it up in full, or ask about the local snapshot it was cut from",
                crate::csi::status::bounded(raw)
            ))
            .into());
        }
        let id = SnapshotId::parse(raw).map_err(|_| not_found())?;
        let agent = match id.0.node() {
            Some(n) => self.directory.owner(n),
            None => self.directory.shared(),
        };
        Ok((id, agent.ok_or_else(not_found)?))
    }

    /// The answer to a query (no base: allocated ranges), one message of `make` per batch.
    async fn answer<T: Send + 'static>(
        &self,
        base: Option<&str>,
        target: &str,
        starting_offset: i64,
        max_results: i32,
        make: fn(i32, i64, Vec<BlockMetadata>) -> T,
    ) -> Result<Answer<T>, ControllerError> {
        let (offset, max) = (offset(starting_offset)?, results(max_results)?);
        let base = base.map(|b| self.owner("base_snapshot_id", b)).transpose()?;
        let (target, agent) = self.owner("target_snapshot_id", target)?;
        if let Some((base, base_agent)) = &base {
            // Snapshots of one volume live in its pool, on its node.
            if base_agent.node() != agent.node() {
                return Err(MetadataError::DifferentVolumes(format!(
                    "snapshots {base} and {target} are of volumes on different nodes ({} and {}): a delta is between two snapshots of one volume",
                    base_agent.node().as_str(),
                    agent.node().as_str()
                ))
                .into());
            }
        }
        let q = Query {
            base: base.map(|(b, _)| b),
            target,
            starting_offset: offset,
        };
        let (capacity, batches) = agent.block_ranges(q, max).await?;
        messages(capacity, batches, make).await
    }
}

fn offset(v: i64) -> Result<u64, ControllerError> {
    u64::try_from(v)
        .map_err(|_| ControllerError::invalid(format!("starting_offset {v} is negative; it is a byte offset from 0")))
}

fn results(v: i32) -> Result<usize, ControllerError> {
    match v {
        0 => Ok(DEFAULT_RESULTS),
        n if n < 0 => Err(ControllerError::invalid(format!(
            "max_results {n} is negative; 0 lets the driver choose"
        ))),
        n => Ok((n as usize).min(MAX_BATCH)),
    }
}

type Answer<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The messages of an answer: every range batch with the capacity and the (variable-length)
/// style. The first batch is awaited here, so a failure before any range is the call's status, and
/// an answer without ranges is one empty message (the client still learns the capacity).
async fn messages<T: Send + 'static>(
    capacity: u64,
    mut batches: RangeBatches,
    make: fn(i32, i64, Vec<BlockMetadata>) -> T,
) -> Result<Answer<T>, ControllerError> {
    let first = match batches.next().await {
        Some(b) => b?,
        None => Vec::new(),
    };
    let (style, capacity) = (BlockMetadataType::VariableLength as i32, capacity as i64);
    let message = move |ranges: Vec<Range>| {
        let blocks = ranges
            .into_iter()
            .map(|(byte_offset, size_bytes)| BlockMetadata {
                byte_offset: byte_offset as i64,
                size_bytes: size_bytes as i64,
            })
            .collect();
        make(style, capacity, blocks)
    };
    // Empty batches after the first only kept a node's answer alive: no client sees them.
    let rest = batches
        .filter(|b| !matches!(b, Ok(v) if v.is_empty()))
        .map(move |b| b.map(message).map_err(Status::from));
    Ok(Box::pin(tokio_stream::once(Ok(message(first))).chain(rest)))
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = Answer<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Answer<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        note(&req, &req.get_ref().snapshot_id);
        let r = req.into_inner();
        let make = |t, c, b| GetMetadataAllocatedResponse {
            block_metadata_type: t,
            volume_capacity_bytes: c,
            block_metadata: b,
        };
        let answer = self.answer(None, &r.snapshot_id, r.starting_offset, r.max_results, make);
        super::answer(answer).await
    }

    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        note(&req, &req.get_ref().target_snapshot_id);
        let r = req.into_inner();
        let make = |t, c, b| GetMetadataDeltaResponse {
            block_metadata_type: t,
            volume_capacity_bytes: c,
            block_metadata: b,
        };
        let (base, target) = (Some(r.base_snapshot_id.as_str()), &r.target_snapshot_id);
        let answer = self.answer(base, target, r.starting_offset, r.max_results, make);
        super::answer(answer).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty batches (a node's walk keeping its answer alive through a stretch without a
    /// difference) reach no client after the first message, which always goes (the capacity).
    #[tokio::test]
    async fn empty_batches_after_the_first_reach_no_client() {
        let batches: Vec<Result<Vec<Range>, MetadataError>> = vec![
            Ok(Vec::new()),
            Ok(Vec::new()),
            Ok(vec![(0, 4096)]),
            Ok(Vec::new()),
            Ok(vec![(8192, 4096)]),
        ];
        let answer = messages(1 << 20, Box::pin(tokio_stream::iter(batches)), |_, capacity, blocks| {
            (
                capacity,
                blocks.iter().map(|b| (b.byte_offset, b.size_bytes)).collect::<Vec<_>>(),
            )
        })
        .await
        .expect("answer");
        let sent: Vec<(i64, Vec<(i64, i64)>)> = answer.map(|m| m.expect("message")).collect().await;
        assert_eq!(
            sent,
            vec![
                (1 << 20, vec![]),
                (1 << 20, vec![(0, 4096)]),
                (1 << 20, vec![(8192, 4096)])
            ]
        );
    }
}
