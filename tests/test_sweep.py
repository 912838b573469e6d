"""``sparsetrain sweep``: one run per (point, seed), a mean +- SD table over seeds, skip/resume on rerun, clear errors.

One real sweep on the bundled Fashion-MNIST subset (2 densities x 2 seeds, one epoch of 256 images) is shared by the
tests of this module; every figure in its table is checked against the runs' own summaries.
"""

import csv
import importlib.util
import statistics

import pytest

from sparsetrain.cli import EXIT_USAGE, main
from sparsetrain.commands import sweep
from sparsetrain.recipe import Recipe, list_example_recipes
from sparsetrain.runs import RunDir

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128", "--batch-size", "64",
        "--telemetry-every", "0", "--quiet"]
DENSITIES = (0.2, 0.5)


def _sweep_args(out):
    return ["sweep", "--recipe", "swat-u", "--param", "density=0.2,0.5", "--seeds", "2", *TINY, "--out", str(out)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert main(_sweep_args(out)) == 0
    return out


def _mtimes(runs):
    return {p: p.stat().st_mtime_ns for r in runs for p in (r.summary_path, r.checkpoint_path, r.metrics_path)}


def test_one_run_per_point_and_seed(swept):
    runs = RunDir.find(swept)
    assert len(runs) == 4
    seen = set()
    for r in runs:
        cfg = r.read_config()
        summary = r.read_summary()
        assert summary is not None and summary["epochs"] == 1
        seen.add((cfg["recipe_overrides"]["density"], cfg["seed"]))
        assert summary["density"] == cfg["recipe_overrides"]["density"]
    assert seen == {(d, s) for d in DENSITIES for s in (0, 1)}


def test_table_matches_the_runs_summaries(swept):
    by_density = {}
    for r in RunDir.find(swept):
        s = r.read_summary()
        by_density.setdefault(s["density"], []).append(s)
    with open(swept / sweep.TABLE_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["density"]) for row in rows] == list(DENSITIES)
    md = (swept / sweep.TABLE_MARKDOWN).read_text()
    for row in rows:
        summaries = by_density[float(row["density"])]
        accs = [s["final_test_acc"] for s in summaries]
        assert int(row["n_seeds"]) == 2
        assert float(row["test_acc_mean"]) == pytest.approx(sum(accs) / 2)
        assert float(row["test_acc_sd"]) == pytest.approx(statistics.stdev(accs))  # sample SD (n - 1)
        assert float(row["weight_density_mean"]) == pytest.approx(
            sum(s["weight_density"] for s in summaries) / 2)
        assert float(row["training_flops_reduction_pct_mean"]) == pytest.approx(
            sum(s["flops"]["training_flops_reduction_pct"] for s in summaries) / 2)
        cell = f"{100 * sum(accs) / 2:.2f} ± {100 * statistics.stdev(accs):.2f}"
        assert f"| {row['density']} | 2 | {cell} |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (swept / sweep.PLOT).stat().st_size > 0


def test_rerun_skips_finished_points_and_resumes_an_interrupted_one(swept):
    runs = RunDir.find(swept)
    before = _mtimes(runs)
    assert main(_sweep_args(swept)) == 0
    assert _mtimes(runs) == before  # nothing retrained, nothing rewritten

    # A run killed after its last checkpoint but before its summary: the rerun resumes it (no epoch is retrained).
    victim = runs[0]
    summary, metrics = victim.read_summary(), victim.read_metrics()
    victim.summary_path.unlink()
    assert main(_sweep_args(swept)) == 0
    assert victim.read_summary()["final_test_acc"] == summary["final_test_acc"]
    assert victim.read_metrics() == metrics  # resume rewrites the metrics file up to its checkpoint: same records
    after = _mtimes(runs)
    assert after[victim.checkpoint_path] == before[victim.checkpoint_path]
    others = [p for p in before if p.parent != victim.path]
    assert {p: after[p] for p in others} == {p: before[p] for p in others}


def test_rerun_with_another_config_is_refused(swept, capsys):
    assert main([*_sweep_args(swept), "--lr", "0.2"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsetrain sweep: error:") and "lr" in err and "another --out" in err


@pytest.mark.parametrize("param, fragments", [
    ("dens=0.5", ["--param dens: unknown key", "density", "threshold_period", "lr"]),
    ("density", ["--param expects KEY=V1,V2"]),
    ("density=0.5,2", ["density=2", "density must be in (0, 1]"]),
    ("out=a,b", ["--param out: unknown key"]),
])
def test_bad_param_is_one_line_and_exit_2(tmp_path, capsys, param, fragments):
    out = tmp_path / "s"
    assert main(["sweep", "--recipe", "swat-u", "--param", param, *TINY, "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparsetrain sweep: error:")
    for f in fragments:
        assert f in err
    assert not out.exists()  # validated before anything is written


def test_params_split_into_recipe_overrides_and_train_config(tmp_path):
    params = sweep.parse_params(["threshold_period=1,100", "lr=0.1,0.01"])
    assert params == {"threshold_period": [1, 100], "lr": [0.1, 0.01]}
    base = {"recipe": "swat-u", "recipe_overrides": {"sparsity": 0.9}, "lr": 0.05}
    cfg = sweep.point_config(base, {"density": 0.3, "threshold_period": 100, "lr": 0.1}, 2, tmp_path)
    assert cfg["recipe_overrides"] == {"density": 0.3, "threshold_period": 100}  # density replaces sparsity
    assert cfg["lr"] == 0.1 and cfg["seed"] == 2 and cfg["out"] == str(tmp_path)
    assert base["recipe_overrides"] == {"sparsity": 0.9}  # the base config is not modified


def test_ablation_recipes_are_sweepable():
    names = {"ablation-forward-weights", "ablation-forward-acts-restored", "ablation-backward-only",
             "swat-u-period-sweep"}
    assert names <= set(list_example_recipes())
    fwd_w = Recipe.load("ablation-forward-weights").layers[-1][1]
    assert fwd_w.resolved("weight") is not None and fwd_w.resolved("weight_for_grad_input") is None
    assert fwd_w.resolved("input_for_grad_weight") is None
    fwd_x = Recipe.load("ablation-forward-acts-restored").layers[-1][1]
    assert fwd_x.resolved("input") is not None and fwd_x.resolved("input_for_grad_weight") is None
    bwd = Recipe.load("ablation-backward-only").layers[-1][1]
    assert bwd.resolved("weight") is None and bwd.resolved("input") is None
    assert bwd.resolved("weight_for_grad_input") is not None and bwd.resolved("input_for_grad_weight") is not None
    for period in (1, 10, 100, 1000):
        assert Recipe.load("swat-u-period-sweep", threshold_period=period).threshold_period == period
