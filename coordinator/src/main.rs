//! `arbor`: arbor's control-plane binary (no libtorch). Subcommands are declared in
//! `cli.rs`, each implemented in its own `*_command.rs` module of the library.

use arbor_coordinator::cli::Cli;
use clap::Parser;

fn main() -> std::process::ExitCode {
    init_tracing();
    match Cli::parse().run() {
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
