"""Transformer default for FFN down-projections: a linear reading a GELU output stays float when a
few of its input channels dwarf the rest (measured on the calibration data), and is quantized when
they do not, or when the user asks for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.qdq import mark
from modelkiln.quant.quantizer import Quantizer
from modelkiln.quant.rules import is_ffn_down

H, F = 16, 64


def _ffn(outlier: float) -> onnx.ModelProto:
    """x -> MatMul(w1) -> GELU (erf formula, as exporters write it) -> MatMul(w2) -> y; channel 3
    of the GELU output is ``outlier`` times larger than the others."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((H, F)) * 0.3).astype(np.float32)
    w1[:, 3] *= outlier
    w2 = (rng.standard_normal((F, H)) * 0.3).astype(np.float32)
    consts = {
        "w1": w1,
        "w2": w2,
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Div", ["h", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="gelu_add"),
        helper.make_node("Mul", ["h", "a"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, H])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calib(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(folder / f"{i}.npy", rng.standard_normal((4, H)).astype(np.float32))
    return folder


def test_ffn_down_is_recognised_through_the_erf_formula() -> None:
    model = ir.from_proto(_ffn(1.0))
    found = {n.name: is_ffn_down(n) for n in model.graph if n.op_type == "MatMul"}
    assert found == {"fc1": False, "fc2": True}


@pytest.mark.parametrize(
    ("outlier", "config", "fc2_float"),
    [
        (30.0, QuantConfig(transformer=True), True),  # one channel ~30x the median: float
        (1.0, QuantConfig(transformer=True), False),  # even channels: int8
        (30.0, QuantConfig(transformer=True, int8_ffn_down=True), False),  # asked for: int8
        (30.0, QuantConfig(transformer=True, ffn_spread=1000.0), False),  # threshold above it
        (30.0, QuantConfig(transformer=False), False),  # not a transformer: no such default
    ],
)
def test_ffn_down_stays_float_only_with_outlier_channels(
    tmp_path: Path, outlier: float, config: QuantConfig, fc2_float: bool
) -> None:
    src = tmp_path / "ffn.onnx"
    onnx.save(_ffn(outlier), src)
    quantizer = Quantizer(src, config, CalibrationData(_calib(tmp_path / "calib")))
    if config.transformer and not config.int8_ffn_down:
        (ratio,) = quantizer.calibrated.spread.values()
        assert (ratio > 10) == (outlier > 1)
    plan = quantizer.make().plan
    quantized = {n.name for n in plan.nodes}
    assert ("fc2" not in quantized) == fc2_float
    assert ("fc2" in plan.kept_float and "outlier channels" in plan.kept_float["fc2"]) == fc2_float


def test_without_measurements_the_ffn_down_stays_float() -> None:
    """mark() without spread figures (no calibration pass) keeps the safe choice."""
    plan = mark(ir.from_proto(_ffn(1.0)), QuantConfig(transformer=True))
    assert "not measured" in plan.kept_float["fc2"]
