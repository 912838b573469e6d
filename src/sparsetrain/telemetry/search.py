"""Compatibility alias: the threshold search moved to :mod:`sparsetrain.analysis.search`.

Kept only until ``commands/measure.py`` and ``tests/test_measure_cli.py`` import from ``sparsetrain.analysis``;
then this module is deleted. New code imports from :mod:`sparsetrain.analysis`.
"""

from sparsetrain.analysis.search import (
    Evaluator,
    LayerSearch,
    ThresholdSearchResult,
    bake_sparse_weights,
    halving_search,
    make_evaluator,
    search_thresholds,
    threshold_recipe,
)
from sparsetrain.telemetry.monitor import evaluate_with_monitor
from sparsetrain.telemetry.tables import apply_thresholds

__all__ = [
    "Evaluator",
    "LayerSearch",
    "ThresholdSearchResult",
    "apply_thresholds",
    "bake_sparse_weights",
    "evaluate_with_monitor",
    "halving_search",
    "make_evaluator",
    "search_thresholds",
    "threshold_recipe",
]
