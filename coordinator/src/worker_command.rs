//! `arbor worker --dry-run`: a libtorch-free worker that runs the whole job without a model.
//! GPU nodes run `arbor-worker` with the same flags.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use arbor_runtime::runtime::{run_worker, WorkerOptions};
use clap::Args;
use tracing::info;

use crate::dry_run::DryRunTrainer;
use crate::token_flags::TokenFlags;

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The coordinator, `host:port` or `http(s)://host:port`.
    #[arg(long, env = "ARBOR_COORDINATOR")]
    pub coordinator: String,
    #[command(flatten)]
    pub token: TokenFlags,
    /// Local ranks to start on this node: one process each (one per GPU, or N CPU processes).
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    /// This process's local rank (set for the children of `--nproc`).
    #[arg(long, default_value_t = 0, env = "ARBOR_LOCAL_RANK")]
    pub local_rank: u32,
    /// The host or IP other ranks reach this node at (for example the pod IP).
    #[arg(long, env = "ARBOR_ADVERTISE_HOST", default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// The node name; ranks of one node are numbered contiguously. Defaults to the host name.
    #[arg(long, env = "ARBOR_NODE")]
    pub node: Option<String>,
    /// Port of the collective store if this process becomes rank 0 (plus the local rank).
    #[arg(long, default_value_t = 29500)]
    pub store_port: u16,
    /// PEM CA certificate to verify a TLS coordinator.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Seconds to keep retrying an unreachable coordinator.
    #[arg(long, default_value_t = 600)]
    pub connect_timeout_s: u64,
    /// Dataset root for manifest keys (defaults to the job's data.root or the manifest's folder).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
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
        bail!("`arbor worker` runs without libtorch and only supports --dry-run; train with `arbor-worker` (same flags) on GPU nodes");
    }
    if args.nproc > 1 {
        return spawn_local_ranks(&args);
    }
    let token = args.token.token()?;
    let tls_ca_pem = match &args.tls_ca {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("reading --tls-ca {}", path.display()))?,
        ),
        None => None,
    };
    let node = args.node.clone().unwrap_or_else(host_name);
    let options = WorkerOptions {
        coordinator: args.coordinator.clone(),
        token,
        node,
        local_rank: args.local_rank,
        advertise_host: args.advertise_host.clone(),
        store_port: args.store_port + args.local_rank as u16,
        tls_ca_pem,
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
    };
    let mut trainer = DryRunTrainer::new(
        args.data_root.clone(),
        Duration::from_millis(args.simulate_step_ms),
    )
    .map_err(anyhow::Error::msg)?;
    let summary = run_worker(options, &mut trainer)?;
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

pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Starts one child process per local rank, prefixes their output with the local rank, and
/// fails if any child fails.
fn spawn_local_ranks(args: &WorkerArgs) -> anyhow::Result<std::process::ExitCode> {
    let exe = std::env::current_exe().context("locating the arbor binary")?;
    let mut children = Vec::new();
    for local_rank in 0..args.nproc {
        let mut command = Command::new(&exe);
        command
            .arg("worker")
            .args(["--coordinator", &args.coordinator])
            .args(["--nproc", "1", "--local-rank", &local_rank.to_string()])
            .args(["--advertise-host", &args.advertise_host])
            .args(["--store-port", &args.store_port.to_string()])
            .args(["--connect-timeout-s", &args.connect_timeout_s.to_string()])
            .args(["--simulate-step-ms", &args.simulate_step_ms.to_string()])
            .arg("--dry-run")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(node) = &args.node {
            command.args(["--node", node]);
        }
        if let Some(path) = &args.token.token_file {
            command.arg("--token-file").arg(path);
        }
        if let Some(path) = &args.tls_ca {
            command.arg("--tls-ca").arg(path);
        }
        if let Some(path) = &args.data_root {
            command.arg("--data-root").arg(path);
        }
        children.push(spawn_prefixed(command, &format!("[local {local_rank}] "))?);
    }
    let mut failed = 0;
    for (mut child, pumps) in children {
        if !child.wait()?.success() {
            failed += 1;
        }
        for pump in pumps {
            let _ = pump.join();
        }
    }
    if failed > 0 {
        bail!("{failed} of {} local ranks failed", args.nproc);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Spawns `command` with its stdout and stderr copied to ours, each line prefixed.
pub fn spawn_prefixed(
    mut command: Command,
    prefix: &str,
) -> anyhow::Result<(std::process::Child, Vec<std::thread::JoinHandle<()>>)> {
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let prefix = prefix.to_string();
        pumps.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{prefix}{line}");
            }
        }));
    }
    if let Some(stderr) = child.stderr.take() {
        let prefix = prefix.to_string();
        pumps.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{prefix}{line}");
            }
        }));
    }
    Ok((child, pumps))
}
