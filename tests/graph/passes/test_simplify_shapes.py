"""SimplifyShapes (graph/passes/simplify_shapes.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.remove_dead import RemoveDead
from modelkiln.graph.passes.simplify_shapes import SimplifyShapes


def test_simplify_shapes_makes_dynamic_reshape_constant(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[N, 6, 4] x) => (float[N, 24] y)
    <int64[1] zero = {{0}}, int64[1] last = {{24}}>
    {{ s = Shape (x)
       n = Gather <axis = 0> (s, zero)
       shape = Concat <axis = 0> (n, last)
       y = Reshape (x, shape) }}""")
    n, before, after = apply(
        SimplifyShapes(), model, {"x": rng.standard_normal((3, 6, 4)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n == 1 and ops(model) == ["Reshape"]
    assert list(model.graph.node(0).inputs[1].const_value.numpy()) == [-1, 24]
    assert_same(before, after)


def test_simplify_shapes_copies_proven_dims_for_a_head_split(rng: np.random.Generator) -> None:
    """[B, S, 8] -> [B, S, 2, 4] with B and S both dynamic: dims equal to the input's become 0."""
    model = parse(f"""{HEADER}
    g (float[B, S, 8] x) => (float[B, S, 2, 4] y)
    <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[2] heads = {{2, 4}}>
    {{ s = Shape (x)
       b = Gather <axis = 0> (s, zero)
       t = Gather <axis = 0> (s, one)
       shape = Concat <axis = 0> (b, t, heads)
       y = Reshape (x, shape) }}""")
    n, before, after = apply(
        SimplifyShapes(), model, {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n == 1 and ops(model) == ["Reshape"]
    assert list(model.graph.node(0).inputs[1].const_value.numpy()) == [0, 0, 2, 4]
    assert_same(before, after)
