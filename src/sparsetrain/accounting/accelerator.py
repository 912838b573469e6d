"""Analytical cycle model of a sparse training accelerator that executes only effectual MACs.

SWAT (section 4.4) estimates speedups with a simulator of a sparse accelerator (an extension of Bit-Tactical):
a 2-D array of processing elements (PEs), each with an array of multipliers, that "counts only the effectual
computation" (both operands non-zero), with buffers large enough to hide memory latency. This module is an
analytical model in that spirit, fed with the *real* operand tensors of a training step:

* **Effectual MACs, exactly.** For every output element of each GEMM the number of effectual MACs is the number
  of operand pairs that are both non-zero. That is the same convolution applied to the 0/1 masks of the operands:

  - forward ``y = conv(x, W)``: ``conv2d(x!=0, W!=0)`` (per output element);
  - grad-input ``dx = G(dy, W)``: ``conv2d_input(dy!=0, W!=0)`` (per input element);
  - grad-weight ``dW = H(dy, x)``: ``conv2d_weight(x!=0, dy!=0)`` (per weight element);
  - linear layers: the matrix products of the masks.

  Padding taps are zero in both the sparse and the dense case, so they are never effectual.
* **Work units.** The output of each GEMM is split into units: ``granularity="channel"`` makes one unit per output
  channel (per input channel for grad-input, per filter for grad-weight); ``"pixel"`` makes units of
  ``pixel_group`` consecutive output elements of one channel (channel-major order).
* **Scheduling.** ``num_pes`` PEs, each with ``multipliers_per_pe`` multipliers; units are dealt to the PEs
  statically in waves of ``num_pes`` (unit ``i`` goes to wave ``i // num_pes``); a unit takes
  ``ceil(effectual MACs / multipliers_per_pe)`` cycles and a wave lasts as long as its slowest PE (load
  imbalance); a GEMM's cycles are the sum over its waves. No memory stalls, no zero-detection overhead.
* **Dense baseline**: the same computation with every operand element non-zero (all-ones masks), so a step
  whose tensors contain no zeros gives exactly 1.0x.

The operands are those the layer *actually* uses (:func:`capture_step`): for ``SparseConv2d``/``SparseLinear``
the ``after`` tensors of the layer's operand events (:func:`sparsetrain.layers.observe`): ``input`` and ``weight``
for the forward, ``grad_output`` (after any gradient pruning) with ``weight_for_grad_input`` for grad-input and with
``input_for_grad_weight`` for grad-weight; for plain conv/linear layers the module input, its weight and the
gradient reaching its output. The grad-input GEMM of a layer whose input needs
no gradient (the first layer) is not executed and not counted, as in :mod:`sparsetrain.accounting.flops`.

Example:
    >>> import torch
    >>> w = torch.tensor([[[[1.0, 0.0], [2.0, 3.0]]]]); x = torch.ones(1, 1, 3, 3); x[0, 0, 0, 0] = 0
    >>> cap = GemmCapture.conv("c", x, w, torch.ones(1, 1, 2, 2))
    >>> effectual_macs(cap, "forward")[0, 0]
    tensor([[2., 3.],
            [3., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparsetrain.layers import counted_layer, is_sparse_layer

__all__ = [
    "PASSES",
    "GRANULARITIES",
    "AcceleratorConfig",
    "GemmCapture",
    "effectual_macs",
    "gemm_cycles",
    "LayerCycles",
    "AcceleratorReport",
    "simulate_capture",
    "capture_step",
    "simulate",
]

PASSES = ("forward", "grad_input", "grad_weight")
GRANULARITIES = ("channel", "pixel")


@dataclass(frozen=True)
class AcceleratorConfig:
    """Parameters of the PE-array model (see the module docstring).

    Attributes:
        num_pes: processing elements working in parallel (a 16x16 array = 256).
        multipliers_per_pe: multipliers per PE, i.e. effectual MACs a PE retires per cycle.
        granularity: ``"channel"`` (one work unit per output channel) or ``"pixel"`` (``pixel_group`` outputs).
        pixel_group: outputs per work unit for ``granularity="pixel"``.
    """

    num_pes: int = 64
    multipliers_per_pe: int = 16
    granularity: str = "pixel"
    pixel_group: int = 16

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid choices: {', '.join(GRANULARITIES)}")
        for name in ("num_pes", "multipliers_per_pe", "pixel_group"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class GemmCapture:
    """0/1 masks of the operands of one conv/linear layer's three GEMMs for one training step.

    ``None`` for an operand means its GEMM did not run (e.g. ``weight_for_grad_input`` of the first layer).
    ``conv_args`` holds ``stride, padding, dilation, groups`` for convolutions; None for linear layers.
    Linear operands are 2-D (rows = every leading dimension flattened).
    """

    name: str
    kind: str  # "conv" | "linear"
    weight: Tensor
    input: Tensor
    grad_output: Tensor | None = None
    weight_for_grad_input: Tensor | None = None
    input_for_grad_weight: Tensor | None = None
    conv_args: tuple[Any, Any, Any, int] | None = None

    @staticmethod
    def _mask(t: Tensor | None) -> Tensor | None:
        return None if t is None else (t.detach() != 0)

    @classmethod
    def conv(
        cls,
        name: str,
        x: Tensor,
        w: Tensor,
        dy: Tensor | None = None,
        *,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        w_for_grad_input: Tensor | None = None,
        x_for_grad_weight: Tensor | None = None,
        grad_input: bool = True,
    ) -> "GemmCapture":
        """Capture from tensors. Backward operands default to the forward ones; ``grad_input=False`` skips ``dx``."""
        w_gi = w if w_for_grad_input is None else w_for_grad_input
        x_gw = x if x_for_grad_weight is None else x_for_grad_weight
        return cls(
            name=name,
            kind="conv",
            weight=cls._mask(w),
            input=cls._mask(x),
            grad_output=cls._mask(dy),
            weight_for_grad_input=cls._mask(w_gi) if (dy is not None and grad_input) else None,
            input_for_grad_weight=cls._mask(x_gw) if dy is not None else None,
            conv_args=(_pair(stride), _pair(padding), _pair(dilation), int(groups)),
        )

    @classmethod
    def linear(
        cls,
        name: str,
        x: Tensor,
        w: Tensor,
        dy: Tensor | None = None,
        *,
        w_for_grad_input: Tensor | None = None,
        x_for_grad_weight: Tensor | None = None,
        grad_input: bool = True,
    ) -> "GemmCapture":
        """Linear-layer capture; inputs of any rank are flattened to ``(rows, features)``."""
        w_gi = w if w_for_grad_input is None else w_for_grad_input
        x_gw = x if x_for_grad_weight is None else x_for_grad_weight

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1, t.shape[-1])

        return cls(
            name=name,
            kind="linear",
            weight=cls._mask(w),
            input=cls._mask(flat(x)),
            grad_output=cls._mask(flat(dy)),
            weight_for_grad_input=cls._mask(w_gi) if (dy is not None and grad_input) else None,
            input_for_grad_weight=cls._mask(flat(x_gw)) if dy is not None else None,
        )

    def ran(self, pass_: str) -> bool:
        """Whether the GEMM of ``pass_`` was executed in the captured step."""
        if pass_ == "forward":
            return True
        if pass_ == "grad_input":
            return self.grad_output is not None and self.weight_for_grad_input is not None
        if pass_ == "grad_weight":
            return self.grad_output is not None and self.input_for_grad_weight is not None
        raise ValueError(f"unknown pass {pass_!r}; valid choices: {', '.join(PASSES)}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)  # type: ignore[return-value]


def _f(mask: Tensor, dense: bool) -> Tensor:
    # float32 counts are exact integers below 2**24; the largest count is checked in effectual_macs.
    return torch.ones(mask.shape, dtype=torch.float32) if dense else mask.to(torch.float32)


def effectual_macs(capture: GemmCapture, pass_: str, *, dense: bool = False) -> Tensor:
    """Effectual MACs per output element of one GEMM (``dense=True``: with all-ones operand masks).

    Output shapes: forward ``y``'s shape; grad-input ``x``'s shape; grad-weight ``W``'s shape.
    """
    if not capture.ran(pass_):
        raise ValueError(f"layer {capture.name!r}: the {pass_} GEMM was not captured")
    c = capture
    if pass_ == "forward":
        a, b = _f(c.input, dense), _f(c.weight, dense)
    elif pass_ == "grad_input":
        a, b = _f(c.grad_output, dense), _f(c.weight_for_grad_input, dense)
    else:
        a, b = _f(c.grad_output, dense), _f(c.input_for_grad_weight, dense)
    if c.kind == "linear":
        if pass_ == "forward":
            out = a @ b.t()  # (rows, in) x (out, in)^T
        elif pass_ == "grad_input":
            out = a @ b  # (rows, out) x (out, in)
        else:
            out = a.t() @ b  # (out, rows) x (rows, in)
    else:
        stride, padding, dilation, groups = c.conv_args  # type: ignore[misc]
        if pass_ == "forward":
            out = F.conv2d(a, b, None, stride, padding, dilation, groups)
        elif pass_ == "grad_input":
            out = torch.nn.grad.conv2d_input(tuple(c.input.shape), b, a, stride, padding, dilation, groups)
        else:
            out = torch.nn.grad.conv2d_weight(b, tuple(c.weight.shape), a, stride, padding, dilation, groups)
    out = torch.round(out)
    if out.numel() and float(out.max()) >= 2**24:
        raise OverflowError(f"layer {c.name!r}: {pass_} counts exceed float32's exact integer range")
    return out


def _units(counts: Tensor, pass_: str, kind: str, cfg: AcceleratorConfig) -> Tensor:
    """Effectual MACs per work unit, in scheduling order."""
    # Channel axis of the GEMM output: dim 1 of activation-shaped outputs, dim 0 of weight-shaped ones.
    ch_dim = 0 if pass_ == "grad_weight" else 1
    per_channel = counts.movedim(ch_dim, 0).reshape(counts.shape[ch_dim], -1)
    if cfg.granularity == "channel":
        return per_channel.sum(1)
    flat = per_channel.reshape(-1)
    pad = (-flat.numel()) % cfg.pixel_group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, cfg.pixel_group).sum(1)


def gemm_cycles(units: Tensor, cfg: AcceleratorConfig) -> int:
    """Cycles of a GEMM whose work units hold ``units`` effectual MACs each (static waves, slowest PE per wave)."""
    if units.numel() == 0:
        return 0
    cycles = torch.ceil(units.to(torch.float64) / cfg.multipliers_per_pe)
    pad = (-cycles.numel()) % cfg.num_pes
    if pad:
        cycles = torch.cat([cycles, cycles.new_zeros(pad)])
    return int(cycles.reshape(-1, cfg.num_pes).amax(1).sum().item())


@dataclass
class LayerCycles:
    """Dense and sparse cycles and MACs of one layer's three GEMMs (summed over the simulated steps)."""

    name: str
    dense_cycles: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PASSES})
    sparse_cycles: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PASSES})
    dense_macs: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PASSES})
    effectual_macs: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PASSES})

    def add(self, other: "LayerCycles") -> None:
        for p in PASSES:
            self.dense_cycles[p] += other.dense_cycles[p]
            self.sparse_cycles[p] += other.sparse_cycles[p]
            self.dense_macs[p] += other.dense_macs[p]
            self.effectual_macs[p] += other.effectual_macs[p]

    def speedup(self, pass_: str | None = None) -> float:
        """Dense / sparse cycles of one pass, or of all three (``None``); 1.0 for a GEMM that never ran."""
        passes = PASSES if pass_ is None else (pass_,)
        d = sum(self.dense_cycles[p] for p in passes)
        s = sum(self.sparse_cycles[p] for p in passes)
        if d == 0:
            return 1.0
        return d / s if s else math.inf


def simulate_capture(capture: GemmCapture, cfg: AcceleratorConfig | None = None) -> LayerCycles:
    """Cycles and MACs of the captured GEMMs of one layer."""
    cfg = cfg or AcceleratorConfig()
    out = LayerCycles(capture.name)
    for p in PASSES:
        if not capture.ran(p):
            continue
        for dense in (True, False):
            counts = effectual_macs(capture, p, dense=dense)
            cyc = gemm_cycles(_units(counts, p, capture.kind, cfg), cfg)
            macs = int(counts.sum(dtype=torch.float64).item())
            if dense:
                out.dense_cycles[p], out.dense_macs[p] = cyc, macs
            else:
                out.sparse_cycles[p], out.effectual_macs[p] = cyc, macs
    return out


@dataclass
class AcceleratorReport:
    """Per-layer cycles plus per-pass and overall speedups (dense cycles / sparse cycles)."""

    layers: list[LayerCycles]
    config: AcceleratorConfig
    steps: int = 1

    def _total(self, attr: str, passes: Sequence[str]) -> int:
        return sum(getattr(r, attr)[p] for r in self.layers for p in passes)

    @staticmethod
    def _passes(pass_: str | None) -> tuple[str, ...]:
        passes = {None: PASSES, "backward": ("grad_input", "grad_weight")}.get(pass_, (pass_,))
        for p in passes:
            if p not in PASSES:
                raise ValueError(f"unknown pass {pass_!r}; valid choices: {', '.join(PASSES)}, backward, None")
        return passes  # type: ignore[return-value]

    def cycles(self, pass_: str | None = None, *, sparse: bool = True) -> int:
        """Simulated cycles of one pass, of ``"backward"`` or of the whole step (``None``); ``sparse=False``: the
        all-non-zero baseline."""
        return self._total("sparse_cycles" if sparse else "dense_cycles", self._passes(pass_))

    def speedup_over(self, baseline: "AcceleratorReport", pass_: str | None = None) -> float:
        """Speedup over another run *on the same zero-skipping accelerator*, e.g. SWAT vs dense training (whose
        ReLU / max-pool zeros the accelerator skips too). Normalised per step when the step counts differ."""
        mine = self.cycles(pass_) / self.steps
        return (baseline.cycles(pass_) / baseline.steps) / mine if mine else math.inf

    def speedup(self, pass_: str | None = None) -> float:
        """Overall speedup of one pass (``"forward"``, ``"grad_input"``, ``"grad_weight"``), of the backward pass
        (``"backward"`` = both backward GEMMs) or of the whole step (``None``)."""
        passes = self._passes(pass_)
        d, s = self._total("dense_cycles", passes), self._total("sparse_cycles", passes)
        if d == 0:
            return 1.0
        return d / s if s else math.inf

    def effectual_fraction(self, pass_: str | None = None) -> float:
        """Effectual / dense MACs (exact counterpart of the min-operand density used by ``count_flops``)."""
        passes = self._passes(pass_)
        d = self._total("dense_macs", passes)
        return self._total("effectual_macs", passes) / d if d else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "steps": self.steps,
            "speedup": {p: self.speedup(p) for p in PASSES}
            | {"backward": self.speedup("backward"), "total": self.speedup()},
            "effectual_fraction": {p: self.effectual_fraction(p) for p in PASSES}
            | {"total": self.effectual_fraction()},
            "layers": [
                asdict(r) | {"speedup": {p: r.speedup(p) for p in PASSES} | {"total": r.speedup()}} for r in self.layers
            ],
        }

    def format_table(self) -> str:
        c = self.config
        head = f"{'layer':<28} {'fwd x':>7} {'dx x':>7} {'dW x':>7} {'total x':>8} {'eff. MACs':>10}"
        lines = [
            f"PE array: {c.num_pes} PEs x {c.multipliers_per_pe} multipliers, units per {c.granularity}"
            + (f" ({c.pixel_group} outputs)" if c.granularity == "pixel" else "")
            + f", {self.steps} step(s)",
            head,
            "-" * len(head),
        ]
        for r in self.layers:
            dm = sum(r.dense_macs.values())
            frac = sum(r.effectual_macs.values()) / dm if dm else 1.0
            lines.append(
                f"{r.name[:28]:<28} {r.speedup('forward'):>7.2f} {r.speedup('grad_input'):>7.2f} "
                f"{r.speedup('grad_weight'):>7.2f} {r.speedup():>8.2f} {100 * frac:>9.1f}%"
            )
        lines += [
            "-" * len(head),
            f"{'overall':<28} {self.speedup('forward'):>7.2f} {self.speedup('grad_input'):>7.2f} "
            f"{self.speedup('grad_weight'):>7.2f} {self.speedup():>8.2f} {100 * self.effectual_fraction():>9.1f}%",
            f"backward pass speedup: {self.speedup('backward'):.2f}x",
        ]
        return "\n".join(lines)


# Operand events of a sparse layer (sparsetrain.layers.OperandEvent) -> keys of a capture record. The GEMMs are
# f(input, weight), G(grad_output, weight_for_grad_input) and H(grad_output, input_for_grad_weight) on the events'
# ``after`` tensors; grad_input / grad_weight only say that their GEMM ran.
_EVENT_KEYS = {
    "input": "x",
    "weight": "w",
    "weight_for_grad_input": "w_b",
    "input_for_grad_weight": "x_b",
    "grad_output": "dy",
}
_FORWARD_KEYS = ("x", "w", "w_b", "x_b")


def _event_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A sparse layer's events as the record :func:`_to_capture` reads (the backward operands of GEMMs that ran)."""
    out = {"module": rec["module"], "x": rec["x"], "w": rec["w"]}
    if "dy" in rec:
        out["dy"] = rec["dy"]
        out["w_gi"] = rec.get("w_b") if rec.get("ran_dx") else None
        out["x_gw"] = rec.get("x_b") if rec.get("ran_dw") else None
    return out


@contextmanager
def _capturing(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Record the operands every conv/linear GEMM uses during one forward+backward.

    A sparse layer reports the operands its GEMMs actually use through the public seam
    (:func:`sparsetrain.layers.observe`; dense ones when its spec is dense). A plain module runs no sparsetrain code,
    so it gets a forward hook and a tensor hook on its output (its input, its weight and the gradient reaching its
    output). ``order`` holds every layer's name in first-call order.
    """
    from sparsetrain.layers import observe

    hooked: dict[str, dict[str, Any]] = {}
    observed: dict[str, dict[str, Any]] = {}
    order: dict[str, None] = {}
    handles: list[Any] = []
    names = {id(m): n for n, m in model.named_modules() if counted_layer(m)}
    layer_names = set(names.values())

    def dense_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            x = inputs[0]
            rec = {"module": m, "x": x.detach(), "w": m.weight.detach(), "needs_dx": x.requires_grad}
            hooked[name] = rec
            order.setdefault(name)
            if output.requires_grad:

                def grad_hook(g: Tensor) -> None:
                    rec["dy"] = g.detach()
                    rec["x_gw"] = rec["x"] if m.weight.requires_grad else None
                    rec["w_gi"] = rec["w"] if rec["needs_dx"] else None

                output.register_hook(grad_hook)  # a plain module: no seam reports its dy

        return hook

    def on_event(ev: Any) -> None:
        name = names.get(id(ev.module)) if ev.module is not None else (ev.layer if ev.layer in layer_names else None)
        if name is None:  # a sparse layer of another model
            return
        order.setdefault(name)
        key = _EVENT_KEYS.get(ev.operand)
        rec = observed.get(name)
        if rec is None or (key in _FORWARD_KEYS and key in rec):  # a new forward call replaces the last one
            rec = observed[name] = {"module": ev.module}
        if key is not None:
            # Only the zero pattern matters; a mask also survives later in-place ops on the tensor.
            rec[key] = ev.after != 0
        elif ev.operand == "grad_input":
            rec["ran_dx"] = True
        elif ev.operand == "grad_weight":
            rec["ran_dw"] = True

    for name, m in model.named_modules():
        if counted_layer(m) and not is_sparse_layer(m):
            # Not the seam: a plain module runs no sparsetrain code, so only hooks see its operands.
            handles.append(m.register_forward_hook(dense_hook(name)))
    try:
        with observe(on_event):
            yield {"hooked": hooked, "observed": observed, "order": order}
    finally:
        for h in handles:
            h.remove()


def _to_capture(name: str, rec: dict[str, Any]) -> GemmCapture:
    m = rec["module"]
    dy = rec.get("dy")
    kw = dict(
        w_for_grad_input=rec.get("w_gi"),
        x_for_grad_weight=rec.get("x_gw"),
        grad_input=rec.get("w_gi") is not None,
    )
    if isinstance(m, nn.Linear):
        cap = GemmCapture.linear(name, rec["x"], rec["w"], dy, **kw)
    else:
        cap = GemmCapture.conv(
            name,
            rec["x"],
            rec["w"],
            dy,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            **kw,
        )
    if dy is not None and rec.get("x_gw") is None:
        cap.input_for_grad_weight = None  # frozen weight: no grad-weight GEMM ran
    return cap


def capture_step(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[GemmCapture]:
    """Run one forward+backward and return the operand masks of every conv/linear layer (first-call order).

    A layer called several times in one step keeps its last call. Gradients are left in ``.grad``; no
    optimizer step is taken.
    """
    loss_fn = loss_fn or F.cross_entropy
    with _capturing(model) as records:
        out = model(inputs)
        loss = loss_fn(out, targets) if targets is not None else out.float().sum()
        loss.backward()
    hooked, observed = records["hooked"], records["observed"]
    return [
        _to_capture(name, _event_record(observed[name]) if name in observed else hooked[name])
        for name in records["order"]
    ]


def simulate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    cfg: AcceleratorConfig | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    handle: Any = None,
) -> AcceleratorReport:
    """Simulate the accelerator on real training steps, one per ``(inputs, targets)`` batch.

    Args:
        model: the network (sparsified or dense), in the mode to simulate (normally ``train()``).
        batches: iterable of ``(inputs, targets)``.
        cfg: accelerator parameters.
        loss_fn: default cross-entropy.
        optimizer: if given, ``zero_grad`` / ``step`` around every batch (a real training step).
        handle: a ``SparsityHandle`` to ``step()`` after each optimizer step (periodic thresholds, SWAT-M).

    Returns:
        An :class:`AcceleratorReport` summed over the steps.
    """
    cfg = cfg or AcceleratorConfig()
    totals: dict[str, LayerCycles] = {}
    steps = 0
    for inputs, targets in batches:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        for cap in capture_step(model, inputs, targets, loss_fn=loss_fn):
            totals.setdefault(cap.name, LayerCycles(cap.name)).add(simulate_capture(cap, cfg))
        if optimizer is not None:
            optimizer.step()
            if handle is not None:
                handle.step()
        steps += 1
    if steps == 0:
        raise ValueError("simulate() needs at least one batch")
    return AcceleratorReport(layers=list(totals.values()), config=cfg, steps=steps)
