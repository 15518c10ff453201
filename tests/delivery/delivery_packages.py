"""Tiny packages built by hand (onnx.helper models, sealed with seal_package): no deploy run.

A module of its own (not conftest.py, which tests/ and tests/serve/ also have) so tests import it
by a unique name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelkiln.delivery.seal import seal_package

IN, HIDDEN, CLASSES = 16, 32, 10
RNG_SEED = 0


def weights(seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((IN, HIDDEN)).astype(np.float32),
        rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
    )


def _quant(w: np.ndarray, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-tensor int8; ``shrink`` > 1 makes the scale too small, so weights saturate."""
    scale = np.float32(np.abs(w).max() / 127 / shrink)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), np.array(scale, np.float32)


def classifier(
    path: Path,
    seed: int = RNG_SEED,
    int8: bool = False,
    shrink: float = 1.0,
    meta: dict[str, str] | None = None,
    external: bool = False,
) -> Path:
    """logits = relu(x @ W1) @ W2, x [batch, 16] -> [batch, 10]; ``int8``: weights stored int8
    behind DequantizeLinear (``shrink`` saturates them); ``external``: weights in model.onnx.data."""
    w1, w2 = weights(seed)
    nodes, inits = [], []
    for name, w in (("W1", w1), ("W2", w2)):
        if int8:
            q, s = _quant(w, shrink)
            inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(s, f"{name}_s")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [name]))
        else:
            inits.append(numpy_helper.from_array(w, name))
    nodes += [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


INT8_META = {
    "modelkiln.int8.format": "portable",
    "modelkiln.int8.weights": "s8-pairsafe",
    "modelkiln.int8.activations": "u8",
    "modelkiln.int8.requires": "",
}


def feeds(count: int = 4, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, IN)).astype(np.float32)} for _ in range(count)]


FP32 = "repository/clf_fp32/1/model.onnx"
INT8 = "repository/clf_int8/1/model.onnx"


def build_package(
    root: Path, sign_key: Path | None = None, encrypt_key: Path | None = None, external: bool = False
) -> Path:
    classifier(root / FP32, external=external)
    classifier(root / INT8, int8=True, meta=INT8_META, external=external)
    (root / "report.md").write_text("# report\n")
    seal_package(
        root,
        {"clf": {"fp32": root / FP32, "int8": root / INT8}},
        {"clf": feeds()},
        sign_key,
        encrypt_key,
        accuracy={"clf": {"fp32": {"top1": 0.9}, "int8": {"top1": 0.89}}},
        tasks={"clf": "classification"},
    )
    return root
