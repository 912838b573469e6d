"""The training loop. It reads top to bottom: config -> data -> model -> sparsify -> optimiser -> epochs -> summary.

Everything a run produces goes into its run directory (see :mod:`sparsetrain.runs`); ``resume`` continues an
interrupted run exactly (same batches, same RNG streams, same sparsity state).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from sparsetrain import runs
from sparsetrain.data import dataset_info, make_loaders
from sparsetrain.handle import sparsify_
from sparsetrain.models import create_model, model_entrypoint
from sparsetrain.recipe import Recipe

__all__ = ["TrainConfig", "train", "NonFiniteError"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the built-in job: LeNet-5, SWAT-U 90%, bundled Fashion-MNIST."""

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
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_exclude_bn_bias: bool = False
    label_smoothing: float = 0.0
    l1: float = 0.0
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for schedule=step
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    deterministic: bool = False
    channels_last: bool = False
    device: str = "cpu"
    telemetry_every: int = 100  # steps; 0 disables the sparsity monitor
    out: str | None = None  # run directory; default runs/<model>-<recipe>-<time>
    quiet: bool = False

    SCHEDULES = ("cosine", "step", "constant")
    OPTIMIZERS = ("sgd",)

    def __post_init__(self) -> None:
        if self.schedule not in self.SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(self.SCHEDULES)}")
        if self.optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(self.OPTIMIZERS)}")
        for k in ("epochs", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if self.telemetry_every < 0:
            raise ValueError(f"telemetry_every must be >= 0, got {self.telemetry_every}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over a loader."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss_sum / max(1, n), correct / max(1, n)


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: str | Path | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says, or continue the run in ``resume``; returns the summary dict.

    A resumed run uses the config saved in its run directory (``cfg`` only sets ``quiet``); ``epochs`` may extend
    it.

    Raises:
        NonFiniteError: the loss or the gradients became NaN/Inf (the last good checkpoint stays on disk).
    """
    from sparsetrain.accounting import count_flops, memory_report
    from sparsetrain.telemetry import JsonlSink, Monitor

    # --- fail fast on bad names before anything is created on disk
    if resume is None:
        model_entrypoint(cfg.model)
        dataset_info(cfg.dataset)
        Recipe.load(cfg.recipe, **(cfg.recipe_overrides or {}))

    # --- run directory and config: a resumed run takes its saved config (only more epochs may be asked for)
    ckpt = None
    if resume is not None:
        resume = Path(resume)
        run_dir = resume.parent if resume.is_file() else resume
        ckpt = runs.load_checkpoint(resume)
        saved = TrainConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        cfg = dataclasses.replace(saved, epochs=epochs or saved.epochs, quiet=cfg.quiet)
    else:
        recipe_tag = cfg.recipe if isinstance(cfg.recipe, str) else "custom"
        run_dir = Path(cfg.out or f"runs/{cfg.model}-{Path(str(recipe_tag)).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / runs.CHECKPOINT).exists():
            raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                  "or choose another --out")
    _seed_everything(cfg.seed, cfg.deterministic)
    device = torch.device(cfg.device)

    # --- data: whole uint8 tensors in memory; batch order depends only on (seed, epoch)
    train_loader, test_loader, info = make_loaders(
        cfg.dataset, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
        augment=cfg.augment, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
        channels_last=cfg.channels_last)
    input_shape = (info.channels, info.image_size, info.image_size)

    # --- only now, with names and data known to be good, the run directory is written
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    cfg_dict["out"] = str(run_dir)
    runs.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))

    # --- model, sparsity, optimiser, schedule
    model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels,
                         width_mult=cfg.width_mult).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Trace layer shapes once on the dense model; each epoch re-counts with that epoch's measured densities.
    dense_flops = count_flops(model, input_shape)
    handle = sparsify_(model, cfg.recipe, **(cfg.recipe_overrides or {}))
    opt = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(train_loader)))
    start_epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        handle.load_state_dict(ckpt["sparsity"])
        _set_rng_state(ckpt["rng"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        # Drop whatever the killed process wrote after its last checkpoint.
        runs.truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r["epoch"] < start_epoch)
        runs.truncate_jsonl(run_dir / "telemetry.jsonl", lambda r: r["step"] < step)
        log.info("resuming %s from epoch %d (step %d)", run_dir, start_epoch, step)
    l1_params = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    monitor = None
    if cfg.telemetry_every:
        monitor = Monitor(model, every=cfg.telemetry_every, sinks=[JsonlSink(run_dir / "telemetry.jsonl")],
                          start_step=step)

    best_acc = max([r["test_acc"] for r in runs.read_jsonl(run_dir / "metrics.jsonl")], default=0.0)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            handle.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = _progress(train_loader, epoch, cfg)
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                if cfg.l1:
                    loss = loss + cfg.l1 * sum(w.abs().sum() for w in l1_params)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                loss_value, grad_norm = loss.item(), float(grad_norm)
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    raise NonFiniteError(
                        f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'} at epoch {epoch} "
                        f"step {step} (loss {loss_value}, grad norm {grad_norm}); the last good checkpoint "
                        f"is kept in {run_dir}. Lower the learning rate or check the recipe.")
                if monitor is not None:
                    monitor.step(epoch=epoch)  # records dW before the update consumes it
                opt.step()
                sched.step()
                handle.step(opt)
                step += 1
                loss_sum += loss_value * len(y)
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
            train_time = time.perf_counter() - t0

            # --- end of epoch: densities of the last training step, evaluation, accounting, checkpoint
            densities = handle.densities()
            test_loss, test_acc = evaluate(model, test_loader, device)
            report = dense_flops.with_densities(densities)
            # Element-weighted over all conv/linear layers (dense ones count as 1), as the papers average them.
            w_density = 1.0 / report.model_compression_x
            a_density = 1.0 - report.act_memory_reduction_pct / 100.0
            best_acc = max(best_acc, test_acc)
            metrics = {
                "epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"],
                "train_loss": loss_sum / seen, "train_acc": correct / seen,
                "test_loss": test_loss, "test_acc": test_acc, "time_s": train_time,
                "samples_per_s": seen / train_time, "weight_density": w_density, "activation_density": a_density,
                "training_flops_reduction_pct": report.training_flops_reduction_pct, "densities": densities,
            }
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            runs.save_checkpoint(run_dir, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "sparsity": handle.state_dict(), "epoch": epoch, "step": step, "rng": _rng_state(),
                "config": cfg_dict,
            })
            log.info("epoch %d/%d  loss %.4f  train %.2f%%  test %.2f%%  W density %.3f  act density %.3f  "
                     "%.0f samples/s", epoch + 1, cfg.epochs, metrics["train_loss"], 100 * metrics["train_acc"],
                     100 * test_acc, w_density, a_density, metrics["samples_per_s"])
    finally:
        if monitor is not None:
            monitor.close()

    # --- summary: accounting from the measured densities of the last epoch
    if not metrics:  # resumed a finished run
        metrics = runs.read_jsonl(run_dir / "metrics.jsonl")[-1]
        report = dense_flops.with_densities(metrics["densities"])
    # Memory of one training step at this batch size, dense vs sparse storage of the sparsified operands
    # (analytic; `sparsetrain flops --memory` adds a measured figure). Per-layer rows stay in the FLOP table.
    memory = memory_report(model, input_shape, metrics["densities"], batch_size=cfg.batch_size,
                           optimizer=opt).to_dict()
    memory.pop("layers", None)
    runs.atomic_write_text(run_dir / "flops.json", json.dumps({**report.to_dict(), "memory": memory}, indent=1))
    recipe = handle.recipe
    summary = {
        "model": cfg.model, "dataset": cfg.dataset, "recipe": recipe.preset or "custom", "density": recipe.density,
        "seed": cfg.seed, "epochs": cfg.epochs, "final_test_acc": metrics["test_acc"], "best_test_acc": best_acc,
        "weight_density": metrics["weight_density"], "activation_density": metrics["activation_density"],
        "flops": {k: report.to_dict()[k] for k in ("training_flops_reduction_pct", "inference_flops_reduction_pct",
                                                    "act_memory_reduction_pct", "model_compression_x")},
        "run_dir": str(run_dir),
    }
    runs.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _progress(loader, epoch: int, cfg: TrainConfig):
    if cfg.quiet:
        return loader
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch log line.
    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch", dynamic_ncols=True,
                disable=None)


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
