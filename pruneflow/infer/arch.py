"""The architectures pruneflow trains, prunes and rebuilds from checkpoints.

Torch + torchvision only: ``pruneflow.infer`` rebuilds checkpoints with this module on machines that have
nothing else installed. ``pruneflow.models`` re-exports it for the rest of the package.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .cifar import CIFAR_ARCHS, build_cifar
from .vit import VIT_ARCHS, build_vit


class SimpleCNN(nn.Module):
    """The 2022 report's MNIST network (its appendix A1); ``print(model)`` matches the 2022 report's text.

    The forward pass derives fc1's input from the tensor, so a channel-pruned conv2 just works.
    """

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(4608, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


@functools.cache
def cifar_resnet_class():
    """torchvision's ResNet whose graph has no max-pool (the CIFAR stem); torchvision is imported lazily
    because it costs seconds and SimpleCNN checkpoints do not need it."""
    import torchvision

    class CifarResNet(torchvision.models.ResNet):
        def _forward_impl(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return CifarResNet


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHITECTURES = ("simple_cnn",) + RESNETS + CIFAR_ARCHS + VIT_ARCHS
STEMS = ("imagenet", "cifar")


def build_model(arch, num_classes=10, in_channels=3, stem="imagenet", image_size=32, vit=None):
    """A freshly initialised dense model.

    ``stem='imagenet'`` is torchvision's 7x7/2 conv + max-pool (what the 2022 report used on CIFAR-10);
    ``stem='cifar'`` is a 3x3/1 conv and no pool, the usual choice for 32x32 inputs. The CIFAR stem drops
    the max-pool module entirely rather than replacing it with nn.Identity, which NNI's speedup trips on.
    ``image_size`` and ``vit`` (a size, pruneflow.infer.vit.VIT_DEFAULT's keys) apply to ViTs only.
    """
    if arch == "simple_cnn":
        return SimpleCNN(in_channels=in_channels, num_classes=num_classes)
    if arch in CIFAR_ARCHS:  # CIFAR-sized by design: the stem setting does not apply
        return build_cifar(arch, num_classes, in_channels)
    if arch in VIT_ARCHS:
        return build_vit(vit, num_classes, in_channels, image_size)
    if arch not in RESNETS:
        raise UserError(f"unknown model {arch!r}; valid models: {', '.join(ARCHITECTURES)}")
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if stem == "cifar" or in_channels != 3:
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=k, stride=s, padding=p, bias=False)
    if stem == "cifar":
        model.__class__ = cifar_resnet_class()
        del model.maxpool
    return model


