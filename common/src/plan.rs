//! The epoch plan: permute, trim and shard (docs/architecture.md §2 "Epoch plan"
//! and "Resume and elasticity").
//!
//! An epoch plan orders the kept items with the [`FeistelPermutation`] of
//! `(seed, epoch, segment)`, drops the tail so the length is a multiple of `world_size * bsz`,
//! and gives rank `r` the entries `r, r + W, r + 2W, …` of that order. Every rank gets the same
//! count, so every rank runs the same number of steps.
//!
//! Positions (`u32` indices into [`BucketedItems`]) are what plans and samplers move around; the
//! order is computed on demand, so a plan costs a few words of memory however large the epoch.
//!
//! When a group comes back with a different world size mid-epoch, [`EpochPlan::reshard`] takes
//! the kept items not yet consumed this epoch, permutes them with `(seed, epoch, generation)`
//! (the generation is the new plan's *segment*), trims and shards them again: no consumed item
//! comes back, and only the new trim is lost.

use serde::{Deserialize, Serialize};

use crate::assign::BucketedItems;
use crate::buckets::BucketTable;
use crate::error::{invalid, CommonError};
use crate::permutation::FeistelPermutation;
use crate::sampler::RankSampler;

/// What identifies one plan: the job seed, the epoch, the group shape and the batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanParams {
    pub seed: u64,
    pub epoch: u64,
    pub world_size: u32,
    /// Per-rank batch size.
    pub bsz: u32,
}

impl PlanParams {
    pub fn validate(&self) -> Result<(), CommonError> {
        if self.world_size == 0 {
            return Err(invalid("world_size", "must be at least 1"));
        }
        if self.bsz == 0 {
            return Err(invalid("bsz", "must be at least 1"));
        }
        Ok(())
    }

    /// Items per global step: `world_size * bsz`.
    pub fn global_batch(&self) -> u64 {
        u64::from(self.world_size) * u64::from(self.bsz)
    }
}

/// The items an epoch plan orders: all kept positions, or an explicit remainder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PlanSource {
    AllKept,
    Remaining(Vec<u32>),
}

/// One plan of one epoch; see the module docs.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    params: PlanParams,
    segment: u64,
    source: PlanSource,
    permutation: FeistelPermutation,
    kept_after_trim: u64,
}

impl EpochPlan {
    /// The epoch's plan over all `kept_len` kept items (segment 0).
    pub fn new(kept_len: usize, params: PlanParams) -> Result<Self, CommonError> {
        params.validate()?;
        Ok(Self::build(params, 0, PlanSource::AllKept, kept_len as u64))
    }

    /// An elastic re-shard: the kept items of `0..kept_len` not in `consumed`, permuted with
    /// `(seed, epoch, generation)` and sharded for `params.world_size`.
    pub fn reshard(
        kept_len: usize,
        consumed: &ConsumedSet,
        params: PlanParams,
        generation: u64,
    ) -> Result<Self, CommonError> {
        params.validate()?;
        if consumed.len() != kept_len {
            return Err(invalid(
                "consumed",
                format!(
                    "consumed set covers {} positions but the epoch has {kept_len} kept items",
                    consumed.len()
                ),
            ));
        }
        let remaining: Vec<u32> = (0..kept_len as u32)
            .filter(|&position| !consumed.contains(position))
            .collect();
        let len = remaining.len() as u64;
        Ok(Self::build(
            params,
            generation,
            PlanSource::Remaining(remaining),
            len,
        ))
    }

    fn build(params: PlanParams, segment: u64, source: PlanSource, len: u64) -> Self {
        let kept_after_trim = len - len % params.global_batch();
        Self {
            params,
            segment,
            source,
            permutation: FeistelPermutation::new(len, params.seed, params.epoch, segment),
            kept_after_trim,
        }
    }

    pub fn params(&self) -> &PlanParams {
        &self.params
    }

    /// 0 for the epoch's first plan, the generation for a re-shard.
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// Items this plan orders, before the trim.
    pub fn candidates(&self) -> u64 {
        self.permutation.len()
    }

    /// Items trained by this plan across all ranks.
    pub fn kept_after_trim(&self) -> u64 {
        self.kept_after_trim
    }

    /// Items dropped by the trim.
    pub fn trimmed(&self) -> u64 {
        self.candidates() - self.kept_after_trim
    }

    /// Items per rank.
    pub fn shard_len(&self) -> u64 {
        self.kept_after_trim / u64::from(self.params.world_size)
    }

    /// Batches per rank: `shard_len / bsz`.
    pub fn batches_per_rank(&self) -> u64 {
        self.shard_len() / u64::from(self.params.bsz)
    }

    /// The position at `index` of the permuted order (`index < candidates()`).
    #[inline]
    pub fn position_at(&self, index: u64) -> u32 {
        let permuted = self.permutation.apply(index);
        match &self.source {
            PlanSource::AllKept => permuted as u32,
            PlanSource::Remaining(remaining) => remaining[permuted as usize],
        }
    }

    /// The positions of `rank`'s shard, in shard order: entries `rank, rank + W, …` of the
    /// trimmed order.
    pub fn shard(&self, rank: u32) -> Result<impl Iterator<Item = u32> + Clone + '_, CommonError> {
        self.check_rank(rank)?;
        let world_size = u64::from(self.params.world_size);
        Ok((0..self.shard_len())
            .map(move |step| self.position_at(u64::from(rank) + step * world_size)))
    }

    /// The sampler of `rank` over this plan.
    pub fn sampler(
        &self,
        items: &BucketedItems,
        table: &BucketTable,
        rank: u32,
    ) -> Result<RankSampler, CommonError> {
        let shard = self.shard(rank)?;
        RankSampler::new(shard, items, table, self, rank)
    }

    /// The positions consumed when every rank `r` has completed `batches_done[r]` batches of this
    /// plan, added to `consumed`. This is the replay the coordinator runs before a re-shard.
    pub fn mark_consumed(
        &self,
        items: &BucketedItems,
        table: &BucketTable,
        batches_done: &[u64],
        consumed: &mut ConsumedSet,
    ) -> Result<(), CommonError> {
        if batches_done.len() != self.params.world_size as usize {
            return Err(invalid(
                "batches_done",
                format!(
                    "got progress for {} ranks, the plan has {}",
                    batches_done.len(),
                    self.params.world_size
                ),
            ));
        }
        for (rank, &done) in batches_done.iter().enumerate() {
            let mut sampler = self.sampler(items, table, rank as u32)?;
            for _ in 0..done {
                let Some(batch) = sampler.next_batch() else {
                    return Err(invalid(
                        "batches_done",
                        format!(
                            "rank {rank} reports {done} batches, the plan has {}",
                            self.batches_per_rank()
                        ),
                    ));
                };
                for &position in batch.positions {
                    consumed.insert(position);
                }
            }
        }
        Ok(())
    }

    fn check_rank(&self, rank: u32) -> Result<(), CommonError> {
        if rank >= self.params.world_size {
            return Err(CommonError::RankOutOfRange {
                rank,
                world_size: self.params.world_size,
            });
        }
        Ok(())
    }
}

/// The kept positions already trained this epoch: one bit per kept item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedSet {
    len: usize,
    words: Vec<u64>,
}

impl ConsumedSet {
    /// An empty set over `0..kept_len`.
    pub fn new(kept_len: usize) -> Self {
        Self {
            len: kept_len,
            words: vec![0; kept_len.div_ceil(64)],
        }
    }

    /// The number of positions the set covers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks `position`; returns false if it was already marked.
    pub fn insert(&mut self, position: u32) -> bool {
        let (word, bit) = (position as usize / 64, position % 64);
        let was_set = self.words[word] & (1 << bit) != 0;
        self.words[word] |= 1 << bit;
        !was_set
    }

    pub fn contains(&self, position: u32) -> bool {
        self.words[position as usize / 64] & (1 << (position % 64)) != 0
    }

    /// The number of marked positions.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_to_a_multiple_of_the_global_batch_and_shards_strided() {
        let params = PlanParams {
            seed: 1,
            epoch: 0,
            world_size: 3,
            bsz: 4,
        };
        let plan = EpochPlan::new(100, params).unwrap();
        assert_eq!(plan.kept_after_trim(), 96);
        assert_eq!(plan.trimmed(), 4);
        assert_eq!(plan.shard_len(), 32);
        assert_eq!(plan.batches_per_rank(), 8);
        let rank_one: Vec<u32> = plan.shard(1).unwrap().collect();
        let expected: Vec<u32> = (0..32).map(|step| plan.position_at(1 + step * 3)).collect();
        assert_eq!(rank_one, expected);
        assert!(matches!(
            plan.shard(3),
            Err(CommonError::RankOutOfRange {
                rank: 3,
                world_size: 3
            })
        ));
    }

    #[test]
    fn zero_world_size_or_bsz_is_refused() {
        let zero_world = PlanParams {
            seed: 1,
            epoch: 0,
            world_size: 0,
            bsz: 4,
        };
        let zero_bsz = PlanParams {
            seed: 1,
            epoch: 0,
            world_size: 2,
            bsz: 0,
        };
        assert_eq!(
            EpochPlan::new(10, zero_world).unwrap_err().to_string(),
            "invalid parameter `world_size`: must be at least 1"
        );
        assert_eq!(
            EpochPlan::new(10, zero_bsz).unwrap_err().to_string(),
            "invalid parameter `bsz`: must be at least 1"
        );
    }

    #[test]
    fn reshard_skips_consumed_positions() {
        let mut consumed = ConsumedSet::new(50);
        for position in 0..20 {
            assert!(consumed.insert(position * 2));
        }
        assert!(!consumed.insert(0));
        assert_eq!(consumed.count(), 20);
        let params = PlanParams {
            seed: 5,
            epoch: 2,
            world_size: 2,
            bsz: 3,
        };
        let plan = EpochPlan::reshard(50, &consumed, params, 7).unwrap();
        assert_eq!(plan.candidates(), 30);
        assert_eq!(plan.kept_after_trim(), 30);
        assert_eq!(plan.segment(), 7);
        let mut all: Vec<u32> = (0..2).flat_map(|rank| plan.shard(rank).unwrap()).collect();
        all.sort_unstable();
        let expected: Vec<u32> = (0..50).filter(|p| !consumed.contains(*p)).collect();
        assert_eq!(all, expected);
    }
}
