"""The README's Python example runs as written, and the commands it names exist."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def test_readme_python_example_runs(tmp_path, monkeypatch):
    (code,) = [b for b in _python_blocks() if "lightning" not in b]
    monkeypatch.chdir(tmp_path)  # the example saves a checkpoint
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "m.pt").exists()
    assert namespace["handle"].layers


def test_readme_lightning_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch", reason="lightning not installed (pip install 'sparsetrain[lightning]')")
    (code,) = [b for b in _python_blocks() if "lightning" in b]
    monkeypatch.chdir(tmp_path)  # it writes lit/ (logs and checkpoints)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    sparsity = namespace["sparsity"]
    assert sparsity.handle.step_count == 64  # resumed from the epoch-1 checkpoint: 2 x 32 steps, as printed
    assert abs(sparsity.last_densities["density/weight"] - 0.102) < 0.001  # the figure the comment states
    assert (tmp_path / "lit" / "ckpt" / "last.ckpt").is_file()


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0" -e ".[dev]"' in text and 'pip install "torch==2.13.0" -e ".[dev]"' in ci
    assert "sparsetrain train" in ci and "python -m pytest -q" in text and "python -m pytest -q" in ci
