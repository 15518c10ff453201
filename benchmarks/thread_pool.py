"""Thread pool overhead: 100 000 no-op tasks on 2 workers, ours vs ThreadPoolExecutor, same run.

Also: saturating real ONNX Runtime inferences through the pool vs calling the session directly
from 2 threads. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from modelkiln.bench.runner import machine_info
from modelkiln.runtime.thread_pool import ThreadPool


def noop() -> None:
    return None


def per_task_us(make_pool, n: int) -> float:
    with make_pool() as pool:
        for _ in range(2000):  # warm-up
            pool.submit(noop)
        t0 = time.perf_counter()
        futures = [pool.submit(noop) for _ in range(n)]
        wait(futures)
        return (time.perf_counter() - t0) / n * 1e6


def overhead(n: int, repeats: int) -> dict:
    ours, theirs = [], []
    for _ in range(repeats):  # interleave so drift hits both alike
        theirs.append(per_task_us(lambda: ThreadPoolExecutor(max_workers=2), n))
        ours.append(per_task_us(lambda: ThreadPool(2, capacity=n + 4096), n))
    ratio = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "bench": "thread_pool_noop_overhead",
        "tasks": n,
        "workers": 2,
        "repeats": repeats,
        "ours_us_median": statistics.median(ours),
        "ours_us_min": min(ours),
        "tpe_us_median": statistics.median(theirs),
        "tpe_us_min": min(theirs),
        "ratio_median": statistics.median(ratio),
        "ratio_min_over_min": min(ours) / min(theirs),
    }


def onnx_saturation(model: str, seconds: float, repeats: int) -> dict:
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    session = cpu_backend(model, threads=1).session
    inp = session.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    feed = {inp.name: x}

    def direct() -> float:
        count = [0, 0]
        stop = time.perf_counter() + seconds

        def loop(i: int) -> None:
            while time.perf_counter() < stop:
                session.run(None, feed)
                count[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(count) / (time.perf_counter() - t0)

    def pooled() -> float:
        with ThreadPool(2, capacity=64) as pool:
            done = 0
            t0 = time.perf_counter()
            stop = t0 + seconds
            inflight = [pool.submit(session.run, None, feed) for _ in range(8)]
            while time.perf_counter() < stop:
                inflight.pop(0).result()
                done += 1
                inflight.append(pool.submit(session.run, None, feed))
            for f in inflight:
                f.result()
                done += 1
            return done / (time.perf_counter() - t0)

    d, p = [], []
    for _ in range(repeats):
        d.append(direct())
        p.append(pooled())
    return {
        "bench": "thread_pool_onnx_saturation",
        "model": model,
        "seconds": seconds,
        "repeats": repeats,
        "direct_per_s_median": statistics.median(d),
        "pool_per_s_median": statistics.median(p),
        "ratio_median": statistics.median(p) / statistics.median(d),
        "ratio_max_over_max": max(p) / max(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx", help="model for the saturation test (skipped if absent)")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    machine = {"machine": machine_info(1)}
    print(json.dumps(overhead(a.tasks, a.repeats) | machine))
    if a.onnx:
        print(json.dumps(onnx_saturation(a.onnx, a.seconds, a.repeats) | machine))


if __name__ == "__main__":
    main()
