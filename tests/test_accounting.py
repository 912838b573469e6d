"""FLOP and memory accounting: FlopCounterMode cross-checks, hand-computed examples, SWAT's ResNet-50 figures."""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sparsetrain
from sparsetrain.accounting import FlopReport, count_flops, format_table
from sparsetrain.accounting.memory import measure_saved_tensors, memory_report, storage_bytes
from sparsetrain.accounting.non_gemm import quickselect_comparisons_per_element
from sparsetrain.layers import effective_weight
from sparsetrain.models import get_model_cfg
from sparsetrain.runs import RunDir

GEMM_OPS = {"aten.convolution", "aten.addmm", "aten.mm", "aten.convolution_backward"}


MODELS = sparsetrain.list_models()


def _shape(name: str) -> tuple[int, ...]:
    shape = get_model_cfg(name).input_size
    assert shape is not None, f"registered model {name!r} declares no input_size"
    return shape


def test_model_parametrization_is_not_empty() -> None:
    # The per-model tests below are parametrized over the registry: an empty registry must fail, not pass vacuously.
    assert "lenet5" in MODELS and "resnet50_imagenet" in MODELS


def _op_counts(fc: FlopCounterMode) -> dict[str, int]:
    return {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}


@functools.lru_cache(maxsize=None)
def _traced(name: str) -> tuple[nn.Module, FlopReport, dict[str, int], int]:
    """Dense model, its report and FlopCounterMode's counts of the same forward (cached: ResNet-50 is reused)."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 1000} if name == "resnet50_imagenet" else {}
    model = sparsetrain.create_model(name, **kwargs)
    # FlopCounterMode sees the very forward count_flops runs, so both count the same calls.
    with FlopCounterMode(display=False) as fc:
        report = count_flops(model, _shape(name))
    return model, report, _op_counts(fc), fc.get_total_flops()


# ----------------------------------------------------------------------------------------- dense vs FlopCounterMode
@pytest.mark.parametrize("name", MODELS)
def test_dense_forward_macs_match_flop_counter(name: str) -> None:
    model, report, ops, total = _traced(name)
    assert report.classifier == get_model_cfg(name).classifier  # the registry's classifier, as recipes see it
    assert set(ops) <= GEMM_OPS - {"aten.convolution_backward"}, f"non-GEMM ops counted: {ops}"
    assert 2 * report.totals(sparse=False)["forward_macs"] == total
    convs = sum(r.dense_forward_macs for r in report.layers if "Conv" in r.type)
    assert 2 * convs == ops.get("aten.convolution", 0)
    # Every weight of every conv/linear layer is counted exactly once.
    layer_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert report.totals(sparse=False)["weights"] == layer_weights
    assert report.totals(sparse=False)["params"] == sum(p.numel() for p in model.parameters())


# Not mobilenet_v1: FlopCounterMode's convolution_backward formula ignores `groups` and overcounts depthwise convs.
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_dense_backward_macs_match_flop_counter(name: str) -> None:
    torch.manual_seed(0)
    model = sparsetrain.create_model(name).train()
    shape = _shape(name)
    report = count_flops(model, shape, batch_size=2)
    x = torch.randn(2, *shape)
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    ops = _op_counts(fc)
    dense = report.totals(sparse=False)
    backward = ops.get("aten.convolution_backward", 0) + ops.get("aten.mm", 0)
    assert backward == 2 * (dense["grad_input_macs"] + dense["grad_weight_macs"])
    # Autograd skips dx of the first layer exactly as the report does; asking for it adds that layer's F.
    first = report.layers[0]
    assert first.dense_grad_input_macs == 0
    with FlopCounterMode(display=False) as fc:
        model(x.requires_grad_()).sum().backward()
    full = count_flops(model, shape, batch_size=2, count_first_layer_grad_input=True)
    ops = _op_counts(fc)
    assert ops.get("aten.convolution_backward", 0) + ops.get("aten.mm", 0) == 2 * (
        full.totals(False)["grad_input_macs"] + full.totals(False)["grad_weight_macs"]
    )
    assert full.totals(False)["grad_input_macs"] == dense["grad_input_macs"] + first.dense_forward_macs


# ----------------------------------------------------------------------------------------- hand-computed example
def _two_layer() -> nn.Module:
    # conv 1->2, 3x3 on 1x6x6: 2*4*4 outputs x 9 MACs = 288; linear 32->3: 96 MACs.
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def test_swat_per_pass_formula_by_hand() -> None:
    dens = {
        "0": {"weight": 0.5, "weight_for_grad_input": 0.5},  # input_for_grad_weight missing -> dense
        "3": {"weight": 0.25, "weight_for_grad_input": 0.25, "input_for_grad_weight": 0.25},
    }
    r = count_flops(_two_layer(), (1, 6, 6), dens)
    conv, fc = r.layers
    assert (conv.name, conv.type, fc.name, fc.type) == ("0", "Conv2d", "3", "Linear")
    assert (conv.dense_forward_macs, conv.dense_grad_input_macs, conv.dense_grad_weight_macs) == (288, 0, 288)
    assert (fc.dense_forward_macs, fc.dense_grad_input_macs, fc.dense_grad_weight_macs) == (96, 96, 96)
    # SWAT: (1-s_w)F, (1-s_w)F, (1-s_a)F; first layer's dx not needed.
    assert (conv.sparse_forward_macs, conv.sparse_grad_input_macs, conv.sparse_grad_weight_macs) == (144, 0, 288)
    assert (fc.sparse_forward_macs, fc.sparse_grad_input_macs, fc.sparse_grad_weight_macs) == (24, 24, 24)
    dense_total, sparse_total = 288 + 288 + 3 * 96, 144 + 288 + 3 * 24
    assert r.training_flops_reduction_pct == pytest.approx(100 * (1 - sparse_total / dense_total))
    assert r.inference_flops_reduction_pct == pytest.approx(100 * (1 - (144 + 24) / (288 + 96)))
    # Act: saved elements per sample 36 (dense) + 32 (25 % kept) -> 24 of 68 masked.
    assert (conv.saved_activation_elements, fc.saved_activation_elements) == (36, 32)
    assert r.act_memory_reduction_pct == pytest.approx(100 * 24 / 68)
    # Compression: 18 + 96 weights, 9 + 24 non-zero.
    assert r.model_compression_x == pytest.approx(114 / 33)
    # Changpinyo's count excludes the classifier (the last layer run): conv weight 18 + bias 2.
    assert r.classifier == "3"
    assert r.totals(False)["params_excl_classifier"] == 20
    assert r.totals(True)["params_excl_classifier"] == pytest.approx(9 + 2)


def test_pruned_grad_output_and_first_layer_option() -> None:
    # meProp / Ye et al.: a pruned dy is the sparser operand of both backward GEMMs.
    dens = {"3": {"grad_output": 0.1, "weight_for_grad_input": 0.5}}
    r = count_flops(_two_layer(), (1, 6, 6), dens, batch_size=4)
    fc = r.layers[1]
    assert fc.dense_forward_macs == 4 * 96
    assert fc.sparse_grad_input_macs == pytest.approx(0.1 * 4 * 96)
    assert fc.sparse_grad_weight_macs == pytest.approx(0.1 * 4 * 96)
    assert fc.sparse_forward_macs == 4 * 96
    assert fc.saved_activation_elements == 32  # per sample, whatever the batch
    r2 = count_flops(_two_layer(), (1, 6, 6), count_first_layer_grad_input=True)
    assert r2.layers[0].dense_grad_input_macs == 288
    assert r.training_flops_reduction_pct > 0
    with pytest.raises(ValueError, match="operand"):
        count_flops(_two_layer(), (1, 6, 6), {"3": {"wieght": 0.5}}).layers[1]  # noqa: B018
    # A model reused twice counts both calls; with_densities re-counts without a new forward.
    shared = nn.Linear(4, 4)
    r3 = count_flops(nn.Sequential(shared, nn.ReLU(), shared), (4,))
    assert [row.dense_forward_macs for row in r3.layers] == [32]
    assert r3.with_densities({"0": {"weight": 0.5}}).layers[0].sparse_forward_macs == 16


def _same(a: object, b: object) -> bool:
    """Deep equality of nested containers holding tensors (e.g. two ``handle.state_dict()``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_count_flops_leaves_sparse_state_untouched() -> None:
    model = sparsetrain.create_model("lenet5").train()
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()  # cache thresholds: the trace must not refresh them
    before, state = handle.densities(), copy.deepcopy(handle.state_dict())
    weight = effective_weight(model.conv2).clone()
    r = count_flops(model, (1, 28, 28), before)
    assert handle.densities() == before
    assert _same(handle.state_dict(), state)
    assert model.training and torch.equal(effective_weight(model.conv2), weight)
    assert float((weight != 0).float().mean()) == pytest.approx(0.1, abs=0.01)  # still sparse after the trace
    assert r.layers[1].type == "SparseConv2d" and r.layers[1].weight_density == pytest.approx(0.1)


def test_count_flops_counts_conv_and_linear_subclasses() -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    r = count_flops(model, (1, 6, 6))
    assert [row.type for row in r.layers] == ["MyConv", "Linear"]
    assert r.layers[0].dense_forward_macs == 2 * 4 * 4 * 9


def test_report_dict_keys_and_table() -> None:
    r = count_flops(_two_layer(), (1, 6, 6), {"3": {"weight": 0.5}})
    d = json.loads(json.dumps(r.to_dict()))
    assert list(d) == [
        "training_flops_reduction_pct",
        "inference_flops_reduction_pct",
        "act_memory_reduction_pct",
        "model_compression_x",
        "layers",
        "dense_totals",
        "sparse_totals",
        "convention",
    ]
    assert set(d["layers"][0]) == {
        "name", "type", "dense_forward_macs", "dense_grad_input_macs", "dense_grad_weight_macs",
        "sparse_forward_macs", "sparse_grad_input_macs", "sparse_grad_weight_macs", "weight_density",
        "activation_density", "grad_output_density", "params", "saved_activation_elements",
    }  # fmt: skip
    assert "FLOPs = 2 x MACs" in d["convention"]
    table = format_table(r)
    assert "inference FLOPs reduction" in table and "convention:" in table


def test_densities_from_run_metrics(tmp_path) -> None:
    lines = [
        {"epoch": 0, "densities": {"3": {"weight": 0.9}}},
        {"epoch": 1, "densities": {"3": {"weight": 0.5, "input_for_grad_weight": 0.5}}},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dens = RunDir(tmp_path).last_densities()
    assert dens == {"3": {"weight": 0.5, "input_for_grad_weight": 0.5}}
    assert count_flops(_two_layer(), (1, 6, 6), dens).layers[1].sparse_forward_macs == 48


# ----------------------------------------------------------------------------------------- SWAT's ResNet-50 table
# SWAT Table 3 (ResNet-50, ImageNet, SWAT-U): inference FLOPs reduction 77.7 % at 80 % and 87.4 % at 90 % sparsity.
PAPER_INFERENCE = {0.8: 77.7, 0.9: 87.4}
PAPER_COMPRESSION = {0.8: 5.0, 0.9: 10.0}


def test_resnet50_swat_u_matches_paper_inference_flops() -> None:
    _, dense, _, _ = _traced("resnet50_imagenet")  # traced once (dense), re-counted for each density
    assert dense.totals(False)["forward_macs"] == 4_089_184_256
    for sparsity, paper in PAPER_INFERENCE.items():
        m = sparsetrain.create_model("resnet50_imagenet", num_classes=1000)
        handle = sparsetrain.sparsify_(m, "swat-u", density=round(1 - sparsity, 6), first_layer_dense=True)
        rep = dense.with_densities(handle.densities())
        assert rep.layers[0].weight_density == 1.0 and rep.layers[-1].weight_density == pytest.approx(1 - sparsity)
        assert abs(rep.inference_flops_reduction_pct - paper) < 0.1
        assert rep.model_compression_x == pytest.approx(PAPER_COMPRESSION[sparsity], abs=0.05)
        # Our training figure (first layer's dx not counted) is above the paper's; see docs/accounting.md.
        assert rep.training_flops_reduction_pct == pytest.approx({0.8: 78.45, 0.9: 88.25}[sparsity], abs=0.01)


# ----------------------------------------------------------------------------------------- memory
def test_storage_formats_by_hand() -> None:
    assert storage_bytes(64, 8, "dense") == 256
    assert storage_bytes(64, 8, "bitmap") == 8 + 32
    assert storage_bytes(64, 8, "csr", rows=4) == 8 * 8 + 5 * 4
    assert storage_bytes(10, 1, "bitmap", value_bytes=2) == 2 + 2
    with pytest.raises(ValueError, match="bitmap"):
        storage_bytes(1, 1, "coo")


def test_memory_report_by_hand() -> None:
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 15 + 8 = 23 parameters
    r = memory_report(m, (4,), optimizer="adam", batch_size=2)
    assert (r.param_bytes, r.grad_bytes, r.optimizer_bytes) == (92, 92, 184)
    assert r.dense_saved_activation_bytes == (4 + 3) * 2 * 4
    assert r.dense_backward_weight_bytes == 6 * 4  # first layer's dx is not computed: its W is not read
    assert memory_report(m, (4,), optimizer="sgd").optimizer_bytes == 0
    assert memory_report(m, (4,), optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)).optimizer_bytes == 92
    dens = {"2": {"input_for_grad_weight": 0.5, "weight_for_grad_input": 0.5}}
    s = memory_report(m, (4,), dens, batch_size=2, fmt="bitmap")
    # layer 2 input: 6 elements, 3 kept -> 1 bitmap byte + 12; layer 0 stays dense (32 bytes).
    assert s.sparse_saved_activation_bytes == 32 + 1 + 12
    assert s.sparse_backward_weight_bytes == 1 + 3 * 4
    c = memory_report(m, (4,), dens, batch_size=2, fmt="csr")
    assert c.sparse_saved_activation_bytes == 32 + 3 * 8 + (2 + 1) * 4  # 2 rows (one per sample)
    assert c.sparse_backward_weight_bytes == 3 * 8 + (2 + 1) * 4  # W is 2x3: 2 rows
    assert s.total(True) < s.total(False)
    with pytest.raises(ValueError, match="valid choices"):
        memory_report(m, (4,), optimizer="lbfgs")


def test_measured_saved_tensors_swat_u_below_dense() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    dense_model = sparsetrain.create_model("lenet5").train()
    dense = measure_saved_tensors(dense_model, x, y)
    assert dense.total_bytes > 0 and dense.layer_input_bytes > 0
    # Dense conv/linear inputs as stored: every element of every layer input, 4 bytes each.
    analytic = memory_report(dense_model, (1, 28, 28), batch_size=8)
    assert dense.layer_input_bytes == analytic.dense_saved_activation_bytes
    assert dense.layer_input_elements * 4 == dense.layer_input_bytes

    # A batch sliced from a bigger tensor is counted as the slice, not as the whole storage it views.
    big = torch.cat([x, torch.randn(56, 1, 28, 28)])
    assert measure_saved_tensors(dense_model, big[:8], y).total_bytes == dense.total_bytes

    sparse_model = sparsetrain.create_model("lenet5").train()
    handle = sparsetrain.sparsify_(sparse_model, "swat-u", density=0.1)
    sparse = measure_saved_tensors(sparse_model, x, y)
    assert sparse.layer_input_compressed_bytes < dense.layer_input_compressed_bytes
    assert sparse.layer_input_nonzeros < dense.layer_input_nonzeros
    # Every sparse layer input is counted, also when the layer keeps it packed (values + bitmap) for backward.
    assert sparse.layer_input_elements == dense.layer_input_elements
    assert dense.packed_bytes == 0 and sparse.packed_bytes <= sparse.total_bytes
    rep = memory_report(sparse_model, (1, 28, 28), handle.densities(), batch_size=8, measured=sparse)
    assert rep.sparse_saved_activation_bytes < rep.dense_saved_activation_bytes
    assert rep.measured_peak_bytes == rep.param_bytes + rep.grad_bytes + rep.optimizer_bytes + sparse.total_bytes
    # Top-K keeps ~10 % of each sparse layer input; the analytic bitmap size is within a few % of the measurement.
    assert rep.measured.layer_input_compressed_bytes == pytest.approx(rep.sparse_saved_activation_bytes, rel=0.05)
    assert "saved for backward" in rep.format_table()
    assert math.isfinite(rep.saved_activation_reduction_pct)


# ----------------------------------------------------------------------------------------- CLI
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from sparsetrain.cli import main

    code = main(["flops", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_recipe_json_and_table(capsys) -> None:
    code, out, _ = _cli(capsys, "--model", "lenet5", "--dataset", "mnist", "--recipe", "swat-u", "--sparsity", "0.9",
                        "--json")  # fmt: skip
    assert code == 0
    d = json.loads(out)
    rows = {r["name"]: r for r in d["layers"]}
    assert rows["conv1"]["weight_density"] == 1.0  # swat-u keeps the first layer dense
    assert rows["fc"]["weight_density"] == pytest.approx(0.1)
    assert rows["conv1"]["dense_forward_macs"] == 6 * 28 * 28 * 25  # 5x5, padding 2
    code, out, _ = _cli(capsys, "--model", "lenet5", "--input", "1x28x28", "--memory", "--optimizer", "adam")
    assert code == 0 and "training FLOPs reduction" in out and "convention:" in out and "optimizer state" in out
    code, _, err = _cli(capsys, "--model", "lenet5", "--input", "1x28x28", "--density", "0.5")
    assert code == 2 and "--recipe" in err


def test_cli_memory_shows_measured_next_to_analytic(capsys) -> None:
    """`flops --memory` runs a real step: the measured saved inputs agree with the analytic count within 10 %."""
    code, out, _ = _cli(capsys, "--model", "resnet20", "--input", "3x16x16", "--recipe", "swat-u", "--density", "0.1",
                        "--memory", "--batch-size", "4", "--json")  # fmt: skip
    assert code == 0
    mem = json.loads(out)["memory"]
    analytic, measured = mem["sparse_saved_activation_bytes"], mem["measured"]["layer_input_compressed_bytes"]
    assert measured > 0 and abs(analytic / measured - 1) < 0.10
    assert mem["measured"]["packed_bytes"] > 0  # the sparse layers really stored packed tensors


def test_cli_run_directory(tmp_path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("model: lenet5\ndataset: mnist\nrecipe: swat-u\n")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "densities": {"conv2": {"weight": 0.25, "weight_for_grad_input": 0.25,
                                                        "input_for_grad_weight": 0.5}}}) + "\n"
    )  # fmt: skip
    code, out, _ = _cli(capsys, "--run", str(tmp_path), "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["layers"]}
    assert rows["conv2"]["sparse_forward_macs"] == pytest.approx(0.25 * rows["conv2"]["dense_forward_macs"])
    assert rows["conv2"]["activation_density"] == 0.5 and rows["fc1"]["weight_density"] == 1.0
    code, _, err = _cli(capsys, "--run", str(tmp_path / "missing"))
    assert code == 2 and "config.yaml" in err


def test_cli_changpinyo_depth_multiplier_comparison(capsys) -> None:
    code, out, _ = _cli(capsys, "--model", "lenet5", "--dataset", "mnist", "--recipe", "random-channel",
                        "--density", "0.25", "--compare-depth-multiplier", "--json")  # fmt: skip
    assert code == 0
    dense, sparse, depth = json.loads(out)["settings"]
    assert (dense["width_mult"], sparse["width_mult"], depth["width_mult"]) == (1.0, 1.0, 0.5)
    # Sparse random keeps ~alpha of the conv connections; depth multiplier sqrt(alpha) keeps ~alpha of them too.
    assert sparse["conv_params"] < 0.4 * dense["conv_params"] and depth["conv_params"] < 0.4 * dense["conv_params"]
    assert sparse["multiply_adds"] < dense["multiply_adds"] and depth["multiply_adds"] < dense["multiply_adds"]
    assert dense["params_excl_classifier"] == dense["params"] - (84 * 10 + 10)


# ----------------------------------------------------------------------------------------- non-GEMM work (issue 14)
class _TinyResidual(nn.Module):
    """conv -> BN -> ReLU, a residual add around a second conv, 2x2 max pool, linear with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)  # 1x4x4 -> 2x4x4
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)  # 2x4x4 -> 2x2x2
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)  # functional: no module hook sees it
        return self.fc(torch.flatten(self.pool(y), 1))


def _flop_pairs(report: FlopReport) -> dict[str, tuple[float, float]]:
    """(forward, backward) FLOPs per kind."""
    out: dict[str, tuple[float, float]] = {}
    for op in report.non_gemm.ops:
        f, b = out.get(op.kind, (0.0, 0.0))
        out[op.kind] = (f + op.forward_flops, b + op.backward_flops)
    return out


def test_non_gemm_counts_by_hand() -> None:
    from sparsetrain.accounting import NonGemmOptions

    # Batch 2: BN/ReLU/add on 2x2x4x4 = 64 elements; pool output 16 (window 4: 3 compares each); fc 6 outputs.
    opts = NonGemmOptions(comparisons_per_element=3.0)
    r = count_flops(_TinyResidual(), (1, 4, 4), batch_size=2, non_gemm=opts)
    assert _flop_pairs(r) == {
        "batchnorm": (7 * 64, 7 * 64),
        "relu": (64, 64),
        "residual_add": (64, 64),
        "pooling": (3 * 16, 16),
        "bias": (6, 6),
        "loss": (4 * 6, 2 * 6),
    }
    kinds = r.non_gemm.by_kind()
    assert kinds["total"]["training_macs"] == (654 + 610) / 2  # 1 FLOP = 0.5 MAC-equivalent
    assert kinds["total"]["inference_macs"] == (2 * 64 + 64 + 64 + 48 + 6) / 2  # BN is scale+shift, no loss
    assert {op.module for op in r.non_gemm.ops if op.kind == "residual_add"} == {""}  # the root module's forward
    assert r.non_gemm.unclassified_ops == {}
    # GEMMs (MACs): conv 576 fwd, dx 0 (fed by data), dW 576; conv2 1152 x 3; fc 48 x 3.
    dense_gemm = 576 + 576 + 3 * 1152 + 3 * 48
    assert r.totals(False)["training_macs"] == dense_gemm
    assert r.training_flops_reduction_pct_all_ops == 0.0  # dense: no selection, same non-GEMM work

    # SWAT on conv2 at density 0.5: GEMMs halve; BN/ReLU/add/pool do not get cheaper; the top-K is added.
    dens = {"conv2": {"weight": 0.5, "weight_for_grad_input": 0.5, "input_for_grad_weight": 0.5}}
    s = r.with_densities(dens)
    assert s.non_gemm is r.non_gemm
    # weight: 36 elements x (3 comparisons + 2 mask); activation: 32 per sample x 2 samples x (3 + 2). In MACs: /2.
    assert s.selection_macs() == {"weight": 90.0, "activation": 160.0, "grad_output": 0.0, "total": 250.0}
    sparse_gemm = 576 + 576 + 3 * 576 + 3 * 48
    assert s.all_ops_totals(True)["training_macs"] == sparse_gemm + 632 + 250
    assert s.all_ops_totals(False)["training_macs"] == dense_gemm + 632
    assert s.training_flops_reduction_pct_all_ops == pytest.approx(100 * (1 - (sparse_gemm + 882) / (dense_gemm + 632)))
    assert s.training_flops_reduction_pct == pytest.approx(100 * (1 - sparse_gemm / dense_gemm))
    assert s.inference_flops_reduction_pct_all_ops == pytest.approx(100 * (1 - (1200 + 155) / (1776 + 155)))

    # Weight threshold every 4 steps: 36 x (3/4 + 2); a weight is selected once per step of 8 samples: x 2/8.
    periodic = replace(s, non_gemm=replace(s.non_gemm, options=NonGemmOptions(comparisons_per_element=3.0,
                                                                             weight_period=4, training_batch=8)))
    assert periodic.selection_macs()["weight"] == pytest.approx(36 * (3 / 4 + 2) / 2 * 2 / 8)
    assert periodic.selection_macs()["activation"] == 160.0
    # Default comparisons: Quickselect's expected 2 + 2 H(0.5) = 2 + 2 ln 2 per element.
    default = count_flops(_TinyResidual(), (1, 4, 4), dens, batch_size=2, non_gemm=True)
    assert default.selection_macs()["weight"] == pytest.approx(36 * (2 + 2 * math.log(2) + 2) / 2)
    # Counting an element-wise FLOP as a whole MAC doubles the non-GEMM figures and leaves the GEMMs alone.
    as_mac = count_flops(_TinyResidual(), (1, 4, 4), dens, batch_size=2, non_gemm=NonGemmOptions(macs_per_flop=1.0))
    assert as_mac.non_gemm.training_macs() == 2 * 632
    assert as_mac.training_flops_reduction_pct == s.training_flops_reduction_pct


def test_non_gemm_dropout_avg_pool_and_pruned_grad_output() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(2, 3))  # fmt: skip
    r = count_flops(model, (1, 4, 4), {"5": {"grad_output": 0.25}}, non_gemm=True)  # 2x2x2 conv out, pooled 2x1x1
    pairs = _flop_pairs(r)
    # AvgPool2d: 2 outputs x window 4; the adaptive pool's window is input/output = 1 (its argument is a size).
    assert pairs["pooling"] == (4 * 2 + 2, 4 * 2 + 2)
    assert pairs["dropout"] == (2, 2)  # eval mode skips it; a training step does not
    assert pairs["bias"] == (8 + 3, 8 + 3)  # conv bias (8 outputs) and linear bias (3)
    assert "batchnorm" not in pairs and "relu" not in pairs
    # A pruned dy (meProp / Ye et al.) is selected from the layer's 3 outputs on every step.
    c = quickselect_comparisons_per_element(0.25)
    assert r.selection_macs()["grad_output"] == pytest.approx(3 * (c + 2) / 2)


def test_non_gemm_option_off_leaves_the_report_unchanged() -> None:
    from sparsetrain.accounting import NonGemmOptions

    dens = {"3": {"weight": 0.5, "input_for_grad_weight": 0.25}}
    off = count_flops(_two_layer(), (1, 6, 6), dens)
    assert off.non_gemm is None and "non_gemm" not in repr(off)
    d_off = json.loads(json.dumps(off.to_dict()))
    assert list(d_off) == [
        "training_flops_reduction_pct", "inference_flops_reduction_pct", "act_memory_reduction_pct",
        "model_compression_x", "layers", "dense_totals", "sparse_totals", "convention",
    ]  # fmt: skip
    assert d_off == json.loads(json.dumps(count_flops(_two_layer(), (1, 6, 6), dens, non_gemm=False).to_dict()))
    on = json.loads(json.dumps(count_flops(_two_layer(), (1, 6, 6), dens, non_gemm=True).to_dict()))
    assert {k: on[k] for k in d_off} == d_off  # the GEMM figures do not move
    assert set(on) - set(d_off) == {
        "training_flops_reduction_pct_all_ops", "inference_flops_reduction_pct_all_ops", "all_ops_totals",
        "non_gemm_macs", "topk_selection_macs", "non_gemm_options", "non_gemm_ops", "non_gemm_unclassified_ops",
        "non_gemm_convention",
    }  # fmt: skip
    assert on["training_flops_reduction_pct_all_ops"] < on["training_flops_reduction_pct"]
    assert "non-GEMM" not in format_table(off) and "all ops" in format_table(count_flops(_two_layer(), (1, 6, 6),
                                                                                         non_gemm=True))
    with pytest.raises(ValueError, match="non_gemm=True"):
        off.training_flops_reduction_pct_all_ops  # noqa: B018
    with pytest.raises(ValueError, match="NonGemmOptions"):
        count_flops(_two_layer(), (1, 6, 6), non_gemm="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_period must be an integer >= 1"):
        NonGemmOptions(weight_period=0)
    with pytest.raises(ValueError, match="comparisons_per_element"):
        NonGemmOptions(comparisons_per_element=-1.0)


def test_non_gemm_trace_leaves_model_and_sparse_state_untouched() -> None:
    model = sparsetrain.create_model("lenet5").train()
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    before, state = handle.densities(), copy.deepcopy(handle.state_dict())
    r = count_flops(model, (1, 28, 28), before, non_gemm=True)
    assert handle.densities() == before and _same(handle.state_dict(), state) and model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # The sparse layers' top-K is not traced as work of the model (dense mode); it is counted as selection.
    assert r.non_gemm.unclassified_ops == {} and r.selection_macs()["total"] > 0


def test_non_gemm_resnet20_finds_every_batchnorm_relu_and_residual_add() -> None:
    model = sparsetrain.create_model("resnet20")
    r = count_flops(model, (3, 32, 32), non_gemm=True)
    calls = {}
    for op in r.non_gemm.ops:
        calls[op.kind] = calls.get(op.kind, 0) + op.calls
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert calls["batchnorm"] == len(bns) == 19
    assert calls["residual_add"] == 9 and calls["relu"] == 19  # 9 blocks; stem + 2 per block
    # BN sees every conv output (per sample): the same elements as the conv outputs, 7 FLOPs each way.
    conv_out = sum(r.non_gemm.layer_output_elements[row.name] for row in r.layers if row.type == "Conv2d")
    assert _flop_pairs(r)["batchnorm"] == (7 * conv_out, 7 * conv_out)


def test_resnet50_swat_u_all_ops_training_flops() -> None:
    """SWAT Table 3 under both conventions; see docs/accounting.md (the all-ops count does not reach 76.1 / 85.6)."""
    from sparsetrain.accounting import NonGemmOptions

    opts = NonGemmOptions(weight_period=1000, training_batch=256)  # SWAT's ImageNet setting
    dense = count_flops(sparsetrain.create_model("resnet50_imagenet", num_classes=1000), (3, 224, 224),
                        non_gemm=opts)  # fmt: skip
    assert dense.non_gemm.training_macs() == pytest.approx(93.93e6, rel=1e-3)
    expected = {0.8: (78.45, 77.63), 0.9: (88.25, 87.37)}
    for sparsity, (gemm, all_ops) in expected.items():
        m = sparsetrain.create_model("resnet50_imagenet", num_classes=1000)
        rep = dense.with_densities(sparsetrain.sparsify_(m, "swat-u", density=round(1 - sparsity, 6),
                                                         first_layer_dense=True).densities())  # fmt: skip
        assert rep.training_flops_reduction_pct == pytest.approx(gemm, abs=0.01)
        assert rep.training_flops_reduction_pct_all_ops == pytest.approx(all_ops, abs=0.01)


def test_cli_non_gemm_flag(capsys) -> None:
    base = ["--model", "resnet20", "--input", "3x16x16", "--recipe", "swat-u", "--density", "0.1"]
    code, out, _ = _cli(capsys, *base, "--json")
    assert code == 0
    gemm_only = json.loads(out)
    assert "training_flops_reduction_pct_all_ops" not in gemm_only
    code, out, _ = _cli(capsys, *base, "--non-gemm", "--weight-threshold-period", "10", "--training-batch", "128",
                        "--json")  # fmt: skip
    assert code == 0
    d = json.loads(out)
    assert d["training_flops_reduction_pct"] == gemm_only["training_flops_reduction_pct"]
    assert 0 < d["training_flops_reduction_pct_all_ops"] < d["training_flops_reduction_pct"]
    assert d["non_gemm_options"]["weight_period"] == 10 and d["non_gemm_options"]["training_batch"] == 128
    assert d["non_gemm_macs"]["batchnorm"]["training_macs"] > 0 and d["topk_selection_macs"]["activation"] > 0
    code, out, _ = _cli(capsys, *base, "--non-gemm", "--elementwise-unit", "mac")
    assert code == 0 and "all ops" in out and "residual_add" in out and "1 element-wise FLOP = 1 MAC" in out
    code, _, err = _cli(capsys, *base, "--non-gemm", "--weight-threshold-period", "0")
    assert code == 2 and "--weight-threshold-period must be an integer >= 1" in err
    code, _, err = _cli(capsys, *base, "--training-batch", "64")
    assert code == 2 and "--non-gemm" in err
    with pytest.raises(SystemExit) as exc:
        _cli(capsys, *base, "--non-gemm", "--elementwise-unit", "bytes")
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_count_flops_reads_sparse_layers_through_the_seam():
    """Sparse layers report their shapes through the operand seam (no forward hook on them); the dense counts equal
    those of the same model never sparsified, whose plain layers are traced by forward hooks."""
    from sparsetrain.layers import observe

    torch.manual_seed(0)
    dense = sparsetrain.create_model("resnet20", num_classes=10)
    model = copy.deepcopy(dense)
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.25)
    hooks_seen = []

    def check(ev):
        if ev.operand == "input":
            hooks_seen.append((ev.layer, len(ev.module._forward_hooks), ev.after.data_ptr() == ev.before.data_ptr()))

    with observe(check):
        sparse_rep = count_flops(model, (3, 32, 32))
    assert sorted(name for name, _, _ in hooks_seen) == sorted(handle.layers)
    assert all(n == 0 and dense_op for _, n, dense_op in hooks_seen)
    dense_rep = count_flops(dense, (3, 32, 32))

    def rows(rep):
        return [(r.name, r.dense_forward_macs, r.dense_grad_input_macs, r.dense_grad_weight_macs,
                 r.saved_activation_elements) for r in rep.layers]

    assert rows(sparse_rep) == rows(dense_rep)
