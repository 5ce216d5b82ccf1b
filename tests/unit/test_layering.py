"""The package layering, read from the source (ast, nothing imported): the engine never imports
the UI or the command line, and no private name crosses a module boundary in explorer/ or cli/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("explorer", "cli")
UI_OR_CLI = ("panel", "bokeh", "cli", "widgets")
# ``python -m explorer`` runs the command line: the entry point, which no engine module imports.
ENTRY = "explorer.__main__"


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute module an ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def problems(path: Path) -> list[str]:
    """Private names imported (or reached as ``module._name``) from another of our modules, and
    UI/CLI imports from the engine."""
    here = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> one of our modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
            for a in node.names:
                if _ours(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, here, path.name == "__init__.py")
            targets = [module]
            if _ours(module) and module != here:
                for a in node.names:
                    if _private(a.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {a.name} from {module}")
                    else:
                        aliases[a.asname or a.name] = f"{module}.{a.name}"
        else:
            continue
        if here.split(".")[0] == "explorer" and here != ENTRY:
            for target in targets:
                if target.split(".")[0] in UI_OR_CLI:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: the engine imports {target}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and target != here:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: reaches {node.value.id}.{node.attr}")
    return found


def test_the_checker_sees_what_it_must(tmp_path, monkeypatch):
    """The rules on a small fake tree: each kind of violation is found, and allowed forms are not."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    core = tmp_path / "explorer" / "core"
    core.mkdir(parents=True)
    for init in (tmp_path / "explorer" / "__init__.py", core / "__init__.py"):
        init.write_text("")
    (core / "a.py").write_text("def _helper(): pass\nx = _helper()\n")
    (core / "b.py").write_text("from explorer.core.a import _helper\nfrom .a import _helper as h\n"
                               "import explorer.core.a as a\ny = a._helper\nimport panel\n"
                               "from cli.main import main\ndef f():\n    import bokeh.plotting\n")
    (core / "c.py").write_text("from explorer.core.a import x\nimport numpy as np\nz = np._NoValue\n"
                               "from typing import TYPE_CHECKING\n")
    found = problems(core / "b.py")
    assert len(found) == 6, found
    assert problems(core / "c.py") == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_modules_and_no_ui_in_the_engine(path):
    assert problems(path) == []
