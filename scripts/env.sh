# shellcheck shell=bash
# Environment for building and testing the worker crate (tch 0.26) against the libtorch 2.13.0
# that scripts/setup.sh installs into the project's virtualenv (docs/architecture.md §8). Source it:
#   source scripts/env.sh
# On a GPU node the same variables apply: the PyPI torch==2.13.0 wheel is a CUDA 13 build.
arbor_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ARBOR_VENV="${ARBOR_VENV:-$arbor_repo_root/.venv}"
export LIBTORCH="${LIBTORCH:-$ARBOR_VENV/lib/python3.11/site-packages/torch}"
export LIBTORCH_CXX11_ABI="${LIBTORCH_CXX11_ABI:-1}"
# Fixture scripts (worker/tests/fixtures) run with this interpreter.
export ARBOR_PYTHON_BIN="${ARBOR_PYTHON_BIN:-$ARBOR_VENV/bin/python}"
unset arbor_repo_root
