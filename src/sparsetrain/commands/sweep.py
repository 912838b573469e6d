"""``sparsetrain sweep``: train one run per (parameter point, seed) and tabulate accuracy over seeds.

Each point is an ordinary ``sparsetrain train`` run directory below the sweep folder; a point whose run has a
summary is finished and skipped on a rerun, one with a checkpoint but no summary (interrupted) is resumed. At the
end the sweep folder gets a table (Markdown and CSV: mean +- sample SD of the final test accuracy over seeds, weight
density, training FLOPs reduction) and a plot of accuracy against the swept parameter.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "train a recipe over a grid of parameter values and seeds; tabulate and plot accuracy (mean ± SD over seeds)"

#: The sweep folder's own files (each point's run directory keeps the run-directory format of sparsetrain.runs).
TABLE_MARKDOWN = "sweep.md"
TABLE_CSV = "sweep.csv"
PLOT = "sweep_accuracy.png"

# TrainConfig keys a --param may not sweep: the sweep owns them (seeds: --seeds; run directories: --out).
_RESERVED = ("out", "seed", "recipe_overrides", "quiet")

log = logging.getLogger("sparsetrain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sparsetrain.commands import train

    g = p.add_argument_group("sweep")
    g.add_argument("--param", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept setting: a recipe key (density, sparsity, threshold_period, p, ...) or a train "
                        "config key (lr, epochs, ...); values are YAML-typed; repeat for a grid")
    g.add_argument("--seeds", type=int, default=1, help="seeds per point: --seed, --seed+1, ... (default 1)")
    train.add_arguments(p)
    # The train flags keep their meaning, except the ones the sweep owns.
    for action in p._actions:
        if action.dest == "out":
            action.help = "sweep folder, one run directory per point and seed inside (default runs/sweep-<recipe>-<time>)"
        elif action.dest == "seed":
            action.help = "first seed (default 0)"
        elif action.dest == "resume":
            action.help = "not used: rerunning a sweep with the same --out resumes interrupted points by itself"


@dataclass
class Point:
    """One point of the grid and the run directories of its seeds."""

    values: dict[str, Any]
    runs: list[Any] = field(default_factory=list)  # RunDir per seed


def parse_params(items: list[str]) -> dict[str, list[Any]]:
    """``["density=0.5,0.7"]`` -> ``{"density": [0.5, 0.7]}`` (YAML-typed values, keys validated).

    Raises:
        UsageError: malformed item, repeated key, unknown key (the message lists the valid keys).
    """
    import yaml

    from sparsetrain.commands._errors import UsageError

    recipe_keys, train_keys = _valid_keys()
    params: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UsageError(f"--param expects KEY=V1,V2,..., got {item!r}")
        if key in params:
            raise UsageError(f"--param {key} is given twice: list all its values in one --param {key}=V1,V2,...")
        if key not in recipe_keys and key not in train_keys:
            raise UsageError(f"--param {key}: unknown key; valid recipe keys: {', '.join(recipe_keys)}; valid train "
                             f"keys: {', '.join(train_keys)}")
        values = []
        for part in text.split(","):
            try:
                values.append(yaml.safe_load(part.strip()))
            except yaml.YAMLError:
                raise UsageError(f"--param {key}: value {part.strip()!r} is not a valid YAML scalar") from None
        if len(set(map(repr, values))) != len(values):
            raise UsageError(f"--param {key}: repeated value in {text!r}")
        params[key] = values
    return params


def _valid_keys() -> tuple[list[str], list[str]]:
    from sparsetrain.recipe import GLOBAL_KEYS
    from sparsetrain.training import TrainConfig

    recipe_keys = [k for k in GLOBAL_KEYS if k not in ("preset", "layers", "stack")]
    train_keys = [k for k in TrainConfig.fields() if k not in _RESERVED and k not in recipe_keys]
    return recipe_keys, train_keys


def point_config(base: dict[str, Any], values: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """The train config of one point and seed: recipe keys go to ``recipe_overrides``, the others to the config."""
    recipe_keys, _ = _valid_keys()
    cfg = dict(base)
    overrides = dict(cfg.get("recipe_overrides") or {})
    for key, value in values.items():
        if key in recipe_keys:
            if key in ("density", "sparsity"):  # one setting: the swept one replaces the other
                overrides.pop("sparsity" if key == "density" else "density", None)
            overrides[key] = value
        else:
            cfg[key] = value
    cfg["recipe_overrides"] = overrides
    cfg["seed"] = seed
    cfg["out"] = str(out)
    return cfg


def _fmt(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def run_name(values: dict[str, Any], seed: int) -> str:
    """The run directory's name of a point and seed, e.g. ``density-0.5_seed-0``."""
    return "_".join([f"{k}-{_fmt(v)}" for k, v in values.items()] + [f"seed-{seed}"])


def summarize_points(points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: values, seeds finished, accuracy mean/SD, mean weight density and FLOPs reduction."""
    from sparsetrain.reporting.tables import mean_sd

    rows = []
    for pt in points:
        summaries = [s for s in (r.read_summary() for r in pt.runs) if s is not None]
        accs = [s["final_test_acc"] for s in summaries if isinstance(s.get("final_test_acc"), (int, float))]
        wd = [s["weight_density"] for s in summaries if isinstance(s.get("weight_density"), (int, float))]
        fr = [s["flops"]["training_flops_reduction_pct"] for s in summaries
              if isinstance((s.get("flops") or {}).get("training_flops_reduction_pct"), (int, float))]
        acc_mean, acc_sd = mean_sd(accs) if accs else (None, None)
        rows.append({
            **pt.values, "n_seeds": len(accs), "test_acc_mean": acc_mean, "test_acc_sd": acc_sd,
            "weight_density_mean": mean_sd(wd)[0] if wd else None,
            "training_flops_reduction_pct_mean": mean_sd(fr)[0] if fr else None,
        })
    return rows


def _train_job(run, cfg: dict[str, Any], command: str, tag: str) -> str:
    """Train or resume one job; ``"done"``, ``"interrupted"`` or ``"diverged: <message>"``."""
    from sparsetrain.training import NonFiniteError, TrainConfig, TrainingInterrupted, train

    try:
        if run.has_checkpoint():
            log.info("%s %s: resuming", command, tag)
            train(TrainConfig(quiet=bool(cfg.get("quiet"))), resume=run.path, epochs=cfg.get("epochs"))
        else:
            log.info("%s %s: training", command, tag)
            train(TrainConfig.from_dict(cfg))
    except TrainingInterrupted as e:
        return f"interrupted: {e}"
    except NonFiniteError as e:
        log.error("%s %s: %s", command, tag, e)
        return f"diverged: {e}"
    return "done"


_STOP: list = [None]  # in a worker process: the pool's shared stop event


def _worker_init(stop) -> None:
    """A worker ignores Ctrl-C between jobs (it would die in the pool's queue); :func:`_worker_job` takes it."""
    import signal

    _STOP[0] = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_job(run_path: str, cfg: dict[str, Any], command: str, tag: str, threads: int | None) -> str:
    """A job in a worker process (spawned: a fresh interpreter, so nothing of the parent's torch state leaks in)."""
    import signal

    import torch

    from sparsetrain.runs import RunDir

    stop = _STOP[0]
    if stop is not None and stop.is_set():
        return "interrupted: not started"  # queued before Ctrl-C reached the pool

    def on_sigint(signum, frame):  # Ctrl-C reaches the whole process group: stop the pool, checkpoint this run
        if stop is not None:
            stop.set()
        raise KeyboardInterrupt

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, on_sigint)  # the training loop turns it into a checkpoint + TrainingInterrupted
    try:
        return _train_job(RunDir(run_path), cfg, command, tag)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(jobs: list[tuple[Any, dict[str, Any]]], command: str = "sweep", workers: int = 1,
             threads: int | None = None) -> tuple[bool, list[str]]:
    """Train every job ``(RunDir, train config)``: skip finished runs, resume interrupted ones.

    A run with a summary is finished; one with a checkpoint but no summary was interrupted and is resumed from it;
    any other is trained from scratch. A run that stops on NaN/Inf is logged and the next job starts.

    Args:
        jobs: ``(run directory, config dict)`` pairs, the config as :meth:`TrainConfig.from_dict` takes it.
        command: the CLI command named in progress lines and in the interruption message.
        workers: how many runs train at once. 1 trains them in this process, in order; more start that many worker
            processes (``spawn``), each taking the next job when its run ends (jobs are independent run directories,
            so the results do not depend on the order). Give each worker ``threads`` so workers x threads <= cores.
        threads: torch CPU threads of each worker process (``workers > 1``; the caller sets its own otherwise).

    Returns:
        ``(interrupted, diverged)``: True when Ctrl-C stopped the jobs (the message saying how to continue is
        printed), and the names of the run directories that stopped on NaN/Inf.
    """
    todo = []
    for i, (run, cfg) in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}] {run.path.name}"
        if run.read_summary() is not None:
            log.info("%s %s: finished, skipped", command, tag)
        else:
            todo.append((run, cfg, tag))
    outcomes: list[tuple[Any, str]] = []
    if workers <= 1 or len(todo) <= 1:
        for run, cfg, tag in todo:
            outcome = _train_job(run, cfg, command, tag)
            outcomes.append((run, outcome))
            if outcome.startswith("interrupted"):
                break
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                 initargs=(stop,)) as pool:
            futures = [(run, pool.submit(_worker_job, str(run.path), cfg, command, tag, threads))
                       for run, cfg, tag in todo]
            try:
                for run, fut in futures:
                    outcome = fut.result()
                    if outcome != "interrupted: not started":
                        outcomes.append((run, outcome))
                    if outcome.startswith("interrupted"):
                        stop.set()  # no queued job starts; the running ones got the same SIGINT
            except KeyboardInterrupt:  # the workers got the same SIGINT and checkpoint their runs
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                outcomes.append((None, "interrupted: Ctrl-C"))
    diverged = [run.path.name for run, o in outcomes if o.startswith("diverged")]
    stopped = [(run, o) for run, o in outcomes if o.startswith("interrupted")]
    if stopped:
        where = ", ".join(str(run.path) for run, _ in stopped if run is not None) or "the running jobs"
        print(f"\nsparsetrain {command}: interrupted in {where} ({stopped[0][1][len('interrupted: '):]}); rerun the "
              "same command to continue: finished points are skipped, this one resumes", file=sys.stderr)
        return True, diverged
    return False, diverged


def _default_out(recipe: Any) -> Path:
    from sparsetrain.runs import RunDir

    tag = Path(str(recipe)).stem if isinstance(recipe, str) else "custom"
    return Path(RunDir.DEFAULT_PARENT) / f"sweep-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(args: argparse.Namespace) -> int:
    """Train every missing point, then write the table and the plot; 0 when all points finished, 3 if one diverged,
    130 on Ctrl-C (rerun the same command to continue)."""
    from sparsetrain.cli import EXIT_INTERRUPTED, EXIT_NONFINITE
    from sparsetrain.commands._errors import UsageError
    from sparsetrain.commands.train import resolve_config
    from sparsetrain.recipe import Recipe
    from sparsetrain.runs import RunDir
    from sparsetrain.training import TrainConfig
    from sparsetrain.training.config import check_same_config

    if args.resume:
        raise UsageError("sweep has no --resume: rerun the same sweep command (same --out) and it resumes "
                         "interrupted points and skips finished ones")
    if args.recipe is None:
        raise UsageError("sweep needs --recipe (a preset or recipe; see `sparsetrain list recipes`)")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.param:
        raise UsageError("sweep needs at least one --param KEY=V1,V2,... (e.g. --param density=0.5,0.7,0.9)")
    params = parse_params(args.param)
    keys = list(params)
    base = resolve_config(args)
    out = Path(args.out) if args.out else _default_out(args.recipe)  # base["recipe"] may be a file's content
    first_seed = int(base.get("seed") or 0)
    seeds = list(range(first_seed, first_seed + args.seeds))

    # Validate every point before training any: a bad value must not surface after an hour of training.
    points: list[Point] = []
    jobs: list[tuple[Any, dict[str, Any]]] = []
    for combo in itertools.product(*params.values()):
        pt = Point(dict(zip(keys, combo)))
        for seed in seeds:
            run = RunDir(out / run_name(pt.values, seed))
            cfg = point_config(base, pt.values, seed, run.path)
            try:
                tc = TrainConfig.from_dict(cfg)
                Recipe.load(tc.recipe, **(tc.recipe_overrides or {}))
            except ValueError as e:
                where = ", ".join(f"{k}={v}" for k, v in pt.values.items())
                raise UsageError(f"point {where}: {e}") from None
            if run.is_run():
                check_same_config(run, cfg)
            pt.runs.append(run)
            jobs.append((run, cfg))
        points.append(pt)

    out.mkdir(parents=True, exist_ok=True)
    interrupted, diverged = run_jobs(jobs, "sweep")
    if interrupted:
        return EXIT_INTERRUPTED

    from sparsetrain.reporting.sweep_results import plot_accuracy, table_csv, table_markdown

    rows = summarize_points(points)
    title = f"sweep of {Path(str(args.recipe)).stem}: {', '.join(keys)}"
    (out / TABLE_MARKDOWN).write_text(table_markdown(rows, keys, title), encoding="utf-8")
    (out / TABLE_CSV).write_text(table_csv(rows, keys), encoding="utf-8")
    try:
        plot = plot_accuracy(rows, keys, out / PLOT, title)
    except ImportError as e:  # matplotlib is optional: the tables are the result, the plot a convenience
        log.warning("sweep: no plot (%s)", str(e).splitlines()[0])
        plot = None
    print(table_markdown(rows, keys, title))
    print(f"sparsetrain sweep: {len(jobs)} runs in {out}; table {out / TABLE_MARKDOWN}, {out / TABLE_CSV}"
          + (f", plot {plot}" if plot else ""))
    if diverged:
        print(f"sparsetrain sweep: {len(diverged)} run(s) stopped on NaN/Inf: {', '.join(diverged)}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0
