"""Our quantize/dequantize against ONNX's own QuantizeLinear/DequantizeLinear (reference evaluator)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from modelkiln.quantmath import QParams, compute_qparams, dequantize, quantize, weight_qparams


def _onnx_qdq(x: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    attrs = {"axis": qp.axis} if qp.axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    qtype = helper.np_dtype_to_tensor_dtype(qp.dtype)
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("q", qtype, x.shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape),
        ],
        [numpy_helper.from_array(qp.scale, "s"), numpy_helper.from_array(qp.zero_point, "z")],
    )
    q, y = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])).run(
        None, {"x": x}
    )
    return q, y


EDGES = np.array(
    [-1000, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.5, 2.5, 127.5, 128.5, 1e6, -1e6], np.float32
)


@pytest.mark.parametrize(
    "dtype,symmetric", [(np.uint8, False), (np.int8, True), (np.int8, False), (np.uint8, True)]
)
def test_per_tensor_matches_onnx_on_edge_values(dtype: type, symmetric: bool) -> None:
    qp = compute_qparams(-3.0, 5.0, dtype, symmetric)
    # values landing exactly on .5 steps exercise round-half-to-even; huge ones exercise saturation
    x = np.concatenate([EDGES, (np.arange(-40, 40) + 0.5) * qp.scale]).astype(np.float32)
    q_ref, y_ref = _onnx_qdq(x, qp)
    q = quantize(x, qp)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(dequantize(q, qp), y_ref)


def test_per_channel_matches_onnx() -> None:
    w = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32) * [
        [[[1]]],
        [[[10]]],
        [[[0.1]]],
        [[[0]]],
    ]
    qp = weight_qparams(w.astype(np.float32), axis=0)
    q_ref, y_ref = _onnx_qdq(w.astype(np.float32), qp)
    np.testing.assert_array_equal(quantize(w, qp), q_ref)
    np.testing.assert_array_equal(dequantize(quantize(w, qp), qp), y_ref)
    assert (qp.zero_point == 0).all() and qp.scale[3] == 1.0  # all-zero channel gets a harmless scale


def test_qparams_include_zero_and_cover_range() -> None:
    qp = compute_qparams(2.0, 6.0, np.uint8, symmetric=False)  # range forced to include 0
    assert qp.zero_point == 0 and qp.scale == pytest.approx(6 / 255)
    qp = compute_qparams(-1.0, 3.0, np.uint8, symmetric=False)
    x = np.array([-1.0, 0.0, 3.0], np.float32)
    np.testing.assert_allclose(dequantize(quantize(x, qp), qp), x, atol=qp.scale / 2 + 1e-7)
    assert dequantize(quantize(np.zeros(1, np.float32), qp), qp)[0] == 0.0  # zero is exact
    sym = compute_qparams(-2.0, 1.0, np.int8, symmetric=True)
    assert sym.zero_point == 0 and sym.scale == pytest.approx(2 / 127)
