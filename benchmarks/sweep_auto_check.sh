#!/usr/bin/env bash
# A user's first sweep on a GPU node, checked where a GPU is lent:   bash benchmarks/sweep_auto_check.sh OUTDIR
#
# 1. `pruneflow.sweep` with no dense checkpoint and trials_per_gpu: auto: the dense model trains in a process
#    of its own (pruneflow.isolated), so the sweep's driver must hold no GPU memory while trials run;
# 2. the same study grown by one sparsity: the memory probe's result is reused (packing-probe.json), not measured
#    again.
# nvidia-smi's per-process memory, sampled every 0.5 s, is kept in OUTDIR/apps.csv; the summary prints each
# process's largest use and whether the drivers appear. DEVICE=cpu runs the same sweeps without a GPU.
set -u
out=${1:-results/sweep-auto-check}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
smi=""
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv,noheader -lms 500 \
        > "$out/apps.csv" 2>&1 &
    smi=$!
fi
common=(jobs/quickstart.yaml --out "$out/results" --resources.device "$device" --resources.trials_per_gpu auto
        --prune.methods '[l1]' --noprogress)
drivers=()
for sparsities in '[0.5]' '[0.5, 0.9]'; do
    echo "== sweep with sparsities $sparsities"
    "$py" -m pruneflow.sweep "${common[@]}" --prune.sparsities "$sparsities" &
    drivers+=("$!")
    wait "$!"
    echo "exit $? (driver pid ${drivers[-1]})"
done
[ -n "$smi" ] && kill "$smi"
if [ -f "$out/results/quickstart/packing-probe.json" ]; then
    echo "== packing-probe.json"
    cat "$out/results/quickstart/packing-probe.json"
fi
if [ -n "$smi" ]; then
    echo "== GPU memory per process, MiB (largest sample); drivers: ${drivers[*]}"
    awk -F', ' '{m = $4 + 0; if (m > max[$2]) max[$2] = m; name[$2] = $3}
                END {for (p in max) print p, name[p], max[p]}' "$out/apps.csv" | sort -n
    for pid in "${drivers[@]}"; do
        if awk -F', ' -v p="$pid" '$2 == p {found = 1} END {exit !found}' "$out/apps.csv"; then
            echo "driver $pid held GPU memory"
        else
            echo "driver $pid held no GPU memory"
        fi
    done
fi
