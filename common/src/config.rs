//! The job configuration, `job.toml` (docs/architecture.md §7), validated once at the edge.
//!
//! Every key can be overridden by an environment variable `ARBOR_<SECTION>_<KEY>` (for example
//! `ARBOR_CLUSTER_MIN_WORKERS=2`) and by a flag (`--set cluster.min_workers=2`); see
//! [`JobConfig::load`]. Flags win over the environment, which wins over the file. Unknown
//! sections and keys are refused with their name. The token is never a config value: it comes
//! from `ARBOR_TOKEN` or the file named by `job.token_file`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::assign::{AspectMetric, AssignParams};
use crate::buckets::BucketParams;
use crate::config_choice;
pub use crate::config_choice::ConfigChoice;
use crate::error::{invalid, CommonError};
pub use crate::learning_rate::{LearningRate, ScheduleEntry};

/// The sections of `job.toml`, in the order they are documented.
pub const SECTIONS: [&str; 10] = [
    "job",
    "data",
    "buckets",
    "schedule",
    "cluster",
    "model",
    "train",
    "hypernetwork",
    "lora",
    "samples",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub job: JobSection,
    pub data: DataSection,
    #[serde(default)]
    pub buckets: BucketsSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub hypernetwork: HypernetworkSection,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub samples: SamplesSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    #[serde(default = "default_job_name")]
    pub name: String,
    /// Where state, ledger, metrics, samples, checkpoints and exports go.
    pub run_dir: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A file holding the shared job token (used when `ARBOR_TOKEN` is unset).
    #[serde(default)]
    pub token_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The JSON Lines manifest (docs/architecture.md §7).
    pub manifest: String,
    /// The dataset root that manifest keys are relative to; defaults to the manifest's folder.
    #[serde(default)]
    pub root: Option<String>,
    #[serde(default = "default_true")]
    pub tag_shuffle: bool,
    #[serde(default = "default_keep_tokens")]
    pub keep_tokens: u32,
    #[serde(default)]
    pub tag_dropout: f64,
    /// The probability that an item's caption becomes empty for a step, which trains the
    /// unconditional path classifier-free guidance samples from; drawn from the same
    /// `(seed, epoch, item)` stream as the tag shuffle, so a replay drops the same captions.
    #[serde(default)]
    pub caption_dropout: f64,
    /// Batches each rank loads ahead of the one training (0: load each batch when it is due).
    #[serde(default = "default_prefetch_batches")]
    pub prefetch_batches: u32,
    /// The data failure budget: a rank stops the job when more than this fraction of a
    /// `failure_window`-item window failed to load (1.0 turns the budget off).
    #[serde(default = "default_max_failed_fraction")]
    pub max_failed_fraction: f64,
    /// The items (per rank, most recent) over which `max_failed_fraction` is counted.
    #[serde(default = "default_failure_window")]
    pub failure_window: u32,
    /// A manifest of validation items (keys resolved like the training manifest's); items with
    /// the same id are left out of training.
    #[serde(default)]
    pub validation_manifest: Option<String>,
    /// Hold this fraction of the manifest's items out of training for the validation loss,
    /// picked by a hash of the item id, so the same items stay out as the dataset grows; 0 = off.
    #[serde(default)]
    pub validation_fraction: f64,
    /// The most validation items evaluated (those with the smallest id hashes).
    #[serde(default = "default_validation_max_items")]
    pub validation_max_items: u32,
    /// Where the latent cache lives (`train.cache_latents`): a path or an object store URL like
    /// the dataset's, shared across jobs and datasets. Unset: `<job.run_dir>/latent-cache`.
    #[serde(default)]
    pub latent_cache: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BucketsSection {
    pub max_area: u64,
    pub min_dim: u32,
    pub max_dim: u32,
    pub step: u32,
    pub base_res: [u32; 2],
    pub max_ar_error: f64,
    pub aspect_metric: AspectMetric,
}

impl Default for BucketsSection {
    fn default() -> Self {
        let buckets = BucketParams::default();
        let assign = AssignParams::default();
        Self {
            max_area: buckets.max_area,
            min_dim: buckets.min_dim,
            max_dim: buckets.max_dim,
            step: buckets.step,
            base_res: buckets.base_res,
            max_ar_error: assign.max_ar_error,
            aspect_metric: assign.aspect_metric,
        }
    }
}

impl BucketsSection {
    pub fn bucket_params(&self) -> BucketParams {
        BucketParams {
            max_area: self.max_area,
            min_dim: self.min_dim,
            max_dim: self.max_dim,
            step: self.step,
            base_res: self.base_res,
        }
    }

    pub fn assign_params(&self) -> AssignParams {
        AssignParams {
            aspect_metric: self.aspect_metric,
            max_ar_error: self.max_ar_error,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Per-rank batch size.
    pub bsz: u32,
    pub grad_accum: u32,
    pub epochs: u64,
    /// Stop after this many optimizer steps, whatever `epochs` says.
    pub max_steps: Option<u64>,
    /// Checkpoint every this many optimizer steps, and at every epoch's end (the coordinator
    /// schedules it; checkpoints always fall on an accumulation window's end).
    pub checkpoint_every: u64,
    /// Also checkpoint when this many minutes passed since the last complete checkpoint (the
    /// coordinator asks the running group, as `arbor checkpoint` does): bounds the work a
    /// preempted node can lose when steps are slow. Unset: only `checkpoint_every`.
    pub checkpoint_every_minutes: Option<f64>,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            bsz: 4,
            grad_accum: 1,
            epochs: 2,
            max_steps: None,
            checkpoint_every: 100,
            checkpoint_every_minutes: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub listen: String,
    pub metrics_listen: String,
    pub min_workers: u32,
    pub max_workers: u32,
    pub join_timeout_s: u64,
    pub heartbeat_interval_s: f64,
    pub heartbeat_timeout_s: f64,
    /// PEM certificate and key for TLS; both or neither.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Largest accepted request, in bytes.
    pub max_request_bytes: usize,
    /// Times a rank may report the same failure to start its trainer (a missing model, a
    /// corrupt checkpoint) before the job fails with it; each earlier one regroups.
    pub max_start_failures: u32,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            metrics_listen: "0.0.0.0:9090".into(),
            min_workers: 1,
            max_workers: 8,
            join_timeout_s: 600,
            heartbeat_interval_s: 2.0,
            heartbeat_timeout_s: 15.0,
            tls_cert: None,
            tls_key: None,
            max_request_bytes: 4 << 20,
            max_start_failures: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A diffusers folder or a single-file (LDM) safetensors.
    pub path: String,
    pub mode: TrainingMode,
    pub clip_skip: u32,
    pub max_chunks: u32,
    pub prediction_type: PredictionType,
    /// Also train the CLIP text encoder: its weights in `finetune` mode, LoRA modules on its
    /// attention and MLP layers in `lora` mode; refused in `hypernetwork` mode.
    pub train_text_encoder: bool,
    pub prompt_layout: PromptLayout,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            mode: TrainingMode::Hypernetwork,
            clip_skip: 2,
            max_chunks: 3,
            prediction_type: PredictionType::Epsilon,
            train_text_encoder: false,
            prompt_layout: PromptLayout::Chunked,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// A number or A1111's `rate:step, …` schedule.
    #[serde(deserialize_with = "number_or_string")]
    pub lr: String,
    pub optimizer: Optimizer,
    pub mixed_precision: MixedPrecision,
    /// Gradient clipping by global L2 norm; 0 turns it off.
    pub max_grad_norm: f64,
    /// Ignored when `lr` is an A1111 `rate:step, …` schedule.
    pub lr_scheduler: LrScheduler,
    /// Steps of linear warmup from 0 to the learning rate.
    pub lr_warmup_steps: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Decay of the exponential moving average of the trained weights; 0 turns EMA off.
    pub ema_decay: f64,
    /// Encode each image with the VAE once and train later epochs (and later jobs) from its
    /// cached latent distribution (`data.latent_cache`); the epochs' random crops are taken in
    /// latent space, at 8-pixel granularity.
    pub cache_latents: bool,
    /// Set by `arbor cache`: the job only fills the latent cache (one epoch; the workers load
    /// the VAE alone, encode what the cache misses, and train nothing).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fill_cache_only: bool,
    /// Every this many optimizer steps, the worker times the phases of the step (data wait,
    /// encode, forward, backward, all-reduce, optimizer) by waiting for the device at each
    /// boundary, and writes them to `metrics.jsonl` as `phase_seconds`; 0 turns it off. The
    /// default, 10, times the steps whose loss is read back anyway.
    pub time_phases_every: u64,
    /// Min-SNR loss weighting (Hang et al. 2023): each sample's loss is weighted by
    /// min(SNR(t), γ)/SNR(t) for epsilon prediction and min(SNR(t), γ)/(SNR(t)+1) for
    /// v-prediction, as diffusers' `train_text_to_image.py` does. Unset: off (5.0 is typical).
    pub min_snr_gamma: Option<f64>,
    /// Offset noise: `noise_offset · N(0, 1)` per sample and channel is added to the noise
    /// (kohya's and diffusers' `--noise_offset`); 0 turns it off.
    pub noise_offset: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            lr: "5e-5".into(),
            optimizer: Optimizer::AdamW,
            mixed_precision: MixedPrecision::Bf16,
            max_grad_norm: 1.0,
            lr_scheduler: LrScheduler::Constant,
            lr_warmup_steps: 0,
            weight_decay: 0.01,
            ema_decay: 0.0,
            cache_latents: false,
            fill_cache_only: false,
            time_phases_every: 10,
            min_snr_gamma: None,
            noise_offset: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypernetworkSection {
    /// The context widths that get a k/v module pair (768 = SD1's cross-attention, the block
    /// widths = self-attention).
    pub sizes: Vec<u32>,
    /// A1111's `layer_structure`: width multipliers, starting and ending with 1.
    pub layer_structure: Vec<f64>,
    pub activation: HypernetworkActivation,
    /// A1111's `is_layer_norm`: a LayerNorm after every Linear.
    pub layer_norm: bool,
    pub weight_init: HypernetworkWeightInit,
    /// A1111's `use_dropout` (0.3 after every hidden layer while training; none in the export).
    pub dropout: bool,
    /// A1111's `last_layer_dropout`.
    pub last_layer_dropout: bool,
    /// A1111's `activate_output`: the activation after the last Linear too.
    pub activate_output: bool,
    /// NovelAI's shallow-layer penalty: the weight a_l of each resolution level's contribution
    /// to the shared modules' gradient, shallowest (highest resolution) first; empty = off.
    pub shallow_penalty: Vec<f64>,
    /// Strength of the optional depth-weighted L2 penalty on the modules' output f(x); 0 = off.
    pub l2_penalty: f64,
    /// The L2 penalty's weight per resolution level, shallowest first.
    pub l2_penalty_weights: Vec<f64>,
}

impl Default for HypernetworkSection {
    fn default() -> Self {
        Self {
            sizes: vec![768, 320, 640, 1280],
            layer_structure: vec![1.0, 2.0, 1.0],
            activation: HypernetworkActivation::Linear,
            layer_norm: false,
            weight_init: HypernetworkWeightInit::Normal,
            dropout: false,
            last_layer_dropout: false,
            activate_output: false,
            shallow_penalty: vec![0.25, 0.5, 1.0],
            l2_penalty: 0.0,
            l2_penalty_weights: vec![1.0, 0.5, 0.25],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// The rank of each linear (and 1x1 conv) module's LoRA.
    pub rank: u32,
    /// The LoRA's alpha; the update is scaled by alpha/rank. Unset: the rank (a scale of 1).
    pub alpha: Option<f64>,
    /// Dropout on the LoRA's down projection while training (kohya's `network_dropout`).
    pub dropout: f64,
    /// The rank of the 3x3 convolutions' LoRA (LoCon, `resnet_conv` target). Unset: `rank`.
    pub conv_rank: Option<u32>,
    /// The 3x3 convolutions' alpha. Unset: the conv rank.
    pub conv_alpha: Option<f64>,
    /// The UNet layers that get a LoRA; the text encoder's follow `model.train_text_encoder`.
    pub targets: Vec<LoraTarget>,
    /// The dtype of `exports/lora.safetensors` (kohya's `--save_precision`).
    pub save_precision: SavePrecision,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: None,
            dropout: 0.0,
            conv_rank: None,
            conv_alpha: None,
            targets: vec![LoraTarget::Attention],
            save_precision: SavePrecision::Fp16,
        }
    }
}

impl LoraSection {
    /// The linear modules' alpha (the rank when unset).
    pub fn linear_alpha(&self) -> f64 {
        self.alpha.unwrap_or(f64::from(self.rank))
    }

    /// The 3x3 convolutions' rank.
    pub fn conv_rank(&self) -> u32 {
        self.conv_rank.unwrap_or(self.rank)
    }

    /// The 3x3 convolutions' alpha (the conv rank when unset).
    pub fn conv_alpha(&self) -> f64 {
        self.conv_alpha.unwrap_or(f64::from(self.conv_rank()))
    }
}

config_choice! {
    /// The dtype of an exported LoRA (`lora.save_precision`).
    #[derive(Default)]
    pub enum SavePrecision("lora.save_precision") {
        /// Half the size of fp32; what shared LoRA files use.
        #[default]
        Fp16 = "fp16",
        Bf16 = "bf16",
        Fp32 = "fp32",
    }
}

config_choice! {
    /// The UNet layers that get a LoRA (`lora.targets`).
    pub enum LoraTarget("lora.targets") {
        /// Every attention layer's `to_q`, `to_k`, `to_v` and `to_out.0`.
        Attention = "attention",
        /// The transformer blocks' GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
        FeedForward = "feed_forward",
        /// The transformers' `proj_in` and `proj_out`.
        Projections = "projections",
        /// The 3x3 convolutions of the ResNet blocks, downsamplers and upsamplers (LoCon).
        ResnetConv = "resnet_conv",
    }
}

config_choice! {
    /// What a run trains (`model.mode`).
    #[derive(Default)]
    pub enum TrainingMode("model.mode") {
        /// Only the hypernetwork modules; CLIP, UNet and VAE are frozen.
        #[default]
        Hypernetwork = "hypernetwork",
        /// The UNet, plus the text encoder when `model.train_text_encoder`.
        Finetune = "finetune",
        /// LoRA modules on the UNet layers of `lora.targets` (and on the text encoder when
        /// `model.train_text_encoder`); the base weights are frozen.
        Lora = "lora",
    }
}

config_choice! {
    /// What the UNet predicts, and so the training target (`model.prediction_type`, and
    /// diffusers' `prediction_type` in `scheduler_config.json`).
    #[derive(Default)]
    pub enum PredictionType("model.prediction_type") {
        /// The noise (SD1).
        #[default]
        Epsilon = "epsilon",
        /// The velocity `ᾱ^½·ε − (1−ᾱ)^½·x0`.
        VPrediction = "v_prediction",
    }
}

config_choice! {
    /// How long prompts' encoded chunks are laid out in the conditioning tensor
    /// (`model.prompt_layout`).
    #[derive(Default)]
    pub enum PromptLayout("model.prompt_layout") {
        /// A1111/NovelAI: every chunk's 77 states concatenated, 77·n.
        #[default]
        Chunked = "chunked",
        /// kohya-ss/sd-scripts: the first chunk's BOS state, each chunk's 75 inner states and the
        /// last chunk's EOS state, 75·n+2.
        Kohya = "kohya",
    }
}

config_choice! {
    /// The optimizer (`train.optimizer`).
    #[derive(Default)]
    pub enum Optimizer("train.optimizer") {
        #[default]
        AdamW = "adamw",
    }
}

config_choice! {
    /// The precision of the forward passes (`train.mixed_precision`).
    #[derive(Default)]
    pub enum MixedPrecision("train.mixed_precision") {
        /// bf16 autocast on CUDA (parameters and optimizer state stay fp32); fp32 on the CPU.
        #[default]
        Bf16 = "bf16",
        Fp32 = "fp32",
        /// No mixed precision: fp32.
        No = "no",
    }
}

config_choice! {
    /// How a numeric `train.lr` changes over the run (`train.lr_scheduler`).
    #[derive(Default)]
    pub enum LrScheduler("train.lr_scheduler") {
        /// The rate after the warmup.
        #[default]
        Constant = "constant",
        /// Cosine decay to 0 over the run after the warmup.
        Cosine = "cosine",
    }
}

config_choice! {
    /// A1111's hypernetwork `activation_func` (`hypernetwork.activation`), those ComfyUI also
    /// accepts.
    #[derive(Default)]
    pub enum HypernetworkActivation("hypernetwork.activation") {
        #[default]
        Linear = "linear",
        Relu = "relu",
        LeakyRelu = "leakyrelu",
        Elu = "elu",
        /// A1111's "swish" is `torch.nn.Hardswish`.
        Swish = "swish",
        Tanh = "tanh",
        Sigmoid = "sigmoid",
    }
}

config_choice! {
    /// A1111's hypernetwork `weight_initialization` (`hypernetwork.weight_init`).
    #[derive(Default)]
    pub enum HypernetworkWeightInit("hypernetwork.weight_init") {
        /// Linear weights from N(0, 0.01), zero bias.
        #[default]
        Normal = "Normal",
        XavierUniform = "XavierUniform",
        XavierNormal = "XavierNormal",
        KaimingUniform = "KaimingUniform",
        KaimingNormal = "KaimingNormal",
    }
}

config_choice! {
    /// The diffusion sampler of sample grids (`samples.sampler`).
    #[derive(Default)]
    pub enum SamplerKind("samples.sampler") {
        /// diffusers' `DDIMScheduler`, eta 0.
        #[default]
        Ddim = "ddim",
        /// diffusers' `EulerDiscreteScheduler`.
        Euler = "euler",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplesSection {
    pub every: u64,
    pub prompts: Vec<String>,
    pub negative: String,
    pub steps: u32,
    pub guidance: f64,
    pub sampler: SamplerKind,
    /// The hypernetwork's strength in sample grids (A1111's multiplier; training always uses 1).
    pub hypernetwork_multiplier: f64,
    /// Every this many optimizer steps, the mean loss on the validation items (at fixed
    /// timesteps and noise) when `data.validation_manifest` or `data.validation_fraction` is
    /// set; 0 = never.
    pub validation_every: u64,
}

impl Default for SamplesSection {
    fn default() -> Self {
        Self {
            every: 200,
            prompts: vec!["1girl, red dress".into()],
            negative: String::new(),
            steps: 20,
            guidance: 7.0,
            sampler: SamplerKind::Ddim,
            hypernetwork_multiplier: 1.0,
            validation_every: 100,
        }
    }
}

/// Accepts `lr = 5e-5` as well as `lr = "5e-5"` or `lr = "1e-4:100, 5e-5"`.
fn number_or_string<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Integer(i64),
        Float(f64),
        Text(String),
    }
    Ok(match NumberOrString::deserialize(deserializer)? {
        NumberOrString::Integer(value) => value.to_string(),
        NumberOrString::Float(value) => value.to_string(),
        NumberOrString::Text(value) => value,
    })
}

fn default_job_name() -> String {
    "arbor".into()
}
fn default_seed() -> u64 {
    42
}
fn default_true() -> bool {
    true
}
impl DataSection {
    /// The latent cache's location: `data.latent_cache`, else `latent-cache` under the run
    /// directory `run_dir` (a path or an object store URL).
    pub fn latent_cache_location(&self, run_dir: &str) -> String {
        if let Some(location) = &self.latent_cache {
            return location.clone();
        }
        format!("{}/latent-cache", run_dir.trim_end_matches('/'))
    }

    /// Whether the job has validation items (a validation manifest or a held-out fraction).
    pub fn has_validation(&self) -> bool {
        self.validation_manifest.is_some() || self.validation_fraction > 0.0
    }

    /// Where the manifest's keys are resolved: `data.root`, else the manifest's folder (`.` for
    /// a bare file name).
    pub fn dataset_root(&self) -> String {
        if let Some(root) = &self.root {
            return root.clone();
        }
        std::path::Path::new(&self.manifest)
            .parent()
            .map(|parent| parent.display().to_string())
            .filter(|parent| !parent.is_empty())
            .unwrap_or_else(|| ".".to_string())
    }
}

/// The most batches a rank may load ahead (`data.prefetch_batches`).
pub const MAX_PREFETCH_BATCHES: u32 = 64;

fn default_max_failed_fraction() -> f64 {
    0.01
}

fn default_failure_window() -> u32 {
    1000
}

fn default_validation_max_items() -> u32 {
    256
}

fn default_prefetch_batches() -> u32 {
    2
}

fn default_keep_tokens() -> u32 {
    1
}

/// One `section.key=value` override, from a flag or an environment variable.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub section: String,
    pub key: String,
    pub value: String,
    /// Where it came from, for error messages (`--set` or the variable's name).
    pub origin: String,
}

impl Override {
    /// Parses a `--set section.key=value` flag.
    pub fn from_flag(text: &str) -> Result<Self, CommonError> {
        let (path, value) = text
            .split_once('=')
            .ok_or_else(|| invalid("--set", format!("expected section.key=value, got `{text}`")))?;
        let (section, key) = path
            .split_once('.')
            .ok_or_else(|| invalid("--set", format!("expected section.key=value, got `{text}`")))?;
        Ok(Self {
            section: section.trim().to_string(),
            key: key.trim().to_string(),
            value: value.to_string(),
            origin: format!("--set {text}"),
        })
    }

    /// The overrides among `ARBOR_<SECTION>_<KEY>` variables: those whose section is one of
    /// [`SECTIONS`]. Other `ARBOR_*` variables (`ARBOR_TOKEN`, `ARBOR_LOG`, …) are not config.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<Self> {
        let mut overrides: Vec<Self> = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix("ARBOR_")?;
                let (section, key) = rest.split_once('_')?;
                let section = section.to_ascii_lowercase();
                SECTIONS.contains(&section.as_str()).then(|| Self {
                    section,
                    key: key.to_ascii_lowercase(),
                    value,
                    origin: name.clone(),
                })
            })
            .collect();
        overrides.sort_by(|a, b| a.origin.cmp(&b.origin));
        overrides
    }
}

impl JobConfig {
    /// Parses `job.toml` text, applies overrides in order (environment first, then flags), and
    /// validates the result. Errors name the field.
    pub fn load(toml_text: &str, overrides: &[Override]) -> Result<Self, CommonError> {
        let mut document: toml::Table = toml_text
            .parse()
            .map_err(|error: toml::de::Error| invalid("job.toml", error.to_string()))?;
        for item in overrides {
            if !SECTIONS.contains(&item.section.as_str()) {
                return Err(invalid(
                    "override",
                    format!("{}: unknown section `{}`", item.origin, item.section),
                ));
            }
            let section = document
                .entry(item.section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(section) = section else {
                return Err(invalid(
                    "override",
                    format!("{}: `{}` is not a table", item.origin, item.section),
                ));
            };
            section.insert(item.key.clone(), parse_scalar(&item.value));
        }
        let config: JobConfig = serde_path_to_error::deserialize(toml::Value::Table(document))
            .map_err(|error| {
                let path = error.path().to_string();
                CommonError::InvalidConfig {
                    path: if path == "." {
                        "job.toml".to_string()
                    } else {
                        path
                    },
                    reason: error.inner().message().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate_lora(&self) -> Result<(), CommonError> {
        let section = &self.lora;
        if section.rank == 0 {
            return Err(invalid("lora.rank", "must be at least 1"));
        }
        if section.conv_rank == Some(0) {
            return Err(invalid("lora.conv_rank", "must be at least 1"));
        }
        for (field, alpha) in [
            ("lora.alpha", section.alpha),
            ("lora.conv_alpha", section.conv_alpha),
        ] {
            if let Some(alpha) = alpha {
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(invalid(
                        field,
                        format!("must be a positive number, got {alpha}"),
                    ));
                }
            }
        }
        if !(0.0..1.0).contains(&section.dropout) {
            return Err(invalid("lora.dropout", "must be in [0, 1)"));
        }
        if self.model.mode == TrainingMode::Lora
            && section.targets.is_empty()
            && !self.model.train_text_encoder
        {
            return Err(invalid(
                "lora.targets",
                format!(
                    "lora mode needs at least one of {} (or model.train_text_encoder for a text \
                     encoder only LoRA)",
                    <LoraTarget as ConfigChoice>::allowed()
                ),
            ));
        }
        Ok(())
    }

    fn validate_hypernetwork(&self) -> Result<(), CommonError> {
        let section = &self.hypernetwork;
        let structure = &section.layer_structure;
        if structure.len() < 2 || structure.first() != Some(&1.0) || structure.last() != Some(&1.0)
        {
            return Err(invalid(
                "hypernetwork.layer_structure",
                format!("must start and end with 1 (A1111's rule), got {structure:?}"),
            ));
        }
        if structure
            .iter()
            .any(|width| !(width.is_finite() && *width > 0.0))
        {
            return Err(invalid(
                "hypernetwork.layer_structure",
                "every multiplier must be positive",
            ));
        }
        let in_unit = |weights: &[f64]| weights.iter().all(|w| (0.0..=1.0).contains(w));
        if !in_unit(&section.shallow_penalty) {
            return Err(invalid(
                "hypernetwork.shallow_penalty",
                "every level weight must be in [0, 1]",
            ));
        }
        if !(section.l2_penalty.is_finite() && section.l2_penalty >= 0.0) {
            return Err(invalid(
                "hypernetwork.l2_penalty",
                "must be 0 (off) or positive",
            ));
        }
        if section
            .l2_penalty_weights
            .iter()
            .any(|w| !(w.is_finite() && *w >= 0.0))
        {
            return Err(invalid(
                "hypernetwork.l2_penalty_weights",
                "every level weight must be 0 or positive",
            ));
        }
        Ok(())
    }

    /// Checks every constraint once, naming the field.
    pub fn validate(&self) -> Result<(), CommonError> {
        crate::buckets::BucketTable::new(self.buckets.bucket_params())?;
        self.buckets.assign_params().validate()?;
        let schedule = &self.schedule;
        if schedule.bsz == 0 {
            return Err(invalid("schedule.bsz", "must be at least 1"));
        }
        if schedule.grad_accum == 0 {
            return Err(invalid("schedule.grad_accum", "must be at least 1"));
        }
        if schedule.checkpoint_every == 0 {
            return Err(invalid("schedule.checkpoint_every", "must be at least 1"));
        }
        if let Some(minutes) = schedule.checkpoint_every_minutes {
            if !(minutes.is_finite() && minutes > 0.0) {
                return Err(invalid(
                    "schedule.checkpoint_every_minutes",
                    format!("must be a positive number of minutes, got {minutes}"),
                ));
            }
        }
        if schedule.epochs == 0 && schedule.max_steps.is_none() {
            return Err(invalid(
                "schedule.epochs",
                "must be at least 1 (or set max_steps)",
            ));
        }
        if self.train.fill_cache_only && !self.train.cache_latents {
            return Err(invalid(
                "train.fill_cache_only",
                "needs train.cache_latents = true (it is set by `arbor cache`)",
            ));
        }
        if let Some(location) = &self.data.latent_cache {
            if !self.train.cache_latents {
                return Err(invalid(
                    "data.latent_cache",
                    "is set but train.cache_latents is false (set it to true to use the cache)",
                ));
            }
            if location.trim().is_empty() {
                return Err(invalid("data.latent_cache", "is empty"));
            }
        }
        let cluster = &self.cluster;
        if cluster.max_start_failures == 0 {
            return Err(invalid("cluster.max_start_failures", "must be at least 1"));
        }
        if cluster.min_workers == 0 {
            return Err(invalid("cluster.min_workers", "must be at least 1"));
        }
        if cluster.max_workers < cluster.min_workers {
            return Err(invalid(
                "cluster.max_workers",
                format!(
                    "max_workers {} is below min_workers {}",
                    cluster.max_workers, cluster.min_workers
                ),
            ));
        }
        if cluster.heartbeat_interval_s.is_nan() || cluster.heartbeat_interval_s <= 0.0 {
            return Err(invalid("cluster.heartbeat_interval_s", "must be positive"));
        }
        if cluster.heartbeat_timeout_s.is_nan()
            || cluster.heartbeat_timeout_s <= cluster.heartbeat_interval_s
        {
            return Err(invalid(
                "cluster.heartbeat_timeout_s",
                "must be longer than heartbeat_interval_s",
            ));
        }
        if cluster.tls_cert.is_some() != cluster.tls_key.is_some() {
            return Err(invalid(
                "cluster.tls_cert",
                "tls_cert and tls_key go together",
            ));
        }
        if !(0.0..1.0).contains(&self.data.tag_dropout) {
            return Err(invalid("data.tag_dropout", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.data.caption_dropout) {
            return Err(invalid("data.caption_dropout", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.data.max_failed_fraction) {
            return Err(invalid(
                "data.max_failed_fraction",
                "must be in [0, 1] (1 turns the data failure budget off)",
            ));
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            return Err(invalid(
                "data.validation_fraction",
                "must be in [0, 1) (0 turns held-out validation items off)",
            ));
        }
        if self.data.validation_max_items == 0 {
            return Err(invalid("data.validation_max_items", "must be at least 1"));
        }
        if self.data.failure_window == 0 {
            return Err(invalid("data.failure_window", "must be at least 1 item"));
        }
        if self.data.prefetch_batches > MAX_PREFETCH_BATCHES {
            return Err(invalid(
                "data.prefetch_batches",
                format!("must be at most {MAX_PREFETCH_BATCHES} (each batch in flight holds its pixels in memory)"),
            ));
        }
        if !(1..=2).contains(&self.model.clip_skip) {
            return Err(invalid("model.clip_skip", "must be 1 or 2"));
        }
        if self.model.max_chunks == 0 {
            return Err(invalid("model.max_chunks", "must be at least 1"));
        }
        self.validate_hypernetwork()?;
        self.validate_lora()?;
        if self.model.mode == TrainingMode::Hypernetwork && self.model.train_text_encoder {
            return Err(invalid(
                "model.train_text_encoder",
                "hypernetwork mode keeps the text encoder frozen (use finetune or lora mode)",
            ));
        }
        if !self.samples.hypernetwork_multiplier.is_finite() {
            return Err(invalid(
                "samples.hypernetwork_multiplier",
                "must be a finite number",
            ));
        }
        let train = &self.train;
        LearningRate::parse(&train.lr)?;
        if !(train.max_grad_norm.is_finite() && train.max_grad_norm >= 0.0) {
            return Err(invalid(
                "train.max_grad_norm",
                format!(
                    "must be 0 (off) or a finite positive number, got {}",
                    train.max_grad_norm
                ),
            ));
        }
        if !(train.weight_decay.is_finite() && train.weight_decay >= 0.0) {
            return Err(invalid(
                "train.weight_decay",
                format!("must be a finite number >= 0, got {}", train.weight_decay),
            ));
        }
        if let Some(gamma) = train.min_snr_gamma {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(invalid(
                    "train.min_snr_gamma",
                    format!("must be a positive number (5.0 is typical), got {gamma}"),
                ));
            }
        }
        if !(train.noise_offset.is_finite() && train.noise_offset >= 0.0) {
            return Err(invalid(
                "train.noise_offset",
                format!("must be 0 (off) or positive, got {}", train.noise_offset),
            ));
        }
        if !(0.0..1.0).contains(&train.ema_decay) {
            return Err(invalid(
                "train.ema_decay",
                "must be in [0, 1); 0 turns ema off",
            ));
        }
        if self.samples.steps == 0 {
            return Err(invalid("samples.steps", "must be at least 1"));
        }
        if !self.samples.guidance.is_finite() {
            return Err(invalid(
                "samples.guidance",
                format!("must be a finite number, got {}", self.samples.guidance),
            ));
        }
        Ok(())
    }

    /// The resolved config as TOML, as written to `run_dir/job.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a validated config serialises")
    }

    /// A stable digest of the resolved config (SplitMix64 over its TOML), to detect a config
    /// that changed under a running job.
    pub fn digest(&self) -> String {
        digest_bytes(self.to_toml().as_bytes())
    }
}

/// A stable 64-bit hex digest of bytes (FNV-1a folded through SplitMix64). Not cryptographic:
/// it detects accidental change.
pub fn digest_bytes(bytes: &[u8]) -> String {
    let mut digest = Digest::default();
    digest.update(bytes);
    digest.finish()
}

/// The streaming form of [`digest_bytes`].
#[derive(Debug, Clone, Copy)]
pub struct Digest {
    hash: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self {
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Digest {
    pub fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.hash ^= u64::from(byte);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    pub fn finish(&self) -> String {
        format!("{:016x}", crate::stream::splitmix64(self.hash))
    }
}

/// A reader that digests what passes through it.
pub struct DigestReader<R> {
    inner: R,
    digest: Digest,
}

impl<R> DigestReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            digest: Digest::default(),
        }
    }

    pub fn digest(&self) -> String {
        self.digest.finish()
    }
}

impl<R: std::io::Read> std::io::Read for DigestReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.digest.update(&buffer[..count]);
        Ok(count)
    }
}

/// Parses an override's value as a TOML value when it is one (`2`, `1.5`, `true`,
/// `[512, 512]`, `"text"`), else takes it as a plain string.
fn parse_scalar(text: &str) -> toml::Value {
    let wrapped = format!("value = {text}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut table) => table
            .remove("value")
            .unwrap_or_else(|| toml::Value::String(text.into())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// The documented example (`deploy/job.example.toml`, docs/architecture.md §7), used by tests and
/// `arbor coordinator --example-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/job.example.toml");

/// Returns a map section → keys of every known config key, for docs and CLI checks.
pub fn known_keys() -> BTreeMap<&'static str, Vec<String>> {
    let example = JobConfig::load(EXAMPLE_CONFIG, &[]).expect("the example config is valid");
    let value = toml::Value::try_from(&example).expect("config serialises");
    let mut keys = BTreeMap::new();
    for section in SECTIONS {
        let names = value
            .get(section)
            .and_then(toml::Value::as_table)
            .map(|table| table.keys().cloned().collect())
            .unwrap_or_default();
        keys.insert(section, names);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_loads() {
        let config = JobConfig::load(EXAMPLE_CONFIG, &[]).unwrap();
        assert_eq!(config.job.seed, 42);
        assert_eq!(config.buckets.base_res, [512, 512]);
        assert_eq!(config.cluster.min_workers, 1);
        assert_eq!(config.hypernetwork.sizes, vec![768, 320, 640, 1280]);
        assert!(known_keys()["cluster"].contains(&"heartbeat_timeout_s".to_string()));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let text = format!("{EXAMPLE_CONFIG}\n[extra]\nx = 1\n");
        let error = JobConfig::load(&text, &[]).unwrap_err().to_string();
        assert!(error.contains("unknown field `extra`"), "{error}");
        let text = EXAMPLE_CONFIG.replace("min_workers = 1", "min_wrokers = 1");
        let error = JobConfig::load(&text, &[]).unwrap_err().to_string();
        assert!(error.contains("min_wrokers"), "{error}");
    }

    #[test]
    fn environment_then_flags_override_the_file() {
        let env = Override::from_env([
            ("ARBOR_CLUSTER_MIN_WORKERS".to_string(), "2".to_string()),
            ("ARBOR_CLUSTER_MAX_WORKERS".to_string(), "3".to_string()),
            ("ARBOR_TOKEN".to_string(), "secret".to_string()),
            (
                "ARBOR_BUCKETS_BASE_RES".to_string(),
                "[448, 576]".to_string(),
            ),
            ("ARBOR_JOB_NAME".to_string(), "from env".to_string()),
        ]);
        assert_eq!(env.len(), 4, "ARBOR_TOKEN is not config");
        let mut overrides = env;
        overrides.push(Override::from_flag("cluster.min_workers=3").unwrap());
        let config = JobConfig::load(EXAMPLE_CONFIG, &overrides).unwrap();
        assert_eq!(config.cluster.min_workers, 3);
        assert_eq!(config.cluster.max_workers, 3);
        assert_eq!(config.buckets.base_res, [448, 576]);
        assert_eq!(config.job.name, "from env");
        let numeric_lr = [Override::from_flag("train.lr=0.0001").unwrap()];
        assert_eq!(
            JobConfig::load(EXAMPLE_CONFIG, &numeric_lr)
                .unwrap()
                .train
                .lr,
            "0.0001"
        );
    }

    #[test]
    fn a_value_outside_its_choices_is_refused_with_them() {
        let overrides = [Override::from_flag("train.mixed_precision=fp8").unwrap()];
        let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("train.mixed_precision")
                && error.contains("expected `bf16`, `fp32` or `no`, got `fp8`"),
            "{error}"
        );
        let overrides = [Override::from_flag("model.mode=finetune").unwrap()];
        assert_eq!(
            JobConfig::load(EXAMPLE_CONFIG, &overrides)
                .unwrap()
                .model
                .mode,
            TrainingMode::Finetune
        );
    }

    /// Every name of `Choice` loads through `field` and serialises back to itself; any other
    /// name is refused naming the field and every allowed name.
    fn check_choice<Choice>(field: &str, read: impl Fn(&JobConfig) -> Choice)
    where
        Choice: ConfigChoice
            + std::fmt::Debug
            + std::fmt::Display
            + std::str::FromStr<Err = CommonError>,
    {
        assert_eq!(Choice::FIELD, field);
        for &choice in Choice::ALL {
            let name = choice.name();
            let overrides = [Override::from_flag(&format!("{field}={name}")).unwrap()];
            let config = JobConfig::load(EXAMPLE_CONFIG, &overrides).unwrap();
            assert_eq!(read(&config), choice, "{field}={name}");
            assert_eq!(choice.to_string(), name);
            assert!(name.parse::<Choice>().is_ok_and(|parsed| parsed == choice));
            let (section, key) = field.split_once('.').unwrap();
            let written: toml::Table = config.to_toml().parse().unwrap();
            assert_eq!(written[section][key].as_str(), Some(name), "{field}");
            let reloaded = JobConfig::load(&config.to_toml(), &[]).unwrap();
            assert_eq!(reloaded.digest(), config.digest(), "{field}={name}");
        }
        for bad in ["nosuch", "", "Linear-ish"] {
            let overrides = [Override::from_flag(&format!("{field}={bad}")).unwrap()];
            let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{field}={bad}: {error}");
            assert!(error.contains(&format!("got `{bad}`")), "{error}");
            for &choice in Choice::ALL {
                assert!(
                    error.contains(&format!("`{}`", choice.name())),
                    "{field}={bad}: {error}"
                );
            }
            let parse_error = bad.parse::<Choice>().unwrap_err().to_string();
            assert!(parse_error.contains(field), "{parse_error}");
        }
    }

    #[test]
    fn every_choice_round_trips_and_others_are_refused_with_the_field() {
        check_choice("model.mode", |config| config.model.mode);
        check_choice("model.prediction_type", |config| {
            config.model.prediction_type
        });
        check_choice("model.prompt_layout", |config| config.model.prompt_layout);
        check_choice("train.optimizer", |config| config.train.optimizer);
        check_choice("train.mixed_precision", |config| {
            config.train.mixed_precision
        });
        check_choice("train.lr_scheduler", |config| config.train.lr_scheduler);
        check_choice("hypernetwork.activation", |config| {
            config.hypernetwork.activation
        });
        check_choice("hypernetwork.weight_init", |config| {
            config.hypernetwork.weight_init
        });
        check_choice("samples.sampler", |config| config.samples.sampler);
    }

    #[test]
    fn the_example_serialises_choices_as_it_spells_them() {
        let example: toml::Table = EXAMPLE_CONFIG.parse().unwrap();
        let written: toml::Table = JobConfig::load(EXAMPLE_CONFIG, &[])
            .unwrap()
            .to_toml()
            .parse()
            .unwrap();
        for (section, key) in [
            ("model", "mode"),
            ("model", "prediction_type"),
            ("model", "prompt_layout"),
            ("train", "optimizer"),
            ("train", "mixed_precision"),
            ("train", "lr_scheduler"),
            ("hypernetwork", "activation"),
            ("hypernetwork", "weight_init"),
            ("samples", "sampler"),
        ] {
            assert_eq!(
                example[section][key], written[section][key],
                "{section}.{key}"
            );
        }
    }

    #[test]
    fn a_bad_learning_rate_is_refused_at_load() {
        for (value, expected) in [
            ("0", "> 0"),
            ("-1e-4", ">= 0"),
            ("nan", "train.lr"),
            ("\"1e-4:10, 1e-5:5\"", "1e-5:5"),
        ] {
            let overrides = [Override::from_flag(&format!("train.lr={value}")).unwrap()];
            let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("train.lr") && error.contains(expected),
                "{value}: {error}"
            );
        }
        let schedule = [Override::from_flag("train.lr=\"1e-4:10, 1e-5\"").unwrap()];
        assert!(JobConfig::load(EXAMPLE_CONFIG, &schedule).is_ok());
    }

    #[test]
    fn other_numbers_are_refused_with_their_bound() {
        let cases = [
            ("train.max_grad_norm=inf", "train.max_grad_norm", "finite"),
            ("train.weight_decay=nan", "train.weight_decay", ">= 0"),
            ("samples.guidance=inf", "samples.guidance", "finite"),
        ];
        for (flag, field, bound) in cases {
            let overrides = [Override::from_flag(flag).unwrap()];
            let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(field) && error.contains(bound),
                "{flag}: {error}"
            );
        }
    }

    #[test]
    fn a_wrong_type_names_its_dotted_key() {
        let overrides = [Override::from_flag("schedule.bsz=\"four\"").unwrap()];
        let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
            .unwrap_err()
            .to_string();
        assert!(error.contains("schedule.bsz"), "{error}");
        let text = EXAMPLE_CONFIG.replace("min_workers = 1", "min_wrokers = 1");
        let error = JobConfig::load(&text, &[]).unwrap_err().to_string();
        assert!(error.contains("cluster"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("schedule.bsz=0", "schedule.bsz"),
            ("cluster.max_workers=0", "cluster.max_workers"),
            ("cluster.max_start_failures=0", "cluster.max_start_failures"),
            (
                "cluster.heartbeat_timeout_s=1",
                "cluster.heartbeat_timeout_s",
            ),
            ("buckets.min_dim=4096", "min_dim"),
            ("model.mode=dreambooth", "model.mode"),
            ("lora.rank=0", "lora.rank"),
            ("lora.conv_alpha=0", "lora.conv_alpha"),
            ("data.caption_dropout=1.5", "data.caption_dropout"),
            ("train.min_snr_gamma=-5", "train.min_snr_gamma"),
            ("train.noise_offset=nan", "train.noise_offset"),
            ("data.tag_dropout=1.5", "data.tag_dropout"),
            ("data.prefetch_batches=65", "data.prefetch_batches"),
            ("data.max_failed_fraction=1.5", "data.max_failed_fraction"),
            ("data.max_failed_fraction=nan", "data.max_failed_fraction"),
            ("data.failure_window=0", "data.failure_window"),
            ("data.latent_cache=\"/tmp/cache\"", "data.latent_cache"),
            ("hypernetwork.activation=gelu", "hypernetwork.activation"),
            ("model.prompt_layout=sdxl", "model.prompt_layout"),
            ("hypernetwork.weight_init=Zeros", "hypernetwork.weight_init"),
            ("hypernetwork.l2_penalty=-1", "hypernetwork.l2_penalty"),
            (
                "schedule.checkpoint_every_minutes=0",
                "schedule.checkpoint_every_minutes",
            ),
        ];
        for (flag, field) in cases {
            let overrides = [Override::from_flag(flag).unwrap()];
            let error = JobConfig::load(EXAMPLE_CONFIG, &overrides)
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{flag}: {error}");
        }
        let unknown = [Override::from_flag("nosuch.key=1").unwrap()];
        assert!(JobConfig::load(EXAMPLE_CONFIG, &unknown)
            .unwrap_err()
            .to_string()
            .contains("nosuch"));
    }

    #[test]
    fn digest_changes_with_the_config() {
        let base = JobConfig::load(EXAMPLE_CONFIG, &[]).unwrap();
        let changed = JobConfig::load(
            EXAMPLE_CONFIG,
            &[Override::from_flag("job.seed=7").unwrap()],
        )
        .unwrap();
        assert_eq!(
            base.digest(),
            JobConfig::load(EXAMPLE_CONFIG, &[]).unwrap().digest()
        );
        assert_ne!(base.digest(), changed.digest());
    }
}
