"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3), for CPU training.

Why: the CIFAR-stem ResNets train on this project's 2-core AVX2 CPU at ~85 % of what its matrix products reach
(docs/benchmarks.md), so the only way to a faster step there is fewer multiplies. F(2x2, 3x3) (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016) computes each 2x2 output tile from a 4x4 input tile
with 16 products per (C_in, C_out) pair instead of 36: the input tiles are transformed (V = B^T d B), multiplied
with the transformed kernel (U = G g G^T) as 16 independent matrix products over channels, and transformed back
(Y = A^T M A). The transforms are additions and subtractions only; the matrix products carry the work: one
``torch.bmm`` over the 16 tile positions of (tiles, C_in) x (C_in, C_out) matrices (a loop of 16 ``torch.mm`` calls
trained ResNet-18 at the same speed, 0.99-1.01x over interleaved steps on 1 and 2 threads).

The backward pass is the same algorithm's adjoint, written out: dM = A dY A^T, dU = V^T dM, dV = dM U^T and the
input transform's adjoint, which adds each 4x4 tile gradient back onto the overlapping padded input. It saves the
input, not V (4x its size), and transforms it again. The kernel transform U = G g G^T is one matrix product that
autograd differentiates.

Numbers: float32 rounding differs from oneDNN's direct convolution (the transforms add and subtract before the
products); tests compare outputs and gradients in float64 to ~1e-12 and in float32 to 1e-4 relative.
Speed (benchmarks/cpu_kernels.py, batch 64, channels_last, forward + backward): 1.2-1.9x oneDNN for the
CIFAR-stem ResNets' 128-512 channel convolutions on 16x16 to 4x4 maps; with fewer channels the transforms'
memory passes (the transformed input is 4x the input) eat the saved multiplies: ``uses_winograd`` keeps to the
shapes where it measured faster (from 112 channels on 16x16 maps, 160 on 8x8, 224 on 4x4). The transformed
tensors are large and short-lived; glibc's malloc hands allocations above its 32 MiB mmap ceiling back to the
kernel on every free, and the page faults of fresh mappings eat part of the saved multiplies (ResNet-18's step:
1.36x the seed pipeline with glibc's defaults, 1.44-1.47x without them): ``keep_freed_memory`` (called by
cpu_kernels.CpuKernels) keeps them in the heap.
"""

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .infer.timing import keep_freed_memory  # noqa: F401  (pruneflow.winograd.keep_freed_memory, as before)

# F(2x2, 3x3)'s kernel transform (Lavin & Gray); the input (B^T) and output (A^T) transforms are written out as
# additions below:  B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
# A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

# Where it runs: the shapes that measured faster than oneDNN's direct convolution, forward + backward, at batch 64
# (benchmarks/cpu_kernels.py: oneDNN and Winograd timed alternately, 7-11 times per shape): per map size, the fewest
# channels (in and out) that won. The gain is in the backward pass (oneDNN's weight gradient above all); forward
# alone is about even (0.6-1.4x), so evaluation keeps oneDNN. 32x32 maps with 64 channels measured no faster
# (0.5-1.2x); larger maps are left. Small batches on small maps lose to the kernel transform and the per-call
# overhead (batch 16 on 4x4x256: 0.83x), so a call needs at least MIN_ROWS batch x pixels (64 images of 4x4).
# The thresholds depend on the torch threads: the matrix products scale with threads, the transforms' memory
# passes less, so with one thread (a sweep's trial: resources.threads_per_trial 1) Winograd wins from fewer
# channels (16x16x96 1.22x, 8x8x128 1.24x, 4x4x160 1.22x there, against 1.05x, 1.09x and, for 4x4x192, 1.02x at
# two threads). Only 1 and 2 threads were measured (a 2-core machine); more threads take the 2-thread table.
MIN_CHANNELS = {  # torch threads -> ((map pixels at least, channels at least): 16x16, 8x8, 4x4)
    1: ((256, 96), (64, 128), (16, 160)),
    2: ((256, 112), (64, 160), (16, 224)),
}
MAX_PIXELS, MIN_ROWS = 256, 1024


def uses_winograd(x_shape, weight_shape, stride, padding, threads=None):
    """Whether a (groups 1, no dilation) convolution of an (N, C, H, W) input, with gradients, takes
    ``winograd_conv2d`` at ``threads`` torch threads (default: this process's)."""
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    table = MIN_CHANNELS[1 if (threads or torch.get_num_threads()) == 1 else 2]
    fewest = next((c for pixels, c in table if h * w >= pixels), None)  # None: below 4x4
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and h % 2 == 0
            and w % 2 == 0 and fewest is not None and h * w <= MAX_PIXELS and n * h * w >= MIN_ROWS
            and min(c_in, c_out) >= fewest)


@functools.lru_cache(maxsize=None)
def _g_kron_g(dtype, device):
    """G (x) G, (16, 9): built once per dtype and device, not in every convolution of every step."""
    g = torch.tensor(_G, dtype=dtype, device=device)
    return torch.kron(g, g)


def kernel_transform(weight):
    """U = G g G^T for each (C_out, C_in) kernel g: (16, C_in, C_out), tile position first. One matrix product
    with G (x) G, (16, 9) x (9, C_in * C_out) (a three-operand einsum took ~10x longer for 512x512 kernels)."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return torch.mm(_g_kron_g(weight.dtype, weight.device), taps).view(16, c_in, c_out)


def _input_transform(padded, out):
    """V = B^T d B for every 4x4 tile (stride 2) of ``padded`` (N, H + 2, W + 2, C), into ``out``
    (4, 4, N, H/2, W/2, C)."""
    p = padded
    rows = (p[:, 0:-2:2] - p[:, 2::2], p[:, 1:-1:2] + p[:, 2::2], p[:, 2::2] - p[:, 1:-1:2], p[:, 1:-1:2] - p[:, 3::2])
    for a, r in enumerate(rows):
        torch.sub(r[:, :, 0:-2:2], r[:, :, 2::2], out=out[a, 0])
        torch.add(r[:, :, 1:-1:2], r[:, :, 2::2], out=out[a, 1])
        torch.sub(r[:, :, 2::2], r[:, :, 1:-1:2], out=out[a, 2])
        torch.sub(r[:, :, 1:-1:2], r[:, :, 3::2], out=out[a, 3])


def _input_transform_adjoint(dv, n, h, w, c):
    """The adjoint of ``_input_transform``: tile gradients (4, 4, N, H/2, W/2, C) -> padded input's (N, H+2, W+2, C).
    Tiles overlap by two pixels; along each axis even positions 2m get d0[m] + (d1 + d2 - d0)[m-1] and odd ones
    (d1 - d2 + d3)[m] - d3[m-1], so each output element is written once (no scatter)."""
    th, tw = h // 2, w // 2
    dr = dv.new_empty(4, n, th, tw + 1, 2, c)  # columns first
    for a in range(4):
        d0, d1, d2, d3 = dv[a]
        even, odd = dr[a, :, :, :, 0], dr[a, :, :, :, 1]
        even[:, :, :tw].copy_(d0)
        even[:, :, tw].zero_()
        even[:, :, 1:] += d1 + d2 - d0
        torch.sub(d1, d2, out=odd[:, :, :tw]).add_(d3)
        odd[:, :, tw].zero_()
        odd[:, :, 1:] -= d3
    d0, d1, d2, d3 = dr.view(4, n, th, w + 2, c)  # then rows
    dp = dv.new_empty(n, th + 1, 2, w + 2, c)
    even, odd = dp[:, :, 0], dp[:, :, 1]
    even[:, :th].copy_(d0)
    even[:, th].zero_()
    even[:, 1:] += d1 + d2 - d0
    torch.sub(d1, d2, out=odd[:, :th]).add_(d3)
    odd[:, th].zero_()
    odd[:, 1:] -= d3
    return dp.view(n, h + 2, w + 2, c)


def _output_transform(m, out):
    """Y = A^T M A for every tile: ``m`` (4, 4, N, H/2, W/2, K) into ``out`` (N, H/2, 2, W/2, 2, K)."""
    for a, z in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):
        torch.add(z[0] + z[1], z[2], out=out[:, :, a, :, 0])
        torch.sub(z[1] - z[2], z[3], out=out[:, :, a, :, 1])


def _output_transform_adjoint(dy):
    """The adjoint of ``_output_transform``: dM = A dY A^T, (N, H/2, 2, W/2, 2, K) -> (4, 4, N, H/2, W/2, K)."""
    n, th, _, tw, _, k = dy.shape
    dm = dy.new_empty(4, 4, n, th, tw, k)
    # A's rows for output position 0 and 1: [1, 1, 1, 0] and [0, 1, -1, -1]; z[a][b] = sum_j dY[a, j] A[b, j]
    z = []
    for a in range(2):
        g0, g1 = dy[:, :, a, :, 0], dy[:, :, a, :, 1]
        z.append((g0, g0 + g1, g0 - g1, g1))  # the last one is -g1: its sign is folded in below
    for b in range(4):
        z0, z1 = z[0][b], z[1][b]
        if b < 3:
            dm[0, b].copy_(z0)
            torch.add(z0, z1, out=dm[1, b])
            torch.sub(z0, z1, out=dm[2, b])
            torch.neg(z1, out=dm[3, b])
        else:
            torch.neg(z0, out=dm[0, b])
            torch.add(z0, z1, out=dm[1, b]).neg_()
            torch.sub(z1, z0, out=dm[2, b])
            dm[3, b].copy_(z1)
    return dm


def _transformed_input(x):
    """V (16, N * H/2 * W/2, C) for an (N, H, W, C) input: each 4x4 tile of the zero-padded input, transformed."""
    n, h, w, c = x.shape
    v = x.new_empty(4, 4, n, h // 2, w // 2, c)
    _input_transform(F.pad(x, (0, 0, 1, 1, 1, 1)), v)
    return v.view(16, n * (h // 2) * (w // 2), c)


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u):  # x: (N, H, W, C) contiguous; u: (16, C, K)
        n, h, w, _ = x.shape
        k = u.shape[2]
        m = torch.bmm(_transformed_input(x), u)
        y = x.new_empty(n, h // 2, 2, w // 2, 2, k)
        _output_transform(m.view(4, 4, n, h // 2, w // 2, k), y)
        # x, not its 4x larger transform: x is usually kept anyway (the ReLU before the convolution saves it)
        ctx.save_for_backward(x, u)
        return y.view(n, h, w, k)

    @staticmethod
    @once_differentiable  # written with out= products: no graph of its own (training needs none)
    def backward(ctx, dy):
        x, u = ctx.saved_tensors
        n, h, w, c = x.shape
        k = u.shape[2]
        dm = _output_transform_adjoint(dy.contiguous().view(n, h // 2, 2, w // 2, 2, k)).view(16, -1, k)
        du = dx = None
        if ctx.needs_input_grad[1]:
            du = torch.bmm(_transformed_input(x).transpose(1, 2), dm)
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dm, u.transpose(1, 2))
            dx = _input_transform_adjoint(dv.view(4, 4, n, h // 2, w // 2, c), n, h, w, c)[:, 1:-1, 1:-1]
        return dx, du


def winograd_conv2d(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for 3x3 kernels and even H, W, by F(2x2, 3x3).
    Returns the memory format oneDNN would have (channels_last for a channels_last input)."""
    u = kernel_transform(weight)
    y = _Winograd.apply(x.permute(0, 2, 3, 1).contiguous(), u).permute(0, 3, 1, 2)  # NHWC memory: a view
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

