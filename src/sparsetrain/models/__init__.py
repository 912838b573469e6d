"""Model zoo: CIFAR/MNIST variants used by the papers, plus an ImageNet-shape ResNet-50.

Importing this package registers every model; ``list_models()`` shows them and
``create_model(name, num_classes=..., in_channels=..., width_mult=...)`` builds one.
``torchvision:NAME`` builds a torchvision model (optional extra).

Example:
    >>> from sparsetrain.models import create_model, count_parameters
    >>> model = create_model("resnet20")
    >>> count_parameters(model)
    269722
"""

from __future__ import annotations

import torch.nn as nn

# Imported for their side effect: @register_model adds the factories to the registry.
from sparsetrain.models import classic, densenet, mobilenet, resnet, vgg, wide_resnet  # noqa: F401
from sparsetrain.models._registry import create_model, list_models, model_entrypoint, register_model

__all__ = [
    "count_parameters",
    "create_model",
    "find_classifier",
    "list_models",
    "model_entrypoint",
    "register_model",
]


def find_classifier(model: nn.Module) -> str | None:
    """Name of the classifier, i.e. the last ``nn.Linear`` in ``model.named_modules()`` order (None if none)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def count_parameters(model: nn.Module, exclude_classifier: bool = False) -> int:
    """Number of parameters (each shared tensor counted once).

    Args:
        model: Any module.
        exclude_classifier: Leave out the classifier's weight and bias, as Changpinyo et al. report
            parameter counts "excluding the softmax layer". The classifier is the last ``nn.Linear``
            (see :func:`find_classifier`).

    Returns:
        The parameter count (all parameters, trainable or not).
    """
    skip: set[int] = set()
    if exclude_classifier:
        name = find_classifier(model)
        if name is not None:
            skip = {id(p) for p in model.get_submodule(name).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
