"""Data-parallel training on ``torch.distributed``: the process group torchrun describes, and the few collectives
the training loop needs beyond DDP's gradient all-reduce.

``torchrun --nproc-per-node N -m sparsetrain train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them, picks the backend (NCCL for CUDA, gloo otherwise) and
the device of the local rank. Without them (a plain ``sparsetrain train``) nothing is initialised and every helper
here is a no-op for world size 1, so single-process training runs exactly the code it ran before.

What is and is not identical across ranks (and why):

* Weights, optimizer state and every weight-derived sparsity state (top-K weight thresholds and masks, SWAT-M's
  per-layer densities, frozen topologies, random-channel masks) are identical: they derive from identical weights
  and all-reduced gradients. ``--check-consistency K`` verifies it with a checksum all-reduce every K steps.
* Activation top-K, DBTD gradient thresholds and BatchNorm batch statistics are per rank: they see the rank's
  local slice of the global batch (SyncBatchNorm, ``--sync-bn``, shares BN statistics on GPUs).
* Stochastic pruning draws from per-rank generators: rank 0 keeps the single-process streams, rank ``r > 0`` is
  seeded from ``(seed, r)`` (:func:`rank_seed`), so ranks do not prune their gradients with the same noise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "env_world_size", "init", "shutdown", "barrier", "rank_seed", "all_reduce_sum", "gather_objects",
           "broadcast_object", "broadcast_buffers", "checksums", "check_consistency", "ConsistencyError"]

log = logging.getLogger(__name__)


class ConsistencyError(RuntimeError):
    """State that must be identical on every rank differs (``--check-consistency``)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when it is not set)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init(device_name: str) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes in the environment; returns this rank and its device.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and ``device_name`` is returned as is. Otherwise the
    device's type is kept and its index is the local rank (``cuda`` -> ``cuda:LOCAL_RANK``); the backend is NCCL
    for CUDA and gloo for every other device.

    Raises:
        ValueError: ``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` missing or malformed (the message says what torchrun sets).
    """
    world = env_world_size()
    device = torch.device(device_name)
    if world <= 1:
        return DistEnv(), device
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
                         "torchrun (torchrun --nproc-per-node N -m sparsetrain train ...), which sets them all")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device, backend)
    return DistEnv(rank, world, local_rank), device


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op on one process). Called before leaving the group after a successful run, so no
    rank closes its connections while another still receives the last collective."""
    if env.distributed:
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams: ``seed`` itself on rank 0 (single-process runs unchanged)."""
    if rank == 0:
        return seed
    # 32 bits: numpy seeds must fit in an unsigned 32-bit integer.
    return (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 >> 16) & 0xFFFFFFFF


def all_reduce_sum(values: Iterable[float], env: DistEnv, device: torch.device) -> list[float]:
    """Sums over ranks of a few host numbers (one float64 all-reduce; returned as is on one process)."""
    values = [float(v) for v in values]
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process). A collective: all ranks must call it."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself on one process)."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(model: nn.Module, env: DistEnv, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics drift apart: each rank updates them from
    its own slice of the batch). A no-op on one process."""
    if not env.distributed:
        return
    for b in model.buffers():
        dist.broadcast(b, src=src)


@torch.no_grad()
def checksums(model: nn.Module, weight_states: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Names and float64 checksums of what must be identical on every rank: each parameter and each tensor of
    ``weight_states`` (the handle's weight-derived sparsity state, e.g. from
    :meth:`~sparsetrain.handle.SparsityHandle.shared_state`).

    Two sums per tensor, plain and position-weighted (a weight ``1 + i % 7``), so a change of values or a move of
    values between positions shows; computed on the device, one small tensor out.
    """
    names, sums = [], []
    items = [(f"param {n}", p) for n, p in model.named_parameters()] + \
        [(f"sparsity {k}", v) for k, v in weight_states.items()]
    for name, t in items:
        flat = t.detach().reshape(-1).double()
        pos = (torch.arange(flat.numel(), device=flat.device) % 7 + 1).double()
        names.append(name)
        sums.append(torch.stack([flat.sum(), (flat * pos).sum()]))
    return names, (torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64))


def check_consistency(model: nn.Module, weight_states: dict[str, torch.Tensor], env: DistEnv, step: int) -> None:
    """Fail loudly when weights or weight-derived sparsity state differ between ranks (a MAX and a MIN all-reduce
    of :func:`checksums`; a host sync, so only every ``--check-consistency`` steps).

    Raises:
        ConsistencyError: naming the first tensors that differ, on every rank.
    """
    if not env.distributed:
        return
    names, local = checksums(model, weight_states)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[: len(local)], -both[len(local):]
    bad = (hi != lo).any(dim=1).nonzero().view(-1).tolist()
    if bad:
        which = ", ".join(names[i] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConsistencyError(f"step {step}: state that must be identical on all {env.world_size} ranks differs: "
                               f"{which}. The ranks no longer train one model (a non-deterministic op, a rank-local "
                               "update, or a bug); the last good checkpoint is kept.")
