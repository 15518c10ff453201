"""Our thread pool for inference work: priorities, bounded queue, deadlines, cancellation.

Cheap on the hot path: a task costs one deque append and one SimpleQueue token (both C code)
on submit, the same as ``concurrent.futures.ThreadPoolExecutor``; no lock is taken per task.
Each token stands for exactly one queued task, so a woken worker always finds work (or a stop
signal). Workers keep their own counters, summed only when stats are read.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from modelkiln.errors import DeadlineExceeded, PoolClosed, QueueFull

log = logging.getLogger(__name__)

_TASK, _STOP = True, None
_WAIT_SAMPLES = 10_000  # queue-wait samples kept for percentiles


class _Task:
    __slots__ = ("args", "deadline", "enqueued", "fn", "future", "kwargs")

    def __init__(
        self,
        future: Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.deadline = deadline
        self.enqueued = time.perf_counter()


class _WorkerCounters:
    __slots__ = ("cancelled", "done", "expired", "failed", "running")

    def __init__(self) -> None:
        self.done = self.failed = self.expired = self.cancelled = 0
        self.running = False


@dataclass(frozen=True)
class PoolStats:
    queued: int
    running: int
    done: int
    failed: int
    expired: int
    cancelled: int
    queue_wait_ms: dict[str, float]  # p50/p90/p99/max over the last samples


class ThreadPool:
    """Fixed workers; ``priority`` 0 is most urgent, FIFO within a level.

    ``capacity`` bounds queued (not yet started) tasks: ``submit`` raises QueueFull when full, or
    waits up to ``timeout`` seconds for room when given one.
    """

    def __init__(self, workers: int, capacity: int = 1024, levels: int = 3, name: str = "kiln") -> None:
        if workers < 1 or capacity < 1 or levels < 1:
            raise ValueError(
                f"workers, capacity and levels must be >= 1, got {workers}, {capacity}, {levels}"
            )
        self.capacity, self.levels = capacity, levels
        self._queues: list[collections.deque[_Task]] = [collections.deque() for _ in range(levels)]
        self._tokens: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._room_waiters = 0
        self._closed = False
        self._cancelled_at_shutdown = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=_WAIT_SAMPLES)
        self._counters = [_WorkerCounters() for _ in range(workers)]
        self._threads = [
            threading.Thread(target=self._work, args=(c,), name=f"{name}-{i}", daemon=True)
            for i, c in enumerate(self._counters)
        ]
        for t in self._threads:
            t.start()

    # -- submitting -------------------------------------------------------------------------
    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        priority: int = 1,
        deadline: float | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)``; ``deadline`` is a ``time.monotonic()`` instant after which
        the task is failed with DeadlineExceeded instead of run."""
        if self._closed:
            raise PoolClosed("thread pool is shut down")
        if not 0 <= priority < self.levels:
            raise ValueError(f"priority must be in [0, {self.levels - 1}], got {priority}")
        if self.queued() >= self.capacity:
            self._wait_for_room(timeout)
        future: Future[Any] = Future()
        self._queues[priority].append(_Task(future, fn, args, kwargs, deadline))
        self._tokens.put(_TASK)
        return future

    def queued(self) -> int:
        return sum(len(q) for q in self._queues)

    def _wait_for_room(self, timeout: float | None) -> None:
        if not timeout:
            raise QueueFull(f"thread pool queue is full ({self.capacity} tasks waiting)")
        end = time.monotonic() + timeout
        with self._room:
            self._room_waiters += 1
            try:
                while self.queued() >= self.capacity:
                    left = end - time.monotonic()
                    if left <= 0 or self._closed:
                        raise QueueFull(
                            f"thread pool queue stayed full ({self.capacity} tasks) for {timeout}s"
                        )
                    self._room.wait(left)
            finally:
                self._room_waiters -= 1

    # -- working ----------------------------------------------------------------------------
    def _pop(self) -> _Task | None:
        for q in self._queues:
            try:
                return q.popleft()
            except IndexError:
                continue
        return None

    def _work(self, counters: _WorkerCounters) -> None:
        tokens, waits = self._tokens, self._waits
        while tokens.get() is _TASK:
            task = self._pop()
            if task is None:  # its task was cancelled by shutdown(cancel_pending=True)
                continue
            if self._room_waiters:
                with self._room:
                    self._room.notify()
            self._run(task, counters, waits)

    def _run(self, task: _Task, counters: _WorkerCounters, waits: collections.deque[float]) -> None:
        future = task.future
        if not future.set_running_or_notify_cancel():
            counters.cancelled += 1
            return
        if task.deadline is not None and time.monotonic() > task.deadline:
            counters.expired += 1
            future.set_exception(DeadlineExceeded("task deadline passed while it waited in the queue"))
            return
        waits.append(time.perf_counter() - task.enqueued)
        counters.running = True
        try:
            result = task.fn(*task.args, **task.kwargs)
        except BaseException as exc:  # noqa: BLE001 - a task's failure goes to its future, never kills the worker
            counters.failed += 1
            future.set_exception(exc)
        else:
            counters.done += 1
            future.set_result(result)
        finally:
            counters.running = False

    # -- lifecycle --------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting work; run what is queued (or cancel it), then stop the workers."""
        if self._closed:
            return
        self._closed = True
        if cancel_pending:
            while (task := self._pop()) is not None:
                task.future.cancel()
                self._cancelled_at_shutdown += 1
        for _ in self._threads:
            self._tokens.put(_STOP)
        with self._room:
            self._room.notify_all()
        if wait:
            for t in self._threads:
                t.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def stats(self) -> PoolStats:
        waits = np.asarray(self._waits, np.float64) * 1e3
        pct = (
            {k: float(np.percentile(waits, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": float(waits.max())}
            if waits.size
            else {}
        )
        c = self._counters
        return PoolStats(
            queued=self.queued(),
            running=sum(x.running for x in c),
            done=sum(x.done for x in c),
            failed=sum(x.failed for x in c),
            expired=sum(x.expired for x in c),
            cancelled=sum(x.cancelled for x in c) + self._cancelled_at_shutdown,
            queue_wait_ms=pct,
        )
