"""The packages sit on floors and import only from lower ones (or their own): core (1),
evals and results (2), methods (3), harness (4). Read from the source, every import
statement counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"core": 1, "evals": 2, "results": 2, "methods": 3, "harness": 4}
# Packages on one floor that must not know each other (scoring knows no method).
APART = {("evals", "methods"), ("methods", "evals"), ("methods", "harness")}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, top in _imports(path):
            if top not in FLOORS or top == package:
                continue
            if FLOORS[top] >= FLOORS[package] or (package, top) in APART:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_package_imports_one_above_it(package):
    assert _violations(package) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("def f():\n    from harness.zoo import resolve_uri\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _violations("core") == ["core/x.py:2 imports harness"]
