"""The file primitives of the package: atomic writers and the one JSON-lines reader.

Writers replace a file atomically (temp file + fsync + rename), so a reader sees the old file or the new one, never
a partial one; :func:`append_jsonl` appends one flushed, fsynced line. JSON-lines files have one reader,
:func:`read_jsonl` / :func:`iter_jsonl`: a torn last line (the writer was killed mid-line) is skipped with a warning,
a bad line anywhere else is corruption and raises.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> append_jsonl(p, {"epoch": 0}); append_jsonl(p, {"epoch": 1})
    >>> [r["epoch"] for r in read_jsonl(p)]
    [0, 1]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "append_jsonl",
    "iter_jsonl",
    "read_jsonl",
    "truncate_jsonl",
]

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, backup: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one.

    With ``backup``, the old file is first renamed to it: each rename is atomic, so after a crash at any point at
    least one complete file exists.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, end: str = "") -> None:
    """:func:`atomic_write_text` of ``data`` as JSON (indent 1, keys in insertion order), then ``end``."""
    atomic_write_text(path, json.dumps(data, indent=1) + end)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as one JSON line, flushed and fsynced: a killed writer leaves at most a torn last line."""
    line = json.dumps(record) + "\n"  # serialise first: a bad value must not leave half a line behind
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike, *, missing_ok: bool = True,
               skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file, streamed (nothing if it does not exist and ``missing_ok``).

    Args:
        path: the file.
        missing_ok: yield nothing for a missing file instead of raising ``FileNotFoundError``.
        skipped: if given, the (1-based) number of a skipped torn last line is appended to it.

    Raises:
        ValueError: a line other than the last is not valid JSON, or a line is not a JSON object (names the line).
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        bad: tuple[int, str] | None = None  # an unparsable line: torn if nothing but blank lines follows it
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if bad is not None:
                raise ValueError(f"{path}:{bad[0]}: not valid JSON: {bad[1][:80]!r}")
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad = (lineno, line)
                continue
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object: {line[:80]!r}")
            yield record
    if bad is not None:
        logger.warning("%s: skipping truncated last line %d", path, bad[0])
        if skipped is not None:
            skipped.append(bad[0])


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True,
               skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (``[]`` if it does not exist and ``missing_ok``); see :func:`iter_jsonl`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
        >>> _ = p.write_text('{"epoch": 0}\\n{"epo')  # the writer was killed mid-line
        >>> read_jsonl(p)
        [{'epoch': 0}]
    """
    return list(iter_jsonl(path, missing_ok=missing_ok, skipped=skipped))


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Keep only the records ``keep(record)`` accepts (used on resume to drop what came after the checkpoint)."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if keep(r)]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
