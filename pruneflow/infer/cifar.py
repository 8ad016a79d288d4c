"""The CIFAR networks pruning papers report on, defined with torch alone so ``pruneflow.infer`` rebuilds them.

- ``resnet20/32/56/110``: He et al. 2016, section 4.2: a 3x3 stem of 16 channels, three stages of n BasicBlocks
  (6n + 2 layers) of 16, 32 and 64 channels, global average pooling. Shortcuts where the shape changes are
  option B (1x1 convolution + BatchNorm, as in DepGraph's and most pruning papers' code), so channel pruning can
  change a stage's width; identity elsewhere.
- ``vgg16_bn`` / ``vgg19_bn``: the CIFAR variant (Simonyan & Zisserman's configurations D / E with BatchNorm, one
  linear classifier on 512 features), as in DepGraph's CIFAR-100 table. Max-pools round up, so 28x28 inputs
  (digits, MNIST) reach 1x1 too.
- ``mobilenet_v2``: torchvision's MobileNetV2 with CIFAR strides (the stem and the first stride-2 stage at
  stride 1: 32x32 inputs end at 4x4, not 1x1); its depthwise convolutions keep groups = channels when pruned.
"""

import torch
import torch.nn as nn

CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}  # n blocks per stage
VGGS = {"vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
        "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                     512, 512, 512, 512, "M"]}
OTHERS = ("mobilenet_v2",)
CIFAR_ARCHS = tuple(CIFAR_RESNETS) + tuple(VGGS) + OTHERS


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:  # option B: a projection where the shape changes
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, n, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarVGG(nn.Module):
    def __init__(self, cfg, num_classes=10, in_channels=3):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def cifar_mobilenet_v2(num_classes=10, in_channels=3):
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)  # stride 1 on 32x32
    model.features[2].conv[1][0].stride = (1, 1)  # the first stride-2 block at stride 1: 32x32 ends at 4x4, not 1x1
    return model


def build_cifar(arch, num_classes=10, in_channels=3):
    if arch in CIFAR_RESNETS:
        return CifarResNet(CIFAR_RESNETS[arch], num_classes, in_channels)
    if arch in VGGS:
        return CifarVGG(VGGS[arch], num_classes, in_channels)
    return cifar_mobilenet_v2(num_classes, in_channels)
