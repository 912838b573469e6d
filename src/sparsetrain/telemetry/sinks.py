"""Sinks for telemetry records: JSON lines, CSV, TensorBoard, and an in-memory list.

A sink is anything with ``write(records: list[dict])`` and ``close()``. The :class:`~sparsetrain.telemetry.Monitor`
calls ``write`` once per sample with all records of that sample. File sinks append and flush after every sample,
so a run that is killed keeps everything written so far (at worst a truncated last line, which
:func:`sparsetrain.files.read_jsonl` skips).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Sink", "JsonlSink", "CsvSink", "TensorBoardSink", "ListSink", "RECORD_FIELDS", "read_csv"]

logger = logging.getLogger(__name__)

#: Fields of a telemetry record, in file order.
RECORD_FIELDS = (
    "step",
    "epoch",
    "name",
    "kind",
    "tensor",
    "numel",
    "zeros",
    "sparsity",
    "near_zero_sparsity",
    "threshold",
)


@runtime_checkable
class Sink(Protocol):
    """What the Monitor writes to."""

    def write(self, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class ListSink:
    """Keep every record in memory (``sink.records``): for tests and notebooks."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(dict(r) for r in records)

    def close(self) -> None:
        pass


class JsonlSink:
    """Append records to a JSON-lines file, one object per line, flushed after every sample.

    Args:
        path: the file (parent directories are created); appended to if it exists.
        fsync: also ``os.fsync`` after each sample (survives a machine crash, not just a killed process).
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._f.closed:
            raise ValueError(f"JsonlSink({self.path}) is closed")
        self._f.write("".join(json.dumps(r, separators=(", ", ": ")) + "\n" for r in records))
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class CsvSink:
    """Append records to a CSV file with a header of :data:`RECORD_FIELDS`; ``None`` is written as an empty cell.

    The header is written only when the file is new or empty, so a resumed run keeps appending to one table.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def write(self, records: list[dict[str, Any]]) -> None:
        if self._f.closed:
            raise ValueError(f"CsvSink({self.path}) is closed")
        self._w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in RECORD_FIELDS} for r in records)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """Write each record as a TensorBoard scalar ``sparsity/<tensor>/<name>`` (and ``near_zero_sparsity/...``).

    Needs the optional ``tensorboard`` package (``pip install 'sparsetrain[tensorboard]'``).

    Raises:
        ImportError: when ``torch.utils.tensorboard`` cannot be imported.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when the tensorboard package is missing
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install 'sparsetrain[tensorboard]'"
            ) from e
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._writer.add_scalar(f"sparsity/{r['tensor']}/{r['name']}", r["sparsity"], r["step"])
            if r.get("near_zero_sparsity") is not None:
                self._writer.add_scalar(f"near_zero_sparsity/{r['tensor']}/{r['name']}", r["near_zero_sparsity"],
                                        r["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a :class:`CsvSink` file back into records with the original types (an empty numeric cell -> ``None``)."""
    ints = {"step", "epoch", "numel", "zeros"}
    floats = {"sparsity", "near_zero_sparsity", "threshold"}
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            rec: dict[str, Any] = {}
            for k in RECORD_FIELDS:
                v = row.get(k, "")
                if v == "" and (k in ints or k in floats):
                    rec[k] = None
                elif k in ints:
                    rec[k] = int(v)
                elif k in floats:
                    rec[k] = float(v)
                else:
                    rec[k] = v
            out.append(rec)
    return out
