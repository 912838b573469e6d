"""Sparse Conv2d / Linear: one custom autograd Function that sparsifies each operand of each GEMM.

Forward:   ``y = out( f(inp(x), w(W)) )``
Backward:  ``dy' = grad_output(dy * out_mask)``
           ``dx = grad_input( G(dy', weight_for_grad_input(W)) ) * input_mask``
           ``dW = grad_weight( H(dy', input_for_grad_weight(x)) [* weight_mask if mask_inactive_grads] )``

``weight_for_grad_input`` / ``input_for_grad_weight`` default to the tensors the forward used (SWAT: the sparse
W; and, since SWAT keeps the forward activation dense, an explicit top-K on x for the weight-gradient GEMM).
Only the tensors backward needs are saved, and when an operand is sparsified for backward it is the sparse one
that is saved. With every operand dense the module runs ``nn.Conv2d.forward`` / ``nn.Linear.forward`` itself, so
results are bit-identical to the dense layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparsetrain import sparsifiers as sp

__all__ = ["LayerSpec", "INHERIT", "OPERANDS", "SparseConv2d", "SparseLinear", "LayerState", "SPARSE_TYPES"]


class _Inherit:
    """Sentinel: a per-GEMM operand reuses the forward's tensor (the torchao default for per-GEMM overrides)."""

    _instance = None

    def __new__(cls) -> "_Inherit":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()

OPERANDS = (
    "weight",
    "input",
    "output",
    "grad_output",
    "grad_input",
    "grad_weight",
    "weight_for_grad_input",
    "input_for_grad_weight",
)


@dataclass(frozen=True)
class LayerSpec:
    """Per-operand sparsifier configs for one layer; ``None`` = dense, ``INHERIT`` = as in the forward.

    ``mask_inactive_grads`` zeroes the weight gradient of weights the forward masked (SWAT Fig. 7 ablation; also
    what a *fixed* topology such as Changpinyo's random channel mask needs).
    """

    weight: sp.SparsifierConfig | None = None
    input: sp.SparsifierConfig | None = None
    output: sp.SparsifierConfig | None = None
    grad_output: sp.SparsifierConfig | None = None
    grad_input: sp.SparsifierConfig | None = None
    grad_weight: sp.SparsifierConfig | None = None
    weight_for_grad_input: Any = INHERIT
    input_for_grad_weight: Any = INHERIT
    mask_inactive_grads: bool = False

    def resolved(self, operand: str) -> sp.SparsifierConfig | None:
        """The config that actually produces ``operand`` (per-GEMM overrides resolved)."""
        v = getattr(self, operand)
        if v is INHERIT:
            return getattr(self, "weight" if operand == "weight_for_grad_input" else "input")
        return v

    @property
    def is_dense(self) -> bool:
        return all(self.resolved(op) is None for op in OPERANDS) and not self.mask_inactive_grads

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for op in OPERANDS:
            v = getattr(self, op)
            if v is not INHERIT and (v is not None or op in ("weight_for_grad_input", "input_for_grad_weight")):
                out[op] = None if v is None else sp.config_to_dict(v)
        if self.mask_inactive_grads:
            out["mask_inactive_grads"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "layer") -> "LayerSpec":
        if d is None:
            return cls()
        valid = set(OPERANDS) | {"mask_inactive_grads"}
        unknown = set(d) - valid
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(valid)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k == "mask_inactive_grads":
                kw[k] = bool(v)
            else:
                kw[k] = None if v is None else sp.config_from_dict(v, where=f"{where}.{k}")
        return cls(**kw)


@dataclass
class LayerState:
    """Runtime state of one sparse layer, owned by the handle (the module only holds a reference).

    ``thresholds[op]`` caches the result of ``sparsifiers.threshold`` and ``computed_at[op]`` the step it was
    computed at, for periodic thresholds. ``frozen[op]`` holds a fixed boolean mask once the topology is frozen.
    ``last_density[op]`` records the kept fraction measured at the last forward/backward (0-dim tensors: no sync).
    """

    name: str
    step: int = 0
    period: int = 1
    thresholds: dict[str, Tensor | None] = field(default_factory=dict)
    computed_at: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)
    last_density: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    seed: int = 0
    record: bool = True

    def transform(self, op: str, x: Tensor, cfg: sp.SparsifierConfig | None) -> Tensor:
        """Sparsify ``x`` as operand ``op``, reusing a cached threshold within the period."""
        if cfg is None:
            return x
        if op in self.frozen:
            out = x * self.frozen[op].to(x.dtype)
        else:
            thr = self.thresholds.get(op)
            # period 1 = exact: recompute on every call (a second forward in the same step sees another batch).
            due = self.period <= 1 or op not in self.computed_at or self.step - self.computed_at[op] >= self.period
            # Fixed masks (random channel) are computed once; Threshold has nothing to cache.
            if isinstance(cfg, sp.RandomChannel):
                due = op not in self.computed_at
            if due:
                thr = sp.threshold(x, cfg, key=self.name)
                self.thresholds[op] = thr
                self.computed_at[op] = self.step
            if isinstance(cfg, sp.DBTD) and cfg.stochastic and self.generator is None:
                # Per-layer generator, seeded from the recipe seed and the layer name: reproducible and resumable.
                self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
            out = sp.apply(x, cfg, thr, self.generator)
        if self.record:
            self.last_density[op] = torch.count_nonzero(out.detach()).float() / max(1, out.numel())
        return out


def _forward_operands(layer: "_SparseMixin", x: Tensor, weight: Tensor, bias: Tensor | None):
    spec, st = layer.spec, layer.sparse_state
    w_f = st.transform("weight", weight, spec.weight)
    x_f = st.transform("input", x, spec.input)
    y = layer._gemm(x_f, w_f, bias)
    return st.transform("output", y, spec.output), w_f, x_f


class _SparseGemm(torch.autograd.Function):
    """The one mechanism: per-operand sparsification around a conv or linear GEMM (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: "_SparseMixin") -> Tensor:
        spec, st = layer.spec, layer.sparse_state
        y_out, w_f, x_f = _forward_operands(layer, x, weight, bias)
        w_b = w_f if spec.weight_for_grad_input is INHERIT else st.transform(
            "weight_for_grad_input", weight, spec.weight_for_grad_input)
        x_b = x_f if spec.input_for_grad_weight is INHERIT else st.transform(
            "input_for_grad_weight", x, spec.input_for_grad_weight)
        # Masks for the chain rule through forward sparsification (derivative of x -> x*mask is the mask).
        in_mask = (x_f != 0) if spec.input is not None else None
        out_mask = (y_out != 0) if spec.output is not None else None
        w_mask = (w_f != 0) if spec.mask_inactive_grads else None
        ctx.save_for_backward(x_b, w_b, in_mask, out_mask, w_mask)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y_out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_b, w_b, in_mask, out_mask, w_mask = ctx.saved_tensors
        layer = ctx.layer
        spec, st = layer.spec, layer.sparse_state
        if out_mask is not None:
            dy = dy * out_mask
        dy = st.transform("grad_output", dy, spec.grad_output)

        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias
        dx, dw, db = layer._gemm_backward(dy, x_b, w_b, (need_x, need_w, need_b))

        # calculate grad_input
        if dx is not None:
            dx = st.transform("grad_input", dx, spec.grad_input)
            if in_mask is not None:
                dx = dx * in_mask
        # calculate grad_weight
        if dw is not None:
            if w_mask is not None:
                dw = dw * w_mask
            dw = st.transform("grad_weight", dw, spec.grad_weight)
        return dx, dw, db, None


class _SparseMixin:
    """Shared by the sparse modules: spec, state reference and the swap helpers."""

    spec: LayerSpec
    sparse_state: LayerState

    def _init_sparse(self, spec: LayerSpec, state: LayerState) -> None:
        self.spec = spec
        self.sparse_state = state

    @classmethod
    def from_dense(cls, mod: nn.Module, spec: LayerSpec, state: LayerState | None = None) -> Any:
        """Swap ``mod`` for the sparse class, *sharing* its parameters and buffers.

        Sharing (not copying) keeps the optimizer's parameter references and every state_dict key valid.
        """
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{cls.__name__} supports padding_mode='zeros' only, got {mod.padding_mode!r}")
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new._init_sparse(spec, state or LayerState(name=""))
        return new

    def to_dense(self) -> nn.Module:
        """The plain module again (same parameter objects)."""
        dense_cls = next(b for b in type(self).__mro__ if b in SPARSE_TYPES)
        dense = dense_cls.__new__(dense_cls)
        dense.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("spec", "sparse_state")})
        return dense

    def _sparse_forward(self, x: Tensor) -> Tensor:
        grads = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not grads:
            # Inference: no backward will run, so skip the backward-only operands (e.g. top-K on activations).
            return _forward_operands(self, x, self.weight, self.bias)[0]
        return _SparseGemm.apply(x, self.weight, self.bias, self)

    def effective_weight(self) -> Tensor:
        """The weight as the forward uses it (detached; zeros where masked), without touching caches."""
        st = self.sparse_state
        cfg = self.spec.weight
        w = self.weight.detach()
        if cfg is None:
            return w
        if "weight" in st.frozen:
            return w * st.frozen["weight"].to(w.dtype)
        thr = st.thresholds.get("weight") if "weight" in st.computed_at else sp.threshold(w, cfg, key=st.name)
        return sp.apply(w, cfg, thr, None)

    def extra_repr(self) -> str:  # type: ignore[override]
        ops = ", ".join(f"{k}={v}" for k, v in self.spec.to_dict().items())
        return f"{super().extra_repr()}, sparse=({ops})"  # type: ignore[misc]


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """``nn.Conv2d`` whose operands are sparsified by a :class:`LayerSpec`; same parameters and state_dict keys."""

    def _gemm(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _gemm_backward(self, dy: Tensor, x: Tensor, w: Tensor, mask: tuple[bool, bool, bool]):
        # One ATen call gives dx = G(dy, w) and dW = H(dy, x) for *different* w and x: exactly the
        # per-GEMM operands SWAT needs (grad_input uses only w's values, grad_weight only x's).
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, x, w, [w.shape[0]] if mask[2] else None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0, 0], self.groups, list(mask),
        )
        return dx, dw, db

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_dense:
            return nn.Conv2d.forward(self, x)
        return self._sparse_forward(x)


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` whose operands are sparsified by a :class:`LayerSpec`; same parameters and state_dict keys."""

    def _gemm(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def _gemm_backward(self, dy: Tensor, x: Tensor, w: Tensor, mask: tuple[bool, bool, bool]):
        # Same products, in the same layout, as autograd's addmm backward (bit-identical when dense).
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = dy2.mm(w).reshape(*dy.shape[:-1], w.shape[1]) if mask[0] else None
        dw = dy2.t().mm(x2) if mask[1] else None
        db = dy2.sum(0) if mask[2] else None
        return dx, dw, db

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_dense:
            return nn.Linear.forward(self, x)
        return self._sparse_forward(x)


SPARSE_TYPES: dict[type, type] = {nn.Conv2d: SparseConv2d, nn.Linear: SparseLinear}

