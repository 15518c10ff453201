"""INT8 on real weights: ours vs ONNX Runtime's quantize_static (the anchor), same data, same run.

Calibrate only on the dev assets (ImageNet: the first 100 of imagenet-sample; COCO:
coco-tiny/train2017), evaluate on imagenet-sample and coco-tiny/val2017. For each model: FP32,
our INT8 per calibration method, ORT QDQ per-channel MinMax/Entropy/Percentile: task metric,
latency (batch 1 and 8, 2 threads, median/min over interleaved rounds), calibration seconds and
peak RSS of our quantizer (run as a child process). Also ResNet-50 (random weights) FP32 vs INT8
speed at batch 8. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ort_anchor import ort_quantize_static

from modelkiln.accuracy.evaluate import evaluate
from modelkiln.bench.runner import machine_info
from modelkiln.export import export
from modelkiln.graph import optimize
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.zoo import get

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
KILN = [sys.executable, "-m", "modelkiln"]


def ours(src: Path, out: Path, calib: Path, zoo: str, method: str, size: int) -> dict:
    """Run `kiln quantize` as a child; wait4 gives that child's own peak RSS."""
    t = time.perf_counter()
    child = subprocess.Popen(
        [
            *KILN,
            "-q",
            "quantize",
            str(src),
            "-o",
            str(out),
            "--calib",
            str(calib),
            "--zoo",
            zoo,
            "--method",
            method,
            "--calib-size",
            str(size),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t
    if status:
        raise RuntimeError(child.stderr.read().decode()[-2000:] if child.stderr else "quantize failed")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def ort_anchor(src: Path, out: Path, calib: Path, zoo: str, method: str, size: int) -> dict:
    return {"seconds": ort_quantize_static(src, out, calib, zoo, method, size)}


def latency(paths: dict[str, Path], zoo: str, rounds: int, iters: int) -> dict:
    """Per round, each variant alone: a fresh session, warm-up, timed calls, then released (idle
    ONNX Runtime threads spin for a while after a run, so live sessions would disturb each other)."""
    entry = get(zoo)
    spec = entry.parts[0].inputs[0]
    out = {}
    for batch in (1, 8):
        x = np.random.default_rng(0).random((batch, *spec.shape[1:]), dtype=np.float32)
        samples: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, p in paths.items():
                backend = cpu_backend(p, threads=2)
                for _ in range(3):
                    backend.infer({spec.name: x})
                for _ in range(iters):
                    t = time.perf_counter()
                    backend.infer({spec.name: x})
                    samples[k].append((time.perf_counter() - t) * 1e3)
                del backend
                time.sleep(0.05)
        out[f"batch{batch}"] = {
            k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in samples.items()
        }
    return out


def task(model: Path, zoo: str) -> dict:
    if zoo == "yolov5n":
        coco = ASSETS / "coco-tiny"
        return evaluate(model, zoo, coco / "val2017", coco / "annotations" / "instances_val2017.json").metrics
    folder = ASSETS / "imagenet-sample"
    return evaluate(model, zoo, folder, folder / "labels.csv").metrics


def run_model(
    zoo: str,
    weights: str | None,
    calib: Path,
    size: int,
    work: Path,
    methods: list[str],
    rounds: int,
    iters: int,
) -> None:
    raw = work / f"{zoo}.onnx"
    export(zoo, raw, weights=weights)
    fp32 = work / f"{zoo}.fp32.onnx"
    optimize(raw, fp32)
    variants = {"fp32": fp32}
    info: dict[str, dict] = {}
    for m in methods:
        variants[f"kiln_{m}"] = work / f"{zoo}.kiln.{m}.onnx"
        info[f"kiln_{m}"] = ours(fp32, variants[f"kiln_{m}"], calib, zoo, m, size)
    for m in ("minmax", "entropy", "percentile"):
        variants[f"ort_{m}"] = work / f"{zoo}.ort.{m}.onnx"
        info[f"ort_{m}"] = ort_anchor(fp32, variants[f"ort_{m}"], calib, zoo, m, size)
    metrics = {k: task(p, zoo) for k, p in variants.items()}
    row = {
        "bench": "int8_vs_ort",
        "model": zoo,
        "calib": str(calib),
        "calib_size": size,
        "metrics": metrics,
        "quantize": info,
        "latency": latency(variants, zoo, rounds, iters),
        "machine": machine_info(2),
    }
    print(json.dumps(row), flush=True)


def resnet_speed(work: Path, rounds: int, iters: int) -> None:
    raw = work / "resnet50.onnx"
    export("resnet50", raw, weights="random")
    fp32 = work / "resnet50.fp32.onnx"
    optimize(raw, fp32)
    q = work / "resnet50.int8.onnx"
    ours(fp32, q, ASSETS / "imagenet-sample", "resnet50", "percentile", 32)
    lat = latency({"fp32": fp32, "kiln_int8": q}, "resnet50", rounds, iters)
    speedup = {b: lat[b]["fp32"]["median_ms"] / lat[b]["kiln_int8"]["median_ms"] for b in lat}
    print(
        json.dumps(
            {
                "bench": "resnet50_int8_speed",
                "latency": lat,
                "speedup_median": speedup,
                "machine": machine_info(2),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="percentile,entropy,minmax,mse")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", default="efficientnet_lite0,yolov5n,resnet50")
    a = ap.parse_args()
    methods = a.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        only = a.only.split(",")
        if "efficientnet_lite0" in only:
            run_model(
                "efficientnet_lite0", None, ASSETS / "imagenet-sample", 100, work, methods, a.rounds, a.iters
            )
        if "yolov5n" in only:
            run_model(
                "yolov5n",
                str(ASSETS / "yolov5n.pt"),
                ASSETS / "coco-tiny" / "train2017",
                80,
                work,
                methods,
                a.rounds,
                a.iters,
            )
        if "resnet50" in only:
            resnet_speed(work, a.rounds, a.iters)


if __name__ == "__main__":
    main()
