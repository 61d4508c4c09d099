//! Resume equivalence (issue 7): on CPU, N optimizer steps, a checkpoint through the run
//! directory, everything dropped, a fresh model (other initial weights), optimizer and EMA
//! loaded from the checkpoint, and N more steps end where 2N uninterrupted steps end — weights,
//! AdamW moments and EMA — with fixed per-step noise and timesteps and gradient accumulation.
//! A resume that forgets the optimizer state is shown to end elsewhere, so the check bites.

use crate::training_support::{
    bitwise_equal, build_tiny_model, max_abs_diff, shallow_clones, snapshot, step_batch, TinyModel,
    TrainMode,
};
use anyhow::{ensure, Context, Result};
use arbor_worker::train::adamw::{AdamW, AdamWConfig};
use arbor_worker::train::checkpoint::{
    checkpoint_key, copy_tensors_by_name, latest_complete_checkpoint,
    mark_complete_without_coordinator, read_checkpoint, write_checkpoint_part, CheckpointContents,
    CheckpointPosition,
};
use arbor_worker::train::distributed_step::{DistributedStep, StepSettings};
use arbor_worker::train::ema::Ema;
use arbor_worker::train::run_dir::RunDir;
use tch::Tensor;

const MODEL_SEED: i64 = 11;
const HALF: u64 = 3;
const GRAD_ACCUM: u64 = 2;
const MICRO_BATCH: i64 = 2;
const LEARNING_RATE: f64 = 2e-3;
const EMA_DECAY: f64 = 0.95;
/// The documented bound; the run is expected to be bit-identical (printed).
const TOLERANCE: f64 = 1e-6;

/// A training run: model, optimizer, EMA and step state.
struct Run {
    model: TinyModel,
    parameters: Vec<(String, Tensor)>,
    distributed: DistributedStep,
    optimizer: AdamW,
    ema: Ema,
}

impl Run {
    fn new(model_seed: i64) -> Self {
        let model = build_tiny_model(TrainMode::Finetune, model_seed);
        let parameters = model.trainable();
        let distributed = DistributedStep::new(
            &parameters,
            StepSettings {
                grad_accum: GRAD_ACCUM as u32,
                max_grad_norm: 1.0,
            },
        );
        let optimizer = AdamW::new(shallow_clones(&parameters), AdamWConfig::default());
        let ema = Ema::new(&parameters, EMA_DECAY);
        Self {
            model,
            parameters,
            distributed,
            optimizer,
            ema,
        }
    }

    /// Optimizer steps `steps` (global numbering: the batches and micro-steps of those steps).
    fn train(&mut self, steps: std::ops::Range<u64>) -> Result<()> {
        for step in steps {
            let batch = step_batch(step, MICRO_BATCH * GRAD_ACCUM as i64);
            for micro in 0..GRAD_ACCUM {
                self.model.backward(
                    &batch.rows(micro as i64 * MICRO_BATCH, MICRO_BATCH),
                    GRAD_ACCUM as f64,
                )?;
                let report = self.distributed.after_backward(
                    None,
                    &mut self.optimizer,
                    Some(&mut self.ema),
                    LEARNING_RATE,
                    step * GRAD_ACCUM + micro,
                )?;
                ensure!(report.is_some() == (micro + 1 == GRAD_ACCUM), "{report:?}");
            }
        }
        ensure!(self.optimizer.step_count() > 0);
        Ok(())
    }

    fn state(&self) -> [Vec<(String, Tensor)>; 3] {
        [
            snapshot(&self.parameters),
            snapshot(&self.optimizer.state_tensors()),
            snapshot(&self.ema.state_tensors()),
        ]
    }

    fn checkpoint(&self, step: u64) -> CheckpointContents {
        CheckpointContents {
            position: CheckpointPosition {
                step,
                epoch: 0,
                segment: 0,
                batch: step,
                generation: 0,
                world_size: 1,
                rank: 0,
                mode: "finetune".to_string(),
            },
            trainable: shallow_clones(&self.parameters),
            optimizer: self.optimizer.state_tensors(),
            optimizer_steps: self.optimizer.step_count(),
            ema: Some(self.ema.state_tensors()),
            ema_updates: self.ema.update_count(),
        }
    }

    fn load(&mut self, contents: &CheckpointContents, with_optimizer: bool) -> Result<()> {
        copy_tensors_by_name(&contents.trainable, &self.parameters, "the checkpoint")?;
        if with_optimizer {
            self.optimizer.load_state(
                &contents
                    .optimizer
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                contents.optimizer_steps,
            )?;
        }
        let ema = contents
            .ema
            .as_ref()
            .context("the checkpoint holds no ema")?;
        self.ema.load_state(
            &ema.iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            contents.ema_updates,
        )?;
        Ok(())
    }
}

#[test]
fn n_steps_checkpoint_resume_n_steps_equals_2n_steps() -> Result<()> {
    tch::set_num_threads(1);
    let mut uninterrupted = Run::new(MODEL_SEED);
    uninterrupted.train(0..2 * HALF)?;
    let expected = uninterrupted.state();
    drop(uninterrupted);

    let folder = tempfile::tempdir()?;
    let run_dir = RunDir::open(folder.path().join("run").to_str().context("utf-8 path")?)?;
    {
        let mut first_half = Run::new(MODEL_SEED);
        first_half.train(0..HALF)?;
        write_checkpoint_part(&run_dir, &first_half.checkpoint(HALF))?;
        mark_complete_without_coordinator(&run_dir, &checkpoint_key(HALF))?;
    }

    // A fresh process would find the checkpoint this way.
    let key = latest_complete_checkpoint(&run_dir)?.context("no complete checkpoint")?;
    let contents = read_checkpoint(&run_dir, &key)?;
    ensure!(contents.position.step == HALF);
    let mut resumed = Run::new(MODEL_SEED + 1);
    let (initial_gap, _) = max_abs_diff(&snapshot(&resumed.parameters), &contents.trainable)?;
    ensure!(
        initial_gap > 1e-3,
        "the fresh model starts where the checkpoint is"
    );
    resumed.load(&contents, true)?;
    ensure!(resumed.optimizer.step_count() == HALF);
    resumed.train(contents.position.step..2 * HALF)?;
    let actual = resumed.state();

    let mut bitwise = true;
    for (what, (actual, expected)) in ["weights", "adamw moments", "ema"]
        .iter()
        .zip(actual.iter().zip(&expected))
    {
        let (difference, scale) = max_abs_diff(actual, expected)?;
        let identical = bitwise_equal(actual, expected);
        bitwise &= identical;
        eprintln!(
            "resumed vs uninterrupted {what}: max abs diff {difference:.3e} (largest value \
             {scale:.3e}), bit-identical: {identical}"
        );
        ensure!(
            difference <= TOLERANCE,
            "{what}: resumed run differs by {difference:e} (> {TOLERANCE:e})"
        );
    }
    eprintln!("resume is bit-identical: {bitwise}");

    // Control: the same resume without the optimizer state does not end in the same place.
    let mut forgetful = Run::new(MODEL_SEED + 1);
    forgetful.load(&contents, false)?;
    forgetful.train(contents.position.step..2 * HALF)?;
    let (difference, _) = max_abs_diff(&forgetful.state()[0], &expected[0])?;
    eprintln!("resume without the optimizer state: weights differ by {difference:.3e}");
    ensure!(
        difference > 100.0 * TOLERANCE,
        "forgetting the optimizer state changed the weights by only {difference:e}"
    );
    Ok(())
}

#[test]
fn a_checkpoint_for_another_model_is_refused_by_key() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = RunDir::open(folder.path().join("run").to_str().context("utf-8 path")?)?;
    let finetune = Run::new(MODEL_SEED);
    write_checkpoint_part(&run_dir, &finetune.checkpoint(1))?;
    mark_complete_without_coordinator(&run_dir, &checkpoint_key(1))?;
    let contents = read_checkpoint(&run_dir, &checkpoint_key(1))?;
    let hypernetwork = build_tiny_model(TrainMode::Hypernetwork, MODEL_SEED);
    let error = copy_tensors_by_name(
        &contents.trainable,
        &hypernetwork.trainable(),
        "checkpoints/step-1",
    )
    .expect_err("a finetune checkpoint into a hypernetwork")
    .to_string();
    ensure!(error.contains("checkpoints/step-1"), "{error}");
    ensure!(error.contains("missing tensor"), "{error}");
    Ok(())
}
