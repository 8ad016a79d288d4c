"""CPU training kernels for where PyTorch's defaults run far below the machine: tiny maps and dropout masks.

Tiny maps. torchvision ResNets with the ImageNet stem (the seed's model) run on 32x32 images end at 2x2 (layer3)
and 1x1 (layer4) maps. There a 3x3 convolution mostly multiplies padding: on a 1x1 map only the centre tap meets
a pixel, on a 2x2 map 16 of the 36 (pixel, tap) products do. oneDNN computes all of them, and on CPUs without
AVX-512 (the project's 2-core EPYC) its weight-gradient kernel for such maps runs at a few GFLOP/s: a 512->512
3x3 convolution on a 1x1 map took 58-120 ms forward + backward at batch 64, for ~17M useful multiply-adds.
When a convolution's input has fewer pixels than its kernel has taps (H_in * W_in < kh * kw: 1x1 and 2x2 maps
under a 3x3 kernel), each (output pixel, input pixel) pair meets through exactly one kernel tap (or none,
through padding), so the convolution is one matrix: rows (C_out, output pixel), columns (input pixel, C_in),
gathered from the kernel's taps. ``dense_conv2d`` builds it with ``index_select`` and applies it with one
``F.linear``; autograd differentiates both, so the backward pass is two more matrix products and an index_add.
Same numbers to float rounding (tests compare outputs and gradients in float64). 2.1-2.4x faster than oneDNN's
forward + backward on 2x2 maps, 7-22x where the output is 1x1 (benchmarks/cpu_kernels.py); from 4x4 maps on the matrix
holds more products than the kernel does, and oneDNN keeps them.

Dropout masks. ``F.dropout`` draws its mask with ``bernoulli_``, ~4x slower on this CPU than drawing uniform
floats (``torch.rand``); ``dropout`` draws those and compares: the same distribution (each element kept with
probability 1 - p, scaled by 1 / (1 - p)), another random stream; ~1.5-2x faster forward + backward
(benchmarks/cpu_kernels.py). The seed's SimpleCNN drops 25 % of its 64x32x12x12 feature map each step.

``CpuKernels(model)`` calls ``model`` under a TorchFunctionMode that sends each qualifying ``conv2d`` (float32/64,
no autocast, groups 1, no dilation) on a tiny map to ``dense_conv2d``, each 3x3 stride-1 one with gradients on
a 4x4 to 16x16 map with 112-224+ channels to pruneflow.winograd's ``winograd_conv2d`` (fewer multiplies: the
CIFAR-stem ResNets' CPU step is bound by them), and each training-mode ``F.dropout`` to ``dropout``; modules,
weights and state dicts are unchanged. Used for uncompiled training (and evaluation: only the
convolutions apply there) on the CPU (train.resolve_perf: ``performance.cpu_kernels``). cuDNN and CUDA's random
number generators have no such gaps, and compiled steps bring their own kernels.
"""

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .winograd import keep_freed_memory, uses_winograd, winograd_conv2d


def uses_dense(in_pixels, kernel_size):
    """Whether a convolution takes the dense matrix: fewer input pixels than kernel taps (the matrix then holds
    fewer products than the kernel computes: 16 vs 36 for 3x3 on 2x2, 1 vs 9 on 1x1)."""
    return in_pixels < kernel_size[0] * kernel_size[1]


@functools.lru_cache(maxsize=None)
def pair_taps(in_hw, kernel_size, stride, padding):
    """((H_out, W_out), taps, padded): taps[o, i] is the kernel tap (di * kw + dj) through which input pixel i
    reaches output pixel o (pixels numbered row by row), or kh * kw where it reaches it through padding only;
    ``padded``: whether any pair does. Cached per shape: training steps ask for the same few shapes each step."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = in_hw, kernel_size, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    di = torch.arange(h).view(1, 1, h, 1) - torch.arange(ho).view(ho, 1, 1, 1) * sh + ph  # (ho, 1, h, 1)
    dj = torch.arange(w).view(1, 1, 1, w) - torch.arange(wo).view(1, wo, 1, 1) * sw + pw  # (1, wo, 1, w)
    valid = (di >= 0) & (di < kh) & (dj >= 0) & (dj < kw)
    return (ho, wo), torch.where(valid, di * kw + dj, kh * kw).reshape(ho * wo, h * w), not bool(valid.all())


def dense_conv2d(x, weight, bias, stride, padding):
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, no dilation) as one matrix product."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    (ho, wo), taps, padded = pair_taps((h, w), (kh, kw), tuple(stride), tuple(padding))
    taps = taps.to(x.device)
    # the kernel as (C_out, tap, C_in): a view for both memory formats of the weight
    w_taps = weight.permute(0, 2, 3, 1).flatten(1, 2)
    if padded:  # pairs that meet through padding only: a zero tap
        w_taps = torch.cat([w_taps, w_taps.new_zeros(c_out, 1, c_in)], 1)
    # rows (C_out, output pixel), columns (input pixel, C_in): x in NHWC order, free for a channels_last input
    matrix = w_taps.index_select(1, taps.flatten()).reshape(c_out * ho * wo, h * w * c_in)
    y = F.linear(x.permute(0, 2, 3, 1).reshape(n, h * w * c_in), matrix,
                 None if bias is None else bias.repeat_interleave(ho * wo)).view(n, c_out, ho, wo)
    # the memory format oneDNN would have returned (a copy of a few pixels per channel)
    return y.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else y


def dropout(x, p):
    """``F.dropout(x, p, training=True)``: a mask from uniform floats instead of ``bernoulli_`` (~2x faster with
    the backward pass, benchmarks/cpu_kernels.py)."""
    mask = torch.rand_like(x).ge_(p).mul_(1 / (1 - p))  # kept: 1 / (1 - p); dropped: 0
    return x * mask


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (name, default) of the arguments of the functions the mode replaces
_CONV2D = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1),
           ("groups", 1))
_DROPOUT = (("input", None), ("p", 0.5), ("training", True), ("inplace", False))


def _bind(signature, args, kwargs):
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(signature)]


# Switches for the benchmarks' ablations (benchmarks/train_throughput.py --ablate, --stock-malloc). WINOGRAD False:
# 3x3 convolutions stay with oneDNN. KEEP_FREED_MEMORY False: glibc malloc's defaults (winograd.keep_freed_memory).
WINOGRAD = True
KEEP_FREED_MEMORY = True


class _CpuKernelMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _bind(_DROPOUT, args, kwargs)
            if training and not inplace and 0 < p < 1 and x.is_floating_point():  # else F.dropout's own cases
                return dropout(x, p)
        elif func is F.conv2d or func is torch.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _bind(_CONV2D, args, kwargs)
            # float32/64 without autocast (bf16 autocast casts inside conv2d; it is slow on such CPUs anyway)
            if (groups == 1 and _pair(dilation) == (1, 1) and not isinstance(padding, str) and x.dim() == 4
                    and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)
                    and not torch.is_autocast_enabled(x.device.type)
                    and weight.dim() == 4):
                stride, padding = _pair(stride), _pair(padding)
                if uses_dense(x.shape[2] * x.shape[3], weight.shape[2:]):
                    (ho, wo), _, _ = pair_taps(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding)
                    if ho > 0 and wo > 0:  # else conv2d's own error message
                        return dense_conv2d(x, weight, bias, stride, padding)
                elif (WINOGRAD and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
                        and x.shape[1] == weight.shape[1] and uses_winograd(x.shape, weight.shape, stride, padding)):
                    return winograd_conv2d(x, weight, bias)
        return func(*args, **kwargs)


class CpuKernels:
    """A callable for training steps and evaluation: ``model(x)`` with this module's kernels."""

    def __init__(self, model):
        self.model = model
        if KEEP_FREED_MEMORY:
            keep_freed_memory()  # Winograd's large transformed tensors above all (pruneflow.winograd)

    def __call__(self, x):
        with _CpuKernelMode():
            return self.model(x)
