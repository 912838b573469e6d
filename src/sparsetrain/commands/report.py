"""``sparsetrain report``: Markdown + HTML report of one run, or a comparison table of several runs.

Examples:
    sparsetrain report runs/resnet18-swat-u               # -> Markdown + HTML in runs/resnet18-swat-u/report/
    sparsetrain report runs/swat-u-s* runs/dense-s* --out cmp --title "SWAT-U vs dense, ResNet-18"
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
        help="run directory written by `sparsetrain train`; several give a comparison report",
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
