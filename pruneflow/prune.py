"""Pruning behind one function: ``prune(model, method, sparsity, input_shape, ...) -> (new_model, stats)``.

It never mutates its input: the 2022 report pruned the already-pruned model at every sparsity level, so its
results compounded. Every call here starts from a deep copy.

Methods (NNI 3.0): ``level`` is unstructured (same shapes, N % zeros, no speedup); ``l1``, ``l2`` and
``fpgm`` remove whole output channels/neurons and go through NNI's ModelSpeedup, so the model is physically
smaller. CLI: ``python -m pruneflow.prune --ckpt dense.safetensors --method l1 --sparsity 0.5 --out p.safetensors``.
"""

import contextlib
import copy
import io
import logging
import time
import warnings

import torch
import torch.nn as nn

from .infer import vit
from .infer.checkpoint import count_macs, count_params, layer_widths
from .errors import UserError, check_whole
from .spec import MAC_TOLERANCE

NNI_PRUNERS = {"level": "LevelPruner", "l1": "L1NormPruner", "l2": "L2NormPruner", "fpgm": "FPGMPruner"}
METHODS = tuple(NNI_PRUNERS)
# The parts of an NNI pruning that prune() times (stats["seconds_<part>"]; 0 where a part does not run)
NNI_PARTS = ("import", "grouping", "masks", "speedup")
STRUCTURED = ("l1", "l2", "fpgm")
OP_TYPES = ("Conv2d", "Linear")
# backend -> methods. A method label is "l1" (NNI, the default) or "l1@depgraph".
BACKENDS = {"nni": METHODS, "depgraph": ("l1", "l2", "fpgm", "taylor", "slim")}


def parse_method(label):
    """'l1' -> ('l1', 'nni'); 'taylor@depgraph' -> ('taylor', 'depgraph'); checks the combination."""
    method, _, backend = str(label).partition("@")
    backend = backend or "nni"
    if backend not in BACKENDS or method not in BACKENDS[backend]:
        valid = "; ".join(f"{', '.join(m if b == 'nni' else f'{m}@{b}' for m in ms)} ({b})" for b, ms in BACKENDS.items())
        raise UserError(f"unknown pruning method/backend {label!r}; valid: {valid}")
    return method, backend


# Where each backend comes from: NNI is an optional extra (no wheels for Apple silicon), Torch-Pruning is
# pure Python and installs anywhere.
BACKEND_PACKAGES = {"nni": ("nni", "pip install 'pruneflow[nni]'"), "depgraph": ("torch_pruning", "pip install torch-pruning")}


def check_fits(label, is_vit, heads):
    """Refuse method ``label`` where it cannot work: NNI's speed-up cannot shrink a ViT's attention, and only a
    ViT has heads to remove (prune.heads). The job-file check and the prune CLI both ask here."""
    method, backend = parse_method(label)
    if is_vit and backend == "nni" and method in STRUCTURED:
        raise UserError(f"prune.methods {label}: NNI's speed-up cannot shrink a ViT's attention and embedding; use "
                        f"{method}@depgraph (Torch-Pruning), or level (unstructured)")
    if heads and not (is_vit and backend == "depgraph"):
        raise UserError(f"prune.heads removes attention heads: it needs model.arch vit_tiny and a DepGraph method "
                        f"such as l1@depgraph, not {label}" + ("" if is_vit else " on a model without attention"))


def require_backend(label):
    """Fail with one clear message when the backend of method ``label`` is not installed."""
    from .errors import missing_packages

    method, backend = parse_method(label)
    module, how = BACKEND_PACKAGES[backend]
    if missing_packages(module):
        hint = ""
        if backend == "nni":  # level (unstructured) has no DepGraph twin: name the structured ones
            if method in BACKENDS["depgraph"]:
                alt = f"{method}@depgraph"
            else:
                alt = (f"it has no unstructured pruning like {method}, only structured: "
                       + ", ".join(f"{m}@depgraph" for m in STRUCTURED))
            hint = f"; or use the DepGraph backend, which needs no NNI: {alt} (see jobs/quickstart_depgraph.yaml)"
        raise UserError(f"pruning method {label!r} needs {backend.upper() if backend == 'nni' else 'Torch-Pruning'}, "
                        f"which is not installed here ({how}{hint})")
    return method, backend


def check_sparsity(sparsity):
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"sparsity must be a number in (0, 1), got {sparsity!r}") from None
    if not 0.0 < s < 1.0:
        raise UserError(f"sparsity must be in (0, 1) (the fraction removed), got {sparsity!r}")
    return s


def prune(model, method, sparsity, input_shape, op_types=("Conv2d",), exclude=(), dependency_aware=False,
          verbose=False, calibration=None, round_to=None, global_pruning=False, heads=False):
    """Prune a copy of ``model``; ``sparsity`` is the fraction of each targeted layer removed.

    ``method`` is a label: 'l1' (NNI) or 'l1@depgraph' (Torch-Pruning's DepGraph; see pruneflow.depgraph).
    Returns (pruned model on CPU in eval mode, stats dict). ``dependency_aware`` groups residual-coupled
    channels (NNI's auto_set_denpendency_group_ids) so they are pruned together and the speedup can remove
    them; without it NNI merges disagreeing masks and removes far less than asked. ``calibration`` (a few
    training batches) feeds the taylor criterion; ``round_to`` / ``global_pruning`` / ``heads`` (a ViT loses
    whole attention heads) apply to DepGraph.
    """
    label = method
    method, backend = require_backend(method)
    sparsity = check_sparsity(sparsity)
    bad = [t for t in op_types if t not in OP_TYPES]
    if bad or not op_types:
        raise UserError(f"op types {list(op_types)} invalid; choose from {', '.join(OP_TYPES)}")
    if round_to is not None:
        check_whole(round_to, "round_to", 1)
    check_fits(label, vit.is_vit(model), heads)
    # contiguous weights: a model fine-tuned in channels_last (iterative rounds) breaks NNI's mask views
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    widths = layer_widths(model)
    targets = check_selection(model, op_types, exclude, widths)
    example = torch.rand(2, *input_shape)
    before = {"params": count_params(model), "macs": count_macs(model, input_shape), "widths": widths}
    config = [{"op_types": list(op_types), "sparse_ratio": sparsity, "exclude_op_names": list(exclude)}]
    # DepGraph removes channels as it goes: no separate speed-up step
    seconds = dict.fromkeys((f"seconds_{part}" for part in NNI_PARTS), 0.0)
    if backend == "depgraph":
        from .depgraph import prune_depgraph

        with _quiet(verbose):
            prune_depgraph(model, method, sparsity, input_shape, op_types, exclude, calibration, round_to,
                           global_pruning, heads)
    else:
        seconds = _prune_nni(model, method, sparsity, example, config, dependency_aware, verbose)
    model.eval()
    stats = {
        "method": label, "backend": backend, "criterion": method, "sparsity": sparsity,
        "dependency_aware": bool(backend == "depgraph" or (dependency_aware and method in STRUCTURED)),
        "params_dense": before["params"], "macs_dense": before["macs"], "widths_dense": before["widths"],
        "params": count_params(model), "macs": count_macs(model, input_shape), "widths": layer_widths(model),
        "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters()),
        **seconds,
    }
    stats["mac_reduction"] = stats["macs_dense"] / max(stats["macs"], 1)
    stats["channel_sparsity"] = _channel_sparsity(before["widths"], stats["widths"], targets)
    stats["weight_sparsity"] = _weight_sparsity(model, targets)
    return model, stats


def _prune_nni(model, method, sparsity, example, config, dependency_aware, verbose):
    """NNI 3.0: masks from the pruner, then ModelSpeedup (structured) or masks written into weights (level).
    Returns the seconds of each part: importing NNI (first call in a process), the dependency grouping, the
    masks, ModelSpeedup (0 for level)."""
    seconds = dict.fromkeys((f"seconds_{part}" for part in NNI_PARTS), 0.0)
    t0 = time.perf_counter()
    with _quiet(verbose):
        from nni.compression import pruning as nni_pruning

        seconds["seconds_import"] = time.perf_counter() - t0
        if dependency_aware and method in STRUCTURED:
            t0 = time.perf_counter()
            config = dependency_groups(model, config, example)
            seconds["seconds_grouping"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pruner = getattr(nni_pruning, NNI_PRUNERS[method])(model, config)
        _, masks = pruner.compress()
        pruner.unwrap_model()
        seconds["seconds_masks"] = time.perf_counter() - t0
        if method in STRUCTURED:
            t0 = time.perf_counter()
            speed_up(model, example, masks, verbose)
            seconds["seconds_speedup"] = time.perf_counter() - t0
            return seconds
        else:
            # NNI 3.0 does not write the masks into the weights after unwrap_model(): do it here.
            with torch.no_grad():
                for layer, layer_masks in masks.items():
                    module = model.get_submodule(layer)
                    for param, mask in layer_masks.items():
                        tensor = getattr(module, param, None)
                        if tensor is not None:  # NNI lists a mask for 'bias' even when the layer has none
                            tensor.mul_(mask.to(tensor.dtype))
            return seconds


def speed_up(model, example, masks, verbose=False, mask_stats=False):
    """NNI's ModelSpeedup: remove the masked channels from ``model`` in place. NNI's own tracer crashes on
    torch >= 2.2; a torch.fx trace of the model works. ``mask_stats``: let ModelSpeedup format every mask's
    sparsity into its log lines even when nobody reads them (NNI's way; pruneflow skips it unless ``verbose``)."""
    from nni.compression.speedup import ModelSpeedup

    graph = torch.fx.symbolic_trace(model)
    with _unlogged_mask_stats(verbose or mask_stats):
        ModelSpeedup(model, example, masks, graph_module=graph, logger=_silent_logger(verbose)).speedup_model()
    return model


def dependency_groups(model, config, example):
    """NNI's ``auto_set_denpendency_group_ids`` (nni/compression/utils/dependency.py, NNI 3.0), tracing the model
    once instead of twice and without TorchScript's trace check (which traces and runs the model again to
    compare): NNI's took 5.3-6.1 s of a CIFAR-stem ResNet-101 pruning on the CI machine, this ~1 s. The same
    groups: tests compare both on every architecture. One config per prunable layer: residual-coupled layers
    share a ``dependency_group_id`` (pruned alike, so the speed-up can remove their channels), grouped
    convolutions get an ``internal_metric_block``."""
    import uuid

    from nni.compression.base.config import select_modules_by_config, trans_legacy_config_list
    from nni.compression.utils.shape_dependency import ChannelDependency, GroupDependency

    training = model.training
    model.eval()
    traced = torch.jit.trace(model, example, strict=False, check_trace=False)
    model.train(training)
    channel = ChannelDependency(model, example, traced_model=traced)  # the constructors build the dependencies
    group = GroupDependency(model, example, traced_model=traced)
    group_id = {}
    for layers in channel.dependency_sets:
        uid = uuid.uuid4().hex
        group_id.update({name: uid for name in layers})
    out = []
    for entry in trans_legacy_config_list(config):
        modules, public, _ = select_modules_by_config(model, entry)
        for name in modules:
            sub = copy.deepcopy(public)
            if name in group_id:
                sub["dependency_group_id"] = group_id[name]
            if name in group.dependency:
                sub["internal_metric_block"] = int(group.dependency[name])
            out.append({"op_names": [name], **sub})
    return out


def prune_to_mac_reduction(model, method, target, input_shape, tolerance=MAC_TOLERANCE, max_steps=16, **kwargs):
    """Target-MACs mode: find the sparsity whose pruned model has ``target``x fewer MACs (bisection over the
    ratio; MACs fall monotonically with it). Returns (model, stats) of the closest try, with
    ``stats['target_mac_reduction']``. How users compare methods: at equal achieved reduction."""
    if parse_method(method)[0] == "level":
        raise UserError("level pruning keeps every MAC (same shapes); target-MACs mode needs a structured method")
    if not target > 1.0:
        raise UserError(f"MAC reduction target must be > 1 (e.g. 2 for half the MACs), got {target!r}")
    lo, hi, best = 0.0, 0.99, None
    for _ in range(max_steps):
        ratio = (lo + hi) / 2
        pruned, stats = prune(model, method, ratio, input_shape, **kwargs)
        error = stats["mac_reduction"] / target - 1
        if best is None or abs(error) < abs(best[1]["mac_reduction"] / target - 1):
            best = (pruned, stats)
        if abs(error) <= tolerance:
            break
        lo, hi = (ratio, hi) if error < 0 else (lo, ratio)
    pruned, stats = best
    stats["target_mac_reduction"] = float(target)
    return pruned, stats


def _channel_sparsity(widths_dense, widths, targets):
    """Fraction of the targeted layers' output channels/neurons that were removed."""
    dense = {n: out for n, _, _, out in widths_dense}
    now = {n: out for n, _, _, out in widths}
    total = sum(dense[n] for n in targets)
    kept = sum(now.get(n, 0) for n in targets)
    return 1.0 - kept / total if total else 0.0


def _weight_sparsity(model, targets):
    """Fraction of zeros among the targeted layers' weights (what unstructured pruning achieves)."""
    zeros = total = 0
    for n in targets:
        w = model.get_submodule(n).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def zero_masks(model, threshold=0.0):
    """{parameter: mask} freezing the zeros of every Conv2d/Linear weight that has any.

    Fine-tuning an unstructured (level) pruned model must keep its zeros, or the optimiser regrows them;
    call ``apply_masks`` after every optimiser step.
    """
    masks = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (m.weight == 0).any():
            masks[m.weight] = (m.weight.detach().abs() > threshold).to(m.weight.dtype)
    return masks


@torch.no_grad()
def apply_masks(masks):
    for param, mask in masks.items():
        param.mul_(mask)


def format_widths(stats):
    """Per-layer width table, dense -> pruned, as the 2022 report's appendix shows with print(model)."""
    now = {n: (i, o) for n, _, i, o in stats["widths"]}
    lines = [f"{'layer':<28} {'type':<7} {'in (dense->now)':>17} {'out (dense->now)':>18}"]
    for n, t, i, o in stats["widths_dense"]:
        ni, no = now.get(n, (0, 0))
        lines.append(f"{n:<28} {t:<7} {f'{i}->{ni}':>17} {f'{o}->{no}':>18}")
    return "\n".join(lines)


@contextlib.contextmanager
def _unlogged_mask_stats(verbose):
    """ModelSpeedup formats the sparsity of every mask into its log messages (a ``nonzero()`` per tensor, three
    times per graph node) even when its logger drops them: ~3.8 s of a CIFAR-stem ResNet-101's 14-s speed-up
    on the CI machine. While nobody reads them (not ``verbose``), NNI's formatter is swapped for an empty one;
    nothing else uses it, and NNI 3.0 is the last release, so the name holds."""
    from nni.compression.speedup import model_speedup

    original = getattr(model_speedup, "sparsity_stats", None)
    if verbose or original is None:
        yield
        return
    model_speedup.sparsity_stats = lambda mask: ""
    try:
        yield
    finally:
        model_speedup.sparsity_stats = original


@contextlib.contextmanager
def _quiet(verbose):
    """NNI prints progress to stdout and logs at INFO; silence both unless asked for."""
    if verbose:
        yield
        return
    nni_logger = logging.getLogger("nni")
    level = nni_logger.level
    nni_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        nni_logger.setLevel(level)


def _silent_logger(verbose):
    logger = logging.getLogger("pruneflow.nni.speedup")
    logger.setLevel(logging.INFO if verbose else logging.CRITICAL)
    return logger


def calibration_batches(meta, n=4, batch_size=64, data_root=None):
    """A few training batches (for criteria that need gradients, e.g. taylor), on the CPU."""
    from .data import Batches, load_split

    images, labels = load_split(meta["dataset"], "train", data_root)
    batches = Batches(images, labels, meta["dataset"], batch_size, "cpu", train=False)
    return [b for _, b in zip(range(n), batches)]


def pruned_meta(meta, stats):
    """Checkpoint metadata of a pruned model: the dense model's, plus what pruning did."""
    keep = ("method", "backend", "sparsity", "dependency_aware", "params_dense", "macs_dense", "params", "macs",
            "mac_reduction", "channel_sparsity", "weight_sparsity", "nonzero_params")
    extra = {"target_mac_reduction": stats["target_mac_reduction"]} if "target_mac_reduction" in stats else {}
    return {**meta, **{k: stats[k] for k in keep}, **extra, "accuracy": None}


def check_selection(model, op_types, exclude, widths=None):
    """The layers that ``op_types`` and ``exclude`` select in ``model`` (``widths``: its layer_widths, if the
    caller has them); refuses an ``exclude`` naming a layer the model lacks, and a selection that leaves nothing
    to prune."""
    names = {n for n, _ in model.named_modules() if n}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise UserError(f"excluded layer(s) {unknown} not in the model; its prunable layers: {', '.join(candidates[:12])}"
                        + (" ..." if len(candidates) > 12 else ""))
    widths = layer_widths(model) if widths is None else widths
    targets = [n for n, t, _, _ in widths if t in op_types and n not in exclude]
    if not targets:  # NNI would fail with an IndexError, DepGraph return the model unpruned
        raise UserError(f"nothing left to prune: every {'/'.join(op_types)} layer is excluded ({', '.join(exclude)})")
    return targets


def main():
    from .prune_cli import main as cli_main  # the command line lives apart: this module is the pruning itself

    cli_main()


if __name__ == "__main__":
    main()
