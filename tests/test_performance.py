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
    assert cpu["amp_dtype"] is None and cpu["channels_last"] is True and cpu["loader"] == "device"
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


def test_a_reused_worker_compiles_every_new_shape(monkeypatch):
    # Sweep workers run trial after trial. Past TorchDynamo's recompile limit (8) a new model shape ran eagerly
    # with only a log line; compile_model resets TorchDynamo when the shapes change, and keeps the compiled code
    # for a model of the same shapes. The limit is lowered to 1 so that three shapes show it.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pruneflow import train

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


def test_small_map_convolutions_match_conv2d(monkeypatch):
    # pruneflow.cpu_kernels computes convolutions whose input has fewer pixels than the kernel has taps as one dense
    # matrix product (oneDNN's CPU kernels are up to ~25x slower there). Same outputs and gradients as conv2d's own,
    # in float64 and both memory formats; exactly those convolutions take it (found independently by forward hooks).
    from pruneflow import cpu_kernels
    from pruneflow.models import build_model

    taken = []
    dense = cpu_kernels.dense_conv2d
    monkeypatch.setattr(cpu_kernels, "dense_conv2d", lambda *a: taken.append(a[1].shape) or dense(*a))

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True)  # 4x4 input (16 >= 9 taps): conv2d
            self.b = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)  # 2x2 -> 1x1 (stride 2, bias): taken
            self.c = torch.nn.Conv2d(5, 4, 3, padding=1, bias=False)  # 1x1 -> 1x1: taken, no bias
            self.e = torch.nn.Conv2d(4, 4, (1, 3), padding=(0, 1))  # 1x2 map, 1x3 kernel: taken
            self.g = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)  # grouped, 1x2 map: conv2d
            self.d = torch.nn.Conv2d(5, 2, 3, padding=2, dilation=2)  # dilated, 1x1 map: conv2d
            self.p = torch.nn.Conv2d(6, 3, 1)  # 1x1 kernel on 2x2 (4 >= 1 tap): conv2d
            # 5x5 kernel on 4x4 (16 < 25 taps): taken; pixels 3 rows apart meet through padding only
            self.f = torch.nn.Conv2d(3, 2, 5, padding=2)

        def forward(self, x):
            a = self.a(x)
            b = self.b(a)
            e = self.e(torch.cat([self.c(b)] * 2, 3))  # 1x1 -> 1x2
            return self.g(e).sum((2, 3)) @ torch.ones(4, 2, dtype=x.dtype) + self.p(a).mean((1, 2, 3))[:, None] + \
                self.d(b).mean((2, 3)) + self.f(x).mean((2, 3))

    def fewer_pixels_than_taps(model, x):  # the convolutions (weight shapes, in call order) that must take it
        shapes = []
        hooks = [m.register_forward_hook(lambda m, i, out: shapes.append(m.weight.shape)
                                         if i[0][0, 0].numel() < m.kernel_size[0] * m.kernel_size[1]
                                         and m.groups == 1 and m.dilation == (1, 1) else None)
                 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return shapes

    torch.manual_seed(0)
    for model, x, n in ((Odd().double(), torch.randn(3, 3, 4, 4, dtype=torch.double), 4),
                        # the seed's stem: layer3 at 2x2, layer4 at 1x1 on 32x32 images (its first conv is 4x4 -> 2x2)
                        (build_model("resnet18", 10, 3, "imagenet").double(),
                         torch.randn(2, 3, 32, 32, dtype=torch.double), 7)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=fmt)
            xf = x.detach().contiguous(memory_format=fmt).requires_grad_()
            out = model(xf)
            out.square().sum().backward()
            expected = [out.detach()] + [p.grad.clone() for p in model.parameters()] + [xf.grad.clone()]
            model.zero_grad(set_to_none=True)
            xf.grad = None
            taken.clear()
            out = cpu_kernels.CpuKernels(model)(xf)
            out.square().sum().backward()
            got = [out.detach()] + [p.grad for p in model.parameters()] + [xf.grad]
            for e, g in zip(expected, got):  # float64 rounding, amplified by batch norm over a few pixels: ~1e-9
                assert float((e - g).abs().max()) <= 1e-8 * float(e.abs().max())
            assert taken == fewer_pixels_than_taps(model, xf) and len(taken) == n
            model.zero_grad(set_to_none=True)
    with torch.no_grad():  # evaluation (train.fit uses it there too): the same outputs
        taken.clear()
        e, g = model(x), cpu_kernels.CpuKernels(model)(x)
        assert float((e - g).abs().max()) <= 1e-8 * float(e.abs().max()) and len(taken) == 7
    model.float()
    taken.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast (performance.precision: bf16): conv2d
        cpu_kernels.CpuKernels(model)(x.float()).float().square().sum().backward()
    assert taken == [] and all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):  # conv2d's own message for bad shapes
        cpu_kernels.CpuKernels(torch.nn.Conv2d(3, 4, 3))(torch.randn(1, 3, 2, 2))


def test_winograd_convolutions_match_conv2d(monkeypatch):
    # pruneflow.winograd: 3x3 stride-1 convolutions by F(2x2, 3x3) with a hand-written backward pass. Same outputs
    # and input, weight and bias gradients as conv2d's own (float64: rounding only; float32: to 1e-4), for odd
    # channel counts, rectangular maps, both memory formats; only training convolutions of the measured shapes take it.
    import platform

    from pruneflow import cpu_kernels, winograd

    def conv_and_grads(conv, x, w, b, gy, wrt):
        y = conv(x, w, b)
        return [y.detach()] + list(torch.autograd.grad(y, wrt, gy))

    def reference(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, padding=1)

    torch.manual_seed(0)
    for (n, c, k, h, wd), bias in (((2, 5, 7, 8, 6), True), ((3, 4, 6, 4, 4), False), ((1, 3, 2, 2, 10), True)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(n, c, h, wd, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_()
            w = torch.randn(k, c, 3, 3, dtype=torch.double, requires_grad=True)
            b = torch.randn(k, dtype=torch.double, requires_grad=True) if bias else None
            gy = torch.randn(n, k, h, wd, dtype=torch.double)
            for wrt in ([x, w] + ([b] if bias else []), [x], [w]):  # all gradients, then the input's or weight's alone
                expected, got = (conv_and_grads(f, x, w, b, gy, wrt) for f in (reference, winograd.winograd_conv2d))
                for e, g in zip(expected, got):
                    assert e.shape == g.shape and float((e - g).abs().max()) <= 1e-12 * float(e.abs().max())
            assert got[0].is_contiguous(memory_format=fmt)  # the memory format conv2d returns
            x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
            for e, g in zip(conv_and_grads(reference, x, w, None, gy, [x, w]),
                            conv_and_grads(winograd.winograd_conv2d, x32, w32, None, gy.float(), [x32, w32])):
                assert float((e - g.double()).abs().max()) <= 1e-4 * float(e.abs().max())

    taken = []
    fast = cpu_kernels.winograd_conv2d
    monkeypatch.setattr(cpu_kernels, "winograd_conv2d", lambda *a: taken.append(tuple(a[1].shape)) or fast(*a))
    conv = torch.nn.Conv2d
    model = torch.nn.Sequential(conv(128, 128, 3, padding=1),  # 16x16, 128 channels: taken
                                conv(128, 256, 3, stride=2, padding=1),  # strided: conv2d
                                conv(256, 256, 3, padding=1, bias=False),  # 8x8, 256 channels: taken
                                conv(256, 64, 3, padding=1),  # 64 channels out: conv2d (measured no faster)
                                conv(64, 64, 3, padding=1)).double()  # 64 channels: conv2d
    # batch 16: at least 1,024 (image, pixel) rows on the 8x8 maps too (winograd.MIN_ROWS)
    x = torch.randn(16, 128, 16, 16, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    expected.square().sum().backward()
    expected = [expected.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = cpu_kernels.CpuKernels(model)(x)
    out.square().sum().backward()
    for e, g in zip(expected, [out.detach()] + [p.grad for p in model.parameters()]):
        assert float((e - g).abs().max()) <= 1e-10 * float(e.abs().max())
    assert taken == [(128, 128, 3, 3), (256, 256, 3, 3)]
    taken.clear()
    with torch.no_grad():  # evaluation: forward alone measured no faster, oneDNN's
        assert torch.equal(cpu_kernels.CpuKernels(model)(x), model(x)) and taken == []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: conv2d's own casts
        cpu_kernels.CpuKernels(model.float())(x.float()).float().sum().backward()
    assert taken == []
    cpu_kernels.CpuKernels(model)(x[:4].float()).sum().backward()  # batch 4: 16x16 maps only (1,024 rows)
    assert taken == [(128, 128, 3, 3)]
    # one torch thread (a sweep trial's) takes Winograd from fewer channels than two (winograd.MIN_CHANNELS)
    for (c, hw), per_threads in {(96, 16): (True, False), (128, 8): (True, False), (160, 4): (True, False),
                                 (80, 16): (False, False), (112, 16): (True, True), (224, 4): (True, True)}.items():
        args = ((64, c, hw, hw), (c, c, 3, 3), (1, 1), (1, 1))
        assert (winograd.uses_winograd(*args, threads=1), winograd.uses_winograd(*args, threads=2)) == per_threads
        assert winograd.uses_winograd(*args, threads=8) == per_threads[1]  # unmeasured: the 2-thread table
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert winograd.uses_winograd((64, 96, 16, 16), (96, 96, 3, 3), (1, 1), (1, 1))  # the process's threads
    finally:
        torch.set_num_threads(threads)
    # glibc (Linux): malloc keeps freed large blocks for the next step; elsewhere nothing to tune
    assert winograd.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_cpu_dropout_keeps_the_distribution_and_only_trains(monkeypatch):
    # cpu_kernels.dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p), gradients through
    # the same mask; only training-mode, out-of-place dropout with 0 < p < 1 takes it (F.dropout's own otherwise)
    from pruneflow import cpu_kernels
    from pruneflow.models import build_model

    torch.manual_seed(0)
    x = torch.randn(64, 32, 12, 12, requires_grad=True)
    for p in (0.25, 0.5):
        y = cpu_kernels.dropout(x, p)
        kept = y != 0
        assert abs(float(kept.float().mean()) - (1 - p)) < 0.01  # 294,912 draws: std ~0.001
        assert torch.allclose(y[kept], x[kept] / (1 - p))
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert torch.equal(g, kept.float() / (1 - p))
    taken = []
    drop = cpu_kernels.dropout
    monkeypatch.setattr(cpu_kernels, "dropout", lambda *a: taken.append(a[1]) or drop(*a))
    model = build_model("simple_cnn", 10, 1, "cifar")
    images = torch.randn(8, 1, 28, 28)
    cpu_kernels.CpuKernels(model.train())(images).sum().backward()
    assert taken == [0.25, 0.5]  # the seed's two dropout layers
    taken.clear()
    out = cpu_kernels.CpuKernels(model.eval())(images)
    assert taken == [] and torch.equal(out, model(images))  # evaluation: no dropout at all
    assert torch.equal(cpu_kernels.CpuKernels(torch.nn.Dropout(0.0))(x), x)  # p = 0: the input itself
    assert not cpu_kernels.CpuKernels(torch.nn.Dropout(1.0))(x).any()  # p = 1: all dropped
    cpu_kernels.CpuKernels(torch.nn.Dropout(0.5, inplace=True))(x.detach().clone())
    assert taken == []


def test_cpu_kernels_and_channels_last_resolve_per_device():
    assert resolve_perf(None, "cpu")["cpu_kernels"] is True
    assert resolve_perf({"cpu_kernels": False}, "cpu")["cpu_kernels"] is False
    assert resolve_perf({"compile": True}, "cpu")["cpu_kernels"] is False  # compiled steps have their own kernels
    assert resolve_perf(None, "cuda")["cpu_kernels"] is False  # cuDNN has no such gap
    # NHWC on the CPU too (measured faster there: batch norm on small maps); asked-for settings win
    assert resolve_perf(None, "cpu")["channels_last"] is True and resolve_perf(None, "mps")["channels_last"] is False
    assert resolve_perf({"channels_last": False}, "cpu")["channels_last"] is False
