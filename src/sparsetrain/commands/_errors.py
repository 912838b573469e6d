"""What the CLI treats as a user's problem, and how it says so in one line.

A user's problem (bad name, bad number, missing, malformed or damaged file) ends a command with one line naming it
and exit status 2; anything else is an internal error (exit status 1). Both are printed by ``sparsetrain.cli``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["USER_ERRORS", "UsageError", "describe", "yaml_error_message", "load_yaml_file"]


class UsageError(ValueError):
    """A command-line problem the message fully explains."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, OSError, yaml.YAMLError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError,
    ImportError,
)


def yaml_error_message(e: yaml.YAMLError, path: str | os.PathLike | None = None) -> str:
    """``FILE:LINE:COLUMN: problem`` (1-based, as editors count) for a YAML syntax error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = str(path) if path is not None else (mark.name if mark is not None else "<yaml>")
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    if mark is None:
        return f"{where}: not valid YAML: {problem}"
    detail = f"{problem} ({context})" if context else problem
    return f"{where}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {detail}"


def load_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """Parse a YAML file; a missing file or a syntax error raises :class:`UsageError` naming file, line, column."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {str(p)!r} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{what} {yaml_error_message(e, p)}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {str(p)!r} is not a UTF-8 text file ({e.reason})") from None


def describe(e: BaseException) -> str:
    """One line for an exception: its message, first line only, with the type when the message alone is unclear."""
    if isinstance(e, yaml.YAMLError):
        return yaml_error_message(e)
    if isinstance(e, KeyError):
        text = f"unknown key {e.args[0]!r}" if e.args else "missing key"
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e).strip()
    if not text:
        text = type(e).__name__
    elif isinstance(e, (zipfile.BadZipFile, pickle.UnpicklingError, EOFError)):
        text = f"{type(e).__name__}: {text}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Multi-line messages (e.g. a missing dataset's search list) keep their detail on the following lines, indented.
    return lines[0] + "".join(f"\n  {ln.strip()}" for ln in lines[1:]) if len(lines) > 1 else lines[0]
