//! Checking a rank's reported batches against its sampler before they reach the ledger. The
//! sampler is deterministic and needs only the plan, so the coordinator replays it (one cursor
//! per rank, moved forward as batches are reported) and knows the exact items of every batch.

use std::collections::HashMap;

use arbor_common::plan::EpochPlan;
use arbor_common::sampler::RankSampler;

use super::error::MembershipError;
use super::requests::ReportedBatch;
use crate::dataset::Dataset;

/// One replay cursor per rank of the current plan.
#[derive(Default)]
pub struct BatchReplay {
    cursors: HashMap<u32, RankSampler>,
}

impl BatchReplay {
    /// Forgets the cursors: the plan changed.
    pub fn reset(&mut self) {
        self.cursors.clear();
    }

    /// Checks that `reported` is batch `reported.batch` of `rank`'s epoch in `plan`, from
    /// `first_batch` (where the rank's generation resumed) on, with exactly the items the
    /// sampler gives it.
    pub fn check(
        &mut self,
        plan: &EpochPlan,
        dataset: &Dataset,
        rank: u32,
        first_batch: u64,
        reported: &ReportedBatch,
    ) -> Result<(), MembershipError> {
        let total = plan.batches_per_rank();
        let field = "heartbeat.completed.batch";
        if reported.batch >= total {
            return Err(MembershipError::out_of_range(
                field,
                format!(
                    "batch {} is past the plan's {total} batches per rank",
                    reported.batch
                ),
            ));
        }
        if reported.batch < first_batch {
            return Err(MembershipError::out_of_range(
                field,
                format!(
                    "batch {} is before batch {first_batch}, where this generation resumed",
                    reported.batch
                ),
            ));
        }
        let expected = self.expected_ids(plan, dataset, rank, reported.batch)?;
        if expected != reported.item_ids {
            let field = "heartbeat.completed.item_ids";
            let reason = match reported
                .item_ids
                .iter()
                .zip(&expected)
                .position(|(got, want)| got != want)
            {
                _ if reported.item_ids.len() != expected.len() => format!(
                    "batch {} of rank {rank} has {} items, not {}",
                    reported.batch,
                    reported.item_ids.len(),
                    expected.len()
                ),
                Some(slot) => format!(
                    "batch {} of rank {rank}: item {} in slot {slot} is not the sampler's {}",
                    reported.batch, reported.item_ids[slot], expected[slot]
                ),
                None => format!("batch {} of rank {rank} differs", reported.batch),
            };
            return Err(MembershipError::LedgerMismatch {
                field: field.to_string(),
                reason,
            });
        }
        Ok(())
    }

    fn expected_ids(
        &mut self,
        plan: &EpochPlan,
        dataset: &Dataset,
        rank: u32,
        batch: u64,
    ) -> Result<Vec<u64>, MembershipError> {
        let fresh = || {
            plan.sampler(&dataset.items, &dataset.table, rank)
                .map_err(|error| {
                    MembershipError::Internal(format!("replaying rank {rank}: {error}"))
                })
        };
        let cursor = match self.cursors.remove(&rank) {
            Some(cursor) if cursor.batches_done() <= batch => cursor,
            _ => fresh()?,
        };
        let mut cursor = cursor;
        cursor.skip(batch - cursor.batches_done());
        let ids = cursor
            .next_batch()
            .map(|drawn| {
                drawn
                    .positions
                    .iter()
                    .map(|&position| dataset.records[position as usize].id)
                    .collect()
            })
            .ok_or_else(|| {
                MembershipError::Internal(format!(
                    "rank {rank}'s sampler ended before batch {batch}"
                ))
            })?;
        self.cursors.insert(rank, cursor);
        Ok(ids)
    }
}
