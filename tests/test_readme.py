"""The README's Python example runs as written, and the commands it names exist."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)  # the example saves a checkpoint
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "m.pt").exists()
    assert namespace["handle"].layers


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0" -e ".[dev]"' in text and 'pip install "torch==2.13.0" -e ".[dev]"' in ci
    assert "sparsetrain train" in ci and "python -m pytest -q" in text and "python -m pytest -q" in ci
