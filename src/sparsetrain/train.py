"""The training loop, read top to bottom: ``setup`` -> per epoch ``train_one_epoch``, ``evaluate``,
``record_epoch`` -> ``finalize``.

Everything a run produces goes into its run directory (:class:`sparsetrain.runs.RunDir`), which the run locks for
its whole life (a second process on it fails at once); ``resume`` continues an interrupted run exactly (same batches,
same RNG streams, same optimizer and sparsity state), from an epoch's end or, with ``checkpoint_every``, from the
middle of an epoch.

Under torchrun the same loop runs data-parallel (:mod:`sparsetrain.distributed`): ``batch_size`` is the global
batch, each rank trains on its slice of it through DDP, evaluation is sharded and summed, and rank 0 alone writes the
run directory. With one process nothing of that is set up.

The step never waits for the device: the loss sum, the correct count and a NaN/Inf watch accumulate on the device,
and the host reads them only every ``log_every`` steps and at the end of the epoch (as nanoGPT reads its loss only at
its log interval). Operand densities are measured only on each epoch's last step, inside ``handle.measuring()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain import distributed, runs
from sparsetrain.data import dataset_info, make_loaders
from sparsetrain.handle import SparsityHandle, sparsify_
from sparsetrain.models import create_model, model_entrypoint
from sparsetrain.recipe import Recipe
from sparsetrain.runs import RunDir

__all__ = ["TrainConfig", "Session", "NonFiniteError", "TrainingInterrupted", "check_device", "train", "setup",
           "train_one_epoch", "evaluate", "record_epoch", "finalize", "format_summary", "TELEMETRY_POINTS",
           "CURVE_POINTS", "decay_into_gradients", "threshold_gradients_"]

log = logging.getLogger(__name__)

#: Telemetry samples per run when ``telemetry_every`` is not given: enough for a curve on a 1-epoch run.
TELEMETRY_POINTS = 20
#: Points of the intra-epoch training curve per run (the metrics' ``curve``), whatever the run length.
CURVE_POINTS = 40


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


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


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the built-in job: LeNet-5, SWAT-U 90%, bundled Fashion-MNIST.

    ``momentum`` and ``nesterov`` apply to ``optimizer: sgd``, ``betas`` to ``adam`` and ``adamw`` (AdamW decouples
    the weight decay). ``amp`` runs the forward pass and the loss under ``torch.autocast`` in bfloat16 or float16
    (float16 on CUDA only, with a gradient scaler); parameters and their gradients stay float32.

    ``telemetry_every: null`` (the default) samples the sparsity monitor about :data:`TELEMETRY_POINTS` times per
    run, whatever its length; the run's config records the interval used. ``tensorboard``
    also writes the telemetry and the per-epoch metrics to ``<run>/tensorboard`` (needs ``sparsetrain[tensorboard]``).
    ``data_dir: null`` reads ``$SPARSETRAIN_DATA``; the run's config records the folder the data was read from.

    ``checkpoint_every: N`` also checkpoints every N steps inside an epoch, so a killed long epoch loses at most N
    steps (resumed exactly at world size 1). Data-parallel runs (under torchrun): ``batch_size`` is the global batch;
    ``sync_bn`` shares BatchNorm statistics (needs a GPU backend); ``check_consistency: K`` checksums weights and
    weight masks across ranks every K steps and fails loudly on a difference; ``grad_compression: d`` all-reduces
    only the top ``d`` fraction of each gradient bucket, with error feedback (:mod:`sparsetrain.comm`).
    """

    model: str = "lenet5"
    dataset: str = "fashion_mnist_small"
    data_dir: str | None = None
    width_mult: float | None = None
    recipe: Any = "swat-u"  # preset name, YAML path or dict
    recipe_overrides: dict[str, Any] = field(default_factory=lambda: {"density": 0.1})
    epochs: int = 8
    batch_size: int = 64
    eval_batch_size: int = 1000
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    wd_exclude_bn_bias: bool = False
    label_smoothing: float = 0.0
    l1: float = 0.0
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for schedule=step
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    deterministic: bool = False
    channels_last: bool = False
    device: str = "cpu"
    telemetry_every: int | None = None  # steps; 0 disables the sparsity monitor; None: ~TELEMETRY_POINTS per run
    tensorboard: bool = False
    checkpoint_every: int | None = None  # steps between intra-epoch checkpoints; None: at epoch ends only
    sync_bn: bool = False  # data-parallel: SyncBatchNorm (GPU backends only)
    check_consistency: int = 0  # data-parallel: steps between cross-rank checksums of weights and masks; 0: off
    grad_compression: float | None = None  # data-parallel: top-K density of the gradient all-reduce; None: dense
    log_every: int = 50  # steps between host syncs: progress bar and NaN/Inf check
    out: str | None = None  # run directory; default runs/<model>-<recipe>-<time>
    quiet: bool = False

    SCHEDULES = ("cosine", "step", "constant")
    OPTIMIZERS = ("sgd", "adam", "adamw")
    AMP = ("none", "bf16", "fp16")

    def __post_init__(self) -> None:
        for key, valid in (("schedule", self.SCHEDULES), ("optimizer", self.OPTIMIZERS), ("amp", self.AMP)):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key} {getattr(self, key)!r} is not one of {', '.join(valid)}")
        for k in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1 (steps; null: at epoch ends only), got "
                             f"{self.checkpoint_every!r}")
        if not isinstance(self.check_consistency, int) or self.check_consistency < 0:
            raise ValueError(f"check_consistency must be an integer >= 0 (steps; 0: off), got {self.check_consistency!r}")
        if self.grad_compression is not None and not (isinstance(self.grad_compression, (int, float))
                                                      and 0 < self.grad_compression <= 1):
            raise ValueError(f"grad_compression must be a density in (0, 1] (the fraction of each gradient bucket "
                             f"sent) or null for the dense all-reduce, got {self.grad_compression!r}")
        if self.telemetry_every is not None and (not isinstance(self.telemetry_every, int) or self.telemetry_every < 0):
            raise ValueError(f"telemetry_every must be an integer >= 0 (0: off), got {self.telemetry_every!r}")
        for k in ("train_subset", "test_subset"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{k} must be an integer >= 1 (or null for the whole split), got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas!r}")
        self.betas = [float(b) for b in betas]
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
        if self.amp == "fp16" and torch.device(self.device).type != "cuda":
            raise ValueError(f"fp16 autocast needs CUDA; use --amp bf16 on CPU (device is {self.device!r})")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - set(cls.fields())
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(cls.fields())}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    env: distributed.DistEnv = field(default_factory=distributed.DistEnv)
    net: nn.Module | None = None  # what the training step calls: the DDP wrapper of ``model``, or ``model`` itself
    comm: Any = None  # state of the top-K gradient communication hook (grad_compression)
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the run-directory lock, the group
    monitor: Any = None
    tb_writer: Any = None  # torch.utils.tensorboard.SummaryWriter of --tensorboard
    start_epoch: int = 0
    start_batch: int = 0  # resumed mid-epoch: batches of ``start_epoch`` already done
    checkpoint_step: int | None = None  # the step of the last checkpoint written or resumed from
    partial: dict[str, Any] | None = None  # resumed mid-epoch: that epoch's running totals
    step: int = 0


# ---------------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers, so the checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_keys, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos),
            int(has_gauss), float(cached)], "python": [version, torch.tensor(py_keys, dtype=torch.int64), py_gauss]}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_keys, py_gauss = s["python"]
    random.setstate((version, tuple(int(k) for k in py_keys.tolist()), py_gauss))


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    if not cfg.wd_exclude_bn_bias:
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            # BN affine parameters and biases are excluded (the ImageNet recipe of SWAT / Goyal et al.).
            (no_decay if isinstance(m, nn.modules.batchnorm._NormBase) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: nn.Module, cfg: TrainConfig, recipe: Recipe | None = None) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = opt_cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
    if _thresholds_all_gradients(recipe):
        decay_into_gradients(opt)
    return opt


#: Param-group key holding the coupled L2 coefficient the loop adds to the gradient itself (the group's own
#: ``weight_decay`` is then 0). Kept in the group so the optimizer's state_dict, and so a resume, carries it.
GRAD_L2_KEY = "grad_l2"


def _thresholds_all_gradients(recipe: Recipe | None) -> bool:
    return recipe is not None and recipe.gradient_threshold is not None and \
        recipe.gradient_threshold_scope == "all_after_decay"


def _decoupled(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    # AdamW decays the weights directly, not through the gradient (newer torch marks it in the group as well).
    return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def decay_into_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Move each param group's coupled L2 weight decay out of the optimizer, for :func:`threshold_gradients_`.

    TensorQuant's gradient-threshold study thresholds the gradient *after* the L2 term is added, so the term must be
    in the gradient when it is thresholded: the group's ``weight_decay`` goes to the ``grad_l2`` key and is set to 0
    (added once, by :func:`threshold_gradients_`). Decoupled decay (AdamW) stays in the optimizer. Idempotent.
    """
    for group in optimizer.param_groups:
        if not _decoupled(optimizer, group) and group.get("weight_decay", 0.0) and GRAD_L2_KEY not in group:
            group[GRAD_L2_KEY], group["weight_decay"] = group["weight_decay"], 0.0


@torch.no_grad()
def threshold_gradients_(optimizer: torch.optim.Optimizer, threshold: float) -> None:
    """TensorQuant's gradient study, in place: ``g += grad_l2 * p``, then ``g = 0`` where ``|g| <= threshold``.

    Acts on every parameter of ``optimizer`` that has a gradient (biases and BatchNorm included), between backward
    (and AMP unscaling) and ``optimizer.step()``; the L2 coefficient is the one :func:`decay_into_gradients` moved
    out of each group. Stays on the device (no host sync).
    """
    for group in optimizer.param_groups:
        wd = group.get(GRAD_L2_KEY, 0.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            if wd:
                p.grad.add_(p, alpha=wd)
            p.grad.masked_fill_(p.grad.abs() <= threshold, 0)  # |g| > T kept, as TensorQuant


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Multiplier of the base lr at iteration ``it``: linear warm-up, then step or cosine decay (per iteration)."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def fn(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warm) / max(1, total - warm))))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(it >= m * steps_per_epoch for m in cfg.milestones)
        return 1.0

    return fn


def _autocast(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the forward pass's autocast context (a no-op for ``amp='none'``, so fp32 runs are unchanged)."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def _overall_densities(densities: dict[str, dict[str, float]], flops) -> tuple[float, float]:
    """Weight and activation density, element-weighted over all conv/linear layers (dense ones count as 1).

    Weights are weighted by their element counts, activations by the elements each layer saves for its weight
    gradient, as the papers average them; the per-layer densities are the handle's.
    """
    from sparsetrain.accounting import layer_density

    w_total = sum(r.weight_elements for r in flops.layers)
    a_total = sum(r.saved_activation_elements for r in flops.layers)
    w_kept = sum(layer_density(densities, r.name, "weight") * r.weight_elements for r in flops.layers)
    a_kept = sum(layer_density(densities, r.name, "input_for_grad_weight") * r.saved_activation_elements
                 for r in flops.layers)
    return w_kept / max(1, w_total), a_kept / max(1, a_total)


class _Totals:
    """Loss, correct count and gradient norm of every step, left on the device until :meth:`read` (one host sync).

    The per-step values are only referenced between reads (a few dozen 0-dim tensors), so a step launches no extra
    kernels and never waits for the device; the sums are then formed on the host in step order, exactly as a
    per-step ``loss.item()`` accumulation would.
    """

    def __init__(self, loss_is_mean: bool = True) -> None:
        self.loss_is_mean = loss_is_mean  # a training step's loss is the batch mean, an evaluation batch's the sum
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self._steps: list[int] = []
        self._sizes: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []

    def add(self, step: int, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor,
            grad_norm: torch.Tensor | None = None) -> None:
        """Record one step (or evaluation batch)."""
        self._steps.append(step)
        self._sizes.append(len(y))
        self._losses.append(loss.detach())
        self._correct.append((out.argmax(1) == y).sum())
        if grad_norm is not None:
            self._grad_norms.append(grad_norm)

    def state(self) -> dict[str, float]:
        """The running totals (after :meth:`read`), for a mid-epoch checkpoint."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}

    def restore(self, state: dict[str, float]) -> None:
        self.loss_sum, self.correct, self.seen = float(state["loss_sum"]), int(state["correct"]), int(state["seen"])

    @staticmethod
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' mid-epoch states as one: totals summed, rank 0's learning-rate sum and curve."""
        out = dict(parts[0])
        for k in ("loss_sum", "correct", "seen"):
            out[k] = sum(p[k] for p in parts)
        return out

    def read(self) -> list[tuple[int, int, float, float, int]]:
        """Fold the recorded steps into the totals; returns ``(step, size, loss, grad norm, correct)`` of each step
        (one sync)."""
        if not self._steps:
            return []
        parts = [torch.stack(self._losses).double(), torch.stack(self._correct).double()]
        if self._grad_norms:
            parts.append(torch.stack(self._grad_norms).double())
        values = torch.cat(parts).tolist()
        k = len(self._steps)
        losses, corrects, norms = values[:k], values[k:2 * k], values[2 * k:] or [0.0] * k
        for size, loss, c in zip(self._sizes, losses, corrects):
            self.loss_sum += loss * size if self.loss_is_mean else loss
            self.correct += int(c)
            self.seen += size
        rows = list(zip(self._steps, self._sizes, losses, norms, (int(c) for c in corrects)))
        self._steps, self._sizes, self._losses, self._correct, self._grad_norms = [], [], [], [], []
        return rows


def _check_finite(rows: list[tuple[int, int, float, float, int]], epoch: int, run_dir: RunDir) -> None:
    """Raise at the first step whose loss or gradient norm is NaN/Inf."""
    for step, _, loss, grad_norm, _ in rows:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at epoch {epoch} step {step} (loss {loss}, grad norm {grad_norm}; found at the "
                f"check after step {rows[-1][0]}); the last good checkpoint is kept in {run_dir.path}. Lower the "
                "learning rate or check the recipe.")


# ---------------------------------------------------------------------------------------------- setup
def check_device(name: str) -> torch.device:
    """The device, or ValueError when this machine does not have it (before anything is read or written)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name}: no CUDA device is available on this machine (torch "
                             f"{torch.__version__}, {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _resolved_data_dir(cfg: TrainConfig) -> str | None:
    """The data folder to record: ``data_dir`` as given, else the ``SPARSETRAIN_DATA`` root holding the dataset.

    None when neither names a folder holding it (the bundled subset read from the package needs none).
    """
    import os
    from pathlib import Path

    from sparsetrain.data import DATA_ENV_VAR, candidate_dirs

    if cfg.data_dir is not None:
        return str(cfg.data_dir)
    env = os.environ.get(DATA_ENV_VAR)
    if not env:
        return None
    for root in (Path(r).expanduser().resolve() for r in env.split(os.pathsep) if r):
        if any(d.is_dir() and root in (d, *d.parents) for d in candidate_dirs(cfg.dataset, root)):
            return str(root)
    return None


def _telemetry_every(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``telemetry_every`` as given, else about :data:`TELEMETRY_POINTS` samples over the whole run."""
    if cfg.telemetry_every is not None:
        return cfg.telemetry_every
    return max(1, (cfg.epochs * steps_per_epoch) // TELEMETRY_POINTS)


def _open_run(cfg: TrainConfig, resume, epochs: int | None) -> tuple[TrainConfig, RunDir, dict[str, Any] | None]:
    """The config, the run directory and (resuming) the checkpoint; fails on bad names before anything is written."""
    if resume is None:
        model_entrypoint(cfg.model)
        dataset_info(cfg.dataset)
        Recipe.load(cfg.recipe, **(cfg.recipe_overrides or {}))
        check_device(cfg.device)
        run_dir = RunDir(cfg.out) if cfg.out else RunDir.default(cfg.model, cfg.recipe)
        if run_dir.path.exists() and not run_dir.path.is_dir():
            raise FileExistsError(f"--out {run_dir.path} is an existing file, not a folder; a run directory is a "
                                  "folder: choose another --out")
        if run_dir.has_checkpoint():
            raise FileExistsError(f"{run_dir.path} already holds a run; continue it with --resume {run_dir.path} "
                                  "or choose another --out")
        # Record a recipe file's content, not its path: resume must not depend on the working directory.
        return dataclasses.replace(cfg, recipe=runs.self_contained_recipe(cfg.recipe)), run_dir, None
    # A resumed run takes its saved config: only more epochs may be asked for.
    run_dir = RunDir.containing(resume)
    ckpt = runs.load_checkpoint(resume)
    saved = TrainConfig.from_dict(run_dir.read_config())
    check_device(saved.device)
    return dataclasses.replace(saved, epochs=epochs or saved.epochs, quiet=cfg.quiet), run_dir, ckpt


def _restore(s: Session, ckpt: dict[str, Any]) -> None:
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
        _set_rng_state(own["rng"])
    elif env.rank == 0:
        _set_rng_state(ckpt["rng"])
    else:
        _seed_everything(distributed.rank_seed(s.cfg.seed + ckpt["step"], env.rank), s.cfg.deterministic)
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
            s.partial = _Totals.merge(parts) if env.rank == 0 else None
    if env.is_main:
        s.run_dir.truncate_after(epoch=s.start_epoch, step=s.step)
    where = f"epoch {s.start_epoch}" + (f" batch {s.start_batch}" if s.start_batch else "")
    log.info("resuming %s from %s (step %d)", s.run_dir.path, where, s.step)


def _join(cfg: TrainConfig, exits: contextlib.ExitStack) -> tuple[distributed.DistEnv, torch.device]:
    """This process's rank and device: the process group torchrun describes (left again when the run ends)."""
    import torch.distributed as dist

    owned = distributed.env_world_size() > 1 and not (dist.is_available() and dist.is_initialized())
    env, device = distributed.init(cfg.device)
    if owned:
        exits.callback(distributed.shutdown)
    if env.distributed:
        if not env.is_main:
            logging.getLogger("sparsetrain").setLevel(logging.WARNING)  # one log: rank 0's
        if cfg.sync_bn and device.type not in ("cuda", "xpu", "hpu"):
            raise ValueError(f"sync_bn: torch's SyncBatchNorm runs only on GPU devices, not on {device.type}; "
                             "train without --sync-bn (each rank then normalises with its own batch statistics)")
    return env, device


def _lock_run(run_dir: RunDir, env: distributed.DistEnv, exits: contextlib.ExitStack, fresh: bool) -> None:
    """Rank 0 locks the run directory for the life of the run; every rank fails if it could not."""
    failure = None
    if env.is_main:
        try:
            exits.enter_context(run_dir.lock())
            if fresh and run_dir.has_checkpoint():  # another run finished there between our check and the lock
                raise FileExistsError(f"{run_dir.path} already holds a run; continue it with --resume "
                                      f"{run_dir.path} or choose another --out")
        except Exception as e:
            failure = e
    message = distributed.broadcast_object(None if failure is None else str(failure), env)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run: {message}")


def setup(cfg: TrainConfig, resume=None, epochs: int | None = None) -> Session:
    """Config, process group, run-directory lock, data, model, sparsity, optimizer, schedule; restored from
    ``resume`` if given. The session's ``exits`` releases the lock (and leaves the group) when closed."""
    cfg, run_dir, ckpt = _open_run(cfg, resume, epochs)
    if cfg.tensorboard:
        _require_tensorboard()  # before anything is written
    exits = contextlib.ExitStack()
    try:
        env, device = _join(cfg, exits)
        _seed_everything(cfg.seed, cfg.deterministic)
        # Data: whole uint8 tensors in memory; the batch order depends only on (seed, epoch), on every rank. Read
        # before the lock: a missing dataset must fail with nothing written, not even the lock's folder.
        loaders = make_loaders(
            cfg.dataset, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed, augment=cfg.augment, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
            channels_last=cfg.channels_last)
        if env.distributed:
            loaders[0].shard(env.rank, env.world_size)
            loaders[1].shard(env.rank, env.world_size)
        _lock_run(run_dir, env, exits, fresh=resume is None)
        if resume is not None:
            # Read again under the lock: the run we waited on may have checkpointed after our first read.
            ckpt = runs.load_checkpoint(resume)
        return _build(cfg, run_dir, ckpt, env, device, exits, loaders)
    except BaseException:
        exits.close()
        raise


def _build(cfg: TrainConfig, run_dir: RunDir, ckpt: dict[str, Any] | None, env: distributed.DistEnv,
           device: torch.device, exits: contextlib.ExitStack, loaders: tuple[Any, Any, Any]) -> Session:
    from sparsetrain.accounting import count_flops
    from sparsetrain.telemetry import JsonlSink, Monitor

    train_loader, test_loader, info = loaders

    # The config records what was used: the data folder an environment variable chose, the telemetry interval.
    cfg = dataclasses.replace(cfg, data_dir=_resolved_data_dir(cfg),
                              telemetry_every=_telemetry_every(cfg, len(train_loader)))
    config = {**cfg.to_dict(), "out": str(run_dir.path)}
    if env.is_main:  # only now, with names and data known to be good, is the run directory written
        run_dir.create()
        run_dir.write_config(config)

    model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels,
                         width_mult=cfg.width_mult).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    input_shape = (info.channels, info.image_size, info.image_size)
    dense_flops = count_flops(model, input_shape)  # layer shapes, traced once on the dense model
    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm2d
    handle = sparsify_(model, cfg.recipe, **(cfg.recipe_overrides or {}))
    handle.set_rank(env.rank)
    optimizer = _make_optimizer(model, cfg, handle.recipe)
    net, comm = _data_parallel(model, cfg, env, device)
    if env.rank > 0:  # dropout and anything else random differ per rank; rank 0 keeps the single-process streams
        _seed_everything(distributed.rank_seed(cfg.seed, env.rank), cfg.deterministic)
    s = Session(
        cfg=cfg, config=config, run_dir=run_dir, device=device, train_loader=train_loader, test_loader=test_loader,
        input_shape=input_shape, model=model, handle=handle, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, len(train_loader))),
        scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None, dense_flops=dense_flops,
        autocast=_autocast(cfg.amp, device),
        l1_params=[m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
        env=env, net=net, comm=comm, exits=exits)
    if ckpt is not None:
        _restore(s, ckpt)
    if cfg.tensorboard and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # Purge what a killed process logged after the checkpoint: steps > s.step (the epoch record and the curve
        # point at s.step itself belong to the checkpointed epoch and must stay).
        s.tb_writer = SummaryWriter(log_dir=str(run_dir.tensorboard_dir), purge_step=s.step + 1 if s.step else None)
    if cfg.telemetry_every and env.is_main:
        sinks: list[Any] = [JsonlSink(run_dir.telemetry_path)]
        if cfg.tensorboard:
            from sparsetrain.telemetry.sinks import TensorBoardSink

            sinks.append(TensorBoardSink(run_dir.tensorboard_dir))
        s.monitor = Monitor(model, every=cfg.telemetry_every, sinks=sinks, start_step=s.step)
    return s


def _data_parallel(model: nn.Module, cfg: TrainConfig, env: distributed.DistEnv,
                   device: torch.device) -> tuple[nn.Module, Any]:
    """The DDP wrapper the training step calls (``model`` itself on one process) and the gradient hook's state."""
    if not env.distributed:
        for key in ("grad_compression", "check_consistency", "sync_bn"):
            if getattr(cfg, key) not in (None, 0, False):
                log.warning("%s applies to multi-process runs only (torchrun); ignored on one process", key)
        return model, None
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    comm = None
    if cfg.grad_compression is not None:
        from sparsetrain.comm import register_topk_hook

        comm = register_topk_hook(net, density=cfg.grad_compression)
    return net, comm


TENSORBOARD_HINT = "pip install 'sparsetrain[tensorboard]'"


def _require_tensorboard() -> None:
    """ImportError naming the extra to install when ``torch.utils.tensorboard`` cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e}); install it with: "
                          f"{TENSORBOARD_HINT}") from None


# ---------------------------------------------------------------------------------------------- one epoch
def _forward_backward(s: Session, x: torch.Tensor, y: torch.Tensor,
                      global_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and loss (under autocast when asked), then backward; returns the logits and the batch's mean loss.

    ``global_n`` is the size of the global batch this rank's ``x`` is a slice of (``len(x)`` on one process).
    """
    with s.autocast():
        out = s.net(x)
        if s.env.distributed:
            # The global batch's mean loss whatever the slices' sizes: DDP averages the ranks' gradients, so each
            # rank's loss sum is scaled by world size / global batch.
            loss_sum = F.cross_entropy(out, y, label_smoothing=s.cfg.label_smoothing, reduction="sum")
            loss, logged = loss_sum * (s.env.world_size / global_n), loss_sum.detach() / len(y)
        else:
            loss = logged = F.cross_entropy(out, y, label_smoothing=s.cfg.label_smoothing)
    if s.cfg.l1:
        l1 = s.cfg.l1 * sum(w.abs().sum() for w in s.l1_params)
        loss, logged = loss + l1, logged + l1.detach()
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is None:
        loss.backward()
    else:
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.optimizer)  # true gradients for the telemetry; scaler.step skips non-finite ones
    r = s.handle.recipe
    threshold_all = _thresholds_all_gradients(r)
    if threshold_all:
        threshold_gradients_(s.optimizer, r.gradient_threshold)
    if s.monitor is not None and (threshold_all or s.env.distributed):
        # The telemetry's dW is the gradient the update really gets: thresholded here, or averaged by DDP after the
        # monitor's accumulate hooks ran.
        s.monitor.recount_weight_grads()
    return out, logged


def _grad_norm(s: Session) -> torch.Tensor | None:
    """Total gradient norm, left on the device: only its finiteness is checked, at the next log interval."""
    if s.scaler is not None:
        return None  # with fp16 an overflowing step is expected: the scaler skips it and lowers the scale
    return torch.nn.utils.get_total_norm([p.grad for p in s.model.parameters() if p.grad is not None])


def _optimizer_step(s: Session) -> None:
    if s.scaler is None:
        s.optimizer.step()
    else:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.scheduler.step()
    s.handle.step(s.optimizer)


def train_one_epoch(s: Session, epoch: int) -> dict[str, float]:
    """One pass over the training set (the rest of it, when resumed mid-epoch); returns its loss, accuracy, sample
    count and time (summed over ranks).

    Raises:
        NonFiniteError: the loss or the gradients became NaN/Inf (found at the next log interval).
        ConsistencyError: ``check_consistency`` found ranks that no longer hold the same weights or masks.
    """
    cfg = s.cfg
    start, partial = (s.start_batch, s.partial) if epoch == s.start_epoch else (0, None)
    s.start_batch, s.partial = 0, None
    s.train_loader.set_epoch(epoch, start)
    s.handle.set_epoch(epoch)
    s.net.train()
    totals = _Totals()
    loader = s.train_loader
    last = len(loader) - 1
    curve = _Curve(max(1, (cfg.epochs * len(loader)) // CURVE_POINTS))
    lr_sum = 0.0
    if partial is not None:
        totals.restore(partial)
        curve.restore(partial["curve"])
        lr_sum = partial["lr_sum"]
    bar = _progress(loader, epoch, cfg, s.env, start)
    comm_before = s.comm.bytes_sent if s.comm is not None else 0
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(bar, start):
        lr_sum += s.optimizer.param_groups[0]["lr"]  # the rate this step uses (a host float: no sync)
        x, y = x.to(s.device), y.to(s.device)
        global_n = min(loader.batch_size, loader.num_samples - i * loader.batch_size)
        # Densities are measured on the last step only: the epoch's metrics report them, counting costs a pass.
        with s.handle.measuring() if i == last else contextlib.nullcontext():
            out, loss = _forward_backward(s, x, y, global_n)
        totals.add(s.step, out, y, loss, _grad_norm(s))
        if s.monitor is not None:
            s.monitor.step(epoch=epoch)  # records dW before the update consumes it
        _optimizer_step(s)
        s.step += 1
        if cfg.check_consistency and s.step % cfg.check_consistency == 0:
            distributed.check_consistency(s.model, s.handle.shared_state(), s.env, s.step)
        checkpoint = cfg.checkpoint_every is not None and s.step % cfg.checkpoint_every == 0 and i != last
        if (i + 1) % cfg.log_every == 0 or i == last or checkpoint:
            rows = totals.read()  # the only host sync of the loop
            _check_finite(rows, epoch, s.run_dir)
            curve.add(rows)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{totals.loss_sum / totals.seen:.3f}",
                                acc=f"{totals.correct / totals.seen:.3f}", refresh=False)
        if checkpoint:
            _save_checkpoint(s, epoch - 1, in_epoch={"epoch": epoch, "batches": i + 1, **totals.state(),
                                                     "lr_sum": lr_sum, "curve": curve.state()})
    train_time = time.perf_counter() - t0
    loss_sum, correct, seen = distributed.all_reduce_sum([totals.loss_sum, totals.correct, totals.seen], s.env,
                                                         s.device)
    stats = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "seen": seen, "time_s": train_time,
             "lr_mean": lr_sum / max(1, last + 1), "curve": curve.points()}
    if s.comm is not None:
        # What this rank put on the wire for the gradients, against a dense all-reduce of the same parameters.
        steps = len(loader) - start
        sent = s.comm.bytes_sent - comm_before
        dense = sum(p.numel() * p.element_size() for p in s.model.parameters() if p.requires_grad)
        stats["comm"] = {"density": s.comm.density, "bytes_sent": sent, "steps": steps,
                         "bytes_per_step": sent / max(1, steps), "dense_bytes_per_step": dense}
    return stats


def _save_checkpoint(s: Session, epoch: int, in_epoch: dict[str, Any] | None = None) -> None:
    """Checkpoint after ``epoch`` (the last finished one), or inside the next one (``in_epoch``: its position and
    running totals). Every rank takes part (their own streams are gathered); rank 0 writes."""
    own = {"sparsity": s.handle.state_dict(), "rng": _rng_state(),
           **({"comm": s.comm.state_dict()} if s.comm is not None else {})}
    ranks = distributed.gather_objects(own, s.env) if s.env.distributed else None
    parts = None
    if in_epoch is not None:
        parts = distributed.gather_objects(in_epoch, s.env)
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


class _Curve:
    """The intra-epoch training curve: mean loss and accuracy over every ``every`` steps (from the per-step values
    the log-interval sync already brings to the host), keyed by the step that ends the bucket (1-based count of
    steps done, so the epoch's last point falls on the epoch record's ``step``)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._rows: list[tuple[int, int, float, float, int]] = []
        self._points: list[list[float]] = []

    def add(self, rows: list[tuple[int, int, float, float, int]]) -> None:
        for row in rows:
            self._rows.append(row)
            if (row[0] + 1) % self.every == 0:
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            n = sum(r[1] for r in self._rows)
            loss = sum(r[2] * r[1] for r in self._rows) / n
            acc = sum(r[4] for r in self._rows) / n
            self._points.append([self._rows[-1][0] + 1, loss, acc])
            self._rows = []

    def state(self) -> dict[str, list]:
        """The unfinished bucket and the points so far, for a mid-epoch checkpoint."""
        return {"rows": [list(r) for r in self._rows], "points": [list(p) for p in self._points]}

    def restore(self, state: dict[str, list]) -> None:
        self._rows = [tuple(r) for r in state["rows"]]
        self._points = [list(p) for p in state["points"]]

    def points(self) -> dict[str, list[float]]:
        """``{"step": [...], "train_loss": [...], "train_acc": [...]}`` (the epoch's partial last bucket included)."""
        self._flush()
        cols = list(zip(*self._points)) or [(), (), ()]
        return {"step": [int(v) for v in cols[0]], "train_loss": list(cols[1]), "train_acc": list(cols[2])}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none",
             env: distributed.DistEnv | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over a loader (one host sync, at the end).

    With a data-parallel ``env`` each rank evaluates its shard of the loader and the sums are all-reduced, so every
    rank returns the figures of the whole test set.
    """
    model.eval()
    autocast = _autocast(amp, torch.device(device))
    totals = _Totals(loss_is_mean=False)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x)
        totals.add(0, out, y, F.cross_entropy(out.float(), y, reduction="sum"))
    totals.read()
    loss_sum, correct, seen = distributed.all_reduce_sum([totals.loss_sum, totals.correct, totals.seen],
                                                         env or distributed.DistEnv(), torch.device(device))
    return loss_sum / max(1, seen), correct / max(1, seen)


def record_epoch(s: Session, epoch: int, stats: dict[str, float], densities: dict[str, dict[str, float]],
                 test_loss: float, test_acc: float) -> dict[str, Any]:
    """Append the epoch's metrics, then checkpoint (in this order: every checkpoint has its metrics line).

    Data-parallel: every rank calls it (the checkpoint gathers the ranks' own states); rank 0 writes, and the
    densities are rank 0's (activation densities depend on the rank's slice of the batch).
    """
    w_density, a_density = _overall_densities(densities, s.dense_flops)
    report = s.dense_flops.with_densities(densities)
    metrics = {
        # lr: the mean rate the epoch's steps used (under cosine the end-of-epoch value is 0 on the last epoch)
        "epoch": epoch, "step": s.step, "lr": stats["lr_mean"], "lr_end": s.optimizer.param_groups[0]["lr"],
        "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
        "test_loss": test_loss, "test_acc": test_acc, "time_s": stats["time_s"],
        "samples_per_s": stats["seen"] / stats["time_s"], "weight_density": w_density,
        "activation_density": a_density, "training_flops_reduction_pct": report.training_flops_reduction_pct,
        "densities": densities, "curve": stats["curve"],
    }
    if s.env.distributed:
        metrics["world_size"] = s.env.world_size
    if "comm" in stats:
        metrics["comm"] = stats["comm"]  # gradient bytes rank 0 sent (top-K hook), and a dense all-reduce's
    if s.env.is_main:
        s.run_dir.append_metrics(metrics)
        if s.tb_writer is not None:
            _tensorboard_epoch(s.tb_writer, metrics, stats, s.step)
            if "comm" in metrics:
                s.tb_writer.add_scalar("comm/bytes_per_step", metrics["comm"]["bytes_per_step"], s.step)
    _save_checkpoint(s, epoch)
    log.info("epoch %d/%d  loss %.4f  train %.2f%%  test %.2f%%  W density %.3f  act density %.3f  "
             "%.0f samples/s", epoch + 1, s.cfg.epochs, metrics["train_loss"], 100 * metrics["train_acc"],
             100 * test_acc, w_density, a_density, metrics["samples_per_s"])
    return metrics


def _tensorboard_epoch(writer, metrics: dict[str, Any], stats: dict[str, Any], step: int) -> None:
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "weight_density", "activation_density",
                "training_flops_reduction_pct", "samples_per_s"):
        writer.add_scalar(f"epoch/{key}", metrics[key], step)
    for st, loss, acc in zip(*stats["curve"].values()):
        writer.add_scalar("step/train_loss", loss, st)
        writer.add_scalar("step/train_acc", acc, st)
    writer.flush()


def finalize(s: Session) -> dict[str, Any]:
    """Write the FLOP/memory accounting and the summary from the last epoch's measured densities (rank 0; the
    other ranks receive its summary)."""
    from sparsetrain.accounting import memory_report

    summary = None
    if s.env.is_main:
        metrics = s.run_dir.read_metrics()
        densities = metrics[-1]["densities"]
        report = s.dense_flops.with_densities(densities)
        # Memory of one training step at this batch size, dense vs sparse storage of the sparsified operands
        # (analytic; `sparsetrain flops --memory` adds a measured figure). Per-layer rows stay in the FLOP table.
        memory = memory_report(s.model, s.input_shape, densities, batch_size=s.cfg.batch_size,
                               optimizer=s.optimizer).to_dict()
        memory.pop("layers", None)
        flops = {**report.to_dict(), "memory": memory}
        s.run_dir.write_flops(flops)
        recipe = s.handle.recipe
        summary = runs.summarize(s.config, metrics, flops, recipe=recipe.preset or "custom", density=recipe.density,
                                 epochs=s.cfg.epochs, run_dir=s.run_dir.path)
        s.run_dir.write_summary(summary)
    return distributed.broadcast_object(summary, s.env)


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume=None, epochs: int | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says, or continue the run in ``resume``; returns the summary dict.

    A resumed run uses the config saved in its run directory (``cfg`` only sets ``quiet``); ``epochs`` may extend
    it. Under torchrun every rank calls it and gets the summary.

    Raises:
        NonFiniteError: the loss or the gradients became NaN/Inf (the last good checkpoint stays on disk).
        runs.RunLockedError: another process is running in the run directory.
    """
    s = setup(cfg, resume, epochs)
    with s.exits:  # the run directory stays locked until the summary is written
        done = s.start_epoch - 1 if s.start_epoch > 0 else None  # the last finished epoch
        try:
            for epoch in range(s.start_epoch, s.cfg.epochs):
                stats = train_one_epoch(s, epoch)
                densities = s.handle.densities()  # measured on the epoch's last training step
                distributed.broadcast_buffers(s.model, s.env)  # every rank evaluates rank 0's model
                test_loss, test_acc = evaluate(s.model, s.test_loader, s.device, s.cfg.amp, s.env)
                record_epoch(s, epoch, stats, densities, test_loss, test_acc)
                done = epoch
        except KeyboardInterrupt:
            # Checkpoints are written atomically, so the last one is complete whenever Ctrl-C arrives; metrics written
            # after it are dropped by --resume.
            raise TrainingInterrupted(s.run_dir, done, s.checkpoint_step) from None
        finally:
            if s.monitor is not None:
                s.monitor.close()
            if s.tb_writer is not None:
                s.tb_writer.close()
        summary = finalize(s)
        distributed.barrier(s.env)
        return summary


def _progress(loader, epoch: int, cfg: TrainConfig, env: distributed.DistEnv | None = None, initial: int = 0):
    if cfg.quiet or (env is not None and not env.is_main):
        return loader
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch log line.
    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch", dynamic_ncols=True,
                disable=None, initial=initial, total=len(loader))


def format_summary(s: dict[str, Any]) -> str:
    """The final table the CLI prints."""
    f = s["flops"]
    rows = [
        ("run directory", s["run_dir"]),
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("recipe", f"{s['recipe']}" + (f" (density {s['density']:g})" if s["density"] is not None else "")),
        ("test accuracy", f"{100 * s['final_test_acc']:.2f}% (best {100 * s['best_test_acc']:.2f}%)"),
        ("weight density", f"{100 * s['weight_density']:.1f}% of conv/linear weights"),
        ("activation density", f"{100 * s['activation_density']:.1f}% of saved activations"),
        ("training FLOPs saved", f"{f['training_flops_reduction_pct']:.1f}%"),
        ("inference FLOPs saved", f"{f['inference_flops_reduction_pct']:.1f}%"),
        ("activation memory saved", f"{f['act_memory_reduction_pct']:.1f}%"),
        ("model compression", f"{f['model_compression_x']:.2f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
