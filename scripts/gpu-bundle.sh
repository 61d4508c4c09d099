#!/usr/bin/env bash
# Builds the folder for one GPU check run (issue 13, item 5): everything the borrowed GPU node
# (one H200; PyTorch 2.11.0+cu130 for Python 3.12 at /opt/torch/.venv with transformers,
# accelerate, peft and pillow but no diffusers; no Rust, no network, nothing to install; at most
# 64 MiB of files and 10 minutes per run; docs/architecture.md §8) needs besides its own PyTorch:
#
#   scripts/gpu-bundle.sh OUT        # then, on the node: OUT/check.sh  (here: OUT/check.sh --smoke)
#
#   OUT/check.sh            the check (scripts/gpu-check/check.sh)
#   OUT/bin/*.xz            `arbor` and `arbor-worker` (--features nccl), release, built against the
#                           torch==2.11.0 wheel (scripts/torch-2.11.sh), stripped, no rpath, xz'd;
#                           they load the node's torch/lib through LD_LIBRARY_PATH (check.sh)
#   OUT/lib/                the shared libraries they need besides libtorch's and the base system's
#                           (libturbojpeg.so.0, Debian's, which arbor-data links)
#   OUT/wheels/             diffusers (scripts/requirements/torch.txt's version) and the pure-Python
#                           packages it needs that the node may lack (used only where missing)
#   OUT/tokenizer/          CLIP's vocab.json + merges.txt (from the fixture script, below)
#   OUT/fixtures/           the parity fixture, made here on CPU by
#                           worker/tests/fixtures/make_fixtures.py: model/ (a tiny SD1-topology
#                           diffusers folder), inputs.safetensors, goldens.safetensors
#   OUT/tools/              check.sh's Python helpers (scripts/gpu-check/*.py, make_fixtures.py)
#   OUT/BUILD-INFO.txt      the commit, the libtorch the binaries were built against, sizes
#
# OUT must stay under 60 MiB (scripts/tests/gpu_bundle_test.sh checks it and the binaries'
# libraries). Caches: .cache/torch-2.11/ (wheel, patched torch-sys, target/) and
# .cache/gpu-bundle/ (wheels, fixtures; ARBOR_GPU_BUNDLE_CACHE). Needs scripts/setup.sh's venv.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
[ $# -eq 1 ] || { sed -n '2,30p' "$0" >&2; exit 2; }
out="$1"
venv="${ARBOR_VENV:-$repo_root/.venv}"
cache="${ARBOR_GPU_BUNDLE_CACHE:-$repo_root/.cache/gpu-bundle}"
started=$SECONDS
log() { printf '[gpu-bundle %3ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
[ -x "$venv/bin/python" ] || { log "no venv at $venv: run scripts/setup.sh first"; exit 1; }
python="$venv/bin/python"
mkdir -p "$cache"

# --- 1. the binaries against libtorch 2.11 ----------------------------------------------------------
log "building arbor and arbor-worker (--features nccl) against libtorch 2.11 (scripts/torch-2.11.sh)"
build_started=$SECONDS
# no debug info: the binaries are stripped anyway, and the build is faster without it
ARBOR_NO_RPATH=1 CARGO_PROFILE_RELEASE_DEBUG=false scripts/torch-2.11.sh cargo build --release --locked --quiet \
  -p arbor-coordinator -p arbor-worker --features arbor-worker/nccl
eval "$(scripts/torch-2.11.sh env)"
release="$CARGO_TARGET_DIR/release"
log "built in $((SECONDS - build_started))s ($release)"

staging="$out.staging"
rm -rf "$staging"
mkdir -p "$staging"/{bin,lib,wheels,tokenizer,fixtures,tools}

# strip and compress (xz: 10 MB for both, gzip would take 14.5). ARBOR_NO_RPATH (worker/build.rs)
# kept this machine's libtorch path out of them: on the node LD_LIBRARY_PATH decides.
for name in arbor arbor-worker; do
  cp "$release/$name" "$staging/bin/$name"
  strip "$staging/bin/$name"
  if readelf -d "$staging/bin/$name" | grep -E 'RPATH|RUNPATH' >/dev/null; then
    log "error: $name still has an rpath"
    exit 1
  fi
  stripped_bytes=$(stat -c %s "$staging/bin/$name")
  if command -v xz >/dev/null 2>&1; then
    xz -9e -T2 "$staging/bin/$name"
  else
    "$python" -c 'import lzma,os,shutil,sys; shutil.copyfileobj(open(sys.argv[1],"rb"), lzma.open(sys.argv[1]+".xz","wb",preset=9|lzma.PRESET_EXTREME)); os.remove(sys.argv[1])' "$staging/bin/$name"
  fi
  log "$name: $((stripped_bytes / 1024)) KiB stripped, $(($(stat -c %s "$staging/bin/$name.xz") / 1024)) KiB compressed"
  printf '%s %s %s\n' "$name" "$stripped_bytes" "$(stat -c %s "$staging/bin/$name.xz")" >>"$staging/.sizes"
done

# --- 2. shared libraries the node may lack ---------------------------------------------------------
# Whatever the worker needs besides libtorch's family and the base system (checked by the bundle
# test): Debian's libturbojpeg (arbor-data links it dynamically).
# (awk reads ldconfig's whole output: an early exit would fail the pipeline under pipefail)
turbojpeg="$(ldconfig -p | awk '/libturbojpeg\.so\.0 .*x86-64/ && !found {print $NF; found = 1}')"
[ -n "$turbojpeg" ] || { log "error: libturbojpeg.so.0 not found (apt package libturbojpeg0)"; exit 1; }
cp "$(readlink -f "$turbojpeg")" "$staging/lib/libturbojpeg.so.0"

# --- 3. wheels -------------------------------------------------------------------------------------
# diffusers at the version the project pins, and the small packages among its requirements that
# the node may lack or have too old (tools/pyenv.py uses each only where the node's does not
# satisfy diffusers): requests and its dependencies, importlib_metadata, zipp, filelock and
# safetensors at the venv's versions, and huggingface_hub 1.33.0, the last 1.x: diffusers 0.42
# needs >= 1.32 while transformers 5.0 came with 1.3 and accepts < 2.0.
diffusers_pin="$(grep -E '^diffusers==' scripts/requirements/torch.txt)"
wheel_pins=("$diffusers_pin" huggingface_hub==1.33.0)
for name in requests urllib3 idna charset_normalizer certifi importlib_metadata zipp filelock safetensors; do
  version="$("$python" -c 'import importlib.metadata,sys; print(importlib.metadata.version(sys.argv[1]))' "$name" 2>/dev/null || true)"
  wheel_pins+=("$name${version:+==$version}")
done
wheel_stamp="$cache/wheels/.pins"
if [ ! -f "$wheel_stamp" ] || [ "$(cat "$wheel_stamp")" != "${wheel_pins[*]}" ]; then
  log "downloading wheels: ${wheel_pins[*]}"
  rm -rf "$cache/wheels"
  mkdir -p "$cache/wheels"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    -d "$cache/wheels" "${wheel_pins[@]}"
  echo "${wheel_pins[*]}" >"$wheel_stamp"
fi
cp "$cache"/wheels/*.whl "$staging/wheels/"

# --- 4. the parity fixture and the tokenizer (made on CPU by the fixture script itself) ------------
fixture_key="$(cat worker/tests/fixtures/make_fixtures.py scripts/requirements/torch.txt | sha256sum | cut -c1-16)"
fixtures="$cache/fixtures-$fixture_key"
if [ ! -f "$fixtures/COMPLETE" ]; then
  log "making the parity fixture (worker/tests/fixtures/make_fixtures.py make)"
  rm -rf "$fixtures" "$fixtures.tmp"
  HF_HUB_OFFLINE=1 "$python" worker/tests/fixtures/make_fixtures.py make "$fixtures.tmp" >&2
  touch "$fixtures.tmp/COMPLETE"
  mv "$fixtures.tmp" "$fixtures"
fi
# fixtures of older versions of the script
find "$cache" -maxdepth 1 -name 'fixtures-*' ! -name "fixtures-$fixture_key" -exec rm -rf {} +
cp "$fixtures"/tokenizer_src/{vocab.json,merges.txt} "$staging/tokenizer/"
cp -r "$fixtures/model" "$staging/fixtures/model"
# the probe reads token ids, not text, and the reference loads the components one by one: the
# model's tokenizer/ (transformers' 3.5 MB tokenizer.json) stays behind
rm -rf "$staging/fixtures/model/tokenizer"
cp "$fixtures"/{inputs,goldens}.safetensors "$staging/fixtures/"

# --- 5. the check and its helpers ------------------------------------------------------------------
cp scripts/gpu-check/check.sh "$staging/check.sh"
chmod +x "$staging/check.sh"
cp scripts/gpu-check/*.py worker/tests/fixtures/make_fixtures.py "$staging/tools/"
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
dirty="$(git status --porcelain --untracked-files=no 2>/dev/null | grep -c . || true)"
{
  echo "commit $commit$([ "$dirty" != 0 ] && echo " + $dirty uncommitted file(s)"), built $(date -u +%Y-%m-%dT%H:%M:%SZ) against libtorch $(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$LIBTORCH/version.py") (tch 0.26, patched torch-sys: $(wc -l <"$(dirname "$(dirname "$LIBTORCH")")/patched-functions.txt") stubbed ops)"
  echo "binaries (name, stripped bytes, xz bytes):"
  cat "$staging/.sizes"
  echo "wheels: $(cd "$staging/wheels" && ls | tr '\n' ' ')"
} >"$staging/BUILD-INFO.txt"
rm -f "$staging/.sizes"

rm -rf "$out"
mv "$staging" "$out"
bytes="$(du -sb "$out" | cut -f1)"
log "bundle: $out, $(awk -v b="$bytes" 'BEGIN {printf "%.1f MiB", b / 1048576}') in $(find "$out" -type f | wc -l) files"
du -sh "$out"/* >&2
