//! `arbor`: arbor's control-plane binary (no libtorch). Subcommands are declared in
//! `cli.rs`, each implemented in its own `*_command.rs` module of the library.

use arbor_common::logging;
use arbor_coordinator::cli::Cli;
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(&cli.log, "info") {
        eprintln!("error: {error}");
        return std::process::ExitCode::from(2);
    }
    match cli.run() {
        Ok(code) => code,
        Err(error) => {
            logging::report_error(&format!("{error:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
