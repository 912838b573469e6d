"""Sparsifiers: pure functions on tensors, one frozen config dataclass each.

Every sparsifier is split in two pure steps so that the expensive part can be cached:

* ``threshold(x, cfg)`` computes the *reusable* quantity (a magnitude threshold, a score threshold or a fixed mask);
* ``apply(x, cfg, thr, generator)`` returns the sparsified values given that quantity.

``sparsify(x, cfg)`` does both. A layer that recomputes its top-K threshold only every ``period`` iterations
(SWAT's periodic threshold) calls ``threshold`` on the recompute steps and ``apply`` with the cached value in between.
Configs are registered by type and by a short ``type`` name used in YAML recipes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable

import torch
from torch import Tensor

from sparsetrain._eager_topk import bracket_candidates, direct, eager_cpu, native_select, use_bracket
from sparsetrain._scratch import scratch
from sparsetrain.formatting import is_number

__all__ = [
    "TopK",
    "ChannelTopK",
    "Threshold",
    "NM",
    "DBTD",
    "RandomChannel",
    "SparsifierConfig",
    "register_sparsifier",
    "list_sparsifiers",
    "config_from_dict",
    "config_to_dict",
    "threshold",
    "apply",
    "sparsify",
    "mask",
    "topk_threshold",
    "topk_select",
    "random_channel_mask",
    "dbtd_tau",
    "stochastic_prune",
    "seed_for",
    "grow_channel_mask",
    "density_from",
    "flat_memory_order",
    "dense_order",
    "selection_order",
    "entry",
    "nominal_density",
    "has_density",
    "with_density",
]


def density_from(density: Any, sparsity: Any, where: str) -> float:
    """The kept fraction from ``density`` or ``sparsity`` (never both); errors are prefixed with ``where``.

    The one place the two spellings are reconciled: ``sparsity=0.8`` gives exactly ``0.2`` (``1 - 0.8`` does not).
    """
    if density is not None and sparsity is not None:
        raise ValueError(f"{where}: give either density or sparsity, not both (got density={density}, "
                         f"sparsity={sparsity})")
    if density is None and sparsity is None:
        raise ValueError(f"{where}: density (kept fraction) or sparsity is required")
    if sparsity is not None:
        if not (is_number(sparsity) and 0.0 <= sparsity < 1.0):
            raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")
        density = round(1.0 - float(sparsity), 12)
    if not (is_number(density) and 0.0 < density <= 1.0):
        raise ValueError(f"{where}: density must be in (0, 1], got {density!r}")
    return float(density)


def _resolve_density(obj: Any) -> None:
    """Normalise ``density``/``sparsity`` so that only ``density`` (the kept fraction) is stored."""
    object.__setattr__(obj, "density", density_from(obj.density, obj.sparsity, type(obj).__name__))
    object.__setattr__(obj, "sparsity", None)


@dataclass(frozen=True)
class TopK:
    """Unstructured top-K by magnitude over the whole tensor (batch included): ``|v| >= k-th largest`` kept."""

    density: float | None = None
    sparsity: float | None = None

    def __post_init__(self) -> None:
        _resolve_density(self)


@dataclass(frozen=True)
class ChannelTopK:
    """Structured top-K: keep the ``(out, in)`` kernel slices with the largest L1 norms, over the whole layer."""

    density: float | None = None
    sparsity: float | None = None

    def __post_init__(self) -> None:
        _resolve_density(self)


@dataclass(frozen=True)
class Threshold:
    """Magnitude threshold (TensorQuant): ``|v| > threshold`` kept."""

    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not (self.threshold >= 0.0 and math.isfinite(self.threshold)):
            raise ValueError(f"Threshold: threshold must be a finite number >= 0, got {self.threshold}")


@dataclass(frozen=True)
class NM:
    """N:M structured sparsity: keep the ``n`` largest of every ``m`` consecutive values along dimension 1."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.n <= self.m):
            raise ValueError(f"NM: need integers 1 <= n <= m, got n={self.n}, m={self.m}")

    @property
    def density(self) -> float:
        return self.n / self.m


@dataclass(frozen=True)
class DBTD:
    """Ye et al.: distribution-based threshold ``tau = sigma_hat * Phi^-1(p)`` plus unbiased stochastic pruning.

    ``sigma="consistent"`` uses ``sigma_hat = sqrt(pi/2) * mean|g|`` (the consistent estimator of a Gaussian's
    sigma); ``"literal"`` uses the paper's printed ``sqrt(2/pi) * mean|g|``. ``stochastic=False`` zeroes every value
    below ``tau`` (biased; for ablations).
    """

    p: float = 0.9
    sigma: str = "consistent"
    stochastic: bool = True

    def __post_init__(self) -> None:
        if not 0.5 < self.p < 1.0:
            raise ValueError(f"DBTD: p must be in (0.5, 1), got {self.p}")
        if self.sigma not in ("consistent", "literal"):
            raise ValueError(f"DBTD: sigma must be one of 'consistent', 'literal', got {self.sigma!r}")
        _normal_quantile(self.p)


@dataclass(frozen=True)
class RandomChannel:
    """Changpinyo et al.: fixed random mask of ``(out, in)`` kernel slices, ``density`` of inputs per output.

    No dead filters: every output keeps at least one input and every input feeds at least one output.
    ``seed`` makes the mask reproducible; the layer name is mixed in so layers get different masks.
    """

    density: float | None = None
    sparsity: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _resolve_density(self)


SparsifierConfig = TopK | ChannelTopK | Threshold | NM | DBTD | RandomChannel


@dataclass(frozen=True)
class _Entry:
    """Everything the kernel and the handle need to know about one sparsifier type (no isinstance elsewhere).

    ``fixed``: the reusable quantity is computed once and never refreshed (a fixed random mask).
    ``stochastic(cfg)``: the values need a random generator (the kernel then keeps one per layer).
    ``nominal(cfg)``: the kept fraction the config implies on its own (None when it depends on the data).
    ``density_param``: the config has a ``density`` field that distributions (ERK, SWAT-M, densification) set.
    """

    name: str
    threshold: Callable[..., Tensor | None]
    keep: Callable[..., Tensor | None] | None  # bool mask (broadcastable to x) or None = keep all
    apply: Callable[..., Tensor]
    fixed: bool = False
    stochastic: Callable[[Any], bool] = lambda cfg: False
    nominal: Callable[[Any], float | None] = lambda cfg: None
    density_param: bool = False


def _apply_keep(keep: Callable[..., Tensor | None]) -> Callable[..., Tensor]:
    def apply_fn(x: Tensor, cfg: Any, thr: Tensor | None, generator: torch.Generator | None) -> Tensor:
        k = keep(x, cfg, thr)
        # Returning x itself when nothing is dropped keeps density 1.0 bit-identical to the dense path.
        return x if k is None else x * k.to(x.dtype)

    return apply_fn


_BY_TYPE: dict[type, _Entry] = {}
_BY_NAME: dict[str, type] = {}


def register_sparsifier(
    cfg_type: type,
    name: str,
    *,
    threshold: Callable[..., Tensor | None],
    keep: Callable[..., Tensor | None] | None = None,
    apply: Callable[..., Tensor] | None = None,
    fixed: bool = False,
    stochastic: Callable[[Any], bool] | None = None,
    nominal: Callable[[Any], float | None] | None = None,
) -> None:
    """Register a sparsifier: one frozen config type, its recipe ``type`` name and its pure functions.

    Args:
        cfg_type: the frozen dataclass holding the sparsifier's parameters.
        name: the ``type:`` name used in YAML recipes.
        threshold: ``threshold(x, cfg, *, key) -> Tensor | None``, the cacheable quantity (threshold or mask).
        keep: ``keep(x, cfg, thr) -> bool Tensor | None`` for deterministic sparsifiers (None = keep all).
        apply: ``apply(x, cfg, thr, generator) -> Tensor``; defaults to ``x * keep``.
        fixed: compute ``threshold`` once per layer and never refresh it (fixed topologies).
        stochastic: ``cfg -> bool``, whether ``apply`` draws random numbers (a per-layer generator is then kept).
        nominal: ``cfg -> float | None``, the kept fraction the config implies alone; by default its ``density``
            field when it has one, else None (data-dependent).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Sign:
        ...     pass
        >>> register_sparsifier(Sign, "sign_example", threshold=lambda x, cfg, key="": None,
        ...                     keep=lambda x, cfg, thr: x > 0)
        >>> sparsify(torch.tensor([-1.0, 2.0]), Sign())
        tensor([-0., 2.])
    """
    if name in _BY_NAME:
        raise ValueError(f"sparsifier {name!r} is already registered")
    if apply is None:
        if keep is None:
            raise ValueError("register_sparsifier needs keep= or apply=")
        apply = _apply_keep(keep)
    has_density = "density" in {f.name for f in dataclasses.fields(cfg_type)}
    if nominal is None:
        nominal = (lambda cfg: float(cfg.density)) if has_density else (lambda cfg: None)
    _BY_TYPE[cfg_type] = _Entry(name, threshold, keep, apply, fixed, stochastic or (lambda cfg: False), nominal,
                                has_density)
    _BY_NAME[name] = cfg_type


def list_sparsifiers() -> list[str]:
    """The ``type`` names usable in recipes."""
    return sorted(_BY_NAME)


def entry(cfg: Any) -> _Entry:
    """The registry entry of a config (its functions and capabilities); TypeError for an unregistered type."""
    try:
        return _BY_TYPE[type(cfg)]
    except KeyError:
        raise TypeError(f"no sparsifier registered for {type(cfg).__name__}; valid: {list_sparsifiers()}") from None



def nominal_density(cfg: Any) -> float | None:
    """Kept fraction implied by ``cfg`` alone: 1.0 for ``None`` (dense), None when it depends on the data."""
    return 1.0 if cfg is None else entry(cfg).nominal(cfg)


def has_density(cfg: Any) -> bool:
    """Whether ``cfg`` is parameterised by a ``density`` that per-layer distributions may set."""
    return type(cfg) in _BY_TYPE and _BY_TYPE[type(cfg)].density_param


def with_density(cfg: Any, density: float) -> Any:
    """``cfg`` at another density (capped at 1.0); configs without a density are returned unchanged."""
    if not has_density(cfg):
        return cfg
    return dataclasses.replace(cfg, density=min(1.0, float(density)))


def config_from_dict(d: dict[str, Any] | SparsifierConfig, where: str = "sparsifier") -> SparsifierConfig:
    """Build a config from ``{"type": name, **fields}``; errors name the bad key and the valid ones."""
    if type(d) in _BY_TYPE:
        return d  # type: ignore[return-value]
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping like {{type: topk, density: 0.1}}, got {d!r}")
    d = dict(d)
    name = d.pop("type", None)
    if name not in _BY_NAME:
        raise ValueError(f"{where}: unknown sparsifier type {name!r}; valid choices: {', '.join(list_sparsifiers())}")
    cls = _BY_NAME[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for type {name!r}; valid keys: {sorted(fields)}")
    try:
        return cls(**d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_to_dict(cfg: SparsifierConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"type": entry(cfg).name}
    out.update({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
    return out


def threshold(x: Tensor, cfg: SparsifierConfig, *, key: str = "") -> Tensor | None:
    """The reusable part of ``cfg`` for ``x`` (threshold or mask). ``key`` seeds per-layer random masks."""
    return entry(cfg).threshold(x, cfg, key=key)


def apply(x: Tensor, cfg: SparsifierConfig, thr: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """Sparsify ``x`` given a (possibly cached) result of :func:`threshold`."""
    return entry(cfg).apply(x, cfg, thr, generator)


def sparsify(x: Tensor, cfg: SparsifierConfig, *, generator: torch.Generator | None = None, key: str = "") -> Tensor:
    """``apply(x, cfg, threshold(x, cfg))``.

    Example:
        >>> x = torch.tensor([0.1, -3.0, 2.0, 0.5])
        >>> sparsify(x, TopK(density=0.5))
        tensor([ 0., -3.,  2.,  0.])
    """
    return apply(x, cfg, threshold(x, cfg, key=key), generator)


def mask(x: Tensor, cfg: SparsifierConfig, *, key: str = "") -> Tensor:
    """Boolean mask of the positions ``cfg`` keeps (deterministic sparsifiers only)."""
    e = entry(cfg)
    if e.keep is None:
        raise ValueError(f"mask() is undefined for {type(cfg).__name__}{'' if not hasattr(cfg, 'stochastic') else ' (stochastic)'}")
    k = e.keep(x, cfg, e.threshold(x, cfg, key=key))
    return torch.ones_like(x, dtype=torch.bool) if k is None else k.expand_as(x)


# --------------------------------------------------------------------------------------------- top-K
def _count(idx: Tensor, nbins: int) -> Tensor:
    """Histogram of integer ``idx`` in ``[0, nbins)`` without a host sync (bincount sizes its output by a max)."""
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        # The fastest CPU kernel; it sizes its output from the data (a free "sync" on CPU), which a compiler
        # cannot trace, so compiled code takes the fixed-size path below.
        return torch.bincount(idx, minlength=nbins)[:nbins]
    return torch.zeros(nbins, dtype=torch.int64, device=idx.device).index_add_(0, idx.long(), torch.ones_like(
        idx, dtype=torch.int64))


def _select_bucket(hist: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Bucket of the k-th largest element given a histogram, and the number of elements in higher buckets."""
    above_or_in = hist.flip(0).cumsum(0)  # [i] = count in buckets >= nbins-1-i
    i = torch.searchsorted(above_or_in, k.reshape(1))  # first i with count >= k, shape (1,)
    above = torch.where(i > 0, above_or_in.gather(0, (i - 1).clamp(min=0)), torch.zeros_like(i))
    return (hist.numel() - 1 - i).reshape(()), above.reshape(())


def dense_order(t: Tensor) -> tuple[int, ...] | None:
    """A permutation of ``t``'s dims under which it is contiguous (e.g. NHWC for channels_last), or None."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    perm = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return perm if t.permute(perm).is_contiguous() else None


def selection_order(t: Tensor) -> tuple[int, ...] | None:
    """The order a top-K selection of ``t`` numbers its positions in: ``t``'s memory order (:func:`dense_order`),
    except in compiled CPU code, where a 4-D activation is taken channels_last.

    Inductor lays conv activations out channels_last on CPU, which a traced program cannot see (it traces the eager
    layout). Positions in the order Inductor stores the tensor need no transposing copy on the way into the selection
    and out of the unpacking; NCHW positions cost a strided gather of the whole activation each way, as much as the
    selection itself. The same program gives the same positions wherever the layout is decided.
    """
    if t.dim() == 4 and t.device.type == "cpu" and torch.compiler.is_compiling():
        return (0, 2, 3, 1)
    return dense_order(t)


def flat_memory_order(t: Tensor) -> Tensor:
    """``t``'s elements as a 1-D tensor in :func:`selection_order` (a view for contiguous or channels_last tensors).

    Top-K and packing do not care about element order, and ``reshape(-1)`` of a channels_last tensor would copy it.
    """
    perm = selection_order(t)
    return t.reshape(-1) if perm is None else t.permute(perm).reshape(-1)


def _radix_threshold(a: Tensor, k: int) -> Tensor:
    """The exact k-th largest of the non-negative float32 ``a`` by two histogram passes on its bit pattern."""
    bits = a.view(torch.int32)  # non-negative floats: ordered like their bit patterns read as integers
    high = bits >> 16
    kk = torch.tensor(k, device=a.device)
    b, above = _select_bucket(_count(high, 1 << 15), kk)
    # Only the elements of bucket b compete for the low bits; the rest go to a spill bin that is cut off.
    low = torch.where(high == b, bits.bitwise_and(0xFFFF), 1 << 16)
    lo, _ = _select_bucket(_count(low, (1 << 16) + 1)[: 1 << 16], kk - above)
    return ((b << 16) | lo).to(torch.int32).view(torch.float32)


def _magnitudes(flat: Tensor) -> Tensor:
    """float32 magnitudes (exact for bf16/fp16 values; float64 stays float64).

    A transient as large as the tensor, in a reused buffer (:func:`sparsetrain._scratch.scratch`): valid only inside
    the selection that asked for it. The buffer has ``numel + 1`` elements so that backward's unpacking
    (:func:`sparsetrain.packing.scatter`, which needs one spare slot) reuses the same one.
    """
    dt = flat.dtype if flat.dtype in (torch.float32, torch.float64) else torch.float32
    a = scratch("dense", flat.numel() + 1, dt, flat.device)[:-1]
    if flat.dtype == dt:
        return torch.abs(flat, out=a)
    return a.copy_(flat).abs_()


def topk_threshold(score: Tensor, density: float) -> Tensor:
    """The k-th largest ``|value|`` of ``score`` (flattened), ``k = ceil(density * numel)``; a 0-dim tensor. Exact.

    On CPU a sampled bracket (:func:`_bracket_candidates`) selects among the few values near the k-th; elsewhere, and
    when the bracket misses, a radix select on the float's bit pattern: for non-negative IEEE floats the bits, read
    as integers, are ordered like the values, so two histogram passes (the high 16 bits, then the low 16 bits inside
    the one bucket that holds the k-th value) give its exact bits with static shapes and no host sync. ``score`` is
    used by magnitude, so ``topk_threshold(x, d)`` equals ``topk_threshold(x.abs(), d)``.
    """
    flat = flat_memory_order(score.detach())
    n = flat.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if torch.compiler.is_compiling() and flat.device.type == "cpu" and n >= 4096 and flat.dtype != torch.float64:
        return torch.ops.sparsetrain.topk_threshold_k(flat, k)  # the eager selection, opaque (see topk_select)
    found = native_select(flat, k, threshold_only=True)
    if found:
        return found[0]
    a = _magnitudes(flat)
    if direct(a):
        return a.kthvalue(n - k + 1).values
    if use_bracket(a, k):
        found = bracket_candidates(a, k)
        if found is not None:
            return found[0]
    return _radix_threshold(a, k)


def _tie_rule_positions(a: Tensor, thr: Tensor, k: int, fill: int) -> Tensor:
    """Positions of the top k of ``a`` given its exact k-th largest ``thr``, in a static ``(k,)`` int64 tensor.

    The tie rule: every value ``> thr`` (fewer than k of them), then the values ``== thr`` in memory order until k
    are taken; unused slots hold ``fill``. When ``thr`` is 0 the ties are zeros, which a GEMM does not need: they
    are not taken. So the kept set is ``|v| >= thr`` except when more than k values tie at a non-zero threshold.
    """
    gt = a > thr
    n_gt = gt.sum()
    pos_gt = torch.nonzero_static(gt, size=k, fill_value=fill).reshape(-1)
    pos_eq = torch.nonzero_static((a == thr) & (thr > 0), size=k, fill_value=fill).reshape(-1)
    j = torch.arange(k, device=a.device)
    return torch.where(j < n_gt, pos_gt, pos_eq.gather(0, (j - n_gt).clamp(min=0)))


def _padded_values(flat: Tensor, pos: Tensor) -> Tensor:
    """The values of ``flat`` at ``pos``, 0 at the padding slots (position ``numel``) of a static-size selection."""
    n = flat.numel()
    return flat.index_select(0, pos.clamp(max=n - 1)).masked_fill_(pos == n, 0)


def _int32(pos: Tensor, n: int) -> Tensor:
    """Positions as a new int32 tensor (half the bytes of int64; index ops take either) when ``n`` allows."""
    return pos.to(torch.int32, copy=True) if n < 2**31 - 1 else pos.clone()


def topk_select(x: Tensor, density: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-K of ``|x|`` as a static-size selection: ``(thr, pos, values)``.

    ``thr`` is the k-th largest magnitude (as :func:`topk_threshold`), ``pos`` the kept positions in ``x``'s memory
    order (:func:`flat_memory_order`; int32 below 2**31 elements, padded with ``numel``) and ``values`` the kept values of ``x`` (0 at
    the padding). With static shapes (compiled code, accelerators) ``pos`` has exactly ``k = ceil(density *
    numel)`` slots, known before the data is seen, so no count goes to the host; ties at the threshold then follow
    :func:`_tie_rule_positions`. In eager CPU code, where reading a count back is free, every value ``|v| >= thr``
    is kept (all ties, as :func:`mask` does; zeros are left out), so ``pos`` may be longer or shorter than k.

    Example:
        >>> thr, pos, vals = topk_select(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
        >>> thr.item(), pos.tolist(), vals.tolist()
        (2.0, [1, 2], [-3.0, 2.0])
    """
    flat = flat_memory_order(x.detach())
    n = flat.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if torch.compiler.is_compiling() and flat.device.type == "cpu" and flat.is_floating_point():
        # Compiled CPU code: the eager selection as one opaque op with static output sizes (exactly k slots), so the
        # graph has no break and Inductor does not run the slower histogram path on CPU.
        # The values come out of the op too: a gather traced beside it would be recomputed in backward from the
        # dense activation by the partitioner, and fused into the backward's normalisation kernels.
        return torch.ops.sparsetrain.topk_select_k(flat, k)
    found = native_select(flat, k)
    if found:
        return found[0], found[1], found[2]
    a = _magnitudes(flat)
    thr = pos = None
    if not direct(a) and use_bracket(a, k):
        found = bracket_candidates(a, k)
        if found is not None:
            thr, cand, vals = found
            # Here a count read back is free, so every tie at the threshold is kept (|v| >= thr, as the mask
            # sparsifiers do); zeros are left out when the threshold is 0 (a GEMM does not need them).
            keep = vals >= thr if bool(thr > 0) else vals > 0
            pos = _int32(cand.index_select(0, torch.nonzero(keep).view(-1)), n)
    if pos is None:
        thr = a.kthvalue(n - k + 1).values if direct(a) else _radix_threshold(a, k)
        if eager_cpu(a):
            keep = a >= thr if bool(thr > 0) else a > 0  # as in the bracket: every tie, no zeros
            pos = torch.nonzero(keep).view(-1)
        else:
            pos = _int32(_tie_rule_positions(a, thr, k, n), n)
            return thr, pos, _padded_values(flat, pos)
        pos = _int32(pos, n)
    return thr, pos, flat.index_select(0, pos)  # eager CPU: no padding


@torch.library.custom_op("sparsetrain::topk_select_k", mutates_args=())
def _topk_select_k(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(thr, pos, values)`` of the exact top k of the flat ``flat``, ``pos`` with exactly k int32 slots (tie
    rule), ``values`` the kept values (0 at the padding).

    The eager selection (:func:`topk_select`) wrapped for compiled code: its sizes are static, so a compiler takes
    it as one op. More kept values than k (ties) are cut by the tie rule; fewer (zeros left out) are padded with
    ``numel``.
    """
    n = flat.numel()
    thr, pos, values = topk_select(flat, (k - 0.5) / n)  # ceil((k - 0.5) / n * n) == k, free of rounding
    if pos.numel() != k:
        a = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.float().abs()
        pos = _int32(_tie_rule_positions(a, thr.to(a.dtype), k, n), n)
        values = _padded_values(flat, pos)
    return thr.float(), pos, values


@torch.library.custom_op("sparsetrain::topk_threshold_k", mutates_args=())
def _topk_threshold_k(flat: Tensor, k: int) -> Tensor:
    """The k-th largest magnitude of the flat ``flat`` (float32, 0-dim): the eager selection for compiled code."""
    return topk_threshold(flat, (k - 0.5) / flat.numel()).float()


@_topk_threshold_k.register_fake
def _(flat: Tensor, k: int) -> Tensor:
    return flat.new_empty((), dtype=torch.float32)


@_topk_select_k.register_fake
def _(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    index = torch.int32 if flat.numel() < 2**31 - 1 else torch.int64
    return flat.new_empty((), dtype=torch.float32), flat.new_empty((k,), dtype=index), flat.new_empty((k,))


def _topk_thr(x: Tensor, cfg: TopK, *, key: str = "") -> Tensor | None:
    if cfg.density >= 1.0:
        return None
    return topk_threshold(x, cfg.density)


def _magnitude_keep(x: Tensor, cfg: Any, thr: Tensor | None) -> Tensor | None:
    return None if thr is None else x.abs() >= thr.to(x.dtype)


def _threshold_thr(x: Tensor, cfg: Threshold, *, key: str = "") -> Tensor:
    return torch.tensor(cfg.threshold, dtype=torch.float32)


def _threshold_keep(x: Tensor, cfg: Threshold, thr: Tensor | None) -> Tensor:
    return x.abs() > cfg.threshold


# --------------------------------------------------------------------------------------------- channel top-K
def _slice_scores(w: Tensor) -> Tensor:
    """L1 norm of each ``(out, in)`` slice: a conv kernel ``k x k`` or a single linear weight."""
    a = w.detach().abs()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    return a if w.dim() <= 2 else a.sum(dim=tuple(range(2, w.dim())))


def _channel_thr(x: Tensor, cfg: ChannelTopK, *, key: str = "") -> Tensor | None:
    if cfg.density >= 1.0:
        return None
    return topk_threshold(_slice_scores(x), cfg.density)


def _channel_keep(x: Tensor, cfg: ChannelTopK, thr: Tensor | None) -> Tensor | None:
    if thr is None:
        return None
    keep = _slice_scores(x) >= thr
    return keep.reshape(keep.shape + (1,) * (x.dim() - keep.dim()))


# --------------------------------------------------------------------------------------------- N:M
def _nm_thr(x: Tensor, cfg: NM, *, key: str = "") -> None:
    return None  # N:M selection is local to each group: nothing to cache.


def _nm_keep(x: Tensor, cfg: NM, thr: Tensor | None) -> Tensor | None:
    if cfg.n == cfg.m:
        return None
    if x.dim() < 2:
        raise ValueError(f"NM sparsity needs a tensor with an input/channel dimension 1, got shape {tuple(x.shape)}")
    # Move dim 1 (in-channels of a weight, channels of an activation) last and group it by m.
    xt = x.movedim(1, -1)
    c = xt.shape[-1]
    pad = (-c) % cfg.m
    score = xt.detach().abs().float()
    if pad:
        # Padding scores of -1 are never chosen before a real value, so a short last group keeps min(n, len).
        score = torch.nn.functional.pad(score, (0, pad), value=-1.0)
    groups = score.reshape(-1, cfg.m)
    idx = groups.topk(cfg.n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    return keep.reshape(score.shape)[..., :c].movedim(-1, 1)


# --------------------------------------------------------------------------------------------- DBTD (Ye et al.)
_QUANTILES: dict[float, float] = {}


def _normal_quantile(p: float) -> float:
    """``Phi^-1(p)``, cached per ``p`` (filled when a DBTD config is made, so compiled code only reads a float)."""
    z = _QUANTILES.get(p)
    if z is None:
        z = _QUANTILES[p] = NormalDist().inv_cdf(p)
    return z


def dbtd_tau(g: Tensor, p: float, sigma: str = "consistent") -> Tensor:
    """``tau = sigma_hat * Phi^-1(p)`` with ``sigma_hat`` estimated from ``mean|g|`` in O(n), no sort."""
    factor = math.sqrt(math.pi / 2) if sigma == "consistent" else math.sqrt(2 / math.pi)
    return g.detach().abs().float().mean() * (factor * _normal_quantile(p))


def stochastic_prune(g: Tensor, tau: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Algorithm 1 of Ye et al.: below ``tau``, ``g -> sign(g)*tau`` w.p. ``|g|/tau`` else 0. Unbiased."""
    tau = tau.to(g.dtype)
    a = g.abs()
    r = torch.rand(g.shape, generator=generator, device=g.device, dtype=torch.float32).to(g.dtype)
    # P(r*tau < |g|) = |g|/tau below tau, and 1 at or above it (r < 1): one mask serves both cases, and
    # max(|g|, tau) with g's sign is g above tau and sign(g)*tau below it. Four passes instead of nine.
    # tau == 0 (an all-zero gradient) needs no branch (and so no host sync): the mask is then g != 0.
    promote = r.mul_(tau) < a
    return torch.maximum(a, tau).copysign_(g).mul_(promote)


def _dbtd_thr(x: Tensor, cfg: DBTD, *, key: str = "") -> Tensor:
    return dbtd_tau(x, cfg.p, cfg.sigma)


def _dbtd_apply(x: Tensor, cfg: DBTD, thr: Tensor | None, generator: torch.Generator | None) -> Tensor:
    assert thr is not None
    if cfg.stochastic:
        return stochastic_prune(x, thr, generator)
    return x * (x.abs() >= thr.to(x.dtype))


# --------------------------------------------------------------------------------------------- random channel
def random_channel_mask(
    n_out: int, n_in: int, density: float, generator: torch.Generator | None = None
) -> Tensor:
    """A ``(n_out, n_in)`` boolean connectivity mask with no dead filters.

    Each output gets ``max(1, round(density * n_in))`` random inputs (raised to ``ceil(n_in / n_out)`` when fewer
    connections could not cover every input). Uncovered inputs are then swapped in for a connection to an
    over-covered input of a random output, which keeps every output's fan-in unchanged.

    A layer with a single input channel cannot keep a fraction of it: as in Changpinyo et al. (Sect. 5.1), a
    fraction ``sqrt(density)`` of its *outputs* stays connected instead (at least one); the others are dead
    filters, which that layer cannot avoid at this density.
    """
    if n_in == 1:
        keep = max(1, round(math.sqrt(density) * n_out))
        m = torch.zeros(n_out, 1, dtype=torch.bool)
        m[torch.randperm(n_out, generator=generator)[:keep], 0] = True
        return m
    k = min(n_in, max(1, round(density * n_in), math.ceil(n_in / n_out)))
    order = torch.rand(n_out, n_in, generator=generator).argsort(dim=1)
    m = torch.zeros(n_out, n_in, dtype=torch.bool)
    m.scatter_(1, order[:, :k], True)
    cover = m.sum(0)
    for i in torch.nonzero(cover == 0).flatten().tolist():
        # candidates: (o, j) with m[o, j] and cover[j] > 1
        cand = torch.nonzero(m & (cover > 1).unsqueeze(0))
        pick = cand[torch.randint(len(cand), (1,), generator=generator).item()]
        o, j = int(pick[0]), int(pick[1])
        m[o, j], m[o, i] = False, True
        cover[j] -= 1
        cover[i] += 1
    return m


def grow_channel_mask(mask: Tensor, generator: torch.Generator | None = None, target: float = 1.0) -> Tensor:
    """Changpinyo's incremental step: double every output's active inputs (up to ``target``), keeping the old ones.

    The new mask is a superset of ``mask`` (connections are only ever added) and each row's count doubles, so the
    layer's connection count doubles until it is dense. The added inputs are drawn at random among the inactive
    ones. A single-input layer (``mask`` of shape ``(n_out, 1)``) doubles its connected outputs instead.
    """
    m = mask.clone().cpu()
    if m.shape[1] == 1:  # see random_channel_mask: grow the connected outputs
        col = m[:, 0]
        limit = max(int(col.sum()), round(math.sqrt(target) * len(col)))
        add = max(0, min(int(col.sum()), limit - int(col.sum())))
        idle = torch.nonzero(~col).flatten()
        col[idle[torch.randperm(len(idle), generator=generator)[:add]]] = True
        return m.to(mask.device)
    have = m.sum(1)
    limit = torch.maximum(have, torch.full_like(have, min(m.shape[1], round(target * m.shape[1]))))
    want = torch.minimum(2 * have, limit)
    # Random scores, with active inputs first: the top-`want` of each row keeps them and adds random new ones.
    score = torch.rand(m.shape, generator=generator) + m.float() * 2.0
    order = score.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m.shape[1]).expand_as(order).contiguous())
    return (rank < want.unsqueeze(1)).to(mask.device)


def seed_for(key: str, seed: int) -> int:
    """A stable per-layer seed from a name and the recipe seed (Python's hash() is salted per process)."""
    # A stable per-layer seed (Python's hash() is salted per process, so roll our own).
    h = seed & 0xFFFFFFFF
    for ch in key.encode():
        h = (h * 1000003 ^ ch) & 0xFFFFFFFF
    return h


def _random_channel_thr(x: Tensor, cfg: RandomChannel, *, key: str = "") -> Tensor | None:
    if x.dim() < 2:
        raise ValueError(f"random_channel needs a weight with (out, in, ...) dims, got shape {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed_for(key, cfg.seed))
    return random_channel_mask(x.shape[0], x.shape[1], cfg.density, g).to(x.device)


def _random_channel_keep(x: Tensor, cfg: RandomChannel, thr: Tensor | None) -> Tensor:
    assert thr is not None
    return thr.reshape(thr.shape + (1,) * (x.dim() - 2))


def _dbtd_nominal(cfg: DBTD) -> float:
    """Expected kept fraction for a Gaussian gradient: P(|g| >= tau) + E[|g|/tau; |g| < tau] when stochastic."""
    z = NormalDist().inv_cdf(cfg.p) * (1.0 if cfg.sigma == "consistent" else 2.0 / math.pi)
    phi = NormalDist().pdf
    above = 2.0 * (1.0 - NormalDist().cdf(z))
    return above + (2.0 * (phi(0.0) - phi(z)) / z if cfg.stochastic else 0.0)


register_sparsifier(TopK, "topk", threshold=_topk_thr, keep=_magnitude_keep)
register_sparsifier(ChannelTopK, "channel_topk", threshold=_channel_thr, keep=_channel_keep)
register_sparsifier(Threshold, "threshold", threshold=_threshold_thr, keep=_threshold_keep)
register_sparsifier(NM, "nm", threshold=_nm_thr, keep=_nm_keep, nominal=lambda cfg: cfg.n / cfg.m)
register_sparsifier(DBTD, "dbtd", threshold=_dbtd_thr, apply=_dbtd_apply, stochastic=lambda cfg: cfg.stochastic,
                    nominal=_dbtd_nominal)
register_sparsifier(RandomChannel, "random_channel", threshold=_random_channel_thr, keep=_random_channel_keep,
                    fixed=True)


@dataclass(frozen=True)
class RowTopK:
    """Top-K by magnitude within each example: ``k = ceil(density * numel / batch)`` per slice of dim 0 (meProp).

    meProp (Sun et al. 2017) keeps the top-k of each example's output gradient, so every example contributes to the
    update; :class:`TopK` over the whole batch can leave some examples with nothing.
    """

    density: float | None = None
    sparsity: float | None = None

    def __post_init__(self) -> None:
        _resolve_density(self)


def _row_topk_thr(x: Tensor, cfg: RowTopK, *, key: str = "") -> Tensor | None:
    if cfg.density >= 1.0 or x.dim() < 2:
        return None if cfg.density >= 1.0 else topk_threshold(x, cfg.density)
    rows = x.detach().reshape(x.shape[0], -1)
    k = min(rows.shape[1], max(1, math.ceil(cfg.density * rows.shape[1])))
    thr = rows.abs().float().topk(k, dim=1, sorted=False).values.amin(dim=1)
    return thr.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def _row_topk_keep(x: Tensor, cfg: RowTopK, thr: Tensor | None) -> Tensor | None:
    if thr is not None and thr.dim() > 0 and thr.shape[0] != x.shape[0]:
        thr = _row_topk_thr(x, cfg)  # a cached per-example threshold from a batch of another size: recompute
    return None if thr is None else x.abs() >= thr.to(x.dtype)


register_sparsifier(RowTopK, "row_topk", threshold=_row_topk_thr, keep=_row_topk_keep)
