"""quant/stem.py: a k x k / s RGB stem becomes SpaceToDepth + a (k/s) x (k/s) stride-1 convolution."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.quant.stem import space_to_depth_stem
from modelkiln.runtime.backends.onnxruntime import cpu_backend


def _stem(
    kernel: int = 6,
    stride: int = 2,
    pads: int = 2,
    channels: int = 3,
    group: int = 1,
    size: int | str = 32,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, channels // group, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        name="stem",
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pads] * 4,
        group=group,
    )
    graph = helper.make_graph(
        [conv],
        "stem",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rewritten(model: onnx.ModelProto) -> tuple[str | None, onnx.ModelProto]:
    m = ir.from_proto(model)
    name = space_to_depth_stem(m)
    return name, ir.to_proto(m)


@pytest.mark.parametrize(("kernel", "stride", "pads"), [(6, 2, 2), (4, 2, 0), (6, 3, 3), (2, 2, 0)])
def test_stem_rewrite_is_the_same_convolution(kernel: int, stride: int, pads: int) -> None:
    model = _stem(kernel, stride, pads, size=36)
    name, new = _rewritten(model)
    assert name == "stem"
    ops = [n.op_type for n in new.graph.node]
    assert ops == ["SpaceToDepth", "Conv"]
    conv = new.graph.node[1]
    attrs = {a.name: list(helper.get_attribute_value(a)) for a in conv.attribute if a.name != "group"}
    k = kernel // stride
    assert attrs["kernel_shape"] == [k, k] and attrs["strides"] == [1, 1]
    assert attrs["pads"] == [pads // stride] * 4
    assert [i.name for i in new.graph.initializer if i.name == "w"] == []  # the old weight is gone
    x = np.random.default_rng(1).standard_normal((2, 3, 36, 36)).astype(np.float32)
    want = cpu_backend(model.SerializeToString()).infer({"x": x})["y"]
    got = cpu_backend(new.SerializeToString()).infer({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "model",
    [
        _stem(kernel=7, stride=2, pads=3),  # 7 is not a multiple of the stride
        _stem(stride=1, pads=0),  # nothing to fold
        _stem(channels=8),  # not an image stem
        _stem(channels=4, group=2),  # grouped
        _stem(size=33),  # SpaceToDepth needs sizes divisible by the block...
        _stem(size="h"),  # ...and known
    ],
)
def test_other_convolutions_stay(model: onnx.ModelProto) -> None:
    name, new = _rewritten(model)
    assert name is None and [n.op_type for n in new.graph.node] == ["Conv"]
