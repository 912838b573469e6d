"""The four papers' core experiments at CPU scale (`sparsetrain reproduce`): experiment files, their runs, and the
results record.

An *experiment* is a versioned YAML file shipped in ``sparsetrain/experiments/`` (one per paper): the protocol (the
train config every point shares), a ``quick`` variant of it, the grid of points (each a set of train-config
overrides, e.g. a recipe and its density), the seeds, optional post-training analyses and the published numbers to
print beside ours. :func:`load_experiment` validates it completely before anything is trained.

Every point and seed is an ordinary ``sparsetrain train`` run directory below the output folder, trained by the
sweep machinery (:func:`sparsetrain.commands.sweep.run_jobs`): a rerun skips finished runs and resumes interrupted
ones. :func:`collect_results` then reads the run directories into one JSON-able record (``reproduce.json``) that
holds every number the tables and plots show, so they can be regenerated from ``results/<paper>/`` alone
(:mod:`sparsetrain.reporting.results`, ``sparsetrain report results/<paper>``).

Example:
    >>> exp = load_experiment("swat")  # doctest: +SKIP
    >>> [p.name for p in exp.points][:3]  # doctest: +SKIP
    ['dense', 'swat-u-80', 'swat-u-90']
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sparsetrain.formatting import finite_float

__all__ = [
    "EXPERIMENT_VERSION",
    "RESULTS_FORMAT",
    "ExperimentError",
    "Experiment",
    "ExperimentPoint",
    "list_experiments",
    "experiment_path",
    "load_experiment",
    "parse_experiment",
    "point_jobs",
    "matched_width_mult",
    "resolve_widths",
    "run_record",
    "measure_run",
    "collect_results",
    "refresh_record",
]

log = logging.getLogger(__name__)

#: The experiment-file format this code reads (the ``version:`` key of every file in ``experiments/``).
EXPERIMENT_VERSION = 1
#: Version of the results record (``reproduce.json``).
RESULTS_FORMAT = 1
#: The results record's file name in a results folder.

_TOP_KEYS = ("version", "paper", "title", "reference", "protocol", "quick", "seeds", "points", "analyses", "published",
             "notes")
_REQUIRED_TOP = ("version", "paper", "title", "protocol", "points")
_POINT_KEYS = ("name", "label", "group", "config", "seeds", "width_mult_match", "measure", "paper_gap", "compare_with")
# The experiment owns these train-config keys: run directories come from --out, seeds from the point.
_RESERVED_CONFIG = ("out", "seed", "quiet")
_ANALYSES = ("measure",)
_MEASURE_KEYS = ("search", "margin", "test_subset", "batch_size")
# Telemetry tensors the results record keeps per layer (the gradients); the others are not used by any table.
_TELEMETRY_TENSORS = ("grad_weight", "grad_output", "grad_input")
_TELEMETRY_POINTS = 60


class ExperimentError(ValueError):
    """An experiment file is missing, malformed or names an unknown setting; the message names file and key."""


@dataclass(frozen=True)
class ExperimentPoint:
    """One point of an experiment's grid.

    Attributes:
        name: run-directory stem and key in the results (unique in the experiment).
        label: what the tables print (default: the name).
        group: the table block the point belongs to (e.g. a model), or "".
        config: train-config overrides of the protocol (``recipe``, ``recipe_overrides``, ``model``, ``l1``, ...).
        seeds: the seeds this point is trained with.
        width_mult_match: the name of a point whose non-zero parameter count (excluding the classifier) this dense
            point's ``width_mult`` is chosen to match (Changpinyo's equal-parameter comparison), or None.
        measure: run the experiment's ``measure`` analysis on this point's runs.
        paper_gap: the accuracy change to dense the paper publishes for the setting this point stands for, in
            percentage points, keyed by the paper's row (e.g. ``{"VGG-16, Table 2": -1.35}``); empty when the paper
            states none. The tables print it beside our gap and say whether our 95 % interval contains it.
        compare_with: the name of another point this one is an ablation of (e.g. ``swat-u-90``): the tables give
            the accuracy difference to it with its 95 % interval, besides the gap to dense.
    """

    name: str
    label: str
    group: str
    config: dict[str, Any]
    seeds: tuple[int, ...]
    width_mult_match: str | None = None
    measure: bool = False
    paper_gap: dict[str, float] = field(default_factory=dict)
    compare_with: str | None = None


@dataclass
class Experiment:
    """A validated experiment file (see the module docstring)."""

    paper: str
    version: int
    title: str
    reference: str
    protocol: dict[str, Any]
    quick: dict[str, Any]
    points: list[ExperimentPoint]
    analyses: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: str = ""

    def base_config(self, quick: bool = False, data_dir: str | None = None) -> dict[str, Any]:
        """The protocol as a full train-config dict (``quick`` applies the smoke-test overrides)."""
        from sparsetrain.training import TrainConfig

        cfg = {**TrainConfig().to_dict(), "recipe_overrides": {}, **copy.deepcopy(self.protocol)}
        if quick:
            cfg.update(copy.deepcopy(self.quick))
        if data_dir is not None:
            cfg["data_dir"] = str(data_dir)
        return cfg

    def point_config(self, point: ExperimentPoint, base: dict[str, Any], quick: bool = False) -> dict[str, Any]:
        """A point's train config: the protocol ``base``, the point's overrides, then (``quick``) the smoke-test
        overrides, which win over the point's so a point that trains on a whole dataset is tiny in --quick too."""
        cfg = {**copy.deepcopy(base), **copy.deepcopy(point.config)}
        if quick:
            cfg.update(copy.deepcopy(self.quick))
        return cfg

    def point(self, name: str) -> ExperimentPoint:
        """The point called ``name``."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"no point {name!r}; points: {', '.join(p.name for p in self.points)}")


# ---------------------------------------------------------------------------------------------- experiment files
def list_experiments() -> list[str]:
    """Names of the shipped experiments (the papers ``sparsetrain reproduce`` knows), sorted."""
    folder = resources.files("sparsetrain") / "experiments"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def experiment_path(paper: str) -> Path:
    """The shipped experiment file of ``paper``.

    Raises:
        ExperimentError: no such experiment (the message lists the valid names).
    """
    names = list_experiments()
    if paper not in names:
        raise ExperimentError(f"unknown paper {paper!r}; valid choices: {', '.join(names)}")
    return Path(str(resources.files("sparsetrain") / "experiments" / f"{paper}.yaml"))


def load_experiment(paper_or_path: str | Path) -> Experiment:
    """Load and validate an experiment: a shipped name (``swat``, ``grad-prune``, ...) or a YAML path.

    Raises:
        ExperimentError: unknown name, unreadable or malformed file, or an invalid setting (file and key named).
    """
    import yaml

    p = Path(paper_or_path)
    path = p if p.suffix in (".yaml", ".yml") and p.is_file() else experiment_path(str(paper_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ExperimentError(f"{path}: cannot read the experiment file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ExperimentError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return parse_experiment(data, source=str(path))


def _fail(source: str, message: str) -> ExperimentError:
    return ExperimentError(f"{source}: {message}")


def _seeds(value: Any, source: str, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise _fail(source, f"{where}seeds: a count must be >= 1, got {value}")
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise _fail(source, f"{where}seeds: repeated seed in {value}")
        return tuple(value)
    raise _fail(source, f"{where}seeds must be a count (e.g. 2) or a list of integers (e.g. [0, 1]), got {value!r}")


def _check_config(cfg: dict[str, Any], source: str, where: str) -> None:
    """A point's full train config must be a valid TrainConfig with a loadable recipe."""
    from sparsetrain.recipe import Recipe
    from sparsetrain.training import TrainConfig

    try:
        tc = TrainConfig.from_dict(cfg)
        Recipe.load(tc.recipe, **(tc.recipe_overrides or {}))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise _fail(source, f"{where}{e}") from None


def parse_experiment(data: Any, source: str = "<experiment>") -> Experiment:
    """Validate an experiment given as a dict (the parsed YAML); see :func:`load_experiment`.

    Raises:
        ExperimentError: the first problem found, with ``source`` and the key named.
    """
    from sparsetrain.training import TrainConfig

    if not isinstance(data, dict):
        raise _fail(source, f"an experiment file holds a mapping of {', '.join(_TOP_KEYS)}; got "
                            f"{type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise _fail(source, f"unknown key(s) {unknown}; valid keys: {', '.join(_TOP_KEYS)}")
    missing = [k for k in _REQUIRED_TOP if k not in data]
    if missing:
        raise _fail(source, f"missing key(s) {missing}; an experiment needs {', '.join(_REQUIRED_TOP)}")
    version = data["version"]
    if version != EXPERIMENT_VERSION:
        raise _fail(source, f"version {version!r} is not supported; this sparsetrain reads experiment files of "
                            f"version {EXPERIMENT_VERSION}")
    for key in ("paper", "title"):
        if not isinstance(data[key], str) or not data[key]:
            raise _fail(source, f"{key} must be a non-empty string, got {data[key]!r}")
    valid_cfg = [k for k in TrainConfig.fields() if k not in _RESERVED_CONFIG]
    for key in ("protocol", "quick"):
        block = data.get(key) or {}
        if not isinstance(block, dict):
            raise _fail(source, f"{key} must be a mapping of train-config keys, got {type(block).__name__}")
        bad = sorted(set(block) - set(valid_cfg))
        if bad:
            raise _fail(source, f"{key}: unknown train-config key(s) {bad}; valid keys: {', '.join(valid_cfg)}")
    default_seeds = _seeds(data.get("seeds", 1), source, "")

    analyses = data.get("analyses") or {}
    if not isinstance(analyses, dict) or set(analyses) - set(_ANALYSES):
        raise _fail(source, f"analyses: valid analyses are {', '.join(_ANALYSES)}, got {analyses!r}")
    measure = analyses.get("measure")
    if measure is not None:
        if not isinstance(measure, dict) or set(measure) - set(_MEASURE_KEYS):
            raise _fail(source, f"analyses.measure: valid keys are {', '.join(_MEASURE_KEYS)}, got {measure!r}")
        for op in measure.get("search", []):
            if op not in ("weight", "activation"):
                raise _fail(source, f"analyses.measure.search: {op!r} is not one of weight, activation")

    points_data = data["points"]
    if not isinstance(points_data, list) or not points_data:
        raise _fail(source, "points must be a non-empty list of points (each with name and config)")
    points: list[ExperimentPoint] = []
    # A recipe brings its own density: TrainConfig's default overrides (density 0.1 for its default recipe) must not
    # leak into the points, as `sparsetrain train --recipe R` drops them too.
    base = {**TrainConfig().to_dict(), "recipe_overrides": {}, **(data.get("protocol") or {})}
    for i, pd in enumerate(points_data):
        where = f"points[{i}]: "
        if not isinstance(pd, dict):
            raise _fail(source, f"{where}a point is a mapping with keys {', '.join(_POINT_KEYS)}")
        bad = sorted(set(pd) - set(_POINT_KEYS))
        if bad:
            raise _fail(source, f"{where}unknown key(s) {bad}; valid point keys: {', '.join(_POINT_KEYS)}")
        name = pd.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "/ \\"):
            raise _fail(source, f"{where}name must be a non-empty string without '/', '\\' or spaces, got {name!r}")
        if any(p.name == name for p in points):
            raise _fail(source, f"{where}name {name!r} is used twice")
        where = f"point {name}: "
        config = pd.get("config") or {}
        if not isinstance(config, dict):
            raise _fail(source, f"{where}config must be a mapping of train-config keys")
        bad = sorted(set(config) - set(valid_cfg))
        if bad:
            raise _fail(source, f"{where}unknown train-config key(s) {bad}; valid keys: {', '.join(valid_cfg)}")
        if pd.get("measure") and measure is None:
            raise _fail(source, f"{where}measure: true needs an analyses.measure section")
        match = pd.get("width_mult_match")
        if match is not None and not any(p.name == match for p in points):
            raise _fail(source, f"{where}width_mult_match {match!r} must name an earlier point; earlier points: "
                                f"{', '.join(p.name for p in points) or 'none'}")
        paper_gap = pd.get("paper_gap") or {}
        if not isinstance(paper_gap, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in paper_gap.items()):
            raise _fail(source, f"{where}paper_gap must map the paper's row to its accuracy change in percentage "
                                f"points, e.g. {{'VGG-16, Table 2': -1.35}}; got {paper_gap!r}")
        compare = pd.get("compare_with")
        if compare is not None and not any(p.name == compare for p in points):
            raise _fail(source, f"{where}compare_with {compare!r} must name an earlier point; earlier points: "
                                f"{', '.join(p.name for p in points) or 'none'}")
        _check_config({**base, **config}, source, where)
        if data.get("quick"):
            _check_config({**base, **config, **data["quick"]}, source, f"{where}(quick) ")
        points.append(ExperimentPoint(
            name=name, label=str(pd.get("label", name)), group=str(pd.get("group", "")), config=config,
            seeds=_seeds(pd["seeds"], source, where) if "seeds" in pd else default_seeds,
            width_mult_match=match, measure=bool(pd.get("measure", False)),
            paper_gap={k: float(v) for k, v in paper_gap.items()}, compare_with=compare,
        ))
    published = data.get("published") or {}
    if not isinstance(published, dict):
        raise _fail(source, "published must be a mapping (tables of the paper's numbers)")
    notes = data.get("notes") or []
    if isinstance(notes, str):
        notes = [notes]
    return Experiment(paper=data["paper"], version=version, title=data["title"], reference=str(data.get("reference",
                      "")), protocol=dict(data.get("protocol") or {}), quick=dict(data.get("quick") or {}),
                      points=points, analyses=analyses, published=published, notes=[str(n) for n in notes],
                      path=source)


# ---------------------------------------------------------------------------------------------- jobs
def _run_name(point: ExperimentPoint, seed: int) -> str:
    return f"{point.name}_seed-{seed}"


def matched_width_mult(model: str, dataset: str, target_params: float, *, lo: float = 0.05, hi: float = 1.0,
                       width_steps: int = 400) -> tuple[float, int]:
    """The depth multiplier whose dense model has the parameter count (excluding the classifier) closest to
    ``target_params`` (Changpinyo et al.'s equal-parameter comparison).

    Channel counts are ``ceil(c * width_mult)``, a step function, so the candidates ``lo..hi`` in ``width_steps``
    steps are counted exactly (the FLOP accounting's ``params_excl_classifier``) and the closest wins; the result is
    rounded to 3 decimals so run-directory names stay stable.

    Returns:
        ``(width_mult, params_excl_classifier of that model)``.
    """
    best: tuple[float, float, int] | None = None
    seen: dict[tuple, int] = {}
    for i in range(width_steps + 1):
        w = round(lo + (hi - lo) * i / width_steps, 3)
        params = _dense_params(model, dataset, w, seen)
        gap = abs(params - target_params)
        if best is None or gap < best[0]:
            best = (gap, w, params)
    assert best is not None
    return best[1], best[2]


def _build_model(model: str, dataset: str, width_mult: float | None):
    """The model as ``sparsetrain train`` builds it, and its per-sample input shape."""
    from sparsetrain.data import dataset_info
    from sparsetrain.models import create_model

    info = dataset_info(dataset)
    net = create_model(model, num_classes=info.num_classes, in_channels=info.channels, width_mult=width_mult)
    return net, (info.channels, info.image_size, info.image_size)


def _dense_params(model: str, dataset: str, width_mult: float, cache: dict[tuple, int]) -> int:
    from sparsetrain.accounting import count_flops

    net, shape = _build_model(model, dataset, width_mult)
    # Identical channel counts give identical models: count each once.
    key = tuple((n, tuple(p.shape)) for n, p in net.named_parameters())
    if key not in cache:
        cache[key] = int(count_flops(net, shape).totals(sparse=False)["params_excl_classifier"])
    return cache[key]


def sparse_params(cfg: dict[str, Any]) -> int:
    """Non-zero parameters (excluding the classifier) of a point's model under its recipe's nominal densities."""
    import torch

    from sparsetrain.accounting import count_flops
    from sparsetrain.handle import sparsify_

    torch.manual_seed(int(cfg.get("seed") or 0))
    net, shape = _build_model(cfg["model"], cfg["dataset"], cfg.get("width_mult"))
    handle = sparsify_(net, cfg.get("recipe"), **(cfg.get("recipe_overrides") or {}))
    rep = count_flops(net, shape, handle.nominal_densities())
    return int(round(rep.totals(sparse=True)["params_excl_classifier"]))


def resolve_widths(exp: Experiment, base: dict[str, Any], quick: bool = False) -> dict[str, dict[str, Any]]:
    """``{point: {"width_mult", "params", "target_params", "matches"}}`` for the points with ``width_mult_match``."""
    out: dict[str, dict[str, Any]] = {}
    for p in exp.points:
        if p.width_mult_match is None:
            continue
        ref = exp.point(p.width_mult_match)
        target = sparse_params(exp.point_config(ref, base, quick))
        cfg = exp.point_config(p, base, quick)
        w, params = matched_width_mult(cfg["model"], cfg["dataset"], target)
        out[p.name] = {"width_mult": w, "params": params, "target_params": target, "matches": ref.name}
        log.info("reproduce: %s: width_mult %.3f (%d parameters) matches %s (%d non-zero parameters)", p.name, w,
                 params, ref.name, target)
    return out


def point_jobs(exp: Experiment, out: Path, base: dict[str, Any], widths: dict[str, dict[str, Any]] | None = None,
               quick: bool = False) -> list[tuple[ExperimentPoint, int, Any, dict[str, Any]]]:
    """One job ``(point, seed, RunDir, train config)`` per point and seed, validated, in the file's order.

    Raises:
        ValueError: a run directory below ``out`` holds a run with a different config (choose another --out).
    """
    from sparsetrain.runs import RunDir
    from sparsetrain.training.config import check_same_config

    # Seed-major order: every point's first seed before any second seed, so a block stopped early (or completed over
    # several sittings) has the whole grid once before it has any repeat.
    order = sorted(((i, p, seed) for p in exp.points for i, seed in enumerate(p.seeds)),
                   key=lambda t: (t[0], exp.points.index(t[1])))
    jobs = []
    for _, p, seed in order:
        run = RunDir(out / _run_name(p, seed))
        cfg = {**exp.point_config(p, base, quick), "seed": seed, "out": str(run.path)}
        if widths and p.name in widths:
            cfg["width_mult"] = widths[p.name]["width_mult"]
        _check_config(cfg, exp.path, f"point {p.name}: ")
        if run.is_run():
            check_same_config(run, cfg)
        jobs.append((p, seed, run, cfg))
    return jobs


# ---------------------------------------------------------------------------------------------- collection
def _thin(steps: list[int], vals: list[float], n: int) -> tuple[list[int], list[float]]:
    if len(steps) <= n:
        return steps, vals
    idx = sorted({round(i * (len(steps) - 1) / (n - 1)) for i in range(n)})
    return [steps[i] for i in idx], [vals[i] for i in idx]


def _telemetry(run) -> dict[str, Any]:
    """Per-layer series of the gradient tensors: ``{tensor: {layer: {"steps", "sparsity", "numel"}}}`` (thinned)."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    numel: dict[str, dict[str, int]] = {}
    for rec in run.iter_telemetry():
        if rec.get("kind", "layer") != "layer" or rec.get("tensor") not in _TELEMETRY_TENSORS:
            continue
        try:
            tensor, name, step, sp = str(rec["tensor"]), str(rec["name"]), int(rec["step"]), float(rec["sparsity"])
        except (KeyError, TypeError, ValueError):
            continue
        steps, vals = series.setdefault(tensor, {}).setdefault(name, ([], []))
        while steps and steps[-1] >= step:  # a resumed run re-records the steps after its checkpoint
            steps.pop()
            vals.pop()
        steps.append(step)
        vals.append(sp)
        if isinstance(rec.get("numel"), int):
            numel.setdefault(tensor, {})[name] = rec["numel"]
    out: dict[str, Any] = {}
    for tensor, layers in series.items():
        out[tensor] = {}
        for name, (steps, vals) in layers.items():
            s, v = _thin(steps, vals, _TELEMETRY_POINTS)
            out[tensor][name] = {"steps": s, "sparsity": v, "numel": numel.get(tensor, {}).get(name)}
    return out


def run_record(run, *, all_ops: bool = True) -> dict[str, Any] | None:
    """The numbers of one finished run the tables use; None when the run has not finished.

    Keys: seed, epochs, final/best test accuracy, weight/activation density, the four FLOP figures, the dense and
    sparse parameter and MAC totals, the last epoch's per-layer densities (what the handle measured), training time,
    per-layer gradient telemetry, and, when ``all_ops``, the training/inference FLOPs reduction counting the
    non-GEMM work too (``count_flops(non_gemm=True)``).
    """
    summary = run.read_summary()
    if summary is None:
        return None
    metrics = run.read_metrics()
    flops = run.read_flops() or {}
    last = metrics[-1] if metrics else {}
    rec: dict[str, Any] = {
        "run": run.path.name,
        "seed": summary.get("seed"),
        "epochs": summary.get("epochs"),
        "final_test_acc": finite_float(summary.get("final_test_acc")),
        "best_test_acc": finite_float(summary.get("best_test_acc")),
        "weight_density": finite_float(summary.get("weight_density")),
        "activation_density": finite_float(summary.get("activation_density")),
        "flops": {k: finite_float(v) for k, v in (summary.get("flops") or {}).items()},
        "dense_totals": flops.get("dense_totals"),
        "sparse_totals": flops.get("sparse_totals"),
        "train_time_s": sum(m.get("time_s", 0.0) for m in metrics if isinstance(m.get("time_s"), (int, float))),
        "densities": last.get("densities") or {},
        "conv_layers": [r["name"] for r in flops.get("layers", []) if "conv" in str(r.get("type", "")).lower()],
        "test_acc_curve": [finite_float(m.get("test_acc")) for m in metrics],
        "telemetry": _telemetry(run),
    }
    if all_ops:
        rec["flops"].update(_all_ops(run, rec["densities"]))
    return rec


def _all_ops(run, densities: dict[str, Any]) -> dict[str, float | None]:
    """Training and inference FLOPs reduction with the non-GEMM work counted (BN, ReLU, pooling, top-K selection).

    Re-counted from the run's config and its last epoch's measured densities; cached in the run's folder-independent
    way by the caller (the results record). Empty when the accounting cannot count it.
    """
    from sparsetrain.accounting import count_flops
    from sparsetrain.handle import sparsify_

    try:
        cfg = run.read_config()
        net, shape = _build_model(cfg["model"], cfg["dataset"], cfg.get("width_mult"))
        sparsify_(net, cfg.get("recipe"), **(cfg.get("recipe_overrides") or {}))
        rep = count_flops(net, shape, densities or None, batch_size=int(cfg.get("batch_size") or 1),
                          non_gemm=True)
        return {"training_flops_reduction_pct_all_ops": finite_float(rep.training_flops_reduction_pct_all_ops),
                "inference_flops_reduction_pct_all_ops": finite_float(rep.inference_flops_reduction_pct_all_ops)}
    except (TypeError, AttributeError) as e:  # an accounting without non-GEMM counting: the column stays empty
        log.warning("reproduce: no non-GEMM FLOP count for %s (%s)", run.path.name, e)
        return {}


def measure_run(run, settings: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """TensorQuant's post-training analysis of one run: per-layer weight and activation sparsity, natural and after
    the per-layer halving threshold search (``sparsetrain measure --search``), with the accuracies.

    Args:
        run: the run directory.
        settings: the experiment's ``analyses.measure`` (``search``: operands to search, ``margin``, ``test_subset``,
            ``batch_size``).
        data_dir: data root (default: the run's).

    Returns:
        ``{"natural": report, "weight": {"search", "report"}, "activation": {...}}`` as plain data.
    """
    from sparsetrain.analysis import inference_model, make_evaluator, search_thresholds
    from sparsetrain.data import make_test_loader
    from sparsetrain.runs import load_run
    from sparsetrain.telemetry.inference import measure_sparsity

    loaded = load_run(run.path)
    model = inference_model(loaded).eval()
    subset = settings.get("test_subset", loaded.config.get("test_subset"))
    loader = make_test_loader(loaded.config["dataset"], data_dir or loaded.config.get("data_dir"),
                              int(settings.get("batch_size", 500)), subset=subset, device="cpu")
    evaluate = make_evaluator(loader)
    margin = float(settings.get("margin", 1.0))
    out: dict[str, Any] = {"margin": margin, "num_samples": loader.num_samples,
                           "natural": measure_sparsity(model, evaluate).to_dict()}
    for operand in settings.get("search", []):
        which = "weight" if operand == "weight" else "input"
        res = search_thresholds(model, evaluate, operand=which, margin=margin)
        kwargs = {"weight_thresholds": res.thresholds} if which == "weight" else {"act_thresholds": res.thresholds}
        out[operand] = {"search": res.to_dict(), "report": measure_sparsity(model, evaluate, **kwargs).to_dict()}
    return out


def collect_results(exp: Experiment, jobs: list[tuple[ExperimentPoint, int, Any, dict[str, Any]]], *,
                    quick: bool, base: dict[str, Any], widths: dict[str, dict[str, Any]], command: str,
                    analyses: dict[str, dict[str, Any]] | None = None, all_ops: bool = True) -> dict[str, Any]:
    """The results record of an experiment: protocol, every point's per-seed run records, analyses and the
    published numbers (everything :mod:`sparsetrain.reporting.results` renders)."""
    points = []
    for p in exp.points:
        runs = [run_record(run, all_ops=all_ops) for (q, _, run, _) in jobs if q.name == p.name]
        points.append({
            "name": p.name, "label": p.label, "group": p.group, "config": p.config, "seeds": list(p.seeds),
            "width": widths.get(p.name), "paper_gap": dict(p.paper_gap), "compare_with": p.compare_with,
            "runs": [r for r in runs if r is not None],
        })
    protocol = {k: v for k, v in base.items() if k not in ("data_dir",)}
    return {
        "format": RESULTS_FORMAT,
        "paper": exp.paper,
        "title": exp.title,
        "reference": exp.reference,
        "experiment_version": exp.version,
        "quick": quick,
        "command": command,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "protocol": protocol,
        "notes": exp.notes,
        "points": points,
        "analyses": analyses or {},
        "published": exp.published,
    }


def refresh_record(rec: dict[str, Any], exp: Experiment, keys: tuple[str, ...] = ("published",)) -> dict[str, Any]:
    """A results record with the experiment file's descriptive parts copied in: the record-level ``keys`` (e.g.
    ``published``, ``notes``) and, for every point of the record that the experiment still has (same name), its
    ``paper_gap`` and ``compare_with``. Runs, protocol and every measured number are left as they are, so a
    published number or a paper's gap corrected in the YAML reaches ``results/`` without retraining.

    Example:
        >>> rec = refresh_record(json.load(open("results/swat/reproduce.json")), load_experiment("swat"))  # doctest: +SKIP
    """
    out = copy.deepcopy(rec)
    for key in keys:
        if key not in ("published", "notes", "title", "reference"):
            raise ValueError(f"refresh_record copies published, notes, title or reference, not {key!r}")
        out[key] = copy.deepcopy(getattr(exp, key))
    by_name = {p.name: p for p in exp.points}
    for pt in out["points"]:
        p = by_name.get(pt["name"])
        if p is not None:
            pt["paper_gap"], pt["compare_with"] = dict(p.paper_gap), p.compare_with
    return out
