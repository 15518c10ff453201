"""A larger random Qwen2-VL (hidden 2048, 16 layers, 16 heads / 2 KV heads: a 2.2 GB FP32 decoder,
over protobuf's 2 GB limit): export through the zoo (external data, parity from the file), weight-
only INT8, then our engine (FP32 and W8) vs transformers' generate FP32, interleaved rounds.
Reports export/quantize time and peak RSS, TTFT and decode tokens/s.

    .venv/bin/python benchmarks/qwen_large.py [--rounds 2] [--new 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from qwen_generate import torch_run

from modelkiln.bench.runner import machine_info
from modelkiln.export import export
from modelkiln.genai.chat import ChatModel
from modelkiln.genai.engine import Engine
from modelkiln.genai.measure import SETTLE_S, timed_greedy
from modelkiln.onnx_io import model_bytes
from modelkiln.quant.config import QuantConfig, WeightKernel
from modelkiln.quant.quantize import quantize
from modelkiln.zoo.qwen_vl import QwenVLFamily, build_tiny

SIZES = {"hidden": 2048, "layers": 16, "heads": 16, "kv_heads": 2}
PROMPT = "Tell me a long story about the harbour."


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qwen_large.jsonl")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kiln-qwen-large-")) / "q"
    row: dict = {"bench": "qwen_large", **SIZES, "new_tokens": args.new, "rounds": args.rounds}
    t = time.perf_counter()
    result = export(QwenVLFamily(tiny=True, **SIZES), folder)
    row |= {
        "export_s": round(time.perf_counter() - t, 1),
        "export_parity_max_abs": max(p.max_abs for p in result.parity),
    }
    row["peak_rss_gb_after_export"] = round(peak_gb(), 1)
    gc.collect()
    t = time.perf_counter()
    config = QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS)
    quantize(folder / "decoder.onnx", folder / "decoder.int8.onnx", None, config=config)
    row |= {
        "quantize_s": round(time.perf_counter() - t, 1),
        "peak_rss_gb_after_quantize": round(peak_gb(), 1),
    }
    row["decoder_mb"] = {
        "fp32": round(model_bytes(folder / "decoder.onnx") / 1e6),
        "w8": round(model_bytes(folder / "decoder.int8.onnx") / 1e6),
    }
    gc.collect()
    chat = ChatModel(folder, threads=2)
    engines = {
        "ours_fp32": chat.engine,
        "ours_w8": Engine(folder / "decoder.int8.onnx", chat.embed, threads=2),
    }
    prompt = chat.prompt([{"role": "user", "content": PROMPT}])
    torch.set_num_threads(2)
    model, processor = build_tiny(**SIZES)
    ids = processor.tokenizer(
        processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ).input_ids
    runs = {k: [] for k in ("torch_fp32", *engines)}
    for _ in range(args.rounds):
        time.sleep(SETTLE_S)
        runs["torch_fp32"].append(torch_run(model, ids, args.new)[:2])
        for k, e in engines.items():
            time.sleep(SETTLE_S)
            runs[k].append(timed_greedy(e, prompt.embeds, prompt.positions, prompt.delta, args.new)[:2])
    for k, rs in runs.items():
        row[k] = {
            "ttft_ms_median": round(statistics.median(r[0] for r in rs), 1),
            "decode_tok_s_median": round(statistics.median(r[1] for r in rs), 2),
        }
    base = row["torch_fp32"]["decode_tok_s_median"]
    for k in engines:
        row[k]["decode_speedup_vs_torch_fp32"] = round(row[k]["decode_tok_s_median"] / base, 2)
    row["machine"] = machine_info(2)
    line = json.dumps(row)
    print(line)
    args.out.write_text(line + "\n")
    assert np.isfinite(base)


if __name__ == "__main__":
    main()
