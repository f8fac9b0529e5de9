#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, on the packaged real models and GSM8K, CPU (2 cores) unless a GPU is present.
#   bash scripts/evidence.sh phase1|phase2|dumps|routers
# Each writes runs/evidence/<name>/ (report.html, metrics.jsonl) and prints the numbers RESULTS.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
out=runs/evidence
summary() {  # run_dir
  "$PY" - "$1" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
val = [e for e in ev if e["split"] == "val"]
for e in val:
    extra = "".join(f" {k}={e[k]:.3f}" for k in ("accuracy", "rouge_l", "bleu") if k in e)
    print(f"  step {e['step']:3d}  val kv {e['kv_loss']:.5f}  train kv {e['train_kv_loss']:.5f}  "
          f"gap {100 * e['gap']:+.1f}%  val ppl {e['ppl']:.3f}{extra}")
routers = [e for e in ev if e["split"] == "router"]
if routers:
    import statistics
    a = routers[-1]["alpha"]
    flat = [row if not isinstance(row[0], list) else [sum(c) / len(row) for c in zip(*row)] for row in a]
    print(f"  router entropy first/last {routers[0]['entropy']:.3f} / {routers[-1]['entropy']:.3f}; "
          f"alpha spread (std over samples of alpha_0) {statistics.pstdev(r[0] for r in flat):.3f}")
PY
}
case "${1:?phase1|phase2|dumps|routers}" in
  phase1)
    "$PY" train/main.py --phase 1 --output_dir $out/phase1 && summary $out/phase1 ;;
  phase2)
    "$PY" train/main.py --phase 2 --output_dir $out/phase2 && summary $out/phase2 ;;
  dumps)
    "$PY" -m kvfuse dump --teachers smollm2-135m-instruct smollm2-135m-instruct --teacher_prompts default cot \
      --student smollm2-135m-instruct --n_samples 64 --out $out/store-phase1 --shard 0/1
    "$PY" -m kvfuse dump --teachers smollm2-135m-instruct gemma3-270m --teacher_prompts cot cot \
      --student smollm2-135m-instruct --student_layers every_other --n_samples 64 --out $out/store-cross --shard 0/1 ;;
  routers)
    for router in fixed similarity learnable; do
      "$PY" train/main.py --phase 4 --router_type $router --n_samples 16 --n_val 4 --epochs 1 --n_generate 2 \
        --generate_max_new_tokens 64 --output_dir $out/router-$router && summary $out/router-$router
    done ;;
esac
