"""MatMul + Add -> Gemm where legal: 2-D A, constant 2-D B, and a bias broadcastable to [N]."""

from __future__ import annotations

import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import bypass, const, copy_type, is_op, single_consumer


class FuseMatMulAdd(GraphPass):
    name = "fuse_matmul_add"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for mm in list(model.graph):
            if not is_op(mm, "MatMul") or mm.graph is None:
                continue
            add = single_consumer(mm.outputs[0])
            if not is_op(add, "Add"):
                continue
            a, b = mm.inputs
            weight = const(b)
            bias_value = add.inputs[1] if add.inputs[0] is mm.outputs[0] else add.inputs[0]
            bias = const(bias_value)
            if (
                a is None
                or weight is None
                or bias is None
                or weight.ndim != 2
                or a.shape is None
                or len(a.shape) != 2
            ):
                continue
            if bias.ndim > 1 or (bias.size not in (1, weight.shape[1])) or bias.dtype != weight.dtype:
                self.skip(add, "bias does not broadcast to [N]")
                continue
            gemm = ir.Node("", "Gemm", [a, b, bias_value], num_outputs=1, name=f"{mm.name}_gemm")
            copy_type(add.outputs[0], gemm.outputs[0])
            mm.graph.insert_before(mm, gemm)
            if bypass(add, gemm.outputs[0]):
                mm.graph.remove(mm, safe=True)
                count += 1
            else:
                mm.graph.remove(gemm, safe=True)
        return count
