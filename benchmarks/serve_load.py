"""kiln serve under load, driven by tritonclient over loopback (binary tensors), bounded in time
and count. EfficientNet-Lite0 INT8 and YOLOv5n are loaded together in one server.

1. batching: 8 concurrent clients sending batch-1 Lite0 requests, with dynamic batching (preferred
   8) vs without, each for ``--seconds``: throughput and p50/p90/p99 latency.
2. saturation: 8 clients sending batch-8 Lite0 requests vs a bare ONNX Runtime loop on the same
   model and batch size (2 threads, one session) in the same run.
3. mixed: ``--mixed`` requests (80 % Lite0, 20 % YOLOv5n) from 8 clients, each with a unique id:
   every id must come back exactly once with the right numbers; server RSS sampled along the way.

    .venv/bin/python benchmarks/serve_load.py [--seconds 20] [--mixed 10000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from modelkiln.bench.runner import machine_info
from modelkiln.export import export
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.serve.config import DynamicBatching, ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parents[1] / "shared" / "assets"


def build_repo(tmp: Path, batching: bool, instances: int = 2, threads: int = 1, preferred: int = 4) -> Path:
    """Lite0 with ``instances`` sessions of ``threads`` threads; dynamic batching to ``preferred``
    (clients / instances, so every instance gets a batch) when ``batching``."""
    repo = tmp / f"repo_{int(batching)}_{instances}x{threads}"
    models = {"lite0": tmp / "lite0_int8.onnx", "yolo": tmp / "yolo.onnx"}
    db = DynamicBatching((preferred,), 4000) if batching else None
    configs = {
        "lite0": ModelConfig(
            "lite0",
            max_batch_size=8,
            dynamic_batching=db,
            instance_count=instances,
            threads_per_instance=threads,
            priority=0,
        ),
        "yolo": ModelConfig(
            "yolo", max_batch_size=4, dynamic_batching=DynamicBatching((4,), 4000) if batching else None
        ),
    }
    for name, cfg in configs.items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.onnx").write_bytes(models[name].read_bytes())
        (repo / name / "config.yaml").write_text(dump_config(cfg))
    return repo


def prepare_models(tmp: Path) -> None:
    export("efficientnet_lite0", tmp / "lite0.onnx")
    calib = ASSETS / "imagenet-sample"
    if not calib.is_dir():
        import cv2

        calib = tmp / "calib"
        calib.mkdir()
        rng = np.random.default_rng(0)
        for i in range(16):
            cv2.imwrite(
                str(calib / f"{i}.png"),
                cv2.GaussianBlur(rng.integers(0, 255, (256, 256, 3), np.uint8), (7, 7), 2),
            )
    quantize(tmp / "lite0.onnx", tmp / "lite0_int8.onnx", calib, "efficientnet_lite0", calib_size=32)
    weights = ASSETS / "yolov5n.pt"
    export("yolov5n", tmp / "yolo.onnx", weights=str(weights) if weights.is_file() else "random")


class Server:
    def __init__(self, repo: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelkiln",
                "-q",
                "serve",
                str(repo),
                "--port",
                str(port),
                "--cores",
                "2",
            ],
            stderr=subprocess.PIPE,
        )
        import tritonclient.http as httpclient

        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        for _ in range(300):
            try:
                if c.is_server_ready() and c.is_model_ready("lite0") and c.is_model_ready("yolo"):
                    return
            except Exception:  # noqa: BLE001, S110 - not up yet
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.proc.stderr.read().decode()[-2000:]}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _client(port: int):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)


def _request(client, model: str, x: np.ndarray, rid: str = ""):
    import tritonclient.http as httpclient

    name = "input" if model == "lite0" else "images"
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer(model, [inp], request_id=rid)


def drive(port: int, clients: int, seconds: float, batch: int) -> dict:
    """``clients`` threads, each sending back-to-back Lite0 requests of ``batch`` for ``seconds``."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        c = _client(port)
        _request(c, "lite0", x)  # warm the connection
        while time.monotonic() < stop:
            t = time.perf_counter()
            _request(c, "lite0", x)
            lat[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    all_ms = np.asarray([v for xs in lat for v in xs]) * 1e3
    return {
        "requests": int(all_ms.size),
        "batch": batch,
        "clients": clients,
        "throughput_items_s": float(all_ms.size * batch / wall),
        "latency_ms": {
            p: float(np.percentile(all_ms, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
        },
    }


def bare_loop(model: Path, batch: int, seconds: float) -> dict:
    s = cpu_backend(model, threads=2).session
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    name = s.get_inputs()[0].name
    for _ in range(3):
        s.run(None, {name: x})
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        s.run(None, {name: x})
        n += 1
    return {"throughput_items_s": n * batch / (time.monotonic() - t0), "batch": batch}


def mixed(port: int, server: Server, total: int, tmp: Path) -> dict:
    rng = np.random.default_rng(1)
    lite_x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    yolo_x = rng.random((1, 3, 640, 640), np.float32)
    lite_ref = cpu_backend(tmp / "lite0_int8.onnx").session.run(None, {"input": lite_x})[0]
    yolo_ref = cpu_backend(tmp / "yolo.onnx").session.run(None, {"images": yolo_x})[0]
    plan = ["yolo" if rng.random() < 0.2 else "lite0" for _ in range(total)]
    seen: dict[str, int] = {}
    wrong: list[str] = []
    lock = threading.Lock()
    rss: list[tuple[int, float]] = []
    counter = iter(range(total))

    def work() -> None:
        c = _client(port)
        for i in counter:
            model = plan[i]
            r = _request(c, model, lite_x if model == "lite0" else yolo_x, f"req-{i}")
            rid = r.get_response()["id"]
            out = r.as_numpy("logits" if model == "lite0" else "output0")
            ok = np.allclose(out, lite_ref if model == "lite0" else yolo_ref, atol=1e-4, rtol=1e-4)
            with lock:
                seen[rid] = seen.get(rid, 0) + 1
                if not ok or rid != f"req-{i}":
                    wrong.append(rid)
                done = len(seen)
                if done % max(total // 10, 1) == 0:
                    rss.append((done, server.rss_mb()))

    threads = [threading.Thread(target=work) for _ in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": total,
        "answered": len(seen),
        "duplicated": sum(v > 1 for v in seen.values()),
        "lost": total - len(seen),
        "wrong": len(wrong),
        "wall_s": time.monotonic() - t0,
        "yolo_share": plan.count("yolo") / total,
        "server_rss_mb": rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--mixed", type=int, default=10000)
    ap.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the saturation and mixed phases (on the last layout)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.jsonl")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-serve-"))
    prepare_models(tmp)
    rows = []
    layouts = [(2, 1, 4), (1, 2, 8)]  # (instances, threads each, preferred batch)
    runs = [(b, lay) for lay in layouts for b in (False, True)]
    for port, (batching, (instances, threads, preferred)) in enumerate(runs, start=18231):
        last = port == 18230 + len(runs)
        server = Server(build_repo(tmp, batching, instances, threads, preferred), port)
        try:
            row = {
                "phase": "batching",
                "dynamic_batching": batching,
                "instances": instances,
                "threads_per_instance": threads,
                "preferred_batch": preferred if batching else None,
                **drive(port, 8, args.seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if last and args.full:
                row = {
                    "phase": "saturation",
                    "server": drive(port, 8, args.seconds, 8),
                    "bare_ort": bare_loop(tmp / "lite0_int8.onnx", 8, args.seconds),
                }
                row["served_fraction"] = (
                    row["server"]["throughput_items_s"] / row["bare_ort"]["throughput_items_s"]
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.mixed:
                    row = {"phase": "mixed", **mixed(port, server, args.mixed, tmp)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({"bench": "serve_load", **row, "machine": machine_info(2)}) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
