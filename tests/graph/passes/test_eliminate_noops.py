"""EliminateNoOps (graph/passes/eliminate_noops.py): the exact rewrite, parity, no-match."""

from __future__ import annotations

import numpy as np
from graph_helpers import HEADER, apply, assert_same, ops, parse

from modelkiln.graph.passes.eliminate_noops import EliminateNoOps
from modelkiln.graph.passes.remove_dead import RemoveDead


def test_eliminate_noops(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[2, 3, 4] x) => (float[2, 3, 4] y)
    <float[1] one = {{1.0}}, float[1] zero = {{0.0}}, int64[3] same = {{2, 3, 4}}>
    {{ a = Identity (x)
       b = Mul (a, one)
       c = Add (zero, b)
       d = Reshape (c, same)
       e = Cast <to = 1> (d)
       t1 = Transpose <perm = [1, 2, 0]> (e)
       t2 = Transpose <perm = [2, 0, 1]> (t1)
       y = Relu (t2) }}""")
    n, before, after = apply(
        EliminateNoOps(), model, {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n == 6 and ops(model) == ["Relu"] and model.graph.outputs[0].name == "y"
    assert_same(before, after)


def test_noop_feeding_a_graph_output_from_a_graph_input_is_kept() -> None:
    """y = Identity(x) cannot go: the graph output would have to become the graph input."""
    model = parse(f"""{HEADER}
    g (float[4] x) => (float[4] y)
    {{ y = Identity (x) }}""")
    assert not EliminateNoOps()(model).modified and ops(model) == ["Identity"]


def test_eliminate_noops_keeps_broadcasting_mul() -> None:
    model = parse(f"""{HEADER}
    g (float[3] x) => (float[2, 3] y)
    <float[2, 3] ones = {{1, 1, 1, 1, 1, 1}}>
    {{ y = Mul (x, ones) }}""")
    assert not EliminateNoOps()(model).modified


def test_a_graph_output_keeps_its_declared_shape_when_its_noop_goes() -> None:
    """y = Identity(u), u from an op shape inference does not know (no shape): removing the
    Identity renames u to y, and y's declared type and shape must stay (ONNX's checker requires a
    graph output's shape; the quantizer checks every model it writes)."""
    import onnx
    import onnx_ir as ir

    model = parse(f"""{HEADER}
    g (float[2, 3] x) => (float[2, 3] y)
    {{ u = Relu (x)
       y = Identity (u) }}""")
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].shape = None  # as a com.microsoft op's output after shape inference
    relu.outputs[0].type = None
    assert EliminateNoOps()(model).modified and ops(model) == ["Relu"]
    out = model.graph.outputs[0]
    assert out.name == "y" and out.shape == ir.Shape([2, 3]) and out.dtype == ir.DataType.FLOAT
    onnx.checker.check_model(ir.to_proto(model))
