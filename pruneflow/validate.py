"""Job-file validation: every value checked once, at the boundary, with one line that names the key."""

from .errors import UserError
from .spec import check_performance, grid, size_bytes


def check_latency(lat):
    """latency.runtimes, batch_sizes and compile_mode: known names, whole positive batches, nothing twice."""
    from .infer.runtimes import COMPILE_MODES, RUNTIMES

    if not lat.runtimes:
        raise UserError("latency.runtimes must list at least one runtime (eager, compiled, onnxruntime)")
    for r in lat.runtimes:
        if r not in RUNTIMES:
            raise UserError(f"latency.runtimes: {r!r} is not valid; choose from: {', '.join(RUNTIMES)}")
    for b in lat.batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise UserError(f"latency.batch_sizes: {b!r} must be a whole number >= 1")
    for name, values in (("latency.runtimes", lat.runtimes), ("latency.batch_sizes", lat.batch_sizes)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise UserError(f"{name} lists {', '.join(twice)} more than once")
    if lat.target_runtime not in RUNTIMES:
        raise UserError(f"latency.target_runtime {lat.target_runtime!r} is not valid; choose from: {', '.join(RUNTIMES)}")
    if lat.target_batch is not None and lat.target_batch < 1:
        raise UserError(f"latency.target_batch must be >= 1, got {lat.target_batch}")
    if lat.compile_mode not in COMPILE_MODES:
        raise UserError(f"latency.compile_mode {lat.compile_mode!r} is not valid; choose from: {', '.join(COMPILE_MODES)}")


def check_model(spec):
    """A ViT's size must build on the data set's images; head pruning needs a ViT and DepGraph."""
    import dataclasses

    from .data import dataset_info
    from .infer import vit
    from .prune import check_fits

    is_vit = spec.model.arch in vit.VIT_ARCHS
    if is_vit:
        problem = vit.config_problem(dataclasses.asdict(spec.model.vit), dataset_info(spec.data.dataset)["shape"][-1])
        if problem:
            raise UserError(f"model.{problem}")
    for method in spec.prune.methods:
        check_fits(method, is_vit, spec.prune.heads)


def validate(spec, check_backends=True):
    from .data import DATASETS
    from .models import ARCHITECTURES, STEMS
    from .prune import OP_TYPES, parse_method, require_backend
    from .train import RECIPES

    def one_of(value, valid, what):
        if value not in valid:
            raise UserError(f"{what} {value!r} is not valid; choose from: {', '.join(valid)}")

    one_of(spec.model.arch, ARCHITECTURES, "model.arch")
    one_of(spec.model.stem, STEMS, "model.stem")
    one_of(spec.data.dataset, tuple(DATASETS), "data.dataset")
    check_model(spec)
    if spec.train.recipe is not None:
        one_of(spec.train.recipe, tuple(RECIPES), "train.recipe")
    one_of(spec.finetune.recipe, tuple(RECIPES), "finetune.recipe")
    one_of(spec.resources.device.split(":")[0], ("auto", "cpu", "cuda", "mps"), "resources.device")
    if spec.resources.device.startswith("cuda:"):
        # Ray gives each trial one GPU of those the sweep can see, always 'cuda' (cuda:0) inside the trial
        n = spec.resources.device.split(":", 1)[1]
        raise UserError(f"resources.device {spec.resources.device!r}: a sweep spreads its trials over every GPU it "
                        f"can see; to use only GPU {n}, run it with CUDA_VISIBLE_DEVICES={n} and device: cuda "
                        "(under Slurm, --gpus chooses the GPUs)")
    check_performance(spec.performance)
    check_latency(spec.latency)
    from .schedule import RAMPS

    one_of(spec.prune.schedule, ("oneshot", "iterative"), "prune.schedule")
    one_of(spec.prune.ramp, RAMPS, "prune.ramp")
    if spec.prune.steps < 1:
        raise UserError(f"prune.steps must be >= 1, got {spec.prune.steps}")
    if spec.prune.schedule == "iterative" and (spec.prune.mac_targets or spec.prune.speedup_targets):
        raise UserError("prune.schedule: iterative prunes to prune.sparsities; MAC and speedup targets search "
                        "one-shot (leave prune.mac_targets / speedup_targets empty, or schedule: oneshot)")
    d = spec.finetune.distill
    if d is not None and not (0.0 <= d.alpha <= 1.0 and d.temperature > 0):
        raise UserError(f"finetune.distill: alpha must be in [0, 1] and temperature > 0, got alpha {d.alpha}, "
                        f"temperature {d.temperature}")
    for m in spec.prune.methods:
        (require_backend if check_backends else parse_method)(m)  # before hours of dense training
    for t in spec.prune.mac_targets:
        if not t > 1:
            raise UserError(f"prune.mac_targets: {t} must be > 1 (the factor by which MACs shrink)")
    for t in spec.prune.speedup_targets:
        if not t > 1:
            raise UserError(f"prune.speedup_targets: {t} must be > 1 (how many times faster, measured)")
    from .spec import round_values

    rounds = round_values(spec.prune)
    for r in rounds:
        if r is not None and r < 1:
            raise UserError(f"prune.round_to must be >= 1 (or null: no rounding), got {r}")
    if isinstance(spec.prune.round_to, list) and not rounds:
        raise UserError("prune.round_to lists no value; give null, a number, or a list such as [null, 8, 32]")
    if len({r or 1 for r in rounds}) < len(rounds):
        raise UserError(f"prune.round_to lists one rounding twice ({rounds}; null and 1 both mean none)")
    for t in spec.prune.op_types or []:
        one_of(t, OP_TYPES, "prune.op_types entry")
    for s in spec.prune.sparsities:
        if not 0.0 < s < 1.0:
            raise UserError(f"prune.sparsities: {s} is outside (0, 1) (sparsity is the fraction removed)")
    for name, values in (("prune.sparsities", spec.prune.sparsities), ("prune.methods", spec.prune.methods),
                         ("prune.mac_targets", spec.prune.mac_targets), ("seeds", spec.seeds),
                         ("prune.speedup_targets", spec.prune.speedup_targets)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise UserError(f"{name} lists {', '.join(twice)} more than once")
    for name, lr in (("train.lr", spec.train.lr), ("finetune.lr", spec.finetune.lr)):
        if lr is not None and not lr > 0:
            raise UserError(f"{name} must be > 0, got {lr}")
    counts = {"resources.trials_per_gpu": spec.resources.trials_per_gpu,  # a whole number or 'auto'
              "resources.threads_per_trial": spec.resources.threads_per_trial}
    for name, v in counts.items():
        if isinstance(v, str) and v != "auto":
            raise UserError(f"{name} must be a whole number or 'auto', got {v!r}")
    if spec.resources.memory_per_trial not in (None, "auto"):
        size_bytes(spec.resources.memory_per_trial, "resources.memory_per_trial")
    if spec.data.val_size is not None and not spec.data.val_size > 0 or spec.data.val_seed < 0:
        raise UserError(f"data.val_size must be > 0 (a count of images, or a fraction of the training part) and "
                        f"data.val_seed >= 0, got {spec.data.val_size} and {spec.data.val_seed}")
    if spec.resources.sample_interval_s < 0:
        raise UserError(f"resources.sample_interval_s must be >= 0, got {spec.resources.sample_interval_s}")
    positive = {"train.epochs": spec.train.epochs, "latency.batch_size": spec.latency.batch_size,
                "latency.trials": spec.latency.trials, "latency.threads": spec.latency.threads,
                **{name: 1 if v == "auto" else v for name, v in counts.items()}}
    for b in ("train", "finetune"):
        if getattr(spec, b).batch_size is not None:
            positive[f"{b}.batch_size"] = getattr(spec, b).batch_size
    for name, v in positive.items():
        if v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    for name, v in {"finetune.epochs": spec.finetune.epochs, "latency.warmup": spec.latency.warmup,
                    "retries": spec.retries}.items():
        if v < 0:
            raise UserError(f"{name} must be >= 0, got {v}")
    if not spec.study or any(c in spec.study for c in "/\\") or spec.study.startswith("."):
        raise UserError(f"study name {spec.study!r} must be a plain name (it becomes a directory)")
    if not spec.seeds:
        raise UserError("seeds must list at least one seed")
    for seed in spec.seeds:
        if not 0 <= seed < 2**32:  # numpy's generators take no more
            raise UserError(f"seeds: {seed} must be a whole number in [0, 2**32)")
    if not spec.prune.methods or not (spec.prune.sparsities or spec.prune.mac_targets or spec.prune.speedup_targets):
        raise UserError("the grid is empty: list at least one method in prune.methods and one sparsity in "
                        "prune.sparsities (or a target in prune.mac_targets)")
    seen = {}
    for t in grid(spec):  # ids keep two decimals: 0.5 and 0.501 would share one record and one checkpoint
        other = seen.setdefault(t.id, t)
        if other is not t:
            key, a, b = (("mac_targets", other.target, t.target) if t.target else
                         ("speedup_targets", other.speedup_target, t.speedup_target) if t.speedup_target else
                         ("sparsities", other.sparsity, t.sparsity))
            raise UserError(f"prune.{key} {a:g} and {b:g} would both be trial {t.id}: trial ids keep two decimals; "
                            "make them differ there")
    return spec
