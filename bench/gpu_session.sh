#!/usr/bin/env bash
# One device call that measures what the issues ask on GPUs, writing CSV and logs to $OUT:
#   1. bench_train_step.py  CE-only vs +KV (fused / eager) student step, random Qwen2.5-1.5B student
#   2. bench_dump.py        dump vs bare forward, random Qwen2.5-7B teacher at T = 2048; reader throughput
#   3. train/main.py        ZeRO-3 on 1, 2 (same global batch: equal loss curves) and up to 4 GPUs (weak scaling)
# Wheels for what the GPU image lacks travel in .whl (deepspeed sdist, hjson, pydantic).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .whl/* \
  > "$OUT/install.log" 2>&1 || { echo "wheel install failed"; tail -20 "$OUT/install.log"; exit 1; }
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "C++ build failed"; tail -20 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
n_gpus=$(nvidia-smi -L | grep -c '^GPU')
STUDENT=${STUDENT:-random:qwen2.5-1.5b}
TEACHER=${TEACHER:-random:qwen2.5-7b}
STEP_SEQ=${STEP_SEQ:-2048}
DUMP_SEQ=${DUMP_SEQ:-2048}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-32}

part() { echo "=== $1 ($(date +%T))"; }
part "train step"
python3 bench/bench_train_step.py --student "$STUDENT" --batch 4 --seq "$STEP_SEQ" --steps 8 \
  --csv "$OUT/train_step.csv" 2>&1 | tee "$OUT/train_step.log" | tail -6
part "dump"
python3 bench/bench_dump.py --teacher "$TEACHER" --student "$STUDENT" --seq "$DUMP_SEQ" --n 8 --batch 4 \
  --repeats 2 --csv "$OUT/dump.csv" 2>&1 | tee "$OUT/dump.log" | tail -7
train() {  # gpus effective_batch name
  local runner=(python3 -m deepspeed.launcher.runner --num_gpus "$1" --master_port $((29600 + $1)))
  "${runner[@]}" train/main.py --phase 1 --model_name "$STUDENT" --n_samples "$TRAIN_SAMPLES" --n_val 0 \
    --micro_batch 2 --effective_batch "$2" --max_length 4096 --save_every 0 --output_dir "$OUT/$3" \
    > "$OUT/$3.log" 2>&1 || { echo "training $3 failed"; grep -v Warning "$OUT/$3.log" | tail -15; }
  python3 - "$OUT/$3/metrics.jsonl" "$1" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
tps = [e["tokens_per_s"] for e in ev[2:]] or [e["tokens_per_s"] for e in ev]
print(f"gpus={sys.argv[2]} steps={len(ev)} loss={[round(e['loss'], 5) for e in ev]} "
      f"tokens/s={sum(tps)/len(tps):.0f} per GPU={sum(tps)/len(tps)/int(sys.argv[2]):.0f}")
PY
}
part "ZeRO-3 1 GPU"; train 1 4 zero3_g1
[ "$n_gpus" -ge 2 ] && { part "ZeRO-3 2 GPUs"; train 2 4 zero3_g2; }
[ "$n_gpus" -ge 4 ] && { part "ZeRO-3 4 GPUs (weak)"; train 4 8 zero3_g4; }
part "done"
