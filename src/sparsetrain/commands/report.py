"""``sparsetrain report``: Markdown + HTML report of one run, or a comparison table of several runs.

Given ``sparsetrain reproduce`` results folders (``results/<paper>``, holding ``reproduce.json``) instead, it
regenerates their tables (``tables.md``, CSV) and plots from ``reproduce.json`` alone and prints the tables.

Examples:
    sparsetrain report runs/resnet18-swat-u               # -> Markdown + HTML in runs/resnet18-swat-u/report/
    sparsetrain report runs/swat-u-s* runs/dense-s* --out cmp --title "SWAT-U vs dense, ResNet-18"
    sparsetrain report results/swat results/grad-prune    # -> results/swat/tables.md, ... (docs/results.md)
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HELP", "add_arguments", "main"]

HELP = "write a Markdown/HTML report (plots, tables) of a run, or compare several runs across seeds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``report`` arguments."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directory written by `sparsetrain train`; several give a comparison report; or results folders "
        "of `sparsetrain reproduce` (results/<paper>): their tables and plots are regenerated",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default: RUN_DIR/report for one run, ./sparsetrain-report for several)",
    )
    parser.add_argument("--title", metavar="T", default=None, help="report title")
    parser.add_argument(
        "--no-plots", action="store_true", help="tables only: no PNG figures (works without matplotlib)"
    )
    parser.add_argument(
        "--link-images",
        action="store_true",
        help="reference the PNG files from the HTML report instead of embedding them as data URIs",
    )


def main(args: argparse.Namespace) -> int:
    """Write the report; print the paths written. Returns 0, or 2 for a bad run directory, 1 without matplotlib."""
    from sparsetrain.reporting import MATPLOTLIB_HINT, RunDirectoryError, write_report
    from sparsetrain.reporting.results import is_results_folder

    if any(is_results_folder(d) for d in args.run_dirs):
        return _regenerate(args)
    try:
        result = write_report(
            args.run_dirs,
            out_dir=args.out,
            title=args.title,
            plots=not args.no_plots,
            embed_images=not args.link_images,
        )
    except RunDirectoryError as e:
        print(f"sparsetrain report: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if MATPLOTLIB_HINT not in str(e):  # a broken install, not the missing optional extra
            raise
        print(f"sparsetrain report: error: {e}", file=sys.stderr)
        return 1
    print(result.markdown)
    print(result.html)
    for png in result.images:
        print(png)
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    """Rewrite the tables and plots of ``sparsetrain reproduce`` results folders; print their Markdown tables."""
    from sparsetrain.reporting.results import is_results_folder, regenerate

    not_results = [d for d in args.run_dirs if not is_results_folder(d)]
    if not_results:
        print(f"sparsetrain report: error: {not_results[0]} is not a `sparsetrain reproduce` results folder (no "
              "reproduce.json): give either run directories or results folders, not both", file=sys.stderr)
        return 2
    if args.out or args.title:
        print("sparsetrain report: error: --out and --title apply to run reports; a results folder's tables are "
              "regenerated in place", file=sys.stderr)
        return 2
    for folder in args.run_dirs:
        try:
            written = regenerate(folder, plots=not args.no_plots)
        except ValueError as e:
            print(f"sparsetrain report: error: {e}", file=sys.stderr)
            return 2
        print(written.markdown_text)
        print(f"sparsetrain report: regenerated {', '.join(str(p) for p in written.files[1:])}")
    return 0
