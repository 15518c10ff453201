"""KServe v2 over gRPC vs over HTTP with binary tensors: the same ``kiln serve`` process (what
``kiln serve REPO --cores 2 --grpc-port N`` runs), the same model and batch, the same number of
concurrent clients (tritonclient.grpc vs tritonclient.http, binary in and out), rounds
interleaved and the order of the paths rotated each round.

The model does almost nothing (a global average pool), so the figures are the protocol's cost:
decoding the request, queueing, encoding the response. Two payloads: image-sized (batch 8 of
3x224x224 FP32, 4.8 MB per request) and small (batch 8 of 16 FP32).

Three client paths: ``http`` (each tritonclient.http client its own connection), ``grpc`` (each
tritonclient.grpc client its own connection, as each HTTP client has) and ``grpc_shared``
(tritonclient.grpc's defaults: clients of one process built with the same arguments share one
HTTP/2 connection through grpc's global subchannel pool). Besides throughput, each run records
the server's and the clients' CPU time per request (from /proc and os.times), which the other
work on a shared machine disturbs less than throughput.

    .venv/bin/python benchmarks/grpc_vs_http.py [--seconds 3] [--rounds 5] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.serve.config import ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
CASES = {"small": (8, 16), "image": (8, 3, 224, 224)}
PATHS = ("grpc", "grpc_shared", "http")


def pool_model(path: Path, rank: int) -> None:
    """y = mean of x over every axis but the batch: almost no compute."""
    dims = ["batch", *[f"d{i}" for i in range(1, rank)]]
    axes = helper.make_tensor("axes", TensorProto.INT64, [rank - 1], list(range(1, rank)))
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [axes],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repo: Path, cpus: set[int] | None = None) -> tuple[subprocess.Popen[bytes], int, int]:
    """``kiln serve REPO --cores 2 --grpc-port N --max-body-mb 64`` as cli/serve.py runs it (its
    ``serve`` call directly: the benchmark does not depend on every other command importing);
    ``cpus``: the CPUs it may run on."""
    http_port, grpc_port = free_port(), free_port()
    code = (
        ("" if cpus is None else f"import os; os.sched_setaffinity(0, {sorted(cpus)}); ")  # before any thread
        + "from modelkiln.serve.http import serve; "
        + f"serve({str(repo)!r}, port={http_port}, cores=2, grpc_port={grpc_port}, max_body=64 << 20)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import tritonclient.grpc as grpcclient

    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_model_ready("image"):
                return proc, http_port, grpc_port
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server did not start")


def own_connection_args() -> list[tuple[str, Any]]:
    """tritonclient.grpc's default channel arguments plus a local subchannel pool: the client gets
    its own TCP connection instead of sharing one with every client of this process."""
    import tritonclient.grpc as grpcclient

    keep = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(
    path: str, port: int, model: str, x: np.ndarray, clients: int, seconds: float, server_pid: int
) -> dict[str, float]:
    """``clients`` threads sending requests for ``seconds``; throughput, latency, CPU per request."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    want = x.reshape(x.shape[0], -1).mean(axis=1)
    ready = threading.Barrier(clients + 1)
    stop = [0.0]

    def worker(i: int) -> None:
        if path == "http":
            import tritonclient.http as httpclient

            c: Any = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            inp: Any = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            outs: list[Any] = [httpclient.InferRequestedOutput("y", binary_data=True)]
        else:
            import tritonclient.grpc as grpcclient

            args = own_connection_args() if path == "grpc" else None
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", channel_args=args)
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            outs = [grpcclient.InferRequestedOutput("y")]
        y = c.infer(model, [inp], outputs=outs).as_numpy("y")  # warm-up (connects), and the numbers
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-6)
        ready.wait()
        while time.perf_counter() < stop[0]:
            t = time.perf_counter()
            c.infer(model, [inp], outputs=outs)
            latencies[i].append(time.perf_counter() - t)
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + 3600  # until every client is connected and warm
    ready.wait()
    server0, client0, t0 = process_cpu_s(server_pid), os.times(), time.perf_counter()
    stop[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server1, client1 = process_cpu_s(server_pid), os.times()
    flat = sorted(v for lat in latencies for v in lat)
    n = len(flat)
    client_s = (client1.user + client1.system) - (client0.user + client0.system)
    return {
        "requests": n,
        "rps": n / wall,
        "p50_ms": 1e3 * statistics.median(flat),
        "p99_ms": 1e3 * flat[int(0.99 * (n - 1))],
        "server_cpu_us": 1e6 * (server1 - server0) / n,
        "client_cpu_us": 1e6 * client_s / n,
    }


def busy_processes(own: set[int], top: int = 5) -> list[str]:
    """The busiest other processes now (what else shares the cores), as ps shows them."""
    out = subprocess.run(
        ["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = []
    for line in out.splitlines():
        pid, pcpu, comm = line.split(None, 2)
        if int(pid) not in own and float(pcpu) >= 1.0:
            rows.append(f"{comm} {pcpu}%")
    return rows[:top]


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    rps = [r["rps"] for r in rows]
    return {
        "rps_median": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50_ms_median": statistics.median(r["p50_ms"] for r in rows),
        "p99_ms_median": statistics.median(r["p99_ms"] for r in rows),
        "server_cpu_us_median": statistics.median(r["server_cpu_us"] for r in rows),
        "client_cpu_us_median": statistics.median(r["client_cpu_us"] for r in rows),
    }


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: small,image")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="server on CPU 0, clients on the others: the server's own cost per request decides, "
        "not the clients' (which share the cores otherwise)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grpc_vs_http.jsonl")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]} if args.pin else None
    if args.pin:
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, set(cpus[1:]))
    cases = {c: CASES[c] for c in args.cases.split(",")}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name, shape in CASES.items():
            (repo / name / "1").mkdir(parents=True)
            pool_model(repo / name / "1" / "model.onnx", len(shape))
            (repo / name / "config.yaml").write_text(
                dump_config(ModelConfig(name, max_batch_size=8, instance_count=2, threads_per_instance=1))
            )
        proc, http_port, grpc_port = start_server(repo, server_cpus)
        others: list[str] = []
        try:
            rng = np.random.default_rng(0)
            results: dict[str, dict[str, list[dict[str, float]]]] = {c: {p: [] for p in PATHS} for c in cases}
            for rnd in range(args.rounds):
                order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]
                for case, shape in cases.items():
                    x = rng.standard_normal(shape).astype(np.float32)
                    for path in order:
                        port = http_port if path == "http" else grpc_port
                        r = run_clients(path, port, case, x, args.clients, args.seconds, proc.pid)
                        results[case][path].append(r)
                        print(
                            f"{case:6s} {path:11s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.2f} ms"
                            f"  server {r['server_cpu_us']:.0f} us/req  client {r['client_cpu_us']:.0f} us/req",
                            flush=True,
                        )
                if rnd == 0:
                    others = busy_processes({os.getpid(), proc.pid})
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    record: dict[str, Any] = {
        "benchmark": "grpc_vs_http",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "server": "kiln serve --cores 2 (instance_count 2 x 1 thread; gRPC: grpc's sync server on worker "
        "threads), clients in one process on the same machine",
        "pinned": (
            f"server on CPU {cpus[0]}, clients on CPUs {cpus[1:]}"
            if args.pin
            else "no: server and clients share the CPUs"
        ),
        "paths": {
            "http": "tritonclient.http, binary in and out, one connection per client",
            "grpc": "tritonclient.grpc, raw contents, one connection per client (local subchannel pool)",
            "grpc_shared": "tritonclient.grpc defaults: the clients share one HTTP/2 connection",
        },
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "other_busy_processes": others,
        "cases": {},
        "cpu_flags": cpu_flags(),
        "machine_info": machine_info(threads=2),
        "cpu_count": os.cpu_count(),
    }
    for case, shape in cases.items():
        entry: dict[str, Any] = {"shape": list(shape), "request_bytes": int(np.prod(shape)) * 4}
        for path in PATHS:
            entry[path] = summarise(results[case][path])
        for path in ("grpc", "grpc_shared"):
            per_round = [
                g["rps"] / h["rps"] for g, h in zip(results[case][path], results[case]["http"], strict=True)
            ]
            entry[f"{path}_over_http_median"] = entry[path]["rps_median"] / entry["http"]["rps_median"]
            entry[f"{path}_over_http_per_round"] = per_round
        record["cases"][case] = entry
        print(case, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
