"""The ``>>>`` examples of the core modules (no model needed) run."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("explorer.core.requests", "explorer.core.results", "explorer.core.files", "explorer.core.jobdir",
           "explorer.core.modules", "explorer.core.placement", "explorer.core.model_catalog",
           "explorer.core.remote")


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
