"""The resource timeline: the 2022 report's ``nvidia-smi`` screenshot, as a figure, and the summary's Resources section.

One figure per sweep run stored in a shard file (``/utilisation/run-<k>``, written by pruneflow/monitor.py):
the sampled utilisation on top (per GPU: util % and memory with the card's total dashed; on a CPU-only run:
CPU % and RAM used), below it one bar per trial from its ``started_at`` to its ``ended_at``, coloured by
method, on the lowest lane free when it started (lanes = the slots Ray packs trials into). A thin strip
under each bar splits it into the recorded stages (``seconds_<stage>``), drawn back to back so that the last
ends at ``ended_at``; the grey lead-in before them is the worker's set-up (imports) that no stage counts.
"""

import os

from .figures import CONTROL_COLOR, DENSE_COLOR, mstyle, new_figure

STAGES = ("load", "prune", "finetune", "evaluate", "time", "save")
GIB = 2.0 ** 30
SETUP_COLOR = "#dddddd"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def assign_lanes(trials):
    """{trial id: lane}: in order of start, each trial takes the lowest lane whose last trial has ended."""
    free_at, lanes = [], {}
    for t in sorted(trials, key=lambda t: (t["started_at"], t["id"])):
        lane = next((i for i, end in enumerate(free_at) if end <= t["started_at"]), len(free_at))
        free_at[lane:lane + 1] = [t["ended_at"]]
        lanes[t["id"]] = lane
    return lanes


def run_trials(run, trials):
    """The trials of one file that started during ``run`` (a resumed shard holds one run per sweep call)."""
    a = run["attrs"]
    lo, hi = _num(a.get("started_at")) or float("-inf"), _num(a.get("ended_at")) or float("inf")
    timed = [t for t in trials if _num(t.get("started_at")) is not None and _num(t.get("ended_at")) is not None]
    return [t for t in timed if lo <= t["started_at"] <= hi]


def run_start(run):
    return _num(run["attrs"].get("started_at")) or float(run["series"]["time"][0])


def gpu_labels(series):
    """['gpu0', 'gpu1', ...]: the GPUs this run sampled."""
    found = {k.split("_")[0] for k in series if k.startswith("gpu") and k.endswith("_util_percent")}
    return sorted(found, key=lambda g: int(g[3:]))


def panels(run):
    """What the top panels draw: [{'ylabel', 'lines': {label: y}, 'limits': {label: dashed y}}]."""
    s, a = run["series"], run["attrs"]
    gpus = gpu_labels(s)
    if gpus:
        names = str(a.get("gpus") or "").split(",")
        totals = [_num(x) for x in str(a.get("gpu_memory_total_bytes") or "").split(",")]
        name = {g: f"{g} ({names[i]})" if i < len(names) and names[i] else g for i, g in enumerate(gpus)}
        util = {f"{name[g]} util": s[f"{g}_util_percent"] for g in gpus}
        if "cpu_percent" in s:  # a starved data pipeline shows as a busy CPU under an idle GPU
            util["CPU (all cores)"] = s["cpu_percent"]
        mem = {f"{name[g]} memory": s[f"{g}_memory_used_bytes"] / GIB for g in gpus if f"{g}_memory_used_bytes" in s}
        limits = {f"{g} total": totals[i] / GIB for i, g in enumerate(gpus) if i < len(totals) and totals[i]}
        out = [dict(ylabel="GPU util (%)", lines=util, limits={}), dict(ylabel="GPU memory (GiB)", lines=mem, limits=limits)]
    else:
        total = _num(a.get("memory_total_bytes"))
        out = [dict(ylabel="CPU (% of all cores)", lines={"CPU (all cores)": s["cpu_percent"]} if "cpu_percent" in s else {},
                    limits={}),
               dict(ylabel="RAM used (GiB)", lines={"RAM used": s["memory_used_bytes"] / GIB} if "memory_used_bytes" in s
                    else {}, limits={"RAM total": total / GIB} if total else {})]
    return [p for p in out if p["lines"]]


def trial_bars(run, trials):
    """One bar per trial of the run, times in seconds from the run's start: [{'id', 'lane', 'start', 'end',
    'method', 'arm', 'status', 'stages': [(stage, start, seconds)]}]."""
    t0, mine = run_start(run), run_trials(run, trials)
    lanes = assign_lanes(mine)
    bars = []
    for t in sorted(mine, key=lambda t: t["started_at"]):
        secs = [(k, _num(t.get(f"seconds_{k}"))) for k in STAGES]
        secs = [(k, v) for k, v in secs if v is not None]
        x = t["ended_at"] - t0 - sum(v for _, v in secs)  # the stages run back to back up to the end
        stages = []
        for k, v in secs:
            stages.append((k, x, v))
            x += v
        label = t.get("arm") if t.get("arm") in ("dense", "control") else t.get("method", "?")
        bars.append(dict(id=t["id"], lane=lanes[t["id"]], start=t["started_at"] - t0, end=t["ended_at"] - t0,
                         method=label, arm=t.get("arm"), status=t.get("status"), stages=stages))
    return bars


def title(path, run):
    a = run["attrs"]
    gpus = [g for g in str(a.get("gpus") or "").split(",") if g]
    where = (f"{len(gpus)} GPU(s): {', '.join(sorted(set(gpus)))}" if gpus
             else f"CPU only ({a.get('cpu_count', '?')} cores)")
    return (f"{os.path.basename(path)} {run['name']}: host {a.get('host', '?')}, {where}, "
            f"{a.get('trials_per_device', '?')} trial(s) per device, {a.get('slots', '?')} slot(s)")


def fig_timeline(path, run, trials):
    """The figure and the data it drew: {'t0', 'title', 'panels' (x = seconds since start), 'bars'}."""
    import datetime

    import matplotlib

    t0 = run_start(run)
    x = run["series"]["time"] - t0
    tops, bars = panels(run), trial_bars(run, trials)
    n_lanes = max([b["lane"] + 1 for b in bars] or [1])
    ratios = [1.0] * len(tops) + [max(1.0, 0.45 * n_lanes)]
    fig, axes = new_figure(nrows=len(ratios), width=11, height=1.9 * len(tops) + 1.3 + 0.45 * n_lanes, sharex=True,
                           gridspec_kw=dict(height_ratios=ratios))
    axes = list(axes[:, 0]) if len(ratios) > 1 else list(axes)
    for ax, p in zip(axes, tops):
        for i, (label, y) in enumerate(p["lines"].items()):
            grey = label.startswith("CPU") and len(p["lines"]) > 1
            ax.plot(x, y, color="gray" if grey else f"C{i}", linewidth=0.8 if grey else 1.3, label=label)
        for i, (label, y) in enumerate(p["limits"].items()):
            ax.axhline(y, color=f"C{i}", linestyle="--", linewidth=1, label=label)
        ax.set_ylabel(p["ylabel"])
        ax.set_ylim(0, 105 if "%" in p["ylabel"] else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the lines stay visible
    ax = axes[-1]
    colors, methods = {"dense": DENSE_COLOR, "control": CONTROL_COLOR}, {}
    stage_colors = {k: matplotlib.colormaps["viridis"](i / (len(STAGES) - 1)) for i, k in enumerate(STAGES)}
    span = max([b["end"] for b in bars] + [float(x[-1]) if len(x) else 1.0])
    for b in bars:
        color = colors.get(b["method"]) or mstyle(b["method"])["color"] or "gray"
        hatch = "//" if "@" in b["method"] else "xx" if b["status"] != "done" else None
        bar = ax.barh(b["lane"] + 0.12, b["end"] - b["start"], 0.5, b["start"], color=color, alpha=0.85, hatch=hatch,
                      edgecolor="white", gid=b["id"], label=b["method"])
        if b["status"] == "done" or b["method"] not in methods:  # the legend shows a finished trial's bar
            methods[b["method"]] = bar
        ax.barh(b["lane"] - 0.27, b["end"] - b["start"], 0.2, b["start"], color=SETUP_COLOR)
        for k, s, d in b["stages"]:
            ax.barh(b["lane"] - 0.27, d, 0.2, s, color=stage_colors[k], gid=f"{b['id']}:{k}")
        if b["end"] - b["start"] > 0.0065 * span * (len(b["id"]) + 4):  # room for the label at 7 pt
            ax.text((b["start"] + b["end"]) / 2, b["lane"] + 0.12, b["id"] + ("" if b["status"] == "done" else " (failed)"),
                    ha="center", va="center", fontsize=7, color="white" if b["arm"] == "dense" else "black", clip_on=True)
    ax.set_yticks(range(n_lanes), [f"slot {i}" for i in range(n_lanes)])
    ax.set_ylim(n_lanes - 0.5, -0.5)  # slot 0 on top
    ax.set_xlim(0, span * 1.01)
    start = datetime.datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds")
    ax.set_xlabel(f"seconds since the sweep run started ({start})")
    ax.grid(alpha=0.3, axis="x")
    from matplotlib.patches import Patch

    stage_handles = [Patch(color=SETUP_COLOR, label="set-up (before load)")]
    stage_handles += [Patch(color=stage_colors[k], label=k) for k in STAGES]
    fig.legend(list(methods.values()) + stage_handles, list(methods) + [h.get_label() for h in stage_handles],
               loc="outside lower center", ncol=min(8, len(methods) + len(stage_handles)), fontsize=8)
    fig.suptitle(title(path, run), fontsize=11)
    data = dict(t0=t0, title=title(path, run), bars=bars,
                panels=[dict(p, lines={k: (x, y) for k, y in p["lines"].items()}) for p in tops])
    return fig, data


def shard_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def timeline_figures(paths):
    """(name, figure or None, note) per sweep run of each shard file: timeline-<shard>-run<k>."""
    from .results import read_trials, read_utilisation

    for path in paths:
        runs = read_utilisation(path)
        if not runs:
            yield f"timeline-{shard_name(path)}", None, no_samples_note(path)
            continue
        trials = read_trials(path)
        for run in runs:
            fig, _ = fig_timeline(path, run, trials)
            yield f"timeline-{shard_name(path)}-run{run['name'].split('-')[-1]}", fig, None


def no_samples_note(path):
    return (f"{os.path.basename(path)} holds no utilisation samples (written before pruneflow recorded them, "
            "or sampling was off): no timeline figure")


def _stats(y):
    import numpy as np

    y = np.asarray(y, dtype=float)
    return (np.nanmean(y), np.nanmax(y)) if np.isfinite(y).any() else (float("nan"), float("nan"))


def run_line(run):
    """One line of the Resources section per sweep run: samples, mean / max utilisation, memory."""
    s, a = run["series"], run["attrs"]
    t = s["time"]
    parts = [f"{len(t)} samples every {a.get('interval_s', '?')} s over {t[-1] - t[0]:.1f} s" if len(t) else "no samples"]
    for p in panels(run):
        for label, y in p["lines"].items():
            mean, top = _stats(y)
            unit = " %" if "%" in p["ylabel"] else " GiB"
            parts.append(f"{label} mean {mean:.1f}{unit}, max {top:.1f}{unit}" if "%" in unit
                         else f"{label} max {top:.2f} GiB")
        parts += [f"{label} {v:.2f} GiB" for label, v in p["limits"].items()]
    gpus = [g for g in str(a.get("gpus") or "").split(",") if g]
    return (f"- {run['name']}: host {a.get('host', '?')}, {', '.join(gpus) or 'CPU only'}, "
            f"{a.get('trials_per_device', '?')} trial(s) per device, {a.get('slots', '?')} slot(s); " + "; ".join(parts))


def resources_md(paths):
    """The summary's '## Resources' section: per shard its runs, the trials' peak memory and stage times."""
    from .report import table
    from .results import read_trials, read_utilisation

    lines = ["## Resources", "",
             "Per shard file: each sweep run's utilisation samples (figure `timeline-<shard>-run<k>`), the largest "
             "peak memory of a trial, and every trial's wall seconds per stage (summed over the trials in the last row; "
             "wall includes the worker's set-up before the first stage).", ""]
    for path in paths:
        runs, trials = read_utilisation(path), sorted(read_trials(path), key=lambda t: t["id"])
        lines += [f"### {os.path.basename(path)}", ""]
        lines += [run_line(r) for r in runs] or [f"- {no_samples_note(path)}"]
        peaks = [t for t in trials if _num(t.get("peak_memory_bytes"))]
        if peaks:
            top = max(peaks, key=lambda t: t["peak_memory_bytes"])
            lines.append(f"- peak memory of a trial: {int(top['peak_memory_bytes']):,} bytes "
                         f"({top['peak_memory_bytes'] / GIB:.2f} GiB, {top.get('peak_memory_kind', '?')}) in {top['id']}")
        rows, sums = [], [0.0] * (len(STAGES) + 1)
        for t in trials:
            vals = [_num(t.get(f"seconds_{k}")) for k in STAGES] + [_num(t.get("wall_s"))]
            sums = [a + (v or 0.0) for a, v in zip(sums, vals)]
            rows.append([t["id"] + ("" if t.get("status") == "done" else " (failed)")]
                        + ["" if v is None else f"{v:.3f}" for v in vals])
        if rows:
            head = ["trial"] + [f"{k} s" for k in STAGES] + ["wall s"]
            lines += [""] + table(rows + [["sum"] + [f"{v:.3f}" for v in sums]], head)
        lines.append("")
    return lines
