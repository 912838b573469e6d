"""The pieces every paper's results tables share: the table types, per-point statistics and gaps, plot helpers.

:mod:`sparsetrain.reporting.paper_results` lays each paper's tables out with them; :mod:`sparsetrain.reporting.results`
renders and writes a results record.
"""

from __future__ import annotations

import csv
import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsetrain.formatting import format_pct
from sparsetrain.reporting.tables import format_gap, gap_interval, interval_verdict, mean_sd


@dataclass
class Table:
    """One table: a title, column names, rows of cells (already formatted) and a note printed under it."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue()


@dataclass
class Rendered:
    """Every table of a results record, and the plot functions (``file name -> draw(path)``)."""

    tables: list[Table]
    plots: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    header: str = ""

    def markdown(self) -> str:
        return self.header + "\n".join(t.markdown() for t in self.tables)



# ---------------------------------------------------------------------------------------------- numbers
def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return mean_sd(vals) if vals else (None, None)


def point_stats(point: dict[str, Any]) -> dict[str, Any]:
    """Aggregate one point's runs: accuracy mean/SD over seeds, means of densities and FLOP figures, total time."""
    runs = point["runs"]
    acc, sd = _mean_sd([r["final_test_acc"] for r in runs])

    def mean(get: Callable[[dict[str, Any]], Any]) -> float | None:
        vals = []
        for r in runs:
            try:
                v = get(r)
            except (KeyError, TypeError):
                continue
            if isinstance(v, (int, float)) and math.isfinite(v):
                vals.append(float(v))
        return sum(vals) / len(vals) if vals else None

    out = {"n": len(runs), "acc": acc, "sd": sd,
           "weight_density": mean(lambda r: r["weight_density"]),
           "activation_density": mean(lambda r: r["activation_density"]),
           "time_s": sum(r.get("train_time_s") or 0.0 for r in runs),
           "params": mean(lambda r: r["sparse_totals"]["params_excl_classifier"]),
           "forward_macs": mean(lambda r: r["sparse_totals"]["forward_macs"])}
    for key in ("training_flops_reduction_pct", "inference_flops_reduction_pct", "act_memory_reduction_pct",
                "model_compression_x", "training_flops_reduction_pct_all_ops",
                "inference_flops_reduction_pct_all_ops"):
        out[key] = mean(lambda r, k=key: r["flops"][k])
    return out


_pct = functools.partial(format_pct, digits=1, fraction=False)  # the figures here are percentages already


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _protocol_line(rec: dict[str, Any]) -> str:
    p = rec["protocol"]
    keys = ("model", "dataset", "train_subset", "test_subset", "epochs", "batch_size", "optimizer", "lr", "momentum",
            "weight_decay", "schedule", "augment", "channels_last")
    parts = [f"{k} {p[k]}" for k in keys if k in p]
    total = sum(point_stats(pt)["time_s"] for pt in rec["points"])
    runs = sum(len(pt["runs"]) for pt in rec["points"])
    kind = "quick smoke protocol" if rec.get("quick") else "CPU-scale protocol"
    return (f"{kind}: {', '.join(parts)}; {runs} runs, {total / 60:.1f} min of training in total (one torch thread "
            f"each; sum of the runs' per-epoch training times, evaluation excluded). Command: `{rec['command']}`.")


def _published_tables(rec: dict[str, Any]) -> list[Table]:
    tables = []
    for i, t in enumerate(rec.get("published", {}).get("tables", [])):
        rows = [["" if c is None else str(c) for c in row] for row in t.get("rows", [])]
        tables.append(Table(f"published_{i + 1}", f"Published: {t.get('caption', '')}", [str(c) for c in t["columns"]],
                            rows, t.get("note", "")))
    return tables


def _baseline(rec: dict[str, Any], group: str) -> dict[str, Any] | None:
    for pt in rec["points"]:
        if pt.get("group", "") == group and pt["config"].get("recipe") == "dense" and pt.get("width") is None \
                and not pt["config"].get("width_mult"):
            return pt
    return None


def _accs(pt: dict[str, Any] | None) -> list[float]:
    """The finite final test accuracies of a point's runs (fractions), one per seed."""
    if pt is None:
        return []
    return [float(r["final_test_acc"]) for r in pt["runs"]
            if isinstance(r.get("final_test_acc"), (int, float)) and math.isfinite(r["final_test_acc"])]


def _gap(pt: dict[str, Any] | None, ref: dict[str, Any] | None) -> tuple[float, float | None] | None:
    """Mean accuracy of ``pt`` minus that of ``ref`` and the half-width of its 95 % interval (pooled-SD two-sample t,
    :func:`~sparsetrain.reporting.tables.gap_interval`), or None when either side has no run."""
    a, b = _accs(pt), _accs(ref)
    return gap_interval(a, b) if a and b else None


def _gap_text(gap: tuple[float, float | None] | None) -> str:
    return "—" if gap is None else format_gap(*gap)


def _paper_gap_text(pt: dict[str, Any]) -> str:
    """The paper's published gap(s) of the setting a point stands for (``paper_gap`` in the experiment file)."""
    return "; ".join(f"{v:+.2f} ({k})" for k, v in (pt.get("paper_gap") or {}).items()) or "—"


def _verdict(gap: tuple[float, float | None] | None, pt: dict[str, Any] | None = None) -> str:
    """What the interval of ``gap`` supports (:func:`~sparsetrain.reporting.tables.interval_verdict`), and whether
    it contains the paper's gap(s) of ``pt``."""
    if gap is None:
        return "—"
    d, h = gap
    published = {k: v / 100 for k, v in ((pt or {}).get("paper_gap") or {}).items()}
    if h is None or len(published) <= 1:
        return interval_verdict(d, h, next(iter(published.values()), None))
    inside = [k for k, v in published.items() if d - h <= v <= d + h]
    text = interval_verdict(d, h)
    if len(inside) == len(published):
        return text + "; contains each of the paper's gaps"
    if not inside:
        return text + "; excludes each of the paper's gaps"
    return text + f"; contains the paper's gap for {', '.join(inside)} only"


def _diff_verdict(gap: tuple[float, float | None] | None) -> str:
    """What the interval of a difference between two sparse settings supports (no dense baseline involved)."""
    if gap is None:
        return "—"
    d, h = gap
    if h is None:
        return "no interval (1 run each)"
    return "no difference resolved" if d - h <= 0 <= d + h else ("lower" if d + h < 0 else "higher")


def _statistics_line(rec: dict[str, Any]) -> str:
    ns = sorted({len(_accs(pt)) for pt in rec["points"]})
    seeds = " or ".join(str(n) for n in ns) or "0"
    return (f"Gaps: mean accuracy difference in percentage points with its 95 % interval (two-sample Student t on the "
            f"pooled SD, df = n1 + n2 - 2; seeds per point here: {seeds}). 'consistent with no gap': the interval "
            "contains 0; 'below/above dense': it excludes 0; the paper's gap is 'contained' when it lies inside the "
            "interval. With one run on a side there is no interval and nothing is concluded.")




# ---------------------------------------------------------------------------------------------- plotting
def _require_figure(figsize: tuple[float, float] = (6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from sparsetrain.reporting.plots import require_matplotlib

    fig = require_matplotlib()(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure():
    fig = _require_figure()
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path) -> None:
    ax.grid(True, alpha=0.3)
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No metadata: a regenerated plot of the same numbers is byte-identical (no date stamp to commit).
    fig.savefig(path, format="png", facecolor="white", metadata={"Software": None})


