"""`kiln bench` overhead: our benchmark loop vs a bare ONNX Runtime loop, same model, same run.

Interleaves the two (A B A B …) so drift hits both alike; reports median and min latency and
the ratio. One JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from modelkiln.bench.runner import LoopSpec, benchmark, machine_info, synthesize_feed
from modelkiln.runtime.backends import load_backend
from modelkiln.runtime.backends.onnxruntime import OrtOptions


def bare_loop(session, feed: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        session.run(None, feed)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    backend = load_backend(a.onnx, options=OrtOptions(intra_op_threads=a.threads))
    for batch in (int(b) for b in a.batch.split(",")):
        feed = synthesize_feed(backend.input_metadata, batch)
        bare_loop(backend.session, feed, 5)
        ours_med, bare_med, ours_all, bare_all = [], [], [], []
        for _ in range(a.rounds):
            r = benchmark(backend, feed, batch, 1, LoopSpec(warmup=2, iterations=a.iterations))
            b = [x * 1e3 for x in bare_loop(backend.session, feed, a.iterations)]
            ours_med.append(r.latency_ms["median"])
            bare_med.append(statistics.median(b))
            ours_all += r.latencies_ms
            bare_all += b
        print(
            json.dumps(
                {
                    "bench": "kiln_bench_overhead",
                    "model": a.onnx,
                    "batch": batch,
                    "threads": a.threads,
                    "rounds": a.rounds,
                    "iterations_per_round": a.iterations,
                    "kiln_median_ms": statistics.median(ours_all),
                    "kiln_min_ms": min(ours_all),
                    "bare_median_ms": statistics.median(bare_all),
                    "bare_min_ms": min(bare_all),
                    "ratio_median": statistics.median(ours_all) / statistics.median(bare_all),
                    "ratio_min": min(ours_all) / min(bare_all),
                    "kiln_throughput": batch * 1e3 / statistics.mean(ours_all),
                    "bare_throughput": batch * 1e3 / statistics.mean(bare_all),
                    "machine": machine_info(a.threads),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
