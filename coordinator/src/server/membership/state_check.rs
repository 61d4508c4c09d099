//! Checks of a persisted `state.json` against the job before the coordinator trusts it: a
//! file that parses but cannot be right (a world size of 0, a checkpoint past the plan, an
//! epoch past the schedule) stops the coordinator at start with the field that is wrong,
//! instead of failing group formation over and over.

use anyhow::bail;
use arbor_common::config::JobConfig;

use crate::server::job_state::JobState;

/// The checks that need only the state and the config.
pub fn check_state(state: &JobState, config: &JobConfig) -> anyhow::Result<()> {
    if state.job != config.job.name {
        bail!(
            "job: the state is of job {:?}, the config names {:?}",
            state.job,
            config.job.name
        );
    }
    let epochs = config.schedule.epochs;
    if state.epoch > epochs || (state.epoch == epochs && !state.finished) {
        bail!(
            "epoch: {} but schedule.epochs is {epochs} and the job is not finished",
            state.epoch
        );
    }
    let mut previous_segment = None;
    for (index, segment) in state.segments.iter().enumerate() {
        if segment.world_size == 0 {
            bail!("segments[{index}].world_size: 0, a plan needs at least one rank");
        }
        if segment.world_size > config.cluster.max_workers {
            bail!(
                "segments[{index}].world_size: {} is above cluster.max_workers {}",
                segment.world_size,
                config.cluster.max_workers
            );
        }
        if segment.segment > state.generation {
            bail!(
                "segments[{index}].segment: {} is after the last generation {}",
                segment.segment,
                state.generation
            );
        }
        if previous_segment.is_some_and(|previous| segment.segment <= previous) {
            bail!(
                "segments[{index}].segment: {} does not follow segment {}",
                segment.segment,
                previous_segment.unwrap_or_default()
            );
        }
        previous_segment = Some(segment.segment);
        if let Some(generation) = segment
            .generations
            .iter()
            .find(|&&generation| generation > state.generation)
        {
            bail!(
                "segments[{index}].generations: {generation} is after the last generation {}",
                state.generation
            );
        }
    }
    if let Some(checkpoint) = &state.last_checkpoint {
        if checkpoint.step != state.step {
            bail!(
                "last_checkpoint.step: {} but step is {}",
                checkpoint.step,
                state.step
            );
        }
        if checkpoint.epoch > state.epoch {
            bail!(
                "last_checkpoint.epoch: {} is after the job's epoch {}",
                checkpoint.epoch,
                state.epoch
            );
        }
        if checkpoint.generation > state.generation {
            bail!(
                "last_checkpoint.generation: {} is after the last generation {}",
                checkpoint.generation,
                state.generation
            );
        }
    }
    if let Some(max_steps) = config.schedule.max_steps {
        if state.step > max_steps && !state.finished {
            bail!(
                "step: {} is past schedule.max_steps {max_steps}",
                state.step
            );
        }
    }
    Ok(())
}

/// The checks that need the current plan: every checkpoint batch lies inside it.
pub fn check_segments_fit(state: &JobState, current_plan_batches: u64) -> anyhow::Result<()> {
    let last = state.segments.len().saturating_sub(1);
    if let Some(current) = state.segments.last() {
        if current.checkpoint_batch > current_plan_batches {
            bail!(
                "segments[{last}].checkpoint_batch: {} is past the plan's {current_plan_batches} batches per rank",
                current.checkpoint_batch
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::job_state::{CheckpointRecord, SegmentRecord};

    fn config() -> JobConfig {
        JobConfig::load(
            "[job]\nname = \"j\"\nrun_dir = \"run\"\n[data]\nmanifest = \"m.jsonl\"\n[schedule]\nepochs = 3\n",
            &[],
        )
        .unwrap()
    }

    fn state() -> JobState {
        let mut state = JobState::new("j", "m", "c");
        state.generation = 2;
        state.epoch = 1;
        state.step = 10;
        state.segments = vec![SegmentRecord {
            segment: 0,
            world_size: 2,
            checkpoint_batch: 5,
            generations: vec![1, 2],
        }];
        state.last_checkpoint = Some(CheckpointRecord {
            epoch: 1,
            segment: 0,
            batch: 5,
            step: 10,
            world_size: 2,
            generation: 2,
            path: "checkpoints/step-10".into(),
        });
        state
    }

    fn refusal(state: &JobState) -> String {
        format!("{:#}", check_state(state, &config()).unwrap_err())
    }

    #[test]
    fn a_consistent_state_passes() {
        check_state(&state(), &config()).unwrap();
        check_segments_fit(&state(), 5).unwrap();
    }

    #[test]
    fn wrong_fields_are_named() {
        let mut zero = state();
        zero.segments[0].world_size = 0;
        assert!(
            refusal(&zero).starts_with("segments[0].world_size: 0"),
            "{}",
            refusal(&zero)
        );
        let mut future = state();
        future.segments[0].generations.push(9);
        assert!(refusal(&future).starts_with("segments[0].generations: 9"));
        let mut epoch = state();
        epoch.epoch = 7;
        assert!(refusal(&epoch).starts_with("epoch: 7"));
        let mut step = state();
        step.step = 11;
        assert!(refusal(&step).starts_with("last_checkpoint.step: 10"));
        let mut other = state();
        other.job = "other".into();
        assert!(refusal(&other).starts_with("job: "));
        let past = check_segments_fit(&state(), 4).unwrap_err().to_string();
        assert!(
            past.starts_with("segments[0].checkpoint_batch: 5 is past"),
            "{past}"
        );
    }
}
