//! The per-rank batch sampler (docs/architecture.md §2 "Per-rank sampler"), NovelAI's
//! `bucketmanager.py` with a counter-based stream.
//!
//! Given a rank's shard:
//!
//! 1. The shard's positions are grouped into one list per bucket, each in shard order.
//! 2. With the [`StreamDomain::Sampler`] stream of `(seed, epoch, segment, rank)`, each bucket
//!    list is shuffled, in bucket id order.
//! 3. The first `len mod bsz` items of each shuffled bucket list move to the catch-all list (in
//!    bucket id order), which is then shuffled with the same stream. Every list is now a multiple
//!    of `bsz` long (the catch-all because the shard length is).
//! 4. Each batch draws `u = below(remaining items)` and walks the candidates (the catch-all
//!    first, then the non-empty buckets in id order, as the reference lists them) to pick one
//!    with probability proportional to its remaining items; the batch is the candidate's next
//!    `bsz` items. A bucket batch trains at its bucket's resolution, a catch-all batch at
//!    `base_res`.
//!
//! An epoch has exactly `shard_len / bsz` batches. Everything is computed from the plan alone
//! (no I/O), so [`RankSampler::skip`] replays to any batch.

use crate::assign::BucketedItems;
use crate::buckets::{Bucket, BucketTable};
use crate::error::CommonError;
use crate::plan::EpochPlan;
use crate::stream::{RandomStream, StreamDomain};

/// Which list a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchBucket {
    /// A bucket, trained at its own resolution.
    Bucket(u16),
    /// The catch-all list, trained at `base_res`.
    CatchAll,
}

/// One batch: `bsz` positions into [`BucketedItems`] and the resolution they train at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRef<'a> {
    /// The batch's index in the rank's epoch.
    pub index: u64,
    pub bucket: BatchBucket,
    pub resolution: Bucket,
    pub positions: &'a [u32],
}

#[derive(Debug, Clone)]
struct BucketRegion {
    bucket: u16,
    next: usize,
    end: usize,
}

/// The sampler of one rank for one plan; see the module docs.
#[derive(Debug, Clone)]
pub struct RankSampler {
    grouped: Vec<u32>,
    regions: Vec<BucketRegion>,
    catchall: Vec<u32>,
    catchall_next: usize,
    remaining_items: u64,
    bsz: usize,
    stream: RandomStream,
    next_index: u64,
    total_batches: u64,
    resolutions: Vec<Bucket>,
    base: Bucket,
}

/// What keys a rank's sampler stream: the plan's seed, epoch and segment, and the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerKey {
    pub seed: u64,
    pub epoch: u64,
    pub segment: u64,
    pub rank: u32,
}

impl RankSampler {
    /// The sampler of `rank` over `plan`.
    pub(crate) fn new(
        shard: impl Iterator<Item = u32> + Clone,
        items: &BucketedItems,
        table: &BucketTable,
        plan: &EpochPlan,
        rank: u32,
    ) -> Result<Self, CommonError> {
        let params = plan.params();
        let key = SamplerKey {
            seed: params.seed,
            epoch: params.epoch,
            segment: plan.segment(),
            rank,
        };
        Self::from_shard(shard, items, table, key, params.bsz)
    }

    /// Builds the lists from a shard given as positions into `items`, in shard order (the
    /// iterator is walked twice). A worker that received its shard from the coordinator calls
    /// this with positions `0..shard_len` into the streamed items and gets exactly the batches
    /// the coordinator's plan would give that rank.
    pub fn from_shard(
        shard: impl Iterator<Item = u32> + Clone,
        items: &BucketedItems,
        table: &BucketTable,
        key: SamplerKey,
        bsz: u32,
    ) -> Result<Self, CommonError> {
        if bsz == 0 {
            return Err(crate::error::invalid("bsz", "must be at least 1"));
        }
        let bsz = bsz as usize;
        // Pass 1 reads each shard entry's bucket once (a random access into the item table) and
        // keeps it, 2 bytes per entry; pass 2 recomputes the shard order (cheap arithmetic) and
        // places positions, so the shard itself is never stored besides the grouped copy.
        let shard_buckets = read_buckets_in_chunks(shard.clone(), items);
        let mut starts = vec![0usize; table.len() + 1];
        for &bucket in &shard_buckets {
            starts[usize::from(bucket) + 1] += 1;
        }
        for bucket in 0..table.len() {
            starts[bucket + 1] += starts[bucket];
        }
        let shard_len = starts[table.len()];
        let mut grouped = vec![0u32; shard_len];
        let mut cursors = starts.clone();
        for (position, &bucket) in shard.zip(&shard_buckets) {
            let cursor = &mut cursors[usize::from(bucket)];
            grouped[*cursor] = position;
            *cursor += 1;
        }
        drop(shard_buckets);

        let mut stream = RandomStream::new(
            StreamDomain::Sampler,
            &[key.seed, key.epoch, key.segment, u64::from(key.rank)],
        );
        let mut regions = Vec::new();
        let mut catchall = Vec::new();
        for bucket in 0..table.len() {
            let (start, end) = (starts[bucket], starts[bucket + 1]);
            if start == end {
                continue;
            }
            let list = &mut grouped[start..end];
            stream.shuffle(list);
            let overhang = list.len() % bsz;
            catchall.extend_from_slice(&list[..overhang]);
            if start + overhang < end {
                regions.push(BucketRegion {
                    bucket: bucket as u16,
                    next: start + overhang,
                    end,
                });
            }
        }
        stream.shuffle(&mut catchall);
        if shard_len % bsz != 0 {
            return Err(crate::error::invalid(
                "shard",
                format!("shard length {shard_len} is not a multiple of bsz {bsz}"),
            ));
        }
        Ok(Self {
            grouped,
            regions,
            catchall,
            catchall_next: 0,
            remaining_items: shard_len as u64,
            bsz,
            stream,
            next_index: 0,
            total_batches: (shard_len / bsz) as u64,
            resolutions: table.buckets().to_vec(),
            base: table.base(),
        })
    }

    /// Batches in this rank's epoch.
    pub fn total_batches(&self) -> u64 {
        self.total_batches
    }

    /// Batches drawn so far.
    pub fn batches_done(&self) -> u64 {
        self.next_index
    }

    /// Items in the catch-all list at the start of the epoch.
    pub fn catchall_len(&self) -> usize {
        self.catchall.len()
    }

    /// The next batch, or `None` at the end of the epoch.
    pub fn next_batch(&mut self) -> Option<BatchRef<'_>> {
        if self.remaining_items == 0 {
            return None;
        }
        let index = self.next_index;
        let mut ticket = self.stream.below(self.remaining_items) as usize;
        self.next_index += 1;
        self.remaining_items -= self.bsz as u64;
        let catchall_left = self.catchall.len() - self.catchall_next;
        if ticket < catchall_left {
            let start = self.catchall_next;
            self.catchall_next += self.bsz;
            return Some(BatchRef {
                index,
                bucket: BatchBucket::CatchAll,
                resolution: self.base,
                positions: &self.catchall[start..start + self.bsz],
            });
        }
        ticket -= catchall_left;
        let mut chosen = self.regions.len() - 1;
        for (region_index, region) in self.regions.iter().enumerate() {
            let left = region.end - region.next;
            if ticket < left {
                chosen = region_index;
                break;
            }
            ticket -= left;
        }
        let region = &mut self.regions[chosen];
        let (bucket, start) = (region.bucket, region.next);
        region.next += self.bsz;
        if region.next == region.end {
            self.regions.remove(chosen);
        }
        Some(BatchRef {
            index,
            bucket: BatchBucket::Bucket(bucket),
            resolution: self.resolutions[usize::from(bucket)],
            positions: &self.grouped[start..start + self.bsz],
        })
    }

    /// Replays `count` batches without returning them (no I/O): afterwards the next batch is
    /// the one a fresh run would draw at index `batches_done() + count`.
    pub fn skip(&mut self, count: u64) {
        for _ in 0..count {
            if self.next_batch().is_none() {
                return;
            }
        }
    }
}

/// The bucket of every shard entry, in shard order. Positions are computed a chunk at a time and
/// then looked up in a tight loop, so the random reads into the item table overlap instead of
/// waiting one after another behind the permutation arithmetic.
fn read_buckets_in_chunks(shard: impl Iterator<Item = u32>, items: &BucketedItems) -> Vec<u16> {
    const CHUNK: usize = 256;
    let mut buckets = Vec::with_capacity(shard.size_hint().0);
    let mut chunk = [0u32; CHUNK];
    let mut shard = shard.peekable();
    while shard.peek().is_some() {
        let mut filled = 0;
        for (slot, position) in chunk.iter_mut().zip(&mut shard) {
            *slot = position;
            filled += 1;
        }
        buckets.extend(
            chunk[..filled]
                .iter()
                .map(|&position| items.bucket(position)),
        );
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::{AssignParams, Assigner};
    use crate::buckets::BucketParams;
    use crate::plan::PlanParams;

    fn fixture(count: u64) -> (BucketedItems, BucketTable) {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        let assigner = Assigner::new(table.clone(), AssignParams::default()).unwrap();
        let sizes = (0..count).map(|id| (id * 10, 300 + (id % 7) as u32 * 100, 700));
        (BucketedItems::assign_all(&assigner, sizes).unwrap(), table)
    }

    #[test]
    fn batches_are_single_bucket_and_cover_the_shard() {
        let (items, table) = fixture(1000);
        let params = PlanParams {
            seed: 3,
            epoch: 1,
            world_size: 2,
            bsz: 4,
        };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let mut sampler = plan.sampler(&items, &table, 0).unwrap();
        assert_eq!(sampler.total_batches(), 125);
        let mut seen = Vec::new();
        while let Some(batch) = sampler.next_batch() {
            assert_eq!(batch.positions.len(), 4);
            match batch.bucket {
                BatchBucket::Bucket(bucket) => {
                    assert!(batch.positions.iter().all(|&p| items.bucket(p) == bucket));
                    assert_eq!(batch.resolution, table.get(bucket).unwrap());
                }
                BatchBucket::CatchAll => assert_eq!(batch.resolution, table.base()),
            }
            seen.extend_from_slice(batch.positions);
        }
        assert_eq!(sampler.batches_done(), 125);
        let mut shard: Vec<u32> = plan.shard(0).unwrap().collect();
        shard.sort_unstable();
        seen.sort_unstable();
        assert_eq!(seen, shard);
    }

    #[test]
    fn a_streamed_shard_gives_the_plans_batches() {
        let (items, table) = fixture(700);
        let params = PlanParams {
            seed: 11,
            epoch: 2,
            world_size: 3,
            bsz: 4,
        };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let rank = 2;
        // What a worker receives: (id, bucket) in shard order.
        let streamed: Vec<(u64, u16)> = plan
            .shard(rank)
            .unwrap()
            .map(|position| (items.id(position), items.bucket(position)))
            .collect();
        let local = BucketedItems::from_assigned(table.len(), streamed).unwrap();
        let key = SamplerKey {
            seed: 11,
            epoch: 2,
            segment: 0,
            rank,
        };
        let mut worker =
            RankSampler::from_shard(0..local.len() as u32, &local, &table, key, 4).unwrap();
        let mut coordinator = plan.sampler(&items, &table, rank).unwrap();
        while let Some(expected) = coordinator.next_batch() {
            let expected_ids: Vec<u64> = expected.positions.iter().map(|&p| items.id(p)).collect();
            let got = worker.next_batch().unwrap();
            let got_ids: Vec<u64> = got.positions.iter().map(|&p| local.id(p)).collect();
            assert_eq!((got.bucket, got_ids), (expected.bucket, expected_ids));
        }
        assert!(worker.next_batch().is_none());
    }

    #[test]
    fn skip_replays_to_the_same_batch() {
        let (items, table) = fixture(500);
        let params = PlanParams {
            seed: 9,
            epoch: 4,
            world_size: 1,
            bsz: 3,
        };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let mut full = plan.sampler(&items, &table, 0).unwrap();
        full.skip(40);
        let expected = full
            .next_batch()
            .map(|b| (b.index, b.bucket, b.positions.to_vec()));
        let mut replay = plan.sampler(&items, &table, 0).unwrap();
        replay.skip(40);
        let got = replay
            .next_batch()
            .map(|b| (b.index, b.bucket, b.positions.to_vec()));
        assert_eq!(got, expected);
        assert_eq!(got.unwrap().0, 40);
    }
}
