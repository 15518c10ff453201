"""Per-request priority in ``kiln serve``'s scheduler, in process (ModelServer.infer: the queueing,
batching and pool the HTTP and gRPC routes share, without the transport's noise; Python's thread
switch interval set to 1 ms as ``kiln serve`` sets it).

Two models of the same MatMul chain (~1.2 ms per inference on one thread, batch 1 or 4 alike),
``urgent`` with one instance and ``bulk`` with four (so several bulk batches wait for the pool at
once), served on a core budget of 1 core and of ``--cores`` (default 2), in turns, ``--rounds``
times, each round on a fresh server:

1. bulk throughput alone: ``--bulk`` clients on ``bulk`` at level 2 (dynamic batching to 4);
2. latency: one "urgent" client (sequential requests, 2 ms apart, level 0 on model ``urgent``)
   alone, then under the same bulk load at level 2 (and the bulk requests/s meanwhile), then,
   once the scheduler's urgent window has passed, with every request at one level (what FIFO
   would give): p50/p99 of the urgent client and the ratio p99(loaded)/p99(alone) per round,
   with the median, min and max over rounds;
3. what one inference costs at batch 1 and 4 (the wait behind a bulk batch that just started);
4. starvation (1 core): a stream of level-0 requests from ``--bulk`` clients saturates ``bulk``;
   a level-2 request into the same queue every 50 ms: its latency with aging (aging_ms 20, so
   it ranks as if queued ~40 ms later, whatever the stream) and without (aging_ms 0: strict
   priority; it waits while the stream lasts; a 2 s timeout bounds the measurement).

    .venv/bin/python benchmarks/serve_priority.py [--seconds 2] [--rounds 3] [--cores 2] [--bulk 24]
        [--reserve N] [--window S] [--label TEXT] [--no-starvation] [--out FILE]

Appends one JSON line to benchmarks/results/serve_priority.jsonl. Each round records how many
cores other processes kept busy meanwhile (``foreign_cores``, from /proc/stat less our own CPU
time): on a shared machine a p99 is mostly theirs when it is high, so ``summary_quiet`` sums up
only the rounds where it stayed under QUIET_CORES (``summary``: all rounds).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.errors import DeadlineExceeded
from modelkiln.runtime.timing import interleaved
from modelkiln.serve.config import DynamicBatching, ModelConfig, QueuePolicy, dump_config
from modelkiln.serve.http import GIL_SWITCH_S
from modelkiln.serve.model import ServedModel
from modelkiln.serve.scheduler import URGENT_WINDOW_S
from modelkiln.serve.server import ModelServer

HERE = Path(__file__).resolve().parent
WIDTH, DEPTH = 1024, 8
#: Rounds during which other processes kept less than this many cores busy count as quiet.
QUIET_CORES = 0.15


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


def latency_row(runs: Urgent) -> dict[str, float]:
    """p50/p99 of the urgent client's latency, and of its two server-side parts: the wait from
    queueing to the start of its inference (for a free instance and core: behind a running bulk
    batch where none is free) and the inference itself."""
    return {
        "p50": pct(runs.total, 50),
        "p99": pct(runs.total, 99),
        "n": len(runs.total),
        "wait_p50": pct(runs.wait, 50),
        "wait_p99": pct(runs.wait, 99),
        "compute_p50": pct(runs.compute, 50),
        "compute_p99": pct(runs.compute, 99),
    }


@dataclass
class Urgent:
    """Seconds per request of the urgent client: end to end, waiting in the server, computing."""

    total: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)


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

    def rate(self, seconds: float) -> float:
        """Requests per second answered over the next ``seconds``."""
        first, t = self.count, time.perf_counter()
        time.sleep(seconds)
        return (self.count - first) / (time.perf_counter() - t)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def urgent_latencies(server: ModelServer, seconds: float, priority: int, gap_s: float = 0.0) -> Urgent:
    x = np.ones((1, WIDTH), np.float32)
    out = Urgent()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        res = server.infer("urgent", {"x": x}, priority=priority).result(30)
        out.total.append(time.perf_counter() - t)
        out.wait.append(res.queue_s)
        out.compute.append(res.compute_s)
        if gap_s:
            time.sleep(gap_s)
    return out


def timed_under_load(
    server: ModelServer, bulk: int, bulk_level: int, urgent_level: int, seconds: float
) -> tuple[Urgent, float]:
    """The urgent client's latencies under ``bulk`` clients at ``bulk_level``, and the bulk
    requests/s answered meanwhile."""
    load = Load(server, "bulk", bulk, priority=bulk_level)
    try:
        time.sleep(0.3)
        first, t = load.count, time.perf_counter()
        lat = urgent_latencies(server, seconds, urgent_level, gap_s=0.002)
        rate = (load.count - first) / (time.perf_counter() - t)
    finally:
        load.close()
    return lat, rate


def model_ms(server: ModelServer, rounds: int = 200) -> dict[str, dict[str, float]]:
    """One instance's inference time at batch 1 and 4 (one thread), in turns: what a bulk batch
    costs the urgent request that arrives just after it started."""
    model = server.get("bulk").model
    assert isinstance(model, ServedModel), type(model)  # a plain model, resident (no memory budget)
    feeds = {b: {"x": np.ones((b, WIDTH), np.float32)} for b in (1, 4)}

    def job(b: int) -> float:
        t = time.perf_counter()
        model.run(feeds[b])
        return time.perf_counter() - t

    for b in feeds:
        for _ in range(20):
            job(b)
    found = interleaved({b: functools.partial(job, b) for b in feeds}, rounds)
    return {f"batch{b}": {"median": pct(v, 50), "min": pct(v, 0)} for b, v in found.items()}


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process) now."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def foreign_cores(start: tuple[float, float, float]) -> float:
    """Cores other processes kept busy on average since ``start`` (other helpers' work on a
    shared machine): rounds where it is high measured them as much as us."""
    end = cpu_seconds()
    return max((end[1] - start[1]) - (end[2] - start[2]), 0.0) / (end[0] - start[0])


def latency_round(
    root: Path, cores: int, bulk: int, seconds: float, reserve: int | None, window: float
) -> dict[str, Any]:
    """One round on a fresh server: bulk alone, urgent alone, urgent under bulk at a lower level,
    then both at one level (after the reservation window, so that it no longer applies)."""
    server = ModelServer(str(build_repo(root, 100)), cores=cores)
    if reserve is not None:
        server.scheduler.reserve_cores = reserve
    server.scheduler.urgent_window_s = window
    server.load_all()
    start = cpu_seconds()
    try:
        load = Load(server, "bulk", bulk, priority=2)  # nothing urgent seen yet: every core
        time.sleep(0.3)
        bulk_alone = load.rate(seconds)
        load.close()
        urgent_latencies(server, 0.3, 0)  # warm
        alone = urgent_latencies(server, seconds, 0, gap_s=0.002)
        loaded, bulk_loaded = timed_under_load(server, bulk, 2, 0, seconds)
        time.sleep(window + 0.1)  # level 0 no longer active
        same, bulk_same = timed_under_load(server, bulk, 1, 1, seconds)
    finally:
        server.shutdown()
    return {
        "loadavg_1min": os.getloadavg()[0],
        "foreign_cores": foreign_cores(start),
        "alone_ms": latency_row(alone),
        "loaded_priority_ms": latency_row(loaded),
        "loaded_same_level_ms": latency_row(same),
        "p99_ratio_priority": pct(loaded.total, 99) / pct(alone.total, 99),
        "p99_ratio_same_level": pct(same.total, 99) / pct(alone.total, 99),
        "bulk_rps": {
            "alone": bulk_alone,
            "with_urgent_priority": bulk_loaded,
            "with_urgent_same_level": bulk_same,
        },
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and min over rounds of the figures that matter."""
    picks = {  # name: where it sits in a round's row
        "alone_p99_ms": ("alone_ms", "p99"),
        "loaded_p99_ms": ("loaded_priority_ms", "p99"),
        "p99_ratio_priority": ("p99_ratio_priority", None),
        "p99_ratio_same_level": ("p99_ratio_same_level", None),
        "bulk_rps_alone": ("bulk_rps", "alone"),
        "bulk_rps_with_urgent": ("bulk_rps", "with_urgent_priority"),
    }
    out: dict[str, dict[str, float]] = {}
    if not rounds:
        return out
    for name, (key, sub) in picks.items():
        values = [float(r[key] if sub is None else r[key][sub]) for r in rounds]
        out[name] = {"median": float(np.median(values)), "min": min(values), "max": max(values)}
    return out


def starvation_phase(root: Path, cores: int, bulk: int, seconds: float, aging_ms: int) -> dict[str, Any]:
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--bulk", type=int, default=24)
    ap.add_argument("--reserve", type=int, default=None, help="Scheduler.reserve_cores (default: its own)")
    ap.add_argument("--window", type=float, default=URGENT_WINDOW_S, help="Scheduler.urgent_window_s")
    ap.add_argument("--no-starvation", action="store_true", help="skip the starvation measurement")
    ap.add_argument("--label", default="", help="recorded as is (e.g. which code ran)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_priority.jsonl")
    args = ap.parse_args()
    sys.setswitchinterval(GIL_SWITCH_S)  # as kiln serve sets it
    budgets = sorted({1, args.cores})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in budgets}
        for i in range(args.rounds):
            for c in budgets:  # budgets in turns, so machine noise falls on both
                row = latency_round(root, c, args.bulk, args.seconds, args.reserve, args.window)
                rounds[c].append(row)
                print(
                    f"round {i} {c} core(s): urgent p99 {row['alone_ms']['p99']:.2f} alone, "
                    f"{row['loaded_priority_ms']['p99']:.2f} loaded ({row['p99_ratio_priority']:.2f}x); "
                    f"bulk {row['bulk_rps']['alone']:.0f} req/s alone, "
                    f"{row['bulk_rps']['with_urgent_priority']:.0f} with urgent; "
                    f"other processes {row['foreign_cores']:.2f} cores",
                    flush=True,
                )
        server = ModelServer(str(build_repo(root, 100)), cores=1)
        server.load_all()
        try:
            costs = model_ms(server)
        finally:
            server.shutdown()
        starvation = (
            []
            if args.no_starvation
            else [starvation_phase(root, 1, args.bulk, args.seconds, a) for a in (20, 0)]
        )
        for row in starvation:
            print(json.dumps(row))
    record = {
        "bench": "serve_priority",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "label": args.label,
        "cores": budgets,
        "bulk_clients": args.bulk,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "reserve_cores": args.reserve,
        "urgent_window_s": args.window,
        "model": f"MatMul chain {DEPTH} x [{WIDTH}x{WIDTH}], batch 1 (bulk batched to 4)",
        "model_ms": costs,
        "latency": {
            str(c): {
                "summary": summary(rows),
                "summary_quiet": summary([r for r in rows if r["foreign_cores"] < QUIET_CORES]),
                "rounds": rows,
            }
            for c, rows in rounds.items()
        },
        "starvation": starvation,
        "machine": machine_info(threads=1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(
        f"model: batch 1 {costs['batch1']['median']:.2f} ms, batch 4 {costs['batch4']['median']:.2f} ms (median)"
    )
    for c, rows in rounds.items():
        quiet = [r for r in rows if r["foreign_cores"] < QUIET_CORES]
        for name, picked in (("all", rows), ("quiet", quiet)):
            if not picked:
                continue
            sm = summary(picked)
            print(
                f"{c} core(s), {len(picked)} rounds ({name}): urgent p99 loaded / alone median "
                f"{sm['p99_ratio_priority']['median']:.2f}x (min {sm['p99_ratio_priority']['min']:.2f}, "
                f"max {sm['p99_ratio_priority']['max']:.2f}; one level: {sm['p99_ratio_same_level']['median']:.2f}x); "
                f"bulk req/s median {sm['bulk_rps_alone']['median']:.0f} alone, "
                f"{sm['bulk_rps_with_urgent']['median']:.0f} with urgent"
            )


if __name__ == "__main__":
    main()
