"""The shape of the code, as issue 11 measures it: no module over 600 lines and no function body
(after its signature and docstring) over 60 lines in ``ddpmcli/``; the core imports only torch and
the standard library; the layers call downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ddpmcli"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_BODY_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]  # the docstring
    if not body:
        return 0
    end = max(getattr(n, "end_lineno", n.lineno) or n.lineno for n in body)
    return end - body[0].lineno + 1


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({_body_lines(node)} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_BODY_LINES
    ]
    assert long == []


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_torch_and_stdlib_only() -> None:
    import sys

    core = [PACKAGE / "core.py"] if (PACKAGE / "core.py").exists() else []
    core += sorted((PACKAGE / "core").glob("*.py"))
    assert core
    for path in core:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in {"torch", "ddpmcli", "__future__"} or top in sys.stdlib_module_names, (
                f"{path.name} imports {name}"
            )
            if top == "ddpmcli":
                allowed = ("ddpmcli.core", "ddpmcli.errors", "ddpmcli.choices")
                assert name.startswith(allowed), f"{path.name}: {name}"
