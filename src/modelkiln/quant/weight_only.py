"""Weight-only INT8: int8 per-channel weights behind DequantizeLinear, activations stay float.

For decoder-style models whose activations must stay float (and for memory-bound layers where the
weight bytes, not the arithmetic, set the speed): the file shrinks ~4x on its linear weights, no
calibration data is needed, and no activation is ever quantized.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from modelkiln.quant.config import PerChannel, QuantConfig, WeightKernel
from modelkiln.quant.matmul_nbits import quantize_matmul_nbits
from modelkiln.quant.qdq import quantize_weight
from modelkiln.quant.rules import rule_for


def quantize_weights_only(model: ir.Model, config: QuantConfig) -> tuple[Counter[str], dict[str, str]]:
    """Quantize the constant weights of every Conv/Gemm/MatMul in place; returns counts by op type
    and the nodes left alone with the reason. With the MATMUL_NBITS kernel, MatMuls with a 2-D
    constant weight become MatMulNBits; the other weighted ops use DequantizeLinear."""
    counts: Counter[str] = Counter()
    skipped: dict[str, str] = {}
    if config.weight_kernel is WeightKernel.MATMUL_NBITS:
        fused = quantize_matmul_nbits(model, config.block_size, config.exclude)
        if fused:
            counts["MatMul"] += fused
    shared: dict[tuple[int, int | None], ir.Value] = {}
    per_channel = isinstance(config.weights, PerChannel)
    for node in list(model.graph):
        rule = rule_for(node)
        if rule is None or rule.weight is None:
            continue
        if node.name in config.exclude:
            skipped[node.name] = "excluded by user"
            continue
        idx, axis = rule.weight
        key = (id(node.inputs[idx]), axis if per_channel else None)
        if key in shared:
            node.replace_input_with(idx, shared[key])
        else:
            shared[key] = quantize_weight(model.graph, node, idx, key[1])[0]
        counts[node.op_type] += 1
    model.graph.sort()
    return counts, skipped
