"""The Qwen2-VL vision encoder built from the weights (export/builder/vision.py), one graph for any
image size: build time and peak RSS at Qwen2-VL-2B's size (ViT depth 32, width 1280, 16 heads,
~675 M parameters, 2.7 GB in FP32), its parity with transformers on a few grids, and the encoder's
latency for a few image sizes on 2 threads.

    .venv/bin/python benchmarks/qwen_vision.py --ckpt /work/qwen2b/ckpt --work DIR \\
        [--stages build,check,latency] [--sizes 224x224,448x448,448x1008] [--rounds 5]
    .venv/bin/python benchmarks/qwen_vision.py --ckpt CKPT --work W8_DIR --precision w8 --stages build
    .venv/bin/python benchmarks/qwen_vision.py --ckpt CKPT --work W8_DIR --stages compare --reference FP32_DIR

``compare`` runs two built encoders (e.g. W8 against FP32) on the same processor-resized images,
interleaved: each one's latency, and the cosine of their image embeddings per merged token.

``--ckpt`` is a Qwen2-VL weights folder (the random 2B one: ``zoo.qwen_vl.ensure_random_checkpoint``).
Each stage runs in its own process (its peak RSS, VmHWM, is its own). ``DIR/vision.onnx`` is the
built graph. One JSON line per stage is appended to benchmarks/results/qwen_vision.jsonl, with the
machine and the load average beside every timing. Run timings under ``flock /tmp/heavy.lock``.
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

RESULTS = Path(__file__).parent / "results" / "qwen_vision.jsonl"
#: Patch grids checked against transformers at 2B size: square, wide, tall (small: the reference
#: runs the whole 32-block ViT in torch).
CHECK_GRIDS = ((1, 8, 8), (1, 4, 12), (1, 12, 4))


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _config(ckpt: Path) -> Any:
    from modelkiln.zoo.qwen_vl import load_config_and_processor

    config, _ = load_config_and_processor(ckpt, "qwen2-vl")
    return config


def stage_build(ckpt: Path, work: Path, precision: str) -> dict[str, Any]:
    from modelkiln.export.builder.tensors import SafetensorsFolder
    from modelkiln.export.builder.vision import build_vision

    config = _config(ckpt)
    before = status_kb("VmHWM")
    started = time.perf_counter()
    path = build_vision(
        config.vision_config, "qwen2-vl", SafetensorsFolder(ckpt), work, "vision.onnx", precision
    )
    seconds = time.perf_counter() - started
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return {
        "stage": "build",
        "precision": precision,
        "build_s": round(seconds, 1),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
        "rss_before_gb": round(before / 1e6, 2),
        "file_gb": round(size / 1e9, 3),
    }


def stage_check(ckpt: Path, work: Path) -> dict[str, Any]:
    """transformers' encoder (loaded alone from the shards) on a few grids, let go, then the graph."""
    import gc

    from modelkiln.export.builder.tensors import SafetensorsFolder
    from modelkiln.export.builder.vision import VisionShape, vision_feed
    from modelkiln.export.qwen_vl import vision_from_tensors
    from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend
    from modelkiln.zoo.qwen_vl import QwenVLFamily, vision_reference

    config = _config(ckpt)
    entry = QwenVLFamily(tiny=False)
    entry._config = config
    shape = VisionShape.of(config.vision_config, "qwen2-vl")
    rng = np.random.default_rng(0)
    visual = vision_from_tensors(entry, SafetensorsFolder(ckpt))
    cases = []
    for grid in CHECK_GRIDS:
        pixels = rng.standard_normal((int(np.prod(grid)), shape.patch_width)).astype(np.float32)
        cases.append((grid, pixels, vision_reference(visual, pixels, grid)))
    del visual
    gc.collect()
    backend = cpu_backend(work / "vision.onnx", optimization=GraphOptimization.DISABLE)
    errors = {}
    for grid, pixels, ref in cases:
        got = backend.infer(vision_feed(pixels, grid, shape.to_dict()))["image_embeds"]
        errors["x".join(map(str, grid[1:]))] = float(np.abs(got - ref).max())
    return {
        "stage": "check",
        "max_abs": errors,
        "passed": max(errors.values()) <= 1e-4,
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
    }


def stage_latency(ckpt: Path, work: Path, sizes: list[tuple[int, int]], rounds: int) -> dict[str, Any]:
    """Pixels to image_embeds for images of ``sizes`` (processor-resized), 2 threads, interleaved."""
    from modelkiln.bench.runner import machine_info
    from modelkiln.export.builder.vision import VisionShape, vision_feed
    from modelkiln.genai.images import ImageProcessor
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    config = _config(ckpt)
    shape = VisionShape.of(config.vision_config, "qwen2-vl")
    processor = ImageProcessor()  # Qwen2-VL's defaults: 56*56 .. 28*28*1280 pixels
    backend = cpu_backend(work / "vision.onnx", threads=2)
    rng = np.random.default_rng(0)
    feeds = {}
    for h, w in sizes:
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pixels, grid = processor.patches(image)
        feeds[f"{h}x{w}"] = (grid, vision_feed(pixels, grid, shape.to_dict()))
    for _, feed in feeds.values():  # warm-up
        backend.infer(feed)
    times: dict[str, list[float]] = {k: [] for k in feeds}
    for _ in range(rounds):
        for key, (_, feed) in feeds.items():
            began = time.perf_counter()
            backend.infer(feed)
            times[key].append(time.perf_counter() - began)
    return {
        "stage": "latency",
        "threads": 2,
        "rounds": rounds,
        "images": {
            key: {
                "grid": list(feeds[key][0]),
                "patches": int(np.prod(feeds[key][0])),
                "median_ms": round(statistics.median(t) * 1e3, 1),
                "min_ms": round(min(t) * 1e3, 1),
            }
            for key, t in times.items()
        },
        "loadavg": os.getloadavg(),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
        "machine": machine_info(threads=2),
    }


def stage_compare(
    ckpt: Path, work: Path, reference: Path, sizes: list[tuple[int, int]], rounds: int
) -> dict[str, Any]:
    """``work``'s encoder against ``reference``'s on the same images: latency of each (interleaved)
    and the per-token cosine of the image embeddings (mean and min)."""
    from modelkiln.bench.runner import machine_info
    from modelkiln.export.builder.vision import VisionShape, vision_feed
    from modelkiln.genai.images import ImageProcessor
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    shape = VisionShape.of(_config(ckpt).vision_config, "qwen2-vl").to_dict()
    ours, ref = (
        cpu_backend(work / "vision.onnx", threads=2),
        cpu_backend(reference / "vision.onnx", threads=2),
    )
    processor = ImageProcessor()
    rng = np.random.default_rng(0)
    images: dict[str, Any] = {}
    for h, w in sizes:
        pixels, grid = processor.patches((rng.random((h, w, 3)) * 255).astype(np.uint8))
        feed = vision_feed(pixels, grid, shape)
        a, b = ours.infer(feed)["image_embeds"], ref.infer(feed)["image_embeds"]  # warm-up, and the outputs
        cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        for _ in range(rounds):
            for key, backend in (("ours", ours), ("reference", ref)):
                began = time.perf_counter()
                backend.infer(feed)
                times[key].append(time.perf_counter() - began)
        images[f"{h}x{w}"] = {
            "patches": int(np.prod(grid)),
            "cosine_mean": round(float(cos.mean()), 6),
            "cosine_min": round(float(cos.min()), 6),
            **{f"{k}_median_ms": round(statistics.median(t) * 1e3, 1) for k, t in times.items()},
            **{f"{k}_min_ms": round(min(t) * 1e3, 1) for k, t in times.items()},
        }
    return {
        "stage": "compare",
        "encoder": str(work),
        "reference": str(reference),
        "threads": 2,
        "rounds": rounds,
        "images": images,
        "loadavg": os.getloadavg(),
        "peak_rss_gb": round(status_kb("VmHWM") / 1e6, 2),
        "machine": machine_info(threads=2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stages", default="build,check,latency")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--sizes", default="224x224,448x448,448x1008")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference", type=Path, help="compare: the encoder folder to compare with")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # the child process's one stage
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.stage:
        if args.stage == "build":
            row = stage_build(args.ckpt, args.work, args.precision)
        elif args.stage == "check":
            row = stage_check(args.ckpt, args.work)
        elif args.stage == "compare":
            row = stage_compare(args.ckpt, args.work, args.reference, sizes, args.rounds)  # type: ignore[arg-type]
        else:
            row = stage_latency(args.ckpt, args.work, sizes, args.rounds)  # type: ignore[arg-type]
        print(json.dumps(row))
        return
    for stage in args.stages.split(","):
        cmd = [sys.executable, __file__, "--ckpt", str(args.ckpt), "--work", str(args.work), "--stage", stage]
        cmd += ["--precision", args.precision, "--sizes", args.sizes, "--rounds", str(args.rounds)]
        cmd += ["--reference", str(args.reference)] if args.reference else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"stage {stage} failed")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["ckpt"] = str(args.ckpt)
        row["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(json.dumps(row))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
