"""A faithful Python port of the reference approach to epoch planning, for the planner benchmark.

It follows the structure of NovelAI's public bucketmanager.py (novelai-aspect-ratio-bucketing),
rewritten here: a numpy permutation of the item ids, the tail trimmed to a multiple of
world_size * bsz, the rank's slice taken with a stride, then per-bucket Python lists built item by
item (membership checked against a set of the rank's ids), each list shuffled, overhangs moved to
a left-over list, and batches drawn with numpy's weighted choice over the remaining lists.

Usage: python bucketmanager_port.py ITEMS [WORLD_SIZE] [BSZ]   (prints one JSON line)
"""

import json
import resource
import sys
import time

import numpy as np

BUCKET_COUNT = 19  # the default table of docs/architecture.md section 2
BASE_BUCKET = 8


def plan_rank(ids_by_bucket, all_ids, bsz, world_size, rank, prng):
    """One rank's epoch: returns the number of batches drawn and a checksum."""
    index = prng.permutation(all_ids)
    index = index[: len(index) - len(index) % (bsz * world_size)]
    index = set(index[rank::world_size].tolist())

    epoch = {}
    left_over = []
    for bucket_id in range(BUCKET_COUNT):
        members = [post_id for post_id in ids_by_bucket[bucket_id] if post_id in index]
        if not members:
            continue
        members = np.array(members, dtype=np.int64)
        prng.shuffle(members)
        members = list(members)
        overhang = len(members) % bsz
        if overhang:
            left_over.extend(members[:overhang])
            members = members[overhang:]
        if members:
            epoch[bucket_id] = members

    batches = 0
    checksum = 0
    while epoch or len(left_over) >= bsz:
        bucket_ids = list(epoch.keys())
        lengths = [len(epoch[bucket_id]) for bucket_id in bucket_ids]
        if len(left_over) >= bsz:
            bucket_ids = [-1] + bucket_ids
            lengths = [len(left_over)] + lengths
        probabilities = np.array(lengths, dtype=np.float64)
        probabilities /= probabilities.sum()
        chosen = bucket_ids[prng.choice(len(bucket_ids), p=probabilities)]
        if chosen == -1:
            prng.shuffle(left_over)
            batch = left_over[:bsz]
            left_over = left_over[bsz:]
        else:
            batch = epoch[chosen][:bsz]
            epoch[chosen] = epoch[chosen][bsz:]
            if not epoch[chosen]:
                del epoch[chosen]
        checksum += int(batch[0])
        batches += 1
    return batches, checksum


def main():
    items = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000
    world_size = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    bsz = int(sys.argv[3]) if len(sys.argv) > 3 else 4

    generator = np.random.default_rng(0)
    bucket_of_item = generator.integers(0, BUCKET_COUNT, size=items)
    all_ids = np.arange(items, dtype=np.int64)
    ids_by_bucket = [all_ids[bucket_of_item == bucket].tolist() for bucket in range(BUCKET_COUNT)]

    started = time.perf_counter()
    total_batches = 0
    checksum = 0
    for rank in range(world_size):
        prng = np.random.RandomState(42 + 3)  # the reference seeds one generator per epoch
        batches, rank_checksum = plan_rank(ids_by_bucket, all_ids, bsz, world_size, rank, prng)
        total_batches += batches
        checksum += rank_checksum
    seconds = time.perf_counter() - started
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "python-port",
        "items": items,
        "world_size": world_size,
        "bsz": bsz,
        "batches": total_batches,
        "seconds": round(seconds, 4),
        "peak_rss_bytes": peak_rss_bytes,
        "bytes_per_item": round(peak_rss_bytes / max(items, 1), 2),
    }))


if __name__ == "__main__":
    main()
