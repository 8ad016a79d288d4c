"""Packing: wall time of the same 8-trial study at K = 1, 2, 4, 8 trials per device and `auto`, vs the ideal.

    python benchmarks/packing.py --device cuda     # ResNet-18 on synthetic-cifar10 (50,000 images), 1 epoch each
    python benchmarks/packing.py                   # CPU: SimpleCNN on digits, K up to the cores
    python benchmarks/packing.py --quick           # CI-sized (CPU, 3 trials)
    python benchmarks/packing.py --device cuda --ks 8,auto   # K's against each other only (no K = 1: no ideal)
    python benchmarks/packing.py --device cuda --compile cudagraphs   # each training step one CUDA graph
    python benchmarks/packing.py --analyse docs/data/h200-packing-k1 docs/data/h200-packing-k8   # kept results

Each K runs the real sweep (pruneflow.sweep.run_sweep: Ray, HDF5, checkpoints) from the same random-init dense
checkpoint: dense + control + DepGraph-L1 at 6 sparsities = 8 trials.
work  = the sum of the trials' wall times at K = 1 (each trial alone on the device);
ideal = work / K (a lower bound: no trial can finish before its own work, shared or not);
span  = first trial start to last trial end (what packing controls); wall = the whole sweep call (Ray start-up,
        the auto probe and the HDF5 writes included).
busy  = on a GPU, the seconds the GPU was busy during the K = 1 span (NVML utilisation, sampled by the sweep
        every 0.5 s, integrated): without NVIDIA MPS the kernels of different processes take turns, so no K can
        pack the study into less than this; bound = max(ideal, busy), and span/bound says how much of what is
        left packing could still win. Once one trial alone keeps the GPU busy, ideal (work / K) is out of reach.
A second table gives each stage's mean seconds per trial at each K (pruneflow.trial's stage clock; 'other' is
the rest of a trial's wall time): which stages packing stretches.
On a CPU, K trials at a time take K cores (one torch thread each) and K is capped at the cores the job has, as
the sweep itself does; larger K are skipped.
"""

import argparse
import contextlib
import os
import shutil
import tempfile
import time

import yaml

from _common import print_header

from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.infer.device import resolve_device
from pruneflow.errors import exit_on_user_error
from pruneflow.models import build_model
from pruneflow.results import read_trials, read_utilisation
from pruneflow.sweep.driver import run_sweep, slot_counts
from pruneflow.spec import PerformanceSpec, check_performance
from pruneflow.train import model_meta


def make_study(tmp, arch, dataset, sparsities, epochs, device, compile_mode=None):
    """A job file and a random-init dense checkpoint (packing does not depend on trained weights)."""
    from pruneflow.data import dataset_info, split_info

    info = dataset_info(dataset)
    job = dict(study="packing", model=dict(arch=arch), data=dict(dataset=dataset),
               prune=dict(methods=["l1@depgraph"], sparsities=sparsities), finetune=dict(epochs=epochs),
               resources=dict(device=device, threads_per_trial=1, sample_interval_s=0.5), retries=0)
    if compile_mode:
        job["performance"] = dict(compile=compile_mode)
    job_path = os.path.join(tmp, "packing.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(job, f)
    dense = os.path.join(tmp, "dense.safetensors")
    ckpt_io.save(build_model(arch, info["classes"], info["shape"][0], "cifar"), dense,
                 dict(model_meta(arch, dataset, "cifar", info["classes"]), val_split=split_info(dataset)))
    return job_path, dense


def run_at(job, dense, out, k, on_gpu, cores):
    """One sweep at K trials per device; returns (wall s, records)."""
    env_before = os.environ.get("SLURM_CPUS_PER_TASK")
    if not on_gpu:  # K concurrent CPU trials = K cores given to the job
        os.environ["SLURM_CPUS_PER_TASK"] = str(cores if k == "auto" else k)
    try:
        t0 = time.perf_counter()
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log):
            summary = run_sweep(job, out=out, dense=dense, progress=False, **{"resources.trials_per_gpu": k})
        wall = time.perf_counter() - t0
    finally:
        if env_before is None:
            os.environ.pop("SLURM_CPUS_PER_TASK", None)
        else:
            os.environ["SLURM_CPUS_PER_TASK"] = env_before
    records = read_trials(summary["file"])
    failed = [r for r in records if r["status"] != "done"]
    if failed:
        raise SystemExit(f"K={k}: trial(s) {[r['id'] for r in failed]} failed (first: {failed[0]['error'][:1500]})")
    return wall, records


STAGES = ("load", "prune", "finetune", "evaluate", "time", "save")


def busy_seconds(series, start, end, column="gpu0_util_percent"):
    """Seconds the device was busy between ``start`` and ``end`` (unix s): each utilisation sample (percent over
    the interval before it) times the part of that interval inside the span. None without such samples."""
    if column not in series or len(series["time"]) < 2:
        return None
    t, u = series["time"], series[column]
    busy = 0.0
    for t0, t1, util in zip(t[:-1], t[1:], u[1:]):
        overlap = min(t1, end) - max(t0, start)
        if overlap > 0:
            busy += overlap * util / 100.0
    return busy


def stage_means(records):
    """{stage: mean seconds per trial}, with 'other' the rest of each trial's wall time."""
    n = len(records)
    means = {s: sum(float(r.get(f"seconds_{s}") or 0.0) for r in records) / n for s in STAGES}
    means["other"] = sum(float(r["wall_s"]) for r in records) / n - sum(means.values())
    return means


def span_and_busy(records, results):
    """(first trial start, last trial end, GPU-busy seconds in between or None) of one sweep's trials and its
    results file (the utilisation series of its last run)."""
    start, end = min(r["started_at"] for r in records), max(r["ended_at"] for r in records)
    runs = read_utilisation(results)
    return start, end, busy_seconds(runs[-1]["series"], start, end) if runs else None


def analyse(paths):
    """Span, work, GPU-busy seconds and stage means of kept packing results (folders or .h5 files), no sweep run."""
    import glob

    print(f"{'results':<40} {'per dev':>7} {'span s':>8} {'work s':>8} {'busy s':>8}  stage means (s per trial)")
    for path in paths:
        files = [path] if path.endswith(".h5") else glob.glob(os.path.join(path, "**", "shard-*.h5"), recursive=True)
        if not os.path.exists(path) or len(files) != 1:
            raise SystemExit(f"{path}: expected one results file, found {len(files)}")
        records = read_trials(files[0])
        start, end, busy = span_and_busy(records, files[0])
        means = stage_means(records)
        print(f"{path:<40} {int(records[0]['trials_per_device']):>7} {end - start:>8.1f} "
              f"{sum(r['wall_s'] for r in records):>8.1f} {'-' if busy is None else f'{busy:.1f}':>8}  "
              + " ".join(f"{k} {v:.2f}" for k, v in means.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", default="1,2,4,8,auto", help="trials per device to compare")
    ap.add_argument("--arch", default=None, help="default: resnet18 on a GPU, simple_cnn on a CPU")
    ap.add_argument("--dataset", default=None, help="default: synthetic-cifar10 on a GPU, digits on a CPU")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per trial (default 1 GPU, 2 CPU)")
    ap.add_argument("--keep", default=None, help="copy each K's results file and sweep log into this folder")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="performance.compile for the trials, e.g. cudagraphs (default: the job default, eager)")
    ap.add_argument("--analyse", nargs="+", metavar="RESULTS", default=None,
                    help="only read kept results (--keep's k<K> folders or their .h5 files) and print their figures")
    args = ap.parse_args()
    if args.analyse:
        return analyse(args.analyse)
    dev = resolve_device(args.device)
    on_gpu = dev.type == "cuda"
    cores = slot_counts("cpu")[0]  # as the sweep counts them
    arch = args.arch or ("resnet18" if on_gpu else "simple_cnn")
    dataset = args.dataset or ("synthetic-cifar10" if on_gpu else "digits")
    sparsities = [0.5] if args.quick else [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    epochs = args.epochs or (1 if on_gpu or args.quick else 2)
    ks = [k if k == "auto" else int(k) for k in args.ks.split(",")]
    head = (f"{'K':>5} {'per dev':>7} {'wall s':>8} {'span s':>8} {'ideal s':>8} {'span/ideal':>10} {'vs K=1':>7}"
            + (f" {'bound s':>8} {'span/bound':>10}" if on_gpu else ""))
    check_performance(PerformanceSpec(compile=args.compile or False))  # a bad mode fails now, in one line
    print_header(dev, f"{arch} on {dataset}, {len(sparsities) + 2} trials, {epochs} fine-tune epoch(s), "
                      f"{cores} core(s)" + (f", compile {args.compile}" if args.compile else ""), head)
    with tempfile.TemporaryDirectory(prefix="pf-packing-") as tmp:
        job, dense = make_study(tmp, arch, dataset, sparsities, epochs, str(dev), args.compile)
        work = span1 = busy = None
        stages = {}
        for k in ks:
            if not on_gpu and k != "auto" and k > cores:
                print(f"{k:>5} {'':>7} skipped: more trials than the {cores} core(s)")
                continue
            out = os.path.join(tmp, f"k{k}")
            wall, records = run_at(job, dense, out, k, on_gpu, cores)
            results = os.path.join(out, "packing", "shard-0-of-1.h5")
            if args.keep:  # e.g. for `python -m pruneflow.report` (its timeline shows the packing)
                os.makedirs(os.path.join(args.keep, f"k{k}", "packing"), exist_ok=True)
                shutil.copy(results, os.path.join(args.keep, f"k{k}", "packing"))
                shutil.copy(out + ".log", os.path.join(args.keep, f"k{k}.log"))
            start, end, run_busy = span_and_busy(records, results)
            span = end - start
            per_device = int(records[0]["trials_per_device"])
            stages[f"K={k}" + (f" ({per_device})" if k == "auto" else "")] = stage_means(records)
            if work is None and k == 1:
                work, span1, busy = sum(r["wall_s"] for r in records), span, run_busy if on_gpu else None
            if work is None:  # no K = 1 first (a short run comparing K's only): spans, no ideal
                print(f"{str(k):>5} {per_device:>7} {wall:>8.1f} {span:>8.1f} {'-':>8} {'-':>10} {'-':>7}", flush=True)
                continue
            ideal = work / per_device
            row = (f"{str(k):>5} {per_device:>7} {wall:>8.1f} {span:>8.1f} {ideal:>8.1f} {span / ideal:>10.2f} "
                   f"{span1 / span:>7.2f}")
            if on_gpu:
                bound = max(ideal, busy or 0.0)
                row += f" {bound:>8.1f} {span / bound:>10.2f}" if busy is not None else f" {'-':>8} {'-':>10}"
            print(row, flush=True)
        if busy is not None:
            print(f"GPU busy during the K = 1 span: {busy:.1f} s of {span1:.1f} s ({100 * busy / span1:.0f} %)")
        if stages:
            print(f"\nmean seconds per trial by stage\n{'':>10} " + " ".join(f"{s:>8}" for s in (*STAGES, "other")))
            for k, means in stages.items():
                print(f"{k:>10} " + " ".join(f"{means[s]:>8.2f}" for s in (*STAGES, "other")), flush=True)

if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
