"""What a run reports: the overall weight and activation densities of an epoch, the TensorBoard scalars, and the
summary table the CLI prints.

One definition of each density, used by the epoch metrics, the summary and the report: the kept (non-zero)
fraction of an operand as the layer's GEMM used it, from ``SparsityHandle.densities()`` (the kernel's ``after``
tensors; a natural zero, e.g. after a ReLU, counts as not kept), element-weighted over every conv/linear layer. The
*weight density* weights each layer's forward weight by its element count; the *activation density* weights the
activation each layer saves for its weight gradient (``input_for_grad_weight``) by its element count. A layer the
recipe leaves dense counts as 1; where that changes a figure (SWAT-U's dense first layer) the summary names the layer
and gives the figure over the sparse layers as well.
"""

from __future__ import annotations

from typing import Any

from sparsetrain import runs

__all__ = ["overall_densities", "tensorboard_epoch", "write_summary", "format_summary", "NEAR_CHANCE"]

#: A final accuracy below this multiple of chance (1 / classes) gets a one-line note in the summary.
NEAR_CHANCE = 2.5


def overall_densities(densities: dict[str, dict[str, float]], flops,
                      layers: set[str] | None = None) -> tuple[float, float]:
    """Weight and activation density, element-weighted over all conv/linear layers (dense ones count as 1), or over
    ``layers`` only.

    Weights are weighted by their element counts, activations by the elements each layer saves for its weight
    gradient, as the papers average them; the per-layer densities are the handle's.
    """
    from sparsetrain.accounting import layer_density

    rows = [r for r in flops.layers if layers is None or r.name in layers]
    w_total = sum(r.weight_elements for r in rows)
    a_total = sum(r.saved_activation_elements for r in rows)
    w_kept = sum(layer_density(densities, r.name, "weight") * r.weight_elements for r in rows)
    a_kept = sum(layer_density(densities, r.name, "input_for_grad_weight") * r.saved_activation_elements
                 for r in rows)
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
    summary.update(_training_facts(s, metrics[-1], densities))
    s.run_dir.write_summary(summary)
    return summary


def _training_facts(s, last: dict[str, Any], densities: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the summary adds to :func:`sparsetrain.runs.summarize`: how the run was optimised, how many steps it took
    and classes it had (for the near-chance note), and the densities over the sparse layers alone when the layers
    the recipe left dense change them."""
    from sparsetrain.data import dataset_info

    cfg = s.cfg
    opt = {"sgd": f"sgd (momentum {cfg.momentum:g}{', nesterov' if cfg.nesterov else ''})",
           "adam": f"adam (betas {cfg.betas[0]:g}, {cfg.betas[1]:g})",
           "adamw": f"adamw (betas {cfg.betas[0]:g}, {cfg.betas[1]:g})"}[cfg.optimizer]
    out = {"optimizer": f"{opt}, lr {cfg.lr:g} {cfg.schedule}, weight decay {cfg.weight_decay:g}", "amp": cfg.amp,
           "steps": last["step"], "num_classes": dataset_info(cfg.dataset).num_classes}
    dense = [r.name for r in s.dense_flops.layers if r.name not in densities]
    if dense and len(dense) < len(s.dense_flops.layers):
        w, a = overall_densities(densities, s.dense_flops, {r.name for r in s.dense_flops.layers} - set(dense))
        out.update(dense_layers=dense, weight_density_sparse_layers=w, activation_density_sparse_layers=a)
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The final table the CLI prints."""
    f = s["flops"]
    acc = s["final_test_acc"]
    rows = [
        ("run directory", s["run_dir"]),
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("recipe", f"{s['recipe']}" + (f" (density {s['density']:g})" if s["density"] is not None else "")),
    ]
    if "optimizer" in s:
        rows.append(("optimizer", f"{s['optimizer']}; amp {s['amp']}"))
    rows.append(("test accuracy", f"{100 * acc:.2f}% (best {100 * s['best_test_acc']:.2f}%)"))
    note = near_chance_note(s)
    if note:
        rows.append(("note", note))
    rows += [
        ("weight density", f"{100 * s['weight_density']:.1f}% of conv/linear weights" + _dense_note(s, "weight")),
        ("activation density", f"{100 * s['activation_density']:.1f}% of saved activations"
                               + _dense_note(s, "activation")),
        ("training FLOPs saved", f"{f['training_flops_reduction_pct']:.1f}%"),
        ("inference FLOPs saved", f"{f['inference_flops_reduction_pct']:.1f}%"),
        ("activation memory saved", f"{f['act_memory_reduction_pct']:.1f}%"),
        ("model compression", f"{f['model_compression_x']:.2f}x"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def near_chance_note(s: dict[str, Any]) -> str | None:
    """One line when the final accuracy is close to chance, with what usually causes it; None otherwise."""
    classes, acc = s.get("num_classes"), s.get("final_test_acc")
    if not classes or classes < 2 or acc is None or acc >= NEAR_CHANCE / classes:
        return None
    steps = f"{s['steps']}" + (f" at density {s['density']:g}" if s.get("density") is not None else "")
    return (f"near chance ({100 / classes:.2f}% with {classes} classes): usually too few steps ({steps}) or the "
            "learning rate; try more --epochs or another --lr")


def _dense_note(s: dict[str, Any], which: str) -> str:
    """``; conv1 is dense, 10.0% over the sparse layers`` when the layers left dense change the figure by >= 0.05 pp."""
    sparse = s.get(f"{which}_density_sparse_layers")
    if sparse is None or abs(sparse - s[f"{which}_density"]) < 5e-4:
        return ""
    names, verb = ", ".join(s["dense_layers"]), "is" if len(s["dense_layers"]) == 1 else "are"
    return f"; {names} {verb} dense, {100 * sparse:.1f}% over the sparse layers"
