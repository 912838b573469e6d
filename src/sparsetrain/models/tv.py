"""``torchvision:NAME`` models: torchvision's architectures through the sparsetrain registry (optional extra).

torchvision is imported only when such a model is built, so the core package does not depend on it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.nn as nn

__all__ = ["TORCHVISION_EXTRA_HINT", "torchvision_entrypoint"]

TORCHVISION_EXTRA_HINT = "pip install 'sparsetrain[torchvision]'"


def _import_torchvision() -> Any:
    try:
        return importlib.import_module("torchvision")
    except ImportError as e:
        raise ImportError(
            f"torchvision models ('torchvision:NAME') need the optional torchvision extra: {TORCHVISION_EXTRA_HINT}"
        ) from e


def torchvision_entrypoint(name: str) -> Callable[..., nn.Module]:
    """Factory for ``torchvision.models.get_model(name)`` with the registry's factory signature.

    torchvision is imported when the factory is called, not here.

    Args:
        name: A torchvision model name, e.g. ``"resnet18"`` or ``"mobilenet_v2"``.

    Returns:
        ``factory(num_classes=10, in_channels=3, width_mult=1.0, **kwargs)``; ``kwargs`` go to
        ``torchvision.models.get_model`` (e.g. ``weights=None``).

    Example:
        >>> factory = torchvision_entrypoint("resnet18")  # doctest: +SKIP
        >>> model = factory(num_classes=1000)  # doctest: +SKIP
    """
    if not name:
        raise ValueError("empty torchvision model name; use 'torchvision:NAME', e.g. 'torchvision:resnet18'")

    def factory(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
        tv = _import_torchvision()
        valid = tv.models.list_models()
        if name not in valid:
            raise ValueError(f"unknown torchvision model {name!r}; valid choices: {', '.join(sorted(valid))}")
        if in_channels != 3:
            raise ValueError(f"torchvision:{name} takes 3 input channels, got in_channels={in_channels}")
        if width_mult != 1.0:
            raise ValueError(
                f"width_mult={width_mult} is not supported for torchvision:{name}; use a registered model or "
                "the architecture's own width argument via kwargs"
            )
        return tv.models.get_model(name, num_classes=num_classes, **kwargs)

    factory.__name__ = f"torchvision:{name}"
    factory.__qualname__ = factory.__name__
    return factory
