"""Sparsity telemetry: per-layer and per-block zero counts during training, sinks, and the threshold search.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparsetrain.telemetry import Monitor, ListSink
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sink = ListSink()
    >>> with Monitor(model, every=1, sinks=[sink]) as mon:
    ...     model(torch.randn(3, 4)).sum().backward()
    ...     _ = mon.step()
    >>> len(sink.records) > 0
    True
"""

from sparsetrain.telemetry.blocks import TOTAL, Count, aggregate, auto_blocks, block_members, resolve_blocks
from sparsetrain.telemetry.monitor import TENSORS, Monitor, counts_from_records, monitored_layers
from sparsetrain.telemetry.search import (
    Evaluator,
    ThresholdSearchResult,
    apply_thresholds,
    bake_sparse_weights,
    halving_search,
    make_evaluator,
    search_thresholds,
    threshold_recipe,
)
from sparsetrain.telemetry.sinks import (
    RECORD_FIELDS,
    CsvSink,
    JsonlSink,
    ListSink,
    Sink,
    TensorBoardSink,
    read_csv,
    read_jsonl,
)
from sparsetrain.telemetry.tables import SparsityReport, SparsityRow, measure_sparsity

__all__ = [
    "Monitor",
    "TENSORS",
    "TOTAL",
    "Count",
    "aggregate",
    "auto_blocks",
    "block_members",
    "resolve_blocks",
    "monitored_layers",
    "counts_from_records",
    "Sink",
    "JsonlSink",
    "CsvSink",
    "TensorBoardSink",
    "ListSink",
    "RECORD_FIELDS",
    "read_jsonl",
    "read_csv",
    "Evaluator",
    "make_evaluator",
    "halving_search",
    "search_thresholds",
    "ThresholdSearchResult",
    "threshold_recipe",
    "apply_thresholds",
    "bake_sparse_weights",
    "measure_sparsity",
    "SparsityReport",
    "SparsityRow",
]
