"""kiln serve --memory-budget: sizes, lazy loads, LRU eviction of idle unpinned models only, the
503 that says why, metrics, and nothing changed without a budget."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import add_model, affine_model, free_port, kiln
from modelkiln.errors import BadInput, ConfigError, ModelUnavailable
from modelkiln.serve.budget import rss_cost
from modelkiln.serve.config import SIZE_UNITS, ModelConfig, parse_config, parse_size
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.model import ServedModel
from modelkiln.serve.server import ModelServer

T = TypeVar("T")
MB = 1 << 20


def fake_costs(costs: dict[str, int]) -> Callable[[str, Callable[[], T]], tuple[T, int]]:
    """A measurer that says each model costs what ``costs`` says (RSS would be flaky here)."""

    def measure(name: str, load: Callable[[], T]) -> tuple[T, int]:
        return load(), costs[name]

    return measure


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for i, name in enumerate(("a", "b", "c")):
        add_model(
            root,
            name,
            affine_model(tmp_path / f"{name}.onnx", scale=float(i + 2)),
            ModelConfig(name, max_batch_size=4),
        )
    return root


def pin(repo: Path, name: str) -> None:
    (repo / name / "config.yaml").write_text((repo / name / "config.yaml").read_text() + "pin: true\n")


def budget_server(repo: Path, budget_mb: int = 100, costs: dict[str, int] | None = None) -> ModelServer:
    costs = costs or {"a": 40 * MB, "b": 40 * MB, "c": 40 * MB}
    server = ModelServer(str(repo), cores=2, memory_budget=budget_mb * MB, measure=fake_costs(costs))
    server.load_all()
    return server


@pytest.fixture
def blocker(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, threading.Event]]:
    """Inference of a model named in the dict waits until its event is set (a request in flight)."""
    gates: dict[str, threading.Event] = {}
    real = ServedModel.run

    def run(self: ServedModel, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate = gates.get(self.name)
        if gate is not None:
            assert gate.wait(30)
        return real(self, feed)

    monkeypatch.setattr(ServedModel, "run", run)
    yield gates
    for gate in gates.values():
        gate.set()


X = {"x": np.ones((1, 4), np.float32)}


def ask(server: ModelServer, name: str, timeout_s: float | None = None) -> np.ndarray:
    return server.infer(name, X, timeout_s=timeout_s).result(30).outputs["y"]


def resident(server: ModelServer) -> set[str]:
    return {r.name for r in server.memory_stats() if r.resident_bytes}


def wait_resident(server: ModelServer, name: str) -> None:
    """Until ``name``'s load is done and measured (a busy request holds it)."""
    deadline = time.monotonic() + 10
    while name not in resident(server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert name in resident(server)


def row(server: ModelServer, name: str) -> Any:
    return next(r for r in server.memory_stats() if r.name == name)


# --- sizes ---------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**6), st.sampled_from(sorted(u for u in SIZE_UNITS if u)), st.booleans())
def test_sizes_parse_to_their_bytes(number: int, unit: str, lower: bool) -> None:
    text = f"{number}{unit.lower() if lower else unit}"
    assert parse_size(text) == number * SIZE_UNITS[unit]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_any_text_is_a_positive_size_or_a_clear_error(text: str) -> None:
    try:
        size = parse_size(text, "--memory-budget")
    except ConfigError as exc:
        assert "--memory-budget" in str(exc) and "700MB" in str(exc) or "whole number" in str(exc)
    else:
        assert isinstance(size, int) and size >= 1


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "4XB", "0MB", "1.5", "4 G B", "1e9", "nan", "0.1B"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_size(text, "--memory-budget")


def test_fractional_and_binary_units() -> None:
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("700MB") == 700_000_000
    assert parse_size(" 4gb ") == 4_000_000_000


def test_pin_is_validated_like_the_other_keys() -> None:
    assert parse_config({"pin": True}, "m").pin is True
    with pytest.raises(ConfigError, match="pin must be true or false"):
        parse_config({"pin": "yes"}, "m")


def test_cli_refuses_a_bad_budget(repo: Path) -> None:
    out = kiln("serve", str(repo), "--memory-budget", "4XB")
    assert out.returncode != 0
    assert "--memory-budget" in out.stdout + out.stderr and "4XB" in out.stdout + out.stderr


# --- behaviour -----------------------------------------------------------------------------------
def test_without_a_budget_everything_loads_at_start(repo: Path) -> None:
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        assert server.memory is None and server.memory_stats() == []
        assert all(isinstance(server.get(n).model, ServedModel) for n in "abc")
        np.testing.assert_allclose(ask(server, "b"), 3 * X["x"] + 1)
    finally:
        server.shutdown()


def test_models_load_on_their_first_request(repo: Path) -> None:
    server = budget_server(repo)
    try:
        assert resident(server) == set() and all(r.loads == 0 for r in server.memory_stats())
        assert server.ready("a")  # available: it loads when asked
        np.testing.assert_allclose(ask(server, "a"), 2 * X["x"] + 1)
        assert resident(server) == {"a"} and row(server, "a").loads == 1
        assert row(server, "a").resident_bytes == 40 * MB
        ask(server, "a")
        assert row(server, "a").loads == 1  # stays resident while it fits
    finally:
        server.shutdown()


def test_least_recently_used_idle_model_is_unloaded_first(repo: Path) -> None:
    server = budget_server(repo)
    try:
        ask(server, "a")
        ask(server, "b")
        ask(server, "a")  # b is now the least recently used
        np.testing.assert_allclose(ask(server, "c"), 4 * X["x"] + 1)
        assert resident(server) == {"a", "c"}
        assert row(server, "b").evictions == 1 and row(server, "a").evictions == 0
        np.testing.assert_allclose(ask(server, "b"), 3 * X["x"] + 1)  # back on demand: a goes now
        assert resident(server) == {"b", "c"} and row(server, "b").loads == 2
    finally:
        server.shutdown()


def test_a_model_with_a_request_in_flight_is_never_unloaded(
    repo: Path, blocker: dict[str, threading.Event]
) -> None:
    server = budget_server(repo)
    try:
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)  # a: least recently used, but busy
        wait_resident(server, "a")
        ask(server, "b")
        ask(server, "c")  # must evict b, not the busy a
        assert resident(server) == {"a", "c"} and row(server, "a").evictions == 0
        blocker["a"].set()
        np.testing.assert_allclose(busy.result(30).outputs["y"], 2 * X["x"] + 1)
    finally:
        server.shutdown()


def test_a_request_that_cannot_fit_waits_then_gets_the_reason(
    repo: Path, blocker: dict[str, threading.Event]
) -> None:
    server = budget_server(repo, budget_mb=60)  # one model at a time
    try:
        ask(server, "b")  # b measured (a first load is only estimated from its file)
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)
        wait_resident(server, "a")
        start = time.monotonic()
        with pytest.raises(ModelUnavailable) as err:
            ask(server, "b", timeout_s=0.3)
        assert time.monotonic() - start >= 0.25
        message = str(err.value)
        assert "model 'b' needs ~40 MB" in message and "memory budget of 60 MB" in message
        assert "40 MB in use by other requests" in message
        # once a is idle, b fits (a unloaded for it)
        blocker["a"].set()
        busy.result(30)
        np.testing.assert_allclose(ask(server, "b", timeout_s=10), 3 * X["x"] + 1)
        assert resident(server) == {"b"} and row(server, "a").evictions == 1
        assert row(server, "b").evictions == 1
    finally:
        server.shutdown()


def test_pinned_models_load_at_start_and_are_never_unloaded(repo: Path) -> None:
    pin(repo, "a")
    server = budget_server(repo)
    try:
        assert resident(server) == {"a"} and row(server, "a").pinned
        ask(server, "b")
        ask(server, "c")  # a is the least recently used, but pinned: b goes
        assert resident(server) == {"a", "c"} and row(server, "b").evictions == 1
        assert row(server, "a").evictions == 0
    finally:
        server.shutdown()


def test_a_model_that_cannot_fit_beside_the_pinned_ones_is_refused_with_why(repo: Path) -> None:
    pin(repo, "a")
    server = budget_server(repo, costs={"a": 80 * MB, "b": 40 * MB, "c": 40 * MB})
    try:
        ask(server, "b")  # first load: estimated tiny from its file, measured 40 MB
        ask(server, "c")  # 80 + 40 + 40 > 100: b goes
        with pytest.raises(ModelUnavailable, match=r"needs ~40 MB .* 80 MB pinned"):
            ask(server, "b")
    finally:
        server.shutdown()


def test_bad_input_to_a_model_not_yet_loaded_is_a_bad_input(repo: Path) -> None:
    server = budget_server(repo)
    try:
        with pytest.raises(BadInput, match="expects shape"):
            server.infer("a", {"x": np.ones((1, 5), np.float32)}).result(30)
        with pytest.raises(BadInput, match="expects shape"):  # now known without loading
            server.infer("a", {"x": np.ones((1, 5), np.float32)})
    finally:
        server.shutdown()


def test_metrics_export_bytes_loads_evictions_and_load_time(repo: Path) -> None:
    server = budget_server(repo, budget_mb=60)
    try:
        ask(server, "a")
        ask(server, "b")
        metrics = ServerMetrics()
        metrics.watch_memory(server, 60 * MB)
        text = metrics.render().decode()
        assert 'kiln_model_resident_bytes{model="b"} 4.194304e+07' in text
        assert 'kiln_model_resident_bytes{model="a"} 0.0' in text
        assert 'kiln_model_loads_total{model="a"} 1.0' in text
        assert 'kiln_model_evictions_total{model="a"} 1.0' in text
        assert 'kiln_model_load_seconds_total{model="b"}' in text
        assert "kiln_memory_budget_bytes 6.291456e+07" in text
    finally:
        server.shutdown()


def test_real_measurer_counts_what_a_load_holds(repo: Path) -> None:
    held, cost = rss_cost("ballast", lambda: np.ones(48 * MB // 8))
    assert cost >= 40 * MB and held.nbytes == 48 * MB
    server = ModelServer(str(repo), cores=2, memory_budget=1 << 30)
    server.load_all()
    try:
        ask(server, "a")
        assert row(server, "a").cost_bytes > 0 and row(server, "a").resident_bytes > 0
    finally:
        server.shutdown()


def test_http_answers_503_with_the_reason(repo: Path, blocker: dict[str, threading.Event]) -> None:
    import uvicorn

    from modelkiln.serve.http import create_app

    server = budget_server(repo, budget_mb=60)
    port = free_port()
    app = create_app(server, None, None, None, "127.0.0.1")
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        ask(server, "b")
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)
        wait_resident(server, "a")
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}],
            "parameters": {"timeout": 300_000},
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/b/infer", json.dumps(body).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 503
        assert "needs ~40 MB" in json.loads(err.value.read())["error"]
        blocker["a"].set()
        busy.result(30)
        with urllib.request.urlopen(req, timeout=30) as ok:
            assert json.loads(ok.read())["outputs"][0]["data"] == [4.0] * 4
    finally:
        uv.should_exit = True
        thread.join(30)
        server.shutdown()
