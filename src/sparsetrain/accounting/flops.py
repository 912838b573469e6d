"""Per-layer multiply-accumulate (MAC) accounting of a training step, dense and sparse, in the papers' terms.

Convention (also returned as :data:`CONVENTION` and printed by ``sparsetrain flops``):

* Only ``nn.Conv2d`` and ``nn.Linear`` layers, including subclasses such as ``SparseConv2d``, are counted (the
  layer types sparsetrain sparsifies; the same ``isinstance`` test as the telemetry and the accelerator model).
  BatchNorm, ReLU, pooling, softmax, residual additions and the optimizer update are not: they are O(activations)
  and SWAT's tables ignore them too.
* Counts are MACs. One MAC = one multiply + one add, so FLOPs = 2 x MACs (``FlopCounterMode`` reports FLOPs).
  Biases are not counted (``FlopCounterMode`` ignores them as well).
* Per layer, with ``F`` the dense MACs of the forward GEMM ``y = f(x, W)``:

  - forward ``F``; backward grad-input ``dx = G(dy, W)``: ``F``; backward grad-weight ``dW = H(dy, x)``: ``F``.
  - the grad-input of a layer whose input does not require grad (the first layer, fed by the data) is never
    computed by autograd, so it counts 0 (set ``count_first_layer_grad_input=True`` to count it anyway).
  - sparse counts take the *sparser* operand of each GEMM, i.e. an engine that skips the zeros of one operand:
    forward ``min(d_weight, d_input) F``; grad-input ``min(d_weight_for_grad_input, d_grad_output) F``;
    grad-weight ``min(d_input_for_grad_weight, d_grad_output) F``. With a dense ``dy`` this is SWAT's
    ``(1-s_w)F, (1-s_w)F, (1-s_a)F``; with a pruned ``dy`` (meProp, Ye et al.) it is ``(1-s_dy)F`` per GEMM.
    An engine that skips pairs where *either* operand is zero does better (about ``d_a d_b F`` for independent
    masks); :mod:`sparsetrain.accounting.accelerator` counts those effectual MACs exactly on real tensors.

* Totals: training FLOPs reduction = ``1 - sparse/dense`` over the three passes; inference FLOPs reduction = the
  same over the forward pass only; Act reduction = fraction of the saved activation elements (each layer's
  ``input_for_grad_weight``, i.e. its input, counted per sample) that are masked to zero,
  ``sum((1-d) n_in) / sum(n_in)``; model compression = conv+linear weights / non-zero weights (``d_weight``).

Densities use the format of ``SparsityHandle.densities()``: ``{layer_name: {operand: kept_fraction}}``; a missing
layer or operand is dense (1.0).

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    >>> report = count_flops(model, (1, 28, 28), {"2": {"weight": 0.1, "weight_for_grad_input": 0.1}})
    >>> report.layers[0].dense_forward_macs, report.layers[0].dense_grad_input_macs
    (24336, 0)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from sparsetrain.accounting.non_gemm import (
    NON_GEMM_CONVENTION,
    NonGemmCounts,
    NonGemmOptions,
    record_non_gemm,
    selection_macs,
)
from sparsetrain.layers import OPERANDS, OperandEvent, counted_layer, dense_mode, is_sparse_layer, observe

logger = logging.getLogger(__name__)

__all__ = [
    "CONVENTION",
    "LayerFlops",
    "FlopReport",
    "count_flops",
    "format_count",
    "format_non_gemm",
    "format_table",
    "layer_density",
]


CONVENTION = (
    "MACs of conv/linear GEMMs only (BN, ReLU, pooling, softmax, bias, optimizer not counted); FLOPs = 2 x MACs. "
    "Dense per layer: forward F, grad-input F (0 for a layer whose input needs no grad, e.g. the first layer), "
    "grad-weight F. Sparse: forward min(d_weight, d_input)F, grad-input min(d_weight_for_grad_input, "
    "d_grad_output)F, grad-weight min(d_input_for_grad_weight, d_grad_output)F (the sparser operand is skipped; "
    "SWAT: (1-s_w)F, (1-s_w)F, (1-s_a)F). Training reduction over the 3 passes, inference over forward only. "
    "Act reduction = masked fraction of conv/linear input elements saved for grad-weight. "
    "Compression = conv/linear weights / non-zero weights."
)


def layer_density(densities: Mapping[str, Mapping[str, float]] | None, name: str, operand: str) -> float:
    """Density (kept fraction) of one operand of one layer; a missing layer or operand means dense (1.0)."""
    if operand not in OPERANDS:
        raise ValueError(f"unknown operand {operand!r}; valid choices: {', '.join(OPERANDS)}")
    if not densities or name not in densities or densities[name] is None:
        return 1.0
    value = densities[name].get(operand, 1.0)
    value = 1.0 if value is None else float(value)
    if not 0.0 <= value <= 1.0 + 1e-9:
        raise ValueError(f"density of {name}.{operand} must be in [0, 1], got {value}")
    return min(value, 1.0)


@dataclass
class LayerFlops:
    """MACs, parameters and saved-activation size of one conv/linear layer (summed over its calls).

    MACs are for the whole batch used by :func:`count_flops`; ``saved_activation_elements`` is per sample.
    """

    name: str
    type: str
    dense_forward_macs: int
    dense_grad_input_macs: int
    dense_grad_weight_macs: int
    sparse_forward_macs: float
    sparse_grad_input_macs: float
    sparse_grad_weight_macs: float
    weight_density: float
    activation_density: float
    grad_output_density: float
    params: int
    saved_activation_elements: int
    # Not part of the row dict: weight elements for totals; CSR rows (feature maps) of the saved input per sample.
    weight_elements: int = field(default=0, repr=False)
    saved_activation_rows: int = field(default=0, repr=False)
    # Not part of the row dict either: every operand's density (the top-K selection cost needs all five).
    operand_densities: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def dense_training_macs(self) -> int:
        return self.dense_forward_macs + self.dense_grad_input_macs + self.dense_grad_weight_macs

    @property
    def sparse_training_macs(self) -> float:
        return self.sparse_forward_macs + self.sparse_grad_input_macs + self.sparse_grad_weight_macs

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("weight_elements")
        row.pop("saved_activation_rows")
        row.pop("operand_densities")
        return row


def _pct_reduction(sparse: float, dense: float) -> float:
    return 100.0 * (1.0 - sparse / dense) if dense > 0 else 0.0


@dataclass
class FlopReport:
    """Result of :func:`count_flops`: per-layer rows plus the papers' summary figures.

    Attributes:
        layers: one row per conv/linear module, in first-call order.
        input_shape: per-sample input shape the model was traced with.
        batch_size: batch the MAC counts refer to.
        other_params: parameters outside conv/linear layers (BatchNorm, ...), counted dense.
        classifier: name of the classifier, excluded from the Changpinyo-style parameter count:
            :func:`sparsetrain.models.find_classifier` when that layer ran, else the last counted layer executed
            (a fully convolutional head); None for a model without counted layers.
        convention: the counting convention in words.
        non_gemm: the non-GEMM ops and the top-K selection cost (``count_flops(..., non_gemm=True)``), else None.
            When set, the ``*_all_ops`` figures are available and :meth:`to_dict` reports them.
    """

    layers: list[LayerFlops]
    input_shape: tuple[int, ...]
    batch_size: int = 1
    other_params: int = 0
    classifier: str | None = None
    convention: str = CONVENTION
    non_gemm: NonGemmCounts | None = field(default=None, repr=False)

    def _sum(self, attr: str) -> float:
        return sum(getattr(row, attr) for row in self.layers)

    @property
    def training_flops_reduction_pct(self) -> float:
        return _pct_reduction(self._sum("sparse_training_macs"), self._sum("dense_training_macs"))

    @property
    def inference_flops_reduction_pct(self) -> float:
        return _pct_reduction(self._sum("sparse_forward_macs"), self._sum("dense_forward_macs"))

    @property
    def act_memory_reduction_pct(self) -> float:
        total = self._sum("saved_activation_elements")
        kept = sum(r.activation_density * r.saved_activation_elements for r in self.layers)
        return _pct_reduction(kept, total)

    @property
    def model_compression_x(self) -> float:
        total = self._sum("weight_elements")
        nonzero = sum(r.weight_density * r.weight_elements for r in self.layers)
        if nonzero <= 0:
            return math.inf
        return total / nonzero

    def _require_non_gemm(self) -> NonGemmCounts:
        if self.non_gemm is None:
            raise ValueError("this report counts GEMMs only; use count_flops(..., non_gemm=True) for all-ops figures")
        return self.non_gemm

    def selection_macs(self) -> dict[str, float]:
        """Top-K selection MAC-equivalents per step at this report's densities: ``weight``, ``activation``,
        ``grad_output`` and ``total`` (counted as :class:`~sparsetrain.accounting.non_gemm.NonGemmOptions` says)."""
        counts = self._require_non_gemm()
        densities = {r.name: r.operand_densities for r in self.layers}

        def density(name: str, op: str) -> float:
            return layer_density(densities, name, op)

        out = selection_macs(self.layers, counts, density, self.batch_size)
        return out | {"total": sum(out.values())}

    def all_ops_totals(self, sparse: bool) -> dict[str, float]:
        """GEMM MACs plus non-GEMM MAC-equivalents (plus the top-K selection when ``sparse``).

        Keys: training_macs, inference_macs (forward GEMMs + inference-mode non-GEMM ops, no selection: an inference
        pass uses already-pruned weights), gemm_training_macs, non_gemm_training_macs, selection_macs.
        """
        counts = self._require_non_gemm()
        gemm = self.totals(sparse)
        selection = self.selection_macs()["total"] if sparse else 0.0
        return {
            "training_macs": gemm["training_macs"] + counts.training_macs() + selection,
            "inference_macs": gemm["forward_macs"] + counts.inference_macs(),
            "gemm_training_macs": gemm["training_macs"],
            "non_gemm_training_macs": counts.training_macs(),
            "selection_macs": selection,
        }

    @property
    def training_flops_reduction_pct_all_ops(self) -> float:
        """Training reduction with non-GEMM work and the top-K counted: dense = GEMMs + non-GEMM, sparse = sparse
        GEMMs + non-GEMM + selection."""
        return _pct_reduction(self.all_ops_totals(True)["training_macs"], self.all_ops_totals(False)["training_macs"])

    @property
    def inference_flops_reduction_pct_all_ops(self) -> float:
        """Inference reduction with the inference-mode non-GEMM ops counted (no selection)."""
        return _pct_reduction(self.all_ops_totals(True)["inference_macs"], self.all_ops_totals(False)["inference_macs"])

    def with_densities(self, densities: Mapping[str, Mapping[str, float]] | None) -> "FlopReport":
        """The same model and input, re-counted for other operand densities (no new forward pass).

        Example:
            >>> import torch.nn as nn
            >>> dense = count_flops(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), (8,))
            >>> dense.with_densities({"0": {"weight": 0.25}}).layers[0].sparse_forward_macs
            8.0
        """
        names = {r.name for r in self.layers}
        for layer, ops in (densities or {}).items():
            bad = sorted(set(ops or {}) - set(OPERANDS))
            if bad:
                raise ValueError(
                    f"densities[{layer!r}]: unknown operand(s) {bad}; valid choices: {', '.join(OPERANDS)}"
                )
        unknown = sorted(set(densities or {}) - names)
        if unknown:
            # A typo or a layer the forward never reached: say so rather than silently treating it as dense.
            logger.warning("densities given for layers not executed as conv/linear: %s", unknown)
        rows = []
        for r in self.layers:

            def d(op: str, _name: str = r.name) -> float:
                return layer_density(densities, _name, op)

            d_dy = d("grad_output")
            rows.append(
                replace(
                    r,
                    sparse_forward_macs=min(d("weight"), d("input")) * r.dense_forward_macs,
                    sparse_grad_input_macs=min(d("weight_for_grad_input"), d_dy) * r.dense_grad_input_macs,
                    sparse_grad_weight_macs=min(d("input_for_grad_weight"), d_dy) * r.dense_grad_weight_macs,
                    weight_density=d("weight"),
                    activation_density=d("input_for_grad_weight"),
                    grad_output_density=d_dy,
                    operand_densities={op: d(op) for op in OPERANDS},
                )
            )
        return replace(self, layers=rows)

    def totals(self, sparse: bool) -> dict[str, float]:
        """Dense (``sparse=False``) or sparse (non-zero / effectual) totals.

        Keys: forward_macs, grad_input_macs, grad_weight_macs, training_macs, weights (conv/linear weight elements),
        params (all parameters), params_excl_classifier (Changpinyo's count), saved_activation_elements (per sample).
        Sparse params count the non-zero conv/linear weights plus all biases and other parameters.
        """
        kind = "sparse" if sparse else "dense"
        out: dict[str, float] = {
            "forward_macs": self._sum(f"{kind}_forward_macs"),
            "grad_input_macs": self._sum(f"{kind}_grad_input_macs"),
            "grad_weight_macs": self._sum(f"{kind}_grad_weight_macs"),
            "training_macs": self._sum(f"{kind}_training_macs"),
        }
        weights = {r.name: (r.weight_density if sparse else 1.0) * r.weight_elements for r in self.layers}
        layer_params = {r.name: weights[r.name] + (r.params - r.weight_elements) for r in self.layers}
        out["weights"] = sum(weights.values())
        out["params"] = sum(layer_params.values()) + self.other_params
        out["params_excl_classifier"] = out["params"] - layer_params.get(self.classifier, 0.0)
        out["saved_activation_elements"] = sum(
            (r.activation_density if sparse else 1.0) * r.saved_activation_elements for r in self.layers
        )
        if not sparse:
            out = {k: int(round(v)) for k, v in out.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the summary figures, per-layer rows, totals and the convention.

        With non-GEMM counting on, also: ``training_flops_reduction_pct_all_ops``,
        ``inference_flops_reduction_pct_all_ops``, ``all_ops_totals`` (dense/sparse), ``non_gemm_macs`` (by kind,
        MAC-equivalents), ``topk_selection_macs``, ``non_gemm_options`` (the settings), ``non_gemm_ops`` (per module
        and ATen op, in FLOPs), ``non_gemm_unclassified_ops`` and ``non_gemm_convention``. Without it the dict is
        unchanged.
        """
        out = self._gemm_dict()
        if self.non_gemm is None:
            return out
        ng = self.non_gemm
        return out | {
            "training_flops_reduction_pct_all_ops": self.training_flops_reduction_pct_all_ops,
            "inference_flops_reduction_pct_all_ops": self.inference_flops_reduction_pct_all_ops,
            "all_ops_totals": {"dense": self.all_ops_totals(False), "sparse": self.all_ops_totals(True)},
            "non_gemm_macs": ng.by_kind(),
            "topk_selection_macs": self.selection_macs(),
            "non_gemm_options": asdict(ng.options),
            "non_gemm_ops": [op.to_dict() for op in ng.ops],
            "non_gemm_unclassified_ops": dict(ng.unclassified_ops),
            "non_gemm_convention": f"{NON_GEMM_CONVENTION} This report: 1 element-wise FLOP = "
            f"{ng.options.macs_per_flop:g} MAC.",
        }

    def _gemm_dict(self) -> dict[str, Any]:
        return {
            "training_flops_reduction_pct": self.training_flops_reduction_pct,
            "inference_flops_reduction_pct": self.inference_flops_reduction_pct,
            "act_memory_reduction_pct": self.act_memory_reduction_pct,
            "model_compression_x": self.model_compression_x,
            "layers": [r.to_dict() for r in self.layers],
            "dense_totals": self.totals(sparse=False),
            "sparse_totals": self.totals(sparse=True),
            "convention": (
                f"{self.convention} Counts for a batch of {self.batch_size} x {tuple(self.input_shape)}; "
                f"classifier (excluded from params_excl_classifier): {self.classifier}."
            ),
        }


@dataclass
class _Trace:
    module: nn.Module
    forward_macs: int = 0
    grad_input_macs: int = 0
    input_elements: int = 0
    input_rows: int = 0
    calls: int = 0


def _layer_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Dense MACs of one call of a conv/linear layer, from its actual input and output."""
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features  # every leading dim is a batch of GEMM rows
        return rows * module.in_features * module.out_features
    # Convolution: each output element needs (C_in / groups) * prod(kernel) MACs.
    return y.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _trace_layers(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    observer: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> tuple[dict[str, _Trace], list[str], str | None]:
    """Run one real forward; return per-layer traces, call order and the last layer called.

    Sparse layers report their input and output through the operand seam (:func:`sparsetrain.layers.observe`; they
    compute as the plain modules under dense mode); plain modules, which run no sparsetrain code, through forward
    hooks. ``observer()`` is entered around the forward call (the non-GEMM recorder), inside eval and dense mode.
    """
    names = {id(m): n for n, m in model.named_modules() if counted_layer(m)}
    traces: dict[str, _Trace] = {}
    order: list[str] = []
    last: list[str | None] = [None]
    inputs: dict[int, tuple[torch.Tensor, bool]] = {}  # a sparse layer's input event, until its output event

    def record(module: nn.Module, x: torch.Tensor, x_requires_grad: bool, y: torch.Tensor) -> None:
        name = names[id(module)]
        if name not in traces:
            traces[name] = _Trace(module)
            order.append(name)
        t = traces[name]
        macs = _layer_macs(module, x, y)
        t.forward_macs += macs
        # Autograd only computes dx when x needs a gradient, i.e. not for layers fed by the data.
        t.grad_input_macs += macs if x_requires_grad else 0
        t.input_elements += x.numel() // batch_size
        # Rows of the 2-D view of the saved input: feature maps (channels) for a conv, GEMM rows for a linear layer.
        t.input_rows += (
            module.in_channels if not isinstance(module, nn.Linear) else x.numel() // module.in_features // batch_size
        )
        t.calls += 1
        last[0] = name

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        y = output[0] if isinstance(output, (tuple, list)) else output
        record(module, args[0], args[0].requires_grad, y)

    def on_event(ev: OperandEvent) -> None:
        if ev.module is None or id(ev.module) not in names:  # a sparse layer of another model
            return
        if ev.operand == "input":
            inputs[id(ev.module)] = (ev.before, ev.requires_grad)
        elif ev.operand == "output":
            x, x_requires_grad = inputs.pop(id(ev.module))
            record(ev.module, x, x_requires_grad, ev.before)

    # Not the seam: a plain module runs no sparsetrain code, so only a forward hook sees its shapes.
    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) in names and not is_sparse_layer(m)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((batch_size, *input_shape), generator=gen).to(device=device, dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        # eval(): BatchNorm must not update running stats nor fail on 1x1 maps at batch 1. Grad stays on so that
        # requires_grad tells which layer inputs need a gradient. dense_mode(): only shapes matter here, and a
        # sparse layer's own forward would refresh its cached top-K thresholds from this random input.
        model.eval()
        extra = observer() if observer else contextlib.nullcontext()
        with torch.enable_grad(), dense_mode(), observe(on_event), extra:
            model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return traces, order, last[0]


def count_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    densities: Mapping[str, Mapping[str, float]] | None = None,
    *,
    batch_size: int = 1,
    count_first_layer_grad_input: bool = False,
    non_gemm: bool | NonGemmOptions = False,
) -> FlopReport:
    """Count dense and sparse MACs of one training step of ``model`` on a batch of ``input_shape`` inputs.

    Runs one real forward pass (eval mode, autograd on, random input) with forward hooks on every conv/linear
    layer to get the actual input/output shapes, so any architecture (residuals, concatenations, reused modules)
    is handled. Sparse layers run dense during that pass (:func:`sparsetrain.layers.dense_mode`), so the model's
    sparsity state -- cached thresholds, measured densities, BatchNorm statistics -- is left untouched.
    See the module docstring for the convention.

    Args:
        model: the network (dense or sparsified; sparse layers subclass ``nn.Conv2d``/``nn.Linear``).
        input_shape: per-sample input shape, e.g. ``(3, 32, 32)``.
        densities: ``{layer: {operand: density}}`` as returned by ``SparsityHandle.densities()``; None = dense.
        batch_size: batch the MAC counts refer to (layer inputs' saved elements stay per sample).
        count_first_layer_grad_input: also count ``dx`` of layers whose input needs no gradient.
        non_gemm: also count the non-GEMM work of a training step (BatchNorm, ReLU, pooling, residual additions,
            biases, dropout, the loss) and the top-K selection, from the same forward pass
            (:mod:`sparsetrain.accounting.non_gemm`); the report then has the ``*_all_ops`` figures. ``True`` uses
            the default :class:`~sparsetrain.accounting.non_gemm.NonGemmOptions` (every threshold recomputed on
            every step, Quickselect, 1 FLOP = 0.5 MAC); pass an instance for other settings. Off (``False``), the
            report is exactly the GEMM-only one.

    Returns:
        A :class:`FlopReport`.

    Example:
        >>> import torch.nn as nn
        >>> rep = count_flops(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), (8,), {"1": {"weight": 0.5}})
        >>> rep.layers[1].sparse_forward_macs, round(rep.inference_flops_reduction_pct, 6)
        (4.0, 10.0)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(non_gemm, (bool, NonGemmOptions)):
        raise ValueError(f"non_gemm must be True, False or a NonGemmOptions, got {non_gemm!r}")
    options = NonGemmOptions() if non_gemm is True else (non_gemm or None)
    input_shape = tuple(int(s) for s in input_shape)
    recorded: dict[str, Any] = {}
    observer = (lambda: record_non_gemm(model, recorded)) if options else None
    traces, order, last = _trace_layers(model, input_shape, batch_size, observer)
    rows: list[LayerFlops] = []
    counted_params: set[int] = set()
    for name in order:
        t = traces[name]
        m = t.module
        f = t.forward_macs
        params = sum(p.numel() for p in m.parameters(recurse=False))
        counted_params.update(id(p) for p in m.parameters(recurse=False))
        rows.append(
            LayerFlops(
                name=name,
                type=type(m).__name__,
                dense_forward_macs=f,
                dense_grad_input_macs=f if count_first_layer_grad_input else t.grad_input_macs,
                dense_grad_weight_macs=f,
                sparse_forward_macs=f,
                sparse_grad_input_macs=f if count_first_layer_grad_input else t.grad_input_macs,
                sparse_grad_weight_macs=f,
                weight_density=1.0,
                activation_density=1.0,
                grad_output_density=1.0,
                params=params,
                saved_activation_elements=t.input_elements,
                weight_elements=m.weight.numel(),
                saved_activation_rows=t.input_rows,
            )
        )
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted_params)
    from sparsetrain.recipe import find_classifier

    # The model's own classifier (declared by the registry, else its last nn.Linear), as the recipes' last-layer
    # rule sees it; a fully convolutional head has none, and then its last counted layer run is the classifier.
    classifier = find_classifier(model)
    dense = FlopReport(
        layers=rows,
        input_shape=input_shape,
        batch_size=batch_size,
        other_params=other,
        classifier=classifier if classifier in traces else last,
        non_gemm=replace(recorded["counts"], options=options) if options else None,
    )
    return dense.with_densities(densities) if densities else dense


def format_count(n: float) -> str:
    """``1234567 -> '1.23M'`` (k, M, G with two decimals)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(report: FlopReport) -> str:
    """Per-layer table (MACs), totals and summary figures as plain text."""
    head = (
        f"{'layer':<28} {'type':<14} {'fwd':>9} {'dx':>9} {'dW':>9} {'sp fwd':>9} {'sp dx':>9} {'sp dW':>9} "
        f"{'d_w':>5} {'d_a':>5} {'d_dy':>5} {'params':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in report.layers:
        lines.append(
            f"{r.name[:28]:<28} {r.type[:14]:<14} {format_count(r.dense_forward_macs):>9} {format_count(r.dense_grad_input_macs):>9} "
            f"{format_count(r.dense_grad_weight_macs):>9} {format_count(r.sparse_forward_macs):>9} "
            f"{format_count(r.sparse_grad_input_macs):>9} {format_count(r.sparse_grad_weight_macs):>9} "
            f"{r.weight_density:>5.2f} {r.activation_density:>5.2f} {r.grad_output_density:>5.2f} {format_count(r.params):>9}"
        )
    lines.append("-" * len(head))
    dense, sparse = report.totals(False), report.totals(True)
    lines.append(
        f"{'total MACs':<43} {format_count(dense['forward_macs']):>9} {format_count(dense['grad_input_macs']):>9} "
        f"{format_count(dense['grad_weight_macs']):>9} {format_count(sparse['forward_macs']):>9} "
        f"{format_count(sparse['grad_input_macs']):>9} {format_count(sparse['grad_weight_macs']):>9}"
    )
    lines += [
        "",
        f"batch {report.batch_size} x {tuple(report.input_shape)}",
        f"training MACs          dense {format_count(dense['training_macs'])}  sparse {format_count(sparse['training_macs'])}"
        f"  (FLOPs = 2 x MACs)",
        f"params                 dense {format_count(dense['params'])}  non-zero {format_count(sparse['params'])}",
        f"params excl. classifier dense {format_count(dense['params_excl_classifier'])}  "
        f"non-zero {format_count(sparse['params_excl_classifier'])}  (classifier: {report.classifier})",
        f"training FLOPs reduction   {report.training_flops_reduction_pct:6.2f} %",
        f"inference FLOPs reduction  {report.inference_flops_reduction_pct:6.2f} %",
        f"activation memory (Act) reduction {report.act_memory_reduction_pct:6.2f} %",
        f"model compression          {report.model_compression_x:6.2f} x",
        "",
        f"convention: {report.convention}",
    ]
    if report.non_gemm is not None:
        lines += ["", format_non_gemm(report)]
    return "\n".join(lines)


def format_non_gemm(report: FlopReport) -> str:
    """The non-GEMM breakdown by kind, the top-K cost and both conventions' reductions (needs ``non_gemm=True``)."""
    ng = report._require_non_gemm()
    kinds = ng.by_kind()
    dense_gemm, sparse_gemm = report.totals(False), report.totals(True)
    head = f"{'non-GEMM (MAC-equivalents)':<28} {'forward':>9} {'backward':>9} {'training':>9} {'% dense':>8}"
    lines = [head, "-" * len(head)]
    dense_all = report.all_ops_totals(False)["training_macs"]
    for kind, row in kinds.items():
        if kind != "total" and row["training_macs"] == 0:
            continue
        if kind == "total":
            lines.append("-" * len(head))
        lines.append(
            f"{kind:<28} {format_count(row['forward_macs']):>9} {format_count(row['backward_macs']):>9} "
            f"{format_count(row['training_macs']):>9} {100 * row['training_macs'] / dense_all:>7.2f}%"
        )
    sel = report.selection_macs()
    s = ng.options
    c = "Quickselect 2+2H(d)" if s.comparisons_per_element is None else f"{s.comparisons_per_element:g}"
    lines += [
        "",
        f"top-K selection (sparse only): weight {format_count(sel['weight'])}  activation "
        f"{format_count(sel['activation'])}  grad_output {format_count(sel['grad_output'])}  total "
        f"{format_count(sel['total'])}",
        f"  (comparisons/element {c}; threshold period: weight {s.weight_period}, activation {s.activation_period}; "
        f"mask pass {s.mask_flops_per_element:g} FLOPs/element/step; weights selected once per "
        f"{s.training_batch or report.batch_size} samples; 1 element-wise FLOP = {s.macs_per_flop:g} MAC)",
        f"training MACs, all ops   dense {format_count(dense_all)} = GEMM {format_count(dense_gemm['training_macs'])} "
        f"+ non-GEMM {format_count(kinds['total']['training_macs'])}",
        f"                         sparse {format_count(report.all_ops_totals(True)['training_macs'])} = GEMM "
        f"{format_count(sparse_gemm['training_macs'])} + non-GEMM {format_count(kinds['total']['training_macs'])} "
        f"+ top-K {format_count(sel['total'])}",
        f"training FLOPs reduction   GEMM only {report.training_flops_reduction_pct:6.2f} %   all ops "
        f"{report.training_flops_reduction_pct_all_ops:6.2f} %",
        f"inference FLOPs reduction  GEMM only {report.inference_flops_reduction_pct:6.2f} %   all ops "
        f"{report.inference_flops_reduction_pct_all_ops:6.2f} %",
    ]
    if ng.unclassified_ops:
        lines.append(f"not counted (unclassified ATen ops): {ng.unclassified_ops}")
    lines.append(f"non-GEMM convention: {NON_GEMM_CONVENTION}")
    return "\n".join(lines)
