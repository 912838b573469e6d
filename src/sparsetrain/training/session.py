"""Building a run's :class:`Session` (the loop's one call before the first epoch); see :mod:`.loop`."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn as nn

from sparsetrain.handle import sparsify_
from sparsetrain.runs import RunDir
from sparsetrain.training import config as C
from sparsetrain.training import parallel
from sparsetrain.training.checkpoint import Session, restore
from sparsetrain.training.config import TrainConfig

__all__ = ["build_session"]


def build_session(cfg: TrainConfig, run_dir: RunDir, ckpt: dict[str, Any] | None, env: parallel.DistEnv,
                  device: torch.device, exits: contextlib.ExitStack, loaders: tuple[Any, Any, Any]) -> Session:
    """Everything a run needs, built once the data is known to be good: the run directory's files, the model (and its
    dense FLOPs), the sparsity handle, the optimizer and schedule, the DDP wrapper or compiled step, the sinks; a
    checkpoint's state restored into them."""
    from sparsetrain.accounting import count_flops
    from sparsetrain.models import create_model

    train_loader, test_loader, info = loaders
    # The config records what was used: the data folder an environment variable chose, the telemetry interval.
    cfg = dataclasses.replace(cfg, data_dir=C.resolved_data_dir(cfg),
                              telemetry_every=C.telemetry_every(cfg, len(train_loader)))
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
    model = parallel.sync_batchnorm(model, cfg, env)
    handle = sparsify_(model, cfg.recipe, **(cfg.recipe_overrides or {}))
    handle.set_rank(env.rank)
    optimizer = C.make_optimizer(model, cfg)
    grad_rule = handle.recipe.gradient_rule()  # a method's rule on the optimizer's gradients (TensorQuant's study)
    if grad_rule is not None:
        grad_rule.prepare(optimizer)
    net, comm = parallel.wrap(model, cfg, env, device)
    # Compiled: one graph per sparse model, no host sync inside (see docs/performance.md). The steps that observe
    # operands (density measurement, telemetry samples) run the same modules eagerly: observers are Python callbacks.
    eager_net, net = net, torch.compile(net) if cfg.compile else net
    if env.rank > 0:  # dropout and anything else random differ per rank; rank 0 keeps the single-process streams
        C.seed_everything(parallel.rank_seed(cfg.seed, env.rank), cfg.deterministic)
    s = Session(
        cfg=cfg, config=config, run_dir=run_dir, device=device, train_loader=train_loader, test_loader=test_loader,
        input_shape=input_shape, model=model, handle=handle, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, C.lr_lambda(cfg, len(train_loader))),
        scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None, dense_flops=dense_flops,
        autocast=C.autocast(cfg.amp, device), grad_rule=grad_rule,
        l1_params=[m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
        env=env, net=net, eager_net=eager_net, comm=comm, exits=exits)
    if ckpt is not None:
        restore(s, ckpt)
    if cfg.tensorboard and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # Purge what a killed process logged after the checkpoint: steps > s.step (the epoch record and the curve
        # point at s.step itself belong to the checkpointed epoch and must stay).
        s.tb_writer = SummaryWriter(log_dir=str(run_dir.tensorboard_dir), purge_step=s.step + 1 if s.step else None)
    if cfg.telemetry_every and env.is_main:
        from sparsetrain.telemetry import JsonlSink, Monitor, TensorBoardSink

        sinks = [JsonlSink(run_dir.telemetry_path), *([TensorBoardSink(run_dir.tensorboard_dir)] if cfg.tensorboard
                                                     else [])]
        s.monitor = Monitor(model, every=cfg.telemetry_every, sinks=sinks, start_step=s.step)
    return s


# ---------------------------------------------------------------------------------------------- one epoch
