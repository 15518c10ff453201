"""Per-op quantization rules, keyed by (domain, op_type): which inputs are activations to quantize,
which is a weight (and its channel axis), which a bias, and how the output is treated.

Outputs are quantized when a consumer asks for them (its activation inputs), so an op whose result
only feeds float ops stays float. ``via_activation`` ops (Conv, Gemm, MatMul, Add) also quantize their
output when it goes through a float activation (SiLU, ReLU, Clip) into quantized consumers, so ONNX
Runtime can still use its integer kernel for them. ``same`` ops (MaxPool, Resize, Concat) share one
scale between inputs and output, which integer kernels need and which loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from modelkiln.ir_utils import attr_int, const


@dataclass(frozen=True)
class OpRule:
    activations: tuple[int, ...]
    weight: tuple[int, int] | None = None  # (input index, channel axis)
    bias: int | None = None
    output: str = "consumers"  # "consumers" | "via_activation" | "same"


def _conv(node: ir.Node) -> OpRule | None:
    w = const(node.inputs[1])
    if w is None or w.dtype.kind != "f":
        return None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and const(node.inputs[2]) is not None
    return OpRule(
        (0,), (1, 1 if node.op_type == "ConvTranspose" else 0), 2 if has_bias else None, "via_activation"
    )


def _gemm(node: ir.Node) -> OpRule | None:
    w = const(node.inputs[1])
    if w is None or w.ndim != 2 or attr_int(node, "transA", 0) or w.dtype.kind != "f":
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b = const(bias) if bias is not None else None
    ok_bias = (
        b is not None
        and b.ndim == 1
        and b.size == (w.shape[0] if attr_int(node, "transB", 0) else w.shape[1])
    )
    return OpRule(
        (0,), (1, 0 if attr_int(node, "transB", 0) else 1), 2 if ok_bias else None, "via_activation"
    )


def _matmul(node: ir.Node) -> OpRule | None:
    w = const(node.inputs[1])
    if w is None:
        return OpRule((0, 1), None, None, "via_activation") if const(node.inputs[0]) is None else None
    if w.ndim != 2 or w.dtype.kind != "f":
        return None
    return OpRule((0,), (1, 1), None, "via_activation")


def _binary(node: ir.Node) -> OpRule | None:
    """Residual Add of two activations (QLinearAdd); like Conv it may feed a ReLU that it absorbs."""
    return OpRule((0, 1), output="via_activation") if all(const(v) is None for v in node.inputs) else None


def _same(node: ir.Node) -> OpRule | None:
    if node.op_type == "Resize":
        mode = node.attributes.get("mode")
        if mode is not None and mode.as_string() != "nearest":
            return None
    return OpRule((0,), output="same")


def _concat(node: ir.Node) -> OpRule | None:
    if any(const(v) is not None for v in node.inputs):
        return None
    return OpRule(tuple(range(len(node.inputs))), output="same")


def _pool(node: ir.Node) -> OpRule | None:
    return OpRule((0,))


def _elementwise(node: ir.Node) -> OpRule | None:
    """Sigmoid and activation*activation Mul (SiLU) as QLinearSigmoid/QLinearMul: opt-in."""
    if any(const(v) is not None for v in node.inputs):
        return None
    return OpRule(tuple(range(len(node.inputs))))


#: Rules used only when QuantConfig.int8_silu is set.
SILU_RULES: dict[tuple[str, str], Callable[[ir.Node], OpRule | None]] = {
    ("", "Sigmoid"): _elementwise,
    ("", "Mul"): _elementwise,
}

RULES: dict[tuple[str, str], Callable[[ir.Node], OpRule | None]] = {
    ("", "Conv"): _conv,
    ("", "ConvTranspose"): _conv,
    ("", "Gemm"): _gemm,
    ("", "MatMul"): _matmul,
    ("", "Add"): _binary,
    ("", "Concat"): _concat,
    ("", "MaxPool"): _same,
    ("", "Resize"): _same,
    ("", "AveragePool"): _pool,
    ("", "GlobalAveragePool"): _pool,
}

#: Float activations a quantized Conv/Gemm/MatMul output may pass through (kept in float).
ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "Mul", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh"}

#: Ops that only move data: quantized tensors pass through them unchanged.
DATA_MOVEMENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather"}


def is_transformer(model: ir.Model) -> bool:
    """Transformer blocks present: a linear layer reading a LayerNorm, and an attention Softmax."""
    ops = {n.op_type for n in model.graph}
    if "Softmax" not in ops:
        return False
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and node.inputs[0] is not None:
            producer = node.inputs[0].producer()
            if producer is not None and producer.op_type in (
                "LayerNormalization",
                "SimplifiedLayerNormalization",
            ):
                return True
    return False


def transformer_defaults(model: ir.Model, forced: bool | None) -> bool:
    """Whether transformer defaults apply: as forced (QuantConfig.transformer), else detected."""
    return is_transformer(model) if forced is None else forced


def is_attention_matmul(node: ir.Node) -> bool:
    """MatMul of two activations (scores = Q @ K^T, context = P @ V)."""
    return node.op_type == "MatMul" and all(const(v) is None for v in node.inputs)


#: GELU as one op, or the ops its erf/tanh formula ends in.
_GELU_OPS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}


def is_ffn_down(node: ir.Node) -> bool:
    """A linear layer reading a GELU output (the FFN down-projection of a transformer block): the
    GELU output is where trained transformers keep a few channels 10-20x larger than the rest, so
    one per-tensor 8-bit scale for it wastes most of its levels (see docs/quantization.md)."""
    if node.op_type not in ("MatMul", "Gemm") or node.inputs[0] is None:
        return False
    producer = node.inputs[0].producer()
    while producer is not None and producer.op_type in DATA_MOVEMENT:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if producer is None:
        return False
    if producer.op_type in _GELU_OPS:
        return True
    if producer.op_type != "Mul":  # x * 0.5 * (1 + erf(x / sqrt 2)), or the tanh approximation
        return False
    seen, frontier = 0, [producer]
    while frontier and seen < 8:
        n = frontier.pop()
        seen += 1
        if n.op_type in ("Erf", "Tanh"):
            return True
        frontier += [p for v in n.inputs if v is not None and (p := v.producer()) is not None]
    return False


def rule_for(node: ir.Node, int8_silu: bool = False) -> OpRule | None:
    key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
    fn = RULES.get(key) or (SILU_RULES.get(key) if int8_silu else None)
    return fn(node) if fn is not None else None
