"""How long a whole study takes on this machine, projected from epoch times measured with the real sweep.

    python benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda
    python benchmarks/projection.py jobs/quickstart.yaml --quick             # CI-sized, CPU
    python benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda --compile cudagraphs --epochs 2
    python benchmarks/projection.py jobs/resnet101_cifar10.yaml --device cuda --precision bf16

What runs: the study's own job file (model, recipes, batch sizes, latency settings, packing) with a reduced
grid, through pruneflow.sweep.run_sweep, on synthetic images of the data set's shape and size (so an epoch
costs what a real one does; accuracy is meaningless) unless --real-data:
  1. dense training for --epochs epoch(s), alone on the device (the study's first job);
  2. dense + control + DepGraph-L1 at --sparsities, each fine-tuned for --epochs epoch(s), packed as the job says.
An epoch's cost is the fastest measured epoch; what the others took beyond it (cuDNN autotuning, and with
--compile the compilation, which a first epoch pays) counts once per run as a fixed cost. With every number
read back from the results file and the dense checkpoint:
  dense  = seeds x (train.epochs x the dense epoch + the dense run's first-epoch excess): one per seed;
  trials = sum over the study's full grid of (fixed stages + finetune.epochs x one fine-tune epoch) / n, where
           n = how many trials ran at once while measuring (their epoch times already include that sharing).
           A trial takes the numbers of the measured trial of its kind: the control for dense-shaped arms
           (control; level, whose zeros keep the dense shape), the nearest measured sparsity for structured
           methods (NNI's l1/l2 reach DepGraph's widths with dependency grouping: docs/benchmarks.md).
Not included: NNI's own pruning time (CPU, overlapped with other trials' GPU work; docs/benchmarks.md).
"""

import argparse
import contextlib
import glob
import os
import tempfile
import time

from _common import print_header

from pruneflow.infer.checkpoint import read_meta
from pruneflow.infer.device import resolve_device
from pruneflow.errors import exit_on_user_error
from pruneflow.results import read_trials
from pruneflow.spec import grid, load_spec
from pruneflow.sweep.driver import run_sweep
from pruneflow.spec import PerformanceSpec, check_performance
from pruneflow.step import resolve_perf

FIXED = ("load", "prune", "evaluate", "time", "save")


def measure(job, out, dataset, sparsities, epochs, device, k, compile_mode, precision):
    overrides = {"train.epochs": epochs, "finetune.epochs": epochs, "prune.methods": ["l1@depgraph"],
                 "prune.sparsities": sparsities, "prune.mac_targets": [], "resources.device": device, "seeds": [0],
                 "control": True}
    if dataset:
        overrides["data.dataset"] = dataset
    if k:
        overrides["resources.trials_per_gpu"] = k
    if compile_mode:
        overrides["performance.compile"] = compile_mode
    if precision:
        overrides["performance.precision"] = precision
    t0 = time.perf_counter()
    with open(out + ".log", "w") as log, contextlib.redirect_stdout(log):
        summary = run_sweep(job, out=out, progress=False, **overrides)
    wall = time.perf_counter() - t0
    records = [r for r in read_trials(summary["file"]) if r["status"] == "done"]
    if summary["failed"]:
        raise SystemExit(f"{summary['failed']} measuring trial(s) failed; see {out}.log")
    dense_meta = read_meta(sorted(glob.glob(os.path.join(os.path.dirname(summary["file"]), "dense-s*.safetensors")))[0])
    return wall, records, dense_meta


def split_epochs(seconds):
    """(one steady epoch, excess of the run over that many steady epochs) from a run's epoch times."""
    steady = min(seconds)
    return steady, sum(seconds) - len(seconds) * steady


def overlap(records):
    """The most trials that ran at the same moment."""
    events = sorted([(r["started_at"], 1) for r in records] + [(r["ended_at"], -1) for r in records])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sparsities", default=None, help="measured sparsities (default 0.1,0.3,0.5,0.7,0.9)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="measured epochs, dense and per trial (default 1; 2 when compiling)")
    ap.add_argument("--compile", default=None, metavar="MODE", help="performance.compile for the study, e.g. cudagraphs")
    ap.add_argument("--precision", default=None, help="performance.precision for the study (auto, fp32, bf16)")
    ap.add_argument("--trials-per-gpu", default=None, help="override the job's packing (a number or auto)")
    ap.add_argument("--real-data", action="store_true", help="use the job's data set instead of synthetic images")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    spec, _ = load_spec(args.job, check_backends=False)  # its grid; the measuring needs DepGraph only
    # what the study will compile on this device (bad settings fail here, before measuring)
    asked = PerformanceSpec(compile=args.compile or spec.performance.compile, precision=args.precision or "auto")
    compiling = resolve_perf(check_performance(asked), dev).compile
    sparsities = [float(s) for s in (args.sparsities or ("0.5" if args.quick else "0.1,0.3,0.5,0.7,0.9")).split(",")]
    dataset = None if args.real_data or spec.data.dataset == "digits" else f"synthetic-{spec.data.dataset}"
    k = args.trials_per_gpu if args.trials_per_gpu in (None, "auto") else int(args.trials_per_gpu)
    head = f"{'part':<34} {'measured':>12} {'projected s':>12}"
    print_header(dev, f"study {spec.study} ({spec.model.arch}, {dataset or spec.data.dataset})", head)
    with tempfile.TemporaryDirectory(prefix="pf-projection-") as tmp:
        epochs = args.epochs or (2 if compiling else 1)
        wall, records, dense_meta = measure(args.job, os.path.join(tmp, "out"), dataset, sparsities, epochs,
                                            str(dev), k, args.compile, args.precision)
    dense_epoch, dense_excess = split_epochs([e["seconds"] for e in dense_meta["history"]])
    # one dense model per seed (docs/statistics.md), unless the study starts from a given checkpoint
    dense_s = (0 if spec.train.checkpoint else len(spec.seeds)) * (spec.train.epochs * dense_epoch + dense_excess)
    n = overlap(records)
    cost = {}  # kind -> (fixed seconds, seconds per fine-tune epoch)
    for r in records:
        key = "dense" if r["arm"] == "dense" else "control" if r["arm"] == "control" else r["sparsity"]
        epoch, excess = split_epochs([e["seconds"] for e in r["epochs"]]) if r["epochs"] else (0.0, 0.0)
        cost[key] = (sum(r[f"seconds_{s}"] for s in FIXED) + excess, epoch)
    measured = sorted(k for k in cost if isinstance(k, float))
    total = 0.0
    full = grid(spec)
    for t in full:
        if t.arm == "dense":
            total += cost["dense"][0]
            continue
        if t.arm == "control" or t.method.startswith("level"):
            fixed, epoch = cost["control"]
        else:
            fixed, epoch = cost[min(measured, key=lambda s: abs(s - (t.sparsity or 0.5)))]
        total += fixed + spec.finetune.epochs * epoch
    trials_s = total / max(1, n)
    print(f"{'dense epoch (alone; 1st +%.0f s)' % dense_excess:<34} {dense_epoch:>11.1f}s {dense_s:>12.0f}")
    for key in ["control"] + measured:
        fixed, epoch = cost[key]
        print(f"{'trial ' + str(key) + ' (fixed | 1 epoch)':<34} {fixed:>5.1f}|{epoch:>5.1f}s {'':>12}")
    print(f"{'trials, %d at once (%d in the grid)' % (n, len(full)):<34} {'':>12} {trials_s:>12.0f}")
    print(f"{'whole study':<34} {'':>12} {dense_s + trials_s:>12.0f}  = {(dense_s + trials_s) / 60:.1f} min "
          f"(measuring took {wall:.0f} s)")


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
