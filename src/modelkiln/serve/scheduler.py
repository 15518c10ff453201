"""The scheduler: one thread pool for all models (priority levels across models), one memory pool
for batch buffers, and a core budget so the intra-op threads of all running inferences together
never exceed the machine's cores, however many models and instances are loaded.

Formed batches of every model wait in one ready list (serve/batcher.py: queued time plus aging
per priority level, of the batch's most urgent request). Each batch puts one token on the pool at
its most urgent level; whichever token a worker runs takes the best-ranked batch it may start
*then*, so a batch that has aged long enough runs ahead of newer urgent ones even though its own
token sits at a lower pool level.

A running inference is never pre-empted, so on a busy budget an urgent request would wait for a
bulk batch to finish on some core. On a budget of two cores or more the scheduler therefore keeps
capacity for the most urgent level seen in the last ``urgent_window_s``: batches of less urgent
levels together hold at most ``cores - reserve`` cores (``reserve``: ``reserve_cores``, or the
intra-op threads of that level's last batch if more, and at most ``cores - 1``), so an urgent
batch finds its core free instead of waiting for a bulk batch. A batch that may not start waits
without a token (no worker is woken for it); when a running batch ends, its worker takes the next
one that may start itself, unless other work is queued on the pool (then the waiting batches get
tokens back). Less urgent traffic always keeps at least one batch running, so the reservation
slows it while urgent traffic lasts but never starves it; on a 1-core budget nothing is
reserved. Chat tasks (serve/generation.py) go to the pool directly and are not counted in it."""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelkiln.errors import DeadlineExceeded
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.runtime.thread_pool import ThreadPool
from modelkiln.serve.batcher import DynamicBatcher, InferRequest, aging_seconds, run_batch
from modelkiln.serve.config import PRIORITY_LEVELS
from modelkiln.serve.model import ServedModel

log = logging.getLogger(__name__)
#: Cores kept free of less urgent batches while a more urgent level is active (multi-core budgets).
RESERVE_CORES = 1
#: How long after its last batch a level counts as active (keeps its reserved core), in seconds.
URGENT_WINDOW_S = 1.0


def effective_level(priority: int, waited_s: float, aging_ms: int) -> float:
    """The level a request of ``priority`` (0 most urgent) that has waited ``waited_s`` competes at
    now: one level more urgent per ``aging_ms`` of wait (0: no aging, strict priority). It goes
    below 0 on purpose, so that long-waiting requests are served oldest first. Requests compared
    by this value at one instant come in the order the batcher's ranks (``enqueued + priority x
    aging``) give; queues that are not batchers (chat admission) use it to follow the same rule."""
    return priority - waited_s / aging_seconds(aging_ms)


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


@dataclass(eq=False)  # compared by identity: the ready list removes this one
class _Ready:
    """A formed batch waiting for a worker."""

    rank: float
    seq: int  # FIFO among equal ranks
    batcher: DynamicBatcher
    batch: list[InferRequest]
    done: Callable[[], None]  # frees the batcher's instance
    level: int  # pool level: its most urgent request's
    threads: int  # cores it takes: its model's intra-op threads, at most the budget


class Scheduler:
    def __init__(
        self,
        cores: int | None = None,
        memory_limit_bytes: int | None = 1 << 30,
        reserve_cores: int = RESERVE_CORES,
        urgent_window_s: float = URGENT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.pool = ThreadPool(
            workers=self.cores, capacity=1 << 16, levels=PRIORITY_LEVELS, name="kiln-serve"
        )
        self.memory = MemoryPool(limit_bytes=memory_limit_bytes)
        self.budget = CoreBudget(self.cores)
        #: Cores kept for the most urgent active level (0: none; see the module's docstring).
        self.reserve_cores = reserve_cores
        self.urgent_window_s = urgent_window_s
        self.clock = clock  # time.monotonic; tests pass a fake one
        self._lock = threading.Lock()
        self._ready: list[_Ready] = []  # formed batches waiting for a worker
        self._seq = itertools.count()
        levels = self.pool.levels
        self._seen = [-math.inf] * levels  # when each level last queued a batch
        self._seen_threads = [1] * levels  # and that batch's threads
        self._held = [0] * levels  # cores held by running batches, per level
        self._parked: list[int] = []  # levels of tokens that found no batch they could start

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
        threads = max(min(batcher.model.config.threads_per_instance, self.cores), 1)
        entry = _Ready(rank, next(self._seq), batcher, batch, done, level, threads)
        with self._lock:
            self._ready.append(entry)
            self._seen[level] = self.clock()
            self._seen_threads[level] = threads
            if not self._admits(entry, self._limits()):  # no worker would start it now: do not
                self._parked.append(level)  # wake one for nothing (a running batch's end retries)
                return
        exc = self._token(level)
        if exc is None:
            return
        with self._lock:  # pool closed or full: answer, never drop
            if entry not in self._ready:
                return  # another worker already took it (its own token is still queued)
            self._ready.remove(entry)
        for r in batch:
            r.future.set_exception(exc)
        done()

    def _token(self, level: int) -> Exception | None:
        """Put one token on the pool at ``level``; the error when the pool refuses it."""
        try:
            self.pool.submit(self._run_next, level, priority=level)
        except Exception as exc:  # noqa: BLE001 - pool closed or full: the caller answers
            return exc
        return None

    def _run_next(self, level: int) -> None:
        """A pool token: run the best-ranked ready batch that may start now (one per token)."""
        with self._lock:
            entry = self._pick()
            if entry is None:
                if self._ready:  # only batches kept off the reserved cores: retry when one ends
                    self._parked.append(level)
                return
        while entry is not None:
            try:
                self._run(entry)
            except BaseException:
                self._finish(entry, go_on=False)
                raise
            entry = self._finish(entry, go_on=True)

    def _finish(self, entry: _Ready, go_on: bool) -> _Ready | None:
        """A batch ended: free its cores and instance, and let parked batches start. With
        ``go_on`` and nothing else queued on the pool, this worker takes the next one itself
        (one thread wake-up less per bulk batch; the idle worker stays free for urgent work)."""
        nxt = None
        with self._lock:
            self._held[entry.level] -= entry.threads
            if go_on and self._parked and not self.pool.queued():
                nxt = self._pick()
                if nxt is not None:
                    self._parked.pop()  # the token it was waiting with
            wanted = self._startable_count()
            retry, self._parked = self._parked[:wanted], self._parked[wanted:]
        entry.done()
        for lvl in retry:
            if self._token(lvl) is not None:  # the pool is closing: run it on this worker
                self._run_next(lvl)
        return nxt

    def _limits(self) -> tuple[int, int, int]:
        """(the most urgent active level, cores held by less urgent batches, the most they may
        hold), the lock held. A level is active while a batch of it waits or runs, and for
        ``urgent_window_s`` after its last batch was queued."""
        now = self.clock()
        active = [lv for lv, t in enumerate(self._seen) if now - t <= self.urgent_window_s or self._held[lv]]
        top = min(active + [e.level for e in self._ready], default=self.pool.levels - 1)
        return top, sum(self._held[top + 1 :]), self.cores - self._reserve(top)

    @staticmethod
    def _admits(entry: _Ready, limits: tuple[int, int, int]) -> bool:
        """May ``entry`` start now? Always at the top level, and always as the only less urgent
        batch (slowed, never starved); otherwise within the cores left to less urgent levels."""
        top, below, limit = limits
        return entry.level <= top or not below or below + entry.threads <= limit

    def _pick(self) -> _Ready | None:
        """Take the best-ranked batch the reservation lets start now, and count its cores as
        held (lock held)."""
        limits = self._limits()
        startable = [e for e in self._ready if self._admits(e, limits)]
        if not startable:
            return None
        best = min(startable, key=lambda e: (e.rank, e.seq))
        self._ready.remove(best)
        self._held[best.level] += best.threads
        return best

    def _startable_count(self) -> int:
        """How many ready batches could start now, one after another (lock held): the parked
        tokens worth putting back on the pool."""
        top, below, limit = self._limits()
        n = 0
        for e in sorted(self._ready, key=lambda e: (e.rank, e.seq)):
            if self._admits(e, (top, below, limit)):
                n += 1
                below += e.threads if e.level > top else 0
        return n

    def _reserve(self, top: int) -> int:
        """Cores kept for level ``top``: at least its last batch's threads, never every core."""
        if self.reserve_cores <= 0 or self.cores < 2:
            return 0
        return min(max(self.reserve_cores, self._seen_threads[top]), self.cores - 1)

    def _run(self, entry: _Ready) -> None:
        batcher, batch = entry.batcher, entry.batch
        if batcher.policy.timeout_action == "reject":
            batch = self._drop_expired(batcher, batch)
            if not batch:
                return
        cores = self.budget.take(entry.threads)
        try:
            run_batch(batcher.model, batch, self._concat, self.memory.release)
        finally:
            self.budget.give(cores)

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
        with self._lock:
            return sorted(e.rank for e in self._ready)

    def held_cores(self) -> list[int]:
        """Cores held by running batches, per priority level (for tests and metrics)."""
        with self._lock:
            return list(self._held)

    def parked(self) -> int:
        """Pool tokens that found only batches kept off the reserved cores and wait for a running
        batch to end (for tests and metrics)."""
        with self._lock:
            return len(self._parked)

    def _concat(self, parts: list[np.ndarray]) -> np.ndarray:
        rows = sum(p.shape[0] for p in parts)
        out = self.memory.acquire((rows, *parts[0].shape[1:]), parts[0].dtype)
        np.concatenate(parts, axis=0, out=out)
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
