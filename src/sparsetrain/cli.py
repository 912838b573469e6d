"""``sparsetrain`` command line: one subcommand per module in ``sparsetrain.commands``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``;
heavy imports stay inside ``main`` so ``sparsetrain --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

COMMANDS = ("train", "list", "measure", "report", "flops")


def build_parser() -> argparse.ArgumentParser:
    from sparsetrain import __version__

    parser = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Sparse training of CNNs: SWAT, gradient pruning, sparsity telemetry and FLOP accounting.",
    )
    parser.add_argument("--version", action="version", version=f"sparsetrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"sparsetrain.commands.{name}")
        # argparse %-formats help strings; HELP texts may contain "90%".
        p = sub.add_parser(name, help=mod.HELP.replace("%", "%%"), description=mod.HELP.replace("%", "%%"))
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
