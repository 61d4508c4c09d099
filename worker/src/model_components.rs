//! Building model components from a [`ModelSource`]: config resolution, VarStore, weights.
//!
//! A component's config comes from the diffusers folder itself, else from `config_dir` (a
//! diffusers folder of the same architecture, for single-file checkpoints of non-SD1 shapes),
//! else SD1's defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device};
use tracing::info;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::ddpm::{DdpmSchedule, SchedulerConfig};
use crate::error::{Result, WorkerError};
use crate::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::weights::{load_into_var_store, Component, ComponentTensors, ModelSource};

/// A model's tensors read once, from which components are built on demand.
pub struct ModelComponents {
    source: ModelSource,
    config_dir: Option<PathBuf>,
    tensors: HashMap<Component, ComponentTensors>,
    device: Device,
}

impl ModelComponents {
    /// Reads the tensors of `components` from `model` (a diffusers folder or a single file).
    pub fn open(
        model: &Path,
        config_dir: Option<&Path>,
        components: &[Component],
        device: Device,
    ) -> Result<Self> {
        let source = ModelSource::open(model)?;
        let tensors = source.read_components(components)?;
        Ok(Self {
            source,
            config_dir: config_dir.map(Path::to_path_buf),
            tensors,
            device,
        })
    }

    pub fn has(&self, component: Component) -> bool {
        self.tensors.contains_key(&component)
    }

    /// The `config.json` of a component, if the model or the config folder has one.
    pub fn config_path(&self, component: Component) -> Option<PathBuf> {
        self.find_config(component.diffusers_folder(), "config.json")
    }

    fn find_config(&self, folder: &str, file: &str) -> Option<PathBuf> {
        [self.source.diffusers_root(), self.config_dir.as_deref()]
            .into_iter()
            .flatten()
            .map(|root| root.join(folder).join(file))
            .find(|path| path.is_file())
    }

    /// The DDPM schedule of `scheduler/scheduler_config.json`, else SD1's.
    pub fn schedule(&self) -> Result<DdpmSchedule> {
        let config = match self.find_config("scheduler", "scheduler_config.json") {
            Some(path) => SchedulerConfig::from_diffusers_json(&path)?,
            None => SchedulerConfig::sd1(),
        };
        Ok(DdpmSchedule::new(&config))
    }

    fn tensors_of(&self, component: Component) -> Result<&ComponentTensors> {
        self.tensors
            .get(&component)
            .ok_or_else(|| WorkerError::Weights {
                path: self.source.path().to_path_buf(),
                message: format!(
                "has no {} weights (a diffusers folder needs {}/, a single file keys under `{}`)",
                component.diffusers_folder(),
                component.diffusers_folder(),
                component.ldm_prefix()
            ),
            })
    }

    fn load(&self, var_store: &nn::VarStore, component: Component) -> Result<()> {
        let tensors = self.tensors_of(component)?;
        let report = load_into_var_store(var_store, tensors)?;
        info!(component = ?component, loaded = report.loaded, unused = report.unused.len(), "weights loaded");
        Ok(())
    }

    /// The CLIP text encoder with its VarStore.
    pub fn text_encoder(&self) -> Result<(nn::VarStore, ClipTextModel)> {
        self.tensors_of(Component::TextEncoder)?;
        let config = match self.config_path(Component::TextEncoder) {
            Some(path) => ClipTextConfig::from_transformers_json(&path)?,
            None => ClipTextConfig::sd1(),
        };
        let var_store = nn::VarStore::new(self.device);
        let model = ClipTextModel::new(var_store.root(), &config);
        self.load(&var_store, Component::TextEncoder)?;
        Ok((var_store, model))
    }

    /// The UNet with its VarStore.
    pub fn unet(&self) -> Result<(nn::VarStore, UNet2DConditionModel)> {
        self.tensors_of(Component::Unet)?;
        let config = match self.config_path(Component::Unet) {
            Some(path) => UNet2DConditionConfig::from_diffusers_json(&path)?,
            None => UNet2DConditionConfig::sd1(),
        };
        let var_store = nn::VarStore::new(self.device);
        let model = UNet2DConditionModel::new(var_store.root(), &config);
        self.load(&var_store, Component::Unet)?;
        Ok((var_store, model))
    }

    /// The VAE with its VarStore.
    pub fn vae(&self) -> Result<(nn::VarStore, AutoencoderKL)> {
        self.tensors_of(Component::Vae)?;
        let config = match self.config_path(Component::Vae) {
            Some(path) => AutoencoderKLConfig::from_diffusers_json(&path)?,
            None => AutoencoderKLConfig::sd1(),
        };
        let var_store = nn::VarStore::new(self.device);
        let model = AutoencoderKL::new(var_store.root(), &config);
        self.load(&var_store, Component::Vae)?;
        Ok((var_store, model))
    }
}
