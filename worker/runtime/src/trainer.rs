//! The interface between the runtime and what trains (or, in a dry run, only loads) a batch.

use arbor_common::accumulation::{accumulation_window_len, closes_accumulation_window};
use arbor_common::buckets::Bucket;
use arbor_common::config::JobConfig;
use arbor_common::sampler::BatchBucket;

/// One item of a batch, as the coordinator streamed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    pub id: u64,
    pub key: String,
    pub caption: String,
    pub width: u32,
    pub height: u32,
}

/// One batch of this rank: `bsz` items of one bucket, at `resolution`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub epoch: u64,
    /// Index of the batch in this rank's plan.
    pub index: u64,
    pub bucket: BatchBucket,
    pub resolution: Bucket,
    pub items: Vec<BatchItem>,
    /// How many batches this rank's plan has in this epoch (segment): gradient accumulation
    /// windows are counted from its first batch and the last one closes the epoch's last
    /// window, so no micro-batch's gradient is carried across an epoch or a checkpoint.
    pub epoch_batches: u64,
}

impl Batch {
    /// Whether this batch is the last micro-batch of its gradient accumulation window, after
    /// which the optimizer steps: every `grad_accum`-th batch of the epoch, and the epoch's last.
    pub fn closes_window(&self, grad_accum: u32) -> bool {
        closes_accumulation_window(self.index, self.epoch_batches, grad_accum)
    }

    /// The number of micro-batches in this batch's accumulation window: `grad_accum`, or fewer
    /// for the epoch's last window when the epoch's batch count is not a multiple of it.
    pub fn window_len(&self, grad_accum: u32) -> u64 {
        accumulation_window_len(self.index, self.epoch_batches, grad_accum)
    }
}

/// The group this process belongs to, as the coordinator formed it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    pub store_address: String,
    pub store_prefix: String,
    /// The run-directory path of the checkpoint to resume from, empty for a fresh start.
    pub resume_checkpoint: String,
    pub resume_step: u64,
}

/// An item of the validation set, at the resolution of its bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationItem {
    pub item: BatchItem,
    pub resolution: Bucket,
}

/// What one batch cost and gave.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// The latest loss, when the trainer read one back with this batch (a GPU trainer reads its
    /// losses back every few steps, not every batch); `None` keeps the last one reported.
    pub loss: Option<f64>,
    /// Seconds spent waiting for data.
    pub data_wait_seconds: f64,
    /// Items that failed to load and were replaced (reported by the loader), one line each
    /// naming the item, its key and the reason.
    pub failures: Vec<String>,
    /// The learning rate the batch trained at (`None` in a dry run).
    pub learning_rate: Option<f64>,
    /// The batch's prompts by token count: [`TOKEN_LENGTH_BINS`].
    pub token_length_counts: [u64; 4],
    /// A validation loss measured after this batch's step, with that step (`data.validation_*`).
    pub validation: Option<(f64, u64)>,
}

/// The bins of [`BatchOutcome::token_length_counts`] (tokens without BOS/EOS): one CLIP chunk,
/// two, three, and longer prompts (truncated to three).
pub const TOKEN_LENGTH_BINS: [&str; 4] = ["up_to_75", "76_to_150", "151_to_225", "over_225"];

/// A trainer: the GPU model, or the dry run's loader.
pub trait Trainer: Send {
    /// Called after every (re-)formation of the group, before the first batch.
    fn start(&mut self, group: &GroupInfo, config: &JobConfig) -> Result<(), String>;
    /// Reads and checks `checkpoint` (run-directory relative), which the next `start` resumes
    /// from. An error says why it cannot be resumed from: the runtime reports the checkpoint as
    /// unusable and the coordinator falls back to an earlier one. A trainer may keep what it
    /// read for `start`. The default (the dry run, which resumes from positions only) checks
    /// nothing.
    fn check_checkpoint(&mut self, _config: &JobConfig, _checkpoint: &str) -> Result<(), String> {
        Ok(())
    }
    /// Called with the batches that will follow (for prefetching); may be ignored.
    fn upcoming(&mut self, _batches: &[Batch]) {}
    /// Called with this rank's share of the validation items (each with its bucket's
    /// resolution) whenever a shard arrives; a trainer without validation ignores them.
    fn validation_items(&mut self, _items: &[ValidationItem]) {}
    fn train_batch(&mut self, batch: &Batch) -> Result<BatchOutcome, String>;
    /// Writes this rank's part of the checkpoint at `step` (under `checkpoints/step-<step>/`).
    fn checkpoint(&mut self, step: u64, epoch: u64, batch: u64) -> Result<(), String>;
    /// Writes the exports of the current weights under `exports/step-<step>/` (rank 0; asked
    /// for with `arbor checkpoint --export`, right after that checkpoint). A trainer without
    /// exports (the dry run) only logs it.
    fn export(&mut self, step: u64) -> Result<(), String> {
        tracing::info!(step, "export requested (nothing to export)");
        Ok(())
    }
    /// Called once when the job ends.
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Whether this trainer can join a re-formed group inside this process. `false` (NCCL)
    /// makes the runtime replace the process on a regroup ([`crate::restart`]).
    fn regroups_in_process(&self) -> bool {
        true
    }
}
