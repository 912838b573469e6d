"""`sparsetrain train`: config resolution, exact resume after SIGKILL, damaged checkpoints, NaN stop, real data."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import sparsetrain.training.config as train_config
import sparsetrain.training.loop as train_mod
from sparsetrain import runs
from sparsetrain.cli import build_parser, main
from sparsetrain.commands.train import resolve_config
from sparsetrain.files import read_jsonl
from sparsetrain.training import NonFiniteError, TrainConfig, train

SMALL = ["--train-subset", "1536", "--test-subset", "500", "--batch-size", "128", "--deterministic",
         "--telemetry-every", "4", "--quiet"]


def _parse(argv):
    return build_parser().parse_args(["train", *argv])


def test_config_precedence_file_then_flags_then_set(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": "resnet20", "lr": 0.2, "epochs": 7, "recipe": "swat-erk"}))
    cfg = resolve_config(_parse(["--config", str(f), "--lr", "0.3", "--set", "epochs=9", "--sparsity", "0.8",
                                 "--set", "recipe_overrides.threshold_period=10"]))
    assert cfg["model"] == "resnet20" and cfg["lr"] == 0.3 and cfg["epochs"] == 9 and cfg["recipe"] == "swat-erk"
    assert cfg["recipe_overrides"] == {"sparsity": 0.8, "threshold_period": 10}
    TrainConfig.from_dict(cfg)  # valid
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lrr'\]; valid keys: model, dataset"):
        TrainConfig.from_dict({**cfg, "lrr": 1})
    with pytest.raises(ValueError, match="schedule 'linear' is not one of cosine, step, constant"):
        TrainConfig(schedule="linear")


def test_defaults_are_the_builtin_job():
    cfg = TrainConfig()
    assert (cfg.model, cfg.dataset, cfg.recipe, cfg.recipe_overrides) == (
        "lenet5", "fashion_mnist_small", "swat-u", {"density": 0.1})
    assert cfg.data_dir is None  # the bundled subset needs no files


def _weights(run_dir):
    return runs.load_checkpoint(Path(run_dir))["model"]


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sparsetrain", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    args = [*SMALL, "--epochs", "3", "--recipe", "grad-prune"]  # stochastic pruning: RNG state must resume too
    full = _cli([*args, "--out", str(tmp_path / "full")])
    victim = _cli([*args, "--out", str(tmp_path / "victim")])
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        # After epoch 0's checkpoint exists (metrics are written just before it), kill during epoch 1.
        if (tmp_path / "victim" / runs.RunDir.CHECKPOINT).exists() and len(read_jsonl(metrics)) >= 1:
            time.sleep(0.3)  # well into the second epoch
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    epoch_at_kill = runs.load_checkpoint(tmp_path / "victim")["epoch"]
    assert epoch_at_kill < 2
    resumed = _cli(["--resume", str(tmp_path / "victim"), "--quiet"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    out_full, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out_full
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "victim")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = read_jsonl(tmp_path / "victim" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    assert "test accuracy" in out and "training FLOPs saved" in out


def test_corrupted_checkpoint_gives_clear_error_and_previous_is_kept(tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(run)]) == 0
    ckpt = run / runs.RunDir.CHECKPOINT
    prev = run / runs.RunDir.PREV_CHECKPOINT
    assert runs.load_checkpoint(prev)["epoch"] == 0 and runs.load_checkpoint(ckpt)["epoch"] == 1
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])  # truncated
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    assert "is corrupted or truncated" in caplog.text and f"--resume {prev}" in caplog.text
    assert runs.load_checkpoint(prev)["epoch"] == 0  # untouched
    # Resuming from the previous checkpoint works and redoes epoch 1.
    assert main(["train", "--resume", str(prev), "--epochs", "2", "--quiet"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]


def test_existing_run_is_never_overwritten(tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    before = (run / runs.RunDir.CHECKPOINT).read_bytes()
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(run)]) == 2
    assert "already holds a run; continue it with --resume" in caplog.text
    assert (run / runs.RunDir.CHECKPOINT).read_bytes() == before


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=1, train_subset=512, test_subset=200, batch_size=128, telemetry_every=0, quiet=True,
                      out=str(tmp_path / "run"))
    train(cfg)
    good = (tmp_path / "run" / runs.RunDir.CHECKPOINT).read_bytes()
    real = train_mod.F.cross_entropy

    def poisoned(out, y, **kw):
        return real(out, y, **kw) * float("nan") if out.requires_grad else real(out, y, **kw)

    monkeypatch.setattr(train_mod.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at epoch 1 step 4 .* last good checkpoint is kept"):
        train(TrainConfig(quiet=True), resume=tmp_path / "run", epochs=2)
    assert (tmp_path / "run" / runs.RunDir.CHECKPOINT).read_bytes() == good
    assert runs.load_checkpoint(tmp_path / "run")["epoch"] == 0


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(epochs=2, train_subset=768, test_subset=300, batch_size=128, telemetry_every=2, quiet=True,
                      out=str(run),
                      wd_exclude_bn_bias=True, warmup_epochs=0.5, schedule="step", milestones=[1], l1=1e-5)
    summary = train(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["milestones"] == [1] and saved["out"] == str(run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 2 and {"train_loss", "test_acc", "lr", "densities", "samples_per_s"} <= set(rows[0])
    assert rows[1]["lr"] == pytest.approx(0.1 * cfg.lr)  # step schedule applied at epoch 1
    assert rows[0]["densities"]["fc1"]["weight"] == pytest.approx(0.1, abs=0.01)
    tele = read_jsonl(run / "telemetry.jsonl")
    assert tele and {r["step"] for r in tele} == set(range(0, 12, 2))
    flops = json.loads((run / "flops.json").read_text())
    assert flops["training_flops_reduction_pct"] == summary["flops"]["training_flops_reduction_pct"] > 50
    mem = flops["memory"]  # one training step at the run's batch size, dense vs sparse storage
    assert mem["batch_size"] == 128 and mem["sparse_total_bytes"] < mem["dense_total_bytes"]
    assert mem["param_bytes"] == mem["grad_bytes"] == mem["optimizer_bytes"]  # SGD with momentum: one buffer
    ckpt = torch.load(run / runs.RunDir.CHECKPOINT, weights_only=True)  # safe to load
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "sparsity", "epoch", "step", "rng", "config"}
    loaded = runs.load_run(run)
    assert not any(type(m).__name__.startswith("Sparse") for m in loaded.model.modules())
    handle = loaded.sparsify()
    assert handle.step_count == ckpt["step"]


@pytest.mark.slow
def test_lenet5_swat_u_on_real_mnist_learns(tmp_path, require_dataset, data_root):
    require_dataset("mnist")
    cfg = TrainConfig(model="lenet5", dataset="mnist", data_dir=str(data_root), recipe="swat-u",
                      recipe_overrides={"density": 0.1}, epochs=1, train_subset=12000, test_subset=2000,
                      batch_size=64, lr=0.1, schedule="constant", telemetry_every=0, quiet=True,
                      out=str(tmp_path / "mnist"))
    summary = train(cfg)
    # Chance is 0.10. (Dense LeNet-5 reaches ~0.88 after this much data; SWAT-U at 90% sparsity -- even the
    # 84x10 classifier keeps only 84 weights -- learns more slowly at first: ~0.75-0.80.)
    assert summary["final_test_acc"] > 0.65, summary
    assert summary["weight_density"] < 0.2


def test_list_command(capsys):
    assert main(["list", "models", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "lenet5" not in out
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "swat-u" in out and "grad-prune" in out
    assert main(["list", "datasets"]) == 0
    assert "fashion_mnist_small" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["list", "--help"], ["measure", "--help"],
                                  ["report", "--help"], ["flops", "--help"], ["export", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: sparsetrain" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet21"], "unknown model 'resnet21'; valid choices: alexnet_cifar"),
    (["--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'"),
    (["--recipe", "swat-q"], "unknown preset 'swat-q'; valid presets:"),
    (["--density", "1.5"], r"density must be in (0, 1], got 1.5"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent-data"], "data_batch_1"),  # names the expected files
])
def test_bad_names_fail_before_anything_is_written(tmp_path, caplog, argv, message):
    out = tmp_path / "run"
    assert main(["train", *argv, "--out", str(out), "--quiet"]) == 2
    assert message in caplog.text
    assert not out.exists()


def _bad_pattern_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preset: swat-u\ndensity: 0.1\nlayers:\n  conv9: null\n")
    return str(path)


def test_a_recipe_pattern_matching_nothing_fails_before_data_and_leaves_no_trace(tmp_path, caplog):
    out = tmp_path / "runs" / "run"
    assert main(["train", "--recipe", _bad_pattern_recipe(tmp_path), "--out", str(out), "--quiet"]) == 2
    assert "['conv9'] match no Conv2d/Linear layer; layers are: conv1, conv2" in caplog.text
    assert "loaded " not in caplog.text  # refused before the dataset was read
    assert not (tmp_path / "runs").exists()


def test_a_locked_run_directory_fails_before_data_and_keeps_only_the_holders_lock(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    with runs.RunDir(out).lock():  # another run holds it (this process: the lock is not reentrant)
        assert main(["train", "--out", str(out), "--train-subset", "256", "--test-subset", "100"]) == 2
        assert "is in use by this process" in caplog.text
        assert "loaded " not in caplog.text
        assert [p.name for p in out.iterdir()] == [runs.RunDir.LOCK]


def test_a_run_refused_after_taking_its_lock_removes_its_folder(tmp_path, monkeypatch):
    import sparsetrain.data

    def no_data(*a, **k):
        raise FileNotFoundError("no dataset here")

    monkeypatch.setattr(sparsetrain.data, "make_loaders", no_data)
    out = tmp_path / "new" / "run"
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(out=str(out), quiet=True))
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------- a short real run, as a user makes it
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """``sparsetrain train --epochs 1 --train-subset 512 --test-subset 256`` on the built-in data, via the CLI."""
    out = tmp_path_factory.mktemp("short") / "run"
    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "train", "--epochs", "1", "--train-subset", "512",
                           "--test-subset", "256", "--quiet", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def _sparse_outputs(run_dir, x):
    """Logits of the trained sparse model: the run's recipe re-applied with its saved state, in eval mode."""
    run = runs.load_run(run_dir)
    run.sparsify()
    run.model.eval()
    with torch.no_grad():
        return run.model(x)


def test_export_round_trips_reproduce_the_sparse_model(short_run):
    from sparsetrain.data import make_loaders
    from sparsetrain.export import load_compressed
    from sparsetrain.models import create_model

    rd = runs.RunDir(short_run)
    before = {p.name: p.read_bytes() for p in rd.path.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "sparsetrain", "export", str(short_run)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dense weights" in out and str(rd.sparse_model_path) in out and str(rd.compressed_model_path) in out
    assert "KiB" in out and "x smaller" in out
    # nothing of the run was changed: the checkpoint still holds the dense weights, for --resume
    assert {n: rd.path.joinpath(n).read_bytes() for n in before} == before

    _, test, info = make_loaders("fashion_mnist_small", batch_size=256, augment=False, test_subset=256)
    x, _ = next(iter(test))
    want = _sparse_outputs(short_run, x)
    vanilla = create_model("lenet5", num_classes=info.num_classes, in_channels=info.channels).eval()
    for sd in (torch.load(rd.sparse_model_path, weights_only=True), load_compressed(rd.compressed_model_path)):
        vanilla.load_state_dict(sd)  # the plain model's keys
        with torch.no_grad():
            assert torch.equal(vanilla(x), want)
    # ... which the raw checkpoint does not: that is why export exists
    vanilla.load_state_dict(runs.load_checkpoint(short_run)["model"])
    with torch.no_grad():
        assert not torch.allclose(vanilla(x), want)
    assert rd.compressed_model_path.stat().st_size * 4 < rd.sparse_model_path.stat().st_size  # SWAT-U 90%

    # a second export refuses to overwrite, --force does
    again = subprocess.run([sys.executable, "-m", "sparsetrain", "export", str(short_run)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "exists; add --force" in again.stderr and "Traceback" not in again.stderr
    assert main(["export", str(short_run), "--force", "--out", str(short_run / "other.pt")]) == 0


def test_short_run_records_what_it_used(short_run):
    config = runs.RunDir(short_run).read_config()
    (m,) = runs.RunDir(short_run).read_metrics()
    steps = m["step"]  # 512 images / batch 64
    assert steps == 8
    # the telemetry interval was chosen from the run length: ~TELEMETRY_POINTS samples, not 1
    assert config["telemetry_every"] == max(1, steps // train_config.TELEMETRY_POINTS)
    assert len({r["step"] for r in read_jsonl(runs.RunDir(short_run).telemetry_path)}) == steps
    # lr: the mean rate of the epoch's steps (the cosine schedule ends the epoch at 0)
    sched = train_config.lr_lambda(TrainConfig.from_dict({k: v for k, v in config.items() if k != "out"}), steps)
    assert m["lr"] == pytest.approx(sum(0.05 * sched(i) for i in range(steps)) / steps)
    assert m["lr_end"] == pytest.approx(0.0, abs=1e-12) and m["lr"] > 0.02
    # the intra-epoch curve: one point per step on this short run, ending at the epoch's step
    assert m["curve"]["step"] == list(range(1, steps + 1))
    assert len(m["curve"]["train_loss"]) == len(m["curve"]["train_acc"]) == steps
    assert config["recipe"] == "swat-u" and config["train_subset"] == 512


def test_config_records_the_data_folder_from_the_environment(tmp_path, data_root, require_dataset, monkeypatch):
    require_dataset("mnist")
    monkeypatch.setenv("SPARSETRAIN_DATA", str(data_root))
    cfg = TrainConfig(dataset="mnist", epochs=1, train_subset=256, test_subset=128, batch_size=128,
                      telemetry_every=0, quiet=True, out=str(tmp_path / "run"))
    train(cfg)
    assert runs.RunDir(tmp_path / "run").read_config()["data_dir"] == str(data_root.resolve())
    # and the run measures and resumes from that folder without the variable
    monkeypatch.delenv("SPARSETRAIN_DATA")
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--quiet"]) == 0


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard extra is not installed here")
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch-size", "128",
                 "--tensorboard", "--quiet", "--out", str(out)]) == 0
    events = list(runs.RunDir(out).tensorboard_dir.glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_summary_states_optimizer_amp_and_the_dense_first_layer(short_run):
    printed = (short_run.parent / "stdout.txt").read_text()
    summary = runs.RunDir(short_run).read_summary()
    assert "  optimizer                sgd (momentum 0.9), lr 0.05 cosine, weight decay 0.0005; amp none" in printed
    assert summary["dense_layers"] == ["conv1"]  # SWAT-U leaves the first layer dense
    # The activation density over the sparse layers, recomputed from the per-layer files: element-weighted over the
    # activations saved for dW.
    flops = json.loads(runs.RunDir(short_run).flops_path.read_text())
    dens = runs.RunDir(short_run).read_metrics()[-1]["densities"]
    rows = [r for r in flops["layers"] if r["name"] != "conv1"]
    want = sum(dens[r["name"]]["input_for_grad_weight"] * r["saved_activation_elements"] for r in rows) / sum(
        r["saved_activation_elements"] for r in rows)
    assert summary["activation_density_sparse_layers"] == pytest.approx(want)
    assert (f"{100 * summary['activation_density']:.1f}% of saved activations; conv1 is dense, {100 * want:.1f}% "
            "over the sparse layers") in printed
    near = summary["final_test_acc"] < 2.5 / 10
    assert ("note                     near chance (10.00% with 10 classes)" in printed) == near


@pytest.mark.parametrize("acc, noted", [(0.099, True), (0.234, True), (0.887, False)])
def test_near_chance_accuracy_is_said_in_one_line_without_hiding_the_number(acc, noted):
    from sparsetrain.training import format_summary

    s = {"run_dir": "r", "model": "lenet5", "dataset": "fashion_mnist_small", "recipe": "swat-u", "density": 0.1,
         "final_test_acc": acc, "best_test_acc": acc, "weight_density": 0.1, "activation_density": 0.1,
         "num_classes": 10, "steps": 40, "optimizer": "sgd", "amp": "none",
         "flops": {"training_flops_reduction_pct": 1.0, "inference_flops_reduction_pct": 1.0,
                   "act_memory_reduction_pct": 1.0, "model_compression_x": 1.0}}
    text = format_summary(s)
    assert f"test accuracy            {100 * acc:.2f}%" in text
    notes = [ln for ln in text.splitlines() if "near chance" in ln]
    assert len(notes) == (1 if noted else 0)
    if noted:
        assert "too few steps (40 at density 0.1) or the learning rate; try more --epochs or another --lr" in notes[0]
