"""The report's figures, one function each, drawn on pyplot-free matplotlib Figures (Agg, no global state)
from a study read by pruneflow/study.py; each returns None when it has nothing to draw. Fixed colours and
markers per method (``mstyle``) so a method looks the same in every figure, the timeline and the
architecture views included. docs/report.md describes each figure.
"""

import os
import re

from .files import atomic
from .study import bar_lengths, curve, device_label, done, mean, pareto_front, speedup, yerr

# Fixed colours so a method looks the same in every figure.
METHOD_COLORS = {"level": "C0", "l1": "C1", "l2": "C2", "fpgm": "C3", "taylor": "C5", "slim": "C6"}
# Methods often coincide (L1 and L2 choose the same channels): distinct markers and dashes keep both visible.
METHOD_STYLES = {"level": ("o", "-"), "l1": ("s", "--"), "l2": ("^", ":"), "fpgm": ("D", "-."), "taylor": ("v", "-"),
                 "slim": ("P", "--")}
DEPGRAPH_DASH = (0, (6, 2, 1, 2, 1, 2))  # l1@depgraph: l1's colour and marker, hollow, dash-dot-dot
DENSE_COLOR, CONTROL_COLOR = "black", "C4"


# ------------------------------------------------------------------------------------------ drawing

def new_figure(ncols=1, width=8.0, height=4.8, nrows=1, **kw):
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


DENSE_ALONGSIDE = "dense model, timed alongside each trial (mean)"
XLABEL = {"nominal": "target sparsity (%)",
          "achieved": "achieved sparsity (%): channels removed (level: weights zeroed)"}


def _n(c, split):
    """'n = 144 images x 3 seeds' for a curve's split."""
    images = int(max(c[f"n_{split}"], default=0)) if len(c[f"n_{split}"]) else 0
    return f"n = {images or '?'} images × {int(max(c['seeds']))} seed(s)"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def _context(study, records, latency=True):
    """The subtitle: how the numbers were made (epochs, timing settings, torch, host)."""
    attrs = study.files[records[0]["file"]]
    cfg = attrs["config"]
    lat = cfg.get("latency") or {}
    st = records[0].get("latency_settings") or {}
    layout = "channels_last" if st.get("channels_last") else "contiguous (NCHW)"
    timing = (f"latency: {st.get('device', '?')}, batch {lat.get('batch_size', '?')}, {layout}, "
              f"{st.get('threads', '?')} thread(s), {lat.get('trials', '?')} timed runs; " if latency else "")
    timing += f"{(cfg.get('performance') or {}).get('precision', '?')} precision; "
    return (f"fine-tuned {(cfg.get('finetune') or {}).get('epochs', '?')} epoch(s); {timing}"
            f"torch {attrs['env'].get('torch', '?')}, host {attrs.get('host', '?')}")


def _hline(ax, y, color, label, style="--"):
    if y is not None:
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=label)


def _baselines(ax, records, value, dense_label="dense", control_label="control (dense, fine-tuned)"):
    for arm, color, label, style in (("dense", DENSE_COLOR, dense_label, "--"),
                                     ("control", CONTROL_COLOR, control_label, "-.")):
        rs = done(records, arm=arm)
        if rs:
            _hline(ax, mean([value(r) for r in rs]), color, label, style)


# ------------------------------------------------------------------------------------------ figures

def fig_time(study, model, dataset, method, key, records, x="nominal"):
    """The 2022 report's figure: inference time (mean ± std) on the left, train, val and test accuracy (95 %
    intervals) on the right."""
    import numpy as np

    pruned = [r for r in done(records, arm="pruned", method=method)]
    if not any(r["device_key"] == key for r in pruned):
        return None
    c = curve(pruned, key, x)
    dense, control = done(records, arm="dense"), done(records, arm="control")
    fig, (ax,) = new_figure(width=8.5, height=5.2)
    ax2 = ax.twinx()
    ax.plot(c["x"], c["t_mean"], "o-", color="C0", label="inference time (mean)")
    ax.fill_between(c["x"], c["t_mean"] - c["t_std"], c["t_mean"] + c["t_std"], color="C0", alpha=0.2,
                    label="inference time ± std")
    if not np.isnan(c["d_mean"]).all():
        # The dense model as timed alternately with each trial: packed trials share the machine, so the
        # absolute times drift from trial to trial; this line drifts with them (the gap is the speedup).
        ax.plot(c["x"], c["d_mean"], "x:", color="C0", alpha=0.8, label=DENSE_ALONGSIDE)
    ax2.errorbar(c["x"], c["train"], yerr=yerr(c, "train"), fmt="s-", color="C1", label="train accuracy", capsize=3)
    ax2.errorbar(c["x"], c["val"], yerr=yerr(c, "val"), fmt="^-", color="C2", capsize=3,
                 label=f"val accuracy (95 % CI; {_n(c, 'val')})")
    ax2.errorbar(c["x"], c["test"], yerr=yerr(c, "test"), fmt="v--", color="C3", capsize=3,
                 label=f"test accuracy (95 % CI; {_n(c, 'test')})")
    dense_t = [r for r in dense if r["device_key"] == key]
    if dense_t:
        _hline(ax, 1e3 * mean([r["latency_mean"] for r in dense_t]), "C0", "dense time")
    if dense:
        _hline(ax2, 100 * mean([r["train_acc"] for r in dense]), "C1", "dense train accuracy")
        _hline(ax2, 100 * mean([r["val_acc"] for r in dense]), "C2", "dense val accuracy")
    if control:
        _hline(ax2, 100 * mean([r["val_acc"] for r in control]), CONTROL_COLOR,
               "control val accuracy (dense, fine-tuned)", style="-.")
    ax.set_xlabel(XLABEL[x])
    ax.set_ylabel("inference time per batch (ms)", color="C0")
    ax2.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(_context(study, pruned), fontsize=9)
    fig.suptitle(f"{model} on {dataset}: {method} pruning, timed on {device_label(key)}")
    handles = {lab: h for a in (ax, ax2) for h, lab in zip(*a.get_legend_handles_labels())}
    # column-major in 3 columns: time | this method's accuracies and the control | the dense accuracies
    order = ["inference time (mean)", "inference time ± std", DENSE_ALONGSIDE, "dense time", "train accuracy",
             *[k for k in handles if k.startswith(("val accuracy", "test accuracy"))],
             "control val accuracy (dense, fine-tuned)", "dense train accuracy", "dense val accuracy"]
    fig.legend([handles[k] for k in order if k in handles], [k for k in order if k in handles],
               loc="outside lower center", ncol=2, fontsize=8)
    return fig


def fig_methods(study, model, dataset, methods, records, x="nominal"):
    pruned = done(records, arm="pruned")
    if not pruned:
        return None
    fig, (ax,) = new_figure()
    n = ""
    for m in methods:
        rs = [r for r in pruned if r["method"] == m]
        if rs:
            c = curve(rs, None, x)
            ax.errorbar(c["x"], c["val"], yerr=yerr(c, "val"), capsize=3, **mstyle(m))
            n = _n(c, "val")
    _baselines(ax, records, lambda r: 100 * r["val_acc"])
    ax.set_xlabel(XLABEL[x])
    ax.set_ylabel(f"val accuracy (%), 95 % CI; {n}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    keys = sorted({device_label(r["device_key"]) for r in pruned})
    ax.set_title(_context(study, pruned, latency=False), fontsize=9)
    fig.suptitle(f"{model} on {dataset}: validation accuracy by pruning method — {', '.join(keys)}")
    return fig


def fig_pareto(study, model, dataset, methods, key, records):
    from .compare import speedup_interval

    rs = [r for r in done(records) if r["device_key"] == key]
    if not rs:
        return None
    fig, axes = new_figure(ncols=2, width=11, height=4.8)
    # Latency as each trial measured it against the dense model, side by side (1 / speedup): packed trials
    # share the machine, so their absolute times are not comparable with each other; files from before
    # pairing have no speedups and keep the absolute mean.
    if all(r.get("speedup") for r in rs):
        def x_interval(r):  # 1 / speedup: the speedup interval's ends swap (no timed pairs, as dense: no bar)
            _, lo, hi = speedup_interval([r])
            return 1 / hi, 1 / lo

        latency = ("latency relative to the dense model\n(1 / speedup, timed side by side)", lambda r: 1 / r["speedup"],
                   x_interval)
    else:
        latency = ("inference time per batch (ms, mean)", lambda r: 1e3 * r["latency_mean"], None)
    compute = ("MACs per image (millions)", lambda r: r["macs"] / 1e6, None)  # counted, not measured: exact
    for ax, (xlabel, xval, xint) in zip(axes, (latency, compute)):
        for m in methods:
            pts = [r for r in rs if r["method"] == m and r["arm"] == "pruned"]
            if pts:
                style = mstyle(m, line=False)
                _interval_bars(ax, pts, xval, xint, style.get("color") or style.get("edgecolors"))
                ax.scatter([xval(r) for r in pts], [100 * r["val_acc"] for r in pts], s=36, zorder=3, **style)
        for arm, color, marker in (("dense", DENSE_COLOR, "*"), ("control", CONTROL_COLOR, "D")):
            pts = [r for r in rs if r["arm"] == arm]
            if pts:
                label = "control (dense, fine-tuned)" if arm == "control" else "dense"
                _interval_bars(ax, pts, xval, xint, color)
                ax.scatter([xval(r) for r in pts], [100 * r["val_acc"] for r in pts], color=color, marker=marker,
                           s=110 if marker == "*" else 50, label=label, zorder=4)
        front = pareto_front([(xval(r), 100 * r["val_acc"]) for r in rs])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", linewidth=1, zorder=2,
                label="Pareto front (point estimates)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"accuracy vs latency\n({_context(study, rs).split('; ')[1]})", fontsize=9)
    axes[1].set_title("accuracy vs compute (device-independent)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9)
    fig.suptitle(f"{model} on {dataset}: Pareto fronts, timed on {device_label(key)}\nbars: 95 % intervals "
                 "(Wilson on val, bootstrap of timed pairs)", fontsize=10)
    return fig


def _interval_bars(ax, pts, xval, xint, color):
    """Each trial's 95 % intervals behind its marker: accuracy (Wilson, from its stored val predictions) and,
    with ``xint``, the x value's; an end that is unknown (files before issue 29) draws no bar."""
    y, y_lo, y_hi = zip(*(_val_interval_pct(r) for r in pts))
    x = [xval(r) for r in pts]
    xerr = None if xint is None else bar_lengths(x, *zip(*(xint(r) for r in pts)))
    ax.errorbar(x, y, yerr=bar_lengths(y, y_lo, y_hi), xerr=xerr, fmt="none", ecolor=color, alpha=0.45,
                elinewidth=1, capsize=2, zorder=2.5)


def _val_interval_pct(r):
    """(val accuracy, lo, hi) in %: the Wilson interval of the stored predictions (nan ends without them)."""
    from .compare import accuracy_interval

    _, lo, hi, _ = accuracy_interval(r, "val")
    return 100 * r["val_acc"], 100 * lo, 100 * hi


def fig_size(study, model, dataset, methods, key, records):
    rs = [r for r in done(records) if r["device_key"] == key]
    if not any(r["arm"] == "pruned" for r in rs):
        return None
    fig, axes = new_figure(ncols=3, width=14, height=4.6)
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
    ax.set_ylabel("measured speedup (dense / pruned latency, side by side, ×)")
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


def _seeds_averaged(rows):
    """One point per sparsity, the seeds' rows averaged (as the time and methods figures average them): mean
    and std of the latency, and the speedup, measured side by side with the dense model (a sweep's trials;
    pruneflow.infer by default), else the ratio of medians to the dense rows' (device JSONs written with
    --nopaired or before pairing existed)."""
    dense = [r["median"] for r in rows if r["arm"] == "dense"]
    points = []
    for s in sorted({r["sparsity"] for r in rows}):
        group = [r for r in rows if r["sparsity"] == s]
        speedups = [r.get("speedup") or (mean(dense) / r["median"] if dense else None) for r in group]
        points.append(dict(sparsity=s, mean=mean([r["mean"] for r in group]), std=mean([r["std"] for r in group]),
                           speedup=None if None in speedups else mean(speedups)))
    return points


def fig_devices(study, model, dataset, methods, series):
    import numpy as np

    methods = [m for m in methods if any(r["method"] == m for _, rows in series for r in rows)]
    if len(series) < 2 or not methods:
        return None
    fig, axes = new_figure(ncols=len(methods), width=max(7.0, 4.2 * len(methods)), height=8.0, nrows=2, sharex=True)
    for j, m in enumerate(methods):
        means = []
        for k, (label, rows) in enumerate(series):
            dense = [r for r in rows if r["arm"] == "dense"]
            pts = _seeds_averaged(dense + [r for r in rows if r["method"] == m])  # from the dense model (sparsity 0)
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
                axes[1][j].plot(x, [r["speedup"] for r in pts], "o-", color=color)
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
    fig.suptitle(f"{model} on {dataset}: the same checkpoints, {len(series)} timing series (sweep and device JSONs)")
    return fig


# ------------------------------------------------------------------------------------------ files

def save_figure(fig, out, name, formats, dpi, written):
    for fmt in formats:
        path = os.path.join(out, f"{name}.{fmt}")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
        written.append(path)


def atomic_write(path, write):
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never half of one."""
    with atomic(path, os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")) as tmp:
        write(tmp)
