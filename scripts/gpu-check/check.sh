#!/usr/bin/env bash
# The GPU check (issue 13, item 6): one run on a borrowed GPU node, from the folder that
# scripts/gpu-bundle.sh made (this script is OUT/check.sh there). Under 8 minutes; prints one
# summary table, also written to RESULTS/summary.txt (default OUT/results/), with every phase's
# log and figures beside it.
#
#   OUT/check.sh [--smoke] [--results DIR] [--work DIR] [--batch N] [--budget SECONDS] [--keep]
#
# Phases (each with a timeout; a failed phase is a FAILED row, the others still run):
#   1  machine    nvidia-smi, torch's version and devices, the binaries start
#   2a parity     `arbor-worker probe --device cuda` on the parity fixture (a tiny SD1 model made on
#                 CPU by worker/tests/fixtures/make_fixtures.py) against its CPU goldens: UNet
#                 forward and gradients, CLIP, VAE, DDPM; PyTorch on the same GPU for scale
#   2b bf16 step  `arbor launch --workers 1` on a tiny model, bf16 autocast: finite losses
#   3  arbor      `arbor launch --workers 1 --worker-arg=--device=cuda` (coordinator + one NCCL
#                 worker, world size 1): an SD1.5-sized model (SD1.5's configs, random weights,
#                 made here with diffusers) on a generated JPEG dataset in 4 buckets near 512x512,
#                 bf16, batch --batch (32; halved once on an out-of-memory failure), 20 warm-up and
#                 60 timed steps: images/s, step-time split, peak memory, MFU
#   4  diffusers  the same UNet, batch, bucket sequence and precision as train_text_to_image.py
#                 trains it (frozen bf16 VAE and text encoder, autocast UNet, fused AdamW): images/s
#                 and the ratio arbor / diffusers
#   5  2 ranks    with 2+ GPUs visible: `arbor launch --workers 2` over NCCL (skipped with one GPU)
# Exit status 1 when a correctness phase (1, 2a, 2b, 3, 5) failed.
#
# --smoke runs the same phases on this machine's CPU with tiny sizes (tiny model, Gloo, fp32, no
# nvidia-smi): ARBOR_CHECK_PYTHON names the Python (with torch, transformers, Pillow) and
# ARBOR_CHECK_TORCH_LIB the libtorch 2.11 lib/ folder the binaries load (scripts/gpu-bundle.sh's
# test sets both). On the node, Python is /opt/torch/.venv/bin/python3 (else python3 on PATH) and
# the binaries load that Python's torch/lib.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
smoke=0
results="$here/results"
work="${ARBOR_CHECK_WORK:-}"
batch=""
budget="${ARBOR_CHECK_BUDGET_S:-445}" # seconds; leaves room under 8 minutes for kill grace and the table
keep=0
while (($#)); do
  case "$1" in
    --smoke) smoke=1 ;;
    --results) results="$2"; shift ;;
    --work) work="$2"; shift ;;
    --batch) batch="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
started=$SECONDS
# The work folder (models, dataset, run directories: about 25 GB for SD1.5 at its peak) goes where
# there is most room: beside the bundle's folder, or in TMPDIR (/tmp).
if [ -z "$work" ]; then
  best_free=-1
  for candidate in "$(dirname "$here")" "${TMPDIR:-/tmp}"; do
    free_kib="$(df -Pk "$candidate" 2>/dev/null | awk 'NR == 2 {print $4}')"
    if [ -n "$free_kib" ] && ((free_kib > best_free)); then
      best_free=$free_kib
      work="$candidate/arbor-gpu-check-work"
    fi
  done
  [ -n "$work" ] || work="${TMPDIR:-/tmp}/arbor-gpu-check-work"
fi
mkdir -p "$results/logs" "$work"
results="$(cd "$results" && pwd)"
work="$(cd "$work" && pwd)"
phases_tsv="$results/phases.tsv"
: >"$phases_tsv"

say() { printf '[check %3ds] %s\n' "$((SECONDS - started))" "$*" >&2; }

# --- sizes of each mode ---------------------------------------------------------------------------
if ((smoke)); then
  device=cpu precision=fp32 gpu_peak_tflops=1
  main_preset=tiny main_shapes="128x128,160x96,96x160,192x64" main_scale="1.0:1.3"
  main_buckets=(--max-area 16384 --min-dim 64 --max-dim 256 --step 32 --base-res 128x128)
  main_batch="${batch:-4}" warmup=10 timed_steps=20 min_timed=20
  worker_threads=(--worker-arg=--threads=1)
else
  device=cuda precision=bf16 gpu_peak_tflops=989
  main_preset=sd15 main_shapes="512x512,576x448,448x576,640x384" main_scale="1.0:1.4"
  main_buckets=(--max-area 262144 --min-dim 256 --max-dim 1024 --step 64 --base-res 512x512)
  main_batch="${batch:-32}" warmup=20 timed_steps=60 min_timed=50
  worker_threads=()
fi
tiny_shapes="128x128,160x96,96x160"
tiny_buckets=(--max-area 16384 --min-dim 64 --max-dim 256 --step 32 --base-res 128x128)
phase_every=10 # train.time_phases_every (the trainer's default)

# --- environment ----------------------------------------------------------------------------------
python="${ARBOR_CHECK_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then python=/opt/torch/.venv/bin/python3; else python="$(command -v python3 || true)"; fi
fi
torch_lib="${ARBOR_CHECK_TORCH_LIB:-}"
if [ -z "$torch_lib" ] && [ -n "$python" ]; then
  torch_lib="$("$python" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>>"$results/logs/setup.log")"
fi
export LD_LIBRARY_PATH="$here/lib:$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# On a small CPU machine one intra-op thread per process keeps the smoke run's phases from
# oversubscribing the cores (the workers get --threads=1 as well).
((smoke)) && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export ARBOR_LOG="${ARBOR_LOG:-info}" RUST_LOG="${RUST_LOG:-info}"
bin="$work/bin"
tools="$here/tools"
mkdir -p "$bin"
# The binaries travel xz-compressed (the bundle's size limit); unpacked once per work folder, with
# xz or else Python's lzma.
for name in arbor arbor-worker; do
  if [ -f "$here/bin/$name.xz" ]; then
    if [ ! -x "$bin/$name" ] || [ "$here/bin/$name.xz" -nt "$bin/$name" ]; then
      xz -dc "$here/bin/$name.xz" >"$bin/$name.tmp" 2>>"$results/logs/setup.log" ||
        "$python" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
          "$here/bin/$name.xz" "$bin/$name.tmp"
      chmod +x "$bin/$name.tmp" && mv "$bin/$name.tmp" "$bin/$name"
    fi
  elif [ -f "$here/bin/$name" ]; then
    ln -sf "$here/bin/$name" "$bin/$name"
  fi
done
arbor="$bin/arbor"
worker="$bin/arbor-worker"
pypath="$("$python" "$tools/pyenv.py" --wheels "$here/wheels" --into "$work/py" 2>>"$results/logs/setup.log")"
export PYTHONPATH="$pypath:$tools${PYTHONPATH:+:$PYTHONPATH}"
export ARBOR_TOKEN="check-$$-$RANDOM$RANDOM"

# --- phase bookkeeping ----------------------------------------------------------------------------
# record ID TITLE STATUS SECONDS CORRECTNESS(1/0) SUMMARY
record() {
  local summary="${6//$'\t'/ }"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${summary//$'\n'/ }" >>"$phases_tsv"
  say "phase $1 ($2): $3 in ${4}s: $6"
}

# step LOG MAX_SECONDS RESERVE_SECONDS [--stdout FILE] COMMAND...: runs COMMAND under a timeout of
# MAX_SECONDS, cut to what the budget leaves after RESERVE_SECONDS for the phases after it;
# stdout+stderr to LOG (stdout to FILE with --stdout). The timeout signals the command's whole
# process group (SIGINT first: `arbor launch` stops its coordinator and workers on it), then
# SIGKILL 20 s later. Sets step_rc.
step() {
  local log="$1" max="$2" reserve="$3" stdout="$1"
  shift 3
  if [ "${1:-}" = --stdout ]; then
    stdout="$2"
    shift 2
  fi
  local left=$((budget - (SECONDS - started) - reserve))
  local limit=$((max < left ? max : left))
  if ((limit < 5)); then
    echo "[check] not run: the time budget is spent ($left s left before the reserve)" >>"$log"
    step_rc=124
    return
  fi
  echo "[check] \$ $* (timeout ${limit}s)" >>"$log"
  local timer=(timeout -s INT --kill-after=20 "$limit")
  command -v timeout >/dev/null 2>&1 || timer=() # no coreutils timeout: the phase runs unbounded
  if [ "$stdout" = "$log" ]; then
    "${timer[@]}" "$@" >>"$log" 2>&1
  else
    "${timer[@]}" "$@" >"$stdout" 2>>"$log"
  fi
  step_rc=$?
  if ((step_rc == 124 || step_rc == 137)); then
    echo "[check] timed out after ${limit}s" >>"$log"
  fi
}

# free_port: a free TCP port on 127.0.0.1
free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# write_job FILE RUN_DIR MANIFEST DATA_ROOT MODEL BSZ MAX_STEPS WORKERS PORT BUCKET_FLAGS...
write_job() {
  local file="$1" run_dir="$2" manifest="$3" root="$4" model="$5" bsz="$6" max_steps="$7" workers="$8" port="$9"
  shift 9
  local max_area min_dim max_dim step_px base_res
  while (($#)); do
    case "$1" in
      --max-area) max_area="$2" ;;
      --min-dim) min_dim="$2" ;;
      --max-dim) max_dim="$2" ;;
      --step) step_px="$2" ;;
      --base-res) base_res="${2/x/, }" ;;
    esac
    shift 2
  done
  cat >"$file" <<EOF
# written by check.sh
[job]
name = "gpu-check"
run_dir = "$run_dir"
seed = 42

[data]
manifest = "$manifest"
root = "$root"
tag_shuffle = true
keep_tokens = 1
tag_dropout = 0.0
prefetch_batches = 4

[buckets]
max_area = $max_area
min_dim = $min_dim
max_dim = $max_dim
step = $step_px
base_res = [$base_res]
max_ar_error = 4.0
aspect_metric = "linear"

[schedule]
bsz = $bsz
grad_accum = 1
epochs = 1
max_steps = $max_steps
checkpoint_every = 1000000

[cluster]
listen = "127.0.0.1:$port"
metrics_listen = "127.0.0.1:$(free_port)"
min_workers = $workers
max_workers = $workers
join_timeout_s = 300
heartbeat_interval_s = 2
heartbeat_timeout_s = 120

[model]
path = "$model"
mode = "finetune"
clip_skip = 2
max_chunks = 3
prediction_type = "epsilon"
train_text_encoder = false

[train]
lr = "1e-5"
optimizer = "adamw"
mixed_precision = "$precision"
max_grad_norm = 1.0
lr_scheduler = "constant"
lr_warmup_steps = 0
weight_decay = 0.01
ema_decay = 0.0

[samples]
every = 0
EOF
}

# prepare_data LOG MAX_SECONDS RESERVE DIR COUNT SHAPES SCALE: draws the dataset and indexes it;
# sets step_rc
prepare_data() {
  local log="$1" max="$2" reserve="$3" dir="$4" count="$5" shapes="$6" scale="$7"
  step "$log" "$max" "$reserve" "$python" "$tools/make_dataset.py" "$dir" --count "$count" --shapes "$shapes" --scale "$scale"
  ((step_rc == 0)) || return 0
  step "$log" 60 "$reserve" "$arbor" index "$dir/images" --out "$dir/manifest.jsonl" --report "$dir/index-report.json"
}

# train_run NAME LOG MODEL DATA_DIR BSZ MAX_STEPS WORKERS MAX_SECONDS RESERVE BUCKET_FLAGS...:
# `arbor launch` of one job; sets step_rc and run_dir. A watchdog stops the launch when a worker
# reports a failed training step (worker/runtime: "training failed; reporting and waiting for a
# regroup": the regrouped job would only repeat it, e.g. out of memory, until the phase's
# timeout), or when every worker has exited but the launch still runs 45 s later (a crashed
# worker would otherwise leave the coordinator waiting for it to come back).
train_run() {
  local name="$1" log="$2" model="$3" data="$4" bsz="$5" max_steps="$6" workers="$7" max_s="$8" reserve="$9"
  shift 9
  local job="$work/jobs/$name.toml" port seen=0 gone_since="" launch_pid
  run_dir="$work/runs/$name"
  rm -rf "$run_dir" "$work/jobs/$name.rc"
  mkdir -p "$work/jobs"
  port="$(free_port)"
  write_job "$job" "$run_dir" "$data/manifest.jsonl" "$data/images" "$model" "$bsz" "$max_steps" \
    "$workers" "$port" "$@"
  cp "$job" "$results/$name.job.toml"
  (
    step "$log" "$max_s" "$reserve" "$arbor" launch --config "$job" --workers "$workers" \
      --worker-arg=--device="$device" --worker-arg=--store-port="$(free_port)" "${worker_threads[@]}"
    echo "$step_rc" >"$work/jobs/$name.rc"
  ) &
  local runner=$! stopped=0 why=""
  while kill -0 "$runner" 2>/dev/null; do
    sleep 2
    ((stopped)) && continue # once; the step's own timeout remains the backstop
    why=""
    if ps -eo args= 2>/dev/null | grep "[a]rbor-worker train --coordinator 127.0.0.1:$port " >/dev/null; then
      seen=1
      gone_since=""
    elif ((seen)); then
      [ -n "$gone_since" ] || gone_since=$SECONDS
      ((SECONDS - gone_since > 45)) && why="every worker exited 45 s ago"
    fi
    grep -q "training failed; reporting" "$log" 2>/dev/null && why="a worker reported a failed training step"
    if [ -n "$why" ]; then
      launch_pid="$(ps -eo pid=,args= 2>/dev/null | grep "[a]rbor launch --config $job " | awk '{print $1}' | head -n 1)"
      echo "[check] $why, arbor launch (pid ${launch_pid:-?}) still runs: stopping it" >>"$log"
      [ -n "$launch_pid" ] && kill -INT "$launch_pid" 2>/dev/null
      stopped=1
    fi
  done
  wait "$runner"
  step_rc="$(cat "$work/jobs/$name.rc" 2>/dev/null || echo 1)"
  if [ -f "$run_dir/metrics.jsonl" ]; then cp "$run_dir/metrics.jsonl" "$results/$name.metrics.jsonl"; fi
}

summary_of() { "$python" "$tools/report.py" summary "$1" "$2" 2>/dev/null || echo "no result"; }

# last_error LOG: the log's last line that reads like an error (for the table; the log has all)
last_error() {
  grep -E 'ERROR|[Ee]rror:|[Ee]xception|panicked|out of memory|Traceback|Killed|timed out|stopping it|worker\(s\) failed' "$1" 2>/dev/null |
    grep -v 'aspect_error' | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
}

# --- 1. the machine -------------------------------------------------------------------------------
say "mode: $([ $smoke = 1 ] && echo "smoke (CPU)" || echo GPU); python $python; torch lib $torch_lib; work $work"
phase_started=$SECONDS
log="$results/logs/1-machine.log"
ok=1
if ((!smoke)); then
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >>"$log" 2>&1
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv >>"$log" 2>&1
    sed -n '1,40p' "$log" >&2
  else
    echo "no nvidia-smi" >>"$log"
  fi
fi
"$python" - "$device" >"$results/machine.json" 2>>"$log" <<'PY'
import json, subprocess, sys
import torch
facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
facts["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
if facts["gpus"]:
    facts["gpu_name"] = torch.cuda.get_device_name(0)
    facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.split("\n")[0].strip()
    except OSError:
        pass
else:
    facts["gpu_name"] = "none (CPU)"
print(json.dumps(facts))
PY
[ -s "$results/machine.json" ] || ok=0
gpus="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("gpus",0))' "$results/machine.json" 2>/dev/null || echo 0)"
if ((!smoke)) && ((gpus < 1)); then ok=0; echo "torch sees no CUDA device" >>"$log"; fi
for binary in "$arbor" "$worker"; do
  { echo "\$ ldd $binary"; ldd "$binary"; } >>"$log" 2>&1
  if ldd "$binary" 2>/dev/null | grep "not found" >/dev/null; then ok=0; echo "unresolved libraries in $binary" >>"$log"; fi
  "$binary" --version >>"$log" 2>&1 || { ok=0; echo "$binary does not start" >>"$log"; }
done
work_free_gib="$(df -Pk "$work" 2>/dev/null | awk 'NR == 2 {printf "%d", $4 / 1048576}')"
summary="$(summary_of machine "$results/machine.json"); $(sed -n 's/^\[pyenv\] import check:* /python: /p' "$results/logs/setup.log" | tail -n 1); work folder ${work_free_gib:-?} GiB free"
if ((!smoke)) && [ -n "$work_free_gib" ] && ((work_free_gib < 30)); then summary="$summary (the SD1.5 run needs about 25)"; fi
if ((ok)); then status=ok; else status=FAILED; summary="$summary; see logs/1-machine.log"; fi
record 1 "machine" "$status" "$((SECONDS - phase_started))" 1 "$summary"

# The SD1.5-sized model and its dataset are made in the background while phases 2a and 2b run.
main_steps=$((warmup + timed_steps))
main_count=$(((main_steps + 4) * main_batch))
say "background: the $main_preset model and $main_count images"
(step "$results/logs/3-model.log" 240 120 "$python" "$tools/make_model.py" "$work/model-$main_preset" \
  --tokenizer "$here/tokenizer" --preset "$main_preset" --device "$device"
echo "$step_rc" >"$work/model.rc") &
model_pid=$!
(prepare_data "$results/logs/3-data.log" 240 120 "$work/data-main" "$main_count" "$main_shapes" "$main_scale"
echo "$step_rc" >"$work/data.rc") &
data_pid=$!

# --- 2a. parity on the device ---------------------------------------------------------------------
phase_started=$SECONDS
log="$results/logs/2a-parity.log"
step "$log" 120 300 "$worker" probe --device "$device" --model "$here/fixtures/model" \
  --inputs "$here/fixtures/inputs.safetensors" --out "$work/probe.safetensors"
probe_rc=$step_rc
if ((probe_rc == 0)); then
  step "$log" 120 300 --stdout "$results/parity.json" "$python" "$tools/parity.py" --fixtures "$here/fixtures" \
    --probe-out "$work/probe.safetensors" --device "$device" --reference
  cat "$results/parity.json" >>"$log" 2>/dev/null
fi
summary="$(summary_of parity "$results/parity.json")"
if ((probe_rc != 0)); then
  status=FAILED; summary="probe failed (exit $probe_rc): $(last_error "$log")"
elif ((step_rc != 0)); then status=FAILED; else status=ok; fi
record 2a "parity fp32 ($device)" "$status" "$((SECONDS - phase_started))" 1 "$summary"

# --- 2b. one bf16 training run on a tiny model ----------------------------------------------------
phase_started=$SECONDS
log="$results/logs/2b-tiny.log"
step "$log" 90 280 "$python" "$tools/make_model.py" "$work/model-tiny" --tokenizer "$here/tokenizer" --preset tiny --device "$device"
tiny_ok=$((step_rc == 0))
if ((tiny_ok)); then
  prepare_data "$log" 60 280 "$work/data-tiny" 64 "$tiny_shapes" "1.0:1.3"
  tiny_ok=$((step_rc == 0))
fi
status=FAILED
summary="tiny model or dataset failed: see logs/2b-tiny.log"
if ((tiny_ok)); then
  train_run tiny "$log" "$work/model-tiny" "$work/data-tiny" 4 6 1 120 260 "${tiny_buckets[@]}"
  launch_rc=$step_rc
  "$python" "$tools/report.py" run --metrics "$run_dir/metrics.jsonl" --warmup 0 --bsz 4 --min-timed-steps 0 \
    >"$results/tiny.json" 2>>"$log"
  report_rc=$?
  summary="$(summary_of tiny "$results/tiny.json") [$precision]"
  if ((launch_rc == 0 && report_rc == 0)); then status=ok; else summary="launch exit $launch_rc; $summary"; fi
fi
record 2b "$precision step (tiny model)" "$status" "$((SECONDS - phase_started))" 1 "$summary"

# --- 3. arbor: an SD1.5-sized model ---------------------------------------------------------------
phase_started=$SECONDS
log="$results/logs/3-arbor.log"
wait "$model_pid" "$data_pid"
model_rc="$(cat "$work/model.rc" 2>/dev/null || echo 1)"
data_rc="$(cat "$work/data.rc" 2>/dev/null || echo 1)"
status=FAILED
ran_batch=$main_batch
if [ "$model_rc" != 0 ] || [ "$data_rc" != 0 ]; then
  summary="model (exit $model_rc) or dataset (exit $data_rc) failed: logs/3-model.log, logs/3-data.log"
else
  smi_pid=""
  if ((!smoke)) && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 >"$results/nvidia-smi-memory.csv" 2>/dev/null &
    smi_pid=$!
  fi
  train_run main "$log" "$work/model-$main_preset" "$work/data-main" "$main_batch" "$main_steps" 1 240 100 \
    "${main_buckets[@]}"
  launch_rc=$step_rc
  # one retry at half the batch when the first run ran out of device memory
  if ((launch_rc != 0)) && grep -qiE "out of memory|CUDA_ERROR_OUT_OF_MEMORY" "$log"; then
    ran_batch=$((main_batch / 2))
    say "arbor ran out of memory at batch $main_batch; again at $ran_batch"
    mv "$log" "$results/logs/3-arbor-oom-batch$main_batch.log"
    train_run main "$log" "$work/model-$main_preset" "$work/data-main" "$ran_batch" "$main_steps" 1 200 100 \
      "${main_buckets[@]}"
    launch_rc=$step_rc
  fi
  [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null
  # the UNet's training FLOPs per image for every bucket trained (meta tensors: nothing computed)
  latent_shapes="$("$python" - "$run_dir/metrics.jsonl" <<'PY' 2>/dev/null
import json, sys
shapes = {"64x64"}
try:
    for line in open(sys.argv[1]):
        if line.strip():
            width, height = (int(v) for v in json.loads(line).get("bucket", "512x512").split("x"))
            shapes.add(f"{height // 8}x{width // 8}")
except OSError:
    pass
print(",".join(sorted(shapes)))
PY
)"
  step "$results/logs/3-flops.log" 60 90 --stdout "$results/flops.json" "$python" "$tools/diffusers_baseline.py" \
    flops --model "$work/model-$main_preset" --shapes "${latent_shapes:-64x64}"
  smi_args=()
  [ -s "$results/nvidia-smi-memory.csv" ] && smi_args=(--smi "$results/nvidia-smi-memory.csv")
  "$python" "$tools/report.py" run --metrics "$run_dir/metrics.jsonl" --warmup "$warmup" --bsz "$ran_batch" \
    --every "$phase_every" --flops "$results/flops.json" --peak-tflops "$gpu_peak_tflops" --gpus 1 \
    --min-timed-steps "$min_timed" "${smi_args[@]}" >"$results/run.json" 2>>"$log"
  report_rc=$?
  summary="batch $ran_batch, $precision; $(summary_of run "$results/run.json")"
  if ((launch_rc == 0 && report_rc == 0)); then
    status=ok
  else
    summary="launch exit $launch_rc, report exit $report_rc: $(last_error "$log"); $summary"
  fi
  # the run's checkpoint and exports are not needed any more (tens of GB for SD1.5)
  ((keep)) || rm -rf "$run_dir/checkpoints" "$run_dir/exports"
fi
record 3 "arbor launch, $main_preset" "$status" "$((SECONDS - phase_started))" 1 "$summary"
main_ok=$([ "$status" = ok ] && echo 1 || echo 0)

# --- 4. diffusers on the same GPU -----------------------------------------------------------------
phase_started=$SECONDS
log="$results/logs/4-diffusers.log"
status=FAILED
summary="not run: the arbor run left no metrics"
if [ -s "$results/main.metrics.jsonl" ]; then
  buckets="$("$python" "$tools/report.py" buckets --metrics "$results/main.metrics.jsonl" --warmup "$warmup" --every "$phase_every")"
  step "$log" 180 15 --stdout "$results/diffusers.json" "$python" "$tools/diffusers_baseline.py" train \
    --model "$work/model-$main_preset" --batch "$ran_batch" --buckets "$buckets" --warmup "$warmup" \
    --steps "$timed_steps" --device "$device" --precision "$precision" --lr 1e-5
  diffusers_rc=$step_rc
  summary="$(summary_of diffusers "$results/diffusers.json")"
  if ((diffusers_rc == 0)); then
    status=ok
    if [ -s "$results/run.json" ]; then
      "$python" "$tools/report.py" compare --arbor "$results/run.json" --diffusers "$results/diffusers.json" \
        >"$results/compare.json" 2>>"$log"
      summary="$(summary_of compare "$results/compare.json"); diffusers: $summary"
    fi
  else
    summary="exit $diffusers_rc: $(last_error "$log")"
  fi
fi
record 4 "diffusers, same UNet/batch" "$status" "$((SECONDS - phase_started))" 0 "$summary"

# --- 5. two ranks ---------------------------------------------------------------------------------
phase_started=$SECONDS
log="$results/logs/5-two-ranks.log"
backend=$([ $smoke = 1 ] && echo Gloo || echo NCCL)
if ((!smoke)) && ((gpus < 2)); then
  record 5 "2 ranks ($backend)" SKIPPED 0 0 "$gpus GPU visible: NCCL refuses two ranks on one device (2-rank averaging is proven on Gloo by the CPU tests)"
elif [ ! -s "$work/data-tiny/manifest.jsonl" ]; then
  record 5 "2 ranks ($backend)" FAILED 0 1 "no tiny model/dataset (phase 2b)"
else
  train_run two "$log" "$work/model-tiny" "$work/data-tiny" 2 6 2 120 5 "${tiny_buckets[@]}"
  launch_rc=$step_rc
  "$python" "$tools/report.py" run --metrics "$run_dir/metrics.jsonl" --warmup 0 --bsz 2 --min-timed-steps 0 \
    >"$results/two.json" 2>>"$log"
  report_rc=$?
  world="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("world_size"))' "$results/two.json" 2>/dev/null)"
  summary="$(summary_of multi "$results/two.json")"
  if ((launch_rc == 0 && report_rc == 0)) && [ "$world" = 2 ]; then status=ok; else status=FAILED; summary="launch exit $launch_rc; $summary"; fi
  record 5 "2 ranks ($backend)" "$status" "$((SECONDS - phase_started))" 1 "$summary"
fi

# --- the table ------------------------------------------------------------------------------------
{
  echo
  echo "arbor GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $([ $smoke = 1 ] && echo "SMOKE (CPU, tiny sizes)" || echo GPU), $(cat "$here/BUILD-INFO.txt" 2>/dev/null | head -n 1)"
  echo
  echo "| phase | check | status | s | result |"
  echo "|---|---|---|---:|---|"
  while IFS=$'\t' read -r id title status seconds _ summary; do
    echo "| $id | $title | $status | $seconds | $summary |"
  done <"$phases_tsv"
  echo
  "$python" - "$results" "$smoke" <<'PY' 2>/dev/null || echo "targets: n/a"
import json, os, sys
results, smoke = sys.argv[1], sys.argv[2] == "1"
def load(name):
    try:
        with open(os.path.join(results, name)) as handle:
            return json.loads(handle.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
run, compare = load("run.json"), load("compare.json")
parts = []
ratio = compare.get("ratio")
parts.append(f"images/s >= 1.0x diffusers: {'MET' if ratio and ratio >= 1.0 else 'NOT MET' if ratio else 'n/a'}"
             + (f" ({ratio:.3f}x)" if ratio else ""))
mfu = run.get("mfu")
parts.append(f"MFU >= 40%: {'MET' if mfu and mfu >= 0.40 else 'NOT MET' if mfu is not None else 'n/a'}"
             + (f" ({mfu * 100:.1f}%{' of a nominal 1 TFLOP/s CPU' if smoke else ''})" if mfu is not None else ""))
wait = run.get("data_wait_share")
parts.append(f"data wait <= 2%: {'MET' if wait is not None and wait <= 0.02 else 'NOT MET' if wait is not None else 'n/a'}"
             + (f" ({wait * 100:.2f}%)" if wait is not None else ""))
print("targets (benchmarks): " + "; ".join(parts))
PY
} >"$results/summary.txt"
failed="$(awk -F'\t' '$5 == 1 && $3 != "ok" {printf "%s ", $1}' "$phases_tsv")"
total=$((SECONDS - started))
if [ -n "$failed" ]; then
  echo "correctness: FAILED (phases $failed); wall time ${total}s" >>"$results/summary.txt"
  code=1
else
  echo "correctness: ok; wall time ${total}s" >>"$results/summary.txt"
  code=0
fi
cat "$results/summary.txt"
((keep)) || rm -rf "$work/runs" "$work/model-$main_preset" "$work/probe.safetensors"
exit "$code"
