//! The dry run's trainer: no model; every batch is fetched, decoded, cover-resized and cropped
//! by the worker's real batch loader (`arbor-data`), so a user validates the data and measures
//! loading throughput per rank before spending GPU hours. Items that fail to load are reported
//! with their id and key and counted; they never stop the job.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbor_common::config::JobConfig;
use arbor_data::batch_loader::{BatchLoader, BatchRequest, LoadItem, LoaderOptions};
use arbor_data::store::DatasetStore;
use arbor_runtime::trainer::{Batch, BatchOutcome, GroupInfo, Trainer};
use tracing::{info, warn};

pub struct DryRunTrainer {
    data_root: Option<PathBuf>,
    simulated_step: Duration,
    rank: u32,
    seed: u64,
    loader: Option<BatchLoader>,
    runtime: tokio::runtime::Runtime,
    items: u64,
    failed: u64,
    load_seconds: f64,
    started: Option<Instant>,
}

impl DryRunTrainer {
    pub fn new(data_root: Option<PathBuf>, simulated_step: Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("starting the loader runtime: {error}"))?;
        Ok(Self {
            data_root,
            simulated_step,
            rank: 0,
            seed: 0,
            loader: None,
            runtime,
            items: 0,
            failed: 0,
            load_seconds: 0.0,
            started: None,
        })
    }

    /// The dataset root: `--data-root`, else the job's `data.root` (the coordinator resolves it
    /// to the manifest's folder when unset).
    fn root(&self, config: &JobConfig) -> String {
        if let Some(root) = &self.data_root {
            return root.display().to_string();
        }
        match &config.data.root {
            Some(root) => root.clone(),
            None => PathBuf::from(&config.data.manifest)
                .parent()
                .map(|parent| parent.display().to_string())
                .unwrap_or_else(|| ".".to_string()),
        }
    }
}

impl Trainer for DryRunTrainer {
    fn start(&mut self, group: &GroupInfo, config: &JobConfig) -> Result<(), String> {
        self.rank = group.rank;
        self.seed = config.job.seed;
        if self.loader.is_none() {
            let root = self.root(config);
            let store = DatasetStore::open(&root)
                .map_err(|error| format!("opening the dataset root {root}: {error}"))?;
            let loader = BatchLoader::new(store, LoaderOptions::default())
                .map_err(|error| format!("configuring the loader: {error}"))?;
            self.loader = Some(loader);
        }
        self.started.get_or_insert_with(Instant::now);
        info!(
            rank = group.rank,
            world_size = group.world_size,
            generation = group.generation,
            "dry run: group started"
        );
        Ok(())
    }

    fn train_batch(&mut self, batch: &Batch) -> Result<BatchOutcome, String> {
        let loader = self.loader.as_ref().ok_or("the loader is not started")?;
        let request = BatchRequest {
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
            seed: self.seed,
            epoch: batch.epoch,
        };
        let started = Instant::now();
        let loaded = self
            .runtime
            .block_on(loader.load_batch(&request))
            .map_err(|error| format!("loading batch {}: {error}", batch.index))?;
        let load_seconds = started.elapsed().as_secs_f64();
        for failure in &loaded.failures {
            warn!(rank = self.rank, item = failure.id, key = %failure.key, reason = %failure.reason, "item failed to load; its slot repeats another item");
        }
        self.items += batch.items.len() as u64;
        self.failed += loaded.failures.len() as u64;
        self.load_seconds += load_seconds;
        if !self.simulated_step.is_zero() {
            std::thread::sleep(self.simulated_step);
        }
        Ok(BatchOutcome {
            loss: 0.0,
            data_wait_seconds: load_seconds,
            failed_items: loaded.failures.len() as u32,
        })
    }

    fn checkpoint(&mut self, step: u64, epoch: u64, batch: u64) -> Result<(), String> {
        info!(
            rank = self.rank,
            step, epoch, batch, "dry run: checkpoint (sampler position only)"
        );
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        let seconds = self
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(1e-9);
        let totals = self
            .loader
            .as_ref()
            .map(BatchLoader::totals)
            .unwrap_or_default();
        info!(
            rank = self.rank,
            items = self.items,
            failed = self.failed,
            items_per_second = self.items as f64 / seconds,
            loading_items_per_second = self.items as f64 / self.load_seconds.max(1e-9),
            mean_cropped_pixels = totals.mean_cropped_pixels(),
            "dry run finished"
        );
        Ok(())
    }
}
