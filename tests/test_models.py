import torch

from pruneflow.models import build_model

# The 2022 report's appendix A1, verbatim.
SEED_PRINT = """SimpleCNN(
  (conv1): Conv2d(1, 16, kernel_size=(3, 3), stride=(1, 1))
  (conv2): Conv2d(16, 32, kernel_size=(3, 3), stride=(1, 1))
  (dropout1): Dropout(p=0.25, inplace=False)
  (dropout2): Dropout(p=0.5, inplace=False)
  (fc1): Linear(in_features=4608, out_features=64, bias=True)
  (fc2): Linear(in_features=64, out_features=10, bias=True)
)"""


def test_simple_cnn_matches_seed_print():
    model = build_model("simple_cnn", num_classes=10, in_channels=1)
    assert str(model) == SEED_PRINT
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_stems():
    imagenet = build_model("resnet18", num_classes=10, stem="imagenet")
    cifar = build_model("resnet18", num_classes=10, stem="cifar")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2) and hasattr(imagenet, "maxpool")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    # no max-pool module at all (not an nn.Identity, which NNI's speedup complains about)
    assert not hasattr(cifar, "maxpool") and not any(isinstance(m, torch.nn.Identity) for m in cifar.modules())
    x = torch.zeros(2, 3, 32, 32)
    assert imagenet(x).shape == cifar(x).shape == (2, 10)
    # the CIFAR stem keeps 32x32 resolution into layer1; the ImageNet stem quarters it
    feats = {}
    cifar.layer1.register_forward_hook(lambda m, i, o: feats.update(c=o.shape))
    imagenet.layer1.register_forward_hook(lambda m, i, o: feats.update(i=o.shape))
    cifar(x), imagenet(x)
    assert feats["c"][-1] == 32 and feats["i"][-1] == 8


def flop_counter_macs(model, shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math kernel: the counter does not see inside CPU's fused attention (QK^T and AV would go uncounted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


def test_mac_count_equals_torchs_flop_counter_on_every_architecture():
    """count_macs counts pruneflow's models by forward hooks (no TorchDynamo import); torch's FLOP counter is
    the reference, on every architecture and stem, dense and with uneven widths as pruning leaves them; a
    model with a module outside the known set is counted by the FLOP counter itself."""
    import sys

    from pruneflow.infer.arch import ARCHITECTURES
    from pruneflow.infer.checkpoint import _count_macs_by_hooks, count_macs

    for arch in ARCHITECTURES:
        cases = {"simple_cnn": [("imagenet", (1, 28, 28))], "resnet18": [("cifar", (3, 32, 32)), ("imagenet", (1, 28, 28))],
                 "resnet50": [("cifar", (3, 32, 32))]}.get(arch, []) + [("imagenet", (3, 32, 32))] * (arch != "simple_cnn")
        for stem, shape in cases:
            model = build_model(arch, 10, shape[0], stem)
            macs = count_macs(model, shape)
            assert model.training  # the mode is restored
            assert macs == flop_counter_macs(model, shape), (arch, stem, shape)
    # uneven widths (as channel pruning leaves them), grouped and strided convolutions, a bias-free conv
    model = build_model("resnet18", 10, 3, "cifar")
    model.layer1[0].conv1 = torch.nn.Conv2d(64, 24, 3, padding=1, bias=True)
    model.layer1[0].bn1 = torch.nn.BatchNorm2d(24)
    model.layer1[0].conv2 = torch.nn.Conv2d(24, 64, 3, padding=1, groups=8, bias=False)
    model.layer2[0].conv1 = torch.nn.Conv2d(64, 40, (3, 1), stride=2, padding=(1, 0), bias=False)
    model.layer2[0].bn1 = torch.nn.BatchNorm2d(40)
    model.layer2[0].conv2 = torch.nn.Conv2d(40, 128, (1, 3), padding=(0, 1), bias=False)
    model.fc = torch.nn.Linear(512, 7)
    assert count_macs(model, (3, 32, 32)) == flop_counter_macs(model, (3, 32, 32)) > 0
    with torch.no_grad():
        assert _count_macs_by_hooks(model, torch.zeros(1, 3, 32, 32)) == flop_counter_macs(model, (3, 32, 32))

    class Attention(torch.nn.Module):  # computes in its own forward: hooks would miss its products
        def forward(self, x):
            return x + x.flatten(2).transpose(1, 2).softmax(-1).transpose(1, 2).reshape(x.shape) @ x.transpose(-1, -2)

    odd = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), Attention())
    assert count_macs(odd, (1, 8, 8)) == flop_counter_macs(odd, (1, 8, 8)) > 4 * 9 * 64
    assert "torch._dynamo" in sys.modules  # the fallback ran the FLOP counter
