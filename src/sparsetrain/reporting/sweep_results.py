"""The results of ``sparsetrain sweep``: one row per parameter point, as a Markdown table, a CSV file and a plot.

A row (built by :func:`sparsetrain.commands.sweep.summarize_points`) holds the point's swept values and
``n_seeds``, ``test_acc_mean``, ``test_acc_sd``, ``weight_density_mean``, ``training_flops_reduction_pct_mean``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from sparsetrain.formatting import is_number
from sparsetrain.reporting.plots import require_matplotlib
from sparsetrain.reporting.tables import format_mean_sd

__all__ = ["table_markdown", "table_csv", "plot_accuracy"]


def table_markdown(rows: list[dict[str, Any]], keys: list[str], title: str) -> str:
    """The table as Markdown: accuracy in percent, mean ± sample SD over seeds."""
    head = [*keys, "seeds", "test accuracy (%)", "weight density", "training FLOPs reduction (%)"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [
            str(r["n_seeds"]), format_mean_sd(r["test_acc_mean"], r["test_acc_sd"], scale=100.0),
            "—" if r["weight_density_mean"] is None else f"{r['weight_density_mean']:.3f}",
            "—" if r["training_flops_reduction_pct_mean"] is None else f"{r['training_flops_reduction_pct_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy: final test accuracy, mean ± sample standard deviation over seeds; density and FLOPs "
              "reduction: mean over seeds (measured on the last epoch)."]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The table as CSV (fractions, not percent; empty cells for missing values)."""
    cols = [*keys, "n_seeds", "test_acc_mean", "test_acc_sd", "weight_density_mean",
            "training_flops_reduction_pct_mean"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r[c] is None else r[c] for c in cols])
    return buf.getvalue()


def plot_accuracy(rows: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> Path | None:
    """Accuracy (mean ± SD) against the first swept key, one line per combination of the others; None without data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [r for r in rows if r["test_acc_mean"] is not None]
    if not rows:
        return None
    x_key, rest = keys[0], keys[1:]
    xs_all = [r[x_key] for r in rows]
    numeric = all(is_number(v) for v in xs_all)
    categories = list(dict.fromkeys(map(str, xs_all)))
    fig = require_matplotlib()(figsize=(6.0, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in rest), []).append(r)
    for label, grp in groups.items():
        xs = [r[x_key] if numeric else categories.index(str(r[x_key])) for r in grp]
        ys = [100 * r["test_acc_mean"] for r in grp]
        err = [100 * (r["test_acc_sd"] or 0.0) for r in grp]
        name = ", ".join(f"{k}={v}" for k, v in zip(rest, label)) or None
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    if numeric:
        positive = [v for v in xs_all if v > 0]
        if len(positive) == len(xs_all) and max(positive) / min(positive) >= 100:
            ax.set_xscale("log")  # e.g. threshold_period 1..1000
    else:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x_key)
    ax.set_ylabel("test accuracy (%), mean ± SD over seeds")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if rest:
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path
