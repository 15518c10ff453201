"""Conv followed by a per-output-channel constant Mul or Add -> Conv with scaled weight / shifted bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.graph.passes.fuse_conv_bn import conv_params, set_conv_params
from modelkiln.ir_utils import bypass, const, is_op, producer, single_consumer


def per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a [channels] vector if it broadcasts only along the channel axis of an NC... tensor."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


class FuseConvAffine(GraphPass):
    name = "fuse_conv_affine"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for node in list(model.graph):
            if node.graph is None or not (is_op(node, "Mul") or is_op(node, "Add")):
                continue
            for i, j in ((0, 1), (1, 0)):
                conv = producer(node.inputs[i])
                c = const(node.inputs[j])
                if not is_op(conv, "Conv") or c is None or single_consumer(conv.outputs[0]) is not node:
                    continue
                params = conv_params(conv)
                if params is None:
                    continue
                w, b = params
                vec = per_channel(c, w.shape[0], w.ndim)
                if vec is None or node.outputs[0].dtype != conv.outputs[0].dtype:
                    self.skip(node, "constant is not per-output-channel")
                    continue
                vec = vec.astype(w.dtype)
                if node.op_type == "Mul":
                    set_conv_params(model.graph, conv, w * vec.reshape(-1, *([1] * (w.ndim - 1))), b * vec)
                else:
                    set_conv_params(model.graph, conv, w, b + vec)
                if bypass(node, conv.outputs[0]):
                    count += 1
                break
        return count
