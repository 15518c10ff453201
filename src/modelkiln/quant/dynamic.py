"""Dynamic INT8 for MatMuls: weights int8 per output channel ahead of time, activations quantized
per batch at run time (DynamicQuantizeLinear: uint8, range of the batch itself).

    x -> DynamicQuantizeLinear -> (xq, xs, xz);  y = Cast(MatMulInteger(xq, Wq, xz, 0)) * (xs * ws)

No calibration data is needed, and a batch with unusual ranges (a long or odd sentence) cannot
fall outside a calibrated range; the price is computing the range on every call. ONNX Runtime
fuses the pattern (with a following constant bias Add) into DynamicQuantizeMatMul.
"""

from __future__ import annotations

import typing
from collections import Counter

import numpy as np
import onnx_ir as ir

from modelkiln.ir_utils import const, new_initializer
from modelkiln.quant.config import Int8Cpu, PerChannel, QuantConfig
from modelkiln.quant.formats import WeightStorage, store_weight, weight_storage


def dynamic_candidates(model: ir.Model, config: QuantConfig) -> list[ir.Node]:
    """MatMuls with a constant 2-D float weight and a float activation, not excluded."""
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.name in config.exclude:
            continue
        w = const(node.inputs[1])
        x = node.inputs[0]
        if w is None or w.ndim != 2 or w.dtype != np.float32 or const(x) is not None:
            continue
        if x is None:
            raise ValueError(f"MatMul node {node.name!r} has no input 0, which the op requires")
        if x.dtype not in (ir.DataType.FLOAT, None):
            continue
        found.append(node)
    return found


def quantize_dynamic_matmuls(
    model: ir.Model, config: QuantConfig, only: str | set[str] | None = None, fmt: Int8Cpu = Int8Cpu.PORTABLE
) -> Counter[str]:
    """Rewrite the candidates (or just those named in ``only``) in place, weights stored as ``fmt``
    needs (quant/formats.py: DynamicQuantizeLinear gives full-range uint8 activations, so the
    saturation rules are the static ones); counts by op type."""
    if isinstance(only, str):
        only = {only}
    graph = model.graph
    per_channel = isinstance(config.weights, PerChannel)
    shared: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}  # one dynamic quantize per tensor
    count = 0
    for node in dynamic_candidates(model, config):
        if only is not None and node.name not in only:
            continue
        x = node.inputs[0]
        assert x is not None and x.name is not None, "a candidate reads a tensor of the graph"
        name = x.name
        if name not in shared:
            dq = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_DynamicQuantize")
            for out, suffix in zip(dq.outputs, ("q", "scale", "zero_point"), strict=True):
                out.name = f"{name}_dyn_{suffix}"
            graph.insert_before(node, dq)
            q, scale, zero_point = dq.outputs
            shared[name] = (q, scale, zero_point)
        xq, xs, xz = shared[name]
        _rewrite(graph, node, xq, xs, xz, per_channel, weight_storage(config, fmt))
        count += 1
    graph.sort()
    return Counter({"MatMulInteger": count}) if count else Counter()


def _rewrite(
    graph: ir.Graph,
    node: ir.Node,
    xq: ir.Value,
    xs: ir.Value,
    xz: ir.Value,
    per_channel: bool,
    storage: WeightStorage,
) -> None:
    weight = node.inputs[1]
    w = const(weight)
    assert weight is not None and w is not None, "a candidate's weight is constant"
    q, qp = store_weight(w, 1 if per_channel else None, storage)
    hint = weight.name
    wq = new_initializer(graph, q, f"{hint}_quantized")
    wz = new_initializer(graph, np.asarray(qp.zero_point), f"{hint}_zero_point")
    ws = new_initializer(graph, np.asarray(qp.scale, np.float32), f"{hint}_scale")
    name = node.name
    mm = ir.Node("", "MatMulInteger", [xq, wq, xz, wz], num_outputs=1, name=f"{name}_MatMulInteger")
    cast = ir.Node(
        "",
        "Cast",
        mm.outputs,
        attributes={"to": ir.Attr("to", ir.AttributeType.INT, ir.DataType.FLOAT)},
        num_outputs=1,
        name=f"{name}_Cast",
    )
    scale = ir.Node("", "Mul", [xs, ws], num_outputs=1, name=f"{name}_scale")
    out = ir.Node("", "Mul", [cast.outputs[0], scale.outputs[0]], num_outputs=1, name=f"{name}_dequantize")
    graph.insert_before(node, [mm, cast, scale, out])
    old = node.outputs[0]
    # Value.dtype's setter is typed DataType but also takes None (it then sets a TensorType of
    # unknown dtype): an untyped MatMul output has always been copied that way, and still is.
    out.outputs[0].shape, out.outputs[0].dtype = old.shape, typing.cast(ir.DataType, old.dtype)
    if old.is_graph_output():
        out.outputs[0].name = old.name
        old.name = f"{old.name}_float"
        graph.outputs[graph.outputs.index(old)] = out.outputs[0]
    ir.convenience.replace_all_uses_with(old, out.outputs[0])
    graph.remove(node, safe=True)
