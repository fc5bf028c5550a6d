#!/bin/bash
# Goku-8B joint image+video training (goku_megatron/recipes/goku-8b.yaml) on 8 nodes x 8 H100s.
#   sbatch examples/slurm/goku8b.sh [key=value overrides...]
#   DRY_RUN=1 bash examples/slurm/goku8b.sh       # launch command and parallel layout only
# See launch.sh for the environment variables (container image, mounts, run dir, launcher).
#SBATCH --job-name=goku8b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
RECIPE=${RECIPE:-goku-8b}
# sbatch runs a copy of this script from its spool folder: find launch.sh in the submit folder.
HERE=$(dirname "${BASH_SOURCE[0]}")
[[ -f $HERE/launch.sh ]] || HERE=${SLURM_SUBMIT_DIR:-.}/examples/slurm
source "$HERE/launch.sh"
