#!/usr/bin/env bash
# The benchmarks on one GPU, as quoted in docs/benchmarks.md:   bash benchmarks/gpu_suite.sh OUTDIR [STEP ...]
# Each step is time-boxed so that one slow step cannot eat the others' time on a borrowed machine (up to 39 min
# in all: name a few STEPs to fit a shorter lease); every step's output is kept in OUTDIR/<step>.txt,
# and the packing study's results files in OUTDIR/packing-study.
# On a machine without Ray/Torch-Pruning/Fire, carry the wheels that benchmarks/device_wheels.sh fetches.
set -u
out=${1:-results/gpu-suite}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | sed 's/^/cpus: /' | tee -a "$out/gpu.txt"

steps=" ${*:2} "
step() {  # step NAME SECONDS COMMAND...: runs when no STEP was named, or this one was
    local name=$1 limit=$2
    shift 2
    [ "$steps" = "  " ] || [[ "$steps" == *" $name "* ]] || return 0
    echo "== $name ($limit s at most): $*"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit $?" >> "$out/$name.txt"
    grep -v '^\s*$' "$out/$name.txt" | tail -n 25
}

# the whole training step recorded as one CUDA graph trains as eager steps do (skipped without CUDA)
step step-graph-tests 90 "$py" -m pytest -q -p no:cacheprovider tests/test_step_graph.py
step throughput 100 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4
step compile 200 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4 \
    --models simple_cnn,resnet18,resnet101 --compile cudagraphs,reduce-overhead
# bf16 autocast inside the recorded step: the lever left for ResNet-101 (CIFAR stem), bound by TF32 arithmetic
step compile-bf16 240 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4 \
    --models resnet101,resnet18 --compile cudagraphs,reduce-overhead --precision bf16
step graph 180 "$py" benchmarks/train_throughput.py --device cuda --images 8192 --workers 4 \
    --models simple_cnn,resnet18,resnet101 --compile cudagraphs,reduce-overhead
# the 2022 report's own model (ImageNet stem: 1x1-2x2 maps on 32x32 images, more launch-bound still)
step compile-seed-stem 200 "$py" benchmarks/train_throughput.py --device cuda --images 16384 --workers 4 \
    --stem imagenet --models resnet18,resnet101 --compile cudagraphs,reduce-overhead
step packing 200 "$py" benchmarks/packing.py --device cuda --keep "$out/packing-study"
# the same with each training step one CUDA graph (a trial alone keeps the GPU busier, so packing gains less)
step packing-graph 270 "$py" benchmarks/packing.py --device cuda --compile cudagraphs --ks 1,4,8,auto
step projection 240 "$py" benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda  # the job's compile
step projection-bf16 240 "$py" benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda --precision bf16
step latency 60 "$py" benchmarks/latency.py --device cuda
# what pruning buys per runtime: eager vs torch.compile (CUDA graphs, the faster of reduce-overhead and
# max-autotune) at batch 1/64/256 (add onnxruntime to --runtimes where onnxruntime-gpu is installed)
step deploy 420 "$py" benchmarks/deploy_latency.py --device cuda --models resnet18,resnet101 --batches 1,64,256 \
    --runtimes eager,compiled
# a user's first sweep: dense training in its own process (the driver must hold no GPU memory), the auto-packing
# probe measured once and reused by the grown study (benchmarks/sweep_auto_check.sh)
step sweep-auto 200 bash benchmarks/sweep_auto_check.sh "$out/sweep-auto"
# Only when named: packing under NVIDIA MPS (a job-private daemon), whose kernels from several processes run
# side by side instead of time-sliced: the lever the packing target (span <= 1.1 x ideal) points to.
if [[ "$steps" == *" packing-mps "* ]]; then
    CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d)
    CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
    export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d && step packing-mps 240 "$py" benchmarks/packing.py --device cuda --ks 1,4,8
    echo quit | nvidia-cuda-mps-control
fi
