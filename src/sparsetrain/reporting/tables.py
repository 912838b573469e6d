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
from sparsetrain.reporting.runfiles import RunFiles, recipe_label
from sparsetrain.runs import RECORD_KEYS, SUMMARY_FLOPS_KEYS

__all__ = [
    "format_value",
    "format_pct",
    "mean_sd",
    "format_mean_sd",
    "gap_interval",
    "format_gap",
    "interval_verdict",
    "flatten",
    "AGGREGATION_RULE",
    "GroupRow",
    "experiment_config",
    "group_runs",
    "BASELINE_METHODS",
]

# Recipes whose group serves as the baseline ("BA") for the accuracy change ("AC") column, as in the papers' tables.
BASELINE_METHODS = ("dense",)


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


# Two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (standard tables); beyond 30 the normal
# quantile is within 2 % of the exact value. Kept as a table so the report needs no SciPy.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def gap_interval(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float | None]:
    """Difference of means ``mean(values) - mean(baseline)`` and the half-width of its 95 % interval.

    The interval is the two-sample Student-t one with the *pooled* sample SD (equal variances assumed, as seeds of one
    protocol are): ``t(0.975, n1 + n2 - 2) * s_p * sqrt(1/n1 + 1/n2)``. The half-width is None when there are no degrees
    of freedom (one run on each side): a single pair of runs supports no interval.

    Raises:
        ValueError: either side is empty.

    Example:
        >>> d, h = gap_interval([0.90, 0.92], [0.93, 0.95])
        >>> round(d, 4), round(h, 4)
        (-0.03, 0.0609)
    """
    a, b = [float(v) for v in values], [float(v) for v in baseline]
    if not a or not b:
        raise ValueError("gap_interval needs at least one value on each side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    df = len(a) + len(b) - 2
    if df < 1:
        return diff, None
    ss = sum((v - statistics.fmean(a)) ** 2 for v in a) + sum((v - statistics.fmean(b)) ** 2 for v in b)
    pooled = math.sqrt(ss / df)
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return diff, t * pooled * math.sqrt(1 / len(a) + 1 / len(b))


def format_gap(diff: float | None, half: float | None, scale: float = 100.0, digits: int = 2) -> str:
    """``"-1.23 [-3.10, +0.64]"``: a gap and its 95 % interval (scaled, e.g. to percentage points)."""
    if diff is None:
        return "—"
    text = f"{diff * scale:+.{digits}f}"
    if half is None:
        return text + " (no interval: 1 run each)"
    return f"{text} [{(diff - half) * scale:+.{digits}f}, {(diff + half) * scale:+.{digits}f}]"


def interval_verdict(diff: float, half: float | None, published: float | None = None) -> str:
    """What an interval supports, in the words the results page may use (see docs/results.md, 'Statistics').

    ``"consistent with no gap"`` when it contains 0, ``"below dense"`` / ``"above dense"`` when it excludes 0;
    with a ``published`` gap, ``"; contains the paper's gap"`` or ``"; excludes the paper's gap"``.
    """
    if half is None:
        return "no interval (1 run each)"
    lo, hi = diff - half, diff + half
    text = "consistent with no gap" if lo <= 0 <= hi else ("below dense" if hi < 0 else "above dense")
    if published is not None:
        text += "; contains the paper's gap" if lo <= published <= hi else "; excludes the paper's gap"
    return text


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


#: The aggregation rule of the comparison report, stated once (the report prints it at the top).
AGGREGATION_RULE = (
    "Runs are grouped by their whole config except the seed (and the keys that only record where and how a run was "
    "written: {record}); runs that differ in anything else are separate rows, and a Config column names the "
    "settings beyond method and density that vary between the rows of a table. Each row aggregates its runs, one per "
    "seed: "
    "Top-1 is the final test accuracy, mean ± sample standard deviation (n − 1) over the n runs (no ± for a single "
    "run); the densities, FLOP and memory figures are means over the row."
)
#: Config keys the results table shows in its own columns (table heading, Method, Density).
_COLUMN_KEYS = ("model", "dataset", "recipe", "recipe_overrides.density", "recipe_overrides.sparsity")


@dataclass
class GroupRow:
    """Runs of one experiment (the same config except the seed and :data:`~sparsetrain.runs.RECORD_KEYS`),
    aggregated over seeds.

    Accuracies and densities are fractions in [0, 1]; the FLOP figures are as in the run's summary (percent, ×).
    ``acc_sd`` is the sample SD (None for a single run). ``baseline_acc`` is the mean accuracy of the dense group of
    the same model and dataset, when one was given. ``config`` is the experiment's config (flattened, dotted keys;
    the recipe kept whole); ``differs`` the settings that tell this row apart from the other rows of its (model,
    dataset) table beyond its method and density (empty when those columns suffice).
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
    config: dict[str, Any] = field(default_factory=dict)
    differs: dict[str, Any] = field(default_factory=dict)

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

    @property
    def config_label(self) -> str:
        """``key=value, ...`` of :attr:`differs` (empty when nothing beyond method and density differs)."""
        return ", ".join(f"{k}={_label_value(v)}" for k, v in self.differs.items())


_ABSENT = object()  # a key one run's config lacks (e.g. written by an older version)


def _label_value(value: Any) -> str:
    if isinstance(value, dict):  # a recipe given inline
        return recipe_label(value)
    return "—" if value is _ABSENT else format_value(value)


def _normalised(value: Any) -> Any:
    """A config value for comparison: floats to 6 significant digits (0.1 and 0.09999999 are one setting)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return value


def experiment_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's config that defines its experiment: everything but the seed and the record keys,
    flattened to dotted keys (``recipe_overrides.density``), a recipe given inline kept whole.

    Example:
        >>> experiment_config({"seed": 3, "out": "runs/a", "lr": 0.1, "recipe_overrides": {"density": 0.1}})
        {'lr': 0.1, 'recipe_overrides.density': 0.1}
    """
    kept = {k: v for k, v in config.items() if k != "seed" and k not in RECORD_KEYS}
    recipe = kept.pop("recipe", _ABSENT)
    out = {k: _normalised(v) for k, v in flatten(kept).items() if v != {}}  # no overrides = none given
    if recipe is not _ABSENT:
        out["recipe"] = _normalised(recipe)
    return dict(sorted(out.items()))


def _key_text(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _method(run: RunFiles) -> str:
    # The config's recipe first: the summary's is the preset only, the same for every recipe file built on it.
    return recipe_label(run.config.get("recipe", run.summary.get("recipe")))


def _model_dataset(run: RunFiles) -> tuple[str, str]:
    s, c = run.summary, run.config
    return str(s.get("model") or c.get("model") or "?"), str(s.get("dataset") or c.get("dataset") or "?")


def _density(run: RunFiles) -> float | None:
    density = _num(run.summary.get("density"))
    return None if density is None else round(density, 6)


def _what_differs(rows: list[GroupRow]) -> None:
    """Fill each row's ``differs``: the config keys that vary across the rows of one (model, dataset) table, except
    those its Method and Density columns already show -- unless rows would otherwise look the same."""
    if len(rows) < 2:
        return
    keys = sorted(set().union(*(r.config for r in rows)))

    def cell(r: GroupRow, k: str) -> str | None:
        return _key_text({"v": r.config[k]}) if k in r.config else None

    varying = [k for k in keys if len({cell(r, k) for r in rows}) > 1]
    shown = [k for k in varying if k not in _COLUMN_KEYS]
    visible = {(r.method, r.density, *(cell(r, k) for k in shown)) for r in rows}
    if len(visible) < len(rows):  # rows the columns do not tell apart, e.g. one gives density, the other sparsity
        shown = [k for k in varying if k not in ("model", "dataset")]
    for r in rows:
        r.differs = {k: r.config.get(k, _ABSENT) for k in shown}


def group_runs(runs: Sequence[RunFiles]) -> list[GroupRow]:
    """Group runs by their whole config except the seed and the record keys; aggregate each group over its seeds.

    Runs that differ in any other setting (optimizer, amp, learning rate, a recipe key, the number of epochs, ...)
    are separate groups; :attr:`GroupRow.differs` names what tells a group apart from the others of its (model,
    dataset). Order: (model, dataset) pairs in order of first appearance; within a pair, the dense baseline first,
    then methods in order of first appearance, higher density first, then groups in order of first appearance.

    Args:
        runs: parsed run directories.

    Returns:
        One :class:`GroupRow` per group.
    """
    groups: dict[str, list[RunFiles]] = {}
    for run in runs:
        groups.setdefault(_key_text(experiment_config(run.config)), []).append(run)

    heads = {key: members[0] for key, members in groups.items()}
    pair_order = list(dict.fromkeys(_model_dataset(r) for r in heads.values()))
    method_order = list(dict.fromkeys(_method(r) for r in heads.values()))
    first_seen = {key: i for i, key in enumerate(groups)}

    def sort_key(key: str) -> tuple:
        head = heads[key]
        density = _density(head)
        return (
            pair_order.index(_model_dataset(head)),
            _method(head) not in BASELINE_METHODS,
            method_order.index(_method(head)),
            -(density if density is not None else 2.0),
            first_seen[key],
        )

    rows = []
    for key in sorted(groups, key=sort_key):
        members = groups[key]
        head = members[0]
        accs = [a for a in (_num(r.summary.get("final_test_acc")) for r in members) if a is not None]
        acc_mean, acc_sd = mean_sd(accs) if accs else (None, None)
        flops = {k: _mean([r.flops_summary()[k] for r in members]) for k in SUMMARY_FLOPS_KEYS}
        model, dataset = _model_dataset(head)
        rows.append(
            GroupRow(
                model=model,
                dataset=dataset,
                method=_method(head),
                density=_density(head),
                runs=members,
                acc_mean=acc_mean,
                acc_sd=acc_sd,
                acc_n=len(accs),
                weight_density=_mean([_num(r.last_metrics.get("weight_density")) for r in members]),
                activation_density=_mean([_num(r.last_metrics.get("activation_density")) for r in members]),
                flops=flops,
                config=experiment_config(head.config),
            )
        )
    for pair in pair_order:
        _what_differs([r for r in rows if (r.model, r.dataset) == pair])
    baselines: dict[tuple[str, str], float | None] = {}
    for r in rows:  # the first dense group of a pair is its baseline
        if r.method in BASELINE_METHODS:
            baselines.setdefault((r.model, r.dataset), r.acc_mean)
    for row in rows:
        row.baseline_acc = baselines.get((row.model, row.dataset))
    return rows
