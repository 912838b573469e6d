"""Sparsity telemetry: per-layer and per-block zero counts during training, sinks, and inference sparsity tables.

The threshold search and weight baking live in :mod:`sparsetrain.analysis`.

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
from sparsetrain.telemetry.inference import (
    SparsityReport,
    SparsityRow,
    apply_thresholds,
    ensure_dense,
    measure_sparsity,
)
from sparsetrain.telemetry.monitor import TENSORS, Monitor, counts_from_records, evaluate_with_monitor, monitored_layers
from sparsetrain.telemetry.sinks import (
    RECORD_FIELDS,
    CsvSink,
    JsonlSink,
    ListSink,
    Sink,
    TensorBoardSink,
    read_csv,
)

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
    "evaluate_with_monitor",
    "Sink",
    "JsonlSink",
    "CsvSink",
    "TensorBoardSink",
    "ListSink",
    "RECORD_FIELDS",
    "read_csv",
    "measure_sparsity",
    "apply_thresholds",
    "ensure_dense",
    "SparsityReport",
    "SparsityRow",
]
