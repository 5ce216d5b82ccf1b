"""The ``>>>`` examples of the feature-browsing modules run on the embedded default model (one
working directory: the SAE and indexes the first examples build are reopened by the later ones)."""
from __future__ import annotations

import doctest
import importlib

import pytest

pytestmark = pytest.mark.model


def test_feature_browsing_examples_run(default_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("explorer.features.units", "explorer.features.browse", "explorer.neurons.units"):
        result = doctest.testmod(importlib.import_module(name), extraglobs={"session": default_session},
                                 optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted >= 3 and result.failed == 0, name
