#!/usr/bin/env bash
# The README's demo: trains a small Stable Diffusion 1.x-topology model on CPU with a coordinator
# and 2 workers (Gloo), on a generated dataset, in a few minutes. Everything lands in demo/:
#
#   demo/data/images/      96 pictures of coloured shapes, 12 aspect ratios, tag captions (.txt)
#   demo/data/manifest.jsonl   made by `arbor index`
#   demo/model/            an SD1-topology diffusers model with random weights (scripts/demo/)
#   demo/runs/finetune/    phase 1: fine-tunes the UNet (the loss falls from ~1 within minutes)
#   demo/runs/hypernetwork/ phase 2: trains an AUTOMATIC1111 hypernetwork on the phase-1 model
#   demo/runs/lora/        phase 3: trains a kohya-format LoRA (rank 4, min-SNR-γ 5) on the phase-1
#                          model; exports/lora.safetensors is then loaded in diffusers
#
# Each run directory holds job.toml, state.json, ledger/, metrics.jsonl, loss.png, samples/,
# tensorboard/, checkpoints/ and exports/ (docs/architecture.md §7). Re-running reuses the venv,
# the binaries, the dataset and the model; a finished run is trained again from scratch, an
# interrupted one (Ctrl-C) resumes from its last complete checkpoint.
#
#   scripts/demo.sh [--dry-run] [--phases "finetune hypernetwork lora"]
#     --dry-run   runs the same job without a model (`arbor worker --dry-run`): join, shards,
#                 batches loaded and cropped, heartbeats, checkpoints; no training
#     --phases    the phases to run, in order; hypernetwork and lora train on the finetune phase's
#                 export when there is one (a previous run's), else on demo/model
#   environment: ARBOR_DEMO_DIR (demo/), ARBOR_DEMO_PROFILE (release|debug), ARBOR_DEMO_PORT
#   (50151; +1 for metrics), ARBOR_DEMO_FINETUNE_EPOCHS, ARBOR_DEMO_HYPERNETWORK_EPOCHS,
#   ARBOR_DEMO_LORA_EPOCHS
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

dry_run=0
phases="finetune hypernetwork lora"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --phases) phases="$2"; shift ;;
    --phases=*) phases="${1#*=}" ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

demo_dir="$(realpath -m "${ARBOR_DEMO_DIR:-$repo_root/demo}")"
profile="${ARBOR_DEMO_PROFILE:-release}"
port="${ARBOR_DEMO_PORT:-50151}"
image_count=96
bsz=4
workers=2
started_at=$SECONDS

log() { printf '[demo %4ds] %s\n' "$((SECONDS - started_at))" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

# --- 1. setup: Debian packages and the venv (torch, diffusers, …), skipped when present -----------
log "setup (scripts/setup.sh; first run downloads ~5 GB of Python wheels)"
scripts/setup.sh
# shellcheck disable=SC1091
source scripts/env.sh
python_bin="$ARBOR_PYTHON_BIN"

# --- 2. build ----------------------------------------------------------------------------------------
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
build_started=$SECONDS
if [ "$profile" = release ]; then
  log "building arbor and arbor-worker (cargo build --release; the first build takes minutes)"
  cargo build --release --quiet -p arbor-coordinator -p arbor-worker
  bin_dir="$target_dir/release"
else
  log "building arbor and arbor-worker (cargo build, debug profile)"
  cargo build --quiet -p arbor-coordinator -p arbor-worker
  bin_dir="$target_dir/debug"
fi
arbor="$bin_dir/arbor"
log "built in $((SECONDS - build_started))s: $arbor, $bin_dir/arbor-worker"
after_build=$SECONDS

# --- 3. dataset --------------------------------------------------------------------------------------
mkdir -p "$demo_dir/data"
log "dataset: $image_count pictures with tag captions in $demo_dir/data/images"
"$python_bin" scripts/demo/make_demo_dataset.py "$demo_dir/data" --count "$image_count"
manifest="$demo_dir/data/manifest.jsonl"
if [ ! -s "$manifest" ] || [ "$demo_dir/data/COMPLETE" -nt "$manifest" ]; then
  log "arbor index $demo_dir/data/images --out $manifest"
  "$arbor" index "$demo_dir/data/images" --out "$manifest.tmp" --report "$demo_dir/data/index-report.json"
  mv "$manifest.tmp" "$manifest"
fi

# --- 4. model ----------------------------------------------------------------------------------------
log "model: a small SD1-topology diffusers model with random weights in $demo_dir/model"
model_facts="$("$python_bin" scripts/demo/make_demo_model.py "$demo_dir/model" --preset demo | tail -n 1)"
hypernetwork_sizes="$("$python_bin" -c 'import json,sys; print(json.loads(sys.argv[1])["hypernetwork_sizes"])' "$model_facts")"

bucket_flags=(--max-area 16384 --min-dim 64 --max-dim 256 --step 32 --base-res 128x128)
plan_json="$("$arbor" plan epoch --manifest "$manifest" --bsz "$bsz" --world-size "$workers" --seed 42 --epoch 0 --json "${bucket_flags[@]}")"
steps_per_epoch="$("$python_bin" -c 'import json,sys; print(json.loads(sys.argv[1])["batches_per_rank"])' "$plan_json")"
log "plan: $("$python_bin" scripts/demo/report.py plan <<<"$plan_json")"
"$arbor" plan buckets "${bucket_flags[@]}" | sed 's/^/    /' >&2

# --- 5. one run per phase ----------------------------------------------------------------------------
# write_job PHASE MODEL MODE LR EPOCHS [MIN_SNR_GAMMA] → the phase's job.toml
write_job() {
  local phase="$1" model="$2" mode="$3" lr="$4" epochs="$5"
  local min_snr_gamma="# min_snr_gamma: unset (off)"
  [ -n "${6:-}" ] && min_snr_gamma="min_snr_gamma = $6              # min-SNR-γ loss weighting"
  local job_dir="$demo_dir/jobs/$phase"
  mkdir -p "$job_dir"
  sed -e "s|@NAME@|demo-$phase|" \
    -e "s|@RUN_DIR@|$demo_dir/runs/$phase|" \
    -e "s|@MANIFEST@|$manifest|" \
    -e "s|@DATA_ROOT@|$demo_dir/data/images|" \
    -e "s|@MODEL@|$model|" \
    -e "s|@MODE@|$mode|" \
    -e "s|@LR@|$lr|" \
    -e "s|@BSZ@|$bsz|" \
    -e "s|@EPOCHS@|$epochs|" \
    -e "s|@WARMUP@|10|" \
    -e "s|@CHECKPOINT_EVERY@|$((steps_per_epoch * 4))|" \
    -e "s|@SAMPLES_EVERY@|$((steps_per_epoch * epochs / 3 + 1))|" \
    -e "s|@HN_SIZES@|$hypernetwork_sizes|" \
    -e "s|@MIN_SNR_GAMMA@|$min_snr_gamma|" \
    -e "s|@PORT@|$port|" \
    -e "s|@METRICS_PORT@|$((port + 1))|" \
    scripts/demo/job.template.toml >"$job_dir/job.toml.new"
  echo "$job_dir/job.toml"
}

# run_phase PHASE MODEL MODE LR EPOCHS [MIN_SNR_GAMMA]
run_phase() {
  local phase="$1" epochs="$5"
  local job run_dir total_steps launch_log launch_pid status
  job="$(write_job "$@")"
  run_dir="$demo_dir/runs/$phase"
  # A finished run, or one made with another config, starts over; an interrupted one resumes.
  if [ -f "$run_dir/state.json" ]; then
    if ! cmp -s "$job.new" "$job" || grep -q '"finished": *true' "$run_dir/state.json"; then
      rm -rf "$run_dir"
    else
      log "$phase: resuming the interrupted run in $run_dir"
    fi
  fi
  mv "$job.new" "$job"
  total_steps=$((steps_per_epoch * epochs))
  launch_log="$demo_dir/jobs/$phase/launch.log"
  local what="training ($3, $total_steps steps: $epochs epochs of $steps_per_epoch)"
  # One libtorch thread per worker: 2 workers share the 2 cores of a small machine.
  local launch_flags=(--worker-arg=--device=cpu --worker-arg=--threads="${ARBOR_DEMO_THREADS:-1}")
  if ((dry_run)); then
    what="DRY RUN (no model, no training: batches are loaded and cropped, nothing learns)"
    launch_flags=(--dry-run --worker-arg=--simulate-step-ms=50)
  fi
  log "$phase: arbor launch --config $job --workers $workers ${launch_flags[*]}: $what"
  log "$phase: coordinator and worker logs: $launch_log"
  local phase_started=$SECONDS
  ARBOR_LOG="${ARBOR_LOG:-info}" RUST_LOG="${RUST_LOG:-info}" \
    "$arbor" launch --config "$job" --workers "$workers" "${launch_flags[@]}" >"$launch_log" 2>&1 &
  launch_pid=$!
  trap 'kill -INT "$launch_pid" 2>/dev/null; wait "$launch_pid"; log "interrupted; run the demo again to resume"; exit 130' INT TERM
  while kill -0 "$launch_pid" 2>/dev/null; do
    sleep 10
    if kill -0 "$launch_pid" 2>/dev/null; then
      if ((dry_run)); then
        log "$phase: $(grep -c '' "$run_dir"/ledger/epoch-*.jsonl 2>/dev/null | awk -F: '{s+=$NF} END {print s+0}') batches in the ledger"
      else
        log "$phase: $("$python_bin" scripts/demo/report.py progress "$run_dir" --total-steps "$total_steps")"
      fi
    fi
  done
  status=0
  wait "$launch_pid" || status=$?
  trap - INT TERM
  if ((status != 0)); then
    tail -n 40 "$launch_log" >&2
    fail "$phase: arbor launch exited with $status (full log: $launch_log)"
  fi
  log "$phase: finished in $((SECONDS - phase_started))s"
  phase_seconds[$phase]=$((SECONDS - phase_started))
}

# The model phases 2 and 3 train on: phase 1's export (of this run or an earlier one), else the
# random-weight model.
phase1_model() {
  local base="$demo_dir/runs/finetune/exports/diffusers"
  if ((dry_run)) || [ ! -f "$base/model_index.json" ]; then base="$demo_dir/model"; fi
  echo "$base"
}

declare -A phase_seconds=() phase_model=()
failures=()
finetune_epochs="${ARBOR_DEMO_FINETUNE_EPOCHS:-10}"
hypernetwork_epochs="${ARBOR_DEMO_HYPERNETWORK_EPOCHS:-4}"
lora_epochs="${ARBOR_DEMO_LORA_EPOCHS:-3}"
for phase in $phases; do
  case "$phase" in finetune | hypernetwork | lora) ;; *) fail "unknown phase $phase (finetune, hypernetwork, lora)" ;; esac
done
for phase in $phases; do
  case "$phase" in
    finetune) phase_model[$phase]="$demo_dir/model" ;;
    *) phase_model[$phase]="$(phase1_model)" ;;
  esac
  case "$phase" in
    finetune) run_phase finetune "${phase_model[$phase]}" finetune 3e-4 "$finetune_epochs" ;;
    hypernetwork) run_phase hypernetwork "${phase_model[$phase]}" hypernetwork 1e-3 "$hypernetwork_epochs" ;;
    # [lora] in scripts/demo/job.template.toml: rank 4 on the attention and proj_in/out layers.
    lora) run_phase lora "${phase_model[$phase]}" lora 1e-3 "$lora_epochs" 5.0 ;;
  esac
done

# --- 6. where everything is ----------------------------------------------------------------------
echo
if ((dry_run)); then
  echo "== DRY RUN: the job ran end to end without a model; nothing was trained"
fi
for phase in $phases; do
  run_dir="$demo_dir/runs/$phase"
  echo "== $phase"
  if ((dry_run)); then
    echo "  run directory  $run_dir (ledger/, state.json, checkpoints/)"
    continue
  fi
  # The fine-tune must visibly learn; the hypernetwork and lora phases start where it ended
  # (README).
  summary_flags=()
  [ "$phase" = finetune ] && summary_flags=(--require-loss-fall)
  "$python_bin" scripts/demo/report.py summary "$run_dir" "${summary_flags[@]}" ||
    failures+=("$phase: no metrics, or the loss did not fall, in $run_dir")
  if [ "$phase" = lora ]; then
    # diffusers' load_lora_weights on the model it was trained on, checked against kohya's merge
    # (worker/tests/fixtures/check_lora.py); one line: "lora: FILE loads in diffusers (…)".
    if result="$("$python_bin" scripts/demo/lora_check.py --model "${phase_model[lora]}" \
      --lora "$run_dir/exports/lora.safetensors" 2>&1)"; then
      echo "  loads in       diffusers StableDiffusionPipeline.load_lora_weights (peft), as kohya merges it"
      echo "  $(tail -n 1 <<<"$result")"
    else
      echo "  export check   FAILED: $result"
      failures+=("lora: $run_dir/exports/lora.safetensors did not load in diffusers")
    fi
    continue
  fi
  if [ "$phase" = finetune ]; then
    check=(finetune --exports "$run_dir/exports" --base-model "$demo_dir/model")
  else
    check=(hypernetwork --exports "$run_dir/exports" --sizes "$(tr -d '[] ' <<<"$hypernetwork_sizes")")
  fi
  if result="$("$python_bin" worker/tests/fixtures/check_exports.py "${check[@]}" 2>&1)"; then
    if [ "$phase" = finetune ]; then
      echo "  loads in       diffusers StableDiffusionPipeline.from_single_file and .from_pretrained"
    else
      echo "  loads in       torch.load(weights_only=True), as AUTOMATIC1111 and ComfyUI load it"
    fi
  else
    echo "  export check   FAILED: $result"
    failures+=("$phase: the exports in $run_dir/exports did not load")
  fi
done
if ((!dry_run)); then
  # One TensorBoard run per phase: each run directory's tensorboard/ (scripts/requirements/
  # installs the tensorboard wheel into the venv).
  echo "== TensorBoard"
  echo "  logs           $demo_dir/runs/<phase>/tensorboard/"
  echo "  open them with $(dirname "$python_bin")/tensorboard --logdir $demo_dir/runs"
fi
echo
timings=""
for phase in $phases; do timings+=" $phase ${phase_seconds[$phase]:-?}s,"; done
log "done: $((SECONDS - after_build))s after the build (${timings# }${timings:+ }build $((after_build - build_started))s)"
for failure in "${failures[@]}"; do echo "demo: FAILED: $failure" >&2; done
((${#failures[@]} == 0)) || exit 1
