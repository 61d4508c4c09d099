//! `arbor-worker probe`: runs a model on named input tensors and returns named outputs, so a
//! converted or exported model can be compared with what diffusers/transformers compute.
//!
//! | inputs | outputs |
//! |---|---|
//! | `clip.input_ids` [B,77] | `clip.last_hidden_state`, `clip.penultimate_ln` |
//! | `clip.chunked_input_ids` [B,77·n] | `clip.chunked_penultimate_ln` (at `clip_skip`, default 2) |
//! | `unet.sample`, `unet.timesteps`, `unet.encoder_hidden_states` | `unet.out` |
//! | `vae.image` | `vae.posterior_mean`, `vae.posterior_logvar`, `vae.latents_scaled`, `vae.decode_of_mean` |
//! | `ddpm.x0`, `ddpm.noise`, `ddpm.timesteps` | `ddpm.noisy`, `ddpm.velocity`; always `ddpm.alphas_cumprod` |
//! | `train.latents`, `train.noise`, `train.timesteps`, `train.encoder_hidden_states` | `train.noisy`, `train.loss`, `train.grad.<param>` |
//! | `hn.sample`, `hn.timesteps`, `hn.encoder_hidden_states`, `hn.target` (with `--hypernetwork`) | `hn.unet_out`, `hn.loss` (MSE, mean), `hn.grad.<size>.<k\|v>.<A1111 key>` (multiplier 1, no penalty) |
//!
//! Only the components the inputs need are loaded. The schedule comes from the model's
//! `scheduler/scheduler_config.json` (or `--config`'s), else SD1's.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use tracing::warn;

use crate::clip::DEFAULT_CLIP_SKIP;
use crate::error::{Result, WorkerError};
use crate::hypernetwork::Hypernetwork;
use crate::model_components::ModelComponents;
use crate::prompt::PromptLayout;
use crate::train::train_step::{loss_and_gradients, DiffusionBatch};
use crate::weights::Component;

/// An input group: its prefix and the names it needs.
struct InputGroup {
    names: &'static [&'static str],
}

const CLIP_IDS: InputGroup = InputGroup {
    names: &["clip.input_ids"],
};
const CLIP_CHUNKED: InputGroup = InputGroup {
    names: &["clip.chunked_input_ids"],
};
const UNET: InputGroup = InputGroup {
    names: &[
        "unet.sample",
        "unet.timesteps",
        "unet.encoder_hidden_states",
    ],
};
const TRAIN: InputGroup = InputGroup {
    names: &[
        "train.latents",
        "train.noise",
        "train.timesteps",
        "train.encoder_hidden_states",
    ],
};
const VAE: InputGroup = InputGroup {
    names: &["vae.image"],
};
const DDPM: InputGroup = InputGroup {
    names: &["ddpm.x0", "ddpm.noise", "ddpm.timesteps"],
};
const HYPERNETWORK: InputGroup = InputGroup {
    names: &[
        "hn.sample",
        "hn.timesteps",
        "hn.encoder_hidden_states",
        "hn.target",
    ],
};
const GROUPS: [&InputGroup; 7] = [
    &CLIP_IDS,
    &CLIP_CHUNKED,
    &UNET,
    &TRAIN,
    &VAE,
    &DDPM,
    &HYPERNETWORK,
];

/// Options of a probe run.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub model: PathBuf,
    /// A diffusers folder to take component configs from (single-file models of non-SD1 shape).
    pub config_dir: Option<PathBuf>,
    /// The CLIP layer of `clip.chunked_penultimate_ln` (2 = penultimate).
    pub clip_skip: usize,
    pub device: Device,
    /// An A1111 hypernetwork `.pt` for the `hn.*` inputs.
    pub hypernetwork: Option<PathBuf>,
}

impl ProbeOptions {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            config_dir: None,
            clip_skip: DEFAULT_CLIP_SKIP,
            device: Device::Cpu,
            hypernetwork: None,
        }
    }
}

/// Whether every input of a group is present; an incomplete group is an error naming the
/// missing input.
fn group_present(inputs: &HashMap<String, Tensor>, group: &InputGroup) -> Result<bool> {
    let present: Vec<&str> = group
        .names
        .iter()
        .copied()
        .filter(|name| inputs.contains_key(*name))
        .collect();
    if present.is_empty() {
        return Ok(false);
    }
    if let Some(missing) = group.names.iter().find(|name| !inputs.contains_key(**name)) {
        return Err(WorkerError::Input {
            name: (*missing).to_string(),
            message: format!("is missing while {} is given", present.join(", ")),
        });
    }
    Ok(true)
}

fn input(inputs: &HashMap<String, Tensor>, name: &str, device: Device) -> Result<Tensor> {
    inputs
        .get(name)
        .map(|tensor| tensor.to_device(device))
        .ok_or_else(|| WorkerError::Input {
            name: name.to_string(),
            message: "is missing".to_string(),
        })
}

fn check_same_shape(name: &str, tensor: &Tensor, like: &Tensor) -> Result<()> {
    if tensor.size() == like.size() {
        return Ok(());
    }
    Err(WorkerError::Input {
        name: name.to_string(),
        message: format!("has shape {:?}, expected {:?}", tensor.size(), like.size()),
    })
}

fn float_input(inputs: &HashMap<String, Tensor>, name: &str, device: Device) -> Result<Tensor> {
    let tensor = input(inputs, name, device)?;
    if !tensor.is_floating_point() {
        return Err(WorkerError::Input {
            name: name.to_string(),
            message: format!(
                "has kind {:?}, expected a floating-point tensor",
                tensor.kind()
            ),
        });
    }
    Ok(tensor.to_kind(Kind::Float))
}

/// Runs the probe and returns every output whose inputs are present.
pub fn run_probe(
    options: &ProbeOptions,
    inputs: &HashMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let known: Vec<&str> = GROUPS
        .iter()
        .flat_map(|group| group.names.iter().copied())
        .collect();
    let unknown: Vec<&String> = inputs
        .keys()
        .filter(|name| !known.contains(&name.as_str()))
        .collect();
    if !unknown.is_empty() {
        warn!(count = unknown.len(), first = %unknown[0], "probe inputs with unknown names were ignored");
    }
    let wants_clip = group_present(inputs, &CLIP_IDS)? | group_present(inputs, &CLIP_CHUNKED)?;
    let wants_unet = group_present(inputs, &UNET)?;
    let wants_train = group_present(inputs, &TRAIN)?;
    let wants_vae = group_present(inputs, &VAE)?;
    let wants_ddpm = group_present(inputs, &DDPM)?;
    let wants_hypernetwork = group_present(inputs, &HYPERNETWORK)?;
    if wants_hypernetwork && options.hypernetwork.is_none() {
        return Err(WorkerError::Input {
            name: "hn.sample".to_string(),
            message: "needs --hypernetwork FILE".to_string(),
        });
    }
    let mut needed = Vec::new();
    if wants_clip {
        needed.push(Component::TextEncoder);
    }
    if wants_unet || wants_train || wants_hypernetwork {
        needed.push(Component::Unet);
    }
    if wants_vae {
        needed.push(Component::Vae);
    }
    let components = ModelComponents::open(
        &options.model,
        options.config_dir.as_deref(),
        &needed,
        options.device,
    )?;
    let device = options.device;
    let mut outputs = BTreeMap::new();
    let schedule = components.schedule()?;
    outputs.insert(
        "ddpm.alphas_cumprod".to_string(),
        schedule.alphas_cumprod().shallow_clone(),
    );
    if wants_ddpm {
        let x0 = float_input(inputs, "ddpm.x0", device)?;
        let noise = float_input(inputs, "ddpm.noise", device)?;
        let timesteps = input(inputs, "ddpm.timesteps", device)?;
        check_same_shape("ddpm.noise", &noise, &x0)?;
        schedule.check_timesteps(&timesteps, x0.size()[0])?;
        outputs.insert(
            "ddpm.noisy".to_string(),
            schedule.add_noise(&x0, &noise, &timesteps),
        );
        outputs.insert(
            "ddpm.velocity".to_string(),
            schedule.velocity(&x0, &noise, &timesteps),
        );
    }

    if wants_clip {
        let (_var_store, clip) = components.text_encoder()?;
        let _guard = tch::no_grad_guard();
        if inputs.contains_key("clip.input_ids") {
            let ids = input(inputs, "clip.input_ids", device)?;
            outputs.insert("clip.last_hidden_state".to_string(), clip.encode(&ids, 1)?);
            outputs.insert("clip.penultimate_ln".to_string(), clip.encode(&ids, 2)?);
        }
        if inputs.contains_key("clip.chunked_input_ids") {
            let ids = input(inputs, "clip.chunked_input_ids", device)?;
            outputs.insert(
                "clip.chunked_penultimate_ln".to_string(),
                clip.encode_chunked(&ids, options.clip_skip, PromptLayout::Chunked)?,
            );
        }
    }

    if let (true, Some(path)) = (wants_hypernetwork, &options.hypernetwork) {
        let (_var_store, unet) = components.unet()?;
        let hypernetwork = Hypernetwork::load_pt(path, device)?;
        let output = unet.try_forward(
            &float_input(inputs, "hn.sample", device)?,
            &input(inputs, "hn.timesteps", device)?,
            &float_input(inputs, "hn.encoder_hidden_states", device)?,
            Some(&hypernetwork),
        )?;
        let target = float_input(inputs, "hn.target", device)?;
        check_same_shape("hn.target", &target, &output)?;
        let loss = output.mse_loss(&target, tch::Reduction::Mean);
        loss.f_backward()
            .map_err(WorkerError::torch("backpropagating the hypernetwork loss"))?;
        outputs.insert("hn.unet_out".to_string(), output.detach());
        outputs.insert("hn.loss".to_string(), loss.detach());
        for (name, gradient) in hypernetwork.gradients() {
            outputs.insert(format!("hn.grad.{name}"), gradient);
        }
    }

    if wants_unet || wants_train {
        let (var_store, unet) = components.unet()?;
        if wants_unet {
            let _guard = tch::no_grad_guard();
            let output = unet.try_forward(
                &float_input(inputs, "unet.sample", device)?,
                &input(inputs, "unet.timesteps", device)?,
                &float_input(inputs, "unet.encoder_hidden_states", device)?,
                None,
            )?;
            outputs.insert("unet.out".to_string(), output);
        }
        if wants_train {
            let latents = float_input(inputs, "train.latents", device)?;
            let noise = float_input(inputs, "train.noise", device)?;
            let timesteps = input(inputs, "train.timesteps", device)?;
            let context = float_input(inputs, "train.encoder_hidden_states", device)?;
            let batch = DiffusionBatch {
                latents: &latents,
                noise: &noise,
                timesteps: &timesteps,
                encoder_hidden_states: &context,
            };
            let step = loss_and_gradients(&var_store, &unet, &schedule, &batch, None)?;
            outputs.insert("train.noisy".to_string(), step.noisy);
            outputs.insert("train.loss".to_string(), Tensor::from(step.loss as f32));
            for (name, gradient) in step.gradients {
                outputs.insert(format!("train.grad.{name}"), gradient);
            }
        }
    }

    if wants_vae {
        let (_var_store, vae) = components.vae()?;
        let image = float_input(inputs, "vae.image", device)?;
        vae.check_image(&image)?;
        let _guard = tch::no_grad_guard();
        let posterior = vae.encode(&image);
        outputs.insert(
            "vae.latents_scaled".to_string(),
            &posterior.mean * vae.scaling_factor(),
        );
        outputs.insert(
            "vae.decode_of_mean".to_string(),
            vae.decode(&posterior.mean),
        );
        outputs.insert("vae.posterior_mean".to_string(), posterior.mean);
        outputs.insert("vae.posterior_logvar".to_string(), posterior.logvar);
    }
    Ok(outputs
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_device(Device::Cpu).contiguous()))
        .collect())
}
