"""A convolution's weight gradient: the device's own kernel vs pruneflow.small_maps' matrix product, per shape.

    python benchmarks/small_maps.py              # the convolutions of ResNets on 32x32 images, batch 64
    python benchmarks/small_maps.py --quick      # CI-sized

Why it exists: on a CPU without AVX-512, oneDNN computes the weight gradient of a convolution whose output is
a few pixels (layer3/layer4 of an ImageNet-stem ResNet on 32x32 images) far slower than its forward pass;
pruneflow.small_maps computes those (kernel > 1x1, output <= MAX_PIXELS pixels) as unfold + one matrix product instead.
This prints both, side by side, for shapes on both sides of that threshold, with the forward pass for scale,
and checks that both give the same gradient. Median of --repeats calls after one warm-up call
(pruneflow.infer.timing, as the latency benchmarks).
"""

import argparse

import torch
import torch.nn.functional as F

from _common import print_header

from pruneflow.infer.device import resolve_device
from pruneflow.infer.errors import exit_on_user_error
from pruneflow.infer.timing import summarize, time_calls
from pruneflow.small_maps import MAX_PIXELS, uses_gemm, weight_grad_gemm

# (input size, C_in, C_out, kernel, stride): ResNet-18/101 convolutions on 32x32 images, ImageNet stem at the top
SHAPES = [(1, 512, 512, 3, 1), (2, 512, 512, 3, 2), (2, 256, 256, 3, 1), (2, 1024, 256, 1, 1), (4, 128, 128, 3, 1),
          (8, 64, 64, 3, 1), (16, 128, 128, 3, 1), (32, 64, 64, 3, 1)]


def median_ms(fn, device, repeats):
    return 1000 * summarize(time_calls(fn, device, warmup=1, trials=repeats))["median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per shape (default 5; quick 2)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    shapes = SHAPES[:2] + SHAPES[4:5] if args.quick else SHAPES
    batch = 8 if args.quick else args.batch_size
    repeats = args.repeats or (2 if args.quick else 5)
    head = (f"{'output':>6} {'C_in':>5} {'C_out':>5} {'k':>2} {'s':>2}  {'forward ms':>10} {'own grad ms':>11} "
            f"{'GEMM grad ms':>12} {'own/GEMM':>8}  path")
    print_header(dev, f"batch {batch}, median of {repeats}, small-map path up to {MAX_PIXELS} output pixels", head)
    g = torch.Generator().manual_seed(0)
    for size, c_in, c_out, k, s in shapes:
        x = torch.randn(batch, c_in, size, size, generator=g).to(dev)
        w = torch.randn(c_out, c_in, k, k, generator=g).to(dev)
        pad = k // 2
        y = F.conv2d(x, w, stride=s, padding=pad)
        gy = torch.randn(y.shape, generator=g).to(dev)

        def own():
            return torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])[1]

        def gemm():
            return weight_grad_gemm(x, w.shape, gy, (s, s), (pad, pad))

        a, b = own(), gemm()
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max())):
            raise SystemExit(f"gradients differ for {(size, c_in, c_out, k, s)}")
        fwd = median_ms(lambda: F.conv2d(x, w, stride=s, padding=pad), dev, repeats)
        t_own, t_gemm = median_ms(own, dev, repeats), median_ms(gemm, dev, repeats)
        path = "GEMM" if uses_gemm(y.shape[2] * y.shape[3], (k, k)) else "own"  # what pruneflow's training takes
        print(f"{f'{y.shape[2]}x{y.shape[3]}':>6} {c_in:>5} {c_out:>5} {k:>2} {s:>2}  {fwd:>10.2f} {t_own:>11.2f} "
              f"{t_gemm:>12.2f} {t_own / t_gemm:>8.2f}  {path}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
