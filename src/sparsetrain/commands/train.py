"""``sparsetrain train``: train a model with a recipe; with no arguments, the built-in default job."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

HELP = "train a CNN with a sparsity recipe (no arguments: LeNet-5, SWAT-U 90%, bundled Fashion-MNIST)"

# flag -> config key, for the explicit flags (everything else: --set key=value)
_FLAGS = {
    "model": "model", "dataset": "dataset", "data_dir": "data_dir", "width_mult": "width_mult", "recipe": "recipe",
    "epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr", "momentum": "momentum",
    "nesterov": "nesterov", "amp": "amp", "log_every": "log_every",
    "weight_decay": "weight_decay", "wd_exclude_bn_bias": "wd_exclude_bn_bias", "label_smoothing": "label_smoothing",
    "l1": "l1", "schedule": "schedule", "milestones": "milestones", "gamma": "gamma",
    "warmup_epochs": "warmup_epochs", "seed": "seed", "deterministic": "deterministic",
    "channels_last": "channels_last", "device": "device", "telemetry_every": "telemetry_every", "out": "out",
    "train_subset": "train_subset", "test_subset": "test_subset", "quiet": "quiet", "tensorboard": "tensorboard",
    "checkpoint_every": "checkpoint_every", "sync_bn": "sync_bn", "check_consistency": "check_consistency",
    "grad_compression": "grad_compression", "compile": "compile",
    "lean_allocator": "lean_allocator",
}


# TrainConfig's defaults that --help shows, spelled here so that `--help` needs no torch import (a test checks they
# equal TrainConfig's).
HELP_DEFAULTS = {"model": "lenet5", "dataset": "fashion_mnist_small", "recipe": "swat-u", "density": 0.1,
                 "epochs": 8, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                 "schedule": "cosine", "seed": 0}


def _default(key: str) -> str:
    return f"default {HELP_DEFAULTS[key]:g}" if isinstance(HELP_DEFAULTS[key], float) else \
        f"default {HELP_DEFAULTS[key]}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of defaults (any TrainConfig key); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, YAML-typed; dotted keys reach into dicts, e.g. "
                        "--set recipe_overrides.threshold_period=100")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (or a checkpoint file in it)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help=f"registered model name (see `sparsetrain list models`; {_default('model')})")
    g.add_argument("--dataset", help=f"dataset name (see `sparsetrain list datasets`; {_default('dataset')}: the "
                                     "subset shipped with the package)")
    g.add_argument("--data-dir", help="folder holding the dataset files (or set SPARSETRAIN_DATA)")
    g.add_argument("--width-mult", type=float, help="depth multiplier: scale every conv's channels (Changpinyo)")
    g.add_argument("--train-subset", type=int, help="use only the first N training images")
    g.add_argument("--test-subset", type=int, help="use only the first N test images")
    g = p.add_argument_group("sparsity")
    g.add_argument("--recipe", help=f"preset name or recipe YAML (see `sparsetrain list recipes`; "
                                    f"{_default('recipe')}); a YAML file is recorded in the run by its content")
    dens = g.add_mutually_exclusive_group()
    dens.add_argument("--density", type=float, help=f"kept fraction for the recipe ({_default('density')} with the "
                                                   "default recipe; else the recipe's own)")
    dens.add_argument("--sparsity", type=float, help="1 - density")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"epochs to train ({_default('epochs')}); with --resume: the total "
                                              "to reach")
    g.add_argument("--batch-size", type=int, help=f"training batch; the global batch under torchrun "
                                                  f"({_default('batch_size')})")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                   help="sgd (default; --momentum, --nesterov) or adam/adamw (betas: --set betas=[0.9,0.999])")
    g.add_argument("--lr", type=float, help=f"peak learning rate ({_default('lr')})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum ({_default('momentum')})")
    g.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help=f"L2 weight decay ({_default('weight_decay')})")
    g.add_argument("--wd-exclude-bn-bias", action="store_true", default=None, help="no weight decay on BN and biases")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--l1", type=float, help="L1 regularisation strength on conv/linear weights")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], help=f"learning-rate schedule "
                                                                               f"({_default('schedule')})")
    g.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")], help="epochs, e.g. 50,100")
    g.add_argument("--gamma", type=float, help="step schedule factor")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=f"seed of weights, data order, augmentation ({_default('seed')})")
    g.add_argument("--deterministic", action="store_true", default=None)
    g.add_argument("--channels-last", action="store_true", default=None)
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step (one graph, no graph breaks; the steps that measure "
                        "densities or sample telemetry run eager)")
    g.add_argument("--lean-allocator", action=argparse.BooleanOptionalAction, default=None,
                   help="sparsetrain's caching CPU allocator: the process's RSS follows its live tensors and steps "
                        "stop page-faulting (default on, for dense runs too; see docs/performance.md)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"],
                   help="mixed precision: forward and loss under torch.autocast (fp16 needs CUDA); default none")
    g.add_argument("--log-every", type=int, help="steps between progress updates and NaN/Inf checks (default 50)")
    g.add_argument("--telemetry-every", type=int,
                   help="sample layer sparsity every N steps (0 = off; default: about 20 samples per run)")
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log metrics and telemetry to RUN_DIR/tensorboard "
                        "(needs pip install 'sparsetrain[tensorboard]')")
    g.add_argument("--out", help="run directory (default runs/<model>-<recipe>-<time>)")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars (CI, logs)")
    g.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N steps inside an epoch (a kill then loses at most N steps)")
    g = p.add_argument_group("several processes (under torchrun; see README)")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm: BatchNorm statistics over the global batch (GPU backends only)")
    g.add_argument("--check-consistency", type=int, metavar="K",
                   help="every K steps, checksum weights and weight masks across ranks; stop if they differ")
    g.add_argument("--grad-compression", type=float, metavar="DENSITY",
                   help="all-reduce only the top DENSITY fraction of each gradient bucket, with error feedback "
                        "(default: dense all-reduce)")


def _parse_value(text: str, key: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        from sparsetrain.commands._errors import UsageError, yaml_error_message

        raise UsageError(f"--set {key}={text}: {yaml_error_message(e, '<value>')}") from None


def _check_recipe_file(recipe: Any) -> None:
    """A recipe given as a YAML file (or an example's name) must parse: say file, line and column if not."""
    from pathlib import Path

    from sparsetrain.commands._errors import load_yaml_file
    from sparsetrain.recipe import PRESETS, example_recipe_path

    if not isinstance(recipe, str) or recipe in PRESETS:
        return
    path = Path(recipe) if Path(recipe).is_file() else example_recipe_path(recipe)
    if path is not None and Path(path).is_file():
        load_yaml_file(path, "recipe")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """defaults <- --config file <- explicit flags <- --set; returns the config dict (validated by TrainConfig)."""
    from sparsetrain.commands._errors import UsageError, load_yaml_file
    from sparsetrain.runs import FORMAT_VERSION_KEY
    from sparsetrain.training import TrainConfig

    cfg = TrainConfig().to_dict()
    if args.config:
        loaded = load_yaml_file(args.config, "--config") or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {args.config} must hold a mapping of config keys, got "
                             f"{type(loaded).__name__}")
        loaded.pop(FORMAT_VERSION_KEY, None)  # a run directory's config works as --config: its version is no key
        cfg.update(loaded)
    for flag, key in _FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            cfg[key] = v
    if args.recipe is not None and args.density is None and args.sparsity is None:
        cfg["recipe_overrides"] = {}  # a new recipe brings its own density
    if args.density is not None or args.sparsity is not None:
        overrides = {k: v for k, v in (cfg.get("recipe_overrides") or {}).items() if k not in ("density", "sparsity")}
        overrides["density" if args.density is not None else "sparsity"] = (
            args.density if args.density is not None else args.sparsity)
        cfg["recipe_overrides"] = overrides
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.split(".")
        target = cfg
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = _parse_value(text, key)
    _check_recipe_file(cfg.get("recipe"))
    return _self_contained(cfg)


def _self_contained(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the run directory records it: nothing in it names a path relative to this working directory.

    A recipe file is recorded by its content (``runs.self_contained_recipe``; the run directory's default name
    keeps the file's name), the data folder as an absolute path. ``--resume``, ``export``, ``measure`` and
    ``report`` then work from any folder, even after the recipe file moved or changed.
    """
    from pathlib import Path

    from sparsetrain.runs import RunDir, self_contained_recipe

    recipe = cfg.get("recipe")
    inlined = self_contained_recipe(recipe)
    if inlined is not recipe:
        if cfg.get("out") is None:  # name the run after the file, as for a recipe given by name
            cfg["out"] = str(RunDir.default(str(cfg.get("model")), str(recipe)).path)
        cfg["recipe"] = inlined
    if isinstance(cfg.get("data_dir"), str):
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
    return cfg


def main(args: argparse.Namespace) -> int:
    """Train (or resume); 0 when done, 2 for a bad setting or file, 3 on NaN/Inf, 130 on Ctrl-C."""
    from sparsetrain.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USAGE
    from sparsetrain.commands._errors import USER_ERRORS, describe
    from sparsetrain.distributed import ConsistencyError
    from sparsetrain.training import NonFiniteError, TrainConfig, TrainingInterrupted, format_summary, train

    log = logging.getLogger("sparsetrain")
    try:
        if args.resume:
            cfg = TrainConfig(quiet=bool(args.quiet))
            summary = train(cfg, resume=args.resume, epochs=args.epochs)
        else:
            cfg = TrainConfig.from_dict(resolve_config(args))
            summary = train(cfg)
    except TrainingInterrupted as e:
        print(f"\nsparsetrain train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteError as e:
        log.error("sparsetrain train: %s", e)
        return EXIT_NONFINITE
    except ConsistencyError as e:  # not the user's input: the ranks diverged
        log.error("sparsetrain train: %s", e)
        return EXIT_INTERNAL
    except (*USER_ERRORS, RuntimeError) as e:  # RuntimeError: a damaged checkpoint (runs.load_checkpoint)
        if getattr(args, "verbose", False):
            raise
        log.error("sparsetrain train: %s", describe(e))
        return EXIT_USAGE
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; rank 0 prints it
        print("\nsparsetrain train: finished\n" + format_summary(summary))
    sys.stdout.flush()
    return 0
