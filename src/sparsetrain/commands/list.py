"""``sparsetrain list models|recipes|datasets|sparsifiers``."""

from __future__ import annotations

import argparse

HELP = "list registered models, recipes (presets and example YAML), datasets or sparsifiers"

WHAT = ("models", "recipes", "datasets", "sparsifiers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="what to list")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch filter for models, e.g. 'resnet*'")


def main(args: argparse.Namespace) -> int:
    if args.what == "models":
        from sparsetrain.models import list_models

        for name in list_models(args.pattern):
            print(name)
        print("torchvision:NAME  (any torchvision model; needs pip install 'sparsetrain[torchvision]')")
    elif args.what == "recipes":
        from sparsetrain.recipe import PRESETS

        print("presets (use --recipe NAME):")
        for name in sorted(PRESETS):
            print(f"  {name:<16} {PRESETS[name].description}")
        from sparsetrain.recipe import example_recipe_path, list_example_recipes

        print("example recipes, shipped with the package (use --recipe NAME):")
        for name in list_example_recipes():
            f = example_recipe_path(name)
            assert f is not None
            first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            print(f"  {name:<34} {first}")
    elif args.what == "datasets":
        from sparsetrain.data import dataset_info, list_datasets

        for name in list_datasets():
            info = dataset_info(name)
            print(f"{name:<20} {info.num_classes:>4} classes  {info.channels}x{info.image_size}x{info.image_size}  "
                  f"{info.description}")
    else:
        from sparsetrain.sparsifiers import list_sparsifiers

        for name in list_sparsifiers():
            print(name)
    return 0
