"""Backends side by side: how much of the nominal sparsity each one turns into fewer MACs and real speed.

    python benchmarks/backends.py                 # SimpleCNN, ResNet-18 at 0.3/0.5/0.7, ResNet-101 at 0.5
    python benchmarks/backends.py --quick         # CI-sized: SimpleCNN only, one sparsity

For each model, backend, method and nominal sparsity it prints: achieved channel sparsity, MAC reduction,
params, latency speedup over the dense model (median of --trials batches of --batch-size, measured in this
same process on this machine) and speedup / MAC reduction (1.0 = the speed-up the MAC count promises).
All rows of one run share one machine and one torch, so the ratios compare like with like.
"""

import argparse
import time

import torch

from _common import print_header

from pruneflow.infer.device import resolve_device
from pruneflow.errors import exit_on_user_error
from pruneflow.infer.timing import summarize, time_forward
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune

FULL = [("simple_cnn", (0.3, 0.5, 0.7)), ("resnet18", (0.3, 0.5, 0.7)), ("resnet101", (0.5,))]
QUICK = [("simple_cnn", (0.5,))]
METHODS = [("l1", "nni"), ("l1@depgraph", "depgraph"), ("fpgm", "nni"), ("fpgm@depgraph", "depgraph")]


def latency(model, shape, device, batch_size, trials):
    x = torch.randn(batch_size, *shape, device=device)
    return summarize(time_forward(model.to(device), x, warmup=3, trials=trials))["median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=25)
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    head = (f"{'model':<10} {'backend':<8} {'method':<14} {'nominal':>7} {'achieved':>8} {'MACs÷':>6} "
            f"{'params':>10} {'speedup':>7} {'spd/MAC':>7} {'prune s':>7}")
    print_header(device, f"batch {args.batch_size}, median of {args.trials}", head)
    rows = []
    for arch, sparsities in (QUICK if args.quick else FULL):
        shape = (1, 28, 28) if arch == "simple_cnn" else (3, 32, 32)
        dense = build_model(arch, 10, shape[0], "cifar").eval()
        ops, exclude = default_prune_targets(arch)
        base = latency(dense, shape, device, args.batch_size, args.trials)
        for s in sparsities:
            for method, backend in METHODS:
                t0 = time.perf_counter()
                pruned, st = prune(dense, method, s, shape, ops, exclude, dependency_aware=arch != "simple_cnn")
                took = time.perf_counter() - t0
                speedup = base / latency(pruned, shape, device, args.batch_size, args.trials)
                row = dict(model=arch, backend=backend, method=method, nominal=s, achieved=st["channel_sparsity"],
                           mac_reduction=st["mac_reduction"], params=st["params"], speedup=speedup, seconds=took)
                rows.append(row)
                print(f"{arch:<10} {backend:<8} {method:<14} {s:>7.2f} {row['achieved']:>8.3f} "
                      f"{row['mac_reduction']:>6.2f} {row['params']:>10,} {speedup:>7.2f} "
                      f"{speedup / row['mac_reduction']:>7.2f} {took:>7.1f}", flush=True)
    return rows


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
