"""Read the files of a run directory written by ``sparsetrain train`` (no torch, no model loading).

Required: ``config.yaml`` and ``metrics.jsonl``. Optional: ``summary.json`` (derived from the config and the metrics
when absent, e.g. for an interrupted run), ``telemetry.jsonl`` and ``flops.json``. Problems that do not prevent a
report (a missing optional file, a truncated last JSON line) are collected in :attr:`RunFiles.notes`.

Example:
    >>> run = read_run("runs/lenet5-swat-u")  # doctest: +SKIP
    >>> run.summary["final_test_acc"], len(run.metrics)  # doctest: +SKIP
    (0.9841, 10)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "REQUIRED_FILES",
    "OPTIONAL_FILES",
    "FLOPS_KEYS",
    "RunDirectoryError",
    "TelemetrySeries",
    "RunFiles",
    "read_run",
    "recipe_label",
]

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.yaml", "metrics.jsonl")
OPTIONAL_FILES = ("summary.json", "telemetry.jsonl", "flops.json")
# The run-level figures the papers' tables report; summary.json["flops"] holds them, flops.json has them top level.
FLOPS_KEYS = (
    "training_flops_reduction_pct",
    "inference_flops_reduction_pct",
    "act_memory_reduction_pct",
    "model_compression_x",
)


class RunDirectoryError(ValueError):
    """The path is not a readable sparsetrain run directory."""


@dataclass
class TelemetrySeries:
    """Per-layer sparsity over training, from the ``kind == "layer"`` records of ``telemetry.jsonl``.

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
        config: ``config.yaml``.
        metrics: one dict per epoch from ``metrics.jsonl`` (possibly empty).
        summary: ``summary.json``, or a summary derived from config and metrics (see ``summary_derived``).
        summary_derived: True when ``summary.json`` was absent.
        flops: ``flops.json`` or None.
        telemetry: layer records of ``telemetry.jsonl`` or None.
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
        """The four run-level figures of :data:`FLOPS_KEYS` from ``summary.json``, falling back to ``flops.json``."""
        from_summary = self.summary.get("flops") or {}
        from_file = self.flops or {}
        return {k: _as_float(from_summary.get(k, from_file.get(k))) for k in FLOPS_KEYS}


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def recipe_label(recipe: Any) -> str:
    """A short, stable label for a recipe given by preset name or as a dict.

    Example:
        >>> recipe_label("swat-u"), recipe_label({"preset": "swat-u", "density": 0.1})
        ('swat-u', 'swat-u (custom)')
    """
    if recipe is None:
        return "dense"
    if isinstance(recipe, str):
        return recipe
    if isinstance(recipe, dict):
        preset = recipe.get("preset")
        if isinstance(preset, str):
            return f"{preset} (custom)"
        import hashlib

        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"custom-{digest}"
    return str(recipe)


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    records = []
    bad: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad.append(lineno)
    if bad:
        # A run killed mid-write leaves a truncated last line; reporting the rest is more useful than failing.
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(f"`{path.name}`: skipped {len(bad)} line(s) that are not JSON objects (line {shown}).")
    return records


def _read_telemetry(path: Path, notes: list[str]) -> TelemetrySeries:
    # Streamed: a long run's telemetry can hold hundreds of thousands of records; keep only compact series.
    tel = TelemetrySeries()
    bad = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                if rec.get("kind", "layer") != "layer":
                    continue
                tensor, name, step = str(rec["tensor"]), str(rec["name"]), int(rec["step"])
                sparsity = float(rec["sparsity"])
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
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
    if bad:
        notes.append(f"`{path.name}`: skipped {bad} malformed record(s).")
    return tel


def _derive_summary(config: dict[str, Any], metrics: list[dict[str, Any]], flops: dict | None) -> dict[str, Any]:
    overrides = config.get("recipe_overrides") or {}
    density = overrides.get("density", config.get("density"))
    if density is None and overrides.get("sparsity") is not None:
        density = 1.0 - float(overrides["sparsity"])
    accs = [m["test_acc"] for m in metrics if isinstance(m.get("test_acc"), (int, float))]
    summary: dict[str, Any] = {
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "recipe": config.get("recipe"),
        "density": density,
        "seed": config.get("seed"),
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "epochs": len(metrics),
    }
    if flops:
        summary["flops"] = {k: flops[k] for k in FLOPS_KEYS if k in flops}
    return summary


def _dedupe_epochs(metrics: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """Sort by epoch; when an epoch appears twice (a resumed run re-trains it), keep the last record."""
    by_epoch: dict[Any, dict[str, Any]] = {}
    no_epoch = []
    for m in metrics:
        e = m.get("epoch")
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            by_epoch[e] = m
        else:
            no_epoch.append(m)
    if len(by_epoch) + len(no_epoch) < len(metrics):
        notes.append(
            f"`metrics.jsonl`: {len(metrics) - len(by_epoch) - len(no_epoch)} repeated epoch(s) "
            "(resumed run?); the last record of each epoch is used."
        )
    return [by_epoch[e] for e in sorted(by_epoch)] + no_epoch


def _run_dirs_below(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES))


def _read_json_object(file: Path, notes: list[str], fallback: str) -> dict[str, Any] | None:
    """A JSON object from ``file``, or None (with a note saying what happens instead) if absent or malformed."""
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        notes.append(f"`{file.name}` is not valid JSON ({e}); {fallback}.")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{file.name}` holds a {type(data).__name__}, expected an object; {fallback}.")
        return None
    return data


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory.

    Args:
        run_dir: folder written by ``sparsetrain train``.

    Returns:
        The parsed :class:`RunFiles`.

    Raises:
        RunDirectoryError: the folder does not exist or lacks ``config.yaml`` / ``metrics.jsonl``, or a file
            cannot be parsed.
    """
    path = Path(run_dir)
    expected = (
        f"a run directory holds {' and '.join(REQUIRED_FILES)} (optional: {', '.join(OPTIONAL_FILES)}), "
        "as written by `sparsetrain train`"
    )
    if not path.is_dir():
        raise RunDirectoryError(f"{str(path)!r} is not a directory; {expected}")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        hint = ""
        below = _run_dirs_below(path)
        if below:
            shown = " ".join(str(p) for p in below[:3]) + (" ..." if len(below) > 3 else "")
            hint = f". It contains {len(below)} run directories: pass them instead, e.g. `sparsetrain report {shown}`"
        raise RunDirectoryError(
            f"{str(path)!r} is not a sparsetrain run directory: missing {', '.join(missing)}; {expected}{hint}"
        )

    notes: list[str] = []
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RunDirectoryError(f"{str(path / 'config.yaml')!r} is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise RunDirectoryError(f"{str(path / 'config.yaml')!r} must hold a mapping, got {type(config).__name__}")

    metrics = _dedupe_epochs(_read_jsonl(path / "metrics.jsonl", notes), notes)
    if not metrics:
        notes.append("`metrics.jsonl` holds no epochs yet: no training curves.")

    flops = _read_json_object(path / "flops.json", notes, "FLOP table omitted")
    summary_derived = False
    summary = _read_json_object(path / "summary.json", notes, "summary derived from config and metrics")
    if not (path / "summary.json").is_file():
        notes.append(
            "`summary.json` missing (run unfinished?): summary derived from `config.yaml` and `metrics.jsonl`."
        )
    if summary is None:
        summary = _derive_summary(config, metrics, flops)
        summary_derived = True

    telemetry = None
    if (path / "telemetry.jsonl").is_file():
        telemetry = _read_telemetry(path / "telemetry.jsonl", notes)
    log.debug(
        "read run %s: %d epochs, telemetry=%s, flops=%s", path, len(metrics), telemetry is not None, flops is not None
    )
    return RunFiles(
        path=path,
        config=config,
        metrics=metrics,
        summary=summary,
        summary_derived=summary_derived,
        flops=flops,
        telemetry=telemetry,
        notes=notes,
    )
