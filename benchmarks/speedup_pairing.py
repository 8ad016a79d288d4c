"""How far a sweep's speedups are off when the dense model is timed on its own: the same trials, both ways.

    python benchmarks/speedup_pairing.py results/quickstart/shard-0-of-1.h5 [more files]

Every trial of a sweep times its model and the dense checkpoint alternately, call by call (the ``latency`` and
``latency_dense`` datasets), and records their median per-pair ratio as its speedup ("paired"). Before that,
the speedup was the dense trial's median latency over this trial's, each timed in its own trial at its own
moment ("separate"); this prints both for every trial of the files given. The control trial and the level
(unstructured) trials run exactly the dense model's computation, so their true speedup is 1: how far each
estimate lands from 1 for them is its error, on the machine and under the packing the sweep had.
"""

import argparse
import math
import statistics

from pruneflow.errors import UserError, exit_on_user_error
from pruneflow.infer.timing import summarize
from pruneflow.results import read_trials


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="shard files (HDF5) of sweeps that recorded paired latencies")
    args = ap.parse_args()
    ones = {"separate": [], "paired": []}  # the speedups of the trials whose true speedup is 1
    for path in args.files:
        records = [r for r in read_trials(path) if r["status"] == "done"]
        dense = [r for r in records if r["arm"] == "dense"]
        paired = [r for r in records if r["arm"] != "dense" and r.get("latency_dense")]
        if not dense or not paired:
            raise UserError(f"{path}: needs a dense trial and trials timed alongside it (pruneflow with paired timing)")
        if path == args.files[0]:
            print(f"{'trial':<18} {'file':<20} {'MACs÷':>6} {'separate':>8} {'paired':>7}")
        for r in sorted(paired, key=lambda r: (r["method"], r["sparsity"])):
            separate = dense[0]["latency_median"] / summarize(r["latency"])["median"]
            print(f"{r['id']:<18} {path.rsplit('/', 1)[-1][:20]:<20} {r['mac_reduction']:>6.2f} {separate:>8.2f} "
                  f"{r['speedup']:>7.2f}")
            if r["arm"] == "control" or r["method"] == "level":
                ones["separate"].append(separate)
                ones["paired"].append(r["speedup"])
    if ones["paired"]:
        print(f"\ncontrol and level trials (true speedup 1), {len(ones['paired'])} of them: how far from 1 (either way)")
        for way, xs in ones.items():
            off = [math.exp(abs(math.log(x))) for x in xs]
            print(f"  {way:<9} median {statistics.median(off):.3f}x   max {max(off):.3f}x   "
                  f"range {min(xs):.2f}-{max(xs):.2f}")


if __name__ == "__main__":
    exit_on_user_error(main)  # a file without paired timings: one line, exit 2
