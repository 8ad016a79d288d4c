"""Convolutions on tiny feature maps on the CPU, as one dense matrix product.

Why: torchvision ResNets with the ImageNet stem (the seed's model) run on 32x32 images end at 2x2 (layer3) and
1x1 (layer4) maps. There a 3x3 convolution mostly multiplies padding: on a 1x1 map only the centre tap meets a
pixel, on a 2x2 map 16 of the 36 (pixel, tap) products do. oneDNN computes all of them, and on CPUs without
AVX-512 (the project's 2-core EPYC) its weight-gradient kernel for such maps runs at a few GFLOP/s: a 512->512
3x3 convolution on a 1x1 map took ~60-90 ms forward + backward at batch 64, for ~17M useful multiply-adds.

What: when a convolution's input has fewer pixels than its kernel has taps (H_in * W_in < kh * kw: 1x1 and 2x2
maps under a 3x3 kernel), each (output pixel, input pixel) pair meets through exactly one kernel tap (or none,
through padding). So the convolution is one matrix: rows (C_out, output pixel), columns (input pixel, C_in),
gathered from the kernel's taps. ``dense_conv2d`` builds it with ``index_select`` and applies it with one
``F.linear``; autograd differentiates both, so the backward pass is two more matrix products and an index_add.
Same numbers to float rounding (tests compare outputs and gradients in float64). ~1.5-2x faster than oneDNN's
forward + backward on 2x2 maps and 5-25x on 1x1 maps (benchmarks/small_maps.py); from 4x4 maps on the matrix
holds more products than the kernel does, and oneDNN keeps them.

``SmallMaps(model)`` calls ``model`` under a TorchFunctionMode that sends each qualifying ``conv2d`` (float32/64,
no autocast, groups 1, no dilation) to ``dense_conv2d``; modules, weights and state dicts are unchanged. Used
for uncompiled training and evaluation on the CPU (train.resolve_perf: ``performance.small_maps``). cuDNN has
no such gap, and compiled steps bring their own kernels.
"""

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def uses_dense(in_pixels, kernel_size):
    """Whether a convolution takes the dense matrix: fewer input pixels than kernel taps (the matrix then holds
    fewer products than the kernel computes: 16 vs 36 for 3x3 on 2x2, 1 vs 9 on 1x1)."""
    return in_pixels < kernel_size[0] * kernel_size[1]


@functools.lru_cache(maxsize=None)
def pair_taps(in_hw, kernel_size, stride, padding):
    """((H_out, W_out), taps): taps[o, i] is the kernel tap (di * kw + dj) through which input pixel i reaches
    output pixel o (pixels numbered row by row), or kh * kw where it reaches it through padding only."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = in_hw, kernel_size, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    di = torch.arange(h).view(1, 1, h, 1) - torch.arange(ho).view(ho, 1, 1, 1) * sh + ph  # (ho, 1, h, 1)
    dj = torch.arange(w).view(1, 1, 1, w) - torch.arange(wo).view(1, wo, 1, 1) * sw + pw  # (1, wo, 1, w)
    valid = (di >= 0) & (di < kh) & (dj >= 0) & (dj < kw)
    return (ho, wo), torch.where(valid, di * kw + dj, kh * kw).reshape(ho * wo, h * w)


def dense_conv2d(x, weight, bias, stride, padding):
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, no dilation) as one matrix product."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    (ho, wo), taps = pair_taps((h, w), (kh, kw), tuple(stride), tuple(padding))
    taps = taps.to(x.device)
    # the kernel as (C_out, tap, C_in): a view for both memory formats of the weight
    w_taps = weight.permute(0, 2, 3, 1).flatten(1, 2)
    if bool((taps == kh * kw).any()):  # pairs that meet through padding only: a zero tap
        w_taps = torch.cat([w_taps, w_taps.new_zeros(c_out, 1, c_in)], 1)
    # rows (C_out, output pixel), columns (input pixel, C_in): x in NHWC order, free for a channels_last input
    matrix = w_taps.index_select(1, taps.flatten()).reshape(c_out * ho * wo, h * w * c_in)
    y = F.linear(x.permute(0, 2, 3, 1).reshape(n, h * w * c_in), matrix,
                 None if bias is None else bias.repeat_interleave(ho * wo)).view(n, c_out, ho, wo)
    # the memory format oneDNN would have returned (a copy of a few pixels per channel)
    return y.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else y


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_args(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    return [args[i] if i < len(args) else kwargs.get(name, d) for i, (name, d) in enumerate(zip(names, defaults))]


class _SmallMapMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _conv_args(args, kwargs)
            # float32/64 without autocast (bf16 autocast casts inside conv2d; it is slow on such CPUs anyway)
            if (groups == 1 and _pair(dilation) == (1, 1) and not isinstance(padding, str) and x.dim() == 4
                    and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)
                    and not torch.is_autocast_enabled(x.device.type)
                    and uses_dense(x.shape[2] * x.shape[3], weight.shape[2:])):
                stride, padding = _pair(stride), _pair(padding)
                (ho, wo), _ = pair_taps(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding)
                if ho > 0 and wo > 0:  # else conv2d's own error message
                    return dense_conv2d(x, weight, bias, stride, padding)
        return func(*args, **kwargs)


class SmallMaps:
    """A callable for training steps and evaluation: ``model(x)`` with tiny-map convolutions as one matrix."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        with _SmallMapMode():
            return self.model(x)
