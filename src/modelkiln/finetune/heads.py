"""Closed-form starting heads for ``clip-lite0-minilm`` (before any contrastive step).

- text head: the identity minus the mean caption embedding (centring removes the direction all
  MiniLM sentences share, which otherwise makes a few captions near to every image);
- image head, learnt part: ridge regression from Lite0's pooled features (every cached view of
  every training image a row, features standardised) to the mean centred embedding of the image's
  captions, with the standardisation folded into the linear layer;
- image head, bridge: the ImageNet class prompts through MiniLM, centred the same way.

Contrastive training then starts from a model that already retrieves (see docs/finetune.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.zoo.clip_lite0_minilm import POOLED

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def closed_form(
    model: Any,
    view_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: np.ndarray,
    class_features: torch.Tensor,
    ridge: float,
) -> None:
    """Set ``model``'s heads (a clip-lite0-minilm TrainableDual) from training features:
    ``view_features`` [images, views, F] (pooled features first), ``text_features`` [texts, 384]
    (L2-normalised MiniLM) owned by ``text_image``, ``class_features`` [1000, 384]."""
    import torch

    texts = text_features.double().numpy()
    mean_text = texts.mean(0)
    centred = _l2(texts - mean_text)
    n_images, n_views = view_features.shape[:2]
    counts = np.bincount(text_image, minlength=n_images)[:, None]
    targets = np.zeros((n_images, centred.shape[1]))
    np.add.at(targets, text_image, centred)
    targets /= np.maximum(counts, 1)
    x = view_features[:, :, :POOLED].double().numpy().reshape(n_images * n_views, -1)
    y = np.repeat(targets, n_views, axis=0)  # rows follow x: image-major, views inside
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    y_mean = y.mean(0)
    gram = xs.T @ xs + ridge * xs.shape[0] * np.eye(xs.shape[1])
    w = np.linalg.solve(gram, xs.T @ (y - y_mean))  # [POOLED, d]
    weight = (w / sd[:, None]).T  # nn.Linear keeps [out, in]
    bias = y_mean - (mu / sd) @ w
    class_text = _l2(class_features.double().numpy() - mean_text)
    with torch.no_grad():
        proj = model.image_proj
        proj.linear.weight.copy_(torch.from_numpy(weight))
        proj.linear.bias.copy_(torch.from_numpy(bias))
        proj.class_text.copy_(torch.from_numpy(class_text))
        proj.mix.fill_(0.5)
        proj.temperature.fill_(1.0)
        text = model.text_proj
        text.weight.copy_(torch.eye(text.weight.shape[0], text.weight.shape[1]))
        text.bias.copy_(torch.from_numpy(-mean_text))
    log.debug("closed-form heads from %d images x %d views, ridge %g", n_images, n_views, ridge)


def _l2(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out
