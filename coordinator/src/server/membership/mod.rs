//! Group membership: rendezvous, rank assignment, failure detection and regroups, and the
//! epoch progress they drive (docs/architecture.md §2 "Resume and elasticity", §6).
//!
//! One state machine behind a mutex ([`Membership`]); the gRPC service and the liveness
//! ticker call into it and never hold the lock across an await. By concern:
//! - [`requests`]: workers' requests as validated domain values (fields checked at the edge);
//! - [`registry`]: the workers, their liveness and what their heartbeats report;
//! - [`formation`]: forming a group, its rank order, its plan and where it resumes;
//! - [`replay`]: reported batches checked against the rank's sampler before the ledger;
//! - [`checkpoints`]: requested checkpoints, their lead and re-asks, and completion;
//! - [`status`]: the status reply, progress and ETA, events, gauges;
//! - [`error`]: why a request is refused ([`MembershipError`]), mapped to gRPC at the service;
//! - [`clock`]: the time, passed in.
//!
//! A lying heartbeat (a batch past the plan, items that are not the sampler's, a NaN rate) is
//! refused in [`Membership::heartbeat`] and [`requests`]; a worker that keeps lying is dropped
//! ([`registry::LIES_BEFORE_DROP`]).

pub mod checkpoints;
pub mod clock;
pub mod error;
pub mod formation;
pub mod registry;
pub mod replay;
pub mod requests;
pub mod state_check;
pub mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arbor_common::config::JobConfig;
use arbor_common::plan::EpochPlan;
use arbor_proto::v1::{Command, HeartbeatReply};
use tracing::warn;

use self::checkpoints::CheckpointBook;
use self::clock::Clock;
pub use self::error::{MembershipError, RefusalCode};
use self::registry::{
    lost_members, stale_while_forming, Assignment, WorkerEntry, LIES_BEFORE_DROP,
};
use self::replay::BatchReplay;
use self::requests::{MemberRef, ShardAsk, WorkerHeartbeat};
use self::status::{EventLog, StepRate};
use super::job_state::JobState;
use super::ledger::{EpochLedger, LedgerLine};
use super::metrics::Metrics;
use super::run_store::RunStore;
use crate::dataset::Dataset;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Forming,
    Running,
    Finished,
    Failed(String),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Forming => "forming",
            Phase::Running => "running",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
        }
    }
}

/// Everything the coordinator decides, behind one lock.
pub struct Membership {
    config: Arc<JobConfig>,
    dataset: Arc<Dataset>,
    run_store: Arc<dyn RunStore>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
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
    checkpoints: CheckpointBook,
    replay: BatchReplay,
    ledger: EpochLedger,
    events: EventLog,
    /// The latest validation loss rank 0 reported, with its step.
    validation: Option<(f64, u64)>,
    step_rate: StepRate,
    /// Trainer start failures reported by ranks, by their error text.
    start_failures: HashMap<String, u32>,
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
    /// The membership of a job whose persisted state is `state`; a state that does not fit
    /// the job (see [`state_check`]) is refused with the field that is wrong.
    pub fn new(
        config: Arc<JobConfig>,
        dataset: Arc<Dataset>,
        run_store: Arc<dyn RunStore>,
        metrics: Metrics,
        mut state: JobState,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let location = run_store.location();
        let misfit = || format!("{location}/{} does not fit the job", JobState::KEY);
        state_check::check_state(&state, &config).with_context(misfit)?;
        let fallback =
            state_check::fall_back_from_an_unusable_checkpoint(&mut state, run_store.as_ref())
                .with_context(misfit)?;
        let ledger = EpochLedger::open(run_store.clone(), state.epoch)?;
        ledger.check_generations(state.generation)?;
        let now = clock.now();
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
            clock,
            state,
            phase,
            workers: HashMap::new(),
            group: Vec::new(),
            plan: None,
            resume_batch: 0,
            resume_step: 0,
            scheduled_checkpoints: Arc::new(Vec::new()),
            checkpoints: CheckpointBook::new(now),
            replay: BatchReplay::default(),
            ledger,
            events: EventLog::default(),
            validation: None,
            step_rate: StepRate::default(),
            start_failures: HashMap::new(),
            forming_since: now,
            last_join: now,
        };
        if !membership.state.segments.is_empty() && !membership.state.finished {
            let plan = membership.rebuild_plan().with_context(|| {
                format!(
                    "{location}/{}: segments do not rebuild a plan of this dataset",
                    JobState::KEY
                )
            })?;
            state_check::check_segments_fit(&membership.state, plan.batches_per_rank())
                .with_context(misfit)?;
            if let Some(current) = membership.state.segments.last() {
                membership.ledger.check_plan(
                    &current.generations,
                    current.world_size,
                    plan.batches_per_rank(),
                )?;
            }
        }
        membership.event(format!(
            "coordinator started at epoch {} generation {}",
            membership.state.epoch, membership.state.generation
        ));
        if let Some(fallback) = fallback {
            warn!(%fallback, "the last checkpoint is unusable");
            membership.event(fallback);
            membership.persist().context("persisting state.json")?;
        }
        membership.update_gauges();
        Ok(membership)
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    fn current_segment(&self) -> u64 {
        self.state.segments.last().map_or(0, |s| s.segment)
    }

    /// Whether (`epoch`, `segment`) names the plan the job trains now.
    fn is_current_plan(&self, epoch: u64, segment: u64) -> bool {
        epoch == self.state.epoch && segment == self.current_segment()
    }

    fn persist(&self) -> anyhow::Result<()> {
        self.state.save(self.run_store.as_ref())
    }

    fn check_job_open(&self) -> Result<(), MembershipError> {
        match &self.phase {
            Phase::Failed(reason) => Err(MembershipError::JobFailed(reason.clone())),
            Phase::Finished => Err(MembershipError::JobFinished),
            Phase::Forming | Phase::Running => Ok(()),
        }
    }

    /// Ends the job as failed, with `reason` in status and state.json.
    fn fail(&mut self, reason: String) {
        self.event(format!("job failed: {reason}"));
        self.state.failure = Some(reason.clone());
        self.phase = Phase::Failed(reason);
        if let Err(error) = self.persist() {
            warn!(error = format!("{error:#}"), "persisting state failed");
        }
    }

    /// Books a refusal against the worker that caused it: one that keeps claiming false things
    /// is dropped from the group (which re-forms without it) after [`LIES_BEFORE_DROP`].
    pub fn refused(&mut self, worker_id: &str, error: MembershipError) -> MembershipError {
        if !error.is_lie() {
            return error;
        }
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return error;
        };
        entry.lies += 1;
        if entry.lies < LIES_BEFORE_DROP {
            return error;
        }
        let rank = entry.assignment.map(|a| a.rank);
        self.workers.remove(worker_id);
        let why = format!(
            "worker {worker_id} dropped after {LIES_BEFORE_DROP} refused requests (last: {error})"
        );
        self.metrics.refuse("worker_dropped");
        if rank.is_some() && self.group.iter().any(|id| id == worker_id) {
            self.event(why.clone());
            self.start_regroup(why);
        } else {
            self.event(why);
        }
        self.update_gauges();
        error
    }

    /// Forms a group when enough workers wait, fails the job when too few came in time, and
    /// detects lost workers. Called periodically; a failure to form a group fails the job
    /// rather than being retried forever.
    pub fn tick(&mut self) -> anyhow::Result<bool> {
        let now = self.clock.now();
        let config = self.config.clone();
        let cluster = &config.cluster;
        let timeout = Duration::from_secs_f64(cluster.heartbeat_timeout_s);
        let mut changed = false;
        match self.phase {
            Phase::Running => {
                let lost = lost_members(&self.group, &self.workers, now, timeout);
                for worker in &lost {
                    self.workers.remove(&worker.worker_id);
                    self.event(format!(
                        "worker {} (rank {}) lost: {}",
                        worker.worker_id, worker.rank, worker.why
                    ));
                }
                if let Some(first) = lost.first() {
                    self.start_regroup(format!(
                        "worker {} (rank {}) lost",
                        first.worker_id, first.rank
                    ));
                    changed = true;
                } else if self.timed_checkpoint_due(now) {
                    let minutes = config.schedule.checkpoint_every_minutes.unwrap_or_default();
                    let reason = format!("checkpoint_every_minutes {minutes} elapsed");
                    if let Err(error) = self.request_checkpoint(&reason, false) {
                        warn!(%error, "timed checkpoint not requested");
                        self.checkpoints.last_completed_at = now;
                    }
                    changed = true;
                }
            }
            Phase::Forming => {
                for id in stale_while_forming(&self.workers, now, timeout) {
                    self.workers.remove(&id);
                    self.event(format!("worker {id} lost while the group re-formed"));
                    changed = true;
                }
                let waiting = self.workers.values().filter(|e| e.waiting).count() as u32;
                let settle = Duration::from_secs_f64(cluster.heartbeat_interval_s.max(0.5));
                let settled = now.saturating_duration_since(self.last_join) >= settle;
                if waiting >= cluster.max_workers || (waiting >= cluster.min_workers && settled) {
                    if let Err(error) = self.form_group() {
                        self.fail(format!("forming a group failed: {error:#}"));
                    }
                    changed = true;
                } else if now.saturating_duration_since(self.forming_since)
                    > Duration::from_secs(cluster.join_timeout_s)
                {
                    self.fail(format!(
                        "only {waiting} of min_workers {} joined within join_timeout_s {}",
                        cluster.min_workers, cluster.join_timeout_s
                    ));
                    changed = true;
                }
            }
            Phase::Finished | Phase::Failed(_) => {}
        }
        self.update_gauges();
        Ok(changed)
    }

    /// Validates that a request comes from a current group member.
    fn check_member(&self, member: &MemberRef) -> Result<(), MembershipError> {
        let Some(entry) = self.workers.get(&member.worker_id) else {
            return Err(MembershipError::UnknownWorker(member.worker_id.clone()));
        };
        if member.generation != self.state.generation || self.phase != Phase::Running {
            return Err(MembershipError::StaleGeneration {
                generation: member.generation,
                current: self.state.generation,
                phase: self.phase.name(),
            });
        }
        if entry.assignment
            != Some(Assignment {
                rank: member.rank,
                generation: member.generation,
            })
        {
            return Err(MembershipError::WrongRank {
                worker_id: member.worker_id.clone(),
                rank: member.rank,
                generation: member.generation,
            });
        }
        Ok(())
    }

    /// Checks what a heartbeat claims against the plan, before anything of it is booked: its
    /// epoch, its batch count and every reported batch (replayed from the rank's sampler).
    /// Returns the ledger lines to append.
    fn check_heartbeat(
        &mut self,
        heartbeat: &WorkerHeartbeat,
    ) -> Result<Vec<LedgerLine>, MembershipError> {
        let member = &heartbeat.member;
        if heartbeat.epoch > self.state.epoch {
            return Err(MembershipError::out_of_range(
                "heartbeat.epoch",
                format!(
                    "epoch {} has not started: the job is at epoch {}",
                    heartbeat.epoch, self.state.epoch
                ),
            ));
        }
        if !self.is_current_plan(heartbeat.epoch, heartbeat.segment) {
            return Ok(Vec::new());
        }
        let Some(plan) = self.plan.clone() else {
            return Ok(Vec::new());
        };
        let total = plan.batches_per_rank();
        if heartbeat.batches_done > total {
            return Err(MembershipError::out_of_range(
                "heartbeat.batches_done",
                format!(
                    "{} is past the plan's {total} batches per rank",
                    heartbeat.batches_done
                ),
            ));
        }
        let mut lines = Vec::new();
        for reported in &heartbeat.completed {
            let recorded = self
                .ledger
                .contains(member.generation, member.rank, reported.batch);
            let repeated = lines
                .iter()
                .any(|line: &LedgerLine| line.batch == reported.batch);
            if recorded || repeated {
                continue;
            }
            self.replay.check(
                &plan,
                &self.dataset,
                member.rank,
                self.resume_batch,
                reported,
            )?;
            lines.push(LedgerLine {
                generation: member.generation,
                rank: member.rank,
                batch: reported.batch,
                items: Some(reported.item_ids.clone()),
                rolled_back: false,
            });
        }
        Ok(lines)
    }

    pub fn heartbeat(
        &mut self,
        heartbeat: &WorkerHeartbeat,
    ) -> Result<HeartbeatReply, MembershipError> {
        if self.phase == Phase::Finished {
            return Ok(reply(Command::Stop, "job finished"));
        }
        if let Phase::Failed(reason) = &self.phase {
            return Ok(reply(Command::Fail, &format!("job failed: {reason}")));
        }
        let member = &heartbeat.member;
        let now = self.clock.now();
        let Some(entry) = self.workers.get_mut(&member.worker_id) else {
            return Err(MembershipError::UnknownWorker(member.worker_id.clone()));
        };
        entry.last_seen = now;
        if member.generation != self.state.generation {
            return Ok(reply(
                Command::Regroup,
                &format!(
                    "generation {} is stale, the current one is {}",
                    member.generation, self.state.generation
                ),
            ));
        }
        let assigned = Assignment {
            rank: member.rank,
            generation: member.generation,
        };
        if entry.assignment != Some(assigned) {
            return Err(MembershipError::WrongRank {
                worker_id: member.worker_id.clone(),
                rank: member.rank,
                generation: member.generation,
            });
        }
        let lines = match self.check_heartbeat(heartbeat) {
            Ok(lines) => lines,
            Err(error) => return Err(self.refused(&member.worker_id, error)),
        };
        self.book_heartbeat(heartbeat, &lines)?;
        if !heartbeat.job_failure.is_empty() {
            let reason = format!("rank {}: {}", member.rank, heartbeat.job_failure);
            self.fail(reason.clone());
            return Ok(reply(Command::Fail, &format!("job failed: {reason}")));
        }
        if !heartbeat.unusable_checkpoint.is_empty() {
            return Ok(self.checkpoint_unusable(member.rank, heartbeat));
        }
        if heartbeat.fatal {
            return Ok(self.start_failed(member.rank, &heartbeat.error));
        }
        if !heartbeat.error.is_empty() {
            let text = format!("rank {} reported: {}", member.rank, heartbeat.error);
            self.start_regroup(text.clone());
            return Ok(reply(Command::Regroup, &text));
        }
        if self.phase == Phase::Forming {
            return Ok(reply(Command::Regroup, "the group is re-forming"));
        }
        if self.is_current_plan(heartbeat.epoch, heartbeat.segment) {
            if let Some(command) =
                self.requested_checkpoint_command(member.rank, heartbeat.batches_done)
            {
                return Ok(command);
            }
        }
        Ok(reply(Command::Continue, ""))
    }

    /// Records a checked heartbeat: the worker's figures, the metrics, a diverged loss as an
    /// event, and the ledger lines. Completed batches of the current generation are recorded
    /// even while a regroup is forming: the regroup then rolls back those after the checkpoint
    /// it resumes from.
    fn book_heartbeat(
        &mut self,
        heartbeat: &WorkerHeartbeat,
        lines: &[LedgerLine],
    ) -> Result<(), MembershipError> {
        let member = &heartbeat.member;
        let of_current_plan = self.is_current_plan(heartbeat.epoch, heartbeat.segment);
        let Some(entry) = self.workers.get_mut(&member.worker_id) else {
            return Err(MembershipError::UnknownWorker(member.worker_id.clone()));
        };
        let first_divergence = !heartbeat.loss.is_finite() && entry.non_finite_losses == 0;
        let added = entry.record_heartbeat(heartbeat, of_current_plan);
        for (bin, count) in arbor_runtime::trainer::TOKEN_LENGTH_BINS.iter().zip(added) {
            self.metrics.prompts(bin, count);
        }
        if !heartbeat.loss.is_finite() {
            self.metrics.non_finite_losses.inc();
        }
        if first_divergence {
            self.event(format!(
                "rank {} reported a non-finite loss ({}) at batch {}: the run may have diverged",
                member.rank, heartbeat.loss, heartbeat.batches_done
            ));
        }
        if member.rank == 0 && heartbeat.learning_rate > 0.0 {
            self.metrics.learning_rate.set(heartbeat.learning_rate);
        }
        if let (0, Some((loss, step))) = (member.rank, heartbeat.validation) {
            self.metrics.validation_loss.set(loss);
            self.validation = Some((loss, step));
        }
        self.ledger
            .append(lines)
            .map_err(|error| MembershipError::Internal(format!("writing the ledger: {error:#}")))?;
        self.observe_progress(self.clock.now());
        Ok(())
    }

    /// A rank could not resume from the checkpoint it was given: fall back to the newest
    /// earlier complete checkpoint of the plan and re-form the group from it (the ledger rolls
    /// back to it), or fail the job when there is none. A report about a checkpoint the job no
    /// longer resumes from (another rank's report already moved it) only re-forms the group.
    fn checkpoint_unusable(&mut self, rank: u32, heartbeat: &WorkerHeartbeat) -> HeartbeatReply {
        let reported = &heartbeat.unusable_checkpoint;
        let current = self
            .state
            .last_checkpoint
            .as_ref()
            .map(|last| last.path.as_str());
        if current != Some(reported.as_str()) {
            return reply(Command::Regroup, "the group is re-forming");
        }
        let problem = format!("rank {rank}: {}", heartbeat.error);
        match state_check::fall_back_to_an_earlier_checkpoint(
            &mut self.state,
            self.run_store.as_ref(),
            problem,
        ) {
            Ok(fallback) => {
                warn!(%fallback, "a rank could not resume from the last checkpoint");
                self.event(fallback.clone());
                if let Err(error) = self.persist() {
                    warn!(error = format!("{error:#}"), "persisting state failed");
                }
                self.start_regroup(fallback.clone());
                reply(Command::Regroup, &fallback)
            }
            Err(error) => {
                let reason = format!("{error:#}");
                self.fail(reason.clone());
                reply(Command::Fail, &format!("job failed: {reason}"))
            }
        }
    }

    /// A rank's trainer did not start. The same failure (by its text) `max_start_failures`
    /// times fails the job with it; before that the group re-forms and tries again.
    fn start_failed(&mut self, rank: u32, error: &str) -> HeartbeatReply {
        let limit = self.config.cluster.max_start_failures;
        let count = self.start_failures.entry(error.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        let count = *count;
        if count >= limit {
            let reason = format!(
                "rank {rank} cannot train this job ({count} start failures, cluster.max_start_failures {limit}): {error}"
            );
            self.fail(reason.clone());
            return reply(Command::Fail, &format!("job failed: {reason}"));
        }
        let text = format!("rank {rank} could not start ({count} of {limit}): {error}");
        self.event(text.clone());
        self.start_regroup(text.clone());
        reply(Command::Regroup, &text)
    }

    pub fn shard_source(&mut self, ask: &ShardAsk) -> Result<Option<ShardSource>, MembershipError> {
        if self.phase == Phase::Finished {
            return Err(MembershipError::JobFinished);
        }
        self.check_member(&ask.member)?;
        if ask.epoch < self.state.epoch {
            return Err(MembershipError::StaleEpoch(format!(
                "epoch {} is over: the current epoch is {}",
                ask.epoch, self.state.epoch
            )));
        }
        if ask.epoch > self.state.epoch + 1 {
            let error = MembershipError::out_of_range(
                "shard.epoch",
                format!(
                    "epoch {} is more than one ahead of the current epoch {}",
                    ask.epoch, self.state.epoch
                ),
            );
            return Err(self.refused(&ask.member.worker_id, error));
        }
        if ask.epoch > self.state.epoch {
            return Ok(None);
        }
        let plan = self.plan.clone().ok_or(MembershipError::NoPlan)?;
        if ask.start_index > plan.shard_len() {
            let error = MembershipError::malformed(
                "shard.start_index",
                format!(
                    "start_index {} is past the shard's {} items",
                    ask.start_index,
                    plan.shard_len()
                ),
            );
            return Err(self.refused(&ask.member.worker_id, error));
        }
        let mut stream = 0;
        if let Some(entry) = self.workers.get_mut(&ask.member.worker_id) {
            entry.shard_stream += 1;
            entry.stream_cut_at = None;
            stream = entry.shard_stream;
        }
        Ok(Some(ShardSource {
            plan,
            segment: self.current_segment(),
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
        let now = self.clock.now();
        if let Some(entry) = self.workers.get_mut(worker_id) {
            if entry.shard_stream == stream {
                entry.stream_cut_at.get_or_insert(now);
            }
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

#[cfg(test)]
mod tests;
