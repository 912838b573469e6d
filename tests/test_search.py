"""Tests for the TensorQuant per-layer threshold search (sparsetrain.analysis.search), on real MNIST."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import sparsetrain
from sparsetrain.analysis import (
    SEARCH_OPERANDS,
    bake_sparse_weights,
    halving_search,
    make_evaluator,
    search_thresholds,
    threshold_recipe,
)
from sparsetrain.layers import OPERANDS, effective_weight, is_sparse_layer
from sparsetrain.telemetry import apply_thresholds


def _load_mnist(folder: Path, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(folder / f"{split}.npz") as d:
        x = torch.from_numpy(d["x"][:n]).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(d["y"][:n]).long()
    return (x - 0.1307) / 0.3081, y


def _accuracy(model: nn.Module, batches) -> float:
    """Independent evaluation loop (not the library's Evaluator)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@pytest.fixture(scope="module")
def trained(require_dataset):
    """LeNet-5 trained for one epoch on 4000 MNIST images, and 1000 test images in 4 batches."""
    mnist = require_dataset("mnist")
    x, y = _load_mnist(mnist, "train", 4000)
    xt, yt = _load_mnist(mnist, "test", 1000)
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    model.train()
    for i in range(0, len(x), 32):
        idx = perm[i : i + 32]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [(xt[i : i + 250], yt[i : i + 250]) for i in range(0, 1000, 250)]
    acc = _accuracy(model, batches)
    assert acc > 0.8, f"LeNet-5 trained too poorly for a meaningful search: {acc}"
    return model, batches


def test_halving_search_semantics():
    # Accuracy holds for thr <= 0.1: the first power of two below it is 1/16.
    calls = []

    def acc_at(t):
        calls.append(t)
        return 0.95 if t <= 0.1 else 0.5

    thr, tried = halving_search(acc_at, baseline=0.95, margin=0.999)
    assert thr == 1 / 16 and calls == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert tried[-1] == (0.0625, 0.95)
    # Never holds: every power of two >= 1e-5 is tried (2^0 .. 2^-16), then "cannot be sparsified".
    thr, tried = halving_search(lambda t: 0.0, baseline=0.9, margin=0.99)
    assert thr is None and len(tried) == 17 and tried[-1][0] == 2.0**-16 >= 1e-5 > 2.0**-17
    # The margin is relative: 0.891 / 0.9 = 0.99 holds at margin 0.99.
    assert halving_search(lambda t: 0.891, baseline=0.9, margin=0.99)[0] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        halving_search(lambda t: 1.0, baseline=0.0)
    with pytest.raises(ValueError, match="margin"):
        halving_search(lambda t: 1.0, baseline=1.0, margin=1.5)


def test_default_margin_keeps_accuracy_unchanged():
    # TensorQuant's scripts accept a threshold only if accuracy is unchanged (margin 1.0); 0.999 is the looser option.
    from sparsetrain.analysis import DEFAULT_MARGIN

    def acc_at(t):
        return 0.9 if t <= 0.1 else 0.8996  # 0.8996 / 0.9 = 0.99956: holds at 0.999, not at 1.0

    assert DEFAULT_MARGIN == 1.0
    assert halving_search(acc_at, baseline=0.9)[0] == 1 / 16
    assert halving_search(acc_at, baseline=0.9, margin=0.999)[0] == 1.0


def test_threshold_recipe_loads_with_sparsify():
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    recipe = threshold_recipe({"conv1": 0.05, "fc": None}, operand="weight")
    assert recipe == {"layers": {"conv1": {"weight": {"type": "threshold", "threshold": 0.05}}, "fc": None}}
    handle = sparsetrain.sparsify_(model, recipe)
    assert list(handle.layers) == ["conv1"]
    w = model.conv1.weight.detach()
    assert torch.equal(effective_weight(model.conv1), w * (w.abs() > 0.05))
    with pytest.raises(ValueError, match="operand"):
        threshold_recipe({"conv1": 0.1}, operand="output")
    assert set(SEARCH_OPERANDS) == {"weight", "input"} and set(SEARCH_OPERANDS) <= set(OPERANDS)


@pytest.mark.slow  # trains LeNet-5 on real MNIST (module fixture) and searches
def test_weight_search_on_mnist(trained, tmp_path):
    model, batches = trained
    before = copy.deepcopy(model.state_dict())
    evaluate = make_evaluator(batches)
    result = search_thresholds(model, evaluate, operand="weight", margin=0.99)
    # The searched model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(is_sparse_layer(m) for m in model.modules())

    baseline = _accuracy(model, batches)
    assert result.baseline_accuracy == pytest.approx(baseline)
    assert list(result.layers) == ["conv1", "conv2", "fc1", "fc2", "fc"]
    assert result.thresholds, "no layer could be sparsified at all"
    for name, r in result.layers.items():
        w = dict(model.named_modules())[name].weight.detach()
        assert r.numel == w.numel() and r.baseline_sparsity == 0.0
        if r.threshold is None:
            assert r.evaluations == 17 and all(a / baseline < 0.99 for _, a in r.tried)
            continue
        # Each threshold alone holds the margin (re-evaluated independently) ...
        alone = copy.deepcopy(model)
        sparsetrain.sparsify_(alone, threshold_recipe({name: r.threshold}))
        acc = _accuracy(alone, batches)
        assert acc == pytest.approx(r.accuracy) and acc / baseline >= 0.99
        assert r.sparsity == pytest.approx(float((w.abs() <= r.threshold).sum()) / w.numel())
        # ... and it is the first power of two that does: the threshold tried before it failed.
        assert r.threshold == 2.0 ** -(r.evaluations - 1)
        if r.threshold < 1.0:
            twice = copy.deepcopy(model)
            sparsetrain.sparsify_(twice, threshold_recipe({name: 2 * r.threshold}))
            assert _accuracy(twice, batches) / baseline < 0.99

    # The emitted YAML loads with sparsify_ and reproduces the reported sparsities and combined accuracy.
    path = result.save_recipe(tmp_path / "recipe.yaml")
    text = path.read_text()
    assert text.startswith("# TensorQuant per-layer threshold search")
    assert yaml.safe_load(text) == result.to_recipe()
    combined = copy.deepcopy(model)
    handle = sparsetrain.sparsify_(combined, str(path))
    assert set(handle.layers) == set(result.thresholds)
    mods = dict(combined.named_modules())
    zeros = numel = 0
    for name in result.layers:
        ew = effective_weight(mods[name])  # the plain weight for the layers left dense
        s = float((ew == 0).sum()) / ew.numel()
        assert s == pytest.approx(result.combined_sparsity[name])
        zeros += int((ew == 0).sum())
        numel += ew.numel()
    assert result.combined_total_sparsity == pytest.approx(zeros / numel)
    assert result.combined_total_sparsity > 0.2  # LeNet weights tolerate substantial thresholding
    assert result.combined_accuracy == pytest.approx(_accuracy(combined, batches))
    # Layer, block and total records of the combined evaluation are kept for tables.
    kinds = {(r["kind"], r["name"]) for r in result.combined_records}
    assert ("block", "(total)") in kinds and ("layer", "conv1") in kinds
    d = result.to_dict()
    assert d["combined_accuracy"] == result.combined_accuracy and set(d["layers"]) == set(result.layers)


@pytest.mark.slow  # trains LeNet-5 on real MNIST (module fixture) and searches
def test_activation_search_on_mnist(trained):
    model, batches = trained
    evaluate = make_evaluator(batches[:2])  # 500 images: the activation search is cheap, keep it so
    result = search_thresholds(model, evaluate, operand="input", margin=0.99)
    # The first layer's input is the image: not searched by default.
    assert list(result.layers) == ["conv2", "fc1", "fc2", "fc"]
    baseline = _accuracy(model, batches[:2])
    # ReLU already zeroes many inputs (TensorQuant's observation); the search adds more on top.
    assert 0.2 < result.baseline_total_sparsity < result.combined_total_sparsity
    for name, r in result.layers.items():
        if r.threshold is None:
            continue
        alone = copy.deepcopy(model)
        sparsetrain.sparsify_(alone, threshold_recipe({name: r.threshold}, operand="input"))
        assert _accuracy(alone, batches[:2]) / baseline >= 0.99
    # Enforced input sparsity of the combined model, counted independently with a plain pre-hook.
    combined = copy.deepcopy(model)
    sparsetrain.sparsify_(combined, result.to_recipe())
    name = next(iter(result.thresholds))
    thr = result.thresholds[name]
    counts = [0, 0]

    def grab(mod, args):
        counts[0] += int((args[0].abs() <= thr).sum())
        counts[1] += args[0].numel()

    h = dict(combined.named_modules())[name].register_forward_pre_hook(grab)
    acc = _accuracy(combined, batches[:2])
    h.remove()
    assert result.combined_sparsity[name] == pytest.approx(counts[0] / counts[1])
    assert result.combined_accuracy == pytest.approx(acc)
    assert result.layers[name].numel == counts[1] // 500


def test_bake_and_apply_thresholds():
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.3)
    mods = dict(model.named_modules())
    expected = {n: effective_weight(mods[n]).clone() for n in handle.layers}
    with pytest.raises(ValueError, match="dense model"):
        apply_thresholds(model, weight={"conv1": 0.1})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        y_sparse = model.eval()(x)
    assert bake_sparse_weights(handle) == []  # SWAT's forward activations are dense: nothing lost
    for name, m in model.named_modules():
        assert type(m) in (nn.Conv2d, nn.Linear) or not isinstance(m, (nn.Conv2d, nn.Linear))
        if name in expected:
            assert torch.equal(m.weight.detach(), expected[name])
            assert 0.6 < float((m.weight == 0).float().mean()) < 0.8  # 30 % of each baked weight kept
    with torch.no_grad():
        assert torch.allclose(model(x), y_sparse, atol=1e-6)  # the baked dense model computes the sparse forward
    clone = apply_thresholds(model, weight={"fc1": 1e9})
    assert float(effective_weight(clone.fc1).abs().sum()) == 0.0
    assert float(model.fc1.weight.detach().abs().sum()) > 0  # original untouched


def test_bake_reports_activation_sparsity_as_lost():
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    recipe = {"layers": {"conv2": {"weight": {"type": "threshold", "threshold": 0.05},
                                   "input": {"type": "threshold", "threshold": 0.1}}}}
    handle = sparsetrain.sparsify_(model, recipe)
    w = model.conv2.weight.detach().clone()
    assert bake_sparse_weights(handle) == ["conv2"]  # the input threshold is not part of a dense model
    assert type(model.conv2) is nn.Conv2d and torch.equal(model.conv2.weight.detach(), w * (w.abs() > 0.05))
