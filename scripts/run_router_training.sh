#!/usr/bin/env bash
# Phase 4 router training under SLURM (same launch as run_multi_teacher.sh):
#
#   sbatch scripts/run_router_training.sh --router_type learnable --entropy_weight 0.01
#
# --router_type fixed|similarity|learnable, --entropy_weight and every other train/main.py flag pass through.
#SBATCH --job-name=kvfuse-router
#SBATCH --ntasks-per-node=1
#SBATCH --output=kvfuse-router-%j.out
set -euo pipefail
root=${KVFUSE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
exec bash "$root/scripts/run_multi_teacher.sh" --phase 4 "$@"
