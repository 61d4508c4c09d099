//! Group formation: who is admitted and in which rank order, the plan the group trains, and
//! where it resumes (the last complete checkpoint of the current plan, or a re-shard).

use std::sync::Arc;

use anyhow::Context;
use arbor_common::accumulation::{scheduled_checkpoints, CheckpointSchedule, TrainingScale};
use arbor_common::plan::{ConsumedSet, EpochPlan, PlanParams};
use arbor_proto::v1::{JoinReply, ResumePoint};

use super::error::MembershipError;
use super::registry::{Assignment, WorkerEntry};
use super::requests::WorkerJoin;
use super::{Membership, Phase};
use crate::server::job_state::SegmentRecord;

/// Where a waiting worker goes in rank order: ranks contiguous per node, local ranks in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RankOrderKey {
    pub node: String,
    pub local_rank: u32,
    pub worker_id: String,
}

/// The workers admitted to a new group, in rank order: at most `max_workers` of those waiting.
pub fn rank_order(mut waiting: Vec<RankOrderKey>, max_workers: u32) -> Vec<RankOrderKey> {
    waiting.sort();
    waiting.truncate(max_workers as usize);
    waiting
}

/// Where a regroup resumes in the current plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeDecision {
    /// The same world size keeps the plan and resumes at its last complete checkpoint.
    SamePlan { batch: u64 },
    /// Another world size re-shards what is left into a new plan, from its first batch.
    Reshard,
}

pub fn resume_decision(current: &SegmentRecord, world_size: u32) -> ResumeDecision {
    if current.world_size == world_size {
        ResumeDecision::SamePlan {
            batch: current.checkpoint_batch,
        }
    } else {
        ResumeDecision::Reshard
    }
}

impl Membership {
    /// Registers a Join. The caller then waits for [`Membership::join_reply`].
    pub fn register_join(&mut self, join: WorkerJoin) -> Result<(), MembershipError> {
        self.check_job_open()?;
        let now = self.clock.now();
        self.last_join = now;
        let worker_id = join.worker_id.clone();
        let in_group = self.group.contains(&worker_id);
        let known = self.workers.contains_key(&worker_id);
        self.workers
            .insert(worker_id.clone(), WorkerEntry::new(join, now));
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
        if self
            .workers
            .get(worker_id)
            .is_some_and(|entry| entry.waiting)
        {
            self.workers.remove(worker_id);
            self.event(format!("worker {worker_id} left before the group formed"));
            self.update_gauges();
        }
    }

    /// The reply for a waiting worker once its group formed; `Ok(None)` while still waiting.
    pub fn join_reply(
        &mut self,
        worker_id: &str,
        config_toml: &str,
    ) -> Result<Option<JoinReply>, MembershipError> {
        self.check_job_open()?;
        let now = self.clock.now();
        let Some(entry) = self.workers.get_mut(worker_id) else {
            return Err(MembershipError::NoLongerRegistered(worker_id.to_string()));
        };
        if entry.waiting || self.phase != Phase::Running {
            return Ok(None);
        }
        let Some(Assignment { rank, generation }) = entry.assignment else {
            return Ok(None);
        };
        if generation != self.state.generation {
            return Ok(None);
        }
        entry.last_seen = now;
        let store_address = self.workers[&self.group[0]].join.store_address();
        Ok(Some(JoinReply {
            rank,
            world_size: self.group.len() as u32,
            generation,
            store_address,
            store_prefix: format!("job/{}/gen/{generation}", self.config.job.name),
            job_config_toml: config_toml.to_string(),
            resume: Some(self.resume_point()),
        }))
    }

    fn resume_point(&self) -> ResumePoint {
        let checkpoint = self
            .state
            .last_checkpoint
            .as_ref()
            .map(|c| c.path.clone())
            .unwrap_or_default();
        ResumePoint {
            epoch: self.state.epoch,
            segment: self.current_segment(),
            batch: self.resume_batch,
            step: self.state.step,
            checkpoint,
        }
    }

    /// Starts a regroup: the current group's workers are told to Join again.
    pub(super) fn start_regroup(&mut self, reason: String) {
        if self.phase != Phase::Running {
            return;
        }
        self.event(format!("regroup: {reason}"));
        if let Some(requested) = self.checkpoints.requested.take() {
            self.event(format!(
                "requested checkpoint at batch {} withdrawn: the group is re-forming",
                requested.key.batch
            ));
        }
        self.phase = Phase::Forming;
        self.forming_since = self.clock.now();
        self.state.regroups += 1;
        self.metrics.regroups.inc();
        if let Err(error) = self.persist() {
            tracing::warn!(%error, "persisting state failed");
        }
    }

    pub(super) fn plan_params(&self, world_size: u32) -> PlanParams {
        PlanParams {
            seed: self.config.job.seed,
            epoch: self.state.epoch,
            world_size,
            bsz: self.config.schedule.bsz,
        }
    }

    /// The current plan of the epoch, rebuilt from the segment chain: each re-shard takes the
    /// items consumed by the earlier plans up to their last complete checkpoint.
    pub(super) fn rebuild_plan(&self) -> anyhow::Result<EpochPlan> {
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
    pub(super) fn start_plan(&mut self) -> anyhow::Result<()> {
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
        self.replay.reset();
        self.checkpoints.restart(self.clock.now());
        Ok(())
    }

    pub(super) fn form_group(&mut self) -> anyhow::Result<()> {
        let waiting = rank_order(
            self.workers
                .iter()
                .filter(|(_, entry)| entry.waiting)
                .map(|(id, entry)| RankOrderKey {
                    node: entry.join.node.clone(),
                    local_rank: entry.join.local_rank,
                    worker_id: id.clone(),
                })
                .collect(),
            self.config.cluster.max_workers,
        );
        let world_size = waiting.len() as u32;
        self.state.generation += 1;
        let generation = self.state.generation;

        // Resume from the last complete checkpoint of the current plan.
        match self.state.segments.last().cloned() {
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
                let rolled = self
                    .ledger
                    .roll_back_from(&current.generations, rollback_from)?;
                match resume_decision(&current, world_size) {
                    ResumeDecision::SamePlan { batch } => {
                        if let Some(current) = self.state.segments.last_mut() {
                            current.generations.push(generation);
                        }
                        self.resume_batch = batch;
                    }
                    ResumeDecision::Reshard => {
                        self.state.segments.push(SegmentRecord {
                            segment: generation,
                            world_size,
                            checkpoint_batch: 0,
                            generations: vec![generation],
                        });
                        self.resume_batch = 0;
                    }
                }
                if rolled > 0 {
                    self.event(format!(
                        "rolled back {rolled} batch(es) trained after batch {rollback_from}"
                    ));
                }
            }
        }
        self.start_plan()?;
        self.group = waiting.iter().map(|key| key.worker_id.clone()).collect();
        let now = self.clock.now();
        for (rank, key) in waiting.iter().enumerate() {
            if let Some(entry) = self.workers.get_mut(&key.worker_id) {
                entry.waiting = false;
                entry.assignment = Some(Assignment {
                    rank: rank as u32,
                    generation,
                });
                entry.last_seen = now;
                entry.batches_done = self.resume_batch;
                entry.lies = 0;
            }
        }
        self.phase = Phase::Running;
        self.event(format!(
            "group formed: generation {generation}, world size {world_size}, epoch {} segment {} from batch {}",
            self.state.epoch,
            self.current_segment(),
            self.resume_batch
        ));
        let scale = TrainingScale {
            world_size,
            bsz: self.config.schedule.bsz,
            grad_accum: self.config.schedule.grad_accum,
            batches_per_rank: self.plan.as_ref().map_or(0, |plan| plan.batches_per_rank()),
        };
        self.event(scale.describe(Some(&self.config.train.lr)));
        self.persist()?;
        self.run_store
            .write("job.toml", self.config.to_toml().as_bytes())
            .context("writing run_dir/job.toml")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: &str, local_rank: u32, id: &str) -> RankOrderKey {
        RankOrderKey {
            node: node.into(),
            local_rank,
            worker_id: id.into(),
        }
    }

    #[test]
    fn ranks_are_contiguous_per_node_in_local_rank_order() {
        let order = rank_order(
            vec![
                key("b", 1, "b1"),
                key("a", 1, "a1"),
                key("b", 0, "b0"),
                key("a", 0, "a0"),
            ],
            3,
        );
        let ids: Vec<_> = order.iter().map(|k| k.worker_id.as_str()).collect();
        assert_eq!(ids, ["a0", "a1", "b0"]);
    }

    #[test]
    fn a_regroup_keeps_the_plan_only_at_the_same_world_size() {
        let segment = SegmentRecord {
            segment: 0,
            world_size: 4,
            checkpoint_batch: 12,
            generations: vec![1],
        };
        assert_eq!(
            resume_decision(&segment, 4),
            ResumeDecision::SamePlan { batch: 12 }
        );
        assert_eq!(resume_decision(&segment, 3), ResumeDecision::Reshard);
    }
}
