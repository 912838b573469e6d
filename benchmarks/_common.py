"""Shared pieces of the benchmark scripts: the mode grammar, the naive SWAT reference and machine facts.

Not part of the library: benchmarks import it as a sibling module (``python benchmarks/bench_step.py`` puts
``benchmarks/`` on ``sys.path``).

Modes (one string each, so a mode can be passed to a child process on its command line):

    dense                    the plain model
    swat-u-<d>[-p<P>]        sparsetrain.sparsify_(model, "swat-u", density=d, threshold_period=P)  (P defaults to 1)
    swat-channel-<d>         sparsetrain.sparsify_(model, "swat-channel", density=d)
    grad-prune-<p>           sparsetrain.sparsify_(model, "grad-prune", p=p)
    naive-<d>                NaiveSwat below: what a one-off research repo does (exact kthvalue every step,
                             top-K W and top-K x kept for backward as ordinary dense tensors)
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import sparsetrain

__all__ = ["Mode", "parse_mode", "apply_mode", "NaiveSwatConv2d", "NaiveSwatLinear", "naive_swat_",
           "machine_info"]

_MODE_RE = re.compile(r"^(dense|swat-u|swat-channel|grad-prune|naive)(?:-([0-9.]+))?(?:-p([0-9]+))?$")


@dataclass(frozen=True)
class Mode:
    """A parsed mode string (see the module docstring)."""

    name: str
    kind: str
    value: float | None = None
    period: int = 1


def parse_mode(s: str) -> Mode:
    """Parse ``dense``, ``swat-u-0.1-p100``, ``swat-channel-0.5``, ``grad-prune-0.9`` or ``naive-0.1``."""
    m = _MODE_RE.match(s)
    if not m:
        raise ValueError(f"unknown mode {s!r}; valid: dense, swat-u-<d>[-p<P>], swat-channel-<d>, "
                         "grad-prune-<p>, naive-<d>")
    kind, value, period = m.group(1), m.group(2), m.group(3)
    if kind == "dense":
        if value or period:
            raise ValueError(f"mode {s!r}: dense takes no parameters")
        return Mode(s, kind)
    if value is None:
        raise ValueError(f"mode {s!r}: {kind} needs a value, e.g. {kind}-0.1")
    if period is not None and kind != "swat-u":
        raise ValueError(f"mode {s!r}: only swat-u takes a threshold period (-p<P>)")
    return Mode(s, kind, float(value), int(period or 1))


def apply_mode(model: nn.Module, mode: Mode) -> Any:
    """Sparsify ``model`` in place as ``mode`` says; returns the handle (``None`` for dense and naive)."""
    if mode.kind == "dense":
        return None
    if mode.kind == "naive":
        naive_swat_(model, mode.value)
        return None
    if mode.kind == "swat-u":
        return sparsetrain.sparsify_(model, "swat-u", density=mode.value, threshold_period=mode.period)
    if mode.kind == "swat-channel":
        return sparsetrain.sparsify_(model, "swat-channel", density=mode.value)
    if mode.kind == "grad-prune":
        return sparsetrain.sparsify_(model, "grad-prune", p=mode.value)
    raise AssertionError(mode)


# ------------------------------------------------------------------------------------------ naive reference
def _topk_dense(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its top-K magnitudes zeroed, as a dense tensor; exact ``kthvalue`` every call."""
    a = t.detach().abs()
    n = a.numel()
    k = min(n, max(1, math.ceil(density * n)))
    thr = a.reshape(-1).kthvalue(n - k + 1).values
    return t.detach() * (a >= thr)


class _NaiveSwatFn(torch.autograd.Function):
    """SWAT the simple way: top-K W for forward and grad-input, top-K x for grad-weight, both saved dense."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, density: float, conv: tuple | None) -> Tensor:
        w_s = _topk_dense(w, density)
        x_s = _topk_dense(x, density)
        y = F.linear(x, w_s, b) if conv is None else F.conv2d(x, w_s, b, *conv)
        ctx.save_for_backward(x_s, w_s)
        ctx.conv, ctx.has_bias = conv, b is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        x_s, w_s = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
        if ctx.conv is None:
            dx = dy @ w_s if need[0] else None
            dw = dy.t() @ x_s if need[1] else None
            db = dy.sum(0) if need[2] else None
        else:
            stride, padding, dilation, groups = ctx.conv
            dx, dw, db = torch.ops.aten.convolution_backward(
                dy, x_s, w_s, [w_s.shape[0]] if need[2] else None, list(stride), list(padding), list(dilation),
                False, [0, 0], groups, list(need))
        return dx, dw, db, None, None


class NaiveSwatConv2d(nn.Conv2d):
    """``nn.Conv2d`` running :class:`_NaiveSwatFn` (benchmark reference only)."""

    density: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        conv = (self.stride, self.padding, self.dilation, self.groups)
        return _NaiveSwatFn.apply(x, self.weight, self.bias, self.density, conv)


class NaiveSwatLinear(nn.Linear):
    """``nn.Linear`` running :class:`_NaiveSwatFn` (benchmark reference only)."""

    density: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return _NaiveSwatFn.apply(x, self.weight, self.bias, self.density, None)


def naive_swat_(model: nn.Module, density: float) -> list[str]:
    """Swap every Conv2d/Linear but the first (SWAT-U's ``first_layer_dense``) for the naive reference.

    The swap changes only the class, so parameters (and the optimizer's references to them) stay the same.
    """
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    mods = dict(model.named_modules())
    for n in names[1:]:
        m = mods[n]
        m.__class__ = NaiveSwatConv2d if isinstance(m, nn.Conv2d) else NaiveSwatLinear
        m.density = density
    return names[1:]


# ------------------------------------------------------------------------------------------- machine facts
def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and thread count: the facts a result table needs next to it."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def loadavg() -> float:
    """The 1-minute load average (other processes competing for the cores skew wall-clock timings)."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")
