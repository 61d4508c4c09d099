//! A job on loopback with real processes: its temporary folder, its `job.toml`, the coordinator
//! and worker children with their log files, and readers of the run directory. The coordinator's
//! tests (`coordinator/tests/support/mod.rs`, dry-run workers) and the worker's end-to-end tests
//! (`worker/tests/it/e2e_support.rs`, training workers) build their jobs on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::Value;

use crate::ledger;

/// The sections of `job.toml` every loopback job has: `[job]`, `[data]` (the manifest at
/// `data/manifest.jsonl`), `[schedule]` and `[cluster]` on 127.0.0.1, with `run_dir = "run"`.
pub struct JobToml<'a> {
    pub name: &'a str,
    pub seed: u64,
    pub bsz: u32,
    pub epochs: u64,
    pub checkpoint_every: u64,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub min_workers: u32,
    pub max_workers: u32,
    pub join_timeout_s: u64,
    pub heartbeat_timeout_s: f64,
    /// `data.max_failed_fraction` (1.0 for datasets of placeholder files that never load).
    pub max_failed_fraction: f64,
}

impl JobToml<'_> {
    /// The file's text; `more` follows the `[cluster]` table (more of its keys, then tables).
    pub fn render(&self, more: &str) -> String {
        format!(
            r#"[job]
name = "{name}"
run_dir = "run"
seed = {seed}

[data]
manifest = "data/manifest.jsonl"
max_failed_fraction = {max_failed_fraction:?}

[schedule]
bsz = {bsz}
epochs = {epochs}
checkpoint_every = {checkpoint_every}

[cluster]
listen = "127.0.0.1:{grpc_port}"
metrics_listen = "127.0.0.1:{metrics_port}"
min_workers = {min_workers}
max_workers = {max_workers}
join_timeout_s = {join_timeout_s}
heartbeat_interval_s = 0.25
heartbeat_timeout_s = {heartbeat_timeout_s}
{more}"#,
            name = self.name,
            seed = self.seed,
            bsz = self.bsz,
            epochs = self.epochs,
            checkpoint_every = self.checkpoint_every,
            grpc_port = self.grpc_port,
            metrics_port = self.metrics_port,
            min_workers = self.min_workers,
            max_workers = self.max_workers,
            join_timeout_s = self.join_timeout_s,
            heartbeat_timeout_s = self.heartbeat_timeout_s,
            max_failed_fraction = self.max_failed_fraction,
        )
    }
}

/// A loopback job's folder and processes. Dropping it kills (after a SIGCONT, for stopped ones)
/// and reaps every child.
pub struct LoopbackJob {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub coordinator: Option<Child>,
    pub workers: Vec<Child>,
    pub items: usize,
}

impl LoopbackJob {
    /// A temporary folder for a job of `items` items, with an empty `data/images` folder, and two
    /// free ports.
    pub fn new(items: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data").join("images")).unwrap();
        Self {
            dir,
            grpc_port: crate::free_port(),
            metrics_port: crate::free_port(),
            coordinator: None,
            workers: Vec::new(),
            items,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// `<name>.log` in the job's folder, opened for appending (a child's stderr).
    pub fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{name}.log")))
            .unwrap()
    }

    /// The text of `<name>.log` (empty when there is none).
    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn coordinator_log(&self) -> String {
        self.read_log("coordinator")
    }

    pub fn state(&self) -> Value {
        ledger::read_state(&self.run_dir())
    }

    pub fn ledger_lines(&self, epoch: u64) -> Vec<Value> {
        ledger::read_ledger(&self.run_dir(), epoch)
    }

    /// Item ids of every batch that stands (not rolled back) in the epoch's ledger, with the
    /// number of times each was trained.
    pub fn trained_items(&self, epoch: u64) -> HashMap<u64, u32> {
        ledger::trained_items(&self.ledger_lines(epoch))
    }

    /// Waits up to `limit` for the coordinator to exit; `None` while it still runs.
    pub fn try_wait_coordinator(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self
            .coordinator
            .as_mut()
            .expect("the coordinator was started");
        crate::process::try_wait_for(child, limit)
    }

    /// SIGKILLs the coordinator and every worker, and reaps them.
    pub fn kill_all(&mut self) {
        for child in self.workers.iter_mut().chain(self.coordinator.iter_mut()) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        self.workers.clear();
        self.coordinator = None;
    }
}

impl Drop for LoopbackJob {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Makes `$job`, a struct with a `base: LoopbackJob` field, a loopback job: `Deref`/`DerefMut` to
/// [`LoopbackJob`], and `wait_until(limit, what, condition)`, which polls `condition(&job)`
/// every `$poll` and, after `limit`, panics with what it awaited and `$diagnostics(&job)`.
#[macro_export]
macro_rules! loopback_job {
    ($job:ty, poll: $poll:expr, diagnostics: $diagnostics:expr) => {
        impl std::ops::Deref for $job {
            type Target = $crate::job::LoopbackJob;

            fn deref(&self) -> &$crate::job::LoopbackJob {
                &self.base
            }
        }

        impl std::ops::DerefMut for $job {
            fn deref_mut(&mut self) -> &mut $crate::job::LoopbackJob {
                &mut self.base
            }
        }

        impl $job {
            /// Polls `condition` until it holds; panics with the job's logs after `limit`.
            pub fn wait_until(
                &self,
                limit: std::time::Duration,
                what: &str,
                mut condition: impl FnMut(&Self) -> bool,
            ) {
                let diagnostics: fn(&Self) -> String = $diagnostics;
                $crate::process::wait_until(
                    limit,
                    $poll,
                    what,
                    || condition(self),
                    || diagnostics(self),
                );
            }
        }
    };
}
