"""Numbers for the report tables: value formatting, mean ± sample SD, and grouping of runs across seeds.

Example:
    >>> [round(v, 6) for v in mean_sd([0.90, 0.92, 0.94])]
    [0.92, 0.02]
    >>> format_mean_sd(0.92, 0.02, scale=100)
    '92.00 ± 2.00'
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sparsetrain.formatting import finite_float as _num
from sparsetrain.formatting import format_pct
from sparsetrain.reporting.runfiles import FLOPS_KEYS, RunFiles, recipe_label

__all__ = [
    "format_value",
    "format_pct",
    "mean_sd",
    "format_mean_sd",
    "flatten",
    "GroupRow",
    "group_runs",
    "BASELINE_METHODS",
]

# Recipes whose group serves as the baseline ("BA") for the accuracy change ("AC") column, as in the papers' tables.
BASELINE_METHODS = ("dense",)
# Config keys expected to differ between seeds of one group; any other difference is reported.
_PER_RUN_KEYS = {"seed", "out", "out_dir", "run_dir", "output_dir", "data_dir", "name", "run_name", "device", "resume"}


def format_value(value: Any) -> str:
    """Format a scalar for a table cell: integral values and values >= 1000 as integers with thousands separators,
    else 1-2 decimals (4 significant digits below 1).

    Example:
        >>> [format_value(v) for v in (1234567, 4800.0, 89.7312, 0.012345, None, True)]
        ['1,234,567', '4,800', '89.73', '0.01235', '—', 'yes']
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer():  # e.g. a MAC count that went through a float density product
            return f"{int(value):,}"
        if abs(value) >= 1000:  # e.g. sparse MACs = density x dense MACs: the fraction is noise
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        if value == 0:
            return "0"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and *sample* standard deviation (n - 1); the SD is None for a single value.

    Raises:
        ValueError: ``values`` is empty.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd needs at least one value")
    mean = statistics.fmean(vals)
    return mean, (statistics.stdev(vals) if len(vals) > 1 else None)


def format_mean_sd(mean: float | None, sd: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± sd"`` scaled (e.g. by 100 for percent); just ``"mean"`` when ``sd`` is None."""
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text if sd is None else f"{text} ± {sd * scale:.{digits}f}"


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys (lists and scalars are leaves).

    Example:
        >>> flatten({"a": 1, "b": {"c": 2}})
        {'a': 1, 'b.c': 2}
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


@dataclass
class GroupRow:
    """Runs sharing (model, dataset, recipe, density), aggregated over seeds.

    Accuracies and densities are fractions in [0, 1]; the FLOP figures are as in the run's summary (percent, ×).
    ``acc_sd`` is the sample SD (None for a single run). ``baseline_acc`` is the mean accuracy of the dense group of
    the same model and dataset, when one was given.
    """

    model: str
    dataset: str
    method: str
    density: float | None
    runs: list[RunFiles]
    acc_mean: float | None
    acc_sd: float | None
    acc_n: int
    weight_density: float | None
    activation_density: float | None
    flops: dict[str, float | None]
    baseline_acc: float | None = None
    differing_config: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of runs in the group."""
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        """Seeds of the runs, in input order."""
        return [r.summary.get("seed", r.config.get("seed")) for r in self.runs]

    @property
    def acc_change(self) -> float | None:
        """Mean accuracy minus the baseline's (fraction), or None."""
        if self.acc_mean is None or self.baseline_acc is None:
            return None
        return self.acc_mean - self.baseline_acc


def _group_key(run: RunFiles) -> tuple[str, str, str, float | None]:
    s, c = run.summary, run.config
    model = str(s.get("model") or c.get("model") or "?")
    dataset = str(s.get("dataset") or c.get("dataset") or "?")
    method = recipe_label(s.get("recipe", c.get("recipe")))
    density = _num(s.get("density"))
    # Rounded so that 0.1 written as 0.1 and as 0.09999999 land in one group.
    return model, dataset, method, (None if density is None else round(density, 6))


def _differing_config(runs: list[RunFiles]) -> list[str]:
    if len(runs) < 2:
        return []
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    return [
        k
        for k in keys
        if k.split(".")[0] not in _PER_RUN_KEYS
        and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
    ]


def group_runs(runs: Sequence[RunFiles]) -> list[GroupRow]:
    """Group runs by (model, dataset, recipe, density) and aggregate each group over its seeds.

    Order: (model, dataset) pairs in order of first appearance; within a pair, the dense baseline first, then
    methods in order of first appearance, higher density first.

    Args:
        runs: parsed run directories.

    Returns:
        One :class:`GroupRow` per group.
    """
    groups: dict[tuple, list[RunFiles]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)

    pair_order = list(dict.fromkeys(k[:2] for k in groups))
    method_order = list(dict.fromkeys(k[2] for k in groups))

    def sort_key(key: tuple) -> tuple:
        model, dataset, method, density = key
        return (
            pair_order.index((model, dataset)),
            method not in BASELINE_METHODS,
            method_order.index(method),
            -(density if density is not None else 2.0),
        )

    rows = []
    for key in sorted(groups, key=sort_key):
        members = groups[key]
        accs = [a for a in (_num(r.summary.get("final_test_acc")) for r in members) if a is not None]
        acc_mean, acc_sd = mean_sd(accs) if accs else (None, None)
        flops = {k: _mean([r.flops_summary()[k] for r in members]) for k in FLOPS_KEYS}
        rows.append(
            GroupRow(
                model=key[0],
                dataset=key[1],
                method=key[2],
                density=key[3],
                runs=members,
                acc_mean=acc_mean,
                acc_sd=acc_sd,
                acc_n=len(accs),
                weight_density=_mean([_num(r.last_metrics.get("weight_density")) for r in members]),
                activation_density=_mean([_num(r.last_metrics.get("activation_density")) for r in members]),
                flops=flops,
                differing_config=_differing_config(members),
            )
        )
    baselines = {(r.model, r.dataset): r.acc_mean for r in rows if r.method in BASELINE_METHODS}
    for row in rows:
        row.baseline_acc = baselines.get((row.model, row.dataset))
    return rows
