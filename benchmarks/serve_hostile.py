"""kiln serve against heavy and hostile requests, over loopback only, bounded in count and time.

The server runs in a subprocess (its own GIL, as in production) on synthetic models, so the
script needs no weights: ``mlp`` (20 MatMuls of 512x512, batch <= 8: CPU-bound inference),
``affine`` (y = 2x + 1 on [batch, 4]) and ``wide`` (a [1, 4] input tiled to [1, 2 000 000]: a
2-million-float response).

1. ``bombs``: one request at a time (decompression-bomb PNGs, 40 images of 16 MP, images just
   within the pixel limits, a 4 MB prompt, a 55 MB JSON body, a 600 000-float JSON response,
   JSON nested 100 000 deep; with ``--chat`` also prompts and an image for the tiny Qwen2-VL)
   while one client polls /v2/health/live every 10 ms: status, seconds, server RSS growth
   (peak VmHWM over VmRSS before) and the worst health latency during the request.
2. ``load``: 16 clients saturate the server for ``--seconds`` with a mix of binary inference on
   ``mlp``, 1 MB JSON inference (and JSON response) on ``affine``, a chat with a 4 MP PNG (decoded,
   then refused: affine is not a chat model) and 8 MB binary responses of ``wide``, while one
   client polls health every 20 ms: health p50/p90/p99/max, and per kind the requests answered,
   their statuses and p50/p99 latency.

    .venv/bin/python benchmarks/serve_hostile.py [--part bombs|load|all] [--seconds 20] [--chat]

Prints one JSON line per measurement (and appends them to benchmarks/results/serve_hostile.jsonl).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Self

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelkiln.bench.runner import machine_info
from modelkiln.serve.config import ModelConfig, dump_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve_hostile.jsonl"


# --- models and server ------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def mlp_model(path: Path, width: int = 512, layers: int = 20) -> Path:
    rng = np.random.default_rng(0)
    inits, nodes, last = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel().tolist()))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return _save(graph, path)


def affine_model(path: Path) -> Path:
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "one"], ["y"])]
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        inits,
    )
    return _save(graph, path)


def wide_model(path: Path, repeats: int = 500_000) -> Path:
    reps = helper.make_tensor("reps", TensorProto.INT64, [2], [1, repeats])
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4 * repeats])],
        [reps],
    )
    return _save(graph, path)


def build_repo(root: Path, chat: bool) -> Path:
    repo = root / "repo"
    models = {
        "mlp": (mlp_model, ModelConfig("mlp", max_batch_size=8, instance_count=2)),
        "affine": (affine_model, ModelConfig("affine", max_batch_size=8)),
        "wide": (wide_model, ModelConfig("wide", warmup=False)),
    }
    for name, (build, config) in models.items():
        (repo / name / "1").mkdir(parents=True)
        build(repo / name / "1" / "model.onnx")
        (repo / name / "config.yaml").write_text(dump_config(config))
    if chat:  # the tiny Qwen2-VL (random weights): prompts are tokenised and checked for real
        from modelkiln.export import export

        export("qwen2-vl-tiny", root / "qwen")
        add = [
            sys.executable,
            "-m",
            "modelkiln",
            "repo",
            "add",
            str(repo),
            str(root / "qwen"),
            "--name",
            "qwen",
        ]
        subprocess.run(
            [*add, "--max-sequences", "2", "--max-new-tokens", "64"], check=True, capture_output=True
        )
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int, cores: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "modelkiln", "serve", str(repo), "--port", str(port), "--cores", str(cores)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if request(port, "GET", "/v2/health/ready")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start: " + (proc.stderr.read() if proc.stderr else ""))


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 120,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB; VmHWM is reset through /proc/PID/clear_refs."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class HealthProbe:
    """Polls /v2/health/live on one keep-alive connection; latencies in ms."""

    def __init__(self, port: int, every_s: float) -> None:
        self.port, self.every_s = port, every_s
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                conn.request("GET", "/v2/health/live")
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            if ok:
                self.latencies.append((time.perf_counter() - t) * 1e3)
            else:
                self.failures += 1
            self._stop.wait(self.every_s)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)} | {
        "max": round(float(a.max()), 2)
    }


# --- bodies -------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + width * 3) * min(height, 64), 9)
    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def real_png(width: int, height: int, seed: int = 0) -> bytes:
    import cv2

    image = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def chat_body(images: list[bytes], text: str = "Describe it.", model: str = "affine") -> bytes:
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
        for i in images
    ]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": parts}]}).encode()


def json_infer(values: int, width: int = 4) -> bytes:
    rows = max(values // width, 1)
    data = np.random.default_rng(0).standard_normal(rows * width).round(6).tolist()
    spec = {"name": "x", "shape": [rows, width], "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [spec]}).encode()


def binary_infer(batch: int, width: int = 512) -> tuple[bytes, dict]:
    x = np.random.default_rng(1).standard_normal((batch, width)).astype(np.float32)
    spec = {
        "name": "x",
        "shape": [batch, width],
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    head = json.dumps({"inputs": [spec], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    return head.encode() + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


# --- parts --------------------------------------------------------------------------------------


def zero_png(width: int, height: int) -> bytes:
    """A real, fully decodable PNG of ``width`` x ``height`` black pixels (compresses to little)."""
    import cv2

    ok, data = cv2.imencode(".png", np.zeros((height, width, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return data.tobytes()


def bombs(port: int, pid: int, emit, chat: bool) -> None:
    wide = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    cases = [
        ("png_16000x16000", "/v1/chat/completions", chat_body([png_header(16000, 16000)])),
        ("png_60000x60000", "/v1/chat/completions", chat_body([png_header(60000, 60000)])),
        ("png_6000x6000_within_limit", "/v1/chat/completions", chat_body([zero_png(6000, 6000)])),
        ("40_images_16MP", "/v1/chat/completions", chat_body([png_header(4000, 4000)] * 40)),
        ("10_images_8MP_within_limit", "/v1/chat/completions", chat_body([zero_png(4000, 2000)] * 10)),
        ("prompt_4MB", "/v1/chat/completions", chat_body([], "word " * 800_000)),
        ("json_nested_100000", "/v2/models/affine/infer", b"[" * 100_000 + b"]" * 100_000),
        ("json_55MB_floats", "/v2/models/affine/infer", json_infer(5_000_000, 5_000_000)),
        ("json_6MB_floats", "/v2/models/affine/infer", json_infer(600_000, 600_000)),
        ("response_2M_floats_json", "/v2/models/wide/infer", wide.encode()),
    ]
    if chat:
        cases += [
            ("qwen_prompt_4MB", "/v1/chat/completions", chat_body([], "word " * 800_000, "qwen")),
            (
                "qwen_prompt_1MiB_within_limit",
                "/v1/chat/completions",
                chat_body([], "word " * 209_000, "qwen"),
            ),
            ("qwen_image_6000x6000", "/v1/chat/completions", chat_body([zero_png(6000, 6000)], model="qwen")),
        ]
    for name, path, body in cases:
        rss0, _ = rss_mb(pid)
        peak_reset = reset_peak(pid)
        with HealthProbe(port, 0.01) as probe:
            time.sleep(0.1)
            t = time.perf_counter()
            status, reply = request(port, "POST", path, body, {"Content-Type": "application/json"})
            seconds = time.perf_counter() - t
            time.sleep(0.1)
        rss1, hwm = rss_mb(pid)
        try:
            message = json.loads(reply).get("error", "")
            message = message.get("message", "") if isinstance(message, dict) else message
        except (ValueError, AttributeError):
            message = ""
        emit(
            {
                "part": "bombs",
                "case": name,
                "body_mb": round(len(body) / 2**20, 2),
                "status": status,
                "seconds": round(seconds, 3),
                "rss_before_mb": round(rss0, 1),
                "rss_growth_mb": round((hwm if peak_reset else rss1) - rss0, 1),
                "rss_after_mb": round(rss1, 1),
                "peak_measured": "VmHWM" if peak_reset else "VmRSS after",
                "health_max_ms": round(max(probe.latencies, default=float("nan")), 1),
                "health_probes": len(probe.latencies),
                "message": message[:160],
            }
        )


def load(port: int, pid: int, seconds: float, clients: int, emit, mix: list[str] | None = None) -> None:
    mlp_body, mlp_headers = binary_infer(4)
    wide_body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    kinds = {
        "mlp_binary": ("/v2/models/mlp/infer", mlp_body, mlp_headers, 0.55),
        "affine_json_1MB": ("/v2/models/affine/infer", json_infer(100_000, 100_000), {}, 0.2),
        "chat_png_4MP": ("/v1/chat/completions", chat_body([real_png(2000, 2000)]), {}, 0.1),
        "wide_binary_8MB": ("/v2/models/wide/infer", wide_body, {}, 0.15),
    }
    names = [k for k in kinds if not mix or k in mix]
    weights = [kinds[k][3] for k in names]
    stats: dict[str, dict] = {k: {"lat": [], "status": {}} for k in names}
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while not stop.is_set():
            kind = rnd.choices(names, weights)[0]
            path, body, headers, _ = kinds[kind]
            t = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                stats[kind]["lat"].append((time.perf_counter() - t) * 1e3)
                stats[kind]["status"][status] = stats[kind]["status"].get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    rss0, _ = rss_mb(pid)
    with HealthProbe(port, 0.02) as probe:
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    _, hwm = rss_mb(pid)
    emit(
        {
            "part": "load",
            "clients": clients,
            "mix": names,
            "seconds": seconds,
            "health_ms": percentiles(probe.latencies),
            "health_probes": len(probe.latencies),
            "health_failures": probe.failures,
            "rss_before_mb": round(rss0, 1),
            "rss_peak_mb": round(hwm, 1),
            "kinds": {
                k: {"answered": len(v["lat"]), "status": v["status"], "latency_ms": percentiles(v["lat"])}
                for k, v in stats.items()
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["bombs", "load", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--chat", action="store_true", help="also serve the tiny Qwen2-VL (needs torch)")
    parser.add_argument(
        "--mix", default="", help="load: comma-separated kinds (default all: mlp_binary,affine_json_1MB,...)"
    )
    args = parser.parse_args()
    machine = machine_info()

    def emit(row: dict) -> None:
        line = json.dumps({**row, "machine": machine})
        print(json.dumps(row), flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(line + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp), args.chat)
        port = free_port()
        proc = start_server(repo, port, args.cores)
        try:
            if args.part in ("bombs", "all"):
                bombs(port, proc.pid, emit, args.chat)
            if args.part in ("load", "all"):
                mix = [k for k in args.mix.split(",") if k]
                load(port, proc.pid, args.seconds, args.clients, emit, mix)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
