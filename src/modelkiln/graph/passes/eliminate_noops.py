"""No-op elimination: Identity, Dropout, x*1, x+0, x-0, x/1, Reshape to the same static shape, Cast
to the same type, Transpose with identity permutation and Transpose pairs that cancel."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import (
    attr_ints,
    bypass,
    const,
    is_op,
    producer,
    remove,
    single_consumer,
    static_shape,
)

_NEUTRAL = {"Mul": (1, 1), "Div": (1, None), "Add": (0, 0), "Sub": (0, None)}  # (rhs neutral, lhs neutral)


class EliminateNoOps(GraphPass):
    name = "eliminate_noops"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for node in list(model.graph):
            if node.graph is None or node.domain not in ("", "ai.onnx"):
                continue
            keep = self._passthrough(node)
            if (
                keep is not None
                and bypass(node, keep)
                or node.op_type == "Transpose"
                and self._cancel_pair(node)
            ):
                count += 1
        return count

    def _passthrough(self, node: ir.Node) -> ir.Value | None:
        """The input the node returns unchanged, if it is a no-op."""
        op, x = node.op_type, node.inputs[0] if node.inputs else None
        if x is None:
            return None
        if op == "Identity":
            return x
        if op == "Dropout" and (len(node.outputs) < 2 or not node.outputs[1].uses()):
            return x
        if op == "Cast" and x.dtype is not None and node.attributes["to"].as_int() == x.dtype.value:
            return x
        if op == "Transpose":
            perm = attr_ints(node, "perm")
            return x if perm is not None and list(perm) == sorted(perm) else None
        if op == "Reshape":
            shape, out = static_shape(x), static_shape(node.outputs[0])
            return x if shape is not None and shape == out else None
        if op in _NEUTRAL:
            return self._neutral_operand(node)
        return None

    def _neutral_operand(self, node: ir.Node) -> ir.Value | None:
        """For x op c with c all neutral (and broadcasting not growing x), return x."""
        rhs_neutral, lhs_neutral = _NEUTRAL[node.op_type]
        a, b = node.inputs
        for x, c, neutral in ((a, b, rhs_neutral), (b, a, lhs_neutral)):
            value = const(c)
            if x is None or neutral is None or value is None or not np.all(value == neutral):
                continue
            x_shape, out_shape = x.shape, node.outputs[0].shape
            if x_shape is None or out_shape is None or tuple(x_shape) != tuple(out_shape):
                continue  # broadcasting would change the shape
            if x.dtype is not None and node.outputs[0].dtype is not None and x.dtype != node.outputs[0].dtype:
                continue
            return x
        return None

    def _cancel_pair(self, node: ir.Node) -> bool:
        """Transpose(Transpose(x, p), q) with p∘q the identity -> x."""
        first = producer(node.inputs[0])
        if not is_op(first, "Transpose") or single_consumer(first.outputs[0]) is not node:
            return False
        p, q = attr_ints(first, "perm"), attr_ints(node, "perm")
        if p is None or q is None or [p[i] for i in q] != list(range(len(p))):
            return False
        source = first.inputs[0]
        if source is None or not bypass(node, source):
            return False
        if not first.outputs[0].uses():
            remove(first)
        return True
