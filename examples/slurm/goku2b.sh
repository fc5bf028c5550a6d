#!/bin/bash
# Goku-2B joint image+video training (goku_megatron/recipes/goku-2b.yaml) on 4 nodes x 8 H100s.
#   sbatch examples/slurm/goku2b.sh [key=value overrides...]
#   DRY_RUN=1 bash examples/slurm/goku2b.sh       # launch command and parallel layout only
# See launch.sh for the environment variables (container image, mounts, run dir, launcher).
#SBATCH --job-name=goku2b
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
RECIPE=${RECIPE:-goku-2b}
# sbatch runs a copy of this script from its spool folder: find launch.sh in the submit folder.
HERE=$(dirname "${BASH_SOURCE[0]}")
[[ -f $HERE/launch.sh ]] || HERE=${SLURM_SUBMIT_DIR:-.}/examples/slurm
source "$HERE/launch.sh"
