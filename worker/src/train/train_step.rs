//! One diffusion training step of the UNet: noise the latents per sample, predict, and take the
//! mean-squared error against the schedule's target (epsilon, or v for v-prediction) — the loss
//! diffusers' training scripts use — then backpropagate into every trainable variable.

use tch::{nn, Kind, Reduction, Tensor};

use crate::attention::KvContextTransform;
use crate::ddpm::DdpmSchedule;
use crate::error::{Result, WorkerError};
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::unet_2d::UNet2DConditionModel;

/// The inputs of one step: latents (already scaled by the VAE's factor), the noise, one
/// timestep per sample and the text conditioning.
#[derive(Debug)]
pub struct DiffusionBatch<'a> {
    pub latents: &'a Tensor,
    pub noise: &'a Tensor,
    pub timesteps: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
}

/// The forward half of a step.
#[derive(Debug)]
pub struct DiffusionLoss {
    /// The noised latents the UNet saw.
    pub noisy: Tensor,
    /// Scalar mean-squared error (still attached to the autograd graph).
    pub loss: Tensor,
}

/// Noises the batch, runs the UNet and returns the MSE against the training target.
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    batch: &DiffusionBatch,
    kv_transform: Option<&dyn KvContextTransform>,
) -> Result<DiffusionLoss> {
    weighted_diffusion_loss(unet, schedule, batch, kv_transform, None)
}

/// [`diffusion_loss`] with min-SNR-γ weighting when `min_snr_gamma` is set: each sample's mean
/// squared error times [`DdpmSchedule::min_snr_weights`], then the mean over the batch.
pub fn weighted_diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    batch: &DiffusionBatch,
    kv_transform: Option<&dyn KvContextTransform>,
    min_snr_gamma: Option<f64>,
) -> Result<DiffusionLoss> {
    let latents_shape = batch.latents.size();
    if batch.noise.size() != latents_shape {
        return Err(WorkerError::Input {
            name: "noise".to_string(),
            message: format!(
                "shape {:?} differs from the latents' {latents_shape:?}",
                batch.noise.size()
            ),
        });
    }
    let batch_size = latents_shape.first().copied().unwrap_or(0);
    schedule.check_timesteps(batch.timesteps, batch_size)?;
    let noisy = schedule.add_noise(batch.latents, batch.noise, batch.timesteps);
    let prediction = unet.try_forward(
        &noisy,
        batch.timesteps,
        batch.encoder_hidden_states,
        kv_transform,
    )?;
    let target = schedule.training_target(batch.latents, batch.noise, batch.timesteps);
    let loss = match min_snr_gamma {
        None => prediction.mse_loss(&target, Reduction::Mean),
        Some(gamma) => {
            let squared = (prediction.to_kind(Kind::Float) - target.to_kind(Kind::Float)).square();
            let dims: Vec<i64> = (1..squared.dim() as i64).collect();
            let per_sample = squared.mean_dim(dims.as_slice(), false, Kind::Float);
            let weights =
                schedule.min_snr_weights(&batch.timesteps.to_device(per_sample.device()), gamma);
            (per_sample * weights).mean(Kind::Float)
        }
    };
    Ok(DiffusionLoss { noisy, loss })
}

/// The loss of a step and the gradient of every trainable variable, by state-dict name.
#[derive(Debug)]
pub struct LossAndGradients {
    pub noisy: Tensor,
    pub loss: f64,
    /// Sorted by name; variables the loss does not reach get zeros.
    pub gradients: Vec<(String, Tensor)>,
}

/// Zeroes the gradients of `var_store`, computes the loss and backpropagates it.
pub fn loss_and_gradients(
    var_store: &nn::VarStore,
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    batch: &DiffusionBatch,
    kv_transform: Option<&dyn KvContextTransform>,
) -> Result<LossAndGradients> {
    let mut variables: Vec<(String, Tensor)> = var_store.variables().into_iter().collect();
    variables.sort_by(|left, right| left.0.cmp(&right.0));
    for (_, variable) in &mut variables {
        if variable.requires_grad() {
            variable.zero_grad();
        }
    }
    let DiffusionLoss { noisy, loss } = diffusion_loss(unet, schedule, batch, kv_transform)?;
    loss.f_backward()
        .map_err(WorkerError::torch("backpropagating the diffusion loss"))?;
    let gradients = variables
        .into_iter()
        .filter(|(_, variable)| variable.requires_grad())
        .map(|(name, variable)| {
            let gradient = variable.grad();
            let gradient = if gradient.defined() {
                gradient.detach().copy()
            } else {
                variable.zeros_like()
            };
            (name, gradient)
        })
        .collect();
    Ok(LossAndGradients {
        noisy: noisy.detach(),
        loss: loss.double_value(&[]),
        gradients,
    })
}

/// arbor's AdamW ([`crate::train::adamw`], torch's fused kernel) over every trainable variable
/// of `var_store`, with PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and the given weight decay.
pub fn adamw(var_store: &nn::VarStore, weight_decay: f64) -> AdamW {
    let mut parameters: Vec<(String, Tensor)> = var_store
        .variables()
        .into_iter()
        .filter(|(_, variable)| variable.requires_grad())
        .collect();
    parameters.sort_by(|left, right| left.0.cmp(&right.0));
    AdamW::new(
        parameters,
        AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        },
    )
}

/// One full step: reset the gradients, forward, backward, optimizer step at `learning_rate`.
/// Returns the loss.
pub fn optimizer_step(
    optimizer: &mut AdamW,
    learning_rate: f64,
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    batch: &DiffusionBatch,
    kv_transform: Option<&dyn KvContextTransform>,
) -> Result<f64> {
    optimizer.zero_grad()?;
    let DiffusionLoss { loss, .. } = diffusion_loss(unet, schedule, batch, kv_transform)?;
    loss.f_backward()
        .map_err(WorkerError::torch("backpropagating the diffusion loss"))?;
    optimizer.step(learning_rate)?;
    Ok(loss.double_value(&[]))
}
