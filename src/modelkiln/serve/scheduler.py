"""The scheduler: one thread pool for all models (priority levels across models), one memory pool
for batch buffers, and a core budget so the intra-op threads of all running inferences together
never exceed the machine's cores, however many models and instances are loaded."""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

import numpy as np

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
        """Run a formed batch on the pool at the model's priority; ``done`` frees its instance."""
        model = batcher.model

        def task() -> None:
            cores = self.budget.take(model.config.threads_per_instance)
            try:
                run_batch(model, batch, self._concat, self.memory.release)
            finally:
                self.budget.give(cores)
                done()

        try:
            self.pool.submit(task, priority=model.config.priority)
        except Exception as exc:  # noqa: BLE001 - pool closed or full: answer, never drop
            for r in batch:
                r.future.set_exception(exc)
            done()

    def _concat(self, parts: list[np.ndarray]) -> np.ndarray:
        rows = sum(p.shape[0] for p in parts)
        out = self.memory.acquire((rows, *parts[0].shape[1:]), parts[0].dtype)
        np.concatenate(parts, axis=0, out=out)
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
