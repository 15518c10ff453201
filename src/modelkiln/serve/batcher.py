"""Per-model dynamic batching.

A batcher thread per model waits for an idle instance, then gathers queued requests of the same
non-batch shape until it reaches the preferred batch size or the oldest request has waited the
queue delay, concatenates them along the batch axis into memory-pool buffers, runs the batch on
the scheduler's thread pool and splits the outputs back, one response per request. Expired
requests are answered with DeadlineExceeded instead of run; a failing batch fails only its own
requests; a full queue refuses new requests (QueueFull) instead of growing.
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

from modelkiln.errors import DeadlineExceeded, ModelUnavailable, QueueFull
from modelkiln.serve.model import ServedModel

log = logging.getLogger(__name__)
Feed = dict[str, np.ndarray]


@dataclass
class InferResponse:
    outputs: Feed
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass
class InferRequest:
    feed: Feed
    batch: int = 1
    deadline: float | None = None  # time.monotonic() instant
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[InferResponse] = field(default_factory=Future)

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
    def __init__(self, model: ServedModel, scheduler: BatchExecutor) -> None:
        self.model, self.scheduler = model, scheduler
        self.name = model.name
        cfg = model.config
        batching = cfg.dynamic_batching
        self.max_batch = max(cfg.max_batch_size, 1)
        # without dynamic batching every request runs alone (target 1: one request per batch)
        self.target = max(batching.preferred_batch_sizes or (self.max_batch,)) if batching else 1
        self.delay = batching.max_queue_delay_us / 1e6 if batching else 0.0
        self.capacity = cfg.queue.max_queue_size
        self._queue: collections.deque[InferRequest] = collections.deque()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(cfg.instance_count)
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
            self._queue.append(request)
            self._cond.notify()
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
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
            self._slots.acquire()  # requests keep queueing while every instance is busy
            batch = self._gather()
            if not batch:
                self._slots.release()
                continue
            with self._cond:
                self._inflight += 1
            self.scheduler.execute(self, batch, self._done)

    def _done(self) -> None:
        self._slots.release()
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def _gather(self) -> list[InferRequest]:
        with self._cond:
            if self.delay > 0 and not self._closed:
                oldest = self._queue[0].enqueued
                self._cond.wait_for(
                    lambda: self._closed or self._ready_size() >= self.target,
                    timeout=max(oldest + self.delay - time.monotonic(), 0),
                )
            return self._take()

    def _ready_size(self) -> int:
        sig = self._queue[0].signature()
        return sum(r.batch for r in self._queue if r.signature() == sig)

    def _take(self) -> list[InferRequest]:
        """Requests matching the oldest one's shapes, up to max_batch (a request is never split)."""
        now = time.monotonic()
        taken: list[InferRequest] = []
        kept: collections.deque[InferRequest] = collections.deque()
        size, sig = 0, None
        while self._queue:
            r = self._queue.popleft()
            if r.deadline is not None and now > r.deadline:
                r.future.set_exception(
                    DeadlineExceeded(f"model '{self.name}': request timed out in the queue")
                )
                continue
            if sig is None:
                sig = r.signature()
            fits = not taken or (size + r.batch <= self.max_batch and size < self.target)
            if r.signature() == sig and fits:  # the first request always runs, alone if need be
                taken.append(r)
                size += r.batch
            else:
                kept.append(r)
        self._queue.extendleft(reversed(kept))
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
