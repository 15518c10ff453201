"""The contract every pass of the default pipeline keeps (graph/base.py's GraphPass): a model it
has nothing to rewrite in comes back byte for byte the same, reported as not modified."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from graph_helpers import HEADER, parse

from modelkiln.graph.pipeline import DEFAULT_PIPELINE


@pytest.mark.parametrize("pass_cls", DEFAULT_PIPELINE)
def test_pass_that_finds_nothing_leaves_model_untouched(pass_cls: type) -> None:
    text = f"""{HEADER}
    g (float[N, 4] x) => (float[N, 4] y)
    {{ r = Relu (x)
       y = Sigmoid (r) }}"""
    model = parse(text)
    before = ir.to_proto(model).SerializeToString()
    result = pass_cls()(model)
    assert not result.modified
    assert ir.to_proto(model).SerializeToString() == before
