"""PNG figures of the report, drawn with matplotlib's object API on the Agg canvas.

matplotlib is the optional extra ``report``; it is imported lazily by :func:`require_matplotlib`. The figures never
touch ``pyplot``, so they neither switch the user's backend nor leak global figure state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsetrain.formatting import is_number
from sparsetrain.reporting.runfiles import TelemetrySeries

__all__ = [
    "MATPLOTLIB_HINT",
    "KEPT_LABEL",
    "NONZERO_LABEL",
    "require_matplotlib",
    "plot_training_curves",
    "plot_layer_sparsity",
    "plot_layer_densities",
    "plot_accuracy_overlay",
]

MATPLOTLIB_HINT = "pip install 'sparsetrain[report]'"
_DPI = 110
# Beyond this many lines a legend is unreadable; a colour bar over layer depth replaces it.
_MAX_LEGEND = 12
#: The two measures of how much of an operand is there, defined once in the report documentation, named on every axis.
KEPT_LABEL = "density (%): non-zero after the sparsifier (dense operands: 100)"
NONZERO_LABEL = "non-zero fraction (%) (natural zeros count as removed)"


def require_matplotlib() -> Any:
    """Import matplotlib's Figure class for Agg rendering, or fail with the install command.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed; the message names ``pip install 'sparsetrain[report]'``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (Agg must be importable)
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"sparsetrain report draws its plots with matplotlib, which is not installed: {MATPLOTLIB_HINT} "
            "(or pass --no-plots for a report with tables only)"
        ) from e
    return Figure


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = require_matplotlib()(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, facecolor="white")
    return path


def epoch_number(m: dict, index: int) -> int:
    """The 1-based epoch number of a metrics record, as the console counts (records store 0-based ``epoch``)."""
    e = m.get("epoch")
    return int(e) + 1 if is_number(e) else index + 1


def _series(metrics: Sequence[dict], key: str, scale: float = 1.0, x: str = "epoch") -> tuple[list[float], list[float]]:
    """``key`` against the 1-based epoch number (``x="epoch"``) or the step count at the epoch's end (``"step"``)."""
    xs, ys = [], []
    for i, m in enumerate(metrics):
        v = m.get(key)
        if not is_number(v):
            continue
        if x == "step":
            if not is_number(m.get("step")):
                continue
            xs.append(float(m["step"]))
        else:
            xs.append(float(epoch_number(m, i)))
        ys.append(float(v) * scale)
    return xs, ys


def _intra_epoch(metrics: Sequence[dict], key: str, scale: float) -> tuple[list[float], list[float]]:
    """The training curve's points inside the epochs (the metrics' ``curve``), in step order."""
    xs, ys = [], []
    for m in metrics:
        curve = m.get("curve")
        if isinstance(curve, dict) and isinstance(curve.get("step"), list) and isinstance(curve.get(key), list):
            for step, v in zip(curve["step"], curve[key]):
                if is_number(step) and is_number(v):
                    xs.append(float(step))
                    ys.append(float(v) * scale)
    return xs, ys


def plot_training_curves(metrics: Sequence[dict], path: Path) -> Path | None:
    """Accuracy (%) and loss of train and test against training step, side by side.

    The training curve has points inside each epoch (the metrics' ``curve``: loss and accuracy averaged over a few
    steps), so even a one-epoch run draws a line; the test set is evaluated at each epoch's end (one marker per
    epoch, numbered 1, 2, ... on the top axis). Runs without step counts are drawn against the epoch number.

    Returns:
        ``path``, or None when ``metrics`` holds none of the four series.
    """
    from matplotlib.ticker import MaxNLocator

    panels = [("Accuracy (%)", "acc", 100.0), ("Loss", "loss", 1.0)]
    if not any(_series(metrics, f"{split}_{kind}")[0] for _, kind, _ in panels for split in ("train", "test")):
        return None
    by_step = all(is_number(m.get("step")) for m in metrics)
    x = "step" if by_step else "epoch"
    fig = _new_figure(10.0, 3.8)
    axes = fig.subplots(1, 2)
    for ax, (ylabel, kind, scale) in zip(axes, panels):
        inside = _intra_epoch(metrics, f"train_{kind}", scale) if by_step else ([], [])
        if inside[0]:
            ax.plot(*inside, "--", linewidth=1.2, label="train (mean over each few steps)")
        else:
            xs, ys = _series(metrics, f"train_{kind}", scale, x)
            if xs:
                ax.plot(xs, ys, "--", marker="o", markersize=3, label="train (epoch mean)")
        xs, ys = _series(metrics, f"test_{kind}", scale, x)
        if xs:
            ax.plot(xs, ys, "-", marker="o", markersize=5, label="test (end of epoch)")
        ax.set_xlabel("training step" if by_step else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if by_step:
            ends = [float(m["step"]) for m in metrics]
            top = ax.secondary_xaxis("top")
            every = max(1, len(ends) // 10)  # at most ~10 labels
            top.set_xticks(ends[every - 1::every], labels=[str(epoch_number(m, i)) for i, m in
                                                          enumerate(metrics)][every - 1::every])
            top.set_xlabel("end of epoch", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    axes[0].set_title("Accuracy")
    axes[1].set_title("Loss")
    return _save(fig, path)


def _layer_colors(n: int) -> tuple[list[Any], Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)], cmap


def plot_layer_sparsity(telemetry: TelemetrySeries, tensors: Sequence[str], path: Path) -> Path | None:
    """Per-layer sparsity (%) against training step, one line per layer, one panel per tensor kind.

    This is the layout of the TensorQuant paper's figures 3-7 (gradient sparsity over training).

    Args:
        telemetry: the run's parsed telemetry.
        tensors: tensor kinds to draw, e.g. ``("grad_weight", "grad_output")``; absent ones are skipped.
        path: output PNG.

    Returns:
        ``path``, or None when none of ``tensors`` is present.
    """
    present = [t for t in tensors if telemetry.series.get(t)]
    if not present:
        return None
    layers = telemetry.layers()
    colors, cmap = _layer_colors(len(layers))
    color_of = dict(zip(layers, colors))
    fig = _new_figure(10.0, 3.4 * len(present) + 0.4)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, tensor in zip(axes, present):
        for name, (steps, vals) in telemetry.series[tensor].items():
            ax.plot(
                steps,
                [100.0 * v for v in vals],
                color=color_of[name],
                linewidth=1.3,
                label=name,
                marker="o" if len(steps) < 3 else None,
                markersize=3,
            )
        ax.set_ylabel(f"{tensor} sparsity (%)\n(exact zeros, natural incl.)")
        ax.set_title(f"Per-layer {tensor} sparsity over training (1 − non-zero fraction)")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("training step")
    if len(layers) <= _MAX_LEGEND:
        axes[0].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="layer")
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(norm=Normalize(0, len(layers) - 1), cmap=cmap)
        fig.colorbar(mappable, ax=list(axes), label="layer index (input → output)")
    return _save(fig, path)


def plot_layer_densities(
    densities: dict[str, dict[str, float]], operands: Sequence[str], path: Path, title: str = "Per-layer density",
    measure: str = "kept",
) -> Path | None:
    """Horizontal grouped bars: density (%) of each operand for each layer, first layer on top.

    Args:
        densities: ``{layer: {operand: fraction}}``.
        operands: operands to draw, in order.
        path: output PNG.
        title: figure title.
        measure: ``"kept"`` (density: non-zero fraction after the sparsifier, 1.0 for a dense operand) or
            ``"nonzero"`` (1 - fraction of exact zeros, natural zeros included); names the axis.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    layers = list(densities)
    operands = [op for op in operands if any(op in d for d in densities.values())]
    if not layers or not operands:
        return None
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    bar = 0.8 / len(operands)
    fig = _new_figure(9.0, max(2.6, 0.8 + 0.16 * len(layers) * max(1.0, len(operands) / 2)))
    ax = fig.subplots()
    for j, op in enumerate(operands):
        ys = [i + (j - (len(operands) - 1) / 2) * bar for i in range(len(layers))]
        vals = [100.0 * float(densities[name].get(op, float("nan"))) for name in layers]
        ax.barh(ys, vals, height=bar, color=palette(j % 10), label=op)
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=8 if len(layers) > 20 else 9)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel(KEPT_LABEL if measure == "kept" else NONZERO_LABEL)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    # Outside the axes: a dense last layer's full-length bars would hide under an inside legend.
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="operand")
    return _save(fig, path)


def plot_accuracy_overlay(curves: Sequence[tuple[str, str, Sequence[dict], int]], path: Path) -> Path | None:
    """Test accuracy (%) against epoch (numbered from 1, as the console) for several runs in one axes.

    Args:
        curves: ``(run_label, group_label, metrics, group_index)`` per run; runs of one group share a colour and
            differ in line style. With more than 12 runs the legend names groups only.
        path: output PNG.

    Returns:
        ``path``, or None when no run has a test accuracy.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    palette = colormaps["tab10"]
    styles = ["-", "--", ":", "-."]
    fig = _new_figure(10.0, 5.0)
    ax = fig.subplots()
    legend_by_group = len(curves) > _MAX_LEGEND
    seen_in_group: dict[int, int] = {}
    drawn = False
    for run_label, group_label, metrics, group in curves:
        xs, ys = _series(metrics, "test_acc", 100.0)
        if not xs:
            continue
        k = seen_in_group.get(group, 0)
        seen_in_group[group] = k + 1
        show = (k == 0) if legend_by_group else True
        ax.plot(
            xs,
            ys,
            styles[k % len(styles)],
            color=palette(group % 10),
            linewidth=1.5,
            marker="o" if len(xs) < 3 else None,
            markersize=3,
            label=(group_label if legend_by_group else run_label) if show else None,
        )
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy of all runs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
