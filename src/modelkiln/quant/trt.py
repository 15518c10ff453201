"""Q/DQ placement for TensorRT's explicit quantization (``QuantConfig(target=Target.TRT)``), and
a structural check of a quantized file against TensorRT's rules.

TensorRT reads a QDQ graph as an exact statement of where int8 begins and ends, then fuses: a
Q/DQ pair on the input of a Conv/Gemm/MatMul and on its weight make an int8 kernel; the output of
that kernel is quantized if the next weighted op's input is; an element-wise Add fuses into the
Conv that produces its other input when its residual input is quantized; Q/DQ move by themselves
across ops that commute with quantization (MaxPool, Concat, Reshape...). So the placement
TensorRT's guide recommends differs from the one ONNX Runtime's CPU kernels need:

- quantize the activation inputs of weighted ops (Conv, ConvTranspose, Gemm, MatMul with a
  constant weight; both inputs of an activation x activation MatMul where attention is int8);
- weights per channel along the output-channel axis, symmetric int8 (zero point 0);
- never quantize a weighted op's output for its own sake, and never a bias (TensorRT keeps biases
  in float; an int32 DequantizeLinear is not something it imports);
- on a residual Add, quantize only the residual (skip) input: the input not made by a weighted op,
  or the second input (PyTorch's ``out += identity``) when both are;
- activations per tensor, symmetric int8; no DequantizeLinear -> QuantizeLinear chain
  (a requantization TensorRT cannot fold into a kernel).

``trt_inputs`` is the placement rule ``qdq.mark`` applies for the trt target; ``check_trt`` reads
a finished ONNX file and names every place that breaks the rules above.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from modelkiln.quant.rules import DATA_MOVEMENT, OpRule, rule_for

#: Ops whose output is a weighted op's (BatchNormalization stays with the Conv before it).
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _made_by_weighted_op(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type in ("BatchNormalization", *DATA_MOVEMENT):
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type in WEIGHTED


def trt_rule(node: ir.Node) -> OpRule | None:
    """What the trt target quantizes at ``node``: the activation inputs and weight of a weighted
    op (no bias, no output), the residual input of an Add; None for every other op (TensorRT
    propagates Q/DQ across pooling, Concat, Resize and data movement by itself)."""
    rule = rule_for(node)
    if rule is None:
        return None
    if node.op_type in WEIGHTED:
        return OpRule(rule.activations, rule.weight, None, "consumers")
    if node.op_type == "Add":
        a, b = (_made_by_weighted_op(v) for v in node.inputs[:2])
        if not (a or b):
            return None  # nothing for the Add to fuse into: it stays a float element-wise op
        return OpRule((0,) if b and not a else (1,), output="consumers")
    return None


def _weight_axis(node: onnx.NodeProto) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1) as TensorRT wants it."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return -1
    return None


def check_trt(model: onnx.ModelProto) -> list[str]:
    """Every place in ``model`` that breaks TensorRT's explicit-quantization rules (see the module
    docstring), one sentence each naming the node; empty when the file is a clean TensorRT QDQ graph."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    problems: list[str] = []

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zero is not None and (zero.dtype != np.int8 or np.any(zero != 0)):
            problems.append(
                f"{n.name}: zero point must be int8 0 (symmetric), got {zero.dtype} {zero.ravel()[:4]}"
            )
        if n.op_type == "DequantizeLinear":
            data = array(n.input[0])
            if data is not None and data.dtype == np.int32:
                problems.append(
                    f"{n.name}: int32 DequantizeLinear (a quantized bias): TensorRT keeps biases float"
                )
            if data is None:  # an activation: per tensor, and no requantization after it
                scale = array(n.input[1])
                if scale is not None and scale.size != 1:
                    problems.append(
                        f"{n.name}: activation scale per channel ({scale.size}); TensorRT wants per tensor"
                    )
                for reader in _through_data_movement(n.output[0], readers):
                    if reader.op_type == "QuantizeLinear":
                        problems.append(
                            f"{n.name} -> {reader.name}: DequantizeLinear feeds QuantizeLinear (requantization)"
                        )
    for n in graph.node:
        axis = _weight_axis(n)
        if axis is None or len(n.input) < 2:
            continue
        w_dq = producer.get(n.input[1])
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
            continue
        x_dq = producer.get(n.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            problems.append(f"{n.name}: int8 weight but float input (quantize all inputs of a weighted op)")
        scale = array(w_dq.input[1])
        if scale is not None and scale.size > 1:
            rank = array(w_dq.input[0])
            got = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
            want = axis % rank.ndim if rank is not None else axis
            if rank is not None and got % rank.ndim != want:
                problems.append(
                    f"{n.name}: weight quantized along axis {got}, output channels are axis {want}"
                )
    return problems


def _through_data_movement(name: str, readers: dict[str, list[onnx.NodeProto]]) -> list[onnx.NodeProto]:
    found = []
    for r in readers.get(name, []):
        if r.op_type in DATA_MOVEMENT:
            found += _through_data_movement(r.output[0], readers)
        else:
            found.append(r)
    return found
