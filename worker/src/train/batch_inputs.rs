//! What the model sees of one batch: the loader's pixels as a [B, 3, H, W] tensor (or, with the
//! latent cache, the batch's latent distributions) and each slot's augmented caption, plus the
//! seed of the step's random draws.
//!
//! The loader (arbor-data) fills the slot of an item that failed to load with another item of
//! the batch (`ItemCrop::loaded_id`); the caption follows the pixels, so a replaced slot trains
//! on a consistent (image, caption) pair. When every item of the batch failed the slots hold
//! mid-gray and the batch must not teach anything: [`BatchInputs::all_failed`] tells the trainer
//! to scale its loss by zero (the rank still takes part in the all-reduce).

use std::collections::HashMap;

use arbor_data::batch_loader::Batch as LoadedBatch;
use arbor_data::latent_batch::LatentBatch;
use arbor_runtime::trainer::BatchItem;
use tch::{Device, Tensor};

use crate::device::host_to_device;
use crate::error::{Result, WorkerError};
use crate::train::caption_augment::CaptionAugment;

/// One batch ready for the model.
#[derive(Debug)]
pub struct BatchInputs {
    /// The images, as pixels or as latent distributions from the cache.
    pub images: BatchImages,
    /// The augmented caption of each slot.
    pub captions: Vec<String>,
    /// Every item failed to load: the images are placeholders.
    pub all_failed: bool,
}

/// A batch's images.
#[derive(Debug)]
pub enum BatchImages {
    /// [B, 3, H, W] in [-1, 1] on the training device, for the VAE to encode.
    Pixels(Tensor),
    /// Loaded through the latent cache ([`crate::train::cached_latents`]).
    Latents(LatentBatch),
}

impl BatchInputs {
    /// Builds the inputs of `loaded` (the loader's result for `items`, in order), with captions
    /// augmented by `augment` from the stream of (seed, epoch, item id).
    pub fn build(
        loaded: &LoadedBatch,
        items: &[BatchItem],
        augment: &CaptionAugment,
        seed: u64,
        epoch: u64,
        device: Device,
    ) -> Result<Self> {
        if loaded.len() != items.len() || loaded.is_empty() {
            return Err(slot_count_error(loaded.len(), items.len()));
        }
        let expected = loaded.len() * loaded.item_len();
        if loaded.pixels.len() != expected {
            return Err(WorkerError::Input {
                name: "batch.pixels".to_string(),
                message: format!("{} values, expected {expected}", loaded.pixels.len()),
            });
        }
        let loaded_ids: Vec<Option<u64>> = loaded.items.iter().map(|slot| slot.loaded_id).collect();
        let (captions, all_failed) = slot_captions(&loaded_ids, items, augment, seed, epoch);
        let pixels = Tensor::from_slice(&loaded.pixels).view([
            loaded.len() as i64,
            3,
            i64::from(loaded.bucket_height),
            i64::from(loaded.bucket_width),
        ]);
        let pixels = host_to_device(&pixels, device)?;
        Ok(Self {
            images: BatchImages::Pixels(pixels),
            captions,
            all_failed,
        })
    }

    /// Builds the inputs of a batch loaded through the latent cache (for `items`, in order);
    /// captions as in [`BatchInputs::build`].
    pub fn from_latents(
        loaded: LatentBatch,
        items: &[BatchItem],
        augment: &CaptionAugment,
        seed: u64,
        epoch: u64,
    ) -> Result<Self> {
        if loaded.slots.len() != items.len() || loaded.slots.is_empty() {
            return Err(slot_count_error(loaded.slots.len(), items.len()));
        }
        let (captions, all_failed) =
            slot_captions(&loaded.loaded_ids(), items, augment, seed, epoch);
        Ok(Self {
            images: BatchImages::Latents(loaded),
            captions,
            all_failed,
        })
    }
}

fn slot_count_error(slots: usize, items: usize) -> WorkerError {
    WorkerError::Input {
        name: "batch".to_string(),
        message: format!("the loader returned {slots} slots for {items} items"),
    }
}

/// Each slot's augmented caption: the caption of the item whose image fills it (empty when
/// every item failed), and whether every item failed.
fn slot_captions(
    loaded_ids: &[Option<u64>],
    items: &[BatchItem],
    augment: &CaptionAugment,
    seed: u64,
    epoch: u64,
) -> (Vec<String>, bool) {
    let captions_by_id: HashMap<u64, &str> = items
        .iter()
        .map(|item| (item.id, item.caption.as_str()))
        .collect();
    let mut all_failed = true;
    let captions = loaded_ids
        .iter()
        .map(|loaded_id| match loaded_id {
            Some(loaded_id) => {
                all_failed = false;
                let caption = captions_by_id.get(loaded_id).copied().unwrap_or("");
                augment.apply(caption, seed, epoch, *loaded_id)
            }
            None => String::new(),
        })
        .collect();
    (captions, all_failed)
}

/// The seed of one micro-step's random draws (VAE posterior sample, noise, timesteps,
/// hypernetwork dropout): a SplitMix64 mix of (job seed, micro-step, rank), so ranks draw
/// different noise, every micro-step differs, and a resumed run draws exactly what an
/// uninterrupted one would.
pub fn micro_step_seed(seed: u64, micro_step: u64, rank: u32) -> i64 {
    let mut state = seed;
    for value in [micro_step, u64::from(rank), 0x6172_626f_725f_7374] {
        state = splitmix64(state ^ value);
    }
    // Keep it positive: torch seeds are uint64 but tch takes an i64.
    (state >> 1) as i64
}

/// The seed of one training micro-batch's random draws (VAE posterior sample, noise,
/// timesteps, hypernetwork dropout): a mix of (job seed, epoch, batch index in the rank's plan,
/// rank), so ranks draw different noise, every batch differs, and a resumed run (which replays
/// to the same batch) draws exactly what an uninterrupted one would.
pub fn batch_seed(seed: u64, epoch: u64, batch_index: u64, rank: u32) -> i64 {
    micro_step_seed(splitmix64(seed ^ splitmix64(epoch)), batch_index, rank)
}

fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_step_and_rank_and_repeat() {
        let base = micro_step_seed(42, 7, 0);
        assert_eq!(base, micro_step_seed(42, 7, 0));
        assert_ne!(base, micro_step_seed(42, 8, 0));
        assert_ne!(base, micro_step_seed(42, 7, 1));
        assert_ne!(base, micro_step_seed(43, 7, 0));
        assert!(base >= 0);
    }

    #[test]
    fn batch_seeds_differ_by_epoch_batch_and_rank_and_repeat() {
        let base = batch_seed(42, 1, 7, 0);
        assert_eq!(base, batch_seed(42, 1, 7, 0));
        assert_ne!(base, batch_seed(42, 2, 7, 0));
        assert_ne!(base, batch_seed(42, 1, 8, 0));
        assert_ne!(base, batch_seed(42, 1, 7, 1));
        assert_ne!(base, batch_seed(43, 1, 7, 0));
        assert!(base >= 0);
    }
}
