"""Performance paths must compute the same things: device-resident data vs the 2022 report's torchvision pipeline,
and the resolved speed settings per device."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pruneflow.data import Batches, SeedStyleBatches
from pruneflow.step import resolve_perf


def cifar_like(n=96):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_evaluation_batches_identical_to_torchvision_path():
    images, labels = cifar_like()
    fast = list(Batches(images, labels, "cifar10", 32, train=False))
    seed = list(SeedStyleBatches(images, labels, "cifar10", 32, train=False))
    assert len(fast) == len(seed) == 3
    for (xf, yf), (xs, ys) in zip(fast, seed):
        assert torch.equal(yf, ys) and torch.allclose(xf, xs, atol=1e-5)  # same normalisation, no augmentation


def test_training_epoch_same_labels_and_channel_statistics():
    images, labels = cifar_like(512)
    fast = list(Batches(images, labels, "cifar10", 64, train=True, seed=1))
    seed = list(SeedStyleBatches(images, labels, "cifar10", 64, train=True, seed=1))
    # one epoch sees every image once: the same label distribution
    assert torch.equal(torch.cat([y for _, y in fast]).bincount(minlength=10), labels.bincount(minlength=10))
    assert torch.equal(torch.cat([y for _, y in seed]).bincount(minlength=10), labels.bincount(minlength=10))
    xf, xs = torch.cat([x for x, _ in fast]), torch.cat([x for x, _ in seed])
    # the same augmentation (zero-padded crop + flip) gives the same per-channel statistics
    assert torch.allclose(xf.mean((0, 2, 3)), xs.mean((0, 2, 3)), atol=0.02)
    assert torch.allclose(xf.std((0, 2, 3)), xs.std((0, 2, 3)), atol=0.02)
    # and augmentation is really applied in training, by both
    plain = torch.cat([x for x, _ in Batches(images, labels, "cifar10", 64, train=False)])
    assert not torch.allclose(xf.mean((0, 2, 3)), plain.mean((0, 2, 3)), atol=1e-4)


def test_resolve_perf_per_device():
    cpu = resolve_perf(None, "cpu")
    assert cpu.amp_dtype is None and cpu.channels_last is True and cpu.loader == "device"
    asked = resolve_perf({"precision": "bf16", "channels_last": True}, "cpu")
    assert asked.amp_dtype == torch.bfloat16 and asked.channels_last is True
    cuda = resolve_perf(None, "cuda")  # resolving needs no GPU
    assert cuda.amp_dtype is None and cuda.channels_last is True  # fp32 (TF32): measured faster at batch 64
    assert resolve_perf({"precision": "bf16"}, "cuda").amp_dtype == torch.bfloat16
    assert [resolve_perf({"compile": c}, "cpu").compile for c in (False, True, "max-autotune")] == \
        [None, "default", "max-autotune"]
    # the CUDA-graph modes are recorded on CUDA only; elsewhere plain eager steps (no compilation per trial)
    for mode in ("cudagraphs", "reduce-overhead"):
        assert resolve_perf({"compile": mode}, "cuda").compile == mode
        assert resolve_perf({"compile": mode}, "cpu").compile is None


def test_bf16_training_on_cpu_when_asked(dense_ckpt):
    from pruneflow.infer import checkpoint as ckpt_io
    from pruneflow.train import finetune

    model, meta = ckpt_io.load(dense_ckpt)
    history = finetune(model, meta, 1, device="cpu", perf={"precision": "bf16", "loader": "torchvision"})
    assert history[-1]["val_acc"] > 0.5


def test_train_throughput_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--quick", "--workers", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    row = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")][0]
    assert float(row[1].replace(",", "")) > 0 and float(row[2].replace(",", "")) > 0


def test_latency_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/latency.py", "--quick", "--trials", "3", "--round-to", "8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    assert [(r[2], r[-1]) for r in rows] == [("1", "-"), ("8", "-"), ("1", "8"), ("8", "8")]  # batch, round_to
    assert all(float(r[6]) > 1 and float(r[5]) > 0 for r in rows)  # MACs reduced; a measured speedup


def test_large_batch_recipe_scales_the_learning_rate_linearly():
    from pruneflow.train import get_recipe

    base, large = get_recipe("finetune"), get_recipe("finetune_bs512")
    assert large["batch_size"] == 512 and large["lr"] == pytest.approx(base["lr"] * 512 / base["batch_size"])
    assert base["batch_size"] == 64  # the 2022 report's recipe is unchanged


def test_divergence_is_detected_without_a_sync_per_step(dense_ckpt):
    from pruneflow.infer import checkpoint as ckpt_io
    from pruneflow.train import TrainingDiverged, finetune

    model, meta = ckpt_io.load(dense_ckpt)
    with pytest.raises(TrainingDiverged):
        finetune(model, meta, 1, device="cpu", lr=1e12)


def test_compiled_step_runs_full_batches_only():
    # a compiled step is specialised to the first batch's shape; the epoch's short last batch goes through the
    # plain module, so it costs no second compilation (minutes for a ResNet) and computes the same function
    from pruneflow.data import Batches
    from pruneflow.models import build_model
    from pruneflow.step import Step
    from pruneflow.train import get_recipe, make_optimizer, train_one_epoch

    class CountingStep(torch.nn.Module):  # stands where torch.compile's wrapper stands; the same forward
        def __init__(self, model):
            super().__init__()
            self.model, self.sizes = model, []

        def forward(self, x):
            self.sizes.append(len(x))
            return self.model(x)

    torch.manual_seed(0)
    model = build_model("simple_cnn", 10, 1, "cifar")
    images, labels = torch.randint(0, 256, (150, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (150,))
    counting = CountingStep(model)
    opt, _ = make_optimizer(model, get_recipe("finetune"), 1)
    step = Step(model, opt, forward=counting)  # what make_step builds for a compiled mode
    loss, acc = train_one_epoch(model, Batches(images, labels, "mnist", 64, train=True), step)
    assert counting.sizes == [64, 64] and 0 <= acc <= 1 and loss > 0  # 150 = 64 + 64 + 22: the 22 ran eagerly


def test_a_failing_compile_trains_eagerly_with_one_warning(dense_ckpt, tmp_path):
    # a node without a working C++ compiler: Inductor cannot build its kernels. The trial still trains (eagerly)
    # and says so in one line, instead of every trial of the study failing on a traceback.
    code = ("import sys; from pruneflow.infer import checkpoint as c; from pruneflow.train import finetune\n"
            "m, meta = c.load(sys.argv[1]); h = finetune(m, meta, 1, device='cpu', perf={'compile': True})\n"
            "print('val_acc', h[-1]['val_acc'])")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    p = subprocess.run([sys.executable, "-c", code, dense_ckpt], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: performance.compile")]
    assert len(warnings) == 1 and "training eagerly" in warnings[0] and "compiler" in warnings[0].lower(), p.stderr
    assert float(p.stdout.split("val_acc")[-1]) > 0.5


def test_compiled_fine_tuning_trains_the_model_itself(dense_ckpt):
    # performance.compile: the compiled wrapper does the steps, the plain module (saved, evaluated) holds the
    # weights. A compiled module has no truth value: `step_model or model` raised for every model.
    from pruneflow.infer import checkpoint as ckpt_io
    from pruneflow.train import finetune

    model, meta = ckpt_io.load(dense_ckpt)
    before = model.fc2.weight.detach().clone()
    history = finetune(model, meta, 1, device="cpu", perf={"compile": True})
    assert not torch.equal(before, model.fc2.weight.detach()) and history[-1]["val_acc"] > 0.5


def test_a_reused_worker_compiles_every_new_shape(monkeypatch):
    # Sweep workers run trial after trial. Past TorchDynamo's recompile limit (8) a new model shape ran eagerly
    # with only a log line; compile_model resets TorchDynamo when the shapes change, and keeps the compiled code
    # for a model of the same shapes. The limit is lowered to 1 so that three shapes show it.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pruneflow import step as train

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(train, "_compiled_shapes", None)
    torch._dynamo.reset()
    x, graphs = torch.randn(5, 6), []
    for width in (4, 4, 3, 2):  # two trials of one shape, then two pruned shapes
        model = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
        before = counters["stats"]["unique_graphs"]
        step = train.compile_model(model, "default")
        torch.testing.assert_close(step(x), model(x))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 0, 1, 1]
    torch._dynamo.reset()


def test_channels_last_resolves_per_device():
    # NHWC on the CPU too (measured faster there: batch norm on small maps); asked-for settings win
    assert resolve_perf(None, "cpu").channels_last is True and resolve_perf(None, "mps").channels_last is False
    assert resolve_perf({"channels_last": False}, "cpu").channels_last is False
