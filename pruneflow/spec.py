"""Job files: ``jobs/<study>.yaml`` -> validated dataclasses -> a deterministic grid of trials -> shards.

Every setting has a default; any of them can be overridden from the command line with a dotted flag
(``--finetune.epochs 1``, ``--prune.sparsities '[0.5, 0.9]'``) without editing the file. Errors name the
key and, for typos, suggest the closest valid one.
"""

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field

from .errors import UserError

# How close to a prune.mac_targets entry counts as reaching it (relative): target-MACs pruning stops there, and
# the prune command and the report name a model past it (channel counts come in steps; a method can stop short)
MAC_TOLERANCE = 0.02


def misses_mac_target(mac_reduction, target, tolerance=MAC_TOLERANCE):
    return abs(mac_reduction / target - 1) > tolerance

SCHEMA_VERSION = 1
# Field metadata RERUN: a re-run of a study may change this setting without making its results incomparable
# (which trials the grid holds, where things are, how the machine is used); every other setting shapes results.
RERUN = {"rerun": True}
# Field metadata SINCE: added later with a default that does what older versions did, so a file that lacks the
# setting ran with that default (resuming an older study with it is no change)
SINCE = {"absent_is_default": True}


@dataclass(frozen=True)
class VitSpec:
    # vit_tiny's size (DeiT-Tiny's on 4x4 patches: 5.4M parameters); stored in its checkpoints
    patch: int = 4
    layers: int = 12
    heads: int = 3
    width: int = 192
    mlp: int = 768


@dataclass(frozen=True)
class ModelSpec:
    # simple_cnn | resnet18 ... resnet152 (torchvision) | resnet20/32/56/110 | vgg16_bn | vgg19_bn | mobilenet_v2
    # | vit_tiny
    arch: str = "simple_cnn"
    stem: str = "cifar"  # ResNets: cifar (3x3/1, no pool) | imagenet (7x7/2 + pool, as the 2022 report)
    vit: VitSpec = field(default_factory=VitSpec, metadata=SINCE)  # vit_tiny only


@dataclass(frozen=True)
class DataSpec:
    # digits (embedded) | mnist | cifar10 | synthetic-mnist | synthetic-cifar10 (random images: speed only)
    dataset: str = "digits"
    # where mnist/cifar10 are staged; default ~/.cache/pruneflow/data
    root: typing.Optional[str] = field(default=None, metadata=RERUN)
    download: bool = field(default=False, metadata=RERUN)  # only where the node has internet
    # images held out of the training part as val (a count, or a fraction of it): training and every choice the
    # report offers use val; test is scored, never chosen on. Default: 5000 for mnist/cifar10, 0.1 for digits.
    val_size: typing.Optional[float] = None
    val_seed: int = 0  # the carve's seed (stratified by class; same seed, same images, on every machine)

    def carve(self):
        """(size, seed) for infer.data.load_split; None: the data set's default carve."""
        return None if self.val_size is None else (self.val_size, self.val_seed)


@dataclass(frozen=True)
class TrainSpec:
    recipe: typing.Optional[str] = None  # default: mnist for simple_cnn, cifar_resnet for ResNets
    epochs: int = 5
    batch_size: typing.Optional[int] = None  # default: the recipe's (64, as the 2022 report)
    lr: typing.Optional[float] = None
    checkpoint: typing.Optional[str] = None  # use this dense checkpoint instead of training one


@dataclass(frozen=True)
class PruneSpec:
    # "l1" = NNI (level, l1, l2, fpgm); "l1@depgraph" = Torch-Pruning (l1, l2, fpgm, taylor, slim)
    methods: typing.List[str] = field(default_factory=lambda: ["level", "l1", "l2"], metadata=RERUN)
    sparsities: typing.List[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)],
                                           metadata=RERUN)
    # target-MACs mode: MAC reductions to reach (e.g. [2, 4]); each structured method gets these trials too
    mac_targets: typing.List[float] = field(default_factory=list, metadata=RERUN)
    # pruning to a measured speedup (e.g. [1.5, 2]) in latency.target_runtime at latency.target_batch
    speedup_targets: typing.List[float] = field(default_factory=list, metadata=RERUN)
    # DepGraph: channel counts multiple of this (8 suits GPU kernels); a list, e.g. [null, 8, 32], is a sweep axis
    round_to: typing.Union[None, int, typing.List[typing.Optional[int]]] = None
    global_pruning: bool = False  # DepGraph: rank channels across layers instead of per layer
    op_types: typing.Optional[typing.List[str]] = None  # default: the 2022 report's for the model
    exclude: typing.Optional[typing.List[str]] = None  # default: the classifier
    dependency_aware: typing.Optional[bool] = None  # default: on for ResNets
    # oneshot (prune once, then fine-tune) | iterative: prune.steps rounds on a prune.ramp (agp | linear) with
    # the fine-tune epochs split between them (pruneflow/schedule.py)
    schedule: str = field(default="oneshot", metadata=SINCE)
    steps: int = field(default=3, metadata=SINCE)
    ramp: str = field(default="agp", metadata=SINCE)
    # ViTs, DepGraph: remove whole attention heads (a sparsity share of each layer's) instead of head dimensions
    heads: bool = field(default=False, metadata=SINCE)


@dataclass(frozen=True)
class DistillSpec:
    # loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T), teacher = the trial's
    # own dense checkpoint (Hinton et al. 2015); the control arm distils too, so arms stay comparable
    alpha: float = 0.5
    temperature: float = 4.0


@dataclass(frozen=True)
class FinetuneSpec:
    recipe: str = "finetune"
    epochs: int = 3
    batch_size: typing.Optional[int] = None
    lr: typing.Optional[float] = None
    distill: typing.Optional[DistillSpec] = field(default=None, metadata=SINCE)  # null: plain cross-entropy


@dataclass(frozen=True)
class LatencySpec:
    batch_size: int = 64
    warmup: int = 5
    trials: int = 25  # as in the 2022 report
    # CPU threads for the timed forward passes, whatever threads a trial trained with (resources.threads_per_trial
    # 'auto' varies with the trials left), so the latencies of one study compare
    threads: int = 1
    # Deployment timing (issue 30): each runtime x batch size, dense and trial timed pair by pair in it.
    # eager | compiled (torch.compile) | onnxruntime; batch_sizes empty = [batch_size]
    runtimes: typing.List[str] = field(default_factory=lambda: ["eager"], metadata=SINCE)
    batch_sizes: typing.List[int] = field(default_factory=list, metadata=SINCE)
    # compiled: auto (CUDA: the faster CUDA-graph mode; CPU: default) or a torch mode
    compile_mode: str = field(default="auto", metadata=SINCE)
    target_runtime: str = field(default="eager", metadata=SINCE)  # where prune.speedup_targets are measured
    target_batch: typing.Optional[int] = field(default=None, metadata=SINCE)  # and at which batch (None: batch_size)


@dataclass(frozen=True)
class ResourcesSpec:
    device: str = "auto"  # auto | cpu | cuda | mps
    # Ray packs this many trials on one GPU (num_gpus = 1/K); auto: as many as fit in memory (measured by a
    # short probe of one trial before the sweep), at most one per CPU core
    trials_per_gpu: typing.Union[int, str] = 8
    # CPU threads each trial trains with (and Ray CPUs it reserves). auto: on CPU nodes the cores shared out
    # among the trials to run, on GPU nodes 1 (docs/cluster.md: when more threads pay)
    threads_per_trial: typing.Union[int, str] = 1
    sample_interval_s: float = 1.0  # utilisation sampling (CPU, RAM, GPU, GPU memory) into the results; 0: off
    # Host memory one trial may peak at (8G, 7500M): no more trials run at once than fit in the job's memory
    # (Slurm's --mem, the cgroup's limit, the RAM). auto (CPU nodes): one trial runs alone first and is measured.
    # Off by default (docs/cluster.md: ResNet-101 trials on CPU nodes with a few GB per core need it).
    memory_per_trial: typing.Optional[str] = None


@dataclass(frozen=True)
class PerformanceSpec:
    # Every setting here but cpu_kernels changes results (bf16 rounds, layouts pick other kernels, compiled
    # graphs fuse): a re-run may not change them (sweep.driver.check_same_settings).
    loader: str = "device"  # device (data set on the device, batched augmentation) | torchvision (the 2022 report's DataLoader)
    precision: str = "auto"  # auto (fp32; TF32 tensor cores on CUDA) | fp32 | bf16 (autocast: large batches)
    channels_last: typing.Optional[bool] = None  # default: on for CUDA and the CPU
    # torch.compile the training step (true = mode 'default'): slow start, faster epochs. 'cudagraphs' and
    # 'reduce-overhead' record each whole step as one CUDA graph (around the eager model, or Inductor's kernels),
    # CUDA only (docs/performance.md). A compilation that fails trains eagerly after a one-line warning.
    compile: typing.Union[bool, str] = False
    # Removed (CPU kernels tuned for one development machine): accepted so older job files load, with a note.
    cpu_kernels: typing.Optional[bool] = field(default=None, metadata=RERUN)


@dataclass(frozen=True)
class StudySpec:
    study: str = "study"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec, metadata=RERUN)  # the whole section
    performance: PerformanceSpec = field(default_factory=PerformanceSpec)
    # each seed trains its own dense model, and prunes and fine-tunes from it (a given train.checkpoint or
    # --dense: one dense model for every seed, so seeds vary fine-tuning only; the report says which)
    seeds: typing.List[int] = field(default_factory=lambda: [0], metadata=RERUN)
    # the dense model fine-tuned for the same epochs: is a gain pruning or training?
    control: bool = field(default=True, metadata=RERUN)
    retries: int = field(default=1, metadata=RERUN)  # extra attempts for a trial that raises or diverges


@dataclass(frozen=True)
class Trial:
    """One cell of the grid.

    arm 'dense': the dense checkpoint itself, evaluated and timed (the baseline; no fine-tuning).
    arm 'control': the dense model fine-tuned for the same epochs as the pruned ones, so that extra
    training is never mistaken for a pruning gain. Both have method 'none' and sparsity 0.
    arm 'pruned': ``method`` at ``sparsity``, then fine-tuned.
    """

    arm: str
    method: str
    sparsity: float
    seed: int
    target: float = 0.0  # target-MACs mode: the MAC reduction to reach (sparsity is then found)
    round_to: typing.Optional[int] = None  # DepGraph: the channel multiple it is pruned to
    round_axis: bool = False  # prune.round_to lists several: the id names this trial's (r1 = no rounding)
    speedup_target: float = 0.0  # speedup-target mode: the measured speedup to reach

    @property
    def id(self):
        if self.arm != "pruned":
            return f"{self.arm}-s{self.seed}"
        r = f"-r{self.round_to or 1}" if self.round_axis else ""
        if self.target:
            return f"{self.method}-x{self.target:.2f}{r}-s{self.seed}"
        if self.speedup_target:
            return f"{self.method}-t{self.speedup_target:.2f}{r}-s{self.seed}"
        return f"{self.method}-{self.sparsity:.2f}{r}-s{self.seed}"


# ---------------------------------------------------------------------------------------------- loading

def load_spec(path, overrides=None, check_backends=True):
    """Read, merge dotted overrides into, and validate a job file. Returns (StudySpec, job file text).
    ``check_backends=False`` accepts methods whose backend is not installed (reading a study, not running it)."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"job file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read job file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"job file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:  # an empty file is a mistake (a failed copy, the wrong path), not "every default"
        raise UserError(f"job file {path} is empty; start from jobs/quickstart.yaml (every key is optional, but "
                        "the study needs a name: study: NAME)")
    if not isinstance(raw, dict):
        raise UserError(f"job file {path} must be a mapping of settings, got {type(raw).__name__}")
    raw.setdefault("study", os.path.splitext(os.path.basename(path))[0])
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    spec = build(StudySpec, raw, where="")
    from .validate import validate

    validate(spec, check_backends)
    if spec.performance.cpu_kernels is not None:
        import sys

        print("note: performance.cpu_kernels has no effect any more (stock PyTorch kernels; on the CPU, "
              "performance.compile is the lever)", file=sys.stderr)
    return spec, text


def absent_defaults(cls=None, prefix=""):
    """{dotted name: default} of the settings marked SINCE: absent from an older file's config = this default."""
    out = {}
    for f in dataclasses.fields(cls or StudySpec):
        if dataclasses.is_dataclass(f.type):
            out.update(absent_defaults(f.type, f"{prefix}{f.name}."))
        elif f.metadata.get("absent_is_default"):
            out[f"{prefix}{f.name}"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def rerun_settings(cls=None, prefix=""):
    """The dotted names a re-run may change (RERUN metadata); a section's name ends in '.' (all of it)."""
    names = []
    for f in dataclasses.fields(cls or StudySpec):
        if f.metadata.get("rerun"):
            names.append(f"{prefix}{f.name}." if dataclasses.is_dataclass(f.type) else f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(f.type):
            names += rerun_settings(f.type, f"{prefix}{f.name}.")
    return tuple(names)


def _set_dotted(raw, key, value):
    parts = key.replace("-", "_").split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override --{key}: {p} is not a section")
    node[parts[-1]] = value


def size_bytes(text, what):
    """'8G', '7500M', '1.5T' (K, M, G, T: powers of 1024) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])i?B?\s*", str(text), re.I)
    size = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2).upper()) * 1024) if m else 0
    if size < 2**20:  # a typo (8 instead of 8G) or nothing: no trial lives in less than a MiB
        raise UserError(f"{what} must be a size with a unit, at least 1M, such as 8G or 7500M (or auto), got {text!r}")
    return size


def build(cls, raw, where):
    """Construct dataclass ``cls`` from ``raw``, checking keys and types."""
    if not isinstance(raw, dict):
        raise UserError(f"{where or 'job file'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            hint = difflib.get_close_matches(name, fields, n=1)
            section = f" in {where}" if where else ""
            suggestion = f": did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(fields)}"
            raise UserError(f"unknown key {key!r}{section}{suggestion}")
        kwargs[name] = convert(fields[name].type, value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def convert(tp, value, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where)
    if origin is typing.Union:  # Optional[X], or X | Y: the first type that takes the value
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):  # Fire: [null, 8] -> ['null', 8]
            value = None
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in inner[:-1]:
            try:
                return convert(a, value, where)
            except UserError:
                pass
        return convert(inner[-1], value, where)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _parse_scalar(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar(value)  # command-line overrides arrive as strings
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    raise UserError(f"{where} must be {names.get(tp, tp)}, got {value!r}")


def _parse_scalar(text):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_performance(perf):
    """``perf`` (a PerformanceSpec) if its settings are valid; the one check, for job files and benchmarks."""
    from .data import LOADERS
    from .step import COMPILE_MODES, PRECISIONS

    compile_mode = None if isinstance(perf.compile, bool) else perf.compile  # true / false are always valid
    for name, value, valid in (("loader", perf.loader, LOADERS), ("precision", perf.precision, PRECISIONS),
                               ("compile", compile_mode, (None, *COMPILE_MODES))):
        if value not in valid:
            raise UserError(f"performance.{name} {value!r} is not valid; choose from: "
                            f"{', '.join(v for v in valid if v is not None)}")
    return perf


def resolve(spec):
    """The spec with every default that depends on others filled in: what trials run with and files store."""
    from .models import default_prune_targets
    from .train import default_recipe

    ops, exclude = default_prune_targets(spec.model.arch)
    prune = dataclasses.replace(
        spec.prune, op_types=spec.prune.op_types or list(ops),
        exclude=spec.prune.exclude if spec.prune.exclude is not None else list(exclude),
        dependency_aware=spec.model.arch != "simple_cnn" if spec.prune.dependency_aware is None
        else spec.prune.dependency_aware)
    train = dataclasses.replace(spec.train, recipe=spec.train.recipe or default_recipe(spec.model.arch))
    return dataclasses.replace(spec, prune=prune, train=train)


def config_of(spec):
    """A resolved spec as the plain settings stored with results and checkpoints."""
    return dict(dataclasses.asdict(spec), schema=SCHEMA_VERSION)


# ------------------------------------------------------------------------------------------------- grid

def grid(spec):
    """Every trial of the study, in a fixed order: dense baseline, control, then method x sparsity, per seed."""
    trials = []
    for seed in spec.seeds:
        trials.append(Trial("dense", "none", 0.0, seed))
        if spec.control:
            trials.append(Trial("control", "none", 0.0, seed))
        for method in spec.prune.methods:
            # NNI ignores round_to: its methods get one trial per cell, not one per rounding
            rounds = round_values(spec.prune) if method.endswith("@depgraph") else [None]
            axis = isinstance(spec.prune.round_to, list) and len(rounds) > 1
            for r in rounds:
                for s in spec.prune.sparsities:
                    trials.append(Trial("pruned", method, round(float(s), 4), seed, round_to=r, round_axis=axis))
                if not method.startswith("level"):
                    for target in spec.prune.mac_targets:
                        trials.append(Trial("pruned", method, 0.0, seed, target=float(target), round_to=r,
                                            round_axis=axis))
                    for target in spec.prune.speedup_targets:
                        trials.append(Trial("pruned", method, 0.0, seed, round_to=r, round_axis=axis,
                                            speedup_target=float(target)))
    return trials


def round_values(prune):
    """prune.round_to as a list: [None] (no rounding), [8], or the axis given."""
    return list(prune.round_to) if isinstance(prune.round_to, list) else [prune.round_to]


def parse_shard(shard):
    """'i/n' -> (i, n) with 0 <= i < n."""
    if shard is None:
        return 0, 1
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        i, n = shard
    else:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise UserError(f"shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"shard {i}/{n} is out of range: need 0 <= i < n")
    return i, n


def shard_trials(trials, shard):
    """This shard's trials: every n-th trial starting at i, so shards get a mix of cheap and costly ones."""
    i, n = parse_shard(shard)
    return trials[i::n]
