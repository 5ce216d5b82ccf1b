"""The ``>>>`` examples of the probe, CCS, patchscope and hidden-state analyses run (on a tiny model)."""
from __future__ import annotations

import doctest

import pytest

import explorer.analyses.ccs as ccs
import explorer.analyses.hidden as hidden
import explorer.analyses.patchscope as patchscope
import explorer.analyses.probes as probes


@pytest.mark.parametrize("fn", [hidden.collect_hidden, probes.run_probes, ccs.run_ccs, patchscope.patchscope],
                         ids=lambda f: f.__name__)
def test_docstring_example_runs(fn, tiny_sessions):
    finder = doctest.DocTestFinder(recurse=False)
    module = vars(__import__(fn.__module__, fromlist=["x"]))
    (test,) = finder.find(fn, globs={"session": tiny_sessions["llama"], **module})
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=lambda s: None)
    assert result.failed == 0, f"{fn.__name__}: {result.failed} of {result.attempted} examples failed"
