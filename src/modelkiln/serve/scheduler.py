"""The scheduler: one thread pool for all models (priority levels across models), one memory pool
for batch buffers, and a core budget so the intra-op threads of all running inferences together
never exceed the machine's cores, however many models and instances are loaded.

Formed batches of every model wait in one ready heap ordered by rank (serve/batcher.py: queued
time plus aging per priority level, of the batch's most urgent request). Each batch puts one
token on the pool at its most urgent level; whichever token a worker runs takes the best-ranked
batch *then*, so a batch that has aged long enough runs ahead of newer urgent ones even though
its own token sits at a lower pool level."""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
from collections.abc import Callable

import numpy as np

from modelkiln.errors import DeadlineExceeded
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.runtime.thread_pool import ThreadPool
from modelkiln.serve.batcher import DynamicBatcher, InferRequest, run_batch
from modelkiln.serve.config import PRIORITY_LEVELS
from modelkiln.serve.model import ServedModel

log = logging.getLogger(__name__)


class CoreBudget:
    """Counts busy cores; ``take(n)`` waits until n are free and takes them at once (no partial
    holds, so two inferences can never deadlock each holding half of what both need). Waiters are
    served first come, first served: a task that gives its cores back and at once asks again (a
    chat's next decode round) queues behind those already waiting instead of taking them back."""

    def __init__(self, cores: int) -> None:
        self.cores, self._free = cores, cores
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def take(self, n: int) -> int:
        n = min(n, self.cores)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket and self._free >= n)
            self._queue.popleft()
            self._free -= n
            self._cond.notify_all()  # the next in line may fit in what is left
        return n

    def give(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


class Scheduler:
    def __init__(self, cores: int | None = None, memory_limit_bytes: int | None = 1 << 30) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.pool = ThreadPool(
            workers=self.cores, capacity=1 << 16, levels=PRIORITY_LEVELS, name="kiln-serve"
        )
        self.memory = MemoryPool(limit_bytes=memory_limit_bytes)
        self.budget = CoreBudget(self.cores)
        #: Formed batches waiting for a worker: (rank, sequence, batcher, batch, done).
        self._ready: list[tuple[float, int, DynamicBatcher, list[InferRequest], Callable[[], None]]] = []
        self._ready_lock = threading.Lock()
        self._seq = itertools.count()

    def queue_for(self, model: ServedModel) -> DynamicBatcher:
        threads = model.config.threads
        if threads > self.cores:
            log.warning(
                "%s: %d instances x %d threads exceed %d cores; inferences will wait for cores",
                model.name,
                model.config.instance_count,
                model.config.threads_per_instance,
                self.cores,
            )
        return DynamicBatcher(model, self)

    def execute(self, batcher: DynamicBatcher, batch: list[InferRequest], done: Callable[[], None]) -> None:
        """Queue a formed batch at the rank and level of its most urgent request; ``done`` frees
        its instance."""
        rank = min(r.rank for r in batch)
        reject = batcher.policy.timeout_action == "reject"
        deadlines = [r.deadline for r in batch if r.deadline is not None] if reject else []
        if deadlines:  # surfaces by its deadline at the latest, to be answered (never left waiting)
            rank = min(rank, min(deadlines))
        level = min(max(min(r.level() for r in batch), 0), self.pool.levels - 1)
        entry = (rank, next(self._seq), batcher, batch, done)
        with self._ready_lock:
            heapq.heappush(self._ready, entry)
        try:
            self.pool.submit(self._run_next, priority=level)
        except Exception as exc:  # noqa: BLE001 - pool closed or full: answer, never drop
            with self._ready_lock:
                if not any(e is entry for e in self._ready):
                    return  # another worker already took it (its own token is still queued)
                self._ready.remove(entry)
                heapq.heapify(self._ready)
            for r in batch:
                r.future.set_exception(exc)
            done()

    def _run_next(self) -> None:
        """A pool token: run the best-ranked ready batch (there is one per token)."""
        with self._ready_lock:
            if not self._ready:
                return
            _, _, batcher, batch, done = heapq.heappop(self._ready)
        if batcher.policy.timeout_action == "reject":
            batch = self._drop_expired(batcher, batch)
            if not batch:
                done()
                return
        model = batcher.model
        cores = self.budget.take(model.config.threads_per_instance)
        try:
            run_batch(model, batch, self._concat, self.memory.release)
        finally:
            self.budget.give(cores)
            done()

    @staticmethod
    def _drop_expired(batcher: DynamicBatcher, batch: list[InferRequest]) -> list[InferRequest]:
        """Fail the requests of a formed batch whose timeout passed while it waited for a worker."""
        now = batcher.clock()
        kept = []
        for r in batch:
            if r.deadline is not None and now > r.deadline:
                waited_ms = (now - r.enqueued) * 1e3
                r.future.set_exception(
                    DeadlineExceeded(
                        f"model '{batcher.name}': request timed out in the queue after {waited_ms:.0f} ms "
                        "(timeout_action: reject)"
                    )
                )
            else:
                kept.append(r)
        return kept

    def ready_ranks(self) -> list[float]:
        """Ranks of the batches waiting for a worker (for tests and metrics)."""
        with self._ready_lock:
            return sorted(e[0] for e in self._ready)

    def _concat(self, parts: list[np.ndarray]) -> np.ndarray:
        rows = sum(p.shape[0] for p in parts)
        out = self.memory.acquire((rows, *parts[0].shape[1:]), parts[0].dtype)
        np.concatenate(parts, axis=0, out=out)
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
