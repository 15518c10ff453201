"""The optimize verb and kiln optimize: pipeline, custom ops, subgraphs, external data, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graph_helpers import ops, parse

from modelkiln.errors import BadInput, ModelNotFound, ParityFailed
from modelkiln.export import export
from modelkiln.graph import optimize
from modelkiln.graph.manager import PassManager
from modelkiln.graph.memory_plan import TensorLife, pack, plan_memory
from modelkiln.graph.optimize import check_parity
from modelkiln.graph.passes import fuse_conv_affine
from modelkiln.graph.pipeline import build_pipeline, pass_names
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def kiln(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "modelkiln", *args], capture_output=True, text=True, check=False, env=env
    )


def test_custom_ops_are_kept_and_surroundings_optimised() -> None:
    model = parse("""<ir_version: 8, opset_import: ["" : 17, "com.acme" : 1]>
    g (float[N, 4] x) => (float[N, 4] y)
    <float[4] a = {1, 2, 3, 4}, float[4] b = {1, 1, 1, 1}>
    { k = Mul (a, b)
       i = Identity (x)
       c = com.acme.Mystery <alpha = 2.0> (i, k)
       y = Relu (c) }""")
    PassManager(build_pipeline()).run(model)
    assert ops(model) == ["Mystery", "Relu"]
    mystery = model.graph.node(0)
    assert mystery.domain == "com.acme" and mystery.attributes["alpha"].as_float() == 2.0
    assert mystery.inputs[0].name == "x"


def test_subgraph_inputs_survive_dead_code_and_folding(rng: np.random.Generator) -> None:
    text = f"""{HEADER}
    g (bool cond, float[2] x) => (float[2] y)
    <float[2] used_inside = {{3, 4}}, float[2] two = {{2, 2}}>
    {{ k = Mul (used_inside, two)
       y = If (cond) <
         then_branch = t () => (float[2] out_t) {{ out_t = Add (x, k) }},
         else_branch = e () => (float[2] out_e) {{ out_e = Sub (x, k) }}
       > }}"""
    model = parse(text)
    proto_before = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    PassManager(build_pipeline()).run(model)
    assert ops(model) == ["If"]  # the Mul was folded into a constant the branches still read
    after = ir.to_proto(model)
    x = np.array([1, 1], np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        want = cpu_backend(proto_before, optimization=GraphOptimization.DISABLE).infer(feed)["y"]
        got = cpu_backend(after, optimization=GraphOptimization.DISABLE).infer(feed)["y"]
        np.testing.assert_array_equal(got, want)


def test_external_data_model(tmp_path: Path, rng: np.random.Generator) -> None:
    w = rng.standard_normal((64, 64)).astype(np.float32)
    proto = onnx.parser.parse_model(f"""{HEADER}
    g (float[N, 64] x) => (float[N, 64] y) {{ i = Identity (x)
       m = MatMul (i, w)
       y = Relu (m) }}""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(proto, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (src.parent / "weights.bin").is_file()
    result = optimize(src, tmp_path / "out.onnx")
    assert result.passed and result.after.nodes == 2
    x = rng.standard_normal((3, 64)).astype(np.float32)
    got = cpu_backend(tmp_path / "out.onnx").infer({"x": x})["y"]
    np.testing.assert_allclose(got, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


def test_corrupt_input_gives_clear_error_and_no_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x12\x34 definitely not protobuf" * 10)
    with pytest.raises(BadInput, match="not an ONNX model"):
        optimize(bad, tmp_path / "out.onnx")
    with pytest.raises(ModelNotFound):
        optimize(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    res = kiln("optimize", str(bad), "-o", str(tmp_path / "out.onnx"))
    assert res.returncode == 1 and "not an ONNX model" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_parity_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that breaks numerics must fail the command (here: a planted wrong fold)."""
    src = tmp_path / "m.onnx"
    onnx.save(
        onnx.parser.parse_model(f"""{HEADER}
    g (float[1, 1, 4, 4] x) => (float[1, 1, 4, 4] y)
    <float[1, 1, 1, 1] w = {{2.0}}, float[1] s = {{3.0}}>
    {{ c = Conv (x, w)
       y = Mul (c, s) }}"""),
        src,
    )
    monkeypatch.setattr(fuse_conv_affine, "per_channel", lambda c, n, r: np.full(n, 5.0, np.float32))
    with pytest.raises(ParityFailed, match="differs"):
        optimize(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_parity_records_limit_and_report_keys(tmp_path: Path) -> None:
    """Parity is judged on max abs error against 1e-4 * max(1, max |original output|); the JSON
    keeps the keys it had (output, max_abs, limit, passed)."""
    src = tmp_path / "m.onnx"
    onnx.save(
        onnx.parser.parse_model(f"""{HEADER}
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] z)
    <float[1] big = {{1000.0}}, float[1] one = {{1.0}}>
    {{ i = Identity (x)
       y = Mul (i, big)
       z = Mul (i, one) }}"""),
        src,
    )
    result = optimize(src, tmp_path / "out.onnx", shapes={"x": (2, 3)})
    by_name = {c.name: c for c in result.parity}
    assert set(by_name) == {"y", "z"} and result.passed
    original = cpu_backend(src, optimization=GraphOptimization.DISABLE)
    feed_max = {n: float(np.abs(v).max()) for n, v in original.infer(_feed()).items()}
    assert by_name["z"].limit == pytest.approx(1e-4)  # |z| < 1: the floor of 1 applies
    assert by_name["y"].limit == pytest.approx(1e-4 * feed_max["y"], rel=0.5)  # scales with |y|
    assert by_name["y"].limit > 1e-3
    entry = result.to_dict()["parity"][0]
    assert {"output", "max_abs", "limit", "passed"} <= set(entry) and entry["output"] == entry["name"]


def _feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}


def test_check_parity_fails_a_missing_output() -> None:
    original = onnx.parser.parse_model(f"""{HEADER}
    g (float[2] x) => (float[2] y) {{ y = Relu (x) }}""")
    renamed = onnx.parser.parse_model(f"""{HEADER}
    g (float[2] x) => (float[2] out) {{ out = Relu (x) }}""")
    (check,) = check_parity(original, renamed, {})
    assert check.name == "y" and not check.passed and check.max_abs == float("inf")
    (same,) = check_parity(original, original, {})
    assert same.passed and same.max_abs == 0.0 and same.limit == pytest.approx(1e-4)


def test_pipeline_selection() -> None:
    assert [p.name for p in build_pipeline("portable")] == [n for n in pass_names() if n != "fuse_gelu_ort"]
    assert "fuse_gelu_ort" in [p.name for p in build_pipeline("ort")]
    assert [p.name for p in build_pipeline(only=["remove_dead", "cse"])] == ["remove_dead", "cse"]
    assert "cse" not in [p.name for p in build_pipeline(disable=["cse"])]
    with pytest.raises(ValueError, match="unknown passes"):
        build_pipeline(only=["fold_everything"])


def test_memory_plan_packs_without_overlap() -> None:
    lives = [
        TensorLife("a", 100, 0, 2),
        TensorLife("b", 300, 1, 3),
        TensorLife("c", 100, 3, 4),
        TensorLife("d", 200, 4, 5),
    ]
    offsets = pack(lives)
    for x in lives:
        for y in lives:
            if x is not y and x.first <= y.last and y.first <= x.last:
                ax, ay = offsets[x.name], offsets[y.name]
                assert ax + x.nbytes <= ay or ay + y.nbytes <= ax, (x, y)
    arena = max(offsets[t.name] + -(-t.nbytes // 64) * 64 for t in lives)
    assert arena < sum(-(-t.nbytes // 64) * 64 for t in lives)


def test_memory_plan_of_a_chain_reuses_buffers() -> None:
    proto = onnx.parser.parse_model(f"""{HEADER}
    g (float[N, 1000] x) => (float[N, 1000] y)
    {{ a = Relu (x)
       b = Neg (a)
       c = Abs (b)
       y = Sigmoid (c) }}""")
    plan = plan_memory(proto, {"x": (2, 1000)})
    assert plan.naive_bytes == 4 * 2 * 1000 * 4
    assert plan.planned_bytes <= 2 * 8000 + 128  # a chain needs two live buffers at a time
    assert plan.largest_live_sets[0].bytes == 2 * 8000


def test_kiln_optimize_on_an_export(tmp_path: Path) -> None:
    src = tmp_path / "lite.onnx"
    export("efficientnet_lite0", src, weights="random", image_size=64)
    out = tmp_path / "lite.opt.onnx"
    res = kiln("optimize", str(src), "-o", str(out), "--report", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert (
        "fuse_pad_conv" in res.stdout and "activation memory" in res.stdout and "parity logits" in res.stdout
    )
    before, after = onnx.load(src), onnx.load(out)
    assert len(after.graph.node) < len(before.graph.node)
    assert {n.op_type for n in after.graph.node} == {
        "Conv",
        "Clip",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }
    res = kiln("optimize", str(src), "-o", str(out), "--passes", "fold_everything")
    assert res.returncode == 1 and "unknown passes" in res.stderr and "Traceback" not in res.stderr
