"""Sparse gradient communication for data-parallel training: a DDP hook that sends top-K gradients.

Each rank sends only the ``k = ceil(density * n)`` largest-magnitude entries of each gradient bucket (values and
their indices), every rank adds up what all ranks sent and divides by the world size, as DDP's average does. What a
rank did not send is not lost: it stays in the rank's *residual* and is added to the next step's gradient (error
feedback, as in Lin et al., "Deep Gradient Compression", ICLR 2018: the use TensorQuant's finding that weight
gradients are mostly near zero points to). So over any number of steps, for each rank,

    sum of what it sent + its residual == sum of its local gradients   (up to float rounding)

which ``tests/test_comm.py`` checks on two real gloo processes.

The cost: an ``all_gather`` of ``k`` values and ``k`` indices per bucket and rank instead of an ``all_reduce`` of
the ``n`` dense values; :attr:`TopKCompressionState.bytes_sent` counts ``k * (value bytes + index bytes)`` (indices
are int32 unless a bucket has more than 2**31 entries). With ``W`` ranks each rank receives ``W * k`` pairs, so the
hook saves traffic while ``W * density`` is well below 1 (the gather grows with ``W``; an all-reduce does not). The
result is the same on every rank, bit for bit: ranks add the contributions in rank order, and one rank's indices
are distinct, so no addition order depends on the device's scheduling.

Dense first: the first ``start_iter`` iterations (at least 2), and the first 2 after a resume, are plain averaging
all-reduces. DDP rebuilds its buckets after the first iteration (bucket indices and sizes change) and the
residuals are kept per bucket index; PowerSGD waits for the same reason. A dense iteration keeps no residual: one
loaded from a checkpoint is sent in full with that iteration's gradient, so none is lost whatever the new buckets.

Example:
    >>> ddp = torch.nn.parallel.DistributedDataParallel(model)  # doctest: +SKIP
    >>> state = register_topk_hook(ddp, density=0.01)  # doctest: +SKIP
    >>> loss_fn(ddp(x), y).backward(); optimizer.step()  # doctest: +SKIP
    >>> state.last_step_bytes  # what this rank sent for that step (DDP has waited for every bucket)  # doctest: +SKIP
    2352
    >>> per_rank = state.state_dict()  # each rank has its own residual: checkpoint one per rank  # doctest: +SKIP
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations against the real types.

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["TopKCompressionState", "topk_hook", "register_topk_hook", "MIN_START_ITER"]

logger = logging.getLogger(__name__)

#: Iterations of plain all-reduce before compressing: DDP's buckets are final only from the second iteration on.
MIN_START_ITER = 2
_INT32_MAX = 2**31 - 1


def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1] (the fraction of each gradient bucket every rank sends, "
                         f"e.g. 0.01), got {density!r}")
    return float(density)


def _check_start_iter(start_iter: Any) -> int:
    if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < MIN_START_ITER:
        raise ValueError(f"start_iter must be an integer >= {MIN_START_ITER} (DDP rebuilds its gradient buckets "
                         f"after the first iteration, so the residuals can only be kept from then on), "
                         f"got {start_iter!r}")
    return start_iter


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> torch.futures.Future:
    # torch >= 2.10 names it all_gather_single (all_gather_into_tensor is deprecated there); older ones only have
    # the latter. Looked up at each call, so a wrapper installed on torch.distributed (a test, a profiler) sees it.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, tensor, group=group, async_op=True).get_future()


class TopKCompressionState:
    """What :func:`topk_hook` keeps between steps on one rank: configuration, residuals and byte counters.

    Args:
        process_group: the group to communicate over (default: the whole world).
        density: the fraction of each gradient bucket each rank sends, in (0, 1]; ``k = max(1, ceil(density * n))``.
            1.0 sends everything and gives exactly plain DDP's average (through a gather, so it is no saving).
        start_iter: iterations of plain dense all-reduce before compressing, counted over the run (restored by
            :meth:`load_state_dict`); at least :data:`MIN_START_ITER`. After a resume the first
            :data:`MIN_START_ITER` iterations are dense too, for the same reason (a new DDP rebuilds its buckets).
        model: the module DDP wraps (``ddp.module``); needed only by :meth:`state_dict` and
            :meth:`load_state_dict` with residuals, which are saved per parameter name so that they load into any
            bucket layout. :func:`register_topk_hook` passes it.

    Attributes:
        iter: training iterations communicated so far (over the run).
        bytes_sent: bytes this rank handed to the collectives so far: ``k * (value + index bytes)`` per compressed
            bucket, the bucket's dense size per dense one (the algorithm's payload, not the transport's traffic:
            a ring all-reduce moves about twice the buffer).
        last_step_bytes: the same, for the last complete iteration (for telemetry).
        residuals: per bucket index, the part of the error-fed gradient this rank has not sent yet.

    Raises:
        ValueError: ``density`` or ``start_iter`` out of range.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, density: float = 0.01,
                 start_iter: int = MIN_START_ITER, *, model: nn.Module | None = None) -> None:
        self.process_group = process_group
        self.density = _check_density(density)
        self.start_iter = _check_start_iter(start_iter)
        self.iter = 0
        self.bytes_sent = 0
        self.last_step_bytes = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self._step_bytes = 0
        # Iterations this state has seen with its DDP model (not saved): a new DDP model rebuilds its buckets.
        self._seen_iters = 0
        self._names: dict[int, str] = {} if model is None else {id(p): n for n, p in model.named_parameters()}
        # Per bucket index: (parameter name, offset, numel) of each gradient in the bucket buffer.
        self._layouts: dict[int, list[tuple[str, int, int]]] = {}
        # Per-parameter residuals of a loaded state, sent in full by the first (dense) iteration.
        self._pending: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"TopKCompressionState(density={self.density}, start_iter={self.start_iter}, iter={self.iter}, "
                f"bytes_sent={self.bytes_sent})")

    @property
    def compressing(self) -> bool:
        """True once the hook sends top-K values (``iter >= start_iter`` and DDP's buckets are final)."""
        return self.iter >= self.start_iter and self._seen_iters >= MIN_START_ITER

    def k(self, numel: int) -> int:
        """The number of entries sent of a bucket of ``numel`` entries: ``max(1, ceil(density * numel))``."""
        # round() first: 0.07 * 100 is 7.000000000000001 in floating point, which must not make 8.
        return min(numel, max(1, math.ceil(round(self.density * numel, 9))))

    # ------------------------------------------------------------------ bookkeeping of the hook
    def _count(self, bucket: dist.GradBucket, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self._step_bytes += nbytes
        if bucket.is_last():  # DDP calls the hook of the last bucket last
            self.last_step_bytes, self._step_bytes = self._step_bytes, 0
            self.iter += 1
            self._seen_iters += 1
            if self.iter == self.start_iter:
                logger.info("top-K gradient communication (density %g) from iteration %d on", self.density, self.iter)

    def _layout(self, bucket: dist.GradBucket) -> list[tuple[str, int, int]] | None:
        """Where each named parameter's gradient lies in the bucket buffer (None without a model)."""
        if not self._names:
            return None
        layout, offset = [], 0
        for p in bucket.parameters():  # the buffer concatenates their flattened gradients, in this order
            layout.append((self._names[id(p)], offset, p.numel()))
            offset += p.numel()
        if offset != bucket.buffer().numel():
            raise RuntimeError(f"gradient bucket {bucket.index()} holds {bucket.buffer().numel()} entries but its "
                               f"parameters {offset}: cannot map its residual to parameters")
        return layout

    def _fold_pending(self, bucket: dist.GradBucket, buffer: torch.Tensor) -> None:
        """Add the loaded residuals of this bucket's parameters to its buffer (whatever the bucket layout)."""
        for name, offset, numel in self._layout(bucket) or ():
            residual = self._pending.pop(name, None)
            if residual is not None:
                buffer[offset:offset + numel].add_(residual.to(buffer.device, buffer.dtype).reshape(-1))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters and residuals, for this rank's checkpoint (residuals per parameter name, flattened).

        Raises:
            RuntimeError: there are residuals but the state was created without ``model`` (parameter names).
        """
        residuals: dict[str, torch.Tensor] = dict(self._pending)
        if self.residuals and not self._names:
            raise RuntimeError("TopKCompressionState.state_dict needs parameter names to save the residuals: create "
                               "the state with model=ddp.module, or with register_topk_hook(ddp, ...)")
        for index, residual in self.residuals.items():
            for name, offset, numel in self._layouts[index]:
                residuals[name] = residual[offset:offset + numel].clone()
        return {"density": self.density, "start_iter": self.start_iter, "iter": self.iter,
                "bytes_sent": self.bytes_sent, "last_step_bytes": self.last_step_bytes, "residuals": residuals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and residuals saved by :meth:`state_dict` (density and start_iter stay as constructed).

        The residuals are added to the gradients of the next iteration, which is dense (see ``start_iter``), so
        none of them is lost whatever the bucket layout.

        Raises:
            ValueError: a residual names a parameter the model does not have, or the state has no model.
        """
        residuals = dict(state.get("residuals") or {})
        if residuals:
            known = set(self._names.values())
            unknown = sorted(set(residuals) - known)
            if unknown:
                where = "the model has no parameters named so" if known else "the state was created without model="
                raise ValueError(f"residuals for {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}: "
                                 f"{where}")
        self.iter = int(state["iter"])
        self.bytes_sent = int(state["bytes_sent"])
        self.last_step_bytes = int(state.get("last_step_bytes", 0))
        self.residuals = {}
        self._layouts = {}
        self._pending = residuals


def _dense_allreduce(state: TopKCompressionState, bucket: dist.GradBucket, group: Any,
                     world_size: int) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    residual = state.residuals.pop(bucket.index(), None)
    if residual is not None:  # compression was on before: send what was held back
        buffer.add_(residual)
    state._count(bucket, buffer.numel() * buffer.element_size())
    buffer.div_(world_size)  # before the sum, as DDP does: no overflow in half precision
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def topk_hook(state: TopKCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all ranks' top-K gradient entries, averaged; the rest stays in the residual.

    Per bucket: ``g = gradient + residual``; the ``k`` entries of largest ``|g|`` (values and int indices) are
    gathered from every rank; each rank adds all ranks' entries into zeros, in rank order, and divides by the world
    size; ``residual = g`` minus what this rank sent (``g`` with the sent entries zeroed). Before
    ``state.compressing`` it is a plain averaging all-reduce. Register it with
    ``ddp.register_comm_hook(state, topk_hook)`` or :func:`register_topk_hook`.

    Args:
        state: this rank's :class:`TopKCompressionState`.
        bucket: the gradient bucket DDP hands over.

    Returns:
        A future of the averaged bucket (the bucket's own buffer, overwritten).
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    if state._pending:
        state._fold_pending(bucket, buffer)
    if not state.compressing:
        return _dense_allreduce(state, bucket, group, world_size)

    index = bucket.index()
    residual = state.residuals.get(index)
    if residual is not None:
        if residual.shape != buffer.shape:
            raise RuntimeError(f"gradient bucket {index} has {buffer.numel()} entries, its residual {residual.numel()}:"
                               " DDP changed its buckets after top-K compression started")
        buffer.add_(residual)  # g, in place: the buffer is overwritten by the result anyway
    elif index not in state._layouts:
        layout = state._layout(bucket)
        if layout is not None:
            state._layouts[index] = layout
    k = state.k(buffer.numel())
    indices = torch.topk(buffer.abs(), k, sorted=False).indices
    values = buffer[indices]
    state.residuals[index] = buffer.index_fill(0, indices, 0)
    sent_indices = indices.to(torch.int32 if buffer.numel() <= _INT32_MAX else torch.int64)
    state._count(bucket, k * (values.element_size() + sent_indices.element_size()))

    all_values, all_indices = values.new_empty(world_size * k), sent_indices.new_empty(world_size * k)
    futures = [_all_gather(all_values, values, group), _all_gather(all_indices, sent_indices, group)]

    def average(fut: torch.futures.Future) -> torch.Tensor:
        # The output tensors, not the futures' values: gloo's hold one chunk per rank, other backends the whole.
        for gathered in fut.value():
            gathered.value()  # raises if the collective failed
        buffer.zero_()
        # Rank by rank: one rank's indices are distinct, so each entry is written once per rank and the sum's order
        # is the rank order on every rank and device (a single scatter-add may add in any order on a GPU).
        for r in range(world_size):
            at = all_indices[r * k:(r + 1) * k].long()
            buffer[at] += all_values[r * k:(r + 1) * k]
        return buffer.div_(world_size)

    return torch.futures.collect_all(futures).then(average)


def register_topk_hook(ddp_model: nn.parallel.DistributedDataParallel, density: float = 0.01, *,
                       start_iter: int = MIN_START_ITER,
                       process_group: dist.ProcessGroup | None = None) -> TopKCompressionState:
    """Make ``ddp_model`` communicate top-K gradients with error feedback; returns the state (save it per rank).

    Args:
        ddp_model: the DDP-wrapped model, before its first backward pass (DDP accepts one hook, registered once).
        density: fraction of each gradient bucket each rank sends, in (0, 1].
        start_iter: iterations of dense all-reduce first (at least :data:`MIN_START_ITER`).
        process_group: the group DDP reduces over (default: the whole world).

    Raises:
        ValueError: ``density`` or ``start_iter`` out of range.
    """
    state = TopKCompressionState(process_group, density, start_iter, model=ddp_model.module)
    ddp_model.register_comm_hook(state, topk_hook)  # not the seam: it replaces DDP's all-reduce, observes nothing
    return state
