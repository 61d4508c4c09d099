//! A whole epoch at a glance: what `arbor plan epoch` prints and the coordinator logs.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::assign::BucketedItems;
use crate::buckets::BucketTable;
use crate::error::CommonError;
use crate::plan::EpochPlan;
use crate::sampler::BatchBucket;

/// The counts of one epoch plan, with every rank's sampler run to the end.
///
/// Map keys are bucket ids (serialised as JSON strings).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanSummary {
    /// Items given to the planner: kept plus pruned.
    pub items: u64,
    /// Items whose aspect error reached `max_ar_error`.
    pub pruned: u64,
    pub kept_after_trim: u64,
    pub trimmed: u64,
    pub items_per_rank: u64,
    pub batches_per_rank: u64,
    /// Kept items per bucket, after pruning and before trimming.
    pub bucket_items: BTreeMap<u16, u64>,
    /// Per rank: bucket id → batches drawn from that bucket.
    pub bucket_batches_per_rank: Vec<BTreeMap<u16, u64>>,
    pub catchall_items_per_rank: Vec<u64>,
    pub catchall_batches_per_rank: Vec<u64>,
    /// Mean linear aspect error of the kept items.
    pub mean_aspect_error: f64,
}

impl PlanSummary {
    /// Runs every rank's sampler of `plan` and counts.
    pub fn compute(
        items: &BucketedItems,
        table: &BucketTable,
        plan: &EpochPlan,
    ) -> Result<Self, CommonError> {
        let world_size = plan.params().world_size;
        let mut bucket_batches_per_rank = Vec::with_capacity(world_size as usize);
        let mut catchall_items_per_rank = Vec::with_capacity(world_size as usize);
        let mut catchall_batches_per_rank = Vec::with_capacity(world_size as usize);
        for rank in 0..world_size {
            let mut sampler = plan.sampler(items, table, rank)?;
            catchall_items_per_rank.push(sampler.catchall_len() as u64);
            let mut bucket_batches = BTreeMap::new();
            let mut catchall_batches = 0;
            while let Some(batch) = sampler.next_batch() {
                match batch.bucket {
                    BatchBucket::Bucket(bucket) => *bucket_batches.entry(bucket).or_insert(0) += 1,
                    BatchBucket::CatchAll => catchall_batches += 1,
                }
            }
            bucket_batches_per_rank.push(bucket_batches);
            catchall_batches_per_rank.push(catchall_batches);
        }
        let bucket_items = items
            .bucket_counts()
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(bucket, &count)| (bucket as u16, count))
            .collect();
        Ok(Self {
            items: items.len() as u64 + items.pruned_ids().len() as u64,
            pruned: items.pruned_ids().len() as u64,
            kept_after_trim: plan.kept_after_trim(),
            trimmed: plan.trimmed(),
            items_per_rank: plan.shard_len(),
            batches_per_rank: plan.batches_per_rank(),
            bucket_items,
            bucket_batches_per_rank,
            catchall_items_per_rank,
            catchall_batches_per_rank,
            mean_aspect_error: items.mean_aspect_error(),
        })
    }
}
