"""The DepGraph backend: Torch-Pruning's dependency graph prunes every coupled layer of a channel group
together (residual additions included), so a nominal 50 % removes about half of the work. Pure Python: it
installs where NNI cannot (Apple silicon).

Criteria: l1 / l2 (group magnitude), fpgm (geometric median), taylor (first-order, needs calibration
batches for gradients), slim (BatchNorm scale, network slimming; needs BatchNorm layers).
ViTs (pruneflow.infer.vit): embedding width, MLP width and attention head dimensions, or whole heads.
"""

import torch
import torch.nn as nn

from .errors import UserError
from .infer import vit

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
                   global_pruning=False, heads=False):
    """Prune ``model`` in place (the caller passes a copy). ``sparsity`` is the fraction of channels removed
    from each prunable group (or, with ``global_pruning``, overall); ``heads``: a ViT loses whole attention
    heads rather than head dimensions."""
    import torch_pruning as tp

    kinds = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}
    # Layers whose *outputs* stay whole: excluded names and layer types not asked for.
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and (n in exclude or not isinstance(m, tuple(kinds[t] for t in op_types)))]
    if method == "slim" and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise UserError("slim (BatchNorm-scale) pruning needs BatchNorm layers; this model has none")
    example = torch.rand(2, *input_shape)
    pruner = rounded_pruner(tp)(model, example, importance=importance(method), pruning_ratio=sparsity,
                                ignored_layers=ignored, round_to=round_to, global_pruning=global_pruning,
                                **_attention_settings(model, sparsity, heads))
    if method == "taylor":
        if not calibration:
            raise UserError("taylor pruning needs calibration batches (training data) for its gradients")
        model.zero_grad()
        for x, y in calibration:
            torch.nn.functional.cross_entropy(model(x.cpu()), y.cpu()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    if vit.is_vit(model):
        for attention in vit.attentions(model):
            attention.num_heads = pruner.num_heads[attention.q]
        vit.sync_width(model)
    return model


def kept_rounded(n_pruned, current, round_to):
    """Channels to remove so that the kept count is a multiple of ``round_to``: rounded down, as Torch-Pruning
    does, but never to zero. Torch-Pruning leaves a layer whose count rounds to zero whole, so a high sparsity
    pruned less than a middling one (SimpleCNN, round_to 8: nothing at 0.9, half at 0.5)."""
    kept = current - n_pruned
    kept = max(kept - kept % round_to, min(round_to, current))
    return max(current - kept, 0)


def rounded_pruner(tp):
    """Torch-Pruning's BasePruner class with :func:`kept_rounded` as its rounding (torch-pruning is pinned to
    1.6.x, whose ``_round_to`` this replaces)."""

    class RoundedPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            return kept_rounded(n_pruned, current_channels, round_to)

    return RoundedPruner


def _attention_settings(model, sparsity, heads):
    """Torch-Pruning's settings for a ViT: q/k/v widths in heads, the class token and position table pruned
    along the embedding (their dim 2), and ``heads``: whole heads go (a ``sparsity`` share of each layer's,
    rounded up) instead of each head's dimensions."""
    if not vit.is_vit(model):
        return {}
    num_heads = {layer: a.num_heads for a in vit.attentions(model) for layer in (a.q, a.k, a.v)}
    return dict(num_heads=num_heads, prune_num_heads=heads, prune_head_dims=not heads,
                head_pruning_ratio=sparsity if heads else 0.0,
                unwrapped_parameters=[(model.class_token, 2), (model.encoder.pos_embedding, 2)])
