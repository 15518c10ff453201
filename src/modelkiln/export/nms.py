"""Append ONNX NonMaxSuppression to a YOLOv5 export for an end-to-end detector.

The appended graph uses standard ONNX ops only (portable to TensorRT and other runtimes):
``output0`` [N, A, 5+nc] -> ``detections`` [K, 7] rows of (batch index, x1, y1, x2, y2, score, class).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper


def append_nms(
    model: onnx.ModelProto,
    max_per_class: int = 100,
    iou_threshold: float = 0.45,
    score_threshold: float = 0.25,
) -> onnx.ModelProto:
    """A copy of ``model`` whose output is NMS-selected detections instead of raw ``output0``."""
    graph = model.graph
    out = graph.output[0].name
    xyxy = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], np.float32)
    consts: dict[str, npt.NDArray[Any]] = {
        "nms_xyxy": xyxy,
        "nms_starts0": np.array([0], np.int64),
        "nms_ends4": np.array([4], np.int64),
        "nms_ends5": np.array([5], np.int64),
        "nms_big": np.array([1 << 30], np.int64),
        "nms_axis2": np.array([2], np.int64),
        "nms_max": np.array([max_per_class], np.int64),
        "nms_iou": np.array([iou_threshold], np.float32),
        "nms_score": np.array([score_threshold], np.float32),
        "nms_bidx": np.array([0, 2], np.int64),
        "nms_cidx": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Slice", [out, "nms_starts0", "nms_ends4", "nms_axis2"], ["nms_xywh"]),
        helper.make_node("Slice", [out, "nms_ends4", "nms_ends5", "nms_axis2"], ["nms_obj"]),
        helper.make_node("Slice", [out, "nms_ends5", "nms_big", "nms_axis2"], ["nms_cls"]),
        helper.make_node("Mul", ["nms_cls", "nms_obj"], ["nms_scores_nac"]),
        helper.make_node("MatMul", ["nms_xywh", "nms_xyxy"], ["nms_boxes"]),
        helper.make_node("Transpose", ["nms_scores_nac"], ["nms_scores"], perm=[0, 2, 1]),
        helper.make_node(
            "NonMaxSuppression",
            ["nms_boxes", "nms_scores", "nms_max", "nms_iou", "nms_score"],
            ["nms_selected"],
        ),
        # selected rows are (batch, class, box): gather boxes by (batch, box), scores by all three
        helper.make_node("Gather", ["nms_selected", "nms_bidx"], ["nms_bbox_idx"], axis=1),
        helper.make_node("GatherND", ["nms_boxes", "nms_bbox_idx"], ["nms_sel_boxes"]),
        helper.make_node("GatherND", ["nms_scores", "nms_selected"], ["nms_sel_scores_1d"]),
        helper.make_node("Unsqueeze", ["nms_sel_scores_1d", "nms_cidx"], ["nms_sel_scores"]),
        helper.make_node("Slice", ["nms_selected", "nms_starts0", "nms_cidx", "nms_cidx"], ["nms_batch_i"]),
        helper.make_node("Slice", ["nms_selected", "nms_cidx", "nms_bidx_end", "nms_cidx"], ["nms_class_i"]),
        helper.make_node("Cast", ["nms_batch_i"], ["nms_batch_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["nms_class_i"], ["nms_class_f"], to=TensorProto.FLOAT),
        helper.make_node(
            "Concat",
            ["nms_batch_f", "nms_sel_boxes", "nms_sel_scores", "nms_class_f"],
            ["detections"],
            axis=1,
        ),
    ]
    consts["nms_bidx_end"] = np.array([2], np.int64)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    new.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    new.graph.node.extend(nodes)
    del new.graph.output[:]
    new.graph.output.append(helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["detections", 7]))
    return new
