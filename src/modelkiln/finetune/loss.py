"""The contrastive loss with several captions per image: every (image, text) pair of the same
image is a positive, so an image that appears twice in a batch, or a caption of the image beside
another, is never pushed away from its own picture.

For each image row the loss is ``-log`` of the softmax mass on its positive texts (not the mean
log-probability of each positive, which can never reach zero with two positives); the same for
each text column over images. Symmetric (image->text and text->image), as CLIP's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def multi_positive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Mean of the two directions' losses for L2-normalised ``image`` [B, d] and ``text`` [C, d]
    whose owners are ``image_ids`` [B] and ``text_ids`` [C] (same id: same picture); ``scale``
    multiplies the cosine similarities (CLIP's logit scale)."""
    import torch

    logits = scale * image @ text.T
    positive = image_ids[:, None] == text_ids[None, :]
    if not bool(positive.any(dim=1).all()) or not bool(positive.any(dim=0).all()):
        raise ValueError("every image and every text of a batch needs a positive partner")
    masked = logits.masked_fill(~positive, float("-inf"))
    image_to_text = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)
    text_to_image = torch.logsumexp(logits, dim=0) - torch.logsumexp(masked, dim=0)
    loss: torch.Tensor = (image_to_text.mean() + text_to_image.mean()) / 2
    return loss
