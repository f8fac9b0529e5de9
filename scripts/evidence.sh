#!/usr/bin/env bash
# The runs behind docs/RESULTS.md, on the packaged real models and GSM8K, CPU (2 cores) unless a GPU is present.
#   bash scripts/evidence.sh phase1|phase2|dumps|routers|control [extra train/main.py flags for control]
#   bash scripts/evidence.sh seeds PHASE SEED...   (the phase preset under each seed, then mean ± std)
#   SEED=1 bash scripts/evidence.sh control         (the control under another seed)
#   SEEDS="0 1 2" bash scripts/evidence.sh routers|zspace   (each setup under each seed, then mean ± std)
#   EXTRA="--lr_full 1e-5" TAG=lr1e-5 bash scripts/evidence.sh ...   (extra train flags for every run; TAG names
#                                                                       the run directories apart)
# Each writes runs/evidence/<name>/ (report.html, metrics.jsonl) and prints the numbers RESULTS.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
out=runs/evidence
tag=${TAG:+-$TAG}
read -r -a extra <<< "${EXTRA:-}"
train() {  # a finished run's ZeRO checkpoints (GBs each, optimizer state included) are not evidence: drop them
  "$PY" train/main.py "$@" "${extra[@]}"
  for run in $out/*/; do [ -f $run/report.html ] && rm -rf $run/checkpoints; done; true
}
summary() {  # run_dir: its evaluations step by step (router numbers: scripts/compare_runs.py)
  "$PY" - "$1" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
val = [e for e in ev if e["split"] == "val"]
for e in val:
    extra = "".join(f" {k}={e[k]:.3f}" for k in ("accuracy", "rouge_l", "bleu") if k in e)
    print(f"  step {e['step']:3d}  val kv {e['kv_loss']:.5f}  train kv {e['train_kv_loss']:.5f}  "
          f"gap {100 * e['gap']:+.1f}%  val ppl {e['ppl']:.3f}{extra}")
PY
}
compare() {  # run_dir...: side by side, the first and last validation events of each run
  "$PY" - "$@" <<'PY'
import json, sys
print(f"{'run':28s} {'val kv first→last':>22s} {'val ppl first→last':>20s} {'acc':>5s} {'rougeL':>7s}")
for run in sys.argv[1:]:
    val = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"val"' in l]
    a, b = val[0], val[-1]
    print(f"{run.split('/')[-1]:28s} {a['kv_loss']:9.5f} → {b['kv_loss']:9.5f} {a['ppl']:9.4f} → {b['ppl']:8.4f} "
          f"{b.get('accuracy', float('nan')):5.2f} {b.get('rouge_l', float('nan')):7.3f}")
PY
}
case "${1:?phase1|phase2|dumps|routers|zspace|control|phase0|phase3}" in
  phase0|phase1|phase2|phase3)
    train --phase "${1#phase}" --output_dir $out/$1$tag && summary $out/$1$tag ;;
  dumps)
    "$PY" -m kvfuse dump --teachers smollm2-135m-instruct smollm2-135m-instruct --teacher_prompts default cot \
      --student smollm2-135m-instruct --n_samples 64 --out $out/store-phase1 --shard 0/1
    "$PY" -m kvfuse dump --teachers smollm2-135m-instruct gemma3-270m --teacher_prompts cot cot \
      --student smollm2-135m-instruct --student_layers every_other --n_samples 64 --out $out/store-cross --shard 0/1 ;;
  control)
    # Single-teacher (the CoT teacher alone) vs multi-teacher (default + CoT, α = [0.7, 0.3]): same student, data,
    # seed and steps; only the teachers differ.
    shift
    seed=${SEED:-0}
    single=$out/control-single$tag-seed$seed multi=$out/control-multi$tag-seed$seed
    [ -f $single/report.html ] || train --phase 1 --seed $seed --teacher_prompts cot --alpha 1.0 \
      --output_dir $single "$@"
    [ -f $multi/report.html ] || train --phase 1 --seed $seed --output_dir $multi "$@"
    compare $single $multi ;;
  seeds)
    phase=${2:?phase}; shift 2
    dirs=()
    for seed in "$@"; do
      dir=$out/phase$phase$tag-seed$seed
      [ -f $dir/report.html ] || train --phase "$phase" --seed "$seed" --output_dir $dir
      dirs+=($dir)
    done
    "$PY" scripts/compare_runs.py "phase $phase$tag=$(IFS=,; echo "${dirs[*]}")" ;;
  routers)
    # SEEDS="0 1 2" bash scripts/evidence.sh routers: each router under each seed, then mean ± std per router.
    groups=()
    for router in fixed similarity learnable; do
      dirs=""
      for seed in ${SEEDS:-0}; do
        dir=$out/router-$router$tag-seed$seed
        [ -f $dir/report.html ] || train --phase 4 --router_type $router --seed $seed --n_generate 2 \
          --generate_max_new_tokens 64 --output_dir $dir
        summary $dir
        dirs+=$dir,
      done
      groups+=("$router=$dirs")
    done
    "$PY" scripts/compare_runs.py "${groups[@]}" ;;
  zspace)
    # Head-to-head adapters (Phase 3) vs the common space Z (Phase 5) on the same cross-architecture pair, data,
    # α = [0.5, 0.5] and steps, under SEEDS="0 1 2"; compared by the adapter-free KV CKA and the gradient norms.
    head="" z=""
    for seed in ${SEEDS:-0}; do
      [ -f $out/zcmp-head$tag-seed$seed/report.html ] || train --phase 3 --seed $seed \
        --n_generate 1 --output_dir $out/zcmp-head$tag-seed$seed
      [ -f $out/zcmp-z$tag-seed$seed/report.html ] || train --phase 5 --seed $seed --alpha 0.5 0.5 \
        --n_generate 1 --output_dir $out/zcmp-z$tag-seed$seed
      head+=$out/zcmp-head$tag-seed$seed, z+=$out/zcmp-z$tag-seed$seed,
    done
    "$PY" scripts/compare_runs.py "head-to-head (Phase 3)=$head" "Z space (Phase 5)=$z" ;;
esac
