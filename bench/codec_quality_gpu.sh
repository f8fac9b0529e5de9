#!/usr/bin/env bash
# Phase 1 (PHASE=2: Phase 2) trained from bf16 / fp8 / int4 / int4d stores at a size the CPU cannot reach
# (`codec_quality distill --items`), on the packaged SmolLM2 staged by bench/stage_models.py. The same command every
# device call (idempotent, as the GPU-scale session's): take the call's pieces, then, once SmolLM2 is converted, start
# one detached runner (stores first, then the trainers of RUNS in parallel, below), wait up to --wait seconds, and
# always put what exists into $OUT (the table, and one tar of every run's metrics and config).
#   bash bench/codec_quality_gpu.sh [.stage/callNN] [--wait SECONDS]
# ITEMS ("128 32": train and validation items), CODECS, SEEDS override the defaults. RUNS ("int8:0,1 fp8:2") sets
# the trainers instead: one process per entry, its seeds one after another (default: one per codec, every seed).
set -uo pipefail
CALL_DIR="" WAIT=0
while [ $# -gt 0 ]; do
  case $1 in
    --wait) WAIT=$2; shift 2 ;;
    *) CALL_DIR=$1; shift ;;
  esac
done
OUT=${OUT:-/tmp/out} PHASE=${PHASE:-1} ITEMS=${ITEMS:-128 32}
CODECS=${CODECS:-bf16 fp8 int4 int4d} SEEDS=${SEEDS:-0 1 2}
if [ -z "${RUNS:-}" ]; then
  RUNS=$(for c in $CODECS; do printf '%s:%s ' "$c" "${SEEDS// /,}"; done)
else  # the stores and the table cover what the runs train; bf16's store is every run's validation reference
  CODECS=$(printf '%s\n' bf16 $RUNS | cut -d: -f1 | awk '!seen[$0]++' | xargs)
  SEEDS=$(printf '%s\n' $RUNS | cut -s -d: -f2 | tr , '\n' | sort -un | xargs)
fi
export KVFUSE_STAGE=$HOME/kvfuse-stage KVFUSE_CACHE=$HOME/.cache/kvfuse
export PYTHONPATH="$KVFUSE_STAGE/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=$HOME/codec_quality/p${PHASE}_items_${ITEMS// /x}
mkdir -p "$OUT" "$WORK"
echo "=== $(date +%T) $(nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader)"
if [ -n "$CALL_DIR" ]; then
  python3 -m bench.stage_models receive "$CALL_DIR" --wait 150 || { echo "staging failed"; exit 1; }
fi
if [ ! -f "kvfuse/_C$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" ]; then
  python3 setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 || { echo "C++ build failed"; tail -20 "$WORK/build.log"; exit 1; }
fi
ready=$(python3 -c "from bench.gpu_scale import models_ready; print(int(models_ready({'smollm2-135m-instruct'})))")
if [ "$ready" != 1 ]; then
  python3 -m bench.stage_models status
elif kill -0 "$(cat "$WORK/runner.pid" 2> /dev/null)" 2> /dev/null; then
  echo "runner running (pid $(cat "$WORK/runner.pid")); log $WORK/runner.log"
elif [ ! -f "$WORK/done" ]; then
  read -r n_train n_val <<< "$ITEMS"
  setsid bash -c "
    python3 -c 'from pathlib import Path; from bench.codec_quality import _prepare; \
_prepare(Path(\"$WORK\"), $PHASE, \"$CODECS\".split(), 8, ($n_train, $n_val))' || exit 1
    for run in $RUNS; do
      c=\${run%%:*} seeds=\${run#*:}
      python3 -m bench.codec_quality distill --phases $PHASE --codecs bf16 \$c --train \$c --seeds \${seeds//,/ } \
        --items $ITEMS --out $WORK > $WORK/train-\$c-\${seeds//,/_}.log 2>&1 &
    done
    wait
    python3 -m bench.codec_quality summarise --phases $PHASE --codecs $CODECS --seeds $SEEDS --items $ITEMS --out $WORK \
      && touch $WORK/done" > "$WORK/runner.log" 2>&1 < /dev/null &
  echo $! > "$WORK/runner.pid"
  echo "runner started (pid $!): $RUNS, items $ITEMS"
fi
deadline=$((SECONDS + WAIT))
while [ $SECONDS -lt $deadline ] && kill -0 "$(cat "$WORK/runner.pid" 2> /dev/null)" 2> /dev/null; do sleep 10; done
tail -5 "$WORK/runner.log" 2> /dev/null
for f in "$WORK"/train-*.log; do [ -f "$f" ] && echo "--- $(basename "$f")" && grep -E "^train|^  [0-9]+ s|failed" "$f"; done
cp bench/results/codec_distill_*.csv "$OUT/" 2> /dev/null
(cd "$WORK" && tar czf "$OUT/codec_quality_runs.tgz" --ignore-failed-read p$PHASE-*/metrics.jsonl p$PHASE-*/config.yaml \
  ./*.log 2> /dev/null)
echo "=== $(date +%T) done"
