"""Convolution weight gradients for tiny feature maps on the CPU, as one matrix product.

Why: on CPUs without AVX-512 (AMD EPYC up to Zen 3, and others), oneDNN computes a convolution's weight
gradient through im2col + a GEMM blocked for large images. Where the output map is only a few pixels, that
kernel runs at a few GFLOP/s: a 512->512 3x3 convolution on a 1x1 map takes ~80-90 ms for its weight gradient
against ~8-10 ms for its forward pass, on the project's 2-core EPYC (benchmarks/small_maps.py). torchvision
ResNets with the ImageNet stem (the seed's model) reach 1x1 maps on 32x32 images, so those few layers took most
of a ResNet-18 training step.
The same gradient as ``unfold`` + one matrix product (BLAS) costs about what the forward pass does.

What: ``SmallMapGrad(model)`` runs ``model``'s forward passes under a TorchFunctionMode that sends each
``conv2d`` with a kernel larger than 1x1 and at most ``MAX_PIXELS`` output pixels (float32/64, no autocast,
groups 1, no dilation) through
``_SmallMapConv``: the forward is the ordinary ``conv2d``; the backward takes the input gradient from the
ordinary kernel and the weight gradient from the matrix product. Same numbers (to float rounding: tests
compare with float64 gradients), same module, weights and state dict; only the training steps' backward
differs. Larger maps keep oneDNN's own kernels, which are faster there. Used on the CPU only (train.fit):
cuDNN has no such gap, and compiled steps (torch.compile) bring their own kernels.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Output pixels up to which the matrix product wins (2-core EPYC, float32, batch 64: 17-21x faster at 1 pixel,
# 1.8x at 4, 1.5x slower at 16: benchmarks/small_maps.py; train_throughput.py --ablate: whole steps without it).
MAX_PIXELS = 4


def uses_gemm(out_pixels, kernel_size):
    """Whether a convolution's weight gradient takes the matrix product: kernel > 1x1 (a 1x1 kernel's gradient
    is a GEMM already) and at most MAX_PIXELS output pixels."""
    return out_pixels <= MAX_PIXELS and kernel_size[0] * kernel_size[1] > 1


def weight_grad_gemm(x, weight_shape, grad_out, stride, padding):
    """A convolution's weight gradient as unfold + one matrix product."""
    # columns: (N, C_in*kh*kw, L) for the L output pixels; grad_w = sum over images and pixels of
    # grad_out (C_out, N*L) @ columns (N*L, C_in*kh*kw)
    cols = F.unfold(x, weight_shape[2:], padding=padding, stride=stride)
    n, c_out = grad_out.shape[:2]
    g = grad_out.reshape(n, c_out, -1).transpose(0, 1).reshape(c_out, -1)
    return (g @ cols.transpose(1, 2).reshape(-1, cols.shape[1])).reshape(weight_shape)


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_gemm(x, weight.shape, grad_out, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


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
                    and weight.requires_grad and torch.is_grad_enabled() and x.dtype == weight.dtype
                    and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)):
                stride, padding = _pair(stride), _pair(padding)
                h = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
                w = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
                if uses_gemm(h * w, weight.shape[2:]):
                    return _SmallMapConv.apply(x, weight, bias, stride, padding)
        return func(*args, **kwargs)


class SmallMapGrad:
    """A training-step callable: ``model(x)`` with tiny-map convolutions' weight gradients as a GEMM."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        with _SmallMapMode():
            return self.model(x)
