"""MobileNet v1 (Howard et al., 2017) for CIFAR, as in Ye et al. (2019) and pytorch-cifar.

Ye et al. change the first conv's stride to 1 and the last pooling to a 2x2 average pool (a 32x32 input reaches
the classifier as a 1024x2x2 map, so this equals the global ``AdaptiveAvgPool2d(1)`` used here).
Stem ``conv1`` 3x3/1 (32) - BN - ReLU, then 13 depthwise-separable blocks ``layers.{i}``: ``conv1`` (3x3
depthwise, ``groups=channels``) - ``bn1`` - ReLU - ``conv2`` (1x1 pointwise) - ``bn2`` - ReLU; widths
64, 128/2, 128, 256/2, 256, 512/2, 5x512, 1024/2, 1024 (``/2`` = stride 2); then ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = ["DepthwiseSeparable", "MobileNetV1", "mobilenet_v1"]

# (output channels, stride) of the 13 depthwise-separable blocks.
_CFG: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU followed by 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, kernel_size=3, stride=stride, padding=1, groups=in_planes,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class MobileNetV1(nn.Module):
    """MobileNet v1 for 32x32 inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: MobileNet's width multiplier: every conv's channels become ``ceil(c * width_mult)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        w = check_width_mult(width_mult)
        planes = scale_channels(32, w)
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        blocks = []
        for c, stride in _CFG:
            out = scale_channels(c, w)
            blocks.append(DepthwiseSeparable(planes, out, stride))
            planes = out
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def mobilenet_v1(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """MobileNet v1 for CIFAR (stride-1 stem). See :class:`MobileNetV1`.

    Example:
        >>> mobilenet_v1()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)
