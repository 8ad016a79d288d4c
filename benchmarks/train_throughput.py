"""Training images/s: the 2022 report's input pipeline vs pruneflow's, same model, batch size and device.

    python benchmarks/train_throughput.py                 # SimpleCNN (MNIST shape), ResNet-18/101 (CIFAR shape)
    python benchmarks/train_throughput.py --quick         # CI-sized
    python benchmarks/train_throughput.py --device cuda
    python benchmarks/train_throughput.py --device cuda --compile cudagraphs,reduce-overhead   # + compiled rows
    python benchmarks/train_throughput.py --device cuda --compile reduce-overhead --precision bf16

seed-style:  torch DataLoader + per-image torchvision transforms (crop/flip for CIFAR), fp32, NCHW.
pruneflow:   the data set as one uint8 tensor on the device, whole-batch crop/flip on the device,
             channels_last, on CUDA fp32 with TF32 + cudnn.benchmark (pruneflow.step.resolve_perf 'auto');
             --ablate adds each part alone and bf16 autocast.
Both run the same optimiser step (pruneflow.step.make_step, eager) on synthetic uint8 images of the data
set's shape (MNIST/CIFAR-10 are not downloadable here; the pipelines' costs do not depend on pixel values).
The fine-tune row trains a DepGraph-L1-pruned ResNet-18 (--sparsity, default 0.5).
"""

import argparse
import itertools
import time

import torch

from _common import print_header

from pruneflow.data import Batches, SeedStyleBatches
from pruneflow.infer.device import resolve_device, synchronize
from pruneflow.errors import UserError, exit_on_user_error
from pruneflow.models import build_model, default_prune_targets
from pruneflow.spec import PerformanceSpec, check_performance
from pruneflow.step import WARMUP, Perf, make_step, resolve_perf
from pruneflow.train import get_recipe, make_optimizer, train_one_epoch


def images_per_s(model, batches, device, amp_dtype, compile_mode=None):
    perf = Perf(amp_dtype=amp_dtype, compile=compile_mode)
    opt, _ = make_optimizer(model, get_recipe("finetune"), 1, perf)
    step = make_step(model, opt, perf)
    # a few steps first, at the timed precision: allocator, cuDNN autotuning (cudnn.benchmark) for these shapes,
    # and torch.compile's compilation and the whole step's CUDA-graph recording when asked; printed as the
    # compile's cost
    t0 = time.perf_counter()
    train_one_epoch(model, itertools.islice(iter(batches), WARMUP + 2), step)
    synchronize(device)
    images_per_s.warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_one_epoch(model, batches, step)
    synchronize(device)
    return len(batches.images if hasattr(batches, "images") else batches.dataset) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=None, help="images per epoch (default 4096; quick 256)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed-style pipeline")
    ap.add_argument("--ablate", action="store_true",
                    help="also each part alone: the loaders without a model, then precision x NCHW/channels_last")
    ap.add_argument("--ablate-precisions", default="fp32,bf16",
                    help="the ablation's precisions (bf16 autocast on a CPU without bf16 units: 1-30 images/s)")
    ap.add_argument("--precision", default="auto", help="pruneflow's rows: auto (fp32 + TF32 on CUDA) or bf16")
    ap.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"),
                    help="ResNets' stem: cifar (pruneflow's default, 3x3/1) or imagenet (7x7/2 + pool, the 2022 report's model "
                         "as in jobs/resnet101_cifar10.yaml: ~16x fewer MACs at 32x32, so the input pipeline weighs more)")
    ap.add_argument("--models", default=None, help="comma list of configs to run, e.g. simple_cnn,resnet18")
    ap.add_argument("--sparsity", type=float, default=0.5, help="of the pruned row (resnet18-pruned)")
    ap.add_argument("--compile", default=None, metavar="MODES",
                    help="also pruneflow's pipeline compiled, one row per mode (comma list): cudagraphs, "
                         "reduce-overhead, default, ... (pruneflow.train.COMPILE_MODES)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    perf = resolve_perf(check_performance(PerformanceSpec(precision=args.precision)), dev)
    if not 0 < args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity}: the fraction removed, in (0, 1)")
    if not set(args.ablate_precisions.split(",")) <= {"fp32", "bf16"}:
        raise UserError(f"--ablate-precisions {args.ablate_precisions!r}: a comma list of fp32, bf16")
    # {mode: what it resolves to here (None: not on this device)}; bad settings fail now, not after minutes
    modes = {mode: resolve_perf(check_performance(PerformanceSpec(compile=mode, precision=args.precision)), dev).compile
             for mode in (args.compile.split(",") if args.compile else [])}
    n = args.images or (256 if args.quick else 4096)
    configs = [("simple_cnn", "mnist", None)] if args.quick else [
        ("simple_cnn", "mnist", None), ("resnet18", "cifar10", None), ("resnet18", "cifar10", "l1@depgraph"),
        ("resnet101", "cifar10", None)]
    if args.models:
        configs = [c for c in configs if (c[0] + ("-pruned" if c[2] else "")) in args.models.split(",")]
    head = f"{'model':<26} {'seed-style img/s':>16} {'pruneflow img/s':>16} {'ratio':>6}"
    print_header(dev, f"batch {args.batch_size}, {n} images per epoch, ResNet stem {args.stem}", head)
    g = torch.Generator().manual_seed(0)
    for arch, dataset, pruned in configs:
        shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        torch.manual_seed(0)
        model = build_model(arch, 10, shape[0], args.stem)
        if pruned:
            from pruneflow.prune import prune

            ops, exclude = default_prune_targets(arch)
            model, _ = prune(model, pruned, args.sparsity, shape, ops, exclude)
        seed = images_per_s(model.to(dev).train(), SeedStyleBatches(images, labels, dataset, args.batch_size, dev,
                                                                    train=True, num_workers=args.workers), dev, None)
        fast_model = model.to(dev, memory_format=torch.channels_last) if perf.channels_last else model.to(dev)
        fast_batches = Batches(images, labels, dataset, args.batch_size, dev, train=True,
                               channels_last=perf.channels_last)
        fast = images_per_s(fast_model.train(), fast_batches, dev, perf.amp_dtype)
        name = arch + (f" ({pruned} {args.sparsity:g})" if pruned else "")
        print(f"{name:<26} {seed:>16,.0f} {fast:>16,.0f} {fast / seed:>6.2f}", flush=True)
        for mode, resolved in modes.items():
            # the same model and batches, stepped through a compiled wrapper with its own optimiser
            if resolved is None:
                print(f"  compile {mode}: not on {dev.type} (CUDA graphs need CUDA)", flush=True)
                continue
            compiled = images_per_s(fast_model, fast_batches, dev, perf.amp_dtype, resolved)
            print(f"{'  compile ' + mode:<26} {'':>16} {compiled:>16,.0f} {compiled / seed:>6.2f}"
                  f"  (warm-up incl. compile {images_per_s.warmup_s:.0f} s)", flush=True)
        if args.ablate:
            ablate(model, images, labels, dataset, args, dev, seed)


def loader_only(batches, device):
    """Images/s of an input pipeline alone: every batch made and moved to the device, no model."""
    for _ in zip(range(2), batches):
        pass
    synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for x, _ in batches:
        n += len(x)
    synchronize(device)
    return n / (time.perf_counter() - t0)


def ablate(model, images, labels, dataset, args, dev, seed_ips):
    """Which part buys what: each loader alone, then the device loader with each precision x memory format."""
    kw = dict(train=True, num_workers=args.workers)
    rows = [("  loader: seed-style", loader_only(SeedStyleBatches(images, labels, dataset, args.batch_size, dev, **kw), dev)),
            ("  loader: device", loader_only(Batches(images, labels, dataset, args.batch_size, dev, train=True), dev))]
    combos = [(None if p == "fp32" else torch.bfloat16, cl) for p in args.ablate_precisions.split(",")
              for cl in (False, True)]
    for amp, cl in combos:
        m = model.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format).train()
        b = Batches(images, labels, dataset, args.batch_size, dev, train=True, channels_last=cl)
        name = f"  {'bf16' if amp else 'fp32'} {'NHWC' if cl else 'NCHW'} device"
        rows.append((name, images_per_s(m, b, dev, amp)))
    for name, ips in rows:
        print(f"{name:<26} {'':>16} {ips:>16,.0f} {ips / seed_ips:>6.2f}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)  # bad settings: one line, exit 2
