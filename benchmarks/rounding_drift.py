"""How far training with pruneflow.winograd's convolutions drifts from oneDNN's, against oneDNN's own drift
between memory formats: the same model, initial weights and batches, a few SGD steps each way.

    python benchmarks/rounding_drift.py                 # CIFAR-stem ResNet-18, 12 steps, batch 64
    python benchmarks/rounding_drift.py --steps 4

Prints each run's losses, then each run's parameters' relative L2 difference from the oneDNN channels_last run
(median and max over tensors). Float32 rounding differs between any two convolution algorithms; training on
random labels at a high learning rate amplifies it step by step, so what matters is whether Winograd's drift is
of the size of oneDNN's NCHW-vs-NHWC drift, not zero.
"""

import argparse
import copy

import torch
import torch.nn.functional as F

from _common import print_header

from pruneflow import cpu_kernels
from pruneflow.infer.errors import UserError, exit_on_user_error
from pruneflow.models import build_model


def train_losses(model, batches, fmt, winograd):
    """(losses, parameters) after one SGD step per batch, through cpu_kernels with or without Winograd."""
    cpu_kernels.WINOGRAD = winograd
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = cpu_kernels.CpuKernels(model)
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(step(x.contiguous(memory_format=fmt)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cpu_kernels.WINOGRAD = True
    return losses, [p.detach() for p in model.parameters()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size: at least 1")
    torch.manual_seed(0)
    model = build_model(args.model, 10, 3, "cifar")
    g = torch.Generator().manual_seed(1)
    pool = [(torch.randn(args.batch_size, 3, 32, 32, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(4)]
    batches = [pool[s % len(pool)] for s in range(args.steps)]  # 4 batches, cycled
    runs = {"oneDNN NHWC": (torch.channels_last, False), "oneDNN NCHW": (torch.contiguous_format, False),
            "winograd NHWC": (torch.channels_last, True)}
    print_header(torch.device("cpu"), f"{args.model} (CIFAR stem), {args.steps} SGD steps, batch {args.batch_size}",
                 f"{'run':<14} losses")
    results = {}
    for name, (fmt, winograd) in runs.items():
        results[name] = train_losses(copy.deepcopy(model), batches, fmt, winograd)
        print(f"{name:<14} " + " ".join(f"{v:.4f}" for v in results[name][0]), flush=True)
    ref = results["oneDNN NHWC"][1]
    for name in ("oneDNN NCHW", "winograd NHWC"):
        d = sorted(float((a - b).norm() / a.norm()) for a, b in zip(ref, results[name][1]))
        print(f"{name} vs oneDNN NHWC: relative L2 parameter difference, median {d[len(d) // 2]:.2e}, max {d[-1]:.2e}")


if __name__ == "__main__":
    exit_on_user_error(main)
