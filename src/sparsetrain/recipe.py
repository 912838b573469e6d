"""Recipes: which layers get which :class:`LayerSpec`, plus the global settings of a method.

A recipe is an ordered mapping from layer-name patterns to layer specs (exact names first, then ``re:`` patterns
full-matched in order; first match wins; ``null`` = dense), plus global settings. A *preset* names a method config
(:mod:`sparsetrain.methods`: ``SwatConfig``, ``GradPruneConfig``, ...), which validates itself and supplies the
spec of every Conv2d/Linear the patterns do not match; ``stack:`` merges further methods onto the same layers
(each operand set by one method). Every method is a preset over one mechanism (:mod:`sparsetrain.layers`). YAML
is only the file format: the flat keys of a file (``preset``, ``density``, ``p``, ...) become those configs.

Example:
    >>> import torch.nn as nn, sparsetrain
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    >>> r = Recipe.load({"preset": "swat-u", "density": 0.2, "layers": {"3": None}})
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from sparsetrain import sparsifiers as sp
from sparsetrain.formatting import is_number
from sparsetrain.layers import LayerSpec, counted_layer
from sparsetrain.methods import (
    PRESETS,
    GradientThreshold,
    Preset,
    check_choice,
    list_presets,
    merge_specs,
    register_preset,
)

__all__ = [
    "Recipe",
    "list_presets",
    "register_preset",
    "resolve_layers",
    "first_and_last_layers",
    "find_first_conv",
    "find_classifier",
    "infer_first_conv",
    "infer_classifier",
    "PRESETS",
    "GLOBAL_KEYS",
    "GRADIENT_THRESHOLD_SCOPES",
    "DEFAULT_GRADIENT_THRESHOLD_SCOPE",
    "parse_freeze",
    "list_example_recipes",
    "example_recipe_path",
]

DISTRIBUTIONS = ("uniform", "erk", "momentum")
LAYER_TYPES = ("conv", "linear", "all")
#: Where ``gradient_threshold`` acts: TensorQuant's study (every trainable variable's gradient, after the L2 term is
#: added; applied by the training loop) or only conv/linear weight gradients before weight decay (per-layer specs).
GRADIENT_THRESHOLD_SCOPES = ("all_after_decay", "layers")
#: ``layers`` until the recipe tests that expect per-layer grad_weight specs from ``gradient_threshold`` move to
#: ``all_after_decay`` (issue 11, item 5: the paper's scope is to become the default).
DEFAULT_GRADIENT_THRESHOLD_SCOPE = "all_after_decay"  # TensorQuant's study: every gradient, after L2

# Keys every recipe understands; a preset's own parameters are its config's fields (Preset.uses).
COMMON_KEYS = (
    "preset", "density", "sparsity", "distribution", "threshold_period", "first_layer_dense", "last_layer_dense",
    "mask_inactive_grads", "freeze_topology_after", "layer_types", "seed", "layers", "gradient_threshold",
    "gradient_threshold_scope", "pack_saved", "stack",
)
PRESET_KEYS = tuple(sorted({k for p in PRESETS.values() for k in p.uses}))
GLOBAL_KEYS = COMMON_KEYS + PRESET_KEYS


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: a method config (from a preset), stacked methods, per-layer specs and global settings.

    Build it with :meth:`Recipe.load` (preset name, dict, YAML path or Recipe). ``method`` is the preset's frozen
    config (:mod:`sparsetrain.methods`), ``stack`` further ``(preset, config)`` pairs whose specs are merged onto
    the same layers, ``layers`` the ordered ``(pattern, LayerSpec | None)`` overrides.
    """

    preset: str | None = None
    method: Any = None
    stack: tuple[tuple[str, Any], ...] = ()
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
    gradient_threshold_scope: str = DEFAULT_GRADIENT_THRESHOLD_SCOPE
    pack_saved: bool = True

    # The method's parameters the handle schedules on (None when the method has no such parameter).
    @property
    def density(self) -> float | None:
        return getattr(self.method, "density", None)

    @property
    def densify_every(self) -> int | None:
        return getattr(self.method, "densify_every", None)

    @property
    def densify_init(self) -> str:
        return getattr(self.method, "densify_init", "zero")

    def gradient_rule(self) -> GradientThreshold | None:
        """The rule the training loop applies to the optimizer's gradients each step (TensorQuant's gradient study
        in its paper's scope, ``all_after_decay``), or None."""
        if self.gradient_threshold is None or self.gradient_threshold_scope != "all_after_decay":
            return None
        return GradientThreshold(self.gradient_threshold)

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
            bundled = example_recipe_path(s)
            if s in PRESETS:
                d = {"preset": s}
            elif s.endswith((".yaml", ".yml")) or Path(s).is_file() or bundled is not None:
                import yaml

                p = Path(s) if Path(s).is_file() or bundled is None else bundled
                if not p.is_file():
                    raise FileNotFoundError(f"recipe file not found: {s} (example recipes, usable by name: "
                                            f"{', '.join(list_example_recipes())})")
                try:
                    d = yaml.safe_load(p.read_text()) or {}
                except yaml.MarkedYAMLError as e:
                    mark = e.problem_mark
                    where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
                    raise ValueError(f"{where}: not valid YAML: {e.problem}") from None
                if not isinstance(d, dict):
                    raise ValueError(f"recipe {s}: top level must be a mapping of settings, got {type(d).__name__}")
            else:
                raise ValueError(f"unknown preset {s!r}; valid presets: {', '.join(list_presets())}; example "
                                 f"recipes: {', '.join(list_example_recipes())} (or a path to a .yaml recipe)")
        else:
            raise TypeError(f"recipe must be a preset name, a dict, a YAML path or a Recipe, got {type(recipe)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        # An override of density replaces the recipe's sparsity and vice versa (they are one setting).
        if "density" in overrides and "sparsity" not in overrides:
            d.pop("sparsity", None)
        if "sparsity" in overrides and "density" not in overrides:
            d.pop("density", None)
        d.update(overrides)
        try:
            return cls._from_dict(d)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("recipe") else f"recipe: {msg}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        unknown = set(d) - set(GLOBAL_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}; valid keys: {', '.join(GLOBAL_KEYS)}")
        preset = _preset(d.get("preset"))
        params = {k: d.pop(k) for k in PRESET_KEYS if k in d}
        density, sparsity = d.pop("density", None), d.pop("sparsity", None)
        if preset is not None:
            for k, v in preset.defaults.items():
                if k != "density":
                    d.setdefault(k, v)
                elif density is None and sparsity is None:
                    density = v  # the preset's default density, unless the recipe names one
            if density is not None or sparsity is not None:
                if not preset.takes_density:
                    raise ValueError(f"preset {preset.name!r} is set by {preset.density_hint}, not density")
                params["density"] = sp.density_from(density, sparsity, "recipe")
            if preset.name == "threshold" and d.get("gradient_threshold") is None and \
                    all(params.get(k) is None for k in preset.uses):
                params["weight_threshold"] = 0.01  # nothing chosen: a weight threshold, TensorQuant's most common use
            d["method"] = preset.build(params)
        elif params or density is not None or sparsity is not None:
            k = sorted(params)[0] if params else "density"
            raise ValueError(f"key {k!r} needs a preset (valid presets: {', '.join(list_presets())})")
        check_choice("distribution", d.get("distribution", "uniform"), DISTRIBUTIONS)
        check_choice("layer_types", d.get("layer_types", "all"), LAYER_TYPES)
        tp = d.get("threshold_period", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"threshold_period must be an integer >= 1, got {tp!r}")
        gt = d.get("gradient_threshold")
        if gt is not None and not (is_number(gt) and gt >= 0):
            raise ValueError(f"gradient_threshold must be a number >= 0, got {gt!r}")
        check_choice("gradient_threshold_scope", d.get("gradient_threshold_scope", DEFAULT_GRADIENT_THRESHOLD_SCOPE),
                    GRADIENT_THRESHOLD_SCOPES)
        parse_freeze(d.get("freeze_topology_after"))
        d["stack"] = tuple(_stacked(item) for item in (d.get("stack") or ()))
        seed = d.get("seed", 0)
        d["layers"] = tuple(_layer_entry(pat, spec, seed) for pat, spec in _items(d.pop("layers", None) or {}))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (YAML/JSON-able); ``Recipe.load(r.to_dict()) == r``.

        Every common setting is written out (so a preset default that was overridden stays overridden), then the
        method's own parameters (density included) at the top level, as in the YAML files.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "method":
                if v is not None:
                    out.update(PRESETS[self.preset].params(v))
            elif f.name == "layers":
                if v:
                    out["layers"] = {pat: (None if s is None else s.to_dict()) for pat, s in v}
            elif f.name == "stack":
                if v:
                    out["stack"] = [{"preset": n, **PRESETS[n].params(c)} for n, c in v]
            else:
                out[f.name] = v
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def default_spec(self) -> LayerSpec | None:
        """The spec unmatched layers get: the preset's method with every stacked method merged in (None = dense)."""
        spec = None if self.method is None else self.method.layer_spec(self.seed)
        for name, cfg in self.stack:
            spec = merge_specs(spec, cfg.layer_spec(self.seed), where=f"recipe: stack[{name}]")
        if spec is not None and self.mask_inactive_grads:
            spec = dataclasses.replace(spec, mask_inactive_grads=True)
        return spec

    def default_specs(self, model: nn.Module, names: list[str]) -> dict[str, LayerSpec | None]:
        """Per layer of ``names``, the spec it gets when no pattern matches it: :meth:`default_spec`, except that a
        method config with ``layer_specs(model, names, seed)`` decides per layer from the model (e.g. grad-prune's
        placement by dataflow); called on the dense model, before any layer is swapped."""

        def specs(cfg: Any) -> dict[str, LayerSpec | None]:
            per_layer = getattr(cfg, "layer_specs", None)
            return per_layer(model, names, self.seed) if per_layer is not None else dict.fromkeys(
                names, cfg.layer_spec(self.seed))

        out = dict.fromkeys(names) if self.method is None else specs(self.method)
        for name, cfg in self.stack:
            extra = specs(cfg)
            out = {n: merge_specs(out[n], extra[n], where=f"recipe: stack[{name}]") for n in names}
        if self.mask_inactive_grads:
            out = {n: s if s is None else dataclasses.replace(s, mask_inactive_grads=True) for n, s in out.items()}
        return out


_EXAMPLES = Path(__file__).resolve().parent / "recipes"


def list_example_recipes() -> list[str]:
    """Names of the example recipes shipped with the package (``--recipe NAME`` loads one)."""
    return sorted(p.stem for p in _EXAMPLES.glob("*.yaml"))


def example_recipe_path(name: str) -> Path | None:
    """The shipped example recipe called ``name`` (with or without ``.yaml``), or None."""
    if "/" in name or "\\" in name:
        return None
    p = _EXAMPLES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return p if p.is_file() else None


def _preset(name: Any) -> Preset | None:
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return PRESETS[name]


def _stacked(item: Any) -> tuple[str, Any]:
    """One ``stack:`` entry, ``{preset: NAME, **its parameters}``, as ``(NAME, config)``."""
    if not isinstance(item, Mapping) or "preset" not in item:
        raise ValueError(f"stack: each entry must be a mapping with a preset, e.g. {{preset: grad-prune, p: 0.9}}, "
                         f"got {item!r}")
    item = dict(item)
    preset = _preset(item.pop("preset"))
    assert preset is not None
    if "sparsity" in item or "density" in item:
        d = sp.density_from(item.pop("density", None), item.pop("sparsity", None), f"stack[{preset.name}]")
        item["density"] = d
    try:
        return preset.name, preset.build(item)
    except ValueError as e:
        raise ValueError(f"stack[{preset.name}]: {e}") from None


def _items(layers: Any) -> list[tuple[Any, Any]]:
    return list(layers.items()) if isinstance(layers, Mapping) else [tuple(x) for x in layers]


def _layer_entry(pat: Any, spec: Any, seed: int) -> tuple[str, LayerSpec | None]:
    """One ``layers:`` entry. A value is a LayerSpec mapping, null (dense), ``{preset: NAME, ...}`` (that method's
    spec) or a list of those (stacked on the layer's operands)."""
    if not isinstance(pat, str):
        raise ValueError(f"layer pattern must be a string, got {pat!r}")
    where = f"recipe: layers[{pat!r}]"
    if pat.startswith("re:"):
        try:
            re.compile(pat[3:])
        except re.error as e:
            raise ValueError(f"{where}: invalid regular expression: {e}") from None
    parts = spec if isinstance(spec, (list, tuple)) else [spec]
    out: LayerSpec | None = None
    for part in parts:
        if isinstance(part, Mapping) and "preset" in part:
            name, cfg = _stacked(part)
            part = cfg.layer_spec(seed)
        elif part is not None and not isinstance(part, LayerSpec):
            part = LayerSpec.from_dict(part, where=where)
        out = part if len(parts) == 1 else merge_specs(out, part, where=where)
    return pat, out


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
    raise ValueError(f"freeze_topology_after must be an integer (steps), 'N steps' or 'N epochs', got {v!r}")


# ------------------------------------------------------------------------------------------------ matching
def _eligible(mod: nn.Module, layer_types: str) -> bool:
    if layer_types == "conv":
        return isinstance(mod, nn.Conv2d)
    if layer_types == "linear":
        return isinstance(mod, nn.Linear)
    return True


def infer_first_conv(model: nn.Module) -> str | None:
    """Module-order guess of the layer that reads the input: the first ``nn.Conv2d`` or ``nn.Linear`` (or None).

    ``isinstance`` matching, so subclasses (e.g. sparse layers) count.
    """
    return next((n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)


def infer_classifier(model: nn.Module) -> str | None:
    """Module-order guess of the classifier: the last ``nn.Linear`` (or None).

    ``isinstance`` matching, so subclasses (e.g. sparse layers) count. Fully convolutional heads (e.g.
    torchvision's SqueezeNet) have no Linear and get None: declare ``classifier`` for such a model.
    """
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _declared(model: nn.Module, field: str) -> str | None:
    """``model.default_cfg``'s ``field`` when it names a module of ``model`` (a user may have replaced the head).

    The cfg may be a :class:`ModelCfg`, any object with that attribute, or a mapping (timm models carry a dict).
    """
    cfg = getattr(model, "default_cfg", None)
    name = cfg.get(field) if isinstance(cfg, Mapping) else getattr(cfg, field, None)
    if not isinstance(name, str):
        return None
    try:
        model.get_submodule(name)
    except AttributeError:
        return None
    return name


def find_first_conv(model: nn.Module) -> str | None:
    """Name of the layer that reads the input: ``model.default_cfg.first_conv`` if set, else
    :func:`infer_first_conv`."""
    return _declared(model, "first_conv") or infer_first_conv(model)


def find_classifier(model: nn.Module) -> str | None:
    """Name of the classifier: ``model.default_cfg.classifier`` if set, else :func:`infer_classifier` (the last
    ``nn.Linear`` in ``model.named_modules()`` order; None if none)."""
    return _declared(model, "classifier") or infer_classifier(model)


def first_and_last_layers(model: nn.Module) -> tuple[str, str]:
    """The model's first and last layer, the one definition the first/last-layer rules use.

    A registered model declares them (``model.default_cfg.first_conv`` / ``.classifier``, timm style); any other
    model uses its first and last Conv2d/Linear in registration order.
    """
    names = [n for n, m in model.named_modules() if counted_layer(m)]
    if not names:
        raise ValueError("recipe: the model has no nn.Conv2d or nn.Linear layers to sparsify")
    first, last = find_first_conv(model), find_classifier(model)
    # A head with no Linear (fully convolutional) has no classifier: its last layer is the last conv.
    return (first if first in names else names[0]), (last if last in names else names[-1])


def resolve_layers(model: nn.Module, recipe: Recipe) -> dict[str, tuple[LayerSpec, bool]]:
    """Map each Conv2d/Linear name to ``(spec, from_preset)`` for the layers the recipe sparsifies.

    Exact names win over ``re:`` patterns; patterns are tried in order; first match wins; ``None`` = dense.
    Unmatched layers take the preset's spec (subject to ``layer_types`` and first/last-layer flags). Layers are
    every ``nn.Conv2d``/``nn.Linear``, subclasses included.

    Raises:
        ValueError: a pattern that matches no Conv2d/Linear layer (the message lists the layer names).
    """
    first, last = first_and_last_layers(model)
    modules = {n: m for n, m in model.named_modules() if counted_layer(m)}
    names = list(modules)
    exact = {pat: spec for pat, spec in recipe.layers if not pat.startswith("re:")}
    regexes = [(pat, re.compile(pat[3:]), spec) for pat, spec in recipe.layers if pat.startswith("re:")]
    used: set[str] = set()
    defaults = recipe.default_specs(model, names)
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
                spec, from_preset = defaults[name], True
                if (recipe.first_layer_dense and name == first) or (recipe.last_layer_dense and name == last):
                    spec = None
                elif not _eligible(modules[name], recipe.layer_types):
                    spec = None
        if recipe.gradient_threshold is not None and recipe.gradient_threshold_scope == "layers":
            # Our variant of the gradient study: the threshold on each conv/linear dW, before weight decay. The
            # paper's scope (all_after_decay) needs the decayed gradient, so the training loop applies it instead.
            spec = dataclasses.replace(spec or LayerSpec(), grad_weight=sp.Threshold(recipe.gradient_threshold))
        if spec is not None and not spec.is_dense:
            out[name] = (spec, from_preset)
    unmatched = [pat for pat, _ in recipe.layers if pat not in used]
    if unmatched:
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise ValueError(f"recipe: layer pattern(s) {unmatched} match no Conv2d/Linear layer; layers are: {shown}")
    return out
