"""``sparsetrain reproduce PAPER``: rerun one paper's core experiment at CPU scale and tabulate it beside the paper.

The experiment (protocol, grid of points, seeds, published numbers) is a versioned YAML file shipped in
``sparsetrain/experiments/`` (``sparsetrain reproduce --list`` names them). Each point and seed is an ordinary
``sparsetrain train`` run directory below ``--out`` (default ``runs/reproduce-<paper>``); a rerun of the same command
skips finished runs and resumes interrupted ones, so a block can be completed over several sittings. At the end the
results folder (default ``results/<paper>``; with ``--quick``, ``<out>/results``) gets ``reproduce.json`` (every
number), ``tables.md``, CSV tables and PNG plots -- never checkpoints, which stay in the run directories.
``sparsetrain report results/<paper>`` regenerates the tables and plots from ``reproduce.json`` alone.

Examples:
    sparsetrain reproduce swat --quick                 # minutes: the same grid, tiny subsets, 1 epoch
    sparsetrain reproduce grad-prune --data-dir ../shared/data
    sparsetrain reproduce swat-convergence --jobs 2    # two runs at once, one thread each
    sparsetrain reproduce swat-convergence --collect   # tables from the runs finished so far
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["HELP", "add_arguments", "main"]

HELP = ("rerun a paper's core experiment at CPU scale (swat, grad-prune, tensorquant, channel, swat-convergence); "
        "tables beside the paper")

log = logging.getLogger("sparsetrain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``reproduce`` arguments."""
    p.add_argument("paper", nargs="?", metavar="PAPER",
                   help="experiment: swat, grad-prune, tensorquant, channel or swat-convergence (or a path to an experiment YAML)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test of the same grid: tiny subsets, 1 epoch (minutes); its tables are marked "
                        "'SMOKE TEST — not results' and print no comparison with the paper")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder of the run directories (default runs/reproduce-<paper>, runs/reproduce-<paper>-quick)")
    p.add_argument("--results", metavar="DIR", default=None,
                   help="folder of the summaries: reproduce.json, tables, plots (default results/<paper>; with "
                        "--quick <out>/results, so a smoke run never overwrites the published results)")
    p.add_argument("--data-dir", metavar="D", default=None,
                   help="folder holding the datasets (default $SPARSETRAIN_DATA)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for the runs (default: torch's choice; 1 when several blocks share cores)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs trained at once, each in its own process (default 1); with N > 1 each run gets "
                        "--threads threads (default: the CPU count // N)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: write the results folder from the runs finished so far (to commit numbers "
                        "as they land while the block is still training)")
    p.add_argument("--no-all-ops", action="store_true",
                   help="skip the non-GEMM FLOP count (BN, ReLU, pooling, top-K selection) in the tables")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")


def main(args: argparse.Namespace) -> int:
    """Train the missing runs, collect, write the results folder; 0 when every run finished, 3 if one diverged,
    130 on Ctrl-C (rerun the same command to continue)."""
    from sparsetrain.cli import EXIT_INTERRUPTED, EXIT_NONFINITE
    from sparsetrain.commands._errors import UsageError
    from sparsetrain.commands.sweep import run_jobs
    from sparsetrain.papers import (
        ExperimentError,
        collect_results,
        list_experiments,
        load_experiment,
        measure_run,
        point_jobs,
        resolve_widths,
    )
    from sparsetrain.reporting.results import write_results
    from sparsetrain.runs import RunDir

    if args.list:
        for name in list_experiments():
            exp = load_experiment(name)
            print(f"{name:18s} {exp.title}")
        return 0
    if not args.paper:
        raise UsageError(f"reproduce needs a paper; valid choices: {', '.join(list_experiments())}")
    try:
        exp = load_experiment(args.paper)
    except ExperimentError as e:
        raise UsageError(str(e)) from None
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    threads = args.threads
    if args.jobs > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    tag = exp.paper + ("-quick" if args.quick else "")
    out = Path(args.out) if args.out else Path(RunDir.DEFAULT_PARENT) / f"reproduce-{tag}"
    results = Path(args.results) if args.results else (out / "results" if args.quick else Path("results") / exp.paper)
    data_dir = args.data_dir or os.environ.get("SPARSETRAIN_DATA")
    base = exp.base_config(data_dir=data_dir)
    base["quiet"] = True
    try:
        widths = resolve_widths(exp, base, args.quick)
        jobs = point_jobs(exp, out, base, widths, args.quick)
    except ExperimentError as e:
        raise UsageError(str(e)) from None
    log.info("reproduce %s: %d runs in %s (%s protocol)", exp.paper, len(jobs), out, "quick" if args.quick else "full")

    out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        done = sum(run.read_summary() is not None for (_, _, run, _) in jobs)
        if done == 0:
            raise UsageError(f"--collect: no finished run in {out} yet; nothing to write")
        log.info("reproduce %s: collecting %d of %d finished runs (nothing trained)", exp.paper, done, len(jobs))
        interrupted, diverged = False, []
    else:
        interrupted, diverged = run_jobs([(run, cfg) for (_, _, run, cfg) in jobs], "reproduce", workers=args.jobs,
                                         threads=threads)
    if interrupted:
        return EXIT_INTERRUPTED

    analyses: dict[str, dict] = {}
    measure = exp.analyses.get("measure")
    if measure:
        from sparsetrain.reporting.results import write_json

        cache = out / "_analysis"
        for p, seed, run, _ in jobs:
            if not p.measure or run.read_summary() is None:
                continue
            path = cache / f"{run.path.name}.measure.json"
            if path.is_file():  # the search evaluates the test set dozens of times: do it once per run
                import json

                analyses[run.path.name] = json.loads(path.read_text(encoding="utf-8"))
                continue
            log.info("reproduce %s: measuring %s (threshold search)", exp.paper, run.path.name)
            analyses[run.path.name] = measure_run(run, measure, data_dir)
            write_json(path, analyses[run.path.name])

    command = "sparsetrain reproduce " + exp.paper + (" --quick" if args.quick else "")
    protocol = exp.base_config(quick=args.quick, data_dir=data_dir)
    record = collect_results(exp, jobs, quick=args.quick, base=protocol, widths=widths, command=command,
                             analyses=analyses, all_ops=not args.no_all_ops)
    written = write_results(record, results)
    print(written.markdown_text)
    print(f"sparsetrain reproduce: {len(jobs)} runs in {out}; results in {results}: "
          + ", ".join(p.name for p in written.files))
    if diverged:
        print(f"sparsetrain reproduce: {len(diverged)} run(s) stopped on NaN/Inf: {', '.join(diverged)}",
              file=sys.stderr)
        return EXIT_NONFINITE
    return 0
