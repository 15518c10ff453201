"""Reading and writing ONNX files for every stage: clear errors on bad input, atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from modelkiln.errors import BadInput, ModelNotFound


def load_model(path: str | Path) -> onnx.ModelProto:
    """An ONNX model from disk (external data included), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise BadInput(f"{path} is not an ONNX model: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not model.graph.node:
        raise BadInput(f"{path} is not an ONNX model (no graph nodes)")
    return model


def input_names(model: onnx.ModelProto) -> list[str]:
    """The inputs a caller feeds: graph inputs that are not initializers (older exporters list
    weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def model_bytes(path: Path) -> int:
    """Size of a saved model with the ``<name>.data`` weight file ``save_model`` writes beside it."""
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Atomic write; models over 1.8 GB keep their weights in ``<name>.data`` beside the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(fd)
    try:
        big = model.ByteSize() > 1_800_000_000
        onnx.save(model, tmp, save_as_external_data=big, location=f"{path.name}.data" if big else None)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is an ordinary file
        if big:
            os.chmod(path.parent / f"{path.name}.data", 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and tensor attributes (Constant values...),
    subgraphs included (what external data and encryption must both cover)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from graph_tensors(sub)
