"""Non-GEMM work of a training step: element-wise layers, residual additions, the loss and SWAT's top-K selection.

:func:`sparsetrain.accounting.count_flops` counts only the conv/linear GEMMs (the convention of SWAT's inference row
and of ``FlopCounterMode``). With ``count_flops(..., non_gemm=True)`` the same traced forward pass also records every
other arithmetic ATen op, so that a training step can be totalled *with* the work the GEMM convention leaves out.

How the ops are found: the forward pass of :func:`count_flops` runs under a :class:`~torch.utils._python_dispatch.
TorchDispatchMode` that sees every ATen op the model executes, including functional ones that no module hook sees
(``out + identity`` in a residual block, ``F.relu``, ``x.mean((2, 3))``). Each op is attributed to the innermost
module that was running (a module-call stack kept with forward pre/post hooks) and classified by its ATen name.
The backward work is not traced (the trace runs in eval mode): it is derived per op from the standard backward
formulas below, and counted only where autograd would run it (the op's input requires grad).

Per-element costs in FLOPs (1 FLOP = 1 add, multiply, compare or select; 1 FLOP = 0.5 MAC-equivalent, since the
GEMM counts are MACs and FLOPs = 2 x MACs). ``n`` = elements of the op's input, ``m`` = elements of its output:

==================  =============================================  ==============================================
kind                forward                                        backward
==================  =============================================  ==============================================
batchnorm           7 n (training mode: mean 1, centre 1,          7 n: dbeta = sum dy (1), dgamma = sum dy*xhat (2),
                    variance 2, xhat = c*invstd 1, gamma*xhat+     dx = k*(dy - dbeta/N - xhat*dgamma/N) (4);
                    beta 2; per-channel scalars not counted)       3 n when the input needs no grad (dbeta, dgamma)
relu                1 n (compare/select)                           1 n (mask multiply)
pooling (max)       (k - 1) m compares, k = window size            1 m (dy scattered to the arg-max and accumulated)
pooling (avg/mean)  k m = window elements (adds, and the divide)   k m (dy/k spread over the window, accumulated)
residual_add        1 m                                            1 m (the two gradients summed where the branches
                                                                   fork; the add itself passes dy through)
bias                1 m (conv/linear bias add)                     1 m (dbias = sum dy)
dropout             1 n (scaled mask multiply; RNG not counted)    1 n
loss                4 m on the logits (max, subtract, exp, sum of  2 m (softmax - one-hot, scale by 1/N)
                    softmax cross-entropy)
other               1 m per element-wise op not listed above       1 m
==================  =============================================  ==============================================

Data movement (``cat``, ``slice``, ``pad``, ``view``, ``detach``, ...) costs nothing; ops in neither list are
reported by name in :attr:`NonGemmCounts.unclassified_ops` and not counted. The optimizer update is per batch,
not per sample, and is not counted.

None of these get cheaper under SWAT: BatchNorm, ReLU, pooling and the residual additions all act on conv/linear
*outputs* and on the gradients flowing into them, which SWAT leaves dense (a sparse ``W`` times a dense ``x`` gives
a dense output; ``dy`` is never pruned). They are therefore the same in the dense and the sparse total. What SWAT
adds is the top-K itself (counted as :class:`NonGemmOptions` says): for every sparsified tensor, a selection of the
K-th largest magnitude when its threshold is recomputed, and a masking pass (``|v|`` and a compare, 2 FLOPs per
element) on every step. The selection is Quickselect (SWAT §3.3.3: linear-time selection), whose expected number of
comparisons for the K-th of n elements is ``n (2 + 2 H(d))`` with ``d = K/n`` and ``H`` the binary entropy in nats
(Knuth, 1971; 3.00 n at d = 0.2, 2.65 n at d = 0.1). The weight's selection is amortised over its threshold period
(SWAT recomputes thresholds every 1000 iterations on ImageNet); the activation's is done every step unless told
otherwise. A weight is selected once per optimizer step (``training_batch`` samples), activations (and pruned
output gradients) over the whole batch tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparsetrain.layers import counted_layer

__all__ = [
    "NON_GEMM_CONVENTION",
    "NON_GEMM_KINDS",
    "NonGemmCounts",
    "NonGemmOp",
    "NonGemmOptions",
    "quickselect_comparisons_per_element",
    "record_non_gemm",
    "selection_macs",
]

NON_GEMM_KINDS = ("batchnorm", "relu", "pooling", "residual_add", "bias", "dropout", "loss", "other")

NON_GEMM_CONVENTION = (
    "Non-GEMM work in FLOPs per element, converted to MAC-equivalents (default 1 FLOP = 0.5 MAC): batchnorm 7 "
    "forward (training-mode statistics) + 7 backward; relu 1 + 1; max pool (k-1) compares + 1 per output; avg "
    "pool/mean k + k per output; residual add 1 + 1 (gradient sum at the fork); bias 1 + 1; dropout 1 + 1; softmax "
    "cross-entropy 4 + 2 per logit; other element-wise ops 1 + 1; backward only where the input needs grad. "
    "Identical in the dense and the sparse step (SWAT leaves conv outputs and dy dense). Sparse step adds the "
    "top-K: per sparsified tensor, Quickselect n(2 + 2H(d)) comparisons per threshold recomputation (weights "
    "amortised over their threshold period) and a 2-FLOP mask pass per element per step."
)

# ATen ops (overload packet names) by kind; anything else arithmetic is "other" or, if unknown, reported.
_BATCHNORM_OPS = {
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm",
}  # fmt: skip
_RELU_OPS = {"relu", "relu_", "threshold", "threshold_", "hardtanh", "hardtanh_", "clamp_min", "clamp_min_"}
_MAX_POOL_OPS = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices"}
_AVG_POOL_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
                 "adaptive_avg_pool1d", "mean"}  # fmt: skip
_ADD_OPS = {"add", "add_"}
_ELEMENTWISE_OPS = {
    "mul", "mul_", "div", "div_", "sub", "sub_", "pow", "sqrt", "rsqrt", "exp", "log", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "silu", "silu_", "gelu", "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "softmax", "_softmax", "log_softmax", "_log_softmax", "sum", "clamp", "clamp_", "addcmul", "neg",
    "abs", "where", "maximum", "minimum", "bernoulli_", "native_dropout", "layer_norm", "native_layer_norm",
}  # fmt: skip
# Pure data movement, shape bookkeeping and the GEMMs count_flops already counts (their bias is handled apart).
_FREE_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "flatten",
    "detach", "detach_", "clone", "copy_", "contiguous", "empty", "empty_like", "empty_strided", "zeros",
    "zeros_like", "ones", "ones_like", "full", "fill_", "zero_", "randn", "rand", "normal_", "uniform_", "cat",
    "stack", "slice", "select", "index_select", "constant_pad_nd", "pad", "split", "split_with_sizes", "chunk",
    "unbind", "alias", "as_strided", "_to_copy", "to", "lift_fresh", "new_empty", "new_zeros", "mm", "bmm",
    "matmul", "_reshape_alias", "unfold", "convolution_backward", "_local_scalar_dense", "item",
}  # fmt: skip
_GEMM_WITH_BIAS = {"convolution", "_convolution", "addmm", "conv2d", "linear"}


def quickselect_comparisons_per_element(density: float) -> float:
    """Expected comparisons per element of Quickselect finding the K-th largest of n, ``K = density * n``.

    Knuth (1971): ``C(n, K) ~ 2n + 2K ln(n/K) + 2(n-K) ln(n/(n-K)) = n (2 + 2 H(d))``, H the binary entropy in nats.
    Between 2 (d -> 0 or 1) and 2 + 2 ln 2 = 3.39 (the median).

    Example:
        >>> round(quickselect_comparisons_per_element(0.2), 3), round(quickselect_comparisons_per_element(0.1), 3)
        (3.001, 2.65)
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if density in (0.0, 1.0):
        return 2.0
    h = -density * math.log(density) - (1.0 - density) * math.log(1.0 - density)
    return 2.0 + 2.0 * h


@dataclass(frozen=True)
class NonGemmOptions:
    """Settings of non-GEMM counting: ``count_flops(..., non_gemm=NonGemmOptions(...))`` (``True`` = the defaults).

    Attributes:
        weight_period: the weight threshold is recomputed every ``weight_period`` steps (SWAT: 1 on CIFAR, 1000 on
            ImageNet); the selection cost is divided by it. The mask pass is paid on every step.
        activation_period: the same for activations and pruned output gradients (default 1: selected every step).
        comparisons_per_element: comparisons of one selection per element; None = Quickselect's expected count
            ``2 + 2 H(d)`` at the operand's density (:func:`quickselect_comparisons_per_element`).
        mask_flops_per_element: FLOPs of applying a threshold on every step (``|v|`` and a compare: 2).
        training_batch: samples per optimizer step. A weight is selected and masked once per step, whatever the
            batch, so its cost is scaled by ``report batch_size / training_batch`` (e.g. a per-sample report,
            ``batch_size=1``, of a step of 256 images pays 1/256 of it). None = the report's ``batch_size``.
        macs_per_flop: MAC-equivalents per element-wise FLOP or comparison. 0.5 (default) is the report's own unit
            (FLOPs = 2 x MACs); 1.0 counts each element-wise op as one MAC, as FLOP counters that put BatchNorm and
            ReLU elements in their MAC column do (a sensitivity check, see docs/accounting.md).
    """

    weight_period: int = 1
    activation_period: int = 1
    comparisons_per_element: float | None = None
    mask_flops_per_element: float = 2.0
    training_batch: int | None = None
    macs_per_flop: float = 0.5

    def __post_init__(self) -> None:
        for name in ("weight_period", "activation_period", "training_batch"):
            value = getattr(self, name)
            if name == "training_batch" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NonGemmOptions.{name} must be an integer >= 1, got {value!r}")
        c = self.comparisons_per_element
        if c is not None and not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"NonGemmOptions.comparisons_per_element must be a number > 0 or None, got {c!r}")
        if not (isinstance(self.macs_per_flop, (int, float)) and math.isfinite(self.macs_per_flop)
                and self.macs_per_flop > 0):
            raise ValueError(f"NonGemmOptions.macs_per_flop must be a number > 0, got {self.macs_per_flop!r}")
        if not (math.isfinite(self.mask_flops_per_element) and self.mask_flops_per_element >= 0):
            raise ValueError(f"NonGemmOptions.mask_flops_per_element must be >= 0, got {self.mask_flops_per_element}")

    def flops(self, elements: float, density: float, period: int) -> float:
        """FLOPs per step of keeping the top ``density`` of ``elements`` values, threshold recomputed every
        ``period`` steps. 0 for a dense operand (nothing is selected)."""
        if density >= 1.0:
            return 0.0
        c = self.comparisons_per_element
        c = quickselect_comparisons_per_element(density) if c is None else float(c)
        return elements * (c / period + self.mask_flops_per_element)


@dataclass
class NonGemmOp:
    """One classified non-GEMM ATen op of one module (summed over the calls of that module)."""

    module: str
    kind: str
    op: str
    elements: int  # output elements (input elements for batchnorm, relu, dropout and reductions), whole batch
    forward_flops: float
    backward_flops: float
    calls: int = 1

    @property
    def inference_flops(self) -> float:
        """Forward FLOPs of an inference pass: BatchNorm with running statistics is a scale and a shift (2 of its
        7 training-mode FLOPs per element); dropout and the loss do not run."""
        if self.kind == "batchnorm":
            return self.forward_flops * 2 / 7
        return 0.0 if self.kind in ("dropout", "loss") else self.forward_flops

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module, "kind": self.kind, "op": self.op, "elements": self.elements,
            "forward_flops": self.forward_flops, "backward_flops": self.backward_flops, "calls": self.calls,
        }  # fmt: skip


@dataclass
class NonGemmCounts:
    """The density-independent non-GEMM ops of one traced forward pass, plus what selection needs per layer.

    Attributes:
        ops: classified ops, in first-call order.
        layer_output_elements: per conv/linear layer, output elements for the whole batch (the ``dy`` a pruned
            output gradient selects from).
        unclassified_ops: ATen ops seen but neither counted nor known to be free (name -> calls).
        options: the counting settings (top-K, unit).
    """

    ops: list[NonGemmOp]
    layer_output_elements: dict[str, int] = field(default_factory=dict)
    unclassified_ops: dict[str, int] = field(default_factory=dict)
    options: NonGemmOptions = field(default_factory=NonGemmOptions)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """``{kind: {"forward_macs", "backward_macs", "training_macs", "inference_macs"}}`` in MAC-equivalents, every
        kind of :data:`NON_GEMM_KINDS` present, plus ``"total"``."""
        keys = ("forward_macs", "backward_macs", "training_macs", "inference_macs")
        out = {k: dict.fromkeys(keys, 0.0) for k in (*NON_GEMM_KINDS, "total")}
        for op in self.ops:
            values = (op.forward_flops, op.backward_flops, op.forward_flops + op.backward_flops, op.inference_flops)
            for row in (out[op.kind], out["total"]):
                for key, v in zip(keys, values):
                    row[key] += v * self.options.macs_per_flop
        return out

    def training_macs(self) -> float:
        """Forward + backward non-GEMM MAC-equivalents of one training step."""
        return sum(op.forward_flops + op.backward_flops for op in self.ops) * self.options.macs_per_flop

    def inference_macs(self) -> float:
        """Non-GEMM MAC-equivalents of one inference forward pass (see :attr:`NonGemmOp.inference_flops`)."""
        return sum(op.inference_flops for op in self.ops) * self.options.macs_per_flop


def selection_macs(
    layers: list[Any], counts: NonGemmCounts, densities_of: Callable[[str, str], float], batch_size: int
) -> dict[str, float]:
    """Top-K cost per step in MAC-equivalents, ``{"weight", "activation", "grad_output"}``.

    ``layers`` are :class:`~sparsetrain.accounting.flops.LayerFlops` rows (weight elements, saved input elements per
    sample); ``densities_of(layer, operand)`` gives an operand's density. The weight and its backward copy are one
    tensor: selected once at the lower of the two densities, and again only if the two differ (two thresholds).
    """
    sel = counts.options
    weight_share = batch_size / (sel.training_batch or batch_size)  # weights are selected once per step
    out = {"weight": 0.0, "activation": 0.0, "grad_output": 0.0}
    for r in layers:
        pairs = (
            ("weight", ("weight", "weight_for_grad_input"), r.weight_elements * weight_share, sel.weight_period),
            ("activation", ("input", "input_for_grad_weight"), r.saved_activation_elements * batch_size,
             sel.activation_period),
            ("grad_output", ("grad_output",), counts.layer_output_elements.get(r.name, 0), sel.activation_period),
        )  # fmt: skip
        for kind, operands, n, period in pairs:
            for d in sorted({densities_of(r.name, op) for op in operands}):
                out[kind] += sel.flops(n, d, period) * sel.macs_per_flop
    return out


def _packet(func: Any) -> str:
    """``aten.add_.Tensor`` -> ``add_``."""
    name = getattr(func, "__name__", str(func))
    return name.split(".")[0]


def _window(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], inp: torch.Tensor, out: torch.Tensor) -> int:
    """Elements of one pooling window: the kernel_size argument, else (adaptive pooling, a mean over dims) input
    elements per output element."""
    if "adaptive" in name or name == "mean":
        return max(inp.numel() // max(out.numel(), 1), 1)  # args[1] is an output size (or dims), not a kernel
    ks = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    if isinstance(ks, (list, tuple)) and ks and all(isinstance(k, int) for k in ks):
        spatial = out.dim() - 2 if out.dim() > 2 else out.dim() - 1
        return math.prod(ks) if len(ks) > 1 else ks[0] ** max(spatial, 1)
    if isinstance(ks, int):
        return ks ** max(out.dim() - 2, 1)
    return max(inp.numel() // max(out.numel(), 1), 1)  # adaptive pooling, mean over dims


class _Recorder(TorchDispatchMode):  # not the seam: it sees the ATen ops no layer reports (BN, ReLU, adds, ...)
    """Classifies every ATen op of a forward pass; see the module docstring for the per-element costs."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.ops: dict[tuple[str, str, str], NonGemmOp] = {}
        self.unclassified: dict[str, int] = {}

    def _add(self, kind: str, op: str, elements: int, fwd: float, bwd: float) -> None:
        key = (self.stack[-1] if self.stack else "", kind, op)
        row = self.ops.get(key)
        if row is None:
            self.ops[key] = NonGemmOp(key[0], kind, op, elements, fwd, bwd)
        else:
            row.elements += elements
            row.forward_flops += fwd
            row.backward_flops += bwd
            row.calls += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.classify(_packet(func), args, kwargs, out)
        return out

    def classify(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = tensors[0] if tensors else None
        y = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(y, torch.Tensor) or first is None or not y.is_floating_point():
            return
        m, needs_grad = y.numel(), any(t.requires_grad for t in tensors)
        if name in _GEMM_WITH_BIAS:
            bias = args[2] if name in {"convolution", "_convolution", "conv2d", "linear"} and len(args) > 2 else (
                args[0] if name == "addmm" else None)
            if isinstance(bias, torch.Tensor):
                self._add("bias", name, m, m, m if bias.requires_grad else 0)
        elif name in _BATCHNORM_OPS:
            n = first.numel()
            self._add("batchnorm", name, n, 7 * n, 7 * n if first.requires_grad else (3 * n if needs_grad else 0))
        elif name in _RELU_OPS:
            self._add("relu", name, first.numel(), first.numel(), first.numel() if needs_grad else 0)
        elif name in _MAX_POOL_OPS:
            k = _window(name, args, kwargs, first, y)
            self._add("pooling", name, m, (k - 1) * m, m if needs_grad else 0)
        elif name in _AVG_POOL_OPS:
            k = _window(name, args, kwargs, first, y)
            self._add("pooling", name, m, k * m, k * m if needs_grad else 0)
        elif name in _ADD_OPS and len(tensors) >= 2 and all(t.numel() == m for t in tensors[:2]):
            # Two activation-sized operands: a residual (skip) connection.
            self._add("residual_add", name, m, m, m if needs_grad else 0)
        elif name in _ELEMENTWISE_OPS or name in _ADD_OPS:
            n = max(first.numel(), m)  # a reduction (sum) reads n elements
            self._add("other", name, n, n, n if needs_grad else 0)
        elif name not in _FREE_OPS:
            self.unclassified[name] = self.unclassified.get(name, 0) + 1


@contextmanager
def record_non_gemm(model: nn.Module, out: dict[str, Any]) -> Iterator[None]:
    """Record the non-GEMM ops of the forward passes run inside; fills ``out["counts"]`` with a :class:`NonGemmCounts`.

    Used by :func:`sparsetrain.accounting.count_flops` around its traced forward (eval mode, dense mode, autograd on).
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    layer_out: dict[str, int] = {}
    recorder = _Recorder(stack)
    final: list[torch.Tensor] = []

    def pre(module: nn.Module, _inputs: Any) -> None:
        stack.append(names[id(module)])

    def post(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        y = output[0] if isinstance(output, (tuple, list)) and output else output
        if counted_layer(module) and isinstance(y, torch.Tensor):
            layer_out[names[id(module)]] = layer_out.get(names[id(module)], 0) + y.numel()
        if isinstance(module, nn.modules.dropout._DropoutNd) and inputs and isinstance(inputs[0], torch.Tensor):
            # Eval mode (the trace's) skips dropout entirely; a training step pays its mask multiply.
            x = inputs[0]
            recorder._add("dropout", type(module).__name__, x.numel(), x.numel(), x.numel() if x.requires_grad else 0)
        if stack:
            stack.pop()
        if module is model and isinstance(y, torch.Tensor):
            final.append(y)

    # Not the seam: non-GEMM work happens outside conv/linear layers; these hooks name the module each op runs in.
    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with recorder:
            yield
    finally:
        for h in handles:
            h.remove()
    ops = list(recorder.ops.values())
    if final and final[-1].is_floating_point():
        # Softmax cross-entropy on the logits; the trace does not run a loss, a training step does.
        logits = final[-1].numel()
        ops.append(NonGemmOp("(loss)", "loss", "cross_entropy", logits, 4 * logits, 2 * logits))
    out["counts"] = NonGemmCounts(ops=ops, layer_output_elements=layer_out, unclassified_ops=recorder.unclassified)
