"""Model registry (timm-style): ``@register_model``, ``list_models``, ``create_model`` and per-model metadata.

Every model registered here declares, as timm's ``default_cfg`` does, the module name of its first convolution
(``first_conv``), of its classifier (``classifier``), its natural per-sample input size ``(C, H, W)`` and its
natural class count. :func:`create_model` attaches that :class:`ModelCfg` to the model it builds, as
``model.default_cfg``, adjusted to what was built (input channels, image size, classes). The first/last-layer
rules of the recipes, the FLOP input shapes and the model tests read it instead of guessing from layer order.

A user factory registered bare (``@register_model``) still works: its cfg then lacks ``input_size``, and
``first_conv``/``classifier`` are found in the built model by module order (see :func:`infer_first_conv` and
:func:`infer_classifier`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, overload

import torch
import torch.nn as nn

# The one definition of a model's first and last layer lives with the recipes that use it (the core).
from sparsetrain.recipe import find_classifier, find_first_conv, infer_classifier, infer_first_conv

__all__ = [
    "ModelCfg",
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

TORCHVISION_PREFIX = "torchvision:"
# Keyword arguments by which a factory may be told the image size it is built for ((H, W) or one int).
_IMAGE_SIZE_KWARGS = ("image_size", "img_size")

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelCfg:
    """What a registered model declares about itself (timm's ``default_cfg``).

    Attributes:
        name: Registered name (``"resnet20"``, ``"torchvision:resnet18"``).
        first_conv: Module name (``model.get_submodule(first_conv)``) of the layer that reads the input image.
        classifier: Module name of the layer that outputs the class logits.
        input_size: Natural per-sample input ``(C, H, W)``; None when a bare-registered factory does not say.
        num_classes: Natural class count of the architecture (e.g. 1000 for ImageNet models). On a built model
            (``model.default_cfg``) it is the number of classes actually built.
    """

    name: str
    first_conv: str | None
    classifier: str | None
    input_size: tuple[int, int, int] | None
    num_classes: int | None

    def __post_init__(self) -> None:
        for field in ("first_conv", "classifier"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"model {self.name!r}: {field} must be a non-empty module name, got {value!r}")
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(
                    f"model {self.name!r}: input_size must be three positive ints (C, H, W), got {self.input_size!r}"
                )
            object.__setattr__(self, "input_size", size)  # a list given by the caller is stored as a tuple
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1
        ):
            raise ValueError(f"model {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}")


_MODELS: dict[str, Factory] = {}
_CFGS: dict[str, ModelCfg] = {}


def _register(fn: Factory, meta: dict[str, Any]) -> Factory:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if meta["num_classes"] is None:  # undeclared: the factory's own default, if it has one
        default = _signature_default(fn, "num_classes")
        meta = {**meta, "num_classes": default if isinstance(default, int) and not isinstance(default, bool) else None}
    cfg = ModelCfg(name=name, **meta)
    # Catch metadata that contradicts the factory it describes: the declared input channels must be what the
    # factory builds by default.
    default_in = _signature_default(fn, "in_channels")
    if cfg.input_size is not None and isinstance(default_in, int) and default_in != cfg.input_size[0]:
        raise ValueError(
            f"model {name!r}: input_size {cfg.input_size} has {cfg.input_size[0]} channels but the factory's "
            f"in_channels default is {default_in}"
        )
    _MODELS[name] = fn
    _CFGS[name] = cfg
    return fn


@overload
def register_model(fn: Factory) -> Factory: ...


@overload
def register_model(
    fn: None = None,
    *,
    first_conv: str | None = None,
    classifier: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> Callable[[Factory], Factory]: ...


def register_model(
    fn: Factory | None = None,
    *,
    first_conv: str | None = None,
    classifier: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> Factory | Callable[[Factory], Factory]:
    """Register a model factory under its function name, with its metadata.

    Use bare (``@register_model``) or with the metadata of :class:`ModelCfg`::

        @register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
        def my_net(num_classes=10, in_channels=3, **kwargs): ...

    What is not declared is filled in where possible: ``num_classes`` from the factory's default, and
    ``first_conv``/``classifier`` by module order in each built model (:func:`infer_first_conv`,
    :func:`infer_classifier`); ``input_size`` stays unknown (None).

    Args:
        fn: The factory (when used bare).
        first_conv: Module name of the first convolution (the layer that reads the image).
        classifier: Module name of the classifier.
        input_size: Natural per-sample input ``(C, H, W)``.
        num_classes: Natural class count.

    Returns:
        The factory, unchanged (bare use), or a decorator that registers it.

    Raises:
        ValueError: if the name is taken or the metadata is malformed.
    """
    meta = dict(first_conv=first_conv, classifier=classifier, input_size=input_size, num_classes=num_classes)
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"register_model takes a factory function or keyword metadata, got {fn!r}")
        return _register(fn, meta)
    return lambda f: _register(f, meta)


def _signature_default(fn: Callable[..., Any], param: str) -> Any:
    """Default of ``fn``'s parameter ``param``, or None if it has none (or no inspectable signature)."""
    try:
        p = inspect.signature(fn).parameters.get(param)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())} (or torchvision:NAME)")


def model_entrypoint(name: str) -> Factory:
    """The factory registered as ``name`` (``torchvision:NAME`` gives a lazy torchvision factory)."""
    if name.startswith(TORCHVISION_PREFIX):
        from sparsetrain.models.tv import torchvision_entrypoint

        return torchvision_entrypoint(name[len(TORCHVISION_PREFIX) :])
    try:
        return _MODELS[name]
    except KeyError:
        raise _unknown(name) from None


def get_model_cfg(name: str) -> ModelCfg:
    """The metadata a model declares (its natural defaults, before any factory override).

    ``torchvision:NAME`` models are described best-effort: ``input_size`` (3, 224, 224), ``num_classes`` 1000,
    and ``first_conv``/``classifier`` found by module order in the model built on the ``meta`` device (no memory,
    no initialisation cost; torchvision must be installed).

    Raises:
        ValueError: if ``name`` is not registered (the message lists the valid names).
    """
    if name.startswith(TORCHVISION_PREFIX):
        with torch.device("meta"):
            model = model_entrypoint(name)(num_classes=1000)
        return ModelCfg(name, infer_first_conv(model), infer_classifier(model), (3, 224, 224), 1000)
    try:
        return _CFGS[name]
    except KeyError:
        raise _unknown(name) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model and attach its metadata as ``model.default_cfg``.

    ``None`` kwargs are dropped so factory defaults apply. ``model.default_cfg`` is the model's :class:`ModelCfg`
    adjusted to what was built: ``input_size``'s channels are those of the built first conv (an ``in_channels``
    override) and its H, W those of an ``image_size``/``img_size`` argument if the factory took one;
    ``num_classes`` is the built classifier's output count. A bare-registered model gets ``first_conv`` and
    ``classifier`` by module order.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = model_entrypoint(name)(**kwargs)
    if name.startswith(TORCHVISION_PREFIX):
        base = ModelCfg(name, infer_first_conv(model), infer_classifier(model), (3, 224, 224), 1000)
    else:
        base = _CFGS[name]
    # Setting a plain attribute on an nn.Module adds nothing to its state_dict, so checkpoints are unchanged.
    model.default_cfg = _built_cfg(base, model, kwargs)
    return model


def _built_cfg(base: ModelCfg, model: nn.Module, kwargs: dict[str, Any]) -> ModelCfg:
    first_conv = base.first_conv or infer_first_conv(model)
    classifier = base.classifier or infer_classifier(model)
    modules = dict(model.named_modules())
    first, head = modules.get(first_conv), modules.get(classifier)

    input_size = base.input_size
    if input_size is not None:
        c, h, w = input_size
        if isinstance(first, nn.Conv2d):
            c = first.in_channels
        elif isinstance(kwargs.get("in_channels"), int):
            c = kwargs["in_channels"]
        size = next((kwargs[k] for k in _IMAGE_SIZE_KWARGS if k in kwargs), None)
        if isinstance(size, int):
            h = w = size
        elif isinstance(size, (tuple, list)) and len(size) == 2:
            h, w = int(size[0]), int(size[1])
        input_size = (c, h, w)

    if isinstance(head, nn.Linear):
        num_classes = head.out_features
    elif isinstance(head, nn.Conv2d):
        num_classes = head.out_channels
    else:
        num_classes = kwargs.get("num_classes", base.num_classes)
    return dataclasses.replace(base, first_conv=first_conv, classifier=classifier, input_size=input_size,
                               num_classes=num_classes)
