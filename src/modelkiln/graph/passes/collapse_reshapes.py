"""Chains of Reshape/Flatten/Squeeze/Unsqueeze collapse into one Reshape.

Reshape(Reshape(x, s1), s2) is Reshape(x, s2) whenever s2 is constant and has no 0 ("copy this
dim") entries. A shape-changing op whose output shape is static, or has a single unknown dim,
following another such op, is rewritten as one Reshape of the first op's input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import (
    attr_int,
    bypass,
    const,
    copy_type,
    new_initializer,
    remove,
    single_consumer,
)

_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def target_shape(value: ir.Value) -> np.ndarray | None:
    """A Reshape shape for ``value``: its static dims, with -1 for at most one unknown dim."""
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) else -1 for d in value.shape]
    if dims.count(-1) > 1 or 0 in dims:
        return None
    return np.asarray(dims, np.int64)


class CollapseReshapes(GraphPass):
    name = "collapse_reshapes"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for node in list(model.graph):
            if node.graph is None or node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx"):
                continue
            first = node.inputs[0].producer() if node.inputs[0] is not None else None
            if first is None or first.op_type not in _SHAPE_OPS or first.domain not in ("", "ai.onnx"):
                continue
            if single_consumer(first.outputs[0]) is not node:
                continue
            shape = self._shape_for(node)
            if shape is None:
                continue
            shape_value = (
                node.inputs[1]
                if node.op_type == "Reshape" and const(node.inputs[1]) is not None
                else (new_initializer(model.graph, shape, f"{node.name or 'reshape'}_shape"))
            )
            reshape = ir.Node(
                "", "Reshape", [first.inputs[0], shape_value], num_outputs=1, name=f"{node.name}_collapsed"
            )
            out = node.outputs[0]
            copy_type(out, reshape.outputs[0])
            node.graph.insert_before(node, reshape)
            if bypass(node, reshape.outputs[0]):
                if not first.outputs[0].uses():
                    remove(first)
                count += 1
            else:
                node.graph.remove(reshape, safe=True)
        return count

    def _shape_for(self, node: ir.Node) -> np.ndarray | None:
        if node.op_type == "Reshape":
            shape = const(node.inputs[1])
            if shape is not None and attr_int(node, "allowzero", 0) == 0 and 0 not in shape:
                return shape.astype(np.int64)
        return target_shape(node.outputs[0])
