//! Benchmark: one diffusion training step (forward, backward, AdamW) of a small SD-topology
//! UNet on CPU, arbor (tch) vs the PyTorch-eager script `bench/train_step/train_step.py` on the
//! same libtorch, UNet config, shapes and thread count. Prints both side by side with the ratio.
//! Both sides use torch's fused AdamW kernel; `--single-tensor-adamw` gives PyTorch its unfused
//! CPU default instead (arbor stays fused).
//!
//!     cargo bench -p arbor-worker --bench train_step -- [--rounds N] [--steps N] [--warmup N]
//!         [--threads N]
//!         [--batch N] [--size N] [--context-len N] [--single-tensor-adamw] [--python PATH]
//!
//! The Python interpreter is `--python`, else $ARBOR_PYTHON_BIN, else `.venv/bin/python`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::train::adamw::AdamW;
use arbor_worker::train::train_step::{adamw, optimizer_step, DiffusionBatch};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use tch::{nn, Device, Kind, Tensor};

#[path = "support/bench_unet.rs"]
mod bench_unet;
use bench_unet::{json_f64, json_times, run_json_command, summarize, unet_config_json};

/// The learning rate of both sides (train_step.py's default `--lr`).
const LEARNING_RATE: f64 = 1e-4;

struct Options {
    steps: usize,
    warmup: usize,
    threads: i32,
    batch: i64,
    size: i64,
    context_len: i64,
    single_tensor_adamw: bool,
    rounds: usize,
    python: PathBuf,
}

fn parse_options() -> Result<Options> {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut options = Options {
        steps: 5,
        warmup: 2,
        rounds: 3,
        threads: 2,
        batch: 2,
        size: 32,
        context_len: 77,
        single_tensor_adamw: false,
        python: std::env::var_os("ARBOR_PYTHON_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root.join(".venv/bin/python")),
    };
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        let mut value = |name: &str| {
            arguments
                .next()
                .with_context(|| format!("{name} needs a value"))
        };
        match argument.as_str() {
            "--bench" => {}
            "--steps" => options.steps = value("--steps")?.parse()?,
            "--warmup" => options.warmup = value("--warmup")?.parse()?,
            "--rounds" => options.rounds = value("--rounds")?.parse()?,
            "--threads" => options.threads = value("--threads")?.parse()?,
            "--batch" => options.batch = value("--batch")?.parse()?,
            "--size" => options.size = value("--size")?.parse()?,
            "--context-len" => options.context_len = value("--context-len")?.parse()?,
            "--python" => options.python = PathBuf::from(value("--python")?),
            "--single-tensor-adamw" => options.single_tensor_adamw = true,
            other => bail!("unknown argument `{other}`"),
        }
    }
    if options.steps == 0 || options.rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    Ok(options)
}

/// arbor's side: the model, optimizer and batch, built once and timed in rounds.
struct ArborRun {
    var_store: nn::VarStore,
    unet: UNet2DConditionModel,
    schedule: DdpmSchedule,
    optimizer: AdamW,
    latents: Tensor,
    noise: Tensor,
    context: Tensor,
    timesteps: Tensor,
}

impl ArborRun {
    fn new(options: &Options, config_value: &serde_json::Value) -> Result<Self> {
        tch::set_num_threads(options.threads);
        tch::manual_seed(0);
        let config = UNet2DConditionConfig::from_diffusers_value(config_value, Path::new("bench"))?;
        let var_store = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(var_store.root(), &config);
        let optimizer = adamw(&var_store, 0.01);
        let kind = (Kind::Float, Device::Cpu);
        let shape = [options.batch, 4, options.size, options.size];
        Ok(Self {
            unet,
            schedule: DdpmSchedule::sd1(),
            optimizer,
            latents: Tensor::randn(shape, kind),
            noise: Tensor::randn(shape, kind),
            context: Tensor::randn(
                [
                    options.batch,
                    options.context_len,
                    config.cross_attention_dim[0],
                ],
                kind,
            ),
            timesteps: Tensor::randint(1000, [options.batch], (Kind::Int64, Device::Cpu)),
            var_store,
        })
    }

    fn step(&mut self) -> Result<f64> {
        let batch = DiffusionBatch {
            latents: &self.latents,
            noise: &self.noise,
            timesteps: &self.timesteps,
            encoder_hidden_states: &self.context,
        };
        Ok(optimizer_step(
            &mut self.optimizer,
            LEARNING_RATE,
            &self.unet,
            &self.schedule,
            &batch,
            None,
        )?)
    }

    /// Step times in ms after `warmup` untimed steps, and the last loss.
    fn time(&mut self, warmup: usize, steps: usize) -> Result<(Vec<f64>, f64)> {
        for _ in 0..warmup {
            self.step()?;
        }
        let mut times = Vec::with_capacity(steps);
        let mut loss = 0.0;
        for _ in 0..steps {
            let start = Instant::now();
            loss = self.step()?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        Ok((times, loss))
    }
}

fn run_pytorch(options: &Options, config_path: &Path) -> Result<(Vec<f64>, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/train_step/train_step.py");
    let mut command = Command::new(&options.python);
    command
        .arg(&script)
        .arg("--config")
        .arg(config_path)
        .args(["--batch", &options.batch.to_string()])
        .args(["--size", &options.size.to_string()])
        .args(["--context-len", &options.context_len.to_string()])
        .args(["--steps", &options.steps.to_string()])
        .args(["--warmup", &options.warmup.to_string()])
        .args(["--threads", &options.threads.to_string()]);
    if options.single_tensor_adamw {
        command.arg("--single-tensor-adamw");
    }
    let value = run_json_command(command, &format!("{script:?} with {:?}", options.python))?;
    Ok((json_times(&value)?, json_f64(&value, "loss")?))
}

fn main() -> Result<()> {
    let options = parse_options()?;
    let config_value = unet_config_json();
    let directory =
        std::env::temp_dir().join(format!("arbor-bench-train-step-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let config_path = directory.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config_value)?)?;

    // Interleaved rounds, PyTorch first in each, so both sides see the same machine load.
    let mut arbor = ArborRun::new(&options, &config_value)?;
    let (mut pytorch_times, mut arbor_times) = (Vec::new(), Vec::new());
    let (mut pytorch_loss, mut arbor_loss) = (0.0, 0.0);
    for round in 0..options.rounds {
        let (times, loss) = run_pytorch(&options, &config_path)?;
        pytorch_times.extend(times);
        pytorch_loss = loss;
        let warmup = if round == 0 { options.warmup } else { 1 };
        let (times, loss) = arbor.time(warmup, options.steps)?;
        arbor_times.extend(times);
        arbor_loss = loss;
    }
    let _ = std::fs::remove_dir_all(&directory);
    let pytorch = summarize(pytorch_times, pytorch_loss);
    let arbor_timing = summarize(arbor_times, arbor_loss);

    println!(
        "train step (forward + backward + AdamW), CPU, {} threads: UNet block_out_channels {}, \
         {} parameter tensors, batch {}, latents {}x{}, context {}x{}; {} rounds of {} timed \
         steps (PyTorch then arbor in each round)",
        options.threads,
        config_value["block_out_channels"],
        arbor.var_store.variables().len(),
        options.batch,
        options.size,
        options.size,
        options.context_len,
        config_value["cross_attention_dim"],
        options.rounds,
        options.steps,
    );
    let adamw_kind = if options.single_tensor_adamw {
        "single-tensor"
    } else {
        "fused"
    };
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "", "median ms", "mean ms", "min ms", "last loss"
    );
    for (name, timing) in [
        (format!("pytorch eager, AdamW {adamw_kind}"), &pytorch),
        ("arbor (tch), AdamW fused".to_string(), &arbor_timing),
    ] {
        println!(
            "{name:<40} {:>10.1} {:>10.1} {:>10.1} {:>10.4}",
            timing.median_ms, timing.mean_ms, timing.min_ms, timing.loss
        );
    }
    println!(
        "ratio arbor / pytorch: median {:.3}x, min {:.3}x  (target <= 0.90x)",
        arbor_timing.median_ms / pytorch.median_ms,
        arbor_timing.min_ms / pytorch.min_ms
    );
    Ok(())
}
