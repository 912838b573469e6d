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

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparsetrain import packing
from sparsetrain import sparsifiers as sp

__all__ = [
    "LayerSpec",
    "INHERIT",
    "OPERANDS",
    "SparseConv2d",
    "SparseLinear",
    "PackedReLU",
    "LayerState",
    "SPARSE_TYPES",
    "OperandEvent",
    "add_observer",
    "observe",
    "dense_mode",
    "is_sparse_layer",
    "effective_weight",
    "counted_layer",
]


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
    """Runtime state of one sparse layer, owned by the handle and handed to the kernel explicitly.

    ``thresholds[op]`` caches the result of ``sparsifiers.threshold`` and ``computed_at[op]`` the step it was
    computed at, for periodic thresholds. ``frozen[op]`` holds a fixed boolean mask once the topology is frozen.
    ``active`` is the weight mask the last training forward used, kept only when ``track_active`` (SWAT-M needs the
    forward's active set after the optimizer has moved the weights). ``pack_saved`` stores what backward needs
    compactly (:mod:`sparsetrain.packing`).
    """

    name: str
    step: int = 0
    period: int = 1
    thresholds: dict[str, Tensor | None] = field(default_factory=dict)
    computed_at: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    seed: int = 0
    pack_saved: bool = True
    track_active: bool = False
    active: Tensor | None = None
    owner: Any = None  # weakref to the module, only to name it in observer events


def transform(state: LayerState, op: str, x: Tensor, cfg: sp.SparsifierConfig | None,
              materialize: bool = True) -> tuple[Tensor, Tensor | None]:
    """Sparsify ``x`` as operand ``op`` of a layer, reusing a cached threshold within the period.

    Returns ``(values, keep)``: ``keep`` is the bool mask of kept positions, or None when nothing was dropped.
    With ``materialize=False`` a mask-type sparsifier returns ``x`` itself with its mask (the caller applies it;
    packing reads ``x[keep]`` directly, which saves writing the masked copy).
    """
    if cfg is None:
        return x, None
    if op in state.frozen:
        keep = state.frozen[op]
        return x * keep.to(x.dtype), keep
    entry = sp.entry(cfg)
    thr = state.thresholds.get(op)
    if entry.fixed:
        due = op not in state.computed_at  # a fixed mask is drawn once
    else:
        # period 1 = exact: recompute on every call (a second forward in the same step sees another batch).
        due = state.period <= 1 or op not in state.computed_at or state.step - state.computed_at[op] >= state.period
    if due:
        thr = entry.threshold(x, cfg, key=state.name)
        state.thresholds[op] = thr
        state.computed_at[op] = state.step
    if entry.keep is not None:
        if op in _WEIGHT_OPERANDS and state.period > 1 and not entry.fixed:
            # Between recomputes a weight keeps the *mask* of the last recompute, not just its threshold: weights
            # move every step, and a reused threshold lets the kept fraction drift far from the target (0.3 -> 0.67
            # for channel top-K in a few large steps). An activation is a new tensor every step, so it can only
            # reuse the threshold; its drift is what handle.measuring() reports.
            mkey = f"{op}/mask"
            if due or mkey not in state.thresholds:
                state.thresholds[mkey] = entry.keep(x, cfg, thr)
            keep = state.thresholds[mkey]
        else:
            keep = entry.keep(x, cfg, thr)
        if keep is None or not materialize:
            return x, keep
        return x * keep.to(x.dtype), keep
    if entry.stochastic(cfg) and state.generator is None:
        # Per-layer generator, seeded from the recipe seed and the layer name: reproducible and resumable.
        state.generator = torch.Generator(device=x.device).manual_seed(state.seed)
    out = entry.apply(x, cfg, thr, state.generator)
    return out, (None if out is x else out != 0)


_WEIGHT_OPERANDS = ("weight", "weight_for_grad_input")


# ------------------------------------------------------------------------------------------------ the seam
@dataclass(frozen=True)
class OperandEvent:
    """One operand of one sparse layer, before and after its sparsifier (both detached).

    Forward: ``weight``, ``input``, ``output``; then (training only) the tensors saved for backward,
    ``weight_for_grad_input`` and ``input_for_grad_weight``. Backward: ``grad_output``, ``grad_input`` (when dx is
    needed), ``grad_weight``. The GEMMs are ``f(input, weight)``, ``G(grad_output, weight_for_grad_input)`` and
    ``H(grad_output, input_for_grad_weight)`` on the ``after`` tensors. ``after is before`` when the operand is dense.
    """

    layer: str
    operand: str
    before: Tensor
    after: Tensor
    module: nn.Module | None


_OBSERVERS: dict[int, Callable[[OperandEvent], None]] = {}
_DENSE_MODE = [0]


class _ObserverHandle:
    _next = 0

    def __init__(self, fn: Callable[[OperandEvent], None]) -> None:
        _ObserverHandle._next += 1
        self.id = _ObserverHandle._next
        _OBSERVERS[self.id] = fn

    def remove(self) -> None:
        _OBSERVERS.pop(self.id, None)


def add_observer(fn: Callable[[OperandEvent], None]) -> _ObserverHandle:
    """Call ``fn(event)`` for every operand of every sparse layer until ``handle.remove()``.

    The one public window into the kernel: telemetry, accounting, density measurement and export use it. With no
    observer registered the kernel builds no events (observation costs nothing when off).
    """
    return _ObserverHandle(fn)


@contextlib.contextmanager
def observe(fn: Callable[[OperandEvent], None]) -> Iterator[None]:
    """``add_observer(fn)`` for the duration of a ``with`` block."""
    h = add_observer(fn)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def dense_mode() -> Iterator[None]:
    """Sparse layers compute exactly like the plain modules and touch no state (tracing, dense baselines)."""
    _DENSE_MODE[0] += 1
    try:
        yield
    finally:
        _DENSE_MODE[0] -= 1


def _emit(state: LayerState, op: str, before: Tensor, after: Tensor) -> None:
    mod = state.owner() if state.owner is not None else None
    ev = OperandEvent(state.name, op, before.detach(), after.detach(), mod)
    for fn in list(_OBSERVERS.values()):
        fn(ev)


# ------------------------------------------------------------------------------------------------ the kernel
@dataclass(frozen=True)
class ConvGemm:
    """Geometry of a conv GEMM: everything the kernel needs from the module, frozen."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, dy: Tensor, x: Tensor, w: Tensor, needs: tuple[bool, bool, bool]):
        # One ATen call gives dx = G(dy, w) and dW = H(dy, x) for *different* w and x: exactly the
        # per-GEMM operands SWAT needs (grad_input uses only w's values, grad_weight only x's).
        return torch.ops.aten.convolution_backward(
            dy, x, w, [w.shape[0]] if needs[2] else None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0, 0], self.groups, list(needs),
        )


@dataclass(frozen=True)
class LinearGemm:
    """A linear GEMM (no geometry)."""

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def backward(self, dy: Tensor, x: Tensor, w: Tensor, needs: tuple[bool, bool, bool]):
        # Same products, in the same layout, as autograd's addmm backward (bit-identical when dense).
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = dy2.mm(w).reshape(*dy.shape[:-1], w.shape[1]) if needs[0] else None
        dw = dy2.t().mm(x2) if needs[1] else None
        db = dy2.sum(0) if needs[2] else None
        return dx, dw, db


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run this layer's conv/linear in, or None outside autocast."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    # Autocast's rule for conv/linear: floating tensors other than float64 run in the autocast dtype.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


class _Saver:
    """Collects what backward needs: plain tensors go through ``save_for_backward``, packing metadata on ctx."""

    def __init__(self) -> None:
        self.tensors: list[Tensor | None] = []
        self.slots: list[tuple[packing.Packed | None, int, int]] = []

    def add(self, t: Tensor | None, keep: Tensor | None = None, pack: bool = False, mask: bool = False) -> None:
        start = len(self.tensors)
        meta = None
        if t is not None and mask:
            meta, ts = packing.pack_mask(t)
            self.tensors.extend(ts)
        elif t is not None and pack:
            meta, ts = packing.pack(t, keep)
            self.tensors.extend(ts)
        else:
            self.tensors.append(t)
        self.slots.append((meta, start, len(self.tensors)))

    @staticmethod
    def load(slots: list, saved: tuple[Tensor, ...]) -> list[Tensor | None]:
        out = []
        for meta, a, b in slots:
            out.append(saved[a] if meta is None else packing.unpack(meta, tuple(saved[a:b])))
        return out


class _SparseGemm(torch.autograd.Function):
    """The one mechanism: per-operand sparsification around a conv or linear GEMM (see module docstring).

    Stateless apart from the explicit ``state`` it is given: the frozen ``spec`` and ``gemm`` travel on ``ctx``, so
    backward uses exactly the spec the forward used, even if the layer's spec changes in between.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, spec: LayerSpec, state: LayerState,
                gemm: Any) -> Tensor:
        obs = bool(_OBSERVERS)
        w_f, w_keep = transform(state, "weight", weight, spec.weight)
        x_f, x_keep = transform(state, "input", x, spec.input)
        # Under autocast the GEMM runs in the autocast dtype, as for the plain module; sparsify first (exact
        # thresholds in the parameter dtype), then cast: a zero casts to zero.
        ac = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = gemm.forward(_cast(x_f, ac), _cast(w_f, ac), _cast(bias, ac))
        y_out, y_keep = transform(state, "output", y, spec.output)
        if spec.weight_for_grad_input is INHERIT:
            w_b, wb_keep = w_f, w_keep
        else:
            w_b, wb_keep = transform(state, "weight_for_grad_input", weight, spec.weight_for_grad_input)
        pack = state.pack_saved
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if spec.input_for_grad_weight is INHERIT:
            x_b, xb_keep = x_f, x_keep
        else:
            # SWAT's top-K x exists only to be saved: packed straight from x, the masked copy is never written.
            x_b, xb_keep = transform(state, "input_for_grad_weight", x, spec.input_for_grad_weight,
                                     materialize=obs or not (pack and needs_w))
        if state.track_active and spec.weight is not None:
            state.active = torch.ones_like(weight, dtype=torch.bool) if w_keep is None else w_keep.expand_as(weight)
        if obs:
            for op, before, after in (("weight", weight, w_f), ("input", x, x_f), ("output", y, y_out),
                                      ("weight_for_grad_input", weight, w_b), ("input_for_grad_weight", x, x_b)):
                _emit(state, op, before, after)

        # Save only what backward needs. A sparsified operand is a new tensor: store it packed (values + bitmap or
        # indices) in the GEMM's dtype, so the dense top-K copy dies with the forward. An operand left dense is
        # the caller's own tensor (or autocast's copy of it): saving it costs nothing extra.
        sv = _Saver()
        sv.add(_cast(x_b, ac) if needs_w else None, xb_keep, pack=pack and xb_keep is not None)
        sv.add(_cast(w_b, ac) if needs_x else None, wb_keep, pack=pack and wb_keep is not None)
        sv.add(x_keep if spec.input is not None else None, mask=pack)
        sv.add(y_keep if spec.output is not None else None, mask=pack)
        sv.add(w_keep if spec.mask_inactive_grads else None, mask=pack)
        ctx.save_for_backward(*sv.tensors)
        ctx.slots = sv.slots
        ctx.spec, ctx.state, ctx.gemm = spec, state, gemm
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.shapes = (x.shape, weight.shape)
        ctx.has_bias = bias is not None
        ctx.observed = obs
        return y_out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_b, w_b, in_mask, out_mask, w_mask = _Saver.load(ctx.slots, ctx.saved_tensors)
        spec, state = ctx.spec, ctx.state
        obs = ctx.observed and bool(_OBSERVERS)
        if out_mask is not None:
            dy = dy * out_mask.to(dy.dtype)
        dy_in = dy
        dy, _ = transform(state, "grad_output", dy, spec.grad_output)
        if obs:
            _emit(state, "grad_output", dy_in, dy)

        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2] and ctx.has_bias
        with torch.autocast(dy.device.type, enabled=False):
            # The GEMMs run in the dtype the forward ran them in (autocast's); gradients return in the inputs' dtypes.
            g = dy.to((x_b if x_b is not None else w_b).dtype)
            # An operand only one GEMM needs was not saved; the conv kernel still wants its shape.
            x_b = x_b if x_b is not None else g.new_zeros(()).expand(ctx.shapes[0])
            w_b = w_b if w_b is not None else g.new_zeros(()).expand(ctx.shapes[1])
            dx, dw, db = ctx.gemm.backward(g, x_b, w_b, (need_x, need_w, need_b))
        x_dt, w_dt, b_dt = ctx.dtypes

        # calculate grad_input
        if dx is not None:
            dx = dx.to(x_dt)
            dx_raw = dx
            dx, _ = transform(state, "grad_input", dx, spec.grad_input)
            if in_mask is not None:
                dx = dx * in_mask.to(dx.dtype)
            if obs:
                _emit(state, "grad_input", dx_raw, dx)
        # calculate grad_weight
        if dw is not None:
            dw = dw.to(w_dt)
            dw_raw = dw
            if w_mask is not None:
                dw = dw * w_mask.to(dw.dtype)
            dw, _ = transform(state, "grad_weight", dw, spec.grad_weight)
            if obs:
                _emit(state, "grad_weight", dw_raw, dw)
        if db is not None:
            db = db.to(b_dt)
        return dx, dw, db, None, None, None


class _PackedReLUFn(torch.autograd.Function):
    """ReLU that saves a 1-bit mask of its output's sign instead of the output itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = torch.relu_(x)
        else:
            out = torch.relu(x)
        meta, ts = packing.pack_mask(out > 0)
        ctx.save_for_backward(*ts)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None]:
        mask = packing.unpack_mask(ctx.meta, ctx.saved_tensors)
        # autograd's own ReLU backward kernel, reading the mask's bytes (1 where the output was positive) as the
        # output: bit-identical gradients, and faster than torch.where with a scalar.
        return torch.ops.aten.threshold_backward(dy, mask.view(torch.uint8), 0), None


class PackedReLU(nn.ReLU):
    """``nn.ReLU`` whose backward keeps a packed sign mask (1 bit per element) instead of the whole output.

    In Conv-BN-ReLU stacks the ReLU output is the next conv's input. A dense conv saves that tensor anyway, but a
    sparse conv saves only its packed top-K copy, and then the ReLU alone would keep the dense output alive for a
    mask. ``sparsify_`` swaps in this class for the ``nn.ReLU`` modules whose output nothing else saves (see
    :func:`sparsetrain.graph.relus_saved_only_by_themselves`) when the recipe packs saved tensors. Outputs and
    gradients are bit-identical to ``nn.ReLU``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _DENSE_MODE[0] or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _PackedReLUFn.apply(x, self.inplace)


# ------------------------------------------------------------------------------------------------ the modules
class _SparseMixin:
    """Shared by the sparse modules: spec, state reference and the swap helpers."""

    spec: LayerSpec
    sparse_state: LayerState

    @classmethod
    def from_dense(cls, mod: nn.Module, spec: LayerSpec, state: LayerState | None = None) -> Any:
        """Swap ``mod`` for the sparse class, *sharing* its parameters and buffers.

        Sharing (not copying) keeps the optimizer's parameter references and every state_dict key valid.
        """
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{cls.__name__} supports padding_mode='zeros' only, got {mod.padding_mode!r}")
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        new.spec = spec
        new.sparse_state = state or LayerState(name="")
        new.sparse_state.owner = weakref.ref(new)
        new._dense_cls = type(mod)  # to_dense gives back a Conv2d subclass as itself
        return new

    def to_dense(self) -> nn.Module:
        """The plain module again (same parameter objects)."""
        dense_cls = self.__dict__.get("_dense_cls") or next(b for b in type(self).__mro__ if b in SPARSE_TYPES)
        dense = dense_cls.__new__(dense_cls)
        dense.__dict__.update({k: v for k, v in self.__dict__.items()
                               if k not in ("spec", "sparse_state", "_dense_cls")})
        return dense

    def _sparse_forward(self, x: Tensor, gemm: Any) -> Tensor:
        spec, st = self.spec, self.sparse_state
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _SparseGemm.apply(x, self.weight, self.bias, spec, st, gemm)
        # Inference: no backward will run, so skip the backward-only operands (e.g. top-K on activations).
        w_f, _ = transform(st, "weight", self.weight, spec.weight)
        x_f, _ = transform(st, "input", x, spec.input)
        y = gemm.forward(x_f, w_f, self.bias)
        y_out, _ = transform(st, "output", y, spec.output)
        if _OBSERVERS:
            for op, before, after in (("weight", self.weight, w_f), ("input", x, x_f), ("output", y, y_out)):
                _emit(st, op, before, after)
        return y_out

    def effective_weight(self) -> Tensor:
        """The weight as the forward uses it; see :func:`effective_weight`."""
        return effective_weight(self)  # type: ignore[arg-type]

    def extra_repr(self) -> str:  # type: ignore[override]
        ops = ", ".join(f"{k}={v}" for k, v in self.spec.to_dict().items())
        return f"{super().extra_repr()}, sparse=({ops})"  # type: ignore[misc]


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """``nn.Conv2d`` whose operands are sparsified by a :class:`LayerSpec`; same parameters and state_dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_dense or _DENSE_MODE[0]:
            return nn.Conv2d.forward(self, x)
        return self._sparse_forward(x, ConvGemm(self.stride, self.padding, self.dilation, self.groups))


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` whose operands are sparsified by a :class:`LayerSpec`; same parameters and state_dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_dense or _DENSE_MODE[0]:
            return nn.Linear.forward(self, x)
        return self._sparse_forward(x, LinearGemm())


SPARSE_TYPES: dict[type, type] = {nn.Conv2d: SparseConv2d, nn.Linear: SparseLinear}


def counted_layer(m: nn.Module) -> bool:
    """The one definition of a layer sparsetrain works on: any ``nn.Conv2d`` or ``nn.Linear`` (subclasses too)."""
    return isinstance(m, (nn.Conv2d, nn.Linear))


def is_sparse_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a sparse layer made by :func:`sparsetrain.sparsify_`."""
    return isinstance(m, _SparseMixin)


def sparse_class(m: nn.Module) -> type:
    """The sparse class that replaces ``m`` (a Conv2d/Linear or subclass); TypeError otherwise."""
    for dense, sparse in SPARSE_TYPES.items():
        if isinstance(m, dense):
            return sparse
    raise TypeError(f"{type(m).__name__} is not a Conv2d or Linear layer")


@torch.no_grad()
def effective_weight(m: nn.Module) -> Tensor:
    """The weight as ``m``'s forward uses it (detached; zeros where masked), without touching any cache.

    Plain modules return their weight. A sparse layer applies its weight sparsifier with the cached threshold or
    mask (computing a fresh one, uncached, before the first forward).
    """
    w = m.weight.detach()
    if not is_sparse_layer(m) or m.spec.weight is None:
        return w
    st, cfg = m.sparse_state, m.spec.weight
    if "weight" in st.frozen:
        return w * st.frozen["weight"].to(w.dtype)
    if "weight/mask" in st.thresholds:  # a periodic threshold's cached mask (see transform)
        keep = st.thresholds["weight/mask"]
        return w if keep is None else w * keep.to(w.dtype)
    thr = st.thresholds.get("weight") if "weight" in st.computed_at else sp.threshold(w, cfg, key=st.name)
    return sp.apply(w, cfg, thr, None)
