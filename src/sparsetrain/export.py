"""Sparse models out: the weights the sparse forward used, as a plain ``state_dict`` and as a compressed file.

A training checkpoint holds the dense, unmasked weights (SWAT updates every weight), so a plain model loaded from
it predicts differently from the trained sparse model. :func:`masked_state_dict` applies each sparse layer's
forward mask (its :func:`~sparsetrain.layers.effective_weight`); the result loads into the vanilla model and
reproduces the sparse model's predictions whenever only weights were sparsified in the forward (activation
sparsifiers on ``input``/``output`` are not weights and cannot be exported into one).

:func:`save_compressed` stores every tensor that is mostly zeros as values plus a bitmap or int32 indices
(:mod:`sparsetrain.packing`), the rest as is; :func:`load_compressed` gives back the exact ``state_dict``.

Example:
    >>> import torch.nn as nn, sparsetrain
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> handle = sparsetrain.sparsify_(model, "swat-u", density=0.1, first_layer_dense=False)
    >>> sd = masked_state_dict(model)
    >>> float((sd["3.weight"] != 0).float().mean()) <= 0.11
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sparsetrain import packing
from sparsetrain.layers import effective_weight, is_sparse_layer

__all__ = ["export_sparse", "masked_state_dict", "save_compressed", "load_compressed", "FORMAT"]

FORMAT = "sparsetrain-compressed-state-dict/1"
# Pack a tensor when at most this fraction is non-zero: values + 1 bit per element beat dense below ~97%.
_PACK_BELOW = 0.9


@torch.no_grad()
def masked_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sparse layer's weight as its forward uses it (zeros where masked).

    The keys are those of the dense model (sparse layers keep them), so it loads into the vanilla model.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if is_sparse_layer(m):
            sd[f"{name}.weight" if name else "weight"] = effective_weight(m).clone()
    return sd


def save_compressed(state_dict: dict[str, Tensor], path: str | os.PathLike) -> dict[str, int]:
    """Write ``state_dict`` with its sparse tensors packed; returns ``{"bytes": on-disk size, "dense_bytes": ...}``.

    The file is a ``torch.save`` of plain containers and tensors (loadable with ``weights_only=True``).
    """
    entries: dict[str, Any] = {}
    dense_bytes = 0
    for key, t in state_dict.items():
        dense_bytes += t.numel() * t.element_size()
        if t.is_floating_point() and t.numel() >= 64 and float((t != 0).float().mean()) <= _PACK_BELOW:
            meta, tensors = packing.pack(t.detach().cpu())
            entries[key] = {"kind": meta.kind, "shape": list(meta.shape), "dtype": str(meta.dtype).split(".")[-1],
                            "perm": list(meta.perm or ()), "numel": meta.numel, "tensors": list(tensors)}
        else:
            entries[key] = {"kind": "dense", "tensor": t.detach().cpu()}
    path = Path(path)
    torch.save({"format": FORMAT, "entries": entries}, path)
    return {"bytes": path.stat().st_size, "dense_bytes": dense_bytes}


def load_compressed(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The ``state_dict`` :func:`save_compressed` wrote (exactly the same tensors)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparsetrain compressed state_dict (expected format {FORMAT!r}); "
                         "write one with sparsetrain.export.save_compressed or `sparsetrain export`")
    out: dict[str, Tensor] = {}
    for key, e in blob["entries"].items():
        if e["kind"] == "dense":
            out[key] = e["tensor"]
            continue
        meta = packing.Packed(e["kind"], tuple(e["shape"]), getattr(torch, e["dtype"]), tuple(e["perm"]),
                              int(e["numel"]))
        out[key] = packing.unpack(meta, tuple(e["tensors"])).contiguous()
    return out


def export_sparse(model: nn.Module, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``model``'s state_dict with the forward's masks applied (loads into the vanilla model).

    With ``path``, also writes it compressed (:func:`save_compressed`) and returns
    ``{"state_dict": ..., "bytes": ..., "dense_bytes": ...}``; without, ``{"state_dict": ...}``.
    """
    sd = masked_state_dict(model)
    return {"state_dict": sd, **(save_compressed(sd, path) if path is not None else {})}
