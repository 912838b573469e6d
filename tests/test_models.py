"""Model zoo tests: every registered model builds, runs forward/backward, survives every sparsity preset, and
has the architecture the papers describe (parameter counts, names, width multiplier).

The parametrized tests take each model's input shape and class count from its declared metadata
(``get_model_cfg``), not from tables here, and guard against an empty registry or preset list."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
from collections import Counter
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import sparsetrain
from sparsetrain.models import (
    ModelCfg,
    count_parameters,
    create_model,
    find_classifier,
    find_first_conv,
    get_model_cfg,
    list_models,
    model_entrypoint,
    register_model,
)
from sparsetrain.models import _registry as registry_mod
from sparsetrain.models._common import scale_channels

EXPECTED_MODELS = {
    "lenet5",
    "lenet_slim",
    "cifarnet",
    "alexnet_cifar",
    "vgg11_bn",
    "vgg16_bn",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn16_8",
    "wrn28_10",
    "densenet121",
    "mobilenet_v1",
    "resnet50_imagenet",
}

# Parameter counts with each model's declared num_classes (10; resnet50_imagenet: 1000). Sources:
# - pytorch-cifar (kuangliu) / He et al. reference implementations, widely reported: resnet18 11,173,962,
#   resnet34 21,282,122, resnet50 23,520,842, resnet101 42,512,970, resnet152 58,156,618, densenet121 6,956,298,
#   mobilenet_v1 3,217,226, resnet20/32/56 (option A) 269,722 / 464,154 / 853,018, WRN-28-10 36,479,194,
#   torchvision resnet50 25,557,032.
# - by hand (weights + biases, BN weight + bias):
#   lenet5: 1*6*25+6 + 6*16*25+16 + 400*120+120 + 120*84+84 + 84*10+10 = 61,706.
#   lenet_slim (TF-slim nets/lenet.py): 1*32*25+32 + 32*64*25+64 + 3136*1024+1024 + 1024*10+10 = 3,274,634.
#   cifarnet: 3*64*25+64 + 64*64*25+64 + 4096*384+384 + 384*192+192 + 192*10+10 = 1,756,426.
#   alexnet_cifar: convs 3-64-192-384-256-256 (3x3, biased) = 2,251,584; fc 4096*2048+2048 + 2048*2048+2048
#   + 2048*10+10 = 12,607,498; total 14,859,082.
#   vgg16_bn: convs 14,710,464 + BN 8,448 + head 512*4096+4096 + 4096*4096+4096 + 4096*10+10 = 33,642,442.
#   wrn16_8: 10,961,370 (stem 432, stages 463,648 / 2,098,944 / 8,392,192, final BN 1,024, fc 5,130).
#   resnet14 (stem 64, 2x2 bottleneck units 256/512, fc 512->10): 811,850.
PARAM_COUNTS = {
    "lenet5": 61_706,
    "lenet_slim": 3_274_634,
    "cifarnet": 1_756_426,
    "alexnet_cifar": 14_859_082,
    "vgg11_bn": 28_146_762,
    "vgg16_bn": 33_642_442,
    "vgg19_bn": 38_953_418,
    "resnet14": 811_850,
    "resnet18": 11_173_962,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet56": 853_018,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "densenet121": 6_956_298,
    "mobilenet_v1": 3_217_226,
    "resnet50_imagenet": 25_557_032,
}


def _meta_model(name: str, **kwargs) -> nn.Module:
    """The model built on the meta device: real module tree and shapes, no memory or initialisation cost."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _assert_finite_grads(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


def test_registry_has_all_models():
    # The parametrizations below iterate over list_models(): a broken registry must fail here, not make them vanish.
    assert len(list_models()) >= 20
    assert EXPECTED_MODELS <= set(list_models())
    assert list_models("resnet5*") == ["resnet50", "resnet50_imagenet", "resnet56"]


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet18"):
        create_model("resnet7")


def test_none_kwargs_keep_defaults():
    model = create_model("lenet5", num_classes=None, in_channels=None, width_mult=None)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


class _GemmCounter(TorchFunctionMode):
    """Counts the conv/linear/matmul functions a forward pass calls."""

    OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose2d", "linear", "matmul", "mm", "bmm", "addmm", "einsum")

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    cfg = get_model_cfg(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=cfg.num_classes)
    x = torch.randn(2, *cfg.input_size)
    # Every GEMM must come from an nn.Conv2d / nn.Linear module (the sparsifier swaps modules): count the
    # module calls with hooks and the functional calls with a TorchFunctionMode; they must agree.
    calls: Counter[str] = Counter()
    hooks = [
        m.register_forward_hook(lambda mod, i, o: calls.update(["conv2d" if isinstance(mod, nn.Conv2d) else "linear"]))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with _GemmCounter() as gemms:
        out = model(x)
    for h in hooks:
        h.remove()
    assert gemms.counts == calls
    assert out.shape == (x.shape[0], cfg.num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.zeros(x.shape[0], dtype=torch.long)).backward()
    _assert_finite_grads(model)
    # The papers' parameter counts (see PARAM_COUNTS); the classifier is always the last Linear, named "fc".
    assert count_parameters(model) == PARAM_COUNTS[name]
    assert find_classifier(model) == cfg.classifier == "fc"
    fc = model.fc
    assert count_parameters(model, exclude_classifier=True) == PARAM_COUNTS[name] - fc.weight.numel() - fc.bias.numel()


@pytest.mark.parametrize("name", list_models())
def test_conv_bias_and_stem_name(name):
    """Convs followed by BN have no bias; the first conv is the declared ``first_conv``."""
    cfg = get_model_cfg(name)
    model = _meta_model(name, num_classes=cfg.num_classes)
    mods = list(model.named_modules())
    convs = [(n, m) for n, m in mods if isinstance(m, nn.Conv2d)]
    assert convs, "no nn.Conv2d found"
    for i, (n, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.BatchNorm2d):
            assert m.bias is None, f"{n} is followed by BN but has a bias"
    assert convs[0][0] == cfg.first_conv


def test_stable_resnet_names():
    names = dict(create_model("resnet18").named_modules())
    for key in ("conv1", "bn1", "layer1.0.conv1", "layer1.1.conv2", "layer2.0.downsample.0", "layer4.1.bn2", "fc"):
        assert key in names
    names = dict(create_model("resnet20").named_modules())
    assert "layer3.2.conv2" in names and "layer4" not in names
    names = dict(create_model("resnet14").named_modules())
    # TensorQuant's ResNet-14: block1/block2 with unit_1, unit_2 of three convs each.
    convs = [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in n]
    assert convs == ["conv1"] + [f"layer{s}.{u}.conv{j}" for s in (1, 2) for u in (0, 1) for j in (1, 2, 3)] + ["fc"]
    names = dict(create_model("wrn16_8").named_modules())
    assert {"conv1", "layer1.0.bn1", "layer1.0.conv1", "layer1.0.shortcut", "layer3.1.conv2", "bn", "fc"} <= set(names)


def test_resnet14_he_style():
    model = create_model("resnet14", style="he", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13  # 6n + 1 convs + the fc = 6n + 2 = 14 weight layers for n = 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="valid choices: tensorquant, he"):
        create_model("resnet14", style="slim")


def test_resnet50_imagenet_matches_torchvision_layout():
    model = create_model("resnet50_imagenet", num_classes=1000)
    assert count_parameters(model) == 25_557_032  # torchvision.models.resnet50()
    sd = model.state_dict()
    # conv1+bn1: 1 + 5 entries; 16 bottlenecks x (3 convs + 3 BNs x 5) = 288; 4 downsamples x (1 + 5) = 24;
    # fc weight + bias = 2: 320 in all (BN entries: weight, bias, running_mean, running_var, num_batches_tracked).
    assert len(sd) == 320
    for key in (
        "conv1.weight",
        "bn1.num_batches_tracked",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer3.5.conv3.weight",
        "layer4.2.bn3.running_var",
        "fc.weight",
        "fc.bias",
    ):
        assert key in sd, key
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)
    assert not any(k.startswith("layer5") for k in sd)
    # ResNet v1.5: stride 2 on the 3x3 conv, not on the first 1x1.
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)


def test_shortcut_option_a_and_b():
    a = create_model("resnet20")
    b = create_model("resnet20", shortcut="B")
    assert not any("downsample.0" in n for n, _ in a.named_modules())
    assert {n for n, m in b.named_modules() if n.endswith("downsample.0")} == {
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
    }
    # Option B adds two 1x1 projections (16->32, 32->64) and their BNs.
    assert count_parameters(b) - count_parameters(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    # Option A pads the new channels with zeros: with the residual branch zeroed, layer2.0 outputs
    # relu(subsampled x) in the middle 16 of its 32 channels (8 zero channels on each side).
    block = a.layer2[0]
    nn.init.zeros_(block.bn2.weight)
    x = torch.randn(2, 16, 8, 8)
    out = block(x)
    assert torch.equal(out[:, 8:24], torch.relu(x[:, :, ::2, ::2]))
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_scale_channels_rounds_up():
    assert scale_channels(64, 0.25) == 16
    assert scale_channels(64, 0.3) == 20  # 19.2 -> 20
    assert scale_channels(16, 0.3) == 5  # 4.8 -> 5
    assert scale_channels(6, 0.01) == 1
    assert scale_channels(10, 0.1) == 1  # not 2 through 10 * 0.1 = 1.0000000000000002
    with pytest.raises(ValueError, match="width_mult"):
        create_model("resnet20", width_mult=0)


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS - {"resnet50_imagenet", "resnet152", "resnet101"}))
def test_width_mult_scales_every_layer(name):
    """At width_mult=0.5 every conv/hidden-FC width is ceil(c/2); input channels and classes are unchanged."""
    w = 0.5
    dense = dict(create_model(name).named_modules())
    thin = dict(create_model(name, width_mult=w).named_modules())
    assert dense.keys() == thin.keys()
    first = True
    for n, m in dense.items():
        t = thin[n]
        if isinstance(m, nn.Conv2d):
            assert t.out_channels == math.ceil(m.out_channels * w), n
            assert t.in_channels == (m.in_channels if first else math.ceil(m.in_channels * w)), n
            assert t.groups == (1 if m.groups == 1 else math.ceil(m.groups * w)), n
            first = False
        elif isinstance(m, nn.Linear):
            assert t.in_features == math.ceil(m.in_features * w), n
            expected_out = m.out_features if n == "fc" else math.ceil(m.out_features * w)
            assert t.out_features == expected_out, n


def test_width_mult_resnet20_params_and_ceil():
    dense = create_model("resnet20")
    for w in (0.5, 0.25):
        thin = create_model("resnet20", width_mult=w)
        ratio = count_parameters(thin, exclude_classifier=True) / count_parameters(dense, exclude_classifier=True)
        # Conv weights scale by w^2 exactly here (all widths divisible); BN parameters (0.5% of the total at
        # width 1) only by w, which lifts the ratio by ~2% at w = 0.25.
        assert ratio == pytest.approx(w * w, rel=0.03)
        conv_ratio = sum(m.weight.numel() for m in thin.modules() if isinstance(m, nn.Conv2d)) / sum(
            m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d)
        )
        # ... except the stem, whose 3 input channels stay: 3*16*9 -> 3*ceil(16w)*9 scales by w only.
        stem = 3 * 16 * 9
        total = sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d))
        assert conv_ratio == pytest.approx(((total - stem) * w * w + stem * w) / total, rel=1e-12)
    thin = create_model("resnet20", width_mult=0.3)
    widths = [m.out_channels for m in thin.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(set(widths)) == [5, 10, 20]  # ceil(4.8), ceil(9.6), ceil(19.2)
    assert thin.conv1.in_channels == 3 and thin.fc.out_features == 10
    assert thin(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lenet5_input_sizes_and_channels():
    model = create_model("lenet5")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    classic = create_model("lenet5", in_channels=3, padding=0)
    assert classic(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 28x28 with padding 2 reaches the classifier as 16x5x5 without any adaptive resampling.
    shapes = []
    model.pool2.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)) and None)
    model(torch.randn(1, 1, 28, 28))
    assert shapes == [(1, 16, 5, 5)]


def test_cifarnet_lrn_matches_tensorflow_formula():
    """norm1 must be tf.nn.lrn(depth_radius=4, bias=1, alpha=0.001/9, beta=0.75)."""
    lrn = create_model("cifarnet").norm1
    x = torch.rand(1, 12, 3, 3) * 10
    sq = x.pow(2)
    ref = torch.empty_like(x)
    for c in range(12):
        window = sq[:, max(0, c - 4) : c + 5].sum(1)
        ref[:, c] = x[:, c] / (1.0 + 0.001 / 9 * window).pow(0.75)
    torch.testing.assert_close(lrn(x), ref)
    assert isinstance(create_model("cifarnet", lrn=False).norm1, nn.Identity)


def test_alexnet_cifar_fc_sizes_from_ye():
    model = create_model("alexnet_cifar", num_classes=100)
    # Ye et al.: first two convs 3x3, padding 2, stride 1; FC-1 4096x2048, FC-2 2048x2048.
    assert model.conv1.kernel_size == (3, 3) and model.conv1.padding == (2, 2) and model.conv1.stride == (1, 1)
    assert model.conv2.kernel_size == (3, 3) and model.conv2.padding == (2, 2)
    assert (model.fc1.in_features, model.fc1.out_features) == (4096, 2048)
    assert (model.fc2.in_features, model.fc2.out_features) == (2048, 2048)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in create_model("alexnet_cifar", batch_norm=True).modules())


def test_vgg_heads():
    assert count_parameters(create_model("vgg16_bn", head="linear")) == 14_710_464 + 8_448 + 5_130
    classic = create_model("vgg16_bn", head="classic")
    assert (classic.fc1.out_features, classic.fc2.out_features) == (512, 512)
    with pytest.raises(ValueError, match="valid choices: swat, classic, linear"):
        create_model("vgg16_bn", head="huge")


def test_count_parameters_counts_shared_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_parameters(model) == 20
    assert count_parameters(model, exclude_classifier=True) == 0
    assert find_classifier(nn.Sequential(nn.Conv2d(1, 1, 1))) is None


def test_torchvision_missing_raises_clear_import_error(monkeypatch):
    # A None entry in sys.modules makes `import torchvision` raise ImportError even where it is installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    factory = model_entrypoint("torchvision:resnet18")  # lazy: no import yet
    assert factory.__name__ == "torchvision:resnet18"
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[torchvision\]'"):
        factory(num_classes=10)
    with pytest.raises(ImportError, match="torchvision"):
        create_model("torchvision:resnet50", num_classes=1000)
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[torchvision\]'"):
        get_model_cfg("torchvision:resnet18")


# ---------------------------------------------------------------------------------------------------------------
# Every model x every sparsity preset.
#
# Budget: half the declared input size where the architecture runs on it (16x16 for the CIFAR models with
# adaptive pooling, 112x112 for resnet50_imagenet; the VGGs' five 2x2 max-pools need their full 32x32), and
# width_mult=0.25 for the heaviest models (HEAVY); the width-1.0 models are covered by test_forward_backward.
HEAVY = {
    "resnet50",
    "resnet101",
    "resnet152",
    "wrn28_10",
    "wrn16_8",
    "densenet121",
    "vgg11_bn",
    "vgg16_bn",
    "vgg19_bn",
    "alexnet_cifar",
    "resnet34",
    "resnet50_imagenet",
}


def _width(name: str) -> float:
    return 0.25 if name in HEAVY else 1.0


@lru_cache(maxsize=None)
def _sweep_input(name: str) -> tuple[int, ...]:
    """(batch, C, H, W): the declared input at half its H, W if the model runs on that, else at full size.

    The half-size try runs on the meta device (shapes only, no compute or memory).
    """
    c, h, w = get_model_cfg(name).input_size
    half = (2, c, h // 2, w // 2)
    with torch.device("meta"):
        model = create_model(name, width_mult=_width(name))
        try:
            model(torch.empty(half))
        except RuntimeError:  # e.g. a pooling layer whose output would be empty
            return (2, c, h, w)
    return half


@lru_cache(maxsize=1)
def _dense_model(name: str) -> nn.Module:
    # Cached for consecutive presets of one model (the parametrization is model-major); copies are sparsified.
    torch.manual_seed(0)
    return create_model(name, width_mult=_width(name))


def test_sweep_is_not_empty():
    # The sweep's parametrization is list_models() x list_presets(): neither may shrink to nothing unnoticed.
    assert len(list_models()) >= 20 and len(sparsetrain.list_presets()) >= 9
    assert _sweep_input("resnet20") == (2, 3, 16, 16) and _sweep_input("vgg16_bn") == (2, 3, 32, 32)


@pytest.mark.parametrize("name,preset", [(m, p) for m in list_models() for p in sparsetrain.list_presets()])
def test_sparsify_every_preset(name, preset):
    dense = _dense_model(name)
    model = copy.deepcopy(dense)
    dense_keys = list(dense.state_dict().keys())
    handle = sparsetrain.sparsify_(model, preset)
    # The module swap must find this model's layers: every sparsified name is one of its convs/linears.
    modules = dict(model.named_modules())
    assert set(handle.layers) <= {n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if preset != "dense":
        assert handle.layers, f"{preset} sparsified no layer of {name}"
    for layer in handle.layers:
        assert type(modules[layer]).__module__ == "sparsetrain.layers", layer
    torch.manual_seed(1)
    x = torch.randn(*_sweep_input(name))
    out = model(x)
    classes = dense.default_cfg.num_classes  # as built: the factories' default, 10
    assert out.shape == (x.shape[0], classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(x.shape[0]) % classes).backward()
    _assert_finite_grads(model)
    handle.remove()
    assert list(model.state_dict().keys()) == dense_keys
    assert not any(type(m).__module__.startswith("sparsetrain.layers") for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Model metadata (timm-style default_cfg)


@pytest.mark.parametrize("name", list_models())
def test_metadata_names_real_layers(name):
    cfg = get_model_cfg(name)
    assert isinstance(cfg, ModelCfg) and cfg.name == name
    assert None not in (cfg.first_conv, cfg.classifier, cfg.input_size, cfg.num_classes), cfg
    model = _meta_model(name, num_classes=cfg.num_classes)
    modules = dict(model.named_modules())
    # first_conv is the first GEMM layer in module order and reads the declared input channels; the classifier
    # is the last Linear and outputs the declared classes.
    gemms = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, head = modules[cfg.first_conv], modules[cfg.classifier]
    assert isinstance(first, nn.Conv2d) and gemms[0] == cfg.first_conv
    assert first.in_channels == cfg.input_size[0]
    assert isinstance(head, nn.Linear) and gemms[-1] == cfg.classifier
    assert head.out_features == cfg.num_classes
    assert model(torch.empty(2, *cfg.input_size, device="meta")).shape == (2, cfg.num_classes)
    # Built with the declared defaults, the model carries exactly the declared cfg.
    assert model.default_cfg == cfg
    assert find_first_conv(model) == cfg.first_conv and find_classifier(model) == cfg.classifier


def test_metadata_stable_names():
    # Recipes address layers by these names (first/last-layer rules), so they are part of the public contract.
    cfgs = {n: get_model_cfg(n) for n in list_models()}
    assert {c.classifier for c in cfgs.values()} == {"fc"}
    assert {n for n, c in cfgs.items() if c.first_conv != "conv1"} == {"vgg11_bn", "vgg16_bn", "vgg19_bn"}
    assert cfgs["vgg16_bn"].first_conv == "block1.conv1"
    assert (cfgs["lenet5"].input_size, cfgs["resnet50_imagenet"].input_size) == ((1, 28, 28), (3, 224, 224))
    assert (cfgs["resnet20"].input_size, cfgs["resnet50_imagenet"].num_classes) == ((3, 32, 32), 1000)


def test_default_cfg_follows_overrides():
    # Factory defaults are unchanged: resnet50_imagenet still builds 10 classes unless asked for its natural 1000.
    assert _meta_model("resnet50_imagenet").default_cfg.num_classes == 10
    model = create_model("resnet20", in_channels=1, num_classes=7)
    cfg = model.default_cfg
    assert cfg == ModelCfg("resnet20", "conv1", "fc", (1, 32, 32), 7)
    assert get_model_cfg("resnet20").input_size == (3, 32, 32)  # the registry's cfg is not touched
    assert model(torch.randn(2, *cfg.input_size)).shape == (2, 7)
    # The cfg is a plain attribute: state_dict keys and pickling are unaffected.
    assert "default_cfg" not in str(list(model.state_dict()))
    assert copy.deepcopy(model).default_cfg == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_classes = 3


def test_get_model_cfg_unknown_lists_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet7'; valid choices: alexnet_cifar, .*resnet18"):
        get_model_cfg("resnet7")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are dropped afterwards (the registry is process-global)."""
    monkeypatch.setattr(registry_mod, "_MODELS", dict(registry_mod._MODELS))
    monkeypatch.setattr(registry_mod, "_CFGS", dict(registry_mod._CFGS))


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(4, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(torch.flatten(self.pool(self.stem(x)), 1)))


def test_register_model_bare_and_with_metadata(scratch_registry):
    @register_model
    def tiny_bare(num_classes: int = 5, in_channels: int = 2) -> nn.Module:
        return _TinyNet(num_classes, in_channels)

    @register_model(first_conv="stem", classifier="head", input_size=(2, 12, 12), num_classes=5)
    def tiny_meta(num_classes: int = 5, in_channels: int = 2, image_size: int = 12) -> nn.Module:
        return _TinyNet(num_classes, in_channels)

    assert {"tiny_bare", "tiny_meta"} <= set(list_models("tiny_*"))
    assert tiny_bare.__name__ == "tiny_bare"  # both forms return the factory itself
    # Bare: classes from the factory's default, no input size, layers found by module order when built.
    assert get_model_cfg("tiny_bare") == ModelCfg("tiny_bare", None, None, None, 5)
    assert create_model("tiny_bare", num_classes=3).default_cfg == ModelCfg("tiny_bare", "stem", "head", None, 3)
    # Declared: image size and channel overrides adjust the built model's input_size.
    assert get_model_cfg("tiny_meta") == ModelCfg("tiny_meta", "stem", "head", (2, 12, 12), 5)
    built = create_model("tiny_meta", in_channels=3, image_size=20).default_cfg
    assert built == ModelCfg("tiny_meta", "stem", "head", (3, 20, 20), 5)
    # Metadata wins over module order: a model whose last Linear is not the classifier.
    model = create_model("tiny_meta")
    model.extra = nn.Linear(5, 5)
    assert find_classifier(model) == "head"
    model.default_cfg = {"first_conv": "stem", "classifier": "head"}  # timm models carry a dict
    assert find_classifier(model) == "head"
    model.default_cfg = ModelCfg("tiny_meta", "stem", "gone", (2, 12, 12), 5)  # names no module: ignored
    assert find_classifier(model) == "extra"
    del model.default_cfg
    assert find_classifier(model) == "extra" and find_first_conv(model) == "stem"


def test_register_model_rejects_bad_metadata(scratch_registry):
    with pytest.raises(ValueError, match=r"input_size must be three positive ints \(C, H, W\), got \(32, 32\)"):
        register_model(first_conv="conv1", classifier="fc", input_size=(32, 32), num_classes=10)(lambda: None)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=0)(lambda: None)

    def three_channel(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return _TinyNet(num_classes, in_channels)

    with pytest.raises(ValueError, match=r"has 1 channels but the factory's in_channels default is 3"):
        register_model(first_conv="stem", classifier="head", input_size=(1, 28, 28), num_classes=10)(three_channel)
    with pytest.raises(ValueError, match="model 'lenet5' is already registered"):
        register_model(first_conv="conv1", classifier="fc", input_size=(1, 28, 28), num_classes=10)(
            model_entrypoint("lenet5"))


def _fake_torchvision(monkeypatch) -> None:
    """A stand-in ``torchvision`` with one model (torchvision is an optional extra, absent here)."""

    def get_model(name: str, num_classes: int = 1000) -> nn.Module:
        return _TinyNet(num_classes, 3)

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(list_models=lambda: ["tinynet"], get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", tv)


def test_torchvision_models_get_a_best_effort_cfg(monkeypatch):
    _fake_torchvision(monkeypatch)
    assert get_model_cfg("torchvision:tinynet") == ModelCfg("torchvision:tinynet", "stem", "head", (3, 224, 224), 1000)
    model = create_model("torchvision:tinynet", num_classes=10)
    assert model.default_cfg == ModelCfg("torchvision:tinynet", "stem", "head", (3, 224, 224), 10)
    with pytest.raises(ValueError, match="unknown torchvision model 'nope'; valid choices: tinynet"):
        get_model_cfg("torchvision:nope")
