"""GELU (x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it) -> one Gelu node.

Standard ``Gelu`` when the model's opset is >= 20; otherwise ONNX Runtime's ``com.microsoft.Gelu``,
so this pass runs only with ``--target ort``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import bypass, const, copy_type, is_op, single_consumer


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _is_const(value: ir.Value | None, target: float) -> bool:
    c = const(value)
    return (
        c is not None and c.size == 1 and math.isclose(float(np.asarray(c).reshape(())), target, rel_tol=1e-4)
    )


class FuseGeluOrt(GraphPass):
    name = "fuse_gelu_ort"
    targets = frozenset({"ort"})

    def rewrite(self, model: ir.Model) -> int:
        standard = model.opset_imports.get("", 0) >= 20
        count = 0
        for div in list(model.graph):
            matched = self._match(div)
            graph = div.graph
            if matched is None or graph is None:
                continue
            x, last = matched
            gelu = ir.Node(
                "" if standard else "com.microsoft", "Gelu", [x], num_outputs=1, name=f"{div.name}_gelu"
            )
            copy_type(last.outputs[0], gelu.outputs[0])
            graph.insert_before(div, gelu)
            if bypass(last, gelu.outputs[0]):
                count += 1
                if not standard:
                    model.opset_imports.setdefault("com.microsoft", 1)
            else:
                graph.remove(gelu, safe=True)
        return count

    def _match(self, div: ir.Node) -> tuple[ir.Value, ir.Node] | None:
        """Div(x, sqrt2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), in either Mul order."""
        if not is_op(div, "Div") or div.graph is None or not _is_const(div.inputs[1], math.sqrt(2)):
            return None
        x = div.inputs[0]
        erf = single_consumer(div.outputs[0])
        if x is None or not is_op(erf, "Erf"):
            return None
        add = single_consumer(erf.outputs[0])
        if not is_op(add, "Add") or not _is_const(_other(add, erf.outputs[0]), 1.0):
            return None
        mul1 = single_consumer(add.outputs[0])
        if not is_op(mul1, "Mul"):
            return None
        other = _other(mul1, add.outputs[0])
        if other is x:  # x * (1 + erf) then * 0.5
            mul2 = single_consumer(mul1.outputs[0])
            if is_op(mul2, "Mul") and _is_const(_other(mul2, mul1.outputs[0]), 0.5):
                return x, mul2
            return None
        half = other.producer() if other is not None else None  # (x * 0.5) * (1 + erf)
        if is_op(half, "Mul") and x in half.inputs and _is_const(_other(half, x), 0.5):
            return x, mul1
        return None
