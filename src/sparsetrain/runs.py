"""Run directories: the resolved config, atomic checkpoints, and loading a finished run back.

Layout of a run directory::

    config.yaml          the fully resolved training config
    metrics.jsonl        one JSON object per epoch
    telemetry.jsonl      sparsity samples of the Monitor
    checkpoint.pt        the latest epoch (written atomically: temp file + fsync + rename)
    checkpoint.prev.pt   the epoch before it, kept so a damaged latest checkpoint never loses the run
    flops.json, summary.json   written at the end
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

__all__ = [
    "CHECKPOINT",
    "PREV_CHECKPOINT",
    "Run",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "load_run",
    "read_jsonl",
    "truncate_jsonl",
]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)
PREV_CHECKPOINT = "checkpoint.prev.pt"


def atomic_write_bytes(path: Path, data: bytes, backup: Path | None = None) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``checkpoint.pt``; the previous one becomes ``checkpoint.prev.pt``."""
    import io

    run_dir = Path(run_dir)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue(), backup=run_dir / PREV_CHECKPOINT)
    return run_dir / CHECKPOINT


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a damaged file gives an error that names the fallback."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        prev = path.parent / PREV_CHECKPOINT
        hint = f"; the previous checkpoint {prev} exists: resume from it with --resume {prev}" if prev.exists() else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            raise ValueError("missing 'model'/'epoch' entries")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        prev = path.parent / PREV_CHECKPOINT
        hint = (f" The previous checkpoint {prev} is intact: resume from it with --resume {prev}"
                if prev.exists() and prev != path else "")
        raise RuntimeError(f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: {e}).{hint}") from None
    return ckpt


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``[]`` if it does not exist and ``missing_ok``).

    A torn last line -- the writer was killed mid-line -- is skipped with a warning; a bad line anywhere else is
    corruption and raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s: skipping truncated last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {line[:80]!r}") from None
    return out


def truncate_jsonl(path: Path, keep) -> None:
    """Keep only the records ``keep(record)`` accepts (used on resume to drop what came after the checkpoint)."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if keep(r)]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class Run:
    """A finished or interrupted run loaded back: its config, its model (dense modules, eval mode) and data."""

    path: Path
    config: dict[str, Any]
    model: nn.Module
    info: Any
    checkpoint: dict[str, Any]

    def sparsify(self):
        """Re-apply the run's recipe (with its saved sparsity state) and return the handle."""
        from sparsetrain.handle import sparsify_

        handle = sparsify_(self.model, self.config["recipe"], **(self.config.get("recipe_overrides") or {}))
        if self.checkpoint.get("sparsity"):
            handle.load_state_dict(self.checkpoint["sparsity"])
        return handle


def load_run(path: str | Path) -> Run:
    """Load a run directory (or a checkpoint file inside one) for evaluation.

    Raises:
        FileNotFoundError: the folder has no ``config.yaml`` / checkpoint (the message names what is expected).
    """
    from sparsetrain.data import dataset_info
    from sparsetrain.models import create_model

    path = Path(path)
    ckpt_path = path if path.is_file() else path / CHECKPOINT
    run_dir = ckpt_path.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a sparsetrain run directory: expected config.yaml and "
                                f"{CHECKPOINT} (written by `sparsetrain train`)")
    config = yaml.safe_load(cfg_path.read_text())
    ckpt = load_checkpoint(ckpt_path)
    info = dataset_info(config["dataset"])
    model = create_model(config["model"], num_classes=info.num_classes, in_channels=info.channels,
                         width_mult=config.get("width_mult"))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return Run(run_dir, config, model, info, ckpt)
