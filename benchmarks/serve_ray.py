"""The Ray path's overhead at saturation: the same repository and model served by ``kiln serve``
alone (a child process, ``--cores 1``) and by ``kiln serve --ray`` (one replica with a 1-core
budget behind Ray Serve's HTTP proxy, on a local single-node Ray started here), driven by the same
concurrent clients (tritonclient.http, binary tensors in and out), rounds interleaved.

Two models: ``mlp`` (8 MatMul 512x512 + Relu layers: the work dominates, as with a real model)
and ``tiny`` (y = 2x + 1: the figure is the request path's own cost). Throughput is requests per
second with every client busy; the overhead is 1 - ray_rps / kiln_rps (target <= 15 %).

    .venv/bin/python benchmarks/serve_ray.py [--seconds 5] [--rounds 3] [--clients 8]
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
from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
WIDTH, LAYERS = 512, 8


def mlp_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel().tolist()))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        last = f"r{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def tiny_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["m"]), helper.make_node("Add", ["m", "one"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


CASES = {"mlp": (mlp_model, WIDTH), "tiny": (tiny_model, 16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, seconds: float = 120) -> None:
    import tritonclient.http as httpclient

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            if all(c.is_model_ready(m) for m in CASES):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
            continue
        time.sleep(0.2)
    raise RuntimeError(f"no server ready on port {port}")


def run_clients(port: int, model: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    answers: list[np.ndarray] = []

    def worker(i: int) -> None:
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        outs = [httpclient.InferRequestedOutput("y", binary_data=True)]
        if i == 0:
            answers.append(c.infer(model, [inp], outputs=outs).as_numpy("y"))
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
    flat = sorted(v for lat in latencies for v in lat)
    return {
        "requests": len(flat),
        "rps": len(flat) / wall,
        "p50_ms": 1e3 * statistics.median(flat),
        "p99_ms": 1e3 * flat[int(0.99 * (len(flat) - 1))],
        "answer": answers[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Ray's experimental direct ingress behind HAProxy (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, "
        "RAY_SERVE_ENABLE_HA_PROXY=1) instead of its Python proxy",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_ray.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.direct_ingress:  # read by Ray's processes, which inherit this environment
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    import ray
    from ray import serve

    from modelkiln.serve.ray import RayOptions, deploy

    startup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for name, (build, _) in CASES.items():
            (repo / name / "1").mkdir(parents=True)
            build(repo / name / "1" / "model.onnx")
            cfg = ModelConfig(name, max_batch_size=8, dynamic_batching=DynamicBatching((8,), 500))
            (repo / name / "config.yaml").write_text(dump_config(cfg))
        kiln_port, ray_port = free_port(), free_port()
        cmd = [
            sys.executable,
            "-m",
            "modelkiln",
            "serve",
            str(repo),
            "--cores",
            "1",
            "--port",
            str(kiln_port),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup["ray_init_s"] = time.perf_counter() - t
        try:
            running = deploy(str(repo), "127.0.0.1", ray_port, RayOptions("1", cores=1))
            startup["deploy_s"] = running.deploy_s
            wait_ready(kiln_port)
            wait_ready(ray_port)
            rng = np.random.default_rng(0)
            results: dict[str, dict[str, list[dict]]] = {c: {"kiln": [], "ray": []} for c in CASES}
            for _ in range(args.rounds):
                for case, (_, width) in CASES.items():
                    x = rng.standard_normal((1, width)).astype(np.float32)
                    got = {}
                    for path, port in (("kiln", kiln_port), ("ray", ray_port)):
                        r = run_clients(port, case, x, args.clients, args.seconds)
                        got[path] = r.pop("answer")
                        results[case][path].append(r)
                        print(
                            f"{case:5s} {path:4s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.2f} ms"
                            f"  p99 {r['p99_ms']:.2f} ms",
                            flush=True,
                        )
                    assert np.array_equal(got["kiln"], got["ray"]), f"{case}: Ray's answer differs"
            running.stop()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            serve.shutdown()
            ray.shutdown()
    record: dict = {
        "benchmark": "serve_ray",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "setup": "kiln serve --cores 1 (child process) vs kiln serve --ray: 1 replica, cores=1, behind "
        "Ray Serve's proxy on a local 1-node Ray (num_cpus=2); batch-1 binary requests from tritonclient.http "
        "threads in one process on the same machine; dynamic batching to 8 (500 us)",
        "ray": ray.__version__,
        "ray_proxy": "direct ingress + HAProxy (experimental)" if args.direct_ingress else "Ray Serve proxy",
        "startup": startup,
        "cases": {},
        "machine_info": machine_info(threads=1),
    }
    for case in CASES:
        entry: dict = {}
        for path in ("kiln", "ray"):
            rows = results[case][path]
            rps = [r["rps"] for r in rows]
            entry[path] = {
                "rps_median": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms_median": statistics.median(r["p50_ms"] for r in rows),
                "p50_ms_min": min(r["p50_ms"] for r in rows),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in rows),
            }
        entry["ray_overhead_median"] = 1 - entry["ray"]["rps_median"] / entry["kiln"]["rps_median"]
        per_round = [1 - r["rps"] / k["rps"] for k, r in zip(results[case]["kiln"], results[case]["ray"])]
        entry["ray_overhead_per_round"] = per_round
        record["cases"][case] = entry
        print(case, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
