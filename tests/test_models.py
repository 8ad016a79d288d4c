import torch

from pruneflow.models import build_model

# The seed's appendix A1, verbatim.
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
