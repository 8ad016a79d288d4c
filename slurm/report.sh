#!/bin/bash
# Figures and summary.md of a study once its shards are done:
#   sbatch --dependency=afterany:<sweep array id> slurm/report.sh results/<study>
#
#SBATCH --job-name=pruneflow-report
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=pruneflow-report-%j.out

set -euo pipefail
study=${1:?usage: sbatch slurm/report.sh results/<study>}
if [[ -n "${PRUNEFLOW_CONTAINER:-}" ]]; then
    exec apptainer exec --nv "$PRUNEFLOW_CONTAINER" python -m pruneflow.report "$study"
elif [[ -n "${PRUNEFLOW_VENV:-}" ]]; then
    exec "$PRUNEFLOW_VENV/bin/python" -m pruneflow.report "$study"
else
    exec python3 -m pruneflow.report "$study"
fi
