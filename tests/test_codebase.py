"""Rules of the codebase that a reviewer would otherwise check by hand (docs/architecture.md)."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "fracfeat"
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.glob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _code_lines(node, lines: list[str]) -> int:
    """Lines of code of a function: its body without the docstring, blank lines and comment lines."""
    body = node.body
    first = body[0]
    start = first.lineno
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        start = first.end_lineno + 1
    return sum(1 for line in lines[start - 1:node.end_lineno] if line.strip() and not line.strip().startswith("#"))


def test_no_function_is_longer_than_80_lines_of_code():
    long = []
    for path, tree in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}() has {n} lines of code")
    assert not long, "split these into named steps: " + "; ".join(long)


def test_no_module_imports_another_modules_private_names():
    private = [f"{path.name}:{node.lineno} imports {alias.name} from .{node.module}"
               for path, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.level == 1
               for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, "make these package-public in the module that owns them: " + "; ".join(private)
