"""Inference timing that can be trusted; the one implementation the sweep and ``pruneflow.infer`` share.

- The input batch is on the device before the clock starts: no data loading inside the timed region
  (the 2022 report timed a whole DataLoader pass, which made its MNIST curves flat).
- Warm-up at the exact shape being timed (cuDNN autotuning, lazy allocations, MPS graph building).
- Speedups are measured side by side: ``time_forward_paired`` times a model and its reference (the dense
  model) alternately, one call each, and the speedup is the median of the per-pair ratios. Timed one after
  the other, the two would see different machines: a sweep's other trials, a neighbour's job, clock drift.
- The device is synchronised around each timed call. On MPS we use torch.mps.synchronize() and
  time.perf_counter() rather than events (MPS events have had ordering bugs) or torch.utils.benchmark
  (which does not synchronise MPS).
"""

import math
import time

import torch

from .device import synchronize


def time_calls(fn, device, warmup=5, trials=25):
    """Seconds for each of ``trials`` calls of ``fn()`` whose work runs on ``device``, after ``warmup`` calls."""
    if trials < 1:
        raise ValueError("trials must be >= 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def time_forward(model, batch, warmup=5, trials=25):
    """Seconds for each of ``trials`` forward passes of ``batch`` (already on the model's device)."""
    model.eval()
    with torch.inference_mode():
        return time_calls(lambda: model(batch), batch.device, warmup, trials)


def time_forward_paired(model, reference, batch, warmup=5, trials=25):
    """Forward passes of ``model`` and ``reference`` timed alternately on ``batch``: (model seconds, reference
    seconds), ``trials`` each, sample i of both taken back to back."""
    model.eval()
    reference.eval()
    with torch.inference_mode():
        return time_calls_paired(lambda: model(batch), lambda: reference(batch), batch.device, warmup, trials)


def time_calls_paired(fn, reference_fn, device, warmup=5, trials=25):
    """``fn()`` and ``reference_fn()`` timed alternately: (fn seconds, reference seconds), ``trials`` each,
    sample i of both taken back to back. The order within a pair alternates, so whatever the first call
    leaves behind (caches, clock boost) favours neither. Any runtime's calls: eager, compiled, ONNX Runtime."""
    if trials < 1:
        raise ValueError("trials must be >= 1")
    samples = ([], [])
    for _ in range(warmup):
        fn()
        reference_fn()
    synchronize(device)
    for i in range(trials):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (fn, reference_fn)[j]()
            synchronize(device)
            samples[j].append(time.perf_counter() - start)
    return samples


def paired_speedup(samples, reference_samples):
    """Median over pairs of reference / model seconds: how many times faster ``model`` ran than its reference."""
    ratios = [r / m for m, r in zip(samples, reference_samples)]
    return summarize(ratios)["median"]


def summarize(samples):
    """mean, std (sample), median, p95 of a list of seconds."""
    xs = sorted(samples)
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    p95 = xs[min(n - 1, math.ceil(0.95 * n) - 1)]
    return {"mean": mean, "std": std, "median": median, "p95": p95, "n": n}
