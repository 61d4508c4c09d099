//! Group membership: rendezvous, rank assignment, failure detection and regroups, and the
//! epoch progress they drive (docs/architecture.md §2 "Resume and elasticity", §6).
//!
//! All of it is one state machine behind a mutex ([`Membership`]); the gRPC service and the
//! liveness ticker call into it and never hold the lock across an await.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arbor_common::accumulation::{
    scheduled_checkpoints, window_end_at_or_after, CheckpointSchedule,
};
use arbor_common::config::JobConfig;
use arbor_common::plan::{ConsumedSet, EpochPlan, PlanParams};
use arbor_proto::v1::{
    CheckpointDoneRequest, Command, HeartbeatReply, HeartbeatRequest, JoinReply, JoinRequest,
    RequestCheckpointReply, ResumePoint, StatusReply, WorkerStatus,
};
use tonic::Status;
use tracing::{info, warn};

use arbor_runtime::trainer::TOKEN_LENGTH_BINS;

use super::job_state::{CheckpointRecord, JobState, SegmentRecord};
use super::ledger::{EpochLedger, LedgerLine};
use super::metrics::Metrics;
use super::run_store::RunStore;
use crate::dataset::Dataset;

const RECENT_EVENTS: usize = 64;
/// How often a requested checkpoint that a rank missed (it passed the batch before it heard of
/// the request) is asked for again, further ahead, before the request is dropped.
const CHECKPOINT_REQUEST_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Forming,
    Running,
    Finished,
    Failed(String),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Forming => "forming",
            Phase::Running => "running",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
        }
    }
}

#[derive(Debug, Clone)]
struct WorkerEntry {
    request: JoinRequest,
    last_seen: Instant,
    /// Blocked in Join, waiting for a group.
    waiting: bool,
    /// Rank and generation of its last assignment.
    assignment: Option<(u32, u64)>,
    batches_done: u64,
    loss: f64,
    items_per_second: f64,
    learning_rate: f64,
    /// Prompts it encoded in this generation, by token-length bin (`TOKEN_LENGTH_BINS`).
    token_length_counts: [u64; 4],
    /// The number of its latest Shard stream.
    shard_stream: u64,
    /// When its latest Shard stream was cut before the end; cleared by its next Shard call. A
    /// stream not resumed within the heartbeat timeout marks the worker lost.
    stream_cut_at: Option<Instant>,
}

/// A checkpoint the coordinator asked the running group for (`arbor checkpoint` or
/// `schedule.checkpoint_every_minutes`), at `batch` of the current plan.
#[derive(Debug, Clone)]
struct RequestedCheckpoint {
    generation: u64,
    epoch: u64,
    segment: u64,
    batch: u64,
    reason: String,
    attempt: u32,
    export: bool,
}

/// Everything the coordinator decides, behind one lock.
pub struct Membership {
    config: Arc<JobConfig>,
    dataset: Arc<Dataset>,
    run_store: Arc<dyn RunStore>,
    metrics: Metrics,
    state: JobState,
    phase: Phase,
    workers: HashMap<String, WorkerEntry>,
    /// Worker ids by rank in the current generation.
    group: Vec<String>,
    plan: Option<Arc<EpochPlan>>,
    /// The batch the current generation resumed from in the current plan.
    resume_batch: u64,
    /// Optimizer steps done at `resume_batch`.
    resume_step: u64,
    /// The "batches done" counts of the current plan at which ranks checkpoint.
    scheduled_checkpoints: Arc<Vec<u64>>,
    requested_checkpoint: Option<RequestedCheckpoint>,
    /// When the last checkpoint completed (or the group formed): `checkpoint_every_minutes`
    /// counts from here.
    last_checkpoint_at: Instant,
    checkpoint_reports: HashMap<(u64, u64, u64), BTreeSet<u32>>,
    ledger: EpochLedger,
    events: VecDeque<String>,
    forming_since: Instant,
    last_join: Instant,
}

/// What a Shard stream needs: the plan and the header values.
pub struct ShardSource {
    pub plan: Arc<EpochPlan>,
    pub segment: u64,
    pub start_batch: u64,
    pub checkpoint_batches: Arc<Vec<u64>>,
    /// The worker's stream number, for [`Membership::shard_stream_cut`].
    pub stream: u64,
}

impl Membership {
    pub fn new(
        config: Arc<JobConfig>,
        dataset: Arc<Dataset>,
        run_store: Arc<dyn RunStore>,
        metrics: Metrics,
        state: JobState,
    ) -> anyhow::Result<Self> {
        let ledger = EpochLedger::open(run_store.clone(), state.epoch)?;
        let now = Instant::now();
        let phase = if state.finished {
            Phase::Finished
        } else {
            Phase::Forming
        };
        let mut membership = Self {
            config,
            dataset,
            run_store,
            metrics,
            state,
            phase,
            workers: HashMap::new(),
            group: Vec::new(),
            plan: None,
            resume_batch: 0,
            resume_step: 0,
            scheduled_checkpoints: Arc::new(Vec::new()),
            requested_checkpoint: None,
            last_checkpoint_at: now,
            checkpoint_reports: HashMap::new(),
            ledger,
            events: VecDeque::new(),
            forming_since: now,
            last_join: now,
        };
        membership.event(format!(
            "coordinator started at epoch {} generation {}",
            membership.state.epoch, membership.state.generation
        ));
        membership.update_gauges();
        Ok(membership)
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    fn event(&mut self, text: String) {
        info!(event = %text, "job event");
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        let stamp = humantime_now();
        self.events.push_back(format!("{stamp} {text}"));
    }

    fn persist(&self) -> anyhow::Result<()> {
        self.state.save(self.run_store.as_ref())
    }

    fn update_gauges(&self) {
        self.metrics.workers.set(self.workers.len() as i64);
        self.metrics.world_size.set(self.group.len() as i64);
        self.metrics.generation.set(self.state.generation as i64);
        self.metrics.epoch.set(self.state.epoch as i64);
        self.metrics.step.set(self.state.step as i64);
        let (batches, rate) = self
            .group
            .iter()
            .filter_map(|id| self.workers.get(id))
            .fold((0u64, 0f64), |(b, r), w| {
                (b + w.batches_done, r + w.items_per_second)
            });
        self.metrics.batches_done.set(batches as i64);
        self.metrics.items_per_second.set(rate);
    }

    /// Registers a Join. The caller then waits for [`Membership::join_reply`].
    pub fn register_join(&mut self, request: JoinRequest) -> Result<(), Status> {
        if let Phase::Failed(reason) = &self.phase {
            return Err(Status::failed_precondition(format!("job failed: {reason}")));
        }
        if self.phase == Phase::Finished {
            return Err(Status::out_of_range("job finished"));
        }
        if request.worker_id.is_empty() {
            self.metrics.refuse("malformed");
            return Err(Status::invalid_argument("join: worker_id is empty"));
        }
        if request.advertise_host.is_empty() {
            self.metrics.refuse("malformed");
            return Err(Status::invalid_argument("join: advertise_host is empty"));
        }
        let now = Instant::now();
        self.last_join = now;
        let worker_id = request.worker_id.clone();
        let in_group = self.group.contains(&worker_id);
        let known = self.workers.contains_key(&worker_id);
        self.workers.insert(
            worker_id.clone(),
            WorkerEntry {
                request,
                last_seen: now,
                waiting: true,
                assignment: None,
                batches_done: 0,
                loss: 0.0,
                items_per_second: 0.0,
                learning_rate: 0.0,
                token_length_counts: [0; 4],
                shard_stream: 0,
                stream_cut_at: None,
            },
        );
        if !known {
            self.event(format!("worker {worker_id} joined"));
        }
        if self.phase == Phase::Running {
            if in_group {
                self.start_regroup(format!("worker {worker_id} re-joined"));
            } else if (self.group.len() as u32) < self.config.cluster.max_workers {
                self.start_regroup(format!("worker {worker_id} joined: growing the group"));
            }
        }
        self.update_gauges();
        Ok(())
    }

    /// Called when a Join call ends without a reply (the worker went away).
    pub fn abandon_join(&mut self, worker_id: &str) {
        if let Some(entry) = self.workers.get(worker_id) {
            if entry.waiting {
                self.workers.remove(worker_id);
                self.event(format!("worker {worker_id} left before the group formed"));
                self.update_gauges();
            }
        }
    }

    /// The reply for a waiting worker once its group formed; `Ok(None)` while still waiting.
    pub fn join_reply(
        &mut self,
        worker_id: &str,
        config_toml: &str,
    ) -> Result<Option<JoinReply>, Status> {
        if let Phase::Failed(reason) = &self.phase {
            return Err(Status::failed_precondition(format!("job failed: {reason}")));
        }
        if self.phase == Phase::Finished {
            return Err(Status::out_of_range("job finished"));
        }
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return Err(Status::not_found(format!(
                "worker {worker_id} is no longer registered"
            )));
        };
        if entry.waiting || self.phase != Phase::Running {
            return Ok(None);
        }
        let Some((rank, generation)) = entry.assignment else {
            return Ok(None);
        };
        if generation != self.state.generation {
            return Ok(None);
        }
        entry.last_seen = Instant::now();
        let store_host = &self.workers[&self.group[0]].request;
        Ok(Some(JoinReply {
            rank,
            world_size: self.group.len() as u32,
            generation,
            store_address: format!("{}:{}", store_host.advertise_host, store_host.store_port),
            store_prefix: format!("job/{}/gen/{generation}", self.config.job.name),
            job_config_toml: config_toml.to_string(),
            resume: Some(self.resume_point()),
        }))
    }

    fn resume_point(&self) -> ResumePoint {
        let segment = self.state.segments.last().map_or(0, |s| s.segment);
        let checkpoint = self
            .state
            .last_checkpoint
            .as_ref()
            .map(|c| c.path.clone())
            .unwrap_or_default();
        ResumePoint {
            epoch: self.state.epoch,
            segment,
            batch: self.resume_batch,
            step: self.state.step,
            checkpoint,
        }
    }

    /// Starts a regroup: the current group's workers are told to Join again.
    fn start_regroup(&mut self, reason: String) {
        if self.phase != Phase::Running {
            return;
        }
        self.event(format!("regroup: {reason}"));
        if let Some(requested) = self.requested_checkpoint.take() {
            self.event(format!(
                "requested checkpoint at batch {} withdrawn: the group is re-forming",
                requested.batch
            ));
        }
        self.phase = Phase::Forming;
        self.forming_since = Instant::now();
        self.state.regroups += 1;
        self.metrics.regroups.inc();
        if let Err(error) = self.persist() {
            warn!(%error, "persisting state failed");
        }
    }

    /// Forms a group when enough workers wait, fails the job when too few came in time, and
    /// detects lost workers. Called periodically.
    pub fn tick(&mut self) -> anyhow::Result<bool> {
        let now = Instant::now();
        let config = self.config.clone();
        let cluster = &config.cluster;
        let timeout = Duration::from_secs_f64(cluster.heartbeat_timeout_s);
        let mut changed = false;
        match self.phase {
            Phase::Running => {
                let lost: Vec<(u32, String, String)> = self
                    .group
                    .iter()
                    .enumerate()
                    .filter_map(|(rank, id)| {
                        let entry = self.workers.get(id)?;
                        let silent = now.duration_since(entry.last_seen);
                        if silent > timeout {
                            let why = format!("no heartbeat for {:.1}s", silent.as_secs_f64());
                            return Some((rank as u32, id.clone(), why));
                        }
                        let cut_for = now.duration_since(entry.stream_cut_at?);
                        (cut_for > timeout).then(|| {
                            let why = format!(
                                "its shard stream was cut and not resumed for {:.1}s",
                                cut_for.as_secs_f64()
                            );
                            (rank as u32, id.clone(), why)
                        })
                    })
                    .collect();
                for (rank, id, why) in &lost {
                    self.workers.remove(id);
                    self.event(format!("worker {id} (rank {rank}) lost: {why}"));
                }
                if let Some((rank, id, _)) = lost.first() {
                    self.start_regroup(format!("worker {id} (rank {rank}) lost"));
                    changed = true;
                } else if self.timed_checkpoint_due(now) {
                    let minutes = config.schedule.checkpoint_every_minutes.unwrap_or_default();
                    let reason = format!("checkpoint_every_minutes {minutes} elapsed");
                    if let Err(status) = self.request_checkpoint(&reason, false) {
                        warn!(status = %status.message(), "timed checkpoint not requested");
                        self.last_checkpoint_at = now;
                    }
                    changed = true;
                }
            }
            Phase::Forming => {
                // Workers that stopped heartbeating and never came back to Join are gone.
                let stale: Vec<String> = self
                    .workers
                    .iter()
                    .filter(|(_, e)| !e.waiting && now.duration_since(e.last_seen) > timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in stale {
                    self.workers.remove(&id);
                    self.event(format!("worker {id} lost while the group re-formed"));
                    changed = true;
                }
                let waiting = self.workers.values().filter(|e| e.waiting).count() as u32;
                let settle = Duration::from_secs_f64(cluster.heartbeat_interval_s.max(0.5));
                let settled = now.duration_since(self.last_join) >= settle;
                if waiting >= cluster.max_workers || (waiting >= cluster.min_workers && settled) {
                    self.form_group()?;
                    changed = true;
                } else if now.duration_since(self.forming_since)
                    > Duration::from_secs(cluster.join_timeout_s)
                {
                    let reason = format!(
                        "only {waiting} of min_workers {} joined within join_timeout_s {}",
                        cluster.min_workers, cluster.join_timeout_s
                    );
                    self.event(format!("job failed: {reason}"));
                    self.state.failure = Some(reason.clone());
                    self.phase = Phase::Failed(reason);
                    self.persist()?;
                    changed = true;
                }
            }
            Phase::Finished | Phase::Failed(_) => {}
        }
        self.update_gauges();
        Ok(changed)
    }

    fn plan_params(&self, world_size: u32) -> PlanParams {
        PlanParams {
            seed: self.config.job.seed,
            epoch: self.state.epoch,
            world_size,
            bsz: self.config.schedule.bsz,
        }
    }

    /// The current plan of the epoch, rebuilt from the segment chain: each re-shard takes the
    /// items consumed by the earlier plans up to their last complete checkpoint.
    fn rebuild_plan(&self) -> anyhow::Result<EpochPlan> {
        let kept = self.dataset.items.len();
        let segments = &self.state.segments;
        let first = segments.first().context("no plan for the epoch yet")?;
        let mut plan = EpochPlan::new(kept, self.plan_params(first.world_size))?;
        let mut consumed = ConsumedSet::new(kept);
        for pair in segments.windows(2) {
            let (previous, next) = (&pair[0], &pair[1]);
            let done = vec![previous.checkpoint_batch; previous.world_size as usize];
            plan.mark_consumed(
                &self.dataset.items,
                &self.dataset.table,
                &done,
                &mut consumed,
            )?;
            plan = EpochPlan::reshard(
                kept,
                &consumed,
                self.plan_params(next.world_size),
                next.segment,
            )?;
        }
        Ok(plan)
    }

    /// Builds the current plan (from `resume_batch` at the job's step) and its checkpoint
    /// schedule; any requested checkpoint belonged to the previous plan.
    fn start_plan(&mut self) -> anyhow::Result<()> {
        let plan = self.rebuild_plan()?;
        let schedule = &self.config.schedule;
        self.resume_step = self.state.step;
        self.scheduled_checkpoints = Arc::new(scheduled_checkpoints(&CheckpointSchedule {
            epoch_batches: plan.batches_per_rank(),
            start_batch: self.resume_batch,
            start_step: self.resume_step,
            grad_accum: schedule.grad_accum,
            checkpoint_every: schedule.checkpoint_every,
            max_steps: schedule.max_steps,
        }));
        self.plan = Some(Arc::new(plan));
        self.checkpoint_reports.clear();
        self.requested_checkpoint = None;
        self.last_checkpoint_at = Instant::now();
        Ok(())
    }

    fn timed_checkpoint_due(&self, now: Instant) -> bool {
        let Some(minutes) = self.config.schedule.checkpoint_every_minutes else {
            return false;
        };
        self.phase == Phase::Running
            && self.requested_checkpoint.is_none()
            && now.duration_since(self.last_checkpoint_at).as_secs_f64() >= minutes * 60.0
    }

    /// Asks the running group to checkpoint at the first accumulation window's end that every
    /// rank can still reach: ahead of the furthest rank by what it trains in two heartbeat
    /// intervals (more on a retry), so each rank hears of it before it gets there. Repeated
    /// calls while one is pending return the pending one.
    pub fn request_checkpoint(
        &mut self,
        reason: &str,
        export: bool,
    ) -> Result<RequestCheckpointReply, Status> {
        if self.phase != Phase::Running {
            return Err(Status::failed_precondition(format!(
                "no running group to checkpoint: the job is {}",
                self.phase.name()
            )));
        }
        if let Some(requested) = self.requested_checkpoint.as_mut() {
            // A pending request also exports once anyone asks for it.
            requested.export |= export;
            return Ok(requested.reply());
        }
        self.issue_checkpoint_request(reason.to_string(), 0, export)
            .map(|requested| requested.reply())
    }

    fn issue_checkpoint_request(
        &mut self,
        reason: String,
        attempt: u32,
        export: bool,
    ) -> Result<RequestedCheckpoint, Status> {
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| Status::unavailable("no plan yet"))?;
        let members: Vec<&WorkerEntry> = self
            .group
            .iter()
            .filter_map(|id| self.workers.get(id))
            .collect();
        let furthest = members.iter().map(|w| w.batches_done).max().unwrap_or(0);
        let bsz = f64::from(self.config.schedule.bsz.max(1));
        let batches_per_second = members
            .iter()
            .map(|w| w.items_per_second / bsz)
            .fold(0.0, f64::max);
        let interval = self.config.cluster.heartbeat_interval_s;
        let lead = (batches_per_second * interval * 2.0 * f64::from(attempt + 1)).ceil() as u64 + 1;
        let total = plan.batches_per_rank();
        let batch = window_end_at_or_after(
            furthest.saturating_add(lead).min(total),
            total,
            self.config.schedule.grad_accum,
        );
        let requested = RequestedCheckpoint {
            generation: self.state.generation,
            epoch: self.state.epoch,
            segment: self.state.segments.last().map_or(0, |s| s.segment),
            batch,
            reason,
            attempt,
            export,
        };
        let with_export = if export { " with exports" } else { "" };
        self.event(format!(
            "checkpoint{with_export} requested at batch {batch} of epoch {} (ranks at batch {furthest} or less): {}",
            requested.epoch, requested.reason
        ));
        self.requested_checkpoint = Some(requested.clone());
        Ok(requested)
    }

    /// The heartbeat command a rank at `batches_done` gets for the requested checkpoint, and
    /// re-asks further ahead when the rank already passed its batch without writing it.
    fn requested_checkpoint_command(
        &mut self,
        rank: u32,
        batches_done: u64,
    ) -> Option<HeartbeatReply> {
        let requested = self.requested_checkpoint.clone()?;
        if batches_done < requested.batch {
            return Some(requested.command());
        }
        let key = (requested.epoch, requested.segment, requested.batch);
        let reported = self
            .checkpoint_reports
            .get(&key)
            .is_some_and(|ranks| ranks.contains(&rank));
        if batches_done == requested.batch || reported {
            return None;
        }
        self.requested_checkpoint = None;
        let missed = format!(
            "rank {rank} passed the requested checkpoint at batch {} (it is at {batches_done})",
            requested.batch
        );
        if requested.attempt + 1 >= CHECKPOINT_REQUEST_ATTEMPTS {
            self.event(format!("{missed}; giving the request up"));
            self.last_checkpoint_at = Instant::now();
            return None;
        }
        self.event(format!("{missed}; asking again further ahead"));
        let retried = self
            .issue_checkpoint_request(requested.reason, requested.attempt + 1, requested.export)
            .ok()?;
        (batches_done < retried.batch).then(|| retried.command())
    }

    fn form_group(&mut self) -> anyhow::Result<()> {
        let mut waiting: Vec<(String, String, u32)> = self
            .workers
            .iter()
            .filter(|(_, e)| e.waiting)
            .map(|(id, e)| (e.request.node.clone(), id.clone(), e.request.local_rank))
            .collect();
        // Ranks contiguous per node, local ranks in order.
        waiting.sort_by(|a, b| (&a.0, a.2, &a.1).cmp(&(&b.0, b.2, &b.1)));
        waiting.truncate(self.config.cluster.max_workers as usize);
        let world_size = waiting.len() as u32;
        self.state.generation += 1;
        let generation = self.state.generation;

        // Resume from the last complete checkpoint of the current plan.
        match self.state.segments.last_mut() {
            None => {
                self.state.segments.push(SegmentRecord {
                    segment: 0,
                    world_size,
                    checkpoint_batch: 0,
                    generations: vec![generation],
                });
                self.resume_batch = 0;
            }
            Some(current) => {
                let rollback_from = current.checkpoint_batch;
                let generations = current.generations.clone();
                let rolled = self.ledger.roll_back_from(&generations, rollback_from)?;
                let current = self.state.segments.last_mut().expect("checked above");
                if current.world_size == world_size {
                    current.generations.push(generation);
                    self.resume_batch = current.checkpoint_batch;
                } else {
                    self.state.segments.push(SegmentRecord {
                        segment: generation,
                        world_size,
                        checkpoint_batch: 0,
                        generations: vec![generation],
                    });
                    self.resume_batch = 0;
                }
                if rolled > 0 {
                    self.event(format!(
                        "rolled back {rolled} batch(es) trained after batch {rollback_from}"
                    ));
                }
            }
        }
        self.start_plan()?;
        self.group = waiting.iter().map(|(_, id, _)| id.clone()).collect();
        for (rank, (_, id, _)) in waiting.iter().enumerate() {
            if let Some(entry) = self.workers.get_mut(id) {
                entry.waiting = false;
                entry.assignment = Some((rank as u32, generation));
                entry.last_seen = Instant::now();
                entry.batches_done = self.resume_batch;
            }
        }
        self.phase = Phase::Running;
        let segment = self.state.segments.last().map_or(0, |s| s.segment);
        self.event(format!(
            "group formed: generation {generation}, world size {world_size}, epoch {} segment {segment} from batch {}",
            self.state.epoch, self.resume_batch
        ));
        self.persist()?;
        self.run_store
            .write("job.toml", self.config.to_toml().as_bytes())
            .context("writing run_dir/job.toml")?;
        Ok(())
    }

    /// Validates that a request comes from a current group member.
    fn check_member(&self, worker_id: &str, generation: u64, rank: u32) -> Result<(), Status> {
        let Some(entry) = self.workers.get(worker_id) else {
            self.metrics.refuse("unknown_worker");
            return Err(Status::not_found(format!(
                "unknown worker {worker_id}: join first"
            )));
        };
        if generation != self.state.generation || self.phase != Phase::Running {
            self.metrics.refuse("stale_generation");
            return Err(Status::failed_precondition(format!(
                "stale generation {generation}: the current generation is {} ({})",
                self.state.generation,
                self.phase.name()
            )));
        }
        if entry.assignment != Some((rank, generation)) {
            self.metrics.refuse("wrong_rank");
            return Err(Status::permission_denied(format!(
                "worker {worker_id} is not rank {rank} of generation {generation}"
            )));
        }
        Ok(())
    }

    pub fn heartbeat(&mut self, request: &HeartbeatRequest) -> Result<HeartbeatReply, Status> {
        if self.phase == Phase::Finished {
            return Ok(reply(Command::Stop, "job finished"));
        }
        if let Phase::Failed(reason) = &self.phase {
            return Ok(reply(Command::Stop, &format!("job failed: {reason}")));
        }
        let Some(entry) = self.workers.get_mut(&request.worker_id) else {
            self.metrics.refuse("unknown_worker");
            return Err(Status::not_found(format!(
                "unknown worker {}: join first",
                request.worker_id
            )));
        };
        entry.last_seen = Instant::now();
        if request.generation != self.state.generation {
            return Ok(reply(
                Command::Regroup,
                &format!(
                    "generation {} is stale, the current one is {}",
                    request.generation, self.state.generation
                ),
            ));
        }
        if entry.assignment != Some((request.rank, request.generation)) {
            self.metrics.refuse("wrong_rank");
            return Err(Status::permission_denied(format!(
                "worker {} is not rank {} of generation {}",
                request.worker_id, request.rank, request.generation
            )));
        }
        entry.batches_done = request.batches_done;
        entry.loss = request.loss;
        entry.items_per_second = request.items_per_second;
        entry.learning_rate = request.learning_rate;
        for ((total, &count), bin) in entry
            .token_length_counts
            .iter_mut()
            .zip(&request.token_length_counts)
            .zip(TOKEN_LENGTH_BINS)
        {
            *total += count;
            self.metrics.prompts(bin, count);
        }
        if request.rank == 0 && request.learning_rate > 0.0 {
            self.metrics.learning_rate.set(request.learning_rate);
        }
        // Completed batches of the current generation are recorded even while a regroup is
        // forming: the regroup then rolls back those after the checkpoint it resumes from.
        let same_epoch = request.epoch == self.state.epoch
            && self.state.segments.last().map(|s| s.segment) == Some(request.segment);
        if same_epoch {
            let lines: Vec<LedgerLine> = request
                .completed
                .iter()
                .filter(|batch| {
                    !self
                        .ledger
                        .contains(request.generation, request.rank, batch.batch)
                })
                .map(|batch| LedgerLine {
                    generation: request.generation,
                    rank: request.rank,
                    batch: batch.batch,
                    items: Some(batch.item_ids.clone()),
                    rolled_back: false,
                })
                .collect();
            self.ledger
                .append(&lines)
                .map_err(|error| Status::internal(format!("writing the ledger: {error:#}")))?;
        }
        if !request.error.is_empty() {
            let text = format!("rank {} reported: {}", request.rank, request.error);
            self.start_regroup(text.clone());
            return Ok(reply(Command::Regroup, &text));
        }
        if self.phase == Phase::Forming {
            return Ok(reply(Command::Regroup, "the group is re-forming"));
        }
        if same_epoch {
            if let Some(command) =
                self.requested_checkpoint_command(request.rank, request.batches_done)
            {
                return Ok(command);
            }
        }
        Ok(reply(Command::Continue, ""))
    }

    pub fn shard_source(
        &mut self,
        worker_id: &str,
        generation: u64,
        rank: u32,
        epoch: u64,
    ) -> Result<Option<ShardSource>, Status> {
        if self.phase == Phase::Finished {
            return Err(Status::out_of_range("job finished"));
        }
        self.check_member(worker_id, generation, rank)?;
        if epoch < self.state.epoch {
            self.metrics.refuse("stale_epoch");
            return Err(Status::failed_precondition(format!(
                "epoch {epoch} is over: the current epoch is {}",
                self.state.epoch
            )));
        }
        if epoch > self.state.epoch {
            return Ok(None);
        }
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| Status::unavailable("no plan yet"))?;
        let mut stream = 0;
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.shard_stream += 1;
            entry.stream_cut_at = None;
            stream = entry.shard_stream;
        }
        Ok(Some(ShardSource {
            plan,
            segment: self.state.segments.last().map_or(0, |s| s.segment),
            start_batch: self.resume_batch,
            checkpoint_batches: self.scheduled_checkpoints.clone(),
            stream,
        }))
    }

    /// Records that a worker's Shard stream number `stream` of `generation` was cut before its
    /// end; unless the worker asks for the rest within the heartbeat timeout it is lost. A cut
    /// noticed after the worker already opened a newer stream is ignored.
    pub fn shard_stream_cut(&mut self, worker_id: &str, generation: u64, stream: u64) {
        if generation != self.state.generation {
            return;
        }
        if let Some(entry) = self.workers.get_mut(worker_id) {
            if entry.shard_stream == stream {
                entry.stream_cut_at.get_or_insert_with(Instant::now);
            }
        }
    }

    pub fn checkpoint_done(&mut self, request: &CheckpointDoneRequest) -> Result<bool, Status> {
        self.check_member(&request.worker_id, request.generation, request.rank)?;
        let segment = self.state.segments.last().map_or(0, |s| s.segment);
        if request.epoch != self.state.epoch || request.segment != segment {
            self.metrics.refuse("stale_epoch");
            return Err(Status::failed_precondition(format!(
                "checkpoint for epoch {} segment {} but the job is at epoch {} segment {segment}",
                request.epoch, request.segment, self.state.epoch
            )));
        }
        let plan = self
            .plan
            .clone()
            .ok_or_else(|| Status::unavailable("no plan yet"))?;
        if request.batch > plan.batches_per_rank() {
            self.metrics.refuse("malformed");
            return Err(Status::invalid_argument(format!(
                "checkpoint at batch {} but the plan has {} batches",
                request.batch,
                plan.batches_per_rank()
            )));
        }
        let key = (request.epoch, request.segment, request.batch);
        let reports = self.checkpoint_reports.entry(key).or_default();
        reports.insert(request.rank);
        if reports.len() < self.group.len() {
            return Ok(false);
        }
        self.checkpoint_reports.remove(&key);
        self.complete_checkpoint(request, &plan)
            .map_err(|error| Status::internal(format!("completing the checkpoint: {error:#}")))?;
        Ok(true)
    }

    fn complete_checkpoint(
        &mut self,
        request: &CheckpointDoneRequest,
        plan: &EpochPlan,
    ) -> anyhow::Result<()> {
        let path = format!("checkpoints/step-{}", request.step);
        let record = CheckpointRecord {
            epoch: request.epoch,
            segment: request.segment,
            batch: request.batch,
            step: request.step,
            world_size: self.group.len() as u32,
            generation: request.generation,
            path: path.clone(),
        };
        // The ledger must hold every batch the checkpoint covers before it is complete.
        self.run_store.flush()?;
        self.run_store.write(
            &format!("{path}/coordinator.json"),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        self.run_store.write(&format!("{path}/COMPLETE"), b"")?;
        if let Some(current) = self.state.segments.last_mut() {
            current.checkpoint_batch = request.batch;
        }
        self.state.step = self.state.step.max(request.step);
        self.state.last_checkpoint = Some(record);
        self.last_checkpoint_at = Instant::now();
        if self
            .requested_checkpoint
            .as_ref()
            .is_some_and(|requested| request.batch >= requested.batch)
        {
            self.requested_checkpoint = None;
        }
        self.event(format!(
            "checkpoint complete: {path} (epoch {} batch {})",
            request.epoch, request.batch
        ));
        let epoch_done = request.batch == plan.batches_per_rank();
        if epoch_done {
            self.event(format!("epoch {} complete", self.state.epoch));
            self.state.epoch += 1;
            self.state.segments = vec![SegmentRecord {
                segment: 0,
                world_size: self.group.len() as u32,
                checkpoint_batch: 0,
                generations: vec![self.state.generation],
            }];
            self.resume_batch = 0;
            self.ledger = EpochLedger::open(self.run_store.clone(), self.state.epoch)?;
            self.start_plan()?;
        }
        let schedule = &self.config.schedule;
        let steps_done = schedule.max_steps.is_some_and(|max| self.state.step >= max);
        if self.state.epoch >= schedule.epochs || steps_done {
            self.state.finished = true;
            self.phase = Phase::Finished;
            self.event(format!("job finished at step {}", self.state.step));
        }
        self.persist()?;
        self.update_gauges();
        Ok(())
    }

    pub fn status(&self) -> StatusReply {
        let now = Instant::now();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, entry)| {
                let rank = match entry.assignment {
                    Some((rank, generation))
                        if generation == self.state.generation && !entry.waiting =>
                    {
                        i64::from(rank)
                    }
                    _ => -1,
                };
                WorkerStatus {
                    worker_id: id.clone(),
                    node: entry.request.node.clone(),
                    local_rank: entry.request.local_rank,
                    rank,
                    batches_done: entry.batches_done,
                    items_per_second: entry.items_per_second,
                    loss: entry.loss,
                    seconds_since_heartbeat: now.duration_since(entry.last_seen).as_secs_f64(),
                    learning_rate: entry.learning_rate,
                    token_length_counts: entry.token_length_counts.to_vec(),
                }
            })
            .collect();
        workers.sort_by_key(|worker| (worker.rank < 0, worker.rank, worker.worker_id.clone()));
        let last_checkpoint = self.state.last_checkpoint.as_ref().map(|c| ResumePoint {
            epoch: c.epoch,
            segment: c.segment,
            batch: c.batch,
            step: c.step,
            checkpoint: c.path.clone(),
        });
        StatusReply {
            job: self.config.job.name.clone(),
            phase: self.phase.name().to_string(),
            generation: self.state.generation,
            world_size: self.group.len() as u32,
            epoch: self.state.epoch,
            segment: self.state.segments.last().map_or(0, |s| s.segment),
            batches_per_rank: self.plan.as_ref().map_or(0, |p| p.batches_per_rank()),
            workers,
            last_checkpoint,
            recent_events: self.events.iter().cloned().collect(),
            regroups: self.state.regroups,
            step: self.state.step,
            failure: match &self.phase {
                Phase::Failed(reason) => reason.clone(),
                _ => String::new(),
            },
            pending_checkpoint_batch: self
                .requested_checkpoint
                .as_ref()
                .map_or(0, |requested| requested.batch),
        }
    }
}

impl RequestedCheckpoint {
    /// The heartbeat reply that asks a rank for this checkpoint.
    fn command(&self) -> HeartbeatReply {
        HeartbeatReply {
            command: Command::Checkpoint as i32,
            checkpoint_batch: self.batch,
            reason: self.reason.clone(),
            export: self.export,
        }
    }

    fn reply(&self) -> RequestCheckpointReply {
        RequestCheckpointReply {
            generation: self.generation,
            epoch: self.epoch,
            segment: self.segment,
            batch: self.batch,
        }
    }
}

fn reply(command: Command, reason: &str) -> HeartbeatReply {
    HeartbeatReply {
        command: command as i32,
        checkpoint_batch: 0,
        reason: reason.to_string(),
        export: false,
    }
}

fn humantime_now() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("[{}]", since_epoch.as_secs())
}
