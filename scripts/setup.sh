#!/usr/bin/env bash
# Installs everything arbor's tests and demo need on a fresh Debian machine, and nothing twice:
#   - Debian packages listed in scripts/apt-packages.txt (one per line, '#' comments)
#   - a project-local Python virtualenv in .venv with every scripts/requirements/*.txt
# Safe to run repeatedly; each step is skipped when already satisfied.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ARBOR_VENV:-$repo_root/.venv}"
python="${ARBOR_PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

# One setup at a time: concurrent pip installs into one venv corrupt it.
mkdir -p "$repo_root/.cache"
exec 9>"$repo_root/.cache/setup.lock"
flock 9

# --- Debian packages --------------------------------------------------------------------------
mapfile -t apt_packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$repo_root/scripts/apt-packages.txt")
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Rust components --------------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# --- Python virtualenv ------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
requirements=("$repo_root"/scripts/requirements/*.txt)
stamp="$venv/.arbor-requirements.sha256"
digest="$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  log "installing Python packages from ${requirements[*]##*/}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  args=()
  for file in "${requirements[@]}"; do args+=(-r "$file"); done
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${args[@]}"
  echo "$digest" >"$stamp"
fi
log "ready: venv $venv"
