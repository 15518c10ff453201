"""Prefill against decode for the graph builder's decoders: FP32, W8 as first written (one block
covering K, K zero-padded to a power of two: "w8_pow2"), W8 now (the block that pads K least:
"w8"), W8 with blocks of 32 ("w8_b32": llama.cpp Q8_0's block) and W8A8 ("w8a8": per-token
int8 activations through MatMulInteger, down_proj W8; earlier rows also hold "w8_dynamic",
DynamicQuantizeMatMul with one activation scale per call, since dropped). Per variant: decoder file size, time to first token for a 65- and a 512-token prompt
(prefill + first token; the prompt's embeddings are given, so the embedding graph is not timed),
decode tokens/s after each, and the first token's logit cosine to FP32's.

Sizes: ``mid`` (build_tiny: hidden 512, 8 layers, 4 heads / 2 KV heads, head size 128 like 2B;
random weights) and ``2b`` (Qwen2-VL-2B's text decoder from the random checkpoint, e.g.
/work/qwen2b/ckpt). Each (round, variant) runs in a fresh process (its own memory: the FP32 2B
decoder is ~6 GB) in interleaved order; ``--stages ops`` times single MatMulNBits nodes of the 2B
shapes per block size against FP32 MatMul (what the block choice rests on).

    .venv/bin/python benchmarks/qwen_prefill.py --size mid --work /tmp/prefill [--rounds 3]
    .venv/bin/python benchmarks/qwen_prefill.py --size 2b --ckpt /work/qwen2b/ckpt --work DIR \
        --stages build                     # then --stages time (run under the heavy lock)
    .venv/bin/python benchmarks/qwen_prefill.py --stages ops

One JSON line per variant (and per op case) is appended to benchmarks/results/qwen_prefill.jsonl,
with the machine and the load average beside each timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results" / "qwen_prefill.jsonl"
MID = {"hidden": 512, "layers": 8, "heads": 4, "kv_heads": 2}
VARIANTS = ("fp32", "w8_pow2", "w8", "w8_b32", "w8a8")
#: 2B linear shapes (K, N): Q/K/V packed, O, gate/up packed, down (the LM head runs on one row).
OPS_2B = ((1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536))


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- build ------------------------------------------------------------------------------------


def _source(size: str, ckpt: Path | None) -> tuple[Any, Any, bool]:
    """(text config, tensors, tied head) of the size's language model."""
    from modelkiln.export.builder.tensors import SafetensorsFolder, StateDict

    if size == "mid":
        from modelkiln.zoo.qwen_vl import build_tiny

        model, _ = build_tiny(**MID)
        return model.model.language_model.config, StateDict(model.state_dict()), False
    import transformers

    if ckpt is None:
        raise SystemExit("--size 2b needs --ckpt (the random checkpoint folder)")
    config = transformers.AutoConfig.from_pretrained(ckpt)  # read only: the folder may be shared
    return config.text_config, SafetensorsFolder(ckpt), bool(config.tie_word_embeddings)


def stage_build(size: str, work: Path, ckpt: Path | None, variants: list[str]) -> list[dict]:
    from modelkiln.export.builder.layers import Precision
    from modelkiln.export.builder.nbits import PER_CHANNEL
    from modelkiln.export.builder.qwen2 import build_decoder

    text, tensors, tie = _source(size, ckpt)
    table = "model.embed_tokens.weight"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, int(text.vocab_size), 512)
    np.save(work / "prompt_embeds.npy", tensors.rows(table, ids).astype(np.float32))
    if size == "mid":
        np.save(work / "embed_table.npy", tensors.get(table).astype(np.float32))
    rows = []
    for variant in variants:
        folder = work / variant
        if (folder / "decoder.onnx").is_file():
            continue
        precision = {"fp32": Precision.FP32, "w8a8": Precision.W8A8}.get(variant, Precision.W8)
        block = {"w8_pow2": PER_CHANNEL, "w8_b32": 32}.get(variant, 0)
        start = time.perf_counter()
        build_decoder(
            text,
            tensors,
            folder,
            precision=precision,
            block_size=block,
            tie_word_embeddings=tie,
            kv_layout="shared",
        )
        rows.append(
            {
                "stage": "build",
                "variant": variant,
                "build_s": round(time.perf_counter() - start, 1),
                "decoder_gb": round(sum(p.stat().st_size for p in folder.glob("decoder.onnx*")) / 1e9, 3),
            }
        )
    return rows


# -- time -------------------------------------------------------------------------------------


def child_time(
    size: str,
    work: Path,
    ckpt: Path | None,
    variant: str,
    prompts: list[int],
    new: int,
    threads: int,
    warm: list[int],
) -> dict:
    """One variant in this process: load, warm each prompt length once, then one timed greedy run
    per prompt; saves the first token's logits for the cosine to FP32."""
    from modelkiln.genai.engine import Engine
    from modelkiln.genai.measure import SETTLE_S

    if size == "mid":
        table = np.load(work / "embed_table.npy")

        def embed(ids: np.ndarray) -> np.ndarray:
            rows: np.ndarray = table[ids]
            return rows

    else:
        from modelkiln.export.builder.tensors import SafetensorsFolder

        tensors = SafetensorsFolder(ckpt or Path())

        def embed(ids: np.ndarray) -> np.ndarray:
            return tensors.rows("model.embed_tokens.weight", np.asarray(ids)).astype(np.float32)

    prompt = np.load(work / "prompt_embeds.npy")
    start = time.perf_counter()
    engine = Engine(work / variant / "decoder.onnx", embed, threads=threads)
    row: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 2)}
    for p in warm:  # warm-up (arena growth, first-run costs)
        _greedy(engine, prompt[:p], 2)
    for p in prompts:
        time.sleep(SETTLE_S)
        row[f"load_{p}"] = load()
        wall, cpu, logits = _greedy(engine, prompt[:p], new)
        row[f"ttft_{p}_ms"], row[f"decode_{p}_tok_s"] = round(wall[0], 1), round(wall[1], 2)
        if threads == 1:  # all of ONNX Runtime's work runs on this thread: CPU time, not wall
            row[f"ttft_{p}_cpu_ms"], row[f"decode_{p}_cpu_tok_s"] = round(cpu[0], 1), round(cpu[1], 2)
        np.save(work / variant / f"logits_{p}.npy", logits)
    row["peak_rss_gb"] = round(status_kb("VmHWM") / 1e6, 2)
    return row


def _greedy(
    engine: Any, embeds: np.ndarray, new: int
) -> tuple[tuple[float, float], tuple[float, float], np.ndarray]:
    """``new`` greedy tokens, stop tokens ignored: ((TTFT ms, decode tok/s) in wall time, the
    same in this thread's CPU time, the first token's logits)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    gen = engine.start(embeds, _positions(len(embeds)), 0, new)
    try:
        gen.step()
        w1, c1 = time.perf_counter(), time.thread_time()
        logits = np.array(gen.logits, np.float32).reshape(-1)
        while not gen.done:
            gen.step()
        w2, c2 = time.perf_counter(), time.thread_time()
    finally:
        gen.close()
    rate = (new - 1) / (w2 - w1) if new > 1 else 0.0
    cpu_rate = (new - 1) / (c2 - c1) if new > 1 else 0.0
    return ((w1 - w0) * 1e3, rate), ((c1 - c0) * 1e3, cpu_rate), logits


def _positions(p: int) -> np.ndarray:
    return np.broadcast_to(np.arange(p, dtype=np.int64), (3, p)).copy()


def stage_time(args: argparse.Namespace, variants: list[str]) -> list[dict]:
    """Rounds x variants, each in a fresh process, the variant order rotated every round."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--size",
                args.size,
                "--work",
                str(args.work.parent),
            ]
            cmd += ["--prompts", args.prompts, "--new", str(args.new), "--threads", str(args.threads)]
            if args.warm:
                cmd += ["--warm", args.warm]
            if args.ckpt:
                cmd += ["--ckpt", str(args.ckpt)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], file=sys.stderr, flush=True)
    prompts = [int(p) for p in args.prompts.split(",")]
    rows = []
    for variant, rs in runs.items():
        row: dict[str, Any] = {
            "stage": "time",
            "variant": variant,
            "decoder_gb": round(
                sum(p.stat().st_size for p in (args.work / variant).glob("decoder.onnx*")) / 1e9, 3
            ),
            "rounds": len(rs),
            "new_tokens": args.new,
            "threads": args.threads,
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
            "load_s_median": statistics.median(r["load_s"] for r in rs),
        }
        for p in prompts:
            ttft = [r[f"ttft_{p}_ms"] for r in rs]
            rate = [r[f"decode_{p}_tok_s"] for r in rs]
            row[f"ttft_{p}_ms_median"], row[f"ttft_{p}_ms_min"] = statistics.median(ttft), min(ttft)
            row[f"decode_{p}_tok_s_median"], row[f"decode_{p}_tok_s_max"] = statistics.median(rate), max(rate)
            row[f"loadavg_{p}"] = [r[f"load_{p}"] for r in rs]
            if f"ttft_{p}_cpu_ms" in rs[0]:
                cpu = [r[f"ttft_{p}_cpu_ms"] for r in rs]
                cpu_rate = [r[f"decode_{p}_cpu_tok_s"] for r in rs]
                row[f"ttft_{p}_cpu_ms_median"], row[f"ttft_{p}_cpu_ms_min"] = statistics.median(cpu), min(cpu)
                row[f"decode_{p}_cpu_tok_s_median"] = statistics.median(cpu_rate)
                row[f"decode_{p}_cpu_tok_s_max"] = max(cpu_rate)
            if variant != "fp32" and "fp32" in runs:
                a = np.load(args.work / "fp32" / f"logits_{p}.npy").astype(np.float64)
                b = np.load(args.work / variant / f"logits_{p}.npy").astype(np.float64)
                row[f"logit_cosine_{p}"] = round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 6)
                row[f"top1_equal_{p}"] = bool(a.argmax() == b.argmax())
        rows.append(row)
    return rows


# -- ops --------------------------------------------------------------------------------------


def _op_model(k: int, n: int, block: int) -> bytes:
    """One linear layer [1, s, K] -> [1, s, N]: FP32 MatMul (block 0) or W8 MatMulNBits."""
    from onnx import TensorProto, helper, numpy_helper

    from modelkiln.quantmath import NBITS_ACCURACY_INT8 as ACCURACY_INT8
    from modelkiln.quantmath import pack_int8_rows as pack_rows

    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.02).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])
    opsets = [helper.make_opsetid("", 17)]
    if block == 0:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")]
    else:
        b, s = pack_rows(w, block)
        attrs = {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": ACCURACY_INT8}
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", **attrs)
        inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(s.reshape(-1), "s")]
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(helper.make_graph([node], "linear", [x], [y], inits), opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


def stage_ops(rows_m: list[int], reps: int) -> list[dict]:
    """Per 2B shape: FP32, the padded per-channel block, the default block and its neighbours,
    interleaved per repetition; median and min ms per row count M."""
    from modelkiln.quantmath import default_block, per_channel_block
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    out = []
    for k, n in OPS_2B:
        d = default_block(k)
        blocks = sorted(
            {0, per_channel_block(k), d, d // 2, d * 2} - {d * 2 if d * 2 > per_channel_block(k) else -1}
        )
        backends = {b: cpu_backend(_op_model(k, n, b), threads=2) for b in blocks}
        for m in rows_m:
            x = np.random.default_rng(1).standard_normal((1, m, k)).astype(np.float32)
            times: dict[int, list[float]] = {b: [] for b in blocks}
            for backend in backends.values():
                backend.infer({"x": x})
            for _ in range(reps):
                for b, backend in backends.items():
                    t = time.perf_counter()
                    backend.infer({"x": x})
                    times[b].append((time.perf_counter() - t) * 1e3)
            for b, ts in times.items():
                out.append(
                    {
                        "stage": "ops",
                        "k": k,
                        "n": n,
                        "m": m,
                        "kernel": "fp32" if b == 0 else f"w8_block{b}",
                        "padded_k": k if b == 0 else -(-k // b) * b,
                        "ms_median": round(statistics.median(ts), 3),
                        "ms_min": round(min(ts), 3),
                        "loadavg": load(),
                    }
                )
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid", choices=["mid", "2b"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen_prefill"))
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--stages", default="build,time")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="65,512")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--warm", default="", help="prompt lengths to warm up with (default: --prompts)")
    ap.add_argument("--threads", type=int, default=2, help="1: also CPU time (immune to a busy machine)")
    ap.add_argument("--op-rows", default="1,65,512")
    ap.add_argument("--op-reps", type=int, default=10)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work = args.work / args.size
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        prompts = [int(p) for p in args.prompts.split(",")]
        warm = [int(p) for p in (args.warm or args.prompts).split(",")]
        print(
            json.dumps(
                child_time(args.size, args.work, args.ckpt, args.child, prompts, args.new, args.threads, warm)
            )
        )
        return
    from modelkiln.bench.runner import machine_info

    machine = machine_info(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    for stage in [s for s in args.stages.split(",") if s]:
        if stage == "build":
            rows = stage_build(args.size, args.work, args.ckpt, variants)
        elif stage == "time":
            rows = stage_time(args, variants)
        else:
            rows = stage_ops([int(m) for m in args.op_rows.split(",")], args.op_reps)
        for row in rows:
            line = json.dumps(
                {
                    "bench": "qwen_prefill",
                    "size": args.size if stage != "ops" else "2b-ops",
                    **row,
                    "machine": machine,
                }
            )
            print(line, flush=True)
            with RESULTS.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
