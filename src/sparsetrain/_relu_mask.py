"""The 1-bit ReLU sign mask :class:`sparsetrain.layers.PackedReLU` saves: packed from the output and read by backward
in one native pass each on eager CPU (:mod:`sparsetrain._native`), else by :mod:`sparsetrain.packing`'s PyTorch ops;
bit-identical either way."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetrain import packing
from sparsetrain._native import NATIVE_DTYPES, native
from sparsetrain.sparsifiers import dense_order

__all__ = ["pack_positive", "relu_backward"]


def pack_positive(t: Tensor) -> tuple[packing.Packed, tuple[Tensor, ...]]:
    """``pack_mask(t > 0)`` (a ReLU output's sign), in one native pass on eager CPU."""
    perm = dense_order(t)
    if (perm is None or t.dtype not in NATIVE_DTYPES or t.device.type != "cpu"
            or (nat := native()) is None):
        return packing.pack_mask(t > 0)
    flat = t.permute(perm).reshape(-1)
    return packing.Packed("mask", tuple(t.shape), torch.bool, perm, flat.numel()), (nat.pack_positive(flat),)


def relu_backward(dy: Tensor, meta: packing.Packed, bits: Tensor) -> Tensor:
    """ReLU's backward from its packed sign mask: ``dy`` where the output was positive, 0 elsewhere (autograd's
    ``threshold_backward``, bit-identical)."""
    if (dy.dtype in NATIVE_DTYPES and dy.device.type == "cpu" and dense_order(dy) == meta.perm
            and (nat := native()) is not None):
        assert meta.perm is not None
        return packing.unflat(nat.relu_backward_bits(dy.permute(meta.perm).reshape(-1), bits), meta.shape, meta.perm)
    mask = packing.unflat(packing.unpackbits_bytes(bits, meta.numel), meta.shape, meta.perm)
    return torch.ops.aten.threshold_backward(dy, mask, 0)
