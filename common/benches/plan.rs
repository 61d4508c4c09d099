//! Criterion benchmark of planning an epoch and running every rank's sampler.
//! The side-by-side comparison with the Python port is `bench/plan/plan_bench.sh`.

use arbor_common::assign::{AssignParams, Assigner, BucketedItems};
use arbor_common::buckets::{BucketParams, BucketTable};
use arbor_common::plan::{EpochPlan, PlanParams};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn synthetic_items(count: u64) -> (BucketedItems, BucketTable) {
    let table = BucketTable::new(BucketParams::default()).unwrap();
    let assigner = Assigner::new(table.clone(), AssignParams::default()).unwrap();
    let sizes = (0..count).map(|id| {
        let mix = arbor_common::stream::splitmix64(id);
        (
            id,
            256 + (mix % 1793) as u32,
            256 + ((mix >> 32) % 1793) as u32,
        )
    });
    (BucketedItems::assign_all(&assigner, sizes).unwrap(), table)
}

fn plan_and_sample(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("plan_epoch_and_sample");
    group.sample_size(10);
    for count in [100_000u64, 1_000_000] {
        let (items, table) = synthetic_items(count);
        group.throughput(Throughput::Elements(count));
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |bench, _| {
            bench.iter(|| {
                let params = PlanParams {
                    seed: 42,
                    epoch: 1,
                    world_size: 8,
                    bsz: 4,
                };
                let plan = EpochPlan::new(items.len(), params).unwrap();
                let mut checksum = 0u64;
                for rank in 0..params.world_size {
                    let mut sampler = plan.sampler(&items, &table, rank).unwrap();
                    while let Some(batch) = sampler.next_batch() {
                        checksum = checksum.wrapping_add(u64::from(batch.positions[0]));
                    }
                }
                checksum
            })
        });
    }
    group.finish();
}

criterion_group!(benches, plan_and_sample);
criterion_main!(benches);
