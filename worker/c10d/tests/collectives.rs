//! Real multi-process Gloo groups over a TCPStore on 127.0.0.1. Each test is rank 0 (it hosts the
//! store) and spawns its other ranks as child processes: this test binary re-invoked on the
//! ignored `peer_entry` test with ARBOR_C10D_PEER_* variables naming the scenario. Children report
//! over stdout lines that start with `ARBOR_PEER ` (testkit/src/peer.rs).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbor_c10d::{
    generation_prefix, Backend, C10dError, GradientBuckets, GradientReducer, ProcessGroup,
};
use arbor_testkit::free_port;
use arbor_testkit::peer::{self, report, Peer};
use tch::{Device, Kind, Tensor};

fn store_address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Rank `rank` of `world_size` as a child process running `scenario`.
fn spawn_peer(scenario: &str, rank: usize, world_size: usize, port: u16) -> Result<Peer> {
    Peer::spawn(
        &peer::test_name(module_path!(), "peer_entry"),
        &[
            ("ARBOR_C10D_PEER_SCENARIO", scenario.to_string()),
            ("ARBOR_C10D_PEER_RANK", rank.to_string()),
            ("ARBOR_C10D_PEER_WORLD_SIZE", world_size.to_string()),
            ("ARBOR_C10D_PEER_PORT", port.to_string()),
        ],
    )
}

/// Tensors whose values on rank r are (r + 1) times a fixed pattern, so the mean over 2 ranks is
/// exactly 1.5 times the pattern: a [2, 3] f32, a transposed (non-contiguous) [3, 2] f32 and a [1].
fn rank_tensors(rank: usize) -> Vec<Tensor> {
    let scale = (rank + 1) as f64;
    let pattern = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
    vec![
        pattern.reshape([2, 3]) * scale,
        (pattern.reshape([2, 3]) * (10.0 * scale)).transpose(0, 1),
        Tensor::from_slice(&[-0.25f32]) * scale,
    ]
}

fn expected_mean_tensors(world_size: usize) -> Vec<Tensor> {
    let mean_scale = (1..=world_size).sum::<usize>() as f64 / world_size as f64;
    let pattern = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
    vec![
        pattern.reshape([2, 3]) * mean_scale,
        (pattern.reshape([2, 3]) * (10.0 * mean_scale)).transpose(0, 1),
        Tensor::from_slice(&[-0.25f32]) * mean_scale,
    ]
}

fn check_exact(actual: &[Tensor], expected: &[Tensor]) -> Result<()> {
    for (index, (actual, expected)) in actual.iter().zip(expected).enumerate() {
        if actual.size() != expected.size() || !actual.equal(expected) {
            bail!(
                "tensor {index}: got {actual:?} {:?}, expected {:?}",
                Vec::<f32>::try_from(actual.reshape([-1]))?,
                Vec::<f32>::try_from(expected.reshape([-1]))?
            );
        }
    }
    Ok(())
}

/// The averaging checks every rank runs: a mean over 3 tensors (one non-contiguous), a sum of
/// one contiguous f64 tensor (the in-place path), and a barrier.
fn average_and_check(group: &mut ProcessGroup) -> Result<()> {
    let rank = group.rank();
    let world_size = group.world_size();
    let mut tensors = rank_tensors(rank);
    group.all_reduce_mean(&mut tensors)?;
    check_exact(&tensors, &expected_mean_tensors(world_size))?;

    let mut single = vec![Tensor::from_slice(&[0.5f64, 1.5, rank as f64])];
    group.all_reduce_sum(&mut single)?;
    let rank_sum = (0..world_size).sum::<usize>() as f64;
    let ws = world_size as f64;
    check_exact(
        &single,
        &[Tensor::from_slice(&[0.5 * ws, 1.5 * ws, rank_sum])],
    )?;
    group.barrier()?;
    Ok(())
}

/// Gradients of loss = sum((rank + 1) * c_i * p_i) are (rank + 1) * c_i; averaged over 2 ranks
/// they are 1.5 * c_i. A small cap makes several buckets.
fn gradient_parameters() -> Vec<Tensor> {
    (0..5)
        .map(|index| {
            Tensor::zeros([3 + index, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true)
        })
        .collect()
}

fn rank_loss(parameters: &[Tensor], rank: usize) -> Tensor {
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (index, parameter) in parameters.iter().enumerate() {
        let coefficients = Tensor::arange(parameter.numel() as i64, (Kind::Float, Device::Cpu))
            .reshape(parameter.size())
            + (index as f64) * 100.0;
        loss += (parameter * coefficients * ((rank + 1) as f64)).sum(Kind::Float);
    }
    loss
}

fn backward_rank_gradients(parameters: &[Tensor], rank: usize) {
    rank_loss(parameters, rank).backward();
}

/// The reducer averages during an armed backward pass only: an unarmed one (a non-final
/// micro-step) leaves the local gradient, and the armed one averages the accumulated sum.
fn reduce_gradients_during_backward_and_check(group: &mut ProcessGroup) -> Result<()> {
    let parameters = gradient_parameters();
    let mut reducer = GradientReducer::new(group, &parameters, 40, false)?;
    let rank = group.rank();
    backward_rank_gradients(&parameters, rank);
    let local: Vec<Tensor> = parameters.iter().map(|p| p.grad().copy()).collect();
    let loss = rank_loss(&parameters, rank);
    reducer.prepare_for_backward(std::slice::from_ref(&loss))?;
    loss.backward();
    let world_size = group.world_size() as f64;
    let mean_scale = (1..=group.world_size()).sum::<usize>() as f64 / world_size;
    // Two micro-steps of (rank + 1) * c accumulated, then averaged: 2 * mean_scale * c.
    let expected: Vec<Tensor> = local
        .iter()
        .map(|gradient| gradient * 2.0 / ((rank + 1) as f64) * mean_scale)
        .collect();
    check_exact(
        &parameters.iter().map(|p| p.grad()).collect::<Vec<_>>(),
        &expected,
    )
}

fn average_gradients_and_check(group: &mut ProcessGroup) -> Result<()> {
    let parameters = gradient_parameters();
    // 40 bytes: the [3..7, 2] f32 parameters (24..56 bytes) land in 4 buckets of one or two.
    let buckets = GradientBuckets::plan(&parameters, 40);
    if buckets.buckets().len() < 3 {
        bail!("expected several buckets, got {:?}", buckets.buckets());
    }
    backward_rank_gradients(&parameters, group.rank());
    let before: Vec<Tensor> = parameters.iter().map(|p| p.grad().copy()).collect();
    // Micro-step 0 of 2: no all-reduce, gradients untouched.
    let reduced = buckets.average_after_micro_step(group, &parameters, 0, 2)?;
    if reduced {
        bail!("micro-step 0 of 2 all-reduced");
    }
    check_exact(
        &parameters.iter().map(|p| p.grad()).collect::<Vec<_>>(),
        &before,
    )?;
    let reduced = buckets.average_after_micro_step(group, &parameters, 1, 2)?;
    if !reduced {
        bail!("micro-step 1 of 2 did not all-reduce");
    }
    let world_size = group.world_size() as f64;
    let mean_scale = (1..=group.world_size()).sum::<usize>() as f64 / world_size;
    let expected: Vec<Tensor> = before
        .iter()
        .map(|gradient| gradient / ((group.rank() + 1) as f64) * mean_scale)
        .collect();
    check_exact(
        &parameters.iter().map(|p| p.grad()).collect::<Vec<_>>(),
        &expected,
    )
}

const GROUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The child side of every test: not a test itself, run only as a peer (arbor-testkit's `peer`).
#[test]
#[ignore = "peer helper: the multi-process tests run it as their other ranks"]
fn peer_entry() {
    peer::entry("ARBOR_C10D_PEER_SCENARIO", run_peer);
}

fn run_peer(scenario: &str) -> Result<()> {
    let variable = |name: &str| -> Result<usize> {
        Ok(std::env::var(name)
            .with_context(|| name.to_string())?
            .parse()?)
    };
    let rank = variable("ARBOR_C10D_PEER_RANK")?;
    let world_size = variable("ARBOR_C10D_PEER_WORLD_SIZE")?;
    let port = u16::try_from(variable("ARBOR_C10D_PEER_PORT")?)?;
    let prefix = generation_prefix("test", 0);
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        rank,
        world_size,
        &prefix,
        GROUP_TIMEOUT,
    )?;
    match scenario {
        "average" => {
            average_and_check(&mut group)?;
            average_gradients_and_check(&mut group)?;
            reduce_gradients_during_backward_and_check(&mut group)?;
            report("done");
        }
        "reduce_then_idle" => {
            let mut tensors = rank_tensors(rank);
            group.all_reduce_mean(&mut tensors)?;
            report("reduced");
            std::thread::sleep(Duration::from_secs(600));
        }
        "survive_and_regroup" => {
            let mut tensors = rank_tensors(rank);
            group.all_reduce_mean(&mut tensors)?;
            report("reduced");
            let Err(error) = group.all_reduce_mean(&mut rank_tensors(rank)) else {
                bail!("the all-reduce after a peer died succeeded");
            };
            report(&format!("collective error {error}"));
            let store = group.store().clone();
            drop(group);
            let mut regrouped = ProcessGroup::with_store(
                store,
                Backend::Gloo,
                rank,
                world_size - 1,
                &generation_prefix("test", 1),
                GROUP_TIMEOUT,
            )?;
            average_and_check(&mut regrouped)?;
            report("regrouped");
        }
        other => bail!("unknown scenario {other}"),
    }
    Ok(())
}

#[test]
fn two_processes_average_tensors_and_gradients_exactly() -> Result<()> {
    let port = free_port();
    let mut peer = spawn_peer("average", 1, 2, port)?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        2,
        &generation_prefix("test", 0),
        GROUP_TIMEOUT,
    )?;
    average_and_check(&mut group)?;
    average_gradients_and_check(&mut group)?;
    reduce_gradients_during_backward_and_check(&mut group)?;
    peer.expect_event("done", GROUP_TIMEOUT)?;
    peer.wait_success(GROUP_TIMEOUT)?;
    Ok(())
}

#[test]
fn a_killed_peer_fails_the_collective_quickly() -> Result<()> {
    let port = free_port();
    let mut peer = spawn_peer("reduce_then_idle", 1, 2, port)?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        2,
        &generation_prefix("test", 0),
        GROUP_TIMEOUT,
    )?;
    group.all_reduce_mean(&mut rank_tensors(0))?;
    peer.expect_event("reduced", GROUP_TIMEOUT)?;
    peer.kill()?;

    let started = Instant::now();
    let result = group.all_reduce_mean(&mut rank_tensors(0));
    let elapsed = started.elapsed();
    let Err(error) = result else {
        bail!("all-reduce with a killed peer succeeded");
    };
    assert!(
        matches!(error, C10dError::AllReduce { .. }),
        "unexpected error variant: {error:?}"
    );
    // The failure comes from the closed connection, long before the 60 s collective timeout.
    assert!(
        elapsed < Duration::from_secs(15),
        "the error took {elapsed:?}: {error}"
    );
    eprintln!("all-reduce error after {elapsed:?}: {error}");
    let barrier_error = group.barrier().expect_err("barrier with a killed peer");
    assert!(
        matches!(barrier_error, C10dError::Barrier { .. }),
        "{barrier_error:?}"
    );
    Ok(())
}

#[test]
fn a_stalled_peer_times_the_collective_out() -> Result<()> {
    let port = free_port();
    let peer = spawn_peer("reduce_then_idle", 1, 2, port)?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        2,
        &generation_prefix("test", 0),
        Duration::from_secs(3),
    )?;
    group.all_reduce_mean(&mut rank_tensors(0))?;
    peer.expect_event("reduced", GROUP_TIMEOUT)?;
    // The peer is alive but never joins the second all-reduce.
    let started = Instant::now();
    let error = group
        .all_reduce_mean(&mut rank_tensors(0))
        .expect_err("all-reduce with a stalled peer");
    let elapsed = started.elapsed();
    eprintln!("all-reduce error after {elapsed:?}: {error}");
    assert!(matches!(error, C10dError::AllReduce { .. }), "{error:?}");
    assert!(
        elapsed < Duration::from_secs(30),
        "a 3 s timeout took {elapsed:?}"
    );
    drop(peer);
    Ok(())
}

#[test]
fn survivors_regroup_in_process_under_a_new_prefix() -> Result<()> {
    let port = free_port();
    let mut survivor = spawn_peer("survive_and_regroup", 1, 3, port)?;
    let mut victim = spawn_peer("reduce_then_idle", 2, 3, port)?;
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        3,
        &generation_prefix("test", 0),
        Duration::from_secs(20),
    )?;
    group.all_reduce_mean(&mut rank_tensors(0))?;
    survivor.expect_event("reduced", GROUP_TIMEOUT)?;
    victim.expect_event("reduced", GROUP_TIMEOUT)?;
    victim.kill()?;

    let error = group
        .all_reduce_mean(&mut rank_tensors(0))
        .expect_err("all-reduce with a killed peer");
    eprintln!("rank 0 error: {error}");
    let survivor_error = survivor.expect_event("collective error", GROUP_TIMEOUT)?;
    eprintln!("rank 1 {survivor_error}");

    let store = group.store().clone();
    drop(group);
    let mut regrouped = ProcessGroup::with_store(
        store,
        Backend::Gloo,
        0,
        2,
        &generation_prefix("test", 1),
        GROUP_TIMEOUT,
    )?;
    average_and_check(&mut regrouped)?;
    survivor.expect_event("regrouped", GROUP_TIMEOUT)?;
    survivor.wait_success(GROUP_TIMEOUT)?;
    Ok(())
}

#[test]
fn nccl_without_the_feature_is_a_clear_error() {
    if Backend::Nccl.is_available() {
        return;
    }
    let port = free_port();
    let error = ProcessGroup::new(
        Backend::Nccl,
        &store_address(port),
        0,
        1,
        "job/test/gen/0",
        Duration::from_secs(5),
    )
    .expect_err("nccl without the feature");
    assert!(error.to_string().contains("nccl"), "{error}");
}

#[test]
fn a_single_rank_group_averages_to_itself_and_rejects_mixed_dtypes() -> Result<()> {
    let port = free_port();
    let mut group = ProcessGroup::new(
        Backend::Gloo,
        &store_address(port),
        0,
        1,
        "job/single/gen/0",
        Duration::from_secs(10),
    )?;
    let mut tensors = rank_tensors(0);
    group.all_reduce_mean(&mut tensors)?;
    check_exact(&tensors, &rank_tensors(0))?;
    let mut mixed = vec![Tensor::from_slice(&[1.0f32]), Tensor::from_slice(&[1.0f64])];
    let error = group.all_reduce_mean(&mut mixed).expect_err("mixed dtypes");
    assert!(error.to_string().contains("dtype"), "{error}");
    Ok(())
}
