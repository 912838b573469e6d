"""The training loop's parts: optimizers with exact resume, mixed precision, host syncs only at log intervals."""

import math

import pytest
import torch

import sparsetrain.training.loop as train_mod
from sparsetrain import runs
from sparsetrain.cli import main
from sparsetrain.runs import RunDir
from sparsetrain.sparsifiers import Threshold
from sparsetrain.training import NonFiniteError, TrainConfig, train

# 4 steps per epoch, 200 test images: a few seconds per run.
TINY = dict(train_subset=512, test_subset=200, batch_size=128, telemetry_every=0, quiet=True)


class _Killed(Exception):
    """Stands in for SIGKILL: raised from inside a training step."""


def _kill_at_call(monkeypatch, n):
    """Make the n-th training forward pass (1-based) die, as a kill mid-epoch would."""
    real = train_mod.F.cross_entropy
    calls = {"n": 0}

    def dying(out, y, **kw):
        if out.requires_grad:
            calls["n"] += 1
            if calls["n"] == n:
                raise _Killed
        return real(out, y, **kw)

    monkeypatch.setattr(train_mod.F, "cross_entropy", dying)


# SGD's resume is the SIGKILL test of test_train.py. SWAT-M redistributes densities from the first moment, which
# Adam-type optimizers call exp_avg: its resume must restore that state too.
@pytest.mark.parametrize("optimizer, recipe", [("adam", "swat-u"), ("adamw", "swat-m")])
def test_resume_is_exact_for_each_optimizer(tmp_path, monkeypatch, optimizer, recipe):
    cfg = dict(TINY, epochs=2, optimizer=optimizer, lr=2e-3, betas=[0.8, 0.99], recipe=recipe)
    train(TrainConfig(**cfg, out=str(tmp_path / "full")))
    with monkeypatch.context() as m:
        _kill_at_call(m, 6)  # the second step of epoch 1, after epoch 0's checkpoint
        with pytest.raises(_Killed):
            train(TrainConfig(**cfg, out=str(tmp_path / "victim")))
    assert runs.load_checkpoint(tmp_path / "victim")["epoch"] == 0
    train(TrainConfig(quiet=True), resume=tmp_path / "victim")
    a, b = runs.load_checkpoint(tmp_path / "full"), runs.load_checkpoint(tmp_path / "victim")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    state = b["optimizer"]
    assert state["param_groups"][0]["betas"] == (0.8, 0.99)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(state["state"].values())))
    assert opt_cls.__name__.lower() == optimizer
    metrics = RunDir(tmp_path / "victim").read_metrics()
    assert [r["epoch"] for r in metrics] == [0, 1]
    assert [r["test_acc"] for r in metrics] == [r["test_acc"] for r in RunDir(tmp_path / "full").read_metrics()]
    if recipe == "swat-m":  # the first moment (exp_avg) moved the per-layer densities away from uniform
        assert len({round(d["weight"], 3) for d in metrics[-1]["densities"].values()}) > 2


def test_optimizer_flag_and_validation(tmp_path, caplog):
    assert main(["train", "--optimizer", "adamw", "--set", "betas=[0.85,0.995]", "--epochs", "1", "--train-subset",
                 "256", "--test-subset", "100", "--batch-size", "128", "--telemetry-every", "0", "--quiet", "--out",
                 str(tmp_path / "run")]) == 0
    config = RunDir(tmp_path / "run").read_config()
    assert config["optimizer"] == "adamw" and config["betas"] == [0.85, 0.995]
    assert runs.load_checkpoint(tmp_path / "run")["optimizer"]["param_groups"][0]["betas"] == (0.85, 0.995)
    # A run's config works as --config for the next run (its format version is not a config key).
    from sparsetrain.cli import build_parser
    from sparsetrain.commands.train import resolve_config

    again = resolve_config(build_parser().parse_args(["train", "--config", str(RunDir(tmp_path / "run").config_path)]))
    assert TrainConfig.from_dict(again).to_dict() == config
    with pytest.raises(ValueError, match="optimizer 'lamb' is not one of sgd, adam, adamw"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        TrainConfig(optimizer="adam", betas=[0.9, 1.5])


def test_amp_fp16_on_cpu_is_a_clear_error_before_anything_is_written(tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", "--amp", "fp16", "--out", str(out), "--quiet"]) == 2
    assert "fp16 autocast needs CUDA; use --amp bf16 on CPU" in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("recipe", ["dense", "swat-u"])  # sparse layers run under autocast (core, issue 10)
def test_amp_bf16_one_short_epoch(tmp_path, recipe):
    common = ["--recipe", recipe, "--epochs", "1", "--train-subset", "512", "--test-subset", "200", "--batch-size",
              "128", "--telemetry-every", "2", "--quiet"]
    out = tmp_path / recipe
    assert main(["train", "--amp", "bf16", *common, "--out", str(out)]) == 0
    run = RunDir(out)
    (m,) = run.read_metrics()
    assert math.isfinite(m["train_loss"])
    params = runs.load_checkpoint(out)["model"]
    assert all(v.dtype == torch.float32 for k, v in params.items() if v.is_floating_point())
    assert run.read_summary()["final_test_acc"] == m["test_acc"]
    if recipe == "dense":
        assert m["test_acc"] > 0.1  # chance is 0.1
    else:
        # 4 steps of SWAT-U 90% barely move LeNet-5 off chance: compare with the same run in float32 instead.
        ref = tmp_path / "fp32"
        assert main(["train", *common, "--out", str(ref)]) == 0
        (m32,) = RunDir(ref).read_metrics()
        assert abs(m["train_loss"] - m32["train_loss"]) < 0.02
        assert abs(m["weight_density"] - m32["weight_density"]) < 1e-3  # the same top-K under autocast


def test_nonfinite_gradient_is_found_at_the_log_interval(tmp_path, monkeypatch):
    real = train_mod._forward_backward
    calls = {"n": 0}

    def poison_grad(s, x, y, *rest):
        out, loss = real(s, x, y, *rest)
        calls["n"] += 1
        if calls["n"] == 2:  # step 1: the loss is finite, one gradient is not
            next(s.model.parameters()).grad.view(-1)[0] = float("inf")
        return out, loss

    monkeypatch.setattr(train_mod, "_forward_backward", poison_grad)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at epoch 0 step 1 \(loss [0-9.]+, grad norm inf; found at the check after "
                                             r"step 2\); the last good checkpoint is kept in"):
        train(TrainConfig(**TINY, epochs=1, log_every=3, out=str(tmp_path / "run")))
    assert not RunDir(tmp_path / "run").has_checkpoint()


# The TensorQuant gradient study thresholds every gradient inside the loop: that must not read the device either.
@pytest.mark.parametrize("recipe", [{}, {"recipe": {"preset": "dense", "gradient_threshold": 1e-3,
                                                    "gradient_threshold_scope": "all_after_decay"},
                                         "recipe_overrides": {}}], ids=["swat-u", "gradient-threshold"])
def test_host_syncs_only_at_log_intervals(tmp_path, monkeypatch, recipe):
    """The loop reads device values only every ``log_every`` steps, at the end of an epoch and once per evaluation."""
    syncs = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            import sys

            if sys._getframe(1).f_globals.get("__name__", "").startswith("sparsetrain.training"):
                syncs.append(name)
            return real(self, *a, **kw)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    # 12 steps, log every 5: reads after steps 5, 10 and 12, plus one for the evaluation.
    train(TrainConfig(**dict(TINY, train_subset=1536), **recipe, epochs=1, log_every=5, out=str(tmp_path / "run")))
    assert len(syncs) == 3 + 1, syncs


# ---------------------------------------------------------------------------------------------- gradient threshold
GT = 5e-4  # LeNet-5's first-step gradients straddle it: some zeroed, most kept
WD = 0.05  # large, so thresholding before or after the L2 term gives different updates


def _one_step_by_hand_and_by_loop(tmp_path, scope):
    """The loop's first update, and the update computed here from the same batch with plain autograd."""
    from sparsetrain.models import create_model
    from sparsetrain.training import setup, train_one_epoch

    recipe = {"preset": "dense", "gradient_threshold": GT, "gradient_threshold_scope": scope}
    cfg = TrainConfig(**dict(TINY, train_subset=128), epochs=1, augment=False, recipe=recipe, recipe_overrides={},
                      weight_decay=WD, out=str(tmp_path / scope))
    s = setup(cfg)
    ref = create_model("lenet5", num_classes=10, in_channels=1)
    ref.load_state_dict(s.model.state_dict())  # the same weights (the state_dict keys do not change)
    lr = s.optimizer.param_groups[0]["lr"]
    s.train_loader.set_epoch(0)
    ((x, y),) = list(s.train_loader)  # one batch of 128: the whole epoch
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), list(params.values()))
    expected = {}
    for (name, p), g in zip(params.items(), grads):
        if scope == "all_after_decay":  # TensorQuant: every variable, after the L2 term
            g = g + WD * p.detach()
            g = torch.where(g.abs() > GT, g, torch.zeros_like(g))
        else:  # ours: conv/linear dW only, before weight decay
            if name.endswith("weight"):
                g = torch.where(g.abs() > GT, g, torch.zeros_like(g))
            g = g + WD * p.detach()
        expected[name] = p.detach() - lr * g  # SGD's first step: the momentum buffer is the gradient
    train_one_epoch(s, 0)
    return s, expected, grads


@pytest.mark.parametrize("scope", ["all_after_decay", "layers"])
def test_gradient_threshold_one_step_matches_hand_computation(tmp_path, scope):
    s, expected, grads = _one_step_by_hand_and_by_loop(tmp_path, scope)
    got = dict(s.model.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6, msg=name)
    # The threshold really acts (some gradients zeroed, most kept), so the comparison could tell the scopes apart.
    flat = torch.cat([g.flatten() for g in grads])
    assert 0.01 < (flat.abs() <= GT).float().mean() < 0.9
    group = s.optimizer.param_groups[0]
    if scope == "all_after_decay":  # the L2 term moved into the gradient, so the optimizer must not add it again
        assert group["weight_decay"] == 0.0 and group["grad_l2"] == WD
        assert s.handle.layers == {}  # no per-layer grad_weight threshold
    else:  # unchanged: per-layer Threshold on dW, weight decay in the optimizer
        assert group["weight_decay"] == WD and "grad_l2" not in group
        conv_linear = [n for n, m in s.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert sorted(s.handle.layers) == sorted(conv_linear)
        assert all(spec.grad_weight == Threshold(GT) for spec in s.handle.layers.values())


def test_gradient_threshold_scope_recipe_key():
    import yaml

    from sparsetrain.recipe import DEFAULT_GRADIENT_THRESHOLD_SCOPE, Recipe

    r = Recipe.load({"preset": "dense", "gradient_threshold": 1e-3})
    assert r.gradient_threshold_scope == DEFAULT_GRADIENT_THRESHOLD_SCOPE
    for scope in ("all_after_decay", "layers"):
        r = Recipe.load({"preset": "swat-u", "gradient_threshold": 1e-3, "gradient_threshold_scope": scope})
        assert Recipe.load(r.to_dict()) == r
        assert Recipe.load(yaml.safe_load(r.to_yaml())).gradient_threshold_scope == scope
    with pytest.raises(ValueError, match="recipe: gradient_threshold_scope 'weights' is not one of all_after_decay, "
                                         "layers"):
        Recipe.load({"preset": "dense", "gradient_threshold": 1e-3, "gradient_threshold_scope": "weights"})


def test_adamw_keeps_decoupled_decay_and_only_thresholds():
    from sparsetrain.methods import decay_into_gradients, threshold_gradients_

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01)
    decay_into_gradients(opt)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and "grad_l2" not in opt.param_groups[0]
    w.grad = torch.tensor([0.5, 1e-4, -2e-3])
    threshold_gradients_(opt, 1e-3)
    assert w.grad.tolist() == pytest.approx([0.5, 0.0, -2e-3])  # |g| > T kept, nothing added
    sgd = torch.optim.SGD([w], lr=0.1, weight_decay=0.01)
    decay_into_gradients(sgd)
    decay_into_gradients(sgd)  # idempotent: the decay is moved once
    assert sgd.param_groups[0]["weight_decay"] == 0.0 and sgd.param_groups[0]["grad_l2"] == 0.01
    w.grad = torch.tensor([0.5, 1e-4, -2e-3])
    threshold_gradients_(sgd, 0.025)  # g + 0.01 w = [0.51, -0.0199, 0.028]
    assert w.grad.tolist() == pytest.approx([0.51, 0.0, 0.028])


def test_gradient_threshold_resume_is_exact(tmp_path, monkeypatch):
    recipe = {"preset": "dense", "gradient_threshold": 1e-3, "gradient_threshold_scope": "all_after_decay"}
    cfg = dict(TINY, epochs=2, recipe=recipe, recipe_overrides={})
    train(TrainConfig(**cfg, out=str(tmp_path / "full")))
    with monkeypatch.context() as m:
        _kill_at_call(m, 6)  # the second step of epoch 1, after epoch 0's checkpoint
        with pytest.raises(_Killed):
            train(TrainConfig(**cfg, out=str(tmp_path / "victim")))
    train(TrainConfig(quiet=True), resume=tmp_path / "victim")
    a, b = runs.load_checkpoint(tmp_path / "full"), runs.load_checkpoint(tmp_path / "victim")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    group = b["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.0 and group["grad_l2"] == 5e-4  # still added once, by the loop


def test_telemetry_records_the_thresholded_weight_gradient(tmp_path):
    """With TensorQuant's in-loop gradient threshold, the telemetry's dW is the gradient the update gets (after the
    threshold), not the one backward produced."""
    def grad_sparsity(threshold):
        recipe = {"preset": "dense", "gradient_threshold": threshold, "gradient_threshold_scope": "all_after_decay"}
        out = tmp_path / f"t{threshold}"
        train(TrainConfig(**{**TINY, "telemetry_every": 1}, epochs=1, recipe=recipe, recipe_overrides={},
                          out=str(out)))
        rows = [r for r in RunDir(out).iter_telemetry() if r["kind"] == "layer" and r["tensor"] == "grad_weight"]
        return {r["name"]: r["sparsity"] for r in rows if r["step"] == 1}

    loose, tight = grad_sparsity(1e-12), grad_sparsity(1e-2)
    assert loose and loose.keys() == tight.keys()
    assert max(loose.values()) < 0.2
    assert min(tight.values()) > 0.5  # most |g| <= 1e-2 on LeNet-5 are zeroed before the update


def test_progress_quiet_and_resume_lines(tmp_path, monkeypatch, caplog):
    """Output not a terminal: a progress line every log_every steps; --quiet hides the data loading; the resume line
    counts epochs and batches from 1; samples/s of a resumed epoch covers the batches this process ran, and says so."""
    import io
    import logging
    import sys

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, even under pytest -s
    cfg = dict(TINY, epochs=1, quiet=False, log_every=1, checkpoint_every=2)
    with monkeypatch.context() as m:
        _kill_at_call(m, 4)  # the epoch's last step; the checkpoint after step 2 holds its first 2 batches
        with pytest.raises(_Killed):
            train(TrainConfig(**cfg, out=str(tmp_path / "run")))
    assert "loaded fashion_mnist_small/train" in caplog.text
    assert "epoch 1/1  step 2/4  loss" in caplog.text and "step 4/4" not in caplog.text
    caplog.clear()
    train(TrainConfig(quiet=True), resume=tmp_path / "run")
    assert "loaded " not in caplog.text and "step 3/4" not in caplog.text  # --quiet
    assert f"resuming {tmp_path / 'run'} from epoch 1 batch 3 (step 2)" in caplog.text  # 0-based epoch 0
    assert "samples/s (batches 3-4 of 4: resumed mid-epoch)" in caplog.text
    last = RunDir(tmp_path / "run").read_metrics()[-1]
    assert last["samples_per_s"] * last["time_s"] == pytest.approx(2 * 128)  # the 2 batches run after the resume
