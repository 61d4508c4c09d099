//! `arbor-worker`: one process per GPU. Subcommands for inspecting prompts and checking models.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tch::Tensor;
use tracing::{info, warn};

use arbor_worker::clip::DEFAULT_CLIP_SKIP;
use arbor_worker::probe::{run_probe, ProbeOptions};
use arbor_worker::prompt::{PromptFraming, DEFAULT_MAX_CHUNKS};
use arbor_worker::tokenizer::ClipTokenizer;
use arbor_worker::weights::export::{export_diffusers, export_single_file, NamedTensors};
use arbor_worker::weights::{Component, ModelSource};

#[derive(Parser, Debug)]
#[command(name = "arbor-worker", version, about = "arbor's training worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
        } => probe(model, &inputs, &out, clip_skip, config, hypernetwork),
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
    }
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
) -> Result<()> {
    let inputs: HashMap<String, Tensor> = Tensor::read_safetensors(inputs_path)
        .with_context(|| format!("reading inputs {}", inputs_path.display()))?
        .into_iter()
        .collect();
    let mut options = ProbeOptions::new(model);
    options.clip_skip = clip_skip;
    options.config_dir = config;
    options.hypernetwork = hypernetwork;
    let outputs = run_probe(&options, &inputs)?;
    let named: Vec<(String, Tensor)> = outputs.into_iter().collect();
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
