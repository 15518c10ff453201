"""CollapseReshapes (graph/passes/collapse_reshapes.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.collapse_reshapes import CollapseReshapes
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_collapse_reshapes(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[2, 3, 4] x) => (float[4, 6] y)
    <int64[2] s1 = {{6, 4}}, int64[1] ax = {{0}}, int64[2] s2 = {{4, 6}}>
    {{ a = Reshape (x, s1)
       b = Unsqueeze (a, ax)
       c = Flatten <axis = 1> (b)
       y = Reshape (c, s2) }}""")
    n, before, after = apply(
        CollapseReshapes(), model, {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n >= 1 and ops(model) == ["Reshape"]
    assert_same(before, after)
