//! Property tests of docs/architecture.md §2's invariants over random datasets, batch sizes, world
//! sizes and seeds: buckets, assignment, shards, the sampler, replay, the elastic re-shard and
//! crops.

use std::collections::HashSet;

use arbor_common::assign::{AspectMetric, AssignParams, Assigner, BucketedItems};
use arbor_common::buckets::{BucketParams, BucketTable};
use arbor_common::crop::{cover_geometry, crop_offset};
use arbor_common::plan::{ConsumedSet, EpochPlan, PlanParams};
use arbor_common::sampler::BatchBucket;
use proptest::prelude::*;

fn sizes_strategy(max_items: usize) -> impl Strategy<Value = Vec<(u32, u32)>> {
    prop::collection::vec((1u32..5000, 1u32..5000), 0..max_items)
}

fn metric_strategy() -> impl Strategy<Value = AspectMetric> {
    prop_oneof![Just(AspectMetric::Linear), Just(AspectMetric::Log)]
}

fn bucketed(sizes: &[(u32, u32)], metric: AspectMetric) -> (BucketedItems, BucketTable) {
    let table = BucketTable::new(BucketParams::default()).unwrap();
    let params = AssignParams {
        aspect_metric: metric,
        ..Default::default()
    };
    let assigner = Assigner::new(table.clone(), params).unwrap();
    // Ids are spread out and unordered so positions and ids never coincide by accident.
    let with_ids = sizes
        .iter()
        .enumerate()
        .map(|(index, &(width, height))| (index as u64 * 7919 + 13, width, height));
    (
        BucketedItems::assign_all(&assigner, with_ids).unwrap(),
        table,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn bucket_tables_are_sorted_unique_bounded_and_hold_base_res(
        max_area in 65_536u64..2_000_000,
        min_dim in 64u32..512,
        span in 0u32..1024,
        step in 8u32..256,
        base_pick in 0u32..1000,
    ) {
        let max_dim = min_dim + span;
        let base_side = min_dim + base_pick % (span + 1);
        let params = BucketParams { max_area, min_dim, max_dim, step, base_res: [base_side, min_dim] };
        match BucketTable::new(params) {
            Err(_) => prop_assert!(u64::from(min_dim) * u64::from(min_dim) > max_area),
            Ok(table) => {
                let buckets = table.buckets();
                for pair in buckets.windows(2) {
                    let ordered = pair[0].width < pair[1].width
                        || (pair[0].width == pair[1].width && pair[0].height > pair[1].height);
                    prop_assert!(ordered, "{:?} then {:?}", pair[0], pair[1]);
                }
                prop_assert_eq!(table.base(), arbor_common::buckets::Bucket { width: base_side, height: min_dim });
                for (id, bucket) in buckets.iter().enumerate() {
                    prop_assert!(bucket.width >= min_dim && bucket.width <= max_dim);
                    prop_assert!(bucket.height >= min_dim && bucket.height <= max_dim);
                    if id != usize::from(table.base_id()) {
                        prop_assert!(u64::from(bucket.width) * u64::from(bucket.height) <= max_area);
                        // Grid buckets: one side on the grid, the other maximal on the grid.
                        let on_grid = |side: u32| (side - min_dim) % step == 0;
                        prop_assert!(on_grid(bucket.width) && on_grid(bucket.height));
                    }
                }
            }
        }
    }

    #[test]
    fn assignment_is_the_argmin_with_lowest_id_ties(
        width in 1u32..20_000,
        height in 1u32..20_000,
        metric in metric_strategy(),
        max_ar_error in 0.05f64..6.0,
    ) {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        let assigner = Assigner::new(table.clone(), AssignParams { aspect_metric: metric, max_ar_error }).unwrap();
        let assignment = assigner.assign(1, width, height).unwrap();
        let aspect = f64::from(width) / f64::from(height);
        let distance = |bucket_aspect: f64| match metric {
            AspectMetric::Linear => (bucket_aspect - aspect).abs(),
            AspectMetric::Log => (bucket_aspect.ln() - aspect.ln()).abs(),
        };
        let chosen = distance(table.aspects()[usize::from(assignment.bucket_id)]);
        for (id, &bucket_aspect) in table.aspects().iter().enumerate() {
            let other = distance(bucket_aspect);
            prop_assert!(chosen <= other);
            if id < usize::from(assignment.bucket_id) {
                prop_assert!(chosen < other, "tie must go to the lower id {id}");
            }
        }
        let linear_error = (table.aspects()[usize::from(assignment.bucket_id)] - aspect).abs();
        prop_assert_eq!(assignment.ar_error, linear_error);
        prop_assert_eq!(assignment.kept, linear_error < max_ar_error);
    }

    #[test]
    fn shards_are_disjoint_equal_and_cover_the_trimmed_kept_set(
        sizes in sizes_strategy(700),
        metric in metric_strategy(),
        bsz in 1u32..9,
        world_size in 1u32..7,
        seed in any::<u64>(),
        epoch in 0u64..6,
    ) {
        let (items, _table) = bucketed(&sizes, metric);
        prop_assert_eq!(items.len() + items.pruned_ids().len(), sizes.len());
        let params = PlanParams { seed, epoch, world_size, bsz };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let global = u64::from(world_size * bsz);
        prop_assert_eq!(plan.kept_after_trim() % global, 0);
        prop_assert!(plan.trimmed() < global);
        prop_assert_eq!(plan.kept_after_trim() + plan.trimmed(), items.len() as u64);

        let mut seen = HashSet::new();
        for rank in 0..world_size {
            let shard: Vec<u32> = plan.shard(rank).unwrap().collect();
            prop_assert_eq!(shard.len() as u64, plan.shard_len());
            for position in shard {
                prop_assert!((position as usize) < items.len());
                prop_assert!(seen.insert(position), "position {} in two shards", position);
            }
        }
        prop_assert_eq!(seen.len() as u64, plan.kept_after_trim());
    }

    #[test]
    fn sampler_batches_are_uniform_complete_and_equal_in_count(
        sizes in sizes_strategy(700),
        metric in metric_strategy(),
        bsz in 1u32..9,
        world_size in 1u32..5,
        seed in any::<u64>(),
        epoch in 0u64..4,
    ) {
        let (items, table) = bucketed(&sizes, metric);
        let params = PlanParams { seed, epoch, world_size, bsz };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let mut trained = HashSet::new();
        for rank in 0..world_size {
            let mut sampler = plan.sampler(&items, &table, rank).unwrap();
            prop_assert_eq!(sampler.catchall_len() % bsz as usize, 0);
            prop_assert_eq!(sampler.total_batches(), plan.batches_per_rank());
            let mut batches = 0u64;
            let mut catchall_items = 0usize;
            while let Some(batch) = sampler.next_batch() {
                prop_assert_eq!(batch.index, batches);
                prop_assert_eq!(batch.positions.len(), bsz as usize);
                match batch.bucket {
                    BatchBucket::Bucket(bucket) => {
                        prop_assert_eq!(batch.resolution, table.get(bucket).unwrap());
                        for &position in batch.positions {
                            prop_assert_eq!(items.bucket(position), bucket);
                        }
                    }
                    BatchBucket::CatchAll => {
                        prop_assert_eq!(batch.resolution, table.base());
                        catchall_items += batch.positions.len();
                    }
                }
                for &position in batch.positions {
                    prop_assert!(trained.insert(position), "position {} trained twice", position);
                }
                batches += 1;
            }
            prop_assert_eq!(batches, plan.batches_per_rank());
            prop_assert_eq!(catchall_items, sampler.catchall_len());
        }
        prop_assert_eq!(trained.len() as u64, plan.kept_after_trim());
    }

    #[test]
    fn replay_to_k_equals_the_kth_batch_of_a_full_run(
        sizes in sizes_strategy(500),
        bsz in 1u32..6,
        world_size in 1u32..4,
        seed in any::<u64>(),
        pick in any::<prop::sample::Index>(),
    ) {
        let (items, table) = bucketed(&sizes, AspectMetric::Linear);
        let params = PlanParams { seed, epoch: 1, world_size, bsz };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        prop_assume!(plan.batches_per_rank() > 0);
        let rank = world_size - 1;
        let mut full = plan.sampler(&items, &table, rank).unwrap();
        let mut run = Vec::new();
        while let Some(batch) = full.next_batch() {
            run.push((batch.bucket, batch.resolution, batch.positions.to_vec()));
        }
        let k = pick.index(run.len());
        let mut replay = plan.sampler(&items, &table, rank).unwrap();
        replay.skip(k as u64);
        let batch = replay.next_batch().unwrap();
        prop_assert_eq!(batch.index, k as u64);
        prop_assert_eq!(&(batch.bucket, batch.resolution, batch.positions.to_vec()), &run[k]);
    }

    #[test]
    fn reshard_never_repeats_consumed_items_and_loses_only_its_trim(
        sizes in sizes_strategy(700),
        bsz in 1u32..6,
        world_size in 1u32..6,
        new_world_size in 1u32..6,
        seed in any::<u64>(),
        progress in prop::collection::vec(any::<prop::sample::Index>(), 6),
        generation in 1u64..10,
    ) {
        let (items, table) = bucketed(&sizes, AspectMetric::Linear);
        let params = PlanParams { seed, epoch: 2, world_size, bsz };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let total = plan.batches_per_rank() as usize;
        let batches_done: Vec<u64> = (0..world_size as usize)
            .map(|rank| progress[rank].index(total + 1) as u64)
            .collect();
        let mut consumed = ConsumedSet::new(items.len());
        plan.mark_consumed(&items, &table, &batches_done, &mut consumed).unwrap();
        let expected_consumed: u64 = batches_done.iter().sum::<u64>() * u64::from(bsz);
        prop_assert_eq!(consumed.count(), expected_consumed);

        let new_params = PlanParams { world_size: new_world_size, ..params };
        let reshard = EpochPlan::reshard(items.len(), &consumed, new_params, generation).unwrap();
        prop_assert_eq!(reshard.candidates(), items.len() as u64 - expected_consumed);
        let mut trained_after = HashSet::new();
        for rank in 0..new_world_size {
            let mut sampler = reshard.sampler(&items, &table, rank).unwrap();
            while let Some(batch) = sampler.next_batch() {
                for &position in batch.positions {
                    prop_assert!(!consumed.contains(position), "consumed position {} repeated", position);
                    prop_assert!(trained_after.insert(position));
                }
            }
        }
        let lost = items.len() as u64 - expected_consumed - trained_after.len() as u64;
        prop_assert_eq!(lost, reshard.trimmed());
        prop_assert!(reshard.trimmed() < u64::from(new_world_size * bsz));
    }

    #[test]
    fn crops_cover_the_bucket_and_stay_in_range(
        width in 1u32..6000,
        height in 1u32..6000,
        seed in any::<u64>(),
        epoch in 0u64..100,
        item in any::<u64>(),
        bucket_pick in 0usize..19,
    ) {
        let table = BucketTable::new(BucketParams::default()).unwrap();
        let bucket = table.buckets()[bucket_pick];
        let geometry = cover_geometry(item, width, height, bucket.width, bucket.height).unwrap();
        prop_assert!(geometry.resized_width >= bucket.width);
        prop_assert!(geometry.resized_height >= bucket.height);
        // The scale makes one side fit exactly (up to rounding), so at most one side is cropped.
        prop_assert!(geometry.max_offset_x <= 1 || geometry.max_offset_y <= 1);
        let offset = crop_offset(seed, epoch, item, &geometry);
        prop_assert!(offset.x <= geometry.max_offset_x && offset.y <= geometry.max_offset_y);
        prop_assert_eq!(offset, crop_offset(seed, epoch, item, &geometry));
    }
}

/// The first batch picks a list with probability proportional to its items (NovelAI's
/// `bucket_probs = len / sum`): with 384 items in one bucket, 128 in another and 32 in the
/// catch-all, frequencies over many seeds must approach 384:128:32.
#[test]
fn first_batch_frequencies_follow_remaining_items() {
    let table = BucketTable::new(BucketParams::default()).unwrap();
    let assigner = Assigner::new(table.clone(), AssignParams::default()).unwrap();
    // bsz 32: bucket 8 (square) 400 items -> 16 to the catch-all, 384 left; bucket 6 (2:3)
    // 144 items -> 16 to the catch-all, 128 left. Catch-all 32.
    let sizes = (0..544u64).map(|id| {
        if id < 400 {
            (id, 512, 512)
        } else {
            (id, 512, 768)
        }
    });
    let items = BucketedItems::assign_all(&assigner, sizes).unwrap();
    let mut counts = std::collections::HashMap::new();
    let trials = 4000;
    for seed in 0..trials {
        let params = PlanParams {
            seed,
            epoch: 0,
            world_size: 1,
            bsz: 32,
        };
        let plan = EpochPlan::new(items.len(), params).unwrap();
        let mut sampler = plan.sampler(&items, &table, 0).unwrap();
        assert_eq!(sampler.catchall_len(), 32);
        *counts
            .entry(sampler.next_batch().unwrap().bucket)
            .or_insert(0u32) += 1;
    }
    let frequency = |bucket| f64::from(counts.get(&bucket).copied().unwrap_or(0)) / trials as f64;
    let expectations = [
        (BatchBucket::Bucket(8), 384.0 / 544.0),
        (BatchBucket::Bucket(6), 128.0 / 544.0),
        (BatchBucket::CatchAll, 32.0 / 544.0),
    ];
    for (bucket, expected) in expectations {
        let got = frequency(bucket);
        assert!(
            (got - expected).abs() < 0.025,
            "{bucket:?}: {got} vs {expected}"
        );
    }
}
