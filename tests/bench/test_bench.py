"""kiln bench: JSON that an independent check can recompute, plots, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelkiln.bench import runner
from modelkiln.bench.runner import LoopSpec, benchmark, machine_info, synthesize_feed
from modelkiln.errors import BadInput
from modelkiln.runtime.backends import TensorMeta, load_backend
from modelkiln.runtime.cpu import CpuInfo, cpu_info


def kiln(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "modelkiln", *args], capture_output=True, text=True, check=False, env=env
    )


def test_bench_json_is_self_consistent(tiny: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    res = kiln(
        "bench",
        str(tiny),
        "--batch",
        "1,4",
        "--concurrency",
        "1,2",
        "--iterations",
        "200",
        "--warmup",
        "5",
        "--threads",
        "1",
        "--shape",
        "scale:1",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["concurrency"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for r in rows:
        lat = np.asarray(r["latencies_ms"])
        assert r["iterations"] == len(lat) == 200 * r["concurrency"]
        assert (
            r["latency_ms"]["min"]
            <= r["latency_ms"]["median"]
            <= r["latency_ms"]["p90"]
            <= r["latency_ms"]["p99"]
        )
        assert r["latency_ms"]["mean"] == pytest.approx(lat.mean())
        assert r["throughput"] == pytest.approx(r["batch"] * r["iterations"] / r["wall_s"])
        assert r["wall_s"] >= lat.sum() / 1e3 / r["concurrency"] * 0.999  # callers cannot overlap more
    assert png.stat().st_size > 10_000
    assert "items/s" in res.stdout and "p99" in res.stdout
    info = cpu_info()  # the same machine as the subprocess: its INT8 facts are in every row
    assert f"CPU: {info.describe()}" in res.stdout
    assert res.stdout.index("CPU: ") < res.stdout.index("p99")  # named before the table
    for r in rows:
        assert r["machine"]["cpu_description"] == info.describe()
        assert {k: r["machine"][k] for k in info.to_dict()} == info.to_dict()


def test_machine_info_names_the_int8_instruction_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = CpuInfo("x86_64", "AMD EPYC 7B12", frozenset({"avx2", "fma"}))
    monkeypatch.setattr(runner, "cpu_info", lambda: fake)
    machine = machine_info(2)
    assert machine["cpu_model"] == "AMD EPYC 7B12" and machine["arch"] == "x86_64"
    assert machine["int8_flags"] == ["avx2"] and machine["int32_dot"] is False
    assert machine["cpu_description"] == "AMD EPYC 7B12 (x86_64: avx2)"
    assert machine["intra_op_threads"] == 2 and machine["onnxruntime"]


def test_symbolic_dims_need_a_shape() -> None:
    with pytest.raises(BadInput, match=r"--shape ids:1xN"):
        synthesize_feed([TensorMeta("ids", "int64", ("batch", "seq"))], batch=1)
    feed = synthesize_feed([TensorMeta("ids", "int64", ("batch", "seq"))], batch=1, shapes={"ids": (2, 7)})
    assert feed["ids"].shape == (2, 7) and feed["ids"].dtype == np.int64


def test_duration_mode_runs_for_about_that_long(tiny: Path) -> None:
    backend = load_backend(tiny)
    feed = synthesize_feed(backend.input_metadata, 2, {"scale": (1,)})
    result = benchmark(backend, feed, 2, 2, LoopSpec(warmup=1, iterations=None, duration=0.3))
    assert 0.3 <= result.wall_s < 2 and result.iterations > 10


def test_bad_options_are_clear(tiny: Path) -> None:
    res = kiln("bench", str(tiny), "--batch", "1,x", "--shape", "scale:1")
    assert res.returncode == 1 and "--batch must be comma-separated integers" in res.stderr
    with pytest.raises(ValueError, match="exactly one"):
        LoopSpec(iterations=None, duration=None)


def test_interleaved_runs_every_job_once_per_round_in_turns() -> None:
    calls: list[str] = []
    found = runner.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b"] * 3  # in turns, never all of one first
    assert found == {"a": [1, 1, 1], "b": [2, 2, 2]}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        runner.interleaved({"a": lambda: 1}, 0)


def test_interleaved_benchmarks_merge_their_rounds(tiny: Path) -> None:
    backend = load_backend(tiny)
    cases = {
        batch: runner.BenchCase(
            backend, synthesize_feed(backend.input_metadata, batch, {"scale": (1,)}), batch
        )
        for batch in (1, 4)
    }
    results = runner.benchmark_interleaved(cases, LoopSpec(warmup=1, iterations=20), rounds=3)
    assert list(results) == [1, 4]
    for batch, r in results.items():
        assert r.batch == batch and r.iterations == len(r.latencies_ms) == 3 * 20  # every round's calls
        assert r.throughput == pytest.approx(batch * r.iterations / r.wall_s)
        assert r.latency_ms["min"] <= r.latency_ms["median"] <= r.latency_ms["p99"]
        assert r.latency_ms["mean"] == pytest.approx(np.mean(r.latencies_ms))
