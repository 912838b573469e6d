"""Wide residual networks (Zagoruyko & Komodakis, 2016) for CIFAR: WRN-16-8 and WRN-28-10.

Pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) as in the authors' code and in SWAT's
``wide_resnet.py``; when a block changes the width, its 1x1 ``shortcut`` conv takes the pre-activated input.
Names: ``conv1`` (stem, 16 channels), ``layer{s}.{i}.bn1/conv1/bn2/conv2/shortcut`` (three stages of width
16k, 32k, 64k, strides 1-2-2), ``bn``/``relu`` (final pre-activation), ``avgpool``, ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = ["WideBasicBlock", "WideResNet", "wrn16_8", "wrn28_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        identity = x if self.shortcut is None else self.shortcut(act)
        return out + identity


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR.

    Args:
        depth: Total depth, ``6n + 4``.
        widen_factor: ``k``: stage widths are 16k, 32k and 64k.
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier applied on top of ``widen_factor`` (``ceil``).
        dropout: Dropout probability between the two convs of a block (0 = none; the WRN paper also uses 0.3).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        w = check_width_mult(width_mult)
        widths = [scale_channels(c, w) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        planes = widths[0]
        for s, (out, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(planes, out, stride if i == 0 else 1, dropout))
                planes = out
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def wrn16_8(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """WRN-16-8 (n=2 blocks per stage, widths 128-256-512). ``kwargs``: ``dropout``.

    Example:
        >>> wrn16_8()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return WideResNet(16, 8, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def wrn28_10(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """WRN-28-10 (n=4 blocks per stage, widths 160-320-640). ``kwargs``: ``dropout``."""
    return WideResNet(28, 10, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)
