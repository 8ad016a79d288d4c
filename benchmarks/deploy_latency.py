"""What pruning buys in the runtimes models are deployed with: eager, torch.compile and ONNX Runtime, side by side.

    python benchmarks/deploy_latency.py                 # SimpleCNN, ResNet-18, ResNet-101 (CIFAR stem); batch 1, 64, 256
    python benchmarks/deploy_latency.py --quick         # CI-sized: SimpleCNN, L1 0.5, batch 1 and 8
    python benchmarks/deploy_latency.py --device cuda --runtimes eager,compiled --batches 64,256
    python benchmarks/deploy_latency.py --models resnet18 --sparsities 0.5 --batches 64 --runtimes eager,onnxruntime

DepGraph L1 at each sparsity with widths in multiples of --round-to (8). Each row: the pruned model and the dense
one timed alternately, call by call, in the same runtime (pruneflow.infer.deploy, as a sweep's trials do); speedup =
median per-pair ratio [95 % bootstrap]; efficiency = speedup / MAC reduction (1: time shrank as much as the
arithmetic). Targets (issue 30): ONNX Runtime on a 2-core CPU >= 0.8 at ~4x fewer MACs (ResNet-18, batch 64);
compiled on an H200 >= 0.6 at ~4x fewer MACs, batch 256. A runtime that cannot run here prints its reason.
"""

import argparse

import torch

from _common import print_header

from pruneflow.errors import UserError, exit_on_user_error
from pruneflow.infer.deploy import time_deployed
from pruneflow.infer.device import resolve_device
from pruneflow.infer.runtimes import RUNTIMES
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune


def available_runtimes():
    try:
        import onnxruntime  # noqa: F401
        return list(RUNTIMES)
    except ImportError:
        return [r for r in RUNTIMES if r != "onnxruntime"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime CPU threads (default: all)")
    ap.add_argument("--models", default=None, help="comma-separated (default simple_cnn,resnet18,resnet101)")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.3,0.5,0.7; quick 0.5)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,64,256; quick 1,8)")
    ap.add_argument("--runtimes", default=None, help="comma-separated (default: every runtime available here)")
    ap.add_argument("--compile-mode", default="auto")
    ap.add_argument("--round-to", type=int, default=8)
    args = ap.parse_args()
    try:
        archs = args.models.split(",") if args.models else ["simple_cnn"] if args.quick else [
            "simple_cnn", "resnet18", "resnet101"]
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 8] if args.quick else [1, 64, 256]
        sparsities = ([float(x) for x in args.sparsities.split(",")] if args.sparsities else
                      [0.5] if args.quick else [0.3, 0.5, 0.7])
    except ValueError as e:
        raise UserError(f"--batches / --sparsities: {e}") from None
    runtimes = args.runtimes.split(",") if args.runtimes else available_runtimes()
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or not all(0 < s < 1 for s in sparsities) or min(batches) < 1 or args.round_to < 1 or args.trials < 1:
        raise UserError(f"runtimes from {', '.join(RUNTIMES)} (got {', '.join(bad) or 'those'}), sparsities in (0, 1), "
                        "batch sizes >= 1, --round-to >= 1, --trials >= 1")
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = dev.type in ("cuda", "cpu")  # the sweep's default layout on these devices
    head = (f"{'model':<10} {'sparsity':>8} {'runtime':<12} {'batch':>5} {'dense ms':>9} {'pruned ms':>9} "
            f"{'speedup [95 %]':>19} {'MACs÷':>6} {'effic.':>6}  provider / mode")
    print_header(dev, f"median of {args.trials} after {args.warmup} warm-up, dense and pruned alternately per runtime; "
                      f"{torch.get_num_threads()} thread(s); DepGraph L1, round_to {args.round_to}", head)
    torch.manual_seed(0)
    for arch in archs:
        shape = (1, 28, 28) if arch == "simple_cnn" else (3, 32, 32)
        dense = build_model(arch, 10, shape[0], "cifar").eval()
        ops, exclude = default_prune_targets(arch)
        for s in sparsities:
            pruned, st = prune(dense.cpu(), "l1@depgraph", s, shape, ops, exclude, round_to=args.round_to,
                               dependency_aware=True)
            pruned = pruned.to(dev, memory_format=torch.channels_last) if channels_last else pruned.to(dev)
            dense_dev = dense.to(dev, memory_format=torch.channels_last) if channels_last else dense.to(dev)
            cells = time_deployed(pruned, dense_dev, shape, dev, runtimes, batches, args.warmup, args.trials,
                                  channels_last, args.compile_mode, torch.get_num_threads())
            for c in cells:
                lead = f"{arch:<10} {s:>8.2f} {c.runtime:<12} {c.batch_size:>5}"
                if c.status != "done":
                    print(f"{lead} failed: {c.error}")
                    continue
                eff = c.speedup / st["mac_reduction"]
                how = "/".join(x for x in (c.provider, c.mode) if x)
                print(f"{lead} {1e3 * c.dense_median:>9.3f} {1e3 * c.median:>9.3f} "
                      f"{f'{c.speedup:.2f} [{c.speedup_lo:.2f}-{c.speedup_hi:.2f}]':>19} {st['mac_reduction']:>6.2f} "
                      f"{eff:>6.2f}  {how} (prepare {c.prepare_s:.1f} s)", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)
