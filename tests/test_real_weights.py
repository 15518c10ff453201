"""Real weights on real images (../shared/assets): task accuracy and torch parity of the exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelkiln.accuracy.tasks.coco import coco_map, load_image_ids, to_coco_results
from modelkiln.accuracy.tasks.imagenet import read_labels_csv
from modelkiln.export import export
from modelkiln.predict import Predictor
from modelkiln.runtime.session import ort_session, run
from modelkiln.zoo import get
from modelkiln.zoo.images import read_image

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def yolo_onnx(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "yolov5n.onnx"
    export("yolov5n", out, weights=str(assets / "yolov5n.pt"))
    return out


@pytest.fixture(scope="module")
def lite_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "lite0.onnx"
    export("efficientnet_lite0", out)
    return out


def test_yolov5n_map_on_coco_tiny(yolo_onnx: Path, assets: Path) -> None:
    coco = assets / "coco-tiny"
    ann = coco / "annotations" / "instances_val2017.json"
    ids = load_image_ids(ann)
    images = sorted((coco / "val2017").glob("*.jpg"))
    predictor = Predictor.open(yolo_onnx)
    predictor.entry.for_evaluation()  # conf 0.001, IoU 0.6, multi-label, as YOLOv5's val.py
    rows = [r for p in predictor.predict(images) for r in to_coco_results(ids[p.image.name], p.result)]
    score = coco_map(ann, rows, [ids[i.name] for i in images])
    print(f"yolov5n coco-tiny val: mAP50-95 {score.map50_95:.4f} mAP50 {score.map50:.4f}")
    assert score.map50_95 >= 0.28
    assert score.map50 >= 0.42


def test_yolov5n_onnx_matches_torch_on_real_images(yolo_onnx: Path, assets: Path) -> None:
    import torch

    entry = get("yolov5n")
    model = entry.build(str(assets / "yolov5n.pt"))["model"]
    images = sorted((assets / "coco-tiny" / "val2017").glob("*.jpg"))[:6]
    feed = entry.preprocess([read_image(p) for p in images]).feed
    with torch.no_grad():
        ref = model(torch.from_numpy(feed["images"])).numpy()
    got = run(ort_session(yolo_onnx, optimization="disable"), feed)["output0"]
    scores_err = np.abs(got[..., 4:] - ref[..., 4:]).max()
    boxes_err = np.abs(got[..., :4] - ref[..., :4]).max()
    print(f"yolov5n ONNX vs torch: scores max abs {scores_err:.2e}, boxes max abs {boxes_err:.2e} px")
    assert scores_err <= 1e-4
    # Box widths reach ~1500 px; float32 noise there is a few 1e-3 px (torch fp32 vs fp64 is as large).
    assert boxes_err <= 1e-2


def test_in_graph_nms_agrees_with_numpy_nms(yolo_onnx: Path, assets: Path, tmp_path: Path) -> None:
    e2e = tmp_path / "e2e.onnx"
    export("yolov5n", e2e, weights=str(assets / "yolov5n.pt"), nms=True)
    images = sorted((assets / "coco-tiny" / "val2017").glob("*.jpg"))[:8]
    ours = Predictor.open(yolo_onnx).predict(images)
    graph = Predictor.open(e2e).predict(images)
    matched = total = 0
    for a, b in zip(ours, graph, strict=True):
        total += len(a.result.boxes)
        for box in a.result.boxes:
            matched += any(
                o.class_id == box.class_id
                and abs(o.score - box.score) < 1e-4
                and max(abs(o.x1 - box.x1), abs(o.y2 - box.y2)) < 0.5
                for o in b.result.boxes
            )
    assert total > 10 and matched / total >= 0.95


def test_efficientnet_lite0_top1_on_imagenet_sample(lite_onnx: Path, assets: Path) -> None:
    folder = assets / "imagenet-sample"
    labels = read_labels_csv(folder / "labels.csv")
    files = sorted(labels)
    preds = Predictor.open(lite_onnx).predict([folder / f for f in files])
    top1 = np.mean([p.result.top[0][0] == labels[p.image.name] for p in preds])
    top5 = np.mean([labels[p.image.name] in [t[0] for t in p.result.top] for p in preds])
    print(f"efficientnet_lite0 imagenet-sample: top-1 {top1:.4f} top-5 {top5:.4f} on {len(files)} images")
    assert top1 >= 0.85


def test_efficientnet_lite0_logits_match_torch(lite_onnx: Path, assets: Path) -> None:
    import torch

    entry = get("efficientnet_lite0")
    model = entry.build(None)["model"]
    files = sorted((assets / "imagenet-sample").glob("*.JPEG"))[:16]
    feed = entry.preprocess([read_image(p) for p in files]).feed
    with torch.no_grad():
        ref = model(torch.from_numpy(feed["input"])).numpy()
    got = run(ort_session(lite_onnx, optimization="disable"), feed)["logits"]
    err = np.abs(got - ref).max()
    print(f"efficientnet_lite0 ONNX vs torch logits max abs {err:.2e}")
    assert err <= 1e-3


def test_efficientnet_lite0_int8_keeps_top1(lite_onnx: Path, assets: Path, tmp_path: Path) -> None:
    from modelkiln.accuracy.evaluate import evaluate
    from modelkiln.quant.quantize import quantize

    folder = assets / "imagenet-sample"
    out = tmp_path / "lite0.int8.onnx"
    quantize(lite_onnx, out, folder, "efficientnet_lite0", calib_size=100)  # default method (percentile)
    fp32 = evaluate(lite_onnx, None, folder, folder / "labels.csv").metrics["top1"]
    int8 = evaluate(out, None, folder, folder / "labels.csv").metrics["top1"]
    print(f"efficientnet_lite0 top-1 fp32 {fp32:.4f} int8 {int8:.4f}")
    assert fp32 - int8 <= 0.005


def test_yolov5n_int8_keeps_map_without_exclusions(yolo_onnx: Path, assets: Path, tmp_path: Path) -> None:
    from modelkiln.accuracy.evaluate import evaluate
    from modelkiln.quant.quantize import quantize

    coco = assets / "coco-tiny"
    ann = coco / "annotations" / "instances_val2017.json"
    out = tmp_path / "yolov5n.int8.onnx"
    result = quantize(yolo_onnx, out, coco / "train2017", "yolov5n")
    fp32 = evaluate(yolo_onnx, None, coco / "val2017", ann).metrics["map50_95"]
    int8 = evaluate(out, None, coco / "val2017", ann).metrics["map50_95"]
    print(f"yolov5n mAP50-95 fp32 {fp32:.4f} int8 {int8:.4f}; kept float: {result.kept_float}")
    assert result.quantized_ops["Conv"] == 57  # all but the three Detect convs, which feed the float decode
    assert fp32 - int8 <= 0.010
