"""``sparsetrain`` command line: one subcommand per module in ``sparsetrain.commands``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``;
heavy imports stay inside ``main`` so ``sparsetrain --help`` is instant.

Exit statuses (the same for every command):

====  ==========================================================================================
0     success
1     an unexpected internal error (one line; ``sparsetrain -v ...`` shows the traceback)
2     a usage or input problem: bad name, number, missing or malformed file (one line naming it)
3     training stopped on a NaN/Inf loss or gradient (the last good checkpoint is kept)
130   interrupted (Ctrl-C); ``train`` prints the ``--resume`` command that continues the run
====  ==========================================================================================
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_INTERRUPTED"]

COMMANDS = ("train", "sweep", "reproduce", "list", "measure", "report", "flops", "export")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    from sparsetrain import __version__

    parser = argparse.ArgumentParser(
        prog="sparsetrain",
        description="Sparse training of CNNs: SWAT, gradient pruning, sparsity telemetry and FLOP accounting.",
    )
    parser.add_argument("--version", action="version", version=f"sparsetrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks of errors)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"sparsetrain.commands.{name}")
        # argparse %-formats a subcommand's help (so "90%" must be "90%%") but a description only when it
        # holds "%(prog)" - so the description takes the text as it is.
        p = sub.add_parser(name, help=mod.HELP.replace("%", "%%"), description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _one_line(e: BaseException) -> str:
    from sparsetrain.commands._errors import describe

    return describe(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    from sparsetrain.commands._errors import USER_ERRORS

    prefix = f"sparsetrain {args.command}"
    try:
        return int(args._module.main(args) or 0)
    except BrokenPipeError:
        # The reader went away (`sparsetrain flops ... | head`): not an error of ours; silence the final flush.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        # `train` handles its own interruption (it knows the run to resume); elsewhere nothing is half-written.
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if args.verbose:
            raise
        print(f"{prefix}: internal error: {_one_line(e)} (run `sparsetrain -v {' '.join(argv)}` for the "
              "traceback; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
