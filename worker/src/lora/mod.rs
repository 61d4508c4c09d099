//! LoRA as kohya-ss/sd-scripts' `networks/lora.py` defines it (docs/architecture.md §4): for each
//! adapted layer a down projection (rank r) and an up projection, the layer computing
//! `base(x) + up(dropout(down(x))) · alpha/r`. A linear layer (and a 1x1 convolution) gets linear
//! (1x1) projections; a 3x3 convolution (LoCon) gets a down convolution with the layer's kernel,
//! stride and padding and a 1x1 up convolution, at `lora.conv_rank`/`conv_alpha`.
//!
//! Initialisation is kohya's: down from kaiming-uniform with a = √5 (uniform in ±1/√fan_in), up
//! zero, so a new network leaves the model's output unchanged. Variables live in the network's
//! own `VarStore` under kohya's key names (`lora_unet_<module path, '.' → '_'>.lora_down.weight`,
//! `lora_te_…` for the text encoder), so the trainable list, checkpoints and the export share one
//! naming; [`kohya_file`] writes the file people share and reads it back.
//!
//! The network attaches itself to the models' [`AdaptableSite`]s (worker/src/layer_adapter.rs).

pub mod kohya_file;
pub mod merge;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arbor_common::config::{LoraSection, LoraTarget};
use tch::{nn, Device, Tensor};

use crate::error::{Result, WorkerError};
use crate::layer_adapter::{AdaptableSite, LayerAdapter, LayerRole, LayerShape};

/// kohya's name prefix of the UNet's modules.
pub const KOHYA_UNET_PREFIX: &str = "lora_unet";
/// kohya's name prefix of the text encoder's modules.
pub const KOHYA_TEXT_ENCODER_PREFIX: &str = "lora_te";

/// kohya's module name: `<prefix>_<module path with '.' as '_'>`.
pub fn kohya_module_name(prefix: &str, module_path: &str) -> String {
    format!("{prefix}_{}", module_path.replace('.', "_"))
}

/// The layer roles `lora.targets` selects in the UNet.
pub fn unet_roles(targets: &[LoraTarget]) -> Vec<LayerRole> {
    targets
        .iter()
        .map(|target| match target {
            LoraTarget::Attention => LayerRole::AttentionProjection,
            LoraTarget::FeedForward => LayerRole::FeedForward,
            LoraTarget::Projections => LayerRole::TransformerProjection,
            LoraTarget::ResnetConv => LayerRole::ResnetConv,
        })
        .collect()
}

/// Rank, alpha and dropout of a network (`[lora]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: i64,
    pub alpha: f64,
    pub conv_rank: i64,
    pub conv_alpha: f64,
    pub dropout: f64,
}

impl LoraSettings {
    pub fn from_section(section: &LoraSection) -> Self {
        Self {
            rank: i64::from(section.rank),
            alpha: section.linear_alpha(),
            conv_rank: i64::from(section.conv_rank()),
            conv_alpha: section.conv_alpha(),
            dropout: section.dropout,
        }
    }

    /// The rank and alpha of a layer: the conv pair for kernels above 1x1, else the linear pair
    /// (kohya's rule: 1x1 convolutions count as linear).
    fn rank_and_alpha(&self, shape: &LayerShape) -> (i64, f64) {
        match shape {
            LayerShape::Conv2d { kernel, .. } if *kernel > 1 => (self.conv_rank, self.conv_alpha),
            _ => (self.rank, self.alpha),
        }
    }
}

/// One adapted layer of a network.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModuleInfo {
    /// kohya's module name (`lora_unet_down_blocks_0_attentions_0_proj_in`).
    pub name: String,
    pub rank: i64,
    pub alpha: f64,
    pub shape: LayerShape,
}

impl LoraModuleInfo {
    /// The update's scale, alpha/rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The shapes of `lora_down.weight` and `lora_up.weight`.
    pub fn weight_shapes(&self) -> (Vec<i64>, Vec<i64>) {
        let rank = self.rank;
        match self.shape {
            LayerShape::Linear {
                in_features,
                out_features,
            } => (vec![rank, in_features], vec![out_features, rank]),
            LayerShape::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => (
                vec![rank, in_channels, kernel, kernel],
                vec![out_channels, rank, 1, 1],
            ),
        }
    }
}

/// The adapter a network attaches to one layer: shallow clones of its two variables.
#[derive(Debug)]
struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
    dropout: f64,
    shape: LayerShape,
    training: Arc<AtomicBool>,
}

impl LayerAdapter for LoraAdapter {
    fn delta(&self, input: &Tensor) -> Tensor {
        let hidden = match self.shape {
            LayerShape::Linear { .. } => input.linear(&self.down, None::<Tensor>),
            LayerShape::Conv2d {
                stride, padding, ..
            } => input.conv2d(
                &self.down,
                None::<Tensor>,
                [stride, stride],
                [padding, padding],
                [1, 1],
                1,
            ),
        };
        let hidden = if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            hidden.dropout(self.dropout, true)
        } else {
            hidden
        };
        let update = match self.shape {
            LayerShape::Linear { .. } => hidden.linear(&self.up, None::<Tensor>),
            LayerShape::Conv2d { .. } => {
                hidden.conv2d(&self.up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            }
        };
        update * self.scale
    }
}

/// The layers of one model component a network adapts: kohya's prefix, the component's sites,
/// and the roles to adapt.
pub struct AdaptedComponent<'a> {
    pub kohya_prefix: &'static str,
    pub sites: Vec<AdaptableSite<'a>>,
    pub roles: Vec<LayerRole>,
}

/// A LoRA network attached to a model.
pub struct LoraNetwork {
    var_store: nn::VarStore,
    modules: Vec<LoraModuleInfo>,
    settings: LoraSettings,
    training: Arc<AtomicBool>,
}

impl std::fmt::Debug for LoraNetwork {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LoraNetwork")
            .field("modules", &self.modules.len())
            .field("settings", &self.settings)
            .finish()
    }
}

impl LoraNetwork {
    /// Creates a module for every site whose role is selected and attaches it, in the sites'
    /// order (seed with `tch::manual_seed` first: every rank must start from the same weights).
    pub fn attach(
        components: &[AdaptedComponent<'_>],
        settings: LoraSettings,
        device: Device,
    ) -> Result<Self> {
        let var_store = nn::VarStore::new(device);
        let training = Arc::new(AtomicBool::new(true));
        let mut modules = Vec::new();
        for component in components {
            for site in &component.sites {
                if !component.roles.contains(&site.role) {
                    continue;
                }
                let name = kohya_module_name(component.kohya_prefix, site.name);
                let (rank, alpha) = settings.rank_and_alpha(&site.shape);
                let module = LoraModuleInfo {
                    name,
                    rank,
                    alpha,
                    shape: site.shape,
                };
                let (down_shape, up_shape) = module.weight_shapes();
                let fan_in: i64 = down_shape[1..].iter().product();
                let bound = 1.0 / (fan_in as f64).sqrt();
                let path = var_store.root() / module.name.as_str();
                let down = (&path / "lora_down").var(
                    "weight",
                    &down_shape,
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                );
                let up = (&path / "lora_up").var("weight", &up_shape, nn::Init::Const(0.0));
                site.attach(Box::new(LoraAdapter {
                    down,
                    up,
                    scale: module.scale(),
                    dropout: settings.dropout,
                    shape: site.shape,
                    training: Arc::clone(&training),
                }))
                .map_err(|already| {
                    WorkerError::Training(format!(
                        "layer `{}` already has an adapter: a model takes one LoRA network",
                        already.0
                    ))
                })?;
                modules.push(module);
            }
        }
        if modules.is_empty() {
            return Err(WorkerError::Training(
                "lora.targets selects no layer of this model".to_string(),
            ));
        }
        Ok(Self {
            var_store,
            modules,
            settings,
            training,
        })
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.var_store
    }

    pub fn modules(&self) -> &[LoraModuleInfo] {
        &self.modules
    }

    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Dropout on (training) or off (sampling, validation).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The network's tensors in kohya's layout: `<name>.lora_down.weight`,
    /// `<name>.lora_up.weight` and the 0-dim `<name>.alpha`, detached on the CPU, sorted by name.
    /// `weights` replaces the variables by name (the EMA shadow) when given.
    pub fn kohya_tensors(&self, weights: Option<&[(String, Tensor)]>) -> Vec<(String, Tensor)> {
        let variables = self.var_store.variables();
        let mut tensors: Vec<(String, Tensor)> = variables
            .into_iter()
            .map(|(name, tensor)| {
                let replacement = weights.and_then(|weights| {
                    weights
                        .iter()
                        .find(|(candidate, _)| *candidate == name)
                        .map(|(_, tensor)| tensor.shallow_clone())
                });
                let tensor = replacement.unwrap_or(tensor);
                (name, tensor.detach().to_device(Device::Cpu).contiguous())
            })
            .collect();
        for module in &self.modules {
            tensors.push((
                format!("{}.alpha", module.name),
                Tensor::from(module.alpha as f32),
            ));
        }
        tensors.sort_by(|left, right| left.0.cmp(&right.0));
        tensors
    }
}
