"""Continuous batching of Qwen2-VL chats on the mid configuration (hidden 512, 8 layers, 4 heads /
2 KV heads, head size 128 as Qwen2-VL-2B's, random weights), old cache layout against new:

- ``concat``: the traced graph's interface (present = Concat(past, new)); a batched step copies
  every sequence's whole cache into a left-padded batch and the new caches back (batch.py);
- ``shared``: GroupQueryAttention reads and writes one buffer per cache tensor in place; the
  sequences' slots are rows of it, nothing is copied.

Figures (one JSON line each, benchmarks/results/qwen_batching.jsonl):

1. ``aggregate``: decode tokens/s of 4 chats batched against one chat alone (prompts of 65 tokens,
   prefilled before the clock starts; greedy, fixed number of steps), per layout;
2. ``step_vs_context``: the time of one batched decode step of 4 sequences at context 100, 500,
   1000 and 2000 positions, per layout (the caches are filled with random values up to the context
   instead of prefilling 2000 real tokens: a step's time does not depend on the values);
3. ``attention_vs_context``: the share of a shared-layout step that is attention itself: one
   GroupQueryAttention node alone (the same shapes: 4 rows, the layer's heads, in place on a buffer
   holding the context) timed the same way, times the number of layers; ``rest_ms`` = the step
   minus that, which is what must stay flat with context (no copy grows with it);
4. ``kv_bytes``: what a sequence holds per position against 2 x layers x kv x d x 4.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/qwen_batching.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.bench.runner import machine_info
from modelkiln.export.builder.qwen2 import build_decoder, build_embedding
from modelkiln.export.builder.tensors import StateDict
from modelkiln.genai.batch import decode_batch
from modelkiln.genai.engine import Engine, Generation, pair_of, slot_of
from modelkiln.runtime.backends.onnxruntime import cpu_backend

RESULTS = Path(__file__).parent / "results" / "qwen_batching.jsonl"
MID = {"hidden": 512, "layers": 8, "heads": 4, "kv_heads": 2}
LAYOUTS = ("concat", "shared")


def build(folder: Path) -> None:
    from modelkiln.zoo.qwen_vl import build_tiny

    model, _ = build_tiny(**MID)
    text, tensors = model.model.language_model.config, StateDict(model.state_dict())
    for layout in LAYOUTS:
        build_decoder(text, tensors, folder, f"{layout}.onnx", kv_layout=layout)
    build_embedding(text, tensors, folder)


def engines(folder: Path, threads: int) -> dict[str, Engine]:
    embed = cpu_backend(folder / "embed.onnx", threads=1)

    def rows(ids: np.ndarray) -> np.ndarray:
        out: np.ndarray = embed.infer({"input_ids": ids[None]})["inputs_embeds"][0]
        return out

    return {
        layout: Engine(folder / f"{layout}.onnx", rows, threads=threads, capacity=2304) for layout in LAYOUTS
    }


def start(engine: Engine, ids: list[int], new: int) -> Generation:
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids)))
    return engine.start(engine.embed(np.asarray(ids, np.int64)), positions, 0, new, set())


def decode_rate(engine: Engine, chats: int, steps: int, seed: int) -> float:
    """Tokens/s of ``chats`` sequences decoding ``steps`` tokens each (batched), prefill excluded."""
    rng = np.random.default_rng(seed)
    gens = [start(engine, rng.integers(0, 600, 65).tolist(), steps + 1) for _ in range(chats)]
    for g in gens:
        g.step()
    began = time.perf_counter()
    for _ in range(steps):
        decode_batch(engine, gens)
    elapsed = time.perf_counter() - began
    for g in gens:
        g.close()
    return chats * steps / elapsed


def at_context(engine: Engine, context: int, chats: int, rng: np.random.Generator) -> list[Generation]:
    """``chats`` sequences whose caches hold ``context`` positions (random values) after a real
    one-token prefill, each ready to decode at position ``context``."""
    gens = []
    for _ in range(chats):
        g = start(engine, [int(rng.integers(0, 600))], context + 64)
        g.step()
        if engine.shared:
            slot = slot_of(g)
            assert engine.kv is not None
            for buf in engine.kv.buffers:
                buf[slot.slot, :, :context] = (
                    rng.standard_normal(buf.shape[1:2] + (context, buf.shape[3])) * 0.1
                )
            engine.kv.lengths[slot.slot] = context
        else:
            pair = pair_of(g)
            pair.length = context
            for view in pair.past().values():
                view[...] = rng.standard_normal(view.shape) * 0.1
        g._positions = np.full((3, 1, 1), context, np.int64)
        gens.append(g)
    return gens


def step_ms(engine: Engine, context: int, chats: int, steps: int, seed: int) -> list[float]:
    gens = at_context(engine, context, chats, np.random.default_rng(seed))
    times = []
    try:
        decode_batch(engine, gens)  # warm
        for _ in range(steps):
            began = time.perf_counter()
            decode_batch(engine, gens)
            times.append((time.perf_counter() - began) * 1e3)
    finally:
        for g in gens:
            g.close()
    return times


def attention_ms(context: int, chats: int, threads: int, steps: int, seed: int) -> list[float]:
    """One GroupQueryAttention of the mid config (decode: one new position per row, the cache
    bound in place as the decoder binds it) at ``context`` positions: what a layer's attention
    itself costs inside a shared-layout step."""
    from onnx import TensorProto, helper

    heads, kv = MID["heads"], MID["kv_heads"]
    d = MID["hidden"] // heads
    cap = context + 64
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv,
        scale=float(d**-0.5),
    )
    f = TensorProto.FLOAT
    cache = [chats, kv, cap, d]
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            helper.make_tensor_value_info("q", f, [chats, 1, heads * d]),
            helper.make_tensor_value_info("k", f, [chats, 1, kv * d]),
            helper.make_tensor_value_info("v", f, [chats, 1, kv * d]),
            helper.make_tensor_value_info("past_k", f, cache),
            helper.make_tensor_value_info("past_v", f, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [chats]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("out", f, [chats, 1, heads * d]),
            helper.make_tensor_value_info("present_k", f, cache),
            helper.make_tensor_value_info("present_v", f, cache),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = cpu_backend(model, threads=threads).session
    rng = np.random.default_rng(seed)
    qkv = {
        n: rng.standard_normal((chats, 1, w * d)).astype(np.float32)
        for n, w in (("q", heads), ("k", kv), ("v", kv))
    }
    bufs = [(rng.standard_normal(cache) * 0.1).astype(np.float32) for _ in range(2)]
    out = np.empty((chats, 1, heads * d), np.float32)
    binding = session.io_binding()
    for name, arr in qkv.items():
        binding.bind_cpu_input(name, arr)
    binding.bind_cpu_input("seqlens_k", np.full(chats, context, np.int32))
    binding.bind_cpu_input("total", np.array(context + 1, np.int32))
    for (past, present), buf in zip((("past_k", "present_k"), ("past_v", "present_v")), bufs, strict=True):
        for name, bind in ((past, binding.bind_input), (present, binding.bind_output)):
            bind(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    binding.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    session.run_with_iobinding(binding)  # warm
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append((time.perf_counter() - began) * 1e3)
    return times


def write(record: dict[str, Any], machine: dict[str, Any]) -> None:
    record = {
        **record,
        "loadavg": os.getloadavg(),
        "machine": machine,
        "time": time.strftime("%FT%TZ", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per rate measurement")
    parser.add_argument("--contexts", default="100,500,1000,2000")
    parser.add_argument("--work", type=Path, default=None, help="folder for the graphs (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qwen-batching-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "shared.onnx").is_file():
        build(work)
    machine = machine_info(args.threads)
    runs = engines(work, args.threads)
    base = {"bench": "qwen_batching", "config": "mid", **MID, "threads": args.threads, "precision": "fp32"}

    for layout, engine in runs.items():  # warm both
        decode_rate(engine, 4, 4, 0)
    rates: dict[str, dict[int, list[float]]] = {lay: {1: [], 4: []} for lay in LAYOUTS}
    for rep in range(args.repeats):  # interleaved: layouts and batch sizes share the machine's state
        for layout, engine in runs.items():
            for chats in (1, 4):
                rates[layout][chats].append(decode_rate(engine, chats, args.steps, rep))
    for layout in LAYOUTS:
        one, four = rates[layout][1], rates[layout][4]
        write(
            {
                **base,
                "figure": "aggregate",
                "layout": layout,
                "prompt": 65,
                "steps": args.steps,
                "one_chat_tok_s": {"median": statistics.median(one), "max": max(one)},
                "four_chats_tok_s": {"median": statistics.median(four), "max": max(four)},
                "speedup_median": statistics.median(four) / statistics.median(one),
            },
            machine,
        )

    contexts = [int(c) for c in args.contexts.split(",")]
    steps: dict[tuple[str, int], list[float]] = {(lay, c): [] for lay in LAYOUTS for c in contexts}
    for rep in range(max(1, args.repeats // 2)):
        for context in contexts:
            for layout, engine in runs.items():
                steps[layout, context] += step_ms(engine, context, 4, 6, rep)
    for layout in LAYOUTS:
        write(
            {
                **base,
                "figure": "step_vs_context",
                "layout": layout,
                "chats": 4,
                "step_ms": {
                    str(c): {"median": statistics.median(steps[layout, c]), "min": min(steps[layout, c])}
                    for c in contexts
                },
            },
            machine,
        )

    attention: dict[int, list[float]] = {c: [] for c in contexts}
    for rep in range(max(1, args.repeats // 2)):
        for context in contexts:
            attention[context] += attention_ms(context, 4, args.threads, 6, rep)
    shared_steps = {c: statistics.median(steps["shared", c]) for c in contexts}
    per_step = {c: MID["layers"] * statistics.median(attention[c]) for c in contexts}
    write(
        {
            **base,
            "figure": "attention_vs_context",
            "layout": "shared",
            "chats": 4,
            "step_ms_median": {str(c): shared_steps[c] for c in contexts},
            "attention_ms_median": {str(c): per_step[c] for c in contexts},
            "rest_ms": {str(c): shared_steps[c] - per_step[c] for c in contexts},
        },
        machine,
    )

    for layout, engine in runs.items():
        per_position = (engine.sequence_bytes(8192) - engine.sequence_bytes(4096)) / 4096
        model = 2 * MID["layers"] * MID["kv_heads"] * (MID["hidden"] // MID["heads"]) * 4
        write(
            {
                **base,
                "figure": "kv_bytes",
                "layout": layout,
                "bytes_per_position": per_position,
                "model_implies": model,
            },
            machine,
        )


if __name__ == "__main__":
    main()
