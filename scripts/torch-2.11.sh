#!/usr/bin/env bash
# Builds arbor against libtorch 2.11 (the PyTorch that the borrowed GPU node ships; docs/architecture.md §8)
# instead of the default 2.13 from the project's venv. Nothing of the default build changes:
# everything lives under .cache/torch-2.11/ (git-ignored), and Cargo.lock is not touched.
#
#   scripts/torch-2.11.sh prepare        # wheel, unpacked torch/{include,lib}, patched torch-sys
#   scripts/torch-2.11.sh cargo ARGS...  # cargo ARGS against 2.11, e.g. `build --release -p arbor`
#   scripts/torch-2.11.sh env            # the export lines the cargo command uses (for eval)
#
# How (measured 2026-12, tch 0.26.0 / torch-sys 0.26.0):
#   1. `pip download --no-deps torch==2.11.0` (manylinux x86_64 wheel, CUDA 13.0 build, a plain
#      zip, ~530 MB) into .cache/torch-2.11/wheel; only torch/include and torch/lib are unpacked
#      (.cache/torch-2.11/site-packages/torch). Beside it, site-packages/nvidia/ links to the
#      venv's nvidia/ folders (cu13 runtime and headers, cudnn, ... plus the CUDA headers of
#      scripts/requirements/cuda-headers.txt; torch 2.13's deps, also CUDA 13.0), except nccl/,
#      unpacked from the nvidia-nccl wheel at the version torch 2.11 pins (2.28.9; the venv's is
#      2.29.7, whose ncclConfig_t is larger). The NCCL feature's headers come from there
#      (worker/c10d/build.rs), and libtorch's own RPATH ($ORIGIN/../../nvidia/*/lib) resolves its
#      CUDA libraries through it, at link time and on this machine at run time.
#   2. torch-sys's generated C++ wrapper names ops that 2.11 lacks (or declares differently).
#      torch-sys is copied to .cache/torch-2.11/torch-sys-<version>, its wrapper is compiled
#      against 2.11's headers (g++ -fsyntax-only), and every wrapper function that fails gets its
#      body replaced by a throw ("... is not in libtorch 2.11"), which tch turns into an error if
#      anything ever calls it. The list is written to .cache/torch-2.11/patched-functions.txt.
#   3. cargo runs with LIBTORCH=<unpacked>/torch LIBTORCH_BYPASS_VERSION_CHECK=1 and a cargo
#      `paths` override (`--config 'paths=[...]'`) to the patched copy: unlike [patch.crates-io] it
#      leaves Cargo.lock as it is. The target folder is .cache/torch-2.11/target
#      (CARGO_TARGET_DIR wins). The binaries get no usable rpath to libtorch: run them with
#      LD_LIBRARY_PATH=<torch>/lib (the GPU bundle's check.sh does).
#
# Environment: ARBOR_TORCH211_CACHE (default .cache/torch-2.11), ARBOR_VENV (default .venv; for
# pip and the nvidia/ folder), ARBOR_TORCH211_VERSION (default 2.11.0).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${ARBOR_TORCH211_CACHE:-$repo_root/.cache/torch-2.11}"
venv="${ARBOR_VENV:-$repo_root/.venv}"
version="${ARBOR_TORCH211_VERSION:-2.11.0}"
site="$cache/site-packages"
libtorch="$site/torch"

log() { printf '[torch-2.11] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The torch-sys source cargo would use (from the registry; `cargo fetch` if missing).
torch_sys_source() {
  local manifest
  manifest="$(cd "$repo_root" && cargo metadata --locked --format-version 1 2>/dev/null |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="torch-sys"))')" ||
    die "cargo metadata found no torch-sys"
  dirname "$manifest"
}

prepare_wheel() {
  local wheel
  mkdir -p "$cache/wheel"
  wheel="$(ls "$cache"/wheel/torch-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$wheel" ]; then
    [ -x "$venv/bin/python" ] || die "no venv at $venv: run scripts/setup.sh first"
    log "downloading torch==$version (manylinux x86_64 wheel, no dependencies) into $cache/wheel"
    "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
      --implementation cp --abi cp312 -d "$cache/wheel" "torch==$version"
    wheel="$(ls "$cache"/wheel/torch-"$version"-*.whl | head -n 1)"
  fi
  if [ ! -f "$site/.unpacked" ] || [ "$(cat "$site/.unpacked")" != "$(basename "$wheel")" ]; then
    log "unpacking torch/include and torch/lib of $(basename "$wheel")"
    rm -rf "$site"
    mkdir -p "$site"
    unzip -q -o "$wheel" 'torch/include/*' 'torch/lib/*' 'torch/version.py' -d "$site"
    basename "$wheel" >"$site/.unpacked"
  fi
  grep -q "__version__ = '$version" "$libtorch/version.py" || die "$libtorch is not torch $version"
  # libtorch's RPATH ($ORIGIN/../../nvidia/*/lib) and worker/c10d/build.rs's CUDA header search
  # (nvidia/*/include beside LIBTORCH) both look in site-packages/nvidia: every folder of the
  # venv's (CUDA 13.0 runtime and headers, cudnn, ...), except NCCL, whose headers must be the
  # version this torch was built with (ProcessGroupNCCL's layout follows nccl.h's ncclConfig_t,
  # which grew in 2.29): its wheel, at the wheel's pin, is unpacked instead.
  local nvidia="$venv/lib/python3.11/site-packages/nvidia" nccl_pin nccl_wheel entry
  [ -d "$nvidia" ] || die "no $nvidia: run scripts/setup.sh first"
  nccl_pin="$(unzip -p "$wheel" "torch-$version.dist-info/METADATA" | sed -n 's/^Requires-Dist: \(nvidia-nccl-cu[0-9]*==[0-9.]*\).*/\1/p' | sed -n 1p)"
  [ -n "$nccl_pin" ] || die "no nvidia-nccl pin in $(basename "$wheel")'s METADATA"
  [ -L "$site/nvidia" ] && rm -f "$site/nvidia" # an older layout of this cache
  mkdir -p "$site/nvidia"
  for entry in "$nvidia"/*; do
    [ "$(basename "$entry")" = nccl ] || ln -sfn "$entry" "$site/nvidia/$(basename "$entry")"
  done
  # unpacked under a folder named by the version: ARBOR_CUDA_INCLUDE_DIRS (env_lines) names it,
  # so another pin re-runs worker/c10d's build script
  local nccl_dir="$cache/${nccl_pin/==/-}"
  if [ ! -f "$nccl_dir/.unpacked" ]; then
    nccl_wheel="$(ls "$cache"/wheel/nvidia_nccl_*-"${nccl_pin#*==}"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$nccl_wheel" ]; then
      log "downloading $nccl_pin (NCCL headers and library matching torch $version)"
      "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$cache/wheel" "$nccl_pin"
      nccl_wheel="$(ls "$cache"/wheel/nvidia_nccl_*-"${nccl_pin#*==}"-*.whl | head -n 1)"
    fi
    rm -rf "$nccl_dir"
    unzip -q -o "$nccl_wheel" 'nvidia/nccl/include/*' 'nvidia/nccl/lib/*' -d "$nccl_dir"
    echo "$nccl_pin" >"$nccl_dir/.unpacked"
  fi
  [ -d "$site/nvidia/nccl" ] && [ ! -L "$site/nvidia/nccl" ] && rm -rf "$site/nvidia/nccl"
  ln -sfn "$nccl_dir/nvidia/nccl" "$site/nvidia/nccl"
}

# Compiles torch-sys's C++ wrapper against 2.11's headers and prints the failing wrapper
# functions' names, one per line.
failing_functions() {
  local dir="$1" errors="$cache/wrapper-errors.txt"
  g++ -fsyntax-only -fmax-errors=0 -w -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT \
    -I"$libtorch/include" -I"$libtorch/include/torch/csrc/api/include" \
    "$dir/libtch/torch_api.cpp" "$dir/libtch/torch_api_generated.cpp" 2>"$errors" || true
  python3 - "$dir" "$errors" <<'PY'
import re, sys
from pathlib import Path
root, errors = Path(sys.argv[1]), Path(sys.argv[2]).read_text(errors="replace")
names = set()
for path in ("libtch/torch_api.cpp", "libtch/torch_api_generated.cpp"):
    lines = (root / path).read_text().split("\n")
    for match in re.finditer(r"^(?:.*/)?" + re.escape(path) + r":(\d+):\d+: error:", errors, re.M):
        line = int(match.group(1)) - 1
        # the enclosing function: the nearest definition line above, at column 0
        for index in range(line, -1, -1):
            found = re.match(r"^[A-Za-z_][\w\s\*]*?\b(\w+)\(.*\)\s*\{\s*$", lines[index])
            if found:
                names.add((path, found.group(1)))
                break
        else:
            sys.exit(f"no enclosing function for {path}:{line + 1}")
for path, name in sorted(names):
    print(f"{path} {name}")
PY
}

# Replaces the PROTECT(...) body of the named functions with a throw.
patch_functions() {
  local dir="$1" list="$2"
  python3 - "$dir" "$list" "$version" <<'PY'
import re, sys
from pathlib import Path
root, listing, version = Path(sys.argv[1]), Path(sys.argv[2]).read_text().split("\n"), sys.argv[3]
wanted = {}
for entry in filter(None, listing):
    path, name = entry.split()
    wanted.setdefault(path, set()).add(name)
for path, names in wanted.items():
    file = root / path
    lines = file.read_text().split("\n")
    index, done = 0, set()
    while index < len(lines):
        found = re.match(r"^[A-Za-z_][\w\s\*]*?\b(\w+)\(.*\)\s*\{\s*$", lines[index])
        if not found or found.group(1) not in names:
            index += 1
            continue
        name = found.group(1)
        end = next(i for i in range(index + 1, len(lines)) if lines[i] == "}")
        body = lines[index + 1 : end]
        throw = f'    throw std::runtime_error("{name}: this op is not in libtorch {version} (arbor builds tch 0.26 against it with this wrapper stubbed)");'
        if body and body[0].strip() == "PROTECT(" and ")" in [b.strip() for b in body]:
            close = max(i for i, b in enumerate(body) if b.strip() == ")")
            body = [body[0], throw] + body[close:]
        else:
            body = [throw]
        lines[index + 1 : end] = body
        done.add(name)
        index += 1 + len(body)
    missing = names - done
    if missing:
        sys.exit(f"{path}: did not find {sorted(missing)}")
    if "#include <stdexcept>" not in lines:
        lines.insert(0, "#include <stdexcept>")
    file.write_text("\n".join(lines))
PY
}

prepare_torch_sys() {
  local source name copy stamp digest
  source="$(torch_sys_source)"
  name="$(basename "$source")"
  copy="$cache/$name"
  stamp="$copy/.arbor-patched"
  # redone when the wheel, the torch-sys version or this patch procedure (its version here) changes
  digest="$(basename "$(cat "$site/.unpacked")")-$name-patch-1"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    return
  fi
  log "copying $name and compiling its C++ wrapper against libtorch $version's headers"
  rm -rf "$copy"
  cp -r "$source" "$copy"
  failing_functions "$copy" >"$cache/patched-functions.txt"
  [ -s "$cache/patched-functions.txt" ] || log "the wrapper compiles as it is: nothing to patch"
  if [ -s "$cache/patched-functions.txt" ]; then
    log "stubbing $(wc -l <"$cache/patched-functions.txt") wrapper functions: $(awk '{print $2}' "$cache/patched-functions.txt" | tr '\n' ' ')"
    patch_functions "$copy" "$cache/patched-functions.txt"
    log "checking that the patched wrapper compiles"
    local still
    still="$(failing_functions "$copy")"
    if [ -n "$still" ] || grep -q 'error:' "$cache/wrapper-errors.txt"; then
      sed -n '1,20p' "$cache/wrapper-errors.txt" >&2
      die "the patched wrapper still fails (errors: $cache/wrapper-errors.txt)"
    fi
  fi
  echo "$digest" >"$stamp"
}

env_lines() {
  local copy
  copy="$(ls -d "$cache"/torch-sys-* 2>/dev/null | head -n 1)"
  [ -n "$copy" ] && [ -f "$copy/.arbor-patched" ] || die "not prepared: run scripts/torch-2.11.sh prepare"
  cat <<EOF
export LIBTORCH='$libtorch'
export LIBTORCH_CXX11_ABI=1
export LIBTORCH_BYPASS_VERSION_CHECK=1
unset LIBTORCH_USE_PYTORCH
export CARGO_TARGET_DIR='${CARGO_TARGET_DIR:-$cache/target}'
export ARBOR_TORCH211_PATHS_OVERRIDE='paths=["$copy"]'
export ARBOR_CUDA_INCLUDE_DIRS='$(cd "$site/nvidia" && for dir in */include; do [ -d "$dir" ] && printf '%s:' "$(cd "$dir" && pwd -P)"; done | sed 's/:$//')'
EOF
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  prepare)
    prepare_wheel
    prepare_torch_sys
    log "ready: LIBTORCH=$libtorch, patched torch-sys in $cache (functions: $cache/patched-functions.txt)"
    ;;
  env)
    env_lines
    ;;
  cargo)
    prepare_wheel
    prepare_torch_sys
    eval "$(env_lines)"
    cd "$repo_root"
    # `paths` overrides warn that they are deprecated-ish for dependency changes; the copy has
    # the same version and dependencies, which is what they support.
    exec cargo --config "$ARBOR_TORCH211_PATHS_OVERRIDE" "$@"
    ;;
  *)
    sed -n '2,9p' "$0" >&2
    exit 2
    ;;
esac
