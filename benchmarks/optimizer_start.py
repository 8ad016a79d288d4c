"""What an optimiser costs a fresh CPU process: torch.optim's (which imports TorchDynamo on first use) against
pruneflow.optim's (the same arithmetic without it), side by side.

    python benchmarks/optimizer_start.py                 # SimpleCNN and ResNet-18, 5 rounds
    python benchmarks/optimizer_start.py --quick         # CI-sized: SimpleCNN, 1 round

Each round starts one fresh process per optimiser, alternately. In it: torch, pruneflow and the model are
imported and built and one backward pass made (not timed); then timed: building the recipe's optimiser and
its first step (what every training process and sweep worker pays once), and then the median of
--steps further steps (what every training step pays). Medians over the rounds; ratio = torch.optim ÷ pruneflow.
"""

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from pruneflow.models import build_model
from pruneflow.train import get_recipe
import pruneflow.optim

way, arch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)  # a sweep trial's default
torch.manual_seed(0)
model = build_model(arch, 10, 1 if arch == "simple_cnn" else 3, "cifar")
x = torch.randn(8, *((1, 28, 28) if arch == "simple_cnn" else (3, 32, 32)))
torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
r = get_recipe("cifar_resnet")  # SGD with momentum and weight decay: every term of the step
kw = dict(lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
t0, c0 = time.perf_counter(), time.process_time()
opt = (torch.optim.SGD if way == "torch.optim" else pruneflow.optim.SGD)(model.parameters(), **kw)
opt.step()
first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
times = []
for _ in range(steps):
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
times.sort()
print(json.dumps(dict(first=first, first_cpu=first_cpu, step=times[len(times) // 2] if times else 0.0,
                      dynamo="torch._dynamo" in sys.modules)))
"""

WAYS = ("torch.optim", "pruneflow.optim")


def one(way, arch, steps):
    p = subprocess.run([sys.executable, "-c", CHILD, way, arch, str(steps)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        sys.exit(f"error: the {way} process failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="simple_cnn,resnet18")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps timed after the first (median)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: SimpleCNN, 1 round, 3 steps")
    a = ap.parse_args()
    if a.quick:
        a.models, a.rounds, a.steps = "simple_cnn", 1, 3
    from pruneflow.models import ARCHITECTURES

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ARCHITECTURES]
    if bad:
        sys.exit(f"error: unknown model(s) {', '.join(bad)}; --models takes {', '.join(ARCHITECTURES)}")
    if a.rounds < 1 or a.steps < 0:
        sys.exit("error: --rounds must be >= 1 and --steps >= 0")

    import torch

    from _common import print_header

    print_header(torch.device("cpu"), f"1 thread per process, SGD (momentum, weight decay), {a.rounds} round(s), "
                 f"fresh processes alternately, medians", f"{'model':<11} {'optimiser':<16} {'first s':>8} "
                 f"{'first CPU s':>11} {'step ms':>8} {'dynamo':>7}")
    for arch in models:
        runs = {w: [] for w in WAYS}
        for _ in range(a.rounds):
            for w in WAYS:
                runs[w].append(one(w, arch, a.steps))
        med = {w: {k: statistics.median(r[k] for r in runs[w]) for k in ("first", "first_cpu", "step")} for w in WAYS}
        for w in WAYS:
            m = med[w]
            print(f"{arch:<11} {w:<16} {m['first']:>8.3f} {m['first_cpu']:>11.3f} {1000 * m['step']:>8.3f} "
                  f"{'yes' if any(r['dynamo'] for r in runs[w]) else 'no':>7}")
        t, p = med["torch.optim"], med["pruneflow.optim"]
        print(f"{arch:<11} {'ratio':<16} {t['first'] / p['first']:>8.1f} {t['first_cpu'] / max(p['first_cpu'], 1e-6):>11.1f} "
              f"{t['step'] / max(p['step'], 1e-9):>8.2f}")


if __name__ == "__main__":
    main()
