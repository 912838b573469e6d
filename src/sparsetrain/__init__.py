"""sparsetrain: sparse training of CNNs.

Example:
    >>> import torch, sparsetrain
    >>> model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    >>> handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
"""

__version__ = "0.1.0"

from sparsetrain import data, sparsifiers  # noqa: E402
from sparsetrain.accounting import count_flops  # noqa: E402
from sparsetrain.handle import SparsityHandle, sparsify_  # noqa: E402
from sparsetrain.layers import INHERIT, LayerSpec, SparseConv2d, SparseLinear  # noqa: E402
from sparsetrain.models import count_parameters, create_model, list_models, register_model  # noqa: E402
from sparsetrain.recipe import Recipe, list_presets  # noqa: E402
from sparsetrain.telemetry import Monitor  # noqa: E402

__all__ = [
    "__version__",
    "INHERIT",
    "LayerSpec",
    "Monitor",
    "Recipe",
    "SparseConv2d",
    "SparseLinear",
    "SparsityHandle",
    "count_flops",
    "count_parameters",
    "create_model",
    "data",
    "list_models",
    "list_presets",
    "register_model",
    "sparsifiers",
    "sparsify_",
]
