#!/usr/bin/env bash
# Quickstart 2: install, then run the test suite (tiny models + a few SmolLM2 end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# A real single-node SLURM (Debian's packages) for tests/sweep; started by the test itself, on localhost only.
if ! command -v slurmctld >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge) >/dev/null \
    || echo "warning: could not install slurm-wlm and munge; tests/sweep will skip" >&2
fi
. "${VENV:-.venv}/bin/activate"
. scripts/env.sh
python -m pytest -q "$@"
