//! Filling the latent cache ahead of training (`arbor cache`, which runs the job for one epoch
//! with `train.fill_cache_only`): every rank loads its shard's batches through the cache and
//! encodes what is missing with the frozen VAE; nothing else of the model is loaded, nothing
//! trains and no collective runs. The coordinator drives it like a training job, so progress
//! and ETA show in `arbor status`, and a killed worker's remaining batches are re-sharded to the
//! group that re-forms; its latents already written are read, not encoded again.

use std::path::PathBuf;

use arbor_common::config::{JobConfig, MixedPrecision};
use arbor_data::batch_loader::{BatchLoader, LoaderOptions};
use arbor_data::latent_cache::LatentCache;
use arbor_data::store::DatasetStore;
use arbor_runtime::batch_fetch::{BatchFetcher, Fetched};
use arbor_runtime::trainer::{Batch, BatchOutcome, GroupInfo};
use tch::{nn, Device};
use tracing::{info, warn};

use crate::error::{Result, WorkerError};
use crate::model_components::ModelComponents;
use crate::train::cached_latents::{
    item_distributions, log_cache_totals, vae_digest, LatentEncoder,
};
use crate::vae::AutoencoderKL;
use crate::weights::Component;

/// A rank that only fills the latent cache.
pub struct CacheFiller {
    device: Device,
    /// Holds the VAE's weights.
    _vae_store: nn::VarStore,
    vae: AutoencoderKL,
    autocast_bf16: bool,
    fetcher: BatchFetcher,
    rank: u32,
    batches: u64,
}

impl CacheFiller {
    /// Loads the job's VAE on `device` and opens the dataset (`data_root` overrides the job's)
    /// and the cache.
    pub fn open(config: &JobConfig, device: Device, data_root: Option<&PathBuf>) -> Result<Self> {
        if !config.train.cache_latents {
            return Err(WorkerError::Training(
                "train.fill_cache_only needs train.cache_latents".to_string(),
            ));
        }
        let model_path = PathBuf::from(&config.model.path);
        let components = ModelComponents::open(&model_path, None, &[Component::Vae], device)?;
        let (mut vae_store, vae) = components.vae()?;
        vae_store.freeze();
        let digest = vae_digest(&vae_store)?;
        let root = match data_root {
            Some(root) => root.display().to_string(),
            None => config.data.dataset_root(),
        };
        let loader = BatchLoader::new(DatasetStore::open(&root)?, LoaderOptions::default())?;
        let mut fetcher = BatchFetcher::new(loader, config.job.seed)?;
        let location = config.data.latent_cache_location(&config.job.run_dir);
        fetcher.use_latent_cache(LatentCache::open(&location)?, &digest);
        info!(dataset = %root, cache = %location, vae_digest = %&digest[..16], "filling the latent cache");
        Ok(Self {
            device,
            _vae_store: vae_store,
            vae,
            autocast_bf16: device.is_cuda() && config.train.mixed_precision == MixedPrecision::Bf16,
            fetcher,
            rank: 0,
            batches: 0,
        })
    }

    /// Joins a (re-)formed group: drops the loads in flight, whose batch numbers may now name
    /// other items.
    pub fn start(&mut self, group: &GroupInfo, config: &JobConfig) {
        self.rank = group.rank;
        self.fetcher.restart(config.job.seed);
    }

    pub fn announce(&mut self, batches: &[Batch]) {
        self.fetcher.announce(batches);
    }

    /// Loads `batch` through the cache, encodes what it misses and writes it back.
    pub fn fill(&mut self, batch: &Batch) -> Result<BatchOutcome> {
        let started = std::time::Instant::now();
        let fetched = self.fetcher.load(batch)?;
        let data_wait_seconds = started.elapsed().as_secs_f64();
        let failures = fetched.failures().to_vec();
        for failure in &failures {
            warn!(rank = self.rank, item = failure.id, key = %failure.key, reason = %failure.reason, "item failed to load; it is not cached");
        }
        let Fetched::Latents(loaded) = fetched else {
            return Err(WorkerError::Training(
                "the fetcher returned pixels while filling the cache".to_string(),
            ));
        };
        let encoder = LatentEncoder {
            vae: &self.vae,
            device: self.device,
            autocast_bf16: self.autocast_bf16,
        };
        let (_, new_entries) = item_distributions(&encoder, &loaded)?;
        let pack_name = format!(
            "fill-e{}-r{}-b{}-{}",
            batch.epoch,
            self.rank,
            batch.index,
            std::process::id()
        );
        self.fetcher.store_latents(pack_name, new_entries);
        self.batches += 1;
        Ok(BatchOutcome {
            data_wait_seconds,
            failures: failures.iter().map(ToString::to_string).collect(),
            ..BatchOutcome::default()
        })
    }

    /// Waits for the pack writes in flight and logs the running totals (at checkpoints and at
    /// the end, so the filled part survives a later kill).
    pub fn flush(&mut self, step: u64) {
        self.fetcher.flush_latent_writes();
        info!(
            rank = self.rank,
            batches = self.batches,
            "latent cache fill"
        );
        log_cache_totals(&self.fetcher, self.rank, step);
    }
}
