"""The memory budget's ledger beside its models: readiness and the repository index say the truth
per version (resident, loading, not loaded yet, evicted for whom, too big), KV-cache reservations
are counted once, wait in the same line as loads, evict idle models and fail with why; a load's
measured cost leaves out what the request buffer pool gained meanwhile."""

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

from conftest import add_model, affine_model, free_port
from modelkiln.errors import ModelUnavailable
from modelkiln.serve.budget import NOT_LOADED_YET, MemoryBudget, Reservation
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.metrics import ServerMetrics
from modelkiln.serve.model import ServedModel
from modelkiln.serve.server import ModelServer

T = TypeVar("T")
MB = 1 << 20
X = {"x": np.ones((1, 4), np.float32)}


def fake_costs(costs: dict[str, int], gates: dict[str, threading.Event] | None = None) -> Any:
    """Each model costs what ``costs`` says; a load of a model in ``gates`` waits for its event."""

    def measure(name: str, load: Callable[[], T]) -> tuple[T, int]:
        gate = (gates or {}).get(name)
        if gate is not None:
            assert gate.wait(30)
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


def budget_server(
    repo: Path, budget: int = 100 * MB, costs: dict[str, int] | None = None, **kw: Any
) -> ModelServer:
    costs = costs or {"a": 40 * MB, "b": 40 * MB, "c": 40 * MB, "chat": 10 * MB}
    server = ModelServer(str(repo), cores=2, memory_budget=budget, measure=fake_costs(costs, **kw))
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


def ask(server: ModelServer, name: str) -> None:
    server.infer(name, X).result(30)


def index(server: ModelServer) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in server.index()}


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert predicate()


# --- readiness and the repository index ----------------------------------------------------------
def test_index_says_not_loaded_yet_then_ready_then_evicted_for_whom(repo: Path) -> None:
    server = budget_server(repo)
    try:
        rows = index(server)
        assert rows["a"] == {"name": "a", "version": "1", "state": "UNAVAILABLE", "reason": NOT_LOADED_YET}
        assert all(server.ready(n) for n in "abc")  # model-ready: a request would be served
        ask(server, "a")
        ask(server, "b")
        assert index(server)["a"] == {"name": "a", "version": "1", "state": "READY"}
        ask(server, "c")  # a is the least recently used: evicted for c
        rows = index(server)
        assert rows["a"]["state"] == "UNAVAILABLE"
        assert rows["a"]["reason"] == "evicted to fit c (memory budget)"
        assert rows["b"]["state"] == rows["c"]["state"] == "READY"
        assert server.ready("a")  # it loads again on demand
    finally:
        server.shutdown()


def test_every_version_has_its_row(repo: Path, tmp_path: Path) -> None:
    add_model(
        repo, "a", affine_model(tmp_path / "a2.onnx", 5.0), ModelConfig("a", max_batch_size=4), version=2
    )
    server = budget_server(repo)
    try:
        rows = [r for r in server.index() if r["name"] == "a"]
        assert [(r["version"], r["state"]) for r in rows] == [("1", "UNAVAILABLE"), ("2", "UNAVAILABLE")]
        ask(server, "a")
        rows = [r for r in server.index() if r["name"] == "a"]
        assert [(r["version"], r["state"]) for r in rows] == [("1", "READY"), ("2", "READY")]
    finally:
        server.shutdown()


def test_a_loading_model_is_loading_and_ready(repo: Path) -> None:
    gate = threading.Event()
    server = budget_server(repo, gates={"b": gate})
    try:
        pending = server.infer("b", X)
        wait_for(lambda: index(server)["b"]["state"] == "LOADING")
        assert server.ready("b")
        gate.set()
        pending.result(30)
        assert index(server)["b"]["state"] == "READY"
    finally:
        gate.set()
        server.shutdown()


def test_a_model_that_can_never_fit_is_not_ready(repo: Path) -> None:
    pin(repo, "a")
    server = budget_server(repo, costs={"a": 80 * MB, "b": 40 * MB, "c": 40 * MB})
    try:
        assert index(server)["a"]["state"] == "READY"  # pinned: loaded at start
        ask(server, "b")  # first load estimated from its file, measured 40 MB
        assert server.ready("b") and index(server)["b"]["state"] == "READY"
        ask(server, "c")  # b goes for c; now b is known to need 40 MB, beside 80 pinned
        assert not server.ready("b")
        row = index(server)["b"]
        assert row["state"] == "UNAVAILABLE"
        assert "needs ~40 MB" in row["reason"] and "80 MB pinned" in row["reason"]
        assert "cannot fit beside the pinned models" in row["reason"]
        assert server.ready("a") and server.ready("c")
    finally:
        server.shutdown()


def test_without_a_budget_every_loaded_model_is_ready(repo: Path) -> None:
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        assert [(r["name"], r["state"]) for r in server.index()] == [(n, "READY") for n in "abc"]
        assert all(server.ready(n) for n in "abc")
    finally:
        server.shutdown()


def test_http_model_ready_and_repository_index(repo: Path) -> None:
    import uvicorn

    from modelkiln.serve.http import create_app

    server = budget_server(repo)
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(
            create_app(server, None, None, None, "127.0.0.1"), host="127.0.0.1", port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: uv.started)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/a/ready", timeout=30) as r:
            assert r.status == 200  # not resident, but it would be served
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/index", b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            rows = {row["name"]: row for row in json.loads(r.read())}
        assert rows["a"]["state"] == "UNAVAILABLE" and rows["a"]["reason"] == NOT_LOADED_YET
    finally:
        uv.should_exit = True
        thread.join(30)
        server.shutdown()


# --- KV-cache reservations in the ledger (a chat model stands in: measure_fixed with chat=True) ----
class Outcome:
    """A reservation's callbacks, recorded."""

    def __init__(self) -> None:
        self.granted: list[Reservation] = []
        self.failed: list[BaseException] = []
        self.done = threading.Event()

    def grant(self, res: Reservation) -> None:
        self.granted.append(res)
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)
        self.done.set()


def with_chat(server: ModelServer) -> MemoryBudget:
    assert server.memory is not None
    server.memory.measure_fixed("chat", lambda: None, chat=True)  # 10 MB, always held
    return server.memory


def reserve(
    memory: MemoryBudget, nbytes: int, out: Outcome, wait_s: float = 10.0, **kw: Any
) -> Reservation | None:
    return memory.reserve("chat", nbytes, time.monotonic() + wait_s, out.grant, out.fail, **kw)


def kv(memory: MemoryBudget) -> int | None:
    return next(r.kv_reserved_bytes for r in memory.stats() if r.name == "chat")


def test_a_reservation_that_fits_is_counted_once_and_given_back_once(repo: Path) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        assert memory.held() == 10 * MB and kv(memory) == 0
        res = reserve(memory, 3 * MB, Outcome())
        assert res is not None and res.state == "granted"
        assert memory.held() == 13 * MB and kv(memory) == 3 * MB
        res.release()
        res.release()  # idempotent: never subtracted twice
        assert memory.held() == 10 * MB and kv(memory) == 0
        assert next(r for r in memory.stats() if r.name == "chat").cost_bytes == 10 * MB  # cost alone
        assert next(r for r in memory.stats() if r.name == "a").kv_reserved_bytes is None
    finally:
        server.shutdown()


def test_a_reservation_evicts_the_least_recently_used_idle_model(repo: Path) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        ask(server, "a")
        ask(server, "b")  # 10 + 40 + 40 = 90 of 100 MB
        out = Outcome()
        assert reserve(memory, 20 * MB, out) is None  # does not fit: waits for the loader thread
        assert out.done.wait(10) and out.failed == []
        assert [r.nbytes for r in out.granted] == [20 * MB]
        rows = index(server)
        assert rows["a"]["state"] == "UNAVAILABLE"
        assert rows["a"]["reason"] == "evicted to fit a sequence of chat (memory budget)"
        assert rows["b"]["state"] == "READY"
        assert next(r for r in memory.stats() if r.name == "chat").kv_evictions == 1
        assert memory.held() == 10 * MB + 40 * MB + 20 * MB
        out.granted[0].release()
        assert memory.held() == 50 * MB
    finally:
        server.shutdown()


def test_a_reservation_blocked_by_busy_models_fails_with_why(
    repo: Path, blocker: dict[str, threading.Event]
) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        blocker["a"] = threading.Event()
        blocker["b"] = threading.Event()
        busy = [server.infer("a", X), server.infer("b", X)]
        wait_for(lambda: index(server)["a"]["state"] == index(server)["b"]["state"] == "READY")
        out = Outcome()
        assert reserve(memory, 20 * MB, out, wait_s=0.2) is None
        assert out.done.wait(10) and out.granted == []
        message = str(out.failed[0])
        assert isinstance(out.failed[0], ModelUnavailable)
        assert "model 'chat': a chat sequence needs 20.0 MB for its KV cache" in message
        assert "memory budget of 100.0 MB: 90.0 MB held, 10.0 MB pinned" in message
        assert "80.0 MB in use by other requests (waited" in message
        assert memory.held() == 90 * MB and kv(memory) == 0  # a failed wait holds nothing
        for gate in blocker.values():
            gate.set()
        for f in busy:
            f.result(30)
    finally:
        server.shutdown()


def test_a_reservation_that_can_never_fit_is_refused_at_once(repo: Path) -> None:
    pin(repo, "a")
    server = budget_server(repo, costs={"a": 80 * MB, "b": 40 * MB, "c": 40 * MB, "chat": 10 * MB})
    try:
        memory = with_chat(server)
        with pytest.raises(ModelUnavailable, match=r"needs 20\.0 MB .* 90\.0 MB pinned, .*cannot fit beside"):
            reserve(memory, 20 * MB, Outcome())
    finally:
        server.shutdown()


def test_waiting_reservations_and_loads_share_one_line(
    repo: Path, blocker: dict[str, threading.Event]
) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)
        wait_for(lambda: index(server)["a"]["state"] == "READY")  # 50 of 100 MB, a busy
        first, second = Outcome(), Outcome()
        assert reserve(memory, 55 * MB, first) is None  # waits for a
        # 5 MB would fit in what is free, but the earlier reservation goes first
        assert reserve(memory, 5 * MB, second) is None
        assert not first.done.is_set() and not second.done.is_set()
        blocker["a"].set()
        busy.result(30)
        assert first.done.wait(10) and second.done.wait(10)
        assert [r.nbytes for r in first.granted] == [55 * MB] and [r.nbytes for r in second.granted] == [
            5 * MB
        ]
        assert index(server)["a"]["reason"] == "evicted to fit a sequence of chat (memory budget)"
        assert kv(memory) == 60 * MB
    finally:
        server.shutdown()


def test_a_cancelled_chat_stops_waiting_and_a_withdrawn_one_holds_nothing(
    repo: Path, blocker: dict[str, threading.Event]
) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)
        wait_for(lambda: index(server)["a"]["state"] == "READY")
        cancelled = threading.Event()
        out = Outcome()
        assert reserve(memory, 60 * MB, out, abandoned=cancelled.is_set) is None
        cancelled.set()
        assert out.done.wait(10) and out.granted == []
        assert "cancelled while it waited for memory" in str(out.failed[0])
        withdrawn = Outcome()
        assert reserve(memory, 60 * MB, withdrawn) is None
        memory._waiting[0].release()  # the chat went away: its waiting reservation is withdrawn
        blocker["a"].set()
        busy.result(30)
        assert not withdrawn.done.wait(0.3)  # neither granted nor failed: nobody to tell
        assert memory.held() == 50 * MB and kv(memory) == 0
    finally:
        server.shutdown()


def test_metrics_export_reserved_kv_bytes_per_chat_model(repo: Path) -> None:
    server = budget_server(repo)
    try:
        memory = with_chat(server)
        res = reserve(memory, 3 * MB, Outcome())
        metrics = ServerMetrics()
        metrics.watch_memory(server, 100 * MB)
        text = metrics.render().decode()
        assert 'kiln_chat_kv_reserved_bytes{model="chat"} 3.145728e+06' in text
        assert 'kiln_chat_kv_reserved_bytes{model="a"}' not in text  # one-shot models have none
        assert 'kiln_chat_kv_evictions_total{model="chat"} 0.0' in text
        assert res is not None
        res.release()
        assert 'kiln_chat_kv_reserved_bytes{model="chat"} 0.0' in metrics.render().decode()
    finally:
        server.shutdown()


# --- measurement: the request buffer pool is not a model's cost ---------------------------------
def test_a_load_is_not_charged_for_pool_buffers_of_other_requests(repo: Path) -> None:
    server = ModelServer(str(repo), cores=2, memory_budget=100 * MB)
    pool = server.scheduler.memory
    held = []

    def rss_like(name: str, load: Callable[[], T]) -> tuple[T, int]:
        """A resident set that sees the pool: another request's 8 MB KV cache appears meanwhile."""
        before = pool.stats().in_use_bytes + pool.stats().cached_bytes
        out = load()
        held.append(pool.acquire(8 * MB // 4))  # still in use when the load ends
        grown = pool.stats().in_use_bytes + pool.stats().cached_bytes - before
        return out, 40 * MB + grown

    assert server.memory is not None
    server.memory.measure = rss_like
    server.load_all()
    try:
        ask(server, "a")
        assert next(r for r in server.memory_stats() if r.name == "a").cost_bytes == 40 * MB
    finally:
        for buf in held:
            buf.release()
        server.shutdown()


def test_a_warm_ups_pool_buffers_are_gone_before_the_measurement_ends(repo: Path) -> None:
    server = ModelServer(str(repo), cores=2, memory_budget=100 * MB)
    pool = server.scheduler.memory
    seen: dict[str, int] = {}

    def measure(name: str, load: Callable[[], T]) -> tuple[T, int]:
        out = load()
        seen[name] = pool.stats().cached_bytes  # what a resident set would still see
        return out, 5 * MB

    def chat_like_load() -> None:
        pool.acquire(4 * MB // 4).release()  # a warm-up sequence's cache, back in the pool's cache

    assert server.memory is not None
    server.memory.measure = measure
    server.memory.measure_fixed("chat", chat_like_load, chat=True)
    try:
        assert seen["chat"] == 0 and server.memory.held() == 5 * MB
    finally:
        server.shutdown()
