"""Chat completions through kiln serve: one chat alone vs two at once, tokens/s.

A server (in this process, uvicorn on loopback, --cores 2) holds the exported tiny or mid-size
random Qwen2-VL (max_sequences 2) in three set-ups: FP32 with per-sequence steps on 1 thread each,
FP32 with continuous batching on 2 threads, weight-only INT8 (MatMulNBits) with continuous
batching on 2 threads. Clients POST /v1/chat/completions (greedy, max_tokens N; random models may
stop early, so tokens are counted from the usage field). Reported: tokens/s of one chat alone, aggregate tokens/s of two concurrent chats,
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
from modelkiln.quant.config import QuantConfig, WeightKernel
from modelkiln.quant.quantize import quantize
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


VARIANTS = {  # name: (repo add flags)
    "fp32_steps_1thread": ["--threads", "1", "--no-continuous-batching"],
    "fp32_batched_2threads": ["--threads", "2"],
    "w8_batched_2threads": ["--threads", "2", "--decoder", "decoder.int8.onnx"],
}


def bench(size: str, rounds: int, new: int) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="kiln-chat-bench-"))
    export(QwenVLFamily(tiny=True, **SIZES[size]), tmp / "q")
    config = QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS)
    quantize(tmp / "q" / "decoder.onnx", tmp / "q" / "decoder.int8.onnx", None, config=config)
    rows = []
    for variant, flags in VARIANTS.items():
        repo = tmp / f"repo-{variant}"
        cmd = [sys.executable, "-m", "modelkiln", "repo", "add", str(repo), str(tmp / "q"), "--name", "qwen"]
        subprocess.run([*cmd, "--max-sequences", "2", "--max-new-tokens", str(new), *flags], check=True)
        rows.append({"variant": variant, **measure(repo, rounds, new)})
    return [
        {
            "bench": "chat_serve",
            "size": size,
            **SIZES[size],
            "max_tokens": new,
            **r,
            "rounds": rounds,
            "machine": machine_info(),
        }
        for r in rows
    ]


def measure(repo: Path, rounds: int, new: int) -> dict:
    server = Running(repo, max_body=1 << 20)
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
        "alone_tok_s_median": round(statistics.median(alone), 1),
        "alone_tok_s_max": round(max(alone), 1),
        "two_concurrent_aggregate_tok_s_median": round(statistics.median(together), 1),
        "two_concurrent_aggregate_tok_s_max": round(max(together), 1),
        "concurrent_answers_equal_solo": all(same),
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
            for row in bench(size, args.rounds, args.new):
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")


if __name__ == "__main__":
    main()
