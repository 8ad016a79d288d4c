"""``python -m pruneflow.prune CKPT METHOD OUT --sparsity S | --target-macs X | --target-speedup X``: prune one
checkpoint and physically shrink it; print params / MACs / layer widths before -> after."""

import sys
import time

from .errors import UserError, check_above, check_flag, check_whole
from .prune import (MAC_TOLERANCE, NNI_PARTS, calibration_batches, check_sparsity, format_widths, parse_method, prune,
                    prune_to_mac_reduction, pruned_meta)
from .spec import misses_mac_target


def _as_tuple(v):
    if v is None:
        return None
    if isinstance(v, (str, int, float)):  # Fire parses `--exclude 5` to an int
        return tuple(s for s in str(v).split(",") if s)
    return tuple(v)


def cli(ckpt, method, out, sparsity=None, target_macs=None, op_types=None, exclude=None, dependency_aware=None,
        round_to=None, print_model=True, verbose=False, target_speedup=None, runtime="eager", batch=64, device="cpu",
        threads=None):
    """Prune a checkpoint with NNI and physically shrink it.

    Args:
      ckpt: dense (or any) pruneflow checkpoint (.safetensors).
      method: level | l1 | l2 | fpgm (NNI), or l1@depgraph | l2@depgraph | fpgm@depgraph | taylor@depgraph |
        slim@depgraph (Torch-Pruning's DepGraph).
      out: where to write the pruned checkpoint (.safetensors).
      sparsity: fraction removed from each targeted layer, in (0, 1).
      target_macs: instead of --sparsity, the MAC reduction to reach (e.g. 2 = half the MACs).
      target_speedup: instead, the speedup to reach, measured: each probe is timed pair by pair against the
        dense model in --runtime at --batch on --device (bisection on sparsity; a structured method).
      runtime: eager | compiled | onnxruntime, for --target-speedup.
      batch: images per timed call, for --target-speedup.
      device: cpu | cuda | mps | auto, for --target-speedup.
      threads: torch (and ONNX Runtime) CPU threads while timing (default: torch's choice).
      op_types: comma list of layer types to prune (default: the 2022 report's for this model).
      exclude: comma list of layer names to keep whole (default: the classifier).
      dependency_aware: prune residual-coupled channels together (NNI; default: on for ResNets).
      round_to: DepGraph: keep channel counts multiples of this (e.g. 8, for GPU kernels).
      print_model: print(model) before and after, as the 2022 report's appendix shows (--noprint_model to skip).
      verbose: show NNI's own output.
    """
    from .infer.checkpoint import load, save
    from .errors import check_not_input, check_writable_file
    from .models import default_prune_targets

    criterion, backend = parse_method(method)
    if [sparsity, target_macs, target_speedup].count(None) != 2:
        raise UserError("give exactly one of --sparsity (fraction removed), --target-macs (MAC reduction) or "
                        "--target-speedup (measured speedup)")
    if target_speedup is not None:
        timing = _speedup_settings(target_speedup, runtime, batch, device, threads)
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if target_macs is not None:
        target_macs = _mac_target(target_macs)
    print_model, verbose = check_flag(print_model, "print_model"), check_flag(verbose, "verbose")
    if dependency_aware is not None:
        dependency_aware = check_flag(dependency_aware, "dependency_aware")
    out = check_writable_file(out)
    check_not_input(ckpt, out, "pruned model")
    model, meta = load(ckpt)
    default_ops, default_exclude = default_prune_targets(meta["arch"])
    if dependency_aware is None:
        dependency_aware = meta["arch"] != "simple_cnn"
    kwargs = dict(op_types=_as_tuple(op_types) or default_ops,
                  exclude=_as_tuple(exclude) if exclude is not None else default_exclude,
                  dependency_aware=dependency_aware, verbose=verbose, round_to=round_to,
                  calibration=calibration_batches(meta) if criterion == "taylor" else None)
    t0 = time.perf_counter()
    search = None
    if target_speedup is not None:
        from .speedup import prune_to_speedup

        target = timing.pop("target")
        pruned, stats, search = prune_to_speedup(model, method, target, meta["input_shape"], **timing, **kwargs)
    elif target_macs is not None:
        pruned, stats = prune_to_mac_reduction(model, method, target_macs, meta["input_shape"], **kwargs)
    else:
        pruned, stats = prune(model, method, sparsity, meta["input_shape"], **kwargs)
    seconds = time.perf_counter() - t0
    save(pruned, out, pruned_meta(meta, stats))
    print(f"{meta['arch']} pruned with {method} at sparsity {stats['sparsity']:.3f}"
          + (f" (target: {stats['target_mac_reduction']:g}x fewer MACs)" if target_macs is not None else "")
          + (" (dependency-aware)" if stats["dependency_aware"] else ""))
    print(f"params {stats['params_dense']:,} -> {stats['params']:,} ({stats['params'] / stats['params_dense']:.1%}); "
          f"non-zero {stats['nonzero_params']:,}")
    print(f"MACs   {stats['macs_dense']:,} -> {stats['macs']:,} ({stats['mac_reduction']:.2f}x fewer)")
    if criterion != "level":
        print(f"channels removed from pruned layers: {stats['channel_sparsity']:.1%}")
    else:
        print(f"unstructured: same shapes, {stats['weight_sparsity']:.1%} zeros in pruned layers, no speedup")
    parts = ", ".join(f"{k} {stats['seconds_' + k]:.1f} s" for k in NNI_PARTS if stats["seconds_" + k] > 0)
    last = "; the last try's" if target_macs is not None else ""
    print(f"pruning took {seconds:.1f} s" + (f" (NNI: {parts}{last})" if backend == "nni" else ""))
    print(format_widths(stats))
    if print_model:
        print("\nbefore:\n" + str(model) + "\n\nafter:\n" + str(pruned))
    print(f"wrote {out}")
    if search is not None:
        print(speedup_lines(search))
        if not search.reached:
            print(f"warning: speedup target not met: asked for {search.target:g}x, the fastest try measured "
                  f"{search.speedup:.2f}x; wrote it anyway", file=sys.stderr)
    if target_macs is not None and misses_mac_target(stats["mac_reduction"], target_macs):
        # the closest try is kept (a model at the method's limit is still worth having), but say it missed
        print(f"warning: MAC target not met: asked for {target_macs:g}x fewer MACs (within {MAC_TOLERANCE:.0%}), "
              f"the closest try (sparsity {stats['sparsity']:.3f}) has {stats['mac_reduction']:.2f}x fewer; "
              "wrote it anyway", file=sys.stderr)


def _speedup_settings(target, runtime, batch, device, threads):
    """--target-speedup's timing settings, each checked before the checkpoint is read."""
    import torch

    from .errors import install_hint, missing_packages
    from .infer.device import resolve_device
    from .infer.runtimes import RUNTIMES

    target = check_above(target, "--target-speedup", 1, " (e.g. 2 for twice as fast)")
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and missing_packages("onnx", "onnxruntime", "onnxscript"):
        raise UserError(install_hint("--runtime onnxruntime", missing_packages("onnx", "onnxruntime", "onnxscript")))
    check_whole(batch, "--batch", 1)
    if threads is not None:
        torch.set_num_threads(check_whole(threads, "--threads", 1))
    return dict(target=target, device=resolve_device(device), runtime=runtime, batch_size=batch, threads=threads)


def speedup_lines(search):
    """What a speedup search measured: the verdict, then each probe."""
    verdict = (f"reached: {search.speedup:.2f}x at sparsity {search.sparsity:.3f}" if search.reached else
               f"NOT reached: the best measured was {search.speedup:.2f}x (sparsity {search.sparsity:.3f}); the "
               "model written is that one")
    lines = [f"speedup target {search.target:g}x in {search.runtime} at batch {search.batch_size}: {verdict}",
             "probes (sparsity: paired speedup [95 %]): " + ", ".join(
                 f"{p.sparsity:.3f}: {p.speedup:.2f} [{p.lo:.2f}, {p.hi:.2f}]" for p in search.probes)]
    return "\n".join(lines)


def _mac_target(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"target_macs must be a number > 1 (e.g. 2 for half the MACs), got {v!r}") from None


def main():
    from .cli import run_cli

    run_cli(cli, name="pruneflow.prune")


if __name__ == "__main__":
    main()
