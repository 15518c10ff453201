"""Chat completions through kiln serve: one chat alone vs two at once, tokens/s.

A server (in this process, uvicorn on loopback, --cores 2) holds the exported tiny or mid-size
random Qwen2-VL (max_sequences 2, 1 thread per step); clients POST /v1/chat/completions (greedy,
max_tokens N, ignoring no stop token: random models may stop early, so tokens are counted from the
usage field). Reported: tokens/s of one chat alone, aggregate tokens/s of two concurrent chats,
whether each concurrent answer equals the same prompt answered alone, per-chat wall time; medians
and best of ``--rounds``.

    .venv/bin/python benchmarks/chat_serve.py [--sizes tiny,mid] [--rounds 3] [--new 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from conftest import Running
from modelkiln.bench.runner import machine_info
from modelkiln.export import export
from modelkiln.zoo.qwen_vl import QwenVLFamily

SIZES = {"tiny": {}, "mid": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 2}}
PROMPTS = ["Tell me a long story about the harbour and the ships.", "What is the old town by the sea like?"]


def chat(url: str, prompt: str, new: int) -> tuple[float, dict]:
    body = {
        "model": "qwen",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new,
        "temperature": 0,
    }
    req = urllib.request.Request(
        f"http://{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        answer = json.loads(resp.read())
    return time.perf_counter() - start, answer


def bench(size: str, rounds: int, new: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="kiln-chat-bench-"))
    export(QwenVLFamily(tiny=True, **SIZES[size]), tmp / "q")
    cmd = [
        sys.executable,
        "-m",
        "modelkiln",
        "repo",
        "add",
        str(tmp / "repo"),
        str(tmp / "q"),
        "--name",
        "qwen",
    ]
    subprocess.run(
        [*cmd, "--max-sequences", "2", "--max-new-tokens", str(new)], check=True, capture_output=True
    )
    server = Running(tmp / "repo", max_body=1 << 20)
    try:
        alone, together, same = [], [], []
        solo_answers = {}
        for _ in range(rounds):
            for p in PROMPTS:
                t, a = chat(server.url, p, new)
                alone.append(a["usage"]["completion_tokens"] / t)
                solo_answers[p] = a["choices"][0]["message"]["content"]
            start = time.perf_counter()
            with ThreadPoolExecutor(2) as ex:
                answers = list(ex.map(lambda p: chat(server.url, p, new), PROMPTS))
            wall = time.perf_counter() - start
            together.append(sum(a["usage"]["completion_tokens"] for _, a in answers) / wall)
            same.append(
                all(
                    a["choices"][0]["message"]["content"] == solo_answers[p]
                    for p, (_, a) in zip(PROMPTS, answers, strict=True)
                )
            )
    finally:
        server.stop()
    return {
        "bench": "chat_serve",
        "size": size,
        **SIZES[size],
        "max_tokens": new,
        "alone_tok_s_median": round(statistics.median(alone), 1),
        "alone_tok_s_max": round(max(alone), 1),
        "two_concurrent_aggregate_tok_s_median": round(statistics.median(together), 1),
        "two_concurrent_aggregate_tok_s_max": round(max(together), 1),
        "concurrent_answers_equal_solo": all(same),
        "rounds": rounds,
        "machine": machine_info(1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chat_serve.jsonl")
    args = ap.parse_args()
    with args.out.open("w") as f:
        for size in args.sizes.split(","):
            line = json.dumps(bench(size, args.rounds, args.new))
            print(line, flush=True)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
