"""YOLOv5 detection end to end, JPEG bytes -> boxes: the pipeline a user writes against kiln's.

Three sections, each timed in interleaved rounds (every variant once per image per round, in
turns, so machine noise falls on all alike), one JSON line each:

  preprocess  the options for letterbox + BGR->RGB + /255 + HWC->CHW on decoded COCO images:
              numpy as users write it, kiln's previous code (letterbox, cvtColor, transpose,
              * 1/255), an OpenCV canvas + cv2.dnn.blobFromImages, and kiln's one pass
              (zoo.letterbox: mixChannels into a uint8 canvas, one float LUT into the batch);
              bit-exactness against the previous code.
  nms         on YOLOv5n's real outputs, at prediction (conf 0.25, IoU 0.45) and evaluation
              (conf 0.001, IoU 0.6, multi-label) thresholds: the previous greedy numpy loop, a
              per-class IoU-matrix NMS, OpenCV's NMSBoxesBatched, torchvision's batched_nms and
              kiln's class_nms, each checked for the same kept indices as the greedy loop.
  pipeline    batch 1, ``--threads`` intra-op threads: (a) cv2.imdecode + OpenCV letterbox +
              numpy normalisation + an onnxruntime InferenceSession + YOLOv5's decode with
              torchvision's batched_nms; (b) kiln: zoo.images.decode_image + the zoo's
              preprocess / postprocess around kiln's ONNX Runtime backend. Decode, pre, model,
              post and total ms (median, min), per-stage speedups, and the COCO mAP50-95 of
              both at evaluation thresholds (pycocotools, as accuracy/tasks scores detectors).

    .venv/bin/python benchmarks/detect_pipeline.py [--model yolov5n.onnx] [--rounds 3]

``--model`` takes any YOLOv5 export of kiln's (an INT8 one too); the default exports yolov5n from
../shared/assets/yolov5n.pt into a temporary folder. Lines go to
benchmarks/results/detect_pipeline.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from modelkiln.accuracy.tasks.coco import coco_map, load_image_ids, to_coco_results
from modelkiln.bench.runner import machine_info
from modelkiln.export import export
from modelkiln.predict import load_parts
from modelkiln.zoo import as_image_task
from modelkiln.zoo.images import decode_image
from modelkiln.zoo.nms import class_nms, xywh_to_xyxy
from modelkiln.zoo.yolov5 import Box, Detections, YOLOv5Family

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
RESULTS = Path(__file__).resolve().parent / "results" / "detect_pipeline.jsonl"
PREDICT: dict[str, Any] = {"conf": 0.25, "iou": 0.45, "multi_label": False}
EVALUATE: dict[str, Any] = {"conf": 0.001, "iou": 0.6, "multi_label": True}
MAX_DET, MAX_NMS, MAX_WH = 300, 30000, 7680.0


def stats(ms: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(ms)), 3), "min": round(float(np.min(ms)), 3)}


def per_round(ms: list[float], images: int) -> dict[str, float]:
    """Mean ms per image in each round (``ms`` in round order), median and min over the rounds:
    the figure for a set of images whose costs differ a lot (a few carry most candidates)."""
    means = [float(np.mean(ms[i : i + images])) for i in range(0, len(ms), images)]
    return {"median": round(float(np.median(means)), 3), "min": round(min(means), 3)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


# ---- (a) the pipeline a user writes: YOLOv5's own recipe in OpenCV, numpy and torch


def user_letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """YOLOv5's letterbox (auto=False): bilinear resize, grey 114 border."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = round(w * r), round(h * r)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return image, r, (left, top)


def user_preprocess(image: np.ndarray, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    boxed, gain, pad = user_letterbox(image, size)
    x = np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1)).astype(np.float32) / 255.0
    return x[None], {"gain": gain, "pad": pad, "shape": image.shape[:2]}


class UserPipeline:
    """cv2.imdecode, user_preprocess, an InferenceSession, YOLOv5's non_max_suppression decode
    (torch) with torchvision's batched_nms, boxes scaled back to the original image."""

    name = "baseline"

    def __init__(self, model: Path, threads: int, size: int) -> None:
        import onnxruntime as ort
        import torch

        torch.set_num_threads(threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.size = size
        self.thresholds = PREDICT

    def decode(self, data: bytes) -> np.ndarray:
        image: np.ndarray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return image

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        return user_preprocess(image, self.size)

    def model(self, prepared: tuple[np.ndarray, dict[str, Any]]) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input: prepared[0]})[0]
        return out

    def postprocess(self, out: np.ndarray, prepared: tuple[np.ndarray, dict[str, Any]]) -> np.ndarray:
        import torch
        import torchvision

        conf, iou, multi = self.thresholds["conf"], self.thresholds["iou"], self.thresholds["multi_label"]
        x = torch.from_numpy(out[0])
        x = x[x[:, 4] > conf]
        if not len(x):
            return np.zeros((0, 6), np.float32)
        x[:, 5:] *= x[:, 4:5]
        box = x[:, :4].clone()
        box[:, :2] = x[:, :2] - x[:, 2:4] / 2
        box[:, 2:] = x[:, :2] + x[:, 2:4] / 2
        if multi:
            i, j = (x[:, 5:] > conf).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, j + 5, None], j[:, None].float()), 1)
        else:
            best, j = x[:, 5:].max(1, keepdim=True)
            x = torch.cat((box, best, j.float()), 1)[best.view(-1) > conf]
        x = x[x[:, 4].argsort(descending=True)[:MAX_NMS]]
        keep = torchvision.ops.batched_nms(x[:, :4], x[:, 4], x[:, 5].long(), iou)[:MAX_DET]
        det = x[keep].numpy()
        meta = prepared[1]
        (left, top), gain, (h, w) = meta["pad"], meta["gain"], meta["shape"]
        det[:, [0, 2]] = ((det[:, [0, 2]] - left) / gain).clip(0, w)
        det[:, [1, 3]] = ((det[:, [1, 3]] - top) / gain).clip(0, h)
        return det

    def detections(self, det: np.ndarray) -> Detections:
        return Detections([Box(*map(float, r[:5]), int(r[5]), str(int(r[5]))) for r in det])


class KilnPipeline:
    """zoo.images.decode_image (header checked first), the zoo's preprocess and postprocess around
    kiln's ONNX Runtime backend (``predict.load_parts``: what kiln predict and evaluate run)."""

    name = "kiln"

    def __init__(self, model: Path, threads: int) -> None:
        entry, backends = load_parts(model, threads=threads)
        self.entry = as_image_task(entry)
        if not isinstance(self.entry, YOLOv5Family):
            raise SystemExit(f"{model} is a {self.entry.name}, not a YOLOv5 model")
        self.backend = backends[self.entry.parts[0].name]
        self.thresholds = PREDICT

    def set_thresholds(self, thresholds: dict[str, Any]) -> None:
        self.thresholds = thresholds
        yolo = self.entry
        assert isinstance(yolo, YOLOv5Family)
        yolo.conf_threshold, yolo.iou_threshold = thresholds["conf"], thresholds["iou"]
        yolo.multi_label = thresholds["multi_label"]

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, "benchmark image")

    def preprocess(self, image: np.ndarray) -> Any:
        return self.entry.preprocess([image])

    def model(self, prepared: Any) -> dict[str, np.ndarray]:
        return self.backend.infer(prepared.feed)

    def postprocess(self, out: dict[str, np.ndarray], prepared: Any) -> Detections:
        result: Detections = self.entry.postprocess(out, prepared)[0]
        return result

    def detections(self, det: Detections) -> Detections:
        return det


STAGES = ("decode", "pre", "model", "post")


def run(pipeline: Any, data: bytes) -> tuple[Any, dict[str, float]]:
    image, t_decode = timed(lambda: pipeline.decode(data))
    prepared, t_pre = timed(lambda: pipeline.preprocess(image))
    out, t_model = timed(lambda: pipeline.model(prepared))
    det, t_post = timed(lambda: pipeline.postprocess(out, prepared))
    return det, {"decode": t_decode, "pre": t_pre, "model": t_model, "post": t_post}


# ---- preprocessing options


def previous_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """kiln's preprocessing before the one pass: letterbox, cvtColor, transpose, * float32(1/255)."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = min(size, round(w * r)), min(size, round(h * r))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114,) * 3)
    batch = np.empty((1, 3, size, size), np.float32)
    batch[0] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) * np.float32(1 / 255)
    return batch


def blob_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Resize into a view of a grey uint8 canvas, then OpenCV's blobFromImages (swapRB, 1/255)."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = min(size, round(w * r)), min(size, round(h * r))
    top, left = round((size - new_h) / 2 - 0.1), round((size - new_w) / 2 - 0.1)
    canvas = np.full((size, size, 3), 114, np.uint8)
    view = canvas[top : top + new_h, left : left + new_w]
    if (new_w, new_h) != (w, h):
        cv2.resize(
            image, (new_w, new_h), dst=view, interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        )
    else:
        view[...] = image
    blob: np.ndarray = cv2.dnn.blobFromImages([canvas], 1 / 255, swapRB=True)
    return blob


def bench_preprocess(images: list[np.ndarray], rounds: int, kiln: KilnPipeline) -> dict[str, Any]:
    size = kiln.entry.parts[0].inputs[0].shape[-1]
    assert isinstance(size, int)
    options: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "numpy (user)": lambda im: user_preprocess(im, size)[0],
        "previous kiln": lambda im: previous_preprocess(im, size),
        "canvas + blobFromImages": lambda im: blob_preprocess(im, size),
        "kiln one pass": lambda im: kiln.entry.preprocess([im]).feed["images"],
    }
    times: dict[str, list[float]] = {k: [] for k in options}
    diff = {k: 0.0 for k in options}
    for option in options.values():  # warm-up
        option(images[0])
    for round_ in range(rounds):
        for i, image in enumerate(images):
            names = list(options) if (i + round_) % 2 == 0 else list(options)[::-1]
            ref = previous_preprocess(image, size)
            for name in names:
                x, ms = timed(lambda f=options[name], im=image: f(im))
                times[name].append(ms)
                diff[name] = max(diff[name], float(np.abs(x - ref).max()))
    ms = {k: per_round(v, len(images)) for k, v in times.items()}
    return {
        "section": "preprocess",
        "images": len(images),
        "ms_per_image": ms,
        "speedup_vs_numpy": {k: round(ms["numpy (user)"]["median"] / v["median"], 2) for k, v in ms.items()},
        "max_abs_diff_vs_previous": diff,
        "bit_exact_vs_previous": {k: v == 0.0 for k, v in diff.items()},
    }


# ---- NMS options on real outputs


def previous_decode(pred: np.ndarray, conf: float, multi_label: bool) -> np.ndarray:
    """The candidates of the previous yolo_nms: confidence filter, xywh -> xyxy, labels."""
    pred = pred[pred[:, 4] > conf]
    scores = pred[:, 5:] * pred[:, 4:5]
    boxes = xywh_to_xyxy(pred[:, :4])
    if multi_label:
        i, j = np.nonzero(scores > conf)
        return np.concatenate([boxes[i], scores[i, j, None], j[:, None].astype(np.float32)], 1)
    j = scores.argmax(1)
    best = scores[np.arange(len(j)), j]
    det = np.concatenate([boxes, best[:, None], j[:, None].astype(np.float32)], 1)[best > conf]
    if len(det) > MAX_NMS:
        det = det[np.argsort(-det[:, 4], kind="stable")[:MAX_NMS]]
    return det


def greedy_nms(det: np.ndarray, iou: float) -> np.ndarray:
    """The previous release's NMS: greedy over class-offset boxes, one numpy pass per kept box."""
    boxes, scores = det[:, :4] + det[:, 5:6] * MAX_WH, det[:, 4]
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter + 1e-9) <= iou]
    return np.asarray(keep, np.int64)[:MAX_DET]


def matrix_nms(det: np.ndarray, iou: float) -> np.ndarray:
    """Vectorised IoU-matrix NMS: per class, every pair's IoU in blocks of rows (the same float32
    operations as the greedy loop), then a greedy scan over the boolean matrix."""
    boxes, scores, classes = det[:, :4] + det[:, 5:6] * MAX_WH, det[:, 4], det[:, 5]
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(c) for c in boxes.T)
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    kept: list[int] = []
    for c in np.unique(classes):
        members = order[classes[order] == c]
        m = len(members)
        hits = np.empty((m, m), bool)
        for s in range(0, m, 512):
            a = members[s : s + 512, None]
            w = (np.minimum(x2[a], x2[members]) - np.maximum(x1[a], x1[members])).clip(0)
            h = (np.minimum(y2[a], y2[members]) - np.maximum(y1[a], y1[members])).clip(0)
            inter = w * h
            hits[s : s + 512] = ~(inter / (areas[a] + areas[members] - inter + 1e-9) <= iou)
        removed = np.zeros(m, bool)
        found = 0
        for q in range(m):
            if removed[q]:
                continue
            kept.append(int(members[q]))
            removed[q + 1 :] |= hits[q, q + 1 :]
            found += 1
            if found == MAX_DET:
                break
    keep = np.asarray(kept, np.int64)
    return keep[np.argsort(rank[keep])][:MAX_DET]


def opencv_nms(det: np.ndarray, iou: float) -> np.ndarray:
    xywh = det[:, :4].astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    keep = cv2.dnn.NMSBoxesBatched(xywh, det[:, 4], det[:, 5].astype(np.int32), 0.0, iou)
    return np.asarray(keep, np.int64).reshape(-1)[:MAX_DET]


def torchvision_nms(det: np.ndarray, iou: float) -> np.ndarray:
    import torch
    import torchvision

    t = torch.from_numpy(det)
    keep: np.ndarray = torchvision.ops.batched_nms(t[:, :4], t[:, 4], t[:, 5].long(), iou)[:MAX_DET].numpy()
    return keep


def kiln_nms(det: np.ndarray, iou: float) -> np.ndarray:
    return class_nms(det[:, :4], det[:, 4], det[:, 5], iou, MAX_DET, MAX_WH)


def bench_nms(outputs: list[np.ndarray], rounds: int) -> list[dict[str, Any]]:
    methods = {
        "greedy numpy (previous)": greedy_nms,
        "matrix IoU numpy": matrix_nms,
        "opencv NMSBoxesBatched": opencv_nms,
        "torchvision batched_nms": torchvision_nms,
        "kiln class_nms": kiln_nms,
    }
    rows = []
    for thresholds in (PREDICT, EVALUATE):
        conf, iou = thresholds["conf"], thresholds["iou"]
        dets = [previous_decode(o[0], conf, thresholds["multi_label"]) for o in outputs]
        want = [greedy_nms(d, iou) for d in dets]
        times: dict[str, list[float]] = {k: [] for k in methods}
        same = {k: 0 for k in methods}
        same_set = {k: 0 for k in methods}
        for method in methods.values():  # warm-up (torch's first call sets itself up)
            method(dets[int(np.argmax([len(d) for d in dets]))], iou)
        for round_ in range(rounds):
            for i, d in enumerate(dets):
                names = list(methods) if (i + round_) % 2 == 0 else list(methods)[::-1]
                for name in names:
                    keep, ms = timed(lambda f=methods[name], d=d, iou=iou: f(d, iou))
                    times[name].append(ms)
                    if round_ == 0:
                        same[name] += int(np.array_equal(keep, want[i]))
                        same_set[name] += int(set(keep.tolist()) == set(want[i].tolist()))
        ms = {k: per_round(v, len(dets)) for k, v in times.items()}
        base = ms["greedy numpy (previous)"]["median"]
        counts = [len(d) for d in dets]
        rows.append(
            {
                "section": "nms",
                "thresholds": thresholds,
                "images": len(dets),
                "candidates": {"median": float(np.median(counts)), "max": int(max(counts))},
                "ms_per_image": ms,
                "speedup_vs_greedy": {k: round(base / v["median"], 2) for k, v in ms.items()},
                "same_indices_as_greedy": same,
                "same_set_as_greedy": same_set,
            }
        )
    return rows


# ---- the two pipelines end to end


def bench_pipeline(
    datas: list[bytes], rounds: int, settle_s: float, user: UserPipeline, kiln: KilnPipeline
) -> dict[str, Any]:
    pipelines = {"baseline": user, "kiln": kiln}
    times: dict[str, dict[str, list[float]]] = {p: {s: [] for s in (*STAGES, "total")} for p in pipelines}
    for p in pipelines.values():  # warm-up
        run(p, datas[0])
    for round_ in range(rounds):
        for i, data in enumerate(datas):
            names = list(pipelines) if (i + round_) % 2 == 0 else list(pipelines)[::-1]
            for name in names:
                time.sleep(settle_s)  # the other session's idle threads stop spinning
                _, ms = run(pipelines[name], data)
                for s in STAGES:
                    times[name][s].append(ms[s])
                times[name]["total"].append(sum(ms.values()))
    ms = {p: {s: stats(v) for s, v in t.items()} for p, t in times.items()}
    return {
        "section": "pipeline",
        "thresholds": PREDICT,
        "batch": 1,
        "images": len(datas),
        "ms": ms,
        "speedup": {
            s: {k: round(ms["baseline"][s][k] / ms["kiln"][s][k], 2) for k in ("median", "min")}
            for s in (*STAGES, "total")
        },
        "post_alone_ms": post_alone(datas, rounds, user, kiln),
    }


def post_alone(datas: list[bytes], rounds: int, user: UserPipeline, kiln: KilnPipeline) -> dict[str, Any]:
    """The post stage again on kept outputs, with no model run just before it: in the pipeline,
    ONNX Runtime's threads still spin after a run, and torch's own threads then compete with them
    for the cores (numpy's single-threaded post much less so)."""
    kept = []
    for data in datas:
        a = user.preprocess(user.decode(data))
        b = kiln.preprocess(kiln.decode(data))
        kept.append((a, user.model(a), b, kiln.model(b)))
    time.sleep(0.5)
    times: dict[str, list[float]] = {"baseline": [], "kiln": []}
    for _ in range(rounds):
        for a, out_a, b, out_b in kept:
            times["baseline"].append(timed(lambda a=a, out_a=out_a: user.postprocess(out_a, a))[1])
            times["kiln"].append(timed(lambda b=b, out_b=out_b: kiln.postprocess(out_b, b))[1])
    return {k: stats(v) for k, v in times.items()}


def same_boxes(user: UserPipeline, kiln: KilnPipeline, datas: list[bytes]) -> dict[str, Any]:
    """At prediction thresholds: images whose boxes agree (same count and classes, corners within
    0.5 px), and the largest corner difference among them."""
    agree, worst = 0, 0.0
    for data in datas:
        a, _ = run(user, data)
        b, _ = run(kiln, data)
        ours = np.array([[x.x1, x.y1, x.x2, x.y2, x.score, x.class_id] for x in b.boxes], np.float32).reshape(
            -1, 6
        )
        if len(a) == len(ours) and (a[:, 5] == ours[:, 5]).all():
            err = float(np.abs(a[:, :4] - ours[:, :4]).max()) if len(a) else 0.0
            if err <= 0.5:
                agree += 1
                worst = max(worst, err)
    return {"images_with_same_boxes": agree, "max_corner_diff_px": round(worst, 4)}


def mean_ap(pipeline: Any, datas: list[bytes], names: list[str], annotations: Path) -> float:
    ids = load_image_ids(annotations)
    rows = []
    for data, name in zip(datas, names, strict=True):
        det, _ = run(pipeline, data)
        rows += to_coco_results(ids[name], pipeline.detections(det))
    return coco_map(annotations, rows, [ids[n] for n in names]).map50_95


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a kiln YOLOv5 export (default: yolov5n from the assets)")
    parser.add_argument(
        "--baseline-model",
        type=Path,
        help="the model the user's pipeline runs (default: --model); e.g. FP32 here and kiln's INT8 in --model",
    )
    parser.add_argument("--images", type=Path, default=ASSETS / "coco-tiny" / "val2017")
    parser.add_argument(
        "--annotations", type=Path, default=ASSETS / "coco-tiny" / "annotations" / "instances_val2017.json"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--settle", type=float, default=0.02, help="seconds of quiet before each pipeline run"
    )
    parser.add_argument("--sections", default="preprocess,nms,pipeline")
    parser.add_argument("--limit", type=int, help="first N images only (a quick look; no results line)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    files = sorted(args.images.glob("*.jpg"))[: args.limit]
    datas = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory(prefix="kiln-detect-bench-") as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "yolov5n.onnx"
            export("yolov5n", model, weights=str(ASSETS / "yolov5n.pt"))
        kiln = KilnPipeline(model, args.threads)
        size = kiln.entry.parts[0].inputs[0].shape[-1]
        assert isinstance(size, int)
        baseline = args.baseline_model or model
        user = UserPipeline(baseline, args.threads, size)
        common = {
            "bench": "detect_pipeline",
            "model": model.name,
            "baseline_model": baseline.name,
            "machine": machine_info(args.threads),
        }
        rows: list[dict[str, Any]] = []
        if "preprocess" in sections:
            rows.append(
                bench_preprocess(
                    [cv2.imdecode(np.frombuffer(d, np.uint8), 1) for d in datas], args.rounds, kiln
                )
            )
        if "nms" in sections:
            kiln.set_thresholds(PREDICT)
            outputs = [kiln.model(kiln.preprocess(kiln.decode(d)))["output0"] for d in datas]
            rows += bench_nms(outputs, args.rounds)
            del outputs
        if "pipeline" in sections:
            user.thresholds = PREDICT
            kiln.set_thresholds(PREDICT)
            row = bench_pipeline(datas, args.rounds, args.settle, user, kiln)
            row.update(same_boxes(user, kiln, datas))
            user.thresholds = EVALUATE
            kiln.set_thresholds(EVALUATE)
            names = [f.name for f in files]
            m_user, m_kiln = (
                mean_ap(user, datas, names, args.annotations),
                mean_ap(kiln, datas, names, args.annotations),
            )
            row["map50_95_evaluation_thresholds"] = {
                "baseline": round(m_user, 4),
                "kiln": round(m_kiln, 4),
                "within_0.001": abs(m_user - m_kiln) <= 0.001,
            }
            rows.append(row)
    for row in rows:
        print(json.dumps(row))
    if args.limit is None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.writelines(json.dumps({**common, **row}) + "\n" for row in rows)


if __name__ == "__main__":
    main()
