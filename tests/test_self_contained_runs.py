"""A run directory is self-contained (issue 20, item 1): the recipe recorded at the start is the one ``--resume``,
``export``, ``measure`` and ``report`` use, and nothing re-reads a path relative to the working directory the run was
started from."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sparsetrain.cli import main
from sparsetrain.runs import RunDir, load_run, self_contained_recipe

RECIPE = {"preset": "swat-u", "density": 0.3, "layers": {"fc": None}}
TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch-size", "64", "--quiet"]


def _write_recipe(folder) -> None:
    (folder / "recipes").mkdir()
    (folder / "recipes" / "r.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))


def test_self_contained_recipe_inlines_files_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_recipe(tmp_path)
    assert self_contained_recipe("recipes/r.yaml") == RECIPE
    assert self_contained_recipe(tmp_path / "recipes" / "r.yaml") == RECIPE  # a PathLike too
    assert self_contained_recipe("swat-u") == "swat-u"  # a preset is part of the package
    assert self_contained_recipe("swat-u-90") == "swat-u-90"  # so is a shipped example
    assert self_contained_recipe("missing.yaml") == "missing.yaml"  # left for Recipe.load to report
    (tmp_path / "swat-u-90.yaml").write_text("preset: dense\n")  # a local file wins over the example, as in load
    assert self_contained_recipe("swat-u-90.yaml") == {"preset": "dense"}


def test_relative_recipe_run_resumes_exports_measures_and_reports_from_elsewhere(tmp_path, monkeypatch, capsys):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    _write_recipe(start)
    monkeypatch.chdir(start)
    assert main(["train", "--recipe", "recipes/r.yaml", "--data-dir", ".", "--dataset", "fashion_mnist_small",
                 "--out", "run", *TINY]) == 0
    run = RunDir(start / "run")
    config = run.read_config()
    assert config["recipe"] == RECIPE  # the file's content, not its path
    assert config["data_dir"] == str(start.resolve())  # absolute, not "."
    # The file is gone (or changed) and we are in another folder: nothing may look for recipes/r.yaml again.
    (start / "recipes" / "r.yaml").write_text("preset: [broken\n")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(run.path), "--epochs", "2", "--quiet"]) == 0
    assert len(run.read_metrics()) == 2
    assert run.read_config()["recipe"] == RECIPE
    assert main(["export", str(run.path)]) == 0
    assert run.sparse_model_path.is_file()
    capsys.readouterr()
    assert main(["measure", str(run.path), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["run"] == str(run.path) and measured["report"]
    assert main(["report", str(run.path), "--no-plots"]) == 0
    assert "swat-u" in (run.report_dir / RunDir.REPORT_MARKDOWN).read_text()


def test_default_run_name_keeps_the_recipe_files_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_recipe(tmp_path)
    assert main(["train", "--recipe", "recipes/r.yaml", *TINY]) == 0
    (run,) = RunDir.find(tmp_path / "runs")
    assert run.path.name.startswith("lenet5-r-")
    assert run.read_config()["recipe"] == RECIPE


def test_export_and_measure_use_the_checkpoints_recipe_not_the_configs_path(tmp_path, monkeypatch):
    """A run recorded before recipes were inlined names a relative path; its checkpoint holds the resolved recipe."""
    monkeypatch.chdir(tmp_path)
    _write_recipe(tmp_path)
    assert main(["train", "--recipe", "recipes/r.yaml", "--out", "old", *TINY]) == 0
    run = RunDir(tmp_path / "old")
    config = run.read_config()
    run.write_config({**config, "recipe": "recipes/r.yaml"})  # as older versions wrote it
    (tmp_path / "recipes" / "r.yaml").unlink()
    loaded = load_run(run.path)
    handle = loaded.sparsify()
    assert "fc" not in handle.layers and handle.recipe.density == pytest.approx(0.3)
    ckpt = torch.load(run.checkpoint_path, weights_only=True)
    assert handle.recipe.to_dict() == ckpt["sparsity"]["recipe"]
    assert main(["export", str(run.path)]) == 0


def test_python_api_records_the_recipes_content(tmp_path, monkeypatch):
    from sparsetrain.training import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    _write_recipe(tmp_path)
    train(TrainConfig(recipe="recipes/r.yaml", recipe_overrides={}, epochs=1, train_subset=256, test_subset=128,
                      out="api", quiet=True))
    assert RunDir(tmp_path / "api").read_config()["recipe"] == RECIPE
