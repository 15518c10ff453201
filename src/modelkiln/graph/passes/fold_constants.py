"""Constant folding: evaluate nodes whose inputs are all constants, including shape arithmetic on
tensors whose relevant dimensions are static (``Shape``, ``Gather``/``Slice`` of a shape, ``Size``).
Constant nodes become initializers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.reference import ReferenceEvaluator

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import (
    NONDETERMINISTIC,
    attr_int,
    const,
    has_subgraph,
    new_initializer,
    replace_value,
)

#: Never folded: nondeterministic, or Dropout (eliminate_noops removes it in inference graphs).
_NEVER = NONDETERMINISTIC | {"Dropout"}
_MAX_OUTPUT_BYTES = 4 << 20  # folding must not bloat the file with large generated tensors


class FoldConstants(GraphPass):
    name = "fold_constants"

    def rewrite(self, model: ir.Model) -> int:
        opset = model.opset_imports.get("", 17)
        count = 0
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER or has_subgraph(node):
                continue
            folded = self._fold(node, opset)
            if folded is None:
                continue
            if all(
                replace_value(out, new_initializer(model.graph, arr, out.name or "folded"))
                for out, arr in zip(node.outputs, folded, strict=True)
            ):
                if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                    model.graph.remove(node, safe=True)
                count += 1
        return count

    def _fold(self, node: ir.Node, opset: int) -> list[np.ndarray] | None:
        if node.op_type == "Constant":
            value = const(node.outputs[0])
            return None if value is None or node.outputs[0].is_graph_output() else [value]
        partial = _shape_fold(node)
        if partial is not None:
            return [partial]
        arrays = [const(v) if v is not None else None for v in node.inputs]
        if (
            any(a is None and v is not None for a, v in zip(arrays, node.inputs, strict=True))
            or not node.inputs
        ):
            return None
        try:
            outputs = _evaluate(node, arrays, opset)
        except Exception as exc:  # noqa: BLE001 - an op the reference evaluator cannot run stays as it is
            self.skip(node, f"reference evaluation failed: {exc}")
            return None
        if sum(o.nbytes for o in outputs) > max(
            _MAX_OUTPUT_BYTES, 2 * sum(a.nbytes for a in arrays if a is not None)
        ):
            self.skip(node, "folded result too large")
            return None
        return outputs


def _shape_fold(node: ir.Node) -> np.ndarray | None:
    """Shape, Size, and Gather/Slice of a Shape, when the needed dimensions are static."""
    if node.op_type == "Shape":
        dims = _dims(node.inputs[0])
        if dims is None:
            return None
        start, end = attr_int(node, "start", 0), node.attributes.get("end")
        picked = dims[start : end.as_int() if end is not None else None]
        return np.asarray(picked, np.int64) if all(d >= 0 for d in picked) else None
    if node.op_type == "Size":
        dims = _dims(node.inputs[0])
        return np.asarray(np.prod(dims), np.int64) if dims is not None and all(d >= 0 for d in dims) else None
    if node.op_type in ("Gather", "Slice") and node.inputs[0] is not None:
        src = node.inputs[0].producer()
        if src is None or src.op_type != "Shape" or src.domain not in ("", "ai.onnx"):
            return None
        dims = _dims(src.inputs[0])
        if dims is None:
            return None
        start, end = attr_int(src, "start", 0), src.attributes.get("end")
        shape = np.asarray(dims[start : end.as_int() if end is not None else None], np.int64)
        if node.op_type == "Gather":
            idx = const(node.inputs[1])
            if idx is None or attr_int(node, "axis", 0) != 0:
                return None
            selected = shape[idx]
        else:
            args = [const(v) if v is not None else None for v in node.inputs[1:]]
            if (
                any(a is None for a, v in zip(args, node.inputs[1:], strict=True) if v is not None)
                or len(args) < 2
            ):
                return None
            step = int(args[3][0]) if len(args) > 3 and args[3] is not None else 1
            if len(args) > 2 and args[2] is not None and int(args[2][0]) != 0:
                return None
            starts, ends = args[0], args[1]
            if starts is None or ends is None:
                return None
            selected = shape[int(starts[0]) : int(ends[0]) : step]
        return selected.astype(np.int64) if (np.asarray(selected) >= 0).all() else None
    return None


def _dims(value: ir.Value | None) -> list[int] | None:
    """Dims with -1 for unknown ones; None if the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else -1 for d in value.shape]


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Run one node with onnx's reference evaluator, at the model's opset."""
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    outs = [f"o{k}" for k in range(len(node.outputs))]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    graph = helper.make_graph(
        [proto],
        "fold",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, arrays, strict=True)
            if a is not None
        ],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    feeds = {n: a for n, a in zip(names, arrays, strict=True) if a is not None}
    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]
