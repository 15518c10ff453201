"""The accuracy-budget scorers, on tiny hand-built ONNX models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.accuracy.budget import AccuracyBudget, BudgetResult, cosine_scorer, within_budget
from modelkiln.errors import BadInput, QuantizationError
from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.quantizer import Quantizer


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


WIDTH = 16


def _chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """x [N, 16] -> 3 x (MatMul -> Relu) -> MatMul -> y, with .npy calibration and eval samples."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4
        if i == 1:
            w[:, 0] *= 60  # an outlier channel into fc2's reader: fc2 costs the most in int8
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel().tolist()))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
        x = f"m{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    folders = []
    for name, seed in (("calib", 1), ("eval", 2)):
        folder = tmp_path / name
        folder.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(8):
            np.save(folder / f"{i}.npy", rng.standard_normal((1, WIDTH)).astype(np.float32))
        folders.append(folder)
    return path, folders[0], folders[1]


def _within(
    src: Path,
    calib: Path,
    evald: Path,
    max_drop: float,
    out: Path,
    metric: str = "cosine",
    batch_size: int = 8,
) -> BudgetResult:
    """The budget search as deploy and kiln quantize run it: one Quantizer, one AccuracyBudget."""
    quantizer = Quantizer(src, QuantConfig(), CalibrationData(calib, None, 100, batch_size))
    return within_budget(quantizer, AccuracyBudget(evald, max_drop, metric), out)


def test_budget_reports_the_layers_it_returned_to_float(tmp_path: Path) -> None:
    src, calib, evald = _chain(tmp_path)
    full = _within(src, calib, evald, 1.0, tmp_path / "full.onnx")
    assert full.fallback.kept_float == [] and full.sensitivity == []  # full INT8 met it: no ranking
    assert set(full.latency_ms) == {"fp32", "int8", "chosen"} and full.latency_batch == 8
    full_drop = full.fallback.drop
    assert full_drop > 0
    budget = full_drop / 4
    result = _within(src, calib, evald, budget, tmp_path / "q.onnx", batch_size=4)
    kept = result.fallback.kept_float
    assert kept and result.fallback.drop <= budget
    assert [s.name for s in result.sensitivity][: len(kept)] == kept  # the most sensitive first
    for name in kept:
        assert result.quantize.kept_float[name].startswith("accuracy budget: sensitive layer returned")
    assert result.latency_batch == 4
    written = onnx.load(tmp_path / "q.onnx")
    assert cosine_scorer(onnx.load(src), [{"x": np.ones((2, WIDTH), np.float32)}])(written) > 0.9


def test_budget_arguments_are_checked_before_calibration(tmp_path: Path) -> None:
    src, calib, evald = _chain(tmp_path)
    with pytest.raises(BadInput, match="--metric must be one of"):
        AccuracyBudget(evald, 0.01, "top5")
    with pytest.raises(BadInput, match="--max-drop must be >= 0"):
        AccuracyBudget(evald, -0.01)
    with pytest.raises(BadInput, match="give --zoo"):
        _within(src, tmp_path / "nowhere", evald, 0.01, tmp_path / "q.onnx", metric="top1")
    with pytest.raises(QuantizationError, match="accuracy budget not met"):
        _within(src, calib, evald, 0.0, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
