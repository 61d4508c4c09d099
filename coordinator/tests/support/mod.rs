//! A job on loopback with real processes: a generated dataset, a job.toml, `arbor coordinator`
//! and `arbor worker --dry-run` children, and readers for the run directory.

// Each test binary of this folder uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use arbor_testkit::job::{JobToml, LoopbackJob};

pub const TOKEN: &str = "test-token-0123456789";

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it, as PEM files
/// `ca.pem`, `server.pem` and `server.key` in `folder`.
/// A client of the job's coordinator (with the job token), once it answers.
pub async fn client_when_up(address: &str) -> arbor_runtime::client::Client {
    let mut client = arbor_runtime::client::connect(address, TOKEN, None).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client
        .status(arbor_proto::v1::StatusRequest {})
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "coordinator did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
}

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

/// A loopback job of `arbor coordinator` and `arbor worker --dry-run` children; the folder,
/// the children and the run-directory readers are [`LoopbackJob`]'s.
pub struct Job {
    base: LoopbackJob,
    /// Whether the coordinator serves TLS (with `tls/ca.pem` as the clients' CA).
    pub tls: bool,
    /// Environment for every process of the job (object-store credentials, endpoints).
    pub env: Vec<(String, String)>,
}

arbor_testkit::loopback_job!(
    Job,
    poll: Duration::from_millis(50),
    diagnostics: |job| format!("coordinator log:\n{}", job.coordinator_log())
);

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
    /// `data.max_failed_fraction`; `None` is 1.0 (off) for the 1-byte placeholder files and the
    /// job's default (0.01) for real images.
    pub max_failed_fraction: Option<f64>,
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
            max_failed_fraction: None,
        }
    }
}

impl Job {
    pub fn new(spec: &JobSpec) -> Self {
        let base = LoopbackJob::new(spec.items);
        let dir = base.path();
        let data = dir.join("data");
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
        let tls_lines = if spec.tls {
            write_tls_files(&dir.join("tls"));
            "tls_cert = \"tls/server.pem\"\ntls_key = \"tls/server.key\"\n"
        } else {
            ""
        };
        let config = JobToml {
            name: "test",
            seed: 5,
            bsz: spec.bsz,
            epochs: spec.epochs,
            checkpoint_every: spec.checkpoint_every,
            grpc_port: base.grpc_port,
            metrics_port: base.metrics_port,
            min_workers: spec.min_workers,
            max_workers: spec.max_workers,
            join_timeout_s: 60,
            heartbeat_timeout_s: spec.heartbeat_timeout_s,
            max_failed_fraction: spec.max_failed_fraction.unwrap_or(if spec.real_images {
                0.01
            } else {
                1.0
            }),
        };
        std::fs::write(dir.join("job.toml"), config.render(tls_lines)).unwrap();
        Self {
            base,
            tls: spec.tls,
            env: Vec::new(),
        }
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
        self.read_log(&format!("worker-{local_rank}"))
    }

    /// Waits for the coordinator to exit; returns its success.
    pub fn wait_coordinator(&mut self, limit: Duration) -> bool {
        match self.try_wait_coordinator(limit) {
            Some(status) => status.success(),
            None => panic!(
                "coordinator still running after {limit:?}; log:\n{}",
                self.coordinator_log()
            ),
        }
    }

    /// Kept item ids (not pruned) of the generated dataset.
    pub fn kept_ids(&self) -> Vec<u64> {
        (0..self.items)
            .filter(|i| i % 50 != 49)
            .map(|i| 1000 + i as u64 * 3)
            .collect()
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
