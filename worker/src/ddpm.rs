//! The DDPM noise schedule of Stable Diffusion (diffusers' `DDPMScheduler` training side):
//! scaled_linear betas 0.00085–0.012 over 1000 steps, per-sample `add_noise`, the v-prediction
//! target, and the settings the samplers share (read from a diffusers `scheduler_config.json`).

use std::path::Path;

pub use arbor_common::config::PredictionType;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::diffusers_config::load_diffusers_config;
use crate::error::{Result, WorkerError};

/// How betas are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in sqrt(beta), then squared (Stable Diffusion's).
    ScaledLinear,
    Linear,
}

/// How inference timesteps are spread over the training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The scheduler settings from a diffusers `scheduler/scheduler_config.json` (any of the
/// DDPM/DDIM/PNDM/Euler schedulers). Unknown keys are ignored on purpose (an upstream format);
/// keys that would change the schedule are checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: i64,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub steps_offset: i64,
    /// DDIM's final ᾱ is 1 (true, diffusers' default when the key is absent) or ᾱ_0.
    pub set_alpha_to_one: bool,
    pub timestep_spacing: TimestepSpacing,
    trained_betas: Option<serde_json::Value>,
    rescale_betas_zero_snr: bool,
}

/// The values of keys a `scheduler_config.json` leaves out: Stable Diffusion 1.x's schedule
/// (scaled_linear 0.00085–0.012 over 1000 steps, epsilon, `steps_offset` 1), which every SD1
/// folder writes out anyway, rather than `DDPMScheduler.__init__`'s linear 0.0001–0.02
/// (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddpm.py>);
/// `set_alpha_to_one` is `DDIMScheduler.__init__`'s true
/// (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddim.py>).
impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            set_alpha_to_one: true,
            timestep_spacing: TimestepSpacing::Leading,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.x (its scheduler_config.json): scaled_linear 0.00085–0.012, 1000
    /// steps, epsilon, steps_offset 1, set_alpha_to_one false.
    pub fn sd1() -> Self {
        Self {
            set_alpha_to_one: false,
            ..Self::default()
        }
    }

    /// Reads and validates a diffusers `scheduler_config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let config: Self = load_diffusers_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, source: &Path) -> Result<()> {
        let error = |field: &str, message: &str| WorkerError::Config {
            path: source.to_path_buf(),
            field: field.to_string(),
            message: message.to_string(),
        };
        if self.num_train_timesteps < 2 {
            return Err(error("num_train_timesteps", "must be at least 2"));
        }
        if !(self.beta_start > 0.0 && self.beta_start < self.beta_end && self.beta_end < 1.0) {
            return Err(error("beta_start", "needs 0 < beta_start < beta_end < 1"));
        }
        if self
            .trained_betas
            .as_ref()
            .is_some_and(|value| !value.is_null())
        {
            return Err(error("trained_betas", "must be null"));
        }
        if self.rescale_betas_zero_snr {
            return Err(error("rescale_betas_zero_snr", "must be false"));
        }
        if self.steps_offset < 0 {
            return Err(error("steps_offset", "must not be negative"));
        }
        Ok(())
    }
}

/// The forward-process schedule: betas, alphas_cumprod, noising and targets.
#[derive(Debug)]
pub struct DdpmSchedule {
    config: SchedulerConfig,
    /// f32 [num_train_timesteps], computed as diffusers computes it (float32 throughout).
    alphas_cumprod: Tensor,
    /// The same table on the device the model trains on ([`DdpmSchedule::keep_on`]), so noising
    /// a batch copies nothing from the host.
    alphas_cumprod_on_device: Option<Tensor>,
}

impl DdpmSchedule {
    pub fn new(config: &SchedulerConfig) -> Self {
        let steps = config.num_train_timesteps;
        let options = (Kind::Float, Device::Cpu);
        let betas = match config.beta_schedule {
            BetaSchedule::ScaledLinear => Tensor::linspace(
                config.beta_start.sqrt(),
                config.beta_end.sqrt(),
                steps,
                options,
            )
            .pow_tensor_scalar(2),
            BetaSchedule::Linear => {
                Tensor::linspace(config.beta_start, config.beta_end, steps, options)
            }
        };
        let alphas = betas.neg() + 1.0;
        let alphas_cumprod = alphas.cumprod(0, Kind::Float);
        Self {
            config: config.clone(),
            alphas_cumprod,
            alphas_cumprod_on_device: None,
        }
    }

    /// Keeps a copy of the table on `device` for noising batches there (one copy, now).
    pub fn keep_on(&mut self, device: Device) {
        self.alphas_cumprod_on_device =
            (device != Device::Cpu).then(|| self.alphas_cumprod.to_device(device));
    }

    /// Stable Diffusion 1.x's schedule.
    pub fn sd1() -> Self {
        Self::new(&SchedulerConfig::sd1())
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> i64 {
        self.config.num_train_timesteps
    }

    /// ᾱ_t for every training step, f32 on the CPU.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// ᾱ at one training step (f64, for the samplers' scalar arithmetic).
    pub fn alpha_cumprod_at(&self, timestep: i64) -> f64 {
        self.alphas_cumprod.double_value(&[timestep])
    }

    /// Checks `timesteps` is an integer tensor of one timestep per sample of `batch`, each in
    /// [0, num_train_timesteps). The range is checked on CPU tensors only: reading a device
    /// tensor's values would wait for the device (an out-of-range index there still fails, in
    /// the device's own bounds check).
    pub fn check_timesteps(&self, timesteps: &Tensor, batch: i64) -> Result<()> {
        let error = |message: String| WorkerError::Input {
            name: "timesteps".to_string(),
            message,
        };
        if timesteps.is_floating_point() || timesteps.kind() == Kind::Bool {
            return Err(error(format!(
                "expected integers, got {:?}",
                timesteps.kind()
            )));
        }
        if timesteps.size() != [batch] {
            return Err(error(format!(
                "expected one per sample [{batch}], got {:?}",
                timesteps.size()
            )));
        }
        if batch == 0 || timesteps.device() != Device::Cpu {
            return Ok(());
        }
        let low = timesteps.min().int64_value(&[]);
        let high = timesteps.max().int64_value(&[]);
        if low < 0 || high >= self.config.num_train_timesteps {
            return Err(error(format!(
                "values must lie in [0, {}), got [{low}, {high}]",
                self.config.num_train_timesteps
            )));
        }
        Ok(())
    }

    /// (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) per sample, shaped [B, 1, …] to broadcast against `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let table = self
            .alphas_cumprod_on_device
            .as_ref()
            .filter(|table| table.device() == like.device())
            .unwrap_or(&self.alphas_cumprod);
        let alphas_cumprod = table.to_device(like.device()).to_kind(like.kind());
        let selected =
            alphas_cumprod.index_select(0, &timesteps.to_device(like.device()).reshape([-1]));
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        let sqrt_alpha = selected.pow_tensor_scalar(0.5).reshape(shape.as_slice());
        let sqrt_one_minus_alpha = (selected.neg() + 1.0)
            .pow_tensor_scalar(0.5)
            .reshape(shape.as_slice());
        (sqrt_alpha, sqrt_one_minus_alpha)
    }

    /// x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, with one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, x0);
        sqrt_alpha * x0 + sqrt_one_minus_alpha * noise
    }

    /// The v-prediction target v = sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·x0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(timesteps, x0);
        sqrt_alpha * noise - sqrt_one_minus_alpha * x0
    }

    /// The signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per sample [B], fp32, on `timesteps`' device
    /// (diffusers' `compute_snr`).
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        let device = timesteps.device();
        let table = self
            .alphas_cumprod_on_device
            .as_ref()
            .filter(|table| table.device() == device)
            .unwrap_or(&self.alphas_cumprod);
        let selected = table
            .to_device(device)
            .to_kind(Kind::Float)
            .index_select(0, &timesteps.reshape([-1]));
        &selected / (selected.neg() + 1.0)
    }

    /// Min-SNR-γ loss weights per sample [B] (Hang et al. 2023, as diffusers'
    /// `train_text_to_image.py` computes them): min(SNR, γ)/SNR for epsilon prediction,
    /// min(SNR, γ)/(SNR + 1) for v-prediction.
    pub fn min_snr_weights(&self, timesteps: &Tensor, gamma: f64) -> Tensor {
        let snr = self.snr(timesteps);
        let clamped = snr.clamp_max(gamma);
        match self.config.prediction_type {
            PredictionType::Epsilon => clamped / snr,
            PredictionType::VPrediction => clamped / (snr + 1.0),
        }
    }

    /// What the UNet is trained to predict under the configured prediction type.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        match self.config.prediction_type {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
        }
    }
}
