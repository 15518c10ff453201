"""Tower features of a caption set: computed once when a body is locked, so each training step
only runs the heads (the speed-up that makes the default method take a minute on two cores).

Image views follow ``augment.views`` with a generator seeded per image file (``view_rng``), so
a resumed run, a rerun and the refit phase (``FeatureStore`` keeps what the first phase computed)
see the very same features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelkiln.finetune.augment import views
from modelkiln.zoo.clip import DualEncoder, TrainableDual
from modelkiln.zoo.images import read_image

if TYPE_CHECKING:
    import torch

#: Images and texts per tower run while caching.
IMAGE_BATCH = 16
TEXT_BATCH = 64


def view_rng(seed: int, path: Path) -> np.random.Generator:
    """The generator of one image's cached views: from the seed and the file's path (independent
    of the image's place in a set, of batch order and of epochs)."""
    key = int.from_bytes(hashlib.sha256(str(Path(path).resolve()).encode()).digest()[:8], "little")
    return np.random.default_rng([seed, 1, key])


def to_torch(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


def image_batch(entry: DualEncoder, images: Sequence[np.ndarray]) -> torch.Tensor:
    """The family's preprocessing of decoded images as one tensor."""
    import torch

    return torch.from_numpy(entry.preprocess(list(images)).feed["image"])


def view_features(
    model: TrainableDual, entry: DualEncoder, paths: Sequence[Path], count: int, seed: int
) -> torch.Tensor:
    """Body features of ``count`` augmented views of every image: [images, count, F]."""
    import torch

    rows = []
    with torch.no_grad():
        for path in paths:
            crops = views(read_image(path), count, view_rng(seed, path))
            rows.append(model.image_features(image_batch(entry, crops)))
    return torch.stack(rows)


def eval_image_features(model: TrainableDual, entry: DualEncoder, paths: Sequence[Path]) -> torch.Tensor:
    """Body features of each image's test-time views (``image_views``): [images, views, F]."""
    import torch

    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), IMAGE_BATCH):
            batch = image_batch(entry, [read_image(p) for p in paths[start : start + IMAGE_BATCH]])
            rows.append(torch.stack([model.image_features(v) for v in model.image_views(batch)], dim=1))
    return torch.cat(rows)


def text_features(model: TrainableDual, entry: DualEncoder, texts: Sequence[str]) -> torch.Tensor:
    """Body features of ``texts``: [texts, F]."""
    import torch

    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), TEXT_BATCH):
            rows.append(
                model.text_features(to_torch(entry.text_feed(list(texts[start : start + TEXT_BATCH]))))
            )
    return torch.cat(rows)


def head_image_embeds(model: TrainableDual, features: torch.Tensor) -> torch.Tensor:
    """Image embeddings from cached test-time view features [images, views, F]: the mean of the
    head over views, as ``encode_image`` computes it."""
    n, v = features.shape[:2]
    return model.image_head(features.reshape(n * v, -1)).reshape(n, v, -1).mean(1)


class FeatureStore:
    """Body features by image file and by text, computed once per run with the starting bodies
    (both phases start from the same weights, so the refit phase reuses the training phase's)."""

    def __init__(self, entry: DualEncoder, views: int, seed: int) -> None:
        self.entry, self.count, self.seed = entry, views, seed
        self._views: dict[Path, torch.Tensor] = {}
        self._eval: dict[Path, torch.Tensor] = {}
        self._texts: dict[str, torch.Tensor] = {}

    def views(self, model: TrainableDual, paths: Sequence[Path]) -> torch.Tensor:
        """[images, views, F] of ``paths`` (augmented views, view 0 the whole image)."""
        import torch

        missing = list(dict.fromkeys(p for p in paths if p not in self._views))
        if missing:
            found = view_features(model, self.entry, missing, self.count, self.seed)
            self._views.update(zip(missing, found, strict=True))
        return torch.stack([self._views[p] for p in paths])

    def eval_images(self, model: TrainableDual, paths: Sequence[Path]) -> torch.Tensor:
        """[images, test-time views, F] of ``paths``."""
        import torch

        missing = list(dict.fromkeys(p for p in paths if p not in self._eval))
        if missing:
            self._eval.update(zip(missing, eval_image_features(model, self.entry, missing), strict=True))
        return torch.stack([self._eval[p] for p in paths])

    def texts(self, model: TrainableDual, texts: Sequence[str]) -> torch.Tensor:
        """[texts, F] of ``texts``."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if missing:
            self._texts.update(zip(missing, text_features(model, self.entry, missing), strict=True))
        return torch.stack([self._texts[t] for t in texts])
