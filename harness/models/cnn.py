"""A small CNN for 8x8 one-channel digits and for fast tests (any input size)."""
from __future__ import annotations

from functools import partial

from torch import nn

from ..neurons import NQ
from ._registry import TimmMethodsMixin, register


class SmallCNN(TimmMethodsMixin, nn.Module):
    _classifier_name = "classifier.3"

    def __init__(self, num_classes=10, in_chans=1, width=32, act_layer=partial(NQ, 4, 2.0)):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), act_layer(),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), act_layer(),
            nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), act_layer(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * w, 128), act_layer(),
                                        nn.Linear(128, num_classes))
        self.num_classes, self.num_features, self.head_hidden_size = num_classes, 8 * w, 128

    def forward_features(self, x):
        return self.features(x)

    def _pre_logits(self, x):
        for layer in list(self.classifier)[:-1]:
            x = layer(x)
        return x


@register("cnn_small", first_conv="features.0", classifier="classifier.3", input_hw=(8, 8))
def cnn_small(num_classes=10, in_chans=1, width=32, act_layer=partial(NQ, 4, 2.0)):
    return SmallCNN(num_classes, in_chans, width, act_layer)
