"""One documented call that makes a process's resident memory follow its live tensors (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks with ``mmap`` and gives them back on ``free``
only above a threshold that it *raises by itself* as a program runs (up to 32 MiB); below it, freed tensors stay
in the heap, fragmented between the small tensors that are still alive, and the process's resident set (RSS) is
the heap's high-water mark, not its live tensors. A sparse step keeps many small packed tensors alive between
large transients, so it suffers from this more than a dense step: the memory it saves is real in live tensors
(``sparsetrain flops --memory`` counts them) but a default process may not show it.

:func:`lean_allocator` fixes glibc's mmap and trim thresholds, which also stops the automatic raising: blocks of at
least ``threshold`` bytes are mapped when allocated and unmapped when freed, and the kernel's reused transient
buffers (:func:`sparsetrain._scratch.scratch`) are no longer kept between layers. The cost is a page fault per 4 KiB
the first time each new block is written (a few percent of a CNN step at CIFAR batch sizes; see
docs/performance.md). ``sparsetrain train`` calls it at start-up (``--no-lean-allocator`` turns it off); a library
user calls it once, early, before the tensors it should govern exist. Importing sparsetrain never calls it.
The environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same from outside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from sparsetrain._scratch import set_scratch

__all__ = ["lean_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20


def lean_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap and trim thresholds at ``threshold`` bytes (default 1 MiB).

    Returns True when applied, False where the C library is not glibc (macOS, musl, Windows: nothing is changed).

    Example:
        >>> import sparsetrain
        >>> sparsetrain.lean_allocator()  # doctest: +SKIP
        True
    """
    if not isinstance(threshold, int) or threshold < 4096:
        raise ValueError(f"lean_allocator: threshold must be an integer number of bytes >= 4096, got {threshold!r}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("lean_allocator: no glibc mallopt here; the allocator is unchanged")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    if not ok:
        log.info("lean_allocator: mallopt refused the thresholds; the allocator is unchanged")
        return False
    # Large transients now go back to the system when freed: reusing them across layers would only add their size
    # to the peak (the reuse exists to keep glibc's own heap from fragmenting).
    set_scratch(False)
    return True
