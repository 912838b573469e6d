"""What a new user reads first (issue 20, item 6): ``train --help`` defaults, ``list recipes`` / ``list sparsifiers``
descriptions, and ``flops`` beside the SWAT paper's ResNet-50 row and explaining RSS."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparsetrain.cli import build_parser, main
from sparsetrain.commands.list import recipe_description
from sparsetrain.commands.train import HELP_DEFAULTS
from sparsetrain.recipe import example_recipe_path, list_example_recipes
from sparsetrain.sparsifiers import list_sparsifiers
from sparsetrain.training import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())  # unwrapped


def test_train_help_shows_the_defaults_trainconfig_uses():
    cfg = TrainConfig()
    for key, shown in HELP_DEFAULTS.items():
        actual = cfg.recipe_overrides["density"] if key == "density" else getattr(cfg, key)
        assert shown == actual, key
    text = _help("train")
    for flag, fragment in (("--epochs", "(default 8)"), ("--lr", "(default 0.05)"), ("--batch-size", "(default 64)")):
        assert re.search(rf"{flag} \S+ [^-]*{re.escape(fragment)}", text), flag


def test_list_recipes_descriptions_are_whole_sentences(capsys):
    assert main(["list", "recipes"]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    for name in list_example_recipes():
        path = example_recipe_path(name)
        text = recipe_description(path)
        comment = " ".join(ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#"))
        assert text.endswith("."), (name, text)
        assert comment.startswith(text) and text.count("(") == text.count(")"), (name, text)
        assert f"{name} {text}" in listed
    # "Fig. 1" is not the end of a sentence.
    assert recipe_description(example_recipe_path("ablation-forward-weights")).startswith(
        "SWAT Fig. 1 ablation: top-K on the weights in the forward pass only;")


def test_list_sparsifiers_describes_every_type(capsys):
    assert main(["list", "sparsifiers"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in list_sparsifiers():
        assert re.search(rf" {name} [A-Z][^.]*\..* Keys: [a-z_, ]+\.", out), name
        assert f"`{name}`" in README.read_text(), f"{name} missing from the README"
    assert "row_topk Top-K by magnitude within each example" in out


def test_flops_resnet50_shows_the_papers_row_beside_ours(capsys):
    args = ["flops", "--model", "resnet50_imagenet", "--input", "3x224x224", "--recipe", "swat-u"]
    assert main([*args, "--sparsity", "0.9"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("SWAT (Raihan & Aamodt, NeurIPS 2020), Table 3"):]
    assert re.search(r"training FLOPs reduction %\s+85\.6\s+88\.25", block)
    assert re.search(r"inference FLOPs reduction %\s+87\.4\s+87\.40", block)
    assert main([*args, "--sparsity", "0.8", "--json"]) == 0
    paper = json.loads(capsys.readouterr().out)["paper"]
    assert (paper["training_flops_reduction_pct"], paper["inference_flops_reduction_pct"]) == (76.1, 77.7)
    assert main([*args, "--sparsity", "0.7", "--json"]) == 0  # no published row at 70 %
    assert "paper" not in json.loads(capsys.readouterr().out)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_flops_memory_explains_rss_beside_the_analytic_total(capsys):
    assert main(["flops", "--model", "lenet5", "--dataset", "fashion_mnist_small", "--recipe", "swat-u",
                 "--density", "0.1", "--memory", "--batch-size", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "process peak RSS increase" in out
    peak = float(re.search(r"peak = params\+grads\+opt\+saved ([\d.]+)", out).group(1))
    rss = float(re.search(r"process peak RSS increase ([\d.]+)", out).group(1))
    assert f"Process RSS vs the peak: of the {peak:.1f} MiB peak, the parameters" in out
    assert f"Its RSS increase, {rss:.1f} MiB," in out
    assert "the step runs no optimizer" in out
