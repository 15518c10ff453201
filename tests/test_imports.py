"""The shape of the house: imports run down the pipeline, no module circles, our own modules are
imported at the top of a file (ruff's PLC0415, with the heavy optional libraries of TID253 as the
only allowed lazy imports: pyproject.toml [tool.ruff.lint]).

Which wrong code each test catches: a stage importing a later one (graph importing accuracy), two
modules importing each other (deploy/run <-> deploy/genai), a `from modelkiln...` hidden in a
function to dodge a circle, or `import torch` at the top of a module `import modelkiln` reaches.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "modelkiln"

#: Rooms in pipeline order: a module may import its own room and rooms of a lower or equal rank.
#: Equal ranks are siblings that must not import each other.
RANKS: dict[str, float] = {
    "errors": 0,
    "numerics": 0.2,
    "_deps": 0.1,
    "log": 0,
    "onnx_io": 0.5,
    "ir_utils": 0.5,
    "quantmath": 0.5,  # QuantizeLinear/DequantizeLinear arithmetic in numpy: quant and the runtime's lookups  # small helpers over onnx-ir (constants, initializers): graph passes, quant, runtime kernels
    "data": 2.5,  # sample files to feeds: reads them with the zoo's preprocessing
    "runtime": 1,
    "zoo": 2,
    "export": 3,
    "graph": 4,
    "quant": 5,
    "predict": 5.5,
    "accuracy": 6,
    "finetune": 6.5,  # CLIP training: zoo towers, caption data, the retrieval metric for validation
    "bench": 7,
    "genai": 8,
    "serve": 9,
    "delivery": 1.5,  # manifest, golden outputs, signing, encryption: runtime only, so every stage can open sealed models
    "deploy": 10,
    "cli": 11,
    "__main__": 12,
    "__init__": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> list[tuple[str, int]]:
    """(imported modelkiln module, line) for imports at module level (under `if TYPE_CHECKING` excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modelkiln"):
            found.append((node.module, node.lineno))
            # `from modelkiln.zoo import base` imports the submodule modelkiln.zoo.base
            found.extend((f"{node.module}.{a.name}", node.lineno) for a in node.names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names if a.name.startswith("modelkiln"))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_down_the_pipeline() -> None:
    backwards = []
    for module, path in _modules().items():
        room = _room(module)
        for imported, line in _top_level_imports(path):
            target = _room(imported)
            if target == room or target not in RANKS:
                continue
            if RANKS[target] >= RANKS[room]:
                backwards.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {imported} ({target})")
    assert backwards == [], "imports that run up the pipeline or between siblings:\n" + "\n".join(backwards)


def test_no_module_import_circles() -> None:
    modules = _modules()
    graph = {
        m: sorted({i for i, _ in _top_level_imports(p) if i in modules and i != m})
        for m, p in modules.items()
    }
    # a package's __init__ re-exporting its submodules is not a circle with them
    graph = {m: [i for i in found if not m.startswith(i + ".")] for m, found in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                circles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert circles == [], "import circles:\n" + "\n".join(circles)


@pytest.mark.skipif(
    shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed"
)
def test_lint_rules_hold() -> None:
    """ruff with the project's rules: among them, no lazy import of our own modules (PLC0415) and
    no heavy optional library imported at module level (TID253)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff is not None
    done = subprocess.run(
        [ruff, "check", "--output-format", "concise", "src", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_import_modelkiln_stays_light() -> None:
    """The CLI's start and `import modelkiln` never load torch, ONNX Runtime or TensorRT."""
    code = (
        "import sys, modelkiln, modelkiln.cli.main; "
        "print(','.join(m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
