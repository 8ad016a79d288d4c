"""``python -m pruneflow.report results/<study>``: figures and a summary.md from a study's HDF5 shards.

Reads every ``shard-*.h5`` of the study (merged: a done record wins over a failed one) and every device
JSON written by ``python -m pruneflow.infer --ckpt DIR`` (``*/devices/*.json``), and writes to
``results/<study>/report/``: the 2022 report's time-and-accuracy figure per model x method x device, the methods
overlaid, Pareto fronts, size and speedup, the cross-device comparison, the architecture views (graph and
per-layer widths from the checkpoints, pruneflow/views.py), the resource timeline of each sweep run
(pruneflow/timeline.py), and summary.md (tables whose numbers are the HDF5 values, failures, what is missing,
resources, provenance). docs/report.md describes each figure.
"""

import datetime
import json
import os
import shlex

from .deployment import deploy_cells, deploy_md, fig_deploy_speedup, fig_deploy_throughput
from .figures import _context, fig_devices, fig_methods, fig_pareto, fig_size, fig_time, save_figure, slug
from .errors import UserError, check_writable_dir, require
from .files import write_text
from .study import (baseline, device_label, device_series, done, load_study, method_order, missed_mac_targets,
                    missed_speedup_targets, missing_parts, slower_than_dense, speedup)

KINDS = ("time", "methods", "pareto", "size", "devices", "deploy", "arch", "timeline", "summary")
FORMATS = ("png", "pdf", "svg")
ARM_ORDER = {"dense": 0, "control": 1, "pruned": 2}


# ------------------------------------------------------------------------------------------ summary

def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows, head):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


TABLE_HEAD = ["trial", "sparsity", "achieved", "params", "MACs", "latency ms (median ± std)", "speedup × [95 %]",
              "train acc %", "val acc % [95 %]", "test acc % [95 %]", "Δ test vs dense (pp)",
              "Δ test vs control (pp)", "status"]


def _acc_cell(r, split):
    """'94.4 [90.1, 96.8]' (Wilson, from the stored predictions); the bare value for older files; '—' absent."""
    from .compare import accuracy_interval

    acc, lo, hi, n = accuracy_interval(r, split)
    if acc is None or acc != acc:
        return "—"
    return f"{100 * acc:.1f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "")


def trial_row(r, records, with_device):
    from .compare import achieved, speedup_interval

    if r["status"] != "done":
        row = [r["id"], f"{r['sparsity']:.2f}"] + [""] * 10 + ["failed"]
    else:
        sp = speedup(r, records)
        _, slo, shi = speedup_interval([r])
        split = "test" if r.get("test_acc") is not None else "val"  # files before issue 29: val was test
        deltas = []
        for arm in ("dense", "control"):
            b = baseline(r, records, arm)
            deltas.append("" if b is None or b.get(f"{split}_acc") is None else
                          f"{100 * (r[f'{split}_acc'] - b[f'{split}_acc']):+.1f}")
        row = [r["id"], f"{r['sparsity']:.2f}", f"{achieved(r):.2f}", f"{r['params']:,}", f"{r['macs']:,}",
               f"{1e3 * r['latency_median']:.3f} ± {1e3 * r['latency_std']:.3f}",
               "" if sp is None else f"{sp:.2f}" + ("" if slo != slo else f" [{slo:.2f}, {shi:.2f}]"),
               _pct(r["train_acc"]), _acc_cell(r, "val"), _acc_cell(r, "test"), *deltas, "done"]
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


def summary_md(study, notes, figures, series_by_model, shown, command, arch_lines=(), resource_lines=(),
               deploy_lines=()):
    recs = sorted(study.records, key=_sort_key)
    n_failed = sum(r["status"] != "done" for r in recs)
    first = next(iter(study.files.values()))
    lines = [f"# Report: study {study.name}", "",
             f"{len(recs)} trial record(s): {len(recs) - n_failed} done, {n_failed} failed; "
             f"{len(study.paths)} shard file(s). Generated {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} "
             f"by pruneflow {first.get('pruneflow_version', '?')}: `{command}`", "",
             "Latency: median ± sample std of the timed batches, in ms; speedup: the dense model timed alternately "
             "with the trial, batch by batch in the trial's own process, median of the per-pair ratios (files from "
             "before that: dense median / trial median on the same device); accuracies in %; Δ in percentage points "
             "against the dense model and against the control (the dense model fine-tuned for the same epochs) of "
             "the same seed.", ""]
    lines += ["## Notes", ""] + ([f"- {n}" for n in notes] or ["- nothing missing, nothing failed"]) + [""]
    lines += comparison_md(recs)
    lines += list(deploy_lines)
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


def comparison_md(records):
    """The pruned-vs-control table and the answer to the 2022 report's question (pruneflow/compare.py)."""
    from .compare import ALPHA, CORRECTION, answer_2022, grid_comparisons

    comps = grid_comparisons(records, "test")
    if not comps or not comps[0].n_images:  # files before issue 29 have no per-image predictions
        return ["## Pruned vs control", "", "These results hold no per-image predictions (written before "
                "pruneflow stored them): no intervals or tests; re-run the study to get them.", ""]
    head = ["cell", "sparsity (nominal / achieved)", "seeds", "pruned test acc %", "control test acc %",
            "pruned − control (pts) [95 %]", "p", f"p ({CORRECTION})", "verdict", "speedup × [95 %]"]
    rows = [[f"{c.model} {c.label}", f"{c.sparsity:.2f} / {c.achieved:.2f}", len(c.seeds), f"{100 * c.pruned:.1f}",
             f"{100 * c.control:.1f}", f"{100 * c.diff:+.1f} [{100 * c.lo:+.1f}, {100 * c.hi:+.1f}]",
             f"{c.p:.3f}", f"{c.p_adjusted:.3f}", c.verdict,
             "" if c.speedup[0] != c.speedup[0] else f"{c.speedup[0]:.2f} [{c.speedup[1]:.2f}, {c.speedup[2]:.2f}]"]
            for c in comps]
    lines = ["## Pruned vs control (test split)", "",
             f"Each cell against the control of the same seeds on the same test images. Test: {comps[0].test}; "
             f"a difference is called only where every test rejects (the largest p), after {CORRECTION}'s "
             f"correction over the {len(comps)} cells at alpha {ALPHA}. Interval: the wider of Bonett–Price's for "
             "paired proportions (pooled images) and, with 2+ seeds, the t-interval of per-seed differences. "
             "Accuracy intervals in the trial tables: Wilson 95 %. Speedup: percentile bootstrap of the median "
             "per-pair ratio (pairs pooled over seeds).", ""]
    lines += table(rows, head) + [""]
    lines += ["## Does accuracy rise after pruning?", ""] + answer_2022(comps, records) + [""]
    return lines


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
        # env's cuda is torch.version.cuda: the build, which a CPU-only run has too
        cuda = f"torch built for CUDA {env['cuda']}" if env.get("cuda") not in (None, "", "None") else "torch without CUDA"
        lines.append(f"  - device: {env.get('device_name', '?')}; CPU: {env.get('cpu', '?')}; {cuda}"
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


def make_report(study_dir, out=None, formats=("png", "pdf"), show=None, kinds=KINDS, dpi=100, command="", arch=None,
                x="nominal"):
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
    notes += slower_than_dense(study.records)  # e.g. odd channel counts off the CPU's fast convolution paths
    notes += missed_mac_targets(study.records)
    notes += missed_speedup_targets(study.records)
    written, arch_lines, deploy_lines = [], [], []
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
                          fig_time(study, model, dataset, m, key, records, x)) for m in methods]
            if "pareto" in kinds:
                figs.append((f"pareto-{slug(model)}-{slug(device_label(key))}",
                             fig_pareto(study, model, dataset, methods, key, records)))
            if "size" in kinds:
                figs.append((f"size-{slug(model)}-{slug(device_label(key))}",
                             fig_size(study, model, dataset, methods, key, records)))
        if "methods" in kinds:
            figs.append((f"methods-{slug(model)}", fig_methods(study, model, dataset, methods, records, x)))
        cells = deploy_cells(records)  # latency.runtimes x batch_sizes (pruneflow/deployment.py); none before 30
        deploy_lines += deploy_md(cells)
        if "deploy" in kinds and cells:
            sub = _context(study, done(records) or records)
            figs.append((f"deploy-speedup-{slug(model)}", fig_deploy_speedup(model, dataset, cells, sub)))
            if len({c.batch_size for c in cells}) > 1:  # a curve over batch sizes needs two
                figs.append((f"deploy-throughput-{slug(model)}", fig_deploy_throughput(model, dataset, cells, sub)))
        series = series_by_model[model] = device_series(study, model, records)
        if "devices" in kinds:
            if len(series) < 2:
                notes.append(f"devices figure for {model} skipped: only one device ({series[0][0] if series else 'none'}); "
                             f"add one with python -m pruneflow.infer --ckpt {os.path.join(study_dir, 'checkpoints')} "
                             "on another machine and copy the devices/*.json it writes there into "
                             f"{os.path.join(study_dir, 'checkpoints', 'devices')}")
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
                          shown, command, arch_lines, resources_md(study.paths), deploy_lines)
        write_text(path, text)
        written.append(path)
    return written, notes


def cli(study, out=None, format="png,pdf", show=None, only=None, dpi=100, arch=None, x="nominal"):
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
      x: x-axis of the sparsity figures: nominal (the sparsity asked for) or achieved (channels removed;
        level: weights zeroed).
    """
    require("pruneflow.report", "h5py", "matplotlib")
    formats, kinds = _formats(format), _kinds(only)
    if x not in ("nominal", "achieved"):
        raise UserError(f"--x must be nominal or achieved, got {x!r}")
    try:
        dpi = float(dpi)
    except (TypeError, ValueError):
        raise UserError(f"dpi must be a number, got {dpi!r}") from None
    if not 10 <= dpi <= 1200:
        raise UserError(f"dpi must be between 10 and 1200, got {dpi:g}")
    # Rebuilt from the arguments, not sys.argv: submit.py calls cli() inside a submitit job.
    given = dict(out=out, format=None if format == "png,pdf" else ",".join(formats), show=show,
                 only=None if only is None else ",".join(kinds), dpi=None if dpi == 100 else f"{dpi:g}",
                 x=None if x == "nominal" else x)
    command = " ".join(["python -m pruneflow.report", shlex.quote(os.fspath(study))]
                       + [f"--{k} {shlex.quote(str(v))}" for k, v in given.items() if v is not None]
                       + (["--arch"] if arch is True else ["--noarch"] if arch is False else
                          [] if arch is None else [f"--arch {shlex.quote(str(arch))}"]))
    written, notes = make_report(os.fspath(study), out, formats, show, kinds, dpi, command, arch, x)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {len(written)} file(s):")
    for p in written:
        print(f"  {p}")


def main():
    from .cli import run_cli

    run_cli(cli, name="pruneflow.report")


if __name__ == "__main__":
    main()

