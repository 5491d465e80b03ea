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
# Two workers (one per core of the reference 2-core machine), a test file per worker at a time (module fixtures
# built once), one BLAS thread each so the workers do not oversubscribe the cores. PYTEST_WORKERS=0: one process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
