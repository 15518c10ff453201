"""kiln serve --memory-budget under churn: a repository whose models need ~3x the budget, driven
round-robin by 8 HTTP clients, against the same repository all resident.

Each model is one MatMul with a ~40 MB weight. Checks: every request is answered (200, or 503 only
after its timeout), the server process's peak resident set (sampled every 10 ms) stays under
budget + 300 MB; reports the throughput of both phases and the loads and evictions. The server
runs in this process (uvicorn in a thread, as the tests run it); clients are threads.

With ``--chat`` the repository also holds the tiny Qwen2-VL chat model (exported in a child
process, so torch stays out of this one) and ``--chat-clients`` clients ask it for long answers
(``--chat-tokens``) beside the one-shot churn: each running sequence reserves its KV cache in the
budget; reported: chats answered, the peak of reserved KV bytes and of what the budget counts,
models unloaded to make room for chats, and the resident set against the budget.

    .venv/bin/python benchmarks/serve_memory_budget.py [--seconds 20] [--models 8] [--budget 100MiB]
    .venv/bin/python benchmarks/serve_memory_budget.py --chat [--chat-clients 2] [--chat-tokens 1500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelkiln.bench.runner import machine_info
from modelkiln.serve.budget import process_rss
from modelkiln.serve.config import GenAIConfig, ModelConfig, QueuePolicy, dump_config, parse_size
from modelkiln.serve.http import create_app
from modelkiln.serve.server import ModelServer

HERE = Path(__file__).resolve().parent
MB = 1 << 20
IN, OUT = 2560, 4096  # 40 MB of float32 weight


def heavy_model(path: Path, seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((IN, OUT), dtype=np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def build_repo(root: Path, models: int) -> list[str]:
    names = [f"m{i}" for i in range(models)]
    for i, name in enumerate(names):
        (root / name / "1").mkdir(parents=True)
        heavy_model(root / name / "1" / "model.onnx", i)
        (root / name / "config.yaml").write_text(dump_config(ModelConfig(name, max_batch_size=4)))
    return names


def add_chat(root: Path, tmp: Path, sequences: int) -> None:
    """The tiny Qwen2-VL as repository model ``qwen`` (exported by a child process)."""
    out = tmp / "qwen-export"
    code = f"from modelkiln.export import export; export('qwen2-vl-tiny', {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    shutil.copytree(out, root / "qwen" / "1")
    config = ModelConfig(
        "qwen",
        backend="genai",
        genai=GenAIConfig(max_sequences=sequences, max_new_tokens=2000),
        queue=QueuePolicy(default_timeout_us=10_000_000),  # a chat waits for memory 10 s at most
    )
    (root / "qwen" / "config.yaml").write_text(dump_config(config))


def run_phase(
    repo: Path,
    names: list[str],
    budget: int | None,
    seconds: float,
    clients: int,
    chat_clients: int = 0,
    chat_tokens: int = 0,
) -> dict[str, Any]:
    import uvicorn

    baseline = process_rss()
    server = ModelServer(str(repo), cores=2, memory_budget=budget)
    server.load_all()
    port = _free_port()
    app = create_app(server, None, None, None, "127.0.0.1")
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    peak = [process_rss()]
    kv_peak, held_peak = [0], [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process_rss())
            kv_now = sum(r.kv_reserved_bytes or 0 for r in server.memory_stats())
            kv_peak[0] = max(kv_peak[0], kv_now)
            if server.memory is not None:
                held_peak[0] = max(held_peak[0], server.memory.held())
            time.sleep(0.01)

    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, IN], "data": [0.5] * IN}],
            "parameters": {"timeout": 10_000_000},  # 10 s
        }
    ).encode()
    codes: dict[str, int] = {}
    bad: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/{name}/infer", body, method="POST"
            )
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
                took = time.perf_counter() - t
                if code != 503 or took < 9.9:  # a 503 is only allowed once its 10 s timeout passed
                    with lock:
                        bad.append(f"{code} after {took:.1f}s: {e.read()[:200]!r}")
            with lock:
                codes[str(code)] = codes.get(str(code), 0) + 1
                latencies.append(time.perf_counter() - t)

    chat_codes: dict[str, int] = {}
    chat_tokens_out = [0]
    chat_latencies: list[float] = []

    def chat_client(k: int) -> None:
        i = 0
        while not stop.is_set():
            text = f"client {k} asks question {i}: tell me a long story"
            i += 1
            data = {
                "model": "qwen",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": chat_tokens,
            }
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json.dumps(data).encode(),
                headers={"Content-Type": "application/json"},
            )
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = json.loads(r.read())
                    code = r.status
                    with lock:
                        chat_tokens_out[0] += answer["usage"]["completion_tokens"]
            except urllib.error.HTTPError as e:
                code = e.code
                took = time.perf_counter() - t
                if code != 503 or took < 9.9:
                    with lock:
                        bad.append(f"chat {code} after {took:.1f}s: {e.read()[:200]!r}")
            with lock:
                chat_codes[str(code)] = chat_codes.get(str(code), 0) + 1
                chat_latencies.append(time.perf_counter() - t)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=chat_client, args=(k,)) for k in range(chat_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    stats = server.memory_stats()
    uv.should_exit = True
    server.shutdown()
    latencies.sort()
    chat: dict[str, Any] = {}
    if chat_clients:
        chat_latencies.sort()
        chat_row = next((r for r in stats if r.name == "qwen"), None)
        chat = {
            "chat_clients": chat_clients,
            "chat_tokens_asked": chat_tokens,
            "chat_codes": chat_codes,
            "chats": len(chat_latencies),
            "chat_tokens_per_s": round(chat_tokens_out[0] / elapsed, 1),
            "chat_latency_s_median": round(statistics.median(chat_latencies), 2) if chat_latencies else None,
            "kv_reserved_peak_mb": round(kv_peak[0] / MB, 2),
            "evictions_for_chats": chat_row.kv_evictions if chat_row else None,
            "chat_model_cost_mb": round(chat_row.cost_bytes / MB, 1) if chat_row else None,
            "pool_peak_mb": round(server.scheduler.memory.stats().peak_bytes / MB, 1),
        }
    return {
        "budget_mb": budget // MB if budget else None,
        "requests": len(latencies),
        "codes": codes,
        "unexpected": bad[:5],
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "latency_ms_median": round(statistics.median(latencies) * 1e3, 1) if latencies else None,
        "latency_ms_p99": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 1) if latencies else None,
        "rss_baseline_mb": baseline // MB,
        "rss_peak_mb": peak[0] // MB,
        "loads": sum(r.loads for r in stats),
        "evictions": sum(r.evictions for r in stats),
        "load_seconds": round(sum(r.load_seconds for r in stats), 2),
        "model_cost_mb": {r.name: r.cost_bytes // MB for r in stats},
        "budget_held_peak_mb": round(held_peak[0] / MB, 1) if budget else None,
        **chat,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--budget", default="100MiB")
    parser.add_argument("--chat", action="store_true", help="add the tiny Qwen2-VL and chat clients")
    parser.add_argument("--chat-clients", type=int, default=2)
    parser.add_argument("--chat-tokens", type=int, default=1500)
    args = parser.parse_args()
    budget = parse_size(args.budget, "--budget")
    chat = (args.chat_clients, args.chat_tokens) if args.chat else (0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        names = build_repo(repo, args.models)
        if args.chat:
            add_chat(repo, Path(tmp), sequences=max(args.chat_clients, 1))
        churn = run_phase(repo, names, budget, args.seconds, args.clients, *chat)
        resident = run_phase(repo, names, None, args.seconds, args.clients, *chat)
    need = sum(churn["model_cost_mb"].values())
    record = {
        "benchmark": "serve_memory_budget" + ("_chat" if args.chat else ""),
        "models": args.models,
        "clients": args.clients,
        "seconds": args.seconds,
        "models_need_mb": need,
        "need_over_budget": round(need / (budget / MB), 2),
        "churn": churn,
        "all_resident": resident,
        "churn_vs_resident_throughput": round(churn["requests_per_s"] / resident["requests_per_s"], 3),
        "all_answered_ok": not churn["unexpected"],
        "peak_within_budget_plus_300mb": churn["rss_peak_mb"] <= budget // MB + 300,
        "machine": machine_info(),
    }
    print(json.dumps(record))
    out = HERE / "results" / "serve_memory_budget.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
