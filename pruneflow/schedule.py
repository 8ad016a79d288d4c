"""Iterative pruning (``prune.schedule: iterative``): reach the target sparsity in ``prune.steps`` rounds, each a
prune of the model the last round fine-tuned, with the trial's whole fine-tune budget split across the rounds, so
an iterative trial and a one-shot one (and the control) compare at equal epochs.

The sparsity after round k of N follows ``prune.ramp``: ``agp`` (Zhu & Gupta 2017's cubic ramp, s_k = s (1 - (1 -
k/N)^3): large steps first, while the network has most to spare) or ``linear`` (s_k = s k / N). Structured methods
remove, in round k, the fraction of the *remaining* channels that takes the model from s_{k-1} to s_k; level
pruning (same shapes) zeroes s_k of each layer's weights, the zeros of earlier rounds among them.
"""

import dataclasses

RAMPS = ("agp", "linear")


@dataclasses.dataclass
class PrunePoint:
    round: int
    sparsity: float  # nominal, cumulative: what the ramp asked for after this round
    channel_sparsity: float  # achieved, against the dense model
    macs: int
    params: int
    epochs: int  # fine-tune epochs after this round
    widths: list  # (layer, out) of every Conv2d / Linear after this round


def ramp(target, steps, kind="agp"):
    """The cumulative sparsity after each of ``steps`` rounds (the last is ``target``)."""
    if kind not in RAMPS:
        raise ValueError(f"unknown ramp {kind!r}; valid: {', '.join(RAMPS)}")
    fractions = [1 - (1 - k / steps) ** 3 if kind == "agp" else k / steps for k in range(1, steps + 1)]
    return [round(target * f, 6) for f in fractions]


def split_epochs(epochs, steps):
    """``epochs`` over ``steps`` rounds, the earlier rounds taking the remainder: they sum to ``epochs``."""
    return [epochs // steps + (1 if k < epochs % steps else 0) for k in range(steps)]


def prune_iteratively(model, method, target, input_shape, steps, kind, epochs, finetune_round, **prune_kwargs):
    """(pruned and fine-tuned model, stats against the dense model, [PrunePoint], history with continuous epoch
    numbers). ``finetune_round(model, epochs)`` fine-tunes ``model`` in place and returns its history."""
    from .infer.checkpoint import layer_widths
    from .prune import _channel_sparsity, parse_method, prune

    criterion, _ = parse_method(method)
    dense_widths = layer_widths(model)
    op_types, exclude = prune_kwargs.get("op_types", ("Conv2d",)), prune_kwargs.get("exclude", ())
    targets = [n for n, t, _, _ in dense_widths if t in op_types and n not in exclude]
    points, history, previous, first = [], [], 0.0, None
    for k, (s, e) in enumerate(zip(ramp(target, steps, kind), split_epochs(epochs, steps)), start=1):
        # level keeps shapes: s of the weights, earlier zeros included; structured: a share of what is left
        step = s if criterion == "level" else 1 - (1 - s) / (1 - previous)
        model, stats = prune(model, method, min(max(step, 1e-6), 0.999), input_shape, **prune_kwargs)
        first = first or stats
        # the next round starts from what this one reached: channel counts round, and the drift would add up
        previous = s if criterion == "level" else _channel_sparsity(dense_widths, stats["widths"], targets)
        history += [dict(h, epoch=len(history) + i + 1) for i, h in enumerate(
            h for h in finetune_round(model, e) if h["epoch"] > 0)]
        points.append(PrunePoint(k, s, _channel_sparsity(dense_widths, stats["widths"], targets), int(stats["macs"]),
                                 int(stats["params"]), e, [(n, out) for n, _, _, out in stats["widths"]]))
    stats = dict(stats, sparsity=float(target), macs_dense=first["macs_dense"], params_dense=first["params_dense"],
                 widths_dense=dense_widths, mac_reduction=first["macs_dense"] / max(stats["macs"], 1),
                 channel_sparsity=points[-1].channel_sparsity)
    return model, stats, points, history
