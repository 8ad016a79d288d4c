"""Dense vs pruned inference latency, and how much of the MAC reduction turns into speed.

    python benchmarks/latency.py                  # ResNet-18 and ResNet-101 (CIFAR stem), batch 1 and 64
    python benchmarks/latency.py --quick          # CI-sized: SimpleCNN, batch 1 and 8
    python benchmarks/latency.py --device cuda

Uses the one timing implementation (pruneflow.infer.timing: input on the device, warm-up at the timed shape,
device synchronised around each call), as a sweep's trials do: the dense and the pruned model timed alternately,
call by call; speedup = the median of the per-pair ratios (the ms columns: each side's median); on the CPU with
glibc's malloc keeping freed blocks (infer.timing.keep_freed_memory), as in the sweep and pruneflow.infer.
Pruning is DepGraph L1 (fast, reaches its nominal sparsity).
"""

import argparse

import torch

from _common import print_header

from pruneflow.infer.device import resolve_device
from pruneflow.infer.errors import exit_on_user_error
from pruneflow.infer.timing import keep_freed_memory, paired_speedup, summarize, time_forward_paired
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=25)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    models = [("simple_cnn", (1, 28, 28))] if args.quick else [("resnet18", (3, 32, 32)), ("resnet101", (3, 32, 32))]
    batches = (1, 8) if args.quick else (1, 64)
    sparsities = (0.5,) if args.quick else (0.3, 0.5, 0.7)
    head = f"{'model':<10} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'pruned ms':>9} {'speedup':>7} {'MACs÷':>6} {'spd/MAC':>7}"
    kept = dev.type == "cpu" and keep_freed_memory()  # the steady state a sweep's trials and pruneflow.infer time in
    print_header(dev, f"median of {args.trials} after 5 warm-up, dense and pruned alternately"
                      + (f", keep_freed_memory {kept}" if dev.type == "cpu" else ""), head)
    torch.manual_seed(0)
    for arch, shape in models:
        dense = build_model(arch, 10, shape[0], "cifar").eval()
        ops, exclude = default_prune_targets(arch)
        for s in sparsities:
            pruned, st = prune(dense, "l1@depgraph", s, shape, ops, exclude)
            for b in batches:
                x = torch.randn(b, *shape, device=dev)
                pruned_s, dense_s = time_forward_paired(pruned.to(dev), dense.to(dev), x, 5, args.trials)
                t_dense, t_pruned = summarize(dense_s)["median"], summarize(pruned_s)["median"]
                speedup = paired_speedup(pruned_s, dense_s)
                print(f"{arch:<10} {s:>8.2f} {b:>5} {1e3 * t_dense:>9.3f} {1e3 * t_pruned:>9.3f} {speedup:>7.2f} "
                      f"{st['mac_reduction']:>6.2f} {speedup / st['mac_reduction']:>7.2f}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
