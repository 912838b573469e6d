"""Inference sparsity (TensorQuant Tables 1-5): per layer and per block, with and without enforcement.

:func:`measure_sparsity` evaluates a dense model twice with a :class:`~sparsetrain.telemetry.Monitor` attached:
as it is (exact zeros), and with magnitude thresholds enforced through ``sparsetrain.sparsify_``
(:func:`apply_thresholds`; weights: the ``weight`` operand; activations: the ``input`` operand, the post-ReLU
activation the layer consumes; see :mod:`sparsetrain.analysis.search` for why not ``output``). Counts are summed
over every evaluated image.

Columns: weight elements, weight sparsity, weight sparsity under enforcement; activation elements per image,
input-activation sparsity with and without enforcement (the enforced value counts ``|x| <= thr`` of the layer's
input in the enforced model, i.e. exactly the zeros its GEMM sees), and output sparsity of the enforced model
(module output, before the next ReLU). Blocks follow :mod:`sparsetrain.telemetry.blocks`: weights element-weighted,
activations of the block's last layer (``block_activations="last_layer"``: the table's input columns are the
activations a GEMM consumes, where thresholds act; TensorQuant's block activation, the block's output, is what the
training Monitor records by default); the ``(total)`` row sums over every layer.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from sparsetrain.formatting import pct_cell
from sparsetrain.layers import is_sparse_layer
from sparsetrain.telemetry.blocks import TOTAL
from sparsetrain.telemetry.monitor import evaluate_with_monitor, monitored_layers

__all__ = [
    "SparsityRow",
    "SparsityReport",
    "measure_sparsity",
    "resolve_thresholds",
    "format_table",
    "apply_thresholds",
    "ensure_dense",
    "threshold_layers",
]


@dataclass
class SparsityRow:
    """One table row (a layer or a block). Sparsities are fractions in [0, 1]; ``None`` = not measured."""

    name: str
    kind: str  # "layer" | "block"
    type: str  # module class name for a layer, "<n> layers" for a block
    weight_numel: int
    weight_sparsity: float
    act_numel: float | None  # input-activation elements per image
    input_sparsity: float | None
    output_sparsity: float | None
    weight_threshold: float | None = None
    act_threshold: float | None = None
    weight_enforced: float | None = None
    input_enforced: float | None = None
    output_enforced: float | None = None


@dataclass
class SparsityReport:
    """Result of :func:`measure_sparsity`."""

    layers: list[SparsityRow]
    blocks: list[SparsityRow]
    baseline_accuracy: float
    enforced_accuracy: float | None
    num_samples: int | None
    weight_thresholds: dict[str, float] = field(default_factory=dict)
    act_thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def enforced(self) -> bool:
        return bool(self.weight_thresholds or self.act_thresholds)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {
            "baseline_accuracy": self.baseline_accuracy,
            "enforced_accuracy": self.enforced_accuracy,
            "relative_accuracy": (self.enforced_accuracy / self.baseline_accuracy
                                  if self.enforced_accuracy is not None and self.baseline_accuracy else None),
            "num_samples": self.num_samples,
            "weight_thresholds": self.weight_thresholds,
            "act_thresholds": self.act_thresholds,
            "layers": [asdict(r) for r in self.layers],
            "blocks": [asdict(r) for r in self.blocks],
        }

    def format(self) -> str:
        """Human-readable tables plus the accuracy with and without enforcement."""
        parts = [format_table(self.layers, "Layer", self.enforced), ""]
        if self.blocks:
            parts += [format_table(self.blocks, "Block", self.enforced), ""]
        n = f" on {self.num_samples} images" if self.num_samples else ""
        parts.append(f"accuracy{n}: {self.baseline_accuracy:.4f}")
        if self.enforced_accuracy is not None:
            rel = self.enforced_accuracy / self.baseline_accuracy if self.baseline_accuracy else float("nan")
            parts[-1] += (f" -> {self.enforced_accuracy:.4f} with thresholds enforced "
                          f"({100 * rel:.1f}% of baseline)")
        return "\n".join(parts)


#: A percentage in this module's plain-text tables: "12.3%", "-" when missing.
_pct = functools.partial(pct_cell, digits=1, missing="-", sign="%")


def _thr(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def format_table(rows: Sequence[SparsityRow], title: str = "Layer", enforced: bool = True) -> str:
    """Format rows as a plain-text table (``enforced`` adds the threshold and enforced-sparsity columns)."""
    head = [title, "type", "weights", "w sparsity"]
    if enforced:
        head += ["w thr", "w enforced"]
    head += ["act/img", "in sparsity"]
    if enforced:
        head += ["act thr", "in enforced", "out enforced"]
    else:
        head += ["out sparsity"]
    table = [head]
    for r in rows:
        act = "-" if r.act_numel is None else f"{r.act_numel:.0f}"
        line = [r.name, r.type, str(r.weight_numel), _pct(r.weight_sparsity)]
        if enforced:
            line += [_thr(r.weight_threshold), _pct(r.weight_enforced)]
        line += [act, _pct(r.input_sparsity)]
        if enforced:
            line += [_thr(r.act_threshold), _pct(r.input_enforced), _pct(r.output_enforced)]
        else:
            line += [_pct(r.output_sparsity)]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = []
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j == 0 or j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def resolve_thresholds(
    spec: float | Mapping[str, float] | None, layer_names: Sequence[str], skip_first: bool = False
) -> dict[str, float]:
    """Per-layer thresholds from a global value or a mapping.

    Args:
        spec: one threshold for every layer, ``{layer: threshold}``, or ``None``.
        layer_names: the model's conv/linear layers in order.
        skip_first: a global value leaves the first layer out (for activations: its input is the image).

    Raises:
        ValueError: a negative / non-finite threshold or an unknown layer name.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        bad = [n for n in spec if n not in layer_names]
        if bad:
            raise ValueError(f"unknown layer(s) {bad}; valid names: {', '.join(layer_names)}")
        out = {n: float(v) for n, v in spec.items()}
    else:
        names = layer_names[1:] if skip_first else layer_names
        out = {n: float(spec) for n in names}
    for n, v in out.items():
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"threshold for {n!r} must be a finite number >= 0, got {v}")
    return out


def ensure_dense(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the sparse layers of ``model``, if any (thresholds are enforced on dense models)."""
    sparse = [n for n, m in model.named_modules() if is_sparse_layer(m)]
    if sparse:
        raise ValueError(f"threshold enforcement needs a dense model, but layers {sparse} are sparse; "
                         "call handle.remove(bake=True) first (or sparsetrain.analysis.bake_sparse_weights)")


def threshold_layers(weight: Mapping[str, float] | None = None, input: Mapping[str, float] | None = None
                     ) -> dict[str, Any]:
    """The ``layers`` section of a recipe with a ``threshold`` sparsifier per named layer and operand (the one
    builder of threshold recipes; :func:`sparsetrain.analysis.threshold_recipe` adds explicit dense layers)."""
    act = input
    layers: dict[str, Any] = {}
    for operand, thr in (("weight", weight or {}), ("input", act or {})):
        for name, t in thr.items():
            layers.setdefault(name, {})[operand] = {"type": "threshold", "threshold": float(t)}
    return layers


def apply_thresholds(
    model: nn.Module,
    weight: Mapping[str, float] | None = None,
    input: Mapping[str, float] | None = None,
) -> nn.Module:
    """A deep copy of the dense ``model`` with thresholds enforced through ``sparsetrain.sparsify_``.

    Args:
        model: a dense model (no sparse layers); it is not modified.
        weight: layer name -> weight threshold.
        input: layer name -> input-activation threshold.

    Returns:
        The sparsified copy (its handle is not needed: threshold sparsifiers have no schedule).

    Raises:
        ValueError: ``model`` has sparse layers (see :func:`ensure_dense`).
    """
    from sparsetrain import sparsify_

    ensure_dense(model)
    clone = copy.deepcopy(model)
    layers = threshold_layers(weight, input)
    if layers:
        sparsify_(clone, {"layers": layers})
    return clone


def _index(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    return {(r["kind"], r["name"], r["tensor"]): r for r in records}


def measure_sparsity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    weight_thresholds: float | Mapping[str, float] | None = None,
    act_thresholds: float | Mapping[str, float] | None = None,
    blocks: str | Sequence[str] | None = "auto",
) -> SparsityReport:
    """Measure weight and activation sparsity of a dense model, and the effect of enforcing thresholds.

    Args:
        model: a dense model (not modified).
        evaluate: ``evaluate(model) -> accuracy`` (e.g. :class:`~sparsetrain.analysis.Evaluator`; its
            ``num_samples`` attribute, when present, turns activation counts into per-image counts).
        weight_thresholds: a global weight threshold or ``{layer: threshold}``.
        act_thresholds: a global input-activation threshold (every layer but the first, whose input is the
            image) or ``{layer: threshold}``.
        blocks: block prefixes (``"auto"``, ``None`` or a list), as for the Monitor.

    Returns:
        A :class:`SparsityReport` (``print(report.format())``).
    """
    modules = monitored_layers(model)
    names = list(modules)
    w_thr = resolve_thresholds(weight_thresholds, names)
    a_thr = resolve_thresholds(act_thresholds, names, skip_first=True)
    # Block input columns are the last layer's (GEMM-side) input, where an enforced threshold acts.
    base_acc, base = evaluate_with_monitor(model, evaluate, blocks=blocks, block_activations="last_layer")
    n_img = getattr(evaluate, "num_samples", None)
    enforced = bool(w_thr or a_thr)
    enf_acc, enf = None, []
    if enforced:
        trial = apply_thresholds(model, weight=w_thr, input=a_thr)

        def near(layer: str, tensor: str) -> float | None:
            if tensor == "weight":
                return w_thr.get(layer)
            return a_thr.get(layer) if tensor == "input" else None

        enf_acc, enf = evaluate_with_monitor(trial, evaluate, near_zero_threshold=near, blocks=blocks,
                                             block_activations="last_layer")
    b, e = _index(base), _index(enf)

    def sp(idx: Mapping, kind: str, name: str, tensor: str, near_ok: bool = False) -> float | None:
        r = idx.get((kind, name, tensor))
        if r is None:
            return None
        if near_ok and r["near_zero_sparsity"] is not None:
            return r["near_zero_sparsity"]
        return r["sparsity"]

    def row(kind: str, name: str, typ: str, w_t: float | None, a_t: float | None) -> SparsityRow:
        w = b[(kind, name, "weight")]
        inp = b.get((kind, name, "input"))
        act = None if inp is None else inp["numel"] / (n_img or 1)
        return SparsityRow(
            name=name, kind=kind, type=typ, weight_numel=w["numel"], weight_sparsity=w["sparsity"],
            act_numel=act, input_sparsity=sp(b, kind, name, "input"), output_sparsity=sp(b, kind, name, "output"),
            weight_threshold=w_t, act_threshold=a_t,
            weight_enforced=sp(e, kind, name, "weight") if enforced else None,
            input_enforced=sp(e, kind, name, "input", near_ok=True) if enforced else None,
            output_enforced=sp(e, kind, name, "output") if enforced else None,
        )

    layer_rows = [row("layer", n, type(modules[n]).__name__, w_thr.get(n), a_thr.get(n)) for n in names
                  if ("layer", n, "weight") in b]
    block_names = [r["name"] for r in base if r["kind"] == "block" and r["tensor"] == "weight"]
    block_rows = []
    for name in block_names:
        members = names if name == TOTAL else [n for n in names if n == name or n.startswith(name + ".")]
        block_rows.append(row("block", name, f"{len(members)} layers", None, None))
    return SparsityReport(layer_rows, block_rows, base_acc, enf_acc, n_img, w_thr, a_thr)
