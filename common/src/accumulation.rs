//! Gradient accumulation windows and the checkpoint schedule they constrain.
//!
//! A rank's plan for one epoch (segment) has `epoch_batches` batches. Windows of `grad_accum`
//! micro-batches are counted from the plan's first batch; the plan's last batch closes the last
//! window, full or not, so no micro-batch's gradient is carried across an epoch. An optimizer
//! step happens at every window's end, and a checkpoint may only fall on one: a checkpoint in
//! the middle of a window would lose that window's pending gradients.
//!
//! The coordinator decides when ranks checkpoint (docs/architecture.md §1 step 6); it uses
//! [`scheduled_checkpoints`] for `schedule.checkpoint_every` and [`window_end_at_or_after`] for
//! checkpoints it asks for while a plan runs. Workers use the same functions to know when a
//! window closes, so both sides agree without talking.

/// The batch arithmetic of a run at one world size: what `arbor plan epoch` and the
/// coordinator print, because multi-GPU users keep getting it wrong in other trainers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TrainingScale {
    pub world_size: u32,
    /// Per-rank batch size.
    pub bsz: u32,
    pub grad_accum: u32,
    /// Batches each rank trains per epoch.
    pub batches_per_rank: u64,
}

impl TrainingScale {
    /// Images per optimizer step: ranks × bsz × grad_accum.
    pub fn global_batch(&self) -> u64 {
        u64::from(self.world_size) * u64::from(self.bsz) * u64::from(self.grad_accum.max(1))
    }

    /// Optimizer steps per epoch: the last window of an epoch may be short and still steps.
    pub fn steps_per_epoch(&self) -> u64 {
        self.batches_per_rank
            .div_ceil(u64::from(self.grad_accum.max(1)))
    }

    /// One line for logs and `arbor plan epoch`; `learning_rate` is `train.lr` as written.
    pub fn describe(&self, learning_rate: Option<&str>) -> String {
        let mut line = format!(
            "global batch {} = {} rank(s) x bsz {} x grad_accum {}; {} optimizer step(s) per epoch",
            self.global_batch(),
            self.world_size,
            self.bsz,
            self.grad_accum.max(1),
            self.steps_per_epoch()
        );
        if let Some(learning_rate) = learning_rate {
            line.push_str(&format!(
                "; learning rate {learning_rate} per optimizer step (not scaled by the global \
                 batch)"
            ));
        }
        line
    }
}

/// Whether batch `index` (0-based) of a plan of `epoch_batches` batches closes its
/// accumulation window of `grad_accum` micro-batches (`grad_accum` 0 is read as 1).
pub fn closes_accumulation_window(index: u64, epoch_batches: u64, grad_accum: u32) -> bool {
    let grad_accum = u64::from(grad_accum.max(1));
    (index + 1) % grad_accum == 0 || index + 1 >= epoch_batches
}

/// The number of micro-batches in the window batch `index` belongs to: `grad_accum`, or fewer
/// for the plan's last window when its batch count is not a multiple of it.
pub fn accumulation_window_len(index: u64, epoch_batches: u64, grad_accum: u32) -> u64 {
    let grad_accum = u64::from(grad_accum.max(1));
    let window_start = index - index % grad_accum;
    grad_accum
        .min(epoch_batches.saturating_sub(window_start))
        .max(1)
}

/// The smallest "batches done" count `>= batches_done` at which a window ends, i.e. where a
/// checkpoint may be taken; `epoch_batches` when none is left before the plan's end.
pub fn window_end_at_or_after(batches_done: u64, epoch_batches: u64, grad_accum: u32) -> u64 {
    let grad_accum = u64::from(grad_accum.max(1));
    batches_done
        .div_ceil(grad_accum)
        .saturating_mul(grad_accum)
        .min(epoch_batches)
}

/// What [`scheduled_checkpoints`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSchedule {
    /// Batches in the rank's plan.
    pub epoch_batches: u64,
    /// Batches of the plan already done (a resume point, always a window end).
    pub start_batch: u64,
    /// Optimizer steps done before `start_batch`.
    pub start_step: u64,
    pub grad_accum: u32,
    /// Checkpoint when the step count is a multiple of this.
    pub checkpoint_every: u64,
    /// The job stops after this many steps.
    pub max_steps: Option<u64>,
}

/// The "batches done" counts after `start_batch` at which ranks checkpoint, in order: every
/// window end where the step count is a multiple of `checkpoint_every`, the window end where
/// `max_steps` is reached (after which the plan stops), and the plan's last batch.
pub fn scheduled_checkpoints(schedule: &CheckpointSchedule) -> Vec<u64> {
    let checkpoint_every = schedule.checkpoint_every.max(1);
    let mut step = schedule.start_step;
    let mut batches = Vec::new();
    for index in schedule.start_batch..schedule.epoch_batches {
        if !closes_accumulation_window(index, schedule.epoch_batches, schedule.grad_accum) {
            continue;
        }
        step += 1;
        let done = index + 1;
        let steps_exhausted = schedule.max_steps.is_some_and(|max| step >= max);
        if step % checkpoint_every == 0 || done == schedule.epoch_batches || steps_exhausted {
            batches.push(done);
        }
        if steps_exhausted {
            break;
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_training_scale_counts_images_per_step_and_steps_per_epoch() {
        let scale = TrainingScale {
            world_size: 8,
            bsz: 4,
            grad_accum: 3,
            batches_per_rank: 100,
        };
        assert_eq!(scale.global_batch(), 96);
        // 33 full windows and a short one of 1 batch.
        assert_eq!(scale.steps_per_epoch(), 34);
        let line = scale.describe(Some("1e-4"));
        assert!(line.starts_with("global batch 96 = 8 rank(s) x bsz 4 x grad_accum 3; 34 optimizer step(s) per epoch; learning rate 1e-4"), "{line}");
    }

    #[test]
    fn windows_close_every_grad_accum_batches_and_at_the_epoch_end() {
        let closing: Vec<u64> = (0..7)
            .filter(|&index| closes_accumulation_window(index, 7, 3))
            .collect();
        assert_eq!(closing, [2, 5, 6]);
        let lengths: Vec<u64> = (0..7)
            .map(|index| accumulation_window_len(index, 7, 3))
            .collect();
        assert_eq!(lengths, [3, 3, 3, 3, 3, 3, 1]);
        // grad_accum 1 (or 0, read as 1) closes after every batch.
        assert!((0..4).all(|index| closes_accumulation_window(index, 4, 1)));
        assert!((0..4).all(|index| closes_accumulation_window(index, 4, 0)));
        assert_eq!(accumulation_window_len(5, 6, 4), 2);
        assert_eq!(accumulation_window_len(3, 6, 4), 4);
    }

    #[test]
    fn the_next_window_end_rounds_up_and_stops_at_the_plan_end() {
        assert_eq!(window_end_at_or_after(0, 7, 3), 0);
        assert_eq!(window_end_at_or_after(1, 7, 3), 3);
        assert_eq!(window_end_at_or_after(3, 7, 3), 3);
        assert_eq!(window_end_at_or_after(4, 7, 3), 6);
        assert_eq!(window_end_at_or_after(7, 7, 3), 7);
        assert_eq!(window_end_at_or_after(5, 7, 1), 5);
        // Every window end the function returns is one where a window closes.
        for done in 1..=7 {
            let end = window_end_at_or_after(done, 7, 3);
            assert!(closes_accumulation_window(end - 1, 7, 3), "{done} -> {end}");
        }
    }

    #[test]
    fn the_schedule_counts_optimizer_steps_and_always_ends_the_plan() {
        let schedule = CheckpointSchedule {
            epoch_batches: 10,
            start_batch: 0,
            start_step: 0,
            grad_accum: 2,
            checkpoint_every: 2,
            max_steps: None,
        };
        // Steps at batches 2, 4, 6, 8, 10 (steps 1..5): every 2nd step, and the plan's end.
        assert_eq!(scheduled_checkpoints(&schedule), [4, 8, 10]);
        // Resumed at batch 4 with 2 steps done: the same checkpoints after it.
        let resumed = CheckpointSchedule {
            start_batch: 4,
            start_step: 2,
            ..schedule
        };
        assert_eq!(scheduled_checkpoints(&resumed), [8, 10]);
        // A later epoch starts at step 5: steps 6 and 8 are at batches 2 and 6.
        let next_epoch = CheckpointSchedule {
            start_step: 5,
            ..schedule
        };
        assert_eq!(scheduled_checkpoints(&next_epoch), [2, 6, 10]);
        // max_steps 3 stops the plan at batch 6 with a checkpoint there.
        let capped = CheckpointSchedule {
            max_steps: Some(3),
            ..schedule
        };
        assert_eq!(scheduled_checkpoints(&capped), [4, 6]);
    }
}
