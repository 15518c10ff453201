"""Each pass on a small inline model: the exact rewrite, numeric parity, and no-match behaviour."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graph_helpers import apply, assert_same, ops, parse

from modelkiln.graph.passes.collapse_reshapes import CollapseReshapes
from modelkiln.graph.passes.cse import CommonSubexpressions
from modelkiln.graph.passes.eliminate_noops import EliminateNoOps
from modelkiln.graph.passes.fold_constants import FoldConstants
from modelkiln.graph.passes.fuse_conv_affine import FuseConvAffine
from modelkiln.graph.passes.fuse_conv_bn import FuseConvBatchNorm
from modelkiln.graph.passes.fuse_gelu_ort import FuseGeluOrt
from modelkiln.graph.passes.fuse_matmul_add import FuseMatMulAdd
from modelkiln.graph.passes.fuse_pad_conv import FusePadConv
from modelkiln.graph.passes.merge_parallel_linears import MergeParallelLinears
from modelkiln.graph.passes.remove_dead import RemoveDead
from modelkiln.graph.passes.simplify_shapes import SimplifyShapes
from modelkiln.graph.pipeline import DEFAULT_PIPELINE

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _conv_model(after: str, extra_init: str = "") -> str:
    return f"""{HEADER}
    g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y)
    <float[3, 2, 3, 3] w = {{{", ".join(str(v / 10) for v in range(-27, 27))}}},
     float[3] b = {{0.1, -0.2, 0.3}}{extra_init}>
    {{
      c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
      {after}
    }}"""


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


def test_fuse_conv_bn(rng: np.random.Generator) -> None:
    model = parse(
        _conv_model(
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
        _conv_model(
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


def test_fuse_conv_mul_add(rng: np.random.Generator) -> None:
    model = parse(
        _conv_model(
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
    model = parse(_conv_model("y = Mul (c, s)", ", float[1, 1, 5] s = {1, 2, 3, 4, 5}"))
    assert not FuseConvAffine()(model).modified


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


def test_collapse_reshapes(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[2, 3, 4] x) => (float[4, 6] y)
    <int64[2] s1 = {{6, 4}}, int64[1] ax = {{0}}, int64[2] s2 = {{4, 6}}>
    {{ a = Reshape (x, s1)
       b = Unsqueeze (a, ax)
       c = Flatten <axis = 1> (b)
       y = Reshape (c, s2) }}""")
    n, before, after = apply(
        CollapseReshapes(), model, {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n >= 1 and ops(model) == ["Reshape"]
    assert_same(before, after)


def test_simplify_shapes_makes_dynamic_reshape_constant(rng: np.random.Generator) -> None:
    model = parse(f"""{HEADER}
    g (float[N, 6, 4] x) => (float[N, 24] y)
    <int64[1] zero = {{0}}, int64[1] last = {{24}}>
    {{ s = Shape (x)
       n = Gather <axis = 0> (s, zero)
       shape = Concat <axis = 0> (n, last)
       y = Reshape (x, shape) }}""")
    n, before, after = apply(
        SimplifyShapes(), model, {"x": rng.standard_normal((3, 6, 4)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n == 1 and ops(model) == ["Reshape"]
    assert list(model.graph.node(0).inputs[1].const_value.numpy()) == [-1, 24]
    assert_same(before, after)


def test_simplify_shapes_copies_proven_dims_for_a_head_split(rng: np.random.Generator) -> None:
    """[B, S, 8] -> [B, S, 2, 4] with B and S both dynamic: dims equal to the input's become 0."""
    model = parse(f"""{HEADER}
    g (float[B, S, 8] x) => (float[B, S, 2, 4] y)
    <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[2] heads = {{2, 4}}>
    {{ s = Shape (x)
       b = Gather <axis = 0> (s, zero)
       t = Gather <axis = 0> (s, one)
       shape = Concat <axis = 0> (b, t, heads)
       y = Reshape (x, shape) }}""")
    n, before, after = apply(
        SimplifyShapes(), model, {"x": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    )
    RemoveDead()(model)
    assert n == 1 and ops(model) == ["Reshape"]
    assert list(model.graph.node(0).inputs[1].const_value.numpy()) == [0, 0, 2, 4]
    assert_same(before, after)


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


def test_remove_dead_nodes_and_initializers() -> None:
    model = parse(f"""{HEADER}
    g (float[4] x) => (float[4] y)
    <float[4] unused = {{1, 2, 3, 4}}>
    {{ dead = Relu (x)
       y = Neg (x) }}""")
    assert RemoveDead()(model).modified
    assert ops(model) == ["Neg"] and "unused" not in model.graph.initializers


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
