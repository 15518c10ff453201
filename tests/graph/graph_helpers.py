"""Helpers for pass tests: models written inline in ONNX text syntax, run on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.graph.manager import verify
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend


def parse(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return cpu_backend(ir.to_proto(model), optimization=GraphOptimization.DISABLE).infer(feed)


def apply(pass_: GraphPass, model: ir.Model, feed: dict[str, np.ndarray]) -> tuple[int, dict, dict]:
    """Run the pass once; returns (rewrites, outputs before, outputs after) and checks validity."""
    before = outputs(model, feed)
    result = pass_(model)
    if result.modified:
        verify(model, pass_.name)
    after = outputs(model, feed)
    assert result.modified == (pass_.last_rewrites > 0)
    return pass_.last_rewrites, before, after


def assert_same(before: dict, after: dict, atol: float = 1e-5) -> None:
    assert before.keys() == after.keys()
    for k, want in before.items():
        np.testing.assert_allclose(after[k], want, atol=atol, rtol=1e-5)


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def conv_model(after: str, extra_init: str = "") -> str:
    """x [N, 2, 5, 5] -> Conv (3 filters, 3x3, padded) -> ``after`` (which must produce ``y``)."""
    return f"""{HEADER}
    g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y)
    <float[3, 2, 3, 3] w = {{{", ".join(str(v / 10) for v in range(-27, 27))}}},
     float[3] b = {{0.1, -0.2, 0.3}}{extra_init}>
    {{
      c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
      {after}
    }}"""
