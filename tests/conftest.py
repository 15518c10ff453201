"""Shared fixtures: the real-asset folder (tests marked ``assets`` skip without it) and exports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("KILN_ASSETS", ROOT.parent / "shared" / "assets"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ASSETS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real assets not found at {ASSETS} (set KILN_ASSETS)")
    for item in items:
        if "assets" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = relu(x @ W) with x [batch, 4] float32, plus a second input scale [1] float32."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Mul", ["m", "scale"], ["s"]),
            helper.make_node("Relu", ["s"], ["y"]),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    path = tmp_path_factory.mktemp("m") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="session")
def qwen_tiny_export(tmp_path_factory: pytest.TempPathFactory):  # -> (folder, ExportReport)
    """``kiln export qwen2-vl-tiny`` once per run (every part parity-checked against torch); the
    folder is shared, so tests that write into it work on a copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from modelkiln.export import export

    out = tmp_path_factory.mktemp("qwen2-vl-tiny")
    return out, export("qwen2-vl-tiny", out)
