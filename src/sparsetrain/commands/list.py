"""``sparsetrain list models|recipes|datasets|sparsifiers``."""

from __future__ import annotations

import argparse
import re
import shutil
import textwrap
from pathlib import Path

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
        from sparsetrain.recipe import PRESETS, example_recipe_path, list_example_recipes

        print("presets (use --recipe NAME):")
        for name in sorted(PRESETS):
            _print_entry(name, PRESETS[name].description, 16)
        print("example recipes, shipped with the package (use --recipe NAME):")
        for name in list_example_recipes():
            path = example_recipe_path(name)
            assert path is not None
            _print_entry(name, recipe_description(path), 34)
    elif args.what == "datasets":
        from sparsetrain.data import dataset_info, list_datasets

        for name in list_datasets():
            info = dataset_info(name)
            print(f"{name:<20} {info.num_classes:>4} classes  {info.channels}x{info.image_size}x{info.image_size}  "
                  f"{info.description}")
    else:
        from sparsetrain.sparsifiers import list_sparsifiers

        print("sparsifier types, for `type:` in a recipe's layer specs (e.g. weight: {type: topk, density: 0.1}):")
        for name in list_sparsifiers():
            description, params = sparsifier_description(name)
            _print_entry(name, f"{description} Keys: {', '.join(params) or 'none'}.", 16)
    return 0


def _print_entry(name: str, description: str, width: int) -> None:
    """``  name  description``, the description wrapped under itself to the terminal's width (at most 120)."""
    columns = min(120, shutil.get_terminal_size((100, 24)).columns)
    indent = " " * (width + 3)
    lines = textwrap.wrap(description, max(40, columns - len(indent)), break_on_hyphens=False) or [""]
    print(f"  {name:<{width}} {lines[0]}")
    for line in lines[1:]:
        print(indent + line)


# A sentence ends at a full stop before a space or the end; "Fig. 1", "e.g. x", "et al. x" do not end one.
_SENTENCE_END = re.compile(r"(?<!\bFig)(?<!\be\.g)(?<!\bi\.e)(?<!\bal)\.(?=\s|$)")


def recipe_description(path: str | Path) -> str:
    """The first sentence of a recipe file's leading comment block (its lines joined), never cut mid-sentence.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.yaml"
        >>> _ = p.write_text("# SWAT Fig. 1 ablation: top-K in the forward pass,\\n# 90% sparsity. Stem dense.\\npreset: dense\\n")
        >>> recipe_description(p)
        'SWAT Fig. 1 ablation: top-K in the forward pass, 90% sparsity.'
    """
    comment = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line[1:].strip())
    text = " ".join(part for part in comment if part)
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def sparsifier_description(name: str) -> tuple[str, list[str]]:
    """The first sentence of a sparsifier config's docstring and its parameter names."""
    import dataclasses

    from sparsetrain import sparsifiers

    # The registry maps names to config types; sparsifiers has no public accessor for the type yet.
    cfg_type = sparsifiers._BY_NAME[name]
    doc = " ".join((cfg_type.__doc__ or "").split("\n\n")[0].replace("``", "").split())
    end = _SENTENCE_END.search(doc)
    return (doc[: end.end()] if end else doc), [f.name for f in dataclasses.fields(cfg_type)]
