"""What a run reports: the overall weight and activation densities of an epoch, the TensorBoard scalars, and the
summary table the CLI prints."""

from __future__ import annotations

from typing import Any

from sparsetrain import runs

__all__ = ["overall_densities", "tensorboard_epoch", "write_summary", "format_summary"]


def overall_densities(densities: dict[str, dict[str, float]], flops) -> tuple[float, float]:
    """Weight and activation density, element-weighted over all conv/linear layers (dense ones count as 1).

    Weights are weighted by their element counts, activations by the elements each layer saves for its weight
    gradient, as the papers average them; the per-layer densities are the handle's.
    """
    from sparsetrain.accounting import layer_density

    w_total = sum(r.weight_elements for r in flops.layers)
    a_total = sum(r.saved_activation_elements for r in flops.layers)
    w_kept = sum(layer_density(densities, r.name, "weight") * r.weight_elements for r in flops.layers)
    a_kept = sum(layer_density(densities, r.name, "input_for_grad_weight") * r.saved_activation_elements
                 for r in flops.layers)
    return w_kept / max(1, w_total), a_kept / max(1, a_total)


def tensorboard_epoch(writer, metrics: dict[str, Any], stats: dict[str, Any], step: int) -> None:
    """The epoch's scalars and its intra-epoch curve, at ``step``."""
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "weight_density", "activation_density",
                "training_flops_reduction_pct", "samples_per_s"):
        writer.add_scalar(f"epoch/{key}", metrics[key], step)
    for st, loss, acc in zip(*stats["curve"].values()):
        writer.add_scalar("step/train_loss", loss, st)
        writer.add_scalar("step/train_acc", acc, st)
    if "comm" in metrics:
        writer.add_scalar("comm/bytes_per_step", metrics["comm"]["bytes_per_step"], step)
    writer.flush()


def write_summary(s) -> dict[str, Any]:
    """Write the run's FLOP/memory accounting (from the last epoch's measured densities) and its summary; returns
    the summary. ``s`` is the loop's :class:`~sparsetrain.training.checkpoint.Session`."""
    from sparsetrain.accounting import memory_report

    metrics = s.run_dir.read_metrics()
    densities = metrics[-1]["densities"]
    report = s.dense_flops.with_densities(densities)
    # Memory of one training step at this batch size, dense vs sparse storage of the sparsified operands
    # (analytic; `sparsetrain flops --memory` adds a measured figure). Per-layer rows stay in the FLOP table.
    memory = memory_report(s.model, s.input_shape, densities, batch_size=s.cfg.batch_size,
                           optimizer=s.optimizer).to_dict()
    memory.pop("layers", None)
    flops = {**report.to_dict(), "memory": memory}
    s.run_dir.write_flops(flops)
    recipe = s.handle.recipe
    summary = runs.summarize(s.config, metrics, flops, recipe=recipe.preset or "custom", density=recipe.density,
                             epochs=s.cfg.epochs, run_dir=s.run_dir.path)
    s.run_dir.write_summary(summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The final table the CLI prints."""
    f = s["flops"]
    rows = [
        ("run directory", s["run_dir"]),
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("recipe", f"{s['recipe']}" + (f" (density {s['density']:g})" if s["density"] is not None else "")),
        ("test accuracy", f"{100 * s['final_test_acc']:.2f}% (best {100 * s['best_test_acc']:.2f}%)"),
        ("weight density", f"{100 * s['weight_density']:.1f}% of conv/linear weights"),
        ("activation density", f"{100 * s['activation_density']:.1f}% of saved activations"),
        ("training FLOPs saved", f"{f['training_flops_reduction_pct']:.1f}%"),
        ("inference FLOPs saved", f"{f['inference_flops_reduction_pct']:.1f}%"),
        ("activation memory saved", f"{f['act_memory_reduction_pct']:.1f}%"),
        ("model compression", f"{f['model_compression_x']:.2f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
