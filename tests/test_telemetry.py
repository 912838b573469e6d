"""Tests for sparsetrain.telemetry: Monitor counts vs tensors of known sparsity, blocks, hooks, sinks."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn

import sparsetrain
from sparsetrain.files import read_jsonl
from sparsetrain.layers import effective_weight
from sparsetrain.telemetry import (
    TENSORS,
    TOTAL,
    Count,
    CsvSink,
    JsonlSink,
    ListSink,
    Monitor,
    aggregate,
    auto_blocks,
    block_members,
    read_csv,
    resolve_blocks,
)


def _by(records, kind="layer"):
    """{(name, tensor): record} for one step's records."""
    return {(r["name"], r["tensor"]): r for r in records if r["kind"] == kind}


def _zeroed(shape, zero_idx):
    """A tensor of non-zero values with exact zeros at the flat positions ``zero_idx``."""
    t = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 7.0
    t.view(-1)[list(zero_idx)] = 0.0
    return t


class _Net(nn.Module):
    """fc1 -> ReLU -> fc2, with hand-set weights so every count is predictable."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3, bias=False)
        self.fc2 = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(_zeroed((3, 4), [0, 5]))  # 2 of 12 zeros
            # fc2 gets a zero column: the dx it sends to the 2nd hidden unit is exactly zero.
            self.fc2.weight.copy_(torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.0, 1.5]]))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_layer_counts_match_hand_computed_values():
    torch.manual_seed(0)
    net = _Net()
    # 5 zeros in an input of 2x4 = 8 elements.
    x = torch.tensor([[0.0, 1.0, 0.0, -2.0], [0.0, 0.0, 3.0, 0.0]], requires_grad=True)
    # Loss = masked sum: dL/d(out) is exactly the mask, which has 3 zeros in 4 elements.
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with Monitor(net, every=1) as mon:
        out = net(x)
        (out * mask).sum().backward()
        recs = _by(mon.step())

    # fc1 weight: 2 / 12 zeros; input: 5 / 8 zeros.
    assert (recs["fc1", "weight"]["numel"], recs["fc1", "weight"]["zeros"]) == (12, 2)
    assert (recs["fc1", "input"]["numel"], recs["fc1", "input"]["zeros"]) == (8, 5)
    h = x.detach() @ net.fc1.weight.detach().t()
    assert recs["fc1", "output"]["zeros"] == int((h == 0).sum())
    assert recs["fc2", "input"]["zeros"] == int((torch.relu(h) == 0).sum())
    # fc2 dy is the mask: 3 / 4 zeros.
    assert (recs["fc2", "grad_output"]["numel"], recs["fc2", "grad_output"]["zeros"]) == (4, 3)
    # fc2 dx = dy @ W2: the row of a zero dy is zero and the zero column of W2 gives a zero.
    dx2 = mask @ net.fc2.weight.detach()
    assert recs["fc2", "grad_input"]["zeros"] == int((dx2 == 0).sum())
    # fc1's dy is fc2's dx through the ReLU; compare against autograd directly.
    dy1 = dx2 * (h > 0)
    assert recs["fc1", "grad_output"]["zeros"] == int((dy1 == 0).sum())
    assert recs["fc1", "grad_input"]["zeros"] == int((dy1 @ net.fc1.weight.detach() == 0).sum())
    assert recs["fc1", "grad_input"]["numel"] == 8
    # Weight gradients: what is in .grad after backward.
    for name, m in (("fc1", net.fc1), ("fc2", net.fc2)):
        assert recs[name, "grad_weight"]["zeros"] == int((m.weight.grad == 0).sum())
        assert recs[name, "grad_weight"]["numel"] == m.weight.numel()
    # Sparsity = zeros / numel and no near-zero without a threshold.
    for r in recs.values():
        assert r["sparsity"] == pytest.approx(r["zeros"] / r["numel"])
        assert r["near_zero_sparsity"] is None and r["threshold"] is None
        assert r["step"] == 0 and r["epoch"] is None


def test_grad_input_is_the_layers_own_contribution():
    # x feeds both the layer and a shortcut: the layer's dx must not include the shortcut's gradient.
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.zero_()  # dx = dy @ W = 0 exactly, while dL/dx (total) = 1 through the shortcut
    x = torch.randn(2, 3, requires_grad=True)
    with Monitor(lin, every=1, blocks=None, total=False) as mon:
        (lin(x) + x).sum().backward()
        recs = _by(mon.step())
    assert recs["", "grad_input"]["zeros"] == 6
    assert torch.all(x.grad == 1.0)


def test_first_layer_without_input_grad_has_no_grad_input_record():
    net = _Net()
    with Monitor(net) as mon:
        net(torch.randn(2, 4)).sum().backward()
        recs = _by(mon.step())
    assert ("fc1", "grad_input") not in recs
    assert ("fc2", "grad_input") in recs


def test_near_zero_counting_per_tensor_and_callable():
    lin = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1e-4, -1e-3, 0.5, -2.0]]))
    x = torch.tensor([[0.0, 0.01, -0.2, 0.3, 0.05]])
    with Monitor(lin, near_zero_threshold={"weight": 1e-3, "input": 0.05}, blocks=None, total=False) as mon:
        lin(x)
        recs = _by(mon.step())
    w, i = recs["", "weight"], recs["", "input"]
    assert w["zeros"] == 1 and w["near_zero_sparsity"] == pytest.approx(3 / 5) and w["threshold"] == 1e-3
    assert i["zeros"] == 1 and i["near_zero_sparsity"] == pytest.approx(3 / 5) and i["threshold"] == 0.05
    assert recs["", "output"]["near_zero_sparsity"] is None

    # A callable threshold per (layer, tensor); a float applies to every tensor.
    net = _Net()
    thr = {("fc1", "weight"): 0.3}
    with Monitor(net, near_zero_threshold=lambda n, t: thr.get((n, t)), blocks=None, total=False) as mon:
        net(torch.randn(2, 4))
        recs = _by(mon.step())
    expected = int((net.fc1.weight.abs() <= 0.3).sum())
    assert recs["fc1", "weight"]["near_zero_sparsity"] == pytest.approx(expected / 12)
    assert recs["fc2", "weight"]["near_zero_sparsity"] is None
    with Monitor(net, near_zero_threshold=1e6) as mon:
        net(torch.randn(2, 4))
        assert all(r["near_zero_sparsity"] == 1.0 for r in mon.step())
    with pytest.raises(ValueError, match="tensor names"):
        Monitor(net, near_zero_threshold={"weights": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        Monitor(net, near_zero_threshold=-1.0)


def test_sampling_only_every_n_steps_and_epochs():
    net = _Net()
    sink = ListSink()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with Monitor(net, every=3, sinks=[sink]) as mon:
        sampled = []
        for it in range(8):
            sampled.append(mon.sampling)
            loss = net(torch.randn(4, 4)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out = mon.step(epoch=it // 4)
            assert (out is not None) == (it % 3 == 0)
    assert sampled == [it % 3 == 0 for it in range(8)]
    steps = sorted({r["step"] for r in sink.records})
    assert steps == [0, 3, 6]
    assert {r["step"]: r["epoch"] for r in sink.records} == {0: 0, 3: 0, 6: 1}
    # Every sampled step has all six tensors of fc2 (fc1 has no grad_input: its input needs no grad).
    for s in steps:
        got = {r["tensor"] for r in sink.records if r["step"] == s and r["name"] == "fc2"}
        assert got == {"weight", "input", "output", "grad_output", "grad_input", "grad_weight"}


def test_not_sampling_holds_no_tensors_and_eval_is_skipped():
    net = _Net()
    with Monitor(net, every=2, start_step=1) as mon:
        assert not mon.sampling
        net(torch.randn(2, 4, requires_grad=True)).sum().backward()
        assert mon._acc == {} and mon._step_handles == []
        assert mon.step() is None
        assert mon.sampling and mon.step_index == 2
        net.eval()  # an evaluation pass on a sampling step is not recorded by default
        with torch.no_grad():
            net(torch.randn(2, 4))
        assert mon._acc == {}
        net.train()
        net(torch.randn(2, 4))
        recs = mon.step()
        assert {r["step"] for r in recs} == {2}
    with Monitor(net.eval(), include_eval=True) as mon:
        with torch.no_grad():
            net(torch.randn(2, 4))
        assert {r["tensor"] for r in mon.step()} == {"weight", "input", "output"}


def test_gradient_accumulation_sums_activations_and_keeps_final_weight_grad():
    net = _Net()
    xs = [torch.randn(2, 4), torch.randn(3, 4)]
    with Monitor(net) as mon:
        for x in xs:
            net(x).sum().backward()
        recs = _by(mon.step())
    assert recs["fc1", "input"]["numel"] == 4 * (2 + 3)
    assert recs["fc2", "grad_output"]["numel"] == 2 * (2 + 3)
    assert recs["fc1", "weight"]["numel"] == 12  # counted once per step
    assert recs["fc1", "grad_weight"]["zeros"] == int((net.fc1.weight.grad == 0).sum())


def test_step_before_backward_warns_and_records_no_late_gradient(caplog):
    net = _Net()
    with Monitor(net, every=2) as mon:
        out = net(torch.randn(2, 4, requires_grad=True))
        with caplog.at_level("WARNING"):
            recs = mon.step()  # wrong order: before backward
        assert "after loss.backward()" in caplog.text
        assert {r["tensor"] for r in recs} == {"weight", "input", "output"}
        out.sum().backward()  # the step's tensor hooks are gone: nothing leaks into the next step
        assert mon._acc == {}


class _Square(torch.autograd.Function):
    """A custom Function (like the sparse layers' GEMM): y = x @ (W*W).T, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ (w * w).t()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ (w * w), 2 * w * (dy.t() @ x)


class _CustomLinear(nn.Linear):
    def forward(self, x):
        return _Square.apply(x, self.weight)


def test_custom_autograd_function_module_and_inplace_relu():
    torch.manual_seed(0)
    layer = _CustomLinear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight[0, :2] = 0.0
    head = nn.Linear(3, 2)
    model = nn.Sequential(layer, nn.ReLU(inplace=True), head)  # in-place op right after the layer's output
    x = torch.randn(5, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 0.0]] * 2)
    with Monitor(model) as mon:
        (model(x) * mask).sum().backward()
        recs = _by(mon.step())
    # Reference gradients by hand.
    w = layer.weight.detach()
    y = x.detach() @ (w * w).t()
    dy_head = mask
    dy = (dy_head @ head.weight.detach()) * (y > 0)
    assert recs["0", "grad_output"]["zeros"] == int((dy == 0).sum())  # the pre-ReLU dy, not the in-place tensor's
    assert recs["0", "grad_input"]["zeros"] == int((dy @ (w * w) == 0).sum())
    assert recs["0", "grad_weight"]["zeros"] == int((layer.weight.grad == 0).sum()) >= 2
    assert recs["2", "grad_output"]["zeros"] == int((mask == 0).sum())
    assert torch.allclose(x.grad, dy @ (w * w))


def test_weight_is_counted_as_the_forward_uses_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    w = model[0].weight.detach().clone()
    sparsetrain.sparsify_(model, {"layers": {"0": {"weight": {"type": "threshold", "threshold": 0.2}}}})
    with Monitor(model, blocks=None, total=False) as mon:
        model(torch.randn(1, 10))
        recs = _by(mon.step())
    # Counted independently of the library: a threshold sparsifier zeroes exactly |w| <= 0.2.
    assert recs["0", "weight"]["zeros"] == int((w.abs() <= 0.2).sum()) > 0
    assert recs["2", "weight"]["zeros"] == int((model[2].weight == 0).sum())  # a dense layer: its own weight


def test_blocks_auto_and_explicit():
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer10.conv", "fc"]
    assert auto_blocks(names) == ["layer1", "layer1.0"]
    assert block_members("layer1", names) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert resolve_blocks(["layer10", "conv1"], names) == ["layer10", "conv1"]
    assert resolve_blocks(None, names) == []
    with pytest.raises(ValueError, match="matches no monitored layer"):
        resolve_blocks(["layer2"], names)
    with pytest.raises(ValueError, match="'auto'"):
        resolve_blocks("all", names)


def test_aggregate_rules():
    counts = {"a": Count(10, 5, 6, 0.1), "b": Count(30, 3, 9, 0.1), "c": Count(60, 0, None, None)}
    c = aggregate(counts, ["a", "b", "c"], last_layer=False)
    assert (c.numel, c.zeros, c.near_zeros) == (100, 8, 6 + 9 + 0)
    assert c.sparsity == pytest.approx(0.08) and c.threshold is None  # thresholds differ (0.1 vs none)
    c = aggregate(counts, ["a", "b"], last_layer=False)
    assert c.threshold == 0.1 and c.near_zero_sparsity == pytest.approx(15 / 40)
    assert aggregate(counts, ["a", "b", "x"], last_layer=True) is counts["b"]
    assert aggregate(counts, ["x"], last_layer=False) is None


class _BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.layer1(torch.relu(self.stem(x)))
        return self.head(torch.relu(x).mean((2, 3)))


def test_block_aggregation_matches_hand_computation():
    torch.manual_seed(0)
    net = _BlockNet()
    with torch.no_grad():
        net.layer1[0].weight[:2] = 0.0  # 72 of 144 zeros
        net.layer1[2].weight[0] = 0.0  # 4 of 24 zeros
        net.stem.weight[0] = 0.0  # 9 of 36
    sink = ListSink()
    with Monitor(net, sinks=[sink], block_activations="last_layer") as mon:
        net(torch.randn(2, 1, 6, 6)).sum().backward()
        mon.step()
    layers, blocks = _by(sink.records, "layer"), _by(sink.records, "block")
    assert set(n for n, _ in blocks) == {"layer1", TOTAL}
    # Weights and gradients: element-weighted over the block's layers (eq. 5), not the mean of sparsities.
    for tensor in ("weight", "grad_output", "grad_input", "grad_weight"):
        members = [layers["layer1.0", tensor], layers["layer1.2", tensor]]
        z, n = sum(r["zeros"] for r in members), sum(r["numel"] for r in members)
        assert (blocks["layer1", tensor]["zeros"], blocks["layer1", tensor]["numel"]) == (z, n)
        assert blocks["layer1", tensor]["sparsity"] == pytest.approx(z / n)
    assert blocks["layer1", "weight"]["sparsity"] == pytest.approx((72 + 4) / (144 + 24))
    # Activations with block_activations="last_layer": the block's last layer (layer1.2).
    for tensor in ("input", "output"):
        assert blocks["layer1", tensor]["zeros"] == layers["layer1.2", tensor]["zeros"]
        assert blocks["layer1", tensor]["numel"] == layers["layer1.2", tensor]["numel"]
    # The model total sums every layer, activations included.
    for tensor in ("weight", "input"):
        rs = [r for (n, t), r in layers.items() if t == tensor]
        assert blocks[TOTAL, tensor]["zeros"] == sum(r["zeros"] for r in rs)
        assert blocks[TOTAL, tensor]["numel"] == sum(r["numel"] for r in rs)
    assert blocks[TOTAL, "weight"]["zeros"] == 72 + 4 + 9
    # latest(): nested dict with the same numbers.
    lat = mon.latest()
    assert lat["step"] == 0
    assert lat["block"]["layer1"]["weight"] == pytest.approx((72 + 4) / (144 + 24))
    assert lat["layer"]["stem"]["weight"] == pytest.approx(9 / 36)


def test_block_activation_is_the_block_output_by_hand_count():
    """TensorQuant's block activation sparsity: the tensor the block returns (a ResNet block: after its last ReLU)."""
    torch.manual_seed(0)
    model = sparsetrain.create_model("resnet20").train()
    seen: dict[str, torch.Tensor] = {}
    for b in ("layer1.0", "layer2"):
        model.get_submodule(b).register_forward_hook(lambda m, a, out, b=b: seen.__setitem__(b, (a[0], out)))
    with Monitor(model, blocks=["layer1.0", "layer2"]) as mon:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        blocks = _by(mon.step(), "block")
        layers = _by(mon.latest_records(), "layer")
    for b in ("layer1.0", "layer2"):
        x, out = seen[b]
        assert bool((out == 0).any())  # post-ReLU: there are zeros to count
        assert (blocks[b, "output"]["zeros"], blocks[b, "output"]["numel"]) == (int((out == 0).sum()), out.numel())
        assert (blocks[b, "input"]["zeros"], blocks[b, "input"]["numel"]) == (int((x == 0).sum()), x.numel())
    # Not the last layer's tensors: conv2's input is the inner ReLU's output, its output is before BN and ReLU.
    assert blocks["layer1.0", "output"]["zeros"] != layers["layer1.0.conv2", "output"]["zeros"]
    assert layers["layer1.0.conv2", "output"]["zeros"] == 0
    with pytest.raises(ValueError, match="block_output, last_layer"):
        Monitor(model, block_activations="last")


def _hook_state(model):
    state = []
    for m in model.modules():
        state += [len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)]
        state += [len(getattr(m, "_backward_pre_hooks", {}))]
    for p in model.parameters():
        state += [len(p._post_accumulate_grad_hooks or {}), len(p._backward_hooks or {})]
    return state


def test_hooks_removed_on_exit_and_no_references_kept():
    net = _BlockNet()
    before = _hook_state(net)
    assert all(v == 0 for v in before)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    with Monitor(net, near_zero_threshold=0.1) as mon:
        assert any(v > 0 for v in _hook_state(net))
        out = net(x)  # a sampling step: tensor hooks registered on the graph
        assert len(mon._step_handles) > 0
    assert _hook_state(net) == before
    assert mon._step_handles == [] and mon._handles == [] and mon._acc == {}
    # The graph built during the sampling step keeps no live telemetry hook: a backward after exit counts nothing.
    out.sum().backward()
    assert mon._acc == {} and x.grad is not None
    # The monitor keeps no reference to the model: it can be collected while the monitor lives on.
    ref = weakref.ref(net)
    del net, out
    gc.collect()
    assert ref() is None
    assert mon.latest()["step"] == 0  # the partial sample was flushed on close
    with pytest.raises(RuntimeError, match="closed"):
        mon.step()


def test_exit_on_exception_removes_hooks_without_flushing():
    net = _Net()
    sink = ListSink()
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(KeyError):
        with Monitor(net, sinks=[sink]) as mon:
            out = net(x)
            assert len(out._backward_hooks) == 1  # the dy hook of fc2, registered on a sampling step
            raise KeyError("boom")
    assert sink.records == [] and _hook_state(net) == [0] * len(_hook_state(net))
    assert len(out._backward_hooks) == 0
    out.sum().backward()  # no hook left anywhere in the graph (the dx aliases included) counts anything
    assert mon._acc == {}


def test_layer_selection_and_validation():
    net = _BlockNet()
    with Monitor(net, layers=["stem", "head"], blocks=None, total=False) as mon:
        net(torch.randn(1, 1, 6, 6))
        assert {r["name"] for r in mon.step()} == {"stem", "head"}
    with pytest.raises(ValueError, match="valid names: stem, layer1.0, layer1.2, head"):
        Monitor(net, layers=["conv9"])
    with pytest.raises(ValueError, match="every"):
        Monitor(net, every=0)
    with pytest.raises(TypeError, match="write"):
        Monitor(net, sinks=[object()])
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        Monitor(nn.ReLU())


def test_jsonl_and_csv_sinks_round_trip(tmp_path):
    net = _BlockNet()
    jpath, cpath = tmp_path / "t" / "telemetry.jsonl", tmp_path / "telemetry.csv"
    mem = ListSink()
    with Monitor(
        net, every=2, near_zero_threshold={"grad_weight": 1e-3}, sinks=[JsonlSink(jpath), CsvSink(cpath), mem]
    ) as mon:
        for _ in range(3):
            net(torch.randn(2, 1, 6, 6)).sum().backward()
            mon.step(epoch=0)
    # Flushed per sample: readable while the monitor would still be running is checked by reading after each run;
    # here both files hold exactly the in-memory records, with the same types.
    assert read_jsonl(jpath, missing_ok=False) == mem.records
    assert read_csv(cpath) == mem.records
    assert {r["step"] for r in mem.records} == {0, 2}
    gw = [r for r in mem.records if r["tensor"] == "grad_weight"]
    assert gw and all(r["threshold"] == 1e-3 and r["near_zero_sparsity"] is not None for r in gw)
    # Append mode: a resumed run adds to the same files; the CSV header is not repeated.
    with Monitor(net, sinks=[JsonlSink(jpath), CsvSink(cpath)], start_step=10) as mon:
        net(torch.randn(2, 1, 6, 6))
        n_new = len(mon.step())
    assert len(read_jsonl(jpath, missing_ok=False)) == len(mem.records) + n_new
    assert len(read_csv(cpath)) == len(mem.records) + n_new
    assert read_jsonl(jpath, missing_ok=False)[-1]["step"] == 10
    # Record fields are exactly the schema of common.md.
    assert set(mem.records[0]) == {
        "step",
        "epoch",
        "name",
        "kind",
        "tensor",
        "numel",
        "zeros",
        "sparsity",
        "near_zero_sparsity",
        "threshold",
    }


def test_jsonl_is_flushed_per_sample_and_truncated_line_skipped(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    net = _Net()
    mon = Monitor(net, sinks=[JsonlSink(path)])
    net(torch.randn(2, 4))
    mon.step()
    n = len(read_jsonl(path, missing_ok=False))  # visible on disk before close (a killed run keeps it)
    assert n > 0
    mon.close()
    with open(path, "a") as f:
        f.write(json.dumps({"step": 99})[:7])  # a write cut short by a kill
    assert len(read_jsonl(path, missing_ok=False)) == n
    with open(path, "a") as f:
        f.write("\n{bad}\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl(path, missing_ok=False)


def test_tensorboard_sink_import_error_names_extra(monkeypatch):
    import builtins

    from sparsetrain.telemetry import TensorBoardSink

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[tensorboard\]'"):
        TensorBoardSink("unused")


def test_monitor_on_sparsified_model():
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.25)
    assert handle.layers, "swat-u sparsified no layer"
    sink = ListSink()
    with Monitor(model, sinks=[sink]) as mon:
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        mon.step()
    recs = _by(sink.records)
    modules = dict(model.named_modules())
    for name in handle.layers:
        m = modules[name]
        ew = effective_weight(m)
        assert recs[name, "weight"]["zeros"] == int((ew == 0).sum())
        # top-K at density 0.25 leaves ~75% zeros in the forward weight
        assert recs[name, "weight"]["sparsity"] == pytest.approx(0.75, abs=0.02)
        assert recs[name, "grad_weight"]["zeros"] == int((m.weight.grad == 0).sum())
        assert (name, "grad_output") in recs
    assert _hook_state(model) == [0] * len(_hook_state(model))


def test_sparse_layers_are_observed_through_the_seam_only():
    """No hook of the Monitor's on a sparse layer; one whose spec became dense reports its plain operands through the
    seam, counted exactly as the hooks count the same plain module."""
    from sparsetrain.layers import LayerSpec, SparseLinear

    torch.manual_seed(0)
    plain = _Net()
    swapped = _Net()
    swapped.load_state_dict(plain.state_dict())
    swapped.fc2 = SparseLinear.from_dense(swapped.fc2, LayerSpec())  # a sparse layer whose spec is dense
    x = torch.randn(3, 4)
    out = {}
    for key, net in (("plain", plain), ("swapped", swapped)):
        sink = ListSink()
        with Monitor(net, sinks=[sink], blocks=None, near_zero_threshold=0.1) as mon:
            if key == "swapped":
                fc2 = net.fc2
                assert not fc2._forward_hooks and not fc2._forward_pre_hooks
                assert not fc2.weight._post_accumulate_grad_hooks
                assert net.fc1._forward_hooks  # the plain layer keeps its hooks
            net(x.clone().requires_grad_()).sum().backward()
            mon.step()
        out[key] = sink.records
    assert out["swapped"] == out["plain"]
    assert {r["tensor"] for r in out["plain"] if r["name"] == "fc2"} == set(TENSORS)


def test_periphery_imports_no_plotting_or_tensorboard():
    # A fresh interpreter: the test session itself may already have imported these.
    import subprocess
    import sys

    code = (
        "import sys, sparsetrain.telemetry, sparsetrain.accounting, sparsetrain.analysis\n"
        "heavy = ('matplotlib', 'scipy', 'tensorboard', 'torch.utils.tensorboard')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
