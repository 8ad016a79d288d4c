"""One trial of a study, start to finish: load its seed's dense checkpoint -> prune -> fine-tune -> evaluate
on train, val and test -> time inference -> save the portable checkpoint. Returns a TrialRecord for the sweep's
driver to store.

Every trial of a seed starts from the same dense checkpoint file: nothing carries over from one trial to the next.
"""

import dataclasses
import os
import time
import traceback

from .files import DiskFull
from .record import TrialRecord


def run_trial(trial, spec, dense_paths, ckpt_dir, threads=1):
    """Run ``trial`` (a spec.Trial) of the resolved ``spec`` (spec.resolve) from ``dense_paths[trial.seed]`` (or
    one path for every seed); never raises: a failure comes back as a TrialRecord with status 'failed'."""
    from .cluster import install_stop_handlers

    install_stop_handlers("worker")  # the scheduler's warnings are the driver's to act on
    t0, started = time.perf_counter(), time.time()
    fields = dict(sparsity=trial.sparsity)  # a pruned trial's _run reports the sparsity it reached instead
    try:
        dense_path = dense_paths if isinstance(dense_paths, str) else dense_paths[trial.seed]
        fields.update(_run(trial, spec, dense_path, ckpt_dir, threads), status="done", error="")
    except DiskFull as e:  # not the trial's fault: the driver stops the sweep and stores nothing
        fields.update(status="disk_full", error=str(e))
    except Exception as e:  # isolate: one trial's failure must not stop the study
        fields.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000],
                      traceback=traceback.format_exc()[-4000:])
    return TrialRecord(id=trial.id, arm=trial.arm, method=trial.method, seed=trial.seed, model=spec.model.arch,
                       round_to=trial.round_to or 0 if trial.arm == "pruned" else 0,
                       dataset=spec.data.dataset, target_mac_reduction=trial.target,
                       target_speedup=trial.speedup_target, host=os.uname().nodename,
                       pid=os.getpid(), started_at=started, wall_s=time.perf_counter() - t0, ended_at=time.time(),
                       **fields)


def run_trial_measured(trial, spec, dense_paths, ckpt_dir, threads=1):
    """(run_trial's TrialRecord, this process's peak resident memory in bytes). In a single-use worker the peak is the
    trial's own: imports, pruning, fine-tuning, evaluation and timing (resources.memory_per_trial: auto)."""
    record = run_trial(trial, spec, dense_paths, ckpt_dir, threads)
    return record, peak_rss_bytes()


def peak_rss_bytes():
    """This process's peak resident memory so far, in bytes (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


def probe_memory(spec, dense_path, steps=4):
    """What one trial occupies on its GPU: a few fine-tuning steps of the dense model (the largest a trial
    trains) with the study's recipe, loader, precision, compile mode and distillation teacher, then one
    evaluation batch. Returns {footprint_bytes: the whole process's share of the device (CUDA context, cuDNN
    workspaces, the caching allocator's pool, the device-resident data set), total_bytes, max_allocated_bytes}.
    Runs in a Ray task that holds a whole GPU, so nothing else is counted (on a shared GPU the footprint errs on
    the large side)."""
    import itertools

    import torch

    from .infer import checkpoint as ckpt_io
    from .infer.device import resolve_device
    from .step import WARMUP, make_step
    from .train import distiller, evaluate, get_recipe, make_optimizer, prepare, train_one_epoch

    dev = resolve_device(spec.resources.device)
    if dev.type != "cuda":
        raise ValueError(f"memory probing needs a CUDA device, got {dev}")
    model, meta = ckpt_io.load(dense_path)
    ft, data = spec.finetune, spec.data
    recipe = get_recipe(ft.recipe, batch_size=ft.batch_size, lr=ft.lr)
    model, train_b, val_b, p = prepare(model, meta["dataset"], recipe, 0, dev, data.root, data.download,
                                       spec.performance, data.carve())
    opt, _ = make_optimizer(model, recipe, 1, p)
    # a distilled trial holds its teacher too: the same dense weights again, and its forward's activations
    loss_fn = distiller(ckpt_io.load(dense_path)[0], ft.distill, dev, p) if ft.distill and ft.epochs else None
    # compiled and recorded as the trials will be: CUDA graphs keep their own memory pools, which a trial holds too
    step = make_step(model, opt, p, loss_fn=loss_fn)
    steps = max(steps, WARMUP + 2) if step.graph is not None else steps  # the warm-up, the capture and a replay
    train_one_epoch(model, itertools.islice(iter(train_b), steps), step)
    evaluate(model, itertools.islice(iter(val_b), 1), p.amp_dtype)  # an evaluation batch, as fit runs them
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    return dict(footprint_bytes=int(total - free), total_bytes=int(total),
                max_allocated_bytes=int(torch.cuda.max_memory_allocated(dev)))


def _run(trial, spec, dense_path, ckpt_dir, threads):
    import torch

    from .infer import checkpoint as ckpt_io
    from .infer.device import describe, resolve_device
    from .infer.timing import paired_speedup, summarize, time_forward, time_forward_paired
    from .prune import calibration_batches, parse_method, prune, prune_to_mac_reduction, pruned_meta
    from .spec import config_of
    from .step import resolve_perf
    from .train import evaluate, finetune

    torch.set_num_threads(max(1, int(threads)))
    dev = resolve_device(spec.resources.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    clock = _StageClock()
    model, meta = ckpt_io.load(dense_path)
    dense_seed = int(meta.get("seed", -1))
    clock.stage("load")
    stats = {"params_dense": ckpt_io.count_params(model), "macs_dense": ckpt_io.count_macs(model, meta["input_shape"])}
    stats.update(params=stats["params_dense"], macs=stats["macs_dense"], mac_reduction=1.0, channel_sparsity=0.0,
                 weight_sparsity=0.0, nonzero_params=stats["params_dense"])
    backend, search, points, history = "", None, None, None
    ft, data = spec.finetune, spec.data
    epochs = 0 if trial.arm == "dense" else ft.epochs
    distilled = ft.distill is not None and epochs > 0
    teacher = ckpt_io.load(dense_path)[0] if distilled else None  # the seed's own dense model teaches

    def tune(m, m_meta, n):  # fine-tune m for n epochs, as every arm of the study is
        return finetune(m, m_meta, n, ft.recipe, trial.seed, dev, data.root, data.download, batch_size=ft.batch_size,
                        lr=ft.lr, perf=spec.performance, teacher=teacher, distill=ft.distill)

    if trial.arm == "pruned":
        p = spec.prune
        criterion, backend = parse_method(trial.method)
        kwargs = dict(op_types=p.op_types, exclude=p.exclude, dependency_aware=p.dependency_aware,
                      round_to=trial.round_to, global_pruning=p.global_pruning, heads=p.heads,
                      calibration=calibration_batches(meta, data_root=spec.data.root) if criterion == "taylor" else None)
        if trial.target:
            model, stats = prune_to_mac_reduction(model, trial.method, trial.target, meta["input_shape"], **kwargs)
        elif trial.speedup_target:
            model, stats, search = _prune_to_speedup(model, trial, spec, meta, dev, kwargs)
        elif p.schedule == "iterative":  # prune and fine-tune in rounds: the epochs are spent here
            from .schedule import prune_iteratively

            round_meta = dict(meta, method=trial.method)
            model, stats, points, history = prune_iteratively(
                model, trial.method, trial.sparsity, meta["input_shape"], p.steps, p.ramp, epochs,
                lambda m, n: tune(m, round_meta, n), **kwargs)
        else:
            model, stats = prune(model, trial.method, trial.sparsity, meta["input_shape"], **kwargs)
        meta = pruned_meta(meta, stats)
    clock.stage("prune")
    if history is None:
        history = tune(model, meta, epochs)
    teacher = None  # its memory back before scoring and timing
    clock.stage("finetune")
    # Every arm scored the same way: eval mode, no augmentation, each whole split (the running accuracy of the
    # last epoch would mix in dropout and the weights' drift over the epoch). val and test keep every image's
    # prediction: the report tests pruned against control on the same images.
    from .data import eval_batches

    perf = resolve_perf(spec.performance, dev)
    batches = {split: eval_batches(meta["dataset"], split, dev, data.root, data.carve())
               for split in ("train", "val", "test")}
    scores = {split: evaluate(model, b, perf.amp_dtype, predictions=split != "train") for split, b in batches.items()}
    labels = {split: batches[split].labels.to("cpu", torch.uint8) for split in ("val", "test")}
    clock.stage("evaluate")
    lat = spec.latency
    x = torch.randn(lat.batch_size, *meta["input_shape"], device=dev)
    torch.set_num_threads(lat.threads)  # the study's one setting, not this trial's training threads
    channels_last = perf.channels_last  # finetune's layout, timed so
    if channels_last:  # an input in the model's layout, as pruneflow.infer times it (else the first layer converts)
        x = x.contiguous(memory_format=torch.channels_last)
    dense_model = None
    if trial.arm == "dense":
        samples, dense_samples, speedup = time_forward(model.to(dev), x, lat.warmup, lat.trials), [], 1.0
    else:
        # The dense model timed alongside, call by call: the speedup is measured side by side, so the other
        # trials packed on this device (or any drift) slow both sides alike instead of skewing the ratio.
        dense_model, _ = ckpt_io.load(dense_path)
        dense_model.to(dev)
        if channels_last:  # the layout finetune gave the trial's model
            dense_model.to(memory_format=torch.channels_last)
        samples, dense_samples = time_forward_paired(model.to(dev), dense_model, x, lat.warmup, lat.trials)
        speedup = paired_speedup(samples, dense_samples)
    deploy = []
    if list(lat.runtimes) != ["eager"] or lat.batch_sizes:  # the deployment runtimes, each paired the same way
        from .infer.deploy import time_deployed

        deploy = time_deployed(model, dense_model, meta["input_shape"], dev, lat.runtimes,
                               lat.batch_sizes or [lat.batch_size], lat.warmup, lat.trials, channels_last,
                               lat.compile_mode, lat.threads)
    del dense_model
    timing = summarize(samples)
    clock.stage("time")
    path = os.path.join(ckpt_dir, f"{trial.id}.safetensors")
    sparsity = stats.get("sparsity", trial.sparsity) if trial.arm == "pruned" else 0.0
    meta = dict(meta, method=trial.method, sparsity=sparsity, arm=trial.arm, seed=trial.seed,
                accuracy=scores["val"][1], test_accuracy=scores["test"][1], finetune_epochs=epochs,
                config=config_of(spec))
    ckpt_io.save(model, path, meta)
    clock.stage("save")
    return dict(
        **{f"seconds_{k}": v for k, v in clock.seconds.items()}, **peak_memory(dev),
        seconds_speedup=stats.get("seconds_speedup", 0.0),  # the part of seconds_prune spent in NNI's speed-up
        backend=backend, sparsity=sparsity, params=stats["params"], macs=stats["macs"], params_dense=stats["params_dense"], macs_dense=stats["macs_dense"],
        mac_reduction=stats["mac_reduction"], channel_sparsity=stats["channel_sparsity"],
        weight_sparsity=stats["weight_sparsity"], nonzero_params=stats["nonzero_params"],
        dependency_aware=bool(stats.get("dependency_aware", False)),
        train_acc=scores["train"][1], val_acc=scores["val"][1], val_loss=scores["val"][0],
        test_acc=scores["test"][1], test_loss=scores["test"][0], dense_seed=dense_seed,
        val_pred=scores["val"][2].numpy(), test_pred=scores["test"][2].numpy(),
        val_labels=labels["val"].numpy(), test_labels=labels["test"].numpy(),
        split_sha=(meta.get("val_split") or {}).get("sha", ""), precision=_precision(perf.amp_dtype),
        compile=str(spec.performance.compile),
        latency_mean=timing["mean"], latency_std=timing["std"], latency_median=timing["median"], latency_p95=timing["p95"],
        speedup=speedup, latency_dense=dense_samples,
        device=str(dev), device_name=describe(dev), checkpoint=os.path.relpath(path, os.path.dirname(ckpt_dir)), architecture=str(model),
        epochs=[e for e in history if e["epoch"] > 0], latency=samples,
        latency_settings=dict(batch_size=lat.batch_size, warmup=lat.warmup, device=str(dev),
                              threads=lat.threads, channels_last=bool(channels_last)),
        widths=ckpt_io.layer_widths(model), deploy=deploy, **_search_fields(search),
        **(dict(distill_teacher=os.path.basename(dense_path), distill_alpha=ft.distill.alpha,
                distill_temperature=ft.distill.temperature) if distilled else {}),
        **(dict(schedule=f"iterative {spec.prune.ramp} x{spec.prune.steps}", prune_points=[
            dataclasses.asdict(pt) for pt in points]) if points else {}),
    )


def _prune_to_speedup(model, trial, spec, meta, dev, kwargs):
    """Speedup-target mode: bisection on measured paired speedup in latency.target_runtime at target_batch,
    timed with the study's timing threads and layout (pruneflow/speedup.py)."""
    import torch

    from .speedup import prune_to_speedup
    from .step import resolve_perf

    lat, threads = spec.latency, torch.get_num_threads()
    torch.set_num_threads(lat.threads)
    try:
        return prune_to_speedup(model, trial.method, trial.speedup_target, meta["input_shape"], dev,
                                runtime=lat.target_runtime, batch_size=lat.target_batch or lat.batch_size,
                                channels_last=resolve_perf(spec.performance, dev).channels_last,
                                compile_mode=lat.compile_mode, threads=lat.threads, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _search_fields(search):
    if search is None:
        return {}
    return dict(target_speedup_reached=search.reached,
                target_speedup_measured=search.speedup,
                target_speedup_where=f"{search.runtime}-b{search.batch_size}",
                speedup_probes=[(p.sparsity, p.speedup, p.lo, p.hi) for p in search.probes])


def _precision(amp_dtype):
    return "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "").replace("bfloat16", "bf16")


class _StageClock:
    """Wall seconds per stage of a trial: ``stage(name)`` charges the time since the previous call to name."""

    def __init__(self):
        self.t = time.perf_counter()
        self.seconds = {}

    def stage(self, name):
        """Close the running stage: the time since the last call is charged to ``name``."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now


def peak_memory(dev):
    """The trial's memory high-water mark: CUDA's max_memory_allocated on a GPU (what packing K trials per GPU
    must fit), else the worker process's resident set size at the end (workers are reused, so this is an
    upper bound on one trial's need)."""
    import torch

    if dev.type == "cuda":
        return dict(peak_memory_bytes=int(torch.cuda.max_memory_allocated(dev)), peak_memory_kind="cuda_max_allocated")
    if dev.type == "mps":  # Metal's allocations for this process now (MPS keeps no high-water mark)
        return dict(peak_memory_bytes=int(torch.mps.driver_allocated_memory()), peak_memory_kind="mps_driver_allocated")
    try:
        import psutil

        return dict(peak_memory_bytes=int(psutil.Process().memory_info().rss), peak_memory_kind="cpu_rss")
    except ImportError:
        return dict(peak_memory_bytes=0, peak_memory_kind="unknown")
