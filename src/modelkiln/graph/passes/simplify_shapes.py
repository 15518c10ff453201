"""Shape simplification: a Reshape whose target shape is computed at run time (Shape -> Gather ->
Concat …) gets a constant shape when shape inference knows every output dim but at most one
(which becomes -1). The shape arithmetic is then dead and removed by later passes."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from modelkiln.graph.base import GraphPass
from modelkiln.graph.ir_utils import attr_int, const, is_op, new_initializer
from modelkiln.graph.passes.collapse_reshapes import target_shape


class SimplifyShapes(GraphPass):
    name = "simplify_shapes"

    def rewrite(self, model: ir.Model) -> int:
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        count = 0
        for node in list(model.graph):
            if not is_op(node, "Reshape") or node.graph is None or const(node.inputs[1]) is not None:
                continue
            shape = target_shape(node.outputs[0])
            if shape is None:
                self.skip(node, "output shape has more than one unknown dim")
                continue
            if attr_int(node, "allowzero", 0) and 0 in shape:
                continue
            node.replace_input_with(1, new_initializer(model.graph, shape, f"{node.name or 'reshape'}_shape"))
            count += 1
        return count
