"""The model zoo: every family we export, with its pre/post-processing and the task it is scored on.

The registry is one explicit table; families are imported only when asked for, so importing the
zoo does not import torch.
"""

from __future__ import annotations

from modelkiln.errors import ModelNotFound
from modelkiln.zoo.base import Part, Prepared, TensorSpec, ZooModel

__all__ = ["Part", "Prepared", "TensorSpec", "ZooModel", "get", "names"]

_YOLO_SIZES = ("n", "s", "m", "l", "x")
#: CLIP names resolved without importing open_clip (which imports torch).
_CLIP_ARCHS = {"clip-vit-b-32": "ViT-B-32", "clip-vit-b-16": "ViT-B-16", "clip-vit-l-14": "ViT-L-14"}


def names() -> list[str]:
    """Zoo names; any open_clip architecture is also accepted as ``clip-<arch>``."""
    return [
        "resnet50",
        "efficientnet_lite0",
        *(f"yolov5{s}" for s in _YOLO_SIZES),
        "clip-vit-b-32",
        "all-minilm-l6-v2",
        "qwen2-vl",
        "qwen2-vl-tiny",
        "qwen2.5-vl",
        "qwen2.5-vl-tiny",
    ]


def get(name: str, image_size: int | None = None) -> ZooModel:
    """The zoo entry called ``name``; ModelNotFound lists the valid names otherwise."""
    key = name.strip().lower().replace("-", "_") if not name.lower().startswith("clip-") else name.lower()
    if key == "resnet50":
        from modelkiln.zoo.resnet import ResNet50

        return ResNet50(image_size)
    if key in ("efficientnet_lite0", "efficientnet_lite_0"):
        from modelkiln.zoo.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0(image_size)
    if key.startswith("yolov5") and key[6:] in _YOLO_SIZES:
        from modelkiln.zoo.yolov5 import YOLOv5Family

        return YOLOv5Family(key[6:], image_size)
    if key in ("all_minilm_l6_v2", "minilm"):
        from modelkiln.zoo.minilm import SentenceEncoder

        return SentenceEncoder()
    if key in ("qwen2_vl", "qwen2_vl_tiny", "qwen2.5_vl", "qwen2.5_vl_tiny"):
        from modelkiln.zoo.qwen_vl import QwenVLFamily

        family = "qwen2.5-vl" if key.startswith("qwen2.5") else "qwen2-vl"
        return QwenVLFamily(tiny=key.endswith("tiny"), family=family)
    if key.startswith("clip-"):
        from modelkiln.zoo.clip import CLIPFamily, resolve_arch

        return CLIPFamily(_CLIP_ARCHS.get(key) or resolve_arch(key), image_size)
    raise ModelNotFound(
        f"unknown model {name!r}; the zoo has: {', '.join(names())} (and clip-<open_clip arch>)"
    )
