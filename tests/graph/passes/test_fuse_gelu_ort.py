"""FuseGeluOrt (graph/passes/fuse_gelu_ort.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, parse

from modelkiln.graph.passes.fuse_gelu_ort import FuseGeluOrt
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_gelu_fusion_for_ort(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[2, 8] x) => (float[2, 8] y)
    <float[1] s = {{1.4142135}}, float[1] one = {{1.0}}, float[1] half = {{0.5}}>
    {{ d = Div (x, s)
       e = Erf (d)
       a = Add (e, one)
       m = Mul (x, a)
       y = Mul (m, half) }}""")
    n, before, after = apply(FuseGeluOrt(), model, {"x": rng.standard_normal((2, 8)).astype(np.float32)})
    RemoveDead()(model)
    assert n == 1 and [(nd.domain, nd.op_type) for nd in model.graph] == [("com.microsoft", "Gelu")]
    assert_same(before, after, atol=1e-5)
