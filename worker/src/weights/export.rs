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
