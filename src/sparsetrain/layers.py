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
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparsetrain import packing
from sparsetrain import sparsifiers as sp
from sparsetrain._eager_topk import masked_by_threshold
from sparsetrain._relu_mask import pack_positive, relu_backward

__all__ = [
    "LayerSpec",
    "INHERIT",
    "OPERANDS",
    "SparseConv2d",
    "SparseLinear",
    "PackedReLU",
    "LayerState",
    "OperandCache",
    "Sparsified",
    "sparsify_operand",
    "sparsify_gradient",
    "sparse_gemm",
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


PENDING = -1  # OperandCache.computed_at of a value computed in this step (dated by LayerState.advance)


@dataclass
class OperandCache:
    """The reusable part of one forward operand's sparsifier, kept between steps (typed; one per operand).

    ``thr`` is what :func:`sparsetrain.sparsifiers.threshold` returned (a threshold, per-row thresholds, or a fixed
    mask); ``mask`` a weight's keep mask, reused between periodic recomputes; ``computed_at`` the handle step it was
    computed at; ``due`` whether the next forward recomputes it (the handle sets it when a period ends, so the
    forward reads a bool, never a step counter: a compiled model is not re-specialised on every step).
    """

    thr: Tensor | None = None
    mask: Tensor | None = None
    computed_at: int | None = None
    due: bool = True
    fixed: bool = False  # drawn once, never due again (a fixed topology)


@dataclass
class LayerState:
    """Runtime state of one sparse layer, owned by the handle; the kernel never sees it (it gets tensors).

    ``cache[op]`` holds the reusable part of each forward operand's sparsifier (:class:`OperandCache`), written by the
    module's forward from what the pure sparsifiers return, and advanced by :meth:`advance` (the handle's step).
    Backward operands (gradients) are recomputed on every call: nothing is cached in backward. ``frozen[op]`` holds
    a fixed boolean mask once the topology is frozen. ``active`` is the weight mask the last training forward used,
    kept only when ``track_active`` (SWAT-M needs the forward's active set after the optimizer has moved the
    weights). ``pack_saved`` stores what backward needs compactly (:mod:`sparsetrain.packing`). ``generator`` draws
    stochastic pruning's noise (created on the layer's device at first use, seeded from ``seed``).
    """

    name: str
    step: int = 0
    period: int = 1
    cache: dict[str, OperandCache] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    seed: int = 0
    pack_saved: bool = True
    track_active: bool = False
    active: Tensor | None = None
    owner: Any = None  # weakref to the module, only to name it in observer events

    def advance(self, step: int) -> None:
        """Move to handle step ``step``: date what the last forwards computed, flag what is due next."""
        for c in self.cache.values():
            if c.computed_at == PENDING:
                c.computed_at = self.step
        self.step = step
        if self.period > 1:
            for c in self.cache.values():
                if c.computed_at is not None and not c.fixed:
                    c.due = step - c.computed_at >= self.period

    def rng(self, device: torch.device) -> torch.Generator:
        """The layer's generator (per-layer seed: reproducible and resumable), created on ``device`` at first use."""
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def prepare(self, spec: "LayerSpec") -> None:
        """Create the cache entry of every forward operand ``spec`` sparsifies (so a compiled forward creates none)."""
        for op in FORWARD_OPERANDS:
            if getattr(spec, op) not in (None, INHERIT) and op not in self.cache:
                self.cache[op] = OperandCache()

    def record(self, op: str, thr: Tensor | None, mask: Tensor | None = None, fixed: bool = False) -> None:
        c = self.cache.get(op)
        if c is None:
            c = self.cache[op] = OperandCache()
        # Dated by the next advance(), outside the forward: a compiled forward that read the step counter would be
        # specialised to it and recompiled on every step.
        c.thr, c.mask, c.computed_at, c.due, c.fixed = thr, mask, PENDING, self.period <= 1 and not fixed, fixed

    def computed_step(self, op: str) -> int | None:
        """The step the cached ``op`` was computed at (None if never)."""
        c = self.cache.get(op)
        if c is None or c.computed_at is None:
            return None
        return self.step if c.computed_at == PENDING else c.computed_at


_WEIGHT_OPERANDS = ("weight", "weight_for_grad_input")
FORWARD_OPERANDS = ("weight", "input", "output", "weight_for_grad_input", "input_for_grad_weight")


class Sparsified(NamedTuple):
    """One operand after its sparsifier: the dense result, its keep mask, and an exact top-K selection if any.

    ``dense`` is None when only the packed form was asked for; ``keep`` (bool, broadcastable) is None when every
    position is kept or the mask was not asked for; ``sel = (pos, values)`` are the kept positions in memory order
    and their values (from :func:`sparsetrain.sparsifiers.topk_select`), which pack without another pass.
    """

    dense: Tensor | None
    keep: Tensor | None
    sel: tuple[Tensor, Tensor] | None = None
    thr: Tensor | None = None  # a threshold with ``keep == |t| >= thr`` exactly (fresh top-K, no cached mask)


def _keep_from(t: Tensor, pos: Tensor) -> Tensor:
    """The bool mask of the positions ``pos`` (memory order, padded with numel) in ``t``'s shape."""
    return packing.scatter(pos, torch.ones((), dtype=torch.bool, device=t.device).expand(pos.shape), tuple(t.shape),
                           sp.selection_order(t))


def sparsify_operand(state: LayerState, op: str, t: Tensor, cfg: sp.SparsifierConfig | None, *,
                     need_dense: bool = True, need_keep: bool = False, select: bool = False) -> Sparsified:
    """Sparsify ``t`` as forward operand ``op`` of a layer, reusing the cached part of its sparsifier when not due.

    Pure apart from the cache it reads and records into (called by the module's forward, never inside autograd).
    With ``select`` (an operand saved for backward), an exact top-K whose threshold is due selects the kept positions
    and values in one go (:func:`sparsetrain.sparsifiers.topk_select`): the dense result is a scatter of them, and
    they pack as they are. Otherwise (weights) the threshold alone is selected and applied as a mask.
    """
    if cfg is None:
        return Sparsified(t, None)
    frozen = state.frozen.get(op)
    if frozen is not None:
        return Sparsified(t * frozen.to(t.dtype) if need_dense else None, frozen)
    e = sp.entry(cfg)
    c = state.cache.get(op)
    weight_op = op in _WEIGHT_OPERANDS and state.period > 1 and not e.fixed
    # period 1 = exact: recomputed on every call (a second forward in the same step sees another batch); a fixed
    # mask is drawn once.
    due = c is None or c.due  # a bool the handle sets: the forward never reads a step counter
    if due and select and type(cfg) is sp.TopK and cfg.density < 1.0:
        thr, pos, values = sp.topk_select(t, cfg.density)
        keep = _keep_from(t, pos) if (need_keep or weight_op) else None
        # Between recomputes a weight keeps the *mask* of the last recompute, not just its threshold: weights move
        # every step, and a reused threshold lets the kept fraction drift far from the target. An activation is a
        # new tensor every step, so it can only reuse the threshold; its drift is what handle.measuring() reports.
        state.record(op, thr, keep if weight_op else None)
        dense = packing.scatter(pos, values, tuple(t.shape), sp.selection_order(t)) if need_dense else None
        return Sparsified(dense, keep, (pos, values), thr)
    if due:
        thr = e.threshold(t, cfg, key=state.name)
        state.record(op, thr, fixed=e.fixed)
        c = state.cache[op]
    thr = c.thr
    if type(cfg) is sp.TopK and not weight_op and not need_keep and need_dense and thr is not None:
        # The common case (SWAT's weight): only the masked tensor is asked for, in one pass; no bool mask.
        return Sparsified(masked_by_threshold(t, thr), None, None, thr)
    if e.keep is not None:
        if weight_op:
            if c.mask is None:
                c.mask = e.keep(t, cfg, thr)
            keep = c.mask
        else:
            keep = e.keep(t, cfg, thr)
        if keep is None:
            return Sparsified(t, None)
        # A top-K mask that is |t| >= thr (not a cached mask) can be recomputed from thr alone (see _save_weight).
        exact = thr if type(cfg) is sp.TopK and not weight_op else None
        return Sparsified(t * keep.to(t.dtype) if need_dense else None, keep, None, exact)
    gen = state.rng(t.device) if e.stochastic(cfg) else None
    out = e.apply(t, cfg, thr, gen)
    return Sparsified(out, None if out is t else out != 0)


def sparsify_gradient(t: Tensor, cfg: sp.SparsifierConfig | None, generator: torch.Generator | None,
                      key: str = "") -> Tensor:
    """A backward operand: threshold and apply on every call (a gradient is new every step; nothing is cached)."""
    if cfg is None:
        return t
    e = sp.entry(cfg)
    return e.apply(t, cfg, e.threshold(t, cfg, key=key), generator)


# ------------------------------------------------------------------------------------------------ the seam
@dataclass(frozen=True)
class OperandEvent:
    """One operand of one sparse layer, before and after its sparsifier (both detached).

    Forward: ``weight``, ``input``, ``output``; then (training only) the tensors saved for backward,
    ``weight_for_grad_input`` and ``input_for_grad_weight``. Backward: ``grad_output``, ``grad_input`` (when dx is
    needed), ``grad_weight`` (when dW is). The GEMMs are ``f(input, weight)``, ``G(grad_output, weight_for_grad_input)``
    and ``H(grad_output, input_for_grad_weight)`` on the ``after`` tensors. When the operand is dense, ``after`` is
    the same tensor as ``before`` (detached separately: the same storage, not the same object); so is every operand
    of a sparse layer that computes as the plain module (its spec is dense, or under :func:`dense_mode`).
    ``requires_grad``: whether the operand as the layer received it needs a gradient (an ``input`` fed by the data
    does not, so no dx is computed for it).
    """

    layer: str
    operand: str
    before: Tensor
    after: Tensor
    module: nn.Module | None
    requires_grad: bool = False


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

    The one public window into the kernel: telemetry, accounting and density measurement use it. A sparse layer
    that computes as the plain module (dense spec, :func:`dense_mode`) reports its dense operands too. With no
    observer registered nothing builds events (observation costs nothing when off).
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
    _emit_named(state.name, state.owner, op, before, after)


def _emit_named(name: str, owner: Any, op: str, before: Tensor, after: Tensor) -> None:
    mod = owner() if owner is not None else None
    ev = OperandEvent(name, op, before.detach(), after.detach(), mod, before.requires_grad)
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


@dataclass(frozen=True)
class Slot:
    """How one saved operand is stored; its ``count`` tensors follow in the saved list.

    ``kind``: ``none`` (not needed), ``plain`` (the tensor itself), ``gemm_w`` (the GEMM's own weight operand, saved
    by the Function), ``selection`` (top-K values + int32 positions), ``weight_thr`` / ``weight_keep`` (the weight
    and its threshold or mask: recomputed in backward, cast to ``cast``), ``packed`` (:mod:`sparsetrain.packing`).
    """

    kind: str
    count: int = 0
    shape: tuple[int, ...] = ()
    perm: tuple[int, ...] | None = None
    meta: packing.Packed | None = None
    cast: torch.dtype | None = None  # the GEMM dtype a recomputed operand is cast to


def _save(tensors: list[Tensor], t: Tensor | None, *, sel: tuple[Tensor, Tensor] | None = None,
          keep: Tensor | None = None, pack: bool = False, mask: bool = False, like: Tensor | None = None,
          dtype: torch.dtype | None = None) -> Slot:
    """Append what backward needs of one operand to ``tensors``; return how to read it back.

    A top-K selection is saved as it came (kept values in the GEMM dtype + int32 positions): no pass over the dense
    tensor. Other sparsified operands are packed (values + bitmap/indices; a data-dependent size, the slower path) or,
    with ``pack_saved: false``, kept dense. Masks become bitmaps. A dense operand is the caller's own tensor.
    """
    if sel is not None:
        pos, values = sel  # positions already int32 where they fit (sparsifiers.topk_select)
        assert like is not None
        tensors += [_cast(values, dtype), pos]
        return Slot("selection", 2, tuple(like.shape), sp.selection_order(like))
    if t is None:
        return Slot("none")
    if mask and pack:
        meta, ts = packing.pack_mask(t)
    elif pack:
        meta, ts = packing.pack(t, keep)
    else:
        tensors.append(t)
        return Slot("plain", 1)
    tensors += list(ts)
    return Slot("packed", len(ts), meta=meta)


def _save_weight(tensors: list[Tensor], weight: Tensor, w: Sparsified, w_g: Tensor, dtype: torch.dtype | None,
                 gemm_w: Tensor) -> Slot:
    """What dx = G(dy, w_b) needs of the sparse weight: the weight itself (saved by reference, free) and its
    threshold or mask, from which backward recomputes w_b; a dense copy of the masked weight only as a last resort."""
    if w.thr is not None:
        tensors += [weight, w.thr]
        return Slot("weight_thr", 2, cast=dtype)
    if w.keep is not None and w.dense is not None:
        tensors += [weight, w.keep]
        return Slot("weight_keep", 2, cast=dtype)
    if w_g is gemm_w:
        return Slot("gemm_w")  # the GEMM's own weight operand (the Function saves it)
    tensors.append(w_g)
    return Slot("plain", 1)


def _load(slots: tuple[Slot, ...], saved: tuple[Tensor, ...]) -> list[Tensor | None]:
    out: list[Tensor | None] = []
    i = 0
    for s in slots:
        ts = saved[i:i + s.count]
        i += s.count
        if s.kind == "none":
            out.append(None)
        elif s.kind == "gemm_w":
            out.append(None)  # filled in by the Function from its own input
        elif s.kind == "plain":
            out.append(ts[0])
        elif s.kind == "selection":
            # Unpacked into a reused buffer: it lives only until this layer's backward GEMM has read it.
            out.append(packing.scatter(ts[1], ts[0], s.shape, s.perm, reuse="dense"))
        elif s.kind == "weight_thr":  # the forward's top-K weight, recomputed from the weight and its threshold
            w, thr = ts
            out.append(_cast(masked_by_threshold(w, thr), s.cast))
        elif s.kind == "weight_keep":
            w, keep = ts
            out.append(_cast(w * keep.to(w.dtype), s.cast))
        else:
            out.append(packing.unpack(s.meta, tuple(ts)))
    return out


@dataclass(frozen=True)
class GemmArgs:
    """Everything backward needs besides tensors: frozen, so backward uses exactly what the forward used."""

    gemm: Any
    spec: LayerSpec
    slots: tuple[Slot, ...]  # x_b, w_b, input mask, weight mask
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype | None]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    name: str = ""
    observed: bool = False
    owner: Any = None  # weakref to the module, only to name it in observer events
    reuse: tuple[bool, bool] = (False, False)  # x_b is the GEMM's x_g / w_b is its w_g (saved by the Function)


class _SparseGemm(torch.autograd.Function):
    """The one mechanism: a conv or linear GEMM on sparsified operands, with per-GEMM operands in backward.

    Stateless, like torchao's ``matmul_with_hp_or_float8_args``: tensors and a frozen :class:`GemmArgs` in, tensors
    out. The forward operands arrive already sparsified (``x_g``, ``w_g``, ``b_g``: the GEMM's operands, in its
    dtype) with what backward needs of them (``saved``, described by ``args.slots``); ``x``, ``weight`` and ``bias``
    are the differentiable originals the gradients belong to. Backward sparsifies the gradients (``grad_output``,
    ``grad_input``, ``grad_weight``) with pure functions and writes no state.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, x_g: Tensor, w_g: Tensor,
                b_g: Tensor | None, args: GemmArgs, generator: torch.Generator | None, *saved: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = args.gemm.forward(x_g, w_g, b_g)
        # A GEMM operand backward reuses is saved here rather than passed twice (a compiler rejects duplicate inputs).
        ctx.save_for_backward(*saved, *([x_g] if args.reuse[0] else []), *([w_g] if args.reuse[1] else []))
        ctx.args, ctx.generator = args, generator
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        a: GemmArgs = ctx.args
        spec = a.spec
        saved = ctx.saved_tensors
        n_saved = len(saved) - sum(a.reuse)  # the Function's *saved inputs; the GEMM operands it saved follow
        x_b, w_b, in_mask, w_mask = _load(a.slots, saved[:n_saved])
        gemm_operands = iter(saved[n_saved:])
        if a.reuse[0]:
            x_b = next(gemm_operands)
        if a.reuse[1]:
            w_b = next(gemm_operands)
        obs = a.observed and bool(_OBSERVERS)
        dy_in = dy
        dy = sparsify_gradient(dy, spec.grad_output, ctx.generator, a.name)
        if obs:
            _emit_named(a.name, a.owner, "grad_output", dy_in, dy)

        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.autocast(dy.device.type, enabled=False):
            # The GEMMs run in the dtype the forward ran them in (autocast's); gradients return in the inputs' dtypes.
            g = dy.to((x_b if x_b is not None else w_b).dtype)
            # An operand only one GEMM needs was not saved; the conv kernel still wants its shape.
            x_b = x_b if x_b is not None else g.new_zeros(()).expand(a.shapes[0])
            w_b = w_b if w_b is not None else g.new_zeros(()).expand(a.shapes[1])
            dx, dw, db = a.gemm.backward(g, x_b, w_b, (need_x, need_w, need_b))
        x_dt, w_dt, b_dt = a.dtypes

        # calculate grad_input
        if dx is not None:
            dx = dx.to(x_dt)
            dx_raw = dx
            dx = sparsify_gradient(dx, spec.grad_input, ctx.generator, a.name)
            if in_mask is not None:
                dx = dx * in_mask.to(dx.dtype)
            if obs:
                _emit_named(a.name, a.owner, "grad_input", dx_raw, dx)
        # calculate grad_weight
        if dw is not None:
            dw = dw.to(w_dt)
            dw_raw = dw
            if w_mask is not None:
                dw = dw * w_mask.to(dw.dtype)
            dw = sparsify_gradient(dw, spec.grad_weight, ctx.generator, a.name)
            if obs:
                _emit_named(a.name, a.owner, "grad_weight", dw_raw, dw)
        if db is not None and b_dt is not None:
            db = db.to(b_dt)
        return (dx, dw, db, None, None, None, None, None) + (None,) * n_saved


class _Masked(torch.autograd.Function):
    """An output operand: forward returns the sparsified ``values``; backward passes ``dy`` where ``keep`` is set."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, values: Tensor, slot: Slot, *saved: Tensor) -> Tensor:
        ctx.save_for_backward(*saved)
        ctx.slot = slot
        return values.clone()  # an output must not be an input (an ablation's path: the copy is cheap enough)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (keep,) = _load((ctx.slot,), ctx.saved_tensors)
        return (dy * keep.to(dy.dtype), None, None) + (None,) * len(ctx.saved_tensors)


def _stochastic(spec: LayerSpec) -> bool:
    """Whether any of the spec's sparsifiers draws random numbers (the layer then passes its generator)."""
    return any(cfg is not None and sp.entry(cfg).stochastic(cfg) for cfg in (spec.resolved(op) for op in OPERANDS))


def sparse_gemm(state: LayerState, spec: LayerSpec, gemm: Any, x: Tensor, weight: Tensor,
                bias: Tensor | None) -> Tensor:
    """One sparse layer's forward: sparsify the forward operands (pure functions + the layer's cache), run the GEMM
    through :class:`_SparseGemm` with what backward needs, and report every operand to the observers."""
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    obs = bool(_OBSERVERS)
    name = state.name
    ac = _autocast_dtype(x)
    events: list[tuple[str, Tensor, Tensor]] = []
    with torch.no_grad():
        xd, wd = x.detach(), weight.detach()
        need_x = training and x.requires_grad
        need_w = training and weight.requires_grad
        w = sparsify_operand(state, "weight", wd, spec.weight,
                             need_keep=spec.mask_inactive_grads or (state.track_active and training))
        xs = sparsify_operand(state, "input", xd, spec.input, need_keep=need_x and spec.input is not None,
                              select=training and state.pack_saved and spec.input_for_grad_weight is INHERIT)
        x_g, w_g, b_g = _cast(xs.dense, ac), _cast(w.dense, ac), _cast(None if bias is None else bias.detach(), ac)
        if obs:
            events += [("weight", weight, w.dense if spec.weight is not None else weight),
                       ("input", x, xs.dense if spec.input is not None else x)]
        if not training:
            with torch.autocast(x.device.type, enabled=False):
                y = gemm.forward(x_g, w_g, b_g)
            return _finish_output(state, spec, y, None, events)

        if state.track_active and spec.weight is not None:
            state.active = torch.ones_like(weight, dtype=torch.bool) if w.keep is None else w.keep.expand_as(weight)
        # What backward needs: x_b for dW = H(dy, x_b) and w_b for dx = G(dy, w_b), each only if that GEMM runs.
        if spec.weight_for_grad_input is INHERIT:
            wb = w
        else:
            wb = sparsify_operand(state, "weight_for_grad_input", wd, spec.weight_for_grad_input)
        if spec.input_for_grad_weight is INHERIT:
            xb = xs
        else:
            # SWAT's top-K x exists only to be saved: kept as its selection, the dense copy is never written.
            xb = sparsify_operand(state, "input_for_grad_weight", xd, spec.input_for_grad_weight,
                                  need_dense=obs or not state.pack_saved, select=state.pack_saved)
        x_sparse = spec.resolved("input_for_grad_weight") is not None
        if obs:
            xb_dense = xb.dense if xb.dense is not None or xb.sel is None else packing.scatter(
                xb.sel[0], xb.sel[1], tuple(x.shape), sp.selection_order(xd))
            events += [("weight_for_grad_input", weight, wb.dense if spec.resolved("weight_for_grad_input") else weight),
                       ("input_for_grad_weight", x, xb_dense if x_sparse else x)]

        pack = state.pack_saved
        saved: list[Tensor] = []
        use_sel = pack and xb.sel is not None
        x_keep = None if use_sel else (_cast(xb.dense, ac) if xb.dense is not None and xb is not xs else x_g)
        reuse_x = need_w and x_keep is x_g and not (pack and x_sparse)
        slots = (
            Slot("none") if not need_w or reuse_x else
            _save(saved, None, sel=xb.sel, like=xd, dtype=ac) if use_sel else
            _save(saved, x_keep, keep=xb.keep, pack=pack and x_sparse),
            _save_weight(saved, wd, wb, w_g if wb is w else _cast(wb.dense, ac), ac, w_g) if need_x else Slot("none"),
            _save(saved, xs.keep if need_x and spec.input is not None else None, mask=True, pack=pack),
            _save(saved, w.keep if spec.mask_inactive_grads else None, mask=True, pack=pack),
        )
        args = GemmArgs(gemm, spec, slots, (x.dtype, weight.dtype, None if bias is None else bias.dtype),
                        (tuple(x.shape), tuple(weight.shape)), name, obs, state.owner,
                        (reuse_x, need_x and slots[1].kind == "gemm_w"))
    # Stochastic pruning draws from the layer's own generator (reproducible, resumable); compiled code cannot take a
    # generator object through the autograd Function, so it draws from torch's global (seeded) RNG instead.
    gen = state.rng(x.device) if _stochastic(spec) and not torch.compiler.is_compiling() else None
    y = _SparseGemm.apply(x, weight, bias, x_g, w_g, b_g, args, gen, *saved)
    return _finish_output(state, spec, y, args, events)


def _finish_output(state: LayerState, spec: LayerSpec, y: Tensor, args: GemmArgs | None,
                   events: list[tuple[str, Tensor, Tensor]]) -> Tensor:
    """Apply the output operand (if any) and emit the forward's events in operand order."""
    y_out = y
    if spec.output is not None:
        with torch.no_grad():
            o = sparsify_operand(state, "output", y.detach(), spec.output, need_keep=True)
        if args is None or not y.requires_grad:
            y_out = o.dense
        else:
            saved: list[Tensor] = []
            slot = _save(saved, o.keep if o.keep is not None else torch.ones_like(y, dtype=torch.bool), mask=True,
                         pack=state.pack_saved)
            y_out = _Masked.apply(y, o.dense, slot, *saved)
    if events:
        order = ("weight", "input", "output", "weight_for_grad_input", "input_for_grad_weight")
        events.append(("output", y, y_out))
        for op, before, after in sorted(events, key=lambda e: order.index(e[0])):
            _emit(state, op, before, after)
    return y_out


class _PackedReLUFn(torch.autograd.Function):
    """ReLU that saves a 1-bit mask of its output's sign instead of the output itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = torch.relu_(x)
        else:
            out = torch.relu(x)
        meta, ts = pack_positive(out)
        ctx.save_for_backward(*ts)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, None]:
        return relu_backward(dy, ctx.meta, ctx.saved_tensors[0]), None


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
        new.sparse_state.prepare(spec)
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
        return sparse_gemm(self.sparse_state, self.spec, gemm, x, self.weight, self.bias)

    def _observed_plain_forward(self, x: Tensor) -> Tensor:
        """The plain module's computation (dense spec, :func:`dense_mode`) reporting its operands, all dense, as the
        kernel does; called only when an observer is registered. Backward events come from tensor hooks on views only
        this call uses (``x``'s gets this layer's own dx, the weight's this call's dW) and on the output (dy)."""
        st = self.sparse_state
        name, owner, w = st.name, st.owner, self.weight

        def emit(op: str) -> Callable[[Tensor], None]:
            return lambda g: _emit_named(name, owner, op, g, g)

        training = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        x_used, w_used = x, w
        if training and x.requires_grad:
            x_used = x.view_as(x)
            x_used.register_hook(emit("grad_input"))
        if training and w.requires_grad:
            w_used = w.view_as(w)
            w_used.register_hook(emit("grad_weight"))
        # The hooks above and below are the seam's own: they emit this layer's backward events.
        y = F.linear(x_used, w_used, self.bias) if isinstance(self, nn.Linear) else self._conv_forward(
            x_used, w_used, self.bias)
        events = [("weight", w), ("input", x), ("output", y)]
        if training:
            events += [("weight_for_grad_input", w), ("input_for_grad_weight", x)]
        for op, t in events:
            _emit_named(name, owner, op, t, t)
        if training and y.requires_grad:
            y.register_hook(emit("grad_output"))
        return y

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
            return self._observed_plain_forward(x) if _OBSERVERS else nn.Conv2d.forward(self, x)
        return self._sparse_forward(x, ConvGemm(self.stride, self.padding, self.dilation, self.groups))


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` whose operands are sparsified by a :class:`LayerSpec`; same parameters and state_dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_dense or _DENSE_MODE[0]:
            return self._observed_plain_forward(x) if _OBSERVERS else nn.Linear.forward(self, x)
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
    c = st.cache.get("weight")
    if c is not None and c.mask is not None:  # a periodic threshold's cached mask (see sparsify_operand)
        return w * c.mask.to(w.dtype)
    thr = c.thr if c is not None and c.computed_at is not None else sp.threshold(w, cfg, key=st.name)
    return sp.apply(w, cfg, thr, None)
