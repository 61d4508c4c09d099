#!/usr/bin/env bash
# Checks a GPU check bundle (scripts/gpu-bundle.sh OUT) before it goes to a GPU node:
#   - OUT is under 60 MiB (the node takes at most 64 MiB per run);
#   - it holds check.sh, its tools, the fixture, the tokenizer, the diffusers wheel;
#   - its binaries (bin/*.xz) have no rpath, and with LD_LIBRARY_PATH pointing only at OUT/lib the
#     only libraries ldd cannot resolve are libtorch's own (libtorch*.so, libc10*.so); everything
#     else resolves from OUT/lib or is a base library of any glibc 2.34+ Linux (libc, libm,
#     libpthread, libdl, librt, libgcc_s, libstdc++, ld-linux); the same for OUT/lib's libraries;
#   - the GLIBC symbol versions they need are at most 2.34, and the GLIBCXX ones at most 3.4.29
#     (GCC 11's libstdc++, as on RHEL 9; Ubuntu 22.04 has 3.4.30): both maxima are printed;
#   - with --smoke: OUT/check.sh --smoke runs every phase on this machine's CPU (this venv's
#     Python, libtorch 2.11 from .cache/torch-2.11) and exits 0.
#
#   scripts/tests/gpu_bundle_test.sh OUT [--smoke]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:?usage: gpu_bundle_test.sh OUT [--smoke]}"
smoke="${2:-}"
out="$(cd "$out" && pwd)"
failures=0
fail() { echo "[gpu-bundle-test] FAIL: $*" >&2; failures=$((failures + 1)); }
note() { echo "[gpu-bundle-test] $*" >&2; }
limit=$((60 * 1024 * 1024))

# --- size ------------------------------------------------------------------------------------------
bytes="$(find "$out" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
note "size: $(awk -v b="$bytes" 'BEGIN {printf "%.2f MiB", b / 1048576}') in $(find "$out" -type f | wc -l) files (limit 60 MiB)"
((bytes < limit)) || fail "the bundle is $bytes bytes, over 60 MiB"
if find "$out" -type l | grep . >/dev/null; then fail "the bundle holds symbolic links (the transfer drops them)"; fi

# --- contents --------------------------------------------------------------------------------------
for path in check.sh bin/arbor.xz bin/arbor-worker.xz lib/libturbojpeg.so.0 tokenizer/vocab.json \
  tokenizer/merges.txt fixtures/model/unet/config.json fixtures/inputs.safetensors \
  fixtures/goldens.safetensors tools/parity.py tools/make_model.py tools/make_dataset.py \
  tools/diffusers_baseline.py tools/report.py tools/pyenv.py tools/make_fixtures.py BUILD-INFO.txt; do
  [ -e "$out/$path" ] || fail "missing $path"
done
[ -x "$out/check.sh" ] || fail "check.sh is not executable"
ls "$out"/wheels/diffusers-*.whl >/dev/null 2>&1 || fail "no diffusers wheel"
bash -n "$out/check.sh" || fail "check.sh does not parse"

# --- libraries -------------------------------------------------------------------------------------
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
base_libs='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libgcc_s\.so\.1|libstdc\+\+\.so\.6|ld-linux-x86-64\.so\.2|/lib64/ld-linux-x86-64\.so\.2)$'
torch_libs='^(libtorch[A-Za-z0-9_]*\.so|libc10[A-Za-z0-9_]*\.so)$'
objects=()
for packed in "$out"/bin/*.xz; do
  name="$(basename "$packed" .xz)"
  xz -dc "$packed" >"$scratch/$name" 2>/dev/null ||
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$packed" "$scratch/$name"
  chmod +x "$scratch/$name"
  note "$name: $(stat -c %s "$scratch/$name") bytes unpacked, $(stat -c %s "$packed") xz"
  objects+=("$scratch/$name")
done
for lib in "$out"/lib/*; do objects+=("$lib"); done
for object in "${objects[@]}"; do
  name="$(basename "$object")"
  if readelf -d "$object" | grep -E '\((RPATH|RUNPATH)\)' >/dev/null; then
    fail "$name has an rpath: $(readelf -d "$object" | grep -E 'RPATH|RUNPATH')"
  fi
  while read -r line; do
    [ -n "$line" ] || continue
    lib="${line%% *}"
    if [[ "$line" == *"=> not found"* ]]; then
      [[ "$lib" =~ $torch_libs ]] || fail "$name: $lib is not found and is not libtorch's"
    else
      resolved="$(awk '{for (i = 1; i <= NF; i++) if ($i == "=>") {print $(i + 1); exit}}' <<<"$line")"
      if [[ "$lib" =~ $base_libs ]]; then continue; fi
      case "$resolved" in
        "$out"/lib/*) ;;
        *) fail "$name: $lib resolves to $resolved, outside OUT/lib and not a base library" ;;
      esac
    fi
  done < <(env -i LD_LIBRARY_PATH="$out/lib" ldd "$object" 2>&1 | sed 's/^[[:space:]]*//')
  note "$name: needs $(readelf -d "$object" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
done

# --- symbol versions -------------------------------------------------------------------------------
max_version() { objdump -T "$@" 2>/dev/null | grep -oE "\b$prefix[0-9.]+" | sed "s/^$prefix//" | sort -uV | tail -n 1; }
prefix=GLIBC_ glibc="$(max_version "${objects[@]}")"
prefix=GLIBCXX_ glibcxx="$(max_version "${objects[@]}")"
note "symbol versions needed at most: GLIBC_$glibc, GLIBCXX_$glibcxx"
[ "$(printf '%s\n2.34\n' "$glibc" | sort -V | tail -n 1)" = 2.34 ] || fail "needs GLIBC_$glibc > 2.34"
[ -z "$glibcxx" ] || [ "$(printf '%s\n3.4.29\n' "$glibcxx" | sort -V | tail -n 1)" = 3.4.29 ] ||
  fail "needs GLIBCXX_$glibcxx > 3.4.29"

# --- the smoke run ---------------------------------------------------------------------------------
if [ "$smoke" = --smoke ]; then
  results="$scratch/results"
  note "OUT/check.sh --smoke (CPU, tiny sizes)"
  smoke_started=$SECONDS
  if ARBOR_CHECK_PYTHON="$repo_root/.venv/bin/python" \
    ARBOR_CHECK_TORCH_LIB="$repo_root/.cache/torch-2.11/site-packages/torch/lib" \
    ARBOR_CHECK_WORK="$scratch/work" "$out/check.sh" --smoke --results "$results"; then
    note "smoke run passed in $((SECONDS - smoke_started))s"
  else
    fail "OUT/check.sh --smoke failed; its logs:"
    for log in "$results"/logs/*.log; do
      echo "=== $log" >&2
      tail -n 30 "$log" >&2
    done
  fi
  rows="$(grep -c '^| [0-9]' "$results/summary.txt" || true)"
  [ "$rows" -ge 6 ] || fail "the summary table has $rows phase rows, expected 6"
  grep -q 'FAILED' "$results/summary.txt" && fail "a phase FAILED in the smoke run"
fi

if ((failures)); then
  echo "[gpu-bundle-test] $failures failure(s)" >&2
  exit 1
fi
note "ok"
