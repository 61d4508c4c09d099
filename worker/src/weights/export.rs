//! Export: a single-file LDM safetensors (CLIP with the `text_model.` prefix) and a diffusers
//! folder.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::error::{Result, WorkerError};
use crate::weights::key_map::{Component, KeyMap, Reshape};

/// A component's named tensors in diffusers naming (a VarStore's variables, for example).
pub type NamedTensors = BTreeMap<String, Tensor>;

/// The variables of a VarStore, detached on the CPU, by name.
pub fn var_store_tensors(var_store: &nn::VarStore) -> NamedTensors {
    var_store
        .variables()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.detach().to_device(Device::Cpu).contiguous()))
        .collect()
}

fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(WorkerError::io(parent))?;
    }
    Tensor::write_safetensors(tensors, path).map_err(|source| WorkerError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot be written: {source}"),
    })
}

/// Writes the given components as one single-file LDM safetensors. Every key must be covered
/// by the key map; an unmapped key is an error naming it.
pub fn export_single_file(
    components: &BTreeMap<Component, NamedTensors>,
    path: &Path,
) -> Result<()> {
    let empty = NamedTensors::new();
    let unet = components.get(&Component::Unet).unwrap_or(&empty);
    let vae = components.get(&Component::Vae).unwrap_or(&empty);
    let key_map = KeyMap::from_diffusers_keys(
        unet.keys().map(String::as_str),
        vae.keys().map(String::as_str),
    );
    let mut out = Vec::new();
    for (&component, tensors) in components {
        for (name, tensor) in tensors {
            let Some(mapped) = key_map.to_ldm(component, name) else {
                return Err(WorkerError::Weights {
                    path: path.to_path_buf(),
                    message: format!("no single-file key for {component:?} tensor `{name}`"),
                });
            };
            let tensor = match mapped.reshape {
                Reshape::LinearConv1x1 if tensor.dim() == 2 => {
                    let size = tensor.size();
                    tensor.reshape([size[0], size[1], 1, 1])
                }
                _ => tensor.shallow_clone(),
            };
            out.push((mapped.key, tensor.to_device(Device::Cpu).contiguous()));
        }
    }
    write(path, &out)
}

/// Writes a diffusers folder: each component's weights under its folder, and the non-weight
/// files (configs, tokenizer, scheduler, model_index.json) copied from `config_source`, a
/// diffusers folder of the same architecture. CLIP keys keep the `text_model.` prefix.
pub fn export_diffusers(
    components: &BTreeMap<Component, NamedTensors>,
    config_source: &Path,
    out_dir: &Path,
) -> Result<()> {
    copy_non_weight_files(config_source, out_dir)?;
    write_slow_tokenizer_files(&out_dir.join("tokenizer"))?;
    for (&component, tensors) in components {
        let file_name = match component {
            Component::TextEncoder => "model.safetensors",
            Component::Unet | Component::Vae => "diffusion_pytorch_model.safetensors",
        };
        let path = out_dir.join(component.diffusers_folder()).join(file_name);
        let named: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.to_device(Device::Cpu).contiguous()))
            .collect();
        write(&path, &named)?;
    }
    Ok(())
}

/// Gives a tokenizer folder that holds only `tokenizer.json` (what transformers 5 saves) the
/// `vocab.json` and `merges.txt` that `CLIPTokenizer.from_pretrained` of transformers 4.x and
/// other slow-tokenizer readers need, derived from its BPE model. `merges.txt` starts with the
/// `#version` line those readers skip.
fn write_slow_tokenizer_files(tokenizer_dir: &Path) -> Result<()> {
    let json_path = tokenizer_dir.join("tokenizer.json");
    let vocab_path = tokenizer_dir.join("vocab.json");
    let merges_path = tokenizer_dir.join("merges.txt");
    if !json_path.is_file() || (vocab_path.is_file() && merges_path.is_file()) {
        return Ok(());
    }
    let text = std::fs::read_to_string(&json_path).map_err(WorkerError::io(&json_path))?;
    let tokenizer_error = |message: String| WorkerError::Tokenizer {
        path: json_path.clone(),
        message,
    };
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| tokenizer_error(error.to_string()))?;
    let model = &parsed["model"];
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array())
    else {
        return Err(tokenizer_error(
            "model.vocab or model.merges missing (not a BPE tokenizer)".to_string(),
        ));
    };
    let mut merge_lines = String::from("#version: 0.2\n");
    for merge in merges {
        // tokenizers writes a merge as "a b" (before 0.20) or as ["a", "b"].
        let line = match merge {
            serde_json::Value::String(pair) => pair.clone(),
            serde_json::Value::Array(pair) => pair
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            other => {
                return Err(tokenizer_error(format!(
                    "a merge is neither a string nor a pair: {other}"
                )))
            }
        };
        merge_lines.push_str(&line);
        merge_lines.push('\n');
    }
    let vocab_text =
        serde_json::to_string(vocab).map_err(|error| tokenizer_error(error.to_string()))?;
    std::fs::write(&vocab_path, vocab_text).map_err(WorkerError::io(&vocab_path))?;
    std::fs::write(&merges_path, merge_lines).map_err(WorkerError::io(&merges_path))?;
    Ok(())
}

/// Copies every file of `source` (recursively) except weights.
fn copy_non_weight_files(source: &Path, destination: &Path) -> Result<()> {
    std::fs::create_dir_all(destination).map_err(WorkerError::io(destination))?;
    let entries = std::fs::read_dir(source).map_err(WorkerError::io(source))?;
    for entry in entries {
        let path = entry.map_err(WorkerError::io(source))?.path();
        let target = destination.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            copy_non_weight_files(&path, &target)?;
            continue;
        }
        let is_weights = path
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| matches!(extension, "safetensors" | "bin" | "ckpt" | "pt"));
        if !is_weights {
            std::fs::copy(&path, &target).map_err(WorkerError::io(&path))?;
        }
    }
    Ok(())
}
