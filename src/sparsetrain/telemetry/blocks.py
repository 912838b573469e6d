"""Blocks: groups of layers named by a module-name prefix, and their sparsity (TensorQuant, eq. 5).

A *block* is a dotted name prefix such as ``layer1`` or ``layer1.0``; its members are the monitored layers whose
name equals the prefix or starts with ``prefix + "."`` (``layer1`` does not contain ``layer10.conv``).

Aggregation rules (Loroch et al. 2018, §2.1, METHODS.md §3):

* weights and every gradient tensor (``weight``, ``grad_output``, ``grad_input``, ``grad_weight``) are
  element-weighted: ``s_b = sum_l zeros_l / sum_l numel_l`` over the member layers (eq. 5 with
  ``|W_l| s_l = zeros_l``);
* activations (``input``, ``output``): by default (TensorQuant's definition, "the block's last activation") the
  tensors the block *module* receives and returns, counted by the :class:`~sparsetrain.telemetry.Monitor` at the
  block's boundary (a ResNet block's output is after its last ReLU and the residual add). With
  ``Monitor(block_activations="last_layer")``, those of the block's **last** layer instead: the last member in
  module registration order (``model.named_modules()`` order, which is the order the layers are defined in
  ``__init__``, normally also the order they run in) that has a value for that tensor (:func:`aggregate` with
  ``last_layer=True``). A conv's own output is before the ReLU that follows it, so this reads less sparse.

The model total (:data:`TOTAL`) sums over all layers for every tensor, activations included: the "last activation"
of a whole classifier would be its logits, which say nothing about activation sparsity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "TOTAL",
    "ELEMENT_WEIGHTED",
    "Count",
    "auto_blocks",
    "block_members",
    "resolve_blocks",
    "aggregate",
]

#: Name of the whole-model aggregate; parentheses cannot clash with a module-name prefix in practice.
TOTAL = "(total)"
#: Tensors aggregated element-weighted over a block's layers; the others (``input``, ``output``) take the value of
#: the block's last layer.
ELEMENT_WEIGHTED = ("weight", "grad_output", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Count:
    """Zero counts of one tensor: ``numel`` elements, ``zeros`` exact zeros, ``near_zeros`` with ``|v| <= threshold``.

    ``near_zeros`` and ``threshold`` are ``None`` when no near-zero threshold applies.
    """

    numel: int
    zeros: int
    near_zeros: int | None = None
    threshold: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros (0.0 for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def near_zero_sparsity(self) -> float | None:
        """Fraction of values with ``|v| <= threshold``, or ``None`` without a threshold."""
        if self.near_zeros is None:
            return None
        return self.near_zeros / self.numel if self.numel else 0.0


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def block_members(prefix: str, layer_names: Iterable[str]) -> list[str]:
    """The layers of ``layer_names`` inside block ``prefix`` (same order).

    Example:
        >>> block_members("layer1", ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer10.conv"])
        ['layer1.0.conv1', 'layer1.1.conv1']
    """
    if prefix == TOTAL:
        return list(layer_names)
    return [n for n in layer_names if n == prefix or n.startswith(prefix + ".")]


def auto_blocks(layer_names: Sequence[str]) -> list[str]:
    """Every proper dotted prefix of the layer names that contains at least two layers.

    Prefixes are returned in order of first appearance, a parent before its children.

    Example:
        >>> auto_blocks(["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "fc"])
        ['layer1', 'layer1.0']
    """
    seen: dict[str, int] = {}
    for name in layer_names:
        for p in _prefixes(name):
            seen[p] = seen.get(p, 0) + 1
    return [p for p, n in seen.items() if n >= 2]


def resolve_blocks(blocks: str | Sequence[str] | None, layer_names: Sequence[str]) -> list[str]:
    """Turn the ``blocks`` argument of :class:`~sparsetrain.telemetry.Monitor` into a list of prefixes.

    Args:
        blocks: ``"auto"`` (see :func:`auto_blocks`), ``None`` (no blocks) or an explicit list of prefixes.
        layer_names: the monitored layers.

    Raises:
        ValueError: for an unknown string, or a prefix that matches no monitored layer.
    """
    if blocks is None:
        return []
    if isinstance(blocks, str):
        if blocks == "auto":
            return auto_blocks(layer_names)
        raise ValueError(f"blocks must be 'auto', None or a list of name prefixes, got {blocks!r}")
    out = []
    for prefix in blocks:
        if not block_members(prefix, layer_names):
            raise ValueError(
                f"block prefix {prefix!r} matches no monitored layer; layers are: {', '.join(layer_names)}"
            )
        if prefix not in out:
            out.append(prefix)
    return out


def aggregate(counts: Mapping[str, Count], members: Sequence[str], last_layer: bool) -> Count | None:
    """Aggregate one tensor's counts over a block's ``members`` (in registration order).

    Args:
        counts: layer name -> :class:`Count` of this tensor (layers without a value are skipped).
        members: the block's layers, in registration order.
        last_layer: take the last member that has a value instead of the element-weighted sum.

    Returns:
        The block's :class:`Count`, or ``None`` if no member has a value. The block's threshold is the members'
        common threshold, ``None`` if they differ. Members without a threshold contribute their exact zeros to the
        near-zero count (a threshold of 0).
    """
    present = [counts[m] for m in members if m in counts]
    if not present:
        return None
    if last_layer:
        return present[-1]
    numel = sum(c.numel for c in present)
    zeros = sum(c.zeros for c in present)
    if all(c.near_zeros is None for c in present):
        near = None
    else:
        # A layer without a threshold counts its exact zeros: |v| <= 0 is the same as v == 0.
        near = sum(c.zeros if c.near_zeros is None else c.near_zeros for c in present)
    thresholds = {c.threshold for c in present}
    thr = thresholds.pop() if len(thresholds) == 1 else None
    return Count(numel=numel, zeros=zeros, near_zeros=near, threshold=thr if near is not None else None)
