//! Checks of a persisted `state.json` against the job before the coordinator trusts it: a
//! file that parses but cannot be right (a world size of 0, a checkpoint past the plan, an
//! epoch past the schedule) stops the coordinator at start with the field that is wrong,
//! instead of failing group formation over and over.

use anyhow::bail;
use arbor_common::config::JobConfig;

use crate::server::job_state::{CheckpointRecord, JobState};
use crate::server::run_store::RunStore;

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

/// Why the files of `record` cannot be resumed from: the coordinator's own part of a
/// checkpoint (`COMPLETE`, and `coordinator.json` naming the same checkpoint) must be there.
/// The trainers check their files when they load them.
pub fn checkpoint_files_problem(
    run_store: &dyn RunStore,
    record: &CheckpointRecord,
) -> anyhow::Result<Option<String>> {
    let location = run_store.location();
    let complete = format!("{}/COMPLETE", record.path);
    if run_store.read(&complete)?.is_none() {
        return Ok(Some(format!("{location}/{complete}: missing")));
    }
    let described = format!("{}/coordinator.json", record.path);
    let Some(bytes) = run_store.read(&described)? else {
        return Ok(Some(format!("{location}/{described}: missing")));
    };
    let written: CheckpointRecord = match serde_json::from_slice(&bytes) {
        Ok(written) => written,
        Err(error) => return Ok(Some(format!("{location}/{described}: {error}"))),
    };
    if &written != record {
        let field = [
            ("epoch", written.epoch != record.epoch),
            ("segment", written.segment != record.segment),
            ("batch", written.batch != record.batch),
            ("step", written.step != record.step),
            ("world_size", written.world_size != record.world_size),
            ("generation", written.generation != record.generation),
        ]
        .into_iter()
        .find_map(|(field, differs)| differs.then_some(field))
        .unwrap_or("path");
        return Ok(Some(format!(
            "{location}/{described}: {field} differs from state.json's last_checkpoint"
        )));
    }
    Ok(None)
}

/// Checks the last checkpoint's files before anything resumes from it. An unusable one is
/// replaced by the newest earlier complete checkpoint of the same plan (the ledger rolls back
/// to it when the group forms); the returned text says so. With none to fall back to, the
/// coordinator stops naming the file.
pub fn fall_back_from_an_unusable_checkpoint(
    state: &mut JobState,
    run_store: &dyn RunStore,
) -> anyhow::Result<Option<String>> {
    if state.finished {
        return Ok(None);
    }
    let Some(last) = state.last_checkpoint.clone() else {
        return Ok(None);
    };
    let Some(problem) = checkpoint_files_problem(run_store, &last)? else {
        return Ok(None);
    };
    fall_back_to_an_earlier_checkpoint(state, run_store, problem).map(Some)
}

/// Replaces the last checkpoint, unusable for `problem`, by the newest earlier complete
/// checkpoint of the same plan whose files check out; returns the event that says so. With
/// none, the error names every problem found.
pub fn fall_back_to_an_earlier_checkpoint(
    state: &mut JobState,
    run_store: &dyn RunStore,
    problem: String,
) -> anyhow::Result<String> {
    let Some(last) = state.last_checkpoint.clone() else {
        bail!("no checkpoint to fall back from: {problem}");
    };
    let current_segment = state.segments.last().map(|segment| segment.segment);
    let same_plan = |record: &CheckpointRecord| {
        record.epoch == state.epoch && Some(record.segment) == current_segment
    };
    if !same_plan(&last) {
        bail!("last_checkpoint {}: {problem}; it ended an earlier epoch or plan, so there is no earlier checkpoint of this plan to fall back to", last.path);
    }
    let mut skipped = vec![problem];
    for (index, earlier) in state.earlier_checkpoints.clone().iter().enumerate() {
        if !same_plan(earlier) {
            break;
        }
        match checkpoint_files_problem(run_store, earlier)? {
            Some(problem) => skipped.push(problem),
            None => {
                state.last_checkpoint = Some(earlier.clone());
                state.earlier_checkpoints.drain(..=index);
                state.step = earlier.step;
                if let Some(current) = state.segments.last_mut() {
                    current.checkpoint_batch = earlier.batch;
                }
                return Ok(format!(
                    "checkpoint {} is unusable ({}); falling back to {} (epoch {} batch {})",
                    last.path,
                    skipped.join("; "),
                    earlier.path,
                    earlier.epoch,
                    earlier.batch
                ));
            }
        }
    }
    bail!(
        "last_checkpoint {}: {}; no earlier complete checkpoint of this plan to fall back to",
        last.path,
        skipped.join("; ")
    )
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
