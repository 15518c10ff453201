"""The multi-positive contrastive loss: a picture twice in a batch is never its own negative."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from modelkiln.finetune.loss import multi_positive_loss

F = torch.nn.functional


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_distinct_images_give_clip_loss() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    ids = torch.arange(6)
    logits = 10.0 * image @ text.T
    clip = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.T, ids)) / 2
    got = multi_positive_loss(image, text, ids, ids, torch.tensor(10.0))
    assert abs(float(got) - float(clip)) < 1e-5


def test_same_image_twice_is_not_its_own_negative() -> None:
    """Rows 0 and 1 are one picture with two captions, both close to it: perfect retrieval.
    The loss goes to zero; CLIP's loss with arange labels stays at log 2 for those rows."""
    pictures = unit(torch.eye(4))
    image = pictures[[0, 0, 1, 2]]
    text = unit(pictures[[0, 0, 1, 2]] + 0.01 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    ids = torch.tensor([7, 7, 1, 2])
    scale = torch.tensor(100.0)
    multi = float(multi_positive_loss(image, text, ids, ids, scale))
    logits = scale * image @ text.T
    naive = float((F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2)
    assert multi < 1e-3
    assert naive > 0.5 * math.log(2) * 0.9  # half the rows pay ~log 2 each


def test_moving_a_duplicate_caption_onto_its_picture_lowers_the_loss() -> None:
    """Picture 0 twice with captions 0 and 1, caption 0 already on it: moving caption 1 onto
    picture 0 too lowers the loss (it is a positive of both rows of picture 0)."""
    g = torch.Generator().manual_seed(2)
    pictures = unit(torch.randn(2, 8, generator=g))
    image = pictures[[0, 0, 1]]
    text = torch.stack([pictures[0], unit(torch.randn(8, generator=g)), pictures[1]])
    moved = text.clone()
    moved[1] = pictures[0]
    ids, scale = torch.tensor([0, 0, 1]), torch.tensor(10.0)
    before = float(multi_positive_loss(image, text, ids, ids, scale))
    after = float(multi_positive_loss(image, moved, ids, ids, scale))
    assert after < before
    assert after < 0.05  # both rows of picture 0 now find only positives near it


def test_a_row_without_positive_is_an_error() -> None:
    x = unit(torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive"):
        multi_positive_loss(x, x, torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor(1.0))
