#!/usr/bin/env bash
# Quickstart 1: install, then run the default pipeline (SmolLM2-135M, ShortGPT -8 layers) end to end,
# offline, with `dvc repro`. Extra arguments go to `dvc repro` (e.g. a stage name, or --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
. scripts/env.sh
time dvc repro "$@"
dvc metrics show
echo "report: reports/report.md"
