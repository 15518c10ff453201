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
3. ``kv_bytes``: what a sequence holds per position against 2 x layers x kv x d x 4.

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
