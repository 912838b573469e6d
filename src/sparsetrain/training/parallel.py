"""Data parallelism for the loop: the only training module that imports :mod:`sparsetrain.distributed` and
:mod:`sparsetrain.comm`.

With one process every helper here is a no-op or the identity, so the loop calls them unconditionally. Under
torchrun ``batch_size`` is the global batch: each rank trains on its slice through DDP, evaluation is sharded and
summed, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.distributed import (
    ConsistencyError,
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    check_consistency,
    gather_objects,
    rank_seed,
)

__all__ = ["DistEnv", "ConsistencyError", "all_reduce_sum", "barrier", "broadcast_buffers", "broadcast_object",
           "check_consistency", "gather_objects", "rank_seed", "join", "lock_run", "shard", "wrap", "unwrap", "loss",
           "comm_stats"]

log = logging.getLogger(__name__)


def join(cfg: Any, exits: contextlib.ExitStack) -> tuple[DistEnv, torch.device]:
    """This process's rank and device: the process group torchrun describes (left again when the run ends)."""
    import torch.distributed as dist

    from sparsetrain import distributed

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


def lock_run(run_dir: Any, env: DistEnv, exits: contextlib.ExitStack, fresh: bool) -> None:
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
    message = broadcast_object(None if failure is None else str(failure), env)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run: {message}")


def shard(loaders: tuple[Any, ...], env: DistEnv) -> None:
    """Each rank reads its slice of every global batch (train and test loaders)."""
    if env.distributed:
        for loader in loaders:
            loader.shard(env.rank, env.world_size)


def wrap(model: nn.Module, cfg: Any, env: DistEnv, device: torch.device) -> tuple[nn.Module, Any]:
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


def unwrap(s: Any) -> None:
    """Drop the DDP wrapper (and a compiled one) while every rank is still in the group. Its Reducer holds the process
    group: freed only at interpreter exit, after the group was left and a peer may be gone, gloo's destructor can
    wait for that peer forever (seen once in CI: rank 0 hung in ``~ProcessGroupGloo`` after a finished run)."""
    if s.net is not s.model:
        s.net = s.eager_net = s.model
        gc.collect()  # the Reducer is freed here, with every rank alive, not at exit


def sync_batchnorm(model: nn.Module, cfg: Any, env: DistEnv) -> nn.Module:
    """SyncBatchNorm when asked and data-parallel (same state_dict keys as BatchNorm2d)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_bn and env.distributed else model


def loss(out: torch.Tensor, y: torch.Tensor, label_smoothing: float, env: DistEnv,
         global_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to differentiate and the batch's mean loss to log.

    Data-parallel: the global batch's mean loss whatever the slices' sizes. DDP averages the ranks' gradients, so
    each rank's loss sum is scaled by world size / global batch (``global_n``).
    """
    if not env.distributed:
        mean = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        return mean, mean
    loss_sum = F.cross_entropy(out, y, label_smoothing=label_smoothing, reduction="sum")
    return loss_sum * (env.world_size / global_n), loss_sum.detach() / len(y)


def comm_stats(comm: Any, bytes_before: int, steps: int, model: nn.Module) -> dict[str, Any]:
    """What this rank put on the wire for the gradients over ``steps``, against a dense all-reduce."""
    sent = comm.bytes_sent - bytes_before
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"density": comm.density, "bytes_sent": sent, "steps": steps, "bytes_per_step": sent / max(1, steps),
            "dense_bytes_per_step": dense}
