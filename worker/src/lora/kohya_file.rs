//! The LoRA file people share: kohya-ss/sd-scripts' safetensors layout, which AUTOMATIC1111,
//! ComfyUI and diffusers' `load_lora_weights` read.
//!
//! - Tensors: `<module>.lora_down.weight`, `<module>.lora_up.weight` and a 0-dim `<module>.alpha`
//!   per adapted layer, in the save precision.
//! - Metadata: the `ss_*` strings kohya writes (network module, dim, alpha, base model version,
//!   resolution, steps, epochs, tag frequency, …), which Civitai and the UIs show, plus the
//!   `modelspec.*` keys of Stability's model spec.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use arbor_common::config::{JobConfig, LoraTarget, PredictionType, SavePrecision};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::lora::LoraNetwork;
use crate::train::checkpoint::{safetensors_bytes_with_metadata, tensors_from_safetensors};

/// One module of a LoRA file.
#[derive(Debug)]
pub struct KohyaModule {
    pub name: String,
    pub down: Tensor,
    pub up: Tensor,
    /// The file's alpha, or the rank when the file has none (kohya's rule).
    pub alpha: f64,
}

impl KohyaModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// The full-rank update `up · down` in the base weight's shape (`[out, in]`, or
    /// `[out, in, k, k]` for a convolution), in fp32.
    pub fn dense_update(&self) -> Tensor {
        let down = self.down.to_kind(Kind::Float);
        let up = self.up.to_kind(Kind::Float);
        if down.dim() == 2 {
            return up.matmul(&down);
        }
        let down_size = down.size();
        let up_size = up.size();
        let flat = up
            .reshape([up_size[0], up_size[1]])
            .matmul(&down.reshape([down_size[0], -1]));
        flat.reshape([up_size[0], down_size[1], down_size[2], down_size[3]])
    }
}

/// What a run's LoRA file records about its training, for the `ss_*` metadata.
#[derive(Debug, Clone)]
pub struct TrainingRecord<'a> {
    pub config: &'a JobConfig,
    /// Optimizer steps done.
    pub step: u64,
    /// Epochs begun.
    pub epoch: u64,
    /// How often each tag occurs in the dataset's captions, when the manifest is readable here.
    pub tag_frequency: Option<BTreeMap<String, u64>>,
    /// The ranks of the group that trained it.
    pub world_size: u32,
}

fn kind_of(precision: SavePrecision) -> Kind {
    match precision {
        SavePrecision::Fp16 => Kind::Half,
        SavePrecision::Bf16 => Kind::BFloat16,
        SavePrecision::Fp32 => Kind::Float,
    }
}

/// A stable 32-bit session id for a run (FNV-1a of the run directory and job name), so every
/// export of one run carries the same `ss_session_id`.
fn session_id(config: &JobConfig) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in config
        .job
        .run_dir
        .bytes()
        .chain([0])
        .chain(config.job.name.bytes())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// kohya's `ss_*` metadata (and the `modelspec.*` keys) for a network trained as `record` says.
pub fn kohya_metadata(
    network: &LoraNetwork,
    record: &TrainingRecord<'_>,
) -> HashMap<String, String> {
    let config = record.config;
    let settings = network.settings();
    let [width, height] = config.buckets.base_res;
    let model_name = Path::new(&config.model.path)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut network_args = serde_json::Map::new();
    if config.lora.targets.contains(&LoraTarget::ResnetConv) {
        network_args.insert("conv_dim".into(), settings.conv_rank.to_string().into());
        network_args.insert("conv_alpha".into(), settings.conv_alpha.to_string().into());
    }
    if settings.dropout > 0.0 {
        network_args.insert("dropout".into(), settings.dropout.to_string().into());
    }
    let targets: Vec<&str> = config.lora.targets.iter().map(|t| t.as_str()).collect();
    network_args.insert("arbor_targets".into(), targets.join(",").into());
    let global_batch = u64::from(record.world_size)
        * u64::from(config.schedule.bsz)
        * u64::from(config.schedule.grad_accum);
    let tag_frequency = record.tag_frequency.as_ref().map(|frequency| {
        // kohya groups tags by dataset folder; arbor has one dataset.
        serde_json::json!({ config.job.name.clone(): frequency }).to_string()
    });
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut metadata: Vec<(&str, String)> = vec![
        ("ss_network_module", "networks.lora".into()),
        ("ss_network_dim", settings.rank.to_string()),
        ("ss_network_alpha", settings.alpha.to_string()),
        ("ss_network_dropout", settings.dropout.to_string()),
        (
            "ss_network_args",
            serde_json::Value::Object(network_args).to_string(),
        ),
        ("ss_base_model_version", "sd_v1".into()),
        ("ss_v2", "False".into()),
        (
            "ss_v_parameterization",
            (config.model.prediction_type == PredictionType::VPrediction).to_string(),
        ),
        ("ss_resolution", format!("({width}, {height})")),
        ("ss_sd_model_name", model_name),
        ("ss_output_name", config.job.name.clone()),
        ("ss_session_id", session_id(config).to_string()),
        ("ss_steps", record.step.to_string()),
        ("ss_epoch", record.epoch.to_string()),
        ("ss_num_epochs", config.schedule.epochs.to_string()),
        ("ss_batch_size_per_device", config.schedule.bsz.to_string()),
        ("ss_total_batch_size", global_batch.to_string()),
        (
            "ss_gradient_accumulation_steps",
            config.schedule.grad_accum.to_string(),
        ),
        ("ss_learning_rate", config.train.lr.clone()),
        ("ss_unet_lr", config.train.lr.clone()),
        (
            "ss_text_encoder_lr",
            if config.model.train_text_encoder {
                config.train.lr.clone()
            } else {
                "0".into()
            },
        ),
        ("ss_lr_scheduler", config.train.lr_scheduler.as_str().into()),
        (
            "ss_lr_warmup_steps",
            config.train.lr_warmup_steps.to_string(),
        ),
        ("ss_optimizer", "torch.optim.AdamW".into()),
        (
            "ss_mixed_precision",
            config.train.mixed_precision.as_str().into(),
        ),
        ("ss_max_grad_norm", config.train.max_grad_norm.to_string()),
        ("ss_seed", config.job.seed.to_string()),
        ("ss_clip_skip", config.model.clip_skip.to_string()),
        (
            "ss_max_token_length",
            (75 * config.model.max_chunks).to_string(),
        ),
        ("ss_noise_offset", config.train.noise_offset.to_string()),
        (
            "ss_min_snr_gamma",
            config
                .train
                .min_snr_gamma
                .map(|gamma| gamma.to_string())
                .unwrap_or_else(|| "None".into()),
        ),
        (
            "ss_caption_dropout_rate",
            config.data.caption_dropout.to_string(),
        ),
        (
            "ss_caption_tag_dropout_rate",
            config.data.tag_dropout.to_string(),
        ),
        ("ss_shuffle_caption", config.data.tag_shuffle.to_string()),
        ("ss_keep_tokens", config.data.keep_tokens.to_string()),
        ("ss_enable_bucket", "True".into()),
        ("ss_max_bucket_reso", config.buckets.max_dim.to_string()),
        ("ss_min_bucket_reso", config.buckets.min_dim.to_string()),
        ("ss_bucket_no_upscale", "False".into()),
        (
            "ss_training_comment",
            format!("trained with arbor ({})", config.job.name),
        ),
        ("ss_training_finished_at", timestamp.to_string()),
        ("modelspec.sai_model_spec", "1.0.0".into()),
        ("modelspec.architecture", "stable-diffusion-v1/lora".into()),
        ("modelspec.implementation", "diffusers".into()),
        ("modelspec.title", config.job.name.clone()),
        ("modelspec.resolution", format!("{width}x{height}")),
        (
            "modelspec.prediction_type",
            config.model.prediction_type.as_str().into(),
        ),
    ];
    if let Some(tag_frequency) = tag_frequency {
        metadata.push(("ss_tag_frequency", tag_frequency));
    }
    metadata
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

/// Writes kohya-layout `tensors` (see [`LoraNetwork::kohya_tensors`]) to `path` in `precision`,
/// with `metadata`.
pub fn write_kohya_file(
    path: &Path,
    tensors: &[(String, Tensor)],
    precision: SavePrecision,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let kind = kind_of(precision);
    let converted: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.to_kind(kind)))
        .collect();
    let bytes = safetensors_bytes_with_metadata(&converted, Some(metadata)).map_err(|message| {
        WorkerError::Weights {
            path: path.to_path_buf(),
            message,
        }
    })?;
    std::fs::write(path, bytes).map_err(WorkerError::io(path))
}

/// Reads a kohya-layout LoRA file: its modules by name, and its metadata strings. A key that is
/// not `<module>.lora_down.weight`, `.lora_up.weight` or `.alpha`, or a module without both
/// weights, is an error naming it.
pub fn read_kohya_file(path: &Path) -> Result<(Vec<KohyaModule>, BTreeMap<String, String>)> {
    let invalid = |message: String| WorkerError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(WorkerError::io(path))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|error| invalid(format!("is not a safetensors file: {error:?}")))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let (tensors, _) = tensors_from_safetensors(&bytes).map_err(invalid)?;
    type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, tensor) in tensors {
        let (module, slot) = if let Some(module) = key.strip_suffix(".lora_down.weight") {
            (module, 0)
        } else if let Some(module) = key.strip_suffix(".lora_up.weight") {
            (module, 1)
        } else if let Some(module) = key.strip_suffix(".alpha") {
            (module, 2)
        } else {
            return Err(invalid(format!(
                "key `{key}` is not a LoRA weight (`.lora_down.weight`, `.lora_up.weight` or \
                 `.alpha`)"
            )));
        };
        let entry = parts.entry(module.to_string()).or_default();
        match slot {
            0 => entry.0 = Some(tensor),
            1 => entry.1 = Some(tensor),
            _ => {
                if tensor.numel() != 1 {
                    return Err(invalid(format!(
                        "`{key}` has shape {:?}, expected a scalar",
                        tensor.size()
                    )));
                }
                entry.2 = Some(tensor.to_kind(Kind::Double).double_value(&[]))
            }
        }
    }
    let mut modules = Vec::with_capacity(parts.len());
    for (name, (down, up, alpha)) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(invalid(format!(
                "module `{name}` needs both `lora_down.weight` and `lora_up.weight`"
            )));
        };
        let rank = down.size()[0];
        if up.size().get(1) != Some(&rank) || !(2..=4).contains(&down.dim()) {
            return Err(invalid(format!(
                "module `{name}`: lora_down {:?} and lora_up {:?} do not share a rank",
                down.size(),
                up.size()
            )));
        }
        let alpha = alpha.unwrap_or(rank as f64);
        modules.push(KohyaModule {
            name,
            down,
            up,
            alpha,
        });
    }
    Ok((modules, metadata))
}
