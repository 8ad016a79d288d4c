"""The DepGraph backend: Torch-Pruning's dependency graph prunes every coupled layer of a channel group
together (residual additions included), so a nominal 50 % removes about half of the work. Pure Python: it
installs where NNI cannot (Apple silicon).

Criteria: l1 / l2 (group magnitude), fpgm (geometric median), taylor (first-order, needs calibration
batches for gradients), slim (BatchNorm scale, network slimming; needs BatchNorm layers).
"""

import torch
import torch.nn as nn

from .errors import UserError

METHODS = ("l1", "l2", "fpgm", "taylor", "slim")


def importance(method):
    import torch_pruning as tp

    if method in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if method == "l1" else 2)
    if method == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    if method == "taylor":
        return tp.importance.GroupTaylorImportance()
    if method == "slim":
        return tp.importance.BNScaleImportance()
    raise UserError(f"unknown DepGraph method {method!r}; valid: {', '.join(METHODS)}")


def prune_depgraph(model, method, sparsity, input_shape, op_types, exclude, calibration=None, round_to=None,
                   global_pruning=False):
    """Prune ``model`` in place (the caller passes a copy). ``sparsity`` is the fraction of channels removed
    from each prunable group (or, with ``global_pruning``, overall)."""
    import torch_pruning as tp

    kinds = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
    # Layers whose *outputs* stay whole: excluded names and layer types not asked for.
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and (n in exclude or not isinstance(m, tuple(kinds[t] for t in op_types)))]
    if method == "slim" and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise UserError("slim (BatchNorm-scale) pruning needs BatchNorm layers; this model has none")
    example = torch.rand(2, *input_shape)
    pruner = tp.pruner.BasePruner(model, example, importance=importance(method), pruning_ratio=sparsity,
                                  ignored_layers=ignored, round_to=round_to, global_pruning=global_pruning)
    if method == "taylor":
        if not calibration:
            raise UserError("taylor pruning needs calibration batches (training data) for its gradients")
        model.zero_grad()
        for x, y in calibration:
            torch.nn.functional.cross_entropy(model(x.cpu()), y.cpu()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model
