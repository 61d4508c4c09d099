//! The validation loss (`data.validation_fraction` / `data.validation_manifest`,
//! `samples.validation_every`): the mean diffusion loss on items held out of training, measured
//! the same way every time so that its changes come from the weights alone.
//!
//! - **Which items:** the coordinator picks the evaluated items (common/src/validation.rs) and
//!   gives each rank every world_size-th of them with its bucket; ranks measure their share and
//!   one all-reduce of (sum, count) gives the group's mean.
//! - **Fixed draws:** each item's crop, VAE posterior sample and noise come from seeds of
//!   (job seed, item id) alone, and every item is measured at the same
//!   [`VALIDATION_TIMESTEP_FRACTIONS`] of the schedule, so two measurements of the same weights
//!   agree exactly whatever the step, the world size or the rank.
//! - **Plain loss:** the mean squared error against the training target without min-SNR
//!   weighting or the hypernetwork's L2 penalty, and with dropout off, so runs with different
//!   loss settings stay comparable.

use arbor_common::sampler::BatchBucket;
use arbor_runtime::batch_fetch::BatchFetcher;
use arbor_runtime::trainer::{Batch, ValidationItem};
use tch::{Device, Kind, Tensor};
use tracing::warn;

use crate::device::host_to_device;
use crate::error::{Result, WorkerError};
use crate::train::training_model::TrainingModel;

/// Where in the schedule each item is measured: these fractions of `num_train_timesteps`.
pub const VALIDATION_TIMESTEP_FRACTIONS: [f64; 4] = [0.1, 0.35, 0.6, 0.85];

/// The loader's epoch for validation loads: never a training epoch, so a validation load never
/// takes the place of a prefetched training batch, and its crops are fixed.
const VALIDATION_EPOCH: u64 = u64::MAX;

/// The seed of an item's validation draws.
fn item_seed(seed: u64, item_id: u64) -> i64 {
    arbor_common::stream::derive_key(
        arbor_common::stream::StreamDomain::Validation,
        &[seed, item_id],
    ) as i64
}

/// This rank's sum of per-item validation losses and the number of items measured (items that
/// fail to load are skipped with a warning).
pub fn rank_validation_sums(
    model: &mut TrainingModel,
    fetcher: &mut BatchFetcher,
    items: &[ValidationItem],
    seed: u64,
) -> Result<(f64, u64)> {
    let mut sum = 0.0;
    let mut count = 0;
    for (index, validation_item) in items.iter().enumerate() {
        let batch = Batch {
            epoch: VALIDATION_EPOCH,
            index: index as u64,
            bucket: BatchBucket::CatchAll,
            resolution: validation_item.resolution,
            items: vec![validation_item.item.clone()],
            epoch_batches: 1,
        };
        let loaded = fetcher.load_pixels(&batch)?;
        if loaded
            .items
            .first()
            .and_then(|slot| slot.loaded_id)
            .is_none()
        {
            warn!(
                item = validation_item.item.id,
                key = %validation_item.item.key,
                "validation item failed to load; it is left out of the validation loss"
            );
            continue;
        }
        let pixels = Tensor::from_slice(&loaded.pixels).view([
            1,
            3,
            i64::from(loaded.bucket_height),
            i64::from(loaded.bucket_width),
        ]);
        let pixels = host_to_device(&pixels, model.device)?;
        let loss = item_loss(
            model,
            &pixels,
            &validation_item.item.caption,
            seed,
            validation_item.item.id,
        )?;
        sum += loss;
        count += 1;
    }
    Ok((sum, count))
}

/// The loss of one item at the fixed timesteps, with its fixed draws.
fn item_loss(
    model: &mut TrainingModel,
    pixels: &Tensor,
    caption: &str,
    seed: u64,
    item_id: u64,
) -> Result<f64> {
    tch::manual_seed(item_seed(seed, item_id));
    let was_training = model.set_training(false);
    let loss = tch::no_grad(|| -> Result<f64> {
        let latents = model.encode_images(pixels);
        let context = model.encode_prompts(&[caption.to_string()], None)?;
        let steps = VALIDATION_TIMESTEP_FRACTIONS.len() as i64;
        let total = model.schedule.num_train_timesteps();
        let timesteps: Vec<i64> = VALIDATION_TIMESTEP_FRACTIONS
            .iter()
            .map(|fraction| ((total as f64 * fraction) as i64).clamp(0, total - 1))
            .collect();
        let timesteps = Tensor::from_slice(&timesteps).to_device(model.device);
        let latents = latents.repeat([steps, 1, 1, 1]);
        let context = context.repeat([steps, 1, 1]);
        let noise = latents.randn_like();
        let loss = model.plain_loss(&latents, &noise, &timesteps, &context)?;
        Ok(loss
            .to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .double_value(&[]))
    });
    model.set_training(was_training);
    loss.map_err(|error| match error {
        WorkerError::Input { name, message } => WorkerError::Input {
            name: format!("validation item {item_id}: {name}"),
            message,
        },
        other => other,
    })
}
