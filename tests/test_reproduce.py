"""``sparsetrain reproduce``: the SWAT block end to end in its --quick form on real CIFAR-10, skip on rerun,
regeneration of the tables from ``reproduce.json`` (``sparsetrain report``), and experiment-file validation.

One real quick run (11 tiny ResNet-20 runs) is shared by the tests of this module.
"""

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from sparsetrain.cli import EXIT_USAGE, main
from sparsetrain.papers import (
    ExperimentError,
    list_experiments,
    load_experiment,
    matched_width_mult,
    parse_experiment,
)
from sparsetrain.reporting.results import RESULTS_FILE, SMOKE_BANNER, TABLES_FILE, regenerate, render
from sparsetrain.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
PAPERS = ("channel", "channel-mnist", "grad-prune", "swat", "swat-convergence", "tensorquant")


@pytest.fixture(scope="module")
def quick_swat(tmp_path_factory, data_root, require_dataset):
    require_dataset("cifar10")
    tmp = tmp_path_factory.mktemp("reproduce")
    args = ["reproduce", "swat", "--quick", "--out", str(tmp / "runs"), "--results", str(tmp / "results"),
            "--data-dir", str(data_root), "--threads", "1"]
    assert main(args) == 0
    return tmp, args


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_quick_swat_trains_every_point_and_seed(quick_swat):
    tmp, _ = quick_swat
    exp = load_experiment("swat")
    expected = {f"{p.name}_seed-{s}" for p in exp.points for s in p.seeds}
    runs = RunDir.find(tmp / "runs")
    assert {r.path.name for r in runs} == expected
    assert all(r.read_summary()["epochs"] == 1 for r in runs)  # the quick protocol: one epoch
    assert all(r.read_config()["train_subset"] == exp.quick["train_subset"] for r in runs)


def test_results_hold_every_point_and_the_published_numbers(quick_swat):
    tmp, _ = quick_swat
    rec = json.loads((tmp / "results" / RESULTS_FILE).read_text())
    assert rec["paper"] == "swat" and rec["quick"] is True and rec["experiment_version"] == 1
    by_name = {p["name"]: p for p in rec["points"]}
    seeds = len(next(p for p in load_experiment("swat").points if p.name == "swat-u-90").seeds)
    assert seeds >= 3  # issue 21: at least 3 seeds per SWAT point
    assert len(by_name["dense"]["runs"]) == seeds and len(by_name["swat-u-90"]["runs"]) == seeds
    u90 = by_name["swat-u-90"]["runs"][0]
    summary = RunDir(tmp / "runs" / u90["run"]).read_summary()
    assert u90["final_test_acc"] == summary["final_test_acc"]
    assert u90["flops"]["training_flops_reduction_pct"] == summary["flops"]["training_flops_reduction_pct"]
    assert 0.05 < u90["weight_density"] < 0.2  # SWAT-U 90 %, first layer and classifier dense
    tables = (tmp / "results" / TABLES_FILE).read_text()
    accs = [r["final_test_acc"] for r in by_name["swat-u-90"]["runs"]]
    mean, sd = statistics.mean(accs), statistics.stdev(accs)  # the sample SD (n - 1)
    assert "| SWAT-U 90% | " in tables and f"{100 * mean:.2f} ± {100 * sd:.2f} | {seeds} |" in tables
    assert tables.startswith(f"### {SMOKE_BANNER}")  # a --quick record renders as a smoke test ...
    assert "Published:" not in tables and "95 % CI" not in tables  # ... with nothing to compare with the paper
    table2 = rec["published"]["tables"][0]["rows"][0]  # the paper's numbers are in the record all the same, verbatim
    assert table2[:6] == ["VGG-16", "SWAT-U", "90.0", "90.0", "91.95 ± 0.06", "93.30 / -1.35"]
    # Summaries only: checkpoints stay in the run directories.
    assert not [p for p in (tmp / "results").rglob("*") if p.suffix in (".pt", ".pth", ".npz")]
    assert any((tmp / "runs").rglob("*.pt"))


def test_rerun_skips_finished_runs(quick_swat):
    tmp, args = quick_swat
    before = {p: t for p, t in _mtimes(tmp / "runs").items() if "results" not in p.parts}
    assert main(args) == 0
    after = {p: t for p, t in _mtimes(tmp / "runs").items() if "results" not in p.parts}
    assert after == before  # nothing retrained, no run file rewritten


def test_report_regenerates_the_tables_from_the_record_alone(quick_swat, capsys):
    tmp, _ = quick_swat
    results = tmp / "results"
    tables = (results / TABLES_FILE).read_text()
    csvs = {p.name: p.read_text() for p in results.glob("*.csv")}
    for p in [results / TABLES_FILE, *results.glob("*.csv"), *results.glob("*.png")]:
        p.unlink()
    capsys.readouterr()
    assert main(["report", str(results)]) == 0
    assert tables in capsys.readouterr().out
    assert (results / TABLES_FILE).read_text() == tables
    assert {p.name: p.read_text() for p in results.glob("*.csv")} == csvs


def test_report_refuses_a_mix_of_results_and_run_directories(quick_swat, capsys):
    tmp, _ = quick_swat
    run = RunDir.find(tmp / "runs")[0].path
    assert main(["report", str(tmp / "results"), str(run)]) == EXIT_USAGE
    assert "not a `sparsetrain reproduce` results folder" in capsys.readouterr().err


def test_regenerate_names_a_folder_without_a_record(tmp_path):
    with pytest.raises(ValueError, match="holds no reproduce.json"):
        regenerate(tmp_path)


@pytest.mark.parametrize("paper", sorted(p.name for p in (REPO / "results").glob("*") if (p / RESULTS_FILE).is_file()))
def test_docs_results_tables_come_from_results(paper):
    """Every table of docs/results.md is the one `sparsetrain report results/<paper>` renders from results/."""
    rec = json.loads((REPO / "results" / paper / RESULTS_FILE).read_text())
    docs = (REPO / "docs" / "results.md").read_text()
    for table in render(rec).tables:
        assert table.markdown() in docs, f"docs/results.md lacks the regenerated table {table.title!r}"


@pytest.mark.parametrize("paper", sorted(p.name for p in (REPO / "results").glob("*") if (p / RESULTS_FILE).is_file()))
def test_quick_records_render_as_a_smoke_test(paper):
    """A --quick record prints a banner and no paper notes, published tables, gaps, intervals, verdicts or relative
    accuracies: its numbers come from a few hundred images and one epoch (issue 21, item 5)."""
    rec = json.loads((REPO / "results" / paper / RESULTS_FILE).read_text())
    full = render(rec)
    rec["quick"], rec["command"] = True, rec["command"] + " --quick"
    smoke = render(rec)
    text = smoke.markdown()
    assert text.startswith(f"### {SMOKE_BANNER}: ") and f"**{SMOKE_BANNER}.**" in text
    assert [t.key for t in smoke.tables] == [t.key for t in full.tables if not t.key.startswith("published")]
    for fragment in ("Published:", "Ours:", "95 % CI", "what the interval supports", "paper's gap", "consistent with",
                     "contains the paper", "Relative test accuracy", "relative to threshold 0", "CPU-scale protocol"):
        assert fragment not in text, fragment
    for note in rec.get("notes") or []:
        assert note not in text
    assert all(t.note.startswith("quick smoke protocol") for t in smoke.tables)


def test_gaps_carry_intervals_and_the_papers_gap():
    rec = json.loads((REPO / "results" / "swat" / RESULTS_FILE).read_text())
    gaps = {t.key: t for t in render(rec).tables}["swat_gaps"]
    rows = {r[0]: dict(zip(gaps.columns, r)) for r in gaps.rows}
    u90 = rows["SWAT-U 90%"]
    # n + n runs: the gap is the difference of the means, inside t(0.975, 2n - 2) * pooled SD * sqrt(2/n) of it
    acc = {p["name"]: [100 * r["final_test_acc"] for r in p["runs"]] for p in rec["points"]}
    gap = statistics.mean(acc["swat-u-90"]) - statistics.mean(acc["dense"])
    m = re.fullmatch(r"([-+]\d+\.\d\d) \[([-+]\d+\.\d\d), ([-+]\d+\.\d\d)\]", u90["gap to dense [95 % CI] (pp)"])
    assert m and m.group(1) == f"{gap:+.2f}" and float(m.group(2)) < gap < float(m.group(3))
    assert "-1.35 (VGG-16)" in u90["paper's gap (pp, row)"]
    assert u90["what the interval supports"].startswith(
        "consistent with no gap" if float(m.group(2)) <= 0 <= float(m.group(3)) else ("below" if gap < 0 else "above"))
    frozen = next(r for k, r in rows.items() if "frozen" in k)["vs SWAT-U 90% [95 % CI] (pp)"]
    lo, hi = (float(v) for v in re.search(r"\[([-+]\d+\.\d\d), ([-+]\d+\.\d\d)\]", frozen).groups())
    assert frozen.endswith("no difference resolved" if lo <= 0 <= hi else ("lower" if hi < 0 else "higher"))


@pytest.mark.parametrize("paper", sorted(p.name for p in (REPO / "results").glob("*") if (p / RESULTS_FILE).is_file()))
def test_committed_records_carry_the_experiment_files_published_numbers(paper):
    """results/ was refreshed from the YAMLs (refresh_record): the published tables and each point's paper_gap are the
    experiment file's, and refreshing again changes nothing -- in particular no run."""
    from sparsetrain.papers import refresh_record

    rec = json.loads((REPO / "results" / paper / RESULTS_FILE).read_text())
    exp = load_experiment(paper)
    assert rec["published"] == exp.published
    again = refresh_record(rec, exp)
    assert again == rec
    by_name = {p.name: p for p in exp.points}
    for pt in rec["points"]:
        if pt["name"] in by_name:
            assert pt["paper_gap"] == by_name[pt["name"]].paper_gap


def test_bad_paper_lists_the_valid_ones(capsys):
    assert main(["reproduce", "swatt"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown paper 'swatt'" in err
    for name in PAPERS:
        assert name in err


def test_shipped_experiments_are_valid():
    assert tuple(list_experiments()) == PAPERS
    for name in PAPERS:
        exp = load_experiment(name)
        assert exp.paper == name and exp.version == 1 and exp.points and exp.published.get("tables")


def _minimal(**changes):
    data = {"version": 1, "paper": "swat", "title": "t", "protocol": {"model": "lenet5", "dataset": "mnist"},
            "points": [{"name": "dense", "config": {"recipe": "dense"}},
                       {"name": "u90", "config": {"recipe": "swat-u", "recipe_overrides": {"sparsity": 0.9}}}]}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, fragments", [
    ({"verison": 1}, ["unknown key(s) ['verison']", "valid keys: version"]),
    ({"version": 2}, ["version 2 is not supported", "version 1"]),
    ({"protocol": {"modle": "x"}}, ["protocol: unknown train-config key(s) ['modle']", "valid keys", "model"]),
    ({"protocol": {"seed": 3}}, ["unknown train-config key(s) ['seed']"]),
    ({"points": []}, ["points must be a non-empty list"]),
    ({"points": [{"name": "a", "config": {"recipe": "swat-u", "recipe_overrides": {"sparsity": 1.5}}}]},
     ["point a:", "sparsity"]),
    ({"points": [{"name": "a", "config": {"recipe": "no-such-recipe"}}]}, ["point a:", "no-such-recipe"]),
    ({"points": [{"name": "a", "config": {}}, {"name": "a", "config": {}}]}, ["name 'a' is used twice"]),
    ({"points": [{"name": "a", "config": {}, "seeds": [0, 0]}]}, ["repeated seed"]),
    ({"points": [{"name": "a", "config": {}, "seeds": "two"}]}, ["seeds must be a count"]),
    ({"points": [{"name": "a", "width_mult_match": "b", "config": {}}]}, ["width_mult_match 'b' must name an earlier"]),
    ({"points": [{"name": "a b", "config": {}}]}, ["name must be a non-empty string"]),
    ({"points": [{"name": "a", "paper_gap": -1.35, "config": {}}]}, ["point a:", "paper_gap must map the paper's row"]),
    ({"points": [{"name": "a", "compare_with": "b", "config": {}}]}, ["compare_with 'b' must name an earlier point"]),
    ({"points": [{"name": "a", "colour": 1}]}, ["unknown key(s) ['colour']", "valid point keys"]),
    ({"points": [{"name": "a", "measure": True}]}, ["needs an analyses.measure section"]),
    ({"quick": {"epochs": 0}}, ["(quick)", "epochs must be an integer >= 1"]),
])
def test_experiment_validation_names_file_and_key(changes, fragments):
    with pytest.raises(ExperimentError) as e:
        parse_experiment(_minimal(**changes), source="exp.yaml")
    msg = str(e.value)
    assert msg.startswith("exp.yaml: ")
    for f in fragments:
        assert f in msg


def test_experiment_file_errors_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npaper: swat\npoints: [\n")
    assert main(["reproduce", str(bad), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml: malformed YAML (line" in err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(_minimal(version=7)))
    assert main(["reproduce", str(wrong), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "version 7 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # validated before anything is written


def test_matched_width_mult_matches_the_parameter_count():
    from sparsetrain.papers import _build_model, _dense_params

    target = _dense_params("lenet5", "mnist", 0.5, {})
    w, params = matched_width_mult("lenet5", "mnist", target, width_steps=19)  # candidates 0.05, 0.10, ..., 1.0
    assert params == target
    net, _ = _build_model("lenet5", "mnist", w)
    assert net.conv1.out_channels == _build_model("lenet5", "mnist", 0.5)[0].conv1.out_channels


def test_published_numbers_keep_their_printed_digits():
    # Quoted in the YAML so 90.50 stays 90.50 and 0.10 stays 0.10, as the papers print them.
    for name in PAPERS:
        for table in load_experiment(name).published["tables"]:
            for row in table["rows"]:
                assert all(isinstance(c, str) for c in row), (name, row)
    row = load_experiment("grad-prune").published["tables"][0]["rows"][0]
    assert row[:3] == ["AlexNet", "90.50", "0.09"]
    assert re.fullmatch(r"\d+\.\d\d", row[1])
