"""Reused buffers for the hot path's large transients (see :func:`scratch`)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor

__all__ = ["scratch", "release_scratch", "set_scratch"]

_SCRATCH: OrderedDict[tuple, Tensor] = OrderedDict()
_SCRATCH_MAX = 64
_ENABLED = [True]


def set_scratch(enabled: bool) -> None:
    """Turn buffer reuse on or off (off frees them): under :func:`sparsetrain.lean_allocator` the allocator itself
    reuses large blocks (its cache) or returns them (glibc thresholds), and keeping them would only add their size to
    the peak."""
    _ENABLED[0] = bool(enabled)
    if not enabled:
        release_scratch()


def scratch(tag: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D buffer reused across layers and steps for a transient of one purpose (``tag``) and size.

    The hot path's transients (an activation's magnitudes while its top-K is selected, the dense copy a packed
    operand is unpacked into for one backward GEMM) are as large as the activation. Allocated afresh per layer and
    step they interleave with the small packed tensors that stay alive, and the default allocator (glibc malloc)
    then cannot give their pages back: the process's peak RSS grows far beyond its live tensors. Reused, they are
    allocated once. A buffer holds one transient at a time (per thread: keyed by thread) and is never saved: what
    is written into it is consumed before the next use of the same tag and size (the next layer's selection, or its
    backward GEMM). Compiled code allocates normally (the compiler plans its own buffers).
    :func:`release_scratch` frees them all.
    """
    if not _ENABLED[0] or torch.compiler.is_compiling():
        return torch.empty(numel, dtype=dtype, device=device)
    key = (tag, numel, dtype, torch.device(device), threading.get_ident())
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
        if len(_SCRATCH) > _SCRATCH_MAX:
            _SCRATCH.popitem(last=False)
    else:
        _SCRATCH.move_to_end(key)
    return buf


def release_scratch() -> None:
    """Free the buffers :func:`scratch` keeps (e.g. before evaluating at another batch size, or to shut down)."""
    _SCRATCH.clear()


