//! `arbor`: arbor's control-plane binary (no libtorch).

mod coordinator_command;
mod dataset;
mod dry_run;
mod job_config;
mod launch_command;
mod plan_command;
mod plan_flags;
mod server;
mod status_command;
mod token_flags;
mod worker_command;

use clap::{Parser, Subcommand};

/// arbor trains Stable Diffusion 1.x models across GPU nodes with NovelAI's aspect-ratio
/// bucketing, CLIP penultimate-layer conditioning, 225-token prompts and hypernetworks.
///
/// This binary is the control plane: it inspects plans, indexes datasets and coordinates
/// workers (`arbor-worker`, one process per GPU).
#[derive(Debug, Parser)]
#[command(name = "arbor", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Start a coordinator and N local workers as processes (logs prefixed; Ctrl-C stops all).
    Launch(launch_command::LaunchArgs),
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(command) => plan_command::run(command),
        Command::Coordinator(args) => coordinator_command::run(args),
        Command::Worker(args) => worker_command::run(args),
        Command::Status(args) => status_command::run(args),
        Command::Launch(args) => launch_command::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
