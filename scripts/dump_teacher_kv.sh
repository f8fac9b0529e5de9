#!/usr/bin/env bash
# Offline teacher-KV dump as a SLURM job array: one array task = one shard of the store.
#
#   sbatch --array=0-99 scripts/dump_teacher_kv.sh --out /scratch/kv --teachers A B --teacher_prompts cot cot \
#          --student S [any other `python -m kvfuse dump` flag]
#
# Shard I of N comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (override N with KVFUSE_N_SHARDS when the
# array is a subset, e.g. resubmitting only failed tasks with --array=7,42). Finished shards are skipped, so
# resubmitting the whole array after a failure redoes only what is missing. KVFUSE_PYTHON picks the interpreter.
#SBATCH --job-name=kvfuse-dump
#SBATCH --output=kvfuse-dump-%A_%a.out
#SBATCH --cpus-per-task=1
set -euo pipefail
task=${SLURM_ARRAY_TASK_ID:?run under sbatch --array=0-(N-1)}
count=${KVFUSE_N_SHARDS:-${SLURM_ARRAY_TASK_COUNT:?run under sbatch --array}}
python=${KVFUSE_PYTHON:-python3}
echo "kvfuse dump: shard ${task}/${count} on $(hostname) (job ${SLURM_ARRAY_JOB_ID:-?})"
exec "$python" -m kvfuse dump --shard "${task}/${count}" "$@"
