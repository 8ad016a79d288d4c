"""How a node's trials are packed: trials at a time per GPU or per CPU slot, threads each, the memory bound,
and the kept measurements (``packing-probe.json``) that let a requeued or grown study pack at once.

Pure decisions on numbers handed in (``plan_packing``); the probes themselves run in the trial pool.
"""

import dataclasses
import os
import sys
import time


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the trials run: Ray ``options`` per trial, ``slots`` at a time (``per_device`` per GPU), ``threads``
    torch threads each, on ``device``; ``max_calls`` trials per worker process (0: reused); ``note`` to print."""

    options: dict
    slots: int
    per_device: int
    threads: int
    device: str
    note: str = ""
    max_calls: int = 0


# memory_per_trial: auto adds this to the measured trial's peak (other trials prune to other widths, and a
# process's resident memory wanders with the allocator)
AUTO_HOST_HEADROOM = 1.15
AUTO_CPU_ONLY = "memory: memory_per_trial: auto is measured on CPU nodes only; give a size (8G) to bound the trials"


def trials_in_memory(per_trial, memory, devices=1, measured=None):
    """How many trials at a time the job's host memory holds (``memory``: job_memory's (bytes, source)), per
    device when ``devices`` GPUs share it, with a note; (None, '') when no per-trial size is set. ``per_trial``
    'auto' takes ``measured`` (one trial's peak, bytes) plus AUTO_HOST_HEADROOM."""
    if per_trial is None or (per_trial == "auto" and not measured):
        return None, ""
    from ..spec import size_bytes

    if per_trial == "auto":
        each = int(measured * AUTO_HOST_HEADROOM)
        size = f"{each / 2**30:.2f} GiB (a trial measured at {measured / 2**30:.2f} GiB + 15 %, memory_per_trial: auto)"
    else:
        each, size = size_bytes(per_trial, "resources.memory_per_trial"), f"{per_trial} (resources.memory_per_trial)"
    fit = max(1, memory[0] // (each * max(1, devices)))
    note = (f"memory: at most {fit} trial(s) at a time{' per GPU' if devices else ''}, {size} each, "
            f"in {memory[0] / 2**30:.1f} GiB, {memory[1]}")
    return int(fit), note


# Auto packing: the share of a GPU's memory trials may fill (the rest absorbs fragmentation and the peaks
# of stages the probe does not run), and the most trials one GPU takes whatever their size.
AUTO_MEMORY_SHARE = 0.85
AUTO_MAX_PER_GPU = 32
MPS_AUTO_TRIALS = 2


def choose_trials_per_gpu(footprint_bytes, total_bytes, cpus_per_gpu, share=AUTO_MEMORY_SHARE, limit=AUTO_MAX_PER_GPU):
    """How many trials fit on one GPU: as many footprints as fit in ``share`` of its memory, at least 1, and
    no more than the CPU cores per GPU (each packed trial is a Python process that must keep its GPU fed)."""
    by_memory = int(total_bytes * share // max(1, footprint_bytes))
    return max(1, min(by_memory, int(cpus_per_gpu), limit))


def trial_threads(requested, cpus, n_trials):
    """Torch threads per CPU trial: the job's number (at most the cores) or, for 'auto', the cores shared out
    among the ``n_trials`` to run: 1 each when there are at least as many trials as cores, more when fewer (a
    shard of a few trials on a many-core node would otherwise leave most cores idle)."""
    if requested == "auto":
        return max(1, cpus // max(1, n_trials))
    return max(1, min(int(requested), cpus))


def plan_packing(spec, cpus, gpus, probe=None, mps=False, n_trials=None, memory=None, host_probe=None):
    """Ray resources per trial and trials at a time (a Plan; max_calls: see gpu_worker_max_calls).

    GPU: K trials share each GPU (num_gpus = 1/K); ``trials_per_gpu: auto`` takes K from ``probe(device)`` (the
    memory one trial occupies, see trial.probe_memory). CPU: trials x threads never exceed ``cpus``, the CPUs
    this job was given (slot_counts), whatever the job file asks. ``mps``:
    an Apple-silicon GPU is usable (device 'auto' then means 'mps'). ``n_trials``: how many trials are to run
    (threads_per_trial 'auto'; default: as many as the cores). ``memory``: the job's host memory (job_memory),
    which bounds the trials at a time when ``resources.memory_per_trial`` is set; for 'auto' on CPU nodes,
    ``host_probe(threads)`` measures one trial ({host_bytes}, or None when it could not). Default
    ``memory``: memory_for_trials, counted now (call it with Ray started)."""
    res = spec.resources
    if res.memory_per_trial is not None and memory is None:
        memory = memory_for_trials()
    if gpus:
        threads = 1 if res.threads_per_trial == "auto" else res.threads_per_trial
        note = ""
        k = res.trials_per_gpu
        device = "cuda" if res.device == "auto" else res.device
        if k == "auto":
            try:
                m = probe(device)
            except Exception as e:  # e.g. the dense model alone does not fit: the trials will say so themselves
                k, note = 1, f"auto packing: the memory probe failed ({type(e).__name__}: {str(e)[:200]}); 1 trial per GPU"
            else:
                k = choose_trials_per_gpu(m["footprint_bytes"], m["total_bytes"], max(1, cpus // gpus))
                note = (f"auto packing: one trial occupies {m['footprint_bytes'] / 2**30:.2f} GiB of "
                        f"{m['total_bytes'] / 2**30:.1f} GiB -> {k} trial(s) per GPU")
                if m.get("reused_from"):
                    note += f" (measured by an earlier sweep of this study, {m['reused_from']}; delete it to measure again)"
                elif m.get("probe_s") is not None:
                    note += f" (the probe took {m['probe_s']:.0f} s)"
        fit, memory_note = trials_in_memory(res.memory_per_trial, memory, gpus)
        if fit is not None and fit < k:
            k, note = fit, "\n".join(n for n in (note, memory_note) if n)
        if res.memory_per_trial == "auto":
            note = "\n".join(n for n in (note, AUTO_CPU_ONLY) if n)
        # CPU work per trial is light next to its GPU work, so Ray's CPU count is not the packing limit.
        return Plan(options=dict(num_gpus=1.0 / k, num_cpus=0), slots=gpus * k, per_device=k, threads=threads,
                    device=device, note=note, max_calls=gpu_worker_max_calls(gpus))
    threads = trial_threads(res.threads_per_trial, cpus, n_trials or cpus)
    slots = max(1, cpus // threads)
    apple = res.device == "mps" or (res.device == "auto" and mps)
    note, measured = "", None
    if res.memory_per_trial == "auto" and not apple and slots > 1:  # one slot: nothing to hold back
        m = host_probe(threads) if host_probe else None
        measured = m and m.get("host_bytes")
        if not measured:
            note = "memory: the trial measured for memory_per_trial: auto did not finish; trials not bounded by memory"
        elif m.get("reused_from"):
            note = f"(memory measured by an earlier sweep of this study, {m['reused_from']})"
    fit, memory_note = trials_in_memory(None if apple and res.memory_per_trial == "auto" else res.memory_per_trial,
                                        memory, 0, measured)
    if fit is not None and fit < slots:
        slots, note = fit, "\n".join(n for n in (memory_note, note) if n)
    elif measured:  # auto: say what was measured, though the cores bind first
        note = "\n".join(n for n in (f"{memory_note}; the cores allow {slots}", note) if n)
    elif apple and res.memory_per_trial == "auto":
        note = AUTO_CPU_ONLY
    if apple:
        # Apple silicon: Ray has no notion of the MPS device, so K is a cap on concurrent trials, enforced by
        # each trial asking for its share of the CPUs (asking for its threads alone, as on CPU nodes, let Ray run
        # one per core). Unified memory is shared with the CPU: no probe, a modest default.
        k = MPS_AUTO_TRIALS if res.trials_per_gpu == "auto" else res.trials_per_gpu
        slots = max(1, min(k, slots))
        return Plan(options=dict(num_gpus=0, num_cpus=cpu_share(cpus, slots)), slots=slots, per_device=slots,
                    threads=threads, device="mps", note=note, max_calls=0)
    device = "cpu" if res.device == "auto" else res.device
    # each trial asks Ray for its threads; fewer at a time (memory) ask for a larger share, holding the rest back
    num_cpus = threads if slots == cpus // threads else cpu_share(cpus, slots)
    # bounded by memory: a fresh worker per trial, as the measured one ran (a reused worker keeps the freed
    # blocks of the trials before it in its allocator)
    return Plan(options=dict(num_gpus=0, num_cpus=num_cpus), slots=slots, per_device=slots, threads=threads,
                device=device, note=note, max_calls=1 if res.memory_per_trial else 0)


def cpu_share(cpus, slots):
    """Ray CPUs per trial so that ``slots`` of them fit in ``cpus``: Ray keeps resource amounts to 4 decimals,
    and rounded down, ``slots`` shares never add up to more than ``cpus`` (8/3 would be 2.6667)."""
    import math

    return math.floor(cpus / slots * 10**4) / 10**4


def gpu_worker_max_calls(gpus):
    """Trials per Ray worker process on a node with ``gpus`` GPUs (0: no limit, workers are reused).

    Ray points each task at its GPU through CUDA_VISIBLE_DEVICES, set again for every task, but a process reads it
    once, when CUDA starts: a reused worker would run its next trial on its first trial's GPU whatever Ray
    assigned, piling trials onto one GPU of a multi-GPU node. Ray makes GPU functions single-use for this reason
    (ray-project/ray#29624), but only when num_gpus is given to ray.remote itself, not through .options() as K
    is. On one GPU every task gets the same one, and reuse saves each trial a process start (imports, CUDA
    context, cuDNN's autotuning of shapes it has seen)."""
    return 1 if gpus > 1 else 0


def memory_for_trials(environ=os.environ):
    """job_memory less what this sweep already holds (this process and its children: Ray's raylet, GCS and idle
    workers), counted when the trials are about to be packed; resident sizes, so shared pages count twice (on
    the safe side)."""
    import psutil

    from ..cluster import job_memory

    limit, source = job_memory(environ)
    me = psutil.Process()
    held = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            held += proc.memory_info().rss
        except psutil.Error:  # ended meanwhile
            pass
    return max(0, limit - held), f"{source} less {held / 2**30:.1f} GiB the sweep's driver and Ray hold"


PROBE_FILE = "packing-probe.json"


PROBE_SECTIONS = ("model", "data", "finetune", "performance")


def probe_key(config, dense_path, gpu, sections=PROBE_SECTIONS):
    """What one trial's GPU footprint depends on: the GPU (name, memory), torch and pruneflow, the dense model's
    checkpoint (its size stands for its shapes) and the study's model, data, fine-tune and performance settings
    (``sections`` of the config; a measured trial's host memory adds pruning and timing)."""
    import hashlib
    import json

    import torch

    from .. import __version__

    parts = dict(gpu=gpu, torch=torch.__version__, pruneflow=__version__, dense_bytes=os.path.getsize(dense_path),
                 **{k: config.get(k) for k in sections})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remembered(probe, path, key, fields=("footprint_bytes", "total_bytes"), usable=None):
    """``probe`` whose measurement (``fields``, whole numbers) is kept in ``path`` (JSON, one entry per key) and
    reused by later sweeps of the study with the same key. A shard requeued at its time limit, or started after
    another, then packs at once: with a compile mode the probe compiles the dense model first (ResNet-101 with
    reduce-overhead: about a minute on an H200, docs/benchmarks.md). A probe that returns None measured nothing:
    nothing is kept. ``usable(entry)``: whether a kept entry serves this sweep (else it is measured again)."""
    import json

    def probe_once(device):
        try:
            with open(path) as f:
                entries = json.load(f)
        except (OSError, ValueError):  # absent or unreadable: measure (and write it anew)
            entries = {}
        entries = entries if isinstance(entries, dict) else {}
        try:
            entry = entries[key]
            if usable is None or usable(entry):
                return dict({f: int(entry[f]) for f in fields}, reused_from=path)
        except (KeyError, TypeError, ValueError):  # not measured with these settings (or garbled): measure
            pass
        t0 = time.perf_counter()
        m = probe(device)
        if m is None:
            return None
        m = dict(m, probe_s=time.perf_counter() - t0)
        entries[key] = dict(m, measured=time.strftime("%Y-%m-%d %H:%M:%S"))
        tmp = f"{path}.tmp-{os.getpid()}"
        try:  # atomically: shards of a study may write at once (the loser's entry is measured again later)
            with open(tmp, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:  # reuse is a saving, never a reason to fail
            print(f"note: could not keep the memory probe's result in {path} ({e.strerror})", file=sys.stderr)
        return m

    return probe_once


def kept_fraction(t):
    """How much of the dense model trial ``t`` trains: 1 for the dense and control arms and for unstructured
    (level) pruning, which keeps every shape; 1 - sparsity, or 1 / MAC target, for structured pruning."""
    if t.arm != "pruned" or str(t.method).startswith("level"):
        return 1.0
    return 1.0 / t.target if t.target else 1.0 - t.sparsity


def heaviest_trial(trials):
    """The trial likely to peak highest in host memory. A structured pruned trial that keeps at least half the
    model: NNI's speedup peaks on top of the fine-tuning (for ResNet-101 with L1 at 0.5 both stems' pruned trials
    outgrew the control's training, benchmarks/trial_memory.py), the one that keeps the most. Else the trial that
    trains the most of the dense model (kept_fraction): a level-pruned or the control arm. A heuristic: the
    measurement gets AUTO_HOST_HEADROOM on top."""
    rank = {"pruned": 2, "control": 1}
    structured = [t for t in trials if t.arm == "pruned" and kept_fraction(t) < 1.0]
    best = max(structured, key=kept_fraction, default=None)
    if best is not None and kept_fraction(best) >= 0.5:
        return best
    return max(trials, key=lambda t: (kept_fraction(t), rank.get(t.arm, 0)))
