"""The 1-bit ReLU sign mask :class:`sparsetrain.layers.PackedReLU` saves: packed from the output and read by backward
in one native pass each on CPU (:mod:`sparsetrain._native`; compiled CPU code calls them as opaque
``torch.library`` ops), else by :mod:`sparsetrain.packing`'s PyTorch ops; bit-identical either way."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetrain import packing
from sparsetrain._native import NATIVE_DTYPES, native
from sparsetrain.sparsifiers import selection_order

__all__ = ["pack_positive", "relu_backward"]

_NCHW, _NHWC = (0, 1, 2, 3), (0, 2, 3, 1)


def _kernels(t: Tensor):
    """Where the two native passes come from for ``t``: the opaque ``sparsetrain::`` ops in compiled CPU code, the
    native module in eager CPU code (both name them ``pack_positive``, ``relu_backward_bits`` and
    ``relu_backward_bits_transposed``); None elsewhere.

    Compiled code calls the ops because Inductor on CPU would store a traced bool mask one byte at a time (slower
    than the whole ReLU), and the bit tricks of packing.packbits as int64 arithmetic.
    """
    if t.device.type != "cpu" or t.dtype not in NATIVE_DTYPES:
        return None
    return torch.ops.sparsetrain if torch.compiler.is_compiling() else native()


def pack_positive(t: Tensor) -> tuple[packing.Packed, tuple[Tensor, ...]]:
    """``pack_mask(t > 0)`` (a ReLU output's sign), in one native pass on CPU."""
    perm = selection_order(t)  # in compiled code the order Inductor stores an activation in: no transposing copy
    kernels = _kernels(t)
    if perm is None or kernels is None:
        return packing.pack_mask(t > 0)
    flat = t.permute(perm).reshape(-1)
    return packing.Packed("mask", tuple(t.shape), torch.bool, perm, flat.numel()), (kernels.pack_positive(flat),)


def relu_backward(dy: Tensor, meta: packing.Packed, bits: Tensor) -> Tensor:
    """ReLU's backward from its packed sign mask: ``dy`` where the output was positive, 0 elsewhere (autograd's
    ``threshold_backward``, bit-identical)."""
    assert meta.perm is not None
    kernels = _kernels(dy)
    if kernels is not None:
        laid = dy.permute(meta.perm)
        if laid.is_contiguous():  # dy is laid out in the bits' order: one flat pass
            return packing.unflat(kernels.relu_backward_bits(laid.reshape(-1), bits), meta.shape, meta.perm)
        if dy.dim() == 4 and meta.perm in (_NCHW, _NHWC):
            # Laid out the other way (compiled code packs channels_last, but a gradient through a residual add is
            # NCHW): the kernel reads the bits transposed; a transposing copy of dy costs more than the backward.
            bits_cl = meta.perm == _NHWC
            if dy.is_contiguous(memory_format=torch.contiguous_format if bits_cl else torch.channels_last):
                return kernels.relu_backward_bits_transposed(dy, bits, bits_cl)
    return _unpacked_backward(dy, bits, meta.perm)


def _unpacked_backward(dy: Tensor, bits: Tensor, perm: tuple[int, ...]) -> Tensor:
    """The PyTorch path: the bits (in memory order ``perm`` of ``dy``'s shape) unpacked to a mask, then
    ``threshold_backward``."""
    mask = packing.unflat(packing.unpackbits_bytes(bits, dy.numel()), tuple(dy.shape), perm)
    return torch.ops.aten.threshold_backward(dy, mask, 0)


@torch.library.custom_op("sparsetrain::pack_positive", mutates_args=())
def _pack_positive_op(flat: Tensor) -> Tensor:
    """``packing.packbits(flat > 0)`` of a flat tensor (compiled CPU code)."""
    nat = native()
    return packing.packbits(flat > 0) if nat is None else nat.pack_positive(flat.contiguous())


@_pack_positive_op.register_fake
def _(flat: Tensor) -> Tensor:
    return flat.new_empty(((flat.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op("sparsetrain::relu_backward_bits", mutates_args=())
def _relu_backward_bits_op(dy: Tensor, bits: Tensor) -> Tensor:
    """``dy`` (flat) where the bit is set, +0 elsewhere (compiled CPU code)."""
    nat = native()
    if nat is not None:
        return nat.relu_backward_bits(dy.contiguous(), bits)
    return torch.ops.aten.threshold_backward(dy, packing.unpackbits_bytes(bits, dy.numel()), 0)


@_relu_backward_bits_op.register_fake
def _(dy: Tensor, bits: Tensor) -> Tensor:
    return torch.empty_like(dy)


@torch.library.custom_op("sparsetrain::relu_backward_bits_transposed", mutates_args=())
def _relu_backward_bits_transposed_op(dy: Tensor, bits: Tensor, bits_channels_last: bool) -> Tensor:
    """A 4-D ``dy`` where its bit is set, +0 elsewhere, the bits in the other layout's order (channels_last order
    for a contiguous ``dy`` when ``bits_channels_last``, else NCHW order for a channels_last ``dy``); the result has
    ``dy``'s layout (compiled CPU code)."""
    nat = native()
    if nat is not None:
        return nat.relu_backward_bits_transposed(dy, bits, bits_channels_last)
    # threshold_backward follows the mask's layout here; the result keeps dy's, as the native kernel and the fake do
    layout = torch.contiguous_format if bits_channels_last else torch.channels_last
    return _unpacked_backward(dy, bits, _NHWC if bits_channels_last else _NCHW).contiguous(memory_format=layout)


@_relu_backward_bits_transposed_op.register_fake
def _(dy: Tensor, bits: Tensor, bits_channels_last: bool) -> Tensor:
    return torch.empty_like(dy, memory_format=torch.contiguous_format if bits_channels_last else torch.channels_last)
