//! Shared by the distributed-step, resume and checkpoint tests: a tiny SD-topology UNet (random
//! weights from a fixed seed), optionally frozen under a hypernetwork, fixed per-step batches
//! drawn from a counter-based stream (not libtorch's global generator), and tensor comparisons.

use std::path::Path;

use anyhow::{Context, Result};
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::hypernetwork::module::HypernetworkStructure;
use arbor_worker::hypernetwork::{Hypernetwork, HypernetworkInfo};
use arbor_worker::train::train_step::{diffusion_loss, DiffusionBatch};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, Device, Kind, Tensor};

/// The text context width of the tiny UNet (differs from every block width, as SD1's 768).
pub const CONTEXT_WIDTH: i64 = 48;
pub const CONTEXT_TOKENS: i64 = 8;
pub const LATENT_SIZE: i64 = 8;

/// libtorch's default generator is global and the tests of one binary run in parallel threads:
/// building a model (which draws its initial weights) holds this lock.
static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SD1's topology scaled down: cross-attention down blocks then a plain one, mirrored up blocks.
pub fn tiny_unet_config() -> UNet2DConditionConfig {
    let value = serde_json::json!({
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": CONTEXT_WIDTH,
        "norm_num_groups": 32,
    });
    UNet2DConditionConfig::from_diffusers_value(&value, Path::new("<tiny unet>"))
        .expect("the tiny unet config is valid")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// Every UNet parameter trains.
    Finetune,
    /// The UNet is frozen; a hypernetwork (sizes: the context width and the block widths) trains.
    Hypernetwork,
}

impl TrainMode {
    pub fn name(self) -> &'static str {
        match self {
            TrainMode::Finetune => "finetune",
            TrainMode::Hypernetwork => "hypernetwork",
        }
    }
}

pub struct TinyModel {
    pub unet_vars: nn::VarStore,
    pub unet: UNet2DConditionModel,
    pub hypernetwork: Option<Hypernetwork>,
    pub schedule: DdpmSchedule,
}

/// The tiny model with weights drawn from `seed`. Random init leaves some outputs tiny, so every
/// UNet parameter is perturbed (as the parity fixtures do), making each one matter to the loss.
pub fn build_tiny_model(mode: TrainMode, seed: i64) -> TinyModel {
    let _rng = rng_lock();
    tch::manual_seed(seed);
    let mut unet_vars = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(unet_vars.root(), &tiny_unet_config());
    // `variables()` is a HashMap whose order differs per instance: perturb in name order, so two
    // models built from one seed (in one process or two) are identical.
    let mut variables: Vec<(String, Tensor)> = unet_vars.variables().into_iter().collect();
    variables.sort_by(|left, right| left.0.cmp(&right.0));
    tch::no_grad(|| {
        for (_, mut variable) in variables {
            let perturbation = variable.randn_like() * 0.02;
            let _ = variable.f_add_(&perturbation);
        }
    });
    let hypernetwork = match mode {
        TrainMode::Finetune => None,
        TrainMode::Hypernetwork => {
            unet_vars.freeze();
            let mut hypernetwork = Hypernetwork::new(
                &[CONTEXT_WIDTH, 32, 64],
                HypernetworkStructure::default(),
                HypernetworkInfo {
                    name: "test".to_string(),
                    ..Default::default()
                },
                Device::Cpu,
            )
            .expect("a valid hypernetwork");
            hypernetwork.train = true;
            Some(hypernetwork)
        }
    };
    TinyModel {
        unet_vars,
        unet,
        hypernetwork,
        schedule: DdpmSchedule::sd1(),
    }
}

impl TinyModel {
    /// The trainable variables (shallow clones), sorted by name: the same order on every rank.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let store = match &self.hypernetwork {
            Some(hypernetwork) => hypernetwork.var_store(),
            None => &self.unet_vars,
        };
        let mut variables: Vec<(String, Tensor)> = store
            .variables()
            .into_iter()
            .filter(|(_, variable)| variable.requires_grad())
            .collect();
        variables.sort_by(|left, right| left.0.cmp(&right.0));
        variables
    }

    /// The diffusion loss of `batch` (attached to the graph).
    pub fn loss(&self, batch: &StepBatch) -> Result<Tensor> {
        let inputs = DiffusionBatch {
            latents: &batch.latents,
            noise: &batch.noise,
            timesteps: &batch.timesteps,
            encoder_hidden_states: &batch.context,
        };
        let kv_transform = self
            .hypernetwork
            .as_ref()
            .map(|hypernetwork| hypernetwork as &dyn arbor_worker::attention::KvContextTransform);
        Ok(diffusion_loss(&self.unet, &self.schedule, &inputs, kv_transform)?.loss)
    }

    /// Backpropagates `loss(batch) / divisor` (the caller's share of a gradient-accumulation
    /// window); returns the undivided loss.
    pub fn backward(&self, batch: &StepBatch, divisor: f64) -> Result<f64> {
        let loss = self.loss(batch)?;
        let value = loss.double_value(&[]);
        (loss / divisor)
            .f_backward()
            .context("backpropagating the test loss")?;
        Ok(value)
    }
}

/// One step's inputs.
#[derive(Debug)]
pub struct StepBatch {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub context: Tensor,
}

fn normal_values(rng: &mut ChaCha8Rng, count: usize) -> Vec<f32> {
    // Box-Muller from the counter-based stream.
    (0..count)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// The fixed batch of optimizer step `step` (`batch_size` samples), the same in every process.
pub fn step_batch(step: u64, batch_size: i64) -> StepBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0000 + step);
    let latent_shape = [batch_size, 4, LATENT_SIZE, LATENT_SIZE];
    let latent_count = (batch_size * 4 * LATENT_SIZE * LATENT_SIZE) as usize;
    let context_shape = [batch_size, CONTEXT_TOKENS, CONTEXT_WIDTH];
    let context_count = (batch_size * CONTEXT_TOKENS * CONTEXT_WIDTH) as usize;
    let latents = Tensor::from_slice(&normal_values(&mut rng, latent_count)).reshape(latent_shape);
    let noise = Tensor::from_slice(&normal_values(&mut rng, latent_count)).reshape(latent_shape);
    let context =
        Tensor::from_slice(&normal_values(&mut rng, context_count)).reshape(context_shape);
    let timesteps: Vec<i64> = (0..batch_size)
        .map(|_| rng.random_range(0..1000i64))
        .collect();
    StepBatch {
        latents,
        noise,
        timesteps: Tensor::from_slice(&timesteps),
        context,
    }
}

impl StepBatch {
    /// Samples `start..start + length` of the batch.
    pub fn rows(&self, start: i64, length: i64) -> StepBatch {
        StepBatch {
            latents: self.latents.narrow(0, start, length).contiguous(),
            noise: self.noise.narrow(0, start, length).contiguous(),
            timesteps: self.timesteps.narrow(0, start, length).contiguous(),
            context: self.context.narrow(0, start, length).contiguous(),
        }
    }
}

/// Detached copies of named tensors, sorted by name.
pub fn snapshot(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let mut copies: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.detach().copy()))
        .collect();
    copies.sort_by(|left, right| left.0.cmp(&right.0));
    copies
}

/// Copies of the gradients of `parameters` (zeros where undefined), by name.
pub fn gradients(parameters: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    parameters
        .iter()
        .map(|(name, parameter)| {
            let gradient = parameter.grad();
            let gradient = if gradient.defined() {
                gradient.detach().copy()
            } else {
                parameter.zeros_like()
            };
            (name.clone(), gradient)
        })
        .collect()
}

/// The largest absolute element difference between two named tensor lists (same names, same
/// order, same shapes, else an error), and the largest absolute value in `expected`.
pub fn max_abs_diff(
    actual: &[(String, Tensor)],
    expected: &[(String, Tensor)],
) -> Result<(f64, f64)> {
    anyhow::ensure!(
        actual.len() == expected.len(),
        "{} tensors vs {} expected",
        actual.len(),
        expected.len()
    );
    let mut worst: f64 = 0.0;
    let mut scale: f64 = 0.0;
    for ((actual_name, actual), (expected_name, expected)) in actual.iter().zip(expected) {
        anyhow::ensure!(
            actual_name == expected_name,
            "tensor `{actual_name}` where `{expected_name}` was expected"
        );
        anyhow::ensure!(
            actual.size() == expected.size(),
            "tensor `{actual_name}` has shape {:?}, expected {:?}",
            actual.size(),
            expected.size()
        );
        let difference = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        worst = worst.max(difference);
        scale = scale.max(expected.abs().max().to_kind(Kind::Double).double_value(&[]));
    }
    Ok((worst, scale))
}

/// Whether two named tensor lists are bit-for-bit equal.
pub fn bitwise_equal(actual: &[(String, Tensor)], expected: &[(String, Tensor)]) -> bool {
    actual.len() == expected.len()
        && actual.iter().zip(expected).all(|((an, a), (en, e))| {
            an == en && a.size() == e.size() && a.kind() == e.kind() && a.equal(e)
        })
}

/// Shallow clones (the same storage) of named tensors.
pub fn shallow_clones(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
        .collect()
}
