"""CommonSubexpressions (graph/passes/cse.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.cse import CommonSubexpressions
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_cse_merges_duplicates(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[4] x) => (float[4] y)
    <float[1] k1 = {{2.0}}, float[1] k2 = {{2.0}}>
    {{ a = Mul (x, k1)
       b = Mul (x, k2)
       y = Add (a, b) }}""")
    n, before, after = apply(CommonSubexpressions(), model, {"x": rng.standard_normal(4).astype(np.float32)})
    RemoveDead()(model)
    assert n == 2 and ops(model) == ["Mul", "Add"]
    assert_same(before, after)
