"""Portable inference: torch-only, same logits as the producing model, device JSON, clean refusals."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.models import build_model
from pruneflow.prune import prune, pruned_meta
from pruneflow.train import model_meta

HEAVY = ["nni", "ray", "submitit", "h5py", "matplotlib", "sklearn", "yaml", "tqdm", "tensorboard", "torch_pruning"]

# Runs in a child process whose only packages are a copy (symlinks) of this environment's site-packages
# minus the heavy ones: as on a laptop where `pip install pruneflow` was run without the HPC extra.
TORCH_ONLY_RUNNER = r"""
import json, runpy, sys
ckpt_dir, inputs, out, heavy = sys.argv[1:5]
sys.argv = ["pruneflow.infer", "--ckpt", ckpt_dir, "--device", "cpu", "--trials", "3", "--warmup", "1"]
try:
    runpy.run_module("pruneflow.infer", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
import torch
from safetensors.torch import load_file, save_file
from pruneflow.infer import load
x = load_file(inputs)
logits = {}
for name, t in x.items():
    model, meta = load(f"{ckpt_dir}/{name}.safetensors")
    with torch.no_grad():
        logits[name] = model(t)
save_file(logits, out)
print("HEAVY_LOADED=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy.split(","))))
"""


def torch_only_site(dest):
    """A site-packages directory holding every installed package except the heavy (HPC-extra) ones."""
    import sysconfig

    src = sysconfig.get_paths()["purelib"]
    heavy_prefixes = tuple(h.lower() for h in HEAVY + ["scikit_learn", "pyyaml", "_yaml", "pruneflow", "__editable__"])
    dest.mkdir()
    for entry in os.listdir(src):
        if entry.lower().replace("-", "_").startswith(heavy_prefixes) or entry.endswith(".pth"):
            continue
        os.symlink(os.path.join(src, entry), dest / entry)
    return dest


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, dense_ckpt):
    """Checkpoints made by the full package: SimpleCNN dense + level/l1/l2/fpgm, ResNet-18 l1 (CIFAR stem)."""
    d = tmp_path_factory.mktemp("ckpts")
    model, meta = ckpt_io.load(dense_ckpt)
    ckpt_io.save(model, d / "dense.safetensors", dict(meta, arm="dense"))
    made = {"dense": model}
    for method, s in [("level", 0.5), ("l1", 0.3), ("l2", 0.7), ("fpgm", 0.5)]:
        pruned, stats = prune(model, method, s, meta["input_shape"], ("Conv2d", "Linear"), ("fc2",))
        name = f"{method}-{s:.2f}"
        ckpt_io.save(pruned, d / f"{name}.safetensors", dict(pruned_meta(meta, stats), arm="pruned"))
        made[name] = pruned
    torch.manual_seed(0)
    r18 = build_model("resnet18", 10, 3, "cifar").eval()
    pruned, stats = prune(r18, "l1", 0.5, (3, 32, 32), ("Conv2d",), ("fc",), dependency_aware=True)
    ckpt_io.save(pruned, d / "resnet18-l1.safetensors",
                 dict(pruned_meta(model_meta("resnet18", "cifar10", "cifar", 10), stats), arm="pruned"))
    made["resnet18-l1"] = pruned
    return d, made


def test_torch_only_inference_reproduces_logits(ckpt_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d, made = ckpt_dir
    torch.manual_seed(1)
    inputs = {name: torch.randn(4, *(3, 32, 32) if name.startswith("resnet") else (1, 28, 28)) for name in made}
    save_file(inputs, tmp_path / "inputs.safetensors")
    site_dir = torch_only_site(tmp_path / "site")
    # -S: no site-packages of this environment; only the torch-only copy and the pruneflow sources.
    env = dict(os.environ, PYTHONPATH=f"{site_dir}{os.pathsep}{ROOT}")
    p = subprocess.run([sys.executable, "-S", "-c", TORCH_ONLY_RUNNER, str(d), str(tmp_path / "inputs.safetensors"),
                        str(tmp_path / "logits.safetensors"), ",".join(HEAVY)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    probe = subprocess.run([sys.executable, "-S", "-c", "import nni"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0  # the heavy packages really are absent there
    assert p.returncode == 0, p.stderr
    heavy_line = [ln for ln in p.stdout.splitlines() if ln.startswith("HEAVY_LOADED=")][0]
    assert json.loads(heavy_line.split("=", 1)[1]) == []
    assert "speedup" in p.stdout and "resnet18-l1.safetensors" in p.stdout
    logits = load_file(tmp_path / "logits.safetensors")
    for name, model in made.items():
        with torch.no_grad():
            ref = model.eval()(inputs[name])
        assert (logits[name] - ref).abs().max().item() <= 1e-5, name


def test_core_dependencies_are_torch_only():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps)
    assert names == ["fire", "safetensors", "torch", "torchvision"]


def test_directory_mode_writes_schema_valid_json(ckpt_dir, tmp_path):
    import jsonschema

    d, _ = ckpt_dir
    out = tmp_path / "dev.json"
    p = run_module("pruneflow.infer", "--ckpt", d, "--device", "cpu", "--trials", 4, "--batch-size", 2, "--out", out)
    assert p.returncode == 0, p.stderr
    doc = json.load(open(out))
    schema = json.load(open(os.path.join(ROOT, "docs", "device-json.schema.json")))
    jsonschema.validate(doc, schema)
    rows = {r["file"]: r for r in doc["checkpoints"]}
    assert rows["dense.safetensors"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert rows["l1-0.30.safetensors"]["accuracy"] is not None  # digits ships with the tool
    assert all(len(r["latency"]["samples"]) == 4 for r in doc["checkpoints"])
    assert doc["machine"]["device"] == "cpu" and doc["settings"]["batch_size"] == 2
    assert doc["settings"]["channels_last"] is True  # auto on the CPU: the layout the sweep's trials are timed in
    # every other checkpoint was timed alternately with the dense one: its speedup is the median pair ratio
    assert doc["settings"]["speedup"] == "paired" and "latency_dense_samples" not in rows["dense.safetensors"]
    # the ResNet-18 has no dense checkpoint of its own architecture here: no speedup at all
    r18 = rows.pop("resnet18-l1.safetensors")
    assert r18["speedup_vs_dense"] is None and "latency_dense_samples" not in r18
    for name, r in rows.items():
        if name != "dense.safetensors":
            ratios = sorted(d / t for t, d in zip(r["latency"]["samples"], r["latency_dense_samples"]))
            assert len(ratios) == 4 and r["speedup_vs_dense"] == pytest.approx((ratios[1] + ratios[2]) / 2)
    # with the ResNet-18's own dense checkpoint beside it, each architecture is timed against its own dense one
    both = tmp_path / "both"
    shutil.copytree(d, both)
    torch.manual_seed(0)
    ckpt_io.save(build_model("resnet18", 10, 3, "cifar"), both / "resnet18-dense.safetensors",
                 dict(model_meta("resnet18", "cifar10", "cifar", 10), arm="dense"))
    for flags in ([], ["--nopaired", "--nochannels_last"]):  # --nopaired: each timed once, ratio of medians
        p = run_module("pruneflow.infer", "--ckpt", both, "--device", "cpu", "--trials", 3, "--batch-size", 2,
                       "--out", out, "--noaccuracy", *flags)
        assert p.returncode == 0, p.stderr
        doc = json.load(open(out))
        jsonschema.validate(doc, schema)
        rows = {r["file"]: r for r in doc["checkpoints"]}
        r18 = rows.pop("resnet18-l1.safetensors")
        for r, base in [(r18, rows.pop("resnet18-dense.safetensors"))] + [(r, rows["dense.safetensors"]) for r in rows.values()]:
            if flags and r is not base:
                assert "latency_dense_samples" not in r
                assert r["speedup_vs_dense"] == pytest.approx(base["latency"]["median"] / r["latency"]["median"])
            elif r is not base:  # paired with its own architecture's dense checkpoint
                ratios = sorted(b / t for t, b in zip(r["latency"]["samples"], r["latency_dense_samples"]))
                assert len(ratios) == 3 and r["speedup_vs_dense"] == pytest.approx(ratios[1])
        if not flags:  # the ResNet-18 beside a dense ResNet-18, not the SimpleCNN (tens of times faster)
            assert min(r18["latency_dense_samples"]) > 5 * rows["dense.safetensors"]["latency"]["median"]
    assert doc["settings"]["speedup"] == "medians" and "dense median / median" in p.stdout
    assert doc["settings"]["channels_last"] is False  # --nochannels_last


def test_single_file_prints_the_essentials(ckpt_dir):
    d, _ = ckpt_dir
    p = run_module("pruneflow.infer", "--ckpt", d / "l2-0.70.safetensors", "--device", "auto", "--trials", 3,
                   "--batch-size", 1)
    assert p.returncode == 0, p.stderr
    for word in ("method: l2", "sparsity: 0.70", "params:", "MACs:", "device: cpu", "latency:", "median", "p95",
                 "images/s", "test accuracy:", "(float32, channels_last)"):
        assert word in p.stdout, word
    p = run_module("pruneflow.infer", "--ckpt", d / "l2-0.70.safetensors", "--device", "cpu", "--trials", 2,
                   "--noaccuracy")
    assert p.returncode == 0 and "test accuracy: not measured (--noaccuracy)" in p.stdout, p.stdout + p.stderr


def test_device_indices_are_checked_not_crashed_on():
    from pruneflow.infer.device import resolve_device
    from pruneflow.errors import UserError

    assert resolve_device("cpu:0") == torch.device("cpu:0")
    for bad in ("cpu:x", "cpu:-1", "cpu:"):
        with pytest.raises(UserError, match="a device index is a whole number"):
            resolve_device(bad)
    if torch.cuda.is_available():
        with pytest.raises(UserError, match=r"this machine has \d+ CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_mps_path_uses_documented_api(monkeypatch):
    from pruneflow.infer import device as devmod
    from pruneflow.errors import UserError

    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="'mps' is not available on this machine; available: .*cpu"):
            devmod.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devmod.resolve_device("auto").type == "mps"
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    devmod.synchronize(torch.device("mps"))
    assert calls == ["mps"]


def test_bad_input(ckpt_dir, tmp_path):
    d, _ = ckpt_dir
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", tmp_path / "missing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", empty), "no *.safetensors")
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes((d / "l1-0.30.safetensors").read_bytes()[:500])
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", trunc), "truncated or corrupt")
    pt = tmp_path / "m.pt"
    torch.save(build_model("simple_cnn", 10, 1), pt)
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", pt), "pickle", "convert")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", tmp_path / "plain.safetensors"), "without pruneflow metadata")
    model, meta = ckpt_io.load(d / "l1-0.30.safetensors")
    ckpt_io.save(model, tmp_path / "liar.safetensors", dict(meta, arch="resnet50", in_channels=1))
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", tmp_path / "liar.safetensors"), "declared architecture")
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", d / "dense.safetensors", "--device", "tpu"), "unknown device")
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", d / "dense.safetensors", "--device", "mps"), "not available")
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", d / "dense.safetensors", "--batch-size", 0), "batch size")
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", d / "dense.safetensors", "--channels_last", "maybe"),
                       "auto, true or false")
    p = run_module("pruneflow.infer", "--ckpt", d / "dense.safetensors", "--channels_last", "false", "--trials", 1,
                   "--noaccuracy")  # the words the message offers are taken as written
    assert p.returncode == 0 and "(float32, NCHW)" in p.stdout, p.stdout + p.stderr


def test_paired_timing_alternates_and_measures_the_ratio():
    import time

    from pruneflow.infer.timing import paired_speedup, time_forward_paired

    calls = []

    class Probe(torch.nn.Module):  # records who ran; the reference also sleeps 4 ms per call
        def __init__(self, name, sleep):
            super().__init__()
            self.name, self.sleep = name, sleep

        def forward(self, x):
            calls.append((self.name, self.training, torch.is_inference_mode_enabled()))
            time.sleep(self.sleep)
            return x

    model, ref = Probe("model", 0.0).train(), Probe("ref", 0.004).train()
    samples, ref_samples = time_forward_paired(model, ref, torch.zeros(2, 3), warmup=2, trials=6)
    assert len(samples) == len(ref_samples) == 6
    names = [c[0] for c in calls]
    # warm-up pairs, then pairs in alternating order: neither side always runs first
    assert names == ["model", "ref"] * 2 + ["model", "ref", "ref", "model"] * 3
    assert all(not training and inference for _, training, inference in calls)  # eval mode, no autograd
    assert min(ref_samples) >= 0.004 and paired_speedup(samples, ref_samples) > 4
    assert paired_speedup([1.0, 2.0, 4.0], [2.0, 2.0, 4.0]) == 1.0  # median of 2, 1, 1


def test_output_piped_into_head_stops_quietly(ckpt_dir):
    # `infer DIR | head -1`: the reader leaves after one line; the writes after it fail with EPIPE
    d, _ = ckpt_dir
    p = subprocess.run(f"{sys.executable} -m pruneflow.infer --ckpt {d} --trials 1 --warmup 0 --noaccuracy | head -1",
                       shell=True, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.stdout.startswith("device ") and p.stdout.count("\n") == 1
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_a_bare_number_is_a_file_name(tmp_path, monkeypatch):
    from pruneflow.errors import check_writable_dir, check_writable_file

    monkeypatch.chdir(tmp_path)  # Fire gives `train 5` an int: the file ./5
    assert check_writable_file(5) == str(tmp_path / "5") and check_writable_dir(7) == str(tmp_path / "7")
