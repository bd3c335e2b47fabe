"""VGG-16 for CIFAR as in the QCFS authors' code: conv(bias) -> BN -> act, AvgPool
instead of MaxPool, classifier 512 -> 4096 -> 4096 -> classes (about 34M parameters)."""
from __future__ import annotations

from functools import partial

from torch import nn

from ..neurons import NQ
from ._registry import TimmMethodsMixin, register

_CFG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


class VGG(TimmMethodsMixin, nn.Module):
    def __init__(self, cfg, num_classes=10, in_chans=3, dropout=0.0, act_layer=partial(NQ, 4, 8.0)):
        super().__init__()
        act = act_layer
        drop = (lambda: [nn.Dropout(dropout)]) if dropout > 0 else (lambda: [])
        stages, c = [], in_chans
        for widths in cfg:
            layers = []
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), act(), *drop()]
                c = w
            layers.append(nn.AvgPool2d(2, 2))
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c, 4096), act(), *drop(),
            nn.Linear(4096, 4096), act(), *drop(),
            nn.Linear(4096, num_classes),
        )
        self._classifier_name = f"classifier.{len(self.classifier) - 1}"
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, c, 4096
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return self.features(x)

    def _pre_logits(self, x):
        for layer in list(self.classifier)[:-1]:
            x = layer(x)
        return x


@register("vgg16", first_conv="features.0.0", classifier="classifier.5")
def vgg16(num_classes=10, in_chans=3, dropout=0.0, act_layer=partial(NQ, 4, 8.0)):
    return VGG(_CFG16, num_classes, in_chans, dropout, act_layer)
