"""The zoo's one table: every family by name, and the way back from an exported file's metadata.

``FAMILIES`` is the only list of names: ``get`` looks names up in it, ``names`` lists it, and the
error for an unknown name quotes it. A family's class holds the rest (parts, build, example
inputs, default weights and assets; pre/post-processing for image tasks). Constructing an entry
imports nothing heavy: torch, open_clip and transformers load only in ``build``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from modelkiln.errors import ModelNotFound
from modelkiln.zoo.base import ZooModel
from modelkiln.zoo.clip import CLIPFamily, resolve_arch
from modelkiln.zoo.clip_lite0_minilm import CLIPLite0MiniLM
from modelkiln.zoo.efficientnet_lite import EfficientNetLite0
from modelkiln.zoo.minilm import SentenceEncoder
from modelkiln.zoo.qwen_vl import QwenVLFamily, qwen2_vl_2b_random
from modelkiln.zoo.resnet import ResNet50
from modelkiln.zoo.yolov5 import YOLOv5Family
from modelkiln.zoo.yolov5_cfg import SCALES

#: metadata_props keys every export writes (beside the family's own, from ZooModel.metadata()).
ZOO_KEY = "modelkiln.zoo"
PART_KEY = "modelkiln.part"
TASK_KEY = "modelkiln.task"
WEIGHTS_KEY = "modelkiln.weights"

#: Any open_clip architecture is a family too, as ``clip-<architecture>``.
CLIP_PREFIX = "clip-"


@dataclass(frozen=True)
class Family:
    """One row of the table: the canonical name, other accepted spellings, and how an entry is
    made for an image size (families with a fixed input ignore it)."""

    name: str
    make: Callable[[int | None], ZooModel]
    aliases: tuple[str, ...] = ()

    def matches(self, key: str) -> bool:
        return key in {_key(n) for n in (self.name, *self.aliases)}


def _unsized(make: Callable[[], ZooModel]) -> Callable[[int | None], ZooModel]:
    def made(image_size: int | None) -> ZooModel:
        return make()

    return made


def _qwen(family: str, tiny: bool) -> Callable[[int | None], ZooModel]:
    return _unsized(partial(QwenVLFamily, tiny=tiny, family=family))


FAMILIES: tuple[Family, ...] = (
    Family("resnet50", ResNet50),
    Family("efficientnet_lite0", EfficientNetLite0, aliases=("efficientnet_lite_0",)),
    *(Family(f"yolov5{size}", partial(YOLOv5Family, size)) for size in SCALES),
    Family("clip-vit-b-32", partial(CLIPFamily, "ViT-B-32")),
    Family("clip-lite0-minilm", CLIPLite0MiniLM),
    Family("all-minilm-l6-v2", _unsized(SentenceEncoder), aliases=("minilm",)),
    Family("qwen2-vl", _qwen("qwen2-vl", tiny=False)),
    Family("qwen2-vl-tiny", _qwen("qwen2-vl", tiny=True)),
    Family("qwen2-vl-2b-random", _unsized(qwen2_vl_2b_random)),
    Family("qwen2.5-vl", _qwen("qwen2.5-vl", tiny=False)),
    Family("qwen2.5-vl-tiny", _qwen("qwen2.5-vl", tiny=True)),
)


def _key(name: str) -> str:
    """Names match case-insensitively, with '-' and '_' alike (``YOLOv5n``, ``efficientnet-lite0``)."""
    return name.strip().lower().replace("-", "_")


def names() -> list[str]:
    """Canonical family names, in table order; any open_clip architecture is also ``clip-<arch>``."""
    return [f.name for f in FAMILIES]


def family(name: str) -> Family | None:
    """The table row for ``name`` (or one of its aliases); None when the table has none."""
    key = _key(name)
    return next((f for f in FAMILIES if f.matches(key)), None)


def get(name: str, image_size: int | None = None) -> ZooModel:
    """The zoo entry called ``name``; ModelNotFound lists the known names otherwise."""
    row = family(name)
    if row is not None:
        return row.make(image_size)
    if name.strip().lower().startswith(CLIP_PREFIX):
        return CLIPFamily(resolve_arch(name.strip()), image_size)
    raise ModelNotFound(
        f"unknown model {name!r}; the zoo has: {', '.join(names())} (and {CLIP_PREFIX}<open_clip arch>)"
    )


def recorded_weights(entry: ZooModel, weights: str | None) -> str:
    """How an export records its weights: 'random', a release name, or a file's name only (a
    path would leak the exporting machine's folders into the model file)."""
    if weights in (None, "random") and entry.default_weights is None:
        return "random"
    if weights and os.sep in weights:
        return Path(weights).name
    return str(weights or entry.default_weights)


def export_metadata(entry: ZooModel, part: str, weights: str | None) -> dict[str, str]:
    """The metadata_props of ``entry``'s exported ``part``: family, part, task and weights, then
    the family's own settings (class names, scales), which ``entry_from_metadata`` reads back."""
    return {
        ZOO_KEY: entry.name,
        PART_KEY: part,
        TASK_KEY: str(entry.task),
        WEIGHTS_KEY: recorded_weights(entry, weights),
        **entry.metadata(),
    }


def entry_from_metadata(
    metadata: dict[str, str], image_size: int | None = None, name: str | None = None
) -> ZooModel | None:
    """The zoo entry an exported file was made from, configured with what the export recorded
    (class names, scales); ``name`` overrides the recorded family (files without metadata).
    None when neither says which family it is."""
    family_name = name or metadata.get(ZOO_KEY)
    if not family_name:
        return None
    entry = get(family_name, image_size)
    entry.configure(metadata)
    return entry


def input_image_size(shapes: Iterable[Sequence[object]]) -> int | None:
    """Spatial size of the first 4-D input with a fixed last dimension, so an entry rebuilt from a
    file preprocesses to the size the file expects (exports may use any --image-size)."""
    for shape in shapes:
        if len(shape) == 4 and isinstance(shape[-1], int) and shape[-1] > 0:
            return shape[-1]
    return None
