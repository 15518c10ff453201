"""Dead code removal: nodes none of whose outputs are used, and initializers nobody reads."""

from __future__ import annotations

import onnx_ir as ir

from modelkiln.graph.base import GraphPass


class RemoveDead(GraphPass):
    name = "remove_dead"

    def rewrite(self, model: ir.Model) -> int:
        graph, count = model.graph, 0
        for node in reversed(list(graph)):
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                count += 1
        inputs = {id(v) for v in graph.inputs}
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and id(value) not in inputs:
                del graph.initializers[name]
                count += 1
        return count
