"""One node's sweep: ``python -m pruneflow.sweep jobs/<study>.yaml [--shard i/n] [--out results]``.

Trains the dense baseline if its checkpoint is absent, expands the grid, and runs this node's shard as Ray
tasks packed K per GPU (fractional GPUs) or one per CPU slot. The driver is the only writer of the shard's
HDF5 file and adds each trial the moment it finishes, so a kill loses nothing finished and a re-run of the
same command skips what is done.
"""

import contextlib
import fcntl
import os
import platform
import shutil
import sys
import threading
import time

from .infer.errors import UserError, check_flag, check_writable_dir, require


def run_sweep(job, shard=None, out="results", dense=None, progress=True, train_only=False, **overrides):
    """Run this node's shard of a study; returns {'done': n, 'failed': n, 'skipped': n, 'file': path}.

    ``train_only`` stops after the dense checkpoint exists (the pipeline's first Slurm job)."""
    from .results import ResultStore, read_trials, study_files
    from .spec import grid, load_spec, parse_shard, resolved, shard_trials

    spec, job_text = load_spec(job, overrides)
    i, n = parse_shard(shard)
    # ops MPS lacks run on the CPU instead of failing, in the dense training's process and Ray's workers alike
    # (both inherit it); set before either starts
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    # GPU indices counted by PCI bus, as nvidia-smi and NVML (the utilisation sampler) count them: CUDA's own
    # default puts the fastest GPU first, so on a node with mixed GPUs the sampler would watch the wrong ones
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from .infer.device import keep_to_slurm_gpus

    keep_to_slurm_gpus(spec.resources.device)  # a Slurm job given no GPUs leaves the node's GPUs alone
    check_inputs(spec, dense, train_only)
    config = resolved(spec)
    study_dir = check_writable_dir(os.path.join(out, spec.study))
    ckpt_dir = check_writable_dir(os.path.join(study_dir, "checkpoints"))
    dense_path = dense or spec.train.checkpoint or os.path.join(study_dir, "dense.safetensors")
    config["train"]["checkpoint"] = os.path.abspath(dense_path)
    if train_only:
        ensure_dense(dense_path, spec, config, progress, given=bool(dense))
        return {"done": 0, "failed": 0, "skipped": 0, "file": dense_path}
    trials = shard_trials(grid(spec), (i, n))
    env = describe_env(spec.resources.device)
    path = os.path.join(study_dir, f"shard-{i}-of-{n}.h5")
    # Every results file of the study, not just this shard's: a grown grid or another shard count moves trials
    # between shards, and a trial done in any file is done (re-running it would duplicate its record and
    # overwrite its checkpoint).
    others = [p for p in study_files(study_dir) if os.path.abspath(p) != os.path.abspath(path)]
    for p in ([path] if os.path.exists(path) else []) + others:
        check_same_settings(p, config)
    done_elsewhere = {r["id"] for p in others for r in read_trials(p) if r["status"] == "done"}
    with ResultStore(path, spec.study, job_text, config, f"{i}/{n}", env) as store:
        store.update_settings(job_text, config)  # a grown grid: the file describes the latest run
        done = store.done_ids() | done_elsewhere
        todo = [t for t in trials if t.id not in done]
        print(f"study {spec.study}: shard {i}/{n} has {len(trials)} trial(s), {len(done & {t.id for t in trials})} "
              f"already done; results -> {path}", flush=True)
        if todo:
            ensure_dense(dense_path, spec, config, progress, given=bool(dense))
            _run_trials(todo, config, dense_path, ckpt_dir, store, spec, progress)
        records = [r for r in read_trials(path) if r["id"] in {t.id for t in trials}]
    print_summary(records)
    failed = [r for r in records if r["status"] != "done"]
    return {"done": len(records) - len(failed), "failed": len(failed), "skipped": len(trials) - len(todo), "file": path}


def check_inputs(spec, dense, train_only):
    """What would fail later (in the dense training, or in every trial) fails now, before anything is written."""
    from .infer.data import load_split
    from .infer.device import resolve_device

    resolve_device(spec.resources.device)  # 'cuda' on a node without one
    if dense and not train_only and not os.path.exists(dense):
        raise UserError(f"--dense {dense} does not exist (to train the dense model there first: the same command "
                        "with --train_only)")
    if spec.train.checkpoint and not dense and not os.path.exists(spec.train.checkpoint):
        raise UserError(f"train.checkpoint {spec.train.checkpoint} does not exist")
    if spec.data.dataset in ("mnist", "cifar10") and not spec.data.download:
        load_split(spec.data.dataset, "test", spec.data.root)  # not staged: where it looked and how to stage it


# Settings a re-run may change without mixing incomparable results into one file: which trials the grid
# holds (adding sparsities or seeds to a study runs just the new ones), where things are, and how the machine
# is used. Everything else (model, data set, epochs, recipes, pruning and timing settings) shapes every result.
FREE_TO_CHANGE = ("prune.methods", "prune.sparsities", "prune.mac_targets", "seeds", "control", "retries",
                  "data.root", "data.download", "resources.", "performance.")


def flat(d, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_settings(path, config):
    """Refuse to resume ``path`` with settings that would make its new trials incomparable with its old ones
    (a re-run with --finetune.epochs 2 used to report the old 1-epoch trials as done, silently)."""
    from .results import read_file_attrs

    before, now = flat(read_file_attrs(path)["config"]), flat(config)
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
               and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in FREE_TO_CHANGE)]
    if changed:
        what = "; ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise UserError(f"{path} holds trials made with other settings: {what}{more}; re-run with the file's "
                        "settings, or give the new ones their own --out (or study name)")


def check_dense(path, meta, spec, config, given):
    """An existing dense checkpoint must be this study's model on this study's data; one this study trained
    (not ``given`` by --dense or train.checkpoint) must also have its training settings: a re-run with
    --train.epochs 4 used to reuse a 1-epoch dense model and record 4."""
    import json

    from .train import get_recipe

    want = {"arch": spec.model.arch, "dataset": spec.data.dataset}
    if spec.model.arch != "simple_cnn":
        want["stem"] = spec.model.stem
    if not given:  # the recipe as train_dense stored it: resolved, with the job's batch size and lr, via JSON
        recipe = get_recipe(config["train"]["recipe"], batch_size=spec.train.batch_size, lr=spec.train.lr)
        want.update(epochs=spec.train.epochs, recipe=json.loads(json.dumps(recipe)), seed=spec.seeds[0])
    differ = [f"{k} {meta.get(k)!r} (the study: {v!r})" for k, v in want.items() if k in meta and meta[k] != v]
    if differ:
        fix = ("pass a dense checkpoint of this model and data set" if given else
               "delete it to train a new one, or run with the settings it was trained with")
        raise UserError(f"dense checkpoint {path} does not fit this study: {'; '.join(differ)}; {fix}")


def ensure_dense(dense_path, spec, config, progress, given=False):
    """Train the dense model unless its checkpoint exists (``given``: named by --dense, not trained by this
    study); concurrent shards wait for one trainer."""
    from .infer.checkpoint import read_meta
    from .isolated import run_isolated
    from .train import train_dense

    if os.path.exists(dense_path):
        check_dense(dense_path, read_meta(dense_path), spec, config, given or bool(spec.train.checkpoint))
        return
    if spec.train.checkpoint:
        raise UserError(f"train.checkpoint {dense_path} does not exist")
    with open(dense_path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another shard may be training it right now
        if os.path.exists(dense_path):
            return
        print(f"training the dense {spec.model.arch} on {spec.data.dataset} for {spec.train.epochs} epoch(s) "
              f"-> {dense_path}", flush=True)
        # in a process of its own: whatever the training held on the GPU is released before trials are packed
        run_isolated(train_dense, "dense training", arch=spec.model.arch, dataset=spec.data.dataset, out=dense_path,
                     epochs=spec.train.epochs, recipe=config["train"]["recipe"], stem=spec.model.stem,
                     seed=spec.seeds[0], device=spec.resources.device, data_root=spec.data.root,
                     download=spec.data.download, progress=progress, batch_size=spec.train.batch_size,
                     lr=spec.train.lr, config=config, perf=config["performance"])


def slot_counts(device="auto"):
    """(CPUs, GPUs) this job may use: Slurm's allocation when inside a job, else the machine's (CPUs: job_cpus)."""
    from .infer.device import job_cpus

    cpus = job_cpus()
    gpus = 0
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        import torch

        gpus = torch.cuda.device_count()
        slurm_gpus = os.environ.get("CUDA_VISIBLE_DEVICES") if "SLURM_JOB_ID" in os.environ else None
        if slurm_gpus and gpus == 0:
            print(f"note: Slurm allocated GPU(s) {slurm_gpus} but CUDA cannot use them here; running on CPU",
                  file=sys.stderr, flush=True)
    return cpus, gpus


def job_memory(environ=os.environ, cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """(bytes, where the limit comes from): the host memory this job may use, the least of the machine's RAM,
    Slurm's grant (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x the job's CPUs on this node) and the memory limit of
    this process's cgroup or a parent's (Slurm's task/cgroup, a container)."""
    import psutil

    limits = [(psutil.virtual_memory().total, "the machine's RAM")]
    per_node, per_cpu = environ.get("SLURM_MEM_PER_NODE", ""), environ.get("SLURM_MEM_PER_CPU", "")
    cpus = environ.get("SLURM_CPUS_ON_NODE") or environ.get("SLURM_CPUS_PER_TASK") or "1"
    if per_node.isdigit() and int(per_node) > 0:  # MB; --mem=0 means the whole node
        limits.append((int(per_node) * 2**20, "Slurm's --mem"))
    elif per_cpu.isdigit() and int(per_cpu) > 0 and cpus.isdigit():
        limits.append((int(per_cpu) * int(cpus) * 2**20, "Slurm's --mem-per-cpu x CPUs"))
    cgroup = cgroup_memory_limit(cgroup_root, proc_cgroup)
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    return min(limits)


def memory_for_trials(environ=os.environ):
    """job_memory less what this sweep already holds (this process and its children: Ray's raylet, GCS and idle
    workers), counted when the trials are about to be packed; resident sizes, so shared pages count twice (on
    the safe side)."""
    import psutil

    limit, source = job_memory(environ)
    me = psutil.Process()
    held = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            held += proc.memory_info().rss
        except psutil.Error:  # ended meanwhile
            pass
    return max(0, limit - held), f"{source} less {held / 2**30:.1f} GiB the sweep's driver and Ray hold"


def cgroup_memory_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The lowest memory limit on this process's cgroup and its parents (v2 memory.max, v1
    memory.limit_in_bytes); None where none is set (or cgroups cannot be read)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):  # a parent's limit binds its children too
            try:
                with open(os.path.join(base, *parts[:i], name)) as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 2**60:  # 'max' (v2) and v1's huge number: no limit
                found.append(int(value))
    return min(found) if found else None


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
    from .spec import size_bytes

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
    """Ray resources per trial and trials at a time: {options, slots, per_device, threads, device, note,
    max_calls (trials per worker process, see gpu_worker_max_calls)}.

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
        return dict(options=dict(num_gpus=1.0 / k, num_cpus=0), slots=gpus * k, per_device=k, threads=threads,
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
        return dict(options=dict(num_gpus=0, num_cpus=cpu_share(cpus, slots)), slots=slots, per_device=slots,
                    threads=threads, device="mps", note=note, max_calls=0)
    device = "cpu" if res.device == "auto" else res.device
    # each trial asks Ray for its threads; fewer at a time (memory) ask for a larger share, holding the rest back
    num_cpus = threads if slots == cpus // threads else cpu_share(cpus, slots)
    # bounded by memory: a fresh worker per trial, as the measured one ran (a reused worker keeps the freed
    # blocks of the trials before it in its allocator)
    return dict(options=dict(num_gpus=0, num_cpus=num_cpus), slots=slots, per_device=slots, threads=threads,
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


def remote_for(fn, plan):
    """``fn`` as a Ray remote function with a plan's resources and worker reuse (plan_packing)."""
    import ray

    return ray.remote(max_retries=0, max_calls=plan["max_calls"])(fn).options(**plan["options"])


PROBE_FILE = "packing-probe.json"


PROBE_SECTIONS = ("model", "data", "finetune", "performance")


def probe_key(config, dense_path, gpu, sections=PROBE_SECTIONS):
    """What one trial's GPU footprint depends on: the GPU (name, memory), torch and pruneflow, the dense model's
    checkpoint (its size stands for its shapes) and the study's model, data, fine-tune and performance settings
    (``sections`` of the config; a measured trial's host memory adds pruning and timing)."""
    import hashlib
    import json

    import torch

    from . import __version__

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


def _run_trials(todo, config, dense_path, ckpt_dir, store, spec, progress):
    import ray
    from tqdm import tqdm

    from .monitor import UtilisationSampler
    from .trial import probe_memory, run_trial, run_trial_measured

    cpus, gpus = slot_counts(spec.resources.device)
    probe_file = os.path.join(os.path.dirname(ckpt_dir), PROBE_FILE)
    with local_ray(cpus, gpus), UtilisationSampler(spec.resources.sample_interval_s) as sampler:
        def probe(device):
            config_gpu = dict(config, resources=dict(config["resources"], device=device))
            # single-use worker: its process, CUDA context and cached memory are gone before trials are packed
            return ray.get(ray.remote(max_calls=1)(probe_memory).options(num_gpus=1, num_cpus=0)
                           .remote(config_gpu, dense_path))

        if gpus and spec.resources.trials_per_gpu == "auto":
            import torch

            gpu = [torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory]
            probe = remembered(probe, probe_file, probe_key(config, dense_path, gpu))
        alone = {}  # memory_per_trial: auto: the trial that ran alone to be measured -> its record

        heaviest = heaviest_trial(todo)

        def host_probe(threads):
            t = heaviest
            print(f"memory_per_trial: auto: trial {t.id} runs alone first, to measure a trial's memory", flush=True)
            config_cpu = dict(config, resources=dict(config["resources"], device="cpu"))
            ref = (ray.remote(max_retries=0, max_calls=1)(run_trial_measured).options(num_cpus=threads)
                   .remote(t, config_cpu, dense_path, ckpt_dir, threads))
            while not ray.wait([ref], timeout=1.0)[0]:  # responsive to Slurm's signals, as below
                pass
            try:
                record, peak = ray.get(ref)
            except Exception as e:  # the worker died: no measurement
                record, peak = worker_died(t, e, spec), None
            alone[t.id] = (t, record)
            return dict(host_bytes=peak, kept_fraction=kept_fraction(t)) if record["status"] == "done" else None

        if spec.resources.memory_per_trial == "auto" and not gpus:
            from .infer.device import describe

            host = ["host", describe("cpu"), trial_threads(spec.resources.threads_per_trial, cpus, len(todo))]
            # the pruning settings count, not which sparsities are swept: a grown study or another shard reuses
            # the measurement, if the trial measured trained at least as much of the model as this run's largest
            grid_free = dict(config, prune={k: v for k, v in config["prune"].items()
                                            if k not in ("sparsities", "mac_targets")})
            largest = kept_fraction(heaviest)
            host_probe = remembered(host_probe, probe_file, probe_key(grid_free, dense_path, host,
                                                                      PROBE_SECTIONS + ("prune", "latency")),
                                    fields=("host_bytes",), usable=lambda e: e.get("kept_fraction", 0) >= largest)
        plan = plan_packing(spec, cpus, gpus, probe, mps=not gpus and mps_available(), n_trials=len(todo),
                            host_probe=host_probe)
        config = dict(config, resources=dict(config["resources"], device=plan["device"]))
        threads = plan["threads"]
        if plan["note"]:
            print(plan["note"], flush=True)
        print(f"running {len(todo)} trial(s): {plan['slots']} at a time on {gpus} GPU(s) / {cpus} CPU(s), "
              f"{threads} thread(s) each", flush=True)
        remote = remote_for(run_trial, plan)
        attempts = {t.id: 0 for t in todo}
        pending = {}
        counts = {"done": 0, "failed": 0}

        def keep(t, record, per_device=plan["per_device"]):
            record.update(attempts=attempts[t.id], trials_per_device=per_device)
            record.pop("traceback", None)
            store.add(record)
            counts[record["status"] if record["status"] == "done" else "failed"] += 1

        def submit(t):
            attempts[t.id] += 1
            pending[remote.remote(t, config, dense_path, ckpt_dir, threads)] = t

        bar = tqdm(total=len(todo), unit="trial", disable=not progress, dynamic_ncols=True)
        for t, record in alone.values():  # measured alone: kept (it ran one at a time), or retried below
            attempts[t.id] = 1
            if record["status"] == "done" or attempts[t.id] > spec.retries:
                keep(t, record, per_device=1)
                bar.update(1)
                if record["status"] != "done":
                    bar.write(f"trial {t.id} failed: {record['error'][:300]}")
            else:
                bar.write(f"trial {t.id} failed ({record['error'][:200]}); retrying (1/{spec.retries})")
                submit(t)
        for t in todo:
            if t.id not in alone:
                submit(t)
        try:
            while pending:
                bar.set_postfix(done=counts["done"], failed=counts["failed"], running=min(len(pending), plan["slots"]))
                # a short timeout keeps the driver responsive to Slurm's signals (handlers run between waits)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                t = pending.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except Exception as e:  # the worker died (OOM, segfault): same treatment as a raised error
                    record = worker_died(t, e, spec)
                if record["status"] != "done" and attempts[t.id] <= spec.retries:
                    bar.write(f"trial {t.id} failed ({record['error'][:200]}); retrying ({attempts[t.id]}/{spec.retries})")
                    submit(t)
                    continue
                keep(t, record)
                if record["status"] != "done":
                    bar.write(f"trial {t.id} failed: {record['error'][:300]}")
                bar.update(1)
        finally:
            if pending:  # stopped early (SIGTERM, Ctrl-C): keep the trials that finished in the meantime
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    try:
                        record = ray.get(ref, timeout=0)
                    except Exception:
                        continue
                    if record["status"] == "done":
                        keep(pending[ref], record)
            bar.set_postfix(done=counts["done"], failed=counts["failed"], running=0)
            bar.close()
            sampler.stop()  # before writing: the series is complete
            store.add_utilisation(sampler.series(), dict(sampler.attrs, trials_per_device=plan["per_device"],
                                                         slots=plan["slots"]))


def worker_died(t, e, spec):
    """The failure record of trial ``t`` whose worker process died (``e``: Ray's error), e.g. killed for memory."""
    hint = ("" if spec.resources.memory_per_trial else " (if the node ran out of memory: "
            "resources.memory_per_trial runs fewer trials at a time)")
    return dict(id=t.id, arm=t.arm, method=t.method, sparsity=t.sparsity, seed=t.seed,
                status="failed", error=f"worker died{hint}: {type(e).__name__}: {str(e)[:500]}")


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


_stopped_by = None  # the signal that stopped this sweep (exit_on_sigterm)


def exit_on_sigterm():
    """Slurm's timeout/preemption signal (sbatch --signal) or scancel: leave through the normal exits, so Ray is
    shut down, the trials that finished meanwhile are recorded and the results lock is released. Set again after
    ray.init, whose core worker installs a crash handler for SIGTERM (a C++ stack dump and exit 134)."""
    import signal

    def stop(signum, frame):
        global _stopped_by
        _stopped_by = signum
        print(f"stopped by signal {signum} (SIGTERM): finished trials are in the results file; the same command "
              "resumes", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def mps_available():
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@contextlib.contextmanager
def local_ray(cpus, gpus):
    """A Ray instance private to this process: its own temp dir (two jobs on a node never collide), no
    dashboard, a small object store (trials exchange only small records)."""
    import ray

    tag = os.environ.get("SLURM_JOB_ID", "")
    tag = f"{tag}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}_{os.getpid()}" if tag else str(os.getpid())
    temp_dir = os.path.join("/tmp", f"pf-ray-{tag}")  # short: Ray's socket paths must stay < 108 bytes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir,
                 object_store_memory=100 * 1024 * 1024, log_to_driver=False, logging_level="ERROR")
    except SystemExit as e:  # SIGTERM during start-up reaches Ray's own handler, sys.exit(15)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if e.code == 15:
            print("stopped by signal 15 (SIGTERM) while Ray started; the same command resumes", file=sys.stderr)
            raise SystemExit(143) from None
        raise
    exit_on_sigterm()
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def describe_env(device):
    """Provenance: library versions and hardware, stored in every results file."""
    import importlib.metadata as md

    import torch

    from .infer.device import describe

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
                requested_device=device, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""))


def _speedup(r):
    """The trial's side-by-side speedup over the dense model, e.g. '2.41x' (blank in files from before it)."""
    return f"{r['speedup']:.2f}x" if r.get("speedup") else ""


def print_summary(records):
    """The terminal table: method, sparsity, params, MACs, val acc, median latency, speedup over the dense model."""
    if not records:
        return
    order = {"dense": 0, "control": 1, "pruned": 2}
    records = sorted(records, key=lambda r: (order.get(r.get("arm"), 3), r["method"], r["sparsity"], r["seed"]))
    w_id = max(18, *(len(r["id"]) for r in records))  # taylor@depgraph-x2.00-s0 is 24
    w_m = max(8, *(len(r["method"]) for r in records))
    head = (f"{'trial':<{w_id}} {'method':<{w_m}} {'sparsity':>8} {'params':>11} {'MACs':>12} {'val acc %':>9} "
            f"{'latency ms':>11} {'speedup':>7}  status")
    print(head)
    print("-" * len(head))
    for r in records:
        start = f"{r['id']:<{w_id}} {r['method']:<{w_m}} {r['sparsity']:>8.2f} "
        if r["status"] == "done":
            print(f"{start}{r['params']:>11,} {r['macs']:>12,} {100 * r['val_acc']:>9.2f} "
                  f"{1e3 * r['latency_median']:>11.3f} {_speedup(r):>7}  done")
        else:
            print(f"{start}{'':>11} {'':>12} {'':>9} {'':>11} {'':>7}  FAILED: {str(r.get('error', ''))[:80]}")
    failed = sum(r["status"] != "done" for r in records)
    # the whole results file, earlier runs included; the line after it counts this run's trials
    print(f"{len(records) - failed} done, {failed} failed in this shard's results file")


def cli(job, shard=None, out="results", dense=None, progress=True, train_only=False, **overrides):
    """Run one node's shard of a pruning study.

    Args:
      job: the study's job file (jobs/*.yaml).
      shard: i/n — run every n-th trial starting at i (default 0/1: all of them).
      out: results root; the study's files go to OUT/<study>/.
      dense: use this dense checkpoint (it must exist) instead of OUT/<study>/dense.safetensors; with
        --train_only, where to train it.
      progress: show progress bars.
      train_only: only make sure the dense checkpoint exists (train it if absent), then stop.
      overrides: any job-file setting as a dotted flag, e.g. --finetune.epochs 1 --resources.device cpu.
    """
    require("pruneflow.sweep", "yaml", "h5py", "ray", "tqdm", "psutil")  # before hours of dense training
    check_flags(overrides)
    # Fire passes --progress false as the string 'false', which is true
    progress, train_only = check_flag(progress, "progress"), check_flag(train_only, "train_only")
    exit_on_sigterm()
    t0 = time.perf_counter()
    try:
        summary = run_sweep(job, shard, out, dense, progress, train_only, **overrides)
    except SystemExit:
        if _stopped_by:  # Ray turns the handler's SystemExit into exit status 1 when it lands inside ray.wait
            raise SystemExit(128 + _stopped_by) from None
        raise
    if train_only:
        print(f"dense checkpoint ready: {summary['file']}")
        return
    print(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped (already done) "
          f"in {time.perf_counter() - t0:.0f} s; results: {summary['file']}")
    if summary["failed"]:
        sys.exit(1)


def check_flags(overrides):
    """A misspelt flag of this command arrives as a job-file override (Fire strips a 'no' prefix too:
    --noprogres becomes progres=False): name the flag it was probably meant to be."""
    import dataclasses
    import difflib
    import inspect

    from .spec import StudySpec

    keys = {f.name for f in dataclasses.fields(StudySpec)}
    flags = {name: p.default for name, p in inspect.signature(cli).parameters.items() if name not in ("job", "overrides")}
    for key in overrides:
        name = key.replace("-", "_")
        if "." not in name and name not in keys:
            hint = difflib.get_close_matches(name, flags, n=1)
            if hint:
                negated = f" (or --no{hint[0]})" if isinstance(flags[hint[0]], bool) else ""
                raise UserError(f"unknown flag --{key}: did you mean --{hint[0]}{negated}?")


def main():
    from .infer.errors import run_cli

    run_cli(cli, name="pruneflow.sweep")


if __name__ == "__main__":
    main()
