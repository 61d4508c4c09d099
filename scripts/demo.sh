#!/usr/bin/env bash
# The README's demo command. For now (training arrives with the worker) it builds `arbor`,
# generates a small synthetic manifest of varied aspect ratios under demo/, and prints the
# bucket table and the epoch plan a 2-rank job would run.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
demo_dir="${ARBOR_DEMO_DIR:-$repo_root/demo}"
mkdir -p "$demo_dir"

echo "[demo] building arbor" >&2
cargo build --release --quiet -p arbor-coordinator
arbor="$repo_root/target/release/arbor"

echo "[demo] writing a synthetic manifest to $demo_dir/manifest.jsonl" >&2
python3 - "$demo_dir/manifest.jsonl" <<'PY'
import json, random, sys
random.seed(7)
shapes = [(512, 512), (512, 768), (768, 512), (1920, 1080), (1080, 1920), (1024, 256), (3000, 400)]
tags = ["1girl", "solo", "red dress", "smile", "outdoors", "night", "cat", "landscape"]
with open(sys.argv[1], "w") as manifest:
    for item in range(2000):
        width, height = random.choice(shapes)
        scale = random.uniform(0.5, 2.0)
        record = {
            "id": item,
            "key": f"images/{item:05d}.png",
            "width": max(1, int(width * scale)),
            "height": max(1, int(height * scale)),
            "caption": ", ".join(random.sample(tags, 3)),
        }
        manifest.write(json.dumps(record) + "\n")
PY

echo; echo "== arbor plan buckets"
"$arbor" plan buckets
echo; echo "== arbor plan epoch --bsz 4 --world-size 2 --seed 42 --epoch 0"
"$arbor" plan epoch --manifest "$demo_dir/manifest.jsonl" --bsz 4 --world-size 2 --seed 42 --epoch 0
echo; echo "[demo] JSON for scripts: $arbor plan epoch --manifest $demo_dir/manifest.jsonl --bsz 4 --world-size 2 --json --batches" >&2
