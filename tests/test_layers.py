"""The custom autograd mechanism: SWAT against an explicit-mask reference, gradcheck, bit-identity when dense."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain
from sparsetrain import sparsifiers as sp
from sparsetrain.layers import (
    OPERANDS,
    ConvGemm,
    LayerSpec,
    LayerState,
    LinearGemm,
    SparseConv2d,
    SparseLinear,
    observe,
    sparse_gemm,
)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Reference top-K written independently: sort all magnitudes, keep >= the k-th largest."""
    flat = t.detach().abs().flatten()
    k = int(torch.ceil(torch.tensor(density * flat.numel())).item())
    thr = flat.sort(descending=True).values[k - 1]
    return (t.detach().abs() >= thr).to(t.dtype)


def _swat_layer(x, w, b, layer_fn, density):
    """SWAT reference: forward f(x, topk(W)); dx = G(dy, topk(W)); dW = H(dy, topk(x)), dense dW.

    y = f(x, Ws.detach()) + f(xs.detach(), W) - f(xs.detach(), W).detach() has exactly that value and those
    gradients with plain autograd.
    """
    ws = w * _topk_mask(w, density)
    xs = x.detach() * _topk_mask(x, density)
    y = layer_fn(x, ws.detach(), b) + layer_fn(xs, w, None) - layer_fn(xs, w, None).detach()
    return y


def _reference_forward(model, x, density):
    conv2 = lambda x_, w_, b_: F.conv2d(x_, w_, b_, stride=2, padding=1)  # noqa: E731
    h = F.relu(model.conv1(x))  # first layer dense (SWAT-U default)
    h = F.relu(_swat_layer(h, model.conv2.weight, None, conv2, density))
    return _swat_layer(h.flatten(1), model.fc.weight, model.fc.bias, F.linear, density)


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_swat_u_matches_explicit_mask_reference(density):
    torch.manual_seed(0)
    ref = SmallCNN()
    model = copy.deepcopy(ref)
    handle = sparsetrain.sparsify_(model, "swat-u", density=density)
    assert sorted(handle.layers) == ["conv2", "fc"]  # first layer dense
    x = torch.randn(4, 3, 8, 8)
    x_ref = x.clone().requires_grad_(True)
    x_sp = x.clone().requires_grad_(True)
    y_ref = _reference_forward(ref, x_ref, density)
    with handle.measuring():
        y_sp = model(x_sp)
        torch.testing.assert_close(y_sp, y_ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y_sp.backward(g)
    torch.testing.assert_close(x_sp.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (n, p_sp), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p_sp.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=n)
    # SWAT's dW is dense: inactive weights get gradient too (dynamic topology exploration).
    inactive = model.fc.effective_weight() == 0
    assert model.fc.weight.grad[inactive].count_nonzero() > 0
    # Measured densities: top-K keeps ceil(d*n) (ties aside).
    dens = handle.densities()
    assert dens["fc"]["weight"] == pytest.approx(density, abs=1 / model.fc.weight.numel() + 1e-6)
    assert dens["conv2"]["input_for_grad_weight"] == pytest.approx(density, abs=0.01)
    assert dens["conv2"]["input"] == 1.0  # SWAT keeps the forward activation dense


@pytest.mark.parametrize("pack", [True, False])
def test_saved_activation_is_the_sparse_one(pack):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3)
    m = SparseConv2d.from_dense(
        conv, LayerSpec(weight=sp.TopK(density=0.2), input_for_grad_weight=sp.TopK(0.2)),
        LayerState(name="c", pack_saved=pack),
    )
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    saved = []

    def hook(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
        m(x)
    assert all(t is not x for t in saved)
    floats = [t for t in saved if t.dtype.is_floating_point]
    k = int(0.2 * x.numel()) + 1
    if pack:
        # Saved as the top-K selection: the kept values and their int32 positions (k of each); no dense copy.
        assert not any(t.numel() == x.numel() for t in floats), [t.shape for t in floats]
        values = [t for t in floats if k - 2 <= t.numel() <= k]
        assert values, [t.shape for t in floats]
        pos = [t for t in saved if t.dtype == torch.int32]
        assert len(pos) == 1 and pos[0].numel() == values[0].numel()
        assert int(pos[0].max()) < x.numel() and torch.equal(x.detach().flatten()[pos[0].long()], values[0])
    else:
        x_saved = [t for t in floats if t.numel() == x.numel()]
        assert x_saved and int(x_saved[0].count_nonzero()) <= k  # x stored with top-K applied


OP_CFGS = {
    "weight": [
        sp.TopK(density=0.5),
        sp.ChannelTopK(density=0.5),
        sp.Threshold(0.3),
        sp.NM(n=2, m=4),
        sp.RandomChannel(density=0.5),
    ],
    "input": [sp.TopK(density=0.5), sp.Threshold(0.3)],
    "output": [sp.Threshold(0.1)],
}


def _forward_exact_specs():
    """Every combination of forward operands the presets and recipes use, with exact-gradient backward.

    Backward-only operands (input_for_grad_weight, grad_output, grad_input, grad_weight) are by design *not*
    derivatives of the forward (SWAT, meProp, Ye et al.); they are checked against the reference above and the
    plumbing tests below. With ``mask_inactive_grads`` and inheriting per-GEMM operands, the custom Function's
    backward must be the exact gradient of its forward: that is what gradcheck verifies.
    """
    choices = [[None] + OP_CFGS["weight"], [None] + OP_CFGS["input"], [None] + OP_CFGS["output"]]
    for w, i, o in itertools.product(*choices):
        yield LayerSpec(weight=w, input=i, output=o, mask_inactive_grads=True)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gradcheck_float64_every_forward_combination(kind):
    torch.manual_seed(0)
    for spec in _forward_exact_specs():
        if kind == "conv":
            dense = nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2, dtype=torch.float64)
            x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        else:
            dense = nn.Linear(8, 4, dtype=torch.float64)
            x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
        cls = SparseConv2d if kind == "conv" else SparseLinear
        m = cls.from_dense(dense, spec, LayerState(name="l"))

        gemm = ConvGemm(m.stride, m.padding, m.dilation, m.groups) if kind == "conv" else LinearGemm()

        def f(x_, w_):
            return sparse_gemm(m.sparse_state, spec, gemm, x_, w_, m.bias)

        # float64 dilated grouped convs take a slow reference kernel: the conv case checks random projections of
        # the Jacobian (gradcheck's fast mode, a few evaluations instead of one per element); linear is checked whole.
        assert torch.autograd.gradcheck(f, (x, m.weight), eps=1e-6, atol=1e-5, fast_mode=kind == "conv"), spec


def _all_density_one_spec():
    one = sp.TopK(density=1.0)
    return LayerSpec(**{op: one for op in OPERANDS})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_all_operands_density_one_is_bit_identical(dtype, channels_last):
    torch.manual_seed(0)
    ref = SmallCNN().to(dtype)
    model = copy.deepcopy(ref)
    spec = _all_density_one_spec()
    handle = sparsetrain.sparsify_(
        model, {"layers": {"conv1": spec.to_dict(), "conv2": spec.to_dict(), "fc": spec.to_dict()}}
    )
    assert len(handle.layers) == 3
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    xr, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, ys = ref(xr), model(xs)
    assert torch.equal(yr, ys)
    g = torch.randn_like(yr)
    yr.backward(g)
    ys.backward(g)
    assert torch.equal(xr.grad, xs.grad)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


@pytest.mark.parametrize("preset", ["swat-u", "swat-erk", "swat-m", "swat-channel", "meprop", "random-channel"])
def test_presets_at_density_one_are_bit_identical(preset):
    torch.manual_seed(0)
    ref = SmallCNN()
    model = copy.deepcopy(ref)
    handle = sparsetrain.sparsify_(model, preset, density=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # several steps: SWAT-M redistribution and periods must keep it exact
        x = torch.randn(4, 3, 8, 8)
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), torch.arange(4)).backward()
            o.step()
        handle.step(opt)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_backward_operand_plumbing():
    """grad_output feeds both GEMMs; grad_input / grad_weight act on the results; overrides pick the tensors."""
    torch.manual_seed(0)
    dense = nn.Linear(6, 5)
    x = torch.randn(7, 6)
    dy = torch.randn(7, 5)
    mdy = _topk_mask(dy, 0.3)
    spec = LayerSpec(
        grad_output=sp.TopK(density=0.3),
        grad_input=sp.Threshold(0.2),
        grad_weight=sp.TopK(0.5),
        weight_for_grad_input=sp.TopK(density=0.4),
        input_for_grad_weight=sp.Threshold(0.5),
    )
    m = SparseLinear.from_dense(copy.deepcopy(dense), spec, LayerState(name="l"))
    xs = x.clone().requires_grad_(True)
    y = m(xs)
    torch.testing.assert_close(y, dense(x))  # forward operands are dense
    y.backward(dy)
    dy_s = dy * mdy
    dx = dy_s @ (dense.weight * _topk_mask(dense.weight, 0.4))
    dx = dx * (dx.abs() > 0.2)
    dw = dy_s.t() @ (x * (x.abs() > 0.5))
    dw = dw * _topk_mask(dw, 0.5)
    torch.testing.assert_close(xs.grad, dx)
    torch.testing.assert_close(m.weight.grad, dw)
    torch.testing.assert_close(m.bias.grad, dy_s.sum(0))


def test_from_dense_to_dense_keeps_parameters_and_keys():
    conv = nn.Conv2d(3, 4, 3)
    keys = set(conv.state_dict())
    sparse = SparseConv2d.from_dense(conv, LayerSpec(weight=sp.TopK(0.5)))
    assert sparse.weight is conv.weight and isinstance(sparse, nn.Conv2d)
    assert set(sparse.state_dict()) == keys
    back = sparse.to_dense()
    assert type(back) is nn.Conv2d and back.weight is conv.weight
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got 'reflect'"):
        SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding_mode="reflect"), LayerSpec())


def test_no_backward_work_in_eval():
    m = SparseConv2d.from_dense(
        nn.Conv2d(3, 4, 3), LayerSpec(weight=sp.TopK(0.5), input_for_grad_weight=sp.TopK(0.5)), LayerState(name="c")
    )
    seen = []
    with torch.no_grad(), observe(lambda ev: seen.append(ev.operand)):
        m(torch.randn(2, 3, 5, 5))
    assert seen == ["weight", "input", "output"]  # no backward-only operand is computed
