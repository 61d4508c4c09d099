//! `arbor launch`: a coordinator and N local workers as processes, logs prefixed with the rank,
//! everything stopped cleanly on Ctrl-C.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arbor_common::logging;
use clap::Args;
use tracing::{info, warn};

use crate::job_config::ConfigFlags;
use crate::worker_command::spawn_prefixed;

#[derive(Debug, Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    config: ConfigFlags,
    /// Local worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Run the job without a model (`arbor worker --dry-run`); otherwise `arbor-worker train`
    /// (found beside this binary, else on PATH) trains.
    #[arg(long)]
    dry_run: bool,
    /// Extra arguments passed to every worker (repeatable), e.g. `--worker-arg=--data-root=/data`.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
}

fn signal_all(children: &Mutex<Vec<(String, u32)>>, signal: &str) {
    for (_, pid) in children.lock().map(|c| c.clone()).unwrap_or_default() {
        let _ = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status();
    }
}

/// A line of the launcher's own, marked like its children's: `[launch] …` (a JSON record with
/// `"process": "launch"` under `--log-format json`).
fn say(message: &str) {
    eprintln!(
        "{}",
        logging::child_line("launch", message, logging::settings().format)
    );
}

/// Seconds workers get to finish (final exports included) after the coordinator ended.
const WORKER_EXIT_GRACE_S: u64 = 600;

pub fn run(args: LaunchArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.config.load()?;
    let exe = std::env::current_exe().context("locating the arbor binary")?;
    let port = config
        .cluster
        .listen
        .rsplit(':')
        .next()
        .context("cluster.listen has no port")?
        .to_string();
    let coordinator_address = format!("127.0.0.1:{port}");
    let token = match std::env::var("ARBOR_TOKEN") {
        Ok(token) if !token.trim().is_empty() => token,
        _ => crate::job_config::job_token(&config, &args.config.base_dir()).unwrap_or_else(|_| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            format!("launch-{:x}-{:x}", std::process::id(), nanos)
        }),
    };

    let pids: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let pids = pids.clone();
        let interrupted = interrupted.clone();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            interrupted.store(true, Ordering::SeqCst);
            say("interrupted: stopping the coordinator and the workers");
            signal_all(&pids, "-TERM");
        });
    }

    let mut coordinator = Command::new(&exe);
    coordinator
        .arg("coordinator")
        .arg("--config")
        .arg(&args.config.config)
        .env("ARBOR_TOKEN", &token);
    for flag in &args.config.overrides {
        coordinator.args(["--set", flag]);
    }
    let (mut coordinator, coordinator_pumps) = spawn_prefixed(coordinator, "coordinator")?;
    pids.lock()
        .unwrap()
        .push(("coordinator".into(), coordinator.id()));

    let worker_exe = if args.dry_run {
        exe.clone()
    } else {
        let sibling = exe.with_file_name("arbor-worker");
        if sibling.exists() {
            sibling
        } else {
            "arbor-worker".into()
        }
    };
    let mut workers: Vec<(Child, Vec<std::thread::JoinHandle<()>>)> = Vec::new();
    for local_rank in 0..args.workers {
        let mut worker = Command::new(&worker_exe);
        // `arbor worker --dry-run …` or `arbor-worker train …`: the same worker flags.
        worker.arg(if args.dry_run { "worker" } else { "train" });
        worker
            .args(["--coordinator", &coordinator_address])
            .args(["--local-rank", &local_rank.to_string()])
            .args(["--node", "local"])
            .env("ARBOR_TOKEN", &token)
            .args(&args.worker_args);
        if args.dry_run {
            worker.arg("--dry-run");
        }
        let child = spawn_prefixed(worker, &format!("worker {local_rank}"))
            .with_context(|| format!("starting worker {local_rank} ({})", worker_exe.display()))?;
        pids.lock()
            .unwrap()
            .push((format!("worker {local_rank}"), child.0.id()));
        workers.push(child);
    }
    info!(workers = args.workers, coordinator = %coordinator_address, dry_run = args.dry_run, "launched");

    let status = coordinator.wait()?;
    for pump in coordinator_pumps {
        let _ = pump.join();
    }
    // Workers exit on the coordinator's STOP; rank 0 writes the final exports after it, which
    // takes a while for a large model. A worker still running after that grace period is
    // stopped and counted as failed.
    let deadline = Instant::now() + Duration::from_secs(WORKER_EXIT_GRACE_S);
    let mut worker_failures = 0;
    for (index, (mut child, pumps)) in workers.into_iter().enumerate() {
        loop {
            if let Some(exit) = child.try_wait()? {
                if !exit.success() {
                    worker_failures += 1;
                }
                break;
            }
            if Instant::now() > deadline {
                warn!(
                    worker = index,
                    grace_s = WORKER_EXIT_GRACE_S,
                    "worker still running after the coordinator ended; stopping it"
                );
                worker_failures += 1;
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for pump in pumps {
            let _ = pump.join();
        }
    }
    if interrupted.load(Ordering::SeqCst) {
        say("stopped; the job resumes from its run directory when launched again");
        return Ok(std::process::ExitCode::from(130));
    }
    // The job's outcome is the coordinator's: a worker that died and was replaced by a regroup
    // does not fail a job that finished, and a job that failed fails the launch.
    let outcome = if status.success() {
        "the job finished"
    } else {
        "the job did not finish"
    };
    say(&format!(
        "{outcome} (coordinator exited with {status}); {worker_failures} worker process(es) exited with an error; run directory: {}",
        config.job.run_dir
    ));
    Ok(if status.success() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
