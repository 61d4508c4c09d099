#!/usr/bin/env bash
# A 2-rank data-parallel training step on CPU over Gloo: arbor (tch + arbor-c10d, the trainer's
# DistributedStep) vs PyTorch DDP (backend gloo, bench/ddp/ddp_step.py) on the same small
# SD-topology UNet, per-rank batch, clipping and AdamW (torch's fused kernel on both sides:
# fused=True in PyTorch), one intra-op thread per rank. Builds the bench (release profile), runs
# both sides in alternating rounds and prints step ms, images/s, the phase split and the ratio
# arbor / PyTorch (target <= 1.0x).
#
#   bench/ddp/ddp_bench.sh [--rounds N] [--steps N] [--warmup N] [--threads N] [--batch N]
#                          [--size N] [--max-grad-norm X] [--profile-steps N]
#
# Needs the project's virtualenv (scripts/setup.sh). CARGO_TARGET_DIR is honoured;
# ARBOR_BENCH_PROFILE=dev builds unoptimised Rust glue (libtorch does the compute either way),
# which saves a long release build of the dependencies on a small machine.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"
# shellcheck source=../../scripts/env.sh
source scripts/env.sh
if [[ ! -x "$ARBOR_PYTHON_BIN" ]]; then
  echo "ddp_bench: no python at $ARBOR_PYTHON_BIN; run scripts/setup.sh first" >&2
  exit 1
fi
profile_flags=()
if [[ -n "${ARBOR_BENCH_PROFILE:-}" ]]; then
  profile_flags=(--profile "$ARBOR_BENCH_PROFILE")
fi
exec cargo bench "${profile_flags[@]}" -p arbor-worker --bench ddp_step -- "$@"
