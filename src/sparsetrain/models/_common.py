"""Helpers shared by the model definitions: channel scaling and weight initialisation."""

from __future__ import annotations

import math

import torch.nn as nn

__all__ = ["scale_channels", "check_width_mult", "init_weights"]


def check_width_mult(width_mult: float) -> float:
    """Validate a depth (width) multiplier and return it as a float.

    Raises:
        ValueError: if ``width_mult`` is not a finite number > 0.
    """
    w = float(width_mult)
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
    return w


def scale_channels(channels: int, width_mult: float) -> int:
    """``ceil(channels * width_mult)``, at least 1: Changpinyo et al.'s depth multiplier (rounded up).

    The product is rounded to 6 decimals first so that e.g. ``64 * 0.3`` (19.200000000000003) gives 20
    and ``64 * 0.25`` gives exactly 16, not 17 through a floating-point artefact.
    """
    return max(1, math.ceil(round(channels * width_mult, 6)))


def init_weights(model: nn.Module) -> None:
    """Standard initialisation: Kaiming-normal (fan_out, ReLU) for convs, BN weight 1 / bias 0.

    Conv biases (only present in the BN-free models) start at 0; ``nn.Linear`` keeps PyTorch's default
    initialisation, as torchvision's ResNets and pytorch-cifar do.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
