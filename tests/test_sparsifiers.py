"""Sparsifiers: each pure function against a hand computation; DBTD statistics."""

import math

import pytest
import torch

from sparsetrain import sparsifiers as sp


def test_topk_keeps_k_largest_over_whole_tensor():
    x = torch.tensor([[0.1, -3.0, 2.0], [0.5, -0.2, 1.0]])
    out = sp.sparsify(x, sp.TopK(density=0.5))  # k = ceil(0.5 * 6) = 3
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))


def test_topk_k_is_ceil_and_ties_are_kept():
    x = torch.arange(1, 11, dtype=torch.float32)
    assert int(sp.sparsify(x, sp.TopK(density=0.25)).count_nonzero()) == 3  # ceil(2.5)
    ties = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert int(sp.sparsify(ties, sp.TopK(density=0.5)).count_nonzero()) == 3  # |v| >= 2 kept


def test_topk_batch_included_for_activations():
    x = torch.zeros(2, 4)
    x[0] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    x[1] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = sp.sparsify(x, sp.TopK(density=0.5))
    assert torch.equal(out[1], torch.zeros(4))  # the whole batch shares one threshold
    assert torch.equal(out[0], x[0])


def test_density_one_returns_input_object():
    x = torch.randn(5)
    assert sp.sparsify(x, sp.TopK(density=1.0)) is x


def test_sparsity_alias_and_errors():
    assert sp.TopK(sparsity=0.9).density == pytest.approx(0.1)
    with pytest.raises(ValueError, match="either density or sparsity"):
        sp.TopK(density=0.1, sparsity=0.9)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sp.TopK(density=0.0)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sp.TopK(density=1.5)
    with pytest.raises(ValueError, match="unknown sparsifier type 'topq'; valid choices: channel_topk, dbtd"):
        sp.config_from_dict({"type": "topq"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['k'\] for type 'topk'"):
        sp.config_from_dict({"type": "topk", "k": 3})


def test_channel_topk_zeroes_whole_slices_by_l1():
    w = torch.zeros(2, 2, 2, 2)
    w[0, 0] = 1.0  # L1 = 4
    w[0, 1] = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # L1 = 3
    w[1, 0] = 0.5  # L1 = 2
    w[1, 1] = torch.tensor([[-9.0, 0.0], [0.0, 0.0]])  # L1 = 9
    out = sp.sparsify(w, sp.ChannelTopK(density=0.5))  # keep 2 of 4 slices: (1,1) and (0,0)
    kept = out.abs().sum((2, 3)).ne(0)
    assert kept.tolist() == [[True, False], [False, True]]
    assert torch.equal(out[0, 0], w[0, 0]) and torch.equal(out[1, 1], w[1, 1])


def test_threshold_strictly_greater():
    x = torch.tensor([0.1, -0.2, 0.3, 0.2])
    assert torch.equal(sp.sparsify(x, sp.Threshold(0.2)), torch.tensor([0.0, 0.0, 0.3, 0.0]))
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        sp.Threshold(-1.0)


def test_nm_keeps_n_of_every_m_along_dim1():
    w = torch.tensor([[4.0, -1.0, 3.0, 2.0, 0.5, 0.6, -0.7, 0.1]])
    out = sp.sparsify(w, sp.NM(n=2, m=4))
    assert torch.equal(out, torch.tensor([[4.0, 0.0, 3.0, 0.0, 0.0, 0.6, -0.7, 0.0]]))
    conv = torch.randn(3, 8, 3, 3)
    out = sp.sparsify(conv, sp.NM(n=1, m=4))
    groups = out.movedim(1, -1).reshape(-1, 4).ne(0).sum(1)
    assert torch.all(groups == 1)
    short = sp.sparsify(torch.randn(2, 6), sp.NM(n=2, m=4))  # 6 = 4 + a short group of 2
    assert short.ne(0).sum().item() == 8


def test_random_channel_mask_no_dead_filters():
    g = torch.Generator().manual_seed(0)
    for n_out, n_in, d in [(4, 10, 0.1), (64, 32, 0.05), (8, 3, 0.34), (16, 16, 0.5)]:
        m = sp.random_channel_mask(n_out, n_in, d, g)
        assert m.any(dim=1).all(), "every output has an input"
        assert m.any(dim=0).all(), "every input feeds an output"
        k = max(1, round(d * n_in), math.ceil(n_in / n_out))
        assert torch.all(m.sum(1) == min(k, n_in))


def test_random_channel_is_fixed_per_layer_key():
    w = torch.randn(16, 8, 3, 3)
    cfg = sp.RandomChannel(density=0.25, seed=3)
    a = sp.mask(w, cfg, key="layer1.conv")
    b = sp.mask(torch.randn(16, 8, 3, 3), cfg, key="layer1.conv")
    c = sp.mask(w, cfg, key="layer2.conv")
    assert torch.equal(a, b)  # independent of the weights' values
    assert not torch.equal(a, c)
    assert torch.all(a == a[:, :, :1, :1])  # whole kernel slices


def test_dbtd_threshold_leaves_2p_minus_1_of_a_gaussian_below_tau():
    g = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)) * 0.37
    for p in (0.85, 0.9, 0.95, 0.995):
        tau = sp.dbtd_tau(g, p)
        below = (g.abs() < tau).float().mean().item()
        assert below == pytest.approx(2 * p - 1, abs=2e-3), p
    # The paper's literal sqrt(2/pi) factor is the inverse: it underestimates sigma by 2/pi.
    lit = sp.dbtd_tau(g, 0.9, "literal") / sp.dbtd_tau(g, 0.9, "consistent")
    assert lit.item() == pytest.approx(2 / math.pi, rel=1e-6)


def test_stochastic_pruning_is_unbiased():
    g0 = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    tau = sp.dbtd_tau(g0, 0.9)
    gen = torch.Generator().manual_seed(2)
    n = 4000
    acc = torch.zeros_like(g0)
    for _ in range(n):
        acc += sp.stochastic_prune(g0, tau, gen)
    mean = acc / n
    # Per element the estimator has variance <= tau*|g| <= tau^2; 5 sigma of the mean over n draws.
    tol = 5 * tau.item() / math.sqrt(n)
    assert torch.all((mean - g0).abs() < tol)
    # Pruned values are exactly 0 or sign(g)*tau below tau; values above tau untouched.
    one = sp.stochastic_prune(g0, tau, gen)
    small = g0.abs() < tau
    assert torch.all((one[small] == 0) | (one[small].abs() == tau))
    assert torch.equal(one[~small], g0[~small])


def test_dbtd_measured_density_matches_gaussian_model():
    g = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    out = sp.sparsify(g, sp.DBTD(p=0.9), generator=torch.Generator().manual_seed(7))
    assert out.eq(0).float().mean().item() == pytest.approx(0.45, abs=0.01)  # METHODS §2: about 45% at p=0.90
    out = sp.sparsify(g, sp.DBTD(p=0.99), generator=torch.Generator().manual_seed(8))
    assert out.eq(0).float().mean().item() == pytest.approx(0.66, abs=0.01)


@pytest.mark.parametrize("name", sp.list_sparsifiers())
def test_every_registered_sparsifier_roundtrips_and_runs(name):
    defaults = {
        "topk": {"density": 0.3},
        "channel_topk": {"density": 0.3},
        "threshold": {"threshold": 0.5},
        "nm": {"n": 2, "m": 4},
        "dbtd": {"p": 0.9},
        "random_channel": {"density": 0.3},
        "row_topk": {"density": 0.3},
    }
    cfg = sp.config_from_dict({"type": name, **defaults[name]})
    assert sp.config_from_dict(sp.config_to_dict(cfg)) == cfg
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        w = torch.randn(8, 4, 3, 3).to(dtype)
        out = sp.sparsify(w, cfg, generator=torch.Generator().manual_seed(0), key="x")
        assert out.shape == w.shape and out.dtype == dtype
        assert out.count_nonzero() < w.numel()


@pytest.mark.parametrize("kind", ["relu", "ties", "zeros", "heavy", "float64", "bfloat16", "all_equal", "signed",
                                  "channels_last", "denormal", "small"])
def test_topk_threshold_radix_select_is_exact(kind):
    """The radix select must return exactly kthvalue's k-th largest magnitude, ties and zeros included."""
    g = torch.Generator().manual_seed(0)
    n = 3 * 65536 + 7
    x = {
        "relu": torch.relu(torch.randn(n, generator=g)),
        "ties": torch.randint(0, 7, (n,), generator=g).float(),
        "zeros": torch.cat([torch.zeros(n - 500), torch.rand(500, generator=g)]),
        "heavy": torch.randn(n, generator=g).abs() ** 9,
        "float64": torch.rand(n, generator=g, dtype=torch.float64),
        "bfloat16": torch.randn(n, generator=g).abs().bfloat16(),
        "all_equal": torch.full((n,), 0.25),
        "signed": torch.randn(n, generator=g) * torch.randint(0, 2, (n,), generator=g),
        "channels_last": torch.randn(8, 16, 33, 47, generator=g).contiguous(memory_format=torch.channels_last),
        "denormal": torch.rand(n, generator=g) * 1e-39,
        "small": torch.randn(1000, generator=g),
    }[kind]
    n = x.numel()
    flat = x.reshape(-1).abs()
    flat = flat.float() if flat.dtype == torch.bfloat16 else flat
    for density in (1e-4, 0.01, 0.1, 0.37, 0.5, 0.9, 0.999):
        k = math.ceil(density * n)
        expected = flat.kthvalue(n - k + 1).values
        assert torch.equal(sp.topk_threshold(x, density), expected), density


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1 << 20, (1 << 20) + 5, 3 * (1 << 20) + 1])
def test_large_topk_selection_keeps_exactly_the_threshold_set(threads, n):
    """On every thread count, a top-K selection of a large activation keeps exactly the values |v| >= thr, in
    nonzero's order."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(n)
        x = torch.relu(torch.randn(n, generator=g))
        thr, pos, vals = sp.topk_select(x, 0.1)
        ref = torch.nonzero(x >= thr).view(-1)
        assert torch.equal(pos.long(), ref) and torch.equal(vals, x[ref])
    finally:
        torch.set_num_threads(before)
