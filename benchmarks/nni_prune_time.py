"""NNI's pruning time, pruneflow's way against NNI's own, side by side in one process:

    python benchmarks/nni_prune_time.py                          # ResNet-18 and ResNet-101 (CIFAR stem), 3 rounds
    python benchmarks/nni_prune_time.py --models resnet18 --rounds 1   # CI-sized

Two parts of a structured NNI pruning (pruneflow.prune._prune_nni), each timed both ways, alternately, the
order swapped every round (medians over the rounds):
- grouping: NNI's ``auto_set_denpendency_group_ids`` (traces the model twice, each time with TorchScript's
  trace check) against ``pruneflow.prune.dependency_groups`` (one unchecked trace); the groups must be equal.
- speed-up: ``ModelSpeedup`` as NNI runs it (formatting every mask's sparsity into log messages even when the
  logger drops them) against the same with that formatting skipped (``pruneflow.prune.speed_up``); the pruned
  models must be equal.
"""

import argparse
import copy
import statistics
import time

import torch

from _common import print_header

from pruneflow.errors import UserError, exit_on_user_error
from pruneflow.models import build_model
from pruneflow.prune import _quiet, dependency_groups, speed_up


def seconds(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def same_groups(a, b):
    """The same layers grouped the same way (NNI names groups by random uuids)."""
    def shape(config):
        ids = {}
        return [(c["op_names"], ids.setdefault(c.get("dependency_group_id"), len(ids)),
                 c.get("internal_metric_block")) for c in config]
    return shape(a) == shape(b)


def one_round(arch, sparsity, swap):
    from nni.compression.pruning import L1NormPruner
    from nni.compression.utils import auto_set_denpendency_group_ids

    torch.manual_seed(0)
    model = build_model(arch, 10, 3, "cifar").eval()
    example = torch.rand(2, 3, 32, 32)
    config = [{"op_types": ["Conv2d"], "sparse_ratio": sparsity, "exclude_op_names": []}]
    ways = [("nni", lambda: auto_set_denpendency_group_ids(model, config, example)),
            ("pruneflow", lambda: dependency_groups(model, config, example))]
    times, groups = {}, {}
    for name, fn in (ways[::-1] if swap else ways):
        times[f"grouping {name}"], groups[name] = seconds(fn)
    if not same_groups(groups["nni"], groups["pruneflow"]):
        raise SystemExit(f"{arch}: pruneflow's dependency groups differ from NNI's")
    pruner = L1NormPruner(model, groups["pruneflow"])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    models = {}
    for name, stats in ((("pruneflow", False), ("nni", True))[::-1] if swap else (("pruneflow", False), ("nni", True))):
        times[f"speedup {name}"], models[name] = seconds(
            lambda: speed_up(copy.deepcopy(model), example, masks, mask_stats=stats))
    a, b = models["nni"].state_dict(), models["pruneflow"].state_dict()
    if list(a) != list(b) or not all(torch.equal(a[k], b[k]) for k in a):
        raise SystemExit(f"{arch}: the speed-up without mask statistics gave another model")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet101")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if not m.startswith("resnet")]
    if bad or not models:
        raise UserError(f"--models takes ResNets (dependency grouping is for residual models), got {args.models!r}")
    if args.rounds < 1 or not 0 < args.sparsity < 1:
        raise UserError("--rounds must be >= 1 and --sparsity in (0, 1)")
    print_header("cpu", f"L1 at {args.sparsity}, CIFAR stem, {args.rounds} round(s), both ways alternately, medians",
                 f"{'model':<10} {'part':<9} {'NNI s':>7} {'pruneflow s':>12} {'ratio':>6}")
    for arch in models:
        with _quiet(False):  # NNI's own progress output
            rounds = [one_round(arch, args.sparsity, swap=r % 2 == 1) for r in range(args.rounds)]
        for part in ("grouping", "speedup"):
            nni = statistics.median(t[f"{part} nni"] for t in rounds)
            ours = statistics.median(t[f"{part} pruneflow"] for t in rounds)
            print(f"{arch:<10} {part:<9} {nni:>7.2f} {ours:>12.2f} {nni / ours:>6.2f}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)
