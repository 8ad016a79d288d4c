"""What a sweep tells: the provenance stored in every results file, and the table printed at the end."""

import platform


def describe_env(device):
    """Provenance: library versions and hardware, stored in every results file."""
    import importlib.metadata as md

    import torch

    from ..cluster import slurm_job_id
    from ..infer.device import describe

    versions = {}
    for pkg in ("torch", "torchvision", "nni", "ray", "h5py", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "absent"
    # the device the trials will run on: a GPU only when one is usable and not overridden to the CPU
    on_gpu = torch.cuda.is_available() and not str(device).startswith(("cpu", "mps"))
    return dict(versions, python=platform.python_version(), cuda=torch.version.cuda or "none",
                device_name=describe("cuda") if on_gpu else describe("cpu"), cpu=describe("cpu"),
                requested_device=device, slurm_job_id=slurm_job_id())


def _speedup(r):
    """The trial's side-by-side speedup over the dense model, e.g. '2.41x' (blank in files from before it)."""
    return f"{r.speedup:.2f}x" if r.speedup else ""


def _acc(r, split):
    """'94.4 [90.1-96.8]': accuracy % with its Wilson 95 % interval."""
    from ..compare import accuracy_interval

    acc, lo, hi, n = accuracy_interval(r, split)
    return "" if acc != acc else f"{100 * acc:.1f} [{100 * lo:.1f}-{100 * hi:.1f}]" if n else f"{100 * acc:.1f}"


def print_summary(records):
    """The terminal table of TrialRecords: method, sparsity (nominal and achieved), val and test accuracy with
    intervals, the test difference to the same seed's control, median latency, speedup over the dense model."""
    from ..compare import achieved, compare

    if not records:
        return
    order = {"dense": 0, "control": 1, "pruned": 2}
    records = sorted(records, key=lambda r: (order.get(r.arm, 3), r.method, r.sparsity, r.seed))
    controls = [r for r in records if r.arm == "control" and r.status == "done"]
    w_id = max(18, *(len(r.id) for r in records))  # taylor@depgraph-x2.00-s0 is 24
    w_m = max(8, *(len(r.method) for r in records))
    head = (f"{'trial':<{w_id}} {'method':<{w_m}} {'sparsity':>8} {'reached':>7} {'MACs':>12} "
            f"{'val acc % [95 %]':>18} {'test acc % [95 %]':>18} {'test vs control (pts, p)':>25} "
            f"{'latency ms':>10} {'speedup':>7}  status")
    print(head)
    print("-" * len(head))
    for r in records:
        start = f"{r.id:<{w_id}} {r.method:<{w_m}} {r.sparsity:>8.2f} "
        if r.status == "done":
            c = compare([r], controls) if r.arm == "pruned" else None
            vs = "" if c is None else f"{100 * c.diff:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}] p={c.p:.2f}"
            print(f"{start}{achieved(r):>7.2f} {r.macs:>12,} {_acc(r, 'val'):>18} {_acc(r, 'test'):>18} {vs:>25} "
                  f"{1e3 * r.latency_median:>10.3f} {_speedup(r):>7}  done")
        else:
            print(f"{start}{'':>7} {'':>12} {'':>18} {'':>18} {'':>25} {'':>10} {'':>7}  FAILED: {str(r.error)[:80]}")
    failed = sum(r.status != "done" for r in records)
    # the whole results file, earlier runs included; the line after it counts this run's trials
    print(f"{len(records) - failed} done, {failed} failed in this shard's results file; intervals: Wilson (accuracy), "
          "Bonett-Price and exact McNemar against the same seed's control, uncorrected (the report corrects over "
          "the grid and pools seeds: python -m pruneflow.report)")
