"""kiln optimize vs onnxslim vs onnxsim on every zoo export, in one run.

Per model: node counts, max abs error of each result vs the original (random inputs, ONNX Runtime
with optimisations off), ONNX Runtime latency at batch 1 with 2 threads and ORT_ENABLE_ALL
(median and min over interleaved rounds), and our planned activation memory vs naive.
Exports the zoo first (Lite0 with its real weights, YOLOv5n with ../shared/assets/yolov5n.pt when
present, the rest random). One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from modelkiln.bench.runner import machine_info
from modelkiln.graph import optimize
from modelkiln.graph.optimize import check_parity
from modelkiln.runtime.backends.onnxruntime import cpu_backend

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
ZOO = {
    "resnet50": ("resnet50.onnx", "random"),
    "efficientnet_lite0": ("efficientnet_lite0.onnx", None),
    "yolov5n": (
        "yolov5n.onnx",
        str(ASSETS / "yolov5n.pt") if (ASSETS / "yolov5n.pt").is_file() else "random",
    ),
    "clip-vit-b-32": ("clip", "random"),
}


def exports(folder: Path) -> dict[str, Path]:
    from modelkiln.export import export

    files = {}
    for name, (target, weights) in ZOO.items():
        out = folder / target
        result = export(name, out, weights=weights)
        for part, path in result.files.items():
            files[name if part == "model" else f"{name}/{part}"] = path
    return files


def latency_ms(path: Path, feed: dict, rounds: int, iters: int) -> list[float]:
    session = cpu_backend(path, threads=2).session
    for _ in range(3):
        session.run(None, feed)
    out = []
    for _ in range(rounds * iters):
        t = time.perf_counter()
        session.run(None, feed)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def compare(name: str, src: Path, work: Path, rounds: int, iters: int) -> dict:
    import onnxsim
    import onnxslim

    original = onnx.load(src)
    variants = {"original": src}
    t = time.perf_counter()
    result = optimize(src, work / f"{src.stem}.kiln.onnx")
    times = {"kiln": time.perf_counter() - t}
    variants["kiln"] = work / f"{src.stem}.kiln.onnx"
    t = time.perf_counter()
    onnx.save(onnxslim.slim(original), work / f"{src.stem}.slim.onnx")
    times["onnxslim"] = time.perf_counter() - t
    variants["onnxslim"] = work / f"{src.stem}.slim.onnx"
    t = time.perf_counter()
    simplified, ok = onnxsim.simplify(original)
    times["onnxsim"] = time.perf_counter() - t
    if ok:
        onnx.save(simplified, work / f"{src.stem}.sim.onnx")
        variants["onnxsim"] = work / f"{src.stem}.sim.onnx"
    row = {"bench": "optimize_vs_slim", "model": name, "seconds": times}
    row["nodes"] = {k: len(onnx.load(p, load_external_data=False).graph.node) for k, p in variants.items()}
    row["max_abs_vs_original"] = {
        k: max(c.max_abs for c in check_parity(original, onnx.load(p), {}))
        for k, p in variants.items()
        if k != "original"
    }
    session = cpu_backend(src).session
    feed = {}
    rng = np.random.default_rng(0)
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = (
            rng.integers(0, 100, shape) if "int" in i.type else rng.standard_normal(shape)
        ).astype(np.int64 if "int64" in i.type else np.float32)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):  # interleave variants so drift hits all alike
        for k, p in variants.items():
            samples[k] += latency_ms(p, feed, 1, iters)
    row["latency_ms_median"] = {k: statistics.median(v) for k, v in samples.items()}
    row["latency_ms_min"] = {k: min(v) for k, v in samples.items()}
    base = row["latency_ms_median"]
    row["kiln_vs_original"] = base["kiln"] / base["original"]
    row["kiln_vs_onnxslim"] = base["kiln"] / base["onnxslim"]
    row["memory_naive_mb"] = result.memory.naive_bytes / 1e6 if result.memory else None
    row["memory_planned_mb"] = result.memory.planned_bytes / 1e6 if result.memory else None
    row["kiln_nodes_le_best"] = row["nodes"]["kiln"] <= min(
        v for k, v in row["nodes"].items() if k in ("onnxslim", "onnxsim")
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", help="comma-separated subset of model keys")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = exports(work)
        for name, path in files.items():
            if a.only and name not in a.only.split(","):
                continue
            row = compare(name, path, work, a.rounds, a.iters)
            row["machine"] = machine_info(2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
