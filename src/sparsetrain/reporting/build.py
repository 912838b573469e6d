"""Assemble and write the report of one run, or the comparison of several runs (built in :mod:`.comparison`).

Both outputs go to one folder (``RunDir.REPORT_DIR`` of the run by default): Markdown (``RunDir.REPORT_MARKDOWN``,
images referenced by relative file name), HTML (``RunDir.REPORT_HTML``: same content, inline CSS, PNGs embedded as
base64 ``data:`` URIs so the single file opens anywhere) and the PNG files.

Example:
    >>> from sparsetrain.reporting import write_report
    >>> result = write_report(["runs/lenet5-swat-u"])  # doctest: +SKIP
    >>> result.markdown.name == RunDir.REPORT_MARKDOWN  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsetrain.formatting import finite_float, pct_cell
from sparsetrain.layers import OPERANDS
from sparsetrain.reporting.comparison import build_comparison_document
from sparsetrain.reporting.document import (
    Block,
    BulletList,
    CodeBlock,
    Document,
    Heading,
    Image,
    Note,
    Paragraph,
    Table,
    generated_by,
    to_html,
    to_markdown,
)
from sparsetrain.reporting.plots import (
    KEPT_LABEL,
    NONZERO_LABEL,
    epoch_number,
    plot_layer_densities,
    plot_layer_sparsity,
    plot_training_curves,
    require_matplotlib,
)
from sparsetrain.reporting.runfiles import RunFiles, read_run, recipe_label
from sparsetrain.reporting.tables import flatten, format_value
from sparsetrain.runs import RunDir

__all__ = [
    "TENSORS",
    "DEFAULT_COMPARISON_DIR",
    "ReportResult",
    "build_run_document",
    "write_report",
]

log = logging.getLogger(__name__)

# Operand names of handle.densities() and tensor names of telemetry records, in the order they are tabulated.
TENSORS = ("weight", "input", "output", "grad_output", "grad_input", "grad_weight")
# The comparison goes to the working directory by default rather than next to the runs, where a later
# `sparsetrain report runs/*` would pick the report folder up as a (broken) run directory.
DEFAULT_COMPARISON_DIR = Path("sparsetrain-report")

_CURVES_PNG = "curves.png"
_SPARSITY_PNG = "grad_sparsity.png"
_DENSITY_PNG = "layer_density.png"


@dataclass
class ReportResult:
    """Files written by :func:`write_report`."""

    out_dir: Path
    markdown: Path
    html: Path
    images: list[Path] = field(default_factory=list)
    document: Document | None = None


def _kv_value(key: str, value: Any) -> str:
    # Accuracies and measured densities are stored as fractions; people read them as percent.
    if key.endswith(("_acc", "_density", "(last epoch)")) and finite_float(value) is not None:
        return f"{100.0 * float(value):.2f} %"
    return format_value(value)


# ------------------------------------------------------------------------------------------------------ single run


def _summary_section(run: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("Summary")]
    if run.summary_derived:
        blocks.append(
            Note(
                f"`{RunDir.SUMMARY}` is missing (unfinished run?); these values are derived from "
                f"`{RunDir.CONFIG}` and `{RunDir.METRICS}`."
            )
        )
    flat = flatten(
        {k: (recipe_label(v) if k == "recipe" and isinstance(v, dict) else v) for k, v in run.summary.items()}
    )
    last = run.last_metrics
    for key in ("weight_density", "activation_density"):
        if finite_float(last.get(key)) is not None and key not in flat:
            flat[f"{key} (last epoch)"] = last[key]
    rows = [[f"`{k}`", _kv_value(k, v)] for k, v in flat.items()]
    blocks.append(Table(["Key", "Value"], rows, ["l", "r"]))
    return blocks


def _config_section(config: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Configuration")]
    if not config:
        return blocks + [Note(f"`{RunDir.CONFIG}` is empty.")]
    rows: list[list[str]] = []
    long_values: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat = flatten(value, f"{key}.")
            # Small dicts (recipe_overrides) read best as rows; big ones (a per-layer recipe) as YAML.
            if len(flat) <= 6 and all(len(format_value(v)) <= 60 for v in flat.values()):
                rows += [[f"`{k}`", format_value(v)] for k, v in flat.items()]
            else:
                long_values.append((key, value))
        elif isinstance(value, list) and len(json.dumps(value, default=str)) > 80:
            long_values.append((key, value))
        else:
            rows.append([f"`{key}`", format_value(value)])
    blocks.append(Table(["Key", "Value"], rows, ["l", "l"]))
    for key, value in long_values:
        blocks.append(Paragraph(f"`{key}`:"))
        blocks.append(CodeBlock(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False), "yaml"))
    return blocks


def _curves_section(run: RunFiles, out_dir: Path, plots: bool, images: list[Path]) -> list[Block]:
    blocks: list[Block] = [Heading("Training curves")]
    if not run.metrics:
        return blocks + [Note(f"`{RunDir.METRICS}` holds no epochs yet.")]
    if plots:
        png = plot_training_curves(run.metrics, out_dir / _CURVES_PNG)
        if png is not None:
            images.append(png)
            blocks.append(
                Image(
                    png.name,
                    "accuracy and loss curves",
                    "Accuracy and loss against training step: the training set's mean over every few steps inside "
                    "each epoch (dashed), the test set at each epoch's end (markers; epochs numbered on the top "
                    "axis).",
                )
            )
    # Runs since the `lr_end` key record the mean rate of the epoch's steps as `lr`; older ones the end value.
    lr_title = "LR (epoch mean)" if any("lr_end" in m for m in run.metrics) else "LR (end of epoch)"
    columns = [
        ("lr", lr_title, lambda v: f"{v:.4g}"),
        ("train_loss", "Train loss", lambda v: f"{v:.4f}"),
        ("train_acc", "Train acc. (%)", pct_cell),
        ("test_loss", "Test loss", lambda v: f"{v:.4f}"),
        ("test_acc", "Test acc. (%)", pct_cell),
        ("weight_density", "W dens. (kept %)", lambda v: pct_cell(v, 1)),
        ("activation_density", "Act dens. (kept %)", lambda v: pct_cell(v, 1)),
        ("time_s", "Time (s)", lambda v: f"{v:.1f}"),
    ]
    present = [c for c in columns if any(finite_float(m.get(c[0])) is not None for m in run.metrics)]
    # Epochs numbered from 1, as the console prints them ("epoch 1/8"); the records store 0-based `epoch`.
    rows = [[str(epoch_number(m, i))] + [fmt(m[key]) if finite_float(m.get(key)) is not None else "—"
                                         for key, _, fmt in present] for i, m in enumerate(run.metrics)]
    blocks.append(Table(["Epoch"] + [title for _, title, _ in present], rows, ["r"] * (len(present) + 1)))
    if any("lr_end" in m for m in run.metrics):
        blocks.append(Paragraph("LR: the mean learning rate of the epoch's steps (the schedule changes it every "
                                "step; under cosine the last epoch ends at 0). W dens. / Act dens.: density, the "
                                "kept fraction (see *Density* below)."))
    return blocks


def _layer_densities(run: RunFiles) -> tuple[dict[str, dict[str, float]], str, str] | None:
    """Per-layer densities from the last epoch's ``densities`` (measure ``"kept"``), else the non-zero fraction from
    telemetry at its last step (measure ``"nonzero"``); returns ``(table, source, measure)``."""
    for i, m in reversed(list(enumerate(run.metrics))):
        dens = m.get("densities")
        if isinstance(dens, dict) and dens:
            table = {
                str(layer): {op: float(v) for op, v in ops.items() if finite_float(v) is not None}
                for layer, ops in dens.items()
                if isinstance(ops, dict)
            }
            return table, (f"`densities` of epoch {epoch_number(m, i)} in `{RunDir.METRICS}` "
                           "(kept fraction per operand)"), "kept"
    tel = run.telemetry
    if tel is not None and (tel.last("weight") or tel.last("input")):
        from_tel: dict[str, dict[str, float]] = {}
        for tensor in ("weight", "input"):
            for layer, sparsity in tel.last(tensor).items():
                from_tel.setdefault(layer, {})[tensor] = 1.0 - sparsity
        return from_tel, ("telemetry at its last recorded step: the non-zero fraction (1 − fraction of exact zeros, "
                          "natural zeros such as ReLU outputs included), not the density"), "nonzero"
    return None


#: The one definition of an operand's density, as the README's Conventions and docs/report state it.
DENSITY_DEFINITION = (
    "*Density* is the kept fraction of an operand: the fraction of its elements that are non-zero in the tensor its "
    "GEMM receives, after the layer's sparsifier. Values the sparsifier drops and zeros that were already there "
    "(ReLU outputs) both count as removed. An operand no sparsifier acts on (a dense layer, a dense operand) has "
    "density 100 % by definition, whatever zeros it holds. The telemetry's *sparsity* is another measure: the "
    "fraction of exact zeros of a tensor, whether a sparsifier or the data made them."
)


def _overall_density_text(run: RunFiles, kept: dict[str, dict[str, float]] | None) -> str:
    """The run's weight and activation density, with the dense layers named and, when they change the activation
    figure, the activation density over the sparse layers alone (from the FLOP accounting's saved elements)."""
    last = run.last_metrics
    text = (f"Over all conv/linear layers, element-weighted (weights by their elements, activations by the elements "
            f"each layer saves for its weight gradient): weight density {pct_cell(last.get('weight_density'))} %, "
            f"activation density {pct_cell(last.get('activation_density'))} %.")
    layers = [r for r in (run.flops or {}).get("layers") or [] if isinstance(r, dict) and "name" in r]
    if kept is None or not layers:
        return text + " Layers the recipe leaves dense count as 100 %."
    dense = [r for r in layers if r["name"] not in kept]
    if not dense:
        return text + " Every conv/linear layer is sparse."
    names = ", ".join(f"`{r['name']}`" for r in dense)
    total = sum(finite_float(r.get("saved_activation_elements")) or 0.0 for r in layers)
    dense_share = sum(finite_float(r.get("saved_activation_elements")) or 0.0 for r in dense)
    text += f" The dense layers ({names}) count as 100 %"
    sparse = [r for r in layers if r["name"] in kept]
    n_sparse = sum(finite_float(r.get("saved_activation_elements")) or 0.0 for r in sparse)
    if total > 0 and n_sparse > 0:
        alone = sum(kept[r["name"]].get("input_for_grad_weight", 1.0)
                    * (finite_float(r.get("saved_activation_elements")) or 0) for r in sparse) / n_sparse
        text += (f"; they hold {100 * dense_share / total:.1f} % of the saved activation elements. Over the sparse "
                 f"layers alone the activation density is {100 * alone:.2f} %.")
    else:
        text += "."
    return text


def _density_section(run: RunFiles, out_dir: Path, plots: bool, images: list[Path]) -> list[Block]:
    blocks: list[Block] = [Heading("Per-layer densities")]
    found = _layer_densities(run)
    if found is None:
        return blocks + [
            Note(
                f"No per-layer densities: the last epoch of `{RunDir.METRICS}` has no `densities` and "
                "there is no weight/input telemetry."
            )
        ]
    table, source, measure = found
    present = [op for op in OPERANDS if any(op in d for d in table.values())]
    # Weights and activations are the headline; other operands only when some layer actually sparsifies them.
    shown = [op for op in present if op in ("weight", "input") or any(d.get(op, 1.0) < 0.999 for d in table.values())]
    blocks.append(Paragraph(DENSITY_DEFINITION))
    blocks.append(Paragraph(f"Source: {source}. Layers absent from the table are dense."))
    last = run.last_metrics
    if finite_float(last.get("weight_density")) is not None or finite_float(last.get("activation_density")) is not None:
        blocks.append(Paragraph(_overall_density_text(run, table if measure == "kept" else None)))
    if plots:
        title = "Per-layer density (kept fraction)" if measure == "kept" else "Per-layer non-zero fraction"
        png = plot_layer_densities(table, shown, out_dir / _DENSITY_PNG, title=title, measure=measure)
        if png is not None:
            images.append(png)
            label = KEPT_LABEL if measure == "kept" else NONZERO_LABEL
            blocks.append(Image(png.name, "per-layer density bars", f"Per layer: {label}."))
    unit = "kept %" if measure == "kept" else "non-zero %"
    rows = [[f"`{layer}`"] + [pct_cell(ops.get(op), 1) for op in shown] for layer, ops in table.items()]
    blocks.append(Table(["Layer"] + [f"{op} ({unit})" for op in shown], rows, ["l"] + ["r"] * len(shown)))
    return blocks


def _telemetry_section(run: RunFiles, out_dir: Path, plots: bool, images: list[Path]) -> list[Block]:
    blocks: list[Block] = [Heading("Sparsity telemetry")]
    tel = run.telemetry
    if tel is None:
        return blocks + [
            Note(f"No `{RunDir.TELEMETRY}` in this run (trained without telemetry): no per-layer sparsity over "
                 "training.")
        ]
    if tel.num_records == 0:
        return blocks + [Note(f"`{RunDir.TELEMETRY}` holds no per-layer records.")]
    grads = [t for t in ("grad_weight", "grad_output") if tel.series.get(t)]
    if not grads:
        blocks.append(Note("The telemetry has no `grad_weight` or `grad_output` records: no gradient-sparsity plot."))
    elif plots:
        png = plot_layer_sparsity(tel, grads, out_dir / _SPARSITY_PNG)
        if png is not None:
            images.append(png)
            blocks.append(
                Image(
                    png.name,
                    "per-layer gradient sparsity over training",
                    "Per-layer sparsity (fraction of exact zeros) of "
                    + " and ".join(f"`{t}`" for t in grads)
                    + " against training step, one line per layer (cf. TensorQuant figs. 3-7).",
                )
            )
    tensors = [t for t in TENSORS if tel.series.get(t)] + [t for t in tel.tensors if t not in TENSORS]
    last_steps = sorted({steps[-1] for t in tensors for steps, _ in tel.series[t].values() if steps})
    step_text = str(last_steps[-1]) if len(last_steps) == 1 else f"{last_steps[0]}–{last_steps[-1]}"
    blocks.append(
        Paragraph(
            f"Sparsity (% exact zeros, natural zeros included: 1 − the non-zero fraction, not 1 − density) per "
            f"layer at the last recorded step ({step_text}); "
            "for gradients also the mean over all recorded steps."
        )
    )
    headers = ["Layer"] + [f"{t} (%)" for t in tensors] + [f"{t} mean (%)" for t in grads]
    rows = []
    for layer in tel.layers():
        row = [f"`{layer}`"]
        for t in tensors:
            series = tel.series[t].get(layer)
            row.append(pct_cell(series[1][-1], 1) if series and series[1] else "—")
        for t in grads:
            series = tel.series[t].get(layer)
            row.append(pct_cell(sum(series[1]) / len(series[1]), 1) if series and series[1] else "—")
        rows.append(row)
    blocks.append(Table(headers, rows, ["l"] + ["r"] * (len(headers) - 1)))
    return blocks


def _flops_section(run: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("FLOPs and memory")]
    flops = run.flops
    if flops is None:
        return blocks + [Note(f"No `{RunDir.FLOPS}` in this run: FLOP and memory accounting not available.")]
    convention = flops.get("convention")
    if convention is not None:
        blocks.append(Paragraph(f"Convention: {convention if isinstance(convention, str) else json.dumps(convention)}"))
    totals = flatten({k: v for k, v in flops.items() if k not in ("layers", "convention")})
    scalar_totals = {k: v for k, v in totals.items() if not isinstance(v, (list, dict))}
    if scalar_totals:
        blocks.append(Heading("Totals", 3))
        blocks.append(
            Table(["Quantity", "Value"], [[f"`{k}`", format_value(v)] for k, v in scalar_totals.items()], ["l", "r"])
        )
    layers = flops.get("layers")
    if isinstance(layers, list) and layers:
        rows_flat = [flatten(r) for r in layers if isinstance(r, dict)]
        keys = list(dict.fromkeys(k for r in rows_flat for k in r))
        if "name" in keys:  # the layer name leads
            keys.remove("name")
            keys.insert(0, "name")
        blocks.append(Heading("Per layer", 3))
        align = ["l" if all(isinstance(r.get(k), str) or r.get(k) is None for r in rows_flat) else "r" for k in keys]
        body = [[f"`{r[k]}`" if k == "name" and k in r else format_value(r.get(k)) for k in keys] for r in rows_flat]
        blocks.append(Table(keys, body, align))
    elif not scalar_totals:
        blocks.append(Note(f"`{RunDir.FLOPS}` holds neither totals nor a `layers` list."))
    return blocks


def build_run_document(
    run: RunFiles, out_dir: Path, title: str | None = None, plots: bool = True
) -> tuple[Document, list[Path]]:
    """Build the single-run report and draw its PNGs into ``out_dir``.

    Args:
        run: parsed run directory.
        out_dir: folder for the PNG files.
        title: document title (default: ``"Training report: <run name>"``).
        plots: draw PNG figures (needs matplotlib).

    Returns:
        The document and the PNG files written.
    """
    images: list[Path] = []
    s = run.summary
    density = s.get("density")
    facts = [
        f"model `{s.get('model', run.config.get('model', '?'))}`",
        f"dataset `{s.get('dataset', run.config.get('dataset', '?'))}`",
        f"recipe `{recipe_label(s.get('recipe', run.config.get('recipe')))}`"
        + (f" at density {format_value(density)}" if finite_float(density) is not None else ""),
        f"seed {s.get('seed', run.config.get('seed', '?'))}",
        f"{len(run.metrics)} epoch(s) recorded",
    ]
    blocks: list[Block] = [
        Paragraph(f"Run directory `{run.path}`: " + ", ".join(facts) + "."),
        Paragraph(generated_by()),
    ]
    blocks += _summary_section(run)
    blocks += _config_section(run.config)
    blocks += _curves_section(run, out_dir, plots, images)
    blocks += _density_section(run, out_dir, plots, images)
    blocks += _telemetry_section(run, out_dir, plots, images)
    blocks += _flops_section(run)
    if run.notes:
        blocks += [Heading("Notes"), BulletList(list(run.notes))]
    return Document(title or f"Training report: {run.name}", blocks), images


# ------------------------------------------------------------------------------------------------------------ write


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    title: str | None = None,
    plots: bool = True,
    embed_images: bool = True,
) -> ReportResult:
    """Write the Markdown and HTML report and PNG plots for one run, or a comparison of several runs.

    Args:
        run_dirs: one run directory (single-run report) or several (comparison report).
        out_dir: output folder; default the run's ``RunDir.report_dir`` for one run, ``./sparsetrain-report`` for
            several.
        title: report title.
        plots: draw PNG figures (needs matplotlib, ``pip install 'sparsetrain[report]'``).
        embed_images: embed the PNGs in the HTML as data URIs (default) instead of referencing the files.

    Returns:
        The paths written.

    Raises:
        RunDirectoryError: a path is not a run directory.
        ImportError: ``plots`` is True and matplotlib is missing.
        ValueError: ``run_dirs`` is empty.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if plots:
        require_matplotlib()  # fail before any file is written
    unique: dict[Path, Path] = {}
    for d in run_dirs:
        unique.setdefault(Path(d).resolve(), Path(d))
    if len(unique) < len(run_dirs):
        log.warning(
            "ignoring %d repeated run director%s",
            len(run_dirs) - len(unique),
            "y" if len(run_dirs) - len(unique) == 1 else "ies",
        )
    runs = [read_run(p) for p in unique.values()]

    if len(runs) == 1:
        out = Path(out_dir) if out_dir is not None else RunDir(runs[0].path).report_dir
        out.mkdir(parents=True, exist_ok=True)
        doc, images = build_run_document(runs[0], out, title, plots)
    else:
        out = Path(out_dir) if out_dir is not None else DEFAULT_COMPARISON_DIR
        out.mkdir(parents=True, exist_ok=True)
        doc, images = build_comparison_document(runs, out, title, plots)

    md_path, html_path = out / RunDir.REPORT_MARKDOWN, out / RunDir.REPORT_HTML
    md_path.write_text(to_markdown(doc), encoding="utf-8")
    html_path.write_text(to_html(doc, image_dir=out, embed_images=embed_images), encoding="utf-8")
    log.debug("wrote %s, %s and %d image(s)", md_path, html_path, len(images))
    return ReportResult(out_dir=out, markdown=md_path, html=html_path, images=images, document=doc)
