"""The native CPU kernels (sparsetrain/_native): built where a compiler exists, and bit-identical to the PyTorch path.

Every native function is compared element for element with the pure-PyTorch code it replaces (run inside
``native_disabled()``), over sizes on both sides of the sampled bracket, densities, dtypes, memory layouts and the
awkward inputs (ties, all zeros, a threshold of 0, infinities, NaN); then a whole SWAT-U training step.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsetrain
from sparsetrain import _native, packing
from sparsetrain import sparsifiers as sp
from sparsetrain._relu_mask import pack_positive, relu_backward

HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None

needs_native = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler: the PyTorch path is what runs")


def test_native_builds_where_a_compiler_exists():
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler")
    assert _native.native() is not None, _native.native_status()
    assert _native.native_status() == "built"


def _tensor(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((kind, shape)) % 2**31)
    x = torch.randn(shape, generator=g)
    if kind == "relu":
        x = x.relu()
    elif kind == "ties":
        x = (x * 2).round()
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "inf":
        x.view(-1)[:: max(1, x.numel() // 7)] = float("inf")
    return x.to(dtype)


SHAPES = [(5,), (3, 5), (1000,), (4096,), (64, 64, 3, 3), (70_000,), (64, 16, 32, 32), (64, 64, 8, 8), (300_001,)]


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "zeros", "inf"])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.9])
def test_topk_select_equals_the_pytorch_path(shape, kind, density):
    x = _tensor(kind, shape, torch.float32)
    got = sp.topk_select(x, density)
    with _native.native_disabled():
        want = sp.topk_select(x, density)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(sp.topk_threshold(x, density), want[0])


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000,), (64, 16, 32, 32)])
def test_topk_select_half_precision_equals_the_pytorch_path(dtype, shape):
    x = _tensor("relu", shape, dtype)
    got = sp.topk_select(x, 0.1)
    with _native.native_disabled():
        want = sp.topk_select(x, 0.1)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@needs_native
def test_channels_last_and_nan_inputs_equal_the_pytorch_path():
    x = _tensor("relu", (8, 16, 20, 20), torch.float32).to(memory_format=torch.channels_last)
    got = sp.topk_select(x, 0.2)
    with _native.native_disabled():
        want = sp.topk_select(x, 0.2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # A NaN magnitude: the native kernel declines and the PyTorch path (which orders NaN) answers.
    y = torch.randn(100_000)
    y[123] = float("nan")
    got = sp.topk_select(y, 0.1)
    with _native.native_disabled():
        want = sp.topk_select(y, 0.1)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@needs_native
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 1000, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_mask_and_backward_equal_autograd(n, dtype):
    out = torch.randn(n).relu().to(dtype)
    meta, (bits,) = pack_positive(out)
    assert torch.equal(bits, packing.packbits(out > 0))
    dy = torch.randn(n).to(dtype)
    dy[::5] = float("nan")
    want = torch.ops.aten.threshold_backward(dy, out, 0)
    got = relu_backward(dy, meta, bits)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    real = ~want.isnan()  # (a NaN's sign bit is not a value; bf16 NaNs differ there)
    assert torch.equal(got.signbit() & real, want.signbit() & real)  # +0 where the bit is clear, as autograd writes


@needs_native
def test_scatter_into_a_reused_buffer_equals_index_put():
    shape = (4, 8, 16, 16)
    n = math.prod(shape)
    pos = torch.randperm(n)[: n // 10].sort().values.to(torch.int32)
    vals = torch.randn(pos.numel())
    got = packing.scatter(pos, vals, shape, (0, 1, 2, 3), reuse="test-native").clone()
    with _native.native_disabled():
        want = packing.scatter(pos, vals, shape, (0, 1, 2, 3), reuse="test-native")
    assert torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("model", ["resnet20", "vgg11_bn"])
def test_a_swat_step_is_bit_identical_with_and_without_native(model):
    def grads(native: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = sparsetrain.create_model(model, num_classes=10)
        sparsetrain.sparsify_(m, "swat-u", density=0.1)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        if native:
            F.cross_entropy(m(x), y).backward()
        else:
            with _native.native_disabled():
                F.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    for g, w in zip(grads(True), grads(False)):
        assert torch.equal(g, w)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_native, "_load", fail)
    monkeypatch.setitem(_native._STATE, "tried", False)
    monkeypatch.setitem(_native._STATE, "module", None)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable .*no compiler here.*PyTorch path"):
        assert _native.native() is None
    assert "no compiler here" in _native.native_status()
    x = torch.randn(100_000).relu()
    thr, pos, vals = sp.topk_select(x, 0.1)  # the PyTorch path answers
    assert pos.numel() == math.ceil(0.1 * x.numel())


def test_sparsetrain_native_0_disables_it_in_a_fresh_process():
    code = ("import torch, sparsetrain, sparsetrain._native as n, sparsetrain.sparsifiers as sp;"
            "sp.topk_select(torch.randn(100000), 0.1); print(n.native_status())")
    env = dict(os.environ, SPARSETRAIN_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "disabled by SPARSETRAIN_NATIVE=0" in out.stdout
    assert "unavailable" not in out.stderr  # turning it off is not a warning


@needs_native
def test_mask_by_threshold_equals_the_pytorch_ops():
    from sparsetrain._eager_topk import masked_by_threshold

    w = torch.randn(64, 64, 3, 3)
    w.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, -1e-30])
    thr = sp.topk_threshold(w.nan_to_num(), 0.1)
    got = masked_by_threshold(w, thr)
    with _native.native_disabled():
        want = masked_by_threshold(w, thr)
    assert torch.equal(got.isnan(), want.isnan())
    real = ~want.isnan()
    assert torch.equal(got[real], want[real]) and torch.equal(got.signbit()[real], want.signbit()[real])
