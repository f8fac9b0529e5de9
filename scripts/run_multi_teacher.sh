#!/usr/bin/env bash
# Multi-teacher KV distillation under SLURM: one `deepspeed` launch per job, over every node of the allocation.
#
#   sbatch --nodes=2 --gres=gpu:8 scripts/run_multi_teacher.sh --phase 3 --teachers ckpt1 ckpt2 ckpt3 --n_samples 1000
#
# Every flag goes to train/main.py unchanged. One node: `deepspeed --num_gpus G`. Several nodes: a hostfile built
# from SLURM_JOB_NODELIST (G slots each) and DeepSpeed's slurm launcher (srun), master on the first node.
# G = KVFUSE_GPUS_PER_NODE, else the GPUs nvidia-smi lists; with none, KVFUSE_CPU_RANKS (default 2) gloo ranks on
# the CPU. KVFUSE_ROOT is the checkout (default: the submit directory).
#SBATCH --job-name=kvfuse-train
#SBATCH --ntasks-per-node=1
#SBATCH --output=kvfuse-train-%j.out
set -euo pipefail
root=${KVFUSE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
deepspeed_bin=${KVFUSE_DEEPSPEED:-deepspeed}
gpus=${KVFUSE_GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
if [ "${gpus:-0}" -eq 0 ]; then
  export DS_ACCELERATOR=cpu
  gpus=${KVFUSE_CPU_RANKS:-2}
fi
port=${KVFUSE_MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
nodes=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?run under sbatch}")
n_nodes=$(echo "$nodes" | wc -l)
echo "kvfuse train: job ${SLURM_JOB_ID:-?}, ${n_nodes} node(s) × ${gpus} rank(s), args: $*"
cd "$root"
if [ "$n_nodes" -eq 1 ]; then
  exec "$deepspeed_bin" --num_gpus "$gpus" --master_port "$port" "$root/train/main.py" "$@"
fi
hostfile="$root/.kvfuse-hostfile-${SLURM_JOB_ID}"
echo "$nodes" | sed "s/\$/ slots=${gpus}/" > "$hostfile"
exec "$deepspeed_bin" --hostfile "$hostfile" --launcher slurm --master_addr "$(echo "$nodes" | head -n1)" \
  --master_port "$port" "$root/train/main.py" "$@"
