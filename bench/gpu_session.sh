#!/usr/bin/env bash
# Device calls that measure what the issues ask on GPUs, writing CSV and logs to $OUT (at most 8 files come back):
#   bash bench/gpu_session.sh dump step kl      one GPU:
#     dump   bench_dump.py         serial vs pipelined dump vs bare forward, random Qwen2.5-7B teacher, T = 2048
#     dump_shm                     the same with the shards on tmpfs (the pipeline without the disk)
#     dump_long                    one bf16 shard of 128 examples (the dump's steady state)
#     step   bench_train_step.py   CE-only vs +KV (fused / eager / fed live from the store) student step
#     step_codecs                  the same with the store in bf16, fp8, fp8z, int8 and int4, ROUNDS (5) interleaved
#                                  rounds (issue 16)
#     dump_codecs                  bench_dump.py per store codec bf16, fp8, fp8z, int8, int4 (issue 16: throughput vs bf16's)
#     step_interference            the bf16 step beside a thread reading the store up to each part of the loader
#     kl     bench_attention_kl.py the γ kernel vs the materialised reference and its torch.compile, T = 1k..64k
#     kl_variants                  the same at 4k and 16k (32k Triton only) with every kernel variant's rows
#     fused  bench_fused_loss.py   the fused KV loss at 4k and 16k tokens, two teachers, eager / compile / Triton
#     fused3                       the same with three teachers at 4k and 16k (≈ 9 min: a call of its own)
#     fused4k                      the two-teacher rows at 4k alone (eager, inside torch.compile, replayed as CUDA
#                                  graphs), then the 4k profile (host vs GPU time): the host-bound 4k target, with
#                                  eager's baseline as the host's speed (≈ 1 min on a warm machine; compiling on a
#                                  fresh one takes ≈ 6 more)
#     profile profile_fused_loss.py host vs GPU time of one fused-loss step at 4k
#     profile_compiled             the forward at 4k under torch.compile (two and three teachers), then eager again
#     codecs bench_fused_loss.py --codecs  the fused loss on fp8 / fp8z / int8 / int4 / int4d / low-rank at 16k
#                                  (CODEC_NAMES: the codecs timed beside bf16; CODEC_ROUNDS interleaved rounds,
#                                  default 1; CODEC_BASELINES: codecs whose torch reference is timed too, eager and
#                                  under torch.compile)
#     tune_codecs tune_fused_loss.py  every tile and stage count timed per codec at 16k (TUNE_CODECS: bf16 fp8 int4)
#     ncu    ncu_fused_loss.py     Nsight Compute on one step per codec: details and the weight gradient's SASS (CSV)
#     check_configs check_configs.py  every kernel config and weight-gradient stage count, per codec and shape (the
#                                  bench's, the packaged model's; one process each, in parallel: compiling
#                                  dominates), against float64: one CSV, one log
#     step_codecs, dump_codecs     the training step and the dump on bf16 / fp8 / fp8z / int8 / int4 stores
#   bash bench/gpu_session.sh store_train      Phase 1 trained from a fresh offline store and online, same seed
#   bash bench/gpu_session.sh zero3             ZeRO-3 Phase 1 on 1 and 2 GPUs (same global batch: equal loss
#                                               curves), 4 GPUs (weak scaling) where present
# Each part runs under its own time limit (PART_LIMIT_<name> seconds), so one that hangs leaves the others' numbers.
# Wheels for what the GPU image lacks travel in .whl (deepspeed sdist, hjson, pydantic).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" KVFUSE_COMMIT=${KVFUSE_COMMIT:-}
# Set-up that is already done on this machine (the GPU-scale session's, say) is skipped.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .whl/* \
    > /tmp/install.log 2>&1 || { echo "wheel install failed"; tail -20 /tmp/install.log; exit 1; }
fi
if [ ! -f "kvfuse/_C$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" ]; then
  python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { echo "C++ build failed"; tail -20 /tmp/build.log; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n_gpus=$(nvidia-smi -L | grep -c '^GPU')
STUDENT=${STUDENT:-random:qwen2.5-1.5b}
TEACHER=${TEACHER:-random:qwen2.5-7b}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-32}

part() {  # name command...: run under the part's time limit, log to $OUT/<name>.log, print its tail
  local name=$1 limit_var="PART_LIMIT_$1"; shift
  echo "=== $name ($(date +%T), limit ${!limit_var:-300} s)"
  timeout "${!limit_var:-300}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || echo "$name exited with $rc"
  grep -v -i "warn\|Loading weights" "$OUT/$name.log" | tail -${TAIL:-12}
}
train() {  # gpus effective_batch name: a Phase-1 run, its metrics copied to $OUT/<name>.jsonl
  local runner=(python3 -m deepspeed.launcher.runner --num_gpus "$1" --master_port $((29600 + $1)))
  part "$3" "${runner[@]}" train/main.py --phase 1 --model_name "$STUDENT" --n_samples "$TRAIN_SAMPLES" --n_val 0 \
    --micro_batch 2 --effective_batch "$2" --max_length 4096 --save_every 0 --output_dir "/tmp/runs/$3"
  cp "/tmp/runs/$3/metrics.jsonl" "$OUT/$3.jsonl" 2>/dev/null || return
  python3 - "$OUT/$3.jsonl" "$1" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
tps = [e["tokens_per_s"] for e in ev[2:]] or [e["tokens_per_s"] for e in ev]
print(f"gpus={sys.argv[2]} steps={len(ev)} loss={[round(e['loss'], 5) for e in ev]} "
      f"tokens/s={sum(tps)/len(tps):.0f} per GPU={sum(tps)/len(tps)/int(sys.argv[2]):.0f}")
PY
}

for what in "$@"; do
  case $what in
    dump) part dump python3 -m bench.bench_dump --teacher "$TEACHER" --student "$STUDENT" --seq 2048 --n 16 --batch 4 \
            --repeats 2 --csv "$OUT/dump.csv" ;;
    dump_long)  # one bf16 shard of 128 examples (15 GB): the steady state, with the shard's tail paid once
          PART_LIMIT_dump_long=${PART_LIMIT_dump_long:-400} part dump_long python3 -m bench.bench_dump \
            --teacher "$TEACHER" --student "$STUDENT" --seq 2048 --n 128 --batch 4 --repeats 1 --csv "$OUT/dump.csv" ;;
    dump_shm)   # the same with the shards in memory (tmpfs): the pipeline without the disk
          part dump_shm python3 -m bench.bench_dump --teacher "$TEACHER" --student "$STUDENT" --seq 2048 --n 16 \
            --batch 4 --repeats 2 --store_dir "${SHM_DIR:-/dev/shm}" --csv "$OUT/dump.csv" ;;
    step) part step python3 -m bench.bench_train_step --student "$STUDENT" --batch 4 --seq 2048 --steps 8 \
            --store_prefetch 2 --csv "$OUT/train_step.csv" ;;
    step_codecs) TAIL=40 part step_codecs python3 -m bench.bench_train_step --student "$STUDENT" --batch 4 --seq 2048 \
            --steps 8 --store_prefetch 2 --codecs bf16 fp8 fp8z int8 int4 --rounds ${ROUNDS:-5} --csv "$OUT/train_step_codecs.csv" ;;
    step_interference) TAIL=16 part step_interference python3 -m bench.bench_train_step --student "$STUDENT" \
            --batch 4 --seq 2048 --steps 8 --store_prefetch 2 --interference --csv "$OUT/train_step_interference.csv" ;;
    dump_codecs) TAIL=40 part dump_codecs python3 -m bench.bench_dump --teacher "$TEACHER" --student "$STUDENT" \
            --seq 2048 --n 16 --batch 4 --repeats 2 --codecs bf16 fp8 fp8z int8 int4 --csv "$OUT/dump_codecs.csv" ;;
    fused) TAIL=30 part fused python3 -m bench.bench_fused_loss --out "$OUT" --tokens 4096 16384 --tokens3 ;;
    fused4k) PART_LIMIT_fused4k=${PART_LIMIT_fused4k:-540} TAIL=16 part fused4k python3 -m bench.bench_fused_loss \
            --out "$OUT" --tokens 4096 --tokens3 --variants eager compile triton triton_compile compile_graphs \
            triton_graphs
          TAIL=1 part profile python3 -m bench.profile_fused_loss --out "$OUT" --tokens 4096 ;;
    fused3) PART_LIMIT_fused3=${PART_LIMIT_fused3:-560} TAIL=30 part fused3 python3 -m bench.bench_fused_loss \
            --out "$OUT" --tokens --tokens3 4096 16384 ;;
    profile) TAIL=4 part profile python3 -m bench.profile_fused_loss --out "$OUT" --tokens 4096 ;;
    profile_compiled) for t in 2 3; do TAIL=1 part "profile_compiled_t$t" python3 -m bench.profile_fused_loss \
            --out "$OUT" --tokens 4096 --compiled --fwd --teachers $t; done ;;
    codecs) TAIL=${TAIL:-40} part codecs python3 -m bench.bench_fused_loss --out "$OUT" --codecs 16384 \
            --codec_names ${CODEC_NAMES:-fp8 fp8z int8 int4 int4d lowrank} --rounds ${CODEC_ROUNDS:-1} \
            --baselines ${CODEC_BASELINES:-} ;;
    tune_codecs)  # TUNE_CODECS (bf16 fp8 int4): every tile at its listed and FWD_STAGES / DW_STAGES stage counts,
      # compiled in parallel processes (compiling dominates), then timed one codec after another from triton's cache
      codecs=${TUNE_CODECS:-bf16 fp8 int4}
      stages=(--fwd_stages ${FWD_STAGES:-4} --dw_stages ${DW_STAGES:-4})
      for c in $codecs; do
        timeout "${PART_LIMIT_tune_warm:-300}" python3 -m bench.tune_fused_loss --codec "$c" --out /tmp/tune_warm \
          "${stages[@]}" --warm > "/tmp/tune_warm_$c.log" 2>&1 &
      done
      wait
      for c in $codecs; do
        TAIL=${TAIL:-3} part "tune_$c" python3 -m bench.tune_fused_loss --codec "$c" --out "$OUT" "${stages[@]}"
      done ;;
    ncu)  # NCU_CODECS (bf16 fp8 int4): Nsight Compute's full set on one step's fused-loss kernels (clocks left alone);
      # one details CSV for all, and per codec the SASS page (per-instruction counters) of the key pass and of the
      # first weight-gradient launch: seven files, under the eight that come back
      for c in ${NCU_CODECS:-bf16 fp8 int4}; do  # compile and autotune in parallel first: the profiled runs then hit
        python3 -m bench.ncu_fused_loss --codec "$c" > "/tmp/ncu_warm_$c.log" 2>&1 &   # triton's cache
      done
      wait
      for c in ${NCU_CODECS:-bf16 fp8 int4}; do
        echo "=== ncu $c ($(date +%T))"
        timeout "${PART_LIMIT_ncu:-240}" ncu --clock-control none --profile-from-start off --set full \
          --import-source yes -k regex:_fused_kv -f -o "/tmp/ncu_$c" python3 -m bench.ncu_fused_loss --codec "$c" \
          > "/tmp/ncu_$c.log" 2>&1 || echo "ncu $c exited with $?"
        tail -3 "/tmp/ncu_$c.log"
        { echo "# codec $c"; ncu -i "/tmp/ncu_$c.ncu-rep" --page details --csv; } >> "$OUT/ncu_details.csv" 2>&1
        for k in fwd dw; do
          ncu -i "/tmp/ncu_$c.ncu-rep" --page source --print-source sass --csv -k "regex:_fused_kv_$k" -c 1 \
            > "$OUT/ncu_sass_${k}_$c.csv" 2>&1 || echo "ncu source page of $k for $c failed"
        done
      done ;;
    check_configs)  # CHECKS="codec[:arg,arg..] ...": default the ten codecs, all tiles, weight gradient at 1-4 stages,
      # each at the bench's shapes and at the packaged model's ("fp8:--shape,packaged": head dim 64, ragged rows)
      rm -rf /tmp/check && mkdir -p /tmp/check  # a warm machine keeps /tmp: no earlier call's rows
      codecs="bf16 fp8 fp8_f32 fp8_token fp8z int8 int8_f32 int4 int4d lowrank"
      checks=${CHECKS:-$codecs $(for c in $codecs; do echo "$c:--shape,packaged"; done)}
      for c in $checks; do
        timeout "${PART_LIMIT_check_configs:-420}" python3 -m bench.check_configs --codec "${c%%:*}" --out /tmp/check \
          $([ "$c" != "${c#*:}" ] && echo "${c#*:}" | tr , ' ') > "/tmp/check/${c//[:,]/_}.log" 2>&1 &
      done
      wait
      for c in $checks; do echo "--- $c"; cat "/tmp/check/${c//[:,]/_}.log"; done > "$OUT/check_configs.log"
      python3 -m bench.check_configs --merge "$OUT/check_configs.csv" /tmp/check/check_configs_*.csv
      grep -h "Traceback\|Error" /tmp/check/*.log | head -5 ;;
    kl_variants) TAIL=40 part kl_variants python3 -m bench.bench_attention_kl --out "$OUT" --seqs 4096 16384 \
            --triton-only-seqs 32768 ;;
    kl)   TAIL=30 part kl python3 -m bench.bench_attention_kl --out "$OUT" --seqs 4096 32768 1024 16384 \
            --triton-only-seqs 65536 ;;
    store_train)   # Phase 1 from an offline store (prefetch thread, side stream) vs online teachers, same seed
      part store_dump python3 -m kvfuse dump --teachers "$STUDENT" "$STUDENT" --teacher_prompts default cot \
        --student "$STUDENT" --n_samples 16 --max_length 4096 --out /tmp/store --shard 0/1
      for how in store online; do
        extra=(); [ $how = store ] && extra=(--teacher_store /tmp/store)
        part "train_$how" python3 train/main.py --phase 1 --model_name "$STUDENT" --n_samples 16 --n_val 0 \
          --micro_batch 2 --effective_batch 4 --max_length 4096 --save_every 0 --output_dir "/tmp/runs/$how" "${extra[@]}"
        python3 -c "import json,sys; ev=[json.loads(l) for l in open(sys.argv[1]) if '\"train\"' in l]; \
print(sys.argv[2], [round(e['kv_loss'], 6) for e in ev], [round(e['tokens_per_s']) for e in ev])" \
          "/tmp/runs/$how/metrics.jsonl" "$how"
      done ;;
    zero3)
      train 1 4 zero3_g1
      [ "$n_gpus" -ge 2 ] && train 2 4 zero3_g2
      [ "$n_gpus" -ge 4 ] && train 4 8 zero3_g4 ;;
    *) echo "unknown part $what (dump|dump_long|dump_shm|step|step_codecs|step_interference|dump_codecs|kl|kl_variants|fused|fused3|profile|profile_compiled|codecs|check_configs|store_train|zero3)"; exit 2 ;;
  esac
done
echo "=== done ($(date +%T))"
