"""Each paper's results tables and plots, laid out from a results record (``reproduce.json``) alone.

One renderer per experiment (``_RENDERERS``, keyed by the record's ``paper``); :func:`sparsetrain.reporting.results.
render` picks one. Shared pieces (tables, per-point statistics, gaps and their intervals) are in
:mod:`sparsetrain.reporting.result_tables`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsetrain.reporting.result_tables import (
    Rendered,
    Table,
    _accs,
    _baseline,
    _diff_verdict,
    _figure,
    _gap,
    _gap_text,
    _mean_sd,
    _minutes,
    _paper_gap_text,
    _pct,
    _protocol_line,
    _published_tables,
    _require_figure,
    _save,
    _save_fig,
    _statistics_line,
    _verdict,
    point_stats,
)
from sparsetrain.reporting.tables import format_gap, format_mean_sd, gap_interval, interval_verdict, mean_sd


# ---------------------------------------------------------------------------------------------- SWAT
def _render_swat(rec: dict[str, Any]) -> Rendered:
    base = _baseline(rec, "")
    rows = []
    for pt in rec["points"]:
        st = point_stats(pt)
        w = None if st["weight_density"] is None else 100 * (1 - st["weight_density"])
        a = None if st["activation_density"] is None else 100 * (1 - st["activation_density"])
        rows.append([pt["label"], _pct(w), _pct(a), format_mean_sd(st["acc"], st["sd"], scale=100.0), str(st["n"]),
                     _pct(st["training_flops_reduction_pct"]), _pct(st["training_flops_reduction_pct_all_ops"]),
                     _pct(st["act_memory_reduction_pct"]),
                     "—" if st["model_compression_x"] is None else f"{st['model_compression_x']:.1f}",
                     _pct(st["inference_flops_reduction_pct"]), _pct(st["inference_flops_reduction_pct_all_ops"]),
                     _minutes(st["time_s"])])
    cols = ["Method", "W (%)", "Act (%)", "Top-1 acc ± SD (%)", "seeds", "Training FLOPs ↓ (%)",
            "Training FLOPs ↓ all ops (%)", "Act ↓ (%)", "MC (×)", "Inference FLOPs ↓ (%)",
            "Inference FLOPs ↓ all ops (%)", "train time (min)"]
    note = ("W / Act: measured training sparsity of weights and saved activations on the last step, element-weighted "
            "over all conv/linear layers (dense layers count as 0 %). FLOPs ↓: GEMM-only convention of "
            "docs/accounting.md (forward (1-s_w)F, grad-input (1-s_w)F, grad-weight (1-s_a)F); *all ops* adds the "
            "non-GEMM work of a training step (BatchNorm, ReLU, pooling, residual adds, loss) and the top-K "
            "selection (`count_flops(non_gemm=True)`). Accuracy: final test accuracy, mean ± sample SD over seeds. "
            "The gaps to dense, with their intervals, are in the next table. " + _protocol_line(rec))
    ours = Table("swat", f"Ours: {rec['title']}", cols, rows, note)
    by_name = {pt["name"]: pt for pt in rec["points"]}
    grows = []
    for pt in rec["points"]:
        st = point_stats(pt)
        gap = None if pt is base else _gap(pt, base)
        ref = by_name.get(pt.get("compare_with") or "")
        vs = "—" if ref is None else f"{_gap_text(_gap(pt, ref))}: {_diff_verdict(_gap(pt, ref))}"
        grows.append([pt["label"], format_mean_sd(st["acc"], st["sd"], scale=100.0), str(st["n"]),
                      "—" if pt is base else _gap_text(gap), _paper_gap_text(pt),
                      "—" if pt is base else _verdict(gap, pt), vs])
    ref_label = next((by_name[pt["compare_with"]]["label"] for pt in rec["points"]
                      if pt.get("compare_with") in by_name), "the method ablated")
    gaps = Table("swat_gaps", "Ours: accuracy gap to dense, with 95 % intervals", [
        "Method", "Top-1 acc ± SD (%)", "seeds", "gap to dense [95 % CI] (pp)", "paper's gap (pp, row)",
        "what the interval supports", f"vs {ref_label} [95 % CI] (pp)"], grows,
        "Paper's gap: the accuracy change to dense the paper publishes for the same method and sparsity (its BA / AC "
        "column; Table 2 for unstructured, Table 4 for channel SWAT, all at 150 epochs on full CIFAR-10 with larger "
        "networks); SWAT-ERK / SWAT-M are compared with DenseNet-121's rows, the only ones at 90 % (VGG-16's and "
        "WRN-16-8's are at 95 %). Figs. 7-8 (ResNet-18 on CIFAR-100) give curves, no number. The last column: the "
        "ablation's accuracy minus the unablated method's. " + _statistics_line(rec))

    def plot(path: Path) -> None:
        fig = _require_figure(figsize=(9.0, 4.5))
        ax = fig.add_subplot()
        markers = "osD^v<>pPX*h"
        for i, pt in enumerate(rec["points"]):
            st = point_stats(pt)
            if st["acc"] is None:
                continue
            ax.errorbar([st["training_flops_reduction_pct"] or 0.0], [100 * st["acc"]],
                        yerr=[100 * (st["sd"] or 0.0)], marker=markers[i % len(markers)], capsize=3, linestyle="none",
                        label=f"{pt['label']} ({st['n']} seed{'s' if st['n'] != 1 else ''})")
        ax.set_xlabel("training FLOPs reduction (%), GEMM convention")
        ax.set_ylabel("test accuracy (%), mean ± SD over seeds")
        ax.set_title("SWAT, ResNet-20 on CIFAR-10 at CPU scale", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        _save(fig, ax, path)

    # Figs. 1-2 style: SWAT-U (unstructured, uniform) accuracy against its measured weight sparsity, dense at 0.
    curve = [pt for pt in rec["points"] if pt is base or (pt["config"].get("recipe") == "swat-u-90"
                                                          and not pt.get("compare_with"))]

    def sparsity_curve(path: Path) -> None:
        fig = _require_figure(figsize=(6.0, 4.0))
        ax = fig.add_subplot()
        pts = []
        for pt in curve:
            st = point_stats(pt)
            if st["acc"] is not None:
                w = 0.0 if pt is base or st["weight_density"] is None else 100 * (1 - st["weight_density"])
                pts.append((w, 100 * st["acc"], 100 * (st["sd"] or 0.0), st["n"]))
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label="SWAT-U (0 % = dense), mean ± SD over seeds")
        bs = point_stats(base) if base is not None else None
        if bs and bs["acc"] is not None:
            ax.axhspan(100 * (bs["acc"] - (bs["sd"] or 0.0)), 100 * (bs["acc"] + (bs["sd"] or 0.0)), alpha=0.15,
                       label="dense ± SD")
        ax.set_xlabel("weight (and activation) sparsity (%), measured")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("SWAT-U accuracy vs sparsity, ResNet-20 on CIFAR-10 at CPU scale", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        _save(fig, ax, path)

    plots = {"swat_accuracy_vs_flops.png": plot}
    if len(curve) >= 3:
        plots["swat_sparsity_curve.png"] = sparsity_curve
    return Rendered([ours, gaps, *_published_tables(rec)], plots)


# ---------------------------------------------------------------------------------------------- Ye et al.
def _last(series: dict[str, Any]) -> float | None:
    vals = series.get("sparsity") or []
    return 1.0 - vals[-1] if vals else None


def rho_layers(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per conv layer: the density of the ``dy`` its two backward GEMMs use (``rho``) and of the pruned operand.

    ``pruned`` is the operand the handle pruned (``grad_output`` in Conv-BN-ReLU, ``grad_input`` in Conv-ReLU) and
    ``rho_pruned`` its measured density (``handle.densities()`` on the epoch's last step). ``rho`` is the pruned
    ``grad_output`` where the layer prunes its own ``dy``, else the ``dy`` the telemetry saw on the last sampled
    step (for a Conv-ReLU net: the next conv's pruned ``dx`` after the ReLU/pool backward; for a dense baseline the
    natural density). ``numel``: elements of that ``dy`` per step (the telemetry's), the weight of the overall mean.
    """
    tel_go = (run.get("telemetry") or {}).get("grad_output", {})
    tel_gi = (run.get("telemetry") or {}).get("grad_input", {})
    out: dict[str, dict[str, Any]] = {}
    names = list(tel_go) or list(run.get("densities") or {})
    for name in names:
        d = (run.get("densities") or {}).get(name, {})
        pruned, rho_pruned = None, None
        for op in ("grad_output", "grad_input"):
            v = d.get(op)
            if isinstance(v, (int, float)) and v < 1.0 and (rho_pruned is None or v < rho_pruned):
                pruned, rho_pruned = op, float(v)
        if pruned == "grad_input" and tel_gi and name not in tel_gi:
            # The layer's input needs no gradient (the first conv): its dx is never computed, so the handle's
            # figure is the nominal one, not a measurement.
            pruned, rho_pruned = "grad_input (not computed)", None
        rho = rho_pruned if pruned == "grad_output" else _last(tel_go.get(name, {}))
        out[name] = {"rho": rho, "pruned": pruned, "rho_pruned": rho_pruned,
                     "numel": (tel_go.get(name) or {}).get("numel")}
    return out


def overall_rho(run: dict[str, Any], layer_filter: Callable[[str], bool] = lambda n: True) -> float | None:
    """Element-weighted mean of the per-layer ``rho`` over the conv layers (Ye et al.'s overall rho_nnz)."""
    num = den = 0.0
    for name, r in rho_layers(run).items():
        if not layer_filter(name) or r["rho"] is None or not r["numel"]:
            continue
        num += r["rho"] * r["numel"]
        den += r["numel"]
    return num / den if den else None


def _is_conv(run: dict[str, Any]) -> Callable[[str], bool]:
    conv = set(run.get("conv_layers") or [])
    return (lambda n: n in conv) if conv else (lambda n: True)


def _render_grad_prune(rec: dict[str, Any]) -> Rendered:
    groups = list(dict.fromkeys(pt["group"] for pt in rec["points"]))
    ps = list(dict.fromkeys(pt["config"].get("recipe_overrides", {}).get("p") for pt in rec["points"]
                            if pt["config"].get("recipe") != "dense"))
    cols = ["Model", "Baseline acc (%)", "Baseline ρ_nnz"]
    for p in ps:
        cols += [f"p={100 * p:g}% acc (%)", f"p={100 * p:g}% ρ_nnz"]
    cols.append("train time (min)")
    rows, layer_tables = [], []
    by_group: dict[str, dict[Any, dict[str, Any]]] = {}
    for g in groups:
        pts = {("base" if pt["config"].get("recipe") == "dense" else pt["config"]["recipe_overrides"]["p"]): pt
               for pt in rec["points"] if pt["group"] == g}
        by_group[g] = pts
        row = [g]
        total = 0.0
        for key in ["base", *ps]:
            pt = pts.get(key)
            if pt is None:
                row += ["—", "—"]
                continue
            st = point_stats(pt)
            total += st["time_s"]
            rhos = [overall_rho(r, _is_conv(r)) for r in pt["runs"]]
            rho, _ = _mean_sd([r for r in rhos if r is not None])
            row += [format_mean_sd(st["acc"], st["sd"], scale=100.0), "—" if rho is None else f"{rho:.3f}"]
        rows.append(row + [_minutes(total)])
        # Per-layer table of this model: rho per p, and the pruned operand's own density.
        names: list[str] = []
        for pt in pts.values():
            for r in pt["runs"][:1]:
                names += [n for n in rho_layers(r) if n not in names and _is_conv(r)(n)]
        lcols = ["Layer", "baseline ρ"] + [f"p={100 * p:g}% ρ" for p in ps]
        lrows = []
        for n in names:
            cells = [n]
            for key in ["base", *ps]:
                pt = pts.get(key)
                if pt is None or not pt["runs"]:
                    cells.append("—")
                    continue
                r = rho_layers(pt["runs"][0]).get(n, {})
                txt = "—" if r.get("rho") is None else f"{r['rho']:.3f}"
                if key != "base" and str(r.get("pruned")).startswith("grad_input"):
                    txt += f" (dx: {'not computed' if r['rho_pruned'] is None else format(r['rho_pruned'], '.3f')})"
                cells.append(txt)
            lrows.append(cells)
        note = ("ρ: density of the dy each conv's two backward GEMMs use, on the last step (the handle's measured "
                "grad_output density where the conv prunes its own dy, else the telemetry's).")
        if any("(dx:" in c for r in lrows for c in r):
            note += (" In brackets (Conv-ReLU layers): the density of the conv's pruned dx as the handle measured it "
                     "(handle.densities()), before the ReLU/pool backward sparsifies it further into the previous "
                     "conv's dy.")
        layer_tables.append(Table(f"grad_prune_layers_{g}", f"Ours, per layer: {g} (first seed)", lcols, lrows, note))
    fcols = ["Model"] + [f"p={100 * p:g}% training FLOPs ↓ (%) GEMM / all ops" for p in ps]
    frows = []
    for g in groups:
        cells = [g]
        for p in ps:
            pt = by_group[g].get(p)
            st = point_stats(pt) if pt is not None else {}
            cells.append(f"{_pct(st.get('training_flops_reduction_pct'))} / "
                         f"{_pct(st.get('training_flops_reduction_pct_all_ops'))}")
        frows.append(cells)
    flops_table = Table("grad_prune_flops", "Ours: training FLOPs reduction as the accounting counts it", fcols, frows,
                        "The accounting credits a pruned dy to the two backward GEMMs of the conv that prunes it "
                        "(placement grad_output, Conv-BN-ReLU). A Conv-ReLU conv prunes its dx, which becomes the "
                        "previous conv's dy only after the ReLU/pool backward; the per-layer accounting does not "
                        "follow it there, so it credits the Conv-ReLU model nothing (0 %), although the measured ρ "
                        "above is what those GEMMs would see. Ye et al. report no FLOP figures.")
    note = ("ρ_nnz: non-zero density of the convs' output gradients dy (the tensor feeding both backward GEMMs), "
            "element-weighted over the conv layers, on the last training step (see the per-layer tables). Accuracy: "
            "final *test* accuracy (Ye et al.'s tables say training accuracy). " + _protocol_line(rec))
    ours = Table("grad_prune", f"Ours: {rec['title']}", cols, rows, note)
    grows = []
    for g in groups:
        base = by_group[g].get("base")
        for p in ps:
            pt = by_group[g].get(p)
            if pt is None:
                continue
            st, gap = point_stats(pt), _gap(pt, base)
            grows.append([g, f"{100 * p:g}%", format_mean_sd(st["acc"], st["sd"], scale=100.0),
                          f"{len(_accs(pt))} / {len(_accs(base))}", _gap_text(gap), _paper_gap_text(pt),
                          _verdict(gap, pt)])
    gaps = Table("grad_prune_gaps", "Ours: accuracy gap to the unpruned baseline, with 95 % intervals",
                 ["Model", "p", "test acc (%)", "seeds (pruned / baseline)", "gap to baseline [95 % CI] (pp)",
                  "paper's gap (pp, row)", "what the interval supports"], grows,
                 "Paper's gap: Ye et al.'s accuracy change at the same p (their Table 1, CIFAR-10, 300 epochs; their "
                 "acc% is the training accuracy), for ResNet-18 (the Conv-BN-ReLU net closest to ResNet-20) and "
                 "AlexNet. " + _statistics_line(rec))

    def plot(path: Path) -> None:
        fig = _require_figure(figsize=(10.0, 4.0))
        for i, g in enumerate(groups):
            ax = fig.add_subplot(1, len(groups), i + 1)
            for key in ["base", *ps]:
                pt = by_group[g].get(key)
                if pt is None or not pt["runs"]:
                    continue
                run = pt["runs"][0]
                layers = {n: v for n, v in rho_layers(run).items() if _is_conv(run)(n) and v["rho"] is not None}
                ax.plot(range(len(layers)), [v["rho"] for v in layers.values()], marker="o", markersize=3,
                        label="baseline" if key == "base" else f"p={100 * key:g}%")
                ax.set_xticks(range(len(layers)), list(layers), rotation=90, fontsize=6)
            ax.set_ylabel("ρ_nnz of dy (last step)")
            ax.set_title(g, fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        _save_fig(fig, path)

    return Rendered([ours, gaps, flops_table, *layer_tables, *_published_tables(rec)],
                    {"grad_prune_rho_per_layer.png": plot})


# ---------------------------------------------------------------------------------------------- TensorQuant
def _grad_sparsity_total(run: dict[str, Any]) -> float | None:
    """Element-weighted gradient sparsity over all layers' weight gradients on the last sampled step."""
    tel = (run.get("telemetry") or {}).get("grad_weight", {})
    num = den = 0.0
    for s in tel.values():
        if s.get("sparsity") and s.get("numel"):
            num += s["sparsity"][-1] * s["numel"]
            den += s["numel"]
    return num / den if den else None


def _seed_cell(values: list[float | None], digits: int) -> str:
    """One table cell over seeds: the value, or mean ± sample SD when several; "—" when there is none."""
    v = [x for x in values if x is not None]
    return format_mean_sd(*mean_sd(v), digits=digits) if v else "—"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _render_tensorquant(rec: dict[str, Any]) -> Rendered:
    from sparsetrain.telemetry.blocks import TOTAL

    tables: list[Table] = []
    analyses = rec.get("analyses") or {}
    groups = list(dict.fromkeys(pt["group"] for pt in rec["points"]))
    for g in groups:
        measured = {pt["config"].get("l1", 0) and "L1" or "L2": pt for pt in rec["points"]
                    if pt["group"] == g and any(r["run"] in analyses for r in pt["runs"])}
        if not measured:
            continue
        # One search per seed: the cells are the mean ± SD over the seeds searched (their names and settings are
        # the same; the first seed's analysis gives them).
        every = {k: [analyses[r["run"]] for r in pt["runs"] if r["run"] in analyses] for k, pt in measured.items()}
        res = {k: v[0] for k, v in every.items()}
        kinds = [k for k in ("L2", "L1") if k in res]
        for what, title in (("layers", "per layer"), ("blocks", "per block")):
            names = [r["name"] for r in res[kinds[0]].get("weight", res[kinds[0]]["natural"])["report"][what]] \
                if "weight" in res[kinds[0]] else [r["name"] for r in res[kinds[0]]["natural"][what]]
            if not names or (what == "blocks" and len(names) == 1):  # only the total: it is in the notes
                continue
            cols = ["Layer" if what == "layers" else "Block"]
            cols += [f"{k} weights" for k in kinds] + [f"{k} activations" for k in kinds]
            searched_acts = any("activation" in res[k] for k in kinds)
            if searched_acts:
                cols += [f"{k} activations (searched)" for k in kinds]
            def weight(a: dict[str, Any], n: str) -> float | None:
                rw = _row(a.get("weight", {}).get("report", {}), what, n)
                return None if rw is None else rw.get("weight_enforced", rw["weight_sparsity"])

            def natural(a: dict[str, Any], n: str) -> float | None:
                rn = _row(a["natural"], what, n)
                return None if rn is None else rn.get("input_sparsity")

            def searched(a: dict[str, Any], n: str) -> float | None:
                ra = _row(a.get("activation", {}).get("report", {}), what, n)
                return None if ra is None else ra.get("input_enforced")

            rows = []
            for n in names:
                cells = [n]
                for get in (weight, natural) + ((searched,) if searched_acts else ()):
                    cells += [_seed_cell([get(a, n) for a in every[k]], 3) for k in kinds]
                rows.append(cells)

            def relative(a: dict[str, Any], base: dict[str, Any]) -> float | None:
                rep, b = a.get("weight", {}).get("report"), base["natural"]["baseline_accuracy"]
                return None if not rep or rep.get("enforced_accuracy") is None or not b else \
                    100 * rep["enforced_accuracy"] / b

            def total(a: dict[str, Any]) -> float | None:
                rep = a.get("weight", {}).get("report")
                t = _row(rep, "blocks", TOTAL) if rep else None
                return None if t is None else t.get("weight_enforced", t["weight_sparsity"])

            bases = every.get("L2", every[kinds[0]])  # vs L2 unsparsified, seed by seed
            accs = [f"{k} {_seed_cell([relative(a, b) for a, b in zip(every[k], bases)], 1)}%" for k in kinds
                    if any(relative(a, b) is not None for a, b in zip(every[k], bases))]
            tot = [f"{k} {_seed_cell([total(a) for a in every[k]], 3)}" for k in kinds
                   if any(total(a) is not None for a in every[k])]
            note = (f"Weights: sparsity after the per-layer halving weight-threshold search (margin "
                    f"{res[kinds[0]].get('margin')}, all thresholds applied at once); activations: the natural "
                    "sparsity of the input activation each layer consumes (after the previous ReLU/pooling; "
                    "TensorQuant did not threshold activations either)"
                    + (", and after the activation-threshold search" if searched_acts else "") + ", on the first "
                    f"{res[kinds[0]].get('num_samples')} test images; mean ± SD over "
                    f"{_plural(min(len(v) for v in every.values()), 'searched seed')}. Relative test accuracy with the searched "
                    f"weight thresholds (vs L2 unsparsified): {', '.join(accs) or '—'}. Total weight sparsity "
                    f"(TensorQuant Table 6): {', '.join(tot) or '—'}.")
            tables.append(Table(f"tensorquant_{g}_{what}", f"Ours: {g}, weight and activation sparsity {title}",
                                cols, rows, note))
    # Gradient-threshold study (their Fig. 2), and per-layer gradient sparsity over training (Figs. 3-7).
    gt_rows = []
    baselines: dict[str, dict[str, Any]] = {}
    for pt in rec["points"]:
        thr = pt["config"].get("recipe_overrides", {}).get("gradient_threshold")
        if thr is None and pt["config"].get("recipe") != "tensorquant-gradient-threshold":
            if pt["config"].get("l1"):
                continue
            thr = 0.0
            baselines.setdefault(pt["group"], pt)
        st = point_stats(pt)
        sp = [s for s in (_grad_sparsity_total(r) for r in pt["runs"]) if s is not None]
        base = baselines.get(pt["group"])
        gap = None if base is None or pt is base else _gap(pt, base)
        b_acc = point_stats(base)["acc"] if base is not None else None
        rel = "—" if pt is base or not b_acc or st["acc"] is None else f"{100 * st['acc'] / b_acc:.1f}"
        gt_rows.append([pt["group"], f"{thr:g}", format_mean_sd(st["acc"], st["sd"], scale=100.0), str(st["n"]),
                        _gap_text(gap), rel, _verdict(gap, pt),
                        "—" if not sp else f"{sum(sp) / len(sp):.3f}", _minutes(st["time_s"])])
    # Each model's rows in threshold order, whatever order the experiment file lists its points in.
    gt_rows.sort(key=lambda r: (groups.index(r[0]), float(r[1])))
    tables.append(Table("tensorquant_gradient_threshold", "Ours: gradient-threshold sweep (TensorQuant Fig. 2)",
                        ["Model", "gradient threshold", "test acc (%)", "seeds", "gap to threshold 0 [95 % CI] (pp)",
                         "relative to threshold 0 (%)", "what the interval supports", "gradient sparsity at the end",
                         "train time (min)"], gt_rows,
                        "Threshold 0 = the L2 baseline. Gradient sparsity: exact zeros of all conv/linear weight "
                        "gradients as the update receives them (after the threshold, where one is set; see the "
                        "notes for where the L2 term enters), element-weighted over the layers, on the last sampled "
                        "step; the baseline's zeros are natural (dead units). The paper states relative accuracies "
                        "only (Figs. 3-4: 99 % and 97 % of the baseline at 1e-3), no gap in points. "
                        + _statistics_line(rec) + " " + _protocol_line(rec)))
    tables += _published_tables(rec)

    def fig2(path: Path) -> None:
        fig = _require_figure(figsize=(10.0, 4.0))
        for i, g in enumerate(groups):
            ax = fig.add_subplot(1, len(groups), i + 1)
            pts = [r for r in gt_rows if r[0] == g and r[2] != "—"]
            xs = [max(float(r[1]), 1e-6) for r in pts]
            ax.plot(xs, [float(r[2].split(" ")[0]) for r in pts], marker="o", label="test accuracy (%)")
            ax2 = ax.twinx()
            ax2.plot(xs, [100 * float(r[7]) if r[7] != "—" else math.nan for r in pts], marker="s", color="C1",
                     label="gradient sparsity (%)")
            ax.set_xscale("log")
            ax.set_xlabel("gradient threshold (0 plotted at 1e-6)")
            ax.set_ylabel("test accuracy (%)")
            ax2.set_ylabel("gradient sparsity (%)", color="C1")
            ax.set_title(g, fontsize=9)
            ax.grid(True, alpha=0.3)
        _save_fig(fig, path)

    plots: dict[str, Callable[[Path], None]] = {"tensorquant_fig2_threshold_sweep.png": fig2}
    for pt in rec["points"]:
        if pt["config"].get("recipe") != "tensorquant-gradient-threshold" or not pt["runs"]:
            continue
        tel = (pt["runs"][0].get("telemetry") or {}).get("grad_weight", {})
        if not tel:
            continue

        def over_training(path: Path, tel: dict[str, Any] = tel, label: str = pt["label"]) -> None:
            fig, ax = _figure()
            for name, s in tel.items():
                ax.plot(s["steps"], [100 * v for v in s["sparsity"]], label=name)
            ax.set_xlabel("training step")
            ax.set_ylabel("weight-gradient sparsity (%)")
            ax.set_title(label, fontsize=9)
            ax.legend(fontsize=7)
            _save(fig, ax, path)

        plots[f"tensorquant_grad_sparsity_{pt['name']}.png"] = over_training
    return Rendered(tables, plots)


def _row(report: dict[str, Any] | None, what: str, name: str) -> dict[str, Any] | None:
    for r in (report or {}).get(what, []):
        if r["name"] == name:
            return r
    return None


# ---------------------------------------------------------------------------------------------- Changpinyo et al.
def _render_channel(rec: dict[str, Any]) -> Rendered:
    base = next((pt for pt in rec["points"] if pt["config"].get("recipe") == "dense" and not pt.get("width")
                 and not pt["config"].get("width_mult")), None)
    rows = []
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for pt in rec["points"]:
        st = point_stats(pt)
        cfg = pt["config"]
        recipe = cfg.get("recipe")
        ov = cfg.get("recipe_overrides") or {}
        width = (pt.get("width") or {}).get("width_mult", cfg.get("width_mult") or 1.0)
        alpha = ov.get("density") if recipe != "dense" else None
        kind = pt["group"] or ("depth multiplier" if recipe == "dense" else "sparse random")
        rows.append([pt["label"], kind, "—" if alpha is None else f"{alpha:g}", f"{width:g}",
                     "—" if st["params"] is None else f"{st['params']:,.0f}",
                     "—" if st["forward_macs"] is None else f"{st['forward_macs'] / 1e6:.2f}",
                     format_mean_sd(st["acc"], st["sd"], scale=100.0), str(st["n"]),
                     "—" if pt is base else _gap_text(_gap(pt, base)),
                     "—" if pt is base else _verdict(_gap(pt, base), pt), _minutes(st["time_s"])])
        if st["acc"] is not None and st["params"] is not None:
            series.setdefault(kind, []).append((st["params"], st["forward_macs"] or math.nan, 100 * st["acc"],
                                                100 * (st["sd"] or 0.0)))
    note = ("Params: non-zero parameters excluding the classifier (Changpinyo et al.'s count; the accounting's "
            "params_excl_classifier with the measured weight densities); MACs: effectual forward multiply-adds per "
            "image (inference). Depth-multiplier points take the width_mult whose dense model has the parameter count "
            "closest to the sparse-random point they are matched with. " + _statistics_line(rec) + " "
            + _protocol_line(rec))
    ours = Table("channel", f"Ours: {rec['title']}", ["Point", "kind", "α (connection density)", "width_mult",
                                                     "params (excl. classifier)", "forward MMACs", "test acc (%)",
                                                     "seeds", "gap to dense [95 % CI] (pp)",
                                                     "what the interval supports", "train time (min)"], rows, note)
    by_name = {pt["name"]: pt for pt in rec["points"]}
    prows = []
    for pt in rec["points"]:
        match = (pt.get("width") or {}).get("matches")
        sparse = by_name.get(match) if match else None
        if sparse is None:
            continue
        ss, sd = point_stats(sparse), point_stats(pt)
        diff = _gap(sparse, pt)
        prows.append([sparse["label"], "—" if ss["params"] is None else f"{ss['params']:,.0f}",
                      "—" if sd["params"] is None else f"{sd['params']:,.0f}",
                      format_mean_sd(ss["acc"], ss["sd"], scale=100.0), format_mean_sd(sd["acc"], sd["sd"], scale=100.0),
                      _gap_text(diff), _diff_verdict(diff)])
    pairs = Table("channel_pairs", "Ours: sparse random minus depth multiplier at equal parameters, with 95 % intervals",
                  ["Sparse point", "params sparse", "params depth multiplier", "sparse acc (%)",
                   "depth-multiplier acc (%)", "sparse − depth multiplier [95 % CI] (pp)",
                   "what the interval supports"], prows,
                  "The paper's claim (section 5.2.1, Figs. 2-3): sparse networks are as accurate or more accurate "
                  "than depth-multiplier networks of the same parameter count; the figures give curves, no numbers. "
                  "'higher': "
                  "the interval excludes 0 on the sparse side. " + _statistics_line(rec))

    def plot(path: Path) -> None:
        fig = _require_figure(figsize=(10.0, 4.0))
        for i, (idx, xlabel) in enumerate(((0, "parameters (excl. classifier)"), (1, "forward multiply-adds"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for kind, pts in series.items():
                pts = sorted(pts)
                ax.errorbar([p[idx] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o",
                            capsize=3, label=kind, linestyle="-" if len(pts) > 1 else "none")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        _save_fig(fig, path)

    return Rendered([ours, pairs, *_published_tables(rec)], {"channel_accuracy_vs_params.png": plot})


# ---------------------------------------------------------------------------------------------- convergence
def _curves(pt: dict[str, Any]) -> list[list[float]]:
    """Per-run test-accuracy curves (one value per epoch) of a point, runs with a missing epoch dropped."""
    return [[float(v) for v in r.get("test_acc_curve") or []] for r in pt["runs"]
            if r.get("test_acc_curve") and all(isinstance(v, (int, float)) for v in r["test_acc_curve"])]


def _render_convergence(rec: dict[str, Any]) -> Rendered:
    base = _baseline(rec, "")
    base_final = [r["final_test_acc"] for r in base["runs"] if r.get("final_test_acc") is not None] if base else []
    points = ([base] if base else []) + [pt for pt in rec["points"] if pt is not base]  # dense first
    rows = []
    for pt in points:
        st = point_stats(pt)
        finals = [r["final_test_acc"] for r in pt["runs"] if r.get("final_test_acc") is not None]
        gap = verdict = "—"
        if pt is not base and finals and base_final:
            d, h = gap_interval(finals, base_final)
            gap, verdict = format_gap(d, h), interval_verdict(d, h)
        w = None if st["weight_density"] is None else 100 * (1 - st["weight_density"])
        a = None if st["activation_density"] is None else 100 * (1 - st["activation_density"])
        rows.append([pt["label"], _pct(w), _pct(a), format_mean_sd(st["acc"], st["sd"], scale=100.0), str(st["n"]),
                     gap, verdict, _pct(st["training_flops_reduction_pct"]), _minutes(st["time_s"])])
    note = ("Final test accuracy (last epoch, full test set), mean ± sample SD over seeds. Gap: percentage points to "
            "dense, with the 95 % two-sample t interval on the pooled SD (df = n1 + n2 - 2); 'consistent with no gap' "
            "means the interval contains 0. " + _protocol_line(rec))
    final = Table("convergence_final", f"Ours: {rec['title']}", ["Method", "W (%)", "Act (%)", "Top-1 acc ± SD (%)",
                  "seeds", "gap to dense [95 % CI] (pp)", "what the interval supports", "Training FLOPs ↓ (%)",
                  "train time (min)"], rows, note)

    base_curves = _curves(base) if base else []
    others = [pt for pt in rec["points"] if pt is not base]
    epochs = min((len(c) for pt in rec["points"] for c in _curves(pt)), default=0)
    cols = ["epoch", "Dense acc (%)"]
    for pt in others:
        cols += [f"{pt['label']} acc (%)", f"{pt['label']} gap [95 % CI] (pp)"]
    erows = []
    for e in range(epochs):
        b = [c[e] for c in base_curves]
        row = [str(e + 1), format_mean_sd(*mean_sd(b), scale=100.0) if b else "—"]
        for pt in others:
            v = [c[e] for c in _curves(pt)]
            row.append(format_mean_sd(*mean_sd(v), scale=100.0) if v else "—")
            row.append(format_gap(*gap_interval(v, b)) if v and b else "—")
        erows.append(row)
    curve = Table("convergence_by_epoch", "Test accuracy and gap to dense after each epoch", cols, erows,
                  "Each epoch's test accuracy (full test set), mean ± SD over seeds; the gap and its 95 % interval as "
                  "in the table above. The learning rate follows a cosine schedule to 0 at the last epoch, so the last "
                  "rows are the converged end of this budget, not an early-stopped snapshot.")

    def plot(path: Path) -> None:
        fig = _require_figure(figsize=(9.0, 4.0))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for pt in points:
            cs = _curves(pt)
            if not cs:
                continue
            n = min(len(c) for c in cs)
            xs = list(range(1, n + 1))
            stats = [mean_sd([c[e] for c in cs]) for e in range(n)]
            m = [100 * s[0] for s in stats]
            sd = [100 * (s[1] or 0.0) for s in stats]
            ax1.plot(xs, m, marker="o", markersize=3, label=f"{pt['label']} ({len(cs)} seeds)")
            ax1.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
            if pt is not base and base_curves:
                n2 = min(n, min(len(c) for c in base_curves))
                gaps = [gap_interval([c[e] for c in cs], [c[e] for c in base_curves]) for e in range(n2)]
                g = [100 * d for d, _ in gaps]
                hw = [100 * (h or 0.0) for _, h in gaps]
                ax2.errorbar(list(range(1, n2 + 1)), g, yerr=hw, marker="o", markersize=3, capsize=2,
                             label=pt["label"])
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("test accuracy (%), mean ± SD")
        ax1.legend(fontsize=7)
        ax2.axhline(0.0, color="grey", linewidth=0.8)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("gap to dense (pp), 95 % CI")
        ax2.legend(fontsize=7)
        ax1.grid(True, alpha=0.3)
        _save(fig, ax2, path)

    return Rendered([final, curve, *_published_tables(rec)], {"convergence_gap_by_epoch.png": plot})


_RENDERERS: dict[str, Callable[[dict[str, Any]], Rendered]] = {
    "swat": _render_swat, "grad-prune": _render_grad_prune, "tensorquant": _render_tensorquant,
    "channel": _render_channel, "channel-mnist": _render_channel, "swat-convergence": _render_convergence,
}

