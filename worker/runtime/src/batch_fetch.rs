//! Loading the batches a trainer trains: [`BatchFetcher`] starts the loads of the batches the
//! runtime announces ahead ([`crate::trainer::Trainer::upcoming`], `data.prefetch_batches` of
//! them) on its own tokio runtime, so that fetching, decoding and cropping overlap the step, and
//! hands each one over when its turn comes. A batch that was not announced, or whose items differ
//! from the announced one (a regroup re-plans batches under the same numbers), is loaded there
//! and then. Both the GPU trainer and the dry run load through it.

use std::collections::HashMap;

use arbor_data::batch_loader::{Batch as LoadedBatch, BatchLoader, BatchRequest, LoadItem};
use arbor_data::DataError;
use tokio::task::JoinHandle;

use crate::trainer::Batch;

/// The threads of the fetcher's runtime: object reads are async; decode and resize run on the
/// loader's own pool of blocking threads.
const FETCH_RUNTIME_THREADS: usize = 2;

type LoadTask = JoinHandle<Result<LoadedBatch, DataError>>;

/// Loads batches for one rank, announced ones in the background.
pub struct BatchFetcher {
    loader: BatchLoader,
    runtime: tokio::runtime::Runtime,
    seed: u64,
    /// Loads in flight by (epoch, batch index), with the item ids each was started for.
    in_flight: HashMap<(u64, u64), (Vec<u64>, LoadTask)>,
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
        })
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
            let task = self
                .runtime
                .spawn(async move { loader.load_batch(&request).await });
            if let Some((_, stale)) = self.in_flight.insert(key, (ids, task)) {
                stale.abort();
            }
        }
    }

    /// Batches announced and not yet taken.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `batch`'s pixels: its background load if one was started for these items, else a load
    /// now. Blocks until they are ready.
    pub fn load(&mut self, batch: &Batch) -> Result<LoadedBatch, DataError> {
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
        self.runtime.block_on(self.loader.load_batch(&request))
    }
}

impl Drop for BatchFetcher {
    fn drop(&mut self) {
        for (_, (_, task)) in self.in_flight.drain() {
            task.abort();
        }
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
