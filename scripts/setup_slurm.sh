#!/usr/bin/env bash
# The tests start a real one-node SLURM cluster (scripts/slurm_local.py); install Debian's slurm-wlm and munge
# when they are missing (needs root, as on the project's machines and CI).
set -euo pipefail
if command -v sbatch >/dev/null && command -v munged >/dev/null && command -v slurmctld >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "SLURM is not installed and this is not root: run 'apt-get install -y slurm-wlm munge' as root" >&2
  exit 1
fi
echo "set-up: installing Debian's slurm-wlm and munge for the SLURM tests (once; about 1 min)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
