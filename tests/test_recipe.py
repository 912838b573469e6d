"""Recipes: loading forms, pattern matching rules, presets, and the errors bad recipes raise."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsetrain
from sparsetrain import sparsifiers as sp
from sparsetrain.layers import LayerSpec
from sparsetrain.recipe import Recipe, resolve_layers

RECIPES = sorted((Path(sparsetrain.__file__).resolve().parent / "recipes").glob("*.yaml"))


def net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)),  # 2.0, 2.2
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),  # 5
    )


def test_preset_name_dict_and_override_forms_agree():
    a = Recipe.load("swat-u", density=0.2)
    b = Recipe.load({"preset": "swat-u", "density": 0.2})
    c = Recipe.load({"preset": "swat-u", "sparsity": 0.8})
    assert a == b == c
    assert a.first_layer_dense is True  # SWAT-U default
    m1, m2 = net(), net()
    h1 = sparsetrain.sparsify_(m1, "swat-u", density=0.1)
    h2 = sparsetrain.sparsify_(m2, {"preset": "swat-u", "density": 0.1})
    assert h1.layers == h2.layers
    assert sorted(h1.layers) == ["2.0", "2.2", "5"]
    assert h1.layers["5"].weight == sp.TopK(density=0.1)


def test_to_dict_roundtrip_keeps_overridden_preset_defaults():
    r = Recipe.load("swat-u", density=0.3, first_layer_dense=False, layers={"5": None})
    again = Recipe.load(r.to_dict())
    assert again == r and again.first_layer_dense is False
    assert Recipe.load(r) == r


def test_exact_name_beats_regex_and_first_regex_wins():
    spec_a = {"weight": {"type": "topk", "density": 0.5}}
    spec_b = {"weight": {"type": "topk", "density": 0.25}}
    r = Recipe.load({
        "preset": "swat-u", "density": 0.1, "first_layer_dense": False,
        "layers": {"re:2\\..*": spec_a, "re:2\\.2": spec_b, "2.2": None, "re:5": None},
    })
    out = resolve_layers(net(), r)
    assert out["2.0"][0].weight == sp.TopK(density=0.5)  # first regex
    assert "2.2" not in out  # exact name wins (null = dense) even though listed after the regexes
    assert "5" not in out
    assert out["0"][0].weight == sp.TopK(density=0.1) and out["0"][1] is True  # unmatched -> preset


def test_regex_is_full_match():
    with pytest.raises(ValueError, match=r"layer pattern\(s\) \['re:2'\] match no Conv2d/Linear layer"):
        sparsetrain.sparsify_(net(), {"preset": "swat-u", "layers": {"re:2": None}})


def test_without_preset_only_listed_layers_are_sparse():
    h = sparsetrain.sparsify_(net(), {"layers": {"5": {"grad_output": {"type": "dbtd", "p": 0.95}}}})
    assert list(h.layers) == ["5"]
    assert h.layers["5"] == LayerSpec(grad_output=sp.DBTD(p=0.95))


def test_first_last_and_layer_types():
    r = Recipe.load("swat-u", density=0.5, first_layer_dense=True, last_layer_dense=True)
    assert sorted(resolve_layers(net(), r)) == ["2.0", "2.2"]
    r = Recipe.load("grad-prune")  # convs only
    assert sorted(resolve_layers(net(), r)) == ["0", "2.0", "2.2"]
    r = Recipe.load("swat-u", density=0.5, first_layer_dense=False, layer_types="linear")
    assert sorted(resolve_layers(net(), r)) == ["5"]


def test_gradient_threshold_study_applies_to_every_layer():
    # the paper's scope (default) thresholds in the training loop, after L2: no layer spec is needed
    assert sparsetrain.sparsify_(net(), {"preset": "dense", "gradient_threshold": 1e-3}).layers == {}
    h = sparsetrain.sparsify_(net(), {"preset": "dense", "gradient_threshold": 1e-3,
                                      "gradient_threshold_scope": "layers"})
    assert sorted(h.layers) == ["0", "2.0", "2.2", "5"]
    assert all(s.grad_weight == sp.Threshold(1e-3) and s.weight is None for s in h.layers.values())


@pytest.mark.parametrize("bad, message", [
    ("swat-x", r"unknown preset 'swat-x'; valid presets: dense, grad-prune, meprop, random-channel, swat-channel"),
    ({"preset": "swat-u", "density": 0}, r"recipe: density must be in \(0, 1\], got 0"),
    ({"preset": "swat-u", "density": 1.5}, r"recipe: density must be in \(0, 1\], got 1.5"),
    ({"preset": "swat-u", "density": 0.1, "sparsity": 0.9},
     r"give either density or sparsity, not both \(got density=0.1, sparsity=0.9\)"),
    ({"preset": "swat-u", "densty": 0.1}, r"unknown key\(s\) \['densty'\]; valid keys: preset, density, sparsity"),
    ({"preset": "swat-u", "layers": {"conv9": None}}, r"layer pattern\(s\) \['conv9'\] match no Conv2d/Linear layer; "
                                                      r"layers are: 0, 2.0, 2.2, 5"),
    ({"preset": "swat-u", "distribution": "gaussian"}, r"distribution 'gaussian' is not one of uniform, erk, momentum"),
    ({"preset": "swat-u", "p": 0.9}, r"key 'p' does not apply to preset 'swat-u' \(its parameters: none\)"),
    ({"preset": "grad-prune", "p": 1.2}, r"recipe: p must be in \(0.5, 1\), got 1.2"),
    ({"preset": "grad-prune", "density": 0.5}, r"'grad-prune' is set by p \(the percentile\), not density"),
    ({"preset": "swat-u", "threshold_period": 0}, r"threshold_period must be an integer >= 1, got 0"),
    ({"preset": "swat-u", "freeze_topology_after": "soon"}, r"freeze_topology_after must be an integer \(steps\)"),
    ({"layers": {"0": {"weight": {"type": "topk", "density": 2}}}},
     r"recipe: layers\['0'\].weight: TopK: density must be in \(0, 1\], got 2"),
    ({"layers": {"0": {"wieght": None}}}, r"recipe: layers\['0'\]: unknown key\(s\) \['wieght'\]; valid keys:"),
    ({"layers": {"re:(": None}}, r"recipe: layers\['re:\('\]: invalid regular expression"),
])
def test_bad_recipes_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        sparsetrain.sparsify_(net(), bad)


def test_bad_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        Recipe.load(tmp_path / "nope.yaml")
    f = tmp_path / "r.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        Recipe.load(f)


def test_already_sparsified_model_is_rejected():
    m = net()
    sparsetrain.sparsify_(m, "swat-u")
    with pytest.raises(ValueError, match="already sparsified; call handle.remove"):
        sparsetrain.sparsify_(m, "swat-u")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipes_load_and_apply(path):
    model = sparsetrain.create_model("resnet20", num_classes=10)
    handle = sparsetrain.sparsify_(model, path)
    # the gradient study's paper scope acts in the training loop (after L2), not through layer specs
    loop_only = handle.recipe.gradient_threshold is not None and handle.recipe.gradient_threshold_scope != "layers"
    assert handle.layers or loop_only, f"{path.name} sparsifies nothing"
    # every example recipe round-trips through its dict form
    assert Recipe.load(handle.recipe.to_dict()) == handle.recipe


def test_example_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"swat-u-90", "swat-erk-90", "swat-m-90", "swat-channel", "grad-prune-p90", "random-channel-incremental",
            "tensorquant-gradient-threshold", "ablation-forward-activations", "ablation-backward-meprop",
            "swat-imagenet-period1000", "ablation-freeze-topology", "ablation-mask-inactive"} <= names


@pytest.mark.parametrize("preset", sparsetrain.list_presets())
def test_every_preset_builds_with_defaults(preset):
    h = sparsetrain.sparsify_(net(), preset)
    if preset != "dense":
        assert h.layers
    assert Recipe.load(h.recipe.to_dict()) == h.recipe


# ------------------------------------------------------------------------------------------------ method configs
def test_method_configs_validate_themselves():
    from sparsetrain.methods import GradPruneConfig, RandomChannelConfig, SwatConfig

    with pytest.raises(ValueError, match=r"p must be in \(0.5, 1\), got 1.0"):
        GradPruneConfig(p=1.0)
    with pytest.raises(ValueError, match="placement 'dx' is not one of grad_output, grad_input"):
        GradPruneConfig(placement="dx")
    with pytest.raises(ValueError, match="structure 'blocks' is not one of unstructured, channel"):
        SwatConfig(density=0.1, structure="blocks")
    with pytest.raises(ValueError, match="densify_every must be an integer number of steps >= 1"):
        RandomChannelConfig(density=0.5, densify_every=0)
    assert Recipe.load("swat-channel").method == SwatConfig(density=0.5, structure="channel")
    assert Recipe.load("grad-prune", p=0.95).method == GradPruneConfig(p=0.95)


def test_stacked_methods_share_a_layer_and_round_trip():
    r = Recipe.load({"preset": "swat-u", "density": 0.2, "first_layer_dense": False,
                     "stack": [{"preset": "grad-prune", "p": 0.95, "placement": "grad_output"}]})
    h = sparsetrain.sparsify_(net(), r)
    spec = h.layers["2.0"]
    assert spec.weight == sp.TopK(0.2) and spec.input_for_grad_weight == sp.TopK(0.2)
    assert spec.grad_output == sp.DBTD(p=0.95)
    assert Recipe.load(r.to_dict()) == r
    with pytest.raises(ValueError, match=r"operand 'grad_output' is set by two stacked methods"):
        sparsetrain.sparsify_(net(), {"preset": "meprop", "stack": [{"preset": "grad-prune"}]})
    with pytest.raises(ValueError, match=r"recipe: stack\[grad-prune\]: key 'density' does not apply|is set by p"):
        Recipe.load({"preset": "swat-u", "stack": [{"preset": "grad-prune", "density": 0.5}]})


def test_layer_entries_may_name_a_method_or_a_list():
    h = sparsetrain.sparsify_(net(), {"preset": "dense", "layers": {
        "0": {"preset": "swat-u", "density": 0.5},
        "2.0": [{"preset": "swat-u", "density": 0.25}, {"grad_output": {"type": "dbtd", "p": 0.9}}],
    }})
    assert h.layers["0"].weight == sp.TopK(0.5)
    assert h.layers["2.0"].weight == sp.TopK(0.25) and h.layers["2.0"].grad_output == sp.DBTD(p=0.9)


def test_conv_subclasses_are_layers_too():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), MyConv(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    h = sparsetrain.sparsify_(model, "swat-u", density=0.5)
    assert "2" in h.layers
    h.remove()
    assert type(model[2]) is MyConv


def test_first_and_last_layer_come_from_model_metadata():
    from types import SimpleNamespace

    from sparsetrain.recipe import first_and_last_layers

    m = net()
    assert first_and_last_layers(m) == ("0", "5")  # registration order
    m.default_cfg = SimpleNamespace(first_conv="2.0", classifier="2.2")
    assert first_and_last_layers(m) == ("2.0", "2.2")
    r = Recipe.load("swat-u", density=0.5, first_layer_dense=True, last_layer_dense=True)
    assert sorted(resolve_layers(m, r)) == ["0", "5"]


def test_example_recipes_are_shipped_and_loadable_by_name():
    from sparsetrain.recipe import list_example_recipes

    names = list_example_recipes()
    assert len(names) >= 13 and "ablation-freeze-topology" in names
    assert Recipe.load("ablation-freeze-topology") == Recipe.load("ablation-freeze-topology.yaml")
    assert Recipe.load("swat-u-90.yaml").density == pytest.approx(0.1)
    with pytest.raises(FileNotFoundError, match="example recipes, usable by name: ablation-backward-meprop"):
        Recipe.load("no-such-recipe.yaml")


def test_malformed_yaml_recipe_names_file_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("preset: swat-u\ndensity: [0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml:3:1: not valid YAML"):
        Recipe.load(f)
