//! `arbor-worker`: one process per GPU. `train` joins a coordinator and trains (the same worker
//! flags as `arbor worker`); the other subcommands inspect prompts and check or convert models.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tch::Tensor;
use tracing::{info, warn};

use arbor_common::logging::{self, LogFlags};
use arbor_runtime::runtime::run_worker;
use arbor_runtime::worker_args::{spawn_local_ranks, WorkerArgs};
use arbor_worker::clip::DEFAULT_CLIP_SKIP;
use arbor_worker::device::{device_name, DeviceChoice};
use arbor_worker::lora::kohya_file::read_kohya_file;
use arbor_worker::lora::merge::merge_lora;
use arbor_worker::probe::{run_probe, ProbeOptions};
use arbor_worker::prompt::{PromptFraming, DEFAULT_MAX_CHUNKS};
use arbor_worker::tokenizer::ClipTokenizer;
use arbor_worker::train::trainer::{TchTrainer, TrainerOptions};
use arbor_worker::weights::export::{export_diffusers, export_single_file, NamedTensors};
use arbor_worker::weights::{Component, ModelSource};

#[derive(Parser, Debug)]
#[command(name = "arbor-worker", version, about = "arbor's training worker")]
struct Cli {
    #[command(flatten)]
    log: LogFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Joins the coordinator and trains: one process per GPU (or `--nproc N` local ranks).
    Train {
        #[command(flatten)]
        worker: WorkerArgs,
        /// Where the model runs: `auto` (CUDA when available), `cpu` or `cuda`. On CUDA, local
        /// rank i uses cuda:i among the visible devices (CUDA_VISIBLE_DEVICES), as torchrun does.
        #[arg(long, value_enum, default_value_t = DeviceFlag::Auto)]
        device: DeviceFlag,
        /// libtorch intra-op threads on the CPU (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
        /// Bound in seconds on the group rendezvous and every collective (default: four
        /// heartbeat timeouts, at least 30).
        #[arg(long)]
        collective_timeout_s: Option<u64>,
    },
    /// Tokenizes one prompt per stdin line: token count, ids and the framed 77-token chunks.
    Tokenize {
        /// A diffusers folder (its tokenizer/) or a folder holding the tokenizer files.
        #[arg(long)]
        model: PathBuf,
        /// The most 75-token chunks a prompt may take.
        #[arg(long, default_value_t = DEFAULT_MAX_CHUNKS)]
        max_chunks: usize,
        /// One JSON object per prompt: {"tokens":N,"ids":[…],"chunks":[[77 ids],…]}.
        #[arg(long)]
        json: bool,
    },
    /// Runs a model on named input tensors and writes the named outputs (see the probe module).
    Probe {
        /// A diffusers folder (any subset of components) or a single-file LDM safetensors.
        #[arg(long)]
        model: PathBuf,
        /// The input tensors (safetensors).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// CLIP layer of `clip.chunked_penultimate_ln`: 1 = last, 2 = penultimate.
        #[arg(long, default_value_t = DEFAULT_CLIP_SKIP)]
        clip_skip: usize,
        /// A diffusers folder whose component configs describe a single-file model (default:
        /// SD1's configs).
        #[arg(long)]
        config: Option<PathBuf>,
        /// An AUTOMATIC1111 hypernetwork `.pt` for the `hn.*` inputs.
        #[arg(long)]
        hypernetwork: Option<PathBuf>,
        /// Where the model runs: `cpu` or `cuda` (cuda:0). Inputs and outputs stay fp32.
        #[arg(long, value_enum, default_value_t = DeviceFlag::Cpu)]
        device: DeviceFlag,
    },
    /// Converts a model's weights: a single-file LDM safetensors and/or a diffusers folder.
    Export {
        /// A diffusers folder or a single-file LDM safetensors.
        #[arg(long)]
        model: PathBuf,
        /// The single-file LDM safetensors to write (CLIP keys with the `text_model.` prefix).
        #[arg(long)]
        single_file: Option<PathBuf>,
        /// The diffusers folder to write.
        #[arg(long)]
        diffusers: Option<PathBuf>,
        /// The diffusers folder whose configs, tokenizer and scheduler the diffusers export
        /// copies (default: the model itself, when it is a diffusers folder).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Merges a kohya-format LoRA (`exports/lora.safetensors`) into a model and writes a
    /// single-file LDM safetensors that loads like any other export.
    MergeLora {
        /// The base model: a diffusers folder or a single-file LDM safetensors.
        #[arg(long)]
        model: PathBuf,
        /// The LoRA file (kohya-ss/sd-scripts' layout).
        #[arg(long)]
        lora: PathBuf,
        /// The single-file safetensors to write.
        #[arg(long)]
        out: PathBuf,
        /// The LoRA's strength (AUTOMATIC1111's `<lora:name:scale>`).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceFlag {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceFlag {
    fn choice(self) -> DeviceChoice {
        match self {
            DeviceFlag::Auto => DeviceChoice::Auto,
            DeviceFlag::Cpu => DeviceChoice::Cpu,
            DeviceFlag::Cuda => DeviceChoice::Cuda,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Training reports progress at info; the inspection tools keep stderr quiet.
    let default_filter = match cli.command {
        Command::Train { .. } => "info",
        _ => "warn",
    };
    if let Err(error) = logging::init(&cli.log, default_filter) {
        eprintln!("error: {error}");
        return std::process::ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            logging::report_error(&format!("{error:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<std::process::ExitCode> {
    let outcome = match command {
        Command::Train {
            worker,
            device,
            threads,
            collective_timeout_s,
        } => return train(worker, device, threads, collective_timeout_s),
        Command::Tokenize {
            model,
            max_chunks,
            json,
        } => tokenize(&model, max_chunks, json),
        Command::Probe {
            model,
            inputs,
            out,
            clip_skip,
            config,
            hypernetwork,
            device,
        } => probe(
            model,
            &inputs,
            &out,
            clip_skip,
            config,
            hypernetwork,
            device,
        ),
        Command::Export {
            model,
            single_file,
            diffusers,
            config,
        } => export(
            &model,
            single_file.as_deref(),
            diffusers.as_deref(),
            config.as_deref(),
        ),
        Command::MergeLora {
            model,
            lora,
            out,
            scale,
        } => merge_lora_command(&model, &lora, &out, scale),
    };
    outcome.map(|()| std::process::ExitCode::SUCCESS)
}

/// `arbor-worker train`: runs [`TchTrainer`] under the worker runtime until the job ends.
fn train(
    worker: WorkerArgs,
    device: DeviceFlag,
    threads: Option<i32>,
    collective_timeout_s: Option<u64>,
) -> Result<std::process::ExitCode> {
    if worker.nproc > 1 {
        let exe = std::env::current_exe().context("locating the arbor-worker binary")?;
        let mut trailing: Vec<OsString> = vec![
            "--device".into(),
            device
                .to_possible_value()
                .map(|value| value.get_name().to_string())
                .unwrap_or_else(|| "auto".to_string())
                .into(),
        ];
        if let Some(threads) = threads {
            trailing.extend(["--threads".into(), threads.to_string().into()]);
        }
        if let Some(seconds) = collective_timeout_s {
            trailing.extend(["--collective-timeout-s".into(), seconds.to_string().into()]);
        }
        spawn_local_ranks(&exe, &["train".into()], &worker, &trailing)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(threads) = threads {
        if threads < 1 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(threads);
    }
    // Refused before joining: a rank without a device of its own must not enter a group.
    let device = device
        .choice()
        .resolve(worker.local_rank)
        .with_context(|| format!("local rank {}", worker.local_rank))?;
    info!(local_rank = worker.local_rank, device = %device_name(device), "device chosen");
    let options = worker.worker_options()?;
    let mut trainer = TchTrainer::new(TrainerOptions {
        device,
        data_root: worker.data_root.clone(),
        collective_timeout: collective_timeout_s.map(std::time::Duration::from_secs),
    });
    let summary = run_worker(options, &mut trainer)?;
    if let Some(restart) = summary.restart {
        // Returns only when the new process could not be started; the trainer (and its
        // collectives) is deliberately not torn down first.
        return Err(restart.exec().into());
    }
    info!(
        batches = summary.batches_trained,
        items = summary.items_trained,
        failed_items = summary.failed_items,
        groups = summary.groups_joined,
        steps = trainer.step(),
        seconds = summary.seconds,
        "worker finished"
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn tokenize(model: &Path, max_chunks: usize, json: bool) -> Result<()> {
    if max_chunks == 0 {
        bail!("--max-chunks must be at least 1");
    }
    let tokenizer = ClipTokenizer::from_model_dir(model)?;
    let framing = PromptFraming::for_tokenizer(&tokenizer, max_chunks);
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut skipped = 0usize;
    for (index, line) in stdin.lock().split(b'\n').enumerate() {
        let line_number = index + 1;
        let bytes = line.context("reading stdin")?;
        let Ok(text) = String::from_utf8(bytes) else {
            warn!(line = line_number, "prompt is not valid UTF-8; skipped");
            skipped += 1;
            continue;
        };
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let ids = tokenizer.encode(text);
        let chunks = framing.frame(&ids, framing.chunk_count(ids.len()));
        if json {
            let record = serde_json::json!({"tokens": ids.len(), "ids": ids, "chunks": chunks});
            writeln!(out, "{record}")?;
        } else {
            let truncated = ids.len().saturating_sub(chunks.len() * 75);
            writeln!(
                out,
                "{} tokens, {} chunk(s){}: {:?}",
                ids.len(),
                chunks.len(),
                if truncated > 0 {
                    format!(", {truncated} truncated")
                } else {
                    String::new()
                },
                ids
            )?;
        }
    }
    if skipped > 0 {
        bail!("{skipped} prompt line(s) were not valid UTF-8 and were skipped");
    }
    Ok(())
}

fn probe(
    model: PathBuf,
    inputs_path: &Path,
    out: &Path,
    clip_skip: usize,
    config: Option<PathBuf>,
    hypernetwork: Option<PathBuf>,
    device: DeviceFlag,
) -> Result<()> {
    let inputs: HashMap<String, Tensor> = Tensor::read_safetensors(inputs_path)
        .with_context(|| format!("reading inputs {}", inputs_path.display()))?
        .into_iter()
        .collect();
    let mut options = ProbeOptions::new(model);
    options.clip_skip = clip_skip;
    options.config_dir = config;
    options.hypernetwork = hypernetwork;
    options.device = device.choice().resolve(0)?;
    let outputs = run_probe(&options, &inputs)?;
    // Written from the CPU, whatever the device.
    let named: Vec<(String, Tensor)> = outputs
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_device(tch::Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&named, out)
        .with_context(|| format!("writing outputs {}", out.display()))?;
    info!(outputs = named.len(), out = %out.display(), "probe outputs written");
    Ok(())
}

fn export(
    model: &Path,
    single_file: Option<&Path>,
    diffusers: Option<&Path>,
    config: Option<&Path>,
) -> Result<()> {
    if single_file.is_none() && diffusers.is_none() {
        bail!("nothing to export: pass --single-file and/or --diffusers");
    }
    let source = ModelSource::open(model)?;
    let read = source.read_components(&Component::ALL)?;
    let components: BTreeMap<Component, NamedTensors> = read
        .into_iter()
        .map(|(component, tensors)| (component, tensors.tensors))
        .collect();
    if let Some(path) = single_file {
        export_single_file(&components, path)?;
        info!(path = %path.display(), "single-file export written");
    }
    if let Some(out_dir) = diffusers {
        let Some(config_source) = config.or(source.diffusers_root()) else {
            bail!("--diffusers from a single-file model needs --config (a diffusers folder to copy configs from)");
        };
        export_diffusers(&components, config_source, out_dir)?;
        info!(out_dir = %out_dir.display(), "diffusers export written");
    }
    Ok(())
}

/// `arbor-worker merge-lora`.
fn merge_lora_command(model: &Path, lora: &Path, out: &Path, scale: f64) -> Result<()> {
    if !scale.is_finite() {
        bail!("--scale must be a finite number, got {scale}");
    }
    let source = ModelSource::open(model)?;
    let read = source.read_components(&Component::ALL)?;
    let mut components: BTreeMap<Component, NamedTensors> = read
        .into_iter()
        .map(|(component, tensors)| (component, tensors.tensors))
        .collect();
    let (modules, _metadata) = read_kohya_file(lora)?;
    let report = merge_lora(&mut components, &modules, scale)
        .with_context(|| format!("merging {}", lora.display()))?;
    export_single_file(&components, out)?;
    info!(
        path = %out.display(),
        unet_modules = report.unet_modules,
        text_encoder_modules = report.text_encoder_modules,
        scale,
        "merged model written"
    );
    println!(
        "merged {} unet and {} text encoder lora modules (scale {scale}) into {}",
        report.unet_modules,
        report.text_encoder_modules,
        out.display()
    );
    Ok(())
}
