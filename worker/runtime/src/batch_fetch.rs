//! Loading the batches a trainer trains: [`BatchFetcher`] starts the loads of the batches the
//! runtime announces ahead ([`crate::trainer::Trainer::upcoming`], `data.prefetch_batches` of
//! them) on its own tokio runtime, so that fetching, decoding and cropping overlap the step, and
//! hands each one over when its turn comes. A batch that was not announced, or whose items differ
//! from the announced one (a regroup re-plans batches under the same numbers), is loaded there
//! and then. Both the GPU trainer and the dry run load through it.

use std::collections::HashMap;
use std::sync::Arc;

use arbor_data::batch_loader::{
    Batch as LoadedBatch, BatchLoader, BatchRequest, ItemFailure, LoadItem,
};
use arbor_data::latent_batch::{load_latent_batch, reuse_cached, LatentBatch};
use arbor_data::latent_cache::{LatentCache, NewLatent};
use arbor_data::DataError;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::trainer::Batch;

/// The threads of the fetcher's runtime: object reads are async; decode and resize run on the
/// loader's own pool of blocking threads.
const FETCH_RUNTIME_THREADS: usize = 2;

type LoadTask = JoinHandle<Result<Fetched, DataError>>;

/// A batch as the fetcher hands it over.
#[derive(Debug)]
pub enum Fetched {
    /// Cropped pixels at the bucket's size.
    Pixels(LoadedBatch),
    /// Latent distributions (cached or to encode), with each item's crop in latent space.
    Latents(LatentBatch),
}

impl Fetched {
    /// The items that failed to load (their slots repeat another item).
    pub fn failures(&self) -> &[ItemFailure] {
        match self {
            Fetched::Pixels(batch) => &batch.failures,
            Fetched::Latents(batch) => &batch.failures,
        }
    }
}

/// The latent cache of a fetcher, with the digest of the VAE that encodes for it.
#[derive(Clone)]
struct LatentCacheUse {
    cache: LatentCache,
    vae_digest: Arc<str>,
}

impl LatentCacheUse {
    async fn load(
        &self,
        loader: &BatchLoader,
        request: &BatchRequest,
    ) -> Result<Fetched, DataError> {
        let batch = load_latent_batch(loader, &self.cache, request, &self.vae_digest).await?;
        Ok(Fetched::Latents(batch))
    }
}

/// Loads batches for one rank, announced ones in the background.
pub struct BatchFetcher {
    loader: BatchLoader,
    runtime: tokio::runtime::Runtime,
    seed: u64,
    /// Loads in flight by (epoch, batch index), with the item ids each was started for.
    in_flight: HashMap<(u64, u64), (Vec<u64>, LoadTask)>,
    latent_cache: Option<LatentCacheUse>,
    /// Pack writes in flight.
    writes: Vec<JoinHandle<()>>,
}

impl BatchFetcher {
    /// A fetcher over `loader` for a job with crop seed `seed`.
    pub fn new(loader: BatchLoader, seed: u64) -> Result<Self, DataError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(FETCH_RUNTIME_THREADS)
            .thread_name("arbor-fetch")
            .enable_all()
            .build()
            .map_err(DataError::Runtime)?;
        Ok(Self {
            loader,
            runtime,
            seed,
            in_flight: HashMap::new(),
            latent_cache: None,
            writes: Vec::new(),
        })
    }

    /// Loads training batches through `cache` from now on, for the VAE whose weights digest to
    /// `vae_digest` (validation batches stay pixels: [`BatchFetcher::load_pixels`]).
    pub fn use_latent_cache(&mut self, cache: LatentCache, vae_digest: &str) {
        self.latent_cache = Some(LatentCacheUse {
            cache,
            vae_digest: Arc::from(vae_digest),
        });
    }

    /// The latent cache, when batches load through one.
    pub fn latent_cache(&self) -> Option<&LatentCache> {
        self.latent_cache.as_ref().map(|usage| &usage.cache)
    }

    /// Writes freshly encoded latents to the cache as the pack `pack_name`, in the background.
    /// A failed write is logged and costs only a later re-encode.
    pub fn store_latents(&mut self, pack_name: String, latents: Vec<NewLatent>) {
        let Some(usage) = &self.latent_cache else {
            return;
        };
        if latents.is_empty() {
            return;
        }
        let cache = usage.cache.clone();
        self.writes.retain(|task| !task.is_finished());
        self.writes.push(self.runtime.spawn(async move {
            match cache.write_pack(&pack_name, &latents).await {
                Ok(bytes) => info!(pack = %pack_name, latents = latents.len(), bytes, "latent cache pack written"),
                Err(error) => warn!(pack = %pack_name, error = %error, "latent cache pack could not be written; its items are encoded again later"),
            }
        }));
    }

    /// Waits for the pack writes in flight (before a checkpoint and at the end, so a finished
    /// job's cache is complete).
    pub fn flush_latent_writes(&mut self) {
        for task in self.writes.drain(..) {
            let _ = self.runtime.block_on(task);
        }
    }

    /// The loader (for its running totals).
    pub fn loader(&self) -> &BatchLoader {
        &self.loader
    }

    /// Drops every load in flight: after a regroup, batch numbers may name other items.
    pub fn restart(&mut self, seed: u64) {
        self.seed = seed;
        for (_, (_, task)) in self.in_flight.drain() {
            task.abort();
        }
    }

    /// Starts loading `batches` (those not already loading).
    pub fn announce(&mut self, batches: &[Batch]) {
        for batch in batches {
            let key = (batch.epoch, batch.index);
            let ids = item_ids(batch);
            if self
                .in_flight
                .get(&key)
                .is_some_and(|(loading, _)| *loading == ids)
            {
                continue;
            }
            let loader = self.loader.clone();
            let request = batch_request(batch, self.seed);
            let latent_cache = self.latent_cache.clone();
            let task = self
                .runtime
                .spawn(async move { fetch(&loader, latent_cache.as_ref(), &request).await });
            if let Some((_, stale)) = self.in_flight.insert(key, (ids, task)) {
                stale.abort();
            }
        }
    }

    /// Batches announced and not yet taken.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `batch`'s pixels, loaded now (not through the latent cache): for validation batches,
    /// which are not announced.
    pub fn load_pixels(&mut self, batch: &Batch) -> Result<LoadedBatch, DataError> {
        let request = batch_request(batch, self.seed);
        self.runtime.block_on(self.loader.load_batch(&request))
    }

    /// `batch`: its background load if one was started for these items, else a load now.
    /// Blocks until it is ready.
    pub fn load(&mut self, batch: &Batch) -> Result<Fetched, DataError> {
        let fetched = self.load_now_or_ahead(batch)?;
        let Some(usage) = &self.latent_cache else {
            return Ok(fetched);
        };
        match fetched {
            Fetched::Latents(mut latents) => {
                let request = batch_request(batch, self.seed);
                self.runtime
                    .block_on(reuse_cached(&usage.cache, &mut latents, &request));
                Ok(Fetched::Latents(latents))
            }
            pixels => Ok(pixels),
        }
    }

    fn load_now_or_ahead(&mut self, batch: &Batch) -> Result<Fetched, DataError> {
        if let Some((ids, task)) = self.in_flight.remove(&(batch.epoch, batch.index)) {
            if ids == item_ids(batch) {
                return match self.runtime.block_on(task) {
                    Ok(loaded) => loaded,
                    Err(join_error) => Err(DataError::Background {
                        what: format!("epoch {} batch {}", batch.epoch, batch.index),
                        reason: join_error.to_string(),
                    }),
                };
            }
            task.abort();
        }
        let request = batch_request(batch, self.seed);
        self.runtime
            .block_on(fetch(&self.loader, self.latent_cache.as_ref(), &request))
    }
}

async fn fetch(
    loader: &BatchLoader,
    latent_cache: Option<&LatentCacheUse>,
    request: &BatchRequest,
) -> Result<Fetched, DataError> {
    match latent_cache {
        Some(usage) => usage.load(loader, request).await,
        None => loader.load_batch(request).await.map(Fetched::Pixels),
    }
}

impl Drop for BatchFetcher {
    fn drop(&mut self) {
        for (_, (_, task)) in self.in_flight.drain() {
            task.abort();
        }
        self.flush_latent_writes();
    }
}

fn item_ids(batch: &Batch) -> Vec<u64> {
    batch.items.iter().map(|item| item.id).collect()
}

/// The loader's request for a batch of the plan: its items at its bucket's resolution.
pub fn batch_request(batch: &Batch, seed: u64) -> BatchRequest {
    BatchRequest {
        items: batch
            .items
            .iter()
            .map(|item| LoadItem {
                id: item.id,
                key: item.key.clone(),
            })
            .collect(),
        bucket_width: batch.resolution.width,
        bucket_height: batch.resolution.height,
        seed,
        epoch: batch.epoch,
    }
}
