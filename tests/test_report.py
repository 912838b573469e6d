"""Tests of ``sparsetrain report`` (sparsetrain.reporting): files, PNG validity, table numbers, HTML structure."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from sparsetrain.reporting import (
    MATPLOTLIB_HINT,
    RunDirectoryError,
    format_mean_sd,
    group_runs,
    mean_sd,
    read_run,
    recipe_label,
    write_report,
)
from sparsetrain.reporting.document import Document, Table, to_html, to_markdown
from sparsetrain.reporting.plots import plot_layer_sparsity
from sparsetrain.reporting.tables import format_value

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc")
DEFAULT_ACCS = (0.412, 0.655, 0.801, 0.9123)


# ------------------------------------------------------------------------------------------------------- fixtures


def grad_weight_sparsity(layer_index: int, step: int) -> float:
    """Synthetic gradient sparsity: grows over training, more in deeper layers (as in TensorQuant's figures)."""
    return min(0.95, 0.1 + 0.1 * layer_index + 0.002 * step)


def make_run(
    root: Path,
    name: str,
    *,
    model: str = "resnet20",
    dataset: str = "cifar10",
    recipe: str | dict = "swat-u",
    density: float | None = 0.1,
    seed: int = 0,
    accs: tuple[float, ...] = DEFAULT_ACCS,
    layers: tuple[str, ...] = LAYERS,
    steps_per_epoch: int = 20,
    telemetry: bool = True,
    flops: bool = True,
    summary: bool = True,
    train_flops_pct: float = 89.5,
    lr: float = 0.1,
    extra_config: dict | None = None,
) -> Path:
    """Write a small but realistic run directory (the files `sparsetrain train` writes) and return its path."""
    run = root / name
    run.mkdir(parents=True)
    d = 1.0 if density is None else density
    config = {
        "model": model,
        "dataset": dataset,
        "data_dir": None,
        "recipe": recipe,
        "recipe_overrides": {} if density is None else {"density": density},
        "epochs": len(accs),
        "batch_size": 128,
        "lr": lr,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "seed": seed,
        "out": str(run),
        **(extra_config or {}),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    with (run / "metrics.jsonl").open("w") as f:
        for e, acc in enumerate(accs, 1):
            densities = {
                layer: {
                    "weight": 1.0 if i == 0 else d,
                    "input": 1.0 if i == 0 else d,
                    "output": 1.0,
                    "grad_output": 1.0,
                    "grad_input": 1.0,
                    "grad_weight": 1.0,
                    "weight_for_grad_input": 1.0 if i == 0 else d,
                    "input_for_grad_weight": 1.0 if i == 0 else d,
                }
                for i, layer in enumerate(layers)
            }
            rec = {
                "epoch": e,
                "step": e * steps_per_epoch,
                "lr": lr * (0.1 if e > 2 else 1.0),
                "train_loss": 2.3 / (e + 0.5),
                "train_acc": min(1.0, acc + 0.03),
                "test_loss": 2.3 / (e + 0.3),
                "test_acc": acc,
                "time_s": 12.5 + e,
                "samples_per_s": 4000.0,
                "densities": densities,
                "weight_density": min(1.0, d + 0.004),
                "activation_density": min(1.0, d + 0.02),
            }
            f.write(json.dumps(rec) + "\n")

    if telemetry:
        with (run / "telemetry.jsonl").open("w") as f:
            for step in range(0, len(accs) * steps_per_epoch + 1, 10):
                for i, layer in enumerate(layers):
                    numel = 4608 * (i + 1)
                    for tensor, sp in (
                        ("weight", 0.0 if i == 0 else 1 - d),
                        ("input", 0.5),
                        ("grad_output", min(0.9, 0.3 + 0.05 * i)),
                        ("grad_weight", grad_weight_sparsity(i, step)),
                    ):
                        zeros = round(sp * numel)
                        f.write(
                            json.dumps(
                                {
                                    "step": step,
                                    "epoch": step // steps_per_epoch,
                                    "name": layer,
                                    "kind": "layer",
                                    "tensor": tensor,
                                    "numel": numel,
                                    "zeros": zeros,
                                    "sparsity": zeros / numel,
                                    "near_zero_sparsity": None,
                                    "threshold": None,
                                }
                            )
                            + "\n"
                        )
                # Block records must be ignored by the per-layer plots.
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "epoch": None,
                            "name": "layer1",
                            "kind": "block",
                            "tensor": "grad_weight",
                            "numel": 1,
                            "zeros": 1,
                            "sparsity": 1.0,
                            "near_zero_sparsity": None,
                            "threshold": None,
                        }
                    )
                    + "\n"
                )

    flops_summary = {
        "training_flops_reduction_pct": train_flops_pct,
        "inference_flops_reduction_pct": 0.0 if density is None else 89.7,
        "act_memory_reduction_pct": 0.0 if density is None else 36.2,
        "model_compression_x": 1.0 if density is None else 9.6,
    }
    if flops:
        rows = []
        for i, layer in enumerate(layers):
            macs = 1769472 * (i + 1)
            rows.append(
                {
                    "name": layer,
                    "dense_forward_macs": macs,
                    "sparse_forward_macs": macs if i == 0 else int(macs * d),
                    "weight_density": 1.0 if i == 0 else d,
                    "activation_elements": 16384 * (i + 1),
                }
            )
        (run / "flops.json").write_text(
            json.dumps(
                {
                    "layers": rows,
                    **flops_summary,
                    "dense_training_macs": 3 * sum(r["dense_forward_macs"] for r in rows),
                    "convention": "MACs; training = forward + grad_input + grad_weight GEMMs (dense 3F)",
                },
                indent=1,
            )
        )
    if summary:
        (run / "summary.json").write_text(
            json.dumps(
                {
                    "model": model,
                    "dataset": dataset,
                    "recipe": recipe,
                    "density": density,
                    "seed": seed,
                    "final_test_acc": accs[-1],
                    "best_test_acc": max(accs),
                    "epochs": len(accs),
                    "flops": flops_summary,
                },
                indent=1,
            )
        )
    return run


def assert_valid_png(path: Path, min_width: int = 300, min_height: int = 200) -> None:
    """PNG signature, decodable, big enough, and not a single colour."""
    import numpy as np
    from matplotlib.image import imread

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} lacks the PNG signature"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_height and img.shape[1] >= min_width, img.shape
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.02, f"{path} is (nearly) a single colour"
    colours = np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, f"{path} has only {len(colours)} colours"


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictHTML(HTMLParser):
    """Checks nesting of every non-void element; collects <img> sources and table cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.cells: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_html(path: Path) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed: {parser.stack}"
    return parser


def markdown_cells(md: str) -> list[str]:
    """Cells of every Markdown table row (header and body), with code spans and pipe escapes undone."""
    cells = []
    for line in md.splitlines():
        if not line.startswith("| "):
            continue
        for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1]):
            cells.append(cell.strip().replace("\\|", "|").replace("`", ""))
    return cells


def md_table_rows(md: str) -> list[list[str]]:
    return [
        [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in md.splitlines() if ln.startswith("| ")
    ]


def check_images(result_dir: Path, parser: StrictHTML) -> None:
    assert parser.imgs, "no <img> in the HTML"
    for img in parser.imgs:
        src = img["src"]
        if src.startswith("data:image/png;base64,"):
            assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
        else:
            assert (result_dir / src).is_file(), src
        assert img.get("alt")


# ---------------------------------------------------------------------------------------------------- single run


def test_single_run_report(tmp_path):
    run = make_run(tmp_path, "resnet20-swat-u")
    result = write_report([run])

    out = run / "report"
    assert result.out_dir == out
    assert result.markdown == out / "report.md" and result.markdown.is_file()
    assert result.html == out / "report.html" and result.html.is_file()
    assert sorted(p.name for p in result.images) == ["curves.png", "grad_sparsity.png", "layer_density.png"]
    for png in result.images:
        assert_valid_png(png)

    md = result.markdown.read_text()
    assert md.startswith("# Training report: resnet20-swat-u\n")
    for section in (
        "## Summary",
        "## Configuration",
        "## Training curves",
        "## Per-layer densities",
        "## Sparsity telemetry",
        "## FLOPs and memory",
    ):
        assert section in md
    for png in ("curves.png", "grad_sparsity.png", "layer_density.png"):
        assert f"]({png})" in md
    rows = md_table_rows(md)
    # Summary: final accuracy as percent; FLOP figures from summary.json.
    assert ["`final_test_acc`", "91.23 %"] in rows
    assert ["`best_test_acc`", "91.23 %"] in rows
    assert ["`flops.training_flops_reduction_pct`", "89.50"] in rows
    assert ["`weight_density (last epoch)`", "10.40 %"] in rows
    # Config: small dicts flattened, scalars as written.
    assert ["`recipe_overrides.density`", "0.1"] in rows
    assert ["`lr`", "0.1"] in rows
    # Epoch table, numbered from 1 as the console: the 4th epoch (record epoch 3) has test acc 80.10 %, lr 0.1 * 0.1
    # (records without `lr_end` predate the epoch-mean lr: the column says "end of epoch").
    assert any(r[:2] == ["Epoch", "LR (end of epoch)"] for r in rows)
    epoch3 = next(r for r in rows if r[0] == "4")
    assert epoch3[1] == "0.01" and epoch3[5] == "80.10"
    assert epoch3[3] == "83.10"  # train acc = 0.801 + 0.03
    # Densities: first layer dense, the others at 10 %; headline densities of the last epoch.
    assert ["`conv1`", "100.0", "100.0", "100.0", "100.0"] in rows
    assert ["`layer1.0.conv1`", "10.0", "10.0", "10.0", "10.0"] in rows
    assert "weight density 10.40 %, activation density 12.00 %" in md
    header = next(r for r in rows if r[0] == "Layer" and "weight_for_grad_input (kept %)" in r)
    # Operands that every layer keeps dense are left out of the density table.
    assert header == ["Layer", "weight (kept %)", "input (kept %)", "weight_for_grad_input (kept %)",
                      "input_for_grad_weight (kept %)"]
    # Telemetry: last step 80; grad_weight of layer index 2 = min(.95, .1 + .2 + .16) = 46 %; mean over steps
    # 0, 10, ..., 80 = .3 + .002 * 40 = 38 %.
    tel_row = next(r for r in rows if r[0] == "`layer1.0.conv2`" and len(r) == 7)
    assert tel_row == ["`layer1.0.conv2`", "90.0", "50.0", "40.0", "46.0", "38.0", "40.0"]
    assert "last recorded step (80)" in md
    # FLOPs: convention, totals from top-level scalars, per-layer table from the rows' keys.
    assert "Convention: MACs; training = forward + grad_input + grad_weight GEMMs (dense 3F)" in md
    assert ["`dense_training_macs`", "79,626,240"] in rows  # 3 * 1769472 * (1+2+3+4+5)
    assert ["name", "dense_forward_macs", "sparse_forward_macs", "weight_density", "activation_elements"] in rows
    assert ["`layer1.0.conv1`", "3,538,944", "353,894", "0.1", "32,768"] in rows
    assert "## Notes" not in md  # nothing missing

    parser = parse_html(result.html)
    assert {"html", "head", "body", "table", "figure", "img", "style"} <= parser.tags
    assert "script" not in parser.tags and "link" not in parser.tags
    check_images(out, parser)
    assert len(parser.imgs) == 3
    # Same content: every table cell of the Markdown appears, in order, in the HTML.
    assert parser.cells == markdown_cells(md)
    html_text = result.html.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # no external resources


def test_missing_optional_files_give_notes(tmp_path):
    run = make_run(tmp_path, "bare", telemetry=False, flops=False, summary=False, accs=(0.5, 0.62, 0.7))
    result = write_report([run], out_dir=tmp_path / "out")
    md = result.markdown.read_text()
    assert "No `telemetry.jsonl` in this run" in md
    assert "No `flops.json` in this run" in md
    assert "`summary.json` is missing" in md
    assert sorted(p.name for p in result.images) == ["curves.png", "layer_density.png"]
    # The derived summary takes the last and the best test accuracy from metrics.jsonl.
    rows = md_table_rows(md)
    assert ["`final_test_acc`", "70.00 %"] in rows
    assert ["`density`", "0.1"] in rows
    parse_html(result.html)


def test_truncated_metrics_and_telemetry_fallback(tmp_path):
    run = make_run(tmp_path, "killed")
    # A killed run: the last metrics line is cut, and (older format) there are no per-layer densities.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[:-1]]
    for r in recs:
        del r["densities"]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n" + lines[-1][:40] + "\n")
    result = write_report([run], plots=False)
    md = result.markdown.read_text()
    assert "skipped 1 line(s) that are not JSON objects (line 4)" in md
    assert "telemetry at its last recorded step" in md
    rows = md_table_rows(md)
    assert ["`layer2.0.conv1`", "10.0", "50.0"] in rows  # 1 - weight sparsity 0.9, 1 - input sparsity 0.5
    assert result.images == [] and "<img" not in result.html.read_text()


def test_resumed_run_keeps_the_latest_records(tmp_path):
    run = make_run(tmp_path, "resumed")
    # Resume from the checkpoint of epoch 2 (step 40): epochs 3-4 and steps >= 40 are written again.
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    redo = [dict(m, test_acc=m["test_acc"] + 0.01) for m in metrics[2:]]
    with (run / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(m) + "\n" for m in redo)
    tel = (run / "telemetry.jsonl").read_text().splitlines()
    again = [x for x in tel if json.loads(x)["step"] >= 40]
    (run / "telemetry.jsonl").write_text("\n".join(tel + again) + "\n")
    loaded = read_run(run)
    assert [m["epoch"] for m in loaded.metrics] == [1, 2, 3, 4]
    assert loaded.metrics[-1]["test_acc"] == pytest.approx(0.9223)
    assert any("repeated epoch" in n for n in loaded.notes)
    steps, vals = loaded.telemetry.series["grad_weight"]["conv1"]
    assert steps == list(range(0, 81, 10)) and len(vals) == len(steps)


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirectoryError, match=r"config\.yaml.*metrics\.jsonl"):
        read_run(tmp_path / "empty")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        read_run(tmp_path / "nope")
    make_run(tmp_path / "runs", "a")
    make_run(tmp_path / "runs", "b")
    with pytest.raises(RunDirectoryError, match="contains 2 run directories"):
        read_run(tmp_path / "runs")


def test_cli(tmp_path, capsys):
    from sparsetrain.cli import main

    run = make_run(tmp_path, "r")
    assert main(["report", str(run), "--out", str(tmp_path / "o"), "--title", "My | run", "--no-plots"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "o" / "report.md") in printed and str(tmp_path / "o" / "report.html") in printed
    assert (tmp_path / "o" / "report.md").read_text().startswith("# My | run\n")
    assert "<title>My | run</title>" in (tmp_path / "o" / "report.html").read_text()

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a sparsetrain run directory" in err and "config.yaml" in err and "metrics.jsonl" in err

    # --link-images: the HTML references the PNG files next to it.
    assert main(["report", str(run), "--link-images"]) == 0
    parser = parse_html(run / "report" / "report.html")
    assert {img["src"] for img in parser.imgs} == {"curves.png", "grad_sparsity.png", "layer_density.png"}
    check_images(run / "report", parser)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from sparsetrain.cli import main
    from sparsetrain.reporting import require_matplotlib

    run = make_run(tmp_path, "r")
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=re.escape(MATPLOTLIB_HINT)):
        require_matplotlib()
    assert main(["report", str(run)]) == 1
    assert "pip install 'sparsetrain[report]'" in capsys.readouterr().err
    assert not (run / "report").exists()  # failed before writing anything
    # Tables-only reports need no matplotlib.
    assert main(["report", str(run), "--no-plots"]) == 0
    assert (run / "report" / "report.md").is_file() and not list((run / "report").glob("*.png"))


# ---------------------------------------------------------------------------------------------------- comparison

SWAT_ACCS = (0.9012, 0.9145, 0.9087)
DENSE_ACCS = (0.9300, 0.9320)


def make_comparison(tmp_path: Path) -> list[Path]:
    runs = []
    for seed, acc in enumerate(SWAT_ACCS):
        runs.append(
            make_run(tmp_path, f"swat-u-s{seed}", seed=seed, accs=(0.5, 0.7, 0.85, acc), train_flops_pct=88.0 + seed)
        )
    for seed, acc in enumerate(DENSE_ACCS):
        runs.append(
            make_run(
                tmp_path,
                f"dense-s{seed}",
                recipe="dense",
                density=None,
                seed=seed,
                accs=(0.55, 0.75, 0.88, acc),
                train_flops_pct=0.0,
                telemetry=False,
            )
        )
    runs.append(make_run(tmp_path, "swat-u-d02", density=0.2, seed=0, accs=(0.6, 0.8, 0.9, 0.92)))
    runs.append(
        make_run(
            tmp_path,
            "lenet-meprop",
            model="lenet5",
            dataset="mnist",
            recipe="meprop",
            density=0.05,
            accs=(0.9, 0.95, 0.97, 0.9876),
            flops=False,
            lr=0.05,
        )
    )
    return runs


def test_mean_sd_by_hand():
    mean, sd = mean_sd(SWAT_ACCS)
    # mean = 2.7244 / 3 = 0.9081333; deviations -0.0069333, 0.0063667, 0.0005667;
    # sample variance = (4.80711e-5 + 4.05351e-5 + 3.211e-7) / 2 = 4.44637e-5; sd = 0.0066681.
    assert mean == pytest.approx(0.9081333, abs=1e-7)
    assert sd == pytest.approx(0.0066681, abs=1e-7)
    assert format_mean_sd(mean, sd, scale=100) == "90.81 ± 0.67"
    assert mean_sd([0.92]) == (0.92, None)
    assert format_mean_sd(0.92, None, scale=100) == "92.00"
    with pytest.raises(ValueError):
        mean_sd([])


def test_comparison_report(tmp_path):
    runs = make_comparison(tmp_path)
    result = write_report(runs, out_dir=tmp_path / "cmp", title="SWAT-U vs dense")
    assert [p.name for p in result.images] == ["test_accuracy.png"]
    assert_valid_png(result.images[0])

    md = result.markdown.read_text()
    assert md.startswith("# SWAT-U vs dense\n")
    assert "### resnet20 on cifar10" in md and "### lenet5 on mnist" in md
    rows = md_table_rows(md)
    header = next(r for r in rows if r[0] == "Method" and "BA / AC (%)" in r)
    assert header == [
        "Method",
        "Density",
        "W dens. (kept %)",
        "Act dens. (kept %)",
        "Top-1 ± SD (%)",
        "n",
        "BA / AC (%)",
        "Train FLOPs ↓ (%)",
        "Inf. FLOPs ↓ (%)",
        "Act ↓ (%)",
        "MC (×)",
        "Seeds",
    ]
    # Dense baseline first: mean 93.10, sample SD sqrt(2 * 0.001^2 / 1) = 0.001414 -> 0.14.
    dense = next(r for r in rows if r[0] == "dense")
    assert dense == [
        "dense",
        "—",
        "100.0",
        "100.0",
        "93.10 ± 0.14",
        "2",
        "93.10 / +0.00",
        "0.0",
        "0.0",
        "0.0",
        "1.0",
        "0, 1",
    ]
    # SWAT-U d=0.1 over 3 seeds: 90.81 ± 0.67 (see test_mean_sd_by_hand); AC = 90.8133 - 93.10 = -2.29;
    # training FLOPs reduction mean of 88, 89, 90; measured densities 0.104 and 0.12.
    swat = next(r for r in rows if r[0] == "swat-u" and r[1] == "0.1")
    assert swat == [
        "swat-u",
        "0.1",
        "10.4",
        "12.0",
        "90.81 ± 0.67",
        "3",
        "93.10 / -2.29",
        "89.0",
        "89.7",
        "36.2",
        "9.6",
        "0, 1, 2",
    ]
    # A single run shows no ±.
    single = next(r for r in rows if r[0] == "swat-u" and r[1] == "0.2")
    assert single[4:6] == ["92.00", "1"]
    # Baseline first, then methods in order of appearance, higher density first (as the papers' tables).
    assert rows.index(dense) < rows.index(single) < rows.index(swat)
    # Another model/dataset: its own table, no baseline column, FLOPs from summary.json.
    meprop = next(r for r in rows if r[0] == "meprop")
    assert meprop[:6] == ["meprop", "0.05", "5.4", "7.0", "98.76", "1"] and len(meprop) == 11
    # Per-run table and notes: lenet5 run used another lr than... nobody (single run), so no config note;
    # its missing flops.json is noted only if summary.json lacks the figures (it has them).
    assert sum(1 for r in rows if r[0].startswith("`") and r[0].endswith("`") and "/" in r[0]) == len(runs)
    assert "differ in config" not in md

    parser = parse_html(result.html)
    check_images(result.out_dir, parser)
    assert parser.cells == markdown_cells(md)


def test_runs_differing_beyond_the_seed_are_separate_labelled_rows(tmp_path):
    """Issue 20, item 2: SGD, AdamW and bf16 at the same seed were pooled into one row as if they were seeds."""
    sgd = make_run(tmp_path, "sgd", seed=0, accs=(0.5, 0.396), extra_config={"optimizer": "sgd", "amp": "none"})
    adamw = make_run(tmp_path, "adamw", seed=0, accs=(0.5, 0.196), extra_config={"optimizer": "adamw", "amp": "none"})
    bf16 = make_run(tmp_path, "bf16", seed=0, accs=(0.5, 0.296), extra_config={"optimizer": "sgd", "amp": "bf16"})
    sgd1 = make_run(tmp_path, "sgd-s1", seed=1, accs=(0.5, 0.398), extra_config={"optimizer": "sgd", "amp": "none"},
                    lr=0.1)
    moved = make_run(tmp_path, "elsewhere", seed=2, accs=(0.5, 0.394), extra_config={
        "optimizer": "sgd", "amp": "none", "data_dir": "/elsewhere", "log_every": 7, "quiet": True})
    result = write_report([sgd, adamw, bf16, sgd1, moved, sgd], out_dir=tmp_path / "o", plots=False)
    md = result.markdown.read_text()
    # The rule, once, at the top.
    assert md.count("Runs are grouped by their whole config except the seed") == 1
    assert md.index("Runs are grouped by") < md.index("## Results")
    assert "**4 runs in 3 groups.**" not in md and "**5 runs in 3 groups.**" in md
    rows = md_table_rows(md)
    header = next(r for r in rows if r[0] == "Method" and "Seeds" in r)
    assert header[:3] == ["Method", "Density", "Config"]
    table = {r[2]: r for r in rows if r[0] == "swat-u" and len(r) == len(header)}
    # Where, and how verbosely, a run was written does not split a group; the optimizer and amp do.
    assert table["amp=none, optimizer=sgd"][header.index("Seeds")] == "0, 1, 2"
    assert table["amp=none, optimizer=sgd"][header.index("Top-1 ± SD (%)")] == "39.60 ± 0.20"
    assert table["amp=none, optimizer=adamw"][header.index("Top-1 ± SD (%)")] == "19.60"
    assert table["amp=bf16, optimizer=sgd"][header.index("n")] == "1"
    assert "aggregated anyway" not in md
    # The per-run table carries the same labels.
    assert any(r[0].endswith("adamw`") and r[3] == "swat-u · amp=none, optimizer=adamw" for r in rows)


def test_config_column_only_when_method_and_density_do_not_tell_rows_apart(tmp_path):
    a = make_run(tmp_path, "a", seed=0, density=0.1)
    b = make_run(tmp_path, "b", seed=0, density=0.2)
    c = make_run(tmp_path, "c", seed=1, density=0.1, lr=0.05)
    rows = group_runs([read_run(p) for p in (a, b, c)])
    assert [(r.density, r.differs) for r in rows] == [(0.2, {"lr": 0.1}), (0.1, {"lr": 0.1}), (0.1, {"lr": 0.05})]
    rows = group_runs([read_run(p) for p in (a, b)])
    assert [r.differs for r in rows] == [{}, {}]  # the Density column tells them apart
    md = write_report([a, b], out_dir=tmp_path / "o", plots=False).markdown.read_text()
    assert "Config" not in next(r for r in md_table_rows(md) if r[0] == "Method")


def test_repeated_seed_is_noted_as_a_repeat(tmp_path):
    a = make_run(tmp_path, "a", seed=0)
    b = make_run(tmp_path, "b", seed=0, accs=(0.41, 0.65, 0.8, 0.9))
    md = write_report([a, b], out_dir=tmp_path / "o", plots=False).markdown.read_text()
    assert "2 runs share seed(s) 0 with the same config: repeats of one run" in md


def test_group_runs_keys(tmp_path):
    runs = [read_run(p) for p in make_comparison(tmp_path)]
    groups = group_runs(runs)
    assert [(g.model, g.method, g.density, g.n) for g in groups] == [
        ("resnet20", "dense", None, 2),
        ("resnet20", "swat-u", 0.2, 1),
        ("resnet20", "swat-u", 0.1, 3),
        ("lenet5", "meprop", 0.05, 1),
    ]
    assert groups[2].seeds == [0, 1, 2]
    assert groups[2].acc_change == pytest.approx(0.9081333 - 0.931, abs=1e-7)


# --------------------------------------------------------------------------------------------------- small units


def test_recipe_label_and_format_value():
    assert recipe_label("swat-erk") == "swat-erk"
    assert re.fullmatch(r"swat-u \(custom [0-9a-f]{6}\)", recipe_label({"preset": "swat-u", "density": 0.2}))
    assert recipe_label({"preset": "swat-u", "density": 0.2}) != recipe_label({"preset": "swat-u", "density": 0.3})
    label = recipe_label({"layers": {"conv1": {"weight": {"type": "threshold", "threshold": 0.01}}}})
    assert re.fullmatch(r"custom-[0-9a-f]{6}", label)
    assert label == recipe_label({"layers": {"conv1": {"weight": {"threshold": 0.01, "type": "threshold"}}}})
    assert [
        format_value(v) for v in (1234567, 89.7312, 0.012345, None, True, 150.0, 12345.0, 0.0, 123.456, 24000.00035)
    ] == [
        "1,234,567",
        "89.73",
        "0.01235",
        "—",
        "yes",
        "150",
        "12,345",
        "0",
        "123.5",
        "24,000",
    ]


def test_markdown_html_escaping():
    doc = Document("T <x>", [Table(["a|b", "c"], [["`x|y`", "<b>"]])])
    md = to_markdown(doc)
    assert "| a\\|b | c |" in md and "`x\\|y`" in md
    html_text = to_html(doc)
    assert "<title>T &lt;x&gt;</title>" in html_text and "<code>x|y</code>" in html_text and "&lt;b&gt;" in html_text
    with pytest.raises(ValueError, match="row 0 has 1 cells, expected 2"):
        Table(["a", "b"], [["x"]])


def test_many_layers_use_colorbar(tmp_path):
    layers = tuple(f"features.{i}" for i in range(16))
    run = read_run(make_run(tmp_path, "deep", layers=layers, accs=(0.3, 0.4)))
    png = plot_layer_sparsity(run.telemetry, ["grad_weight"], tmp_path / "deep.png")
    assert_valid_png(png)
    assert run.telemetry.layers() == list(layers)  # forward order kept for the colour scale
    assert plot_layer_sparsity(run.telemetry, ["grad_input"], tmp_path / "none.png") is None


# ------------------------------------------------------------------------------------------------ headless browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not on PATH")
def test_html_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path, "r")
    result = write_report([run])
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        result.html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    assert_valid_png(shot, min_width=1000, min_height=1500)
    # The page shows the title bar, tables and the embedded figures: plenty of distinct colours, not blank.
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    dark = (img.mean(axis=2) < 0.5).mean()
    assert dark > 0.005 and not math.isclose(dark, 1.0)


# ------------------------------------------------------------------------------------------ real `sparsetrain train`


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Two one-epoch runs (seeds 0 and 1) of the built-in job on a small subset of the bundled Fashion-MNIST."""
    from sparsetrain.cli import main

    root = tmp_path_factory.mktemp("real")
    dirs = []
    for seed in (0, 1):
        out = root / f"lenet5-swat-u-s{seed}"
        argv = [
            "train",
            "--epochs",
            "1",
            "--train-subset",
            "256",
            "--test-subset",
            "128",
            "--batch-size",
            "64",
            "--telemetry-every",
            "1",
            "--seed",
            str(seed),
            "--quiet",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        dirs.append(out)
    return dirs


def test_report_of_a_real_training_run(real_runs, capsys):
    from sparsetrain.cli import main

    run = real_runs[0]
    assert main(["report", str(run)]) == 0
    out = run / "report"
    assert {"report.md", "report.html", "curves.png", "layer_density.png", "grad_sparsity.png"} <= {
        p.name for p in out.iterdir()
    }
    for png in ("curves.png", "layer_density.png", "grad_sparsity.png"):
        assert_valid_png(out / png)

    summary = json.loads((run / "summary.json").read_text())
    flops = json.loads((run / "flops.json").read_text())
    md = (out / "report.md").read_text()
    rows = md_table_rows(md)
    assert ["`final_test_acc`", f"{100 * summary['final_test_acc']:.2f} %"] in rows
    assert ["`model`", "lenet5"] in md_table_rows(md)
    assert "## Notes" not in md  # a complete run: every file present and parseable
    # Every layer of flops.json is a row of the per-layer FLOP table, with its dense forward MACs.
    for layer in flops["layers"]:
        row = next(r for r in rows if r[0] == f"`{layer['name']}`" and len(r) == len(flops["layers"][0]))
        assert format_value(layer["dense_forward_macs"]) in row
    # The telemetry recorded gradient sparsity of every sparsified layer.
    densities = read_run(run).last_metrics["densities"]
    tel = read_run(run).telemetry
    assert set(densities) <= set(tel.series["grad_weight"])
    parser = parse_html(out / "report.html")
    check_images(out, parser)
    assert parser.cells == markdown_cells(md)
    # A short run reads well: epochs numbered as the console, the LR the epoch used, both density measures named.
    header = next(r for r in rows if r and r[0] == "Epoch")
    assert header[1] == "LR (epoch mean)"
    epoch_row = rows[rows.index(header) + 1]
    (m,) = read_run(run).metrics
    assert epoch_row[0] == "1" and epoch_row[1] == f"{m['lr']:.4g}" and m["lr"] > 0
    assert "*Density* is the kept fraction" in md and "non-zero fraction" in md
    assert any(r[0] == "Layer" and r[1].endswith("(kept %)") for r in rows)


def test_training_curve_has_points_inside_a_single_epoch(real_runs):
    from sparsetrain.reporting.plots import _intra_epoch, _series

    metrics = read_run(real_runs[0]).metrics
    xs, ys = _intra_epoch(metrics, "train_loss", 1.0)
    steps = metrics[-1]["step"]  # 256 images / batch 64
    assert steps == 4 and xs == [1.0, 2.0, 3.0, 4.0] and len(ys) == 4  # a line, not a single dot
    assert _series(metrics, "test_acc", 100.0, x="step")[0] == [4.0]  # the test point at the epoch's end
    assert _series(metrics, "test_acc")[0] == [1.0]  # epochs from 1


def test_comparison_of_real_runs(real_runs, tmp_path):
    result = write_report(real_runs, out_dir=tmp_path / "cmp")
    assert_valid_png(result.images[0])
    accs = [json.loads((r / "summary.json").read_text())["final_test_acc"] for r in real_runs]
    mean, sd = mean_sd(accs)
    rows = md_table_rows(result.markdown.read_text())
    swat = next(r for r in rows if r[0] == "swat-u")
    assert swat[1] == "0.1" and swat[4] == format_mean_sd(mean, sd, scale=100) and swat[5] == "2"
    assert swat[-1] == "0, 1"


def test_density_section_names_the_dense_layers_and_the_sparse_only_figure(tmp_path):
    """Issue 20, item 5: 37.5 % activation density at --density 0.1 comes from the dense first layer; say so."""
    run = make_run(tmp_path, "r", layers=("conv1", "conv2", "fc"), density=0.1)
    saved = {"conv1": 784, "conv2": 1176, "fc": 604}  # LeNet-5-like: the dense first layer's input is 30.6 %
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in records:  # as `sparsetrain train` writes them: only the sparse layers have densities
        del rec["densities"]["conv1"]
        rec["activation_density"] = (784 + 0.1 * 1780) / 2564
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flops = json.loads((run / "flops.json").read_text())
    for row in flops["layers"]:
        row["saved_activation_elements"] = saved[row["name"]]
    (run / "flops.json").write_text(json.dumps(flops))
    md = " ".join(write_report([run], plots=False).markdown.read_text().split())
    assert "activation density 37.52 %" in md
    assert ("The dense layers (`conv1`) count as 100 %; they hold 30.6 % of the saved activation elements. Over the "
            "sparse layers alone the activation density is 10.00 %.") in md
    assert "zeros that were already there (ReLU outputs) both count as removed" in md
