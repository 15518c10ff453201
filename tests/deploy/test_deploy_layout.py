"""deploy/ imports its own modules one way only: each of them imports alone in a fresh interpreter
(deploy/genai.py used to import deploy/run.py, which imported it back from inside a function), and
none hides an import of ours inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import modelkiln.deploy

DEPLOY = Path(modelkiln.deploy.__file__).parent
MODULES = sorted(f"modelkiln.deploy.{p.stem}" for p in DEPLOY.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_each_deploy_module_imports_alone(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _own_imports(path: Path) -> tuple[set[str], list[str]]:
    """(deploy modules imported at module level, our imports found inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modelkiln.deploy."):
            top.add(node.module.rsplit(".", 1)[1])
    nested = [
        f"{path.name}:{node.lineno}"
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelkiln")
    ]
    return top, nested


def test_deploy_has_no_import_circle_and_no_lazy_imports_of_ours() -> None:
    graph, lazy = {}, []
    for path in DEPLOY.glob("*.py"):
        if path.stem == "__init__":
            continue
        graph[path.stem], nested = _own_imports(path)
        lazy += nested
    assert lazy == []
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, "import circle: " + " -> ".join([*stack, module])
        if module in done:
            return
        for imported in graph.get(module, ()):
            visit(imported, (*stack, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "genai" in graph["run"] and "run" not in graph["genai"]  # run dispatches to genai, not back
