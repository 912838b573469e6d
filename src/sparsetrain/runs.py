"""Run directories: :class:`RunDir` owns their format; :func:`load_run` loads a finished run back.

Every file name of a run directory is spelled here and nowhere else; the rest of the package asks
:class:`RunDir` for paths (``run_dir.metrics_path``), readers and writers. Layout (``RunDir`` attribute, file):

==================  ======================  =============================================================
``CONFIG``          ``config.yaml``         the fully resolved training config (+ ``format_version``); self-contained
``METRICS``         ``metrics.jsonl``       one JSON object per epoch, appended and flushed
``TELEMETRY``       ``telemetry.jsonl``     sparsity samples of the telemetry Monitor
``CHECKPOINT``      ``checkpoint.pt``       the latest epoch (atomic: temp file + fsync + rename)
``PREV_CHECKPOINT`` ``checkpoint.prev.pt``  the epoch before it, so a damaged latest checkpoint never loses the run
``FLOPS``           ``flops.json``          FLOP and memory accounting, written at the end
``SUMMARY``         ``summary.json``        the run's headline figures (+ ``format_version``), written at the end
``REPORT_DIR``      ``report/``             ``sparsetrain report`` output (``REPORT_MARKDOWN``, ``REPORT_HTML``)
``TENSORBOARD_DIR`` ``tensorboard/``        TensorBoard event files of ``sparsetrain train --tensorboard``
``SPARSE_MODEL``    ``model_sparse.pt``     ``sparsetrain export``: plain ``state_dict``, forward masks applied
``COMPRESSED_MODEL`` ``model_sparse.packed.pt`` ``sparsetrain export``: the same, packed (``load_compressed``)
``LOCK``            ``.sparsetrain.lock``   :meth:`RunDir.lock`: who writes the run now (stays, never read as data)
==================  ======================  =============================================================

One process writes a run directory at a time: :meth:`RunDir.lock` takes an OS lock on its ``LOCK`` file for the
life of the run and a second process fails at once with :class:`RunLockedError`, naming the holder.

Its files are written and read with the primitives of :mod:`sparsetrain.files` (atomic writers, the one JSON-lines
reader, which skips a torn last line).

Example:
    >>> run = RunDir("runs/lenet5-swat-u")  # doctest: +SKIP
    >>> run.read_summary()["final_test_acc"], len(run.read_metrics())  # doctest: +SKIP
    (0.8195, 8)
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# atomic_write_text is also imported from here by reporting/results.py (to move to sparsetrain.files).
from sparsetrain.files import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_jsonl,
    truncate_jsonl,
)

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSION_KEY",
    "SUMMARY_FLOPS_KEYS",
    "RECORD_KEYS",
    "RunDir",
    "RunDirectoryError",
    "RunLock",
    "RunLockedError",
    "Run",
    "save_checkpoint",
    "load_checkpoint",
    "load_run",
    "self_contained_recipe",
    "summarize",
]

logger = logging.getLogger(__name__)

#: Version of the run-directory format, written into the config and the summary. Readers accept this version and
#: older ones (a run without the key predates versioning and has the same files).
FORMAT_VERSION = 1
#: The key of the format version in the config and the summary.
FORMAT_VERSION_KEY = "format_version"
_VERSION_KEY = FORMAT_VERSION_KEY
#: The run-level figures the papers' tables report: ``summary["flops"]`` holds them, the FLOP file top level.
SUMMARY_FLOPS_KEYS = (
    "training_flops_reduction_pct",
    "inference_flops_reduction_pct",
    "act_memory_reduction_pct",
    "model_compression_x",
)

#: Config keys that record where and how a run was written, not what it computed. Runs whose configs differ only in
#: these and the seed are seeds of one experiment: ``sparsetrain report`` pools them into one row, and a sweep rerun
#: accepts a run directory that differs only in these.
RECORD_KEYS = ("out", "quiet", "data_dir", "device", "log_every", "telemetry_every", "tensorboard",
               "checkpoint_every", "lean_allocator")

class RunDirectoryError(ValueError):
    """The path is not a readable sparsetrain run directory, or one of its files is malformed."""


class RunLockedError(RunDirectoryError):
    """Another process (or this one, through another :class:`RunLock`) holds the lock of the run directory.

    Attributes:
        path: the run directory.
        holder: what the holder wrote into the lock file (``pid``, ``host``, ``started``, ``command``); empty when
            it had not written it yet.
    """

    def __init__(self, message: str, path: Path | None = None, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)  # only the message in args: the error pickles (e.g. out of a worker process)
        self.path = path
        self.holder = holder or {}


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None if the file is absent, :class:`RunDirectoryError` if it is malformed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirectoryError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{path} holds a {type(data).__name__}, expected an object")
    return data


def _check_version(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data`` without its format version; a version newer than this package reads is an error."""
    data = dict(data)
    version = data.pop(_VERSION_KEY, FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RunDirectoryError(f"{path} has run-directory format {version!r}; this sparsetrain reads formats up to "
                                f"{FORMAT_VERSION}: upgrade sparsetrain to read it")
    return data


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write the checkpoint of ``run_dir``; the previous one becomes the backup checkpoint."""
    return RunDir(run_dir).save_checkpoint(state)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (a file, or the latest one of a run directory) with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint there (the message names the backup checkpoint when it exists).
        RuntimeError: the file is damaged (the message says how to resume from the backup).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / RunDir.CHECKPOINT
    prev = path.parent / RunDir.PREV_CHECKPOINT
    if not path.exists():
        hint = f"; the previous checkpoint {prev} exists: resume from it with --resume {prev}" if prev.exists() else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            raise ValueError("missing 'model'/'epoch' entries")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        hint = (f" The previous checkpoint {prev} is intact: resume from it with --resume {prev}"
                if prev.exists() and prev != path else "")
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:200]  # torch's are paragraphs
        raise RuntimeError(
            f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: {first}).{hint}") from None
    return ckpt


# ---------------------------------------------------------------------------------------------- one writer
try:  # POSIX: flock, released by the kernel when the process dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # pragma: no cover - Windows only
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

# Windows locks byte ranges, and a locked range cannot be read by others: lock one byte far past the holder text,
# which stays readable. Windows allows locking past the end of a file.
_WINDOWS_LOCK_OFFSET = 1 << 30
_WINDOWS_HELD_ERRNOS = {errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def _command_line() -> str:
    """This process's command line, as the user typed it (``sparsetrain train ...``, ``python -m sparsetrain ...``)."""
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0])
    if prog.name == "__main__.py":
        argv[0] = f"python -m {prog.parent.name}"
    elif argv[0] in ("-c", "-"):
        argv[0] = f"python {argv[0]}"
    else:
        argv[0] = prog.name
    return " ".join([argv[0], shlex.join(argv[1:])]).strip()


class RunLock:
    """An exclusive lock on a run directory, taken at construction and held until :meth:`release` (or process exit).

    Built by :meth:`RunDir.lock`. The lock is the OS's, on the run directory's ``RunDir.LOCK`` file:
    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on POSIX (Linux, macOS; also across machines on NFS, which Linux emulates
    with ``fcntl`` byte-range locks), ``msvcrt.locking`` on one byte on Windows. Either way the kernel drops it when
    the process ends, even by SIGKILL or a crash, so a killed run never blocks its ``--resume``; the file stays
    behind and is reused. On a platform with neither, the lock only logs a warning and does nothing.

    Locks belong to the open file: a second :class:`RunLock` on the same directory conflicts even in the same
    process. A process forked while holding the lock shares it (the lock lasts until the last of them exits).
    Dropping the object without :meth:`release` does not release the lock: it is held until the process ends.

    After taking the lock the holder writes who it is (pid, host, start time, command line) into the file, for the
    message of the next process that fails to take it. The file is never deleted: deleting it while another process
    waits to open it would let two processes lock two different files of the same name.

    Example:
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp())
        >>> with run.lock():
        ...     run.lock()
        Traceback (most recent call last):
        ...
        sparsetrain.runs.RunLockedError: ... is in use by this process (pid ...); ...
    """

    def __init__(self, run_dir: RunDir) -> None:
        self.path = run_dir.path
        self.lock_path = run_dir.lock_path
        self._fd: int | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None and msvcrt is None:  # pragma: no cover - neither POSIX nor Windows
            logger.warning("%s: no OS file locking on this platform; nothing stops a second process from writing "
                           "this run directory at the same time", self.path)
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._acquire(fd)
        except OSError as e:
            os.close(fd)
            # flock: EWOULDBLOCK; msvcrt: EACCES or EDEADLOCK. Anything else (ENOLCK: a file system without locks)
            # is not "someone holds it" and propagates as it is.
            if isinstance(e, BlockingIOError) or (fcntl is None and e.errno in _WINDOWS_HELD_ERRNOS):
                raise self._locked_error() from None
            raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command_line()}
        data = (json.dumps(self.holder) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        logger.debug("locked %s", self.lock_path)

    @staticmethod
    def _acquire(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _read_holder(self) -> dict[str, Any]:
        # The holder writes its details just after taking the lock: give a racing holder a moment to finish.
        for attempt in range(5):
            try:
                holder = json.loads(self.lock_path.read_text(encoding="utf-8"))
                if isinstance(holder, dict):
                    return holder
            except (OSError, ValueError):
                pass
            time.sleep(0.02 * (attempt + 1))
        return {}

    def _locked_error(self) -> RunLockedError:
        holder = self._read_holder()
        hint = "wait for it to finish or choose another --out"
        if not holder:
            return RunLockedError(f"{self.path} is in use by another sparsetrain run (it has not written its details "
                                  f"to {self.lock_path} yet); {hint}", self.path, holder)
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
        if holder.get("command"):
            who += f": {holder['command']}"
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return RunLockedError(f"{self.path} is in use by this process ({who}); release its lock first",
                                  self.path, holder)
        return RunLockedError(f"{self.path} is in use by another sparsetrain run ({who}); {hint}", self.path, holder)

    @property
    def held(self) -> bool:
        """True until :meth:`release` (always False on a platform without file locking)."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent). The lock file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # while still holding the lock: a new holder's details are never erased
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:  # pragma: no cover - Windows
                os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)  # closing alone releases it too
        logger.debug("unlocked %s", self.lock_path)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


# ---------------------------------------------------------------------------------------------- summary
def _config_density(config: Mapping[str, Any]) -> float | None:
    overrides = config.get("recipe_overrides") or {}
    if overrides.get("density") is not None:
        return overrides["density"]
    if overrides.get("sparsity") is not None:
        from sparsetrain.sparsifiers import density_from

        return density_from(None, overrides["sparsity"], "recipe_overrides")
    return config.get("density")


def summarize(config: Mapping[str, Any], metrics: list[dict[str, Any]], flops: Mapping[str, Any] | None = None, *,
              recipe: Any = None, density: float | None = None, epochs: int | None = None,
              run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The summary of a run: the one definition of its keys, for finished runs and unfinished ones alike.

    Args:
        config: the run's config.
        metrics: its per-epoch records, in epoch order.
        flops: the FLOP accounting (its :data:`SUMMARY_FLOPS_KEYS` are copied), or None.
        recipe: recipe label (default: the config's ``recipe``).
        density: the recipe's density (default: the config's ``recipe_overrides``).
        epochs: epochs of the run (default: the number of epochs in ``metrics``).
        run_dir: the run directory, recorded when given.
    """
    accs = [m["test_acc"] for m in metrics if isinstance(m.get("test_acc"), (int, float))]
    last = metrics[-1] if metrics else {}
    summary: dict[str, Any] = {
        "model": config.get("model"),
        "dataset": config.get("dataset"),
        "recipe": config.get("recipe") if recipe is None else recipe,
        "density": _config_density(config) if density is None else density,
        "seed": config.get("seed"),
        "epochs": len(metrics) if epochs is None else epochs,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
    }
    for key in ("weight_density", "activation_density"):
        if key in last:
            summary[key] = last[key]
    if flops:
        summary["flops"] = {k: flops[k] for k in SUMMARY_FLOPS_KEYS if k in flops}
    if run_dir is not None:
        summary["run_dir"] = str(run_dir)
    return summary


# ---------------------------------------------------------------------------------------------- the run directory
class RunDir:
    """One run directory: its file names, format version, writers and readers.

    Args:
        path: the folder (it need not exist yet).

    Example:
        >>> RunDir("runs/a").metrics_path
        PosixPath('runs/a/metrics.jsonl')
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    TELEMETRY = "telemetry.jsonl"
    CHECKPOINT = "checkpoint.pt"
    PREV_CHECKPOINT = "checkpoint.prev.pt"
    FLOPS = "flops.json"
    SUMMARY = "summary.json"
    REPORT_DIR = "report"
    REPORT_MARKDOWN = "report.md"
    REPORT_HTML = "report.html"
    TENSORBOARD_DIR = "tensorboard"
    SPARSE_MODEL = "model_sparse.pt"
    COMPRESSED_MODEL = "model_sparse.packed.pt"
    #: The lock file of :meth:`lock` (hidden: it holds no results, and :meth:`is_run` / :meth:`find` ignore it).
    #: Not plain ``.lock``: that would match every ``x.lock()`` call in the test that names are spelled only here.
    LOCK = ".sparsetrain.lock"
    #: What every run directory holds once its first epoch is done; the rest is optional for readers.
    REQUIRED = (CONFIG, METRICS)
    OPTIONAL = (SUMMARY, TELEMETRY, FLOPS)
    #: Parent folder of runs started without ``--out``.
    DEFAULT_PARENT = "runs"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def containing(cls, path: str | os.PathLike) -> "RunDir":
        """The run directory ``path`` names, or the one holding the file ``path`` (e.g. a checkpoint)."""
        path = Path(path)
        return cls(path.parent if path.is_file() else path)

    @classmethod
    def default(cls, model: str, recipe: Any) -> "RunDir":
        """``runs/<model>-<recipe>-<time>``: where a run started without ``--out`` goes."""
        tag = Path(str(recipe)).stem if isinstance(recipe, str) else "custom"
        return cls(Path(cls.DEFAULT_PARENT) / f"{model}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def telemetry_path(self) -> Path:
        return self.path / self.TELEMETRY

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def prev_checkpoint_path(self) -> Path:
        return self.path / self.PREV_CHECKPOINT

    @property
    def flops_path(self) -> Path:
        return self.path / self.FLOPS

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def report_dir(self) -> Path:
        return self.path / self.REPORT_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD_DIR

    @property
    def sparse_model_path(self) -> Path:
        """``sparsetrain export``'s plain masked ``state_dict`` (loads into the vanilla model)."""
        return self.path / self.SPARSE_MODEL

    @property
    def compressed_model_path(self) -> Path:
        """``sparsetrain export``'s compressed file (read with :func:`sparsetrain.export.load_compressed`)."""
        return self.path / self.COMPRESSED_MODEL

    @property
    def lock_path(self) -> Path:
        """The file :meth:`lock` locks; it may exist without anyone holding the lock."""
        return self.path / self.LOCK

    # ------------------------------------------------------------------ checks
    def has_checkpoint(self) -> bool:
        """True once an epoch has been checkpointed: the folder holds a run and must not be overwritten."""
        return self.checkpoint_path.exists()

    def is_run(self) -> bool:
        """True if the folder holds every file of :attr:`REQUIRED`."""
        return all((self.path / f).is_file() for f in self.REQUIRED)

    def check(self) -> None:
        """Raise :class:`RunDirectoryError` (naming the expected files) unless the folder :meth:`is_run`."""
        expected = (f"a run directory holds {' and '.join(self.REQUIRED)} (optional: {', '.join(self.OPTIONAL)}), "
                    "as written by `sparsetrain train`")
        if not self.path.is_dir():
            raise RunDirectoryError(f"{str(self.path)!r} is not a directory; {expected}")
        missing = [f for f in self.REQUIRED if not (self.path / f).is_file()]
        if missing:
            raise RunDirectoryError(f"{str(self.path)!r} is not a sparsetrain run directory: missing "
                                    f"{', '.join(missing)}; {expected}")

    @classmethod
    def find(cls, parent: str | os.PathLike) -> list["RunDir"]:
        """The run directories directly below ``parent``, sorted by path."""
        return sorted((cls(p) for p in Path(parent).iterdir() if p.is_dir() and cls(p).is_run()),
                      key=lambda r: r.path)

    # ------------------------------------------------------------------ one writer
    def lock(self) -> RunLock:
        """Take the run directory's lock for the life of a run, or fail at once if another process holds it.

        Creates the folder (and its parents) if missing, and the ``LOCK`` file in it; nothing else. Use it as a
        context manager, or keep the returned :class:`RunLock` and call :meth:`RunLock.release`; the OS releases it
        anyway when the process ends, however it ends. Not reentrant: a second call before the release raises.

        Raises:
            RunLockedError: another process (or another lock in this one) holds it; the message names the holder's
                pid, host, start time and command line.
            FileExistsError: the path is an existing file.

        Example:
            >>> with RunDir("runs/a").lock():  # doctest: +SKIP
            ...     train(...)
        """
        return RunLock(self)

    # ------------------------------------------------------------------ config
    def create(self) -> None:
        """Create the folder (and its parents)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Atomically write the resolved config, with the format version."""
        data = {**config, _VERSION_KEY: FORMAT_VERSION}
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        """The config as written by :meth:`write_config` (without the format version).

        Raises:
            RunDirectoryError: no config file (the message says what a run directory holds), invalid YAML, not a
                mapping, or a newer format.
        """
        if not self.config_path.is_file():
            raise RunDirectoryError(f"{self.path} is not a sparsetrain run directory: expected {self.CONFIG} and "
                                    f"{self.CHECKPOINT} (written by `sparsetrain train`)")
        try:
            config = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RunDirectoryError(f"{str(self.config_path)!r} is not valid YAML: {e}") from None
        if not isinstance(config, dict):
            raise RunDirectoryError(f"{str(self.config_path)!r} must hold a mapping, got {type(config).__name__}")
        return _check_version(config, self.config_path)

    @property
    def format_version(self) -> int:
        """The format version the config records (runs from before versioning read as the current one)."""
        config = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        return int(config.get(_VERSION_KEY, FORMAT_VERSION))

    # ------------------------------------------------------------------ metrics and telemetry
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's record (one flushed JSON line)."""
        append_jsonl(self.metrics_path, record)

    def read_metrics(self, skipped: list[int] | None = None) -> list[dict[str, Any]]:
        """The per-epoch records (a torn last line is skipped; its number goes to ``skipped``)."""
        return read_jsonl(self.metrics_path, skipped=skipped)

    def last_densities(self) -> dict[str, dict[str, float]]:
        """Per layer and operand, the densities measured in the last recorded epoch.

        Raises:
            RunDirectoryError: no epoch recorded, or the last one has no ``densities``.
        """
        metrics = self.read_metrics()
        if not metrics:
            raise RunDirectoryError(f"{self.metrics_path} holds no epochs yet")
        dens = metrics[-1].get("densities")
        if not isinstance(dens, dict):
            raise RunDirectoryError(f"the last record of {self.metrics_path} has no 'densities'")
        return {str(layer): {str(op): float(v) for op, v in (ops or {}).items()} for layer, ops in dens.items()}

    def iter_telemetry(self, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
        """The telemetry records, streamed (nothing when the run has no telemetry)."""
        return iter_jsonl(self.telemetry_path, skipped=skipped)

    def truncate_after(self, epoch: int, step: int) -> None:
        """Drop what a killed process wrote after its last checkpoint: epochs >= ``epoch``, steps >= ``step``."""
        truncate_jsonl(self.metrics_path, lambda r: r["epoch"] < epoch)
        truncate_jsonl(self.telemetry_path, lambda r: r["step"] < step)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Atomically write the checkpoint; the previous one becomes the backup (``PREV_CHECKPOINT``)."""
        import torch  # here, not at module level: reading a run's files for a report needs no torch

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue(), backup=self.prev_checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self) -> dict[str, Any]:
        """The latest checkpoint (see :func:`load_checkpoint`)."""
        return load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------ results
    def write_flops(self, flops: Mapping[str, Any]) -> None:
        """Atomically write the FLOP and memory accounting."""
        atomic_write_json(self.flops_path, flops)

    def read_flops(self) -> dict[str, Any] | None:
        """The FLOP accounting, or None before the run has finished; malformed: :class:`RunDirectoryError`."""
        return _read_json_object(self.flops_path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Atomically write the summary (see :func:`summarize`), with the format version."""
        atomic_write_json(self.summary_path, {**summary, _VERSION_KEY: FORMAT_VERSION})

    def read_summary(self) -> dict[str, Any] | None:
        """The summary written at the end of the run (without the format version), or None if absent.

        Raises:
            RunDirectoryError: the file is malformed or from a newer format.
        """
        data = _read_json_object(self.summary_path)
        return None if data is None else _check_version(data, self.summary_path)

    def derive_summary(self, config: Mapping[str, Any] | None = None, metrics: list[dict[str, Any]] | None = None,
                       flops: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The summary of an unfinished run, from its config, metrics and FLOP accounting (read when not given)."""
        config = self.read_config() if config is None else config
        metrics = self.read_metrics() if metrics is None else metrics
        return summarize(config, metrics, flops)


# ---------------------------------------------------------------------------------------------- the recorded recipe
def self_contained_recipe(recipe: Any) -> Any:
    """The recipe as a run records it: a YAML file's content instead of its path; anything else unchanged.

    A run directory must not depend on the working directory it was started from: ``--resume``, ``export``,
    ``measure`` and ``report`` may run anywhere, long after the file moved or changed. So a recipe given as a path
    to a YAML file is recorded as the mapping the file holds (``Recipe.load`` gives it the same meaning). Preset
    names and the example recipes shipped with the package stay names: they are part of the installed package, not
    of the working directory. A path that is no file is left as it is, for ``Recipe.load`` to report.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.yaml"
        >>> _ = p.write_text("preset: swat-u\\ndensity: 0.2\\n")
        >>> self_contained_recipe(str(p)), self_contained_recipe("swat-u")
        ({'preset': 'swat-u', 'density': 0.2}, 'swat-u')
    """
    from sparsetrain.recipe import PRESETS, Recipe

    if isinstance(recipe, Recipe):
        return recipe.to_dict()
    if isinstance(recipe, os.PathLike):
        recipe = os.fspath(recipe)
    # The precedence of Recipe.load: a preset name, then an existing file, then a shipped example's name.
    if not isinstance(recipe, str) or recipe in PRESETS or not Path(recipe).is_file():
        return recipe
    try:
        content = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return recipe  # Recipe.load names the file, line and column
    return content if isinstance(content, dict) else recipe


# ---------------------------------------------------------------------------------------------- loading a run back
@dataclass
class Run:
    """A finished or interrupted run loaded back: its config, its model (dense modules, eval mode) and data."""

    path: Path
    config: dict[str, Any]
    model: nn.Module
    info: Any
    checkpoint: dict[str, Any]

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape ``(C, H, W)`` of the run's dataset."""
        size = self.info.image_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (self.info.channels, *hw)

    def sparsify(self):
        """Re-apply the run's recipe (with its saved sparsity state) and return the handle.

        The recipe is the one the run trained with, as the checkpoint's sparsity state holds it (resolved, overrides
        applied); a run without one falls back to its config's. No recipe file is read again.
        """
        from sparsetrain.handle import sparsify_

        saved = self.checkpoint.get("sparsity") or {}
        if saved.get("recipe") is not None:
            handle = sparsify_(self.model, saved["recipe"])
        else:
            handle = sparsify_(self.model, self.config["recipe"], **(self.config.get("recipe_overrides") or {}))
        if saved:
            handle.load_state_dict(saved)
        return handle


def load_run(path: str | os.PathLike, *, weights: bool = True) -> Run:
    """Load a run directory (or a checkpoint file inside one) for evaluation or accounting.

    Args:
        path: the run directory or a checkpoint file in it.
        weights: load the checkpoint's weights; False builds the architecture only (no checkpoint needed).

    Raises:
        RunDirectoryError: the folder has no config (the message names what is expected) or it is malformed.
        FileNotFoundError, RuntimeError: the checkpoint is missing or damaged (see :func:`load_checkpoint`).
    """
    from sparsetrain.data import dataset_info
    from sparsetrain.models import create_model

    path = Path(path)
    run_dir = RunDir.containing(path)
    config = run_dir.read_config()
    if "model" not in config or "dataset" not in config:
        raise RunDirectoryError(f"{run_dir.config_path} lacks 'model' or 'dataset'")
    ckpt = load_checkpoint(path) if weights else {}
    info = dataset_info(config["dataset"])
    model = create_model(config["model"], num_classes=info.num_classes, in_channels=info.channels,
                         width_mult=config.get("width_mult"))
    if weights:
        model.load_state_dict(ckpt["model"])
    model.eval()
    return Run(run_dir.path, config, model, info, ckpt)
