"""Recipes: which layers get which :class:`LayerSpec`, plus the global settings of a method.

A recipe is an ordered mapping from layer-name patterns to layer specs (exact names first, then ``re:`` patterns
full-matched in order; first match wins; ``null`` = dense), plus global settings. A *preset* supplies the default
spec for every Conv2d/Linear the patterns do not match; every method in the toolkit is a preset over the same
mechanism (:mod:`sparsetrain.layers`).

Example:
    >>> import torch.nn as nn, sparsetrain
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    >>> r = Recipe.load({"preset": "swat-u", "density": 0.2, "layers": {"3": None}})
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn

from sparsetrain import sparsifiers as sp
from sparsetrain.layers import SPARSE_TYPES, LayerSpec

__all__ = ["Recipe", "list_presets", "register_preset", "resolve_layers", "PRESETS", "GLOBAL_KEYS"]

DISTRIBUTIONS = ("uniform", "erk", "momentum")
LAYER_TYPES = ("conv", "linear", "all")


@dataclass(frozen=True)
class Preset:
    """A named method: ``make(recipe) -> LayerSpec`` for unmatched layers, its defaults and the keys it uses."""

    name: str
    description: str
    make: Callable[["Recipe"], LayerSpec | None]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    uses: frozenset[str] = frozenset()


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str, uses: tuple[str, ...] = (), **defaults: Any):
    """Decorator registering ``fn(recipe) -> LayerSpec`` as preset ``name``."""

    def deco(fn: Callable[["Recipe"], LayerSpec | None]) -> Callable[["Recipe"], LayerSpec | None]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        PRESETS[name] = Preset(name, description, fn, defaults, frozenset(uses))
        return fn

    return deco


def list_presets() -> list[str]:
    """Names of the registered presets."""
    return sorted(PRESETS)


# Global keys every recipe understands; preset-specific keys are in each preset's ``uses``.
COMMON_KEYS = (
    "preset", "density", "sparsity", "distribution", "threshold_period", "first_layer_dense", "last_layer_dense",
    "mask_inactive_grads", "freeze_topology_after", "layer_types", "seed", "layers", "gradient_threshold",
    "pack_saved",
)
PRESET_KEYS = ("p", "sigma", "stochastic", "placement", "weight_threshold", "activation_threshold",
               "densify_every", "start_density", "densify_init")
GLOBAL_KEYS = COMMON_KEYS + PRESET_KEYS


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with :meth:`Recipe.load` (preset name, dict, YAML path or Recipe)."""

    preset: str | None = None
    density: float | None = None
    distribution: str = "uniform"
    threshold_period: int = 1
    first_layer_dense: bool = False
    last_layer_dense: bool = False
    mask_inactive_grads: bool = False
    freeze_topology_after: int | str | None = None
    layer_types: str = "all"
    seed: int = 0
    layers: tuple[tuple[str, LayerSpec | None], ...] = ()
    gradient_threshold: float | None = None
    pack_saved: bool = True
    # preset parameters
    p: float = 0.9
    sigma: str = "consistent"
    stochastic: bool = True
    placement: str = "grad_output"
    weight_threshold: float | None = None
    activation_threshold: float | None = None
    densify_every: int | None = None
    start_density: float = 0.01
    densify_init: str = "zero"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, recipe: "str | Path | Mapping[str, Any] | Recipe", **overrides: Any) -> "Recipe":
        """Build from a preset name, a YAML path, a dict or a Recipe, then apply ``overrides``.

        Raises:
            ValueError: unknown preset / key, out-of-range value; the message names the key and valid choices.
        """
        if isinstance(recipe, Recipe):
            d = recipe.to_dict()
        elif isinstance(recipe, Mapping):
            d = dict(recipe)
        elif isinstance(recipe, (str, Path)):
            s = str(recipe)
            if s in PRESETS:
                d = {"preset": s}
            elif s.endswith((".yaml", ".yml")) or Path(s).is_file():
                import yaml

                p = Path(s)
                if not p.is_file():
                    raise FileNotFoundError(f"recipe file not found: {s}")
                d = yaml.safe_load(p.read_text()) or {}
                if not isinstance(d, dict):
                    raise ValueError(f"recipe {s}: top level must be a mapping of settings, got {type(d).__name__}")
            else:
                raise ValueError(f"unknown preset {s!r}; valid presets: {', '.join(list_presets())} "
                                 "(or a path to a .yaml recipe)")
        else:
            raise TypeError(f"recipe must be a preset name, a dict, a YAML path or a Recipe, got {type(recipe)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        # An override of density replaces the recipe's sparsity and vice versa (they are one setting).
        if "density" in overrides and "sparsity" not in overrides:
            d.pop("sparsity", None)
        if "sparsity" in overrides and "density" not in overrides:
            d.pop("density", None)
        d.update(overrides)
        return cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        unknown = set(d) - set(GLOBAL_KEYS)
        if unknown:
            raise ValueError(f"recipe: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(GLOBAL_KEYS)}")
        preset_name = d.get("preset")
        preset = None
        if preset_name is not None:
            if preset_name not in PRESETS:
                raise ValueError(f"recipe: unknown preset {preset_name!r}; valid presets: {', '.join(list_presets())}")
            preset = PRESETS[preset_name]
            for k in set(d) & set(PRESET_KEYS):
                if k not in preset.uses:
                    used = ", ".join(sorted(preset.uses)) or "none"
                    raise ValueError(f"recipe: key {k!r} does not apply to preset {preset_name!r} "
                                     f"(its parameters: {used})")
            for k, v in preset.defaults.items():
                if k == "density" and d.get("sparsity") is not None:
                    continue
                d.setdefault(k, v)
        # density / sparsity: the kept fraction, or its complement; never both.
        if "sparsity" in d and d["sparsity"] is not None:
            if d.get("density") is not None:
                raise ValueError(f"recipe: give either density or sparsity, not both "
                                 f"(got density={d['density']}, sparsity={d['sparsity']})")
            s = d.pop("sparsity")
            _check_range("sparsity", s, 0.0, 1.0, lo_open=False, hi_open=True)
            d["density"] = round(1.0 - float(s), 12)  # 1 - 0.8 != 0.2 in floating point
        d.pop("sparsity", None)
        if d.get("density") is not None:
            _check_range("density", d["density"], 0.0, 1.0, lo_open=True, hi_open=False)
            d["density"] = float(d["density"])
        if d.get("distribution", "uniform") not in DISTRIBUTIONS:
            raise ValueError(f"recipe: distribution {d['distribution']!r} is not one of {', '.join(DISTRIBUTIONS)}")
        if d.get("layer_types", "all") not in LAYER_TYPES:
            raise ValueError(f"recipe: layer_types {d['layer_types']!r} is not one of {', '.join(LAYER_TYPES)}")
        tp = d.get("threshold_period", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"recipe: threshold_period must be an integer >= 1, got {tp!r}")
        if "p" in d:
            _check_range("p", d["p"], 0.5, 1.0, lo_open=True, hi_open=True)
        if d.get("sigma", "consistent") not in ("consistent", "literal"):
            raise ValueError(f"recipe: sigma {d['sigma']!r} is not one of consistent, literal")
        if d.get("placement", "grad_output") not in ("grad_output", "grad_input"):
            raise ValueError(f"recipe: placement {d['placement']!r} is not one of grad_output, grad_input")
        if d.get("densify_init", "zero") not in ("zero", "keep"):
            raise ValueError(f"recipe: densify_init {d['densify_init']!r} is not one of zero, keep")
        if "start_density" in d:
            _check_range("start_density", d["start_density"], 0.0, 1.0, lo_open=True, hi_open=False)
        for k in ("weight_threshold", "activation_threshold", "gradient_threshold"):
            if d.get(k) is not None and not (isinstance(d[k], (int, float)) and d[k] >= 0):
                raise ValueError(f"recipe: {k} must be a number >= 0, got {d[k]!r}")
        if d.get("densify_every") is not None and (not isinstance(d["densify_every"], int) or d["densify_every"] < 1):
            raise ValueError(f"recipe: densify_every must be an integer number of steps >= 1, got {d['densify_every']!r}")
        parse_freeze(d.get("freeze_topology_after"))
        layers = d.pop("layers", None) or {}
        if isinstance(layers, Mapping):
            items = list(layers.items())
        else:
            items = [tuple(x) for x in layers]
        parsed: list[tuple[str, LayerSpec | None]] = []
        for pat, spec in items:
            if not isinstance(pat, str):
                raise ValueError(f"recipe: layer pattern must be a string, got {pat!r}")
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ValueError(f"recipe: layers[{pat!r}]: invalid regular expression: {e}") from None
            parsed.append((pat, spec if isinstance(spec, LayerSpec) or spec is None
                           else LayerSpec.from_dict(spec, where=f"recipe: layers[{pat!r}]")))
        d["layers"] = tuple(parsed)
        r = cls(**d)
        if preset is not None:
            preset.make(r)  # validates that the preset has what it needs (e.g. a density)
        return r

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (YAML/JSON-able); ``Recipe.load(r.to_dict()) == r``.

        Every common setting is written out (so a preset default that was overridden stays overridden); preset
        parameters only for the preset that uses them.
        """
        uses = PRESETS[self.preset].uses if self.preset else frozenset()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "layers":
                if v:
                    out["layers"] = {pat: (None if s is None else s.to_dict()) for pat, s in v}
            elif f.name in COMMON_KEYS or f.name in uses:
                out[f.name] = v
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def default_spec(self) -> LayerSpec | None:
        """The spec the preset gives layers that no pattern matches (None = dense)."""
        if self.preset is None:
            return None
        return PRESETS[self.preset].make(self)


def _check_range(key: str, v: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"recipe: {key} must be in {interval}, got {v!r}")


def parse_freeze(v: Any) -> tuple[int, str] | None:
    """``freeze_topology_after``: an int (steps), ``"N steps"`` or ``"N epochs"``."""
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v, "steps"
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(steps?|epochs?)\s*", v)
        if m:
            return int(m.group(1)), "epochs" if m.group(2).startswith("epoch") else "steps"
    raise ValueError(f"recipe: freeze_topology_after must be an integer (steps), 'N steps' or 'N epochs', got {v!r}")


def _need_density(r: Recipe) -> float:
    if r.density is None:
        raise ValueError(f"recipe: preset {r.preset!r} needs a density (kept fraction) or sparsity")
    return r.density


# ------------------------------------------------------------------------------------------------ presets
@register_preset("dense", "no sparsification (a baseline that still runs through the same training path)")
def _dense(r: Recipe) -> LayerSpec | None:
    return None


@register_preset("swat-u", "SWAT, uniform density; top-K W in forward, top-K W and x in backward; first layer dense",
                 first_layer_dense=True, density=0.1)
def _swat_u(r: Recipe) -> LayerSpec:
    return _swat(r, sp.TopK)


def _swat(r: Recipe, weight_cfg: type) -> LayerSpec:
    """SWAT: sparse W in forward; sparse W (inherited) and top-K x in backward; activations follow W's density."""
    d = _need_density(r)
    return LayerSpec(weight=weight_cfg(density=d), input_for_grad_weight=sp.TopK(density=d),
                     mask_inactive_grads=r.mask_inactive_grads)


@register_preset("swat-erk", "SWAT with Erdős–Rényi-Kernel per-layer densities", distribution="erk", density=0.1)
def _swat_erk(r: Recipe) -> LayerSpec:
    return _swat_u(r)


@register_preset("swat-m", "SWAT with momentum-driven per-layer densities (call handle.step(optimizer))",
                 distribution="momentum", density=0.1)
def _swat_m(r: Recipe) -> LayerSpec:
    return _swat_u(r)


@register_preset("swat-channel", "structured SWAT: top-K (out,in) kernel slices by L1 norm; activations unstructured",
                 first_layer_dense=True, density=0.5)
def _swat_channel(r: Recipe) -> LayerSpec:
    return _swat(r, sp.ChannelTopK)


@register_preset("meprop", "meProp: top-K on the output gradient dy only", density=0.1)
def _meprop(r: Recipe) -> LayerSpec:
    return LayerSpec(grad_output=sp.TopK(density=_need_density(r)))


@register_preset("grad-prune", "Ye et al.: DBTD threshold + unbiased stochastic pruning of conv output gradients",
                 uses=("p", "sigma", "stochastic", "placement"), layer_types="conv", density=None)
def _grad_prune(r: Recipe) -> LayerSpec:
    if r.density is not None:
        raise ValueError("recipe: preset 'grad-prune' is set by p (the percentile), not density")
    cfg = sp.DBTD(p=r.p, sigma=r.sigma, stochastic=r.stochastic)
    # Conv-BN blocks: prune the conv's dy (after BN backward). Conv-ReLU blocks: prune dx, which the ReLU
    # below keeps sparse so the previous conv receives a sparse dy (METHODS §2 placement).
    return LayerSpec(grad_output=cfg) if r.placement == "grad_output" else LayerSpec(grad_input=cfg)


@register_preset("random-channel", "Changpinyo et al.: fixed random channel connectivity (convs only), optional "
                 "incremental densification", uses=("densify_every", "start_density", "densify_init"),
                 layer_types="conv", density=0.5)
def _random_channel(r: Recipe) -> LayerSpec:
    d = _need_density(r)
    if r.densify_every is not None:
        d = min(d, r.start_density)
    # A fixed topology: inactive connections must not learn (otherwise the mask would be meaningless).
    return LayerSpec(weight=sp.RandomChannel(density=d, seed=r.seed), mask_inactive_grads=True)


@register_preset("threshold", "TensorQuant: magnitude thresholds on weights / activations / weight gradients "
                 "(weight_threshold 0.01 when none is given)",
                 uses=("weight_threshold", "activation_threshold"), density=None)
def _threshold(r: Recipe) -> LayerSpec | None:
    if r.density is not None:
        raise ValueError("recipe: preset 'threshold' is set by weight_threshold / activation_threshold / "
                         "gradient_threshold, not density")
    wt = r.weight_threshold
    if wt is None and r.activation_threshold is None and r.gradient_threshold is None:
        wt = 0.01  # nothing chosen: a weight threshold, TensorQuant's most common use
    return LayerSpec(
        weight=None if wt is None else sp.Threshold(wt),
        input=None if r.activation_threshold is None else sp.Threshold(r.activation_threshold),
    )


# ------------------------------------------------------------------------------------------------ matching
def _eligible(mod: nn.Module, layer_types: str) -> bool:
    if type(mod) not in SPARSE_TYPES and not any(isinstance(mod, t) for t in SPARSE_TYPES.values()):
        return False
    if layer_types == "conv":
        return isinstance(mod, nn.Conv2d)
    if layer_types == "linear":
        return isinstance(mod, nn.Linear)
    return True


def resolve_layers(model: nn.Module, recipe: Recipe) -> dict[str, tuple[LayerSpec, bool]]:
    """Map each Conv2d/Linear name to ``(spec, from_preset)`` for the layers the recipe sparsifies.

    Exact names win over ``re:`` patterns; patterns are tried in order; first match wins; ``None`` = dense.
    Unmatched layers take the preset's spec (subject to ``layer_types`` and first/last-layer flags).

    Raises:
        ValueError: a pattern that matches no Conv2d/Linear layer (the message lists the layer names).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) in
             (*SPARSE_TYPES, *SPARSE_TYPES.values())]
    if not names:
        raise ValueError("recipe: the model has no nn.Conv2d or nn.Linear layers to sparsify")
    modules = dict(model.named_modules())
    exact = {pat: spec for pat, spec in recipe.layers if not pat.startswith("re:")}
    regexes = [(pat, re.compile(pat[3:]), spec) for pat, spec in recipe.layers if pat.startswith("re:")]
    used: set[str] = set()
    default = recipe.default_spec()
    first, last = names[0], names[-1]
    out: dict[str, tuple[LayerSpec, bool]] = {}
    for name in names:
        used.update(pat for pat, rx, _ in regexes if rx.fullmatch(name))
        if name in exact:
            used.add(name)
            spec, from_preset = exact[name], False
        else:
            hit = next(((pat, spec) for pat, rx, spec in regexes if rx.fullmatch(name)), None)
            if hit is not None:
                spec, from_preset = hit[1], False
            else:
                spec, from_preset = default, True
                if (recipe.first_layer_dense and name == first) or (recipe.last_layer_dense and name == last):
                    spec = None
                elif not _eligible(modules[name], recipe.layer_types):
                    spec = None
        if recipe.gradient_threshold is not None:
            # The TensorQuant gradient study: one global threshold on every weight gradient before the update.
            spec = dataclasses.replace(spec or LayerSpec(), grad_weight=sp.Threshold(recipe.gradient_threshold))
        if spec is not None and not spec.is_dense:
            out[name] = (spec, from_preset)
    unmatched = [pat for pat, _ in recipe.layers if pat not in used]
    if unmatched:
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise ValueError(f"recipe: layer pattern(s) {unmatched} match no Conv2d/Linear layer; layers are: {shown}")
    return out
