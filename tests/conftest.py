"""Shared test fixtures: the real-data folder.

Real datasets (mnist, fashion_mnist, cifar10) live in one shared folder: ``$SPARSETRAIN_DATA`` (the first of several
roots joined with ``os.pathsep`` that exists), else ``<repo>/../shared/data``. Outside CI a missing folder or dataset
skips the test that needs it, so a fresh checkout still runs the rest. When the environment variable ``CI`` is set
(``CI=true``) a missing folder or dataset FAILS the test instead: real-data tests must not vanish silently in CI.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# pytester runs the fixtures' own skip/fail rule in an inner session (tests/test_data.py).
pytest_plugins = ["pytester"]

DATA_ENV_VAR = "SPARSETRAIN_DATA"
DATASETS = ("mnist", "fashion_mnist", "cifar10")
_REPO = Path(__file__).resolve().parents[1]
_DEFAULT_ROOT = _REPO.parent / "shared" / "data"


def in_ci() -> bool:
    """True when the environment variable ``CI`` is set to anything but an explicit no ("", 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(message: str) -> None:
    """Skip the test, or fail it in CI, where real-data tests must run."""
    if in_ci():
        pytest.fail(f"{message} (CI is set, so real-data tests may not skip)", pytrace=False)
    pytest.skip(message)


def resolve_data_root() -> Path:
    """The shared data folder this run would use (it may not exist)."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
        # Several roots may be given, as the library accepts; the first that exists is the one the tests read.
        return next((r for r in roots if r.is_dir()), roots[0]) if roots else _DEFAULT_ROOT
    return _DEFAULT_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Path of the shared data folder; skips when absent (fails when ``CI`` is set)."""
    root = resolve_data_root()
    if not root.is_dir():
        _missing(f"shared data folder {root} not found (set {DATA_ENV_VAR} or put the data at {_DEFAULT_ROOT})")
    return root


@pytest.fixture(scope="session")
def require_dataset(data_root: Path) -> Callable[[str], Path]:
    """A function ``require_dataset(name) -> Path`` of one dataset's folder under :func:`data_root`.

    The folder must hold at least one ``.npz`` file (the shared data's format); otherwise the calling test skips
    (fails when ``CI`` is set), with a message naming the folder.
    """

    def require(name: str) -> Path:
        if name not in DATASETS:
            raise ValueError(f"unknown shared dataset {name!r}; valid choices: {', '.join(DATASETS)}")
        folder = data_root / name
        if not folder.is_dir() or not any(folder.glob("*.npz")):
            _missing(f"shared dataset {name!r} not found: no .npz files in {folder}")
        return folder

    return require


def pytest_sessionstart(session: pytest.Session) -> None:
    # Build (or load) the native CPU kernels once, before any test: a fresh machine compiles them here (under a
    # minute) instead of inside the first test that trains, whose subprocess deadlines do not allow for it.
    from sparsetrain._native import build_native

    build_native()
