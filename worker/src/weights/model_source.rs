//! Where a model's weights come from: a diffusers folder or a single-file LDM safetensors.
//! Pickled checkpoints (`.ckpt`, `.pt`, `.bin`, `.pth`) are refused: unpickling runs code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, WorkerError};
use crate::weights::key_map::Component;
use crate::weights::state_dict::{read_diffusers_component, read_single_file, ComponentTensors};

const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// A model given on the command line or in a job config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers folder: model_index.json, text_encoder/, unet/, vae/, … (any subset).
    Diffusers { root: PathBuf },
    /// A single-file LDM/CompVis safetensors (A1111/ComfyUI style).
    SingleFile { path: PathBuf },
}

/// The message telling a user how to turn a pickle into safetensors.
pub fn pickle_refusal(path: &Path) -> WorkerError {
    let shown = path.display();
    WorkerError::Weights {
        path: path.to_path_buf(),
        message: format!(
            "is a pickled checkpoint, which arbor refuses to load (unpickling can run arbitrary \
             code); convert it to safetensors once, in a trusted environment, with: python -c \
             \"import torch, safetensors.torch as st; sd = torch.load('{shown}', \
             map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); \
             st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, \
             torch.Tensor)}}, '{shown}.safetensors')\" and pass the .safetensors file"
        ),
    }
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            PICKLE_EXTENSIONS.contains(&extension.to_ascii_lowercase().as_str())
        })
}

impl ModelSource {
    /// Classifies `path`: a folder is a diffusers model, a `.safetensors` file a single-file
    /// checkpoint; pickles and anything else are refused with a message naming the path.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(ModelSource::Diffusers {
                root: path.to_path_buf(),
            });
        }
        if is_pickle(path) {
            return Err(pickle_refusal(path));
        }
        if !path.is_file() {
            return Err(WorkerError::Weights {
                path: path.to_path_buf(),
                message: "does not exist (expected a diffusers folder or a .safetensors file)"
                    .to_string(),
            });
        }
        let is_safetensors = path
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| extension.eq_ignore_ascii_case("safetensors"));
        if !is_safetensors {
            return Err(WorkerError::Weights {
                path: path.to_path_buf(),
                message: "is neither a diffusers folder nor a .safetensors file".to_string(),
            });
        }
        Ok(ModelSource::SingleFile {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Diffusers { root } => root,
            ModelSource::SingleFile { path } => path,
        }
    }

    /// The diffusers folder the component configs are read from, if this is one.
    pub fn diffusers_root(&self) -> Option<&Path> {
        match self {
            ModelSource::Diffusers { root } => Some(root),
            ModelSource::SingleFile { .. } => None,
        }
    }

    /// Reads the tensors of `components` in diffusers naming. A diffusers folder without a
    /// component's folder, or a single file without its keys, leaves it out of the map.
    pub fn read_components(
        &self,
        components: &[Component],
    ) -> Result<HashMap<Component, ComponentTensors>> {
        match self {
            ModelSource::Diffusers { root } => {
                let mut read = HashMap::new();
                for &component in components {
                    if root.join(component.diffusers_folder()).is_dir() {
                        read.insert(component, read_diffusers_component(root, component)?);
                    }
                }
                Ok(read)
            }
            ModelSource::SingleFile { path } => {
                let mut all = read_single_file(path)?;
                all.retain(|component, _| components.contains(component));
                Ok(all)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckpt_files_are_refused_with_a_conversion_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ckpt = dir.path().join("model.ckpt");
        std::fs::write(&ckpt, b"not really a pickle").expect("write");
        let error = ModelSource::open(&ckpt).expect_err("pickles are refused");
        let message = error.to_string();
        assert!(message.contains("model.ckpt"), "{message}");
        assert!(message.contains("safetensors.torch"), "{message}");
    }

    #[test]
    fn folders_and_safetensors_are_classified() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            ModelSource::open(dir.path()),
            Ok(ModelSource::Diffusers { .. })
        ));
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            ModelSource::open(&file),
            Ok(ModelSource::SingleFile { .. })
        ));
        let missing = ModelSource::open(&dir.path().join("absent.safetensors"));
        assert!(missing
            .expect_err("missing")
            .to_string()
            .contains("does not exist"));
    }
}
