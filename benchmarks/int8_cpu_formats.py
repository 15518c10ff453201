"""INT8 formats per CPU (issue 14): accuracy on a VNNI CPU and on an emulated AVX2-only CPU, and speed.

x86 CPUs without an int32 dot product (AVX2 only, e.g. AMD EPYC Zen 2) run ONNX Runtime's u8 x s8
integer kernels with VPMADDUBSW, which saturates pairs of products in int16. This benchmark builds
every model in the formats that matter and scores each twice: natively (this CPU) and under
``qemu-x86_64 -cpu EPYC-Rome`` (user-mode emulation of an AVX2-only Zen 2: no AVX-512, no VNNI, so
MLAS takes its AVX2 kernels). Emulated timings mean nothing; speed is measured natively only.

Models and variants (every model: FP32; ours --cpu portable (pair-safe int8 weights, the default),
--cpu u8 (uint8 weights) and --cpu vnni (plain int8); YOLOv5n also ours portable --int8-silu;
ONNX Runtime's quantize_static QDQ per-channel MinMax, u8 activations / s8 weights, reduce_range
False and True):

- EfficientNet-Lite0: calibrated on the first 100 sorted images of imagenet-sample, top-1 on the
  other 400 (labels.csv).
- YOLOv5n (yolov5n.pt): calibrated on coco-tiny/train2017, mAP50-95/mAP50 on coco-tiny/val2017.
  For ORT the Detect decode tail (every node between the head's last Convs and the output) is kept
  float through nodes_to_exclude (one 8-bit scale cannot serve pixel boxes and 0-1 scores).
- ResNet-50 (random weights, 32 calibration images): speed only.
- all-MiniLM-L6-v2: FP32; ours static (defaults) portable, u8 and vnni, and portable with every
  FFN down-projection int8 (--int8-ffn-down); ours --dynamic portable, u8 and vnni; ORT
  quantize_dynamic per-channel. Score: cosine of each sentence embedding to the native
  FP32 one over benchmarks/data/sentences_eval.txt (calibration: sentences_calib.txt).

Subcommands (work folder default /tmp/kiln-int8-formats)::

    .venv/bin/python benchmarks/int8_cpu_formats.py build
    .venv/bin/python benchmarks/int8_cpu_formats.py accuracy                 # native
    .venv/bin/python benchmarks/int8_cpu_formats.py accuracy --emulate-avx2  # under qemu EPYC-Rome
    .venv/bin/python benchmarks/int8_cpu_formats.py speed
    .venv/bin/python benchmarks/int8_cpu_formats.py report                   # table of the last rows

Every model runs in a child process (benchmarks/int8_score.py, which imports only ONNX Runtime and
feed reading): under emulation the whole Python process has to run under qemu. Emulation is ~40-130x slower, so emulated image scoring covers the first
``--emu-images-*`` evaluation images (said in each row as "images"); native scoring always covers
all of them (evaluate(), in this process after the native child's run), and also scores the same
subset the emulated way ("subset"). Under qemu
only ONNX Runtime runs: the inputs are prepared natively (the variant's own zoo preprocessing, in
evaluate()'s batches of 8) and the raw outputs are scored natively with the zoo's postprocessing
and the same metric code as evaluate(), because qemu 7.2 miscomputes numpy's AVX2 float64 argsort
(seen: wrong top-5 lists from bit-identical logits), which would corrupt top-k and NMS. The raw
outputs of native and emulated runs are compared directly ("vs_native"), and each child reports
which integer kernels ONNX Runtime fused the graph into on that CPU ("ort_graph").

One JSON line per measurement is appended to benchmarks/results/int8_cpu_formats.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from int8_score import MINILM, THREADS
from minilm_int8 import ort_dynamic, per_sentence_latency
from ort_anchor import ort_quantize_feeds

from modelkiln.accuracy.evaluate import classification_labels, evaluate
from modelkiln.accuracy.tasks.coco import coco_map, load_image_ids, to_coco_results
from modelkiln.bench.runner import machine_info
from modelkiln.data.feeds import list_samples, model_feeds, write_text_feeds
from modelkiln.export import export
from modelkiln.graph import optimize
from modelkiln.predict import BATCH, Predictor
from modelkiln.quant.config import Int8Cpu, QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms
from modelkiln.zoo import get
from modelkiln.zoo.images import list_images, read_image

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parents[1] / "shared" / "assets"
IMAGENET = ASSETS / "imagenet-sample"
COCO = ASSETS / "coco-tiny"
DATA = HERE / "data"
RESULTS = HERE / "results" / "int8_cpu_formats.jsonl"
WORK = Path("/tmp/kiln-int8-formats")
QEMU = ["qemu-x86_64", "-cpu", "EPYC-Rome"]
NATIVE = "native"
EMULATED = "emulated-avx2 (qemu EPYC-Rome)"
VISION = ("efficientnet_lite0", "yolov5n", "resnet50")
SCORED = ("efficientnet_lite0", "yolov5n", MINILM)
SCORE_CHILD = HERE / "int8_score.py"


# ---------------------------------------------------------------------------------------- build


def lite0_split() -> tuple[list[Path], list[Path]]:
    """The first 100 sorted imagenet-sample images calibrate; the other 400 are scored."""
    files = list_samples(IMAGENET)
    return files[:100], files[100:]


def write_eval_labels(path: Path, names: set[str]) -> None:
    """labels.csv restricted to ``names`` (evaluate scores exactly the images a CSV labels)."""
    with (IMAGENET / "labels.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        w.writerows(r for r in rows[1:] if r and r[0] in names)


def decode_tail(model_path: Path) -> list[str]:
    """Names of the nodes between the graph outputs and the last Convs before them (YOLOv5's
    Detect decode: Reshape/Transpose/Sigmoid/Split/Mul/Add/Pow/Concat)."""
    model = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    tail: dict[str, None] = {}
    stack = [producer[o.name] for o in model.graph.output if o.name in producer]
    while stack:
        node = stack.pop()
        if node.op_type == "Conv" or node.name in tail:
            continue
        tail[node.name] = None
        stack.extend(producer[i] for i in node.input if i in producer)
    return list(tail)


def ort_static(
    src: Path, out: Path, files: list[Path], zoo: str, reduce_range: bool, exclude: list[str]
) -> None:
    """ORT quantize_static as the anchor does it (QDQ, per-channel, MinMax, u8 activations, s8
    weights, the zoo's preprocessing at batch 1), with reduce_range and nodes_to_exclude."""
    feeds = model_feeds(src, files, get(zoo), 1)
    ort_quantize_feeds(src, out, feeds, "minmax", reduce_range, exclude)


def build_vision(zoo: str, work: Path, weights: str | None, calib: Path, size: int) -> dict:
    raw, fp32 = work / f"{zoo}.raw.onnx", work / f"{zoo}.fp32.onnx"
    export(zoo, raw, weights=weights)
    optimize(raw, fp32)
    variants = {"fp32": fp32}
    info: dict[str, dict] = {}
    configs = {
        f"ours_{cpu.value}": QuantConfig(cpu=cpu) for cpu in (Int8Cpu.PORTABLE, Int8Cpu.U8, Int8Cpu.VNNI)
    }
    if zoo == "yolov5n":  # SiLU in int8 too (QLinearSigmoid/QLinearMul), as ORT's model has it
        configs["ours_portable_int8silu"] = QuantConfig(cpu=Int8Cpu.PORTABLE, int8_silu=True)
    for name, config in configs.items():
        variants[name] = work / f"{zoo}.{name}.onnx"
        t = time.perf_counter()
        r = quantize(fp32, variants[name], calib, zoo, config, calib_size=size)
        info[name] = {
            "seconds": time.perf_counter() - t,
            "int8_format": r.int8_format,
            "quantized_ops": r.quantized_ops,
            "kept_float": r.kept_float,
        }
    exclude = decode_tail(fp32) if zoo == "yolov5n" else []
    files = list_samples(calib, size)
    for rr in (False, True):
        name = f"ort_qdq_rr{int(rr)}"
        variants[name] = work / f"{zoo}.{name}.onnx"
        t = time.perf_counter()
        ort_static(fp32, variants[name], files, zoo, rr, exclude)
        info[name] = {"seconds": time.perf_counter() - t, "reduce_range": rr, "nodes_to_exclude": exclude}
    for name, p in variants.items():
        info.setdefault(name, {})["size_mb"] = p.stat().st_size / 1e6
    return {"zoo": zoo, "calib": str(calib), "calib_size": len(files), "variants": variants, "build": info}


def sentences(name: str) -> list[str]:
    return [s.strip() for s in (DATA / name).read_text(encoding="utf-8").splitlines() if s.strip()]


def build_minilm(work: Path) -> dict:
    entry = get(MINILM)
    calib, evald = work / "minilm_calib", work / "minilm_eval"
    write_text_feeds(entry, sentences("sentences_calib.txt"), calib)
    write_text_feeds(entry, sentences("sentences_eval.txt"), evald)
    fp32 = work / "minilm.fp32.onnx"
    export(MINILM, fp32)
    variants = {"fp32": fp32}
    info: dict[str, dict] = {}
    configs = {
        f"ours_{kind}_{cpu.value}": QuantConfig(cpu=cpu, dynamic=kind == "dynamic")
        for kind in ("static", "dynamic")
        for cpu in (Int8Cpu.PORTABLE, Int8Cpu.U8, Int8Cpu.VNNI)
    }
    configs["ours_static_portable_int8ffn"] = QuantConfig(int8_ffn_down=True)  # every FFN-down int8
    for name, config in configs.items():
        variants[name] = work / f"minilm.{name}.onnx"
        t = time.perf_counter()
        r = quantize(fp32, variants[name], None if config.dynamic else calib, config=config)
        info[name] = {
            "seconds": time.perf_counter() - t,
            "int8_format": r.int8_format,
            "quantized_ops": r.quantized_ops,
            "kept_float": r.kept_float,
        }
    variants["ort_dynamic_per_channel"] = work / "minilm.ort_dynamic_per_channel.onnx"
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        ort_dynamic(fp32, variants["ort_dynamic_per_channel"], True)
    info["ort_dynamic_per_channel"] = {"seconds": time.perf_counter() - t}
    for name, p in variants.items():
        info.setdefault(name, {})["size_mb"] = p.stat().st_size / 1e6
    return {"zoo": MINILM, "calib": str(calib), "calib_size": 100, "variants": variants, "build": info}


def cmd_build(a: argparse.Namespace) -> None:
    work: Path = a.work
    work.mkdir(parents=True, exist_ok=True)
    calib, evals = lite0_split()
    write_eval_labels(work / "lite0_eval_labels.csv", {p.name for p in evals})
    manifest = {}
    for zoo in a.only.split(","):
        t = time.perf_counter()
        if zoo == "efficientnet_lite0":
            m = build_vision(zoo, work, None, IMAGENET, len(calib))
        elif zoo == "yolov5n":
            m = build_vision(zoo, work, str(ASSETS / "yolov5n.pt"), COCO / "train2017", 100)
        elif zoo == "resnet50":
            m = build_vision(zoo, work, "random", IMAGENET, 32)
        elif zoo == MINILM:
            m = build_minilm(work)
        else:
            raise SystemExit(f"unknown model {zoo}")
        m["variants"] = {k: str(v) for k, v in m["variants"].items()}
        manifest[zoo] = m
        emit(
            {
                "kind": "build",
                "model": zoo,
                **{k: v for k, v in m.items() if k != "zoo"},
                "wall_s": time.perf_counter() - t,
                "numerics": NATIVE,
            }
        )
    path = work / "manifest.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **manifest}, indent=1))


# ---------------------------------------------------------------------------------------- score


def two_threads() -> None:
    """evaluate() opens its Predictor without a thread count: pin it to THREADS intra-op threads."""
    opener = Predictor.open.__func__

    def open_(cls, model, zoo_name=None, weights=None, threads=THREADS):
        return opener(cls, model, zoo_name, weights, threads)

    Predictor.open = classmethod(open_)


def image_inputs(zoo: str, n: int) -> dict:
    """The first ``n`` evaluation images through the zoo's preprocessing (one feed)."""
    if zoo == "yolov5n":
        files = list_images(COCO / "val2017")
    else:  # Lite0's evaluation images; ResNet-50 (speed only) takes the same ones
        files = lite0_split()[1]
    return get(zoo).preprocess([read_image(f) for f in files[:n]]).feed


def evaluate_natively(work: Path, zoo: str, path: str, images_run: int) -> dict:
    """The library's own evaluate() of a variant (native only): all evaluation images, and the
    subset the child ran."""
    two_threads()
    data, labels = eval_data(work, zoo)
    t = time.perf_counter()
    r = evaluate(path, zoo, data, labels)
    s = evaluate(path, zoo, data, labels, limit=images_run)
    return {
        "images": r.images,
        "metrics": r.metrics,
        "subset_evaluate": {"images": s.images, "metrics": s.metrics},
        "evaluate_s": time.perf_counter() - t,
    }


# ------------------------------------------------------------------------------------- accuracy


def eval_data(work: Path, zoo: str) -> tuple[Path, Path]:
    if zoo == "yolov5n":
        return COCO / "val2017", COCO / "annotations" / "instances_val2017.json"
    return IMAGENET, work / "lite0_eval_labels.csv"


class Scorer:
    """evaluate()'s steps, split so that only the model runs elsewhere: the files evaluate() would
    score (first ``n``), their inputs through the variant's own Predictor entry in evaluate()'s
    batches, and the task metric from the raw outputs, all natively."""

    def __init__(self, work: Path, zoo: str, path: str, n: int) -> None:
        self.zoo = zoo
        self.data, self.labels = eval_data(work, zoo)
        self.entry = Predictor.open(path, zoo_name=zoo, threads=THREADS).entry
        if zoo == "yolov5n":
            self.ids = load_image_ids(self.labels)
            self.files = [f for f in list_images(self.data) if f.name in self.ids][:n]
            self.entry.for_evaluation()
        else:
            self.truth = classification_labels(self.data, self.labels)
            self.files = sorted(self.truth)[:n]
        self.prepared = [
            self.entry.preprocess([read_image(f) for f in self.files[i : i + BATCH]])
            for i in range(0, len(self.files), BATCH)
        ]

    def write_feeds(self, path: Path) -> None:
        np.savez(path, **{f"b{i:04d}": next(iter(p.feed.values())) for i, p in enumerate(self.prepared)})

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        results, start = [], 0
        for p in self.prepared:
            n = len(next(iter(p.feed.values())))
            results += self.entry.postprocess({k: v[start : start + n] for k, v in outputs.items()}, p)
            start += n
        if self.zoo == "yolov5n":
            rows = [
                r
                for f, res in zip(self.files, results, strict=True)
                for r in to_coco_results(self.ids[f.name], res)
            ]
            score = coco_map(self.labels, rows, [self.ids[f.name] for f in self.files])
            return {"map50_95": score.map50_95, "map50": score.map50}
        top = [[t[0] for t in r.top[:5]] for r in results]
        truth = [self.truth[f] for f in self.files]
        return {
            "top1": float(np.mean([t[0] == y for t, y in zip(top, truth, strict=True)])),
            "top5": float(np.mean([y in t for t, y in zip(top, truth, strict=True)])),
        }


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    return np.sum(ref * got, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Raw outputs against the native run of the same model on the same inputs."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    out = {
        "inputs": int(ref.shape[0]),
        "identical": bool(np.array_equal(ref, got)),
        "inputs_identical": int(sum(np.array_equal(x, y) for x, y in zip(ref, got, strict=True))),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "ref_max_abs": float(np.abs(ref).max()),
        "elements_differing": int((diff > 0).sum()),
        "elements": int(diff.size),
    }
    if ref.ndim == 2:  # logits / embeddings: top-1 agreement and cosine
        out["argmax_agree"] = int((ref.argmax(1) == got.argmax(1)).sum())
        out["cosine_min"] = float(cosines(ref, got).min())
    return out


def load_outputs(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        return {"output": np.load(path)}
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def cmd_accuracy(a: argparse.Namespace) -> None:
    manifest = json.loads((a.work / "manifest.json").read_text())
    numerics = EMULATED if a.emulate_avx2 else NATIVE
    tag = "emulated" if a.emulate_avx2 else "native"
    dumps = a.work / "outputs"
    dumps.mkdir(exist_ok=True)
    machine = machine_info(THREADS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    limits = {"efficientnet_lite0": a.emu_images_lite0, "yolov5n": a.emu_images_yolo}
    rows = []
    started = time.perf_counter()
    fp32_ref: dict[str, np.ndarray] = {}
    wanted = set(a.variants.split(",")) if a.variants else None
    for model in [m for m in a.only.split(",") if m in manifest]:
        for variant, path in manifest[model]["variants"].items():
            if wanted is not None and variant not in wanted and variant != "fp32":
                continue
            suffix = "npy" if model == MINILM else "npz"
            dump = dumps / f"{model}.{variant}.{tag}.{suffix}"
            cmd = [sys.executable, str(SCORE_CHILD), "--work", str(a.work)]
            cmd += ["--model", model, "--variant", variant, "--dump", str(dump)]
            scorer = None
            if model != MINILM:  # inputs prepared here (natively), the subset emulation covers
                scorer = Scorer(a.work, model, path, limits[model])
                feeds = dumps / f"{model}.{variant}.feeds.npz"
                scorer.write_feeds(feeds)
                cmd += ["--feeds", str(feeds)]
            if a.emulate_avx2:
                cmd = [*QEMU, *cmd]
            t = time.perf_counter()
            p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if p.returncode:
                err = "\n".join(line for line in p.stderr.splitlines() if "TCG doesn't support" not in line)
                print(f"{model} {variant}: exit {p.returncode}\n{err[-3000:]}", file=sys.stderr, flush=True)
                emit(
                    {
                        "kind": "accuracy",
                        "model": model,
                        "variant": variant,
                        "numerics": numerics,
                        "error": err[-500:],
                        "machine": machine,
                    }
                )
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            if scorer is not None and not a.emulate_avx2:
                row.update(evaluate_natively(a.work, model, path, row["images_run"]))
            row["wall_s"] = time.perf_counter() - t
            outputs = load_outputs(dump)
            got = next(iter(outputs.values()))
            if scorer is not None:
                subset = {"images": len(scorer.files), "metrics": scorer.metrics(outputs)}
                if a.emulate_avx2:
                    row["images"], row["metrics"] = subset["images"], subset["metrics"]
                    row["scoring"] = "ONNX Runtime under qemu; inputs prepared and outputs scored natively"
                else:
                    row["subset"] = subset  # the emulated subset, scored the emulated way, natively
            if model == MINILM:
                if variant == "fp32":
                    fp32_ref[tag] = got
                native_fp32 = dumps / f"{model}.fp32.native.npy"
                ref = np.load(native_fp32) if native_fp32.exists() else fp32_ref[tag]
                c = cosines(ref, got)
                row["metrics"] = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
                row["metrics_reference"] = "native fp32" if native_fp32.exists() else f"{tag} fp32"
                if a.emulate_avx2:
                    c2 = cosines(fp32_ref[tag], got)
                    row["metrics_vs_emulated_fp32"] = {
                        "cosine_mean": float(c2.mean()),
                        "cosine_min": float(c2.min()),
                    }
            native = dumps / f"{model}.{variant}.native.{suffix}"
            if a.emulate_avx2 and native.exists():
                ref_out = next(iter(load_outputs(native).values()))
                row["vs_native"] = compare(ref_out, got) if ref_out.shape == got.shape else None
            row = {"kind": "accuracy", **row, "numerics": numerics, "threads": THREADS, "machine": machine}
            emit(row)
            rows.append(row)
    print(f"accuracy ({numerics}): {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print_accuracy(rows)


def metric_text(row: dict) -> str:
    m = row.get("metrics") or {}
    if "top1" in m:
        return f"top1 {m['top1']:.4f} top5 {m['top5']:.4f} ({row['images']} img)"
    if "map50_95" in m:
        return f"mAP50-95 {m['map50_95']:.4f} mAP50 {m['map50']:.4f} ({row['images']} img)"
    if "cosine_mean" in m:
        return f"cos mean {m['cosine_mean']:.6f} min {m['cosine_min']:.6f} ({row['sentences']} sent)"
    return row.get("error", "?")[:60]


def print_accuracy(rows: list[dict]) -> None:
    for r in rows:
        extra = ""
        if "subset" in r:
            s = r["subset"]
            extra = "  subset: " + metric_text({**r, **s})
        if r.get("vs_native"):
            v = r["vs_native"]
            extra += f"  vs native: identical={v['identical']} max_abs={v['max_abs']:.3g}"
        print(f"{r['model']:<20} {r['variant']:<26} {r['numerics'][:8]:<8} {metric_text(r)}{extra}")


# ---------------------------------------------------------------------------------------- speed


def cmd_speed(a: argparse.Namespace) -> None:
    manifest = json.loads((a.work / "manifest.json").read_text())
    machine = machine_info(THREADS)
    iters = {"efficientnet_lite0": (20, 5), "yolov5n": (10, 3), "resnet50": (10, 3)}
    for model in [m for m in a.only.split(",") if m in manifest]:
        variants = manifest[model]["variants"]
        if model == MINILM:
            speed_minilm(a, variants, machine)
            continue
        feed8 = image_inputs(model, 8)
        for batch, n in zip((1, 8), iters[model], strict=True):
            feed = {k: v[:batch] for k, v in feed8.items()}
            t = time.perf_counter()
            lat = interleaved_latency_ms(_backends(variants), feed, rounds=a.rounds, iterations=n)
            emit(
                {
                    "kind": "speed",
                    "model": model,
                    "batch": batch,
                    "rounds": a.rounds,
                    "iterations": n,
                    "latency_ms": lat,
                    "ratio_vs_fp32": ratios(lat),
                    "wall_s": time.perf_counter() - t,
                    "numerics": NATIVE,
                    "machine": machine,
                }
            )


def ratios(lat: dict) -> dict:
    base = lat["fp32"]
    return {
        k: {"median": v["median"] / base["median"], "min": v["min"] / base["min"]} for k, v in lat.items()
    }


def _backends(variants: dict[str, str]) -> dict:
    return {k: cpu_backend(p, threads=THREADS) for k, p in variants.items()}


def speed_minilm(a: argparse.Namespace, variants: dict, machine: dict) -> None:
    feeds = list(model_feeds(variants["fp32"], a.work / "minilm_eval", None, 1))
    t = time.perf_counter()
    lat1 = per_sentence_latency({k: Path(v) for k, v in variants.items()}, feeds, rounds=a.rounds)
    emit(
        {
            "kind": "speed",
            "model": MINILM,
            "batch": 1,
            "unit": "ms per sentence (all eval sentences, unpadded)",
            "sentences": len(feeds),
            "rounds": a.rounds,
            "latency_ms": lat1,
            "ratio_vs_fp32": ratios(lat1),
            "wall_s": time.perf_counter() - t,
            "numerics": NATIVE,
            "machine": machine,
        }
    )
    batch8 = get(MINILM).tokenize(sentences("sentences_eval.txt")[:8])
    t = time.perf_counter()
    lat8 = interleaved_latency_ms(_backends(variants), batch8, rounds=a.rounds, iterations=5)
    emit(
        {
            "kind": "speed",
            "model": MINILM,
            "batch": 8,
            "unit": "ms per padded batch of 8",
            "shape": list(batch8["input_ids"].shape),
            "rounds": a.rounds,
            "iterations": 5,
            "latency_ms": lat8,
            "ratio_vs_fp32": ratios(lat8),
            "wall_s": time.perf_counter() - t,
            "numerics": NATIVE,
            "machine": machine,
        }
    )


# --------------------------------------------------------------------------------------- report


def emit(row: dict) -> None:
    row = {"bench": "int8_cpu_formats", **row}
    line = json.dumps(row, default=str)
    print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")


def cmd_report(a: argparse.Namespace) -> None:
    """The latest accuracy row per (model, variant, numerics) and speed row per (model, batch)."""
    acc: dict[tuple, dict] = {}
    speed: dict[tuple, dict] = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "accuracy":
            acc[(r["model"], r["variant"], r["numerics"])] = r
        elif r.get("kind") == "speed":
            speed[(r["model"], r["batch"])] = r
    print_accuracy(list(acc.values()))
    for (model, batch), r in speed.items():
        print(f"\n{model} batch {batch} ({r.get('unit', 'ms per call')}): median / min ms, ratio to fp32")
        for k, v in r["latency_ms"].items():
            q = r["ratio_vs_fp32"][k]
            print(f"  {k:<26} {v['median']:9.3f} {v['min']:9.3f}   x{q['median']:.3f} / x{q['min']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "accuracy", "speed", "report"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=WORK)
        p.add_argument(
            "--only", default=",".join(VISION + (MINILM,)) if name in ("build", "speed") else ",".join(SCORED)
        )
        if name == "accuracy":
            p.add_argument(
                "--emulate-avx2",
                action="store_true",
                help="score each model under qemu-x86_64 -cpu EPYC-Rome (AVX2, no VNNI)",
            )
            p.add_argument(
                "--emu-images-lite0",
                type=int,
                default=200,
                help="evaluation images scored under emulation (and as a subset natively)",
            )
            p.add_argument("--emu-images-yolo", type=int, default=24)
            p.add_argument("--variants", default="", help="only these variants (and fp32); default all")
        if name == "speed":
            p.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    {
        "build": cmd_build,
        "accuracy": cmd_accuracy,
        "speed": cmd_speed,
        "report": cmd_report,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
