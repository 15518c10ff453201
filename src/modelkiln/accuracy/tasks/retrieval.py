"""Image-text retrieval (dual encoders, CLIP-like): recall@k both ways on a caption set, and the
retrieval scorer of the task registry, run through the exported image and text towers.

A caption is a hit at k when its own image is among the k images most similar to it
(text -> image); an image is a hit when any of its captions is among its k most similar texts
(image -> text). Ties never help the model: a tied candidate sits before the true match as
often as after it (the expected recall over a random order of the tie, in closed form), so a
constant embedding scores chance, not 1.0 as a stable sort would give to early indices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from modelkiln.accuracy.tasks.base import EvalRequest, Scored
from modelkiln.data.captions import CaptionSet, load_captions
from modelkiln.errors import BadInput
from modelkiln.predict import BATCH, Predictor
from modelkiln.zoo.images import read_image

__all__ = [
    "KS",
    "LABELS",
    "METRICS",
    "PREDICTIONS",
    "TextFeeder",
    "dual_encoder_problem",
    "embed_captions",
    "recall_at_k",
    "score_retrieval",
]

log = logging.getLogger(__name__)

KS = (1, 5, 10)
#: The registry's metric names: the headline (mean of both recall@5) first.
METRICS = (
    "mean_r@5",
    *(f"text_to_image_r@{k}" for k in KS),
    *(f"image_to_text_r@{k}" for k in KS),
)
#: What --labels is for retrieval.
LABELS = "captions: a COCO captions JSON (captions_*.json), an image,caption CSV or a JSONL"
#: What --predictions writes for retrieval: everything needed to re-score with recall_at_k.
PREDICTIONS = "an .npz of image_embeds, text_embeds and text_image"
#: Captions per text-tower run.
TEXT_BATCH = 64
#: Similarities closer than this are a tie (float noise of two equal embeddings in one matmul).
TIE_TOL = 1e-9
#: Rows of the similarity matrix held at once (bounds memory on large sets).
_CHUNK = 256


def _normalized(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise BadInput(f"{what} must be a non-empty [count, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise BadInput(f"{what} holds NaN or infinite values")
    normalized: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return normalized


def _hit_rate(better: np.ndarray, tied: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """P(a positive is in the top k) when ``better`` negatives score above the best positive and
    ``tied`` negatives tie with it, shared with ``positives`` tied positives, in random order.

    The first positive lands after X of the tied negatives, P(X >= m) = prod_{t<m} (e-t)/(e+p-t);
    it is in the top k when better + X < k."""
    room = k - better  # tied negatives that may still precede the first positive
    miss = np.ones(better.shape, np.float64)
    e, p = tied.astype(np.float64), positives.astype(np.float64)
    for t in range(k):
        step = t < room
        miss = np.where(step, miss * np.maximum(e - t, 0.0) / np.maximum(e + p - t, 1.0), miss)
    hit: np.ndarray = np.where(room <= 0, 0.0, 1.0 - miss)
    return hit


def recall_at_k(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_image: np.ndarray,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall@k both ways: ``text_to_image_r@k`` (a caption's own image among its top k images)
    and ``image_to_text_r@k`` (any of an image's captions among its top k texts), and ``mean_r@5``
    (the mean of the two r@5, first) when 5 is in ``ks``.

    Embeddings are [n_images, d] and [n_texts, d] at any scale (L2-normalised here); caption j
    belongs to image ``text_image[j]``. Images without a caption are candidates for text->image
    but not scored image->text. Ties count against the model (see the module doc)."""
    images = _normalized(image_embeds, "image embeddings")
    texts = _normalized(text_embeds, "text embeddings")
    owner = np.asarray(text_image)
    if images.shape[1] != texts.shape[1]:
        raise BadInput(f"image embeddings have {images.shape[1]} dims but text embeddings {texts.shape[1]}")
    if owner.shape != (texts.shape[0],) or owner.dtype.kind not in "iu":
        raise BadInput(
            f"text_image must be {texts.shape[0]} integer image indices (one per text), "
            f"got {owner.dtype} {owner.shape}"
        )
    n_images = images.shape[0]
    if owner.min() < 0 or owner.max() >= n_images:
        raise BadInput(f"text_image holds indices outside 0..{n_images - 1}")
    if not ks or min(ks) < 1:
        raise BadInput(f"recall@k needs k >= 1, got {list(ks)}")
    owner = owner.astype(np.int64)
    t2i = {k: 0.0 for k in ks}
    for start in range(0, texts.shape[0], _CHUNK):  # a column per caption: its own image vs the rest
        sim = images @ texts[start : start + _CHUNK].T  # [n_images, chunk]
        own = sim[owner[start : start + _CHUNK], np.arange(sim.shape[1])]
        better = (sim > own + TIE_TOL).sum(axis=0)
        tied = (np.abs(sim - own) <= TIE_TOL).sum(axis=0) - 1  # not the own image itself
        for k in ks:
            t2i[k] += float(_hit_rate(better, tied, np.ones_like(tied), k).sum())
    captioned = np.bincount(owner, minlength=n_images) > 0
    i2t = {k: 0.0 for k in ks}
    for start in range(0, n_images, _CHUNK):  # a row per image: its captions vs every other text
        rows = np.arange(start, min(start + _CHUNK, n_images))
        sim = images[rows] @ texts.T  # [chunk, n_texts]
        mine = owner[None, :] == rows[:, None]
        best = np.where(mine, sim, -np.inf).max(axis=1, initial=-np.inf)[:, None]
        close = np.abs(sim - best) <= TIE_TOL
        better = ((sim > best + TIE_TOL) & ~mine).sum(axis=1)
        tied, positives = (close & ~mine).sum(axis=1), (close & mine).sum(axis=1)
        keep = captioned[rows]
        for k in ks:
            i2t[k] += float(_hit_rate(better[keep], tied[keep], positives[keep], k).sum())
    out = {f"text_to_image_r@{k}": t2i[k] / texts.shape[0] for k in ks}
    out |= {f"image_to_text_r@{k}": i2t[k] / int(captioned.sum()) for k in ks}
    if 5 in ks:
        out = {"mean_r@5": (out["text_to_image_r@5"] + out["image_to_text_r@5"]) / 2, **out}
    return out


@runtime_checkable
class TextFeeder(Protocol):
    """What retrieval needs of a zoo entry beyond images: its text tower's feeds (a DualEncoder)."""

    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]: ...


def _output(outputs: dict[str, np.ndarray], name: str, part: str) -> np.ndarray:
    """The tower's ``name`` output (or its only output)."""
    if name in outputs:
        return np.asarray(outputs[name])
    if len(outputs) == 1:
        return np.asarray(next(iter(outputs.values())))
    raise BadInput(f"the {part} tower has no output {name!r}; it gives {sorted(outputs)}")


def dual_encoder_problem(predictor: Predictor) -> str | None:
    """Why ``predictor`` cannot be scored on retrieval (None when it can)."""
    missing = [p for p in ("image", "text") if p not in predictor.backends]
    if not isinstance(predictor.entry, TextFeeder) or missing:
        parts = ", ".join(sorted(predictor.backends)) or "none"
        return (
            f"{predictor.entry.name} is not a dual encoder: retrieval needs an image and a text "
            f"tower with the zoo's text feeds (parts found: {parts})"
        )
    return None


def embed_captions(predictor: Predictor, captions: CaptionSet) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [images, d], text embeddings [captions, d]) of ``captions`` through the
    predictor's image and text towers, images in batches of ``predict.BATCH``, captions of
    ``TEXT_BATCH`` (the entry's own ``text_feed``)."""
    problem = dual_encoder_problem(predictor)
    if problem:
        raise BadInput(problem)
    entry = predictor.entry
    assert isinstance(entry, TextFeeder)
    image_rows = []
    for start in range(0, len(captions), BATCH):
        feed = _image_feed(predictor, captions.images[start : start + BATCH])
        image_rows.append(_output(predictor.backends["image"].infer(feed), "image_embeds", "image"))
    texts, _ = captions.texts()
    text_rows = []
    for start in range(0, len(texts), TEXT_BATCH):
        feed = entry.text_feed(texts[start : start + TEXT_BATCH])
        text_rows.append(_output(predictor.backends["text"].infer(feed), "text_embeds", "text"))
    return np.concatenate(image_rows), np.concatenate(text_rows)


def _image_feed(predictor: Predictor, paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """The image tower's feed for ``paths`` (read through the zoo's guarded reader)."""
    return predictor.entry.preprocess([read_image(p) for p in paths]).feed


def score_retrieval(predictor: Predictor, request: EvalRequest) -> Scored:
    """Recall@1/5/10 both ways (``mean_r@5`` first) of a dual encoder's exported towers on the
    caption set ``request.data`` (+ ``request.labels``), its first ``request.limit`` images; with
    ``request.predictions``, an .npz of the embeddings and caption owners (re-score with
    ``recall_at_k``)."""
    problem = dual_encoder_problem(predictor)
    if problem:
        raise BadInput(problem)
    captions, _ = load_captions(request.data, request.labels)
    if request.limit:
        captions = captions.subset(range(min(request.limit, len(captions))))
    image_embeds, text_embeds = embed_captions(predictor, captions)
    _, owner = captions.texts()
    metrics = recall_at_k(image_embeds, text_embeds, owner)
    if request.predictions:
        with open(request.predictions, "wb") as f:  # np.savez would append .npz to the name
            np.savez(f, image_embeds=image_embeds, text_embeds=text_embeds, text_image=owner)
    log.info("retrieval on %d images, %d captions of %s", len(captions), len(owner), captions.source)
    return Scored(len(captions), metrics)
