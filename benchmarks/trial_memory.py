"""Peak host memory of one trial on the CPU: what `resources.memory_per_trial` should say.

    python benchmarks/trial_memory.py                    # ResNet-101, ImageNet and CIFAR stem, batch 64
    python benchmarks/trial_memory.py --quick            # CI-sized: SimpleCNN on digits
    python benchmarks/trial_memory.py --models resnet18 --stems cifar --batch 128

Each arm runs in a fresh process, as a trial runs in its own Ray worker, and prints its peak resident memory
(getrusage's ru_maxrss, as memory_per_trial: auto measures it) after each stage: imports; the dense
checkpoint's model; NNI pruning (L1, dependency-aware, the 2022 report's study's settings; the pruned arm only); a few
fine-tuning steps on the data set held in memory
(synthetic-* data: the real shapes and sizes, no download). 'pruned' is a pruned trial, 'control' the dense
model fine-tuned as the study's control arm. Evaluation and timing run after fine-tuning and take less.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys

DATASETS = {"simple_cnn": "digits", "resnet": "synthetic-cifar10"}


def peak_mb():
    from pruneflow.trial import peak_rss_bytes  # the measurement memory_per_trial: auto takes

    return peak_rss_bytes() / 2**20


def one_arm(arch, stem, arm, batch, steps, sparsity):
    """In this process: the stages of one trial's arm; returns [(stage, peak MB)]."""
    peaks = []
    import torch

    from pruneflow.data import train_val_batches
    from pruneflow.models import build_model, default_prune_targets
    from pruneflow.prune import prune
    from pruneflow.step import Perf, make_step
    from pruneflow.train import get_recipe, make_optimizer, train_one_epoch

    torch.set_num_threads(1)  # a trial's default threads_per_trial
    peaks.append(("imports", peak_mb()))
    dataset = DATASETS["simple_cnn" if arch == "simple_cnn" else "resnet"]
    channels = 1 if dataset == "digits" else 3
    model = build_model(arch, 10, channels, stem)
    peaks.append(("model", peak_mb()))
    if arm == "pruned":
        shape = (1, 28, 28) if dataset == "digits" else (3, 32, 32)
        op_types, exclude = default_prune_targets(arch)
        model, _ = prune(model, "l1", sparsity, shape, op_types, exclude, dependency_aware=True)
        peaks.append(("prune (NNI)", peak_mb()))
    model.to(memory_format=torch.channels_last)
    recipe = get_recipe("finetune", batch_size=batch)
    train_b, _ = train_val_batches(dataset, batch, torch.device("cpu"), 0, None, False, True, "device")
    opt, _ = make_optimizer(model, recipe, 1)
    train_one_epoch(model, itertools.islice(iter(train_b), steps), make_step(model, opt, Perf()))
    peaks.append((f"{steps} fine-tune steps", peak_mb()))
    return peaks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None, help="comma-separated (default resnet101; quick simple_cnn)")
    ap.add_argument("--stems", default="imagenet,cifar", help="ResNet stems (comma-separated)")
    ap.add_argument("--batch", type=int, default=64, help="fine-tuning batch (the 2022 report's finetune recipe: 64)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = ap.parse_args()
    if args.arm:
        arch, stem, arm = args.arm.split(":")
        print(json.dumps(one_arm(arch, stem, arm, args.batch, args.steps, args.sparsity)))
        return
    import torch

    from _common import print_header

    models = (args.models or ("simple_cnn" if args.quick else "resnet101")).split(",")
    print_header(torch.device("cpu"), f"batch {args.batch}, {args.steps} steps, L1 at {args.sparsity}, "
                 "1 thread, each arm in a fresh process", f"{'model':<12} {'stem':<9} {'arm':<8} "
                 f"{'stage':<20} {'peak MB':>8}")
    worst = {}
    for arch in models:
        for stem in (["cifar"] if arch == "simple_cnn" else args.stems.split(",")):
            for arm in ("pruned", "control"):
                p = subprocess.run([sys.executable, __file__, "--arm", f"{arch}:{stem}:{arm}", "--batch", str(args.batch),
                                    "--steps", str(args.steps), "--sparsity", str(args.sparsity)],
                                   capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                if p.returncode != 0:
                    sys.exit(f"{arch} {stem} {arm} failed:\n{p.stderr[-2000:]}")
                for stage, mb in json.loads(p.stdout.strip().splitlines()[-1]):
                    print(f"{arch:<12} {stem if arch != 'simple_cnn' else '-':<9} {arm:<8} {stage:<20} {mb:>8.0f}")
                worst[arch, stem] = max(worst.get((arch, stem), 0), mb)
    for (arch, stem), mb in worst.items():
        print(f"# {arch} {stem if arch != 'simple_cnn' else ''}: a trial peaks at {mb / 1024:.1f} GiB -> "
              f"resources.memory_per_trial: {int(-(-mb * 1.15 // 1024))}G or more (15 % headroom)")


if __name__ == "__main__":
    main()
