#!/usr/bin/env bash
# Quickstart 2: install, then run the test suite (tiny models + a few SmolLM2 end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
. scripts/env.sh
python -m pytest -q "$@"
