"""``sparsetrain train --tensorboard``'s success path (issue 20, item 8): the event files hold the per-epoch metrics,
the intra-epoch curve and the sparsity telemetry, equal to ``metrics.jsonl``, also across a resume."""

from __future__ import annotations

import pytest

pytest.importorskip("torch.utils.tensorboard", reason="tensorboard not installed (pip install 'sparsetrain[tensorboard]')")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from sparsetrain.cli import main  # noqa: E402
from sparsetrain.runs import RunDir  # noqa: E402

TINY = ["--train-subset", "512", "--test-subset", "256", "--batch-size", "64", "--quiet", "--telemetry-every", "4"]


def _scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run.tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_what_metrics_jsonl_holds_across_a_resume(tmp_path):
    run = RunDir(tmp_path / "tb")
    assert main(["train", "--tensorboard", "--epochs", "1", "--out", str(run.path), *TINY]) == 0
    assert main(["train", "--resume", str(run.path), "--epochs", "2", "--quiet"]) == 0
    metrics = run.read_metrics()
    scalars = _scalars(run)
    # One point per epoch at the epoch's last step, equal to metrics.jsonl (float32 in the event file).
    for key in ("test_acc", "train_loss", "weight_density", "activation_density", "training_flops_reduction_pct"):
        points = scalars[f"epoch/{key}"]
        assert [s for s, _ in points] == [m["step"] for m in metrics], key
        assert [v for _, v in points] == pytest.approx([m[key] for m in metrics], rel=1e-6), key
    # The intra-epoch training curve, within the run's steps, no step twice after the resume.
    curve = [s for s, _ in scalars["step/train_loss"]]
    assert curve == sorted(set(curve)) and 0 < curve[0] and curve[-1] == metrics[-1]["step"]
    # The per-layer sparsity telemetry of the monitor (every 4 steps).
    layers = [t for t in scalars if t.startswith("sparsity/weight/")]
    assert "sparsity/weight/conv2" in layers
    steps = [s for s, _ in scalars["sparsity/weight/conv2"]]
    assert steps == list(range(0, metrics[-1]["step"], 4))
    assert all(0.85 < v < 0.95 for _, v in scalars["sparsity/weight/conv2"])  # SWAT-U at density 0.1
