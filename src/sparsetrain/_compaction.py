"""Compaction of a large CPU mask on every intra-op thread (see :func:`compact`).

torch's CPU ``nonzero`` is a serial kernel; for the largest activations of a sparse step it is the single most
expensive op. The exact top-K selection (``sparsifiers``) calls :func:`compact` where eager CPU code compacts a
full-size mask.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["compact"]

# A full-size compaction (CPU ``nonzero``) runs on one core; above this size it is split over the intra-op threads.
_SPLIT_MIN_NUMEL = 1 << 20
_pool: list = [None, 0, 0]  # executor, its pid, its workers: rebuilt after a fork or a set_num_threads change


def compact(mask: Tensor) -> Tensor:
    """``torch.nonzero(mask).view(-1)`` of a 1-D bool ``mask`` (int64 positions in order), on several cores.

    Eager CPU only (positions sized by the data). torch's CPU ``nonzero`` is a serial kernel: on the largest
    activations it is the single most expensive op of a sparse step. Here the mask is cut into one contiguous piece
    per intra-op thread, each piece is compacted in its own Python thread (the op releases the GIL), and the pieces
    are offset and concatenated: the same positions in the same order, in about 1/threads of the time.
    """
    n, threads = mask.numel(), torch.get_num_threads()
    if threads < 2 or n < _SPLIT_MIN_NUMEL or mask.device.type != "cpu":
        return torch.nonzero(mask).view(-1)
    pool, pid, workers = _pool
    if pool is None or pid != os.getpid() or workers != threads - 1:
        from concurrent.futures import ThreadPoolExecutor

        if pool is not None and pid == os.getpid():
            pool.shutdown(wait=False)
        pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="sparsetrain-compact")
        _pool[:] = [pool, os.getpid(), threads - 1]
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(torch.nonzero, mask[bounds[i]:bounds[i + 1]]) for i in range(1, threads)]
    parts = [torch.nonzero(mask[: bounds[1]])]  # this thread takes the first piece
    for i, fut in enumerate(futures, 1):
        parts.append(fut.result().add_(bounds[i]))
    return torch.cat(parts).view(-1)
