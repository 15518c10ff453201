"""Weight-only INT8 on ONNX Runtime's MatMulNBits: packing, the graph rewrite and its numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.errors import ConfigError
from modelkiln.quant.config import QuantConfig, WeightKernel
from modelkiln.quant.matmul_nbits import pack_int8_blocks, unpack_int8_blocks
from modelkiln.quant.quantize import quantize
from modelkiln.quantmath import per_channel_block
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

NBITS = QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS)


def _first_output(
    model: Path, feed: dict[str, np.ndarray], optimization: GraphOptimization = GraphOptimization.ALL
) -> np.ndarray:
    """The first output of ``model`` on ``feed`` (ONNX Runtime, CPU provider)."""
    return next(iter(cpu_backend(model, optimization=optimization).infer(feed).values()))


@pytest.mark.parametrize(("k", "block"), [(40, 0), (64, 0), (96, 32)])
def test_packing_round_trips_within_half_a_step(k: int, block: int) -> None:
    w = np.random.default_rng(k).standard_normal((k, 24)).astype(np.float32)
    block = block or per_channel_block(k)
    b, scales = pack_int8_blocks(w, block)
    assert b.dtype == np.uint8 and b.shape == (24, -(-k // block), block)
    back = unpack_int8_blocks(b, scales, k)
    step = np.repeat(scales.reshape(24, -1), block, axis=1)[:, :k].T
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    if block >= k:  # per channel: one scale per output column, from its absmax
        np.testing.assert_allclose(scales, np.abs(w).max(0) / 127, rtol=1e-6)


def _linear_chain(path: Path, k: int = 48, n: int = 40) -> tuple[Path, list[np.ndarray]]:
    """x [b, s, k] -> MatMul+bias -> Relu -> MatMul (no bias) -> y, as torch exports Linear."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((k, n)).astype(np.float32) * 0.2, rng.standard_normal(n).astype(np.float32)
    w2 = rng.standard_normal((n, 16)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])],
        [numpy_helper.from_array(a, name) for a, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, [w1, b1, w2]


def test_matmuls_become_matmulnbits_with_the_bias_folded(tmp_path: Path) -> None:
    src, (_, b1, _) = _linear_chain(tmp_path / "chain.onnx")
    quantize(src, tmp_path / "w8.onnx", None, config=NBITS)
    model = onnx.load(tmp_path / "w8.onnx")
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == Counter({"MatMulNBits": 2, "Relu": 1})  # bias Add folded into the first
    assert not any(i.data_type == TensorProto.FLOAT and i.dims == [48, 40] for i in model.graph.initializer)
    fc1 = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits[fc1.input[5]], b1)
    x = np.random.default_rng(1).standard_normal((2, 3, 48)).astype(np.float32)
    ref = _first_output(src, {"x": x})
    got = _first_output(tmp_path / "w8.onnx", {"x": x})
    # int8 weights and the kernel's int8 activations: close to float, not equal
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999 and 0 < np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_block_size_and_kernel_are_validated() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS, block_size=24)
    with pytest.raises(ConfigError, match="weight-only"):
        QuantConfig(weight_kernel=WeightKernel.MATMUL_NBITS)


def test_a_linear_gemm_becomes_matmulnbits_and_a_scaled_one_does_not(tmp_path: Path) -> None:
    """torch's Linear on 2-D input exports as Gemm(transB=1) with a bias: that is a MatMulNBits;
    a Gemm with alpha != 1 is not a plain linear layer and keeps the dequantize path."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 48)).astype(np.float32) * 0.2  # [N, K] as transB=1 stores it
    b = rng.standard_normal(40).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="linear", transB=1),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="scaled", transB=1, alpha=0.5),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (w[:, :40], "w2"), (b, "b2"))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 40])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    quantize(tmp_path / "g.onnx", tmp_path / "w8.onnx", None, config=NBITS)
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "w8.onnx").graph.node)
    assert ops["MatMulNBits"] == 1 and ops["Gemm"] == 1 and ops["DequantizeLinear"] == 1
    x = rng.standard_normal((5, 48)).astype(np.float32)
    ref = _first_output(tmp_path / "g.onnx", {"x": x})
    got = _first_output(tmp_path / "w8.onnx", {"x": x})
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
