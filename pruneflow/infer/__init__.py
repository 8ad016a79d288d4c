"""Portable inference: run pruneflow checkpoints anywhere with torch, torchvision and safetensors only.

This subpackage imports nothing heavier than torch, and from the rest of pruneflow only the standard-library
modules ``pruneflow.errors``, ``pruneflow.cli`` and ``pruneflow.cluster``; the rest of pruneflow imports it for the checkpoint format, timing and device choice (one implementation of each).
Names are resolved lazily so that ``python -m pruneflow.infer --help`` does not pay for importing torch.
"""

_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint", "read_meta": "checkpoint", "count_params": "checkpoint",
    "count_macs": "checkpoint", "layer_widths": "checkpoint",
    "available_devices": "device", "resolve_device": "device", "synchronize": "device",
    "time_forward": "timing", "summarize": "timing",
    "time_forward_paired": "timing", "paired_speedup": "timing",
    "UserError": ".errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
