"""FoldConstants (graph/passes/fold_constants.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.fold_constants import FoldConstants
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_fold_constants_folds_arithmetic_and_static_shape(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[N, 4] x) => (float[N, 4] y)
    <float[4] a = {{1, 2, 3, 4}}, float[4] b = {{2, 2, 2, 2}}, int64[1] one = {{1}}>
    {{
      ab = Mul (a, b)
      s = Shape (x)
      d = Gather <axis = 0> (s, one)
      df = Cast <to = 1> (d)
      k = Mul (ab, df)
      y = Add (x, k)
    }}""")
    n, before, after = apply(FoldConstants(), model, {"x": rng.standard_normal((3, 4)).astype(np.float32)})
    RemoveDead()(model)
    assert n >= 4 and ops(model) == ["Add"]
    assert_same(before, after)


def test_fold_constants_keeps_dynamic_dims() -> None:
    model = parse(f"""{HEADER}
    g (float[N, 4] x) => (int64[1] y)
    <int64[1] zero = {{0}}>
    {{ s = Shape (x)
       y = Gather <axis = 0> (s, zero) }}""")
    result = FoldConstants()(model)
    assert not result.modified and ops(model) == ["Shape", "Gather"]
