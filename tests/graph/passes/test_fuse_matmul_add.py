"""FuseMatMulAdd (graph/passes/fuse_matmul_add.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.fuse_matmul_add import FuseMatMulAdd


def test_fuse_matmul_add_to_gemm(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[N, 3] x) => (float[N, 2] y)
    <float[3, 2] w = {{1, 2, 3, 4, 5, 6}}, float[2] b = {{0.5, -0.5}}>
    {{ m = MatMul (x, w)
       y = Add (m, b) }}""")
    n, before, after = apply(FuseMatMulAdd(), model, {"x": rng.standard_normal((4, 3)).astype(np.float32)})
    assert n == 1 and ops(model) == ["Gemm"]
    assert_same(before, after)


def test_fuse_matmul_add_needs_2d() -> None:
    model = parse(f"""{HEADER}
    g (float[N, 5, 3] x) => (float[N, 5, 2] y)
    <float[3, 2] w = {{1, 2, 3, 4, 5, 6}}, float[2] b = {{0.5, -0.5}}>
    {{ m = MatMul (x, w)
       y = Add (m, b) }}""")
    assert not FuseMatMulAdd()(model).modified
