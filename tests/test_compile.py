"""torch.compile takes the sparse kernel whole (in the style of torchao's test/float8/test_compile.py).

Every preset: the compiled model (``fullgraph=True``: no graph break anywhere) gives the eager model's forward bit
for bit under ``aot_eager`` (the same ATen ops, traced), and its gradients to float rounding: compiled CPU code
numbers a 4-D activation's kept positions channels_last (the layout Inductor runs convolutions in, see
``sparsifiers.selection_order``), so the weight-gradient convolution reads its saved input channels_last and sums in
another order (linear layers stay bit for bit). The test nets have no ties at the top-K
thresholds: with ties, compiled code keeps exactly k values (the static-shape tie rule) where eager CPU code keeps
every tie (see ``sparsifiers.topk_select``). A ResNet stack trains several steps without recompiling, and Inductor
(C++ code generation) compiles a SWAT-U stack to the same numbers within float tolerance.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain
from sparsetrain import sparsifiers as sp
from sparsetrain.layers import LayerSpec, LayerState, SparseConv2d, SparseLinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )


def _pair(preset: str, **kw):
    eager, compiled = _net(), _net()
    handles = [sparsetrain.sparsify_(m, preset, first_layer_dense=False, **kw) for m in (eager, compiled)]
    return eager, compiled, handles


@pytest.mark.parametrize("preset", [p for p in sparsetrain.list_presets() if p != "grad-prune"])
def test_compiled_forward_backward_equal_eager_for_every_preset(preset):
    torch._dynamo.reset()
    eager, compiled, _ = _pair(preset)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    y_e, y_c = eager(x), fn(x)
    assert torch.equal(y_e, y_c)
    g = torch.randn_like(y_e)
    y_e.backward(g)
    y_c.backward(g)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(q.grad == 0, p.grad == 0) or name.endswith("bias"), name  # the same entries pruned


def test_compiled_stochastic_gradient_pruning_is_one_graph_and_prunes():
    """Ye et al.'s pruning compiles whole; compiled code draws its noise from torch's global (seeded) RNG."""
    torch._dynamo.reset()
    eager, compiled, _ = _pair("grad-prune", p=0.9)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    y_e, y_c = eager(x), fn(x)
    assert torch.equal(y_e, y_c)  # the forward is untouched
    dense = _net()
    dense(x).sum().backward()
    y_c.sum().backward()
    y_e.sum().backward()
    # conv '2' prunes its grad_output: its weight gradient is an unbiased but noisy estimate of the dense one, in
    # both modes (different noise streams, same distribution).
    for mode in (eager, compiled):
        g, ref = mode[2].weight.grad, dense[2].weight.grad
        assert torch.isfinite(g).all() and not torch.equal(g, ref)
        assert (g - ref).norm() < ref.norm()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fullgraph_sparse_layer_with_every_forward_operand(kind):
    """One layer with weight, input, output and both per-GEMM operands sparse: one graph, eager's numbers."""
    torch._dynamo.reset()
    spec = LayerSpec(weight=sp.TopK(0.5), input=sp.Threshold(0.2), output=sp.TopK(0.7),
                     weight_for_grad_input=sp.TopK(0.3), input_for_grad_weight=sp.TopK(0.4), mask_inactive_grads=True)
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else nn.Linear(32, 6)
    cls = SparseConv2d if kind == "conv" else SparseLinear
    a = cls.from_dense(copy.deepcopy(dense), spec, LayerState(name="a"))
    b = cls.from_dense(copy.deepcopy(dense), spec, LayerState(name="b"))
    x = torch.randn(3, 4, 6, 6) if kind == "conv" else torch.randn(5, 32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fn = torch.compile(b, fullgraph=True, backend="aot_eager")
    ya, yb = a(xa), fn(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    if kind == "linear":
        assert torch.equal(xa.grad, xb.grad) and torch.equal(a.weight.grad, b.weight.grad)
    else:  # the saved input unpacked channels_last (see the module docstring)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.weight.grad == 0, a.weight.grad == 0)


def test_resnet_trains_compiled_without_graph_breaks_or_recompiles():
    """After the first step nothing recompiles: the forward reads no step counter (the handle sets due flags)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = sparsetrain.create_model("resnet20", num_classes=10, width_mult=0.25)
    handle = sparsetrain.sparsify_(model, "swat-u", density=0.2, threshold_period=2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    fn = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    try:
        for i in range(5):
            if i == 3:  # warm-up: the first step, and the first step that reuses the periodic threshold
                torch._dynamo.config.error_on_recompile = True
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            handle.step(opt)
            losses.append(float(loss))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert all(torch.isfinite(torch.tensor(losses)))
    assert handle.state_dict()["layers"]["layer1.0.conv1"]["computed_at"]["weight"] == 4  # periods still advance


@pytest.mark.slow
def test_inductor_compiles_a_swat_stack_to_eager_numbers():
    """Inductor's generated C++ (OpenMP) code: same forward and gradients within float32 tolerance."""
    torch._dynamo.reset()
    eager, compiled, _ = _pair("swat-u", density=0.3)
    fn = torch.compile(compiled, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    y_e, y_c = eager(x), fn(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    y_e.sum().backward()
    y_c.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_train_compile_flag_trains_and_measures(tmp_path):
    """``sparsetrain train --compile``: the step runs compiled, the epoch's measured densities come from eager."""
    from sparsetrain.training import TrainConfig, train

    torch._dynamo.reset()
    out = tmp_path / "run"
    summary = train(TrainConfig(epochs=1, train_subset=512, test_subset=256, batch_size=64, compile=True,
                                out=str(out), quiet=True, telemetry_every=0))
    assert (out / "checkpoint.pt").exists()
    assert 0.05 < summary["weight_density"] < 0.2  # measured on the eager last step
    assert 0.0 <= summary["final_test_acc"] <= 1.0


def _opcheck_cases():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 16, 16)).permute(0, 2, 3, 1).reshape(-1)  # a post-ReLU activation, flat
    k = 205
    thr, pos, values = torch.ops.sparsetrain.topk_select_k(x, k)
    return [
        (torch.ops.sparsetrain.topk_select_k, (x, k)),
        (torch.ops.sparsetrain.topk_threshold_k, (x, k)),
        (torch.ops.sparsetrain.scatter_k, (pos, values, x.numel())),
        (torch.ops.sparsetrain.pack_positive, (x,)),
        (torch.ops.sparsetrain.relu_backward_bits, (torch.randn_like(x), torch.ops.sparsetrain.pack_positive(x))),
        (torch.ops.sparsetrain.relu_backward_bits_transposed,
         (torch.randn(2, 8, 16, 16), torch.ops.sparsetrain.pack_positive(x), True)),
        (torch.ops.sparsetrain.relu_backward_bits_transposed,
         (torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last),
          torch.ops.sparsetrain.pack_positive(x), False)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_custom_ops_pass_opcheck(case):
    """The opaque ops compiled CPU code calls: registered correctly (schema, fake kernel, no aliasing)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_custom_ops_give_the_eager_selection_and_unpacking():
    torch.manual_seed(0)
    x = torch.randn(3000)
    thr, pos, values = torch.ops.sparsetrain.topk_select_k(x, 300)
    assert pos.shape == (300,) and pos.dtype == torch.int32
    assert torch.equal(values, x[pos.long()]) and (x.abs()[pos.long()] >= thr).all()
    assert thr == x.abs().kthvalue(3000 - 300 + 1).values
    dense = torch.ops.sparsetrain.scatter_k(pos, values, 3000)[:3000]
    assert torch.equal(dense, torch.where(x.abs() >= thr, x, torch.zeros(())))
    z = torch.zeros(100)  # fewer non-zeros than k: the unused slots are padding (position numel, value 0)
    z[:10] = 1.0
    _, pos, values = torch.ops.sparsetrain.topk_select_k(z, 20)
    assert pos.shape == (20,) and (pos[10:] == 100).all() and (values[10:] == 0).all()
    r = torch.relu(torch.randn(1001))
    bits = torch.ops.sparsetrain.pack_positive(r)
    dy = torch.randn(1001)
    assert torch.equal(torch.ops.sparsetrain.relu_backward_bits(dy, bits), torch.where(r > 0, dy, torch.zeros(())))


@pytest.mark.parametrize("bits_channels_last", [True, False])
def test_transposed_relu_backward_op_without_the_native_build_keeps_dy_layout(monkeypatch, bits_channels_last):
    """Without a C++ compiler the op runs the PyTorch path; it must still return dy's layout (its fake kernel's)."""
    import sparsetrain._relu_mask as rm

    monkeypatch.setattr(rm, "native", lambda: None)
    torch.manual_seed(0)
    out = torch.relu(torch.randn(2, 16, 5, 5))
    perm = (0, 2, 3, 1) if bits_channels_last else (0, 1, 2, 3)
    bits = torch.ops.sparsetrain.pack_positive(out.permute(perm).reshape(-1))
    dy = torch.randn(2, 16, 5, 5)
    if not bits_channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    got = torch.ops.sparsetrain.relu_backward_bits_transposed(dy, bits, bits_channels_last)
    assert torch.equal(got, torch.ops.aten.threshold_backward(dy, out, 0)) and got.stride() == dy.stride()


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 16, 5, 5), (2, 24, 8, 8)])
@pytest.mark.parametrize("bits_channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_backward_reads_bits_packed_in_the_other_layout(shape, bits_channels_last, dtype):
    """Compiled code packs a ReLU output channels_last; a gradient through a residual add arrives NCHW (and the
    other way round): the kernel reads the bits transposed and returns dy's layout, equal to threshold_backward."""
    from sparsetrain import packing
    from sparsetrain._relu_mask import pack_positive, relu_backward

    torch.manual_seed(0)
    # odd sizes (bytes straddle planes and pixels), channels in groups of 8 (the transposed-tile path) with a pixel
    # tail, and whole 16-pixel tiles
    out = torch.relu(torch.randn(shape)).to(dtype)
    perm = (0, 2, 3, 1) if bits_channels_last else (0, 1, 2, 3)
    bits = torch.ops.sparsetrain.pack_positive(out.permute(perm).reshape(-1))
    dy = torch.randn(shape).to(dtype)
    if not bits_channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    want = torch.ops.aten.threshold_backward(dy, out, 0)
    got = torch.ops.sparsetrain.relu_backward_bits_transposed(dy, bits, bits_channels_last)
    assert torch.equal(got, want) and got.stride() == dy.stride()
    meta = packing.Packed("mask", tuple(out.shape), torch.bool, perm, out.numel())
    assert torch.equal(relu_backward(dy, meta, bits), want)  # the dispatching helper picks the same kernel
    assert pack_positive(out)[0].perm is not None
