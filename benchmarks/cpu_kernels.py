"""pruneflow.cpu_kernels vs PyTorch's own CPU kernels: convolutions on tiny maps (per shape), dropout masks,
3x3 convolutions by Winograd F(2x2, 3x3) (per shape).

    python benchmarks/cpu_kernels.py                  # the convolutions of ResNets on 32x32 images, batch 64
    python benchmarks/cpu_kernels.py --quick          # CI-sized
    python benchmarks/cpu_kernels.py --stock-malloc   # without winograd.keep_freed_memory (glibc's defaults)

Why it exists: an ImageNet-stem ResNet on 32x32 images (the seed's model) ends in 2x2 and 1x1 maps, where a 3x3
convolution mostly multiplies padding and oneDNN's CPU kernels (its weight gradient above all) run far below
the machine's speed. pruneflow.cpu_kernels computes convolutions whose input has fewer pixels than the kernel has
taps as one dense matrix product. This prints forward + backward (input, weight and bias gradients) both ways,
side by side, in both memory formats, for shapes on both sides of that rule, and checks that both give the same
output and gradients. Then dropout (the seed's SimpleCNN's first one) forward + backward, F.dropout's
bernoulli_ mask vs cpu_kernels.dropout's uniform floats, and the fraction each keeps. Then 3x3 stride-1
convolutions (channels_last, C_in = C_out, full and pruned channel counts of the CIFAR-stem ResNets) by oneDNN and
by pruneflow.winograd, with the path CPU training takes (winograd.uses_winograd). Like training with
cpu_kernels, the process runs with winograd.keep_freed_memory (both columns) unless --stock-malloc.
Median of --repeats calls after one warm-up call (pruneflow.infer.timing); the Winograd rows time oneDNN and
Winograd alternately, --pairs calls each, and print the median and range of the per-pair ratios.
"""

import argparse
from statistics import median

import torch
import torch.nn.functional as F

from _common import print_header

from pruneflow.infer.device import resolve_device
from pruneflow.infer.errors import exit_on_user_error
from pruneflow.infer.timing import summarize, time_calls
from pruneflow.cpu_kernels import dense_conv2d, dropout, uses_dense
from pruneflow.winograd import keep_freed_memory, uses_winograd, winograd_conv2d

# (input size, C_in, C_out, kernel, stride): ResNet-18/101 convolutions on 32x32 images, ImageNet stem at the top
SHAPES = [(1, 512, 512, 3, 1), (2, 512, 512, 3, 2), (2, 256, 256, 3, 1), (2, 1024, 256, 1, 1), (4, 256, 256, 3, 2),
          (4, 128, 128, 3, 1), (8, 64, 64, 3, 1)]
# (map size, channels): 3x3 stride-1 convolutions of the CIFAR-stem ResNets (64-512 channels on 32x32-4x4 maps)
# and of their pruned versions (fewer channels), around each map size's threshold (winograd.MIN_CHANNELS)
WINOGRAD_SHAPES = [(32, 32), (32, 64), (16, 32), (16, 64), (16, 80), (16, 96), (16, 112), (16, 128), (8, 64), (8, 96),
                   (8, 128), (8, 160), (8, 192), (8, 224), (8, 256), (4, 128), (4, 160), (4, 192), (4, 224), (4, 256),
                   (4, 512)]
FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def median_ms(fn, device, repeats):
    return 1000 * summarize(time_calls(fn, device, warmup=1, trials=repeats))["median"]


def check_same(ref, got, what):
    """Stop the run when an output or gradient of ``got`` differs from conv2d's (``ref``) beyond float32 rounding."""
    for r, o in zip(ref, got):
        if not torch.allclose(r, o, rtol=1e-3, atol=1e-3 * float(r.detach().abs().max())):
            raise SystemExit(f"{what} differs from conv2d")


def forward_backward(conv, x, w, b, gy, s, pad):
    """conv's output and its (input, weight, bias) gradients for the output gradient gy."""
    y = conv(x, w, b, (s, s), (pad, pad))
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per shape (default 5; quick 2)")
    ap.add_argument("--pairs", type=int, default=None,
                    help="alternating timings per Winograd shape (default 7; quick 2)")
    ap.add_argument("--stock-malloc", action="store_true", help="leave glibc malloc's defaults (see the docstring)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    malloc = "stock malloc" if args.stock_malloc else f"keep_freed_memory {keep_freed_memory()}"
    shapes = SHAPES[:2] + SHAPES[5:6] if args.quick else SHAPES
    batch = 8 if args.quick else args.batch_size
    repeats = args.repeats or (2 if args.quick else 5)
    pairs = args.pairs or (2 if args.quick else 7)
    head = (f"{'input':>5} {'C_in':>5} {'C_out':>5} {'k':>2} {'s':>2} {'layout':>6}  {'conv2d ms':>9} "
            f"{'dense ms':>8} {'conv2d/dense':>12}  path")
    print_header(dev, f"batch {batch}, forward + backward, median of {repeats}, {malloc}", head)
    g = torch.Generator().manual_seed(0)
    for size, c_in, c_out, k, s in shapes:
        pad = k // 2
        for layout, fmt in FORMATS.items():
            x = torch.randn(batch, c_in, size, size, generator=g).to(dev, memory_format=fmt).requires_grad_()
            w = torch.randn(c_out, c_in, k, k, generator=g).to(dev, memory_format=fmt).requires_grad_()
            b = torch.randn(c_out, generator=g).to(dev).requires_grad_()
            out = (size + 2 * pad - k) // s + 1
            gy = torch.randn(batch, c_out, out, out, generator=g).to(dev, memory_format=fmt)
            ref, got = (forward_backward(conv, x, w, b, gy, s, pad) for conv in (F.conv2d, dense_conv2d))
            check_same(ref, got, f"dense_conv2d for {(size, c_in, c_out, k, s, layout)}")
            t_conv, t_dense = (median_ms(lambda: forward_backward(conv, x, w, b, gy, s, pad), dev, repeats)
                               for conv in (F.conv2d, dense_conv2d))
            path = "dense" if uses_dense(size * size, (k, k)) else "conv2d"  # what pruneflow's CPU training takes
            print(f"{f'{size}x{size}':>5} {c_in:>5} {c_out:>5} {k:>2} {s:>2} {layout:>6}  {t_conv:>9.2f} "
                  f"{t_dense:>8.2f} {t_conv / t_dense:>12.2f}  {path}", flush=True)
    print(f"\n{'dropout p=0.25':<22} {'layout':>6}  {'F.dropout ms':>12} {'uniform ms':>10} {'ratio':>6}  "
          "kept (F / uniform)")
    drops = (lambda t: F.dropout(t, 0.25, True), lambda t: dropout(t, 0.25))
    for layout, fmt in FORMATS.items():
        x = torch.randn(batch, 32, 12, 12, generator=g).to(dev, memory_format=fmt).requires_grad_()
        gy = torch.randn(x.shape, generator=g).to(dev, memory_format=fmt)
        t_f, t_u = (median_ms(lambda: torch.autograd.grad(drop(x), x, gy), dev, repeats) for drop in drops)
        kept = [float((drop(x) != 0).float().mean()) for drop in drops]
        print(f"{str(tuple(x.shape)):<22} {layout:>6}  {t_f:>12.2f} {t_u:>10.2f} {t_f / t_u:>6.2f}  "
              f"{kept[0]:.3f} / {kept[1]:.3f}", flush=True)
    print(f"\nWinograd F(2x2, 3x3) vs conv2d: 3x3 convolutions, stride 1, NHWC, C_in = C_out = C; each timed "
          f"alternately with the other {pairs} times (ratio: median and range of the per-pair ratios)")
    print(f"{'map':<11} {'C':>4}  {'conv2d ms':>9} {'winograd ms':>11} {'conv2d/winograd':>15} {'range':>11}  path")
    for size, c in [(32, 64), (16, 128), (8, 128), (4, 512)] if args.quick else WINOGRAD_SHAPES:
        x = torch.randn(batch, c, size, size, generator=g).to(dev, memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(c, c, 3, 3, generator=g).to(dev).requires_grad_()
        b = torch.randn(c, generator=g).to(dev).requires_grad_()
        gy = torch.randn(x.shape, generator=g).to(dev, memory_format=torch.channels_last)
        wino = lambda x, w, b, stride, padding: winograd_conv2d(x, w, b)  # noqa: E731 (conv2d's signature)
        ref, got = (forward_backward(conv, x, w, b, gy, 1, 1) for conv in (F.conv2d, wino))
        check_same(ref, got, f"winograd_conv2d for {(size, c)}")
        # alternating pairs: this VM's speed drifts by up to 2x between seconds, so two separate medians mislead
        t_conv, t_wino = [], []
        for _ in range(pairs):
            for conv, times in ((F.conv2d, t_conv), (wino, t_wino)):
                times += time_calls(lambda: forward_backward(conv, x, w, b, gy, 1, 1), dev, warmup=0, trials=1)
        ratios = sorted(a / o for a, o in zip(t_conv, t_wino))
        path = "winograd" if uses_winograd(x.shape, w.shape, (1, 1), (1, 1)) else "conv2d"
        print(f"{f'{size}x{size}':<11} {c:>4}  {1000 * median(t_conv):>9.2f} {1000 * median(t_wino):>11.2f} "
              f"{median(ratios):>15.2f} {f'{ratios[0]:.2f}-{ratios[-1]:.2f}':>11}  {path}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
