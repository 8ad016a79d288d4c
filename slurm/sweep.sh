#!/bin/bash
# One pruning study as a Slurm job array, no Python needed on the login node:
#
#   sbatch slurm/sweep.sh jobs/resnet101_cifar10.yaml
#   sbatch --array=0-7 --partition=a100 slurm/sweep.sh jobs/resnet101_cifar10.yaml   # 8 shards
#
# Each array task runs shard SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT of the study with
# `python -m pruneflow.sweep` (Ray packs its trials onto the node's GPUs). The first task to need the dense
# checkpoint trains it; the others wait for it (file lock) — or run slurm/train.sh first.
# Command-line sbatch options override the defaults below.
#
# Environment overrides:
#   PRUNEFLOW_JOB        job file (default: first argument, else jobs/quickstart.yaml)
#   PRUNEFLOW_OUT        results root (default: results)
#   PRUNEFLOW_VENV       virtualenv to run in (default: the python3 on PATH)
#   PRUNEFLOW_CONTAINER  Apptainer image: run inside it with `apptainer exec --nv IMAGE python`
#   PRUNEFLOW_ARGS       extra sweep flags, e.g. "--finetune.epochs 1"
#   PRUNEFLOW_SHARDS     shard count (default: the array's size); to re-run some tasks of an 8-task array:
#                        PRUNEFLOW_SHARDS=8 sbatch --array=3,5 slurm/sweep.sh JOB (finished trials are skipped)
#
# Timeouts: Slurm sends SIGUSR1 120 s before the limit (--signal=B:USR1@120, to this batch shell). The
# shell stops the sweep with SIGTERM (finished trials are already in the HDF5 file), requeues this task,
# and the requeued run skips what is done.
#
#SBATCH --job-name=pruneflow-sweep
#SBATCH --array=0-1
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=pruneflow-sweep-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

set -euo pipefail

job=${PRUNEFLOW_JOB:-${1:-jobs/quickstart.yaml}}
out=${PRUNEFLOW_OUT:-results}
index=${SLURM_ARRAY_TASK_ID:-0}
shards=${PRUNEFLOW_SHARDS:-${SLURM_ARRAY_TASK_COUNT:-1}}
if ! [[ "$shards" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: PRUNEFLOW_SHARDS must be a whole number >= 1, got '${shards}'" >&2
    exit 2
fi
if (( index >= shards )); then
    echo "error: array task ${index} is not one of ${shards} shard(s) (--array must count from 0; to re-run some" \
         "tasks of a larger array, give its size: PRUNEFLOW_SHARDS=8 sbatch --array=3,5 slurm/sweep.sh JOB)" >&2
    exit 2
fi
shard="${index}/${shards}"
set -f  # split PRUNEFLOW_ARGS into flags without expanding globs such as [0.5]
# shellcheck disable=SC2206  # PRUNEFLOW_ARGS is a list of flags: split it on purpose
extra=(${PRUNEFLOW_ARGS:-})
set +f

if [[ -n "${PRUNEFLOW_CONTAINER:-}" ]]; then
    python=(apptainer exec --nv "$PRUNEFLOW_CONTAINER" python)
elif [[ -n "${PRUNEFLOW_VENV:-}" ]]; then
    python=("$PRUNEFLOW_VENV/bin/python")
else
    python=(python3)
fi

task="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID:-0}"
echo "pruneflow sweep: job ${job}, shard ${shard}, task ${task}, restart ${SLURM_RESTART_COUNT:-0}, host $(hostname)"

requeue() {
    echo "time limit near: stopping the sweep and requeueing ${task}"
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" || true
    scontrol requeue "$task"
    exit 0
}
trap requeue USR1

# ${extra[@]+...}: bash <= 4.3 (RHEL 7 nodes) calls an empty array unbound under set -u
"${python[@]}" -u -m pruneflow.sweep "$job" --shard "$shard" --out "$out" --noprogress ${extra[@]+"${extra[@]}"} &
child=$!
# `wait` returns early when the USR1 trap fires; the trap then takes over.
wait "$child"
