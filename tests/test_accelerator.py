"""Simulated sparse accelerator: exact effectual-MAC counts, 1.0x when dense, monotone in sparsity, real capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsetrain
from sparsetrain.accounting.accelerator import (
    PASSES,
    AcceleratorConfig,
    GemmCapture,
    capture_step,
    effectual_macs,
    gemm_cycles,
    simulate,
    simulate_capture,
)

CONFIGS = [
    AcceleratorConfig(),
    AcceleratorConfig(num_pes=4, multipliers_per_pe=8, granularity="channel"),
    AcceleratorConfig(num_pes=7, multipliers_per_pe=3, granularity="pixel", pixel_group=5),
]


def _nested_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest |t|: masks of higher sparsity are subsets of lower ones (t has no ties)."""
    if sparsity == 0:
        return t
    k = int(sparsity * t.numel())
    thr = t.abs().flatten().kthvalue(k).values
    return t * (t.abs() > thr)


# ----------------------------------------------------------------------------------------- hand examples
def test_effectual_macs_conv_by_hand() -> None:
    w = torch.tensor([[[[1.0, 0.0], [2.0, 3.0]]]])  # one zero tap
    x = torch.ones(1, 1, 3, 3)
    x[0, 0, 0, 0] = 0
    dy = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    cap = GemmCapture.conv("c", x, w, dy)
    # Forward: y[0,0] pairs x[0,0]*1 (x zero), x[0,1]*0 (w zero), x[1,0]*2, x[1,1]*3 -> 2 effectual.
    assert effectual_macs(cap, "forward").flatten().tolist() == [2, 3, 3, 3]
    assert effectual_macs(cap, "forward", dense=True).flatten().tolist() == [4, 4, 4, 4]
    # grad-input dx[i,j] = sum_{p,k: p+k=(i,j)} dy[p] W[k]; non-zero dy at (0,0) and (1,1), W zero at (0,1).
    gi = effectual_macs(cap, "grad_input")[0, 0]
    expected = torch.zeros(3, 3)
    for p in [(0, 0), (1, 1)]:
        for k in [(0, 0), (1, 0), (1, 1)]:
            expected[p[0] + k[0], p[1] + k[1]] += 1
    assert torch.equal(gi, expected)
    # grad-weight dW[k] = sum_p dy[p] x[p+k]: dy non-zero at (0,0), (1,1); x zero only at (0,0).
    gw = effectual_macs(cap, "grad_weight")[0, 0]
    assert gw.tolist() == [[1, 2], [2, 2]]
    assert effectual_macs(cap, "grad_weight").shape == w.shape


def test_effectual_macs_strided_grouped_conv_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    x = _nested_prune(torch.randn(2, 4, 7, 7, generator=g), 0.5)
    w = _nested_prune(torch.randn(6, 2, 3, 3, generator=g), 0.6)
    dy = _nested_prune(torch.randn(2, 6, 4, 4, generator=g), 0.3)
    cap = GemmCapture.conv("c", x, w, dy, stride=2, padding=1, groups=2)
    # Brute force via unfold: effectual MACs = sum over (output, tap) of [x != 0][w != 0][dy != 0 for backward].
    cols = torch.nn.functional.unfold((x != 0).float(), 3, padding=1, stride=2)  # (N, C*9, L)
    cols = cols.reshape(2, 2, 2 * 9, 16)  # groups
    wm = (w != 0).float().reshape(2, 3, 2 * 9)
    fwd = torch.einsum("ngkl,gok->ngol", cols, wm).reshape(2, 6, 4, 4)
    assert torch.equal(effectual_macs(cap, "forward"), fwd)
    dym = (dy != 0).float().reshape(2, 2, 3, 16)
    gw = torch.einsum("ngkl,ngol->gok", cols, dym).reshape(6, 2, 3, 3)
    assert torch.equal(effectual_macs(cap, "grad_weight"), gw)
    # grad-input total = sum over (n, o, p, tap in bounds) of dy!=0 and w!=0; per element checked via fold.
    per_tap = torch.einsum("ngol,gok->ngkl", dym, wm).reshape(2, 4 * 9, 16)
    gi = torch.nn.functional.fold(per_tap, (7, 7), 3, padding=1, stride=2)
    assert torch.equal(effectual_macs(cap, "grad_input"), gi)


def test_effectual_macs_linear_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 4.0, 5.0]])
    dy = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    cap = GemmCapture.linear("fc", x, w, dy)
    assert effectual_macs(cap, "forward").tolist() == [[1, 1], [0, 1]]
    assert effectual_macs(cap, "grad_input").tolist() == [[1, 1, 0], [1, 2, 1]]
    assert effectual_macs(cap, "grad_weight").tolist() == [[1, 0, 2], [0, 0, 1]]


def test_gemm_cycles_waves_by_hand() -> None:
    cfg = AcceleratorConfig(num_pes=2, multipliers_per_pe=16)
    # ceil(units/16) = [1, 2, 0, 2, 1]; waves [1,2] [0,2] [1] -> 2 + 2 + 1.
    assert gemm_cycles(torch.tensor([5.0, 17.0, 0.0, 32.0, 3.0]), cfg) == 5
    assert gemm_cycles(torch.tensor([]), cfg) == 0
    with pytest.raises(ValueError, match="granularity"):
        AcceleratorConfig(granularity="row")


# ----------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "channel", "pixel5"])
def test_dense_tensors_give_exactly_one(cfg: AcceleratorConfig) -> None:
    g = torch.Generator().manual_seed(0)
    conv = GemmCapture.conv(
        "c", torch.randn(2, 3, 9, 9, generator=g), torch.randn(5, 3, 3, 3, generator=g),
        torch.randn(2, 5, 5, 5, generator=g), stride=2, padding=1,
    )  # fmt: skip
    lin = GemmCapture.linear("l", torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g),
                             torch.randn(4, 3, generator=g))  # fmt: skip
    for cap in (conv, lin):
        r = simulate_capture(cap, cfg)
        for p in PASSES:
            assert r.speedup(p) == 1.0
            assert r.effectual_macs[p] == r.dense_macs[p] > 0
        assert r.speedup() == 1.0


def test_speedup_monotone_in_sparsity() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, 12, 12, generator=g), torch.randn(16, 8, 3, 3, generator=g)
    dy = torch.randn(4, 16, 12, 12, generator=g)
    for cfg in CONFIGS:
        prev: dict[str, float] = {}
        for s in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95):
            # SWAT: sparse W in forward and grad-input, sparse x for grad-weight, dense x forward, dense dy.
            ws, xs = _nested_prune(w, s), _nested_prune(x, s)
            cap = GemmCapture.conv("c", x, ws, dy, padding=1, x_for_grad_weight=xs)
            r = simulate_capture(cap, cfg)
            now = {p: r.speedup(p) for p in PASSES} | {"total": r.speedup()}
            if s == 0.0:
                assert now == {p: 1.0 for p in now}
            for k, v in prev.items():
                assert now[k] > v, (cfg, s, k, now[k], v)
            prev = now
        # With one operand sparse per GEMM, speedup can't beat 1/density by more than rounding.
        assert prev["total"] <= 1 / 0.05 * 1.01


# ----------------------------------------------------------------------------------------- real capture
def test_capture_uses_the_operands_the_sparse_layer_uses() -> None:
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5").train()
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    caps = {c.name: c for c in capture_step(model, x, y)}
    assert list(caps)[0] == "conv1" and set(caps) == {
        n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    first = caps["conv1"]
    assert not first.ran("grad_input") and first.ran("grad_weight")  # data needs no gradient
    assert first.weight.all()  # first layer dense
    for name in handle.layers:
        c = caps[name]
        assert c.ran("grad_input") and c.ran("grad_weight")
        assert c.weight.float().mean().item() == pytest.approx(0.1, abs=0.01)  # top-K W
        assert torch.equal(c.weight_for_grad_input, c.weight)  # SWAT: the same sparse W in backward
        assert c.input_for_grad_weight.float().mean().item() == pytest.approx(0.1, abs=0.01)  # top-K x saved
        assert c.input.float().mean().item() > 0.3  # forward activations stay dense (ReLU zeros only)
    # dy is not pruned by SWAT: the classifier's dy (softmax gradient) is fully dense. (Inner layers' dy carry the
    # natural zeros of max-pool and ReLU backward.)
    assert caps["fc"].grad_output.all()
    report = simulate(model, [(x, y)], AcceleratorConfig(num_pes=16, multipliers_per_pe=8))
    assert report.speedup("forward") > 1.5 and report.speedup("grad_weight") > 1.5
    assert report.speedup() > 1.5
    d = report.to_dict()
    assert set(d["speedup"]) == {"forward", "grad_input", "grad_weight", "backward", "total"}
    assert "overall" in report.format_table()
    # Nothing is left attached: a second capture of the same batch sees the same operands (no doubled records).
    again = {c.name: c for c in capture_step(model, x, y)}
    for name, c in caps.items():
        assert torch.equal(again[name].weight, c.weight) and torch.equal(again[name].grad_output, c.grad_output)
    assert all(not m._forward_hooks for m in model.modules())


def test_dense_model_simulates_at_relu_sparsity_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))  # fmt: skip
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    caps = capture_step(model, x, y)
    assert [c.name for c in caps] == ["0", "2", "4"]
    assert caps[0].weight.all() and caps[0].input.all()
    assert not caps[1].input.all()  # ReLU output: zeros are effectual-skippable even in a dense model
    # The in-place ReLU right after conv "0" must not hide its dy: the hook sees the gradient w.r.t. the conv
    # output, which is zero exactly where the pre-activation was negative.
    with torch.no_grad():
        pre = model[0](x)
    assert torch.equal(caps[0].grad_output, pre > 0) or not (caps[0].grad_output & (pre <= 0)).any()
    assert 0.3 < caps[0].grad_output.float().mean().item() < 0.7
    r = simulate(model, [(x, y)])
    assert r.speedup("forward") > 1.0
    assert r.layers[0].speedup("forward") == 1.0
    # Relative to itself a run is 1.0x; over two steps of the same batch, cycles per step are unchanged.
    assert r.speedup_over(r) == 1.0
    r2 = simulate(model, [(x, y), (x, y)])
    assert r2.cycles() == 2 * r.cycles() and r2.speedup_over(r) == 1.0
    assert r.cycles(sparse=False) == r.cycles("forward", sparse=False) + r.cycles("backward", sparse=False)


def test_real_mnist_lenet5_swat_u_speedup(require_dataset) -> None:
    path = require_dataset("mnist") / "test.npz"
    import numpy as np

    with np.load(path) as z:
        xs = torch.from_numpy(z["x"][:64]).float().div(255).sub(0.1307).div(0.3081)
        ys = torch.from_numpy(z["y"][:64]).long()
    xs = xs.reshape(64, 28, 28, -1).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5").train()
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(xs[i : i + 32], ys[i : i + 32]) for i in (0, 32)]
    report = simulate(model, batches, AcceleratorConfig(num_pes=16, multipliers_per_pe=8), optimizer=opt,
                      handle=handle)  # fmt: skip
    assert report.steps == 2
    # Sparse layers keep 10 % of W (forward, dx) and of x (dW); the dense first layer bounds the total.
    assert 2.0 < report.speedup() < 10.0
    assert report.effectual_fraction("forward") < 0.5
