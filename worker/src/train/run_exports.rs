//! The final exports of a run (docs/architecture.md §7 "Exports"), written by rank 0 when the job
//! ends:
//!
//! - `finetune`: `exports/model.safetensors` (single-file LDM, CLIP keys with the `text_model.`
//!   prefix, loadable by A1111, ComfyUI and diffusers' `from_single_file`) and
//!   `exports/diffusers/` (a diffusers folder; configs, tokenizer and scheduler copied from the
//!   base model, so only when the base model is a diffusers folder);
//! - `hypernetwork`: `exports/hypernetwork.pt` (AUTOMATIC1111's format, which ComfyUI's
//!   hypernetwork loader reads too). No safetensors form is written: AUTOMATIC1111 never lists
//!   one, and ComfyUI lists it but loads it as an empty patch without a warning;
//! - `lora`: `exports/lora.safetensors` in kohya-ss/sd-scripts' layout with its `ss_*` metadata
//!   (worker/src/lora/kohya_file.rs), which AUTOMATIC1111, ComfyUI and diffusers load.
//!
//! With EMA on, the exported trainable weights are the EMA shadow. Files are written into a
//! local temporary folder first and then put into the run directory one by one, so an
//! object-store run directory works the same as a local one.

use std::path::{Path, PathBuf};

use tch::Tensor;
use tracing::{info, warn};

use crate::error::{Result, WorkerError};
use crate::hypernetwork::pt_writer::PtDtype;
pub use crate::lora::kohya_file::TrainingRecord;
use crate::lora::kohya_file::{kohya_metadata, write_kohya_file};
use crate::train::run_dir::RunDir;
use crate::train::training_model::{TrainingMode, TrainingModel, HYPERNETWORK_PREFIX, LORA_PREFIX};
use crate::weights::export::{export_diffusers, export_single_file};

/// The folder of the final exports; an export asked for during the run (`arbor checkpoint
/// --export`) goes to `exports/step-<N>/` with the same file names.
pub const EXPORTS_PREFIX: &str = "exports";
pub const SINGLE_FILE_EXPORT: &str = "model.safetensors";
pub const DIFFUSERS_EXPORT: &str = "diffusers";
pub const HYPERNETWORK_PT_EXPORT: &str = "hypernetwork.pt";
pub const LORA_EXPORT: &str = "lora.safetensors";

/// The run-directory folder of the export at `step`.
pub fn step_exports_prefix(step: u64) -> String {
    format!("{EXPORTS_PREFIX}/step-{step}")
}

/// A temporary local folder removed on drop.
struct StagingDir(PathBuf);

impl StagingDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("arbor-exports-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(WorkerError::io(&path))?;
        Ok(Self(path))
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Puts every file under `local` into the run directory under `prefix`, keeping the relative
/// paths; returns the keys written.
fn put_tree(run_dir: &RunDir, local: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let entries = std::fs::read_dir(local).map_err(WorkerError::io(local))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<std::io::Result<_>>()
        .map_err(WorkerError::io(local))?;
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let key = format!("{prefix}/{name}");
        if path.is_dir() {
            keys.extend(put_tree(run_dir, &path, &key)?);
            continue;
        }
        let bytes = std::fs::read(&path).map_err(WorkerError::io(&path))?;
        run_dir.put(&key, bytes)?;
        keys.push(key);
    }
    Ok(keys)
}

/// Writes the mode's exports under `folder` of the run directory ([`EXPORTS_PREFIX`] or
/// [`step_exports_prefix`]); `ema` (prefixed trainable names) replaces the trained weights when
/// given; `record` says how the weights were trained (the LoRA file's metadata). Returns the
/// keys written.
pub fn write_exports(
    run_dir: &RunDir,
    folder: &str,
    model: &TrainingModel,
    ema: Option<&[(String, Tensor)]>,
    record: &TrainingRecord<'_>,
) -> Result<Vec<String>> {
    let staging = StagingDir::new()?;
    let keys = match model.mode {
        TrainingMode::Finetune => export_finetune(run_dir, folder, model, ema, &staging.0)?,
        TrainingMode::Hypernetwork => export_hypernetwork(run_dir, folder, model, ema, &staging.0)?,
        TrainingMode::Lora => export_lora(run_dir, folder, model, ema, &staging.0, record)?,
    };
    info!(
        files = keys.len(),
        location = run_dir.location(),
        "exports written"
    );
    Ok(keys)
}

fn export_finetune(
    run_dir: &RunDir,
    folder: &str,
    model: &TrainingModel,
    ema: Option<&[(String, Tensor)]>,
    staging: &Path,
) -> Result<Vec<String>> {
    let components = model.export_components(ema);
    let single_file = staging.join("model.safetensors");
    export_single_file(&components, &single_file)?;
    let bytes = std::fs::read(&single_file).map_err(WorkerError::io(&single_file))?;
    let single_file_key = format!("{folder}/{SINGLE_FILE_EXPORT}");
    run_dir.put(&single_file_key, bytes)?;
    let mut keys = vec![single_file_key];
    if model.model_path.is_dir() {
        let diffusers = staging.join("diffusers");
        export_diffusers(&components, &model.model_path, &diffusers)?;
        keys.extend(put_tree(
            run_dir,
            &diffusers,
            &format!("{folder}/{DIFFUSERS_EXPORT}"),
        )?);
    } else {
        warn!(
            model = %model.model_path.display(),
            "the base model is a single file: no diffusers export (it needs the model's configs)"
        );
    }
    Ok(keys)
}

fn export_hypernetwork(
    run_dir: &RunDir,
    folder: &str,
    model: &TrainingModel,
    ema: Option<&[(String, Tensor)]>,
    staging: &Path,
) -> Result<Vec<String>> {
    let Some(hypernetwork) = model.hypernetwork.as_ref() else {
        return Err(WorkerError::Training(
            "hypernetwork mode without a hypernetwork".to_string(),
        ));
    };
    let pt = staging.join("hypernetwork.pt");
    let write = || hypernetwork.save_pt(&pt, PtDtype::Float32);
    match ema {
        None => write()?,
        Some(shadow) => {
            // Swap the shadow in, write, and swap the trained weights back.
            let live: Vec<(String, Tensor)> = model.trainable();
            let saved: Vec<Tensor> = live.iter().map(|(_, tensor)| tensor.copy()).collect();
            copy_by_name(&live, shadow)?;
            let written = write();
            tch::no_grad(|| {
                for ((_, target), original) in live.iter().zip(&saved) {
                    let mut target = target.shallow_clone();
                    target.copy_(original);
                }
            });
            written?;
        }
    }
    let bytes = std::fs::read(&pt).map_err(WorkerError::io(&pt))?;
    let key = format!("{folder}/{HYPERNETWORK_PT_EXPORT}");
    run_dir.put(&key, bytes)?;
    Ok(vec![key])
}

fn export_lora(
    run_dir: &RunDir,
    folder: &str,
    model: &TrainingModel,
    ema: Option<&[(String, Tensor)]>,
    staging: &Path,
    record: &TrainingRecord<'_>,
) -> Result<Vec<String>> {
    let Some(lora) = model.lora.as_ref() else {
        return Err(WorkerError::Training(
            "lora mode without a lora network".to_string(),
        ));
    };
    let shadow: Option<Vec<(String, Tensor)>> = ema.map(|shadow| {
        shadow
            .iter()
            .filter_map(|(name, tensor)| {
                let name = name.strip_prefix(LORA_PREFIX)?;
                Some((name.to_string(), tensor.shallow_clone()))
            })
            .collect()
    });
    let tensors = lora.kohya_tensors(shadow.as_deref());
    let path = staging.join(LORA_EXPORT);
    write_kohya_file(
        &path,
        &tensors,
        record.config.lora.save_precision,
        kohya_metadata(lora, record),
    )?;
    let bytes = std::fs::read(&path).map_err(WorkerError::io(&path))?;
    let key = format!("{folder}/{LORA_EXPORT}");
    run_dir.put(&key, bytes)?;
    Ok(vec![key])
}

/// Copies `source` into `destination` by (prefixed) name, without autograd history.
fn copy_by_name(destination: &[(String, Tensor)], source: &[(String, Tensor)]) -> Result<()> {
    for (name, target) in destination {
        let Some((_, value)) = source.iter().find(|(candidate, _)| candidate == name) else {
            return Err(WorkerError::MissingTensor {
                key: name.trim_start_matches(HYPERNETWORK_PREFIX).to_string(),
                source_name: "ema".to_string(),
                expected: target.size(),
            });
        };
        tch::no_grad(|| {
            let mut target = target.shallow_clone();
            target.copy_(value);
        });
    }
    Ok(())
}
