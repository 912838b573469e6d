"""sparsetrain: sparse training of CNNs.

Example:
    >>> import torch, sparsetrain
    >>> model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    >>> handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
"""

__version__ = "0.1.0"

from sparsetrain.models import create_model, list_models, register_model  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "register_model"]
