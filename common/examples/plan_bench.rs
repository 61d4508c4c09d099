//! The planner's bench command: plan one epoch of N synthetic items and run every rank's
//! sampler to the end, then print one JSON line with the time and the peak resident memory.
//!
//! `bench/plan/plan_bench.sh` runs it beside the Python port of NovelAI's bucket manager and
//! prints the ratios. Usage: `plan_bench ITEMS [WORLD_SIZE] [BSZ]`.
//!
//! Items are synthetic: each gets the exact size of a uniformly drawn bucket (the Python port
//! draws bucket ids from the same distribution). Building them is not timed, since assignment
//! happens once per dataset, not per epoch; their memory counts in the peak.

use std::time::Instant;

use arbor_common::assign::{AssignParams, Assigner, BucketedItems};
use arbor_common::buckets::{BucketParams, BucketTable};
use arbor_common::plan::{EpochPlan, PlanParams};
use arbor_common::stream::splitmix64;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn parse_count(text: &str) -> u64 {
    text.parse::<f64>()
        .expect("ITEMS must be a number such as 1e7") as u64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let items_count = args.first().map(|a| parse_count(a)).unwrap_or(1_000_000);
    let world_size: u32 = args.get(1).map(|a| a.parse().unwrap()).unwrap_or(8);
    let bsz: u32 = args.get(2).map(|a| a.parse().unwrap()).unwrap_or(4);
    let baseline_rss_kib = status_kib("VmRSS:");

    let table = BucketTable::new(BucketParams::default()).unwrap();
    let assigner = Assigner::new(table.clone(), AssignParams::default()).unwrap();
    let buckets = table.buckets().to_vec();
    let sizes = (0..items_count).map(|id| {
        let bucket = buckets[(splitmix64(id) % buckets.len() as u64) as usize];
        (id, bucket.width, bucket.height)
    });
    let items = BucketedItems::assign_all(&assigner, sizes).unwrap();

    let started = Instant::now();
    let params = PlanParams {
        seed: 42,
        epoch: 3,
        world_size,
        bsz,
    };
    let plan = EpochPlan::new(items.len(), params).unwrap();
    let mut checksum = 0u64;
    let mut batches = 0u64;
    for rank in 0..world_size {
        let mut sampler = plan.sampler(&items, &table, rank).unwrap();
        while let Some(batch) = sampler.next_batch() {
            checksum = checksum.wrapping_add(items.id(batch.positions[0]));
            batches += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_bytes = status_kib("VmHWM:") * 1024;
    let added_bytes = peak_rss_bytes.saturating_sub(baseline_rss_kib * 1024);
    println!(
        "{{\"impl\":\"arbor\",\"items\":{items_count},\"world_size\":{world_size},\"bsz\":{bsz},\"batches\":{batches},\"seconds\":{seconds:.4},\"peak_rss_bytes\":{peak_rss_bytes},\"bytes_per_item\":{:.2},\"checksum\":{checksum}}}",
        added_bytes as f64 / items_count.max(1) as f64
    );
}
