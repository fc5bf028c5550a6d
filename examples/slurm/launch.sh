#!/bin/bash
# Shared launcher for the sbatch scripts in this folder (goku8b.sh, goku2b.sh): they set RECIPE and
# their #SBATCH resources, then source this file. Everything below can be overridden from the
# environment at submission time, e.g.
#   RUN_DIR=/lustre/runs/goku8b-a CONTAINER_IMAGE=/lustre/images/goku.sqsh sbatch examples/slurm/goku8b.sh train.steps=1000
#   DRY_RUN=1 bash examples/slurm/goku8b.sh      # print the launch command and the layout, run nothing
#
# Ranks are srun-native by default (LAUNCHER=srun: one task per GPU, RANK/LOCAL_RANK/WORLD_SIZE
# from SLURM), so SLURM's preemption signal (--signal=USR1@120) reaches every training process,
# which saves a checkpoint and exits with PREEMPT_EXIT_CODE; the job then requeues itself and the
# requeued job resumes from RUN_DIR's latest checkpoint. LAUNCHER=torchrun runs one torchrun per
# node with c10d rendezvous and --max-restarts instead (restarts after a crashed rank).
#
# Weights & Biases: add train.wandb_project=NAME to the overrides and export WANDB_API_KEY before
# sbatch. The key travels by name only (pyxis --container-env=WANDB_API_KEY: the submitting
# environment's value wins over the image's), so it is never on a command line, in the dry run,
# in the logs or in the run directory; a requeued job continues the same W&B run.
set -euo pipefail

: "${RECIPE:?set RECIPE before sourcing launch.sh}"
JOB_NAME=${SLURM_JOB_NAME:-goku}
JOB_ID=${SLURM_JOB_ID:-0}
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
# One run directory per job *name*: a requeued job (same name, same id) finds its checkpoints.
RUN_DIR=${RUN_DIR:-runs/${JOB_NAME}}
LOG_DIR=${LOG_DIR:-logs}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-goku-megatron:ngc}   # pyxis/enroot image or .sqsh file
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$PWD:/workspace/goku-megatron}
CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-/workspace/goku-megatron}
LAUNCHER=${LAUNCHER:-srun}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PREEMPT_EXIT_CODE=${PREEMPT_EXIT_CODE:-99}
OVERRIDES=("$@")

first_host() {
    # The first node of SLURM_JOB_NODELIST ("gpu[001-004,010]" -> gpu001), without scontrol if need be.
    if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
        return
    fi
    local list=${SLURM_JOB_NODELIST:-localhost}
    local head=${list%%,*}
    if [[ $head == *"["* ]]; then
        local prefix=${head%%\[*} range=${head#*\[}
        range=${range%%]*}; range=${range%%,*}
        echo "${prefix}${range%%-*}"
    else
        echo "$head"
    fi
}
MASTER_ADDR=${MASTER_ADDR:-$(first_host)}

TRAIN=(python -m goku_megatron.cli.train --config "$RECIPE" "train.run_dir=$RUN_DIR" "${OVERRIDES[@]}")
if [[ $LAUNCHER == srun ]]; then
    SRUN_TASKS=(--ntasks-per-node "$GPUS_PER_NODE")
    INNER="RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID WORLD_SIZE=\$SLURM_NTASKS MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT exec ${TRAIN[*]}"
elif [[ $LAUNCHER == torchrun ]]; then
    SRUN_TASKS=(--ntasks-per-node 1)
    INNER="exec torchrun --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $JOB_ID --max-restarts $MAX_RESTARTS -m ${TRAIN[*]:2}"
else
    echo "launch.sh: LAUNCHER=$LAUNCHER: use srun or torchrun" >&2
    exit 2
fi
CONTAINER_ENV=()
[[ -n "${WANDB_API_KEY:-}" ]] && CONTAINER_ENV=(--container-env=WANDB_API_KEY)
SRUN=(srun --nodes "$NNODES" "${SRUN_TASKS[@]}" --kill-on-bad-exit=1
      "--container-image=$CONTAINER_IMAGE" "--container-mounts=$CONTAINER_MOUNTS"
      "--container-workdir=$CONTAINER_WORKDIR" "${CONTAINER_ENV[@]}" --output "$LOG_DIR/%x-%j-%t.log"
      bash -c "$INNER")

if [[ -n "${DRY_RUN:-}" ]]; then
    echo "# job $JOB_NAME ($JOB_ID): $NNODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks, launcher $LAUNCHER"
    echo "# run dir $RUN_DIR, logs $LOG_DIR, master $MASTER_ADDR:$MASTER_PORT, container $CONTAINER_IMAGE"
    printf '%q ' "${SRUN[@]}"; echo
    python -m goku_megatron.cli.train --config "$RECIPE" --dry-run --world-size "$WORLD_SIZE" "${OVERRIDES[@]}" \
        | sed -n '/^# parallel layout/,$p'
    exit 0
fi

mkdir -p "$LOG_DIR" "$RUN_DIR"
set +e
"${SRUN[@]}"
status=$?
set -e
if [[ $status -eq $PREEMPT_EXIT_CODE ]]; then
    echo "preempted: checkpoint saved in $RUN_DIR; requeueing job $JOB_ID"
    scontrol requeue "$JOB_ID"
    exit 0
fi
exit $status
