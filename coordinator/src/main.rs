//! `arbor`: arbor's control-plane binary (no libtorch).

mod plan_command;
mod plan_flags;

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
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(command) => plan_command::run(command),
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
