"""A run's state and its checkpoint: the :class:`Session` the loop advances; open a run (fresh or resumed), save it
(every rank's own streams gathered), restore it exactly.

A checkpoint loads with ``weights_only=True``: RNG states are stored as tensors and plain numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn

from sparsetrain import runs
from sparsetrain.handle import SparsityHandle
from sparsetrain.runs import RunDir
from sparsetrain.training import parallel
from sparsetrain.training.config import TrainConfig, check_device, check_names, seed_everything
from sparsetrain.training.meters import Totals

__all__ = ["Session", "TrainingInterrupted", "open_run", "new_folders", "remove_new_run", "save_checkpoint", "restore",
           "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything :func:`setup` builds for one run; the loop functions read and advance it."""

    cfg: TrainConfig
    config: dict[str, Any]  # the resolved config as written to the run directory
    run_dir: RunDir
    device: torch.device
    train_loader: Any
    test_loader: Any
    input_shape: tuple[int, ...]
    model: nn.Module
    handle: SparsityHandle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    dense_flops: Any  # FlopReport of the dense model; each epoch re-counts it with the measured densities
    autocast: Callable[[], ContextManager]
    l1_params: list[nn.Parameter]
    grad_rule: Callable[[torch.optim.Optimizer], None] | None = None  # the recipe's rule on gradients, each step
    env: parallel.DistEnv = field(default_factory=parallel.DistEnv)
    net: nn.Module | None = None  # what the training step calls: the DDP wrapper of ``model``, or ``model`` itself
    eager_net: nn.Module | None = None  # ``net`` uncompiled: the steps that observe operands run it (--compile)
    comm: Any = None  # state of the top-K gradient communication hook (grad_compression)
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the run-directory lock, the group
    monitor: Any = None
    tb_writer: Any = None  # torch.utils.tensorboard.SummaryWriter of --tensorboard
    start_epoch: int = 0
    start_batch: int = 0  # resumed mid-epoch: batches of ``start_epoch`` already done
    checkpoint_step: int | None = None  # the step of the last checkpoint written or resumed from
    partial: dict[str, Any] | None = None  # resumed mid-epoch: that epoch's running totals
    step: int = 0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the run directory and its last complete epoch, to continue with ``--resume``.

    Attributes:
        run_dir: the run's directory.
        epoch: the last checkpointed epoch (0-based), or None when no epoch had finished.
        step: the step of the last checkpoint (an epoch's end or, with ``checkpoint_every``, inside one), or None
            when nothing was checkpointed.
    """

    def __init__(self, run_dir: RunDir, epoch: int | None, step: int | None = None) -> None:
        super().__init__(str(run_dir.path))
        self.run_dir = run_dir
        self.epoch = epoch
        self.step = step

    def __str__(self) -> str:
        if self.epoch is None and self.step is None:
            return (f"interrupted before the first epoch finished; nothing to resume in {self.run_dir.path} "
                    "(start again, with another --out or after removing it)")
        where = f"epoch {self.epoch + 1}" if self.epoch is not None else ""
        if self.step is not None:
            where = f"step {self.step}" + (f" (after {where})" if where else "")
        return (f"interrupted; {where} is checkpointed in {self.run_dir.path}; continue with: "
                f"sparsetrain train --resume {self.run_dir.path}")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers, so the checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_keys, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos),
            int(has_gauss), float(cached)], "python": [version, torch.tensor(py_keys, dtype=torch.int64), py_gauss]}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_keys, py_gauss = s["python"]
    random.setstate((version, tuple(int(k) for k in py_keys.tolist()), py_gauss))


def open_run(cfg: TrainConfig, resume, epochs: int | None) -> tuple[TrainConfig, RunDir, dict[str, Any] | None]:
    """The config, the run directory and (resuming) the checkpoint; fails on bad names before anything is written."""
    if resume is None:
        check_names(cfg)
        run_dir = RunDir(cfg.out) if cfg.out else RunDir.default(cfg.model, cfg.recipe)
        if run_dir.path.exists() and not run_dir.path.is_dir():
            raise FileExistsError(f"--out {run_dir.path} is an existing file, not a folder; a run directory is a "
                                  "folder: choose another --out")
        if run_dir.has_checkpoint():
            # A run still training there is "in use" (the lock names it), not "already holds a run": ask the lock.
            run_dir.lock().release()
            raise FileExistsError(f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} "
                                  "or choose another --out")
        top = next(p for p in (run_dir.path, *run_dir.path.parents) if p.exists())
        if not (top.is_dir() and os.access(top, os.W_OK | os.X_OK)):
            raise PermissionError(f"--out {run_dir.path}: cannot create it, {top} is not a writable folder; choose "
                                  "another --out")
        # Record a recipe file's content, not its path: resume must not depend on the working directory.
        return dataclasses.replace(cfg, recipe=runs.self_contained_recipe(cfg.recipe)), run_dir, None
    # A resumed run takes its saved config: only more epochs may be asked for.
    run_dir = RunDir.containing(resume)
    ckpt = runs.load_checkpoint(resume)
    saved = TrainConfig.from_dict(run_dir.read_config())
    check_device(saved.device)
    return dataclasses.replace(saved, epochs=epochs or saved.epochs, quiet=cfg.quiet), run_dir, ckpt


def new_folders(path: Path) -> list[Path]:
    """The folders of ``path`` (itself and its parents) that do not exist yet, deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_new_run(run_dir: RunDir, created: list[Path]) -> None:
    """Remove a refused run's traces: the run folder and the parents it created, while its lock is still held (so no
    other process can have started in it), if it holds no checkpoint. Parents are removed only when empty."""
    if not created or run_dir.has_checkpoint():
        return
    shutil.rmtree(run_dir.path, ignore_errors=True)
    for folder in created[1:]:
        try:
            folder.rmdir()
        except OSError:  # another run's folder appeared in it meanwhile: keep it
            break


def save_checkpoint(s: Session, epoch: int, in_epoch: dict[str, Any] | None = None) -> None:
    """Checkpoint after ``epoch`` (the last finished one), or inside the next one (``in_epoch``: its position and
    running totals). Every rank takes part (their own streams are gathered); rank 0 writes."""
    own = {"sparsity": s.handle.state_dict(), "rng": rng_state(),
           **({"comm": s.comm.state_dict()} if s.comm is not None else {})}
    ranks = parallel.gather_objects(own, s.env) if s.env.distributed else None
    parts = None
    if in_epoch is not None:
        parts = parallel.gather_objects(in_epoch, s.env)
    if s.env.is_main:
        state = {
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "sparsity": own["sparsity"], "epoch": epoch, "step": s.step,
            "rng": own["rng"], "config": s.config,
            **({"scaler": s.scaler.state_dict()} if s.scaler is not None else {}),
        }
        if ranks is not None:
            state.update(world_size=s.env.world_size, ranks=ranks)
        if parts is not None:
            state["in_epoch"] = {"epoch": in_epoch["epoch"], "batches": in_epoch["batches"], "ranks": parts}
        s.run_dir.save_checkpoint(state)
    s.checkpoint_step = s.step


def restore(s: Session, ckpt: dict[str, Any]) -> None:
    """Continue exactly where the checkpoint left off, and drop what the killed process wrote after it.

    A multi-process checkpoint keeps every rank's own streams (``ranks``: sparsity state with its generators, RNG
    states, communication residuals, the running totals of an unfinished epoch). Resumed on the same number of
    processes each rank takes its own; on another number, rank 0 continues rank 0's streams and every other rank
    starts fresh ones from ``(seed, rank, step)``: the batches are the same (they depend on the seed and epoch only),
    the pruning noise and dropout masks of ranks > 0 are new.
    """
    env = s.env
    s.model.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    ranks = ckpt.get("ranks") if ckpt.get("world_size", 1) == env.world_size else None
    own = ranks[env.rank] if ranks else None
    s.handle.load_state_dict(own["sparsity"] if own else ckpt["sparsity"])
    if own is None:
        s.handle.set_rank(env.rank)
    if s.scaler is not None and ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    if own is not None:
        set_rng_state(own["rng"])
    elif env.rank == 0:
        set_rng_state(ckpt["rng"])
    else:
        seed_everything(parallel.rank_seed(s.cfg.seed + ckpt["step"], env.rank), s.cfg.deterministic)
    if s.comm is not None and own is not None and own.get("comm") is not None:
        s.comm.load_state_dict(own["comm"])
    s.step = s.checkpoint_step = ckpt["step"]
    in_epoch = ckpt.get("in_epoch")
    if in_epoch is None:
        s.start_epoch = ckpt["epoch"] + 1
    else:
        s.start_epoch, s.start_batch = in_epoch["epoch"], in_epoch["batches"]
        parts = in_epoch["ranks"]
        if len(parts) == env.world_size:
            s.partial = parts[env.rank]
        else:  # another world size: rank 0 carries the epoch's totals so far, the global sums stay right
            s.partial = Totals.merge(parts) if env.rank == 0 else None
    if env.is_main:
        s.run_dir.truncate_after(epoch=s.start_epoch, step=s.step)
    where = f"epoch {s.start_epoch + 1}" + (f" batch {s.start_batch + 1}" if s.start_batch else "")  # 1-based
    log.info("resuming %s from %s (step %d)", s.run_dir.path, where, s.step)
