//! The worker's main loop: join → shard → sample → train → heartbeat → checkpoint, and back
//! to join on a regroup (docs/architecture.md §1 steps 3–6).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arbor_common::assign::BucketedItems;
use arbor_common::buckets::BucketTable;
use arbor_common::config::JobConfig;
use arbor_common::sampler::{RankSampler, SamplerKey};
use arbor_proto::v1::{
    CheckpointDoneRequest, CompletedBatch, JoinReply, JoinRequest, ShardHeader, ShardRequest,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::{connect, is_transient, Client};
use crate::data_failure_budget::DataFailureBudget;
use crate::error::RuntimeError;
use crate::heartbeat::{heartbeat_loop, send_heartbeat, Control, Progress, SharedProgress};
use crate::restart::{inherited_worker_id, restart_count, ProcessRestart};
use crate::trainer::{Batch, BatchItem, BatchOutcome, GroupInfo, Trainer, ValidationItem};

/// How this process joins a job.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `host:port` or `http(s)://host:port` of the coordinator.
    pub coordinator: String,
    pub token: String,
    /// The node name; ranks of one node are contiguous.
    pub node: String,
    pub local_rank: u32,
    /// The host or IP peers reach this process at.
    pub advertise_host: String,
    /// The port this process hosts the collective store on if it becomes rank 0.
    pub store_port: u16,
    /// PEM CA certificate to verify a TLS coordinator.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// How long to keep retrying an unreachable coordinator.
    pub connect_timeout: Duration,
    /// Replace the process on every regroup even when the trainer could re-form in-process
    /// (`--restart-on-regroup`; NCCL trainers always restart).
    pub restart_on_regroup: bool,
}

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub groups_joined: u64,
    pub batches_trained: u64,
    pub items_trained: u64,
    pub failed_items: u64,
    pub seconds: f64,
    /// Set when the run ended for a regroup that this process must join as a new process: the
    /// caller replaces the process ([`ProcessRestart::exec`]) without tearing anything down.
    pub restart: Option<ProcessRestart>,
}

/// How a group's run ended.
enum GroupEnd {
    Regroup,
    Finished,
    /// The job failed, for this reason (`job failed: …`).
    Failed(String),
}

/// Runs the worker until the job ends. `trainer` does the per-batch work.
pub fn run_worker(
    options: WorkerOptions,
    trainer: &mut dyn Trainer,
) -> Result<RunSummary, RuntimeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| RuntimeError::Trainer(format!("starting the async runtime: {error}")))?;
    let _runtime_context = runtime.enter();
    let client = connect(
        &options.coordinator,
        &options.token,
        options.tls_ca_pem.clone(),
    )?;
    // A restarted process keeps the id it joined under, so the coordinator sees a re-join.
    let worker_id = inherited_worker_id().unwrap_or_else(|| {
        format!(
            "{}-{}-{}-{:x}",
            options.node,
            options.local_rank,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        )
    });
    let restarts = restart_count();
    if restarts > 0 {
        info!(
            worker_id,
            restarts, "worker process restarted for a regroup; joining again"
        );
    }
    let started = Instant::now();
    let mut summary = RunSummary::default();
    loop {
        let Some(reply) = runtime.block_on(join(&client, &options, &worker_id))? else {
            info!("the job is finished");
            break;
        };
        summary.groups_joined += 1;
        let config = JobConfig::load(&reply.job_config_toml, &[])?;
        match run_group(
            &runtime,
            &client,
            &worker_id,
            &reply,
            &config,
            trainer,
            &mut summary,
        )? {
            GroupEnd::Regroup if options.restart_on_regroup || !trainer.regroups_in_process() => {
                info!(
                    worker_id,
                    forced = options.restart_on_regroup,
                    "the group re-forms: restarting this process to join it"
                );
                summary.seconds = started.elapsed().as_secs_f64();
                summary.restart = Some(ProcessRestart { worker_id });
                return Ok(summary);
            }
            GroupEnd::Regroup => continue,
            GroupEnd::Finished => break,
            GroupEnd::Failed(reason) => return Err(RuntimeError::JobFailed(reason)),
        }
    }
    trainer.finish().map_err(RuntimeError::Trainer)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Joins (retrying while the coordinator is unreachable); `None` when the job is over.
async fn join(
    client: &Client,
    options: &WorkerOptions,
    worker_id: &str,
) -> Result<Option<JoinReply>, RuntimeError> {
    let request = JoinRequest {
        worker_id: worker_id.to_string(),
        node: options.node.clone(),
        local_rank: options.local_rank,
        advertise_host: options.advertise_host.clone(),
        store_port: u32::from(options.store_port),
    };
    let deadline = Instant::now() + options.connect_timeout;
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.clone().join(request.clone()).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                info!(
                    worker_id,
                    rank = reply.rank,
                    world_size = reply.world_size,
                    generation = reply.generation,
                    "joined"
                );
                return Ok(Some(reply));
            }
            Err(status) if status.code() == tonic::Code::OutOfRange => return Ok(None),
            Err(status) if is_transient(&status) && Instant::now() < deadline => {
                warn!(status = %status.message(), retry_in_ms = backoff.as_millis() as u64, "coordinator unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(status) if is_transient(&status) => {
                return Err(RuntimeError::Unreachable {
                    address: options.coordinator.clone(),
                    seconds: options.connect_timeout.as_secs(),
                    last_error: status.message().to_string(),
                })
            }
            Err(status) => {
                return Err(RuntimeError::Rpc {
                    call: "Join",
                    status,
                })
            }
        }
    }
}

/// A received shard: the header and the items in shard order.
struct Shard {
    header: ShardHeader,
    items: Vec<BatchItem>,
    buckets: Vec<u16>,
}

/// Fetches this rank's shard, resuming a cut stream where it stopped.
async fn fetch_shard(
    client: &Client,
    worker_id: &str,
    generation: u64,
    rank: u32,
    epoch: u64,
) -> Result<Shard, tonic::Status> {
    let mut header: Option<ShardHeader> = None;
    let mut items = Vec::new();
    let mut buckets = Vec::new();
    let mut retries = 0;
    loop {
        let request = ShardRequest {
            worker_id: worker_id.to_string(),
            generation,
            rank,
            epoch,
            start_index: items.len() as u64,
        };
        let outcome: Result<(), tonic::Status> = async {
            let mut stream = client.clone().shard(request).await?.into_inner();
            while let Some(chunk) = stream.message().await? {
                if let Some(received) = chunk.header {
                    if header
                        .as_ref()
                        .is_some_and(|h| h.shard_len != received.shard_len)
                    {
                        return Err(tonic::Status::data_loss(
                            "the shard changed between two streams",
                        ));
                    }
                    header = Some(received);
                }
                if chunk.first_index != items.len() as u64 {
                    return Err(tonic::Status::data_loss(format!(
                        "shard chunk starts at {} but {} items were received",
                        chunk.first_index,
                        items.len()
                    )));
                }
                for item in chunk.items {
                    buckets.push(u16::try_from(item.bucket).unwrap_or(u16::MAX));
                    items.push(BatchItem {
                        id: item.id,
                        key: item.key,
                        caption: item.caption,
                        width: item.width,
                        height: item.height,
                    });
                }
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                let Some(shard_len) = header.as_ref().map(|h| h.shard_len) else {
                    return Err(tonic::Status::data_loss(
                        "shard stream ended without a header",
                    ));
                };
                if items.len() as u64 == shard_len {
                    return Ok(Shard {
                        header: header.expect("checked above"),
                        items,
                        buckets,
                    });
                }
                warn!(
                    received = items.len(),
                    expected = shard_len,
                    "shard stream ended early; resuming"
                );
            }
            Err(status)
                if (is_transient(&status) || status.code() == tonic::Code::Internal)
                    && retries < 20 =>
            {
                warn!(received = items.len(), status = %status.message(), "shard stream cut; resuming");
            }
            Err(status) => return Err(status),
        }
        retries += 1;
        if retries > 20 {
            return Err(tonic::Status::unavailable("shard stream kept failing"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lock(progress: &SharedProgress) -> std::sync::MutexGuard<'_, Progress> {
    progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a refused call means "this group is over, join again".
fn means_regroup(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::PermissionDenied
    )
}

fn run_group(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    worker_id: &str,
    reply: &JoinReply,
    config: &JobConfig,
    trainer: &mut dyn Trainer,
    summary: &mut RunSummary,
) -> Result<GroupEnd, RuntimeError> {
    let resume = reply.resume.clone().unwrap_or_default();
    let group = GroupInfo {
        rank: reply.rank,
        world_size: reply.world_size,
        generation: reply.generation,
        store_address: reply.store_address.clone(),
        store_prefix: reply.store_prefix.clone(),
        resume_checkpoint: resume.checkpoint.clone(),
        resume_step: resume.step,
    };
    let progress: SharedProgress = SharedProgress::default();
    {
        let mut state = lock(&progress);
        state.generation = reply.generation;
        state.rank = reply.rank;
        state.epoch = resume.epoch;
        state.segment = resume.segment;
        state.batches_done = resume.batch;
    }
    if !group.resume_checkpoint.is_empty() {
        if let Err(error) = trainer.check_checkpoint(config, &group.resume_checkpoint) {
            warn!(checkpoint = %group.resume_checkpoint, %error, "the checkpoint to resume from is unusable; reporting it and joining again");
            {
                let mut state = lock(&progress);
                state.error = format!("checkpoint {}: {error}", group.resume_checkpoint);
                state.unusable_checkpoint = group.resume_checkpoint.clone();
            }
            report_and_wait(runtime, client, worker_id, &progress);
            return Ok(GroupEnd::Regroup);
        }
    }
    if let Err(error) = trainer.start(&group, config) {
        // The coordinator decides: it re-forms the group for another try, or fails the job
        // after `cluster.max_start_failures` (and the next Join says so).
        warn!(%error, "the trainer did not start; reporting it and joining again");
        {
            let mut state = lock(&progress);
            state.error = format!("the trainer did not start: {error}");
            state.fatal = true;
        }
        report_and_wait(runtime, client, worker_id, &progress);
        return Ok(GroupEnd::Regroup);
    }
    let table = BucketTable::new(config.buckets.bucket_params())?;
    let (stop_heartbeats, stopped) = watch::channel(false);
    let interval = Duration::from_secs_f64(config.cluster.heartbeat_interval_s);
    runtime.spawn(heartbeat_loop(
        client.clone(),
        worker_id.to_string(),
        progress.clone(),
        interval,
        stopped,
    ));
    let mut run = GroupRun {
        runtime,
        client,
        worker_id,
        reply,
        config,
        table,
        trainer,
        progress,
        summary,
        data_budget: DataFailureBudget::new(
            config.data.max_failed_fraction,
            config.data.failure_window,
        ),
        step: resume.step,
    };
    let end = run.train_epochs(resume.epoch);
    let _ = stop_heartbeats.send(true);
    end
}

/// Tells the coordinator why this rank could not start (a trainer that did not start, so that
/// the same failure fails the job instead of regrouping into it forever, or an unusable
/// checkpoint, so that it falls back), then waits a second before joining again. Best effort:
/// a coordinator that cannot be reached within a few seconds sees the worker lost instead.
fn report_and_wait(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    worker_id: &str,
    progress: &SharedProgress,
) {
    let sent = runtime.block_on(tokio::time::timeout(
        Duration::from_secs(10),
        send_heartbeat(client, worker_id, progress),
    ));
    if sent.is_err() {
        warn!("the coordinator did not hear why this rank could not start within 10 s");
    }
    std::thread::sleep(Duration::from_secs(1));
}

/// One group's run on this rank: what every step of the loop needs, so the steps are methods
/// with names rather than functions of ten arguments.
struct GroupRun<'a> {
    runtime: &'a tokio::runtime::Runtime,
    client: &'a Client,
    worker_id: &'a str,
    reply: &'a JoinReply,
    config: &'a JobConfig,
    table: BucketTable,
    trainer: &'a mut dyn Trainer,
    /// What the heartbeats report, and the coordinator's commands they bring back.
    progress: SharedProgress,
    summary: &'a mut RunSummary,
    /// This rank's loaded items and failures over `data.failure_window`.
    data_budget: DataFailureBudget,
    /// Optimizer steps done: one per accumulation window, windows counted per epoch (segment)
    /// from its first batch, so a checkpoint (always at a window's end) never holds half a
    /// window.
    step: u64,
}

/// What fetching an epoch's shard led to.
enum ShardFetch {
    Received(Shard),
    /// The group is over (regroup) or the job is (finished).
    Ended(GroupEnd),
}

/// What training one batch led to.
enum BatchEnd {
    Continue,
    Ended(GroupEnd),
}

impl GroupRun<'_> {
    /// Trains epoch after epoch from `first_epoch` until the job ends or the group does.
    fn train_epochs(&mut self, first_epoch: u64) -> Result<GroupEnd, RuntimeError> {
        let mut epoch = first_epoch;
        loop {
            if let Some(end) = obey(&self.progress) {
                return Ok(end);
            }
            let shard = match self.fetch_epoch_shard(epoch)? {
                ShardFetch::Received(shard) => shard,
                ShardFetch::Ended(end) => return Ok(end),
            };
            if let Some(end) = self.train_epoch(epoch, &shard)? {
                return Ok(end);
            }
            epoch += 1;
            if epoch >= self.config.schedule.epochs {
                return Ok(self.wait_for_command());
            }
        }
    }

    /// This rank's shard of `epoch`: a refusal that means "join again" ends the group.
    fn fetch_epoch_shard(&self, epoch: u64) -> Result<ShardFetch, RuntimeError> {
        let fetched = self.runtime.block_on(fetch_shard(
            self.client,
            self.worker_id,
            self.reply.generation,
            self.reply.rank,
            epoch,
        ));
        match fetched {
            Ok(shard) => Ok(ShardFetch::Received(shard)),
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                Ok(ShardFetch::Ended(GroupEnd::Finished))
            }
            Err(status)
                if means_regroup(&status) || status.code() == tonic::Code::DeadlineExceeded =>
            {
                info!(status = %status.message(), "shard refused; joining again");
                Ok(ShardFetch::Ended(GroupEnd::Regroup))
            }
            Err(status) => Err(RuntimeError::Rpc {
                call: "Shard",
                status,
            }),
        }
    }

    /// The per-rank sampler over the shard, positioned at the header's start batch.
    fn sampler(&self, epoch: u64, shard: &Shard) -> Result<RankSampler, RuntimeError> {
        let header = &shard.header;
        let local = BucketedItems::from_assigned(
            self.table.len(),
            shard
                .items
                .iter()
                .map(|i| i.id)
                .zip(shard.buckets.iter().copied()),
        )
        .map_err(|error| RuntimeError::InvalidShard(error.to_string()))?;
        let key = SamplerKey {
            seed: header.seed,
            epoch,
            segment: header.segment,
            rank: self.reply.rank,
        };
        let mut sampler =
            RankSampler::from_shard(0..local.len() as u32, &local, &self.table, key, header.bsz)
                .map_err(|error| RuntimeError::InvalidShard(error.to_string()))?;
        sampler.skip(header.start_batch);
        Ok(sampler)
    }

    /// This rank's validation items of the shard header, at their buckets' resolutions.
    fn validation_items(&self, header: &ShardHeader) -> Result<Vec<ValidationItem>, RuntimeError> {
        header
            .validation_items
            .iter()
            .map(|item| {
                let resolution = u16::try_from(item.bucket)
                    .ok()
                    .and_then(|bucket| self.table.get(bucket))
                    .ok_or_else(|| {
                        RuntimeError::InvalidShard(format!(
                            "validation item {} names bucket {}, which the table lacks",
                            item.id, item.bucket
                        ))
                    })?;
                Ok(ValidationItem {
                    item: BatchItem {
                        id: item.id,
                        key: item.key.clone(),
                        caption: item.caption.clone(),
                        width: item.width,
                        height: item.height,
                    },
                    resolution,
                })
            })
            .collect()
    }

    /// Trains the shard's batches from its start batch; `Some` when the group or job ended.
    fn train_epoch(&mut self, epoch: u64, shard: &Shard) -> Result<Option<GroupEnd>, RuntimeError> {
        let header = &shard.header;
        let mut sampler = self.sampler(epoch, shard)?;
        let total = sampler.total_batches();
        info!(
            rank = self.reply.rank,
            epoch,
            segment = header.segment,
            shard_len = header.shard_len,
            batches = total,
            start_batch = header.start_batch,
            "shard received"
        );
        self.trainer
            .validation_items(&self.validation_items(header)?);
        {
            let mut state = lock(&self.progress);
            state.epoch = epoch;
            state.segment = header.segment;
            state.batches_done = header.start_batch;
            state.requested_checkpoint = None;
        }
        if total == 0 {
            if let Some(end) = self.checkpoint(header, epoch, 0)? {
                return Ok(Some(end));
            }
        }
        let mut last_batch_end = Instant::now();
        // The batch due now plus `prefetch_batches` drawn ahead, which the trainer may load
        // while this one trains.
        let lookahead = self.config.data.prefetch_batches as usize;
        let mut pending: VecDeque<Batch> = VecDeque::with_capacity(lookahead + 1);
        loop {
            if let Some(end) = obey(&self.progress) {
                return Ok(Some(end));
            }
            while pending.len() <= lookahead {
                let Some(batch_ref) = sampler.next_batch() else {
                    break;
                };
                pending.push_back(Batch {
                    epoch,
                    index: batch_ref.index,
                    bucket: batch_ref.bucket,
                    resolution: batch_ref.resolution,
                    items: batch_ref
                        .positions
                        .iter()
                        .map(|&p| shard.items[p as usize].clone())
                        .collect(),
                    epoch_batches: total,
                });
            }
            let Some(batch) = pending.pop_front() else {
                return Ok(None);
            };
            if lookahead > 0 {
                self.trainer.upcoming(pending.make_contiguous());
            }
            if let BatchEnd::Ended(end) = self.train_batch(&batch, header, &mut last_batch_end)? {
                return Ok(Some(end));
            }
        }
    }

    /// Trains one batch, reports it, and checkpoints when the plan or the coordinator says so.
    fn train_batch(
        &mut self,
        batch: &Batch,
        header: &ShardHeader,
        last_batch_end: &mut Instant,
    ) -> Result<BatchEnd, RuntimeError> {
        let schedule = &self.config.schedule;
        let outcome = match self.trainer.train_batch(batch) {
            Ok(outcome) => outcome,
            Err(error) => {
                warn!(rank = self.reply.rank, batch = batch.index, %error, "training failed; reporting and waiting for a regroup");
                lock(&self.progress).error = error;
                self.runtime
                    .block_on(send_heartbeat(self.client, self.worker_id, &self.progress));
                return Ok(BatchEnd::Ended(self.wait_for_command()));
            }
        };
        let window_closed = batch.closes_window(schedule.grad_accum);
        if window_closed {
            self.step += 1;
        }
        let seconds = last_batch_end.elapsed().as_secs_f64().max(1e-9);
        *last_batch_end = Instant::now();
        let done = batch.index + 1;
        self.record_batch(batch, &outcome, seconds);
        if let Some(reason) = self
            .data_budget
            .record(batch.items.len() as u64, &outcome.failures)
        {
            warn!(rank = self.reply.rank, %reason, "the data failure budget is spent; failing the job");
            lock(&self.progress).job_failure = reason;
            return Ok(BatchEnd::Ended(self.wait_for_command()));
        }
        let steps_exhausted = schedule.max_steps.is_some_and(|max| self.step >= max);
        // The coordinator decides: the plan's schedule (`checkpoint_every` optimizer steps,
        // max_steps, the epoch's end) came with the shard, and checkpoints it asks for later
        // come with heartbeats. Both are window ends, so a resume starts on one.
        let epoch = batch.epoch;
        let requested = lock(&self.progress)
            .requested_checkpoint
            .filter(|requested| requested.epoch == epoch && requested.segment == header.segment);
        let requested_now = requested.is_some_and(|requested| requested.batch == done);
        if requested_now && !window_closed {
            warn!(
                batch = done,
                "the requested checkpoint is not at a window's end; skipped"
            );
        }
        let checkpoint_due = window_closed
            && (header.checkpoint_batches.binary_search(&done).is_ok() || requested_now);
        if checkpoint_due {
            if let Some(end) = self.checkpoint(header, epoch, done)? {
                return Ok(BatchEnd::Ended(end));
            }
            let export_requested =
                requested_now && requested.is_some_and(|requested| requested.export);
            if export_requested {
                self.trainer
                    .export(self.step)
                    .map_err(RuntimeError::Trainer)?;
            }
        }
        if steps_exhausted {
            info!(step = self.step, "max_steps reached");
            return Ok(BatchEnd::Ended(self.wait_for_command()));
        }
        Ok(BatchEnd::Continue)
    }

    /// Books a trained batch in the run summary and in what the heartbeats report.
    fn record_batch(&mut self, batch: &Batch, outcome: &BatchOutcome, seconds: f64) {
        self.summary.batches_trained += 1;
        self.summary.items_trained += batch.items.len() as u64;
        self.summary.failed_items += outcome.failures.len() as u64;
        let mut state = lock(&self.progress);
        state.batches_done = batch.index + 1;
        if let Some(loss) = outcome.loss {
            state.loss = loss;
        }
        // A batch timed at zero seconds (a coarse clock) says nothing about the rate.
        let rate = if seconds > 0.0 {
            batch.items.len() as f64 / seconds
        } else {
            state.items_per_second
        };
        state.items_per_second = if state.items_per_second == 0.0 {
            rate
        } else {
            0.8 * state.items_per_second + 0.2 * rate
        };
        state.data_wait_seconds += outcome.data_wait_seconds;
        if let Some(validation) = outcome.validation {
            state.validation = Some(validation);
        }
        if let Some(learning_rate) = outcome.learning_rate {
            state.learning_rate = learning_rate;
        }
        for (total, count) in state
            .token_length_counts
            .iter_mut()
            .zip(outcome.token_length_counts)
        {
            *total += count;
        }
        state.completed.push(CompletedBatch {
            batch: batch.index,
            item_ids: batch.items.iter().map(|i| i.id).collect(),
        });
    }

    /// After the last batch (or a failure), heartbeats until the coordinator says what comes
    /// next.
    fn wait_for_command(&self) -> GroupEnd {
        let interval = Duration::from_secs_f64(self.config.cluster.heartbeat_interval_s.min(0.5));
        loop {
            self.runtime.block_on(async {
                send_heartbeat(self.client, self.worker_id, &self.progress).await;
                tokio::time::sleep(interval).await;
            });
            if let Some(end) = obey(&self.progress) {
                return end;
            }
        }
    }

    /// Writes this rank's checkpoint part at batch `batch` of `epoch`, flushes the ledger and
    /// reports CheckpointDone.
    fn checkpoint(
        &mut self,
        header: &ShardHeader,
        epoch: u64,
        batch: u64,
    ) -> Result<Option<GroupEnd>, RuntimeError> {
        let step = self.step;
        self.trainer
            .checkpoint(step, epoch, batch)
            .map_err(RuntimeError::Trainer)?;
        let request = CheckpointDoneRequest {
            worker_id: self.worker_id.to_string(),
            generation: self.reply.generation,
            rank: self.reply.rank,
            epoch,
            segment: header.segment,
            batch,
            step,
        };
        let (client, worker_id, progress) = (self.client, self.worker_id, &self.progress);
        self.runtime.block_on(async {
            // The ledger must hold every batch the checkpoint covers before it completes.
            for _ in 0..50 {
                send_heartbeat(client, worker_id, progress).await;
                if lock(progress).completed.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut attempts = 0;
            loop {
                match client.clone().checkpoint_done(request.clone()).await {
                    Ok(_) => return Ok(None),
                    Err(status) if means_regroup(&status) => return Ok(Some(GroupEnd::Regroup)),
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        return Ok(Some(GroupEnd::Finished))
                    }
                    // Unavailable also answers a report that came ahead of the heartbeat
                    // carrying its last batches (the background heartbeat may hold them).
                    Err(status) if is_transient(&status) && attempts < 50 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        send_heartbeat(client, worker_id, progress).await;
                    }
                    Err(status) => {
                        return Err(RuntimeError::Rpc {
                            call: "CheckpointDone",
                            status,
                        })
                    }
                }
            }
        })
    }
}

/// The control the heartbeat set, as a group end.
fn obey(progress: &SharedProgress) -> Option<GroupEnd> {
    match lock(progress).control.take()? {
        Control::Regroup(_) => Some(GroupEnd::Regroup),
        Control::Stop(_) => Some(GroupEnd::Finished),
        Control::Fail(reason) => Some(GroupEnd::Failed(reason)),
    }
}
