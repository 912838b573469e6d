"""What the model's dataflow says about its layers, from a ``torch.fx`` trace (with a fallback when tracing fails).

Two decisions need to know what consumes a tensor, not just which modules exist:

* which ``nn.ReLU`` outputs are kept alive only by the ReLU itself once the layers after it are sparse (so a
  1-bit-mask ReLU frees them), and
* whether a conv feeds BatchNorm or a ReLU (where Ye et al.'s gradient pruning must act).

Tracing is symbolic (no data runs); a model fx cannot trace gets ``None`` and the caller falls back, with a
warning naming the reason.
"""

from __future__ import annotations

import logging
import operator
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["trace", "relus_saved_only_by_themselves", "consumers", "output_consumer_kinds", "gradient_prune_placements"]

log = logging.getLogger(__name__)

# Consumers that keep nothing of their input for backward (or only its shape): a ReLU output read only by these
# (and by sparse layers, which save their own packed copy) dies after the forward unless the ReLU saves it.
_FREE_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)
_FREE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.flatten, F.adaptive_avg_pool2d,
                   F.avg_pool2d, F.dropout, F.pad}
_FREE_METHODS = {"add", "add_", "view", "reshape", "flatten", "mean", "sum", "size", "contiguous"}
# Views share the tensor's storage: what consumes the view consumes the tensor.
_VIEWS_FUNCTIONS = {torch.flatten, operator.getitem}  # getitem: slicing, e.g. ResNet's option-A shortcut
_VIEWS_METHODS = {"view", "reshape", "flatten", "contiguous"}


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """A symbolic ``torch.fx`` trace of ``model``'s module calls, or None (logged) when it cannot be traced."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        log.warning("could not trace %s with torch.fx (%s: %s); falling back to module order",
                    type(model).__name__, type(e).__name__, str(e).splitlines()[0][:200])
        return None


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def consumers(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read ``node``'s tensor, looking through views (flatten/view/reshape)."""
    out: list[torch.fx.Node] = []
    for user in node.users:
        is_view = (user.op == "call_function" and user.target in _VIEWS_FUNCTIONS) or (
            user.op == "call_method" and user.target in _VIEWS_METHODS) or isinstance(
            _module(gm, user), nn.Flatten)
        out.extend(consumers(gm, user) if is_view else [user])
    return out


def _frees_input(gm: torch.fx.GraphModule, node: torch.fx.Node, sparse: set[str]) -> bool:
    if node.op == "call_module":
        return node.target in sparse or isinstance(_module(gm, node), _FREE_MODULES)
    if node.op == "call_function":
        return node.target in _FREE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FREE_METHODS
    return False  # the model's output, or anything unknown: assume it keeps the tensor


def relus_saved_only_by_themselves(model: nn.Module, sparse_layers: Iterable[str]) -> list[str] | None:
    """Names of the ``nn.ReLU`` modules whose output no other op saves for backward, once ``sparse_layers`` pack theirs.

    Returns None when the model cannot be traced (the caller decides the fallback).
    """
    gm = trace(model)
    if gm is None:
        return None
    sparse = set(sparse_layers)
    verdict: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if type(_module(gm, node)) is nn.ReLU:
            ok = all(_frees_input(gm, u, sparse) for u in consumers(gm, node))
            # A ReLU module called at several places is swapped only if every call site qualifies.
            verdict[str(node.target)] = verdict.get(str(node.target), True) and ok
    return [name for name, ok in verdict.items() if ok]


# What reads a layer's output, for Ye et al.'s placement rule.
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """``"batchnorm"``, ``"relu"`` or ``"other"`` for one consumer node."""
    mod = _module(gm, node)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
            node.op == "call_method" and node.target in _RELU_METHODS):
        return "relu"
    if node.op == "call_function" and node.target is F.batch_norm:
        return "batchnorm"
    return "other"


def output_consumer_kinds(gm: torch.fx.GraphModule, layers: Iterable[str]) -> dict[str, set[str]]:
    """Per module name in ``layers``, the kinds (``batchnorm``/``relu``/``other``) of the ops that read its output.

    Views (flatten/view/reshape/slicing) are looked through. A module called at several places collects the kinds of
    every call site; a module the trace never calls is absent.
    """
    wanted = set(layers)
    out: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            kinds = out.setdefault(str(node.target), set())
            kinds.update(_kind(gm, u) for u in consumers(gm, node)) if node.users else kinds.add("other")
    return out


def gradient_prune_placements(model: nn.Module, layers: Iterable[str]) -> dict[str, str] | None:
    """Where Ye et al. prune each layer's activation gradient, decided from the dataflow (METHODS.md §2).

    The pruned tensor must be the gradient that feeds both backward GEMMs of the *next* conv back:

    * output read only by BatchNorm (Conv-BN-ReLU): ``"grad_output"``, the conv's ``dy`` after BN's backward (pruning
      before BN would be undone by BN's backward, which mixes every element of a channel);
    * output read only by a ReLU (Conv-ReLU, no BN): ``"grad_input"``, the conv's ``dx``; the preceding ReLU (and any
      max-pool in between) keeps those zeros, so the previous conv receives a sparse ``dy``;
    * anything else (an add, a pool, several kinds of consumer, the model output): ``"grad_output"``, the conv's own
      ``dy``, which its two backward GEMMs do use.

    Returns:
        Layer name -> ``"grad_output"`` | ``"grad_input"`` for every name in ``layers`` (a layer the trace never calls
        gets ``"grad_output"``), or None when the model cannot be traced (:func:`trace` logs why).
    """
    names = list(layers)
    gm = trace(model)
    if gm is None:
        return None
    kinds = output_consumer_kinds(gm, names)
    return {n: "grad_input" if kinds.get(n) == {"relu"} else "grad_output" for n in names}
