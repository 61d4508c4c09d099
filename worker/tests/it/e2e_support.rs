//! Real training jobs on loopback for the end-to-end tests: a tiny SD1-topology model
//! (`scripts/demo/make_demo_model.py --preset tiny`, built once per script version), tiny images
//! of varied aspect ratios with tag captions, a job.toml, `arbor coordinator` and
//! `arbor-worker train` children, and readers for the run directory (docs/architecture.md §7).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbor_testkit::job::{JobToml, LoopbackJob};
use arbor_testkit::{fnv1a, free_port, python_bin, repo_root};
use serde_json::Value;

pub const TOKEN: &str = "e2e-token-0123456789abcdef";

/// Multi-process jobs share 2 cores: one at a time, so heartbeats and timings stay honest.
pub fn one_job_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arbor-worker"))
}

/// The `arbor` binary (coordinator), built into the same target folder as `arbor-worker`.
pub fn arbor_bin() -> PathBuf {
    let path = worker_bin().with_file_name(format!("arbor{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: these tests run the coordinator binary from the same target folder as \
         arbor-worker; build it first with `cargo build -p arbor-coordinator` (same \
         CARGO_TARGET_DIR and profile), or run `cargo build --workspace` before `cargo test`",
        path.display()
    );
    path
}

/// Facts about the tiny model the script prints (hypernetwork sizes and so on).
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub dir: PathBuf,
    pub hypernetwork_sizes: Vec<u32>,
}

fn build_tiny_model() -> Result<TinyModel> {
    let script = repo_root().join("scripts/demo/make_demo_model.py");
    let mut bytes = std::fs::read(&script).with_context(|| format!("reading {script:?}"))?;
    let fixtures = repo_root().join("worker/tests/fixtures/make_fixtures.py");
    bytes.extend(std::fs::read(&fixtures).with_context(|| format!("reading {fixtures:?}"))?);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("e2e-tiny-model")
        .join(format!("{:016x}", fnv1a(&bytes)));
    let output = Command::new(python_bin())
        .arg(&script)
        .arg(&dir)
        .args(["--preset", "tiny"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .with_context(|| format!("running {script:?} with {:?}", python_bin()))?;
    if !output.status.success() {
        bail!(
            "{script:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let facts: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("the model script's last line is not JSON: {stdout}"))?;
    let hypernetwork_sizes = facts["hypernetwork_sizes"]
        .as_array()
        .context("hypernetwork_sizes")?
        .iter()
        .map(|size| size.as_u64().map(|size| size as u32))
        .collect::<Option<Vec<_>>>()
        .context("hypernetwork_sizes holds non-integers")?;
    Ok(TinyModel {
        dir,
        hypernetwork_sizes,
    })
}

pub fn tiny_model() -> &'static TinyModel {
    static MODEL: OnceLock<TinyModel> = OnceLock::new();
    MODEL.get_or_init(|| build_tiny_model().expect("building the tiny model"))
}

/// Sizes of the generated images: about 1.2x the test buckets (max_area 64*64, min_dim 32,
/// max_dim 128, step 32), so every one is downscaled and cropped, across 5 buckets.
const IMAGE_SIZES: [(u32, u32); 6] = [
    (80, 80),
    (40, 150),
    (150, 40),
    (118, 40),
    (40, 118),
    (72, 84),
];
const COLOURS: [(&str, [u8; 3]); 3] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 80, 220]),
];

pub struct JobSpec {
    pub items: usize,
    pub bsz: u32,
    pub epochs: u64,
    pub mode: &'static str,
    pub min_workers: u32,
    pub max_workers: u32,
    pub checkpoint_every: u64,
    pub heartbeat_timeout_s: f64,
    pub samples_every: u64,
    pub lr: &'static str,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            items: 24,
            bsz: 2,
            epochs: 2,
            mode: "finetune",
            min_workers: 2,
            max_workers: 2,
            checkpoint_every: 2,
            heartbeat_timeout_s: 10.0,
            samples_every: 6,
            lr: "1e-3",
        }
    }
}

/// A training job of `arbor coordinator` and `arbor-worker train` children; the folder, the
/// children and the run-directory readers are [`LoopbackJob`]'s.
pub struct Job {
    base: LoopbackJob,
    started_workers: u32,
    /// Environment variables every worker started from now on gets (an object store's
    /// credentials, say).
    pub worker_env: Vec<(String, String)>,
}

arbor_testkit::loopback_job!(
    Job,
    poll: Duration::from_millis(20),
    diagnostics: |job| job.logs()
);

impl Job {
    pub fn new(spec: &JobSpec) -> Self {
        let model = tiny_model();
        let base = LoopbackJob::new(spec.items);
        let dir = base.path();
        let data = dir.join("data");
        let mut manifest = String::new();
        for index in 0..spec.items {
            let (width, height) = IMAGE_SIZES[index % IMAGE_SIZES.len()];
            let (colour_name, colour) = COLOURS[index / IMAGE_SIZES.len() % COLOURS.len()];
            let key = format!("images/{index:04}.png");
            // A coloured square in the middle third on a light background.
            let image = image::RgbImage::from_fn(width, height, |x, y| {
                let inside = (width / 3..2 * width / 3).contains(&x)
                    && (height / 3..2 * height / 3).contains(&y);
                if inside {
                    image::Rgb(colour)
                } else {
                    image::Rgb([240, 240, 235])
                }
            });
            image.save(data.join(&key)).unwrap();
            manifest.push_str(&format!(
                "{{\"id\":{},\"key\":\"{key}\",\"width\":{width},\"height\":{height},\"caption\":\"{colour_name}, square, white background\"}}\n",
                Self::item_id(index),
            ));
        }
        std::fs::write(data.join("manifest.jsonl"), manifest).unwrap();
        let sizes = model
            .hypernetwork_sizes
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let cluster = JobToml {
            name: "e2e",
            seed: 11,
            bsz: spec.bsz,
            epochs: spec.epochs,
            checkpoint_every: spec.checkpoint_every,
            grpc_port: base.grpc_port,
            metrics_port: base.metrics_port,
            min_workers: spec.min_workers,
            max_workers: spec.max_workers,
            join_timeout_s: 120,
            heartbeat_timeout_s: spec.heartbeat_timeout_s,
            max_failed_fraction: 0.01,
        };
        let more = format!(
            r#"
[buckets]
max_area = 4096
min_dim = 32
max_dim = 128
step = 32
base_res = [64, 64]

[model]
path = "{model}"
mode = "{mode}"

[train]
lr = "{lr}"
mixed_precision = "fp32"

[hypernetwork]
sizes = [{sizes}]

[samples]
every = {samples_every}
prompts = ["red, square", "blue, square"]
steps = 2
"#,
            model = model.dir.display(),
            mode = spec.mode,
            lr = spec.lr,
            samples_every = spec.samples_every,
        );
        std::fs::write(dir.join("job.toml"), cluster.render(&more)).unwrap();
        Self {
            base,
            started_workers: 0,
            worker_env: Vec::new(),
        }
    }

    pub fn item_id(index: usize) -> u64 {
        500 + index as u64 * 7
    }

    /// Every generated item (none is pruned: the aspect ratios are all within the table).
    pub fn item_ids(&self) -> Vec<u64> {
        (0..self.items).map(Self::item_id).collect()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    pub fn start_coordinator(&mut self) {
        self.start_coordinator_command("coordinator");
    }

    /// Starts `arbor <command> --config job.toml` as the job's coordinator (`cache` fills the
    /// latent cache).
    pub fn start_coordinator_command(&mut self, command: &str) {
        let child = Command::new(arbor_bin())
            .args([command, "--config"])
            .arg(self.path().join("job.toml"))
            .env("ARBOR_TOKEN", TOKEN)
            .env("ARBOR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log("coordinator"))
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
    }

    /// Starts `arbor-worker train` as the next worker (logs in `worker-<n>.log`, n counting
    /// every worker started, replacements included). Returns n.
    pub fn start_worker(&mut self, local_rank: u32) -> u32 {
        self.start_worker_with(local_rank, &[])
    }

    /// [`Job::start_worker`] with extra flags for `arbor-worker train`.
    pub fn start_worker_with(&mut self, local_rank: u32, extra_args: &[&str]) -> u32 {
        let number = self.started_workers;
        self.started_workers += 1;
        // The store port is `--store-port` plus the local rank: give each process a free one.
        let store_port = free_port().saturating_sub(local_rank as u16);
        let child = Command::new(worker_bin())
            .args(["train", "--coordinator", &self.address()])
            .args(["--local-rank", &local_rank.to_string(), "--node", "n0"])
            .args(["--store-port", &store_port.to_string()])
            .args(["--connect-timeout-s", "60"])
            .args(["--device", "cpu", "--threads", "1"])
            .args(extra_args)
            .envs(self.worker_env.iter().map(|(key, value)| (key, value)))
            .env("ARBOR_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("worker-{number}")))
            .spawn()
            .unwrap();
        self.workers.push(child);
        number
    }

    pub fn worker_log(&self, number: u32) -> String {
        self.read_log(&format!("worker-{number}"))
    }

    /// The coordinator's log, then the tail of every worker's.
    pub fn logs(&self) -> String {
        let mut text = format!("--- coordinator\n{}", self.coordinator_log());
        for number in 0..self.started_workers {
            let log = self.worker_log(number);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            text.push_str(&format!("--- worker {number} (last 40 lines)\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Waits for the coordinator to exit; panics with the logs when it fails or takes too long.
    pub fn wait_coordinator_success(&mut self, limit: Duration) {
        let status = self.wait_coordinator(limit);
        assert!(
            status.success(),
            "coordinator exited with {status}\n{}",
            self.logs()
        );
    }

    /// Waits for the coordinator to exit; panics with the logs when it takes too long.
    pub fn wait_coordinator(&mut self, limit: Duration) -> std::process::ExitStatus {
        match self.try_wait_coordinator(limit) {
            Some(status) => status,
            None => panic!("coordinator still running after {limit:?}\n{}", self.logs()),
        }
    }

    /// Waits for every worker still tracked to exit; returns their statuses in start order.
    pub fn wait_workers(&mut self, limit: Duration) -> Vec<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let mut statuses = Vec::new();
        for child in &mut self.workers {
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    statuses.push(status);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    statuses.push(child.wait().unwrap());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        statuses
    }

    /// How many batches of the epoch's ledger were rolled back.
    pub fn rolled_back(&self, epoch: u64) -> usize {
        self.ledger_lines(epoch)
            .iter()
            .filter(|line| line["rolled_back"].as_bool() == Some(true))
            .count()
    }

    /// Every standing item of the epoch is a dataset item trained exactly once, and what is
    /// missing is only what trims explain (fewer than one global batch per plan the epoch ran).
    pub fn assert_ledger_exact(&self, epoch: u64, plans: usize, largest_global_batch: usize) {
        let trained = self.trained_items(epoch);
        let ids: HashSet<u64> = self.item_ids().into_iter().collect();
        for (&id, &count) in &trained {
            assert!(
                ids.contains(&id),
                "epoch {epoch}: item {id} is not in the dataset"
            );
            assert_eq!(count, 1, "epoch {epoch}: item {id} trained {count} times");
        }
        let missing = ids.len() - trained.len();
        assert!(
            missing < plans.max(1) * largest_global_batch,
            "epoch {epoch}: {missing} items never trained with {plans} plan(s)"
        );
    }

    /// metrics.jsonl records by step (a step written again after a resume replaces the earlier
    /// record), and the number of lines read.
    pub fn metrics(&self) -> (BTreeMap<u64, Value>, usize) {
        let text =
            std::fs::read_to_string(self.run_dir().join("metrics.jsonl")).unwrap_or_default();
        let mut by_step = BTreeMap::new();
        let mut lines = 0;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let record: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("metrics.jsonl line {line:?}: {error}"));
            let step = record["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("metrics.jsonl record without a step: {line}"));
            by_step.insert(step, record);
            lines += 1;
        }
        (by_step, lines)
    }

    /// Complete checkpoints (with COMPLETE) and partial ones, by step.
    pub fn checkpoints(&self) -> (Vec<u64>, Vec<u64>) {
        let mut complete = Vec::new();
        let mut partial = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.run_dir().join("checkpoints")) else {
            return (complete, partial);
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(step) = name
                .strip_prefix("step-")
                .and_then(|step| step.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.path().join("COMPLETE").exists() {
                complete.push(step);
            } else {
                partial.push(step);
            }
        }
        complete.sort_unstable();
        partial.sort_unstable();
        (complete, partial)
    }
}

/// Runs `worker/tests/fixtures/check_exports.py` with the venv's python; returns its JSON.
pub fn check_exports(args: &[&str]) -> Value {
    let script = repo_root().join("worker/tests/fixtures/check_exports.py");
    let output: Output = Command::new(python_bin())
        .arg(&script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|error| panic!("running {script:?} with {:?}: {error}", python_bin()));
    assert!(
        output.status.success(),
        "check_exports.py {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|error| panic!("check_exports.py printed {stdout:?}: {error}"))
}
