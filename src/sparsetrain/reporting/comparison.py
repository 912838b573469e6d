"""The comparison report of several runs: one row per group of seeds, as the SWAT paper's tables print it.

Runs are grouped by their whole config except the seed and the record keys (:func:`~sparsetrain.reporting.tables.
group_runs`); :func:`build_comparison_document` builds the results tables, the overlaid test-accuracy plot and the
per-run table. :func:`~sparsetrain.reporting.build.write_report` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sparsetrain.formatting import format_pct, pct_cell
from sparsetrain.reporting.document import (
    Block,
    BulletList,
    Document,
    Heading,
    Image,
    Note,
    Paragraph,
    Table,
    generated_by,
)
from sparsetrain.reporting.plots import plot_accuracy_overlay
from sparsetrain.reporting.runfiles import RunFiles
from sparsetrain.reporting.tables import (
    AGGREGATION_RULE,
    GroupRow,
    format_mean_sd,
    format_value,
    group_runs,
)
from sparsetrain.runs import RECORD_KEYS, RunDir

__all__ = ["build_comparison_document"]

_OVERLAY_PNG = "test_accuracy.png"


def _group_label(row: GroupRow, with_pair: bool) -> str:
    label = row.method + (f" d={format_value(row.density)}" if row.density is not None else "")
    if row.differs:
        label += f" · {row.config_label}"
    return f"{row.model}/{row.dataset} {label}" if with_pair else label


def _results_table(rows: list[GroupRow]) -> Table:
    has_baseline = any(r.baseline_acc is not None for r in rows)
    has_config = any(r.differs for r in rows)
    headers = ["Method", "Density"] + (["Config"] if has_config else []) + [
        "W dens. (kept %)", "Act dens. (kept %)", "Top-1 ± SD (%)", "n"]
    if has_baseline:
        headers.append("BA / AC (%)")
    headers += ["Train FLOPs ↓ (%)", "Inf. FLOPs ↓ (%)", "Act ↓ (%)", "MC (×)", "Seeds"]
    body = []
    for r in rows:
        cells = [
            r.method,
            format_value(r.density),
            *([r.config_label] if has_config else []),
            format_pct(r.weight_density, 1),
            format_pct(r.activation_density, 1),
            format_mean_sd(r.acc_mean, r.acc_sd, scale=100.0),
            str(r.acc_n),
        ]
        if has_baseline:
            ac = r.acc_change
            cells.append("—" if ac is None else f"{100 * r.baseline_acc:.2f} / {100 * ac:+.2f}")
        f = r.flops
        cells += [
            "—" if f["training_flops_reduction_pct"] is None else f"{f['training_flops_reduction_pct']:.1f}",
            "—" if f["inference_flops_reduction_pct"] is None else f"{f['inference_flops_reduction_pct']:.1f}",
            "—" if f["act_memory_reduction_pct"] is None else f"{f['act_memory_reduction_pct']:.1f}",
            "—" if f["model_compression_x"] is None else f"{f['model_compression_x']:.1f}",
            ", ".join(format_value(s) for s in r.seeds),
        ]
        body.append(cells)
    align = ["l", "r"] + (["l"] if has_config else []) + ["r", "r", "r", "r"] + (["r"] if has_baseline else []) + [
        "r", "r", "r", "r", "l"]
    return Table(headers, body, align)


def build_comparison_document(
    runs: Sequence[RunFiles], out_dir: Path, title: str | None = None, plots: bool = True
) -> tuple[Document, list[Path]]:
    """Build the comparison report of several runs and draw its PNG into ``out_dir``.

    Runs are grouped by their whole config except the seed (:func:`~sparsetrain.reporting.tables.group_runs`; the
    rule is :data:`~sparsetrain.reporting.tables.AGGREGATION_RULE`, printed at the top); each group is one table
    row with the mean ± sample SD of the final test accuracy over its runs (seeds) and the mean of the other figures.

    Args:
        runs: parsed run directories.
        out_dir: folder for the PNG file.
        title: document title (default: ``"Comparison of N runs"``).
        plots: draw the overlaid test-accuracy PNG (needs matplotlib).

    Returns:
        The document and the PNG files written.
    """
    images: list[Path] = []
    rows = group_runs(runs)
    pairs = list(dict.fromkeys((r.model, r.dataset) for r in rows))
    blocks: list[Block] = [
        Paragraph(
            f"**{len(runs)} runs in {len(rows)} groups.** "
            + AGGREGATION_RULE.format(record=", ".join(f"`{k}`" for k in RECORD_KEYS))
        ),
        Paragraph(
            "Columns as in the SWAT paper's tables: W dens. / Act dens. = the measured weight and activation "
            "density (kept fraction) of the last epoch, over all conv/linear layers (dense ones count as 100 %); "
            "BA / AC = baseline (dense) accuracy / accuracy change, Act ↓ = activation memory reduction, "
            "MC = model compression."
        ),
        Paragraph(generated_by()),
        Heading("Results"),
    ]
    for model, dataset in pairs:
        blocks.append(Heading(f"{model} on {dataset}", 3))
        blocks.append(_results_table([r for r in rows if (r.model, r.dataset) == (model, dataset)]))

    if plots:
        with_pair = len(pairs) > 1
        curves = []
        for gi, row in enumerate(rows):
            group_label = _group_label(row, with_pair)
            seeds = row.seeds
            for run, seed in zip(row.runs, seeds):
                unique_seed = seed is not None and seeds.count(seed) == 1
                curves.append(
                    (
                        f"{group_label} · seed {seed}" if unique_seed else f"{group_label} · {run.name}",
                        group_label,
                        run.metrics,
                        gi,
                    )
                )
        png = plot_accuracy_overlay(curves, out_dir / _OVERLAY_PNG)
        blocks.append(Heading("Test accuracy"))
        if png is not None:
            images.append(png)
            blocks.append(
                Image(
                    png.name,
                    "test accuracy of all runs",
                    "Test accuracy against epoch (numbered from 1); one colour per group, one line style per run.",
                )
            )
        else:
            blocks.append(Note(f"No run has a test accuracy in `{RunDir.METRICS}`."))

    blocks.append(Heading("Runs"))
    run_rows = []
    for row in rows:
        for run in row.runs:
            s, last = run.summary, run.last_metrics
            run_rows.append(
                [
                    f"`{run.path}`",
                    row.model,
                    row.dataset,
                    row.method + (f" · {row.config_label}" if row.differs else ""),
                    format_value(row.density),
                    format_value(s.get("seed", run.config.get("seed"))),
                    str(len(run.metrics)),
                    pct_cell(s.get("final_test_acc")),
                    pct_cell(s.get("best_test_acc")),
                    pct_cell(last.get("weight_density"), 1),
                    pct_cell(last.get("activation_density"), 1),
                ]
            )
    blocks.append(
        Table(
            [
                "Run",
                "Model",
                "Dataset",
                "Method",
                "Density",
                "Seed",
                "Epochs",
                "Final top-1 (%)",
                "Best top-1 (%)",
                "W dens. (kept %)",
                "Act dens. (kept %)",
            ],
            run_rows,
            ["l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "r"],
        )
    )

    notes = []
    for row in rows:
        seeds = [json.dumps(seed, default=str) for seed in row.seeds]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            notes.append(
                f"{_group_label(row, True)}: {len(seeds) - len(set(seeds)) + len(repeated)} runs share seed(s) "
                f"{', '.join(repeated)} with the same config: repeats of one run, not independent seeds (their "
                "spread is only run-to-run nondeterminism)."
            )
    for run in runs:
        notes += [f"`{run.path}`: {n}" for n in run.notes]
        if run.flops is None and all(v is None for v in run.flops_summary().values()):
            notes.append(f"`{run.path}`: no FLOP figures (no `{RunDir.FLOPS}`, none in `{RunDir.SUMMARY}`).")
    if notes:
        blocks += [Heading("Notes"), BulletList(notes)]
    return Document(title or f"Comparison of {len(runs)} runs", blocks), images
