"""The test suite's own layout: what `make test` runs is every test there is, and pytest can
collect every file (test modules share one namespace: two files of one name in two folders fail
collection, as CI once did)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _test_folders() -> set[str]:
    return {p.parent.relative_to(ROOT).as_posix() for p in TESTS.rglob("test_*.py")}


def test_test_file_names_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def _recipe_folders(makefile: str, target: str) -> set[str]:
    recipe = re.search(rf"^{target}:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    return set(re.findall(r"\btests/[\w/]+", recipe))


# Folders with a target of their own: tests/remote brings a real NDIF server up (make test-remote);
# tests/saelens needs SAELens in its own environment (make test-saelens). CI runs both (.ci/run).
OWN_TARGET = {"tests/remote": "test-remote", "tests/saelens": "test-saelens"}


def test_make_test_runs_every_test_folder():
    makefile = (ROOT / "Makefile").read_text()
    named = _recipe_folders(makefile, "test")
    folders = _test_folders() - set(OWN_TARGET)
    assert folders <= named, f"make test misses {sorted(folders - named)}"
    for folder, target in OWN_TARGET.items():
        assert folder not in named, f"make test runs {folder}: it belongs to make {target}"
        assert folder in _recipe_folders(makefile, target), f"make {target} does not run {folder}"


def test_ci_runs_make_test_and_every_own_target():
    ci = (ROOT / ".ci" / "run").read_text()
    for target in ("test", *OWN_TARGET.values()):
        assert re.search(rf"^make {target}$", ci, re.M), f".ci/run does not run make {target}"
