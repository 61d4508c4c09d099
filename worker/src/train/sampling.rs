//! Samples during training (docs/architecture.md §4 "Samples", §7 "Run directory"):
//! rank 0 renders one image per `samples.prompts` entry with the negative prompt
//! `samples.negative` as the unconditional context (padded to the prompt's chunk count), the
//! configured sampler (DDIM or Euler), `samples.steps` steps and classifier-free guidance
//! `samples.guidance`, from noise seeded by (job seed, step), at the job's `base_res`; decodes
//! the latents with the VAE and writes a grid PNG. Beside it, `loss.png` plots the loss history
//! of `metrics.jsonl`.

use arbor_common::config::JobConfig;
use tch::{Kind, Tensor};

use crate::attention::KvContextTransform;
use crate::diffusion_samplers::{sample, GuidedPrompt, Sampler, SamplerKind};
use crate::error::Result;
use crate::train::loss_curve::render_loss_curve_with_validation;
use crate::train::run_dir::RunDir;
use crate::train::sample_grid::images_to_grid_png;
use crate::train::training_model::TrainingModel;

/// The key of the loss curve in the run directory.
pub const LOSS_CURVE_KEY: &str = "loss.png";
const LOSS_CURVE_SIZE: (u32, u32) = (900, 500);
/// Images per row of a sample grid.
const GRID_COLUMNS: usize = 4;

/// `samples/step-<N>.png`.
pub fn sample_key(step: u64) -> String {
    format!("samples/step-{step}.png")
}

/// What to render, from `[samples]` and `[buckets] base_res`.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSettings {
    pub prompts: Vec<String>,
    pub negative: String,
    pub steps: u32,
    pub guidance: f64,
    pub sampler: SamplerKind,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    /// The hypernetwork's multiplier while sampling (training always uses 1).
    pub hypernetwork_multiplier: f64,
}

impl SampleSettings {
    pub fn from_config(config: &JobConfig) -> Result<Self> {
        let [width, height] = config.buckets.base_res;
        Ok(Self {
            prompts: config.samples.prompts.clone(),
            negative: config.samples.negative.clone(),
            steps: config.samples.steps,
            guidance: config.samples.guidance,
            sampler: config.samples.sampler,
            width,
            height,
            seed: config.job.seed,
            hypernetwork_multiplier: config.samples.hypernetwork_multiplier,
        })
    }
}

/// Renders the sample grid of `step` as PNG bytes (`None` when there are no prompts). Runs
/// without gradient, with dropout off, and the hypernetwork (if any) at
/// `settings.hypernetwork_multiplier`.
pub fn render_samples(
    model: &mut TrainingModel,
    settings: &SampleSettings,
    step: u64,
) -> Result<Option<Vec<u8>>> {
    if settings.prompts.is_empty() {
        return Ok(None);
    }
    let multiplier_was = model.hypernetwork.as_ref().map(|hn| hn.multiplier);
    if let Some(hypernetwork) = model.hypernetwork.as_mut() {
        hypernetwork.multiplier = settings.hypernetwork_multiplier;
    }
    let was_training = model.set_training(false);
    let rendered = tch::no_grad(|| render(model, settings, step));
    model.set_training(was_training);
    if let (Some(hypernetwork), Some(multiplier)) = (model.hypernetwork.as_mut(), multiplier_was) {
        hypernetwork.multiplier = multiplier;
    }
    rendered.map(Some)
}

fn render(model: &TrainingModel, settings: &SampleSettings, step: u64) -> Result<Vec<u8>> {
    let device = model.device;
    let conditional: Vec<Vec<i64>> = settings
        .prompts
        .iter()
        .map(|prompt| model.tokenizer.encode(prompt))
        .collect();
    let negative_ids = model.tokenizer.encode(&settings.negative);
    let unconditional = vec![negative_ids; conditional.len()];
    let (framed_conditional, framed_unconditional) =
        model.framing.frame_guided(&conditional, &unconditional);
    let encode = |framed: &Tensor| {
        model.autocast(|| {
            model
                .text_encoder
                .encode_chunked(framed, model.clip_skip, model.prompt_layout)
        })
    };
    let context = encode(&framed_conditional.to_tensor().to_device(device))?.to_kind(Kind::Float);
    let uncond_context =
        encode(&framed_unconditional.to_tensor().to_device(device))?.to_kind(Kind::Float);
    let sampler = Sampler::new(settings.sampler, &model.schedule, i64::from(settings.steps))?;
    let latent_channels = model.unet.config().in_channels;
    let downscale = 1i64
        << (model
            .vae
            .config()
            .block_out_channels
            .len()
            .saturating_sub(1));
    let latent_height = (i64::from(settings.height) / downscale).max(1);
    let latent_width = (i64::from(settings.width) / downscale).max(1);
    tch::manual_seed(crate::train::batch_inputs::micro_step_seed(
        settings.seed,
        step,
        u32::MAX,
    ));
    let noise = Tensor::randn(
        [
            conditional.len() as i64,
            latent_channels,
            latent_height,
            latent_width,
        ],
        (Kind::Float, device),
    );
    let kv_transform = model
        .hypernetwork
        .as_ref()
        .map(|hypernetwork| hypernetwork as &dyn KvContextTransform);
    let prompt = GuidedPrompt {
        context: &context,
        uncond_context: &uncond_context,
        guidance_scale: settings.guidance,
    };
    let latents = model.autocast(|| {
        sample(
            &model.unet,
            &model.schedule,
            &sampler,
            &prompt,
            &noise,
            kv_transform,
        )
    })?;
    let latents = latents.to_kind(Kind::Float) / model.vae.scaling_factor();
    let images = model
        .autocast(|| model.vae.decode(&latents))
        .to_kind(Kind::Float)
        .clamp(-1.0, 1.0);
    images_to_grid_png(&images.to_device(tch::Device::Cpu), GRID_COLUMNS)
}

/// Renders and writes `samples/step-<N>.png`; returns its key and PNG bytes, or `None` without
/// prompts.
pub fn write_samples(
    run_dir: &RunDir,
    model: &mut TrainingModel,
    settings: &SampleSettings,
    step: u64,
) -> Result<Option<(String, Vec<u8>)>> {
    let Some(png) = render_samples(model, settings, step)? else {
        return Ok(None);
    };
    let key = sample_key(step);
    run_dir.put(&key, png.clone())?;
    Ok(Some((key, png)))
}

/// Writes `loss.png` from `(step, loss)` points; nothing when there are none.
pub fn write_loss_curve(
    run_dir: &RunDir,
    history: &[(u64, f64)],
    validation: &[(u64, f64)],
) -> Result<bool> {
    if history.is_empty() {
        return Ok(false);
    }
    let png = render_loss_curve_with_validation(
        history,
        validation,
        LOSS_CURVE_SIZE.0,
        LOSS_CURVE_SIZE.1,
    )?;
    run_dir.put(LOSS_CURVE_KEY, png)?;
    Ok(true)
}
