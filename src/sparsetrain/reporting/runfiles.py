"""Read the files of a run directory written by ``sparsetrain train`` for a report (no model loading).

The format -- file names, readers, the summary -- belongs to :class:`sparsetrain.runs.RunDir`; this module turns what
it reads into a :class:`RunFiles` for the report. Required: the config and the metrics (``RunDir.REQUIRED``).
Optional: the summary (derived by ``RunDir.derive_summary`` when absent, e.g. for an interrupted run), the telemetry
and the FLOP accounting. Problems that do not prevent a report (a missing optional file, a truncated last JSON line)
are collected in :attr:`RunFiles.notes`; corruption before the last line of a JSON-lines file is an error.

Example:
    >>> run = read_run("runs/lenet5-swat-u")  # doctest: +SKIP
    >>> run.summary["final_test_acc"], len(run.metrics)  # doctest: +SKIP
    (0.9841, 10)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsetrain.formatting import finite_float, is_number
from sparsetrain.runs import SUMMARY_FLOPS_KEYS, RunDir, RunDirectoryError

__all__ = [
    "RunDirectoryError",
    "TelemetrySeries",
    "RunFiles",
    "read_run",
    "recipe_label",
]

log = logging.getLogger(__name__)

@dataclass
class TelemetrySeries:
    """Per-layer sparsity over training, from the ``kind == "layer"`` records of the run's telemetry.

    Attributes:
        series: ``series[tensor][layer] = (steps, sparsities)``; layers in order of first appearance, which is the
            forward order for the telemetry Monitor.
        numel: ``numel[tensor][layer]`` of the last record.
        num_records: number of layer records read.
    """

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)
    numel: dict[str, dict[str, int]] = field(default_factory=dict)
    num_records: int = 0

    @property
    def tensors(self) -> list[str]:
        """Tensor kinds present (``"weight"``, ``"grad_weight"``, ...)."""
        return list(self.series)

    def layers(self) -> list[str]:
        """All layer names, in order of first appearance over all tensors."""
        seen: dict[str, None] = {}
        for per_layer in self.series.values():
            seen.update(dict.fromkeys(per_layer))
        return list(seen)

    def last(self, tensor: str) -> dict[str, float]:
        """Sparsity of each layer at the last recorded step of ``tensor`` (empty if the tensor is absent)."""
        return {name: vals[-1] for name, (_, vals) in self.series.get(tensor, {}).items() if vals}


@dataclass
class RunFiles:
    """The parsed contents of one run directory.

    Attributes:
        path: the run directory.
        config: the run's config.
        metrics: one dict per epoch (possibly empty), sorted by epoch, the last record of a repeated epoch.
        summary: the run's summary, or one derived from config and metrics (see ``summary_derived``).
        summary_derived: True when the run has no (readable) summary file.
        flops: the FLOP accounting or None.
        telemetry: layer records of the telemetry or None.
        notes: human-readable remarks about missing or damaged files.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    summary_derived: bool = False
    flops: dict[str, Any] | None = None
    telemetry: TelemetrySeries | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.name

    @property
    def last_metrics(self) -> dict[str, Any]:
        """The last epoch's metrics (empty dict when there are none)."""
        return self.metrics[-1] if self.metrics else {}

    def flops_summary(self) -> dict[str, float | None]:
        """The four run-level figures of :data:`~sparsetrain.runs.SUMMARY_FLOPS_KEYS` from the summary, falling back to
        the FLOP file."""
        from_summary = self.summary.get("flops") or {}
        from_file = self.flops or {}
        return {k: finite_float(from_summary.get(k, from_file.get(k))) for k in SUMMARY_FLOPS_KEYS}


def recipe_label(recipe: Any) -> str:
    """A short, stable label for a recipe given by preset name or as a dict (a recipe file's content, recorded
    inline by the run): ``<preset> (custom <hash>)`` or ``custom-<hash>``, the hash telling different recipes apart.

    Example:
        >>> recipe_label("swat-u"), recipe_label({"preset": "swat-u", "density": 0.1})
        ('swat-u', 'swat-u (custom a7eda3)')
    """
    if recipe is None:
        return "dense"
    if isinstance(recipe, str):
        return recipe
    if isinstance(recipe, dict):
        import hashlib

        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]
        preset = recipe.get("preset")
        return f"{preset} (custom {digest})" if isinstance(preset, str) else f"custom-{digest}"
    return str(recipe)


def _skipped_note(name: str, skipped: list[int]) -> str:
    shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
    return f"`{name}`: skipped {len(skipped)} line(s) that are not JSON objects (line {shown})."


def _read_telemetry(run_dir: RunDir, notes: list[str]) -> TelemetrySeries:
    # Streamed: a long run's telemetry can hold hundreds of thousands of records; keep only compact series.
    tel = TelemetrySeries()
    bad = 0
    skipped: list[int] = []
    for rec in run_dir.iter_telemetry(skipped):
        if rec.get("kind", "layer") != "layer":
            continue
        try:
            tensor, name, step = str(rec["tensor"]), str(rec["name"]), int(rec["step"])
            sparsity = float(rec["sparsity"])
        except (KeyError, TypeError, ValueError):
            bad += 1
            continue
        steps, vals = tel.series.setdefault(tensor, {}).setdefault(name, ([], []))
        # A resumed run appends from its checkpoint's step: the later records replace the overlapping ones.
        while steps and steps[-1] >= step:
            steps.pop()
            vals.pop()
        steps.append(step)
        vals.append(sparsity)
        if isinstance(rec.get("numel"), int):
            tel.numel.setdefault(tensor, {})[name] = rec["numel"]
        tel.num_records += 1
    if skipped:
        notes.append(_skipped_note(RunDir.TELEMETRY, skipped))
    if bad:
        notes.append(f"`{RunDir.TELEMETRY}`: skipped {bad} malformed record(s).")
    return tel


def _dedupe_epochs(metrics: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Sort by epoch; when an epoch appears twice (a resumed run re-trains it), keep the last record."""
    by_epoch: dict[Any, dict[str, Any]] = {}
    no_epoch = []
    for m in metrics:
        e = m.get("epoch")
        if is_number(e):
            by_epoch[e] = m
        else:
            no_epoch.append(m)
    if len(by_epoch) + len(no_epoch) < len(metrics):
        notes.append(
            f"`{RunDir.METRICS}`: {len(metrics) - len(by_epoch) - len(no_epoch)} repeated epoch(s) "
            "(resumed run?); the last record of each epoch is used."
        )
    return [by_epoch[e] for e in sorted(by_epoch)] + no_epoch


def _optional(read, notes: list[str], fallback: str) -> dict[str, Any] | None:
    """``read()``, or None with a note saying what happens instead when the file is malformed."""
    try:
        return read()
    except RunDirectoryError as e:
        notes.append(f"{e}; {fallback}.")
        return None


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory.

    Args:
        run_dir: folder written by ``sparsetrain train``.

    Returns:
        The parsed :class:`RunFiles`.

    Raises:
        RunDirectoryError: the folder does not exist or lacks a required file (``RunDir.REQUIRED``), or a file
            cannot be parsed.
    """
    rd = RunDir(run_dir)
    try:
        rd.check()
    except RunDirectoryError as e:
        below = RunDir.find(rd.path) if rd.path.is_dir() else []
        hint = ""
        if below:
            shown = " ".join(str(r.path) for r in below[:3]) + (" ..." if len(below) > 3 else "")
            hint = f". It contains {len(below)} run directories: pass them instead, e.g. `sparsetrain report {shown}`"
        raise RunDirectoryError(f"{e}{hint}") from None

    notes: list[str] = []
    config = rd.read_config()
    skipped: list[int] = []
    try:
        metrics = rd.read_metrics(skipped)
    except ValueError as e:  # corruption before the last line: nothing to guess
        raise RunDirectoryError(str(e)) from None
    if skipped:
        notes.append(_skipped_note(RunDir.METRICS, skipped))
    metrics = _dedupe_epochs(metrics, notes)
    if not metrics:
        notes.append(f"`{RunDir.METRICS}` holds no epochs yet: no training curves.")

    flops = _optional(rd.read_flops, notes, "FLOP table omitted")
    summary = _optional(rd.read_summary, notes, "summary derived from config and metrics")
    if not rd.summary_path.is_file():
        notes.append(f"`{RunDir.SUMMARY}` missing (run unfinished?): summary derived from `{RunDir.CONFIG}` and "
                     f"`{RunDir.METRICS}`.")
    summary_derived = summary is None
    if summary is None:
        summary = rd.derive_summary(config, metrics, flops)

    telemetry = None
    if rd.telemetry_path.is_file():
        try:
            telemetry = _read_telemetry(rd, notes)
        except ValueError as e:
            raise RunDirectoryError(str(e)) from None
    log.debug("read run %s: %d epochs, telemetry=%s, flops=%s", rd.path, len(metrics), telemetry is not None,
              flops is not None)
    return RunFiles(path=rd.path, config=config, metrics=metrics, summary=summary, summary_derived=summary_derived,
                    flops=flops, telemetry=telemetry, notes=notes)
