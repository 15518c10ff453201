"""Chat models under kiln serve --memory-budget, on the exported tiny Qwen2-VL: a sequence reserves
exactly what its KV cache takes from the pool (measured against the pool), for as long as it
runs, and gives it back however it ends; a reservation that does not fit evicts idle models, or
waits and fails with why; the warm-up's cache is not in the model's measured cost."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from conftest import add_model, affine_model
from modelkiln.errors import ModelUnavailable
from modelkiln.genai import batch as genai_batch
from modelkiln.serve.config import GenAIConfig, ModelConfig, dump_config
from modelkiln.serve.generation import ChatJob
from modelkiln.serve.model import ServedModel
from modelkiln.serve.server import ModelServer

pytest.importorskip("transformers")
pytest.importorskip("torch")

T = TypeVar("T")
MB = 1 << 20
X = {"x": np.ones((1, 4), np.float32)}
MESSAGES = [{"role": "user", "content": "Hello there"}]
NEW_TOKENS = 6
COSTS = {"qwen": 10 * MB, "a": 40 * MB}


@pytest.fixture(scope="module")
def folder(qwen_tiny_export: tuple[Path, Any]) -> Path:
    return qwen_tiny_export[0]


@pytest.fixture(scope="module")
def kv_bytes(folder: Path) -> int:
    """What one test chat's sequence takes: its prompt's tokens plus NEW_TOKENS positions."""
    from modelkiln.genai.chat import ChatModel

    chat = ChatModel(folder)
    return chat.engine.sequence_bytes(chat.prompt(MESSAGES).tokens + NEW_TOKENS)


@pytest.fixture
def repo(tmp_path: Path, folder: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(folder, root / "qwen" / "1")
    config = ModelConfig("qwen", backend="genai", genai=GenAIConfig(max_sequences=1, max_new_tokens=16))
    (root / "qwen" / "config.yaml").write_text(dump_config(config))
    add_model(root, "a", affine_model(tmp_path / "a.onnx"), ModelConfig("a", max_batch_size=4))
    return root


def fake_costs(seen: dict[str, int] | None = None, pool: Any = None) -> Any:
    """Each model costs COSTS; ``seen`` gets what the request pool still held when a load ended."""

    def measure(name: str, load: Callable[[], T]) -> tuple[T, int]:
        out = load()
        if seen is not None:
            stats = pool().stats()
            seen[name] = stats.in_use_bytes + stats.cached_bytes
        return out, COSTS[name]

    return measure


def start(repo: Path, budget: int, seen: dict[str, int] | None = None) -> ModelServer:
    holder: list[ModelServer] = []
    server = ModelServer(
        str(repo), cores=2, memory_budget=budget, measure=fake_costs(seen, lambda: holder[0].scheduler.memory)
    )
    holder.append(server)
    server.load_all()
    return server


@pytest.fixture
def blocker(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, threading.Event]]:
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


def job(**kw: Any) -> ChatJob:
    return ChatJob(MESSAGES, [], NEW_TOKENS, **kw)


def kv(server: ModelServer) -> int | None:
    return next(r.kv_reserved_bytes for r in server.memory_stats() if r.name == "qwen")


def spy_reservations(
    server: ModelServer, then: Callable[[], None] = lambda: None
) -> list[tuple[int, int | None]]:
    """Each reservation asked for: (bytes asked, the model's reserved bytes right after)."""
    assert server.memory is not None
    memory, real, seen = server.memory, server.memory.reserve, []

    def reserve(*args: Any, **kw: Any) -> Any:
        res = real(*args, **kw)
        seen.append((args[1], kv(server)))
        then()
        return res

    memory.reserve = reserve  # type: ignore[method-assign]
    return seen


def test_sequence_bytes_is_what_a_sequence_takes(folder: Path) -> None:
    """What a budget reserves for a sequence is what it holds: the logits buffer from the pool and,
    in the shared layout, the pages its positions fill in its slot, once (no second buffer: the
    model's own bytes per position, rounded up to whole pages)."""
    from modelkiln.genai.chat import ChatModel
    from modelkiln.genai.kv_cache import PAGE
    from modelkiln.runtime.memory_pool import MemoryPool

    pool = MemoryPool()
    chat = ChatModel(folder, pool=pool)
    engine = chat.engine
    for new in (1, NEW_TOKENS, 300):
        prompt = chat.prompt(MESSAGES)
        gen = chat.start(prompt, new)
        positions = prompt.tokens + new
        naive = len(engine.past_names) * engine.kv_heads * positions * engine.head_dim * 4
        taken = pool.stats().in_use_bytes
        if engine.shared:
            assert engine.kv is not None
            cache = engine.kv.slot_bytes(positions)
            assert taken + cache == engine.sequence_bytes(positions)
            assert naive <= cache < naive + len(engine.past_names) * engine.kv_heads * PAGE
        else:  # two buffers (ping-pong) per cache tensor
            assert taken == engine.sequence_bytes(positions) and taken >= 2 * naive
        gen.close()
        assert pool.stats().in_use_bytes == 0


def test_a_chat_holds_its_reservation_while_it_runs_and_gives_it_back(repo: Path, kv_bytes: int) -> None:
    seen_pool: dict[str, int] = {}
    server = start(repo, 100 * MB, seen_pool)
    try:
        assert seen_pool["qwen"] == 0  # the warm-up's cache left the pool before the measurement ended
        assert server.scheduler.memory.stats().in_use_bytes == 0
        assert server.memory is not None and server.memory.held() == 10 * MB  # its cost alone
        asked = spy_reservations(server)
        result = server.chat("qwen", job()).result(60)
        assert result.completion_tokens >= 1
        assert asked == [(kv_bytes, kv_bytes)]  # exactly the sequence's bytes, counted while it ran
        assert kv(server) == 0 and server.memory.held() == 10 * MB
    finally:
        server.shutdown()


def test_a_chat_evicts_the_idle_model_it_needs_room_from(repo: Path, kv_bytes: int) -> None:
    server = start(repo, 50 * MB + kv_bytes - 1)  # qwen and a fill it but for one byte less than a chat
    try:
        server.infer("a", X).result(30)
        assert server.chat("qwen", job()).result(60).completion_tokens >= 1
        row = {r["name"]: r for r in server.index()}["a"]
        assert (
            row["state"] == "UNAVAILABLE"
            and row["reason"] == "evicted to fit a sequence of qwen (memory budget)"
        )
        assert next(r for r in server.memory_stats() if r.name == "a").evictions == 1
        assert next(r for r in server.memory_stats() if r.name == "qwen").kv_evictions == 1
        assert kv(server) == 0
    finally:
        server.shutdown()


def test_a_chat_that_cannot_fit_waits_then_fails_with_why_and_frees_its_slot(
    repo: Path, kv_bytes: int, blocker: dict[str, threading.Event]
) -> None:
    server = start(repo, 50 * MB + kv_bytes - 1)
    try:
        blocker["a"] = threading.Event()
        busy = server.infer("a", X)  # a in use: it cannot be unloaded for the chat
        deadline = time.monotonic() + 10
        while not any(r.resident_bytes for r in server.memory_stats() if r.name == "a"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ModelUnavailable) as err:
            server.chat("qwen", job(deadline=time.monotonic() + 0.3)).result(60)
        message = str(err.value)
        assert f"model 'qwen': a chat sequence needs {kv_bytes / 1024:.1f} kB for its KV cache" in message
        assert "40.0 MB in use by other requests (waited" in message and "10.0 MB pinned" in message
        assert kv(server) == 0
        blocker["a"].set()
        busy.result(30)
        # the slot (max_sequences 1) was given back: the next chat runs, a unloaded for it
        assert server.chat("qwen", job()).result(60).completion_tokens >= 1
        assert kv(server) == 0
    finally:
        server.shutdown()


def test_every_way_a_chat_ends_gives_its_reservation_back(
    repo: Path, kv_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start(repo, 100 * MB)
    try:
        chat = server.get("qwen").model.chat  # type: ignore[attr-defined]
        # cancelled (its client left) once it holds the reservation
        cancelled = job()
        asked = spy_reservations(server, then=cancelled.cancelled.set)
        assert server.chat("qwen", cancelled).result(60).finish_reason == "cancelled"
        assert asked == [(kv_bytes, kv_bytes)] and kv(server) == 0
        # its cache cannot be allocated (e.g. the pool's own limit)
        real_start = chat.start
        monkeypatch.setattr(chat, "start", lambda *a, **k: (_ for _ in ()).throw(MemoryError("pool full")))
        with pytest.raises(MemoryError, match="pool full"):
            server.chat("qwen", job()).result(60)
        assert kv(server) == 0
        monkeypatch.setattr(chat, "start", real_start)
        # a decode round fails
        monkeypatch.setattr(
            genai_batch, "decode_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        with pytest.raises(RuntimeError, match="boom"):
            server.chat("qwen", job()).result(60)
        assert kv(server) == 0
        monkeypatch.undo()
        # cancelled while still waiting for its slot: never reserves
        waiting = job()
        waiting.cancelled.set()
        assert server.chat("qwen", waiting).result(60).finish_reason == "cancelled"
        # and a normal chat after all of it
        assert server.chat("qwen", job()).result(60).finish_reason in ("stop", "length")
        assert kv(server) == 0 and len(asked) == 4
    finally:
        server.shutdown()


def test_without_a_budget_chats_reserve_nothing(repo: Path) -> None:
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        assert server.get("qwen").queue.ledger is None  # type: ignore[attr-defined]
        assert server.chat("qwen", job()).result(60).completion_tokens >= 1
        assert server.memory_stats() == []
    finally:
        server.shutdown()
