//! Data-parallel equivalence (issue 7, docs/architecture.md §5): the same global batch split across
//! 2 Gloo ranks (this test process is rank 0 and hosts the TCPStore on a free localhost port; rank
//! 1 is this test binary re-run as a child process) gives the same averaged gradients and, after 3
//! AdamW steps with clipping and EMA, the same weights as 1 rank on the whole batch; gradient
//! accumulation over half batches equals the whole batch; and a peer that dies or stalls turns the
//! next step into an error within the group timeout, not a hang.
//!
//! The model is a tiny SD-topology UNet (frozen) with a trainable hypernetwork, through
//! `DistributedStep`, `AdamW` and `Ema` as the trainer uses them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::training_support::{
    build_tiny_model, gradients, max_abs_diff, shallow_clones, snapshot, step_batch, TrainMode,
};
use anyhow::{bail, ensure, Context, Result};
use arbor_c10d::{generation_prefix, Backend, ProcessGroup};
use arbor_testkit::free_port;
use arbor_testkit::peer::{self, report, Peer};
use arbor_worker::train::adamw::{AdamW, AdamWConfig};
use arbor_worker::train::checkpoint::{safetensors_bytes, tensors_from_safetensors};
use arbor_worker::train::distributed_step::{DistributedStep, StepReport, StepSettings};
use arbor_worker::train::ema::Ema;
use tch::Tensor;

const GROUP_TIMEOUT: Duration = Duration::from_secs(60);
const MODEL_SEED: i64 = 7;
/// Samples per optimizer step, over all ranks and micro-batches.
const GLOBAL_BATCH: i64 = 4;
const STEPS: u64 = 3;
const LEARNING_RATE: f64 = 1e-3;
/// Small enough that every step clips (the reports show norms far above it).
const MAX_GRAD_NORM: f64 = 0.05;
/// Small buckets, so the hypernetwork's gradients go out in several all-reduces.
const BUCKET_CAP_BYTES: usize = 64 * 1024;

fn store_address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// How one rank takes part: its rank, the world size and its micro-batches per step.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rank: i64,
    world_size: i64,
    grad_accum: i64,
}

impl Layout {
    fn micro_batch(&self) -> i64 {
        GLOBAL_BATCH / (self.world_size * self.grad_accum)
    }

    /// The first sample of micro-batch `micro` of this rank within the global batch.
    fn start(&self, micro: i64) -> i64 {
        (self.rank * self.grad_accum + micro) * self.micro_batch()
    }
}

/// What one rank ends with.
struct Outcome {
    /// The gradients of the first batch, averaged over the group (before any step).
    first_gradients: Vec<(String, Tensor)>,
    weights: Vec<(String, Tensor)>,
    optimizer_state: Vec<(String, Tensor)>,
    ema: Vec<(String, Tensor)>,
    reports: Vec<StepReport>,
}

/// Runs the scenario on one rank: the averaged gradients of batch 0, then `STEPS` optimizer steps
/// on batches 1..=STEPS through `DistributedStep`.
fn train(mut group: Option<&mut ProcessGroup>, layout: Layout) -> Result<Outcome> {
    tch::set_num_threads(1);
    let model = build_tiny_model(TrainMode::Hypernetwork, MODEL_SEED);
    let parameters = model.trainable();
    let settings = StepSettings {
        grad_accum: layout.grad_accum as u32,
        max_grad_norm: MAX_GRAD_NORM,
    };
    let mut distributed = DistributedStep::with_bucket_cap(&parameters, settings, BUCKET_CAP_BYTES);
    ensure!(
        distributed.buckets().len() >= 3,
        "expected several buckets, got {:?}",
        distributed.buckets()
    );

    // The averaged gradients of one global batch.
    let batch = step_batch(0, GLOBAL_BATCH);
    for micro in 0..layout.grad_accum {
        model.backward(
            &batch.rows(layout.start(micro), layout.micro_batch()),
            layout.grad_accum as f64,
        )?;
    }
    if let Some(group) = group.as_deref_mut() {
        distributed.average_gradients(group)?;
    }
    let first_gradients = gradients(&parameters);

    let mut optimizer = AdamW::new(shallow_clones(&parameters), comparable_adamw());
    optimizer.zero_grad()?;
    let mut ema = Ema::new(&parameters, 0.9);
    let mut reports = Vec::new();
    for step in 0..STEPS {
        let batch = step_batch(step + 1, GLOBAL_BATCH);
        for micro in 0..layout.grad_accum {
            // As the trainer does: the final micro-step's gradients are averaged during its
            // backward pass (c10d's Reducer), the earlier ones stay local.
            let last_micro = micro == layout.grad_accum - 1;
            let loss = model.loss(&batch.rows(layout.start(micro), layout.micro_batch()))?
                / layout.grad_accum as f64;
            distributed.before_backward(group.as_deref_mut(), &loss, last_micro)?;
            loss.f_backward()?;
            let micro_step = step * layout.grad_accum as u64 + micro as u64;
            let report = distributed.after_backward(
                group.as_deref_mut(),
                &mut optimizer,
                Some(&mut ema),
                LEARNING_RATE,
                micro_step,
            )?;
            ensure!(
                report.is_some() == last_micro,
                "micro-step {micro_step} returned {report:?}"
            );
            reports.extend(report);
        }
    }
    // With a group the steps above averaged during their backward passes.
    let overlapped = group.is_some() && layout.world_size > 1;
    ensure!(
        distributed.reduces_during_backward() == overlapped,
        "overlap {} with world size {}",
        distributed.reduces_during_backward(),
        layout.world_size
    );
    Ok(Outcome {
        first_gradients,
        weights: snapshot(&parameters),
        optimizer_state: snapshot(&optimizer.state_tensors()),
        ema: snapshot(&ema.state_tensors()),
        reports,
    })
}

fn save_outcome(outcome: &Outcome, path: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, list) in [
        ("gradient", &outcome.first_gradients),
        ("weight", &outcome.weights),
        ("optimizer", &outcome.optimizer_state),
        ("ema", &outcome.ema),
    ] {
        for (name, tensor) in list {
            tensors.push((format!("{prefix}/{name}"), tensor.shallow_clone()));
        }
    }
    let bytes = safetensors_bytes(&tensors, None).map_err(anyhow::Error::msg)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {path:?}"))
}

fn load_part(path: &Path, prefix: &str) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path:?}"))?;
    let (tensors, _) = tensors_from_safetensors(&bytes).map_err(anyhow::Error::msg)?;
    let wanted = format!("{prefix}/");
    Ok(tensors
        .into_iter()
        .filter_map(|(name, tensor)| {
            name.strip_prefix(&wanted)
                .map(|name| (name.to_string(), tensor))
        })
        .collect())
}

/// Rank `rank` as a child process running `scenario`, writing its outcome to `output`.
fn spawn_peer(scenario: &str, rank: usize, port: u16, output: &Path) -> Result<Peer> {
    Peer::spawn(
        &peer::test_name(module_path!(), "peer_entry"),
        &[
            ("ARBOR_DDP_PEER_SCENARIO", scenario.to_string()),
            ("ARBOR_DDP_PEER_RANK", rank.to_string()),
            ("ARBOR_DDP_PEER_PORT", port.to_string()),
            ("ARBOR_DDP_PEER_OUTPUT", output.display().to_string()),
        ],
    )
}

/// The child side of every test: not a test itself, run only as a peer (arbor-testkit's `peer`).
#[test]
#[ignore = "peer helper: the multi-process tests run it as their other rank"]
fn peer_entry() {
    peer::entry("ARBOR_DDP_PEER_SCENARIO", run_peer);
}

fn run_peer(scenario: &str) -> Result<()> {
    let variable = |name: &str| std::env::var(name).with_context(|| name.to_string());
    let rank: usize = variable("ARBOR_DDP_PEER_RANK")?.parse()?;
    let port: u16 = variable("ARBOR_DDP_PEER_PORT")?.parse()?;
    let output = PathBuf::from(variable("ARBOR_DDP_PEER_OUTPUT")?);
    let timeout = match scenario {
        "stall" => STALL_TIMEOUT,
        _ => GROUP_TIMEOUT,
    };
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        rank,
        2,
        &generation_prefix("ddp-test", 0),
        timeout,
    )?;
    let layout = Layout {
        rank: rank as i64,
        world_size: 2,
        grad_accum: 1,
    };
    match scenario {
        "train" => {
            let outcome = train(Some(&mut group), layout)?;
            save_outcome(&outcome, &output)?;
            report("done");
        }
        "step_then_die" | "stall" => {
            one_step_rank(&mut group, layout)?;
            report("stepped");
            // Killed here ("step_then_die") or never joins the next all-reduce ("stall").
            std::thread::sleep(Duration::from_secs(600));
        }
        other => bail!("unknown scenario {other}"),
    }
    Ok(())
}

/// A rank's model, optimizer and step state after one optimizer step in the group.
struct OneStep {
    model: crate::training_support::TinyModel,
    distributed: DistributedStep,
    optimizer: AdamW,
}

fn one_step_rank(group: &mut ProcessGroup, layout: Layout) -> Result<OneStep> {
    tch::set_num_threads(1);
    let model = build_tiny_model(TrainMode::Hypernetwork, MODEL_SEED);
    let parameters = model.trainable();
    let mut distributed = DistributedStep::new(
        &parameters,
        StepSettings {
            grad_accum: 1,
            max_grad_norm: MAX_GRAD_NORM,
        },
    );
    let mut optimizer = AdamW::new(parameters, AdamWConfig::default());
    let batch = step_batch(1, GLOBAL_BATCH);
    model.backward(&batch.rows(layout.start(0), layout.micro_batch()), 1.0)?;
    distributed
        .after_backward(Some(group), &mut optimizer, None, LEARNING_RATE, 0)?
        .context("micro-step 0 of 1 must step")?;
    Ok(OneStep {
        model,
        distributed,
        optimizer,
    })
}

fn single_rank(grad_accum: i64) -> Result<Outcome> {
    train(
        None,
        Layout {
            rank: 0,
            world_size: 1,
            grad_accum,
        },
    )
}

/// Largest difference, checked against `tolerance` times the largest reference magnitude.
fn check_close(
    what: &str,
    actual: &[(String, Tensor)],
    expected: &[(String, Tensor)],
    relative_tolerance: f64,
) -> Result<f64> {
    let (difference, scale) = max_abs_diff(actual, expected)?;
    let relative = difference / scale.max(f64::MIN_POSITIVE);
    eprintln!("{what}: max abs diff {difference:.3e} (largest value {scale:.3e}, relative {relative:.3e})");
    ensure!(
        relative <= relative_tolerance,
        "{what}: max abs diff {difference:e} is {relative:e} of the largest value {scale:e}, \
         above {relative_tolerance:e}"
    );
    Ok(relative)
}

/// Relative tolerances: gradients differ by summation order only (a few f32 ulps); the weights
/// after 3 AdamW steps inherit that through Adam's normalisation (see [`comparable_adamw`]).
const GRADIENT_TOLERANCE: f64 = 1e-5;
const WEIGHT_TOLERANCE: f64 = 1e-5;

/// AdamW with an `eps` above the gradients' summation-order noise (~1e-7 here). With the default
/// 1e-8, Adam divides a near-zero gradient by its own magnitude, so that noise becomes a ±lr step
/// whose sign depends on the summation order: split and whole batches would differ by up to
/// `lr * steps` in such elements whatever the implementation. The larger eps keeps every update
/// a function of the gradient's value, so the comparison checks the distributed step itself.
/// The weights moved by far more than the comparison's tolerance: the check bites.
fn check_moved(weights: &[(String, Tensor)], initial: &[(String, Tensor)]) -> Result<()> {
    let (moved, scale) = max_abs_diff(weights, initial)?;
    eprintln!("3 steps moved the weights by up to {moved:.3e} (largest weight {scale:.3e})");
    ensure!(
        moved > 20.0 * WEIGHT_TOLERANCE * scale,
        "3 steps moved the weights by only {moved:e}, too little for a tolerance of \
         {WEIGHT_TOLERANCE:e} of {scale:e} to tell steps apart"
    );
    Ok(())
}

fn comparable_adamw() -> AdamWConfig {
    AdamWConfig {
        eps: 1e-3,
        ..AdamWConfig::default()
    }
}

#[test]
fn two_gloo_ranks_match_one_rank_on_the_whole_batch() -> Result<()> {
    let port = free_port();
    let folder = tempfile::tempdir()?;
    let peer_output = folder.path().join("rank-1.safetensors");
    let mut peer = spawn_peer("train", 1, port, &peer_output)?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        2,
        &generation_prefix("ddp-test", 0),
        GROUP_TIMEOUT,
    )?;
    let layout = Layout {
        rank: 0,
        world_size: 2,
        grad_accum: 1,
    };
    let distributed = train(Some(&mut group), layout)?;
    peer.expect_event("done", GROUP_TIMEOUT * 3)?;
    peer.wait_success(GROUP_TIMEOUT)?;
    let reference = single_rank(1)?;

    // Both ranks end bit-identical: they all-reduced the same buckets and stepped alike.
    for part in ["gradient", "weight", "optimizer", "ema"] {
        let rank_1 = load_part(&peer_output, part)?;
        let rank_0 = match part {
            "gradient" => &distributed.first_gradients,
            "weight" => &distributed.weights,
            "optimizer" => &distributed.optimizer_state,
            _ => &distributed.ema,
        };
        ensure!(
            crate::training_support::bitwise_equal(&rank_1, &snapshot(rank_0)),
            "rank 1's {part} tensors differ from rank 0's"
        );
    }

    // A real split: each rank alone saw different gradients from the whole batch's.
    check_close(
        "averaged gradients, 2 ranks vs 1",
        &distributed.first_gradients,
        &reference.first_gradients,
        GRADIENT_TOLERANCE,
    )?;
    let initial = snapshot(&build_tiny_model(TrainMode::Hypernetwork, MODEL_SEED).trainable());
    check_moved(&reference.weights, &initial)?;
    check_close(
        "weights after 3 steps, 2 ranks vs 1",
        &distributed.weights,
        &reference.weights,
        WEIGHT_TOLERANCE,
    )?;
    check_close(
        "adamw moments after 3 steps, 2 ranks vs 1",
        &distributed.optimizer_state,
        &reference.optimizer_state,
        GRADIENT_TOLERANCE,
    )?;
    check_close(
        "ema after 3 steps, 2 ranks vs 1",
        &distributed.ema,
        &reference.ema,
        WEIGHT_TOLERANCE,
    )?;
    ensure!(distributed.reports.len() == STEPS as usize);
    for (index, (ours, theirs)) in distributed
        .reports
        .iter()
        .zip(&reference.reports)
        .enumerate()
    {
        ensure!(ours.optimizer_steps == index as u64 + 1, "{ours:?}");
        ensure!(
            ours.grad_norm > MAX_GRAD_NORM,
            "step {index}: norm {} does not exceed the clip {MAX_GRAD_NORM}, so clipping is not \
             exercised",
            ours.grad_norm
        );
        let relative = (ours.grad_norm - theirs.grad_norm).abs() / theirs.grad_norm;
        ensure!(
            relative < 1e-5,
            "step {index}: norms {ours:?} vs {theirs:?}"
        );
    }
    Ok(())
}

#[test]
fn gradient_accumulation_over_half_batches_matches_the_whole_batch() -> Result<()> {
    let accumulated = single_rank(2)?;
    let whole = single_rank(1)?;
    check_close(
        "accumulated gradients, 2 half batches vs 1 whole",
        &accumulated.first_gradients,
        &whole.first_gradients,
        GRADIENT_TOLERANCE,
    )?;
    let initial = snapshot(&build_tiny_model(TrainMode::Hypernetwork, MODEL_SEED).trainable());
    check_moved(&whole.weights, &initial)?;
    check_close(
        "weights after 3 steps, grad_accum 2 vs 1",
        &accumulated.weights,
        &whole.weights,
        WEIGHT_TOLERANCE,
    )?;
    check_close(
        "ema after 3 steps, grad_accum 2 vs 1",
        &accumulated.ema,
        &whole.ema,
        WEIGHT_TOLERANCE,
    )?;
    ensure!(accumulated.reports.len() == STEPS as usize);
    // Without dividing by grad_accum the result would be twice the gradient: the check bites.
    let (difference, scale) = max_abs_diff(
        &accumulated
            .first_gradients
            .iter()
            .map(|(name, gradient)| (name.clone(), gradient * 2.0))
            .collect::<Vec<_>>(),
        &whole.first_gradients,
    )?;
    ensure!(
        difference > 0.5 * scale,
        "the accumulation check cannot tell 2x apart"
    );
    Ok(())
}

/// Steps rank 0 once with its peer, lets the peer fail as `scenario` says, and returns the error
/// of the next step with how long it took. With `overlap` the next step averages during its
/// backward pass (the trainer's way, c10d's Reducer), so the backward pass itself must fail.
fn next_step_after_peer_failure(
    scenario: &str,
    timeout: Duration,
    overlap: bool,
) -> Result<(anyhow::Error, Duration, OneStep)> {
    let port = free_port();
    let folder = tempfile::tempdir()?;
    let mut peer = spawn_peer(scenario, 1, port, &folder.path().join("unused"))?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        2,
        &generation_prefix("ddp-test", 0),
        timeout,
    )?;
    let layout = Layout {
        rank: 0,
        world_size: 2,
        grad_accum: 1,
    };
    let mut state = one_step_rank(&mut group, layout)?;
    peer.expect_event("stepped", GROUP_TIMEOUT * 3)?;
    if scenario == "step_then_die" {
        peer.kill()?;
    }
    let batch = step_batch(2, GLOBAL_BATCH);
    let loss = state
        .model
        .loss(&batch.rows(layout.start(0), layout.micro_batch()))?;
    let before = snapshot(&state.model.trainable());
    let started = Instant::now();
    let mut next_step = || -> Result<()> {
        if overlap {
            state
                .distributed
                .before_backward(Some(&mut group), &loss, true)?;
            ensure!(state.distributed.reduces_during_backward());
        }
        loss.f_backward()?;
        state.distributed.after_backward(
            Some(&mut group),
            &mut state.optimizer,
            None,
            LEARNING_RATE,
            1,
        )?;
        Ok(())
    };
    let result = next_step();
    let elapsed = started.elapsed();
    let Err(error) = result else {
        bail!("the step after the peer failed ({scenario}) succeeded");
    };
    // The failed step changed nothing: no optimizer step, the weights as they were.
    ensure!(state.optimizer.step_count() == 1);
    ensure!(crate::training_support::bitwise_equal(
        &snapshot(&state.model.trainable()),
        &before
    ));
    drop(peer);
    Ok((error, elapsed, state))
}

#[test]
fn a_dead_peer_makes_the_step_fail_quickly() -> Result<()> {
    let (error, elapsed, _) = next_step_after_peer_failure("step_then_die", GROUP_TIMEOUT, false)?;
    eprintln!("step error after {elapsed:?}: {error:#}");
    let message = format!("{error:#}");
    assert!(message.contains("all-reduce"), "{message}");
    assert!(
        elapsed < GROUP_TIMEOUT,
        "the error took {elapsed:?}, the group timeout is {GROUP_TIMEOUT:?}: {message}"
    );
    Ok(())
}

#[test]
fn a_dead_peer_makes_the_overlapped_backward_pass_fail_quickly() -> Result<()> {
    let (error, elapsed, _) = next_step_after_peer_failure("step_then_die", GROUP_TIMEOUT, true)?;
    eprintln!("overlapped step error after {elapsed:?}: {error:#}");
    let message = format!("{error:#}");
    assert!(
        elapsed < GROUP_TIMEOUT,
        "the error took {elapsed:?}, the group timeout is {GROUP_TIMEOUT:?}: {message}"
    );
    Ok(())
}

const STALL_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn a_stalled_peer_makes_the_step_fail_within_the_group_timeout() -> Result<()> {
    let (error, elapsed, _) = next_step_after_peer_failure("stall", STALL_TIMEOUT, false)?;
    eprintln!("step error after {elapsed:?}: {error:#}");
    let message = format!("{error:#}");
    assert!(message.contains("all-reduce"), "{message}");
    assert!(
        elapsed < STALL_TIMEOUT * 2,
        "a {STALL_TIMEOUT:?} timeout took {elapsed:?}: {message}"
    );
    Ok(())
}
