"""The report's deployment view: what pruning buys in each runtime and batch size (latency.runtimes x batch_sizes).

Per model x method x sparsity x runtime x batch, the paired samples of every seed are pooled and the speedup is
the median per-pair ratio with a percentile-bootstrap 95 % interval; efficiency = speedup / MAC reduction (1 =
the time shrank as much as the arithmetic). Two figures and one summary table; cells that failed are listed with
their reason, never drawn as zero.
"""

import dataclasses
import typing

from .infer.timing import summarize
from .study import done, mean


def _median(xs):
    return summarize(xs)["median"]


@dataclasses.dataclass
class DeployCell:
    model: str
    method: str  # "dense" for the dense model's own row
    sparsity: float
    runtime: str
    batch_size: int
    seeds: int
    mac_reduction: float
    median: float  # seconds per batch, the trial's (pooled over seeds)
    dense_median: float
    speedup: float
    lo: float
    hi: float
    images_per_s: float
    provider: str
    modes: str
    failed: typing.List[str]

    @property
    def efficiency(self):
        return self.speedup / self.mac_reduction if self.mac_reduction else float("nan")


def deploy_cells(records):
    """[DeployCell] for every (model, method, sparsity, runtime, batch) the study's done trials timed."""
    from .stats import bootstrap_ratio

    groups = {}
    for r in done(records):
        if r["arm"] == "control":
            continue
        for c in r.get("deploy") or []:
            method = "dense" if r["arm"] == "dense" else r["method"]
            key = (r.get("model"), method, round(float(r.get("sparsity") or 0.0), 4), c.runtime, c.batch_size)
            groups.setdefault(key, []).append((r, c))
    cells = []
    for (model, method, sparsity, runtime, batch), pairs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ok = [(r, c) for r, c in pairs if c.status == "done"]
        failed = sorted({f"{r['id']}: {c.error}" for r, c in pairs if c.status != "done"})
        s = [x for _, c in ok for x in c.latency]
        d = [x for _, c in ok for x in c.latency_dense]
        sp, lo, hi = bootstrap_ratio(d, s) if d and len(d) == len(s) else (1.0, 1.0, 1.0) if ok else (float("nan"),) * 3
        med = _median(s) if s else float("nan")
        cells.append(DeployCell(
            model=model, method=method, sparsity=sparsity, runtime=runtime, batch_size=batch, seeds=len(ok),
            mac_reduction=mean([float(r.get("mac_reduction") or 1.0) for r, _ in ok]) if ok else float("nan"),
            median=med, dense_median=_median(d) if d else med, speedup=sp, lo=lo, hi=hi,
            images_per_s=batch / med if s and med > 0 else float("nan"),
            provider=", ".join(sorted({c.provider for _, c in ok})), modes=", ".join(sorted({c.mode for _, c in ok if c.mode})),
            failed=failed))
    return cells


def deploy_md(cells):
    """The summary's section: one table row per cell, then the failures."""
    if not cells:
        return []
    lines = ["## Deployment runtimes (latency.runtimes x batch_sizes)", "",
             "Each trial and its dense model timed alternately in the same runtime, call by call; pairs pooled over "
             "seeds; speedup: median per-pair ratio, [95 %] percentile bootstrap; efficiency: speedup ÷ MAC "
             "reduction (1 = time shrank as much as the arithmetic).", "",
             "| model | method | sparsity | runtime | batch | seeds | MAC reduction | dense ms | pruned ms | "
             "speedup × [95 %] | efficiency | images/s | provider / mode |", "|" + "---|" * 13]
    for c in cells:
        if not c.seeds:
            continue
        sp = "" if c.method == "dense" else f"{c.speedup:.2f} [{c.lo:.2f}, {c.hi:.2f}]"
        eff = "" if c.method == "dense" else f"{c.efficiency:.2f}"
        lines.append(f"| {c.model} | {c.method} | {c.sparsity:.2f} | {c.runtime} | {c.batch_size} | {c.seeds} | "
                     f"{c.mac_reduction:.2f} | {1e3 * c.dense_median:.3f} | {1e3 * c.median:.3f} | {sp} | {eff} | "
                     f"{c.images_per_s:,.0f} | {'/'.join(x for x in (c.provider, c.modes) if x)} |")
    failures = [(c, f) for c in cells for f in c.failed]
    if failures:
        lines += ["", "Cells that could not run (recorded for that runtime only; the trials' other results stand):", ""]
        lines += [f"- {c.runtime}, batch {c.batch_size}: {f}" for c, f in failures]
    return lines + [""]


def fig_deploy_speedup(model, dataset, cells, subtitle=""):
    """Measured speedup against MAC reduction, one panel per runtime, the ideal diagonal drawn; None if nothing."""
    from .figures import mstyle, new_figure

    pruned = [c for c in cells if c.model == model and c.method != "dense" and c.seeds]
    runtimes = sorted({c.runtime for c in pruned}, key=_runtime_order)
    if not pruned:
        return None
    fig, axes = new_figure(ncols=len(runtimes), width=max(6.0, 4.6 * len(runtimes)), height=4.8, sharey=True)
    top = max(max(c.mac_reduction for c in pruned), max(c.speedup for c in pruned if c.speedup == c.speedup)) * 1.5
    batches = sorted({c.batch_size for c in pruned})
    markers = dict(zip(batches, "os^Dv<>"))
    for ax, runtime in zip(axes, runtimes):
        ax.plot([1, top], [1, top], color="grey", linestyle=":", linewidth=1, label="ideal: speedup = MAC reduction")
        ax.axhline(1.0, color="black", linewidth=0.8)
        for method in sorted({c.method for c in pruned}):
            for b in batches:
                cs = sorted((c for c in pruned if c.runtime == runtime and c.method == method and c.batch_size == b),
                            key=lambda c: c.mac_reduction)
                if not cs:
                    continue
                style = mstyle(method)
                style.update(marker=markers[b], label=f"{method}, batch {b}")
                ax.errorbar([c.mac_reduction for c in cs], [c.speedup for c in cs], capsize=2,
                            yerr=[[c.speedup - c.lo for c in cs], [c.hi - c.speedup for c in cs]], **style)
        ax.set(xscale="log", yscale="log", xlabel="MAC reduction (dense / pruned, ×)", title=runtime)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("measured speedup (×), 95 % bootstrap")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    n = max(c.seeds for c in pruned)
    fig.suptitle(f"{model} on {dataset}: what pruning buys per runtime (n ≤ {n} seed(s) per point)\n{subtitle}",
                 fontsize=10)
    return fig


def fig_deploy_throughput(model, dataset, cells, subtitle=""):
    """Images/s against batch size, one panel per runtime, one line per method x sparsity and the dense model."""
    from .figures import DENSE_COLOR, mstyle, new_figure

    mine = [c for c in cells if c.model == model and c.seeds and c.images_per_s == c.images_per_s]
    if len({c.batch_size for c in mine}) < 2:
        return None  # one batch size: nothing to draw a curve through
    runtimes = sorted({c.runtime for c in mine}, key=_runtime_order)
    fig, axes = new_figure(ncols=len(runtimes), width=max(6.0, 4.6 * len(runtimes)), height=4.8, sharey=True)
    spars = sorted({c.sparsity for c in mine if c.method != "dense"})
    for ax, runtime in zip(axes, runtimes):
        here = [c for c in mine if c.runtime == runtime and c.method != "dense"]
        # the dense model as timed alongside the trials (the dense trial's own cells ran at another moment)
        dense = {b: _median([c.dense_median for c in here if c.batch_size == b]) for b in sorted({c.batch_size for c in here})}
        if not dense:
            dense = {c.batch_size: c.median for c in mine if c.runtime == runtime and c.method == "dense"}
        ax.plot(list(dense), [b / t for b, t in dense.items()], color=DENSE_COLOR, marker="o", linewidth=2,
                label="dense (timed alongside)")
        for (method, sparsity) in sorted({(c.method, c.sparsity) for c in here}):
            cs = sorted((c for c in here if (c.method, c.sparsity) == (method, sparsity)), key=lambda c: c.batch_size)
            style = mstyle(method)
            style.update(label=f"{method} {sparsity:.2f}", alpha=0.35 + 0.65 * (spars.index(sparsity) + 1) / len(spars))
            ax.plot([c.batch_size for c in cs], [c.images_per_s for c in cs], **style)
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=runtime)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("images / s (median call)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle(f"{model} on {dataset}: throughput by batch size per runtime\n{subtitle}", fontsize=10)
    return fig


def _runtime_order(name):
    return {"eager": 0, "compiled": 1, "onnxruntime": 2}.get(name, 3), name

