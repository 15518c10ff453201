"""The Ray path's overhead at saturation: the same repository and model served by ``kiln serve``
alone (a child process, ``--cores 1``) and by ``kiln serve --ray`` (one replica with a 1-core
budget on a local single-node Ray started here), driven by the same concurrent clients
(tritonclient.http, binary tensors in and out), rounds interleaved.

Ray's cost is per request (its proxy, the hop to the replica, its bookkeeping), so how much it
matters depends on how much work a request carries. Cases: ``tiny`` (y = 2x + 1 on 16 values:
the figure is the request path's own cost), ``mlp`` (8 MatMul 512x512 + Relu layers, ~1 ms) and
EfficientNet-Lite0 (random weights, exported here from the zoo, ~20 ms a 224x224 image on one
core) with requests of 1 and of 8 images. Throughput is requests per second with every client
busy; overhead = 1 - ray_rps / kiln_rps (target <= 15 %). Each run also records the CPU time per
request of the kiln process and of each kind of Ray process (proxy, replica, controller, raylet,
GCS, HAProxy), from /proc.

``--mode`` picks Ray's request path (Ray reads these settings from its processes' environment,
which a local Ray inherits from this process):

- ``proxy``: Ray Serve's default Python HTTP proxy forwarding to the replica;
- ``throughput``: Ray's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: gRPC
  between Ray's processes, user code on the replica's own event loop, buffered request logs, and
  direct ingress: the replica serves HTTP itself);
- ``haproxy``: the same with HAProxy in front of the replicas (``RAY_SERVE_ENABLE_HA_PROXY=1``;
  Ray's documented high-throughput configuration, Ray >= 2.55).

    .venv/bin/python benchmarks/serve_ray.py [--mode proxy] [--cases tiny,lite0x1,lite0x8]
        [--seconds 6] [--rounds 3] [--clients 8] [--lite0 PATH.onnx]
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
WIDTH, LAYERS = 512, 8
MODES = {
    "proxy": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


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


def lite0_model(path: Path, source: Path | None) -> None:
    """EfficientNet-Lite0 from the zoo with random weights (offline), or a given file."""
    if source is not None:
        path.write_bytes(source.read_bytes())
        return
    from modelkiln.export import export

    export("efficientnet_lite0", path, weights="random")


@dataclass(frozen=True)
class Case:
    model: str
    batch: int  # rows (images) per request


CASES = {
    "tiny": Case("tiny", 1),
    "mlp": Case("mlp", 1),
    "lite0x1": Case("lite0", 1),
    "lite0x8": Case("lite0", 8),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def io_names(path: Path) -> tuple[str, list[int | str], str]:
    """(input name, input shape with the batch axis as 'batch', output name) of a model file."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims: list[int | str] = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims, model.graph.output[0].name


def wait_ready(port: int, models: list[str], seconds: float = 180) -> None:
    import tritonclient.http as httpclient

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            if all(c.is_model_ready(m) for m in models):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
            continue
        time.sleep(0.3)
    raise RuntimeError(f"no server ready on port {port}")


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's (kind, CPU seconds): Ray's processes by role, the rest 'other'."""
    kinds = [
        ("ProxyActor", "ray_proxy"),
        ("ServeReplica", "ray_replica"),
        ("ServeController", "ray_controller"),
        ("raylet", "raylet"),
        ("gcs_server", "ray_gcs"),
        ("haproxy", "haproxy"),
        ("ray", "ray_other"),
    ]
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = next((k for needle, k in kinds if needle in cmd), "other")
        out[int(entry)] = (kind, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_kind(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], kiln_pid: int
) -> Counter[str]:
    used: Counter[str] = Counter()
    for pid, (kind, cpu) in after.items():
        delta = cpu - before.get(pid, (kind, 0.0))[1]
        used["kiln" if pid == kiln_pid else ("client" if pid == os.getpid() else kind)] += delta
    return used


def run_clients(
    port: int, model: str, names: tuple[str, str], x: np.ndarray, clients: int, seconds: float, kiln_pid: int
) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answers: list[np.ndarray] = []
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)
    stop = [time.perf_counter() + 3600]
    in_name, out_name = names

    def worker(i: int) -> None:
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300, connection_timeout=300)
        inp = httpclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        outs = [httpclient.InferRequestedOutput(out_name, binary_data=True)]
        y = c.infer(model, [inp], outputs=outs).as_numpy(out_name)  # warm-up and the numbers
        if i == 0:
            answers.append(y)
        ready.wait()
        try:
            while time.perf_counter() < stop[0]:
                t = time.perf_counter()
                c.infer(model, [inp], outputs=outs)
                latencies[i].append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 - reported: a client that stops undercounts its path
            errors.append(f"client {i}: {type(exc).__name__}: {exc}"[:300])
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    cpu0, t0 = process_cpu(), time.perf_counter()
    stop[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    used = cpu_by_kind(cpu0, process_cpu(), kiln_pid)
    flat = sorted(v for lat in latencies for v in lat)
    n = max(len(flat), 1)
    return {
        "requests": len(flat),
        "rps": len(flat) / wall,
        "p50_ms": 1e3 * statistics.median(flat) if flat else float("nan"),
        "p99_ms": 1e3 * flat[int(0.99 * (len(flat) - 1))] if flat else float("nan"),
        "cpu_ms_per_request": {k: round(1e3 * v / n, 3) for k, v in used.most_common() if v > 0},
        "errors": errors,
        "answer": answers[0],
    }


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="proxy")
    ap.add_argument("--cases", default="tiny,lite0x1,lite0x8", help=f"comma-separated, of {sorted(CASES)}")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "--lite0", type=Path, default=None, help="an EfficientNet-Lite0 ONNX file (else exported)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_ray.jsonl")
    args = ap.parse_args()
    cases = {c: CASES[c] for c in args.cases.split(",")}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(MODES[args.mode])  # read by Ray's processes, which inherit this environment
    import ray
    from ray import serve

    from modelkiln.serve.ray import RayOptions, deploy

    builders: dict[str, Callable[[Path], None]] = {
        "tiny": tiny_model,
        "mlp": mlp_model,
        "lite0": lambda p: lite0_model(p, args.lite0),
    }
    startup: dict[str, float] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        names: dict[str, tuple[str, list[int | str], str]] = {}
        for model in sorted({c.model for c in cases.values()}):
            (repo / model / "1").mkdir(parents=True)
            path = repo / model / "1" / "model.onnx"
            builders[model](path)
            names[model] = io_names(path)
            cfg = ModelConfig(model, max_batch_size=8, dynamic_batching=DynamicBatching((8,), 500))
            (repo / model / "config.yaml").write_text(dump_config(cfg))
        kiln_port = free_port()
        code = (
            "from modelkiln.serve.http import serve; "  # what `kiln serve REPO --cores 1 --port N` runs
            f"serve({str(repo)!r}, port={kiln_port}, cores=1)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup["ray_init_s"] = time.perf_counter() - t
        models = sorted(names)
        errors: list[str] = []
        try:
            ray_port = free_port()
            running = deploy(str(repo), "127.0.0.1", ray_port, RayOptions("1", cores=1))
            startup["deploy_s"] = running.deploy_s
            wait_ready(kiln_port, models)
            t = time.perf_counter()
            wait_ready(ray_port, models)
            startup["ray_ready_s"] = time.perf_counter() - t + running.deploy_s
            rng = np.random.default_rng(0)
            results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"kiln": [], "ray": []} for c in cases}
            for rnd in range(args.rounds):
                for case_name, case in cases.items():
                    in_name, dims, out_name = names[case.model]
                    shape = [case.batch, *[int(d) for d in dims[1:]]]
                    x = rng.standard_normal(shape).astype(np.float32)
                    got = {}
                    order = [("kiln", kiln_port), ("ray", ray_port)]
                    for path, port in order if rnd % 2 == 0 else order[::-1]:
                        r = run_clients(
                            port, case.model, (in_name, out_name), x, args.clients, args.seconds, proc.pid
                        )
                        got[path] = r.pop("answer")
                        errors += [f"{case_name} {path}: {e}" for e in r["errors"]]
                        results[case_name][path].append(r)
                        cpu = r["cpu_ms_per_request"]
                        print(
                            f"{case_name:8s} {path:4s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:.2f} ms"
                            f"  p99 {r['p99_ms']:.2f} ms  cpu ms/req {json.dumps(cpu)}",
                            flush=True,
                        )
                    assert np.array_equal(got["kiln"], got["ray"]), f"{case_name}: Ray's answer differs"
            running.stop()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            serve.shutdown()
            ray.shutdown()
    record: dict[str, Any] = {
        "benchmark": "serve_ray",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "clients": args.clients,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "setup": "kiln serve --cores 1 (child process) vs kiln serve --ray: 1 replica, cores=1, on a local "
        "1-node Ray (num_cpus=2); binary requests from tritonclient.http threads in one process on the same "
        "2 cores; dynamic batching to 8 (500 us)",
        "ray": ray.__version__,
        "mode": args.mode,
        "ray_env": MODES[args.mode],
        "startup": startup,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "client_errors": errors,
        "cases": {},
        "cpu_flags": cpu_flags(),
        "machine_info": machine_info(threads=1),
    }
    for case_name, case in cases.items():
        entry: dict[str, Any] = {"model": case.model, "rows_per_request": case.batch}
        for path in ("kiln", "ray"):
            rows = results[case_name][path]
            rps = [r["rps"] for r in rows]
            cpu_kinds = sorted({k for r in rows for k in r["cpu_ms_per_request"]})
            entry[path] = {
                "rps_median": statistics.median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms_median": statistics.median(r["p50_ms"] for r in rows),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in rows),
                "cpu_ms_per_request_median": {
                    k: round(statistics.median(r["cpu_ms_per_request"].get(k, 0.0) for r in rows), 3)
                    for k in cpu_kinds
                },
            }
        entry["ray_overhead_median"] = 1 - entry["ray"]["rps_median"] / entry["kiln"]["rps_median"]
        per_round = [
            1 - r["rps"] / k["rps"]
            for k, r in zip(results[case_name]["kiln"], results[case_name]["ray"], strict=True)
        ]
        entry["ray_overhead_per_round"] = per_round
        entry["ray_overhead_min"] = min(per_round)
        record["cases"][case_name] = entry
        print(case_name, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
