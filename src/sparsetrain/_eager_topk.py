"""The exact top-K selection on eager CPU: a sampled bracket (native code when built, else PyTorch ops).

Split from :mod:`sparsetrain.sparsifiers`, which calls these for eager CPU tensors; compiled and accelerator code
takes the static-shape radix select there. On eager CPU reading a count back to the host is free, so the k-th
value is bracketed from a fixed sample and selected among the few elements inside the band: in two native passes
(:mod:`sparsetrain._native`, bit-identical) or, without a native build, in about fifteen PyTorch ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsetrain._native import native
from sparsetrain._scratch import scratch

# On CPU the k-th value is first bracketed from a fixed sample: reading a count back is free there, and a
# selection among the few elements inside the band beats full histogram passes (3-6x at density <= 0.2).
_BRACKET_MIN_NUMEL = 1 << 16
_SAMPLE = 1 << 13
_SAMPLES: dict[tuple[int, str], Tensor] = {}
_NO_SAMPLE = torch.empty(0, dtype=torch.int64)  # below the bracket's size the native kernel strides its own sample


def sample_index(n: int, device: torch.device) -> Tensor:
    """A fixed pseudo-random set of indices into ``n`` elements (cached per size: thresholds stay deterministic)."""
    key = (n, str(device))
    idx = _SAMPLES.get(key)
    if idx is None:
        g = torch.Generator().manual_seed(n)
        # Sorted indices: the gather walks memory forwards (a cache-friendlier read of a large tensor).
        idx = torch.randint(0, n, (_SAMPLE,), generator=g).sort().values.to(device)
        if len(_SAMPLES) > 256:
            _SAMPLES.clear()
        _SAMPLES[key] = idx
    return idx


def eager_cpu(a: Tensor) -> bool:
    """Eager CPU code, where reading a count back to the host costs nothing (elsewhere it is a sync or untraceable)."""
    return a.device.type == "cpu" and not torch.compiler.is_compiling()


def direct(a: Tensor) -> bool:
    """Select the k-th value with one ``kthvalue`` call: float64 (64-bit patterns), tiny tensors, and on eager CPU
    every tensor below the bracket's size (cheaper than the radix select's two 32k/64k-bin histograms)."""
    n = a.numel()
    return a.dtype == torch.float64 or n < 4096 or (n < _BRACKET_MIN_NUMEL and eager_cpu(a))


def use_bracket(a: Tensor, k: int) -> bool:
    # Eager CPU only: the bracket reads counts back (free on CPU, a sync elsewhere) and sizes a buffer from the
    # sample, which a compiler cannot trace; compiled and accelerator code takes the static radix select.
    return a.numel() >= _BRACKET_MIN_NUMEL and k > 1 and eager_cpu(a)


def bracket_candidates(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The exact k-th largest of the non-negative flat ``a``, with every position that can hold a top-k value.

    A fixed sample brackets the k-th value in a band of about +-6 standard errors of the sample quantile; one pass
    compacts the positions at or above the band's low edge, and the k-th value is selected among the few inside
    the band. Returns ``(thr, pos, vals)``: the threshold, the candidate positions and their values, or None when
    the band misses (many ties at its edge, e.g. ReLU zeros when k reaches into them) or holds far more candidates
    than the sample predicted; the caller then runs the radix select.
    """
    n, m = a.numel(), _SAMPLE
    q = 1.0 - k / n  # the k-th largest sits at this quantile
    half = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    sample = a[sample_index(n, a.device)]
    i_lo = max(0, math.floor((q - half) * m))
    lo = sample.kthvalue(i_lo + 1).values  # two selections in the sample: cheaper than sorting it
    hi = sample.kthvalue(min(m - 1, math.ceil((q + half) * m)) + 1).values
    # Candidates: a >= lo. Expected count (m - i_lo) / m * n; the buffer has room for 1.25x that plus slack.
    cap = min(n, int((m - i_lo) / m * n * 1.25) + 1024)
    cand = torch.ge(a, lo, out=scratch("candidates", n, torch.bool, a.device))
    # Eager CPU only (see use_bracket): the count is on the host for free, and torch's CPU nonzero_static is nonzero
    # plus a copy (1.8x its time here), so the compaction is sized by the data.
    pos = torch.nonzero(cand).view(-1)
    if pos.numel() > cap:
        return None  # more candidates than the sample predicted: the band is too wide to be worth it
    vals = a.index_select(0, pos)
    above = int(torch.count_nonzero(vals > hi))  # strictly above the band: all kept
    if above >= k:
        return None
    if bool(lo == hi):
        # A band of one value (ties, e.g. the zeros of a ReLU output): it is the k-th value if it reaches k.
        if k > int(torch.count_nonzero(vals >= lo)):
            return None
        return lo, pos, vals
    band = vals[vals <= hi]
    if k > above + band.numel():
        return None
    return band.kthvalue(band.numel() - (k - above) + 1).values, pos, vals


def native_select(flat: Tensor, k: int, threshold_only: bool = False) -> list[Tensor] | None:
    """The eager CPU selection of :func:`bracket_candidates` in two passes of native code (:mod:`sparsetrain._native`; same results), or
    None where it does not apply (no native build, float64, compiling, not CPU) or a magnitude is NaN."""
    if flat.dtype == torch.float64 or not eager_cpu(flat) or not flat.is_contiguous() or (nat := native()) is None:
        return None
    return nat.topk_select(flat, k, sample_index(flat.numel(), flat.device) if flat.numel() >= _BRACKET_MIN_NUMEL
                           else _NO_SAMPLE, threshold_only) or None


def masked_by_threshold(t: Tensor, thr: Tensor) -> Tensor:
    """``t * (|t| >= thr)`` (a top-K weight from its threshold): one native pass for a float32 CPU tensor in eager
    code, else the PyTorch ops; the same values either way."""
    if t.dtype == torch.float32 and t.is_contiguous() and eager_cpu(t) and (nat := native()) is not None:
        return nat.mask_by_threshold(t.reshape(-1), thr.float()).view(t.shape)
    return t * (t.abs() >= thr.to(t.dtype)).to(t.dtype)
