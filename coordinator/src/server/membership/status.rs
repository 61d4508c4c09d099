//! What the coordinator shows: the status reply (`arbor status`), the job's progress and ETA,
//! the recent events with their times, and the Prometheus gauges.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use arbor_proto::v1::{JobEvent, Progress, ResumePoint, StatusReply, WorkerStatus};
use tracing::info;

use super::registry::Assignment;
use super::{Membership, Phase};

/// Events kept for `arbor status`.
pub const RECENT_EVENTS: usize = 64;
/// Weight of the newest step-rate sample in the moving average.
const RATE_SMOOTHING: f64 = 0.3;
/// Step-rate samples closer together than this are merged.
const RATE_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// One job event and when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedEvent {
    pub at: SystemTime,
    pub text: String,
}

impl TimedEvent {
    pub fn unix_seconds(&self) -> f64 {
        self.at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// `2026-12-03T12:34:56Z text`.
    pub fn line(&self) -> String {
        format!(
            "{} {}",
            humantime::format_rfc3339_seconds(self.at),
            self.text
        )
    }
}

/// The last [`RECENT_EVENTS`] events.
#[derive(Debug, Default)]
pub struct EventLog {
    events: VecDeque<TimedEvent>,
}

impl EventLog {
    pub fn push(&mut self, at: SystemTime, text: String) {
        info!(event = %text, "job event");
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(TimedEvent { at, text });
    }

    pub fn iter(&self) -> impl Iterator<Item = &TimedEvent> {
        self.events.iter()
    }
}

/// A moving average of the optimizer-step rate, from (time, step) samples.
#[derive(Debug, Default, Clone)]
pub struct StepRate {
    last: Option<(Instant, u64)>,
    steps_per_second: Option<f64>,
}

impl StepRate {
    /// Adds a sample; a step count below the last one (a rollback) restarts the average's
    /// baseline without discarding the rate.
    pub fn observe(&mut self, now: Instant, step: u64) {
        let Some((then, then_step)) = self.last else {
            self.last = Some((now, step));
            return;
        };
        if step < then_step {
            self.last = Some((now, step));
            return;
        }
        let elapsed = now.saturating_duration_since(then);
        if elapsed < RATE_MIN_INTERVAL {
            return;
        }
        let rate = (step - then_step) as f64 / elapsed.as_secs_f64();
        self.steps_per_second = Some(match self.steps_per_second {
            None => rate,
            Some(average) => average + RATE_SMOOTHING * (rate - average),
        });
        self.last = Some((now, step));
    }

    pub fn steps_per_second(&self) -> Option<f64> {
        self.steps_per_second
    }
}

/// The inputs of [`progress`], all from the plan and the job state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressInputs {
    pub epochs: u64,
    pub epoch: u64,
    pub max_steps: Option<u64>,
    pub grad_accum: u32,
    /// Batches per rank of the current plan and of a full epoch at the current world size.
    pub plan_batches: u64,
    pub full_epoch_batches: u64,
    /// Where the current generation resumed, and its step there.
    pub resume_batch: u64,
    pub resume_step: u64,
    /// Batches done by the slowest rank of the current plan.
    pub slowest_batches_done: u64,
    /// The job's last step once it finished.
    pub finished_at_step: Option<u64>,
}

/// Planned and done optimizer steps, with the fraction done.
pub fn progress(inputs: &ProgressInputs) -> (u64, u64, f64) {
    let accum = u64::from(inputs.grad_accum.max(1));
    let done_batches = inputs.slowest_batches_done.clamp(
        inputs.resume_batch,
        inputs.plan_batches.max(inputs.resume_batch),
    );
    let current_step = inputs.resume_step + (done_batches - inputs.resume_batch) / accum;
    let left_this_epoch = (inputs.plan_batches - done_batches).div_ceil(accum);
    let later_epochs = inputs.epochs.saturating_sub(inputs.epoch + 1);
    let mut total_steps = current_step
        + left_this_epoch
        + later_epochs.saturating_mul(inputs.full_epoch_batches.div_ceil(accum));
    if let Some(max_steps) = inputs.max_steps {
        total_steps = total_steps.min(max_steps);
    }
    if let Some(step) = inputs.finished_at_step {
        return (step, step, 1.0);
    }
    let current_step = current_step.min(total_steps);
    let fraction = if total_steps == 0 {
        0.0
    } else {
        current_step as f64 / total_steps as f64
    };
    (total_steps, current_step, fraction)
}

impl Membership {
    pub(super) fn event(&mut self, text: String) {
        let at = self.clock.wall();
        self.events.push(at, text);
    }

    fn progress_inputs(&self) -> ProgressInputs {
        let plan_batches = self.plan.as_ref().map_or(0, |plan| plan.batches_per_rank());
        let world_size = u64::from(self.group.len().max(1) as u32);
        let global_batch = world_size * u64::from(self.config.schedule.bsz.max(1));
        let slowest_batches_done = self
            .group
            .iter()
            .filter_map(|id| self.workers.get(id))
            .map(|worker| worker.batches_done)
            .min()
            .unwrap_or(self.resume_batch);
        ProgressInputs {
            epochs: self.config.schedule.epochs,
            epoch: self.state.epoch,
            max_steps: self.config.schedule.max_steps,
            grad_accum: self.config.schedule.grad_accum,
            plan_batches,
            full_epoch_batches: self.dataset.items.len() as u64 / global_batch,
            resume_batch: self.resume_batch,
            resume_step: self.resume_step,
            slowest_batches_done,
            finished_at_step: (self.phase == Phase::Finished).then_some(self.state.step),
        }
    }

    /// The job's progress at `now`.
    pub fn progress(&self, now: Instant) -> Progress {
        let inputs = self.progress_inputs();
        let (total_steps, current_step, fraction_done) = progress(&inputs);
        let steps_per_second = self.step_rate.steps_per_second().unwrap_or(0.0);
        let eta_seconds = (self.phase == Phase::Finished).then_some(0.0).or_else(|| {
            (steps_per_second > 0.0).then(|| (total_steps - current_step) as f64 / steps_per_second)
        });
        Progress {
            total_steps,
            current_step,
            fraction_done,
            eta_seconds,
            steps_per_second,
            epoch_batches_done: inputs.slowest_batches_done.min(inputs.plan_batches),
            epoch_batches: inputs.plan_batches,
            epochs: inputs.epochs,
            seconds_since_checkpoint: now
                .saturating_duration_since(self.checkpoints.last_completed_at)
                .as_secs_f64(),
        }
    }

    /// Feeds the step-rate average from the group's latest heartbeats.
    pub(super) fn observe_progress(&mut self, now: Instant) {
        let (_, current_step, _) = progress(&self.progress_inputs());
        self.step_rate.observe(now, current_step);
    }

    pub(super) fn update_gauges(&self) {
        let metrics = &self.metrics;
        metrics.workers.set(self.workers.len() as i64);
        metrics.world_size.set(self.group.len() as i64);
        metrics.generation.set(self.state.generation as i64);
        metrics.epoch.set(self.state.epoch as i64);
        metrics.step.set(self.state.step as i64);
        let (batches, rate) = self
            .group
            .iter()
            .filter_map(|id| self.workers.get(id))
            .fold((0u64, 0f64), |(b, r), w| {
                (b.saturating_add(w.batches_done), r + w.items_per_second)
            });
        metrics
            .batches_done
            .set(batches.min(i64::MAX as u64) as i64);
        metrics.items_per_second.set(rate);
        let progress = self.progress(self.clock.now());
        metrics
            .planned_steps
            .set(progress.total_steps.min(i64::MAX as u64) as i64);
        metrics.progress_ratio.set(progress.fraction_done);
        metrics
            .eta_seconds
            .set(progress.eta_seconds.unwrap_or(-1.0));
        metrics
            .epoch_batches_done
            .set(progress.epoch_batches_done.min(i64::MAX as u64) as i64);
        metrics
            .epoch_batches
            .set(progress.epoch_batches.min(i64::MAX as u64) as i64);
        metrics
            .seconds_since_checkpoint
            .set(progress.seconds_since_checkpoint);
    }

    pub fn status(&self) -> StatusReply {
        let now = self.clock.now();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, entry)| {
                let rank = match entry.assignment {
                    Some(Assignment { rank, generation })
                        if generation == self.state.generation && !entry.waiting =>
                    {
                        i64::from(rank)
                    }
                    _ => -1,
                };
                WorkerStatus {
                    worker_id: id.clone(),
                    node: entry.join.node.clone(),
                    local_rank: entry.join.local_rank,
                    rank,
                    batches_done: entry.batches_done,
                    items_per_second: entry.items_per_second,
                    loss: entry.loss,
                    seconds_since_heartbeat: now
                        .saturating_duration_since(entry.last_seen)
                        .as_secs_f64(),
                    learning_rate: entry.learning_rate,
                    token_length_counts: entry.token_length_counts.to_vec(),
                    non_finite_losses: entry.non_finite_losses,
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
            segment: self.current_segment(),
            batches_per_rank: self.plan.as_ref().map_or(0, |p| p.batches_per_rank()),
            workers,
            last_checkpoint,
            recent_events: self.events.iter().map(TimedEvent::line).collect(),
            regroups: self.state.regroups,
            step: self.state.step,
            failure: match &self.phase {
                Phase::Failed(reason) => reason.clone(),
                _ => String::new(),
            },
            pending_checkpoint_batch: self
                .checkpoints
                .requested
                .as_ref()
                .map_or(0, |requested| requested.key.batch),
            progress: Some(self.progress(now)),
            events: self
                .events
                .iter()
                .map(|event| JobEvent {
                    unix_seconds: event.unix_seconds(),
                    text: event.text.clone(),
                })
                .collect(),
            validation_loss: self.validation.map(|(loss, _)| loss),
            validation_step: self.validation.map_or(0, |(_, step)| step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> ProgressInputs {
        ProgressInputs {
            epochs: 4,
            epoch: 1,
            max_steps: None,
            grad_accum: 2,
            plan_batches: 10,
            full_epoch_batches: 10,
            resume_batch: 0,
            resume_step: 5,
            slowest_batches_done: 4,
            finished_at_step: None,
        }
    }

    #[test]
    fn progress_counts_steps_across_epochs_and_respects_max_steps() {
        // Epoch 1 of 4, 5 steps per epoch (10 batches, grad_accum 2): 5 + 2 done of 20.
        assert_eq!(progress(&inputs()), (20, 7, 0.35));
        let capped = ProgressInputs {
            max_steps: Some(14),
            ..inputs()
        };
        assert_eq!(progress(&capped), (14, 7, 0.5));
        // Finished: the job's own last step, whatever stale heartbeats say.
        let finished = ProgressInputs {
            finished_at_step: Some(18),
            slowest_batches_done: 10,
            epoch: 4,
            resume_step: 20,
            ..inputs()
        };
        assert_eq!(progress(&finished), (18, 18, 1.0));
    }

    #[test]
    fn progress_ignores_heartbeats_outside_the_plan() {
        let lying = ProgressInputs {
            slowest_batches_done: u64::MAX,
            ..inputs()
        };
        let (total, current, fraction) = progress(&lying);
        assert!(current <= total && fraction <= 1.0, "{current} {total}");
    }

    #[test]
    fn the_step_rate_is_a_moving_average_over_whole_seconds() {
        let start = Instant::now();
        let mut rate = StepRate::default();
        rate.observe(start, 0);
        rate.observe(start + Duration::from_millis(500), 100);
        assert_eq!(
            rate.steps_per_second(),
            None,
            "samples under 1 s apart merge"
        );
        rate.observe(start + Duration::from_secs(2), 20);
        assert_eq!(rate.steps_per_second(), Some(10.0));
        rate.observe(start + Duration::from_secs(4), 60);
        assert_eq!(rate.steps_per_second(), Some(10.0 + 0.3 * (20.0 - 10.0)));
        // A rollback moves the baseline and keeps the rate.
        rate.observe(start + Duration::from_secs(5), 30);
        assert_eq!(rate.steps_per_second(), Some(13.0));
    }
}
