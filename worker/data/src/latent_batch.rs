//! Loading a batch through the latent cache ([`crate::latent_cache`]): for each item, its
//! content tag (one `head` request) gives its cache key; a hit reads the stored latent
//! distribution (one ranged read, no decode), a miss decodes and cover-resizes the whole image
//! for the trainer to encode ([`crate::batch_loader::BatchLoader::load_for_encoding`]). Either
//! way the item comes with its epoch's crop in latent space
//! ([`arbor_common::crop::LatentGeometry::latent_crop_offset`]).
//!
//! An item that fails (its head, read or decode) keeps the batch's shape as in the pixel
//! loader: its slot repeats the first item of the batch that loaded, or none when no item did,
//! and the failure is returned with the item's id and key.

use std::time::Duration;

use arbor_common::crop::{CropOffset, LatentGeometry, LATENT_FACTOR};
use bytes::Bytes;
use tracing::warn;

use crate::batch_loader::{BatchLoader, BatchRequest, ItemFailure, LoadFailure, LoadItem};
use crate::error::{invalid, DataError};
use crate::latent_cache::{cache_key, LatentCache, MISS_REFRESH_INTERVAL};

/// Where an item's latent distribution comes from.
#[derive(Debug, Clone)]
pub enum LatentSource {
    /// Read from the cache: little-endian f16 `[2·C, h, w]` (means, then log-variances).
    Cached { shape: [u32; 3], data: Bytes },
    /// Not in the cache: the pixels to encode (f32 CHW in [-1, 1] at the encoded size), whose
    /// distribution the trainer writes back under `cache_key`.
    Encode { pixels: Vec<f32> },
}

/// One item whose latent distribution is (or will be) at hand.
#[derive(Debug, Clone)]
pub struct LatentItem {
    pub id: u64,
    pub cache_key: String,
    pub geometry: LatentGeometry,
    /// This epoch's crop, in latent pixels.
    pub crop: CropOffset,
    pub source: LatentSource,
}

/// A batch loaded through the cache: `slots[i]` is the index in `items` of what fills slot `i`
/// (the slot's own item, a substitute when it failed, `None` when every item failed).
#[derive(Debug, Clone)]
pub struct LatentBatch {
    pub bucket_width: u32,
    pub bucket_height: u32,
    pub items: Vec<LatentItem>,
    pub slots: Vec<Option<usize>>,
    pub failures: Vec<ItemFailure>,
}

impl LatentBatch {
    /// The id of the item filling each slot (`None`: every item failed).
    pub fn loaded_ids(&self) -> Vec<Option<u64>> {
        self.slots
            .iter()
            .map(|slot| slot.map(|index| self.items[index].id))
            .collect()
    }

    /// The latent size of the bucket.
    pub fn latent_size(&self) -> (u32, u32) {
        (
            self.bucket_width / LATENT_FACTOR,
            self.bucket_height / LATENT_FACTOR,
        )
    }
}

/// Loads `request` through `cache`, with the VAE digest `vae_digest`. Only an invalid request is
/// an error. Must run inside a multi-threaded tokio runtime.
pub async fn load_latent_batch(
    loader: &BatchLoader,
    cache: &LatentCache,
    request: &BatchRequest,
    vae_digest: &str,
) -> Result<LatentBatch, DataError> {
    let (bucket_width, bucket_height) = (request.bucket_width, request.bucket_height);
    if bucket_width == 0
        || bucket_height == 0
        || bucket_width % LATENT_FACTOR != 0
        || bucket_height % LATENT_FACTOR != 0
    {
        return Err(invalid(
            "bucket",
            format!("bucket {bucket_width}x{bucket_height} is not a positive multiple of 8"),
        ));
    }
    let tasks: Vec<_> = request
        .items
        .iter()
        .map(|item| {
            let loader = loader.clone();
            let cache = cache.clone();
            let item = item.clone();
            let vae_digest = vae_digest.to_owned();
            let (seed, epoch) = (request.seed, request.epoch);
            tokio::spawn(async move {
                load_latent_item(
                    &loader,
                    &cache,
                    &item,
                    (bucket_width, bucket_height),
                    (seed, epoch),
                    &vae_digest,
                )
                .await
            })
        })
        .collect();
    let mut items = Vec::with_capacity(tasks.len());
    let mut slots = Vec::with_capacity(tasks.len());
    let mut failures = Vec::new();
    let mut failed_slots = Vec::new();
    for (slot, (task, item)) in tasks.into_iter().zip(&request.items).enumerate() {
        let result = match task.await {
            Ok(result) => result,
            Err(join_error) => Err(LoadFailure::Fit(format!("load task failed: {join_error}"))),
        };
        match result {
            Ok(loaded) => {
                slots.push(Some(items.len()));
                items.push(loaded);
            }
            Err(reason) => {
                warn!(item_id = item.id, key = %item.key, reason = %reason, "item failed to load; its slot repeats another item");
                failures.push(ItemFailure {
                    id: item.id,
                    key: item.key.clone(),
                    reason,
                });
                slots.push(None);
                failed_slots.push(slot);
            }
        }
    }
    let substitute = (!items.is_empty()).then_some(0);
    for slot in failed_slots {
        slots[slot] = substitute;
    }
    Ok(LatentBatch {
        bucket_width,
        bucket_height,
        items,
        slots,
        failures,
    })
}

async fn load_latent_item(
    loader: &BatchLoader,
    cache: &LatentCache,
    item: &LoadItem,
    (bucket_width, bucket_height): (u32, u32),
    (seed, epoch): (u64, u64),
    vae_digest: &str,
) -> Result<LatentItem, LoadFailure> {
    let content_tag = loader.content_tag(&item.key).await?;
    let key = cache_key(&content_tag, bucket_width, bucket_height, vae_digest);
    let bucket = (bucket_width, bucket_height);
    let cached = read_cached(
        cache,
        item.id,
        &item.key,
        &key,
        bucket,
        (seed, epoch),
        MISS_REFRESH_INTERVAL,
    )
    .await;
    if let Some(cached) = cached {
        return Ok(cached);
    }
    let encoding = loader
        .load_for_encoding(item, bucket_width, bucket_height)
        .await?;
    Ok(LatentItem {
        id: item.id,
        crop: encoding.geometry.latent_crop_offset(
            seed,
            epoch,
            item.id,
            bucket_width,
            bucket_height,
        ),
        cache_key: key,
        geometry: encoding.geometry,
        source: LatentSource::Encode {
            pixels: encoding.pixels,
        },
    })
}

/// The cached latent of `key`, re-reading the index first when the handle does not know it
/// and the last read is older than `refresh_after`. `None`: not cached (or unreadable, with a
/// warning).
async fn read_cached(
    cache: &LatentCache,
    item_id: u64,
    item_key: &str,
    key: &str,
    (bucket_width, bucket_height): (u32, u32),
    (seed, epoch): (u64, u64),
    refresh_after: Duration,
) -> Option<LatentItem> {
    let located = match cache.lookup(key) {
        Some(located) => located,
        None => {
            if let Err(error) = cache.refresh_if_older_than(refresh_after).await {
                warn!(error = %error, "latent cache index could not be read; missing latents are encoded");
            }
            cache.lookup(key)?
        }
    };
    let entry = &located.entry;
    let geometry = LatentGeometry {
        resized_width: entry.resized_width,
        resized_height: entry.resized_height,
        encoded_width: entry.shape[2] * LATENT_FACTOR,
        encoded_height: entry.shape[1] * LATENT_FACTOR,
    };
    if geometry.encoded_width < bucket_width || geometry.encoded_height < bucket_height {
        warn!(item_id, key = %item_key, shape = ?entry.shape, "latent cache entry smaller than its bucket; encoding the image instead");
        return None;
    }
    match cache.read(&located).await {
        Ok(data) => Some(LatentItem {
            id: item_id,
            crop: geometry.latent_crop_offset(seed, epoch, item_id, bucket_width, bucket_height),
            cache_key: key.to_owned(),
            geometry,
            source: LatentSource::Cached {
                shape: entry.shape,
                data,
            },
        }),
        Err(error) => {
            warn!(item_id, key = %item_key, pack = %located.pack, error = %error, "latent cache read failed; encoding the image instead");
            None
        }
    }
}

/// Called when the trainer takes a batch that was loaded ahead: items that were not cached
/// when it was loaded are looked up again after a fresh read of the index (another rank may
/// have written them since, for example at the end of the previous epoch), so that they are
/// not encoded twice. Counts the items still to encode as misses. The read is one short
/// listing, only for batches that would otherwise run the VAE, which costs far more.
pub async fn reuse_cached(cache: &LatentCache, batch: &mut LatentBatch, request: &BatchRequest) {
    let bucket = (batch.bucket_width, batch.bucket_height);
    for item in &mut batch.items {
        if !matches!(item.source, LatentSource::Encode { .. }) {
            continue;
        }
        let item_key = request
            .items
            .iter()
            .find(|requested| requested.id == item.id)
            .map_or("", |requested| requested.key.as_str());
        match read_cached(
            cache,
            item.id,
            item_key,
            &item.cache_key,
            bucket,
            (request.seed, request.epoch),
            Duration::ZERO,
        )
        .await
        {
            Some(cached) => *item = cached,
            None => cache.count_miss(),
        }
    }
}
