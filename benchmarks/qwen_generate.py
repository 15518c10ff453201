"""Qwen2-VL text generation: our engine (ONNX Runtime, static KV cache) vs transformers' generate
(torch), same random model, same prompt, same machine, interleaved rounds.

Variants: torch FP32, torch dynamic INT8 (torch.ao quantize_dynamic on the Linears: the int8
path torch offers on CPU), ours FP32 (exported decoder step after our optimizer, as `kiln
optimize` writes it), ours weight-only INT8 (`kiln quantize --weight-only --kernel matmulnbits`:
MatMulNBits, per channel). Per
variant: time to first token (prompt -> first token, prefill included) and decode tokens/s
(tokens after the first / time after the first), median and min over rounds; greedy agreement of
each variant with torch FP32; KV-cache bytes per 1000 tokens of context.

Sizes: tiny (hidden 64, 2 layers: the test model) and mid (hidden 1024, 8 layers, 16 heads, 2 KV
heads, intermediate 2048), random weights, the tiny tokenizer (vocab ~610).

    .venv/bin/python benchmarks/qwen_generate.py [--sizes tiny,mid] [--rounds 5] [--new 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from modelkiln.bench.runner import machine_info
from modelkiln.export.qwen_vl import export_decoder_step
from modelkiln.genai.engine import Engine
from modelkiln.genai.measure import SETTLE_S, decode_rate, teacher_forced, timed_greedy
from modelkiln.graph.manager import PassManager
from modelkiln.graph.pipeline import build_pipeline
from modelkiln.quant.config import QuantConfig, WeightKernel
from modelkiln.quant.quantize import quantize
from modelkiln.zoo.qwen_vl import build_tiny

SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2},
    "mid": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 2},
}
PROMPT = "Tell me a long story about the harbour, the ships and the old town by the sea."


class Clock:
    """A transformers streamer that timestamps each generated token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def torch_run(model, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    clock = Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock
        )
    return _rates(start, clock.times) + (out[0, len(ids) :].tolist(),)


def ours_run(engine: Engine, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    return timed_greedy(engine, engine.embed(np.asarray(ids)), positions, 0, new)


def _rates(start: float, times: list[float]) -> tuple[float, float]:
    return (times[0] - start) * 1e3, decode_rate(times)


def w8_quality(variants: dict, ids: list[int], table: np.ndarray, steps: int) -> dict:
    """W8 vs FP32 along the FP32 greedy path (both fed the same tokens): genai.measure.teacher_forced."""
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    q = teacher_forced(
        variants["ours_fp32"].args[0], variants["ours_w8"].args[0], [(table[ids], positions, 0)], steps
    )
    return {
        "w8_logit_cosine_mean": q["logit_cosine_mean"],
        "w8_logit_cosine_min": q["logit_cosine_min"],
        "w8_teacher_forced_top1_agreement": q["top1_agreement"],
    }


def preallocated_mb(engine: Engine, table: np.ndarray, ids: list[int], context: int) -> float:
    """What a sequence with a ``context``-token cache takes from the memory pool (two buffers per
    cache tensor + logits), measured from the pool's own accounting."""
    before = engine.pool.stats().in_use_bytes
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    gen = engine.start(table[ids], positions, 0, context - len(ids))
    taken = engine.pool.stats().in_use_bytes - before
    gen.close()
    return round(taken / 2**20, 2)


def bench_size(name: str, rounds: int, new: int, threads: int, repeat: int = 1) -> list[dict]:
    """``repeat``: the prompt's text repeated that many times (long-context runs)."""
    torch.set_num_threads(threads)
    model, processor = build_tiny(seed=1, **SIZES[name])
    content = " ".join([PROMPT] * repeat)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = processor.tokenizer(text).input_ids
    tmp = Path(tempfile.mkdtemp(prefix="kiln-qwen-bench-"))
    part = export_decoder_step(model, tmp / "decoder.raw.onnx")
    graph = ir.load(tmp / "decoder.raw.onnx")  # what `kiln optimize` does (portable passes)
    PassManager(build_pipeline("portable"), verify=False).run(graph)
    ir.save(graph, tmp / "decoder.onnx")
    quantize(
        tmp / "decoder.onnx",
        tmp / "decoder.w8.onnx",
        None,
        config=QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS),
    )
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    embed = lambda t: table[t]
    with torch.no_grad():
        torch_int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    variants = {
        "torch_fp32": lambda: torch_run(model, ids, new),
        "torch_dynamic_int8": lambda: torch_run(torch_int8, ids, new),
        "ours_fp32": functools.partial(
            ours_run, Engine(tmp / "decoder.onnx", embed, threads=threads), ids, new
        ),
        "ours_w8": functools.partial(
            ours_run, Engine(tmp / "decoder.w8.onnx", embed, threads=threads), ids, new
        ),
    }
    results: dict[str, list[tuple[float, float, list[int]]]] = {k: [] for k in variants}
    for k, run in variants.items():  # warm-up
        run()
    for _ in range(rounds):
        for k, run in variants.items():
            time.sleep(SETTLE_S)  # the previous variant's spinning worker threads park first
            results[k].append(run())
    quality = w8_quality(variants, ids, table, new)
    pool_mb = preallocated_mb(variants["ours_fp32"].args[0], table, ids[:16], 1000)
    pasts = [s.shape for s in part.inputs if s.name.startswith("past_")]  # [batch, kv, past, head_dim]
    kv_per_token = sum(kv * dim * 4 for _, kv, _, dim in pasts)
    reference = results["torch_fp32"][0][2]
    rows = []
    for k, runs in results.items():
        ttft = [r[0] for r in runs]
        rate = [r[1] for r in runs]
        tokens = runs[0][2]
        agree = next(
            (i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens)
        )
        rows.append(
            {
                "bench": "qwen_generate",
                "size": name,
                **SIZES[name],
                "variant": k,
                "prompt_tokens": len(ids),
                "new_tokens": new,
                "ttft_ms_median": round(statistics.median(ttft), 2),
                "ttft_ms_min": round(min(ttft), 2),
                "decode_tok_s_median": round(statistics.median(rate), 1),
                "decode_tok_s_max": round(max(rate), 1),
                "greedy_tokens_equal_to_torch_fp32": agree,
                "kv_cache_mb_per_1000_tokens": round(kv_per_token * 1000 / 2**20, 2),
                "kv_allocated_mb_for_1000_token_context": pool_mb if k.startswith("ours") else None,
                **(quality if k == "ours_w8" else {}),
                "decoder_file_mb": round(
                    (tmp / ("decoder.w8.onnx" if k == "ours_w8" else "decoder.onnx")).stat().st_size / 2**20,
                    1,
                )
                if k.startswith("ours")
                else None,
                "rounds": rounds,
                "machine": machine_info(threads),
            }
        )
    base = next(r for r in rows if r["variant"] == "torch_fp32")
    for r in rows:
        r["decode_speedup_vs_torch_fp32"] = round(r["decode_tok_s_median"] / base["decode_tok_s_median"], 2)
        r["ttft_speedup_vs_torch_fp32"] = round(base["ttft_ms_median"] / r["ttft_ms_median"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="Repeat the prompt text (long contexts).")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "qwen_generate.jsonl")
    args = ap.parse_args()
    with args.out.open("w") as f:
        for size in args.sizes.split(","):
            for row in bench_size(size, args.rounds, args.new, args.threads, args.repeat):
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")


if __name__ == "__main__":
    main()
