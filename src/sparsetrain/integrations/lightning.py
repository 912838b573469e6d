"""A Lightning callback that trains a LightningModule's model sparsely (``pip install 'sparsetrain[lightning]'``).

:class:`SparsityCallback` does, inside ``Trainer.fit``, what sparsetrain's own loop does around the public API:

* **setup**: ``sparsify_`` the module (the whole LightningModule, or the submodule named by ``module=``) with the
  recipe, before Lightning builds the optimizers and wraps the model for DDP; the parameters are the same objects,
  so ``configure_optimizers`` needs no change, and ``state_dict`` keys stay those of the dense model.
* **after every optimizer step**: ``handle.step(optimizer)`` (threshold periods, SWAT-M redistribution, schedules);
  ``handle.set_epoch`` at every epoch start. Steps are counted by ``trainer.global_step``, so gradient accumulation
  steps the handle once per optimizer step.
* **densities**: every ``log_every_n_steps`` optimizer steps (default: the trainer's) one training step runs under
  ``handle.measuring()`` and the densities go to every logger of the trainer (rank 0 only) as ``density/weight`` and
  ``density/activation`` (element-weighted over all conv/linear layers, dense ones counted as 1.0, as
  ``sparsetrain train`` reports them) and per sparse layer ``density/<layer>/weight`` and
  ``density/<layer>/activation`` (the input saved for the weight gradient). The last values are
  :attr:`SparsityCallback.last_densities`.
* **checkpoints**: the handle's state (cached thresholds, masks, per-layer densities, step counters, generators) is
  the callback's state in every Lightning checkpoint, so ``trainer.fit(model, ckpt_path=...)`` continues exactly
  where the checkpoint left off.
* **DDP**: the model is sparsified on every rank before Lightning wraps it; each rank's handle gets its rank
  (``handle.set_rank``), so stochastic pruning draws per-rank streams as in ``sparsetrain train``.

Example:
    >>> import lightning.pytorch as pl  # doctest: +SKIP
    >>> from sparsetrain.integrations.lightning import SparsityCallback  # doctest: +SKIP
    >>> trainer = pl.Trainer(max_epochs=10, callbacks=[SparsityCallback("swat-u", density=0.1, module="model")])
    ... # doctest: +SKIP
    >>> trainer.fit(lit_module, train_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch.nn as nn

try:  # the `lightning` package (the extra); the standalone `pytorch_lightning` package has the same API
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("sparsetrain.integrations.lightning needs Lightning: pip install 'sparsetrain[lightning]'"
                          ) from None

from sparsetrain.handle import SparsityHandle, sparsify_
from sparsetrain.layers import counted_layer

__all__ = ["SparsityCallback"]

log = logging.getLogger(__name__)


class SparsityCallback(pl.Callback):
    """Sparsify a LightningModule's model at setup and keep its sparsity state stepped, logged and checkpointed.

    Args:
        recipe: what ``sparsify_`` takes: a preset name, an example recipe's name, a dict, a YAML path or a
            :class:`~sparsetrain.recipe.Recipe`.
        module: dotted name of the submodule to sparsify (e.g. ``"model"`` for ``self.model = create_model(...)``);
            None sparsifies the whole LightningModule. Naming a registered model lets the first/last-layer rules use
            its declared first conv and classifier.
        log_every_n_steps: optimizer steps between measured (and logged) steps; None: the trainer's
            ``log_every_n_steps``; 0: never measure.
        **overrides: global recipe settings, e.g. ``density=0.1``, ``first_layer_dense=False``.

    Attributes:
        handle: the :class:`~sparsetrain.handle.SparsityHandle` once set up (None before).
        last_densities: the figures last logged (``{"density/weight": ..., ...}``); empty before the first.
    """

    def __init__(self, recipe: Any = "swat-u", *, module: str | None = None, log_every_n_steps: int | None = None,
                 **overrides: Any) -> None:
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be an integer >= 0 (0: never) or None (the trainer's), got "
                             f"{log_every_n_steps!r}")
        self.recipe = recipe
        self.module = module
        self.overrides = overrides
        self.log_every_n_steps = log_every_n_steps
        self.handle: SparsityHandle | None = None
        self.last_densities: dict[str, float] = {}
        self._target: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._steps_seen = 0  # optimizer steps the handle has been stepped for (trainer.global_step after each)
        self._measuring: contextlib.ExitStack | None = None  # open while a step is measured
        self._measured_step = -1  # the optimizer step measured last
        self._input_numel: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    # ------------------------------------------------------------------ setup
    def _resolve_target(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise ValueError(f"SparsityCallback(module={self.module!r}): the LightningModule has no such submodule; "
                             f"its children: {children}") from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._resolve_target(pl_module)
        if self.handle is not None and target is self._target:
            return  # fit, then validate/test on the same module: already sparse
        self.handle = sparsify_(target, self.recipe, **self.overrides)
        self._target = target
        self.handle.set_rank(trainer.global_rank)
        if self._pending_state is not None:
            self.handle.load_state_dict(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"handle": None if self.handle is None else self.handle.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("handle")
        if state is None:
            return
        if self.handle is None:  # restored before setup: applied there
            self._pending_state = state
        else:
            self.handle.load_state_dict(state)

    # ------------------------------------------------------------------ training
    def _every(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        self._steps_seen = trainer.global_step  # a resumed run starts counting where its checkpoint stopped
        if trainer.global_step and self.handle.step_count != trainer.global_step:
            log.warning("SparsityCallback: resuming at optimizer step %d but the sparsity state is at step %d (the "
                        "checkpoint holds no state of this callback?): thresholds and schedules restart, so the "
                        "run is not an exact continuation", trainer.global_step, self.handle.step_count)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        self.handle.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        every = self._every(trainer)
        step = self._steps_seen
        if self._measuring is None and every and step % every == 0 and step != self._measured_step:
            self._start_measuring(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.handle is not None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None  # SWAT-M reads the first one's moments
        while self._steps_seen < trainer.global_step:  # once per optimizer step (none yet while accumulating)
            self.handle.step(optimizer)
            self._steps_seen += 1
        if self._measuring is not None and self._steps_seen > self._measured_step:  # its optimizer step is done
            self._stop_measuring(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_measuring()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_measuring()

    # ------------------------------------------------------------------ densities
    def _start_measuring(self, step: int) -> None:
        assert self.handle is not None and self._target is not None
        stack = contextlib.ExitStack()
        stack.enter_context(self.handle.measuring())
        self._input_numel = {}
        for name, m in self._target.named_modules():
            if counted_layer(m):
                # Not the seam: the input size of every conv/linear layer, plain ones included, weights the average.
                hook = m.register_forward_pre_hook(self._count_input(name))
                stack.callback(hook.remove)
        self._measuring = stack
        self._measured_step = step

    def _count_input(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and hasattr(args[0], "numel"):
                self._input_numel[name] = args[0].numel()

        return hook

    def _close_measuring(self) -> None:
        if self._measuring is not None:
            self._measuring.close()
            self._measuring = None

    def _stop_measuring(self, trainer: pl.Trainer) -> None:
        self._close_measuring()
        self.last_densities = self.measured_densities()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_densities, step=trainer.global_step)

    def measured_densities(self) -> dict[str, float]:
        """The densities of the last measured step: overall and per sparse layer (see the module docstring).

        Weight density is weighted by each conv/linear layer's weight elements, activation density by the elements
        of its input in the measured step; layers the recipe leaves dense count as 1.0.
        """
        assert self.handle is not None and self._target is not None
        dens = self.handle.densities()
        w_kept = w_total = a_kept = a_total = 0.0
        out: dict[str, float] = {}
        for name, m in self._target.named_modules():
            if not counted_layer(m):
                continue
            d = dens.get(name, {})
            w, a = float(d.get("weight", 1.0)), float(d.get("input_for_grad_weight", 1.0))
            n_w, n_a = m.weight.numel(), self._input_numel.get(name, 0)
            w_kept, w_total = w_kept + w * n_w, w_total + n_w
            a_kept, a_total = a_kept + a * n_a, a_total + n_a
            if name in dens:
                out[f"density/{name}/weight"] = w
                out[f"density/{name}/activation"] = a
        overall = {"density/weight": w_kept / max(1.0, w_total)}
        if a_total:
            overall["density/activation"] = a_kept / a_total
        return {**overall, **out}
