"""MiniLM (all-MiniLM-L6-v2, real weights) INT8: ours beside ONNX Runtime's own quantizers.

Calibration: benchmarks/data/sentences_calib.txt (100 sentences); evaluation:
benchmarks/data/sentences_eval.txt (200 other sentences), one .npz feed per sentence, unpadded.
Score: cosine of each INT8 sentence embedding to the FP32 one (mean and min over the 200).
Latency: every eval sentence at batch 1, models timed in interleaved rounds (ms per sentence,
median and min over rounds), and one padded batch of 8 sentences. One JSON line per model.

    .venv/bin/python benchmarks/minilm_int8.py [--out benchmarks/results/minilm_int8.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ort_anchor import ort_quantize_feeds

from modelkiln.accuracy.budget import AccuracyBudget, within_budget
from modelkiln.bench.runner import machine_info
from modelkiln.data.feeds import model_feeds, write_text_feeds
from modelkiln.export import export
from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.quant.quantizer import Quantizer
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms
from modelkiln.zoo import get

DATA = Path(__file__).resolve().parent / "data"


def sentences(name: str) -> list[str]:
    return [s.strip() for s in (DATA / name).read_text(encoding="utf-8").splitlines() if s.strip()]


def ort_static(src: Path, out: Path, calib: Path, method: str) -> None:
    feeds = list(model_feeds(src, calib, None, 1))
    if method != "minmax":  # ORT's histogram calibrators stack all batches: one length for all
        width = max(f["input_ids"].shape[1] for f in feeds)
        feeds = [{k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in f.items()} for f in feeds]
    ort_quantize_feeds(src, out, feeds, method)


def ort_dynamic(src: Path, out: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)


def cosines(ref: Path, cand: Path, feeds: list[dict]) -> np.ndarray:
    a, b = cpu_backend(ref, threads=2), cpu_backend(cand, threads=2)
    out = []
    for f in feeds:
        x, y = next(iter(a.infer(f).values()))[0], next(iter(b.infer(f).values()))[0]
        out.append(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)))
    return np.asarray(out)


def per_sentence_latency(models: dict[str, Path], feeds: list[dict], rounds: int = 7) -> dict[str, dict]:
    backends = {k: cpu_backend(p, threads=2) for k, p in models.items()}
    times: dict[str, list[float]] = {k: [] for k in backends}
    for b in backends.values():
        for f in feeds[:20]:
            b.infer(f)
    for _ in range(rounds):
        for k, b in backends.items():
            t = time.perf_counter()
            for f in feeds:
                b.infer(f)
            times[k].append((time.perf_counter() - t) / len(feeds) * 1e3)
    return {k: {"median": float(np.median(v)), "min": float(np.min(v))} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "minilm_int8.jsonl")
    ap.add_argument("--budget", type=float, default=0.004, help="--max-drop (cosine) for the budget variant")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-minilm-"))
    entry = get("all-minilm-l6-v2")
    calib = tmp / "calib"
    evald = tmp / "eval"
    write_text_feeds(entry, sentences("sentences_calib.txt"), calib)
    write_text_feeds(entry, sentences("sentences_eval.txt"), evald)
    fp32 = tmp / "fp32.onnx"
    export("all-minilm-l6-v2", fp32)
    models: dict[str, Path] = {"fp32": fp32}
    seconds: dict[str, float] = {}
    extra: dict[str, dict] = {}

    failed: dict[str, str] = {}

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            fn(tmp / f"{name}.onnx")
        except Exception as exc:  # noqa: BLE001 - an anchor that cannot quantize this model is a result too
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return
        seconds[name] = time.perf_counter() - t
        models[name] = tmp / f"{name}.onnx"

    for method in ("minmax", "entropy", "percentile"):
        timed(f"ort_static_{method}", lambda o, m=method: ort_static(fp32, o, calib, m))
    timed("ort_dynamic_per_tensor", lambda o: ort_dynamic(fp32, o, False))
    timed("ort_dynamic_per_channel", lambda o: ort_dynamic(fp32, o, True))
    plain = QuantConfig(transformer=False, int8_attention=True)
    timed("ours_plain_w8a8", lambda o: quantize(fp32, o, calib, config=plain))
    timed("ours_transformer", lambda o: quantize(fp32, o, calib))
    timed("ours_smoothquant", lambda o: quantize(fp32, o, calib, config=QuantConfig(smoothquant=0.5)))

    def budget(name: str, config: QuantConfig):  # tuned on the calibration sentences only, never on eval
        def run(o: Path) -> None:
            r = within_budget(
                Quantizer(fp32, config, CalibrationData(calib)), AccuracyBudget(calib, args.budget), o
            )
            extra[name] = {
                "kept_float": r.fallback.kept_float,
                "int8_fraction": r.fallback.int8_fraction,
                "calib_cosine": r.fallback.metric,
            }

        return run

    timed("ours_budget", budget("ours_budget", QuantConfig(smoothquant=0.5)))
    timed("ours_dynamic", lambda o: quantize(fp32, o, None, config=QuantConfig(dynamic=True)))
    timed("ours_dynamic_budget", budget("ours_dynamic_budget", QuantConfig(dynamic=True)))
    timed("ours_weight_only", lambda o: quantize(fp32, o, None, config=QuantConfig(weight_only=True)))
    feeds = list(model_feeds(fp32, evald, None, 1))
    lat1 = per_sentence_latency(models, feeds)
    batch8 = entry.tokenize(sentences("sentences_eval.txt")[:8])
    lat8 = interleaved_latency_ms(
        {k: cpu_backend(p, threads=2) for k, p in models.items()}, batch8, rounds=5, iterations=5
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for name, error in failed.items():
            row = {"bench": "minilm_int8", "model": name, "error": error}
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")
        for name, path in models.items():
            c = cosines(fp32, path, feeds)
            row = {
                "bench": "minilm_int8",
                "model": name,
                "sentences": len(feeds),
                "cosine_mean": float(c.mean()),
                "cosine_min": float(c.min()),
                "ms_per_sentence_b1": lat1[name],
                "ms_batch8": lat8[name],
                "batch8_shape": list(batch8["input_ids"].shape),
                "size_mb": path.stat().st_size / 1e6,
                "quantize_s": seconds.get(name),
                **extra.get(name, {}),
                "machine": machine_info(2),
            }
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
