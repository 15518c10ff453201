"""Conv + BatchNormalization -> Conv: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import bypass, const, is_op, new_initializer, producer, single_consumer


def conv_params(conv: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Constant (weight, bias) of a Conv, bias zeros when absent; None if the weight is not constant."""
    w = const(conv.inputs[1])
    if w is None:
        return None
    b = (
        const(conv.inputs[2])
        if len(conv.inputs) > 2 and conv.inputs[2] is not None
        else np.zeros(w.shape[0], w.dtype)
    )
    return (w, b) if b is not None else None


def set_conv_params(graph: ir.Graph, conv: ir.Node, w: np.ndarray, b: np.ndarray) -> None:
    weight = conv.inputs[1]
    conv.replace_input_with(
        1, new_initializer(graph, w, (weight.name if weight is not None else None) or "w")
    )
    bias = new_initializer(graph, b, f"{conv.name or 'conv'}_bias")
    if len(conv.inputs) > 2:
        conv.replace_input_with(2, bias)
    else:
        conv.resize_inputs(3)
        conv.replace_input_with(2, bias)


class FuseConvBatchNorm(GraphPass):
    name = "fuse_conv_bn"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for bn in list(model.graph):
            if (
                not is_op(bn, "BatchNormalization")
                or bn.graph is None
                or len(bn.outputs) > 1
                and any(o.uses() for o in bn.outputs[1:])
            ):
                continue
            conv = producer(bn.inputs[0])
            if not is_op(conv, "Conv") or single_consumer(conv.outputs[0]) is not bn:
                continue
            params = conv_params(conv)
            gamma, beta, mean, var = (const(v) for v in bn.inputs[1:5])
            if params is None or gamma is None or beta is None or mean is None or var is None:
                self.skip(bn, "non-constant conv weight or batch-norm statistics")
                continue
            w, b = params
            eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
            scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(w.dtype)
            w2 = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            b2 = ((b - mean) * scale + beta).astype(w.dtype)
            set_conv_params(model.graph, conv, w2, b2)
            if bypass(bn, conv.outputs[0]):
                count += 1
        return count
