"""RemoveDead (graph/passes/remove_dead.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

from graph_helpers import HEADER, ops, parse

from modelkiln.graph.passes.remove_dead import RemoveDead


def test_remove_dead_nodes_and_initializers() -> None:
    model = parse(f"""{HEADER}
    g (float[4] x) => (float[4] y)
    <float[4] unused = {{1, 2, 3, 4}}>
    {{ dead = Relu (x)
       y = Neg (x) }}""")
    assert RemoveDead()(model).modified
    assert ops(model) == ["Neg"] and "unused" not in model.graph.initializers
