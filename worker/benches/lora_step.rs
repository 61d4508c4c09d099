//! Benchmark: one LoRA training step (forward, backward, AdamW over the LoRA weights) of a small
//! SD-topology UNet on CPU, arbor (tch) vs the PyTorch/PEFT script `bench/lora_step/lora_step.py`
//! (diffusers' `train_text_to_image_lora.py` step) on the same libtorch, UNet config, shapes,
//! LoRA rank and thread count. Prints both side by side with the ratio.
//!
//! Both sides freeze the UNet and adapt its attention projections (`to_q`, `to_k`, `to_v`,
//! `to_out.0`) at rank `--rank` with alpha = rank: arbor with its kohya-format `LoraNetwork`
//! (down kaiming-uniform, up zero), PyTorch with PEFT's `LoraConfig(init_lora_weights="gaussian")`
//! (A gaussian, B zero), so both start from the UNet's own output and compute the gradients of
//! both LoRA matrices. Each step draws fresh noise and one timestep per sample, as diffusers'
//! script does; the AdamW is torch's fused kernel on both sides (weight decay 0.01). After the
//! timed steps, `--profile-steps` more steps on each side (in the last round) are timed phase by
//! phase: forward (noise, UNet, loss), backward, and AdamW + zero_grad (medians).
//!
//!     cargo bench -p arbor-worker --bench lora_step -- [--rounds N] [--steps N] [--warmup N]
//!         [--threads N] [--rank N] [--profile-steps N]
//!         [--batch N] [--size N] [--context-len N] [--python PATH]
//!
//! The Python interpreter is `--python`, else $ARBOR_PYTHON_BIN, else `.venv/bin/python`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::layer_adapter::{AdaptableLayers, LayerRole};
use arbor_worker::lora::{AdaptedComponent, LoraNetwork, LoraSettings, KOHYA_UNET_PREFIX};
use arbor_worker::train::adamw::AdamW;
use arbor_worker::train::train_step::{
    adamw, diffusion_loss, optimizer_step, DiffusionBatch, DiffusionLoss,
};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use tch::{nn, Device, Kind, Tensor};

#[path = "support/bench_unet.rs"]
mod bench_unet;
use bench_unet::{json_f64, json_times, median, run_json_command, summarize, unet_config_json};

/// The learning rate of both sides (lora_step.py's default `--lr`).
const LEARNING_RATE: f64 = 1e-4;
/// AdamW's weight decay on both sides (diffusers' `--adam_weight_decay` default).
const WEIGHT_DECAY: f64 = 0.01;

struct Options {
    steps: usize,
    warmup: usize,
    threads: i32,
    rank: i64,
    profile_steps: usize,
    batch: i64,
    size: i64,
    context_len: i64,
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
        rank: 16,
        profile_steps: 3,
        batch: 2,
        size: 32,
        context_len: 77,
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
            "--rank" => options.rank = value("--rank")?.parse()?,
            "--profile-steps" => options.profile_steps = value("--profile-steps")?.parse()?,
            "--batch" => options.batch = value("--batch")?.parse()?,
            "--size" => options.size = value("--size")?.parse()?,
            "--context-len" => options.context_len = value("--context-len")?.parse()?,
            "--python" => options.python = PathBuf::from(value("--python")?),
            other => bail!("unknown argument `{other}`"),
        }
    }
    if options.steps == 0 || options.rounds == 0 {
        bail!("--steps and --rounds must be at least 1");
    }
    if options.rank < 1 {
        bail!("--rank must be at least 1");
    }
    Ok(options)
}

/// arbor's side: the frozen UNet, its LoRA network, the optimizer and the batch, built once and
/// timed in rounds.
struct ArborRun {
    unet_var_store: nn::VarStore,
    network: LoraNetwork,
    unet: UNet2DConditionModel,
    schedule: DdpmSchedule,
    optimizer: AdamW,
    latents: Tensor,
    context: Tensor,
}

impl ArborRun {
    /// `shared` holds the PyTorch side's initial UNet weights and batch (`lora_step.py
    /// --save-to`): both sides train the same weights on the same batch, so the values (and any
    /// slow denormal arithmetic they cause) are the same too.
    fn new(options: &Options, config_value: &serde_json::Value, shared: &Path) -> Result<Self> {
        tch::set_num_threads(options.threads);
        tch::manual_seed(0);
        let config = UNet2DConditionConfig::from_diffusers_value(config_value, Path::new("bench"))?;
        let mut unet_var_store = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(unet_var_store.root(), &config);
        unet_var_store
            .load(shared.join("unet.safetensors"))
            .context("loading the PyTorch side's initial UNet weights")?;
        unet_var_store.freeze();
        let batch: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(shared.join("batch.safetensors"))?
                .into_iter()
                .collect();
        let shared_tensor = |name: &str| {
            batch
                .get(name)
                .map(Tensor::shallow_clone)
                .with_context(|| format!("batch.safetensors has no `{name}`"))
        };
        let network = LoraNetwork::attach(
            &[AdaptedComponent {
                kohya_prefix: KOHYA_UNET_PREFIX,
                sites: unet.all_adaptable_sites(),
                roles: vec![LayerRole::AttentionProjection],
            }],
            LoraSettings {
                rank: options.rank,
                alpha: options.rank as f64,
                conv_rank: options.rank,
                conv_alpha: options.rank as f64,
                dropout: 0.0,
            },
            Device::Cpu,
        )?;
        let optimizer = adamw(network.var_store(), WEIGHT_DECAY);
        Ok(Self {
            schedule: DdpmSchedule::sd1(),
            optimizer,
            latents: shared_tensor("latents")?,
            context: shared_tensor("context")?,
            unet,
            network,
            unet_var_store,
        })
    }

    /// Fresh noise and one timestep per sample, as diffusers' script draws them each step.
    fn noise_and_timesteps(&self) -> (Tensor, Tensor) {
        let noise = self.latents.randn_like();
        let timesteps = Tensor::randint(1000, [self.latents.size()[0]], (Kind::Int64, Device::Cpu));
        (noise, timesteps)
    }

    fn step(&mut self) -> Result<f64> {
        let (noise, timesteps) = self.noise_and_timesteps();
        let batch = DiffusionBatch {
            latents: &self.latents,
            noise: &noise,
            timesteps: &timesteps,
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

    /// [`optimizer_step`]'s work, timed piece by piece: ms of [forward (noise, UNet, loss),
    /// backward, AdamW + zero_grad].
    fn profiled_step(&mut self) -> Result<[f64; 3]> {
        let start = Instant::now();
        let (noise, timesteps) = self.noise_and_timesteps();
        let batch = DiffusionBatch {
            latents: &self.latents,
            noise: &noise,
            timesteps: &timesteps,
            encoder_hidden_states: &self.context,
        };
        let DiffusionLoss { loss, .. } = diffusion_loss(&self.unet, &self.schedule, &batch, None)?;
        let forward_end = Instant::now();
        loss.f_backward()?;
        let backward_end = Instant::now();
        self.optimizer.step(LEARNING_RATE)?;
        self.optimizer.zero_grad()?;
        let optimizer_end = Instant::now();
        let milliseconds = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
        Ok([
            milliseconds(start, forward_end),
            milliseconds(forward_end, backward_end),
            milliseconds(backward_end, optimizer_end),
        ])
    }

    /// Medians of `steps` profiled steps.
    fn profile(&mut self, steps: usize) -> Result<[f64; 3]> {
        let mut pieces = Vec::with_capacity(steps);
        for _ in 0..steps {
            pieces.push(self.profiled_step()?);
        }
        Ok([0, 1, 2]
            .map(|phase| median(&pieces.iter().map(|piece| piece[phase]).collect::<Vec<_>>())))
    }
}

/// What the PyTorch side reports besides its times: its LoRA's size, to check against arbor's,
/// and its phase medians (NaN without profiled steps).
struct PytorchReport {
    lora_modules: f64,
    lora_parameter_tensors: f64,
    phases: [f64; 3],
}

fn run_pytorch(
    options: &Options,
    config_path: &Path,
    profile_steps: usize,
) -> Result<(Vec<f64>, f64, PytorchReport)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/lora_step/lora_step.py");
    let mut command = Command::new(&options.python);
    command
        .arg(&script)
        .arg("--config")
        .arg(config_path)
        .args(["--rank", &options.rank.to_string()])
        .args(["--batch", &options.batch.to_string()])
        .args(["--size", &options.size.to_string()])
        .args(["--context-len", &options.context_len.to_string()])
        .args(["--steps", &options.steps.to_string()])
        .args(["--warmup", &options.warmup.to_string()])
        .args(["--threads", &options.threads.to_string()])
        .args(["--lr", &LEARNING_RATE.to_string()])
        .args(["--weight-decay", &WEIGHT_DECAY.to_string()])
        .args(["--profile-steps", &profile_steps.to_string()]);
    let value = run_json_command(command, &format!("{script:?} with {:?}", options.python))?;
    let phase = |name: &str| value[name].as_f64().unwrap_or(f64::NAN);
    let report = PytorchReport {
        lora_modules: json_f64(&value, "lora_modules")?,
        lora_parameter_tensors: json_f64(&value, "lora_parameter_tensors")?,
        phases: [
            phase("forward_ms"),
            phase("backward_ms"),
            phase("optimizer_ms"),
        ],
    };
    Ok((json_times(&value)?, json_f64(&value, "loss")?, report))
}

fn main() -> Result<()> {
    let options = parse_options()?;
    let config_value = unet_config_json();
    let directory =
        std::env::temp_dir().join(format!("arbor-bench-lora-step-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let config_path = directory.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config_value)?)?;

    // The PyTorch side's initial weights and batch, which arbor's side loads.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/lora_step/lora_step.py");
    let mut save = Command::new(&options.python);
    save.arg(&script)
        .arg("--config")
        .arg(&config_path)
        .args(["--batch", &options.batch.to_string()])
        .args(["--size", &options.size.to_string()])
        .args(["--context-len", &options.context_len.to_string()])
        .arg("--save-to")
        .arg(&directory);
    run_json_command(save, &format!("{script:?} --save-to"))?;
    // Interleaved rounds, PyTorch first in each, so both sides see the same machine load.
    let mut arbor = ArborRun::new(&options, &config_value, &directory)?;
    let (mut pytorch_times, mut arbor_times) = (Vec::new(), Vec::new());
    let (mut pytorch_loss, mut arbor_loss) = (0.0, 0.0);
    // The last round also profiles `--profile-steps` steps on each side, after its timed ones.
    let mut pytorch_report = None;
    let mut arbor_phases = [f64::NAN; 3];
    for round in 0..options.rounds {
        let last_round = round + 1 == options.rounds;
        let profile_steps = if last_round { options.profile_steps } else { 0 };
        let (times, loss, report) = run_pytorch(&options, &config_path, profile_steps)?;
        pytorch_times.extend(times);
        pytorch_loss = loss;
        pytorch_report = Some(report);
        let warmup = if round == 0 { options.warmup } else { 1 };
        let (times, loss) = arbor.time(warmup, options.steps)?;
        arbor_times.extend(times);
        arbor_loss = loss;
        if profile_steps > 0 {
            arbor_phases = arbor.profile(profile_steps)?;
        }
    }
    let _ = std::fs::remove_dir_all(&directory);
    let pytorch = summarize(pytorch_times, pytorch_loss);
    let arbor_timing = summarize(arbor_times, arbor_loss);

    let arbor_lora_modules = arbor.network.modules().len();
    let arbor_lora_tensors = arbor.network.var_store().variables().len();
    let arbor_lora_parameters: i64 = arbor
        .network
        .var_store()
        .variables()
        .values()
        .map(Tensor::numel)
        .map(|count| count as i64)
        .sum();
    println!(
        "LoRA train step (forward + backward + AdamW over the LoRA weights), CPU, {} threads: \
         UNet block_out_channels {} ({} frozen parameter tensors), LoRA rank {} alpha {} on the \
         attention projections ({} modules, {} tensors, {} parameters), batch {}, latents \
         {}x{}, context {}x{}; {} rounds of {} timed steps (PyTorch then arbor in each round)",
        options.threads,
        config_value["block_out_channels"],
        arbor.unet_var_store.variables().len(),
        options.rank,
        options.rank,
        arbor_lora_modules,
        arbor_lora_tensors,
        arbor_lora_parameters,
        options.batch,
        options.size,
        options.size,
        options.context_len,
        config_value["cross_attention_dim"],
        options.rounds,
        options.steps,
    );
    if let Some(report) = &pytorch_report {
        if report.lora_modules != arbor_lora_modules as f64
            || report.lora_parameter_tensors != arbor_lora_tensors as f64
        {
            println!(
                "warning: PEFT adapted {} modules ({} tensors), arbor {} ({})",
                report.lora_modules,
                report.lora_parameter_tensors,
                arbor_lora_modules,
                arbor_lora_tensors
            );
        }
    }
    let pytorch_phases = pytorch_report.map_or([f64::NAN; 3], |report| report.phases);
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "", "median ms", "mean ms", "min ms", "last loss"
    );
    for (name, timing, phases) in [
        (
            "pytorch eager + PEFT, AdamW fused",
            &pytorch,
            pytorch_phases,
        ),
        ("arbor (tch) LoRA, AdamW fused", &arbor_timing, arbor_phases),
    ] {
        println!(
            "{name:<40} {:>10.1} {:>10.1} {:>10.1} {:>10.4}",
            timing.median_ms, timing.mean_ms, timing.min_ms, timing.loss
        );
        if options.profile_steps > 0 {
            println!(
                "{:<40} (profiled: forward {:.1}, backward {:.1}, AdamW + zero_grad {:.1})",
                "", phases[0], phases[1], phases[2]
            );
        }
    }
    println!(
        "ratio arbor / pytorch: median {:.3}x, min {:.3}x  (target <= 0.90x)",
        arbor_timing.median_ms / pytorch.median_ms,
        arbor_timing.min_ms / pytorch.min_ms
    );
    Ok(())
}
