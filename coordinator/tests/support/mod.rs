//! A job on loopback with real processes: a generated dataset, a job.toml, `arbor coordinator`
//! and `arbor worker --dry-run` children, and readers for the run directory.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod ledger_audit;
pub use ledger_audit::{parse_ledger, trained_items};

pub const TOKEN: &str = "test-token-0123456789";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it, as PEM files
/// `ca.pem`, `server.pem` and `server.key` in `folder`.
pub fn write_tls_files(folder: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    std::fs::create_dir_all(folder).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    std::fs::write(folder.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(folder.join("server.pem"), server.pem()).unwrap();
    std::fs::write(folder.join("server.key"), server_key.serialize_pem()).unwrap();
}

pub struct Job {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub metrics_port: u16,
    pub coordinator: Option<Child>,
    pub workers: Vec<Child>,
    pub items: usize,
    /// Whether the coordinator serves TLS (with `tls/ca.pem` as the clients' CA).
    pub tls: bool,
    /// Environment for every process of the job (object-store credentials, endpoints).
    pub env: Vec<(String, String)>,
}

pub struct JobSpec {
    pub items: usize,
    pub bsz: u32,
    pub epochs: u64,
    pub min_workers: u32,
    pub max_workers: u32,
    pub checkpoint_every: u64,
    pub heartbeat_timeout_s: f64,
    /// Real PNGs (decoded and cropped by the dry run) instead of 1-byte files (which the dry
    /// run reports as failed items without stopping).
    pub real_images: bool,
    /// Serve gRPC over TLS with a certificate for 127.0.0.1 signed by a generated CA.
    pub tls: bool,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            items: 307,
            bsz: 4,
            epochs: 2,
            min_workers: 3,
            max_workers: 3,
            checkpoint_every: 5,
            heartbeat_timeout_s: 2.0,
            real_images: false,
            tls: false,
        }
    }
}

impl Job {
    pub fn new(spec: &JobSpec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("images")).unwrap();
        let mut manifest = String::new();
        for index in 0..spec.items {
            // Varied aspect ratios, one 8:1 panorama in 50 (pruned).
            let (width, height) = if index % 50 == 49 {
                (4096, 512)
            } else {
                (
                    300 + (index * 37 % 1200) as u32,
                    300 + (index * 91 % 1200) as u32,
                )
            };
            let (key, width, height) = if spec.real_images {
                // Small images with the same aspect ratio keep the test quick.
                let (width, height) = (width / 10, height / 10);
                let key = format!("images/{index:05}.png");
                let image = image::RgbImage::from_fn(width, height, |x, y| {
                    image::Rgb([(x * 7) as u8, (y * 5) as u8, index as u8])
                });
                image.save(data.join(&key)).unwrap();
                (key, width, height)
            } else {
                let key = format!("images/{index:05}.bin");
                std::fs::write(data.join(&key), [index as u8]).unwrap();
                (key, width, height)
            };
            manifest.push_str(&format!(
                "{{\"id\":{},\"key\":\"{key}\",\"width\":{width},\"height\":{height},\"caption\":\"tag{}\"}}\n",
                1000 + index * 3,
                index % 7
            ));
        }
        std::fs::write(data.join("manifest.jsonl"), manifest).unwrap();
        let grpc_port = free_port();
        let metrics_port = free_port();
        let tls_lines = if spec.tls {
            write_tls_files(&dir.path().join("tls"));
            "tls_cert = \"tls/server.pem\"\ntls_key = \"tls/server.key\"\n"
        } else {
            ""
        };
        let config = format!(
            r#"[job]
name = "test"
run_dir = "run"
seed = 5

[data]
manifest = "data/manifest.jsonl"

[schedule]
bsz = {bsz}
epochs = {epochs}
checkpoint_every = {checkpoint_every}

[cluster]
listen = "127.0.0.1:{grpc_port}"
metrics_listen = "127.0.0.1:{metrics_port}"
min_workers = {min_workers}
max_workers = {max_workers}
join_timeout_s = 60
heartbeat_interval_s = 0.25
heartbeat_timeout_s = {heartbeat_timeout_s}
{tls_lines}"#,
            bsz = spec.bsz,
            epochs = spec.epochs,
            checkpoint_every = spec.checkpoint_every,
            min_workers = spec.min_workers,
            max_workers = spec.max_workers,
            heartbeat_timeout_s = spec.heartbeat_timeout_s,
        );
        std::fs::write(dir.path().join("job.toml"), config).unwrap();
        Self {
            dir,
            grpc_port,
            metrics_port,
            coordinator: None,
            workers: Vec::new(),
            items: spec.items,
            tls: spec.tls,
            env: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    pub fn address(&self) -> String {
        if self.tls {
            return format!("https://127.0.0.1:{}", self.grpc_port);
        }
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The CA certificate of a TLS job.
    pub fn tls_ca(&self) -> PathBuf {
        self.path().join("tls").join("ca.pem")
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{name}.log")))
            .unwrap()
    }

    pub fn start_coordinator(&mut self) {
        self.start_coordinator_with(&[]);
    }

    /// Starts the coordinator with extra flags.
    pub fn start_coordinator_with(&mut self, flags: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["coordinator", "--config"])
            .arg(self.path().join("job.toml"))
            .args(flags)
            .env("ARBOR_TOKEN", TOKEN)
            .env("ARBOR_LOG", "info")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(self.log("coordinator"))
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
    }

    pub fn start_worker(&mut self, local_rank: u32, simulate_step_ms: u64) {
        let child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["worker", "--dry-run", "--coordinator", &self.address()])
            .args(["--local-rank", &local_rank.to_string(), "--node", "n0"])
            .args(["--simulate-step-ms", &simulate_step_ms.to_string()])
            .args(["--connect-timeout-s", "60"])
            .args(if self.tls {
                vec!["--tls-ca".to_string(), self.tls_ca().display().to_string()]
            } else {
                Vec::new()
            })
            .env("ARBOR_TOKEN", TOKEN)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(self.log(&format!("worker-{local_rank}")))
            .spawn()
            .unwrap();
        self.workers.push(child);
    }

    pub fn worker_log(&self, local_rank: u32) -> String {
        std::fs::read_to_string(self.path().join(format!("worker-{local_rank}.log")))
            .unwrap_or_default()
    }

    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Waits for the coordinator to exit; returns its success.
    pub fn wait_coordinator(&mut self, limit: Duration) -> bool {
        let child = self.coordinator.as_mut().unwrap();
        match try_wait_for(child, limit) {
            Some(status) => status.success(),
            None => panic!(
                "coordinator still running after {limit:?}; log:\n{}",
                self.coordinator_log()
            ),
        }
    }

    pub fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.run_dir().join("state.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn ledger_lines(&self, epoch: u64) -> Vec<Value> {
        let path = self
            .run_dir()
            .join("ledger")
            .join(format!("epoch-{epoch}.jsonl"));
        parse_ledger(&std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Item ids of every batch that stands (not rolled back) in the epoch's ledger, with the
    /// number of times each was trained.
    pub fn trained_items(&self, epoch: u64) -> HashMap<u64, u32> {
        trained_items(&self.ledger_lines(epoch))
    }

    /// Kept item ids (not pruned) of the generated dataset.
    pub fn kept_ids(&self) -> Vec<u64> {
        (0..self.items)
            .filter(|i| i % 50 != 49)
            .map(|i| 1000 + i as u64 * 3)
            .collect()
    }

    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        mut condition: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        while !condition(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; coordinator log:\n{}",
                    self.coordinator_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(pid: u32, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().chain(self.coordinator.iter_mut()) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's exit status once it exits within `limit`, else `None` (it keeps running).
pub fn try_wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` for a child to exit; kills it and panics if it does not.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) {
    if try_wait_for(child, limit).is_none() {
        let _ = child.kill();
        panic!("{what} still running after {limit:?}");
    }
}

/// Checks that no standing item repeats within the epoch and that what is missing is only what
/// trims can explain (at most one global batch per plan).
pub fn assert_nothing_twice_nothing_lost(
    job: &Job,
    epoch: u64,
    plans: usize,
    largest_global_batch: usize,
) {
    let trained = job.trained_items(epoch);
    for (&id, &count) in &trained {
        assert_eq!(count, 1, "epoch {epoch}: item {id} trained {count} times");
    }
    let kept = job.kept_ids().len();
    let missing = kept - trained.len();
    assert!(
        missing < plans * largest_global_batch,
        "epoch {epoch}: {missing} kept items never trained with {plans} plan(s)"
    );
}
