"""Sibling linears -> one: MatMuls that read the same activation with constant [K, N_i] weights
(a transformer's Q, K and V projections) become one MatMul over the concatenated weights, their
bias Adds one Add, then a Split: one larger GEMM instead of three small ones, and five fewer
nodes per attention block (what matters at short sequence lengths, where per-node overhead rules).

    MatMul(x, Wq) + bq, MatMul(x, Wk) + bk, MatMul(x, Wv) + bv
      ->  Split(MatMul(x, [Wq Wk Wv]) + [bq bk bv], [Nq, Nk, Nv], axis=-1)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import const, copy_type, is_op, new_initializer, single_consumer

#: (weight, bias Add, bias) of one linear; the last two are both None without a bias
Linear = tuple[np.ndarray, ir.Node | None, np.ndarray | None]


def _linear(node: ir.Node) -> Linear | None:
    """(weight, bias Add, bias) of a MatMul with a constant 2-D float weight."""
    w = const(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f" or node.outputs[0].is_graph_output():
        return None
    add = single_consumer(node.outputs[0])
    if not is_op(add, "Add") or add.outputs[0].is_graph_output():
        return w, None, None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    b = const(other)
    if b is None or b.shape != (w.shape[1],) or b.dtype != w.dtype:
        return w, None, None
    return w, add, b


class MergeParallelLinears(GraphPass):
    name = "merge_parallel_linears"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for value in [v for n in list(model.graph) for v in n.outputs] + list(model.graph.inputs):
            siblings = [u.node for u in value.uses() if is_op(u.node, "MatMul") and u.idx == 0]
            linears = [(n, _linear(n)) for n in dict.fromkeys(siblings)]
            found = [(n, f) for n, f in linears if f is not None]
            if len(found) < 2 or len({f[0].shape[0] for _, f in found}) != 1:
                continue
            if len({f[0].dtype for _, f in found}) != 1:
                continue
            with_bias = all(f[1] is not None for _, f in found)
            self._merge(model.graph, value, found, with_bias)
            count += 1
        return count

    @staticmethod
    def _merge(graph: ir.Graph, x: ir.Value, found: list[tuple[ir.Node, Linear]], with_bias: bool) -> None:
        nodes = [n for n, _ in found]
        widths = [f[0].shape[1] for _, f in found]
        w = new_initializer(
            graph, np.concatenate([f[0] for _, f in found], axis=1), f"{nodes[0].name}_merged_w"
        )
        mm = ir.Node("", "MatMul", [x, w], num_outputs=1, name=f"{nodes[0].name}_merged")
        new = [mm]
        out = mm.outputs[0]
        if with_bias:
            biases = [f[2] for _, f in found if f[2] is not None]  # all of them: with_bias
            b = new_initializer(graph, np.concatenate(biases), f"{nodes[0].name}_merged_b")
            add = ir.Node("", "Add", [out, b], num_outputs=1, name=f"{nodes[0].name}_merged_bias")
            new.append(add)
            out = add.outputs[0]
        sizes = new_initializer(graph, np.asarray(widths, np.int64), f"{nodes[0].name}_split")
        split = ir.Node(
            "",
            "Split",
            [out, sizes],
            attributes={"axis": ir.Attr("axis", ir.AttributeType.INT, -1)},
            num_outputs=len(found),
            name=f"{nodes[0].name}_split",
        )
        new.append(split)
        graph.insert_before(nodes[0], new)
        for i, (node, (_, bias_add, _)) in enumerate(found):
            old = bias_add.outputs[0] if with_bias and bias_add is not None else node.outputs[0]
            copy_type(old, split.outputs[i])
            ir.convenience.replace_all_uses_with(old, split.outputs[i])
            if with_bias and bias_add is not None:
                graph.remove(bias_add, safe=True)
            graph.remove(node, safe=True)
        graph.sort()
