//! The dry run's trainer: no model, every batch's images fetched (and, with the data loader,
//! decoded, resized and cropped), so a user validates data and measures throughput per rank
//! before spending GPU hours.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbor_common::config::JobConfig;
use arbor_runtime::trainer::{Batch, BatchOutcome, GroupInfo, Trainer};
use tracing::{info, warn};

pub struct DryRunTrainer {
    data_root: Option<PathBuf>,
    simulated_step: Duration,
    rank: u32,
    items: u64,
    failed: u64,
    started: Option<Instant>,
}

impl DryRunTrainer {
    pub fn new(data_root: Option<PathBuf>, simulated_step: Duration) -> Self {
        Self {
            data_root,
            simulated_step,
            rank: 0,
            items: 0,
            failed: 0,
            started: None,
        }
    }

    fn root(&self, config: &JobConfig) -> PathBuf {
        if let Some(root) = &self.data_root {
            return root.clone();
        }
        match &config.data.root {
            Some(root) => PathBuf::from(root.strip_prefix("file://").unwrap_or(root)),
            None => PathBuf::from(&config.data.manifest)
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default(),
        }
    }
}

impl Trainer for DryRunTrainer {
    fn start(&mut self, group: &GroupInfo, config: &JobConfig) -> Result<(), String> {
        self.rank = group.rank;
        if self.data_root.is_none() {
            self.data_root = Some(self.root(config));
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
        let started = Instant::now();
        let root = self.data_root.clone().unwrap_or_default();
        let mut failed = 0;
        for item in &batch.items {
            if let Err(error) = std::fs::read(root.join(&item.key)) {
                warn!(rank = self.rank, item = item.id, key = %item.key, %error, "item unreadable");
                failed += 1;
            }
        }
        self.items += batch.items.len() as u64;
        self.failed += u64::from(failed);
        let data_wait_seconds = started.elapsed().as_secs_f64();
        if !self.simulated_step.is_zero() {
            std::thread::sleep(self.simulated_step);
        }
        Ok(BatchOutcome {
            loss: 0.0,
            data_wait_seconds,
            failed_items: failed,
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
        info!(
            rank = self.rank,
            items = self.items,
            failed = self.failed,
            items_per_second = self.items as f64 / seconds,
            "dry run finished"
        );
        Ok(())
    }
}
