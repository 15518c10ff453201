"""INT8 vs FP32 latency, each variant in its own `kiln bench` process (no sessions alive side by
side: idle ONNX Runtime threads spin and would disturb each other), rounds interleaved A B C A B C.

Builds: FP32 (exported, then `kiln optimize`), our INT8 (`kiln quantize`, default method), and ONNX
Runtime's quantize_static (QDQ, per-channel, MinMax) on the same FP32 graph and calibration data.
One JSON line per model with median and min latency per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ort_anchor import ort_quantize_static

from modelkiln.bench.runner import machine_info

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
KILN = [sys.executable, "-m", "modelkiln", "-q"]
MODELS = {
    "efficientnet_lite0": (None, ASSETS / "imagenet-sample", 100),
    "yolov5n": (str(ASSETS / "yolov5n.pt"), ASSETS / "coco-tiny" / "train2017", 80),
    "resnet50": ("random", ASSETS / "imagenet-sample", 32),
}


def build(zoo: str, work: Path) -> dict[str, Path]:
    weights, calib, size = MODELS[zoo]
    raw, fp32, ours, theirs = (work / f"{zoo}.{k}.onnx" for k in ("raw", "fp32", "kiln", "ort"))
    subprocess.run(
        [*KILN, "export", zoo, "-o", str(raw), *(["--weights", weights] if weights else [])],
        check=True,
        capture_output=True,
    )
    subprocess.run([*KILN, "optimize", str(raw), "-o", str(fp32)], check=True, capture_output=True)
    subprocess.run(
        [
            *KILN,
            "quantize",
            str(fp32),
            "-o",
            str(ours),
            "--calib",
            str(calib),
            "--zoo",
            zoo,
            "--calib-size",
            str(size),
        ],
        check=True,
        capture_output=True,
    )
    ort_quantize_static(fp32, theirs, calib, zoo, "minmax", size)
    return {"fp32": fp32, "kiln_int8": ours, "ort_int8": theirs}


def bench(path: Path, iterations: int) -> dict[int, list[float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [
                *KILN,
                "bench",
                str(path),
                "--batch",
                "1,8",
                "--threads",
                "2",
                "--warmup",
                "5",
                "--iterations",
                str(iterations),
                "--json",
                f.name,
            ],
            check=True,
            capture_output=True,
        )
        rows = json.loads(Path(f.name).read_text())
    return {r["batch"]: r["latencies_ms"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--only", default=",".join(MODELS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for zoo in a.only.split(","):
            variants = build(zoo, Path(tmp))
            samples: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in variants}
            for _ in range(a.rounds):
                for k, p in variants.items():
                    for batch, lat in bench(p, a.iterations).items():
                        samples[k][batch] += lat
            row = {
                "bench": "int8_latency",
                "model": zoo,
                "rounds": a.rounds,
                "iterations": a.iterations,
                "machine": machine_info(2),
            }
            for batch in (1, 8):
                med = {k: statistics.median(v[batch]) for k, v in samples.items()}
                row[f"batch{batch}"] = {
                    k: {"median_ms": med[k], "min_ms": min(v[batch])} for k, v in samples.items()
                }
                row[f"batch{batch}_ratio_kiln_vs_fp32"] = med["kiln_int8"] / med["fp32"]
                row[f"batch{batch}_ratio_kiln_vs_ort"] = med["kiln_int8"] / med["ort_int8"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
