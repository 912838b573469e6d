"""DenseNet-121 for CIFAR (pytorch-cifar / SWAT's ``densenet.py`` layout).

Growth rate 32, dense blocks of [6, 12, 24, 16] bottleneck layers (BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output
concatenated to the input), transitions BN-ReLU-conv1x1 (compression 0.5) - avg-pool 2, a 3x3 stride-1 stem conv
with 2k channels and no max-pool, then BN-ReLU-global average pool-``fc``.
Names: ``conv1``, ``dense{b}.{i}.bn1/conv1/bn2/conv2``, ``trans{b}.bn/conv/pool``, ``bn``, ``fc``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = ["DenseLayer", "Transition", "DenseNet", "densenet121"]


class DenseLayer(nn.Module):
    """Bottleneck dense layer: BN-ReLU-conv1x1 to ``4 * growth`` then BN-ReLU-conv3x3 to ``growth``; concat."""

    def __init__(self, in_planes: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, bottleneck, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2 between dense blocks."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet-BC for CIFAR.

    Args:
        blocks: Dense layers per dense block.
        growth_rate: ``k`` before ``width_mult``.
        reduction: Transition compression (output channels ``floor(reduction * c)``).
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: the growth rate becomes ``ceil(k * width_mult)``; the stem (2k) and
            bottleneck (4k) widths follow the scaled growth rate.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        growth = scale_channels(growth_rate, check_width_mult(width_mult))
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, padding=1, bias=False)
        self.num_blocks = len(blocks)
        for b, n in enumerate(blocks, start=1):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth, 4 * growth))
                planes += growth
            self.add_module(f"dense{b}", nn.Sequential(*layers))
            if b < len(blocks):
                out = int(math.floor(planes * reduction))
                self.add_module(f"trans{b}", Transition(planes, out))
                planes = out
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for b in range(1, self.num_blocks + 1):
            x = getattr(self, f"dense{b}")(x)
            if b < self.num_blocks:
                x = getattr(self, f"trans{b}")(x)
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def densenet121(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """DenseNet-121 for CIFAR (growth 32, 3x3 stem). See :class:`DenseNet`.

    Example:
        >>> densenet121()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return DenseNet((6, 12, 24, 16), 32, 0.5, num_classes=num_classes, in_channels=in_channels,
                    width_mult=width_mult, **kwargs)
