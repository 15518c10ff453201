"""FusePadConv (graph/passes/fuse_pad_conv.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.fuse_pad_conv import FusePadConv


def test_fuse_pad_conv(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[1, 2, 6, 6] x) => (float[1, 3, 3, 3] y)
    <float[3, 2, 3, 3] w = {{{", ".join(["0.1"] * 54)}}}, int64[8] p = {{0, 0, 0, 0, 0, 0, 1, 1}}>
    {{ xp = Pad (x, p)
       y = Conv <strides = [2, 2]> (xp, w) }}""")
    n, before, after = apply(
        FusePadConv(), model, {"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)}
    )
    assert n == 1 and ops(model) == ["Conv"]
    assert list(model.graph.node(0).attributes["pads"].as_ints()) == [0, 0, 1, 1]
    assert_same(before, after)
