"""Model zoo: the 2022 report's SimpleCNN and torchvision ResNets (CIFAR or ImageNet stem).

The definitions live in ``pruneflow.infer.arch`` because portable inference must rebuild them with torch
alone; this module is the name the rest of the package uses.
"""

from .infer.arch import ARCHITECTURES, RESNETS, STEMS, SimpleCNN, build_model  # noqa: F401
from .infer.vit import VIT_ARCHS


def default_prune_targets(arch):
    """(op_types, excluded layer names) the 2022 report used: SimpleCNN prunes Conv2d+Linear but keeps the
    classifier fc2; ResNets prune Conv2d only (their classifier fc is a Linear, so it is untouched)."""
    if arch == "simple_cnn":
        return ("Conv2d", "Linear"), ("fc2",)
    if arch.startswith("vgg"):
        return ("Conv2d",), ("classifier",)
    if arch == "mobilenet_v2":
        return ("Conv2d",), ("classifier.1",)
    if arch in VIT_ARCHS:  # the patch embedding, attention and MLP; not the classifier
        return ("Conv2d", "Linear"), ("heads.head",)
    return ("Conv2d",), ("fc",)
