//! Inference samplers with classifier-free guidance: DDIM (η = 0, diffusers' `DDIMScheduler`)
//! and Euler (diffusers' `EulerDiscreteScheduler` without churn), both driven by the UNet with
//! the guided prediction uc + (c − uc)·scale, the conditional and unconditional contexts batched
//! in one forward as diffusers' pipelines do.

/// Which sampler (`[samples] sampler` in job.toml).
pub use arbor_common::config::SamplerKind;
use tch::{Kind, Tensor};

use crate::attention::KvContextTransform;
use crate::ddpm::{DdpmSchedule, PredictionType, TimestepSpacing};
use crate::error::{Result, WorkerError};
use crate::unet_2d::UNet2DConditionModel;

/// A sampler's timestep (and, for Euler, sigma) sequence for a number of inference steps.
#[derive(Debug, Clone)]
pub struct Sampler {
    kind: SamplerKind,
    prediction_type: PredictionType,
    /// Training timesteps visited, from noisiest to cleanest.
    timesteps: Vec<f64>,
    /// Euler: σ at each visited timestep plus a final 0 (as f32 values). DDIM: empty.
    sigmas: Vec<f64>,
    /// DDIM: ᾱ at each visited timestep and at the step after it (f32 values).
    ddim_alphas: Vec<(f64, f64)>,
}

fn round_f32(value: f64) -> f64 {
    value as f32 as f64
}

/// numpy's `round` (half to even) for the timestep grids.
fn round_half_even(value: f64) -> f64 {
    let rounded = value.round();
    if (value - value.trunc()).abs() == 0.5 {
        return 2.0 * (value / 2.0).round();
    }
    rounded
}

fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: i64,
    steps: i64,
    offset: i64,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = train_steps / steps;
            (0..steps)
                .rev()
                .map(|index| (index * ratio + offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train_steps as f64 / steps as f64;
            (0..steps)
                .map(|index| round_half_even(train_steps as f64 - index as f64 * ratio) - 1.0)
                .collect()
        }
        TimestepSpacing::Linspace => (0..steps)
            .rev()
            .map(|index| {
                let last = (train_steps - 1) as f64;
                if steps == 1 {
                    0.0
                } else {
                    last * index as f64 / (steps - 1) as f64
                }
            })
            .collect(),
    }
}

impl Sampler {
    /// Builds the schedule of `steps` inference steps over `schedule`'s training steps, with the
    /// spacing and offset of its config.
    pub fn new(kind: SamplerKind, schedule: &DdpmSchedule, steps: i64) -> Result<Self> {
        let config = schedule.config();
        let train_steps = config.num_train_timesteps;
        if steps < 1 || steps > train_steps {
            return Err(WorkerError::Input {
                name: "steps".to_string(),
                message: format!("must lie in [1, {train_steps}], got {steps}"),
            });
        }
        let alphas_cumprod: Vec<f64> = Vec::<f32>::try_from(schedule.alphas_cumprod())
            .map_err(WorkerError::torch("reading alphas_cumprod"))?
            .into_iter()
            .map(f64::from)
            .collect();
        let mut sampler = Self {
            kind,
            prediction_type: config.prediction_type,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            ddim_alphas: Vec::new(),
        };
        match kind {
            SamplerKind::Ddim => {
                let spacing = config.timestep_spacing;
                let mut timesteps =
                    spaced_timesteps(spacing, train_steps, steps, config.steps_offset);
                if spacing == TimestepSpacing::Linspace {
                    timesteps = timesteps.into_iter().map(round_half_even).collect();
                }
                let final_alpha = if config.set_alpha_to_one {
                    1.0
                } else {
                    alphas_cumprod[0]
                };
                let ratio = train_steps / steps;
                for timestep in &timesteps {
                    let current = (*timestep as i64).clamp(0, train_steps - 1);
                    let previous = current - ratio;
                    let previous_alpha = if previous >= 0 {
                        alphas_cumprod[previous as usize]
                    } else {
                        final_alpha
                    };
                    sampler
                        .ddim_alphas
                        .push((alphas_cumprod[current as usize], previous_alpha));
                }
                sampler.timesteps = timesteps;
            }
            SamplerKind::Euler => {
                let timesteps = spaced_timesteps(
                    config.timestep_spacing,
                    train_steps,
                    steps,
                    config.steps_offset,
                )
                .into_iter()
                .map(round_f32)
                .collect::<Vec<_>>();
                // σ_t = sqrt((1 − ᾱ)/ᾱ) computed in f32 as diffusers does, then interpolated
                let all_sigmas: Vec<f64> = alphas_cumprod
                    .iter()
                    .map(|alpha| {
                        let alpha = *alpha as f32;
                        f64::from(((1.0 - alpha) / alpha).sqrt())
                    })
                    .collect();
                for timestep in &timesteps {
                    let clamped = timestep.clamp(0.0, (train_steps - 1) as f64);
                    let low = clamped.floor() as usize;
                    let high = (low + 1).min(all_sigmas.len() - 1);
                    let fraction = clamped - low as f64;
                    let sigma = all_sigmas[low] + (all_sigmas[high] - all_sigmas[low]) * fraction;
                    sampler.sigmas.push(round_f32(sigma));
                }
                sampler.sigmas.push(0.0);
                sampler.timesteps = timesteps;
            }
        }
        Ok(sampler)
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The training timesteps the sampler visits, noisiest first.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The factor initial standard-normal noise is scaled by.
    pub fn init_noise_sigma(&self, spacing: TimestepSpacing) -> f64 {
        match self.kind {
            SamplerKind::Ddim => 1.0,
            SamplerKind::Euler => {
                let max_sigma = self.sigmas.iter().copied().fold(0.0, f64::max);
                match spacing {
                    TimestepSpacing::Leading => round_f32((max_sigma * max_sigma + 1.0).sqrt()),
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
                }
            }
        }
    }

    /// Scales the latents before the UNet sees them at step `index`.
    pub fn scale_model_input(&self, latents: &Tensor, index: usize) -> Tensor {
        match self.kind {
            SamplerKind::Ddim => latents.shallow_clone(),
            SamplerKind::Euler => {
                let sigma = self.sigmas[index];
                latents / round_f32((sigma * sigma + 1.0).sqrt())
            }
        }
    }

    /// One update of `latents` given the (guided) model output at step `index`.
    pub fn step(&self, model_output: &Tensor, index: usize, latents: &Tensor) -> Tensor {
        match self.kind {
            SamplerKind::Ddim => {
                let (alpha, previous_alpha) = self.ddim_alphas[index];
                let beta = 1.0 - alpha;
                let (original, epsilon) = match self.prediction_type {
                    PredictionType::Epsilon => (
                        (latents - model_output * beta.sqrt()) / alpha.sqrt(),
                        model_output.shallow_clone(),
                    ),
                    PredictionType::VPrediction => (
                        latents * alpha.sqrt() - model_output * beta.sqrt(),
                        model_output * alpha.sqrt() + latents * beta.sqrt(),
                    ),
                };
                original * previous_alpha.sqrt() + epsilon * (1.0 - previous_alpha).sqrt()
            }
            SamplerKind::Euler => {
                let sigma = self.sigmas[index];
                let next_sigma = self.sigmas[index + 1];
                let original = match self.prediction_type {
                    PredictionType::Epsilon => latents - model_output * sigma,
                    PredictionType::VPrediction => {
                        model_output * (-sigma / (sigma * sigma + 1.0).sqrt())
                            + latents / (sigma * sigma + 1.0)
                    }
                };
                let derivative = (latents - original) / sigma;
                latents + derivative * round_f32(next_sigma - sigma)
            }
        }
    }
}

/// The prompts and guidance of one sampling run.
#[derive(Debug)]
pub struct GuidedPrompt<'a> {
    /// Conditional context [B, 77·n, D].
    pub context: &'a Tensor,
    /// Unconditional context, padded to the same chunk count: [B, 77·n, D].
    pub uncond_context: &'a Tensor,
    pub guidance_scale: f64,
}

/// Runs the sampler from standard-normal `noise` [B, C, h, w] and returns the final latents
/// (unscaled by the VAE factor: divide by it before decoding).
pub fn sample(
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    sampler: &Sampler,
    prompt: &GuidedPrompt,
    noise: &Tensor,
    kv_transform: Option<&dyn KvContextTransform>,
) -> Result<Tensor> {
    if prompt.context.size() != prompt.uncond_context.size() {
        return Err(WorkerError::Input {
            name: "uncond_context".to_string(),
            message: format!(
                "shape {:?} differs from the prompt context's {:?} (pad the negative prompt to the same chunk count)",
                prompt.uncond_context.size(),
                prompt.context.size()
            ),
        });
    }
    let batch = noise.size().first().copied().unwrap_or(0);
    if prompt.context.size().first() != Some(&batch) {
        return Err(WorkerError::Input {
            name: "context".to_string(),
            message: format!(
                "batch {:?} differs from the noise batch {batch}",
                prompt.context.size().first()
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    let contexts = Tensor::cat(&[prompt.uncond_context, prompt.context], 0);
    let mut latents = noise * sampler.init_noise_sigma(schedule.config().timestep_spacing);
    for (index, timestep) in sampler.timesteps().iter().enumerate() {
        let scaled = sampler.scale_model_input(&latents, index);
        let model_input = Tensor::cat(&[&scaled, &scaled], 0);
        let timesteps = Tensor::from_slice(&[*timestep as f32])
            .to_device(noise.device())
            .expand([2 * batch], false);
        let prediction = unet.try_forward(&model_input, &timesteps, &contexts, kv_transform)?;
        let halves = prediction.chunk(2, 0);
        let guided = &halves[0] + (&halves[1] - &halves[0]) * prompt.guidance_scale;
        latents = sampler.step(&guided, index, &latents.to_kind(Kind::Float));
    }
    Ok(latents)
}
