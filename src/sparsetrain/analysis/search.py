"""Post-training per-layer threshold search (Loroch et al. 2018, "TensorQuant", §3.1; METHODS.md §3).

For each layer on its own (all other layers untouched), start at ``thr = 1`` and halve it until the accuracy with
that layer's operand thresholded (``|v| > thr`` kept) holds ``accuracy / baseline >= margin`` (default 1.0, accuracy
unchanged, as in TensorQuant's published scripts), or until ``thr < 1e-5``: the layer "cannot be sparsified" and
stays dense. Then every found threshold is applied at once and the combined accuracy and sparsities are reported. The
result turns into a recipe that ``sparsetrain.sparsify_`` loads.

Thresholds are enforced through ``sparsetrain.sparsify_`` with ``threshold`` sparsifiers on a deep copy of the
model (:func:`sparsetrain.telemetry.inference.apply_thresholds`), so the searched model is never modified. Operands:

* ``"weight"``: the weight as used in forward (TensorQuant's weight sparsity).
* ``"input"``: the activation a layer *consumes* (after the previous ReLU / pooling). TensorQuant thresholds a
  layer's output, but there the output is taken after the activation function; here a conv's ``output`` is the
  pre-BN, pre-ReLU GEMM result: thresholding it would not survive BN's shift, and its zeros are not the zeros a
  GEMM can skip. The input operand is the post-ReLU activation and is exactly what the layer's GEMM multiplies.
  By default the first layer is left out of an activation search: its input is the image, not an activation.

The halving finds the largest *power of two* that holds the margin, assuming accuracy falls monotonically with the
threshold (the paper's grid search makes the same assumption).

A sparse-trained model is searched "as trained" after :func:`bake_sparse_weights` (or ``handle.remove(bake=True)``)
turned it into a dense model computing the same forward weights.

Example:
    >>> from sparsetrain.analysis.search import halving_search
    >>> thr, tried = halving_search(lambda t: 1.0 if t <= 0.125 else 0.5, baseline=1.0, margin=0.99)
    >>> thr, len(tried)
    (0.125, 4)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from sparsetrain.layers import OPERANDS
from sparsetrain.telemetry.inference import apply_thresholds, ensure_dense, threshold_layers
from sparsetrain.telemetry.monitor import evaluate_with_monitor, monitored_layers

if TYPE_CHECKING:
    from sparsetrain.handle import SparsityHandle

__all__ = [
    "SEARCH_OPERANDS",
    "DEFAULT_MARGIN",
    "LayerSearch",
    "ThresholdSearchResult",
    "threshold_recipe",
    "bake_sparse_weights",
    "inference_model",
    "Evaluator",
    "make_evaluator",
    "halving_search",
    "search_thresholds",
]

#: The default margin: accuracy unchanged -- the paper's text ("the highest threshold ... which leaves the test accuracy
#: unchanged") and its published search scripts. ``margin=0.999`` is a looser option (our METHODS.md reading's).
DEFAULT_MARGIN = 1.0

logger = logging.getLogger(__name__)

#: The entries of ``layers.OPERANDS`` a search can threshold: the forward GEMM's two operands (see the module
#: docstring for why not ``output``).
SEARCH_OPERANDS: tuple[str, ...] = tuple(op for op in OPERANDS if op in ("weight", "input"))


def _check_operand(operand: str) -> None:
    if operand not in SEARCH_OPERANDS:
        raise ValueError(f"operand must be one of {SEARCH_OPERANDS}, got {operand!r}")


def threshold_recipe(thresholds: Mapping[str, float | None], operand: str = "weight") -> dict[str, Any]:
    """A recipe dict putting a ``threshold`` sparsifier on ``operand`` of each named layer.

    Args:
        thresholds: layer name -> threshold; ``None`` writes an explicit ``null`` (the layer stays dense).
        operand: ``"weight"`` or ``"input"``.

    Example:
        >>> threshold_recipe({"conv1": 0.0625, "fc": None})
        {'layers': {'conv1': {'weight': {'type': 'threshold', 'threshold': 0.0625}}, 'fc': None}}
    """
    _check_operand(operand)
    built = threshold_layers(**{operand: {n: t for n, t in thresholds.items() if t is not None}})
    return {"layers": {name: built.get(name) for name in thresholds}}


def _reads_activations(spec: Any) -> bool:
    """Whether a layer spec sparsifies forward activations (what baking the weights cannot keep)."""
    return spec.input is not None or spec.output is not None


def bake_sparse_weights(handle: SparsityHandle) -> list[str]:
    """Turn a sparsified model into a dense one computing the same forward weights, in place:
    ``handle.remove(bake=True)`` (every sparse layer's weight overwritten by the weight its forward uses -- SWAT's
    top-K, a random channel mask -- and the plain ``nn.Conv2d``/``nn.Linear`` put back). This is how a
    sparse-trained run is measured "as trained" and thresholds enforced on top.

    Returns:
        The layers whose forward also sparsified activations (``input``/``output`` operands): that part of the
        inference function is not kept by baking.
    """
    lost = [name for name, spec in handle.layers.items() if _reads_activations(spec)]
    handle.remove(bake=True)
    return lost


def inference_model(run: Any, dense: bool = False) -> nn.Module:
    """A loaded run's model (:func:`sparsetrain.runs.load_run`) as trained, as a dense module: the recipe's forward
    weights baked in (``dense=True`` or a dense recipe: the stored weights as they are)."""
    model = run.model
    if dense or run.config.get("recipe") in (None, "dense"):
        return model
    lost = bake_sparse_weights(run.sparsify())
    if lost:
        logger.warning("the run's recipe also sparsifies forward activations of %s; measured without that "
                       "(only its forward weights are kept)", ", ".join(lost))
    return model


class Evaluator:
    """``evaluator(model) -> top-1 accuracy`` over (the first ``max_batches`` batches of) ``loader``.

    The model is put in eval mode and run under ``torch.no_grad()`` (its mode is restored afterwards). With
    ``cache`` the batches are materialised on the first call and reused (a search evaluates the same batches
    dozens of times); this holds them in memory.

    Args:
        loader: yields ``(images, labels)``.
        max_batches: cap on the batches used (``None`` = all): the knob that bounds a search's cost.
        device: move batches there (the model must already be on it).
        cache: keep the batches between calls.

    Attributes:
        num_samples: images evaluated by the last call (``None`` before the first).
    """

    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        max_batches: int | None = None,
        device: torch.device | str | None = None,
        cache: bool = True,
    ) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.loader = loader
        self.max_batches = max_batches
        self.device = device
        self.cache = cache
        self.num_samples: int | None = None
        self._cached: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache and self._cached:
            yield from self._cached
            return
        for i, (x, y) in enumerate(self.loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if self.device is not None:
                x, y = x.to(self.device), y.to(self.device)
            if self.cache:
                self._cached.append((x, y))
            yield x, y

    def __call__(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.long)
        total = 0
        try:
            with torch.no_grad():
                for x, y in self._batches():
                    # Accumulate on the device; one host sync at the end.
                    correct = correct.to(y.device) + (model(x).argmax(1) == y).sum()
                    total += len(y)
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("the evaluation loader yielded no samples")
        self.num_samples = total
        return int(correct) / total


def make_evaluator(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    cache: bool = True,
) -> Evaluator:
    """Shorthand for :class:`Evaluator` (``evaluate(model) -> accuracy``)."""
    return Evaluator(loader, max_batches=max_batches, device=device, cache=cache)


def halving_search(
    accuracy_at: Callable[[float], float],
    baseline: float,
    margin: float = DEFAULT_MARGIN,
    start: float = 1.0,
    min_threshold: float = 1e-5,
) -> tuple[float | None, list[tuple[float, float]]]:
    """TensorQuant's halving: the first of ``start, start/2, ...`` (>= ``min_threshold``) with acc/baseline >= margin.

    Args:
        accuracy_at: accuracy with the threshold applied.
        baseline: accuracy without any threshold (> 0).
        margin: required ``accuracy / baseline`` (default 1.0: accuracy unchanged, TensorQuant's scripts).
        start: first threshold tried.
        min_threshold: stop (and give up) once the threshold falls below this.

    Returns:
        ``(threshold or None, [(threshold, accuracy), ...] tried)``; ``None`` = cannot be sparsified.
    """
    if not baseline > 0:
        raise ValueError(f"baseline accuracy must be > 0 to define a relative margin, got {baseline}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if not (start > 0 and min_threshold > 0 and math.isfinite(start)):
        raise ValueError(f"start and min_threshold must be positive, got start={start}, min_threshold={min_threshold}")
    tried: list[tuple[float, float]] = []
    thr = float(start)
    while thr >= min_threshold:
        acc = float(accuracy_at(thr))
        tried.append((thr, acc))
        if acc / baseline >= margin:
            return thr, tried
        thr /= 2.0
    return None, tried


@dataclass
class LayerSearch:
    """The search's outcome for one layer.

    Attributes:
        name: layer name.
        numel: elements of the operand (weight) or per evaluated image (input).
        threshold: the threshold found, ``None`` if the layer cannot be sparsified.
        accuracy: accuracy with this threshold alone (``None`` if none found).
        sparsity: operand sparsity with this threshold alone (``None`` if none found).
        baseline_sparsity: exact-zero sparsity without threshold.
        tried: every ``(threshold, accuracy)`` evaluated, in order.
    """

    name: str
    numel: int
    threshold: float | None
    accuracy: float | None
    sparsity: float | None
    baseline_sparsity: float
    tried: list[tuple[float, float]] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.tried)


@dataclass
class ThresholdSearchResult:
    """Per-layer thresholds and the combined effect (see :func:`search_thresholds`).

    Attributes:
        operand: ``"weight"`` or ``"input"``.
        margin: the accuracy margin.
        baseline_accuracy: accuracy of the untouched model.
        layers: per-layer results, in model order.
        combined_accuracy: accuracy with every found threshold applied at once.
        combined_sparsity: layer name -> operand sparsity with every threshold applied.
        combined_total_sparsity: element-weighted operand sparsity over all searched layers, all thresholds applied.
        baseline_total_sparsity: the same without thresholds.
        combined_records: telemetry records of the combined evaluation (layers, blocks, total).
    """

    operand: str
    margin: float
    baseline_accuracy: float
    layers: dict[str, LayerSearch]
    combined_accuracy: float
    combined_sparsity: dict[str, float]
    combined_total_sparsity: float
    baseline_total_sparsity: float
    combined_records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def thresholds(self) -> dict[str, float]:
        """Layer name -> found threshold (layers that cannot be sparsified are left out)."""
        return {n: r.threshold for n, r in self.layers.items() if r.threshold is not None}

    @property
    def unsparsifiable(self) -> list[str]:
        """Layers for which no threshold >= the minimum held the margin."""
        return [n for n, r in self.layers.items() if r.threshold is None]

    def to_recipe(self) -> dict[str, Any]:
        """Recipe dict applying the found thresholds; unsparsifiable layers are listed as ``null`` (dense)."""
        return threshold_recipe({n: r.threshold for n, r in self.layers.items()}, self.operand)

    def to_yaml(self) -> str:
        """The recipe as YAML, with a comment header stating how it was found."""
        import yaml

        head = [
            f"# TensorQuant per-layer threshold search on the {self.operand} operand (sparsetrain measure --search).",
            f"# margin {self.margin}: baseline accuracy {self.baseline_accuracy:.4f}, with all thresholds "
            f"{self.combined_accuracy:.4f} ({self.combined_accuracy / self.baseline_accuracy:.4f} of baseline).",
            f"# {self.operand} sparsity {self.baseline_total_sparsity:.4f} -> {self.combined_total_sparsity:.4f}; "
            f"null = cannot be sparsified (no threshold >= 1e-5 held the margin).",
        ]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.to_recipe(), sort_keys=False)

    def save_recipe(self, path: str | Path) -> Path:
        """Write :meth:`to_yaml` to ``path``; returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_yaml())
        return p

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), records excluded."""
        return {
            "operand": self.operand,
            "margin": self.margin,
            "baseline_accuracy": self.baseline_accuracy,
            "combined_accuracy": self.combined_accuracy,
            "baseline_total_sparsity": self.baseline_total_sparsity,
            "combined_total_sparsity": self.combined_total_sparsity,
            "layers": {
                n: {
                    "numel": r.numel,
                    "threshold": r.threshold,
                    "accuracy_alone": r.accuracy,
                    "sparsity_alone": r.sparsity,
                    "baseline_sparsity": r.baseline_sparsity,
                    "combined_sparsity": self.combined_sparsity.get(n),
                    "evaluations": r.evaluations,
                }
                for n, r in self.layers.items()
            },
        }


def _operand_sparsity(records: Sequence[Mapping[str, Any]], operand: str, near: bool) -> dict[str, tuple[int, float]]:
    """layer -> (numel, sparsity) of ``operand`` (near-zero sparsity if ``near`` and available)."""
    out = {}
    for r in records:
        if r["kind"] == "layer" and r["tensor"] == operand:
            s = r["near_zero_sparsity"] if near and r["near_zero_sparsity"] is not None else r["sparsity"]
            out[r["name"]] = (r["numel"], s)
    return out


def search_thresholds(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    operand: str = "weight",
    layers: Sequence[str] | None = None,
    margin: float = DEFAULT_MARGIN,
    start: float = 1.0,
    min_threshold: float = 1e-5,
) -> ThresholdSearchResult:
    """Per-layer halving threshold search, then all thresholds at once (TensorQuant §3.1).

    Args:
        model: a trained dense model; it is not modified (each trial sparsifies a deep copy).
        evaluate: ``evaluate(model) -> accuracy`` (e.g. :func:`make_evaluator`); bound its cost with a small
            evaluation set.
        operand: ``"weight"`` or ``"input"`` (the consumed activation; see the module docstring).
        layers: layers to search (default: every conv/linear; for ``"input"`` every one but the first).
        margin: required ``accuracy / baseline`` for each layer alone (default 1.0: accuracy unchanged).
        start: first threshold of every layer.
        min_threshold: a layer whose threshold would fall below this cannot be sparsified.

    Returns:
        A :class:`ThresholdSearchResult`; ``result.save_recipe(path)`` writes a recipe ``sparsify_`` loads.
    """
    _check_operand(operand)
    ensure_dense(model)
    all_layers = list(monitored_layers(model))
    if layers is None:
        layers = all_layers[1:] if operand == "input" else all_layers
    else:
        monitored_layers(model, layers)  # validates the names
        layers = [n for n in all_layers if n in set(layers)]
    if not layers:
        raise ValueError("no layer to search")
    baseline, base_records = evaluate_with_monitor(model, evaluate, layers=all_layers, blocks=None)
    # Activation element counts are reported per image when the evaluator says how many images it used.
    numel_div = (getattr(evaluate, "num_samples", None) or 1) if operand == "input" else 1
    base_sp = _operand_sparsity(base_records, operand, near=False)
    logger.info("threshold search (%s, margin %s): baseline accuracy %.4f", operand, margin, baseline)

    results: dict[str, LayerSearch] = {}
    for name in layers:
        alone_sparsity: dict[float, float] = {}

        def accuracy_at(thr: float, name: str = name) -> float:
            trial = apply_thresholds(model, **{operand: {name: thr}})
            if operand == "weight":
                acc = evaluate(trial)
                w = dict(trial.named_modules())[name].weight.detach()
                alone_sparsity[thr] = float((w.abs() <= thr).sum()) / w.numel()
            else:
                acc, recs = evaluate_with_monitor(trial, evaluate, near_zero_threshold={"input": thr}, layers=[name],
                                                  blocks=None)
                alone_sparsity[thr] = _operand_sparsity(recs, "input", near=True)[name][1]
            return acc

        thr, tried = halving_search(accuracy_at, baseline, margin, start, min_threshold)
        numel = base_sp[name][0] // numel_div if name in base_sp else 0
        acc = dict(tried)[thr] if thr is not None else None
        results[name] = LayerSearch(name, numel, thr, acc, alone_sparsity.get(thr) if thr is not None else None,
                                    base_sp.get(name, (0, 0.0))[1], tried)
        if thr is None:
            logger.info("  %-24s cannot be sparsified (%d evaluations)", name, len(tried))
        else:
            logger.info("  %-24s thr %.3g: accuracy %.4f, sparsity %.4f (%d evaluations)", name, thr, acc,
                        results[name].sparsity, len(tried))

    found = {n: r.threshold for n, r in results.items() if r.threshold is not None}
    combined = apply_thresholds(model, **{operand: found})
    thr_fn = (lambda n, t: found.get(n) if t == operand else None)  # noqa: E731
    comb_acc, comb_records = evaluate_with_monitor(combined, evaluate, near_zero_threshold=thr_fn)
    comb_sp = _operand_sparsity(comb_records, operand, near=True)
    searched = [n for n in layers if n in comb_sp]

    def total(sp: Mapping[str, tuple[int, float]]) -> float:
        n = sum(sp[k][0] for k in searched)
        return sum(sp[k][0] * sp[k][1] for k in searched) / n if n else 0.0

    result = ThresholdSearchResult(
        operand=operand,
        margin=margin,
        baseline_accuracy=baseline,
        layers=results,
        combined_accuracy=comb_acc,
        combined_sparsity={n: comb_sp[n][1] for n in searched},
        combined_total_sparsity=total(comb_sp),
        baseline_total_sparsity=total(base_sp),
        combined_records=comb_records,
    )
    logger.info("all thresholds at once: accuracy %.4f (%.4f of baseline), %s sparsity %.4f -> %.4f", comb_acc,
                comb_acc / baseline, operand, result.baseline_total_sparsity, result.combined_total_sparsity)
    return result

