"""One frozen config per method; each validates itself and builds the :class:`LayerSpec` of the layers it targets.

A *preset* is a named method config plus the recipe-wide defaults it comes with (SWAT-U: first layer dense;
SWAT-ERK: the ERK distribution; grad-prune: convolutions only). Presets are registered by name; recipes
(:mod:`sparsetrain.recipe`) build them from YAML and may stack several on the same layers.

Example:
    >>> SwatConfig(density=0.1).layer_spec(seed=0).weight
    TopK(density=0.1, sparsity=None)
    >>> sorted(list_presets())[:3]
    ['dense', 'grad-prune', 'meprop']
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from sparsetrain import sparsifiers as sp
from sparsetrain.formatting import is_number
from sparsetrain.layers import INHERIT, OPERANDS, LayerSpec

__all__ = [
    "SwatConfig",
    "MePropConfig",
    "GradPruneConfig",
    "RandomChannelConfig",
    "ThresholdConfig",
    "DenseConfig",
    "Preset",
    "PRESETS",
    "register_preset",
    "list_presets",
    "merge_specs",
    "check_choice",
    "GradientThreshold",
    "decay_into_gradients",
    "threshold_gradients_",
]

log = logging.getLogger(__name__)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``name``, the bad value and the valid choices."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _interval(name: str, v: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = is_number(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {v!r}")


@dataclass(frozen=True)
class SwatConfig:
    """SWAT: top-K W in forward; top-K W (inherited) and top-K x in backward; dense weight update.

    ``structure="channel"`` is structured SWAT: whole ``(out, in)`` kernel slices by L1 norm (activations stay
    unstructured). The activation density follows the weight density (METHODS §1).
    """

    density: float
    structure: str = "unstructured"

    def __post_init__(self) -> None:
        _interval("density", self.density, 0.0, 1.0, True, False)
        check_choice("structure", self.structure, ("unstructured", "channel"))

    def layer_spec(self, seed: int = 0) -> LayerSpec:
        weight = sp.TopK(density=self.density) if self.structure == "unstructured" else sp.ChannelTopK(
            density=self.density)
        return LayerSpec(weight=weight, input_for_grad_weight=sp.TopK(density=self.density))


@dataclass(frozen=True)
class MePropConfig:
    """meProp (SWAT's backward ablation): top-K on the output gradient ``dy`` only; forward and ``dW`` use dense x/W.

    ``per_example=True`` (default, Sun et al. 2017 and their code) keeps the top-k of each example's ``dy`` (each
    slice of the batch dimension); ``False`` keeps the top-K of the whole batch's ``dy`` (the batch-wide top-K SWAT
    uses for every tensor). The preset leaves the classifier dense, as meProp's code does (its output layer has
    ``k = 0``): pruning the logits' gradient keeps mostly the true-class entries, nothing pushes the wrong logits
    down, and training diverges (docs/methods.md, meProp).
    """

    density: float
    per_example: bool = True

    def __post_init__(self) -> None:
        _interval("density", self.density, 0.0, 1.0, True, False)
        if not isinstance(self.per_example, bool):
            raise ValueError(f"per_example must be true or false, got {self.per_example!r}")

    def layer_spec(self, seed: int = 0) -> LayerSpec:
        cfg = sp.RowTopK(density=self.density) if self.per_example else sp.TopK(density=self.density)
        return LayerSpec(grad_output=cfg)


@dataclass(frozen=True)
class GradPruneConfig:
    """Ye et al.: DBTD threshold + unbiased stochastic pruning of the gradient feeding both backward GEMMs.

    ``placement="auto"`` (default) decides per layer from the model's dataflow (a ``torch.fx`` trace of the dense
    model, :func:`sparsetrain.graph.gradient_prune_placements`): a conv that feeds BatchNorm gets its ``dy`` pruned
    (Conv-BN-ReLU: after BN's backward); a conv that feeds a ReLU directly gets its ``dx`` pruned, which the
    preceding ReLU keeps sparse so the previous conv receives a sparse ``dy`` (Conv-ReLU nets, METHODS §2).
    ``"grad_output"`` / ``"grad_input"`` force one placement on every layer. A model fx cannot trace falls back to
    ``grad_output`` with a warning naming the reason.
    """

    p: float = 0.9
    sigma: str = "consistent"
    stochastic: bool = True
    placement: str = "auto"

    def __post_init__(self) -> None:
        _interval("p", self.p, 0.5, 1.0, True, True)
        check_choice("sigma", self.sigma, ("consistent", "literal"))
        check_choice("placement", self.placement, ("grad_output", "grad_input", "auto"))

    def _spec(self, placement: str) -> LayerSpec:
        return LayerSpec(**{placement: sp.DBTD(p=self.p, sigma=self.sigma, stochastic=self.stochastic)})

    def layer_spec(self, seed: int = 0) -> LayerSpec:
        """The spec without a model to look at: ``auto`` is ``grad_output`` (right for any Conv-BN layer)."""
        return self._spec("grad_output" if self.placement == "auto" else self.placement)

    def layer_specs(self, model: nn.Module, names: Sequence[str], seed: int = 0) -> dict[str, LayerSpec]:
        """Per layer of ``names`` (modules of ``model``, not yet swapped), its spec; ``auto`` traces the model."""
        if self.placement != "auto":
            return dict.fromkeys(names, self.layer_spec(seed))
        from sparsetrain.graph import gradient_prune_placements

        found = gradient_prune_placements(model, names)
        if found is None:
            log.warning("grad-prune placement auto: %s could not be traced (reason logged above); pruning every "
                        "layer's grad_output (right for Conv-BN-ReLU; for Conv-ReLU nets set placement: grad_input)",
                        type(model).__name__)
            found = dict.fromkeys(names, "grad_output")
        return {n: self._spec(found[n]) for n in names}


@dataclass(frozen=True)
class RandomChannelConfig:
    """Changpinyo et al.: a fixed random channel mask; optionally trained incrementally (double every N steps)."""

    density: float
    densify_every: int | None = None
    start_density: float = 0.01
    densify_init: str = "zero"

    def __post_init__(self) -> None:
        _interval("density", self.density, 0.0, 1.0, True, False)
        _interval("start_density", self.start_density, 0.0, 1.0, True, False)
        check_choice("densify_init", self.densify_init, ("zero", "keep"))
        de = self.densify_every
        if de is not None and (not isinstance(de, int) or isinstance(de, bool) or de < 1):
            raise ValueError(f"densify_every must be an integer number of steps >= 1, got {de!r}")

    def layer_spec(self, seed: int = 0) -> LayerSpec:
        d = self.density if self.densify_every is None else min(self.density, self.start_density)
        # A fixed topology: inactive connections must not learn (otherwise the mask would be meaningless).
        return LayerSpec(weight=sp.RandomChannel(density=d, seed=seed), mask_inactive_grads=True)


@dataclass(frozen=True)
class ThresholdConfig:
    """TensorQuant: magnitude thresholds (``|v| > t`` kept) on weights and/or layer inputs (activations)."""

    weight_threshold: float | None = None
    activation_threshold: float | None = None

    def __post_init__(self) -> None:
        for k in ("weight_threshold", "activation_threshold"):
            v = getattr(self, k)
            if v is not None and not (is_number(v) and v >= 0):
                raise ValueError(f"{k} must be a number >= 0, got {v!r}")

    def layer_spec(self, seed: int = 0) -> LayerSpec:
        wt, at = self.weight_threshold, self.activation_threshold
        return LayerSpec(weight=None if wt is None else sp.Threshold(wt),
                         input=None if at is None else sp.Threshold(at))


@dataclass(frozen=True)
class DenseConfig:
    """No sparsification: a baseline through the same training path."""

    def layer_spec(self, seed: int = 0) -> None:
        return None


@dataclass(frozen=True)
class Preset:
    """A named method: its config class, the config values it fixes, and the recipe-wide defaults it brings.

    ``density_hint`` names what sets a method that has no density (for the error when one is given).
    """

    name: str
    description: str
    config: type
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    density_hint: str = ""

    @property
    def takes_density(self) -> bool:
        return "density" in {f.name for f in dataclasses.fields(self.config)}

    @property
    def uses(self) -> frozenset[str]:
        """The preset's own recipe keys (its config's fields, less density and what the preset fixes)."""
        return frozenset(f.name for f in dataclasses.fields(self.config)) - {"density"} - set(self.fixed)

    def build(self, params: Mapping[str, Any]) -> Any:
        """The config from recipe keys; errors name the bad key and the preset's parameters."""
        extra = set(params) - self.uses - ({"density"} if self.takes_density else set())
        if extra:
            k = sorted(extra)[0]
            if k == "density":
                raise ValueError(f"preset {self.name!r} is set by {self.density_hint}, not density")
            raise ValueError(f"key {k!r} does not apply to preset {self.name!r} "
                             f"(its parameters: {', '.join(sorted(self.uses)) or 'none'})")
        if self.takes_density and params.get("density") is None:
            raise ValueError(f"preset {self.name!r} needs a density (kept fraction) or sparsity")
        return self.config(**{**params, **self.fixed})

    def params(self, config: Any) -> dict[str, Any]:
        """The recipe keys that rebuild ``config`` (inverse of :meth:`build`)."""
        return {k: v for k, v in dataclasses.asdict(config).items() if k not in self.fixed}


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str, config: type, *, fixed: Mapping[str, Any] | None = None,
                    density_hint: str = "", **defaults: Any) -> Preset:
    """Register a preset: ``config`` (a frozen dataclass with ``layer_spec(seed)``) plus recipe-wide defaults."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = Preset(name, description, config, dict(fixed or {}), defaults, density_hint)
    return PRESETS[name]


def list_presets() -> list[str]:
    """Names of the registered presets."""
    return sorted(PRESETS)


def merge_specs(a: LayerSpec | None, b: LayerSpec | None, where: str = "recipe") -> LayerSpec | None:
    """Stack two methods on one layer: each operand may be set by at most one of them."""
    if a is None or b is None:
        return a if b is None else b
    kw: dict[str, Any] = {}
    for op in OPERANDS:
        va, vb = getattr(a, op), getattr(b, op)
        unset = (None, INHERIT)
        if va not in unset and vb not in unset and va != vb:
            raise ValueError(f"{where}: operand {op!r} is set by two stacked methods ({va} and {vb}); "
                             "each operand can be sparsified by one method")
        kw[op] = va if va not in unset else vb if vb not in unset else va
    return LayerSpec(**kw, mask_inactive_grads=a.mask_inactive_grads or b.mask_inactive_grads)


register_preset("dense", "no sparsification (a baseline that still runs through the same training path)",
                DenseConfig, density_hint="nothing (it is dense)")
register_preset("swat-u", "SWAT, uniform density; top-K W in forward, top-K W and x in backward; first layer dense",
                SwatConfig, fixed={"structure": "unstructured"}, first_layer_dense=True, density=0.1)
register_preset("swat-erk", "SWAT with Erdős–Rényi-Kernel per-layer densities", SwatConfig,
                fixed={"structure": "unstructured"}, distribution="erk", density=0.1)
register_preset("swat-m", "SWAT with momentum-driven per-layer densities (call handle.step(optimizer))", SwatConfig,
                fixed={"structure": "unstructured"}, distribution="momentum", density=0.1)
register_preset("swat-channel", "structured SWAT: top-K (out,in) kernel slices by L1 norm; activations unstructured",
                SwatConfig, fixed={"structure": "channel"}, first_layer_dense=True, density=0.5)
register_preset("meprop", "meProp: top-K of each example's output gradient dy only; classifier dense",
                MePropConfig, last_layer_dense=True, density=0.1)
register_preset("grad-prune", "Ye et al.: DBTD threshold + unbiased stochastic pruning of conv output gradients",
                GradPruneConfig, layer_types="conv", density_hint="p (the percentile)")
register_preset("random-channel", "Changpinyo et al.: fixed random channel connectivity (convs only), optional "
                "incremental densification", RandomChannelConfig, layer_types="conv", density=0.5)
register_preset("threshold", "TensorQuant: magnitude thresholds on weights / activations / weight gradients "
                "(weight_threshold 0.01 when none is given)", ThresholdConfig,
                density_hint="weight_threshold / activation_threshold / gradient_threshold")


# ------------------------------------------------------------------------------------------------ loop rules
# A method whose rule acts on the optimizer's gradients, not on a layer's operands, gives the training loop one
# object with ``prepare(optimizer)`` (once, after the optimizer is built) and ``__call__(optimizer)`` (every step,
# between backward and ``optimizer.step()``). ``Recipe.gradient_rule()`` returns it, or None.

#: Param-group key holding the coupled L2 coefficient the loop adds to the gradient itself (the group's own
#: ``weight_decay`` is then 0). Kept in the group so the optimizer's state_dict, and so a resume, carries it.
GRAD_L2_KEY = "grad_l2"


def _decoupled(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    # AdamW decays the weights directly, not through the gradient (newer torch marks it in the group as well).
    return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def decay_into_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Move each param group's coupled L2 weight decay out of the optimizer, for :func:`threshold_gradients_`.

    TensorQuant's gradient-threshold study thresholds the gradient *after* the L2 term is added, so the term must be
    in the gradient when it is thresholded: the group's ``weight_decay`` goes to the ``grad_l2`` key and is set to 0
    (added once, by :func:`threshold_gradients_`). Decoupled decay (AdamW) stays in the optimizer. Idempotent.
    """
    for group in optimizer.param_groups:
        if not _decoupled(optimizer, group) and group.get("weight_decay", 0.0) and GRAD_L2_KEY not in group:
            group[GRAD_L2_KEY], group["weight_decay"] = group["weight_decay"], 0.0


@torch.no_grad()
def threshold_gradients_(optimizer: torch.optim.Optimizer, threshold: float) -> None:
    """TensorQuant's gradient study, in place: ``g += grad_l2 * p``, then ``g = 0`` where ``|g| <= threshold``.

    Acts on every parameter of ``optimizer`` that has a gradient (biases and BatchNorm included), between backward
    (and AMP unscaling) and ``optimizer.step()``; the L2 coefficient is the one :func:`decay_into_gradients` moved
    out of each group. Stays on the device (no host sync).
    """
    for group in optimizer.param_groups:
        wd = group.get(GRAD_L2_KEY, 0.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            if wd:
                p.grad.add_(p, alpha=wd)
            p.grad.masked_fill_(p.grad.abs() <= threshold, 0)  # |g| > T kept, as TensorQuant


@dataclass(frozen=True)
class GradientThreshold:
    """TensorQuant's gradient study as a loop rule: one magnitude threshold on every gradient, after the L2 term.

    Example:
        >>> net = nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.0)
        >>> rule = GradientThreshold(0.5); rule.prepare(opt)
        >>> net(torch.ones(1, 2)).sum().backward(); rule(opt)
        >>> net.weight.grad.tolist()
        [[1.0, 1.0]]
    """

    threshold: float

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        decay_into_gradients(optimizer)

    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        threshold_gradients_(optimizer, self.threshold)
