"""Shape simplification: a Reshape whose target shape is computed at run time (Shape -> Gather ->
Concat …) gets a constant shape when shape inference knows every output dim but at most one
(which becomes -1). The shape arithmetic is then dead and removed by later passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from modelkiln.graph.base import GraphPass
from modelkiln.graph.passes.collapse_reshapes import target_shape
from modelkiln.ir_utils import attr_int, const, is_op, new_initializer


def copy_dims_shape(data: ir.Value, out: ir.Value) -> np.ndarray | None:
    """A Reshape shape using 0 ("copy this dim from the input") for symbolic output dims that shape
    inference proved equal to the input's dim at the same position (the batch and sequence axes of
    a transformer's head split), static dims as they are and -1 for at most one other."""
    if data.shape is None or out.shape is None:
        return None
    dims = []
    for j, d in enumerate(out.shape):
        if isinstance(d, int):
            dims.append(d)
        elif (
            j < len(data.shape)
            and not isinstance(data.shape[j], int)
            and str(d) == str(data.shape[j])
            and str(d)
        ):
            dims.append(0)
        else:
            dims.append(-1)
    return np.asarray(dims, np.int64) if dims.count(-1) <= 1 and 0 in dims else None


class SimplifyShapes(GraphPass):
    name = "simplify_shapes"

    def rewrite(self, model: ir.Model) -> int:
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        count = 0
        for node in list(model.graph):
            if not is_op(node, "Reshape") or node.graph is None or const(node.inputs[1]) is not None:
                continue
            shape = target_shape(node.outputs[0])
            if shape is None and not attr_int(node, "allowzero", 0) and node.inputs[0] is not None:
                shape = copy_dims_shape(node.inputs[0], node.outputs[0])
            if shape is None:
                self.skip(node, "output shape has more than one unknown dim")
                continue
            if attr_int(node, "allowzero", 0) and 0 in shape:
                continue
            node.replace_input_with(1, new_initializer(model.graph, shape, f"{node.name or 'reshape'}_shape"))
            count += 1
        return count
