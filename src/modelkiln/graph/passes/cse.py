"""Common subexpression elimination: nodes with the same op, attributes and inputs compute the
same value once; identical small constants are shared."""

from __future__ import annotations

import hashlib

import onnx_ir as ir

from modelkiln.graph.base import GraphPass
from modelkiln.ir_utils import NONDETERMINISTIC, has_subgraph, replace_value

_MAX_DEDUP_BYTES = 1 << 16


class CommonSubexpressions(GraphPass):
    name = "cse"

    def rewrite(self, model: ir.Model) -> int:
        return self._dedupe_constants(model.graph) + self._dedupe_nodes(model.graph)

    def _dedupe_constants(self, graph: ir.Graph) -> int:
        seen: dict[tuple[str, tuple[int, ...], str], ir.Value] = {}
        count = 0
        inputs = {id(v) for v in graph.inputs}
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if (
                tensor is None
                or id(value) in inputs
                or value.is_graph_output()
                or tensor.nbytes > _MAX_DEDUP_BYTES
            ):
                continue
            array = tensor.numpy()
            key = (str(array.dtype), array.shape, hashlib.sha1(array.tobytes()).hexdigest())
            if key in seen:
                ir.convenience.replace_all_uses_with(value, seen[key])
                del graph.initializers[name]
                count += 1
            else:
                seen[key] = value
        return count

    def _dedupe_nodes(self, graph: ir.Graph) -> int:
        seen: dict[tuple[object, ...], ir.Node] = {}
        count = 0
        for node in list(graph):
            if node.op_type in NONDETERMINISTIC or has_subgraph(node):
                continue
            key = (
                node.domain,
                node.op_type,
                node.overload,
                len(node.outputs),
                tuple(id(v) if v is not None else None for v in node.inputs),
                tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())),
            )
            other = seen.get(key)
            if other is None:
                seen[key] = node
                continue
            if all(
                replace_value(mine, theirs) for mine, theirs in zip(node.outputs, other.outputs, strict=True)
            ):
                if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                    graph.remove(node, safe=True)
                count += 1
        return count
