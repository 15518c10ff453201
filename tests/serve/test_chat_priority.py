"""A chat's own priority (the ``priority`` field of /v1/chat/completions) reaches the shared pool:
its prefill and steps run at its level, a batched decode round at its most urgent sequence's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from modelkiln.serve.config import GenAIConfig, ModelConfig
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
