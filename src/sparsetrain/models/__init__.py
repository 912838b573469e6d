"""Model zoo: CIFAR/MNIST variants used by the papers, plus an ImageNet-shape ResNet-50.

Importing this package registers every model; ``list_models()`` shows them and
``create_model(name, num_classes=..., in_channels=..., width_mult=...)`` builds one.
``torchvision:NAME`` builds a torchvision model (optional extra).

Every model declares timm-style metadata, :class:`ModelCfg` (``first_conv``, ``classifier``, ``input_size``,
``num_classes``): ``get_model_cfg(name)`` returns it, and a built model carries it, adjusted to the build, as
``model.default_cfg``. :func:`find_first_conv` / :func:`find_classifier` read it (module order for models
without it).

Example:
    >>> from sparsetrain.models import create_model, count_parameters
    >>> model = create_model("resnet20")
    >>> count_parameters(model)
    269722
    >>> model.default_cfg.input_size, model.default_cfg.classifier
    ((3, 32, 32), 'fc')
"""

from __future__ import annotations

import torch.nn as nn

# Imported for their side effect: @register_model adds the factories to the registry.
from sparsetrain.models import classic, densenet, mobilenet, resnet, vgg, wide_resnet  # noqa: F401
from sparsetrain.models._registry import (
    ModelCfg,
    create_model,
    find_classifier,
    find_first_conv,
    get_model_cfg,
    infer_classifier,
    infer_first_conv,
    list_models,
    model_entrypoint,
    register_model,
)

__all__ = [
    "ModelCfg",
    "count_parameters",
    "create_model",
    "find_classifier",
    "find_first_conv",
    "get_model_cfg",
    "infer_classifier",
    "infer_first_conv",
    "list_models",
    "model_entrypoint",
    "register_model",
]


def count_parameters(model: nn.Module, exclude_classifier: bool = False) -> int:
    """Number of parameters (each shared tensor counted once).

    Args:
        model: Any module.
        exclude_classifier: Leave out the classifier's weight and bias, as Changpinyo et al. report
            parameter counts "excluding the softmax layer". The classifier is the declared one
            (``model.default_cfg.classifier``), else the last ``nn.Linear`` (see :func:`find_classifier`).

    Returns:
        The parameter count (all parameters, trainable or not).
    """
    skip: set[int] = set()
    if exclude_classifier:
        name = find_classifier(model)
        if name is not None:
            skip = {id(p) for p in model.get_submodule(name).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
