//! The dry run's trainer: no model; every batch is fetched, decoded, cover-resized and cropped
//! by the worker's real batch loader (`arbor-data`), so a user validates the data and measures
//! loading throughput per rank before spending GPU hours. Items that fail to load are reported
//! with their id and key and counted; they never stop the job. As in training, the batches the
//! runtime announces (`data.prefetch_batches`) load in the background, so the reported data wait
//! is what a GPU step of `--simulate-step-ms` would see.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbor_common::config::JobConfig;
use arbor_data::batch_loader::{BatchLoader, LoaderOptions};
use arbor_data::store::DatasetStore;
use arbor_runtime::batch_fetch::BatchFetcher;
use arbor_runtime::trainer::{Batch, BatchOutcome, GroupInfo, Trainer};
use tracing::{info, warn};

pub struct DryRunTrainer {
    data_root: Option<PathBuf>,
    simulated_step: Duration,
    rank: u32,
    fetcher: Option<BatchFetcher>,
    items: u64,
    failed: u64,
    /// Seconds `train_batch` waited for its batch (what prefetching did not hide).
    load_seconds: f64,
    started: Option<Instant>,
}

impl DryRunTrainer {
    pub fn new(data_root: Option<PathBuf>, simulated_step: Duration) -> Result<Self, String> {
        Ok(Self {
            data_root,
            simulated_step,
            rank: 0,
            fetcher: None,
            items: 0,
            failed: 0,
            load_seconds: 0.0,
            started: None,
        })
    }

    /// The dataset root: `--data-root`, else the job's `data.root` (the coordinator resolves it
    /// to the manifest's folder when unset).
    fn root(&self, config: &JobConfig) -> String {
        match &self.data_root {
            Some(root) => root.display().to_string(),
            None => config.data.dataset_root(),
        }
    }
}

impl Trainer for DryRunTrainer {
    fn start(&mut self, group: &GroupInfo, config: &JobConfig) -> Result<(), String> {
        self.rank = group.rank;
        match self.fetcher.as_mut() {
            Some(fetcher) => fetcher.restart(config.job.seed),
            None => {
                let root = self.root(config);
                let store = DatasetStore::open(&root)
                    .map_err(|error| format!("opening the dataset root {root}: {error}"))?;
                let loader = BatchLoader::new(store, LoaderOptions::default())
                    .map_err(|error| format!("configuring the loader: {error}"))?;
                let fetcher = BatchFetcher::new(loader, config.job.seed)
                    .map_err(|error| format!("starting the loader: {error}"))?;
                self.fetcher = Some(fetcher);
            }
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

    fn upcoming(&mut self, batches: &[Batch]) {
        if let Some(fetcher) = self.fetcher.as_mut() {
            fetcher.announce(batches);
        }
    }

    fn train_batch(&mut self, batch: &Batch) -> Result<BatchOutcome, String> {
        let fetcher = self.fetcher.as_mut().ok_or("the loader is not started")?;
        let started = Instant::now();
        let fetched = fetcher
            .load(batch)
            .map_err(|error| format!("loading batch {}: {error}", batch.index))?;
        let failures = fetched.failures();
        let load_seconds = started.elapsed().as_secs_f64();
        for failure in failures {
            warn!(rank = self.rank, item = failure.id, key = %failure.key, reason = %failure.reason, "item failed to load; its slot repeats another item");
        }
        self.items += batch.items.len() as u64;
        self.failed += failures.len() as u64;
        self.load_seconds += load_seconds;
        if !self.simulated_step.is_zero() {
            std::thread::sleep(self.simulated_step);
        }
        Ok(BatchOutcome {
            data_wait_seconds: load_seconds,
            failures: failures.iter().map(ToString::to_string).collect(),
            ..BatchOutcome::default()
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
            .fetcher
            .as_ref()
            .map(|fetcher| fetcher.loader().totals())
            .unwrap_or_default();
        info!(
            rank = self.rank,
            items = self.items,
            failed = self.failed,
            items_per_second = self.items as f64 / seconds,
            data_wait_seconds = self.load_seconds,
            data_wait_fraction = self.load_seconds / seconds,
            mean_cropped_pixels = totals.mean_cropped_pixels(),
            "dry run finished"
        );
        Ok(())
    }
}
