"""Sparsity telemetry: count zeros in every operand of every conv/linear layer during training or evaluation.

For each ``nn.Conv2d`` / ``nn.Linear`` (sparse layers subclass these) the :class:`Monitor` records, on every
``every``-th step, the fraction of exact zeros (and optionally of near-zeros, ``|v| <= threshold``) of

============== =====================================================================================
``weight``      the weight as the forward uses it (``sparsetrain.layers.effective_weight(m)``; ``m.weight`` if dense)
``input``       the activation the layer receives (``x``, before the layer's own input sparsifier)
``output``      the activation the layer returns (``y``, after its output sparsifier)
``grad_output`` ``dy``, the gradient w.r.t. the layer's output, as the layer receives it (before its own
                grad-output sparsifier; an ``output`` sparsifier's mask is already applied, as in the kernel)
``grad_input``  ``dx``, the gradient the layer sends to its input (its own contribution only)
``grad_weight`` ``dW``, the accumulated ``weight.grad`` the optimizer consumes, read at :meth:`Monitor.step`
============== =====================================================================================

One seam: a sparse layer is observed only through :func:`sparsetrain.layers.add_observer` -- each row above is
the layer's :class:`~sparsetrain.layers.OperandEvent` of that operand, on the side of its sparsifier the table names
(``before`` for ``input`` and ``grad_output``, ``after`` for the others). A sparse layer that computes as the plain
module (its spec has become fully dense) reports its dense operands through the same seam. The Monitor registers
its observer only for sampling steps, so nothing builds events on the others. What it records is the fraction of
exact zeros of each tensor at those points; the *density* of an operand (its kept fraction as the GEMM used it,
the ``after`` side, ``input_for_grad_weight`` included) has one definition, ``SparsityHandle.densities()``, which
the epoch metrics, the summary and the report use. ``grad_weight`` is read from ``weight.grad`` when
:meth:`Monitor.step` runs (the seam's ``grad_weight`` event only says the layer received one), so a loop that changes
the gradients between ``backward()`` and the update (TensorQuant's in-loop threshold, DDP's averaging) is recorded
as the optimizer sees it: call ``mon.step()`` after that change.

Plain modules -- a dense first layer the recipe left unswapped, a model never sparsified, a baked inference model
-- run no sparsetrain code, so nothing reports their operands: for them alone the Monitor adds module, tensor and
post-accumulate-grad hooks at the same places.

Usage (one ``mon.step()`` per optimizer step, anywhere after ``backward()``)::

    with Monitor(model, every=50, sinks=[JsonlSink(run_dir / "telemetry.jsonl")]) as mon:
        for epoch in range(epochs):
            mon.epoch = epoch
            for x, y in loader:
                loss = criterion(model(x), y)
                optimizer.zero_grad()
                loss.backward()        # dy, dx and dW are counted here on sampling steps
                optimizer.step()
                mon.step()             # write the sample (if this was a sampling step) and advance

How a step is sampled: whether the current step is a sampling step is decided when the previous ``mon.step()``
returns (``mon.sampling``), so the observer and the hooks of that iteration know it from the start. The weight
gradient of every layer that received one in the step is counted when ``mon.step()`` runs: the ``weight.grad``
the optimizer consumes (after any gradient sparsifier of a sparse layer, before or after ``optimizer.step()``,
which leaves it unchanged). Gradient accumulation over several backward passes: activations
and activation gradients are summed over all passes of the step (element-weighted), ``grad_weight`` is the
accumulated gradient after the last pass, ``weight`` is counted at the first forward of the step.

Cost: on a non-sampling step no observer is registered and each plain-module hook is one attribute check; no
tensor is held. On a sampling step
zeros are counted on the device (``torch.count_nonzero``) and a single ``.tolist()`` per step moves the counts
to the host. By default layers in eval mode (``model.eval()``) are not recorded, so an evaluation pass between
training steps does not pollute a training sample; pass ``include_eval=True`` to measure inference.

Create the Monitor *after* ``sparsetrain.sparsify_`` (which swaps modules): the Monitor knows the layers present
at construction (sparse ones by identity, plain ones by their hooks).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sparsetrain.layers import OPERANDS, OperandEvent, add_observer, counted_layer, effective_weight, is_sparse_layer
from sparsetrain.telemetry.blocks import (
    ELEMENT_WEIGHTED,
    TOTAL,
    Count,
    aggregate,
    block_members,
    resolve_blocks,
)

__all__ = [
    "Monitor",
    "TENSORS",
    "NearZeroThreshold",
    "BLOCK_ACTIVATIONS",
    "monitored_layers",
    "counts_from_records",
    "evaluate_with_monitor",
]

logger = logging.getLogger(__name__)

#: What a block's activation records count (see :class:`Monitor`); the first is the default.
BLOCK_ACTIVATIONS = ("block_output", "last_layer")
_BOUNDARY = "\x00"

#: Tensor names in record order: the entries of ``layers.OPERANDS`` visible at a module's boundary. The per-GEMM
#: copies (``weight_for_grad_input``, ``input_for_grad_weight``) exist only inside a sparse layer's autograd.
TENSORS: tuple[str, ...] = tuple(op for op in OPERANDS if op not in ("weight_for_grad_input", "input_for_grad_weight"))

#: A near-zero threshold: one value for every tensor, a mapping tensor name -> value (missing = none), or a
#: callable ``(layer_name, tensor_name) -> value or None``.
NearZeroThreshold = float | Mapping[str, float] | Callable[[str, str], "float | None"] | None


def monitored_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The conv/linear layers of ``model`` by name, in registration order.

    Args:
        model: any module.
        layers: restrict to these names (exact module names); ``None`` = every ``nn.Conv2d`` and ``nn.Linear``.

    Raises:
        ValueError: if a requested name is not a conv/linear layer of the model, or the model has none.
    """
    found = {name: m for name, m in model.named_modules() if counted_layer(m)}
    if layers is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to monitor")
        return found
    bad = [n for n in layers if n not in found]
    if bad:
        raise ValueError(f"not conv/linear layers of the model: {bad}; valid names: {', '.join(found)}")
    wanted = set(layers)
    return {n: m for n, m in found.items() if n in wanted}


def _resolve_thresholds(spec: NearZeroThreshold, names: Sequence[str]) -> dict[tuple[str, str], float]:
    def check(value: Any, where: str) -> float:
        v = float(value)
        if not (v >= 0.0 and math.isfinite(v)):
            raise ValueError(f"near_zero_threshold{where} must be a finite number >= 0, got {value!r}")
        return v

    out: dict[tuple[str, str], float] = {}
    if spec is None:
        return out
    if isinstance(spec, (int, float)):
        v = check(spec, "")
        return {(n, t): v for n in names for t in TENSORS}
    if isinstance(spec, Mapping):
        bad = [k for k in spec if k not in TENSORS]
        if bad:
            raise ValueError(f"near_zero_threshold keys must be tensor names {TENSORS}, got {bad}")
        return {(n, t): check(v, f"[{t!r}]") for t, v in spec.items() for n in names}
    if callable(spec):
        for n in names:
            for t in TENSORS:
                v = spec(n, t)
                if v is not None:
                    out[(n, t)] = check(v, f"({n!r}, {t!r})")
        return out
    raise TypeError(f"near_zero_threshold must be a float, a mapping or a callable, got {type(spec).__name__}")


class _Acc:
    """Per (layer, tensor) accumulator of on-device counts during one sampling step."""

    __slots__ = ("numel", "zeros", "near")

    def __init__(self) -> None:
        self.numel = 0
        self.zeros: list[Tensor] = []
        self.near: list[Tensor] = []


def counts_from_records(records: Sequence[Mapping[str, Any]], kind: str = "layer") -> dict[str, dict[str, Count]]:
    """Rebuild ``{name: {tensor: Count}}`` from telemetry records of one step (e.g. :meth:`Monitor.latest_records`).

    Near-zero counts are recovered from ``near_zero_sparsity * numel`` (exact, as both are integers' ratio).
    """
    out: dict[str, dict[str, Count]] = {}
    for r in records:
        if r["kind"] != kind:
            continue
        nz = r.get("near_zero_sparsity")
        near = None if nz is None else int(round(nz * r["numel"]))
        out.setdefault(r["name"], {})[r["tensor"]] = Count(r["numel"], r["zeros"], near, r.get("threshold"))
    return out


class Monitor:
    """Record the sparsity of weights, activations and gradients of every conv/linear layer every ``every`` steps.

    Args:
        model: the model (create the monitor after ``sparsify_``).
        every: sample every ``every``-th step; step indices ``start_step, start_step+1, ...`` are sampled when
            ``index % every == 0`` (so the first step, index 0, is always sampled).
        near_zero_threshold: also count ``|v| <= threshold``: a float for every tensor, a mapping
            ``{tensor_name: threshold}`` (e.g. ``{"grad_weight": 1e-3}``), or a callable
            ``(layer_name, tensor_name) -> threshold or None``.
        sinks: objects with ``write(records: list[dict])`` and ``close()``; each sample is written once.
        blocks: ``"auto"`` (every proper name prefix holding >= 2 layers), ``None`` or a list of prefixes;
            see :mod:`sparsetrain.telemetry.blocks` for the aggregation rules.
        block_activations: what a block's ``input``/``output`` records count. ``"block_output"`` (default,
            TensorQuant's definition): the tensors the block *module* receives and returns, e.g. a ResNet block's
            output after its last ReLU (and the residual add). ``"last_layer"``: the input/output of the block's last
            conv/linear layer (the module's own output is before any ReLU that follows it).
        layers: restrict to these layer names (default: all ``nn.Conv2d``/``nn.Linear``).
        include_eval: also record layers in eval mode (for inference measurements).
        start_step: index of the first step (to continue numbering after resuming from a checkpoint).
        total: also emit the whole-model aggregate as block :data:`~sparsetrain.telemetry.blocks.TOTAL`.
        close_sinks: close the sinks when the monitor is closed.

    Records (one dict per layer/block and tensor, written to the sinks and returned by :meth:`step`)::

        {"step": 0, "epoch": 0, "name": "conv1", "kind": "layer", "tensor": "input", "numel": 25088,
         "zeros": 12000, "sparsity": 0.478, "near_zero_sparsity": None, "threshold": None}

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with Monitor(model, every=1) as mon:
        ...     model(torch.randn(3, 4)).sum().backward()
        ...     records = mon.step()
        >>> sorted({r["tensor"] for r in records})
        ['grad_input', 'grad_output', 'grad_weight', 'input', 'output', 'weight']
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        near_zero_threshold: NearZeroThreshold = None,
        sinks: Sequence[Any] = (),
        blocks: str | Sequence[str] | None = "auto",
        layers: Sequence[str] | None = None,
        *,
        block_activations: str = "block_output",
        include_eval: bool = False,
        start_step: int = 0,
        total: bool = True,
        close_sinks: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        for s in sinks:
            if not (callable(getattr(s, "write", None)) and callable(getattr(s, "close", None))):
                raise TypeError(f"a sink needs write(records) and close() methods, got {type(s).__name__}")
        self._layers = monitored_layers(model, layers)
        self.layer_names: list[str] = list(self._layers)
        self.block_names: list[str] = resolve_blocks(blocks, self.layer_names)
        self._members = {b: block_members(b, self.layer_names) for b in self.block_names}
        if total:
            self._members[TOTAL] = list(self.layer_names)
        if block_activations not in BLOCK_ACTIVATIONS:
            raise ValueError(f"block_activations must be one of {', '.join(BLOCK_ACTIVATIONS)}, "
                             f"got {block_activations!r}")
        self.block_activations = block_activations
        self._thr = _resolve_thresholds(near_zero_threshold, self.layer_names)
        # Block-boundary counts live under a key no module name can take (names never start with a NUL).
        boundary = self.block_names if block_activations == "block_output" else []
        for (b, t), v in _resolve_thresholds(near_zero_threshold, boundary).items():
            self._thr[(_BOUNDARY + b, t)] = v
        self.every = every
        self.include_eval = include_eval
        self.sinks = list(sinks)
        self.close_sinks = close_sinks
        self.epoch: int | None = None
        self._step = start_step
        self._sampling = self._step % every == 0
        self._acc: dict[tuple[str, str], _Acc] = {}
        self._wgrad_params: dict[str, Tensor] = {}  # weights whose gradient this sampling step counted
        self._handles: list[Any] = []  # module and parameter hooks, removed on close
        self._step_handles: list[Any] = []  # tensor hooks of the current sampling step
        self._graph_built = False  # a sparse layer's forward built an autograd graph in this sampling step
        self._latest: list[dict[str, Any]] = []
        self._warned_late = False
        self._closed = False
        # Sparse layers are observed through the seam only (their operands as their GEMMs used them).
        self._names = {id(m): name for name, m in self._layers.items()}
        self._observer: Any = None  # registered for sampling steps only: an observer makes the layers build events
        self._observe(self._sampling)
        for name, m in self._layers.items():
            if is_sparse_layer(m):
                continue
            # Not the seam: a plain module runs no sparsetrain code, so nothing reports its operands.
            self._handles.append(m.register_forward_pre_hook(functools.partial(self._pre_hook, name)))
            self._handles.append(m.register_forward_hook(functools.partial(self._fwd_hook, name)))
            self._handles.append(m.weight.register_post_accumulate_grad_hook(functools.partial(self._wgrad_hook, name)))
        for b in boundary:
            block = model.get_submodule(b)
            # Not the seam: a block is no GEMM; what it returns (after its residual add and ReLU) passes no layer.
            self._handles.append(block.register_forward_hook(functools.partial(self._block_hook, _BOUNDARY + b)))

    # ------------------------------------------------------------------ state
    @property
    def step_index(self) -> int:
        """Index of the step in progress (the one the next :meth:`step` call ends)."""
        return self._step

    @property
    def sampling(self) -> bool:
        """Whether the step in progress is recorded."""
        return self._sampling and not self._closed

    # ------------------------------------------------------------------ hooks
    def _active(self, module: nn.Module) -> bool:
        return self._sampling and (module.training or self.include_eval)

    def _observe(self, on: bool) -> None:
        if on and self._observer is None:
            self._observer = add_observer(self._on_event)
        elif not on and self._observer is not None:
            self._observer.remove()
            self._observer = None

    # The seam's operand -> (the Monitor's tensor, the side of the sparsifier it is counted on): activations at the
    # layer's boundary (what it receives, what it returns), the weight as the forward uses it.
    _SEAM = {"weight": ("weight", "after"), "input": ("input", "before"), "output": ("output", "after"),
             "grad_output": ("grad_output", "before"), "grad_input": ("grad_input", "after")}

    def _on_event(self, ev: OperandEvent) -> None:
        name = self._names.get(id(ev.module))
        if name is None or not self._active(ev.module):
            return
        if ev.operand == "grad_weight":
            # Counted at step(): the accumulated gradient as the optimizer sees it (after any change the loop makes
            # between backward and the update: a gradient threshold, DDP's averaging).
            self._wgrad_params[name] = ev.module.weight
        elif ev.operand in ("weight_for_grad_input", "input_for_grad_weight"):
            self._graph_built = True  # saved for backward: a gradient should arrive before step()
        else:
            tensor, side = self._SEAM[ev.operand]
            if tensor != "weight" or (name, "weight") not in self._acc:
                self._count(name, tensor, getattr(ev, side))

    def _count(self, name: str, tensor: str, t: Tensor, replace: bool = False) -> None:
        t = t.detach()
        acc = self._acc.get((name, tensor))
        if acc is None or replace:
            acc = self._acc[(name, tensor)] = _Acc()
        acc.numel += t.numel()
        acc.zeros.append(t.numel() - torch.count_nonzero(t))
        thr = self._thr.get((name, tensor))
        if thr is not None:
            acc.near.append(torch.count_nonzero(t.abs() <= thr))

    def _pre_hook(self, name: str, module: nn.Module, args: tuple) -> tuple | None:
        if not self._active(module) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        self._count(name, "input", x)
        if torch.is_grad_enabled() and x.requires_grad:
            # An alias that only this layer consumes: its gradient is this layer's dx alone, even when x also
            # feeds a shortcut or another branch (a hook on x itself would see the summed gradient).
            alias = x.view_as(x)  # (a plain module: no seam reports its dx)
            self._step_handles.append(alias.register_hook(functools.partial(self._grad_hook, name, "grad_input")))
            return (alias, *args[1:])
        return None

    def _fwd_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active(module):
            return
        if (name, "weight") not in self._acc:
            self._count(name, "weight", effective_weight(module))
        if isinstance(output, Tensor):
            self._count(name, "output", output)
            if torch.is_grad_enabled() and output.requires_grad:
                # A tensor hook registered before a later in-place op (e.g. ReLU(inplace=True)) still receives the
                # gradient of this version of the tensor, i.e. the dy the layer's backward consumes.
                hook = functools.partial(self._grad_hook, name, "grad_output")  # a plain module: no seam
                self._step_handles.append(output.register_hook(hook))

    def _block_hook(self, key: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active(module):
            return
        if args and isinstance(args[0], Tensor):
            self._count(key, "input", args[0])
        if isinstance(output, Tensor):
            self._count(key, "output", output)

    def _grad_hook(self, name: str, tensor: str, grad: Tensor) -> None:
        self._count(name, tensor, grad)

    def _wgrad_hook(self, name: str, param: Tensor) -> None:
        if self._sampling and param.grad is not None:
            self._wgrad_params[name] = param  # counted at step(), as the optimizer sees it

    # ------------------------------------------------------------------ sampling
    def step(self, epoch: int | None = None) -> list[dict[str, Any]] | None:
        """End the current step: write its sample if it was a sampling step, then advance the step index.

        Call once per optimizer step, after ``loss.backward()`` (before or after ``optimizer.step()``).

        Args:
            epoch: stored in the records (sets :attr:`epoch`); ``None`` keeps the current value.

        Returns:
            The records written, or ``None`` if nothing was recorded in this step.
        """
        if self._closed:
            raise RuntimeError("Monitor.step() called after the monitor was closed")
        if epoch is not None:
            self.epoch = epoch
        records = self._flush() if self._acc or self._wgrad_params else None
        self._step += 1
        self._sampling = self._step % self.every == 0
        self._observe(self._sampling)
        return records

    def _flush(self) -> list[dict[str, Any]]:
        for name, param in self._wgrad_params.items():
            if param.grad is not None:
                self._count(name, "grad_weight", param.grad, replace=True)
        acc, self._acc = self._acc, {}
        graph = self._step_handles or self._graph_built
        self._graph_built = False
        if graph and not any(t in ("grad_output", "grad_input") for _, t in acc) and not self._warned_late:
            logger.warning("telemetry: step %d built an autograd graph but no gradient arrived before mon.step(); "
                           "call mon.step() after loss.backward() to record gradients", self._step)
            self._warned_late = True
        for h in self._step_handles:
            h.remove()
        self._step_handles = []
        self._wgrad_params = {}
        # One host transfer for the whole step: stack every 0-dim count and call tolist() once.
        flat = [t for a in acc.values() for t in (*a.zeros, *a.near)]
        device = flat[0].device
        values = torch.stack([t.to(device) for t in flat]).tolist()
        counts: dict[str, dict[str, Count]] = {}
        i = 0
        for (name, tensor), a in acc.items():
            zeros = int(sum(values[i : i + len(a.zeros)]))
            i += len(a.zeros)
            near = None
            if a.near:
                near = int(sum(values[i : i + len(a.near)]))
                i += len(a.near)
            counts.setdefault(name, {})[tensor] = Count(a.numel, zeros, near, self._thr.get((name, tensor)))
        records = self._records(counts)
        for s in self.sinks:
            s.write(records)
        self._latest = records
        return records

    def _records(self, counts: dict[str, dict[str, Count]]) -> list[dict[str, Any]]:
        records = []

        def emit(name: str, kind: str, tensor: str, c: Count) -> None:
            records.append(
                {
                    "step": self._step,
                    "epoch": self.epoch,
                    "name": name,
                    "kind": kind,
                    "tensor": tensor,
                    "numel": c.numel,
                    "zeros": c.zeros,
                    "sparsity": c.sparsity,
                    "near_zero_sparsity": c.near_zero_sparsity,
                    "threshold": c.threshold if c.near_zeros is not None else None,
                }
            )

        for name in self.layer_names:
            for tensor in TENSORS:
                c = counts.get(name, {}).get(tensor)
                if c is not None:
                    emit(name, "layer", tensor, c)
        for block, members in self._members.items():
            for tensor in TENSORS:
                per_layer = {n: counts[n][tensor] for n in members if tensor in counts.get(n, {})}
                last = tensor not in ELEMENT_WEIGHTED and block != TOTAL
                c = aggregate(per_layer, members, last_layer=last)
                if last and self.block_activations == "block_output":
                    c = counts.get(_BOUNDARY + block, {}).get(tensor)
                if c is not None:
                    emit(block, "block", tensor, c)
        return records

    # ------------------------------------------------------------------ results
    def latest_records(self) -> list[dict[str, Any]]:
        """The records of the last sample (empty before the first one)."""
        return list(self._latest)

    def latest(self) -> dict[str, Any]:
        """The last sample as a nested dict, for progress output.

        Returns:
            ``{"step": int | None, "epoch": ..., "layer": {name: {tensor: sparsity}}, "block": {...},
            "near_zero": {"layer": {name: {tensor: near_zero_sparsity}}, "block": {...}}}``; ``near_zero`` only holds
            tensors that have a threshold.
        """
        out: dict[str, Any] = {
            "step": self._latest[0]["step"] if self._latest else None,
            "epoch": self._latest[0]["epoch"] if self._latest else None,
            "layer": {},
            "block": {},
            "near_zero": {"layer": {}, "block": {}},
        }
        for r in self._latest:
            out[r["kind"]].setdefault(r["name"], {})[r["tensor"]] = r["sparsity"]
            if r["near_zero_sparsity"] is not None:
                out["near_zero"][r["kind"]].setdefault(r["name"], {})[r["tensor"]] = r["near_zero_sparsity"]
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self, flush: bool = True) -> None:
        """Remove every hook, write a partially recorded sample (``flush=True``) and close the sinks.

        Idempotent. Afterwards the monitor holds no reference to the model.
        """
        if self._closed:
            return
        try:
            if flush and (self._acc or self._wgrad_params):
                self._flush()
        finally:
            for h in self._step_handles + self._handles:
                h.remove()
            self._step_handles, self._handles = [], []
            self._observe(False)
            self._acc, self._wgrad_params, self._names = {}, {}, {}
            self._layers = {}
            self._closed = True
            if self.close_sinks:
                for s in self.sinks:
                    s.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(flush=exc_type is None)

    def __repr__(self) -> str:
        return (
            f"Monitor(layers={len(self.layer_names)}, blocks={len(self.block_names)}, every={self.every}, "
            f"step={self._step}, sinks={len(self.sinks)}{', closed' if self._closed else ''})"
        )


def evaluate_with_monitor(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    near_zero_threshold: NearZeroThreshold = None,
    layers: Sequence[str] | None = None,
    blocks: str | Sequence[str] | None = "auto",
    block_activations: str = "block_output",
) -> tuple[float, list[dict[str, Any]]]:
    """Run ``evaluate(model)`` with a :class:`Monitor` attached; return the accuracy and one step of records.

    ``block_activations`` is the Monitor's (block activation records: the block's boundary, or its last layer's).

    Counts are summed over every evaluated batch (element-weighted over the evaluation set); layers in eval mode
    are recorded (``include_eval=True``).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> acc, records = evaluate_with_monitor(model, lambda m: float(m(torch.ones(2, 4)).shape[0] == 2))
        >>> acc, sorted({r["tensor"] for r in records})
        (1.0, ['input', 'output', 'weight'])
    """
    with Monitor(model, every=1, near_zero_threshold=near_zero_threshold, blocks=blocks, layers=layers,
                 block_activations=block_activations, include_eval=True) as mon:
        acc = evaluate(model)
        records = mon.step() or []
    return acc, records
