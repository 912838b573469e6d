"""Memory accounting of one training step: analytic (dense vs sparse) and measured (bytes saved for backward).

Analytic model (:func:`memory_report`), per training step of a batch:

* parameters, gradients (dense: SWAT's ``dW`` updates every weight) and optimizer state (buffers per parameter:
  SGD 0, SGD with momentum 1, Adam/AdamW 2; or any integer), all at the parameters' element size;
* saved activations: the input of every conv/linear layer, kept for its grad-weight GEMM (``input_for_grad_weight``).
  Other saved tensors (BatchNorm inputs, ReLU outputs, pooling indices) are outside this model; the measured figure
  below includes them;
* weights read by the backward grad-input GEMM (``weight_for_grad_input``): dense, this is the parameter itself;
  sparse, a pruned copy.

A *sparsified* operand (density < 1) is assumed stored compressed in one of :data:`SPARSE_FORMATS`; dense operands
stay dense:

* ``"bitmap"`` (default): one presence bit per element plus the non-zero values, ``ceil(n/8) + nnz*v`` bytes;
* ``"csr"``: the tensor viewed as a matrix with one row per (sample, channel) feature map (rows = ``shape[0] *
  shape[1]``; a conv weight has one row per ``(out, in)`` kernel slice; a 2-D ``(N, F)`` tensor has N rows); values
  + column indices + row pointers,
  ``nnz*(v+i) + (rows+1)*i`` bytes, ``i`` = index bytes (4);
* ``"dense"``: ``n*v`` (no compression; zeros are still stored).

Measured (:func:`measure_saved_tensors`): one real forward+backward with ``torch.autograd.graph.saved_tensors_hooks``
that records every tensor autograd saves for backward, deduplicated by storage (a view counts its own bytes).
Parameters saved by reference cost no extra memory and are reported apart. The conv/linear *inputs* kept for the
grad-weight GEMM are reported both at their dense size (zeros included) and as they would be stored in the chosen
sparse format (counting their actual non-zeros), side by side with the analytic figure. A sparse layer reports that
operand through the public seam (``input_for_grad_weight`` of :func:`sparsetrain.layers.observe`), because it may
save it packed (values plus a bitmap or indices, :mod:`sparsetrain.packing`) rather than as an input-shaped tensor;
those packed pieces are counted in ``packed_bytes``. The process peak-RSS increase over the step is read from
``/proc/self/status`` (Linux; None elsewhere) and is informational only (allocator caching makes it noisy).

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> r = memory_report(m, (4,), optimizer="adam", batch_size=2)
    >>> r.param_bytes, r.grad_bytes, r.optimizer_bytes, r.dense_saved_activation_bytes
    (92, 92, 184, 56)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.accounting.flops import count_flops, layer_density
from sparsetrain.layers import counted_layer, is_sparse_layer, observe

__all__ = [
    "SPARSE_FORMATS",
    "OPTIMIZER_BUFFERS",
    "storage_bytes",
    "optimizer_buffers",
    "MemoryReport",
    "memory_report",
    "SavedTensorStats",
    "measure_saved_tensors",
    "rss_note",
]

SPARSE_FORMATS = ("bitmap", "csr", "dense")
OPTIMIZER_BUFFERS = {"sgd": 0, "sgd-momentum": 1, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2}


def storage_bytes(
    numel: int,
    nnz: float,
    fmt: str = "bitmap",
    *,
    value_bytes: int = 4,
    index_bytes: int = 4,
    rows: int = 1,
) -> float:
    """Bytes to store a tensor of ``numel`` elements with ``nnz`` non-zeros in format ``fmt``.

    Example:
        >>> storage_bytes(64, 8, "bitmap"), storage_bytes(64, 8, "csr", rows=4), storage_bytes(64, 8, "dense")
        (40, 84, 256)
    """
    if fmt == "dense":
        return numel * value_bytes
    if fmt == "bitmap":
        return math.ceil(numel / 8) + nnz * value_bytes
    if fmt == "csr":
        return nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes
    raise ValueError(f"unknown sparse storage format {fmt!r}; valid choices: {', '.join(SPARSE_FORMATS)}")


def _rows(shape: Sequence[int]) -> int:
    """CSR rows of a tensor: one per (sample, channel) map (or (out, in) kernel slice); per row for 2-D tensors."""
    if len(shape) >= 3:
        return int(shape[0]) * int(shape[1])
    if len(shape) == 2:
        return int(shape[0])
    return 1


def optimizer_buffers(optimizer: str | int | torch.optim.Optimizer) -> int:
    """Per-parameter state buffers of an optimizer: a name in :data:`OPTIMIZER_BUFFERS`, a count, or an instance."""
    if isinstance(optimizer, int):
        if optimizer < 0:
            raise ValueError(f"optimizer buffers must be >= 0, got {optimizer}")
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return 2
        if isinstance(optimizer, torch.optim.SGD):
            return 1 if optimizer.defaults.get("momentum", 0) else 0
        raise ValueError(f"cannot infer state buffers of {type(optimizer).__name__}; pass an int")
    key = str(optimizer).lower()
    if key not in OPTIMIZER_BUFFERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZER_BUFFERS)} or an int")
    return OPTIMIZER_BUFFERS[key]


@dataclass
class SavedTensorStats:
    """What autograd actually saved for backward during one measured training step.

    Attributes:
        total_bytes: non-parameter tensors saved, as PyTorch stores them (dense), each storage counted once (its
            largest saved view; a batch sliced from a bigger tensor counts as the slice).
        parameter_bytes: parameters saved by reference (no extra memory; listed for completeness).
        layer_input_bytes: the unique conv/linear inputs kept for the grad-weight GEMM, at their dense size
            (elements x element size; a sparse layer may store them packed, see ``packed_bytes``).
        layer_input_elements: their elements; ``layer_input_nonzeros``: their non-zeros.
        layer_input_compressed_bytes: the same tensors in the sparse format (bitmap/csr) when they contain zeros
            that pay off, else dense (``min`` of both).
        weight_copy_bytes: non-parameter weight-shaped tensors saved by conv/linear layers (e.g. pruned ``W``).
        packed_bytes: tensors sparse layers saved in packed form (values, bitmaps, indices of sparsified operands
            and masks): neither input- nor weight-shaped; part of ``total_bytes``.
        by_module_type: ``total_bytes`` split by the type of the innermost module running when the tensor was saved.
        rss_peak_delta_bytes: increase of the process peak RSS during the step (Linux only, noisy).
        format: sparse format used for ``layer_input_compressed_bytes``.
    """

    total_bytes: int = 0
    parameter_bytes: int = 0
    layer_input_bytes: int = 0
    layer_input_elements: int = 0
    layer_input_nonzeros: int = 0
    layer_input_compressed_bytes: float = 0.0
    weight_copy_bytes: int = 0
    packed_bytes: int = 0
    by_module_type: dict[str, int] = field(default_factory=dict)
    rss_peak_delta_bytes: int | None = None
    format: str = "bitmap"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryReport:
    """Analytic memory of one training step, dense vs sparse, with an optional measurement beside it.

    All figures in bytes for the whole batch. ``total(sparse)`` = parameters + gradients + optimizer state +
    saved conv/linear inputs + backward weights; ``measured_peak_bytes`` = parameters + gradients + optimizer state
    + every tensor actually saved for backward (the activation peak is at the end of the forward pass).
    """

    batch_size: int
    format: str
    optimizer_buffers: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    dense_saved_activation_bytes: int
    sparse_saved_activation_bytes: float
    dense_backward_weight_bytes: int
    sparse_backward_weight_bytes: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    measured: SavedTensorStats | None = None

    def total(self, sparse: bool) -> float:
        base = self.param_bytes + self.grad_bytes + self.optimizer_bytes
        if sparse:
            return base + self.sparse_saved_activation_bytes + self.sparse_backward_weight_bytes
        return base + self.dense_saved_activation_bytes + self.dense_backward_weight_bytes

    @property
    def saved_activation_reduction_pct(self) -> float:
        d = self.dense_saved_activation_bytes
        return 100.0 * (1.0 - self.sparse_saved_activation_bytes / d) if d else 0.0

    @property
    def measured_peak_bytes(self) -> int | None:
        if self.measured is None:
            return None
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.measured.total_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measured"] = self.measured.to_dict() if self.measured is not None else None
        d["dense_total_bytes"] = self.total(False)
        d["sparse_total_bytes"] = self.total(True)
        d["saved_activation_reduction_pct"] = self.saved_activation_reduction_pct
        d["measured_peak_bytes"] = self.measured_peak_bytes
        return d

    def format_table(self) -> str:
        mib = 1024.0**2

        def row(label: str, dense: float, sparse: float) -> str:
            return f"{label:<34} {dense / mib:>12.3f} {sparse / mib:>12.3f}"

        lines = [
            f"{'memory per training step (MiB)':<34} {'dense':>12} {'sparse':>12}",
            row("parameters", self.param_bytes, self.param_bytes),
            row("gradients", self.grad_bytes, self.grad_bytes),
            row(f"optimizer state ({self.optimizer_buffers} buf/param)", self.optimizer_bytes, self.optimizer_bytes),
            row(
                f"saved conv/linear inputs ({self.format})",
                self.dense_saved_activation_bytes,
                self.sparse_saved_activation_bytes,
            ),
            row("backward weights", self.dense_backward_weight_bytes, self.sparse_backward_weight_bytes),
            row("total (analytic)", self.total(False), self.total(True)),
        ]
        m = self.measured
        if m is not None:
            lines += [
                "",
                f"measured on this model (batch {self.batch_size}):",
                f"  saved for backward, all tensors    {m.total_bytes / mib:12.3f}",
                f"  conv/linear inputs, dense size     {m.layer_input_bytes / mib:12.3f}",
                f"  conv/linear inputs in {m.format:<6}       {m.layer_input_compressed_bytes / mib:12.3f}"
                f"  (non-zeros {m.layer_input_nonzeros}/{m.layer_input_elements})",
                f"  pruned weight copies               {m.weight_copy_bytes / mib:12.3f}",
                f"  packed by sparse layers            {m.packed_bytes / mib:12.3f}",
                f"  saved inputs: analytic / measured  {self.sparse_saved_activation_bytes / mib:12.3f} / "
                f"{m.layer_input_compressed_bytes / mib:.3f} = "
                f"{self.sparse_saved_activation_bytes / max(m.layer_input_compressed_bytes, 1e-9):.3f}",
                f"  peak = params+grads+opt+saved      {self.measured_peak_bytes / mib:12.3f}",
            ]
            if m.rss_peak_delta_bytes is not None:
                lines.append(f"  process peak RSS increase          {m.rss_peak_delta_bytes / mib:12.3f}")
        return "\n".join(lines)


def rss_note(mem: MemoryReport) -> str:
    """Why the measured step's process RSS increase differs from the peak beside it, with this report's numbers."""
    mib = 1024 * 1024
    m = mem.measured
    new = mem.grad_bytes + m.total_bytes
    return (
        f"Process RSS vs the peak: of the {mem.measured_peak_bytes / mib:.1f} MiB peak, the parameters "
        f"({mem.param_bytes / mib:.1f}) were resident before the measured step and the optimizer state "
        f"({mem.optimizer_bytes / mib:.1f}) is analytic only (the step runs no optimizer), so the step itself "
        f"allocates gradients + saved tensors = {new / mib:.1f} MiB. Its RSS increase, "
        f"{m.rss_peak_delta_bytes / mib:.1f} MiB, is lower when the allocator reuses blocks freed during the step "
        "and higher by one-off costs (kernel workspaces, library initialisation), which dominate at small batches. "
        "RSS is informational; the analytic rows and the autograd-measured ones are the comparable figures."
    )


def memory_report(
    model: nn.Module,
    input_shape: Sequence[int],
    densities: Mapping[str, Mapping[str, float]] | None = None,
    *,
    batch_size: int = 1,
    optimizer: str | int | torch.optim.Optimizer = "sgd-momentum",
    fmt: str = "bitmap",
    index_bytes: int = 4,
    value_bytes: int | None = None,
    measured: SavedTensorStats | None = None,
) -> MemoryReport:
    """Analytic memory of one training step of ``model`` on a batch of ``input_shape`` inputs.

    Args:
        model: the network; layer input sizes come from one traced forward (as in ``count_flops``).
        input_shape: per-sample input shape.
        densities: ``{layer: {operand: density}}`` (``SparsityHandle.densities()`` format); None = dense.
        batch_size: samples per step.
        optimizer: optimizer name, buffer count or instance (see :func:`optimizer_buffers`).
        fmt: storage format of sparsified operands, one of :data:`SPARSE_FORMATS`.
        index_bytes: bytes per index / row pointer of the CSR format.
        value_bytes: bytes per stored value; default the parameters' element size.
        measured: an optional :func:`measure_saved_tensors` result to report beside the analytic figures.
    """
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"unknown sparse storage format {fmt!r}; valid choices: {', '.join(SPARSE_FORMATS)}")
    params = list(model.parameters())
    elem = value_bytes or (params[0].element_size() if params else 4)
    n_params = sum(p.numel() for p in params)
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    g_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    buffers = optimizer_buffers(optimizer)
    flops = count_flops(model, input_shape, densities, batch_size=1)
    modules = dict(model.named_modules())

    rows: list[dict[str, Any]] = []
    dense_act = sparse_act = dense_w = sparse_w = 0.0
    for r in flops.layers:
        m = modules[r.name]
        n_act = r.saved_activation_elements * batch_size
        # One CSR row per (sample, input channel) map of a conv; per GEMM row for a linear layer.
        rows_act = max(1, r.saved_activation_rows * batch_size)
        d_act = layer_density(densities, r.name, "input_for_grad_weight")
        d_wgi = layer_density(densities, r.name, "weight_for_grad_input")
        act_dense = n_act * elem
        act_sparse = (
            storage_bytes(n_act, d_act * n_act, fmt, value_bytes=elem, index_bytes=index_bytes, rows=rows_act)
            if d_act < 1.0
            else act_dense
        )
        n_w = m.weight.numel()
        w_dense = n_w * elem if r.dense_grad_input_macs else 0
        w_sparse = (
            storage_bytes(n_w, d_wgi * n_w, fmt, value_bytes=elem, index_bytes=index_bytes, rows=_rows(m.weight.shape))
            if d_wgi < 1.0 and w_dense
            else w_dense
        )
        dense_act += act_dense
        sparse_act += act_sparse
        dense_w += w_dense
        sparse_w += w_sparse
        rows.append(
            {
                "name": r.name,
                "saved_activation_elements": n_act,
                "activation_density": d_act,
                "dense_saved_activation_bytes": act_dense,
                "sparse_saved_activation_bytes": act_sparse,
                "weight_for_grad_input_density": d_wgi,
                "dense_backward_weight_bytes": w_dense,
                "sparse_backward_weight_bytes": w_sparse,
            }
        )
    return MemoryReport(
        batch_size=batch_size,
        format=fmt,
        optimizer_buffers=buffers,
        param_bytes=p_bytes,
        grad_bytes=g_bytes,
        optimizer_bytes=buffers * (n_params and g_bytes),
        dense_saved_activation_bytes=int(dense_act),
        sparse_saved_activation_bytes=sparse_act,
        dense_backward_weight_bytes=int(dense_w),
        sparse_backward_weight_bytes=sparse_w,
        layers=rows,
        measured=measured,
    )


def _grow(seen: dict[int, int], ptr: int, nbytes: int) -> int:
    """Record ``nbytes`` for storage ``ptr``; return the increase over what was already counted for it."""
    old = seen.get(ptr, 0)
    if nbytes <= old:
        return 0
    seen[ptr] = nbytes
    return nbytes - old


def _read_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets this process's VmHWM (Linux >= 4.0); harmless if refused.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_saved_tensors(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    fmt: str = "bitmap",
    index_bytes: int = 4,
) -> SavedTensorStats:
    """Run one training step and measure the tensors autograd saves for backward.

    Args:
        model: the network, in the mode you want measured (``train()`` for a training step).
        inputs: a batch.
        targets: labels for ``loss_fn``; if None the loss is the sum of the outputs.
        loss_fn: default cross-entropy.
        optimizer: if given, ``zero_grad()`` before and ``step()`` after the backward pass (a full step).
        fmt: sparse format for the compressed figure of the saved conv/linear inputs.
        index_bytes: CSR index size.

    Returns:
        A :class:`SavedTensorStats`.
    """
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"unknown sparse storage format {fmt!r}; valid choices: {', '.join(SPARSE_FORMATS)}")
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {id(m): tuple(m.weight.shape) for m in model.modules() if counted_layer(m)}
    stack: list[nn.Module] = []
    stats = SavedTensorStats(format=fmt)
    # Bytes counted so far per storage (a storage may be saved through several views; count its largest view once).
    seen_all: dict[int, int] = {}
    seen_param: dict[int, int] = {}
    seen_wcopy: dict[int, int] = {}
    seen_packed: dict[int, int] = {}
    owner_of: dict[int, str] = {}
    seen_inputs: set[tuple[Any, ...]] = set()

    observed: set[int] = set()  # sparse layers that report their operands through the seam

    def count_input(t: torch.Tensor, shared: bool = True) -> None:
        """Add one conv/linear input kept for grad-weight.

        ``shared``: ``t`` may be saved by several layers (a block input feeding conv and shortcut); count it once.
        Such a tensor stays alive until backward, so its storage address identifies it. A sparse layer's own
        sparsified copy (``shared=False``) is new and may be freed once packed, so its address may be reused.
        """
        if shared:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in seen_inputs:
                return
            seen_inputs.add(key)
        numel, nnz = t.numel(), int(torch.count_nonzero(t))
        dense = numel * t.element_size()
        stats.layer_input_bytes += dense
        stats.layer_input_elements += numel
        stats.layer_input_nonzeros += nnz
        comp = storage_bytes(
            numel, nnz, fmt, value_bytes=t.element_size(), index_bytes=index_bytes, rows=_rows(t.shape)
        )
        stats.layer_input_compressed_bytes += min(dense, comp)

    def on_event(ev: Any) -> None:
        # A sparse layer's grad-weight operand, whatever form the layer stores it in (saved only when the weight
        # gets a gradient). Its input-shaped saved tensors are then not classified again by the saved-tensor hook.
        if ev.module is None:
            return
        observed.add(id(ev.module))
        if ev.operand == "input_for_grad_weight" and ev.module.weight.requires_grad:
            count_input(ev.after, shared=ev.after is ev.before)

    def pre(module: nn.Module, _args: Any) -> None:
        stack.append(module)

    def post(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:  # empty tensors
            return t
        # A view (e.g. a batch sliced from a dataset tensor) keeps its whole storage alive, but only the view is
        # what the step saves; count the view's bytes (at most the storage's).
        nbytes = min(storage.nbytes(), t.numel() * t.element_size())
        owner = stack[-1] if stack else None
        if ptr in param_ptrs:
            stats.parameter_bytes += _grow(seen_param, ptr, nbytes)
            return t
        if ptr not in owner_of:
            owner_of[ptr] = type(owner).__name__ if owner is not None else "<functional>"
        delta = _grow(seen_all, ptr, nbytes)
        stats.total_bytes += delta
        if delta:
            key = owner_of[ptr]
            stats.by_module_type[key] = stats.by_module_type.get(key, 0) + delta
        if owner is not None and id(owner) in weight_shapes:
            if t.is_floating_point() and tuple(t.shape) == weight_shapes[id(owner)]:
                stats.weight_copy_bytes += _grow(seen_wcopy, ptr, nbytes)
            elif t.is_floating_point() and t.dim() >= 2:
                if id(owner) not in observed:
                    count_input(t)
            elif is_sparse_layer(owner):
                stats.packed_bytes += _grow(seen_packed, ptr, nbytes)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    handles = []
    for m in model.modules():
        # Not the seam: these name the module (any type, BatchNorm included) that owns each saved tensor.
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    loss_fn = loss_fn or F.cross_entropy
    rss0 = _read_status("VmRSS")
    reset = _reset_peak_rss()
    try:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        # Not the seam: what autograd saves (every module's tensors, parameters included) is not an operand event.
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), observe(on_event):
            out = model(inputs)
            loss = loss_fn(out, targets) if targets is not None else out.float().sum()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    finally:
        for h in handles:
            h.remove()
    peak = _read_status("VmHWM")
    if reset and rss0 is not None and peak is not None:
        stats.rss_peak_delta_bytes = max(0, peak - rss0)
    return stats
