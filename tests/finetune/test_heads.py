"""The closed-form starting heads of clip-lite0-minilm, on synthetic features: the text head
centres, the image head regresses each image's views onto its captions' mean, and the class
bridge is the centred class sentences."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from modelkiln.finetune.heads import closed_form
from modelkiln.zoo.clip_lite0_minilm import CLASSES, POOLED

torch = pytest.importorskip("torch")


def heads(dim: int) -> SimpleNamespace:
    image = torch.nn.Module()
    image.linear = torch.nn.Linear(POOLED, dim)
    image.register_buffer("class_text", torch.zeros(CLASSES, dim))
    image.register_buffer("mix", torch.tensor(0.0))
    image.register_buffer("temperature", torch.tensor(3.0))
    return SimpleNamespace(image_proj=image, text_proj=torch.nn.Linear(dim, dim))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_closed_form_heads() -> None:
    rng = np.random.default_rng(0)
    dim, n_images, n_views = 8, 6, 3
    texts = unit(rng.standard_normal((12, dim)) + 2.0)  # a shared direction, as MiniLM's
    owner = np.repeat(np.arange(n_images), 2)
    base = rng.standard_normal((n_images, 1, POOLED + CLASSES))
    views = base + 0.01 * rng.standard_normal((n_images, n_views, POOLED + CLASSES))
    classes = rng.standard_normal((CLASSES, dim))
    model = heads(dim)
    f = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    closed_form(model, f(views), f(texts), owner, f(classes), ridge=1e-4)
    mean = texts.mean(0)
    with torch.no_grad():
        centred = model.text_proj(f(texts)).numpy()
        predicted = model.image_proj.linear(f(views[:, 0, :POOLED])).numpy()
    np.testing.assert_allclose(centred, texts - mean, atol=1e-5)  # identity minus the mean
    targets = np.stack([unit(texts[owner == i] - mean).mean(0) for i in range(n_images)])
    np.testing.assert_allclose(predicted, targets, atol=0.05)  # weak ridge: near the targets
    np.testing.assert_allclose(model.image_proj.class_text.numpy(), unit(classes - mean), atol=1e-5)
    assert float(model.image_proj.mix) == 0.5 and float(model.image_proj.temperature) == 1.0
