"""The handle: distributions (ERK, momentum), schedules, state_dict round trip and exact resume."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain
from sparsetrain import sparsifiers as sp
from sparsetrain.distributions import erk_densities, momentum_densities


class Net(nn.Module):
    """Known shapes: a (16,3,3,3) n=432, b (32,16,3,3) n=4608, c (10,32) n=320."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.c = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.b(x))
        return self.c(x.mean((2, 3)))


def test_erk_hand_computation():
    # raw = sum(shape)/prod(shape): a 25/432, b 54/4608, c 42/320.
    # density 0.1: budget 536 = 0.1 * 5360; eps = 536 / (25 + 54 + 42) = 536/121; no layer exceeds 1.
    h = sparsetrain.sparsify_(Net(), "swat-erk", density=0.1)
    d = {n: s.weight.density for n, s in h.layers.items()}
    assert d["a"] == pytest.approx(536 / 121 * 25 / 432)
    assert d["b"] == pytest.approx(536 / 121 * 54 / 4608)
    assert d["c"] == pytest.approx(536 / 121 * 42 / 320)
    assert h.layers["b"].input_for_grad_weight.density == d["b"]  # activations follow the layer's weights
    # density 0.5: eps = 2680/121 puts a (1.28) and c (2.91) over 1 -> dense; then b gets (2680-432-320)/4608.
    d = erk_densities({"a": (16, 3, 3, 3), "b": (32, 16, 3, 3), "c": (10, 32)}, 0.5)
    assert d == pytest.approx({"a": 1.0, "b": 1928 / 4608, "c": 1.0})


def test_momentum_densities_shares_and_cap():
    numel = {"x": 1000, "y": 1000, "z": 100}
    # budget 0.2 * 2100 = 420 non-zeros; shares 0.5, 0.25, 0.25 -> 210, 105, 105 (z capped at 99 -> 6 to x, y)
    d = momentum_densities(numel, {"x": 2.0, "y": 1.0, "z": 1.0}, 0.2)
    assert d["z"] == pytest.approx(0.99)
    assert d["x"] * 1000 == pytest.approx(210 + 6 * 2 / 3)
    assert d["y"] * 1000 == pytest.approx(105 + 6 * 1 / 3)
    assert sum(d[k] * numel[k] for k in numel) == pytest.approx(420)


def test_swat_m_follows_momentum():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    h = sparsetrain.sparsify_(model, "swat-m", density=0.2)
    assert {n: s.weight.density for n, s in h.layers.items()} == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.2})
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4)).backward()
    opt.step()
    # Overwrite the momentum buffers: layer b's active weights get 4x the mean |momentum| of a and c.
    for name, value in (("a", 1.0), ("b", 4.0), ("c", 1.0)):
        opt.state[getattr(model, name).weight]["momentum_buffer"].fill_(value)
    h.step(opt)
    d = {n: s.weight.density for n, s in h.layers.items()}
    budget = 0.2 * (432 + 4608 + 320)
    assert d["b"] * 4608 == pytest.approx(budget * 4 / 6, rel=1e-6)
    assert d["a"] * 432 == pytest.approx(min(0.99 * 432, budget / 6), rel=1e-6)
    assert h.layers["b"].input_for_grad_weight.density == d["b"]
    with pytest.raises(ValueError, match="needs handle.step\\(optimizer\\)"):
        h.step()


def test_swat_m_averages_momentum_over_the_forward_active_set():
    """The statistic is the mean |momentum| over the weights the forward used, not those active after the step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    h = sparsetrain.sparsify_(model, "swat-m", density=0.2)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    # the forward's masks, computed independently from the weights before the step
    active = {n: sp.mask(getattr(model, n).weight.detach(), sp.TopK(0.2)) for n in ("a", "b", "c")}
    F.cross_entropy(model(x), y).backward()
    opt.step()  # a large step: the post-step top-K set differs from the forward's
    mom = {n: opt.state[getattr(model, n).weight]["momentum_buffer"].abs() for n in active}
    expected = {n: float(mom[n][active[n]].mean()) for n in active}
    numel = {n: getattr(model, n).weight.numel() for n in active}
    from sparsetrain.distributions import momentum_densities

    want = momentum_densities(numel, expected, 0.2)
    h.step(opt)
    got = {n: s.weight.density for n, s in h.layers.items()}
    assert got == pytest.approx(want, rel=1e-5)
    post = {n: sp.mask(getattr(model, n).weight.detach(), sp.TopK(0.2)) for n in active}
    assert any(not torch.equal(post[n], active[n]) for n in active)  # the two active sets really differ


def _train(model, handle, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        handle.step(opt)


RESUME_RECIPES = [
    {"preset": "swat-u", "density": 0.3, "threshold_period": 3, "first_layer_dense": False,
     "layers": {"b": {"weight": {"type": "topk", "density": 0.3}, "grad_output": {"type": "dbtd", "p": 0.9}}}},
    {"preset": "swat-m", "density": 0.3},
    {"preset": "random-channel", "density": 1.0, "start_density": 0.125, "densify_every": 2},
    {"preset": "swat-u", "density": 0.3, "freeze_topology_after": 3},
]


@pytest.mark.parametrize("recipe", RESUME_RECIPES, ids=["period+dbtd", "swat-m", "densify", "freeze"])
def test_resume_reproduces_uninterrupted_run(recipe):
    torch.manual_seed(0)
    init = Net()
    # Uninterrupted: 6 steps.
    m1 = copy.deepcopy(init)
    h1 = sparsetrain.sparsify_(m1, recipe)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9)
    _train(m1, h1, o1, 4, seed=1)
    _train(m1, h1, o1, 3, seed=2)
    # Interrupted after 4 steps: save, rebuild everything from scratch, load, continue.
    m2 = copy.deepcopy(init)
    h2 = sparsetrain.sparsify_(m2, recipe)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    _train(m2, h2, o2, 4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sparsity": h2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3 = Net()
    h3 = sparsetrain.sparsify_(m3, recipe)
    m3.load_state_dict(ckpt["model"])
    o3 = torch.optim.SGD(m3.parameters(), lr=0.05, momentum=0.9)
    o3.load_state_dict(ckpt["opt"])
    h3.load_state_dict(ckpt["sparsity"])
    assert h3.layers == h2.layers
    _train(m3, h3, o3, 3, seed=2)
    for (n, a), (_, b) in zip(m1.named_parameters(), m3.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("preset", ["swat-u", "swat-channel"])
def test_period_keeps_weight_masks_honest_and_activation_thresholds_drift(preset):
    """Between recomputes a weight keeps its last mask (exact kept fraction); an activation reuses its threshold."""
    torch.manual_seed(0)
    model = Net()
    h = sparsetrain.sparsify_(model, preset, density=0.3, first_layer_dense=False, threshold_period=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 3, 8, 8)
    with h.measuring():
        model(x).sum().backward()
    d0 = h.densities()["b"]
    state0 = h.state_dict()["layers"]["b"]["thresholds"]
    thr0, mask0 = state0["weight"].clone(), state0["weight/mask"].clone()
    _train(model, h, opt, 5, seed=0)  # large steps: the weights move a lot
    state = h.state_dict()["layers"]["b"]["thresholds"]
    assert torch.equal(state["weight"], thr0) and torch.equal(state["weight/mask"], mask0)
    with h.measuring():
        model(torch.randn(8, 3, 8, 8)).sum().backward()
    d = h.densities()["b"]
    # the weight's kept fraction is exactly what it was at the recompute ...
    assert d["weight"] == d0["weight"]
    assert (sparsetrain.layers.effective_weight(model.b) != 0).float().mean() <= d0["weight"]
    # ... while the activation (a new tensor every step) reuses the threshold and drifts, which is measured
    assert d["input_for_grad_weight"] != pytest.approx(0.3, abs=1e-3)


def test_freeze_topology_after_epochs():
    model = Net()
    h = sparsetrain.sparsify_(model, {"preset": "swat-u", "density": 0.2, "freeze_topology_after": "2 epochs"})
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for epoch in range(2):
        h.set_epoch(epoch)
        _train(model, h, opt, 2, seed=epoch)
    assert "weight" not in h.state_dict()["layers"]["b"]["frozen"]
    h.set_epoch(2)
    mask = h.state_dict()["layers"]["b"]["frozen"]["weight"].clone()
    _train(model, h, opt, 3, seed=5)
    assert torch.equal(h.modules["b"].effective_weight() != 0, mask)


def _mask(h, name):
    return h.state_dict()["layers"][name]["thresholds"]["weight"]


def test_densification_masks_are_nested_and_double_until_dense():
    model = Net()
    h = sparsetrain.sparsify_(model, {"preset": "random-channel", "density": 1.0, "start_density": 0.125,
                                      "densify_every": 1})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counts, masks = [], [_mask(h, "b").clone()]
    for _ in range(4):
        counts.append(int(masks[-1].sum()))
        _train(model, h, opt, 1, seed=0)
        if h.layers["b"].weight is None:
            break
        masks.append(_mask(h, "b").clone())
    # b connects 16 inputs to 32 outputs: 2 inputs per output, then 4, 8, 16 (dense: the sparsifier is dropped)
    assert counts == [64, 128, 256]
    for old, new in zip(masks, masks[1:]):
        assert torch.equal(old & new, old)  # connections are only added
    assert h.layers["b"].is_dense


def test_random_channel_reports_what_the_mask_keeps():
    h = sparsetrain.sparsify_(Net(), "random-channel", density=0.1)
    nominal = h.nominal_densities()
    # a: 3 input channels -> one each (1/3); b: 16 inputs -> round(1.6) = 2 each (1/8)
    assert nominal["a"]["weight"] == pytest.approx(1 / 3)
    assert nominal["b"]["weight"] == pytest.approx(2 / 16)
    assert h.densities()["a"]["weight"] == pytest.approx(1 / 3)


def test_single_input_channel_layers_keep_sqrt_alpha_of_their_outputs():
    mask = sp.random_channel_mask(16, 1, 0.25, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 8  # sqrt(0.25) * 16, as Changpinyo et al. do for layers with one filter


def test_random_channel_mask_is_fixed_and_inactive_weights_do_not_learn():
    torch.manual_seed(0)
    model = Net()
    h = sparsetrain.sparsify_(model, "random-channel", density=0.25)
    assert sorted(h.layers) == ["a", "b"]  # fully connected layers stay dense
    w0 = model.b.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, h, opt, 3, seed=0)
    keep = sp.mask(w0, h.layers["b"].weight, key="b")
    assert torch.equal(model.b.weight[~keep], w0[~keep])  # masked weights untouched (no weight decay here)
    assert not torch.equal(model.b.weight[keep], w0[keep])
    per_out = keep[:, :, 0, 0].sum(1)
    assert torch.all(per_out == 4)  # 25% of 16 input channels


def test_densities_report_every_operand():
    model = Net()
    h = sparsetrain.sparsify_(model, "swat-u", density=0.25)
    nominal = h.nominal_densities()
    assert nominal["b"]["weight"] == 0.25 and nominal["b"]["input_for_grad_weight"] == 0.25
    assert nominal["b"]["grad_output"] == 1.0
    with h.measuring():
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    d = h.densities()
    assert set(d) == {"b", "c"}
    assert d["b"]["weight_for_grad_input"] == d["b"]["weight"]
    gp = sparsetrain.sparsify_(Net(), "grad-prune", p=0.9, placement="grad_output").nominal_densities()
    assert gp["a"]["grad_output"] == pytest.approx(0.5487, abs=1e-3)  # Gaussian model: 45% zeros at p=0.9


def test_remove_restores_plain_modules_and_keys():
    model = Net()
    keys = list(model.state_dict())
    h = sparsetrain.sparsify_(model, "swat-u", density=0.5)
    assert list(model.state_dict()) == keys
    vanilla = Net()
    vanilla.load_state_dict(model.state_dict())  # a sparse model's checkpoint loads into the dense one
    h.remove()
    assert type(model.b) is nn.Conv2d and type(model.c) is nn.Linear
    assert list(model.state_dict()) == keys
