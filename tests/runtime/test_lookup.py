"""runtime/kernels/lookup.py: element-wise chains between quantized tensors become one exact 256-entry
lookup, applied by OrtBackend at load to models whose metadata asks for it."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from modelkiln.export import export
from modelkiln.quant.config import QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.runtime import kernels
from modelkiln.runtime.backends.onnxruntime import cpu_backend, optimized_graph
from modelkiln.runtime.kernels.lookup import find_chains, fuse_lookups

needs_library = pytest.mark.skipif(not kernels.available(), reason="kernel library not built")


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0


def _gelu(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])


def _reference(f, s_in: float, z_in: int, s_out: float, z_out: int, dtype: type) -> np.ndarray:
    """Float activation of every dequantized input byte, then QuantizeLinear (round half to even,
    saturate), written independently of quant/lookup.py. Indexed by the input's byte."""
    info = np.iinfo(dtype)
    codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.int64)
    x = ((codes - z_in) * np.float32(s_in)).astype(np.float32).astype(np.float64)
    y = f(x).astype(np.float32)
    return np.clip(np.rint(y / np.float32(s_out)) + z_out, info.min, info.max).astype(dtype)


def _chain_model(
    body: list[onnx.NodeProto],
    s_in: float,
    z_in: int,
    s_out: float,
    z_out: int,
    dtype: type,
    extra_inits: tuple[onnx.TensorProto, ...] = (),
    extra_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """x -> Q -> DQ -> (body: reads "dx", ends in "y") -> Q -> DQ -> out."""
    inits = [
        numpy_helper.from_array(np.array(s_in, np.float32), "s_in"),
        numpy_helper.from_array(np.array(z_in, dtype), "z_in"),
        numpy_helper.from_array(np.array(s_out, np.float32), "s_out"),
        numpy_helper.from_array(np.array(z_out, dtype), "z_out"),
        *extra_inits,
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["qx"]),
        helper.make_node("DequantizeLinear", ["qx", "s_in", "z_in"], ["dx"]),
        *body,
        helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["qy"]),
        helper.make_node("DequantizeLinear", ["qy", "s_out", "z_out"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("out", *extra_outputs)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


SILU = [helper.make_node("Sigmoid", ["dx"], ["sg"]), helper.make_node("Mul", ["dx", "sg"], ["y"])]
HARDSWISH = [helper.make_node("HardSwish", ["dx"], ["y"])]
#: GELU as exporters write it: x * 0.5 * (1 + erf(x / sqrt 2))
GELU_ERF = [
    helper.make_node("Div", ["dx", "sqrt2"], ["d"]),
    helper.make_node("Erf", ["d"], ["e"]),
    helper.make_node("Add", ["e", "one"], ["a"]),
    helper.make_node("Mul", ["dx", "a"], ["m"]),
    helper.make_node("Mul", ["m", "half"], ["y"]),
]
GELU_INITS = (
    numpy_helper.from_array(np.array(math.sqrt(2.0), np.float32), "sqrt2"),
    numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    numpy_helper.from_array(np.array([0.5], np.float32), "half"),
)


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    m = ir.from_proto(model)
    counts = fuse_lookups(m)
    return ir.to_proto(m), dict(counts)


qparams = st.tuples(
    st.floats(1e-3, 0.2), st.integers(0, 255), st.floats(1e-3, 0.2), st.integers(0, 255), st.booleans()
)


@given(qparams)
@settings(max_examples=60, deadline=None)
def test_silu_table_is_float_silu_then_quantize_on_every_byte(p: tuple) -> None:
    s_in, z_in, s_out, z_out, signed = p
    dtype = np.int8 if signed else np.uint8
    z_in, z_out = (z_in - 128, z_out - 128) if signed else (z_in, z_out)
    chains = find_chains(ir.from_proto(_chain_model(SILU, s_in, z_in, s_out, z_out, dtype)).graph)
    assert [c.name for c in chains] == ["SiLU"]
    table = chains[0].table()
    assert table.dtype == dtype
    np.testing.assert_array_equal(table, _reference(_silu, s_in, z_in, s_out, z_out, dtype))


@pytest.mark.parametrize(
    ("body", "inits", "f", "name"),
    [(HARDSWISH, (), _hardswish, "HardSwish"), (GELU_ERF, GELU_INITS, _gelu, "GELU")],
)
def test_other_activation_tables(body: list, inits: tuple, f, name: str) -> None:
    model = _chain_model(body, 0.04, 120, 0.03, 20, np.uint8, inits)
    chains = find_chains(ir.from_proto(model).graph)
    assert [c.name for c in chains] == [name]
    np.testing.assert_array_equal(chains[0].table(), _reference(f, 0.04, 120, 0.03, 20, np.uint8))


def test_fused_graph_has_one_lookup_and_our_domain() -> None:
    fused, counts = _fused(_chain_model(SILU, 0.05, 100, 0.04, 10, np.uint8))
    assert counts == {"SiLU": 1}
    assert [n.op_type for n in fused.graph.node] == ["QuantizeLinear", "LookupTable", "DequantizeLinear"]
    lut = fused.graph.node[1]
    assert (
        lut.domain == kernels.DOMAIN
        and list(lut.input) == ["qx", lut.input[1]]
        and list(lut.output) == ["qy"]
    )
    assert {(o.domain, o.version) for o in fused.opset_import} >= {(kernels.DOMAIN, 1)}
    onnx.checker.check_model(fused)


def test_chains_read_elsewhere_or_per_channel_stay() -> None:
    # the Sigmoid output is also a graph output: replacing the chain would lose it
    shared = _chain_model(SILU, 0.05, 100, 0.04, 10, np.uint8, extra_outputs=("sg",))
    assert _fused(shared)[1] == {}
    # a Mul by a per-channel (non-scalar) constant is not one function of the byte
    body = [helper.make_node("Mul", ["dx", "w"], ["y"])]
    w = numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "w")
    assert _fused(_chain_model(body, 0.05, 100, 0.04, 10, np.uint8, (w,)))[1] == {}
    # an op the lookup cannot evaluate (a reduction) stops the chain
    body = [helper.make_node("ReduceMax", ["dx"], ["y"], keepdims=1)]
    assert _fused(_chain_model(body, 0.05, 100, 0.04, 10, np.uint8))[1] == {}


@needs_library
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_lookup_through_onnx_runtime_is_exact_on_all_256_inputs(dtype: type) -> None:
    z_in, z_out = (100, 10) if dtype == np.uint8 else (-28, -118)
    model = _chain_model(SILU, 0.05, z_in, 0.04, z_out, dtype)
    fused, _ = _fused(model)
    codes = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    x = ((codes - z_in) * np.float32(0.05)).astype(np.float32)  # quantizes back to each code exactly
    got = cpu_backend(fused.SerializeToString()).infer({"x": x})["out"]
    want = (_reference(_silu, 0.05, z_in, 0.04, z_out, dtype).astype(np.float32) - z_out) * np.float32(0.04)
    np.testing.assert_array_equal(got, want)
    # ONNX Runtime's own float path rounds its Sigmoid differently on at most a few bytes, by one step
    unfused = cpu_backend(model.SerializeToString()).infer({"x": x})["out"]
    steps = np.rint(np.abs(unfused - got) / 0.04)
    assert steps.max() <= 1 and (steps > 0).sum() <= 4


@pytest.fixture(scope="module")
def yolo_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lookup")
    calib = folder / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = cv2.GaussianBlur(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8), (7, 7), 2)
        cv2.imwrite(str(calib / f"{i}.png"), img)
    src = folder / "y.onnx"
    export("yolov5n", src, weights="random", image_size=64)
    return src, calib


@needs_library
def test_yolov5_silus_run_as_lookups_between_integer_convolutions(
    yolo_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    src, calib = yolo_tiny
    fast, std = tmp_path / "fast.onnx", tmp_path / "std.onnx"
    r_fast = quantize(src, fast, calib, "yolov5n", QuantConfig())
    quantize(src, std, calib, "yolov5n", QuantConfig(custom_kernels=False))
    model = onnx.load(fast)
    assert not kernels.uses_kernels(model)  # the file stays standard QDQ for every runtime
    assert {p.key: p.value for p in model.metadata_props}[kernels.METADATA_KEY] == kernels.LOOKUP_OP
    ran = [n.op_type for n in optimized_graph(fast).graph.node]
    ran_std = [n.op_type for n in optimized_graph(std).graph.node]
    # an in-memory candidate (how the budget search scores them) gets its lookups too
    assert [n.op_type for n in optimized_graph(model).graph.node] == ran
    assert ran.count("LookupTable") == r_fast.lookups["SiLU"] > 40 and "LookupTable" not in ran_std
    assert ran.count("Sigmoid") == ran_std.count("Sigmoid") - ran.count("LookupTable")  # one per SiLU
    assert ran.count("QLinearConv") == ran_std.count("QLinearConv") > 40
    # after ONNX Runtime's NHWC layout pass: no transposes around the lookups
    assert ran.count("Transpose") == ran_std.count("Transpose")
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    a = cpu_backend(fast).infer({"images": x})["output0"]
    b = cpu_backend(std).infer({"images": x})["output0"]
    scores = np.abs(a[..., 4:] - b[..., 4:])
    assert np.median(scores) < 1e-3 and scores.max() < 0.05  # same model up to a few rounding steps


def test_standard_ops_build_has_no_custom_domain(yolo_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, calib = yolo_tiny
    out = tmp_path / "std.onnx"
    result = quantize(src, out, calib, "yolov5n", QuantConfig(custom_kernels=False))
    model = onnx.load(out)
    assert result.lookups == {} and kernels.METADATA_KEY not in {p.key for p in model.metadata_props}
    assert "LookupTable" not in [n.op_type for n in optimized_graph(out).graph.node]
