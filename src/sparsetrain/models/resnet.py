"""ResNets: CIFAR variants (pytorch-cifar, He et al. 6n+2, TensorQuant's ResNet-14) and torchvision's ResNet-50.

One :class:`ResNet` class builds them all, so every variant uses the same, torchvision-compatible names:
``conv1``/``bn1`` (stem), ``layer{s}.{i}.conv{j}`` / ``layer{s}.{i}.bn{j}`` (blocks; ``layer2.0`` addresses a
block and ``layer2`` a stage in a recipe), ``layer{s}.{i}.downsample.0``/``.1`` (projection shortcut conv/BN)
and ``fc`` (classifier, after a global ``AdaptiveAvgPool2d(1)`` named ``avgpool``).

Variants:

* ``resnet18/34/50/101/152`` -- pytorch-cifar (kuangliu): 3x3 stride-1 stem conv (64), no max-pool,
  BasicBlock/Bottleneck stages of width 64-128-256-512, projection shortcuts (option B) where the shape
  changes, stride on the 3x3 conv of a Bottleneck. This is also Ye et al.'s CIFAR ResNet (3x3/1 first layer,
  4x4 average pool before the FC, which equals global pooling for 32x32 inputs).
* ``resnet20/32/56`` -- He et al. (2016), section 4.2: 6n+2 layers, 3x3 stem (16), three stages of n
  BasicBlocks with 16-32-64 channels. Shortcuts default to the paper's option A (identity; stride-2
  subsampling and zero-padding of the new channels, parameter-free); ``shortcut="B"`` uses 1x1 projections.
* ``resnet14`` -- TensorQuant's ResNet-14 for CIFAR-100 (Loroch et al., 2018, Table 3): the stem conv, two blocks
  ("block1", "block2") of two bottleneck units each (three convs per unit, TF-slim resnet_v1 ``bottleneck``) and
  the logits layer: 1 + 2*2*3 + 1 = 14 weight layers. Unit depths are slim's (256/64 and 512/128); the stem is the
  CIFAR 3x3/1 conv (64) used above, as the paper gives no stem for its CIFAR model. ``style="he"`` builds the
  He et al. 6n+2 network with n=2 instead.
* ``resnet50_imagenet`` -- torchvision's ``resnet50`` exactly (ResNet v1.5: 7x7/2 stem, 3x3/2 max-pool, stride
  on the Bottleneck's 3x3 conv); its ``state_dict`` keys are torchvision's (320 entries, 25,557,032 parameters
  with 1000 classes).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ShortcutA",
    "ResNet",
    "resnet14",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet152",
    "resnet50_imagenet",
]

_SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """He et al.'s option-A shortcut: subsample spatially, zero-pad the extra channels (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        # Pad symmetrically in the channel dimension, like the reference CIFAR implementations.
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


def _shortcut(in_planes: int, out_planes: int, stride: int, kind: str) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    if kind == "A":
        return ShortcutA(in_planes, out_planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (He et al., 2016). ``mid_planes`` must equal ``out_planes``."""

    expansion = 1

    def __init__(self, in_planes: int, mid_planes: int, out_planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.downsample = _shortcut(in_planes, out_planes, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 conv-BN bottleneck with the stride on the 3x3 conv (ResNet v1.5, as torchvision)."""

    expansion = 4

    def __init__(self, in_planes: int, mid_planes: int, out_planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _shortcut(in_planes, out_planes, stride, shortcut)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """Generic ResNet.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Number of blocks per stage; stage ``s`` is ``layer{s}`` and all but the first start with stride 2.
        widths: Base (bottleneck) width per stage before ``width_mult``; a stage outputs
            ``ceil(width * expansion * width_mult)`` channels.
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool) or ``"imagenet"`` (7x7 stride-2 conv + 3x3/2 max-pool).
        stem_width: Output channels of the stem conv before ``width_mult``.
        shortcut: ``"B"`` (1x1 conv + BN projection where the shape changes) or ``"A"`` (parameter-free identity
            with subsampling and zero-padding).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem: str = "cifar",
        stem_width: int = 64,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}; valid choices: cifar, imagenet")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; valid choices: {', '.join(_SHORTCUTS)}")
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must have the same length")
        w = check_width_mult(width_mult)
        planes = scale_channels(stem_width, w)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else None
        self.num_stages = len(layers)
        for s, (n, width) in enumerate(zip(layers, widths), start=1):
            mid = scale_channels(width, w)
            out = scale_channels(width * block.expansion, w)
            blocks = []
            for i in range(n):
                stride = 2 if (s > 1 and i == 0) else 1
                blocks.append(block(planes, mid, out, stride=stride, shortcut=shortcut))
                planes = out
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_WIDE = (64, 128, 256, 512)


def _cifar_resnet(block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], **kwargs: Any) -> ResNet:
    return ResNet(block, layers, _WIDE, stem="cifar", stem_width=64, **kwargs)


def _he_resnet(n: int, shortcut: str = "A", **kwargs: Any) -> ResNet:
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), stem="cifar", stem_width=16, shortcut=shortcut, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet18(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-18 for CIFAR (pytorch-cifar layout, BasicBlock [2, 2, 2, 2]).

    Example:
        >>> resnet18()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _cifar_resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels,
                         width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet34(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-34 for CIFAR (pytorch-cifar layout, BasicBlock [3, 4, 6, 3])."""
    return _cifar_resnet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels,
                         width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet50(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-50 for CIFAR (pytorch-cifar layout, Bottleneck [3, 4, 6, 3]). ImageNet: ``resnet50_imagenet``."""
    return _cifar_resnet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels,
                         width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet101(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-101 for CIFAR (pytorch-cifar layout, Bottleneck [3, 4, 23, 3])."""
    return _cifar_resnet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, in_channels=in_channels,
                         width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet152(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-152 for CIFAR (pytorch-cifar layout, Bottleneck [3, 8, 36, 3])."""
    return _cifar_resnet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, in_channels=in_channels,
                         width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet20(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-20 (He et al. CIFAR, n=3). ``shortcut="A"`` (default, as the paper) or ``"B"``.

    Example:
        >>> resnet20()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _he_resnet(3, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet32(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-32 (He et al. CIFAR, n=5). ``shortcut="A"`` (default) or ``"B"``."""
    return _he_resnet(5, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet56(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """ResNet-56 (He et al. CIFAR, n=9). ``shortcut="A"`` (default) or ``"B"``."""
    return _he_resnet(9, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def resnet14(
    num_classes: int = 10,
    in_channels: int = 3,
    width_mult: float = 1.0,
    style: str = "tensorquant",
    **kwargs: Any,
) -> nn.Module:
    """ResNet-14 for CIFAR-100 as in TensorQuant (Loroch et al., 2018); see the module docstring.

    Args:
        num_classes: Output classes (the paper trains on CIFAR-100: pass 100).
        in_channels: Input image channels.
        width_mult: Depth multiplier.
        style: ``"tensorquant"`` (default): stem + 2 blocks x 2 bottleneck units + logits, blocks ``layer1``
            (= slim's block1, 256 channels) and ``layer2`` (= block2, 512 channels); units are ``layer{s}.{i}``.
            ``"he"``: He et al.'s 6n+2 CIFAR ResNet with n=2 (BasicBlocks, 16-32-64, option-A shortcuts).
        **kwargs: Passed to :class:`ResNet` (e.g. ``shortcut``).

    Example:
        >>> resnet14(num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    if style == "tensorquant":
        return ResNet(Bottleneck, (2, 2), (64, 128), num_classes=num_classes, in_channels=in_channels,
                      width_mult=width_mult, stem="cifar", stem_width=64, **kwargs)
    if style == "he":
        return _he_resnet(2, num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)
    raise ValueError(f"unknown resnet14 style {style!r}; valid choices: tensorquant, he")


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 224, 224), num_classes=1000)
def resnet50_imagenet(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any
) -> nn.Module:
    """torchvision's ResNet-50 (v1.5) for 224x224 inputs; ``state_dict`` keys match ``torchvision.models.resnet50``.

    Pass ``num_classes=1000`` for the ImageNet head (and for loading torchvision checkpoints).

    Example:
        >>> resnet50_imagenet(num_classes=1000)(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), _WIDE, num_classes=num_classes, in_channels=in_channels,
                  width_mult=width_mult, stem="imagenet", stem_width=64, **kwargs)
