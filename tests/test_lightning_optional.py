"""Lightning is optional: without it the integration fails on import with the install command (this test runs
whether or not lightning is installed; tests/test_lightning.py skips when it is not)."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_import_without_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "sparsetrain.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'sparsetrain\[lightning\]'"):
        importlib.import_module("sparsetrain.integrations.lightning")
    import sparsetrain

    assert sparsetrain.create_model  # the rest of the package does not need lightning
