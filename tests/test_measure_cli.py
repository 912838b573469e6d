"""Tests for the inference sparsity tables (sparsetrain.telemetry.inference) and `sparsetrain measure`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import sparsetrain
from sparsetrain.analysis import make_evaluator
from sparsetrain.telemetry.inference import measure_sparsity, resolve_thresholds


class _Small(nn.Module):
    """conv1 - ReLU - block.conv_a - ReLU - block.conv_b - ReLU - pool - fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential()
        self.block.add_module("conv_a", nn.Conv2d(4, 6, 3, padding=1))
        self.block.add_module("relu", nn.ReLU())
        self.block.add_module("conv_b", nn.Conv2d(6, 6, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.block(x))
        return self.fc(x.mean((2, 3)))


def _setup():
    torch.manual_seed(0)
    model = _Small().eval()
    with torch.no_grad():
        model.conv1.weight[0] = 0.0  # 9 of 36 weights zero
        model.block.conv_a.weight[:3] = 0.0  # 108 of 216
    x = torch.randn(40, 1, 6, 6)
    with torch.no_grad():
        model.fc.bias -= model(x).mean(0)  # centre the logits so that predictions vary between classes
        y = model(x).argmax(1)  # labels the model gets right: baseline accuracy is exactly 1
    assert len(set(y.tolist())) >= 2
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    return model, batches


def _inputs(model, batches, name):
    """Every input the named layer receives over the batches (plain hooks, independent of the Monitor)."""
    seen = []
    h = dict(model.named_modules())[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
    h.remove()
    return torch.cat([s.flatten() for s in seen]), correct / sum(len(y) for _, y in batches)


def test_measure_sparsity_without_enforcement():
    model, batches = _setup()
    report = measure_sparsity(model, make_evaluator(batches))
    assert report.baseline_accuracy == 1.0 and report.enforced_accuracy is None and report.num_samples == 40
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["conv1", "block.conv_a", "block.conv_b", "fc"]
    assert rows["conv1"].weight_sparsity == pytest.approx(9 / 36)
    assert rows["block.conv_a"].weight_sparsity == pytest.approx(108 / 216)
    assert rows["conv1"].act_numel == 36 and rows["block.conv_a"].act_numel == 4 * 36
    x_a, _ = _inputs(model, batches, "block.conv_a")
    assert rows["block.conv_a"].input_sparsity == pytest.approx(float((x_a == 0).sum()) / x_a.numel())
    blocks = {r.name: r for r in report.blocks}
    assert set(blocks) == {"block", "(total)"}
    assert blocks["block"].type == "2 layers"
    assert blocks["block"].weight_numel == 216 + 36
    assert blocks["block"].weight_sparsity == pytest.approx(108 / (216 + 36))  # element-weighted (eq. 5)
    assert blocks["block"].input_sparsity == rows["block.conv_b"].input_sparsity  # the last layer's activation
    assert blocks["(total)"].weight_sparsity == pytest.approx((9 + 108) / (36 + 216 + 36 + 18))
    text = report.format()
    assert "w sparsity" in text and "w enforced" not in text and "accuracy on 40 images: 1.0000" in text
    json.dumps(report.to_dict())


def test_measure_sparsity_with_thresholds_matches_independent_counts():
    model, batches = _setup()
    w_thr, a_thr = 0.05, {"block.conv_b": 0.3, "fc": 0.05}
    report = measure_sparsity(model, make_evaluator(batches), weight_thresholds=w_thr, act_thresholds=a_thr)
    rows = {r.name: r for r in report.layers}
    # Enforcement through sparsify_, checked against an independently sparsified copy.
    ref = copy.deepcopy(model)
    layers = {n: {"weight": {"type": "threshold", "threshold": w_thr}} for n in rows}
    for n, t in a_thr.items():
        layers[n]["input"] = {"type": "threshold", "threshold": t}
    sparsetrain.sparsify_(ref, {"layers": layers})
    for name, r in rows.items():
        w = dict(model.named_modules())[name].weight.detach()
        assert r.weight_threshold == w_thr
        assert r.weight_sparsity == pytest.approx(float((w == 0).sum()) / w.numel())
        assert r.weight_enforced == pytest.approx(float((w.abs() <= w_thr).sum()) / w.numel())
        x, acc = _inputs(ref, batches, name)
        if name in a_thr:
            assert r.act_threshold == a_thr[name]
            assert r.input_enforced == pytest.approx(float((x.abs() <= a_thr[name]).sum()) / x.numel())
        else:
            assert r.act_threshold is None
            assert r.input_enforced == pytest.approx(float((x == 0).sum()) / x.numel())
    assert report.enforced_accuracy == pytest.approx(acc)
    assert report.enforced_accuracy < 1.0  # the enforcement's effect is measured, not assumed
    blocks = {r.name: r for r in report.blocks}
    assert blocks["block"].weight_enforced == pytest.approx(
        (rows["block.conv_a"].weight_enforced * 216 + rows["block.conv_b"].weight_enforced * 36) / 252
    )
    assert blocks["block"].input_enforced == rows["block.conv_b"].input_enforced
    text = report.format()
    assert "w enforced" in text and "in enforced" in text and "% of baseline" in text
    assert json.loads(json.dumps(report.to_dict()))["relative_accuracy"] == pytest.approx(report.enforced_accuracy)


def test_global_activation_threshold_skips_first_layer():
    names = ["conv1", "conv2", "fc"]
    assert resolve_thresholds(0.1, names, skip_first=True) == {"conv2": 0.1, "fc": 0.1}
    assert resolve_thresholds(0.1, names) == {"conv1": 0.1, "conv2": 0.1, "fc": 0.1}
    assert resolve_thresholds({"conv1": 0.5}, names, skip_first=True) == {"conv1": 0.5}
    with pytest.raises(ValueError, match="valid names: conv1, conv2, fc"):
        resolve_thresholds({"conv9": 0.5}, names)
    with pytest.raises(ValueError, match=">= 0"):
        resolve_thresholds(-1.0, names)


def test_cli_arguments_and_errors(capsys):
    from sparsetrain.cli import build_parser, main

    args = build_parser().parse_args(
        [
            "measure",
            "runs/x",
            "--search",
            "activation",
            "--margin",
            "0.99",
            "--output",
            "r.yaml",
            "--batches",
            "3",
            "--json",
        ]
    )
    assert (args.run, args.search, args.margin, args.output, args.batches, args.json) == (
        "runs/x",
        "activation",
        0.99,
        "r.yaml",
        3,
        True,
    )
    assert main(["measure", "runs/x", "--output", "r.yaml"]) == 2
    assert "--output writes a searched recipe" in capsys.readouterr().err
    assert main(["measure", "runs/x", "--margin", "1.5"]) == 2
    assert "--margin must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["measure", "runs/x", "--search", "gradient"])


class _FakeRun:
    """Stands in for ``sparsetrain.runs.Run`` (fields config, model, info; method sparsify())."""

    def __init__(self, model, recipe="dense", density=None):
        self.model = model
        self.config = {"model": "lenet5", "dataset": "fashion_mnist_small", "data_dir": None, "recipe": recipe,
                       "recipe_overrides": {"density": density} if density else {}}
        self.info = None

    def sparsify(self):
        return sparsetrain.sparsify_(self.model, self.config["recipe"], **self.config["recipe_overrides"])


@pytest.fixture(scope="module")
def fmnist_model():
    """LeNet-5 trained for one pass over 2000 images of the built-in Fashion-MNIST subset."""
    from sparsetrain.data import make_loaders

    train, _, _ = make_loaders("fashion_mnist_small", batch_size=50, augment=False, train_subset=2000)
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in train:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _fake_runs(monkeypatch, run):
    import sys
    import types

    from sparsetrain import runs

    mod = types.ModuleType("sparsetrain.runs")
    mod.__dict__.update({k: v for k, v in vars(runs).items() if not k.startswith("__")})  # the rest stays real
    mod.load_run = lambda path: run
    monkeypatch.setitem(sys.modules, "sparsetrain.runs", mod)


def test_cli_measure_and_search_with_a_stand_in_run(monkeypatch, tmp_path, capsys, fmnist_model):
    from sparsetrain.cli import main

    _fake_runs(monkeypatch, _FakeRun(copy.deepcopy(fmnist_model)))
    out = tmp_path / "recipe.yaml"
    assert main(["measure", "some/run", "--search", "weight", "--margin", "0.98", "--batches", "2",
                 "--batch-size", "100", "--output", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rep, search = data["report"], data["search"]
    assert rep["num_samples"] == 200 and search["baseline_accuracy"] == rep["baseline_accuracy"] > 0.5
    found = {n: v["threshold"] for n, v in search["layers"].items() if v["threshold"] is not None}
    assert found and rep["weight_thresholds"] == found
    assert rep["enforced_accuracy"] == pytest.approx(search["combined_accuracy"])
    assert rep["enforced_accuracy"] / rep["baseline_accuracy"] >= 0.9
    # The written recipe reproduces the reported enforced weight sparsity of every layer.
    model = copy.deepcopy(fmnist_model)
    handle = sparsetrain.sparsify_(model, str(out))
    assert set(handle.layers) == set(found)
    for row in rep["layers"]:
        m = dict(model.named_modules())[row["name"]]
        w = m.effective_weight() if row["name"] in found else m.weight.detach()
        assert row["weight_enforced"] == pytest.approx(float((w == 0).sum()) / w.numel())
    assert data["recipe"]["layers"].keys() == search["layers"].keys()

    # Tables with fixed thresholds.
    assert main(["measure", "some/run", "--weight-threshold", "0.01", "--act-threshold", "0.1", "--batches", "1",
                 "--batch-size", "100"]) == 0
    text = capsys.readouterr().out
    assert "w enforced" in text and "conv1" in text and "(total)" in text and "accuracy on 100 images" in text


def test_cli_measures_a_sparse_run_as_trained(monkeypatch, capsys, fmnist_model):
    from sparsetrain.cli import main

    _fake_runs(monkeypatch, _FakeRun(copy.deepcopy(fmnist_model), recipe="swat-u", density=0.3))
    assert main(["measure", "some/run", "--batches", "1", "--batch-size", "100", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["report"]["layers"]}
    # Measured as trained: every layer swat-u sparsifies shows its top-K forward weight (~70% zeros at density
    # 0.3), the layers it leaves dense show 0%.
    ref = copy.deepcopy(fmnist_model)
    handle = sparsetrain.sparsify_(ref, "swat-u", density=0.3)
    for name, r in rows.items():
        expected = 0.7 if name in handle.layers else 0.0
        assert r["weight_sparsity"] == pytest.approx(expected, abs=0.01)
    _fake_runs(monkeypatch, _FakeRun(copy.deepcopy(fmnist_model), recipe="swat-u", density=0.3))
    assert main(["measure", "some/run", "--batches", "1", "--batch-size", "100", "--json", "--dense"]) == 0
    rows = json.loads(capsys.readouterr().out)["report"]["layers"]
    assert all(r["weight_sparsity"] == 0.0 for r in rows)


def test_cli_on_a_trained_run(tmp_path, capsys):
    """End to end: `sparsetrain train` writes a run (with telemetry), `sparsetrain measure` reads it."""
    from sparsetrain.cli import main
    from sparsetrain.files import read_jsonl
    from sparsetrain.runs import load_run

    run_dir = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--dataset", "fashion_mnist_small", "--epochs", "1", "--recipe",
                 "dense", "--train-subset", "1000", "--test-subset", "200", "--batch-size", "50", "--lr", "0.05",
                 "--telemetry-every", "5", "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    # The training loop's telemetry: one sample every 5 of the 20 steps, six tensors per layer (the first layer's
    # input needs no gradient, so it has no grad_input).
    tel = read_jsonl(run_dir / "telemetry.jsonl")
    assert sorted({r["step"] for r in tel}) == [0, 5, 10, 15]
    at0 = {(r["name"], r["tensor"]) for r in tel if r["step"] == 0 and r["kind"] == "layer"}
    assert len(at0) == 5 * 6 - 1 and ("conv1", "grad_input") not in at0
    assert all(r["numel"] == 50 * 784 for r in tel if (r["name"], r["tensor"]) == ("conv1", "input"))

    out = tmp_path / "recipe.yaml"
    assert main(["measure", str(run_dir), "--search", "weight", "--margin", "0.98", "--batches", "4",
                 "--batch-size", "100", "--output", str(out), "--json", "--full-test-set"]) == 0
    data = json.loads(capsys.readouterr().out)
    rep, search = data["report"], data["search"]
    assert rep["num_samples"] == 400  # --full-test-set: beyond the run's 200 test images, up to --batches 4
    found = {n: v["threshold"] for n, v in search["layers"].items() if v["threshold"] is not None}
    assert rep["weight_thresholds"] == found
    assert rep["enforced_accuracy"] == pytest.approx(search["combined_accuracy"])
    handle = sparsetrain.sparsify_(load_run(run_dir).model, str(out))
    assert set(handle.layers) == set(found)

    assert main(["measure", str(run_dir / "checkpoint.pt"), "--weight-threshold", "0.01", "--act-threshold", "0.1",
                 "--batches", "3", "--batch-size", "100"]) == 0
    text = capsys.readouterr().out
    assert "w enforced" in text and "conv1" in text and "(total)" in text
    # by default the run's own test subset (200 images), not --batches 3 x 100 of the whole test split
    assert "accuracy on 200 images" in text and "first 200 test images" in text
