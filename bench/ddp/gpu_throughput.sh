#!/usr/bin/env bash
# NOT YET RUN: no GPU has been available to this project so far (CI never has one). Issue 7,
# item 8, GPU part: an SD1.5-sized UNet (random weights) trained data-parallel on the local GPUs
# over NCCL with bf16 autocast, at the 512x512 (64x64 latents) and 512x768 (96x64 latents)
# buckets, for a few hundred steps: images/s and model-FLOPs utilisation (2.41 TFLOP of training
# compute per 512x512 image, scaled by pixel count), side by side with diffusers' UNet in PyTorch
# DDP (backend nccl, torch.autocast bf16) on the same GPU(s), batch and step; then the data-wait
# fraction of a real trainer run (see bench/ddp/gpu_throughput.md). Targets: >= 1.0x diffusers'
# images/s (i.e. the printed ratio arbor / pytorch step time <= 1.0x), MFU >= 40%, data wait
# <= 2% of step time.
#
#   bench/ddp/gpu_throughput.sh [--gpus N] [--batch N] [--steps N] [--peak-tflops X]
#
# --gpus defaults to every visible GPU; --batch is per GPU (default 8); --peak-tflops is the dense
# bf16 peak of one GPU (default: looked up from nvidia-smi's name: H100/H200 SXM 989, H100 PCIe
# 756, A100 312, L40S 362). Output goes to stdout and to target/gpu_throughput-<date>.txt.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"
# shellcheck source=../../scripts/env.sh
source scripts/env.sh

gpus=""
batch=8
steps=200
peak_tflops=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --peak-tflops) peak_tflops="$2"; shift 2 ;;
    *) echo "gpu_throughput: unknown argument $1" >&2; exit 2 ;;
  esac
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_throughput: no nvidia-smi, so no GPU here; this benchmark needs one" >&2
  exit 1
fi
if [[ -z "$gpus" ]]; then
  gpus="$(nvidia-smi --list-gpus | wc -l)"
fi
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
if [[ -z "$peak_tflops" ]]; then
  case "$gpu_name" in
    *H200*) peak_tflops=989 ;;
    *H100*PCIe*) peak_tflops=756 ;;
    *H100*) peak_tflops=989 ;;
    *A100*) peak_tflops=312 ;;
    *L40S*) peak_tflops=362 ;;
    *) echo "gpu_throughput: unknown GPU '$gpu_name'; pass --peak-tflops" >&2; exit 1 ;;
  esac
fi
"$ARBOR_PYTHON_BIN" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'"

log="target/gpu_throughput-$(date -u +%Y%m%dT%H%M%SZ).txt"
mkdir -p target
echo "GPU: $gpus x $gpu_name, dense bf16 peak $peak_tflops TFLOP/s each; batch $batch per GPU" | tee "$log"

# ProcessGroupNCCL needs the NCCL feature of arbor-c10d (see worker/c10d/README.md for the CUDA
# and NCCL headers it compiles against).
for bucket in "64 64 512x512" "96 64 512x768"; do
  read -r height width label <<<"$bucket"
  echo "== bucket $label (latents ${height}x${width}) ==" | tee -a "$log"
  cargo bench -p arbor-worker --features arbor-c10d/nccl --bench ddp_step -- \
    --device cuda --bf16 --unet sd15 --world "$gpus" --threads 4 \
    --batch "$batch" --height "$height" --width "$width" \
    --rounds 1 --warmup 20 --steps "$steps" --profile-steps 5 \
    --max-grad-norm 1.0 --peak-tflops "$peak_tflops" 2>&1 | tee -a "$log"
done
echo "written: $log (the data-wait fraction comes from a trainer run: bench/ddp/gpu_throughput.md)"
