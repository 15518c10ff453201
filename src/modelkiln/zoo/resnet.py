"""ResNet-50 (torchvision architecture), weights from a state_dict file, a torchvision name or random."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo.checkpoint import load_into, load_state_dict
from modelkiln.zoo.classification import ImageClassifier
from modelkiln.zoo.weights import is_path, is_random, warn_random

if TYPE_CHECKING:
    import torch


class ResNet50(ImageClassifier):
    """torchvision preprocessing: resize 256 bilinear, crop 224, ImageNet mean/std."""

    name = "resnet50"
    default_weights = None  # random: no pretrained ResNet-50 ships with modelkiln

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        tv = require("torchvision", "building resnet50")
        model = tv.models.resnet50(weights=None)
        if weights is None or is_random(weights):
            warn_random(self.name)
        elif is_path(weights):
            load_into(model, load_state_dict(weights, self.name), self.name)
        else:
            load_into(model, _torchvision_state_dict(tv, weights), self.name)
        return {"model": model.eval()}


def _torchvision_state_dict(tv: Any, name: str) -> dict[str, Any]:
    """Weights by torchvision release name, through torchvision's cache (downloads if absent)."""
    try:
        enum = tv.models.get_weight(f"ResNet50_Weights.{name}")
    except (ValueError, KeyError, AttributeError) as exc:
        choices = [w.name for w in tv.models.ResNet50_Weights]
        raise ModelNotFound(
            f"resnet50: unknown weights {name!r}; use a file path, 'random' or one of {choices}"
        ) from exc
    try:
        return dict(enum.get_state_dict(progress=False))
    except Exception as exc:  # network or cache failure
        raise WeightsError(f"resnet50: could not fetch torchvision weights {name}: {exc}") from exc
