"""Per-model dynamic batching.

A batcher thread per model waits for an idle instance, then gathers queued requests of the same
non-batch shape until it reaches the preferred batch size or the oldest request has waited the
queue delay, concatenates them along the batch axis into memory-pool buffers, runs the batch on
the scheduler's thread pool and splits the outputs back, one response per request. A request
that finds an idle instance, an empty queue and no batch-forming delay (max_queue_delay 0, or no
dynamic batching) is handed to the scheduler by the submitting thread itself: waking the batcher
thread would add one thread hop (a wake-up and a GIL hand-over, which a busy machine makes slow)
to exactly the requests that want the least latency. Expired
requests are answered with DeadlineExceeded instead of run (``timeout_action: reject``) or kept
at the back of the queue (``delay``); a failing batch fails only its own requests; a full queue
refuses new requests (QueueFull) instead of growing.

Order: each request has a priority level (0 most urgent; its own ``priority`` parameter, else the
model's) and is served in order of its *rank*: the instant it was queued plus one ``aging_ms`` per
level. That is strict priority among requests queued within ``aging_ms`` of each other, and FIFO
beyond: a waiting request gains one level per ``aging_ms`` of wait, so a low-priority request
waits at most about ``levels x aging_ms`` behind a stream of urgent ones (plus the work already
ahead of it). The scheduler runs formed batches of all models by the same rank.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from modelkiln.errors import BadInput, DeadlineExceeded, ModelUnavailable, QueueFull
from modelkiln.serve.config import PRIORITY_LEVELS, QueuePolicy
from modelkiln.serve.model import ServedModel

log = logging.getLogger(__name__)
Feed = dict[str, np.ndarray]
#: Seconds per level when aging is off (aging_ms: 0): far beyond any wait, so strict priority.
STRICT_S = 1e9
#: The level of a request whose timeout expired under ``timeout_action: delay`` (after all others).
DELAYED = PRIORITY_LEVELS


def aging_seconds(aging_ms: int) -> float:
    """Seconds of wait that buy one priority level (``aging_ms`` 0: strict priority)."""
    return aging_ms / 1e3 if aging_ms > 0 else STRICT_S


def aging_s(policy: QueuePolicy) -> float:
    """Seconds of wait that buy one priority level under ``policy``."""
    return aging_seconds(policy.aging_ms)


@dataclass
class InferResponse:
    outputs: Feed
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(eq=False)  # compared by identity (a queue removes one; feeds are arrays)
class InferRequest:
    feed: Feed
    batch: int = 1
    deadline: float | None = None  # time.monotonic() instant
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[InferResponse] = field(default_factory=Future)
    #: 0 most urgent .. PRIORITY_LEVELS-1 (DELAYED once timed out under delay); None: the model's.
    priority: int | None = None
    #: Serving order (lower first): set when queued, from ``enqueued``, priority and aging.
    rank: float = 0.0

    def level(self) -> int:
        return 1 if self.priority is None else self.priority

    @staticmethod
    def check_level(priority: object, model: str) -> None:
        """BadInput unless ``priority`` is None or a level 0..PRIORITY_LEVELS-1."""
        if priority is not None and (
            isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority < PRIORITY_LEVELS
        ):
            raise BadInput(
                f"model '{model}': priority level must be an integer 0..{PRIORITY_LEVELS - 1}, got {priority!r}"
            )

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """What must match for two requests to share a batch: every non-batch dim and dtype."""
        return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(self.feed.items()))


class ModelQueue(Protocol):
    """What the scheduler needs from a served model. A one-shot model is a DynamicBatcher; a
    generative model (iterative decoding with a KV cache, streaming tokens) implements the same
    three methods and runs its decode steps as tasks on the same thread pool and core budget."""

    name: str

    def submit(self, request: Any) -> Future[Any]:
        """Queue ``request`` (an InferRequest; a ChatJob for a generative model)."""

    def depth(self) -> int: ...

    def close(self, drain: bool = True) -> None: ...


class BatchExecutor(Protocol):
    """Where a batcher runs its formed batches (the scheduler): a protocol, so the batcher does
    not depend on the scheduler that creates it."""

    def execute(self, batcher: DynamicBatcher, batch: list[InferRequest], done: Callable[[], None]) -> None:
        """Run ``batch`` and answer its requests; call ``done`` when the instance is free again."""


class DynamicBatcher:
    def __init__(
        self, model: ServedModel, scheduler: BatchExecutor, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.model, self.scheduler = model, scheduler
        self.name = model.name
        cfg = model.config
        batching = cfg.dynamic_batching
        self.max_batch = max(cfg.max_batch_size, 1)
        # without dynamic batching every request runs alone (target 1: one request per batch)
        self.target = max(batching.preferred_batch_sizes or (self.max_batch,)) if batching else 1
        self.delay = batching.max_queue_delay_us / 1e6 if batching else 0.0
        self.capacity = cfg.queue.max_queue_size
        self.policy = cfg.queue
        self.aging = aging_s(cfg.queue)
        self.clock = clock  # time.monotonic; tests pass a fake one
        self._queue: collections.deque[InferRequest] = collections.deque()
        self._cond = threading.Condition()
        self._idle = cfg.instance_count  # instances not running a batch (guarded by _cond)
        self._closed = False
        self._inflight = 0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, request: InferRequest) -> Future[InferResponse]:
        with self._cond:
            if self._closed:
                raise ModelUnavailable(f"model '{self.name}' is unloading")
            if len(self._queue) >= self.capacity:
                raise QueueFull(f"model '{self.name}': queue full ({self.capacity} requests waiting)")
            if request.priority is None:
                request.priority = self.model.config.priority
            request.rank = request.enqueued + request.priority * self.aging
            direct = self.delay == 0 and self._idle > 0 and not self._queue
            if direct:  # nothing to gather and nobody ahead: no hop through the batcher thread
                self._idle -= 1
                self._inflight += 1
            else:
                self._queue.append(request)
                self._cond.notify()
        if direct:
            self.scheduler.execute(self, [request], self._done)
        return request.future

    def depth(self) -> int:
        return len(self._queue)

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; answer the queued ones (run them, or fail them when not draining)."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.set_exception(
                        ModelUnavailable(f"model '{self.name}' unloaded")
                    )
            self._cond.notify_all()
        self._thread.join()
        with self._cond:  # wait for batches already on the pool
            self._cond.wait_for(lambda: self._inflight == 0)

    def _loop(self) -> None:
        while True:
            with self._cond:  # requests keep queueing while every instance is busy
                self._cond.wait_for(
                    lambda: bool(self._queue) and self._idle > 0 or self._closed and not self._queue
                )
                if not self._queue:  # closed and drained
                    return
                self._fill()
                batch = self._take()
                if not batch:
                    continue
                self._idle -= 1
                self._inflight += 1
            self.scheduler.execute(self, batch, self._done)

    def _done(self) -> None:
        with self._cond:
            self._idle += 1
            self._inflight -= 1
            self._cond.notify_all()

    def _fill(self) -> None:
        """Wait (lock held; released while waiting) until the first-ranked request's batch
        reaches the preferred size or the oldest request has waited the queue delay. Only this
        thread takes an idle instance while the delay is on, so the one counted is still idle."""
        if self.delay > 0 and not self._closed and self._queue:
            oldest = min(r.enqueued for r in self._queue)
            self._cond.wait_for(
                lambda: self._closed or not self._queue or self._ready_size() >= self.target,
                timeout=max(oldest + self.delay - time.monotonic(), 0),
            )

    def _ready_size(self) -> int:
        sig = min(self._queue, key=lambda r: r.rank).signature()
        return sum(r.batch for r in self._queue if r.signature() == sig)

    def _expire(self, now: float) -> None:
        """Requests whose timeout passed: failed (reject) or sent behind every other (delay)."""
        for r in list(self._queue):
            if r.deadline is None or now <= r.deadline:
                continue
            waited_ms = (now - r.enqueued) * 1e3
            if self.policy.timeout_action == "delay":
                r.deadline, r.priority = None, DELAYED  # stays queued; runs when nothing else waits
                r.rank = now + DELAYED * self.aging
                continue
            self._queue.remove(r)
            r.future.set_exception(
                DeadlineExceeded(
                    f"model '{self.name}': request timed out in the queue after {waited_ms:.0f} ms "
                    "(timeout_action: reject)"
                )
            )

    def _take(self) -> list[InferRequest]:
        """Requests matching the first-ranked one's shapes, taken in rank order up to max_batch
        (a request is never split)."""
        self._expire(self.clock())
        ordered = sorted(self._queue, key=lambda r: r.rank)  # stable: FIFO among equal ranks
        self._queue.clear()
        taken: list[InferRequest] = []
        kept: collections.deque[InferRequest] = collections.deque()
        size, sig = 0, None
        for r in ordered:
            if sig is None:
                sig = r.signature()
            fits = not taken or (size + r.batch <= self.max_batch and size < self.target)
            if r.signature() == sig and fits:  # the first request always runs, alone if need be
                taken.append(r)
                size += r.batch
            else:
                kept.append(r)
        self._queue.extend(kept)
        return taken


def run_batch(
    model: ServedModel,
    batch: list[InferRequest],
    concat: Callable[[list[np.ndarray]], np.ndarray],
    release: Callable[[np.ndarray], None],
) -> None:
    """Run ``batch`` as one inference and answer every request (errors go to each request)."""
    start = time.monotonic()
    buffers: list[np.ndarray] = []
    try:
        if len(batch) == 1:
            feed = batch[0].feed
        else:
            feed = {}
            for name in batch[0].feed:
                buf = concat([r.feed[name] for r in batch])
                buffers.append(buf)
                feed[name] = buf
        outputs = model.run(feed)
    except Exception as exc:  # noqa: BLE001 - every request gets the error, the server lives on
        for r in batch:
            r.future.set_exception(exc)
        return
    finally:
        for buf in buffers:
            release(buf)
    compute = time.monotonic() - start
    total = sum(r.batch for r in batch)
    offset = 0
    for r in batch:
        part = outputs if len(batch) == 1 else {k: v[offset : offset + r.batch] for k, v in outputs.items()}
        offset += r.batch
        r.future.set_result(InferResponse(part, start - r.enqueued, compute, total))
