"""What the loop measures while it runs: the per-step totals (read from the device only at log intervals), the
intra-epoch training curve, and the NaN/Inf check."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch

__all__ = ["Totals", "Curve", "NonFiniteError", "check_finite", "progress", "show_progress", "quiet_logger",
           "CURVE_POINTS"]

log = logging.getLogger(__name__)

#: Points of the intra-epoch training curve per run (the metrics' ``curve``), whatever the run length.
CURVE_POINTS = 40


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


class Totals:
    """Loss, correct count and gradient norm of every step, left on the device until :meth:`read` (one host sync).

    The per-step values are only referenced between reads (a few dozen 0-dim tensors), so a step launches no extra
    kernels and never waits for the device; the sums are then formed on the host in step order, exactly as a
    per-step ``loss.item()`` accumulation would.
    """

    def __init__(self, loss_is_mean: bool = True) -> None:
        self.loss_is_mean = loss_is_mean  # a training step's loss is the batch mean, an evaluation batch's the sum
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self._steps: list[int] = []
        self._sizes: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []

    def add(self, step: int, out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor,
            grad_norm: torch.Tensor | None = None) -> None:
        """Record one step (or evaluation batch)."""
        self._steps.append(step)
        self._sizes.append(len(y))
        self._losses.append(loss.detach())
        self._correct.append((out.argmax(1) == y).sum())
        if grad_norm is not None:
            self._grad_norms.append(grad_norm)

    def state(self) -> dict[str, float]:
        """The running totals (after :meth:`read`), for a mid-epoch checkpoint."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}

    def restore(self, state: dict[str, float]) -> None:
        self.loss_sum, self.correct, self.seen = float(state["loss_sum"]), int(state["correct"]), int(state["seen"])

    @staticmethod
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' mid-epoch states as one: totals summed, rank 0's learning-rate sum and curve."""
        out = dict(parts[0])
        for k in ("loss_sum", "correct", "seen"):
            out[k] = sum(p[k] for p in parts)
        return out

    def read(self) -> list[tuple[int, int, float, float, int]]:
        """Fold the recorded steps into the totals; returns ``(step, size, loss, grad norm, correct)`` of each step
        (one sync)."""
        if not self._steps:
            return []
        parts = [torch.stack(self._losses).double(), torch.stack(self._correct).double()]
        if self._grad_norms:
            parts.append(torch.stack(self._grad_norms).double())
        values = torch.cat(parts).tolist()
        k = len(self._steps)
        losses, corrects, norms = values[:k], values[k:2 * k], values[2 * k:] or [0.0] * k
        for size, loss, c in zip(self._sizes, losses, corrects):
            self.loss_sum += loss * size if self.loss_is_mean else loss
            self.correct += int(c)
            self.seen += size
        rows = list(zip(self._steps, self._sizes, losses, norms, (int(c) for c in corrects)))
        self._steps, self._sizes, self._losses, self._correct, self._grad_norms = [], [], [], [], []
        return rows


def check_finite(rows: list[tuple[int, int, float, float, int]], epoch: int, run_dir: Any) -> None:
    """NonFiniteError at the first step whose loss or gradient norm is NaN/Inf."""
    for step, _, loss, grad_norm, _ in rows:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at epoch {epoch} step {step} (loss {loss}, grad norm {grad_norm}; found at the "
                f"check after step {rows[-1][0]}); the last good checkpoint is kept in {run_dir.path}. Lower the "
                "learning rate or check the recipe.")


class Curve:
    """The intra-epoch training curve: mean loss and accuracy over every ``every`` steps (from the per-step values
    the log-interval sync already brings to the host), keyed by the step that ends the bucket (1-based count of
    steps done, so the epoch's last point falls on the epoch record's ``step``)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._rows: list[tuple[int, int, float, float, int]] = []
        self._points: list[list[float]] = []

    def add(self, rows: list[tuple[int, int, float, float, int]]) -> None:
        for row in rows:
            self._rows.append(row)
            if (row[0] + 1) % self.every == 0:
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            n = sum(r[1] for r in self._rows)
            loss = sum(r[2] * r[1] for r in self._rows) / n
            acc = sum(r[4] for r in self._rows) / n
            self._points.append([self._rows[-1][0] + 1, loss, acc])
            self._rows = []

    def state(self) -> dict[str, list]:
        """The unfinished bucket and the points so far, for a mid-epoch checkpoint."""
        return {"rows": [list(r) for r in self._rows], "points": [list(p) for p in self._points]}

    def restore(self, state: dict[str, list]) -> None:
        self._rows = [tuple(r) for r in state["rows"]]
        self._points = [list(p) for p in state["points"]]

    def points(self) -> dict[str, list[float]]:
        """``{"step": [...], "train_loss": [...], "train_acc": [...]}`` (the epoch's partial last bucket included)."""
        self._flush()
        cols = list(zip(*self._points)) or [(), (), ()]
        return {"step": [int(v) for v in cols[0]], "train_loss": list(cols[1]), "train_acc": list(cols[2])}


def progress(loader, epoch: int, cfg: Any, is_main: bool = True, initial: int = 0):
    """The batches of one epoch, with a progress bar on a terminal (none when quiet or not rank 0)."""
    if cfg.quiet or not is_main:
        return loader
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), only the per-epoch log line.
    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch", dynamic_ncols=True,
                disable=None, initial=initial, total=len(loader))


def show_progress(bar, totals: Totals, epoch: int, epochs: int, i: int, last: int) -> None:
    """At a log interval: the bar's loss and accuracy on a terminal; a log line instead when the bar is off because
    the output is not a terminal (logs, CI). Nothing when quiet or not rank 0 (``bar`` is then the loader)."""
    if not hasattr(bar, "set_postfix"):
        return
    loss, acc = totals.loss_sum / totals.seen, totals.correct / totals.seen
    if not bar.disable:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
    elif i != last:  # the epoch's own line follows its last step
        log.info("epoch %d/%d  step %d/%d  loss %.4f  train %.2f%%", epoch + 1, epochs, i + 1, last + 1, loss,
                 100 * acc)


@contextlib.contextmanager
def quiet_logger(logger: str, quiet: bool):
    """``--quiet``: the named logger's info lines (e.g. the data loading) are not shown."""
    target = logging.getLogger(logger)
    level = target.level
    if quiet:
        target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)
