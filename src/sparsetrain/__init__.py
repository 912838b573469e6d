"""sparsetrain: sparse training of CNNs.

``import sparsetrain`` is cheap: the names below are imported on first use (PEP 562), so the CLI's ``--help`` and
tools that only need a submodule do not pay for torch and every subpackage up front.

Example:
    >>> import torch, sparsetrain
    >>> model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    >>> handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself when the value is None)
_EXPORTS: dict[str, str] = {
    "INHERIT": "sparsetrain.layers",
    "LayerSpec": "sparsetrain.layers",
    "SparseConv2d": "sparsetrain.layers",
    "SparseLinear": "sparsetrain.layers",
    "Monitor": "sparsetrain.telemetry",
    "Recipe": "sparsetrain.recipe",
    "list_presets": "sparsetrain.recipe",
    "SparsityHandle": "sparsetrain.handle",
    "sparsify_": "sparsetrain.handle",
    "count_flops": "sparsetrain.accounting",
    "count_parameters": "sparsetrain.models",
    "create_model": "sparsetrain.models",
    "list_models": "sparsetrain.models",
    "register_model": "sparsetrain.models",
    "lean_allocator": "sparsetrain.allocator",
    "restore_allocator": "sparsetrain.allocator",
    "allocator_stats": "sparsetrain.allocator",
    "release_scratch": "sparsetrain._scratch",
}
_SUBMODULES = ("data", "sparsifiers", "layers", "handle", "recipe", "methods", "packing", "models", "telemetry",
               "accounting", "analysis", "reporting", "runs", "training", "allocator")

__all__ = ["__version__", *sorted(_EXPORTS), "data", "sparsifiers"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"sparsetrain.{name}")
    else:
        raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
