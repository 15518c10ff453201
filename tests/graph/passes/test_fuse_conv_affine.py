"""FuseConvAffine (graph/passes/fuse_conv_affine.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import apply, assert_same, conv_model, ops, parse

from modelkiln.graph.passes.fuse_conv_affine import FuseConvAffine


def test_fuse_conv_mul_add(rng: np.random.Generator) -> None:
    model = parse(
        conv_model(
            "m = Mul (c, s)\n y = Add (k, m)",
            ", float[3, 1, 1] s = {2, -1, 0.5}, float[1, 3, 1, 1] k = {1, 2, 3}",
        )
    )
    n, before, after = apply(
        FuseConvAffine(), model, {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    )
    assert n == 2 and ops(model) == ["Conv"]
    assert_same(before, after)


def test_fuse_conv_affine_rejects_spatial_constant() -> None:
    model = parse(conv_model("y = Mul (c, s)", ", float[1, 1, 5] s = {1, 2, 3, 4, 5}"))
    assert not FuseConvAffine()(model).modified
