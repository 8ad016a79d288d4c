#!/usr/bin/env bash
# The benchmarks on one GPU, as quoted in docs/benchmarks.md:   bash benchmarks/gpu_suite.sh OUTDIR
# Each step is time-boxed so that one slow step cannot eat the others' time on a borrowed machine; every
# step's output is kept in OUTDIR/<step>.txt, and the packing study's results files in OUTDIR/packing-study.
set -u
out=${1:-results/gpu-suite}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | sed 's/^/cpus: /' | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s at most): $*"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit $?" >> "$out/$name.txt"
    grep -v '^\s*$' "$out/$name.txt" | tail -n 25
}

step throughput 100 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4
step compile 150 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4 \
    --models simple_cnn,resnet18 --compile reduce-overhead
step packing 200 "$py" benchmarks/packing.py --device cuda --keep "$out/packing-study"
step projection 170 "$py" benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda
step latency 60 "$py" benchmarks/latency.py --device cuda
