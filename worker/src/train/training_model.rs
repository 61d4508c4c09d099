//! The model as a training run holds it (docs/architecture.md §4): the tokenizer and prompt
//! framing, the CLIP text encoder, the UNet, the VAE, the DDPM schedule with the job's prediction
//! type, and in `hypernetwork` mode the hypernetwork — with exactly the parameters of the mode
//! trainable:
//!
//! - `finetune`: the UNet, plus the text encoder when `model.train_text_encoder`;
//! - `hypernetwork`: only the hypernetwork modules; CLIP, UNet and VAE are frozen;
//! - `lora`: only the LoRA modules (worker/src/lora/) on the UNet layers of `lora.targets`, and on
//!   the text encoder's with `model.train_text_encoder`; CLIP, UNet and VAE are frozen, and on
//!   CUDA with bf16 the frozen UNet and text encoder are held in bf16.
//!
//! Trainable tensors are named `unet.<name>`, `text_encoder.<name>`, `hypernetwork.<name>` and
//! `lora.<kohya name>`, so one flat list serves AdamW, EMA, checkpoints and the gradient
//! all-reduce.
//!
//! Mixed precision: on CUDA with `train.mixed_precision = "bf16"` the forward passes run under
//! libtorch's autocast with bf16 as the CUDA autocast dtype (parameters and optimizer state stay
//! fp32); on the CPU everything is fp32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbor_c10d::aten_ops::{set_autocast_dtype, AutocastDevice};
pub use arbor_common::config::TrainingMode;
use arbor_common::config::{JobConfig, MixedPrecision};
use tch::{nn, Device, Kind, Tensor};
use tracing::info;

use crate::attention::KvContextTransform;
use crate::clip::ClipTextModel;
use crate::ddpm::DdpmSchedule;
use crate::device::host_to_device;
use crate::error::{Result, WorkerError};
use crate::hypernetwork::module::HypernetworkStructure;
use crate::hypernetwork::shallow_penalty::ShallowPenalty;
use crate::hypernetwork::{Hypernetwork, HypernetworkInfo};
use crate::layer_adapter::AdaptableLayers;
use crate::lora::{
    unet_roles, AdaptedComponent, LoraNetwork, LoraSettings, KOHYA_TEXT_ENCODER_PREFIX,
    KOHYA_UNET_PREFIX,
};
use crate::model_components::ModelComponents;
use crate::prompt::{PromptFraming, PromptLayout};
use crate::tokenizer::ClipTokenizer;
use crate::train::metrics_log::TokenLengthHistogram;
use crate::train::train_step::{weighted_diffusion_loss, DiffusionBatch};
use crate::unet_2d::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::export::NamedTensors;
use crate::weights::Component;

pub const UNET_PREFIX: &str = "unet.";
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";
pub const HYPERNETWORK_PREFIX: &str = "hypernetwork.";
pub const LORA_PREFIX: &str = "lora.";

/// The components of a run, loaded once per process.
pub struct TrainingModel {
    pub device: Device,
    pub mode: TrainingMode,
    pub model_path: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub framing: PromptFraming,
    /// `model.prompt_layout`: how the chunks' states are joined, in training and sampling.
    pub prompt_layout: PromptLayout,
    pub clip_skip: usize,
    pub text_encoder_store: nn::VarStore,
    pub text_encoder: ClipTextModel,
    pub unet_store: nn::VarStore,
    pub unet: UNet2DConditionModel,
    pub vae_store: nn::VarStore,
    pub vae: AutoencoderKL,
    pub schedule: DdpmSchedule,
    pub hypernetwork: Option<Hypernetwork>,
    pub lora: Option<LoraNetwork>,
    /// The text encoder's own weights train (`finetune` mode with `model.train_text_encoder`).
    pub train_text_encoder: bool,
    /// The text encoder runs with gradient: its weights or its LoRA modules train.
    text_encoder_in_graph: bool,
    /// bf16 autocast around the forward passes (CUDA only).
    pub autocast_bf16: bool,
    /// `train.min_snr_gamma`: min-SNR-γ loss weighting, when set.
    pub min_snr_gamma: Option<f64>,
    /// `train.noise_offset`: the strength of offset noise (0: none).
    pub noise_offset: f64,
}

impl std::fmt::Debug for TrainingModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TrainingModel")
            .field("device", &self.device)
            .field("mode", &self.mode)
            .field("model_path", &self.model_path)
            .field("train_text_encoder", &self.train_text_encoder)
            .field("autocast_bf16", &self.autocast_bf16)
            .finish()
    }
}

/// Sorted `(prefix + name, variable)` of a VarStore (shallow clones share storage).
fn prefixed_variables(store: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = store
        .variables()
        .into_iter()
        .map(|(name, tensor)| (format!("{prefix}{name}"), tensor))
        .collect();
    variables.sort_by(|left, right| left.0.cmp(&right.0));
    variables
}

/// The tokenizer folder: the diffusers folder's own, or `tokenizer/` beside a single file.
fn tokenizer_for(model_path: &Path) -> Result<ClipTokenizer> {
    if model_path.is_dir() {
        return ClipTokenizer::from_model_dir(model_path);
    }
    let beside = model_path
        .parent()
        .map(|parent| parent.join("tokenizer"))
        .filter(|folder| folder.is_dir())
        .ok_or_else(|| WorkerError::Config {
            path: model_path.to_path_buf(),
            field: "model.path".to_string(),
            message: "a single-file model needs a `tokenizer/` folder beside it".to_string(),
        })?;
    ClipTokenizer::from_tokenizer_dir(&beside)
}

impl TrainingModel {
    /// Loads the model of `config.model.path` on `device` and sets what trains. In hypernetwork
    /// mode the modules are initialised right after `tch::manual_seed(job.seed)`, so every rank
    /// starts from identical weights.
    pub fn load(config: &JobConfig, device: Device) -> Result<Self> {
        let mode = config.model.mode;
        let model_path = PathBuf::from(&config.model.path);
        let components = ModelComponents::open(&model_path, None, &Component::ALL, device)?;
        let tokenizer = tokenizer_for(&model_path)?;
        let framing = PromptFraming::for_tokenizer(&tokenizer, config.model.max_chunks as usize);
        let (mut text_encoder_store, text_encoder) = components.text_encoder()?;
        let (mut unet_store, unet) = components.unet()?;
        let (mut vae_store, vae) = components.vae()?;
        let mut scheduler_config = components.schedule()?.config().clone();
        scheduler_config.prediction_type = config.model.prediction_type;
        let mut schedule = DdpmSchedule::new(&scheduler_config);
        schedule.keep_on(device);
        let train_text_encoder = mode == TrainingMode::Finetune && config.model.train_text_encoder;
        let lora_text_encoder = mode == TrainingMode::Lora && config.model.train_text_encoder;
        vae_store.freeze();
        if !train_text_encoder {
            text_encoder_store.freeze();
        }
        let autocast_bf16 =
            device.is_cuda() && config.train.mixed_precision == MixedPrecision::Bf16;
        let hypernetwork = match mode {
            TrainingMode::Finetune | TrainingMode::Lora => None,
            TrainingMode::Hypernetwork => {
                unet_store.freeze();
                Some(build_hypernetwork(config, device)?)
            }
        };
        let lora = match mode {
            TrainingMode::Finetune | TrainingMode::Hypernetwork => None,
            TrainingMode::Lora => {
                unet_store.freeze();
                if autocast_bf16 {
                    // Frozen weights need no fp32 master copy; autocast runs in bf16 anyway.
                    unet_store.bfloat16();
                    text_encoder_store.bfloat16();
                }
                let mut components = vec![AdaptedComponent {
                    kohya_prefix: KOHYA_UNET_PREFIX,
                    sites: unet.all_adaptable_sites(),
                    roles: unet_roles(&config.lora.targets),
                }];
                if lora_text_encoder {
                    components.push(AdaptedComponent {
                        kohya_prefix: KOHYA_TEXT_ENCODER_PREFIX,
                        sites: text_encoder.all_adaptable_sites(),
                        roles: vec![crate::layer_adapter::LayerRole::TextEncoder],
                    });
                }
                tch::manual_seed(config.job.seed as i64);
                Some(LoraNetwork::attach(
                    &components,
                    LoraSettings::from_section(&config.lora),
                    device,
                )?)
            }
        };
        if autocast_bf16 {
            // tch's `autocast` has no dtype argument and libtorch's CUDA default is fp16.
            set_autocast_dtype(AutocastDevice::Cuda, Kind::BFloat16)
                .map_err(WorkerError::AtenOp)?;
        }
        let model = Self {
            device,
            mode,
            model_path,
            tokenizer,
            framing,
            prompt_layout: config.model.prompt_layout,
            clip_skip: config.model.clip_skip as usize,
            text_encoder_store,
            text_encoder,
            unet_store,
            unet,
            vae_store,
            vae,
            schedule,
            hypernetwork,
            lora,
            train_text_encoder,
            text_encoder_in_graph: train_text_encoder || lora_text_encoder,
            autocast_bf16,
            min_snr_gamma: config.train.min_snr_gamma,
            noise_offset: config.train.noise_offset,
        };
        let trainable = model.trainable();
        let trainable_elements: i64 = trainable
            .iter()
            .map(|(_, tensor)| tensor.numel() as i64)
            .sum();
        info!(
            mode = mode.as_str(),
            device = ?device,
            tensors = trainable.len(),
            parameters = trainable_elements,
            autocast_bf16,
            "model loaded"
        );
        Ok(model)
    }

    /// The trainable tensors, sorted by their prefixed names (shallow clones of the variables).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        match self.mode {
            TrainingMode::Hypernetwork => self
                .hypernetwork
                .as_ref()
                .map(|hypernetwork| {
                    prefixed_variables(hypernetwork.var_store(), HYPERNETWORK_PREFIX)
                })
                .unwrap_or_default(),
            TrainingMode::Lora => self
                .lora
                .as_ref()
                .map(|lora| prefixed_variables(lora.var_store(), LORA_PREFIX))
                .unwrap_or_default(),
            TrainingMode::Finetune => {
                let mut trainable = prefixed_variables(&self.unet_store, UNET_PREFIX);
                if self.train_text_encoder {
                    trainable.extend(prefixed_variables(
                        &self.text_encoder_store,
                        TEXT_ENCODER_PREFIX,
                    ));
                }
                trainable.sort_by(|left, right| left.0.cmp(&right.0));
                trainable
            }
        }
    }

    /// Runs `f` under bf16 autocast when the run uses it.
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.autocast_bf16 {
            tch::autocast(true, f)
        } else {
            f()
        }
    }

    /// Tokenizes captions, records their lengths, frames them to the batch's chunk count
    /// (at most `model.max_chunks`) and encodes them with CLIP at `clip_skip`: [B, 77·n, D].
    /// Without gradient unless the text encoder trains.
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        histogram: Option<&mut TokenLengthHistogram>,
    ) -> Result<Tensor> {
        let ids: Vec<Vec<i64>> = prompts
            .iter()
            .map(|prompt| self.tokenizer.encode(prompt))
            .collect();
        if let Some(histogram) = histogram {
            for prompt_ids in &ids {
                histogram.record(prompt_ids.len());
            }
        }
        let framed = host_to_device(&self.framing.frame_batch(&ids).to_tensor(), self.device)?;
        self.encode_framed(&framed)
    }

    /// Encodes framed ids [B, 77·n].
    pub fn encode_framed(&self, framed: &Tensor) -> Result<Tensor> {
        let encode = || {
            self.autocast(|| {
                self.text_encoder
                    .encode_chunked(framed, self.clip_skip, self.prompt_layout)
            })
        };
        if self.text_encoder_in_graph {
            encode()
        } else {
            tch::no_grad(encode)
        }
    }

    /// Images in [-1, 1] [B, 3, H, W] → latents sampled from the VAE posterior, times the VAE's
    /// scaling factor; never with gradient. Uses the global RNG (seeded per step by the caller).
    pub fn encode_images(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let posterior = self.autocast(|| self.vae.encode(pixels));
            posterior.sample().to_kind(Kind::Float) * self.vae.scaling_factor()
        })
    }

    /// The noise of a training step for `latents` [B, C, H, W], from the global RNG: N(0, 1),
    /// plus `noise_offset · N(0, 1)` per sample and channel when offset noise is on (the form
    /// diffusers' and kohya's training scripts use).
    pub fn training_noise(&self, latents: &Tensor) -> Tensor {
        let noise = latents.randn_like();
        if self.noise_offset == 0.0 {
            return noise;
        }
        let size = latents.size();
        let offset = Tensor::randn([size[0], size[1], 1, 1], (latents.kind(), latents.device()));
        noise + offset * self.noise_offset
    }

    /// The diffusion loss of one micro-batch (plus the hypernetwork's optional depth-weighted
    /// L2 penalty), attached to the graph, as an fp32 scalar.
    pub fn loss(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let kv_transform = self
            .hypernetwork
            .as_ref()
            .map(|hypernetwork| hypernetwork as &dyn KvContextTransform);
        let batch = DiffusionBatch {
            latents,
            noise,
            timesteps,
            encoder_hidden_states: context,
        };
        let loss = self.autocast(|| {
            weighted_diffusion_loss(
                &self.unet,
                &self.schedule,
                &batch,
                kv_transform,
                self.min_snr_gamma,
            )
        })?;
        let loss = loss.loss.to_kind(Kind::Float);
        Ok(match &self.hypernetwork {
            Some(hypernetwork) => loss + hypernetwork.take_l2_penalty().to_kind(Kind::Float),
            None => loss,
        })
    }

    /// The plain diffusion loss of a batch (no min-SNR weighting, no hypernetwork L2 penalty),
    /// as an fp32 scalar: what the validation loss measures.
    pub fn plain_loss(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let kv_transform = self
            .hypernetwork
            .as_ref()
            .map(|hypernetwork| hypernetwork as &dyn KvContextTransform);
        let batch = DiffusionBatch {
            latents,
            noise,
            timesteps,
            encoder_hidden_states: context,
        };
        let loss = self.autocast(|| {
            weighted_diffusion_loss(&self.unet, &self.schedule, &batch, kv_transform, None)
        })?;
        if let Some(hypernetwork) = &self.hypernetwork {
            // Terms a penalised hypernetwork recorded in this forward are not part of it.
            let _ = hypernetwork.take_l2_penalty();
        }
        Ok(loss.loss.to_kind(Kind::Float))
    }

    /// Turns the trained modules' dropout on (training) or off; returns the previous setting.
    pub fn set_training(&mut self, training: bool) -> bool {
        let mut was = true;
        if let Some(hypernetwork) = self.hypernetwork.as_mut() {
            was = hypernetwork.train;
            hypernetwork.train = training;
        }
        if let Some(lora) = &self.lora {
            was = lora.is_training();
            lora.set_training(training);
        }
        was
    }

    /// The model's weights for an export, by component, in diffusers naming. `trained`
    /// replaces the trainable tensors by name (for example the EMA shadow).
    pub fn export_components(
        &self,
        trained: Option<&[(String, Tensor)]>,
    ) -> BTreeMap<Component, NamedTensors> {
        let collect = |store: &nn::VarStore, prefix: &str| -> NamedTensors {
            store
                .variables()
                .into_iter()
                .map(|(name, tensor)| {
                    let replacement = trained.and_then(|trained| {
                        let full = format!("{prefix}{name}");
                        trained
                            .iter()
                            .find(|(candidate, _)| *candidate == full)
                            .map(|(_, tensor)| tensor.shallow_clone())
                    });
                    let tensor = replacement.unwrap_or(tensor);
                    (name, tensor.detach().to_device(Device::Cpu).contiguous())
                })
                .collect()
        };
        BTreeMap::from([
            (
                Component::TextEncoder,
                collect(&self.text_encoder_store, TEXT_ENCODER_PREFIX),
            ),
            (Component::Unet, collect(&self.unet_store, UNET_PREFIX)),
            (Component::Vae, collect(&self.vae_store, "vae.")),
        ])
    }
}

/// The hypernetwork of `[hypernetwork]`, initialised after `tch::manual_seed(job.seed)`.
fn build_hypernetwork(config: &JobConfig, device: Device) -> Result<Hypernetwork> {
    let section = &config.hypernetwork;
    let structure = HypernetworkStructure {
        layer_structure: section.layer_structure.clone(),
        activation: section.activation,
        is_layer_norm: section.layer_norm,
        weight_init: section.weight_init,
        dropout_structure: HypernetworkStructure::a1111_dropout_structure(
            &section.layer_structure,
            section.dropout,
            section.last_layer_dropout,
        ),
        activate_output: section.activate_output,
    };
    let sizes: Vec<i64> = section.sizes.iter().map(|size| i64::from(*size)).collect();
    tch::manual_seed(config.job.seed as i64);
    let mut hypernetwork = Hypernetwork::new(
        &sizes,
        structure,
        HypernetworkInfo {
            name: config.job.name.clone(),
            step: 0,
            sd_checkpoint: None,
            sd_checkpoint_name: Path::new(&config.model.path)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned()),
        },
        device,
    )?;
    hypernetwork.train = true;
    if !section.shallow_penalty.is_empty() || section.l2_penalty > 0.0 {
        let level_weights = if section.shallow_penalty.is_empty() {
            vec![1.0]
        } else {
            section.shallow_penalty.clone()
        };
        hypernetwork.set_shallow_penalty(Some(ShallowPenalty {
            level_weights,
            l2_strength: section.l2_penalty,
            l2_level_weights: section.l2_penalty_weights.clone(),
        }))?;
    }
    Ok(hypernetwork)
}
