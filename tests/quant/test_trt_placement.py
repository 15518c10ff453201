"""``--target trt``: Q/DQ where TensorRT's explicit quantization wants them (inputs of weighted ops,
per-channel symmetric int8 weights along the output channels, the residual input of an Add, no
quantized outputs or biases, no DequantizeLinear -> QuantizeLinear chains), checked structurally;
and ``check_trt`` names each rule a graph breaks (the CPU placement breaks several)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.export import export
from modelkiln.quant.config import QuantConfig, Target
from modelkiln.quant.quantize import quantize
from modelkiln.quant.trt import check_trt
from modelkiln.runtime.backends.onnxruntime import cpu_backend


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ResNet-50 (random weights, 32 px: the structure is what counts) and npz calibration samples."""
    tmp = tmp_path_factory.mktemp("trt")
    src = tmp / "r50.onnx"
    export("resnet50", src, weights="random", image_size=32)
    folder = tmp / "npz"
    folder.mkdir()
    for i in range(3):
        x = np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)
        np.savez(folder / f"{i}.npz", input=x)
    return src, folder


@pytest.fixture(scope="module")
def trt_model(resnet: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    out = tmp_path_factory.mktemp("trt_q") / "r50.trt.onnx"
    quantize(resnet[0], out, resnet[1], config=QuantConfig(target=Target.TRT))
    return onnx.load(out)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_trt_placement_passes_the_checker_and_quantizes_every_conv_input(trt_model: onnx.ModelProto) -> None:
    assert check_trt(trt_model) == []
    made = _producers(trt_model)
    convs = [n for n in trt_model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53
    for conv in convs:
        assert made[conv.input[0]].op_type == "DequantizeLinear", conv.name
        w_dq = made[conv.input[1]]
        assert w_dq.op_type == "DequantizeLinear", conv.name
        assert next(a.i for a in w_dq.attribute if a.name == "axis") == 0
        if len(conv.input) > 2:  # the bias stays a float initializer
            assert conv.input[2] not in made, conv.name
    gemm = next(n for n in trt_model.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert made[gemm.input[0]].op_type == "DequantizeLinear"
    dq_types = Counter(
        numpy_helper.to_array(i).dtype.name
        for i in trt_model.graph.initializer
        if any(n.op_type == "DequantizeLinear" and n.input[0] == i.name for n in trt_model.graph.node)
    )
    assert set(dq_types) == {"int8"}, dq_types  # weights only: no int32 bias


def test_trt_placement_quantizes_after_relu_not_before(trt_model: onnx.ModelProto) -> None:
    """No weighted op's output is quantized for its own sake: the Q/DQ a Conv's reader needs comes
    after the ReLU (TensorRT fuses Conv+ReLU and writes int8), never between Conv and ReLU."""
    made = _producers(trt_model)
    relus = [n for n in trt_model.graph.node if n.op_type == "Relu"]
    assert relus
    for relu in relus:
        assert made[relu.input[0]].op_type != "DequantizeLinear", relu.name


def test_trt_placement_quantizes_only_the_residual_input_of_each_add(trt_model: onnx.ModelProto) -> None:
    made = _producers(trt_model)
    adds = [n for n in trt_model.graph.node if n.op_type == "Add"]
    assert len(adds) == 16  # one per bottleneck block
    for add in adds:
        quantized = [made.get(x) is not None and made[x].op_type == "DequantizeLinear" for x in add.input]
        assert quantized == [False, True], add.name  # out (the Conv) float, identity (+=) int8


def test_trt_model_runs_on_onnx_runtime_and_stays_near_float(
    resnet: tuple[Path, Path], trt_model: onnx.ModelProto
) -> None:
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = cpu_backend(resnet[0]).infer({"input": x})
    got = cpu_backend(trt_model).infer({"input": x})
    a, b = next(iter(ref.values())).ravel(), next(iter(got.values())).ravel()
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.98


def test_the_cpu_placement_breaks_tensorrts_rules(tmp_path: Path) -> None:
    """The default (CPU) placement quantizes biases to int32: TensorRT's rules refuse that. A
    two-convolution model is enough (ResNet-50 took a minute of the suite for the same finding)."""
    rng = np.random.default_rng(0)
    inits = [
        _init("w1", (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)),
        _init("b1", (rng.standard_normal(8) * 0.1).astype(np.float32)),
        _init("w2", (rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32)),
        _init("b2", (rng.standard_normal(4) * 0.1).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
        inits,
    )
    src, folder = tmp_path / "convs.onnx", tmp_path / "npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", input=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "cpu.onnx"
    quantize(src, out, folder)
    problems = " | ".join(check_trt(onnx.load(out)))
    assert "int32 DequantizeLinear" in problems  # quantized biases


def _tiny(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def test_check_trt_names_each_broken_rule() -> None:
    inits = [
        _init("s", np.array(0.1, np.float32)),
        _init("z", np.array(0, np.int8)),
        _init("zu", np.array(128, np.uint8)),
        _init("s2", np.array(0.2, np.float32)),
        _init("w", np.ones((4, 3), np.int8)),
        _init("ws", np.full(3, 0.01, np.float32)),
        _init("wz", np.zeros(3, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q1"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq1"),
        helper.make_node("Reshape", ["xd", "shape"], ["xr"], name="reshape"),
        helper.make_node("QuantizeLinear", ["xr", "s2", "zu"], ["xq2"], name="q2"),  # requantize, uint8
        helper.make_node("DequantizeLinear", ["xq2", "s2", "zu"], ["xd2"], name="dq2"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=0),  # wrong axis
        helper.make_node("MatMul", ["xd2", "wd"], ["y"], name="mm"),
    ]
    inits.append(_init("shape", np.array([1, 4], np.int64)))
    problems = check_trt(_tiny(nodes, inits))
    text = " | ".join(problems)
    assert "dq1 -> q2: DequantizeLinear feeds QuantizeLinear" in text
    assert "q2: zero point must be int8 0" in text and "dq2: zero point" in text
    assert "mm: weight quantized along axis 0, output channels are axis 1" in text
    float_input = [n for n in nodes if n.name in ("wdq", "mm")]
    assert "mm: int8 weight but float input" in " | ".join(check_trt(_tiny(float_input, inits)))
