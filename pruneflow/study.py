"""A study directory read back for reporting: its trial records (every shard file merged), the device JSONs
beside them, what the config expected and is missing, and the numbers figures and tables share (baselines,
speedups, per-sparsity curves). No plotting here: pruneflow/figures.py draws, pruneflow/report.py writes.
"""

import dataclasses
import glob
import json
import os
import re
import types

from .errors import UserError
from .spec import MAC_TOLERANCE, misses_mac_target

DEVICE_SCHEMA = "pruneflow-device/1"


# ----------------------------------------------------------------------------------------------- loading

def load_study(study_dir):
    """Records, per-file attrs and device JSONs of one study; raises UserError when there is nothing to read."""
    from .results import check_file, read_file_attrs, read_study, study_files

    study_dir = os.fspath(study_dir)
    if not os.path.exists(study_dir):
        raise UserError(f"study directory {study_dir} does not exist")
    if not os.path.isdir(study_dir):
        raise UserError(f"{study_dir} is not a directory; pass a study directory such as results/quickstart")
    paths = study_files(study_dir)
    if not paths:
        below = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(study_dir, "*", "shard-*.h5")))
        hint = f" (did you mean {below[0]}?)" if below else " (run python -m pruneflow.sweep first)"
        raise UserError(f"no results found in {study_dir}: no shard-*.h5 files{hint}")
    for p in paths:  # one clear error for a foreign or newer file before reading anything
        check_file(p)
    files = {os.path.basename(p): read_file_attrs(p) for p in paths}
    records = read_study(study_dir)
    if not records:
        raise UserError(f"no results found in {study_dir}: its shard file(s) hold no trials yet")
    for r in records:
        r["device_key"] = sweep_device(r, files[r["file"]]["env"])
    label_roundings(records)
    devices, notes = read_device_jsons(study_dir)
    return types.SimpleNamespace(dir=study_dir, name=os.path.basename(os.path.abspath(study_dir)), paths=paths,
                                 files=files, records=records, devices=devices, notes=notes)


def label_roundings(records):
    """A method pruned at several prune.round_to values becomes one method per rounding ("l1@depgraph r8"), so
    that tables, figures and tests never pool trials whose channel counts were rounded differently."""
    pruned = [r for r in records if r["arm"] == "pruned"]
    several = {m for m in {r["method"] for r in pruned}
               if len({int(r.get("round_to") or 0) for r in pruned if r["method"] == m}) > 1}
    for r in pruned:
        if r["method"] in several:
            r["method"] = f"{r['method']} r{int(r.get('round_to') or 0) or 1}"


class Study:
    """A study read back for analysis: ``load("results/quickstart").trials`` is a pandas DataFrame of every
    trial across shards, one column per TrialRecord field plus the intervals (pandas: the report extra)."""

    def __init__(self, study_dir):
        self.dir = os.fspath(study_dir)
        self.records = load_study(self.dir).records

    @property
    def trials(self):
        try:
            import pandas as pd
        except ImportError:
            raise UserError("Study.trials needs pandas: pip install 'pruneflow[report]'") from None
        from .compare import accuracy_interval, speedup_interval
        from .record import TrialRecord

        names = [f.name for f in dataclasses.fields(TrialRecord) if f.name != "traceback"]
        rows = []
        for r in self.records:
            row = {k: r.get(k) for k in names}
            for split in ("val", "test"):
                _, row[f"{split}_acc_lo"], row[f"{split}_acc_hi"], row[f"{split}_n"] = accuracy_interval(r, split)
            _, row["speedup_lo"], row["speedup_hi"] = speedup_interval([r]) if r["status"] == "done" else (None,) * 3
            row["file"] = r["file"]
            rows.append(row)
        return pd.DataFrame(rows)


def load(study_dir):
    """The study in ``study_dir`` (every shard file), for pandas: ``load(dir).trials``."""
    return Study(study_dir)


def sweep_device(r, env):
    """(type, hardware name) a trial was timed on; the CPU's name for CPU trials even on a GPU node."""
    dev = str(r.get("device") or (r.get("latency_settings") or {}).get("device") or "")
    if not dev:
        return None  # a failed trial: never timed
    kind = dev.split(":")[0]
    if r.get("device_name"):  # the trial's own (a later run of the same file may have had other hardware)
        return kind, str(r["device_name"])
    return kind, str(env.get("cpu") if kind == "cpu" else env.get("device_name") or kind)


def read_device_jsons(study_dir):
    """Every pruneflow-device/1 JSON below the study (checkpoints/devices/*.json and the like)."""
    found, notes = [], []
    paths = sorted(set(glob.glob(os.path.join(study_dir, "*", "devices", "*.json"))
                       + glob.glob(os.path.join(study_dir, "devices", "*.json"))))
    for p in paths:
        rel = os.path.relpath(p, study_dir)
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"skipped device file {rel}: not readable JSON ({e})")
            continue
        if not isinstance(doc, dict) or doc.get("schema") != DEVICE_SCHEMA:
            schema = doc.get("schema") if isinstance(doc, dict) else None
            notes.append(f"skipped device file {rel}: schema {schema!r}, expected {DEVICE_SCHEMA!r}")
            continue
        doc["path"] = rel
        found.append(doc)
    return found, notes


def expected_ids(config):
    """Trial ids the study's config asks for, with the sweep's own grid and sharding."""
    from .spec import grid

    prune = config.get("prune") or {}
    spec = types.SimpleNamespace(seeds=config.get("seeds") or [0], control=config.get("control", True),
                                 prune=types.SimpleNamespace(methods=prune.get("methods") or [],
                                                             sparsities=prune.get("sparsities") or [],
                                                             mac_targets=prune.get("mac_targets") or [],
                                                             speedup_targets=prune.get("speedup_targets") or [],
                                                             round_to=prune.get("round_to")))
    return [t.id for t in grid(spec)]


def missing_parts(study):
    """Notes on absent shard files and on trials the config expects but no file holds."""
    from .spec import shard_trials

    notes, present = [], {r["id"] for r in study.records}
    expected = []
    for attrs in study.files.values():
        expected += [i for i in expected_ids(attrs["config"]) if i not in expected]
    seen = {}
    for name in study.files:
        m = re.fullmatch(r"shard-(\d+)-of-(\d+)\.h5", name)
        if m:
            seen.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    explained = set()
    for n, have in sorted(seen.items()):
        for i in sorted(set(range(n)) - have):
            ids = [t for t in shard_trials(expected, (i, n)) if t not in present]
            explained.update(ids)
            what = f"its trial(s) {', '.join(ids)} are absent" if ids else "its trials are all present in other files"
            notes.append(f"shard {i}/{n} is missing (shard-{i}-of-{n}.h5 not found): {what}")
    absent = [i for i in expected if i not in present and i not in explained]
    if absent:  # e.g. a sweep killed before it reached them: re-running the same command adds them
        notes.append(f"{len(absent)} expected trial(s) have no record in the shard files present: {', '.join(absent)}")
    return notes, expected


# ------------------------------------------------------------------------------------------ numbers

def done(records, **match):
    return [r for r in records if r["status"] == "done" and all(r.get(k) == v for k, v in match.items())]


def baseline(r, records, arm):
    """The dense (or control) record to compare ``r`` with: same device and seed where there is one."""
    cands = done(records, arm=arm, model=r.get("model"))
    for keys in (("device_key", "seed"), ("device_key",), ("seed",), ()):
        hit = [c for c in cands if all(c.get(k) == r.get(k) for k in keys)]
        if hit:
            return hit[0]
    return None


def speedup(r, records):
    """How many times faster than the dense model: the trial's own side-by-side measurement (the dense
    checkpoint timed alternately with it, median of the per-pair ratios), else, for files written before
    that existed, the dense record's median latency over this one's on the same device."""
    if r["status"] != "done":
        return None
    if r.get("speedup"):
        return r["speedup"]
    base = baseline(r, records, "dense")
    if base is None or r["device_key"] != base["device_key"]:
        return None
    return base["latency_median"] / r["latency_median"]


def slower_than_dense(records, share=0.8, min_pairs=10):
    """Notes for pruned trials that ran slower than the dense model they came from, despite fewer MACs: slower
    in at least ``share`` of their timed pairs (the dense model timed alternately with them, see trial.py).
    With no true difference each pair goes either way with even odds, so 8 of 10 pairs or 20 of 25 happen by
    chance 5 % or 0.2 % of the time: a sign test, which needs no assumption about the timing noise."""
    notes = []
    for r in sorted(done(records, arm="pruned"), key=lambda r: r["id"]):
        pairs = list(zip(r.get("latency") or [], r.get("latency_dense") or []))
        slower = sum(t > d for t, d in pairs)
        if len(pairs) >= min_pairs and slower >= share * len(pairs) and r.get("mac_reduction", 1.0) > 1.0:
            notes.append(f"{r['id']} ran slower than the dense model in {slower} of {len(pairs)} timed pairs "
                         f"(speedup {r['speedup']:.2f}x) despite {r['mac_reduction']:.2f}x fewer MACs")
    return notes


def missed_mac_targets(records, tolerance=MAC_TOLERANCE):
    """Notes for target-MACs trials whose pruned model missed the target by more than ``tolerance`` (relative):
    channel counts come in steps, and a method can stop short of a large target.
    Such a trial is still the closest its method got, so it stays, named."""
    notes = []
    for r in sorted(done(records, arm="pruned"), key=lambda r: r["id"]):
        target = r.get("target_mac_reduction") or 0
        if target and misses_mac_target(r["mac_reduction"], target, tolerance):
            notes.append(f"{r['id']} reached {r['mac_reduction']:.2f}x fewer MACs against its {target:g}x target "
                         f"(sparsity {r['sparsity']:.3f}, the closest try)")
    return notes


def missed_speedup_targets(records):
    """Notes for speedup-target trials whose search did not reach the target: the fastest try stays, named."""
    return [f"{r['id']} did not reach its {r['target_speedup']:g}x speedup target in {r.get('target_speedup_where', '?')}: "
            f"the fastest try measured {r.get('target_speedup_measured', 0):.2f}x at sparsity {r['sparsity']:.3f}"
            for r in sorted(done(records, arm="pruned"), key=lambda r: r["id"])
            if r.get("target_speedup") and not r.get("target_speedup_reached")]


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def curve(records, device_key, x="nominal"):
    """Per sparsity over seeds: x (nominal %, or with ``x='achieved'`` the mean achieved %), latency mean/std in
    ms (raw samples pooled), the mean in ms of the dense model's samples timed alternately with those trials
    (d_mean; NaN for files from before pairing), train/val/test accuracy % with a 95 % interval (<k>_lo,
    <k>_hi): Student t over seeds with 2+ seeds, else Wilson on the one trial's images; n_<k> images."""
    import numpy as np

    from .compare import accuracy_interval, achieved
    from .stats import t_interval

    rows = sorted(r for r in {round(r["sparsity"], 4) for r in records})
    out = {k: [] for k in ("x", "t_mean", "t_std", "d_mean", "train", "train_lo", "train_hi", "val", "val_lo",
                           "val_hi", "test", "test_lo", "test_hi", "n_val", "n_test", "seeds")}
    for s in rows:
        group = [r for r in records if round(r["sparsity"], 4) == s]
        timed = [r for r in group if r["device_key"] == device_key]
        samples = [x for r in timed for x in r["latency"]] or [r["latency_mean"] for r in timed]
        dense_samples = [x for r in timed for x in r.get("latency_dense") or []]
        out["x"].append(100 * (np.mean([achieved(r) for r in group]) if x == "achieved" else s))
        out["t_mean"].append(1e3 * np.mean(samples) if samples else np.nan)
        out["t_std"].append(1e3 * np.std(samples, ddof=1) if len(samples) > 1 else 0.0)
        out["d_mean"].append(1e3 * np.mean(dense_samples) if dense_samples else np.nan)
        out["seeds"].append(len(group))
        for k in ("train", "val", "test"):
            if k == "train":
                scored = [(r["train_acc"], np.nan, np.nan, 0) for r in group]
            else:
                scored = [accuracy_interval(r, k) for r in group]
                out[f"n_{k}"].append(max(n for *_, n in scored))
            accs = [a for a, *_ in scored]
            m, lo, hi = t_interval(accs) if len(accs) > 1 else (accs[0], scored[0][1], scored[0][2])
            for name, v in ((k, m), (f"{k}_lo", lo), (f"{k}_hi", hi)):
                out[name].append(100 * v if v is not None else np.nan)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def yerr(c, k):
    """matplotlib's yerr for series ``k`` of a curve: distances to the interval's ends (0 where unknown)."""
    return bar_lengths(c[k], c[f"{k}_lo"], c[f"{k}_hi"])


def bar_lengths(v, lo, hi):
    """matplotlib's xerr/yerr for values ``v`` with intervals [lo, hi]: distances to the ends (0 where unknown)."""
    import numpy as np

    v, lo, hi = (np.asarray(a, dtype=float) for a in (v, lo, hi))
    return np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)


def pareto_front(points):
    """Points (x to minimise, y to maximise) not dominated by any other, sorted by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def method_order(study, records):
    cfg = next(iter(study.files.values()))["config"]
    listed = list((cfg.get("prune") or {}).get("methods") or [])
    return listed + sorted({r["method"] for r in records if r["arm"] == "pruned"} - set(listed))


def device_label(key):
    return "?" if key is None else f"{key[0]} ({key[1]})" if key[1] and key[1] != key[0] else key[0]


def device_series(study, model, records):
    """One latency series per device: the sweep's own device(s), then each device JSON (same checkpoints)."""
    series = []
    for key in sorted({r["device_key"] for r in done(records)} - {None}):
        timed = [r for r in done(records) if r["device_key"] == key]
        rows = [dict(method=r["method"], arm=r["arm"], sparsity=r["sparsity"], mean=r["latency_mean"],
                     std=r["latency_std"], median=r["latency_median"], file=os.path.basename(r["checkpoint"]),
                     speedup=r.get("speedup") or None)  # measured side by side with the dense model
                for r in timed]
        settings = timed[0].get("latency_settings") or {}
        threads = settings.get("threads") if str(timed[0].get("device", "")).startswith("cpu") else None
        series.append((f"sweep: {device_label(key)}, batch {settings.get('batch_size', '?')}"
                       + (f", {threads} thread(s)" if threads else ""), rows))
    for doc in study.devices:
        mach, st = doc.get("machine") or {}, doc.get("settings") or {}
        rows = []
        for c in doc.get("checkpoints") or []:
            if c.get("arch") not in (None, model):
                continue
            lat = c.get("latency") or {}
            arm = c.get("arm") or ("dense" if c.get("file", "").startswith("dense") else
                                   "control" if c.get("file", "").startswith("control") else
                                   "pruned" if c.get("method") not in (None, "none") else "dense")
            rows.append(dict(method=c.get("method", "none"), arm=arm, sparsity=float(c.get("sparsity", 0.0)),
                             mean=lat.get("mean"), std=lat.get("std") or 0.0, median=lat.get("median"),
                             file=c.get("file"),
                             speedup=c.get("speedup_vs_dense") if st.get("speedup") == "paired" else None))
        if rows:
            label = (f"{mach.get('hostname', '?')}: {mach.get('device', '?')} ({mach.get('device_name', '?')}), "
                     f"batch {st.get('batch_size', '?')}, {st.get('dtype', 'float32')}")
            series.append((label, rows))
    return series
