"""How serve/ is put together: no import circle inside the package, no way into ONNX Runtime but
the runtime backends, config ``backend`` values that are enums with a clear error for a bad one,
and one loader per backend kind and per model kind (tables, not if/elif chains)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import modelkiln.serve
from modelkiln.errors import ConfigError
from modelkiln.runtime.backends.base import BackendKind
from modelkiln.serve.config import (
    BACKEND_VALUES,
    SERVED_BACKENDS,
    ModelConfig,
    ModelKind,
    PipelineConfig,
    dump_config,
    load_config,
    parse_config,
)
from modelkiln.serve.model import BACKEND_LOADERS
from modelkiln.serve.server import ModelServer

SERVE = Path(modelkiln.serve.__file__).parent
PACKAGE = "modelkiln.serve"
SRC = SERVE.parent.parent


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports outside any function or class body (``if TYPE_CHECKING:`` and ``try:`` included:
    those are import-time edges too, as far as a circle is concerned)."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


def _serve_targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The serve modules an import statement names (``from modelkiln.serve import openai`` too)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from . import x / from .x import y
            base = f"{PACKAGE}.{base}" if base else PACKAGE
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    prefix = f"{PACKAGE}."
    return {n[len(prefix) :] for n in names if n.startswith(prefix) and n[len(prefix) :] in modules}


def serve_import_graph() -> dict[str, set[str]]:
    """module -> the serve modules it imports at module level."""
    files = {p.stem: p for p in SERVE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set().union(*(_serve_targets(n, set(files)) for n in _module_level_imports(tree)))
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_a_circle() -> None:
    """The check below can fail: a planted circle is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_serve_has_no_import_circle() -> None:
    graph = serve_import_graph()
    assert {"server", "pipeline", "model", "batcher", "scheduler"} <= set(graph)
    assert graph["server"] >= {"pipeline"}, "the server depends on the pipeline"
    assert "server" not in graph["pipeline"], "the pipeline must not know the server"
    assert find_cycle(graph) is None, f"import circle in serve/: {' -> '.join(find_cycle(graph) or [])}"


def test_no_function_level_imports_of_our_modules() -> None:
    owned = [
        *SERVE.glob("*.py"),
        SRC / "modelkiln" / "cli" / "serve.py",
        SRC / "modelkiln" / "cli" / "repo.py",
    ]
    lazy = []
    for path in owned:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelkiln"):
                        lazy.append(f"{path.name}:{node.lineno} {node.module}")
                    elif isinstance(node, ast.Import) and any(
                        a.name.startswith("modelkiln") for a in node.names
                    ):
                        lazy.append(f"{path.name}:{node.lineno}")
    assert not lazy, lazy


def test_nothing_in_serve_imports_the_session_shim() -> None:
    owned = [
        *SERVE.glob("*.py"),
        SRC / "modelkiln" / "cli" / "serve.py",
        SRC / "modelkiln" / "cli" / "repo.py",
    ]
    users = [p.name for p in owned if "modelkiln.runtime.session" in p.read_text(encoding="utf-8")]
    assert not users


@pytest.mark.parametrize("value", ["tensorrt", "torch", "onnx", "model", "", 3, ["onnxruntime"]])
def test_an_unknown_backend_names_the_model_the_key_and_the_allowed_values(value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"backend": value}, "resnet", "repo/resnet/config.yaml")
    message = str(err.value)
    assert "repo/resnet/config.yaml" in message and "model 'resnet'" in message
    assert "'backend'" in message and repr(value) in message
    assert "['onnxruntime', 'pipeline', 'genai']" in message


def test_an_unknown_backend_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("backend: onnxruntme\nmax_batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"config key 'backend' must be one of .*got 'onnxruntme'") as err:
        load_config(path, "m")
    assert str(path) in str(err.value)


def test_backend_strings_become_enums_and_files_keep_the_strings(tmp_path: Path) -> None:
    plain = parse_config({"backend": "onnxruntime"}, "m")
    assert plain.backend is BackendKind.ONNXRUNTIME and plain.kind is ModelKind.MODEL
    assert plain.runtime is BackendKind.ONNXRUNTIME
    chat = parse_config({"backend": "genai"}, "m")
    assert chat.backend is ModelKind.GENERATION and chat.kind is ModelKind.GENERATION
    assert chat.genai is not None  # defaults filled in
    pipe = parse_config({"pipeline": {"kind": "clip_zero_shot", "steps": {}}}, "m")
    assert pipe.backend is ModelKind.PIPELINE and pipe.kind is ModelKind.PIPELINE
    # a pipeline section makes a pipeline whatever backend says; a bare backend: pipeline is an ORT model
    assert ModelConfig("m", pipeline=PipelineConfig("clip_zero_shot")).kind is ModelKind.PIPELINE
    assert ModelConfig("m", backend=ModelKind.PIPELINE).runtime is BackendKind.ONNXRUNTIME
    for config in (plain, chat, pipe):
        text = dump_config(config)
        assert f"backend: {config.backend.value}\n" in text
        path = tmp_path / "config.yaml"
        path.write_text(text)
        assert load_config(path, "m") == config
    assert ModelConfig("m", backend="genai") == ModelConfig("m", backend=ModelKind.GENERATION)  # type: ignore[arg-type]


def test_every_config_backend_has_a_loader_and_every_kind_a_server_loader(tmp_path: Path) -> None:
    assert set(BACKEND_LOADERS) == set(SERVED_BACKENDS)
    assert set(BACKEND_VALUES.values()) == {*SERVED_BACKENDS, ModelKind.PIPELINE, ModelKind.GENERATION}
    server = ModelServer(str(tmp_path), cores=1)
    try:
        assert set(server._loaders) == set(ModelKind)
    finally:
        server.shutdown()
