"""The whole CPU training step, two variants side by side in one process: A/B rounds of a few steps each.

    python benchmarks/step_ab.py                         # CIFAR-stem ResNet-18, batch 64, both comparisons
    python benchmarks/step_ab.py --models resnet101 --rounds 3 --steps 2
    python benchmarks/step_ab.py --threads 1             # as a sweep's trial runs (threads_per_trial 1)
    python benchmarks/step_ab.py --threads 1 --sparsity 0.5 --compare thresholds   # a pruned model's fine-tuning
    python benchmarks/step_ab.py --quick                 # CI-sized

Comparisons (each: pruneflow's CPU step, pruneflow.cpu_kernels + channels_last, SGD as in fine-tuning):
  winograd  3x3 convolutions by pruneflow.winograd vs oneDNN's (cpu_kernels.WINOGRAD off) for the same step;
  products  Winograd's 16 matrix products per convolution as one torch.bmm (pruneflow's) vs a loop of 16 torch.mm;
  thresholds  which convolutions take Winograd: by the thread count's table (pruneflow's, winograd.MIN_CHANNELS)
            vs the two-thread table at any thread count (they differ at --threads 1).
--sparsity S trains the models DepGraph-L1-pruned at S instead (fewer channels: other layers cross the thresholds).
This VM's speed drifts by 10-30 % between seconds, so separate runs per variant mislead: each round times A then
B for --steps steps each, and the table gives the median and range of the per-round ratios B/A (above 1: A is
faster).
"""

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F

from _common import print_header

from pruneflow import cpu_kernels, winograd
from pruneflow.infer.errors import UserError, exit_on_user_error
from pruneflow.models import build_model, default_prune_targets
from pruneflow.train import get_recipe, make_optimizer


class _MmLoopTorch(types.ModuleType):
    """``torch`` as winograd.py sees it, with ``bmm`` as 16 ``torch.mm`` calls (the products' other way)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def bmm(a, b):
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
        for i in range(a.shape[0]):
            torch.mm(a[i], b[i], out=out[i])
        return out


TABLES = dict(winograd.MIN_CHANNELS)  # pruneflow's per-thread-count thresholds


def set_variant(comparison, b_side):
    """Switch pruneflow's step to the A (pruneflow's) or B side of ``comparison``."""
    cpu_kernels.WINOGRAD = not (comparison == "winograd" and b_side)
    winograd.torch = _MmLoopTorch("torch") if comparison == "products" and b_side else torch
    winograd.MIN_CHANNELS = {1: TABLES[2], 2: TABLES[2]} if comparison == "thresholds" and b_side else TABLES


COMPARISONS = {"winograd": ("winograd", "oneDNN"), "products": ("bmm", "16 mm"),
               "thresholds": ("by threads", "2-thread")}


def step_seconds(step_model, opt, x, y, steps):
    """Mean seconds per training step over ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(step_model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet18", help="comma-separated (CIFAR stem)")
    ap.add_argument("--compare", default="winograd,products", help=f"any of {', '.join(COMPARISONS)}")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 (quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 5; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sparsity", type=float, default=None, help="DepGraph-L1-prune the models at this sparsity")
    args = ap.parse_args()
    compare = args.compare.split(",")
    bad = [c for c in compare if c not in COMPARISONS]
    if bad:
        raise UserError(f"--compare {','.join(bad)}: valid are {', '.join(COMPARISONS)}")
    batch, rounds, steps = (args.batch_size or (16 if args.quick else 64), args.rounds or (1 if args.quick else 5),
                            args.steps or (1 if args.quick else 3))
    if min(batch, rounds, steps) < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--batch-size, --rounds, --steps and --threads: at least 1")
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity}: the fraction removed, in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    head = f"{'model':<10} {'A':>10} {'B':>8} {'A s/step':>9} {'B s/step':>9} {'B/A':>6} {'range':>11}"
    pruned = f", DepGraph-L1 sparsity {args.sparsity:g}" if args.sparsity else ""
    print_header(torch.device("cpu"), f"batch {batch}, {rounds} round(s) of {steps} step(s) per variant, "
                                      f"keep_freed_memory {winograd.keep_freed_memory()}{pruned}", head)
    for arch in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(arch, 10, 3, "cifar")
        if args.sparsity:
            from pruneflow.prune import prune

            model, _ = prune(model, "l1@depgraph", args.sparsity, (3, 32, 32), *default_prune_targets(arch))
        model = model.to(memory_format=torch.channels_last).train()
        opt, _ = make_optimizer(model, get_recipe("finetune"), 1)
        step_model = cpu_kernels.CpuKernels(model)
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        for comparison in compare:
            try:
                losses = []
                for b_side in (False, True):  # the same weights, the same loss (to rounding) both ways
                    set_variant(comparison, b_side)
                    loss = F.cross_entropy(step_model(x), y)
                    loss.backward()  # the backward pass runs too (Winograd's adjoint, the products' other way)
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                if abs(losses[1] - losses[0]) > 1e-4 * abs(losses[0]):
                    raise SystemExit(f"{arch} {comparison}: the variants' losses differ ({losses[0]} vs {losses[1]})")
                for b_side in (False, True):  # a first step of each variant: allocator, oneDNN primitives
                    set_variant(comparison, b_side)
                    step_seconds(step_model, opt, x, y, 1)
                a_times, b_times = [], []
                for _ in range(rounds):
                    for b_side, times in ((False, a_times), (True, b_times)):
                        set_variant(comparison, b_side)
                        times.append(step_seconds(step_model, opt, x, y, steps))
            finally:
                set_variant(comparison, False)
            ratios = sorted(b / a for a, b in zip(a_times, b_times))
            a_name, b_name = COMPARISONS[comparison]
            print(f"{arch:<10} {a_name:>10} {b_name:>8} {statistics.median(a_times):>9.3f} "
                  f"{statistics.median(b_times):>9.3f} {statistics.median(ratios):>6.2f} "
                  f"{f'{ratios[0]:.2f}-{ratios[-1]:.2f}':>11}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
