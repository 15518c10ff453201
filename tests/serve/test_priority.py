"""Per-request priority and Triton's queue policy: urgent requests are batched first inside a
model's queue and run first across models on a shared 1-core pool; a waiting request ages (one
level per aging_ms), so a low-priority one is served after a bounded number of urgent ones;
a timeout that expires in the queue fails the request (reject) or sends it to the back (delay);
on a multi-core budget less urgent batches leave a core to the most urgent active level; a request
that needs no batching is handed over by the thread that submits it; bad values are refused naming
the model; HTTP, gRPC and chat bodies carry the parameter.

Deterministic: the instance is held busy by the test (no model runs until released), requests
carry explicit queue times, and expiry and the scheduler's urgent window read a fake clock.
Nothing asserts on speed."""

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
from modelkiln.serve.scheduler import Scheduler, effective_level
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
        self.threads: list[str] = []  # the thread that handed each batch over
        self._done: list[Callable[[], None]] = []
        self.cond = threading.Condition()

    def execute(self, batcher: Any, batch: list[InferRequest], done: Callable[[], None]) -> None:
        with self.cond:
            self.batches.append(batch)
            self.threads.append(threading.current_thread().name)
            self._done.append(done)
            self.cond.notify_all()

    def wait_batches(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.batches) >= n, timeout=10), len(self.batches)

    def release(self, i: int = -1) -> None:
        """Answer batch ``i`` (the last by default) and free its instance for the next."""
        batch, done = self.batches[i], self._done[i]
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


# --- the level/aging rule as a function -------------------------------------------------------------
def test_effective_level_gains_one_level_per_aging_ms_and_orders_as_the_ranks_do() -> None:
    assert effective_level(2, 0.0, 100) == 2
    assert effective_level(2, 0.2, 100) == pytest.approx(0.0)
    assert effective_level(2, 0.5, 100) == pytest.approx(-3.0)  # long waits: oldest first
    assert effective_level(2, 3600.0, 0) > 1.99  # aging_ms 0: strict priority
    now, aging_ms = 50.0, 100
    reqs = [(p, t) for p in (0, 1, 2) for t in (49.5, 49.83, 49.97, 50.0)]  # no two ranks equal
    by_rank = sorted(reqs, key=lambda r: r[1] + r[0] * aging_ms / 1e3)
    by_level = sorted(reqs, key=lambda r: effective_level(r[0], now - r[1], aging_ms))
    assert by_level == by_rank


# --- hand-over without the batcher thread ---------------------------------------------------------
def test_a_request_needing_no_batching_is_handed_over_by_the_submitting_thread() -> None:
    """Idle instance, empty queue, no batch-forming delay: the batch reaches the scheduler before
    submit returns, on the caller's thread; requests that find every instance busy queue and go
    through the batcher thread, in rank order, as instances free up."""
    config = ModelConfig("m", max_batch_size=4, instance_count=2)
    executor = HeldExecutor()
    batcher = DynamicBatcher(FakeModel("m", config), executor)  # type: ignore[arg-type]
    me = threading.current_thread().name
    batcher.submit(req(1, 0.0, "a"))
    batcher.submit(req(1, 0.1, "b"))
    assert len(executor.batches) == 2 and executor.threads == [me, me]  # no hop, one per instance
    batcher.submit(req(2, 0.2, "low"))
    batcher.submit(req(0, 0.3, "urgent"))
    assert batcher.depth() == 2  # both instances busy: they wait
    executor.release(0)
    executor.wait_batches(3)
    assert executor.threads[2] == "batcher-m"
    assert [r.tag for r in executor.batches[2]] == ["urgent"]  # type: ignore[attr-defined]
    executor.release(1)
    executor.wait_batches(4)
    assert [r.tag for r in executor.batches[3]] == ["low"]  # type: ignore[attr-defined]
    executor.release(2)
    batcher.submit(req(1, 0.4, "c"))  # an instance is idle again and nothing waits: direct
    assert executor.threads[4] == me and batcher.depth() == 0
    executor.release(3)
    executor.release(4)
    batcher.close()


def test_a_batching_model_keeps_its_delay_and_does_not_hold_another_models_requests() -> None:
    """A model with a batch-forming delay gathers on its own thread; a model without one (the
    urgent model) hands its request over at once, whatever the other model is waiting for."""
    executor = HeldExecutor()
    bulk_cfg = ModelConfig("bulk", max_batch_size=4, dynamic_batching=DynamicBatching((4,), 30_000_000))
    bulk = DynamicBatcher(FakeModel("bulk", bulk_cfg), executor)  # type: ignore[arg-type]
    urgent = DynamicBatcher(FakeModel("urgent", ModelConfig("urgent", max_batch_size=4)), executor)  # type: ignore[arg-type]
    bulk.submit(req(2, time.monotonic(), "bulk"))  # waits up to 30 s for three more
    urgent.submit(req(0, time.monotonic(), "urgent"))
    assert [[r.tag for r in b] for b in executor.batches] == [["urgent"]]  # type: ignore[attr-defined]
    assert executor.threads == [threading.current_thread().name] and bulk.depth() == 1
    executor.release(0)
    for i in range(3):
        bulk.submit(req(2, time.monotonic(), f"bulk{i}"))  # the batch is full: it leaves at once
    executor.wait_batches(2)
    assert executor.threads[1] == "batcher-bulk" and len(executor.batches[1]) == 4
    executor.release(1)
    bulk.close()
    urgent.close()


# --- keeping a core for the most urgent level -----------------------------------------------------
class Gated:
    """Models whose inference starts when the scheduler runs it and ends when the test says so."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started: list[str] = []
        self.threads: dict[str, str] = {}  # model: the worker thread that ran it
        self.gates: dict[str, threading.Event] = {}

    def model(self, name: str, threads: int = 1) -> FakeModel:
        self.gates[name] = threading.Event()
        config = ModelConfig(name, threads_per_instance=threads, queue=QueuePolicy(aging_ms=100))
        gated = self

        class Model(FakeModel):
            def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                with gated.cond:
                    gated.started.append(self.name)
                    gated.threads[self.name] = threading.current_thread().name
                    gated.cond.notify_all()
                gated.gates[self.name].wait(30)
                return {"y": feed["x"]}

        return Model(name, config)

    def wait_started(self, name: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: name in self.started, timeout=10), (name, self.started)

    def release(self, name: str) -> None:
        self.gates[name].set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


def wait_parked(scheduler: Scheduler, n: int) -> None:
    end = time.monotonic() + 10
    while scheduler.parked() != n:
        assert time.monotonic() < end, scheduler.parked()
        time.sleep(0.001)


def run_on(scheduler: Scheduler, model: FakeModel, priority: int, enqueued: float) -> InferRequest:
    r = InferRequest({"x": X}, enqueued=enqueued, priority=priority)
    r.rank = enqueued + priority * 0.1  # what the batcher sets (aging_ms 100)
    scheduler.execute(FakeBatcher(model), [r], lambda: None)  # type: ignore[arg-type]
    return r


def test_on_two_cores_less_urgent_batches_leave_a_core_to_the_active_urgent_level() -> None:
    clock = Clock(100.0)
    scheduler = Scheduler(cores=2, clock=clock, reserve_cores=1, urgent_window_s=1.0)
    g = Gated()
    u0, u1, b1, b2, b3 = (g.model(n) for n in ("u0", "u1", "b1", "b2", "b3"))
    try:
        g.release("u0")
        run_on(scheduler, u0, 0, 100.0).future.result(10)  # level 0 is active from now on
        run_on(scheduler, b1, 2, 100.0)
        g.wait_started("b1")  # the first bulk batch takes a core
        b2_req = run_on(scheduler, b2, 2, 99.0)  # ranks 99.2: before any urgent request to come
        wait_parked(scheduler, 1)  # a worker is free, yet b2 does not take the reserved core
        assert g.started == ["u0", "b1"] and scheduler.held_cores() == [0, 0, 1]
        assert scheduler.ready_ranks() == [pytest.approx(99.2)]
        run_on(scheduler, u1, 0, 100.5)  # ranks after b2, starts first: its core was kept free
        g.wait_started("u1")
        assert g.started == ["u0", "b1", "u1"] and scheduler.held_cores() == [1, 0, 1]
        g.release("u1")
        g.release("b1")  # a bulk core frees: the parked token comes back and b2 runs on it
        g.wait_started("b2")
        assert scheduler.held_cores()[2] == 1
        clock.t = 101.6  # level 0 last seen 1.1 s ago (the window is 1 s): bulk may use both cores
        run_on(scheduler, b3, 2, 101.6)
        g.wait_started("b3")
        assert scheduler.held_cores() == [0, 0, 2]
        g.release_all()
        assert b2_req.future.result(10).batch_size == 1
    finally:
        g.release_all()
        scheduler.shutdown()


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 2)])
def test_the_reservation_never_stops_the_last_less_urgent_batch(cores: int, threads: int) -> None:
    """On one core nothing is reserved; a bulk model whose instance needs every core still runs
    when no other bulk batch does: less urgent traffic is slowed by the reservation, never starved."""
    scheduler = Scheduler(cores=cores, clock=Clock(100.0), reserve_cores=1, urgent_window_s=1.0)
    g = Gated()
    u0, bulk = g.model("u0"), g.model("bulk", threads)
    try:
        g.release("u0")
        run_on(scheduler, u0, 0, 100.0).future.result(10)
        run_on(scheduler, bulk, 2, 100.0)
        g.wait_started("bulk")
        assert scheduler.held_cores() == [0, 0, threads]
    finally:
        g.release_all()
        scheduler.shutdown()


def test_a_bulk_batch_waits_without_a_token_and_its_core_s_worker_runs_it_next() -> None:
    """While the bulk share is full, a newly formed bulk batch wakes no worker: it waits, and the
    worker whose bulk batch ends takes it itself, leaving the other worker asleep for urgent work."""
    scheduler = Scheduler(cores=2, clock=Clock(100.0), reserve_cores=1, urgent_window_s=1.0)
    g = Gated()
    u0, b1, b2, b3 = (g.model(n) for n in ("u0", "b1", "b2", "b3"))
    try:
        g.release("u0")
        run_on(scheduler, u0, 0, 100.0).future.result(10)
        run_on(scheduler, b1, 2, 100.0)
        g.wait_started("b1")
        run_on(scheduler, b2, 2, 100.1)
        run_on(scheduler, b3, 2, 100.2)
        assert scheduler.parked() == 2 and scheduler.pool.queued() == 0  # decided at once
        g.release("b1")
        g.wait_started("b2")
        assert g.threads["b2"] == g.threads["b1"] and scheduler.parked() == 1
        g.release("b2")
        g.wait_started("b3")
        assert g.threads["b3"] == g.threads["b1"] and scheduler.parked() == 0
    finally:
        g.release_all()
        scheduler.shutdown()


def test_a_parked_batch_still_runs_when_the_pool_closes() -> None:
    scheduler = Scheduler(cores=2, clock=Clock(100.0), reserve_cores=1, urgent_window_s=1.0)
    g = Gated()
    u0, b1, b2 = g.model("u0"), g.model("b1"), g.model("b2")
    try:
        g.release("u0")
        run_on(scheduler, u0, 0, 100.0).future.result(10)
        run_on(scheduler, b1, 2, 100.0)
        g.wait_started("b1")
        parked = run_on(scheduler, b2, 2, 100.0)
        wait_parked(scheduler, 1)
        scheduler.pool.shutdown(wait=False)  # no more tokens: b1's worker runs b2 itself
        g.release("b1")
        g.wait_started("b2")
        g.release("b2")
        assert parked.future.result(10).batch_size == 1
    finally:
        g.release_all()
        scheduler.shutdown()


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
