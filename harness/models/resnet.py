"""CIFAR ResNets as in the QCFS authors' code: 3x3 stem (stride 1, no max-pool),
basic blocks with the activation after the residual add, shortcut identity or
1x1 conv + BN. ResNet-18: 64-512 channels, 17 activations. ResNet-20: 16/32/64
channels, 19 activations."""
from __future__ import annotations

from functools import partial

from torch import nn

from ..neurons import NQ
from ._registry import TimmMethodsMixin, register


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = act_layer()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(TimmMethodsMixin, nn.Module):
    _classifier_name = "fc"

    def __init__(self, widths, blocks, num_classes=10, in_chans=3, act_layer=partial(NQ, 4, 8.0)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), act_layer())
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, act_layer))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, c, c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def _pre_logits(self, x):
        return self.flatten(self.pool(x))


@register("resnet18", first_conv="stem.0", classifier="fc")
def resnet18(num_classes=10, in_chans=3, act_layer=partial(NQ, 4, 8.0)):
    return CifarResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, in_chans, act_layer)


@register("resnet20", first_conv="stem.0", classifier="fc")
def resnet20(num_classes=10, in_chans=3, act_layer=partial(NQ, 4, 8.0)):
    return CifarResNet([16, 32, 64], [3, 3, 3], num_classes, in_chans, act_layer)
