"""Real savings: packed saved tensors, the 1-bit-mask ReLU, autocast, and the stateless kernel's contract."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain
from sparsetrain import packing
from sparsetrain import sparsifiers as sp
from sparsetrain.layers import LayerSpec, LayerState, PackedReLU, SparseConv2d, SparseLinear, observe
from sparsetrain.recipe import list_presets


class ConvBNReLU(nn.Module):
    """A small Conv-BN-ReLU stack with module ReLUs (what sparsify_ can swap) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


PRESET_KW = {"grad-prune": {}, "threshold": {}, "dense": {}}


def _preset_kwargs(preset, density=0.2):
    return PRESET_KW.get(preset, {"density": density})


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 1.0])
def test_pack_round_trip_is_exact(layout, dtype, density):
    g = torch.Generator().manual_seed(0)
    t = {
        "contiguous": lambda: torch.randn(4, 6, 9, 7, generator=g),
        "channels_last": lambda: torch.randn(4, 6, 9, 7, generator=g).contiguous(memory_format=torch.channels_last),
        "transposed": lambda: torch.randn(30, 11, generator=g).t(),
        "vector": lambda: torch.randn(1001, generator=g),
    }[layout]().to(dtype)
    keep = torch.rand(t.shape, generator=g) < density
    x = t * keep
    meta, tensors = packing.pack(x, keep)
    y = packing.unpack(meta, tensors)
    assert torch.equal(x, y) and y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == x.stride()  # channels_last stays channels_last (no layout change in backward)
    stored = sum(s.numel() * s.element_size() for s in tensors)
    dense = x.numel() * x.element_size()
    # values + min(bitmap, int32 indices): never more than the values plus 1 bit per element
    assert stored <= int(keep.sum()) * x.element_size() + (x.numel() + 7) // 8
    if density <= 0.2:
        assert stored < 0.4 * dense
    mm, mt = packing.pack_mask(keep)
    assert torch.equal(packing.unpack_mask(mm, mt), keep) and mt[0].numel() == (keep.numel() + 7) // 8


def test_pack_keeps_kept_zeros_and_default_mask():
    x = torch.tensor([0.0, 1.5, 0.0, -2.0, 0.0])
    keep = torch.tensor([True, True, False, True, False])
    meta, ts = packing.pack(x, keep)
    assert ts[0].tolist() == [0.0, 1.5, -2.0]  # a kept zero is stored as a value
    assert torch.equal(packing.unpack(meta, ts), x)
    meta, ts = packing.pack(x)  # default: the non-zeros
    assert ts[0].tolist() == [1.5, -2.0] and torch.equal(packing.unpack(meta, ts), x)


def test_bitmap_layout_is_little_endian_bits():
    m = torch.tensor([True] + [False] * 7 + [False, True])
    assert packing.packbits(m).tolist() == [1, 2]
    assert torch.equal(packing.unpackbits(packing.packbits(m), 10), m)


# ------------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("preset", list_presets())
def test_packing_does_not_change_gradients(preset):
    """Packed saved tensors are an implementation detail: every preset's gradients are bit-identical to unpacked."""
    torch.manual_seed(0)
    ref = ConvBNReLU()
    results = []
    for pack in (True, False):
        model = copy.deepcopy(ref)
        h = sparsetrain.sparsify_(model, preset, pack_saved=pack, seed=3, **_preset_kwargs(preset))
        packs_input = any(spec.resolved("input_for_grad_weight") is not None for spec in h.layers.values())
        assert any(isinstance(m, PackedReLU) for m in model.modules()) == (pack and packs_input)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        F.cross_entropy(model(x), torch.arange(4)).backward()
        results.append([x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_packing_saves_memory_in_conv_bn_relu_stacks():
    """What autograd keeps for backward: SWAT-U(0.1) with packing < 0.7x dense; without packing it is > dense."""
    torch.manual_seed(0)
    ref = ConvBNReLU()
    x = torch.randn(16, 3, 32, 32)

    def saved_bytes(model):
        seen = {}

        def hook(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            loss = model(x).sum()
        loss.backward()
        return sum(seen.values())

    dense = saved_bytes(copy.deepcopy(ref))
    packed_model = copy.deepcopy(ref)
    sparsetrain.sparsify_(packed_model, "swat-u", density=0.1)
    plain_model = copy.deepcopy(ref)
    sparsetrain.sparsify_(plain_model, "swat-u", density=0.1, pack_saved=False)
    packed, plain = saved_bytes(packed_model), saved_bytes(plain_model)
    assert packed < 0.7 * dense, (packed, dense)
    assert plain > dense  # the masking-library problem this module exists to fix


def test_backward_uses_the_forward_spec():
    """Changing a layer's spec between forward and backward must not change the gradients of that forward."""
    torch.manual_seed(0)
    dense = nn.Linear(12, 6)
    x = torch.randn(5, 12)
    spec_a = LayerSpec(weight=sp.TopK(0.25), input_for_grad_weight=sp.TopK(0.25))
    spec_b = LayerSpec(weight=sp.TopK(0.75), input_for_grad_weight=sp.TopK(0.75), grad_output=sp.TopK(0.1))
    grads = []
    for swap in (False, True):
        m = SparseLinear.from_dense(copy.deepcopy(dense), spec_a, LayerState(name="l"))
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        if swap:
            m.spec = spec_b
        y.square().sum().backward()
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_packed_relu_matches_relu():
    torch.manual_seed(0)
    for inplace in (False, True):
        x = torch.randn(3, 4, 5, 5)
        x[0, 0, 0, :2] = 0.0
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        ya = nn.ReLU(inplace=inplace)(a * 1.0)
        yb = PackedReLU(inplace=inplace)(b * 1.0)
        assert torch.equal(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(a.grad, b.grad)


def test_only_relus_whose_output_nothing_else_saves_are_swapped():
    class PoolNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1, self.pool = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2)
            self.conv2, self.relu2 = nn.Conv2d(8, 8, 3), nn.ReLU()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.pool(self.relu1(self.conv1(x)))  # max-pool saves its input: a packed ReLU would only cost
            return self.fc(self.relu2(self.conv2(x)).mean((2, 3)))  # mean saves nothing: relu2 is swapped

    model = PoolNet()
    sparsetrain.sparsify_(model, "swat-u", density=0.2, first_layer_dense=False)
    assert type(model.relu1) is nn.ReLU and type(model.relu2) is PackedReLU


def test_remove_restores_plain_relus_and_bake():
    model = ConvBNReLU()
    h = sparsetrain.sparsify_(model, "swat-u", density=0.2)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    expected = {n: m.effective_weight().clone() for n, m in model.named_modules() if n in h.layers}
    h.remove(bake=True)
    assert not any(isinstance(m, PackedReLU) for m in model.modules())
    assert type(model.relu2) is nn.ReLU and model.relu2.inplace
    for n, w in expected.items():
        assert torch.equal(model.get_submodule(n).weight, w)


# ------------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_under_cpu_autocast(preset):
    torch.manual_seed(0)
    model = ConvBNReLU()
    h = sparsetrain.sparsify_(model, preset, **_preset_kwargs(preset))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        opt.step()
        h.step(opt)


def test_density_one_under_autocast_equals_dense():
    torch.manual_seed(0)
    ref = ConvBNReLU()
    model = copy.deepcopy(ref)
    sparsetrain.sparsify_(model, {"preset": "swat-u", "density": 1.0, "first_layer_dense": False})
    x = torch.randn(4, 3, 8, 8)
    outs, grads = [], []
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        outs.append(y)
        grads.append([p.grad for p in m.parameters()])
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_autocast_saves_in_the_gemm_dtype():
    """Under bf16 autocast the packed values are bf16 (the storage dtype), not float32 copies.

    The sparse weight is not copied at all: backward recomputes it from the parameter (saved by reference) and its
    0-dim threshold, then casts it to the GEMM dtype.
    """
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 4, 3), LayerSpec(weight=sp.TopK(0.5),
                                   input_for_grad_weight=sp.TopK(0.5)), LayerState(name="c"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(torch.randn(2, 4, 6, 6, requires_grad=True))
    copies = [t for t in saved if t.is_floating_point() and t.dim() > 0 and t.data_ptr() != conv.weight.data_ptr()]
    assert copies and all(t.dtype == torch.bfloat16 for t in copies), [t.dtype for t in copies]
    assert any(t.data_ptr() == conv.weight.data_ptr() for t in saved)


# ------------------------------------------------------------------------------------------------ the seam
def test_observer_sees_every_gemm_operand_and_costs_nothing_when_off():
    model = ConvBNReLU()
    h = sparsetrain.sparsify_(model, "swat-u", density=0.2)
    events = []
    with observe(lambda ev: events.append((ev.layer, ev.operand, ev.after.shape))):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    ops = {(layer, op) for layer, op, _ in events}
    for layer in h.layers:
        for op in ("weight", "input", "output", "weight_for_grad_input", "input_for_grad_weight", "grad_output",
                   "grad_input", "grad_weight"):
            assert (layer, op) in ops, (layer, op)
    n = len(events)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert len(events) == n  # removed on exit


def test_measuring_is_on_demand():
    model = ConvBNReLU()
    h = sparsetrain.sparsify_(model, "swat-u", density=0.2, threshold_period=100)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert h.densities()["conv2"]["input_for_grad_weight"] == 0.2  # nothing measured: nominal
    with h.measuring():
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    d = h.densities()["conv2"]["input_for_grad_weight"]
    assert d != 0.2 and 0.15 < d < 0.3
