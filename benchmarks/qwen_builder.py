"""Qwen2-VL at its real size through the graph builder: ``qwen2-vl-2b-random`` (Qwen2-VL-2B-Instruct's
architecture, random bfloat16 weights written as safetensors shards), exported with every graph built
from the shards (decoder, embedding, the any-grid vision encoder); peak RSS and time of each stage, then
a short greedy generation with the exported folder on 2 threads (time to first token, decode rate).

Each stage runs in its own process, so its peak RSS (VmHWM, and VmRSS sampled every 50 ms to split
the export into its builder and vision phases) is its own:

    .venv/bin/python benchmarks/qwen_builder.py --work DIR [--precision w8] [--no-vision] [--new 16]
        [--stages checkpoint,export,chat]

``DIR/checkpoint`` keeps the random shards between runs (drawn once, seed 0); ``DIR/<precision>``
is the exported folder. One JSON line per stage is appended to benchmarks/results/qwen_builder.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np

RESULTS = Path(__file__).parent / "results" / "qwen_builder.jsonl"
PROMPT = "Tell me a long story about the harbour, the ships and the old town by the sea."


def status_kb(key: str) -> int:
    """A VmRSS/VmHWM-style field of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Sampler:
    """VmRSS every ``period`` s, and the log messages that mark the export's phases."""

    def __init__(self, period: float = 0.05) -> None:
        self.samples: list[tuple[float, int]] = []
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), status_kb("VmRSS")))
            time.sleep(period)

    def __enter__(self) -> Self:
        sampler = self

        class Marks(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                sampler.events.append((time.perf_counter(), record.getMessage()))

        logging.getLogger("modelkiln").addHandler(Marks())
        self.events.append((time.perf_counter(), "start"))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.events.append((time.perf_counter(), "end"))

    def peak_gb(self, start: float, end: float) -> float:
        window = [kb for t, kb in self.samples if start <= t <= end]
        return round(max(window, default=0) / 1e6, 2)

    def first(self, text: str) -> float:
        return next(t for t, m in self.events if text in m)

    def phases(self) -> list[dict]:
        """Each logged step: seconds from the previous one and the peak RSS in between."""
        rows = []
        for (t0, _), (t1, message) in zip(self.events, self.events[1:], strict=False):
            rows.append(
                {"until": message[:70], "seconds": round(t1 - t0, 1), "peak_rss_gb": self.peak_gb(t0, t1)}
            )
        return rows


def folder_gb(path: Path, pattern: str = "*") -> float:
    return round(sum(p.stat().st_size for p in path.glob(pattern) if p.is_file()) / 1e9, 3)


def stage_checkpoint(work: Path) -> dict:
    from modelkiln.zoo.qwen_vl import ensure_random_checkpoint

    start = time.perf_counter()
    ensure_random_checkpoint(work / "checkpoint")
    return {
        "stage": "random_checkpoint",
        "seconds": round(time.perf_counter() - start, 1),
        "shards_gb": folder_gb(work / "checkpoint", "*.safetensors"),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
    }


def stage_export(work: Path, precision: str, vision: bool) -> dict:
    from modelkiln.export.qwen_vl import export_qwen_vl
    from modelkiln.zoo.qwen_vl import qwen2_vl_2b_random

    out = work / precision
    with Sampler() as sampler:
        result = export_qwen_vl(
            qwen2_vl_2b_random(), out, weights=str(work / "checkpoint"), precision=precision, vision=vision
        )
    t0, t_end = sampler.events[0][0], sampler.events[-1][0]
    t_decoder = sampler.first("(decoder,")
    row = {
        "stage": "export",
        "precision": precision,
        "vision": vision,
        "seconds": round(t_end - t0, 1),
        "builder_seconds": round(t_decoder - t0, 1),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
        "builder_peak_rss_gb": sampler.peak_gb(t0, t_decoder),
        "decoder_gb": folder_gb(out, "decoder.onnx*"),
        "embed_gb": folder_gb(out, "embed.onnx*"),
    }
    for part in dict.fromkeys(p.part for p in result.parity):
        checks = [p for p in result.parity if p.part == part]
        row[f"parity_{part}"] = {
            "max_abs": float(max(p.max_abs for p in checks)),
            "cosine_min": round(min(p.cosine for p in checks), 7),
        }
    row["builder_peak_over_decoder"] = round(row["builder_peak_rss_gb"] / row["decoder_gb"], 2)
    row["phases"] = sampler.phases()
    if vision:
        row["vision_seconds"] = round(t_end - t_decoder, 1)
        row["vision_peak_rss_gb"] = sampler.peak_gb(t_decoder, t_end)
        row["vision_gb"] = folder_gb(out, "vision_*")
    return row


def stage_chat(work: Path, precision: str, new: int, rounds: int, threads: int) -> dict:
    from modelkiln.genai.engine import Engine
    from modelkiln.genai.measure import SETTLE_S, timed_greedy
    from modelkiln.genai.processor import QwenVLProcessor
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    folder = work / precision
    start = time.perf_counter()
    embed = cpu_backend(folder / "embed.onnx", threads=1)
    engine = Engine(
        folder / "decoder.onnx",
        lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0],
        threads=threads,
    )
    load_s = time.perf_counter() - start
    rss_loaded = status_kb("VmRSS") / 1e6
    processor = QwenVLProcessor.from_folder(folder)
    ids = processor(processor.apply_chat_template([{"role": "user", "content": PROMPT}]))["input_ids"]
    embeds = engine.embed(ids)
    positions = np.broadcast_to(np.arange(len(ids)), (3, len(ids))).copy()
    timed_greedy(engine, embeds, positions, 0, 2)  # warm-up
    runs = []
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        runs.append(timed_greedy(engine, embeds, positions, 0, new))
    return {
        "stage": "chat",
        "precision": precision,
        "threads": threads,
        "prompt_tokens": len(ids),
        "new_tokens": new,
        "rounds": rounds,
        "load_s": round(load_s, 1),
        "rss_after_load_gb": round(rss_loaded, 2),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
        "ttft_ms_median": round(statistics.median(r[0] for r in runs), 1),
        "ttft_ms_min": round(min(r[0] for r in runs), 1),
        "decode_tok_s_median": round(statistics.median(r[1] for r in runs), 2),
        "decode_tok_s_max": round(max(r[1] for r in runs), 2),
        "tokens": runs[0][2],
    }


def run_stage(args: argparse.Namespace, stage: str) -> dict:
    """One stage in a fresh interpreter (its own peak RSS); returns its JSON row."""
    cmd = [
        sys.executable,
        __file__,
        "--work",
        str(args.work),
        "--precision",
        args.precision,
        "--stage",
        stage,
    ]
    cmd += ["--new", str(args.new), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    if not args.vision:
        cmd.append("--no-vision")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--precision", default="w8", choices=["fp32", "fp16", "w8"])
    ap.add_argument("--no-vision", dest="vision", action="store_false")
    ap.add_argument("--no-chat", dest="chat", action="store_false")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["checkpoint", "export", "chat"])
    ap.add_argument("--stages", default="checkpoint,export,chat", help="stages to run, in order (e.g. chat)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage:  # a child: run one stage, print its row
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        if args.stage == "checkpoint":
            row = stage_checkpoint(args.work)
        elif args.stage == "export":
            row = stage_export(args.work, args.precision, args.vision)
        else:
            row = stage_chat(args.work, args.precision, args.new, args.rounds, args.threads)
        print(json.dumps(row))
        return
    from modelkiln.bench.runner import machine_info

    machine = machine_info(args.threads)
    stages = [s for s in args.stages.split(",") if s and (args.chat or s != "chat")]
    for stage in stages:
        row = {
            "bench": "qwen_builder",
            "model": "qwen2-vl-2b-random",
            **run_stage(args, stage),
            "machine": machine,
        }
        line = json.dumps(row)
        print(line, flush=True)
        with RESULTS.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
