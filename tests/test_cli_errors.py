"""The CLI ends every user error in one line naming the problem, with a non-zero exit status, and loses nothing.

The failures a user hit (issue 12, item 3) run the real CLI in a subprocess; the audit of every command's bad
names, missing files and bad numbers runs ``sparsetrain.cli.main`` in-process (the same error handling, faster).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparsetrain import runs
from sparsetrain.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from sparsetrain.runs import RunDir

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch-size", "128",
        "--telemetry-every", "0", "--quiet"]


def _run(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "sparsetrain", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def _assert_one_error(proc, *fragments, status=EXIT_USAGE):
    """Exit status, no traceback, and one ``sparsetrain CMD: ...`` line holding every fragment."""
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparsetrain ")]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_malformed_config_names_file_line_and_column(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: lenet5\nepochs: [1, 2\nlr: 0.1\n")
    before = cfg.read_bytes()
    proc = _run("train", "--config", str(cfg), "--out", str(tmp_path / "out"))
    _assert_one_error(proc, f"{cfg}:3:3", "not valid YAML")
    assert cfg.read_bytes() == before and not (tmp_path / "out").exists()


def test_malformed_recipe_names_file_line_and_column(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("preset: swat-u\ndensity: 0.1\n  bad: : x\n")
    proc = _run("train", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
    _assert_one_error(proc, f"recipe {recipe}:3:6", "not valid YAML")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_dataset_file_is_named_with_what_to_do(tmp_path, require_dataset, damage):
    src = require_dataset("mnist")
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    raw = bytearray((src / "train.npz").read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 3]
    else:  # zip structure intact, member bytes damaged: the CRC check fails
        mid = len(raw) // 2
        raw[mid:mid + 1000] = bytes(1000)
    (data / "train.npz").write_bytes(bytes(raw))
    (data / "test.npz").write_bytes((src / "test.npz").read_bytes())
    proc = _run("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), *TINY,
                "--out", str(tmp_path / "out"))
    _assert_one_error(proc, str(data / "train.npz"), "truncated or corrupt", "copy or download it again")
    assert (data / "train.npz").read_bytes() == bytes(raw) and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_before_anything_is_written(tmp_path):
    proc = _run("train", "--device", "cuda", "--out", str(tmp_path / "out"))
    _assert_one_error(proc, "--device cuda", "no CUDA device", "--device cpu")
    assert not (tmp_path / "out").exists()
    assert "loaded" not in proc.stderr  # failed before the data was read


def test_out_naming_an_existing_file_fails_before_data_loads(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("my notes\n")
    proc = _run("train", "--out", str(f))
    _assert_one_error(proc, str(f), "existing file", "another --out")
    assert f.read_text() == "my notes\n" and "loaded" not in proc.stderr


def test_ctrl_c_keeps_the_last_checkpoint_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    args = ["--epochs", "200", "--train-subset", "256", "--test-subset", "128", "--batch-size", "128",
            "--telemetry-every", "0", "--quiet", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrain", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not RunDir(out).has_checkpoint():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = _assert_one_error(done, "interrupted", f"sparsetrain train --resume {out}", status=EXIT_INTERRUPTED)
    assert "checkpointed" in line
    ckpt = runs.load_checkpoint(out)  # intact: loads, and every checkpointed epoch has its metrics line
    assert ckpt["epoch"] + 1 <= len(RunDir(out).read_metrics())
    assert RunDir(out).read_config()["epochs"] == 200


def test_train_help_prints_a_single_percent_sign():
    proc = _run("train", "--help")
    assert proc.returncode == 0 and "90%" in proc.stdout and "%%" not in proc.stdout
    top = _run("--help")
    assert "90%" in top.stdout and "%%" not in top.stdout


def test_tensorboard_missing_is_a_clear_error_before_anything_is_written(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed; the success path is tested in test_tensorboard.py")
    proc = _run("train", "--tensorboard", "--out", str(tmp_path / "out"))
    _assert_one_error(proc, "--tensorboard", "pip install 'sparsetrain[tensorboard]'")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- audit: every command, in-process
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not a run\n")
    (d / "empty").mkdir()
    (d / "bad.yaml").write_text("a: [1\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    return d


AUDIT = [
    # (argv with {d} = the folder of bad files, fragments of the one error line)
    (["train", "--model", "nosuch", "--out", "{d}/o"], ["unknown model 'nosuch'", "valid choices"]),
    (["train", "--dataset", "nosuch", "--out", "{d}/o"], ["unknown dataset 'nosuch'", "valid choices"]),
    (["train", "--recipe", "nosuch", "--out", "{d}/o"], ["unknown preset 'nosuch'"]),
    (["train", "--recipe", "{d}/missing.yaml", "--out", "{d}/o"], ["recipe file not found"]),
    (["train", "--epochs", "0", "--out", "{d}/o"], ["epochs must be an integer >= 1"]),
    (["train", "--lr", "-1", "--out", "{d}/o"], ["lr must be > 0"]),
    (["train", "--train-subset", "0", "--out", "{d}/o"], ["train_subset must be an integer >= 1"]),
    (["train", "--telemetry-every", "-1", "--out", "{d}/o"], ["telemetry_every must be an integer >= 0"]),
    (["train", "--device", "nosuch", "--out", "{d}/o"], ["device 'nosuch' is not a torch device"]),
    (["train", "--set", "lrr=1", "--out", "{d}/o"], ["unknown config key(s) ['lrr']"]),
    (["train", "--set", "lr", "--out", "{d}/o"], ["--set expects KEY=VALUE"]),
    (["train", "--set", "lr=[", "--out", "{d}/o"], ["--set lr=[", "not valid YAML"]),
    (["train", "--config", "{d}/missing.yaml"], ["--config", "not found"]),
    (["train", "--config", "{d}/list.yaml"], ["must hold a mapping"]),
    (["train", "--resume", "{d}/empty"], ["no checkpoint at"]),
    (["train", "--resume", "{d}/notes.txt"], ["corrupted or truncated"]),
    (["measure", "{d}/empty"], ["not a sparsetrain run directory"]),
    (["measure", "{d}/missing"], ["not a sparsetrain run directory"]),
    (["measure", "{d}/empty", "--batches", "0"], ["--batches must be >= 1"]),
    (["measure", "{d}/empty", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["report", "{d}/missing"], ["is not a directory"]),
    (["report", "{d}/empty"], ["not a sparsetrain run directory"]),
    (["flops", "--model", "nosuch"], ["unknown model 'nosuch'"]),
    (["flops"], ["give --model NAME"]),
    (["flops", "--model", "lenet5", "--num-classes", "0"], ["--num-classes must be >= 1"]),
    (["flops", "--model", "lenet5", "--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["flops", "--model", "lenet5", "--recipe", "nosuch"], ["unknown preset 'nosuch'"]),
    (["flops", "--run", "{d}/empty"], ["not a sparsetrain run directory"]),
    (["export", "{d}/missing"], ["is not a directory"]),
    (["export", "{d}/empty"], ["not a sparsetrain run directory"]),
]


@pytest.mark.parametrize("argv, fragments", AUDIT, ids=[" ".join(a[:3]) for a, _ in AUDIT])
def test_every_command_ends_bad_input_in_one_line(argv, fragments, bad_files, capsys, caplog):
    before = sorted(p.name for p in bad_files.iterdir())
    argv = [a.format(d=bad_files) for a in argv]
    try:
        status = main(argv)
    except SystemExit as e:  # the commands' own argument checks exit through SystemExit with their message
        status = e.code if isinstance(e.code, int) else EXIT_USAGE
        message = str(e.code)
    else:
        captured = capsys.readouterr()
        message = captured.err + "".join(r.getMessage() for r in caplog.records)
    assert status == EXIT_USAGE, message
    for f in fragments:
        assert f in message, message
    assert sorted(p.name for p in bad_files.iterdir()) == before  # nothing written, nothing removed


def test_argparse_errors_are_usage_errors():
    for argv in (["list", "nosuch"], ["flops", "--input", "3xa"], ["train", "--epochs", "many"], ["nosuch"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == EXIT_USAGE


def test_unexpected_errors_are_one_line_and_exit_1(monkeypatch, capsys):
    import sparsetrain.commands.list as list_cmd

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(list_cmd, "main", broken)
    assert main(["list", "models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: division by zero" in err and "sparsetrain -v list models" in err
    with pytest.raises(ZeroDivisionError):  # -v shows the traceback
        main(["-v", "list", "models"])


def test_interrupt_outside_training_is_exit_130(monkeypatch, capsys):
    import sparsetrain.commands.list as list_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(list_cmd, "main", interrupted)
    assert main(["list", "models"]) == EXIT_INTERRUPTED
    assert "sparsetrain list: interrupted" in capsys.readouterr().err


def test_broken_pipe_is_silent():
    # `sparsetrain flops ... | head -1` where head has already gone: no traceback, no error line.
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written: the first write fails with EPIPE
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrain", "flops", "--model", "lenet5"], stdout=w,
                            stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, stderr = proc.communicate(timeout=120)
    assert stderr == ""


# ------------------------------------------------------------------------------- silent defaults are said aloud
def test_flops_takes_the_models_natural_class_count_and_input_and_prints_them(capsys):
    proc = _run("flops", "--model", "resnet50_imagenet", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["num_classes"] == 1000 and tuple(d["input_shape"]) == (3, 224, 224)
    fc = next(r for r in d["layers"] if r["name"] == "fc")
    assert fc["dense_forward_macs"] == 2048 * 1000  # the ImageNet head, not a 10-class one
    assert "1000 classes (resnet50_imagenet's default)" in d["defaults"]
    assert main(["flops", "--model", "resnet50_imagenet", "--num-classes", "10"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("resnet50_imagenet: input 3x224x224 (resnet50_imagenet's default), "
                                           "10 classes (--num-classes)")
