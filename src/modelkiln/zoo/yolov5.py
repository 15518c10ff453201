"""YOLOv5 v7.0 detectors (n/s/m/l/x): letterbox pre-processing, decode + class-aware NMS after.

Exports follow the official ONNX layout: ``images`` [N,3,640,640] float RGB/255 -> ``output0``
[N,25200,85] (pixel xywh, objectness and class scores after sigmoid), so existing YOLOv5 tooling
accepts our files. Official ``.pt`` checkpoints load through a restricted unpickler.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import WeightsError
from modelkiln.zoo.base import ImageTask, Part, Prepared, Task, TensorSpec
from modelkiln.zoo.checkpoint import Inert, load_checkpoint, load_into, module_tensors
from modelkiln.zoo.coco import COCO80_NAMES
from modelkiln.zoo.letterbox import letterbox_batch
from modelkiln.zoo.nms import batched_yolo_nms
from modelkiln.zoo.weights import is_random, warn_random
from modelkiln.zoo.yolov5_cfg import SCALES, official_yaml

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    label: str


@dataclass(frozen=True)
class Detections:
    """Boxes in the original image's pixel coordinates."""

    boxes: list[Box]

    def __str__(self) -> str:
        if not self.boxes:
            return "no detections"
        return "\n".join(
            f"{b.label:>14s} {b.score:5.2f}  [{b.x1:.0f}, {b.y1:.0f}, {b.x2:.0f}, {b.y2:.0f}]"
            for b in self.boxes
        )


class YOLOv5Family(ImageTask):
    """One size of YOLOv5; thresholds default to prediction use, ``for_evaluation`` gives mAP use."""

    task = Task.DETECTION

    def __init__(self, size: str, image_size: int | None = None) -> None:
        self.size = size
        self.name = f"yolov5{size}"
        self.image_size = image_size or 640
        if self.image_size % 32:
            raise ValueError(f"{self.name}: image size must be a multiple of 32, got {self.image_size}")
        self.class_names: tuple[str, ...] = COCO80_NAMES
        self.conf_threshold, self.iou_threshold, self.multi_label, self.max_det = 0.25, 0.45, False, 300

    def for_evaluation(self) -> Self:
        """Thresholds of YOLOv5's val.py: conf 0.001, IoU 0.6, several labels per box."""
        self.conf_threshold, self.iou_threshold, self.multi_label = 0.001, 0.6, True
        return self

    @property
    def parts(self) -> tuple[Part, ...]:
        s = self.image_size
        anchors = 3 * sum((s // stride) ** 2 for stride in (8, 16, 32))
        return (
            Part(
                "model",
                inputs=(TensorSpec("images", "float32", ("batch", 3, s, s)),),
                outputs=(TensorSpec("output0", "float32", ("batch", anchors, 5 + len(self.class_names))),),
            ),
        )

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        s = self.image_size
        return {"images": rng.random((batch, 3, s, s), dtype=np.float32)}

    def metadata(self) -> dict[str, str]:
        return {"stride": "32", "names": json.dumps(dict(enumerate(self.class_names)))}

    def configure(self, metadata: dict[str, str]) -> None:
        """Take class names from an exported model's metadata (custom-trained checkpoints)."""
        if "names" in metadata:
            names = json.loads(metadata["names"])
            self.class_names = tuple(names[str(i)] for i in range(len(names)))

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        require("torch", f"building {self.name}")
        # yolov5_net defines nn.Modules at module level, so it is torch itself: loaded like torch
        network = require("modelkiln.zoo.yolov5_net", f"building {self.name}").YOLOv5
        if weights is None or is_random(weights):
            warn_random(self.name)
            return {"model": network(official_yaml(self.size, len(self.class_names))).eval()}
        cfg, state, names = self._read_checkpoint(weights)
        model = network(cfg)
        load_into(model, state, self.name)
        self.class_names = names
        return {"model": model.eval()}

    def _read_checkpoint(self, weights: str) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        ckpt = load_checkpoint(weights, self.name)
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
        if isinstance(model, Inert):
            cfg = getattr(model, "yaml", None)
            if not isinstance(cfg, dict) or "backbone" not in cfg:
                raise WeightsError(
                    f"{self.name}: {weights} holds a model without its YOLOv5 yaml description"
                )
            names = getattr(model, "names", COCO80_NAMES)
            names = tuple(names.values()) if isinstance(names, dict) else tuple(names)
            state = {
                k: v for k, v in module_tensors(model).items() if not k.endswith(("anchor_grid", ".grid"))
            }
            if (cfg["depth_multiple"], cfg["width_multiple"]) != SCALES[self.size]:
                log.warning(
                    "%s: %s holds a model of another scale (depth %s, width %s); using the checkpoint's",
                    self.name,
                    weights,
                    cfg["depth_multiple"],
                    cfg["width_multiple"],
                )
            return cfg, state, names
        if isinstance(ckpt, dict) and ckpt and all(hasattr(v, "shape") for v in ckpt.values()):
            return official_yaml(self.size), dict(ckpt), COCO80_NAMES
        raise WeightsError(
            f"{self.name}: {weights} is neither a YOLOv5 checkpoint ({{'model': Model}}) nor a state_dict; "
            f"found {type(ckpt).__name__}"
        )

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """Letterbox, BGR -> RGB, / 255 and HWC -> CHW in one pass per image, into the batch
        (``zoo.letterbox.letterbox_batch``)."""
        batch, fits = letterbox_batch(images, self.image_size, self.name)
        meta = [
            {"gain": f.gain, "pad": (f.left, f.top), "shape": image.shape[:2]}
            for f, image in zip(fits, images, strict=True)
        ]
        return Prepared({"images": batch}, meta)

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[Detections]:
        """Decode (or read in-graph NMS rows), then map boxes back to each original image."""
        if "detections" in outputs:  # end-to-end export: rows of [batch, x1, y1, x2, y2, score, class]
            rows = np.asarray(outputs["detections"], np.float32)
            per_image = [rows[rows[:, 0] == i][:, 1:] for i in range(len(prepared.meta))]
        else:
            per_image = batched_yolo_nms(
                outputs["output0"], self.conf_threshold, self.iou_threshold, self.max_det, self.multi_label
            )
        return [self._to_original(det, meta) for det, meta in zip(per_image, prepared.meta, strict=True)]

    def _to_original(self, det: np.ndarray, meta: dict[str, Any]) -> Detections:
        (left, top), gain, (h, w) = meta["pad"], meta["gain"], meta["shape"]
        xyxy = (det[:, :4] - np.array([left, top, left, top], np.float32)) / gain
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        names, known = self.class_names, len(self.class_names)
        boxes = [
            Box(x1, y1, x2, y2, s, c, names[c] if 0 <= c < known else str(c))
            for (x1, y1, x2, y2), s, c in zip(
                xyxy.tolist(), det[:, 4].tolist(), det[:, 5].astype(np.int64).tolist(), strict=True
            )
        ]
        return Detections(boxes)
