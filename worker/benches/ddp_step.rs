//! Benchmark: one data-parallel diffusion training step on 2 CPU ranks over Gloo, arbor vs
//! PyTorch DDP (backend gloo) — `bench/ddp/ddp_step.py` — on the same libtorch, small SD-topology
//! UNet config, per-rank batch, thread count, gradient clipping and AdamW (torch's fused kernel
//! on both sides). Prints both side by side with the ratio arbor / PyTorch (target <= 1.0x).
//!
//!     cargo bench -p arbor-worker --bench ddp_step -- [--rounds N] [--steps N] [--warmup N]
//!         [--threads N] [--world N] [--batch N] [--size N] [--context-len N]
//!         [--max-grad-norm X] [--profile-steps N] [--python PATH]
//!         [--height N --width N] [--unet small|sd15] [--device cpu|cuda] [--bf16]
//!         [--peak-tflops X]
//!
//! arbor's side is the trainer's path: `diffusion_loss`, backward, then
//! `DistributedStep::after_backward` (bucketed 25 MiB all-reduce through arbor-c10d's
//! ProcessGroupGloo, global-norm clipping, arbor's AdamW). The bench re-executes itself once per
//! rank (`--rank R --store 127.0.0.1:PORT --config PATH`); rank 0 hosts the TCPStore. Each rank
//! sets `--threads` intra-op threads (default 1, so 2 ranks fit 2 cores). After the timed steps,
//! `--profile-steps` more steps run the after-backward half piece by piece to show where the
//! time goes (all-reduce, clip, AdamW). Rounds alternate PyTorch then arbor, so both sides see
//! the same machine load. Python is `--python`, else $ARBOR_PYTHON_BIN, else `.venv/bin/python`.
//!
//! GPU variant (docs/architecture.md §5; see bench/ddp/gpu_throughput.sh): `--device cuda`
//! puts rank R on GPU R and uses NCCL (build with `--features arbor-c10d/nccl`), `--bf16` runs
//! the forward under bf16 autocast as the trainer does, `--unet sd15` is an SD1.5-sized UNet with
//! random weights, and `--peak-tflops` (the GPU's dense bf16 peak) adds model-FLOPs utilisation
//! at 2.41 TFLOP of training compute per 512x512 image (scaled by pixel count). On CUDA the phase
//! boundaries synchronize the device.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbor_c10d::{Backend, ProcessGroup};
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::train::adamw::{AdamW, AdamWConfig};
use arbor_worker::train::distributed_step::{DistributedStep, StepSettings};
use arbor_worker::train::grad_clip::clip_grad_norm;
use arbor_worker::train::train_step::{diffusion_loss, DiffusionBatch, DiffusionLoss};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use tch::{nn, Device, Kind, Tensor};

#[path = "support/bench_unet.rs"]
mod bench_unet;
use bench_unet::{
    json_f64, json_times, median, run_json_command, sd15_unet_config_json, summarize,
    unet_config_json,
};

const LEARNING_RATE: f64 = 1e-4;

/// Training compute of one 512x512 image through an SD1.5 UNet (forward + backward), in FLOP.
const TRAIN_FLOP_PER_512_IMAGE: f64 = 2.41e12;

#[derive(Debug, Clone)]
struct Options {
    steps: usize,
    warmup: usize,
    rounds: usize,
    threads: i32,
    world: usize,
    batch: i64,
    height: i64,
    width: i64,
    context_len: i64,
    max_grad_norm: f64,
    profile_steps: usize,
    python: PathBuf,
    /// "small" (the CPU benchmark's) or "sd15".
    unet: String,
    cuda: bool,
    bf16: bool,
    peak_tflops: Option<f64>,
    /// Set in a rank process: (rank, store address, config path).
    rank: Option<(usize, String, PathBuf)>,
}

fn parse_options() -> Result<Options> {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut options = Options {
        steps: 10,
        warmup: 3,
        rounds: 3,
        threads: 1,
        world: 2,
        batch: 2,
        height: 32,
        width: 32,
        context_len: 77,
        max_grad_norm: 1.0,
        profile_steps: 3,
        python: std::env::var_os("ARBOR_PYTHON_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root.join(".venv/bin/python")),
        unet: "small".to_string(),
        cuda: false,
        bf16: false,
        peak_tflops: None,
        rank: None,
    };
    let (mut rank, mut store, mut config) = (None, None, None);
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
            "--world" => options.world = value("--world")?.parse()?,
            "--batch" => options.batch = value("--batch")?.parse()?,
            "--size" => {
                options.height = value("--size")?.parse()?;
                options.width = options.height;
            }
            "--height" => options.height = value("--height")?.parse()?,
            "--width" => options.width = value("--width")?.parse()?,
            "--unet" => options.unet = value("--unet")?,
            "--device" => {
                options.cuda = match value("--device")?.as_str() {
                    "cpu" => false,
                    "cuda" => true,
                    other => bail!("--device is cpu or cuda, got `{other}`"),
                }
            }
            "--bf16" => options.bf16 = true,
            "--peak-tflops" => options.peak_tflops = Some(value("--peak-tflops")?.parse()?),
            "--context-len" => options.context_len = value("--context-len")?.parse()?,
            "--max-grad-norm" => options.max_grad_norm = value("--max-grad-norm")?.parse()?,
            "--profile-steps" => options.profile_steps = value("--profile-steps")?.parse()?,
            "--python" => options.python = PathBuf::from(value("--python")?),
            "--rank" => rank = Some(value("--rank")?.parse::<usize>()?),
            "--store" => store = Some(value("--store")?),
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            other => bail!("unknown argument `{other}`"),
        }
    }
    if options.steps == 0 || options.rounds == 0 || options.world == 0 || options.threads < 1 {
        bail!("--steps, --rounds, --world and --threads must be at least 1");
    }
    if options.unet != "small" && options.unet != "sd15" {
        bail!("--unet is small or sd15, got `{}`", options.unet);
    }
    options.rank = match (rank, store, config) {
        (Some(rank), Some(store), Some(config)) => Some((rank, store, config)),
        (None, None, None) => None,
        _ => bail!("--rank, --store and --config go together (a rank process)"),
    };
    Ok(options)
}

/// One rank of arbor's data-parallel step: the model, optimizer, step driver and batch.
struct RankRun {
    device: Device,
    bf16: bool,
    unet: UNet2DConditionModel,
    schedule: DdpmSchedule,
    parameters: Vec<(String, Tensor)>,
    optimizer: AdamW,
    step_driver: DistributedStep,
    group: ProcessGroup,
    latents: Tensor,
    noise: Tensor,
    context: Tensor,
    timesteps: Tensor,
    micro_step: u64,
}

/// Phase times of one step, in ms.
#[derive(Debug, Clone, Copy)]
struct StepPhases {
    total: f64,
    forward: f64,
    backward: f64,
    after_backward: f64,
}

impl RankRun {
    fn new(options: &Options, rank: usize, store: &str, config_path: &Path) -> Result<Self> {
        tch::set_num_threads(options.threads);
        let config_value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config_path)?)?;
        let config = UNet2DConditionConfig::from_diffusers_value(&config_value, config_path)?;
        // The same initial weights on every rank (DDP broadcasts rank 0's; here a shared seed).
        tch::manual_seed(0);
        let device = if options.cuda {
            if options.bf16 {
                // As the trainer does: tch's autocast defaults to fp16 on CUDA.
                arbor_c10d::aten_ops::set_autocast_dtype(
                    arbor_c10d::aten_ops::AutocastDevice::Cuda,
                    tch::Kind::BFloat16,
                )?;
            }
            Device::Cuda(rank)
        } else {
            Device::Cpu
        };
        let var_store = nn::VarStore::new(device);
        let unet = UNet2DConditionModel::new(var_store.root(), &config);
        // As the trainer: the trainable tensors sorted by name.
        let mut parameters: Vec<(String, Tensor)> = var_store
            .variables()
            .into_iter()
            .filter(|(_, tensor)| tensor.requires_grad())
            .collect();
        parameters.sort_by(|left, right| left.0.cmp(&right.0));
        let optimizer = AdamW::new(
            parameters
                .iter()
                .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
                .collect(),
            AdamWConfig::default(),
        );
        let step_driver = DistributedStep::new(
            &parameters,
            StepSettings {
                grad_accum: 1,
                max_grad_norm: options.max_grad_norm,
            },
        );
        let backend = if options.cuda {
            Backend::Nccl
        } else {
            Backend::Gloo
        };
        let group = ProcessGroup::new(
            backend,
            store,
            rank,
            options.world,
            "bench/ddp_step",
            Duration::from_secs(300),
        )?;
        // Each rank its own batch.
        tch::manual_seed(1 + rank as i64);
        let kind = (Kind::Float, device);
        let shape = [options.batch, 4, options.height, options.width];
        Ok(Self {
            device,
            bf16: options.cuda && options.bf16,
            unet,
            schedule: DdpmSchedule::sd1(),
            parameters,
            optimizer,
            step_driver,
            group,
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
            timesteps: Tensor::randint(1000, [options.batch], (Kind::Int64, device)),
            micro_step: 0,
        })
    }

    /// Forward and backward; returns the loss tensor and (forward, backward) ms.
    fn forward_backward(&mut self, overlap: bool) -> Result<(Tensor, f64, f64)> {
        let started = Instant::now();
        let batch = DiffusionBatch {
            latents: &self.latents,
            noise: &self.noise,
            timesteps: &self.timesteps,
            encoder_hidden_states: &self.context,
        };
        let DiffusionLoss { loss, .. } = if self.bf16 {
            tch::autocast(true, || {
                diffusion_loss(&self.unet, &self.schedule, &batch, None)
            })?
        } else {
            diffusion_loss(&self.unet, &self.schedule, &batch, None)?
        };
        let loss = loss.to_kind(Kind::Float);
        self.synchronize();
        let forward = started.elapsed().as_secs_f64() * 1000.0;
        // The trainer's way: the gradients are averaged during the backward pass.
        self.step_driver
            .before_backward(Some(&mut self.group), &loss, overlap)?;
        loss.f_backward()?;
        self.synchronize();
        let backward = started.elapsed().as_secs_f64() * 1000.0 - forward;
        Ok((loss, forward, backward))
    }

    /// Waits for the GPU's queued work (phase boundaries); nothing on CPU.
    fn synchronize(&self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
    }

    /// One trainer step: forward, backward, `DistributedStep::after_backward`.
    fn step(&mut self) -> Result<(f64, StepPhases)> {
        let started = Instant::now();
        let (loss, forward, backward) = self.forward_backward(true)?;
        let after_started = Instant::now();
        let report = self.step_driver.after_backward(
            Some(&mut self.group),
            &mut self.optimizer,
            None,
            LEARNING_RATE,
            self.micro_step,
        )?;
        self.micro_step += 1;
        if report.is_none() {
            bail!("after_backward did not step the optimizer (grad_accum is 1)");
        }
        let loss = loss.double_value(&[]);
        let phases = StepPhases {
            total: started.elapsed().as_secs_f64() * 1000.0,
            forward,
            backward,
            after_backward: after_started.elapsed().as_secs_f64() * 1000.0,
        };
        Ok((loss, phases))
    }

    /// The after-backward half piece by piece (the same calls `after_backward` makes):
    /// (all-reduce, clip, AdamW + zero_grad) ms.
    fn profiled_step(&mut self) -> Result<[f64; 3]> {
        // Without overlap, so that the all-reduce is measured on its own.
        let (_loss, _, _) = self.forward_backward(false)?;
        let started = Instant::now();
        self.step_driver.average_gradients(&mut self.group)?;
        self.synchronize();
        let all_reduce = started.elapsed().as_secs_f64() * 1000.0;
        let tensors: Vec<Tensor> = self
            .parameters
            .iter()
            .map(|(_, tensor)| tensor.shallow_clone())
            .collect();
        let started = Instant::now();
        clip_grad_norm(&tensors, self.step_driver.settings().max_grad_norm)?;
        self.synchronize();
        let clip = started.elapsed().as_secs_f64() * 1000.0;
        let started = Instant::now();
        self.optimizer.step(LEARNING_RATE)?;
        self.optimizer.zero_grad()?;
        self.synchronize();
        let adamw = started.elapsed().as_secs_f64() * 1000.0;
        self.micro_step += 1;
        Ok([all_reduce, clip, adamw])
    }
}

/// A rank process: builds its run, times the steps, prints one JSON line (rank 0's is used).
fn rank_main(options: &Options, rank: usize, store: &str, config_path: &Path) -> Result<()> {
    let mut run = RankRun::new(options, rank, store, config_path)?;
    for _ in 0..options.warmup {
        run.step()?;
    }
    run.group.barrier()?;
    let mut phases = Vec::with_capacity(options.steps);
    let mut loss = 0.0;
    for _ in 0..options.steps {
        let (step_loss, step_phases) = run.step()?;
        loss = step_loss;
        phases.push(step_phases);
    }
    run.group.barrier()?;
    let mut pieces = Vec::with_capacity(options.profile_steps);
    for _ in 0..options.profile_steps {
        pieces.push(run.profiled_step()?);
    }
    run.group.barrier()?;
    let column =
        |pick: fn(&StepPhases) -> f64| median(&phases.iter().map(pick).collect::<Vec<_>>());
    let piece = |index: usize| median(&pieces.iter().map(|p| p[index]).collect::<Vec<_>>());
    let line = serde_json::json!({
        "rank": rank,
        "times_ms": phases.iter().map(|p| p.total).collect::<Vec<_>>(),
        "forward_ms": column(|p| p.forward),
        "backward_ms": column(|p| p.backward),
        "after_backward_ms": column(|p| p.after_backward),
        "all_reduce_ms": piece(0),
        "clip_ms": piece(1),
        "adamw_ms": piece(2),
        "loss": loss,
        "parameter_tensors": run.parameters.len(),
        "parameters": run.parameters.iter().map(|(_, t)| t.numel()).sum::<usize>(),
        "buckets": run.step_driver.buckets().len(),
    });
    println!("{line}");
    Ok(())
}

/// Runs the ranks of arbor's side as child processes of this bench binary; rank 0's JSON.
fn run_arbor(options: &Options, config_path: &Path) -> Result<serde_json::Value> {
    let executable = std::env::current_exe().context("locating the bench binary")?;
    let store = format!("127.0.0.1:{}", arbor_testkit::free_port());
    let rank_command = |rank: usize| {
        let mut command = Command::new(&executable);
        command
            .args(["--rank", &rank.to_string(), "--store", &store])
            .arg("--config")
            .arg(config_path)
            .args(["--world", &options.world.to_string()])
            .args(["--threads", &options.threads.to_string()])
            .args(["--batch", &options.batch.to_string()])
            .args(["--height", &options.height.to_string()])
            .args(["--width", &options.width.to_string()])
            .args(["--context-len", &options.context_len.to_string()])
            .args(["--steps", &options.steps.to_string()])
            .args(["--warmup", &options.warmup.to_string()])
            .args(["--max-grad-norm", &options.max_grad_norm.to_string()])
            .args(["--profile-steps", &options.profile_steps.to_string()])
            .args(["--unet", &options.unet])
            .args(["--device", if options.cuda { "cuda" } else { "cpu" }]);
        if options.bf16 {
            command.arg("--bf16");
        }
        command
    };
    let mut others = Vec::new();
    for rank in 1..options.world {
        let child = rank_command(rank)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting arbor rank {rank}"))?;
        others.push((rank, child));
    }
    let rank_zero = run_json_command(rank_command(0), "arbor rank 0");
    for (rank, mut child) in others {
        let status = child.wait()?;
        if !status.success() {
            bail!("arbor rank {rank} exited with {status}");
        }
    }
    rank_zero
}

fn run_pytorch(options: &Options, config_path: &Path) -> Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/ddp/ddp_step.py");
    let mut command = Command::new(&options.python);
    command
        .arg(&script)
        .arg("--config")
        .arg(config_path)
        .args(["--world", &options.world.to_string()])
        .args(["--threads", &options.threads.to_string()])
        .args(["--batch", &options.batch.to_string()])
        .args(["--height", &options.height.to_string()])
        .args(["--width", &options.width.to_string()])
        .args(["--context-len", &options.context_len.to_string()])
        .args(["--steps", &options.steps.to_string()])
        .args(["--warmup", &options.warmup.to_string()])
        .args(["--max-grad-norm", &options.max_grad_norm.to_string()])
        .args(["--device", if options.cuda { "cuda" } else { "cpu" }]);
    if options.bf16 {
        command.arg("--bf16");
    }
    run_json_command(command, &format!("{script:?} with {:?}", options.python))
}

fn main() -> Result<()> {
    let options = parse_options()?;
    if let Some((rank, store, config_path)) = &options.rank {
        return rank_main(&options, *rank, store, config_path);
    }
    let config_value = if options.unet == "sd15" {
        sd15_unet_config_json()
    } else {
        unet_config_json()
    };
    let directory =
        std::env::temp_dir().join(format!("arbor-bench-ddp-step-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let config_path = directory.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config_value)?)?;

    let (mut pytorch_runs, mut arbor_runs) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        let pytorch = run_pytorch(&options, &config_path)?;
        let arbor = run_arbor(&options, &config_path)?;
        eprintln!(
            "round {}: pytorch median {:.1} ms, arbor median {:.1} ms",
            round + 1,
            median(&json_times(&pytorch)?),
            median(&json_times(&arbor)?)
        );
        pytorch_runs.push(pytorch);
        arbor_runs.push(arbor);
    }
    let _ = std::fs::remove_dir_all(&directory);

    let all_times = |runs: &[serde_json::Value]| -> Result<Vec<f64>> {
        Ok(runs
            .iter()
            .map(json_times)
            .collect::<Result<Vec<_>>>()?
            .concat())
    };
    let median_field = |runs: &[serde_json::Value], name: &str| -> Result<f64> {
        let values = runs
            .iter()
            .map(|run| json_f64(run, name))
            .collect::<Result<Vec<_>>>()?;
        Ok(median(&values))
    };
    let (Some(last_pytorch), Some(last_arbor)) = (pytorch_runs.last(), arbor_runs.last()) else {
        bail!("no rounds ran");
    };
    let pytorch = summarize(all_times(&pytorch_runs)?, json_f64(last_pytorch, "loss")?);
    let arbor = summarize(all_times(&arbor_runs)?, json_f64(last_arbor, "loss")?);
    let global_batch = options.batch as f64 * options.world as f64;

    let (device_name, backend_name) = if options.cuda {
        (
            if options.bf16 {
                "CUDA bf16 autocast"
            } else {
                "CUDA fp32"
            },
            "NCCL",
        )
    } else {
        ("CPU fp32", "Gloo on 127.0.0.1")
    };
    println!(
        "data-parallel train step (forward + backward + all-reduce + clip {} + AdamW), {}, \
         {}, {} ranks x {} intra-op thread(s): UNet block_out_channels {}, {} \
         parameter tensors ({:.1} M parameters, {} arbor bucket(s) of <= 25 MiB), batch {} per \
         rank, latents {}x{}, context {}x{}; {} rounds of {} timed steps after {} warmup \
         (PyTorch then arbor in each round)",
        options.max_grad_norm,
        device_name,
        backend_name,
        options.world,
        options.threads,
        config_value["block_out_channels"],
        last_arbor["parameter_tensors"],
        json_f64(last_arbor, "parameters")? / 1e6,
        last_arbor["buckets"],
        options.batch,
        options.height,
        options.width,
        options.context_len,
        config_value["cross_attention_dim"],
        options.rounds,
        options.steps,
        options.warmup,
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "median ms", "mean ms", "min ms", "images/s", "last loss"
    );
    for (name, timing) in [
        ("pytorch DDP, torch.optim.AdamW fused", &pytorch),
        ("arbor (tch + arbor-c10d), arbor AdamW fused", &arbor),
    ] {
        println!(
            "{name:<44} {:>10.1} {:>10.1} {:>10.1} {:>10.2} {:>10.4}",
            timing.median_ms,
            timing.mean_ms,
            timing.min_ms,
            global_batch / (timing.median_ms / 1000.0),
            timing.loss
        );
    }
    println!(
        "phases (rank 0, median ms)  pytorch: forward {:.1}, backward incl. overlapped \
         all-reduce {:.1}, clip + AdamW + zero_grad {:.1}",
        median_field(&pytorch_runs, "forward_ms")?,
        median_field(&pytorch_runs, "backward_ms")?,
        median_field(&pytorch_runs, "optimizer_ms")?,
    );
    println!(
        "                            arbor:   forward {:.1}, backward {:.1}, after_backward {:.1} \
         (profiled: all-reduce {:.1}, clip {:.1}, AdamW + zero_grad {:.1})",
        median_field(&arbor_runs, "forward_ms")?,
        median_field(&arbor_runs, "backward_ms")?,
        median_field(&arbor_runs, "after_backward_ms")?,
        median_field(&arbor_runs, "all_reduce_ms")?,
        median_field(&arbor_runs, "clip_ms")?,
        median_field(&arbor_runs, "adamw_ms")?,
    );
    println!(
        "ratio arbor / pytorch step time: median {:.3}x, min {:.3}x  (target <= 1.0x)",
        arbor.median_ms / pytorch.median_ms,
        arbor.min_ms / pytorch.min_ms
    );
    if let Some(peak_tflops) = options.peak_tflops {
        // 8x downsampled latents: pixels = 64 · latent pixels.
        let pixels = (options.height * 8 * options.width * 8) as f64;
        let flop_per_image = TRAIN_FLOP_PER_512_IMAGE * pixels / (512.0 * 512.0);
        let peak = peak_tflops * 1e12 * options.world as f64;
        for (name, timing) in [("pytorch", &pytorch), ("arbor", &arbor)] {
            let images_per_second = global_batch / (timing.median_ms / 1000.0);
            println!(
                "MFU {name}: {:.1}% ({:.2} TFLOP/image x {images_per_second:.2} images/s over \
                 {} x {peak_tflops} TFLOP/s)",
                100.0 * images_per_second * flop_per_image / peak,
                flop_per_image / 1e12,
                options.world
            );
        }
    }
    Ok(())
}
