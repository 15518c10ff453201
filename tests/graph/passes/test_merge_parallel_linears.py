"""MergeParallelLinears (graph/passes/merge_parallel_linears.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.merge_parallel_linears import MergeParallelLinears
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_merge_parallel_linears_merges_qkv_with_biases(rng: np.random.Generator) -> None:
    w = ", ".join(str(v) for v in rng.standard_normal(12).round(3))
    model = parse(f"""{HEADER}
    g (float[B, S, 3] x) => (float[B, S, 4] qr, float[B, S, 2] kr, float[B, S, 4] r)
    <float[3, 4] wq = {{{w}}}, float[3, 2] wk = {{1, 2, 3, 4, 5, 6}}, float[3, 4] wv = {{{w}}},
     float[4] bq = {{1, 2, 3, 4}}, float[2] bk = {{-1, 1}}, float[4] bv = {{0, 1, 0, 1}}>
    {{ mq = MatMul (x, wq)
       q = Add (mq, bq)
       mk = MatMul (x, wk)
       k = Add (bk, mk)
       mv = MatMul (x, wv)
       v = Add (mv, bv)
       qr = Relu (q)
       kr = Relu (k)
       r = Relu (v) }}""")
    feed = {"x": rng.standard_normal((2, 5, 3)).astype(np.float32)}
    n, before, after = apply(MergeParallelLinears(), model, feed)
    RemoveDead()(model)
    assert n == 1 and sorted(ops(model)) == ["Add", "MatMul", "Relu", "Relu", "Relu", "Split"]
    assert_same(before, after)


def test_merge_parallel_linears_leaves_a_lone_linear() -> None:
    model = parse(f"""{HEADER}
    g (float[N, 3] x) => (float[N, 2] y)
    <float[3, 2] w = {{1, 2, 3, 4, 5, 6}}>
    {{ y = MatMul (x, w) }}""")
    assert not MergeParallelLinears()(model).modified
