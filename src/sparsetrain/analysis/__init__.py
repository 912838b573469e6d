"""Post-training analysis of a trained model: TensorQuant's per-layer threshold search and weight baking.

Analysis sits on top of :mod:`sparsetrain.telemetry` (it evaluates models with a Monitor attached and enforces
thresholds with :func:`sparsetrain.telemetry.inference.apply_thresholds`); nothing below it imports it.

Example:
    >>> from sparsetrain.analysis import halving_search
    >>> halving_search(lambda t: 1.0 if t <= 0.25 else 0.0, baseline=1.0)[0]
    0.25
"""

from sparsetrain.analysis.search import (
    DEFAULT_MARGIN,
    SEARCH_OPERANDS,
    Evaluator,
    LayerSearch,
    ThresholdSearchResult,
    bake_sparse_weights,
    halving_search,
    inference_model,
    make_evaluator,
    search_thresholds,
    threshold_recipe,
)

__all__ = [
    "DEFAULT_MARGIN",
    "SEARCH_OPERANDS",
    "Evaluator",
    "LayerSearch",
    "ThresholdSearchResult",
    "bake_sparse_weights",
    "halving_search",
    "inference_model",
    "make_evaluator",
    "search_thresholds",
    "threshold_recipe",
]
