"""FuseConvBatchNorm (graph/passes/fuse_conv_bn.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
import pytest
from graph_helpers import apply, assert_same, conv_model, ops, parse

from modelkiln.graph.passes.fuse_conv_bn import FuseConvBatchNorm


def test_fuse_conv_bn(rng: np.random.Generator) -> None:
    model = parse(
        conv_model(
            "y = BatchNormalization <epsilon = 0.001> (c, g, beta, m, v)",
            ", float[3] g = {1.5, 0.5, 2.0}, float[3] beta = {0.1, 0.2, -0.3}, float[3] m = {0.5, -1, 0},"
            " float[3] v = {1.0, 4.0, 0.25}",
        )
    )
    n, before, after = apply(
        FuseConvBatchNorm(), model, {"x": rng.standard_normal((2, 2, 5, 5)).astype(np.float32)}
    )
    assert n == 1 and ops(model) == ["Conv"]
    assert_same(before, after)


@pytest.mark.parametrize(
    ("epsilon_attr", "variances"),
    [
        # eps 0.5 against variances 0.01-0.1: sqrt(v + eps) is 2-7x sqrt(v + 1e-5) or sqrt(v).
        ("<epsilon = 0.5> ", "0.01, 0.05, 0.1"),
        # No attribute: the ONNX default 1e-5 must be used, which matters against variances ~1e-5.
        ("", "0.00001, 0.00002, 0.000005"),
    ],
    ids=["epsilon-0.5", "default-epsilon"],
)
def test_fuse_conv_bn_uses_the_models_epsilon(
    rng: np.random.Generator, epsilon_attr: str, variances: str
) -> None:
    model = parse(
        conv_model(
            f"y = BatchNormalization {epsilon_attr}(c, g, beta, m, v)",
            ", float[3] g = {1.5, 0.5, 2.0}, float[3] beta = {0.1, 0.2, -0.3}, float[3] m = {0.5, -1, 0},"
            f" float[3] v = {{{variances}}}",
        )
    )
    n, before, after = apply(
        FuseConvBatchNorm(), model, {"x": rng.standard_normal((2, 2, 5, 5)).astype(np.float32)}
    )
    assert n == 1 and ops(model) == ["Conv"]  # the BatchNormalization is gone
    want, got = before["y"], after["y"]
    # Within 1e-5 of the output's scale (both runs on ONNX Runtime with its own fusions disabled).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
