"""Per-request priority in ``kiln serve``'s scheduler, in process (ModelServer.infer: the queueing,
batching and pool the HTTP and gRPC routes share, without the transport's noise).

Two models of the same MatMul chain (~1.3 ms per batch-1 inference on one thread), ``urgent``
with one instance and ``bulk`` with four (so several bulk batches wait for the pool at once), served on a core budget of 1 core and of ``--cores`` (default 2):

1. latency: one "urgent" client (sequential requests, priority level 0 on model ``urgent``)
   alone, then under a saturating load of ``--bulk`` clients on model ``bulk`` at level 2
   (dynamic batching to 4), then under the same load with every request at the same level (what
   FIFO would give): p50/p99 of the urgent client and the ratio p99(loaded)/p99(alone).
2. starvation (1 core): a stream of level-0 requests from ``--bulk`` clients saturates ``bulk``;
   a level-2 request into the same queue every 50 ms: its latency with aging (aging_ms 20, so
   it ranks as if queued ~40 ms later, whatever the stream) and without (aging_ms 0: strict
   priority; it waits while the stream lasts; a 2 s timeout bounds the measurement).

    .venv/bin/python benchmarks/serve_priority.py [--seconds 2] [--cores 2] [--bulk 24]

Appends one JSON line to benchmarks/results/serve_priority.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.errors import DeadlineExceeded
from modelkiln.serve.config import DynamicBatching, ModelConfig, QueuePolicy, dump_config
from modelkiln.serve.server import ModelServer

HERE = Path(__file__).resolve().parent
WIDTH, DEPTH = 1024, 8


def chain_model(path: Path) -> None:
    """x [batch, WIDTH] through DEPTH MatMuls with a small weight (values stay bounded)."""
    w = (np.eye(WIDTH) * 0.5 + 0.001).astype(np.float32)
    nodes, last = [], "x"
    for i in range(DEPTH):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor("w", TensorProto.FLOAT, [WIDTH, WIDTH], w.ravel().tolist())],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def build_repo(root: Path, aging_ms: int) -> Path:
    repo = root / f"repo_{aging_ms}"
    model = root / "chain.onnx"
    if not model.exists():
        chain_model(model)
    queue = QueuePolicy(max_queue_size=256, aging_ms=aging_ms)
    configs = {
        "urgent": ModelConfig("urgent", max_batch_size=4, queue=queue, warmup=True),
        "bulk": ModelConfig(
            "bulk",
            max_batch_size=4,
            dynamic_batching=DynamicBatching((4,), 500),
            instance_count=4,
            queue=queue,
            warmup=True,
        ),
    }
    for name, cfg in configs.items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.onnx").write_bytes(model.read_bytes())
        (repo / name / "config.yaml").write_text(dump_config(cfg))
    return repo


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


class Load:
    """``clients`` threads each keeping one request in flight on ``model`` at ``priority``."""

    def __init__(self, server: ModelServer, model: str, clients: int, priority: int) -> None:
        self.stop = threading.Event()
        self.count = 0
        x = np.ones((1, WIDTH), np.float32)

        def client() -> None:
            while not self.stop.is_set():
                server.infer(model, {"x": x}, priority=priority).result(30)
                self.count += 1

        self.threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def urgent_latencies(server: ModelServer, seconds: float, priority: int, gap_s: float = 0.0) -> list[float]:
    x = np.ones((1, WIDTH), np.float32)
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        server.infer("urgent", {"x": x}, priority=priority).result(30)
        out.append(time.perf_counter() - t)
        if gap_s:
            time.sleep(gap_s)
    return out


def latency_phase(root: Path, cores: int, bulk: int, seconds: float) -> dict[str, object]:
    server = ModelServer(str(build_repo(root, 100)), cores=cores)
    server.load_all()
    try:
        urgent_latencies(server, 0.5, 0)  # warm
        alone = urgent_latencies(server, seconds, 0, gap_s=0.002)
        load = Load(server, "bulk", bulk, priority=2)
        time.sleep(0.3)
        loaded = urgent_latencies(server, seconds, 0, gap_s=0.002)
        load.close()
        load = Load(server, "bulk", bulk, priority=1)
        time.sleep(0.3)
        fifo = urgent_latencies(server, seconds, 1, gap_s=0.002)
        load.close()
    finally:
        server.shutdown()
    row = {
        "alone_ms": {"p50": pct(alone, 50), "p99": pct(alone, 99), "n": len(alone)},
        "loaded_priority_ms": {"p50": pct(loaded, 50), "p99": pct(loaded, 99), "n": len(loaded)},
        "loaded_same_level_ms": {"p50": pct(fifo, 50), "p99": pct(fifo, 99), "n": len(fifo)},
    }
    row["p99_ratio_priority"] = pct(loaded, 99) / pct(alone, 99)
    row["p99_ratio_same_level"] = pct(fifo, 99) / pct(alone, 99)
    return row


def starvation_phase(root: Path, cores: int, bulk: int, seconds: float, aging_ms: int) -> dict[str, object]:
    server = ModelServer(str(build_repo(root, aging_ms)), cores=cores)
    server.load_all()
    x = np.ones((1, WIDTH), np.float32)
    waits: list[float] = []
    timeouts = 0
    try:
        load = Load(server, "bulk", bulk, priority=0)
        time.sleep(0.3)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                server.infer("bulk", {"x": x}, timeout_s=2.0, priority=2).result(30)
                waits.append(time.perf_counter() - t)
            except (DeadlineExceeded, TimeoutError):
                timeouts += 1
            time.sleep(0.05)
        stream = load.count
        load.close()
    finally:
        server.shutdown()
    return {
        "aging_ms": aging_ms,
        "low_latency_ms": {"p50": pct(waits, 50), "p99": pct(waits, 99), "max": pct(waits, 100)},
        "low_answered": len(waits),
        "low_timed_out_2s": timeouts,
        "stream_requests_per_s": stream / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--bulk", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        latency = {c: latency_phase(root, c, args.bulk, args.seconds) for c in sorted({1, args.cores})}
        for row in latency.values():
            print(json.dumps(row))
        starvation = [starvation_phase(root, 1, args.bulk, args.seconds, a) for a in (20, 0)]
        for row in starvation:
            print(json.dumps(row))
    record = {
        "bench": "serve_priority",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cores": sorted({1, args.cores}),
        "bulk_clients": args.bulk,
        "seconds": args.seconds,
        "model": f"MatMul chain {DEPTH} x [{WIDTH}x{WIDTH}], batch 1 (bulk batched to 4)",
        "latency": {str(c): row for c, row in latency.items()},
        "starvation": starvation,
        "machine": machine_info(threads=1),
    }
    out = HERE / "results" / "serve_priority.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    for cores, row in latency.items():
        print(
            f"{cores} core(s): urgent p99 loaded / alone {row['p99_ratio_priority']:.2f} "
            f"(all at one level: {row['p99_ratio_same_level']:.2f})"
        )


if __name__ == "__main__":
    main()
