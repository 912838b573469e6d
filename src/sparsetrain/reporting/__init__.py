"""Markdown/HTML reports of training runs: ``sparsetrain report RUN_DIR [RUN_DIR ...]``.

One run gives a report with training curves, per-layer densities, per-layer gradient sparsity over training
(telemetry), FLOP/memory tables and the run's config and summary. Several runs give a comparison table grouped by
(model, dataset, recipe, density) with mean ± SD over seeds, as the SWAT paper prints it.

Example:
    >>> from sparsetrain.reporting import write_report
    >>> write_report(["runs/a", "runs/b", "runs/c"], out_dir="cmp").markdown.parent  # doctest: +SKIP
    PosixPath('cmp')
"""

from sparsetrain.reporting.build import ReportResult, build_run_document, write_report
from sparsetrain.reporting.comparison import build_comparison_document
from sparsetrain.reporting.document import Document, to_html, to_markdown
from sparsetrain.reporting.plots import MATPLOTLIB_HINT, require_matplotlib
from sparsetrain.reporting.runfiles import RunDirectoryError, RunFiles, TelemetrySeries, read_run, recipe_label
from sparsetrain.reporting.tables import GroupRow, format_mean_sd, group_runs, mean_sd

__all__ = [
    "write_report",
    "ReportResult",
    "build_run_document",
    "build_comparison_document",
    "Document",
    "to_markdown",
    "to_html",
    "MATPLOTLIB_HINT",
    "require_matplotlib",
    "RunDirectoryError",
    "RunFiles",
    "TelemetrySeries",
    "read_run",
    "recipe_label",
    "GroupRow",
    "group_runs",
    "mean_sd",
    "format_mean_sd",
]
