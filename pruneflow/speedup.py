"""Pruning to a measured speedup: the sparsity whose pruned model, timed pair by pair against the dense one in a
given runtime and batch size, runs ``target`` times faster (``prune.speedup_targets``, ``prune --target-speedup``).

Counted MACs do not predict time (eager launches as many kernels for a pruned network as for the dense one), so
the search bisects on real timings, like ``prune_to_mac_reduction`` bisects on counted MACs. Measured speedup
grows with sparsity up to noise; the search keeps the smallest sparsity seen to reach the target, and every probe
it measured. A target out of reach is reported with the best speedup found, never faked.
"""

import copy
import dataclasses
import typing

from .errors import UserError

LADDER = (0.95, 0.8, 0.65, 0.5)  # sparsities tried, most pruned first, until one reaches the target


@dataclasses.dataclass
class Probe:
    sparsity: float
    speedup: float
    lo: float
    hi: float


@dataclasses.dataclass
class SpeedupSearch:
    target: float
    runtime: str
    batch_size: int
    reached: bool
    sparsity: float  # the one kept: the smallest probe that reached the target, else the fastest
    speedup: float  # its measured speedup during the search
    probes: typing.List[Probe]


def prune_to_speedup(model, method, target, input_shape, device, runtime="eager", batch_size=64, warmup=3,
                     trials=11, max_steps=7, resolution=0.02, channels_last=False, compile_mode="auto", threads=None,
                     **prune_kwargs):
    """(pruned model on the CPU, stats, SpeedupSearch) for the smallest sparsity of ``method`` found whose paired
    speedup in ``runtime`` at ``batch_size`` reaches ``target``; ``prune_kwargs`` go to prune.prune."""
    import torch

    from .infer.runtimes import RuntimeUnavailable, prepare
    from .infer.timing import time_calls_paired
    from .prune import parse_method, prune
    from .stats import bootstrap_ratio

    if parse_method(method)[0] == "level":
        raise UserError("level pruning keeps every shape, so it cannot be faster; speedup targets need a structured "
                        "method")
    if not target > 1.0:
        raise UserError(f"speedup target must be > 1 (e.g. 2 for twice as fast), got {target!r}")
    x = torch.randn(int(batch_size), *input_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def on_device(m):
        m = m.to(device).eval()
        return m.to(memory_format=torch.channels_last) if channels_last else m

    dense = on_device(copy.deepcopy(model))
    try:
        reference = prepare(runtime, dense, x, compile_mode, threads)
    except RuntimeUnavailable as e:
        raise UserError(f"cannot time the {runtime} runtime here: {e}") from None
    probes, kept = [], {}

    def measure(sparsity):
        pruned, stats = prune(model, method, sparsity, input_shape, **prune_kwargs)
        runner = prepare(runtime, on_device(copy.deepcopy(pruned)), x, compile_mode, threads)
        try:
            s, d = time_calls_paired(runner.call, reference.call, device, warmup, trials)
        finally:
            runner.cleanup()
        sp, lo, hi = bootstrap_ratio(d, s)
        probes.append(Probe(float(stats["sparsity"]), sp, lo, hi))
        kept[sparsity] = (pruned, stats, sp)
        return sp

    try:
        # From the most pruned down: rounding channel counts (DepGraph's round_to) can leave a very high sparsity
        # less pruned than a middling one, so one miss at the top does not prove the target out of reach
        lo, hi = 0.0, next((s for s in LADDER if measure(s) >= target), None)
        if hi is not None:  # reachable: bisect for the least pruning that still reaches it
            for _ in range(max_steps):
                if hi - lo <= resolution:
                    break
                mid = round((lo + hi) / 2, 4)
                lo, hi = (lo, mid) if measure(mid) >= target else (mid, hi)
            pruned, stats, sp = kept[hi]
            reached = True
        else:  # out of reach: the fastest model measured
            pruned, stats, sp = max(kept.values(), key=lambda v: v[2])
            reached = False
    finally:
        reference.cleanup()
    search = SpeedupSearch(float(target), runtime, int(batch_size), reached, float(stats["sparsity"]), float(sp),
                           sorted(probes, key=lambda p: p.sparsity))
    stats["target_speedup"] = float(target)
    return pruned, stats, search

