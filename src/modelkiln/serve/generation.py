"""Serving a generative model: a loaded chat model and the queue that runs its sequences.

Each accepted request becomes a sequence. Its prompt preparation (template, images, vision
encoder) and prefill run as one task on the server's one thread pool, at the model's priority and
under the core budget; then, with continuous batching (the default), one decode round after
another computes the next token of every prefilled sequence in one batched run of the decoder
(sequences join and leave between rounds); without it each sequence's steps are tasks of their
own. Either way chats interleave token by token with each other and with the one-shot models.
A decode round is planned (``genai/plan.py``: cancelled chats finish, the others decode) and
executed; a round whose batched run fails retries its sequences one by one, and only those that
fail alone fail. With a shared-buffer decoder every sequence holds a slot of one cache buffer
(the engine is configured with ``max_sequences`` slots of the model's context), and a round
binds those rows in place: no per-token copy of any cache.

At most ``max_sequences`` sequences hold a KV cache at once; further requests wait in a bounded
queue (full: QueueFull, 503) and take a freed slot in order of priority, with the aging one-shot
requests have (one level per ``aging_ms`` of wait), first come first served within a level. Under
a memory budget a sequence also reserves the bytes its KV cache takes (``KVLedger``) before its
cache is allocated, and gives them back however it ends. Each piece of text is handed to the
request's ``emit`` as it is decoded; the future ends with a ChatResult or the request's own error;
a failing sequence never touches the others.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelkiln.delivery.crypto import ModelKey
from modelkiln.errors import BadInput, ConfigError, ModelUnavailable, QueueFull
from modelkiln.genai.chat import ChatModel, Prompt, TextStream
from modelkiln.genai.engine import Generation, Sampling
from modelkiln.genai.plan import Executor, plan_step
from modelkiln.serve.budget import DEFAULT_WAIT_S
from modelkiln.serve.config import GenAIConfig, ModelConfig
from modelkiln.serve.scheduler import Scheduler, effective_level

log = logging.getLogger(__name__)


@dataclass
class ChatJob:
    messages: list[dict[str, Any]]
    images: list[np.ndarray]
    max_new_tokens: int | None  # None: up to the model's limit and the context left
    sampling: Sampling = field(default_factory=Sampling)
    emit: Callable[[str], None] | None = None  # called from pool threads with each new text piece
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[ChatResult] = field(default_factory=Future)
    #: The chat's priority level (0 most urgent); None: its model's ``priority``.
    priority: int | None = None
    #: Until when (time.monotonic) it may wait for memory under a budget; None: its model's
    #: queue.default_timeout_us after ``enqueued``, else DEFAULT_WAIT_S.
    deadline: float | None = None
    #: Its KV-cache reservation while it holds one (under a memory budget).
    kv: KVHold | None = field(default=None, repr=False)


class KVHold(Protocol):
    """Bytes a running sequence holds in the memory budget; ``release`` is idempotent."""

    def release(self) -> None: ...


class KVLedger(Protocol):
    """Where sequences reserve their KV caches (serve/budget.py's MemoryBudget)."""

    def reserve(
        self,
        owner: str,
        nbytes: int,
        wait_until: float,
        on_grant: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
        abandoned: Callable[[], bool],
    ) -> KVHold | None:
        """The hold when it fits now; else None and later exactly one of ``on_grant(hold)`` or
        ``on_fail(error)``, from another thread. Raises when it can never fit."""


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token), "length" (max tokens) or "cancelled"
    queue_s: float
    first_token_s: float  # from acceptance to the first token
    total_s: float


def genai_section(config: ModelConfig) -> GenAIConfig:
    """The genai section of a generative model's config (ModelConfig fills it in for backend genai)."""
    if config.genai is None:
        raise ConfigError(f"model '{config.name}': a generative model needs backend: genai")
    return config.genai


class GenerativeModel:
    """One loaded version of a genai model (an exported folder run by ChatModel)."""

    def __init__(self, config: ModelConfig, version: int, folder: Path, chat: ChatModel) -> None:
        self.config, self.version, self.folder, self.chat = config, version, folder, chat
        self.name = config.name
        self.genai = genai_section(config)

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        version: int,
        folder: Path,
        scheduler: Scheduler,
        key: ModelKey | None = None,
    ) -> GenerativeModel:
        """The exported folder's graphs (decrypted in memory with ``key`` where encrypted)."""
        genai = genai_section(config)
        chat = ChatModel(
            folder,
            genai.decoder,
            config.threads_per_instance,
            scheduler.memory,
            vision_int8=genai.vision_int8,
            key=key,
        )
        chat.processor.max_tokens = chat.context  # refuse long prompts before embedding them
        # a shared-buffer decoder: one slot per sequence that may hold a cache, each up to the
        # context (virtual memory: a sequence's pages cost memory once written, see SharedKV)
        chat.engine.configure(slots=genai.max_sequences, capacity=chat.context)
        model = cls(config, version, folder, chat)
        if config.warmup:
            chat.start(chat.prompt([{"role": "user", "content": "Hello"}]), 2).run()
        return model

    def validate(self, feed: dict[str, np.ndarray]) -> int:
        raise BadInput(
            f"model '{self.name}' is a generative model: POST /v1/chat/completions instead of KServe infer"
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": "modelkiln_genai",
            "inputs": [],
            "outputs": [],
        }


class GenerationQueue:
    """The ModelQueue of a generative model (submit / depth / close)."""

    def __init__(self, model: GenerativeModel, scheduler: Scheduler, ledger: KVLedger | None = None) -> None:
        """``ledger``: the memory budget sequences reserve their KV caches in (None: no budget)."""
        self.model, self.scheduler, self.ledger = model, scheduler, ledger
        self.name = model.name
        self.max_sequences = model.genai.max_sequences
        self.capacity = model.config.queue.max_queue_size
        self.batching = model.genai.continuous_batching
        #: Chats waiting for a slot, with their arrival number (first come first served on ties).
        self._waiting: list[tuple[int, ChatJob]] = []
        self._arrivals = itertools.count()
        self.clock = time.monotonic  # the waits aging counts (tests pass a fake clock)
        self._ready: list[_Sequence] = []  # prefilled, waiting for the next batched decode step
        self._executor: Executor | None = None  # made at the first round (the engine is loaded)
        self._decoding = False  # a decode round is scheduled or running
        self._active = 0
        self._closed = False
        self._cond = threading.Condition()

    def submit(self, job: ChatJob) -> Future[ChatResult]:
        limit = self.model.genai.max_new_tokens
        if job.max_new_tokens is not None and job.max_new_tokens > limit:
            raise BadInput(
                f"model '{self.name}': max_tokens {job.max_new_tokens} exceeds this server's limit of {limit}"
            )
        with self._cond:
            if self._closed:
                raise ModelUnavailable(f"model '{self.name}' is unloading")
            if self._active < self.max_sequences:
                self._active += 1
            elif len(self._waiting) >= self.capacity:
                raise QueueFull(f"model '{self.name}': queue full ({self.capacity} chats waiting)")
            else:
                self._waiting.append((next(self._arrivals), job))
                return job.future
        self._schedule(self._begin, job)
        return job.future

    def depth(self) -> int:
        return len(self._waiting) + self._active

    def close(self, drain: bool = True) -> None:
        """Stop taking chats; running and queued ones finish (or fail when not draining)."""
        with self._cond:
            self._closed = True
            if not drain:
                waiting, self._waiting = self._waiting, []
                for _, job in waiting:
                    job.future.set_exception(ModelUnavailable(f"model '{self.name}' unloaded"))
            self._cond.wait_for(lambda: self._active == 0 and not self._waiting)

    # --- tasks on the shared pool ----------------------------------------------------------------
    def _level(self, job: ChatJob) -> int:
        """A chat's priority level on the shared pool: its own, else its model's."""
        return self.model.config.priority if job.priority is None else job.priority

    def _admission_key(self, arrival: int, job: ChatJob, now: float) -> tuple[float, int]:
        """A waiting chat's place in line now (lower first): its level less one per ``aging_ms``
        it has waited, the scheduler's rule for one-shot requests, so a low-priority chat is passed
        only by urgent ones that came within ``levels x aging_ms`` after it; ties by arrival."""
        waited = now - job.enqueued
        return effective_level(self._level(job), waited, self.model.config.queue.aging_ms), arrival

    def _memory_deadline(self, job: ChatJob) -> float:
        """Until when a chat may wait for its KV cache to fit the memory budget."""
        if job.deadline is not None:
            return job.deadline
        default_us = self.model.config.queue.default_timeout_us
        return job.enqueued + (default_us / 1e6 if default_us else DEFAULT_WAIT_S)

    def _schedule(self, fn: Callable[..., None], *args: Any) -> None:
        target = args[0]
        job = target.job if isinstance(target, _Sequence) else target
        try:
            self.scheduler.pool.submit(self._with_cores, fn, *args, priority=self._level(job))
        except Exception as exc:  # noqa: BLE001 - pool closed or full: answer, never drop
            self._fail(args[0], exc)

    def _with_cores(self, fn: Callable[..., None], *args: Any) -> None:
        cores = self.scheduler.budget.take(self.model.config.threads_per_instance)
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - this request's error, nobody else's
            if args:
                self._fail(args[0], exc)
            else:  # a decode round: answer every sequence waiting for it, never leave them hanging
                log.error("%s: decode round failed: %s", self.name, exc)
                self._fail_round(self._take_ready(), exc)
        finally:
            self.scheduler.budget.give(cores)

    def _begin(self, job: ChatJob) -> None:
        """A chat took a slot: its prompt (template, images, vision encoder), then, under a memory
        budget, the reservation of exactly what its cache will take (known once the prompt's
        length is), then its sequence."""
        if job.cancelled.is_set():  # its client left while it waited for the slot
            return self._unstarted(job, None)
        chat = self.model.chat
        started = time.monotonic()
        prompt = chat.prompt(job.messages, job.images)
        wanted = job.max_new_tokens
        if wanted is None:
            wanted = max(1, min(self.model.genai.max_new_tokens, chat.context - prompt.tokens))
        if self.ledger is None:
            return self._start(job, prompt, wanted, started)
        hold = self.ledger.reserve(
            self.name,
            chat.engine.sequence_bytes(prompt.tokens + wanted),
            self._memory_deadline(job),
            on_grant=lambda granted: self._granted(job, granted, prompt, wanted, started),
            on_fail=lambda exc: self._unstarted(job, exc),
            abandoned=job.cancelled.is_set,
        )
        if hold is not None:
            job.kv = hold
            self._start(job, prompt, wanted, started)

    def _granted(self, job: ChatJob, hold: KVHold, prompt: Prompt, wanted: int, started: float) -> None:
        """The budget made room for this chat's cache (from the budget's thread)."""
        job.kv = hold  # from now on every way out gives it back (_finish, _fail)
        self._schedule(self._start, job, prompt, wanted, started)

    def _start(self, job: ChatJob, prompt: Prompt, wanted: int, started: float) -> None:
        chat = self.model.chat
        gen = chat.start(prompt, wanted, job.sampling)
        state = _Sequence(job, gen, TextStream(chat.tokenizer, chat.stop), prompt.tokens, started)
        self._schedule(self._step, state)

    def _unstarted(self, job: ChatJob, exc: BaseException | None) -> None:
        """A chat that ends before its sequence starts: cancelled (a short "cancelled" result,
        as a cancelled running chat gets) or refused with ``exc``."""
        if exc is not None and not job.cancelled.is_set():
            return self._fail(job, exc)
        self._release_kv(job)
        now = time.monotonic()
        if not job.future.done():
            waited = now - job.enqueued
            job.future.set_result(ChatResult("", 0, 0, "cancelled", waited, waited, waited))
        self._next()

    @staticmethod
    def _release_kv(job: ChatJob) -> None:
        hold, job.kv = job.kv, None
        if hold is not None:
            hold.release()

    def _step(self, state: _Sequence) -> None:
        """One step of one sequence (its prefill; every step without continuous batching)."""
        if state.job.cancelled.is_set():
            return self._finish(state, "cancelled")
        token = state.gen.step()  # an error goes to _with_cores, whose _fail closes the sequence
        if self._took(state, token):
            return
        if not self.batching:
            return self._schedule(self._step, state)
        with self._cond:
            self._ready.append(state)
            start = not self._decoding
            self._decoding = True
        if start:
            self._schedule_round()

    def _took(self, state: _Sequence, token: int) -> bool:
        """Stream a sequence's new token; True when that ended it."""
        if state.first_token is None:
            state.first_token = time.monotonic()
        self._emit(state.job, state.stream.push(token))
        if state.gen.done:
            self._finish(state, "stop" if token in state.gen.stop else "length")
            return True
        return False

    @staticmethod
    def _emit(job: ChatJob, piece: str) -> None:
        """Hand a piece of text on; a listener that fails (its client is gone) cancels the chat."""
        if not piece or job.emit is None:
            return
        try:
            job.emit(piece)
        except Exception as exc:  # noqa: BLE001 - the listener's problem ends this chat only
            log.debug("chat listener failed (%s); cancelling", exc)
            job.cancelled.set()

    def _schedule_round(self) -> None:
        """One batched decode step for every ready sequence, at the most urgent of their levels."""
        with self._cond:
            levels = [self._level(state.job) for state in self._ready]
        try:
            self.scheduler.pool.submit(
                self._with_cores, self._decode_round, priority=min(levels, default=self.model.config.priority)
            )
        except Exception as exc:  # noqa: BLE001 - pool closed or full: answer every waiting sequence
            self._fail_round(self._take_ready(), exc)

    def _take_ready(self) -> list[_Sequence]:
        with self._cond:
            batch, self._ready = self._ready, []
        return batch

    def _decode_round(self) -> None:
        """One token for every prefilled sequence, in one batched run of the decoder step (a
        failing run: each sequence again alone; only those failing alone fail)."""
        batch = self._take_ready()
        try:
            states = {id(s.gen): s for s in batch}
            plan = plan_step([s.gen for s in batch], cancelled=lambda g: states[id(g)].job.cancelled.is_set())
            for gen in plan.finish:
                self._finish(states[id(gen)], "cancelled")
            if self._executor is None:
                self._executor = Executor(self.model.chat.engine)
            outcome = self._executor.decode(list(plan.decode)) if plan.decode else None
            kept = []
            for gen in plan.decode:
                state = states[id(gen)]
                assert outcome is not None
                if gen in outcome.failed:
                    log.error("%s: a chat's decode step failed: %s", self.name, outcome.failed[gen])
                    self._fail(state, outcome.failed[gen])
                elif not self._took(state, outcome.tokens[gen]):
                    kept.append(state)
        except Exception as exc:  # noqa: BLE001 - the round itself failed: answer its unfinished sequences
            self._fail_round([s for s in batch if not s.job.future.done()], exc)
            kept = []
        with self._cond:
            self._ready.extend(kept)
            again = bool(self._ready)
            self._decoding = again
        if again:
            self._schedule_round()

    def _fail_round(self, batch: list[_Sequence], exc: BaseException) -> None:
        for state in batch:
            self._fail(state, exc)
        with self._cond:
            self._decoding = bool(self._ready)

    def _finish(self, state: _Sequence, reason: str) -> None:
        state.gen.close()
        self._release_kv(state.job)
        job, now = state.job, time.monotonic()
        self._emit(job, state.stream.flush())
        tokens = len(state.gen.tokens) - (reason == "stop")
        result = ChatResult(
            state.stream.text,
            state.prompt_tokens,
            tokens,
            reason,
            state.started - job.enqueued,
            (state.first_token or now) - job.enqueued,
            now - job.enqueued,
        )
        if not job.future.done():
            job.future.set_result(result)
        self._next()

    def _fail(self, job_or_state: ChatJob | _Sequence, exc: BaseException) -> None:
        job = job_or_state.job if isinstance(job_or_state, _Sequence) else job_or_state
        if isinstance(job_or_state, _Sequence):
            job_or_state.gen.close()
        self._release_kv(job)
        if not job.future.done():
            job.future.set_exception(exc)
        self._next()

    def _next(self) -> None:
        """A sequence ended: start the best-ranked waiting chat in its slot, or free the slot."""
        with self._cond:
            job = None
            if self._waiting:
                now = self.clock()
                best = min(
                    range(len(self._waiting)), key=lambda i: self._admission_key(*self._waiting[i], now)
                )
                job = self._waiting.pop(best)[1]
            if job is None:
                self._active -= 1
                self._cond.notify_all()
        if job is not None:
            self._schedule(self._begin, job)


@dataclass
class _Sequence:
    job: ChatJob
    gen: Generation
    stream: TextStream
    prompt_tokens: int
    started: float
    first_token: float | None = None
