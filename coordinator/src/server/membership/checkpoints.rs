//! Checkpoints: the ones the coordinator asks for (`arbor checkpoint`,
//! `schedule.checkpoint_every_minutes`) and how far ahead it asks, the re-asks when a rank
//! passed the batch before it heard, and completion once every rank reported.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arbor_common::accumulation::window_end_at_or_after;
use arbor_common::plan::EpochPlan;
use arbor_proto::v1::{Command, HeartbeatReply, RequestCheckpointReply};

use super::error::MembershipError;
use super::requests::CheckpointReport;
use super::{Membership, Phase};
use crate::server::job_state::{CheckpointRecord, SegmentRecord};
use crate::server::ledger::EpochLedger;

/// How often a requested checkpoint that a rank missed (it passed the batch before it heard of
/// the request) is asked for again, further ahead, before the request is dropped.
pub const CHECKPOINT_REQUEST_ATTEMPTS: u32 = 3;

/// One checkpoint of one plan: where the ranks' reports are collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointKey {
    pub epoch: u64,
    pub segment: u64,
    pub batch: u64,
}

/// A checkpoint the coordinator asked the running group for, at `batch` of the current plan.
#[derive(Debug, Clone)]
pub struct RequestedCheckpoint {
    pub generation: u64,
    pub key: CheckpointKey,
    pub reason: String,
    pub attempt: u32,
    pub export: bool,
}

/// Requested checkpoints and the ranks' reports of the current plan.
#[derive(Debug)]
pub struct CheckpointBook {
    pub requested: Option<RequestedCheckpoint>,
    pub reports: HashMap<CheckpointKey, BTreeSet<u32>>,
    /// When the last checkpoint completed (or the plan started): `checkpoint_every_minutes`
    /// counts from here.
    pub last_completed_at: Instant,
}

impl CheckpointBook {
    pub fn new(now: Instant) -> Self {
        Self {
            requested: None,
            reports: HashMap::new(),
            last_completed_at: now,
        }
    }

    /// A new plan: reports and requests of the old one no longer apply.
    pub fn restart(&mut self, now: Instant) {
        self.requested = None;
        self.reports.clear();
        self.last_completed_at = now;
    }
}

/// Batches ahead of the furthest rank at which a checkpoint is asked for: what the fastest
/// rank trains in two heartbeat intervals, times the attempt (a re-ask goes further), plus
/// one. Rates that are not finite count as zero.
pub fn checkpoint_lead(batches_per_second: f64, heartbeat_interval_s: f64, attempt: u32) -> u64 {
    let ahead = batches_per_second * heartbeat_interval_s * 2.0 * f64::from(attempt + 1);
    let ahead = if ahead.is_finite() && ahead > 0.0 {
        ahead.ceil().min(u64::MAX as f64 / 2.0) as u64
    } else {
        0
    };
    ahead.saturating_add(1)
}

/// What a rank at `batches_done` hears about a requested checkpoint at `requested_batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Not there yet: ask it.
    Ask,
    /// At the batch, or already reported it: nothing to say.
    Quiet,
    /// It passed the batch without writing it: ask again further ahead.
    AskAgain,
    /// It passed the batch and the request was asked for too often: drop it.
    GiveUp,
}

pub fn request_outcome(
    requested_batch: u64,
    attempt: u32,
    batches_done: u64,
    reported: bool,
) -> RequestOutcome {
    if batches_done < requested_batch {
        return RequestOutcome::Ask;
    }
    if batches_done == requested_batch || reported {
        return RequestOutcome::Quiet;
    }
    if attempt + 1 >= CHECKPOINT_REQUEST_ATTEMPTS {
        return RequestOutcome::GiveUp;
    }
    RequestOutcome::AskAgain
}

impl RequestedCheckpoint {
    /// The heartbeat reply that asks a rank for this checkpoint.
    pub fn command(&self) -> HeartbeatReply {
        HeartbeatReply {
            command: Command::Checkpoint as i32,
            checkpoint_batch: self.key.batch,
            reason: self.reason.clone(),
            export: self.export,
        }
    }

    pub fn reply(&self) -> RequestCheckpointReply {
        RequestCheckpointReply {
            generation: self.generation,
            epoch: self.key.epoch,
            segment: self.key.segment,
            batch: self.key.batch,
        }
    }
}

impl Membership {
    pub(super) fn timed_checkpoint_due(&self, now: Instant) -> bool {
        let Some(minutes) = self.config.schedule.checkpoint_every_minutes else {
            return false;
        };
        self.phase == Phase::Running
            && self.checkpoints.requested.is_none()
            && now
                .saturating_duration_since(self.checkpoints.last_completed_at)
                .as_secs_f64()
                >= minutes * 60.0
    }

    /// Asks the running group to checkpoint at the first accumulation window's end that every
    /// rank can still reach ([`checkpoint_lead`] ahead of the furthest rank). Repeated calls
    /// while one is pending return the pending one.
    pub fn request_checkpoint(
        &mut self,
        reason: &str,
        export: bool,
    ) -> Result<RequestCheckpointReply, MembershipError> {
        if self.phase != Phase::Running {
            return Err(MembershipError::NotRunning(self.phase.name()));
        }
        if let Some(requested) = self.checkpoints.requested.as_mut() {
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
    ) -> Result<RequestedCheckpoint, MembershipError> {
        let plan = self.plan.clone().ok_or(MembershipError::NoPlan)?;
        let members: Vec<_> = self
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
        let lead = checkpoint_lead(
            batches_per_second,
            self.config.cluster.heartbeat_interval_s,
            attempt,
        );
        let total = plan.batches_per_rank();
        let batch = window_end_at_or_after(
            furthest.saturating_add(lead).min(total),
            total,
            self.config.schedule.grad_accum,
        );
        let requested = RequestedCheckpoint {
            generation: self.state.generation,
            key: CheckpointKey {
                epoch: self.state.epoch,
                segment: self.current_segment(),
                batch,
            },
            reason,
            attempt,
            export,
        };
        let with_export = if export { " with exports" } else { "" };
        self.event(format!(
            "checkpoint{with_export} requested at batch {batch} of epoch {} (ranks at batch {furthest} or less): {}",
            requested.key.epoch, requested.reason
        ));
        self.checkpoints.requested = Some(requested.clone());
        Ok(requested)
    }

    /// The heartbeat command a rank at `batches_done` gets for the requested checkpoint
    /// ([`request_outcome`]).
    pub(super) fn requested_checkpoint_command(
        &mut self,
        rank: u32,
        batches_done: u64,
    ) -> Option<HeartbeatReply> {
        let requested = self.checkpoints.requested.clone()?;
        let reported = self
            .checkpoints
            .reports
            .get(&requested.key)
            .is_some_and(|ranks| ranks.contains(&rank));
        let outcome = request_outcome(
            requested.key.batch,
            requested.attempt,
            batches_done,
            reported,
        );
        let missed = format!(
            "rank {rank} passed the requested checkpoint at batch {} (it is at {batches_done})",
            requested.key.batch
        );
        match outcome {
            RequestOutcome::Ask => Some(requested.command()),
            RequestOutcome::Quiet => None,
            RequestOutcome::GiveUp => {
                self.checkpoints.requested = None;
                self.event(format!("{missed}; giving the request up"));
                self.checkpoints.last_completed_at = self.clock.now();
                None
            }
            RequestOutcome::AskAgain => {
                self.checkpoints.requested = None;
                self.event(format!("{missed}; asking again further ahead"));
                let retried = self
                    .issue_checkpoint_request(
                        requested.reason,
                        requested.attempt + 1,
                        requested.export,
                    )
                    .ok()?;
                (batches_done < retried.key.batch).then(|| retried.command())
            }
        }
    }

    /// Books a rank's completed checkpoint; `Ok(true)` once every rank of the group has.
    pub fn checkpoint_done(&mut self, report: &CheckpointReport) -> Result<bool, MembershipError> {
        self.check_member(&report.member)?;
        let result = self.check_checkpoint_report(report);
        let plan = match result {
            Ok(plan) => plan,
            Err(error) => return Err(self.refused(&report.member.worker_id, error)),
        };
        let key = CheckpointKey {
            epoch: report.epoch,
            segment: report.segment,
            batch: report.batch,
        };
        let reports = self.checkpoints.reports.entry(key).or_default();
        reports.insert(report.member.rank);
        if reports.len() < self.group.len() {
            return Ok(false);
        }
        self.checkpoints.reports.remove(&key);
        self.complete_checkpoint(report, &plan).map_err(|error| {
            MembershipError::Internal(format!("completing the checkpoint: {error:#}"))
        })?;
        Ok(true)
    }

    /// A report must be for the current plan, at a batch this generation can have reached,
    /// with a step count that batches can explain, and with every batch it covers already in
    /// the ledger.
    fn check_checkpoint_report(
        &self,
        report: &CheckpointReport,
    ) -> Result<Arc<EpochPlan>, MembershipError> {
        let segment = self.current_segment();
        if report.epoch != self.state.epoch || report.segment != segment {
            return Err(MembershipError::StaleEpoch(format!(
                "checkpoint for epoch {} segment {} but the job is at epoch {} segment {segment}",
                report.epoch, report.segment, self.state.epoch
            )));
        }
        let plan = self.plan.clone().ok_or(MembershipError::NoPlan)?;
        if report.batch > plan.batches_per_rank() {
            return Err(MembershipError::malformed(
                "checkpoint_done.batch",
                format!(
                    "checkpoint at batch {} but the plan has {} batches",
                    report.batch,
                    plan.batches_per_rank()
                ),
            ));
        }
        if report.batch < self.resume_batch {
            return Err(MembershipError::malformed(
                "checkpoint_done.batch",
                format!(
                    "checkpoint at batch {} but this generation resumed at batch {}",
                    report.batch, self.resume_batch
                ),
            ));
        }
        let most_steps = self
            .resume_step
            .saturating_add(report.batch - self.resume_batch);
        if report.step < self.state.step || report.step > most_steps {
            return Err(MembershipError::malformed(
                "checkpoint_done.step",
                format!(
                    "step {} is outside {}..={most_steps}: the job checkpointed step {} and \
                     resumed at batch {}",
                    report.step, self.state.step, self.state.step, self.resume_batch
                ),
            ));
        }
        // Every batch the checkpoint covers must stand in the ledger first: a checkpoint that
        // completed ahead of them would resume past batches nobody recorded.
        let member = &report.member;
        if let Some(missing) = (self.resume_batch..report.batch)
            .find(|&batch| !self.ledger.contains(member.generation, member.rank, batch))
        {
            return Err(MembershipError::LedgerBehind {
                rank: member.rank,
                batch: report.batch,
                missing,
            });
        }
        Ok(plan)
    }

    fn complete_checkpoint(
        &mut self,
        report: &CheckpointReport,
        plan: &EpochPlan,
    ) -> anyhow::Result<()> {
        let path = format!("checkpoints/step-{}", report.step);
        let record = CheckpointRecord {
            epoch: report.epoch,
            segment: report.segment,
            batch: report.batch,
            step: report.step,
            world_size: self.group.len() as u32,
            generation: report.member.generation,
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
            current.checkpoint_batch = report.batch;
        }
        self.state.step = self.state.step.max(report.step);
        self.state.checkpoint_completed(record);
        self.checkpoints.last_completed_at = self.clock.now();
        if self
            .checkpoints
            .requested
            .as_ref()
            .is_some_and(|requested| report.batch >= requested.key.batch)
        {
            self.checkpoints.requested = None;
        }
        self.event(format!(
            "checkpoint complete: {path} (epoch {} batch {})",
            report.epoch, report.batch
        ));
        if report.batch == plan.batches_per_rank() {
            self.event(format!("epoch {} complete", self.state.epoch));
            self.state.epoch += 1;
            self.state.segments = vec![SegmentRecord {
                segment: 0,
                world_size: self.group.len() as u32,
                checkpoint_batch: 0,
                generations: vec![self.state.generation],
            }];
            self.resume_batch = 0;
            // The ranks' counts were of the last epoch's plan; their next heartbeats bring
            // this one's.
            for id in &self.group {
                if let Some(entry) = self.workers.get_mut(id) {
                    entry.batches_done = 0;
                }
            }
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
        self.persist().context("persisting state.json")?;
        self.update_gauges();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lead_covers_two_heartbeat_intervals_per_attempt() {
        // 1 batch/s, heartbeat every 1 s: 2 batches ahead plus one, then 4 + 1, then 6 + 1.
        assert_eq!(checkpoint_lead(1.0, 1.0, 0), 3);
        assert_eq!(checkpoint_lead(1.0, 1.0, 1), 5);
        assert_eq!(checkpoint_lead(1.0, 1.0, 2), 7);
        // Idle or nonsense rates still ask one batch ahead, never overflow.
        assert_eq!(checkpoint_lead(0.0, 1.0, 0), 1);
        assert_eq!(checkpoint_lead(f64::NAN, 1.0, 0), 1);
        assert_eq!(checkpoint_lead(f64::INFINITY, 1.0, 0), 1);
        assert!(checkpoint_lead(1e100, 1.0, u32::MAX - 1) > u64::MAX / 4);
    }

    #[test]
    fn a_missed_request_is_asked_again_then_given_up() {
        assert_eq!(request_outcome(13, 0, 10, false), RequestOutcome::Ask);
        assert_eq!(request_outcome(13, 0, 13, false), RequestOutcome::Quiet);
        assert_eq!(request_outcome(13, 0, 20, true), RequestOutcome::Quiet);
        assert_eq!(request_outcome(13, 0, 20, false), RequestOutcome::AskAgain);
        assert_eq!(request_outcome(25, 1, 30, false), RequestOutcome::AskAgain);
        assert_eq!(
            request_outcome(37, CHECKPOINT_REQUEST_ATTEMPTS - 1, 40, false),
            RequestOutcome::GiveUp
        );
    }
}
