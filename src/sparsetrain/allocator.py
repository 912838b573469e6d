"""A CPU allocator under which a process's resident memory follows its live tensors (and steps stop page-faulting).

PyTorch's CPU tensors come from ``malloc``. glibc keeps freed blocks below a threshold that it *raises by itself* as
a program runs (up to 32 MiB) in its heap, fragmented between the blocks still alive, and unmaps the larger ones on
``free``. The first makes a process's peak resident set (RSS) the heap's high-water mark instead of its live
tensors: a sparse step frees each dense activation early, and a default process showed none of the memory it saves
(peak RSS growth 0.97x dense for ResNet-18, batch 128). The second makes every reuse of a large block fault its
pages in again: ~500k page faults, about a second of system time, per ResNet-18 step -- dense or sparse.

:func:`lean_allocator` installs sparsetrain's caching CPU allocator (``_native/allocator.cpp``): each block of at
least ``threshold`` bytes is anonymous memory of its own, cached after ``free`` and handed out again for the next
request of its size class; a request no cached block matches is composed of cached pages of other sizes (``mremap``
moves them into one range: no copy, no page fault). The cache is bounded so that live + cached stays within 1/16 of
the largest live total seen, so the process's peak RSS is its live peak, and a step whose live total stays below
that peak maps (and faults) almost nothing after its first steps. Smaller blocks keep c10's aligned ``malloc``.
Where the native build is unavailable it falls back to fixing glibc's mmap and trim thresholds with ``mallopt`` (RSS
follows the live tensors, but large blocks fault on every reuse); elsewhere (macOS, Windows without the build)
nothing changes.

Who calls it: :func:`sparsetrain.sparsify_` does, once per process, for a model with CPU parameters (what the
memory figures in docs/performance.md measure); ``sparsetrain train`` does at start-up for every run, dense ones
included, so its comparisons share one allocator (``--no-lean-allocator`` turns it off). Importing sparsetrain never
does. ``SPARSETRAIN_ALLOCATOR=default`` in the environment keeps PyTorch's allocator everywhere (an explicit call
then returns False). Only tensors allocated after the call are served by it; :func:`restore_allocator` puts the
previous allocator back for new tensors (those already allocated return to the cache when freed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import warnings

from sparsetrain._scratch import set_scratch

__all__ = ["lean_allocator", "restore_allocator", "allocator_stats", "empty_cache", "allocator_kind"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 128 << 10  # blocks from here up get their own mapping (glibc's initial mmap threshold)
_MALLOPT_THRESHOLD = 1 << 20  # the fallback's: below ~1 MiB a fault per reuse costs more than it saves
SLACK = 1.0 / 16
_KIND: list[str] = ["default"]


_OFF_VALUES = ("default", "system", "0", "off")
_ON_VALUES = ("", "caching", "lean", "1", "on")


def _opted_out() -> bool:
    value = os.environ.get("SPARSETRAIN_ALLOCATOR", "").strip().lower()
    if value not in _OFF_VALUES + _ON_VALUES:
        warnings.warn(f"SPARSETRAIN_ALLOCATOR={value!r} is not one of {', '.join(v for v in _OFF_VALUES + _ON_VALUES if v)}"
                      "; using sparsetrain's caching allocator", RuntimeWarning, stacklevel=3)
    return value in _OFF_VALUES


def lean_allocator(threshold: int | None = None) -> bool:
    """Serve new CPU tensors from sparsetrain's caching allocator (glibc ``mallopt`` thresholds where it is not built).

    Args:
        threshold: bytes from which a block gets its own mapping (default 128 KiB; the ``mallopt`` fallback's
            default is 1 MiB).

    Returns:
        True when an allocator setting is in effect (now or from an earlier call), False where nothing was changed
        (``SPARSETRAIN_ALLOCATOR=default``, no native build and no glibc).

    Example:
        >>> import sparsetrain
        >>> sparsetrain.lean_allocator()  # doctest: +SKIP
        True
    """
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 4096):
        raise ValueError(f"lean_allocator: threshold must be an integer number of bytes >= 4096, got {threshold!r}")
    if _opted_out():
        log.info("lean_allocator: SPARSETRAIN_ALLOCATOR=default; the allocator is unchanged")
        return False
    from sparsetrain._native import native

    nat = native()
    if nat is not None:
        if nat.allocator_install(threshold or DEFAULT_THRESHOLD, SLACK):
            _installed("caching")
            return True
        log.info("lean_allocator: another CPU allocator holds a higher priority; trying glibc's thresholds")
    if _KIND[0] == "mallopt":
        return True
    if _mallopt(threshold or _MALLOPT_THRESHOLD):
        _installed("mallopt")
        return True
    return False


def _installed(kind: str) -> None:
    if _KIND[0] != kind:
        log.debug("lean_allocator: %s allocator in effect for new CPU tensors", kind)
    _KIND[0] = kind
    # Large transients now leave the process (mallopt) or come back from the allocator's cache (caching): the
    # kernel's own reuse of them across layers would only add their size to the peak.
    set_scratch(False)


def _mallopt(threshold: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("lean_allocator: no native build and no glibc mallopt here; the allocator is unchanged")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1):
        log.info("lean_allocator: mallopt refused the thresholds; the allocator is unchanged")
        return False
    return True


def allocator_kind() -> str:
    """``"caching"`` (sparsetrain's allocator serves new CPU tensors), ``"mallopt"`` (glibc thresholds fixed) or
    ``"default"``."""
    return _KIND[0]


def _caching_native():
    """The native module when the caching allocator is the one in effect, else None."""
    if _KIND[0] != "caching":
        return None
    from sparsetrain._native import native

    return native()


def restore_allocator() -> bool:
    """Serve new CPU tensors from the allocator that was installed before :func:`lean_allocator` (True if it was the
    caching one; glibc thresholds, once fixed, stay). Blocks already allocated return to the cache when freed."""
    nat = _caching_native()
    if nat is None or not nat.allocator_uninstall():
        return False
    nat.allocator_empty_cache()
    _KIND[0] = "default"
    set_scratch(True)
    return True


def allocator_stats() -> dict[str, int]:
    """The caching allocator's counters: ``mapped_bytes`` (live + cached), ``cached_bytes``, ``live_bytes``,
    ``peak_live_bytes``, ``hits`` / ``misses`` (requests served from the cache / newly mapped) and ``unmapped``
    (blocks given back to the system), ``composed`` / ``moves`` (requests served by moving cached pages of other
    sizes, and the page ranges moved); empty when it is not in use. Blocks below the threshold are not counted."""
    nat = _caching_native()
    return {} if nat is None else dict(nat.allocator_stats())


def empty_cache() -> None:
    """Give every cached block back to the system (e.g. after evaluating at a larger batch size); the bound on the
    cache restarts from the live total."""
    nat = _caching_native()
    if nat is not None:
        nat.allocator_empty_cache()
