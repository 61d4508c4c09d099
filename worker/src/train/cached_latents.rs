//! The trainer's side of the latent cache (docs/architecture.md §2 "Latent cache"): the VAE
//! digest that keys it, the encoding of the items the cache did not have (whose distributions go
//! back to the cache), and the batch's latents: each item's stored distribution cropped at its
//! epoch's offset in latent space, sampled with the step's seed as the VAE would, times the VAE's
//! scaling factor.
//!
//! A freshly encoded distribution is rounded to f16 before it is used, exactly as it is stored,
//! so an epoch that encodes an item and an epoch that reads it back train on the same values.

use std::collections::BTreeMap;

use arbor_data::latent_batch::{LatentBatch, LatentSource};
use arbor_data::latent_cache::NewLatent;
use arbor_runtime::batch_fetch::BatchFetcher;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};
use tracing::info;

use crate::error::{Result, WorkerError};
use crate::train::training_model::TrainingModel;
use crate::vae::{AutoencoderKL, DiagonalGaussian};

/// A digest of the VAE's weights (names, shapes, element types and values, in name order): part
/// of every cache key, so another VAE never reads this one's latents.
pub fn vae_digest(vae_store: &nn::VarStore) -> Result<String> {
    let variables: BTreeMap<String, Tensor> = vae_store.variables().into_iter().collect();
    let mut hasher = Sha256::new();
    for (name, tensor) in &variables {
        let cpu = tensor.detach().to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut data = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut data, numel)
            .map_err(WorkerError::torch(
                "reading the vae weights for their digest",
            ))?;
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}{:?}", cpu.size(), cpu.kind()).as_bytes());
        hasher.update(&data);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// What encodes the items the cache does not have: the frozen VAE on its device, under bf16
/// autocast when the job trains in bf16 on CUDA.
pub struct LatentEncoder<'a> {
    pub vae: &'a AutoencoderKL,
    pub device: Device,
    pub autocast_bf16: bool,
}

impl<'a> LatentEncoder<'a> {
    /// The encoder of a training model.
    pub fn of_model(model: &'a TrainingModel) -> Self {
        Self {
            vae: &model.vae,
            device: model.device,
            autocast_bf16: model.autocast_bf16,
        }
    }
}

/// The latents of one batch loaded through the cache, and the distributions to write back.
pub struct CachedLatents {
    /// [B, C, h, w] f32 on the model's device, scaled by the VAE's scaling factor.
    pub latents: Tensor,
    /// The distributions of the items the cache did not have, f16, for
    /// [`arbor_runtime::batch_fetch::BatchFetcher::store_latents`].
    pub new_entries: Vec<NewLatent>,
}

/// Each item's distribution [2·C, h, w] as f16 on the CPU: read from the cache's bytes, or
/// encoded now (items of one encoded size in one VAE call).
pub fn item_distributions(
    encoder: &LatentEncoder<'_>,
    batch: &LatentBatch,
) -> Result<(Vec<Tensor>, Vec<NewLatent>)> {
    let mut distributions: Vec<Option<Tensor>> = (0..batch.items.len()).map(|_| None).collect();
    let mut by_size: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (index, item) in batch.items.iter().enumerate() {
        match &item.source {
            LatentSource::Cached { shape, data } => {
                let size: Vec<i64> = shape.iter().map(|&dim| i64::from(dim)).collect();
                let tensor = Tensor::f_from_data_size(data, &size, Kind::Half)
                    .map_err(WorkerError::torch("reading a cached latent"))?;
                distributions[index] = Some(tensor);
            }
            LatentSource::Encode { .. } => by_size
                .entry((item.geometry.encoded_width, item.geometry.encoded_height))
                .or_default()
                .push(index),
        }
    }
    let mut new_entries = Vec::new();
    for ((width, height), indices) in by_size {
        let mut images = Vec::with_capacity(indices.len());
        for &index in &indices {
            let LatentSource::Encode { pixels } = &batch.items[index].source else {
                continue;
            };
            images.push(Tensor::from_slice(pixels).view([3, i64::from(height), i64::from(width)]));
        }
        let pixels = Tensor::stack(&images, 0).to_device(encoder.device);
        let moments = tch::no_grad(|| {
            let posterior = if encoder.autocast_bf16 {
                tch::autocast(true, || encoder.vae.encode(&pixels))
            } else {
                encoder.vae.encode(&pixels)
            };
            Tensor::cat(&[&posterior.mean, &posterior.logvar], 1)
                .to_kind(Kind::Half)
                .to_device(Device::Cpu)
        });
        for (row, &index) in indices.iter().enumerate() {
            let distribution = moments.get(row as i64).contiguous();
            let item = &batch.items[index];
            new_entries.push(new_latent(&distribution, item)?);
            distributions[index] = Some(distribution);
        }
    }
    let distributions = distributions
        .into_iter()
        .map(|distribution| distribution.expect("every item is cached or encoded"))
        .collect();
    Ok((distributions, new_entries))
}

fn new_latent(
    distribution: &Tensor,
    item: &arbor_data::latent_batch::LatentItem,
) -> Result<NewLatent> {
    let size = distribution.size();
    let numel = distribution.numel();
    let mut data = vec![0u8; numel * 2];
    distribution
        .f_copy_data_u8(&mut data, numel)
        .map_err(WorkerError::torch("copying an encoded latent"))?;
    Ok(NewLatent {
        key: item.cache_key.clone(),
        shape: [size[0] as u32, size[1] as u32, size[2] as u32],
        resized_width: item.geometry.resized_width,
        resized_height: item.geometry.resized_height,
        data,
    })
}

/// The batch's latent posterior: each slot's distribution cropped at its epoch's offset.
pub fn cropped_posterior(
    batch: &LatentBatch,
    distributions: &[Tensor],
    latent_channels: i64,
    device: Device,
) -> Result<DiagonalGaussian> {
    let (latent_width, latent_height) = batch.latent_size();
    let mut slots = Vec::with_capacity(batch.slots.len());
    for slot in &batch.slots {
        let cropped = match slot {
            Some(index) => {
                let item = &batch.items[*index];
                distributions[*index]
                    .narrow(1, i64::from(item.crop.y), i64::from(latent_height))
                    .narrow(2, i64::from(item.crop.x), i64::from(latent_width))
            }
            // Every item failed: a zero distribution (the step's loss is scaled by zero).
            None => Tensor::zeros(
                [
                    2 * latent_channels,
                    i64::from(latent_height),
                    i64::from(latent_width),
                ],
                (Kind::Half, Device::Cpu),
            ),
        };
        slots.push(cropped);
    }
    let stacked = Tensor::stack(&slots, 0)
        .to_device(device)
        .to_kind(Kind::Float);
    let channels = stacked.size()[1];
    if channels != 2 * latent_channels {
        return Err(WorkerError::Input {
            name: "latent_cache".to_string(),
            message: format!(
                "a cached distribution has {channels} channels, expected {} (mean and logvar)",
                2 * latent_channels
            ),
        });
    }
    Ok(DiagonalGaussian {
        mean: stacked.narrow(1, 0, channels / 2),
        logvar: stacked.narrow(1, channels / 2, channels / 2),
    })
}

/// The latents of a batch loaded through the cache: distributions (read or encoded), cropped,
/// sampled from the global RNG (seeded per step by the caller) and scaled.
pub fn cached_latents(model: &TrainingModel, batch: &LatentBatch) -> Result<CachedLatents> {
    if batch.slots.is_empty() {
        return Err(WorkerError::Input {
            name: "batch".to_string(),
            message: "the latent batch has no slots".to_string(),
        });
    }
    let (distributions, new_entries) = item_distributions(&LatentEncoder::of_model(model), batch)?;
    let latent_channels = model.vae.config().latent_channels;
    let posterior = cropped_posterior(batch, &distributions, latent_channels, model.device)?;
    let latents = tch::no_grad(|| posterior.sample() * model.vae.scaling_factor());
    Ok(CachedLatents {
        latents,
        new_entries,
    })
}

/// Logs the running totals of `fetcher`'s latent cache, if it has one (at checkpoints and at the
/// end of a run).
pub fn log_cache_totals(fetcher: &BatchFetcher, rank: u32, step: u64) {
    let Some(cache) = fetcher.latent_cache() else {
        return;
    };
    let totals = cache.totals();
    info!(
        rank,
        step,
        hits = totals.hits,
        misses = totals.misses,
        written = totals.written,
        bytes_read = totals.bytes_read,
        bytes_written = totals.bytes_written,
        bad_indexes = totals.bad_indexes,
        "latent cache"
    );
}
