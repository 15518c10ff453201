"""Thread pool behaviour: priorities, FIFO, backpressure, deadlines, cancellation, isolation, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

from modelkiln.errors import DeadlineExceeded, PoolClosed, QueueFull
from modelkiln.runtime.thread_pool import ThreadPool


def _blocked_pool(**kwargs) -> tuple[ThreadPool, threading.Event]:
    """A one-worker pool whose worker is held busy until the returned event is set."""
    pool = ThreadPool(1, **kwargs)
    gate, started = threading.Event(), threading.Event()
    pool.submit(lambda: (started.set(), gate.wait(10)))
    assert started.wait(5)
    return pool, gate


def test_priority_order_and_fifo_within_level() -> None:
    pool, gate = _blocked_pool(levels=3)
    order: list[str] = []
    for name, prio in [("low1", 2), ("mid1", 1), ("high1", 0), ("low2", 2), ("high2", 0), ("mid2", 1)]:
        pool.submit(order.append, name, priority=prio)
    gate.set()
    pool.shutdown(wait=True)
    assert order == ["high1", "high2", "mid1", "mid2", "low1", "low2"]


def test_queue_full_raises_without_timeout() -> None:
    pool, gate = _blocked_pool(capacity=2)
    pool.submit(time.sleep, 0)
    pool.submit(time.sleep, 0)
    with pytest.raises(QueueFull, match="full"):
        pool.submit(time.sleep, 0)
    gate.set()
    pool.shutdown()


def test_submit_waits_for_room_up_to_timeout() -> None:
    pool, gate = _blocked_pool(capacity=1)
    pool.submit(time.sleep, 0)
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match="stayed full"):
        pool.submit(time.sleep, 0, timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    threading.Timer(0.1, gate.set).start()  # room appears while the next submit waits
    fut = pool.submit(lambda: "ran", timeout=5)
    assert fut.result(5) == "ran"
    pool.shutdown()


def test_expired_task_is_never_run() -> None:
    pool, gate = _blocked_pool()
    ran = []
    fut = pool.submit(ran.append, 1, deadline=time.monotonic() + 0.05)
    ok = pool.submit(ran.append, 2, deadline=time.monotonic() + 60)
    time.sleep(0.1)
    gate.set()
    with pytest.raises(DeadlineExceeded):
        fut.result(5)
    ok.result(5)
    assert ran == [2]
    assert pool.stats().expired == 1
    pool.shutdown()


def test_cancelled_task_is_not_run() -> None:
    pool, gate = _blocked_pool()
    ran = []
    fut = pool.submit(ran.append, 1)
    assert fut.cancel()
    gate.set()
    pool.shutdown()
    assert ran == [] and fut.cancelled()
    assert pool.stats().cancelled == 1


def test_exception_goes_to_future_and_worker_survives() -> None:
    with ThreadPool(1) as pool:
        bad = pool.submit(lambda: 1 / 0)
        good = pool.submit(lambda: 42)
        with pytest.raises(ZeroDivisionError):
            bad.result(5)
        assert good.result(5) == 42
    stats = pool.stats()
    assert (stats.done, stats.failed) == (1, 1)


def test_shutdown_drains_pending_work() -> None:
    pool, gate = _blocked_pool()
    futures = [pool.submit(lambda i=i: i) for i in range(20)]
    gate.set()
    pool.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(20))
    with pytest.raises(PoolClosed):
        pool.submit(lambda: None)


def test_shutdown_can_cancel_pending_work() -> None:
    pool, gate = _blocked_pool()
    futures = [pool.submit(lambda: None) for _ in range(5)]
    threading.Timer(0.1, gate.set).start()
    pool.shutdown(wait=True, cancel_pending=True)
    assert all(f.cancelled() for f in futures)
    with pytest.raises(CancelledError):
        futures[0].result(0)
    assert pool.stats().cancelled == 5


def test_stats_report_queue_and_wait_percentiles() -> None:
    pool, gate = _blocked_pool()
    for _ in range(3):
        pool.submit(time.sleep, 0)
    assert pool.stats().queued == 3 and pool.stats().running == 1
    gate.set()
    pool.shutdown()
    stats = pool.stats()
    assert stats.queued == 0 and stats.done == 4
    assert set(stats.queue_wait_ms) == {"p50", "p90", "p99", "max"}


def test_many_threads_submitting_every_task_runs_once() -> None:
    counts = [0] * 4000
    lock = threading.Lock()

    def hit(i: int) -> None:
        with lock:
            counts[i] += 1

    with ThreadPool(4, capacity=10_000) as pool:

        def producer(start: int) -> None:
            for i in range(start, start + 1000):
                pool.submit(hit, i, priority=i % 3)

        threads = [threading.Thread(target=producer, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert counts == [1] * 4000


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ThreadPool(0)
    with ThreadPool(1, levels=2) as pool, pytest.raises(ValueError, match="priority"):
        pool.submit(lambda: None, priority=2)
