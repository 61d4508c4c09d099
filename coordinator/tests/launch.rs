//! `arbor launch` and `arbor worker --nproc` as a user runs them: real processes on loopback,
//! logs prefixed per process, Ctrl-C stopping everything and a relaunch resuming the job.

mod support;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::process::{signal, try_wait_for};
use support::{assert_nothing_twice_nothing_lost, Job, JobSpec, TOKEN};

/// `arbor launch --dry-run` of the job, with its combined output going to `output.log`.
fn launch(job: &Job, workers: u32, simulate_step_ms: u64) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(job.path().join("output.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["launch", "--config"])
        .arg(job.path().join("job.toml"))
        .args(["--workers", &workers.to_string(), "--dry-run"])
        .arg(format!(
            "--worker-arg=--simulate-step-ms={simulate_step_ms}"
        ))
        .env("ARBOR_TOKEN", TOKEN)
        .env("ARBOR_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn output(job: &Job) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(job.path().join("output.log")) {
        file.read_to_string(&mut text).unwrap();
    }
    text
}

/// The pids of a process's children.
fn children_of(pid: u32) -> Vec<u32> {
    let listing = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&listing.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn launch_runs_a_dry_run_job_to_the_end_with_every_process_s_log_prefixed() {
    let spec = JobSpec::default();
    let job = Job::new(&spec);
    let mut launcher = launch(&job, 3, 0);
    let exit = try_wait_for(&mut launcher, Duration::from_secs(120));
    let text = output(&job);
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}\n{text}");
    for prefix in [
        "[coordinator] ",
        "[worker 0] ",
        "[worker 1] ",
        "[worker 2] ",
    ] {
        assert!(text.contains(prefix), "no `{prefix}` lines:\n{text}");
    }
    assert_eq!(job.state()["finished"], true);
    for epoch in 0..spec.epochs {
        assert_nothing_twice_nothing_lost(&job, epoch, 1, 12);
    }
}

#[test]
fn ctrl_c_stops_the_coordinator_and_every_worker_and_a_relaunch_resumes_the_job() {
    let spec = JobSpec {
        items: 600,
        epochs: 1,
        ..JobSpec::default()
    };
    let job = Job::new(&spec);
    let mut launcher = launch(&job, 3, 40);
    job.wait_until(
        Duration::from_secs(60),
        "training past a checkpoint",
        |job| job.ledger_lines(0).len() >= 24,
    );
    let children = children_of(launcher.id());
    assert_eq!(
        children.len(),
        4,
        "a coordinator and 3 workers: {children:?}"
    );
    let interrupted_at = Instant::now();
    signal(launcher.id(), "-INT");
    let exit = try_wait_for(&mut launcher, Duration::from_secs(30));
    let stop_seconds = interrupted_at.elapsed().as_secs_f64();
    let text = output(&job);
    assert_eq!(exit.and_then(|exit| exit.code()), Some(130), "{text}");
    assert!(text.contains("[launch] interrupted"), "{text}");
    let survivors: Vec<u32> = children.iter().copied().filter(|&pid| alive(pid)).collect();
    assert!(
        survivors.is_empty(),
        "still running after Ctrl-C: {survivors:?}"
    );
    eprintln!("launch stopped {stop_seconds:.2}s after SIGINT");
    assert_eq!(job.state()["finished"], false);

    // Launched again, the job resumes from its run directory and finishes.
    let mut relaunched = launch(&job, 3, 0);
    let exit = try_wait_for(&mut relaunched, Duration::from_secs(120));
    assert!(
        exit.is_some_and(|exit| exit.success()),
        "{exit:?}\n{}",
        output(&job)
    );
    let state = job.state();
    assert_eq!(state["finished"], true, "{state}");
    assert!(state["generation"].as_u64() >= Some(2), "{state}");
    assert_nothing_twice_nothing_lost(&job, 0, 1, 12);
}

#[test]
fn one_worker_process_with_nproc_2_runs_two_local_ranks() {
    let spec = JobSpec {
        min_workers: 2,
        max_workers: 2,
        epochs: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let log = std::fs::File::create(job.path().join("nproc.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["worker", "--dry-run", "--coordinator", &job.address()])
        .args(["--nproc", "2", "--node", "n0", "--connect-timeout-s", "60"])
        .env("ARBOR_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}",
        job.coordinator_log()
    );
    let exit = try_wait_for(&mut worker, Duration::from_secs(30));
    let text = std::fs::read_to_string(job.path().join("nproc.log")).unwrap();
    assert!(exit.is_some_and(|exit| exit.success()), "{exit:?}\n{text}");
    assert!(
        text.contains("[local 0] ") && text.contains("[local 1] "),
        "{text}"
    );
    // Both ranks trained, from one node.
    let ranks: std::collections::BTreeSet<u64> = job
        .ledger_lines(0)
        .iter()
        .filter_map(|line| line["rank"].as_u64())
        .collect();
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), [0, 1]);
    assert_nothing_twice_nothing_lost(&job, 0, 1, 8);
}

#[test]
fn a_worker_that_dies_and_is_regrouped_around_does_not_fail_a_finished_job() {
    let spec = JobSpec {
        items: 600,
        epochs: 1,
        min_workers: 2,
        max_workers: 3,
        ..JobSpec::default()
    };
    let job = Job::new(&spec);
    let mut launcher = launch(&job, 3, 20);
    job.wait_until(Duration::from_secs(60), "training started", |job| {
        job.ledger_lines(0).len() >= 6
    });
    // The last-started child is worker 2; kill it hard, as the OOM killer would.
    let children = children_of(launcher.id());
    let victim = *children.last().expect("launch has children");
    signal(victim, "-KILL");
    let exit = try_wait_for(&mut launcher, Duration::from_secs(180));
    let text = output(&job);
    assert_eq!(job.state()["finished"], true, "{text}");
    assert!(
        exit.is_some_and(|exit| exit.success()),
        "the job finished, so launch succeeds: {exit:?}\n{text}"
    );
    assert!(
        text.contains("1 worker process(es) exited with an error"),
        "the dead worker is still reported:\n{text}"
    );
    // Three ranks, then two after the re-shard: two plans.
    assert_nothing_twice_nothing_lost(&job, 0, 2, 12);
}
