"""A normal (non-editable) install is complete: build the wheel, install it, use it from outside the source tree.

Offline and fast: the wheel is built from a copy of the source (``pip wheel --no-deps --no-build-isolation``, so no
index is needed and the working tree gets no ``build/`` folder), installed with ``pip install --no-deps --target``
into a folder that is put on ``PYTHONPATH`` of ``/work/venv``'s interpreter (torch, numpy, ... come from there). The
commands run from another folder, and the test checks that ``sparsetrain`` is imported from the install, not from
the source tree.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# The default job, bounded: the full bundled subset (10,000 images) takes a minute on 2 busy cores.
BOUNDED = ["--epochs", "1", "--train-subset", "1024", "--test-subset", "512", "--quiet"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, cwd, env)``: the installed package's folder, a working folder outside the tree, the environment."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("sparsetrain-*.whl")
    site = root / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARSETRAIN_DATA")}
    env["PYTHONPATH"] = str(site)
    return site, cwd, env


def _sparsetrain(installed, *args, timeout=300):
    _, cwd, env = installed
    return subprocess.run([sys.executable, "-m", "sparsetrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_install_is_imported_not_the_source_tree(installed):
    site, cwd, env = installed
    proc = subprocess.run([sys.executable, "-c", "import sparsetrain; print(sparsetrain.__file__)"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip()).resolve()
    assert site.resolve() in path.parents and REPO not in path.parents
    # the package data came along: the bundled dataset and the example recipes
    assert (site / "sparsetrain" / "_data" / "fashion_mnist_small.npz").is_file()
    assert (site / "sparsetrain" / "recipes" / "ablation-freeze-topology.yaml").is_file()
    assert (site / "sparsetrain" / "_native" / "sparsetrain_cpu.cpp").is_file()  # the native kernels' source


def test_default_job_named_recipe_report_and_export_from_outside_the_tree(installed):
    _, cwd, _ = installed
    listed = _sparsetrain(installed, "list", "recipes")
    assert listed.returncode == 0 and "ablation-freeze-topology" in listed.stdout, listed.stderr

    default = _sparsetrain(installed, "train", *BOUNDED, "--out", "default")
    assert default.returncode == 0, default.stderr
    assert "lenet5 / fashion_mnist_small" in default.stdout and "swat-u (density 0.1)" in default.stdout

    named = _sparsetrain(installed, "train", *BOUNDED, "--recipe", "ablation-freeze-topology", "--out", "freeze")
    assert named.returncode == 0, named.stderr
    assert (cwd / "freeze" / "summary.json").is_file()

    report = _sparsetrain(installed, "report", "default")
    assert report.returncode == 0, report.stderr
    md = cwd / "default" / "report" / "report.md"
    assert md.is_file() and "## Training curves" in md.read_text()
    assert (cwd / "default" / "report" / "curves.png").is_file()

    export = _sparsetrain(installed, "export", "freeze")
    assert export.returncode == 0, export.stderr
    assert "compressed" in export.stdout
