"""Helpers for pass tests: models written inline in ONNX text syntax, run on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.graph.manager import verify
from modelkiln.runtime.session import ort_session, run


def parse(text: str) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(ort_session(ir.to_proto(model).SerializeToString(), optimization="disable"), feed)


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
