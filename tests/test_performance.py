"""Performance paths must compute the same things: device-resident data vs the seed's torchvision pipeline,
and the resolved speed settings per device."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from pruneflow.data import Batches, SeedStyleBatches
from pruneflow.train import resolve_perf


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
    assert cpu["amp_dtype"] is None and cpu["channels_last"] is False and cpu["loader"] == "device"
    asked = resolve_perf({"precision": "bf16", "channels_last": True}, "cpu")
    assert asked["amp_dtype"] == torch.bfloat16 and asked["channels_last"] is True
    cuda = resolve_perf(None, "cuda")  # resolving needs no GPU
    assert cuda["amp_dtype"] is None and cuda["channels_last"] is True  # fp32 (TF32): measured faster at batch 64
    assert resolve_perf({"precision": "bf16"}, "cuda")["amp_dtype"] == torch.bfloat16
    assert [resolve_perf({"compile": c}, "cpu")["compile"] for c in (False, True, "max-autotune")] == \
        [None, "default", "max-autotune"]
    # the CUDA-graph modes are recorded on CUDA only; elsewhere plain eager steps (no compilation per trial)
    for mode in ("cudagraphs", "reduce-overhead"):
        assert resolve_perf({"compile": mode}, "cuda")["compile"] == mode
        assert resolve_perf({"compile": mode}, "cpu")["compile"] is None


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
    p = subprocess.run([sys.executable, "benchmarks/latency.py", "--quick", "--trials", "3"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    assert [r[2] for r in rows] == ["1", "8"] and all(float(r[6]) > 1 for r in rows)  # MACs reduced


def test_large_batch_recipe_scales_the_learning_rate_linearly():
    from pruneflow.train import get_recipe

    base, large = get_recipe("finetune"), get_recipe("finetune_bs512")
    assert large["batch_size"] == 512 and large["lr"] == pytest.approx(base["lr"] * 512 / base["batch_size"])
    assert base["batch_size"] == 64  # the seed's recipe is unchanged


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
    step = CountingStep(model)
    opt, _ = make_optimizer(model, get_recipe("finetune"), 1)
    loss, acc = train_one_epoch(model, Batches(images, labels, "mnist", 64, train=True), opt, step_model=step)
    assert step.sizes == [64, 64] and 0 <= acc <= 1 and loss > 0  # 150 = 64 + 64 + 22: the 22 ran eagerly


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


def test_small_map_weight_gradients_match_autograd(monkeypatch):
    # pruneflow.small_maps computes the weight gradient of convolutions (k > 1) with <= 4 output pixels as one matrix
    # product (oneDNN's CPU kernel is up to ~20x slower there). Same gradients as autograd's own, in float64; the
    # convolutions it must leave alone (larger maps, groups, dilation) are left alone.
    from pruneflow import small_maps
    from pruneflow.models import build_model

    taken = []
    apply = small_maps._SmallMapConv.apply
    monkeypatch.setattr(small_maps._SmallMapConv, "apply", lambda *a: taken.append(a[1].shape) or apply(*a))

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True)  # 4x4 -> 2x2: taken, with bias
            self.b = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)  # 2x2 -> 1x1 (stride 2): taken
            self.c = torch.nn.Conv2d(5, 4, 3, padding=1, bias=False)  # 1x1 -> 1x1: taken, no bias
            self.g = torch.nn.Conv2d(4, 4, 1, groups=2)  # grouped: ordinary kernel
            self.d = torch.nn.Conv2d(3, 2, 3, padding=2, dilation=2)  # dilated: ordinary kernel
            self.big = torch.nn.Conv2d(3, 2, 3, padding=1)  # 4x4 output: ordinary kernel

        def forward(self, x):
            return self.g(self.c(self.b(self.a(x)))).sum((2, 3)) @ torch.ones(4, 2, dtype=x.dtype) + \
                self.d(x).mean((2, 3)) + self.big(x).mean((2, 3))

    def small_output_convs(model, x):  # the convolutions (weight shapes, in call order) with <= 4 output pixels, k > 1
        shapes = []
        hooks = [m.register_forward_hook(lambda m, i, out: shapes.append(m.weight.shape) if out[0, 0].numel() <= 4
                                         and m.kernel_size != (1, 1) and m.groups == 1 and m.dilation == (1, 1)
                                         else None)
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return shapes

    torch.manual_seed(0)
    for model, x, n in ((Odd().double(), torch.randn(3, 3, 4, 4, dtype=torch.double, requires_grad=True), 3),
                        # the seed's stem: layer3 at 2x2, layer4 at 1x1 on 32x32 images
                        (build_model("resnet18", 10, 3, "imagenet").double(),
                         torch.randn(2, 3, 32, 32, dtype=torch.double, requires_grad=True), 8)):
        model(x).square().sum().backward()
        expected = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
        model.zero_grad(set_to_none=True)
        x.grad = None
        taken.clear()
        small_maps.SmallMapGrad(model)(x).square().sum().backward()
        got = [p.grad for p in model.parameters()] + [x.grad]
        for e, g in zip(expected, got):
            assert torch.allclose(e, g, rtol=1e-10, atol=1e-12)
        assert taken == small_output_convs(model, x) and len(taken) == n
    with torch.no_grad():  # evaluation: nothing to differentiate, the ordinary kernel
        taken.clear()
        small_maps.SmallMapGrad(model)(x)
        assert taken == []
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast (performance.precision: bf16): ordinary kernels
        small_maps.SmallMapGrad(model)(x.detach().float()).float().square().sum().backward()
    assert taken == [] and all(p.grad is not None for p in model.parameters())


def test_small_map_grad_resolves_for_uncompiled_cpu_training_only():
    assert resolve_perf(None, "cpu")["small_map_grad"] is True
    assert resolve_perf({"small_map_grad": False}, "cpu")["small_map_grad"] is False
    assert resolve_perf({"compile": True}, "cpu")["small_map_grad"] is False  # compiled steps have their own kernels
    assert resolve_perf(None, "cuda")["small_map_grad"] is False  # cuDNN has no such gap
