"""Architecture views: fx-traced Graphviz graphs with the pruned widths (SimpleCNN readable, ResNets one node
per block), a width chart whose values are the checkpoints' tensor shapes, and the report hook (including a
machine without Graphviz)."""
import os
import re
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import assert_clean_error, quickstart_study, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.errors import UserError
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune, pruned_meta
from pruneflow.train import model_meta
from pruneflow.views import GRAPHVIZ_NOTE, checkpoint_graph, checkpoint_widths, fig_widths, graph_nodes, render

# one worker runs this module, so its module-scoped study is built once (xdist gives each worker its own)
pytestmark = pytest.mark.xdist_group("views")

SIMPLE = ("simple_cnn", "digits", (1, 28, 28))
RESNET = ("resnet18", "cifar10", (3, 32, 32))


def dense_and_pruned(tmp_path, arch, dataset, shape):
    """An untrained dense model and its l1@depgraph 50 % pruned copy, saved as checkpoints."""
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[0], "cifar").eval()
    pruned, stats = prune(model, "l1@depgraph", 0.5, shape, *default_prune_targets(arch))
    meta = model_meta(arch, dataset, "cifar", 10)
    return (ckpt_io.save(model, tmp_path / f"{arch}-dense.safetensors", meta),
            ckpt_io.save(pruned, tmp_path / f"{arch}-pruned.safetensors", pruned_meta(meta, stats)))


def tensor_outs(path):
    """{layer: out channels} straight from the file: every 4-D (Conv2d) and 2-D (Linear) weight tensor."""
    with safe_open(path, framework="pt") as f:
        shapes = {k[: -len(".weight")]: f.get_slice(k).get_shape() for k in f.keys() if k.endswith(".weight")}
    return {k: int(s[0]) for k, s in shapes.items() if len(s) in (2, 4)}


def check_graph_files(paths, base):
    assert paths == [base + ".dot", base + ".svg", base + ".png"]
    assert b"<svg" in open(base + ".svg", "rb").read(2000)
    png = open(base + ".png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    return open(base + ".dot").read()


def test_simple_cnn_graph_shows_the_pruned_widths(tmp_path):
    dense, pruned = dense_and_pruned(tmp_path, *SIMPLE)
    text = check_graph_files(checkpoint_graph([dense], str(tmp_path / "dense"), ("svg", "png")), str(tmp_path / "dense"))
    assert "conv1 Conv2d 1→16 3×3" in text and "fc1 Linear 4608→64" in text and "#fdd0a2" not in text
    base = str(tmp_path / "pruned")
    text = check_graph_files(checkpoint_graph([pruned], base, ("svg", "png"), reference=dense), base)
    for label in ("conv1 Conv2d 1→8 3×3", "conv2 Conv2d 8→16 3×3", "fc1 Linear 2304→32", "fc2 Linear 32→10"):
        assert f'[label="{label}' in text, label
    # the data flow of the trace, ReLU/Dropout folded into their layers, shapes on the edges
    assert text.count("->") == 7 and 'label=" 16×12×12"' in text and "+ relu, dropout2" in text
    assert 'p0_conv1 [label="conv1 Conv2d 1→8 3×3\\n+ relu", fillcolor="#fdd0a2"]' in text  # shaded: pruned


def test_resnet18_graph_has_one_node_per_block(tmp_path):
    dense, pruned = dense_and_pruned(tmp_path, *RESNET)
    base = str(tmp_path / "resnet18")
    text = check_graph_files(checkpoint_graph([dense, pruned], base, ("svg", "png"), reference=dense), base)
    model, _ = ckpt_io.load(pruned)
    nodes, edges = graph_nodes(model, RESNET[2])
    # input, stem, 8 blocks, avgpool, flatten, fc, output: 14 nodes for 67 modules
    assert len(nodes) == 14 and len(edges) == 13 and len(list(model.modules())) == 67
    labels = [n[1] for n in nodes]
    assert labels[1].startswith("conv1 Conv2d 3→32 3×3") and "bn1, relu" in labels[1]
    assert "layer1.0 BasicBlock 32→32\\ninner 32→32→32" in labels
    assert "layer2.0 BasicBlock 32→64\\ninner 32→64→64\\n+ downsample 32→64 1×1 /2" in labels
    assert "fc Linear 256→10" in labels
    # both panels side by side: dense widths in one, pruned in the other, stages as clusters
    assert "layer4.1 BasicBlock 512→512" in text and "layer4.1 BasicBlock 256→256" in text
    assert text.count("subgraph cluster_") == 2 + 8 and len(re.findall(r"^\s+p\d_\w+ \[label", text, re.M)) == 28


def test_bottleneck_blocks_show_their_inner_widths():
    nodes, _ = graph_nodes(build_model("resnet50", 10, 3, "cifar").eval(), (3, 32, 32))
    labels = [n[1] for n in nodes]
    assert "layer1.0 Bottleneck 64→256\\ninner 64→64→64→256\\n+ downsample 64→256 1×1" in labels
    assert len(nodes) == 16 + 6  # 16 blocks + input, stem, avgpool, flatten, fc, output


def test_missing_dot_raises_the_note_but_writes_the_dot_file(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match=GRAPHVIZ_NOTE):
        render("digraph { a -> b }\n", str(tmp_path / "g"), ("png",))
    assert os.listdir(tmp_path) == ["g.dot"]


def test_width_chart_draws_the_checkpoint_tensor_shapes(tmp_path):
    dense, pruned = dense_and_pruned(tmp_path, *RESNET)
    dense_rows, pruned_rows = checkpoint_widths(dense), checkpoint_widths(pruned)
    fig, data = fig_widths("t", dense_rows, [("l1@depgraph", "l1@depgraph 0.50", pruned_rows)])
    want_dense, want_pruned = tensor_outs(dense), tensor_outs(pruned)
    assert data["layers"] == [n for n, m in build_model("resnet18").named_modules()
                              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]  # module order = depth
    assert data["dense"] == [want_dense[n] for n in data["layers"]]
    assert data["methods"]["l1@depgraph"] == [want_pruned[n] for n in data["layers"]]
    assert data["methods"]["l1@depgraph"][:2] == [32, 32] and data["dense"][:2] == [64, 64]
    top = fig.axes[0]  # what was drawn: the dense line first, then the method's
    (dense_line, method_line) = top.lines
    assert list(dense_line.get_ydata()) == data["dense"] and list(method_line.get_ydata()) == data["methods"]["l1@depgraph"]


# ------------------------------------------------------------------------------------------ the report

@pytest.fixture(scope="module")
def study(tmp_path_factory, dense_ckpt):
    """dense + level and l1@depgraph at 50 %, one seed, no control (about 40 s on 2 CPU cores)."""
    return quickstart_study(tmp_path_factory.mktemp("results"), dense_ckpt, "--prune.methods", "[level, l1@depgraph]",
                            "--prune.sparsities", "[0.5]", "--control", "false", "--finetune.epochs", "1",
                            "--latency.trials", "3", "--noprogress")


def width_table(summary):
    """{layer: [dense, method 1, ...]} and the head of the widths table in summary.md."""
    part = summary.split("Output channels per layer")[1].split("\n\n")[1]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in part.splitlines() if ln.startswith("|")]
    return rows[0], {r[0]: [int(x) for x in r[2:]] for r in rows[2:]}


def test_report_includes_the_architecture_views(study, tmp_path):
    out = tmp_path / "r"
    p = run_module("pruneflow.report", study, "--out", out, "--format", "png,svg")
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("arch-simple-cnn.dot", "arch-simple-cnn.png", "arch-simple-cnn.svg", "widths-simple-cnn.png",
                 "widths-simple-cnn.svg", "methods-simple-cnn.png"):
        assert (out / name).exists() and str(out / name) in p.stdout, name
    assert "graphviz" not in p.stdout
    dot = (out / "arch-simple-cnn.dot").read_text()
    # default: the first method that changes shapes (level keeps them) at the sparsity nearest 0.5
    assert "l1@depgraph-0.50-s0" in dot and "conv1 Conv2d 1→8 3×3" in dot and "conv1 Conv2d 1→16 3×3" in dot
    summary = (out / "summary.md").read_text()
    assert "## Architecture views" in summary and "`arch-simple-cnn.png`" in summary
    assert "[widths-simple-cnn.png](widths-simple-cnn.png)" in summary
    head, rows = width_table(summary)
    assert head == ["layer", "type", "dense", "level (level-0.50-s0)", "l1@depgraph (l1@depgraph-0.50-s0)"]
    ckpts = [study / "checkpoints" / f"{t}.safetensors" for t in ("dense-s0", "level-0.50-s0", "l1@depgraph-0.50-s0")]
    outs = [tensor_outs(c) for c in ckpts]
    assert rows == {layer: [o[layer] for o in outs] for layer in ("conv1", "conv2", "fc1", "fc2")}


def test_report_without_graphviz_says_so_and_writes_the_rest(study, tmp_path):
    out = tmp_path / "r"
    no_dot = os.path.dirname(sys.executable)  # the virtualenv's bin: python, no dot
    p = run_module("pruneflow.report", study, "--out", out, "--format", "png", env={"PATH": no_dot})
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"note: {GRAPHVIZ_NOTE}" in p.stdout and p.stdout.count(GRAPHVIZ_NOTE) == 1
    files = set(os.listdir(out))
    assert "arch-simple-cnn.png" not in files and "arch-simple-cnn.dot" in files  # the source, to render elsewhere
    assert {"widths-simple-cnn.png", "methods-simple-cnn.png", "summary.md"} <= files
    assert any(f.startswith("pareto-simple-cnn-") for f in files)
    summary = (out / "summary.md").read_text()
    assert GRAPHVIZ_NOTE in summary.split("## Notes")[1].split("\n## ")[0] and "`arch-simple-cnn.dot`" in summary


def test_arch_flag_picks_the_trial_and_bad_values_fail_cleanly(study, tmp_path):
    out = tmp_path / "r"  # --arch ID adds the views to an --only without them; no summary asked for, none written
    p = run_module("pruneflow.report", study, "--out", out, "--format", "png", "--only", "methods",
                   "--arch", "level-0.50-s0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["arch-simple-cnn.dot", "arch-simple-cnn.png", "methods-simple-cnn.png",
                                       "widths-simple-cnn.png"]
    dot = (out / "arch-simple-cnn.dot").read_text()
    assert "level-0.50-s0" in dot and "l1@depgraph" not in dot and "#fdd0a2" not in dot  # level keeps the shapes
    p = run_module("pruneflow.report", study, "--out", tmp_path / "n", "--format", "png", "--only", "methods,summary",
                   "--noarch")
    assert p.returncode == 0 and sorted(os.listdir(tmp_path / "n")) == ["methods-simple-cnn.png", "summary.md"]
    summary = (tmp_path / "n" / "summary.md").read_text()
    assert "--noarch" in summary and "## Architecture views" not in summary
    assert_clean_error(run_module("pruneflow.report", study, "--out", tmp_path / "e", "--arch", "l9-0.50-s0"),
                       "--arch l9-0.50-s0", "l1@depgraph-0.50-s0")
    assert_clean_error(run_module("pruneflow.report", study, "--out", tmp_path / "e", "--arch", "dense-s0"),
                       "not a pruned trial")
    assert_clean_error(run_module("pruneflow.report", study, "--out", tmp_path / "e", "--arch", "1.5"), "(0, 1)")
    assert not (tmp_path / "e").exists() or not os.listdir(tmp_path / "e")
    help_text = run_module("pruneflow.report", "--help")
    assert "--arch" in help_text.stdout + help_text.stderr
