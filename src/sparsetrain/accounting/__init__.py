"""FLOP, memory and simulated-accelerator accounting of sparse training, in the papers' terms.

* :mod:`~sparsetrain.accounting.flops` -- per-layer MACs of forward / grad-input / grad-weight, dense vs sparse,
  and SWAT's summary figures (training and inference FLOPs reduction, Act reduction, model compression).
* :mod:`~sparsetrain.accounting.non_gemm` -- the work the GEMM count leaves out (BatchNorm, ReLU, pooling, residual
  additions, the loss, the top-K selection), counted with ``count_flops(..., non_gemm=True)``.
* :mod:`~sparsetrain.accounting.memory` -- bytes of parameters, gradients, optimizer state and saved activations,
  analytic (dense vs sparse storage) and measured with ``saved_tensors_hooks``.
* :mod:`~sparsetrain.accounting.accelerator` -- cycle model of a PE array that executes only effectual MACs,
  fed with the real operands of training steps.

The convention is in ``docs/accounting.md`` and :data:`CONVENTION`.
"""

from sparsetrain.accounting.accelerator import (
    AcceleratorConfig,
    AcceleratorReport,
    GemmCapture,
    LayerCycles,
    capture_step,
    effectual_macs,
    simulate,
    simulate_capture,
)
from sparsetrain.accounting.flops import (
    CONVENTION,
    FlopReport,
    LayerFlops,
    count_flops,
    format_count,
    format_non_gemm,
    format_table,
    layer_density,
)
from sparsetrain.accounting.memory import (
    MemoryReport,
    SavedTensorStats,
    measure_saved_tensors,
    memory_report,
    optimizer_buffers,
    storage_bytes,
)
from sparsetrain.accounting.non_gemm import (
    NON_GEMM_CONVENTION,
    NonGemmCounts,
    NonGemmOp,
    NonGemmOptions,
    quickselect_comparisons_per_element,
)

__all__ = [
    "CONVENTION",
    "NON_GEMM_CONVENTION",
    "AcceleratorConfig",
    "AcceleratorReport",
    "FlopReport",
    "GemmCapture",
    "LayerCycles",
    "LayerFlops",
    "MemoryReport",
    "NonGemmCounts",
    "NonGemmOp",
    "NonGemmOptions",
    "SavedTensorStats",
    "capture_step",
    "count_flops",
    "effectual_macs",
    "format_count",
    "format_non_gemm",
    "format_table",
    "layer_density",
    "measure_saved_tensors",
    "memory_report",
    "optimizer_buffers",
    "quickselect_comparisons_per_element",
    "simulate",
    "simulate_capture",
    "storage_bytes",
]
