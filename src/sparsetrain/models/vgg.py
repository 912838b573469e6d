"""VGG-11/16/19 with batch normalisation for 32x32 (CIFAR) inputs.

Layer names follow the VGG stages: ``block{s}.conv{j}`` / ``block{s}.bn{j}`` / ``block{s}.relu{j}`` and a 2x2
max-pool ``block{s}.pool`` closing each of the 5 stages (so ``block3`` addresses a whole stage in a recipe).
The first conv is ``block1.conv1``. After the five pools a 32x32 image is a 512x1x1 map; an
``AdaptiveAvgPool2d(1)`` (the identity then) feeds the classifier head.

Heads (``head=``):

* ``"swat"`` (default): ``fc1`` 512->4096 - ReLU - dropout - ``fc2`` 4096->4096 - ReLU - dropout - ``fc``, the head
  of the VGG in SWAT's released CIFAR code (``models/vgg.py``), i.e. the model behind the paper's VGG-16 rows.
* ``"classic"``: the same layout with 512 hidden units (the common VGG-CIFAR 512-512-classes head).
* ``"linear"``: a single ``fc`` 512->classes (pytorch-cifar).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = ["VGG", "VGG_CONFIGS", "vgg11_bn", "vgg16_bn", "vgg19_bn"]

# Conv widths per stage; every stage ends with a 2x2 max-pool.
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
_HEAD_HIDDEN = {"swat": 4096, "classic": 512, "linear": 0}


class VGG(nn.Module):
    """VGG with BN for CIFAR.

    Args:
        config: One of ``VGG_CONFIGS``' keys.
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        head: ``"swat"``, ``"classic"`` or ``"linear"`` (see the module docstring).
        scale_hidden_fc: Also scale the hidden FC width of the head by ``width_mult``.
        dropout: Dropout probability in the head.
    """

    def __init__(
        self,
        config: str,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        head: str = "swat",
        scale_hidden_fc: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"unknown VGG config {config!r}; valid choices: {', '.join(VGG_CONFIGS)}")
        if head not in _HEAD_HIDDEN:
            raise ValueError(f"unknown VGG head {head!r}; valid choices: {', '.join(_HEAD_HIDDEN)}")
        w = check_width_mult(width_mult)
        cin = in_channels
        for s, widths in enumerate(VGG_CONFIGS[config], start=1):
            stage: OrderedDict[str, nn.Module] = OrderedDict()
            for j, c in enumerate(widths, start=1):
                cout = scale_channels(c, w)
                stage[f"conv{j}"] = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
                stage[f"bn{j}"] = nn.BatchNorm2d(cout)
                stage[f"relu{j}"] = nn.ReLU()
                cin = cout
            stage["pool"] = nn.MaxPool2d(2)
            self.add_module(f"block{s}", nn.Sequential(stage))
        self.num_stages = len(VGG_CONFIGS[config])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = _HEAD_HIDDEN[head]
        if hidden:
            hidden = scale_channels(hidden, w) if scale_hidden_fc else hidden
            self.fc1 = nn.Linear(cin, hidden)
            self.relu1 = nn.ReLU()
            self.drop1 = nn.Dropout(dropout)
            self.fc2 = nn.Linear(hidden, hidden)
            self.relu2 = nn.ReLU()
            self.drop2 = nn.Dropout(dropout)
            cin = hidden
        self.fc = nn.Linear(cin, num_classes)
        self._hidden = bool(hidden)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"block{s}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        if self._hidden:
            x = self.drop1(self.relu1(self.fc1(x)))
            x = self.drop2(self.relu2(self.fc2(x)))
        return self.fc(x)


@register_model(first_conv="block1.conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """VGG-11 with BN for CIFAR. See :class:`VGG` for ``kwargs`` (``head``, ``dropout``, ...).

    Example:
        >>> vgg11_bn(head="linear")(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG("vgg11", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="block1.conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """VGG-16 with BN for CIFAR (SWAT's model). See :class:`VGG` for ``kwargs``.

    Example:
        >>> vgg16_bn(num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    return VGG("vgg16", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="block1.conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """VGG-19 with BN for CIFAR. See :class:`VGG` for ``kwargs``.

    Example:
        >>> vgg19_bn()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG("vgg19", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)
