"""Dense vs pruned inference latency, and how much of the MAC reduction turns into speed.

    python benchmarks/latency.py                  # ResNet-18 and ResNet-101 (CIFAR stem), batch 1 and 64
    python benchmarks/latency.py --quick          # CI-sized: SimpleCNN, batch 1 and 8
    python benchmarks/latency.py --device cuda
    python benchmarks/latency.py --models resnet18 --sparsities 0.1,0.2 --batches 64 --round-to 8
                                                  # also pruned with widths in multiples of 8 (DepGraph round_to)

Uses the one timing implementation (pruneflow.infer.timing: input on the device, warm-up at the timed shape,
device synchronised around each call), as a sweep's trials do: the dense and the pruned model timed alternately,
call by call; speedup = the median of the per-pair ratios (the ms columns: each side's median).
Pruning is DepGraph L1 (fast, reaches its nominal sparsity).
"""

import argparse

import torch

from _common import print_header

from pruneflow.infer.device import resolve_device
from pruneflow.errors import UserError, exit_on_user_error
from pruneflow.infer.timing import paired_speedup, summarize, time_forward_paired
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--models", default=None, help="comma-separated (default resnet18,resnet101; quick simple_cnn)")
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.3,0.5,0.7; quick 0.5)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64; quick 1,8)")
    ap.add_argument("--round-to", type=int, default=None,
                    help="also prune each model keeping widths in multiples of this (a row marked in 'round')")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    archs = args.models.split(",") if args.models else ["simple_cnn"] if args.quick else ["resnet18", "resnet101"]
    models = [(a, (1, 28, 28) if a == "simple_cnn" else (3, 32, 32)) for a in archs]
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else (1, 8) if args.quick else (1, 64)
        sparsities = ([float(x) for x in args.sparsities.split(",")] if args.sparsities else
                      (0.5,) if args.quick else (0.3, 0.5, 0.7))
    except ValueError as e:
        raise UserError(f"--batches / --sparsities: {e}") from None
    if not all(0 < x < 1 for x in sparsities) or min(batches) < 1 or (args.round_to is not None and args.round_to < 2):
        raise UserError("sparsities in (0, 1), batch sizes >= 1, --round-to >= 2")
    head = (f"{'model':<10} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'pruned ms':>9} {'speedup':>7} {'MACs÷':>6} "
            f"{'spd/MAC':>7} {'round':>5}")
    print_header(dev, f"median of {args.trials} after 5 warm-up, dense and pruned alternately", head)
    torch.manual_seed(0)
    for arch, shape in models:
        dense = build_model(arch, 10, shape[0], "cifar").eval()
        ops, exclude = default_prune_targets(arch)
        for s in sparsities:
            for round_to in (None, args.round_to) if args.round_to else (None,):
                pruned, st = prune(dense, "l1@depgraph", s, shape, ops, exclude, round_to=round_to)
                for b in batches:
                    x = torch.randn(b, *shape, device=dev)
                    pruned_s, dense_s = time_forward_paired(pruned.to(dev), dense.to(dev), x, 5, args.trials)
                    t_dense, t_pruned = summarize(dense_s)["median"], summarize(pruned_s)["median"]
                    speedup = paired_speedup(pruned_s, dense_s)
                    print(f"{arch:<10} {s:>8.2f} {b:>5} {1e3 * t_dense:>9.3f} {1e3 * t_pruned:>9.3f} {speedup:>7.2f} "
                          f"{st['mac_reduction']:>6.2f} {speedup / st['mac_reduction']:>7.2f} {round_to or '-':>5}",
                          flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
