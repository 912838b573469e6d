"""Compact storage for the sparse tensors a layer saves for backward.

A sparse layer saves, e.g., SWAT's top-K activation for the weight-gradient GEMM. Stored as a zero-filled dense
tensor it costs as much memory as the dense activation, which is why masking libraries use *more* memory than
dense training. Here such a tensor is kept as its non-zero values plus either a bitmap (1 bit per element) or
int32 indices (when fewer than 1 in 32 elements are kept, indices are smaller), and expanded only inside backward.
Boolean masks are kept as bitmaps (1 bit, not a bool byte). Values stay in the storage dtype.

Everything is a plain tensor so that ``torch.autograd.graph.saved_tensors_hooks`` (and memory accounting built on
it) sees the real bytes. Compaction needs the kept count, so on an accelerator ``pack`` costs one device-to-host
read per tensor; a recipe's ``pack_saved: false`` trades that for memory.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetrain._native import NATIVE_DTYPES, native
from sparsetrain._scratch import scratch
from sparsetrain.sparsifiers import dense_order

__all__ = ["Packed", "pack", "unpack", "pack_mask", "unpack_mask", "packbits", "unpackbits", "unpackbits_bytes",
           "scatter", "unflat"]

# Multiply-and-shift bit tricks on 8 bools (bytes 0/1) read as one int64: 3 streaming ops per 8 elements instead
# of a shift per bit plus a reduction. The products wrap modulo 2**64 by design. Byte order is little-endian.
_GATHER = 0x0102040810204080  # (sum_i b_i 256**i) * _GATHER has sum_i b_i 2**i in its top byte, no carries
_SPREAD = 0x0101010101010101  # copies a byte into all 8 bytes
_SELECT = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as int64: keeps bit i of byte i
assert sys.byteorder == "little", "packing assumes a little-endian machine"


def packbits(mask: Tensor) -> Tensor:
    """A bool tensor, flattened, as uint8 with 8 elements per byte (bit i = element i); padded with False."""
    u = mask.reshape(-1).view(torch.uint8)
    if u.numel() % 8:
        u = torch.nn.functional.pad(u, (0, 8 - u.numel() % 8))
    return ((u.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpackbits(bits: Tensor, n: int) -> Tensor:
    """Inverse of :func:`packbits`: the first ``n`` bits as a flat bool tensor."""
    return unpackbits_bytes(bits, n) != 0


def unpackbits_bytes(bits: Tensor, n: int) -> Tensor:
    """The first ``n`` bits as flat uint8, non-zero exactly where the bit is set (one pass fewer than bools)."""
    spread = (bits.to(torch.int64) * _SPREAD) & _SELECT
    return spread.view(torch.uint8)[:n]


@dataclass(frozen=True)
class Packed:
    """How one tensor was packed: ``kind`` in {"dense", "bitmap", "indices", "mask"}; the tensors live elsewhere.

    The tensors (values, bitmap or indices) are returned separately by :func:`pack` so that they can go through
    ``ctx.save_for_backward`` (version checks, saved-tensor hooks); this record holds only the metadata.
    """

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    perm: tuple[int, ...] | None  # memory order of the original (channels_last is kept channels_last)
    numel: int


def _flat(t: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    perm = dense_order(t)
    if perm is None:
        t = t.contiguous()
        perm = tuple(range(t.dim()))
    return t.permute(perm).reshape(-1), perm


def pack(t: Tensor, keep: Tensor | None = None) -> tuple[Packed, tuple[Tensor, ...]]:
    """Pack a sparse tensor: its kept values plus a bitmap or indices, whichever is smaller.

    Args:
        t: the tensor (zeros outside ``keep``).
        keep: bool mask of the positions to store (broadcastable to ``t``); default ``t != 0``. Positions outside it
            must be zero in ``t``; kept positions may be zero.

    Returns:
        ``(meta, tensors)``; :func:`unpack` ``(meta, tensors)`` gives back a tensor equal to ``t`` (same values,
        dtype, shape and memory format).
    """
    flat, perm = _flat(t)
    # The mask is read in t's memory order (a view when its layout matches, e.g. computed from t itself).
    kflat = (flat != 0) if keep is None else keep.expand_as(t).permute(perm).reshape(-1)
    values = flat[kflat]
    n = flat.numel()
    meta = dict(shape=tuple(t.shape), dtype=t.dtype, perm=perm, numel=n)
    if values.numel() * 32 < n and n < 2**31:
        return Packed("indices", **meta), (values, kflat.nonzero().reshape(-1).to(torch.int32))
    return Packed("bitmap", **meta), (values, packbits(kflat))


def unpack(meta: Packed, tensors: tuple[Tensor, ...]) -> Tensor:
    """The tensor :func:`pack` stored (a new dense tensor, in the original memory format)."""
    if meta.kind == "mask":
        return unpack_mask(meta, tensors)
    values, index = tensors
    flat = torch.zeros(meta.numel, dtype=meta.dtype, device=values.device)
    if meta.kind == "indices":
        flat[index.long()] = values
    else:
        flat.masked_scatter_(unpackbits(index, meta.numel), values)
    return _unflat(flat, meta)


def _unflat(flat: Tensor, meta: Packed) -> Tensor:
    assert meta.perm is not None
    return unflat(flat, meta.shape, meta.perm)


def unflat(flat: Tensor, shape: tuple[int, ...], perm: tuple[int, ...] | None) -> Tensor:
    """A flat tensor in memory order ``perm`` (see :func:`sparsetrain.sparsifiers.dense_order`) viewed as ``shape``."""
    if perm is None or perm == tuple(range(len(shape))):
        return flat.view(shape)
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return flat.view([shape[d] for d in perm]).permute(inv)


def scatter(pos: Tensor, values: Tensor, shape: tuple[int, ...], perm: tuple[int, ...] | None,
            reuse: str | None = None) -> Tensor:
    """The dense tensor holding ``values`` at the flat positions ``pos`` (memory order ``perm``), zeros elsewhere.

    ``pos`` may hold the padding position ``numel`` (a static-size selection's unused slots): it lands in one spare
    element that is cut off. One zero-fill and one scatter of the kept values: no mask pass, no compaction. With
    ``reuse`` the result lives in a :func:`scratch` buffer of that tag: valid only until the next such call.
    """
    n = math.prod(shape)
    if torch.compiler.is_compiling() and values.device.type == "cpu" and values.dtype in NATIVE_DTYPES:
        # One opaque op: Inductor would fuse a traced zero-fill and scalar scatter into the neighbouring
        # normalisation kernels (a serial loop there); the op runs the native parallel kernel.
        return unflat(torch.ops.sparsetrain.scatter_k(pos, values, n)[:n], shape, perm)
    if reuse is None:
        flat = values.new_zeros(n + 1)
    else:
        flat = scratch(reuse, n + 1, values.dtype, values.device)
        if values.dtype in NATIVE_DTYPES and values.device.type == "cpu" and (nat := native()) is not None:
            nat.scatter_into(flat, pos.contiguous(), values.contiguous())  # zero + scatter, on the intra-op threads
            return unflat(flat[:n], shape, perm)
        flat.zero_()
    flat.index_put_((pos,), values)
    return unflat(flat[:n], shape, perm)


@torch.library.custom_op("sparsetrain::scatter_k", mutates_args=())
def _scatter_k(pos: Tensor, values: Tensor, n: int) -> Tensor:
    """``n + 1`` elements: ``values`` at ``pos`` (padding slots hold ``n``), zeros elsewhere (compiled CPU code)."""
    flat = values.new_empty(n + 1)
    if (nat := native()) is not None:
        nat.scatter_into(flat, pos.contiguous(), values.contiguous())
        return flat
    return flat.zero_().index_put_((pos,), values)


@_scatter_k.register_fake
def _(pos: Tensor, values: Tensor, n: int) -> Tensor:
    return values.new_empty(n + 1)


def pack_mask(mask: Tensor) -> tuple[Packed, tuple[Tensor, ...]]:
    """A bool mask as a bitmap (1 bit per element)."""
    flat, perm = _flat(mask)
    return Packed("mask", tuple(mask.shape), torch.bool, perm, flat.numel()), (packbits(flat),)


def unpack_mask(meta: Packed, tensors: tuple[Tensor, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    return _unflat(unpackbits(tensors[0], meta.numel), meta)
