//! The `arbor.v1.Coordinator` gRPC service: thin glue between tonic and [`Membership`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_proto::v1::coordinator_server::Coordinator;
use arbor_proto::v1::{
    CheckpointDoneReply, CheckpointDoneRequest, HeartbeatReply, HeartbeatRequest, JoinReply,
    JoinRequest, RequestCheckpointReply, RequestCheckpointRequest, ShardChunk, ShardHeader,
    ShardItem, ShardRequest, StatusReply, StatusRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::membership::requests::{CheckpointReport, ShardAsk, WorkerHeartbeat, WorkerJoin};
use super::membership::{Membership, MembershipError, RefusalCode};
use super::metrics::Metrics;
use crate::dataset::{Dataset, ValidationItem};

/// Items per streamed chunk.
pub const SHARD_CHUNK_ITEMS: usize = 1024;

/// State shared by the service and the ticker.
pub struct Shared {
    pub membership: Mutex<Membership>,
    /// Bumped whenever the membership changes, to wake Join and Shard waiters.
    pub changed: watch::Sender<u64>,
    pub config_toml: String,
    pub dataset: Arc<Dataset>,
    pub metrics: Metrics,
    pub wait_limit: Duration,
}

impl Shared {
    /// The gRPC status of a refusal, counted in `arbor_refused_requests_total` by reason: the
    /// one place where the membership's errors meet the transport.
    fn refuse(&self, error: MembershipError) -> Status {
        if let Some(reason) = error.refusal_reason() {
            self.metrics.refuse(reason);
        }
        let message = error.to_string();
        match error.code() {
            RefusalCode::InvalidArgument => Status::invalid_argument(message),
            RefusalCode::OutOfRange => Status::out_of_range(message),
            RefusalCode::FailedPrecondition => Status::failed_precondition(message),
            RefusalCode::NotFound => Status::not_found(message),
            RefusalCode::PermissionDenied => Status::permission_denied(message),
            RefusalCode::Unavailable => Status::unavailable(message),
            RefusalCode::Internal => Status::internal(message),
        }
    }

    /// A request converted to its validated domain value; a refusal counts against the worker
    /// that sent it (see `Membership::refused`).
    fn validated<Request, Validated>(
        &self,
        worker_id: &str,
        request: Request,
    ) -> Result<Validated, Status>
    where
        Validated: TryFrom<Request, Error = MembershipError>,
    {
        Validated::try_from(request).map_err(|error| {
            let error = self.lock().refused(worker_id, error);
            self.notify();
            self.refuse(error)
        })
    }

    pub fn notify(&self) {
        self.changed.send_modify(|version| *version += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Clone)]
pub struct CoordinatorService {
    pub shared: Arc<Shared>,
}

/// Removes a waiting worker if its Join call is dropped before a reply.
struct JoinGuard {
    shared: Arc<Shared>,
    worker_id: String,
    armed: bool,
}

impl Drop for JoinGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().abandon_join(&self.worker_id);
            self.shared.notify();
        }
    }
}

type ShardStream = Pin<Box<dyn Stream<Item = Result<ShardChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let request = request.into_inner();
        let join: WorkerJoin = self.shared.validated(&request.worker_id.clone(), request)?;
        let worker_id = join.worker_id.clone();
        self.shared
            .lock()
            .register_join(join)
            .map_err(|e| self.shared.refuse(e))?;
        self.shared.notify();
        let mut guard = JoinGuard {
            shared: self.shared.clone(),
            worker_id: worker_id.clone(),
            armed: true,
        };
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.shared.wait_limit;
        loop {
            changes.borrow_and_update();
            if let Some(reply) = self
                .shared
                .lock()
                .join_reply(&worker_id, &self.shared.config_toml)
                .map_err(|e| self.shared.refuse(e))?
            {
                guard.armed = false;
                debug!(
                    worker_id,
                    rank = reply.rank,
                    generation = reply.generation,
                    "join answered"
                );
                return Ok(Response::new(reply));
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Status::deadline_exceeded(
                    "no group formed within join_timeout_s",
                ));
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let heartbeat: WorkerHeartbeat =
            self.shared.validated(&request.worker_id.clone(), request)?;
        let reply = self
            .shared
            .lock()
            .heartbeat(&heartbeat)
            .map_err(|e| self.shared.refuse(e))?;
        self.shared.notify();
        Ok(Response::new(reply))
    }

    type ShardStream = ShardStream;

    async fn shard(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<Self::ShardStream>, Status> {
        let request = request.into_inner();
        let ask: ShardAsk = self.shared.validated(&request.worker_id.clone(), request)?;
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.shared.wait_limit;
        let source = loop {
            changes.borrow_and_update();
            let source = self
                .shared
                .lock()
                .shard_source(&ask)
                .map_err(|e| self.shared.refuse(e))?;
            if let Some(source) = source {
                break source;
            }
            // The epoch asked for starts once every rank finished the current one.
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(Status::deadline_exceeded(format!(
                    "epoch {} did not start in time",
                    ask.epoch
                )));
            }
        };
        let shard_len = source.plan.shard_len();
        let header = ShardHeader {
            epoch: ask.epoch,
            segment: source.segment,
            shard_len,
            bsz: source.plan.params().bsz,
            start_batch: source.start_batch,
            seed: source.plan.params().seed,
            checkpoint_batches: source.checkpoint_batches.to_vec(),
            validation_items: rank_validation_items(
                &self.shared.dataset.validation,
                ask.member.rank,
                source.plan.params().world_size,
            ),
        };
        let (sender, receiver) = mpsc::channel(8);
        let dataset = self.shared.dataset.clone();
        let metrics = self.shared.metrics.clone();
        let rank = ask.member.rank;
        let start_index = ask.start_index;
        let shared = self.shared.clone();
        let (worker_id, generation, stream) =
            (ask.member.worker_id, ask.member.generation, source.stream);
        tokio::task::spawn_blocking(move || {
            let plan = source.plan;
            let world_size = u64::from(plan.params().world_size);
            let mut header = Some(header);
            let mut index = start_index;
            loop {
                let end = (index + SHARD_CHUNK_ITEMS as u64).min(shard_len);
                let items: Vec<ShardItem> = (index..end)
                    .map(|step| {
                        let position = plan.position_at(u64::from(rank) + step * world_size);
                        let record = &dataset.records[position as usize];
                        ShardItem {
                            id: record.id,
                            bucket: u32::from(dataset.items.bucket(position)),
                            key: record.key.clone(),
                            caption: record.caption.clone(),
                            width: record.width,
                            height: record.height,
                        }
                    })
                    .collect();
                let count = items.len() as u64;
                let chunk = ShardChunk {
                    header: header.take(),
                    first_index: index,
                    items,
                };
                if sender.blocking_send(Ok(chunk)).is_err() {
                    warn!(rank, index, "shard stream closed by the worker");
                    shared
                        .lock()
                        .shard_stream_cut(&worker_id, generation, stream);
                    return;
                }
                metrics.shard_items_streamed.inc_by(count);
                index = end;
                if index >= shard_len {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn checkpoint_done(
        &self,
        request: Request<CheckpointDoneRequest>,
    ) -> Result<Response<CheckpointDoneReply>, Status> {
        let request = request.into_inner();
        let report: CheckpointReport =
            self.shared.validated(&request.worker_id.clone(), request)?;
        let complete = self
            .shared
            .lock()
            .checkpoint_done(&report)
            .map_err(|e| self.shared.refuse(e))?;
        self.shared.notify();
        Ok(Response::new(CheckpointDoneReply { complete }))
    }

    async fn request_checkpoint(
        &self,
        request: Request<RequestCheckpointRequest>,
    ) -> Result<Response<RequestCheckpointReply>, Status> {
        let request = request.into_inner();
        if request.reason.len() > 1024 {
            return Err(self.shared.refuse(MembershipError::malformed(
                "request_checkpoint.reason",
                format!("{} bytes, at most 1024", request.reason.len()),
            )));
        }
        let reason = if request.reason.is_empty() {
            "asked for by `arbor checkpoint`".to_string()
        } else {
            request.reason
        };
        let reply = self
            .shared
            .lock()
            .request_checkpoint(&reason, request.export)
            .map_err(|e| self.shared.refuse(e))?;
        self.shared.notify();
        Ok(Response::new(reply))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(self.shared.lock().status()))
    }
}

/// Rank `rank`'s share of the validation items: every `world_size`-th, from its index.
fn rank_validation_items(
    validation: &[ValidationItem],
    rank: u32,
    world_size: u32,
) -> Vec<ShardItem> {
    validation
        .iter()
        .skip(rank as usize)
        .step_by(world_size.max(1) as usize)
        .map(|item| ShardItem {
            id: item.record.id,
            bucket: u32::from(item.bucket),
            key: item.record.key.clone(),
            caption: item.record.caption.clone(),
            width: item.record.width,
            height: item.record.height,
        })
        .collect()
}
