"""The convergence block's machinery: gap intervals, ``reproduce --jobs`` (runs in parallel processes) and
``reproduce --collect`` (tables from the runs finished so far), and its per-epoch table.

The runs are tiny LeNet-5 runs on the packaged Fashion-MNIST subset (no data folder needed), through an experiment
file written here with the convergence layout.
"""

import json
import math

import pytest
import yaml

from sparsetrain.cli import EXIT_USAGE, main
from sparsetrain.reporting.results import RESULTS_FILE, render
from sparsetrain.reporting.tables import format_gap, gap_interval, interval_verdict


def test_gap_interval_is_the_pooled_two_sample_t_interval():
    d, h = gap_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    # pooled SD 1, df 4, t(0.975, 4) = 2.776, sqrt(1/3 + 1/3)
    assert d == pytest.approx(-3.0) and h == pytest.approx(2.776 * math.sqrt(2 / 3))
    d, h = gap_interval([0.5, 0.7], [0.6])  # df 1
    assert d == pytest.approx(0.0) and h == pytest.approx(12.706 * math.sqrt(0.02) * math.sqrt(1.5))
    assert gap_interval([0.9], [0.8]) == (pytest.approx(0.1), None)  # no degrees of freedom: no interval
    with pytest.raises(ValueError, match="at least one value"):
        gap_interval([], [0.5])


def test_gap_words_follow_the_interval():
    assert format_gap(-0.03, 0.01) == "-3.00 [-4.00, -2.00]"
    assert "no interval" in format_gap(0.01, None)
    assert interval_verdict(-0.03, 0.01) == "below dense"
    assert interval_verdict(0.01, 0.02) == "consistent with no gap"
    assert interval_verdict(-0.03, 0.01, published=-0.0135) == "below dense; excludes the paper's gap"
    assert interval_verdict(-0.01, 0.02, published=-0.0135).endswith("contains the paper's gap")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv")
    exp = {
        "version": 1, "paper": "swat-convergence", "title": "tiny convergence block",
        "protocol": {"model": "lenet5", "dataset": "fashion_mnist_small", "train_subset": 96, "test_subset": 100,
                     "epochs": 2, "batch_size": 32, "lr": 0.05, "telemetry_every": 0},
        "seeds": [0, 1],
        "points": [{"name": "dense", "label": "Dense", "config": {"recipe": "dense"}},
                   {"name": "swat", "label": "SWAT-U 90%", "config": {"recipe": "swat-u-90"}}],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp), encoding="utf-8")
    return folder, path


def _record(folder):
    return json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))


def _finals(rec):
    return {(p["name"], r["seed"]): (r["final_test_acc"], r["test_acc_curve"]) for p in rec["points"] for r in p["runs"]}


def test_parallel_jobs_train_the_same_runs_as_serial(experiment):
    folder, path = experiment
    assert main(["reproduce", str(path), "--out", str(folder / "par"), "--results", str(folder / "par-res"),
                 "--jobs", "2", "--threads", "1", "--no-all-ops"]) == 0
    assert main(["reproduce", str(path), "--out", str(folder / "ser"), "--results", str(folder / "ser-res"),
                 "--threads", "1", "--no-all-ops"]) == 0
    par, ser = _record(folder / "par-res"), _record(folder / "ser-res")
    assert len(_finals(par)) == 4
    assert _finals(par) == _finals(ser)  # each run is its own seeded process: the order and the pool change nothing
    tables = {t.key: t for t in render(par).tables}
    assert tables["convergence_final"].columns[5].startswith("gap to dense [95 % CI]")
    by_epoch = tables["convergence_by_epoch"]
    assert [r[0] for r in by_epoch.rows] == ["1", "2"] and "[" in by_epoch.rows[-1][3]


def test_collect_writes_the_finished_runs_and_trains_nothing(experiment, capsys):
    folder, path = experiment
    out = folder / "par"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["reproduce", str(path), "--out", str(out), "--results", str(folder / "collected"), "--collect",
                 "--no-all-ops"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert _finals(_record(folder / "collected")) == _finals(_record(folder / "par-res"))
    capsys.readouterr()
    assert main(["reproduce", str(path), "--out", str(folder / "empty"), "--collect"]) == EXIT_USAGE
    assert "no finished run" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--jobs", "--threads"])
def test_jobs_and_threads_must_be_positive(experiment, capsys, flag):
    _, path = experiment
    assert main(["reproduce", str(path), flag, "0"]) == EXIT_USAGE
    assert f"{flag} must be >= 1" in capsys.readouterr().err
