"""vit_tiny (pruneflow.infer.vit): torchvision's ViT with prunable attention. It computes what torchvision's does,
DepGraph removes whole heads (or head dimensions) exactly, MACs match torch's FLOP counter and the formula, and a
pruned checkpoint rebuilds with torch alone; lying metadata and impossible settings are refused in one line."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, run_module
from pruneflow.errors import UserError
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.infer.vit import attentions, build_vit, head_counts
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune
from pruneflow.train import model_meta

TINY = {"patch": 4, "layers": 2, "heads": 3, "width": 48, "mlp": 96}  # 3 heads of 16: quick, same code paths
SHAPE = (3, 32, 32)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return build_vit(dict(TINY, **kw)).eval()


def macs_by_formula(model, image=32, classes=10):
    """Patch embedding + per layer (q, k, v, proj, QK^T, AV, MLP) + classifier, from the pruned widths."""
    p, width = model.conv_proj.kernel_size[0], model.conv_proj.out_channels
    tokens = (image // p) ** 2 + 1
    total = (tokens - 1) * width * model.conv_proj.in_channels * p * p + width * classes
    for block in model.encoder.layers:
        a, mlp = block.self_attention, block.mlp[0].out_features
        qk, v = a.q.out_features, a.v.out_features
        total += tokens * width * (2 * qk + v) + tokens * v * width + tokens * tokens * (qk + v)
        total += 2 * tokens * width * mlp
    return total


def test_attention_computes_what_torchvisions_multihead_attention_does():
    from torchvision.models.vision_transformer import VisionTransformer

    ours = tiny()
    c = TINY
    theirs = VisionTransformer(32, c["patch"], c["layers"], c["heads"], c["width"], c["mlp"], num_classes=10).eval()
    state = {k: v for k, v in ours.state_dict().items() if ".self_attention." not in k}
    for i, block in enumerate(ours.encoder.layers):  # torchvision packs q, k, v into one in_proj
        a, pre = block.self_attention, f"encoder.layers.encoder_layer_{i}.self_attention."
        state[pre + "in_proj_weight"] = torch.cat([a.q.weight, a.k.weight, a.v.weight])
        state[pre + "in_proj_bias"] = torch.cat([a.q.bias, a.k.bias, a.v.bias])
        state[pre + "out_proj.weight"], state[pre + "out_proj.bias"] = a.proj.weight, a.proj.bias
    theirs.load_state_dict(state)
    x = torch.randn(4, *SHAPE)
    with torch.inference_mode():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_default_size_is_deit_tiny_on_4x4_patches():
    model = build_model("vit_tiny")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.36e6, rel=0.01)
    assert head_counts(model) == [3] * 12 and model.encoder.layers[0].self_attention.q.out_features == 192
    assert ckpt_io.count_macs(model, SHAPE) == macs_by_formula(model)


def _head_blocks(dense, pruned, d):
    """Which of dense's heads (blocks of d query rows) each pruned layer kept."""
    kept = []
    for a, b in zip(attentions(dense), attentions(pruned)):
        blocks = [a.q.weight[h * d:(h + 1) * d] for h in range(a.num_heads)]
        kept.append([next(h for h, w in enumerate(blocks) if torch.equal(w, b.q.weight[j * d:(j + 1) * d]))
                     for j in range(b.num_heads)])
    return kept


def test_head_pruning_removes_whole_heads_exactly():
    dense, d = tiny(), TINY["width"] // TINY["heads"]
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    keep = ["conv_proj", "heads.head", *(n for n in names if n.endswith((".proj", "mlp.0", "mlp.3")))]
    pruned, stats = prune(dense, "l1@depgraph", 0.33, SHAPE, ("Linear",), keep, dependency_aware=True, heads=True)
    assert head_counts(pruned) == [2, 2]  # 0.33 of 3 heads, rounded up: one goes from each layer
    kept = _head_blocks(dense, pruned, d)
    reference = tiny()
    for a, b, heads in zip(attentions(reference), attentions(pruned), kept):
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
        for layer in ("k", "v"):  # keys and values lost the same heads as the queries
            assert torch.equal(getattr(b, layer).weight, getattr(a, layer).weight[rows])
        with torch.no_grad():  # a removed head's output no longer reaches the projection
            gone = torch.ones(a.proj.in_features, dtype=torch.bool)
            gone[rows] = False
            a.proj.weight[:, gone] = 0
    x = torch.randn(4, *SHAPE)
    with torch.inference_mode():
        assert torch.allclose(pruned(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("heads", [True, False])
def test_pruning_at_half_keeps_whole_heads_and_counts_match_torchs_flop_counter(heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    d = TINY["width"] // TINY["heads"]
    ops, exclude = default_prune_targets("vit_tiny")
    pruned, stats = prune(tiny(), "l1@depgraph", 0.5, SHAPE, ops, exclude, dependency_aware=True, heads=heads)
    for a in attentions(pruned):
        if heads:  # whole heads of the stored head dimension: 3 * 0.5 rounded up go, one is left
            assert (a.num_heads, a.q.out_features) == (1, d)
        else:  # every head stays, each narrower
            assert a.num_heads == 3 and a.q.out_features == 3 * math.ceil(d / 2)
    assert pruned.conv_proj.out_channels == TINY["width"] // 2 == pruned.hidden_dim
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        pruned(torch.zeros(1, *SHAPE))  # the math path: the counter misses CPU's fused attention
    assert stats["macs"] == counter.get_total_flops() // 2 == macs_by_formula(pruned) < stats["macs_dense"]
    assert stats["params"] == sum(p.numel() for p in pruned.parameters())


def test_every_depgraph_method_prunes_saves_and_rebuilds_with_torch_alone(tmp_path):
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    dense = tiny()
    ops, exclude = default_prune_targets("vit_tiny")
    meta = model_meta("vit_tiny", "synthetic-cifar10", "cifar", 10, vit=TINY)
    torch.manual_seed(1)
    probe = torch.randn(2, *SHAPE)  # the images the subprocess draws
    files = []
    for method in ("l1", "l2", "fpgm", "taylor"):
        for heads in (True, False):
            pruned, _ = prune(dense, f"{method}@depgraph", 0.5, SHAPE, ops, exclude, dependency_aware=True,
                              heads=heads, calibration=[(x, y)] if method == "taylor" else None)
            pruned.train()  # one fine-tuning step: the rebuilt model must carry trained, pruned weights
            opt = torch.optim.AdamW(pruned.parameters(), lr=1e-3)
            nn.functional.cross_entropy(pruned(x), y).backward()
            opt.step()
            pruned.eval()
            name = tmp_path / f"{method}-{heads}"
            ckpt_io.save(pruned, f"{name}.safetensors", dict(meta, method=f"{method}@depgraph", sparsity=0.5))
            with torch.inference_mode():
                name.with_suffix(".json").write_text(json.dumps(pruned(probe).tolist()))
            files.append(str(name))
    with pytest.raises(UserError, match="BatchNorm"):  # slim ranks BatchNorm scales: a ViT has none
        prune(dense, "slim@depgraph", 0.5, SHAPE, ops, exclude, dependency_aware=True)
    code = ("import json, sys, torch\n"
            "sys.modules['torch_pruning'] = sys.modules['nni'] = None  # neither may be needed to rebuild\n"
            "from pruneflow.infer.checkpoint import load\n"
            "from pruneflow.infer.vit import head_counts\n"
            "torch.manual_seed(1); x = torch.randn(2, 3, 32, 32)\n"
            "for f in sys.argv[1:]:\n"
            "    m, meta = load(f + '.safetensors')\n"
            "    want = torch.tensor(json.load(open(f + '.json')))\n"
            "    with torch.inference_mode(): got = m(x)\n"
            "    assert torch.allclose(got, want, atol=1e-5), (f, (got - want).abs().max())\n"
            "    assert meta['heads'] == head_counts(m), (meta['heads'], head_counts(m))\n"
            "print('rebuilt', len(sys.argv) - 1)\n")
    p = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and f"rebuilt {len(files)}" in p.stdout, p.stderr


def test_checkpoint_whose_head_counts_or_size_lie_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    ops, exclude = default_prune_targets("vit_tiny")
    pruned, _ = prune(tiny(), "l1@depgraph", 0.5, SHAPE, ops, exclude, dependency_aware=True, heads=True)
    good = tmp_path / "good.safetensors"
    ckpt_io.save(pruned, good, dict(model_meta("vit_tiny", "synthetic-cifar10", "cifar", 10, vit=TINY),
                                    method="l1@depgraph", sparsity=0.5))
    meta, tensors = ckpt_io.read_meta(good), load_file(good)
    lies = {"heads": [7, 1], "vit": dict(TINY, patch=5), "input_shape": [3, 32, 28]}
    for key, value in list(lies.items()) + [("heads", [1])]:
        bad = tmp_path / f"{key}.safetensors"
        save_file(tensors, bad, {"pruneflow": json.dumps(dict(meta, **{key: value}))})
        p = run_module("pruneflow.infer", bad, "--trials", 1, "--noaccuracy")
        assert p.returncode != 0 and "Traceback" not in p.stderr, (key, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("override, message", [
    (["--prune.heads"], "needs model.arch vit_tiny"),
    (["--model.arch", "vit_tiny", "--prune.methods", "[l1]"], "l1@depgraph"),
    (["--model.arch", "vit_tiny", "--model.vit.patch", "3"], "does not divide the image size"),
    (["--model.arch", "vit_tiny", "--model.vit.heads", "5"], "not a multiple of vit.heads"),
])
def test_impossible_vit_settings_are_refused_before_anything_runs(override, message, tmp_path):
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, *override)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch, method, heads, message", [
    ("vit_tiny", "l1", False, "use l1@depgraph"), ("vit_tiny", "level", True, "not level"),
    ("resnet20", "l1@depgraph", True, "a model without attention")])
def test_prune_refuses_what_the_job_file_check_refuses_in_the_same_words(arch, method, heads, message):
    # the prune CLI and the sweep share one check (prune.check_fits): a model, not a job file, decides here
    model = tiny() if arch == "vit_tiny" else build_model(arch)
    with pytest.raises(UserError, match=message):
        prune(model, method, 0.5, (3, 32, 32), heads=heads)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_default_vit_builds_for_digits_mnist_and_cifar(shape):
    model = build_model("vit_tiny", in_channels=shape[0], image_size=shape[-1]).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, *shape)).shape == (2, 10)
