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


def test_make_test_runs_every_test_folder():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    named = set(re.findall(r"\btests/[\w/]+", recipe))
    assert _test_folders() <= named, f"make test misses {sorted(_test_folders() - named)}"
