"""Per-request priority and Triton's queue policy: urgent requests are batched first inside a
model's queue and run first across models on a shared 1-core pool; a waiting request ages (one
level per aging_ms), so a low-priority one is served after a bounded number of urgent ones;
a timeout that expires in the queue fails the request (reject) or sends it to the back (delay);
bad values are refused naming the model; HTTP, gRPC and chat bodies carry the parameter.

Deterministic: the instance is held busy by the test (no model runs until released), requests
carry explicit queue times, and expiry reads a fake clock. Nothing asserts on speed."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Running, add_model, affine_model
from modelkiln.errors import BadInput, ConfigError, DeadlineExceeded
from modelkiln.serve.batcher import DynamicBatcher, InferRequest
from modelkiln.serve.config import DynamicBatching, ModelConfig, QueuePolicy, parse_config
from modelkiln.serve.openai import parse_chat
from modelkiln.serve.protocol import parse_request, request_priority
from modelkiln.serve.scheduler import Scheduler
from modelkiln.serve.server import ModelServer

X = np.zeros((1, 4), np.float32)


# --- a batcher with an instance the test holds busy ---------------------------------------------
@dataclass
class FakeModel:
    name: str
    config: ModelConfig
    ran: list[str] = field(default_factory=list)
    gate: threading.Event | None = None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.gate is not None:
            self.gate.wait(30)
        self.ran.append(self.name)
        return {"y": feed["x"]}


class HeldExecutor:
    """Records each formed batch and frees the instance only when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[InferRequest]] = []
        self._done: list[Callable[[], None]] = []
        self.cond = threading.Condition()

    def execute(self, batcher: Any, batch: list[InferRequest], done: Callable[[], None]) -> None:
        with self.cond:
            self.batches.append(batch)
            self._done.append(done)
            self.cond.notify_all()

    def wait_batches(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.batches) >= n, timeout=10), len(self.batches)

    def release(self) -> None:
        """Answer the last batch and free the instance for the next."""
        batch, done = self.batches[-1], self._done[-1]
        for r in batch:
            if not r.future.done():
                r.future.set_result(None)  # type: ignore[arg-type]
        done()


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def held_batcher(queue: QueuePolicy, clock: Clock | None = None) -> tuple[DynamicBatcher, HeldExecutor]:
    """A one-instance batcher (one request per batch) whose instance is busy with a first request."""
    config = ModelConfig("m", max_batch_size=0, queue=queue)
    executor = HeldExecutor()
    batcher = DynamicBatcher(FakeModel("m", config), executor, clock or Clock())  # type: ignore[arg-type]
    batcher.submit(req(1, 0.0, "first"))
    executor.wait_batches(1)
    return batcher, executor


def req(priority: int | None, enqueued: float, tag: str, deadline: float | None = None) -> InferRequest:
    r = InferRequest({"x": X}, 1, deadline, enqueued=enqueued, priority=priority)
    r.tag = tag  # type: ignore[attr-defined]
    return r


def drain(batcher: DynamicBatcher, executor: HeldExecutor, n: int) -> list[str]:
    """Run the ``n`` requests left (one per batch), then close; the tags run, in order."""
    for i in range(n):
        executor.release()
        executor.wait_batches(i + 2)
    executor.release()
    batcher.close()
    return [r.tag for b in executor.batches[1:] for r in b]  # type: ignore[attr-defined]


def test_inside_a_queue_the_most_urgent_request_is_batched_first() -> None:
    batcher, executor = held_batcher(QueuePolicy(aging_ms=100))
    for p, tag in [(2, "low"), (1, "normal"), (0, "urgent"), (None, "default"), (0, "urgent2")]:
        batcher.submit(req(p, 10.0, tag))  # same queue time: strict priority, FIFO within a level
    assert drain(batcher, executor, 5) == ["urgent", "urgent2", "normal", "default", "low"]


def test_a_batch_takes_requests_in_priority_order() -> None:
    config = ModelConfig("m", max_batch_size=2, dynamic_batching=DynamicBatching((2,), 0))
    executor = HeldExecutor()
    batcher = DynamicBatcher(FakeModel("m", config), executor)  # type: ignore[arg-type]
    batcher.submit(req(1, 0.0, "first"))
    executor.wait_batches(1)
    for p, tag in [(2, "a"), (2, "b"), (0, "c"), (1, "d")]:
        batcher.submit(req(p, 5.0, tag))
    executor.release()
    executor.wait_batches(2)
    assert [r.tag for r in executor.batches[1]] == ["c", "d"]  # type: ignore[attr-defined]
    executor.release()
    executor.wait_batches(3)
    executor.release()
    batcher.close()
    assert [r.tag for r in executor.batches[2]] == ["a", "b"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("aging_ms", [100, 0])
def test_aging_bounds_how_many_urgent_requests_pass_a_waiting_one(aging_ms: int) -> None:
    """A low request (level 2) queued at t=0 under a stream of urgent ones (level 0) queued every
    10 ms: with aging_ms=100 it ranks as queued at 0.2 s, so exactly the 20 urgent requests queued
    before then pass it; without aging (0) every one of them does."""
    batcher, executor = held_batcher(QueuePolicy(max_queue_size=64, aging_ms=aging_ms))
    batcher.submit(req(2, 0.0, "low"))
    for i in range(40):
        batcher.submit(req(0, 0.010 * i, f"hi{i}"))
    order = drain(batcher, executor, 41)
    assert order.index("low") == (20 if aging_ms else 40)


def test_timeout_reject_fails_the_expired_request_with_the_reason() -> None:
    clock = Clock(0.0)
    batcher, executor = held_batcher(QueuePolicy(timeout_action="reject"), clock)
    batcher.submit(req(1, 0.0, "other"))  # queued first: the expired one is found behind it
    late = batcher.submit(req(0, 0.0, "late", deadline=5.0))
    clock.t = 10.0  # the instance frees after the deadline
    order = drain(batcher, executor, 1)
    assert order == ["other"]
    with pytest.raises(
        DeadlineExceeded, match=r"model 'm': request timed out in the queue after 10000 ms.*reject"
    ):
        late.result(0)


def test_timeout_delay_keeps_the_request_but_sends_it_to_the_back() -> None:
    clock = Clock(0.0)
    batcher, executor = held_batcher(QueuePolicy(timeout_action="delay"), clock)
    late = batcher.submit(req(0, 0.0, "late", deadline=5.0))
    batcher.submit(req(2, 1.0, "low"))  # would run after "late" had it not timed out
    clock.t = 10.0
    assert drain(batcher, executor, 2) == ["low", "late"]
    assert late.result(0) is None  # answered (run), not failed


# --- across models on one core --------------------------------------------------------------------
class FakeBatcher:
    def __init__(self, model: FakeModel, clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.name, self.clock = model, model.name, clock
        self.policy = model.config.queue


def test_across_models_the_urgent_batch_runs_first_on_a_one_core_pool() -> None:
    scheduler = Scheduler(cores=1)
    ran: list[str] = []
    gate = threading.Event()
    config = ModelConfig("x", queue=QueuePolicy(aging_ms=100))
    blocker = FakeModel("blocker", config, ran, gate)
    low, urgent, aged = (FakeModel(n, config, ran) for n in ("low", "urgent", "aged"))
    done: list[str] = []

    def submit(model: FakeModel, priority: int, enqueued: float) -> None:
        r = InferRequest({"x": X}, enqueued=enqueued, priority=priority)
        r.rank = enqueued + priority * 0.1  # what the batcher sets
        scheduler.execute(FakeBatcher(model), [r], lambda: done.append(model.name))  # type: ignore[arg-type]

    try:
        submit(blocker, 1, 0.0)  # holds the only worker until the gate opens
        submit(low, 2, 100.0)  # ranks 100.2
        submit(urgent, 0, 100.1)  # ranks 100.1: queued later, runs first
        submit(aged, 2, 99.0)  # ranks 99.2: waited long enough to pass the urgent one
        gate.set()
        scheduler.pool.shutdown(wait=True)
    finally:
        gate.set()
    assert ran == ["blocker", "aged", "urgent", "low"]
    assert sorted(done) == sorted(ran)


def test_a_starved_batch_surfaces_by_its_deadline_and_is_rejected() -> None:
    """Strict priority (aging_ms 0): a level-2 batch would wait behind every urgent one; with a
    timeout it ranks by its deadline at the latest, and is then answered with the reason."""
    scheduler = Scheduler(cores=1)
    ran: list[str] = []
    gate = threading.Event()
    config = ModelConfig("x", queue=QueuePolicy(aging_ms=0))
    blocker = FakeModel("blocker", config, ran, gate)
    low, urgent = FakeModel("low", config, ran), FakeModel("urgent", config, ran)
    now = time.monotonic()
    starved = InferRequest({"x": X}, enqueued=now, priority=2, deadline=now - 1.0)  # already expired
    starved.rank = now + 2 * 1e9
    fresh = InferRequest({"x": X}, enqueued=now, priority=0)
    fresh.rank = now
    try:
        scheduler.execute(FakeBatcher(blocker), [InferRequest({"x": X}, priority=1)], lambda: None)  # type: ignore[arg-type]
        scheduler.execute(FakeBatcher(urgent), [fresh], lambda: None)  # type: ignore[arg-type]
        scheduler.execute(FakeBatcher(low), [starved], lambda: None)  # type: ignore[arg-type]
        gate.set()
        scheduler.pool.shutdown(wait=True)
    finally:
        gate.set()
    assert ran == ["blocker", "urgent"]
    with pytest.raises(DeadlineExceeded, match="model 'low': request timed out in the queue.*reject"):
        starved.future.result(0)


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("queue", "message"),
    [
        ({"timeout_action": "drop"}, "queue.timeout_action must be 'reject' or 'delay', got 'drop'"),
        ({"aging_ms": -1}, "queue.aging_ms must be >= 0"),
        ({"aging_ms": 1.5}, "queue.aging_ms must be an integer"),
        ({"allow_timeout_override": "no"}, "queue.allow_timeout_override must be true or false"),
        ({"max_queue_size": 0}, "queue.max_queue_size must be >= 1"),
        ({"priority_levels": 3}, "unknown key"),
    ],
)
def test_queue_policy_errors_name_the_file_and_key(queue: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^m/config.yaml: ") as err:
        parse_config({"queue": queue}, "m", "m/config.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize(("value", "level"), [(None, None), (0, None), (1, 0), (2, 1), (3, 2)])
def test_request_priority_is_numbered_as_triton_numbers_it(value: Any, level: int | None) -> None:
    assert request_priority(value, "m") == level


@pytest.mark.parametrize("value", [-1, 4, 1.0, "1", True, [1]])
def test_bad_request_priority_names_the_model_and_the_range(value: Any) -> None:
    with pytest.raises(BadInput, match=r"model 'm': parameter 'priority' must be an integer 0\.\.3"):
        request_priority(value, "m")


def test_http_body_priority_parameter_is_parsed() -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}
    msg = parse_request(json.dumps({**body, "parameters": {"priority": 1}}).encode(), None, "m")
    assert msg.priority_level("m") == 0
    assert parse_request(json.dumps(body).encode(), None, "m").priority_level("m") is None
    bad = parse_request(json.dumps({**body, "parameters": {"priority": 9}}).encode(), None, "m")
    with pytest.raises(BadInput, match="model 'm': parameter 'priority'"):
        bad.priority_level("m")


def test_grpc_priority_parameter_is_parsed() -> None:
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2

    from modelkiln.serve.grpc import decode_priority

    request = service_pb2.ModelInferRequest(model_name="m")
    assert decode_priority(request) is None
    request.parameters["priority"].uint64_param = 1  # what tritonclient.grpc sends for priority=1
    assert decode_priority(request) == 0
    request.parameters["priority"].int64_param = 3
    assert decode_priority(request) == 2
    request.parameters["priority"].uint64_param = 7
    with pytest.raises(BadInput, match="model 'm': parameter 'priority' must be an integer 0..3"):
        decode_priority(request)
    request.parameters["priority"].string_param = "high"
    with pytest.raises(BadInput, match="got 'high'"):
        decode_priority(request)


def test_chat_priority_field_is_parsed_and_checked() -> None:
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(body).priority is None
    assert parse_chat({**body, "priority": 1}).priority == 0
    with pytest.raises(BadInput, match="model 'qwen': parameter 'priority'"):
        parse_chat({**body, "priority": "urgent"})


# --- through the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prio-repo")
    tmp = tmp_path_factory.mktemp("prio-models")
    add_model(root, "open", affine_model(tmp / "a.onnx"), ModelConfig("open", max_batch_size=4))
    fixed = QueuePolicy(default_timeout_us=0, allow_timeout_override=False)
    add_model(
        root, "fixed", affine_model(tmp / "b.onnx"), ModelConfig("fixed", max_batch_size=4, queue=fixed)
    )
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ModelServer]:
    s = ModelServer(str(repo), cores=1)
    s.load_all()
    yield s
    s.shutdown()


def test_server_infer_takes_a_priority_level_and_refuses_bad_ones(server: ModelServer) -> None:
    out = server.infer("open", {"x": X}, priority=0).result(30)
    np.testing.assert_allclose(out.outputs["y"], X * 2 + 1)
    with pytest.raises(BadInput, match=r"model 'open': priority level must be an integer 0\.\.2, got 3"):
        server.infer("open", {"x": X}, priority=3)


def test_request_timeout_is_ignored_unless_the_queue_allows_override(server: ModelServer) -> None:
    with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
        server.infer("open", {"x": X}, timeout_s=1e-9).result(30)  # expired before it is taken
    out = server.infer("fixed", {"x": X}, timeout_s=1e-9).result(30)  # override off: no timeout
    np.testing.assert_allclose(out.outputs["y"], X * 2 + 1)


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[Running]:
    r = Running(repo)
    yield r
    r.stop()


def _post(running: Running, model: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "parameters": params,
    }
    req = urllib.request.Request(
        f"http://{running.url}/v2/models/{model}/infer", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_priority_parameter_end_to_end(running: Running) -> None:
    status, body = _post(running, "open", {"priority": 1})
    assert status == 200 and body["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
    status, body = _post(running, "open", {"priority": "high"})
    assert status == 400
    assert "model 'open': parameter 'priority' must be an integer 0..3" in body["error"]
