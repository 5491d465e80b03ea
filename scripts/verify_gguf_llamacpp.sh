#!/usr/bin/env bash
# Perplexity of exported GGUF files under llama.cpp (through its Python binding, llama-cpp-python,
# compiled here from its source package) next to transformers' on the same token windows.
#
#   bash scripts/verify_gguf_llamacpp.sh --build-only                 # build the binding (once)
#   bash scripts/verify_gguf_llamacpp.sh results/export/x.json A.gguf:ckpt_dir [B.gguf:ckpt_dir ...]
#
# The binding is built into its own virtual environment ($LAYERFOLD_LLAMACPP_VENV, default
# /tmp/layerfold-llamacpp), never into the project's: it compiles llama.cpp (C/C++, CPU backend, gcc + cmake),
# which takes tens of minutes on 2 shared cores (docs/export.md), so it is not part of CI. The transformers side runs in the
# project's environment; the two processes share the token windows through a file, so both score exactly
# the same tokens (see scripts/verify_gguf_llamacpp.py).
set -euo pipefail

LLAMACPP_VERSION="${LAYERFOLD_LLAMACPP_VERSION:-0.3.36}"
VENV="${LAYERFOLD_LLAMACPP_VENV:-/tmp/layerfold-llamacpp}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

build() {
  if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMACPP_VERSION')" 2>/dev/null; then
    return
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # --no-binary: build from the sdist (PyPI ships no CPU wheel for Linux); the CPU backend is the default.
  # GGML_NATIVE=OFF keeps the build portable across x86-64 machines of this kind (AVX2 and the like stay on);
  # LLAVA_BUILD=OFF skips the multimodal library (51 of the 178 objects), which perplexity does not use.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    nice -n 10 "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION"
  "$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
}

build
if [[ "${1:-}" == "--build-only" ]]; then
  exit 0
fi
exec python "$HERE/verify_gguf_llamacpp.py" --llamacpp-python "$VENV/bin/python" --out "$@"
