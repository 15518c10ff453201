"""KServe v2 over gRPC vs over HTTP with binary tensors: the same ``kiln serve`` process (started
as ``kiln serve REPO --cores 2 --grpc-port N``), the same model and batch, a few concurrent
clients (tritonclient.grpc vs tritonclient.http, binary in and out), rounds interleaved.

The model does almost nothing (a global average pool), so the figures are the protocol's cost:
decoding the request, queueing, encoding the response. Two payloads: image-sized (batch 8 of
3x224x224 FP32, 4.8 MB per request) and small (batch 8 of 16 FP32).

    .venv/bin/python benchmarks/grpc_vs_http.py [--seconds 4] [--rounds 3] [--clients 4]
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

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.serve.config import ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
CASES = {"image": (8, 3, 224, 224), "small": (8, 16)}


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


def start_server(repo: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "modelkiln", "serve", str(repo), "--cores", "2"]
    cmd += ["--port", str(http_port), "--grpc-port", str(grpc_port), "--max-body-mb", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import tritonclient.grpc as grpcclient

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_model_ready("image"):
                return proc, http_port, grpc_port
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server did not start")


def run_clients(protocol: str, port: int, model: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads sending requests for ``seconds``; throughput and latencies."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    want = x.reshape(x.shape[0], -1).mean(axis=1)
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        if protocol == "grpc":
            import tritonclient.grpc as client_mod
        else:
            import tritonclient.http as client_mod
        c = client_mod.InferenceServerClient(f"127.0.0.1:{port}")
        inp = client_mod.InferInput("x", list(x.shape), "FP32")
        if protocol == "grpc":
            inp.set_data_from_numpy(x)
            outs = [client_mod.InferRequestedOutput("y")]
        else:
            inp.set_data_from_numpy(x, binary_data=True)
            outs = [client_mod.InferRequestedOutput("y", binary_data=True)]
        y = c.infer(model, [inp], outputs=outs).as_numpy("y")  # warm-up, and the numbers
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-6)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            c.infer(model, [inp], outputs=outs)
            latencies[i].append(time.perf_counter() - t)
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [v for lat in latencies for v in lat]
    return {"requests": len(flat), "rps": len(flat) / wall, "p50_ms": 1e3 * statistics.median(flat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grpc_vs_http.jsonl")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name, shape in CASES.items():
            (repo / name / "1").mkdir(parents=True)
            pool_model(repo / name / "1" / "model.onnx", len(shape))
            (repo / name / "config.yaml").write_text(
                dump_config(ModelConfig(name, max_batch_size=8, instance_count=2, threads_per_instance=1))
            )
        proc, http_port, grpc_port = start_server(repo)
        try:
            rng = np.random.default_rng(0)
            results: dict[str, dict[str, list[dict]]] = {c: {"grpc": [], "http": []} for c in CASES}
            for _ in range(args.rounds):
                for case, shape in CASES.items():
                    x = rng.standard_normal(shape).astype(np.float32)
                    for protocol, port in (("grpc", grpc_port), ("http", http_port)):
                        r = run_clients(protocol, port, case, x, args.clients, args.seconds)
                        results[case][protocol].append(r)
                        print(
                            f"{case:6s} {protocol:4s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.2f} ms",
                            flush=True,
                        )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    record = {
        "benchmark": "grpc_vs_http",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "server": "kiln serve --cores 2 (instance_count 2 x 1 thread), clients in one process on the same machine",
        "cases": {},
        "machine_info": machine_info(threads=2),
        "cpu_count": os.cpu_count(),
    }
    for case, shape in CASES.items():
        entry: dict = {"shape": list(shape), "request_bytes": int(np.prod(shape)) * 4}
        for protocol in ("grpc", "http"):
            rps = [r["rps"] for r in results[case][protocol]]
            p50 = [r["p50_ms"] for r in results[case][protocol]]
            entry[protocol] = {
                "rps_median": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms_median": statistics.median(p50),
                "p50_ms_min": min(p50),
            }
        entry["grpc_over_http_median"] = entry["grpc"]["rps_median"] / entry["http"]["rps_median"]
        record["cases"][case] = entry
        print(case, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
