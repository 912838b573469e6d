"""Published figures the accounting is compared with, each beside its source.

:data:`SWAT_TABLE3` is SWAT's Table 3 (Raihan & Aamodt, NeurIPS 2020): ResNet-50 on ImageNet, SWAT-U, first layer
dense, by sparsity. ``sparsetrain flops --model resnet50_imagenet --recipe swat-u --sparsity 0.9`` prints it beside
its own figures (:func:`format_paper_comparison`).

Example:
    >>> swat_table3_row(0.1)["training_flops_reduction_pct"], swat_table3_row(0.5)
    (85.6, None)
"""

from __future__ import annotations

from typing import Any

from sparsetrain.sparsifiers import density_from

__all__ = ["SWAT_TABLE3", "swat_table3_row", "format_paper_comparison"]

#: SWAT (Raihan & Aamodt, NeurIPS 2020), Table 3: ResNet-50 on ImageNet, SWAT-U, first layer dense; by sparsity.
SWAT_TABLE3 = {
    0.8: {"training_flops_reduction_pct": 76.1, "inference_flops_reduction_pct": 77.7,
          "act_memory_reduction_pct": 39.2, "model_compression_x": 5.0},
    0.9: {"training_flops_reduction_pct": 85.6, "inference_flops_reduction_pct": 87.4,
          "act_memory_reduction_pct": 44.0, "model_compression_x": 10.0},
}
_PAPER_NOTES = {
    "training_flops_reduction_pct": "GEMMs only (--non-gemm: all ops); the gap: docs/accounting.md, SWAT Table 3",
    "inference_flops_reduction_pct": "",
    "act_memory_reduction_pct": "ours: conv/linear inputs; the paper also counts BN inputs (half of ours)",
    "model_compression_x": "",
}


def swat_table3_row(density: float | None) -> dict[str, Any] | None:
    """The Table 3 row at this kept fraction (``source``, ``sparsity`` and the four figures), or None."""
    sparsity = next((sp for sp in SWAT_TABLE3
                     if density is not None and abs(density_from(None, sp, "SWAT Table 3") - density) < 1e-9), None)
    if sparsity is None:
        return None
    return {"source": "SWAT (Raihan & Aamodt, NeurIPS 2020), Table 3: ResNet-50, ImageNet, SWAT-U",
            "sparsity": sparsity, **SWAT_TABLE3[sparsity]}


def format_paper_comparison(ref: dict[str, Any], report: Any) -> str:
    """The published row ``ref`` beside a :class:`~sparsetrain.accounting.flops.FlopReport`'s figures."""
    ours = {"training_flops_reduction_pct": report.training_flops_reduction_pct,
            "inference_flops_reduction_pct": report.inference_flops_reduction_pct,
            "act_memory_reduction_pct": report.act_memory_reduction_pct,
            "model_compression_x": report.model_compression_x}
    names = {"training_flops_reduction_pct": "training FLOPs reduction %", "inference_flops_reduction_pct":
             "inference FLOPs reduction %", "act_memory_reduction_pct": "activation memory (Act) reduction %",
             "model_compression_x": "model compression x"}
    lines = [f"{ref['source']} at {100 * ref['sparsity']:.0f} % sparsity, beside ours:",
             f"  {'':<36} {'paper':>6} {'ours':>7}"]
    for key, name in names.items():
        lines.append(f"  {name:<36} {ref[key]:>6.1f} {ours[key]:>7.2f}  {_PAPER_NOTES[key]}".rstrip())
    return "\n".join(lines)
