#!/bin/bash
# Train a study's dense model as its own Slurm job (then: sbatch --dependency=afterok:<id> slurm/sweep.sh JOB).
#   sbatch slurm/train.sh jobs/resnet101_cifar10.yaml
# Same PRUNEFLOW_* overrides as slurm/sweep.sh. Dense training resumes from its per-epoch state on requeue.
#
#SBATCH --job-name=pruneflow-train
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=pruneflow-train-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

set -euo pipefail
job=${PRUNEFLOW_JOB:-${1:-jobs/quickstart.yaml}}
out=${PRUNEFLOW_OUT:-results}
if [[ -n "${PRUNEFLOW_CONTAINER:-}" ]]; then
    python=(apptainer exec --nv "$PRUNEFLOW_CONTAINER" python)
elif [[ -n "${PRUNEFLOW_VENV:-}" ]]; then
    python=("$PRUNEFLOW_VENV/bin/python")
else
    python=(python3)
fi
requeue() {
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" || true
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue USR1
"${python[@]}" -u -m pruneflow.sweep "$job" --out "$out" --train-only --noprogress &
child=$!
wait "$child"
