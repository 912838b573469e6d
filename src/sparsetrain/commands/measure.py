"""``sparsetrain measure``: inference sparsity of a trained run, thresholds enforced, and the threshold search.

Loads a run (``sparsetrain.runs.load_run``), evaluates its test set and prints TensorQuant-style tables of weight
and activation sparsity per layer and per block, with the accuracy with and without the enforced thresholds.
``--search weight|activation`` runs the per-layer halving search (METHODS.md §3) and can write the recipe it finds.

A sparse-trained run is measured as trained: each sparse layer's forward weight (e.g. SWAT's top-K) is baked into a
dense copy (``--dense`` measures the stored dense weights instead). Activation thresholds act on each layer's
*input* (the post-ReLU activation it consumes), never on the first layer's input (the image) unless a search or
recipe names it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["HELP", "add_arguments", "main"]

HELP = "measure weight/activation sparsity of a run, enforce thresholds, search per-layer thresholds"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="run directory, or a checkpoint file in one")
    parser.add_argument("--data-dir", default=None, help="data root (default: the run's data_dir / $SPARSETRAIN_DATA)")
    parser.add_argument("--weight-threshold", type=float, default=None, metavar="T",
                        help="enforce |w| > T on every layer's weight")
    parser.add_argument("--act-threshold", type=float, default=None, metavar="T",
                        help="enforce |x| > T on every layer's input activation (all but the first layer)")
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="evaluate only the first N test batches (bounds the cost of --search)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--test-subset", type=int, default=None, metavar="N",
                        help="evaluate the first N test images (default: the run's test_subset)")
    subset.add_argument("--full-test-set", action="store_true",
                        help="evaluate the whole test split even when the run used a subset")
    parser.add_argument("--search", choices=("weight", "activation"), default=None,
                        help="per-layer halving threshold search on weights or input activations")
    parser.add_argument("--margin", type=float, default=1.0,
                        help="search: required accuracy / baseline for each layer alone (default 1.0: accuracy "
                             "unchanged, as TensorQuant's published scripts; METHODS' 0.999 is a looser choice)")
    parser.add_argument("--output", "-o", default=None, metavar="RECIPE.yaml",
                        help="search: write the found thresholds as a recipe sparsify_ loads")
    parser.add_argument("--dense", action="store_true",
                        help="ignore the run's recipe: measure the stored dense weights")
    parser.add_argument("--no-blocks", action="store_true", help="per-layer table only")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _test_subset(run, args: argparse.Namespace) -> int | None:
    """The test images to evaluate: ``--test-subset``, else all with ``--full-test-set``, else the run's setting."""
    if args.full_test_set:
        return None
    if args.test_subset is not None:
        if args.test_subset < 1:
            raise ValueError(f"--test-subset must be >= 1, got {args.test_subset}")
        return args.test_subset
    return run.config.get("test_subset")


def _test_loader(run, data_dir, batch_size, device, subset: int | None = None):
    from sparsetrain.data import make_test_loader

    name = run.config.get("dataset")
    if not name:
        raise ValueError(f"{run.run_dir.config_path}: the run's config has no 'dataset'")
    return make_test_loader(name, data_dir or run.config.get("data_dir"), batch_size, subset=subset, device=device)


def main(args: argparse.Namespace) -> int:
    from sparsetrain.analysis import inference_model, make_evaluator, search_thresholds
    from sparsetrain.commands._errors import UsageError
    from sparsetrain.telemetry.inference import measure_sparsity

    if args.batches is not None and args.batches < 1:
        raise UsageError(f"--batches must be >= 1, got {args.batches}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.margin <= 1:
        raise UsageError(f"--margin must be in (0, 1], got {args.margin}")
    if args.output and not args.search:
        raise UsageError("--output writes a searched recipe; add --search weight|activation")
    from sparsetrain.runs import load_run

    try:
        run = load_run(args.run)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # not a run directory, missing or damaged checkpoint
        print(f"sparsetrain measure: error: {e}", file=sys.stderr)
        return 2
    from sparsetrain.training import check_device

    device = check_device(args.device)
    model = inference_model(run, args.dense).to(device).eval()
    subset = _test_subset(run, args)
    loader = _test_loader(run, args.data_dir, args.batch_size, device, subset)
    if subset is not None:
        logger.info("evaluating the first %d test images, as the run did (--full-test-set: all of them)",
                    loader.num_samples)
    evaluate = make_evaluator(loader, max_batches=args.batches)

    weight_thr: float | dict[str, float] | None = args.weight_threshold
    act_thr: float | dict[str, float] | None = args.act_threshold
    search = None
    if args.search:
        operand = "weight" if args.search == "weight" else "input"
        search = search_thresholds(model, evaluate, operand=operand, margin=args.margin)
        if operand == "weight":
            weight_thr = search.thresholds
        else:
            act_thr = search.thresholds
        if args.output:
            path = search.save_recipe(args.output)
            logger.info("wrote %s", path)

    report = measure_sparsity(model, evaluate, weight_thresholds=weight_thr, act_thresholds=act_thr,
                              blocks=None if args.no_blocks else "auto")
    if args.json:
        out = {"run": str(args.run), "report": report.to_dict()}
        if search is not None:
            out["search"] = search.to_dict()
            out["recipe"] = search.to_recipe()
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    n = loader.num_samples
    images = f"first {n} test images" if subset is not None else f"all {n} test images"
    print(f"run: {args.run} ({run.config.get('model')} on {run.config.get('dataset')}, {images})")
    if search is not None:
        print(f"\nper-layer {search.operand} threshold search (margin {search.margin}):")
        for name, r in search.layers.items():
            if r.threshold is None:
                print(f"  {name:24s} cannot be sparsified ({r.evaluations} evaluations)")
            else:
                print(f"  {name:24s} thr {r.threshold:<10.4g} accuracy alone {r.accuracy:.4f}  "
                      f"sparsity alone {100 * r.sparsity:.1f}%  ({r.evaluations} evaluations)")
        if not args.output:
            print("\nrecipe (save with --output):\n" + search.to_yaml())
    print()
    print(report.format())
    return 0
