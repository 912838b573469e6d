"""Per-layer density allocation: Erdős–Rényi-Kernel (RigL) and momentum shares (SWAT-M / SNFS); uniform needs none.

Pure functions over layer shapes / statistics; the handle applies their result to the layer specs.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["erk_densities", "momentum_densities"]


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """RigL's ERK allocation with the same total number of non-zeros as a uniform ``density``.

    ``raw_l = sum(shape_l) / prod(shape_l)`` over all kernel dims; ``eps`` scales them so that
    ``sum_l density_l * n_l == density * sum_l n_l``; a layer whose ``eps * raw_l`` exceeds 1 becomes dense and the
    solve repeats without it (its non-zeros then come out of the others' budget).

    Example:
        >>> d = erk_densities({"a": (16, 3, 3, 3), "b": (32, 16, 3, 3)}, 0.5)
        >>> round(sum(d[k] * n for k, n in (("a", 432), ("b", 4608))) / 5040, 6)
        0.5
    """
    n = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    budget = density * sum(n.values())
    dense: set[str] = set()
    while True:
        rest = [k for k in shapes if k not in dense]
        if not rest:
            break
        divisor = sum(raw[k] * n[k] for k in rest)
        eps = (budget - sum(n[k] for k in dense)) / divisor
        over = [k for k in rest if eps * raw[k] > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def momentum_densities(
    numel: Mapping[str, int],
    mean_abs_momentum: Mapping[str, float],
    density: float,
    max_density: float = 0.99,
) -> dict[str, float]:
    """SWAT-M: each layer's share of the global non-zero budget is proportional to its mean |momentum|.

    Shares are normalised to 1; a layer is capped at ``max_density`` and the excess is redistributed over the
    uncapped layers (in proportion to their shares) until nothing exceeds the cap. Every layer keeps at least one
    weight. A layer's non-zeros are ``share_l * budget`` whatever its size (SNFS's redistribution rule).
    """
    names = list(numel)
    budget = density * sum(numel.values())
    total_m = sum(max(0.0, mean_abs_momentum[k]) for k in names)
    if total_m <= 0 or not math.isfinite(total_m):
        return {k: float(density) for k in names}
    share = {k: max(0.0, mean_abs_momentum[k]) / total_m for k in names}
    dens: dict[str, float] = {}
    free = list(names)
    remaining = budget
    while free:
        s = sum(share[k] for k in free)
        if s <= 0:
            for k in free:
                dens[k] = remaining / sum(numel[j] for j in free)
            break
        capped = [k for k in free if share[k] / s * remaining > max_density * numel[k]]
        if not capped:
            for k in free:
                dens[k] = share[k] / s * remaining / numel[k]
            break
        for k in capped:
            dens[k] = max_density
            remaining -= max_density * numel[k]
            free.remove(k)
    return {k: min(max_density, max(dens[k], 1.0 / numel[k])) for k in names}
