"""``sparsify_`` and the one object that owns all sparsification state of a model.

The handle keeps every piece of mutable state (cached thresholds, frozen and random masks, per-layer densities,
step/epoch counters, RNG states) so ``handle.state_dict()`` is all a resumed run needs besides the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from statistics import NormalDist
from typing import Any, Mapping

import torch
import torch.nn as nn

from sparsetrain import sparsifiers as sp
from sparsetrain.distributions import erk_densities, momentum_densities
from sparsetrain.layers import INHERIT, OPERANDS, SPARSE_TYPES, LayerSpec, LayerState
from sparsetrain.recipe import Recipe, _parse_freeze, resolve_layers

__all__ = ["sparsify_", "SparsityHandle"]

log = logging.getLogger(__name__)

_DENSITY_TYPES = (sp.TopK, sp.ChannelTopK, sp.RandomChannel)


def sparsify_(model: nn.Module, recipe: Any = "swat-u", **overrides: Any) -> "SparsityHandle":
    """Swap the model's Conv2d/Linear layers for sparse ones as ``recipe`` says; in place.

    Args:
        model: any ``nn.Module``; its ``state_dict`` keys do not change.
        recipe: a preset name (see :func:`sparsetrain.list_presets`), a dict, a YAML path or a :class:`Recipe`.
        **overrides: global recipe settings, e.g. ``density=0.1`` or ``first_layer_dense=False``.

    Returns:
        The :class:`SparsityHandle`; call ``handle.step()`` after every ``optimizer.step()``.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> handle = sparsify_(model, "swat-u", density=0.25)
        >>> sorted(handle.layers)
        ['3']
    """
    if any(isinstance(m, tuple(SPARSE_TYPES.values())) for m in model.modules()):
        raise ValueError("model is already sparsified; call handle.remove() on the existing handle first")
    r = Recipe.load(recipe, **overrides)
    resolved = resolve_layers(model, r)
    return SparsityHandle(model, r, resolved)


def _with_density(spec: LayerSpec, density: float) -> LayerSpec:
    """The spec with every density-parameterised operand (W and the activations that follow it) at ``density``."""
    kw = {}
    for op in OPERANDS:
        cfg = getattr(spec, op)
        if isinstance(cfg, _DENSITY_TYPES):
            kw[op] = dataclasses.replace(cfg, density=min(1.0, float(density)))
    return dataclasses.replace(spec, **kw)


def _nominal(cfg: Any) -> float | None:
    """Density implied by a config alone (None when it depends on the data)."""
    if cfg is None:
        return 1.0
    if isinstance(cfg, (*_DENSITY_TYPES, sp.NM)):
        return float(cfg.density)
    if isinstance(cfg, sp.DBTD):
        # Expected kept fraction for a Gaussian gradient: P(|g| >= tau) + E[|g|/tau; |g| < tau].
        z = NormalDist().inv_cdf(cfg.p) * (1.0 if cfg.sigma == "consistent" else 2.0 / math.pi)
        phi = NormalDist().pdf
        above = 2.0 * (1.0 - NormalDist().cdf(z))
        return above + (2.0 * (phi(0.0) - phi(z)) / z if cfg.stochastic else 0.0)
    return None


class SparsityHandle:
    """Owns the sparse layers of one model and all their state. Created by :func:`sparsify_`."""

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Mapping[str, tuple[LayerSpec, bool]]):
        self.model = model
        self.recipe = recipe
        self.step_count = 0
        self.epoch = 0
        self._frozen_done = False
        self._freeze = _parse_freeze(recipe.freeze_topology_after)
        self.modules: dict[str, nn.Module] = {}
        self.distributed: list[str] = [n for n, (_, fp) in resolved.items() if fp]  # follow the distribution
        mods = dict(model.named_modules())
        for name, (spec, _) in resolved.items():
            dense = mods[name]
            state = LayerState(name=name, period=recipe.threshold_period, seed=sp._seed_for(name, recipe.seed))
            sparse = SPARSE_TYPES[type(dense)].from_dense(dense, spec, state)
            self._set_module(name, sparse)
            self.modules[name] = sparse
        self._apply_distribution(initial=True)
        log.debug("sparsified %d layers with %s", len(self.modules), recipe.preset)

    # ------------------------------------------------------------------ views
    @property
    def layers(self) -> dict[str, LayerSpec]:
        """Layer name -> current spec of every sparsified layer."""
        return {n: m.spec for n, m in self.modules.items()}

    def _set_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    # ------------------------------------------------------------------ distributions
    def _apply_distribution(self, initial: bool = False, optimizer: torch.optim.Optimizer | None = None) -> None:
        r = self.recipe
        names = [n for n in self.distributed if isinstance(self.modules[n].spec.weight, _DENSITY_TYPES)]
        if not names or r.density is None or (r.density >= 1.0 and not initial):
            return  # density 1: every layer stays dense, nothing to redistribute
        shapes = {n: tuple(self.modules[n].weight.shape) for n in names}
        if r.distribution == "erk" and initial:
            dens = erk_densities(shapes, r.density)
        elif r.distribution == "momentum" and not initial:
            assert optimizer is not None
            mom = {}
            for n in names:
                m = self.modules[n]
                buf = optimizer.state.get(m.weight, {}).get("momentum_buffer")
                if buf is None:
                    return  # no momentum yet (first step, or an optimizer without momentum)
                active = m.effective_weight() != 0
                mom[n] = float(buf.abs()[active].mean()) if bool(active.any()) else 0.0
            dens = momentum_densities({n: math.prod(s) for n, s in shapes.items()}, mom, r.density)
        else:
            return  # uniform: the preset already built every spec at the recipe density
        for n, d in dens.items():
            self.modules[n].spec = _with_density(self.modules[n].spec, d)

    # ------------------------------------------------------------------ schedule
    def set_epoch(self, epoch: int) -> None:
        """Tell the handle the current (0-based) epoch; needed for ``freeze_topology_after: 'N epochs'``."""
        self.epoch = int(epoch)
        self._maybe_freeze()

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Advance one iteration; call after every ``optimizer.step()``.

        Advances threshold periods, redistributes SWAT-M densities (needs ``optimizer``), freezes the topology and
        densifies random-channel masks when their schedules say so.
        """
        self.step_count += 1
        for m in self.modules.values():
            m.sparse_state.step = self.step_count
        r = self.recipe
        if r.distribution == "momentum" and not self._frozen_done:
            if optimizer is None:
                raise ValueError("distribution 'momentum' (swat-m) needs handle.step(optimizer)")
            self._apply_distribution(optimizer=optimizer)
        if r.densify_every is not None and self.step_count % r.densify_every == 0:
            self._densify()
        self._maybe_freeze()

    def _maybe_freeze(self) -> None:
        if self._freeze is None or self._frozen_done:
            return
        n, unit = self._freeze
        if (self.step_count if unit == "steps" else self.epoch) < n:
            return
        for m in self.modules.values():
            if m.spec.weight is not None:
                m.sparse_state.frozen["weight"] = m.effective_weight() != 0
        self._frozen_done = True
        log.info("topology frozen at step %d (epoch %d)", self.step_count, self.epoch)

    @torch.no_grad()
    def _densify(self) -> None:
        """Changpinyo's incremental training: double every random-channel mask's connections, up to the target."""
        target = self.recipe.density or 1.0
        for name in self.distributed:
            m = self.modules[name]
            cfg = m.spec.weight
            if not isinstance(cfg, sp.RandomChannel) or cfg.density >= target:
                continue
            new_d = min(target, 2 * cfg.density)
            st = m.sparse_state
            old = st.thresholds.get("weight")
            if old is None:
                old = sp.threshold(m.weight, cfg, key=name)
            if new_d >= 1.0:
                new_mask = torch.ones_like(old)
                m.spec = dataclasses.replace(m.spec, weight=None, mask_inactive_grads=False)
            else:
                new_cfg = dataclasses.replace(cfg, density=new_d)
                new_mask = sp.threshold(m.weight, new_cfg, key=name)
                m.spec = dataclasses.replace(m.spec, weight=new_cfg)
            st.thresholds["weight"], st.computed_at["weight"] = new_mask, self.step_count
            if self.recipe.densify_init == "zero":
                grown = (new_mask & ~old).reshape(new_mask.shape + (1,) * (m.weight.dim() - 2))
                m.weight.masked_fill_(grown.expand_as(m.weight), 0.0)

    # ------------------------------------------------------------------ densities
    def densities(self) -> dict[str, dict[str, float]]:
        """Per layer, the density of every operand: measured at the last forward/backward, else nominal."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.modules.items():
            spec, st = m.spec, m.sparse_state
            measured = {op: float(v) for op, v in st.last_density.items()}
            row: dict[str, float] = {}
            for op in OPERANDS:
                cfg = spec.resolved(op)
                src = op
                if getattr(spec, op) is INHERIT:  # the backward GEMM reuses the forward's tensor
                    src = "weight" if op == "weight_for_grad_input" else "input"
                if cfg is None:
                    row[op] = 1.0
                elif src in measured:
                    row[op] = measured[src]
                else:
                    nominal = _nominal(cfg)
                    row[op] = 1.0 if nominal is None else nominal
            out[name] = row
        return out

    def nominal_densities(self) -> dict[str, dict[str, float]]:
        """Per layer, the densities the configs imply (data-dependent ones, e.g. thresholds, as 1.0)."""
        out = {}
        for name, m in self.modules.items():
            out[name] = {op: (_nominal(m.spec.resolved(op)) or 1.0) for op in OPERANDS}
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain containers and tensors: ``weights_only``-loadable)."""
        layers = {}
        for name, m in self.modules.items():
            st = m.sparse_state
            layers[name] = {
                "spec": m.spec.to_dict(),
                "thresholds": {k: v for k, v in st.thresholds.items()},
                "computed_at": dict(st.computed_at),
                "frozen": dict(st.frozen),
                "generator": None if st.generator is None else st.generator.get_state(),
            }
        return {"version": 1, "recipe": self.recipe.to_dict(), "step": self.step_count, "epoch": self.epoch,
                "frozen_done": self._frozen_done, "layers": layers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a handle made by the same recipe on the same model."""
        if set(state["layers"]) != set(self.modules):
            missing = sorted(set(self.modules) - set(state["layers"]))
            extra = sorted(set(state["layers"]) - set(self.modules))
            raise ValueError(f"sparsity state does not match this model's sparse layers: missing {missing}, "
                             f"unexpected {extra}")
        self.step_count = int(state["step"])
        self.epoch = int(state["epoch"])
        self._frozen_done = bool(state["frozen_done"])
        for name, s in state["layers"].items():
            m = self.modules[name]
            m.spec = LayerSpec.from_dict(s["spec"], where=f"state[{name}]")
            st = m.sparse_state
            st.step = self.step_count
            st.thresholds = dict(s["thresholds"])
            st.computed_at = {k: int(v) for k, v in s["computed_at"].items()}
            st.frozen = dict(s["frozen"])
            if s["generator"] is not None:
                st.generator = torch.Generator()
                st.generator.set_state(s["generator"])

    # ------------------------------------------------------------------ teardown
    def remove(self) -> nn.Module:
        """Put plain Conv2d/Linear modules back (same parameters); the handle is unusable afterwards."""
        for name, m in self.modules.items():
            self._set_module(name, m.to_dense())
        self.modules = {}
        self.distributed = []
        return self.model

    def __repr__(self) -> str:
        return f"SparsityHandle(preset={self.recipe.preset!r}, layers={len(self.modules)}, step={self.step_count})"
