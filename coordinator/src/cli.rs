//! The `arbor` command line: one subcommand per module (`plan_command.rs`, …).

use arbor_common::logging::LogFlags;
use clap::{Parser, Subcommand};

use crate::{
    cache_command, checkpoint_command, coordinator_command, index_command, launch_command,
    plan_command, preview_command, status_command, worker_command,
};

/// arbor trains Stable Diffusion 1.x models across GPU nodes with NovelAI's aspect-ratio
/// bucketing, CLIP penultimate-layer conditioning, 225-token prompts and hypernetworks.
///
/// This binary is the control plane: it inspects plans, indexes datasets and coordinates
/// workers (`arbor-worker`, one process per GPU).
#[derive(Debug, Parser)]
#[command(name = "arbor", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogFlags,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect bucketing and epoch plans before spending GPU hours.
    #[command(subcommand)]
    Plan(plan_command::PlanCommand),
    /// Serve one job: form the group, stream shards, detect failures, persist the job state.
    Coordinator(coordinator_command::CoordinatorArgs),
    /// Run a libtorch-free worker that joins a coordinator (`--dry-run`: no model, every batch
    /// loaded and cropped, items/s reported).
    Worker(worker_command::WorkerArgs),
    /// Show a running job: workers, ranks, generation, epoch, progress, last checkpoint, events.
    Status(status_command::StatusArgs),
    /// Ask a running job to checkpoint soon (at an accumulation window's end every rank can
    /// still reach); `--wait` blocks until it is complete.
    Checkpoint(checkpoint_command::CheckpointArgs),
    /// Fill the latent cache (`train.cache_latents`) ahead of training: serve the job for one
    /// epoch in which `arbor-worker train` processes only encode the images the cache lacks
    /// (state in `<job.run_dir>/cache-fill`; progress and ETA in `arbor status`).
    Cache(cache_command::CacheArgs),
    /// Start a coordinator and N local workers as processes (logs prefixed; Ctrl-C stops all).
    Launch(launch_command::LaunchArgs),
    /// Index a dataset (a folder or an object-store prefix) into a JSON Lines manifest: sizes
    /// from image headers, sidecar captions, stable ids, and a report of every skipped file.
    Index(index_command::IndexArgs),
    /// Render the first batches of one rank, as they will be trained (cover-resized and
    /// cropped), into a labelled PNG grid.
    Preview(preview_command::PreviewArgs),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self.command {
            Command::Plan(command) => plan_command::run(command),
            Command::Coordinator(args) => coordinator_command::run(args),
            Command::Worker(args) => worker_command::run(args),
            Command::Status(args) => status_command::run(args),
            Command::Checkpoint(args) => checkpoint_command::run(args),
            Command::Cache(args) => cache_command::run(args),
            Command::Launch(args) => launch_command::run(args),
            Command::Index(args) => index_command::run(args),
            Command::Preview(args) => preview_command::run(args),
        }
    }
}
