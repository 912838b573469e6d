"""Model registry (timm-style): ``@register_model``, ``list_models``, ``create_model``."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch.nn as nn

__all__ = ["register_model", "list_models", "create_model", "model_entrypoint"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name.startswith("torchvision:"):
        from sparsetrain.models.tv import torchvision_entrypoint

        return torchvision_entrypoint(name.split(":", 1)[1])
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``None`` kwargs are dropped so factory defaults apply."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model_entrypoint(name)(**kwargs)
