"""The whole training step as one CUDA graph (pruneflow.step.StepGraph): it must train exactly as eager steps do.

CUDA graphs need a CUDA device: these tests skip on the CI machine and run where a GPU is lent
(`python -m pytest tests/test_step_graph.py`; docs/benchmarks.md names the card and the outcome)."""

import copy

import pytest
import torch

from pruneflow.infer.data import Batches
from pruneflow.models import build_model
from pruneflow.step import Perf, make_step, resolve_perf
from pruneflow.train import fit, get_recipe, make_optimizer, train_one_epoch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture
def same_kernels():
    """The same kernels eagerly and in the graph: no cuDNN autotuning, no TF32, deterministic algorithms."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags


def cifar_batches(train=True, n=64 * 7 + 16):
    """7 full batches of 64 and a short one of 16 (which runs eagerly between replays), CIFAR-shaped, on CUDA;
    every instance shuffles and augments identically (seeded per epoch)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Batches(images, labels, "cifar10", 64, "cuda", train=train, channels_last=True)


def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18", 10, 3, "cifar").cuda().to(memory_format=torch.channels_last)


def assert_same_state(a, b, rtol=1e-4, atol=1e-5):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def train_epochs(model, mode, masks=None, epochs=2, recipe="cifar_resnet", amp_dtype=None):
    perf = Perf(amp_dtype=amp_dtype, channels_last=True, compile=mode)
    opt, _ = make_optimizer(model, get_recipe(recipe), 10, perf)
    step = make_step(model, opt, perf, masks)
    batches = cifar_batches()
    return [train_one_epoch(model, batches, step) for _ in range(epochs)], step.graph


@cuda
def test_recorded_steps_train_as_eager_steps(same_kernels):
    # SGD with momentum and weight decay (buffers made during the warm-up), BatchNorm's running statistics,
    # masks that keep pruned weights at zero, the short last batch run eagerly between replays, two epochs
    eager = resnet18()
    recorded = copy.deepcopy(eager)
    keep = (torch.rand(eager.fc.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float().cuda()
    history, none = train_epochs(eager, None, {eager.fc.weight: keep})
    graph_history, graph = train_epochs(recorded, "cudagraphs", {recorded.fc.weight: keep})
    assert none is None and graph is not None
    assert graph.captures == 1 and not graph.failed
    assert_same_state(eager, recorded)
    assert (recorded.fc.weight[keep == 0] == 0).all()
    for (loss, acc), (graph_loss, graph_acc) in zip(history, graph_history):
        assert graph_loss == pytest.approx(loss, rel=1e-4) and graph_acc == pytest.approx(acc, abs=1e-9)


@cuda
def test_bf16_autocast_inside_the_recorded_step_trains_as_eager_bf16(same_kernels):
    # bf16 autocast recorded in the step (the fastest ResNet rows in docs/benchmarks.md, run 5): the casts of the
    # weights must be recorded, not cached from the capture, or every replay would compute with stale weights
    eager = resnet18()
    recorded = copy.deepcopy(eager)
    history, _ = train_epochs(eager, None, amp_dtype=torch.bfloat16)
    graph_history, graph = train_epochs(recorded, "cudagraphs", amp_dtype=torch.bfloat16)
    assert graph.captures == 1 and not graph.failed
    assert_same_state(eager, recorded, rtol=1e-3, atol=1e-4)
    for (loss, _), (graph_loss, _) in zip(history, graph_history):
        assert graph_loss == pytest.approx(loss, rel=1e-3)


@cuda
def test_a_new_learning_rate_records_the_step_again(same_kernels):
    # fit with the 2022 report's MNIST recipe: Adadelta (capturable: its step counts live on the device) with the
    # learning rate x0.7 every epoch; a graph that kept epoch 1's rate would train epochs 2-3 with the wrong one
    eager = resnet18()
    recorded = copy.deepcopy(eager)
    recipe = get_recipe("mnist")
    for model, mode in ((eager, None), (recorded, "cudagraphs")):
        perf = Perf(channels_last=True, compile=mode)
        history = fit(model, cifar_batches(), cifar_batches(train=False), recipe, 3, perf)
        assert [h["lr"] for h in history] == pytest.approx([1.0, 0.7, 0.49])
    assert_same_state(eager, recorded)


@cuda
def test_reduce_overhead_records_inductors_kernels():
    # 'reduce-overhead': the model compiled by Inductor (no CUDA graphs of its own) inside the recorded step;
    # Inductor's fused kernels round differently from eager ones, hence the looser tolerance
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).cuda()
    recorded = copy.deepcopy(eager)
    train_epochs(eager, None, epochs=1, recipe="finetune")
    [(loss, acc)], graph = train_epochs(recorded, "reduce-overhead", epochs=1, recipe="finetune")
    assert graph.captures == 1 and not graph.failed
    assert_same_state(eager, recorded, rtol=1e-3, atol=1e-3)
    assert 0 < loss < 10 and 0 <= acc <= 1


def test_resolve_perf_keeps_graph_modes_on_cuda_only():
    assert resolve_perf(dict(compile="cudagraphs"), "cuda").compile == "cudagraphs"
    assert resolve_perf(dict(compile="reduce-overhead"), "cpu").compile is None


class SyncingNet(torch.nn.Module):
    """A forward that reads a value back to the CPU each step (data-dependent Python): it cannot be recorded."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        if h.sum().item() < 0:  # never true after a ReLU, but the CPU must wait to know
            h = -h
        return self.fc(h)


@cuda
def test_a_step_that_cannot_be_recorded_trains_eagerly(same_kernels, capsys):
    # last in this file: a failed capture must leave the device usable and the training unchanged
    torch.manual_seed(0)
    eager = SyncingNet().cuda().to(memory_format=torch.channels_last)
    recorded = copy.deepcopy(eager)
    train_epochs(eager, None, recipe="finetune")
    _, graph = train_epochs(recorded, "cudagraphs", recipe="finetune")
    assert graph.failed and graph.captures == 0
    err = capsys.readouterr().err
    assert err.count("recording the training step as a CUDA graph failed") == 1, err
    assert_same_state(eager, recorded)
