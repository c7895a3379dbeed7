"""The package's layout rules (README: Architecture), checked on its source: only the
entrypoint imports the driver, so inference never depends on the training script; no module
over 400 lines; no function over 60 lines or 8 parameters."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "emorec"
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_entrypoint_imports_the_driver():
    importers = [
        p.relative_to(PACKAGE).as_posix() for p in MODULES if "emorec.run" in imported(ast.parse(p.read_text()))
    ]
    assert importers == ["__main__.py"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400, f"{path.name} has {len(source.splitlines())} lines; split it"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            params = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            assert node.end_lineno - node.lineno < 60, f"{path.name}:{node.lineno} {node.name} is over 60 lines"
            assert len(params) <= 8, f"{path.name}:{node.lineno} {node.name} takes {len(params)} parameters"


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    """The checks can fail: a module that imports the driver and a function of 9 parameters."""
    bad = tmp_path / "bad.py"
    bad.write_text("from emorec.run import run\n\n\ndef f(a, b, c, d, e, f, g, h, i):\n    return a\n")
    assert "emorec.run" in imported(ast.parse(bad.read_text()))
    with pytest.raises(AssertionError, match="takes 9 parameters"):
        test_module_and_function_sizes(bad)
