//! Reading a component's tensors (in diffusers naming) and copying them into a VarStore.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};
use tracing::{debug, warn};

use crate::error::{Result, WorkerError};
use crate::weights::key_map::{normalize_clip_key, Component, KeyMap, Reshape};
use crate::weights::model_source::pickle_refusal;

/// Keys a checkpoint may hold that no module reads (buffers transformers recomputes).
const IGNORED_SUFFIXES: [&str; 1] = ["embeddings.position_ids"];

/// One component's tensors, keyed by diffusers/transformers state-dict names (CLIP keys start
/// with `text_model.`), with the file they came from for error messages.
#[derive(Debug)]
pub struct ComponentTensors {
    pub component: Component,
    pub source: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    /// Tensors of the file that no variable of the model took.
    pub unused: Vec<String>,
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|source| WorkerError::Weights {
        path: path.to_path_buf(),
        message: format!("cannot be read as safetensors: {source}"),
    })
}

/// Reads `ROOT/<component folder>/*.safetensors` (one file or shards).
pub fn read_diffusers_component(root: &Path, component: Component) -> Result<ComponentTensors> {
    let folder = root.join(component.diffusers_folder());
    let entries = std::fs::read_dir(&folder).map_err(WorkerError::io(&folder))?;
    let mut safetensors_files = Vec::new();
    let mut pickles = Vec::new();
    for entry in entries {
        let path = entry.map_err(WorkerError::io(&folder))?.path();
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("safetensors") => safetensors_files.push(path),
            Some("bin" | "ckpt" | "pt" | "pth") => pickles.push(path),
            _ => {}
        }
    }
    safetensors_files.sort();
    if safetensors_files.is_empty() {
        if let Some(pickle) = pickles.first() {
            return Err(pickle_refusal(pickle));
        }
        return Err(WorkerError::Weights {
            path: folder,
            message: "holds no .safetensors weights".to_string(),
        });
    }
    let mut tensors = BTreeMap::new();
    for file in &safetensors_files {
        for (name, tensor) in read_safetensors(file)? {
            let name = match component {
                Component::TextEncoder => normalize_clip_key(&name),
                _ => name,
            };
            tensors.insert(name, tensor);
        }
    }
    debug!(component = ?component, tensors = tensors.len(), folder = %folder.display(), "read diffusers component");
    Ok(ComponentTensors {
        component,
        source: safetensors_files.swap_remove(0),
        tensors,
    })
}

/// Reads a single-file LDM checkpoint and splits it into components in diffusers naming.
/// Keys outside the components (EMA copies, `alphas_cumprod`, …) are counted and skipped.
pub fn read_single_file(path: &Path) -> Result<HashMap<Component, ComponentTensors>> {
    let named = read_safetensors(path)?;
    let key_map = KeyMap::from_ldm_keys(named.iter().map(|(name, _)| name.as_str()));
    let mut components: HashMap<Component, ComponentTensors> = HashMap::new();
    let mut skipped = 0usize;
    for (name, tensor) in named {
        let Some(mapped) = key_map.to_diffusers(&name) else {
            skipped += 1;
            debug!(key = %name, "single-file key outside the model components");
            continue;
        };
        let tensor = match mapped.reshape {
            Reshape::LinearConv1x1 if tensor.dim() == 4 => tensor.flatten(1, 3),
            _ => tensor,
        };
        components
            .entry(mapped.component)
            .or_insert_with(|| ComponentTensors {
                component: mapped.component,
                source: path.to_path_buf(),
                tensors: BTreeMap::new(),
            })
            .tensors
            .insert(mapped.key, tensor);
    }
    if skipped > 0 {
        warn!(skipped, file = %path.display(), "single-file keys outside the model components were skipped");
    }
    Ok(components)
}

/// Copies `tensors` into every variable of `var_store` (whose paths are diffusers names).
/// A variable without a tensor, or with a tensor of another shape, is an error naming the key
/// and both shapes. Tensors are converted to the variable's kind and device.
pub fn load_into_var_store(
    var_store: &nn::VarStore,
    tensors: &ComponentTensors,
) -> Result<LoadReport> {
    let source_name = tensors.source.display().to_string();
    let mut variables: Vec<(String, Tensor)> = var_store.variables().into_iter().collect();
    variables.sort_by(|left, right| left.0.cmp(&right.0));
    let mut used = std::collections::BTreeSet::new();
    let _guard = tch::no_grad_guard();
    for (name, mut variable) in variables {
        let expected = variable.size();
        let Some(value) = tensors.tensors.get(&name) else {
            return Err(WorkerError::MissingTensor {
                key: name,
                source_name,
                expected,
            });
        };
        let actual = value.size();
        if actual != expected {
            return Err(WorkerError::TensorShape {
                key: name,
                source_name,
                expected,
                actual,
            });
        }
        variable
            .f_copy_(&value.to_device(variable.device()).to_kind(variable.kind()))
            .map_err(WorkerError::torch(format!("copying tensor `{name}`")))?;
        used.insert(name);
    }
    let unused: Vec<String> = tensors
        .tensors
        .keys()
        .filter(|key| !used.contains(*key))
        .filter(|key| !IGNORED_SUFFIXES.iter().any(|suffix| key.ends_with(suffix)))
        .cloned()
        .collect();
    if !unused.is_empty() {
        warn!(component = ?tensors.component, unused = unused.len(), first = %unused[0], "tensors of the checkpoint no variable took");
    }
    Ok(LoadReport {
        loaded: used.len(),
        unused,
    })
}
