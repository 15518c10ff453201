"""Issue 17: INT8 with modelkiln's lookup kernel vs INT8 in standard ops vs FP32: latency at batch 1
and 8 (2 threads) and task accuracy on the real assets, per model.

Variants, all from one calibration (one Quantizer): ``fp32`` (exported, `kiln optimize`),
``int8_std`` (default config with ``custom_kernels=False``: standard ONNX ops only, SiLU as
DequantizeLinear -> Sigmoid -> Mul -> QuantizeLinear) and ``int8_fast`` (the default: SiLU and other
activations between int8 tensors as one exact LookupTable). Each latency sample comes from its own
`kiln bench` process (idle ONNX Runtime threads of another live session would disturb it), rounds
interleaved A B C A B C; median and min over all calls. Accuracy: `kiln evaluate` (mAP50-95 on
coco-tiny val2017 for yolov5n, top-1 on the ImageNet sample for efficientnet_lite0; resnet50 has
random weights here, so only its latency counts).

    .venv/bin/python benchmarks/int8_kernels.py [--only yolov5n] [--rounds 3] [--iterations 20]

One JSON line per model, appended to benchmarks/results/int8_kernels.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from modelkiln.bench.runner import machine_info
from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.quantizer import Quantizer

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
RESULTS = Path(__file__).resolve().parent / "results" / "int8_kernels.jsonl"
KILN = [sys.executable, "-m", "modelkiln", "-q"]
COCO = ASSETS / "coco-tiny"
#: zoo name -> (weights, calibration folder, samples, evaluation data, labels)
MODELS: dict[str, tuple[str | None, Path, int, Path | None, Path | None]] = {
    "yolov5n": (
        str(ASSETS / "yolov5n.pt"),
        COCO / "train2017",
        80,
        COCO / "val2017",
        COCO / "annotations" / "instances_val2017.json",
    ),
    "efficientnet_lite0": (
        None,
        ASSETS / "imagenet-sample",
        100,
        ASSETS / "imagenet-sample",
        ASSETS / "imagenet-sample" / "labels.csv",
    ),
    "resnet50": ("random", ASSETS / "imagenet-sample", 32, None, None),
}


def build(zoo: str, work: Path) -> tuple[dict[str, Path], dict[str, object]]:
    weights, calib, size, _, _ = MODELS[zoo]
    raw, fp32 = work / f"{zoo}.raw.onnx", work / f"{zoo}.fp32.onnx"
    extra = ["--weights", weights] if weights else []
    subprocess.run([*KILN, "export", zoo, "-o", str(raw), *extra], check=True, capture_output=True)
    subprocess.run([*KILN, "optimize", str(raw), "-o", str(fp32)], check=True, capture_output=True)
    quantizer = Quantizer(fp32, QuantConfig(), CalibrationData(calib, zoo, size))
    fast, std = work / f"{zoo}.int8_fast.onnx", work / f"{zoo}.int8_std.onnx"
    fast_summary = quantizer.save(fast)
    quantizer.save(std, quantizer.make(dataclasses.replace(quantizer.config, custom_kernels=False)))
    return {"fp32": fp32, "int8_std": std, "int8_fast": fast}, {"lookups": fast_summary.lookups}


def bench(path: Path, iterations: int) -> dict[int, list[float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [*KILN, "bench", str(path), "--batch", "1,8", "--threads", "2", "--warmup", "5"]
        cmd += ["--iterations", str(iterations), "--json", f.name]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = json.loads(Path(f.name).read_text())
    return {r["batch"]: r["latencies_ms"] for r in rows}


def accuracy(zoo: str, model: Path) -> dict[str, float]:
    _, _, _, data, labels = MODELS[zoo]
    if data is None or labels is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [*KILN, "evaluate", str(model), "--data", str(data), "--labels", str(labels)]
        subprocess.run([*cmd, "--zoo", zoo, "--json", f.name], check=True, capture_output=True)
        found = json.loads(Path(f.name).read_text())
    return {k: float(v) for k, v in found["metrics"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--keep", type=Path, help="Keep the built models in this folder.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for zoo in a.only.split(","):
            variants, notes = build(zoo, work)
            samples: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in variants}
            for _ in range(a.rounds):
                for k, p in variants.items():
                    for batch, lat in bench(p, a.iterations).items():
                        samples[k][batch] += lat
            row: dict[str, object] = {"bench": "int8_kernels", "model": zoo, "rounds": a.rounds}
            row |= {"iterations": a.iterations, "machine": machine_info(2), **notes}
            for batch in (1, 8):
                med = {k: statistics.median(v[batch]) for k, v in samples.items()}
                row[f"batch{batch}"] = {
                    k: {"median_ms": round(med[k], 3), "min_ms": round(min(v[batch]), 3)}
                    for k, v in samples.items()
                }
                row[f"batch{batch}_speedup_vs_fp32"] = {
                    k: round(med["fp32"] / med[k], 3) for k in variants if k != "fp32"
                }
            row["accuracy"] = {k: accuracy(zoo, p) for k, p in variants.items()}
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
