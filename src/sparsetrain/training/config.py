"""Everything a run is set up from: :class:`TrainConfig`, and the optimizer, learning-rate schedule, autocast and
seeds it asks for.

Nothing here reads data or writes a file; :func:`check_names` validates every name a config holds (model, dataset,
recipe, device) before the loop touches either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn

__all__ = ["TrainConfig", "TELEMETRY_POINTS", "check_device", "check_names", "make_optimizer", "lr_lambda",
           "autocast", "seed_everything", "resolved_data_dir", "telemetry_every", "check_same_config",
           "require_tensorboard", "TENSORBOARD_HINT"]

#: Telemetry samples per run when ``telemetry_every`` is not given: enough for a curve on a 1-epoch run.
TELEMETRY_POINTS = 20


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
    compile: bool = False  # torch.compile the training step's model (observed steps run eager)
    lean_allocator: bool = True  # sparsetrain.lean_allocator(): RSS follows the live tensors, fewer page faults
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
            raise ValueError(f"check_consistency must be an integer >= 0 (steps; 0: off), got "
                             f"{self.check_consistency!r}")
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


def check_names(cfg: TrainConfig) -> None:
    """ValueError/KeyError for a model, dataset, recipe or device this machine does not know, or a recipe whose layer
    patterns match nothing in the model (nothing is read: the model is built on the meta device)."""
    from sparsetrain.data import dataset_info
    from sparsetrain.models import create_model, model_entrypoint
    from sparsetrain.recipe import Recipe, resolve_layers

    model_entrypoint(cfg.model)
    info = dataset_info(cfg.dataset)
    recipe = Recipe.load(cfg.recipe, **(cfg.recipe_overrides or {}))
    check_device(cfg.device)
    quiet = logging.getLogger("sparsetrain")
    level = quiet.level
    quiet.setLevel(max(quiet.getEffectiveLevel(), logging.ERROR))  # the real build below warns, once
    try:
        try:
            with torch.device("meta"):
                model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels,
                                     width_mult=cfg.width_mult)
        except (RuntimeError, NotImplementedError):  # a model that reads its tensors while built: checked later
            return
        resolve_layers(model, recipe)
    finally:
        quiet.setLevel(level)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    if not cfg.wd_exclude_bn_bias:
        return [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            # BN affine parameters and biases are excluded (the ImageNet recipe of SWAT / Goyal et al.).
            (no_decay if isinstance(m, nn.modules.batchnorm._NormBase) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over ``model``'s parameters, as ``cfg`` says."""
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt_cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
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


def autocast(amp: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the forward pass's autocast context (a no-op for ``amp='none'``, so fp32 runs are unchanged)."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def resolved_data_dir(cfg: TrainConfig) -> str | None:
    """The data folder to record: ``data_dir`` as given, else the ``SPARSETRAIN_DATA`` root holding the dataset.

    None when neither names a folder holding it (the bundled subset read from the package needs none).
    """
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


def telemetry_every(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``telemetry_every`` as given, else about :data:`TELEMETRY_POINTS` samples over the whole run."""
    if cfg.telemetry_every is not None:
        return cfg.telemetry_every
    return max(1, (cfg.epochs * steps_per_epoch) // TELEMETRY_POINTS)


def check_same_config(run, cfg: dict[str, Any]) -> None:
    """A run directory reused by a rerun must hold the same job, else the table would mix two sweeps.

    Raises:
        ValueError: the run directory holds a run whose config differs from ``cfg`` (the message names the key).
    """
    try:
        saved = TrainConfig.from_dict(run.read_config()).to_dict()
    except Exception:  # noqa: BLE001 - an unreadable config: the run itself will say so when resumed
        return
    from sparsetrain.runs import RECORD_KEYS

    wanted = TrainConfig.from_dict(cfg).to_dict()
    ignore = set(RECORD_KEYS)  # where and how a run was written: not a different job
    diff = sorted(k for k in wanted if k not in ignore and saved.get(k) != wanted.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"{run.path} holds a run with a different config ({k}: {saved.get(k)!r} there, "
                         f"{wanted.get(k)!r} now): choose another --out for this sweep")


TENSORBOARD_HINT = "pip install 'sparsetrain[tensorboard]'"


def require_tensorboard() -> None:
    """ImportError naming the extra to install when ``torch.utils.tensorboard`` cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e}); install it with: "
                          f"{TENSORBOARD_HINT}") from None
