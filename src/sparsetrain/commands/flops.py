"""``sparsetrain flops``: per-layer MACs of a training step, dense vs sparse, with the papers' summary figures.

Examples:
    sparsetrain flops --model resnet50_imagenet --input 3x224x224 --recipe swat-u --sparsity 0.8
    sparsetrain flops --model resnet18 --dataset cifar10 --recipe swat-u --density 0.1 --json
    sparsetrain flops --run runs/resnet18-swat-u            # measured densities of a finished run
    sparsetrain flops --model cifarnet --dataset cifar10 --recipe random-channel --density 0.25 \\
        --compare-depth-multiplier                           # Changpinyo: sparse random vs depth multiplier
    sparsetrain flops --model lenet5 --dataset mnist --recipe swat-u --density 0.1 --memory --optimizer adam
    sparsetrain flops --model resnet50_imagenet --input 3x224x224 --num-classes 1000 --recipe swat-u --sparsity 0.8 \
        --non-gemm --weight-threshold-period 1000 --training-batch 256   # SWAT's ImageNet setting, all ops counted

Densities: with ``--recipe`` they are the recipe's nominal densities (``handle.densities()`` before any data has
been seen; data-dependent sparsifiers such as thresholds count as dense); with ``--run`` they are the densities
measured during training (the last epoch of the run's metrics, ``RunDir.last_densities()``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["HELP", "add_arguments", "main", "parse_input_shape", "build_report"]

HELP = "per-layer MACs (forward, grad-input, grad-weight), dense vs sparse; FLOPs/Act/compression as in SWAT"


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``; also accepts commas."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must look like CxHxW (e.g. 3x32x32), got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--input must be positive sizes like CxHxW, got {text!r}")
    return shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``flops`` arguments."""
    parser.add_argument("--model", metavar="NAME", help="registered model name (see `sparsetrain list models`)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--dataset", metavar="NAME", help="take input shape and class count from a dataset")
    shape.add_argument("--input", metavar="CxHxW", type=parse_input_shape, help="per-sample input shape")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default: the dataset's, else the model's own, e.g. 1000 for "
                             "resnet50_imagenet)")
    parser.add_argument("--recipe", metavar="PRESET|YAML", default=None, help="sparsity recipe (default: dense)")
    dens = parser.add_mutually_exclusive_group()
    dens.add_argument("--density", type=float, default=None, help="kept fraction passed to the recipe")
    dens.add_argument("--sparsity", type=float, default=None, help="1 - density")
    parser.add_argument(
        "--first-layer-dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the recipe's first_layer_dense",
    )
    parser.add_argument("--width-mult", type=float, default=None, help="depth multiplier of every conv's channels")
    parser.add_argument(
        "--run",
        metavar="RUN_DIR",
        type=Path,
        default=None,
        help="use a run's config (model, dataset) and the densities measured in its last epoch",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="MACs per batch of this size (default 1)")
    parser.add_argument(
        "--count-first-layer-grad-input",
        action="store_true",
        help="also count grad-input of layers fed by the data (autograd never computes it)",
    )
    parser.add_argument(
        "--compare-depth-multiplier",
        action="store_true",
        help="Changpinyo: compare the recipe at --density A with a dense model at width sqrt(A)",
    )
    parser.add_argument("--memory", action="store_true", help="also print the analytic memory of a training step")
    parser.add_argument(
        "--optimizer",
        default="sgd-momentum",
        help="optimizer state for --memory: sgd, sgd-momentum, adam, adamw or a buffer count",
    )
    parser.add_argument(
        "--storage-format",
        default="bitmap",
        choices=("bitmap", "csr", "dense"),
        help="storage of sparsified saved operands for --memory (default bitmap)",
    )
    ng = parser.add_argument_group(
        "non-GEMM work",
        "--non-gemm also counts BatchNorm, ReLU, pooling, residual additions, biases, dropout, the loss and the top-K "
        "selection (MAC-equivalents, 1 FLOP = 0.5 MAC) and prints the training reduction under both conventions: "
        "GEMMs only, and all ops (dense = GEMMs + non-GEMM; sparse = sparse GEMMs + non-GEMM + top-K).",
    )
    ng.add_argument("--non-gemm", action="store_true", help="count non-GEMM work and the top-K selection too")
    ng.add_argument("--weight-threshold-period", type=int, default=None, metavar="N",
                    help="weight top-K threshold recomputed every N steps (selection cost / N; default 1; SWAT "
                         "ImageNet: 1000)")
    ng.add_argument("--activation-threshold-period", type=int, default=None, metavar="N",
                    help="activation (and pruned dy) threshold recomputed every N steps (default 1: every step)")
    ng.add_argument("--selection-comparisons", type=float, default=None, metavar="C",
                    help="comparisons per element of one selection (default: Quickselect's expected 2 + 2H(d))")
    ng.add_argument("--training-batch", type=int, default=None, metavar="B",
                    help="samples per optimizer step: a weight is selected once per step, so a report of "
                         "--batch-size samples pays batch-size/B of it (default: --batch-size)")
    ng.add_argument("--elementwise-unit", choices=("flop", "mac"), default=None,
                    help="flop (default): an element-wise op or comparison is 1 FLOP = 0.5 MAC; mac: count it as "
                         "one MAC, as FLOP counters that list BatchNorm/ReLU elements among MACs do")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _input_shape_and_classes(args: argparse.Namespace, model_name: str) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Input shape and model kwargs: ``--dataset``'s, else ``--input`` and the model's own class count, else the
    model's natural input size and class count (:func:`sparsetrain.models.get_model_cfg`). Where each came from is
    recorded in ``args.defaults_note`` (printed with the table)."""
    from sparsetrain.models import get_model_cfg

    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    cfg = get_model_cfg(model_name)
    kwargs: dict[str, Any] = {"num_classes": args.num_classes, "width_mult": args.width_mult}
    if args.dataset:
        from sparsetrain.data import dataset_info

        info = dataset_info(args.dataset)
        size = info.image_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        kwargs["num_classes"] = args.num_classes or info.num_classes
        kwargs["in_channels"] = info.channels
        shape, source = (info.channels, *hw), f"dataset {args.dataset}"
    elif args.input is not None:
        shape, source = args.input, "--input"
        if len(args.input) == 3:
            kwargs["in_channels"] = args.input[0]
    else:
        shape, source = tuple(cfg.input_size), f"{model_name}'s default"
    classes_from = ("--num-classes" if args.num_classes is not None else
                    f"dataset {args.dataset}" if args.dataset else f"{model_name}'s default")
    if kwargs["num_classes"] is None:
        kwargs["num_classes"] = cfg.num_classes
    args.resolved_num_classes = kwargs["num_classes"]
    args.defaults_note = (f"{model_name}: input {'x'.join(map(str, shape))} ({source}), {kwargs['num_classes']} "
                          f"classes ({classes_from}); override with --dataset, --input, --num-classes")
    return shape, kwargs


def _nominal_densities(model: Any, recipe: str | None, density: float | None = None, sparsity: float | None = None,
                       first_layer_dense: bool | None = None) -> dict[str, dict[str, float]] | None:
    """The recipe's nominal densities on ``model`` (None without a recipe: dense)."""
    if recipe is None:
        if density is not None or sparsity is not None or first_layer_dense is not None:
            raise ValueError("--density/--sparsity/--first-layer-dense need --recipe")
        return None
    import sparsetrain
    from sparsetrain.sparsifiers import density_from

    overrides: dict[str, Any] = {}
    if density is not None:
        overrides["density"] = density
    if sparsity is not None:
        # As density: a preset's default density would otherwise clash with an explicit sparsity.
        overrides["density"] = density_from(None, sparsity, "--sparsity")
    if first_layer_dense is not None:
        overrides["first_layer_dense"] = first_layer_dense
    handle = sparsetrain.sparsify_(model, recipe, **overrides)
    # Read before any forward pass: nominal densities (the trace below would replace them by measurements on
    # random data).
    return handle.densities()


def _from_run(run_path: Path) -> tuple[Any, tuple[int, ...], dict[str, dict[str, float]]]:
    """A run's model (architecture only), input shape and the densities measured in its last epoch."""
    from sparsetrain.runs import load_run

    run = load_run(run_path, weights=False)
    return run.model, run.input_shape, run.run_dir.last_densities()


_NON_GEMM_FLAGS = {
    "weight_threshold_period": ("--weight-threshold-period", "weight_period", "an integer >= 1"),
    "activation_threshold_period": ("--activation-threshold-period", "activation_period", "an integer >= 1"),
    "selection_comparisons": ("--selection-comparisons", "comparisons_per_element", "a number > 0"),
    "training_batch": ("--training-batch", "training_batch", "an integer >= 1"),
    "elementwise_unit": ("--elementwise-unit", "macs_per_flop", "flop or mac"),
}


def _non_gemm_options(args: argparse.Namespace) -> Any:
    """The :class:`NonGemmOptions` of the non-GEMM flags, or None without ``--non-gemm``; errors name the flag."""
    from sparsetrain.accounting.non_gemm import NonGemmOptions

    given = {k: getattr(args, k, None) for k in _NON_GEMM_FLAGS if getattr(args, k, None) is not None}
    if not getattr(args, "non_gemm", False):
        if given:
            flags = ", ".join(_NON_GEMM_FLAGS[k][0] for k in given)
            raise ValueError(f"{flags}: only used with --non-gemm (add it)")
        return None
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        flag, field_name, valid = _NON_GEMM_FLAGS[key]
        if key == "elementwise_unit":
            value = {"flop": 0.5, "mac": 1.0}[value]  # argparse has checked the choice
        elif not (value > 0 and math.isfinite(value) if isinstance(value, float) else value >= 1):
            raise ValueError(f"{flag} must be {valid}, got {value:g}")
        kwargs[field_name] = value
    return NonGemmOptions(**kwargs)


def build_report(args: argparse.Namespace) -> tuple[Any, Any, dict[str, dict[str, float]] | None]:
    """Build the model and its :class:`FlopReport` from parsed arguments. Returns ``(model, report, densities)``."""
    import sparsetrain
    from sparsetrain.accounting import count_flops

    selection = _non_gemm_options(args)
    if args.run is not None:
        if args.recipe is not None or args.model is not None:
            raise ValueError("--run takes model, dataset and densities from the run; drop --model/--recipe")
        model, shape, densities = _from_run(args.run)
    else:
        if not args.model:
            raise ValueError("give --model NAME (or --run RUN_DIR)")
        shape, kwargs = _input_shape_and_classes(args, args.model)
        model = sparsetrain.create_model(args.model, **kwargs)
        densities = _nominal_densities(model, args.recipe, args.density, args.sparsity, args.first_layer_dense)
    report = count_flops(
        model,
        shape,
        densities,
        batch_size=args.batch_size,
        count_first_layer_grad_input=args.count_first_layer_grad_input,
        non_gemm=selection if selection is not None else False,
    )
    return model, report, densities


def _density_arg(args: argparse.Namespace) -> float | None:
    """``--density`` or ``--sparsity`` as a kept fraction (None when neither is given)."""
    from sparsetrain.sparsifiers import density_from

    if args.density is None and args.sparsity is None:
        return None
    return density_from(args.density, args.sparsity, "--density/--sparsity")


def _compare_depth_multiplier(args: argparse.Namespace) -> dict[str, Any]:
    """Changpinyo et al.: recipe at density A (width 1) vs dense at width sqrt(A), parameters excl. classifier."""
    import sparsetrain
    from sparsetrain.accounting import count_flops

    if not args.model:
        raise ValueError("--compare-depth-multiplier needs --model")
    alpha = _density_arg(args)
    if alpha is None:
        raise ValueError("--compare-depth-multiplier needs --density A (or --sparsity)")
    if args.width_mult not in (None, 1.0):
        raise ValueError("--compare-depth-multiplier sets the widths itself; drop --width-mult")
    recipe = args.recipe or "random-channel"
    shape, kwargs = _input_shape_and_classes(args, args.model)
    rows = []
    settings = [
        ("dense", 1.0, None),
        (f"{recipe} density {alpha:g}", 1.0, recipe),
        (f"depth multiplier {math.sqrt(alpha):.4g}", math.sqrt(alpha), None),
    ]
    for label, width, rec in settings:
        model = sparsetrain.create_model(args.model, **(kwargs | {"width_mult": width}))
        densities = None
        if rec is not None:
            densities = _nominal_densities(model, rec, alpha, None, args.first_layer_dense)
        rep = count_flops(model, shape, densities, batch_size=args.batch_size)
        sp = rep.totals(sparse=True)
        conv = [r for r in rep.layers if r.type.endswith(("Conv1d", "Conv2d", "Conv3d"))]
        conv_params = sum(r.weight_density * r.weight_elements + (r.params - r.weight_elements) for r in conv)
        rows.append(
            {
                "setting": label,
                "width_mult": width,
                "density": alpha if rec else 1.0,
                "params_excl_classifier": sp["params_excl_classifier"],
                "params": sp["params"],
                "conv_params": conv_params,
                "multiply_adds": sp["forward_macs"],
                "training_macs": sp["training_macs"],
            }
        )
    return {
        "model": args.model,
        "input_shape": list(shape),
        "alpha": alpha,
        "settings": rows,
        "convention": "params_excl_classifier: non-zero parameters (BatchNorm included) excluding the classifier "
        "(last layer), as Changpinyo et al.; conv_params: non-zero conv weights + biases; multiply_adds: forward "
        f"MACs per batch of {args.batch_size} (Changpinyo's MAdds); sparse counts as in count_flops (a masked "
        "weight gradient is still computed in full, so training MACs of a fixed topology stay high).",
    }


def _fmt_compare(d: dict[str, Any]) -> str:
    from sparsetrain.accounting.flops import format_count

    head = f"{'setting':<34} {'params excl. cls':>16} {'conv params':>12} {'MAdds (fwd)':>12} {'training MACs':>14}"
    lines = [f"{d['model']} {tuple(d['input_shape'])}, alpha = {d['alpha']:g}", head, "-" * len(head)]
    for r in d["settings"]:
        lines.append(
            f"{r['setting']:<34} {format_count(r['params_excl_classifier']):>16} {format_count(r['conv_params']):>12} "
            f"{format_count(r['multiply_adds']):>12} "
            f"{format_count(r['training_macs']):>14}"
        )
    lines += ["", f"convention: {d['convention']}"]
    return "\n".join(lines)


def paper_reference(args: argparse.Namespace, report: Any) -> dict[str, Any] | None:
    """The published SWAT Table 3 row this command reproduces, or None: ResNet-50 on 3x224x224 with 1000 classes,
    ``--recipe swat-u`` at 80 % or 90 % sparsity, first layer dense (the preset's default)."""
    from sparsetrain.accounting.published import swat_table3_row

    if args.run is not None or args.model != "resnet50_imagenet" or args.recipe != "swat-u":
        return None
    if tuple(report.input_shape) != (3, 224, 224) or getattr(args, "resolved_num_classes", 1000) not in (None, 1000):
        return None
    if args.first_layer_dense is False:
        return None
    return swat_table3_row(_density_arg(args))


def main(args: argparse.Namespace) -> int:
    """Print the report (table or JSON). Returns 0, or 2 on a bad argument / run directory."""
    from sparsetrain.accounting import format_table
    from sparsetrain.accounting.memory import rss_note
    from sparsetrain.accounting.published import format_paper_comparison

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.compare_depth_multiplier:
            if getattr(args, "non_gemm", False):
                raise ValueError("--non-gemm is not available with --compare-depth-multiplier")
            d = _compare_depth_multiplier(args)
            print(json.dumps(d, indent=2) if args.json else _fmt_compare(d))
            return 0
        model, report, densities = build_report(args)
        mem = None
        if args.memory:
            import torch

            from sparsetrain.accounting.memory import measure_saved_tensors, memory_report

            opt: Any = int(args.optimizer) if str(args.optimizer).isdigit() else args.optimizer
            # One real training step on random inputs of the report's shape: what autograd really keeps, beside
            # the analytic count (top-K keeps a fixed fraction, so random data gives the recipe's storage).
            x = torch.randn(args.batch_size, *report.input_shape, generator=torch.Generator().manual_seed(0))
            measured = measure_saved_tensors(model.train(), x, fmt=args.storage_format)
            mem = memory_report(
                model,
                report.input_shape,
                densities,
                batch_size=args.batch_size,
                optimizer=opt,
                fmt=args.storage_format,
                measured=measured,
            )
    except (ValueError, FileNotFoundError, KeyError) as e:  # RunDirectoryError is a ValueError
        print(f"sparsetrain flops: error: {e}", file=sys.stderr)
        return 2
    note = getattr(args, "defaults_note", None)
    paper = paper_reference(args, report)
    if args.json:
        out = report.to_dict()
        if note:
            out = out | {"input_shape": list(report.input_shape), "num_classes": args.resolved_num_classes,
                         "defaults": note}
        if paper is not None:
            out = out | {"paper": paper}
        if mem is not None:
            rss = {"rss_note": rss_note(mem)} if mem.measured is not None and \
                mem.measured.rss_peak_delta_bytes is not None else {}
            out = out | {"memory": mem.to_dict() | rss}
        print(json.dumps(out, indent=2))
    else:
        if note:
            print(note)
        print(format_table(report))
        if paper is not None:
            print()
            print(format_paper_comparison(paper, report))
        if mem is not None:
            print()
            print(mem.format_table())
            if mem.measured is not None and mem.measured.rss_peak_delta_bytes is not None:
                print("\n" + "\n".join(textwrap.wrap(rss_note(mem), 116)))
    return 0
