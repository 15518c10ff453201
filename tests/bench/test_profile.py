"""kiln bench --profile: ONNX Runtime's profiler trace summarised per op type as ORT ran it."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from modelkiln.bench.profile import UNKNOWN_OP, profile_model, summarize_trace
from modelkiln.cli.bench import bench
from modelkiln.errors import BadInput
from modelkiln.runtime.backends.onnxruntime import OrtOptions, optimized_graph

app = typer.Typer()
app.command("bench")(bench)


@app.callback()
def _root() -> None:
    """Keeps ``bench`` a subcommand, as under ``kiln``."""


runner = CliRunner()
CPU = OrtOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)


def _qdq_silu_model(path: Path) -> Path:
    """x -> Q/DQ -> Conv -> Q/DQ -> SiLU (Sigmoid, Mul in float) -> Q/DQ -> Conv -> Q/DQ -> y:
    ONNX Runtime fuses each DQ->Conv->Q into QLinearConv and leaves SiLU in float between Q/DQ."""
    rng = np.random.default_rng(0)
    scalars = {"s_a": 0.05, "s_w": 0.01, "s_b": 0.1, "s_c": 0.05, "s_d": 0.1}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    inits += [
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(np.array(0, np.int8), "wzp"),
    ]
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3))):
        inits.append(numpy_helper.from_array(rng.integers(-60, 60, shape).astype(np.int8), name))

    def qdq(x: str, scale: str, out: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("QuantizeLinear", [x, scale, "zp"], [f"{out}_q"], name=f"q_{out}"),
            helper.make_node("DequantizeLinear", [f"{out}_q", scale, "zp"], [out], name=f"dq_{out}"),
        ]

    nodes = [
        *qdq("x", "s_a", "a"),
        helper.make_node("DequantizeLinear", ["w1", "s_w", "wzp"], ["w1f"], name="dq_w1"),
        helper.make_node("Conv", ["a", "w1f"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        *qdq("c1", "s_b", "b"),
        helper.make_node("Sigmoid", ["b"], ["sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["b", "sig"], ["silu"], name="silu_mul"),
        *qdq("silu", "s_c", "c"),
        helper.make_node("DequantizeLinear", ["w2", "s_w", "wzp"], ["w2f"], name="dq_w2"),
        helper.make_node("Conv", ["c", "w2f"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        *qdq("c2", "s_d", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _qdq_silu_model(tmp_path_factory.mktemp("profile") / "qdq_silu.onnx")


def _feed(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(batch, 3, 16, 16)).astype(np.float32)}


def test_profile_reports_the_ops_onnx_runtime_ran(
    qdq_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = optimized_graph(qdq_model)  # the graph after ORT's fusions, nodes named as in the trace
    expected = Counter(n.op_type for n in ran.graph.node)
    assert expected["QLinearConv"] == 2 and "Conv" not in expected  # the premise: DQ->Conv->Q fused
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    keep = tmp_path / "kept" / "trace.json"
    s = profile_model(qdq_model, _feed(), runs=7, warmup=3, options=CPU, top=100, keep_trace=keep)

    assert s.runs == 7 and s.model == "qdq_silu.onnx" and s.inputs == {"x": [2, 3, 16, 16]}
    assert {op.op_type: op.calls_per_run for op in s.op_types} == expected
    assert all(op.calls == 7 * expected[op.op_type] for op in s.op_types)
    assert {"QLinearConv", "Sigmoid", "Mul"} <= {op.op_type for op in s.op_types}
    assert sum(op.share for op in s.op_types) == pytest.approx(1.0, abs=1e-6)
    assert sum(n.share for n in s.top_nodes) == pytest.approx(1.0, abs=1e-6)  # top=100 covers all
    assert {n.name for n in s.top_nodes} == {n.name for n in ran.graph.node}
    assert all(op.providers == ("CPUExecutionProvider",) for op in s.op_types)
    assert [op.total_ms for op in s.op_types] == sorted((op.total_ms for op in s.op_types), reverse=True)
    total_ms = sum(op.total_ms for op in s.op_types)
    assert s.node_ms["mean"] == pytest.approx(total_ms / 7)
    assert s.node_ms["min"] <= s.node_ms["median"] and s.run_ms["min"] <= s.run_ms["median"]
    assert 0 < s.node_ms["mean"] <= s.run_ms["mean"]  # kernels run inside model_run
    assert s.overhead_ms == pytest.approx(s.run_ms["mean"] - s.node_ms["mean"])
    assert s.skipped_events == 0
    # the raw trace was kept on request, the temp dir is gone, and the kept trace re-reads the same
    assert s.trace == str(keep) and list(temp.iterdir()) == []
    again = summarize_trace(keep, skip_runs=3, top=100)
    assert [(o.op_type, o.calls) for o in again.op_types] == [(o.op_type, o.calls) for o in s.op_types]
    assert json.loads(json.dumps(s.to_dict()))["op_types"][0]["op_type"] == s.op_types[0].op_type


def test_profile_deletes_its_trace_unless_asked(
    qdq_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    s = profile_model(qdq_model, _feed(1), runs=2, warmup=0, options=CPU)
    assert s.runs == 2 and s.trace is None and list(tmp_path.iterdir()) == []
    assert len(s.top_nodes) == min(10, len(optimized_graph(qdq_model).graph.node))  # top 10 by default
    with pytest.raises(BadInput, match="runs must be >= 1"):
        profile_model(qdq_model, _feed(1), runs=0, warmup=0, options=CPU)


def _node(name: str, op: str | None, ts: Any, dur: Any, tid: int = 1, **extra: Any) -> dict[str, Any]:
    args = {"op_name": op, "provider": "CPUExecutionProvider"} if op else {}
    return {
        "cat": "Node",
        "name": f"{name}_kernel_time",
        "ts": ts,
        "dur": dur,
        "tid": tid,
        "args": args,
        **extra,
    }


def _run(ts: int, dur: int) -> dict[str, Any]:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "tid": 1, "args": {}}


#: A hand-written trace: a warm-up run, two profiled runs, and events a parser must survive.
TRACE: list[Any] = [
    {"cat": "Session", "name": "model_loading_uri", "ts": 0, "dur": 400},
    {"cat": "Session", "name": "session_initialization", "ts": 400, "dur": 500},
    "not an event",
    _node("conv1", "Conv", 1010, 150),  # warm-up run: dropped
    _run(1000, 200),
    _node("conv1", "Conv", 2010, 100),
    {"cat": "Node", "name": "conv1_fence_before", "ts": 2010, "dur": 0, "args": {}},  # not a kernel
    _node("relu1", "Relu", 2120, 20),
    _node("mystery", None, 2150, 10),  # no args: op type unknown
    _node("broken", "Add", 2160, "abc"),  # unusable dur: skipped
    _node("noclock", "Add", None, 5),  # no ts: skipped
    _node("iff", "If", 2200, 60),  # contains then_relu: its self time is 35
    _node("then_relu", "Relu", 2210, 25),
    _node("other_thread", "Relu", 2210, 0, tid=2),
    {"cat": "Session", "name": "SequentialExecutor::Execute", "ts": 2005, "dur": 290},
    _run(2000, 300),
    _node("conv1", "Conv", 3010, 80),
    _node("relu1", "Relu", 3100, 30),
    _run(3000, 200),
    _node("late", "Conv", 5000, 999),  # outside every run: skipped
    {"cat": "Api", "name": "whatever", "ts": 3050, "dur": 1},
]


def test_parser_on_a_hand_written_trace() -> None:
    s = summarize_trace(TRACE, skip_runs=1, top=3, model="hand")
    assert s.model == "hand" and s.runs == 2 and s.skipped_events == 3
    assert [(o.op_type, o.calls, o.calls_per_run) for o in s.op_types] == [
        ("Conv", 2, 1.0),
        ("Relu", 4, 2.0),  # relu1 twice, then_relu inside If, a zero-length one on another thread
        ("If", 1, 0.5),
        (UNKNOWN_OP, 1, 0.5),
    ]
    assert [o.total_ms for o in s.op_types] == pytest.approx([0.180, 0.075, 0.035, 0.010])
    assert [o.ms_per_run for o in s.op_types] == pytest.approx([0.090, 0.0375, 0.0175, 0.005])
    assert [o.share for o in s.op_types] == pytest.approx([0.6, 0.25, 35 / 300, 10 / 300])
    assert s.op_types[-1].providers == ()
    assert [(n.name, n.op_type, n.calls) for n in s.top_nodes] == [
        ("conv1", "Conv", 2),
        ("relu1", "Relu", 2),
        ("iff", "If", 1),
    ]
    assert [n.total_ms for n in s.top_nodes] == pytest.approx([0.18, 0.05, 0.035])
    assert [n.share for n in s.top_nodes] == pytest.approx([0.6, 50 / 300, 35 / 300])
    assert s.node_ms == pytest.approx({"mean": 0.15, "median": 0.15, "min": 0.11})  # 190 and 110 us
    assert s.run_ms == pytest.approx({"mean": 0.25, "median": 0.25, "min": 0.2})
    assert s.overhead_ms == pytest.approx(0.1)


def test_parser_reads_files_and_refuses_what_is_not_a_trace(tmp_path: Path) -> None:
    wrapped = tmp_path / "chrome.json"
    wrapped.write_text(json.dumps({"traceEvents": TRACE}))
    assert summarize_trace(wrapped, skip_runs=1).op_types[0].total_ms == pytest.approx(0.18)
    cases = {
        "empty.json": ("", "not a readable JSON trace"),
        "cut.json": (json.dumps(TRACE)[:-40], "not a readable JSON trace"),
        "list.json": ("[]", "non-empty JSON list"),
        "object.json": ('{"a": 1}', "non-empty JSON list"),
        "norun.json": (json.dumps([_node("conv1", "Conv", 10, 5)]), "0 model_run events"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BadInput, match=message) as err:
            summarize_trace(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(BadInput, match="3 model_run events, expected more than the 3 warm-up runs"):
        summarize_trace(TRACE, skip_runs=3)
    with pytest.raises(BadInput, match="no kernel"):
        summarize_trace([_run(0, 10), _node("a", "Conv", 50, 1)])
    with pytest.raises(BadInput, match="not a readable"):
        summarize_trace(tmp_path / "missing.json")


def test_cli_profile_prints_tables_and_writes_json(qdq_model: Path, tmp_path: Path) -> None:
    out, raw = tmp_path / "profile.json", tmp_path / "raw.json"
    args = ["bench", str(qdq_model), "--batch", "1,2", "--iterations", "5", "--warmup", "2", "--threads", "1"]
    args += ["--profile", "--profile-runs", "4", "--profile-json", str(out), "--profile-trace", str(raw)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "time per op type (4 profiled runs)" in res.output and "QLinearConv" in res.output
    assert "slowest nodes" in res.output and "outside kernels" in res.output
    assert "items/s" in res.output  # the latency table is still there
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2] and all(r["runs"] == 4 for r in rows)
    assert rows[1]["inputs"] == {"x": [2, 3, 16, 16]}
    assert sum(o["share"] for o in rows[0]["op_types"]) == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["machine"]["intra_op_threads"] == 1 and "cpu_description" in rows[0]["machine"]
    # one raw trace per batch size, each an ONNX Runtime trace with 2 warm-up + 4 runs
    for b in (1, 2):
        kept = tmp_path / f"raw-b{b}.json"
        assert rows[b - 1]["trace"] == str(kept)
        assert sum(e.get("name") == "model_run" for e in json.loads(kept.read_text())) == 6
    assert not raw.exists()


def test_cli_profile_needs_onnx_runtime(qdq_model: Path) -> None:
    res = runner.invoke(app, ["bench", str(qdq_model), "--profile", "--backend", "tensorrt"])
    assert res.exit_code != 0
    assert isinstance(res.exception, BadInput)
    assert str(res.exception) == (
        "--profile reads ONNX Runtime's profiler and needs --backend onnxruntime, got --backend tensorrt"
    )
    res = runner.invoke(app, ["bench", str(qdq_model), "--profile-runs", "0", "--profile"])
    assert isinstance(res.exception, BadInput) and "--profile-runs must be >= 1, got 0" in str(res.exception)
