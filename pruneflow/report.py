"""``python -m pruneflow.report results/<study>``: figures and a summary.md from a study's HDF5 shards.

Reads every ``shard-*.h5`` of the study (merged: a done record wins over a failed one) and every device
JSON written by ``python -m pruneflow.infer --ckpt DIR`` (``*/devices/*.json``), and writes to
``results/<study>/report/``: the seed's time-and-accuracy figure per model x method x device, the methods
overlaid, Pareto fronts, size and speedup, the cross-device comparison, the architecture views (graph and
per-layer widths from the checkpoints, pruneflow/views.py), the resource timeline of each sweep run
(pruneflow/timeline.py), and summary.md (tables whose numbers are the HDF5 values, failures, what is missing,
resources, provenance). docs/report.md describes each figure.
"""

import contextlib
import datetime
import glob
import json
import os
import re
import shlex
import types

from .infer.errors import UserError, check_writable_dir

KINDS = ("time", "methods", "pareto", "size", "devices", "arch", "timeline", "summary")
FORMATS = ("png", "pdf", "svg")
DEVICE_SCHEMA = "pruneflow-device/1"
ARM_ORDER = {"dense": 0, "control": 1, "pruned": 2}
# Fixed colours so a method looks the same in every figure.
METHOD_COLORS = {"level": "C0", "l1": "C1", "l2": "C2", "fpgm": "C3", "taylor": "C5", "slim": "C6"}
# Methods often coincide (L1 and L2 choose the same channels): distinct markers and dashes keep both visible.
METHOD_STYLES = {"level": ("o", "-"), "l1": ("s", "--"), "l2": ("^", ":"), "fpgm": ("D", "-."), "taylor": ("v", "-"),
                 "slim": ("P", "--")}
DEPGRAPH_DASH = (0, (6, 2, 1, 2, 1, 2))  # l1@depgraph: l1's colour and marker, hollow, dash-dot-dot
DENSE_COLOR, CONTROL_COLOR = "black", "C4"


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
    devices, notes = read_device_jsons(study_dir)
    return types.SimpleNamespace(dir=study_dir, name=os.path.basename(os.path.abspath(study_dir)), paths=paths,
                                 files=files, records=records, devices=devices, notes=notes)


def sweep_device(r, env):
    """(type, hardware name) a trial was timed on; the CPU's name for CPU trials even on a GPU node."""
    dev = str(r.get("device") or (r.get("latency_settings") or {}).get("device") or "")
    if not dev:
        return None  # a failed trial: never timed
    kind = dev.split(":")[0]
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
                                                             mac_targets=prune.get("mac_targets") or []))
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
    base = baseline(r, records, "dense")
    if r["status"] != "done" or base is None or r["device_key"] != base["device_key"]:
        return None
    return base["latency_median"] / r["latency_median"]


def curve(records, device_key):
    """Per sparsity over seeds: x, latency mean/std in ms (raw samples pooled), train/val acc % (mean, std)."""
    import numpy as np

    rows = sorted(r for r in {round(r["sparsity"], 4) for r in records})
    out = {k: [] for k in ("x", "t_mean", "t_std", "train", "train_std", "val", "val_std")}
    for s in rows:
        group = [r for r in records if round(r["sparsity"], 4) == s]
        timed = [r for r in group if r["device_key"] == device_key]
        samples = [x for r in timed for x in r["latency"]] or [r["latency_mean"] for r in timed]
        out["x"].append(100 * s)
        out["t_mean"].append(1e3 * np.mean(samples) if samples else np.nan)
        out["t_std"].append(1e3 * np.std(samples, ddof=1) if len(samples) > 1 else 0.0)
        for k in ("train", "val"):
            accs = [100 * r[f"{k}_acc"] for r in group]
            out[k].append(np.mean(accs))
            out[f"{k}_std"].append(np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def method_order(study, records):
    cfg = next(iter(study.files.values()))["config"]
    listed = list((cfg.get("prune") or {}).get("methods") or [])
    return listed + sorted({r["method"] for r in records if r["arm"] == "pruned"} - set(listed))


# ------------------------------------------------------------------------------------------ figures

def _fig(ncols=1, width=8.0, height=4.8, nrows=1, **kw):
    """A pyplot-free Figure (no global state, Agg backend) and its axes: one row unless nrows > 1."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes[0] if nrows == 1 else axes


def mstyle(m, line=True):
    """Matplotlib keyword arguments that draw method ``m`` the same way in every figure (scatter: line=False)."""
    import zlib

    base, _, backend = str(m).partition("@")
    marker, dash = METHOD_STYLES.get(base, ("o", "-"))
    color = METHOD_COLORS.get(base) or f"C{7 + zlib.crc32(base.encode()) % 3}"  # unknown: stable, unused by the rest
    if not backend or backend == "nni":
        return dict(color=color, marker=marker, label=m, **({"linestyle": dash} if line else {}))
    if not line:  # scatter: hollow markers in the base method's colour
        return dict(facecolors="none", edgecolors=color, linewidths=1.5, marker=marker, label=m)
    return dict(color=color, marker=marker, markerfacecolor="white", linestyle=DEPGRAPH_DASH, label=m)


def device_label(key):
    return "?" if key is None else f"{key[0]} ({key[1]})" if key[1] and key[1] != key[0] else key[0]


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def _context(study, records, latency=True):
    """The subtitle: how the numbers were made (epochs, timing settings, torch, host)."""
    attrs = study.files[records[0]["file"]]
    cfg = attrs["config"]
    lat = cfg.get("latency") or {}
    timing = f"latency: batch {lat.get('batch_size', '?')}, {lat.get('trials', '?')} timed runs; " if latency else ""
    return (f"fine-tuned {(cfg.get('finetune') or {}).get('epochs', '?')} epoch(s); {timing}"
            f"torch {attrs['env'].get('torch', '?')}, host {attrs.get('host', '?')}")


def _hline(ax, y, color, label, style="--"):
    if y is not None:
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=label)


def fig_time(study, model, dataset, method, key, records):
    """The seed's figure: inference time (mean ± std) on the left, train and val accuracy on the right."""
    pruned = [r for r in done(records, arm="pruned", method=method)]
    if not any(r["device_key"] == key for r in pruned):
        return None
    c = curve(pruned, key)
    dense, control = done(records, arm="dense"), done(records, arm="control")
    fig, (ax,) = _fig(width=8.5, height=5.2)
    ax2 = ax.twinx()
    ax.plot(c["x"], c["t_mean"], "o-", color="C0", label="inference time (mean)")
    ax.fill_between(c["x"], c["t_mean"] - c["t_std"], c["t_mean"] + c["t_std"], color="C0", alpha=0.2,
                    label="inference time ± std")
    ax2.errorbar(c["x"], c["train"], yerr=c["train_std"], fmt="s-", color="C1", label="train accuracy", capsize=3)
    ax2.errorbar(c["x"], c["val"], yerr=c["val_std"], fmt="^-", color="C2", label="val accuracy", capsize=3)
    dense_t = [r for r in dense if r["device_key"] == key]
    if dense_t:
        _hline(ax, 1e3 * _mean([r["latency_mean"] for r in dense_t]), "C0", "dense time")
    if dense:
        _hline(ax2, 100 * _mean([r["train_acc"] for r in dense]), "C1", "dense train accuracy")
        _hline(ax2, 100 * _mean([r["val_acc"] for r in dense]), "C2", "dense val accuracy")
    if control:
        _hline(ax2, 100 * _mean([r["val_acc"] for r in control]), CONTROL_COLOR,
               "control val accuracy (dense, fine-tuned)", style="-.")
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel("inference time per batch (ms)", color="C0")
    ax2.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(_context(study, pruned), fontsize=9)
    fig.suptitle(f"{model} on {dataset}: {method} pruning, timed on {device_label(key)}")
    handles = {lab: h for a in (ax, ax2) for h, lab in zip(*a.get_legend_handles_labels())}
    # column-major in 3 columns: time | this method's accuracies and the control | the dense accuracies
    order = ["inference time (mean)", "inference time ± std", "dense time", "train accuracy", "val accuracy",
             "control val accuracy (dense, fine-tuned)", "dense train accuracy", "dense val accuracy"]
    fig.legend([handles[k] for k in order if k in handles], [k for k in order if k in handles],
               loc="outside lower center", ncol=3, fontsize=9)
    return fig


def fig_methods(study, model, dataset, methods, records):
    pruned = done(records, arm="pruned")
    if not pruned:
        return None
    fig, (ax,) = _fig()
    for m in methods:
        rs = [r for r in pruned if r["method"] == m]
        if rs:
            c = curve(rs, None)
            ax.errorbar(c["x"], c["val"], yerr=c["val_std"], capsize=3, **mstyle(m))
    _baselines(ax, records, lambda r: 100 * r["val_acc"])
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    keys = sorted({device_label(r["device_key"]) for r in pruned})
    ax.set_title(_context(study, pruned, latency=False), fontsize=9)
    fig.suptitle(f"{model} on {dataset}: validation accuracy by pruning method — {', '.join(keys)}")
    return fig


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _baselines(ax, records, value, dense_label="dense", control_label="control (dense, fine-tuned)"):
    for arm, color, label, style in (("dense", DENSE_COLOR, dense_label, "--"),
                                     ("control", CONTROL_COLOR, control_label, "-.")):
        rs = done(records, arm=arm)
        if rs:
            _hline(ax, _mean([value(r) for r in rs]), color, label, style)


def pareto_front(points):
    """Points (x to minimise, y to maximise) not dominated by any other, sorted by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def fig_pareto(study, model, dataset, methods, key, records):
    rs = [r for r in done(records) if r["device_key"] == key]
    if not rs:
        return None
    fig, axes = _fig(ncols=2, width=11, height=4.8)
    for ax, (xlabel, xval) in zip(axes, (("inference time per batch (ms, mean)", lambda r: 1e3 * r["latency_mean"]),
                                         ("MACs per image (millions)", lambda r: r["macs"] / 1e6))):
        for m in methods:
            pts = [r for r in rs if r["method"] == m and r["arm"] == "pruned"]
            if pts:
                ax.scatter([xval(r) for r in pts], [100 * r["val_acc"] for r in pts], s=36, zorder=3,
                           **mstyle(m, line=False))
        for arm, color, marker in (("dense", DENSE_COLOR, "*"), ("control", CONTROL_COLOR, "D")):
            pts = [r for r in rs if r["arm"] == arm]
            if pts:
                label = "control (dense, fine-tuned)" if arm == "control" else "dense"
                ax.scatter([xval(r) for r in pts], [100 * r["val_acc"] for r in pts], color=color, marker=marker,
                           s=110 if marker == "*" else 50, label=label, zorder=4)
        front = pareto_front([(xval(r), 100 * r["val_acc"]) for r in rs])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", linewidth=1, zorder=2,
                label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"accuracy vs latency ({_context(study, rs).split('; ')[1]})", fontsize=9)
    axes[1].set_title("accuracy vs compute (device-independent)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9)
    fig.suptitle(f"{model} on {dataset}: Pareto fronts, timed on {device_label(key)}")
    return fig


def fig_size(study, model, dataset, methods, key, records):
    rs = [r for r in done(records) if r["device_key"] == key]
    if not any(r["arm"] == "pruned" for r in rs):
        return None
    fig, axes = _fig(ncols=3, width=14, height=4.6)
    for ax, (ylabel, val) in zip(axes[:2], (("parameters (millions)", lambda r: r["params"] / 1e6),
                                           ("MACs per image (millions)", lambda r: r["macs"] / 1e6))):
        for m in methods:
            pts = sorted((r for r in rs if r["method"] == m and r["arm"] == "pruned"), key=lambda r: r["sparsity"])
            if pts:
                ax.plot([100 * r["sparsity"] for r in pts], [val(r) for r in pts], **mstyle(m))
        _baselines(ax, rs, val, control_label=None)
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax = axes[2]
    top = 1.0
    for m in methods:
        pts = [(r["mac_reduction"], speedup(r, records)) for r in rs if r["method"] == m and r["arm"] == "pruned"]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts), zorder=3, **mstyle(m, line=False))
            top = max(top, *(max(p) for p in pts))
    ax.plot([1, top * 1.05], [1, top * 1.05], color="gray", linestyle=":", linewidth=1.5,
            label="ideal (speedup = MAC reduction)")
    if top > 10:  # 90 % channel sparsity removes ~50x the MACs: a linear axis would crush the rest
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # 1, 10, 100 rather than 10^0, 10^1, 10^2
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("MAC reduction (dense MACs / pruned MACs, ×)")
    ax.set_ylabel("measured speedup (dense / pruned median latency, ×)")
    ax.grid(alpha=0.3)
    axes[0].set_title("size (level pruning masks weights: size unchanged)", fontsize=9)
    axes[1].set_title("compute", fontsize=9)
    ax.set_title(f"speedup on {device_label(key)}", fontsize=9)
    handles, labels = axes[2].get_legend_handles_labels()
    extra = [(h, "dense (size, compute)") for h, lab in zip(*axes[0].get_legend_handles_labels()) if lab == "dense"]
    fig.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], loc="outside right center",
               fontsize=9)
    fig.suptitle(f"{model} on {dataset}: size, compute and measured speedup — {device_label(key)}")
    return fig


def device_series(study, model, records):
    """One latency series per device: the sweep's own device(s), then each device JSON (same checkpoints)."""
    series = []
    for key in sorted({r["device_key"] for r in done(records)} - {None}):
        timed = [r for r in done(records) if r["device_key"] == key]
        rows = [dict(method=r["method"], arm=r["arm"], sparsity=r["sparsity"], mean=r["latency_mean"],
                     std=r["latency_std"], median=r["latency_median"], file=os.path.basename(r["checkpoint"]))
                for r in timed]
        bs = (timed[0].get("latency_settings") or {}).get("batch_size", "?")
        series.append((f"sweep: {device_label(key)}, batch {bs}", rows))
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
                             file=c.get("file")))
        if rows:
            label = (f"{mach.get('hostname', '?')}: {mach.get('device', '?')} ({mach.get('device_name', '?')}), "
                     f"batch {st.get('batch_size', '?')}, {st.get('dtype', 'float32')}")
            series.append((label, rows))
    return series


def fig_devices(study, model, dataset, methods, series):
    import numpy as np

    methods = [m for m in methods if any(r["method"] == m for _, rows in series for r in rows)]
    if len(series) < 2 or not methods:
        return None
    fig, axes = _fig(ncols=len(methods), width=max(7.0, 4.2 * len(methods)), height=8.0, nrows=2, sharex=True)
    for j, m in enumerate(methods):
        means = []
        for k, (label, rows) in enumerate(series):
            dense = [r for r in rows if r["arm"] == "dense"]
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["sparsity"])
            pts = dense[:1] + pts  # start each curve at the dense model (sparsity 0)
            if not pts:
                continue
            x = np.array([100 * r["sparsity"] for r in pts])
            mean = np.array([1e3 * r["mean"] for r in pts])
            std = np.array([1e3 * r["std"] for r in pts])
            color = f"C{k}"
            means += list(mean)
            axes[0][j].plot(x, mean, "o-", color=color, label=label)
            axes[0][j].fill_between(x, np.maximum(mean - std, mean * 0.01), mean + std, color=color, alpha=0.15)
            if dense:
                axes[1][j].plot(x, [dense[0]["median"] / r["median"] for r in pts], "o-", color=color)
        axes[0][j].set_title(m, fontsize=10)
        log = bool(means) and max(means) / max(min(means), 1e-9) > 20  # an A100 and a laptop: orders of magnitude
        if log:
            axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("inference time per batch (ms, mean ± std" + (", log)" if log else ")"))
        axes[1][j].axhline(1.0, color="gray", linestyle="--", linewidth=1)
        axes[1][j].set_xlabel("target sparsity (%)")
        axes[1][j].set_ylabel("speedup vs dense on the same device (×)")
        for a in axes[:, j]:
            a.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=1, fontsize=9)
    fig.suptitle(f"{model} on {dataset}: the same checkpoints on {len(series)} devices")
    return fig


def save_figure(fig, out, name, formats, dpi, written):
    for fmt in formats:
        path = os.path.join(out, f"{name}.{fmt}")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
        written.append(path)


def atomic_write(path, write):
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half of one."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------ summary

def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows, head):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


TABLE_HEAD = ["trial", "sparsity", "params", "MACs", "latency ms (median ± std)", "speedup ×", "train acc %",
              "val acc %", "Δ val vs dense (pp)", "Δ val vs control (pp)", "status"]


def trial_row(r, records, with_device):
    if r["status"] != "done":
        row = [r["id"], f"{r['sparsity']:.2f}", "", "", "", "", "", "", "", "", "failed"]
    else:
        sp = speedup(r, records)
        deltas = []
        for arm in ("dense", "control"):
            b = baseline(r, records, arm)
            deltas.append("" if b is None else f"{100 * (r['val_acc'] - b['val_acc']):+.2f}")
        row = [r["id"], f"{r['sparsity']:.2f}", f"{r['params']:,}", f"{r['macs']:,}",
               f"{1e3 * r['latency_median']:.3f} ± {1e3 * r['latency_std']:.3f}", "" if sp is None else f"{sp:.2f}",
               _pct(r["train_acc"]), _pct(r["val_acc"]), *deltas, "done"]
    return row + ([device_label(r["device_key"])] if with_device else [])


def _sort_key(r):
    return ARM_ORDER.get(r["arm"], 3), r["method"], r["sparsity"], r["seed"]


def pick_shown(records, methods, show):
    if show:
        hit = [r for r in records if r["id"] == str(show)]
        if not hit:
            raise UserError(f"--show {show}: no such trial; trials: {', '.join(sorted(r['id'] for r in records))}")
        if hit[0]["status"] != "done":
            raise UserError(f"--show {show}: that trial failed, so it has no model to show")
        return hit[0]
    # default: the sparsest trial of the first method that changes the architecture (level keeps shapes)
    for m in sorted(methods, key=lambda m: m == "level"):
        rs = done(records, arm="pruned", method=m)
        if rs:
            return max(rs, key=lambda r: (r["sparsity"], -r["seed"]))
    return None


def summary_md(study, notes, figures, series_by_model, shown, command, arch_lines=(), resource_lines=()):
    recs = sorted(study.records, key=_sort_key)
    n_failed = sum(r["status"] != "done" for r in recs)
    first = next(iter(study.files.values()))
    lines = [f"# Report: study {study.name}", "",
             f"{len(recs)} trial record(s): {len(recs) - n_failed} done, {n_failed} failed; "
             f"{len(study.paths)} shard file(s). Generated {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} "
             f"by pruneflow {first.get('pruneflow_version', '?')}: `{command}`", "",
             "Latency: median ± sample std of the timed batches, in ms; speedup = dense median / trial median on the "
             "same device; accuracies in %; Δ in percentage points against the dense model and against the control "
             "(the dense model fine-tuned for the same epochs) of the same seed.", ""]
    lines += ["## Notes", ""] + ([f"- {n}" for n in notes] or ["- nothing missing, nothing failed"]) + [""]
    for model in sorted({r.get("model") for r in recs}, key=str):
        rs = [r for r in recs if r.get("model") == model]
        dataset = rs[0].get("dataset", "?")
        keys = sorted({r["device_key"] for r in rs if r["device_key"]})
        with_device = len(keys) > 1
        head = TABLE_HEAD + (["device"] if with_device else [])
        lines += [f"## {model} on {dataset}", "", f"Timed on: {', '.join(device_label(k) for k in keys) or '-'}", ""]
        lines += ["### baselines (dense and control)", ""]
        lines += table([trial_row(r, rs, with_device) for r in rs if r["arm"] != "pruned"], head) + [""]
        for m in method_order(study, rs):
            group = [r for r in rs if r["arm"] == "pruned" and r["method"] == m]
            if group:
                lines += [f"### {m}", ""] + table([trial_row(r, rs, with_device) for r in group], head) + [""]
        series = series_by_model.get(model) or []
        if len(series) > 1:
            lines += devices_table(series)
    failed = [r for r in recs if r["status"] != "done"]
    if failed:
        lines += ["## Failed trials", ""]
        lines += table([[r["id"], r.get("attempts", ""), r.get("error", "")] for r in failed],
                       ["trial", "attempts", "error"]) + [""]
    lines += ["## Architecture views", ""] + list(arch_lines) if arch_lines else []
    lines += list(resource_lines)
    lines += ["## Figures", ""] + [f"- [{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
    lines += provenance(study)
    lines += ["## Models (`print(model)`)", ""]
    dense = next(iter(done(recs, arm="dense")), None)
    for r in [dense, shown]:
        if r is not None:
            text = str(r.get("architecture", "")).rstrip()
            same = r is shown and dense is not None and text == str(dense.get("architecture", "")).rstrip()
            lines += [f"### {r['id']}", ""]
            if same:  # level pruning masks weights: every layer keeps its shape
                lines += [f"Same layer shapes as {dense['id']}: {r['method']} pruning masked weights without removing "
                          "channels (pick another trial with --show).", ""]
            lines += ["```", text, "```", ""]
    return "\n".join(lines)


def devices_table(series):
    files = []
    for _, rows in series:
        files += [r["file"] for r in rows if r["file"] not in files]
    by = [{r["file"]: r for r in rows} for _, rows in series]
    head = ["checkpoint"] + [f"{label} (median ms)" for label, _ in series]
    body = [[f] + [f"{1e3 * b[f]['median']:.3f}" if f in b else "" for b in by] for f in files]
    return ["### the same checkpoints on each device", ""] + table(body, head) + [""]


def provenance(study):
    lines = ["## Provenance", ""]
    for name, a in study.files.items():
        env = a["env"]
        lines.append(f"- `{name}`: shard {a.get('shard', '?')}, host {a.get('host', '?')}, created "
                     f"{a.get('created', '?')}, pruneflow {a.get('pruneflow_version', '?')}")
        lines.append(f"  - device: {env.get('device_name', '?')}; CPU: {env.get('cpu', '?')}; CUDA {env.get('cuda', '?')}"
                     + (f"; Slurm job {env['slurm_job_id']}" if env.get("slurm_job_id") else ""))
        versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "torchvision", "nni", "ray", "h5py",
                                                       "safetensors") if k in env)
        lines.append(f"  - versions: {versions}")
    for doc in study.devices:
        m, s = doc.get("machine") or {}, doc.get("settings") or {}
        lines.append(f"- `{doc['path']}`: host {m.get('hostname', '?')}, {m.get('device', '?')} "
                     f"({m.get('device_name', '?')}), torch {m.get('torch', '?')}, python {m.get('python', '?')}, "
                     f"{m.get('threads', '?')} CPU thread(s); batch {s.get('batch_size', '?')}, {s.get('dtype', '?')}, "
                     f"{s.get('trials', '?')} timed runs; created {doc.get('created', '?')}")
    jobs = {a.get("job", "") for a in study.files.values()}
    for text in sorted(jobs):
        lines += ["", "Job file" + (" (the shard files differ)" if len(jobs) > 1 else "") + ":", "", "```yaml",
                  text.rstrip(), "```"]
    # The job text omits command-line overrides (--finetune.epochs 1 ...): the resolved config is what ran.
    configs = {json.dumps(a["config"], indent=1, sort_keys=True) for a in study.files.values()}
    for text in sorted(configs):
        lines += ["", "Resolved configuration (job file plus command-line overrides, as run)"
                  + (" (the shard files differ)" if len(configs) > 1 else "") + ":", "", "```json", text, "```"]
    return lines + [""]


# ------------------------------------------------------------------------------------------ command

def _formats(fmt):
    items = fmt if isinstance(fmt, (list, tuple)) else str(fmt).split(",")
    items = [str(x).strip().lower().lstrip(".") for x in items if str(x).strip()]
    bad = [x for x in items if x not in FORMATS]
    if bad or not items:
        raise UserError(f"unknown figure format(s) {', '.join(bad) or repr(fmt)}; valid: {', '.join(FORMATS)}")
    return list(dict.fromkeys(items))


def _kinds(only):
    if only is None:
        return KINDS
    items = only if isinstance(only, (list, tuple)) else str(only).split(",")
    items = [str(x).strip() for x in items if str(x).strip()]
    bad = [x for x in items if x not in KINDS]
    if bad or not items:
        raise UserError(f"unknown --only item(s) {', '.join(bad) or repr(only)}; valid: {', '.join(KINDS)}")
    return items


def make_report(study_dir, out=None, formats=("png", "pdf"), show=None, kinds=KINDS, dpi=100, command="", arch=None):
    """Write the figures and summary.md; returns (written paths, notes)."""
    from .views import arch_views, check_arch

    study = load_study(study_dir)
    shown = pick_shown(study.records, method_order(study, study.records), show)  # a bad --show fails before writing
    # a bad --arch fails here too; --arch ID|SPARSITY asks for the views even when --only leaves them out
    choice = check_arch(study.records, arch) if "arch" in kinds or not (arch is None or arch is False) else None
    out = check_writable_dir(out or os.path.join(study_dir, "report"))
    notes, _ = missing_parts(study)
    for r in sorted(study.records, key=_sort_key):
        if r["status"] != "done":
            notes.append(f"trial {r['id']} failed: {str(r.get('error', ''))[:300]}")
    notes += study.notes
    written, arch_lines = [], []
    series_by_model = {}
    for model in sorted({r.get("model") for r in study.records}, key=str):
        records = [r for r in study.records if r.get("model") == model]
        dataset = records[0].get("dataset", "?")
        methods = method_order(study, records)
        keys = sorted({r["device_key"] for r in done(records)} - {None})
        figs = []
        for key in keys:
            if "time" in kinds:
                figs += [(f"time-{slug(model)}-{slug(m)}-{slug(device_label(key))}",
                          fig_time(study, model, dataset, m, key, records)) for m in methods]
            if "pareto" in kinds:
                figs.append((f"pareto-{slug(model)}-{slug(device_label(key))}",
                             fig_pareto(study, model, dataset, methods, key, records)))
            if "size" in kinds:
                figs.append((f"size-{slug(model)}-{slug(device_label(key))}",
                             fig_size(study, model, dataset, methods, key, records)))
        if "methods" in kinds:
            figs.append((f"methods-{slug(model)}", fig_methods(study, model, dataset, methods, records)))
        series = series_by_model[model] = device_series(study, model, records)
        if "devices" in kinds:
            if len(series) < 2:
                notes.append(f"devices figure for {model} skipped: only one device ({series[0][0] if series else 'none'}); "
                             f"add one with python -m pruneflow.infer --ckpt {os.path.join(study_dir, 'checkpoints')} "
                             "on another machine and copy its devices/*.json here")
            else:
                figs.append((f"devices-{slug(model)}", fig_devices(study, model, dataset, methods, series)))
        for name, fig in figs:
            if fig is None:
                notes.append(f"figure {name} skipped: no finished trials to plot")
            else:
                save_figure(fig, out, name, formats, dpi, written)
        if choice is not None:
            try:
                paths, more, lines = arch_views(study, model, records, methods, out, formats, dpi, choice)
            except Exception as e:  # e.g. a model torch.fx cannot trace: the rest of the report still matters
                paths, more, lines = [], [f"architecture views for {model} skipped: {type(e).__name__}: {e}"], []
            written += paths
            notes += [n for n in more if n not in notes]  # "graphviz not installed" once, not per model
            arch_lines += lines
    if "timeline" in kinds:  # one figure per sweep run of each shard file (pruneflow/timeline.py)
        from .timeline import timeline_figures

        for name, fig, note in timeline_figures(study.paths):
            if fig is None:
                notes.append(note)
            else:
                save_figure(fig, out, name, formats, dpi, written)
    if "summary" in kinds:
        from .timeline import resources_md

        path = os.path.join(out, "summary.md")
        text = summary_md(study, notes, [p for p in written if p.endswith(f".{formats[0]}")], series_by_model,
                          shown, command, arch_lines, resources_md(study.paths))

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(path, write)
        written.append(path)
    return written, notes


def cli(study, out=None, format="png,pdf", show=None, only=None, dpi=100, arch=None):
    """Figures and a summary.md from a study's results (every shard file plus device JSONs).

    Args:
      study: the study directory, e.g. results/quickstart (holds shard-*.h5 and checkpoints/).
      out: output directory (default: STUDY/report); files are replaced atomically on re-runs.
      format: figure formats, comma-separated: png, pdf, svg (default png,pdf).
      show: trial id whose print(model) goes into summary.md next to the dense one, e.g. l1-0.50-s0
        (default: the most sparse finished trial of the first method).
      only: comma-separated subset of time, methods, pareto, size, devices, arch, timeline, summary (default: all).
      dpi: resolution of raster figures (100: readable at 100 % zoom, small files).
      arch: architecture views, on by default when the study has checkpoints: the computation graph of the
        dense model and one pruned model, and the channels kept per layer for each method. A trial id
        (--arch l1-0.70-s0) picks the pruned model drawn and the chart's sparsity; a number (--arch 0.7)
        the sparsity (default 0.5 or the nearest present); --noarch leaves them out.
    """
    formats, kinds = _formats(format), _kinds(only)
    try:
        dpi = float(dpi)
    except (TypeError, ValueError):
        raise UserError(f"dpi must be a number, got {dpi!r}") from None
    if not 10 <= dpi <= 1200:
        raise UserError(f"dpi must be between 10 and 1200, got {dpi:g}")
    # Rebuilt from the arguments, not sys.argv: submit.py calls cli() inside a submitit job.
    given = dict(out=out, format=None if format == "png,pdf" else ",".join(formats), show=show,
                 only=None if only is None else ",".join(kinds), dpi=None if dpi == 100 else f"{dpi:g}")
    command = " ".join(["python -m pruneflow.report", shlex.quote(os.fspath(study))]
                       + [f"--{k} {shlex.quote(str(v))}" for k, v in given.items() if v is not None]
                       + (["--arch"] if arch is True else ["--noarch"] if arch is False else
                          [] if arch is None else [f"--arch {shlex.quote(str(arch))}"]))
    written, notes = make_report(os.fspath(study), out, formats, show, kinds, dpi, command, arch)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {len(written)} file(s):")
    for p in written:
        print(f"  {p}")


def main():
    from .infer.errors import run_cli

    run_cli(cli, name="pruneflow.report")


if __name__ == "__main__":
    main()
