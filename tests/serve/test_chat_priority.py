"""A chat's own priority (the ``priority`` field of /v1/chat/completions) reaches the shared pool:
its prefill and steps run at its level, a batched decode round at its most urgent sequence's; and
chats waiting for a slot take it in order of priority with aging, first come first served within
a level (the scheduler's rule for one-shot requests)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from modelkiln.errors import ModelUnavailable, QueueFull
from modelkiln.serve.config import GenAIConfig, ModelConfig, QueuePolicy
from modelkiln.serve.generation import ChatJob, GenerationQueue, _Sequence
from modelkiln.serve.openai import parse_chat


class Pool:
    def __init__(self) -> None:
        self.levels: list[int] = []

    def submit(self, fn: Any, *args: Any, priority: int) -> None:
        self.levels.append(priority)  # recorded, never run


def _queue(model_priority: int = 1) -> tuple[GenerationQueue, Pool]:
    config = ModelConfig("chat", backend="genai", genai=GenAIConfig(), priority=model_priority)
    model = SimpleNamespace(name="chat", config=config, genai=config.genai)
    pool = Pool()
    return GenerationQueue(model, SimpleNamespace(pool=pool)), pool  # type: ignore[arg-type]


def _job(priority: int | None) -> ChatJob:
    return ChatJob([{"role": "user", "content": "hi"}], [], 4, priority=priority)


def _state(job: ChatJob) -> _Sequence:
    return _Sequence(job, None, None, 1, 0.0)  # type: ignore[arg-type]


def test_a_chats_own_level_schedules_its_work() -> None:
    queue, pool = _queue(model_priority=1)
    queue._schedule(queue._begin, _job(0))  # prefill at the chat's level
    queue._schedule(queue._step, _state(_job(2)))  # a step at its sequence's level
    queue._schedule(queue._begin, _job(None))  # no priority: the model's
    assert pool.levels == [0, 2, 1]


def test_a_decode_round_runs_at_its_most_urgent_sequence() -> None:
    queue, pool = _queue(model_priority=1)
    queue._ready = [_state(_job(2)), _state(_job(0)), _state(_job(None))]
    queue._schedule_round()
    queue._ready = [_state(_job(None))]
    queue._schedule_round()
    assert pool.levels == [0, 1]


def test_the_chat_body_priority_reaches_the_job() -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "priority": 1}
    request = parse_chat(body)
    assert request.job.priority == request.priority == 0  # Triton's numbering: 1 is the most urgent
    assert parse_chat({**body, "priority": 3}).job.priority == 2
    assert parse_chat({k: v for k, v in body.items() if k != "priority"}).job.priority is None


# --- admission to a slot: priority with aging, FIFO within a level -------------------------------
class Recorder:
    """A pool that records which chat each task was for (never runs them)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def submit(self, fn: Any, *args: Any, priority: int) -> None:
        self.started.append(args[1].messages[0]["content"])  # args: (task, job)


def _one_slot(aging_ms: int = 100) -> tuple[GenerationQueue, Recorder, list[float]]:
    """max_sequences=1; the queue's clock reads ``now[0]``."""
    config = ModelConfig(
        "chat", backend="genai", genai=GenAIConfig(max_sequences=1), queue=QueuePolicy(aging_ms=aging_ms)
    )
    model = SimpleNamespace(name="chat", config=config, genai=config.genai)
    pool = Recorder()
    queue = GenerationQueue(model, SimpleNamespace(pool=pool))  # type: ignore[arg-type]
    now = [100.0]
    queue.clock = lambda: now[0]
    return queue, pool, now


def _named(name: str, priority: int | None, enqueued: float) -> ChatJob:
    return ChatJob([{"role": "user", "content": name}], [], 4, priority=priority, enqueued=enqueued)


def _drain(queue: GenerationQueue, n: int) -> None:
    for _ in range(n):
        queue._next()  # the running chat ended: the best waiting one takes its slot


def test_a_later_urgent_chat_takes_the_next_slot_before_earlier_low_ones() -> None:
    queue, pool, now = _one_slot(aging_ms=100)
    queue.submit(_named("running", 1, 99.9))
    for i in range(3):
        queue.submit(_named(f"low{i}", 2, 100.00 + i * 0.01))
    queue.submit(_named("high", 0, 100.03))
    queue.submit(_named("model-level", None, 100.04))  # no priority: the model's (1)
    now[0] = 100.05
    _drain(queue, 5)
    assert pool.started == ["running", "high", "model-level", "low0", "low1", "low2"]
    assert queue.depth() == 1 and queue._active == 1  # the last one holds the slot


def test_aging_lets_a_low_chat_through_after_levels_times_aging() -> None:
    # a level-2 chat gains a level per 100 ms: urgent chats that came more than 200 ms after it
    # wait behind it, those within 200 ms go first
    queue, pool, now = _one_slot(aging_ms=100)
    queue.submit(_named("running", 1, 99.0))
    queue.submit(_named("low", 2, 100.0))
    queue.submit(_named("urgent-late", 0, 100.25))
    queue.submit(_named("urgent-soon", 0, 100.15))
    now[0] = 100.3
    _drain(queue, 3)
    assert pool.started == ["running", "urgent-soon", "low", "urgent-late"]


def test_without_aging_priority_is_strict() -> None:
    queue, pool, now = _one_slot(aging_ms=0)
    queue.submit(_named("running", 1, 0.0))
    queue.submit(_named("low", 2, 1.0))
    queue.submit(_named("high", 0, 1000.0))  # 999 s later, still first
    now[0] = 1001.0
    _drain(queue, 2)
    assert pool.started == ["running", "high", "low"]


def test_a_full_queue_refuses_and_unloading_fails_the_waiting() -> None:
    config = ModelConfig(
        "chat", backend="genai", genai=GenAIConfig(max_sequences=1), queue=QueuePolicy(max_queue_size=2)
    )
    model = SimpleNamespace(name="chat", config=config, genai=config.genai)
    queue = GenerationQueue(model, SimpleNamespace(pool=Recorder()))  # type: ignore[arg-type]
    queue.submit(_named("running", 1, 0.0))
    waiting = [queue.submit(_named(f"w{i}", 2 - i, float(i))) for i in range(2)]
    with pytest.raises(QueueFull, match="2 chats waiting"):
        queue.submit(_named("one-too-many", 0, 3.0))
    queue._active = 0  # the running chat is gone (nothing ran it here)
    queue.close(drain=False)
    for future in waiting:
        with pytest.raises(ModelUnavailable, match="unloaded"):
            future.result(0)
