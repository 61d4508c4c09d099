#!/usr/bin/env bash
# The README's test command: installs what the tests need (scripts/setup.sh), then runs the
# lints and every test of the workspace. Works on a fresh Debian machine with Rust and Python.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

scripts/setup.sh
# shellcheck disable=SC1091
[ -f scripts/env.sh ] && source scripts/env.sh

# A one-off build gains nothing from incremental compilation, and its caches would double the
# target folder (the test binaries that link libtorch's bindings are large).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The NCCL collectives compile (the headers come from scripts/requirements/cuda-headers.txt);
# linking and running them is for a GPU node.
echo "[test] cargo check --features nccl" >&2
cargo check --quiet -p arbor-worker --features nccl
# The end-to-end tests run the built `arbor` and `arbor-worker` binaries of the workspace.
echo "[test] cargo build" >&2
cargo build --workspace --quiet
echo "[test] cargo test" >&2
cargo test --workspace --quiet
# The GPU check bundle: `arbor` and `arbor-worker --features nccl` built against libtorch 2.11 (the
# GPU node's PyTorch; scripts/torch-2.11.sh, cached in .cache/torch-2.11), so the 2.11 variant
# keeps compiling; then the bundle's size and libraries, and its check.sh --smoke on the CPU.
echo "[test] GPU bundle against libtorch 2.11 (scripts/gpu-bundle.sh)" >&2
scripts/gpu-bundle.sh .cache/gpu-bundle/out
echo "[test] GPU bundle test" >&2
scripts/tests/gpu_bundle_test.sh .cache/gpu-bundle/out --smoke
