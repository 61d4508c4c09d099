//! Pinned outputs of the documented random streams (`arbor-stream-v1`), the epoch permutation
//! (`arbor-feistel-v1`), the per-rank sampler and the crop offsets. A plan made by one release
//! must be the plan a later release resumes: if any of these values changes, every saved
//! checkpoint's data order changes with it. Change them only together with a new documented
//! algorithm version.

use arbor_common::assign::{AssignParams, Assigner, BucketedItems};
use arbor_common::buckets::{BucketParams, BucketTable};
use arbor_common::crop::{cover_geometry, crop_offset};
use arbor_common::permutation::FeistelPermutation;
use arbor_common::plan::{EpochPlan, PlanParams};
use arbor_common::sampler::BatchBucket;
use arbor_common::stream::{RandomStream, StreamDomain};

#[test]
fn the_random_stream_is_pinned() {
    let mut stream = RandomStream::new(StreamDomain::Permutation, &[42, 0, 0]);
    let values: Vec<u64> = (0..4).map(|_| stream.next_u64()).collect();
    assert_eq!(values, PINNED_STREAM);
}

#[test]
fn the_permutation_is_pinned() {
    let permutation = FeistelPermutation::new(20, 42, 3, 0);
    let image: Vec<u64> = (0..20).map(|index| permutation.apply(index)).collect();
    assert_eq!(image, PINNED_PERMUTATION);
}

#[test]
fn the_crop_offsets_are_pinned() {
    let geometry = cover_geometry(7, 1920, 1080, 512, 512).unwrap();
    let offsets: Vec<(u32, u32)> = (0..4)
        .map(|epoch| {
            let offset = crop_offset(42, epoch, 7, &geometry);
            (offset.x, offset.y)
        })
        .collect();
    assert_eq!(offsets, PINNED_CROPS);
}

#[test]
fn the_sampled_batches_are_pinned() {
    let table = BucketTable::new(BucketParams::default()).unwrap();
    let assigner = Assigner::new(table.clone(), AssignParams::default()).unwrap();
    // 48 items in three buckets (square, landscape, portrait), ids spread out.
    let sizes = [(512, 512), (1920, 1080), (600, 900)];
    let items = BucketedItems::assign_all(
        &assigner,
        (0..48u64).map(|index| {
            let (width, height) = sizes[(index % 3) as usize];
            (index * 101 + 5, width, height)
        }),
    )
    .unwrap();
    let plan = EpochPlan::new(
        items.len(),
        PlanParams {
            seed: 42,
            epoch: 1,
            world_size: 2,
            bsz: 4,
        },
    )
    .unwrap();
    let mut sampler = plan.sampler(&items, &table, 1).unwrap();
    let mut batches = Vec::new();
    while let Some(batch) = sampler.next_batch() {
        let bucket = match batch.bucket {
            BatchBucket::Bucket(id) => i32::from(id),
            BatchBucket::CatchAll => -1,
        };
        let ids: Vec<u64> = batch
            .positions
            .iter()
            .map(|&position| items.id(position))
            .collect();
        batches.push((bucket, ids));
    }
    let expected: Vec<(i32, Vec<u64>)> = PINNED_BATCHES
        .iter()
        .map(|(bucket, ids)| (*bucket, ids.to_vec()))
        .collect();
    assert_eq!(batches, expected);
}

const PINNED_STREAM: [u64; 4] = [
    6897039313421379623,
    6301123348804967639,
    4137934791684958352,
    15493075796441661554,
];
const PINNED_PERMUTATION: [u64; 20] = [
    13, 7, 14, 6, 1, 4, 15, 10, 11, 18, 19, 8, 12, 3, 5, 17, 0, 2, 16, 9,
];
const PINNED_CROPS: [(u32, u32); 4] = [(381, 0), (325, 0), (387, 0), (124, 0)];
/// Rank 1 of 2, bsz 4, seed 42, epoch 1: (bucket id or -1 for the catch-all, item ids).
const PINNED_BATCHES: [(i32, [u64; 4]); 6] = [
    (6, [813, 1419, 3237, 1116]),
    (-1, [3641, 3439, 1318, 4045]),
    (6, [510, 4752, 2328, 2631]),
    (8, [4247, 3035, 2732, 3338]),
    (8, [1823, 2126, 5, 914]),
    (13, [409, 3136, 1924, 106]),
];
