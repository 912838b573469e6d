"""``sparsify_`` and the one object that owns all sparsification state of a model.

The handle keeps every piece of mutable state (cached thresholds, frozen and random masks, per-layer densities,
step/epoch counters, RNG states) so ``handle.state_dict()`` is all a resumed run needs besides the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from sparsetrain import sparsifiers as sp
from sparsetrain.distributions import erk_densities, momentum_densities
from sparsetrain.graph import relus_saved_only_by_themselves
from sparsetrain.layers import (
    INHERIT,
    OPERANDS,
    LayerSpec,
    LayerState,
    OperandCache,
    OperandEvent,
    PackedReLU,
    _stochastic,
    effective_weight,
    is_sparse_layer,
    observe,
    sparse_class,
)
from sparsetrain.recipe import Recipe, parse_freeze, resolve_layers

__all__ = ["sparsify_", "SparsityHandle"]

log = logging.getLogger(__name__)

#: Names optimizers give their first moment: SGD's momentum buffer, Adam/AdamW's exp_avg.
FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg")


def sparsify_(model: nn.Module, recipe: Any = "swat-u", **overrides: Any) -> "SparsityHandle":
    """Swap the model's Conv2d/Linear layers for sparse ones as ``recipe`` says; in place.

    Args:
        model: any ``nn.Module``; its ``state_dict`` keys do not change.
        recipe: a preset name (see :func:`sparsetrain.list_presets`), a dict, a YAML path or a :class:`Recipe`.
        **overrides: global recipe settings, e.g. ``density=0.1`` or ``first_layer_dense=False``.

    Returns:
        The :class:`SparsityHandle`; call ``handle.step()`` after every ``optimizer.step()``.

    On a model with CPU parameters it also installs sparsetrain's caching CPU allocator, once per process
    (:func:`sparsetrain.lean_allocator`): under glibc's default a process's peak RSS does not show the memory a
    sparse step saves. ``SPARSETRAIN_ALLOCATOR=default`` in the environment keeps PyTorch's allocator.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> handle = sparsify_(model, "swat-u", density=0.25)
        >>> sorted(handle.layers)
        ['3']
    """
    if any(is_sparse_layer(m) for m in model.modules()):
        raise ValueError("model is already sparsified; call handle.remove() on the existing handle first")
    r = Recipe.load(recipe, **overrides)
    resolved = resolve_layers(model, r)
    handle = SparsityHandle(model, r, resolved)
    if any(p.device.type == "cpu" for p in model.parameters()):
        # The memory a sparse step saves shows in the process only under an allocator that does not keep freed
        # activations in a fragmented heap (see sparsetrain.allocator; SPARSETRAIN_ALLOCATOR=default opts out).
        from sparsetrain.allocator import lean_allocator

        lean_allocator()
    return handle


def _with_density(spec: LayerSpec, density: float) -> LayerSpec:
    """The spec with every density-parameterised operand (W and the activations that follow it) at ``density``."""
    kw = {op: sp.with_density(getattr(spec, op), density) for op in OPERANDS if sp.has_density(getattr(spec, op))}
    return dataclasses.replace(spec, **kw)


def _flat_cache(st: LayerState) -> dict[str, Tensor | None]:
    """A layer's cache in the checkpoint format: ``{op: thr, "op/mask": mask}`` (stable across versions)."""
    out: dict[str, Tensor | None] = {}
    for op, c in st.cache.items():
        if st.computed_step(op) is None:
            continue
        out[op] = c.thr
        if c.mask is not None:
            out[f"{op}/mask"] = c.mask
    return out


def _cache_from(thresholds: Mapping[str, Any], computed_at: Mapping[str, Any],
                fixed: Mapping[str, bool]) -> dict[str, OperandCache]:
    cache = {}
    for op, at in computed_at.items():
        cache[op] = OperandCache(thr=thresholds.get(op), mask=thresholds.get(f"{op}/mask"), computed_at=int(at),
                                 due=not fixed.get(op, False), fixed=fixed.get(op, False))
    return cache


class SparsityHandle:
    """Owns the sparse layers of one model and all their state. Created by :func:`sparsify_`."""

    def __init__(self, model: nn.Module, recipe: Recipe, resolved: Mapping[str, tuple[LayerSpec, bool]]):
        self.model = model
        self.recipe = recipe
        self.step_count = 0
        self.epoch = 0
        self._frozen_done = False
        self._freeze = parse_freeze(recipe.freeze_topology_after)
        self.modules: dict[str, nn.Module] = {}
        self.states: dict[str, LayerState] = {}
        self._measured: dict[str, dict[str, Tensor]] = {}
        self.distributed: list[str] = [n for n, (_, fp) in resolved.items() if fp]  # follow the distribution
        momentum = recipe.distribution == "momentum"
        mods = dict(model.named_modules())
        # With packed saved tensors a sparse layer no longer keeps its dense input alive, so a ReLU that saves its
        # whole output (only to know its sign) would. Swap in the 1-bit-mask ReLU where the trace shows that no
        # other consumer saves that output (before a max-pool or BN it would only cost time). Traced on the dense
        # model, before the swap; an untraceable model gets every ReLU swapped (memory first; outputs unchanged).
        lean: list[str] = []
        packs_input = [n for n, (spec, _) in resolved.items() if spec.resolved("input_for_grad_weight") is not None]
        if recipe.pack_saved and packs_input:
            found = relus_saved_only_by_themselves(model, packs_input)
            lean = found if found is not None else [n for n, m in mods.items() if type(m) is nn.ReLU]
        for name, (spec, _) in resolved.items():
            dense = mods[name]
            state = LayerState(name=name, period=recipe.threshold_period, seed=sp.seed_for(name, recipe.seed),
                               pack_saved=recipe.pack_saved, track_active=momentum and name in self.distributed)
            if spec.weight is not None and sp.entry(spec.weight).fixed:
                # A fixed topology is drawn now, so what it really keeps is known before the first step.
                state.record("weight", sp.threshold(dense.weight.detach(), spec.weight, key=name), fixed=True)
            if _stochastic(spec):
                # Created now, on the layer's device: a compiled forward must not create objects.
                state.rng(dense.weight.device)
            sparse = sparse_class(dense).from_dense(dense, spec, state)
            self._set_module(name, sparse)
            self.modules[name] = sparse
            self.states[name] = state
        self.relus: dict[str, nn.Module] = {}
        for name in lean:
            relu = PackedReLU.__new__(PackedReLU)
            relu.__dict__.update(mods[name].__dict__)
            self._set_module(name, relu)
            self.relus[name] = relu
        self._apply_distribution(initial=True)
        log.debug("sparsified %d layers with %s", len(self.modules), recipe.preset)

    # ------------------------------------------------------------------ views
    @property
    def layers(self) -> dict[str, LayerSpec]:
        """Layer name -> current spec of every sparsified layer."""
        return {n: m.spec for n, m in self.modules.items()}

    @property
    def placements(self) -> dict[str, str]:
        """Layer name -> the activation gradient it sparsifies (``"grad_output"``, ``"grad_input"``, or both joined
        by ``"+"``), for the layers that sparsify one (Ye et al.'s placement, as resolved for this model)."""
        ops = ("grad_output", "grad_input")
        out = {n: "+".join(op for op in ops if getattr(m.spec, op) is not None) for n, m in self.modules.items()}
        return {n: v for n, v in out.items() if v}

    def _set_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    # ------------------------------------------------------------------ distributions
    def _apply_distribution(self, initial: bool = False, optimizer: torch.optim.Optimizer | None = None) -> None:
        r = self.recipe
        names = [n for n in self.distributed if sp.has_density(self.modules[n].spec.weight)]
        if not names or r.density is None or (r.density >= 1.0 and not initial):
            return  # density 1: every layer stays dense, nothing to redistribute
        shapes = {n: tuple(self.modules[n].weight.shape) for n in names}
        if r.distribution == "erk" and initial:
            dens = erk_densities(shapes, r.density)
        elif r.distribution == "momentum" and not initial:
            assert optimizer is not None
            mom = self._mean_momentum(names, optimizer)
            if mom is None:
                return  # no first moment yet (first step, or an optimizer without one)
            dens = momentum_densities({n: math.prod(s) for n, s in shapes.items()}, mom, r.density)
        else:
            return  # uniform: the preset already built every spec at the recipe density
        for n, d in dens.items():
            self.modules[n].spec = _with_density(self.modules[n].spec, d)

    def _mean_momentum(self, names: list[str], optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
        """SWAT-M's statistic: mean |first moment| over the weights the last forward used (its active set)."""
        means = []
        for n in names:
            m, st = self.modules[n], self.states[n]
            opt_state = optimizer.state.get(m.weight, {})
            buf = next((opt_state[k] for k in FIRST_MOMENT_KEYS if k in opt_state), None)
            if buf is None:
                return None
            active = st.active if st.active is not None else effective_weight(m) != 0
            # masked mean on the device; one host read for all layers below
            cnt = active.sum()
            means.append(torch.where(cnt > 0, (buf.abs() * active).sum() / cnt.clamp(min=1), 0.0).float())
        values = torch.stack(means).tolist()
        return dict(zip(names, values))

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
        for st in self.states.values():
            st.advance(self.step_count)
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
        for name, m in self.modules.items():
            if m.spec.weight is not None:
                self.states[name].frozen["weight"] = effective_weight(m) != 0
        self._frozen_done = True
        log.info("topology frozen at step %d (epoch %d)", self.step_count, self.epoch)

    @torch.no_grad()
    def _densify(self) -> None:
        """Changpinyo's incremental training: double every fixed mask's connections, up to the target density.

        Connections are only added (the new mask is a superset of the old one) and their number doubles; the added
        ones are drawn from a generator seeded by the layer, the recipe seed and the step, so a resumed run grows
        the same masks.
        """
        target = self.recipe.density or 1.0
        for name in self.distributed:
            m, st = self.modules[name], self.states[name]
            cfg = m.spec.weight
            cache = st.cache.get("weight")
            if cfg is None or not (sp.entry(cfg).fixed and sp.has_density(cfg)) or cache is None or cache.thr is None:
                continue
            old = cache.thr
            g = torch.Generator().manual_seed(sp.seed_for(f"{name}@{self.step_count}", self.recipe.seed))
            new_mask = sp.grow_channel_mask(old, g, target)
            if torch.equal(new_mask, old):
                continue
            kept = float(new_mask.float().mean())
            if bool(new_mask.all()):
                m.spec = dataclasses.replace(m.spec, weight=None, mask_inactive_grads=False)
            else:
                m.spec = dataclasses.replace(m.spec, weight=sp.with_density(cfg, kept))
            st.record("weight", new_mask, fixed=True)
            if self.recipe.densify_init == "zero":
                grown = (new_mask & ~old).reshape(new_mask.shape + (1,) * (m.weight.dim() - 2))
                m.weight.masked_fill_(grown.expand_as(m.weight), 0.0)

    # ------------------------------------------------------------------ densities
    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Record the kept fraction of every operand of this handle's layers during the passes run inside.

        Counting costs a pass over each operand, so it is off unless asked for (the trainer measures one step per
        epoch). Results stay on the device until :meth:`densities` reads them.
        """
        mine = set(self.modules)

        def record(ev: OperandEvent) -> None:
            if ev.layer in mine and ev.after is not ev.before:
                self._measured.setdefault(ev.layer, {})[ev.operand] = (
                    torch.count_nonzero(ev.after).float() / max(1, ev.after.numel()))

        with observe(record):
            yield

    def densities(self) -> dict[str, dict[str, float]]:
        """Per layer, the density of every operand: measured in the last :meth:`measuring` block, else nominal.

        Density: non-zero fraction of the operand after its sparsifier (prior zeros count as removed); unsparsified 1.0.
        """
        out: dict[str, dict[str, float]] = {}
        nominal = self.nominal_densities()
        for name, m in self.modules.items():
            spec = m.spec
            measured = self._measured.get(name, {})
            row: dict[str, float] = {}
            for op in OPERANDS:
                cfg = spec.resolved(op)
                src = op
                if getattr(spec, op) is INHERIT:  # the backward GEMM reuses the forward's tensor
                    src = "weight" if op == "weight_for_grad_input" else "input"
                if cfg is None:
                    row[op] = 1.0
                elif src in measured or op in measured:
                    row[op] = float(measured.get(op, measured.get(src)))
                else:
                    row[op] = nominal[name][op]
            out[name] = row
        return out

    def nominal_densities(self) -> dict[str, dict[str, float]]:
        """Per layer, the densities the configs imply (data-dependent ones, e.g. thresholds, as 1.0).

        A fixed mask (random channel connectivity) reports what it really keeps: fan-in rounding and the
        one-connection minimum can keep far more than the configured density on narrow layers.
        """
        out = {}
        for name, m in self.modules.items():
            st, row = self.states[name], {}
            for op in OPERANDS:
                cfg = m.spec.resolved(op)
                src = "weight" if op == "weight_for_grad_input" and getattr(m.spec, op) is INHERIT else op
                cache = st.cache.get(src) if cfg is not None and sp.entry(cfg).fixed else None
                mask = cache.thr if cache is not None else None
                row[op] = float(mask.float().mean()) if mask is not None else (sp.nominal_density(cfg) or 1.0)
            out[name] = row
        return out

    # ------------------------------------------------------------------ persistence
    # ------------------------------------------------------------------ data parallelism
    def set_rank(self, rank: int) -> None:
        """Give this process (rank ``rank`` of a data-parallel job) its own stochastic-pruning streams.

        Rank 0 keeps the single-process seeds; rank ``r > 0`` reseeds every layer from ``(layer, recipe seed, r)``, so
        the ranks do not prune their (different) gradients with the same noise. Call it before the first step.
        Weight-derived state (thresholds, masks, fixed topologies) is untouched: it must stay identical on all ranks.
        """
        if rank == 0:
            return
        for name, st in self.states.items():
            st.seed = sp.seed_for(f"{name}#rank{rank}", self.recipe.seed)
            if st.generator is not None:
                st.generator = None
                st.rng(self.modules[name].weight.device)  # from the new seed

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The sparsity state that must be identical on every rank of a data-parallel job, as tensors.

        Weight thresholds and masks (cached, frozen, fixed), the forward's active sets (SWAT-M) and each layer's
        weight density (SWAT-M redistributes it). Activation and gradient thresholds are excluded: they depend on the
        rank's local batch. :func:`sparsetrain.distributed.check_consistency` checksums this.
        """
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            st = self.states[name]
            for key, v in _flat_cache(st).items():
                if isinstance(v, torch.Tensor) and key.split("/")[0] in ("weight", "weight_for_grad_input"):
                    out[f"{name}.thresholds.{key}"] = v
            for key, v in st.frozen.items():
                if key in ("weight", "weight_for_grad_input"):
                    out[f"{name}.frozen.{key}"] = v
            if st.active is not None:
                out[f"{name}.active"] = st.active
            cfg = m.spec.resolved("weight")
            out[f"{name}.weight_density"] = torch.tensor([(sp.nominal_density(cfg) or 1.0) if cfg is not None else 1.0])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain containers and tensors: ``weights_only``-loadable)."""
        layers = {}
        for name, m in self.modules.items():
            st = self.states[name]
            layers[name] = {
                "spec": m.spec.to_dict(),
                "thresholds": _flat_cache(st),
                "computed_at": {op: st.computed_step(op) for op in st.cache if st.computed_step(op) is not None},
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
            st = self.states[name]
            fixed = {op: sp.entry(cfg).fixed for op in s["computed_at"]
                     if (cfg := m.spec.resolved(op) if op in OPERANDS else None) is not None}
            st.cache = _cache_from(s["thresholds"], s["computed_at"], fixed)
            st.prepare(m.spec)
            st.advance(self.step_count)
            st.frozen = dict(s["frozen"])
            if s["generator"] is not None:
                # On the layer's device: a CUDA layer draws its pruning noise from a CUDA generator.
                st.generator = torch.Generator(device=m.weight.device)
                st.generator.set_state(s["generator"])

    # ------------------------------------------------------------------ teardown
    @torch.no_grad()
    def remove(self, bake: bool = False) -> nn.Module:
        """Put plain Conv2d/Linear (and ReLU) modules back, with the same parameters; the handle is then unusable.

        Args:
            bake: first overwrite each sparse layer's weight with the weight its forward uses (masked, zeros where
                pruned), so the plain model computes what the sparse model's forward computed on the weights.
                Activation sparsifiers (``input``/``output``) are not carried over: they are not weights.
        """
        for name, m in self.modules.items():
            if bake:
                m.weight.copy_(effective_weight(m))
            self._set_module(name, m.to_dense())
        for name, r in self.relus.items():
            plain = nn.ReLU.__new__(nn.ReLU)
            plain.__dict__.update(r.__dict__)
            self._set_module(name, plain)
        self.modules, self.states, self.relus = {}, {}, {}
        self.distributed = []
        return self.model

    def __repr__(self) -> str:
        return f"SparsityHandle(preset={self.recipe.preset!r}, layers={len(self.modules)}, step={self.step_count})"
