"""Architecture views for the report: computation graphs (Graphviz) and a per-layer width chart.

The graph is built from a ``torch.fx`` trace of the model rebuilt from its checkpoint, so it shows the real
data flow, with shapes on the edges (from fx's ShapeProp) and layer widths on the nodes. torchvision's
BasicBlock / Bottleneck are traced as leaves: a ResNet is one node per block ("64→128, inner 64→32→128")
plus the stem and the classifier, not a few hundred BatchNorm / ReLU / add nodes. BatchNorm, ReLU and
Dropout are folded into the node that feeds them. The .dot text is written here and rendered by the ``dot``
binary (Debian package graphviz); without it the .dot file is still written and the report says so.

The width chart takes every value from the checkpoints' weight tensor shapes (checkpoint.load loads them
strictly), one line per method at one sparsity, the dense widths as the reference.
"""

import os
import shutil
import subprocess

from .figures import DENSE_COLOR, atomic_write, mstyle, new_figure, save_figure, slug
from .errors import UserError
from .files import write_text
from .study import done

GRAPHVIZ_NOTE = "graphviz not installed: architecture graphs skipped"
PRUNED_FILL = "#fdd0a2"  # nodes narrower than the dense model's
FOLDED_MODULES = ("BatchNorm1d", "BatchNorm2d", "ReLU", "Dropout", "Identity")
FOLDED_FUNCTIONS = ("relu", "relu_", "dropout")
BLOCKS = ("BasicBlock", "Bottleneck")


# ----------------------------------------------------------------------------------------------- graph

def trace(model, input_shape):
    """A torch.fx GraphModule of ``model`` (ResNet blocks as leaves) with each node's output shape in
    ``node.meta['tensor_meta']``."""
    import torch
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    class BlockTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return type(m).__name__ in BLOCKS or super().is_leaf_module(m, qualname)

    model = model.cpu().eval()
    gm = torch.fx.GraphModule(model, BlockTracer().trace(model))
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    return gm


def _shape(node):
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return "×".join(str(d) for d in tuple(shape)[1:]) if shape is not None else ""


def _pair(v):
    """(2, 2) -> 2, (2, 1) -> '2×1'."""
    return v if not isinstance(v, tuple) else v[0] if len(set(v)) == 1 else "×".join(map(str, v))


def module_label(name, m):
    """'conv1 Conv2d 1→8 3×3', 'fc1 Linear 4608→64', 'layer1.0 BasicBlock 64→64\\ninner 64→32→64'."""
    kind = type(m).__name__
    if kind == "Conv2d":
        k = m.kernel_size
        text = f"{name} Conv2d {m.in_channels}→{m.out_channels} {k[0]}×{k[1]}"
        return text + (f" /{_pair(m.stride)}" if max(m.stride) > 1 else "") + (f" g{m.groups}" if m.groups > 1 else "")
    if kind == "Linear":
        return f"{name} Linear {m.in_features}→{m.out_features}"
    if kind in BLOCKS:
        convs = [c for n, c in m.named_children() if n.startswith("conv")]
        inner = "→".join(str(w) for w in [convs[0].in_channels] + [c.out_channels for c in convs])
        text = f"{name} {kind} {convs[0].in_channels}→{convs[-1].out_channels}\\ninner {inner}"
        stride = max(max(c.stride) for c in convs)
        if m.downsample is not None:
            ds = m.downsample[0]
            text += f"\\n+ downsample {ds.in_channels}→{ds.out_channels} 1×1" + (f" /{stride}" if stride > 1 else "")
        return text
    return f"{name} {kind}"


def _changed(model, reference):
    """Module names whose parameter shapes differ from ``reference``'s (the pruned ones)."""
    if reference is None:
        return set()
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    return {k.rpartition(".")[0] for k, v in model.state_dict().items() if ref.get(k) != tuple(v.shape)}


def _quote(text):
    return '"' + str(text).replace("\\n", "\0").replace("\\", "\\\\").replace('"', '\\"').replace("\0", "\\n") + '"'


def graph_nodes(model, input_shape, reference=None):
    """The drawn graph of one model: (nodes, edges). nodes: [(id, label, kind, changed, group)], edges:
    [(src, dst, shape label)]. Folding keeps one node per layer or block."""
    gm = trace(model, input_shape)
    modules = dict(gm.named_modules())
    changed = _changed(model, reference)
    users = {n: len(n.users) for n in gm.graph.nodes}
    rep, extra, order = {}, {}, []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue
        name = n.target if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
        fold = ((n.op == "call_module" and type(modules[n.target]).__name__ in FOLDED_MODULES)
                or (n.op in ("call_function", "call_method") and name in FOLDED_FUNCTIONS))
        inputs = n.all_input_nodes
        if fold and len(inputs) == 1 and inputs[0].op != "placeholder" and users[inputs[0]] == 1:
            rep[n] = rep[inputs[0]]
            extra[rep[n]].append(str(name))
            continue
        rep[n], extra[n] = n, []
        order.append(n)
    nodes, edges = [], []
    for n in order:
        group, is_changed = "", False
        if n.op == "placeholder":
            label, kind = "input " + "×".join(map(str, input_shape)), "io"
        elif n.op == "output":
            label, kind = "output", "io"
        elif n.op == "call_module":
            m = modules[n.target]
            label, kind = module_label(n.target, m), "module"
            is_changed = any(c == n.target or c.startswith(n.target + ".") for c in changed)
            group = n.target.split(".")[0] if "." in n.target else ""
        else:
            label, kind = getattr(n.target, "__name__", str(n.target)), "function"
        if extra[n]:
            label += "\\n+ " + ", ".join(extra[n])
        nodes.append((n.name, label, kind, is_changed, group))
        for a in n.all_input_nodes:
            if a in rep and rep[a] is not n:
                edges.append((rep[a].name, n.name, _shape(a)))
    return nodes, edges


def graph_dot(panels, input_shape, title=""):
    """Graphviz text: one cluster per (panel title, model, reference model or None), side by side."""
    lines = ["digraph architecture {", '  graph [rankdir=TB, fontname="Helvetica", fontsize=14, labelloc=t, '
             f'nodesep=0.3, ranksep=0.35, label={_quote(title)}];',
             '  node [fontname="Helvetica", fontsize=11, shape=box, style="rounded,filled", fillcolor=white];',
             '  edge [fontname="Helvetica", fontsize=9, color="#555555"];']
    for i, (name, model, reference) in enumerate(panels):
        nodes, edges = graph_nodes(model, input_shape, reference)
        lines += [f"  subgraph cluster_{i} {{", f"    label={_quote(name)}; style=rounded; color=gray;"]
        groups = {}
        for nid, label, kind, changed, group in nodes:
            style = {"io": 'shape=oval, fillcolor="#eeeeee"', "function": "shape=ellipse"}.get(kind, "")
            fill = f', fillcolor="{PRUNED_FILL}"' if changed else ""
            attrs = f"label={_quote(label)}" + (f", {style}" if style else "") + fill
            groups.setdefault(group, []).append(f"p{i}_{nid} [{attrs}];")
        for group, items in groups.items():
            if group and len(items) > 1:  # one box per ResNet stage
                head = [f"    subgraph cluster_{i}_{group} {{", f"      label={_quote(group)}; style=dashed; color=gray;"]
                lines += head + [f"      {x}" for x in items] + ["    }"]
            else:
                lines += [f"    {x}" for x in items]
        lines += [f"    p{i}_{a} -> p{i}_{b} [label={_quote(' ' + s if s else '')}];" for a, b, s in edges]
        lines.append("  }")
    return "\n".join(lines + ["}"]) + "\n"


def render(dot_text, base, formats=("svg",), dpi=96):
    """Write ``base``.dot and render it to ``base``.<fmt> with Graphviz's dot; returns the written paths.
    Each file is written to a temporary name and renamed (a reader never sees half a file)."""
    write_text(base + ".dot", dot_text)
    written = [base + ".dot"]
    dot = shutil.which("dot")
    if dot is None:
        raise UserError(f"{GRAPHVIZ_NOTE} (install the graphviz package, which provides dot)")
    for fmt in formats:
        def run(tmp, fmt=fmt):
            p = subprocess.run([dot, f"-T{fmt}", f"-Gdpi={dpi:g}", "-o", tmp, base + ".dot"], capture_output=True,
                               text=True)
            if p.returncode != 0:
                raise UserError(f"dot failed on {base}.dot: {p.stderr.strip()[:300]}")

        atomic_write(f"{base}.{fmt}", run)
        written.append(f"{base}.{fmt}")
    return written


def checkpoint_graph(paths, base, formats=("svg",), reference=None, dpi=96):
    """Draw the checkpoints in ``paths`` side by side (``reference``: the dense checkpoint, to shade pruned
    layers); returns the written files (.dot first)."""
    from .infer.checkpoint import load

    ref = load(reference)[0] if reference else None
    panels, shape = [], None
    for p in paths:
        model, meta = load(p)
        shape = shape or meta["input_shape"]
        panels.append((os.path.basename(p), model, ref))
    return render(graph_dot(panels, shape), base, formats, dpi)


# ----------------------------------------------------------------------------------------------- widths

def checkpoint_widths(path):
    """[(layer, type, in, out)] of every Conv2d / Linear in module order (depth), read from the weight tensors
    of checkpoint ``path`` (in = weight.shape[1] x groups, out = weight.shape[0])."""
    import torch.nn as nn

    from .infer.checkpoint import load

    model, _ = load(path)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.shape
            rows.append((name, type(m).__name__, int(w[1]) * getattr(m, "groups", 1), int(w[0])))
    return rows


def fig_widths(title, dense, series, subtitle=""):
    """Channels kept per layer over depth: ``dense`` [(layer, type, in, out)], ``series`` [(method, label,
    rows)]. Returns (figure, the data it drew: layers, dense outs, {method: outs})."""
    import numpy as np

    layers = [r[0] for r in dense]
    base = np.array([r[3] for r in dense], dtype=float)
    data = {"layers": layers, "dense": [int(x) for x in base], "methods": {}}
    fig, axes = new_figure(nrows=2, width=max(8.0, min(16.0, 0.22 * len(layers) + 4)), height=7.5, sharex=True)
    x = np.arange(len(layers))
    for ax, scale in zip(axes[:, 0], (1.0, 100 / base)):
        # wide and pale, under the methods: level pruning keeps every width and lies exactly on it
        ax.plot(x, base * scale, color=DENSE_COLOR, linewidth=7, alpha=0.18, solid_capstyle="round", label="dense")
    for i, (method, label, rows) in enumerate(series):
        out = dict((r[0], r[3]) for r in rows)
        y = np.array([out.get(name, np.nan) for name in layers], dtype=float)
        data["methods"][method] = [int(v) if v == v else None for v in y]
        style = dict(mstyle(method), label=label, markersize=5)
        if style["color"] is None:  # no fixed colour (l1@depgraph ...): one the fixed ones do not use
            style.update(color=f"C{5 + i % 5}", marker=mstyle(method.split("@")[0])["marker"])
        axes[0][0].plot(x, y, **style)
        axes[1][0].plot(x, 100 * y / base, **style)
    axes[0][0].set_ylabel("output channels kept")
    axes[1][0].set_ylabel("kept (% of dense)")
    axes[1][0].set_ylim(0, 105)
    step = max(1, len(layers) // 40)  # ResNet-101 has 105 layers: label every few
    axes[1][0].set_xticks(x[::step], layers[::step], rotation=90 if len(layers) > 12 else 0, fontsize=8)
    axes[1][0].set_xlabel("layer (Conv2d / Linear, in module order = depth)")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    axes[0][0].set_title(subtitle, fontsize=9)
    fig.suptitle(title)
    return fig, data


# ----------------------------------------------------------------------------------------------- report

def check_arch(records, arch):
    """``--arch`` → None (views off), or {'trial': id or None, 'sparsity': float or None}."""
    if arch is False:
        return None
    if arch is None or arch is True:
        return {"trial": None, "sparsity": None}
    try:
        s = float(arch)
    except (TypeError, ValueError):
        ids = sorted(r["id"] for r in records)
        hit = [r for r in records if r["id"] == str(arch)]
        if not hit:
            raise UserError(f"--arch {arch}: neither a trial id nor a sparsity; trials: {', '.join(ids)}") from None
        if hit[0]["status"] != "done":
            raise UserError(f"--arch {arch}: that trial failed, so it has no checkpoint to draw")
        if hit[0].get("arm") != "pruned":
            raise UserError(f"--arch {arch}: not a pruned trial (the dense model is always drawn next to it)")
        return {"trial": str(arch), "sparsity": None}
    if not 0.0 < s < 1.0:
        raise UserError(f"--arch {arch}: a sparsity must be in (0, 1)")
    return {"trial": None, "sparsity": s}


def arch_views(study, model, records, methods, out, formats, dpi, choice):
    """The graph (dense + one pruned trial) and the width chart of one model; returns (written, notes,
    summary.md lines)."""

    def ckpt(r):
        return os.path.join(study.dir, r.get("checkpoint") or "")

    dense = next((r for r in sorted(done(records, arm="dense"), key=lambda r: r["seed"]) if os.path.isfile(ckpt(r))),
                 None)
    if dense is None:
        return [], [f"architecture views for {model} skipped: no dense checkpoint under {study.dir}"], []
    pruned = [r for r in done(records, arm="pruned") if os.path.isfile(ckpt(r))]
    chosen = next((r for r in pruned if r["id"] == choice["trial"]), None)
    target = choice["sparsity"] if choice["sparsity"] is not None else chosen["sparsity"] if chosen else 0.5
    at = {}  # method -> its trial nearest the target sparsity
    for m in methods:
        rs = [r for r in pruned if r["method"] == m]
        if rs:
            at[m] = min(rs, key=lambda r: (round(abs(r["sparsity"] - target), 6), -r["sparsity"], r["seed"]))
    if chosen is not None:  # its own line in the chart, whatever seed the nearest-sparsity rule would pick
        at[chosen["method"]] = chosen
    else:  # the first method that changes shapes (level pruning keeps every width)
        chosen = next((r for r in at.values() if r["widths"] != dense["widths"]), None)
    written, notes, lines = [], [], [f"### Architecture: {model}", ""]
    base = os.path.join(out, f"arch-{slug(model)}")
    # widths from the checkpoints (the chart), checked against the HDF5 /widths tables
    rows = {r["id"]: checkpoint_widths(ckpt(r)) for r in [dense] + list(at.values())}
    for tid, w in rows.items():
        stored = next(r for r in records if r["id"] == tid)["widths"]
        if stored and [tuple(x) for x in stored] != w:
            notes.append(f"trial {tid}: the widths in the HDF5 file differ from its checkpoint "
                         "(the chart uses the checkpoint)")
    from .infer.checkpoint import load

    dense_model, meta = load(ckpt(dense))
    panels = [(f"{dense['id']} ({sum(p.numel() for p in dense_model.parameters()):,} params)", dense_model, None)]
    if chosen is not None:
        pm = load(ckpt(chosen))[0]
        panels.append((f"{chosen['id']} ({sum(p.numel() for p in pm.parameters()):,} params)", pm, dense_model))
    text = graph_dot(panels, meta["input_shape"], f"{model} on {meta['dataset']}: computation graph (torch.fx trace); "
                     "shaded: layers whose widths differ from dense")
    try:
        written += render(text, base, formats, dpi)
        shown = f"{os.path.basename(base)}.{formats[0]}"
    except UserError as e:
        if GRAPHVIZ_NOTE not in str(e):
            raise
        written.append(base + ".dot")
        shown = f"{os.path.basename(base)}.dot"
        notes.append(f"{GRAPHVIZ_NOTE} (the Graphviz source is in {base}.dot; install the graphviz package, "
                     "which provides dot, to render it)")
    drawn = dense["id"] + (f" and {chosen['id']} side by side" if chosen else " (no pruned trial changes shapes)")
    blocks = any(type(m).__name__ in BLOCKS for m in dense_model.modules())
    lines.append(f"- `{shown}`: computation graph of {drawn}, traced with torch.fx: layer widths on the nodes"
                 + (" (one node per residual block: in→out and the inner widths)" if blocks else "")
                 + ", tensor shapes on the edges, layers whose widths changed shaded.")
    if at:
        series = [(m, f"{m}: {r['id']} (sparsity {r['sparsity']:.2f})", rows[r["id"]]) for m, r in at.items()]
        fig, data = fig_widths(f"{model} on {meta['dataset']}: channels kept per layer at sparsity ≈ {target:.2f}",
                               rows[dense["id"]], series, "from each trial's checkpoint tensor shapes; wide grey "
                               f"line: the dense model {dense['id']}")
        save_figure(fig, out, f"widths-{slug(model)}", formats, dpi, written)
        lines.append(f"- `widths-{slug(model)}.{formats[0]}`: output channels kept per Conv2d / Linear layer over "
                     f"depth, one line per method at the sparsity nearest {target:.2f}, the dense model as a wide "
                     "grey line.")
        head = ["layer", "type", "dense"] + [f"{m} ({r['id']})" for m, r in at.items()]
        body = [[name, kind, d] + ["" if data["methods"][m][i] is None else data["methods"][m][i] for m in at]
                for i, (name, kind, _, d) in enumerate(rows[dense["id"]])]
        from .report import table

        lines += ["", "Output channels per layer (from the checkpoints):", ""] + table(body, head)
    else:
        notes.append(f"width chart for {model} skipped: no pruned trial with a checkpoint")
    return written, notes, lines + [""]
