#!/usr/bin/env bash
# The planner benchmark (issue 2): plan one epoch and run every rank's sampler, arbor vs a Python
# port of NovelAI's bucketmanager.py, side by side in one run, with peak resident bytes per item.
#
#   bench/plan/plan_bench.sh [SIZES...]          default: 1e6 1e7 1e8
#   ARBOR_BENCH_PYTHON_MAX=1e7                   largest size the Python port runs (it needs
#                                                ~110 bytes and ~15 µs per item)
#   ARBOR_BENCH_WORLD_SIZE=8 ARBOR_BENCH_BSZ=4
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1e6 1e7 1e8)
python_max="${ARBOR_BENCH_PYTHON_MAX:-1e7}"
world_size="${ARBOR_BENCH_WORLD_SIZE:-8}"
bsz="${ARBOR_BENCH_BSZ:-4}"

scripts/setup.sh
cargo build --release --quiet -p arbor-common --example plan_bench
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
arbor_bench="$target_dir/release/examples/plan_bench"

printf '%-8s %12s %12s %10s %14s %14s\n' items arbor_s python_s speedup arbor_B/item python_B/item
for size in "${sizes[@]}"; do
  arbor_json="$("$arbor_bench" "$size" "$world_size" "$bsz")"
  python_json='{}'
  if python3 -c "import sys; sys.exit(0 if float('$size') <= float('$python_max') else 1)"; then
    python_json="$(.venv/bin/python bench/plan/bucketmanager_port.py "$size" "$world_size" "$bsz")"
  fi
  python3 - "$arbor_json" "$python_json" <<'PY'
import json, sys
arbor, python = json.loads(sys.argv[1]), json.loads(sys.argv[2])
items = arbor["items"]
if python:
    assert python["batches"] == arbor["batches"], (python["batches"], arbor["batches"])
    speedup = f'{python["seconds"] / arbor["seconds"]:.1f}x'
    python_seconds, python_bytes = f'{python["seconds"]:.3f}', f'{python["bytes_per_item"]:.1f}'
else:
    speedup, python_seconds, python_bytes = "-", "(skipped)", "-"
print(f'{items:<8.0e} {arbor["seconds"]:>12.3f} {python_seconds:>12} {speedup:>10} {arbor["bytes_per_item"]:>14.2f} {python_bytes:>14}')
PY
done
echo "arbor B/item: peak RSS growth over the process baseline per item (item table + one rank's sampler)."
echo "python B/item: peak RSS of the whole interpreter per item."
