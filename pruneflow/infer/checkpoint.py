"""The portable checkpoint: one ``.safetensors`` file, the pruned state_dict plus JSON metadata.

Loading builds the base architecture and resizes every Conv2d / BatchNorm2d / Linear to the stored tensor
shapes (channel pruning changes only widths), then loads the weights strictly. Nothing is unpickled, so a
checkpoint cannot run code on the machine that opens it.
"""

import json
import os

import torch
import torch.nn as nn

from . import vit as vit_arch
from .arch import build_model
from ..errors import UserError
from ..files import atomic

FORMAT = "pruneflow-checkpoint/1"
META_KEY = "pruneflow"
# Metadata every checkpoint carries; the rest (method, sparsity, accuracy, config, ...) is free-form.
REQUIRED = ("format", "arch", "num_classes", "in_channels", "stem", "input_shape", "dataset", "mean", "std")


def save(model, path, meta):
    """Write ``model`` and ``meta`` atomically (temp file + rename: a kill never leaves half a file)."""
    from safetensors.torch import save as serialize

    from .. import __version__ as version  # pruneflow/__init__.py is dependency-free

    missing = [k for k in REQUIRED if k != "format" and k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    meta = {"format": FORMAT, "pruneflow_version": version, **meta}
    if vit_arch.is_vit(model):  # a head's width cannot be told from the tensors: store the counts
        meta["heads"] = vit_arch.head_counts(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = os.fspath(path)
    data = serialize(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    try:
        # Written with open(), not safetensors' save_file: that creates files mode 0600 whatever the umask,
        # so nobody else could read checkpoints in a shared results directory.
        with atomic(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:  # a full disk is files.DiskFull already
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    return path


def read_meta(path):
    """The checkpoint's metadata, after checking that it is a pruneflow safetensors file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # SafetensorError has no stable import path across versions
        # Only now look for pickle signatures: a valid safetensors header length can start with 0x80 too.
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise UserError(
                f"{path} is a pickle (torch.save) file; pruneflow loads only .safetensors because unpickling "
                "can run arbitrary code. On a trusted machine convert it: "
                f"python -m pruneflow.convert --src {path} --out {os.path.splitext(path)[0]}.safetensors --model ARCH"
            ) from None
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    if raw is None:
        raise UserError(f"{path} is a safetensors file without pruneflow metadata (not written by pruneflow)")
    try:
        meta = json.loads(raw)
        missing = [k for k in REQUIRED if k not in meta]
    except (ValueError, TypeError):
        raise UserError(f"{path} has unreadable pruneflow metadata") from None
    if missing:
        raise UserError(f"{path} has incomplete pruneflow metadata (missing {', '.join(missing)})")
    if meta["format"] != FORMAT:
        raise UserError(f"{path} is in checkpoint format {meta['format']!r}; this pruneflow reads {FORMAT!r}")
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path} has invalid pruneflow metadata: {problem}")
    return meta


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def meta_problem(meta):
    """What is wrong with the metadata a model is rebuilt and fed from, or None.

    Checked on reading, because a hand-edited or foreign checkpoint would otherwise fail deep inside torch
    (``randn(): argument 'size'``) instead of saying which field is wrong."""
    for key in ("arch", "stem", "dataset"):
        if not isinstance(meta[key], str):
            return f"{key} must be a string, got {meta[key]!r}"
    for key in ("num_classes", "in_channels"):
        if not _whole(meta[key]):
            return f"{key} must be a whole number >= 1, got {meta[key]!r}"
    shape = meta["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_whole(n) for n in shape)):
        return f"input_shape must be [channels, height, width] of whole numbers >= 1, got {shape!r}"
    if shape[0] != meta["in_channels"]:
        return f"input_shape {shape} has {shape[0]} channel(s) but in_channels is {meta['in_channels']}"
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and all(isinstance(x, (int, float)) for x in meta[key])):
            return f"{key} must be a list of numbers, got {meta[key]!r}"
    if meta["arch"] in vit_arch.VIT_ARCHS:
        if shape[1] != shape[2]:
            return f"input_shape {shape}: a ViT takes square images"
        raw = meta.get("vit") or {}
        return vit_arch.config_problem(vit_arch.vit_config(raw) if isinstance(raw, dict) else raw, shape[1])
    return None


def load(path, device="cpu"):
    """Rebuild the (possibly pruned) model stored in ``path``. Returns (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    model = build_from_meta(meta)
    try:
        load_tensors(model, tensors, meta.get("heads"))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: tensors do not match its declared architecture {meta['arch']!r} ({first})") from None
    problem = io_mismatch(model, meta)
    if problem:
        raise UserError(f"{path}: its metadata contradicts its tensors: {problem}")
    return model.to(device).eval(), meta


def build_from_meta(meta):
    """The dense model a checkpoint's metadata describes, before resizing to its tensors."""
    return build_model(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                       stem=meta["stem"], image_size=meta["input_shape"][-1], vit=meta.get("vit"))


def load_tensors(model, tensors, heads=None):
    """Resize ``model`` to ``tensors`` (a ViT's attention to ``heads`` per layer) and load them strictly; a
    ValueError names the first key or shape that differs (PyTorch's own message starts with a line that names
    neither)."""
    if vit_arch.is_vit(model):
        vit_arch.resize_vit(model, tensors, heads)
    resize_to(model, tensors)
    if vit_arch.is_vit(model):
        vit_arch.sync_width(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 1} other(s)" if len(keys) > 1 else ""
            raise ValueError(f"{what} {keys[0]}{more}")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise ValueError(f"size mismatch for {k}: {list(tensors[k].shape)} in the file, {list(v.shape)} expected")
    model.load_state_dict(tensors, strict=True)


def io_mismatch(model, meta):
    """How the model's first convolution or its classifier contradicts ``meta`` (in_channels, num_classes),
    or None: a model fed images of the wrong channel count fails only when run, in a torch traceback."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if convs and convs[0][1].in_channels != meta["in_channels"]:
        name, conv = convs[0]
        return (f"{name} takes {conv.in_channels} input channel(s), but in_channels is {meta['in_channels']} "
                f"(input_shape {list(meta['input_shape'])}, dataset {meta['dataset']})")
    if linears and linears[-1][1].out_features != meta["num_classes"]:
        name, fc = linears[-1]
        return f"{name} has {fc.out_features} outputs, but num_classes is {meta['num_classes']}"
    return None


def resize_to(model, tensors):
    """Replace each Conv2d / BatchNorm2d / Linear by one whose widths match the stored tensors."""
    for name, module in list(model.named_modules()):
        w = tensors.get(f"{name}.weight")
        if w is None:
            continue
        if isinstance(module, nn.Conv2d):
            if w.dim() != 4 or tuple(w.shape[2:]) != module.kernel_size:
                raise ValueError(f"{name}.weight has shape {tuple(w.shape)}, expected kernel {module.kernel_size}")
            # a depthwise convolution (MobileNetV2) pruned to C channels keeps groups = C
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            groups = w.shape[0] if depthwise else module.groups
            new = nn.Conv2d(w.shape[1] * groups, w.shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, groups, module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        elif isinstance(module, nn.Linear):
            if w.dim() != 2:
                raise ValueError(f"{name}.weight has shape {tuple(w.shape)}, expected a matrix")
            new = nn.Linear(w.shape[1], w.shape[0], module.bias is not None)
        else:
            continue
        if new.weight.shape != w.shape:
            raise ValueError(f"{name}.weight has shape {tuple(w.shape)}")
        _set_submodule(model, name, new)


def _set_submodule(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# Modules whose own forward does no multiply-accumulate beyond calling its children (or none at all): every
# part of the architectures build_model makes. Exact types: a subclass may compute in its forward.
_NO_OWN_MACS = {"torch.nn.modules." + n for n in (
    "batchnorm.BatchNorm2d", "activation.ReLU", "pooling.MaxPool2d", "pooling.AdaptiveAvgPool2d", "dropout.Dropout",
    "container.Sequential", "linear.Identity", "flatten.Flatten")} | {
    "torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck",
    "pruneflow.infer.arch.SimpleCNN", "pruneflow.infer.arch.cifar_resnet_class.<locals>.CifarResNet"}


def count_macs(model, input_shape, device="cpu"):
    """Multiply-accumulates of one forward pass on one image, as torch's FLOP counter counts them (FLOPs / 2:
    convolutions and matrix products, not their biases).

    Models built only of Conv2d, Linear and the modules in ``_NO_OWN_MACS`` (all of pruneflow's) are counted
    with forward hooks on their Conv2d and Linear layers; anything else goes through ``FlopCounterMode``,
    whose first use imports TorchDynamo: ~1.3 s that ``pruneflow.infer`` would pay on every run (training
    processes pay it anyway: torch's optimizers import TorchDynamo when constructed).
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=device)
    kinds = {type(m).__module__ + "." + type(m).__qualname__ for m in model.modules()}
    try:
        if kinds <= _NO_OWN_MACS | {"torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear"}:
            return _count_macs_by_hooks(model, x)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        # the counter misses fused CPU attention kernels; the math path's matrix products count on any device
        with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


def _count_macs_by_hooks(model, x):
    """Sum over Conv2d (output elements x weight elements per output channel) and Linear (output elements x
    input features): the products torch's FLOP counter counts for ``aten.convolution`` and ``aten.addmm``."""
    total = 0

    def conv(m, inputs, out):
        nonlocal total
        total += out.numel() * m.weight[0].numel()

    def linear(m, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def layer_widths(model):
    """[(name, type, in, out)] for every Conv2d and Linear, in module order: where pruning cut."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            rows.append((name, "Conv2d", m.in_channels, m.out_channels))
        elif isinstance(m, nn.Linear):
            rows.append((name, "Linear", m.in_features, m.out_features))
    return rows
