"""One node's sweep: ``python -m pruneflow.sweep jobs/<study>.yaml [--shard i/n] [--out results]``.

Trains each seed's dense model if its checkpoint is absent, expands the grid, and hands this node's shard to the trial
pool (packed K per GPU, or per CPU slot). The driver is the only writer of the shard's HDF5 file and adds each
trial the moment it finishes, so a kill loses nothing finished and a re-run of the same command skips what is
done.
"""

import dataclasses
import fcntl
import os
import sys
import time

from .. import cluster
from ..errors import UserError, check_flag, check_writable_dir, require
from .summary import describe_env, print_summary


def run_sweep(job, shard=None, out="results", dense=None, progress=True, train_only=False, **overrides):
    """Run this node's shard of a study; returns {'done': n, 'failed': n, 'skipped': n, 'file': path}.

    ``train_only`` stops after the dense checkpoint exists (the pipeline's first Slurm job)."""
    from ..results import ResultStore, read_records, study_files
    from ..spec import config_of, grid, load_spec, parse_shard, resolve, shard_trials

    spec, job_text = load_spec(job, overrides)
    lat = spec.latency
    if "onnxruntime" in lat.runtimes or lat.target_runtime == "onnxruntime" and spec.prune.speedup_targets:
        # before dense training, not in every trial's record
        require("latency.runtimes: onnxruntime", "onnx", "onnxruntime", "onnxscript")
    i, n = parse_shard(shard)
    # ops MPS lacks run on the CPU instead of failing, in the dense training's process and Ray's workers alike
    # (both inherit it); set before either starts
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    # GPU indices counted by PCI bus, as nvidia-smi and NVML (the utilisation sampler) count them: CUDA's own
    # default puts the fastest GPU first, so on a node with mixed GPUs the sampler would watch the wrong ones
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    cluster.keep_to_slurm_gpus(spec.resources.device)  # a Slurm job given no GPUs leaves the node's GPUs alone
    check_inputs(spec, dense, train_only)
    # what the trials run with and the files store: every default filled in (the dense checkpoint named below)
    run_spec = resolve(spec)
    if not train_only:  # here, not after dense training in every trial
        check_pruning_selection(run_spec.model, spec.data.dataset, run_spec.prune)
    study_dir = check_writable_dir(os.path.join(out, spec.study))
    ckpt_dir = check_writable_dir(os.path.join(study_dir, "checkpoints"))
    given = dense or spec.train.checkpoint  # one dense model for every seed, else one per seed
    dense_paths = {s: given or os.path.join(study_dir, f"dense-s{s}.safetensors") for s in spec.seeds}
    named = os.path.abspath(given or os.path.join(study_dir, "dense-s<seed>.safetensors"))
    run_spec = dataclasses.replace(run_spec, train=dataclasses.replace(run_spec.train, checkpoint=named))
    # the device kind the trials run on shapes results as much as any setting: a re-run may not change it
    config = dict(config_of(run_spec), device_kind=device_kind(spec.resources.device))
    if train_only:
        for s in spec.seeds:
            ensure_dense(dense_paths[s], s, spec, config, progress, given=bool(dense))
        return {"done": 0, "failed": 0, "skipped": 0, "file": ", ".join(sorted(set(dense_paths.values())))}
    trials = shard_trials(grid(spec), (i, n))
    env = describe_env(spec.resources.device)
    path = os.path.join(study_dir, f"shard-{i}-of-{n}.h5")
    # Every results file of the study, not just this shard's: a grown grid or another shard count moves trials
    # between shards, and a trial done in any file is done (re-running it would duplicate its record and
    # overwrite its checkpoint).
    others = [p for p in study_files(study_dir) if os.path.abspath(p) != os.path.abspath(path)]
    for p in ([path] if os.path.exists(path) else []) + others:
        check_same_settings(p, config)
    done_elsewhere = {r.id for p in others for r in read_records(p) if r.status == "done"}
    with ResultStore(path, spec.study, job_text, config, f"{i}/{n}", env) as store:
        store.update_settings(job_text, config)  # a grown grid: the file describes the latest run
        done = store.done_ids() | done_elsewhere
        todo = [t for t in trials if t.id not in done]
        print(f"study {spec.study}: shard {i}/{n} has {len(trials)} trial(s), {len(done & {t.id for t in trials})} "
              f"already done; results -> {path}", flush=True)
        if todo:
            seeds = sorted({t.seed for t in todo})
            for s in seeds:
                ensure_dense(dense_paths[s], s, spec, config, progress, given=bool(dense))
            run_trials(todo, run_spec, {s: dense_paths[s] for s in seeds}, ckpt_dir, store, progress)
        records = [r for r in read_records(path) if r.id in {t.id for t in trials}]
    print_summary(records)
    failed = [r for r in records if r.status != "done"]
    return {"done": len(records) - len(failed), "failed": len(failed), "skipped": len(trials) - len(todo), "file": path}


def device_kind(device):
    """cpu | cuda | mps: what resources.device resolves to on this node."""
    from ..infer.device import resolve_device

    return resolve_device(device).type


def check_inputs(spec, dense, train_only):
    """What would fail later (in the dense training, or in every trial) fails now, before anything is written."""
    from ..infer.data import load_split
    from ..infer.device import resolve_device

    resolve_device(spec.resources.device)  # 'cuda' on a node without one
    if dense and not train_only and not os.path.exists(dense):
        raise UserError(f"--dense {dense} does not exist (to train the dense model there first: the same command "
                        "with --train_only)")
    if spec.train.checkpoint and not dense and not os.path.exists(spec.train.checkpoint):
        raise UserError(f"train.checkpoint {spec.train.checkpoint} does not exist")
    if spec.data.dataset in ("mnist", "cifar10", "cifar100") and not spec.data.download:
        load_split(spec.data.dataset, "test", spec.data.root)  # not staged: where it looked and how to stage it


def check_pruning_selection(model_spec, dataset, prune_spec):
    """prune.exclude and prune.op_types checked on the study's model, built untrained (the dense checkpoint
    has the same layers: check_dense refuses another architecture)."""
    from ..infer.checkpoint import build_from_meta
    from ..infer.data import dataset_info
    from ..prune import check_selection
    from ..train import model_meta

    meta = model_meta(model_spec.arch, dataset, model_spec.stem, dataset_info(dataset)["classes"],
                      dataclasses.asdict(model_spec.vit))
    check_selection(build_from_meta(meta), prune_spec.op_types, prune_spec.exclude)


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
    from ..results import read_file_attrs
    from ..spec import absent_defaults, rerun_settings

    free, since = rerun_settings(), absent_defaults()
    before, now = flat(read_file_attrs(path)["config"]), flat(config)
    before.update({k: v for k, v in since.items() if k not in before})  # an older file ran with the default
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
               and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)]
    if changed:
        what = "; ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise UserError(f"{path} holds trials made with other settings: {what}{more}; re-run with the file's "
                        "settings, or give the new ones their own --out (or study name)")


def check_dense(path, meta, seed, spec, config, given):
    """An existing dense checkpoint must be this study's model on this study's data; one this study trained
    (not ``given`` by --dense or train.checkpoint) must also have its training settings and ``seed``: a re-run
    with --train.epochs 4 used to reuse a 1-epoch dense model and record 4. Any dense model must have trained
    without this study's val images (its recorded carve), or val would score images it learnt."""
    import json

    from ..data import split_info
    from ..train import get_recipe

    want = {"arch": spec.model.arch, "dataset": spec.data.dataset}
    if spec.model.arch != "simple_cnn":
        want["stem"] = spec.model.stem
    from ..infer.vit import VIT_ARCHS

    if spec.model.arch in VIT_ARCHS:
        want["vit"] = dataclasses.asdict(spec.model.vit)
    if not given:  # the recipe as train_dense stored it: resolved, with the job's batch size and lr, via JSON
        recipe = get_recipe(config["train"]["recipe"], batch_size=spec.train.batch_size, lr=spec.train.lr)
        want.update(epochs=spec.train.epochs, recipe=json.loads(json.dumps(recipe)), seed=seed)
    differ = [f"{k} {meta.get(k)!r} (the study: {v!r})" for k, v in want.items() if k in meta and meta[k] != v]
    if differ:
        fix = ("pass a dense checkpoint of this model and data set" if given else
               "delete it to train a new one, or run with the settings it was trained with")
        raise UserError(f"dense checkpoint {path} does not fit this study: {'; '.join(differ)}; {fix}")
    carve = split_info(spec.data.dataset, spec.data.root, spec.data.download, spec.data.carve())
    if (meta.get("val_split") or {}).get("sha") != carve["sha"]:
        had = meta.get("val_split") or {}
        was = (f"a val carve of {had['size']} images, seed {had['seed']}" if had else
               "no recorded val carve (trained before pruneflow held val out: on every training image)")
        raise UserError(f"dense checkpoint {path} was trained with {was}; this study holds out {carve['size']} "
                        f"images (data.val_size, seed {carve['seed']}), so its val split would score images the "
                        "model learnt: train a new dense model (delete it, or give another --dense)")


def ensure_dense(dense_path, seed, spec, config, progress, given=False):
    """Train seed ``seed``'s dense model unless its checkpoint exists (``given``: named by --dense, not trained by
    this study); concurrent shards wait for one trainer."""
    from ..infer.checkpoint import read_meta
    from ..isolated import run_isolated
    from ..train import train_dense

    if os.path.exists(dense_path):
        check_dense(dense_path, read_meta(dense_path), seed, spec, config, given or bool(spec.train.checkpoint))
        return
    if spec.train.checkpoint:
        raise UserError(f"train.checkpoint {dense_path} does not exist")
    with open(dense_path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another shard may be training it right now
        if os.path.exists(dense_path):
            return
        print(f"training the dense {spec.model.arch} on {spec.data.dataset} for {spec.train.epochs} epoch(s), "
              f"seed {seed} -> {dense_path}", flush=True)
        # in a process of its own: whatever the training held on the GPU is released before trials are packed
        run_isolated(train_dense, "dense training", arch=spec.model.arch, dataset=spec.data.dataset, out=dense_path,
                     epochs=spec.train.epochs, recipe=config["train"]["recipe"], stem=spec.model.stem,
                     seed=seed, device=spec.resources.device, data_root=spec.data.root,
                     download=spec.data.download, progress=progress, batch_size=spec.train.batch_size,
                     lr=spec.train.lr, config=config, perf=config["performance"], val=spec.data.carve(),
                     vit=dataclasses.asdict(spec.model.vit))


def slot_counts(device="auto"):
    """(CPUs, GPUs) this job may use: Slurm's allocation when inside a job, else the machine's (CPUs: job_cpus)."""
    cpus = cluster.job_cpus()
    gpus = 0
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        import torch

        gpus = torch.cuda.device_count()
        note = cluster.slurm_gpus_unused_note(gpus)
        if note:
            print(note, file=sys.stderr, flush=True)
    return cpus, gpus


def run_trials(todo, spec, dense_paths, ckpt_dir, store, progress):
    """This node's ``todo`` trials of the resolved ``spec`` ({seed: dense checkpoint} in ``dense_paths``), packed
    as packing.plan_packing decides, each record stored as it comes back."""
    from ..spec import config_of
    from ..monitor import UtilisationSampler
    from ..trial import probe_memory, run_trial, run_trial_measured
    from . import packing
    from .pool import TrialPool, local_ray, remote_for, run_alone, worker_died

    res = spec.resources
    cpus, gpus = slot_counts(res.device)
    probe_file = os.path.join(os.path.dirname(ckpt_dir), packing.PROBE_FILE)
    config = config_of(spec)
    dense_path = dense_paths[min(dense_paths)]  # the probes measure one seed's: every seed's has the same shape
    on = lambda device: dataclasses.replace(spec, resources=dataclasses.replace(res, device=device))  # noqa: E731
    with local_ray(cpus, gpus), UtilisationSampler(res.sample_interval_s) as sampler:
        probe = host_probe = None
        if gpus and res.trials_per_gpu == "auto":
            import torch

            # single-use worker: its process, CUDA context and cached memory are gone before trials are packed
            probe = lambda device: run_alone(probe_memory, on(device), dense_path, num_gpus=1, num_cpus=0,  # noqa: E731
                                             max_retries=3)  # Ray's default: a crashed probe is measured again
            gpu = [torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory]
            probe = packing.remembered(probe, probe_file, packing.probe_key(config, dense_path, gpu))
        alone = {}  # memory_per_trial: auto: the trial measured alone -> its record
        heaviest = packing.heaviest_trial(todo)

        def measure_host(threads):
            t = heaviest
            print(f"memory_per_trial: auto: trial {t.id} runs alone first, to measure a trial's memory", flush=True)
            try:
                record, peak = run_alone(run_trial_measured, t, on("cpu"), dense_paths, ckpt_dir, threads,
                                         num_cpus=threads)
            except Exception as e:  # the worker died: no measurement
                record, peak = worker_died(t, e, memory_bounded=True), None
            alone[t.id] = (t, record)
            return dict(host_bytes=peak, kept_fraction=packing.kept_fraction(t)) if record.status == "done" else None

        if res.memory_per_trial == "auto" and not gpus:
            from ..infer.device import describe

            host = ["host", describe("cpu"), packing.trial_threads(res.threads_per_trial, cpus, len(todo))]
            # the pruning settings count, not which sparsities are swept: a grown study or another shard reuses
            # the measurement if the trial measured trained at least as much of the model as this run's largest
            grid_free = dict(config, prune={k: v for k, v in config["prune"].items()
                                            if k not in ("sparsities", "mac_targets")})
            largest = packing.kept_fraction(heaviest)
            key = packing.probe_key(grid_free, dense_path, host, packing.PROBE_SECTIONS + ("prune", "latency"))
            host_probe = packing.remembered(measure_host, probe_file, key, fields=("host_bytes",),
                                            usable=lambda e: e.get("kept_fraction", 0) >= largest)
        plan = packing.plan_packing(spec, cpus, gpus, probe, mps=not gpus and mps_available(), n_trials=len(todo),
                                    host_probe=host_probe)
        if plan.note:
            print(plan.note, flush=True)
        print(f"running {len(todo)} trial(s): {plan.slots} at a time on {gpus} GPU(s) / {cpus} CPU(s), "
              f"{plan.threads} thread(s) each", flush=True)
        pool = TrialPool(store, remote_for(run_trial, plan), (on(plan.device), dense_paths, ckpt_dir, plan.threads),
                         spec.retries, plan.per_device, bool(res.memory_per_trial), len(todo), progress)
        try:
            for t, record in alone.values():  # measured alone: kept (it ran one at a time), or retried
                pool.settle(t, record, per_device=1)
            pool.run([t for t in todo if t.id not in alone], plan.slots)
        finally:
            sampler.stop()  # before writing: the series is complete
            store.add_utilisation(sampler.series(), dict(sampler.attrs, trials_per_device=plan.per_device,
                                                         slots=plan.slots))


def mps_available():
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


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
    cluster.install_stop_handlers("driver")
    t0 = time.perf_counter()
    try:
        summary = run_sweep(job, shard, out, dense, progress, train_only, **overrides)
    except SystemExit:
        if cluster.stopped_by():  # Ray turns the handler's SystemExit into exit status 1 inside ray.wait
            raise SystemExit(128 + cluster.stopped_by()) from None
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

    from ..spec import StudySpec

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
    from ..cli import run_cli

    run_cli(cli, name="pruneflow.sweep")
