"""Sparse models out: a masked plain state_dict and a compressed file that reproduce the sparse model."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain
from sparsetrain.export import export_sparse, load_compressed, masked_state_dict


def _trained(preset, **kw):
    torch.manual_seed(0)
    model = sparsetrain.create_model("lenet5", num_classes=10, in_channels=1)
    dense = copy.deepcopy(model)
    h = sparsetrain.sparsify_(model, preset, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        h.step(opt)
    return model, dense, h


@pytest.mark.parametrize("preset, kw", [("swat-u", {"density": 0.1}), ("swat-channel", {"density": 0.5}),
                                        ("random-channel", {"density": 0.25})])
def test_masked_state_dict_reproduces_the_sparse_model(preset, kw, tmp_path):
    model, vanilla, h = _trained(preset, **kw)
    model.eval()
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    out = export_sparse(model, tmp_path / "m.pt")
    vanilla.load_state_dict(out["state_dict"])  # same keys as the dense model
    vanilla.eval()
    with torch.no_grad():
        assert torch.equal(vanilla(x), want)
        # the raw checkpoint (dense, unmasked weights) does not reproduce it: that is why export exists
        raw = copy.deepcopy(vanilla)
        raw.load_state_dict(model.state_dict())
        assert not torch.equal(raw(x), want)
    # the compressed file round-trips exactly and is smaller than the dense weights
    back = load_compressed(tmp_path / "m.pt")
    assert back.keys() == out["state_dict"].keys()
    assert all(torch.equal(back[k], v) for k, v in out["state_dict"].items())
    assert out["bytes"] < out["dense_bytes"]
    vanilla.load_state_dict(back)
    with torch.no_grad():
        assert torch.equal(vanilla(x), want)


def test_compressed_swat_90_is_several_times_smaller(tmp_path):
    model, _, h = _trained("swat-u", density=0.1, first_layer_dense=False)
    sizes = export_sparse(model, tmp_path / "c.pt")
    assert sizes["dense_bytes"] / sizes["bytes"] > 4  # values + 1 bit per element at 10% density


def test_load_compressed_rejects_other_files(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a sparsetrain compressed state_dict"):
        load_compressed(tmp_path / "plain.pt")


def test_dense_modules_pass_through():
    model = nn.Sequential(nn.Linear(4, 4))
    sd = masked_state_dict(model)
    assert torch.equal(sd["0.weight"], model[0].weight)
