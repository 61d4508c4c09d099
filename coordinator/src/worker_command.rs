//! `arbor worker --dry-run`: a libtorch-free worker that runs the whole job without a model.
//! GPU nodes run `arbor-worker train` with the same flags ([`arbor_runtime::worker_args`]).

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, Context};
use arbor_runtime::runtime::run_worker;
use arbor_runtime::worker_args::spawn_local_ranks;
use clap::Args;
use tracing::info;

use crate::dry_run::DryRunTrainer;

pub use arbor_runtime::worker_args::{host_name, spawn_prefixed};

#[derive(Debug, Clone, Args)]
#[group(id = "dry_run_worker_args")]
pub struct WorkerArgs {
    /// The flags every worker takes (shared with `arbor-worker train`).
    #[command(flatten)]
    pub worker: arbor_runtime::worker_args::WorkerArgs,
    /// Run the whole job without a model: fetch, decode and crop every batch, report items/s.
    #[arg(long)]
    pub dry_run: bool,
    /// In a dry run, also spend this many milliseconds per batch as a stand-in for the GPU step,
    /// to see whether loading keeps up with a given step time.
    #[arg(long, default_value_t = 0)]
    pub simulate_step_ms: u64,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<std::process::ExitCode> {
    if !args.dry_run {
        bail!("`arbor worker` runs without libtorch and only supports --dry-run; train with `arbor-worker train` (same flags) on GPU nodes");
    }
    if args.worker.nproc > 1 {
        let exe = std::env::current_exe().context("locating the arbor binary")?;
        let trailing: Vec<OsString> = vec![
            "--simulate-step-ms".into(),
            args.simulate_step_ms.to_string().into(),
            "--dry-run".into(),
        ];
        spawn_local_ranks(&exe, &["worker".into()], &args.worker, &trailing)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let options = args.worker.worker_options()?;
    let mut trainer = DryRunTrainer::new(
        args.worker.data_root.clone(),
        Duration::from_millis(args.simulate_step_ms),
    )
    .map_err(anyhow::Error::msg)?;
    let summary = run_worker(options, &mut trainer)?;
    if let Some(restart) = summary.restart {
        return Err(restart.exec().into());
    }
    info!(
        batches = summary.batches_trained,
        items = summary.items_trained,
        failed_items = summary.failed_items,
        groups = summary.groups_joined,
        items_per_second = summary.items_trained as f64 / summary.seconds.max(1e-9),
        "worker finished"
    );
    Ok(std::process::ExitCode::SUCCESS)
}
