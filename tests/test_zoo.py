"""The CIFAR networks of issue 31 (CIFAR ResNets, VGG-BN, MobileNetV2): each builds for 28x28 grey and 32x32 RGB
inputs, trains, prunes with every DepGraph method, fine-tunes, saves, and rebuilds with torch alone."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.infer.cifar import CIFAR_ARCHS
from pruneflow.models import build_model, default_prune_targets
from pruneflow.prune import prune
from pruneflow.results import read_trials
from pruneflow.train import model_meta

DEPGRAPH = ("l1", "l2", "fpgm", "taylor", "slim")


def steps(model, x, y, n=2):
    """A few SGD steps: the 'epoch' of a test (real training code paths, tiny data)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_new_model_builds_and_runs_for_grey_digits_and_rgb_cifar(arch, shape):
    model = build_model(arch, num_classes=100 if shape[0] == 3 else 10, in_channels=shape[0]).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, *shape)).shape == (2, 100 if shape[0] == 3 else 10)


def test_cifar_resnets_have_he_et_als_depths_and_widths():
    for arch, depth in (("resnet20", 20), ("resnet32", 32), ("resnet56", 56), ("resnet110", 110)):
        model = build_model(arch)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth, arch  # 6n + 2: the 3x3 convolutions and the classifier (shortcuts apart)
        assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
                model.layer3[0].conv1.out_channels] == [16, 32, 64]
    n56 = sum(p.numel() for p in build_model("resnet56").parameters())
    assert 0.85e6 < n56 < 0.87e6  # He et al.: 0.85M (option A); option B's projections add ~10k


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_train_prune_finetune_save_and_rebuild_with_torch_alone(arch, tmp_path):
    torch.manual_seed(0)
    shape = (3, 32, 32)
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    dense = steps(build_model(arch), x, y)
    ops, exclude = default_prune_targets(arch)
    meta = model_meta(arch, "synthetic-cifar10", "cifar", 10)
    for method in DEPGRAPH:
        calibration = [(x, y)] if method == "taylor" else None
        pruned, stats = prune(dense, f"{method}@depgraph", 0.5, shape, ops, exclude, calibration=calibration,
                              dependency_aware=True)
        assert stats["macs"] < stats["macs_dense"], (arch, method)  # channels really went
        if arch == "mobilenet_v2":  # depthwise convolutions stay depthwise
            assert all(m.groups == m.in_channels == m.out_channels for m in pruned.modules()
                       if isinstance(m, nn.Conv2d) and m.groups > 1)
        pruned = steps(pruned, x, y)
        path = tmp_path / f"{method}.safetensors"
        ckpt_io.save(pruned, path, dict(meta, method=f"{method}@depgraph", sparsity=0.5))
        with torch.inference_mode():
            (tmp_path / f"{method}.json").write_text(json.dumps(pruned(x[:2]).tolist()))
    code = ("import json, sys, torch\n"
            "sys.modules['torch_pruning'] = sys.modules['nni'] = None  # neither may be needed to rebuild\n"
            "from pruneflow.infer.checkpoint import load\n"
            "torch.manual_seed(0); x = torch.randn(8, 3, 32, 32)\n"
            "for f in sys.argv[1:]:\n"
            "    m, _ = load(f + '.safetensors')\n"
            "    want = torch.tensor(json.load(open(f + '.json')))\n"
            "    with torch.inference_mode(): got = m(x[:2])\n"
            "    assert torch.allclose(got, want, atol=1e-5), (f, (got - want).abs().max())\n"
            "print('rebuilt', len(sys.argv) - 1)\n")
    p = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / m) for m in DEPGRAPH)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and f"rebuilt {len(DEPGRAPH)}" in p.stdout, p.stderr


@pytest.mark.parametrize("job, dataset, extra", [("jobs/resnet56_cifar10.yaml", "synthetic-cifar10-tiny", []),
                                                 ("jobs/mobilenetv2_cifar10.yaml", "synthetic-cifar10-tiny", []),
                                                 ("jobs/vgg19_cifar100.yaml", "synthetic-cifar100-tiny", []),
                                                 ("jobs/vit_cifar10.yaml", "synthetic-cifar10-tiny",
                                                  ["--model.vit.layers", 2])])
def test_each_new_job_file_runs_on_tiny_synthetic_data(job, dataset, extra, tmp_path):
    """The smoke override each job file names, on one cell of its grid: dense training, pruning, fine-tuning,
    evaluation, timing and checkpoints of the real model."""
    from pruneflow.spec import load_spec

    spec, _ = load_spec(job)
    cell = (["--prune.mac_targets", f"[{spec.prune.mac_targets[0]}]", "--prune.sparsities", "[]"]
            if spec.prune.mac_targets else ["--prune.sparsities", f"[{spec.prune.sparsities[0]}]"])
    p = run_module("pruneflow.sweep", job, "--out", tmp_path, "--data.dataset", dataset, "--train.epochs", 1,
                   "--finetune.epochs", 1, "--seeds", "[0]", "--nocontrol", "--prune.methods",
                   f"[{spec.prune.methods[0]}]", *cell, "--latency.trials", 3, "--latency.batch_size", 16,
                   "--noprogress", *extra, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 done, 0 failed" in p.stdout
    trials = {r["id"]: r for r in read_trials(tmp_path / spec.study / "shard-0-of-1.h5")}
    pruned = next(r for r in trials.values() if r["arm"] == "pruned")
    assert pruned["model"] == spec.model.arch and pruned["macs"] < pruned["macs_dense"]
    if spec.prune.heads:  # the job's setting reached the pruner: each layer lost whole heads
        meta = ckpt_io.read_meta(next((tmp_path / spec.study).rglob(f"*{pruned['id']}*.safetensors")))
        assert meta["heads"] == [2, 2], meta.get("heads")
