//! The flags every worker process takes, shared by `arbor worker --dry-run` (libtorch-free) and
//! `arbor-worker train` (the GPU worker), so both binaries accept exactly the same command line:
//! where the coordinator is, the job token (from `ARBOR_TOKEN` or `--token-file`, never a flag
//! value), how many local ranks to start, how peers reach this process, and the dataset root.
//!
//! `--nproc N` makes the process a local launcher: [`spawn_local_ranks`] starts one child per
//! local rank with the same flags (`--nproc 1 --local-rank i`), prefixes their output with the
//! local rank ([`spawn_prefixed`]) and fails if any child fails. Children log as their parent
//! does (format and colour, `arbor_common::logging::child_env`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use arbor_common::logging;
use clap::Args;

use crate::error::RuntimeError;
use crate::restart::{RESTARTS_ENV, WORKER_ID_ENV};
use crate::runtime::WorkerOptions;

/// Where clients get the job token: `ARBOR_TOKEN` or `--token-file`, never a flag value.
#[derive(Debug, Clone, Default, Args)]
pub struct TokenFlags {
    /// A file holding the job token (used when ARBOR_TOKEN is unset).
    #[arg(long, env = "ARBOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenFlags {
    /// The token from `ARBOR_TOKEN`, else from `--token-file`.
    pub fn token(&self) -> Result<String, RuntimeError> {
        if let Ok(token) = std::env::var("ARBOR_TOKEN") {
            if !token.trim().is_empty() {
                return Ok(token.trim().to_string());
            }
        }
        let Some(path) = &self.token_file else {
            return Err(RuntimeError::Token(
                "no job token: set ARBOR_TOKEN or pass --token-file".to_string(),
            ));
        };
        let token = std::fs::read_to_string(path).map_err(|error| {
            RuntimeError::Token(format!("reading token file {}: {error}", path.display()))
        })?;
        if token.trim().is_empty() {
            return Err(RuntimeError::Token(format!(
                "token file {} is empty",
                path.display()
            )));
        }
        Ok(token.trim().to_string())
    }
}

/// The flags of a worker process (both `arbor worker` and `arbor-worker train`).
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
    /// On a regroup, replace this process (same arguments and worker id) instead of re-forming
    /// the collectives in-process. Always done with NCCL; this forces it with Gloo too.
    #[arg(long, env = "ARBOR_RESTART_ON_REGROUP")]
    pub restart_on_regroup: bool,
}

impl WorkerArgs {
    /// How this process joins the job: the token read, the TLS CA read, the node name resolved
    /// and the store port offset by the local rank.
    pub fn worker_options(&self) -> Result<WorkerOptions, RuntimeError> {
        let token = self.token.token()?;
        let tls_ca_pem = match &self.tls_ca {
            Some(path) => Some(std::fs::read(path).map_err(|error| RuntimeError::Flag {
                flag: "--tls-ca",
                message: format!("reading {}: {error}", path.display()),
            })?),
            None => None,
        };
        let store_port = u32::from(self.store_port) + self.local_rank;
        let store_port = u16::try_from(store_port).map_err(|_| RuntimeError::Flag {
            flag: "--store-port",
            message: format!(
                "{} plus local rank {} exceeds 65535",
                self.store_port, self.local_rank
            ),
        })?;
        Ok(WorkerOptions {
            coordinator: self.coordinator.clone(),
            token,
            node: self.node.clone().unwrap_or_else(host_name),
            local_rank: self.local_rank,
            advertise_host: self.advertise_host.clone(),
            store_port,
            tls_ca_pem,
            connect_timeout: Duration::from_secs(self.connect_timeout_s),
            restart_on_regroup: self.restart_on_regroup,
        })
    }

    /// The flags that make a child of `--nproc` local rank `local_rank` with these settings (the
    /// token travels through `ARBOR_TOKEN` or `--token-file`, never on the command line).
    pub fn child_args(&self, local_rank: u32) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: OsString| {
            args.push(flag.into());
            args.push(value);
        };
        push("--coordinator", self.coordinator.clone().into());
        push("--nproc", "1".into());
        push("--local-rank", local_rank.to_string().into());
        push("--advertise-host", self.advertise_host.clone().into());
        push("--store-port", self.store_port.to_string().into());
        push(
            "--connect-timeout-s",
            self.connect_timeout_s.to_string().into(),
        );
        if let Some(node) = &self.node {
            push("--node", node.clone().into());
        }
        if let Some(path) = &self.token.token_file {
            push("--token-file", path.clone().into());
        }
        if let Some(path) = &self.tls_ca {
            push("--tls-ca", path.clone().into());
        }
        if let Some(path) = &self.data_root {
            push("--data-root", path.clone().into());
        }
        if self.restart_on_regroup {
            args.push("--restart-on-regroup".into());
        }
        args
    }
}

/// The machine's host name (`/etc/hostname`, else `$HOSTNAME`, else `localhost`).
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Starts `program leading_args <child flags> trailing_args` once per local rank of
/// `args.nproc`, copies their output prefixed with `[local i] `, waits for all of them and fails
/// if any failed.
pub fn spawn_local_ranks(
    program: &Path,
    leading_args: &[OsString],
    args: &WorkerArgs,
    trailing_args: &[OsString],
) -> Result<(), RuntimeError> {
    let mut children = Vec::new();
    for local_rank in 0..args.nproc {
        let mut command = Command::new(program);
        command
            .args(leading_args)
            .args(args.child_args(local_rank))
            .args(trailing_args)
            // Each child is a worker of its own (a restart id is never shared).
            .env_remove(WORKER_ID_ENV)
            .env_remove(RESTARTS_ENV);
        children.push(spawn_prefixed(command, &format!("local {local_rank}"))?);
    }
    let mut failed = 0;
    for (mut child, pumps) in children {
        let exited_ok = child.wait().map(|status| status.success());
        if !matches!(exited_ok, Ok(true)) {
            failed += 1;
        }
        for pump in pumps {
            let _ = pump.join();
        }
    }
    if failed > 0 {
        return Err(RuntimeError::LocalRanks(format!(
            "{failed} of {} local ranks failed",
            args.nproc
        )));
    }
    Ok(())
}

/// Spawns `command` with its stdout and stderr piped and copied to ours, each line marked with
/// `label`: `[label] line` in text, a `"process": label` member in JSON
/// ([`arbor_common::logging::child_line`]). The child logs in this process's format, with colour
/// exactly when this process's log has it. The caller joins the returned threads after the child
/// exits to get its last lines.
pub fn spawn_prefixed(
    mut command: Command,
    label: &str,
) -> Result<(Child, Vec<JoinHandle<()>>), RuntimeError> {
    let settings = logging::settings();
    command
        .envs(logging::child_env(settings))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|error| RuntimeError::Spawn {
        command: format!("{command:?}"),
        message: error.to_string(),
    })?;
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let label = label.to_string();
        pumps.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{}", logging::child_line(&label, &line, settings.format));
            }
        }));
    }
    if let Some(stderr) = child.stderr.take() {
        let label = label.to_string();
        pumps.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{}", logging::child_line(&label, &line, settings.format));
            }
        }));
    }
    Ok((child, pumps))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    #[test]
    fn child_args_round_trip_through_the_parser() {
        let parsed = Cli::try_parse_from([
            "worker",
            "--coordinator",
            "10.0.0.1:50051",
            "--nproc",
            "4",
            "--advertise-host",
            "10.0.0.2",
            "--store-port",
            "30000",
            "--node",
            "node-a",
            "--data-root",
            "/data",
            "--token-file",
            "/secrets/token",
            "--restart-on-regroup",
        ])
        .unwrap();
        let child = Cli::try_parse_from(
            std::iter::once(OsString::from("worker")).chain(parsed.worker.child_args(3)),
        )
        .unwrap();
        assert_eq!(child.worker.nproc, 1);
        assert_eq!(child.worker.local_rank, 3);
        assert_eq!(child.worker.coordinator, "10.0.0.1:50051");
        assert_eq!(child.worker.advertise_host, "10.0.0.2");
        assert_eq!(child.worker.store_port, 30000);
        assert_eq!(child.worker.node.as_deref(), Some("node-a"));
        assert_eq!(child.worker.data_root, Some(PathBuf::from("/data")));
        assert_eq!(
            child.worker.token.token_file,
            Some(PathBuf::from("/secrets/token"))
        );
        assert!(child.worker.restart_on_regroup);
    }

    #[test]
    fn store_port_overflow_is_a_flag_error() {
        let parsed = Cli::try_parse_from([
            "worker",
            "--coordinator",
            "c:1",
            "--store-port",
            "65535",
            "--local-rank",
            "2",
        ])
        .unwrap();
        let dir = std::env::temp_dir().join(format!("arbor-worker-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "secret\n").unwrap();
        let mut worker = parsed.worker;
        worker.token.token_file = Some(token);
        match worker.worker_options() {
            Err(RuntimeError::Flag { flag, .. }) => assert_eq!(flag, "--store-port"),
            other => panic!("expected a --store-port error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
