"""CLIP ViT-B-32 image and text towers (random weights: no CLIP weights can be had here) under
plain W8A8, our transformer defaults and SmoothQuant: output cosine to FP32 and per-layer SNR.

Image tower: calibrated on coco-tiny/train2017, scored on coco-tiny/val2017 (random blurred
images when ../shared/assets is absent). Text tower: token ids of the calibration and evaluation
sentences in benchmarks/data. One JSON line per tower and variant.

    .venv/bin/python benchmarks/clip_int8.py [--out benchmarks/results/clip_int8.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from modelkiln.accuracy.compare import compare_models, sample_cosines
from modelkiln.bench.runner import machine_info
from modelkiln.data.feeds import model_feeds
from modelkiln.export import export
from modelkiln.quant.config import QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms
from modelkiln.zoo import get

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parents[1] / "shared" / "assets"
VARIANTS = {
    "plain_w8a8": QuantConfig(transformer=False, int8_attention=True),
    "transformer": QuantConfig(),
    "smoothquant": QuantConfig(smoothquant=0.5),
}


def image_folders(tmp: Path) -> tuple[Path, Path]:
    if (ASSETS / "coco-tiny").is_dir():
        return ASSETS / "coco-tiny" / "train2017", ASSETS / "coco-tiny" / "val2017"
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for name in ("calib", "eval"):
        folder = tmp / f"img_{name}"
        folder.mkdir()
        for i in range(32):
            cv2.imwrite(
                str(folder / f"{i}.png"),
                cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), np.uint8), (9, 9), 3),
            )
        out.append(folder)
    return out[0], out[1]


def text_folder(tmp: Path, entry, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    lines = [
        s.strip() for s in (HERE / "data" / f"sentences_{name}.txt").read_text().splitlines() if s.strip()
    ]
    ids = entry.tokenize(lines)
    for i, row in enumerate(ids):
        np.save(folder / f"{i:04d}.npy", row[None])
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "results" / "clip_int8.jsonl")
    ap.add_argument("--limit", type=int, default=64, help="evaluation samples per tower")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-clip-"))
    entry = get("clip-vit-b-32")
    export("clip-vit-b-32", tmp / "fp32", weights="random")
    img_calib, img_eval = image_folders(tmp)
    data = {
        "image": (img_calib, img_eval, "clip-vit-b-32"),
        "text": (text_folder(tmp, entry, "calib"), text_folder(tmp, entry, "eval"), None),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for tower, (calib, evald, zoo) in data.items():
        fp32 = tmp / "fp32" / f"{tower}.onnx"
        feed_list = list(model_feeds(fp32, evald, entry if zoo else None, 8, args.limit))

        def feeds(fl: list = feed_list) -> list:
            return fl

        paths = {"fp32": fp32}
        for name, config in VARIANTS.items():
            out = tmp / f"{tower}_{name}.onnx"
            result = quantize(fp32, out, calib, zoo, config, calib_size=64)
            paths[name] = out
            cos = sample_cosines(cpu_backend(fp32), cpu_backend(out), feeds())
            layers = compare_models(fp32, out, feeds(), per_layer=True).layers
            snr = np.asarray([min(layer.snr_db, 80.0) for layer in layers])
            snr = snr[np.isfinite(snr)]  # masked attention scores (-inf) have no SNR
            row = {
                "bench": "clip_int8",
                "tower": tower,
                "variant": name,
                "samples": int(cos.size),
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "layer_snr_db": {
                    "min": float(snr.min()),
                    "median": float(np.median(snr)),
                    "last": float(snr[-1]),
                    "layers": int(snr.size),
                },
                "worst_layers": [
                    (lay.name, round(lay.snr_db, 1)) for lay in sorted(layers, key=lambda x: x.snr_db)[:5]
                ],
                "quantized_ops": result.quantized_ops,
                "smoothed": len(result.smoothed),
                "machine": machine_info(),
            }
            print(json.dumps(row))
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        feed = next(iter(feeds()))
        lat = interleaved_latency_ms(
            {k: cpu_backend(v, threads=2) for k, v in paths.items()}, feed, rounds=3, iterations=3
        )
        row = {
            "bench": "clip_int8",
            "tower": tower,
            "latency_ms": lat,
            "batch": int(next(iter(feed.values())).shape[0]),
        }
        print(json.dumps(row))
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
