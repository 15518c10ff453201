"""The accuracy-budget scorers, on tiny hand-built ONNX models."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.accuracy.budget import cosine_scorer


def _scale_model(weights: list[float]) -> onnx.ModelProto:
    """y = x * w (per feature), x and y [batch, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3], weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_cosine_scorer_is_the_mean_per_sample_cosine() -> None:
    w_ref, w_cand = np.array([1.0, 1.0, 1.0]), np.array([1.0, -0.5, 3.0])
    reference, candidate = _scale_model(w_ref.tolist()), _scale_model(w_cand.tolist())
    # Two feeds of unequal batch size: the mean is over the 4 samples, not over the 2 batches.
    feeds = [
        {"x": np.array([[1, 0, 0], [1, 1, 1], [0.5, 2, 0.1]], np.float32)},  # cosines 1, 0.63, -0.72
        {"x": np.array([[0, 1, 1]], np.float32)},  # 0.58
    ]
    cosines = [_cos(x * w_cand, x * w_ref) for f in feeds for x in f["x"]]
    # Samples differ, so the mean (0.373), the min (-0.72) and the mean of batch means (0.442) differ.
    assert np.mean(cosines) - min(cosines) > 1.0
    assert abs(np.mean(cosines) - np.mean([np.mean(cosines[:3]), cosines[3]])) > 0.05

    score = cosine_scorer(reference, feeds)
    assert abs(score(candidate) - float(np.mean(cosines))) <= 1e-6
    assert abs(score(reference) - 1.0) <= 1e-6
