"""The training loop, read top to bottom: :func:`train` -> :func:`setup` -> per epoch :func:`train_one_epoch`
(per batch :func:`_forward_backward`, then :func:`_optimizer_step`), :func:`evaluate`, :func:`record_epoch` ->
:func:`finalize`.

Everything a run produces goes into its run directory (:class:`sparsetrain.runs.RunDir`), which the run locks for
its whole life; ``resume`` continues an interrupted run exactly (same batches, RNG streams, optimizer and sparsity
state), from an epoch's end or, with ``checkpoint_every``, from the middle of an epoch (:mod:`.checkpoint`).
Under torchrun the same loop runs data-parallel; what that changes lives in :mod:`.parallel`.

The step never waits for the device: the loss sum, the correct count and a NaN/Inf watch accumulate on the device,
and the host reads them only every ``log_every`` steps and at the end of the epoch (as nanoGPT reads its loss only at
its log interval). Operand densities are measured only on each epoch's last step, inside ``handle.measuring()``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.runs import load_checkpoint
from sparsetrain.training import config as C
from sparsetrain.training import meters, parallel
from sparsetrain.training.checkpoint import (
    Session,
    TrainingInterrupted,
    new_folders,
    open_run,
    remove_new_run,
    save_checkpoint,
)
from sparsetrain.training.config import TrainConfig
from sparsetrain.training.session import build_session
from sparsetrain.training.summary import overall_densities, tensorboard_epoch, write_summary

__all__ = ["train", "setup", "train_one_epoch", "evaluate", "record_epoch", "finalize"]

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, resume=None, epochs: int | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says, or continue the run in ``resume``; returns the summary dict.

    A resumed run uses the config saved in its run directory (``cfg`` only sets ``quiet``); ``epochs`` may extend
    it. Under torchrun every rank calls it and gets the summary.

    Raises:
        NonFiniteError: the loss or the gradients became NaN/Inf (the last good checkpoint stays on disk).
        runs.RunLockedError: another process is running in the run directory.
    """
    if cfg.lean_allocator:  # before the run allocates anything it should govern
        from sparsetrain.allocator import lean_allocator

        lean_allocator()
    s = setup(cfg, resume, epochs)
    with s.exits:  # the run directory stays locked until the summary is written
        done = s.start_epoch - 1 if s.start_epoch > 0 else None  # the last finished epoch
        try:
            for epoch in range(s.start_epoch, s.cfg.epochs):
                stats = train_one_epoch(s, epoch)
                densities = s.handle.densities()  # measured on the epoch's last training step
                parallel.broadcast_buffers(s.model, s.env)  # every rank evaluates rank 0's model
                test_loss, test_acc = evaluate(s.model, s.test_loader, s.device, s.cfg.amp, s.env)
                record_epoch(s, epoch, stats, densities, test_loss, test_acc)
                done = epoch
        except KeyboardInterrupt:
            # Checkpoints are written atomically, so the last one is complete whenever Ctrl-C arrives; metrics written
            # after it are dropped by --resume.
            raise TrainingInterrupted(s.run_dir, done, s.checkpoint_step) from None
        finally:
            if s.monitor is not None:
                s.monitor.close()
            if s.tb_writer is not None:
                s.tb_writer.close()
        summary = finalize(s)
        parallel.unwrap(s)  # DDP's Reducer is freed while every rank is still here (see unwrap)
        parallel.barrier(s.env)
        return summary


# ---------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, resume=None, epochs: int | None = None) -> Session:
    """Config, process group, run-directory lock, data, model, sparsity, optimizer, schedule; restored from
    ``resume`` if given. The session's ``exits`` releases the lock (and leaves the group) when closed."""
    from sparsetrain.data import make_loaders

    cfg, run_dir, ckpt = open_run(cfg, resume, epochs)  # every name checked: nothing read or written yet
    if cfg.tensorboard:
        C.require_tensorboard()
    exits, created, locked = contextlib.ExitStack(), new_folders(run_dir.path), False
    try:
        env, device = parallel.join(cfg, exits)
        parallel.lock_run(run_dir, env, exits, fresh=resume is None)  # before the data: a busy run fails at once
        locked = env.is_main
        if resume is not None:
            # Read again under the lock: the run we waited on may have checkpointed after our first read.
            ckpt = load_checkpoint(resume)
        C.seed_everything(cfg.seed, cfg.deterministic)
        # Data: whole uint8 tensors in memory; the batch order depends only on (seed, epoch), on every rank.
        with meters.quiet_logger("sparsetrain.data", cfg.quiet):
            loaders = make_loaders(
                cfg.dataset, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                seed=cfg.seed, augment=cfg.augment, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                channels_last=cfg.channels_last)
        parallel.shard(loaders[:2], env)
        return build_session(cfg, run_dir, ckpt, env, device, exits, loaders)
    except BaseException:
        if locked:  # a refused run leaves no trace: not even the lock's folder
            remove_new_run(run_dir, created)
        exits.close()
        raise


def train_one_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """One pass over the training set (the rest of it, when resumed mid-epoch); returns its loss, accuracy, sample
    count and time (summed over ranks).

    Raises:
        NonFiniteError: the loss or the gradients became NaN/Inf (found at the next log interval).
        ConsistencyError: ``check_consistency`` found ranks that no longer hold the same weights or masks.
    """
    cfg, loader = s.cfg, s.train_loader
    start, partial = (s.start_batch, s.partial) if epoch == s.start_epoch else (0, None)
    s.start_batch, s.partial = 0, None
    loader.set_epoch(epoch, start)
    s.handle.set_epoch(epoch)
    s.net.train()
    totals, lr_sum = meters.Totals(), 0.0
    curve = meters.Curve(max(1, (cfg.epochs * len(loader)) // meters.CURVE_POINTS))
    if partial is not None:
        totals.restore(partial)
        curve.restore(partial["curve"])
        lr_sum = partial["lr_sum"]
    last = len(loader) - 1
    bar = meters.progress(loader, epoch, cfg, s.env.is_main, start)
    comm_before = s.comm.bytes_sent if s.comm is not None else 0
    t0, trained = time.perf_counter(), 0  # the samples this process trained on (not those of a resumed part)
    for i, (x, y) in enumerate(bar, start):
        lr_sum += s.optimizer.param_groups[0]["lr"]  # the rate this step uses (a host float: no sync)
        global_n = min(loader.batch_size, loader.num_samples - i * loader.batch_size)
        x, y, trained = x.to(s.device), y.to(s.device), trained + len(y)
        # Densities are measured on the last step only: the epoch's metrics report them, counting costs a pass.
        observed = i == last or (s.monitor is not None and s.monitor.sampling)
        with s.handle.measuring() if i == last else contextlib.nullcontext():
            out, loss = _forward_backward(s, x, y, global_n, s.eager_net if observed else s.net)
        totals.add(s.step, out, y, loss, _grad_norm(s))
        if s.monitor is not None:
            s.monitor.step(epoch=epoch)  # dW as the update will consume it (thresholded, averaged)
        _optimizer_step(s)
        s.step += 1
        if cfg.check_consistency and s.step % cfg.check_consistency == 0:
            parallel.check_consistency(s.model, s.handle.shared_state(), s.env, s.step)
        checkpoint = cfg.checkpoint_every is not None and s.step % cfg.checkpoint_every == 0 and i != last
        if (i + 1) % cfg.log_every == 0 or i == last or checkpoint:
            rows = totals.read()  # the only host sync of the loop
            meters.check_finite(rows, epoch, s.run_dir)
            curve.add(rows)
            meters.show_progress(bar, totals, epoch, cfg.epochs, i, last)
        if checkpoint:
            save_checkpoint(s, epoch - 1, in_epoch={"epoch": epoch, "batches": i + 1, **totals.state(),
                                                    "lr_sum": lr_sum, "curve": curve.state()})
    train_time = time.perf_counter() - t0
    sums = [totals.loss_sum, totals.correct, totals.seen, trained]
    loss_sum, correct, seen, trained = parallel.all_reduce_sum(sums, s.env, s.device)
    stats = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "seen": seen, "trained": trained,
             "time_s": train_time, "lr_mean": lr_sum / max(1, last + 1), "curve": curve.points(),
             "batches": (start, len(loader))}
    if s.comm is not None:
        stats["comm"] = parallel.comm_stats(s.comm, comm_before, len(loader) - start, s.model)
    return stats


def _forward_backward(s: Session, x: torch.Tensor, y: torch.Tensor, global_n: int,
                      net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and loss (under autocast when asked), then backward; returns the logits and the batch's mean loss.

    ``global_n`` is the size of the global batch this rank's ``x`` is a slice of (``len(x)`` on one process).
    """
    with s.autocast():
        out = net(x)
        loss, logged = parallel.loss(out, y, s.cfg.label_smoothing, s.env, global_n)
    if s.cfg.l1:
        l1 = s.cfg.l1 * sum(w.abs().sum() for w in s.l1_params)
        loss, logged = loss + l1, logged + l1.detach()
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is None:
        loss.backward()
    else:
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.optimizer)  # true gradients for the telemetry; scaler.step skips non-finite ones
    if s.grad_rule is not None:
        s.grad_rule(s.optimizer)
    return out, logged


def _grad_norm(s: Session) -> torch.Tensor | None:
    """Total gradient norm, left on the device: only its finiteness is checked, at the next log interval."""
    if s.scaler is not None:
        return None  # with fp16 an overflowing step is expected: the scaler skips it and lowers the scale
    return torch.nn.utils.get_total_norm([p.grad for p in s.model.parameters() if p.grad is not None])


def _optimizer_step(s: Session) -> None:
    if s.scaler is None:
        s.optimizer.step()
    else:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.scheduler.step()
    s.handle.step(s.optimizer)


# ---------------------------------------------------------------------------------------------- evaluate, record
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none",
             env: parallel.DistEnv | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over a loader (one host sync, at the end).

    With a data-parallel ``env`` each rank evaluates its shard of the loader and the sums are all-reduced, so every
    rank returns the figures of the whole test set.
    """
    model.eval()
    autocast = C.autocast(amp, torch.device(device))
    totals = meters.Totals(loss_is_mean=False)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            out = model(x)
        totals.add(0, out, y, F.cross_entropy(out.float(), y, reduction="sum"))
    totals.read()
    loss_sum, correct, seen = parallel.all_reduce_sum([totals.loss_sum, totals.correct, totals.seen],
                                                      env or parallel.DistEnv(), torch.device(device))
    return loss_sum / max(1, seen), correct / max(1, seen)


def record_epoch(s: Session, epoch: int, stats: dict[str, Any], densities: dict[str, dict[str, float]],
                 test_loss: float, test_acc: float) -> dict[str, Any]:
    """Append the epoch's metrics, then checkpoint (in this order: every checkpoint has its metrics line).

    Data-parallel: every rank calls it (the checkpoint gathers the ranks' own states); rank 0 writes, and the
    densities are rank 0's (activation densities depend on the rank's slice of the batch).
    """
    w_density, a_density = overall_densities(densities, s.dense_flops)
    report = s.dense_flops.with_densities(densities)
    metrics = {
        # lr: the mean rate the epoch's steps used (under cosine the end-of-epoch value is 0 on the last epoch)
        "epoch": epoch, "step": s.step, "lr": stats["lr_mean"], "lr_end": s.optimizer.param_groups[0]["lr"],
        "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
        "test_loss": test_loss, "test_acc": test_acc, "time_s": stats["time_s"],
        "samples_per_s": stats["trained"] / stats["time_s"], "weight_density": w_density,
        "activation_density": a_density, "training_flops_reduction_pct": report.training_flops_reduction_pct,
        "densities": densities, "curve": stats["curve"],
        **({"world_size": s.env.world_size} if s.env.distributed else {}),
        **({"comm": stats["comm"]} if "comm" in stats else {}),  # gradient bytes rank 0 sent, and a dense all-reduce's
    }
    if s.env.is_main:
        s.run_dir.append_metrics(metrics)
        if s.tb_writer is not None:
            tensorboard_epoch(s.tb_writer, metrics, stats, s.step)
    save_checkpoint(s, epoch)
    first, n = stats["batches"]
    partial = f" (batches {first + 1}-{n} of {n}: resumed mid-epoch)" if first else ""
    log.info("epoch %d/%d  loss %.4f  train %.2f%%  test %.2f%%  W density %.3f  act density %.3f  "
             "%.0f samples/s%s", epoch + 1, s.cfg.epochs, metrics["train_loss"], 100 * metrics["train_acc"],
             100 * test_acc, w_density, a_density, metrics["samples_per_s"], partial)
    return metrics


def finalize(s: Session) -> dict[str, Any]:
    """Write the FLOP/memory accounting and the summary from the last epoch's measured densities (rank 0; the
    other ranks receive its summary)."""
    return parallel.broadcast_object(write_summary(s) if s.env.is_main else None, s.env)
